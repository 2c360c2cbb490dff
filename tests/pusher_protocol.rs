//! The Pusher protocol's edges, spoken frame by frame over real sockets
//! (the real client libraries are exercised in `pusher_clients.rs`):
//! refusals with Pusher's close codes, the idle ping and 4201, app
//! quotas, events clients may not send, socket_id exclusion on every core,
//! isolation between apps and from native channels.

mod common;

use common::{Client, Server};
use serde_json::{json, Value};
use tungstenite::Message;

const APPS: &str = r#"[
  {"id":"a1","key":"k1","secret":"s1","enable_client_messages":true,"max_connections":3},
  {"id":"a2","key":"k2","secret":"s2"}
]"#;

/// A Pusher connection: the socket id from `connection_established`.
struct Pusher {
    c: Client,
    socket_id: String,
}

fn connect(server: &Server, key: &str) -> Pusher {
    let mut c = Client::connect(server, &format!("/app/{key}?protocol=7&client=test"));
    let hello = c.recv_json();
    assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap().to_string();
    assert!(
        socket_id.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit())
        }),
        "{socket_id}"
    );
    Pusher { c, socket_id }
}

impl Pusher {
    fn subscribe(&mut self, channel: &str) {
        self.c
            .send_json(json!({"event":"pusher:subscribe","data":{"channel":channel}}));
        let r = self.c.recv_json();
        assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    }

    /// Round trip: every frame the server sent before the pong.
    fn sync(&mut self) -> Vec<Value> {
        common::pusher_sync(&mut self.c)
    }
}

/// The error and close a refused Pusher connection gets.
fn refused(server: &Server, path: &str) -> (Value, u16) {
    let mut c = Client::connect(server, path);
    let err = c.recv_json();
    assert_eq!(err["event"], "pusher:error", "{err}");
    let (code, _) = c.expect_close();
    (err, code)
}

fn sign(secret: &str, s: &str) -> String {
    common::hmac_sha256_hex(secret, s.as_bytes())
}

/// A signed HTTP API request (Pusher's auth_* query parameters) of app a1.
fn api(server: &Server, method: &str, path: &str, body: &str) -> (u16, String) {
    api_as(server, ("k1", "s1"), method, path, body)
}

/// A signed HTTP API request with the app credentials `(key, secret)`.
fn api_as(
    server: &Server,
    credentials: (&str, &str),
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    common::pusher_api(server.addr, credentials, method, path, body)
}

#[test]
fn refusals_use_pushers_close_codes() {
    let server = Server::start(&[("APPS", APPS)]);
    let (err, code) = refused(&server, "/app/nope?protocol=7");
    assert_eq!(
        (err["data"]["code"].as_u64(), code),
        (Some(4001), 4001),
        "{err}"
    );
    let (err, code) = refused(&server, "/app/?protocol=7");
    assert_eq!(
        (err["data"]["code"].as_u64(), code),
        (Some(4005), 4005),
        "{err}"
    );
    let (err, code) = refused(&server, "/app/k1?protocol=abc");
    assert_eq!(
        (err["data"]["code"].as_u64(), code),
        (Some(4006), 4006),
        "{err}"
    );
    let (err, code) = refused(&server, "/app/k1?protocol=4");
    assert_eq!(
        (err["data"]["code"].as_u64(), code),
        (Some(4007), 4007),
        "{err}"
    );
    // App a1 allows 3 connections: the 4th is over quota (4004) until one leaves.
    let held: Vec<Pusher> = (0..3).map(|_| connect(&server, "k1")).collect();
    let (err, code) = refused(&server, "/app/k1?protocol=7");
    assert_eq!(
        (err["data"]["code"].as_u64(), code),
        (Some(4004), 4004),
        "{err}"
    );
    connect(&server, "k2");
    drop(held);
    common::wait_for("the quota to free up", || {
        let mut c = Client::connect(&server, "/app/k1?protocol=7");
        c.recv_json()["event"] == "pusher:connection_established"
    });
}

