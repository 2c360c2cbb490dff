//! protocol.md 1.1: channel order, offsets and epochs, recovery on
//! subscribe, reading history (the `history` op and `GET /history`), and
//! idempotent publish, end to end over real sockets with `WORKERS=2`.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{http, token, Client, Server};
use serde_json::{json, Value};

const HISTORY: &str = "news=100/1h,chat:*=1000/1h,live=100000/1h,small=3/1h";

fn server() -> Server {
    server_recovering(50)
}

fn server_recovering(max: usize) -> Server {
    let max = max.to_string();
    Server::start(&[
        ("HISTORY", HISTORY),
        ("HISTORY_RECOVER_MAX", &max),
        ("SEND_QUEUE_LIMIT", "64MiB"),
    ])
}

/// Subscribes (with `since`, if given) and returns the `subscribed` reply.
fn subscribe(c: &mut Client, channel: &str, since: Option<Value>) -> Value {
    let mut req = json!({"op":"subscribe","channel":channel,"id":"s"});
    if let Some(s) = since {
        req["since"] = s;
    }
    c.send_json(req);
    let reply = c.recv_json();
    assert_eq!(reply["op"], "subscribed", "{reply}");
    reply
}

/// Reads until a reply with `id`, returning it and the messages before.
fn until_id(c: &mut Client, id: Value) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let v = c.recv_json();
        if v["id"] == id {
            return (v, before);
        }
        before.push(v);
    }
}

fn publish_acked(c: &mut Client, channel: &str, data: Value, id: &str) -> Value {
    c.send_json(json!({"op":"publish","channel":channel,"data":data,"id":id}));
    let (ack, other) = until_id(c, json!(id));
    assert!(
        other.is_empty(),
        "unexpected frames before the ack: {other:?}"
    );
    assert_eq!(ack["op"], "ack", "{ack}");
    ack
}

