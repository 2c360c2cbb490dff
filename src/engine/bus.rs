//! The cross-core bus: how a publish reaches subscribers owned by other
//! reactors.
//!
//! One crossbeam queue per (source, destination) pair carries what one
//! core hands another (the engine's envelopes: published messages, already
//! encoded, so crossing a core costs a refcount increment, never a copy;
//! and work to run there), first in, first out. The queues are linked lists of 31-slot blocks,
//! holding memory only for what is queued: preallocated rings would cost
//! `BUS_CAPACITY` slots for each of the `workers x (workers - 1)` links
//! (1 MiB each by default, 4 GiB at 64 workers) whether used or not. Each destination has one coalescing wakeup: the
//! first message of a burst flips `pending` and wakes the destination's
//! drain task (monoio turns a cross-thread wake into one eventfd write);
//! later messages of the burst find `pending` set and wake no one.
//!
//! Backpressure instead of unbounded memory: a source checks
//! [`Bus::congested`] before it decodes the next client message, and waits
//! in [`Bus::wait_for_space`] until the destination has drained. Each pair
//! has exactly one producing thread, so a link holds at most its capacity
//! plus what the one client message read after the check produced.
//!
//! That check runs for every frame a client sends, so it reads one word
//! the source alone writes: a mark per destination, set by a send that
//! fills a link to its mark, cleared when the check finds the link drained.
//! Until a link fills, no check touches a cache line another core writes.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};
use std::task::{Poll, Waker};

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender};

struct Link<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
    /// The source reactor's tasks waiting for the destination to drain:
    /// every one of them (many connections of a core may be paused on the
    /// same link), so not an `AtomicWaker`, which keeps only the last.
    /// Touched only under congestion.
    space: Mutex<Vec<Waker>>,
    producer_waiting: AtomicBool,
}

/// A source's marks (bit `dst`: the link to `dst` reached its mark), on
/// a cache line of its own.
#[repr(align(128))]
struct Marks(AtomicU64);

struct Inbox {
    pending: AtomicBool,
    waker: AtomicWaker,
}

/// The queues between every pair of cores, carrying `T`s, and from each
/// extra source (a thread that is not a core, such as a cluster's broker
/// client: sources `cores..sources`) to every core.
pub struct Bus<T> {
    cores: usize,
    sources: usize,
    capacity: usize,
    links: Box<[Link<T>]>,
    inboxes: Box<[Inbox]>,
    /// By source; written only by the source's thread.
    marks: Box<[Marks]>,
}

impl<T> Bus<T> {
    /// A bus for `cores` reactors, each link holding about `capacity` messages.
    pub fn new(cores: usize, capacity: usize) -> Arc<Bus<T>> {
        Self::with_sources(cores, cores, capacity)
    }

    /// The same, with `sources - cores` more threads sending to the cores
    /// (as sources `cores..sources`).
    pub fn with_sources(cores: usize, sources: usize, capacity: usize) -> Arc<Bus<T>> {
        assert!(sources >= cores);
        let links = (0..sources * cores)
            .map(|_| {
                let (tx, rx) = crossbeam_channel::unbounded();
                Link {
                    tx,
                    rx,
                    space: Mutex::new(Vec::new()),
                    producer_waiting: AtomicBool::new(false),
                }
            })
            .collect();
        let inboxes = (0..cores)
            .map(|_| Inbox {
                pending: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            })
            .collect();
        assert!(cores <= 64, "the congestion marks hold 64 cores");
        Arc::new(Bus {
            cores,
            sources,
            capacity,
            links,
            inboxes,
            marks: (0..sources).map(|_| Marks(AtomicU64::new(0))).collect(),
        })
    }

    fn link(&self, src: usize, dst: usize) -> &Link<T> {
        &self.links[src * self.cores + dst]
    }

    /// Is any queue leaving `src` at its mark? Then `src` must stop
    /// reading. Called by `src`'s thread only.
    #[inline]
    pub fn congested(&self, src: usize) -> bool {
        let marks = self.marks[src].0.load(Ordering::Relaxed);
        marks != 0 && self.recheck(src, marks) != 0
    }

