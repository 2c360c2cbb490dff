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
use crate::engine::core::{Core, Done, Join, Subscribed};
use crate::engine::history::{HistoryRead, Keep, Outcome, Since};
use crate::engine::message::{Encoding, Message};
use crate::engine::shard::SubscribeError;
use crate::integrations::authorizer::{self, Action, ConnAuthz, Decision};
use crate::session::{Cx, FrontEnd};

type Flow = crate::session::Flow<Held>;

/// Why a connection's reading is held.
///
/// Replies prepared on another core (an ack with an offset, a history
/// read, a subscription with history) hold a place in the connection's
/// replies ([`crate::engine::shard::Shard::reserve_reply`]) and do not
/// hold the reading: later requests go on, their replies queue behind.
/// Only what changes the connection's subscriptions (subscribe,
/// unsubscribe, auth) waits for the earlier replies to be out, so that a
/// `subscribed` comes before the channel's messages and a subscription on
/// its way is not overtaken.
#[derive(Debug)]
pub enum Held {
    /// The authorizer must approve an action first.
    Authorize(Box<Deferred>),
    /// This request, once every earlier reply is out.
    Settle(Box<[u8]>),
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
        let mut held = wait;
        loop {
            let flow = match held {
                Held::Authorize(d) => {
                    authorize(cx, conn, *d).await;
                    return;
                }
                Held::Settle(request) => {
                    settled(&cx).await;
                    handle_request(&cx, conn, &request)
                }
            };
            match flow {
                Flow::Wait(next) => held = next,
                _ => return,
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

/// Queues a reply, in request order (see [`Held`]).
fn push(cx: &Cx<'_>, frame: Bytes) {
    cx.worker.core.shard.borrow_mut().reply(cx.key, frame);
}

/// Waits until every reply prepared elsewhere for this connection is out.
async fn settled(cx: &Cx<'_>) {
    std::future::poll_fn(|c| cx.worker.core.shard.borrow_mut().poll_replies(cx.key, c)).await
}

/// Holds a place for a reply another core prepares; returns what fills it
/// from there (it runs on that core and sends the frames back here).
fn reply_later(cx: &Cx<'_>) -> impl FnOnce(&Core, Vec<Bytes>) + Send + 'static {
    let (here, key, gen) = (cx.worker.core.id, cx.key, cx.gen);
    let ticket = cx.worker.core.shard.borrow_mut().reserve_reply(key, gen);
    move |there: &Core, frames: Vec<Bytes>| {
        there.run_on(
            here,
            Box::new(move |core: &Core| {
                core.shard.borrow_mut().fill_reply(key, gen, ticket, frames);
            }),
        );
    }
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
            if matches!(d.action, Action::Subscribe | Action::Unsubscribe) {
                settled(&cx).await;
            }
            apply(&cx, d.action, &d.channel, id, d.publish, d.extra);
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

/// The reply to a subscribe to a channel without history.
fn subscribed(
    result: Result<(), SubscribeError>,
    channel: &str,
    id: Option<&str>,
    since: bool,
) -> Bytes {
    match result {
        // protocol.md 1.1: `since` on a channel without history.
        Ok(()) if since => protocol::subscribed_unrecovered(channel, id),
        Ok(()) => protocol::subscribed(channel, id),
        Err(SubscribeError::TooMany(n)) => too_many(id, n),
        Err(SubscribeError::Unavailable) => cluster_unavailable(id),
    }
}

/// herald's extension: the node cannot reach its cluster's broker.
fn cluster_unavailable(id: Option<&str>) -> Bytes {
    let msg = "the cluster's broker is unreachable; try again later";
    protocol::error(id, ErrorCode::Unavailable, msg)
}

fn too_many(id: Option<&str>, n: usize) -> Bytes {
    let msg = format!("subscription limit of {n} channels reached");
    protocol::error(id, ErrorCode::Forbidden, &msg)
}

/// Carries out an allowed action and queues its reply (or holds its
/// place, when another core prepares it). A subscription is applied only
/// once the connection's earlier replies are out.
fn apply(
    cx: &Cx<'_>,
    action: Action,
    channel: &str,
    id: Option<&str>,
    publish: Option<Message>,
    extra: Extra,
) {
    let core = &cx.worker.core;
    let keep = core.hub.keeps(0, channel);
    // A channel the connection follows for its user: subscribed already,
    // and the subscription outlives one or the other.
    let followed = match action {
        Action::Subscribe | Action::Unsubscribe => {
            let direct = action == Action::Subscribe;
            let mut shard = core.shard.borrow_mut();
            shard.follow.mark_direct(cx.key, channel, direct)
        }
        _ => None,
    };
    let reply = match action {
        Action::Unsubscribe if followed.is_some() => protocol::unsubscribed(channel, id),
        Action::Subscribe => match keep {
            Some(keep) => return join(cx, channel, id, keep, extra.since),
            // In a cluster the reply waits until the node receives the
            // channel from the other nodes.
            None if core.hub.broker().is_some() => {
                let fill = reply_later(cx);
                let (name, id) = (Box::<str>::from(channel), id.map(Box::<str>::from));
                let asked = extra.since.is_some();
                let then: Subscribed = Box::new(move |core, result| {
                    let frame = subscribed(result, &name, id.as_deref(), asked);
                    fill(core, vec![frame]);
                });
                core.subscribe_then(cx.key, channel, then);
                return;
            }
            None => subscribed(
                core.subscribe(cx.key, channel),
                channel,
                id,
                extra.since.is_some(),
            ),
        },
        Action::Unsubscribe => {
            core.unsubscribe(cx.key, channel);
            protocol::unsubscribed(channel, id)
        }
        Action::Publish => {
            let Some(msg) = publish else {
                return;
            };
            let key = extra.idempotency_key;
            // In a cluster the publish is answered once the broker took
            // it: an ack, or `unavailable` (with or without an id).
            let clustered = core.hub.broker().is_some();
            match (id, keep) {
                (None, _) | (_, None) if clustered => {
                    let fill = reply_later(cx);
                    let id: Option<Box<str>> = id.map(Into::into);
                    let done: Done = Box::new(move |core, outcome: &Outcome| {
                        let frames = match (outcome.unavailable, &id) {
                            (true, id) => vec![cluster_unavailable(id.as_deref())],
                            (false, Some(id)) => vec![protocol::ack(id)],
                            (false, None) => Vec::new(),
                        };
                        fill(core, frames);
                    });
                    core.publish_with(msg, Some(cx.key), key, Some(done));
                    return;
                }
                (None, _) => {
                    core.publish_with(msg, Some(cx.key), key, None);
                    return;
                }
                // The ack carries the offset the channel's owner gives.
                (Some(id), Some(_)) => {
                    let fill = reply_later(cx);
                    let id: Box<str> = id.into();
                    let done: Done = Box::new(move |owner, outcome: &Outcome| {
                        let frame = match &outcome.position {
                            _ if outcome.unavailable => cluster_unavailable(Some(&id)),
                            Some((_, offset)) => protocol::ack_at(&id, *offset),
                            None => protocol::ack(&id),
                        };
                        fill(owner, vec![frame]);
                    });
                    core.publish_with(msg, Some(cx.key), key, Some(done));
                    return;
                }
                // The message is on its way to its place in the order.
                (Some(id), None) => {
                    core.publish_with(msg, Some(cx.key), key, None);
                    protocol::ack(id)
                }
            }
        }
        Action::Connect => return,
    };
    push(cx, reply);
}

fn personal_user(channel: &str) -> Option<&str> {
    crate::frontends::personal::user_of(channel)
}

/// Subscribes to a channel with history: `subscribed` with the channel's
/// epoch and top offset (and `recovered` when `since` was given), then the
/// missed messages if they could all be recovered, then live ones.
fn join(cx: &Cx<'_>, channel: &str, id: Option<&str>, keep: Keep, since: Option<Since>) {
    let (key, gen) = (cx.key, cx.gen);
    let ticket = cx.worker.core.shard.borrow_mut().reserve_reply(key, gen);
    let id: Option<Box<str>> = id.map(Into::into);
    let channel_name: Box<str> = channel.into();
    let asked = since.is_some();
    let joined = Box::new(move |core: &Core, result: Result<Join, SubscribeError>| {
        let frames = match result {
            Ok(join) => {
                let pos = Position {
                    epoch: &join.epoch,
                    offset: join.top,
                };
                let recovered = asked.then_some(join.recovered);
                let mut frames = Vec::with_capacity(1 + join.replay.len());
                frames.push(protocol::subscribed_at(
                    &channel_name,
                    id.as_deref(),
                    pos,
                    recovered,
                ));
                frames.extend(join.replay);
                frames
            }
            Err(SubscribeError::TooMany(n)) => vec![too_many(id.as_deref(), n)],
            Err(SubscribeError::Unavailable) => vec![cluster_unavailable(id.as_deref())],
        };
        core.shard.borrow_mut().fill_reply(key, gen, ticket, frames);
    });
    cx.worker.core.join(key, channel, keep, since, joined);
}

/// protocol.md 1.1 "Reading history": the channel's owner reads it and
/// builds the reply.
fn read_history(
    cx: &Cx<'_>,
    channel: &str,
    id: Option<&str>,
    since: Option<Since>,
    limit: Option<usize>,
) {
    let fill = reply_later(cx);
    let max = cx.worker.core.hub.history.recover_max;
    let limit = limit.unwrap_or(max).min(max);
    let id: Option<Box<str>> = id.map(Into::into);
    let channel_name: Box<str> = channel.into();
    cx.worker.core.read_history(
        channel,
        since,
        limit,
        Box::new(move |owner: &Core, read: HistoryRead| {
            let frame = match read {
                HistoryRead::NotKept => protocol::error(
                    id.as_deref(),
                    ErrorCode::NotFound,
                    &format!("channel {channel_name} keeps no history"),
                ),
                HistoryRead::Unavailable => cluster_unavailable(id.as_deref()),
                HistoryRead::Page(page) => {
                    let pos = Position {
                        epoch: &page.epoch,
                        offset: page.top,
                    };
                    let body =
                        protocol::history(&channel_name, Some(id.as_deref()), pos, &page.messages);
                    crate::transport::ws::frame::text(&body)
                }
            };
            fill(owner, vec![frame]);
        }),
    );
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
    // What changes the connection's subscriptions waits for a subscription
    // still on its way (and every reply before it).
    let changes_subscriptions =
        !matches!(req.op, Op::Publish { .. } | Op::Ping | Op::History { .. });
    if changes_subscriptions && cx.worker.core.shard.borrow().replies_pending(cx.key) {
        return Flow::Wait(Held::Settle(text.into()));
    }
    let reply = match req.op {
        // A user's personal channel: its token's `sub` is the user.
        Op::Subscribe { channel, .. } if personal_user(&channel).is_some() => {
            let user = personal_user(&channel).unwrap_or_default();
            match super::personal::follow(cx.worker, cx.key, &conn.grant, user, &channel, id) {
                Some(refused) => refused,
                None => return Flow::Continue,
            }
        }
        Op::Unsubscribe { channel } if personal_user(&channel).is_some() => {
            let user = personal_user(&channel).unwrap_or_default();
            crate::frontends::personal::unfollow_user(&cx.worker.core, cx.key, 0, user);
            protocol::unsubscribed(&channel, id)
        }
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
                apply(cx, action, &channel, id, None, extra());
                return Flow::Continue;
            }
        }
        Op::Unsubscribe { channel } => {
            let action = Action::Unsubscribe;
            let held = || (None, Extra::default());
            if let Some(wait) = defer(cx, conn, action, &channel, id, None, held) {
                return wait;
            }
            apply(cx, action, &channel, id, None, Extra::default());
            return Flow::Continue;
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
                apply(cx, action, &channel, id, message(), extra());
                return Flow::Continue;
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
                read_history(cx, &channel, id, since, limit);
                return Flow::Continue;
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
    apply(cx, action, channel, None, message(), Extra::default());
    Flow::Continue
}
