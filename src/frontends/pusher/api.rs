//! The Pusher HTTP API (`/apps/{app_id}/...`), signed as Pusher signs:
//! triggering events (`events`, `batch_events`), querying channels and
//! presence users, and terminating a user's connections.
//!
//! Routing and answers are here; the signature check is
//! [`super::sign::verify_api_request`] and the body parsing
//! [`super::wire::parse_trigger`]. A trigger is encoded once per channel
//! and fanned out like any publish.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::apps::App;
use super::connection::{channel_of, published};
use super::wire::{self, ChannelKind};
use super::PusherShared;
use crate::engine::presence::Presence;
use crate::worker::Worker;

/// An answer: status, content type, body.
pub type Answer = (u16, &'static str, Vec<u8>);

fn text(status: u16, msg: impl Into<String>) -> Answer {
    (status, "text/plain; charset=utf-8", msg.into().into_bytes())
}

fn ok_json(v: Value) -> Answer {
    (200, "application/json", v.to_string().into_bytes())
}

/// Is this request for the Pusher API?
pub fn is_api_path(path: &str) -> bool {
    path.starts_with("/apps/")
}

/// Triggers an event (a `POST /apps/{id}/events` body) for the debug
/// console, which is trusted (behind its admin token): no signature.
pub fn trigger_trusted(
    shared: &PusherShared,
    worker: &Worker,
    app_id: &str,
    body: &[u8],
) -> Answer {
    let Some(app) = shared.apps.get().by_id(app_id).cloned() else {
        return text(404, format!("Unknown app id {app_id}"));
    };
    trigger(shared, worker, &app, app.index + 1, body, false)
}

/// The app an API request is for, once its signature is checked, and the
/// rest of its path (after `/apps/{id}/`); or the refusal.
pub fn authorize<'p>(
    shared: &PusherShared,
    method: &str,
    path: &'p str,
    query: &str,
    body: &[u8],
    now_unix: u64,
) -> Result<(Arc<App>, &'p str), Answer> {
    let rest = &path["/apps/".len()..];
    let (app_id, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(app) = shared.apps.get().by_id(app_id).cloned() else {
        return Err(text(404, format!("Unknown app id {app_id}")));
    };
    if let Err(e) = super::sign::verify_api_request(&app, method, path, query, body, now_unix) {
        return Err(text(e.status(), e.to_string()));
    }
    if !app.enabled {
        return Err(text(403, "App is disabled"));
    }
    Ok((app, rest))
}

/// Answers one API request.
pub fn handle(
    shared: &PusherShared,
    worker: &Worker,
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    now_unix: u64,
) -> Answer {
    let (app, rest) = match authorize(shared, method, path, query, body, now_unix) {
        Ok(a) => a,
        Err(answer) => return answer,
    };
    let app = &app;
    let ns = app.index + 1;
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let segments: Vec<&str> = rest.split('/').collect();
    match (method, segments.as_slice()) {
        ("POST", ["events"]) => trigger(shared, worker, app, ns, body, false),
        ("POST", ["batch_events"]) => trigger(shared, worker, app, ns, body, true),
        ("GET", ["channels"]) => channels(shared, ns, param("filter_by_prefix"), param("info")),
        ("GET", ["channels", name]) => channel(shared, ns, name, param("info")),
        ("GET", ["channels", name, "users"]) => users(shared, ns, name),
        ("POST", ["users", user_id, "terminate_connections"]) => {
            shared.terminate_here(ns, user_id);
            // And on every other node of the cluster.
            if let Some(b) = worker.core.hub.broker() {
                b.announce(crate::engine::roster::Event::Terminate {
                    node: b.node().into(),
                    ns,
                    user: (*user_id).into(),
                });
            }
            ok_json(json!({}))
        }
        (_, ["events" | "batch_events" | "channels"])
        | (_, ["channels", _])
        | (_, ["channels", _, "users"])
        | (_, ["users", _, "terminate_connections"]) => text(405, "Method not allowed"),
        _ => text(404, format!("Not found: {path}")),
    }
}

fn trigger(
    shared: &PusherShared,
    worker: &Worker,
    app: &App,
    ns: u16,
    body: &[u8],
    batch: bool,
) -> Answer {
    // Pusher's per-event limit, per app (10 KB unless configured).
    let limit = app.max_event_bytes();
    let events = if batch {
        wire::parse_batch(body)
    } else {
        wire::parse_trigger(body).map(|t| vec![t])
    };
    let events = match events {
        Ok(e) => e,
        Err(e) => return text(400, e.to_string()),
    };
    for ev in &events {
        if let Err(e) = wire::check_data_size(ev, limit) {
            return text(413, e.to_string());
        }
        for ch in &ev.channels {
            if let Err(e) = wire::validate_channel(ch) {
                return text(400, format!("Invalid channel name {ch}: {e}"));
            }
        }
    }
    // In a cluster, events that could reach no other node are refused.
    if let Some(why) = worker.core.hub.broker().and_then(|b| b.unavailable()) {
        return text(503, format!("cluster unavailable: {why}"));
    }
    for ev in &events {
        // `data` is a string in the API; subscribers get that JSON string
        // literal exactly as the backend sent it.
        let data = ev.data_json.as_str();
        let except = ev
            .socket_id
            .as_deref()
            .and_then(|s| super::socket::parse(s, worker.shared.workers));
        for ch in &ev.channels {
            let frame = wire::event_frame_routed(&ev.name, ch, data, None);
            let mut msg = published(frame, ns);
            if let Some(ex) = except {
                match ex.node == shared.node_tag() {
                    true => msg.set_except(ex.worker, ex.key, ex.gen),
                    // On another node of the cluster.
                    false => msg.set_except_at(u64::from(ex.node), ex.worker, ex.key, ex.gen),
                }
            }
            worker.core.stats.messages_in.inc();
            worker.core.publish(msg, None);
        }
    }
    // `info` asks for channel attributes back (after the publish).
    let attrs = |ev: &wire::TriggerBody, ch: &str| -> Map<String, Value> {
        let mut m = Map::new();
        let Some(info) = ev.info.as_deref() else {
            return m;
        };
        let c = shared
            .presence
            .channel(&crate::engine::message::route_key_string(ns, ch));
        for what in info.split(',').map(str::trim) {
            match what {
                "subscription_count" => {
                    m.insert(
                        what.into(),
                        c.as_ref().map_or(0, |c| c.subscriptions).into(),
                    );
                }
                "user_count" if ch.starts_with("presence-") => {
                    m.insert(what.into(), c.as_ref().map_or(0, |c| c.users).into());
                }
                _ => {}
            }
        }
        m
    };
    if batch {
        let items: Vec<Value> = events
            .iter()
            .map(|ev| {
                Value::Object(
                    ev.channels
                        .first()
                        .map(|c| attrs(ev, c))
                        .unwrap_or_default(),
                )
            })
            .collect();
        return ok_json(json!({ "batch": items }));
    }
    let ev = &events[0];
    if ev.info.is_none() {
        return ok_json(json!({}));
    }
    let channels: Map<String, Value> = ev
        .channels
        .iter()
        .map(|c| (c.clone(), Value::Object(attrs(ev, c))))
        .collect();
    ok_json(json!({ "channels": channels }))
}

fn channels(shared: &PusherShared, ns: u16, prefix: Option<&str>, info: Option<&str>) -> Answer {
    let prefix = prefix.unwrap_or("");
    let want_users = info.is_some_and(|i| i.split(',').any(|x| x == "user_count"));
    if want_users && !prefix.starts_with("presence-") {
        return text(
            400,
            "info=user_count is only allowed with filter_by_prefix=presence-",
        );
    }
    let key_prefix = crate::engine::message::route_key_string(ns, prefix);
    let mut out = Map::new();
    for (key, c) in shared.presence.channels(&key_prefix) {
        let mut attrs = Map::new();
        if want_users {
            attrs.insert("user_count".into(), c.users.into());
        }
        out.insert(channel_of(&key).to_string(), Value::Object(attrs));
    }
    ok_json(json!({ "channels": out }))
}

fn channel(shared: &PusherShared, ns: u16, name: &str, info: Option<&str>) -> Answer {
    let kind = match wire::validate_channel(name) {
        Ok(k) => k,
        Err(e) => return text(400, format!("Invalid channel name {name}: {e}")),
    };
    let wants = |what: &str| info.is_some_and(|i| i.split(',').any(|x| x == what));
    if wants("user_count") && kind != ChannelKind::Presence {
        return text(400, "info=user_count is only allowed for presence channels");
    }
    let key = crate::engine::message::route_key_string(ns, name);
    let c = shared.presence.channel(&key);
    let mut out = json!({ "occupied": c.is_some() });
    if let Some(c) = c {
        if wants("user_count") {
            out["user_count"] = c.users.into();
        }
        if wants("subscription_count") {
            out["subscription_count"] = c.subscriptions.into();
        }
    }
    ok_json(out)
}

fn users(shared: &PusherShared, ns: u16, name: &str) -> Answer {
    match wire::validate_channel(name) {
        Ok(ChannelKind::Presence) => {}
        Ok(_) => return text(400, "users are only available for presence channels"),
        Err(e) => return text(400, format!("Invalid channel name {name}: {e}")),
    }
    let key = crate::engine::message::route_key_string(ns, name);
    let users: Vec<Value> = shared
        .presence
        .users(&key)
        .iter()
        .map(|u| json!({ "id": &**u }))
        .collect();
    ok_json(json!({ "users": users }))
}