    /// Clears the marks of the links that drained below their mark;
    /// returns those still full.
    #[cold]
    fn recheck(&self, src: usize, marks: u64) -> u64 {
        let mut still = marks;
        let mut bits = marks;
        while bits != 0 {
            let dst = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            if self.link(src, dst).tx.len() < self.capacity {
                still &= !(1 << dst);
            }
        }
        if still != marks {
            self.marks[src].0.store(still, Ordering::Relaxed);
        }
        still
    }

    /// Queues `msg` from `src` to `dst` and wakes `dst` if it was idle.
    /// A link that reaches its capacity marks `src` congested; the send
    /// itself never fails (the bus owns both ends of every link).
    pub fn send(&self, src: usize, dst: usize, msg: T) {
        let link = self.link(src, dst);
        if link.tx.send(msg).is_ok() && link.tx.len() >= self.capacity {
            let m = &self.marks[src].0;
            m.store(m.load(Ordering::Relaxed) | 1 << dst, Ordering::Relaxed);
        }
        self.notify(dst);
    }

    /// Wakes `dst`'s drain task unless a wakeup is already pending.
    pub fn notify(&self, dst: usize) {
        let inbox = &self.inboxes[dst];
        if !inbox.pending.swap(true, Ordering::AcqRel) {
            inbox.waker.wake();
        }
    }

