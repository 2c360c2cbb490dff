//! One reactor's state: its connections (a `slab`), its channel table
//! (channel -> local subscribers), their outbound queues and timers.
//!
//! Owned by exactly one thread and never locked: tasks on that thread borrow
//! it briefly, never across an `.await`. No IO happens here except cutting a
//! socket (`shutdown(2)`) whose deadline passed; the fan-out is
//! [`Shard::deliver`]: one `Bytes` clone (a refcount increment) pushed onto
//! each subscriber's queue, and a wake of that subscriber's writer task.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use std::num::NonZeroU64;

use bytes::{Buf, Bytes};

use crate::auth::Grant;
use crate::engine::interest::Interest;
use hashbrown::HashTable;

use crate::engine::message::{route_hash, Encoder, Encoding, Message, MAX_ENCODINGS};
use crate::engine::stats::CoreStats;
use crate::frontends::pusher::connection::PusherConn;
use crate::integrations::authorizer::ConnAuthz;
use crate::transport::ws::frame;

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
    pub jwt_leeway: u64,
    /// Server pings (protocol.md 1.1 "Keep-alive"), in sweeps.
    pub keepalive: Keepalive,
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
    last: Instant,
}

/// A WebSocket connection as its reactor sees it.
#[derive(Debug)]
pub struct Conn {
    /// Distinguishes this connection from a later one reusing the slab slot.
    pub gen: u64,
    /// The wire format its front-end reads published messages in.
    encoding: Encoding,
    fd: RawFd,
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
    /// (Unix ms).
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
    pub grant: Arc<Grant>,
    /// Channels this connection is subscribed to.
    subs: ConnSubs,
    /// Only with PUBLISH_RATE: boxed, so connections without pay nothing.
    bucket: Option<Box<Bucket>>,
    /// What the authorizer webhook needs to know of this connection (only
    /// when AUTHORIZE sends more than `connect`).
    pub authz: Option<Box<ConnAuthz>>,
    /// A Pusher-protocol connection's state (app, socket id, presence).
    pub pusher: Option<Box<PusherConn>>,
}

impl Conn {
    /// Has a close frame been queued (or the connection been abandoned)?
    pub fn is_closing(&self) -> bool {
        self.closing.is_some()
    }
}

/// Frames taken from a connection's queue for one write. Owns the `Bytes`
/// (so io_uring may hold their pointers) and, for two frames or more, the
/// iovec array of a vectored write. A single frame (the common case at low
/// rates) is held apart and needs neither array, so an idle connection's
/// writer holds no allocation at all.
pub struct Batch {
    one: Option<Bytes>,
    bufs: VecDeque<Bytes>,
    iov: Vec<libc::iovec>,
    bytes: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Self {
        Batch {
            one: None,
            bufs: VecDeque::new(),
            iov: Vec::new(),
            bytes: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.one.is_none() && self.bufs.is_empty()
    }

    /// Frames held.
    fn frames(&self) -> usize {
        usize::from(self.one.is_some()) + self.bufs.len()
    }

    /// Bytes still to write.
    pub fn len(&self) -> usize {
        self.bytes
    }

    fn push(&mut self, b: Bytes) {
        self.bytes += b.len();
        if self.bufs.is_empty() && self.one.is_none() {
            self.one = Some(b);
            return;
        }
        if let Some(first) = self.one.take() {
            self.bufs.push_back(first);
        }
        self.bufs.push_back(b);
    }

    /// Rebuilds the iovec array; call before handing the batch to a write.
    pub fn prepare(&mut self) {
        self.iov.clear();
        self.iov.extend(self.bufs.iter().map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }));
    }

    /// Drops what a write of `n` bytes sent.
    pub fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        if let Some(one) = self.one.as_mut() {
            if one.len() <= n {
                self.one = None;
            } else {
                one.advance(n);
            }
            return;
        }
        while n > 0 {
            let Some(front) = self.bufs.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.bufs.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// Takes the batch's only frame out, for a plain `send` (no iovec to
    /// import); `restore` puts back what was not written.
    pub fn take_single(&mut self) -> Option<Bytes> {
        self.one.take()
    }

    /// Puts back the frame [`Batch::take_single`] took.
    pub fn restore(&mut self, b: Bytes) {
        self.one = Some(b);
    }

    /// Frees the buffers of an empty batch (its writer is going idle).
    pub fn release(&mut self) {
        if self.is_empty() && (self.bufs.capacity() > 0 || self.iov.capacity() > 0) {
            *self = Batch::new();
        }
    }
}

