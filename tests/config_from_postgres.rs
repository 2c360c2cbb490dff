//! Configuration kept in PostgreSQL (`DATABASE_URL`), against a real
//! server the test starts: wspubsub's API keys from the `apikeys` table
//! (`deploy/database.sql`), changes applied within seconds without a
//! restart (through the trigger's notification, or `DATABASE_REFRESH`),
//! and a database that goes away leaves the keys in force, with the outage
//! in `/health` and the metrics.

mod common;
#[path = "common/postgres.rs"]
mod postgres_server;
#[path = "common/tls.rs"]
mod tls;

use common::*;
use postgres_server::Postgres;
use serde_json::Value;
use tungstenite::Message;

const SCHEMA: &str = include_str!("../deploy/database.sql");

fn allowed(server: &Server, key: &str) -> bool {
    Client::try_connect(server.addr, &format!("/ws/pub/{key}/test/room"), &[]).is_ok()
}

fn health(server: &Server) -> Value {
    let (status, body) = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn api_keys_come_from_postgres_and_changes_apply_without_a_restart() {
    let pg = Postgres::start();
    pg.sql(SCHEMA);
    // Run twice, as an upgrade would: nothing breaks.
    pg.sql(SCHEMA);
    pg.sql(
        "INSERT INTO apikeys (domain, username, apikey, active) VALUES
            ('test', 'a@example.com', 'key-one', true),
            ('test', 'b@example.com', 'key-off', false),
            ('bad domain', 'c@example.com', 'key-bad', true)",
    );
    // Long refresh: what changes below arrives by notification.
    let server = Server::start(&[
        ("DATABASE_URL", pg.url().as_str()),
        ("DATABASE_REFRESH", "3600"),
    ]);
    assert!(allowed(&server, "key-one"), "{}", server.log());
    assert!(!allowed(&server, "key-off"));
    assert!(
        !allowed(&server, "key-bad"),
        "a row with a bad domain is left out"
    );
    assert!(server.log().contains("rows left out"), "{}", server.log());
    let mut sub = Client::connect(&server, "/ws/sub/test/room");
    let mut publ = Client::connect(&server, "/ws/pub/key-one/test/room");
    publ.ws.send(Message::text("hello")).unwrap();
    assert_eq!(sub.recv(), Message::text("hello"));
    let h = health(&server);
    assert_eq!(h["database"]["status"], "ok", "{h}");
    assert_eq!(h["database"]["api_keys"], 3, "{h}");

    // A key inserted, another deactivated: in force within seconds.
    pg.sql("INSERT INTO apikeys (domain, username, apikey, active) VALUES ('test', 'd@example.com', 'key-two', true)");
    wait_for("the inserted key to be allowed", || {
        allowed(&server, "key-two")
    });
    pg.sql("UPDATE apikeys SET active = false WHERE apikey = 'key-one'");
    wait_for("the deactivated key to be refused", || {
        !allowed(&server, "key-one")
    });
    // The publisher already connected with it is closed at its next
    // message, which reaches no one.
    publ.ws.send(Message::text("after")).unwrap();
    let (code, reason) = publ.expect_close();
    assert_eq!((code, reason.as_str()), (1008, "apikey no longer active"));
    let mut other = Client::connect(&server, "/ws/pub/key-two/test/room");
    other.ws.send(Message::text("from key two")).unwrap();
    assert_eq!(sub.recv(), Message::text("from key two"));
    let metrics = http(server.addr, "GET", "/metrics", &[], b"").1;
    assert!(metrics.contains("herald_database_up 1"), "{metrics}");
}

#[test]
fn without_the_trigger_changes_arrive_with_the_refresh() {
    let pg = Postgres::start();
    pg.sql(SCHEMA);
    pg.sql("DROP TRIGGER herald_config_changed ON apikeys");
    let server = Server::start(&[
        ("DATABASE_URL", pg.url().as_str()),
        ("DATABASE_REFRESH", "1"),
    ]);
    assert!(!allowed(&server, "late-key"));
    pg.sql("INSERT INTO apikeys (domain, username, apikey, active) VALUES ('test', 'e@example.com', 'late-key', true)");
    wait_for("the refresh to read the new key", || {
        allowed(&server, "late-key")
    });
}

#[test]
fn a_database_that_goes_away_leaves_the_keys_in_force() {
    let mut pg = Postgres::start();
    pg.sql(SCHEMA);
    pg.sql("INSERT INTO apikeys (domain, username, apikey, active) VALUES ('test', 'a@example.com', 'key-one', true)");
    let server = Server::start(&[
        ("DATABASE_URL", pg.url().as_str()),
        ("DATABASE_REFRESH", "3600"),
    ]);
    assert!(allowed(&server, "key-one"));
    pg.stop();
    wait_for("/health to show the outage", || {
        health(&server)["database"]["status"] == "unreachable"
    });
    let h = health(&server);
    assert!(h["database"]["reason"].is_string(), "{h}");
    assert_eq!(h["status"], "ok", "the node still serves: {h}");
    let metrics = http(server.addr, "GET", "/metrics", &[], b"").1;
    assert!(metrics.contains("herald_database_up 0"), "{metrics}");
    // The keys read last stay in force.
    assert!(allowed(&server, "key-one"));
    let mut sub = Client::connect(&server, "/ws/sub/test/room");
    let mut publ = Client::connect(&server, "/ws/pub/key-one/test/room");
    publ.ws.send(Message::text("during the outage")).unwrap();
    assert_eq!(sub.recv(), Message::text("during the outage"));

    // It comes back: reconnected, and changes apply again.
    pg.resume();
    wait_for("the database to be reached again", || {
        health(&server)["database"]["status"] == "ok"
    });
    pg.sql("INSERT INTO apikeys (domain, username, apikey, active) VALUES ('test', 'b@example.com', 'key-back', true)");
    wait_for("a key inserted after the outage", || {
        allowed(&server, "key-back")
    });
}

#[test]
fn a_database_that_cannot_be_reached_at_start_does_not_stop_herald() {
    // Nothing listens on this port yet: herald starts (after a bounded
    // wait), refuses every key, and reads them once the database answers.
    let mut pg = Postgres::start();
    pg.sql(SCHEMA);
    pg.sql("INSERT INTO apikeys (domain, username, apikey, active) VALUES ('test', 'a@example.com', 'key-one', true)");
    pg.stop();
    let server = Server::start(&[
        ("DATABASE_URL", pg.url().as_str()),
        ("DATABASE_REFRESH", "3600"),
    ]);
    assert!(
        server.log().contains("did not answer in time"),
        "{}",
        server.log()
    );
    assert!(!allowed(&server, "key-one"));
    assert_eq!(health(&server)["database"]["status"], "unreachable");
    pg.resume();
    wait_for("the keys once the database answers", || {
        allowed(&server, "key-one")
    });
}

#[test]
fn api_keys_from_a_file_and_a_database_are_refused_together() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .env("PORT", "0")
        .env(
            "DATABASE_URL",
            "postgres://herald:hunter2@127.0.0.1:1/herald",
        )
        .env("API_KEYS_FILE", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("API_KEYS_FILE with DATABASE_URL"), "{err}");
    assert!(!err.contains("hunter2"), "no password in errors: {err}");
}

