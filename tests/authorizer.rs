//! The authorizer webhook (AUTHORIZER_URL, AUTHORIZE, AUTHORIZER_TIMEOUT,
//! AUTHORIZER_CACHE_TTL), end to end: a real webhook receiver started by
//! the test on loopback (tests/common/webhook.rs) allows, denies, answers
//! 5xx or stalls, and each outcome is checked at the upgrade (101, 403,
//! 503, 401), on messages (`forbidden`, close 1013), on the HTTP API, in
//! the request bodies herald sends and in the metrics.
//!
//! Stalls end by herald's own AUTHORIZER_TIMEOUT or by the test releasing
//! them; nothing waits on a sleep.

mod common;
#[path = "common/webhook.rs"]
mod webhook;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_no_failures, http, token, token_with, unix_now, Client, Refused, Server, SECRET, TIMEOUT,
};
use serde_json::{json, Value};
use tungstenite::Message;
use webhook::{Reply, Request, Webhook};

/// A server asking `hook`, with `extra` settings.
fn server_with(hook: &Webhook, extra: &[(&str, &str)]) -> Server {
    let url = hook.url();
    let mut env = vec![("AUTHORIZER_URL", url.as_str())];
    env.extend_from_slice(extra);
    Server::start(&env)
}

/// The value of `herald_authorizer_decisions_total{action=..,result=..}`.
fn decisions(server: &Server, action: &str, result: &str) -> f64 {
    server.metric(&format!(
        "herald_authorizer_decisions_total{{action=\"{action}\",result=\"{result}\"}}"
    ))
}

/// The upgrade's HTTP status (101 when accepted).
fn upgrade_status(server: &Server, path: &str, headers: &[(&str, &str)]) -> u16 {
    match Client::try_connect(server.addr, path, headers) {
        Ok(_) => 101,
        Err(r) => r.status,
    }
}

/// The refusal of a plain upgrade to `/ws` (fails if it is accepted).
fn refused(server: &Server) -> Refused {
    match Client::try_connect(server.addr, "/ws", &[]) {
        Ok(_) => panic!("the upgrade was accepted, expected a refusal"),
        Err(r) => r,
    }
}

/// The bodies of the requests whose `command` is `command`.
fn commands(requests: &[Request], command: &str) -> Vec<Value> {
    requests
        .iter()
        .filter(|r| r.body["command"] == command)
        .map(|r| r.body.clone())
        .collect()
}

/// The worker part of a `W.N` connection id.
fn worker_of(connection_id: &Value) -> String {
    let id = connection_id
        .as_str()
        .unwrap_or_else(|| panic!("connection_id {connection_id} is not a string"));
    let (w, n) = id
        .split_once('.')
        .unwrap_or_else(|| panic!("connection_id {id:?} is not W.N"));
    assert!(
        !w.is_empty()
            && !n.is_empty()
            && w.bytes().all(|b| b.is_ascii_digit())
            && n.bytes().all(|b| b.is_ascii_digit()),
        "connection_id {id:?} is not W.N"
    );
    w.to_string()
}

/// Asserts `reply` is a `forbidden` error for `id`.
fn assert_forbidden(reply: &Value, id: Value, what: &str) {
    assert_eq!(reply["op"], "error", "{what}: {reply}");
    assert_eq!(reply["code"], "forbidden", "{what}: {reply}");
    assert_eq!(reply["id"], id, "{what}: {reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no message in {reply}"
    );
}

#[test]
fn connect_allowed_sends_headers_query_and_address() {
    let hook = Webhook::allowing();
    let server = server_with(&hook, &[]);

    let mut sub = Client::try_connect(server.addr, "/ws?user=ann&room=a%20b", &[("X-Tag", "t1")])
        .expect("upgrade allowed by the webhook");
    let mut publisher = Client::connect(&server, "/ws");
    sub.subscribe("news");
    publisher.publish("news", json!({"hello": "world"}));
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"news","data":{"hello":"world"}})
    );

    let requests = hook.wait_requests(2);
    assert_eq!(requests.len(), 2, "one request per connect: {requests:#?}");
    let req = &requests[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/authorize");
    assert_eq!(req.header("content-type"), Some("application/json"));
    let body = &req.body;
    assert_eq!(body["command"], "connect", "{body}");
    let args = body["args"].as_object().expect("args object");
    let headers = args["headers"].as_object().expect("args.headers object");
    for name in headers.keys() {
        assert_eq!(
            *name,
            name.to_ascii_lowercase(),
            "header names in lower case: {body}"
        );
    }
    assert_eq!(headers["host"], server.addr.to_string(), "{body}");
    assert_eq!(headers["x-tag"], "t1", "{body}");
    assert_eq!(headers["upgrade"], "websocket", "{body}");
    assert!(headers.contains_key("sec-websocket-key"), "{body}");
    assert_eq!(args["query"], json!({"user":"ann","room":"a b"}), "{body}");
    let remote: SocketAddr = args["remote_addr"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("remote_addr is not ip:port: {body}"));
    assert_eq!(remote, sub.ws.get_ref().local_addr().unwrap(), "{body}");
    assert_eq!(requests[1].body["args"]["query"], json!({}));

    assert_eq!(decisions(&server, "connect", "allow"), 2.0);
}

