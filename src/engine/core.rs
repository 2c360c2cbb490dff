//! One core's engine: its [`Shard`], and the publish path that ties it to
//! the other cores through the node-wide [`Hub`] (the interest map and the
//! bus).
//!
//! [`Core::publish`] is the whole fan-out: read the interest map with the
//! message's precomputed hash, hand a refcounted clone of the message to
//! each other interested core through the bus, then deliver to local
//! subscribers. [`Core::drain`] is the other cores' half.

use std::cell::RefCell;
use std::sync::Arc;

use super::bus::{self, Bus};
use super::interest::Interest;
use super::message::{Encoder, Message};
use super::shard::{Limits, Shard, SubscribeError};
use super::stats::CoreStats;

/// What every core shares: which cores want which channels, and the
/// queues between them.
pub struct Hub {
    pub interest: Interest,
    pub bus: Arc<Bus>,
    /// The encoders of the node's front-ends, by encoding.
    pub encoders: &'static [Encoder],
}

impl Hub {
    pub fn new(cores: usize, bus_capacity: usize, encoders: &'static [Encoder]) -> Hub {
        Hub {
            interest: Interest::new(),
            bus: Bus::new(cores, bus_capacity),
            encoders,
        }
    }
}

/// One reactor's engine.
pub struct Core {
    pub id: usize,
    pub shard: RefCell<Shard>,
    pub stats: Arc<CoreStats>,
    pub hub: Arc<Hub>,
}

impl Core {
    pub fn new(id: usize, hub: Arc<Hub>, limits: Limits, stats: Arc<CoreStats>) -> Core {
        Core {
            id,
            shard: RefCell::new(Shard::new(id, limits, stats.clone(), hub.encoders)),
            stats,
            hub,
        }
    }

    /// Subscribes connection `key` to routing key `channel` (the interest
    /// map learns of it before this returns).
    pub fn subscribe(&self, key: usize, channel: &str) -> Result<(), SubscribeError> {
        self.shard
            .borrow_mut()
            .subscribe(key, channel, &self.hub.interest)
    }

    /// Unsubscribes `key` from `channel`; false if it was not subscribed.
    pub fn unsubscribe(&self, key: usize, channel: &str) -> bool {
        self.shard
            .borrow_mut()
            .unsubscribe(key, channel, &self.hub.interest)
    }

    /// Forgets a finished connection and its subscriptions.
    pub fn remove(&self, key: usize, gen: u64) {
        self.shard.borrow_mut().remove(key, gen, &self.hub.interest);
    }

    /// Is any queue towards another core full? Then publishers on this
    /// core must pause before decoding more.
    pub fn congested(&self) -> bool {
        self.hub.bus.congested(self.id)
    }

    /// Waits until no queue towards another core is full.
    pub fn wait_for_space(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.hub.bus.wait_for_space(self.id)
    }

    /// Publishes `msg`: to other interested cores through the bus, then to
    /// local subscribers except `except`. The caller has checked
    /// [`Core::congested`] before decoding the message.
    pub fn publish(&self, msg: Message, except: Option<usize>) {
        self.stats.publishes.inc();
        let ns = self.stats.namespace(msg.namespace());
        if let Some(ns) = ns {
            ns.published.inc();
        }
        let hash = msg.hash();
        let interested = msg.with_key(|k| self.hub.interest.cores_hashed(k, hash));
        let mut others = interested & !(1u64 << self.id);
        let msg: bus::Shared = Arc::new(msg);
        while others != 0 {
            let dst = others.trailing_zeros() as usize;
            others &= others - 1;
            self.hub.bus.send(self.id, dst, msg.clone());
        }
        let mut shard = self.shard.borrow_mut();
        let except = except.or_else(|| excluded(&shard, &msg, self.id));
        let n = shard.deliver(&msg, except);
        if let Some(ns) = ns {
            ns.delivered.add(n as u64);
        }
    }

    /// Delivers what other cores published, in batches of at most `max`.
    /// Returns whether more are waiting.
    pub fn drain(&self, max: usize) -> bool {
        let mut shard = self.shard.borrow_mut();
        let (n, more) = self.hub.bus.drain(self.id, max, |msg| {
            let except = excluded(&shard, &msg, self.id);
            let n = shard.deliver(&msg, except);
            if let Some(ns) = self.stats.namespace(msg.namespace()) {
                ns.delivered.add(n as u64);
            }
        });
        self.stats.cross_core_in.add(n as u64);
        more
    }

    /// Waits until another core has queued something for this one.
    pub async fn wait_for_messages(&self) {
        self.hub.bus.wait_for_messages(self.id).await
    }
}

/// The connection of this core `msg` must skip, if it is still the one
/// the exclusion named (same generation).
fn excluded(shard: &Shard, msg: &Message, core: usize) -> Option<usize> {
    let (key, gen) = msg.except_on(core)?;
    shard.conn(key).filter(|c| c.gen == gen).map(|_| key)
}
