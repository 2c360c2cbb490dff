//! The cluster link over Redis (or Valkey), `BROKER_URL=redis://…`.
//!
//! Two connections: a *subscriber* (RESP3, subscribed to the channels
//! this node has subscribers of, and reading history) and a *publisher*.
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
//! - **Interest.** Each burst of first/last subscriber changes is one
//!   `SUBSCRIBE` and one `UNSUBSCRIBE`.
//! - **Failures.** A connection that closes, a command or a ping that
//!   gets no answer within [`COMMAND_TIMEOUT`] marks the link down: the
//!   node reconnects with backoff and subscribes again to everything.
//! - **Idempotency.** A publish with an idempotency key sets the key in
//!   Redis (`SET NX PX`, in the same script), so a repeat is dropped
//!   cluster-wide within the window and answered with the first's place.
//! - **Presence.** Each node's share is a hash (`herald!pn:<node>`), each
//!   change recorded there and published on the control channel by one
//!   script; a heartbeat script finds the nodes that are gone.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::{
    batch, fail_waiter, meta_ttl_ms, namespace_of, Connect, Entries, HistoryAsk, Keys, Publish,
    Purpose, Queues, Relay, Waiter, ALIVE_MS, COMMAND_TIMEOUT, MAX_BATCH, PING_EVERY,
    SUBSCRIBE_CHUNK,
};
use crate::engine::core::Done;
use crate::engine::history::{new_epoch, HistoryRead, Keep, Outcome, Since};
use crate::engine::roster::Event;

/// Broker channel of a routing key: this prefix, then the key.
pub const CHANNEL_PREFIX: &str = "herald:";

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

