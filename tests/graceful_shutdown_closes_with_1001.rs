//! SIGTERM shuts herald down gracefully: every connection first gets what
//! was queued for it, then a close frame with 1001; new connections are
//! refused; the process exits with status 0 within SHUTDOWN_TIMEOUT, and
//! clients that never answer the close do not hold it past that.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{small_window_client, wait_for, Client, Server, TIMEOUT};
use serde_json::{json, Value};

const WORKERS: usize = 2;
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Opens a connection with `open` and returns it with the worker holding it
/// (the herald_connections gauge that moved). Connections must not be
/// opened concurrently.
fn tracked(server: &Server, open: impl FnOnce() -> Client) -> (Client, usize) {
    let before = server.per_worker("herald_connections");
    let client = open();
    let mut after = before.clone();
    wait_for("herald_connections to count the new connection", || {
        after = server.per_worker("herald_connections");
        after.iter().sum::<f64>() == before.iter().sum::<f64>() + 1.0
    });
    let worker = (0..WORKERS).find(|&w| after[w] == before[w] + 1.0).unwrap();
    (client, worker)
}

fn message(n: usize, pad: &str) -> Value {
    json!({"op":"message","channel":"news","data":{"n":n,"pad":pad}})
}

#[test]
fn sigterm_flushes_queued_messages_then_closes_with_1001_and_exits_0() {
    const MESSAGES: usize = 3000;
    // 3 MB per subscriber: more than the kernel buffers of a connection
    // hold, less than its SEND_QUEUE_LIMIT.
    let mut server = Server::start(&[("SHUTDOWN_TIMEOUT", "3"), ("SEND_QUEUE_LIMIT", "16MiB")]);
    let pad = "x".repeat(1000);
    // Small windows: part of the 3 MB stays queued in herald at SIGTERM.
    let (mut a, wa) = tracked(&server, || small_window_client(&server));
    let (mut b, wb) = tracked(&server, || small_window_client(&server));
    a.subscribe("news");
    b.subscribe("news");
    let (mut publisher, wp) = tracked(&server, || Client::connect(&server, "/ws"));

    // What reached another core: delivered after the channel's owner
    // ordered it, or ordered there (the owner being that core).
    let crossed = |server: &Server| -> Vec<f64> {
        let d = server.per_worker("herald_cross_core_messages_total");
        let s = server.per_worker("herald_sequenced_for_others_total");
        d.iter().zip(&s).map(|(a, b)| a + b).collect()
    };
    let crossed_before = crossed(&server);
    for n in 0..MESSAGES {
        publisher
            .send_json(json!({"op":"publish","channel":"news","data":{"n":n,"pad":pad},"id":n}));
    }
    for n in 0..MESSAGES {
        assert_eq!(publisher.recv_json(), json!({"op":"ack","id":n}));
    }
    // A core reached over the bus counts each message as it queues it
    // (herald_cross_core_messages_total), or, when it is the channel's
    // owner, as it orders and queues it (herald_sequenced_for_others_total).
    for w in (0..WORKERS).filter(|&w| w != wp && (w == wa || w == wb)) {
        wait_for("the other core to queue the messages", || {
            crossed(&server)[w] >= crossed_before[w] + MESSAGES as f64
        });
    }
    // When another core owns the channel, the publisher's core gets the
    // messages back from it for its own subscribers.
    let ordered_elsewhere = server
        .per_worker("herald_sequenced_for_others_total")
        .iter()
        .enumerate()
        .any(|(w, n)| w != wp && *n >= MESSAGES as f64);
    if ordered_elsewhere && (wa == wp || wb == wp) {
        wait_for("the publisher's core to queue the messages", || {
            server.per_worker("herald_cross_core_messages_total")[wp]
                >= crossed_before[wp] + MESSAGES as f64
        });
    }

    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    for (name, c) in [("a", &mut a), ("b", &mut b)] {
        for n in 0..MESSAGES {
            let got = c.recv_json();
            assert!(
                got == message(n, &pad),
                "subscriber {name}, message {n} after SIGTERM: got {}",
                got.to_string().chars().take(200).collect::<String>()
            );
        }
        let (code, reason) = c.expect_close();
        assert_eq!(code, 1001, "subscriber {name}: close reason {reason:?}");
        // Answer the close (tungstenite queued the reply).
        let _ = c.ws.flush();
    }
    let (code, reason) = publisher.expect_close();
    assert_eq!(code, 1001, "publisher: close reason {reason:?}");
    let _ = publisher.ws.flush();

    let limit = SHUTDOWN_TIMEOUT + Duration::from_secs(1);
    let status = server.wait_exit(limit.saturating_sub(signalled.elapsed()));
    assert!(
        status.success(),
        "herald exited with {status} after SIGTERM\n{}",
        server.log()
    );
}

#[test]
fn unanswered_closes_do_not_hold_shutdown_and_new_connections_are_refused() {
    let mut server = Server::start(&[("SHUTDOWN_TIMEOUT", "3")]);
    // One witness per worker: once both saw their 1001, both workers have
    // begun shutting down. Connections landing twice on a worker become
    // clients that never read (nor answer the close).
    let mut witnesses: Vec<Option<Client>> = (0..WORKERS).map(|_| None).collect();
    let mut mute = Vec::new();
    while witnesses.iter().any(Option::is_none) {
        assert!(mute.len() < 50, "every connection landed on one worker");
        let (c, w) = tracked(&server, || Client::connect(&server, "/ws"));
        if witnesses[w].is_none() {
            witnesses[w] = Some(c);
        } else {
            mute.push(c);
        }
    }
    mute.push(Client::connect(&server, "/ws"));
    // A subscriber that never reads, with 300 KiB published to it: its
    // writes cannot complete, so the close frame cannot be flushed either.
    let mut stuck = small_window_client(&server);
    stuck.subscribe("stuck");
    let mut publisher = Client::connect(&server, "/ws");
    let pad = "y".repeat(1000);
    for n in 0..300 {
        publisher
            .send_json(json!({"op":"publish","channel":"stuck","data":{"n":n,"pad":pad},"id":n}));
    }
    for n in 0..300 {
        assert_eq!(publisher.recv_json(), json!({"op":"ack","id":n}));
    }

    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    for (w, c) in witnesses.iter_mut().enumerate() {
        let (code, reason) = c.as_mut().unwrap().expect_close();
        assert_eq!(code, 1001, "witness on worker {w}: close reason {reason:?}");
    }

    // Shutdown has begun on every worker: a new connection is refused, or
    // closed without an HTTP response.
    for i in 0..5 {
        match TcpStream::connect(server.addr) {
            Err(_) => {}
            Ok(mut s) => {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                let _ = s.write_all(
                    format!(
                        "GET /health HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                        server.addr
                    )
                    .as_bytes(),
                );
                let mut got = Vec::new();
                match s.read_to_end(&mut got) {
                    Ok(_) => assert!(
                        got.is_empty(),
                        "connection {i} after SIGTERM was served: {:?}",
                        String::from_utf8_lossy(&got)
                    ),
                    Err(e) => assert!(
                        matches!(
                            e.kind(),
                            std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::ConnectionAborted
                        ),
                        "connection {i} after SIGTERM neither refused nor closed: {e}; read {:?}",
                        String::from_utf8_lossy(&got)
                    ),
                }
            }
        }
    }

    let limit = SHUTDOWN_TIMEOUT + Duration::from_secs(2);
    let status = server.wait_exit(limit.saturating_sub(signalled.elapsed()));
    eprintln!(
        "herald exited {status} {:?} after SIGTERM",
        signalled.elapsed()
    );
    drop((mute, stuck, publisher));
}
