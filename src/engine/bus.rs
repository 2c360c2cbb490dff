//! The cross-core bus: how a publish reaches subscribers owned by other
//! reactors.
//!
//! One bounded crossbeam queue per (source, destination) pair carries
//! [`Message`]s, already encoded: crossing a core costs a refcount
//! increment, never a copy. Each destination has one coalescing wakeup: the
//! first message of a burst flips `pending` and wakes the destination's
//! drain task (monoio turns a cross-thread wake into one eventfd write);
//! later messages of the burst find `pending` set and wake no one.
//!
//! Backpressure instead of unbounded memory: a source checks
//! [`Bus::congested`] before it decodes the next client message, and waits
//! in [`Bus::wait_for_space`] until the destination has drained. Each pair
//! has exactly one producing thread, so check-then-send cannot overshoot.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::engine::message::Message;

/// What crosses cores: a published message, shared.
pub type Shared = Arc<Message>;

/// Room kept above the congestion mark, for the messages one client
/// message may produce after the check.
const SLACK: usize = 1024;

struct Link {
    tx: Sender<Shared>,
    rx: Receiver<Shared>,
    /// The source reactor waits here for the destination to drain.
    space: AtomicWaker,
    producer_waiting: AtomicBool,
}

struct Inbox {
    pending: AtomicBool,
    waker: AtomicWaker,
}

/// The queues between every pair of cores.
pub struct Bus {
    cores: usize,
    capacity: usize,
    links: Box<[Link]>,
    inboxes: Box<[Inbox]>,
}

impl Bus {
    /// A bus for `cores` reactors, each link holding about `capacity` messages.
    pub fn new(cores: usize, capacity: usize) -> Arc<Bus> {
        let links = (0..cores * cores)
            .map(|i| {
                // A core never sends to itself: its own link holds no
                // buffer (a bounded queue allocates all its slots at once).
                let room = if i / cores == i % cores {
                    0
                } else {
                    capacity + SLACK
                };
                let (tx, rx) = crossbeam_channel::bounded(room);
                Link {
                    tx,
                    rx,
                    space: AtomicWaker::new(),
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
        Arc::new(Bus {
            cores,
            capacity,
            links,
            inboxes,
        })
    }

    fn link(&self, src: usize, dst: usize) -> &Link {
        &self.links[src * self.cores + dst]
    }

    /// Is any queue leaving `src` at its mark? Then `src` must stop reading.
    pub fn congested(&self, src: usize) -> bool {
        (0..self.cores).any(|dst| dst != src && self.link(src, dst).tx.len() >= self.capacity)
    }

    /// Queues `msg` from `src` to `dst` and wakes `dst` if it was idle.
    /// Returns false only if the queue's slack was exhausted, which the
    /// congestion check prevents.
    pub fn send(&self, src: usize, dst: usize, msg: Shared) -> bool {
        match self.link(src, dst).tx.try_send(msg) {
            Ok(()) => {
                self.notify(dst);
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
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
    pub fn drain(&self, dst: usize, max: usize, mut deliver: impl FnMut(Shared)) -> (usize, bool) {
        let mut n = 0;
        let mut more = false;
        for src in (0..self.cores).filter(|&s| s != dst) {
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
                link.space.wake();
            }
        }
        (n, more)
    }

    /// Waits until no queue leaving `src` is congested.
    pub async fn wait_for_space(&self, src: usize) {
        poll_fn(|cx| {
            let mut blocked = false;
            for dst in (0..self.cores).filter(|&d| d != src) {
                let link = self.link(src, dst);
                if link.tx.len() >= self.capacity {
                    link.space.register(cx.waker());
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
                Poll::Ready(())
            }
        })
        .await
    }
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
        let bus = Bus::new(2, 8);
        let p = message_frame("a", "1");
        assert!(bus.send(0, 1, p.clone()));
        let mut got = Vec::new();
        let (n, more) = bus.drain(1, 100, |m| got.push(m));
        assert_eq!((n, more), (1, false));
        assert_eq!(got[0].channel(), "a");
        // Same allocation: the frame crossed as a refcounted clone.
        assert_eq!(got[0].frame().as_ptr(), p.frame().as_ptr());
    }

    #[test]
    fn congestion_at_capacity() {
        let bus = Bus::new(2, 4);
        for _ in 0..4 {
            assert!(!bus.congested(0));
            bus.send(0, 1, message_frame("a", "1"));
        }
        assert!(bus.congested(0));
        assert!(!bus.congested(1));
        let (n, _) = bus.drain(1, 2, |_| {});
        assert_eq!(n, 2);
        assert!(!bus.congested(0));
    }
}