/// Behind a reverse proxy listed in TRUSTED_PROXIES, `remote_addr` is the
/// client the proxy names (the rightmost untrusted hop of Forwarded or
/// X-Forwarded-For); from any other peer those headers are ignored.
#[test]
fn trusted_proxies_name_the_client() {
    let hook = Webhook::allowing();
    let server = server_with(&hook, &[("TRUSTED_PROXIES", "127.0.0.0/8, 10.0.0.0/8")]);
    let xff = [("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.0.0.9")];
    Client::try_connect(server.addr, "/ws", &xff).expect("upgrade");
    let fwd = [("Forwarded", r#"for="[2001:db8::17]:4711";proto=https"#)];
    Client::try_connect(server.addr, "/ws", &fwd).expect("upgrade");
    Client::try_connect(server.addr, "/ws", &[]).expect("upgrade");
    let requests = hook.wait_requests(3);
    let addr = |i: usize| requests[i].body["args"]["remote_addr"].clone();
    assert_eq!(addr(0), "198.51.100.7");
    assert_eq!(addr(1), "[2001:db8::17]:4711");
    let own: SocketAddr = addr(2).as_str().unwrap().parse().unwrap();
    assert!(own.ip().is_loopback());

    // Not trusted: the peer's own address, whatever the headers say.
    let hook = Webhook::allowing();
    let server = server_with(&hook, &[("TRUSTED_PROXIES", "10.0.0.0/8")]);
    let c = Client::try_connect(server.addr, "/ws", &xff).expect("upgrade");
    let requests = hook.wait_requests(1);
    let remote: SocketAddr = requests[0].body["args"]["remote_addr"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("ip:port");
    assert_eq!(remote, c.ws.get_ref().local_addr().unwrap());
}

/// Repeated headers reach the webhook joined as HTTP joins them: `, `, and
/// `; ` for Cookie. (A raw upgrade, as the client library merges headers.)
#[test]
fn connect_joins_repeated_headers() {
    let hook = Webhook::allowing();
    let server = server_with(&hook, &[]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let req = format!(
        "GET /ws?a=1 HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         X-Multi: one\r\nCookie: a=1\r\nx-multi: two\r\nCOOKIE: b=2\r\n\r\n",
        server.addr
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "EOF in the response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let body = &hook.wait_requests(1)[0].body;
    let headers = &body["args"]["headers"];
    assert_eq!(headers["x-multi"], "one, two", "{body}");
    assert_eq!(headers["cookie"], "a=1; b=2", "{body}");
}

/// 200 accepts; 5xx is "authorizer down" (503); any other status denies
/// (403). One server, the status picked by the query of each upgrade.
#[test]
fn connect_answers_map_to_upgrade_statuses() {
    let hook = Webhook::start(|body| {
        let code = body["args"]["query"]["answer"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        Reply::Status(code, String::new())
    });
    let server = server_with(&hook, &[]);
    let cases: &[(u16, u16)] = &[
        (200, 101),
        (403, 403),
        (401, 403),
        (404, 403),
        (204, 403),
        (400, 403),
        (302, 403),
        (500, 503),
        (502, 503),
        (503, 503),
    ];
    let mut failures = Vec::new();
    for &(answer, expected) in cases {
        let got = upgrade_status(&server, &format!("/ws?answer={answer}"), &[]);
        if got != expected {
            failures.push(format!(
                "webhook {answer}: upgrade got {got}, expected {expected}"
            ));
        }
    }
    assert_no_failures(&failures, cases.len());
    assert_eq!(hook.request_count(), cases.len());
    assert_eq!(decisions(&server, "connect", "allow"), 1.0);
    assert_eq!(decisions(&server, "connect", "deny"), 6.0);
    assert_eq!(decisions(&server, "connect", "unavailable"), 3.0);
}

#[test]
fn connect_denied_gets_403_with_a_reason() {
    let hook = Webhook::start(|_| Reply::status(403));
    let server = server_with(&hook, &[]);
    let refused = refused(&server);
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(
        !refused.body.trim().is_empty(),
        "a reason in the body: {refused:?}"
    );
    assert_eq!(hook.request_count(), 1);
}

#[test]
fn connect_500_gets_503() {
    let hook = Webhook::start(|_| Reply::status(500));
    let server = server_with(&hook, &[]);
    let refused = refused(&server);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(hook.request_count(), 1);
}

#[test]
fn connect_stalled_past_timeout_gets_503() {
    let hook = Webhook::start(|_| Reply::Stall);
    let server = server_with(&hook, &[("AUTHORIZER_TIMEOUT", "0.5")]);
    let start = Instant::now();
    let refused = refused(&server);
    let took = start.elapsed();
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "503 after {took:?}, expected after AUTHORIZER_TIMEOUT=0.5"
    );
    assert_eq!(hook.request_count(), 1);
    assert_eq!(decisions(&server, "connect", "unavailable"), 1.0);
}

#[test]
fn authorizer_not_listening_gets_503() {
    // A port that was just free: nothing listens there any more.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/authorize");
    let server = Server::start(&[("AUTHORIZER_URL", url.as_str())]);
    let refused = refused(&server);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(decisions(&server, "connect", "unavailable"), 1.0);
    // The HTTP API (open mode) is approved by the same webhook: down, 503.
    let (status, body) = http(
        server.addr,
        "POST",
        "/publish",
        &[],
        br#"{"channel":"news","data":1}"#,
    );
    assert_eq!(status, 503, "{body}");
}

/// `read`/`write` in the 200 body become the connection's permissions (a
/// missing one means nothing), replacing the token's.
#[test]
fn claims_in_the_answer_replace_permissions() {
    let hook = Webhook::start(|_| Reply::allow_with(json!({"read":["news"],"sub":"ann"})));
    let server = server_with(&hook, &[("SECRET", SECRET), ("HOST", "127.0.0.1")]);
    let everything = token(json!({"sub":"tok","read":["*"],"write":["*"]}));
    for (what, path) in [
        ("no token", "/ws".to_string()),
        (
            "a token granting everything",
            format!("/ws?auth={everything}"),
        ),
    ] {
        let mut c = Client::connect(&server, &path);
        c.send_json(json!({"op":"subscribe","channel":"news","id":1}));
        assert_eq!(
            c.recv_json(),
            json!({"op":"subscribed","channel":"news","id":1}),
            "{what}"
        );
        c.send_json(json!({"op":"subscribe","channel":"other","id":2}));
        assert_forbidden(
            &c.recv_json(),
            json!(2),
            &format!("{what}: subscribe other"),
        );
        c.send_json(json!({"op":"publish","channel":"news","data":1,"id":3}));
        assert_forbidden(&c.recv_json(), json!(3), &format!("{what}: publish news"));
        assert!(c.sync().is_empty(), "{what}");
    }

    // Patterns work as in tokens; `write` alone means no read.
    let hook = Webhook::start(|_| Reply::allow_with(json!({"write":["chat:*"]})));
    let server = server_with(&hook, &[]);
    let mut c = Client::connect(&server, "/ws");
    c.publish("chat:room1", json!("hi"));
    c.send_json(json!({"op":"publish","channel":"chatroom","data":1,"id":4}));
    assert_forbidden(&c.recv_json(), json!(4), "publish chatroom");
    c.send_json(json!({"op":"subscribe","channel":"chat:room1","id":5}));
    assert_forbidden(&c.recv_json(), json!(5), "subscribe without read");
}

/// Without claims in the answer, a valid token's permissions apply; without
/// a token, everything is allowed.
#[test]
fn token_permissions_apply_when_the_answer_has_no_claims() {
    let hook = Webhook::allowing();
    let server = server_with(&hook, &[("SECRET", SECRET), ("HOST", "127.0.0.1")]);
    let t = token(json!({"sub":"u","read":["news"],"write":["news"]}));
    let mut c = Client::with_token(&server, &t);
    c.subscribe("news");
    c.send_json(json!({"op":"subscribe","channel":"other","id":1}));
    assert_forbidden(&c.recv_json(), json!(1), "subscribe other with the token");
    c.send_json(json!({"op":"publish","channel":"other","data":1,"id":2}));
    assert_forbidden(&c.recv_json(), json!(2), "publish other with the token");

    let mut anon = Client::connect(&server, "/ws");
    anon.subscribe("other");
    anon.publish("news", json!("from anon"));
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"news","data":"from anon"})
    );
    // The webhook saw both connects, the token among the query parameters.
    let requests = hook.wait_requests(2);
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].body["args"]["query"]["auth"], t.as_str());
}

