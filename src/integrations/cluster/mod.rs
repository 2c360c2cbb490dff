//! A node's link to its cluster (`BROKER_URL=redis://…` or `nats://…`):
//! the engine's [`Broker`].
//!
//! The link runs on a thread of its own, with a single-threaded tokio
//! runtime and the broker's client crate. No reactor ever waits on it: the
//! cores hand it commands through unbounded queues ([`Cluster`], the
//! front every core holds), and it hands them messages (and the answers
//! they wait for) through the engine's bus, as one more source.
//!
//! What does not depend on the broker lives here, in `Relay`: which
//! channels the node is subscribed to and who waits for them, messages
//! held while a channel's place is read, catch-up after the link was
//! down, and the presence roster's events. The brokers themselves:
//!
//! - [`redis`]: Redis or Valkey; one order per channel because Redis runs
//!   one command at a time; history in streams, numbered by a script.
//! - `nats`: NATS with JetStream; one order per channel because every
//!   publish goes through a stream, which republishes it in its order;
//!   history in the same streams.
//!
//! Both give the same guarantees: one order per channel on every node,
//! offsets given once for the cluster, exact recovery on any node,
//! interest-driven subscriptions confirmed before a client's
//! `subscribed`, errors (never silent drops) while the link is down, and
//! presence that every node applies in one order.

mod nats;
pub mod redis;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::metrics::BrokerMetrics;
use crate::config::BrokerUrl;
use crate::engine::core::{
    Broker, ClusterMembers, Core, Done, Envelope, Hub, Join, Placed, ReadHistory, Ready,
};
use crate::engine::history::{HistoryRead, Keep, Outcome, Page, Since, META_TTL_MS};
use crate::engine::interest::Change;
use crate::engine::message::Message;
use crate::engine::roster::{Event, Transition};

/// How long a connection attempt, a batch of publishes, a subscription,
/// a read or a ping may take before the link is declared down.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the link is pinged.
const PING_EVERY: Duration = Duration::from_millis(1000);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most publishes in one batch.
const MAX_BATCH: usize = 1024;
/// Publishes waiting for the broker past which publishers pause reading
/// (the queue from the cores is unbounded; this bounds it).
const QUEUE_LIMIT: usize = 65_536;
/// Most channels in one subscription request.
const SUBSCRIBE_CHUNK: usize = 1024;
/// How long a node's heartbeat lasts: a node silent this long is gone.
const ALIVE_MS: u64 = 3000;

/// Why the link could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("BROKER_URL {url}: {reason}")]
    Url { url: String, reason: String },
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
    Read(HistoryAsk),
}

struct JoinAsk {
    keep: Keep,
    since: Option<Since>,
    core: usize,
    placed: Placed,
}

/// A history read (`history` op, `GET /history`), for the broker.
struct HistoryAsk {
    key: Box<str>,
    keep: Keep,
    since: Option<Since>,
    limit: usize,
    core: usize,
    read: ReadHistory,
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

/// The queues' far ends, for the broker thread.
struct Queues {
    publish_rx: mpsc::UnboundedReceiver<Publish>,
    control_rx: mpsc::UnboundedReceiver<Control>,
    events_rx: mpsc::UnboundedReceiver<Event>,
}

/// The link's thread, over one broker or the other.
enum Backend {
    Redis(Box<redis::Node>),
    Nats(Box<nats::Node>),
}

/// One broker's connection, as [`run`] drives it.
trait Connect {
    type Session;
    fn parts(&mut self) -> (&mut Relay, &mut Queues);
    /// Connects (within a bounded time), or says why not.
    async fn connect(&self) -> Result<Self::Session, String>;
    /// Serves one connection until it fails; returns why. Whatever was
    /// out at the broker then is answered as failed.
    async fn serve(&mut self, s: Self::Session) -> String;
}

/// The link's thread: connects, serves until the link fails, then waits
/// (refusing what the cores ask meanwhile) and connects again, with a
/// jittered backoff, until the node stops.
async fn run<N: Connect>(mut node: N) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let reason = match node.connect().await {
            Ok(session) => {
                backoff = BACKOFF_MIN;
                let (relay, _) = node.parts();
                relay.link.metrics.connects.inc();
                tracing::info!(node = %relay.node_id, "cluster broker {} connected", relay.address);
                node.serve(session).await
            }
            Err(e) => e,
        };
        let (relay, queues) = node.parts();
        relay.went_down(reason);
        let until = tokio::time::Instant::now() + jitter(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                Some(p) = queues.publish_rx.recv() => {
                    relay.link.taken(1);
                    relay.refuse(p.src, p.done)
                }
                // Announced again in full on the next connection.
                Some(_) = queues.events_rx.recv() => {}
                Some(c) = queues.control_rx.recv() => relay.refuse_control(c),
                else => return,
            }
        }
    }
}

