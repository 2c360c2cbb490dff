//! Pusher socket ids: `{a}.{b}` as the libraries expect (`^\d+\.\d+$`),
//! encoding where the connection lives so an HTTP API trigger can exclude
//! it (`socket_id`) on whichever core it is: `a = gen * 64 + worker`,
//! `b = slab key`. The generation makes an id unique for the life of the
//! process, so a stale id never excludes a later connection.

use crate::config::MAX_WORKERS;

/// A connection, as a socket id names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketRef {
    pub worker: u16,
    pub key: u32,
    pub gen: u64,
}

/// The socket id of connection `key` (generation `gen`) on `worker`.
pub fn format(worker: usize, key: usize, gen: u64) -> String {
    format!("{}.{}", gen * MAX_WORKERS as u64 + worker as u64, key)
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
    let key: u32 = b.parse().ok()?;
    Some(SocketRef {
        worker: (a % MAX_WORKERS as u64) as u16,
        key,
        gen: a / MAX_WORKERS as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = format(3, 17, 123_456);
        assert_eq!(
            decode(&id),
            Some(SocketRef {
                worker: 3,
                key: 17,
                gen: 123_456
            })
        );
        for bad in ["", "1", "1.", ".1", "a.1", "1.2.3", "-1.2", "1.99999999999"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }
}
