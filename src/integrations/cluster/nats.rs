//! The cluster link over NATS with JetStream, `BROKER_URL=nats://…`.
//!
//! One client connection (the `async-nats` crate); the server must run
//! JetStream (`nats-server -js`).
//!
//! - **Order.** Core NATS gives no order between two publishers, so every
//!   publish goes through a JetStream stream (`HERALD_LIVE`, subjects
//!   `herald.l.<channel>`, in memory, one message kept per channel), which
//!   stores messages one at a time and *republishes* each, in that order,
//!   on `herald.o.<channel>`. Nodes subscribe there: one order per channel
//!   on every node. A publisher's messages leave in the order it sent
//!   them (one queue, one connection).
//! - **Interest.** A node subscribes (core NATS) only to the channels it
//!   has subscribers of; a burst of first-subscriber changes is a run of
//!   `SUB`s and one round trip (`PING`), after which the subscriptions are
//!   confirmed to the clients; a last-subscriber change is an `UNSUB`.
//! - **Idempotency.** A publish with an idempotency key carries it as the
//!   message's `Nats-Msg-Id`: the stream drops a repeat within its
//!   duplicate window (`IDEMPOTENCY_WINDOW`), cluster-wide.
//! - **History is not offered over NATS** (`HISTORY` with a `nats://`
//!   broker is refused at start): Pusher cache channels behave as if
//!   nothing was cached, and a node that lost its link cannot catch up.
//! - **Presence.** Each node's changes are published to the stream
//!   `HERALD_PRESENCE`, one subject per node and field
//!   (`herald.p.<node>.o.<channel>`, `….m.<channel>.<user>`), keeping the
//!   newest message of each: the stream *is* the cluster's state. A node
//!   reads it with an ordered consumer that starts with the newest message
//!   of every subject (the snapshot) and goes on with every new one, so
//!   all nodes apply the same events in the same order. Heartbeats go on
//!   `herald.beat`; a node silent for `ALIVE_MS` is declared gone by
//!   whoever notices first (the stream drops the others' repeats by
//!   message id), and that node purges its subjects.
//! - **Failures.** A disconnection, a slow-consumer report, or a ping or
//!   publish without an answer within [`COMMAND_TIMEOUT`] marks the link
//!   down: the node drops the connection, reconnects with backoff and
//!   subscribes again to everything.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, context, stream};
use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, SelectAll, TakeUntil};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::{
    batch, Connect, Entries, Keys, Publish, Purpose, Queues, Relay, ALIVE_MS, COMMAND_TIMEOUT,
    MAX_BATCH, PING_EVERY, SUBSCRIBE_CHUNK,
};
use crate::engine::core::Done;
use crate::engine::history::{HistoryRead, Outcome, Page};
use crate::engine::roster::Event;

/// The stream every publish goes through.
const LIVE: &str = "HERALD_LIVE";
/// The most memory `HERALD_LIVE` keeps messages in.
const LIVE_BYTES: i64 = 64 << 20;
/// The stream of every node's presence.
const PRESENCE: &str = "HERALD_PRESENCE";
/// Where a node publishes a channel's messages: this, a dot, the channel.
const IN: &str = "herald.l";
/// Where the stream republishes them, and nodes subscribe.
const OUT: &str = "herald.o";
/// Presence subjects: this, a dot, the node, a dot, the field.
const FIELDS: &str = "herald.p";
/// Every node's heartbeat.
const BEAT: &str = "herald.beat";
/// The epoch of every channel over NATS (which keeps no history).
const NO_EPOCH: &str = "nats";
/// How long after a presence event this node purges what it made
/// useless (a vacated field, a gone node's fields): every node read it
/// long before (a node that far behind has lost its link).
const TIDY_AFTER: Duration = Duration::from_secs(30);
/// A presence snapshot larger than this (JSON bytes) is sent as a reset
/// of its first part and one event per field for the rest (NATS limits a
/// message to `max_payload`, 1 MB by default).
const RESET_BYTES: usize = 256 * 1024;

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Pending = (usize, Option<Done>);
/// A channel's subscription, until its handle is dropped.
type Feed = TakeUntil<async_nats::Subscriber, oneshot::Receiver<()>>;
type Acks = Vec<Result<jetstream::publish::PublishAck, context::PublishError>>;

