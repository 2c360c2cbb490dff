//! Counters, gauges and histograms, per worker where the work is per
//! worker, exposed at `GET /metrics` (via `prometheus-client`) in the
//! Prometheus text format (0.0.4) by default, or in OpenMetrics when the
//! scraper's `Accept` asks for `application/openmetrics-text`.
//!
//! The per-core figures are the engine's [`CoreStats`], which each core
//! writes alone (a plain store, no locked add) and this module reads at
//! scrape time; fan-out adds its deliveries once per publish, not once per
//! subscriber. What changes elsewhere (process memory and CPU, per-app
//! connection counts) is read when a scrape asks too.
//!
//! `prometheus-client` encodes OpenMetrics only; [`to_prometheus_text`]
//! turns that into the classic format, which differs only in how a counter
//! family is named (`x_total` in `# TYPE`), in `info` metrics, and in the
//! `# UNIT` and `# EOF` lines.

use super::database::DatabaseMetrics;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::engine::stats::{CoreStats, Level, NamespaceStats, Stat};

type Labels = Vec<(String, String)>;

/// The exposition format a scraper asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`, what `promtool` and older scrapers read.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header prefers: OpenMetrics when it is listed
    /// (with a non-zero quality), else the classic text format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        let wants_om = accept.is_some_and(|a| {
            a.split(',').any(|item| {
                let mut parts = item.split(';').map(str::trim);
                let mime = parts.next().unwrap_or("");
                let q_zero = parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                mime.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
            })
        });
        if wants_om {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// All metrics of the process.
pub struct Metrics {
    registry: Registry,
    cores: Arc<[Arc<CoreStats>]>,
    rejected: Family<Labels, Counter>,
    authorizer: Family<Labels, Counter>,
    /// The authorizer's counters by (action, result), each looked up in
    /// the family once: a decision then costs one atomic add, with no
    /// label strings and no lock.
    authorizer_counters: [std::sync::OnceLock<Counter>; AUTHZ_ACTIONS.len() * AUTHZ_RESULTS.len()],
    channels_distinct: Gauge,
    durable_subscriptions: Gauge,
    pusher_connections: Family<Labels, Gauge>,
    /// The Pusher apps' open connections (by app index), once tracked.
    app_connections: std::sync::OnceLock<Arc<[std::sync::atomic::AtomicUsize]>>,
    /// The Pusher apps' ids by index ("" for an index not given out).
    app_ids: AppNames,
    outgoing: Family<Labels, Histogram, fn() -> Histogram>,
    webhooks: Family<Labels, Counter>,
    webhook_drops: Family<Labels, Counter>,
    /// HISTORY_DIR: messages committed, and messages that could not be.
    pub history_disk_written: Counter,
    pub history_disk_dropped: Counter,
    /// BROKER_URL: the link to the cluster.
    pub broker: BrokerMetrics,
    /// DATABASE_URL: the configuration kept in PostgreSQL.
    pub database: DatabaseMetrics,
}

/// The cluster link's figures (all zero on a node without BROKER_URL).
#[derive(Clone)]
pub struct BrokerMetrics {
    /// 1 while the node reaches its broker.
    pub up: Gauge,
    pub connects: Counter,
    pub published: Counter,
    pub publish_failed: Counter,
    pub received: Counter,
    pub malformed: Counter,
    /// Channels whose messages from the link's outage could not be caught
    /// up (their subscribers here were closed to recover).
    pub gaps: Counter,
    /// Channels the node is subscribed to on the broker.
    pub subscriptions: Gauge,
    /// From handing a batch of publishes to the broker to its answer.
    pub publish_seconds: Histogram,
}

impl BrokerMetrics {
    fn new() -> BrokerMetrics {
        BrokerMetrics {
            up: Gauge::default(),
            connects: Counter::default(),
            published: Counter::default(),
            publish_failed: Counter::default(),
            received: Counter::default(),
            malformed: Counter::default(),
            gaps: Counter::default(),
            subscriptions: Gauge::default(),
            publish_seconds: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0,
            ]),
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "broker_up",
            "1 while the node reaches its cluster's broker (BROKER_URL)",
            self.up.clone(),
        );
        r.register(
            "broker_connects",
            "Connections made to the broker (the first, then reconnects)",
            self.connects.clone(),
        );
        r.register(
            "broker_published",
            "Messages handed to the broker and accepted by it",
            self.published.clone(),
        );
        r.register(
            "broker_publish_failed",
            "Publishes the broker did not take (unreachable or timed out); each got an error",
            self.publish_failed.clone(),
        );
        r.register(
            "broker_received",
            "Messages received from the broker",
            self.received.clone(),
        );
        r.register(
            "broker_malformed",
            "Messages from the broker that were not herald's and were dropped",
            self.malformed.clone(),
        );
        r.register(
            "broker_gaps",
            "Channels whose messages from a broker outage were no longer kept: their subscribers here were closed to recover",
            self.gaps.clone(),
        );
        r.register(
            "broker_subscriptions",
            "Channels this node is subscribed to on the broker",
            self.subscriptions.clone(),
        );
        r.register(
            "broker_publish_duration_seconds",
            "Time from handing a batch of publishes to the broker to its answer",
            self.publish_seconds.clone(),
        );
    }
}