// SAFETY: `iov` points into the `Bytes` in `bufs`, whose heap data never
// moves while the batch is owned by the runtime; `prepare` keeps the two in
// step and nothing changes `bufs` while a write is in flight.
unsafe impl monoio::buf::IoVecBuf for Batch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        self.iov.len()
    }
}

/// Why a subscribe was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeError {
    TooMany(usize),
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
    /// (deadline in Unix ms, slot, gen): token expiries and close deadlines.
    timers: BinaryHeap<Reverse<(u64, usize, u64)>>,
    next_gen: u64,
    stats: Arc<CoreStats>,
    /// The keep-alive clock: sweeps run so far (starts at 1).
    sweep: u32,
    /// Woken when the last connection leaves (for shutdown).
    empty_waker: Option<Waker>,
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

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Shuts a socket down both ways: pending reads return EOF, writes fail.
fn cut_socket(fd: RawFd) {
    // SAFETY: `fd` belongs to a connection still in the slab, so it is open.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
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
        }
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

    /// Registers a new connection; returns its slot and generation.
    pub fn open(&mut self, fd: RawFd, grant: Arc<Grant>, encoding: Encoding) -> (usize, u64) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let bucket = (self.limits.publish_rate > 0).then(|| {
            Box::new(Bucket {
                tokens: self.limits.publish_rate as f64,
                last: Instant::now(),
            })
        });
        let exp = grant.exp;
        let key = self.conns.insert(Conn {
            gen,
            encoding,
            fd,
            queue: VecDeque::new(),
            queued: 0,
            inflight: 0,
            writer: None,
            closing: None,
            sent: false,
            cut: false,
            last_seen: self.sweep,
            pinged_at: 0,
            grant,
            subs: ConnSubs::None,
            bucket,
            authz: None,
            pusher: None,
        });
        self.schedule_expiry(key, gen, exp);
        self.stats.connections.inc();
        self.churn += 1;
        (key, gen)
    }

    /// The connection's authorizer state, if it has one.
    pub fn authz_mut(&mut self, key: usize) -> Option<&mut ConnAuthz> {
        self.conns.get_mut(key)?.authz.as_deref_mut()
    }

    /// The connection's Pusher state, if it speaks the Pusher protocol.
    pub fn pusher_mut(&mut self, key: usize) -> Option<&mut PusherConn> {
        self.conns.get_mut(key)?.pusher.as_deref_mut()
    }

    /// Makes `key` a Pusher connection.
    pub fn set_pusher(&mut self, key: usize, state: PusherConn) {
        if let Some(c) = self.conns.get_mut(key) {
            c.pusher = Some(Box::new(state));
        }
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

    /// The channels (routing keys) `key` is subscribed to.
    pub fn subscriptions(&self, key: usize) -> Vec<Rc<str>> {
        self.conns
            .get(key)
            .map(|c| c.subs.as_slice().to_vec())
            .unwrap_or_default()
    }

    /// Calls `f` on every connection's Pusher state (for the idle sweep).
    pub fn each_pusher(&mut self, mut f: impl FnMut(usize, &mut PusherConn)) {
        for (key, conn) in self.conns.iter_mut() {
            if conn.closing.is_none() {
                if let Some(p) = conn.pusher.as_deref_mut() {
                    f(key, p);
                }
            }
        }
    }

    /// Attaches the authorizer state of a connection just opened.
    pub fn set_authz(&mut self, key: usize, authz: Option<Box<ConnAuthz>>) {
        if let Some(c) = self.conns.get_mut(key) {
            c.authz = authz;
        }
    }

    fn schedule_expiry(&mut self, key: usize, gen: u64, exp: Option<u64>) {
        if let Some(exp) = exp {
            let at = exp
                .saturating_add(self.limits.jwt_leeway)
                .saturating_mul(1000)
                + 1;
            self.timers.push(Reverse((at, key, gen)));
        }
    }

    /// Forgets a finished connection and its subscriptions.
    pub fn remove(&mut self, key: usize, gen: u64, interest: &Interest) {
        if self.conn_mut(key, gen).is_none() {
            return;
        }
        let Some(conn) = self.conns.try_remove(key) else {
            return;
        };
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
    }

    fn drop_subscriber(&mut self, channel: &str, entry: u32, interest: &Interest) {
        let hash = route_hash(channel);
        let Ok(mut found) = self.channels.find_entry(hash, |(k, _)| &**k == channel) else {
            return;
        };
        found.get_mut().1.remove(entry);
        if found.get().1.is_empty() {
            found.remove();
            interest.remove(channel, self.id);
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

    /// Replaces a connection's permissions; unsubscribes (and notifies) each
    /// channel it may no longer read.
    pub fn reauthorize(&mut self, key: usize, grant: Arc<Grant>, interest: &Interest) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let gen = conn.gen;
        let exp = grant.exp;
        let lost: Vec<Rc<str>> = conn
            .subs
            .as_slice()
            .iter()
            .filter(|c| !grant.read.allows(c))
            .cloned()
            .collect();
        conn.grant = grant;
        for channel in lost {
            self.unsubscribe(key, &channel, interest);
            self.push(
                key,
                crate::frontends::native::protocol::unsubscribed(&channel, None),
            );
        }
        self.schedule_expiry(key, gen, exp);
    }

    /// Takes one publish token; false when the connection is over its rate.
    pub fn take_publish_token(&mut self, key: usize) -> bool {
        let rate = self.limits.publish_rate as f64;
        let Some(bucket) = self.conns.get_mut(key).and_then(|c| c.bucket.as_mut()) else {
            return true;
        };
        let now = Instant::now();
        let refill = now.duration_since(bucket.last).as_secs_f64() * rate;
        bucket.tokens = (bucket.tokens + refill).min(rate);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
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
            self.close(
                key,
                Some(4008),
                "slow consumer: send queue limit reached",
                true,
            );
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
        let own = msg.encoding();
        // Frames of other encodings, looked up once per delivery.
        let mut others: [Option<Option<Bytes>>; MAX_ENCODINGS] = Default::default();
        let mut delivered = 0;
        let mut overflowed: Vec<usize> = Vec::new();
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
                w.wake();
            }
            delivered += 1;
        }
        for key in overflowed {
            self.stats.slow_consumer_closes.inc();
            self.close(
                key,
                Some(4008),
                "slow consumer: send queue limit reached",
                true,
            );
        }
        self.stats.messages_out.add(delivered as u64);
        delivered
    }

    /// Starts closing `key`: queues a close frame (`code = None`: empty
    /// body) after what is queued, or instead of it with `discard_queued`,
    /// and sets the deadline after which the socket is cut.
    pub fn close(&mut self, key: usize, code: Option<u16>, reason: &str, discard_queued: bool) {
        let timeout = self.limits.close_timeout_ms;
        self.close_with_deadline(key, code, reason, discard_queued, unix_ms() + timeout);
    }

    /// [`Shard::close`] with an explicit deadline (Unix ms).
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
        if discard_queued {
            conn.queue.clear();
            conn.queued = 0;
        }
        let f = frame::close(code, reason);
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
        let Some(conn) = self.conn_mut(key, gen) else {
            return;
        };
        if conn.closing.is_none() {
            conn.queue.clear();
            conn.queued = 0;
            conn.closing = NonZeroU64::new(unix_ms().max(1));
        }
        if let Some(w) = conn.writer.take() {
            w.wake();
        }
    }

    /// Cuts the socket of `key` now.
    pub fn cut(&mut self, key: usize, gen: u64) {
        if let Some(conn) = self.conn_mut(key, gen) {
            if !conn.cut {
                conn.cut = true;
                cut_socket(conn.fd);
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
        batch: &mut Batch,
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
                || (batch.bytes > 0 && batch.bytes + front.len() > max_bytes)
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
        if !batch.is_empty() {
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
            let frame = frame::ping();
            self.stats.pings_sent.add(ping.len() as u64);
            for key in ping {
                self.push(key, frame.clone());
            }
        }
        for key in dead {
            self.stats.ping_timeouts.inc();
            self.close(key, Some(1001), "ping timeout", true);
        }
    }

    /// Runs due timers at `now` (Unix ms): closes connections whose token
    /// expired (4001) and cuts those whose close deadline passed.
    pub fn run_timers(&mut self, now: u64) {
        while let Some(&Reverse((at, key, gen))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let leeway = self.limits.jwt_leeway;
            let Some(conn) = self.conn_mut(key, gen) else {
                continue;
            };
            match conn.closing.map(NonZeroU64::get) {
                Some(deadline) if deadline <= now => self.cut(key, gen),
                Some(_) => {}
                None => {
                    let expired = conn
                        .grant
                        .exp
                        .is_some_and(|exp| now > exp.saturating_add(leeway).saturating_mul(1000));
                    if expired {
                        self.stats.expired_closes.inc();
                        self.close(key, Some(4001), "token expired", false);
                    }
                }
            }
        }
    }

    /// Closes every connection with 1001 (Pusher ones with 4200) after what
    /// is queued (shutdown).
    pub fn close_all(&mut self, deadline: u64) {
        let keys: Vec<(usize, bool)> = self
            .conns
            .iter()
            .map(|(k, c)| (k, c.pusher.is_some()))
            .collect();
        for (key, pusher) in keys {
            // Pusher clients reconnect at once on 4200 ("generic reconnect").
            let code = if pusher { 4200 } else { 1001 };
            self.close_with_deadline(key, Some(code), "server shutting down", false, deadline);
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

    fn shard(limit: usize) -> Shard {
        Shard::new(
            0,
            Limits {
                send_queue_limit: limit,
                max_subscriptions: 3,
                close_timeout_ms: 1000,
                publish_rate: 0,
                jwt_leeway: 0,
                keepalive: Keepalive {
                    ping_after: 2,
                    close_after: 2,
                    sweep_ms: 1000,
                },
            },
            Arc::new(CoreStats::new(1)),
            &[],
        )
    }

    fn drain(s: &mut Shard, key: usize, gen: u64) -> Vec<Bytes> {
        let mut batch = Batch::new();
        let mut cx = Context::from_waker(Waker::noop());
        let _ = s.fill(key, gen, &mut batch, usize::MAX, &mut cx);
        batch.one.into_iter().chain(batch.bufs).collect()
    }

    #[test]
    fn fan_out_shares_one_buffer_and_skips_sender() {
        let interest = Interest::new();
        let mut s = shard(1 << 20);
        let conns: Vec<_> = (0..3).map(|_| s.open(-1, Grant::open(), ENC)).collect();
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
        let (k, g) = s.open(-1, Grant::open(), ENC);
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
        let (k, _) = s.open(-1, Grant::open(), ENC);
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
        let (slow, sg) = s.open(-1, Grant::open(), ENC);
        let (fast, fg) = s.open(-1, Grant::open(), ENC);
        s.subscribe(slow, "a", &interest).unwrap();
        s.subscribe(fast, "a", &interest).unwrap();
        // 41 bytes: the third one passes the 100-byte limit.
        let p = message_frame("a", &"x".repeat(40));
        for _ in 0..4 {
            s.deliver(&p, None);
            assert_eq!(drain(&mut s, fast, fg).len(), 1);
            let mut cx = Context::from_waker(Waker::noop());
            let mut b = Batch::new();
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
        let (k, g) = s.open(-1, Grant::open(), ENC);
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
        let (k, g) = s.open(-1, Grant::open(), ENC);
        s.subscribe(k, "a", &interest).unwrap();
        s.remove(k, g, &interest);
        assert_eq!(s.subscriber_count("a"), 0);
        assert_eq!(interest.cores("a"), 0);
        assert!(s.is_empty());
    }

    #[test]
    fn batch_advance_handles_partial_writes() {
        let mut b = Batch::new();
        b.push(Bytes::from_static(b"abc"));
        b.push(Bytes::from_static(b"defg"));
        b.advance(4);
        assert_eq!(b.len(), 3);
        assert_eq!(&b.bufs[0][..], b"efg");
        b.advance(3);
        assert!(b.is_empty());
        b.release();
        assert_eq!(b.bufs.capacity(), 0);
        // One frame needs no array.
        b.push(Bytes::from_static(b"hello"));
        assert_eq!(b.bufs.capacity(), 0);
        b.advance(2);
        assert_eq!(b.take_single().as_deref(), Some(&b"llo"[..]));
    }

    /// Every connection has one of these: a size budget, checked without
    /// a clock (tuning.md, memory per connection).
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
        let (quiet, qg) = s.open(-1, Grant::open(), ENC);
        let (talker, tg) = s.open(-1, Grant::open(), ENC);
        let (answers, ag) = s.open(-1, Grant::open(), ENC);
        let ping = frame::ping();
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
        let (k, g) = s.open(-1, Grant::open(), ENC);
        for _ in 0..1000 {
            s.sweep_idle();
        }
        assert!(drain(&mut s, k, g).is_empty());
        assert!(!s.conn(k).unwrap().is_closing());
    }

    #[test]
    fn expiry_closes_with_4001() {
        let interest = Interest::new();
        let _ = &interest;
        let mut s = shard(1 << 20);
        let grant = Arc::new(Grant {
            sub: None,
            read: crate::auth::Patterns::all(),
            write: crate::auth::Patterns::all(),
            exp: Some(1000),
        });
        let (k, g) = s.open(-1, grant, ENC);
        s.run_timers(1_000_000);
        assert!(!s.conn(k).unwrap().is_closing());
        s.run_timers(1_001_001);
        assert!(s.conn(k).unwrap().is_closing());
        let q = drain(&mut s, k, g);
        assert_eq!(&q[0][2..4], &4001u16.to_be_bytes());
    }
}
