//! protocol.md 1.1 "Keep-alive (server pings)": a connection silent for
//! PING_INTERVAL is pinged; one that then sends nothing for PONG_TIMEOUT is
//! closed with 1001 "ping timeout" (or cut), on every WebSocket front-end.
//! A peer that vanishes without a FIN (here: a process stopped with
//! SIGSTOP) loses its socket, subscriptions and slot; a client that
//! answers pings keeps its connection.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use common::{wait_for, Client, Server};
use serde_json::json;
use tungstenite::Message;

const FAST: &[(&str, &str)] = &[
    ("PING_INTERVAL", "1"),
    ("PONG_TIMEOUT", "1"),
    ("CLOSE_TIMEOUT", "1"),
];

/// Reads one server frame from a raw stream: (opcode, payload).
fn read_frame(s: &mut impl Read) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).expect("a frame from the server");
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let len = match h[1] & 0x7f {
        126 => {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).unwrap();
            u16::from_be_bytes(l) as usize
        }
        127 => {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).unwrap();
            u64::from_be_bytes(l) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).unwrap();
    (h[0] & 0x0f, payload)
}

/// A client that completes the handshake, then never sends a byte (it
/// reads raw frames, so nothing answers the server's pings) is pinged,
/// then closed with 1001 "ping timeout": on /ws, on the Pusher endpoint
/// and on /echo alike.
#[test]
fn a_silent_client_is_pinged_then_closed_with_1001() {
    let mut env = FAST.to_vec();
    env.push(("ECHO_ENDPOINT", "true"));
    let server = Server::start(&env);
    for path in ["/ws", "/app/app-key?protocol=7", "/echo"] {
        let mut c = Client::connect(&server, path);
        let s = c.ws.get_mut();
        let mut opcodes = Vec::new();
        let close = loop {
            let (op, payload) = read_frame(s);
            opcodes.push(op);
            if op == 0x8 {
                break payload;
            }
        };
        assert!(
            opcodes.contains(&0x9),
            "{path}: no ping before the close: {opcodes:?}"
        );
        assert_eq!(&close[..2], &1001u16.to_be_bytes(), "{path}");
        assert_eq!(&close[2..], b"ping timeout", "{path}");
    }
    wait_for("ping timeouts counted", || {
        server.metric_sum("herald_ping_timeouts_total") >= 3.0
    });
}

/// A client that reads (tungstenite answers each ping with a pong) stays
/// connected and subscribed through several pings.
#[test]
fn a_client_answering_pings_stays() {
    let server = Server::start(FAST);
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("alive");
    let reader = std::thread::spawn(move || {
        // Reading answers pings; the first data message ends the loop.
        let mut pings = 0;
        loop {
            match sub.ws.read().expect("still connected") {
                Message::Ping(_) => pings += 1,
                Message::Text(t) => return (pings, t.to_string()),
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    wait_for("three pings sent", || {
        server.metric_sum("herald_pings_sent_total") >= 3.0
    });
    let mut publisher = Client::connect(&server, "/ws");
    publisher.publish("alive", json!(1));
    let (pings, text) = reader.join().unwrap();
    assert!(pings >= 3, "{pings} pings seen");
    assert_eq!(text, r#"{"op":"message","channel":"alive","data":1}"#);
    assert_eq!(server.metric_sum("herald_ping_timeouts_total"), 0.0);
}

/// `herald sub` in its own process, stopped with SIGSTOP: its socket stays
/// open in the kernel, nothing answers, and the server drops it (and its
/// subscription) by itself.
#[test]
fn a_stopped_peer_is_reaped() {
    let server = Server::start(FAST);
    let url = server.url("/ws");
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .args(["sub", "--url", &url, "reaped"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald sub");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("subscribed"), "{line}");
    assert_eq!(server.metric_sum("herald_connections"), 1.0);
    assert_eq!(server.metric_sum("herald_subscriptions"), 1.0);
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    wait_for("the stopped peer to be dropped", || {
        server.metric_sum("herald_connections") == 0.0
    });
    assert_eq!(server.metric_sum("herald_subscriptions"), 0.0);
    assert_eq!(server.metric_sum("herald_ping_timeouts_total"), 1.0);
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
}
