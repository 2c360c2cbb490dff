//! protocol.md "Close codes": `MAX_CONNECTIONS` counts WebSocket connections
//! across cores; at the limit an upgrade gets HTTP 503, and a slot freed by a
//! closed connection can be used again.

mod common;

use std::time::{Duration, Instant};

use common::{http, Client, Server, TIMEOUT};
use serde_json::Value;

/// The `connections` field of `/health`.
fn health_connections(server: &Server) -> u64 {
    let (status, body) = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("health JSON");
    v["connections"]
        .as_u64()
        .unwrap_or_else(|| panic!("no connections count in /health: {v}"))
}

/// Closes cleanly: sends a close frame and reads until the server's answer.
fn close(mut c: Client) {
    c.ws.close(None).expect("send close");
    loop {
        match c.ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => return,
            Err(e) => panic!("closing handshake failed: {e}"),
        }
    }
}

fn assert_503(server: &Server, what: &str) {
    match Client::try_connect(server.addr, "/ws", &[]) {
        Ok(_) => panic!("{what}: upgrade accepted past MAX_CONNECTIONS"),
        Err(r) => assert_eq!(r.status, 503, "{what}: {r:?}"),
    }
}

#[test]
fn fourth_connection_gets_503_until_one_closes() {
    let server = Server::start(&[("MAX_CONNECTIONS", "3")]);
    let mut open: Vec<Client> = (0..3).map(|_| Client::connect(&server, "/ws")).collect();
    for c in open.iter_mut() {
        assert!(c.sync().is_empty(), "connection under the limit works");
    }
    assert_503(&server, "4th connection");
    assert_503(&server, "5th connection");
    // The refusals did not take slots from the open connections.
    assert_eq!(health_connections(&server), 3);
    for c in open.iter_mut() {
        assert!(c.sync().is_empty());
    }

    close(open.pop().unwrap());
    let deadline = Instant::now() + TIMEOUT;
    while health_connections(&server) >= 3 {
        assert!(
            Instant::now() < deadline,
            "server did not release the closed connection"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut again = Client::connect(&server, "/ws");
    assert!(
        again.sync().is_empty(),
        "connection in the freed slot works"
    );
    open.push(again);
    assert_503(&server, "over the limit again");
}

#[test]
fn plain_http_requests_do_not_count_against_the_limit() {
    let server = Server::start(&[("MAX_CONNECTIONS", "1")]);
    let mut c = Client::connect(&server, "/ws");
    assert!(c.sync().is_empty());
    // At the limit, the HTTP API still answers.
    let (status, _) = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200);
    assert_503(&server, "2nd connection with MAX_CONNECTIONS=1");
}
