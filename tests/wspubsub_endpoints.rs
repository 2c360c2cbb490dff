//! protocol.md "wspubsub endpoints", with plain WebSocket clients that
//! speak only wspubsub (raw payloads, no JSON envelope): a subscriber gets
//! what a publisher sends as it was sent, API keys decide who publishes
//! (and a change to the keys file takes effect without a restart), and
//! herald's own clients share the same channels.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{wait_for, Client, Server};
use serde_json::json;
use tungstenite::Message;

/// A keys file in a directory of its own, removed on drop.
struct KeysFile {
    dir: PathBuf,
    path: PathBuf,
}

impl KeysFile {
    fn new(name: &str, text: &str) -> KeysFile {
        let dir =
            std::env::temp_dir().join(format!("herald-wspubsub-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.csv");
        let k = KeysFile { dir, path };
        k.write(text);
        k
    }

    /// Replaces the file whole, as a deployment would (write, rename).
    fn write(&self, text: &str) {
        let tmp = self.dir.join("keys.csv.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    fn env(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for KeysFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const KEYS: &str = "domain,apikey,active\n\
                    test,f47ac10b-58cc-4372-a567-0e02b2c3d479,t\n\
                    test,retired-key,f\n\
                    other,other-key,true\n";
const GOOD: &str = "f47ac10b-58cc-4372-a567-0e02b2c3d479";

fn server(keys: &KeysFile, extra: &[(&str, &str)]) -> Server {
    let path = keys.env();
    let mut env = vec![("API_KEYS_FILE", path.as_str())];
    env.extend_from_slice(extra);
    Server::start(&env)
}

fn refused(server: &Server, path: &str) -> u16 {
    match Client::try_connect(server.addr, path, &[]) {
        Ok(_) => 101,
        Err(r) => r.status,
    }
}

/// The next data message, as a plain wspubsub client sees it.
fn next(c: &mut Client) -> Message {
    c.recv()
}

/// Closes from the client side and returns every data message that
/// arrived before the server's answering close.
fn close_and_drain(mut c: Client) -> Vec<Message> {
    c.ws.close(None).unwrap();
    let mut got = Vec::new();
    loop {
        match c.ws.read() {
            Ok(Message::Close(_)) => continue,
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            Ok(m) => got.push(m),
            Err(tungstenite::Error::ConnectionClosed) => return got,
            Err(e) => panic!("closing: {e}"),
        }
    }
}

#[test]
fn payloads_arrive_as_they_were_sent() {
    let keys = KeysFile::new("raw", KEYS);
    let server = server(&keys, &[]);
    let mut sub = Client::connect(&server, "/ws/sub/test/room");
    let mut sub2 = Client::connect(&server, "/ws/sub/test/room");
    let mut elsewhere = Client::connect(&server, "/ws/sub/test/lobby");
    let mut publ = Client::connect(&server, &format!("/ws/pub/{GOOD}/test/room"));

    publ.ws.send(Message::text("hello, world")).unwrap();
    publ.ws.send(Message::binary(vec![0u8, 1, 2, 255])).unwrap();
    publ.ws.send(Message::text(r#"{"a":1}"#)).unwrap();
    // What a subscriber sends is ignored: it reaches no one.
    sub.ws.send(Message::text("from a subscriber")).unwrap();
    publ.ws.send(Message::text("last")).unwrap();
    for s in [&mut sub, &mut sub2] {
        assert_eq!(next(s), Message::text("hello, world"));
        assert_eq!(next(s), Message::binary(vec![0u8, 1, 2, 255]));
        assert_eq!(next(s), Message::text(r#"{"a":1}"#));
        assert_eq!(next(s), Message::text("last"));
    }

    // Another topic of the domain got none of it: its first message is
    // one published to it afterwards.
    let mut lobby = Client::connect(&server, &format!("/ws/pub/{GOOD}/test/lobby"));
    lobby.ws.send(Message::text("lobby")).unwrap();
    assert_eq!(next(&mut elsewhere), Message::text("lobby"));

    // A publisher receives nothing (not even its own messages).
    assert_eq!(close_and_drain(publ), Vec::<Message>::new());
    assert_eq!(close_and_drain(sub2), Vec::<Message>::new());
}

#[test]
fn herald_clients_share_the_channels() {
    let keys = KeysFile::new("native", KEYS);
    let server = server(&keys, &[]);
    let mut raw = Client::connect(&server, "/ws/sub/test/room");
    let mut native = Client::connect(&server, "/ws");
    native.subscribe("test:room");
    let mut publ = Client::connect(&server, &format!("/ws/pub/{GOOD}/test/room"));

    publ.ws.send(Message::text("plain text")).unwrap();
    publ.ws.send(Message::text(r#"{"n":1}"#)).unwrap();
    publ.ws.send(Message::binary(vec![7u8, 8])).unwrap();
    assert_eq!(
        native.recv_json(),
        json!({"op":"message","channel":"test:room","data":"plain text"})
    );
    assert_eq!(
        native.recv_json(),
        json!({"op":"message","channel":"test:room","data":{"n":1}})
    );
    // protocol.md "Binary frames": length byte, channel, payload.
    assert_eq!(
        native.recv(),
        Message::binary(b"\x09test:room\x07\x08".to_vec())
    );
    assert_eq!(next(&mut raw), Message::text("plain text"));
    assert_eq!(next(&mut raw), Message::text(r#"{"n":1}"#));
    assert_eq!(next(&mut raw), Message::binary(vec![7u8, 8]));

    // A native publish reaches the raw subscriber as its bare data: a
    // JSON string as its text, other JSON as it is.
    let mut native_pub = Client::connect(&server, "/ws");
    native_pub.publish("test:room", json!("a string"));
    native_pub.publish("test:room", json!({"x":[1,2]}));
    assert_eq!(next(&mut raw), Message::text("a string"));
    assert_eq!(next(&mut raw), Message::text(r#"{"x":[1,2]}"#));
    // Through the HTTP API too.
    let (status, _) = common::http(
        server.addr,
        "POST",
        "/publish",
        &[("Content-Type", "application/json")],
        br#"{"channel":"test:room","data":true}"#,
    );
    assert_eq!(status, 202, "accepted for delivery");
    assert_eq!(next(&mut raw), Message::text("true"));
}

#[test]
fn keys_decide_who_publishes() {
    let keys = KeysFile::new("keys", KEYS);
    let server = server(&keys, &[]);
    assert_eq!(refused(&server, &format!("/ws/pub/{GOOD}/test/room")), 101);
    assert_eq!(refused(&server, "/ws/pub/other-key/other/room"), 101);
    // Inactive, another domain's, unknown, a prefix of a key: 403.
    assert_eq!(refused(&server, "/ws/pub/retired-key/test/room"), 403);
    assert_eq!(refused(&server, "/ws/pub/other-key/test/room"), 403);
    assert_eq!(refused(&server, "/ws/pub/nope/test/room"), 403);
    assert_eq!(refused(&server, "/ws/pub/f47ac10b/test/room"), 403);
    // Subscribers: any topic of a domain the file names.
    assert_eq!(refused(&server, "/ws/sub/other/anything"), 101);
    assert_eq!(refused(&server, "/ws/sub/unknown/room"), 404);
    // Malformed paths.
    for bad in [
        "/ws/sub/test/",
        "/ws/sub/test",
        "/ws/sub/a:b/room",
        "/ws/sub/test/room/more",
        "/ws/sub/test/ro%20om",
        &format!("/ws/pub/{GOOD}/test"),
    ] {
        assert_eq!(refused(&server, bad), 400, "{bad}");
    }
    let metrics = common::http(server.addr, "GET", "/metrics", &[], b"").1;
    assert!(
        metrics.contains("reason=\"forbidden\""),
        "refusals are counted by reason"
    );
}

#[test]
fn a_changed_keys_file_takes_effect_without_a_restart() {
    let keys = KeysFile::new("reload", KEYS);
    let server = server(&keys, &[]);
    let path = format!("/ws/pub/{GOOD}/test/room");
    let mut sub = Client::connect(&server, "/ws/sub/test/room");
    let mut publ = Client::connect(&server, &path);
    publ.ws.send(Message::text("before")).unwrap();
    assert_eq!(next(&mut sub), Message::text("before"));

    // The key is deactivated, another rotated in.
    keys.write(
        &KEYS
            .replace(&format!("{GOOD},t"), &format!("{GOOD},f"))
            .replace("retired-key,f", "retired-key,t"),
    );
    wait_for("the deactivated key to be refused", || {
        refused(&server, &path) == 403
    });
    assert_eq!(refused(&server, "/ws/pub/retired-key/test/room"), 101);
    // The publisher already connected is closed at its next message,
    // which is not delivered.
    publ.ws.send(Message::text("after")).unwrap();
    let (code, reason) = publ.expect_close();
    assert_eq!((code, reason.as_str()), (1008, "apikey no longer active"));
    let mut other = Client::connect(&server, "/ws/pub/retired-key/test/room");
    other.ws.send(Message::text("from the new key")).unwrap();
    assert_eq!(next(&mut sub), Message::text("from the new key"));

    // A file that does not parse changes nothing.
    keys.write("test,broken\n");
    wait_for("the reload error to be logged", || {
        server.log().contains("not reloaded")
    });
    assert!(
        server.log().contains("line 1: expected 3 fields"),
        "{}",
        server.log()
    );
    assert_eq!(refused(&server, "/ws/pub/retired-key/test/room"), 101);
}

#[test]
fn a_publisher_over_its_rate_loses_messages_not_its_connection() {
    let keys = KeysFile::new("rate", KEYS);
    let server = server(&keys, &[("PUBLISH_RATE", "1")]);
    let mut sub = Client::connect(&server, "/ws/sub/test/room");
    let mut publ = Client::connect(&server, &format!("/ws/pub/{GOOD}/test/room"));
    for i in 0..20 {
        publ.ws.send(Message::text(format!("m{i}"))).unwrap();
    }
    // The server read all 20: one within the rate, nineteen refused.
    wait_for("the twenty publishes to be read", || {
        server.metric_sum("herald_rate_limited_total") >= 19.0
    });
    assert_eq!(server.metric_sum("herald_rate_limited_total"), 19.0);
    assert_eq!(next(&mut sub), Message::text("m0"));
    // A native publisher (a bucket of its own) marks the end: nothing of
    // the nineteen came.
    let mut marker = Client::connect(&server, "/ws");
    marker.publish("test:room", json!("end"));
    assert_eq!(
        next(&mut sub),
        Message::text("end"),
        "only m0 was within the rate"
    );
    // Still connected: a close handshake completes.
    assert_eq!(close_and_drain(publ), Vec::<Message>::new());
}

#[test]
fn without_a_keys_file_there_are_no_wspubsub_endpoints() {
    let server = Server::open();
    assert_eq!(refused(&server, "/ws/sub/test/room"), 404);
    assert_eq!(refused(&server, &format!("/ws/pub/{GOOD}/test/room")), 404);
}

#[test]
fn a_bad_keys_file_stops_the_start_with_code_2() {
    let keys = KeysFile::new("bad", "test,k,t\ntest,k2,perhaps\n");
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .env("PORT", "0")
        .env("API_KEYS_FILE", keys.env())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("API_KEYS_FILE") && err.contains("line 2: invalid active \"perhaps\""),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .env("PORT", "0")
        .env("API_KEYS_FILE", "/nonexistent/keys.csv")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/keys.csv"));
}
