//! A native connection's messages (docs/protocol.md): subscribe,
//! unsubscribe, publish (JSON and binary), auth, ping, and wsify's
//! commands, checked against the connection's token grant and, with
//! AUTHORIZE, the authorizer webhook.
//!
//! An action the authorizer must approve is held ([`Deferred`]) and the
//! session holds this connection's later messages behind it, so their
//! order is kept; other connections are not held up.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::protocol::{self, ErrorCode, Op};
use super::Native;
use crate::auth::Grant;
use crate::engine::message::{Encoding, Message};
use crate::engine::shard::SubscribeError;
use crate::integrations::authorizer::{self, Action, ConnAuthz, Decision};
use crate::session::{Cx, FrontEnd};

type Flow = crate::session::Flow<Box<Deferred>>;

/// What the native front-end keeps per connection.
#[derive(Debug)]
pub struct NativeConn {
    /// The token's (or the authorizer's) permissions.
    grant: Arc<Grant>,
    /// What the authorizer webhook needs to know of this connection (only
    /// when AUTHORIZE sends more than `connect`).
    authz: Option<Box<ConnAuthz>>,
}

/// A subscribe, unsubscribe or publish waiting for the authorizer, with
/// everything needed to apply it once allowed (the message it came from is
/// gone by then).
#[derive(Debug)]
pub struct Deferred {
    action: Action,
    channel: Box<str>,
    id: Option<Box<str>>,
    /// The request to POST.
    body: Vec<u8>,
    /// The encoded message, for a publish.
    publish: Option<Message>,
}

impl FrontEnd for Native {
    const ENCODING: Encoding = protocol::ENCODING;
    /// protocol.md: "server going away".
    const SHUTDOWN_CODE: u16 = 1001;
    type Conn = NativeConn;
    type Admitted = (Arc<Grant>, Option<Box<ConnAuthz>>);
    type Wait = Box<Deferred>;

    fn open(&self, cx: &Cx<'_>, (grant, authz): Self::Admitted) -> NativeConn {
        set_expiry(cx, &grant);
        NativeConn { grant, authz }
    }

    fn on_text(&self, cx: &Cx<'_>, conn: &mut NativeConn, text: &[u8]) -> Flow {
        handle_request(cx, conn, text)
    }

    fn on_binary(&self, cx: &Cx<'_>, conn: &mut NativeConn, data: &[u8]) -> Flow {
        handle_binary(cx, conn, data)
    }

    fn resume<'a>(
        &'a self,
        cx: Cx<'a>,
        conn: &'a mut NativeConn,
        wait: Box<Deferred>,
    ) -> impl std::future::Future<Output = ()> + 'a {
        authorize(cx, conn, *wait)
    }

    fn too_large(&self, reason: &str) -> Option<Bytes> {
        Some(protocol::error(None, ErrorCode::TooLarge, reason))
    }

    fn close(&self, _cx: &Cx<'_>, _conn: &mut NativeConn) {}
}

/// Arms the engine's expiry for the grant's `exp` (with JWT_LEEWAY): past
/// it the connection is closed with 4001.
fn set_expiry(cx: &Cx<'_>, grant: &Grant) {
    let leeway = cx.worker.shared.config.jwt_leeway;
    // `exp` is Unix time; the engine's deadlines are on the monotonic
    // clock.
    let at = grant
        .exp
        .map(|exp| crate::clock::monotonic_at(exp.saturating_add(leeway).saturating_mul(1000) + 1));
    cx.worker
        .core
        .shard
        .borrow_mut()
        .set_expiry(cx.key, cx.gen, at);
}

fn push(cx: &Cx<'_>, frame: Bytes) {
    cx.worker.core.shard.borrow_mut().push(cx.key, frame);
}

