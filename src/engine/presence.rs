//! Who is on a channel, node-wide: how many subscriptions each channel
//! has (occupied / vacated transitions, the channel listings of an HTTP
//! API) and, on channels that track members, who is present (members keyed
//! by a user id, each counting its connections, with the raw `info` it
//! joined with). Front-ends speak it in their own words (Pusher's
//! `member_added`, `channel_occupied`); the engine only keeps the counts.
//!
//! [`Presence`] is the seam: [`LocalPresence`] is this node's in-memory
//! implementation; [`NodePresence`] is what front-ends use: the local one
//! alone on a single node, and in a cluster the local one merged with the
//! other nodes' (a [`Roster`] fed by the cluster's ordered events), where
//! the transitions (occupied, vacated, member added or removed) are
//! decided for the whole cluster and acted on by the node that caused
//! them, through a handler the front-end installs.
//!
//! Subscribing is rare next to publishing, so the local one is plain shared
//! state: 64 mutex-guarded shards keyed by routing key. Every transition
//! (first subscription, last one, a user's first or last connection) is
//! decided under its shard's lock, so exactly one core sees it and reports
//! it once, however the channel's subscribers are spread.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use ahash::RandomState;

use super::core::{Broker, ClusterMembers, Core};
use super::roster::{Event, Except, Roster, Transition};

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
    /// Adds a connection of `user_id` (`except`: the connection, which is
    /// not told of its own joining). Returns whether it is the user's first
    /// connection there (so others are told of a new member) and the
    /// members now present.
    fn join(
        &self,
        key: &str,
        user_id: &str,
        user_info: &str,
        except: Option<Except>,
    ) -> (bool, Members);
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

    fn join(
        &self,
        key: &str,
        user_id: &str,
        user_info: &str,
        _except: Option<Except>,
    ) -> (bool, Members) {
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

/// Acts on a cluster-wide transition this node decided, on a core.
pub type Act = Box<dyn Fn(&Core, Transition) + Send + Sync>;

/// A node's presence: [`LocalPresence`], and in a cluster the other
/// nodes' too.
#[derive(Default)]
pub struct NodePresence {
    local: LocalPresence,
    cluster: OnceLock<InCluster>,
}

struct InCluster {
    broker: Arc<dyn Broker>,
    roster: Mutex<Roster>,
    act: Act,
    /// Held from a local change to its announcement, so that one node's
    /// events leave in the order its changes happened, whatever the cores.
    order: Mutex<()>,
    counts: Mutex<Counts>,
}

/// Subscription counts as the other nodes know them.
#[derive(Default)]
struct Counts {
    /// Keys whose count changed since the last report.
    dirty: HashSet<Box<str>>,
    /// Counts announced, where not one (a held key is believed to have
    /// one until told otherwise).
    told: HashMap<Box<str>, u64>,
}

impl NodePresence {
    /// Makes `this` part of the cluster `broker` links to: its changes are
    /// announced, the other nodes' applied, and `act` acts on the
    /// transitions this node decides.
    pub fn join_cluster(this: &Arc<NodePresence>, broker: Arc<dyn Broker>, act: Act) {
        let in_cluster = InCluster {
            broker: broker.clone(),
            roster: Mutex::new(Roster::default()),
            act,
            order: Mutex::new(()),
            counts: Mutex::new(Counts::default()),
        };
        if this.cluster.set(in_cluster).is_ok() {
            broker.attach_members(this.clone());
        }
    }

    fn ordered(c: &InCluster) -> std::sync::MutexGuard<'_, ()> {
        c.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn roster(c: &InCluster) -> std::sync::MutexGuard<'_, Roster> {
        c.roster.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counts(c: &InCluster) -> std::sync::MutexGuard<'_, Counts> {
        c.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that `key`'s subscription count changed (in a cluster).
    fn recount(&self, key: &str) {
        if let Some(c) = self.cluster.get() {
            let mut counts = Self::counts(c);
            if !counts.dirty.contains(key) {
                counts.dirty.insert(key.into());
            }
        }
    }

    /// In a cluster: makes a local change and, when it changes what this
    /// node holds, announces `event` (built with the node's name), both
    /// under the order lock. Alone: the local change's own answer.
    fn change(
        &self,
        local: impl FnOnce(&LocalPresence) -> bool,
        event: impl FnOnce(Box<str>) -> Event,
    ) -> bool {
        let Some(c) = self.cluster.get() else {
            return local(&self.local);
        };
        let _order = Self::ordered(c);
        if local(&self.local) {
            c.broker.announce(event(c.broker.node().into()));
        }
        // Cluster-wide transitions are decided in the cluster's order.
        false
    }

    /// Local members, then the other nodes' not among them.
    fn merged(&self, c: &InCluster, key: &str) -> Members {
        let mut members = self.local.members(key);
        let others = Self::roster(c).members_elsewhere(key, c.broker.node());
        for (user, info) in others {
            if !members.iter().any(|(u, _)| *u == user) {
                members.push((user, info));
            }
        }
        members
    }
}

impl Presence for NodePresence {
    fn subscribed(&self, key: &str) -> bool {
        self.recount(key);
        self.change(
            |l| l.subscribed(key),
            |node| Event::Occupy {
                node,
                key: key.into(),
            },
        )
    }

    fn unsubscribed(&self, key: &str) -> bool {
        self.recount(key);
        self.change(
            |l| l.unsubscribed(key),
            |node| {
                // The others forget its count with the vacate.
                if let Some(c) = self.cluster.get() {
                    Self::counts(c).told.remove(key);
                }
                Event::Vacate {
                    node,
                    key: key.into(),
                }
            },
        )
    }

    fn join(
        &self,
        key: &str,
        user_id: &str,
        user_info: &str,
        except: Option<Except>,
    ) -> (bool, Members) {
        let Some(c) = self.cluster.get() else {
            return self.local.join(key, user_id, user_info, except);
        };
        self.change(
            |l| l.join(key, user_id, user_info, except).0,
            |node| Event::Join {
                node,
                key: key.into(),
                user: user_id.into(),
                info: user_info.into(),
                except,
            },
        );
        (false, self.merged(c, key))
    }

    fn leave(&self, key: &str, user_id: &str) -> bool {
        self.change(
            |l| l.leave(key, user_id),
            |node| Event::Leave {
                node,
                key: key.into(),
                user: user_id.into(),
            },
        )
    }

    fn channel(&self, key: &str) -> Option<ChannelInfo> {
        let local = self.local.channel(key);
        let Some(c) = self.cluster.get() else {
            return local;
        };
        let elsewhere = Self::roster(c).occupied_elsewhere(key, c.broker.node());
        if local.is_none() && !elsewhere {
            return None;
        }
        let elsewhere = Self::roster(c).subscriptions_elsewhere(key, c.broker.node());
        Some(ChannelInfo {
            // Other nodes' counts are as of their last report (within
            // about a second).
            subscriptions: local.map_or(0, |l| l.subscriptions) + elsewhere,
            users: self.merged(c, key).len(),
        })
    }

    fn members(&self, key: &str) -> Members {
        match self.cluster.get() {
            None => self.local.members(key),
            Some(c) => self.merged(c, key),
        }
    }

    fn users(&self, key: &str) -> Vec<Box<str>> {
        match self.cluster.get() {
            None => self.local.users(key),
            Some(c) => self.merged(c, key).into_iter().map(|(u, _)| u).collect(),
        }
    }

    fn channels(&self, prefix: &str) -> Vec<(Box<str>, ChannelInfo)> {
        let local = self.local.channels(prefix);
        let Some(c) = self.cluster.get() else {
            return local;
        };
        let mut keys: Vec<Box<str>> = local.iter().map(|(k, _)| k.clone()).collect();
        keys.extend(Self::roster(c).channels_elsewhere(prefix, c.broker.node()));
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|k| self.channel(&k).map(|i| (k, i)))
            .collect()
    }
}