#[test]
fn offsets_epochs_and_acks_on_a_channel_with_history() {
    let server = server();
    let mut sub = Client::connect(&server, "/ws");
    let first = subscribe(&mut sub, "news", None);
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty() && epoch.len() <= 64);
    assert_eq!(first["offset"], 0, "no message yet: {first}");
    assert!(first.get("recovered").is_none(), "not asked: {first}");

    let mut publisher = Client::connect(&server, "/ws");
    for i in 1..=3u64 {
        let ack = publish_acked(&mut publisher, "news", json!({"n": i}), &format!("p{i}"));
        assert_eq!(ack, json!({"op":"ack","id":format!("p{i}"),"offset":i}));
    }
    for i in 1..=3u64 {
        assert_eq!(
            sub.recv_json(),
            json!({"op":"message","channel":"news","offset":i,"data":{"n":i}})
        );
    }
    // A later subscriber sees the top; what follows has larger offsets.
    let mut late = Client::connect(&server, "/ws");
    let r = subscribe(&mut late, "news", None);
    assert_eq!(
        (r["epoch"].as_str(), r["offset"].as_u64()),
        (Some(&*epoch), Some(3))
    );

    // HTTP publish replies with epoch and offset.
    let (status, body) = http(
        server.addr,
        "POST",
        "/publish",
        &[],
        br#"{"channel":"news","data":"via http"}"#,
    );
    assert_eq!(status, 202, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body, json!({"ok":true,"epoch":epoch,"offset":4}));
    for c in [&mut sub, &mut late] {
        assert_eq!(
            c.recv_json(),
            json!({"op":"message","channel":"news","offset":4,"data":"via http"})
        );
    }

    // A channel without history is exactly version 1.
    let mut plain = Client::connect(&server, "/ws");
    plain.subscribe("plain");
    publisher.publish("plain", json!(1));
    let frame = plain.recv();
    assert_eq!(
        frame.to_text().unwrap(),
        r#"{"op":"message","channel":"plain","data":1}"#
    );
    let (status, body) = http(
        server.addr,
        "POST",
        "/publish",
        &[],
        br#"{"channel":"plain","data":2}"#,
    );
    assert_eq!((status, body.as_str()), (202, r#"{"ok":true}"#));
}

#[test]
fn recovery_replays_exactly_what_was_missed() {
    let server = server();
    let mut publisher = Client::connect(&server, "/ws");
    let mut watcher = Client::connect(&server, "/ws");
    let epoch = subscribe(&mut watcher, "chat:r", None)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..=5u64 {
        publish_acked(&mut publisher, "chat:r", json!(i), &format!("p{i}"));
    }

    // Missed 3..5 after seeing 2.
    let mut c = Client::connect(&server, "/ws");
    let r = subscribe(&mut c, "chat:r", Some(json!({"epoch":epoch,"offset":2})));
    assert_eq!(
        r,
        json!({"op":"subscribed","channel":"chat:r","id":"s","epoch":epoch,"offset":5,"recovered":true})
    );
    for i in 3..=5u64 {
        assert_eq!(
            c.recv_json(),
            json!({"op":"message","channel":"chat:r","offset":i,"data":i})
        );
    }
    publish_acked(&mut publisher, "chat:r", json!(6), "p6");
    assert_eq!(c.recv_json()["offset"], 6, "then live");

    // Up to date: recovered, nothing replayed.
    let mut d = Client::connect(&server, "/ws");
    let r = subscribe(&mut d, "chat:r", Some(json!({"epoch":epoch,"offset":6})));
    assert_eq!(r["recovered"], true);
    assert!(d.sync().is_empty(), "nothing to replay");

    // Another epoch, an offset from the future, more than HISTORY_RECOVER_MAX
    // (50) missed, or messages no longer kept: recovered:false, no replay.
    for since in [
        json!({"epoch":"not-this-one","offset":1}),
        json!({"epoch":epoch,"offset":99}),
    ] {
        let mut e = Client::connect(&server, "/ws");
        let r = subscribe(&mut e, "chat:r", Some(since.clone()));
        assert_eq!(
            (r["recovered"].as_bool(), r["offset"].as_u64()),
            (Some(false), Some(6)),
            "{since}"
        );
        assert_eq!(r["epoch"], epoch.as_str());
        assert!(e.sync().is_empty(), "no replay for {since}");
    }
    for i in 7..=70u64 {
        publisher.send_json(json!({"op":"publish","channel":"chat:r","data":i}));
    }
    publish_acked(&mut publisher, "chat:r", json!(71), "p71");
    let mut f = Client::connect(&server, "/ws");
    let r = subscribe(&mut f, "chat:r", Some(json!({"epoch":epoch,"offset":6})));
    assert_eq!(r["recovered"], false, "65 missed > 50: {r}");
    let r = subscribe(&mut f, "chat:r", Some(json!({"epoch":epoch,"offset":30})));
    assert_eq!(r["recovered"], true, "41 missed: {r}");
    let replayed: Vec<u64> = (0..41)
        .map(|_| f.recv_json()["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        replayed,
        (31..=71).collect::<Vec<_>>(),
        "a re-subscribe replays, once"
    );
    assert!(f.sync().is_empty());

    let mut s = Client::connect(&server, "/ws");
    let epoch_small = subscribe(&mut s, "small", None)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..=5u64 {
        publish_acked(&mut publisher, "small", json!(i), &format!("s{i}"));
    }
    let mut g = Client::connect(&server, "/ws");
    let r = subscribe(
        &mut g,
        "small",
        Some(json!({"epoch":epoch_small,"offset":1})),
    );
    assert_eq!(
        r["recovered"], false,
        "offset 2 fell out of the 3 kept: {r}"
    );

    // `since` on a channel without history; malformed `since`.
    let mut h = Client::connect(&server, "/ws");
    let r = subscribe(&mut h, "plain", Some(json!({"epoch":"x","offset":1})));
    assert_eq!(
        r,
        json!({"op":"subscribed","channel":"plain","id":"s","recovered":false})
    );
    for bad in [
        json!(5),
        json!({"epoch":"e"}),
        json!({"epoch":1,"offset":1}),
        json!({"epoch":"e","offset":-1}),
        json!({"epoch":"x".repeat(65),"offset":1}),
    ] {
        h.send_json(json!({"op":"subscribe","channel":"news","id":9,"since":bad}));
        let r = h.recv_json();
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str(), r["id"].as_u64()),
            (Some("error"), Some("bad_request"), Some(9)),
            "{bad}: {r}"
        );
    }
}

