//! A Pusher-protocol WebSocket connection (`/app/{key}`): its state, and
//! what each client message does to it.
//!
//! It runs on the same reader, writer, shard and fan-out as the native
//! protocol; only the messages differ. Channels live in the app's
//! namespace (routing key `{n}#{channel}`), so apps never see each other's
//! channels, nor native clients theirs. A publish (client event, HTTP API
//! trigger, presence change) is encoded once as the Pusher event frame and
//! shared by every subscriber on every core, like a native publish.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde_json::json;

use super::apps::{App, WebhookEvent};
use super::wire::{self, ChannelKind, ClientMessage};
use super::PusherShared;
use crate::engine::core::{Core, Join, Subscribed};
use crate::engine::message::{Message, PayloadKind};
use crate::engine::presence::Presence;
use crate::engine::shard::SubscribeError;
use crate::worker::Worker;

/// The Pusher front-end of one core: its connections' state, reached
/// by their own messages, the idle sweep and `terminate_connections`
/// (its [`Endpoint`](crate::frontends::endpoint::Endpoint) and
/// [`FrontEnd`](crate::session::FrontEnd) are in [`super::frontend`]).
pub struct Pusher {
    pub worker_id: usize,
    pub shared: Arc<PusherShared>,
    /// This core's Pusher connections, by slot.
    pub conns: RefCell<HashMap<usize, PusherConn>>,
    /// When the idle sweep last ran ([`crate::clock::now_ms`]).
    pub(super) swept: std::cell::Cell<u64>,
}

impl Pusher {
    pub fn new(worker_id: usize, shared: Arc<PusherShared>) -> Pusher {
        Pusher {
            worker_id,
            shared,
            conns: RefCell::default(),
            swept: std::cell::Cell::new(0),
        }
    }
}

/// Close code when a ping went unanswered (Pusher 4201).
pub const PONG_NOT_RECEIVED: u16 = 4201;

/// What a Pusher connection carries besides what every connection has.
#[derive(Debug)]
pub struct PusherConn {
    pub app: Arc<App>,
    /// The app's namespace (its index + 1).
    pub ns: u16,
    pub socket_id: Box<str>,
    /// Presence channels joined: (channel, user_id).
    pub presence: Vec<(Box<str>, Box<str>)>,
    /// The presence channels among those it joined as a peer
    /// (`"peer": true` in its `channel_data`).
    peer_on: Vec<Box<str>>,
    /// The user this connection signed in as (`pusher:signin`).
    pub user: Option<Box<str>>,
    /// Client-event token bucket: tokens left and when it was refilled.
    tokens: f64,
    refilled: Instant,
    /// When ([`crate::clock::now_ms`]) the last message came from the client.
    pub last_seen: u64,
    /// When a server ping was sent without an answer yet.
    pub pinged_at: Option<u64>,
    /// The apps' generation `app` was read in (apps from a database
    /// change: [`refresh_app`]).
    generation: u64,
}

impl PusherConn {
    pub fn new(
        app: Arc<App>,
        ns: u16,
        socket_id: String,
        now_ms: u64,
        generation: u64,
    ) -> PusherConn {
        let tokens = f64::from(app.max_client_events_per_second);
        PusherConn {
            app,
            ns,
            socket_id: socket_id.into(),
            presence: Vec::new(),
            peer_on: Vec::new(),
            user: None,
            tokens,
            refilled: Instant::now(),
            last_seen: now_ms,
            pinged_at: None,
            generation,
        }
    }

