//! The memory budget of tuning.md, as heap bytes counted (no clock, no
//! RSS noise): the real server runs in this process, and a counting
//! allocator adds up what its worker threads hold. An idle WebSocket
//! connection (its tasks, its record in the shard, its socket state)
//! subscribed to a channel of its own may hold at most 1,536 bytes of heap,
//! which with the allocator's own overhead keeps it under the 2 KiB of RSS
//! tuning.md promises; a channel may cost at most 100 bytes in a shard's
//! table (tests/../src/shard.rs budgets the record itself).
//!
//! A Pusher connection (`/app/{key}`, the open mode's app) is held to the
//! same budget.
//!
//! This is what catches a regression such as a large future inlined into
//! every connection's task (7 KiB each, once) before any load test does.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::TcpListener;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use herald::config::Config;
use herald::engine::interest::Interest;
use herald::engine::shard::{Keepalive, Limits, Shard};
use herald::engine::stats::CoreStats;
use tungstenite::Message;

/// Heap budget of an idle connection on its own channel.
const BUDGET: isize = 1536;
/// Heap budget of a channel in one shard's table.
const CHANNEL_BUDGET: isize = 100;

struct Counting;

/// Net bytes held by herald's worker threads (`herald-w*`).
static WORKER_BYTES: AtomicIsize = AtomicIsize::new(0);