#[test]
fn history_reads_over_websocket_and_http() {
    let server = Server::with_secret(&[("HISTORY", HISTORY)]);
    let writer = token(json!({"sub":"w","read":["*"],"write":["*"]}));
    let mut c = Client::with_token(&server, &writer);
    let epoch = subscribe(&mut c, "news", None)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..=5u64 {
        publish_acked(&mut c, "news", json!({"i":i}), &format!("p{i}"));
    }
    c.sync();
    c.send_json(json!({"op":"history","channel":"news","id":2,"limit":2}));
    assert_eq!(
        c.recv_json(),
        json!({"op":"history","channel":"news","id":2,"epoch":epoch,"offset":5,
               "messages":[{"offset":4,"data":{"i":4}},{"offset":5,"data":{"i":5}}]})
    );
    c.send_json(json!({"op":"history","channel":"news","id":3,"since":{"epoch":epoch,"offset":3}}));
    let r = c.recv_json();
    assert_eq!(r["messages"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["messages"][0]["offset"], 4);
    c.send_json(json!({"op":"history","channel":"plain","id":4}));
    let r = c.recv_json();
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("not_found")),
        "{r}"
    );

    let auth = format!("Bearer {writer}");
    let (status, body) = http(
        server.addr,
        "GET",
        &format!("/history?channel=news&limit=3&epoch={epoch}&since=1"),
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        body,
        json!({"channel":"news","epoch":epoch,"offset":5,
               "messages":[{"offset":2,"data":{"i":2}},{"offset":3,"data":{"i":3}},{"offset":4,"data":{"i":4}}]})
    );
    let (status, body) = http(
        server.addr,
        "GET",
        "/history?channel=plain",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["code"],
        "not_found"
    );
    let reader_of_other = token(json!({"read":["other"]}));
    let (status, _) = http(
        server.addr,
        "GET",
        "/history?channel=news",
        &[("Authorization", &format!("Bearer {reader_of_other}"))],
        b"",
    );
    assert_eq!(status, 403);
    let (status, _) = http(server.addr, "GET", "/history?channel=news", &[], b"");
    assert_eq!(status, 401);
    let (status, _) = http(
        server.addr,
        "GET",
        "/history?limit=1",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(status, 400);
    let mut no_read = Client::with_token(&server, &reader_of_other);
    no_read.send_json(json!({"op":"history","channel":"news","id":1}));
    assert_eq!(no_read.recv_json()["code"], "forbidden");
}

#[test]
fn a_repeated_idempotency_key_is_acknowledged_as_the_first_and_delivered_once() {
    let server = server();
    let mut sub = Client::connect(&server, "/ws");
    subscribe(&mut sub, "news", None);
    sub.subscribe("plain");
    let mut p = Client::connect(&server, "/ws");
    for attempt in 0..3 {
        p.send_json(json!({"op":"publish","channel":"news","data":"once","id":attempt,"idempotency_key":"k1"}));
        let (ack, _) = until_id(&mut p, json!(attempt));
        assert_eq!(
            ack,
            json!({"op":"ack","id":attempt,"offset":1}),
            "attempt {attempt}"
        );
        p.send_json(
            json!({"op":"publish","channel":"plain","data":"once","id":"x","idempotency_key":"k1"}),
        );
        until_id(&mut p, json!("x"));
    }
    // Over HTTP too, sharing the key space of its channel.
    for _ in 0..2 {
        let (status, body) = http(
            server.addr,
            "POST",
            "/publish",
            &[],
            br#"{"channel":"news","data":"http","idempotency_key":"k2"}"#,
        );
        assert_eq!(status, 202);
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["offset"], 2, "{body}");
    }
    // Three messages, once each; order is kept per channel (the two
    // channels may have different owner cores).
    let got: Vec<Value> = (0..3).map(|_| sub.recv_json()).collect();
    let on =
        |ch: &str| -> Vec<Value> { got.iter().filter(|m| m["channel"] == ch).cloned().collect() };
    assert_eq!(
        on("news"),
        vec![
            json!({"op":"message","channel":"news","offset":1,"data":"once"}),
            json!({"op":"message","channel":"news","offset":2,"data":"http"}),
        ]
    );
    assert_eq!(
        on("plain"),
        vec![json!({"op":"message","channel":"plain","data":"once"})]
    );
    assert!(sub.sync().is_empty(), "nothing delivered twice");
    p.send_json(json!({"op":"publish","channel":"news","data":1,"idempotency_key":"k".repeat(65)}));
    assert_eq!(p.recv_json()["code"], "bad_request");
    p.send_json(json!({"op":"publish","channel":"news","data":1,"idempotency_key":7}));
    assert_eq!(p.recv_json()["code"], "bad_request");
}