/// A token that is sent but invalid gets 401 before the webhook is asked.
#[test]
fn invalid_token_gets_401_without_asking_the_webhook() {
    let hook = Webhook::allowing();
    let server = server_with(&hook, &[("SECRET", SECRET), ("HOST", "127.0.0.1")]);
    let forged = token_with("not-the-secret", json!({"read":["*"],"write":["*"]}));
    let expired = token(json!({"read":["*"],"exp": unix_now() - 100}));
    let bearer_forged = format!("Bearer {forged}");
    // (what, path, Authorization header)
    let cases = [
        ("forged ?auth=", format!("/ws?auth={forged}"), None),
        ("expired ?token=", format!("/ws?token={expired}"), None),
        ("garbage ?auth=", "/ws?auth=not.a.jwt".to_string(), None),
        (
            "forged Authorization header",
            "/ws".to_string(),
            Some(bearer_forged.as_str()),
        ),
    ];
    let mut failures = Vec::new();
    for (what, path, bearer) in &cases {
        let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("Authorization", *b)).collect();
        let got = upgrade_status(&server, path, &headers);
        if got != 401 {
            failures.push(format!("{what}: got {got}, expected 401"));
        }
    }
    assert_no_failures(&failures, cases.len());
    // A valid connect afterwards is the first request the webhook sees
    // (anything sent for the refused ones would have arrived before it).
    Client::connect(&server, "/ws");
    let requests = hook.wait_requests(1);
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(requests[0].body["args"]["query"], json!({}));
}

