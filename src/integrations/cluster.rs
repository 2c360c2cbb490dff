//! A node's link to its cluster (`BROKER_URL=redis://…`): the engine's
//! [`Broker`], over Redis (or Valkey) publish/subscribe.
//!
//! One thread of its own, with a single-threaded tokio runtime and the
//! `redis` crate, holds two connections to the broker: one subscribed to
//! the channels this node has subscribers of, one for publishing. No
//! reactor ever waits on it: the cores hand it commands through an
//! unbounded queue, and it hands them messages (and the answers they wait
//! for) through the engine's bus, as one more source.
//!
//! - **Order.** Every publish, this node's too, goes to the broker, and
//!   every node delivers what comes back, in the order the broker sends
//!   it: Redis runs commands one at a time, so each channel has one order
//!   on every node. A publisher's messages leave in the order it sent
//!   them (one queue, one connection, pipelined).
//! - **Interest.** The node subscribes on the broker only to the channels
//!   it has subscribers of, following the interest map's first/last
//!   subscriber events; each burst of changes is one `SUBSCRIBE` and one
//!   `UNSUBSCRIBE`. A subscription is confirmed to its client only once
//!   the broker confirmed the node's (`Broker::when_ready`), so what is
//!   published after the client's `subscribed` reaches it.
//! - **Failures.** A connection that closes, a command or a ping that
//!   gets no answer within [`COMMAND_TIMEOUT`] marks the link down: the
//!   node reconnects with backoff and subscribes again to everything; in
//!   between, `/health` answers 503 with the reason, and every publish and
//!   every subscription that needs the broker gets an error (never a
//!   silent drop).
//! - **Idempotency.** A publish with an idempotency key is published by a
//!   small script that first sets the key (`SET NX PX`), so a repeat is
//!   dropped cluster-wide within the window.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use tokio::sync::mpsc;

use super::metrics::BrokerMetrics;
use crate::config::BrokerUrl;
use crate::engine::core::{Broker, Done, Envelope, Hub, Ready};
use crate::engine::history::Outcome;
use crate::engine::interest::Change;
use crate::engine::message::Message;

/// Broker channel of a routing key: this prefix, then the key.
pub const CHANNEL_PREFIX: &str = "herald:";
/// Broker key of an idempotency key: this prefix, the routing key, a
/// space, the publisher's key.
const IDEMPOTENCY_PREFIX: &str = "herald:idem:";
/// How long a connection attempt, a batch of publishes, a subscription
/// or a ping may take before the link is declared down.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often each connection is pinged when nothing else shows it alive.
const PING_EVERY: Duration = Duration::from_millis(1000);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most publishes in one pipeline.
const MAX_BATCH: usize = 1024;
/// Most channels in one SUBSCRIBE.
const SUBSCRIBE_CHUNK: usize = 1024;

/// Publishes `ARGV[3]` on channel `ARGV[2]` unless the idempotency key
/// `KEYS[1]` was set within `ARGV[1]` milliseconds (then -1).
const IDEMPOTENT_PUBLISH: &str = "if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then \
     return redis.call('PUBLISH', ARGV[2], ARGV[3]) else return -1 end";

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

enum Publish {
    One {
        src: usize,
        msg: Arc<Message>,
        idempotency_key: Option<Box<str>>,
        done: Option<Done>,
    },
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
}

