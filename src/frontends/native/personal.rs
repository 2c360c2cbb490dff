//! Personal channels in herald's own protocol (see
//! [`crate::frontends::personal`]): `POST /subscribe` and
//! `POST /unsubscribe` manage a user's durable subscriptions, and
//! `personal-{user_id}` may be subscribed to by a connection whose
//! token's `sub` is that user. Messages keep their channel, and their
//! offset where the channel keeps history.
//!
//! Who may manage a user's durable subscriptions: a token that may read
//! the channel, for its own `sub`; a token that may read and write it (a
//! backend's), for any user. Without `SECRET` the authorizer, if any,
//! decides (a `subscribe` of the channel); else anyone may.

use super::protocol::{self, ErrorCode};
use super::{json_error, Answer};
use crate::auth::Grant;
use crate::frontends::personal::{self as shared, Frames, Refusal, SubscribeRefused};
use crate::integrations::authorizer::Action;
use crate::transport::http1::head::RequestHead;
use crate::worker::Worker;

/// Is this a request of the durable subscriptions API?
pub fn is_api_path(path: &str) -> bool {
    matches!(path, "/subscribe" | "/unsubscribe")
}

/// May `grant` manage `user`'s durable subscription to `channel`?
fn may_manage(grant: &Grant, user: &str, channel: &str) -> bool {
    let own = grant.sub.as_deref() == Some(user);
    grant.read.allows(channel) && (own || grant.write.allows(channel))
}

/// Answers `POST /subscribe` and `POST /unsubscribe`.
pub async fn api(worker: &Worker, head: &RequestHead, body: &[u8], peer: &str) -> Answer {
    let (user, channel) = match shared::parse_request(body) {
        Ok(r) => r,
        Err(e) => return json_error(ErrorCode::BadRequest, &e),
    };
    if let Err(e) = protocol::validate_channel(&channel) {
        return json_error(ErrorCode::BadRequest, &format!("{channel}: {e}"));
    }
    if shared::user_of(&channel).is_some() {
        let msg = format!("{channel}: a personal channel cannot be subscribed to durably");
        return json_error(ErrorCode::BadRequest, &msg);
    }
    if protocol::validate_channel(&format!("{}{user}", shared::PERSONAL)).is_err() {
        let msg = "user_id: its personal channel personal-{user_id} must be a valid channel name";
        return json_error(ErrorCode::BadRequest, msg);
    }
    let shared_state = &worker.shared;
    match (&worker.authorizer, shared_state.auth.is_open()) {
        (Some(authorizer), true) => {
            let what = (Action::Subscribe, &*channel, None);
            if let Err(refused) =
                super::authorizer_approves(worker, authorizer, head, peer, what).await
            {
                return refused;
            }
        }
        _ => {
            let grant = match shared_state
                .auth
                .authenticate(head.header("authorization"), head.query())
            {
                Ok(g) => g,
                Err(e) => return json_error(ErrorCode::Unauthorized, &e.to_string()),
            };
            if !may_manage(&grant, &user, &channel) {
                let msg = format!(
                    "managing {user}'s subscription to {channel} needs read permission on it \
                     (with sub {user}) or read and write permission"
                );
                return json_error(ErrorCode::Forbidden, &msg);
            }
        }
    }
    let core = &worker.core;
    let body = match head.path() {
        "/subscribe" => match shared::subscribe(core, 0, &user, &channel).await {
            Ok(new) => serde_json::json!({ "subscribed": new }),
            Err(e @ SubscribeRefused::Limit(_)) => {
                return json_error(ErrorCode::Forbidden, &e.to_string())
            }
            Err(e) => return json_error(ErrorCode::Unavailable, &e.to_string()),
        },
        _ => serde_json::json!({ "unsubscribed": shared::unsubscribe(core, 0, &user, &channel) }),
    };
    Answer::json(200, body.to_string().into_bytes())
}

/// A connection with `grant` subscribes to `channel`, the personal channel
/// of `user` (request `id`): the reply to queue, if it is not queued
/// already.
pub fn follow(
    worker: &Worker,
    key: usize,
    grant: &Grant,
    user: &str,
    channel: &str,
    id: Option<&str>,
) -> Option<bytes::Bytes> {
    if grant.sub.as_deref() != Some(user) {
        let msg = format!("{channel} is user {user}'s: a token with sub {user} may subscribe");
        return Some(protocol::error(id, ErrorCode::Forbidden, &msg));
    }
    let frames = Frames {
        succeeded: protocol::subscribed(channel, id),
        not_followed: Some(|channel, why| {
            protocol::error(None, ErrorCode::Forbidden, &format!("{channel}: {why}"))
        }),
    };
    match shared::follow_user(&worker.core, key, 0, user, frames) {
        Ok(()) => None,
        Err(Refusal::Cluster) => Some(protocol::error(
            id,
            ErrorCode::Unavailable,
            shared::NOT_IN_A_CLUSTER,
        )),
        Err(Refusal::Another(other)) => {
            let msg = format!("this connection follows user {other}'s personal channel already");
            Some(protocol::error(id, ErrorCode::Forbidden, &msg))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Patterns;

    fn grant(sub: Option<&str>, read: &[&str], write: &[&str]) -> Grant {
        Grant {
            sub: sub.map(Into::into),
            read: Patterns::compile(read),
            write: Patterns::compile(write),
            exp: None,
        }
    }

    #[test]
    fn users_manage_their_own_readable_channels_and_backends_anyone_s() {
        let own = grant(Some("u1"), &["news"], &[]);
        assert!(may_manage(&own, "u1", "news"));
        assert!(!may_manage(&own, "u2", "news"), "someone else's");
        assert!(!may_manage(&own, "u1", "secret"), "not readable");
        let backend = grant(None, &["*"], &["*"]);
        assert!(may_manage(&backend, "u2", "news"));
        let writer = grant(None, &[], &["*"]);
        assert!(!may_manage(&writer, "u2", "news"), "write alone");
    }
}
