//! What herald holds before its first connection grows with the number of
//! workers, not with its square: the cross-core queues (one per pair of
//! workers) hold memory only for what is queued. Counted in bytes from
//! /proc/PID/status of two fresh servers, 2 and 16 workers (unpinned, so
//! the test runs on any machine); no clock is read.
//!
//! With a preallocated ring per link (`BUS_CAPACITY` slots of 16 bytes
//! each), 16 workers held ~31 MiB per worker more than 2 did; now ~4 MiB
//! (mostly the allocator's per-thread arenas).

mod common;

use common::{rss_bytes, Client, Server};

/// Extra resident memory one more worker may cost before any connection.
const PER_WORKER_MAX: f64 = 10.0 * 1048576.0;

/// Resident memory of a fresh server with `workers` workers, once every
/// worker has served a request (so each has started and allocated).
fn rss_at_start(workers: usize) -> f64 {
    let w = workers.to_string();
    let server = Server::start(&[("WORKERS", &w), ("PIN_WORKERS", "false")]);
    // One WebSocket round trip: the server is up and serving.
    let mut c = Client::connect(&server, "/ws");
    c.subscribe("warm");
    drop(c);
    rss_bytes(server.pid())
}

#[test]
fn memory_at_start_grows_linearly_with_workers() {
    let two = rss_at_start(2);
    let sixteen = rss_at_start(16);
    let per_worker = (sixteen - two) / 14.0;
    eprintln!(
        "RSS at start: {:.1} MiB with 2 workers, {:.1} MiB with 16 ({:.2} MiB per extra worker)",
        two / 1048576.0,
        sixteen / 1048576.0,
        per_worker / 1048576.0
    );
    assert!(
        per_worker <= PER_WORKER_MAX,
        "each extra worker costs {:.1} MiB at start (budget {:.0} MiB): \
         is something preallocated per pair of workers?",
        per_worker / 1048576.0,
        PER_WORKER_MAX / 1048576.0
    );
}
