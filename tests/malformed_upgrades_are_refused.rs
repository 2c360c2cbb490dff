//! RFC 6455 §4.2 and protocol.md "Endpoints" on raw HTTP: malformed,
//! oversized, slow or misdirected upgrade requests get their HTTP error
//! status and never a WebSocket, a frame pipelined right after a valid head
//! is processed, and the server keeps serving normal clients.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{assert_no_failures, parse_response, Client, Server, TIMEOUT};
use serde_json::{json, Value};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

/// A well-formed upgrade head for `path`, with `headers` replacing (or,
/// with `None`, removing) the standard ones and extra ones appended.
fn upgrade_head(method: &str, path: &str, headers: &[(&str, Option<&str>)]) -> Vec<u8> {
    let mut all: Vec<(String, String)> = [
        ("Host", "127.0.0.1"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Version", "13"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (name, value) in headers {
        match all.iter().position(|(k, _)| k.eq_ignore_ascii_case(name)) {
            Some(i) => match value {
                Some(v) => all[i].1 = v.to_string(),
                None => {
                    all.remove(i);
                }
            },
            None => {
                if let Some(v) = value {
                    all.push((name.to_string(), v.to_string()));
                }
            }
        }
    }
    let mut out = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in all {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A masked client text frame.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![0x81, 0x80 | payload.len() as u8];
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
    out
}

/// Sends `bytes` on a fresh connection and reads until the server closes
/// it. Tolerates the server closing (or resetting) while we still write.
/// Fails the test if the server keeps the connection open past TIMEOUT.
fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    let _ = s.write_all(bytes);
    read_until_closed(&mut s)
}

fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return out,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => panic!(
                "server kept the connection open for {TIMEOUT:?}; got so far: {:?}",
                String::from_utf8_lossy(&out)
            ),
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// The value of response header `name` (case-insensitive).
fn header(raw: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Subscribe/publish round trip between two fresh clients, and /health.
fn assert_still_serves(server: &Server) {
    let mut a = Client::connect(server, "/ws");
    let mut b = Client::connect(server, "/ws");
    b.subscribe("alive");
    a.publish("alive", json!("ok"));
    assert_eq!(
        b.recv_json(),
        json!({"op":"message","channel":"alive","data":"ok"})
    );
    let (status, _) = common::http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200);
}

#[test]
fn each_malformed_upgrade_gets_its_http_status_and_no_websocket() {
    let server = Server::open();
    let h = |headers: &[(&str, Option<&str>)]| upgrade_head("GET", "/ws", headers);
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        (
            "garbage request line",
            b"GARBAGE\x01\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "TLS ClientHello bytes",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "request line without version",
            b"GET /ws\r\nUpgrade: websocket\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "missing Sec-WebSocket-Key",
            h(&[("Sec-WebSocket-Key", None)]),
            &[400],
        ),
        (
            "empty Sec-WebSocket-Key",
            h(&[("Sec-WebSocket-Key", Some(""))]),
            &[400],
        ),
        (
            "short Sec-WebSocket-Key",
            h(&[("Sec-WebSocket-Key", Some("short"))]),
            &[400],
        ),
        (
            "24-char key that is not base64",
            h(&[("Sec-WebSocket-Key", Some("!!!!!!!!!!!!!!!!!!!!!!=="))]),
            &[400],
        ),
        (
            "base64 key of 20 bytes, not 16",
            h(&[("Sec-WebSocket-Key", Some("AAAAAAAAAAAAAAAAAAAAAAAAAAA="))]),
            &[400],
        ),
        // §4.2.2: an unsupported version gets 426 (checked for its header below).
        (
            "Sec-WebSocket-Version: 8",
            h(&[("Sec-WebSocket-Version", Some("8"))]),
            &[426],
        ),
        (
            "missing Sec-WebSocket-Version",
            h(&[("Sec-WebSocket-Version", None)]),
            &[400, 426],
        ),
        (
            "Connection: keep-alive (no Upgrade token)",
            h(&[("Connection", Some("keep-alive"))]),
            &[400],
        ),
        ("no Connection header", h(&[("Connection", None)]), &[400]),
        (
            "POST with Upgrade",
            upgrade_head("POST", "/ws", &[("Content-Length", Some("0"))]),
            &[405],
        ),
        (
            "HTTP/1.0 upgrade",
            String::from_utf8(h(&[]))
                .unwrap()
                .replacen("HTTP/1.1", "HTTP/1.0", 1)
                .into_bytes(),
            &[400],
        ),
        (
            "unknown WebSocket path",
            upgrade_head("GET", "/nope", &[]),
            &[404],
        ),
        (
            "/echo without ECHO_ENDPOINT",
            upgrade_head("GET", "/echo", &[]),
            &[404],
        ),
    ];
    let mut failures = Vec::new();
    for (what, bytes, statuses) in &cases {
        let raw = exchange(server.addr, bytes);
        if raw.is_empty() {
            failures.push(format!("{what}: connection closed without a response"));
            continue;
        }
        let (status, body) = parse_response(&raw);
        if !statuses.contains(&status) {
            failures.push(format!(
                "{what}: expected {statuses:?}, got {status} ({})",
                body.trim()
            ));
        }
        if status == 426 && header(&raw, "Sec-WebSocket-Version").as_deref() != Some("13") {
            failures.push(format!(
                "{what}: 426 without 'Sec-WebSocket-Version: 13' (RFC 6455 §4.2.2): {:?}",
                String::from_utf8_lossy(&raw)
            ));
        }
    }
    assert_still_serves(&server);
    assert_no_failures(&failures, cases.len());
}

