//! Personal subscriptions (Pushi's personal channels and messages for
//! offline users): the channels each user subscribed to durably, how far
//! each was delivered to the user (its cursor), and, on each core, the
//! connections that follow their user's channels now.
//!
//! A connection that follows its user's channels is subscribed to each of
//! them like any other subscriber: it gets the channel's own frames, the
//! ones every subscriber gets, so a publish costs nothing per user. What
//! the user missed comes from the channel's history, which a channel with
//! durable subscribers keeps ([`Durable::keeps`]), after the user's cursor.
//!
//! A cursor moves only when the client proves it read what came before:
//! a WebSocket ping carrying [`ACK_PAYLOAD`] is queued behind the frames,
//! and its pong (which every WebSocket client sends by itself, in order)
//! commits the offsets the ping covered. What the client never read is
//! delivered again at its next connection; what it read is not. At most
//! one such ping per connection is in flight.
//!
//! A backlog larger than half the connection's send queue (shared by the
//! user's channels) comes in pages: a channel's page is sent without a
//! live subscription, and the next is asked for once the pong says the
//! client read it ([`Follow::pages_read`]); live messages start after the
//! last page, so a small or slow client is never closed for its own
//! backlog.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::history::Keep;

/// How far a user's channel was delivered: every message up to `offset`
/// of `epoch` (its history's epoch; another epoch means the history the
/// offset counted is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// One durable subscription, as it is saved and read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub namespace: u16,
    pub user: Box<str>,
    pub channel: Box<str>,
    pub cursor: Cursor,
}

/// Why a durable subscription was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurableError {
    #[error("the user already has the most durable subscriptions allowed ({0})")]
    TooMany(usize),
    #[error("the server holds the most durable subscriptions it keeps ({0})")]
    Full(usize),
}

/// A user: its namespace and id.
pub type UserKey = (u16, Box<str>);

/// A user's channels and their cursors.
pub type Cursors = Vec<(Box<str>, Cursor)>;

/// Most durable subscriptions a node keeps, all users together.
pub const MAX_DURABLE: usize = 1_000_000;

/// The node's durable subscriptions, shared by every core: read when a
/// user's connection starts following, written by the HTTP API and as
/// clients acknowledge; its owner cores ask it which channels keep
/// history for them (one atomic load when nobody subscribed durably).
pub struct Durable {
    keep: Keep,
    max_per_user: usize,
    /// Channels with durable subscribers (0: skip the lock).
    active: AtomicUsize,
    /// Bumped at every change (what a saver compares).
    changes: AtomicU64,
    /// Bumped when a channel gets its first durable subscriber or loses its
    /// last (what the threads' remembered answers are checked against).
    channel_changes: AtomicU64,
    inner: Mutex<Inner>,
}

/// By namespace, then by name (looked up with a `&str`, no allocation).
type ByName<T> = HashMap<u16, HashMap<Box<str>, T>>;

#[derive(Default)]
struct Inner {
    /// Each user's channels and their cursors.
    users: ByName<BTreeMap<Box<str>, Cursor>>,
    /// Durable subscribers per channel.
    channels: ByName<u32>,
    total: usize,
    /// Users changed since the last [`Durable::take_changed`].
    changed: HashMap<u16, HashSet<Box<str>>>,
}

impl Inner {
    fn subs(&self, namespace: u16, user: &str) -> Option<&BTreeMap<Box<str>, Cursor>> {
        self.users.get(&namespace)?.get(user)
    }

    fn subs_mut(&mut self, namespace: u16, user: &str) -> Option<&mut BTreeMap<Box<str>, Cursor>> {
        self.users.get_mut(&namespace)?.get_mut(user)
    }

    /// Notes that `user` changed (to be saved); allocates only the first
    /// time between two saves.
    fn mark(&mut self, namespace: u16, user: &str) {
        let users = self.changed.entry(namespace).or_default();
        if !users.contains(user) {
            users.insert(user.into());
        }
    }
}