/// Asks the authorizer about `d` and applies the answer: allowed, the
/// action happens; denied, `forbidden`; authorizer down, close 1013.
async fn authorize(cx: Cx<'_>, conn: &mut NativeConn, d: Deferred) {
    let worker = cx.worker;
    let Some(authorizer) = worker.authorizer.as_ref() else {
        return;
    };
    let decision = authorizer.ask(d.body).await;
    worker
        .shared
        .metrics
        .authorized(d.action.as_str(), decision.label());
    let gone = worker
        .core
        .shard
        .borrow()
        .conn(cx.key)
        .is_none_or(|c| c.is_closing());
    if gone {
        return;
    }
    let id = d.id.as_deref();
    match decision {
        Decision::Allow(_) => {
            // Many connections may be answered at once: each publish
            // respects the bus's backpressure like a fresh one.
            if d.publish.is_some() && worker.core.congested() {
                worker.core.wait_for_space().await;
            }
            let ttl = authorizer.cache_ttl;
            if !ttl.is_zero() {
                if let Some(a) = conn.authz.as_deref_mut() {
                    a.remember(d.action, &d.channel, Instant::now() + ttl);
                }
            }
            apply(&cx, d.action, &d.channel, id, d.publish);
        }
        Decision::Deny(status) => {
            let msg = format!(
                "not authorized to {} on channel {} (authorizer answered {status})",
                d.action.as_str(),
                d.channel
            );
            push(&cx, protocol::error(id, ErrorCode::Forbidden, &msg));
        }
        Decision::Unavailable(why) => {
            tracing::warn!(error = %why, "authorizer unavailable: closing connection with 1013");
            worker.core.shard.borrow_mut().close(
                cx.key,
                Some(1013),
                "authorizer unavailable, try again later",
                false,
            );
        }
    }
}

/// Checks write permission and rate; `Err` is the error frame to send.
fn may_publish(
    cx: &Cx<'_>,
    conn: &NativeConn,
    channel: &str,
    id: Option<&str>,
) -> Result<(), Bytes> {
    if !conn.grant.write.allows(channel) {
        let msg = format!("no write permission on channel {channel}");
        return Err(protocol::error(id, ErrorCode::Forbidden, &msg));
    }
    if !cx.worker.core.shard.borrow_mut().take_publish_token(cx.key) {
        return Err(protocol::error(
            id,
            ErrorCode::RateLimited,
            "publish rate limit exceeded",
        ));
    }
    Ok(())
}

/// The request to send when the authorizer must approve `action` on
/// `channel` for this connection (and has not recently).
fn needs_approval(
    cx: &Cx<'_>,
    conn: &mut NativeConn,
    action: Action,
    channel: &str,
    data: Option<&str>,
) -> Option<Vec<u8>> {
    let authorizer = cx.worker.authorizer.as_ref()?;
    if !authorizer.wants(action) {
        return None;
    }
    let authz = conn.authz.as_deref_mut()?;
    if !authorizer.cache_ttl.is_zero() && authz.cached(action, channel, Instant::now()) {
        cx.worker
            .shared
            .metrics
            .authorized(action.as_str(), "cached");
        return None;
    }
    Some(authorizer::action_body(
        action,
        channel,
        data,
        &authz.client_json,
    ))
}

/// Defers `action` behind the authorizer if it must approve it.
fn defer(
    cx: &Cx<'_>,
    conn: &mut NativeConn,
    action: Action,
    channel: &str,
    id: Option<&str>,
    data: Option<&str>,
    publish: impl FnOnce() -> Option<Message>,
) -> Option<Flow> {
    let body = needs_approval(cx, conn, action, channel, data)?;
    Some(Flow::Wait(Box::new(Deferred {
        action,
        channel: channel.into(),
        id: id.map(Into::into),
        body,
        publish: publish(),
    })))
}

/// Carries out an allowed action and queues its reply.
fn apply(cx: &Cx<'_>, action: Action, channel: &str, id: Option<&str>, publish: Option<Message>) {
    let core = &cx.worker.core;
    let reply = match action {
        Action::Subscribe => match core.subscribe(cx.key, channel) {
            Ok(()) => protocol::subscribed(channel, id),
            Err(SubscribeError::TooMany(n)) => {
                let msg = format!("subscription limit of {n} channels reached");
                protocol::error(id, ErrorCode::Forbidden, &msg)
            }
        },
        Action::Unsubscribe => {
            core.unsubscribe(cx.key, channel);
            protocol::unsubscribed(channel, id)
        }
        Action::Publish => {
            if let Some(msg) = publish {
                core.publish(msg, Some(cx.key));
            }
            match id {
                Some(id) => protocol::ack(id),
                None => return,
            }
        }
        Action::Connect => return,
    };
    push(cx, reply);
}