#[test]
fn idle_connections_are_pinged_then_closed_with_4201() {
    let server = Server::start(&[
        ("APPS", APPS),
        ("PUSHER_ACTIVITY_TIMEOUT", "1"),
        ("PUSHER_PONG_TIMEOUT", "1"),
    ]);
    let mut p = connect(&server, "k2");
    // The server pings a silent connection; answering keeps it open.
    let ping = p.c.recv_json();
    assert_eq!(ping["event"], "pusher:ping", "{ping}");
    p.c.send_json(json!({"event":"pusher:pong","data":{}}));
    let ping = p.c.recv_json();
    assert_eq!(ping["event"], "pusher:ping", "{ping}");
    // Not answering this one: closed with 4201.
    let (code, _) = p.c.expect_close();
    assert_eq!(code, 4201);
}

#[test]
fn clients_may_not_send_internal_events_or_client_events_where_not_allowed() {
    let server = Server::start(&[("APPS", APPS)]);
    let mut p = connect(&server, "k1");
    p.subscribe("public-room");
    p.c.send_json(
        json!({"event":"pusher_internal:member_added","channel":"public-room","data":{}}),
    );
    let e = p.c.recv_json();
    assert_eq!(e["event"], "pusher:error", "{e}");
    p.c.send_json(json!({"event":"client-x","channel":"public-room","data":{}}));
    let e = p.c.recv_json();
    assert_eq!(e["event"], "pusher:error", "{e}");
    assert!(
        e["data"]["message"].as_str().unwrap().contains("private"),
        "{e}"
    );
    // App a2 has client events off.
    let mut q = connect(&server, "k2");
    let ch = "private-x";
    let auth = format!("k2:{}", sign("s2", &format!("{}:{ch}", q.socket_id)));
    q.c.send_json(json!({"event":"pusher:subscribe","data":{"channel":ch,"auth":auth}}));
    assert_eq!(
        q.c.recv_json()["event"],
        "pusher_internal:subscription_succeeded"
    );
    q.c.send_json(json!({"event":"client-x","channel":ch,"data":{}}));
    let e = q.c.recv_json();
    assert_eq!(e["event"], "pusher:error", "{e}");
    assert!(
        e["data"]["message"]
            .as_str()
            .unwrap()
            .contains("not enabled"),
        "{e}"
    );
    // Malformed and binary messages get an error; the connection stays.
    q.c.send_text("{not json");
    assert_eq!(q.c.recv_json()["event"], "pusher:error");
    q.c.ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(q.c.recv_json()["event"], "pusher:error");
    assert!(q.sync().is_empty());
}

#[test]
fn socket_id_excludes_its_connection_on_any_core() {
    let server = Server::start(&[("APPS", APPS)]);
    let mut subs: Vec<Pusher> = (0..4).map(|_| connect(&server, "k2")).collect();
    for s in subs.iter_mut() {
        s.subscribe("news");
    }
    // One kept-alive API connection: its requests are handled in order by
    // one core, so each subscriber sees its triggers in order, and the
    // un-excluded "end" trigger proves the excluded one was skipped.
    let mut http = KeepAlive::connect(&server);
    for excluded in 0..subs.len() {
        let body = json!({"name":"e","channel":"news","data":format!("{excluded}"),
                          "socket_id": subs[excluded].socket_id})
        .to_string();
        assert_eq!(http.trigger("a2", "k2", "s2", &body), 200);
        let end = json!({"name":"e","channel":"news","data":format!("end{excluded}")}).to_string();
        assert_eq!(http.trigger("a2", "k2", "s2", &end), 200);
        for (i, s) in subs.iter_mut().enumerate() {
            if i != excluded {
                assert_eq!(s.c.recv_json()["data"], format!("{excluded}"));
            }
            assert_eq!(
                s.c.recv_json()["data"],
                format!("end{excluded}"),
                "socket {i}"
            );
        }
    }
}

/// An HTTP/1.1 connection kept alive across requests.
struct KeepAlive {
    s: std::net::TcpStream,
    addr: std::net::SocketAddr,
}

