//! A node's link to its cluster (`BROKER_URL=redis://…`): the engine's
//! [`Broker`], over Redis (or Valkey).
//!
//! One thread of its own, with a single-threaded tokio runtime and the
//! `redis` crate, holds two connections to the broker: a *subscriber*
//! (RESP3, subscribed to the channels this node has subscribers of, and
//! reading history) and a *publisher*. No reactor ever waits on it: the
//! cores hand it commands through unbounded queues, and it hands them
//! messages (and the answers they wait for) through the engine's bus, as
//! one more source.
//!
//! - **Order.** Every publish, this node's too, goes to the broker, and
//!   every node delivers what comes back, in the order the broker sends
//!   it: Redis runs commands one at a time, so each channel has one order
//!   on every node. A publisher's messages leave in the order it sent
//!   them (one queue, one connection, pipelined).
//! - **History** lives in Redis: per channel a stream of the last
//!   messages (`herald:h:<key>`, `MAXLEN` the channel's size, each entry
//!   with the broker's time, read back within the TTL) and a hash with the
//!   epoch and top offset (`herald:m:<key>`). A script numbers, stores and
//!   publishes each message at once, so offsets are cluster-wide and come
//!   in order.
//! - **Exact recovery on any node.** A subscription with history reads its
//!   place on the subscriber connection itself, once the node is
//!   subscribed: RESP3 puts the reply in the stream of pushed messages
//!   exactly where the read ran, so every message before it is in the
//!   read and every one after it is newer. Messages of that channel are
//!   held while the read is out and released around its answer: no gap,
//!   no duplicate.
//! - **Interest.** The node subscribes on the broker only to the channels
//!   it has subscribers of, following the interest map's first/last
//!   subscriber events; each burst of changes is one `SUBSCRIBE` and one
//!   `UNSUBSCRIBE`. A subscription is confirmed to its client only once
//!   the broker confirmed the node's, so what is published after the
//!   client's `subscribed` reaches it.
//! - **Failures.** A connection that closes, a command or a ping that
//!   gets no answer within [`COMMAND_TIMEOUT`] marks the link down: the
//!   node reconnects with backoff and subscribes again to everything; in
//!   between, `/health` answers 503 with the reason, and every publish,
//!   subscription and history read that needs the broker gets an error
//!   (never a silent drop).
//! - **Idempotency.** A publish with an idempotency key sets the key in
//!   Redis (`SET NX PX`, in the same script), so a repeat is dropped
//!   cluster-wide within the window and answered with the first's place.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::metrics::BrokerMetrics;
use crate::config::BrokerUrl;
use crate::engine::core::{
    Broker, ClusterMembers, Core, Done, Envelope, Hub, Join, Placed, ReadHistory, Ready,
};
use crate::engine::history::{new_epoch, HistoryRead, Keep, Outcome, Page, Since, META_TTL_MS};
use crate::engine::interest::Change;
use crate::engine::message::Message;
use crate::engine::roster::{Event, Transition};

/// Broker channel of a routing key: this prefix, then the key.
pub const CHANNEL_PREFIX: &str = "herald:";
/// How long a connection attempt, a batch of publishes, a subscription,
/// a read or a ping may take before the link is declared down.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often each connection is pinged.
const PING_EVERY: Duration = Duration::from_millis(1000);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most publishes in one pipeline.
const MAX_BATCH: usize = 1024;
/// Publishes waiting for the broker past which publishers pause reading
/// (the queue from the cores is unbounded; this bounds it).
const QUEUE_LIMIT: usize = 65_536;
/// Most channels in one SUBSCRIBE.
const SUBSCRIBE_CHUNK: usize = 1024;

/// Publishes a message of a channel without history, unless its
/// idempotency key was seen. KEYS: idempotency key. ARGV: broker
/// channel, message, window (ms). Returns {1, ""}, or {0, ""} for a repeat.
const PUBLISH_ONCE: &str = r"
if redis.call('SET', KEYS[1], '', 'NX', 'PX', ARGV[3]) then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  return {1, ''}
end
return {0, ''}
";

/// Numbers, keeps and publishes a message of a channel with history.
/// KEYS: stream, meta, idempotency key (or the meta again, with window
/// 0). ARGV: broker channel, message, size, ttl (ms), a new epoch (used
/// when the channel has none), meta ttl (ms), idempotency window (ms).
/// Returns {1, "epoch offset"}, or {0, "epoch offset"} of the first for a
/// repeated idempotency key. The published message is
/// `o<epoch> <offset>\n` then the message.
const PUBLISH_KEPT: &str = r"
local window = tonumber(ARGV[7])
if window > 0 then
  local first = redis.call('GET', KEYS[3])
  if first then return {0, first} end
end
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 't', 0)
end
local top = redis.call('HINCRBY', KEYS[2], 't', 1)
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], top .. '-1', 'm', ms, 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local place = epoch .. ' ' .. top
redis.call('PUBLISH', ARGV[1], 'o' .. place .. '\n' .. ARGV[2])
if window > 0 then redis.call('SET', KEYS[3], place, 'PX', window) end
return {1, place}
";

/// Reads a channel's history. KEYS: stream, meta. ARGV: mode (`n`: the
/// newest N; `a`: after offset S of epoch E, from the oldest kept when E
/// is another epoch), N, E, S, ttl (ms), a new epoch (for a channel
/// without one), meta ttl (ms). Returns {epoch, top, offset, message,
/// offset, message, ...}, oldest first, within the ttl.
const READ: &str = r"
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 't', 0)
end
redis.call('PEXPIRE', KEYS[2], ARGV[7])
local top = tonumber(redis.call('HGET', KEYS[2], 't'))
local now = redis.call('TIME')
local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[5])
local n = tonumber(ARGV[2])
local entries
if ARGV[1] == 'n' then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', n)
  local r = {}
  for i = #entries, 1, -1 do r[#r + 1] = entries[i] end
  entries = r
else
  local from = '-'
  if ARGV[3] == epoch then from = '(' .. ARGV[4] .. '-1' end
  entries = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', n)
