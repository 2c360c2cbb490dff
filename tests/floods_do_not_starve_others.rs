//! Floods stay contained: 20,000 pipelined subscribe/unsubscribe requests
//! are all answered in order while other clients' publishes keep flowing; a
//! client that floods pings without reading is disconnected (4008 or cut)
//! once its unsent replies pass SEND_QUEUE_LIMIT, others unaffected; and
//! MAX_SUBSCRIPTIONS refuses the 101st channel with `forbidden` while the
//! connection stays usable.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{http, read_until_closed_or_cut, small_window_client, Client, Server, TIMEOUT};
use serde_json::{json, Value};
use tungstenite::Message;

/// The id of the n-th flood ping (20 bytes).
fn ping_id(n: u64) -> String {
    format!("{n:0>20}")
}

/// Bytes of one pong frame of the flood: `{"op":"pong","id":"<20>"}`.
const PONG_FRAME: u64 = 2 + 41;

/// Pings per chunk: their pongs (about 13 KB) stay under the 16 KiB limit,
/// so only pongs left unread pile up, not one burst.
const CHUNK: u64 = 300;

/// One publish from `publisher` reaches `subscriber` (subscribed to "rt").
fn round_trip(publisher: &mut Client, subscriber: &mut Client, n: u64) {
    publisher.publish("rt", json!({"rt": n}));
    assert_eq!(
        subscriber.recv_json(),
        json!({"op":"message","channel":"rt","data":{"rt":n}}),
        "round trip {n}"
    );
}

/// The i-th request of the subscribe/unsubscribe flood and its reply:
/// blocks of 3000 channels, alternately subscribed and unsubscribed.
fn flood_request(i: u64) -> (Value, Value) {
    let channel = format!("f{}", i % 3000);
    let op = if (i / 3000) % 2 == 0 {
        "subscribe"
    } else {
        "unsubscribe"
    };
    let reply = if op == "subscribe" {
        "subscribed"
    } else {
        "unsubscribed"
    };
    (
        json!({"op":op,"channel":channel,"id":i}),
        json!({"op":reply,"channel":channel,"id":i}),
    )
}

#[test]
fn subscribe_unsubscribe_flood_is_answered_in_order_while_others_publish() {
    const REQUESTS: u64 = 20_000;
    // The ~1 MB of replies stays unread until the flood is written: a limit
    // above that keeps this client within its rights.
    let server = Server::start(&[("SEND_QUEUE_LIMIT", "4MiB")]);
    let mut flooder = Client::connect(&server, "/ws");
    let mut subscriber = Client::connect(&server, "/ws");
    subscriber.subscribe("rt");
    let mut publisher = Client::connect(&server, "/ws");

    let written = AtomicBool::new(false);
    let mut trips = 0;
    std::thread::scope(|s| {
        let flood = s.spawn(|| {
            for i in 0..REQUESTS {
                let (req, _) = flood_request(i);
                flooder
                    .ws
                    .write(Message::text(req.to_string()))
                    .expect("write");
                if i % 500 == 499 {
                    flooder.ws.flush().expect("flush");
                }
            }
            flooder.ws.flush().expect("flush");
            written.store(true, Ordering::Release);
        });
        // Meanwhile, other clients' publishes keep being delivered.
        while !written.load(Ordering::Acquire) {
            round_trip(&mut publisher, &mut subscriber, trips);
            trips += 1;
        }
        flood.join().expect("flood thread");
    });
    // And still while ~1 MB of replies waits for the flooder to read.
    round_trip(&mut publisher, &mut subscriber, trips);

    for i in 0..REQUESTS {
        let (_, want) = flood_request(i);
        let got = flooder.recv_json();
        assert_eq!(got, want, "reply {i} of {REQUESTS}");
    }
    assert!(flooder.sync().is_empty(), "extra replies after the flood");

    // The flood ended subscribed to f0..f1999 (last block: subscribe
    // 18000..20000), unsubscribed from f2000..f2999. A delivery on f2500
    // would arrive before the one on f10 (same publisher, same path).
    publisher.publish("f2500", json!("not subscribed"));
    publisher.publish("f10", json!("subscribed"));
    assert_eq!(
        flooder.recv_json(),
        json!({"op":"message","channel":"f10","data":"subscribed"})
    );
    round_trip(&mut publisher, &mut subscriber, u64::MAX);
}