/// AUTHORIZE=subscribe: allowed subscribes happen, denied ones get
/// `forbidden` with their id and the connection stays usable; the request
/// carries the channel and the `client` object (sub from the connect answer,
/// connection id, the upgrade's query).
#[test]
fn subscribe_approval_allows_and_denies() {
    let hook = Webhook::start(|body| {
        let channel = body["args"]["channel"].as_str();
        match body["command"].as_str() {
            // Only the connection from room r1 is "ann".
            Some("connect") if body["args"]["query"]["room"] == "r1" => {
                Reply::allow_with(json!({"sub":"ann"}))
            }
            Some("subscribe") if channel == Some("denied") => Reply::status(403),
            _ => Reply::allow(),
        }
    });
    let server = server_with(&hook, &[("AUTHORIZE", "subscribe,publish")]);
    let mut c = Client::connect(&server, "/ws?room=r1");
    c.send_json(json!({"op":"subscribe","channel":"allowed","id":1}));
    assert_eq!(
        c.recv_json(),
        json!({"op":"subscribed","channel":"allowed","id":1})
    );
    c.send_json(json!({"op":"subscribe","channel":"denied","id":"two"}));
    assert_forbidden(&c.recv_json(), json!("two"), "denied subscribe");
    // Still usable, and subscribed to "allowed" only.
    assert!(c.sync().is_empty());
    let mut p = Client::connect(&server, "/ws");
    p.publish("denied", json!("nobody hears this"));
    p.publish("allowed", json!("heard"));
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"allowed","data":"heard"})
    );

    let requests = hook.wait_requests(6);
    let subs = commands(&requests, "subscribe");
    assert_eq!(subs.len(), 2, "{subs:#?}");
    let denied = &subs[1];
    assert_eq!(denied["args"], json!({"channel":"denied"}), "{denied}");
    let client = &denied["client"];
    assert_eq!(client["sub"], "ann", "{denied}");
    assert_eq!(client["query"], json!({"room":"r1"}), "{denied}");
    worker_of(&client["connection_id"]);
    assert_eq!(
        subs[0]["client"], *client,
        "same client object for one connection"
    );
    // The publisher has no sub and its own connection id.
    let pubs = commands(&requests, "publish");
    assert_eq!(pubs.len(), 2, "{pubs:#?}");
    assert_eq!(pubs[0]["client"]["sub"], Value::Null);
    assert_eq!(pubs[0]["client"]["query"], json!({}));
    assert_ne!(pubs[0]["client"]["connection_id"], client["connection_id"]);
    assert_eq!(decisions(&server, "subscribe", "allow"), 1.0);
    assert_eq!(decisions(&server, "subscribe", "deny"), 1.0);
}

/// The local permission check comes first: a channel the grant does not
/// allow is `forbidden` without asking the webhook.
#[test]
fn local_permissions_are_checked_before_asking() {
    let hook = Webhook::start(|body| match body["command"].as_str() {
        Some("connect") => Reply::allow_with(json!({"read":["a"],"write":["a"]})),
        _ => Reply::allow(),
    });
    let server = server_with(&hook, &[("AUTHORIZE", "subscribe,publish")]);
    let mut c = Client::connect(&server, "/ws");
    c.send_json(json!({"op":"subscribe","channel":"b","id":1}));
    assert_forbidden(&c.recv_json(), json!(1), "subscribe b");
    c.send_json(json!({"op":"publish","channel":"b","data":0,"id":2}));
    assert_forbidden(&c.recv_json(), json!(2), "publish b");
    c.subscribe("a");
    let requests = hook.wait_requests(2);
    assert_eq!(
        requests.len(),
        2,
        "only connect and subscribe a: {requests:#?}"
    );
    assert_eq!(requests[1].body["args"], json!({"channel":"a"}));
}