end
local out = {epoch, top}
for _, e in ipairs(entries) do
  local f = e[2]
  local ms, data = nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'm' then ms = tonumber(f[i + 1]) elseif f[i] == 'd' then data = f[i + 1] end
  end
  if ms and data and ms >= oldest then
    out[#out + 1] = tonumber(string.match(e[1], '^(%d+)'))
    out[#out + 1] = data
  end
end
return out
";

/// The channel every node's presence events go through (not a routing
/// key's: `!` is in no protocol's channel names).
const CONTROL: &str = "herald!ctl";
/// The set of live nodes.
const NODES: &str = "herald!nodes";
/// How long a node's heartbeat lasts: a node silent this long is gone.
const ALIVE_MS: u64 = 3000;

/// Records one presence event of a node in its hash and publishes it.
/// KEYS: the node's hash. ARGV: control channel, event, mode (`set`,
/// `del`, `reset`), then fields (and values, to set).
const EVENT: &str = r"
if ARGV[3] == 'reset' then redis.call('DEL', KEYS[1]) end
if ARGV[3] == 'del' then
  for i = 4, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
else
  for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
";

/// The node's heartbeat; and every node without one is declared gone,
/// once (its hash deleted, a `gone` event published by this node).
/// KEYS: the nodes set. ARGV: this node, heartbeat ttl (ms), control
/// channel.
const BEAT: &str = r"
redis.call('SET', 'herald!alive:' .. ARGV[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
local gone = 0
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if n ~= ARGV[1] and redis.call('EXISTS', 'herald!alive:' .. n) == 0 then
    redis.call('SREM', KEYS[1], n)
    redis.call('DEL', 'herald!pn:' .. n)
    redis.call('PUBLISH', ARGV[3], cjson.encode({e = 'gone', node = n, by = ARGV[1]}))
    gone = gone + 1
  end
end
return gone
";

/// Every node's presence: {node, {field, value, ...}, ...}. KEYS: the
/// nodes set.
const SNAPSHOT: &str = r"
local out = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  out[#out + 1] = n
  out[#out + 1] = redis.call('HGETALL', 'herald!pn:' .. n)
end
return out
";

/// Why the link could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("BROKER_URL {url}: {source}")]
    Url {
        url: String,
        source: redis::RedisError,
    },
    #[error("cannot start the broker thread: {0}")]
    Thread(std::io::Error),
}

struct Publish {
    src: usize,
    msg: Arc<Message>,
    idempotency_key: Option<Box<str>>,
    done: Option<Done>,
}

enum Control {
    Interest {
        key: Box<str>,
        change: Change,
    },
    WhenReady {
        key: Box<str>,
        core: usize,
        ready: Ready,
    },
    Join {
        key: Box<str>,
        ask: JoinAsk,
    },
    Read {
        key: Box<str>,
        keep: Keep,
        since: Option<Since>,
        limit: usize,
        core: usize,
        read: ReadHistory,
    },
}

struct JoinAsk {
    keep: Keep,
    since: Option<Since>,
    core: usize,
    placed: Placed,
}

/// What the cores and `/health` see of the link.
struct Link {
    up: AtomicBool,
    reason: Mutex<String>,
    metrics: BrokerMetrics,
    /// Publishes handed over and not yet taken by the broker thread.
    queued: AtomicUsize,
    /// Publishers' tasks waiting for room.
    waiting: Mutex<Vec<std::task::Waker>>,
}

impl Link {
    /// The broker thread took `n` publishes off the queue: wakes the
    /// publishers waiting for room once it is half empty.
    fn taken(&self, n: usize) {
        let left = self.queued.fetch_sub(n, Ordering::AcqRel).saturating_sub(n);
        if left < QUEUE_LIMIT / 2 {
            let waiting =
                std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
            for w in waiting {
                w.wake();
            }
        }
    }
}

impl Link {
    fn set_down(&self, reason: String) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!("cluster broker unreachable: {reason}");
        }
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason;
        self.metrics.up.set(0);
    }

    fn set_up(&self) {
        self.up.store(true, Ordering::Release);
        self.metrics.up.set(1);
    }
}

/// The engine's [`Broker`] over Redis.
pub struct Cluster {
    origin: u64,
    publishes: mpsc::UnboundedSender<Publish>,
    control: mpsc::UnboundedSender<Control>,
    events: mpsc::UnboundedSender<Event>,
    link: Arc<Link>,
    hub: Arc<Hub>,
    node: Box<str>,
    members: Arc<OnceLock<Arc<dyn ClusterMembers>>>,
}

impl Cluster {
    /// Starts the link's thread for the node whose engine is `hub`; it
    /// connects (and reconnects) by itself. Then call
    /// [`Hub::join_cluster`] with it.
    pub fn start(
        url: &BrokerUrl,
        node_id: &str,
        hub: Arc<Hub>,
        metrics: BrokerMetrics,
        idempotency_window_ms: u64,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let BrokerUrl::Redis(address) = url;
        let bad = |source| ClusterError::Url {
            url: url.redacted(),
            source,
        };
        let client = redis::Client::open(address.as_str()).map_err(bad)?;
        // The subscriber speaks RESP3: replies and pushed messages share
        // one ordered stream.
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let subscriber = redis::Client::open(info.set_redis_settings(resp3)).map_err(bad)?;
        let (publishes, publish_rx) = mpsc::unbounded_channel();
        let (control, control_rx) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let origin = origin_tag();
        // Unique per process: a restarted node is another member.
        let me: Box<str> = format!("{node_id}:{origin:016x}").into();
        let members: Arc<OnceLock<Arc<dyn ClusterMembers>>> = Arc::default();
        let link = Arc::new(Link {
            up: AtomicBool::new(false),
            reason: Mutex::new(format!("connecting to {}", url.redacted())),
            metrics,
            queued: AtomicUsize::new(0),
            waiting: Mutex::new(Vec::new()),
        });
        let node = Node {
            hub: hub.clone(),
            src: hub.outside_source(),
            origin,
            me: me.clone(),
            members: members.clone(),
            snapshot_pending: false,
            control_held: Vec::new(),
            events_rx,
            node_id: node_id.to_string(),
            address: url.redacted(),
            link: link.clone(),
            publisher: client,
            subscriber,
            window_ms: idempotency_window_ms.max(1),
            subs: HashMap::new(),
            held: HashMap::new(),
            next_gen: 0,
            publish_rx,
            control_rx,
        };
        std::thread::Builder::new()
            .name("herald-broker".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(node.run()),
                    Err(e) => tracing::error!("cluster broker thread: {e}"),
                }
            })
            .map_err(ClusterError::Thread)?;
        Ok(Arc::new(Cluster {
            origin,
            publishes,
            control,
            events,
            link,
            hub,
            node: me,
            members,
        }))
    }

    /// Runs `task` on core `core` (from a core: the broker thread is gone).
    fn run_on(&self, core: usize, task: Box<dyn FnOnce(&Core) + Send>) {
        let src = self.hub.outside_source();
        self.hub.bus.send(src, core, Envelope::Run(task));
    }
}

impl Broker for Cluster {
    fn publish(
        &self,
        src: usize,
        msg: Arc<Message>,
        idempotency_key: Option<Box<str>>,
        done: Option<Done>,
    ) {
        let p = Publish {
            src,
            msg,
            idempotency_key,
            done,
        };
        self.link.queued.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::error::SendError(p)) = self.publishes.send(p) {
            self.link.queued.fetch_sub(1, Ordering::AcqRel);
            self.link.metrics.publish_failed.inc();
            if let Some(done) = p.done {
                self.run_on(src, Box::new(move |c| done(c, &unavailable())));
            }
        }
    }

    fn interest(&self, key: &str, change: Change) {
        let _ = self.control.send(Control::Interest {
            key: key.into(),
            change,
        });
    }

    fn when_ready(&self, key: &str, core: usize, ready: Ready) {
        let asked = Control::WhenReady {
            key: key.into(),
            core,
            ready,
        };
        if let Err(mpsc::error::SendError(Control::WhenReady { ready, .. })) =
            self.control.send(asked)
        {
            self.run_on(core, Box::new(move |c| ready(c, false)));
        }
    }

    fn join(&self, key: &str, keep: Keep, since: Option<Since>, core: usize, placed: Placed) {
        let ask = JoinAsk {
            keep,
            since,
            core,
            placed,
        };
        let asked = Control::Join {
            key: key.into(),
            ask,
        };
        if let Err(mpsc::error::SendError(Control::Join { ask, .. })) = self.control.send(asked) {
            self.run_on(core, Box::new(move |c| (ask.placed)(c, None)));
        }
    }

    fn read_history(
        &self,
        key: &str,
        keep: Keep,
        since: Option<Since>,
        limit: usize,
        core: usize,
        read: ReadHistory,
    ) {
        let asked = Control::Read {
            key: key.into(),
            keep,
            since,
            limit,
            core,
            read,
        };
        if let Err(mpsc::error::SendError(Control::Read { read, .. })) = self.control.send(asked) {
            self.run_on(core, Box::new(move |c| read(c, HistoryRead::Unavailable)));
        }
    }

    fn node(&self) -> &str {
        &self.node
    }

    fn tag(&self) -> u32 {
        self.origin as u32
    }

    fn congested(&self) -> bool {
        self.link.queued.load(Ordering::Relaxed) >= QUEUE_LIMIT
    }

    fn poll_space(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if !self.congested() {
            return std::task::Poll::Ready(());
        }
        self.link
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cx.waker().clone());
        // Taken meanwhile: do not wait for a wake that already happened.
        match self.congested() {
            true => std::task::Poll::Pending,
            false => std::task::Poll::Ready(()),
        }
    }

    fn announce(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn attach_members(&self, members: Arc<dyn ClusterMembers>) {
        let _ = self.members.set(members);
    }

    fn unavailable(&self) -> Option<String> {
        if self.link.up.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.link
                .reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn unavailable() -> Outcome {
    Outcome {
        unavailable: true,
        ..Outcome::default()
    }
}

/// A random tag naming this process in the messages it publishes.
/// (1 to 2^31 - 1, so that it fits in a Pusher socket id).
fn origin_tag() -> u64 {
    let mut b = [0u8; 4];
    let r = match getrandom::fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b),
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.subsec_nanos() ^ std::process::id()
        }
    };
    u64::from(r % 0x7fff_fffe + 1)
}

