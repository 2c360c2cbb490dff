//! A worker is one reactor thread's context: its engine [`Core`], what its
//! front-ends and integrations keep per core (the authorizer's client, the
//! connections not yet upgraded, the read buffer), and the process-wide
//! [`Shared`] state.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::engine::core::{Core, HistorySettings, Hub, NamespacedHistory};
use crate::engine::history::{HistorySink, Remembered, Restored};
use crate::engine::message::{Encoder, Encoding};
use crate::engine::personal::Durable;
use crate::engine::shard::{Closes, Keepalive, Limits};
use crate::integrations::authorizer::Authorizer;
use crate::integrations::metrics::Metrics;
use crate::transport::http1::pending::Pending;
use crate::transport::ws::frame;

/// State shared by every worker of the process.
pub struct Shared {
    pub config: Config,
    pub auth: Authenticator,
    /// The engine's node-wide part: interest map and cross-core queues.
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// WebSocket connections open across all workers (for MAX_CONNECTIONS).
    pub connections: AtomicUsize,
    /// Workers whose listener is accepting.
    pub ready: AtomicUsize,
    pub workers: usize,
    pub shutdown: AtomicBool,
    /// The certificate TLS handshakes present (set at start with TLS_CERT).
    pub tls: std::sync::OnceLock<Arc<crate::transport::tls::Certified>>,
    /// A restart's new process took over the listening sockets: stopping
    /// means draining ([`restart_code`]), and the sockets stay open.
    pub handed_over: AtomicBool,
    /// Over how many milliseconds a restart's drain closes connections
    /// (DRAIN_SECONDS; 0 when the successor waits for the history file).
    pub drain_ms: std::sync::atomic::AtomicU64,
    /// /metrics has a socket of its own (METRICS_ADDR, or one the service
    /// manager passed as `metrics`): the main port does not serve it.
    pub metrics_apart: AtomicBool,
    /// The database the configuration is kept in (DATABASE_URL).
    pub database: std::sync::OnceLock<Arc<crate::integrations::database::Database>>,
}

/// The code a connection is closed with when its server restarts, given
/// the one its front-end closes with at shutdown: 1012 ("service restart",
/// RFC 6455) for 1001; Pusher's 4200 ("reconnect immediately") stays.
pub fn restart_code(shutdown: u16) -> u16 {
    match shutdown {
        1001 => 1012,
        other => other,
    }
}

/// History a process starts with: read back from `HISTORY_DIR` (with
/// the sink that keeps writing it there), or handed over by a restart's
/// old process; by owner core.
#[derive(Default)]
pub struct StoredHistory {
    pub sink: Option<Arc<dyn HistorySink>>,
    /// The users' durable subscriptions, read back from the disk (else a
    /// new, empty store is made from the configuration).
    pub durable: Option<Arc<Durable>>,
    pub streams: Vec<Vec<Restored>>,
    pub keys: Vec<Vec<Remembered>>,
}

/// An empty store of durable subscriptions, as the configuration limits
/// it.
pub fn durable_store(config: &Config) -> Durable {
    Durable::new(config.personal_history, config.personal_max_channels)
}

impl Shared {
    /// Shared state whose engine serves `encoders` (the front-ends').
    pub fn new(config: Config, workers: usize, encoders: &'static [Encoder]) -> Arc<Shared> {
        let metrics = Arc::new(Metrics::new(workers));
        Self::with_metrics(config, workers, encoders, metrics)
    }

    /// The same, reporting to `metrics`.
    pub fn with_metrics(
        config: Config,
        workers: usize,
        encoders: &'static [Encoder],
        metrics: Arc<Metrics>,
    ) -> Arc<Shared> {
        Self::build(
            config,
            workers,
            encoders,
            None,
            StoredHistory::default(),
            metrics,
        )
    }

