//! Who is on which channel across a cluster: a replicated state machine.
//!
//! Each node says what changes *on that node* as [`Event`]s: its first
//! subscriber of a channel arrived (`Occupy`) or its last one left
//! (`Vacate`), a user's first connection to a presence channel joined or
//! its last one left, its whole state (`Reset`, when it (re)connects), or
//! that another node is gone (`Gone`, found by missing heartbeats). The
//! broker delivers the events in one order to every node, and every node
//! applies them to its [`Roster`] in that order, so all of them agree on
//! the cluster's state and on every cluster-wide [`Transition`] (a channel
//! occupied or vacated, a member added or removed) and on which node
//! caused it: that node alone acts on it (webhooks, member events), so
//! each is acted on exactly once.
//!
//! IO-free: the cluster link carries the events; the engine's presence
//! ([`super::presence::NodePresence`]) produces them and answers queries
//! from the roster merged with the node's own, newer, state.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// A connection that must not get a member event, where it lives:
/// worker, slot, generation.
pub type Except = (u16, u32, u64);

/// A change on one node, as every node applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum Event {
    Occupy {
        node: Box<str>,
        key: Box<str>,
    },
    Vacate {
        node: Box<str>,
        key: Box<str>,
    },
    Join {
        node: Box<str>,
        key: Box<str>,
        user: Box<str>,
        info: Box<str>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        except: Option<Except>,
    },
    Leave {
        node: Box<str>,
        key: Box<str>,
        user: Box<str>,
    },
    /// Everything `node` holds now, replacing what it held.
    Reset {
        node: Box<str>,
        keys: Vec<Box<str>>,
        /// (key, user, info).
        members: Vec<(Box<str>, Box<str>, Box<str>)>,
        /// Subscription counts of the keys with other than one.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        counts: Vec<(Box<str>, u64)>,
    },
    /// How many subscriptions `node` has of `key`, which it holds (sent
    /// when that changed from what the others believe; a held key is
    /// believed to have one until told otherwise).
    Count {
        node: Box<str>,
        key: Box<str>,
        n: u64,
    },
    /// `node` is gone (no heartbeat); `by` found it, and acts on what
    /// its leaving changes.
    Gone {
        node: Box<str>,
        by: Box<str>,
    },
    /// A request from `node` for every other node: close the connections
    /// of `user` in namespace `ns` (Pusher's `terminate_connections`).
    /// Changes no state.
    Terminate {
        node: Box<str>,
        ns: u16,
        user: Box<str>,
    },
}

impl Event {
    /// The node that acts on the transitions this event causes.
    pub fn decider(&self) -> &str {
        match self {
            Event::Occupy { node, .. }
            | Event::Vacate { node, .. }
            | Event::Join { node, .. }
            | Event::Leave { node, .. }
            | Event::Reset { node, .. }
            | Event::Count { node, .. }
            | Event::Terminate { node, .. } => node,
            Event::Gone { by, .. } => by,
        }
    }
}

/// A change of the whole cluster's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Occupied {
        key: Box<str>,
    },
    Vacated {
        key: Box<str>,
    },
    MemberAdded {
        key: Box<str>,
        user: Box<str>,
        info: Box<str>,
        except: Option<Except>,
    },
    MemberRemoved {
        key: Box<str>,
        user: Box<str>,
    },
    /// Close the connections of `user` in namespace `ns` here (for every
    /// node but the one that asked, which did).
    Terminate {
        ns: u16,
        user: Box<str>,
    },
}

/// What one node holds.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Held {
    keys: HashSet<Box<str>>,
    /// (key, user) -> info.
    members: HashMap<(Box<str>, Box<str>), Box<str>>,
    /// Subscriptions of held keys, where not one.
    counts: HashMap<Box<str>, u64>,
}

/// A member of a channel: the nodes where it is connected, the info of
/// its first join, and its place in join order.
type Member = (HashSet<Box<str>>, Box<str>, u64);

/// One channel across the cluster.
#[derive(Debug, Default)]
struct Channel {
    /// Nodes with a subscriber.
    nodes: HashSet<Box<str>>,
    /// user -> (nodes where connected, info of the first join), in first
    /// join order.
    members: BTreeMap<u64, Box<str>>,
    users: HashMap<Box<str>, Member>,
    next: u64,
}

impl Channel {
    fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.users.is_empty()
    }
}

/// The cluster's state as the ordered events built it.
#[derive(Debug, Default)]
pub struct Roster {
    channels: HashMap<Box<str>, Channel>,
    nodes: HashMap<Box<str>, Held>,
}

