//! With WORKERS=2 and subscribers held by both workers (seen in /metrics), a
//! publish reaches every subscriber on every core, in order, each channel's
//! messages reach only that channel's subscribers, and the frames that
//! crossed cores show in herald_cross_core_messages_total.

mod common;

use common::{wait_for, Client, Server};
use serde_json::json;

/// Opens at least `n` connections, more (in steps, bounded) until /metrics
/// shows both workers holding some of them.
fn connect_on_both_workers(server: &Server, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    let mut want = n;
    loop {
        while clients.len() < want {
            clients.push(Client::connect(server, "/ws"));
        }
        let total = clients.len() as f64;
        let mut counts = Vec::new();
        wait_for("herald_connections to count every connection", || {
            counts = server.per_worker("herald_connections");
            counts.iter().sum::<f64>() == total
        });
        if counts.iter().all(|&c| c > 0.0) {
            return clients;
        }
        assert!(
            want < 400,
            "SO_REUSEPORT put all {want} connections on one worker: {counts:?}"
        );
        want += 20;
    }
}

#[test]
fn every_subscriber_on_both_workers_gets_every_message_in_order() {
    let server = Server::open();
    let mut subs = connect_on_both_workers(&server, 40);
    for s in subs.iter_mut() {
        s.subscribe("fanout");
    }
    let mut publisher = Client::connect(&server, "/ws");
    let crossed_before = server.metric_sum("herald_cross_core_messages_total");

    for i in 0..100 {
        publisher.send_json(json!({"op":"publish","channel":"fanout","data":{"n":i},"id":i}));
    }
    for i in 0..100 {
        assert_eq!(publisher.recv_json(), json!({"op":"ack","id":i}));
    }
    for (k, s) in subs.iter_mut().enumerate() {
        for i in 0..100 {
            assert_eq!(
                s.recv_json(),
                json!({"op":"message","channel":"fanout","data":{"n":i}}),
                "subscriber {k}, message {i}"
            );
        }
    }
    // Subscribers sit on both workers, so the core not holding the publisher
    // received each of the 100 frames over the bus: once per publish.
    let mut crossed = 0.0;
    wait_for(
        "herald_cross_core_messages_total to count 100 frames",
        || {
            crossed = server.metric_sum("herald_cross_core_messages_total") - crossed_before;
            crossed >= 100.0
        },
    );
    assert_eq!(
        crossed, 100.0,
        "one cross-core frame per publish and core, not per subscriber"
    );
    for (k, s) in subs.iter_mut().enumerate() {
        assert!(s.sync().is_empty(), "subscriber {k} got extra messages");
    }
    assert!(
        publisher.sync().is_empty(),
        "the publisher got its own messages"
    );
}

#[test]
fn subscribers_of_many_channels_get_only_their_channel() {
    const CHANNELS: usize = 10;
    const PER_CHANNEL: usize = 20;
    let server = Server::open();
    let mut subs = connect_on_both_workers(&server, 40);
    for (k, s) in subs.iter_mut().enumerate() {
        s.subscribe(&format!("ch{}", k % CHANNELS));
    }
    let mut publisher = Client::connect(&server, "/ws");
    let crossed_before = server.metric_sum("herald_cross_core_messages_total");

    // Interleaved over the channels, then an end marker on each.
    for n in 0..PER_CHANNEL {
        for c in 0..CHANNELS {
            publisher
                .send_json(json!({"op":"publish","channel":format!("ch{c}"),"data":{"c":c,"n":n}}));
        }
    }
    for c in 0..CHANNELS {
        publisher.send_json(json!({"op":"publish","channel":format!("ch{c}"),"data":"end"}));
    }
    assert!(
        publisher.sync().is_empty(),
        "the publisher is subscribed to nothing"
    );

    // A message of another channel delivered by mistake would arrive before
    // this subscriber's end marker (one publisher: one FIFO path per core).
    for (k, s) in subs.iter_mut().enumerate() {
        let c = k % CHANNELS;
        for n in 0..PER_CHANNEL {
            assert_eq!(
                s.recv_json(),
                json!({"op":"message","channel":format!("ch{c}"),"data":{"c":c,"n":n}}),
                "subscriber {k} of ch{c}, message {n}"
            );
        }
        assert_eq!(
            s.recv_json(),
            json!({"op":"message","channel":format!("ch{c}"),"data":"end"}),
            "subscriber {k} of ch{c}"
        );
        assert!(s.sync().is_empty(), "subscriber {k} got extra messages");
    }
    wait_for("cross-core deliveries to be counted", || {
        server.metric_sum("herald_cross_core_messages_total") > crossed_before
    });
}
