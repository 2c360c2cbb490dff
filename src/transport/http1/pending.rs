//! The connections of one reactor that have not become WebSockets yet:
//! handshakes in progress and HTTP API connections (between or during
//! requests). Each holds a socket and a file descriptor while it waits on
//! its peer, so their number is bounded: when a reactor already holds its
//! share of `MAX_PENDING` and accepts another, the oldest one is evicted
//! (closed). A peer that opens connections and sends nothing, or half a
//! body, can then only push out its own older connections; it can never
//! use up the descriptors WebSocket clients need, however many it opens.
//!
//! No IO here: [`Pending::admit`] hands out a ticket, the connection's task
//! waits on [`Pending::poll_evicted`] beside its work, and drops out with
//! [`Pending::leave`].

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};

use slab::Slab;

/// A pending connection's place in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    slot: usize,
    gen: u64,
}

#[derive(Debug)]
struct Slot {
    gen: u64,
    evicted: bool,
    waker: Option<Waker>,
}

/// One reactor's pending connections, oldest first.
#[derive(Debug)]
pub struct Pending {
    cap: usize,
    slots: Slab<Slot>,
    /// Tickets in admission order; entries that left are skipped lazily.
    order: VecDeque<Ticket>,
    /// Slots evicted whose task has not left yet.
    evicted: usize,
    next_gen: u64,
}

impl Pending {
    /// A registry holding at most `cap` (at least 1) connections.
    pub fn new(cap: usize) -> Pending {
        Pending {
            cap: cap.max(1),
            slots: Slab::new(),
            order: VecDeque::new(),
            evicted: 0,
            next_gen: 0,
        }
    }

    /// Connections pending now.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Admits a new connection. At the cap, the oldest one still pending
    /// is evicted first (its task is woken to close it); returns whether
    /// one was.
    pub fn admit(&mut self) -> (Ticket, bool) {
        let mut evicted = false;
        while self.live() >= self.cap {
            let Some(t) = self.order.pop_front() else {
                break;
            };
            if let Some(slot) = self.slots.get_mut(t.slot).filter(|s| s.gen == t.gen) {
                if !slot.evicted {
                    slot.evicted = true;
                    self.evicted += 1;
                    evicted = true;
                    if let Some(w) = slot.waker.take() {
                        w.wake();
                    }
                }
            }
        }
        self.next_gen += 1;
        let gen = self.next_gen;
        let slot = self.slots.insert(Slot {
            gen,
            evicted: false,
            waker: None,
        });
        let t = Ticket { slot, gen };
        self.order.push_back(t);
        // Keep the order queue from growing past the live entries with
        // stale tickets of connections that left on their own.
        if self.order.len() > 2 * self.cap + 16 {
            let slots = &self.slots;
            self.order
                .retain(|t| slots.get(t.slot).is_some_and(|s| s.gen == t.gen));
        }
        (t, evicted)
    }

    /// Connections pending and not yet told to go.
    fn live(&self) -> usize {
        self.slots.len() - self.evicted
    }

    /// Ready once `t` has been evicted.
    pub fn poll_evicted(&mut self, t: Ticket, cx: &mut Context<'_>) -> Poll<()> {
        match self.slots.get_mut(t.slot).filter(|s| s.gen == t.gen) {
            Some(s) if !s.evicted => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    }

    /// Frees spare capacity left by a storm of connections.
    pub fn shrink(&mut self) {
        if self.slots.capacity() > 64 && self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to_fit();
        }
        if self.order.capacity() > 64 && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to_fit();
        }
    }

    /// `t` is done being pending (upgraded, finished, or closed).
    pub fn leave(&mut self, t: Ticket) {
        if self.slots.get(t.slot).is_some_and(|s| s.gen == t.gen)
            && self.slots.remove(t.slot).evicted
        {
            self.evicted -= 1;
        }
        if self.slots.is_empty() {
            self.order.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evicted(p: &mut Pending, t: Ticket) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        p.poll_evicted(t, &mut cx).is_ready()
    }

    #[test]
    fn the_oldest_is_evicted_at_the_cap() {
        let mut p = Pending::new(3);
        let a = p.admit().0;
        let b = p.admit().0;
        let c = p.admit().0;
        assert!(!evicted(&mut p, a));
        let (d, ev) = p.admit();
        assert!(ev);
        assert!(evicted(&mut p, a));
        assert!(!evicted(&mut p, b) && !evicted(&mut p, c) && !evicted(&mut p, d));
        // b leaves by itself: the next admission evicts no one.
        p.leave(b);
        p.leave(a);
        let (_, ev) = p.admit();
        assert!(!ev);
        assert_eq!(p.len(), 3);
        // Now c is the oldest.
        let (_, ev) = p.admit();
        assert!(ev && evicted(&mut p, c));
    }

    #[test]
    fn an_evicted_task_is_woken() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        let mut p = Pending::new(1);
        let a = p.admit().0;
        assert!(p
            .poll_evicted(a, &mut Context::from_waker(&waker))
            .is_pending());
        p.admit();
        assert!(flag.0.load(Ordering::SeqCst));
    }

    #[test]
    fn stale_tickets_do_not_pile_up() {
        let mut p = Pending::new(4);
        for _ in 0..10_000 {
            let (t, ev) = p.admit();
            assert!(!ev);
            p.leave(t);
        }
        assert!(p.order.len() <= 2 * 4 + 16);
        assert!(p.is_empty());
    }
}
