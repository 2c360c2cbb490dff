//! herald's outgoing HTTP (the authorizer webhook and Pusher webhooks)
//! against servers that behave as real ones do: HTTP/1.0 without
//! keep-alive, idle keep-alive connections closed after a second, answers
//! that arrive after herald gave up, bodies without `Content-Length`,
//! receivers that stall, and TLS. A connection is reused only after a
//! complete answer that allows it, so no check ever reads another's answer.

mod common;
#[path = "common/tls.rs"]
mod tls;
#[path = "common/webhook.rs"]
mod webhook;

use std::time::Duration;

use common::{Client, Server};
use serde_json::{json, Value};
use webhook::{Options, Reply, Webhook};

/// The upgrade's HTTP status (101 when accepted).
fn upgrade(server: &Server, path: &str) -> u16 {
    match Client::try_connect(server.addr, path, &[]) {
        Ok(_) => 101,
        Err(r) => r.status,
    }
}

fn authorizer(hook: &Webhook, extra: &[(&str, &str)]) -> Server {
    let url = hook.url();
    let mut env = vec![("AUTHORIZER_URL", url.as_str()), ("WORKERS", "1")];
    env.extend_from_slice(extra);
    Server::start(&env)
}

#[test]
fn an_http10_authorizer_answers_every_check() {
    let hook = Webhook::start_with(
        Options {
            http10: true,
            ..Options::default()
        },
        |_| Reply::allow(),
    );
    let server = authorizer(&hook, &[]);
    let got: Vec<u16> = (0..5).map(|_| upgrade(&server, "/ws")).collect();
    assert_eq!(got, vec![101; 5]);
    assert_eq!(hook.request_count(), 5);
}

#[test]
fn an_authorizer_closing_idle_connections_answers_every_check() {
    let hook = Webhook::start_with(
        Options {
            idle_close: Some(Duration::from_secs(1)),
            ..Options::default()
        },
        |_| Reply::allow(),
    );
    let server = authorizer(&hook, &[]);
    for round in 1..=3 {
        assert_eq!(upgrade(&server, "/ws"), 101, "round {round}");
        // The receiver closes the connection herald keeps in its pool.
        hook.wait_idle_closes(round);
    }
    assert_eq!(upgrade(&server, "/ws"), 101);
    assert_eq!(
        server
            .metric("herald_authorizer_decisions_total{action=\"connect\",result=\"unavailable\"}"),
        0.0
    );
}

