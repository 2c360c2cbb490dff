//! Several herald nodes sharing a real broker (`BROKER_URL`): Redis, or
//! NATS with JetStream, started by the tests on loopback ports of their
//! own. Against both (`over_redis::…`, `over_nats::…`): delivery across
//! nodes, exactly once and in one order; broker subscriptions that follow
//! the nodes' subscribers; idempotent publish across nodes; a broker that
//! dies and comes back; a node cut off from its broker by a partition;
//! Pusher events, presence and webhooks across nodes; a killed node.
//! Against Redis alone, which keeps history: offsets, recovery and
//! catch-up across nodes.

mod common;

#[path = "common/broker.rs"]
mod broker;

use std::collections::HashSet;
use std::time::Duration;

use broker::{Kind, Proxy, Redis, TestBroker};
use common::{free_port, http, wait_for, Client, Server};
use serde_json::{json, Value};

/// Runs each test named against each broker.
macro_rules! over_both {
    ($($name:ident),* $(,)?) => {
        mod over_redis {
            $( #[test] fn $name() { super::$name(super::Kind::Redis) } )*
        }
        mod over_nats {
            $( #[test] fn $name() { super::$name(super::Kind::Nats) } )*
        }
    };
}

over_both!(
    every_publish_reaches_every_node_once_in_one_order,
    broker_subscriptions_follow_the_nodes_subscribers,
    an_idempotency_key_holds_across_nodes,
    nodes_survive_a_broker_that_dies_and_comes_back,
    a_node_cut_off_from_its_broker_says_so_and_comes_back,
    pusher_events_cross_nodes,
    presence_and_occupancy_count_every_node_and_each_webhook_is_sent_once,
    a_killed_node_is_found_within_5_s_and_its_members_leave_once,
    presence_is_rebuilt_after_the_broker_restarts_empty,
);

/// A node of a cluster on `broker` (a `redis://` URL).
/// Returns once the node reaches its broker.
fn node(broker: &str, id: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![("BROKER_URL", broker), ("NODE_ID", id)];
    env.extend_from_slice(extra);
    let server = Server::start(&env);
    wait_for("the node to reach its broker", || health(&server).0 == 200);
    server
}

fn health(server: &Server) -> (u16, Value) {
    let (status, body) = http(server.addr, "GET", "/health", &[], b"");
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn post_publish(server: &Server, body: Value) -> (u16, String) {
    let headers = [("Content-Type", "application/json")];
    http(
        server.addr,
        "POST",
        "/publish",
        &headers,
        body.to_string().as_bytes(),
    )
}

/// Reads `n` message frames; returns their `data`.
fn messages(c: &mut Client, n: usize) -> Vec<Value> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let m = c.next_json(&format!(
            "message {} of {n} (the last: {:?})",
            got.len() + 1,
            got.last()
        ));
        assert_eq!(m["op"], "message", "{m}");
        got.push(m["data"].clone());
    }
    got
}

fn every_publish_reaches_every_node_once_in_one_order(kind: Kind) {
    let redis = kind.start();
    let nodes: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|id| node(&redis.url(), id, &[]))
        .collect();
    // Two subscribers on each node (on either core).
    let mut subs: Vec<Client> = nodes
        .iter()
        .flat_map(|n| [Client::connect(n, "/ws"), Client::connect(n, "/ws")])
        .collect();
    for s in &mut subs {
        s.subscribe("race");
    }
    // Two publishers, on nodes a and b, at once, without waiting for acks.
    const EACH: usize = 300;
    let publishers: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|p| {
            let mut c = Client::connect(&nodes[p], "/ws");
            std::thread::spawn(move || {
                for i in 0..EACH {
                    c.send_json(json!({"op":"publish","channel":"race","data":{"p":p,"i":i}}));
                }
                c.sync();
            })
        })
        .collect();
    for p in publishers {
        p.join().unwrap();
    }
    let orders: Vec<Vec<Value>> = subs.iter_mut().map(|s| messages(s, 2 * EACH)).collect();
    for (n, order) in orders.iter().enumerate() {
        let distinct: HashSet<String> = order.iter().map(|v| v.to_string()).collect();
        assert_eq!(distinct.len(), 2 * EACH, "subscriber {n}: a duplicate");
        for p in 0..2 {
            let mine: Vec<u64> = order
                .iter()
                .filter(|v| v["p"] == p)
                .map(|v| v["i"].as_u64().unwrap())
                .collect();
            assert_eq!(
                mine,
                (0..EACH as u64).collect::<Vec<_>>(),
                "publisher {p}'s order"
            );
        }
        assert_eq!(
            order, &orders[0],
            "subscriber {n} saw another order than subscriber 0"
        );
    }
    // Nothing more arrives: each message once.
    for s in &mut subs {
        assert_eq!(s.sync(), Vec::<Value>::new());
    }
}