/// What the cores and `/health` see of the link.
struct Link {
    up: AtomicBool,
    reason: Mutex<String>,
    metrics: BrokerMetrics,
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
    publishes: mpsc::UnboundedSender<Publish>,
    control: mpsc::UnboundedSender<Control>,
    link: Arc<Link>,
    hub: Arc<Hub>,
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
        let client = redis::Client::open(address.as_str()).map_err(|source| ClusterError::Url {
            url: url.redacted(),
            source,
        })?;
        let (publishes, publish_rx) = mpsc::unbounded_channel();
        let (control, control_rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link {
            up: AtomicBool::new(false),
            reason: Mutex::new(format!("connecting to {}", url.redacted())),
            metrics,
        });
        let node = Node {
            hub: hub.clone(),
            src: hub.outside_source(),
            origin: origin_tag(),
            node_id: node_id.to_string(),
            address: url.redacted(),
            link: link.clone(),
            client,
            window_ms: idempotency_window_ms.max(1),
            subs: HashMap::new(),
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
            publishes,
            control,
            link,
            hub,
        }))
    }

    /// Runs `done` on core `core` with "unavailable" (the thread is gone).
    fn fail(&self, core: usize, done: Option<Done>) {
        self.link.metrics.publish_failed.inc();
        if let Some(done) = done {
            let src = self.hub.outside_source();
            let task = Box::new(move |c: &crate::engine::core::Core| done(c, &unavailable()));
            self.hub.bus.send(src, core, Envelope::Run(task));
        }
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
        let one = Publish::One {
            src,
            msg,
            idempotency_key,
            done,
        };
        if let Err(mpsc::error::SendError(Publish::One { src, done, .. })) =
            self.publishes.send(one)
        {
            self.fail(src, done);
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
        if let Err(mpsc::error::SendError(Control::WhenReady { core, ready, .. })) =
            self.control.send(asked)
        {
            let task = Box::new(move |c: &crate::engine::core::Core| ready(c, false));
            self.hub
                .bus
                .send(self.hub.outside_source(), core, Envelope::Run(task));
        }
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
fn origin_tag() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(b)
}

/// The broker channel of routing key `key`.
pub fn broker_channel(key: &str) -> String {
    let mut s = String::with_capacity(CHANNEL_PREFIX.len() + key.len());
    s.push_str(CHANNEL_PREFIX);
    s.push_str(key);
    s
}

/// A channel's broker subscription.
struct Sub {
    /// The broker confirmed it (on the current connection).
    active: bool,
    /// Which request made it: an answer to an older one (the channel was
    /// dropped and wanted again meanwhile) does not count.
    gen: u64,
    /// Cores waiting for it, and what to run there.
    waiters: Vec<(usize, Ready)>,
}

type Pending = (usize, Option<Done>);
type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// Channels (with the request generation) in one SUBSCRIBE.
type Keys = Vec<(Box<str>, u64)>;
/// A batch's publishers and the broker's answers.
type Batch = Boxed<(Vec<Pending>, Result<Vec<redis::Value>, String>)>;

/// The link's thread: its state and its two queues.
struct Node {
    hub: Arc<Hub>,
    src: usize,
    origin: u64,
    node_id: String,
    address: String,
    link: Arc<Link>,
    client: redis::Client,
    window_ms: u64,
    subs: HashMap<Box<str>, Sub>,
    next_gen: u64,
    publish_rx: mpsc::UnboundedReceiver<Publish>,
    control_rx: mpsc::UnboundedReceiver<Control>,
}

/// One connection's worth of broker.
struct Session {
    conn: MultiplexedConnection,
    sink: PubSubSink,
    stream: PubSubStream,
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
                    Some(Publish::One { src, done, .. }) = self.publish_rx.recv() => {
                        self.refuse(src, done)
                    }
                    Some(c) = self.control_rx.recv() => {
                        let mut none = Vec::new();
                        self.control(c, &mut none, &mut Vec::new());
                    }
                    else => return,
                }
            }
        }
    }

    async fn connect(&self) -> Result<Session, String> {
        let attempt = async {
            let pubsub = self.client.get_async_pubsub().await?;
            // Our own timeouts decide when the link is down (the crate's
            // default gives a command 500 ms).
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(COMMAND_TIMEOUT))
                .set_response_timeout(Some(COMMAND_TIMEOUT));
            let conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            Ok::<_, redis::RedisError>((pubsub, conn))
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, attempt).await {
            Ok(Ok((pubsub, conn))) => {
                let (sink, stream) = pubsub.split();
                Ok(Session { conn, sink, stream })
            }
            Ok(Err(e)) => Err(format!("cannot connect to {}: {e}", self.address)),
            Err(_) => Err(format!(
                "no answer from {} within {COMMAND_TIMEOUT:?}",
                self.address
            )),
        }
    }

    /// The link is down: waiting subscriptions fail, every channel is to
    /// be subscribed again on the next connection.
    fn went_down(&mut self, reason: String) {
        self.link.set_down(reason);
        self.link.metrics.subscriptions.set(0);
        for sub in self.subs.values_mut() {
            sub.active = false;
            for (core, ready) in sub.waiters.drain(..) {
                send_ready(&self.hub, self.src, core, ready, false);
            }
        }
    }

    /// Answers a publish the broker did not take.
    fn refuse(&self, src: usize, done: Option<Done>) {
        self.link.metrics.publish_failed.inc();
        if let Some(done) = done {
            let task = Box::new(move |c: &crate::engine::core::Core| done(c, &unavailable()));
            self.hub.bus.send(self.src, src, Envelope::Run(task));
        }
    }

    /// Serves one connection until it fails; returns why.
    async fn serve(&mut self, s: Session) -> String {
        let Session {
            conn,
            sink,
            mut stream,
        } = s;
        let mut subscribing: FuturesUnordered<Boxed<(Keys, bool)>> = FuturesUnordered::new();
        let mut unsubscribing: FuturesUnordered<Boxed<bool>> = FuturesUnordered::new();
        // Everything wanted so far, again.
        let again: Vec<(Box<str>, u64)> =
            self.subs.iter().map(|(k, s)| (k.clone(), s.gen)).collect();
        for chunk in again.chunks(SUBSCRIBE_CHUNK) {
            subscribing.push(subscribe(&sink, chunk.to_vec()));
        }
        self.link.set_up();
        let mut publishing: Option<Batch> = None;
        let mut started = Instant::now();
        let mut pinging: Option<Boxed<Result<(), String>>> = None;
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(m) => self.arrived(m.get_payload_bytes()),
                    None => return "the broker closed the subscriber connection".into(),
                },
                Some(c) = self.control_rx.recv() => {
                    let (mut add, mut drop) = (Vec::new(), Vec::new());
                    self.control(c, &mut add, &mut drop);
                    while let Ok(c) = self.control_rx.try_recv() {
                        self.control(c, &mut add, &mut drop);
                    }
                    for chunk in drop.chunks(SUBSCRIBE_CHUNK) {
                        unsubscribing.push(unsubscribe(&sink, chunk.to_vec()));
                    }
                    for chunk in add.chunks(SUBSCRIBE_CHUNK) {
                        subscribing.push(subscribe(&sink, chunk.to_vec()));
                    }
                }
                Some(p) = self.publish_rx.recv(), if publishing.is_none() => {
                    let mut batch = vec![p];
                    while batch.len() < MAX_BATCH {
                        match self.publish_rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    started = Instant::now();
                    publishing = Some(self.publish(&conn, batch));
                }
                Some((pending, result)) = async { publishing.as_mut()?.await.into() }, if publishing.is_some() => {
                    publishing = None;
                    self.link.metrics.publish_seconds.observe(started.elapsed().as_secs_f64());
                    if let Err(why) = self.published(pending, result) {
                        return why;
                    }
                }
                Some((keys, ok)) = subscribing.next(), if !subscribing.is_empty() => {
                    if !ok {
                        return "a SUBSCRIBE got no confirmation".into();
                    }
                    self.confirmed(keys);
                }
                Some(ok) = unsubscribing.next(), if !unsubscribing.is_empty() => {
                    if !ok {
                        return "an UNSUBSCRIBE got no confirmation".into();
                    }
                }
                _ = ping.tick(), if pinging.is_none() => {
                    pinging = Some(ping_both(&conn, &sink));
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

    /// A message from the broker: to the cores with subscribers.
    fn arrived(&self, payload: &[u8]) {
        self.link.metrics.received.inc();
        match Message::decode_wire(Bytes::copy_from_slice(payload), self.origin) {
            Ok(msg) => {
                self.hub.arrive(self.src, Arc::new(msg));
            }
            Err(e) => {
                self.link.metrics.malformed.inc();
                tracing::debug!("dropped a message from the broker: {e}");
            }
        }
    }

    /// Applies one control command; channels to (un)subscribe on the
    /// broker are added to `add` and `drop`.
    fn control(&mut self, c: Control, add: &mut Keys, drop: &mut Vec<Box<str>>) {
        let up = self.link.up.load(Ordering::Acquire);
        match c {
            Control::Interest {
                key,
                change: Change::First,
            } => {
                self.want(key, add);
            }
            Control::Interest {
                key,
                change: Change::Last,
            } => {
                if let Some(sub) = self.subs.remove(&key) {
                    for (core, ready) in sub.waiters {
                        send_ready(&self.hub, self.src, core, ready, false);
                    }
                    if let Some(i) = add.iter().position(|(k, _)| *k == key) {
                        add.swap_remove(i);
                    } else if up {
                        if sub.active {
                            self.link.metrics.subscriptions.dec();
                        }
                        drop.push(key);
                    }
                }
            }
            Control::Interest { .. } => {}
            Control::WhenReady { key, core, ready } => {
                if !up {
                    send_ready(&self.hub, self.src, core, ready, false);
                    return;
                }
                if !self.subs.contains_key(&key) {
                    self.want(key.clone(), add);
                }
                if let Some(sub) = self.subs.get_mut(&key) {
                    match sub.active {
                        true => send_ready(&self.hub, self.src, core, ready, true),
                        false => sub.waiters.push((core, ready)),
                    }
                }
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
            },
        );
        add.push((key, gen));
    }

    /// The broker confirmed these subscriptions.
    fn confirmed(&mut self, keys: Keys) {
        for (key, gen) in keys {
            let Some(sub) = self.subs.get_mut(&key) else {
                continue;
            };
            if sub.gen != gen || sub.active {
                continue;
            }
            sub.active = true;
            self.link.metrics.subscriptions.inc();
            for (core, ready) in sub.waiters.drain(..) {
                send_ready(&self.hub, self.src, core, ready, true);
            }
        }
    }

    /// One pipeline with every publish of `batch`.
    fn publish(&self, conn: &MultiplexedConnection, batch: Vec<Publish>) -> Batch {
        let mut pipe = redis::pipe();
        let mut pending = Vec::with_capacity(batch.len());
        for p in batch {
            let Publish::One {
                src,
                msg,
                idempotency_key,
                done,
            } = p;
            let mut wire = Vec::new();
            msg.encode_wire(self.origin, &mut wire);
            let channel = msg.with_key(broker_channel);
            match idempotency_key {
                None => pipe.cmd("PUBLISH").arg(channel).arg(wire),
                Some(k) => {
                    let key = msg.with_key(|r| format!("{IDEMPOTENCY_PREFIX}{r} {k}"));
                    pipe.cmd("EVAL")
                        .arg(IDEMPOTENT_PUBLISH)
                        .arg(1)
                        .arg(key)
                        .arg(self.window_ms)
                        .arg(channel)
                        .arg(wire)
                }
            };
            pending.push((src, done));
        }
        let mut conn = conn.clone();
        Box::pin(async move {
            let sent = tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async(&mut conn)).await;
            let result = match sent {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(e)) => Err(format!("publishing: {e}")),
                Err(_) => Err(format!("no answer to a publish within {COMMAND_TIMEOUT:?}")),
            };
            (pending, result)
        })
    }

    /// Answers the publishers of a batch; an error takes the link down.
    fn published(
        &self,
        pending: Vec<Pending>,
        result: Result<Vec<redis::Value>, String>,
    ) -> Result<(), String> {
        let values = match result {
            Ok(v) => v,
            Err(why) => {
                for (src, done) in pending {
                    self.refuse(src, done);
                }
                return Err(why);
            }
        };
        for (i, (src, done)) in pending.into_iter().enumerate() {
            let duplicate = matches!(values.get(i), Some(redis::Value::Int(-1)));
            self.link.metrics.published.inc();
            if let Some(done) = done {
                let outcome = Outcome {
                    duplicate,
                    ..Outcome::default()
                };
                let task = Box::new(move |c: &crate::engine::core::Core| done(c, &outcome));
                self.hub.bus.send(self.src, src, Envelope::Run(task));
            }
        }
        Ok(())
    }
}

