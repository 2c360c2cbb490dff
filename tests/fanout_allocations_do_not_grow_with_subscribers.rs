//! One publish to N subscribers performs a number of heap allocations that
//! does not depend on N: the payload is encoded once and never copied per
//! subscriber. Counted, not timed: a counting global allocator (per thread,
//! so parallel tests do not disturb each other) wraps the system allocator.
//!
//! The path is the real one minus the sockets: two workers in one thread,
//! subscribers on both, a publish on worker 0 (to the channel's owner,
//! interest map, local fan-out, the bus to the other worker), both workers
//! draining their bus, and every
//! subscriber's writer taking its frames into a write batch.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::task::{Context, Waker};

use herald::config::Config;
use herald::frontends::native::protocol::message_frame;
use herald::transport::tcp::Batch;
use herald::worker::{Shared, Worker};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCATIONS.with(|c| c.get())
}

/// Heap allocations made by one publish to `n` subscribers (half on each
/// of two workers), after a warm-up publish.
fn allocations_per_publish(n: usize) -> usize {
    allocations_per_publish_with(n, "")
}

/// The same, with `HISTORY` set to `history`.
fn allocations_per_publish_with(n: usize, history: &str) -> usize {
    let config =
        Config::try_from_args(["herald", "--send-queue-limit", "1GiB", "--history", history])
            .unwrap();
    let shared = Shared::new(config, 2, herald::frontends::ENCODERS);
    let workers = [
        Worker::new(0, shared.clone()),
        Worker::new(1, shared.clone()),
    ];
    let mut conns = Vec::new();
    for i in 0..n {
        let w = &workers[i % 2];
        let (key, gen) =
            w.core
                .shard
                .borrow_mut()
                .open(-1, herald::frontends::native::protocol::ENCODING, 1001);
        w.core
            .shard
            .borrow_mut()
            .subscribe(key, "room", &shared.hub.interest)
            .unwrap();
        conns.push((i % 2, key, gen));
    }
    let mut batch = Batch::new();
    let mut cx = Context::from_waker(Waker::noop());
    let mut publish_once = || {
        let data = r#"{"text":"sixty-four bytes of payload, give or take a few"}"#;
        workers[0].core.publish(message_frame("room", data), None);
        // The channel's owner may be either worker: hand over until both
        // queues are empty (at most publisher -> owner -> the other).
        for _ in 0..2 {
            for w in &workers {
                while w.core.drain(usize::MAX) {}
            }
        }
        let mut delivered = 0;
        for &(w, key, gen) in &conns {
            let mut shard = workers[w].core.shard.borrow_mut();
            let _ = shard.fill(key, gen, &mut batch, usize::MAX, &mut cx);
            let len = batch.len();
            if len > 0 {
                delivered += 1;
            }
            batch.advance(len);
            shard.written(key, gen, len);
        }
        delivered
    };
    assert_eq!(
        publish_once(),
        n,
        "warm-up publish reached every subscriber"
    );
    let before = allocations();
    assert_eq!(
        publish_once(),
        n,
        "measured publish reached every subscriber"
    );
    allocations() - before
}

#[test]
fn allocations_per_publish_do_not_grow_with_subscribers() {
    let small = allocations_per_publish(10);
    let large = allocations_per_publish(10_000);
    eprintln!("allocations per publish: {small} with 10 subscribers, {large} with 10,000");
    assert!(small >= 1, "the frame itself is allocated once ({small})");
    assert_eq!(
        small, large,
        "one publish allocated {small} times for 10 subscribers but {large} for 10,000"
    );
    // The budget tuning.md states: the frame, the message's Arc, the
    // shared header of the frame's Bytes.
    assert!(
        large <= 3,
        "one publish allocated {large} times; tuning.md promises at most 3"
    );
}

#[test]
fn with_history_allocations_per_publish_do_not_grow_with_subscribers() {
    let small = allocations_per_publish_with(10, "*=1000/1h");
    let large = allocations_per_publish_with(10_000, "*=1000/1h");
    eprintln!("with history: {small} with 10 subscribers, {large} with 10,000");
    assert_eq!(
        small, large,
        "with history, one publish allocated {small} times for 10 subscribers but {large} for 10,000"
    );
    // tuning.md: the frame built again with its offset, on top of the 3.
    assert!(
        large <= 4,
        "with history, one publish allocated {large} times"
    );
}