impl Default for Durable {
    fn default() -> Self {
        Durable::new(
            Keep {
                size: 100,
                ttl_ms: 86_400_000,
            },
            100,
        )
    }
}

impl Durable {
    /// A store whose channels keep at least `keep` for their durable
    /// subscribers, with at most `max_per_user` subscriptions per user.
    pub fn new(keep: Keep, max_per_user: usize) -> Durable {
        Durable {
            keep,
            max_per_user,
            active: AtomicUsize::new(0),
            changes: AtomicU64::new(0),
            channel_changes: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a channel with durable subscribers keeps at least.
    pub fn keep(&self) -> Keep {
        self.keep
    }

    /// What `channel` of `namespace` keeps for its durable subscribers, if
    /// it has any.
    ///
    /// Owner cores ask this for every message they sequence, so it takes no
    /// lock when it can: each thread remembers the answers it read, until
    /// the set of channels changes.
    pub fn keeps(&self, namespace: u16, channel: &str) -> Option<Keep> {
        if self.active.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let generation = self.channel_changes.load(Ordering::Acquire);
        let me = self as *const Durable as usize;
        let known = SEEN.with(|seen| seen.borrow_mut().get(me, generation, namespace, channel));
        let kept = match known {
            Some(kept) => kept,
            None => {
                let kept = self
                    .inner()
                    .channels
                    .get(&namespace)
                    .is_some_and(|by_name| by_name.get(channel).is_some_and(|n| *n > 0));
                SEEN.with(|seen| seen.borrow_mut().put(namespace, channel, kept));
                kept
            }
        };
        kept.then_some(self.keep)
    }

    /// Subscribes `user` to `channel` durably from `at` (what was
    /// published after it is delivered). Already subscribed: the cursor
    /// stays, `Ok(false)`.
    pub fn subscribe(
        &self,
        namespace: u16,
        user: &str,
        channel: &str,
        at: Cursor,
    ) -> Result<bool, DurableError> {
        let mut inner = self.inner();
        let inner = &mut *inner;
        let total = inner.total;
        let subs = inner
            .users
            .entry(namespace)
            .or_default()
            .entry(user.into())
            .or_default();
        if subs.contains_key(channel) {
            return Ok(false);
        }
        if subs.len() >= self.max_per_user {
            return Err(DurableError::TooMany(self.max_per_user));
        }
        if total >= MAX_DURABLE {
            return Err(DurableError::Full(MAX_DURABLE));
        }
        subs.insert(channel.into(), at);
        inner.total += 1;
        inner.mark(namespace, user);
        let n = inner
            .channels
            .entry(namespace)
            .or_default()
            .entry(channel.into())
            .or_insert(0);
        *n += 1;
        if *n == 1 {
            self.active.fetch_add(1, Ordering::Relaxed);
            self.channel_changes.fetch_add(1, Ordering::Release);
        }
        self.changes.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Ends `user`'s durable subscription to `channel`; false if it had
    /// none.
    pub fn unsubscribe(&self, namespace: u16, user: &str, channel: &str) -> bool {
        let mut inner = self.inner();
        let inner = &mut *inner;
        let Some(subs) = inner.subs_mut(namespace, user) else {
            return false;
        };
        if subs.remove(channel).is_none() {
            return false;
        }
        if subs.is_empty() {
            if let Some(users) = inner.users.get_mut(&namespace) {
                users.remove(user);
                if users.is_empty() {
                    inner.users.remove(&namespace);
                }
            }
        }
        inner.total -= 1;
        inner.mark(namespace, user);
        if let Some(by_name) = inner.channels.get_mut(&namespace) {
            if let Some(n) = by_name.get_mut(channel) {
                *n -= 1;
                if *n == 0 {
                    by_name.remove(channel);
                    self.active.fetch_sub(1, Ordering::Relaxed);
                    self.channel_changes.fetch_add(1, Ordering::Release);
                }
            }
            if by_name.is_empty() {
                inner.channels.remove(&namespace);
            }
        }
        self.changes.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// `user`'s durable subscriptions and their cursors, by channel name.
    pub fn of(&self, namespace: u16, user: &str) -> Cursors {
        self.inner()
            .subs(namespace, user)
            .map(|subs| subs.iter().map(|(c, k)| (c.clone(), k.clone())).collect())
            .unwrap_or_default()
    }

    /// How many channels `user` subscribed to durably.
    pub fn count_of(&self, namespace: u16, user: &str) -> usize {
        self.inner().subs(namespace, user).map_or(0, BTreeMap::len)
    }

    /// The client read `channel` up to `offset` of `epoch`: its cursor
    /// moves there (never back within an epoch). Nothing if the
    /// subscription ended meanwhile. No allocation (clients acknowledge
    /// as they read).
    pub fn commit(&self, namespace: u16, user: &str, channel: &str, epoch: &Arc<str>, offset: u64) {
        let mut inner = self.inner();
        let Some(at) = inner
            .subs_mut(namespace, user)
            .and_then(|subs| subs.get_mut(channel))
        else {
            return;
        };
        let same = Arc::ptr_eq(&at.epoch, epoch) || at.epoch == *epoch;
        if same && at.offset >= offset {
            return;
        }
        if !same {
            at.epoch = epoch.clone();
        }
        at.offset = offset;
        inner.mark(namespace, user);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// How many durable subscriptions the node keeps, all users together.
    pub fn len(&self) -> usize {
        self.inner().total
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A count that changes whenever the subscriptions or a cursor do.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// The users whose subscriptions changed since the last call, with
    /// what they are now (none: forget the user), to be saved.
    pub fn take_changed(&self) -> Vec<(UserKey, Cursors)> {
        let mut inner = self.inner();
        let changed = std::mem::take(&mut inner.changed);
        let mut out = Vec::new();
        for (namespace, users) in changed {
            for user in users {
                let now = inner
                    .subs(namespace, &user)
                    .map(|subs| subs.iter().map(|(c, k)| (c.clone(), k.clone())).collect())
                    .unwrap_or_default();
                out.push(((namespace, user), now));
            }
        }
        out
    }

    /// Every durable subscription.
    pub fn export(&self) -> Vec<Record> {
        let inner = self.inner();
        let mut out = Vec::with_capacity(inner.total);
        for (namespace, users) in &inner.users {
            for (user, subs) in users {
                for (channel, cursor) in subs {
                    out.push(Record {
                        namespace: *namespace,
                        user: user.clone(),
                        channel: channel.clone(),
                        cursor: cursor.clone(),
                    });
                }
            }
        }
        out
    }

    /// Puts back subscriptions read at start (limits apply as to new ones;
    /// what passes them is left out and counted). They are not changes.
    pub fn restore(&self, records: Vec<Record>) -> usize {
        let mut refused = 0;
        for r in records {
            if self
                .subscribe(r.namespace, &r.user, &r.channel, r.cursor)
                .is_err()
            {
                refused += 1;
            }
        }
        self.inner().changed.clear();
        refused
    }
}

/// Most answers a thread remembers before it starts again.
const SEEN_MAX: usize = 65_536;

thread_local! {
    /// This thread's answers of [`Durable::keeps`].
    static SEEN: std::cell::RefCell<Seen> = std::cell::RefCell::default();
}

/// Which channels keep history for durable subscribers, as one thread read
/// it from one store (`store`, its address) at one `generation`.
#[derive(Default)]
struct Seen {
    store: usize,
    generation: u64,
    by_namespace: HashMap<u16, HashMap<Box<str>, bool>>,
    len: usize,
}

impl Seen {
    fn get(
        &mut self,
        store: usize,
        generation: u64,
        namespace: u16,
        channel: &str,
    ) -> Option<bool> {
        if self.store != store || self.generation != generation {
            *self = Seen {
                store,
                generation,
                ..Seen::default()
            };
            return None;
        }
        self.by_namespace.get(&namespace)?.get(channel).copied()
    }

    fn put(&mut self, namespace: u16, channel: &str, kept: bool) {
        if self.len >= SEEN_MAX {
            self.by_namespace.clear();
            self.len = 0;
        }
        self.by_namespace
            .entry(namespace)
            .or_default()
            .insert(channel.into(), kept);
        self.len += 1;
    }
}

/// The frame that tells a connection why one of its user's channels
/// could not be followed (`channel`, `why`), if it is told: the
/// front-end's.
pub type NotFollowed = Option<fn(channel: &str, why: &str) -> bytes::Bytes>;

/// The payload of the ping that acknowledges deliveries. One is in
/// flight per connection at most, so its pong is the answer to it; the
/// keep-alive's pings carry no payload. (A client that sends it unasked
/// only moves its own places.)
pub const ACK_PAYLOAD: &[u8] = b"herald:ack";

/// The connections of one core that follow their user's channels, and
/// what each has delivered and had acknowledged.
#[derive(Debug, Default)]
pub struct Follow {
    /// Routing key to the following connections subscribed to it here.
    channels: HashMap<Box<str>, Vec<usize>, ahash::RandomState>,
    conns: HashMap<usize, Box<Follower>, ahash::RandomState>,
    /// Joins still on their way for connections that stopped following:
    /// the subscription each makes is to be undone when it completes.
    orphans: HashSet<(usize, Box<str>)>,
}

/// One connection following its user's channels.
#[derive(Debug)]
pub struct Follower {
    pub namespace: u16,
    pub user: Box<str>,
    gen: u64,
    followed: Vec<Followed>,
    /// An ack ping is in flight (each channel's `in_flight` is what it
    /// covers).
    pinged: bool,
}

#[derive(Debug)]
struct Followed {
    route: Box<str>,
    channel: Box<str>,
    epoch: Arc<str>,
    /// The newest offset queued to the connection.
    delivered: u64,
    /// The newest offset the client acknowledged.
    acked: u64,
    /// What the ack ping in flight covers (`delivered` when it went out).
    in_flight: u64,
    /// The connection is also subscribed to the channel by itself: the
    /// subscription outlives the following.
    direct: bool,
    /// Catching up in pages: `delivered` is the end of the page sent, the
    /// connection is not subscribed for live messages, and the next page
    /// is asked for once the client has read this one.
    paging: bool,
}

impl Follow {
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// Connection `key` (generation `gen`) follows `user`'s channels of
    /// `namespace` from now on; false if it already follows (someone's).
    pub fn start(&mut self, key: usize, gen: u64, namespace: u16, user: &str) -> bool {
        if self.conns.get(&key).is_some_and(|f| f.gen == gen) {
            return false;
        }
        self.forget(key);
        self.conns.insert(
            key,
            Box::new(Follower {
                namespace,
                user: user.into(),
                gen,
                followed: Vec::new(),
                pinged: false,
            }),
        );
        true
    }

    /// Whom `key` follows, if it follows anyone.
    pub fn follower(&self, key: usize) -> Option<&Follower> {
        self.conns.get(&key).map(|f| &**f)
    }

    /// `key`, subscribed now to `route` (channel `channel`, history `epoch`)
    /// with everything up to `top` queued, follows it; `direct` if it was
    /// subscribed by itself already. False if it does not follow anyone.
    /// An empty `epoch` marks the channel as joining (its place comes with
    /// a second call), so that a subscription of the connection's own made
    /// meanwhile is marked `direct`.
    pub fn add(
        &mut self,
        key: usize,
        route: &str,
        channel: &str,
        epoch: Arc<str>,
        top: u64,
        direct: bool,
    ) -> bool {
        let Some(f) = self.conns.get_mut(&key) else {
            return false;
        };
        if let Some(c) = f.followed.iter_mut().find(|c| &*c.route == route) {
            c.epoch = epoch;
            c.delivered = c.delivered.max(top);
            c.direct |= direct;
            return true;
        }
        f.followed.push(Followed {
            route: route.into(),
            channel: channel.into(),
            epoch,
            delivered: top,
            acked: 0,
            in_flight: 0,
            direct,
            paging: false,
        });
        self.channels.entry(route.into()).or_default().push(key);
        true
    }

    /// If `key` follows `route`: marks whether it is also subscribed by
    /// itself (`direct`), so that the engine subscription outlives one or
    /// the other, and says whether it was before. `None`: not followed.
    pub fn mark_direct(&mut self, key: usize, route: &str, direct: bool) -> Option<bool> {
        let found = self
            .conns
            .get_mut(&key)
            .and_then(|f| f.followed.iter_mut().find(|c| &*c.route == route));
        let Some(c) = found else {
            // Its own subscription now: a join on its way keeps it.
            if direct && !self.orphans.is_empty() {
                self.orphans.remove(&(key, route.into()));
            }
            return None;
        };
        Some(std::mem::replace(&mut c.direct, direct))
    }

    /// Message `offset` of `route` was queued to this core's subscribers;
    /// `due` gets each following connection that should be pinged now.
    /// A channel whose join is on its way (no epoch yet) counts nothing:
    /// its place comes with the join.
    pub fn delivered(&mut self, route: &str, offset: u64, due: &mut Vec<usize>) {
        let Some(keys) = self.channels.get(route) else {
            return;
        };
        for key in keys {
            let Some(f) = self.conns.get_mut(key) else {
                continue;
            };
            let Some(c) = f
                .followed
                .iter_mut()
                .find(|c| &*c.route == route && !c.epoch.is_empty() && !c.paging)
            else {
                continue;
            };
            c.delivered = c.delivered.max(offset);
            if !f.pinged {
                due.push(*key);
            }
        }
    }

    /// Should an ack ping be queued now for `key`? When it has
    /// unacknowledged deliveries and no ping in flight; the ping then
    /// covers what was delivered so far.
    pub fn ping(&mut self, key: usize) -> bool {
        let Some(f) = self.conns.get_mut(&key) else {
            return false;
        };
        if f.pinged || f.followed.iter().all(|c| c.delivered <= c.acked) {
            return false;
        }
        for c in f.followed.iter_mut() {
            c.in_flight = c.delivered;
        }
        f.pinged = true;
        true
    }

    /// A pong from `key` with `payload`: if it answers the ack ping in
    /// flight, each channel's place moves to what the ping covered,
    /// through `commit(namespace, user, channel, epoch, offset)`. Whether
    /// it answered one. No allocation.
    pub fn pong(
        &mut self,
        key: usize,
        payload: &[u8],
        mut commit: impl FnMut(u16, &str, &str, &Arc<str>, u64),
    ) -> bool {
        if payload != ACK_PAYLOAD {
            return false;
        }
        let Some(f) = self.conns.get_mut(&key) else {
            return false;
        };
        if !std::mem::replace(&mut f.pinged, false) {
            return false;
        }
        for c in f.followed.iter_mut() {
            if c.in_flight > c.acked && !c.epoch.is_empty() {
                c.acked = c.in_flight;
                commit(f.namespace, &f.user, &c.channel, &c.epoch, c.acked);
            }
        }
        true
    }

    /// `key` stops following: the routes whose engine subscription was the
    /// following's alone (to unsubscribe).
    pub fn stop(&mut self, key: usize) -> Vec<Box<str>> {
        let Some(f) = self.conns.remove(&key) else {
            return Vec::new();
        };
        let mut own = Vec::new();
        for c in f.followed {
            self.unlink(&c.route, key);
            match (c.direct, c.epoch.is_empty()) {
                (true, _) => {}
                // Subscribed when its join completes: undone then.
                (false, true) => {
                    self.orphans.insert((key, c.route));
                }
                (false, false) => own.push(c.route),
            }
        }
        own
    }

    /// A join for `key` completed after it stopped following: whether the
    /// subscription it made is to be undone (not if the connection
    /// subscribed to the channel by itself meanwhile).
    pub fn take_orphan(&mut self, key: usize, route: &str) -> bool {
        self.orphans.remove(&(key, route.into()))
    }

    /// Forgets `key` (its connection is gone).
    pub fn forget(&mut self, key: usize) {
        self.stop(key);
        if !self.orphans.is_empty() {
            self.orphans.retain(|(k, _)| *k != key);
        }
    }

    fn unlink(&mut self, route: &str, key: usize) {
        if let Some(keys) = self.channels.get_mut(route) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                self.channels.remove(route);
            }
        }
    }

    /// The connections of this core following `user` of `namespace`.
    pub fn following(&self, namespace: u16, user: &str) -> Vec<(usize, u64)> {
        self.conns
            .iter()
            .filter(|(_, f)| f.namespace == namespace && &*f.user == user)
            .map(|(k, f)| (*k, f.gen))
            .collect()
    }

    /// Is `key` subscribed to `route`, which it follows, by itself too?
    pub fn is_direct(&self, key: usize, route: &str) -> bool {
        self.conns
            .get(&key)
            .and_then(|f| f.followed.iter().find(|c| &*c.route == route))
            .is_some_and(|c| c.direct)
    }

    /// `key`'s catch-up of `route` goes on in pages: what was sent of it
    /// ends at `to`.
    pub fn page(&mut self, key: usize, route: &str, to: u64) {
        let found = self
            .conns
            .get_mut(&key)
            .and_then(|f| f.followed.iter_mut().find(|c| &*c.route == route));
        if let Some(c) = found {
            c.paging = true;
            c.delivered = to;
        }
    }

    /// The channels whose page `key` has read: each, and where its next
    /// page starts. They are joining again from there.
    pub fn pages_read(&mut self, key: usize) -> Vec<(Box<str>, Cursor)> {
        let Some(f) = self.conns.get_mut(&key) else {
            return Vec::new();
        };
        let mut next = Vec::new();
        for c in f.followed.iter_mut() {
            if c.paging && c.acked >= c.delivered && !c.epoch.is_empty() {
                c.paging = false;
                let at = Cursor {
                    epoch: c.epoch.clone(),
                    offset: c.acked,
                };
                next.push((c.channel.clone(), at));
            }
        }
        next
    }

    /// Does `key` follow `route` already?
    pub fn follows(&self, key: usize, route: &str) -> bool {
        self.conns
            .get(&key)
            .is_some_and(|f| f.followed.iter().any(|c| &*c.route == route))
    }

    /// `key` stops following `route` alone (its durable subscription
    /// ended): whether the engine subscription was the following's alone.
    pub fn drop_channel(&mut self, key: usize, route: &str) -> bool {
        let Some(f) = self.conns.get_mut(&key) else {
            return false;
        };
        let Some(i) = f.followed.iter().position(|c| &*c.route == route) else {
            return false;
        };
        let c = f.followed.remove(i);
        self.unlink(route, key);
        !c.direct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: &str, offset: u64) -> Cursor {
        Cursor {
            epoch: epoch.into(),
            offset,
        }
    }

    /// A pong from `key`: what it commits, as (channel, place), if it
    /// answered the ping in flight.
    fn pong(f: &mut Follow, key: usize, payload: &[u8]) -> Option<Vec<(String, Cursor)>> {
        let mut moved = Vec::new();
        let answered = f.pong(key, payload, |ns, user, channel, epoch, offset| {
            assert_eq!((ns, user), (f_ns(key), "u"));
            moved.push((channel.to_string(), at(epoch, offset)));
        });
        answered.then_some(moved)
    }

    /// The namespace the tests' connection `key` follows in.
    fn f_ns(key: usize) -> u16 {
        u16::from(key == 7)
    }

    fn commit(d: &Durable, user: &str, channel: &str, c: &Cursor) {
        d.commit(0, user, channel, &c.epoch, c.offset);
    }

    #[test]
    fn durable_subscriptions_count_their_channels_and_keep_their_cursor() {
        let d = Durable::new(
            Keep {
                size: 5,
                ttl_ms: 1000,
            },
            2,
        );
        assert_eq!(d.keeps(1, "news"), None);
        assert_eq!(d.subscribe(1, "u1", "news", at("e", 3)), Ok(true));
        assert_eq!(d.subscribe(1, "u1", "news", at("e", 9)), Ok(false));
        assert_eq!(d.subscribe(1, "u2", "news", at("e", 4)), Ok(true));
        assert_eq!(d.keeps(1, "news").map(|k| k.size), Some(5));
        assert_eq!(d.keeps(2, "news"), None, "namespaces are apart");
        assert_eq!(d.of(1, "u1"), vec![("news".into(), at("e", 3))]);
        assert_eq!(d.subscribe(1, "u1", "b", at("e", 0)), Ok(true));
        assert_eq!(
            d.subscribe(1, "u1", "c", at("e", 0)),
            Err(DurableError::TooMany(2))
        );
        assert!(d.unsubscribe(1, "u1", "news"));
        assert!(!d.unsubscribe(1, "u1", "news"));
        assert!(d.keeps(1, "news").is_some(), "u2 still has it");
        assert!(d.unsubscribe(1, "u2", "news"));
        assert_eq!(
            d.keeps(1, "news"),
            None,
            "remembered answers follow changes"
        );
        assert_eq!(d.subscribe(1, "u3", "news", at("e", 0)), Ok(true));
        assert!(d.keeps(1, "news").is_some());
        assert!(d.keeps(1, "news").is_some(), "remembered");
        let other = Durable::default();
        other.subscribe(1, "u4", "weather", at("e", 0)).unwrap();
        assert!(other.keeps(1, "news").is_none(), "another store's answers");
        assert!(d.keeps(1, "news").is_some());
        assert!(d.unsubscribe(1, "u3", "news"));
        assert_eq!(d.export().len(), 1);
    }

    #[test]
    fn commits_move_forward_within_an_epoch_and_to_a_new_one() {
        let d = Durable::default();
        d.subscribe(0, "u", "c", at("e", 3)).unwrap();
        let before = d.changes();
        commit(&d, "u", "c", &at("e", 2));
        assert_eq!(d.of(0, "u")[0].1, at("e", 3), "never back");
        assert_eq!(d.changes(), before);
        commit(&d, "u", "c", &at("e", 7));
        assert_eq!(d.of(0, "u")[0].1, at("e", 7));
        commit(&d, "u", "c", &at("f", 1));
        assert_eq!(d.of(0, "u")[0].1, at("f", 1), "a new epoch replaces");
        commit(&d, "u", "gone", &at("f", 1));
        let restored = Durable::default();
        assert_eq!(restored.restore(d.export()), 0);
        assert_eq!(restored.of(0, "u"), d.of(0, "u"));
        assert!(restored.take_changed().is_empty(), "read back, not changed");
        let changed = d.take_changed();
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].1, vec![("c".into(), at("f", 1))]);
        assert!(d.take_changed().is_empty());
        d.unsubscribe(0, "u", "c");
        assert_eq!(d.take_changed(), vec![((0, "u".into()), vec![])]);
    }

    #[test]
    fn a_pong_commits_what_was_queued_before_its_ping() {
        let mut f = Follow::default();
        assert!(f.start(7, 1, 1, "u"));
        assert!(!f.start(7, 1, 1, "u"), "once");
        f.add(7, "1#a", "a", "e".into(), 4, false);
        f.add(7, "1#b", "b", "e".into(), 0, true);
        let mut due = Vec::new();
        f.delivered("1#b", 2, &mut due);
        assert_eq!(due, vec![7]);
        assert!(f.ping(7));
        assert!(!f.ping(7), "one ping in flight");
        f.delivered("1#a", 5, &mut due);
        assert_eq!(due, vec![7], "no second ping while one is in flight");
        assert_eq!(pong(&mut f, 7, b""), None, "a keep-alive pong");
        assert_eq!(pong(&mut f, 7, b"herald:other"), None);
        assert_eq!(
            pong(&mut f, 7, ACK_PAYLOAD),
            Some(vec![("a".into(), at("e", 4)), ("b".into(), at("e", 2))])
        );
        assert_eq!(pong(&mut f, 7, ACK_PAYLOAD), None, "answered once");
        // Offset 5 of a came after the ping: the next one covers it.
        assert!(f.ping(7));
        assert_eq!(
            pong(&mut f, 7, ACK_PAYLOAD),
            Some(vec![("a".into(), at("e", 5))])
        );
        assert!(!f.ping(7), "nothing new");
        // Only what was the following's own is unsubscribed.
        assert_eq!(f.stop(7), vec![Box::<str>::from("1#a")]);
        assert!(f.is_empty());
    }

    #[test]
    fn a_join_on_its_way_counts_nothing_and_is_undone_if_the_following_stops() {
        let mut f = Follow::default();
        f.start(3, 1, 0, "u");
        f.add(3, "a", "a", "".into(), 0, false);
        f.add(3, "b", "b", "".into(), 0, false);
        let mut due = Vec::new();
        f.delivered("a", 9, &mut due);
        assert!(due.is_empty(), "joining: its place comes with the join");
        assert!(!f.ping(3));
        // b: the connection subscribes by itself while joining.
        assert_eq!(f.mark_direct(3, "b", true), Some(false));
        assert!(f.stop(3).is_empty(), "nothing subscribed yet");
        assert!(
            f.take_orphan(3, "a"),
            "a's join is undone when it completes"
        );
        assert!(!f.take_orphan(3, "a"), "once");
        assert!(!f.take_orphan(3, "b"), "b is the connection's own");
        // Stopped, then subscribed by itself before the join completed.
        f.start(3, 1, 0, "u");
        f.add(3, "c", "c", "".into(), 0, false);
        f.stop(3);
        assert_eq!(f.mark_direct(3, "c", true), None);
        assert!(!f.take_orphan(3, "c"));
    }

    #[test]
    fn a_catch_up_in_pages_counts_only_what_was_sent_and_goes_on_once_read() {
        let mut f = Follow::default();
        f.start(2, 1, 0, "u");
        f.add(2, "a", "a", "e".into(), 100, false);
        f.page(2, "a", 10);
        let mut due = Vec::new();
        f.delivered("a", 101, &mut due);
        assert!(due.is_empty(), "live messages do not count while paging");
        assert!(f.pages_read(2).is_empty(), "the page is not read yet");
        assert!(f.ping(2));
        assert_eq!(
            pong(&mut f, 2, ACK_PAYLOAD),
            Some(vec![("a".into(), at("e", 10))])
        );
        assert_eq!(
            f.pages_read(2),
            vec![("a".into(), at("e", 10))],
            "the next page starts after what was read"
        );
        assert!(f.pages_read(2).is_empty(), "asked for once");
    }

    #[test]
    fn a_dropped_channel_leaves_the_ping_in_flight_consistent() {
        let mut f = Follow::default();
        f.start(1, 1, 0, "u");
        f.add(1, "a", "a", "e".into(), 1, false);
        f.add(1, "b", "b", "e".into(), 2, false);
        assert!(f.ping(1));
        // Followed after the ping went out, then dropped.
        f.add(1, "c", "c", "e".into(), 5, false);
        assert!(f.drop_channel(1, "c"));
        assert!(f.drop_channel(1, "a"));
        assert!(!f.follows(1, "a"));
        assert_eq!(
            pong(&mut f, 1, ACK_PAYLOAD),
            Some(vec![("b".into(), at("e", 2))]),
            "what the ping covered, of the channels still followed"
        );
        assert_eq!(f.following(0, "u"), vec![(1, 1)]);
        f.forget(1);
        assert!(f.following(0, "u").is_empty());
    }
}
