//! Pusher socket ids: `{a}.{b}` as the libraries expect (`^\d+\.\d+$`),
//! encoding where the connection lives so an HTTP API trigger can exclude
//! it (`socket_id`) on whichever core it is: `a = gen * 64 + worker`,
//! `b = slab key`, plus `node * 2^32` in a cluster (`node`: the node's
//! tag, so that a trigger on any node excludes the connection on its own).
//! The generation makes an id unique for the life of the process, so a
//! stale id never excludes a later connection.

use crate::config::MAX_WORKERS;

/// A connection, as a socket id names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketRef {
    pub worker: u16,
    pub key: u32,
    pub gen: u64,
    /// The node's tag in a cluster (0 on a single node).
    pub node: u32,
}

/// The socket id of connection `key` (generation `gen`) on `worker` of
/// node `node` (0 alone).
pub fn format(worker: usize, key: usize, gen: u64, node: u32) -> String {
    let b = (u64::from(node) << 32) | key as u64;
    format!("{}.{}", gen * MAX_WORKERS as u64 + worker as u64, b)
}

/// Reads a socket id issued by this process of `workers` workers (`None`
/// if malformed or not one of ours).
pub fn parse(s: &str, workers: usize) -> Option<SocketRef> {
    let r = decode(s)?;
    (usize::from(r.worker) < workers).then_some(r)
}

fn decode(s: &str) -> Option<SocketRef> {
    let (a, b) = s.split_once('.')?;
    if a.is_empty() || b.is_empty() || !a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let a: u64 = a.parse().ok()?;
    let b: u64 = b.parse().ok()?;
    Some(SocketRef {
        worker: (a % MAX_WORKERS as u64) as u16,
        key: b as u32,
        gen: a / MAX_WORKERS as u64,
        node: u32::try_from(b >> 32).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = format(3, 17, 123_456, 0);
        assert_eq!(
            decode(&id),
            Some(SocketRef {
                worker: 3,
                key: 17,
                gen: 123_456,
                node: 0
            })
        );
        let id = format(1, 9, 5, 0x7fff_ffff);
        assert_eq!(decode(&id).map(|r| (r.node, r.key)), Some((0x7fff_ffff, 9)));
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "a.1",
            "1.2.3",
            "-1.2",
            "1.99999999999999999999",
        ] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
