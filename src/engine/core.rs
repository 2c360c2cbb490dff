//! One core's engine: its [`Shard`], and the publish path that ties it to
//! the other cores through the node-wide [`Hub`] (the interest map and the
//! bus).
//!
//! Every channel has an **owner** core, chosen by its routing hash, that
//! puts its messages in one order: [`Core::publish`] hands a message to
//! its channel's owner (a refcount across the bus, or nothing when the
//! publisher's core is the owner); the owner (`Core::sequence`) numbers
//! it if the channel keeps history, stores its frame, then fans it out:
//! a refcounted clone to each other interested core through the bus, then
//! its own subscribers. Each pair of cores is one FIFO queue, so every
//! core delivers a channel's messages in the owner's order, and so does
//! every subscriber. [`Core::drain`] is the other cores' half.
//!
//! The same queues carry work to run on another core ([`Envelope::Run`]),
//! in order with the messages: a subscription with history asks the owner
//! for the channel's position (and what to replay), and the answer comes
//! back behind every message numbered before it and ahead of every one
//! after, which is what makes recovery exact ([`Core::join`]).

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;

use super::bus::Bus;
use super::handoff::{Forwarded, Handoff};
use super::history::{
    HistoryRead, HistorySink, Idempotency, Keep, Outcome, Place, Remembered, Restored, Rules,
    Since, Store, Stream,
};
use super::interest::{Change, Interest};
use super::message::{Encoder, Encoding, Message, MAX_KEY};
use super::personal::{Cursor, Durable, NotFollowed};
use super::roster::{Event, Transition};
use super::shard::{Limits, Shard, SubscribeError};
use super::stats::CoreStats;

/// Work for a core, run there in order with its messages.
pub type Task = Box<dyn FnOnce(&Core) + Send>;

/// Runs on the channel's owner once a publish is sequenced (or found to
/// repeat an idempotency key).
pub type Done = Box<dyn FnOnce(&Core, &Outcome) + Send>;

/// Runs on the subscriber's core when a subscription with history is
/// complete; its frames are queued before any later message.
pub type Joined = Box<dyn FnOnce(&Core, Result<Join, SubscribeError>) + Send>;

/// Runs with what a history read found (on the channel's owner, or on
/// the reader's core in a cluster).
pub type ReadHistory = Box<dyn FnOnce(&Core, HistoryRead) + Send>;

/// Runs on the subscriber's core with a subscription's place in the
/// cluster's history of the channel (`None`: the broker is unreachable).
pub type Placed = Box<dyn FnOnce(&Core, Option<Join>) + Send>;

/// Runs on the subscriber's core once a subscription took effect (or
/// was refused).
pub type Subscribed = Box<dyn FnOnce(&Core, Result<(), SubscribeError>) + Send>;

/// Runs on a core once the node receives a channel's messages from the
/// other nodes of its cluster (`true`), or once that failed (`false`).
pub type Ready = Box<dyn FnOnce(&Core, bool) + Send>;

/// What a cluster's link needs of a node's presence (who is on which
/// channel, [`super::roster`]): the ordered events of every node are
/// applied to it, and it acts on the transitions this node decided.
pub trait ClusterMembers: Send + Sync {
    /// Applies an event in the cluster's order; returns the transitions
    /// this node must act on (those it decided).
    fn apply(&self, e: &Event) -> Vec<Transition>;
    /// Announces everything this node holds now (when it (re)connects),
    /// in order with its other announcements.
    fn announce_state(&self);
    /// Forgets the other nodes (before loading a snapshot of them).
    fn clear(&self);
    /// Announces the subscription counts that changed since the last
    /// call (called about once a second: counts are coalesced).
    fn report_counts(&self);
    /// Acts on a transition this node decided (webhooks, member events),
    /// on a core.
    fn act(&self, core: &Core, t: Transition);
}