/// AUTHORIZE=publish: an allowed publish is delivered and the webhook sees
/// its data as the client sent it; a denied one gets `forbidden` and is not
/// delivered.
#[test]
fn publish_approval_allows_and_denies() {
    let hook = Webhook::start(|body| {
        if body["command"] == "publish" && body["args"]["data"]["deny"] == true {
            Reply::status(403)
        } else {
            Reply::allow()
        }
    });
    let server = server_with(&hook, &[("AUTHORIZE", "subscribe,publish")]);
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("news");
    let mut p = Client::connect(&server, "/ws?src=p");
    let raw = r#"{"x": [1,  2.50], "s":"\u00e9"}"#;
    p.send_text(&format!(
        r#"{{"op":"publish","channel":"news","data":{raw},"id":1}}"#
    ));
    assert_eq!(p.recv_json(), json!({"op":"ack","id":1}));
    match sub.recv() {
        tungstenite::Message::Text(t) => assert_eq!(
            t.as_str(),
            format!(r#"{{"op":"message","channel":"news","data":{raw}}}"#)
        ),
        other => panic!("expected the message, got {other:?}"),
    }
    let requests = hook.wait_requests(3);
    let publish = requests
        .iter()
        .find(|r| r.body["command"] == "publish")
        .expect("publish request");
    assert!(
        publish.raw.contains(&format!(r#""data":{raw}"#)),
        "data spliced in as sent: {}",
        publish.raw
    );
    assert_eq!(publish.body["args"]["channel"], "news");
    assert_eq!(publish.body["args"]["data"], json!({"x":[1, 2.5],"s":"é"}));
    assert_eq!(publish.body["client"]["query"], json!({"src":"p"}));

    p.send_json(json!({"op":"publish","channel":"news","data":{"deny":true},"id":2}));
    assert_forbidden(&p.recv_json(), json!(2), "denied publish");
    // Without an id, nothing comes back for an allowed publish.
    p.send_json(json!({"op":"publish","channel":"news","data":"after"}));
    assert!(p.sync().is_empty());
    // Published after the denied one on the same channel by the same
    // publisher: had the denied one been delivered, it would come first.
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"news","data":"after"}),
        "the denied publish must not be delivered"
    );
    assert!(sub.sync().is_empty());
    assert_eq!(decisions(&server, "publish", "allow"), 2.0);
    assert_eq!(decisions(&server, "publish", "deny"), 1.0);
}

/// AUTHORIZE=unsubscribe: a denied unsubscribe leaves the subscription.
#[test]
fn unsubscribe_approval_allows_and_denies() {
    let hook = Webhook::start(|body| {
        if body["command"] == "unsubscribe" && body["args"]["channel"] == "keep" {
            Reply::status(403)
        } else {
            Reply::allow()
        }
    });
    let server = server_with(&hook, &[("AUTHORIZE", "unsubscribe")]);
    let mut c = Client::connect(&server, "/ws");
    c.subscribe("keep");
    c.subscribe("drop");
    c.send_json(json!({"op":"unsubscribe","channel":"keep","id":1}));
    assert_forbidden(&c.recv_json(), json!(1), "denied unsubscribe");
    c.send_json(json!({"op":"unsubscribe","channel":"drop","id":2}));
    assert_eq!(
        c.recv_json(),
        json!({"op":"unsubscribed","channel":"drop","id":2})
    );
    let mut p = Client::connect(&server, "/ws");
    p.publish("drop", json!(1));
    p.publish("keep", json!(2));
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"keep","data":2}),
        "still subscribed to keep, no longer to drop"
    );
    assert!(c.sync().is_empty());
    let requests = hook.wait_requests(4);
    let unsubs = commands(&requests, "unsubscribe");
    assert_eq!(unsubs.len(), 2);
    assert_eq!(unsubs[0]["args"], json!({"channel":"keep"}));
}

#[test]
fn subscribe_answered_500_closes_with_1013() {
    let hook = Webhook::start(|body| match body["command"].as_str() {
        Some("subscribe") => Reply::status(500),
        _ => Reply::allow(),
    });
    let server = server_with(&hook, &[("AUTHORIZE", "subscribe")]);
    let mut c = Client::connect(&server, "/ws");
    c.send_json(json!({"op":"subscribe","channel":"news","id":1}));
    let (code, reason) = c.expect_close();
    assert_eq!(code, 1013, "{reason}");
    assert_eq!(decisions(&server, "subscribe", "unavailable"), 1.0);
}

