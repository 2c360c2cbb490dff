//! protocol.md "Authentication": where tokens are read from (header, `?auth=`,
//! `?token=`, first present wins), 401 with a one-line reason for bad tokens,
//! `read`/`write` patterns, `forbidden` errors, the `auth` op replacing claims,
//! and open mode ignoring tokens.

mod common;

use common::{token, token_with, unix_now, Client, Refused, Server};
use serde_json::{json, Value};

/// A token that may read and write everything.
fn all_token() -> String {
    token(json!({"sub":"all","read":["*"],"write":["*"]}))
}

/// A token signed with the wrong secret (well-formed, bad signature).
fn forged_token() -> String {
    token_with("not-the-secret", json!({"read":["*"],"write":["*"]}))
}

fn refused(server: &Server, path: &str, headers: &[(&str, &str)]) -> Refused {
    match Client::try_connect(server.addr, path, headers) {
        Ok(_) => panic!("upgrade to {path} with {headers:?} was accepted, expected a refusal"),
        Err(r) => r,
    }
}

/// Asserts a 401 whose body is a single non-empty line; returns the line.
fn assert_401_one_line(r: &Refused, what: &str) -> String {
    assert_eq!(r.status, 401, "{what}: {r:?}");
    let line = r.body.strip_suffix('\n').unwrap_or(&r.body);
    let line = line.strip_suffix('\r').unwrap_or(line);
    assert!(!line.trim().is_empty(), "{what}: empty 401 body");
    assert!(
        !line.contains('\n') && !line.contains('\r'),
        "{what}: 401 body is not one line: {:?}",
        r.body
    );
    line.to_string()
}

/// Subscribes with an id and returns the reply.
fn try_subscribe(c: &mut Client, channel: &str, id: Value) -> Value {
    c.send_json(json!({"op":"subscribe","channel":channel,"id":id}));
    c.recv_json()
}

/// Reads `n` messages (`op` = `message`), failing on anything else.
fn recv_messages(c: &mut Client, n: usize) -> Vec<Value> {
    (0..n)
        .map(|_| {
            let m = c.recv_json();
            assert_eq!(m["op"], "message", "expected a message, got {m}");
            m
        })
        .collect()
}

fn assert_forbidden(reply: &Value, id: Value, what: &str) {
    assert_eq!(reply["op"], "error", "{what}: {reply}");
    assert_eq!(reply["code"], "forbidden", "{what}: {reply}");
    assert_eq!(reply["id"], id, "{what}: {reply}");
    assert!(reply["message"].is_string(), "{what}: {reply}");
}

#[test]
fn token_is_accepted_from_bearer_header_auth_query_and_token_query() {
    let server = Server::with_secret(&[]);
    let t = token(json!({"read":["news"],"write":["news"]}));
    let bearer = format!("Bearer {t}");

    let mut by_header = Client::try_connect(server.addr, "/ws", &[("Authorization", &bearer)])
        .unwrap_or_else(|r| panic!("Bearer header refused: {r:?}"));
    let mut by_auth = Client::connect(&server, &format!("/ws?auth={t}"));
    let mut by_token = Client::connect(&server, &format!("/ws?token={t}"));

    // Each connection really carries the token's claims: it may read news.
    by_header.subscribe("news");
    by_auth.subscribe("news");
    by_token.subscribe("news");
    by_header.publish("news", json!("hello"));
    for c in [&mut by_auth, &mut by_token] {
        assert_eq!(
            c.recv_json(),
            json!({"op":"message","channel":"news","data":"hello"})
        );
    }
    // ...and nothing else.
    let reply = try_subscribe(&mut by_token, "other", json!(1));
    assert_forbidden(&reply, json!(1), "subscribe outside the claims");
}

#[test]
fn header_token_wins_and_a_bad_one_is_not_skipped() {
    let server = Server::with_secret(&[]);
    let good = all_token();
    let bad = forged_token();

    // Bad header + good ?auth=: the header is used, so 401.
    let r = refused(
        &server,
        &format!("/ws?auth={good}"),
        &[("Authorization", &format!("Bearer {bad}"))],
    );
    assert_401_one_line(&r, "bad header, good ?auth=");

    // A header with a non-Bearer scheme is a bad header, not an absent one.
    let r = refused(
        &server,
        &format!("/ws?auth={good}"),
        &[("Authorization", "Basic dXNlcjpwYXNz")],
    );
    assert_401_one_line(&r, "Basic header, good ?auth=");

    // Bad ?auth= + good ?token=: auth comes first, so 401.
    let r = refused(&server, &format!("/ws?token={good}&auth={bad}"), &[]);
    assert_401_one_line(&r, "bad ?auth=, good ?token=");

    // Good header + bad query: the header wins.
    let mut c = Client::try_connect(
        server.addr,
        &format!("/ws?auth={bad}&token={bad}"),
        &[("Authorization", &format!("Bearer {good}"))],
    )
    .unwrap_or_else(|r| panic!("good header with bad query refused: {r:?}"));
    c.subscribe("anything");
}