/// A cluster's link to the other nodes (`BROKER_URL`), as the engine
/// sees it. In a cluster every publish goes through it, this node's too,
/// and comes back (through [`Hub::arrive`]) on every node with subscribers
/// of its channel: the broker's order is the channel's one order.
pub trait Broker: Send + Sync {
    /// Sends `msg` (published on core `src`) to every node with
    /// subscribers of its channel. `done` runs on core `src` once the
    /// broker took it (or could not).
    fn publish(
        &self,
        src: usize,
        msg: Arc<Message>,
        idempotency_key: Option<Box<str>>,
        done: Option<Done>,
    );
    /// The node's first or last subscriber of routing key `key`: the
    /// node's broker subscriptions follow these. Called under the interest
    /// map's lock of the key, so never in the wrong order.
    fn interest(&self, key: &str, change: Change);
    /// Runs `ready` on core `core` once this node receives `key`'s
    /// messages from the cluster (at once if it does already).
    fn when_ready(&self, key: &str, core: usize, ready: Ready);
    /// Like `when_ready` for a channel that keeps history (`keep`) in
    /// the broker: `placed` runs on core `core` with the subscription's
    /// place (and, with `since`, what to replay), once the node receives
    /// the channel, in order with its messages: what follows it on the
    /// core is newer than its `top`.
    fn join(&self, key: &str, keep: Keep, since: Option<Since>, core: usize, placed: Placed);
    /// Reads a page of `key`'s history from the broker; `read` runs on
    /// core `core`.
    fn read_history(
        &self,
        key: &str,
        keep: Keep,
        since: Option<Since>,
        limit: usize,
        core: usize,
        read: ReadHistory,
    );
    /// Why the node cannot reach its cluster now, if it cannot.
    fn unavailable(&self) -> Option<String>;
    /// Are so many publishes waiting for the broker that publishers must
    /// pause reading?
    fn congested(&self) -> bool;
    /// Ready once the broker's queue has room again (registers `cx`'s
    /// waker otherwise).
    fn poll_space(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()>;
    /// This node's name in the cluster (unique per process).
    fn node(&self) -> &str;
    /// This node's tag (nonzero, random per process): what messages name
    /// as the node where their exclusion applies.
    fn tag(&self) -> u32;
    /// Sends a presence event of this node to every node, in order.
    fn announce(&self, e: Event);
    /// The presence whose events this link carries (set once).
    fn attach_members(&self, members: Arc<dyn ClusterMembers>);
}

/// What runs with a channel's place now ([`Core::place_of`]).
pub type PlacedNow = Box<dyn FnOnce(&Core, Option<Cursor>) + Send>;

/// What crosses from one core to another.
pub enum Envelope {
    /// A sequenced message: deliver it to this core's subscribers.
    Deliver(Arc<Message>),
    /// A message for this core, its channel's owner, to sequence.
    Sequence(Arc<Message>),
    /// The same, with an idempotency key or work to run once sequenced.
    SequenceWith(Box<Publish>),
    /// Work to run on this core.
    Run(Task),
    /// A message a restart's new process numbered (at its place, if its
    /// channel keeps history), for this core, its channel's owner, to keep
    /// and fan out (see [`super::handoff`]).
    Replicate(Box<(Arc<Message>, Option<Place>)>),
}

/// A publish with more than its message.
pub struct Publish {
    pub msg: Arc<Message>,
    pub idempotency_key: Option<Box<str>>,
    pub done: Option<Done>,
}

/// How the channels of front-end namespaces (> 0) keep history: the
/// front-end says which channels keep what, and in which encoding their
/// frames are kept (as published: offsets are not shown in it).
#[derive(Clone, Copy)]
pub struct NamespacedHistory {
    pub keep: fn(&str) -> Option<Keep>,
    pub encoding: Encoding,
}

/// How channels keep history, node-wide.
pub struct HistorySettings {
    /// Channels of namespace 0 (herald's own).
    pub rules: Rules,
    /// Channels of the other namespaces.
    pub namespaced: Option<NamespacedHistory>,
    /// The encoding whose frames are stored (and carry offsets).
    pub encoding: Encoding,
    /// Most messages one recovery replays.
    pub recover_max: usize,
    /// Most bytes one recovery replays: what a connection's send queue
    /// holds (more would close it as a slow consumer at every try).
    pub recover_bytes: usize,
    /// How long an idempotency key is remembered, in milliseconds.
    pub idempotency_window_ms: u64,
    /// Where kept messages are also written (`HISTORY_DIR`).
    pub sink: Option<Arc<dyn HistorySink>>,
    /// History read back at start, by owner core; each core takes its own.
    pub restored: std::sync::Mutex<Vec<Vec<Restored>>>,
    /// Idempotency keys handed over by a restart's old process, by owner
    /// core.
    pub restored_keys: std::sync::Mutex<Vec<Vec<Remembered>>>,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            rules: Rules::default(),
            namespaced: None,
            encoding: Encoding(0),
            recover_max: 1000,
            recover_bytes: usize::MAX,
            idempotency_window_ms: 300_000,
            sink: None,
            restored: Default::default(),
            restored_keys: Default::default(),
        }
    }
}

/// A subscription's place in its channel's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub epoch: Arc<str>,
    /// The channel's newest offset when the subscription took effect:
    /// every message delivered after it has a larger one.
    pub top: u64,
    /// With `since`: whether everything after it is replayed.
    pub recovered: bool,
    /// Frames to send before anything live (offsets after `since` up to
    /// `top`), oldest first.
    pub replay: Vec<Bytes>,
    /// The newest kept frame, if any (what a cache channel replays).
    pub newest: Option<Bytes>,
    /// A user's catch-up too large for one go: `replay` is its oldest
    /// part, up to this offset, and the rest comes once the client has
    /// read it (see [`Core::follow_from`]).
    pub paged_to: Option<u64>,
}

/// What every core shares: which cores want which channels, and the
/// queues between them.
pub struct Hub {
    pub interest: Interest,
    pub bus: Arc<Bus<Envelope>>,
    /// The encoders of the node's front-ends, by encoding.
    pub encoders: &'static [Encoder],
    pub history: HistorySettings,
    /// The cluster's link, when the node is part of one.
    broker: std::sync::OnceLock<Arc<dyn Broker>>,
    /// A restart's hand-off between two processes, while one is under way.
    pub handoff: Handoff,
    /// Users' durable subscriptions (personal channels).
    pub durable: Arc<Durable>,
    cores: usize,
}

impl Hub {
    pub fn new(cores: usize, bus_capacity: usize, encoders: &'static [Encoder]) -> Hub {
        Hub {
            interest: Interest::new(),
            // One more source: a cluster's broker client.
            bus: Bus::with_sources(cores, cores + 1, bus_capacity),
            encoders,
            history: HistorySettings::default(),
            broker: std::sync::OnceLock::new(),
            handoff: Handoff::default(),
            durable: Arc::new(Durable::default()),
            cores,
        }
    }

    /// The same hub, with the users' durable subscriptions in `durable`.
    pub fn with_durable(mut self, durable: Arc<Durable>) -> Hub {
        self.durable = durable;
        self
    }

    /// Makes the node part of a cluster, before any subscriber or publish.
    pub fn join_cluster(&self, broker: Arc<dyn Broker>) {
        let b = broker.clone();
        self.interest
            .observe(Box::new(move |key, change| b.interest(key, change)));
        let _ = self.broker.set(broker);
    }

    /// The cluster's link, if the node is part of one.
    pub fn broker(&self) -> Option<&Arc<dyn Broker>> {
        self.broker.get()
    }

    /// How many cores the node has.
    pub fn cores(&self) -> usize {
        self.cores
    }