/// Floods pings from a non-reading client with SEND_QUEUE_LIMIT=16KiB until
/// herald disconnects it, checking other clients between chunks and after.
/// Returns the pings sent and the pongs the flooder could read afterwards.
fn ping_flood() -> (u64, u64) {
    let server = Server::start(&[("SEND_QUEUE_LIMIT", "16KiB"), ("CLOSE_TIMEOUT", "1")]);
    let mut subscriber = Client::connect(&server, "/ws");
    subscriber.subscribe("rt");
    let mut publisher = Client::connect(&server, "/ws");
    let mut flooder = small_window_client(&server);

    // Pings in chunks, never reading, until herald gives up on the
    // flooder; between chunks the other clients must still get through.
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut trips = 0;
    'flood: loop {
        for _ in 0..CHUNK {
            let ping = json!({"op":"ping","id":ping_id(sent)}).to_string();
            if flooder.ws.write(Message::text(ping)).is_err() {
                break 'flood;
            }
            sent += 1;
        }
        if flooder.ws.flush().is_err() {
            break;
        }
        round_trip(&mut publisher, &mut subscriber, trips);
        trips += 1;
        if server.metric_sum("herald_slow_consumer_closes_total") > 0.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{sent} pings (about {} KiB of unread pongs, SEND_QUEUE_LIMIT=16KiB) and the \
             flooder is still connected",
            sent * PONG_FRAME / 1024
        );
    }
    let start = Instant::now();
    while server.metric_sum("herald_slow_consumer_closes_total") == 0.0 {
        assert!(
            start.elapsed() < TIMEOUT,
            "the ping flooder's writes failed, yet no slow-consumer close was counted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    round_trip(&mut publisher, &mut subscriber, trips);

    // The flooder reads: pongs in order, then close 4008 or a cut.
    let mut received: u64 = 0;
    let end = read_until_closed_or_cut(&mut flooder, 4008, |t| {
        let v: Value = serde_json::from_str(t).expect("JSON");
        assert_eq!(v, json!({"op":"pong","id":ping_id(received)}));
        received += 1;
    });
    eprintln!("ping flooder: sent {sent} pings, read {received} pongs, then {end}");
    assert!(received < sent, "every pong was delivered ({end})");
    let pongs = (received, end);

    let (status, body) = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "{body}");
    round_trip(&mut publisher, &mut subscriber, trips + 1);
    let mut fresh = Client::connect(&server, "/ws");
    fresh.subscribe("rt");
    publisher.publish("rt", json!("fresh"));
    assert_eq!(
        fresh.recv_json(),
        json!({"op":"message","channel":"rt","data":"fresh"})
    );
    (sent, pongs.0)
}

#[test]
fn ping_flood_without_reading_is_disconnected_and_others_keep_working() {
    ping_flood();
}

#[test]
fn ping_flood_is_disconnected_near_send_queue_limit() {
    // What the flooder can still read
    // after the disconnect was unsent output when it happened; with a
    // 16 KiB limit, 1 MiB of it is already 64 times the limit.
    let (sent, received) = ping_flood();
    let unsent = received * PONG_FRAME;
    assert!(
        unsent <= 1 << 20,
        "SEND_QUEUE_LIMIT=16KiB, yet the flooder was disconnected only after {sent} pings, \
         with {received} pongs (about {} KiB) still unsent to it",
        unsent / 1024
    );
}

#[test]
fn subscription_limit_refuses_the_101st_channel_and_keeps_the_connection() {
    let server = Server::start(&[("MAX_SUBSCRIPTIONS", "100")]);
    let mut c = Client::connect(&server, "/ws");
    let mut publisher = Client::connect(&server, "/ws");
    for i in 0..100 {
        c.send_json(json!({"op":"subscribe","channel":format!("s{i}"),"id":i}));
    }
    for i in 0..100 {
        assert_eq!(
            c.recv_json(),
            json!({"op":"subscribed","channel":format!("s{i}"),"id":i})
        );
    }
    c.send_json(json!({"op":"subscribe","channel":"s100","id":100}));
    let refused = c.recv_json();
    assert_eq!(refused["op"], "error", "{refused}");
    assert_eq!(refused["code"], "forbidden", "{refused}");
    assert_eq!(refused["id"], 100, "{refused}");
    assert!(refused["message"].is_string(), "{refused}");

    // The connection stays usable: ping, a repeat subscribe, publishes.
    assert!(c.sync().is_empty());
    c.send_json(json!({"op":"subscribe","channel":"s5","id":"again"}));
    assert_eq!(
        c.recv_json(),
        json!({"op":"subscribed","channel":"s5","id":"again"})
    );
    publisher.publish("s100", json!("refused channel"));
    publisher.publish("s99", json!("kept channel"));
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"s99","data":"kept channel"})
    );
    // Freeing a slot makes room for the channel refused before.
    c.send_json(json!({"op":"unsubscribe","channel":"s0","id":"u"}));
    assert_eq!(
        c.recv_json(),
        json!({"op":"unsubscribed","channel":"s0","id":"u"})
    );
    c.send_json(json!({"op":"subscribe","channel":"s100","id":"now"}));
    assert_eq!(
        c.recv_json(),
        json!({"op":"subscribed","channel":"s100","id":"now"})
    );
    publisher.publish("s0", json!("no longer subscribed"));
    publisher.publish("s100", json!("now subscribed"));
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"s100","data":"now subscribed"})
    );
    assert!(c.sync().is_empty());
}
