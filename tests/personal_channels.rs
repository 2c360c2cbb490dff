//! Pushi's personal channels and messages for offline users (README
//! "Personal channels"), over the Pusher protocol: a user subscribed
//! durably through the HTTP API (`POST /apps/{id}/subscribe`) receives on
//! `personal-{user_id}` what those channels published, including while
//! offline, once each and in order per channel; what the client never
//! acknowledged (the pong of a ping behind it) comes again.

mod common;

use common::*;
use serde_json::{json, Value};

const APPS: &str = r#"[{"id":"a1","key":"k1","secret":"s1"}]"#;

fn api(server: &Server, path: &str, body: Value) -> (u16, String) {
    pusher_api(server.addr, ("k1", "s1"), "POST", path, &body.to_string())
}

fn subscribe(server: &Server, user: &str, channel: &str) {
    let (status, text) = api(
        server,
        "/apps/a1/subscribe",
        json!({"user_id": user, "channel": channel}),
    );
    assert_eq!(status, 200, "{text}");
}

fn trigger(server: &Server, channel: &str, data: &str) {
    let (status, text) = api(
        server,
        "/apps/a1/events",
        json!({"name": "note", "channel": channel, "data": data}),
    );
    assert_eq!(status, 200, "{text}");
}

struct User {
    c: Client,
    socket_id: String,
}

/// A Pusher connection signed in as `user`.
fn sign_in(server: &Server, user: &str) -> User {
    let mut c = Client::connect(server, "/app/k1?protocol=7");
    let hello = c.recv_json();
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap().to_string();
    let user_data = json!({ "id": user }).to_string();
    let sig = hmac_sha256_hex("s1", format!("{socket_id}::user::{user_data}").as_bytes());
    c.send_json(json!({"event":"pusher:signin",
        "data":{"auth":format!("k1:{sig}"),"user_data":user_data}}));
    let ok = c.recv_json();
    assert_eq!(ok["event"], "pusher:signin_success", "{ok}");
    User { c, socket_id }
}

impl User {
    /// Subscribes to `channel`; the answer (success or error).
    fn subscribe(&mut self, channel: &str, auth: Option<String>) -> Value {
        let mut data = json!({ "channel": channel });
        if let Some(a) = auth {
            data["auth"] = a.into();
        }
        self.c
            .send_json(json!({"event":"pusher:subscribe","data":data}));
        self.c.recv_json()
    }

    /// Subscribes to its personal channel; every event before the answer
    /// to a ping after it (what it missed comes before that answer).
    fn follow(&mut self, channel: &str) -> Vec<(String, String)> {
        let r = self.subscribe(channel, None);
        assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
        assert_eq!(r["channel"], channel);
        events(self.sync())
    }

    fn sync(&mut self) -> Vec<Value> {
        pusher_sync(&mut self.c)
    }

    /// Makes sure the server has every acknowledgement of what was read:
    /// the first round trip flushes the pongs tungstenite queued for the
    /// pings read so far (and reads any ping that came behind them); the
    /// second flushes those.
    fn settle(&mut self) -> Vec<(String, String)> {
        let mut got = events(self.sync());
        got.extend(events(self.sync()));
        got
    }
}

