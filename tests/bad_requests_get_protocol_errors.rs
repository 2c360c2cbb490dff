//! protocol.md "Errors" and "Binary frames": malformed requests get a
//! `bad_request` error (carrying the request's `id` when it was readable),
//! forbidden binary publishes get `forbidden`, a publish flood gets
//! `rate_limited`, and none of these closes the connection.

mod common;

use common::{assert_no_failures, token, Client, Server};
use serde_json::{json, Value};
use tungstenite::Message;

/// The next text message as JSON, or why there is none.
fn next_json(c: &mut Client) -> Result<Value, String> {
    loop {
        match c.ws.read() {
            Ok(Message::Text(t)) => {
                return serde_json::from_str(&t).map_err(|e| format!("invalid JSON {t:?}: {e}"))
            }
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            Ok(Message::Close(f)) => return Err(format!("connection closed: {f:?}")),
            Ok(other) => return Err(format!("unexpected {other:?}")),
            Err(e) => return Err(format!("read error: {e}")),
        }
    }
}

/// Checks `reply` is an error with `code` and exactly the given `id`
/// (`None`: no `id` field at all).
fn check_error(reply: &Value, code: &str, id: Option<Value>) -> Result<(), String> {
    let ok = reply["op"] == "error"
        && reply["code"] == code
        && reply["message"].as_str().is_some_and(|m| !m.is_empty())
        && reply.get("id") == id.as_ref();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected {{op:error, code:{code}, id:{id:?}, message:..}}, got {reply}"
        ))
    }
}

