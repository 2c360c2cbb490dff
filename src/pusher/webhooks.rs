//! Pusher webhooks: `channel_occupied`, `channel_vacated`, `member_added`,
//! `member_removed` and `client_event`, POSTed to each app's webhook URLs
//! as `{"time_ms":..,"events":[..]}` with `X-Pusher-Key` and
//! `X-Pusher-Signature` (hex HMAC-SHA256 of the body with the app secret).
//!
//! Reactors never wait on a webhook: they hand events to a bounded queue
//! ([`Webhooks::send`] never blocks; a full queue drops and counts). One
//! thread of its own drains it: it gathers what arrives within
//! [`BATCH_WINDOW`] (at most [`BATCH_MAX`] events), POSTs one batch per
//! (app, URL) through a keep-alive HTTP client, and retries a batch with
//! exponential backoff on 5xx, timeouts and refused connections. Batches
//! go out in order, one at a time. Each event is queued exactly once, by
//! the core whose registry update decided it (see [`super::registry`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde_json::Value;

use super::apps::{App, Apps, WebhookEvent};
use super::sign;
use crate::authorizer::{decide, Decision};

/// How long the sender waits for more events before posting a batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(50);
/// Most events in one POST.
pub const BATCH_MAX: usize = 100;
/// Events waiting to be sent before new ones are dropped.
const QUEUE: usize = 100_000;
/// Attempts per batch (the first and the retries).
const ATTEMPTS: u32 = 6;
/// Wait before the first retry; doubles each time.
const FIRST_RETRY: Duration = Duration::from_millis(250);

/// One event for one app.
struct Queued {
    app: Arc<App>,
    kind: WebhookEvent,
    event: Value,
}

/// The handle reactors queue webhook events on.
pub struct Webhooks {
    tx: Sender<Queued>,
    pub dropped: AtomicU64,
}

impl Webhooks {
    /// Starts the sender thread if any app has a webhook.
    pub fn start(apps: &Apps, timeout: Duration) -> Option<Webhooks> {
        if apps.iter().all(|a| a.webhooks.is_empty()) {
            return None;
        }
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("herald-webhooks".into())
            .spawn(move || run(rx, timeout));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the webhook thread: webhooks are off");
            return None;
        }
        Some(Webhooks {
            tx,
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
            Err(TrySendError::Disconnected(_)) => "webhook sender thread gone",
        };
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(dropped = n, "{why}: webhook events dropped");
        }
    }
}

/// The body of one webhook POST.
pub fn body(time_ms: u64, events: &[&Value]) -> Vec<u8> {
    let v = serde_json::json!({ "time_ms": time_ms, "events": events });
    v.to_string().into_bytes()
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The sender thread: batches, posts, retries, until every sender is gone.
fn run(rx: Receiver<Queued>, timeout: Duration) {
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
    // The client's pool needs the runtime's timer: build it inside.
    let client = rt.block_on(async { monoio_http_client::Builder::new().http1_client().build() });
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let until = Instant::now() + BATCH_WINDOW;
        while batch.len() < BATCH_MAX {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(q) => batch.push(q),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // One POST per (app, URL), events in the order they were queued.
        let mut posts: Vec<(Arc<App>, String, Vec<&Value>)> = Vec::new();
        for q in &batch {
            for hook in q.app.webhooks.iter().filter(|w| w.wants(q.kind)) {
                match posts
                    .iter_mut()
                    .find(|p| Arc::ptr_eq(&p.0, &q.app) && p.1 == hook.url)
                {
                    Some(p) => p.2.push(&q.event),
                    None => posts.push((q.app.clone(), hook.url.clone(), vec![&q.event])),
                }
            }
        }
        for (app, url, events) in posts {
            let body = Bytes::from(body(unix_ms(), &events));
            rt.block_on(post(&client, &app, &url, body, timeout));
        }
    }
}

/// POSTs one batch, retrying while the receiver is down.
async fn post(
    client: &monoio_http_client::Client,
    app: &App,
    url: &str,
    body: Bytes,
    timeout: Duration,
) {
    let signature = sign::webhook_signature(app.secret.as_bytes(), &body);
    let mut wait = FIRST_RETRY;
    for attempt in 1..=ATTEMPTS {
        let call = async {
            let resp = client
                .post(url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header("X-Pusher-Key", app.key.as_str())
                .header("X-Pusher-Signature", signature.as_str())
                .send_body(body.clone())
                .await?;
            let status = resp.status().as_u16();
            let _ = resp.bytes().await?;
            Ok::<_, monoio_http_client::Error>(status)
        };
        let outcome = match monoio::time::timeout(timeout, call).await {
            Ok(Ok(status)) => decide(status, Bytes::new()),
            Ok(Err(e)) => Decision::Unavailable(e.to_string()),
            Err(_) => Decision::Unavailable("timed out".into()),
        };
        match outcome {
            Decision::Allow(_) => return,
            Decision::Deny(status) => {
                tracing::warn!(app = %app.id, url, status, "webhook refused a batch; not retried");
                return;
            }
            Decision::Unavailable(why) if attempt < ATTEMPTS => {
                tracing::debug!(app = %app.id, url, error = %why, attempt, "webhook failed; retrying");
                monoio::time::sleep(wait).await;
                wait *= 2;
            }
            Decision::Unavailable(why) => {
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
        let b: Value = serde_json::from_slice(&body(5, &[&a])).unwrap();
        assert_eq!(b, serde_json::json!({"time_ms":5,"events":[a]}));
    }
}