fn broker_subscriptions_follow_the_nodes_subscribers(kind: Kind) {
    let redis = kind.start();
    let (a, b, c) = (
        node(&redis.url(), "a", &[]),
        node(&redis.url(), "b", &[]),
        node(&redis.url(), "c", &[]),
    );
    let mut on_a = [Client::connect(&a, "/ws"), Client::connect(&a, "/ws")];
    let mut on_b = Client::connect(&b, "/ws");
    for s in &mut on_a {
        s.subscribe("news");
    }
    on_b.subscribe("news");
    // One broker subscription per node with subscribers; none for c.
    assert_eq!(redis.subscribers("news"), 2);
    // A publish from the node without subscribers (HTTP API) reaches both.
    let (status, body) = post_publish(&c, json!({"channel":"news","data":"from c"}));
    assert_eq!((status, body.as_str()), (202, r#"{"ok":true}"#));
    for s in on_a.iter_mut().chain([&mut on_b]) {
        assert_eq!(messages(s, 1), [json!("from c")]);
    }
    // Node a's first subscriber leaving keeps its broker subscription; the
    // last one leaving drops it.
    on_a[0].send_json(json!({"op":"unsubscribe","channel":"news","id":1}));
    assert_eq!(on_a[0].recv_json()["op"], "unsubscribed");
    assert_eq!(redis.subscribers("news"), 2);
    drop(on_a);
    wait_for("node a to leave herald:news", || {
        redis.subscribers("news") == 1
    });
    let (status, _) = post_publish(&c, json!({"channel":"news","data":"after"}));
    assert_eq!(status, 202);
    assert_eq!(messages(&mut on_b, 1), [json!("after")]);
    // The metrics count the node's broker traffic.
    assert_eq!(c.metric("herald_broker_published_total"), 2.0);
    assert_eq!(c.metric("herald_broker_up"), 1.0);
    assert_eq!(b.metric("herald_broker_subscriptions"), 1.0);
    assert!(b.metric("herald_broker_received_total") >= 2.0);
}

fn an_idempotency_key_holds_across_nodes(kind: Kind) {
    let redis = kind.start();
    let (a, b) = (node(&redis.url(), "a", &[]), node(&redis.url(), "b", &[]));
    let mut sub = Client::connect(&a, "/ws");
    sub.subscribe("orders");
    let body = json!({"channel":"orders","data":"once","idempotency_key":"k-1"});
    for n in [&a, &b, &a] {
        let (status, _) = post_publish(n, body.clone());
        assert_eq!(status, 202);
    }
    // The same key over WebSocket, on node b: acked, not delivered again.
    let mut p = Client::connect(&b, "/ws");
    p.send_json(
        json!({"op":"publish","channel":"orders","data":"once","id":9,"idempotency_key":"k-1"}),
    );
    assert_eq!(p.recv_json(), json!({"op":"ack","id":9}));
    p.send_json(
        json!({"op":"publish","channel":"orders","data":"other","id":10,"idempotency_key":"k-2"}),
    );
    assert_eq!(p.recv_json(), json!({"op":"ack","id":10}));
    assert_eq!(messages(&mut sub, 2), [json!("once"), json!("other")]);
    assert_eq!(sub.sync(), Vec::<Value>::new());
}

fn nodes_survive_a_broker_that_dies_and_comes_back(kind: Kind) {
    let mut redis = kind.start();
    let port = redis.port();
    let (a, b) = (node(&redis.url(), "a", &[]), node(&redis.url(), "b", &[]));
    let mut sub = Client::connect(&a, "/ws");
    sub.subscribe("live");
    let mut publisher = Client::connect(&b, "/ws");
    publisher.publish("live", json!(1));
    assert_eq!(messages(&mut sub, 1), [json!(1)]);

    redis.kill();
    // Both nodes notice, and say why.
    for n in [&a, &b] {
        wait_for("/health to report the broker", || health(n).0 == 503);
        let (_, h) = health(n);
        assert_eq!(h["status"], "broker_unreachable", "{h}");
        assert!(h["reason"].as_str().is_some_and(|r| !r.is_empty()), "{h}");
    }
    assert_eq!(b.metric("herald_broker_up"), 0.0);
    // Publishes and new subscriptions get an error, not a silent drop.
    publisher.send_json(json!({"op":"publish","channel":"live","data":2,"id":"p2"}));
    let e = publisher.recv_json();
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str(), e["id"].as_str()),
        (Some("error"), Some("unavailable"), Some("p2")),
        "{e}"
    );
    let (status, body) = post_publish(&b, json!({"channel":"live","data":3}));
    assert_eq!(status, 503, "{body}");
    let mut late = Client::connect(&b, "/ws");
    late.send_json(json!({"op":"subscribe","channel":"other","id":"s"}));
    let e = late.recv_json();
    assert_eq!(e["code"], "unavailable", "{e}");

    // The broker comes back: the nodes reconnect and subscribe again by
    // themselves, and the old subscriber receives again.
    let _redis = kind.on(port);
    for n in [&a, &b] {
        wait_for("the node to reconnect", || health(n).0 == 200);
    }
    wait_for("node a to subscribe again", || {
        _redis.subscribers("live") == 1
    });
    publisher.publish("live", json!(4));
    assert_eq!(messages(&mut sub, 1), [json!(4)]);
    assert!(a.metric("herald_broker_connects_total") >= 2.0);
    assert!(b.metric("herald_broker_publish_failed_total") >= 2.0);
    assert!(
        a.log().contains("cluster broker unreachable"),
        "{}",
        a.log()
    );
}