/// Opens clients until both workers hold some (seen in /metrics).
fn clients_on_both_workers(server: &Server, n: usize) -> Vec<Client> {
    let mut clients: Vec<Client> = Vec::new();
    loop {
        clients.push(Client::connect(server, "/ws"));
        let total = clients.len() as f64;
        let mut counts = Vec::new();
        common::wait_for("connections counted", || {
            counts = server.per_worker("herald_connections");
            counts.iter().sum::<f64>() == total
        });
        if clients.len() >= n && counts.iter().all(|&c| c > 0.0) {
            return clients;
        }
        assert!(
            clients.len() < 200,
            "all connections on one worker: {counts:?}"
        );
    }
}

#[test]
fn every_subscriber_sees_one_order_whichever_core_publishes() {
    let server = server();
    let mut clients = clients_on_both_workers(&server, 6);
    let mut subs: Vec<Client> = clients.drain(2..).collect();
    for s in subs.iter_mut() {
        s.subscribe("race");
    }
    let publishers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(p, mut c)| {
            std::thread::spawn(move || {
                for i in 0..2000 {
                    c.send_json(json!({"op":"publish","channel":"race","data":[p, i]}));
                }
                c.sync();
                c
            })
        })
        .collect();
    let _publishers: Vec<Client> = publishers.into_iter().map(|h| h.join().unwrap()).collect();
    let mut orders = Vec::new();
    for s in subs.iter_mut() {
        let got: Vec<Value> = (0..4000).map(|_| s.recv_json()["data"].clone()).collect();
        orders.push(got);
    }
    for (k, order) in orders.iter().enumerate().skip(1) {
        let first_diff = order.iter().zip(&orders[0]).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "subscriber {k} saw another order");
    }
    // And each publisher's own order is kept.
    for p in 0..2 {
        let mine: Vec<i64> = orders[0]
            .iter()
            .filter(|v| v[0] == p)
            .map(|v| v[1].as_i64().unwrap())
            .collect();
        assert_eq!(mine, (0..2000).collect::<Vec<_>>());
    }
}

/// Publishes 1, 2, 3, ... on `live` until `stop` (or `max`), in bursts of
/// 16 each waiting for the server to take it, so subscribers keep up
/// whatever the machine. Returns how many were published.
fn publish_until(
    mut publisher: Client,
    stop: Arc<AtomicBool>,
    max: u64,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) && n < max {
            n += 1;
            publisher.send_json(json!({"op":"publish","channel":"live","data":n}));
            if n % 16 == 0 {
                publisher.sync();
            }
        }
        n
    })
}

#[test]
fn resubscribing_under_continuous_publishing_has_no_gap_and_no_duplicate() {
    let server = server_recovering(100_000);
    let mut clients = clients_on_both_workers(&server, 5);
    let publisher = clients.remove(0);
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = publish_until(publisher, stop.clone(), MAX_PUBLISHED);
    const ROUNDS: usize = 1000;
    const MAX_PUBLISHED: u64 = 2_000_000;
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, mut c)| {
            std::thread::spawn(move || {
                let first = subscribe(&mut c, "live", None);
                let epoch = first["epoch"].as_str().unwrap().to_string();
                let mut last = first["offset"].as_u64().unwrap();
                let mut data_at: HashMap<u64, u64> = HashMap::new();
                let mut check = |v: &Value, last: &mut u64| {
                    assert_eq!(v["op"], "message", "client {k}: {v}");
                    let off = v["offset"].as_u64().unwrap();
                    assert_eq!(off, *last + 1, "client {k}: gap or duplicate");
                    *last = off;
                    // The same offset always names the same message.
                    let data = v["data"].as_u64().unwrap();
                    assert_eq!(*data_at.entry(off).or_insert(data), data);
                };
                for round in 0..ROUNDS {
                    // Take a few live messages, leave, resume where we were.
                    for _ in 0..3 {
                        let v =
                            c.next_json(&format!("client {k} round {round}: live after {last}"));
                        check(&v, &mut last);
                    }
                    c.send_json(json!({"op":"unsubscribe","channel":"live","id":"u"}));
                    loop {
                        let v = c.next_json(&format!("client {k} round {round}: unsubscribed"));
                        if v["op"] == "unsubscribed" {
                            break;
                        }
                        check(&v, &mut last);
                    }
                    c.send_json(json!({"op":"subscribe","channel":"live","id":"s",
                                       "since":{"epoch":epoch,"offset":last}}));
                    let v = c.next_json(&format!(
                        "client {k} round {round}: subscribed after {last}"
                    ));
                    assert_eq!(
                        v["op"], "subscribed",
                        "client {k}: nothing may come between unsubscribed and subscribed: {v}"
                    );
                    assert_eq!(v["recovered"], true, "client {k} round {round}: {v}");
                    assert!(v["offset"].as_u64().unwrap() >= last);
                }
                last
            })
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|h| h.join()).collect();
    if results.iter().any(|r| r.is_err()) {
        stop.store(true, Ordering::Relaxed);
        panic!("a subscriber failed; server log:\n{}", server.log());
    }
    let lasts: Vec<u64> = results.into_iter().map(|r| r.unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let published = publishing.join().unwrap();
    eprintln!("published {published} while {ROUNDS} rounds ran on each client");
    assert!(
        published < MAX_PUBLISHED,
        "the publisher ran out before {ROUNDS} rounds ended"
    );
    for last in lasts {
        assert!(last >= (ROUNDS * 3) as u64);
    }
}

