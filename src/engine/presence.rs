//! Who is on a channel, node-wide: how many subscriptions each channel
//! has (occupied / vacated transitions, the channel listings of an HTTP
//! API) and, on channels that track members, who is present (members keyed
//! by a user id, each counting its connections, with the raw `info` it
//! joined with). Front-ends speak it in their own words (Pusher's
//! `member_added`, `channel_occupied`); the engine only keeps the counts.
//!
//! [`Presence`] is the seam: [`LocalPresence`] is this node's in-memory
//! implementation; a cluster supplies one that agrees across nodes.
//!
//! Subscribing is rare next to publishing, so the local one is plain shared
//! state: 64 mutex-guarded shards keyed by routing key. Every transition
//! (first subscription, last one, a user's first or last connection) is
//! decided under its shard's lock, so exactly one core sees it and reports
//! it once, however the channel's subscribers are spread.

use std::collections::HashMap;
use std::sync::Mutex;

use ahash::RandomState;

const SHARDS: usize = 64;

/// One channel's cross-core state.
#[derive(Debug, Default)]
struct Channel {
    subscriptions: usize,
    /// user_id -> (connections, raw `user_info` JSON), in join order.
    members: Vec<(Box<str>, usize, Box<str>)>,
}

/// A channel's members in join order: (user id, raw info JSON).
pub type Members = Vec<(Box<str>, Box<str>)>;

/// Subscription counts and members of every channel, wherever they are
/// kept. Keys are routing keys (`{namespace}#{channel}`).
pub trait Presence: Send + Sync {
    /// Counts a subscription; true if it is the channel's first (occupied).
    fn subscribed(&self, key: &str) -> bool;
    /// Uncounts a subscription; true if it was the channel's last (vacated).
    fn unsubscribed(&self, key: &str) -> bool;
    /// Adds a connection of `user_id`. Returns whether it is the user's
    /// first connection there (so others are told of a new member) and the
    /// members now present.
    fn join(&self, key: &str, user_id: &str, user_info: &str) -> (bool, Members);
    /// Removes a connection of `user_id`; true if it was the user's last
    /// there (so others are told the member left).
    fn leave(&self, key: &str, user_id: &str) -> bool;
    /// A channel's counts, if it has a subscriber.
    fn channel(&self, key: &str) -> Option<ChannelInfo>;
    /// The members present on a channel.
    fn members(&self, key: &str) -> Members;
    /// The user ids present on a channel.
    fn users(&self, key: &str) -> Vec<Box<str>>;
    /// Occupied channels whose key starts with `prefix` (a namespace's
    /// `{n}#` followed by an optional channel-name prefix), sorted.
    fn channels(&self, prefix: &str) -> Vec<(Box<str>, ChannelInfo)>;
}

/// This node's subscription counts and members, in memory.
pub struct LocalPresence {
    shards: Vec<Mutex<HashMap<Box<str>, Channel>>>,
    hasher: RandomState,
}