impl Roster {
    /// Applies `e`; returns the cluster-wide transitions it causes.
    pub fn apply(&mut self, e: &Event) -> Vec<Transition> {
        let mut out = Vec::new();
        match e {
            Event::Occupy { node, key } => self.occupy(node, key, &mut out),
            Event::Vacate { node, key } => self.vacate(node, key, &mut out),
            Event::Join {
                node,
                key,
                user,
                info,
                except,
            } => self.join(node, key, user, info, *except, &mut out),
            Event::Leave { node, key, user } => self.leave(node, key, user, &mut out),
            Event::Count { node, key, n } => self.count(node, key, *n),
            Event::Reset {
                node,
                keys,
                members,
                counts,
            } => {
                let old = self.nodes.get(node).cloned().unwrap_or_default();
                let keys: HashSet<Box<str>> = keys.iter().cloned().collect();
                let members: HashMap<(Box<str>, Box<str>), Box<str>> = members
                    .iter()
                    .map(|(k, u, i)| ((k.clone(), u.clone()), i.clone()))
                    .collect();
                // Joins before leaves, so a member that moves stays.
                for k in keys.difference(&old.keys) {
                    self.occupy(node, k, &mut out);
                }
                for ((k, u), i) in &members {
                    if !old.members.contains_key(&(k.clone(), u.clone())) {
                        self.join(node, k, u, i, None, &mut out);
                    }
                }
                for (k, u) in old.members.keys() {
                    if !members.contains_key(&(k.clone(), u.clone())) {
                        self.leave(node, k, u, &mut out);
                    }
                }
                for k in old.keys.difference(&keys) {
                    self.vacate(node, k, &mut out);
                }
                if let Some(held) = self.nodes.get_mut(node) {
                    held.counts.clear();
                }
                for (k, n) in counts {
                    self.count(node, k, *n);
                }
            }
            Event::Terminate { ns, user, .. } => out.push(Transition::Terminate {
                ns: *ns,
                user: user.clone(),
            }),
            Event::Gone { node, .. } => {
                let old = self.nodes.get(node).cloned().unwrap_or_default();
                for (k, u) in old.members.keys() {
                    self.leave(node, k, u, &mut out);
                }
                for k in &old.keys {
                    self.vacate(node, k, &mut out);
                }
                self.nodes.remove(node);
            }
        }
        out
    }

    fn occupy(&mut self, node: &str, key: &str, out: &mut Vec<Transition>) {
        let held = self.nodes.entry(node.into()).or_default();
        if !held.keys.insert(key.into()) {
            return;
        }
        let ch = self.channels.entry(key.into()).or_default();
        if ch.nodes.is_empty() {
            out.push(Transition::Occupied { key: key.into() });
        }
        ch.nodes.insert(node.into());
    }

    fn count(&mut self, node: &str, key: &str, n: u64) {
        let Some(held) = self.nodes.get_mut(node) else {
            return;
        };
        match held.keys.contains(key) && n != 1 {
            true => held.counts.insert(key.into(), n),
            false => held.counts.remove(key),
        };
    }

    fn vacate(&mut self, node: &str, key: &str, out: &mut Vec<Transition>) {
        let Some(held) = self.nodes.get_mut(node) else {
            return;
        };
        held.counts.remove(key);
        if !held.keys.remove(key) {
            return;
        }
        let Some(ch) = self.channels.get_mut(key) else {
            return;
        };
        ch.nodes.remove(node);
        if ch.nodes.is_empty() {
            out.push(Transition::Vacated { key: key.into() });
        }
        if ch.is_empty() {
            self.channels.remove(key);
        }
    }

    fn join(
        &mut self,
        node: &str,
        key: &str,
        user: &str,
        info: &str,
        except: Option<Except>,
        out: &mut Vec<Transition>,
    ) {
        let held = self.nodes.entry(node.into()).or_default();
        if held
            .members
            .insert((key.into(), user.into()), info.into())
            .is_some()
        {
            return;
        }
        let ch = self.channels.entry(key.into()).or_default();
        match ch.users.get_mut(user) {
            Some((nodes, _, _)) => {
                nodes.insert(node.into());
            }
            None => {
                let order = ch.next;
                ch.next += 1;
                ch.members.insert(order, user.into());
                ch.users
                    .insert(user.into(), ([node.into()].into(), info.into(), order));
                out.push(Transition::MemberAdded {
                    key: key.into(),
                    user: user.into(),
                    info: info.into(),
                    except,
                });
            }
        }
    }

