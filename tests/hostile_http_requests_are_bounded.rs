//! What arrives before a WebSocket exists is bounded: ambiguous framing is
//! refused (no request smuggling), a body that never arrives times out
//! with 408 like a head does, and no number of idle or half-sent requests
//! can use up the descriptors WebSocket clients need (MAX_PENDING: the
//! oldest not-yet-upgraded connection is closed to make room).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{http, parse_response, wait_for, Client, Server, TIMEOUT};
use serde_json::json;

/// Sends raw bytes on a fresh connection and reads until the server
/// closes it (or TIMEOUT passes, which fails the test).
fn exchange(addr: SocketAddr, raw: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => out,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => out,
        Err(e) => panic!("the server neither answered nor closed: {e}; got {out:?}"),
    }
}

/// Every response in `raw` (status codes, in order).
fn statuses(raw: &[u8]) -> Vec<u16> {
    String::from_utf8_lossy(raw)
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| {
            let s = String::from_utf8_lossy(raw);
            s[i + 9..i + 12].parse().ok()
        })
        .collect()
}

const SMUGGLED: &str = "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 38\r\n\r\n{\"channel\":\"bank\",\"data\":\"smuggled\"}";

#[test]
fn ambiguous_framing_is_refused_and_nothing_smuggled_is_published() {
    let server = Server::open();
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("bank");
    let first = r#"{"channel":"bank","data":1}"#;
    assert_eq!(first.len(), 27);
    let cases = [
        // Two lengths: the first covers only `first`; a proxy honouring
        // the second would forward SMUGGLED as part of this body.
        format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\nContent-Length: {}\r\n\r\n{first}{SMUGGLED}",
            27 + SMUGGLED.len()
        ),
        format!(
            "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\nTransfer-Encoding: chunked\r\n\r\n{first}{SMUGGLED}"
        ),
        format!("POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: +27\r\n\r\n{first}{SMUGGLED}"),
        format!("POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 27, 27\r\n\r\n{first}{SMUGGLED}"),
    ];
    for raw in &cases {
        let got = statuses(&exchange(server.addr, raw.as_bytes()));
        assert_eq!(got, vec![400], "{raw:?}");
    }
    // A body on a request that reads none (GET): answered, then the
    // connection is closed instead of the body being read as a request.
    let raw = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
        SMUGGLED.len()
    );
    assert_eq!(statuses(&exchange(server.addr, raw.as_bytes())), vec![200]);
    // An upgrade request with a body is refused.
    let raw = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
        SMUGGLED.len()
    );
    assert_eq!(statuses(&exchange(server.addr, raw.as_bytes())), vec![400]);
    // Nothing reached the subscriber.
    let got = sub.sync();
    assert!(
        got.is_empty(),
        "smuggled or refused publishes delivered: {got:?}"
    );
    // A well-framed pipelined pair still works.
    let raw = format!(
        "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 27\r\n\r\n{first}POST /publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 27\r\n\r\n{first}"
    );
    assert_eq!(
        statuses(&exchange(server.addr, raw.as_bytes())),
        vec![202, 202]
    );
    assert_eq!(sub.sync().len(), 2);
}

#[test]
fn a_body_that_never_arrives_gets_408() {
    let server = Server::start(&[("HANDSHAKE_TIMEOUT", "1")]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n{\"channel\"")
        .unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the server must answer and close, not hang");
    let (status, body) = parse_response(&out);
    assert_eq!(status, 408, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?} for a 1 s timeout",
        start.elapsed()
    );
    wait_for("the timeout metric", || {
        server.metric_sum("herald_request_timeouts_total") >= 1.0
    });
}

/// With its descriptors limited, a server flooded with connections that
/// never finish a request still lets a WebSocket client in, and answers
/// /health: the floods only push out their own older connections.
#[test]
fn idle_and_half_sent_requests_cannot_lock_clients_out() {
    // 200 WebSocket connections + 256 spare + 64 pending: a flood of 700
    // unfinished requests would exhaust the descriptors without the bound.
    let server = Server::start_with_nofile_limit(
        &[
            ("MAX_CONNECTIONS", "200"),
            ("MAX_PENDING", "64"),
            ("HANDSHAKE_TIMEOUT", "60"),
        ],
        256,
    );
    let mut flood = Vec::new();
    for i in 0..700 {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        if i % 2 == 1 {
            s.write_all(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 60000\r\n\r\n{\"c")
                .unwrap();
        }
        flood.push(s);
    }
    // Every flood connection has been accepted once this answers.
    let (status, body) = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "{body}");
    let mut c = Client::connect(&server, "/ws");
    c.subscribe("still-open");
    let mut p = Client::connect(&server, "/ws");
    p.publish("still-open", json!("yes"));
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"still-open","data":"yes"})
    );
    // The server closed the oldest flood connections, not the clients.
    let mut closed = 0;
    for s in flood.iter_mut() {
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    assert!(
        closed >= 700 - 64 - 2,
        "only {closed} of 700 unfinished connections were closed"
    );
    assert!(server.metric_sum("herald_pending_evictions_total") >= 600.0);
}