fn a_node_cut_off_from_its_broker_says_so_and_comes_back(kind: Kind) {
    let redis = kind.start();
    let proxy = Proxy::start(redis.port());
    // Node a reaches the broker through the proxy, node b directly.
    let (a, b) = (
        node(&proxy.url_for(kind), "a", &[]),
        node(&redis.url(), "b", &[]),
    );
    let mut sub = Client::connect(&a, "/ws");
    sub.subscribe("feed");
    let mut publisher = Client::connect(&b, "/ws");
    publisher.publish("feed", json!("before"));
    assert_eq!(messages(&mut sub, 1), [json!("before")]);

    // Packets dropped, nothing closed: only the pings can tell.
    proxy.freeze();
    let started = std::time::Instant::now();
    // A publish under way when the link is found dead is answered (it may
    // or may not have gone out), not left waiting.
    let (status, _) = post_publish(&a, json!({"channel":"feed","data":"cut"}));
    assert_eq!(status, 503);
    wait_for("node a to find itself cut off", || health(&a).0 == 503);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(health(&b).0, 200, "node b is fine");
    let (status, _) = post_publish(&a, json!({"channel":"feed","data":"lost"}));
    assert_eq!(status, 503);

    proxy.thaw();
    wait_for("node a to reconnect", || health(&a).0 == 200);
    wait_for("node a to subscribe again", || {
        redis.subscribers("feed") == 1
    });
    publisher.publish("feed", json!("after"));
    assert_eq!(messages(&mut sub, 1), [json!("after")]);
    assert_eq!(sub.sync(), Vec::<Value>::new(), "nothing else");
}

fn pusher_events_cross_nodes(kind: Kind) {
    const APPS: &str = r#"[{"id":"a1","key":"k1","secret":"s1"}]"#;
    let redis = kind.start();
    let (a, b) = (
        node(&redis.url(), "a", &[("APPS", APPS)]),
        node(&redis.url(), "b", &[("APPS", APPS)]),
    );
    let mut c = Client::connect(&a, "/app/k1?protocol=7&client=test");
    assert_eq!(c.recv_json()["event"], "pusher:connection_established");
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":"prices"}}));
    let r = c.recv_json();
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
    // Pusher app channels are namespaced on the broker too.
    assert_eq!(redis.subscribers("1#prices"), 1);
    let body = json!({"name":"tick","channel":"prices","data":"{\"p\":1}"}).to_string();
    let (status, reply) = pusher_trigger(&b, &body);
    assert_eq!(status, 200, "{reply}");
    let ev = c.recv_json();
    assert_eq!(
        (
            ev["event"].as_str(),
            ev["channel"].as_str(),
            ev["data"].as_str()
        ),
        (Some("tick"), Some("prices"), Some("{\"p\":1}")),
        "{ev}"
    );
    // A cache channel's last event is the cluster's (over Redis): triggered
    // on node b before anyone subscribed, it greets a subscriber on node a.
    let cached = json!({"name":"state","channel":"cache-room","data":"{\"v\":7}"}).to_string();
    let (status, _) = pusher_trigger(&b, &cached);
    assert_eq!(status, 200);
    let mut d = Client::connect(&a, "/app/k1?protocol=7&client=test");
    assert_eq!(d.recv_json()["event"], "pusher:connection_established");
    d.send_json(json!({"event":"pusher:subscribe","data":{"channel":"cache-room"}}));
    assert_eq!(
        d.recv_json()["event"],
        "pusher_internal:subscription_succeeded"
    );
    let ev = d.recv_json();
    match kind {
        Kind::Redis => assert_eq!(
            (ev["event"].as_str(), ev["data"].as_str()),
            (Some("state"), Some("{\"v\":7}")),
            "{ev}"
        ),
        // NATS keeps no history: nothing is cached, and the client is told.
        Kind::Nats => assert_eq!(ev["event"], "pusher:cache_miss", "{ev}"),
    }
    // An HTTP trigger on node b excludes a socket of node a by its id.
    let mut other = Client::connect(&b, "/app/k1?protocol=7&client=test");
    assert_eq!(other.recv_json()["event"], "pusher:connection_established");
    other.send_json(json!({"event":"pusher:subscribe","data":{"channel":"prices"}}));
    assert_eq!(
        other.recv_json()["event"],
        "pusher_internal:subscription_succeeded"
    );
    let hello_a = pusher(&a);
    let mut excluded = hello_a.c;
    excluded.send_json(json!({"event":"pusher:subscribe","data":{"channel":"prices"}}));
    assert_eq!(
        excluded.recv_json()["event"],
        "pusher_internal:subscription_succeeded"
    );
    // Every node counts every node's subscriptions (c and excluded on
    // node a, other on node b), as of each node's last report.
    for n in [&a, &b] {
        wait_for("every node to count 3 subscriptions of prices", || {
            let path = "/apps/a1/channels/prices?info=subscription_count";
            let (status, body) = pusher_api(n, "GET", path, "");
            assert_eq!(status, 200, "{body}");
            serde_json::from_str::<Value>(&body).unwrap()["subscription_count"] == 3
        });
    }
    let body = json!({"name":"tick","channel":"prices","data":"{}","socket_id":hello_a.socket_id})
        .to_string();
    let (status, _) = pusher_trigger(&b, &body);
    assert_eq!(status, 200);
    assert_eq!(other.recv_json()["event"], "tick");
    assert_eq!(
        c.recv_json()["event"],
        "tick",
        "the other socket on node a gets it"
    );
    excluded.send_json(json!({"event":"pusher:ping","data":{}}));
    assert_eq!(
        excluded.recv_json()["event"],
        "pusher:pong",
        "the excluded socket does not"
    );
    // A native client of the same name is another channel.
    let mut native = Client::connect(&a, "/ws");
    native.subscribe("prices");
    let (status, _) = pusher_trigger(&b, &body);
    assert_eq!(status, 200);
    assert_eq!(c.recv_json()["event"], "tick");
    assert_eq!(native.sync(), Vec::<Value>::new());
}