/// `first` and what else waits in `rx`, up to `max`: one batch.
fn batch<T>(first: T, rx: &mut mpsc::UnboundedReceiver<T>, max: usize) -> Vec<T> {
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(t) => batch.push(t),
            Err(_) => break,
        }
    }
    batch
}

/// What a burst of the cores' commands asks of the broker.
#[derive(Default)]
struct Changes {
    /// Channels to subscribe to, and to unsubscribe from.
    add: Keys,
    drop: Vec<Box<str>>,
    /// Channels' places to read (their messages already held).
    places: Vec<(Box<str>, Purpose)>,
    /// History reads.
    reads: Vec<HistoryAsk>,
}

/// The engine's [`Broker`]: what the cores hold of the link.
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
        let relay = Relay {
            hub: hub.clone(),
            src: hub.outside_source(),
            origin,
            me: me.clone(),
            members: members.clone(),
            link: link.clone(),
            node_id: node_id.to_string(),
            address: url.redacted(),
            window_ms: idempotency_window_ms.max(1),
            snapshot_pending: false,
            control_held: Vec::new(),
            subs: HashMap::new(),
            held: HashMap::new(),
            next_gen: 0,
        };
        let queues = Queues {
            publish_rx,
            control_rx,
            events_rx,
        };
        let bad = |reason: String| ClusterError::Url {
            url: url.redacted(),
            reason,
        };
        let backend = match url {
            BrokerUrl::Redis(address) => Backend::Redis(Box::new(
                redis::Node::new(address, relay, queues).map_err(bad)?,
            )),
            BrokerUrl::Nats(address) => Backend::Nats(Box::new(
                nats::Node::new(address, relay, queues).map_err(bad)?,
            )),
        };
        std::thread::Builder::new()
            .name("herald-broker".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match (rt, backend) {
                    (Ok(rt), Backend::Redis(node)) => rt.block_on(run(*node)),
                    (Ok(rt), Backend::Nats(node)) => rt.block_on(run(*node)),
                    (Err(e), _) => tracing::error!("cluster broker thread: {e}"),
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
                self.run_on(src, Box::new(move |c| done(c, &Outcome::unavailable())));
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
        let asked = Control::Read(HistoryAsk {
            key: key.into(),
            keep,
            since,
            limit,
            core,
            read,
        });
        if let Err(mpsc::error::SendError(Control::Read(ask))) = self.control.send(asked) {
            let read = ask.read;
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

/// A random tag naming this process in the messages it publishes.
/// (1 to 2^31 - 1, so that it fits in a Pusher socket id).
pub(crate) fn origin_tag() -> u64 {
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

/// `d` plus or minus a quarter, so that nodes do not reconnect in step.
fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = match getrandom::fill(&mut b) {
        Ok(()) => u16::from_le_bytes(b) as f64 / 65535.0,
        Err(_) => 0.5,
    };
    d.mul_f64(0.75 + r / 2.0)
}

/// How long a channel's epoch and top offset outlive its last message.
fn meta_ttl_ms(keep: Keep) -> u64 {
    META_TTL_MS.max(keep.ttl_ms.saturating_mul(2))
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
    /// The link was lost while this subscription had a place: its
    /// messages are held until the catch-up read is out.
    resuming: bool,
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

/// Channels (with the request generation) in one subscription request.
type Keys = Vec<(Box<str>, u64)>;

/// Why a channel's place is read.
enum Purpose {
    /// A subscription's place (and what it replays).
    Join(JoinAsk),
    /// What the node missed after this place while the link was down.
    CatchUp(Box<str>, u64, Keep),
}

/// A history read: epoch, top offset, and (offset, message) entries,
/// oldest first.
type Entries = (Arc<str>, u64, Vec<(u64, Bytes)>);

/// The broker-independent half of the link's thread: the node's broker
/// subscriptions, what waits for them, held messages and the roster.
struct Relay {
    hub: Arc<Hub>,
    src: usize,
    origin: u64,
    /// This node's name among the cluster's members.
    me: Box<str>,
    members: Arc<OnceLock<Arc<dyn ClusterMembers>>>,
    link: Arc<Link>,
    node_id: String,
    address: String,
    window_ms: u64,
    /// The other nodes' presence is being read: control events wait.
    snapshot_pending: bool,
    control_held: Vec<Event>,
    subs: HashMap<Box<str>, Sub>,
    held: HashMap<Box<str>, Held>,
    next_gen: u64,
}

impl Relay {
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
            self.run_on(src, Box::new(move |c| done(c, &Outcome::unavailable())));
        }
    }

    fn run_on(&self, core: usize, task: Box<dyn FnOnce(&Core) + Send>) {
        self.hub.bus.send(self.src, core, Envelope::Run(task));
    }

    /// Answers a history read.
    fn answer_read(&self, core: usize, read: ReadHistory, answer: HistoryRead) {
        self.run_on(core, Box::new(move |c| read(c, answer)));
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
        for (key, sub) in self.subs.iter_mut() {
            if sub.last.is_some() {
                sub.resuming = true;
                self.held.entry(key.clone()).or_default().reads += 1;
            }
        }
    }

    /// Answers what the cores asked while the link is down.
    fn refuse_control(&mut self, c: Control) {
        match c {
            Control::WhenReady { core, ready, .. } => {
                send_ready(&self.hub, self.src, core, ready, false)
            }
            Control::Join { ask, .. } => fail_waiter(&self.hub, self.src, Waiter::Join(ask)),
            Control::Read(ask) => self.answer_read(ask.core, ask.read, HistoryRead::Unavailable),
            c @ Control::Interest { .. } => {
                self.control(c, false, &mut Vec::new(), &mut Vec::new(), &mut Vec::new());
            }
        }
    }

    /// Applies one command of the cores while connected (or, with
    /// `connected` false, an interest change while down): channels to
    /// (un)subscribe go to `add` and `drop`, places to read to `reads`
    /// (already holding their channels); a history read is handed back.
    fn control(
        &mut self,
        c: Control,
        connected: bool,
        add: &mut Keys,
        drop: &mut Vec<Box<str>>,
        reads: &mut Vec<(Box<str>, Purpose)>,
    ) -> Option<HistoryAsk> {
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
                    } else if connected {
                        if sub.active {
                            self.link.metrics.subscriptions.dec();
                        }
                        drop.push(key);
                    }
                }
            }
            Control::Interest { .. } => {}
            Control::WhenReady { key, core, ready } => {
                self.want(key.clone(), add);
                if let Some(sub) = self.subs.get_mut(&key) {
                    match sub.active {
                        true => send_ready(&self.hub, self.src, core, ready, true),
                        false => sub.waiters.push(Waiter::Ready(core, ready)),
                    }
                }
            }
            Control::Join { key, ask } => {
                self.want(key.clone(), add);
                let active = self.subs.get(&key).is_some_and(|s| s.active);
                match active {
                    true => self.reading(key, Purpose::Join(ask), reads),
                    false => {
                        if let Some(sub) = self.subs.get_mut(&key) {
                            sub.waiters.push(Waiter::Join(ask));
                        }
                    }
                }
            }
            Control::Read(ask) => return Some(ask),
        }
        None
    }

    /// Applies `first` and every command waiting behind it.
    fn controls(&mut self, first: Control, rx: &mut mpsc::UnboundedReceiver<Control>) -> Changes {
        let mut c = Changes::default();
        for cmd in batch(first, rx, usize::MAX) {
            if let Some(ask) = self.control(cmd, true, &mut c.add, &mut c.drop, &mut c.places) {
                c.reads.push(ask);
            }
        }
        c
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
                resuming: false,
            },
        );
        add.push((key, gen));
    }

    /// Holds `key`'s messages for a read of its place, to be made.
    fn reading(&mut self, key: Box<str>, why: Purpose, reads: &mut Vec<(Box<str>, Purpose)>) {
        self.held.entry(key.clone()).or_default().reads += 1;
        reads.push((key, why));
    }

    /// The broker confirmed these subscriptions: their waiters are
    /// answered; places to read go to `reads`.
    fn confirmed(&mut self, keys: Keys, reads: &mut Vec<(Box<str>, Purpose)>) {
        for (key, gen) in keys {
            let Some(sub) = self.subs.get_mut(&key) else {
                continue;
            };
            if sub.gen != gen || sub.active {
                continue;
            }
            sub.active = true;
            self.link.metrics.subscriptions.inc();
            let resumed = std::mem::take(&mut sub.resuming);
            if let (true, Some((epoch, offset))) = (resumed, sub.last.clone()) {
                // Subscribed again after the link was down.
                if let Some(keep) = namespace_keep(&self.hub, &key) {
                    self.reading(key.clone(), Purpose::CatchUp(epoch, offset, keep), reads);
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
                    Waiter::Join(ask) => self.reading(key.clone(), Purpose::Join(ask), reads),
                }
            }
        }
    }

    /// A message from the broker (`wire`, with its place when it has
    /// one): to the cores with subscribers, or held while a read of its
    /// channel's place is out.
    fn arrived(&mut self, wire: Bytes, place: Option<(&str, u64)>) {
        self.link.metrics.received.inc();
        let mut msg = match Message::decode_wire(wire, self.origin) {
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

    /// The answer to a read of a channel's place. For a subscription: the
    /// messages held meanwhile that it covers go first (the subscriber is
    /// not there yet), then the subscription, then the newer ones. For a
    /// catch-up: what the node missed, then the newer held ones; when what
    /// was missed is gone, the channel's subscribers here are closed, to
    /// come back and recover (or learn they cannot). An error takes the
    /// link down.
    fn placed(
        &mut self,
        key: Box<str>,
        why: Purpose,
        answer: Result<Entries, String>,
    ) -> Result<(), String> {
        let namespace = namespace_of(&key);
        let result = match why {
            Purpose::Join(ask) => {
                let join = answer.and_then(|entries| {
                    self.join_of(entries, ask.since.as_ref(), namespace)
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
            Purpose::CatchUp(epoch, offset, _) => match answer {
                Err(why) => Err(why),
                Ok((e, top, entries)) => {
                    let complete = *e == *epoch
                        && top >= offset
                        && entries.len() as u64 == top - offset
                        && entries
                            .iter()
                            .enumerate()
                            .all(|(i, (o, _))| *o == offset + 1 + i as u64);
                    match complete {
                        true => {
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
                        }
                        false => {
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
                        }
                    }
                    Ok(())
                }
            },
        };
        self.unhold(&key);
        result
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
        // A subscription not (yet, or again) confirmed has no place: what
        // comes meanwhile is from the one dropped before it.
        let Some(sub) = self.subs.get_mut(key).filter(|s| s.active) else {
            return;
        };
        match &mut sub.last {
            Some((e, o)) if **e == *epoch => *o = (*o).max(offset),
            last => *last = Some((epoch.into(), offset)),
        }
    }

    /// A read's answer as a subscription's place.
    fn join_of(&self, entries: Entries, since: Option<&Since>, namespace: u16) -> Option<Join> {
        let (epoch, top, entries) = entries;
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
                // What the connection's send queue holds, at most (a
                // single message always fits).
                let bytes: usize = entries.iter().map(|(_, wire)| wire.len()).sum();
                let fits = entries.len() <= 1 || bytes <= self.hub.history.recover_bytes;
                match complete && fits {
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
            paged_to: None,
        })
    }

    /// A read's answer as a page.
    fn page(&self, entries: Entries, namespace: u16) -> Option<Page> {
        let (epoch, top, entries) = entries;
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

    /// A presence event in the cluster's order: applied (held while the
    /// snapshot is read), and acted on when this node decided it.
    fn control_event(&mut self, e: Event) {
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

    /// Once a second: this node's subscription counts that changed go out.
    fn tick(&self) {
        if let Some(members) = self.members.get() {
            members.report_counts();
        }
    }

    /// Every node's presence, read where the control events start: the
    /// roster restarts from it (`snapshot`), the events held meanwhile
    /// follow (they are idempotent), then this node announces what it
    /// holds.
    fn restart_roster(&mut self, snapshot: Vec<Event>) {
        self.snapshot_pending = false;
        let held = std::mem::take(&mut self.control_held);
        let Some(members) = self.members.get().cloned() else {
            return;
        };
        members.clear();
        for e in &snapshot {
            // What already was: nothing to act on.
            let _ = members.apply(e);
        }
        for e in &held {
            self.apply_event(e);
        }
        members.announce_state();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_jitter() {
        assert_eq!(namespace_of("3#room"), 3);
        assert_eq!(namespace_of("news"), 0);
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(1000));
            assert!(j >= Duration::from_millis(750) && j <= Duration::from_millis(1250));
        }
        assert_ne!(origin_tag(), origin_tag());
    }

    fn test_link() -> Link {
        Link {
            up: AtomicBool::new(true),
            reason: Mutex::new(String::new()),
            metrics: crate::integrations::metrics::Metrics::new(1).broker.clone(),
            queued: AtomicUsize::new(0),
            waiting: Mutex::new(Vec::new()),
        }
    }

    /// A relay for one core, keeping history of channel `live`.
    fn test_relay() -> Relay {
        let history = crate::engine::core::HistorySettings {
            rules: crate::engine::history::Rules::parse("live=100/1h").unwrap(),
            ..Default::default()
        };
        let hub = Arc::new(Hub::new(1, 1024, &[]).with_history(history));
        Relay {
            src: hub.outside_source(),
            hub,
            origin: 1,
            me: "a:1".into(),
            members: Arc::default(),
            link: Arc::new(test_link()),
            node_id: "a".into(),
            address: "test".into(),
            window_ms: 1,
            snapshot_pending: false,
            control_held: Vec::new(),
            subs: HashMap::new(),
            held: HashMap::new(),
            next_gen: 0,
        }
    }

    /// A message of `live` as the broker carries it.
    fn wire() -> Bytes {
        let frame = Bytes::from_static(b"[live|1]");
        let m = Message::new(
            frame,
            crate::engine::message::Encoding(0),
            1..5,
            6..7,
            crate::engine::message::PayloadKind::Json,
            0,
        );
        let mut out = Vec::new();
        m.encode_wire(2, &mut out);
        out.into()
    }

    fn join(relay: &mut Relay, since: u64) {
        let ask = JoinAsk {
            keep: Keep {
                size: 100,
                ttl_ms: 3_600_000,
            },
            since: Some(Since {
                epoch: "e".into(),
                offset: since,
            }),
            core: 0,
            placed: Box::new(|_, _| {}),
        };
        let c = Control::Join {
            key: "live".into(),
            ask,
        };
        let (mut add, mut drop, mut reads) = (Vec::new(), Vec::new(), Vec::new());
        relay.control(c, true, &mut add, &mut drop, &mut reads);
    }

    fn holds(relay: &Relay) -> (usize, usize) {
        relay
            .held
            .get("live")
            .map_or((0, 0), |h| (h.reads, h.queue.len()))
    }

    /// Messages still coming from a subscription the node dropped give the
    /// new one no place: it is not a resumption, and each join it waits
    /// for holds the channel until that join is placed.
    #[test]
    fn a_dropped_subscriptions_stragglers_leave_every_join_held() {
        let mut r = test_relay();
        let (mut add, mut reads) = (Vec::new(), Vec::new());
        r.want("live".into(), &mut add);
        r.arrived(wire(), Some(("e", 5)));
        assert!(r.subs["live"].last.is_none());
        join(&mut r, 5);
        join(&mut r, 5);
        r.confirmed(add, &mut reads);
        assert_eq!(reads.len(), 2, "two joins, no catch-up");
        assert!(reads.iter().all(|(_, p)| matches!(p, Purpose::Join(_))));
        assert_eq!(holds(&r), (2, 0));
        r.arrived(wire(), Some(("e", 6)));
        let mut reads = reads.into_iter();
        let (key, first) = reads.next().unwrap();
        r.placed(key, first, Ok(("e".into(), 5, Vec::new())))
            .unwrap();
        assert_eq!(holds(&r), (1, 1), "the second join still holds 6");
        let (key, second) = reads.next().unwrap();
        r.placed(key, second, Ok(("e".into(), 5, Vec::new())))
            .unwrap();
        assert_eq!(holds(&r), (0, 0));
        assert_eq!(r.subs["live"].last.as_ref().map(|l| l.1), Some(6));
    }

    /// After the link's loss a channel with a place is held from the loss
    /// until its catch-up read is out, then by that read alone.
    #[test]
    fn a_lost_link_holds_each_channel_once_until_its_catch_up() {
        let mut r = test_relay();
        let (mut add, mut reads) = (Vec::new(), Vec::new());
        r.want("live".into(), &mut add);
        r.confirmed(add, &mut reads);
        r.arrived(wire(), Some(("e", 9)));
        assert_eq!(r.subs["live"].last.as_ref().map(|l| l.1), Some(9));
        r.went_down("test".into());
        r.went_down("again".into());
        assert_eq!(holds(&r), (1, 0), "one hold, however often the link fails");
        r.arrived(wire(), Some(("e", 10)));
        join(&mut r, 9);
        let gen = r.subs["live"].gen;
        let mut reads = Vec::new();
        r.confirmed(vec![("live".into(), gen)], &mut reads);
        assert!(matches!(reads[0].1, Purpose::CatchUp(_, 9, _)));
        assert!(matches!(reads[1].1, Purpose::Join(_)));
        assert_eq!(holds(&r).0, 2, "the catch-up and the join");
        assert!(!r.subs["live"].resuming);
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
            queued: AtomicUsize::new(QUEUE_LIMIT),
            ..test_link()
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
}