    /// Takes one client-event token; false past the per-second limit.
    fn take_token(&mut self) -> bool {
        let rate = f64::from(self.app.max_client_events_per_second);
        let now = Instant::now();
        let dt = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + dt * rate).min(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The client was heard from at `now_ms`: any ping pending is answered.
    pub fn seen(&mut self, now_ms: u64) {
        self.last_seen = now_ms;
        self.pinged_at = None;
    }

    fn user_on(&self, channel: &str) -> Option<&str> {
        self.presence
            .iter()
            .find(|(c, _)| &**c == channel)
            .map(|(_, u)| &**u)
    }
}

/// After the apps changed (apps from a database): the connection takes
/// its app's current settings (a rotated secret, new limits), or is told
/// why it must close (the app was disabled, removed, or its key changed).
fn refresh_app(shared: &PusherShared, p: &mut PusherConn) -> Result<(), (u16, &'static str)> {
    let generation = shared.apps.generation();
    if generation == p.generation {
        return Ok(());
    }
    p.generation = generation;
    let apps = shared.apps.get();
    match apps.get(p.ns - 1) {
        Some(app) if app.key != p.app.key => Err((4001, "App key no longer exists")),
        Some(app) if !app.enabled => Err((4003, "App is disabled")),
        Some(app) => {
            p.app = app.clone();
            Ok(())
        }
        None => Err((4001, "App no longer exists")),
    }
}

/// Records a presence change for the debug console, if one watches.
fn seen(kind: &'static str, ns: u16, channel: &str, user_id: &str) {
    let w = crate::engine::watch::watch();
    if w.on() {
        let detail = format!("user {user_id}");
        w.record(kind, ns, channel, detail);
    }
}

/// Closes connection `key` of an app that changed, as Pusher refuses one.
fn close_for_app(worker: &Worker, key: usize, (code, why): (u16, &'static str)) {
    let mut shard = worker.core.shard.borrow_mut();
    shard.push(key, wire::error(Some(code), why));
    shard.close(key, Some(code), why, false);
}

/// The channel name inside a routing key `{n}#{channel}`.
pub fn channel_of(key: &str) -> &str {
    key.split_once('#').map_or(key, |(_, c)| c)
}

/// A frame built by [`wire`] with its channel's place, ready for the
/// fan-out in namespace `ns`.
/// A presence notice (`member_added`, `member_removed`): published like an
/// event, never kept by a cache channel.
pub(super) fn notice(r: wire::Routed, ns: u16) -> Message {
    let mut m = published(r, ns);
    m.set_transient();
    m
}

pub fn published(r: wire::Routed, ns: u16) -> Message {
    let channel = r.channel_at as usize..r.channel_at as usize + r.channel_len as usize;
    // Pusher namespaces hold Pusher subscribers only: no other encoding is
    // ever built from this message, so where its data lies does not matter.
    Message::new(
        r.frame,
        super::ENCODING,
        channel,
        0..0,
        PayloadKind::Json,
        ns,
    )
}

/// Queues a reply, behind any still being prepared on another core.
fn push(worker: &Worker, key: usize, frame: Bytes) {
    worker.core.shard.borrow_mut().reply(key, frame);
}

/// Handles one text message of a Pusher connection.
pub fn handle_text(fe: &Pusher, worker: &Worker, key: usize, text: &[u8], now_ms: u64) {
    {
        let mut conns = fe.conns.borrow_mut();
        let Some(p) = conns.get_mut(&key) else {
            return;
        };
        p.seen(now_ms);
        if let Err(why) = refresh_app(&fe.shared, p) {
            drop(conns);
            close_for_app(worker, key, why);
            return;
        }
    }
    let msg = match wire::parse(text) {
        Ok(m) => m,
        Err(e) => {
            push(worker, key, wire::error(None, &e.to_string()));
            return;
        }
    };
    match msg {
        ClientMessage::Ping => push(worker, key, wire::pong()),
        ClientMessage::Pong => {}
        ClientMessage::Subscribe {
            channel,
            auth,
            channel_data,
        } => subscribe(
            fe,
            worker,
            key,
            &channel,
            auth.as_deref(),
            channel_data.as_deref(),
        ),
        ClientMessage::Unsubscribe { channel } => unsubscribe(fe, worker, key, &channel),
        ClientMessage::ClientEvent {
            event,
            channel,
            data,
        } => client_event(fe, worker, key, &event, &channel, data),
        ClientMessage::Internal { event } => {
            let msg = format!("clients may not send {event} events");
            push(worker, key, wire::error(None, &msg));
        }
        ClientMessage::Other { event } if event == "pusher:signin" => signin(fe, worker, key, text),
        ClientMessage::Other { event } => {
            let msg = format!("unsupported event {event}");
            push(worker, key, wire::error(None, &msg));
        }
    }
}

fn subscribe(
    fe: &Pusher,
    worker: &Worker,
    key: usize,
    channel: &str,
    auth: Option<&str>,
    channel_data: Option<&str>,
) {
    let (app, ns, socket_id, user) = {
        let mut conns = fe.conns.borrow_mut();
        let Some(p) = conns.get_mut(&key) else {
            return;
        };
        (p.app.clone(), p.ns, p.socket_id.clone(), p.user.clone())
    };
    let fail = |kind: &str, error: &str, status: u16| {
        push(
            worker,
            key,
            wire::subscription_error(channel, kind, error, status),
        );
    };
    let kind = match wire::validate_channel(channel) {
        Ok(k) => k,
        Err(e) => return fail("InvalidChannel", &e.to_string(), 400),
    };
    let mut member = None;
    let mut peer = false;
    match kind {
        ChannelKind::Public => {}
        // Only its users, each a peer on its presence channel now; this
        // connection one of them there.
        ChannelKind::Peer => {
            let Ok((base, users)) = wire::parse_peer(channel) else {
                return fail("InvalidChannel", "invalid peer channel", 400);
            };
            let me = fe
                .conns
                .borrow()
                .get(&key)
                .and_then(|p| p.user_on(base).map(str::to_string));
            let base_route = crate::engine::message::route_key_string(ns, base);
            match me {
                Some(me) if users.contains(&me.as_str()) => {}
                _ => {
                    let msg = format!("join {base} as one of the channel's users first");
                    return fail("AuthError", &msg, 403);
                }
            }
            if !fe.shared.are_peers(&base_route, &users) {
                let msg = format!("every user of {channel} must be a peer on {base}");
                return fail("AuthError", &msg, 403);
            }
        }
        // A user's own channel: for connections signed in as that user
        // (pusher-js subscribes right after `pusher:signin_success`).
        ChannelKind::ServerToUser => {
            let id = &channel[wire::SERVER_TO_USER.len()..];
            if user.as_deref() != Some(id) {
                let msg = format!("sign in as user {id} before subscribing to {channel}");
                return fail("AuthError", &msg, 403);
            }
        }
        // A user's personal channel: the connection signed in as that user,
        // or one the app's auth endpoint authorized (as Pushi does).
        ChannelKind::Personal => {
            let id = &channel[wire::PERSONAL.len()..];
            let authorized = || {
                auth.filter(|a| !a.is_empty()).is_some_and(|a| {
                    super::sign::check_channel_auth(&app, &socket_id, channel, None, a).is_ok()
                })
            };
            if id.is_empty() || !(user.as_deref() == Some(id) || authorized()) {
                let msg = format!("sign in as user {id} before subscribing to {channel}");
                return fail("AuthError", &msg, 403);
            }
        }
        ChannelKind::Private | ChannelKind::PrivateEncrypted => {
            let Some(a) = auth else {
                return fail("AuthError", "auth is required for private channels", 401);
            };
            if let Err(e) = super::sign::check_channel_auth(&app, &socket_id, channel, None, a) {
                return fail("AuthError", &e.to_string(), 401);
            }
        }
        ChannelKind::Presence => {
            let Some(data) = channel_data else {
                return fail("AuthError", "presence channels need channel_data", 401);
            };
            let Some(a) = auth else {
                return fail("AuthError", "auth is required for presence channels", 401);
            };
            if let Err(e) =
                super::sign::check_channel_auth(&app, &socket_id, channel, Some(data), a)
            {
                return fail("AuthError", &e.to_string(), 401);
            }
            match wire::parse_channel_data(data) {
                Ok(m) => member = Some(m),
                Err(e) => return fail("AuthError", &e.to_string(), 400),
            }
            peer = serde_json::from_str::<serde_json::Value>(data)
                .is_ok_and(|v| v.get("peer") == Some(&serde_json::Value::Bool(true)));
        }
    }
    // A personal channel (signed in as its user, or `private-personal-`
    // authorized) follows the user's durable subscriptions.
    let personal = match kind {
        ChannelKind::Personal => Some(&channel[wire::PERSONAL.len()..]),
        ChannelKind::Private => channel.strip_prefix(wire::PRIVATE_PERSONAL),
        _ => None,
    };
    if let Some(id) = personal.filter(|id| !id.is_empty()) {
        return super::personal::follow_user(worker, key, ns, id, channel);
    }
    let route = crate::engine::message::route_key_string(ns, channel);
    let shared = &*fe.shared;
    // A channel the connection follows for its user is subscribed to
    // already, but not by the connection itself.
    let followed = worker
        .core
        .shard
        .borrow_mut()
        .follow
        .mark_direct(key, &route, true);
    let already = match followed {
        Some(direct) => direct,
        None => worker.core.shard.borrow().is_subscribed(key, &route),
    };
    // A cache channel's subscription takes effect on its owner core, with
    // the cached event (see `super::cache`).
    let cached = super::cache::keep(channel);
    // In a cluster (and on a cache channel) the subscription takes effect
    // once the node receives the channel; the success waits for it.
    let later = !already && (cached.is_some() || worker.core.hub.broker().is_some());
    if !already {
        let refused = match later {
            true => worker
                .core
                .shard
                .borrow()
                .at_subscription_limit(key)
                .then(|| worker.core.shard.borrow().max_subscriptions()),
            false => match worker.core.subscribe(key, &route) {
                Err(SubscribeError::TooMany(n)) => Some(n),
                Err(SubscribeError::Unavailable) | Ok(()) => None,
            },
        };
        if let Some(n) = refused {
            let msg = format!("subscription limit of {n} channels reached");
            return fail("LimitReached", &msg, 403);
        }
        // A user's own channel is not a channel of the app's: no occupancy,
        // no webhooks, not listed by the channels API.
        if kind != ChannelKind::ServerToUser && shared.presence.subscribed(&route) {
            webhook(
                fe,
                &app,
                WebhookEvent::ChannelOccupied,
                json!({
                    "name": "channel_occupied", "channel": channel,
                }),
            );
        }
    }
    let presence = match member {
        None => None,
        Some((user_id, user_info)) => {
            let joined_before = fe
                .conns
                .borrow_mut()
                .get_mut(&key)
                .and_then(|p| p.user_on(channel).map(str::to_string));
            let members = if joined_before.is_some() {
                // Subscribing twice: answer with the current members.
                shared.presence.members(&route)
            } else {
                let gen = worker.core.shard.borrow().conn(key).map_or(0, |c| c.gen);
                let except = Some((worker.core.id as u16, key as u32, gen));
                let (first, members) = shared.presence.join(&route, &user_id, &user_info, except);
                if let Some(p) = fe.conns.borrow_mut().get_mut(&key) {
                    p.presence.push((channel.into(), user_id.clone().into()));
                    if peer {
                        p.peer_on.push(channel.into());
                        shared.add_peer(&route, &user_id);
                    }
                }
                if first {
                    seen("member_added", ns, channel, &user_id);
                    let frame = wire::member_added_routed(channel, &user_id, &user_info);
                    worker.core.publish(notice(frame, ns), Some(key));
                    webhook(
                        fe,
                        &app,
                        WebhookEvent::MemberAdded,
                        json!({
                            "name": "member_added", "channel": channel, "user_id": user_id,
                        }),
                    );
                }
                members
            };
            let list: Vec<(&str, &str)> = members.iter().map(|(u, i)| (&**u, &**i)).collect();
            Some(wire::presence_data(&list))
        }
    };
    let succeeded = wire::subscription_succeeded(channel, presence.as_deref());
    // When the success waits (a cluster), a presence channel's members are
    // listed as they are then: every member event after it reaches the
    // connection, and every one before it is in the list.
    let members_then = (later && presence.is_some()).then(|| (fe.shared.clone(), route.clone()));
    let success_now = move |name: &str, fallback: Bytes| match &members_then {
        None => fallback,
        Some((pusher, route)) => {
            let members = pusher.presence.members(route);
            let list: Vec<(&str, &str)> = members.iter().map(|(u, i)| (&**u, &**i)).collect();
            wire::subscription_succeeded(name, Some(&wire::presence_data(&list)))
        }
    };
    let Some(keep) = cached else {
        if !later {
            push(worker, key, succeeded);
            return;
        }
        let gen = worker.core.shard.borrow().conn(key).map_or(0, |c| c.gen);
        let ticket = worker.core.shard.borrow_mut().reserve_reply(key, gen);
        let name: Box<str> = channel.into();
        let then: Subscribed = Box::new(move |core: &Core, result| {
            let frame = match result {
                Ok(()) => success_now(&name, succeeded),
                Err(e) => refusal(&name, e),
            };
            core.shard
                .borrow_mut()
                .fill_reply(key, gen, ticket, vec![frame]);
        });
        worker.core.subscribe_then(key, &route, then);
        return;
    };
    // The cached event (or `pusher:cache_miss`) right after the success,
    // before any live event.
    let gen = worker.core.shard.borrow().conn(key).map_or(0, |c| c.gen);
    let ticket = worker.core.shard.borrow_mut().reserve_reply(key, gen);
    let (pusher, app) = (fe.shared.clone(), app.clone());
    let name: Box<str> = channel.into();
    let joined = Box::new(move |core: &Core, result: Result<Join, SubscribeError>| {
        let frames = match result {
            Ok(join) => match (join.newest, success_now(&name, succeeded)) {
                (Some(event), succeeded) => vec![succeeded, event],
                (None, succeeded) => {
                    if let Some(w) = &pusher.webhooks {
                        w.send(
                            &app,
                            WebhookEvent::CacheMiss,
                            json!({"name": "cache_miss", "channel": &*name}),
                        );
                    }
                    vec![succeeded, super::cache::cache_miss(&name)]
                }
            },
            Err(e) => vec![refusal(&name, e)],
        };
        core.shard.borrow_mut().fill_reply(key, gen, ticket, frames);
    });
    worker.core.join(key, &route, keep, None, joined);
}

/// `pusher:subscription_error` for a subscription the engine refused.
fn refusal(channel: &str, e: SubscribeError) -> Bytes {
    match e {
        SubscribeError::TooMany(n) => {
            let msg = format!("subscription limit of {n} channels reached");
            wire::subscription_error(channel, "LimitReached", &msg, 403)
        }
        SubscribeError::Unavailable => {
            let msg = "the cluster's broker is unreachable; try again later";
            wire::subscription_error(channel, "ServiceUnavailable", msg, 503)
        }
    }
}

/// `pusher:signin` (user authentication): `data.auth` must sign
/// `socket_id::user::user_data`, and `user_data` must carry an `id`. The
/// connection then belongs to that user (`terminate_connections`). A bad
/// signin is refused as Pusher refuses it: error and close 4009.
fn signin(fe: &Pusher, worker: &Worker, key: usize, text: &[u8]) {
    let refuse = |msg: &str| {
        let mut shard = worker.core.shard.borrow_mut();
        shard.push(key, wire::error(Some(4009), msg));
        shard.close(key, Some(4009), msg, false);
    };
    let v: serde_json::Value = serde_json::from_slice(text).unwrap_or_default();
    let mut data = v["data"].clone();
    if let Some(s) = data.as_str() {
        data = serde_json::from_str(s).unwrap_or_default();
    }
    let (Some(auth), Some(user_data)) = (data["auth"].as_str(), data["user_data"].as_str()) else {
        return refuse("pusher:signin needs data.auth and data.user_data");
    };
    let (app, socket_id) = match fe.conns.borrow_mut().get_mut(&key) {
        Some(p) => (p.app.clone(), p.socket_id.clone()),
        None => return,
    };
    if let Err(e) = super::sign::check_user_auth(&app, &socket_id, user_data, auth) {
        return refuse(&e.to_string());
    }
    let user: serde_json::Value = serde_json::from_str(user_data).unwrap_or_default();
    let id = match &user["id"] {
        serde_json::Value::String(s) if !s.is_empty() => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return refuse("user_data must be a JSON object with an id"),
    };
    if let Some(p) = fe.conns.borrow_mut().get_mut(&key) {
        p.user = Some(id.into());
    }
    let data = json!({ "user_data": user_data }).to_string();
    let reply = json!({ "event": "pusher:signin_success", "data": data }).to_string();
    push(
        worker,
        key,
        crate::transport::ws::frame::text(reply.as_bytes()),
    );
}

fn unsubscribe(fe: &Pusher, worker: &Worker, key: usize, channel: &str) {
    let ns = match fe.conns.borrow_mut().get_mut(&key) {
        Some(p) => p.ns,
        None => return,
    };
    if super::personal::user_of(channel).is_some() {
        super::personal::unfollow_user(worker, key, ns, channel);
        return;
    }
    let route = crate::engine::message::route_key_string(ns, channel);
    // A channel it also follows for its user stays subscribed.
    let followed = worker
        .core
        .shard
        .borrow_mut()
        .follow
        .mark_direct(key, &route, false);
    let was = match followed {
        Some(direct) => direct,
        None => worker.core.unsubscribe(key, &route),
    };
    if was {
        left(fe, worker, key, &route);
    }
}

/// After `key` stopped being subscribed to `route`: presence and occupancy
/// bookkeeping, and the events and webhooks it makes due.
fn left(fe: &Pusher, worker: &Worker, key: usize, route: &str) {
    let shared = &*fe.shared;
    let channel = channel_of(route);
    let (app, ns, user) = {
        let mut conns = fe.conns.borrow_mut();
        let Some(p) = conns.get_mut(&key) else {
            return;
        };
        let user = p
            .presence
            .iter()
            .position(|(c, _)| &**c == channel)
            .map(|i| p.presence.swap_remove(i).1);
        let was_peer = p.peer_on.iter().position(|c| &**c == channel);
        if let (Some(i), Some(u)) = (was_peer, &user) {
            p.peer_on.swap_remove(i);
            shared.remove_peer(route, u);
        }
        (p.app.clone(), p.ns, user)
    };
    if let Some(user_id) = user {
        if shared.presence.leave(route, &user_id) {
            seen("member_removed", ns, channel, &user_id);
            let frame = wire::member_removed_routed(channel, &user_id);
            worker.core.publish(notice(frame, ns), Some(key));
            webhook(
                fe,
                &app,
                WebhookEvent::MemberRemoved,
                json!({
                    "name": "member_removed", "channel": channel, "user_id": &*user_id,
                }),
            );
        }
    }
    if ChannelKind::of(channel) != ChannelKind::ServerToUser && shared.presence.unsubscribed(route)
    {
        webhook(
            fe,
            &app,
            WebhookEvent::ChannelVacated,
            json!({
                "name": "channel_vacated", "channel": channel,
            }),
        );
    }
}

fn client_event(fe: &Pusher, worker: &Worker, key: usize, event: &str, channel: &str, data: &str) {
    let (app, ns, socket_id, user, allowed) = {
        let mut conns = fe.conns.borrow_mut();
        let Some(p) = conns.get_mut(&key) else {
            return;
        };
        // The routing key on the stack: no allocation per client event.
        let mut buf = [0u8; crate::engine::message::MAX_KEY];
        let subscribed = worker.core.shard.borrow().is_subscribed(
            key,
            crate::engine::message::route_key(&mut buf, p.ns, channel),
        );
        let user = p.user_on(channel).map(str::to_string);
        let allowed = if !p.app.enable_client_messages {
            Err((
                None,
                "client events are not enabled for this app".to_string(),
            ))
        } else if !wire::validate_channel(channel).is_ok_and(ChannelKind::allows_client_events) {
            Err((
                None,
                "client events are only allowed on private, presence and peer channels".into(),
            ))
        } else if !subscribed {
            Err((
                None,
                format!("client event rejected: not subscribed to {channel}"),
            ))
        } else if data.len() > p.app.max_event_bytes() {
            Err((
                None,
                format!(
                    "client event rejected: data over {} bytes",
                    p.app.max_event_bytes()
                ),
            ))
        } else if !p.take_token() {
            Err((
                Some(4301),
                format!(
                    "client event rejected: more than {} per second",
                    p.app.max_client_events_per_second
                ),
            ))
        } else {
            Ok(())
        };
        (p.app.clone(), p.ns, p.socket_id.clone(), user, allowed)
    };
    if let Err((code, msg)) = allowed {
        push(worker, key, wire::error(code, &msg));
        return;
    }
    let frame = wire::event_frame_routed(event, channel, data, user.as_deref());
    worker.core.publish(published(frame, ns), Some(key));
    // Built only when some webhook wants it: this is the client-event hot path.
    if fe.shared.webhooks.is_some() && app.wants_webhook(WebhookEvent::ClientEvent) {
        let mut hook = json!({
            "name": "client_event", "channel": channel, "event": event,
            "data": data_string(data), "socket_id": &*socket_id,
        });
        if let Some(u) = user {
            hook["user_id"] = u.into();
        }
        webhook(fe, &app, WebhookEvent::ClientEvent, hook);
    }
}

/// Pusher webhooks carry event data as a string: a JSON string's content,
/// or any other JSON value's text.
fn data_string(raw: &str) -> String {
    serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.to_string())
}

fn webhook(fe: &Pusher, app: &Arc<App>, kind: WebhookEvent, event: serde_json::Value) {
    if let Some(w) = &fe.shared.webhooks {
        w.send(app, kind, event);
    }
}

/// Before a Pusher connection is removed: leaves every channel (presence
/// members, occupancy, their events and webhooks), and its app's count.
pub fn on_close(fe: &Pusher, worker: &Worker, key: usize) {
    let routes = worker.core.shard.borrow().subscriptions(key);
    for route in routes {
        if worker.core.unsubscribe(key, &route) {
            left(fe, worker, key, &route);
        }
    }
    if let Some(p) = fe.conns.borrow_mut().remove(&key) {
        fe.shared.release(p.ns);
    }
}

/// Pings connections silent for the activity timeout and closes (4201)
/// those that did not answer a ping within the pong timeout.
pub fn sweep(fe: &Pusher, worker: &Worker, now_ms: u64) {
    let idle = fe.shared.activity_timeout.as_millis() as u64;
    let grace = fe.shared.pong_timeout.as_millis() as u64;
    let mut ping = Vec::new();
    let mut close = Vec::new();
    let mut app_changed = Vec::new();
    {
        let shard = worker.core.shard.borrow();
        for (&key, p) in fe.conns.borrow_mut().iter_mut() {
            if shard.conn(key).is_none_or(|c| c.is_closing()) {
                continue;
            }
            if let Err(why) = refresh_app(&fe.shared, p) {
                app_changed.push((key, why));
                continue;
            }
            match p.pinged_at {
                Some(at) if now_ms.saturating_sub(at) >= grace => close.push(key),
                Some(_) => {}
                None if now_ms.saturating_sub(p.last_seen) >= idle => {
                    p.pinged_at = Some(now_ms);
                    ping.push(key);
                }
                None => {}
            }
        }
    }
    for (key, why) in app_changed {
        close_for_app(worker, key, why);
    }
    let mut shard = worker.core.shard.borrow_mut();
    for key in ping {
        shard.push(key, wire::ping());
    }
    for key in close {
        shard.close(
            key,
            Some(PONG_NOT_RECEIVED),
            "Pong reply not received",
            false,
        );
    }
}

/// Closes the connections of `user_id` in namespace `ns` on this core
/// (`terminate_connections`): those signed in as that user, or present as
/// that user on a presence channel.
pub fn terminate_user(fe: &Pusher, worker: &Worker, ns: u16, user_id: &str) {
    let keys: Vec<usize> = fe
        .conns
        .borrow()
        .iter()
        .filter(|(_, p)| {
            let signed_in = p.user.as_deref() == Some(user_id);
            p.ns == ns && (signed_in || p.presence.iter().any(|(_, u)| &**u == user_id))
        })
        .map(|(&k, _)| k)
        .collect();
    let mut shard = worker.core.shard.borrow_mut();
    for key in keys {
        if shard.conn(key).is_none_or(|c| c.is_closing()) {
            continue;
        }
        let frame = wire::error(Some(4009), "connection terminated by the app");
        shard.push(key, frame);
        shard.close(key, Some(4009), "connection terminated by the app", false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routed_frames_keep_their_channel() {
        let r = wire::event_frame_routed("a\",\"channel\":\"x", "room", "{}", None);
        let p = published(r, 2);
        assert_eq!(p.channel(), "room");
        p.with_key(|k| assert_eq!(k, "2#room"));
        assert_eq!(channel_of("2#room"), "room");
    }

    #[test]
    fn webhook_data_is_a_string() {
        assert_eq!(data_string(r#""hi""#), "hi");
        assert_eq!(data_string(r#"{"a":1}"#), r#"{"a":1}"#);
    }
}
