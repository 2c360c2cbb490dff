//! What one core counts: connections, subscriptions, messages and bytes,
//! closes. Each core writes only its own [`CoreStats`]; a scrape (any
//! thread) reads them all.
//!
//! A single writer needs no locked read-modify-write: [`Stat::add`] is a
//! plain load and store of a relaxed atomic, as cheap as a non-atomic add
//! on the hot path, and readers still see whole values. How the figures
//! are named and exposed is the metrics integration's business, not the
//! engine's.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// A counter with one writer (its core).
#[derive(Debug, Default)]
pub struct Stat(AtomicU64);

impl Stat {
    /// Adds `n`. Only the owning core may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A level that goes up and down, with one writer (its core).
#[derive(Debug, Default)]
pub struct Level(AtomicI64);

impl Level {
    #[inline]
    pub fn add(&self, n: i64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    #[inline]
    pub fn dec(&self) {
        self.add(-1);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Per namespace (a Pusher app; 0 is herald's own): publishes and the
/// deliveries they made on this core.
#[derive(Debug, Default)]
pub struct NamespaceStats {
    pub published: Stat,
    pub delivered: Stat,
}

/// One core's figures.
#[derive(Debug, Default)]
pub struct CoreStats {
    pub connections: Level,
    pub subscriptions: Level,
    pub channels: Level,
    pub messages_in: Stat,
    pub bytes_in: Stat,
    pub publishes: Stat,
    /// Frames queued to connections (deliveries and replies).
    pub messages_out: Stat,
    pub bytes_out: Stat,
    /// Published messages delivered here after another core sequenced them.
    pub cross_core_in: Stat,
    /// Publishes other cores handed to this one, their channels' owner.
    pub sequenced_for_others: Stat,
    /// Publishes dropped as repeats of an idempotency key.
    pub idempotent_repeats: Stat,
    /// Messages (and their frames' bytes) kept in the histories this
    /// core owns.
    pub history_messages: Level,
    pub history_bytes: Level,
    pub slow_consumer_closes: Stat,
    /// Connections closed when their authorization expired.
    pub expired_closes: Stat,
    pub protocol_errors: Stat,
    pub pending_evictions: Stat,
    pub request_timeouts: Stat,
    /// TLS handshakes completed, and failed (or not completed in time).
    pub tls_handshakes: Stat,
    pub tls_failures: Stat,
    pub pings_sent: Stat,
    pub ping_timeouts: Stat,
    /// Publishes refused for passing PUBLISH_RATE.
    pub rate_limited: Stat,
    pub memory_collections: Stat,
    /// Indexed by namespace (0: native).
    pub namespaces: Box<[NamespaceStats]>,
}

impl CoreStats {
    /// Figures for a core serving `namespaces` namespaces (at least one).
    pub fn new(namespaces: usize) -> CoreStats {
        CoreStats {
            namespaces: (0..namespaces.max(1))
                .map(|_| NamespaceStats::default())
                .collect(),
            ..CoreStats::default()
        }
    }

    /// The figures of namespace `ns`, if it exists.
    #[inline]
    pub fn namespace(&self, ns: u16) -> Option<&NamespaceStats> {
        self.namespaces.get(usize::from(ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_writer_counts() {
        let s = CoreStats::new(3);
        s.publishes.add(5);
        s.publishes.inc();
        s.connections.inc();
        s.connections.inc();
        s.connections.dec();
        s.namespace(2).unwrap().delivered.add(7);
        assert_eq!(s.publishes.get(), 6);
        assert_eq!(s.connections.get(), 1);
        assert_eq!(s.namespaces[2].delivered.get(), 7);
        assert!(s.namespace(3).is_none());
    }
}
