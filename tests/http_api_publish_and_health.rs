//! protocol.md "HTTP API" and "Endpoints": `POST /publish` and
//! `POST /broadcast` deliver to WebSocket subscribers byte for byte, errors
//! are JSON `{"code","message"}` with the matching status, keep-alive works,
//! and `/health`, `/metrics`, 404 and 405 answer as documented.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::{http, token, Client, Server, TIMEOUT};
use serde_json::{json, Value};
use tungstenite::Message;

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn post(addr: SocketAddr, path: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let auth = auth.map(bearer);
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    http(addr, "POST", path, &headers, body.as_bytes())
}

/// Asserts a JSON error `{"code":code,"message":<string>}` with `status`.
fn assert_json_error(got: &(u16, String), status: u16, code: &str, what: &str) {
    assert_eq!(got.0, status, "{what}: {got:?}");
    let v: Value = serde_json::from_str(&got.1)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {:?}", got.1));
    assert_eq!(v["code"], code, "{what}: {v}");
    assert!(v["message"].is_string(), "{what}: {v}");
}

fn assert_accepted(got: &(u16, String), what: &str) {
    assert_eq!(got.0, 202, "{what}: {got:?}");
    let v: Value = serde_json::from_str(&got.1)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {:?}", got.1));
    assert_eq!(v, json!({"ok":true}), "{what}");
}