/// (channel, data) of each event.
fn events(frames: Vec<Value>) -> Vec<(String, String)> {
    frames
        .into_iter()
        .map(|v| {
            assert_eq!(v["event"], "note", "{v}");
            (
                v["channel"].as_str().unwrap().to_string(),
                v["data"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn ev(channel: &str, data: &str) -> (String, String) {
    (channel.to_string(), data.to_string())
}

#[test]
fn what_was_published_offline_arrives_once_in_order_then_live() {
    let server = Server::start(&[("APPS", APPS), ("PERSONAL_HISTORY", "3/1h")]);
    subscribe(&server, "u1", "news");
    subscribe(&server, "u1", "private-alerts");
    // Published before the subscription: not for the user.
    trigger(&server, "sports", "s1");
    for i in 1..=4 {
        trigger(&server, "news", &format!("n{i}"));
    }
    trigger(&server, "private-alerts", "a1");
    trigger(&server, "sports", "s2");
    let mut u1 = sign_in(&server, "u1");
    let got = u1.follow("personal-u1");
    // PERSONAL_HISTORY keeps the newest 3 of news; each channel in order.
    let news: Vec<_> = got.iter().filter(|e| e.0 == "news").cloned().collect();
    assert_eq!(
        news,
        vec![ev("news", "n2"), ev("news", "n3"), ev("news", "n4")]
    );
    let alerts: Vec<_> = got.iter().filter(|e| e.0 != "news").cloned().collect();
    assert_eq!(alerts, vec![ev("private-alerts", "a1")]);
    // Live, once each.
    trigger(&server, "news", "n5");
    trigger(&server, "sports", "s3");
    trigger(&server, "private-alerts", "a2");
    let mut live = events(vec![u1.c.recv_json(), u1.c.recv_json()]);
    live.extend(u1.settle());
    assert_eq!(live, vec![ev("news", "n5"), ev("private-alerts", "a2")]);
    drop(u1);
    // Read and acknowledged: not again; what came meanwhile: once.
    trigger(&server, "news", "n6");
    let mut again = sign_in(&server, "u1");
    assert_eq!(again.follow("personal-u1"), vec![ev("news", "n6")]);
    assert!(again.settle().is_empty());
    // Subscribing twice answers again and delivers nothing twice.
    assert!(again.follow("personal-u1").is_empty());
    // Other users see nothing of it.
    let mut u2 = sign_in(&server, "u2");
    assert!(u2.follow("personal-u2").is_empty());
}

#[test]
fn what_the_client_did_not_acknowledge_comes_again() {
    let server = Server::start(&[("APPS", APPS)]);
    subscribe(&server, "u1", "news");
    trigger(&server, "news", "n1");
    trigger(&server, "news", "n2");
    // A client that reads the events but vanishes before it answers the
    // ping behind them: nothing it was sent counts as read.
    let mut gone = sign_in(&server, "u1");
    gone.c
        .send_json(json!({"event":"pusher:subscribe","data":{"channel":"personal-u1"}}));
    let read = [gone.c.recv_json(), gone.c.recv_json(), gone.c.recv_json()];
    assert_eq!(read[0]["event"], "pusher_internal:subscription_succeeded");
    assert_eq!(
        events(read[1..].to_vec()),
        vec![ev("news", "n1"), ev("news", "n2")]
    );
    gone.c
        .ws
        .get_mut()
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    drop(gone);
    let mut u1 = sign_in(&server, "u1");
    let got = u1.follow("personal-u1");
    assert_eq!(got, vec![ev("news", "n1"), ev("news", "n2")]);
    u1.settle();
    drop(u1);
    let mut u1 = sign_in(&server, "u1");
    assert!(u1.follow("personal-u1").is_empty());
}

#[test]
fn durable_subscriptions_made_or_ended_while_online_apply_at_once() {
    let server = Server::start(&[("APPS", APPS)]);
    subscribe(&server, "u1", "news");
    let mut u1 = sign_in(&server, "u1");
    assert!(u1.follow("personal-u1").is_empty());
    subscribe(&server, "u1", "weather");
    // The API answered: what is published now reaches the connection.
    trigger(&server, "weather", "w1");
    assert_eq!(events(vec![u1.c.recv_json()]), vec![ev("weather", "w1")]);
    let (status, text) = api(
        &server,
        "/apps/a1/unsubscribe",
        json!({"user_id": "u1", "event": "weather"}),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["unsubscribed"],
        true
    );
    assert_eq!(server.metric("herald_durable_subscriptions"), 1.0);
    trigger(&server, "weather", "w2");
    trigger(&server, "news", "n1");
    let mut got = events(vec![u1.c.recv_json()]);
    got.extend(u1.settle());
    assert_eq!(got, vec![ev("news", "n1")], "weather is no longer followed");
    // Unsubscribing from the personal channel stops the following.
    u1.c.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"personal-u1"}}));
    trigger(&server, "news", "n2");
    assert!(u1.settle().is_empty());
}

#[test]
fn a_channel_subscribed_to_directly_too_is_delivered_once_and_outlives_the_following() {
    let server = Server::start(&[("APPS", APPS)]);
    subscribe(&server, "u1", "news");
    let mut u1 = sign_in(&server, "u1");
    let r = u1.subscribe("news", None);
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    assert!(u1.follow("personal-u1").is_empty());
    trigger(&server, "news", "n1");
    let mut got = events(vec![u1.c.recv_json()]);
    got.extend(u1.settle());
    assert_eq!(
        got,
        vec![ev("news", "n1")],
        "once, not once per subscription"
    );
    // Unsubscribing from news itself keeps the following's subscription.
    u1.c.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"news"}}));
    trigger(&server, "news", "n2");
    assert_eq!(events(vec![u1.c.recv_json()]), vec![ev("news", "n2")]);
    // And the other way round: followed, then subscribed by itself, then
    // the following ends: news stays.
    let r = u1.subscribe("news", None);
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    u1.c.send_json(json!({"event":"pusher:unsubscribe","data":{"channel":"personal-u1"}}));
    trigger(&server, "news", "n3");
    let mut got = events(vec![u1.c.recv_json()]);
    got.extend(u1.settle());
    assert_eq!(got, vec![ev("news", "n3")]);
}