    /// The bus source of a thread that is not a core (a broker client).
    pub fn outside_source(&self) -> usize {
        self.cores
    }

    /// A message from the cluster (the broker client's thread, bus source
    /// `src`), already in its channel's order (and numbered, if its
    /// channel keeps history, which the broker does): to every core of
    /// this node with subscribers of its channel. Returns how many.
    pub fn arrive(&self, src: usize, msg: Arc<Message>) -> u32 {
        let interested = msg.with_key(|k| self.interest.cores_hashed(k, msg.hash()));
        let mut cores = interested;
        while cores != 0 {
            let dst = cores.trailing_zeros() as usize;
            cores &= cores - 1;
            self.bus.send(src, dst, Envelope::Deliver(msg.clone()));
        }
        interested.count_ones()
    }

    /// The same hub, keeping history as `history` says.
    pub fn with_history(mut self, history: HistorySettings) -> Hub {
        self.history = history;
        self
    }

    /// The encoding whose frames a channel of `namespace` keeps, and the
    /// one whose frames show offsets: the native encoding shows them; a
    /// namespace's is kept as published (offsets are not shown in it).
    pub fn history_encoding(&self, namespace: u16) -> (Encoding, Encoding) {
        match (namespace, self.history.namespaced) {
            (0, _) | (_, None) => (self.history.encoding, self.history.encoding),
            (_, Some(n)) => (n.encoding, Encoding(u8::MAX)),
        }
    }

    /// The core that sequences the channel with routing hash `hash`.
    pub fn owner(&self, hash: u64) -> usize {
        owner_of(hash, self.cores)
    }

    /// What `channel` of `namespace` keeps for users who follow it: at
    /// least what durable subscribers are kept.
    pub fn followed_keep(&self, namespace: u16, channel: &str) -> Keep {
        let least = self.durable.keep();
        self.keeps(namespace, channel)
            .map_or(least, |k| k.at_least(least))
    }

    /// What `channel` (its name, in `namespace`) keeps, if anything.
    pub fn keeps(&self, namespace: u16, channel: &str) -> Option<Keep> {
        self.kept(namespace, channel).map(|k| k.keep)
    }

    /// What `channel` keeps, and whether `HISTORY_DIR` keeps it too:
    /// herald's own channels, and a front-end's that users follow durably
    /// (a cache channel is in memory). One lookup of each kind.
    pub fn kept(&self, namespace: u16, channel: &str) -> Option<Kept> {
        let ruled = if namespace != 0 {
            self.history.namespaced.and_then(|n| (n.keep)(channel))
        } else if self.history.rules.is_empty() {
            None
        } else {
            self.history.rules.keep(channel)
        };
        let followed = self.durable.keeps(namespace, channel);
        Keep::widest(ruled, followed).map(|keep| Kept {
            keep,
            on_disk: namespace == 0 || followed.is_some(),
        })
    }
}

/// What a channel keeps ([`Hub::kept`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub keep: Keep,
    /// `HISTORY_DIR` keeps it too.
    pub on_disk: bool,
}

/// The core of `cores` that sequences the channel with routing hash
/// `hash`.
pub fn owner_of(hash: u64, cores: usize) -> usize {
    // The middle bits: tables use the low ones, the interest map's locks
    // the top ones.
    ((((hash >> 16) & 0xffff_ffff) * cores as u64) >> 32) as usize
}

/// One reactor's engine.
pub struct Core {
    pub id: usize,
    pub shard: RefCell<Shard>,
    pub stats: Arc<CoreStats>,
    pub hub: Arc<Hub>,
    /// Histories of the channels this core owns.
    pub history: RefCell<Store>,
    idempotency: RefCell<Idempotency>,
    /// Publishes forwarded to a restart's new process whose outcome the
    /// publisher waits for, by ticket.
    forwarded: RefCell<std::collections::HashMap<u64, Done>>,
    tickets: std::cell::Cell<u64>,
}

impl Core {
    pub fn new(id: usize, hub: Arc<Hub>, limits: Limits, stats: Arc<CoreStats>) -> Core {
        let now = (limits.clock)();
        let mut store = Store::default();
        let restored = hub
            .history
            .restored
            .lock()
            .ok()
            .and_then(|mut r| r.get_mut(id).map(std::mem::take))
            .unwrap_or_default();
        for r in restored {
            store.restore(r, now);
        }
        let mut idempotency = Idempotency::default();
        let keys = hub
            .history
            .restored_keys
            .lock()
            .ok()
            .and_then(|mut r| r.get_mut(id).map(std::mem::take))
            .unwrap_or_default();
        for k in keys {
            idempotency.restore(k);
        }
        let core = Core {
            id,
            shard: RefCell::new(Shard::new(id, limits, stats.clone(), hub.encoders)),
            stats,
            hub,
            history: RefCell::new(store),
            idempotency: RefCell::new(idempotency),
            forwarded: RefCell::default(),
            tickets: std::cell::Cell::new(0),
        };
        core.history_gauges(&core.history.borrow());
        core
    }

    /// Subscribes connection `key` to routing key `channel` (the interest
    /// map learns of it before this returns).
    pub fn subscribe(&self, key: usize, channel: &str) -> Result<(), SubscribeError> {
        let result = self
            .shard
            .borrow_mut()
            .subscribe(key, channel, &self.hub.interest);
        if result.is_ok() {
            seen("subscribe", channel, String::new);
        }
        result
    }

    /// Unsubscribes `key` from `channel`; false if it was not subscribed.
    pub fn unsubscribe(&self, key: usize, channel: &str) -> bool {
        let was = self
            .shard
            .borrow_mut()
            .unsubscribe(key, channel, &self.hub.interest);
        if was {
            seen("unsubscribe", channel, String::new);
        }
        was
    }