/// Buckets for outgoing HTTP request durations, 1 ms to 10 s.
fn outgoing_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// The authorizer's actions and results, as labelled.
const AUTHZ_ACTIONS: [&str; 4] = ["connect", "subscribe", "unsubscribe", "publish"];
const AUTHZ_RESULTS: [&str; 4] = ["allow", "deny", "unavailable", "cached"];

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Metrics {
    /// Metrics for `workers` reactors and no Pusher app.
    pub fn new(workers: usize) -> Metrics {
        Self::with_apps(workers, &[])
    }

    /// Metrics for `workers` reactors and the Pusher apps `app_ids` (in
    /// app index order).
    pub fn with_apps(workers: usize, app_ids: &[&str]) -> Metrics {
        Self::with_app_slots(workers, app_ids, app_ids.len())
    }

    /// The same, with room for `slots` apps (apps from a database come
    /// and go: [`Metrics::set_app_names`]).
    pub fn with_app_slots(workers: usize, app_ids: &[&str], slots: usize) -> Metrics {
        let names: AppNames = Arc::new(std::sync::RwLock::new(
            app_ids.iter().map(|a| a.to_string()).collect(),
        ));
        let mut root = Registry::default();
        // The standard process_* names carry no prefix.
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("herald");
        let cores: Arc<[Arc<CoreStats>]> = (0..workers)
            .map(|_| Arc::new(CoreStats::new(slots.max(app_ids.len()) + 1)))
            .collect();
        registry.register_collector(Box::new(CoreCollector {
            cores: cores.clone(),
            apps: names.clone(),
        }));
        let history_disk_written = Counter::default();
        registry.register(
            "history_disk_written",
            "Messages written to HISTORY_DIR (committed)",
            history_disk_written.clone(),
        );
        let history_disk_dropped = Counter::default();
        registry.register(
            "history_disk_dropped",
            "Messages that could not be written to HISTORY_DIR (queue full, disk full); their channels start new epochs",
            history_disk_dropped.clone(),
        );
        let broker = BrokerMetrics::new();
        broker.register(registry);
        let database = DatabaseMetrics::default();
        registry.register(
            "database_up",
            "1 while the database DATABASE_URL names is reachable",
            database.up.clone(),
        );
        registry.register(
            "database_reads",
            "Reads of the configuration tables (at start, on a change, every DATABASE_REFRESH)",
            database.reads.clone(),
        );
        registry.register(
            "database_errors",
            "Failed connections to the database and connections lost",
            database.errors.clone(),
        );
        let rejected = Family::<Labels, Counter>::default();
        registry.register(
            "rejected_upgrades",
            "WebSocket upgrades refused, by reason",
            rejected.clone(),
        );
        let authorizer = Family::<Labels, Counter>::default();
        registry.register(
            "authorizer_decisions",
            "Authorizer webhook answers (result: allow, deny, unavailable, cached), by action",
            authorizer.clone(),
        );
        let outgoing: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(outgoing_histogram);
        registry.register(
            "outgoing_http_request_duration_seconds",
            "Duration of outgoing HTTP requests (authorizer checks, webhook posts), answer read",
            outgoing.clone(),
        );
        let webhooks = Family::<Labels, Counter>::default();
        registry.register(
            "pusher_webhook_batches",
            "Pusher webhook batches by app and outcome (delivered, retried, refused, dropped)",
            webhooks.clone(),
        );
        let webhook_drops = Family::<Labels, Counter>::default();
        registry.register(
            "pusher_webhook_events_dropped",
            "Pusher webhook events dropped before sending because a queue was full, by app",
            webhook_drops.clone(),
        );
        let pusher_connections = Family::<Labels, Gauge>::default();
        registry.register(
            "pusher_connections",
            "Open Pusher-protocol connections, by app",
            pusher_connections.clone(),
        );
        let channels_distinct = Gauge::default();
        registry.register(
            "distinct_channels",
            "Distinct channels with a subscriber on any worker",
            channels_distinct.clone(),
        );
        let durable_subscriptions = Gauge::default();
        registry.register(
            "durable_subscriptions",
            "Users' durable subscriptions (personal channels) the node keeps",
            durable_subscriptions.clone(),
        );
        let workers_gauge: Gauge = Gauge::default();
        workers_gauge.set(workers as i64);
        registry.register("workers", "Reactor threads", workers_gauge);
        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))]))
            .set(1);
        registry.register("build_info", "herald's version (always 1)", build);
        Metrics {
            registry: root,
            cores,
            rejected,
            authorizer,
            authorizer_counters: Default::default(),
            channels_distinct,
            durable_subscriptions,
            pusher_connections,
            app_connections: std::sync::OnceLock::new(),
            app_ids: names,
            outgoing,
            webhooks,
            webhook_drops,
            history_disk_written,
            history_disk_dropped,
            broker,
            database,
        }
    }

    /// The figures worker `id` writes.
    pub fn core(&self, id: usize) -> Arc<CoreStats> {
        self.cores[id].clone()
    }

    /// Counts an upgrade refused for `reason`.
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// Counts an authorizer outcome for `action`.
    pub fn authorized(&self, action: &str, result: &str) {
        let family = || {
            self.authorizer
                .get_or_create(&labels(&[("action", action), ("result", result)]))
                .clone()
        };
        let a = AUTHZ_ACTIONS.iter().position(|&x| x == action);
        let r = AUTHZ_RESULTS.iter().position(|&x| x == result);
        match (a, r) {
            (Some(a), Some(r)) => {
                self.authorizer_counters[a * AUTHZ_RESULTS.len() + r]
                    .get_or_init(family)
                    .inc();
            }
            _ => {
                family().inc();
            }
        }
    }

    /// The duration histogram of outgoing requests to `target`
    /// (`authorizer` or `webhook`).
    pub fn outgoing(&self, target: &str) -> Histogram {
        self.outgoing
            .get_or_create(&labels(&[("target", target)]))
            .clone()
    }

    /// Counts a webhook batch of `app` with `outcome`.
    pub fn webhook(&self, app: &str, outcome: &str) {
        self.webhooks
            .get_or_create(&labels(&[("app", app), ("outcome", outcome)]))
            .inc();
    }

    /// The counter of webhook events of `app` dropped for a full queue.
    pub fn webhook_events_dropped(&self, app: &str) -> Counter {
        self.webhook_drops
            .get_or_create(&labels(&[("app", app)]))
            .clone()
    }

    /// Reads the Pusher apps' open connections from `counts` (by app index)
    /// at each scrape.
    pub fn track_app_connections(&self, counts: Arc<[std::sync::atomic::AtomicUsize]>) {
        let _ = self.app_connections.set(counts);
    }

    /// The Pusher apps' ids by index, after apps from a database changed.
    pub fn set_app_names(&self, names: Vec<String>) {
        *self.app_ids.write().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// Sets what a scrape reads from shared state: the distinct channel
    /// count, the durable subscriptions, and each Pusher app's open
    /// connections.
    pub fn set_gauges(&self, channels: usize, durable: usize) {
        self.channels_distinct.set(channels as i64);
        self.durable_subscriptions.set(durable as i64);
        if let Some(counts) = self.app_connections.get() {
            let names = self
                .app_ids
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            for (app, n) in names.iter().zip(counts.iter()) {
                if app.is_empty() {
                    continue;
                }
                let n = n.load(std::sync::atomic::Ordering::Relaxed);
                self.pusher_connections
                    .get_or_create(&labels(&[("app", app)]))
                    .set(n as i64);
            }
        }
    }

    /// The exposition in `format`.
    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        match format {
            Format::OpenMetrics => out,
            Format::Prometheus => to_prometheus_text(&out),
        }
    }
}