/// Applies one JSON request of protocol.md and queues its reply.
fn handle_request(cx: &Cx<'_>, conn: &mut NativeConn, text: &[u8]) -> Flow {
    let req = match protocol::parse_request(text) {
        Ok(req) => req,
        Err(e) => {
            push(cx, protocol::error(e.id, ErrorCode::BadRequest, &e.message));
            return Flow::Continue;
        }
    };
    let id = req.id;
    let reply = match req.op {
        Op::Subscribe { channel } => {
            if !conn.grant.read.allows(&channel) {
                let msg = format!("no read permission on channel {channel}");
                protocol::error(id, ErrorCode::Forbidden, &msg)
            } else {
                let action = Action::Subscribe;
                if let Some(wait) = defer(cx, conn, action, &channel, id, None, || None) {
                    return wait;
                }
                apply(cx, action, &channel, id, None);
                return Flow::Continue;
            }
        }
        Op::Unsubscribe { channel } => {
            let action = Action::Unsubscribe;
            if let Some(wait) = defer(cx, conn, action, &channel, id, None, || None) {
                return wait;
            }
            apply(cx, action, &channel, id, None);
            return Flow::Continue;
        }
        Op::Publish { channel, data } => match may_publish(cx, conn, &channel, id) {
            Err(reply) => reply,
            Ok(()) => {
                let message = || Some(protocol::message_frame(&channel, data));
                let action = Action::Publish;
                if let Some(wait) = defer(cx, conn, action, &channel, id, Some(data), message) {
                    return wait;
                }
                apply(cx, action, &channel, id, message());
                return Flow::Continue;
            }
        },
        Op::Auth { token } => match cx.worker.shared.auth.verify(&token) {
            Ok(grant) => {
                reauthorize(cx, conn, grant);
                protocol::authed(id)
            }
            Err(e) => protocol::error(id, ErrorCode::Unauthorized, &e.to_string()),
        },
        Op::Ping => protocol::pong(id),
    };
    push(cx, reply);
    Flow::Continue
}

/// Replaces the connection's permissions with a fresh token's: each
/// channel it may no longer read is unsubscribed, with an `unsubscribed`
/// notice (no `id`), and the expiry follows the new token.
fn reauthorize(cx: &Cx<'_>, conn: &mut NativeConn, grant: Arc<Grant>) {
    let subs = cx.worker.core.shard.borrow().subscriptions(cx.key);
    for channel in subs.iter().filter(|c| !grant.read.allows(c)) {
        cx.worker.core.unsubscribe(cx.key, channel);
        push(cx, protocol::unsubscribed(channel, None));
    }
    set_expiry(cx, &grant);
    conn.grant = grant;
}

/// Applies a binary publish (protocol.md, "Binary frames"): no ack. The
/// authorizer sees its payload as a JSON string when it is UTF-8 text, as
/// `null` otherwise.
fn handle_binary(cx: &Cx<'_>, conn: &mut NativeConn, data: &[u8]) -> Flow {
    let (channel, payload) = match protocol::parse_binary(data) {
        Ok(parts) => parts,
        Err(e) => {
            push(
                cx,
                protocol::error(None, ErrorCode::BadRequest, &e.to_string()),
            );
            return Flow::Continue;
        }
    };
    if let Err(reply) = may_publish(cx, conn, channel, None) {
        push(cx, reply);
        return Flow::Continue;
    }
    let message = || Some(protocol::binary_frame(channel, payload));
    let asked = cx
        .worker
        .authorizer
        .as_ref()
        .is_some_and(|a| a.wants(Action::Publish));
    let shown = match std::str::from_utf8(payload) {
        Ok(text) if asked => serde_json::to_string(text).unwrap_or_else(|_| "null".into()),
        _ => "null".into(),
    };
    let action = Action::Publish;
    if let Some(wait) = defer(cx, conn, action, channel, None, Some(&shown), message) {
        return wait;
    }
    apply(cx, action, channel, None, message());
    Flow::Continue
}
