//! What the debug console shows as it happens: a bounded, sampled record
//! of the node's events (publishes, subscriptions, presence, webhooks),
//! kept only while a console is open.
//!
//! Nothing is recorded, and nothing allocated, while no console has asked
//! for events in the last [`IDLE_MS`]: each place that could record checks
//! one relaxed atomic flag first ([`watch`]`().on()`), which is what the
//! publish path pays when nobody watches. While one watches, at most
//! [`PER_SECOND`] events are kept per second (the rest are counted as
//! dropped, so that a console under heavy load costs a bounded amount),
//! and the newest [`KEPT`] are held for the console to read.
//!
//! One per process, like the metrics registry, so that every layer that
//! has something to show (the engine, the front-ends, the webhook thread)
//! reaches it without being handed it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Events kept for the console.
pub const KEPT: usize = 1000;
/// Most events recorded per second; the rest are counted, not kept.
pub const PER_SECOND: u32 = 200;
/// A console that has not asked for this long is gone: recording stops.
pub const IDLE_MS: u64 = 10_000;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Its number, increasing.
    pub seq: u64,
    /// When, in Unix ms.
    pub at: u64,
    /// What happened: `publish`, `subscribe`, `unsubscribe`,
    /// `member_added`, `member_removed`, `webhook`, ...
    pub kind: &'static str,
    /// The channel's namespace (0: herald's own; n: Pusher app n - 1).
    pub namespace: u16,
    pub channel: Box<str>,
    /// A few words more (a size, a user, a status).
    pub detail: String,
}

struct Ring {
    next: u64,
    events: VecDeque<Seen>,
    /// The second (Unix) being counted, and events kept in it.
    second: u64,
    in_second: u32,
    dropped: u64,
}

/// The node's record of events for the console.
pub struct Watch {
    on: AtomicBool,
    /// When a console last asked (Unix ms).
    asked: AtomicU64,
    ring: Mutex<Ring>,
}

/// The process's one [`Watch`].
#[inline]
pub fn watch() -> &'static Watch {
    static WATCH: Watch = Watch::new();
    &WATCH
}

impl Default for Watch {
    fn default() -> Self {
        Self::new()
    }
}

impl Watch {
    pub const fn new() -> Watch {
        Watch {
            on: AtomicBool::new(false),
            asked: AtomicU64::new(0),
            ring: Mutex::new(Ring {
                next: 0,
                events: VecDeque::new(),
                second: 0,
                in_second: 0,
                dropped: 0,
            }),
        }
    }

    /// Is a console watching? The only cost when none is.
    #[inline]
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Records an event now, within the per-second bound.
    pub fn record(&self, kind: &'static str, namespace: u16, channel: &str, detail: String) {
        self.record_at(unix_ms(), kind, namespace, channel, detail);
    }

    /// Records an event at `now` (Unix ms).
    pub fn record_at(
        &self,
        now: u64,
        kind: &'static str,
        namespace: u16,
        channel: &str,
        detail: String,
    ) {
        if now.saturating_sub(self.asked.load(Ordering::Relaxed)) > IDLE_MS {
            // The console went away.
            self.on.store(false, Ordering::Relaxed);
            return;
        }
        let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let second = now / 1000;
        if second != r.second {
            r.second = second;
            r.in_second = 0;
        }
        if r.in_second >= PER_SECOND {
            r.dropped += 1;
            return;
        }
        r.in_second += 1;
        r.next += 1;
        let seq = r.next;
        if r.events.len() == KEPT {
            r.events.pop_front();
        }
        r.events.push_back(Seen {
            seq,
            at: now,
            kind,
            namespace,
            channel: channel.into(),
            detail,
        });
    }

    /// A console asks (at `now`) for the events after `after`: they are
    /// recorded from now on, for [`IDLE_MS`]. Returns them, oldest first,
    /// and how many were dropped in all.
    pub fn since(&self, now: u64, after: u64) -> (Vec<Seen>, u64) {
        self.asked.store(now, Ordering::Relaxed);
        self.on.store(true, Ordering::Relaxed);
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let events = r.events.iter().filter(|e| e.seq > after).cloned().collect();
        (events, r.dropped)
    }
}

/// The wall clock, in Unix ms: what the console shows events at.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A routing key's namespace and channel name (`{n}#{channel}`, or the
/// channel itself in namespace 0).
pub fn split_key(key: &str) -> (u16, &str) {
    match key.split_once('#') {
        Some((n, c)) => match n.parse() {
            Ok(n) => (n, c),
            Err(_) => (0, key),
        },
        None => (0, key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_kept_until_a_console_asks_and_then_a_bounded_amount() {
        let w = Watch::default();
        assert!(!w.on());
        let now = 1_000_000;
        let (events, _) = w.since(now, 0);
        assert!(events.is_empty() && w.on());
        for i in 0..PER_SECOND + 5 {
            w.record_at(now, "publish", 0, "news", i.to_string());
        }
        let (events, dropped) = w.since(now, 0);
        assert_eq!((events.len(), dropped), (PER_SECOND as usize, 5));
        let (after, _) = w.since(now, events[9].seq);
        assert_eq!(after.len(), PER_SECOND as usize - 10);
        // The next second has room again; the oldest go past KEPT.
        for s in 1..=10 {
            for _ in 0..PER_SECOND {
                w.record_at(now + s * 1000, "publish", 0, "news", String::new());
            }
        }
        assert_eq!(w.since(now + 10_000, 0).0.len(), KEPT);
        // A console silent for IDLE_MS: recording stops.
        w.record_at(
            now + 10_000 + IDLE_MS + 1,
            "publish",
            0,
            "news",
            String::new(),
        );
        assert!(!w.on());
    }

    #[test]
    fn keys_name_their_namespace() {
        assert_eq!(split_key("3#presence-room"), (3, "presence-room"));
        assert_eq!(split_key("news"), (0, "news"));
    }
}
