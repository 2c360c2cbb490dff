//! Logs as operators read them: LOG_FORMAT=json writes one object per line
//! (timestamp, level, target, fields); connections' opens and closes are
//! logged at debug with the peer, close code and duration; RUST_LOG-style
//! directives pick what is written.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;
use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;

/// The log's lines that are events with `message`.
fn events(server: &Server, message: &str) -> Vec<Value> {
    server
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

#[test]
fn json_lines_name_each_connections_open_and_close() {
    let server = Server::start(&[("LOG_FORMAT", "json"), ("LOGLEVEL", "debug")]);
    let mut c = Client::connect(&server, "/ws");
    let local = c.ws.get_ref().local_addr().unwrap().to_string();
    c.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    let (code, _) = c.expect_close();
    assert_eq!(code, 1000);
    wait_for("the close to be logged", || {
        !events(&server, "connection closed").is_empty()
    });
    // Every line is one JSON object with the four parts.
    for line in server.log().lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["timestamp", "level", "target", "fields"] {
            assert!(v.get(key).is_some(), "no {key} in {line}");
        }
    }
    let opened = events(&server, "connection opened");
    let opened = opened
        .iter()
        .find(|v| v["fields"]["peer"] == local.as_str())
        .unwrap_or_else(|| panic!("no open from {local} in:\n{}", server.log()));
    assert_eq!(opened["level"], "DEBUG");
    let conn = &opened["fields"]["conn"];
    let closed = events(&server, "connection closed");
    let closed = closed
        .iter()
        .find(|v| {
            v["fields"]["conn"] == *conn && v["fields"]["worker"] == opened["fields"]["worker"]
        })
        .unwrap_or_else(|| panic!("no close of {conn} in:\n{}", server.log()));
    assert_eq!(closed["fields"]["code"], 1000);
    assert_eq!(closed["fields"]["peer"], local.as_str());
    let secs = closed["fields"]["seconds"].as_f64().unwrap();
    assert!((0.0..10.0).contains(&secs), "{closed}");
}

#[test]
fn a_vanished_peer_is_logged_with_1006() {
    let server = Server::start(&[("LOG_FORMAT", "json"), ("LOGLEVEL", "debug")]);
    let c = Client::connect(&server, "/ws");
    drop(c);
    wait_for("the close to be logged", || {
        !events(&server, "connection closed").is_empty()
    });
    let closed = &events(&server, "connection closed")[0];
    assert_eq!(closed["fields"]["code"], 1006, "{closed}");
}

/// Sends a malformed request head and reads the 400 (the router logs it
/// at debug before answering).
fn refused_head(server: &Server) {
    let mut bad = TcpStream::connect(server.addr).unwrap();
    bad.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    bad.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[test]
fn rust_log_directives_choose_the_targets() {
    // Only the sessions' debug lines: the router's stay out.
    let server = Server::start(&[("RUST_LOG", "info,herald::session=debug")]);
    refused_head(&server);
    let c = Client::connect(&server, "/ws");
    drop(c);
    wait_for("the session's close line", || {
        server.log().contains("connection closed")
    });
    assert!(server.log().contains("connection opened"));
    assert!(
        !server.log().contains("bad request head"),
        "{}",
        server.log()
    );
    // LOGLEVEL=debug writes the router's line (the same request).
    let server = Server::start(&[("LOGLEVEL", "debug")]);
    refused_head(&server);
    wait_for("the router's line", || {
        server.log().contains("bad request head")
    });
    // Text lines by default, not JSON.
    assert!(server
        .log()
        .lines()
        .all(|l| serde_json::from_str::<Value>(l).is_err()));
}
