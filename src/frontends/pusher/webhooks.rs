//! Pusher webhooks: `channel_occupied`, `channel_vacated`, `member_added`,
//! `member_removed` and `client_event`, POSTed to each app's webhook URLs
//! as `{"time_ms":..,"events":[..]}` with `X-Pusher-Key` and
//! `X-Pusher-Signature` (hex HMAC-SHA256 of the body with the app secret).
//!
//! Reactors never wait on a webhook: they hand events to a bounded queue
//! ([`Webhooks::send`] never blocks; a full queue drops and counts). One
//! thread of its own runs a small event loop: a dispatcher files each event
//! into the lane of every (app, URL) that wants it, and each lane is a task
//! of its own, so one slow or dead receiver only ever delays its own
//! batches. A lane gathers what arrives within [`BATCH_WINDOW`] (at most
//! [`BATCH_MAX`] events), POSTs it through [`crate::transport::http1::client`], and
//! retries with exponential backoff on 5xx, timeouts and failed
//! connections, each retry on a fresh connection. Batches of a lane go out
//! in order, one at a time. Each event is queued exactly once, by the core
//! whose presence update decided it (see [`crate::engine::presence`]). Outcomes are
//! counted per app in `herald_pusher_webhook_batches_total`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serde_json::Value;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::apps::{App, WebhookEvent};
use super::sign;
use crate::integrations::authorizer::{decide, Decision};
use crate::integrations::metrics::Metrics;
use crate::transport::http1::client::{Client, Target};

/// How long a lane waits for more events before posting a batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Most events in one POST.
pub const BATCH_MAX: usize = 100;
/// Events waiting for the sender thread before new ones are dropped.
const QUEUE: usize = 100_000;
/// Events one lane (app, URL) may hold while its receiver is down.
const LANE_QUEUE: usize = 10_000;
/// Attempts per batch (the first and the retries).
const ATTEMPTS: u32 = 6;
/// Wait before the first retry; doubles each time.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// Largest answer read from a webhook receiver (and then ignored).
const MAX_ANSWER: usize = 64 * 1024;

/// One event for one app.
struct Queued {
    app: Arc<App>,
    kind: WebhookEvent,
    event: Value,
}

/// What the sender thread counts, per app.
#[derive(Clone)]
pub struct WebhookMetrics {
    metrics: Arc<Metrics>,
    latency: Histogram,
}

impl WebhookMetrics {
    pub fn new(metrics: Arc<Metrics>) -> WebhookMetrics {
        let latency = metrics.outgoing("webhook");
        WebhookMetrics { metrics, latency }
    }

    fn batch(&self, app: &App, outcome: &str) {
        self.metrics.webhook(&app.id, outcome);
    }

    fn dropped_events(&self, app: &App) -> Counter {
        self.metrics.webhook_events_dropped(&app.id)
    }
}

/// The handle reactors queue webhook events on.
pub struct Webhooks {
    tx: mpsc::Sender<Queued>,
    metrics: WebhookMetrics,
    pub dropped: AtomicU64,
}

impl Webhooks {
    /// Starts the sender thread if any app has a webhook.
    /// Starts the sender thread if `any` app may have webhooks.
    pub fn start(any: bool, timeout: Duration, metrics: WebhookMetrics) -> Option<Webhooks> {
        if !any {
            return None;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let m = metrics.clone();
        let spawned = std::thread::Builder::new()
            .name("herald-webhooks".into())
            .spawn(move || run(rx, timeout, m));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the webhook thread: webhooks are off");
            return None;
        }
        Some(Webhooks {
            tx,
            metrics,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues `event` (its `name` already set) if `app` has a webhook for
    /// `kind`. Never blocks.
    pub fn send(&self, app: &Arc<App>, kind: WebhookEvent, event: Value) {
        if !app.webhooks.iter().any(|w| w.wants(kind)) {
            return;
        }
        let q = Queued {
            app: app.clone(),
            kind,
            event,
        };
        let why = match self.tx.try_send(q) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "webhook queue full",
            Err(TrySendError::Closed(_)) => "webhook sender thread gone",
        };
        self.metrics.dropped_events(app).inc();
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(dropped = n, "{why}: webhook events dropped");
        }
    }
}

/// The body of one webhook POST.
pub fn body(time_ms: u64, events: &[Value]) -> Vec<u8> {
    let v = serde_json::json!({ "time_ms": time_ms, "events": events });
    v.to_string().into_bytes()
}

/// The sender thread: runs the dispatcher until every sender is gone.
fn run(rx: mpsc::Receiver<Queued>, timeout: Duration, metrics: WebhookMetrics) {
    let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build();
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "webhook runtime failed to start: webhooks are off");
            return;
        }
    };
    rt.block_on(dispatch(rx, timeout, metrics));
}

