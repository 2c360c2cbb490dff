//! One reactor's state: its connections (a `slab`), its channel table
//! (channel -> local subscribers), their outbound queues and timers.
//!
//! Owned by exactly one thread and never locked: tasks on that thread borrow
//! it briefly, never across an `.await`. No IO happens here except cutting a
//! socket (`shutdown(2)`) whose deadline passed; the fan-out is
//! [`Shard::deliver`]: one `Bytes` clone (a refcount increment) pushed onto
//! each subscriber's queue, and a wake of that subscriber's writer task.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::num::NonZeroU64;

use bytes::Bytes;

use crate::engine::interest::Interest;
use hashbrown::HashTable;

use crate::engine::message::{route_hash, Encoder, Encoding, Message, MAX_ENCODINGS};
use crate::engine::personal::Follow;
use crate::engine::stats::CoreStats;

use crate::engine::slots::Slots;
use crate::engine::subscribers::{ConnSubs, Subscribers};

/// Most frames handed to one vectored write (the kernel's IOV_MAX is 1024).
pub const MAX_IOV: usize = 512;

/// Limits a shard enforces, from the configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub send_queue_limit: usize,
    pub max_subscriptions: usize,
    pub close_timeout_ms: u64,
    pub publish_rate: u64,
    /// Server pings (protocol.md 1.1 "Keep-alive"), in sweeps.
    pub keepalive: Keepalive,
    /// How the closes the engine decides itself are written.
    pub closes: Closes,
    /// The monotonic clock, in milliseconds (never 0): close deadlines,
    /// expiries and publish rates are measured on it.
    pub clock: fn() -> u64,
    /// Write coalescing: a delivery does not wake its writer but leaves it
    /// to [`Shard::flush`], which the runtime calls after its delay.
    pub coalesce: bool,
}