/// The broker channel of routing key `key`.
pub fn broker_channel(key: &str) -> String {
    format!("{CHANNEL_PREFIX}{key}")
}

fn stream_key(key: &str) -> String {
    format!("{CHANNEL_PREFIX}h:{key}")
}

fn meta_key(key: &str) -> String {
    format!("{CHANNEL_PREFIX}m:{key}")
}

fn idem_key(key: &str, k: &str) -> String {
    format!("{CHANNEL_PREFIX}idem:{key} {k}")
}

/// How long a channel's epoch and top offset outlive its last message.
fn meta_ttl_ms(keep: Keep) -> u64 {
    META_TTL_MS.max(keep.ttl_ms.saturating_mul(2))
}

/// Splits `o<epoch> <offset>\n<message>` (a message with history, as
/// the publish script sends it): epoch, offset and the message, or `None`
/// for anything else.
pub fn placed_message(payload: &[u8]) -> Option<(&str, u64, &[u8])> {
    let rest = payload.strip_prefix(b"o")?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let head = std::str::from_utf8(&rest[..nl]).ok()?;
    let (epoch, offset) = head.split_once(' ')?;
    let offset = offset.parse().ok().filter(|&o| o > 0)?;
    (!epoch.is_empty() && epoch.len() <= 64).then_some((epoch, offset, &rest[nl + 1..]))
}

/// Parses `"epoch offset"` (a script's answer).
fn place(s: &str) -> Option<(Arc<str>, u64)> {
    let (epoch, offset) = s.split_once(' ')?;
    Some((epoch.into(), offset.parse().ok()?))
}

/// A channel's broker subscription.
struct Sub {
    /// The broker confirmed it (on the current connection).
    active: bool,
    /// Which request made it: an answer to an older one (the channel was
    /// dropped and wanted again meanwhile) does not count.
    gen: u64,
    /// What waits for it.
    waiters: Vec<Waiter>,
    /// With history: the place of the newest message this node passed on
    /// (or a subscriber joined at), from which to catch up after the link
    /// was down.
    last: Option<(Box<str>, u64)>,
}

enum Waiter {
    Ready(usize, Ready),
    Join(JoinAsk),
}

/// Messages of a channel held while reads of its place are out (or, for
/// a channel with history, from the link's loss until its catch-up read
/// is out), with their epochs: the node's place in the channel moves only
/// when they are passed on.
#[derive(Default)]
struct Held {
    reads: usize,
    queue: VecDeque<(Option<Box<str>>, Arc<Message>)>,
}

type Pending = (usize, Option<Done>, bool);
type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// Channels (with the request generation) in one SUBSCRIBE.
type Keys = Vec<(Box<str>, u64)>;
/// A batch's publishers and the broker's answers.
type Batch = Boxed<Result<Vec<Value>, String>>;
/// A read of a subscription's place, and its answer.
type Answer = Boxed<Result<Value, String>>;

/// Why a channel's place is read on the subscriber connection.
enum Purpose {
    /// A subscription's place (and what it replays).
    Join(JoinAsk),
    /// What the node missed after this place while the link was down.
    CatchUp(Box<str>, u64, Keep),
    /// Every node's presence, where the control channel's events start.
    Snapshot,
}

struct ReadAsk {
    since: Option<Since>,
    core: usize,
    read: ReadHistory,
    namespace: u16,
}

/// The link's thread: its state and its two queues.
struct Node {
    hub: Arc<Hub>,
    src: usize,
    origin: u64,
    /// This node's name among the cluster's members.
    me: Box<str>,
    members: Arc<OnceLock<Arc<dyn ClusterMembers>>>,
    /// The other nodes' presence is being read: control events wait.
    snapshot_pending: bool,
    control_held: Vec<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    node_id: String,
    address: String,
    link: Arc<Link>,
    publisher: redis::Client,
    subscriber: redis::Client,
    window_ms: u64,
    subs: HashMap<Box<str>, Sub>,
    held: HashMap<Box<str>, Held>,
    next_gen: u64,
    publish_rx: mpsc::UnboundedReceiver<Publish>,
    control_rx: mpsc::UnboundedReceiver<Control>,
}

/// One connection's worth of broker.
struct Session {
    publisher: MultiplexedConnection,
    subscriber: MultiplexedConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
}

/// What the serving loop has out at the broker.
#[derive(Default)]
struct Out {
    /// SUBSCRIBEs and UNSUBSCRIBEs to send, in order (a channel dropped
    /// and wanted again must end subscribed); one out at a time.
    ops: VecDeque<SubOp>,
    op: Option<Boxed<(SubOp, bool)>>,
    /// Reads of channels' places, and what each is for (same order).
    placing: FuturesOrdered<Answer>,
    places: VecDeque<(Box<str>, Purpose)>,
    /// History reads, and who asked (same order).
    reading: FuturesOrdered<Answer>,
    reads: VecDeque<ReadAsk>,
    /// Presence events out.
    eventing: Option<Boxed<Result<(), String>>>,
    /// The batch of publishes out, and its publishers.
    publishing: Option<Batch>,
    in_flight: Vec<Pending>,
}