#[test]
fn publish_stalled_past_timeout_closes_with_1013() {
    let hook = Webhook::start(|body| match body["command"].as_str() {
        Some("publish") => Reply::Stall,
        _ => Reply::allow(),
    });
    let server = server_with(
        &hook,
        &[("AUTHORIZE", "publish"), ("AUTHORIZER_TIMEOUT", "0.5")],
    );
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("news");
    let mut c = Client::connect(&server, "/ws");
    let start = Instant::now();
    c.send_json(json!({"op":"publish","channel":"news","data":1,"id":1}));
    let (code, reason) = c.expect_close();
    let took = start.elapsed();
    assert_eq!(code, 1013, "{reason}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "closed after {took:?}, expected after AUTHORIZER_TIMEOUT=0.5"
    );
    assert!(
        sub.sync().is_empty(),
        "the unapproved publish was delivered"
    );
    hook.release();
}

/// A publish waiting for approval holds back its own connection only:
/// other publishers (on the same worker and on the other) keep flowing;
/// once released, the held publish and the one queued behind it are
/// delivered and acknowledged in order.
#[test]
fn stalled_publish_holds_up_only_its_own_connection() {
    let hook = Webhook::start(|body| {
        if body["command"] == "publish" && body["args"]["data"] == json!({"n":"a1"}) {
            Reply::Stall
        } else {
            Reply::allow()
        }
    });
    let server = server_with(
        &hook,
        &[("AUTHORIZE", "publish"), ("AUTHORIZER_TIMEOUT", "30")],
    );
    let mut c = Client::connect(&server, "/ws");
    c.subscribe("room");
    let mut a = Client::connect(&server, "/ws");
    a.send_json(json!({"op":"publish","channel":"room","data":{"n":"a1"},"id":"a1"}));
    a.send_json(json!({"op":"publish","channel":"room","data":{"n":"a2"},"id":"a2"}));
    hook.wait_held(1);
    let is_data = |r: &Request, n: &str| r.body["args"]["data"]["n"] == n;
    let a_worker = {
        let requests = hook.requests();
        let held = requests
            .iter()
            .find(|r| is_data(r, "a1"))
            .expect("a1 asked");
        worker_of(&held.body["client"]["connection_id"])
    };

    // Publishers until one shared A's worker and one did not.
    let (mut same, mut other) = (0, 0);
    for i in 0..64 {
        if same > 0 && other > 0 {
            break;
        }
        let n = format!("b{i}");
        let mut b = Client::connect(&server, "/ws");
        b.send_json(json!({"op":"publish","channel":"room","data":{"n":n},"id":n}));
        assert_eq!(b.recv_json(), json!({"op":"ack","id":n}), "publisher {n}");
        assert_eq!(
            c.recv_json(),
            json!({"op":"message","channel":"room","data":{"n":n}}),
            "publisher {n} delivered while A waits"
        );
        let requests = hook.requests();
        let asked = requests.iter().find(|r| is_data(r, &n)).expect("b asked");
        if worker_of(&asked.body["client"]["connection_id"]) == a_worker {
            same += 1;
        } else {
            other += 1;
        }
    }
    assert!(
        same > 0 && other > 0,
        "no publisher landed on A's worker ({same}) or on the other ({other})"
    );
    assert!(
        !hook.requests().iter().any(|r| is_data(r, "a2")),
        "A's second publish must wait behind its first"
    );

    hook.release();
    assert_eq!(a.recv_json(), json!({"op":"ack","id":"a1"}));
    assert_eq!(a.recv_json(), json!({"op":"ack","id":"a2"}));
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"room","data":{"n":"a1"}})
    );
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"room","data":{"n":"a2"}})
    );
}

/// AUTHORIZER_CACHE_TTL: a positive decision per (connection, action,
/// channel) is remembered; denials are not.
#[test]
fn cache_ttl_remembers_approvals_per_connection() {
    let hook = Webhook::start(|body| {
        if body["command"] == "publish" && body["args"]["channel"] == "no" {
            Reply::status(403)
        } else {
            Reply::allow()
        }
    });
    let server = server_with(
        &hook,
        &[("AUTHORIZE", "publish"), ("AUTHORIZER_CACHE_TTL", "60")],
    );
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("news");
    let mut p = Client::connect(&server, "/ws");
    let asked = |channel: &str| {
        hook.requests()
            .iter()
            .filter(|r| r.body["command"] == "publish" && r.body["args"]["channel"] == channel)
            .count()
    };
    for i in 0..3 {
        p.publish("news", json!(i));
    }
    assert_eq!(asked("news"), 1, "cached after the first approval");
    assert_eq!(decisions(&server, "publish", "allow"), 1.0);
    assert_eq!(decisions(&server, "publish", "cached"), 2.0);
    for i in 0..3 {
        assert_eq!(
            sub.recv_json(),
            json!({"op":"message","channel":"news","data":i}),
            "cached approvals are delivered"
        );
    }
    p.publish("other", json!(0));
    assert_eq!(asked("other"), 1, "another channel is asked");
    for id in [1, 2] {
        p.send_json(json!({"op":"publish","channel":"no","data":0,"id":id}));
        assert_forbidden(&p.recv_json(), json!(id), "denied publish");
    }
    assert_eq!(asked("no"), 2, "denials are not cached");
    let mut q = Client::connect(&server, "/ws");
    q.publish("news", json!("q"));
    assert_eq!(asked("news"), 2, "another connection is asked");
    assert_eq!(decisions(&server, "publish", "cached"), 2.0);
}

