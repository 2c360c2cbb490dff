//! Personal channels and messages for offline users (Pushi's promises),
//! for Pusher apps: the HTTP API that manages a user's durable
//! subscriptions (`POST /apps/{id}/subscribe` and `/unsubscribe`, signed
//! like the rest of the API), and the subscription to `personal-{user_id}`
//! (or `private-personal-{user_id}`) that follows them.
//!
//! Following is the engine's ([`crate::engine::personal`]): the user's
//! connection is subscribed to each of the user's channels, gets what it
//! missed from their history first, and acknowledges what it read with the
//! pongs of the pings queued behind it. Events keep the channel they were
//! published on (pusher-js hands them to `bind_global` and to global
//! `bind`s), so every subscriber shares one frame per message.

use std::sync::Arc;

use serde_json::json;

use super::apps::App;
use super::wire::{self, ChannelKind};
use crate::engine::core::{Core, Join};
use crate::engine::message::route_key_string;
use crate::engine::personal::{Cursor, DurableError};
use crate::engine::shard::SubscribeError;
use crate::worker::Worker;

/// Is this a request of the durable subscriptions API?
pub fn is_api_path(path: &str) -> bool {
    path.starts_with("/apps/") && (path.ends_with("/subscribe") || path.ends_with("/unsubscribe"))
}

/// Is `channel` a personal channel (with a user id)?
pub fn is_personal(channel: &str) -> bool {
    user_of(channel).is_some()
}

/// The user whose personal channel `channel` is.
fn user_of(channel: &str) -> Option<&str> {
    channel
        .strip_prefix(wire::PERSONAL)
        .or_else(|| channel.strip_prefix(wire::PRIVATE_PERSONAL))
        .filter(|id| !id.is_empty())
}

/// Queues a reply, behind any still being prepared on another core.
fn reply(core: &Core, key: usize, frame: bytes::Bytes) {
    core.shard.borrow_mut().reply(key, frame);
}

/// Connection `key` (of namespace `ns`), allowed to, subscribes to
/// `channel`, the personal channel of `user`: it follows every channel the
/// user subscribed to durably, from where the user last read each.
pub fn follow_user(worker: &Worker, key: usize, ns: u16, user: &str, channel: &str) {
    let core = &worker.core;
    if core.hub.broker().is_some() {
        let msg = "personal channels are kept by each node; they are not available in a cluster";
        reply(
            core,
            key,
            wire::subscription_error(channel, "Unsupported", msg, 501),
        );
        return;
    }
    let Some(gen) = core.shard.borrow().conn(key).map(|c| c.gen) else {
        return;
    };
    let other = core
        .shard
        .borrow()
        .follow
        .follower(key)
        .filter(|f| f.namespace != ns || &*f.user != user)
        .map(|f| f.user.to_string());
    if let Some(other) = other {
        let msg = format!("this connection follows user {other}'s personal channel already");
        reply(
            core,
            key,
            wire::subscription_error(channel, "AuthError", &msg, 403),
        );
        return;
    }
    let started = core.shard.borrow_mut().follow.start(key, gen, ns, user);
    reply(core, key, wire::subscription_succeeded(channel, None));
    if !started {
        return;
    }
    for (name, cursor) in core.hub.durable.of(ns, user) {
        follow_channel(core, key, gen, ns, &name, cursor);
    }
}

/// `key` follows `channel` for its user from `cursor`: what it missed
/// goes out in order, behind the replies before it.
fn follow_channel(core: &Core, key: usize, gen: u64, ns: u16, channel: &str, cursor: Cursor) {
    let route = route_key_string(ns, channel);
    let keep = core
        .hub
        .keeps(ns, channel)
        .unwrap_or_else(|| core.hub.durable.keep());
    let ticket = core.shard.borrow_mut().reserve_reply(key, gen);
    let name: Box<str> = channel.into();
    let joined = Box::new(move |core: &Core, result: Result<Join, SubscribeError>| {
        let frames = match result {
            Ok(join) => join.replay,
            Err(e) => {
                let msg = format!("{name} is not followed: {}", reason(e));
                vec![wire::error(None, &msg)]
            }
        };
        core.shard.borrow_mut().fill_reply(key, gen, ticket, frames);
    });
    core.follow(key, &route, channel, keep, Some(cursor), joined);
}

fn reason(e: SubscribeError) -> String {
    match e {
        SubscribeError::TooMany(n) => format!("subscription limit of {n} channels reached"),
        SubscribeError::Unavailable => "the cluster is unreachable".into(),
    }
}

/// `key` unsubscribes from `channel`, a personal channel: if it follows
/// that user, it stops (its own subscriptions stay).
pub fn unfollow_user(worker: &Worker, key: usize, ns: u16, channel: &str) {
    let core = &worker.core;
    let follows = user_of(channel).is_some_and(|user| {
        core.shard
            .borrow()
            .follow
            .follower(key)
            .is_some_and(|f| f.namespace == ns && &*f.user == user)
    });
    if follows {
        core.unfollow(key);
    }
}

/// A durable subscription request's body: `user_id`, and `channel` (or
/// `event`, Pushi's name for it).
#[derive(serde::Deserialize)]
struct Body {
    user_id: String,
    channel: Option<String>,
    event: Option<String>,
}