impl KeepAlive {
    fn connect(server: &Server) -> KeepAlive {
        let s = std::net::TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(common::TIMEOUT)).unwrap();
        KeepAlive {
            s,
            addr: server.addr,
        }
    }

    /// A signed `POST /apps/{id}/events`; returns the status.
    fn trigger(&mut self, id: &str, key: &str, secret: &str, body: &str) -> u16 {
        use md5::Digest;
        let path = format!("/apps/{id}/events");
        let ts = common::unix_now().to_string();
        let md5: String = md5::Md5::digest(body.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let q = format!("auth_key={key}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}");
        let sig = sign(secret, &format!("POST\n{path}\n{q}"));
        self.post(&format!("{path}?{q}&auth_signature={sig}"), body)
    }

    /// A POST on this connection; returns the status.
    fn post(&mut self, target: &str, body: &str) -> u16 {
        use std::io::{BufRead, BufReader, Read, Write};
        let req = format!(
            "POST {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.s.write_all(req.as_bytes()).unwrap();
        let mut r = BufReader::new(&self.s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut len = 0;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        status
    }
}

#[test]
fn apps_and_native_clients_do_not_share_channels() {
    let server = Server::start(&[("APPS", APPS)]);
    let mut a1 = connect(&server, "k1");
    a1.subscribe("news");
    let mut a2 = connect(&server, "k2");
    a2.subscribe("news");
    let mut native = Client::connect(&server, "/ws");
    native.subscribe("news");
    // Everything goes through one kept-alive connection, so each client
    // sees these in order: the message meant for it proves that nothing
    // meant for the others reached it before.
    let mut http = KeepAlive::connect(&server);
    let ev = |data: &str| json!({"name":"e","channel":"news","data":data}).to_string();
    assert_eq!(http.trigger("a1", "k1", "s1", &ev("for a1")), 200);
    assert_eq!(http.trigger("a2", "k2", "s2", &ev("for a2")), 200);
    let native_msg = json!({"channel":"news","data":"for native"}).to_string();
    assert_eq!(http.post("/publish", &native_msg), 202);
    assert_eq!(a1.c.recv_json()["data"], "for a1");
    assert_eq!(a2.c.recv_json()["data"], "for a2");
    assert_eq!(native.recv_json()["data"], "for native");
    native.publish("news", json!("native"));
    assert_eq!(http.trigger("a1", "k1", "s1", &ev("again a1")), 200);
    assert_eq!(http.trigger("a2", "k2", "s2", &ev("again a2")), 200);
    assert_eq!(a1.c.recv_json()["data"], "again a1");
    assert_eq!(a2.c.recv_json()["data"], "again a2");
    // The channel queries see only the app's own channels.
    let (status, text) = api(&server, "GET", "/apps/a1/channels", "");
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v, json!({"channels":{"news":{}}}));
}

#[test]
fn malformed_apps_exit_with_code_2() {
    for apps in [
        "not json",
        r#"[{"id":"a","key":"k"}]"#,
        r#"[{"id":"a","key":"k","secret":"s"},{"id":"a","key":"k2","secret":"s"}]"#,
        r#"[{"id":"a","key":"k","secret":"s","typo":1}]"#,
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .env_clear()
            .env("PORT", "0")
            .env("APPS", apps)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "APPS={apps}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("APPS"), "{err}");
    }
}

#[path = "common/webhook.rs"]
mod webhook;

#[test]
fn webhooks_are_retried_after_5xx() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // The receiver fails the first two attempts.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let hook = webhook::Webhook::start(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) < 2 {
            webhook::Reply::status(503)
        } else {
            webhook::Reply::allow()
        }
    });
    let apps = json!([{"id":"w","key":"kw","secret":"sw",
                       "webhooks":[{"url": hook.url(), "events":["channel_occupied"]}]}])
    .to_string();
    let server = Server::start(&[("APPS", &apps)]);
    let mut p = connect(&server, "kw");
    p.subscribe("room");
    let reqs = hook.wait_requests(3);
    // The same batch three times: two refused, the third accepted.
    let bodies: Vec<Value> = reqs.iter().map(|r| r.body.clone()).collect();
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(bodies[1], bodies[2]);
    assert_eq!(
        bodies[2]["events"],
        json!([{"name":"channel_occupied","channel":"room"}])
    );
    let sig = reqs[2].header("x-pusher-signature").unwrap();
    assert_eq!(sig, sign("sw", &reqs[2].raw));
    assert_eq!(reqs[2].header("x-pusher-key"), Some("kw"));
}