    /// Forgets a finished connection and its subscriptions; says how it
    /// ended.
    pub fn remove(&self, key: usize, gen: u64) -> Option<super::shard::Closed> {
        self.shard.borrow_mut().remove(key, gen, &self.hub.interest)
    }

    /// Is any queue towards another core full? Then publishers on this
    /// core must pause before decoding more.
    pub fn congested(&self) -> bool {
        self.hub.bus.congested(self.id) || self.hub.broker().is_some_and(|b| b.congested())
    }

    /// Waits until no queue towards another core (or the cluster's
    /// broker) is full.
    pub async fn wait_for_space(&self) {
        self.hub.bus.wait_for_space(self.id).await;
        if let Some(b) = self.hub.broker() {
            std::future::poll_fn(|cx| b.poll_space(cx)).await;
        }
    }

    /// Runs `task` on core `dst`: here and now if it is this one, else in
    /// order behind what this core already sent there.
    pub fn run_on(&self, dst: usize, task: Task) {
        if dst == self.id {
            task(self);
        } else {
            self.hub.bus.send(self.id, dst, Envelope::Run(task));
        }
    }

    /// Runs `task` on every core of the node, this one included (here at
    /// once, elsewhere in order with what each core receives).
    pub fn run_everywhere(&self, task: impl Fn(&Core) + Send + Sync + 'static) {
        let task = Arc::new(task);
        for dst in 0..self.hub.cores() {
            let t = task.clone();
            self.run_on(dst, Box::new(move |c: &Core| t(c)));
        }
    }

    /// Publishes `msg` to every subscriber of its channel but the local
    /// connection `except`. The caller has checked [`Core::congested`]
    /// before decoding the message.
    pub fn publish(&self, msg: Message, except: Option<usize>) {
        self.publish_with(msg, except, None, None);
    }

    /// [`Core::publish`] with an idempotency key, and `done` to run on the
    /// channel's owner with the outcome (offset, repeat).
    pub fn publish_with(
        &self,
        mut msg: Message,
        except: Option<usize>,
        idempotency_key: Option<Box<str>>,
        done: Option<Done>,
    ) {
        self.stats.publishes.inc();
        if let Some(ns) = self.stats.namespace(msg.namespace()) {
            ns.published.inc();
        }
        if super::watch::watch().on() {
            seen_publish(&msg);
        }
        if let Some(key) = except {
            let gen = self.shard.borrow().conn(key).map(|c| c.gen);
            if let Some(gen) = gen {
                msg.set_except(self.id as u16, key as u32, gen);
            }
        }
        if let Some(broker) = self.hub.broker() {
            broker.publish(self.id, Arc::new(msg), idempotency_key, done);
            return;
        }
        let owner = self.hub.owner(msg.hash());
        let msg = Arc::new(msg);
        if owner == self.id {
            self.sequence(msg, idempotency_key, done);
            return;
        }
        let envelope = match (idempotency_key, done) {
            (None, None) => Envelope::Sequence(msg),
            (idempotency_key, done) => Envelope::SequenceWith(Box::new(Publish {
                msg,
                idempotency_key,
                done,
            })),
        };
        self.hub.bus.send(self.id, owner, envelope);
    }

    /// On the channel's owner: drops a repeated idempotency key, numbers
    /// and stores the message if its channel keeps history, fans it out.
    fn sequence(
        &self,
        mut msg: Arc<Message>,
        idempotency_key: Option<Box<str>>,
        done: Option<Done>,
    ) {
        // A restart's old process: the new one numbers every channel now.
        if let Some(forward) = self.hub.handoff.forward() {
            let ticket = match done {
                Some(_) => {
                    self.tickets.set(self.tickets.get() + 1);
                    self.tickets.get()
                }
                None => 0,
            };
            match forward.forward(self.id, &msg, idempotency_key.as_deref(), ticket) {
                Forwarded::Sent => {
                    if let Some(done) = done {
                        self.forwarded.borrow_mut().insert(ticket, done);
                    }
                    return;
                }
                Forwarded::Refused => {
                    if let Some(done) = done {
                        done(self, &Outcome::unavailable());
                    }
                    return;
                }
                Forwarded::Gone => {}
            }
        }
        let now = || self.shard.borrow().now();
        let kept = match msg.is_transient() {
            false => self.hub.kept(msg.namespace(), msg.channel()),
            true => None,
        };
        let keep = kept.map(|k| k.keep);
        if keep.is_none() && idempotency_key.is_none() {
            // The common case: nothing to number, store or remember.
            self.hub.handoff.tap(&msg, None);
            self.fan_out(&msg);
            if let Some(done) = done {
                done(self, &Outcome::default());
            }
            return;
        }
        let mut buf = [0u8; MAX_KEY];
        let key = msg.key_in(&mut buf);
        if let Some(k) = &idempotency_key {
            let seen = self.idempotency.borrow_mut().check(key, k, now());
            if let Some(position) = seen {
                self.stats.idempotent_repeats.inc();
                if let Some(done) = done {
                    done(
                        self,
                        &Outcome {
                            position,
                            duplicate: true,
                            unavailable: false,
                        },
                    );
                }
                return;
            }
        }
        let position = keep.map(|keep| {
            let now = now();
            let (encoding, carried_by) = self.hub.history_encoding(msg.namespace());
            let m = Arc::get_mut(&mut msg).expect("a message is not shared before it is sequenced");
            let on_disk = kept.is_some_and(|k| k.on_disk);
            let sink = self.hub.history.sink.as_deref().filter(|_| on_disk);
            let mut store = self.history.borrow_mut();
            if sink.is_some_and(|s| s.lost(key)) {
                // Its stored history could not be written: a new epoch.
                store.restart(key, keep, now);
            }
            let encoders = self.hub.encoders;
            let (epoch, offset, frame) = store.append_with(key, keep, now, |next| {
                m.set_offset(next, carried_by);
                m.frame_for(encoding, encoders).unwrap_or_default()
            });
            if let Some(sink) = sink {
                sink.append(key, &epoch, offset, keep, &frame);
            }
            self.history_gauges(&store);
            (epoch, offset)
        });
        if let Some(k) = idempotency_key {
            let until = now().saturating_add(self.hub.history.idempotency_window_ms);
            self.idempotency
                .borrow_mut()
                .remember(key, &k, position.clone(), until);
        }
        self.hub.handoff.tap(&msg, position.as_ref());
        self.fan_out(&msg);
        if let Some(done) = done {
            done(
                self,
                &Outcome {
                    position,
                    duplicate: false,
                    unavailable: false,
                },
            );
        }
    }

