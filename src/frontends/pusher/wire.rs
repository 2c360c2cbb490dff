//! The Pusher Channels protocol, version 7, on the wire: channel names,
//! client messages, the server's frames, presence payloads, socket ids and
//! the HTTP API's event bodies.
//!
//! Pure: bytes in, values out; no IO, no clock, no state. Parsing borrows
//! from the client's payload; a client event's `data` is kept as the raw
//! JSON the client sent and spliced into the outgoing frame byte for byte.
//! A frame that fans out (an event, `member_added`, `member_removed`) is
//! encoded once into a WebSocket text frame ([`crate::transport::ws::frame`]) and shared;
//! [`Routed`] also says where its channel name sits, like
//! [`crate::engine::message::Message`].
//!
//! Formats follow Pusher's protocol page and what pusher-js expects
//! (`core/connection/protocol/protocol.ts` decodes `data` when it is a
//! JSON string; `core/channels/presence_channel.ts` and `members.ts` read
//! `presence.hash`, `presence.count`, `user_id`, `user_info`).

use std::borrow::Cow;

use bytes::{BufMut, Bytes};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::transport::ws::frame;

/// Longest channel name (Pusher's channels page: "a maximum of 164
/// characters", prefixes included).
pub const MAX_CHANNEL_LEN: usize = 164;

/// Longest event name (HTTP API reference; pusher-http-node and
/// pusher-http-python refuse longer names too).
pub const MAX_EVENT_NAME_LEN: usize = 200;

/// Most channels one HTTP API event may target (HTTP API reference).
pub const MAX_TRIGGER_CHANNELS: usize = 100;

/// Most events in one `batch_events` request (Pusher's limit on its shared
/// clusters; Soketi's default too).
pub const MAX_BATCH_EVENTS: usize = 10;

/// Pusher's limit on an event's `data`, in bytes (HTTP API reference:
/// "limited to 10KB", 413 beyond).
pub const MAX_EVENT_DATA_BYTES: usize = 10 * 1024;

/// The `activity_timeout` Pusher announces, in seconds: a client pings
/// after this long without traffic.
pub const DEFAULT_ACTIVITY_TIMEOUT_SECS: u32 = 120;

/// The protocol versions accepted in `?protocol=` (Pusher no longer
/// supports 1 to 3; pusher-js sends 7).
pub const PROTOCOL_VERSIONS: std::ops::RangeInclusive<u8> = 4..=7;

/// Error and close codes of the Pusher protocol ("Error codes" on the
/// protocol page). 4000-4099: do not reconnect; 4100-4199: reconnect after
/// a delay; 4200-4299: reconnect at once; 4300-4399: other errors.
pub mod codes {
    /// Application only accepts SSL connections.
    pub const SSL_ONLY: u16 = 4000;
    /// Application does not exist (unknown app key).
    pub const APP_NOT_FOUND: u16 = 4001;
    /// Application disabled.
    pub const APP_DISABLED: u16 = 4003;
    /// Application is over its connection quota.
    pub const OVER_CONNECTION_QUOTA: u16 = 4004;
    /// Path not found.
    pub const PATH_NOT_FOUND: u16 = 4005;
    /// Invalid version string format.
    pub const INVALID_VERSION: u16 = 4006;
    /// Unsupported protocol version.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    /// No protocol version supplied.
    pub const NO_PROTOCOL: u16 = 4008;
    /// Connection is unauthorized.
    pub const UNAUTHORIZED: u16 = 4009;
    /// Over capacity.
    pub const OVER_CAPACITY: u16 = 4100;
    /// Generic reconnect immediately.
    pub const RECONNECT: u16 = 4200;
    /// Pong reply not received.
    pub const PONG_NOT_RECEIVED: u16 = 4201;
    /// Closed after inactivity.
    pub const INACTIVITY: u16 = 4202;
    /// Client event rejected due to rate limit.
    pub const CLIENT_EVENT_RATE_LIMIT: u16 = 4301;
}

/// Checks the `protocol` query parameter of `/app/{key}`: the version, or
/// the close code and message to refuse the connection with.
pub fn check_protocol(protocol: Option<&str>) -> Result<u8, (u16, &'static str)> {
    let p = protocol.ok_or((codes::NO_PROTOCOL, "No protocol version supplied"))?;
    let v: u8 = p
        .parse()
        .ok()
        .filter(|_| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .ok_or((codes::INVALID_VERSION, "Invalid version string format"))?;
    if PROTOCOL_VERSIONS.contains(&v) {
        Ok(v)
    } else {
        Err((codes::UNSUPPORTED_PROTOCOL, "Unsupported protocol version"))
    }
}

// ---------------------------------------------------------------------------
// Channels

/// What a channel's name prefix makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// Anyone may subscribe.
    Public,
    /// `private-`: subscribing needs `auth` signed over `socket_id:channel`.
    Private,
    /// `presence-`: like private, with `channel_data` (the member) signed too.
    Presence,
    /// `private-encrypted-`: private, with payloads end-to-end encrypted by
    /// the clients; the server only relays them.
    PrivateEncrypted,
    /// `#server-to-user-{user_id}`: server-to-user events (the server
    /// libraries' `sendToUser`); only a connection signed in as that user
    /// may subscribe.
    ServerToUser,
    /// `peer-{presence channel}:{user}&{user}[&...]` (Pushi's peer
    /// channels): only those users may subscribe, while each is a peer on
    /// that presence channel ([`parse_peer`]).
    Peer,
    /// `personal-{user_id}` (Pushi's personal channels): the messages of
    /// the channels the user subscribed to durably (`POST
    /// /apps/{id}/subscribe`), those published while offline first; only
    /// a connection signed in as that user may subscribe.
    Personal,
}

/// The prefix of a personal channel; `private-personal-` is its variant
/// authorized by the app's auth endpoint instead of a sign-in.
pub const PERSONAL: &str = "personal-";
pub const PRIVATE_PERSONAL: &str = "private-personal-";

/// The prefix of a peer channel.
pub const PEER: &str = "peer-";

/// A peer channel's presence channel and users (at least two, distinct,
/// in ascending order, so that a group has one name).
pub fn parse_peer(name: &str) -> Result<(&str, Vec<&str>), ChannelError> {
    let rest = name.strip_prefix(PEER).ok_or(ChannelError::Peer)?;
    let (base, users) = rest.rsplit_once(':').ok_or(ChannelError::Peer)?;
    if ChannelKind::of(base) != ChannelKind::Presence {
        return Err(ChannelError::Peer);
    }
    let users: Vec<&str> = users.split('&').collect();
    let ordered = users.windows(2).all(|w| w[0] < w[1]);
    if users.len() < 2 || !ordered || users.iter().any(|u| u.is_empty()) {
        return Err(ChannelError::Peer);
    }
    Ok((base, users))
}

/// The prefix of a user's own channel.
pub const SERVER_TO_USER: &str = "#server-to-user-";

impl ChannelKind {
    /// The kind of `name`, from its prefix alone.
    pub fn of(name: &str) -> ChannelKind {
        if name.starts_with(SERVER_TO_USER) {
            ChannelKind::ServerToUser
        } else if name.starts_with(PEER) {
            ChannelKind::Peer
        } else if name.starts_with(PERSONAL) {
            ChannelKind::Personal
        } else if name.starts_with("private-encrypted-") {
            ChannelKind::PrivateEncrypted
        } else if name.starts_with("private-") {
            ChannelKind::Private
        } else if name.starts_with("presence-") {
            ChannelKind::Presence
        } else {
            ChannelKind::Public
        }
    }