/// Without AUTHORIZER_CACHE_TTL every action is asked.
#[test]
fn without_cache_ttl_every_publish_is_asked() {
    let hook = Webhook::allowing();
    let server = server_with(&hook, &[("AUTHORIZE", "publish")]);
    let mut p = Client::connect(&server, "/ws");
    for i in 0..3 {
        p.publish("news", json!(i));
    }
    let requests = hook.requests();
    assert_eq!(commands(&requests, "publish").len(), 3);
    assert_eq!(
        commands(&requests, "connect").len(),
        1,
        "connect is asked even when AUTHORIZE does not list it"
    );
    assert_eq!(decisions(&server, "publish", "cached"), 0.0);
}

/// Binary publishes are approved too (payload shown as a JSON string when
/// it is UTF-8): allowed, delivered as sent; denied, `forbidden` without id.
#[test]
fn binary_publish_approval_allows_and_denies() {
    let hook = Webhook::start(|body| {
        if body["command"] == "publish" && body["args"]["data"] == "deny" {
            Reply::status(403)
        } else {
            Reply::allow()
        }
    });
    let server = server_with(&hook, &[("AUTHORIZE", "publish")]);
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("ab");
    let mut p = Client::connect(&server, "/ws");
    p.ws.send(Message::binary(b"\x02abhello".to_vec())).unwrap();
    p.ws.send(Message::binary(b"\x02abdeny".to_vec())).unwrap();
    p.ws.send(Message::binary(b"\x02abend".to_vec())).unwrap();
    let replies = p.sync();
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["code"], "forbidden", "{replies:?}");
    assert_eq!(replies[0].get("id"), None, "{replies:?}");
    match sub.recv() {
        Message::Binary(b) => assert_eq!(&b[..], b"\x02abhello"),
        other => panic!("expected the binary frame, got {other:?}"),
    }
    match sub.recv() {
        Message::Binary(b) => assert_eq!(&b[..], b"\x02abend", "the denied one was delivered"),
        other => panic!("expected the binary frame, got {other:?}"),
    }
    assert!(sub.sync().is_empty());
    let pubs = commands(&hook.requests(), "publish");
    assert_eq!(pubs.len(), 3);
    assert_eq!(pubs[0]["args"], json!({"channel":"ab","data":"hello"}));
}

/// The webhook client keeps connections alive (a pool per reactor).
#[test]
fn checks_reuse_keep_alive_connections() {
    let hook = Webhook::allowing();
    let server = server_with(&hook, &[]);
    for _ in 0..20 {
        Client::connect(&server, "/ws");
    }
    assert_eq!(hook.request_count(), 20);
    let conns = hook.connections();
    assert!(
        conns <= 4,
        "20 sequential checks opened {conns} TCP connections to the webhook"
    );
}

