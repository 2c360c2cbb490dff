//! `GET /metrics` is valid Prometheus text (checked by `promtool check
//! metrics`, installed by the test setup), OpenMetrics when the scraper
//! asks for it, and carries what operators look for: per-app Pusher
//! figures, webhook and authorizer outcomes, outgoing HTTP latency,
//! process metrics and build info. METRICS_ADDR serves /metrics and
//! /health on a separate address.

mod common;
#[path = "common/webhook.rs"]
mod webhook;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use common::{http, wait_for, Client, Server, TIMEOUT};
use serde_json::json;

/// GET `path` with extra headers; returns (status, content type, body).
fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or("")
        .to_string();
    (status, ctype, body.to_string())
}

/// Runs `promtool check metrics` on `text`; returns its verdict.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test-deps.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn metrics_pass_promtool_and_carry_what_operators_need() {
    let hook = webhook::Webhook::allowing();
    let apps = json!([{"id":"shop","key":"ks","secret":"ss","enable_client_messages":true,
                       "webhooks":[{"url": hook.url()}]}]);
    let url = hook.url();
    let server = Server::start(&[("APPS", &apps.to_string()), ("AUTHORIZER_URL", &url)]);
    // Some traffic of every kind: native, Pusher, webhooks, authorizer.
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("news");
    let mut p = Client::connect(&server, "/app/ks?protocol=7");
    p.recv_json();
    p.send_json(json!({"event":"pusher:subscribe","data":{"channel":"room"}}));
    p.recv_json();
    let (status, _) = http(
        server.addr,
        "POST",
        "/publish",
        &[],
        br#"{"channel":"news","data":1}"#,
    );
    assert_eq!(status, 202);
    sub.recv_json();
    hook.wait_requests(3);
    wait_for("the webhook batch counted", || {
        server.metric("herald_pusher_webhook_batches_total{app=\"shop\",outcome=\"delivered\"}")
            >= 1.0
    });

    let (status, ctype, text) = get(server.addr, "/metrics", &[]);
    assert_eq!(status, 200);
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool check metrics failed:\n{said}\n---\n{text}");
    assert!(said.trim().is_empty(), "promtool lint findings:\n{said}");
    for want in [
        "herald_pusher_connections{app=\"shop\"} 1",
        "herald_pusher_webhook_batches_total{app=\"shop\",outcome=\"delivered\"}",
        "herald_authorizer_decisions_total{action=\"connect\",result=\"allow\"}",
        "herald_outgoing_http_request_duration_seconds_bucket{le=",
        "target=\"authorizer\"",
        "target=\"webhook\"",
        "herald_build_info{version=",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_cpu_seconds_total ",
        "herald_distinct_channels ",
    ] {
        assert!(text.contains(want), "missing {want:?}:\n{text}");
    }
    assert!(!text.contains("# EOF"));

    // OpenMetrics on request, as Prometheus asks for it.
    let accept =
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (status, ctype, om) = get(server.addr, "/metrics", &[("Accept", accept)]);
    assert_eq!(status, 200);
    assert!(
        ctype.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ctype}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE herald_publishes counter"), "{om}");
}

#[test]
fn metrics_addr_serves_metrics_and_health_apart() {
    let server = Server::start(&[("METRICS_ADDR", "127.0.0.1:0")]);
    let log = server.log();
    let at = log
        .split("serving /metrics and /health at ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no metrics address logged:\n{log}"));
    let maddr: SocketAddr = at.parse().unwrap();
    assert_ne!(maddr.port(), server.addr.port());
    let (status, _, text) = get(maddr, "/metrics", &[]);
    assert_eq!(status, 200);
    assert!(text.contains("herald_connections{worker=\"0\"}"), "{text}");
    let (status, _, body) = get(maddr, "/health", &[]);
    assert_eq!(status, 200, "{body}");
    // The main port keeps /health but no longer shows /metrics.
    assert_eq!(get(server.addr, "/health", &[]).0, 200);
    assert_eq!(get(server.addr, "/metrics", &[]).0, 404);
    // The metrics address serves nothing else: no API, no WebSocket.
    assert_eq!(get(maddr, "/publish", &[]).0, 404);
    assert!(Client::try_connect(maddr, "/ws", &[]).is_err());
}