impl ClusterMembers for NodePresence {
    fn apply(&self, e: &Event) -> Vec<Transition> {
        let Some(c) = self.cluster.get() else {
            return Vec::new();
        };
        let transitions = Self::roster(c).apply(e);
        let here = e.decider() == c.broker.node();
        match e {
            // A request: for every node but the one that made it.
            Event::Terminate { .. } if here => Vec::new(),
            Event::Terminate { .. } => transitions,
            _ if here => transitions,
            _ => Vec::new(),
        }
    }

    fn announce_state(&self) {
        let Some(c) = self.cluster.get() else {
            return;
        };
        let _order = Self::ordered(c);
        let node = c.broker.node().into();
        let mut keys = Vec::new();
        let mut members = Vec::new();
        let mut counts = Vec::new();
        for shard in &self.local.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            for (k, ch) in shard.iter() {
                if ch.subscriptions > 0 {
                    keys.push(k.clone());
                }
                if ch.subscriptions > 1 {
                    counts.push((k.clone(), ch.subscriptions as u64));
                }
                for (user, _, info) in &ch.members {
                    members.push((k.clone(), user.clone(), info.clone()));
                }
            }
        }
        {
            let mut told = Self::counts(c);
            told.dirty.clear();
            told.told = counts.iter().cloned().collect();
        }
        c.broker.announce(Event::Reset {
            node,
            keys,
            members,
            counts,
        });
    }

    fn report_counts(&self) {
        let Some(c) = self.cluster.get() else {
            return;
        };
        // In order with the node's occupy and vacate events.
        let _order = Self::ordered(c);
        let mut counts = Self::counts(c);
        let dirty = std::mem::take(&mut counts.dirty);
        for key in dirty {
            let n = self.local.channel(&key).map_or(0, |i| i.subscriptions) as u64;
            let told = match n {
                // Vacated: the vacate said it.
                0 => {
                    counts.told.remove(&key);
                    continue;
                }
                _ => counts.told.get(&key).copied().unwrap_or(1),
            };
            if n == told {
                continue;
            }
            match n {
                1 => counts.told.remove(&key),
                _ => counts.told.insert(key.clone(), n),
            };
            c.broker.announce(Event::Count {
                node: c.broker.node().into(),
                key,
                n,
            });
        }
    }

    fn clear(&self) {
        if let Some(c) = self.cluster.get() {
            Self::roster(c).clear();
        }
    }

    fn act(&self, core: &Core, t: Transition) {
        if let Some(c) = self.cluster.get() {
            (c.act)(core, t);
        }
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
        let (first, m) = r.join("1#presence-x", "u1", r#"{"n":1}"#, None);
        assert!(first);
        assert_eq!(m, vec![("u1".into(), r#"{"n":1}"#.into())]);
        r.subscribed("1#presence-x");
        let (first, m) = r.join("1#presence-x", "u1", "null", None);
        assert!(!first);
        assert_eq!(m.len(), 1);
        let (first, m) = r.join("1#presence-x", "u2", "null", None);
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