#[test]
fn missing_malformed_forged_and_expired_tokens_get_401_with_one_line_reason() {
    let server = Server::with_secret(&[]);

    let r = refused(&server, "/ws", &[]);
    assert_401_one_line(&r, "missing token");

    let r = refused(&server, "/ws?auth=not.a.jwt", &[]);
    assert_401_one_line(&r, "malformed token");

    let r = refused(&server, "/ws?auth=garbage", &[]);
    assert_401_one_line(&r, "garbage token");

    let r = refused(&server, &format!("/ws?auth={}", forged_token()), &[]);
    assert_401_one_line(&r, "wrong signature");

    let expired = token(json!({"read":["*"],"exp": unix_now() - 30}));
    let r = refused(&server, &format!("/ws?auth={expired}"), &[]);
    let reason = assert_401_one_line(&r, "expired token");
    assert!(
        reason.to_lowercase().contains("expired"),
        "expired token reason: {reason:?}"
    );
    let r = refused(
        &server,
        "/ws",
        &[("Authorization", &format!("Bearer {expired}"))],
    );
    assert_401_one_line(&r, "expired token in header");

    // The refusals opened nothing: a good token still works.
    let mut c = Client::with_token(&server, &all_token());
    assert!(c.sync().is_empty());
}

#[test]
fn read_patterns_exact_prefix_and_star() {
    let server = Server::with_secret(&[]);
    let t = token(json!({"read":["news","chat:*"],"write":[]}));
    let mut c = Client::with_token(&server, &t);

    c.subscribe("news");
    c.subscribe("chat:room1");
    c.subscribe("chat:");
    for (i, denied) in ["chatroom", "News", "newsroom", "chat", "other"]
        .iter()
        .enumerate()
    {
        let reply = try_subscribe(&mut c, denied, json!(i));
        assert_forbidden(&reply, json!(i), &format!("subscribe {denied}"));
    }

    let mut star = Client::with_token(&server, &token(json!({"read":["*"]})));
    for ch in ["news", "chatroom", "x", "a:b:c"] {
        star.subscribe(ch);
    }
}

#[test]
fn write_patterns_exact_prefix_and_star() {
    let server = Server::with_secret(&[]);
    let mut sub = Client::with_token(&server, &all_token());
    for ch in ["news", "chat:room1", "chat:", "chatroom", "News"] {
        sub.subscribe(ch);
    }

    let mut w = Client::with_token(&server, &token(json!({"write":["news","chat:*"]})));
    w.publish("news", json!(1));
    w.publish("chat:room1", json!(2));
    w.publish("chat:", json!(3));
    for (i, denied) in ["chatroom", "News"].iter().enumerate() {
        w.send_json(json!({"op":"publish","channel":denied,"data":0,"id":format!("w{i}")}));
        let reply = w.recv_json();
        assert_forbidden(&reply, json!(format!("w{i}")), &format!("publish {denied}"));
    }
    // Exactly the allowed publishes were delivered (they may come from
    // another core, so wait for them rather than for a pong).
    let mut got: Vec<(String, Value)> = recv_messages(&mut sub, 3)
        .into_iter()
        .map(|m| {
            (
                m["channel"].as_str().unwrap_or("").to_string(),
                m["data"].clone(),
            )
        })
        .collect();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        got,
        vec![
            ("chat:".to_string(), json!(3)),
            ("chat:room1".to_string(), json!(2)),
            ("news".to_string(), json!(1)),
        ]
    );

    let mut star = Client::with_token(&server, &token(json!({"write":["*"]})));
    star.publish("chatroom", json!("ok"));
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"chatroom","data":"ok"})
    );
}

#[test]
fn forbidden_subscribe_and_publish_keep_the_connection_usable() {
    let server = Server::with_secret(&[]);
    let mut c = Client::with_token(&server, &token(json!({"read":["open"],"write":["open"]})));
    let mut watcher = Client::with_token(&server, &all_token());
    watcher.subscribe("secret");

    let reply = try_subscribe(&mut c, "secret", json!(7));
    assert_forbidden(&reply, json!(7), "subscribe without read permission");

    c.send_json(json!({"op":"publish","channel":"secret","data":"leak","id":"p"}));
    let reply = c.recv_json();
    assert_forbidden(&reply, json!("p"), "publish without write permission");

    // Without an id the error carries none.
    c.send_json(json!({"op":"publish","channel":"secret","data":"leak"}));
    let reply = c.recv_json();
    assert_eq!(reply["code"], "forbidden", "{reply}");
    assert!(reply.get("id").is_none(), "{reply}");

    // Still open and working.
    c.subscribe("open");
    c.publish("open", json!(1));
    assert!(c.sync().is_empty());
    // The forbidden publishes reached nobody.
    assert!(watcher.sync().is_empty());
}