    /// Does subscribing need a signed `auth`?
    pub fn needs_auth(self) -> bool {
        !matches!(
            self,
            ChannelKind::Public
                | ChannelKind::ServerToUser
                | ChannelKind::Peer
                | ChannelKind::Personal
        )
    }

    /// May clients send `client-*` events here (when the app allows them)?
    /// Pusher allows them on private and presence channels only; encrypted
    /// channels are excluded as well (the server could not check them).
    pub fn allows_client_events(self) -> bool {
        matches!(
            self,
            ChannelKind::Private | ChannelKind::Presence | ChannelKind::Peer
        )
    }

    /// The word used in messages: `public`, `private`, `presence`,
    /// `private-encrypted`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Public => "public",
            ChannelKind::Private => "private",
            ChannelKind::Presence => "presence",
            ChannelKind::PrivateEncrypted => "private-encrypted",
            ChannelKind::ServerToUser => "server-to-user",
            ChannelKind::Peer => "peer",
            ChannelKind::Personal => "personal",
        }
    }
}

/// Checks a channel name: 1 to 164 bytes of `A-Z a-z 0-9 _ - = @ , . ;`
/// (Pusher's channels page; the same set pusher-http-node and
/// pusher-http-python check), and returns its kind.
pub fn validate_channel(name: &str) -> Result<ChannelKind, ChannelError> {
    if name.is_empty() || name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::Length);
    }
    // `#` only as the prefix of a server-to-user channel, with a user id.
    let rest = match name.strip_prefix(SERVER_TO_USER) {
        Some("") => return Err(ChannelError::NoUserId),
        Some(id) => id,
        None => name,
    };
    let ok = rest
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b));
    if ok {
        return Ok(ChannelKind::of(name));
    }
    // A peer channel also has `:` before its users and `&` between them.
    let peer_ok = name.starts_with(PEER)
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;:&".contains(&b));
    match peer_ok {
        true => parse_peer(name).map(|_| ChannelKind::Peer),
        false => Err(ChannelError::Characters),
    }
}

/// Why a Pusher channel name is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid channel name: must be 1 to 164 characters")]
    Length,
    #[error("invalid channel name: #server-to-user- needs a user id")]
    NoUserId,
    #[error("invalid channel name: allowed characters are A-Z a-z 0-9 _ - = @ , . ;")]
    Characters,
    #[error("invalid peer channel: peer-<presence channel>:<user>&<user>, users distinct and in ascending order")]
    Peer,
}

// ---------------------------------------------------------------------------
// Socket ids

/// A socket id as Pusher writes them: two decimal numbers joined by a dot.
pub fn socket_id(a: u64, b: u64) -> String {
    format!("{a}.{b}")
}

/// Is `s` a socket id (`^\d+\.\d+$`, the check of pusher-http-node and
/// pusher-http-python)? Each number has at most 20 digits.
pub fn valid_socket_id(s: &str) -> bool {
    let Some((a, b)) = s.split_once('.') else {
        return false;
    };
    let digits = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|c| c.is_ascii_digit());
    digits(a) && digits(b)
}

// ---------------------------------------------------------------------------
// Client messages

/// Why a client message could not be read. The `Display` text is meant as
/// the `message` of the `pusher:error` sent back (code `null`, as Pusher
/// does for malformed messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message is not valid JSON")]
    NotJson,
    #[error("message must be a JSON object with an \"event\" field")]
    NotObject,
    #[error("missing field \"{0}\"")]
    Missing(&'static str),
    #[error("field \"{0}\" must be a string")]
    NotString(&'static str),
    #[error("field \"data\" of {0} must be an object")]
    BadData(&'static str),
    #[error(transparent)]
    InvalidChannel(#[from] ChannelError),
    #[error("invalid event name: must be 1 to 200 characters")]
    InvalidEventName,
}

/// One message from a Pusher client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// `pusher:ping`: answer with [`pong`].
    Ping,
    /// `pusher:pong`: the answer to the server's [`ping`].
    Pong,
    /// `pusher:subscribe`. `auth` and `channel_data` are `None` when absent,
    /// `null` or empty (pusher-js sends `auth: ""` for public channels).
    Subscribe {
        channel: Cow<'a, str>,
        auth: Option<Cow<'a, str>>,
        channel_data: Option<Cow<'a, str>>,
    },
    /// `pusher:unsubscribe` (the name is not validated: unsubscribing from
    /// a channel that cannot exist is a no-op).
    Unsubscribe { channel: Cow<'a, str> },
    /// A `client-*` event; `data` is the raw JSON sent, to splice verbatim.
    ClientEvent {
        event: Cow<'a, str>,
        channel: Cow<'a, str>,
        data: &'a str,
    },
    /// A `pusher_internal:*` event: those are the server's alone, so the
    /// caller refuses it (the name is cut to 64 characters).
    Internal { event: String },
    /// Any other event: an unknown or unsupported `pusher:` event (such as
    /// `pusher:signin`, see [`super::sign::check_user_auth`]) or a name
    /// without the `client-` prefix.
    Other { event: Cow<'a, str> },
}

/// Every field as raw JSON, so one ill-typed field gets a precise message.
#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    event: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    data: Option<&'a RawValue>,
}

/// The fields of a `pusher:subscribe` or `pusher:unsubscribe` `data` object.
#[derive(Deserialize)]
struct RawData<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    auth: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    channel_data: Option<&'a RawValue>,
}

/// Keeps a present `null` as `Some("null")` instead of `None`.
fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Is the first non-blank byte `{`? serde would also accept a JSON array
/// for a struct (fields in order), which no Pusher message is.
fn is_object(text: &[u8]) -> bool {
    text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// A required string field.
fn string<'a>(raw: Option<&'a RawValue>, name: &'static str) -> Result<Cow<'a, str>, WireError> {
    let raw = raw.ok_or(WireError::Missing(name))?;
    serde_json::from_str::<Cow<'a, str>>(raw.get()).map_err(|_| WireError::NotString(name))
}

/// An optional string field: absent, `null` and `""` are `None`.
fn opt_string<'a>(
    raw: Option<&'a RawValue>,
    name: &'static str,
) -> Result<Option<Cow<'a, str>>, WireError> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => {
            let s = serde_json::from_str::<Cow<'a, str>>(r.get())
                .map_err(|_| WireError::NotString(name))?;
            Ok(Some(s).filter(|s| !s.is_empty()))
        }
    }
}

/// The string fields of a `data` object that a message needs.
struct DataFields<'a> {
    channel: Option<Cow<'a, str>>,
    auth: Option<Cow<'a, str>>,
    channel_data: Option<Cow<'a, str>>,
}

impl DataFields<'_> {
    fn into_owned(self) -> DataFields<'static> {
        let own = |c: Option<Cow<'_, str>>| c.map(|c| Cow::Owned(c.into_owned()));
        DataFields {
            channel: own(self.channel),
            auth: own(self.auth),
            channel_data: own(self.channel_data),
        }
    }
}