impl Node {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let reason = match self.connect().await {
                Ok(session) => {
                    backoff = BACKOFF_MIN;
                    self.link.metrics.connects.inc();
                    tracing::info!(node = %self.node_id, "cluster broker {} connected", self.address);
                    self.serve(session).await
                }
                Err(e) => e,
            };
            self.went_down(reason);
            // Wait, answering what comes meanwhile.
            let until = tokio::time::Instant::now() + jitter(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    Some(p) = self.publish_rx.recv() => {
                        self.link.taken(1);
                        self.refuse(p.src, p.done)
                    }
                    // Announced again in full on the next connection.
                    Some(_) = self.events_rx.recv() => {}
                    Some(c) = self.control_rx.recv() => {
                        let mut out = Out::default();
                        self.control(c, None, &mut Vec::new(), &mut Vec::new(), &mut out);
                    }
                    else => return,
                }
            }
        }
    }

    async fn connect(&self) -> Result<Session, String> {
        let (tx, pushes) = mpsc::unbounded_channel();
        // Our own timeouts decide when the link is down (the crate's
        // default gives a command 500 ms).
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let subscriber_config = config.clone().set_push_sender(tx);
        let attempt = async {
            let publisher = self
                .publisher
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let subscriber = self
                .subscriber
                .get_multiplexed_async_connection_with_config(&subscriber_config)
                .await?;
            Ok::<_, redis::RedisError>((publisher, subscriber))
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, attempt).await {
            Ok(Ok((publisher, subscriber))) => Ok(Session {
                publisher,
                subscriber,
                pushes,
            }),
            Ok(Err(e)) => Err(format!("cannot connect to {}: {e}", self.address)),
            Err(_) => Err(format!(
                "no answer from {} within {COMMAND_TIMEOUT:?}",
                self.address
            )),
        }
    }

    /// The link is down: waiting subscriptions and reads fail, held
    /// messages go on, every channel is to be subscribed again on the
    /// next connection.
    fn went_down(&mut self, reason: String) {
        self.link.set_down(reason);
        self.link.metrics.subscriptions.set(0);
        for sub in self.subs.values_mut() {
            sub.active = false;
            for w in sub.waiters.drain(..) {
                fail_waiter(&self.hub, self.src, w);
            }
        }
        // Held messages with offsets are not passed on: the node's place
        // did not move for them, so the catch-up reads them again, in order
        // with what comes after them.
        let held: Vec<(Box<str>, Held)> = self.held.drain().collect();
        for (_, held) in held {
            for (epoch, msg) in held.queue {
                if epoch.is_none() {
                    self.hub.arrive(self.src, msg);
                }
            }
        }
        // Channels with history catch up once subscribed again; until their
        // catch-up read is out, what comes is held (the subscription's
        // confirmation and the first messages after it can be handled in
        // either order).
        let resuming: Vec<Box<str>> = self
            .subs
            .iter()
            .filter(|(_, s)| s.last.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in resuming {
            self.held.entry(key).or_default().reads += 1;
        }
    }

    /// Passes a message of `key` on to the cores with subscribers, and
    /// moves the node's place in the channel.
    fn pass(&mut self, key: &str, epoch: Option<&str>, msg: Arc<Message>) {
        if let Some(epoch) = epoch {
            self.passed(key, epoch, msg.offset());
        }
        self.hub.arrive(self.src, msg);
    }

    /// Answers a publish the broker did not take.
    fn refuse(&self, src: usize, done: Option<Done>) {
        self.link.metrics.publish_failed.inc();
        if let Some(done) = done {
            self.run_on(src, Box::new(move |c| done(c, &unavailable())));
        }
    }

    fn run_on(&self, core: usize, task: Box<dyn FnOnce(&Core) + Send>) {
        self.hub.bus.send(self.src, core, Envelope::Run(task));
    }

    /// Serves one connection until it fails; returns why. Whatever was
    /// out at the broker then is answered as failed.
    async fn serve(&mut self, s: Session) -> String {
        let mut out = Out::default();
        let why = self.serve_with(s, &mut out).await;
        for (src, done, _) in std::mem::take(&mut out.in_flight) {
            self.refuse(src, done);
        }
        for (_, why) in out.places.drain(..) {
            if let Purpose::Join(ask) = why {
                fail_waiter(&self.hub, self.src, Waiter::Join(ask));
            }
        }
        for ask in out.reads.drain(..) {
            let read = ask.read;
            self.run_on(
                ask.core,
                Box::new(move |c| read(c, HistoryRead::Unavailable)),
            );
        }
        why
    }

    async fn serve_with(&mut self, s: Session, out: &mut Out) -> String {
        let Session {
            publisher,
            subscriber,
            mut pushes,
        } = s;
        self.snapshot_pending = true;
        self.control_held.clear();
        let scripts = match load_scripts(&publisher).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        // The control channel first, then everything wanted so far, again.
        out.ops.push_back(SubOp::Control);
        let again: Keys = self.subs.iter().map(|(k, s)| (k.clone(), s.gen)).collect();
        for chunk in again.chunks(SUBSCRIBE_CHUNK) {
            out.ops.push_back(SubOp::Subscribe(chunk.to_vec()));
        }
        self.link.set_up();
        let mut started = Instant::now();
        let mut pinging: Option<Boxed<Result<(), String>>> = None;
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if out.op.is_none() {
                if let Some(op) = out.ops.pop_front() {
                    out.op = Some(sub_op(&subscriber, op));
                }
            }
            tokio::select! {
                p = pushes.recv() => match p {
                    Some(p) => {
                        if let Err(why) = self.pushed(p) {
                            return why;
                        }
                    }
                    None => return "the subscriber connection closed".into(),
                },
                Some(c) = self.control_rx.recv() => {
                    let (mut add, mut drop) = (Vec::new(), Vec::new());
                    self.control(c, Some(&subscriber), &mut add, &mut drop, out);
                    while let Ok(c) = self.control_rx.try_recv() {
                        self.control(c, Some(&subscriber), &mut add, &mut drop, out);
                    }
                    for chunk in drop.chunks(SUBSCRIBE_CHUNK) {
                        out.ops.push_back(SubOp::Unsubscribe(chunk.to_vec()));
                    }
                    for chunk in add.chunks(SUBSCRIBE_CHUNK) {
                        out.ops.push_back(SubOp::Subscribe(chunk.to_vec()));
                    }
                }
                Some(p) = self.publish_rx.recv(), if out.publishing.is_none() => {
                    let mut batch = vec![p];
                    while batch.len() < MAX_BATCH {
                        match self.publish_rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    self.link.taken(batch.len());
                    started = Instant::now();
                    let (batch, pending) = self.publish(&publisher, &scripts, batch);
                    out.publishing = Some(batch);
                    out.in_flight = pending;
                }
                Some(e) = self.events_rx.recv(), if out.eventing.is_none() && !self.snapshot_pending => {
                    let mut batch = vec![e];
                    while let Ok(e) = self.events_rx.try_recv() {
                        batch.push(e);
                    }
                    out.eventing = Some(announce(&publisher, &scripts, batch));
                }
                Some(result) = async { out.eventing.as_mut()?.await.into() }, if out.eventing.is_some() => {
                    out.eventing = None;
                    if let Err(why) = result {
                        return why;
                    }
                }
                Some(result) = async { out.publishing.as_mut()?.await.into() }, if out.publishing.is_some() => {
                    out.publishing = None;
                    self.link.metrics.publish_seconds.observe(started.elapsed().as_secs_f64());
                    let pending = std::mem::take(&mut out.in_flight);
                    if let Err(why) = self.published(pending, result) {
                        return why;
                    }
                }
                Some((op, ok)) = async { out.op.as_mut()?.await.into() }, if out.op.is_some() => {
                    out.op = None;
                    match (op, ok) {
                        (SubOp::Subscribe(_), false) => return "a SUBSCRIBE got no confirmation".into(),
                        (SubOp::Unsubscribe(_), false) => return "an UNSUBSCRIBE got no confirmation".into(),
                        (SubOp::Control, false) => return "the control channel's SUBSCRIBE got no confirmation".into(),
                        (SubOp::Subscribe(keys), true) => self.confirmed(keys, &subscriber, out),
                        (SubOp::Unsubscribe(_), true) => {}
                        // Where the control events start: read every
                        // node's presence there.
                        (SubOp::Control, true) => {
                            let mut conn = subscriber.clone();
                            let mut cmd = redis::cmd("EVAL");
                            cmd.arg(SNAPSHOT).arg(1).arg(NODES);
                            out.placing.push_back(Box::pin(async move { query(&mut conn, cmd).await }));
                            out.places.push_back(("".into(), Purpose::Snapshot));
                        }
                    }
                }
                Some(answer) = out.placing.next(), if !out.placing.is_empty() => {
                    let Some((key, why)) = out.places.pop_front() else {
                        continue;
                    };
                    // Every message pushed before the answer is queued by
                    // now: take them first.
                    while let Ok(p) = pushes.try_recv() {
                        if let Err(why) = self.pushed(p) {
                            return why;
                        }
                    }
                    if let Err(e) = self.placed(key, why, answer) {
                        return e;
                    }
                }
                Some(answer) = out.reading.next(), if !out.reading.is_empty() => {
                    let Some(ask) = out.reads.pop_front() else {
                        continue;
                    };
                    let read = match answer.map(|v| self.page(&v, ask.since.as_ref(), ask.namespace)) {
                        Ok(Some(page)) => HistoryRead::Page(page),
                        Ok(None) | Err(_) => HistoryRead::Unavailable,
                    };
                    let r = ask.read;
                    self.run_on(ask.core, Box::new(move |c| r(c, read)));
                }
                _ = ping.tick(), if pinging.is_none() => {
                    pinging = Some(ping_both(&publisher, &subscriber, &scripts, &self.me));
                }
                Some(result) = async { pinging.as_mut()?.await.into() }, if pinging.is_some() => {
                    pinging = None;
                    if let Err(why) = result {
                        return why;
                    }
                }
            }
        }
    }

    /// Something the broker pushed on the subscriber connection.
    fn pushed(&mut self, p: PushInfo) -> Result<(), String> {
        match p.kind {
            PushKind::Message => {
                match (p.data.first(), p.data.get(1)) {
                    (Some(Value::BulkString(ch)), Some(Value::BulkString(payload)))
                        if ch == CONTROL.as_bytes() =>
                    {
                        self.control_event(payload)
                    }
                    (_, Some(Value::BulkString(payload))) => self.arrived(payload),
                    _ => {}
                }
                Ok(())
            }
            PushKind::Disconnection => Err("the subscriber connection closed".into()),
            _ => Ok(()),
        }
    }

    /// A message from the broker: to the cores with subscribers (or held
    /// while a read of its channel's place is out).
    fn arrived(&mut self, payload: &[u8]) {
        self.link.metrics.received.inc();
        let (place, wire) = match placed_message(payload) {
            Some((epoch, offset, wire)) => (Some((epoch, offset)), wire),
            None => (None, payload),
        };
        let mut msg = match Message::decode_wire(Bytes::copy_from_slice(wire), self.origin) {
            Ok(m) => m,
            Err(e) => {
                self.link.metrics.malformed.inc();
                tracing::debug!("dropped a message from the broker: {e}");
                return;
            }
        };
        if let Some((_, offset)) = place {
            let (_, carried_by) = self.hub.history_encoding(msg.namespace());
            msg.set_offset(offset, carried_by);
        }
        let msg = Arc::new(msg);
        let epoch = place.map(|(e, _)| e);
        if !self.held.is_empty() {
            if let Some(held) = msg.with_key(|k| self.held.get_mut(k)) {
                held.queue.push_back((epoch.map(Into::into), msg));
                return;
            }
        }
        match epoch {
            Some(epoch) => {
                let mut buf = [0u8; crate::engine::message::MAX_KEY];
                let key = msg.key_in(&mut buf);
                self.pass(key, Some(epoch), msg);
            }
            None => {
                self.hub.arrive(self.src, msg);
            }
        }
    }

    /// Applies one control command. With a connection (`conn`), channels
    /// to (un)subscribe are added to `add` and `drop`, reads are started
    /// in `out`; without, the link is down and everything is refused.
    fn control(
        &mut self,
        c: Control,
        conn: Option<&MultiplexedConnection>,
        add: &mut Keys,
        drop: &mut Vec<Box<str>>,
        out: &mut Out,
    ) {
        match c {
            Control::Interest {
                key,
                change: Change::First,
            } => self.want(key, add),
            Control::Interest {
                key,
                change: Change::Last,
            } => {
                if let Some(sub) = self.subs.remove(&key) {
                    for w in sub.waiters {
                        fail_waiter(&self.hub, self.src, w);
                    }
                    // No subscriber left here: nothing to hold for.
                    if let Some(held) = self.held.remove(&key) {
                        for (_, msg) in held.queue {
                            self.hub.arrive(self.src, msg);
                        }
                    }
                    if let Some(i) = add.iter().position(|(k, _)| *k == key) {
                        add.swap_remove(i);
                    } else if conn.is_some() {
                        if sub.active {
                            self.link.metrics.subscriptions.dec();
                        }
                        drop.push(key);
                    }
                }
            }
            Control::Interest { .. } => {}
            Control::WhenReady { key, core, ready } => {
                let Some(conn) = conn else {
                    return self.run_on(core, Box::new(move |c| ready(c, false)));
                };
                let _ = conn;
                self.want(key.clone(), add);
                if let Some(sub) = self.subs.get_mut(&key) {
                    match sub.active {
                        true => send_ready(&self.hub, self.src, core, ready, true),
                        false => sub.waiters.push(Waiter::Ready(core, ready)),
                    }
                }
            }
            Control::Join { key, ask } => {
                let Some(conn) = conn else {
                    return fail_waiter(&self.hub, self.src, Waiter::Join(ask));
                };
                self.want(key.clone(), add);
                let active = self.subs.get(&key).is_some_and(|s| s.active);
                match active {
                    true => self.read_place(key, Purpose::Join(ask), conn, out),
                    false => {
                        if let Some(sub) = self.subs.get_mut(&key) {
                            sub.waiters.push(Waiter::Join(ask));
                        }
                    }
                }
            }
            Control::Read {
                key,
                keep,
                since,
                limit,
                core,
                read,
            } => {
                let Some(conn) = conn else {
                    return self.run_on(core, Box::new(move |c| read(c, HistoryRead::Unavailable)));
                };
                let mode = match &since {
                    None => Mode::Newest(limit),
                    Some(s) => Mode::After(s, limit),
                };
                let eval = read_command(&key, keep, mode);
                let namespace = namespace_of(&key);
                let ask = ReadAsk {
                    since,
                    core,
                    read,
                    namespace,
                };
                let mut conn = conn.clone();
                out.reading
                    .push_back(Box::pin(async move { query(&mut conn, eval).await }));
                out.reads.push_back(ask);
            }
        }
    }

    fn want(&mut self, key: Box<str>, add: &mut Keys) {
        if self.subs.contains_key(&key) {
            return;
        }
        self.next_gen += 1;
        let gen = self.next_gen;
        self.subs.insert(
            key.clone(),
            Sub {
                active: false,
                gen,
                waiters: Vec::new(),
                last: None,
            },
        );
        add.push((key, gen));
    }

    /// The broker confirmed these subscriptions.
    fn confirmed(&mut self, keys: Keys, conn: &MultiplexedConnection, out: &mut Out) {
        for (key, gen) in keys {
            let Some(sub) = self.subs.get_mut(&key) else {
                continue;
            };
            if sub.gen != gen || sub.active {
                continue;
            }
            sub.active = true;
            self.link.metrics.subscriptions.inc();
            if let Some((epoch, offset)) = sub.last.clone() {
                // Subscribed again after the link was down.
                if let Some(keep) = namespace_keep(&self.hub, &key) {
                    self.read_place(
                        key.clone(),
                        Purpose::CatchUp(epoch, offset, keep),
                        conn,
                        out,
                    );
                }
                // The read holds the channel now, not the link's loss.
                self.unhold(&key);
            }
            let Some(sub) = self.subs.get_mut(&key) else {
                continue;
            };
            for w in std::mem::take(&mut sub.waiters) {
                match w {
                    Waiter::Ready(core, ready) => {
                        send_ready(&self.hub, self.src, core, ready, true)
                    }
                    Waiter::Join(ask) => {
                        self.read_place(key.clone(), Purpose::Join(ask), conn, out)
                    }
                }
            }
        }
    }

    /// Reads a channel's place on the subscriber connection, holding the
    /// channel's messages until the answer.
    fn read_place(
        &mut self,
        key: Box<str>,
        why: Purpose,
        conn: &MultiplexedConnection,
        out: &mut Out,
    ) {
        let after = self.hub.history.recover_max + 1;
        let eval = match &why {
            Purpose::Join(ask) => match &ask.since {
                None => read_command(&key, ask.keep, Mode::Newest(1)),
                Some(s) => read_command(&key, ask.keep, Mode::After(s, after)),
            },
            Purpose::CatchUp(epoch, offset, keep) => {
                let since = Since {
                    epoch: epoch.clone(),
                    offset: *offset,
                };
                read_command(&key, *keep, Mode::After(&since, after))
            }
            // Read by the serving loop itself.
            Purpose::Snapshot => return,
        };
        self.held.entry(key.clone()).or_default().reads += 1;
        let mut conn = conn.clone();
        out.placing
            .push_back(Box::pin(async move { query(&mut conn, eval).await }));
        out.places.push_back((key, why));
    }

    /// The answer to a read of a channel's place. For a subscription: the
    /// messages held meanwhile that it covers go first (the subscriber is
    /// not there yet), then the subscription, then the newer ones. For a
    /// catch-up: what the node missed, then the newer held ones; when what
    /// was missed is gone, the channel's subscribers here are closed, to
    /// come back and recover (or learn they cannot).
    fn placed(
        &mut self,
        key: Box<str>,
        why: Purpose,
        answer: Result<Value, String>,
    ) -> Result<(), String> {
        if let Purpose::Snapshot = why {
            return self.snapshot(answer);
        }
        let namespace = namespace_of(&key);
        let result = match why {
            Purpose::Join(ask) => {
                let join = answer.and_then(|v| {
                    self.join_of(&v, ask.since.as_ref(), namespace)
                        .ok_or_else(|| "an unreadable history answer".to_string())
                });
                let top = join.as_ref().map_or(u64::MAX, |j| j.top);
                if let Ok(j) = &join {
                    self.passed(&key, &j.epoch, j.top);
                }
                self.release_upto(&key, top, true);
                let placed = ask.placed;
                let result = join.as_ref().map(|_| ()).map_err(Clone::clone);
                let join = join.ok();
                self.run_on(ask.core, Box::new(move |c| placed(c, join)));
                result
            }
            Purpose::Snapshot => Ok(()),
            Purpose::CatchUp(epoch, offset, _) => match answer {
                Err(why) => Err(why),
                Ok(v) => {
                    let missed = parse_read(&v).and_then(|(e, top, entries)| {
                        let complete = *e == *epoch
                            && top >= offset
                            && entries.len() as u64 == top - offset
                            && entries
                                .iter()
                                .enumerate()
                                .all(|(i, (o, _))| *o == offset + 1 + i as u64);
                        complete.then_some((e, top, entries))
                    });
                    match missed {
                        Some((e, top, entries)) => {
                            for (o, wire) in entries {
                                if let Ok(mut m) = Message::decode_wire(wire, self.origin) {
                                    let (_, carried_by) = self.hub.history_encoding(namespace);
                                    m.set_offset(o, carried_by);
                                    self.hub.arrive(self.src, Arc::new(m));
                                }
                            }
                            self.passed(&key, &e, top);
                            // Held ones it covered were just passed on.
                            self.release_upto(&key, top, false);
                            Ok(())
                        }
                        None => {
                            self.link.metrics.gaps.inc();
                            tracing::warn!(
                                "channel {key}: messages published while the broker was unreachable are no longer kept; closing its subscribers here so they recover"
                            );
                            let src = self.src;
                            for core in 0..self.hub.outside_source() {
                                let k = key.clone();
                                let task = Box::new(move |c: &Core| {
                                    c.shard
                                        .borrow_mut()
                                        .close_subscribers(&k, "missed messages; reconnect");
                                });
                                self.hub.bus.send(src, core, Envelope::Run(task));
                            }
                            Ok(())
                        }
                    }
                }
            },
        };
        self.unhold(&key);
        result
    }

    /// A presence event from the control channel: applied in the
    /// cluster's order (held while the snapshot is read), and acted on
    /// when this node decided it.
    fn control_event(&mut self, payload: &[u8]) {
        let Ok(e) = serde_json::from_slice::<Event>(payload) else {
            self.link.metrics.malformed.inc();
            return;
        };
        if self.snapshot_pending {
            self.control_held.push(e);
            return;
        }
        self.apply_event(&e);
    }

    fn apply_event(&mut self, e: &Event) {
        let Some(members) = self.members.get().cloned() else {
            return;
        };
        for t in members.apply(e) {
            let core = match &t {
                Transition::MemberAdded {
                    except: Some((w, _, _)),
                    ..
                } => usize::from(*w).min(self.hub.outside_source() - 1),
                _ => 0,
            };
            let m = members.clone();
            self.run_on(core, Box::new(move |c| m.act(c, t)));
        }
        // Declared gone (cut off too long): say again what is here.
        if let Event::Gone { node, .. } = e {
            if *node == self.me {
                members.announce_state();
            }
        }
    }

    /// Every node's presence, read where the control events start: the
    /// roster restarts from it, the events held meanwhile follow (they are
    /// idempotent), then this node announces what it holds.
    fn snapshot(&mut self, answer: Result<Value, String>) -> Result<(), String> {
        let v = answer?;
        self.snapshot_pending = false;
        let held = std::mem::take(&mut self.control_held);
        let Some(members) = self.members.get().cloned() else {
            return Ok(());
        };
        members.clear();
        for e in parse_snapshot(&v) {
            // What already was: nothing to act on.
            let _ = members.apply(&e);
        }
        for e in &held {
            self.apply_event(e);
        }
        members.announce_state();
        Ok(())
    }

    /// Takes the held messages of `key` up to offset `top` off the queue,
    /// passing them on (or dropping them, when they were passed on
    /// another way).
    fn release_upto(&mut self, key: &str, top: u64, pass: bool) {
        let Some(held) = self.held.get_mut(key) else {
            return;
        };
        let mut out = Vec::new();
        while held.queue.front().is_some_and(|(_, m)| m.offset() <= top) {
            if let Some(m) = held.queue.pop_front() {
                out.push(m);
            }
        }
        if pass {
            for (epoch, m) in out {
                self.pass(key, epoch.as_deref(), m);
            }
        }
    }

    /// Ends one hold of `key`; the last one passes on what was held.
    fn unhold(&mut self, key: &str) {
        let Some(held) = self.held.get_mut(key) else {
            return;
        };
        held.reads = held.reads.saturating_sub(1);
        if held.reads > 0 {
            return;
        }
        if let Some(held) = self.held.remove(key) {
            for (epoch, m) in held.queue {
                self.pass(key, epoch.as_deref(), m);
            }
        }
    }

    /// Records that the node passed on `key`'s messages up to `offset` of
    /// `epoch` (keeping the newest).
    fn passed(&mut self, key: &str, epoch: &str, offset: u64) {
        let Some(sub) = self.subs.get_mut(key) else {
            return;
        };
        match &mut sub.last {
            Some((e, o)) if **e == *epoch => *o = (*o).max(offset),
            last => *last = Some((epoch.into(), offset)),
        }
    }

    /// A read's answer as a subscription's place.
    fn join_of(&self, v: &Value, since: Option<&Since>, namespace: u16) -> Option<Join> {
        let (epoch, top, entries) = parse_read(v)?;
        let frames = |entries: &[(u64, Bytes)]| -> Option<Vec<Bytes>> {
            entries
                .iter()
                .map(|(o, wire)| self.frame(*o, wire, namespace))
                .collect()
        };
        let recover_max = self.hub.history.recover_max;
        let (recovered, replay) = match since {
            Some(s) if *s.epoch == *epoch && s.offset <= top => {
                let want = (top - s.offset) as usize;
                let complete = want <= recover_max
                    && entries.len() == want
                    && entries
                        .iter()
                        .enumerate()
                        .all(|(i, (o, _))| *o == s.offset + 1 + i as u64);
                match complete {
                    true => (true, frames(&entries)?),
                    false => (false, Vec::new()),
                }
            }
            _ => (false, Vec::new()),
        };
        let newest = match (since, entries.last()) {
            (None, Some((o, wire))) if *o == top => Some(self.frame(*o, wire, namespace)?),
            _ => None,
        };
        Some(Join {
            epoch,
            top,
            recovered,
            replay,
            newest,
        })
    }

    /// A read's answer as a page.
    fn page(&self, v: &Value, since: Option<&Since>, namespace: u16) -> Option<Page> {
        let (epoch, top, entries) = parse_read(v)?;
        let _ = since;
        let messages = entries
            .iter()
            .map(|(o, wire)| Some((*o, self.frame(*o, wire, namespace)?)))
            .collect::<Option<Vec<_>>>()?;
        Some(Page {
            epoch,
            top,
            messages,
        })
    }

    /// The frame subscribers (of the encoding history keeps) get for a
    /// kept message.
    fn frame(&self, offset: u64, wire: &Bytes, namespace: u16) -> Option<Bytes> {
        let mut m = Message::decode_wire(wire.clone(), 0).ok()?;
        let (encoding, carried_by) = self.hub.history_encoding(namespace);
        m.set_offset(offset, carried_by);
        m.frame_for(encoding, self.hub.encoders)
    }

    /// One pipeline with every publish of `batch`.
    fn publish(
        &self,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
        batch: Vec<Publish>,
    ) -> (Batch, Vec<Pending>) {
        let mut pipe = redis::pipe();
        let mut pending = Vec::with_capacity(batch.len());
        for p in batch {
            let Publish {
                src,
                msg,
                idempotency_key,
                done,
            } = p;
            let mut wire = Vec::new();
            msg.encode_wire(self.origin, &mut wire);
            let key = msg.with_key(str::to_string);
            let channel = broker_channel(&key);
            let keep = match msg.is_transient() {
                true => None,
                false => self.hub.keeps(msg.namespace(), msg.channel()),
            };
            match (keep, &idempotency_key) {
                (None, None) => {
                    pipe.cmd("PUBLISH").arg(channel).arg(wire);
                }
                (None, Some(k)) => {
                    pipe.cmd("EVALSHA")
                        .arg(&scripts.once)
                        .arg(1)
                        .arg(idem_key(&key, k))
                        .arg(channel)
                        .arg(wire)
                        .arg(self.window_ms);
                }
                (Some(keep), k) => {
                    let meta = meta_key(&key);
                    let (idem, window) = match k {
                        Some(k) => (idem_key(&key, k), self.window_ms),
                        None => (meta.clone(), 0),
                    };
                    pipe.cmd("EVALSHA")
                        .arg(&scripts.kept)
                        .arg(3)
                        .arg(stream_key(&key))
                        .arg(meta)
                        .arg(idem)
                        .arg(channel)
                        .arg(wire)
                        .arg(keep.size)
                        .arg(keep.ttl_ms.max(1))
                        .arg(&*new_epoch())
                        .arg(meta_ttl_ms(keep))
                        .arg(window);
                }
            }
            pending.push((src, done, keep.is_some()));
        }
        let mut conn = conn.clone();
        let batch = Box::pin(async move {
            let sent = tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async(&mut conn)).await;
            match sent {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(e)) => Err(format!("publishing: {e}")),
                Err(_) => Err(format!("no answer to a publish within {COMMAND_TIMEOUT:?}")),
            }
        });
        (batch, pending)
    }

    /// Answers the publishers of a batch; an error takes the link down.
    fn published(
        &self,
        pending: Vec<Pending>,
        result: Result<Vec<Value>, String>,
    ) -> Result<(), String> {
        let values = match result {
            Ok(v) => v,
            Err(why) => {
                for (src, done, _) in pending {
                    self.refuse(src, done);
                }
                return Err(why);
            }
        };
        for (i, (src, done, _kept)) in pending.into_iter().enumerate() {
            self.link.metrics.published.inc();
            let outcome = outcome_of(values.get(i));
            if let Some(done) = done {
                self.run_on(src, Box::new(move |c| done(c, &outcome)));
            }
        }
        Ok(())
    }
}

