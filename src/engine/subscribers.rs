//! The local subscribers of one channel, as compact as their number
//! allows: most channels have one subscriber or a few (a user's own
//! channel, a chat room), a few have thousands (a news feed).
//!
//! - one: the connection key inline, no allocation;
//! - a few (up to [`FEW`]): a short vector, searched linearly;
//! - many: an index set (O(1) insert and removal, dense iteration for the
//!   fan-out), boxed so the small cases stay small.
//!
//! [`ConnSubs`] is the other direction: the channels one connection is
//! subscribed to, the first inline.
//!
//! Keys are a shard's connection slots, chosen by the server, so the big
//! set hashes them with a fixed-key hasher: no per-set random state.
//! Order is not kept across removals (removal swaps the last key in).

use std::hash::BuildHasherDefault;
use std::rc::Rc;

use indexmap::IndexSet;

/// Most subscribers kept in a plain vector.
pub const FEW: usize = 16;

type Big = IndexSet<u32, BuildHasherDefault<ahash::AHasher>>;

/// A channel's local subscribers (connection slots).
#[derive(Debug, Clone)]
pub enum Subscribers {
    One(u32),
    Few(Vec<u32>),
    Many(Box<Big>),
}

impl Subscribers {
    /// A set holding `key` alone.
    pub fn new(key: u32) -> Subscribers {
        Subscribers::One(key)
    }

    pub fn len(&self) -> usize {
        match self {
            Subscribers::One(_) => 1,
            Subscribers::Few(v) => v.len(),
            Subscribers::Many(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, key: u32) -> bool {
        match self {
            Subscribers::One(k) => *k == key,
            Subscribers::Few(v) => v.contains(&key),
            Subscribers::Many(s) => s.contains(&key),
        }
    }

    /// Adds `key`; false if it was there already.
    pub fn insert(&mut self, key: u32) -> bool {
        if self.contains(key) {
            return false;
        }
        match self {
            Subscribers::One(k) => {
                let mut v = Vec::with_capacity(4);
                v.push(*k);
                v.push(key);
                *self = Subscribers::Few(v);
            }
            Subscribers::Few(v) if v.len() < FEW => v.push(key),
            Subscribers::Few(v) => {
                let mut s = Big::with_capacity_and_hasher(2 * FEW, Default::default());
                s.extend(v.iter().copied());
                s.insert(key);
                *self = Subscribers::Many(Box::new(s));
            }
            Subscribers::Many(s) => {
                s.insert(key);
            }
        }
        true
    }

    /// Removes `key`; false if it was not there. An emptied set is left
    /// as an empty vector for the caller to drop.
    pub fn remove(&mut self, key: u32) -> bool {
        match self {
            Subscribers::One(k) if *k == key => {
                *self = Subscribers::Few(Vec::new());
                true
            }
            Subscribers::One(_) => false,
            Subscribers::Few(v) => match v.iter().position(|&k| k == key) {
                Some(i) => {
                    v.swap_remove(i);
                    if v.len() == 1 {
                        *self = Subscribers::One(v[0]);
                    }
                    true
                }
                None => false,
            },
            Subscribers::Many(s) => {
                let removed = s.swap_remove(&key);
                if s.len() <= FEW / 2 {
                    *self = Subscribers::Few(s.iter().copied().collect());
                } else if s.capacity() > 4 * s.len().max(2 * FEW) {
                    s.shrink_to_fit();
                }
                removed
            }
        }
    }

    /// Every subscriber, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let (slice, set): (&[u32], Option<&Big>) = match self {
            Subscribers::One(k) => (std::slice::from_ref(k), None),
            Subscribers::Few(v) => (v.as_slice(), None),
            Subscribers::Many(s) => (&[], Some(s)),
        };
        slice
            .iter()
            .copied()
            .chain(set.into_iter().flat_map(|s| s.iter().copied()))
    }
}

/// The channels (routing keys) one connection is subscribed to. The names
/// are shared with the shard's channel table (one allocation per channel,
/// not per subscription); a connection with one subscription needs no
/// allocation of its own.
#[derive(Debug, Clone, Default)]
pub enum ConnSubs {
    #[default]
    None,
    One(Rc<str>),
    Many(Vec<Rc<str>>),
}

impl ConnSubs {
    pub fn len(&self) -> usize {
        match self {
            ConnSubs::None => 0,
            ConnSubs::One(_) => 1,
            ConnSubs::Many(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[Rc<str>] {
        match self {
            ConnSubs::None => &[],
            ConnSubs::One(c) => std::slice::from_ref(c),
            ConnSubs::Many(v) => v,
        }
    }

    pub fn push(&mut self, channel: Rc<str>) {
        *self = match std::mem::take(self) {
            ConnSubs::None => ConnSubs::One(channel),
            ConnSubs::One(first) => ConnSubs::Many(vec![first, channel]),
            ConnSubs::Many(mut v) => {
                v.push(channel);
                ConnSubs::Many(v)
            }
        };
    }

    /// Removes `channel`; false if it was not there.
    pub fn remove(&mut self, channel: &str) -> bool {
        match self {
            ConnSubs::None => false,
            ConnSubs::One(c) if &**c == channel => {
                *self = ConnSubs::None;
                true
            }
            ConnSubs::One(_) => false,
            ConnSubs::Many(v) => match v.iter().position(|c| &**c == channel) {
                Some(i) => {
                    v.swap_remove(i);
                    if v.len() == 1 {
                        *self = ConnSubs::One(v.pop().expect("one left"));
                    } else if v.is_empty() {
                        *self = ConnSubs::None;
                    }
                    true
                }
                None => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(s: &Subscribers) -> Vec<u32> {
        let mut v: Vec<u32> = s.iter().collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn grows_and_shrinks_through_every_form() {
        let mut s = Subscribers::new(0);
        assert!(matches!(s, Subscribers::One(0)));
        assert!(!s.insert(0));
        for k in 1..100 {
            assert!(s.insert(k));
        }
        assert!(matches!(s, Subscribers::Many(_)));
        assert_eq!(s.len(), 100);
        assert_eq!(sorted(&s), (0..100).collect::<Vec<_>>());
        for k in (0..100).filter(|k| k % 3 != 0) {
            assert!(s.remove(k));
            assert!(!s.contains(k));
        }
        assert!(!s.remove(1));
        assert_eq!(
            sorted(&s),
            (0..100).filter(|k| k % 3 == 0).collect::<Vec<_>>()
        );
        for k in (0..100).filter(|k| k % 3 == 0 && *k != 42) {
            assert!(s.remove(k));
        }
        assert!(matches!(s, Subscribers::One(42)), "{s:?}");
        assert!(s.remove(42));
        assert!(s.is_empty());
        assert_eq!(s.iter().count(), 0);
    }

    #[test]
    fn conn_subs_keep_the_first_inline() {
        let mut c = ConnSubs::default();
        assert!(c.is_empty());
        c.push("a".into());
        assert!(matches!(c, ConnSubs::One(_)));
        c.push("b".into());
        c.push("c".into());
        assert_eq!(c.len(), 3);
        assert!(c.remove("a"));
        assert!(!c.remove("a"));
        assert!(c.remove("c"));
        assert!(matches!(&c, ConnSubs::One(x) if &**x == "b"));
        assert!(c.remove("b"));
        assert!(c.is_empty() && c.as_slice().is_empty());
    }

    #[test]
    fn one_subscriber_costs_no_allocation() {
        // The enum is three words; a single subscriber lives inside it.
        assert!(std::mem::size_of::<Subscribers>() <= 24);
        let s = Subscribers::new(7);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![7]);
    }
}