/// A Pusher client of app key `key`: its first event.
fn pusher_connect(server: &Server, key: &str) -> (Client, Value) {
    let mut c = Client::connect(server, &format!("/app/{key}?protocol=7"));
    let first = c.recv_json();
    (c, first)
}

/// A Pusher client of app key `key`, subscribed to `news`.
fn subscribed_to_news(server: &Server, key: &str) -> Client {
    let (mut c, first) = pusher_connect(server, key);
    assert_eq!(first["event"], "pusher:connection_established", "{first}");
    c.send_json(serde_json::json!({"event":"pusher:subscribe","data":{"channel":"news"}}));
    assert_eq!(
        c.recv_json()["event"],
        "pusher_internal:subscription_succeeded"
    );
    c
}

fn trigger(server: &Server, app: (&str, &str, &str), data: &str) -> u16 {
    let (id, key, secret) = app;
    let body = serde_json::json!({"name":"greet","channel":"news","data":data}).to_string();
    pusher_api(
        server.addr,
        (key, secret),
        "POST",
        &format!("/apps/{id}/events"),
        &body,
    )
    .0
}

#[test]
fn pusher_apps_come_from_postgres_and_changes_apply_without_a_restart() {
    let pg = Postgres::start();
    pg.sql(SCHEMA);
    pg.sql(
        "INSERT INTO herald_apps (id, key, secret) VALUES ('a1', 'k1', 's1');
         INSERT INTO herald_apps (id, key, secret, max_client_events_per_second) VALUES ('bad', 'kb', 's', 0);",
    );
    let server = Server::start(&[
        ("SECRET", "0123456789abcdef0123456789abcdef"),
        ("DATABASE_URL", pg.url().as_str()),
        ("DATABASE_REFRESH", "3600"),
    ]);
    let mut c = subscribed_to_news(&server, "k1");
    assert_eq!(trigger(&server, ("a1", "k1", "s1"), "one"), 200);
    assert_eq!(c.recv_json()["data"], "one");
    // A row that is not a valid app is left out, and said so.
    let (_, first) = pusher_connect(&server, "kb");
    assert_eq!(first["data"]["code"], 4001, "{first}");
    assert!(
        server.log().contains("herald_apps: left out"),
        "{}",
        server.log()
    );
    assert_eq!(health(&server)["database"]["apps"], 2);

    // The secret rotated: the old one no longer signs, the new one does,
    // and the connected client keeps its subscription.
    pg.sql("UPDATE herald_apps SET secret = 's1-new' WHERE id = 'a1'");
    wait_for("the rotated secret", || {
        trigger(&server, ("a1", "k1", "s1-new"), "two") == 200
    });
    assert_eq!(trigger(&server, ("a1", "k1", "s1"), "old"), 401);
    assert_eq!(c.recv_json()["data"], "two");

    // A new app, at once.
    pg.sql("INSERT INTO herald_apps (id, key, secret) VALUES ('a2', 'k2', 's2')");
    wait_for("the new app", || {
        pusher_connect(&server, "k2").1["event"] == "pusher:connection_established"
    });
    assert_eq!(trigger(&server, ("a2", "k2", "s2"), "x"), 200);
    let metrics = http(server.addr, "GET", "/metrics", &[], b"").1;
    assert!(metrics.contains("app=\"a2\""), "{metrics}");

    // Disabled: its connected client is closed (4003) within seconds,
    // and new ones are refused.
    pg.sql("UPDATE herald_apps SET enabled = false WHERE id = 'a1'");
    let (code, _) = c.expect_close();
    assert_eq!(code, 4003);
    let (_, first) = pusher_connect(&server, "k1");
    assert_eq!(first["data"]["code"], 4003, "{first}");
    assert_eq!(trigger(&server, ("a1", "k1", "s1-new"), "y"), 403);
    // Deleted: unknown.
    pg.sql("DELETE FROM herald_apps WHERE id = 'a2'");
    wait_for("the deleted app to be unknown", || {
        pusher_connect(&server, "k2").1["data"]["code"] == 4001
    });
}