/// A publish's outcome from the broker's answer: a plain `PUBLISH`
/// (a count), or a script's `{1|0, "epoch offset"}`.
fn outcome_of(v: Option<&Value>) -> Outcome {
    let Some(Value::Array(items)) = v else {
        return Outcome::default();
    };
    let duplicate = matches!(items.first(), Some(Value::Int(0)));
    let position = match items.get(1) {
        Some(Value::BulkString(b)) => std::str::from_utf8(b).ok().and_then(place),
        _ => None,
    };
    Outcome {
        position,
        duplicate,
        unavailable: false,
    }
}

/// A history read: epoch, top offset, and (offset, message) entries.
type Entries = (Arc<str>, u64, Vec<(u64, Bytes)>);

/// `{epoch, top, offset, message, ...}` from the read script.
fn parse_read(v: &Value) -> Option<Entries> {
    let Value::Array(items) = v else {
        return None;
    };
    let epoch: Arc<str> = match items.first()? {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.into(),
        _ => return None,
    };
    let top = match items.get(1)? {
        Value::Int(n) if *n >= 0 => *n as u64,
        _ => return None,
    };
    let mut entries = Vec::with_capacity(items.len().saturating_sub(2) / 2);
    for pair in items[2..].chunks(2) {
        match pair {
            [Value::Int(o), Value::BulkString(d)] if *o > 0 => {
                entries.push((*o as u64, Bytes::copy_from_slice(d)))
            }
            _ => return None,
        }
    }
    Some((epoch, top, entries))
}