/// The frames and codes of the closes the engine starts on its own (a
/// slow consumer, a silent peer, an authorization that expired): the
/// transport's framing and the wire protocol's codes, handed in by the
/// runtime so the engine depends on neither.
#[derive(Debug, Clone, Copy)]
pub struct Closes {
    /// A close frame with an optional code and a reason.
    pub frame: fn(Option<u16>, &str) -> Bytes,
    /// A keep-alive probe.
    pub ping: fn() -> Bytes,
    /// The ping that acknowledges deliveries to a user's connection (its
    /// payload [`super::personal::ACK_PAYLOAD`]): one shared frame.
    pub ack_ping: fn() -> Bytes,
    /// Code and reason for a connection whose queue passed its limit.
    pub slow_consumer: (u16, &'static str),
    /// Code and reason for a peer silent after a ping.
    pub ping_timeout: (u16, &'static str),
    /// Code and reason for a connection whose authorization expired.
    pub expired: (u16, &'static str),
    /// Cuts a connection now (both ways), given its transport handle.
    pub cut: fn(i32),
}

/// When the idle sweep pings and gives up, counted in sweeps of the
/// worker's keep-alive clock (one sweep per [`Keepalive::sweep_ms`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Sweeps of silence before a ping; 0: never ping.
    pub ping_after: u32,
    /// Sweeps after a ping with nothing heard before closing with 1001.
    pub close_after: u32,
    /// Milliseconds between sweeps.
    pub sweep_ms: u64,
}

impl Keepalive {
    /// The sweep schedule for PING_INTERVAL and PONG_TIMEOUT: one sweep per
    /// quarter of the shorter of the two, between 100 ms and 1 s, so a
    /// ping goes out at most a quarter interval late and 100,000 idle
    /// connections cost one pass a second, not a timer each.
    pub fn new(ping_interval: std::time::Duration, pong_timeout: std::time::Duration) -> Self {
        let ping = ping_interval.as_millis() as u64;
        let pong = pong_timeout.as_millis() as u64;
        let sweep_ms = (ping.min(pong) / 4).clamp(100, 1000) / 100 * 100;
        let sweeps = |ms: u64| ms.div_ceil(sweep_ms).clamp(1, u32::MAX as u64) as u32;
        Keepalive {
            ping_after: if ping == 0 { 0 } else { sweeps(ping) },
            close_after: sweeps(pong),
            sweep_ms,
        }
    }

    /// No pings at all.
    pub fn off() -> Self {
        Keepalive {
            ping_after: 0,
            close_after: 1,
            sweep_ms: 1000,
        }
    }
}

/// A connection's token bucket for publishes.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    /// When it was last refilled ([`Limits::clock`]).
    last: u64,
}

/// A WebSocket connection as its reactor sees it.
#[derive(Debug)]
pub struct Conn {
    /// Distinguishes this connection from a later one reusing the slab slot.
    pub gen: u64,
    /// The wire format its front-end reads published messages in.
    encoding: Encoding,
    /// The close code its front-end sends when the server shuts down.
    shutdown_code: u16,
    /// When its authorization expires ([`Limits::clock`]), if it does.
    expires: Option<NonZeroU64>,
    /// The transport's handle to cut the connection with ([`Closes::cut`]).
    handle: i32,
    /// Frames not yet handed to the writer.
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`.
    queued: usize,
    /// Bytes handed to the writer and not yet written.
    inflight: usize,
    /// The writer task, parked while `queue` is empty.
    writer: Option<Waker>,
    /// Set once a close frame is queued (or the peer vanished): nothing else
    /// is queued after it, and the TCP connection is cut at this deadline
    /// ([`Limits::clock`]).
    closing: Option<NonZeroU64>,
    /// The writer took frames since the last keep-alive sweep (an idle
    /// connection's empty queue is freed by the sweep).
    sent: bool,
    /// The socket was shut down; reader and writer must stop.
    cut: bool,
    /// The keep-alive sweep during which the client was last heard from.
    last_seen: u32,
    /// The sweep that sent an unanswered ping (0: none pending).
    pinged_at: u32,
    /// When it opened, in hundredths of a second of [`Limits::clock`]
    /// (wrapping; for the log line of its close).
    opened_cs: u32,
    /// The code of the close frame queued for it (1005: none in it; 1006:
    /// the peer vanished; 0: not closing).
    close_code: u16,
    /// Channels this connection is subscribed to.
    subs: ConnSubs,
    /// Only with PUBLISH_RATE: boxed, so connections without pay nothing.
    bucket: Option<Box<Bucket>>,
}

/// How a removed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    /// The code of its close frame (1005: none given; 1006: the peer
    /// vanished; 0: removed without closing).
    pub code: u16,
    /// How long it was open (to a hundredth of a second).
    pub lasted: Duration,
}

impl Conn {
    /// Has a close frame been queued (or the connection been abandoned)?
    pub fn is_closing(&self) -> bool {
        self.closing.is_some()
    }
}

/// Where a connection's writer takes its frames for one write (the
/// transport's write batch): the engine hands over refcounted frames and
/// never sees how they are written.
pub trait FrameSink {
    /// Frames held.
    fn frames(&self) -> usize;
    /// Bytes held.
    fn bytes(&self) -> usize;
    fn push(&mut self, frame: Bytes);
}

/// Why a subscribe was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("subscription limit of {0} channels reached")]
    TooMany(usize),
    /// The node cannot reach the rest of its cluster now.
    #[error("the cluster's broker is unreachable; try again later")]
    Unavailable,
}

/// One core's connections and channels.
pub struct Shard {
    id: usize,
    limits: Limits,
    conns: Slots<Conn>,
    /// Routing key (shared with the subscribers' [`ConnSubs`]) to its
    /// local subscribers, found by the key's [`route_hash`].
    channels: HashTable<(Rc<str>, Subscribers)>,
    /// Builds frames of other encodings for subscribers that read one.
    encoders: &'static [Encoder],
    /// Connections opened or closed since the last [`Shard::take_churn`].
    churn: usize,
    /// (deadline on [`Limits::clock`], slot, gen): token expiries and close deadlines.
    timers: BinaryHeap<Reverse<(u64, usize, u64)>>,
    next_gen: u64,
    stats: Arc<CoreStats>,
    /// The keep-alive clock: sweeps run so far (starts at 1).
    sweep: u32,
    /// Woken when the last connection leaves (for shutdown).
    empty_waker: Option<Waker>,
    /// With [`Limits::coalesce`]: writers with frames, woken at the next
    /// [`Shard::flush`].
    deferred: Vec<Waker>,
    /// The task that flushes, waiting for a first deferred writer.
    flusher: Option<Waker>,
    /// Subscriptions on their way (waiting for the channel's owner core):
    /// routing key to how many. Each keeps the core's interest bit set.
    pending: HashMap<Box<str>, u32, ahash::RandomState>,
    /// Connections with replies being prepared on other cores, and the
    /// replies queued behind them (see [`Shard::reply`]).
    replies: HashMap<usize, Box<Replies>, ahash::RandomState>,
    /// Connections following their user's channels (empty: the fan-out
    /// pays one branch per message).
    pub follow: Follow,
    /// Following connections to ping after a delivery (kept for its room).
    due: Vec<usize>,
}

/// One connection's replies in request order while some are still being
/// prepared elsewhere: slot `i` is ticket `base + i`.
#[derive(Debug, Default)]
struct Replies {
    gen: u64,
    base: u64,
    next: u64,
    slots: VecDeque<Option<Vec<Bytes>>>,
    /// The connection's reader, waiting for every reply to be out.
    waiter: Option<Waker>,
}

/// Would queueing `len` more bytes pass the connection's limit? A frame
/// larger than the limit is still let through when nothing else is unsent,
/// so a single maximum-size message always fits.
fn over_limit(conn: &Conn, len: usize, limit: usize) -> bool {
    let unsent = conn.queued + conn.inflight;
    unsent > 0 && unsent + len > limit
}

/// A subscriber entry packs the connection's slot (low bits) and the
/// encoding it reads (high 8 bits): one `u32` per subscription.
const SLOT_BITS: u32 = 24;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;

/// Most connections one shard holds (a slot must fit in 24 bits).
pub const MAX_SLOTS: usize = 1 << SLOT_BITS;

#[inline]
fn entry(key: usize, encoding: Encoding) -> u32 {
    debug_assert!(key < MAX_SLOTS);
    (key as u32 & SLOT_MASK) | (u32::from(encoding.0) << SLOT_BITS)
}

/// Queues `frame`; an empty, unallocated queue gets room for exactly one
/// frame (32 bytes, not the 128 a first push would reserve): most idle
/// connections never hold more than one frame at a time.
#[inline]
fn enqueue(queue: &mut VecDeque<Bytes>, frame: Bytes) {
    if queue.capacity() == 0 {
        queue.reserve_exact(1);
    }
    queue.push_back(frame);
}

impl Shard {
    pub fn new(
        id: usize,
        limits: Limits,
        stats: Arc<CoreStats>,
        encoders: &'static [Encoder],
    ) -> Self {
        Shard {
            id,
            limits,
            conns: Slots::new(),
            channels: HashTable::new(),
            encoders,
            churn: 0,
            timers: BinaryHeap::new(),
            next_gen: 1,
            stats,
            sweep: 1,
            empty_waker: None,
            deferred: Vec::new(),
            flusher: None,
            pending: HashMap::default(),
            replies: HashMap::default(),
            follow: Follow::default(),
            due: Vec::new(),
        }
    }

    /// Queues a reply of `key`: at once, or behind the replies of earlier
    /// requests still being prepared on other cores, so a connection's
    /// replies always come in the order of its requests. (Published
    /// messages do not wait: they are not replies.)
    pub fn reply(&mut self, key: usize, frame: Bytes) {
        if self.replies.is_empty() {
            return self.push(key, frame);
        }
        match self.replies.get_mut(&key) {
            None => self.push(key, frame),
            Some(r) => {
                r.next += 1;
                r.slots.push_back(Some(vec![frame]));
            }
        }
    }

    /// Holds a place for a reply of connection `key` (generation `gen`)
    /// that another core prepares; later replies queue behind it until
    /// [`Shard::fill_reply`] gives it.
    pub fn reserve_reply(&mut self, key: usize, gen: u64) -> u64 {
        let r = self.replies.entry(key).or_insert_with(|| {
            Box::new(Replies {
                gen,
                ..Replies::default()
            })
        });
        let ticket = r.next;
        r.next += 1;
        r.slots.push_back(None);
        ticket
    }

    /// Gives the reply held by `ticket` (one or more frames), and sends
    /// every reply that was waiting for it only.
    pub fn fill_reply(&mut self, key: usize, gen: u64, ticket: u64, frames: Vec<Bytes>) {
        let Some(r) = self.replies.get_mut(&key).filter(|r| r.gen == gen) else {
            return;
        };
        if let Some(slot) = ticket
            .checked_sub(r.base)
            .and_then(|i| r.slots.get_mut(i as usize))
        {
            *slot = Some(frames);
        }
        let mut ready = Vec::new();
        while let Some(Some(_)) = r.slots.front() {
            if let Some(Some(frames)) = r.slots.pop_front() {
                ready.extend(frames);
            }
            r.base += 1;
        }
        let done = r.slots.is_empty();
        let waiter = if done { r.waiter.take() } else { None };
        if done {
            self.replies.remove(&key);
        }
        for frame in ready {
            self.push_to(key, gen, frame);
        }
        if let Some(w) = waiter {
            w.wake();
        }
    }

    /// Ready once `key` has no reply being prepared elsewhere.
    pub fn poll_replies(&mut self, key: usize, cx: &mut Context<'_>) -> Poll<()> {
        match self.replies.get_mut(&key) {
            None => Poll::Ready(()),
            Some(r) => {
                r.waiter = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Does `key` have replies being prepared elsewhere?
    pub fn replies_pending(&self, key: usize) -> bool {
        self.replies.contains_key(&key)
    }

    /// Holds this core's interest in `channel` for a subscription that
    /// will be completed later (by [`Shard::subscribe`]): every message
    /// the channel's owner sequences from now on crosses to this core.
    pub fn reserve(&mut self, channel: &str, interest: &Interest) {
        *self.pending.entry(channel.into()).or_insert(0) += 1;
        interest.add(channel, self.id);
    }

    /// Ends a reservation; the interest bit goes when nothing else holds it.
    pub fn release(&mut self, channel: &str, interest: &Interest) {
        let Some(n) = self.pending.get_mut(channel) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.pending.remove(channel);
        if self.pending.capacity() > 64 && self.pending.len() < self.pending.capacity() / 4 {
            self.pending.shrink_to_fit();
        }
        if self.table(channel).is_none() {
            interest.remove(channel, self.id);
        }
    }

    /// Would one more subscription of `key` pass its limit?
    pub fn at_subscription_limit(&self, key: usize) -> bool {
        self.conns
            .get(key)
            .is_some_and(|c| c.subs.len() >= self.limits.max_subscriptions)
    }

    /// Most channels one connection may subscribe to.
    pub fn send_queue_limit(&self) -> usize {
        self.limits.send_queue_limit
    }

    pub fn max_subscriptions(&self) -> usize {
        self.limits.max_subscriptions
    }

    /// Reads the monotonic clock this shard runs on.
    pub fn now(&self) -> u64 {
        (self.limits.clock)()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The keep-alive schedule this shard sweeps by.
    pub fn keepalive(&self) -> Keepalive {
        self.limits.keepalive
    }

    pub fn conn(&self, key: usize) -> Option<&Conn> {
        self.conns.get(key)
    }

    fn conn_mut(&mut self, key: usize, gen: u64) -> Option<&mut Conn> {
        self.conns.get_mut(key).filter(|c| c.gen == gen)
    }

    /// Registers a new connection whose front-end reads `encoding` and
    /// closes with `shutdown_code` when the server stops; returns its slot
    /// and generation.
    pub fn open(&mut self, handle: i32, encoding: Encoding, shutdown_code: u16) -> (usize, u64) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let bucket = (self.limits.publish_rate > 0).then(|| {
            Box::new(Bucket {
                tokens: self.limits.publish_rate as f64,
                last: (self.limits.clock)(),
            })
        });
        let key = self.conns.insert(Conn {
            gen,
            encoding,
            shutdown_code,
            expires: None,
            handle,
            queue: VecDeque::new(),
            queued: 0,
            inflight: 0,
            writer: None,
            closing: None,
            sent: false,
            cut: false,
            last_seen: self.sweep,
            pinged_at: 0,
            opened_cs: ((self.limits.clock)() / 10) as u32,
            close_code: 0,
            subs: ConnSubs::None,
            bucket,
        });
        self.stats.connections.inc();
        self.churn += 1;
        (key, gen)
    }

    /// Is `key` subscribed to `channel`?
    pub fn is_subscribed(&self, key: usize, channel: &str) -> bool {
        let Some(conn) = self.conns.get(key) else {
            return false;
        };
        let entry = entry(key, conn.encoding);
        self.table(channel).is_some_and(|set| set.contains(entry))
    }

    /// The local subscribers of routing key `channel`.
    fn table(&self, channel: &str) -> Option<&Subscribers> {
        self.channels
            .find(route_hash(channel), |(k, _)| &**k == channel)
            .map(|(_, s)| s)
    }

    /// A slow consumer closed, for the debug console if one watches.
    /// Out of line: the delivery loop stays as it was.
    #[cold]
    #[inline(never)]
    fn seen_slow(&self, key: usize) {
        let w = super::watch::watch();
        if w.on() {
            let detail = format!("worker {} connection {key}", self.id);
            w.record("slow_consumer", 0, "", detail);
        }
    }

    /// Channels (routing keys) with subscribers here, and how many each
    /// has, the most subscribed first, at most `limit` (for the console).
    pub fn channel_counts(&self, limit: usize) -> Vec<(Box<str>, usize)> {
        let mut all: Vec<(Box<str>, usize)> = self
            .channels
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(k, s)| (Box::<str>::from(&**k), s.len()))
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(limit);
        all
    }

    /// The channels (routing keys) `key` is subscribed to.
    pub fn subscriptions(&self, key: usize) -> Vec<Rc<str>> {
        self.conns
            .get(key)
            .map(|c| c.subs.as_slice().to_vec())
            .unwrap_or_default()
    }

    /// Sets when `key`'s authorization expires (on [`Limits::clock`];
    /// `None`: never).
    /// Past it, the connection is closed with [`Closes::expired`].
    pub fn set_expiry(&mut self, key: usize, gen: u64, at_ms: Option<u64>) {
        let Some(conn) = self.conn_mut(key, gen) else {
            return;
        };
        conn.expires = at_ms.and_then(NonZeroU64::new);
        if let Some(at) = at_ms {
            self.timers.push(Reverse((at, key, gen)));
        }
    }

    /// Forgets a finished connection and its subscriptions; says how it
    /// ended (`None` if it was gone already).
    pub fn remove(&mut self, key: usize, gen: u64, interest: &Interest) -> Option<Closed> {
        self.conn_mut(key, gen)?;
        let conn = self.conns.try_remove(key)?;
        let now_cs = ((self.limits.clock)() / 10) as u32;
        let closed = Closed {
            code: conn.close_code,
            lasted: Duration::from_millis(u64::from(now_cs.wrapping_sub(conn.opened_cs)) * 10),
        };
        self.replies.remove(&key);
        self.follow.forget(key);
        let entry = entry(key, conn.encoding);
        for channel in conn.subs.as_slice() {
            self.drop_subscriber(channel, entry, interest);
        }
        self.stats.subscriptions.add(-(conn.subs.len() as i64));
        self.stats.connections.dec();
        self.churn += 1;
        if self.conns.is_empty() {
            if let Some(w) = self.empty_waker.take() {
                w.wake();
            }
        }
        Some(closed)
    }

    fn drop_subscriber(&mut self, channel: &str, entry: u32, interest: &Interest) {
        let hash = route_hash(channel);
        let Ok(mut found) = self.channels.find_entry(hash, |(k, _)| &**k == channel) else {
            return;
        };
        found.get_mut().1.remove(entry);
        if found.get().1.is_empty() {
            found.remove();
            if !self.pending.contains_key(channel) {
                interest.remove(channel, self.id);
            }
            self.stats.channels.dec();
        }
    }

    /// Subscribes `key` to `channel`. Subscribing twice is harmless.
    /// The interest bit is set before this returns, i.e. before the
    /// confirmation is queued.
    pub fn subscribe(
        &mut self,
        key: usize,
        channel: &str,
        interest: &Interest,
    ) -> Result<(), SubscribeError> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        let entry = entry(key, conn.encoding);
        let hash = route_hash(channel);
        if let Some((_, set)) = self.channels.find(hash, |(k, _)| &**k == channel) {
            if set.contains(entry) {
                return Ok(());
            }
        }
        if conn.subs.len() >= self.limits.max_subscriptions {
            return Err(SubscribeError::TooMany(self.limits.max_subscriptions));
        }
        self.stats.subscriptions.inc();
        match self.channels.find_mut(hash, |(k, _)| &**k == channel) {
            Some((name, set)) => {
                conn.subs.push(name.clone());
                set.insert(entry);
            }
            None => {
                interest.add_hashed(channel, hash, self.id);
                let name: Rc<str> = channel.into();
                conn.subs.push(name.clone());
                self.channels
                    .insert_unique(hash, (name, Subscribers::new(entry)), |(k, _)| {
                        route_hash(k)
                    });
                self.stats.channels.inc();
            }
        }
        Ok(())
    }

    /// Unsubscribes `key` from `channel`; false if it was not subscribed.
    pub fn unsubscribe(&mut self, key: usize, channel: &str, interest: &Interest) -> bool {
        let Some(conn) = self.conns.get_mut(key) else {
            return false;
        };
        if !conn.subs.remove(channel) {
            return false;
        }
        let entry = entry(key, conn.encoding);
        self.stats.subscriptions.dec();
        self.drop_subscriber(channel, entry, interest);
        true
    }

    /// Takes one publish token; false when the connection is over its rate.
    pub fn take_publish_token(&mut self, key: usize) -> bool {
        let rate = self.limits.publish_rate as f64;
        let Some(bucket) = self.conns.get_mut(key).and_then(|c| c.bucket.as_mut()) else {
            return true;
        };
        let now = (self.limits.clock)();
        let refill = now.saturating_sub(bucket.last) as f64 / 1000.0 * rate;
        bucket.tokens = (bucket.tokens + refill).min(rate);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            self.stats.rate_limited.inc();
            false
        }
    }

    /// Queues `frame` for `key` if it is still connection `gen` (work
    /// that comes back from another core may find the slot reused).
    pub fn push_to(&mut self, key: usize, gen: u64, frame: Bytes) -> bool {
        if self.conn_mut(key, gen).is_none_or(|c| c.is_closing()) {
            return false;
        }
        self.push(key, frame);
        true
    }

    /// Queues `frame` for `key`. A connection whose unsent output would
    /// pass the limit is closed with 4008 instead (its queue is dropped;
    /// other connections are unaffected).
    pub fn push(&mut self, key: usize, frame: Bytes) {
        let limit = self.limits.send_queue_limit;
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.closing.is_some() {
            return;
        }
        if over_limit(conn, frame.len(), limit) {
            self.stats.slow_consumer_closes.inc();
            self.seen_slow(key);
            let (code, reason) = self.limits.closes.slow_consumer;
            self.close(key, Some(code), reason, true);
            return;
        }
        conn.queued += frame.len();
        enqueue(&mut conn.queue, frame);
        if let Some(w) = conn.writer.take() {
            w.wake();
        }
    }

    /// Fans `msg` out to every local subscriber of its channel but
    /// `except`: the publisher's frame, or for subscribers that read
    /// another encoding that encoding's frame (built once per message).
    /// Returns the number of deliveries.
    pub fn deliver(&mut self, msg: &Message, except: Option<usize>) -> usize {
        let hash = msg.hash();
        let Some((_, subs)) = msg.with_key(|key| self.channels.find(hash, |(k, _)| &**k == key))
        else {
            return 0;
        };
        let limit = self.limits.send_queue_limit;
        // The publisher's frame goes out as it is, unless it must be
        // rebuilt with the message's offset (then no encoding matches).
        let own = match msg.reframed() {
            false => msg.encoding(),
            true => Encoding(u8::MAX),
        };
        // Frames of other encodings, looked up once per delivery.
        let mut others: [Option<Option<Bytes>>; MAX_ENCODINGS] = Default::default();
        let mut delivered = 0;
        let mut overflowed: Vec<usize> = Vec::new();
        let coalesce = self.limits.coalesce;
        let deferred = &mut self.deferred;
        for e in subs.iter() {
            let key = (e & SLOT_MASK) as usize;
            if Some(key) == except {
                continue;
            }
            let enc = Encoding((e >> SLOT_BITS) as u8);
            let frame = if enc == own {
                msg.frame()
            } else {
                let slot = &mut others[usize::from(enc.0) % MAX_ENCODINGS];
                match slot.get_or_insert_with(|| msg.frame_for(enc, self.encoders)) {
                    Some(f) => f,
                    None => continue,
                }
            };
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.closing.is_some() {
                continue;
            }
            if over_limit(conn, frame.len(), limit) {
                overflowed.push(key);
                continue;
            }
            conn.queued += frame.len();
            enqueue(&mut conn.queue, frame.clone());
            if let Some(w) = conn.writer.take() {
                if coalesce {
                    deferred.push(w);
                } else {
                    w.wake();
                }
            }
            delivered += 1;
        }
        if !self.deferred.is_empty() {
            if let Some(f) = self.flusher.take() {
                f.wake();
            }
        }
        let (code, reason) = self.limits.closes.slow_consumer;
        for key in overflowed {
            self.stats.slow_consumer_closes.inc();
            self.seen_slow(key);
            self.close(key, Some(code), reason, true);
        }
        self.stats.messages_out.add(delivered as u64);
        if !self.follow.is_empty() && msg.offset() > 0 {
            self.followed(msg);
        }
        delivered
    }

    /// A message of a channel some connections here follow for their user
    /// was queued: each gets an ack ping behind it, unless one is in flight.
    #[cold]
    fn followed(&mut self, msg: &Message) {
        let mut due = std::mem::take(&mut self.due);
        msg.with_key(|k| self.follow.delivered(k, msg.offset(), &mut due));
        for key in due.drain(..) {
            self.ack(key);
        }
        self.due = due;
    }

    /// Queues an ack ping for `key` if it follows its user's channels, has
    /// deliveries not yet acknowledged and no ping in flight.
    pub fn ack(&mut self, key: usize) {
        if let Some(frame) = self.ack_ping(key) {
            self.push(key, frame);
        }
    }

    /// [`Shard::ack`] behind the replies still being prepared for `key`
    /// (a replay of what it missed).
    pub fn ack_behind_replies(&mut self, key: usize) {
        if let Some(frame) = self.ack_ping(key) {
            self.reply(key, frame);
        }
    }

    fn ack_ping(&mut self, key: usize) -> Option<Bytes> {
        self.follow
            .ping(key)
            .then(|| (self.limits.closes.ack_ping)())
    }

    /// Starts closing `key`: queues a close frame (`code = None`: empty
    /// body) after what is queued, or instead of it with `discard_queued`,
    /// and sets the deadline after which the socket is cut.
    pub fn close(&mut self, key: usize, code: Option<u16>, reason: &str, discard_queued: bool) {
        let timeout = self.limits.close_timeout_ms;
        let deadline = (self.limits.clock)() + timeout;
        self.close_with_deadline(key, code, reason, discard_queued, deadline);
    }

    /// [`Shard::close`] with an explicit deadline ([`Limits::clock`]).
    pub fn close_with_deadline(
        &mut self,
        key: usize,
        code: Option<u16>,
        reason: &str,
        discard_queued: bool,
        deadline: u64,
    ) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.closing.is_some() {
            return;
        }
        conn.close_code = code.unwrap_or(1005);
        if discard_queued {
            conn.queue.clear();
            conn.queued = 0;
        }
        let f = (self.limits.closes.frame)(code, reason);
        conn.queued += f.len();
        conn.queue.push_back(f);
        conn.closing = NonZeroU64::new(deadline.max(1));
        let gen = conn.gen;
        if let Some(w) = conn.writer.take() {
            w.wake();
        }
        self.timers.push(Reverse((deadline, key, gen)));
    }

    /// The reader stopped without a closing handshake of ours (peer gone):
    /// drop the queue and let the writer finish.
    pub fn abandon(&mut self, key: usize, gen: u64) {
        let now = (self.limits.clock)();
        let Some(conn) = self.conn_mut(key, gen) else {
            return;
        };
        if conn.closing.is_none() {
            conn.queue.clear();
            conn.queued = 0;
            conn.closing = NonZeroU64::new(now.max(1));
            conn.close_code = 1006;
        }
        if let Some(w) = conn.writer.take() {
            w.wake();
        }
    }

    /// Cuts the socket of `key` now.
    pub fn cut(&mut self, key: usize, gen: u64) {
        let cut = self.limits.closes.cut;
        if let Some(conn) = self.conn_mut(key, gen) {
            if !conn.cut {
                conn.cut = true;
                cut(conn.handle);
            }
            if let Some(w) = conn.writer.take() {
                w.wake();
            }
        }
    }

    /// For the writer: moves queued frames into `batch` (at most
    /// `max_bytes`, and at least one frame). `Ready(true)`: write the batch;
    /// `Ready(false)`: the connection is finished, stop; `Pending`: idle.
    pub fn fill(
        &mut self,
        key: usize,
        gen: u64,
        batch: &mut impl FrameSink,
        max_bytes: usize,
        cx: &mut Context<'_>,
    ) -> Poll<bool> {
        let Some(conn) = self.conn_mut(key, gen) else {
            return Poll::Ready(false);
        };
        if conn.cut {
            return Poll::Ready(false);
        }
        while let Some(front) = conn.queue.front() {
            if batch.frames() >= MAX_IOV
                || (batch.bytes() > 0 && batch.bytes() + front.len() > max_bytes)
            {
                break;
            }
            let f = conn.queue.pop_front().unwrap_or_default();
            conn.queued -= f.len();
            conn.inflight += f.len();
            batch.push(f);
            conn.sent = true;
        }
        if conn.queue.is_empty() && conn.queue.capacity() > 64 {
            conn.queue = VecDeque::new();
        }
        if batch.frames() > 0 {
            return Poll::Ready(true);
        }
        if conn.closing.is_some() {
            return Poll::Ready(false);
        }
        conn.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    /// For the writer: `n` bytes of the in-flight batch were written.
    pub fn written(&mut self, key: usize, gen: u64, n: usize) {
        self.stats.bytes_out.add(n as u64);
        if let Some(conn) = self.conn_mut(key, gen) {
            conn.inflight = conn.inflight.saturating_sub(n);
        }
    }

    /// The client of `key` was heard from (any bytes): it is alive, and
    /// any ping it had pending is answered.
    pub fn seen(&mut self, key: usize) {
        let now = self.sweep;
        if let Some(c) = self.conns.get_mut(key) {
            c.last_seen = now;
            c.pinged_at = 0;
        }
    }

    /// One keep-alive sweep (protocol.md 1.1 "Keep-alive"): pings every
    /// connection silent for `ping_after` sweeps, and closes with 1001
    /// "ping timeout" those still silent `close_after` sweeps after their
    /// ping (the close deadline then cuts a peer that cannot even take the
    /// close frame). One pass over the connections, whatever their number.
    pub fn sweep_idle(&mut self) {
        self.sweep = self.sweep.wrapping_add(1).max(1);
        let ka = self.limits.keepalive;
        let now = self.sweep;
        let mut ping = Vec::new();
        let mut dead = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            // An idle connection keeps no queue buffer: freed here, at
            // most once per sweep, never on the delivery path.
            if !std::mem::take(&mut c.sent) && c.queue.is_empty() && c.queue.capacity() > 0 {
                c.queue = VecDeque::new();
            }
            if c.closing.is_some() {
                continue;
            }
            if ka.ping_after == 0 {
                continue;
            }
            if c.pinged_at != 0 {
                if now.wrapping_sub(c.pinged_at) >= ka.close_after {
                    dead.push(key);
                }
            } else if now.wrapping_sub(c.last_seen) >= ka.ping_after {
                c.pinged_at = now;
                ping.push(key);
            }
        }
        if !ping.is_empty() {
            let frame = (self.limits.closes.ping)();
            self.stats.pings_sent.add(ping.len() as u64);
            for key in ping {
                self.push(key, frame.clone());
            }
        }
        let (code, reason) = self.limits.closes.ping_timeout;
        for key in dead {
            self.stats.ping_timeouts.inc();
            self.close(key, Some(code), reason, true);
        }
    }

    /// Runs the timers due now ([`Limits::clock`]): closes connections whose token
    /// expired (4001) and cuts those whose close deadline passed.
    pub fn run_timers(&mut self) {
        let now = (self.limits.clock)();
        while let Some(&Reverse((at, key, gen))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conn_mut(key, gen) else {
                continue;
            };
            match conn.closing.map(NonZeroU64::get) {
                Some(deadline) if deadline <= now => self.cut(key, gen),
                Some(_) => {}
                None => {
                    // A timer of an expiry that was since replaced (a fresh
                    // token) finds the new one still ahead.
                    if conn.expires.is_some_and(|at| at.get() <= now) {
                        self.stats.expired_closes.inc();
                        let (code, reason) = self.limits.closes.expired;
                        self.close(key, Some(code), reason, false);
                    }
                }
            }
        }
    }

    /// Closes every connection, each with its front-end's shutdown code,
    /// after what is queued (shutdown).
    pub fn close_all(&mut self, deadline: u64, reason: &str) {
        let keys: Vec<(usize, u16)> = self
            .conns
            .iter()
            .map(|(k, c)| (k, c.shutdown_code))
            .collect();
        for (key, code) in keys {
            self.close_with_deadline(key, Some(code), reason, false, deadline);
        }
    }

    /// Closes up to `n` connections not closing yet, each with the code
    /// `code` gives for its front-end's shutdown code, after what is queued
    /// (a restart's drain, a batch at a time); returns how many.
    pub fn close_some(
        &mut self,
        n: usize,
        code: fn(u16) -> u16,
        reason: &str,
        deadline: u64,
    ) -> usize {
        let keys: Vec<(usize, u16)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.closing.is_none())
            .take(n)
            .map(|(k, c)| (k, c.shutdown_code))
            .collect();
        for &(key, shutdown) in &keys {
            self.close_with_deadline(key, Some(code(shutdown)), reason, false, deadline);
        }
        keys.len()
    }

    /// Connections open here (closing ones included).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Closes every subscriber of `channel`, each with its front-end's
    /// shutdown code (they reconnect and recover what they can). Returns
    /// how many.
    pub fn close_subscribers(&mut self, channel: &str, reason: &str) -> usize {
        let keys: Vec<usize> = self
            .table(channel)
            .map(|s| s.iter().map(|e| (e & SLOT_MASK) as usize).collect())
            .unwrap_or_default();
        for &key in &keys {
            let code = self.conns.get(key).map(|c| c.shutdown_code);
            self.close(key, code, reason, false);
        }
        keys.len()
    }

    /// For the flushing task: ready once a writer waits for the next flush.
    pub fn poll_deferred(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.deferred.is_empty() {
            self.flusher = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    /// Wakes every writer deliveries left waiting (write coalescing).
    pub fn flush(&mut self) {
        for w in self.deferred.drain(..) {
            w.wake();
        }
        if self.deferred.capacity() > 4096 {
            self.deferred = Vec::new();
        }
    }

    /// Registers a waker for when the shard has no connection left.
    pub fn poll_empty(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.conns.is_empty() {
            Poll::Ready(())
        } else {
            self.empty_waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Connections opened or closed since the last call.
    pub fn take_churn(&mut self) -> usize {
        std::mem::take(&mut self.churn)
    }

    /// Gives back what a storm of connections left behind: the channel
    /// table's and the slab's spare capacity, once most of it is unused.
    pub fn shrink(&mut self) {
        if self.channels.capacity() > 64 && self.channels.len() < self.channels.capacity() / 4 {
            self.channels.shrink_to_fit(|(k, _)| route_hash(k));
        }
        // Only empty chunks at the end can go (keys stay valid).
        self.conns.shrink();
        if self.timers.capacity() > 64 && self.timers.len() < self.timers.capacity() / 4 {
            self.timers.shrink_to_fit();
        }
    }

    /// Local subscribers of `channel` (for tests and metrics).
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.table(channel).map_or(0, |s| s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::message::{Encoding, PayloadKind};

    const ENC: Encoding = Encoding(0);

    /// A message whose frame is `<channel><data>` (a stand-in for a
    /// front-end's frame: the engine never looks inside it).
    fn message_frame(channel: &str, data: &str) -> Message {
        let frame = Bytes::from(format!("{channel}{data}"));
        let c = 0..channel.len();
        let p = channel.len()..frame.len();
        Message::new(frame, ENC, c, p, PayloadKind::Text, 0)
    }
    use std::task::Waker;

    /// Close frames as the tests read them: `[0x88, len, code, reason]`.
    fn close_frame(code: Option<u16>, reason: &str) -> Bytes {
        let mut f = vec![0x88, 0];
        if let Some(c) = code {
            f.extend_from_slice(&c.to_be_bytes());
            f.extend_from_slice(reason.as_bytes());
        }
        f[1] = (f.len() - 2) as u8;
        Bytes::from(f)
    }

    fn ping() -> Bytes {
        Bytes::from_static(&[0x89, 0])
    }

    fn ack_ping() -> Bytes {
        Bytes::from_static(b"\x89\x0aherald:ack")
    }

    thread_local! {
        /// The tests' clock, moved by hand.
        static NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(1) };
        /// Handles cut so far.
        static CUTS: std::cell::RefCell<Vec<i32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    fn clock() -> u64 {
        NOW.with(|n| n.get())
    }

    fn set_clock(ms: u64) {
        NOW.with(|n| n.set(ms));
    }

    fn cuts() -> Vec<i32> {
        CUTS.with(|c| c.borrow().clone())
    }

    const CLOSES: Closes = Closes {
        frame: close_frame,
        ping,
        ack_ping,
        slow_consumer: (4008, "slow consumer"),
        ping_timeout: (1001, "ping timeout"),
        expired: (4001, "token expired"),
        cut: |h| CUTS.with(|c| c.borrow_mut().push(h)),
    };

    fn shard(limit: usize) -> Shard {
        Shard::new(
            0,
            Limits {
                send_queue_limit: limit,
                max_subscriptions: 3,
                close_timeout_ms: 1000,
                publish_rate: 0,
                keepalive: Keepalive {
                    ping_after: 2,
                    close_after: 2,
                    sweep_ms: 1000,
                },
                closes: CLOSES,
                clock,
                coalesce: false,
            },
            Arc::new(CoreStats::new(1)),
            &[],
        )
    }

    /// A write batch that only collects.
    #[derive(Default)]
    struct Sink(Vec<Bytes>);

    impl FrameSink for Sink {
        fn frames(&self) -> usize {
            self.0.len()
        }
        fn bytes(&self) -> usize {
            self.0.iter().map(Bytes::len).sum()
        }
        fn push(&mut self, frame: Bytes) {
            self.0.push(frame);
        }
    }

    fn drain(s: &mut Shard, key: usize, gen: u64) -> Vec<Bytes> {
        let mut batch = Sink::default();
        let mut cx = Context::from_waker(Waker::noop());
        let _ = s.fill(key, gen, &mut batch, usize::MAX, &mut cx);
        batch.0
    }

    #[test]
    fn fan_out_shares_one_buffer_and_skips_sender() {
        let interest = Interest::new();
        let mut s = shard(1 << 20);
        let conns: Vec<_> = (0..3).map(|_| s.open(-1, ENC, 1001)).collect();
        for &(k, _) in &conns {
            s.subscribe(k, "news", &interest).unwrap();
        }
        assert_eq!(interest.cores("news"), 1);
        let p = message_frame("news", "1");
        assert_eq!(s.deliver(&p, Some(conns[0].0)), 2);
        assert!(drain(&mut s, conns[0].0, conns[0].1).is_empty());
        for &(k, g) in &conns[1..] {
            let got = drain(&mut s, k, g);
            assert_eq!(got.len(), 1);
            assert_eq!(
                got[0].as_ptr(),
                p.frame().as_ptr(),
                "no per-subscriber copy"
            );
        }
    }

    #[test]
    fn double_subscribe_delivers_once_and_last_unsubscribe_clears_interest() {
        let interest = Interest::new();
        let mut s = shard(1 << 20);
        let (k, g) = s.open(-1, ENC, 1001);
        s.subscribe(k, "a", &interest).unwrap();
        s.subscribe(k, "a", &interest).unwrap();
        assert_eq!(s.deliver(&message_frame("a", "1"), None), 1);
        assert_eq!(drain(&mut s, k, g).len(), 1);
        assert!(s.unsubscribe(k, "a", &interest));
        assert!(!s.unsubscribe(k, "a", &interest));
        assert_eq!(interest.cores("a"), 0);
    }

    #[test]
    fn subscription_limit() {
        let interest = Interest::new();
        let mut s = shard(1 << 20);
        let (k, _) = s.open(-1, ENC, 1001);
        for c in ["a", "b", "c"] {
            s.subscribe(k, c, &interest).unwrap();
        }
        assert_eq!(
            s.subscribe(k, "d", &interest),
            Err(SubscribeError::TooMany(3))
        );
    }

    #[test]
    fn slow_consumer_is_closed_and_others_keep_receiving() {
        let interest = Interest::new();
        let mut s = shard(100);
        let (slow, sg) = s.open(-1, ENC, 1001);
        let (fast, fg) = s.open(-1, ENC, 1001);
        s.subscribe(slow, "a", &interest).unwrap();
        s.subscribe(fast, "a", &interest).unwrap();
        // 41 bytes: the third one passes the 100-byte limit.
        let p = message_frame("a", &"x".repeat(40));
        for _ in 0..4 {
            s.deliver(&p, None);
            assert_eq!(drain(&mut s, fast, fg).len(), 1);
            let mut cx = Context::from_waker(Waker::noop());
            let mut b = Sink::default();
            let _ = s.fill(fast, fg, &mut b, usize::MAX, &mut cx);
            s.written(fast, fg, p.frame().len());
        }
        assert!(s.conn(slow).unwrap().is_closing());
        assert!(!s.conn(fast).unwrap().is_closing());
        // The slow queue was replaced by a single close frame (4008).
        let q = drain(&mut s, slow, sg);
        assert_eq!(q.len(), 1);
        assert_eq!(&q[0][2..4], &4008u16.to_be_bytes());
    }

    #[test]
    fn one_oversized_frame_fits_an_empty_queue() {
        let interest = Interest::new();
        let mut s = shard(100);
        let (k, g) = s.open(-1, ENC, 1001);
        s.subscribe(k, "a", &interest).unwrap();
        let big = message_frame("a", &format!("\"{}\"", "x".repeat(200)));
        assert_eq!(s.deliver(&big, None), 1);
        assert!(!s.conn(k).unwrap().is_closing());
        // A second one while the first is unsent passes the limit.
        assert_eq!(s.deliver(&big, None), 0);
        assert!(s.conn(k).unwrap().is_closing());
        let _ = g;
    }

    #[test]
    fn remove_cleans_channels() {
        let interest = Interest::new();
        let mut s = shard(1 << 20);
        let (k, g) = s.open(-1, ENC, 1001);
        s.subscribe(k, "a", &interest).unwrap();
        s.remove(k, g, &interest);
        assert_eq!(s.subscriber_count("a"), 0);
        assert_eq!(interest.cores("a"), 0);
        assert!(s.is_empty());
    }

    /// A restart's drain closes a batch at a time, each connection with
    /// the code its front-end restarts with, and says when it opened and
    /// how it ended.
    #[test]
    fn close_some_closes_a_batch_with_restart_codes() {
        let mut s = shard(1 << 20);
        let interest = Interest::new();
        set_clock(10_000);
        let native: Vec<(usize, u64)> = (0..3).map(|i| s.open(i, ENC, 1001)).collect();
        let pusher = s.open(9, ENC, 4200);
        let restart = |c: u16| if c == 1001 { 1012 } else { c };
        assert_eq!(s.close_some(2, restart, "restarting", 20_000), 2);
        let closing = |s: &Shard| s.conns.iter().filter(|(_, c)| c.is_closing()).count();
        assert_eq!(closing(&s), 2);
        // The rest, and no connection twice.
        assert_eq!(s.close_some(usize::MAX, restart, "restarting", 20_000), 2);
        assert_eq!(s.close_some(usize::MAX, restart, "restarting", 20_000), 0);
        set_clock(12_340);
        let (key, gen) = native[0];
        assert_eq!(
            drain(&mut s, key, gen),
            vec![close_frame(Some(1012), "restarting")]
        );
        let closed = s.remove(key, gen, &interest).unwrap();
        assert_eq!(closed.code, 1012);
        assert_eq!(closed.lasted, Duration::from_millis(2_340));
        assert_eq!(
            drain(&mut s, pusher.0, pusher.1),
            vec![close_frame(Some(4200), "restarting")]
        );
        assert_eq!(s.remove(pusher.0, pusher.1, &interest).unwrap().code, 4200);
        assert_eq!(s.connection_count(), 2);
    }

    #[test]
    fn a_connection_record_stays_small() {
        assert!(
            std::mem::size_of::<Conn>() <= 160,
            "{}",
            std::mem::size_of::<Conn>()
        );
        assert!(std::mem::size_of::<ConnSubs>() <= 24);
        assert!(std::mem::size_of::<Subscribers>() <= 24);
    }

    #[test]
    fn keepalive_schedule() {
        use std::time::Duration;
        let k = Keepalive::new(Duration::from_secs(25), Duration::from_secs(10));
        assert_eq!((k.sweep_ms, k.ping_after, k.close_after), (1000, 25, 10));
        let k = Keepalive::new(Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!((k.sweep_ms, k.ping_after, k.close_after), (200, 5, 5));
        let k = Keepalive::new(Duration::ZERO, Duration::from_secs(10));
        assert_eq!(k.ping_after, 0);
        let k = Keepalive::new(Duration::from_millis(150), Duration::from_millis(150));
        assert_eq!((k.sweep_ms, k.ping_after, k.close_after), (100, 2, 2));
    }

    #[test]
    fn silent_connections_are_pinged_then_closed_and_talkers_are_not() {
        let mut s = shard(1 << 20);
        let (quiet, qg) = s.open(-1, ENC, 1001);
        let (talker, tg) = s.open(-1, ENC, 1001);
        let (answers, ag) = s.open(-1, ENC, 1001);
        let ping = super::tests::ping();
        s.sweep_idle();
        s.seen(talker);
        assert!(drain(&mut s, quiet, qg).is_empty());
        s.sweep_idle(); // two sweeps of silence: pinged
        s.seen(talker);
        for (k, g) in [(quiet, qg), (answers, ag)] {
            let got = drain(&mut s, k, g);
            assert_eq!(got, vec![ping.clone()], "pinged");
        }
        assert!(
            drain(&mut s, talker, tg).is_empty(),
            "a talker is not pinged"
        );
        s.seen(answers); // the pong
        s.sweep_idle();
        s.seen(talker);
        assert!(!s.conn(quiet).unwrap().is_closing());
        s.sweep_idle(); // two sweeps after the ping
        s.seen(talker);
        assert!(
            s.conn(quiet).unwrap().is_closing(),
            "silent after a ping: closed"
        );
        let q = drain(&mut s, quiet, qg);
        assert_eq!(&q[0][2..4], &1001u16.to_be_bytes());
        assert_eq!(&q[0][4..], b"ping timeout");
        assert!(!s.conn(answers).unwrap().is_closing());
        assert!(!s.conn(talker).unwrap().is_closing());
        let _ = (tg, ag);
    }

    #[test]
    fn keepalive_off_never_pings() {
        let mut s = shard(1 << 20);
        s.limits.keepalive = Keepalive::off();
        let (k, g) = s.open(-1, ENC, 1001);
        for _ in 0..1000 {
            s.sweep_idle();
        }
        assert!(drain(&mut s, k, g).is_empty());
        assert!(!s.conn(k).unwrap().is_closing());
    }

    #[test]
    fn expiry_closes_with_its_code_and_a_replaced_one_does_not() {
        let mut s = shard(1 << 20);
        let (k, g) = s.open(-1, ENC, 1001);
        s.set_expiry(k, g, Some(1_001_001));
        {
            set_clock(1_000_000);
            s.run_timers();
        }
        assert!(!s.conn(k).unwrap().is_closing());
        {
            set_clock(1_001_001);
            s.run_timers();
        }
        assert!(s.conn(k).unwrap().is_closing());
        let q = drain(&mut s, k, g);
        assert_eq!(&q[0][2..4], &4001u16.to_be_bytes());
        // A fresh token moves the expiry: the old timer finds it ahead.
        let (k, g) = s.open(-1, ENC, 1001);
        s.set_expiry(k, g, Some(2_000_000));
        s.set_expiry(k, g, Some(3_000_000));
        {
            set_clock(2_500_000);
            s.run_timers();
        }
        assert!(!s.conn(k).unwrap().is_closing());
        s.set_expiry(k, g, None);
        {
            set_clock(3_500_000);
            s.run_timers();
        }
        assert!(!s.conn(k).unwrap().is_closing());
    }

    #[test]
    fn a_close_cuts_the_socket_at_its_deadline_on_the_given_clock() {
        set_clock(10_000);
        let mut s = shard(1 << 20);
        let (k, g) = s.open(77, ENC, 1001);
        s.close(k, Some(1000), "bye", false);
        assert!(s.conn(k).unwrap().is_closing());
        // close_timeout_ms is 1000: due at 11,000.
        {
            set_clock(10_999);
            s.run_timers();
        }
        assert!(!cuts().contains(&77));
        {
            set_clock(11_000);
            s.run_timers();
        }
        assert!(cuts().contains(&77), "cut at the deadline");
        let _ = g;
    }

    #[test]
    fn the_publish_rate_refills_with_the_clock() {
        set_clock(5_000);
        let mut s = shard(1 << 20);
        s.limits.publish_rate = 2;
        let (k, _) = s.open(-1, ENC, 1001);
        assert!(s.take_publish_token(k));
        assert!(s.take_publish_token(k));
        assert!(!s.take_publish_token(k), "a burst of 2 at most");
        set_clock(5_499);
        assert!(!s.take_publish_token(k), "less than one token back");
        set_clock(5_500);
        assert!(s.take_publish_token(k), "one token per 500 ms at 2/s");
        set_clock(60_000);
        assert!(s.take_publish_token(k));
        assert!(s.take_publish_token(k));
        assert!(!s.take_publish_token(k), "refills up to the burst only");
        assert_eq!(s.stats.rate_limited.get(), 3);
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn coalescing_wakes_writers_at_the_flush_only() {
        let interest = Interest::new();
        let mut s = shard(1 << 20);
        s.limits.coalesce = true;
        let (k, g) = s.open(-1, ENC, 1001);
        s.subscribe(k, "news", &interest).unwrap();
        let writer = Arc::new(Count(Default::default()));
        let flusher = Arc::new(Count(Default::default()));
        let wakes = |c: &Arc<Count>| c.0.load(std::sync::atomic::Ordering::Relaxed);
        let waker = Waker::from(writer.clone());
        let mut batch = Sink::default();
        assert!(s
            .fill(
                k,
                g,
                &mut batch,
                usize::MAX,
                &mut Context::from_waker(&waker)
            )
            .is_pending());
        let fw = Waker::from(flusher.clone());
        assert!(s.poll_deferred(&mut Context::from_waker(&fw)).is_pending());
        s.deliver(&message_frame("news", "1"), None);
        s.deliver(&message_frame("news", "2"), None);
        assert_eq!(wakes(&writer), 0, "the writer waits for the flush");
        assert_eq!(wakes(&flusher), 1, "the flusher is told once");
        assert!(s.poll_deferred(&mut Context::from_waker(&fw)).is_ready());
        s.flush();
        assert_eq!(wakes(&writer), 1);
        assert_eq!(drain(&mut s, k, g).len(), 2, "both frames in one batch");
        // A reply is not delayed.
        assert!(s
            .fill(
                k,
                g,
                &mut batch,
                usize::MAX,
                &mut Context::from_waker(&waker)
            )
            .is_pending());
        s.push(k, Bytes::from_static(b"ack"));
        assert_eq!(wakes(&writer), 2);
    }
}