#[test]
fn websocket_upgrade_405_lists_the_allowed_method() {
    // RFC 9110 §15.5.6: "The origin server MUST generate an Allow header
    // field in a 405 response containing a list of the target resource's
    // currently supported methods."
    let server = Server::open();
    let raw = exchange(
        server.addr,
        &upgrade_head("POST", "/ws", &[("Content-Length", Some("0"))]),
    );
    let (status, _) = parse_response(&raw);
    assert_eq!(status, 405);
    let allow = header(&raw, "Allow");
    assert!(
        allow.as_deref().is_some_and(|a| a.contains("GET")),
        "405 without 'Allow: GET': {:?}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn oversized_request_heads_are_refused_without_crashing() {
    let server = Server::open();
    // One 20 KiB header value; 30 headers of 600 bytes; 200 small headers.
    let big_value = "v".repeat(20 * 1024);
    let padded = |n: usize, len: usize| -> Vec<u8> {
        let pads: Vec<(String, String)> = (0..n)
            .map(|i| (format!("X-Pad-{i}"), "p".repeat(len)))
            .collect();
        let headers: Vec<(&str, Option<&str>)> = pads
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .collect();
        upgrade_head("GET", "/ws", &headers)
    };
    for (what, head) in [
        (
            "one 20 KiB header",
            upgrade_head("GET", "/ws", &[("X-Big", Some(&big_value))]),
        ),
        ("30 headers of 600 bytes", padded(30, 600)),
        ("200 headers of 100 bytes", padded(200, 100)),
    ] {
        assert!(head.len() > 16 * 1024);
        let raw = exchange(server.addr, &head);
        assert!(!raw.is_empty(), "{what}: closed without a response");
        let (status, body) = parse_response(&raw);
        assert!(
            status == 431 || status == 400,
            "{what}: expected 431 (or 400), got {status} ({})",
            body.trim()
        );
    }
    assert_still_serves(&server);
}

#[test]
fn a_half_sent_head_gets_408_after_handshake_timeout() {
    let server = Server::start(&[("HANDSHAKE_TIMEOUT", "1")]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let start = Instant::now();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        .unwrap();
    let raw = read_until_closed(&mut s);
    let waited = start.elapsed();
    assert!(!raw.is_empty(), "closed without a response");
    let (status, body) = parse_response(&raw);
    assert_eq!(status, 408, "{body}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}, HANDSHAKE_TIMEOUT is 1 s"
    );
    // A connection that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(server.addr).unwrap();
    silent.set_read_timeout(Some(TIMEOUT)).unwrap();
    let start = Instant::now();
    let raw = read_until_closed(&mut silent);
    assert!(
        raw.is_empty() || parse_response(&raw).0 == 408,
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_still_serves(&server);
}

#[test]
fn frames_pipelined_after_the_head_are_processed() {
    let server = Server::open();
    let mut publisher = Client::connect(&server, "/ws");
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    // Head and first frames in one write.
    let mut bytes = upgrade_head("GET", "/ws", &[]);
    bytes.extend(text_frame(br#"{"op":"subscribe","channel":"pipe","id":1}"#));
    bytes.extend(text_frame(br#"{"op":"ping","id":2}"#));
    s.write_all(&bytes).unwrap();

    let mut buf = Vec::new();
    let read_more = |s: &mut TcpStream, buf: &mut Vec<u8>| {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read");
        assert!(
            n > 0,
            "server closed; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        read_more(&mut s, &mut buf);
    };
    let (status, _) = parse_response(&buf[..end]);
    assert_eq!(status, 101);
    assert_eq!(
        header(&buf[..end], "Sec-WebSocket-Accept").as_deref(),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    buf.drain(..end);
    let next_json = |s: &mut TcpStream, buf: &mut Vec<u8>| -> Value {
        loop {
            if buf.len() >= 2 {
                assert_eq!(buf[0], 0x81, "expected a text frame: {buf:?}");
                let len = buf[1] as usize;
                assert!(len < 126, "unexpectedly long reply");
                if buf.len() >= 2 + len {
                    let v = serde_json::from_slice(&buf[2..2 + len]).unwrap();
                    buf.drain(..2 + len);
                    return v;
                }
            }
            read_more(s, buf);
        }
    };
    assert_eq!(
        next_json(&mut s, &mut buf),
        json!({"op":"subscribed","channel":"pipe","id":1})
    );
    assert_eq!(next_json(&mut s, &mut buf), json!({"op":"pong","id":2}));
    publisher.publish("pipe", json!([1, 2]));
    assert_eq!(
        next_json(&mut s, &mut buf),
        json!({"op":"message","channel":"pipe","data":[1,2]})
    );
    assert_still_serves(&server);
}