    fn leave(&mut self, node: &str, key: &str, user: &str, out: &mut Vec<Transition>) {
        let Some(held) = self.nodes.get_mut(node) else {
            return;
        };
        if held.members.remove(&(key.into(), user.into())).is_none() {
            return;
        }
        let Some(ch) = self.channels.get_mut(key) else {
            return;
        };
        let Some((nodes, _, order)) = ch.users.get_mut(user) else {
            return;
        };
        nodes.remove(node);
        if nodes.is_empty() {
            let order = *order;
            ch.users.remove(user);
            ch.members.remove(&order);
            out.push(Transition::MemberRemoved {
                key: key.into(),
                user: user.into(),
            });
        }
        if ch.is_empty() {
            self.channels.remove(key);
        }
    }

    /// Forgets everything (before loading a snapshot).
    pub fn clear(&mut self) {
        self.channels.clear();
        self.nodes.clear();
    }

    /// The nodes that hold anything.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(|n| &**n)
    }

    /// Whether a node other than `but` has a subscriber of `key`.
    pub fn occupied_elsewhere(&self, key: &str, but: &str) -> bool {
        self.channels
            .get(key)
            .is_some_and(|c| c.nodes.iter().any(|n| **n != *but))
    }

    /// Subscriptions of `key` on nodes other than `but`.
    pub fn subscriptions_elsewhere(&self, key: &str, but: &str) -> usize {
        let Some(ch) = self.channels.get(key) else {
            return 0;
        };
        ch.nodes
            .iter()
            .filter(|n| ***n != *but)
            .map(|n| {
                let counted = self.nodes.get(n).and_then(|h| h.counts.get(key));
                counted.map_or(1, |&c| c.max(1) as usize)
            })
            .sum()
    }

    /// The members of `key` on nodes other than `but`, in first join order:
    /// (user, info).
    pub fn members_elsewhere(&self, key: &str, but: &str) -> Vec<(Box<str>, Box<str>)> {
        let Some(ch) = self.channels.get(key) else {
            return Vec::new();
        };
        ch.members
            .values()
            .filter_map(|u| {
                let (nodes, info, _) = ch.users.get(u)?;
                nodes
                    .iter()
                    .any(|n| **n != *but)
                    .then(|| (u.clone(), info.clone()))
            })
            .collect()
    }

    /// Channels with a subscriber on a node other than `but` whose key
    /// starts with `prefix`.
    pub fn channels_elsewhere(&self, prefix: &str, but: &str) -> Vec<Box<str>> {
        self.channels
            .iter()
            .filter(|(k, c)| k.starts_with(prefix) && c.nodes.iter().any(|n| **n != *but))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn occupy(node: &str, key: &str) -> Event {
        Event::Occupy {
            node: node.into(),
            key: key.into(),
        }
    }

    fn vacate(node: &str, key: &str) -> Event {
        Event::Vacate {
            node: node.into(),
            key: key.into(),
        }
    }

    fn join(node: &str, key: &str, user: &str) -> Event {
        Event::Join {
            node: node.into(),
            key: key.into(),
            user: user.into(),
            info: format!("{{\"n\":\"{user}\"}}").into(),
            except: None,
        }
    }

    fn leave(node: &str, key: &str, user: &str) -> Event {
        Event::Leave {
            node: node.into(),
            key: key.into(),
            user: user.into(),
        }
    }

    fn names(t: &[Transition]) -> Vec<String> {
        t.iter()
            .map(|t| match t {
                Transition::Occupied { key } => format!("occupied {key}"),
                Transition::Vacated { key } => format!("vacated {key}"),
                Transition::MemberAdded { key, user, .. } => format!("added {key} {user}"),
                Transition::MemberRemoved { key, user } => format!("removed {key} {user}"),
                Transition::Terminate { ns, user } => format!("terminate {ns} {user}"),
            })
            .collect()
    }

    #[test]
    fn a_channel_is_vacated_only_when_no_node_holds_it() {
        let mut r = Roster::default();
        assert_eq!(names(&r.apply(&occupy("a", "1#c"))), ["occupied 1#c"]);
        assert!(r.apply(&occupy("b", "1#c")).is_empty());
        assert!(
            r.apply(&occupy("b", "1#c")).is_empty(),
            "a repeat changes nothing"
        );
        assert!(r.apply(&vacate("a", "1#c")).is_empty(), "b still holds it");
        assert!(r.occupied_elsewhere("1#c", "a"));
        assert!(!r.occupied_elsewhere("1#c", "b"));
        assert_eq!(names(&r.apply(&vacate("b", "1#c"))), ["vacated 1#c"]);
        assert!(r.apply(&vacate("b", "1#c")).is_empty());
        assert!(r.channels.is_empty());
    }

    #[test]
    fn a_member_on_two_nodes_is_added_and_removed_once() {
        let mut r = Roster::default();
        assert_eq!(
            names(&r.apply(&join("a", "1#presence-x", "u1"))),
            ["added 1#presence-x u1"]
        );
        assert!(r.apply(&join("b", "1#presence-x", "u1")).is_empty());
        assert_eq!(
            names(&r.apply(&join("b", "1#presence-x", "u2"))),
            ["added 1#presence-x u2"]
        );
        let m = r.members_elsewhere("1#presence-x", "c");
        assert_eq!(
            m.iter().map(|(u, _)| &**u).collect::<Vec<_>>(),
            ["u1", "u2"]
        );
        assert_eq!(
            r.members_elsewhere("1#presence-x", "b").len(),
            1,
            "u1 is also on a"
        );
        assert!(r.apply(&leave("a", "1#presence-x", "u1")).is_empty());
        assert_eq!(
            names(&r.apply(&leave("b", "1#presence-x", "u1"))),
            ["removed 1#presence-x u1"]
        );
        assert!(r.apply(&leave("b", "1#presence-x", "u1")).is_empty());
    }

    #[test]
    fn a_gone_node_leaves_everything_it_held_once() {
        let mut r = Roster::default();
        r.apply(&occupy("a", "1#presence-x"));
        r.apply(&join("a", "1#presence-x", "u1"));
        r.apply(&occupy("b", "1#presence-x"));
        r.apply(&join("b", "1#presence-x", "u2"));
        r.apply(&occupy("b", "1#solo"));
        let gone = Event::Gone {
            node: "b".into(),
            by: "a".into(),
        };
        assert_eq!(gone.decider(), "a");
        let mut t = names(&r.apply(&gone));
        t.sort();
        assert_eq!(t, ["removed 1#presence-x u2", "vacated 1#solo"]);
        assert!(r.apply(&gone).is_empty(), "twice is once");
        assert_eq!(r.nodes().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn a_reset_changes_only_what_differs() {
        let mut r = Roster::default();
        r.apply(&occupy("a", "1#k1"));
        r.apply(&join("a", "1#presence-x", "u1"));
        r.apply(&occupy("b", "1#k2"));
        let reset = Event::Reset {
            node: "a".into(),
            keys: vec!["1#k1".into(), "1#k2".into()],
            members: vec![("1#presence-x".into(), "u2".into(), "{}".into())],
            counts: vec![],
        };
        let mut t = names(&r.apply(&reset));
        t.sort();
        assert_eq!(t, ["added 1#presence-x u2", "removed 1#presence-x u1"]);
        assert!(r.apply(&reset).is_empty());
        assert_eq!(r.channels_elsewhere("1#", "c").len(), 2);
    }

    #[test]
    fn subscriptions_are_counted_on_every_node() {
        let mut r = Roster::default();
        let count = |node: &str, key: &str, n| Event::Count {
            node: node.into(),
            key: key.into(),
            n,
        };
        assert_eq!(r.subscriptions_elsewhere("k", "c"), 0);
        r.apply(&occupy("a", "k"));
        r.apply(&occupy("b", "k"));
        assert_eq!(
            r.subscriptions_elsewhere("k", "c"),
            2,
            "one each until told"
        );
        assert!(r.apply(&count("a", "k", 5)).is_empty());
        assert_eq!(r.subscriptions_elsewhere("k", "c"), 6);
        assert_eq!(r.subscriptions_elsewhere("k", "a"), 1, "not its own");
        r.apply(&count("a", "other", 9));
        assert_eq!(r.subscriptions_elsewhere("other", "c"), 0, "not held");
        r.apply(&vacate("a", "k"));
        r.apply(&occupy("a", "k"));
        assert_eq!(
            r.subscriptions_elsewhere("k", "c"),
            2,
            "forgotten on vacate"
        );
        let reset = Event::Reset {
            node: "b".into(),
            keys: vec!["k".into()],
            members: vec![],
            counts: vec![("k".into(), 3)],
        };
        r.apply(&reset);
        assert_eq!(r.subscriptions_elsewhere("k", "c"), 4);
        let text = serde_json::to_string(&reset).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), reset);
        let gone = Event::Gone {
            node: "b".into(),
            by: "a".into(),
        };
        r.apply(&gone);
        assert_eq!(r.subscriptions_elsewhere("k", "c"), 1);
    }

    #[test]
    fn events_cross_nodes_as_json() {
        let e = Event::Join {
            node: "a".into(),
            key: "1#presence-x".into(),
            user: "u\u{1f}\"1".into(),
            info: "{\"x\":1}".into(),
            except: Some((1, 2, 3)),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), e);
        assert!(serde_json::from_str::<Event>(r#"{"e":"nope"}"#).is_err());
    }
}