/// What the channel of routing key `key` keeps, if anything.
fn namespace_keep(hub: &Hub, key: &str) -> Option<Keep> {
    match key.split_once('#') {
        Some((n, channel)) => hub.keeps(n.parse().ok()?, channel),
        None => hub.keeps(0, key),
    }
}

/// The namespace of a routing key (`{n}#{channel}`, else 0).
fn namespace_of(key: &str) -> u16 {
    key.split_once('#')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

enum Mode<'a> {
    Newest(usize),
    After(&'a Since, usize),
}

fn read_command(key: &str, keep: Keep, mode: Mode<'_>) -> redis::Cmd {
    let (m, n, epoch, offset) = match mode {
        Mode::Newest(n) => ("n", n, "", 0),
        Mode::After(s, n) => ("a", n, &*s.epoch, s.offset),
    };
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(READ)
        .arg(2)
        .arg(stream_key(key))
        .arg(meta_key(key))
        .arg(m)
        .arg(n.max(1))
        .arg(epoch)
        .arg(offset)
        .arg(keep.ttl_ms.max(1))
        .arg(&*new_epoch())
        .arg(meta_ttl_ms(keep));
    cmd
}

async fn query(conn: &mut MultiplexedConnection, cmd: redis::Cmd) -> Result<Value, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<Value>(conn)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("reading history: {e}")),
        Err(_) => Err(format!(
            "no answer to a history read within {COMMAND_TIMEOUT:?}"
        )),
    }
}