    /// The same, with the front-end namespaces' channels keeping history
    /// as `namespaced` says (Pusher's cache channels).
    pub fn build(
        config: Config,
        workers: usize,
        encoders: &'static [Encoder],
        namespaced: Option<NamespacedHistory>,
        stored: StoredHistory,
        metrics: Arc<Metrics>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            auth: Authenticator::new(config.secret.as_deref(), config.jwt_leeway),
            hub: Arc::new(
                Hub::new(workers, config.bus_capacity, encoders)
                    .with_history(HistorySettings {
                        rules: config.history.clone(),
                        namespaced,
                        // The first registered encoding (the native protocol's)
                        // is the one whose frames history keeps.
                        encoding: Encoding(0),
                        recover_max: config.history_recover_max,
                        recover_bytes: config.send_queue_limit,
                        idempotency_window_ms: config.idempotency_window.as_millis() as u64,
                        sink: stored.sink,
                        restored: std::sync::Mutex::new(stored.streams),
                        restored_keys: std::sync::Mutex::new(stored.keys),
                    })
                    .with_durable(
                        stored
                            .durable
                            .unwrap_or_else(|| Arc::new(durable_store(&config))),
                    ),
            ),
            metrics,
            connections: AtomicUsize::new(0),
            ready: AtomicUsize::new(0),
            workers,
            shutdown: AtomicBool::new(false),
            tls: std::sync::OnceLock::new(),
            handed_over: AtomicBool::new(false),
            metrics_apart: AtomicBool::new(false),
            database: std::sync::OnceLock::new(),
            drain_ms: std::sync::atomic::AtomicU64::new(config.drain_seconds.as_millis() as u64),
            config,
        })
    }

    /// Asks every worker to shut down.
    pub fn begin_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
        for w in 0..self.workers {
            self.hub.bus.notify(w);
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Over how long a restart's drain closes connections: DRAIN_SECONDS,
    /// or nothing when the successor waits for the history file.
    pub fn drain(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.drain_ms.load(Ordering::Acquire))
    }

    /// Reserves one WebSocket connection slot; false at MAX_CONNECTIONS.
    pub fn try_reserve_connection(&self) -> bool {
        let max = self.config.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn release_connection(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One reactor's context, shared by the tasks of its thread.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// The engine of this core: its shard and its publish path.
    pub core: Core,
    /// The read buffer every connection of this core reads into; a
    /// connection keeps bytes of its own only for a frame cut by a read.
    pub scratch: RefCell<Vec<u8>>,
    /// This reactor's client of AUTHORIZER_URL (its own keep-alive pool).
    pub authorizer: Option<Authorizer>,
    /// Connections accepted here that have not upgraded (MAX_PENDING).
    pub pending: RefCell<Pending>,
    /// Numbers this worker's connections for the authorizer's `connection_id`.
    next_connection: Cell<u64>,
    /// Set once the worker stops accepting; an accept loop ends after its
    /// accept in flight.
    stopped: Cell<bool>,
    /// Accept loops still running.
    pub accept_loops: Cell<usize>,
}

/// The closes the engine starts on its own, as this server writes them:
/// WebSocket close and ping frames, the wire protocol's codes.
pub const CLOSES: Closes = Closes {
    frame: frame::close,
    ping: frame::ping,
    ack_ping,
    slow_consumer: (4008, "slow consumer: send queue limit reached"),
    ping_timeout: (1001, "ping timeout"),
    expired: (4001, "token expired"),
    cut: crate::transport::tcp::cut,
};

/// The ping that acknowledges deliveries to a user's connection: one
/// frame, built once and shared.
fn ack_ping() -> bytes::Bytes {
    static FRAME: std::sync::OnceLock<bytes::Bytes> = std::sync::OnceLock::new();
    FRAME
        .get_or_init(|| frame::ping_with(crate::engine::personal::ACK_PAYLOAD))
        .clone()
}

impl Worker {
    pub fn new(id: usize, shared: Arc<Shared>) -> Worker {
        let c = &shared.config;
        let limits = Limits {
            send_queue_limit: c.send_queue_limit,
            max_subscriptions: c.max_subscriptions,
            close_timeout_ms: c.close_timeout.as_millis() as u64,
            publish_rate: c.publish_rate,
            keepalive: Keepalive::new(c.ping_interval, c.pong_timeout),
            closes: CLOSES,
            clock: crate::clock::now_ms,
            coalesce: !c.write_delay.is_zero(),
        };
        let stats = shared.metrics.core(id);
        Worker {
            id,
            core: Core::new(id, shared.hub.clone(), limits, stats),
            scratch: RefCell::new(vec![0; c.read_buffer_size]),
            authorizer: Authorizer::from_config(c, Some(shared.metrics.outgoing("authorizer"))),
            pending: RefCell::new(Pending::new(c.pending_per_worker())),
            next_connection: Cell::new(0),
            stopped: Cell::new(false),
            accept_loops: Cell::new(0),
            shared,
        }
    }

    /// Has [`Worker::stop_accepting`] been called?
    pub fn accepting_stopped_now(&self) -> bool {
        self.stopped.get()
    }

    /// Stops this worker's accept loops (at shutdown, or when a successor
    /// takes over the listening sockets).
    pub fn stop_accepting(&self) {
        self.stopped.set(true);
    }

    /// A connection id unique in this process: `worker.sequence`.
    pub fn connection_id(&self) -> String {
        let n = self.next_connection.get() + 1;
        self.next_connection.set(n);
        format!("{}.{n}", self.id)
    }
}