/// A subject token for any string: its bytes in hex (channel names may
/// hold `.`, `*`, `>` or spaces, which subjects cannot).
fn token(s: &str) -> String {
    let mut t = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        t.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        t.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
    }
    t
}

/// The subject of a presence event: one per node and field, so that the
/// stream keeps each field's newest state.
fn field_subject(e: &Event) -> String {
    match e {
        Event::Occupy { node, key } | Event::Vacate { node, key } => {
            format!("{FIELDS}.{}.o.{}", token(node), token(key))
        }
        Event::Join {
            node, key, user, ..
        }
        | Event::Leave { node, key, user } => {
            format!("{FIELDS}.{}.m.{}.{}", token(node), token(key), token(user))
        }
        Event::Count { node, key, .. } => format!("{FIELDS}.{}.c.{}", token(node), token(key)),
        Event::Reset { node, .. } => format!("{FIELDS}.{}.r", token(node)),
        Event::Terminate { node, .. } => format!("{FIELDS}.{}.t", token(node)),
        Event::Gone { node, .. } => format!("{FIELDS}.{}.g", token(node)),
    }
}

/// A reset too large for one message: the reset of a first part, then
/// one event per remaining field.
fn split_reset(e: Event) -> Vec<Event> {
    let Event::Reset {
        node,
        mut keys,
        mut members,
        counts,
    } = e
    else {
        return vec![e];
    };
    let size: usize = keys.iter().map(|k| k.len() + 8).sum::<usize>()
        + counts.iter().map(|(k, _)| k.len() + 24).sum::<usize>()
        + members
            .iter()
            .map(|(k, u, i)| k.len() + u.len() + i.len() + 16)
            .sum::<usize>();
    if size <= RESET_BYTES {
        return vec![Event::Reset {
            node,
            keys,
            members,
            counts,
        }];
    }
    let (mut first_keys, mut first_members, mut used) = (Vec::new(), Vec::new(), 0);
    while used < RESET_BYTES / 2 {
        match (keys.pop(), members.pop()) {
            (None, None) => break,
            (k, m) => {
                if let Some(k) = k {
                    used += k.len() + 8;
                    first_keys.push(k);
                }
                if let Some(m) = m {
                    used += m.0.len() + m.1.len() + m.2.len() + 16;
                    first_members.push(m);
                }
            }
        }
    }
    let mut out = vec![Event::Reset {
        node: node.clone(),
        keys: first_keys,
        members: first_members,
        counts: Vec::new(),
    }];
    out.extend(keys.into_iter().map(|key| Event::Occupy {
        node: node.clone(),
        key,
    }));
    out.extend(members.into_iter().map(|(key, user, info)| Event::Join {
        node: node.clone(),
        key,
        user,
        info,
        except: None,
    }));
    out.extend(counts.into_iter().map(|(key, n)| Event::Count {
        node: node.clone(),
        key,
        n,
    }));
    out
}

/// The link's thread over NATS.
pub(super) struct Node {
    relay: Relay,
    queues: Queues,
    url: String,
}

/// One connection's worth of broker.
pub(super) struct Session {
    client: async_nats::Client,
    js: context::Context,
    /// The client's own reports (disconnections, slow consumers).
    reports: mpsc::UnboundedReceiver<async_nats::Event>,
}

/// Answers of the broker the serving loop waits for.
enum Work {
    /// Subscriptions made and confirmed (by a round trip), or why not.
    Subscribed(Keys, Result<Vec<async_nats::Subscriber>, String>),
    /// A batch of publishes stored by the stream (one answer each).
    Published(Result<Acks, String>, Instant),
    /// Presence events stored.
    Announced(Result<(), String>),
    /// A ping answered.
    Pinged(Result<(), String>),
    /// Housekeeping that may fail without harm (purges).
    Tidied(Result<(), String>),
}

