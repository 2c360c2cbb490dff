//! When connections close, their memory comes back: after a storm of
//! 5,000 connections (each on a channel of its own) has come and gone,
//! the server's resident memory is within a few MiB of where it started.
//! Counted in bytes from /proc/PID/status once the server has handed freed
//! memory back (its `herald_memory_collections_total` counter moves); no
//! clock is read.

mod common;

use common::{rss_bytes, wait_for, Client, Server};

const STORM: usize = 5_000;
/// "Within a few MiB of where it started".
const LEFT_MAX: f64 = 4.0 * 1048576.0;

/// Lets this test process hold the client side of every connection.
fn raise_own_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    assert!(
        lim.rlim_cur as usize > STORM + 100,
        "this test needs an open-file limit above {STORM}"
    );
}

/// A storm: `STORM` connections, each subscribed to a channel of its
/// own, all confirmed, then all closed and removed by the server.
fn storm(server: &Server, tag: &str) {
    let mut clients = Vec::with_capacity(STORM);
    for i in 0..STORM {
        let mut c = Client::connect(server, "/ws");
        c.send_json(serde_json::json!({"op":"subscribe","channel":format!("{tag}-{i}")}));
        clients.push(c);
    }
    for c in clients.iter_mut() {
        assert_eq!(c.recv_json()["op"], "subscribed");
    }
    drop(clients);
    wait_for("every connection to be removed", || {
        server.metric_sum("herald_connections") == 0.0
    });
}

/// Waits until the server has handed back freed memory: a worker does so
/// within a second of connections opening or closing, so one more
/// connection opened and closed here makes sure it happens after this
/// call began.
fn settle(server: &Server) {
    let before = server.metric_sum("herald_memory_collections_total");
    drop(Client::connect(server, "/ws"));
    wait_for("the server to give freed memory back", || {
        server.metric_sum("herald_memory_collections_total") > before
    });
}

#[test]
fn memory_comes_back_after_a_storm_of_connections() {
    raise_own_nofile();
    let server = Server::start(&[("MAX_CONNECTIONS", "6000")]);
    // A first storm sets up what a worker keeps for good (its runtime's
    // tables sized for the peak); the second one must leave nothing.
    storm(&server, "first");
    settle(&server);
    let start = rss_bytes(server.pid());
    storm(&server, "second");
    settle(&server);
    let left = rss_bytes(server.pid()) - start;
    eprintln!(
        "RSS after a storm of {STORM} connections closed: {:+.1} MiB",
        left / 1048576.0
    );
    assert!(
        left <= LEFT_MAX,
        "RSS stayed {:.1} MiB above where it started after every connection closed",
        left / 1048576.0
    );
}
