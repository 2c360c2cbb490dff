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

use super::protocol::{self, ErrorCode, Op, Position};
use super::Native;
use crate::auth::Grant;
use crate::engine::core::{Core, Join};
use crate::engine::history::{Keep, Outcome, Since, Stream};
use crate::engine::message::{Encoding, Message};
use crate::engine::shard::SubscribeError;
use crate::integrations::authorizer::{self, Action, ConnAuthz, Decision};
use crate::session::{Cx, FrontEnd};

type Flow = crate::session::Flow<Held>;

/// A reply another core is preparing (an ack from the channel's owner, a
/// subscription with history, a history read): the connection's later
/// messages wait for it, so that replies keep the order of the requests.
type Later = tokio::sync::oneshot::Receiver<Option<Bytes>>;

/// Why a connection's reading is held.
#[derive(Debug)]
pub enum Held {
    /// The authorizer must approve an action first.
    Authorize(Box<Deferred>),
    /// A reply is being prepared elsewhere (`None`: it queued its frames
    /// itself).
    Reply(Later),
}

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
    /// A subscribe's `since`, a publish's `idempotency_key`.
    extra: Extra,
}

/// What a subscribe or publish may carry besides its channel (protocol.md
/// 1.1).
#[derive(Debug, Default)]
pub struct Extra {
    since: Option<Since>,
    idempotency_key: Option<Box<str>>,
}

impl FrontEnd for Native {
    const ENCODING: Encoding = protocol::ENCODING;
    /// protocol.md: "server going away".
    const SHUTDOWN_CODE: u16 = 1001;
    type Conn = NativeConn;
    type Admitted = (Arc<Grant>, Option<Box<ConnAuthz>>);
    type Wait = Held;

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

    async fn resume<'a>(&'a self, cx: Cx<'a>, conn: &'a mut NativeConn, wait: Held) {
        match wait {
            Held::Authorize(d) => authorize(cx, conn, *d).await,
            Held::Reply(later) => {
                if let Ok(Some(frame)) = later.await {
                    push(&cx, frame);
                }
            }
        }
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
            if let Some(later) = apply(&cx, d.action, &d.channel, id, d.publish, d.extra) {
                if let Ok(Some(frame)) = later.await {
                    push(&cx, frame);
                }
            }
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
    held: impl FnOnce() -> (Option<Message>, Extra),
) -> Option<Flow> {
    let body = needs_approval(cx, conn, action, channel, data)?;
    let (publish, extra) = held();
    Some(Flow::Wait(Held::Authorize(Box::new(Deferred {
        action,
        channel: channel.into(),
        id: id.map(Into::into),
        body,
        publish,
        extra,
    }))))
}

/// Goes on at once if the reply is already there (the channel's owner is
/// this core), else holds the connection's later messages until it is.
fn settle(cx: &Cx<'_>, later: Option<Later>) -> Flow {
    let Some(mut later) = later else {
        return Flow::Continue;
    };
    match later.try_recv() {
        Ok(frame) => {
            if let Some(frame) = frame {
                push(cx, frame);
            }
            Flow::Continue
        }
        Err(tokio::sync::oneshot::error::TryRecvError::Empty) => Flow::Wait(Held::Reply(later)),
        Err(tokio::sync::oneshot::error::TryRecvError::Closed) => Flow::Continue,
    }
}

fn too_many(id: Option<&str>, n: usize) -> Bytes {
    let msg = format!("subscription limit of {n} channels reached");
    protocol::error(id, ErrorCode::Forbidden, &msg)
}

/// Carries out an allowed action and queues its reply, or returns the
/// reply another core is preparing.
fn apply(
    cx: &Cx<'_>,
    action: Action,
    channel: &str,
    id: Option<&str>,
    publish: Option<Message>,
    extra: Extra,
) -> Option<Later> {
    let core = &cx.worker.core;
    let keep = core.hub.keeps(0, channel);
    let reply = match action {
        Action::Subscribe => match keep {
            Some(keep) => return Some(join(cx, channel, id, keep, extra.since)),
            None => match core.subscribe(cx.key, channel) {
                // protocol.md 1.1: `since` on a channel without history.
                Ok(()) if extra.since.is_some() => protocol::subscribed_at(
                    channel,
                    id,
                    Position {
                        epoch: "",
                        offset: 0,
                    },
                    Some(false),
                ),
                Ok(()) => protocol::subscribed(channel, id),
                Err(SubscribeError::TooMany(n)) => too_many(id, n),
            },
        },
        Action::Unsubscribe => {
            core.unsubscribe(cx.key, channel);
            protocol::unsubscribed(channel, id)
        }
        Action::Publish => {
            let msg = publish?;
            // An ack means the message has its place in the channel's
            // order (and, with history, carries its offset): the channel's
            // owner builds it once it has sequenced the message, so a
            // subscription made after the ack never sees the message.
            let Some(id) = id else {
                core.publish_with(msg, Some(cx.key), extra.idempotency_key, None);
                return None;
            };
            let (tx, later) = tokio::sync::oneshot::channel();
            let id: Box<str> = id.into();
            let done: crate::engine::core::Done = Box::new(move |_owner, outcome: &Outcome| {
                let frame = match &outcome.position {
                    Some((_, offset)) => protocol::ack_at(&id, *offset),
                    None => protocol::ack(&id),
                };
                let _ = tx.send(Some(frame));
            });
            core.publish_with(msg, Some(cx.key), extra.idempotency_key, Some(done));
            return Some(later);
        }
        Action::Connect => return None,
    };
    push(cx, reply);
    None
}