/// What the serving loop holds on the current connection.
#[derive(Default)]
struct Out {
    /// Subscription requests to make, in order; one out at a time.
    ops: VecDeque<Keys>,
    op: Option<Boxed<Work>>,
    /// Subscriptions' messages, and each channel's handle (dropping it
    /// unsubscribes).
    feeds: SelectAll<Feed>,
    handles: HashMap<Box<str>, oneshot::Sender<()>>,
    /// The publish batch out, the presence batch out, the ping out.
    publishing: Option<Boxed<Work>>,
    /// The publishers of the batch out.
    in_flight: Vec<Pending>,
    announcing: Option<Boxed<Work>>,
    pinging: Option<Boxed<Work>>,
    /// Purges out, and those due later (subject, before which sequence,
    /// when): a purge waits until every node has surely read what it
    /// removes.
    tidying: FuturesUnordered<Boxed<Work>>,
    tidy: VecDeque<(String, u64, Instant)>,
    /// The presence snapshot being read: its events, and the sequence
    /// that ends it.
    snapshot: Vec<Event>,
    snapshot_end: u64,
    /// Nodes with presence state: when each was last heard of, and the
    /// sequence of its newest event.
    heard: HashMap<Box<str>, (Instant, u64)>,
    since: Option<Instant>,
}

impl Connect for Node {
    type Session = Session;

    fn parts(&mut self) -> (&mut Relay, &mut Queues) {
        (&mut self.relay, &mut self.queues)
    }

    /// Connects, and makes sure the streams exist with this node's
    /// settings.
    async fn connect(&self) -> Result<Session, String> {
        let address = &self.relay.address;
        let (tx, reports) = mpsc::unbounded_channel();
        let options = async_nats::ConnectOptions::new()
            .connection_timeout(COMMAND_TIMEOUT)
            .ping_interval(PING_EVERY)
            // This loop reconnects (and subscribes again) by itself.
            .max_reconnects(1)
            .subscription_capacity(1 << 16)
            .event_callback(move |e| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(e);
                }
            });
        let attempt = async {
            let client = async_nats::connect_with_options(self.url.as_str(), options)
                .await
                .map_err(|e| format!("cannot connect to {address}: {e}"))?;
            let js = jetstream::ContextBuilder::new()
                .timeout(COMMAND_TIMEOUT)
                .build(client.clone());
            let window = Duration::from_millis(self.relay.window_ms);
            let live = stream::Config {
                name: LIVE.into(),
                subjects: vec![format!("{IN}.>")],
                storage: stream::StorageType::Memory,
                max_messages_per_subject: 1,
                // Only there to order: its memory is bounded (the oldest
                // go first; duplicate detection does not need them).
                max_bytes: LIVE_BYTES,
                // The stream's duplicate window cannot outlast its messages.
                max_age: window,
                duplicate_window: window,
                discard: stream::DiscardPolicy::Old,
                republish: Some(stream::Republish {
                    source: format!("{IN}.>"),
                    destination: format!("{OUT}.>"),
                    headers_only: false,
                }),
                ..Default::default()
            };
            let presence = stream::Config {
                name: PRESENCE.into(),
                subjects: vec![format!("{FIELDS}.>")],
                storage: stream::StorageType::Memory,
                max_messages_per_subject: 1,
                duplicate_window: Duration::from_secs(120),
                discard: stream::DiscardPolicy::Old,
                ..Default::default()
            };
            for config in [live, presence] {
                let name = config.name.clone();
                js.create_or_update_stream(config).await.map_err(|e| {
                    format!("cannot set up the JetStream stream {name} on {address} (is JetStream enabled, nats-server -js?): {e}")
                })?;
            }
            Ok::<_, String>(Session {
                client,
                js,
                reports,
            })
        };
        match tokio::time::timeout(COMMAND_TIMEOUT * 2, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no answer from {address} within {:?}",
                COMMAND_TIMEOUT * 2
            )),
        }
    }

    /// Serves one connection until it fails; returns why. Whatever was
    /// out at the broker then is answered as failed.
    async fn serve(&mut self, s: Session) -> String {
        let mut out = Out::default();
        let why = self.serve_with(s, &mut out).await;
        // The batch out may or may not have been stored: its publishers
        // are told it was not (with an idempotency key, a retry is safe).
        for (src, done) in std::mem::take(&mut out.in_flight) {
            self.relay.refuse(src, done);
        }
        why
    }
}