/// `POST /apps/a1/events`, signed with app a1's secret.
fn pusher_trigger(server: &Server, body: &str) -> (u16, String) {
    pusher_api(server, "POST", "/apps/a1/events", body)
}

#[test]
fn offsets_are_given_once_for_the_whole_cluster() {
    let redis = Redis::start();
    let history = [("HISTORY", "log=10000/1h")];
    let nodes: Vec<Server> = ["a", "b", "c"]
        .iter()
        .map(|id| node(&redis.url(), id, &history))
        .collect();
    let mut sub = Client::connect(&nodes[2], "/ws");
    sub.send_json(json!({"op":"subscribe","channel":"log","id":"s"}));
    let s = sub.recv_json();
    assert_eq!(
        (s["op"].as_str(), s["offset"].as_u64()),
        (Some("subscribed"), Some(0)),
        "{s}"
    );
    let epoch = s["epoch"].as_str().unwrap().to_string();
    // Two publishers on two nodes, acks with offsets.
    const EACH: u64 = 200;
    let publishers: Vec<_> = [0usize, 1]
        .into_iter()
        .map(|p| {
            let mut c = Client::connect(&nodes[p], "/ws");
            std::thread::spawn(move || {
                for i in 0..EACH {
                    c.send_json(
                        json!({"op":"publish","channel":"log","data":{"p":p,"i":i},"id":i}),
                    );
                }
                (0..EACH)
                    .map(|i| {
                        let ack = c.recv_json();
                        assert_eq!(
                            (ack["op"].as_str(), ack["id"].as_u64()),
                            (Some("ack"), Some(i)),
                            "{ack}"
                        );
                        ack["offset"].as_u64().unwrap()
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut offsets: Vec<u64> = publishers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        (1..=2 * EACH).collect::<Vec<_>>(),
        "each offset once"
    );
    // The subscriber sees them in offset order, with the data of the ack.
    for want in 1..=2 * EACH {
        let m = sub.recv_json();
        assert_eq!(m["offset"].as_u64(), Some(want), "{m}");
    }
    // Any node reads the same history.
    for n in &nodes {
        let (status, body) = http(n.addr, "GET", "/history?channel=log&limit=5", &[], b"");
        assert_eq!(status, 200, "{body}");
        let h: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (h["epoch"].as_str(), h["offset"].as_u64()),
            (Some(&*epoch), Some(2 * EACH))
        );
        let got: Vec<u64> = h["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(got, (2 * EACH - 4..=2 * EACH).collect::<Vec<_>>());
    }
    // HTTP publishes get their place too, and a repeated key the first's.
    let body = json!({"channel":"log","data":"h","idempotency_key":"once"});
    let (_, first) = post_publish(&nodes[1], body.clone());
    let (_, again) = post_publish(&nodes[2], body);
    assert_eq!(
        first,
        format!(
            r#"{{"ok":true,"epoch":"{epoch}","offset":{}}}"#,
            2 * EACH + 1
        )
    );
    assert_eq!(again, first);
}

#[test]
fn recovery_on_any_node_misses_nothing_while_publishing_goes_on() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let redis = Redis::start();
    // A client that comes back replays what it missed at once: room for it.
    let history = [
        ("HISTORY", "live=100000/1h"),
        ("HISTORY_RECOVER_MAX", "100000"),
        ("SEND_QUEUE_LIMIT", "64MiB"),
    ];
    let nodes: Arc<Vec<Server>> = Arc::new(
        ["a", "b", "c"]
            .iter()
            .map(|id| node(&redis.url(), id, &history))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = {
        let (stop, mut p) = (stop.clone(), Client::connect(&nodes[0], "/ws"));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
                n += 1;
                p.send_json(json!({"op":"publish","channel":"live","data":n}));
                if n % 16 == 0 {
                    p.sync();
                    // About 2,000 a second: the subscribers, reading a few
                    // at a time, replay what they missed, not a backlog
                    // of minutes.
                    std::thread::sleep(Duration::from_millis(8));
                }
            }
            n
        })
    };
    const ROUNDS: usize = 400;
    let clients: Vec<_> = (0..4)
        .map(|k| {
            let nodes = nodes.clone();
            std::thread::spawn(move || {
                // Nodes b and c, by turns: subscribe, take a few, leave
                // (the node may drop the channel), come back with `since`,
                // sometimes on the other node.
                let mut at = 1 + k % 2;
                let mut c = Client::connect(&nodes[at], "/ws");
                c.send_json(json!({"op":"subscribe","channel":"live","id":"s"}));
                let first = c.next_json("first subscribe");
                assert_eq!(first["op"], "subscribed", "{first}");
                let epoch = first["epoch"].as_str().unwrap().to_string();
                let mut last = first["offset"].as_u64().unwrap();
                let check = |v: &Value, last: &mut u64, round: usize| {
                    assert_eq!(v["op"], "message", "client {k} round {round}: {v}");
                    let off = v["offset"].as_u64().unwrap();
                    assert_eq!(off, *last + 1, "client {k} round {round}: gap or duplicate");
                    assert_eq!(
                        v["data"].as_u64(),
                        Some(off),
                        "offset {off} names message {off}"
                    );
                    *last = off;
                };
                for round in 0..ROUNDS {
                    for _ in 0..3 {
                        let v = c.next_json(&format!("client {k} round {round}: live"));
                        check(&v, &mut last, round);
                    }
                    if round % 5 == 4 {
                        at = 3 - at;
                        c = Client::connect(&nodes[at], "/ws");
                    } else {
                        c.send_json(json!({"op":"unsubscribe","channel":"live","id":"u"}));
                        loop {
                            let v = c.next_json("unsubscribed");
                            if v["op"] == "unsubscribed" {
                                break;
                            }
                            check(&v, &mut last, round);
                        }
                    }
                    c.send_json(json!({"op":"subscribe","channel":"live","id":"s",
                                       "since":{"epoch":epoch,"offset":last}}));
                    let v = c.next_json(&format!("client {k} round {round}: subscribed"));
                    assert_eq!(v["op"], "subscribed", "client {k} round {round}: {v}");
                    assert_eq!(v["recovered"], true, "client {k} round {round}: {v}");
                }
                last
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|h| h.join()).collect();
    stop.store(true, Ordering::Relaxed);
    let published = publishing.join().unwrap();
    for r in results {
        let last =
            r.unwrap_or_else(|_| panic!("a subscriber failed; node logs:\n{}", nodes[1].log()));
        assert!(last >= (ROUNDS * 3) as u64 && last <= published);
    }
}

/// Publishes 1, 2, 3, ... on `channel` through `node` with acks, about
/// 500 a second, retrying what the cluster refused (its broker down)
/// under the same idempotency key (a refused publish may have reached
/// Redis before the link broke), until `stop`. Returns how many were
/// published and how many attempts were refused.
fn publish_acked_until(
    node: &Server,
    channel: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    let mut p = Client::connect(node, "/ws");
    std::thread::spawn(move || {
        let (mut n, mut refused) = (1, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            p.send_json(json!({"op":"publish","channel":channel,"data":n,"id":n,
                               "idempotency_key":n.to_string()}));
            let r = p.recv_json();
            match r["op"].as_str() {
                Some("ack") => n += 1,
                _ => {
                    assert_eq!(r["code"], "unavailable", "{r}");
                    refused += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        (n - 1, refused)
    })
}

#[test]
fn a_node_catches_up_on_what_it_missed_while_cut_off_or_while_redis_restarted() {
    let dir = std::env::temp_dir().join(format!("herald-aof-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let mut redis = Redis::durable(port, &dir);
    let proxy = Proxy::start(port);
    // However long the cut lasts on a loaded machine, what was missed is
    // within what a node catches up on.
    let history = [
        ("HISTORY", "feed=100000/1h"),
        ("HISTORY_RECOVER_MAX", "100000"),
        ("SEND_QUEUE_LIMIT", "64MiB"),
    ];
    // Node a reaches Redis through the proxy; the publisher and a witness
    // are on node b.
    let (a, b) = (
        node(&proxy.url(), "a", &history),
        node(&redis.url(), "b", &history),
    );
    let mut sub = Client::connect(&a, "/ws");
    let mut witness = Client::connect(&b, "/ws");
    for c in [&mut sub, &mut witness] {
        c.send_json(json!({"op":"subscribe","channel":"feed","id":"s"}));
        assert_eq!(c.recv_json()["op"], "subscribed");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publishing = publish_acked_until(&b, "feed", stop.clone());
    let mut seen = messages(&mut witness, 100);
    // Node a is cut off while node b goes on publishing.
    proxy.freeze();
    wait_for("node a to find itself cut off", || health(&a).0 == 503);
    seen.extend(messages(&mut witness, 400));
    proxy.thaw();
    wait_for("node a to reconnect", || health(&a).0 == 200);
    // Then Redis dies and comes back with what it had answered.
    seen.extend(messages(&mut witness, 100));
    redis.kill();
    wait_for("node b to see the broker down", || health(&b).0 == 503);
    let _redis = Redis::durable(port, &dir);
    wait_for("node b to reconnect", || health(&b).0 == 200);
    seen.extend(messages(&mut witness, 100));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (total, refused) = publishing
        .join()
        .unwrap_or_else(|_| panic!("node a:\n{}\nnode b:\n{}", a.log(), b.log()));
    assert!(refused > 0, "the publisher never met the outage");
    // Both subscribers, whose connections never dropped, got every message
    // once, in order: their nodes caught up on what they missed.
    let ranges = |v: &[Value]| {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for x in v.iter().filter_map(Value::as_u64) {
            match out.last_mut() {
                Some((_, e)) if *e + 1 == x => *e = x,
                _ => out.push((x, x)),
            }
        }
        out
    };
    let before = ranges(&seen);
    let logs = || {
        format!(
            "total {total}, witness before the last read {before:?}\nnode a:\n{}\nnode b:\n{}",
            a.log(),
            b.log()
        )
    };
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        seen.extend(messages(&mut witness, total as usize - seen.len()));
        let all: Vec<u64> = (1..=total).collect();
        let seen: Vec<u64> = seen.iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(seen, all, "the witness on node b");
        let mut got = Vec::new();
        while got.len() < total as usize {
            match sub.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    got.push(v["data"].as_u64().unwrap_or(0));
                }
                Ok(_) => continue,
                Err(e) => {
                    let g: Vec<Value> = got.iter().map(|x| json!(x)).collect();
                    panic!(
                        "subscriber on a: {e} after {:?}; a received {} from the broker, sent {:?}",
                        ranges(&g),
                        a.metric("herald_broker_received_total"),
                        a.per_worker("herald_messages_out_total")
                    );
                }
            }
        }
        assert_eq!(got, all, "the subscriber on node a");
    }));
    if checked.is_err() {
        panic!("{}", logs());
    }
    assert_eq!(sub.sync(), Vec::<Value>::new());
    assert_eq!(a.metric("herald_broker_gaps_total"), 0.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn subscribers_whose_missed_messages_are_gone_are_sent_to_recover() {
    let mut redis = Redis::start();
    let port = redis.port;
    let history = [("HISTORY", "feed=1000/1h")];
    let (a, b) = (
        node(&redis.url(), "a", &history),
        node(&redis.url(), "b", &history),
    );
    let mut sub = Client::connect(&a, "/ws");
    sub.send_json(json!({"op":"subscribe","channel":"feed","id":"s"}));
    let s = sub.recv_json();
    let epoch = s["epoch"].as_str().unwrap().to_string();
    let mut p = Client::connect(&b, "/ws");
    p.send_json(json!({"op":"publish","channel":"feed","data":1,"id":1}));
    assert_eq!(p.recv_json()["offset"], 1);
    assert_eq!(messages(&mut sub, 1), [json!(1)]);
    // Redis comes back empty: a new epoch, the history is gone.
    redis.kill();
    wait_for("node a to see the broker down", || health(&a).0 == 503);
    let _redis = Redis::on(port);
    wait_for("node a to reconnect", || health(&a).0 == 200);
    // Node a cannot fill the gap: its subscriber is closed (1001), comes
    // back with `since`, and is told it could not recover.
    let (code, reason) = sub.expect_close();
    assert_eq!(code, 1001, "{reason}");
    assert_eq!(a.metric("herald_broker_gaps_total"), 1.0);
    let mut again = Client::connect(&a, "/ws");
    again.send_json(
        json!({"op":"subscribe","channel":"feed","id":"s","since":{"epoch":epoch,"offset":1}}),
    );
    let r = again.recv_json();
    assert_eq!(
        (r["op"].as_str(), r["recovered"].as_bool()),
        (Some("subscribed"), Some(false)),
        "{r}"
    );
    assert_ne!(r["epoch"].as_str(), Some(&*epoch));
}

#[path = "common/webhook.rs"]
mod webhook;

/// A Pusher connection to app `k1` (secret `s1`) on `node`, with the
/// members it knows of, as pusher-js keeps them.
struct PusherConn {
    c: Client,
    socket_id: String,
    members: std::collections::BTreeSet<String>,
}

fn pusher(node: &Server) -> PusherConn {
    let mut c = Client::connect(node, "/app/k1?protocol=7&client=test");
    let hello = c.recv_json();
    assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    let socket_id = data["socket_id"].as_str().unwrap().to_string();
    PusherConn {
        c,
        socket_id,
        members: Default::default(),
    }
}

impl PusherConn {
    /// Joins presence channel `channel` as `user`; returns the user ids
    /// the success lists.
    fn join(&mut self, channel: &str, user: &str) -> Vec<String> {
        let data = json!({"user_id": user, "user_info": {"name": user}}).to_string();
        let sig = common::hmac_sha256_hex(
            "s1",
            format!("{}:{channel}:{data}", self.socket_id).as_bytes(),
        );
        self.c.send_json(json!({"event":"pusher:subscribe","data":{
            "channel": channel, "auth": format!("k1:{sig}"), "channel_data": data}}));
        let r = self.c.recv_json();
        assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
        let data: Value = serde_json::from_str(r["data"].as_str().unwrap()).unwrap();
        let mut ids: Vec<String> = data["presence"]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        ids.sort();
        self.members = ids.iter().cloned().collect();
        ids
    }

    /// The next `pusher_internal:member_*` event that changes the members
    /// this connection knows: (event, user id). A `member_added` of a
    /// member the success already listed (it joined on another node just
    /// before) is an update, as pusher-js takes it, not a change.
    fn member_event(&mut self) -> (String, String) {
        loop {
            let v = self.c.recv_json();
            let ev = v["event"].as_str().unwrap_or("").to_string();
            if !ev.starts_with("pusher_internal:member_") {
                continue;
            }
            let data: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
            let user = data["user_id"].as_str().unwrap().to_string();
            let changed = match ev.as_str() {
                "pusher_internal:member_added" => self.members.insert(user.clone()),
                _ => self.members.remove(&user),
            };
            if changed {
                return (ev, user);
            }
        }
    }

    fn leave(&mut self, channel: &str) {
        self.c
            .send_json(json!({"event":"pusher:unsubscribe","data":{"channel":channel}}));
    }
}

/// The webhook events received so far, as `name channel [user]`, sorted.
fn hook_events(hook: &webhook::Webhook) -> Vec<String> {
    let mut out: Vec<String> = hook
        .bodies()
        .iter()
        .flat_map(|b| b["events"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            let user = e["user_id"]
                .as_str()
                .map(|u| format!(" {u}"))
                .unwrap_or_default();
            format!(
                "{} {}{user}",
                e["name"].as_str().unwrap(),
                e["channel"].as_str().unwrap()
            )
        })
        .collect();
    out.sort();
    out
}

/// The ids the Pusher API of `node` lists on presence channel `room`.
fn users(node: &Server, room: &str) -> Vec<String> {
    let path = format!("/apps/a1/channels/{room}/users");
    let (status, body) = pusher_api(node, "GET", &path, "");
    assert_eq!(status, 200, "{body}");
    let users: Value = serde_json::from_str(&body).unwrap();
    let mut ids: Vec<String> = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn presence_cluster(redis: &dyn TestBroker, hook: &webhook::Webhook, ids: &[&str]) -> Vec<Server> {
    let apps = json!([{"id":"a1","key":"k1","secret":"s1",
                       "webhooks":[{"url": hook.url()}]}])
    .to_string();
    ids.iter()
        .map(|id| node(&redis.url(), id, &[("APPS", &apps)]))
        .collect()
}

fn presence_and_occupancy_count_every_node_and_each_webhook_is_sent_once(kind: Kind) {
    let redis = kind.start();
    let hook = webhook::Webhook::start(|_| webhook::Reply::allow());
    let nodes = presence_cluster(&*redis, &hook, &["a", "b", "c"]);
    let room = "presence-room";
    let mut u1_a = pusher(&nodes[0]);
    assert_eq!(u1_a.join(room, "u1"), ["u1"]);
    // A change reaches the other nodes within a broker round trip.
    wait_for("node b to count u1", || users(&nodes[1], room) == ["u1"]);
    // u2 on node b sees u1 (from node a); u1 is told of u2.
    let mut u2_b = pusher(&nodes[1]);
    assert_eq!(u2_b.join(room, "u2"), ["u1", "u2"]);
    assert_eq!(
        u1_a.member_event(),
        ("pusher_internal:member_added".into(), "u2".into())
    );
    // u1 again, on node c: no new member.
    let mut u1_c = pusher(&nodes[2]);
    assert_eq!(u1_c.join(room, "u1"), ["u1", "u2"]);
    // Every node's HTTP API counts every node (once each node applied the
    // others' changes: the cluster's state reaches every node within a
    // broker round trip, not at once).
    for n in &nodes {
        wait_for("every node to count u1 and u2", || {
            users(n, room) == ["u1", "u2"]
        });
        let (_, body) = pusher_api(n, "GET", "/apps/a1/channels", "");
        assert!(body.contains("presence-room"), "{body}");
    }
    // u1 leaves node a: still on node c, so no one is told.
    u1_a.leave(room);
    u1_c.leave(room);
    assert_eq!(
        u2_b.member_event(),
        ("pusher_internal:member_removed".into(), "u1".into())
    );
    u2_b.leave(room);
    let want = [
        "channel_occupied presence-room",
        "channel_vacated presence-room",
        "member_added presence-room u1",
        "member_added presence-room u2",
        "member_removed presence-room u1",
        "member_removed presence-room u2",
    ];
    let started = std::time::Instant::now();
    while hook_events(&hook).len() < want.len() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the webhooks: {:?}",
            hook_events(&hook)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Round trips on every node: anything else due would be out by now.
    for n in &nodes {
        let mut c = Client::connect(n, "/ws");
        c.sync();
    }
    assert_eq!(hook_events(&hook), want);
    // terminate_connections asked of node c closes the user's connections
    // on every node (4009), and no one else's.
    let mut u3_a = pusher(&nodes[0]);
    u3_a.join(room, "u3");
    let mut u3_b = pusher(&nodes[1]);
    u3_b.join(room, "u3");
    let mut u4_b = pusher(&nodes[1]);
    u4_b.join(room, "u4");
    let (status, body) = pusher_api(
        &nodes[2],
        "POST",
        "/apps/a1/users/u3/terminate_connections",
        "{}",
    );
    assert_eq!(status, 200, "{body}");
    for c in [&mut u3_a, &mut u3_b] {
        assert_eq!(c.c.expect_close().0, 4009);
    }
    assert_eq!(
        u4_b.member_event(),
        ("pusher_internal:member_removed".into(), "u3".into())
    );
}

fn presence_is_rebuilt_after_the_broker_restarts_empty(kind: Kind) {
    let mut broker = kind.start();
    let port = broker.port();
    let hook = webhook::Webhook::start(|_| webhook::Reply::allow());
    let nodes = presence_cluster(&*broker, &hook, &["a", "b"]);
    let room = "presence-lobby";
    let mut u1_a = pusher(&nodes[0]);
    assert_eq!(u1_a.join(room, "u1"), ["u1"]);
    wait_for("node b to count u1", || users(&nodes[1], room) == ["u1"]);
    // The broker comes back without anything it held: each node says
    // again what it holds, and the others count it again.
    broker.kill();
    for n in &nodes {
        wait_for("the node to find the broker gone", || health(n).0 == 503);
    }
    let _broker = kind.on(port);
    for n in &nodes {
        let started = std::time::Instant::now();
        while health(n).0 != 200 {
            assert!(
                // Backoff is at most 5 s (plus a quarter), a connection
                // attempt at most 4 s.
                started.elapsed() < Duration::from_secs(20),
                "the node did not reconnect: {:?}\n{}",
                health(n),
                n.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    wait_for("node b to count u1 again", || {
        users(&nodes[1], room) == ["u1"]
    });
    let mut u2_b = pusher(&nodes[1]);
    assert_eq!(u2_b.join(room, "u2"), ["u1", "u2"]);
    assert_eq!(
        u1_a.member_event(),
        ("pusher_internal:member_added".into(), "u2".into())
    );
}

fn a_killed_node_is_found_within_5_s_and_its_members_leave_once(kind: Kind) {
    let redis = kind.start();
    let hook = webhook::Webhook::start(|_| webhook::Reply::allow());
    let nodes = presence_cluster(&*redis, &hook, &["a", "b", "c"]);
    let room = "presence-room";
    let mut gone = pusher(&nodes[0]);
    gone.join(room, "u1");
    let mut stays = pusher(&nodes[1]);
    assert_eq!(stays.join(room, "u2"), ["u1", "u2"]);
    let mut solo = pusher(&nodes[0]);
    solo.c
        .send_json(json!({"event":"pusher:subscribe","data":{"channel":"only-on-a"}}));
    assert_eq!(
        solo.c.recv_json()["event"],
        "pusher_internal:subscription_succeeded"
    );
    wait_for("the first webhooks", || hook_events(&hook).len() >= 4);
    // kill -9: no goodbye.
    let started = std::time::Instant::now();
    nodes[0].signal(libc::SIGKILL);
    assert_eq!(
        stays.member_event(),
        ("pusher_internal:member_removed".into(), "u1".into())
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "found after {took:?}");
    let want = [
        "channel_occupied only-on-a",
        "channel_occupied presence-room",
        "channel_vacated only-on-a",
        "member_added presence-room u1",
        "member_added presence-room u2",
        "member_removed presence-room u1",
    ];
    wait_for("the webhooks", || hook_events(&hook).len() >= want.len());
    for n in &nodes[1..] {
        Client::connect(n, "/ws").sync();
    }
    assert_eq!(
        hook_events(&hook),
        want,
        "each once, and no vacated while u2 remains"
    );
    drop(gone);
}

/// A signed Pusher HTTP API request of app a1.
fn pusher_api(server: &Server, method: &str, path: &str, body: &str) -> (u16, String) {
    use md5::Digest;
    let ts = common::unix_now().to_string();
    let md5: String = md5::Md5::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // Query parameters of `path` are signed with the others, sorted.
    let (path, extra) = path.split_once('?').unwrap_or((path, ""));
    let mut params: Vec<String> = vec![
        "auth_key=k1".into(),
        format!("auth_timestamp={ts}"),
        "auth_version=1.0".into(),
        format!("body_md5={md5}"),
    ];
    params.extend(extra.split('&').filter(|p| !p.is_empty()).map(String::from));
    params.sort();
    let q = params.join("&");
    let sig = common::hmac_sha256_hex("s1", format!("{method}\n{path}\n{q}").as_bytes());
    http(
        server.addr,
        method,
        &format!("{path}?{q}&auth_signature={sig}"),
        &[],
        body.as_bytes(),
    )
}

/// Durable subscriptions are kept by each node: in a cluster the APIs
/// refuse them, clearly, and so do personal channels (rather than serve
/// a user only what one node saw).
#[test]
fn personal_channels_are_refused_in_a_cluster() {
    let redis = Redis::start();
    let apps = r#"[{"id":"a1","key":"k1","secret":"s1"}]"#;
    let a = node(&redis.url(), "a", &[("APPS", apps)]);
    let body = json!({"user_id": "u1", "channel": "news"}).to_string();
    let (status, text) = pusher_api(&a, "POST", "/apps/a1/subscribe", &body);
    assert_eq!(status, 501, "{text}");
    assert!(text.contains("not available in a cluster"), "{text}");
    let (status, text) = http(a.addr, "POST", "/subscribe", &[], body.as_bytes());
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("not available in a cluster"), "{text}");
    let mut p = pusher(&a);
    let sig = common::hmac_sha256_hex("s1", format!("{}:personal-u1", p.socket_id).as_bytes());
    p.c.send_json(json!({"event":"pusher:subscribe",
        "data":{"channel":"personal-u1","auth":format!("k1:{sig}")}}));
    let r = p.c.recv_json();
    assert_eq!(r["event"], "pusher:subscription_error", "{r}");
    assert_eq!(r["data"]["status"], 501, "{r}");
}

/// In a cluster too, a recovery larger than the connection's send queue
/// is `recovered:false`, not a replay that closes the client as a slow
/// consumer at every try.
#[test]
fn a_recovery_larger_than_the_send_queue_is_refused_in_a_cluster_too() {
    let redis = Redis::start();
    let env = [("HISTORY", "news=1000/1h"), ("SEND_QUEUE_LIMIT", "64KiB")];
    let a = node(&redis.url(), "a", &env);
    let b = node(&redis.url(), "b", &env);
    let big = "x".repeat(4000);
    let mut epoch = String::new();
    for i in 1..=20 {
        let (status, text) =
            post_publish(&a, json!({"channel": "news", "data": format!("{i}{big}")}));
        assert!(status < 300, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        epoch = v["epoch"].as_str().unwrap().to_string();
    }
    let subscribe = |since: u64| {
        let mut c = Client::connect(&b, "/ws");
        c.send_json(json!({"op":"subscribe","channel":"news","id":"s",
                           "since":{"epoch": epoch, "offset": since}}));
        let r = c.next_json("subscribed");
        (c, r)
    };
    let (mut c, r) = subscribe(16);
    assert_eq!(r["recovered"], true, "4 missed (16 KB): {r}");
    assert_eq!(c.sync().len(), 4);
    let (mut d, r) = subscribe(2);
    assert_eq!(r["recovered"], false, "18 missed (72 KB, over 64 KiB): {r}");
    assert!(d.sync().is_empty());
}