/// One receiver's queue: an app and one of its webhook URLs.
struct Lane {
    app: Arc<App>,
    target: Target,
    events: RefCell<VecDeque<Value>>,
    waker: RefCell<Option<Waker>>,
}

impl Lane {
    fn push(&self, event: Value, metrics: &WebhookMetrics) {
        let mut q = self.events.borrow_mut();
        if q.len() >= LANE_QUEUE {
            metrics.dropped_events(&self.app).inc();
            return;
        }
        q.push_back(event);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    async fn wait_for_events(&self) {
        poll_fn(|cx| {
            if self.events.borrow().is_empty() {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    fn take_batch(&self) -> Vec<Value> {
        let mut q = self.events.borrow_mut();
        let n = q.len().min(BATCH_MAX);
        q.drain(..n).collect()
    }
}

/// Files each event into the lane of every (app, URL) that wants it,
/// starting a lane's task the first time it is needed.
async fn dispatch(mut rx: mpsc::Receiver<Queued>, timeout: Duration, metrics: WebhookMetrics) {
    let client = Rc::new(Client::new(MAX_ANSWER, Some(metrics.latency.clone())));
    let mut lanes: HashMap<(u16, usize), Rc<Lane>> = HashMap::new();
    while let Some(q) = rx.recv().await {
        for (i, hook) in q.app.webhooks.iter().enumerate() {
            if !hook.wants(q.kind) {
                continue;
            }
            let lane = lanes.entry((q.app.index, i)).or_insert_with(|| {
                // URLs were validated when the apps were loaded.
                let target = Target::parse(&hook.url)
                    .unwrap_or_else(|_| Target::parse("http://0.0.0.0/").expect("static URL"));
                let lane = Rc::new(Lane {
                    app: q.app.clone(),
                    target,
                    events: RefCell::default(),
                    waker: RefCell::default(),
                });
                monoio::spawn(run_lane(
                    lane.clone(),
                    client.clone(),
                    timeout,
                    metrics.clone(),
                ));
                lane
            });
            lane.push(q.event.clone(), &metrics);
        }
    }
}

/// Posts one lane's batches, in order, until the thread ends.
async fn run_lane(lane: Rc<Lane>, client: Rc<Client>, timeout: Duration, metrics: WebhookMetrics) {
    loop {
        lane.wait_for_events().await;
        monoio::time::sleep(BATCH_WINDOW).await;
        let events = lane.take_batch();
        if events.is_empty() {
            continue;
        }
        let body = Bytes::from(body(crate::clock::unix_ms(), &events));
        post(&client, &lane.app, &lane.target, body, timeout, &metrics).await;
    }
}

/// POSTs one batch, retrying while the receiver is down.
async fn post(
    client: &Client,
    app: &App,
    target: &Target,
    body: Bytes,
    timeout: Duration,
    metrics: &WebhookMetrics,
) {
    let signature = sign::webhook_signature(app.secret.as_bytes(), &body);
    let headers = [
        ("content-type", "application/json"),
        ("x-pusher-key", app.key.as_str()),
        ("x-pusher-signature", signature.as_str()),
    ];
    let url = target.url.as_str();
    let mut wait = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        // A retry never trusts a pooled connection: the last one failed.
        let reuse = attempt == 1;
        let outcome = match client
            .post(target, &headers, body.clone(), timeout, reuse)
            .await
        {
            Ok(r) => decide(r.status, Bytes::new()),
            Err(e) => Decision::Unavailable(e.to_string()),
        };
        let w = crate::engine::watch::watch();
        if w.on() {
            let detail = match &outcome {
                Decision::Allow(_) => format!("delivered to {url}"),
                Decision::Deny(status) => format!("refused ({status}) by {url}"),
                Decision::Unavailable(why) => format!("attempt {attempt} to {url} failed: {why}"),
            };
            let ns = app.index + 1;
            w.record("webhook", ns, "", detail);
        }
        match outcome {
            Decision::Allow(_) => {
                metrics.batch(app, "delivered");
                return;
            }
            Decision::Deny(status) => {
                metrics.batch(app, "refused");
                tracing::warn!(app = %app.id, url, status, "webhook refused a batch; not retried");
                return;
            }
            Decision::Unavailable(why) if attempt < ATTEMPTS => {
                metrics.batch(app, "retried");
                tracing::debug!(app = %app.id, url, error = %why, attempt, "webhook failed; retrying");
                monoio::time::sleep(wait).await;
                wait *= 2;
            }
            Decision::Unavailable(why) => {
                metrics.batch(app, "dropped");
                tracing::warn!(app = %app.id, url, error = %why, "webhook batch dropped after {ATTEMPTS} attempts");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let a = serde_json::json!({"name":"channel_occupied","channel":"c"});
        let b: Value = serde_json::from_slice(&body(5, std::slice::from_ref(&a))).unwrap();
        assert_eq!(b, serde_json::json!({"time_ms":5,"events":[a]}));
    }
}
