//! The client's address behind a reverse proxy (`TRUSTED_PROXIES`).
//!
//! The TCP peer is the client unless it is a trusted proxy. Then the
//! address comes from the request: `Forwarded` (RFC 7239) if present, else
//! `X-Forwarded-For`. Each proxy appends the address it saw, so the list is
//! read from the right, skipping trusted proxies; the first address that
//! is not one of them is the client. Anything to its left was written by
//! the client itself and is never believed. An entry that is not an
//! address (`unknown`, an obfuscated `_name`, garbage) stops the walk: the
//! last trusted hop is then the best-known address.
//!
//! Pure: headers in, an address out.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Parses `TRUSTED_PROXIES`: comma-separated addresses or CIDR blocks.
pub fn parse_trusted(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("'{p}' is not an IP address or CIDR block such as 10.0.0.0/8"))
        })
        .collect()
}

fn trusted(ip: IpAddr, list: &[IpNet]) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    list.iter().any(|n| n.contains(&ip))
}

/// One hop of a forwarding header: an address with or without a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Ip(IpAddr),
    Sock(SocketAddr),
}

impl Hop {
    fn ip(self) -> IpAddr {
        match self {
            Hop::Ip(ip) => ip,
            Hop::Sock(s) => s.ip(),
        }
    }

    fn render(self) -> String {
        match self {
            Hop::Ip(ip) => ip.to_string(),
            Hop::Sock(s) => s.to_string(),
        }
    }
}

/// Parses one node: `1.2.3.4`, `1.2.3.4:80`, `[::1]`, `[::1]:80`, `::1`.
fn parse_node(s: &str) -> Option<Hop> {
    let s = s.trim().trim_matches('"');
    if let Ok(sock) = s.parse::<SocketAddr>() {
        return Some(Hop::Sock(sock));
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse::<IpAddr>().ok().map(Hop::Ip)
}

/// The `for=` nodes of every `Forwarded` header, in order; `None` for a
/// node that is not an address.
fn forwarded_for(values: &[&str]) -> Vec<Option<Hop>> {
    let mut out = Vec::new();
    for v in values {
        for element in v.split(',') {
            for pair in element.split(';') {
                if let Some((k, val)) = pair.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("for") {
                        out.push(parse_node(val));
                    }
                }
            }
        }
    }
    out
}

fn x_forwarded_for(values: &[&str]) -> Vec<Option<Hop>> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(parse_node)
        .collect()
}

/// The client's address as herald reports it (`ip:port`, or `ip` when a
/// proxy gave no port): the peer itself unless it is a trusted proxy.
pub fn client_addr<'a>(
    peer: SocketAddr,
    headers: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    list: &[IpNet],
) -> String {
    if list.is_empty() || !trusted(peer.ip(), list) {
        return peer.to_string();
    }
    let values = |name: &str| -> Vec<&str> {
        headers
            .clone()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
            .collect()
    };
    let fwd = values("forwarded");
    let hops = if fwd.is_empty() {
        x_forwarded_for(&values("x-forwarded-for"))
    } else {
        forwarded_for(&fwd)
    };
    let mut best = Hop::Sock(peer);
    for hop in hops.iter().rev() {
        match hop {
            Some(h) if trusted(h.ip(), list) => best = *h,
            Some(h) => return h.render(),
            None => break,
        }
    }
    best.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a str, &'a str)> + Clone {
        pairs.iter().copied()
    }

    #[test]
    fn parses_addresses_and_blocks() {
        let l = parse_trusted(" 10.0.0.0/8, 127.0.0.1 ,::1").unwrap();
        assert_eq!(l.len(), 3);
        assert!(trusted("10.1.2.3".parse().unwrap(), &l));
        assert!(trusted("::ffff:127.0.0.1".parse().unwrap(), &l));
        assert!(!trusted("11.0.0.1".parse().unwrap(), &l));
        assert!(parse_trusted("10.0.0.0/33").is_err());
        assert!(parse_trusted("proxy.local").is_err());
        assert_eq!(parse_trusted("").unwrap(), vec![]);
    }

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_claim() {
        let peer: SocketAddr = "203.0.113.5:4000".parse().unwrap();
        let list = parse_trusted("10.0.0.0/8").unwrap();
        let headers = h(&[("X-Forwarded-For", "1.1.1.1")]);
        assert_eq!(
            client_addr(peer, headers.clone(), &list),
            "203.0.113.5:4000"
        );
        assert_eq!(client_addr(peer, headers.clone(), &[]), "203.0.113.5:4000");
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let proxy: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let list = parse_trusted("10.0.0.0/8").unwrap();
        // The client forged 6.6.6.6; the first proxy saw 198.51.100.7.
        let headers = h(&[("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.0.0.9")]);
        assert_eq!(client_addr(proxy, headers.clone(), &list), "198.51.100.7");
        // Repeated headers are one list.
        let headers = h(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("X-Forwarded-For", "198.51.100.7"),
        ]);
        assert_eq!(client_addr(proxy, headers.clone(), &list), "198.51.100.7");
        // Only trusted hops: the leftmost of them.
        let headers = h(&[("X-Forwarded-For", "10.9.9.9, 10.0.0.9")]);
        assert_eq!(client_addr(proxy, headers.clone(), &list), "10.9.9.9");
        // No header: the proxy itself.
        assert_eq!(client_addr(proxy, h(&[]), &list), "10.0.0.2:5000");
    }

    #[test]
    fn forwarded_wins_and_keeps_ports() {
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let list = parse_trusted("127.0.0.1").unwrap();
        let headers = h(&[
            ("X-Forwarded-For", "9.9.9.9"),
            (
                "Forwarded",
                r#"for=6.6.6.6;proto=http, for="[2001:db8:cafe::17]:4711";by=127.0.0.1"#,
            ),
        ]);
        assert_eq!(
            client_addr(proxy, headers.clone(), &list),
            "[2001:db8:cafe::17]:4711"
        );
        let headers = h(&[("Forwarded", "for=192.0.2.60:47011")]);
        assert_eq!(
            client_addr(proxy, headers.clone(), &list),
            "192.0.2.60:47011"
        );
    }

    #[test]
    fn garbage_stops_the_walk() {
        let proxy: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let list = parse_trusted("10.0.0.0/8").unwrap();
        let headers = h(&[("Forwarded", "for=1.2.3.4, for=unknown")]);
        assert_eq!(client_addr(proxy, headers.clone(), &list), "10.0.0.2:5000");
        let headers = h(&[("X-Forwarded-For", "1.2.3.4, <script>, 10.0.0.3")]);
        assert_eq!(client_addr(proxy, headers.clone(), &list), "10.0.0.3");
    }
}