/// The publish scripts' digests on the current connection.
#[derive(Clone)]
struct Scripts {
    once: String,
    kept: String,
    event: String,
    beat: String,
}

async fn load_scripts(conn: &MultiplexedConnection) -> Result<Scripts, String> {
    let mut conn = conn.clone();
    let load = async {
        let mut digests = Vec::with_capacity(4);
        for script in [PUBLISH_ONCE, PUBLISH_KEPT, EVENT, BEAT] {
            let digest: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script)
                .query_async(&mut conn)
                .await?;
            digests.push(digest);
        }
        let [once, kept, event, beat] = <[String; 4]>::try_from(digests)
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Client, "SCRIPT LOAD")))?;
        Ok::<_, redis::RedisError>(Scripts {
            once,
            kept,
            event,
            beat,
        })
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, load).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("loading scripts: {e}")),
        Err(_) => Err(format!(
            "no answer to SCRIPT LOAD within {COMMAND_TIMEOUT:?}"
        )),
    }
}

fn send_ready(hub: &Hub, src: usize, core: usize, ready: Ready, ok: bool) {
    let task = Box::new(move |c: &Core| ready(c, ok));
    hub.bus.send(src, core, Envelope::Run(task));
}

fn fail_waiter(hub: &Hub, src: usize, w: Waiter) {
    match w {
        Waiter::Ready(core, ready) => send_ready(hub, src, core, ready, false),
        Waiter::Join(ask) => {
            let placed = ask.placed;
            let task = Box::new(move |c: &Core| placed(c, None));
            hub.bus.send(src, ask.core, Envelope::Run(task));
        }
    }
}

/// A change of the node's broker subscriptions.
enum SubOp {
    Subscribe(Keys),
    Unsubscribe(Vec<Box<str>>),
    /// The control channel (presence events).
    Control,
}

fn sub_op(conn: &MultiplexedConnection, op: SubOp) -> Boxed<(SubOp, bool)> {
    let mut conn = conn.clone();
    Box::pin(async move {
        let done = match &op {
            SubOp::Subscribe(keys) => {
                let channels: Vec<String> = keys.iter().map(|(k, _)| broker_channel(k)).collect();
                tokio::time::timeout(COMMAND_TIMEOUT, conn.subscribe(&channels)).await
            }
            SubOp::Unsubscribe(keys) => {
                let channels: Vec<String> = keys.iter().map(|k| broker_channel(k)).collect();
                tokio::time::timeout(COMMAND_TIMEOUT, conn.unsubscribe(&channels)).await
            }
            SubOp::Control => tokio::time::timeout(COMMAND_TIMEOUT, conn.subscribe(CONTROL)).await,
        };
        (op, matches!(done, Ok(Ok(()))))
    })
}