    /// On the channel's owner in a restart's old process: keeps a message
    /// the new process numbered (at `place`) in this node's history, as a
    /// replica, and fans it out. Nothing is written to `HISTORY_DIR`,
    /// which is the new process's now.
    fn replicate(&self, msg: Arc<Message>, place: Option<Place>) {
        let keep = match msg.is_transient() {
            false => self.hub.keeps(msg.namespace(), msg.channel()),
            true => None,
        };
        if let (Some(keep), Some((epoch, offset))) = (keep, place) {
            let now = self.shard.borrow().now();
            let (encoding, _) = self.hub.history_encoding(msg.namespace());
            let frame = msg
                .frame_for(encoding, self.hub.encoders)
                .unwrap_or_default();
            let mut buf = [0u8; MAX_KEY];
            let key = msg.key_in(&mut buf);
            let mut store = self.history.borrow_mut();
            store.put(key, keep, (&epoch, offset), frame, now);
            self.history_gauges(&store);
        }
        self.fan_out(&msg);
    }

    /// The new process's outcome of a publish this core forwarded.
    pub fn answer_forwarded(&self, ticket: u64, outcome: &Outcome) {
        let done = self.forwarded.borrow_mut().remove(&ticket);
        if let Some(done) = done {
            done(self, outcome);
        }
    }

    /// The link to the new process is gone: every forwarded publish still
    /// waiting is told the node is unavailable.
    pub fn fail_forwarded(&self) {
        let waiting = std::mem::take(&mut *self.forwarded.borrow_mut());
        for (_, done) in waiting {
            done(self, &Outcome::unavailable());
        }
    }

    /// This core's history and idempotency keys as they are now, for a
    /// restart's new process (times on this core's clock, which is also
    /// returned).
    pub fn export_history(&self) -> (u64, Vec<Restored>, Vec<Remembered>) {
        let now = self.shard.borrow().now();
        let streams = self.history.borrow_mut().export(now);
        let keys = self.idempotency.borrow_mut().export(now);
        (now, streams, keys)
    }

    /// Hands a sequenced message to every other interested core, then to
    /// this core's subscribers.
    fn fan_out(&self, msg: &Arc<Message>) {
        let hash = msg.hash();
        let interested = msg.with_key(|k| self.hub.interest.cores_hashed(k, hash));
        let mut others = interested & !(1u64 << self.id);
        while others != 0 {
            let dst = others.trailing_zeros() as usize;
            others &= others - 1;
            self.hub
                .bus
                .send(self.id, dst, Envelope::Deliver(msg.clone()));
        }
        if interested & (1u64 << self.id) != 0 {
            self.deliver(msg);
        }
    }

    fn deliver(&self, msg: &Message) {
        let mut shard = self.shard.borrow_mut();
        let except = excluded(&shard, msg, self.id);
        let n = shard.deliver(msg, except);
        if let Some(ns) = self.stats.namespace(msg.namespace()) {
            ns.delivered.add(n as u64);
        }
    }

    /// Subscribes connection `key` to `channel`, which keeps history
    /// (`keep`): the channel's owner gives the subscription its place
    /// (epoch and top offset) and, with `since`, the frames to replay;
    /// `joined` runs here with them, and its frames go out before any
    /// message numbered after `top`. A connection already subscribed keeps
    /// its subscription; with `since` it is rebuilt behind the replay
    /// (nothing twice, nothing missed).
    pub fn join(
        &self,
        key: usize,
        channel: &str,
        keep: Keep,
        since: Option<Since>,
        joined: Joined,
    ) {
        self.join_with(key, channel, keep, since, None, joined);
    }

