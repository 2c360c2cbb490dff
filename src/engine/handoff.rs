//! The engine's side of a restart on a single node: two processes serve
//! the same channels for the length of the old one's drain, and one of
//! them, the new one, numbers every message (`integrations::handoff` is
//! the link between them).
//!
//! - In the old process, once it has handed its history over, every
//!   channel's owner core **forwards** what it would have sequenced
//!   ([`Forward`]) instead of numbering it, and keeps its history as a
//!   replica of what the new process numbered
//!   (`Core::replicate`), so that its remaining
//!   subscribers still get every message, in order, and can still join
//!   with `since`.
//! - In the new process, every message an owner core sequenced is also
//!   handed to a [`Tap`] (towards the old process) while the old one
//!   drains.
//!
//! Neither costs a node that is not restarting more than one relaxed load
//! per publish.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::history::Place;
use super::message::Message;

/// What became of a forwarded publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// On its way; with a ticket, its outcome comes back to the owner
    /// core ([`super::core::Core::answer_forwarded`]).
    Sent,
    /// The link is full or lost while the new process serves: refused
    /// (the publisher is told the node is unavailable).
    Refused,
    /// The new process is gone before it served: number it here again.
    Gone,
}

/// Where an old process's owner cores send what they no longer number.
pub trait Forward: Send + Sync {
    /// `msg`, published on this node and sequenced nowhere yet, from
    /// owner core `owner`; `ticket` (nonzero) asks for its outcome.
    fn forward(
        &self,
        owner: usize,
        msg: &Arc<Message>,
        idempotency_key: Option<&str>,
        ticket: u64,
    ) -> Forwarded;
}

/// Where a new process's owner cores copy what they numbered.
pub trait Tap: Send + Sync {
    /// `msg` was sequenced, at `place` if its channel keeps history.
    fn sequenced(&self, msg: &Arc<Message>, place: Option<&Place>);
}

/// The node's state in a restart: forwarding (old), tapped (new), or
/// neither.
#[derive(Default)]
pub struct Handoff {
    forwarding: AtomicBool,
    forward: RwLock<Option<Arc<dyn Forward>>>,
    tapping: AtomicBool,
    tap: RwLock<Option<Arc<dyn Tap>>>,
}

impl Handoff {
    /// From now on owner cores forward instead of numbering (or, with
    /// `None`, number again: the new process is gone before it served).
    pub fn set_forward(&self, to: Option<Arc<dyn Forward>>) {
        let on = to.is_some();
        if let Ok(mut f) = self.forward.write() {
            *f = to;
        }
        self.forwarding.store(on, Ordering::Release);
    }

    /// Where to forward, when the node forwards.
    pub fn forward(&self) -> Option<Arc<dyn Forward>> {
        if !self.forwarding.load(Ordering::Acquire) {
            return None;
        }
        self.forward.read().ok().and_then(|f| f.clone())
    }

    /// From now on (until `None`) sequenced messages are also handed to
    /// `to`.
    pub fn set_tap(&self, to: Option<Arc<dyn Tap>>) {
        let on = to.is_some();
        if let Ok(mut t) = self.tap.write() {
            *t = to;
        }
        self.tapping.store(on, Ordering::Release);
    }

    /// Are sequenced messages copied to a restart's old process?
    pub fn tapping(&self) -> bool {
        self.tapping.load(Ordering::Acquire)
    }

    /// Hands a sequenced message to the tap, if one is set.
    #[inline]
    pub fn tap(&self, msg: &Arc<Message>, place: Option<&Place>) {
        if !self.tapping.load(Ordering::Relaxed) {
            return;
        }
        // Taken out of the lock first: a tap may take itself away.
        let tap = self.tap.read().ok().and_then(|t| t.clone());
        if let Some(t) = tap {
            t.sequenced(msg, place);
        }
    }
}