/// Subscribes to a channel with history: `subscribed` with the channel's
/// epoch and top offset (and `recovered` when `since` was given), then the
/// missed messages if they could all be recovered, then live ones.
fn join(cx: &Cx<'_>, channel: &str, id: Option<&str>, keep: Keep, since: Option<Since>) -> Later {
    let (tx, later) = tokio::sync::oneshot::channel();
    let (key, gen) = (cx.key, cx.gen);
    let id: Option<Box<str>> = id.map(Into::into);
    let channel_name: Box<str> = channel.into();
    let asked = since.is_some();
    let joined = Box::new(move |core: &Core, result: Result<Join, SubscribeError>| {
        let mut shard = core.shard.borrow_mut();
        match result {
            Ok(join) => {
                let pos = Position {
                    epoch: &join.epoch,
                    offset: join.top,
                };
                let recovered = asked.then_some(join.recovered);
                let reply = protocol::subscribed_at(&channel_name, id.as_deref(), pos, recovered);
                if shard.push_to(key, gen, reply) {
                    for frame in join.replay {
                        shard.push_to(key, gen, frame);
                    }
                }
            }
            Err(SubscribeError::TooMany(n)) => {
                shard.push_to(key, gen, too_many(id.as_deref(), n));
            }
        }
        let _ = tx.send(None);
    });
    cx.worker.core.join(key, channel, keep, since, joined);
    later
}

/// protocol.md 1.1 "Reading history": the channel's owner reads it and
/// builds the reply.
fn read_history(
    cx: &Cx<'_>,
    channel: &str,
    id: Option<&str>,
    since: Option<Since>,
    limit: Option<usize>,
) -> Later {
    let (tx, later) = tokio::sync::oneshot::channel();
    let max = cx.worker.core.hub.history.recover_max;
    let limit = limit.unwrap_or(max).min(max);
    let id: Option<Box<str>> = id.map(Into::into);
    let channel_name: Box<str> = channel.into();
    cx.worker.core.read_history(
        channel,
        Box::new(move |_owner: &Core, stream: Option<&Stream>| {
            let frame = match stream {
                None => protocol::error(
                    id.as_deref(),
                    ErrorCode::NotFound,
                    &format!("channel {channel_name} keeps no history"),
                ),
                Some(stream) => {
                    let messages = history_page(stream, since.as_ref(), limit);
                    let pos = Position {
                        epoch: &stream.epoch,
                        offset: stream.top,
                    };
                    let body =
                        protocol::history(&channel_name, Some(id.as_deref()), pos, &messages);
                    crate::transport::ws::frame::text(&body)
                }
            };
            let _ = tx.send(Some(frame));
        }),
    );
    later
}

/// The messages a history read returns: after `since` (from the start of
/// the current epoch when `since` names another, from the oldest kept
/// when some are gone), else the newest; at most `limit`, oldest first.
pub fn history_page(stream: &Stream, since: Option<&Since>, limit: usize) -> Vec<(u64, Bytes)> {
    match since {
        None => stream.newest(limit),
        Some(s) => {
            let after = if *s.epoch == *stream.epoch {
                s.offset.max(stream.first() - 1)
            } else {
                stream.first() - 1
            };
            stream.after(after, limit).unwrap_or_default()
        }
    }
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
        Op::Subscribe { channel, since } => {
            if !conn.grant.read.allows(&channel) {
                let msg = format!("no read permission on channel {channel}");
                protocol::error(id, ErrorCode::Forbidden, &msg)
            } else {
                let action = Action::Subscribe;
                let extra = || Extra {
                    since: since.clone(),
                    idempotency_key: None,
                };
                if let Some(wait) = defer(cx, conn, action, &channel, id, None, || (None, extra()))
                {
                    return wait;
                }
                return settle(cx, apply(cx, action, &channel, id, None, extra()));
            }
        }
        Op::Unsubscribe { channel } => {
            let action = Action::Unsubscribe;
            let held = || (None, Extra::default());
            if let Some(wait) = defer(cx, conn, action, &channel, id, None, held) {
                return wait;
            }
            return settle(cx, apply(cx, action, &channel, id, None, Extra::default()));
        }
        Op::Publish {
            channel,
            data,
            idempotency_key,
        } => match may_publish(cx, conn, &channel, id) {
            Err(reply) => reply,
            Ok(()) => {
                let message = || Some(protocol::message_frame(&channel, data));
                let extra = || Extra {
                    since: None,
                    idempotency_key: idempotency_key.as_deref().map(Into::into),
                };
                let action = Action::Publish;
                let held = || (message(), extra());
                if let Some(wait) = defer(cx, conn, action, &channel, id, Some(data), held) {
                    return wait;
                }
                return settle(cx, apply(cx, action, &channel, id, message(), extra()));
            }
        },
        Op::History {
            channel,
            since,
            limit,
        } => {
            if !conn.grant.read.allows(&channel) {
                let msg = format!("no read permission on channel {channel}");
                protocol::error(id, ErrorCode::Forbidden, &msg)
            } else {
                return settle(cx, Some(read_history(cx, &channel, id, since, limit)));
            }
        }
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
    let held = || (message(), Extra::default());
    if let Some(wait) = defer(cx, conn, action, channel, None, Some(&shown), held) {
        return wait;
    }
    settle(
        cx,
        apply(cx, action, channel, None, message(), Extra::default()),
    )
}