/// Pings both connections: a broker that stopped answering (a partition
/// drops packets without closing anything) is found within
/// `PING_EVERY + COMMAND_TIMEOUT`.
/// The publisher's ping is the node's heartbeat, which also finds the
/// nodes that are gone.
fn ping_both(
    publisher: &MultiplexedConnection,
    subscriber: &MultiplexedConnection,
    scripts: &Scripts,
    me: &str,
) -> Boxed<Result<(), String>> {
    let (mut a, mut b) = (publisher.clone(), subscriber.clone());
    let mut beat = redis::cmd("EVALSHA");
    beat.arg(&scripts.beat)
        .arg(1)
        .arg(NODES)
        .arg(me)
        .arg(ALIVE_MS)
        .arg(CONTROL);
    Box::pin(async move {
        let both = async {
            beat.query_async::<()>(&mut a).await?;
            redis::cmd("PING").query_async::<()>(&mut b).await?;
            Ok::<_, redis::RedisError>(())
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, both).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("ping: {e}")),
            Err(_) => Err(format!("no answer to a ping within {COMMAND_TIMEOUT:?}")),
        }
    })
}

/// A batch of this node's presence events, each recorded in its hash and
/// published, in order.
fn announce(
    conn: &MultiplexedConnection,
    scripts: &Scripts,
    batch: Vec<Event>,
) -> Boxed<Result<(), String>> {
    let mut pipe = redis::pipe();
    for e in &batch {
        let Ok(json) = serde_json::to_string(e) else {
            continue;
        };
        let (node, mode, fields): (&str, &str, Vec<(String, Option<&str>)>) = match e {
            Event::Occupy { node, key } => (node, "set", vec![(field("o", key, None), Some("1"))]),
            Event::Vacate { node, key } => (node, "del", vec![(field("o", key, None), None)]),
            Event::Join {
                node,
                key,
                user,
                info,
                ..
            } => (
                node,
                "set",
                vec![(field("m", key, Some(user)), Some(&**info))],
            ),
            Event::Leave { node, key, user } => {
                (node, "del", vec![(field("m", key, Some(user)), None)])
            }
            Event::Reset {
                node,
                keys,
                members,
            } => {
                let mut f: Vec<(String, Option<&str>)> = keys
                    .iter()
                    .map(|k| (field("o", k, None), Some("1")))
                    .collect();
                f.extend(
                    members
                        .iter()
                        .map(|(k, u, i)| (field("m", k, Some(u)), Some(&**i))),
                );
                (node, "reset", f)
            }
            // A request: published, nothing recorded.
            Event::Terminate { node, .. } => (node, "set", Vec::new()),
            // Only the heartbeat script declares a node gone.
            Event::Gone { .. } => continue,
        };
        let cmd = pipe
            .cmd("EVALSHA")
            .arg(&scripts.event)
            .arg(1)
            .arg(format!("herald!pn:{node}"))
            .arg(CONTROL)
            .arg(json)
            .arg(mode);
        for (f, v) in fields {
            cmd.arg(f);
            if let Some(v) = v {
                cmd.arg(v);
            }
        }
        pipe.ignore();
    }
    let mut conn = conn.clone();
    Box::pin(async move {
        match tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("announcing presence: {e}")),
            Err(_) => Err(format!(
                "no answer to a presence event within {COMMAND_TIMEOUT:?}"
            )),
        }
    })
}

/// A field of a node's presence hash: `["o",key]` (a channel with a
/// subscriber there) or `["m",key,user]` (a member; the value is its info).
fn field(kind: &str, key: &str, user: Option<&str>) -> String {
    match user {
        None => serde_json::json!([kind, key]).to_string(),
        Some(u) => serde_json::json!([kind, key, u]).to_string(),
    }
}

/// The snapshot script's answer as one `Reset` per node.
fn parse_snapshot(v: &Value) -> Vec<Event> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let mut out = Vec::new();
    for pair in items.chunks(2) {
        let [node, fields] = pair else { continue };
        let Some(node) = text(node) else { continue };
        let pairs: Vec<(String, String)> = match fields {
            Value::Array(f) => f
                .chunks(2)
                .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
                .collect(),
            Value::Map(m) => m
                .iter()
                .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
                .collect(),
            _ => continue,
        };
        let (mut keys, mut members) = (Vec::new(), Vec::new());
        for (f, value) in pairs {
            let Ok(parts) = serde_json::from_str::<Vec<String>>(&f) else {
                continue;
            };
            match parts.as_slice() {
                [k, key] if k == "o" => keys.push(key.as_str().into()),
                [k, key, user] if k == "m" => {
                    members.push((key.as_str().into(), user.as_str().into(), value.into()))
                }
                _ => {}
            }
        }
        out.push(Event::Reset {
            node: node.into(),
            keys,
            members,
        });
    }
    out
}

/// `d` plus or minus a quarter, so that nodes do not reconnect in step.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = match getrandom::fill(&mut b) {
        Ok(()) => u16::from_le_bytes(b) as f64 / 65535.0,
        Err(_) => 0.5,
    };
    d.mul_f64(0.75 + r / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_jitter() {
        assert_eq!(broker_channel("news"), "herald:news");
        assert_eq!(broker_channel("3#room"), "herald:3#room");
        assert_eq!(stream_key("news"), "herald:h:news");
        assert_eq!(meta_key("3#room"), "herald:m:3#room");
        assert_eq!(namespace_of("3#room"), 3);
        assert_eq!(namespace_of("news"), 0);
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(1000));
            assert!(j >= Duration::from_millis(750) && j <= Duration::from_millis(1250));
        }
        assert_ne!(origin_tag(), origin_tag());
    }

    #[test]
    fn publishers_waiting_for_room_are_woken_once_the_queue_is_half_empty() {
        struct Flag(AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let link = Link {
            up: AtomicBool::new(true),
            reason: Mutex::new(String::new()),
            metrics: crate::integrations::metrics::Metrics::new(1).broker.clone(),
            queued: AtomicUsize::new(QUEUE_LIMIT),
            waiting: Mutex::new(Vec::new()),
        };
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        link.waiting
            .lock()
            .unwrap()
            .push(std::task::Waker::from(flag.clone()));
        link.taken(QUEUE_LIMIT / 4);
        assert!(!flag.0.load(Ordering::SeqCst), "still three quarters full");
        link.taken(QUEUE_LIMIT / 2);
        assert!(flag.0.load(Ordering::SeqCst));
        assert!(link.waiting.lock().unwrap().is_empty());
        assert_eq!(link.queued.load(Ordering::SeqCst), QUEUE_LIMIT / 4);
    }

    #[test]
    fn placed_messages_and_answers() {
        assert_eq!(
            placed_message(b"oab12 42\nh1rest"),
            Some(("ab12", 42, &b"h1rest"[..]))
        );
        for bad in [
            &b"h1..."[..],
            b"o 4\nx",
            b"oab 0\nx",
            b"oab x\nx",
            b"oab 4x",
            b"oab4\nx",
        ] {
            assert_eq!(
                placed_message(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let v = Value::Array(vec![Value::Int(1), Value::BulkString(b"e1 7".to_vec())]);
        let o = outcome_of(Some(&v));
        assert_eq!((o.position, o.duplicate), (Some(("e1".into(), 7)), false));
        let v = Value::Array(vec![Value::Int(0), Value::BulkString(b"".to_vec())]);
        let o = outcome_of(Some(&v));
        assert_eq!((o.position, o.duplicate), (None, true));
        assert_eq!(outcome_of(Some(&Value::Int(3))), Outcome::default());
        let read = Value::Array(vec![
            Value::BulkString(b"ep".to_vec()),
            Value::Int(9),
            Value::Int(8),
            Value::BulkString(b"m8".to_vec()),
            Value::Int(9),
            Value::BulkString(b"m9".to_vec()),
        ]);
        let (epoch, top, entries) = parse_read(&read).unwrap();
        assert_eq!((&*epoch, top, entries.len()), ("ep", 9, 2));
        assert_eq!(entries[1], (9, Bytes::from_static(b"m9")));
        assert!(parse_read(&Value::Array(vec![Value::Int(1)])).is_none());
    }
}