impl Node {
    pub(super) fn new(url: &str, relay: Relay, queues: Queues) -> Result<Node, String> {
        url.parse::<async_nats::ServerAddr>()
            .map_err(|e| e.to_string())?;
        Ok(Node {
            relay,
            queues,
            url: url.to_string(),
        })
    }

    async fn serve_with(&mut self, s: Session, out: &mut Out) -> String {
        let Session {
            client,
            js,
            mut reports,
        } = s;
        let mut beats = match client.subscribe(BEAT).await {
            Ok(s) => s,
            Err(e) => return format!("subscribing to heartbeats: {e}"),
        };
        // Presence: the newest message of every subject, then every new
        // one. The snapshot ends at the stream's last sequence now.
        self.relay.snapshot_pending = true;
        self.relay.control_held.clear();
        let presence = match js.get_stream(PRESENCE).await {
            Ok(s) => s,
            Err(e) => return format!("reading {PRESENCE}: {e}"),
        };
        out.snapshot_end = presence.cached_info().state.last_sequence;
        let consumer = presence
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: format!("{FIELDS}.>"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            })
            .await;
        let consumer = match consumer {
            Ok(c) => c,
            Err(e) => return format!("reading {PRESENCE}: {e}"),
        };
        if consumer.cached_info().num_pending == 0 {
            self.snapshot_read(out);
        }
        let mut roster = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => return format!("reading {PRESENCE}: {e}"),
        };
        // Everything wanted so far, again.
        let again: Keys = self
            .relay
            .subs
            .iter()
            .map(|(k, s)| (k.clone(), s.gen))
            .collect();
        for chunk in again.chunks(SUBSCRIBE_CHUNK) {
            out.ops.push_back(chunk.to_vec());
        }
        self.relay.link.set_up();
        out.since = Some(Instant::now());
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if out.op.is_none() {
                if let Some(keys) = out.ops.pop_front() {
                    out.op = Some(subscribe(&client, keys));
                }
            }
            tokio::select! {
                Some(m) = out.feeds.next(), if !out.feeds.is_empty() => {
                    self.arrived(m);
                }
                r = reports.recv() => match r {
                    Some(async_nats::Event::Disconnected) | Some(async_nats::Event::Closed) | None => {
                        return "the connection closed".into();
                    }
                    Some(async_nats::Event::SlowConsumer(_)) => {
                        return "the broker's messages came faster than this node took them (slow consumer)".into();
                    }
                    Some(e) => tracing::debug!("cluster broker: {e}"),
                },
                Some(c) = self.queues.control_rx.recv() => {
                    let changes = self.relay.controls(c, &mut self.queues.control_rx);
                    for ask in changes.reads {
                        // No history over NATS: nothing kept.
                        let page = HistoryRead::Page(Page {
                            epoch: NO_EPOCH.into(),
                            top: 0,
                            messages: Vec::new(),
                        });
                        self.relay.answer_read(ask.core, ask.read, page);
                    }
                    if let Err(e) = self.place(changes.places) {
                        return e;
                    }
                    for key in changes.drop {
                        // Dropping the handle ends the feed: UNSUB.
                        out.handles.remove(&key);
                    }
                    for chunk in changes.add.chunks(SUBSCRIBE_CHUNK) {
                        out.ops.push_back(chunk.to_vec());
                    }
                }
                Some(p) = self.queues.publish_rx.recv(), if out.publishing.is_none() => {
                    let batch = batch(p, &mut self.queues.publish_rx, MAX_BATCH);
                    self.relay.link.taken(batch.len());
                    let (batch, pending) = self.publish(&js, batch);
                    out.publishing = Some(batch);
                    out.in_flight = pending;
                }
                Some(e) = self.queues.events_rx.recv(), if out.announcing.is_none() && !self.relay.snapshot_pending => {
                    let events = batch(e, &mut self.queues.events_rx, usize::MAX);
                    out.announcing = Some(announce(&js, events.into_iter().map(|e| (e, None)).collect()));
                }
                m = roster.next() => match m {
                    Some(Ok(m)) => self.roster_message(m, out),
                    Some(Err(e)) => return format!("reading {PRESENCE}: {e}"),
                    None => return format!("reading {PRESENCE}: the consumer ended"),
                },
                Some(b) = beats.next() => {
                    if let Ok(node) = std::str::from_utf8(&b.payload) {
                        if let Some((t, _)) = out.heard.get_mut(node) {
                            *t = Instant::now();
                        }
                    }
                }
                _ = ping.tick(), if out.pinging.is_none() => {
                    out.pinging = Some(ping_beat(&client, &self.relay.me));
                    self.relay.tick();
                    self.reap(&js, out);
                    while out.tidy.front().is_some_and(|(_, _, due)| *due <= Instant::now()) {
                        if let Some((subject, upto, _)) = out.tidy.pop_front() {
                            out.tidying.push(purge(&js, subject, upto));
                        }
                    }
                }
                Some(w) = async { out.op.as_mut()?.await.into() }, if out.op.is_some() => {
                    out.op = None;
                    if let Err(e) = self.done(w, out) {
                        return e;
                    }
                }
                Some(w) = async { out.publishing.as_mut()?.await.into() }, if out.publishing.is_some() => {
                    out.publishing = None;
                    if let Err(e) = self.done(w, out) {
                        return e;
                    }
                }
                Some(w) = async { out.announcing.as_mut()?.await.into() }, if out.announcing.is_some() => {
                    out.announcing = None;
                    if let Err(e) = self.done(w, out) {
                        return e;
                    }
                }
                Some(w) = async { out.pinging.as_mut()?.await.into() }, if out.pinging.is_some() => {
                    out.pinging = None;
                    if let Err(e) = self.done(w, out) {
                        return e;
                    }
                }
                Some(w) = out.tidying.next(), if !out.tidying.is_empty() => {
                    if let Err(e) = self.done(w, out) {
                        return e;
                    }
                }
            }
        }
    }

    /// An answer the loop waited for; an error takes the link down.
    fn done(&mut self, w: Work, out: &mut Out) -> Result<(), String> {
        match w {
            Work::Subscribed(keys, Err(e)) => {
                let _ = keys;
                Err(e)
            }
            Work::Subscribed(keys, Ok(subscribers)) => {
                // Keep the ones still wanted by the request that made them.
                let mut confirmed = Vec::with_capacity(keys.len());
                for ((key, gen), s) in keys.into_iter().zip(subscribers) {
                    let wanted = self.relay.subs.get(&key).is_some_and(|s| s.gen == gen);
                    if !wanted {
                        continue;
                    }
                    let (handle, ended) = oneshot::channel();
                    out.feeds.push(s.take_until(ended));
                    out.handles.insert(key.clone(), handle);
                    confirmed.push((key, gen));
                }
                let mut places = Vec::new();
                self.relay.confirmed(confirmed, &mut places);
                self.place(places)
            }
            Work::Published(result, started) => {
                let pending = std::mem::take(&mut out.in_flight);
                self.relay
                    .link
                    .metrics
                    .publish_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.published(pending, result)
            }
            Work::Announced(r) | Work::Pinged(r) => r,
            Work::Tidied(r) => {
                if let Err(e) = r {
                    tracing::debug!("cluster broker: purging presence: {e}");
                }
                Ok(())
            }
        }
    }

    /// Places of channels with history: NATS keeps none, so each is the
    /// empty start of the one epoch.
    fn place(&mut self, places: Vec<(Box<str>, Purpose)>) -> Result<(), String> {
        for (key, why) in places {
            let nothing: Entries = (NO_EPOCH.into(), 0, Vec::new());
            self.relay.placed(key, why, Ok(nothing))?;
        }
        Ok(())
    }

    /// A message the stream republished.
    fn arrived(&mut self, m: async_nats::Message) {
        self.relay.arrived(m.payload, None);
    }

    /// A presence message: part of the snapshot, or an event to apply.
    fn roster_message(&mut self, m: jetstream::Message, out: &mut Out) {
        let (seq, pending) = match m.info() {
            Ok(i) => (i.stream_sequence, i.pending),
            Err(_) => (0, 0),
        };
        let Ok(e) = serde_json::from_slice::<Event>(&m.payload) else {
            self.relay.link.metrics.malformed.inc();
            return;
        };
        // Nodes with state are watched for their heartbeats.
        match &e {
            Event::Gone { node, .. } => {
                out.heard.remove(node);
            }
            e if *e.decider() != *self.relay.me => {
                let heard = out
                    .heard
                    .entry(e.decider().into())
                    .or_insert_with(|| (Instant::now(), seq));
                heard.1 = heard.1.max(seq);
            }
            _ => {}
        }
        if self.relay.snapshot_pending {
            out.snapshot.push(e);
            if seq >= out.snapshot_end || pending == 0 {
                self.snapshot_read(out);
            }
            return;
        }
        // What the purges below remove is what a later reader need not see.
        let tidy = match &e {
            Event::Gone { node, by } if *by == self.relay.me => {
                Some((format!("{FIELDS}.{}.>", token(node)), seq + 1))
            }
            Event::Vacate { node, key } if *node == self.relay.me => {
                // Its count goes with it.
                let count = Event::Count {
                    node: node.clone(),
                    key: key.clone(),
                    n: 0,
                };
                out.tidy
                    .push_back((field_subject(&count), seq, Instant::now() + TIDY_AFTER));
                Some((field_subject(&e), seq + 1))
            }
            Event::Leave { node, .. } if *node == self.relay.me => {
                Some((field_subject(&e), seq + 1))
            }
            _ => None,
        };
        self.relay.control_event(e);
        if let Some((subject, upto)) = tidy {
            out.tidy
                .push_back((subject, upto, Instant::now() + TIDY_AFTER));
        }
    }

    /// The snapshot is read: the roster restarts from it.
    fn snapshot_read(&mut self, out: &mut Out) {
        let snapshot = std::mem::take(&mut out.snapshot);
        self.relay.restart_roster(snapshot);
    }

    /// Declares gone the nodes not heard of for `ALIVE_MS` (once this
    /// node has been connected long enough to have heard them).
    fn reap(&mut self, js: &context::Context, out: &mut Out) {
        let alive = Duration::from_millis(ALIVE_MS);
        if out.since.is_none_or(|t| t.elapsed() < alive + PING_EVERY) || out.announcing.is_some() {
            return;
        }
        let silent: Vec<(Box<str>, u64)> = out
            .heard
            .iter()
            .filter(|(_, (t, _))| t.elapsed() >= alive)
            .map(|(n, (_, seq))| (n.clone(), *seq))
            .collect();
        if silent.is_empty() {
            return;
        }
        let batch: Vec<(Event, Option<u64>)> = silent
            .into_iter()
            .map(|(node, seq)| {
                // Asked again later if it is still there.
                out.heard.insert(node.clone(), (Instant::now(), seq));
                let gone = Event::Gone {
                    node,
                    by: self.relay.me.clone(),
                };
                (gone, Some(seq))
            })
            .collect();
        out.announcing = Some(announce(js, batch));
    }

    /// Sends a batch of publishes to the stream, in order, and waits for
    /// every answer.
    fn publish(&self, js: &context::Context, batch: Vec<Publish>) -> (Boxed<Work>, Vec<Pending>) {
        let mut messages = Vec::with_capacity(batch.len());
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
            let mut m = jetstream::message::PublishMessage::build().payload(Bytes::from(wire));
            if let Some(k) = idempotency_key {
                m = m.message_id(format!("{}.{}", token(&key), token(&k)));
            }
            messages.push((format!("{IN}.{}", token(&key)), m));
            pending.push((src, done));
        }
        let js = js.clone();
        let started = Instant::now();
        let batch: Boxed<Work> = Box::pin(async move {
            let sent = async {
                let mut acks = Vec::with_capacity(messages.len());
                for (subject, m) in messages {
                    acks.push(js.send_publish(subject, m).await);
                }
                let mut answers = Vec::with_capacity(acks.len());
                for ack in acks {
                    answers.push(match ack {
                        Ok(f) => f.await,
                        Err(e) => Err(e),
                    });
                }
                answers
            };
            let result = match tokio::time::timeout(COMMAND_TIMEOUT * 2, sent).await {
                Ok(acks) => Ok(acks),
                Err(_) => Err(format!("no answer to a publish within {COMMAND_TIMEOUT:?}")),
            };
            Work::Published(result, started)
        });
        (batch, pending)
    }

    /// Answers the publishers of a batch. A message too large for the
    /// broker is refused alone; any other failure takes the link down.
    fn published(&self, pending: Vec<Pending>, result: Result<Acks, String>) -> Result<(), String> {
        let acks = match result {
            Ok(a) => a,
            Err(why) => {
                for (src, done) in pending {
                    self.relay.refuse(src, done);
                }
                return Err(why);
            }
        };
        let mut failed = None;
        for ((src, done), ack) in pending.into_iter().zip(acks) {
            let outcome = match ack {
                Ok(ack) => Outcome {
                    duplicate: ack.duplicate,
                    ..Outcome::default()
                },
                Err(e) => {
                    if e.kind() != context::PublishErrorKind::MaxPayloadExceeded {
                        failed.get_or_insert_with(|| format!("publishing: {e}"));
                    }
                    self.relay.refuse(src, done);
                    continue;
                }
            };
            self.relay.link.metrics.published.inc();
            if let Some(done) = done {
                self.relay.run_on(src, Box::new(move |c| done(c, &outcome)));
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// A request the server answers once it has handled everything this
/// node sent before it (a client's `flush` only empties its own buffer).
async fn round_trip(client: &async_nats::Client) -> Result<(), String> {
    client
        .request("$JS.API.INFO", Bytes::new())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Subscribes to channels, then makes one round trip: once it is back,
/// the server has every subscription.
fn subscribe(client: &async_nats::Client, keys: Keys) -> Boxed<Work> {
    let client = client.clone();
    Box::pin(async move {
        let made = async {
            let mut subs = Vec::with_capacity(keys.len());
            for (key, _) in &keys {
                let s = client
                    .subscribe(format!("{OUT}.{}", token(key)))
                    .await
                    .map_err(|e| format!("subscribing: {e}"))?;
                subs.push(s);
            }
            round_trip(&client)
                .await
                .map_err(|e| format!("subscribing: {e}"))?;
            Ok(subs)
        };
        let result = match tokio::time::timeout(COMMAND_TIMEOUT, made).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no confirmation of a subscription within {COMMAND_TIMEOUT:?}"
            )),
        };
        Work::Subscribed(keys, result)
    })
}

/// The node's heartbeat, and a round trip: a broker that stopped
/// answering (a partition drops packets without closing anything) is
/// found within `PING_EVERY + COMMAND_TIMEOUT`.
fn ping_beat(client: &async_nats::Client, me: &str) -> Boxed<Work> {
    let client = client.clone();
    let me = Bytes::copy_from_slice(me.as_bytes());
    Box::pin(async move {
        let both = async {
            client.publish(BEAT, me).await.map_err(|e| e.to_string())?;
            round_trip(&client).await
        };
        Work::Pinged(match tokio::time::timeout(COMMAND_TIMEOUT, both).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("ping: {e}")),
            Err(_) => Err(format!("no answer to a ping within {COMMAND_TIMEOUT:?}")),
        })
    })
}