#[test]
fn shutdown_asks_pusher_clients_to_reconnect_with_4200() {
    let mut server = Server::start(&[("APPS", APPS)]);
    let mut p = connect(&server, "k2");
    p.subscribe("news");
    let mut native = Client::connect(&server, "/ws");
    native.subscribe("news");
    server.signal(libc::SIGTERM);
    assert_eq!(p.c.expect_close().0, 4200);
    assert_eq!(native.expect_close().0, 1001);
    drop((p, native));
    assert!(server
        .wait_exit(std::time::Duration::from_secs(10))
        .success());
}

#[test]
fn over_max_connections_is_4100_and_oversized_api_data_is_413() {
    let server = Server::start(&[
        ("APPS", APPS),
        ("MAX_CONNECTIONS", "2"),
        ("MAX_MESSAGE_SIZE", "1KiB"),
    ]);
    let _held: Vec<Pusher> = (0..2).map(|_| connect(&server, "k2")).collect();
    let (err, code) = refused(&server, "/app/k2?protocol=7");
    assert_eq!(
        (err["data"]["code"].as_u64(), code),
        (Some(4100), 4100),
        "{err}"
    );
    let big = json!({"name":"e","channel":"news","data":"x".repeat(2000)}).to_string();
    let (status, text) = api(&server, "POST", "/apps/a1/events", &big);
    assert_eq!(status, 413, "{text}");
}

#[test]
fn signin_identifies_a_user_whose_connections_can_be_terminated() {
    let server = Server::start(&[("APPS", APPS)]);
    let mut ann = connect(&server, "k1");
    let user_data = json!({"id":"ann","name":"Ann"}).to_string();
    let sig = sign("s1", &format!("{}::user::{user_data}", ann.socket_id));
    ann.c.send_json(json!({"event":"pusher:signin",
                           "data":{"auth":format!("k1:{sig}"),"user_data":user_data}}));
    let ok = ann.c.recv_json();
    assert_eq!(ok["event"], "pusher:signin_success", "{ok}");
    let data: Value = serde_json::from_str(ok["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["user_data"], user_data);
    let mut other = connect(&server, "k1");
    other.subscribe("news");
    // terminate_connections closes ann's connection (4009), not the other.
    let (status, text) = api(
        &server,
        "POST",
        "/apps/a1/users/ann/terminate_connections",
        "{}",
    );
    assert_eq!(status, 200, "{text}");
    let err = ann.c.recv_json();
    assert_eq!(err["data"]["code"], 4009, "{err}");
    assert_eq!(ann.c.expect_close().0, 4009);
    assert!(other.sync().is_empty());
    // A forged signin is refused with 4009.
    let mut eve = connect(&server, "k1");
    eve.c.send_json(json!({"event":"pusher:signin",
                           "data":{"auth":format!("k1:{sig}"),"user_data":user_data}}));
    let err = eve.c.recv_json();
    assert_eq!(err["data"]["code"], 4009, "{err}");
    assert_eq!(eve.c.expect_close().0, 4009);
}

/// Pusher's 10 KB limit on an event's data is the app's, not
/// MAX_MESSAGE_SIZE: `max_event_payload_in_kb` (default 10) bounds HTTP API
/// triggers (413) and client events (`pusher:error`), whatever the
/// WebSocket message limit.
#[test]
fn the_event_size_limit_is_per_app() {
    let apps = r#"[
      {"id":"a1","key":"k1","secret":"s1","enable_client_messages":true},
      {"id":"a3","key":"k3","secret":"s3","enable_client_messages":true,"max_event_payload_in_kb":20}
    ]"#;
    let server = Server::start(&[("APPS", apps), ("MAX_MESSAGE_SIZE", "64KiB")]);
    let event =
        |kb: usize| json!({"name":"e","channel":"news","data":"x".repeat(kb * 1024)}).to_string();
    // Default app: 10 KiB of data passes, 11 does not.
    assert_eq!(api(&server, "POST", "/apps/a1/events", &event(10)).0, 200);
    let (status, text) = api(&server, "POST", "/apps/a1/events", &event(11));
    assert_eq!(status, 413, "{text}");

    // The app configured for 20 KiB takes 15.
    let a3 = |body: &str| api_as(&server, ("k3", "s3"), "POST", "/apps/a3/events", body).0;
    assert_eq!(a3(&event(15)), 200);
    assert_eq!(a3(&event(21)), 413);

    // A client event over the app's limit is refused; the connection stays.
    let mut p = connect(&server, "k1");
    let channel = "private-big";
    let auth = format!("k1:{}", sign("s1", &format!("{}:{channel}", p.socket_id)));
    p.c.send_json(json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth}}));
    assert_eq!(
        p.c.recv_json()["event"],
        "pusher_internal:subscription_succeeded"
    );
    let big = "y".repeat(11 * 1024);
    p.c.send_json(json!({"event":"client-big","channel":channel,"data":big}));
    let err = p.c.recv_json();
    assert_eq!(err["event"], "pusher:error", "{err}");
    assert!(
        err["data"]["message"].as_str().unwrap().contains("bytes"),
        "{err}"
    );
    assert!(p.sync().is_empty());
}