    /// Waits until `dst` has been notified since it last drained.
    pub async fn wait_for_messages(&self, dst: usize) {
        let inbox = &self.inboxes[dst];
        poll_fn(|cx| {
            inbox.waker.register(cx.waker());
            if inbox.pending.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Hands up to `max` queued messages for `dst` to `deliver`, oldest
    /// first per source. Returns how many were handed over and whether
    /// more are waiting.
    pub fn drain(&self, dst: usize, max: usize, mut deliver: impl FnMut(T)) -> (usize, bool) {
        let mut n = 0;
        let mut more = false;
        for src in (0..self.sources).filter(|&s| s != dst) {
            let link = self.link(src, dst);
            while n < max {
                match link.rx.try_recv() {
                    Ok(msg) => {
                        deliver(msg);
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
            if !link.rx.is_empty() {
                more = true;
            }
            if link.producer_waiting.load(Ordering::Acquire)
                && link.rx.len() < self.capacity / 2 + 1
                && link.producer_waiting.swap(false, Ordering::AcqRel)
            {
                let waiting = std::mem::take(&mut *lock(&link.space));
                for w in waiting {
                    w.wake();
                }
            }
        }
        (n, more)
    }

    /// Waits until no queue leaving `src` is congested.
    pub async fn wait_for_space(&self, src: usize) {
        poll_fn(|cx| {
            let mut blocked = false;
            let mut bits = self.marks[src].0.load(Ordering::Relaxed);
            while bits != 0 {
                let dst = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let link = self.link(src, dst);
                if link.tx.len() >= self.capacity {
                    {
                        let mut waiting = lock(&link.space);
                        if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                            waiting.push(cx.waker().clone());
                        }
                    }
                    link.producer_waiting.store(true, Ordering::Release);
                    // Re-check after registering: the drain may have just run.
                    if link.tx.len() >= self.capacity {
                        blocked = true;
                        self.notify(dst);
                    }
                }
            }
            if blocked {
                Poll::Pending
            } else {
                self.marks[src].0.store(0, Ordering::Relaxed);
                Poll::Ready(())
            }
        })
        .await
    }
}

/// A lock that a panic elsewhere cannot poison for good (the list of
/// wakers stays valid whatever happened).
fn lock(m: &Mutex<Vec<Waker>>) -> MutexGuard<'_, Vec<Waker>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::message::{Encoding, Message, PayloadKind};
    use bytes::Bytes;

    fn message_frame(channel: &str, data: &str) -> Arc<Message> {
        let frame = Bytes::from(format!("{channel}{data}"));
        let c = 0..channel.len();
        let p = channel.len()..frame.len();
        Arc::new(Message::new(frame, Encoding(0), c, p, PayloadKind::Text, 0))
    }

    #[test]
    fn messages_cross_and_share_the_buffer() {
        let bus = Bus::<Arc<Message>>::new(2, 8);
        let p = message_frame("a", "1");
        bus.send(0, 1, p.clone());
        let mut got = Vec::new();
        let (n, more) = bus.drain(1, 100, |m| got.push(m));
        assert_eq!((n, more), (1, false));
        assert_eq!(got[0].channel(), "a");
        // Same allocation: the frame crossed as a refcounted clone.
        assert_eq!(got[0].frame().as_ptr(), p.frame().as_ptr());
    }

    #[test]
    fn an_extra_source_reaches_every_core() {
        let bus = Bus::<Arc<Message>>::with_sources(2, 3, 2);
        bus.send(2, 0, message_frame("a", "1"));
        bus.send(2, 1, message_frame("b", "1"));
        bus.send(2, 1, message_frame("c", "1"));
        assert!(bus.congested(2), "the extra source has marks of its own");
        assert!(!bus.congested(0) && !bus.congested(1));
        let mut got = Vec::new();
        bus.drain(1, 100, |m| got.push(m.channel().to_string()));
        assert_eq!(got, ["b", "c"]);
        assert!(!bus.congested(2));
        assert_eq!(bus.drain(0, 100, |_| {}).0, 1);
    }

    #[test]
    fn congestion_at_capacity() {
        let bus = Bus::<Arc<Message>>::new(2, 4);
        for _ in 0..4 {
            assert!(!bus.congested(0));
            bus.send(0, 1, message_frame("a", "1"));
        }
        assert!(bus.congested(0));
        assert!(!bus.congested(1));
        let (n, _) = bus.drain(1, 2, |_| {});
        assert_eq!(n, 2);
        assert!(!bus.congested(0));
        assert_eq!(bus.marks[0].0.load(Ordering::Relaxed), 0, "mark cleared");
    }

    #[test]
    fn a_mark_names_the_full_link_only() {
        let bus = Bus::<Arc<Message>>::new(4, 2);
        for _ in 0..2 {
            bus.send(0, 3, message_frame("a", "1"));
        }
        bus.send(0, 1, message_frame("a", "1"));
        assert_eq!(bus.marks[0].0.load(Ordering::Relaxed), 1 << 3);
        assert!(bus.congested(0));
        // Waiting for space resolves once the full link drains.
        bus.drain(3, 100, |_| {});
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut wait = std::pin::pin!(bus.wait_for_space(0));
        assert!(std::future::Future::poll(wait.as_mut(), &mut cx).is_ready());
        assert!(!bus.congested(0));
    }

    struct Flag(std::sync::atomic::AtomicBool);
    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_task_waiting_for_space_is_woken() {
        use std::future::Future;
        let bus = Bus::<Arc<Message>>::new(2, 2);
        for _ in 0..2 {
            bus.send(0, 1, message_frame("a", "1"));
        }
        let flags: Vec<Arc<Flag>> = (0..3).map(|_| Arc::new(Flag(Default::default()))).collect();
        let mut waits: Vec<_> = (0..3).map(|_| Box::pin(bus.wait_for_space(0))).collect();
        for (w, f) in waits.iter_mut().zip(&flags) {
            let waker = std::task::Waker::from(f.clone());
            let mut cx = std::task::Context::from_waker(&waker);
            assert!(w.as_mut().poll(&mut cx).is_pending());
            // Polled again (a spurious wake): still one entry per task.
            assert!(w.as_mut().poll(&mut cx).is_pending());
        }
        bus.drain(1, 100, |_| {});
        for (i, f) in flags.iter().enumerate() {
            assert!(f.0.load(Ordering::SeqCst), "task {i} was not woken");
        }
    }
}