#[test]
fn pusher_apps_stay_in_force_while_the_database_is_away() {
    let mut pg = Postgres::start();
    pg.sql(SCHEMA);
    pg.sql("INSERT INTO herald_apps (id, key, secret) VALUES ('a1', 'k1', 's1')");
    let server = Server::start(&[
        ("SECRET", "0123456789abcdef0123456789abcdef"),
        ("DATABASE_URL", pg.url().as_str()),
    ]);
    pg.stop();
    wait_for("the outage", || {
        health(&server)["database"]["status"] == "unreachable"
    });
    let mut c = subscribed_to_news(&server, "k1");
    assert_eq!(trigger(&server, ("a1", "k1", "s1"), "still"), 200);
    assert_eq!(c.recv_json()["data"], "still");
}

#[test]
fn with_sslmode_require_the_database_is_reached_over_tls_and_its_certificate_checked() {
    let ca = tls::TestCa::new();
    let pg = Postgres::start_with_tls(Some((&ca.cert_pem, &ca.key_pem)));
    pg.sql(SCHEMA);
    pg.sql("INSERT INTO apikeys (domain, username, apikey, active) VALUES ('test', 'a@example.com', 'key-one', true)");
    let url = format!("{}?sslmode=require", pg.url());
    // Trusting the test's CA: read over TLS.
    let ca_file = ca.ca_file.to_str().unwrap();
    let server = Server::start(&[("DATABASE_URL", url.as_str()), ("SSL_CERT_FILE", ca_file)]);
    assert!(allowed(&server, "key-one"), "{}", server.log());
    // Not trusting it: refused, and said why.
    let other = tls::TestCa::new();
    let other_file = other.ca_file.to_str().unwrap();
    let untrusting = Server::start(&[
        ("DATABASE_URL", url.as_str()),
        ("SSL_CERT_FILE", other_file),
    ]);
    assert!(!allowed(&untrusting, "key-one"));
    let h = health(&untrusting);
    assert_eq!(h["database"]["status"], "unreachable", "{h}");
    let reason = h["database"]["reason"].as_str().unwrap().to_lowercase();
    assert!(
        reason.contains("certificate") || reason.contains("tls"),
        "{reason}"
    );
}