fn data_fields<'a>(text: &'a str, event: &'static str) -> Result<DataFields<'a>, WireError> {
    if !is_object(text.as_bytes()) {
        return Err(WireError::BadData(event));
    }
    let d: RawData<'a> = serde_json::from_str(text).map_err(|_| WireError::BadData(event))?;
    Ok(DataFields {
        channel: opt_string(d.channel, "channel")?,
        auth: opt_string(d.auth, "auth")?,
        channel_data: opt_string(d.channel_data, "channel_data")?,
    })
}

/// Reads `data` as an object, or as a JSON string holding one (some
/// clients encode `data` the way the server does).
fn data_of<'a>(
    data: Option<&'a RawValue>,
    event: &'static str,
) -> Result<DataFields<'a>, WireError> {
    let data = data.ok_or(WireError::Missing("data"))?;
    let text = data.get();
    if text.starts_with('"') {
        let inner: String = serde_json::from_str(text).map_err(|_| WireError::BadData(event))?;
        Ok(data_fields(&inner, event)?.into_owned())
    } else {
        data_fields(text, event)
    }
}

/// Cuts a client-supplied name for an error message.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Parses one text message from a Pusher client.
pub fn parse(text: &[u8]) -> Result<ClientMessage<'_>, WireError> {
    if !is_object(text) {
        return Err(match serde_json::from_slice::<&RawValue>(text) {
            Ok(_) => WireError::NotObject,
            Err(_) => WireError::NotJson,
        });
    }
    let msg: RawMessage<'_> = serde_json::from_slice(text).map_err(|e| {
        if e.is_data() {
            WireError::NotObject
        } else {
            WireError::NotJson
        }
    })?;
    let event = string(msg.event, "event")?;
    let parsed = match &*event {
        "pusher:ping" => ClientMessage::Ping,
        "pusher:pong" => ClientMessage::Pong,
        "pusher:subscribe" => {
            let d = data_of(msg.data, "pusher:subscribe")?;
            let channel = d.channel.ok_or(WireError::Missing("channel"))?;
            validate_channel(&channel).map_err(WireError::InvalidChannel)?;
            ClientMessage::Subscribe {
                channel,
                auth: d.auth,
                channel_data: d.channel_data,
            }
        }
        "pusher:unsubscribe" => {
            let d = data_of(msg.data, "pusher:unsubscribe")?;
            ClientMessage::Unsubscribe {
                channel: d.channel.ok_or(WireError::Missing("channel"))?,
            }
        }
        name if name.starts_with("pusher_internal:") => {
            ClientMessage::Internal { event: shown(name) }
        }
        name if name.starts_with("client-") => {
            if name.chars().count() > MAX_EVENT_NAME_LEN {
                return Err(WireError::InvalidEventName);
            }
            let channel = string(msg.channel, "channel")?;
            validate_channel(&channel).map_err(WireError::InvalidChannel)?;
            let data = msg.data.ok_or(WireError::Missing("data"))?.get();
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            }
        }
        _ => ClientMessage::Other { event },
    };
    Ok(parsed)
}

// ---------------------------------------------------------------------------
// Presence

#[derive(Deserialize)]
struct RawChannelData<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    user_info: Option<&'a RawValue>,
}

/// Reads a presence subscription's `channel_data` (`{"user_id":..,
/// "user_info":..}`): the user id as a string (the libraries' output may
/// hold a number, written here as it was sent, `10` becoming `"10"`) and
/// `user_info` as raw JSON (`null` when absent).
pub fn parse_channel_data(s: &str) -> Result<(String, String), ChannelDataError> {
    use ChannelDataError as E;
    if !is_object(s.as_bytes()) {
        return Err(E::NotObject);
    }
    let d: RawChannelData<'_> = serde_json::from_str(s).map_err(|_| E::NotObject)?;
    let id = d
        .user_id
        .map(RawValue::get)
        .filter(|&r| r != "null")
        .ok_or(E::NoUserId)?;
    let user_id = match id.as_bytes()[0] {
        b'"' => serde_json::from_str::<String>(id).map_err(|_| E::BadString)?,
        b'-' | b'0'..=b'9' => id.to_owned(),
        _ => return Err(E::BadType),
    };
    if user_id.is_empty() {
        return Err(E::Empty);
    }
    let user_info = d.user_info.map_or("null", RawValue::get).to_owned();
    Ok((user_id, user_info))
}