thread_local! {
    /// Counting state of this thread: unknown, worker, or not.
    static KIND: Cell<u8> = const { Cell::new(0) };
    /// Net bytes held through `count_here` scopes on this thread.
    static HERE: Cell<isize> = const { Cell::new(0) };
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Is this one of herald's reactor threads? (Read from the kernel with
/// prctl, which allocates nothing.)
fn is_worker() -> bool {
    KIND.try_with(|k| {
        if k.get() == 0 {
            let mut name = [0u8; 16];
            unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
            k.set(if name.starts_with(b"herald-w") { 1 } else { 2 });
        }
        k.get() == 1
    })
    .unwrap_or(false)
}

fn count(delta: isize) {
    if is_worker() {
        WORKER_BYTES.fetch_add(delta, Ordering::Relaxed);
    }
    let _ = COUNT_HERE.try_with(|on| {
        if on.get() {
            let _ = HERE.try_with(|h| h.set(h.get() + delta));
        }
    });
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn worker_bytes() -> isize {
    WORKER_BYTES.load(Ordering::Relaxed)
}

/// Starts the real server in this process on a free loopback port.
fn start_server() -> u16 {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = Config::try_from_args([
        "herald",
        "--port",
        &port.to_string(),
        "--workers",
        "2",
        "--max-connections",
        "20000",
    ])
    .unwrap();
    // What `herald` loads at start: in open mode, one Pusher app
    // (`app-key`) besides the native protocol.
    let loaded = herald::frontends::load(&config).unwrap();
    std::thread::spawn(move || {
        let _ = herald::runtime::run(config, loaded);
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    port
}

type Ws = tungstenite::WebSocket<std::net::TcpStream>;

/// The protocol of the connections measured.
#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Native,
    /// Pusher's, on the open mode's app (`app-key`).
    Pusher,
}

/// Opens `n` connections each subscribed to `channel(i)`, all confirmed.
fn open(port: u16, n: usize, protocol: Protocol, channel: impl Fn(usize) -> String) -> Vec<Ws> {
    let mut all = Vec::with_capacity(n);
    let path = match protocol {
        Protocol::Native => "/ws",
        Protocol::Pusher => "/app/app-key?protocol=7",
    };
    for i in 0..n {
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (mut ws, _) =
            tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream).unwrap();
        let msg = match protocol {
            Protocol::Native => format!(r#"{{"op":"subscribe","channel":"{}"}}"#, channel(i)),
            Protocol::Pusher => format!(
                r#"{{"event":"pusher:subscribe","data":{{"channel":"{}"}}}}"#,
                channel(i)
            ),
        };
        ws.send(Message::text(msg)).unwrap();
        all.push(ws);
    }
    for ws in all.iter_mut() {
        loop {
            match ws.read().unwrap() {
                Message::Text(t) if t.contains("connection_established") => continue,
                Message::Text(t) => {
                    assert!(
                        t.contains("subscribed") || t.contains("subscription_succeeded"),
                        "{t}"
                    );
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    all
}

/// Open WebSocket connections, from the server's /metrics.
fn open_connections(port: u16) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with("herald_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the server has removed every connection.
fn wait_all_closed(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_connections(port) > 0.0 {
        assert!(Instant::now() < deadline, "connections were not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Heap bytes the workers hold per connection for `n` idle connections on
/// `channel(i)`, once every earlier connection is gone.
fn heap_per_connection(
    port: u16,
    n: usize,
    protocol: Protocol,
    channel: impl Fn(usize) -> String,
) -> f64 {
    wait_all_closed(port);
    let before = worker_bytes();
    let conns = open(port, n, protocol, &channel);
    let held = worker_bytes() - before;
    drop(conns);
    held as f64 / n as f64
}

fn shard() -> Shard {
    Shard::new(
        0,
        Limits {
            send_queue_limit: 1 << 20,
            max_subscriptions: 16,
            close_timeout_ms: 1000,
            publish_rate: 0,
            keepalive: Keepalive::off(),
            closes: herald::worker::CLOSES,
            clock: herald::clock::now_ms,
            coalesce: false,
        },
        std::sync::Arc::new(CoreStats::new(1)),
        herald::frontends::ENCODERS,
    )
}

/// Heap bytes a shard's channel table holds per channel, counted on this
/// thread around the subscriptions alone.
fn table_bytes_per_channel(n: usize, own: bool) -> f64 {
    let interest = Interest::new();
    let mut s = shard();
    let keys: Vec<usize> = (0..n)
        .map(|_| {
            s.open(-1, herald::frontends::native::protocol::ENCODING, 1001)
                .0
        })
        .collect();
    let names: Vec<String> = (0..n)
        .map(|i| {
            if own {
                format!("own-{i}")
            } else {
                "shared".into()
            }
        })
        .collect();
    // The interest map is node-wide, not per core: not counted here.
    for name in &names {
        interest.add(name, 0);
    }
    HERE.with(|h| h.set(0));
    COUNT_HERE.with(|c| c.set(true));
    for (k, name) in keys.iter().zip(&names) {
        s.subscribe(*k, name, &interest).unwrap();
    }
    COUNT_HERE.with(|c| c.set(false));
    HERE.with(|h| h.get()) as f64 / n as f64
}

#[test]
fn an_idle_connection_stays_within_its_heap_budget() {
    let port = start_server();
    // Warm-up round as large as the measured ones: the runtime's own
    // tables (io_uring operations, run queues) grow to the peak number of
    // connections once and keep that size; measured, they add 100-200
    // bytes per connection to the first round only.
    heap_per_connection(port, 4000, Protocol::Native, |i| format!("warm-{i}"));
    let own = heap_per_connection(port, 4000, Protocol::Native, |i| format!("own-{i}"));
    let shared = heap_per_connection(port, 4000, Protocol::Native, |_| "shared".to_string());
    eprintln!(
        "heap per idle connection: {own:.0} bytes on its own channel, {shared:.0} on a shared one"
    );
    assert!(
        own <= BUDGET as f64,
        "an idle connection on its own channel holds {own:.0} bytes of heap (budget {BUDGET})"
    );
    assert!(
        shared <= BUDGET as f64,
        "an idle connection on a shared channel holds {shared:.0} bytes of heap (budget {BUDGET})"
    );
    // A Pusher connection (its state in the front-end, and for its own
    // channel the node's occupancy count) is held to the same budget.
    heap_per_connection(port, 4000, Protocol::Pusher, |i| format!("warm-{i}"));
    let pusher_own = heap_per_connection(port, 4000, Protocol::Pusher, |i| format!("own-{i}"));
    let pusher_shared = heap_per_connection(port, 4000, Protocol::Pusher, |_| "shared".into());
    eprintln!(
        "heap per idle Pusher connection: {pusher_own:.0} bytes on its own channel, \
         {pusher_shared:.0} on a shared one"
    );
    assert!(
        pusher_own <= BUDGET as f64,
        "an idle Pusher connection on its own channel holds {pusher_own:.0} bytes of heap (budget {BUDGET})"
    );
    assert!(
        pusher_shared <= BUDGET as f64,
        "an idle Pusher connection on a shared channel holds {pusher_shared:.0} bytes of heap (budget {BUDGET})"
    );
}

#[test]
fn a_channel_costs_at_most_100_bytes_per_core() {
    let own = table_bytes_per_channel(20_000, true);
    let shared = table_bytes_per_channel(20_000, false);
    let per_channel = own - shared;
    eprintln!("a shard's table: {per_channel:.0} bytes per channel ({own:.0} own, {shared:.0} shared per subscription)");
    assert!(
        per_channel <= CHANNEL_BUDGET as f64,
        "a channel costs {per_channel:.0} bytes in a shard's table (budget {CHANNEL_BUDGET})"
    );
}