/// Rewrites OpenMetrics text (as `prometheus-client` writes it) in the
/// Prometheus text format 0.0.4: counter families are named with their
/// `_total` suffix, `info` families become gauges named `_info`, `unknown`
/// becomes `untyped`, and `# UNIT` / `# EOF` lines go. Samples are the
/// same in both.
pub fn to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gaugehistogram" => (name.to_string(), "histogram"),
                "stateset" | "unknown" => (name.to_string(), "untyped"),
                k => (name.to_string(), k),
            };
            let text = match help.take() {
                Some((n, t)) if n == rest.split(' ').next().unwrap_or("") => t,
                _ => "",
            };
            out.push_str(&format!("# HELP {name} {text}\n# TYPE {name} {kind}\n"));
            continue;
        }
        // `_created` series are OpenMetrics-only.
        let sample_name = line.split(['{', ' ']).next().unwrap_or("");
        if sample_name.ends_with("_created") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A figure read from a source `S`: name, help, and how to reach it.
type Described<S, T> = (&'static str, &'static str, fn(&S) -> &T);

/// Gauges read from each core's [`CoreStats`]: name, help, field.
const CORE_GAUGES: &[Described<CoreStats, Level>] = &[
    ("connections", "Open WebSocket connections", |s| {
        &s.connections
    }),
    (
        "subscriptions",
        "Active subscriptions (connection x channel)",
        |s| &s.subscriptions,
    ),
    ("channels", "Channels with a local subscriber", |s| {
        &s.channels
    }),
    (
        "history_messages",
        "Messages kept in the histories of the channels this worker owns",
        |s| &s.history_messages,
    ),
    (
        "history_bytes",
        "Bytes of the frames kept in those histories",
        |s| &s.history_bytes,
    ),
];