/// Why a durable subscription request is refused (400).
fn parse_body(body: &[u8]) -> Result<(String, String), String> {
    let b: Body = serde_json::from_slice(body)
        .map_err(|e| format!("expected {{\"user_id\": ..., \"channel\": ...}}: {e}"))?;
    let channel = b
        .channel
        .or(b.event)
        .ok_or("channel (or event) is required")?;
    // The user's personal channel must be a valid channel name.
    if b.user_id.is_empty()
        || wire::validate_channel(&format!("{}{}", wire::PERSONAL, b.user_id)).is_err()
    {
        return Err("user_id: 1 to 155 characters of A-Z a-z 0-9 _ - = @ , . ;".into());
    }
    match wire::validate_channel(&channel) {
        Ok(ChannelKind::Public | ChannelKind::Private | ChannelKind::PrivateEncrypted)
            if !is_personal(&channel) => {}
        Ok(kind) => {
            return Err(format!(
                "{channel}: {} channels cannot be subscribed to durably",
                kind.as_str()
            ))
        }
        Err(e) => return Err(format!("{channel}: {e}")),
    }
    Ok((b.user_id, channel))
}

/// An answer: status, content type, body (as [`super::api::Answer`]).
type Answer = (u16, &'static str, Vec<u8>);

fn text(status: u16, msg: impl Into<String>) -> Answer {
    (status, "text/plain; charset=utf-8", msg.into().into_bytes())
}

fn ok_json(v: serde_json::Value) -> Answer {
    (200, "application/json", v.to_string().into_bytes())
}

/// Answers `POST /apps/{id}/subscribe` and `/unsubscribe` of `app`, once
/// its signature is checked (`rest`: the path after `/apps/{id}/`).
pub async fn api(
    worker: &Worker,
    app: &App,
    method: &str,
    path: &str,
    rest: &str,
    body: &[u8],
) -> Answer {
    let subscribe = match rest {
        "subscribe" => true,
        "unsubscribe" => false,
        _ => return text(404, format!("Not found: {path}")),
    };
    if method != "POST" {
        return text(405, "Method not allowed");
    }
    let (user, channel) = match parse_body(body) {
        Ok(b) => b,
        Err(e) => return text(400, e),
    };
    let core = &worker.core;
    if core.hub.broker().is_some() {
        return text(
            501,
            "personal channels are kept by each node; they are not available in a cluster",
        );
    }
    let ns = app.index + 1;
    let user: Arc<str> = user.into();
    let channel: Arc<str> = channel.into();
    if !subscribe {
        let was = core.hub.durable.unsubscribe(ns, &user, &channel);
        if was {
            on_every_core(core, move |c| {
                let route = route_key_string(ns, &channel);
                let following = c.shard.borrow().follow.following(ns, &user);
                for (key, _) in following {
                    c.unfollow_channel(key, &route);
                }
            });
        }
        return ok_json(json!({ "unsubscribed": was }));
    }
    // From the channel's place now: what is published after this answer
    // reaches the user.
    let keep = crate::engine::history::Keep::widest(
        core.hub.keeps(ns, &channel),
        Some(core.hub.durable.keep()),
    )
    .unwrap_or_else(|| core.hub.durable.keep());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let route = route_key_string(ns, &channel);
    core.place_of(
        &route,
        keep,
        Box::new(move |_, cursor| {
            let _ = tx.send(cursor);
        }),
    );
    let Ok(Some(cursor)) = rx.await else {
        return text(503, "the server is shutting down");
    };
    match core
        .hub
        .durable
        .subscribe(ns, &user, &channel, cursor.clone())
    {
        Ok(true) => {
            on_every_core(core, move |c| {
                let following = c.shard.borrow().follow.following(ns, &user);
                for (key, gen) in following {
                    follow_channel(c, key, gen, ns, &channel, cursor.clone());
                }
            });
            ok_json(json!({ "subscribed": true }))
        }
        Ok(false) => ok_json(json!({ "subscribed": false })),
        Err(e @ (DurableError::TooMany(_) | DurableError::Full(_))) => text(409, e.to_string()),
    }
}

/// Runs `task` on every core of the node (this one included).
fn on_every_core(core: &Core, task: impl Fn(&Core) + Send + Sync + 'static) {
    let task = Arc::new(task);
    for dst in 0..core.hub.cores() {
        let t = task.clone();
        core.run_on(dst, Box::new(move |c: &Core| t(c)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_name_a_user_and_a_channel_that_can_be_followed() {
        let ok = |b: &str| parse_body(b.as_bytes());
        assert_eq!(
            ok(r#"{"user_id":"u1","channel":"news"}"#),
            Ok(("u1".into(), "news".into()))
        );
        assert_eq!(
            ok(r#"{"user_id":"u1","event":"private-a"}"#),
            Ok(("u1".into(), "private-a".into())),
            "Pushi's event"
        );
        for bad in [
            r#"{"user_id":"u1"}"#,
            r#"{"channel":"news"}"#,
            r#"{"user_id":"","channel":"news"}"#,
            r#"{"user_id":"a b","channel":"news"}"#,
            r#"{"user_id":"u1","channel":"presence-room"}"#,
            r#"{"user_id":"u1","channel":"personal-u2"}"#,
            r##"{"user_id":"u1","channel":"#server-to-user-u1"}"##,
            r#"{"user_id":"u1","channel":"bad name"}"#,
            "not json",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn personal_channels_name_their_user() {
        assert_eq!(user_of("personal-42"), Some("42"));
        assert_eq!(user_of("private-personal-42"), Some("42"));
        assert_eq!(user_of("personal-"), None);
        assert_eq!(user_of("news"), None);
        assert!(is_api_path("/apps/1/subscribe"));
        assert!(is_api_path("/apps/1/unsubscribe"));
        assert!(!is_api_path("/apps/1/events"));
    }
}
