//! wsify compatibility: clients speaking only wsify's commands
//! (`{"command":"join"|"leave"|"broadcast","args":{..}}`) get protocol.md's
//! replies and messages, interoperate with protocol.md clients and with
//! `POST /broadcast`, and go through the authorizer like protocol.md ops.

mod common;
#[path = "common/webhook.rs"]
mod webhook;

use common::{assert_no_failures, http, Client, Server};
use serde_json::{json, Value};
use tungstenite::Message;
use webhook::{Reply, Webhook};

fn join(c: &mut Client, channel: &str) {
    c.send_json(json!({"command":"join","args":{"channel":channel}}));
    assert_eq!(
        c.recv_json(),
        json!({"op":"subscribed","channel":channel}),
        "join {channel}"
    );
}

fn broadcast(c: &mut Client, channel: &str, content: Value) {
    c.send_json(json!({"command":"broadcast","args":{"channel":channel,"content":content}}));
}

#[test]
fn join_broadcast_leave_round_trip() {
    let server = Server::open();
    let mut listener = Client::connect(&server, "/ws");
    let mut sender = Client::connect(&server, "/ws");
    join(&mut listener, "room");
    join(&mut listener, "marker");

    broadcast(&mut sender, "room", json!({"text":"hi"}));
    assert_eq!(
        listener.recv_json(),
        json!({"op":"message","channel":"room","data":{"text":"hi"}})
    );
    // No id, no ack; the sender does not receive its own broadcast.
    assert!(sender.sync().is_empty());

    listener.send_json(json!({"command":"leave","args":{"channel":"room"}}));
    assert_eq!(
        listener.recv_json(),
        json!({"op":"unsubscribed","channel":"room"})
    );
    broadcast(&mut sender, "room", json!("after leave"));
    // Sent after it by the same sender: a message on room would come first.
    broadcast(&mut sender, "marker", json!("end"));
    assert!(sender.sync().is_empty());
    assert_eq!(
        listener.recv_json(),
        json!({"op":"message","channel":"marker","data":"end"}),
        "a broadcast after leave was delivered"
    );
    assert!(listener.sync().is_empty());
}

#[test]
fn ids_are_echoed_and_content_is_passed_through() {
    let server = Server::open();
    let mut listener = Client::connect(&server, "/ws");
    let mut sender = Client::connect(&server, "/ws");
    listener.send_json(json!({"command":"join","args":{"channel":"room"},"id":"j"}));
    assert_eq!(
        listener.recv_json(),
        json!({"op":"subscribed","channel":"room","id":"j"})
    );
    let raw = r#"{"a": 1,   "b":[ true ,null], "c":"\u00e9"}"#;
    sender.send_text(&format!(
        r#"{{"command":"broadcast","args":{{"channel":"room","content":{raw}}},"id":7}}"#
    ));
    assert_eq!(sender.recv_json(), json!({"op":"ack","id":7}));
    match listener.recv() {
        Message::Text(t) => assert_eq!(
            t.as_str(),
            format!(r#"{{"op":"message","channel":"room","data":{raw}}}"#),
            "content delivered byte for byte as data"
        ),
        other => panic!("expected a text message, got {other:?}"),
    }
    broadcast(&mut sender, "room", Value::Null);
    assert_eq!(
        listener.recv_json(),
        json!({"op":"message","channel":"room","data":null})
    );
    listener.send_json(json!({"command":"leave","args":{"channel":"room"},"id":8}));
    assert_eq!(
        listener.recv_json(),
        json!({"op":"unsubscribed","channel":"room","id":8})
    );
}

/// wsify clients and protocol.md clients share channels.
#[test]
fn wsify_and_protocol_clients_interoperate() {
    let server = Server::open();
    let mut wsify = Client::connect(&server, "/ws");
    let mut native = Client::connect(&server, "/ws");
    join(&mut wsify, "mixed");
    native.subscribe("mixed");
    broadcast(&mut wsify, "mixed", json!("from wsify"));
    assert_eq!(
        native.recv_json(),
        json!({"op":"message","channel":"mixed","data":"from wsify"})
    );
    native.publish("mixed", json!("from native"));
    assert_eq!(
        wsify.recv_json(),
        json!({"op":"message","channel":"mixed","data":"from native"})
    );
}

#[test]
fn malformed_commands_get_bad_request() {
    let server = Server::open();
    let mut c = Client::connect(&server, "/ws");
    // (message, id in the reply, expected message text; a trailing `*`
    // means "starts with").
    let cases: &[(&str, Value, &str)] = &[
        (
            r#"{"command":"shout","args":{"channel":"a"}}"#,
            Value::Null,
            "unknown command 'shout'",
        ),
        (
            r#"{"command":"shout","args":{},"id":1}"#,
            json!(1),
            "unknown command 'shout'",
        ),
        (
            r#"{"command":"shout","id":12}"#,
            json!(12),
            "unknown command 'shout'",
        ),
        (
            r#"{"command":"join","id":2}"#,
            json!(2),
            "missing field 'args'",
        ),
        (
            r#"{"command":"leave","args":[1],"id":3}"#,
            json!(3),
            "field 'args' must be an object",
        ),
        (
            r#"{"command":"join","args":{},"id":4}"#,
            json!(4),
            "missing field 'channel'",
        ),
        (
            r#"{"command":"join","args":{"channel":"a b"},"id":5}"#,
            json!(5),
            "invalid channel name*",
        ),
        (
            r#"{"command":"broadcast","args":{"channel":"a"},"id":"six"}"#,
            json!("six"),
            "missing field 'args.content'",
        ),
        (
            r#"{"command":7,"args":{"channel":"a"},"id":8}"#,
            json!(8),
            "field 'command' must be a string",
        ),
        (
            r#"{"command":"join","args":{"channel":9},"id":10}"#,
            json!(10),
            "field 'channel' must be a string",
        ),
    ];
    let mut failures = Vec::new();
    for (msg, id, expected) in cases {
        c.send_text(msg);
        let reply = c.recv_json();
        let text = reply["message"].as_str().unwrap_or("");
        let text_ok = match expected.strip_suffix('*') {
            Some(prefix) => text.starts_with(prefix),
            None => text == *expected,
        };
        if reply["op"] != "error"
            || reply["code"] != "bad_request"
            || reply["id"] != *id
            || !text_ok
        {
            failures.push(format!(
                "{msg}\n    got {reply}\n    expected bad_request, id {id}, message {expected:?}"
            ));
        }
    }
    assert_no_failures(&failures, cases.len());
    // Errors do not close the connection, and nothing was joined.
    assert!(c.sync().is_empty());
    c.send_json(json!({"command":"leave","args":{"channel":"a"},"id":11}));
    assert_eq!(
        c.recv_json(),
        json!({"op":"unsubscribed","channel":"a","id":11})
    );
}

#[test]
fn http_broadcast_reaches_a_joined_client() {
    let server = Server::open();
    let mut c = Client::connect(&server, "/ws");
    join(&mut c, "news");
    let (status, body) = http(
        server.addr,
        "POST",
        "/broadcast",
        &[],
        br#"{"channel":"news","content":{"headline": "x"}}"#,
    );
    assert_eq!((status, body.as_str()), (202, r#"{"ok":true}"#));
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"news","data":{"headline":"x"}})
    );
    let (status, body) = http(
        server.addr,
        "POST",
        "/broadcast",
        &[],
        br#"{"channel":"news","data":1}"#,
    );
    assert_eq!(status, 400, "{body}");
    let err: Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(
        err,
        json!({"code":"bad_request","message":"missing field 'content'"})
    );
    assert!(c.sync().is_empty());
}

