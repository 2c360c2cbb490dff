//! Counters and gauges, per worker where the work is per worker, exposed in
//! the Prometheus text format at `GET /metrics` (via `prometheus-client`).
//!
//! Each worker holds clones of its own handles (atomics nobody else writes),
//! so counting on the hot path is an uncontended relaxed add; fan-out adds
//! its deliveries once per publish, not once per subscriber.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The metric handles one worker updates.
#[derive(Clone, Default)]
pub struct WorkerMetrics {
    pub connections: Gauge,
    pub subscriptions: Gauge,
    pub channels: Gauge,
    pub messages_in: Counter,
    pub bytes_in: Counter,
    pub publishes: Counter,
    pub messages_out: Counter,
    pub bytes_out: Counter,
    pub cross_core_in: Counter,
    pub slow_consumer_closes: Counter,
    pub expired_closes: Counter,
    pub protocol_errors: Counter,
    pub pending_evictions: Counter,
    pub request_timeouts: Counter,
    pub pings_sent: Counter,
    pub ping_timeouts: Counter,
}

/// All metrics of the process.
pub struct Metrics {
    registry: Registry,
    workers: Vec<WorkerMetrics>,
    rejected: Family<Labels, Counter>,
    authorizer: Family<Labels, Counter>,
    channels_total: Gauge,
    outgoing: Family<Labels, Histogram, fn() -> Histogram>,
    webhooks: Family<Labels, Counter>,
    webhook_drops: Family<Labels, Counter>,
}

/// Buckets for outgoing HTTP request durations, 1 ms to 10 s.
fn outgoing_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    pub fn new(workers: usize) -> Metrics {
        let mut registry = Registry::with_prefix("herald");
        let families: Vec<(&str, &str, Family<Labels, Gauge>)> = vec![
            (
                "connections",
                "Open WebSocket connections",
                Family::default(),
            ),
            (
                "subscriptions",
                "Active subscriptions (connection x channel)",
                Family::default(),
            ),
            (
                "channels",
                "Channels with a local subscriber",
                Family::default(),
            ),
        ];
        let counters: Vec<(&str, &str, Family<Labels, Counter>)> = vec![
            (
                "messages_in",
                "Client messages received (WebSocket and HTTP)",
                Family::default(),
            ),
            (
                "bytes_in",
                "Payload bytes of client messages received",
                Family::default(),
            ),
            ("publishes", "Messages published", Family::default()),
            (
                "messages_out",
                "Frames queued to connections (deliveries and replies)",
                Family::default(),
            ),
            (
                "bytes_out",
                "Bytes written to WebSocket connections",
                Family::default(),
            ),
            (
                "cross_core_messages",
                "Published frames received from other workers",
                Family::default(),
            ),
            (
                "slow_consumer_closes",
                "Connections closed with 4008 for not reading",
                Family::default(),
            ),
            (
                "expired_closes",
                "Connections closed with 4001 when their token expired",
                Family::default(),
            ),
            (
                "protocol_errors",
                "Connections failed for violating RFC 6455",
                Family::default(),
            ),
            (
                "pending_evictions",
                "Connections not yet upgraded closed to make room for newer ones (MAX_PENDING)",
                Family::default(),
            ),
            (
                "request_timeouts",
                "HTTP requests whose head or body did not arrive within HANDSHAKE_TIMEOUT (408)",
                Family::default(),
            ),
            (
                "pings_sent",
                "Keep-alive pings sent to silent WebSocket connections (PING_INTERVAL)",
                Family::default(),
            ),
            (
                "ping_timeouts",
                "Connections closed with 1001 for not answering a ping (PONG_TIMEOUT)",
                Family::default(),
            ),
        ];
        let mut out = Vec::with_capacity(workers);
        for w in 0..workers {
            let l: Labels = vec![("worker".into(), w.to_string())];
            out.push(WorkerMetrics {
                connections: families[0].2.get_or_create(&l).clone(),
                subscriptions: families[1].2.get_or_create(&l).clone(),
                channels: families[2].2.get_or_create(&l).clone(),
                messages_in: counters[0].2.get_or_create(&l).clone(),
                bytes_in: counters[1].2.get_or_create(&l).clone(),
                publishes: counters[2].2.get_or_create(&l).clone(),
                messages_out: counters[3].2.get_or_create(&l).clone(),
                bytes_out: counters[4].2.get_or_create(&l).clone(),
                cross_core_in: counters[5].2.get_or_create(&l).clone(),
                slow_consumer_closes: counters[6].2.get_or_create(&l).clone(),
                expired_closes: counters[7].2.get_or_create(&l).clone(),
                protocol_errors: counters[8].2.get_or_create(&l).clone(),
                pending_evictions: counters[9].2.get_or_create(&l).clone(),
                request_timeouts: counters[10].2.get_or_create(&l).clone(),
                pings_sent: counters[11].2.get_or_create(&l).clone(),
                ping_timeouts: counters[12].2.get_or_create(&l).clone(),
            });
        }
        for (name, help, fam) in families {
            registry.register(name, help, fam);
        }
        for (name, help, fam) in counters {
            registry.register(name, help, fam);
        }
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
        let channels_total = Gauge::default();
        registry.register(
            "channels_total",
            "Distinct channels with a subscriber on any worker",
            channels_total.clone(),
        );
        let workers_gauge: Gauge = Gauge::default();
        workers_gauge.set(workers as i64);
        registry.register("workers", "Reactor threads", workers_gauge);
        Metrics {
            registry,
            workers: out,
            rejected,
            authorizer,
            channels_total,
            outgoing,
            webhooks,
            webhook_drops,
        }
    }

    /// The counter of webhook events of `app` dropped for a full queue.
    pub fn webhook_events_dropped(&self, app: &str) -> Counter {
        self.webhook_drops
            .get_or_create(&vec![("app".to_string(), app.to_string())])
            .clone()
    }

    /// The duration histogram of outgoing requests to `target`
    /// (`authorizer` or `webhook`).
    pub fn outgoing(&self, target: &str) -> Histogram {
        self.outgoing
            .get_or_create(&vec![("target".to_string(), target.to_string())])
            .clone()
    }

    /// Counts a webhook batch of `app` with `outcome`.
    pub fn webhook(&self, app: &str, outcome: &str) {
        self.webhooks
            .get_or_create(&vec![
                ("app".to_string(), app.to_string()),
                ("outcome".to_string(), outcome.to_string()),
            ])
            .inc();
    }

    /// The handles of worker `id`.
    pub fn worker(&self, id: usize) -> WorkerMetrics {
        self.workers[id].clone()
    }

    /// Counts an upgrade refused for `reason`.
    pub fn reject(&self, reason: &str) {
        self.rejected
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
    }

    /// Counts an authorizer outcome for `action`.
    pub fn authorized(&self, action: &str, result: &str) {
        self.authorizer
            .get_or_create(&vec![
                ("action".to_string(), action.to_string()),
                ("result".to_string(), result.to_string()),
            ])
            .inc();
    }

    /// The text exposition, given the current distinct channel count.
    pub fn render(&self, channels_total: usize) -> String {
        self.channels_total.set(channels_total as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_worker_series() {
        let m = Metrics::new(2);
        m.worker(1).publishes.inc_by(5);
        m.worker(0).connections.inc();
        m.reject("max_connections");
        let text = m.render(3);
        assert!(
            text.contains("herald_publishes_total{worker=\"1\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("herald_connections{worker=\"0\"} 1"),
            "{text}"
        );
        assert!(text.contains("herald_rejected_upgrades_total{reason=\"max_connections\"} 1"));
        assert!(text.contains("herald_channels_total 3"));
    }
}
