//! The interest map: for each routing key, the set of cores holding at
//! least one local subscriber. A publish reads it to cross only to cores
//! that need the message. Shared by all cores; written only when a core's
//! first subscriber of a channel arrives or its last one leaves, which is
//! also the node-level "first/last subscriber" event a cluster needs.
//!
//! Keys are looked up with the hash a [`Message`](super::message::Message)
//! carries ([`route_hash`]), computed once per publish.
//!
//! A core sets its bit *before* it confirms a subscription, so every publish
//! that starts after the client saw `subscribed` finds the bit and reaches
//! it (protocol.md, "Ordering and liveness").

use std::sync::{OnceLock, RwLock};

use hashbrown::HashTable;

use super::message::route_hash;

/// Lock shards: writers on different channels rarely meet.
const SHARDS: usize = 64;

type Map = HashTable<(Box<str>, u64)>;

/// Told of the node's first and last subscriber of each key.
pub type Observer = Box<dyn Fn(&str, Change) + Send + Sync>;

/// Which cores are interested in which channels (bit `i` = core `i`).
pub struct Interest {
    shards: Box<[RwLock<Map>]>,
    /// Called under the key's lock, so the changes of one key reach it in
    /// the order they happened, whichever cores made them.
    observer: OnceLock<Observer>,
}

impl Default for Interest {
    fn default() -> Self {
        Self::new()
    }
}

/// What a change of the map means for the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The node's first subscriber of the key (no core had one).
    First,
    /// The node's last subscriber left (no core has one any more).
    Last,
    /// Other cores still (or already) hold subscribers.
    Neither,
}

impl Interest {
    pub fn new() -> Self {
        Interest {
            shards: (0..SHARDS).map(|_| RwLock::new(Map::new())).collect(),
            observer: OnceLock::new(),
        }
    }

    /// Tells `observer` of every later first and last subscriber (a
    /// cluster's broker subscriptions follow them). Set once, before any
    /// subscriber; false if one was set already.
    pub fn observe(&self, observer: Observer) -> bool {
        self.observer.set(observer).is_ok()
    }

    fn tell(&self, key: &str, change: Change) {
        if let Some(o) = self.observer.get() {
            o(key, change);
        }
    }

    fn shard(&self, hash: u64) -> &RwLock<Map> {
        // The high bits: the tables use the low ones.
        &self.shards[(hash >> 58) as usize % SHARDS]
    }

    /// Marks `core` as holding a subscriber of `key` (hash `hash`).
    pub fn add_hashed(&self, key: &str, hash: u64, core: usize) -> Change {
        let mut map = self.shard(hash).write().unwrap_or_else(|e| e.into_inner());
        match map.find_mut(hash, |(k, _)| &**k == key) {
            Some((_, bits)) => {
                *bits |= 1 << core;
                Change::Neither
            }
            None => {
                map.insert_unique(hash, (key.into(), 1 << core), |(k, _)| route_hash(k));
                self.tell(key, Change::First);
                Change::First
            }
        }
    }

    /// Marks `core` as holding a subscriber of `key`.
    pub fn add(&self, key: &str, core: usize) -> Change {
        self.add_hashed(key, route_hash(key), core)
    }

    /// Marks `core` as holding no subscriber of `key` any more.
    pub fn remove(&self, key: &str, core: usize) -> Change {
        let hash = route_hash(key);
        let mut map = self.shard(hash).write().unwrap_or_else(|e| e.into_inner());
        let Ok(mut entry) = map.find_entry(hash, |(k, _)| &**k == key) else {
            return Change::Neither;
        };
        entry.get_mut().1 &= !(1 << core);
        if entry.get().1 == 0 {
            entry.remove();
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit(|(k, _)| route_hash(k));
            }
            self.tell(key, Change::Last);
            return Change::Last;
        }
        Change::Neither
    }

    /// The cores interested in the key with hash `hash`.
    pub fn cores_hashed(&self, key: &str, hash: u64) -> u64 {
        let map = self.shard(hash).read().unwrap_or_else(|e| e.into_inner());
        map.find(hash, |(k, _)| &**k == key).map_or(0, |(_, b)| *b)
    }

    /// The cores interested in `key`.
    pub fn cores(&self, key: &str) -> u64 {
        self.cores_hashed(key, route_hash(key))
    }

    /// Channels with at least one subscriber anywhere.
    pub fn channel_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_follow_first_and_last_subscriber() {
        let i = Interest::new();
        assert_eq!(i.cores("a"), 0);
        assert_eq!(i.add("a", 0), Change::First);
        assert_eq!(i.add("a", 3), Change::Neither);
        assert_eq!(i.add("a", 3), Change::Neither);
        assert_eq!(i.cores("a"), 0b1001);
        assert_eq!(i.cores_hashed("a", route_hash("a")), 0b1001);
        assert_eq!(i.channel_count(), 1);
        assert_eq!(i.remove("a", 0), Change::Neither);
        assert_eq!(i.cores("a"), 0b1000);
        assert_eq!(i.remove("a", 3), Change::Last);
        assert_eq!(i.cores("a"), 0);
        assert_eq!(i.channel_count(), 0);
        assert_eq!(i.remove("never", 1), Change::Neither);
    }

    #[test]
    fn the_observer_hears_first_and_last_only() {
        use std::sync::{Arc, Mutex};
        let i = Interest::new();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        assert!(i.observe(Box::new(move |k, c| h
            .lock()
            .unwrap()
            .push((k.to_string(), c)))));
        assert!(!i.observe(Box::new(|_, _| {})), "set once");
        i.add("a", 0);
        i.add("a", 1);
        i.remove("a", 0);
        i.remove("a", 1);
        i.remove("a", 1);
        let heard = heard.lock().unwrap();
        assert_eq!(
            *heard,
            [
                ("a".to_string(), Change::First),
                ("a".to_string(), Change::Last)
            ]
        );
    }

    #[test]
    fn many_keys_grow_and_shrink() {
        let i = Interest::new();
        let keys: Vec<String> = (0..5000).map(|n| format!("k{n}")).collect();
        for k in &keys {
            i.add(k, 1);
        }
        assert_eq!(i.channel_count(), 5000);
        assert!(keys.iter().all(|k| i.cores(k) == 2));
        for k in &keys {
            i.remove(k, 1);
        }
        assert_eq!(i.channel_count(), 0);
    }
}