fn recv_text(c: &mut Client) -> String {
    match c.recv() {
        Message::Text(t) => t.as_str().to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Reads one HTTP response (head + Content-Length body) from a kept-alive stream.
fn read_response(r: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = r.read_line(&mut line).expect("read response head");
        assert!(n > 0, "connection closed mid-response; got {head:?}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("read response body");
    (status, String::from_utf8(body).expect("utf-8 body"))
}

#[test]
fn publish_with_write_token_delivers_data_byte_for_byte() {
    let server = Server::with_secret(&[]);
    let mut sub = Client::with_token(&server, &token(json!({"read":["news"]})));
    sub.subscribe("news");

    let t = token(json!({"write":["news"]}));
    let data = r#"{ "z": 1.50, "a" : [true,null], "s":"\u00e9" }"#;
    let body = format!(r#"{{"channel":"news","data":{data}}}"#);
    assert_accepted(&post(server.addr, "/publish", Some(&t), &body), "publish");
    assert_eq!(
        recv_text(&mut sub),
        format!(r#"{{"op":"message","channel":"news","data":{data}}}"#)
    );

    // A prefix write claim covers the channel too.
    let prefix = token(json!({"write":["ne*"]}));
    let got = post(
        server.addr,
        "/publish",
        Some(&prefix),
        r#"{"channel":"news","data":null}"#,
    );
    assert_accepted(&got, "publish with prefix claim");
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"news","data":null})
    );
}

#[test]
fn broadcast_delivers_wsify_content_as_data() {
    let server = Server::with_secret(&[]);
    let mut sub = Client::with_token(&server, &token(json!({"read":["news"]})));
    sub.subscribe("news");

    let t = token(json!({"write":["news"]}));
    let content = r#"[1, "two" ,{"three":3.0}]"#;
    let body = format!(r#"{{"channel":"news","content":{content}}}"#);
    assert_accepted(
        &post(server.addr, "/broadcast", Some(&t), &body),
        "broadcast",
    );
    assert_eq!(
        recv_text(&mut sub),
        format!(r#"{{"op":"message","channel":"news","data":{content}}}"#)
    );

    // /broadcast needs the same token.
    let got = post(server.addr, "/broadcast", None, &body);
    assert_json_error(&got, 401, "unauthorized", "broadcast without token");
    assert!(sub.sync().is_empty());
}

#[test]
fn errors_are_json_with_matching_status() {
    let server = Server::with_secret(&[("MAX_MESSAGE_SIZE", "1KiB")]);
    let mut sub = Client::with_token(&server, &token(json!({"read":["*"]})));
    sub.subscribe("news");
    let addr = server.addr;
    let w = token(json!({"write":["news","bad channel","a*b"]}));

    let cases = [
        (
            "bad JSON",
            Some(&w),
            "{not json".to_string(),
            400,
            "bad_request",
        ),
        (
            "body not an object",
            Some(&w),
            "[1,2]".to_string(),
            400,
            "bad_request",
        ),
        (
            "missing data",
            Some(&w),
            r#"{"channel":"news"}"#.to_string(),
            400,
            "bad_request",
        ),
        (
            "missing channel",
            Some(&w),
            r#"{"data":1}"#.to_string(),
            400,
            "bad_request",
        ),
        (
            "channel with a space",
            Some(&w),
            r#"{"channel":"bad channel","data":1}"#.to_string(),
            400,
            "bad_request",
        ),
        (
            "channel with *",
            Some(&w),
            r#"{"channel":"a*b","data":1}"#.to_string(),
            400,
            "bad_request",
        ),
        (
            "empty channel",
            Some(&w),
            r#"{"channel":"","data":1}"#.to_string(),
            400,
            "bad_request",
        ),
        (
            "no token",
            None,
            r#"{"channel":"news","data":1}"#.to_string(),
            401,
            "unauthorized",
        ),
    ];
    for (what, tok, body, status, code) in cases {
        let got = post(addr, "/publish", tok.map(String::as_str), &body);
        assert_json_error(&got, status, code, what);
    }

    let body = r#"{"channel":"news","data":1}"#;
    let forged = common::token_with("wrong", json!({"write":["*"]}));
    assert_json_error(
        &post(addr, "/publish", Some(&forged), body),
        401,
        "unauthorized",
        "forged token",
    );
    assert_json_error(
        &post(addr, "/publish", Some("garbage"), body),
        401,
        "unauthorized",
        "garbage token",
    );
    let read_only = token(json!({"read":["*"],"write":["other"]}));
    assert_json_error(
        &post(addr, "/publish", Some(&read_only), body),
        403,
        "forbidden",
        "no write permission",
    );

    let big = format!(r#"{{"channel":"news","data":"{}"}}"#, "x".repeat(2000));
    assert_json_error(
        &post(addr, "/publish", Some(&w), &big),
        413,
        "too_large",
        "body over MAX_MESSAGE_SIZE",
    );

    // None of the refused publishes reached the subscriber.
    assert!(sub.sync().is_empty());
    // A body just under the limit is fine.
    let ok = format!(r#"{{"channel":"news","data":"{}"}}"#, "y".repeat(900));
    assert_accepted(
        &post(addr, "/publish", Some(&w), &ok),
        "body under the limit",
    );
    assert_eq!(sub.recv_json()["data"], "y".repeat(900));
}

#[test]
fn open_mode_needs_no_token() {
    let server = Server::open();
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("news");
    let got = post(
        server.addr,
        "/publish",
        None,
        r#"{"channel":"news","data":{"a":1}}"#,
    );
    assert_accepted(&got, "open-mode publish");
    let got = post(
        server.addr,
        "/broadcast",
        None,
        r#"{"channel":"news","content":2}"#,
    );
    assert_accepted(&got, "open-mode broadcast");
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"news","data":{"a":1}})
    );
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"news","data":2})
    );
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let server = Server::open();
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("ka");

    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let addr = server.addr;
    for i in 0..2 {
        let body = format!(r#"{{"channel":"ka","data":{i}}}"#);
        let req = format!(
            "POST /publish HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        w.write_all(req.as_bytes()).unwrap();
        let got = read_response(&mut r);
        assert_accepted(&got, &format!("request {i} on the kept-alive connection"));
    }
    w.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .unwrap();
    let (status, body) = read_response(&mut r);
    assert_eq!(status, 200, "third request: {body}");

    assert_eq!(sub.recv_json()["data"], 0);
    assert_eq!(sub.recv_json()["data"], 1);
}

#[test]
fn health_metrics_404_and_405() {
    let server = Server::open();
    let addr = server.addr;

    let (status, body) = http(addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("health body is JSON");
    assert_eq!(v["status"], "ok", "{v}");

    // Some traffic so the counters move.
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("m");
    let got = post(addr, "/publish", None, r#"{"channel":"m","data":1}"#);
    assert_accepted(&got, "publish before /metrics");
    assert_eq!(sub.recv_json()["data"], 1);

    let (status, text) = http(addr, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    for name in [
        "herald_connections",
        "herald_publishes_total",
        "herald_messages_out_total",
        "herald_messages_in_total",
        "herald_subscriptions",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "/metrics lacks {name}:\n{text}"
        );
    }
    let sum = |prefix: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(sum("herald_publishes_total{") >= 1.0, "{text}");
    assert!(sum("herald_connections{") >= 1.0, "{text}");

    let (status, _) = http(addr, "GET", "/no/such/path", &[], b"");
    assert_eq!(status, 404);
    let (status, body) = http(addr, "GET", "/publish", &[], b"");
    assert_eq!(status, 405, "{body}");
    let (status, body) = http(addr, "GET", "/broadcast", &[], b"");
    assert_eq!(status, 405, "{body}");
}
