//! Personal channels for Pusher apps (see [`crate::frontends::personal`]):
//! `POST /apps/{id}/subscribe` and `/unsubscribe`, signed like the rest of
//! the API, and `personal-{user_id}` for a connection signed in as the
//! user (`pusher:signin`), or `private-personal-{user_id}` authorized by
//! the app's auth endpoint. pusher-js hands the events, which keep their
//! own channel, to `bind_global` and to global `bind`s.

use serde_json::json;

use super::apps::App;
use super::wire::{self, ChannelKind};
use crate::frontends::personal::{self as shared, Frames, Refusal, SubscribeRefused};
use crate::worker::Worker;

/// An answer: status, content type, body (as [`super::api::Answer`]).
type Answer = (u16, &'static str, Vec<u8>);

fn text(status: u16, msg: impl Into<String>) -> Answer {
    (status, "text/plain; charset=utf-8", msg.into().into_bytes())
}

/// Is this a request of the durable subscriptions API?
pub fn is_api_path(path: &str) -> bool {
    path.starts_with("/apps/") && (path.ends_with("/subscribe") || path.ends_with("/unsubscribe"))
}

/// The user whose personal channel `channel` is, either variant.
pub fn user_of(channel: &str) -> Option<&str> {
    shared::user_of(channel).or_else(|| {
        channel
            .strip_prefix(wire::PRIVATE_PERSONAL)
            .filter(|id| !id.is_empty())
    })
}

/// Connection `key` of namespace `ns`, allowed to, subscribes to
/// `channel`, the personal channel of `user`.
pub fn follow_user(worker: &Worker, key: usize, ns: u16, user: &str, channel: &str) {
    let core = &worker.core;
    let frames = Frames {
        succeeded: wire::subscription_succeeded(channel, None),
        not_followed: Some(|channel, why| wire::error(None, &format!("{channel}: {why}"))),
    };
    let refused = match shared::follow_user(core, key, ns, user, frames) {
        Ok(()) => return,
        Err(Refusal::Cluster) => {
            wire::subscription_error(channel, "Unsupported", shared::NOT_IN_A_CLUSTER, 501)
        }
        Err(Refusal::Another(other)) => {
            let msg = format!("this connection follows user {other}'s personal channel already");
            wire::subscription_error(channel, "AuthError", &msg, 403)
        }
    };
    core.shard.borrow_mut().reply(key, refused);
}

/// `key` unsubscribes from `channel`, a personal channel.
pub fn unfollow_user(worker: &Worker, key: usize, ns: u16, channel: &str) {
    if let Some(user) = user_of(channel) {
        shared::unfollow_user(&worker.core, key, ns, user);
    }
}

/// The user and channel of a request, checked: the user's personal
/// channel must be a valid name, and only public and private channels
/// can be followed.
fn parse_body(body: &[u8]) -> Result<(String, String), String> {
    let (user, channel) = shared::parse_request(body)?;
    if wire::validate_channel(&format!("{}{user}", shared::PERSONAL)).is_err() {
        return Err("user_id: 1 to 155 characters of A-Z a-z 0-9 _ - = @ , . ;".into());
    }
    match wire::validate_channel(&channel) {
        Ok(ChannelKind::Public | ChannelKind::Private | ChannelKind::PrivateEncrypted)
            if user_of(&channel).is_none() => {}
        Ok(kind) => {
            return Err(format!(
                "{channel}: {} channels cannot be subscribed to durably",
                kind.as_str()
            ))
        }
        Err(e) => return Err(format!("{channel}: {e}")),
    }
    Ok((user, channel))
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
    let subscribing = match rest {
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
    let (core, ns) = (&worker.core, app.index + 1);
    let answer = match subscribing {
        false => json!({ "unsubscribed": shared::unsubscribe(core, ns, &user, &channel) }),
        true => match shared::subscribe(core, ns, &user, &channel).await {
            Ok(new) => json!({ "subscribed": new }),
            Err(e @ SubscribeRefused::Limit(_)) => return text(409, e.to_string()),
            Err(e @ SubscribeRefused::Cluster) => return text(501, e.to_string()),
            Err(e @ SubscribeRefused::ShuttingDown) => return text(503, e.to_string()),
        },
    };
    (200, "application/json", answer.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_and_private_channels_can_be_followed() {
        let ok = |b: &str| parse_body(b.as_bytes());
        assert_eq!(
            ok(r#"{"user_id":"u1","channel":"private-a"}"#),
            Ok(("u1".into(), "private-a".into()))
        );
        for bad in [
            r#"{"user_id":"a b","channel":"news"}"#,
            r#"{"user_id":"u1","channel":"presence-room"}"#,
            r#"{"user_id":"u1","channel":"personal-u2"}"#,
            r#"{"user_id":"u1","channel":"private-personal-u2"}"#,
            r##"{"user_id":"u1","channel":"#server-to-user-u1"}"##,
            r#"{"user_id":"u1","channel":"bad name"}"#,
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn personal_channels_name_their_user() {
        assert_eq!(user_of("personal-42"), Some("42"));
        assert_eq!(user_of("private-personal-42"), Some("42"));
        assert_eq!(user_of("private-personal-"), None);
        assert!(is_api_path("/apps/1/subscribe"));
        assert!(is_api_path("/apps/1/unsubscribe"));
        assert!(!is_api_path("/apps/1/events"));
    }
}