/// A check the authorizer answers only after herald gave up: the late
/// `200` must never be read as the answer to the next check (a `403`).
#[test]
fn a_late_answer_is_never_taken_for_the_next_checks() {
    let hook = Webhook::start(|body: &Value| match body["args"]["query"]["n"].as_str() {
        Some("stall") => Reply::Stall,
        Some("deny") => Reply::status(403),
        _ => Reply::allow(),
    });
    let server = authorizer(&hook, &[("AUTHORIZER_TIMEOUT", "0.3")]);
    // Warm the pool so the stalled check rides a reused connection.
    assert_eq!(upgrade(&server, "/ws?n=ok"), 101);
    for round in 0..5 {
        assert_eq!(upgrade(&server, "/ws?n=stall"), 503, "round {round}");
        // Now the answer arrives, on whatever connection is still open.
        hook.release_with(200, r#"{"read":["*"],"write":["*"]}"#);
        hook.wait_none_held();
        assert_eq!(upgrade(&server, "/ws?n=deny"), 403, "round {round}: mix-up");
        assert_eq!(upgrade(&server, "/ws?n=ok"), 101, "round {round}");
    }
}

#[test]
fn claims_in_a_close_delimited_answer_apply() {
    let hook = Webhook::start_with(
        Options {
            close_delimited: true,
            ..Options::default()
        },
        |_| Reply::allow_with(json!({"read":["allowed"],"write":[],"sub":"ann"})),
    );
    let server = authorizer(&hook, &[]);
    let mut c = Client::connect(&server, "/ws");
    c.subscribe("allowed");
    c.send_json(json!({"op":"subscribe","channel":"other","id":2}));
    let r = c.recv_json();
    assert_eq!(r["code"], "forbidden", "claims ignored: {r}");
}

/// A Pusher connection on `key`, subscribed to `channel`.
fn pusher_subscribe(server: &Server, key: &str, channel: &str) -> Client {
    let mut c = Client::connect(server, &format!("/app/{key}?protocol=7"));
    assert_eq!(c.recv_json()["event"], "pusher:connection_established");
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":channel}}));
    assert_eq!(
        c.recv_json()["event"],
        "pusher_internal:subscription_succeeded"
    );
    c
}

fn events(hook: &Webhook) -> Vec<Value> {
    hook.bodies()
        .iter()
        .flat_map(|b| b["events"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[test]
fn webhooks_are_delivered_after_the_receiver_closes_idle_connections() {
    let hook = Webhook::start_with(
        Options {
            idle_close: Some(Duration::from_secs(1)),
            ..Options::default()
        },
        |_| Reply::allow(),
    );
    let apps = json!([{"id":"w","key":"kw","secret":"sw","webhooks":[{"url": hook.url()}]}]);
    let server = Server::start(&[("APPS", &apps.to_string())]);
    let c = pusher_subscribe(&server, "kw", "room");
    hook.wait_requests(1);
    hook.wait_idle_closes(1);
    drop(c);
    hook.wait_requests(2);
    hook.wait_idle_closes(2);
    let _c = pusher_subscribe(&server, "kw", "room2");
    hook.wait_requests(3);
    let names: Vec<Value> = events(&hook).iter().map(|e| e["name"].clone()).collect();
    assert_eq!(
        names,
        vec!["channel_occupied", "channel_vacated", "channel_occupied"]
    );
    // Counted once herald has read each answer.
    common::wait_for("three delivered batches counted", || {
        server.metric("herald_pusher_webhook_batches_total{app=\"w\",outcome=\"delivered\"}") == 3.0
    });
    assert_eq!(
        server.metric("herald_pusher_webhook_batches_total{app=\"w\",outcome=\"retried\"}"),
        0.0
    );
}

/// App `slow`'s receiver holds every request; app `fast`'s webhooks still
/// arrive at once, not after slow's timeouts and retries.
#[test]
fn a_stalled_receiver_does_not_delay_other_apps() {
    let slow = Webhook::start(|_| Reply::Stall);
    let fast = Webhook::allowing();
    let apps = json!([
        {"id":"slow","key":"ks","secret":"ss","webhooks":[{"url": slow.url()}]},
        {"id":"fast","key":"kf","secret":"sf","webhooks":[{"url": fast.url()}]},
    ]);
    let server = Server::start(&[("APPS", &apps.to_string()), ("AUTHORIZER_TIMEOUT", "5")]);
    let _s = pusher_subscribe(&server, "ks", "a");
    slow.wait_held(1);
    for i in 0..3 {
        let _f = pusher_subscribe(&server, "kf", &format!("b{i}"));
        // Each occupied/vacated pair arrives while slow's first is held.
        fast.wait_requests(i + 1);
    }
    assert_eq!(slow.request_count(), 1, "slow was not retried yet");
    slow.release();
}

#[test]
fn webhooks_reach_an_https_receiver() {
    let ca = tls::TestCa::new();
    let hook = Webhook::start_with(
        Options {
            tls: Some(ca.server.clone()),
            ..Options::default()
        },
        |_| Reply::allow(),
    );
    let url = format!("https://localhost:{}/hook", hook.addr.port());
    let apps = json!([{"id":"t","key":"kt","secret":"st","webhooks":[{"url": url}]}]);
    let ca_file = ca.ca_file.to_string_lossy().to_string();
    let server = Server::start(&[("APPS", &apps.to_string()), ("SSL_CERT_FILE", &ca_file)]);
    let _c = pusher_subscribe(&server, "kt", "secure");
    let reqs = hook.wait_requests(1);
    assert_eq!(
        reqs[0].body["events"],
        json!([{"name":"channel_occupied","channel":"secure"}])
    );
    assert_eq!(reqs[0].path, "/hook");

    // A receiver whose certificate is not trusted gets nothing, and the
    // failures are counted, not only logged.
    let untrusted = Webhook::start_with(
        Options {
            tls: Some(tls::TestCa::new().server),
            ..Options::default()
        },
        |_| Reply::allow(),
    );
    let url = format!("https://localhost:{}/hook", untrusted.addr.port());
    let apps = json!([{"id":"u","key":"ku","secret":"su","webhooks":[{"url": url}]}]);
    let server = Server::start(&[("APPS", &apps.to_string()), ("SSL_CERT_FILE", &ca_file)]);
    let _c = pusher_subscribe(&server, "ku", "secure");
    common::wait_for("a retried batch", || {
        server.metric("herald_pusher_webhook_batches_total{app=\"u\",outcome=\"retried\"}") >= 1.0
    });
    assert_eq!(untrusted.request_count(), 0);
}