/// Counters read from each core's [`CoreStats`]: name, help, field.
const CORE_COUNTERS: &[Described<CoreStats, Stat>] = &[
    (
        "messages_in",
        "Client messages received (WebSocket and HTTP)",
        |s| &s.messages_in,
    ),
    (
        "bytes_in",
        "Payload bytes of client messages received",
        |s| &s.bytes_in,
    ),
    ("publishes", "Messages published", |s| &s.publishes),
    (
        "messages_out",
        "Frames queued to connections (deliveries and replies)",
        |s| &s.messages_out,
    ),
    ("bytes_out", "Bytes written to WebSocket connections", |s| {
        &s.bytes_out
    }),
    (
        "cross_core_messages",
        "Published frames received from other workers",
        |s| &s.cross_core_in,
    ),
    (
        "sequenced_for_others",
        "Publishes received from other workers to be ordered here, their channel's owner",
        |s| &s.sequenced_for_others,
    ),
    (
        "idempotent_repeats",
        "Publishes not delivered again: their idempotency key was seen within IDEMPOTENCY_WINDOW",
        |s| &s.idempotent_repeats,
    ),
    (
        "slow_consumer_closes",
        "Connections closed with 4008 for not reading",
        |s| &s.slow_consumer_closes,
    ),
    (
        "expired_closes",
        "Connections closed with 4001 when their token expired",
        |s| &s.expired_closes,
    ),
    (
        "protocol_errors",
        "Connections failed for violating RFC 6455",
        |s| &s.protocol_errors,
    ),
    (
        "pending_evictions",
        "Connections not yet upgraded closed to make room for newer ones (MAX_PENDING)",
        |s| &s.pending_evictions,
    ),
    (
        "request_timeouts",
        "HTTP requests whose head or body did not arrive within HANDSHAKE_TIMEOUT (408)",
        |s| &s.request_timeouts,
    ),
    (
        "tls_handshakes",
        "TLS handshakes completed on TLS_PORT (or the main port with TLS_CERT)",
        |s| &s.tls_handshakes,
    ),
    (
        "tls_handshake_failures",
        "TLS handshakes that failed or did not complete within HANDSHAKE_TIMEOUT (plain HTTP on the TLS port included)",
        |s| &s.tls_failures,
    ),
    (
        "pings_sent",
        "Keep-alive pings sent to silent WebSocket connections (PING_INTERVAL)",
        |s| &s.pings_sent,
    ),
    (
        "ping_timeouts",
        "Connections closed with 1001 for not answering a ping (PONG_TIMEOUT)",
        |s| &s.ping_timeouts,
    ),
    (
        "rate_limited",
        "Publishes refused because their connection passed PUBLISH_RATE",
        |s| &s.rate_limited,
    ),
    (
        "memory_collections",
        "Times a worker returned freed memory to the system after connections came and went",
        |s| &s.memory_collections,
    ),
];

