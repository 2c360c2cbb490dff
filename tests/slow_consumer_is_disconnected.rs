//! protocol.md close code 4008: a subscriber that stops reading is
//! disconnected once its unsent output passes SEND_QUEUE_LIMIT (close 4008,
//! or a cut TCP connection when not even the close frame can be written),
//! while a healthy subscriber of the same channel gets every message in
//! order and the server stays healthy.

mod common;

use std::time::{Duration, Instant};

use common::{
    http, read_until_closed_or_cut, small_window_client, wait_for, Client, Server, TIMEOUT,
};
use serde_json::{json, Value};

const BATCH: usize = 20;
/// Bytes of one message frame: 4 bytes of header, about 1064 of JSON.
const FRAME: usize = 1068;

fn message(n: usize, pad: &str) -> Value {
    json!({"op":"message","channel":"firehose","data":{"n":n,"pad":pad}})
}

/// Publishes `messages` messages of about 1 KiB to a non-reading and a
/// healthy subscriber with SEND_QUEUE_LIMIT=64KiB, then checks both ends.
/// Returns how many messages the slow subscriber could read afterwards.
fn slow_consumer_run(messages: usize) -> usize {
    let server = Server::start(&[("SEND_QUEUE_LIMIT", "64KiB"), ("CLOSE_TIMEOUT", "1")]);
    let pad = "x".repeat(1000);

    let mut slow = small_window_client(&server);
    slow.subscribe("firehose");
    let mut healthy = Client::connect(&server, "/ws");
    healthy.subscribe("firehose");
    let mut publisher = Client::connect(&server, "/ws");

    // About 2 MB in batches: acks pace the publisher, and the healthy
    // subscriber reads each batch before the next one is sent.
    for batch in 0..messages / BATCH {
        for n in batch * BATCH..(batch + 1) * BATCH {
            publisher.send_json(json!({
                "op":"publish","channel":"firehose","data":{"n":n,"pad":pad},"id":n
            }));
        }
        for n in batch * BATCH..(batch + 1) * BATCH {
            assert_eq!(publisher.recv_json(), json!({"op":"ack","id":n}));
        }
        for n in batch * BATCH..(batch + 1) * BATCH {
            let got = healthy.recv_json();
            assert!(
                got == message(n, &pad),
                "healthy subscriber, message {n}: got {}",
                got.to_string().chars().take(200).collect::<String>()
            );
        }
    }
    assert!(healthy.sync().is_empty(), "healthy subscriber got extras");

    let start = Instant::now();
    while server.metric_sum("herald_slow_consumer_closes_total") == 0.0 {
        assert!(
            start.elapsed() < TIMEOUT,
            "{messages} messages of 1 KiB (about {} KiB; SEND_QUEUE_LIMIT=64KiB) were published to a \
             subscriber that never reads, yet herald_slow_consumer_closes_total stays 0",
            messages * FRAME / 1024
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The slow client now reads: a prefix of the messages, in order, then
    // close 4008 or the end of the TCP connection.
    let mut received = 0;
    let end = read_until_closed_or_cut(&mut slow, 4008, |t| {
        let v: Value = serde_json::from_str(t).expect("JSON");
        assert!(
            v == message(received, &pad),
            "slow subscriber, message {received}: got {}",
            t.chars().take(200).collect::<String>()
        );
        received += 1;
    });
    eprintln!("slow subscriber: {received} messages, then {end}");
    assert!(
        received < messages,
        "the slow subscriber got all {messages} messages ({end}): it was never limited"
    );

    // The server stays healthy.
    let (status, body) = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "{body}");
    let mut a = Client::connect(&server, "/ws");
    let mut b = Client::connect(&server, "/ws");
    b.subscribe("after");
    a.publish("after", json!("still alive"));
    assert_eq!(
        b.recv_json(),
        json!({"op":"message","channel":"after","data":"still alive"})
    );
    healthy.publish("firehose", json!("healthy is still connected"));
    publisher.sync();
    // The slow connection is gone; the other four remain.
    wait_for("herald_connections to drop the slow connection", || {
        server.metric_sum("herald_connections") == 4.0
    });
    received
}

#[test]
fn slow_consumer_is_closed_with_4008_and_others_get_everything() {
    // 8 MB: well past what the kernel buffers of the connection can hold.
    slow_consumer_run(8000);
}

#[test]
fn slow_consumer_output_is_bounded_near_send_queue_limit() {
    // What the slow subscriber can still read after the disconnect was its
    // unsent output (in herald or in the kernel's buffers of the connection)
    // when it happened; with a 64 KiB limit, 1 MiB of it is 16 times over.
    let received = slow_consumer_run(8000);
    let unsent = received * FRAME;
    assert!(
        unsent <= 1 << 20,
        "SEND_QUEUE_LIMIT=64KiB, yet the non-reading subscriber still had {received} messages \
         (about {} KiB) of unsent output when it was disconnected",
        unsent / 1024
    );
}