/// A batch of presence events, stored in order. A `gone` comes with the
/// sequence of the node's newest event, and carries both as its message
/// id, so that the stream keeps one when several nodes notice.
fn announce(js: &context::Context, batch: Vec<(Event, Option<u64>)>) -> Boxed<Work> {
    let js = js.clone();
    let mut messages = Vec::with_capacity(batch.len());
    for (e, newest) in batch {
        for e in split_reset(e) {
            let Ok(json) = serde_json::to_vec(&e) else {
                continue;
            };
            let mut m = jetstream::message::PublishMessage::build().payload(Bytes::from(json));
            if let (Event::Gone { node, .. }, Some(seq)) = (&e, newest) {
                m = m.message_id(format!("gone.{}.{seq}", token(node)));
            }
            messages.push((field_subject(&e), m));
        }
    }
    Box::pin(async move {
        let sent = async {
            let mut acks = Vec::with_capacity(messages.len());
            for (subject, m) in messages {
                acks.push(
                    js.send_publish(subject, m)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            for ack in acks {
                ack.await.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        };
        Work::Announced(
            match tokio::time::timeout(COMMAND_TIMEOUT * 2, sent).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("announcing presence: {e}")),
                Err(_) => Err(format!(
                    "no answer to a presence event within {COMMAND_TIMEOUT:?}"
                )),
            },
        )
    })
}

/// Removes the presence stream's messages on `subject` (a wildcard, or
/// one field) before sequence `upto`.
fn purge(js: &context::Context, subject: String, upto: u64) -> Boxed<Work> {
    let js = js.clone();
    Box::pin(async move {
        let done = async {
            let stream = js
                .get_stream_no_info(PRESENCE)
                .await
                .map_err(|e| e.to_string())?;
            stream
                .purge()
                .filter(subject)
                .sequence(upto)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        Work::Tidied(match tokio::time::timeout(COMMAND_TIMEOUT, done).await {
            Ok(r) => r,
            Err(_) => Err("no answer to a purge".into()),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_take_any_channel() {
        assert_eq!(token("a.b *>"), "612e62202a3e");
        assert_eq!(token(""), "");
        let e = Event::Join {
            node: "n:1".into(),
            key: "3#presence-x".into(),
            user: "u.1".into(),
            info: "{}".into(),
            except: None,
        };
        assert_eq!(
            field_subject(&e),
            format!(
                "herald.p.{}.m.{}.{}",
                token("n:1"),
                token("3#presence-x"),
                token("u.1")
            )
        );
        let leave = Event::Leave {
            node: "n:1".into(),
            key: "3#presence-x".into(),
            user: "u.1".into(),
        };
        assert_eq!(
            field_subject(&leave),
            field_subject(&e),
            "one subject per field"
        );
    }

    #[test]
    fn a_large_reset_is_split_into_a_reset_and_single_fields() {
        let small = Event::Reset {
            node: "n".into(),
            keys: vec!["a".into()],
            members: vec![],
            counts: vec![],
        };
        assert_eq!(split_reset(small.clone()), vec![small]);
        let members: Vec<_> = (0..20_000)
            .map(|i| ("k".into(), format!("user-{i}").into(), "{\"x\":1}".into()))
            .collect();
        let big = Event::Reset {
            node: "n".into(),
            keys: vec!["k".into()],
            members,
            counts: vec![("k".into(), 20_000)],
        };
        let parts = split_reset(big);
        assert!(matches!(parts[0], Event::Reset { .. }));
        let mut users = std::collections::HashSet::new();
        for p in &parts {
            assert!(serde_json::to_vec(p).unwrap().len() < RESET_BYTES * 2);
            match p {
                Event::Reset { members, .. } => users.extend(members.iter().map(|m| m.1.clone())),
                Event::Join { user, .. } => {
                    users.insert(user.clone());
                }
                _ => {}
            }
        }
        assert_eq!(users.len(), 20_000, "every member is in one part");
    }
}