#[test]
fn only_the_user_may_follow_and_the_api_checks_what_it_is_given() {
    let server = Server::start(&[("APPS", APPS), ("PERSONAL_MAX_CHANNELS", "2")]);
    // Not signed in, signed in as someone else.
    let mut c = Client::connect(&server, "/app/k1?protocol=7");
    c.recv_json();
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":"personal-u1"}}));
    let r = c.recv_json();
    assert_eq!(r["event"], "pusher:subscription_error", "{r}");
    assert_eq!(r["data"]["status"], 403, "{r}");
    let mut u2 = sign_in(&server, "u2");
    let r = u2.subscribe("personal-u1", None);
    assert_eq!(r["data"]["status"], 403, "{r}");
    // private-personal-: the app's auth endpoint vouches instead.
    let channel = "private-personal-u1";
    let sig = hmac_sha256_hex("s1", format!("{}:{channel}", u2.socket_id).as_bytes());
    let r = u2.subscribe(channel, Some(format!("k1:{sig}")));
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    subscribe(&server, "u1", "news");
    trigger(&server, "news", "n1");
    assert_eq!(events(vec![u2.c.recv_json()]), vec![ev("news", "n1")]);
    let r = u2.subscribe("private-personal-u3", Some("k1:bad".into()));
    assert_eq!(r["data"]["status"], 401, "{r}");
    // personal-{user} with a channel authorization, as Pushi's clients
    // send it, without a sign-in.
    let mut c = Client::connect(&server, "/app/k1?protocol=7");
    let hello = c.recv_json();
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap();
    let sig = hmac_sha256_hex("s1", format!("{socket_id}:personal-u1").as_bytes());
    c.send_json(json!({"event":"pusher:subscribe",
        "data":{"channel":"personal-u1","auth":format!("k1:{sig}")}}));
    let r = c.recv_json();
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    c.send_json(json!({"event":"pusher:subscribe",
        "data":{"channel":"personal-u4","auth":format!("k1:{sig}")}}));
    let r = c.recv_json();
    assert_eq!(
        r["data"]["status"], 403,
        "a signature for another channel: {r}"
    );
    // The API: bodies, channel kinds, limits, signatures, methods.
    for (body, status) in [
        (json!({"channel": "news"}), 400),
        (json!({"user_id": "u1"}), 400),
        (json!({"user_id": "a b", "channel": "news"}), 400),
        (json!({"user_id": "u1", "channel": "presence-room"}), 400),
        (json!({"user_id": "u1", "channel": "personal-u2"}), 400),
        (json!({"user_id": "u1", "channel": "bad name"}), 400),
        (json!({"user_id": "u1", "channel": "b"}), 200),
        (json!({"user_id": "u1", "channel": "c"}), 409),
    ] {
        let (s, text) = api(&server, "/apps/a1/subscribe", body.clone());
        assert_eq!(s, status, "{body}: {text}");
    }
    let (s, text) = pusher_api(
        server.addr,
        ("k1", "wrong"),
        "POST",
        "/apps/a1/subscribe",
        &json!({"user_id": "u1", "channel": "c"}).to_string(),
    );
    assert_eq!(s, 401, "{text}");
    let (s, text) = pusher_api(server.addr, ("k1", "s1"), "GET", "/apps/a1/subscribe", "");
    assert_eq!(s, 405, "{text}");
    let (s, _) = api(
        &server,
        "/apps/nope/subscribe",
        json!({"user_id": "u1", "channel": "c"}),
    );
    assert_eq!(s, 404);
    // Subscribing again keeps the subscription and its place.
    let (s, text) = api(
        &server,
        "/apps/a1/subscribe",
        json!({"user_id": "u1", "channel": "news"}),
    );
    assert_eq!((s, text.as_str()), (200, r#"{"subscribed":false}"#));
}

#[test]
fn durable_subscriptions_their_cursors_and_messages_survive_a_restart_with_history_dir() {
    let dir = std::env::temp_dir().join(format!("herald-personal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let env = [("APPS", APPS), ("HISTORY_DIR", dir.to_str().unwrap())];
    let mut first = Server::start(&env);
    subscribe(&first, "u1", "news");
    trigger(&first, "news", "n1");
    let mut u1 = sign_in(&first, "u1");
    assert_eq!(u1.follow("personal-u1"), vec![ev("news", "n1")]);
    u1.settle();
    drop(u1);
    trigger(&first, "news", "n2");
    trigger(&first, "news", "n3");
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(TIMEOUT).success());
    let second = Server::start(&env);
    let mut u1 = sign_in(&second, "u1");
    assert_eq!(
        u1.follow("personal-u1"),
        vec![ev("news", "n2"), ev("news", "n3")],
        "what was published offline, from after what was read"
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restart_without_history_dir_hands_the_durable_subscriptions_over() {
    let mut old = Server::start(&[("APPS", APPS), ("DRAIN_SECONDS", "1")]);
    subscribe(&old, "u1", "news");
    trigger(&old, "news", "n1");
    old.signal(libc::SIGUSR2);
    // The old process exits once it has handed everything over and
    // drained (nobody is connected): what answers now is the new one.
    assert!(old.wait_exit(TIMEOUT).success());
    let log = old.log();
    let at = log.find("the new process (").expect("a successor") + "the new process (".len();
    let pid: i32 = log[at..].split(')').next().unwrap().parse().unwrap();
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the pid the log named.
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
            }
        }
    }
    let _successor = Kill(pid);
    trigger(&old, "news", "n2");
    let mut u1 = sign_in(&old, "u1");
    assert_eq!(
        u1.follow("personal-u1"),
        vec![ev("news", "n1"), ev("news", "n2")],
        "the subscription, its place and the history came over"
    );
}

// ---------------------------------------------------------------------------
// herald's own protocol: a token's `sub` is the user.

fn native_api(server: &Server, token: &str, path: &str, body: Value) -> (u16, String) {
    let auth = format!("Bearer {token}");
    http(
        server.addr,
        "POST",
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
}

/// (channel, data) of each message, and whether it carries an offset.
fn native_messages(frames: Vec<Value>) -> Vec<(String, String, bool)> {
    frames
        .into_iter()
        .map(|v| {
            assert_eq!(v["op"], "message", "{v}");
            (
                v["channel"].as_str().unwrap().to_string(),
                v["data"].as_str().unwrap().to_string(),
                v["offset"].is_u64(),
            )
        })
        .collect()
}

/// A native connection of user `sub` that may read `read`, following its
/// personal channel; the messages before the answer to a ping after it.
fn native_follow(
    server: &Server,
    sub: &str,
    read: &[&str],
) -> (Client, Vec<(String, String, bool)>) {
    let t = token(json!({ "sub": sub, "read": read }));
    let mut c = Client::with_token(server, &t);
    let channel = format!("personal-{sub}");
    c.send_json(json!({"op": "subscribe", "channel": channel, "id": "p"}));
    let r = c.recv_json();
    assert_eq!(r["op"], "subscribed", "{r}");
    assert_eq!(r["channel"], channel);
    let got = native_messages(c.sync());
    (c, got)
}

#[test]
fn native_users_follow_their_personal_channel_with_their_token() {
    let server = Server::with_secret(&[("HISTORY", "news=10/1h")]);
    let backend = token(json!({"read": ["*"], "write": ["*"]}));
    let publish = |data: &str, channel: &str| {
        let (s, text) = native_api(
            &server,
            &backend,
            "/publish",
            json!({"channel": channel, "data": data}),
        );
        assert!(s < 300, "{text}");
    };
    // A backend subscribes anyone; a user only itself, to what it may read.
    let (s, text) = native_api(
        &server,
        &backend,
        "/subscribe",
        json!({"user_id": "u1", "channel": "news"}),
    );
    assert_eq!((s, text.as_str()), (200, r#"{"subscribed":true}"#));
    let own = token(json!({"sub": "u1", "read": ["alerts"]}));
    let (s, text) = native_api(
        &server,
        &own,
        "/subscribe",
        json!({"user_id": "u1", "channel": "alerts"}),
    );
    assert_eq!(s, 200, "{text}");
    for (body, status) in [
        (json!({"user_id": "u2", "channel": "alerts"}), 403),
        (json!({"user_id": "u1", "channel": "other"}), 403),
        (json!({"user_id": "u1", "channel": "personal-u2"}), 400),
        (json!({"user_id": "u1"}), 400),
    ] {
        let (s, text) = native_api(&server, &own, "/subscribe", body.clone());
        assert_eq!(s, status, "{body}: {text}");
    }
    let (s, _) = native_api(
        &server,
        "not-a-token",
        "/subscribe",
        json!({"user_id": "u1", "channel": "news"}),
    );
    assert_eq!(s, 401);
    publish("n1", "news");
    publish("a1", "alerts");
    publish("x1", "other");
    let (mut c, got) = native_follow(&server, "u1", &[]);
    // Channels users follow keep history (for news, HISTORY's is longer):
    // their messages show their offset.
    let mut news: Vec<_> = got.iter().filter(|m| m.0 == "news").cloned().collect();
    news.extend(got.iter().filter(|m| m.0 != "news").cloned());
    assert_eq!(
        news,
        vec![
            ("news".into(), "n1".into(), true),
            ("alerts".into(), "a1".into(), true)
        ]
    );
    publish("n2", "news");
    let live = native_messages(vec![c.recv_json()]);
    assert_eq!(live, vec![("news".into(), "n2".into(), true)]);
    c.sync();
    c.sync();
    drop(c);
    let (_, again) = native_follow(&server, "u1", &[]);
    assert!(again.is_empty(), "{again:?}");
    // Someone else's personal channel, or none without a sub.
    let other = token(json!({"sub": "u2", "read": ["*"]}));
    let mut c = Client::with_token(&server, &other);
    c.send_json(json!({"op": "subscribe", "channel": "personal-u1", "id": "p"}));
    let r = c.recv_json();
    assert_eq!(r["code"], "forbidden", "{r}");
}

#[test]
fn past_the_subscription_limit_a_channel_is_left_out_and_said_so() {
    let server = Server::start(&[("APPS", APPS), ("MAX_SUBSCRIPTIONS", "2")]);
    for channel in ["a", "b", "c"] {
        subscribe(&server, "u1", channel);
        trigger(&server, channel, channel);
    }
    let mut u1 = sign_in(&server, "u1");
    u1.c.send_json(json!({"event":"pusher:subscribe","data":{"channel":"personal-u1"}}));
    let r = u1.c.recv_json();
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    let frames = u1.sync();
    // Two of a, b, c fit; the third is refused with a pusher:error.
    let errors: Vec<&Value> = frames
        .iter()
        .filter(|f| f["event"] == "pusher:error")
        .collect();
    let notes: Vec<&Value> = frames.iter().filter(|f| f["event"] == "note").collect();
    assert_eq!((notes.len(), errors.len()), (2, 1), "{frames:?}");
    assert!(
        errors[0]["data"]["message"]
            .as_str()
            .unwrap()
            .contains("subscription limit"),
        "{frames:?}"
    );
    // One user per connection.
    let channel = "private-personal-u2";
    let sig = hmac_sha256_hex("s1", format!("{}:{channel}", u1.socket_id).as_bytes());
    let r = u1.subscribe(channel, Some(format!("k1:{sig}")));
    assert_eq!(r["data"]["status"], 403, "{r}");
    assert!(r["data"]["error"].as_str().unwrap().contains("u1"), "{r}");
}

#[test]
fn a_backlog_larger_than_the_send_queue_arrives_in_pages_without_a_slow_consumer_close() {
    // 120 events of 3 KB missed on two channels (360 KB), for a
    // connection whose send queue holds 64 KiB: all in one go would close
    // it as a slow consumer every time it came back.
    let server = Server::start(&[
        ("APPS", APPS),
        ("SEND_QUEUE_LIMIT", "64KiB"),
        ("PERSONAL_HISTORY", "200/1h"),
    ]);
    subscribe(&server, "u1", "news");
    subscribe(&server, "u1", "weather");
    let big = "x".repeat(3000);
    for i in 0..60 {
        trigger(&server, "news", &format!("n{i:02}{big}"));
        trigger(&server, "weather", &format!("w{i:02}{big}"));
    }
    let mut u1 = sign_in(&server, "u1");
    let r = u1.subscribe("personal-u1", None);
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    // Reading answers the pings behind each page (tungstenite pongs as it
    // reads), which brings the next pages.
    let mut got: Vec<(String, String)> = Vec::new();
    while got.len() < 120 {
        let v = u1.c.recv_json();
        assert_eq!(v["event"], "note", "{v}");
        let data = v["data"].as_str().unwrap();
        got.push((v["channel"].as_str().unwrap().into(), data[..3].into()));
    }
    for (channel, tag) in [("news", "n"), ("weather", "w")] {
        let order: Vec<&str> = got
            .iter()
            .filter(|e| e.0 == channel)
            .map(|e| e.1.as_str())
            .collect();
        let want: Vec<String> = (0..60).map(|i| format!("{tag}{i:02}")).collect();
        assert_eq!(order, want, "{channel}: every one, once, in order");
    }
    // Then live, on the same connection.
    trigger(&server, "news", "live");
    let mut live = events(vec![u1.c.recv_json()]);
    live.extend(u1.settle());
    assert_eq!(live, vec![ev("news", "live")]);
    assert_eq!(server.metric_sum("herald_slow_consumer_closes_total"), 0.0);
    drop(u1);
    let mut again = sign_in(&server, "u1");
    assert!(again.follow("personal-u1").is_empty(), "all of it was read");
}