/// Why a presence subscription's `channel_data` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelDataError {
    #[error("channel_data must be a JSON object with a user_id")]
    NotObject,
    #[error("channel_data must have a user_id")]
    NoUserId,
    #[error("user_id is not a valid string")]
    BadString,
    #[error("user_id must be a string or a number")]
    BadType,
    #[error("user_id must not be empty")]
    Empty,
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The presence payload of `subscription_succeeded`:
/// `{"presence":{"ids":[..],"hash":{id:info,..},"count":n}}`, each member a
/// (user id, raw `user_info` JSON or `null`) pair, unique by user id.
pub fn presence_data(members: &[(&str, &str)]) -> String {
    let size: usize = members
        .iter()
        .map(|(id, info)| 2 * id.len() + info.len() + 8)
        .sum();
    let mut out = Vec::with_capacity(48 + size);
    out.extend_from_slice(br#"{"presence":{"ids":["#);
    for (i, (id, _)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(&mut out, id);
    }
    out.extend_from_slice(br#"],"hash":{"#);
    for (i, (id, info)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(&mut out, id);
        out.push(b':');
        out.extend_from_slice(info.as_bytes());
    }
    out.extend_from_slice(br#"},"count":"#);
    out.extend_from_slice(members.len().to_string().as_bytes());
    out.extend_from_slice(b"}}");
    // Built from &str pieces only.
    String::from_utf8(out).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Server frames

/// A text frame of `payload`.
pub fn text_frame(payload: &[u8]) -> Bytes {
    frame::text(payload)
}

/// `{"event":"<event>"` with `data` as a JSON string literal of `inner`,
/// and optionally a channel: the shape of most Pusher server messages.
fn string_data_frame(event: &str, channel: Option<&str>, inner: &str) -> Bytes {
    let mut out = Vec::with_capacity(48 + event.len() + inner.len() * 2);
    out.extend_from_slice(br#"{"event":"#);
    push_json_str(&mut out, event);
    if let Some(c) = channel {
        out.extend_from_slice(br#","channel":"#);
        push_json_str(&mut out, c);
    }
    out.extend_from_slice(br#","data":"#);
    push_json_str(&mut out, inner);
    out.push(b'}');
    text_frame(&out)
}

/// `pusher:connection_established`, whose `data` is a JSON-encoded string
/// (as Pusher sends it) of `{"socket_id":..,"activity_timeout":..}`.
pub fn connection_established(socket_id: &str, activity_timeout_secs: u32) -> Bytes {
    let mut inner = Vec::with_capacity(64);
    inner.extend_from_slice(br#"{"socket_id":"#);
    push_json_str(&mut inner, socket_id);
    inner.extend_from_slice(br#","activity_timeout":"#);
    inner.extend_from_slice(activity_timeout_secs.to_string().as_bytes());
    inner.push(b'}');
    let inner = String::from_utf8(inner).unwrap_or_default();
    string_data_frame("pusher:connection_established", None, &inner)
}

/// `{"event":"pusher:pong","data":{}}`
pub fn pong() -> Bytes {
    text_frame(br#"{"event":"pusher:pong","data":{}}"#)
}

/// `{"event":"pusher:ping","data":{}}`
pub fn ping() -> Bytes {
    text_frame(br#"{"event":"pusher:ping","data":{}}"#)
}

/// `{"event":"pusher:error","data":{"code":..,"message":..}}`; `code` is
/// `null` for errors without one (malformed messages).
pub fn error(code: Option<u16>, message: &str) -> Bytes {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(br#"{"event":"pusher:error","data":{"code":"#);
    match code {
        Some(c) => out.extend_from_slice(c.to_string().as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","message":"#);
    push_json_str(&mut out, message);
    out.extend_from_slice(b"}}");
    text_frame(&out)
}

/// `pusher_internal:subscription_succeeded` for `channel`: `data` is the
/// string `"{}"`, or for a presence channel the [`presence_data`] JSON
/// encoded as a string.
pub fn subscription_succeeded(channel: &str, presence_data: Option<&str>) -> Bytes {
    string_data_frame(
        "pusher_internal:subscription_succeeded",
        Some(channel),
        presence_data.unwrap_or("{}"),
    )
}

/// `pusher:subscription_error` for `channel`, with `data`
/// `{"type":..,"error":..,"status":..}`: the shape pusher-js itself emits
/// on the channel when its auth endpoint fails (`core/channels/channel.ts`),
/// so applications handle both the same way. `kind` is for example
/// `"AuthError"`, `status` an HTTP-like status (401, 403).
pub fn subscription_error(channel: &str, kind: &str, error: &str, status: u16) -> Bytes {
    let mut out = Vec::with_capacity(96 + channel.len() + error.len());
    out.extend_from_slice(br#"{"event":"pusher:subscription_error","channel":"#);
    push_json_str(&mut out, channel);
    out.extend_from_slice(br#","data":{"type":"#);
    push_json_str(&mut out, kind);
    out.extend_from_slice(br#","error":"#);
    push_json_str(&mut out, error);
    out.extend_from_slice(br#","status":"#);
    out.extend_from_slice(status.to_string().as_bytes());
    out.extend_from_slice(b"}}");
    text_frame(&out)
}

/// A frame that fans out to a channel's subscribers, encoded once, and
/// where its channel name sits in it (the routing key; the same
/// convention as [`crate::engine::message::Message`]).
#[derive(Debug, Clone)]
pub struct Routed {
    pub frame: Bytes,
    /// Offset of the channel name in `frame`.
    pub channel_at: u32,
    /// Length of the channel name (at most [`MAX_CHANNEL_LEN`]).
    pub channel_len: u8,
}

impl Routed {
    /// The channel this frame is for.
    pub fn channel(&self) -> &str {
        let start = self.channel_at as usize;
        let bytes = &self.frame[start..start + self.channel_len as usize];
        // Channel names are validated ASCII before a frame is built.
        std::str::from_utf8(bytes).unwrap_or("")
    }
}

/// Builds `{"event":<event>,"channel":"<channel>",<rest>` as one text
/// frame with a single allocation; `rest` must end the object.
fn routed(event: &[u8], channel: &str, rest: &[&[u8]]) -> Routed {
    debug_assert!(validate_channel(channel).is_ok());
    const HEAD: &[u8] = br#"{"event":"#;
    const MID: &[u8] = br#","channel":""#;
    let len = HEAD.len()
        + event.len()
        + MID.len()
        + channel.len()
        + 1
        + rest.iter().map(|r| r.len()).sum::<usize>();
    let mut buf = frame::start(OpCode::Data(Data::Text), len);
    buf.put_slice(HEAD);
    buf.put_slice(event);
    buf.put_slice(MID);
    let channel_at = buf.len() as u32;
    buf.put_slice(channel.as_bytes());
    buf.put_u8(b'"');
    for r in rest {
        buf.put_slice(r);
    }
    Routed {
        frame: buf.freeze(),
        channel_at,
        channel_len: channel.len() as u8,
    }
}

/// An event for every subscriber of `channel`:
/// `{"event":..,"channel":..,"data":<data>[,"user_id":..]}`, `data` raw
/// JSON spliced verbatim (for an HTTP API event, the JSON string literal of
/// its `data`, see [`TriggerBody::data_json`]); `user_id` is the sender of a
/// client event on a presence channel (pusher-js passes it to handlers as
/// `metadata.user_id`).
pub fn event_frame_routed(event: &str, channel: &str, data: &str, user_id: Option<&str>) -> Routed {
    let mut ev = Vec::with_capacity(event.len() + 2);
    push_json_str(&mut ev, event);
    let mut tail = Vec::new();
    if let Some(u) = user_id {
        tail.extend_from_slice(br#","user_id":"#);
        push_json_str(&mut tail, u);
    }
    tail.push(b'}');
    routed(&ev, channel, &[br#","data":"#, data.as_bytes(), &tail])
}

/// [`event_frame_routed`]'s frame alone.
pub fn event_frame(event: &str, channel: &str, data: &str, user_id: Option<&str>) -> Bytes {
    event_frame_routed(event, channel, data, user_id).frame
}

/// `"data":"<inner JSON as a string>"}`
fn string_data_tail(inner: &[u8]) -> Vec<u8> {
    let inner = std::str::from_utf8(inner).unwrap_or_default();
    let mut tail = Vec::with_capacity(inner.len() + inner.len() / 4 + 12);
    tail.extend_from_slice(br#","data":"#);
    push_json_str(&mut tail, inner);
    tail.push(b'}');
    tail
}

/// `pusher_internal:member_added` for `channel`, `data` the JSON string of
/// `{"user_id":..,"user_info":<raw>}`.
pub fn member_added_routed(channel: &str, user_id: &str, user_info: &str) -> Routed {
    let mut inner = Vec::with_capacity(32 + user_id.len() + user_info.len());
    inner.extend_from_slice(br#"{"user_id":"#);
    push_json_str(&mut inner, user_id);
    inner.extend_from_slice(br#","user_info":"#);
    inner.extend_from_slice(user_info.as_bytes());
    inner.push(b'}');
    routed(
        br#""pusher_internal:member_added""#,
        channel,
        &[&string_data_tail(&inner)],
    )
}

/// [`member_added_routed`]'s frame alone.
pub fn member_added(channel: &str, user_id: &str, user_info: &str) -> Bytes {
    member_added_routed(channel, user_id, user_info).frame
}

/// `pusher_internal:member_removed` for `channel`, `data` the JSON string
/// of `{"user_id":..}`.
pub fn member_removed_routed(channel: &str, user_id: &str) -> Routed {
    let mut inner = Vec::with_capacity(16 + user_id.len());
    inner.extend_from_slice(br#"{"user_id":"#);
    push_json_str(&mut inner, user_id);
    inner.push(b'}');
    routed(
        br#""pusher_internal:member_removed""#,
        channel,
        &[&string_data_tail(&inner)],
    )
}

/// [`member_removed_routed`]'s frame alone.
pub fn member_removed(channel: &str, user_id: &str) -> Bytes {
    member_removed_routed(channel, user_id).frame
}

// ---------------------------------------------------------------------------
// HTTP API bodies

/// One event of `POST /apps/{id}/events` or of a `batch_events` batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerBody {
    /// The event name, 1 to 200 characters.
    pub name: String,
    /// Target channels: validated, without duplicates, in the order given.
    pub channels: Vec<String>,
    /// `data` decoded (the API requires a string: the libraries JSON-encode
    /// objects before sending).
    pub data: String,
    /// `data` exactly as it appeared in the body, a JSON string literal:
    /// what [`event_frame`] splices, so subscribers get `"data":"..."` as
    /// Pusher sends it.
    pub data_json: String,
    /// The connection to leave out (the sender's own socket).
    pub socket_id: Option<String>,
    /// Attributes to report back per channel (`user_count`,
    /// `subscription_count`), comma-separated.
    pub info: Option<String>,
}

#[derive(Deserialize)]
struct RawTrigger<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    name: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    channels: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    socket_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    info: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawBatch<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    batch: Option<&'a RawValue>,
}

/// Why an HTTP API body is refused (a 400, or 413 for [`TriggerError::TooLarge`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    #[error("body is not valid JSON")]
    NotJson,
    #[error("body must be a JSON object")]
    NotObject,
    #[error("missing field \"{0}\"")]
    Missing(&'static str),
    #[error("\"{0}\" must be a string")]
    NotString(&'static str),
    #[error("event name must be 1 to {MAX_EVENT_NAME_LEN} characters")]
    EventName,
    #[error("\"data\" must be a string (the Pusher libraries JSON-encode objects before sending)")]
    DataNotString,
    #[error("send either \"channel\" or \"channels\", not both")]
    BothChannelFields,
    #[error("a batch event names one \"channel\", not \"channels\"")]
    ChannelsInBatch,
    #[error("missing field \"channels\" (or \"channel\")")]
    NoChannels,
    #[error("\"channels\" must be an array of strings")]
    ChannelsNotArray,
    #[error("\"channels\" must not be empty")]
    ChannelsEmpty,
    #[error("an event may target at most {MAX_TRIGGER_CHANNELS} channels (got {0})")]
    TooManyChannels(usize),
    #[error("{error} (got {name:?})")]
    Channel { error: ChannelError, name: String },
    #[error("invalid socket_id {0:?}")]
    SocketId(String),
    #[error("\"batch\" must be an array of events")]
    BatchNotArray,
    #[error("a batch may hold at most {MAX_BATCH_EVENTS} events (got {0})")]
    BatchTooLarge(usize),
    #[error("batch[{0}]: each event must be a JSON object")]
    BatchItemNotObject(usize),
    #[error("batch[{index}]: {error}")]
    InBatch {
        index: usize,
        error: Box<TriggerError>,
    },
    #[error("Request Entity Too Large: the data of event {name:?} is {size} bytes, more than the {max} allowed")]
    TooLarge {
        name: String,
        size: usize,
        max: usize,
    },
}

fn body_object<'a, T: Deserialize<'a>>(text: &'a [u8]) -> Result<T, TriggerError> {
    if !is_object(text) {
        return Err(match serde_json::from_slice::<&RawValue>(text) {
            Ok(_) => TriggerError::NotObject,
            Err(_) => TriggerError::NotJson,
        });
    }
    serde_json::from_slice(text).map_err(|e| {
        if e.is_data() {
            TriggerError::NotObject
        } else {
            TriggerError::NotJson
        }
    })
}

fn api_string(raw: Option<&RawValue>, name: &'static str) -> Result<Option<String>, TriggerError> {
    match raw {
        None => Ok(None),
        Some(r) if r.get() == "null" => Ok(None),
        Some(r) => serde_json::from_str::<String>(r.get())
            .map(Some)
            .map_err(|_| TriggerError::NotString(name)),
    }
}

fn checked_channel(name: String) -> Result<String, TriggerError> {
    match validate_channel(&name) {
        Ok(_) => Ok(name),
        Err(error) => Err(TriggerError::Channel {
            error,
            name: shown(&name).to_string(),
        }),
    }
}

/// Reads one event object; `in_batch` events name one `channel` each, as
/// Pusher's batch format has it.
fn trigger_from(raw: RawTrigger<'_>, in_batch: bool) -> Result<TriggerBody, TriggerError> {
    use TriggerError as E;
    let name = api_string(raw.name, "name")?.ok_or(E::Missing("name"))?;
    if name.is_empty() || name.chars().count() > MAX_EVENT_NAME_LEN {
        return Err(E::EventName);
    }
    let data_raw = raw
        .data
        .filter(|r| r.get() != "null")
        .ok_or(E::Missing("data"))?;
    let data = serde_json::from_str::<String>(data_raw.get()).map_err(|_| E::DataNotString)?;

    let channels = match (raw.channel, raw.channels) {
        (Some(_), Some(_)) => return Err(E::BothChannelFields),
        (_, Some(_)) if in_batch => return Err(E::ChannelsInBatch),
        (None, None) if in_batch => return Err(E::Missing("channel")),
        (None, None) => return Err(E::NoChannels),
        (Some(c), None) => {
            let c = api_string(Some(c), "channel")?.ok_or(E::Missing("channel"))?;
            vec![checked_channel(c)?]
        }
        (None, Some(list)) => {
            let list: Vec<String> =
                serde_json::from_str(list.get()).map_err(|_| E::ChannelsNotArray)?;
            if list.is_empty() {
                return Err(E::ChannelsEmpty);
            }
            if list.len() > MAX_TRIGGER_CHANNELS {
                return Err(E::TooManyChannels(list.len()));
            }
            let mut out: Vec<String> = Vec::with_capacity(list.len());
            for c in list {
                let c = checked_channel(c)?;
                if !out.contains(&c) {
                    out.push(c);
                }
            }
            out
        }
    };

    let socket_id = api_string(raw.socket_id, "socket_id")?;
    if let Some(s) = &socket_id {
        if !valid_socket_id(s) {
            return Err(E::SocketId(shown(s).to_string()));
        }
    }
    let info = api_string(raw.info, "info")?;
    Ok(TriggerBody {
        name,
        channels,
        data,
        data_json: data_raw.get().to_owned(),
        socket_id,
        info,
    })
}

/// Parses the body of `POST /apps/{id}/events`:
/// `{"name":..,"data":"<string>","channels":[..]|"channel":..,
/// "socket_id":..?,"info":..?}`. Errors are 400 messages.
pub fn parse_trigger(body: &[u8]) -> Result<TriggerBody, TriggerError> {
    trigger_from(body_object(body)?, false)
}

/// Parses the body of `POST /apps/{id}/batch_events`:
/// `{"batch":[{"channel":..,"name":..,"data":..,"socket_id":..?}, ..]}`,
/// at most [`MAX_BATCH_EVENTS`] events. Errors are 400 messages naming the
/// event (`batch[2]: ...`).
pub fn parse_batch(body: &[u8]) -> Result<Vec<TriggerBody>, TriggerError> {
    let raw: RawBatch<'_> = body_object(body)?;
    let batch = raw.batch.ok_or(TriggerError::Missing("batch"))?;
    let items: Vec<&RawValue> =
        serde_json::from_str(batch.get()).map_err(|_| TriggerError::BatchNotArray)?;
    if items.len() > MAX_BATCH_EVENTS {
        return Err(TriggerError::BatchTooLarge(items.len()));
    }
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let raw: RawTrigger<'_> = body_object(item.get().as_bytes())
                .map_err(|_| TriggerError::BatchItemNotObject(index))?;
            trigger_from(raw, true).map_err(|e| TriggerError::InBatch {
                index,
                error: Box::new(e),
            })
        })
        .collect()
}

/// Checks an event's `data` against a byte limit (Pusher: 10 KB, answered
/// with 413 and this message).
pub fn check_data_size(event: &TriggerBody, max_bytes: usize) -> Result<(), TriggerError> {
    if event.data.len() > max_bytes {
        return Err(TriggerError::TooLarge {
            name: shown(&event.name).to_string(),
            size: event.data.len(),
            max: max_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::io::Cursor;
    use tungstenite::protocol::frame::FrameHeader;

    /// The JSON payload of a text frame.
    fn payload(f: &[u8]) -> Value {
        let mut c = Cursor::new(f);
        let (h, len) = FrameHeader::parse(&mut c).unwrap().unwrap();
        assert_eq!(h.opcode, OpCode::Data(Data::Text));
        let start = c.position() as usize;
        assert_eq!(f.len() - start, len as usize);
        serde_json::from_slice(&f[start..]).unwrap()
    }

    /// Decodes a `data` that is a JSON string, as pusher-js does.
    fn inner(v: &Value) -> Value {
        serde_json::from_str(v["data"].as_str().unwrap()).unwrap()
    }

    #[test]
    fn channel_names_and_kinds() {
        assert_eq!(validate_channel("news"), Ok(ChannelKind::Public));
        assert_eq!(validate_channel("private-a"), Ok(ChannelKind::Private));
        assert_eq!(
            validate_channel("presence-room.1"),
            Ok(ChannelKind::Presence)
        );
        assert_eq!(
            validate_channel("private-encrypted-x"),
            Ok(ChannelKind::PrivateEncrypted)
        );
        assert!(validate_channel("foo-bar_1234@=,.;").is_ok());
        assert!(validate_channel("App.Models.User.1").is_ok());
        assert!(validate_channel(&"x".repeat(164)).is_ok());
        assert_eq!(
            validate_channel("#server-to-user-42"),
            Ok(ChannelKind::ServerToUser)
        );
        assert!(!ChannelKind::ServerToUser.needs_auth());
        assert!(!ChannelKind::ServerToUser.allows_client_events());
        for bad in [
            "",
            "a b",
            "a:b",
            "a*",
            "é",
            "#server-to-user-",
            "#server-to-user-a#b",
            "#other-1",
            "x#server-to-user-1",
            "a/b",
        ] {
            assert!(validate_channel(bad).is_err(), "{bad}");
        }
        assert!(validate_channel(&"x".repeat(165)).is_err());
        assert!(ChannelKind::Private.needs_auth() && !ChannelKind::Public.needs_auth());
        assert!(ChannelKind::Presence.allows_client_events());
        assert!(!ChannelKind::PrivateEncrypted.allows_client_events());
        assert!(!ChannelKind::Public.allows_client_events());
        assert_eq!(ChannelKind::of("private-"), ChannelKind::Private);
        assert_eq!(ChannelKind::PrivateEncrypted.as_str(), "private-encrypted");
    }

    #[test]
    fn socket_ids() {
        assert_eq!(socket_id(123, 456), "123.456");
        assert!(valid_socket_id("123.456"));
        assert!(valid_socket_id(&socket_id(u64::MAX, 0)));
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "1.2.3",
            "a.1",
            "1.2 ",
            "-1.2",
            "1".repeat(21).as_str(),
        ] {
            assert!(!valid_socket_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn protocol_versions() {
        assert_eq!(check_protocol(Some("7")), Ok(7));
        assert_eq!(check_protocol(Some("5")), Ok(5));
        assert_eq!(check_protocol(None).unwrap_err().0, 4008);
        assert_eq!(check_protocol(Some("x")).unwrap_err().0, 4006);
        assert_eq!(check_protocol(Some("+7")).unwrap_err().0, 4006);
        assert_eq!(check_protocol(Some("")).unwrap_err().0, 4006);
        assert_eq!(check_protocol(Some("3")).unwrap_err().0, 4007);
        assert_eq!(check_protocol(Some("8")).unwrap_err().0, 4007);
        assert_eq!(check_protocol(Some("999")).unwrap_err().0, 4006);
    }

    #[test]
    fn parses_what_pusher_js_sends() {
        assert_eq!(
            parse(br#"{"event":"pusher:ping","data":{}}"#),
            Ok(ClientMessage::Ping)
        );
        assert_eq!(
            parse(br#"{"event":"pusher:pong","data":{}}"#),
            Ok(ClientMessage::Pong)
        );
        // Public channel: pusher-js sends auth "" and no channel_data.
        assert_eq!(
            parse(br#"{"event":"pusher:subscribe","data":{"auth":"","channel":"news"}}"#),
            Ok(ClientMessage::Subscribe {
                channel: "news".into(),
                auth: None,
                channel_data: None
            })
        );
        let m = parse(
            br#"{"event":"pusher:subscribe","data":{"auth":"k:abc","channel_data":"{\"user_id\":\"1\"}","channel":"presence-r"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::Subscribe {
                channel: "presence-r".into(),
                auth: Some("k:abc".into()),
                channel_data: Some(r#"{"user_id":"1"}"#.into())
            }
        );
        assert_eq!(
            parse(br#"{"event":"pusher:unsubscribe","data":{"channel":"news"}}"#),
            Ok(ClientMessage::Unsubscribe {
                channel: "news".into()
            })
        );
        assert_eq!(
            parse(br#"{"event":"client-typing","data":{"who": "ann"},"channel":"private-c"}"#),
            Ok(ClientMessage::ClientEvent {
                event: "client-typing".into(),
                channel: "private-c".into(),
                data: r#"{"who": "ann"}"#
            })
        );
        assert_eq!(
            parse(br#"{"event":"pusher:signin","data":{"auth":"k:s","user_data":"{}"}}"#),
            Ok(ClientMessage::Other {
                event: "pusher:signin".into()
            })
        );
        assert_eq!(
            parse(
                br#"{"event":"pusher_internal:member_added","channel":"presence-a","data":"{}"}"#
            ),
            Ok(ClientMessage::Internal {
                event: "pusher_internal:member_added".into()
            })
        );
        assert_eq!(
            parse(br#"{"event":"my-event","data":1}"#),
            Ok(ClientMessage::Other {
                event: "my-event".into()
            })
        );
        assert_eq!(
            parse(br#"{"event":"pusher:cache_miss"}"#),
            Ok(ClientMessage::Other {
                event: "pusher:cache_miss".into()
            })
        );
    }

    #[test]
    fn subscribe_data_may_be_a_json_string() {
        let m = parse(
            br#"{"event":"pusher:subscribe","data":"{\"channel\":\"private-a\",\"auth\":\"k:s\",\"channel_data\":null}"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::Subscribe {
                channel: "private-a".into(),
                auth: Some("k:s".into()),
                channel_data: None
            }
        );
        assert_eq!(
            parse(br#"{"event":"pusher:subscribe","data":"[1]"}"#),
            Err(WireError::BadData("pusher:subscribe"))
        );
        assert_eq!(
            parse(br#"{"event":"pusher:subscribe","data":"nope"}"#),
            Err(WireError::BadData("pusher:subscribe"))
        );
    }

    #[test]
    fn parse_errors() {
        assert_eq!(parse(b"nope"), Err(WireError::NotJson));
        assert_eq!(parse(b"[1]"), Err(WireError::NotObject));
        assert_eq!(parse(b"{"), Err(WireError::NotJson));
        assert_eq!(parse(br#"{"data":{}}"#), Err(WireError::Missing("event")));
        assert_eq!(parse(br#"{"event":5}"#), Err(WireError::NotString("event")));
        assert_eq!(
            parse(br#"{"event":"pusher:subscribe"}"#),
            Err(WireError::Missing("data"))
        );
        assert_eq!(
            parse(br#"{"event":"pusher:subscribe","data":{}}"#),
            Err(WireError::Missing("channel"))
        );
        assert_eq!(
            parse(br#"{"event":"pusher:subscribe","data":{"channel":"a b"}}"#),
            Err(WireError::InvalidChannel(ChannelError::Characters))
        );
        assert_eq!(
            parse(br#"{"event":"pusher:subscribe","data":{"channel":"a","auth":7}}"#),
            Err(WireError::NotString("auth"))
        );
        assert_eq!(
            parse(br#"{"event":"pusher:subscribe","data":[1]}"#),
            Err(WireError::BadData("pusher:subscribe"))
        );
        assert_eq!(
            parse(br#"{"event":"client-x","data":{}}"#),
            Err(WireError::Missing("channel"))
        );
        assert_eq!(
            parse(br#"{"event":"client-x","channel":"private-a"}"#),
            Err(WireError::Missing("data"))
        );
        assert!(matches!(
            parse(br#"{"event":"client-x","channel":"bad name","data":1}"#),
            Err(WireError::InvalidChannel(_))
        ));
        let long = format!(
            r#"{{"event":"client-{}","channel":"private-a","data":1}}"#,
            "x".repeat(200)
        );
        assert_eq!(parse(long.as_bytes()), Err(WireError::InvalidEventName));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let m =
            parse(br#"{"event":"client-\u0061","channel":"private-\u0062","data":null}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::ClientEvent {
                event: "client-a".into(),
                channel: "private-b".into(),
                data: "null"
            }
        );
    }

    #[test]
    fn channel_data() {
        assert_eq!(
            parse_channel_data(r#"{"user_id":"u1","user_info":{"name":"Ann"}}"#),
            Ok(("u1".into(), r#"{"name":"Ann"}"#.into()))
        );
        // pusher-http-node serialises numeric ids as numbers.
        assert_eq!(
            parse_channel_data(r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#),
            Ok(("10".into(), r#"{"name":"Mr. Channels"}"#.into()))
        );
        assert_eq!(
            parse_channel_data(r#"{"user_id":"\u00e9"}"#),
            Ok(("é".into(), "null".into()))
        );
        assert_eq!(
            parse_channel_data(r#"{"user_id":"1","user_info":null,"extra":true}"#),
            Ok(("1".into(), "null".into()))
        );
        assert!(parse_channel_data(r#"{"user_info":{}}"#).is_err());
        assert!(parse_channel_data(r#"{"user_id":null}"#).is_err());
        assert!(parse_channel_data(r#"{"user_id":""}"#).is_err());
        assert!(parse_channel_data(r#"{"user_id":true}"#).is_err());
        assert!(parse_channel_data(r#"{"user_id":{"a":1}}"#).is_err());
        assert!(parse_channel_data(r#"["1"]"#).is_err());
        assert!(parse_channel_data("not json").is_err());
    }

    #[test]
    fn presence_payload() {
        let p = presence_data(&[("1", r#"{"name":"Ann"}"#), ("b\"2", "null")]);
        let v: Value = serde_json::from_str(&p).unwrap();
        assert_eq!(
            v,
            json!({"presence":{"ids":["1","b\"2"],"hash":{"1":{"name":"Ann"},"b\"2":null},"count":2}})
        );
        assert_eq!(
            presence_data(&[]),
            r#"{"presence":{"ids":[],"hash":{},"count":0}}"#
        );
    }

    #[test]
    fn connection_frames() {
        let v = payload(&connection_established("123.456", 120));
        assert_eq!(v["event"], "pusher:connection_established");
        assert!(v["data"].is_string(), "data is a JSON-encoded string");
        assert_eq!(
            inner(&v),
            json!({"socket_id":"123.456","activity_timeout":120})
        );
        assert_eq!(payload(&pong()), json!({"event":"pusher:pong","data":{}}));
        assert_eq!(payload(&ping()), json!({"event":"pusher:ping","data":{}}));
        assert_eq!(
            payload(&error(Some(4001), "App key nope does not exist")),
            json!({"event":"pusher:error","data":{"code":4001,"message":"App key nope does not exist"}})
        );
        assert_eq!(
            payload(&error(None, "a \"quoted\"\nline")),
            json!({"event":"pusher:error","data":{"code":null,"message":"a \"quoted\"\nline"}})
        );
    }

    #[test]
    fn subscription_frames() {
        let v = payload(&subscription_succeeded("news", None));
        assert_eq!(
            v,
            json!({"event":"pusher_internal:subscription_succeeded","channel":"news","data":"{}"})
        );
        let p = presence_data(&[("1", r#"{"n":1}"#)]);
        let v = payload(&subscription_succeeded("presence-r", Some(&p)));
        assert_eq!(v["channel"], "presence-r");
        assert_eq!(
            inner(&v),
            json!({"presence":{"ids":["1"],"hash":{"1":{"n":1}},"count":1}})
        );
        assert_eq!(
            payload(&subscription_error(
                "private-a",
                "AuthError",
                "Invalid signature",
                401
            )),
            json!({"event":"pusher:subscription_error","channel":"private-a",
                   "data":{"type":"AuthError","error":"Invalid signature","status":401}})
        );
    }

    #[test]
    fn event_frames_splice_data_and_route_by_channel() {
        let data = r#"{"b": 1,   "a":"é"}"#;
        let r = event_frame_routed("client-x", "presence-r", data, Some("u\"1"));
        assert_eq!(r.channel(), "presence-r");
        assert!(String::from_utf8_lossy(&r.frame).contains(data), "verbatim");
        assert_eq!(
            payload(&r.frame),
            json!({"event":"client-x","channel":"presence-r","data":{"b":1,"a":"é"},"user_id":"u\"1"})
        );
        // An API event: data is the JSON string literal from the request body.
        let f = event_frame("my \"event\"", "news", r#""{\"some\":\"data\"}""#, None);
        let v = payload(&f);
        assert_eq!(
            v,
            json!({"event":"my \"event\"","channel":"news","data":"{\"some\":\"data\"}"})
        );
        assert_eq!(inner(&v), json!({"some":"data"}));
        // Frames above the 125- and 65535-byte header thresholds.
        for n in [200, 70_000] {
            let big = format!("\"{}\"", "x".repeat(n));
            let r = event_frame_routed("e", "c", &big, None);
            assert_eq!(r.channel(), "c");
            assert_eq!(payload(&r.frame)["data"].as_str().unwrap().len(), n);
        }
    }

    #[test]
    fn member_frames() {
        let r = member_added_routed("presence-r", "7", r#"{"name":"Ann"}"#);
        assert_eq!(r.channel(), "presence-r");
        let v = payload(&r.frame);
        assert_eq!(v["event"], "pusher_internal:member_added");
        assert_eq!(v["channel"], "presence-r");
        assert!(v["data"].is_string());
        assert_eq!(inner(&v), json!({"user_id":"7","user_info":{"name":"Ann"}}));
        assert_eq!(payload(&member_added("presence-r", "7", "null")), {
            let mut w = v.clone();
            w["data"] = json!(r#"{"user_id":"7","user_info":null}"#);
            w
        });
        let r = member_removed_routed("presence-r", "7");
        assert_eq!(r.channel(), "presence-r");
        let v = payload(&member_removed("presence-r", "7"));
        assert_eq!(v["event"], "pusher_internal:member_removed");
        assert_eq!(inner(&v), json!({"user_id":"7"}));
    }

    #[test]
    fn trigger_bodies() {
        // pusher-http-node: {name, data, channels[, socket_id]}.
        let t = parse_trigger(
            br#"{"name":"foo","data":"{\"some\":\"data\"}","channels":["a","b","a"],"socket_id":"1.2"}"#,
        )
        .unwrap();
        assert_eq!(t.name, "foo");
        assert_eq!(t.channels, ["a", "b"]);
        assert_eq!(t.data, r#"{"some":"data"}"#);
        assert_eq!(t.data_json, r#""{\"some\":\"data\"}""#);
        assert_eq!(t.socket_id.as_deref(), Some("1.2"));
        assert_eq!(t.info, None);
        // The single-channel form, info, and a null socket_id.
        let t = parse_trigger(
            br#"{"name":"e","channel":"presence-x","data":"hi","socket_id":null,"info":"user_count"}"#,
        )
        .unwrap();
        assert_eq!(t.channels, ["presence-x"]);
        assert_eq!((t.data.as_str(), t.data_json.as_str()), ("hi", r#""hi""#));
        assert_eq!(t.info.as_deref(), Some("user_count"));
        assert_eq!(t.socket_id, None);

        let cases: [(&[u8], &str); 14] = [
            (b"nope", "not valid JSON"),
            (b"[1]", "JSON object"),
            (br#"{"data":"x","channel":"a"}"#, "missing field \"name\""),
            (br#"{"name":"","data":"x","channel":"a"}"#, "1 to 200"),
            (br#"{"name":"e","channel":"a"}"#, "missing field \"data\""),
            (
                br#"{"name":"e","data":{"a":1},"channel":"a"}"#,
                "must be a string",
            ),
            (br#"{"name":"e","data":"x"}"#, "missing field \"channels\""),
            (
                br#"{"name":"e","data":"x","channel":"a","channels":["b"]}"#,
                "not both",
            ),
            (
                br#"{"name":"e","data":"x","channels":[]}"#,
                "must not be empty",
            ),
            (
                br#"{"name":"e","data":"x","channels":"a"}"#,
                "array of strings",
            ),
            (
                br#"{"name":"e","data":"x","channel":"a b"}"#,
                "invalid channel name",
            ),
            (
                br#"{"name":"e","data":"x","channel":"a","socket_id":"12"}"#,
                "invalid socket_id",
            ),
            (
                br#"{"name":"e","data":"x","channel":"a","socket_id":12}"#,
                "must be a string",
            ),
            (
                br#"{"name":7,"data":"x","channel":"a"}"#,
                "\"name\" must be a string",
            ),
        ];
        for (body, want) in cases {
            let e = parse_trigger(body).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(body));
        }
        let long = format!(
            r#"{{"name":"{}","data":"x","channel":"a"}}"#,
            "é".repeat(201)
        );
        assert!(parse_trigger(long.as_bytes()).is_err());
        let ok = format!(
            r#"{{"name":"{}","data":"x","channel":"a"}}"#,
            "é".repeat(200)
        );
        assert!(parse_trigger(ok.as_bytes()).is_ok());
        let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
        let body = json!({"name":"e","data":"x","channels":many}).to_string();
        assert!(parse_trigger(body.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("at most 100"));
        let body = json!({"name":"e","data":"x","channels":&many[..100]}).to_string();
        assert_eq!(parse_trigger(body.as_bytes()).unwrap().channels.len(), 100);
    }

    #[test]
    fn batch_bodies() {
        let b = parse_batch(
            br#"{"batch":[{"channel":"a","name":"e1","data":"1"},{"channel":"b","name":"e2","data":"\"2\"","socket_id":"3.4"}]}"#,
        )
        .unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].channels.as_slice(), b[0].name.as_str()),
            (&["a".to_string()][..], "e1")
        );
        assert_eq!(b[1].data, "\"2\"");
        assert_eq!(b[1].socket_id.as_deref(), Some("3.4"));
        assert!(parse_batch(br#"{"batch":[]}"#).unwrap().is_empty());

        let e = parse_batch(
            br#"{"batch":[{"channel":"a","name":"e","data":"1"},{"name":"e","data":"1"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "batch[1]: missing field \"channel\"");
        let e = parse_batch(br#"{"batch":[{"channels":["a"],"name":"e","data":"1"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("batch[0]: a batch event names one \"channel\""),
            "{e}"
        );
        assert!(parse_batch(br#"{"batch":[1]}"#)
            .unwrap_err()
            .to_string()
            .contains("batch[0]"));
        assert!(parse_batch(br#"{"events":[]}"#)
            .unwrap_err()
            .to_string()
            .contains("\"batch\""));
        assert!(parse_batch(br#"{"batch":{}}"#)
            .unwrap_err()
            .to_string()
            .contains("array"));
        let ten: Vec<Value> = (0..10)
            .map(|i| json!({"channel":"a","name":format!("e{i}"),"data":"x"}))
            .collect();
        assert_eq!(
            parse_batch(json!({"batch":ten}).to_string().as_bytes())
                .unwrap()
                .len(),
            10
        );
        let eleven: Vec<Value> = (0..11)
            .map(|_| json!({"channel":"a","name":"e","data":"x"}))
            .collect();
        assert!(parse_batch(json!({"batch":eleven}).to_string().as_bytes())
            .unwrap_err()
            .to_string()
            .contains("at most 10"));
    }

    #[test]
    fn data_size_limit() {
        let t = parse_trigger(
            format!(
                r#"{{"name":"e","channel":"a","data":"{}"}}"#,
                "x".repeat(10240)
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(check_data_size(&t, MAX_EVENT_DATA_BYTES).is_ok());
        let t = parse_trigger(
            format!(
                r#"{{"name":"e","channel":"a","data":"{}"}}"#,
                "x".repeat(10241)
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(check_data_size(&t, MAX_EVENT_DATA_BYTES)
            .unwrap_err()
            .to_string()
            .starts_with("Request Entity Too Large"));
    }

    #[test]
    fn peer_channels_name_a_presence_channel_and_its_users_in_order() {
        assert_eq!(
            parse_peer("peer-presence-room:alice&bob"),
            Ok(("presence-room", vec!["alice", "bob"]))
        );
        assert_eq!(
            validate_channel("peer-presence-room:a&b&c"),
            Ok(ChannelKind::Peer)
        );
        for bad in [
            "peer-presence-room:bob&alice",
            "peer-presence-room:alice&alice",
            "peer-presence-room:alice",
            "peer-presence-room:alice&",
            "peer-private-room:a&b",
            "peer-room:a&b",
            "presence-room:a&b",
        ] {
            assert!(validate_channel(bad).is_err(), "{bad}");
        }
        assert!(ChannelKind::Peer.allows_client_events() && !ChannelKind::Peer.needs_auth());
    }
}