/// Per-app counters from the cores' namespace figures (namespace n is app
/// n - 1): name, help, field.
const APP_COUNTERS: &[Described<NamespaceStats, Stat>] = &[
    (
        "pusher_messages_in",
        "Pusher events published (client events, HTTP API triggers, presence events), by app and worker",
        |n| &n.published,
    ),
    ("pusher_messages_out", "Pusher events delivered to connections, by app and worker", |n| &n.delivered),
];

/// Renders every core's [`CoreStats`] at scrape time, one series per
/// worker (and per Pusher app).
#[derive(Debug)]
struct CoreCollector {
    cores: Arc<[Arc<CoreStats>]>,
    apps: AppNames,
}

/// Pusher app ids by index, shared with the collector.
type AppNames = Arc<std::sync::RwLock<Vec<String>>>;

impl Collector for CoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let workers: Vec<Labels> = (0..self.cores.len())
            .map(|w| labels(&[("worker", &w.to_string())]))
            .collect();
        for (name, help, field) in CORE_GAUGES {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (core, l) in self.cores.iter().zip(&workers) {
                ConstGauge::new(field(core).get()).encode(fam.encode_family(l)?)?;
            }
        }
        for (name, help, field) in CORE_COUNTERS {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (core, l) in self.cores.iter().zip(&workers) {
                ConstCounter::new(field(core).get()).encode(fam.encode_family(l)?)?;
            }
        }
        let apps = self.apps.read().unwrap_or_else(|e| e.into_inner()).clone();
        if apps.iter().all(String::is_empty) {
            return Ok(());
        }
        for (name, help, field) in APP_COUNTERS {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (i, app) in apps.iter().enumerate() {
                if app.is_empty() {
                    continue;
                }
                for (w, core) in self.cores.iter().enumerate() {
                    let Some(ns) = core.namespaces.get(i + 1) else {
                        continue;
                    };
                    let l = labels(&[("app", app), ("worker", &w.to_string())]);
                    ConstCounter::new(field(ns).get()).encode(fam.encode_family(&l)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The standard `process_*` metrics, read from `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    virtual_bytes: u64,
    start_time_seconds: f64,
    threads: u64,
}

/// Parses `/proc/self/stat` (`proc(5)`): fields after the command name.
fn parse_stat(
    stat: &str,
    ticks_per_sec: f64,
    page_size: u64,
    boot_time: u64,
) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcessStats {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks_per_sec,
        threads: num(20)?,
        start_time_seconds: boot_time as f64 + num(22)? as f64 / ticks_per_sec,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page_size,
    })
}

fn read_process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // SAFETY: sysconf with valid names only reads system constants.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    parse_stat(&stat, ticks.max(1) as f64, page.max(1) as u64, boot)
}

/// Counts `/proc/self/fd` without allocating per entry (a server holds
/// one descriptor per connection; a scrape must not scatter 100,000 small
/// allocations among the connections' memory).
fn open_fds() -> Option<u64> {
    // SAFETY: opendir/readdir/closedir on a NUL-terminated path; the
    // directory stream is closed before returning.
    unsafe {
        let dir = libc::opendir(c"/proc/self/fd".as_ptr());
        if dir.is_null() {
            return None;
        }
        let mut n = 0u64;
        while !libc::readdir(dir).is_null() {
            n += 1;
        }
        libc::closedir(dir);
        // `.`, `..` and the directory stream's own descriptor.
        Some(n.saturating_sub(3))
    }
}

fn max_fds() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> std::fmt::Result {
            let g = ConstGauge::new(v);
            let m = e.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)
        }
        if let Some(p) = read_process_stats() {
            let c = ConstCounter::new(p.cpu_seconds);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes as f64,
            )?;
            gauge(
                &mut encoder,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                p.start_time_seconds,
            )?;
            gauge(
                &mut encoder,
                "process_threads",
                "Number of OS threads in the process",
                p.threads as f64,
            )?;
        }
        if let Some(n) = open_fds() {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                n as f64,
            )?;
        }
        if let Some(n) = max_fds() {
            gauge(
                &mut encoder,
                "process_max_fds",
                "Maximum number of open file descriptors",
                n as f64,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_worker_series_in_both_formats() {
        let m = Metrics::with_apps(2, &["a1"]);
        m.core(1).publishes.add(5);
        m.core(0).connections.inc();
        m.core(0).namespaces[1].delivered.add(7);
        m.core(0).messages_out.add(7);
        m.reject("max_connections");
        let counts: Arc<[std::sync::atomic::AtomicUsize]> =
            Arc::new([std::sync::atomic::AtomicUsize::new(2)]);
        m.track_app_connections(counts);
        m.set_gauges(3, 0);
        let om = m.render(Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains("# TYPE herald_publishes counter"), "{om}");
        let text = m.render(Format::Prometheus);
        for want in [
            "# TYPE herald_publishes_total counter",
            "# HELP herald_publishes_total Messages published",
            "herald_publishes_total{worker=\"1\"} 5",
            "herald_connections{worker=\"0\"} 1",
            "herald_rejected_upgrades_total{reason=\"max_connections\"} 1",
            "herald_distinct_channels 3",
            "herald_pusher_connections{app=\"a1\"} 2",
            "herald_pusher_messages_out_total{app=\"a1\",worker=\"0\"} 7",
            "herald_messages_out_total{worker=\"0\"} 7",
            "herald_build_info{version=",
            "# TYPE process_cpu_seconds_total counter",
            "process_resident_memory_bytes ",
            "process_open_fds ",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        // Every TYPE has its HELP, with the same name.
        let lines: Vec<&str> = text.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(
                    i > 0 && lines[i - 1].starts_with(&format!("# HELP {name} ")),
                    "{name} has no HELP"
                );
            }
        }
    }

    #[test]
    fn authorizer_decisions_count_by_action_and_result() {
        let m = Metrics::new(1);
        m.authorized("publish", "allow");
        m.authorized("publish", "allow");
        m.authorized("connect", "cached");
        m.authorized("other", "odd");
        let text = m.render(Format::Prometheus);
        for line in [
            "herald_authorizer_decisions_total{action=\"publish\",result=\"allow\"} 2",
            "herald_authorizer_decisions_total{action=\"connect\",result=\"cached\"} 1",
            "herald_authorizer_decisions_total{action=\"other\",result=\"odd\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(
            !text.contains("result=\"deny\""),
            "only what happened is shown"
        );
    }

    #[test]
    fn accept_negotiation() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=0, text/plain")),
            Format::Prometheus
        );
    }

    #[test]
    fn om_to_prometheus_rewrites_families() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total 3\nx_requests_created 1.5\n# HELP x_build Build.\n# TYPE x_build info\nx_build_info{v=\"1\"} 1\n# HELP x_t Temp.\n# TYPE x_t gauge\n# UNIT x_t celsius\nx_t 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total 3\n# HELP x_build_info Build.\n# TYPE x_build_info gauge\nx_build_info{v=\"1\"} 1\n# HELP x_t Temp.\n# TYPE x_t gauge\nx_t 2\n"
        );
    }

    #[test]
    fn proc_stat_fields() {
        // proc(5): pid (comm) state ppid ... utime(14) stime(15) ... num_threads(20) ... starttime(22) vsize(23) rss(24)
        let stat = "42 (herald w) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456 10 18446744073709551615";
        let p = parse_stat(stat, 100.0, 4096, 1_700_000_000).unwrap();
        assert_eq!(
            p,
            ProcessStats {
                cpu_seconds: 3.0,
                resident_bytes: 40960,
                virtual_bytes: 123456,
                start_time_seconds: 1_700_000_010.0,
                threads: 7,
            }
        );
    }
}