/// A channel's epoch (`local epoch`), made from `ARGV[$new]` (and its
/// history emptied) when the channel has none. KEYS: stream, meta.
macro_rules! epoch_lua {
    ($new:literal) => {
        concat!(
            "
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[",
            $new,
            "]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 't', 0)
end"
        )
    };
}

/// Numbers, keeps and publishes a message of a channel with history.
/// KEYS: stream, meta, idempotency key (or the meta again, with window
/// 0). ARGV: broker channel, message, size, ttl (ms), a new epoch (used
/// when the channel has none), meta ttl (ms), idempotency window (ms).
/// Returns {1, "epoch offset"}, or {0, "epoch offset"} of the first for a
/// repeated idempotency key. The published message is
/// `o<epoch> <offset>\n` then the message.
const PUBLISH_KEPT: &str = concat!(
    r"
local window = tonumber(ARGV[7])
if window > 0 then
  local first = redis.call('GET', KEYS[3])
  if first then return {0, first} end
end
",
    epoch_lua!(5),
    r"
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
",
);

/// Reads a channel's history. KEYS: stream, meta. ARGV: mode (`n`: the
/// newest N; `a`: after offset S of epoch E, from the oldest kept when E
/// is another epoch), N, E, S, ttl (ms), a new epoch (for a channel
/// without one), meta ttl (ms). Returns {epoch, top, offset, message,
/// offset, message, ...}, oldest first, within the ttl.
const READ: &str = concat!(
    epoch_lua!(6),
    r"
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
",
);

/// The channel every node's presence events go through (not a routing
/// key's: `!` is in no protocol's channel names).
const CONTROL: &str = "herald!ctl";
/// The set of live nodes.
const NODES: &str = "herald!nodes";

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

type Pending = (usize, Option<Done>, bool);
type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A batch's publishers and the broker's answers.
type Batch = Boxed<Result<Vec<Value>, String>>;
/// A read of a subscription's place, and its answer.
type Answer = Boxed<Result<Value, String>>;

/// The link's thread over Redis.
pub(super) struct Node {
    relay: Relay,
    queues: Queues,
    publisher: redis::Client,
    subscriber: redis::Client,
}

/// One connection's worth of broker.
pub(super) struct Session {
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
    /// Reads of channels' places, and what each is for (same order;
    /// `None`: every node's presence).
    placing: FuturesOrdered<Answer>,
    places: VecDeque<(Box<str>, Option<Purpose>)>,
    /// History reads, and who asked (same order).
    reading: FuturesOrdered<Answer>,
    reads: VecDeque<HistoryAsk>,
    /// Presence events out.
    eventing: Option<Boxed<Result<(), String>>>,
    /// The batch of publishes out, and its publishers.
    publishing: Option<Batch>,
    in_flight: Vec<Pending>,
}

impl Connect for Node {
    type Session = Session;

    fn parts(&mut self) -> (&mut Relay, &mut Queues) {
        (&mut self.relay, &mut self.queues)
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
        let address = &self.relay.address;
        match tokio::time::timeout(COMMAND_TIMEOUT, attempt).await {
            Ok(Ok((publisher, subscriber))) => Ok(Session {
                publisher,
                subscriber,
                pushes,
            }),
            Ok(Err(e)) => Err(format!("cannot connect to {address}: {e}")),
            Err(_) => Err(format!(
                "no answer from {address} within {COMMAND_TIMEOUT:?}"
            )),
        }
    }

    /// Serves one connection until it fails; returns why. Whatever was
    /// out at the broker then is answered as failed.
    async fn serve(&mut self, s: Session) -> String {
        let mut out = Out::default();
        let why = self.serve_with(s, &mut out).await;
        for (src, done, _) in std::mem::take(&mut out.in_flight) {
            self.relay.refuse(src, done);
        }
        for (_, why) in out.places.drain(..) {
            if let Some(Purpose::Join(ask)) = why {
                fail_waiter(&self.relay.hub, self.relay.src, Waiter::Join(ask));
            }
        }
        for ask in out.reads.drain(..) {
            self.relay
                .answer_read(ask.core, ask.read, HistoryRead::Unavailable);
        }
        why
    }
}

impl Node {
    pub(super) fn new(address: &str, relay: Relay, queues: Queues) -> Result<Node, String> {
        let client = redis::Client::open(address).map_err(|e| e.to_string())?;
        // The subscriber speaks RESP3: replies and pushed messages share
        // one ordered stream.
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let subscriber =
            redis::Client::open(info.set_redis_settings(resp3)).map_err(|e| e.to_string())?;
        Ok(Node {
            relay,
            queues,
            publisher: client,
            subscriber,
        })
    }

    async fn serve_with(&mut self, s: Session, out: &mut Out) -> String {
        let Session {
            publisher,
            subscriber,
            mut pushes,
        } = s;
        self.relay.snapshot_pending = true;
        self.relay.control_held.clear();
        let scripts = match load_scripts(&publisher).await {
            Ok(s) => s,
            Err(e) => return e,
        };
        // The control channel first, then everything wanted so far, again.
        out.ops.push_back(SubOp::Control);
        let again: Keys = self
            .relay
            .subs
            .iter()
            .map(|(k, s)| (k.clone(), s.gen))
            .collect();
        for chunk in again.chunks(SUBSCRIBE_CHUNK) {
            out.ops.push_back(SubOp::Subscribe(chunk.to_vec()));
        }
        self.relay.link.set_up();
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
                Some(c) = self.queues.control_rx.recv() => {
                    let changes = self.relay.controls(c, &mut self.queues.control_rx);
                    for ask in changes.reads {
                        self.read(ask, &subscriber, out);
                    }
                    self.read_places(changes.places, &subscriber, out);
                    for chunk in changes.drop.chunks(SUBSCRIBE_CHUNK) {
                        out.ops.push_back(SubOp::Unsubscribe(chunk.to_vec()));
                    }
                    for chunk in changes.add.chunks(SUBSCRIBE_CHUNK) {
                        out.ops.push_back(SubOp::Subscribe(chunk.to_vec()));
                    }
                }
                Some(p) = self.queues.publish_rx.recv(), if out.publishing.is_none() => {
                    let batch = batch(p, &mut self.queues.publish_rx, MAX_BATCH);
                    self.relay.link.taken(batch.len());
                    started = Instant::now();
                    let (batch, pending) = self.publish(&publisher, &scripts, batch);
                    out.publishing = Some(batch);
                    out.in_flight = pending;
                }
                Some(e) = self.queues.events_rx.recv(), if out.eventing.is_none() && !self.relay.snapshot_pending => {
                    let events = batch(e, &mut self.queues.events_rx, usize::MAX);
                    out.eventing = Some(announce(&publisher, &scripts, events));
                }
                Some(result) = async { out.eventing.as_mut()?.await.into() }, if out.eventing.is_some() => {
                    out.eventing = None;
                    if let Err(why) = result {
                        return why;
                    }
                }
                Some(result) = async { out.publishing.as_mut()?.await.into() }, if out.publishing.is_some() => {
                    out.publishing = None;
                    self.relay.link.metrics.publish_seconds.observe(started.elapsed().as_secs_f64());
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
                        (SubOp::Subscribe(keys), true) => {
                            let mut places = Vec::new();
                            self.relay.confirmed(keys, &mut places);
                            self.read_places(places, &subscriber, out);
                        }
                        (SubOp::Unsubscribe(_), true) => {}
                        // Where the control events start: read every
                        // node's presence there.
                        (SubOp::Control, true) => {
                            let mut conn = subscriber.clone();
                            let mut cmd = redis::cmd("EVAL");
                            cmd.arg(SNAPSHOT).arg(1).arg(NODES);
                            out.placing.push_back(Box::pin(async move { query(&mut conn, cmd).await }));
                            out.places.push_back(("".into(), None));
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
                    let done = match why {
                        Some(why) => {
                            let entries = answer.and_then(|v| {
                                parse_read(&v).ok_or_else(|| "an unreadable history answer".to_string())
                            });
                            self.relay.placed(key, why, entries)
                        }
                        None => answer.map(|v| self.relay.restart_roster(parse_snapshot(&v))),
                    };
                    if let Err(e) = done {
                        return e;
                    }
                }
                Some(answer) = out.reading.next(), if !out.reading.is_empty() => {
                    let Some(ask) = out.reads.pop_front() else {
                        continue;
                    };
                    let page = answer.ok().and_then(|v| parse_read(&v));
                    let read = match page.and_then(|e| self.relay.page(e, namespace_of(&ask.key))) {
                        Some(page) => HistoryRead::Page(page),
                        None => HistoryRead::Unavailable,
                    };
                    self.relay.answer_read(ask.core, ask.read, read);
                }
                _ = ping.tick(), if pinging.is_none() => {
                    pinging = Some(ping_both(&publisher, &subscriber, &scripts, &self.relay.me));
                    self.relay.tick();
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
                        match serde_json::from_slice::<Event>(payload) {
                            Ok(e) => self.relay.control_event(e),
                            Err(_) => {
                                self.relay.link.metrics.malformed.inc();
                            }
                        }
                    }
                    (_, Some(Value::BulkString(payload))) => match placed_message(payload) {
                        Some((epoch, offset, wire)) => self
                            .relay
                            .arrived(Bytes::copy_from_slice(wire), Some((epoch, offset))),
                        None => self.relay.arrived(Bytes::copy_from_slice(payload), None),
                    },
                    _ => {}
                }
                Ok(())
            }
            PushKind::Disconnection => Err("the subscriber connection closed".into()),
            _ => Ok(()),
        }
    }

    /// Starts a history read on the subscriber connection.
    fn read(&self, ask: HistoryAsk, conn: &MultiplexedConnection, out: &mut Out) {
        let mode = match &ask.since {
            None => Mode::Newest(ask.limit),
            Some(s) => Mode::After(s, ask.limit),
        };
        let eval = read_command(&ask.key, ask.keep, mode);
        let mut conn = conn.clone();
        out.reading
            .push_back(Box::pin(async move { query(&mut conn, eval).await }));
        out.reads.push_back(ask);
    }

    /// Reads channels' places on the subscriber connection (the relay
    /// holds their messages until the answers).
    fn read_places(
        &self,
        places: Vec<(Box<str>, Purpose)>,
        conn: &MultiplexedConnection,
        out: &mut Out,
    ) {
        let after = self.relay.hub.history.recover_max + 1;
        for (key, why) in places {
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
            };
            let mut conn = conn.clone();
            out.placing
                .push_back(Box::pin(async move { query(&mut conn, eval).await }));
            out.places.push_back((key, Some(why)));
        }
    }

    /// One pipeline with every publish of `batch`.
    fn publish(
        &self,
        conn: &MultiplexedConnection,
        scripts: &Scripts,
        batch: Vec<Publish>,
    ) -> (Batch, Vec<Pending>) {
        let hub = &self.relay.hub;
        let window_ms = self.relay.window_ms;
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
            msg.encode_wire(self.relay.origin, &mut wire);
            let key = msg.with_key(str::to_string);
            let channel = broker_channel(&key);
            let keep = match msg.is_transient() {
                true => None,
                false => hub.keeps(msg.namespace(), msg.channel()),
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
                        .arg(window_ms);
                }
                (Some(keep), k) => {
                    let meta = meta_key(&key);
                    let (idem, window) = match k {
                        Some(k) => (idem_key(&key, k), window_ms),
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
                    self.relay.refuse(src, done);
                }
                return Err(why);
            }
        };
        for (i, (src, done, _kept)) in pending.into_iter().enumerate() {
            self.relay.link.metrics.published.inc();
            let outcome = outcome_of(values.get(i));
            if let Some(done) = done {
                self.relay.run_on(src, Box::new(move |c| done(c, &outcome)));
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
        let (node, mode, fields): (&str, &str, Vec<(String, Option<String>)>) = match e {
            Event::Occupy { node, key } => {
                (node, "set", vec![(field("o", key, None), Some("1".into()))])
            }
            Event::Vacate { node, key } => (
                node,
                "del",
                vec![(field("o", key, None), None), (field("c", key, None), None)],
            ),
            Event::Count { node, key, n } => (
                node,
                "set",
                vec![(field("c", key, None), Some(n.to_string()))],
            ),
            Event::Join {
                node,
                key,
                user,
                info,
                ..
            } => (
                node,
                "set",
                vec![(field("m", key, Some(user)), Some(info.to_string()))],
            ),
            Event::Leave { node, key, user } => {
                (node, "del", vec![(field("m", key, Some(user)), None)])
            }
            Event::Reset {
                node,
                keys,
                members,
                counts,
            } => {
                let mut f: Vec<(String, Option<String>)> = keys
                    .iter()
                    .map(|k| (field("o", k, None), Some("1".into())))
                    .collect();
                f.extend(
                    members
                        .iter()
                        .map(|(k, u, i)| (field("m", k, Some(u)), Some(i.to_string()))),
                );
                f.extend(
                    counts
                        .iter()
                        .map(|(k, n)| (field("c", k, None), Some(n.to_string()))),
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
        let (mut keys, mut members, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for (f, value) in pairs {
            let Ok(parts) = serde_json::from_str::<Vec<String>>(&f) else {
                continue;
            };
            match parts.as_slice() {
                [k, key] if k == "o" => keys.push(key.as_str().into()),
                [k, key, user] if k == "m" => {
                    members.push((key.as_str().into(), user.as_str().into(), value.into()))
                }
                [k, key] if k == "c" => {
                    if let Ok(n) = value.parse() {
                        counts.push((key.as_str().into(), n));
                    }
                }
                _ => {}
            }
        }
        out.push(Event::Reset {
            node: node.into(),
            keys,
            members,
            counts,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(broker_channel("news"), "herald:news");
        assert_eq!(broker_channel("3#room"), "herald:3#room");
        assert_eq!(stream_key("news"), "herald:h:news");
        assert_eq!(meta_key("3#room"), "herald:m:3#room");
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