    /// [`Core::join`], and with `catch_up` (a most, and a budget of bytes)
    /// the replay is what is still kept after `since`, even when some of
    /// it is gone (the newest `most` of it, cut at the budget): how a
    /// user's connection catches up with what it missed offline. In a
    /// cluster the broker replays as for a recovery.
    fn join_with(
        &self,
        key: usize,
        channel: &str,
        keep: Keep,
        since: Option<Since>,
        catch_up: Option<(usize, Option<usize>)>,
        joined: Joined,
    ) {
        let (gen, already) = {
            let shard = self.shard.borrow();
            let Some(conn) = shard.conn(key) else {
                return;
            };
            (conn.gen, shard.is_subscribed(key, channel))
        };
        if !already && self.shard.borrow().at_subscription_limit(key) {
            let max = self.shard.borrow().max_subscriptions();
            joined(self, Err(SubscribeError::TooMany(max)));
            return;
        }
        // Subscribed already and nothing to replay: the subscription stays
        // (no message is missed); the owner's answer comes behind every
        // message it sequenced before, so what follows `joined` is newer.
        // With `since`, the subscription is taken down and rebuilt behind
        // the replay, which covers what comes meanwhile.
        if !(already && since.is_none()) {
            let mut shard = self.shard.borrow_mut();
            shard.reserve(channel, &self.hub.interest);
            if already {
                shard.unsubscribe(key, channel, &self.hub.interest);
            }
        }
        let here = self.id;
        let name: Box<str> = channel.into();
        let recover_max = self.hub.history.recover_max;
        let budget = self.hub.history.recover_bytes;
        // The broker reads the place itself; the owner path needs `since`.
        let since_copy = self.hub.broker().and(since.clone());
        let ask_owner = move |core: &Core, channel: Box<str>, joined: Joined| {
            let place = move |stream: &Stream| match catch_up {
                None => position(stream, since.as_ref(), recover_max, budget),
                Some((max, budget)) => catching_up(stream, since.as_ref(), max, budget),
            };
            core.on_stream(channel.clone(), keep, place, move |owner, join| {
                owner.run_on(
                    here,
                    Box::new(move |core: &Core| {
                        if let Some(result) = core.complete_subscribe(key, gen, &channel) {
                            joined(core, result.map(|()| join));
                        }
                    }),
                );
            })
        };
        match self.hub.broker() {
            None => ask_owner(self, name, joined),
            // In a cluster the history is the broker's.
            Some(broker) => broker.join(
                channel,
                keep,
                since_copy,
                here,
                Box::new(move |core: &Core, placed| match placed {
                    Some(join) => {
                        if let Some(result) = core.complete_subscribe(key, gen, &name) {
                            joined(core, result.map(|()| join));
                        }
                    }
                    None => {
                        if core.give_up_subscribe(key, gen, &name) {
                            joined(core, Err(SubscribeError::Unavailable));
                        }
                    }
                }),
            ),
        }
    }

    /// Connection `key` follows `channel` (routing key `route`, keeping
    /// `keep`) for the user it follows ([`Shard::follow`]), from `cursor`:
    /// it is subscribed, `joined` gets what it missed (and queues it), and
    /// an ack ping goes behind that; later messages are acknowledged as
    /// they come ([`Core::pong`]).
    fn follow(
        &self,
        key: usize,
        route: &str,
        channel: &str,
        keep: Keep,
        cursor: Option<Cursor>,
        joined: Joined,
    ) {
        let direct = self.shard.borrow().is_subscribed(key, route);
        let since = cursor.map(|c| Since {
            epoch: (*c.epoch).into(),
            offset: c.offset,
        });
        // What the user missed goes out in pages when it is large: half
        // the connection's send queue, shared by the user's channels, at a
        // time (not for a channel it is subscribed to by itself, whose live
        // messages go on anyway).
        let budget = {
            let shard = self.shard.borrow();
            let channels = shard
                .follow
                .follower(key)
                .map_or(1, |f| self.hub.durable.count_of(f.namespace, &f.user));
            (!direct).then(|| (shard.send_queue_limit() / 2 / channels.max(1)).max(1))
        };
        // Marked as joining now: a subscription of the connection's own
        // made while the join is on its way is then marked `direct`.
        let joining = self
            .shard
            .borrow_mut()
            .follow
            .add(key, route, channel, "".into(), 0, direct);
        if !joining {
            return;
        }
        let (route_name, name): (Box<str>, Box<str>) = (route.into(), channel.into());
        let followed: Joined = Box::new(move |core: &Core, result| {
            if result.is_err() {
                // Not joined (a limit): no longer joining.
                core.shard
                    .borrow_mut()
                    .follow
                    .drop_channel(key, &route_name);
            }
            let result = result.map(|mut join| {
                let epoch = join.epoch.clone();
                let mut shard = core.shard.borrow_mut();
                let still = shard
                    .follow
                    .add(key, &route_name, &name, epoch, join.top, false);
                // It stopped following meanwhile: nothing to send, and the
                // subscription the join made is undone (unless the
                // connection subscribed to the channel by itself).
                if !still {
                    let undo = shard.follow.take_orphan(key, &route_name);
                    drop(shard);
                    if undo {
                        core.unsubscribe(key, &route_name);
                    }
                    join.replay.clear();
                } else if let Some(to) = join.paged_to {
                    // One page: no live messages until the rest is sent
                    // (unless the connection subscribed to it by itself).
                    shard.follow.page(key, &route_name, to);
                    let own = shard.follow.is_direct(key, &route_name);
                    drop(shard);
                    if !own {
                        core.unsubscribe(key, &route_name);
                    }
                }
                join
            });
            joined(core, result);
            core.shard.borrow_mut().ack_behind_replies(key);
        });
        let catch_up = Some((keep.size, budget));
        self.join_with(key, route, keep, since, catch_up, followed);
    }

    /// Connection `key` (generation `gen`) follows `channel` of namespace
    /// `ns` for its user from `cursor`: what it missed goes out as replies
    /// (in order, behind those before it), then live messages. A channel
    /// that cannot be followed (the subscription limit) is said with
    /// `not_followed(channel, why)`, or left out silently without one.
    pub fn follow_from(
        &self,
        (key, gen): (usize, u64),
        ns: u16,
        channel: &str,
        cursor: Cursor,
        not_followed: NotFollowed,
    ) {
        let route = super::message::route_key_string(ns, channel);
        let keep = self.hub.followed_keep(ns, channel);
        let ticket = self.shard.borrow_mut().reserve_reply(key, gen);
        let name: Box<str> = channel.into();
        let joined: Joined = Box::new(move |core: &Core, result| {
            let frames = match (result, not_followed) {
                (Ok(join), _) => join.replay,
                (Err(_), None) => Vec::new(),
                (Err(e), Some(frame)) => vec![frame(&name, &e.to_string())],
            };
            core.shard.borrow_mut().fill_reply(key, gen, ticket, frames);
        });
        self.follow(key, &route, channel, keep, Some(cursor), joined);
    }