#[test]
fn subscribing_again_while_messages_flow_misses_nothing() {
    let server = server_recovering(100_000);
    let mut clients = clients_on_both_workers(&server, 3);
    let publisher = clients.remove(0);
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = publish_until(publisher, stop.clone(), 1_000_000);
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, mut c)| {
            std::thread::spawn(move || {
                let first = subscribe(&mut c, "live", None);
                let mut last = first["offset"].as_u64().unwrap();
                for round in 0..300 {
                    // A plain subscribe again: the subscription stays, and
                    // the reply's offset is the newest one sent before it.
                    c.send_json(json!({"op":"subscribe","channel":"live","id":"again"}));
                    loop {
                        let v = c.next_json(&format!("client {k} round {round}"));
                        if v["op"] == "subscribed" {
                            assert_eq!(v["offset"].as_u64(), Some(last), "client {k}: {v}");
                            break;
                        }
                        let off = v["offset"].as_u64().unwrap();
                        assert_eq!(off, last + 1, "client {k}: gap or duplicate");
                        last = off;
                    }
                    let v = c.next_json(&format!("client {k} round {round}: live"));
                    assert_eq!(v["offset"].as_u64(), Some(last + 1), "client {k}: {v}");
                    last += 1;
                }
            })
        })
        .collect();
    let results: Vec<_> = workers.into_iter().map(|h| h.join()).collect();
    stop.store(true, Ordering::Relaxed);
    publishing.join().unwrap();
    assert!(results.iter().all(|r| r.is_ok()), "a subscriber failed");
}

/// A recovery that the connection's send queue could not take (more than
/// `SEND_QUEUE_LIMIT`) is `recovered:false`, not a replay that closes the
/// client as a slow consumer at every try.
#[test]
fn a_recovery_larger_than_the_send_queue_is_refused_not_a_slow_consumer_close() {
    let server = Server::start(&[("HISTORY", HISTORY), ("SEND_QUEUE_LIMIT", "64KiB")]);
    let mut publisher = Client::connect(&server, "/ws");
    let mut watcher = Client::connect(&server, "/ws");
    let epoch = subscribe(&mut watcher, "news", None)["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    let big = "x".repeat(4000);
    for i in 1..=20u64 {
        publish_acked(
            &mut publisher,
            "news",
            json!(format!("{i}{big}")),
            &format!("p{i}"),
        );
    }
    // 4 missed (16 KB): replayed.
    let mut c = Client::connect(&server, "/ws");
    let r = subscribe(&mut c, "news", Some(json!({"epoch":epoch,"offset":16})));
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(c.sync().len(), 4);
    // 18 missed (72 KB, over 64 KiB): recovered:false, no replay, and the
    // connection stays open for live messages.
    let mut d = Client::connect(&server, "/ws");
    let r = subscribe(&mut d, "news", Some(json!({"epoch":epoch,"offset":2})));
    assert_eq!(r["recovered"], false, "{r}");
    assert!(d.sync().is_empty(), "nothing replayed");
    publish_acked(&mut publisher, "news", json!("live"), "p21");
    assert_eq!(d.recv_json()["data"], "live");
    assert_eq!(server.metric_sum("herald_slow_consumer_closes_total"), 0.0);
}
