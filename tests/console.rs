//! The debug console (`GET /console`, README "Debug console"): behind
//! `ADMIN_TOKEN`, its state and publish endpoints over HTTP, and the page
//! itself in a real browser (headless Chromium, tests/js/console.js), with
//! a screenshot kept in `target/console-screenshot.png`.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const TOKEN: &str = "console-test-token";

fn state(server: &Server, after: u64) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(
        server.addr,
        "GET",
        &format!("/console/state?after={after}"),
        &[("Authorization", auth.as_str())],
        b"",
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn the_console_needs_its_token() {
    let without = Server::open();
    assert_eq!(http(without.addr, "GET", "/console", &[], b"").0, 404);
    let server = Server::start(&[("ADMIN_TOKEN", TOKEN)]);
    assert_eq!(http(server.addr, "GET", "/console", &[], b"").0, 401);
    assert_eq!(
        http(server.addr, "GET", "/console?token=wrong", &[], b"").0,
        401
    );
    let wrong = [("Authorization", "Bearer wrong")];
    assert_eq!(
        http(server.addr, "GET", "/console/state", &wrong, b"").0,
        401
    );
    let (status, page) = http(
        server.addr,
        "GET",
        &format!("/console?token={TOKEN}"),
        &[],
        b"",
    );
    assert_eq!(status, 200);
    assert!(page.contains("herald console"), "{page}");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external assets"
    );
    let publish = [("Authorization", "Bearer wrong")];
    let body = br#"{"channel":"news","data":1}"#;
    assert_eq!(
        http(server.addr, "POST", "/console/publish", &publish, body).0,
        401
    );
}

#[test]
fn the_state_shows_channels_and_the_events_of_a_watched_node() {
    let server = Server::start(&[("ADMIN_TOKEN", TOKEN)]);
    // Nothing is recorded while nobody watches.
    let mut early = Client::connect(&server, "/ws");
    early.subscribe("before");
    let s = state(&server, 0);
    assert_eq!(s["events"].as_array().unwrap().len(), 0, "{s}");
    // Now it watches.
    let mut subs: Vec<Client> = (0..2).map(|_| Client::connect(&server, "/ws")).collect();
    for c in &mut subs {
        c.subscribe("room");
    }
    let auth = format!("Bearer {TOKEN}");
    let (status, body) = http(
        server.addr,
        "POST",
        "/console/publish",
        &[("Authorization", auth.as_str())],
        br#"{"channel":"room","data":{"n":1}}"#,
    );
    assert_eq!(status, 202, "{body}");
    for c in &mut subs {
        assert_eq!(c.next_json("the console's publish")["data"]["n"], 1);
    }
    let s = state(&server, 0);
    let kinds: Vec<&str> = s["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["channel"] == "room")
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["subscribe", "subscribe", "publish"], "{s}");
    let room = s["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "room")
        .cloned()
        .unwrap();
    assert_eq!(room["subscribers"], 2, "{s}");
    assert_eq!(s["connections"], 3);
    assert!(s["delivered"].as_u64().unwrap() >= 2);
    // Only what is newer than what was read.
    let last = s["events"].as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(state(&server, last)["events"].as_array().unwrap().len(), 0);
}

#[test]
fn the_page_shows_the_node_live_in_a_real_browser() {
    let server = Server::start(&[("ADMIN_TOKEN", TOKEN)]);
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let screenshot = target.join("console-screenshot.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut node = NodeScript::start(
        "console.js",
        server.addr,
        &[
            ("ADMIN_TOKEN", TOKEN),
            ("SCREENSHOT", screenshot.to_str().unwrap()),
        ],
    );
    node.barrier("watching");
    // While the page watches: three subscribers and a publish.
    let mut subs: Vec<Client> = (0..3).map(|_| Client::connect(&server, "/ws")).collect();
    for c in &mut subs {
        c.subscribe("room");
    }
    let mut p = Client::connect(&server, "/ws");
    p.publish("room", serde_json::json!("from a client"));
    for c in &mut subs {
        assert_eq!(c.next_json("the client's publish")["data"], "from a client");
    }
    node.go_on();
    // The page's form publishes to the subscribers.
    for c in &mut subs {
        assert_eq!(
            c.next_json("the page's publish")["data"],
            "from the browser"
        );
    }
    let result = node.result(&server.log());
    assert_eq!(result["connections"], 4, "{result}");
    assert!(
        result["answer"].as_str().unwrap().starts_with("202"),
        "{result}"
    );
    let kinds = result["kinds"].as_array().unwrap();
    for k in ["publish", "subscribe"] {
        assert!(kinds.iter().any(|x| x == k), "{result}");
    }
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
}

#[test]
fn the_console_can_be_kept_to_the_metrics_address() {
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let server = Server::start(&[
        ("ADMIN_TOKEN", TOKEN),
        ("METRICS_ADDR", metrics_addr.as_str()),
        ("CONSOLE_ON_METRICS", "true"),
    ]);
    let page = format!("/console?token={TOKEN}");
    let (status, body) = http(server.addr, "GET", &page, &[], b"");
    assert_eq!(
        (status, body.as_str()),
        (404, "/console is served on METRICS_ADDR\n")
    );
    let metrics: std::net::SocketAddr = metrics_addr.parse().unwrap();
    wait_for("the metrics address", || {
        std::net::TcpStream::connect(metrics).is_ok()
    });
    let (status, body) = http(metrics, "GET", &page, &[], b"");
    assert_eq!(status, 200);
    assert!(body.contains("herald console"));
    // Nothing else of the main port is served there.
    assert_eq!(http(metrics, "GET", "/history?channel=x", &[], b"").0, 404);
}