/// join, leave and broadcast are sent to the authorizer as subscribe,
/// unsubscribe and publish, broadcast's content as `data`.
#[test]
fn wsify_commands_go_through_the_authorizer() {
    let hook = Webhook::start(|body| {
        let denied = body["args"]["channel"] == "closed" || body["args"]["data"] == "deny";
        if body["command"] != "connect" && denied {
            Reply::status(403)
        } else {
            Reply::allow()
        }
    });
    let url = hook.url();
    let server = Server::start(&[
        ("AUTHORIZER_URL", url.as_str()),
        ("AUTHORIZE", "subscribe,unsubscribe,publish"),
    ]);
    let mut listener = Client::connect(&server, "/ws");
    let mut sender = Client::connect(&server, "/ws");
    join(&mut listener, "room");
    listener.send_json(json!({"command":"join","args":{"channel":"closed"},"id":1}));
    let reply = listener.recv_json();
    assert_eq!(
        (&reply["op"], &reply["code"], &reply["id"]),
        (&json!("error"), &json!("forbidden"), &json!(1)),
        "{reply}"
    );
    sender.send_json(
        json!({"command":"broadcast","args":{"channel":"room","content":{"n":1}},"id":2}),
    );
    assert_eq!(sender.recv_json(), json!({"op":"ack","id":2}));
    assert_eq!(
        listener.recv_json(),
        json!({"op":"message","channel":"room","data":{"n":1}})
    );
    sender.send_json(
        json!({"command":"broadcast","args":{"channel":"room","content":"deny"},"id":3}),
    );
    let reply = sender.recv_json();
    assert_eq!(
        (&reply["code"], &reply["id"]),
        (&json!("forbidden"), &json!(3)),
        "{reply}"
    );
    listener.send_json(json!({"command":"leave","args":{"channel":"room"}}));
    assert_eq!(
        listener.recv_json(),
        json!({"op":"unsubscribed","channel":"room"})
    );
    assert!(
        listener.sync().is_empty(),
        "the denied broadcast was delivered"
    );

    let actions: Vec<Value> = hook
        .requests()
        .into_iter()
        .filter(|r| r.body["command"] != "connect")
        .map(|r| json!([r.body["command"], r.body["args"]]))
        .collect();
    assert_eq!(
        actions,
        vec![
            json!(["subscribe", {"channel":"room"}]),
            json!(["subscribe", {"channel":"closed"}]),
            json!(["publish", {"channel":"room","data":{"n":1}}]),
            json!(["publish", {"channel":"room","data":"deny"}]),
            json!(["unsubscribe", {"channel":"room"}]),
        ]
    );
}
