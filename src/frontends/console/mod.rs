//! The debug console (`GET /console`, with `ADMIN_TOKEN`): one page served
//! by herald itself (no build step, no external assets) that shows the
//! node live: connections, channels and their subscribers (per app for
//! Pusher), a stream of events ([`crate::engine::watch`]) filterable by app
//! and channel, a chart of deliveries per second, and a form that
//! publishes a test event.
//!
//! The page polls `GET /console/state` twice a second; `POST
//! /console/publish` publishes. Every request carries the admin token
//! (`Authorization: Bearer`, or `?token=` for the page itself), compared in
//! constant time. Events are recorded only while a console polls.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::endpoint::{Answer, Endpoint, LocalFuture, Request, Upgrade};
use super::pusher::PusherShared;
use crate::engine::core::Core;
use crate::engine::presence::Presence;
use crate::engine::watch::{split_key, watch};
use crate::worker::{Shared, Worker};

/// The page: HTML, CSS and script in one file.
const PAGE: &str = include_str!("page.html");
/// Most channels listed per core (the most subscribed).
const CHANNELS_SHOWN: usize = 200;

/// The console's endpoint on one core.
pub struct Console {
    shared: Arc<Shared>,
    pusher: Option<Arc<PusherShared>>,
}

impl Console {
    pub fn new(shared: &Arc<Shared>, pusher: Option<Arc<PusherShared>>) -> Console {
        Console {
            shared: shared.clone(),
            pusher,
        }
    }

    /// Does the request carry the admin token?
    fn allowed(&self, req: &Request<'_>) -> bool {
        let Some(want) = self.shared.config.admin_token.as_deref() else {
            return false;
        };
        let given = req
            .head
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::to_string)
            .or_else(|| {
                req.head.query().and_then(|q| {
                    form_urlencoded::parse(q.as_bytes())
                        .find(|(k, _)| k == "token")
                        .map(|(_, v)| v.into_owned())
                })
            });
        given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(want.as_bytes())))
    }

    /// What the page shows, with the events after `after`.
    async fn state(&self, worker: &Worker, after: u64) -> Value {
        let now = crate::engine::watch::unix_ms();
        let (events, dropped) = watch().since(now, after);
        let apps = self.pusher.as_ref().map(|p| p.apps.get());
        let app_of = |ns: u16| -> Option<String> {
            let apps = apps.as_ref()?;
            Some(apps.get(ns.checked_sub(1)?)?.id.clone())
        };
        let events: Vec<Value> = events
            .iter()
            .map(|e| {
                json!({
                    "seq": e.seq, "at": e.at, "kind": e.kind,
                    "app": app_of(e.namespace), "channel": &*e.channel, "detail": e.detail,
                })
            })
            .collect();
        // Every core's channels, gathered on each core.
        let mut native: std::collections::BTreeMap<String, usize> = Default::default();
        for (key, n) in channel_counts(&worker.core).await {
            if let (0, channel) = split_key(&key) {
                *native.entry(channel.to_string()).or_default() += n;
            }
        }
        let mut channels: Vec<(String, usize)> = native.into_iter().collect();
        channels.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        channels.truncate(CHANNELS_SHOWN);
        let mut pusher_apps = Vec::new();
        if let (Some(p), Some(apps)) = (&self.pusher, &apps) {
            for app in apps.iter() {
                let ns = app.index + 1;
                let listed = p.presence.channels(&format!("{ns}#"));
                let connections = p
                    .app_connections
                    .get(usize::from(app.index))
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                pusher_apps.push(json!({
                    "id": app.id,
                    "connections": connections,
                    "channels": listed.iter().take(CHANNELS_SHOWN).map(|(k, info)| json!({
                        "name": split_key(k).1, "subscriptions": info.subscriptions, "users": info.users,
                    })).collect::<Vec<_>>(),
                }));
            }
        }
        let (mut published, mut delivered, mut slow) = (0, 0, 0);
        for w in 0..self.shared.workers {
            let s = self.shared.metrics.core(w);
            published += s.publishes.get();
            slow += s.slow_consumer_closes.get();
            delivered += s.namespaces.iter().map(|n| n.delivered.get()).sum::<u64>();
        }
        json!({
            "now": now,
            "connections": self.shared.connections.load(Ordering::Relaxed),
            "workers": self.shared.workers,
            "published": published,
            "delivered": delivered,
            "slow_consumer_closes": slow,
            "channels": channels.iter().map(|(c, n)| json!({"name": c, "subscribers": n})).collect::<Vec<_>>(),
            "apps": pusher_apps,
            "events": events,
            "dropped": dropped,
        })
    }

    /// Publishes the form's test event: a native message, or a Pusher
    /// event when it names an app.
    async fn publish(&self, worker: &Worker, body: &[u8]) -> Answer {
        let v: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return Answer::text(400, format!("not JSON: {e}\n")),
        };
        match (v.get("app").and_then(Value::as_str), &self.pusher) {
            (Some(app), Some(p)) if !app.is_empty() => {
                let trigger = json!({
                    "name": v.get("event").and_then(Value::as_str).unwrap_or("test"),
                    "channel": v.get("channel"),
                    "data": match v.get("data") {
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => String::new(),
                    },
                });
                let (status, content_type, body) = super::pusher::api::trigger_trusted(
                    p,
                    worker,
                    app,
                    trigger.to_string().as_bytes(),
                );
                Answer::new(status, content_type, body)
            }
            (Some(app), None) if !app.is_empty() => Answer::text(404, "no Pusher apps\n"),
            _ => super::native::publish_trusted(worker, body).await,
        }
    }
}

/// Every core's channel counts, asked of each core in turn.
async fn channel_counts(core: &Core) -> Vec<(Box<str>, usize)> {
    let mut all = Vec::new();
    for c in 0..core.hub.cores() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        core.run_on(
            c,
            Box::new(move |core: &Core| {
                let _ = tx.send(core.shard.borrow().channel_counts(CHANNELS_SHOWN));
            }),
        );
        if let Ok(counts) = rx.await {
            all.extend(counts);
        }
    }
    all
}

impl Endpoint for Console {
    fn serves_upgrade(&self, _path: &str) -> bool {
        false
    }

    fn upgrade(self: Rc<Self>, _up: Upgrade) -> LocalFuture<'static, ()> {
        Box::pin(async {})
    }

    fn serves_http(&self, path: &str) -> bool {
        path == "/console" || path.starts_with("/console/")
    }

    fn http<'a>(&'a self, worker: &'a Worker, req: Request<'a>) -> LocalFuture<'a, Answer> {
        Box::pin(async move {
            if self.shared.config.admin_token.is_none() {
                return Answer::text(404, "the console needs ADMIN_TOKEN\n");
            }
            if !self.allowed(&req) {
                return Answer::text(
                    401,
                    "the console needs the admin token: /console?token=...\n",
                );
            }
            match (req.head.method(), req.head.path()) {
                ("GET", "/console") => {
                    Answer::new(200, "text/html; charset=utf-8", PAGE.as_bytes().to_vec())
                }
                ("GET", "/console/state") => {
                    let after = req
                        .head
                        .query()
                        .and_then(|q| {
                            form_urlencoded::parse(q.as_bytes())
                                .find(|(k, _)| k == "after")
                                .and_then(|(_, v)| v.parse().ok())
                        })
                        .unwrap_or(0);
                    let v = self.state(worker, after).await;
                    Answer::json(200, v.to_string().into_bytes())
                }
                ("POST", "/console/publish") => self.publish(worker, req.body).await,
                _ => Answer::text(404, "not found\n"),
            }
        })
    }
}