/// Without SECRET but with AUTHORIZER_URL, the HTTP API's publishes are
/// approved by the webhook: 202 (and delivered), 403, or 503.
#[test]
fn http_api_publishes_are_approved_by_the_webhook() {
    let hook = Webhook::start(|body| {
        if body["command"] != "publish" {
            return Reply::allow();
        }
        match body["args"]["channel"].as_str() {
            Some("down") => Reply::status(500),
            _ if body["args"]["data"]["deny"] == true => Reply::status(403),
            _ => Reply::allow(),
        }
    });
    let server = server_with(&hook, &[]);
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("news");

    let (status, body) = http(
        server.addr,
        "POST",
        "/publish",
        &[("X-Backend", "b1")],
        br#"{"channel":"news","data":{"k": 1}}"#,
    );
    assert_eq!((status, body.as_str()), (202, r#"{"ok":true}"#));
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"news","data":{"k":1}})
    );
    let req = commands(&hook.requests(), "publish").remove(0);
    assert_eq!(
        req["args"],
        json!({"channel":"news","data":{"k":1}}),
        "{req}"
    );
    let client = &req["client"];
    assert_eq!(client["sub"], Value::Null, "{req}");
    assert_eq!(client["connection_id"], Value::Null, "{req}");
    assert_eq!(client["headers"]["x-backend"], "b1", "{req}");
    assert_eq!(client["headers"]["host"], server.addr.to_string(), "{req}");
    let remote: SocketAddr = client["remote_addr"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("remote_addr is not ip:port: {req}"));
    assert!(remote.ip().is_loopback(), "{req}");

    let (status, body) = http(
        server.addr,
        "POST",
        "/publish",
        &[],
        br#"{"channel":"news","data":{"deny":true}}"#,
    );
    assert_eq!(status, 403, "{body}");
    let err: Value = serde_json::from_str(&body).expect("JSON error body");
    assert_eq!(err["code"], "forbidden", "{body}");

    let (status, body) = http(
        server.addr,
        "POST",
        "/broadcast",
        &[],
        br#"{"channel":"news","content":"wsify"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let (status, body) = http(
        server.addr,
        "POST",
        "/publish",
        &[],
        br#"{"channel":"down","data":1}"#,
    );
    assert_eq!(status, 503, "{body}");

    // Refused publishes are refused before anything is published, so the
    // next message is the broadcast.
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"news","data":"wsify"}),
        "the denied publish must not be delivered"
    );
    assert!(sub.sync().is_empty());
    let pubs = commands(&hook.requests(), "publish");
    assert_eq!(pubs.len(), 4, "{pubs:#?}");
    assert_eq!(pubs[2]["args"], json!({"channel":"news","data":"wsify"}));
}

/// HOST=0.0.0.0 without SECRET is allowed when AUTHORIZER_URL decides who
/// connects; without either, herald refuses to start (exit code 2).
#[test]
fn non_loopback_needs_secret_or_authorizer() {
    let hook = Webhook::allowing();
    let url = hook.url();
    let server = Server::try_start(&[("HOST", "0.0.0.0"), ("AUTHORIZER_URL", url.as_str())])
        .unwrap_or_else(|log| {
            panic!("herald did not start on 0.0.0.0 with AUTHORIZER_URL:\n{log}")
        });
    // The start-up warning says what is true: not "loopback only".
    let log = server.log();
    assert!(
        log.contains("no SECRET set") && log.contains("0.0.0.0") && !log.contains("loopback only"),
        "{log}"
    );
    let loopback = SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    Client::try_connect(loopback, "/ws", &[]).expect("upgrade allowed");
    assert_eq!(hook.request_count(), 1);
    drop(server);

    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .env("HOST", "0.0.0.0")
        .env("PORT", "0")
        .env("WORKERS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = tx.send((child.wait().expect("wait"), err));
    });
    let (status, stderr) = rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| {
        // SAFETY: signalling the child this test spawned.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("herald started on 0.0.0.0 without SECRET or AUTHORIZER_URL");
    });
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
}

/// Without SECRET the authorizer decides durable subscriptions (as a
/// `subscribe` of the channel), and the `sub` of its connect answer names
/// the user whose personal channel the connection may follow.
#[test]
fn the_authorizer_decides_durable_subscriptions_and_names_the_user() {
    let hook = Webhook::start(|body| {
        let channel = body["args"]["channel"].as_str();
        match body["command"].as_str() {
            Some("connect") => Reply::allow_with(json!({"sub": "ann"})),
            Some("subscribe") if channel == Some("denied") => Reply::status(403),
            _ => Reply::allow(),
        }
    });
    let server = server_with(&hook, &[]);
    let post = |channel: &str| {
        let body = json!({"user_id": "ann", "channel": channel}).to_string();
        http(server.addr, "POST", "/subscribe", &[], body.as_bytes())
    };
    let (status, text) = post("denied");
    assert_eq!(status, 403, "{text}");
    let (status, text) = post("news");
    assert_eq!((status, text.as_str()), (200, r#"{"subscribed":true}"#));
    assert_eq!(decisions(&server, "subscribe", "deny"), 1.0);
    let (status, _) = http(
        server.addr,
        "POST",
        "/publish",
        &[],
        br#"{"channel":"news","data":"n1"}"#,
    );
    assert!(status < 300);
    let mut ann = Client::connect(&server, "/ws");
    ann.send_json(json!({"op": "subscribe", "channel": "personal-ann", "id": 1}));
    assert_eq!(ann.recv_json()["op"], "subscribed");
    let m = ann.recv_json();
    assert_eq!(
        (&m["channel"], &m["data"]),
        (&json!("news"), &json!("n1")),
        "{m}"
    );
    ann.send_json(json!({"op": "subscribe", "channel": "personal-bob", "id": 2}));
    assert_eq!(ann.recv_json()["code"], "forbidden");
}