impl Default for LocalPresence {
    fn default() -> Self {
        LocalPresence {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

/// A channel as the HTTP API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelInfo {
    pub subscriptions: usize,
    pub users: usize,
}

impl LocalPresence {
    fn shard(&self, key: &str) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Channel>> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        // A panic while holding the lock cannot leave a half-updated
        // counter behind (every update is one statement), so keep going.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Presence for LocalPresence {
    fn subscribed(&self, key: &str) -> bool {
        let mut shard = self.shard(key);
        let ch = shard.entry(key.into()).or_default();
        ch.subscriptions += 1;
        ch.subscriptions == 1
    }

    fn unsubscribed(&self, key: &str) -> bool {
        let mut shard = self.shard(key);
        let Some(ch) = shard.get_mut(key) else {
            return false;
        };
        ch.subscriptions = ch.subscriptions.saturating_sub(1);
        let vacated = ch.subscriptions == 0;
        if vacated && ch.members.is_empty() {
            shard.remove(key);
        }
        vacated
    }

    fn join(&self, key: &str, user_id: &str, user_info: &str) -> (bool, Members) {
        let mut shard = self.shard(key);
        let ch = shard.entry(key.into()).or_default();
        let first = match ch.members.iter_mut().find(|m| &*m.0 == user_id) {
            Some(m) => {
                m.1 += 1;
                false
            }
            None => {
                ch.members.push((user_id.into(), 1, user_info.into()));
                true
            }
        };
        let members = ch
            .members
            .iter()
            .map(|(id, _, info)| (id.clone(), info.clone()))
            .collect();
        (first, members)
    }

    fn leave(&self, key: &str, user_id: &str) -> bool {
        let mut shard = self.shard(key);
        let Some(ch) = shard.get_mut(key) else {
            return false;
        };
        let Some(i) = ch.members.iter().position(|m| &*m.0 == user_id) else {
            return false;
        };
        ch.members[i].1 -= 1;
        let last = ch.members[i].1 == 0;
        if last {
            ch.members.remove(i);
        }
        if ch.subscriptions == 0 && ch.members.is_empty() {
            shard.remove(key);
        }
        last
    }

    fn channel(&self, key: &str) -> Option<ChannelInfo> {
        let shard = self.shard(key);
        shard
            .get(key)
            .filter(|c| c.subscriptions > 0)
            .map(|c| ChannelInfo {
                subscriptions: c.subscriptions,
                users: c.members.len(),
            })
    }

    fn members(&self, key: &str) -> Members {
        let shard = self.shard(key);
        shard
            .get(key)
            .map(|c| {
                c.members
                    .iter()
                    .map(|(id, _, info)| (id.clone(), info.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn users(&self, key: &str) -> Vec<Box<str>> {
        let shard = self.shard(key);
        shard
            .get(key)
            .map(|c| c.members.iter().map(|m| m.0.clone()).collect())
            .unwrap_or_default()
    }

    fn channels(&self, prefix: &str) -> Vec<(Box<str>, ChannelInfo)> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (k, c) in shard.iter() {
                if c.subscriptions > 0 && k.starts_with(prefix) {
                    out.push((
                        k.clone(),
                        ChannelInfo {
                            subscriptions: c.subscriptions,
                            users: c.members.len(),
                        },
                    ));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupied_and_vacated_once() {
        let r = LocalPresence::default();
        assert!(r.subscribed("1#a"));
        assert!(!r.subscribed("1#a"));
        assert_eq!(
            r.channel("1#a"),
            Some(ChannelInfo {
                subscriptions: 2,
                users: 0
            })
        );
        assert!(!r.unsubscribed("1#a"));
        assert!(r.unsubscribed("1#a"));
        assert_eq!(r.channel("1#a"), None);
        assert!(!r.unsubscribed("1#a"));
    }

    #[test]
    fn members_count_once_per_user() {
        let r = LocalPresence::default();
        r.subscribed("1#presence-x");
        let (first, m) = r.join("1#presence-x", "u1", r#"{"n":1}"#);
        assert!(first);
        assert_eq!(m, vec![("u1".into(), r#"{"n":1}"#.into())]);
        r.subscribed("1#presence-x");
        let (first, m) = r.join("1#presence-x", "u1", "null");
        assert!(!first);
        assert_eq!(m.len(), 1);
        let (first, m) = r.join("1#presence-x", "u2", "null");
        assert!(first);
        assert_eq!(m.len(), 2);
        assert_eq!(r.channel("1#presence-x").unwrap().users, 2);
        assert!(!r.leave("1#presence-x", "u1"));
        assert!(r.leave("1#presence-x", "u1"));
        assert_eq!(r.users("1#presence-x"), vec![Box::<str>::from("u2")]);
        assert!(!r.leave("1#presence-x", "nobody"));
    }

    #[test]
    fn lists_by_prefix() {
        let r = LocalPresence::default();
        for k in ["1#b", "1#a", "2#a", "1#presence-c"] {
            r.subscribed(k);
        }
        let names: Vec<_> = r.channels("1#").into_iter().map(|c| c.0).collect();
        assert_eq!(names, ["1#a", "1#b", "1#presence-c"].map(Box::<str>::from));
        assert_eq!(r.channels("1#presence-").len(), 1);
    }
}
