//! protocol.md "Close codes": with `CHECK_ORIGIN` a disallowed `Origin` gets
//! HTTP 403 at the upgrade; `ALLOWED_ORIGINS` lists the allowed ones, without
//! it the Origin must match Host; a request without Origin is accepted.

mod common;

use common::{Client, Server};
use std::net::SocketAddr;

fn status(addr: SocketAddr, origin: Option<&str>) -> u16 {
    let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
    match Client::try_connect(addr, "/ws", &headers) {
        Ok(mut c) => {
            assert!(c.sync().is_empty(), "accepted connection works");
            101
        }
        Err(r) => r.status,
    }
}

#[test]
fn allowed_origins_list_is_enforced() {
    let server = Server::start(&[
        ("CHECK_ORIGIN", "true"),
        ("ALLOWED_ORIGINS", "https://good.example"),
    ]);
    let addr = server.addr;
    assert_eq!(status(addr, Some("https://good.example")), 101);
    assert_eq!(status(addr, Some("https://evil.example")), 403);
    assert_eq!(status(addr, Some("https://good.example.evil.example")), 403);
    assert_eq!(status(addr, Some("http://good.example")), 403);
    // Same host as the request is not enough when a list is configured.
    assert_eq!(status(addr, Some(&format!("http://{addr}"))), 403);
    // Non-browser clients send no Origin.
    assert_eq!(status(addr, None), 101);
}

#[test]
fn without_allowed_origins_origin_must_match_host() {
    let server = Server::start(&[("CHECK_ORIGIN", "true")]);
    let addr = server.addr;
    // tungstenite sends `Host: <addr>`.
    assert_eq!(status(addr, Some(&format!("http://{addr}"))), 101);
    assert_eq!(status(addr, Some("https://evil.example")), 403);
    assert_eq!(
        status(addr, Some(&format!("http://{}:1", addr.ip()))),
        403,
        "same IP, other port"
    );
    assert_eq!(status(addr, None), 101);
}

#[test]
fn origin_is_not_checked_by_default() {
    let server = Server::open();
    assert_eq!(status(server.addr, Some("https://evil.example")), 101);
}