#[test]
fn cache_channels_replay_their_last_event_or_say_cache_miss() {
    let hook = webhook::Webhook::start(|_| webhook::Reply::allow());
    let apps = json!([{"id":"c","key":"kc","secret":"sc","enable_client_messages":true,
                       "webhooks":[{"url": hook.url(), "events":["cache_miss"]}]}])
    .to_string();
    let server = Server::start(&[("APPS", &apps)]);
    let creds = ("kc", "sc");

    // Nothing cached yet: success, then pusher:cache_miss, and a webhook.
    let mut first = connect(&server, "kc");
    first
        .c
        .send_json(json!({"event":"pusher:subscribe","data":{"channel":"cache-news"}}));
    let r = first.c.recv_json();
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    assert_eq!(
        first.c.recv_json(),
        json!({"event":"pusher:cache_miss","channel":"cache-news"})
    );
    let reqs = hook.wait_requests(1);
    assert_eq!(
        reqs[0].body["events"],
        json!([{"name":"cache_miss","channel":"cache-news"}])
    );

    // Two events; a new subscriber gets the last one, then live ones.
    for n in 1..=2 {
        let body =
            json!({"name":"update","channel":"cache-news","data":format!("v{n}")}).to_string();
        let (status, _) = api_as(&server, creds, "POST", "/apps/c/events", &body);
        assert_eq!(status, 200);
        let e = first.c.recv_json();
        assert_eq!(
            (e["event"].as_str(), e["data"].as_str()),
            (Some("update"), Some(&*format!("v{n}")))
        );
    }
    let mut late = connect(&server, "kc");
    late.c
        .send_json(json!({"event":"pusher:subscribe","data":{"channel":"cache-news"}}));
    let r = late.c.recv_json();
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    let cached = late.c.recv_json();
    assert_eq!(
        (
            cached["event"].as_str(),
            cached["channel"].as_str(),
            cached["data"].as_str()
        ),
        (Some("update"), Some("cache-news"), Some("v2")),
        "{cached}"
    );
    assert!(late.sync().is_empty(), "the last event only, once");

    // A channel that is not a cache channel replays nothing.
    let mut plain = connect(&server, "kc");
    plain.subscribe("news");
    assert!(plain.sync().is_empty());
    assert_eq!(hook.requests().len(), 1, "no other cache_miss");
}