#[test]
fn auth_op_replaces_claims_and_unsubscribes_lost_channels() {
    let server = Server::with_secret(&[]);
    let mut publisher = Client::with_token(&server, &all_token());
    let mut c = Client::with_token(&server, &token(json!({"read":["a","b","keep:*"]})));
    c.subscribe("a");
    c.subscribe("b");
    c.subscribe("keep:1");

    let new = token(json!({"read":["a","keep:*","c"]}));
    c.send_json(json!({"op":"auth","token":new,"id":"re"}));
    let first = c.recv_json();
    assert_eq!(first, json!({"op":"unsubscribed","channel":"b"}));
    assert!(first.get("id").is_none(), "{first}");
    assert_eq!(c.recv_json(), json!({"op":"authed","id":"re"}));

    // b no longer delivers; a and keep:1 still do.
    publisher.publish("b", json!("lost"));
    publisher.publish("a", json!("kept"));
    publisher.publish("keep:1", json!("kept too"));
    publisher.publish("a", json!("end"));
    let got = recv_messages(&mut c, 3);
    // Order is only promised per channel: "kept" before "end" on a.
    let on_a: Vec<&Value> = got
        .iter()
        .filter(|m| m["channel"] == "a")
        .map(|m| &m["data"])
        .collect();
    assert_eq!(on_a, vec!["kept", "end"], "{got:?}");
    let others: Vec<&Value> = got.iter().filter(|m| m["channel"] != "a").collect();
    assert_eq!(
        others,
        vec![&json!({"op":"message","channel":"keep:1","data":"kept too"})],
        "{got:?}"
    );
    assert!(
        c.sync().is_empty(),
        "nothing else, in particular nothing on b"
    );

    // The new claims are in force: c is now readable, b is not.
    c.subscribe("c");
    let reply = try_subscribe(&mut c, "b", json!(2));
    assert_forbidden(&reply, json!(2), "subscribe b after losing it");
}

#[test]
fn invalid_auth_token_is_unauthorized_and_old_claims_stay() {
    let server = Server::with_secret(&[]);
    let mut publisher = Client::with_token(&server, &all_token());
    let mut c = Client::with_token(&server, &token(json!({"read":["a","b"]})));
    c.subscribe("a");

    let expired = token(json!({"read":["*"],"exp": unix_now() - 30}));
    for (i, bad) in [forged_token(), expired, "garbage".to_string()]
        .into_iter()
        .enumerate()
    {
        c.send_json(json!({"op":"auth","token":bad,"id":i}));
        let reply = c.recv_json();
        assert_eq!(reply["op"], "error", "bad auth #{i}: {reply}");
        assert_eq!(reply["code"], "unauthorized", "bad auth #{i}: {reply}");
        assert_eq!(reply["id"], json!(i), "bad auth #{i}: {reply}");
    }

    // Old claims stay: still subscribed to a, may subscribe to b, not to c.
    c.subscribe("b");
    let reply = try_subscribe(&mut c, "c", json!("c"));
    assert_forbidden(&reply, json!("c"), "subscribe c after failed auth");
    publisher.publish("a", json!(1));
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"a","data":1})
    );
}

#[test]
fn open_mode_ignores_tokens_and_allows_everything() {
    let server = Server::open();
    let mut by_query = Client::connect(&server, "/ws?auth=garbage&token=junk");
    let mut by_header =
        Client::try_connect(server.addr, "/ws", &[("Authorization", "Bearer garbage")])
            .unwrap_or_else(|r| panic!("open mode refused a garbage header token: {r:?}"));
    let mut none = Client::connect(&server, "/ws");

    by_query.subscribe("anything");
    by_header.subscribe("anything");
    none.publish("anything", json!({"x":1}));
    for c in [&mut by_query, &mut by_header] {
        assert_eq!(
            c.recv_json(),
            json!({"op":"message","channel":"anything","data":{"x":1}})
        );
    }
    // A token sent with `auth` is ignored too: no unauthorized error.
    by_query.send_json(json!({"op":"auth","token":"garbage","id":1}));
    assert_eq!(by_query.recv_json(), json!({"op":"authed","id":1}));
    by_query.subscribe("still:everything");
}

/// A SECRET shorter than 32 bytes still works but is warned about once at
/// start; a long one is not.
#[test]
fn a_short_secret_is_warned_about() {
    let server = Server::with_secret(&[]);
    let log = server.log();
    assert!(
        log.contains("SECRET is only 11 bytes"),
        "no warning for an 11-byte SECRET:\n{log}"
    );
    let long = "k".repeat(32);
    let server = Server::start(&[("SECRET", long.as_str()), ("HOST", "127.0.0.1")]);
    assert!(!server.log().contains("SECRET is only"), "{}", server.log());
}
