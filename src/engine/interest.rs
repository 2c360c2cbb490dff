//! The interest map: for each channel, the set of cores holding at least one
//! local subscriber. A publish reads it to cross only to cores that need the
//! message. Shared by all cores; written only when a core's first
//! subscriber of a channel arrives or its last one leaves.
//!
//! A core sets its bit *before* it confirms a subscription, so every publish
//! that starts after the client saw `subscribed` finds the bit and reaches
//! it (protocol.md, "Ordering and liveness").

use std::collections::HashMap;

use std::sync::RwLock;

/// Lock shards: writers on different channels rarely meet.
const SHARDS: usize = 64;

type Map = HashMap<Box<str>, u64, ahash::RandomState>;

/// Which cores are interested in which channels (bit `i` = core `i`).
pub struct Interest {
    shards: Box<[RwLock<Map>]>,
    hasher: ahash::RandomState,
}

impl Default for Interest {
    fn default() -> Self {
        Self::new()
    }
}

impl Interest {
    pub fn new() -> Self {
        Interest {
            shards: (0..SHARDS).map(|_| RwLock::new(Map::default())).collect(),
            hasher: ahash::RandomState::new(),
        }
    }

    fn shard(&self, channel: &str) -> &RwLock<Map> {
        let h = self.hasher.hash_one(channel) as usize;
        &self.shards[h % SHARDS]
    }

    /// Marks `core` as holding a subscriber of `channel`.
    pub fn add(&self, channel: &str, core: usize) {
        let mut map = self
            .shard(channel)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match map.get_mut(channel) {
            Some(bits) => *bits |= 1 << core,
            None => {
                map.insert(channel.into(), 1 << core);
            }
        }
    }

    /// Marks `core` as holding no subscriber of `channel` any more.
    pub fn remove(&self, channel: &str, core: usize) {
        let mut map = self
            .shard(channel)
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(bits) = map.get_mut(channel) {
            *bits &= !(1 << core);
            if *bits == 0 {
                map.remove(channel);
            }
        }
    }

    /// The cores interested in `channel`.
    pub fn cores(&self, channel: &str) -> u64 {
        let map = self
            .shard(channel)
            .read()
            .unwrap_or_else(|e| e.into_inner());
        map.get(channel).copied().unwrap_or(0)
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
        i.add("a", 0);
        i.add("a", 3);
        i.add("a", 3);
        assert_eq!(i.cores("a"), 0b1001);
        assert_eq!(i.channel_count(), 1);
        i.remove("a", 0);
        assert_eq!(i.cores("a"), 0b1000);
        i.remove("a", 3);
        assert_eq!(i.cores("a"), 0);
        assert_eq!(i.channel_count(), 0);
        i.remove("never", 1);
    }
}
