//! Personal channels and messages for offline users (Pushi's promises),
//! what the protocols share: a user's durable subscriptions, made and
//! ended through their HTTP APIs, and the subscription to the user's
//! personal channel that follows them (the engine's
//! [`crate::engine::personal`]). Each front-end checks who may do what
//! and writes its own frames; this module does the rest.
//!
//! A durable subscription starts at the channel's place when it is made
//! (what is published after the API answers reaches the user) and
//! applies at once to the user's connections that follow it. Messages
//! keep the channel they were published on, so every subscriber shares
//! one frame per message.

use std::sync::Arc;

use bytes::Bytes;

use crate::engine::core::Core;
use crate::engine::message::route_key_string;
use crate::engine::personal::DurableError;

/// The prefix of a personal channel: `personal-{user_id}`.
pub const PERSONAL: &str = "personal-";

/// The user whose personal channel `channel` is (`personal-{user_id}`).
pub fn user_of(channel: &str) -> Option<&str> {
    channel.strip_prefix(PERSONAL).filter(|id| !id.is_empty())
}

/// A durable subscription request's body: `user_id`, and `channel` (or
/// `event`, Pushi's name for it).
#[derive(Debug, serde::Deserialize)]
struct Request {
    user_id: String,
    channel: Option<String>,
    event: Option<String>,
}

/// Parses a request body into (user, channel), or says why not.
pub fn parse_request(body: &[u8]) -> Result<(String, String), String> {
    let r: Request = serde_json::from_slice(body)
        .map_err(|e| format!("expected {{\"user_id\": ..., \"channel\": ...}}: {e}"))?;
    let channel = r
        .channel
        .or(r.event)
        .ok_or("channel (or event) is required")?;
    if r.user_id.is_empty() {
        return Err("user_id is required".into());
    }
    Ok((r.user_id, channel))
}

/// Why the node refuses personal channels: they are kept by each node.
pub const NOT_IN_A_CLUSTER: &str =
    "personal channels are kept by each node; they are not available in a cluster";

/// How a front-end writes what following sends: its success, and why a
/// channel could not be followed.
pub struct Frames {
    pub succeeded: Bytes,
    pub not_followed: NotFollowed,
}

pub use crate::engine::personal::NotFollowed;

/// Why a connection may not follow a user now.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The node is part of a cluster.
    Cluster,
    /// The connection follows another user already.
    Another(String),
}

/// Connection `key` (of namespace `ns`), allowed to, follows `user`: every
/// channel the user subscribed to durably, from where the user last read
/// each. Its success goes out first, then what it missed, in order per
/// channel; subscribing again answers again and sends nothing twice.
pub fn follow_user(
    core: &Core,
    key: usize,
    ns: u16,
    user: &str,
    frames: Frames,
) -> Result<(), Refusal> {
    if core.hub.broker().is_some() {
        return Err(Refusal::Cluster);
    }
    let Some(gen) = core.shard.borrow().conn(key).map(|c| c.gen) else {
        return Ok(());
    };
    let other = core
        .shard
        .borrow()
        .follow
        .follower(key)
        .filter(|f| f.namespace != ns || &*f.user != user)
        .map(|f| f.user.to_string());
    if let Some(other) = other {
        return Err(Refusal::Another(other));
    }
    let started = core.shard.borrow_mut().follow.start(key, gen, ns, user);
    core.shard.borrow_mut().reply(key, frames.succeeded);
    if started {
        for (name, cursor) in core.hub.durable.of(ns, user) {
            core.follow_from((key, gen), ns, &name, cursor, frames.not_followed);
        }
    }
    Ok(())
}

/// `key` unsubscribes from `user`'s personal channel: if it follows that
/// user, it stops (its own subscriptions stay). Whether it did.
pub fn unfollow_user(core: &Core, key: usize, ns: u16, user: &str) -> bool {
    let follows = core
        .shard
        .borrow()
        .follow
        .follower(key)
        .is_some_and(|f| f.namespace == ns && &*f.user == user);
    if follows {
        core.unfollow(key);
    }
    follows
}

/// Why a durable subscription was not made.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeRefused {
    #[error("{0}")]
    Limit(#[from] DurableError),
    #[error("{NOT_IN_A_CLUSTER}")]
    Cluster,
    #[error("the server is shutting down")]
    ShuttingDown,
}

/// Subscribes `user` (of namespace `ns`) to `channel` durably, from the
/// channel's place now; the user's connections that follow it follow the
/// channel at once. `Ok(false)`: it was subscribed already (its cursor
/// stays).
pub async fn subscribe(
    core: &Core,
    ns: u16,
    user: &str,
    channel: &str,
) -> Result<bool, SubscribeRefused> {
    if core.hub.broker().is_some() {
        return Err(SubscribeRefused::Cluster);
    }
    let durable = &core.hub.durable;
    let keep = core.hub.followed_keep(ns, channel);
    let (tx, rx) = tokio::sync::oneshot::channel();
    core.place_of(
        &route_key_string(ns, channel),
        keep,
        Box::new(move |_, cursor| {
            let _ = tx.send(cursor);
        }),
    );
    let Ok(Some(cursor)) = rx.await else {
        return Err(SubscribeRefused::ShuttingDown);
    };
    if !durable.subscribe(ns, user, channel, cursor.clone())? {
        return Ok(false);
    }
    let (user, channel): (Arc<str>, Arc<str>) = (user.into(), channel.into());
    core.run_everywhere(move |c| {
        let following = c.shard.borrow().follow.following(ns, &user);
        for conn in following {
            // Past the connection's subscription limit the channel is
            // left out, and the connection is not told (it asked nothing).
            c.follow_from(conn, ns, &channel, cursor.clone(), None);
        }
    });
    Ok(true)
}

/// Ends `user`'s durable subscription to `channel`; the user's connections
/// stop following it at once. Whether there was one.
pub fn unsubscribe(core: &Core, ns: u16, user: &str, channel: &str) -> bool {
    if !core.hub.durable.unsubscribe(ns, user, channel) {
        return false;
    }
    let (user, route): (Arc<str>, Arc<str>) = (user.into(), route_key_string(ns, channel).into());
    core.run_everywhere(move |c| {
        let following = c.shard.borrow().follow.following(ns, &user);
        for (key, _) in following {
            c.unfollow_channel(key, &route);
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_a_user_and_a_channel() {
        let parse = |b: &str| parse_request(b.as_bytes());
        assert_eq!(
            parse(r#"{"user_id":"u1","channel":"news"}"#),
            Ok(("u1".into(), "news".into()))
        );
        assert_eq!(
            parse(r#"{"user_id":"u1","event":"news"}"#),
            Ok(("u1".into(), "news".into())),
            "Pushi's event"
        );
        for bad in [
            r#"{"user_id":"u1"}"#,
            r#"{"channel":"news"}"#,
            r#"{"user_id":"","channel":"news"}"#,
            r#"{"user_id":1,"channel":"news"}"#,
            "not json",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn personal_channels_name_their_user() {
        assert_eq!(user_of("personal-42"), Some("42"));
        assert_eq!(user_of("personal-"), None);
        assert_eq!(user_of("news"), None);
    }
}