    /// `key` read a page of its catch-up of each of these channels: the
    /// next pages (or the rest, and live messages) follow.
    fn next_pages(&self, key: usize) {
        let (pages, gen, namespace) = {
            let mut shard = self.shard.borrow_mut();
            let pages = shard.follow.pages_read(key);
            let gen = shard.conn(key).map(|c| c.gen);
            let ns = shard.follow.follower(key).map(|f| f.namespace);
            (pages, gen, ns)
        };
        let (Some(gen), Some(namespace)) = (gen, namespace) else {
            return;
        };
        for (channel, cursor) in pages {
            // Past the subscription limit meanwhile: left out, silently
            // (the front-end told the client of its channels at the start).
            self.follow_from((key, gen), namespace, &channel, cursor, None);
        }
    }

    /// The place of `route`'s history now (its epoch and newest offset),
    /// kept from now on as `keep` says: read on its owner, where `then`
    /// runs with it (what a durable subscription starts from). `None` in a
    /// cluster, whose history is the broker's.
    pub fn place_of(&self, route: &str, keep: Keep, then: PlacedNow) {
        if self.hub.broker().is_some() {
            then(self, None);
            return;
        }
        let place = |stream: &Stream| Cursor {
            epoch: stream.epoch.clone(),
            offset: stream.top,
        };
        self.on_stream(route.into(), keep, place, move |owner, cursor| {
            then(owner, Some(cursor))
        });
    }

    /// On the owner core of `route`: `read` of its history's stream
    /// (created, keeping `keep`, if it has none), then `then` with what it
    /// read, there.
    fn on_stream<R: 'static>(
        &self,
        route: Box<str>,
        keep: Keep,
        read: impl FnOnce(&Stream) -> R + Send + 'static,
        then: impl FnOnce(&Core, R) + Send + 'static,
    ) {
        let owner = self.hub.owner(super::message::route_hash(&route));
        self.run_on(
            owner,
            Box::new(move |owner: &Core| {
                let now = owner.shard.borrow().now();
                let got = {
                    let mut store = owner.history.borrow_mut();
                    read(store.stream(&route, keep, now))
                };
                then(owner, got);
            }),
        );
    }

    /// `key` stops following its user's channels: the subscriptions that
    /// were the following's alone end.
    pub fn unfollow(&self, key: usize) {
        let own = self.shard.borrow_mut().follow.stop(key);
        for route in own {
            self.unsubscribe(key, &route);
        }
    }

    /// `key` stops following `route` (its user's durable subscription to
    /// it ended).
    pub fn unfollow_channel(&self, key: usize, route: &str) {
        if self.shard.borrow_mut().follow.drop_channel(key, route) {
            self.unsubscribe(key, route);
        }
    }

    /// A pong from `key`: if it answers an ack ping, the user's cursors
    /// move to what the ping covered, and the next ping goes out if more
    /// was delivered meanwhile.
    pub fn pong(&self, key: usize, payload: &[u8]) {
        if payload != super::personal::ACK_PAYLOAD {
            return;
        }
        let durable = &self.hub.durable;
        let answered = self.shard.borrow_mut().follow.pong(
            key,
            payload,
            |namespace, user, channel, epoch, offset| {
                durable.commit(namespace, user, channel, epoch, offset)
            },
        );
        if answered {
            self.next_pages(key);
            self.shard.borrow_mut().ack(key);
        }
    }

    /// Subscribes connection `key` to routing key `channel` and runs
    /// `then` with the result: at once on a single node; in a cluster once
    /// the node receives the channel's messages from the other nodes, so
    /// that whatever is published after `then` reaches the connection.
    pub fn subscribe_then(&self, key: usize, channel: &str, then: Subscribed) {
        let Some(broker) = self.hub.broker() else {
            let result = self.subscribe(key, channel);
            then(self, result);
            return;
        };
        let gen = {
            let shard = self.shard.borrow();
            let Some(conn) = shard.conn(key) else {
                return;
            };
            if shard.is_subscribed(key, channel) {
                drop(shard);
                then(self, Ok(()));
                return;
            }
            if shard.at_subscription_limit(key) {
                let max = shard.max_subscriptions();
                drop(shard);
                then(self, Err(SubscribeError::TooMany(max)));
                return;
            }
            conn.gen
        };
        self.shard.borrow_mut().reserve(channel, &self.hub.interest);
        let name: Box<str> = channel.into();
        broker.when_ready(
            channel,
            self.id,
            Box::new(move |core: &Core, ready| {
                let result = match ready {
                    true => core.complete_subscribe(key, gen, &name),
                    false => core
                        .give_up_subscribe(key, gen, &name)
                        .then_some(Err(SubscribeError::Unavailable)),
                };
                if let Some(result) = result {
                    then(core, result);
                }
            }),
        );
    }

    /// Back on the subscriber's core, in order with the channel's
    /// messages: subscribes the connection if it is still there (`None`
    /// if not) and drops the reservation that held the channel meanwhile.
    fn complete_subscribe(
        &self,
        key: usize,
        gen: u64,
        channel: &str,
    ) -> Option<Result<(), SubscribeError>> {
        let result = self.alive(key, gen).then(|| self.subscribe(key, channel));
        self.shard.borrow_mut().release(channel, &self.hub.interest);
        result
    }

    /// Drops the reservation of a subscription that cannot be made;
    /// whether the connection is still there to be told.
    fn give_up_subscribe(&self, key: usize, gen: u64, channel: &str) -> bool {
        self.shard.borrow_mut().release(channel, &self.hub.interest);
        self.alive(key, gen)
    }

    fn alive(&self, key: usize, gen: u64) -> bool {
        self.shard
            .borrow()
            .conn(key)
            .is_some_and(|c| c.gen == gen && !c.is_closing())
    }

    /// Reads a page of `channel`'s history (at most `limit` messages,
    /// after `since` or the newest) on its owner, or from the cluster's
    /// broker; `read` runs with it (and sends it where it is needed).
    pub fn read_history(
        &self,
        channel: &str,
        since: Option<Since>,
        limit: usize,
        read: ReadHistory,
    ) {
        let Some(keep) = self.hub.keeps(0, channel) else {
            read(self, HistoryRead::NotKept);
            return;
        };
        if let Some(broker) = self.hub.broker() {
            broker.read_history(channel, keep, since, limit, self.id, read);
            return;
        }
        let page = move |stream: &Stream| stream.page(since.as_ref(), limit);
        self.on_stream(channel.into(), keep, page, move |owner, page| {
            read(owner, HistoryRead::Page(page))
        });
    }

    /// Drops expired history; called by the runtime once a second.
    pub fn prune_history(&self) {
        let now = self.shard.borrow().now();
        let mut store = self.history.borrow_mut();
        if store.prune(now) > 0 {
            self.history_gauges(&store);
        }
    }

    fn history_gauges(&self, store: &Store) {
        let s = &self.stats;
        s.history_messages
            .add(store.frames as i64 - s.history_messages.get());
        s.history_bytes
            .add(store.bytes as i64 - s.history_bytes.get());
    }

    /// Handles what other cores sent, in batches of at most `max`.
    /// Returns whether more are waiting.
    pub fn drain(&self, max: usize) -> bool {
        let (_, more) = self.hub.bus.drain(self.id, max, |envelope| match envelope {
            Envelope::Deliver(msg) => {
                self.stats.cross_core_in.inc();
                self.deliver(&msg)
            }
            Envelope::Sequence(msg) => {
                self.stats.sequenced_for_others.inc();
                self.sequence(msg, None, None)
            }
            Envelope::SequenceWith(p) => {
                self.stats.sequenced_for_others.inc();
                let Publish {
                    msg,
                    idempotency_key,
                    done,
                } = *p;
                self.sequence(msg, idempotency_key, done)
            }
            Envelope::Run(task) => task(self),
            Envelope::Replicate(r) => {
                let (msg, place) = *r;
                self.replicate(msg, place)
            }
        });
        more
    }

    /// Waits until another core has queued something for this one.
    pub async fn wait_for_messages(&self) {
        self.hub.bus.wait_for_messages(self.id).await
    }
}