fn send_ready(hub: &Hub, src: usize, core: usize, ready: Ready, ok: bool) {
    let task = Box::new(move |c: &crate::engine::core::Core| ready(c, ok));
    hub.bus.send(src, core, Envelope::Run(task));
}

fn subscribe(sink: &PubSubSink, keys: Keys) -> Boxed<(Keys, bool)> {
    let mut sink = sink.clone();
    Box::pin(async move {
        let channels: Vec<String> = keys.iter().map(|(k, _)| broker_channel(k)).collect();
        let done = tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&channels)).await;
        (keys, matches!(done, Ok(Ok(()))))
    })
}

fn unsubscribe(sink: &PubSubSink, keys: Vec<Box<str>>) -> Boxed<bool> {
    let mut sink = sink.clone();
    Box::pin(async move {
        let channels: Vec<String> = keys.iter().map(|k| broker_channel(k)).collect();
        let done = tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(&channels)).await;
        matches!(done, Ok(Ok(())))
    })
}

/// Pings both connections: a broker that stopped answering (a partition
/// drops packets without closing anything) is found within
/// `PING_EVERY + COMMAND_TIMEOUT`.
fn ping_both(conn: &MultiplexedConnection, sink: &PubSubSink) -> Boxed<Result<(), String>> {
    let (mut conn, mut sink) = (conn.clone(), sink.clone());
    Box::pin(async move {
        let both = async {
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            sink.ping::<redis::Value>().await?;
            Ok::<_, redis::RedisError>(())
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, both).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("ping: {e}")),
            Err(_) => Err(format!("no answer to a ping within {COMMAND_TIMEOUT:?}")),
        }
    })
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
    fn broker_channels_and_jitter() {
        assert_eq!(broker_channel("news"), "herald:news");
        assert_eq!(broker_channel("3#room"), "herald:3#room");
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(1000));
            assert!(j >= Duration::from_millis(750) && j <= Duration::from_millis(1250));
        }
        assert_ne!(origin_tag(), origin_tag());
    }
}