/// The connection is still open and in sync: a ping gets its pong next.
fn check_open(c: &mut Client) -> Result<(), String> {
    c.ws.send(Message::text(r#"{"op":"ping","id":"alive"}"#))
        .map_err(|e| format!("send ping: {e}"))?;
    let v = next_json(c)?;
    if v == json!({"op":"pong","id":"alive"}) {
        Ok(())
    } else {
        Err(format!("expected the pong, got {v}"))
    }
}

/// Sends `msg` on a fresh connection and checks the error and that the
/// connection stays open.
fn case(server: &Server, msg: Message, code: &str, id: Option<Value>) -> Result<(), String> {
    let mut c = Client::connect(server, "/ws");
    c.ws.send(msg).map_err(|e| format!("send: {e}"))?;
    check_error(&next_json(&mut c)?, code, id)?;
    check_open(&mut c)
}

#[test]
fn malformed_text_requests_get_bad_request_and_the_connection_stays_open() {
    let server = Server::open();
    let long = "x".repeat(256);
    let cases: Vec<(String, Option<Value>)> = vec![
        ("not json".into(), None),
        ("".into(), None),
        (r#"{"op":"ping","id":1"#.into(), None),
        (r#"{"op":"ping","id":1} trailing"#.into(), None),
        ("[1,2]".into(), None),
        (r#"[{"op":"ping","id":1}]"#.into(), None),
        // An array is not an object, even one whose items line up with
        // the fields op, id, channel, data.
        (r#"["ping",7]"#.into(), None),
        (r#"["subscribe","s","news"]"#.into(), None),
        (r#"["publish","p","news",1]"#.into(), None),
        (r#""ping""#.into(), None),
        ("null".into(), None),
        ("42".into(), None),
        ("{}".into(), None),
        (r#"{"channel":"a","id":5}"#.into(), Some(json!(5))),
        (r#"{"op":null,"id":"n"}"#.into(), Some(json!("n"))),
        (r#"{"op":7,"id":"n"}"#.into(), Some(json!("n"))),
        (r#"{"op":"dance","id":"x1"}"#.into(), Some(json!("x1"))),
        (r#"{"op":"dance"}"#.into(), None),
        // op values are case-sensitive.
        (r#"{"op":"PING","id":2}"#.into(), Some(json!(2))),
        (r#"{"op":"subscribe","id":3}"#.into(), Some(json!(3))),
        (r#"{"op":"unsubscribe","id":3}"#.into(), Some(json!(3))),
        (r#"{"op":"publish","data":1,"id":3}"#.into(), Some(json!(3))),
        (
            r#"{"op":"subscribe","channel":5,"id":4}"#.into(),
            Some(json!(4)),
        ),
        (
            r#"{"op":"subscribe","channel":["a"],"id":4}"#.into(),
            Some(json!(4)),
        ),
        (
            r#"{"op":"publish","channel":null,"data":1,"id":4}"#.into(),
            Some(json!(4)),
        ),
        (
            r#"{"op":"subscribe","channel":"","id":"e"}"#.into(),
            Some(json!("e")),
        ),
        (
            format!(r#"{{"op":"subscribe","channel":"{long}","id":"l"}}"#),
            Some(json!("l")),
        ),
        (
            format!(r#"{{"op":"publish","channel":"{long}","data":1,"id":"l"}}"#),
            Some(json!("l")),
        ),
        (
            r#"{"op":"subscribe","channel":"has space","id":"s"}"#.into(),
            Some(json!("s")),
        ),
        (
            r#"{"op":"subscribe","channel":"chat:*","id":"w"}"#.into(),
            Some(json!("w")),
        ),
        (
            r#"{"op":"subscribe","channel":"*","id":"w"}"#.into(),
            Some(json!("w")),
        ),
        (
            r#"{"op":"publish","channel":"a*","data":1,"id":"w"}"#.into(),
            Some(json!("w")),
        ),
        (
            r#"{"op":"unsubscribe","channel":"a b","id":"s"}"#.into(),
            Some(json!("s")),
        ),
        (
            r#"{"op":"subscribe","channel":"caf\u00e9","id":"u"}"#.into(),
            Some(json!("u")),
        ),
        (
            r#"{"op":"subscribe","channel":"a/b","id":"u"}"#.into(),
            Some(json!("u")),
        ),
        (
            r#"{"op":"publish","channel":"a","id":9}"#.into(),
            Some(json!(9)),
        ),
        (r#"{"op":"auth","id":10}"#.into(), Some(json!(10))),
        (r#"{"op":"auth","token":5,"id":10}"#.into(), Some(json!(10))),
        // An id that is neither a number nor a string is not echoed.
        (r#"{"op":"ping","id":true}"#.into(), None),
        (r#"{"op":"ping","id":{"a":1}}"#.into(), None),
        (r#"{"op":"ping","id":[1]}"#.into(), None),
        (
            r#"{"op":"publish","channel":"a","data":1,"id":false}"#.into(),
            None,
        ),
    ];
    let mut failures = Vec::new();
    for (text, id) in &cases {
        if let Err(e) = case(
            &server,
            Message::text(text.clone()),
            "bad_request",
            id.clone(),
        ) {
            failures.push(format!("{text:?}: {e}"));
        }
    }
    // Positive controls: the boundaries the bad cases sit next to are accepted.
    let mut c = Client::connect(&server, "/ws");
    let max = "y".repeat(255);
    c.subscribe(&max);
    c.subscribe("A-Z_a-z.0-9=@,;:");
    c.publish(&max, json!(null));
    assert!(c.sync().is_empty());
    assert_no_failures(&failures, cases.len());
}

#[test]
fn malformed_binary_publishes_get_bad_request_without_id() {
    let server = Server::open();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty frame", vec![]),
        ("channel length 0", b"\x00abc".to_vec()),
        ("channel length 5, 2 bytes follow", b"\x05ab".to_vec()),
        ("channel length 255, 3 bytes follow", b"\xffabc".to_vec()),
        ("channel with a space", b"\x03a bpayload".to_vec()),
        ("channel with *", b"\x02a*payload".to_vec()),
        ("channel not UTF-8", b"\x02\xff\xfepayload".to_vec()),
    ];
    let mut failures = Vec::new();
    for (what, bytes) in &cases {
        if let Err(e) = case(&server, Message::binary(bytes.clone()), "bad_request", None) {
            failures.push(format!("{what} {bytes:?}: {e}"));
        }
    }
    // Positive control: a channel-only binary publish (empty payload) is delivered.
    let mut a = Client::connect(&server, "/ws");
    let mut b = Client::connect(&server, "/ws");
    b.subscribe("ab");
    a.ws.send(Message::binary(b"\x02ab".to_vec())).unwrap();
    match b.recv() {
        Message::Binary(got) => assert_eq!(&got[..], b"\x02ab"),
        other => panic!("binary expected, got {other:?}"),
    }
    assert!(a.sync().is_empty(), "binary publish must not be acked");
    assert_no_failures(&failures, cases.len());
}

#[test]
fn publish_without_write_permission_is_forbidden_and_the_connection_stays_open() {
    let server = Server::with_secret(&[]);
    let t = token(json!({"sub":"w","read":["*"],"write":["allowed"]}));
    let mut sub = Client::with_token(&server, &t);
    sub.subscribe("allowed");
    sub.subscribe("other");
    let mut c = Client::with_token(&server, &t);

    // Binary publish on a channel without write permission: forbidden, no id.
    c.ws.send(Message::binary(b"\x05otherdata".to_vec()))
        .unwrap();
    check_error(&next_json(&mut c).unwrap(), "forbidden", None).unwrap();
    check_open(&mut c).unwrap();
    // JSON publish: forbidden with the id.
    c.send_json(json!({"op":"publish","channel":"other","data":1,"id":"f"}));
    check_error(&next_json(&mut c).unwrap(), "forbidden", Some(json!("f"))).unwrap();
    check_open(&mut c).unwrap();
    // The permitted channel still works on the same connection.
    c.ws.send(Message::binary(b"\x07allowedok".to_vec()))
        .unwrap();
    match sub.recv() {
        Message::Binary(got) => assert_eq!(&got[..], b"\x07allowedok"),
        other => panic!("binary expected, got {other:?}"),
    }
    // Nothing forbidden reached the subscriber.
    assert!(sub.sync().is_empty());
}

#[test]
fn publishing_past_publish_rate_gets_rate_limited_and_the_connection_stays_open() {
    let server = Server::start(&[("PUBLISH_RATE", "5")]);
    let mut c = Client::connect(&server, "/ws");
    for i in 0..20 {
        c.send_json(json!({"op":"publish","channel":"flood","data":i,"id":i}));
    }
    let (mut acks, mut limited) = (0, 0);
    for i in 0..20 {
        let v = next_json(&mut c).unwrap();
        assert_eq!(v["id"], i, "one reply per publish, in order: {v}");
        match v["op"].as_str() {
            Some("ack") => acks += 1,
            Some("error") => {
                check_error(&v, "rate_limited", Some(json!(i))).unwrap();
                limited += 1;
            }
            _ => panic!("unexpected reply {v}"),
        }
    }
    assert!(limited >= 1, "20 publishes at PUBLISH_RATE=5: none limited");
    assert!(acks >= 1, "20 publishes at PUBLISH_RATE=5: none accepted");
    check_open(&mut c).unwrap();
}