/// Records a subscription change of routing key `key` for the console,
/// if one watches (`detail` is built only then).
#[inline]
fn seen(kind: &'static str, key: &str, detail: impl FnOnce() -> String) {
    let w = super::watch::watch();
    if w.on() {
        let (ns, channel) = super::watch::split_key(key);
        w.record(kind, ns, channel, detail());
    }
}

/// Records a publish for the console (out of the publish path's line).
#[cold]
#[inline(never)]
fn seen_publish(msg: &Message) {
    let detail = format!("{} bytes", msg.payload().len());
    super::watch::watch().record("publish", msg.namespace(), msg.channel(), detail);
}

/// Where a subscription starts in `stream`, and what it replays: with
/// `since`, every message after it if they are still kept, no more than
/// `recover_max` of them and no more than `budget` bytes (a single message
/// always fits); else nothing (`recovered: false`).
fn position(stream: &Stream, since: Option<&Since>, recover_max: usize, budget: usize) -> Join {
    let replay = since
        .filter(|s| *s.epoch == *stream.epoch)
        .and_then(|s| stream.after(s.offset, recover_max + 1))
        .filter(|frames| frames.len() <= recover_max)
        .filter(|frames| {
            // More than the connection's send queue holds: not
            // recoverable (it would be closed as a slow consumer at every
            // try).
            frames.len() <= 1 || frames.iter().map(|(_, f)| f.len()).sum::<usize>() <= budget
        });
    Join {
        epoch: stream.epoch.clone(),
        top: stream.top,
        newest: stream.newest(1).pop().map(|(_, f)| f),
        recovered: replay.is_some(),
        replay: replay
            .map(|frames| frames.into_iter().map(|(_, f)| f).collect())
            .unwrap_or_default(),
        paged_to: None,
    }
}

/// Where a user's connection that follows `stream` from `since` joins
/// it: everything kept after `since` is replayed (from the oldest kept
/// when some is gone, or when `since` is of another epoch), the newest
/// `max` at most; `recovered` says nothing was lost. With a `budget` of
/// bytes, a replay larger than it is cut after the frame that reaches it
/// (one frame at least): `paged_to` says where.
fn catching_up(stream: &Stream, since: Option<&Since>, max: usize, budget: Option<usize>) -> Join {
    let first = stream.first();
    let after = match since {
        Some(s) if *s.epoch == *stream.epoch => s.offset.min(stream.top),
        _ => 0,
    };
    let from = after.max(first - 1);
    let mut frames = stream.after(from, usize::MAX).unwrap_or_default();
    let skipped = frames.len().saturating_sub(max);
    frames.drain(..skipped);
    let mut paged_to = None;
    if let Some(budget) = budget {
        let mut bytes = 0;
        let fit = frames
            .iter()
            .take_while(|(_, f)| {
                let fits = bytes == 0 || bytes + f.len() <= budget;
                bytes += f.len();
                fits
            })
            .count();
        if fit < frames.len() {
            frames.truncate(fit);
            paged_to = frames.last().map(|(offset, _)| *offset);
        }
    }
    Join {
        epoch: stream.epoch.clone(),
        top: stream.top,
        newest: None,
        recovered: from == after && skipped == 0,
        replay: frames.into_iter().map(|(_, f)| f).collect(),
        paged_to,
    }
}

/// The connection of this core `msg` must skip, if it is still the one
/// the exclusion named (same generation).
fn excluded(shard: &Shard, msg: &Message, core: usize) -> Option<usize> {
    let (key, gen) = msg.except_on(core)?;
    shard.conn(key).filter(|c| c.gen == gen).map(|_| key)
}
