//! herald's wire protocol (`shared/spec/protocol.md`), version 1: parsing
//! client messages and encoding server messages.
//!
//! Pure: bytes in, values out. Parsing borrows from the client's payload;
//! `data` is kept as the publisher's raw JSON text and spliced into the
//! outgoing frame byte for byte, so a publish is never re-serialised.

use std::borrow::Cow;

use bytes::{BufMut, Bytes};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::engine::history::Since;
use crate::engine::message::{Encoding, Message, PayloadKind};
use crate::transport::ws::frame;

pub use crate::engine::message::MAX_CHANNEL_LEN;

/// Error codes of protocol.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    Unauthorized,
    TooLarge,
    RateLimited,
    /// protocol.md 1.1: history asked of a channel that keeps none.
    NotFound,
    /// herald's extension: the node cannot reach its cluster's broker.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// The HTTP status of the same error in the HTTP API.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::TooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::NotFound => 404,
            ErrorCode::Unavailable => 503,
        }
    }
}

/// A client request that could not be understood: answered with `bad_request`.
/// Carries the request's `id` when it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest<'a> {
    pub id: Option<&'a str>,
    pub message: Cow<'static, str>,
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    Subscribe {
        channel: Cow<'a, str>,
        /// protocol.md 1.1 "Recovery on subscribe".
        since: Option<Since>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
    },
    Publish {
        channel: Cow<'a, str>,
        data: &'a str,
        /// protocol.md 1.1 "Idempotent publish".
        idempotency_key: Option<Cow<'a, str>>,
    },
    /// protocol.md 1.1 "Reading history".
    History {
        channel: Cow<'a, str>,
        since: Option<Since>,
        limit: Option<usize>,
    },
    Auth {
        token: Cow<'a, str>,
    },
    Ping,
}

/// A parsed client message: the operation and its raw `id` (JSON number or string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub id: Option<&'a str>,
    pub op: Op<'a>,
}

/// Every field as raw JSON, so one ill-typed field still lets us read `id`.
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    op: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    since: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    idempotency_key: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    limit: Option<&'a RawValue>,
    /// wsify's form: `{"command":..,"args":{..}}`.
    #[serde(borrow, default, deserialize_with = "raw")]
    command: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    args: Option<&'a RawValue>,
}

/// The `args` of a wsify command.
#[derive(Deserialize)]
struct RawArgs<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    content: Option<&'a RawValue>,
}

/// Keeps a present `null` as `Some("null")` instead of `None`.
fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn bad(id: Option<&str>, message: impl Into<Cow<'static, str>>) -> BadRequest<'_> {
    BadRequest {
        id,
        message: message.into(),
    }
}

fn string_field<'a>(
    id: Option<&'a str>,
    raw: Option<&'a RawValue>,
    name: &'static str,
) -> Result<Cow<'a, str>, BadRequest<'a>> {
    let raw = raw.ok_or_else(|| bad(id, format!("missing field '{name}'")))?;
    serde_json::from_str::<Cow<'a, str>>(raw.get())
        .map_err(|_| bad(id, format!("field '{name}' must be a string")))
}

fn channel_field<'a>(
    id: Option<&'a str>,
    raw: Option<&'a RawValue>,
) -> Result<Cow<'a, str>, BadRequest<'a>> {
    let channel = string_field(id, raw, "channel")?;
    validate_channel(&channel).map_err(|e| bad(id, e.to_string()))?;
    Ok(channel)
}

/// Longest epoch and idempotency key (protocol.md 1.1).
pub const MAX_EPOCH_LEN: usize = 64;
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSince<'a> {
    #[serde(borrow)]
    epoch: Cow<'a, str>,
    offset: u64,
}

/// `since`: `{"epoch":"..","offset":N}`, or absent (`null` too).
fn since_field<'a>(
    id: Option<&'a str>,
    raw: Option<&'a RawValue>,
) -> Result<Option<Since>, BadRequest<'a>> {
    let Some(raw) = raw.filter(|r| r.get() != "null") else {
        return Ok(None);
    };
    let since: RawSince<'_> = serde_json::from_str(raw.get()).map_err(|_| {
        bad(
            id,
            "field 'since' must be an object {\"epoch\":string,\"offset\":non-negative integer}",
        )
    })?;
    if since.epoch.len() > MAX_EPOCH_LEN {
        return Err(bad(id, "field 'since.epoch' is longer than 64 bytes"));
    }
    Ok(Some(Since {
        epoch: since.epoch.into(),
        offset: since.offset,
    }))
}

/// `idempotency_key`: a string of at most 64 bytes, or absent.
fn idempotency_field(raw: Option<&RawValue>) -> Result<Option<Cow<'_, str>>, &'static str> {
    let Some(raw) = raw.filter(|r| r.get() != "null") else {
        return Ok(None);
    };
    let key = serde_json::from_str::<Cow<'_, str>>(raw.get())
        .map_err(|_| "field 'idempotency_key' must be a string")?;
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err("field 'idempotency_key' must be 1 to 64 bytes");
    }
    Ok(Some(key))
}

/// `limit`: a positive integer, or absent.
fn limit_field<'a>(
    id: Option<&'a str>,
    raw: Option<&'a RawValue>,
) -> Result<Option<usize>, BadRequest<'a>> {
    let Some(raw) = raw.filter(|r| r.get() != "null") else {
        return Ok(None);
    };
    serde_json::from_str::<u64>(raw.get())
        .ok()
        .filter(|n| *n > 0)
        .map(|n| Some(n.min(usize::MAX as u64) as usize))
        .ok_or_else(|| bad(id, "field 'limit' must be a positive integer"))
}

/// Why a channel name is refused (protocol.md "Channel names").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid channel name: must be 1 to 255 bytes")]
    Length,
    #[error("invalid channel name: allowed characters are A-Z a-z 0-9 _ - = @ , . ; :")]
    Characters,
}

/// Checks a channel name: 1 to 255 bytes of `A-Z a-z 0-9 _ - = @ , . ; :`.
pub fn validate_channel(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() || name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::Length);
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ChannelError::Characters)
    }
}

/// Why a binary publish is refused (protocol.md "Binary frames").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BinaryError {
    #[error("empty binary frame: expected a channel length byte")]
    Empty,
    #[error("binary frame too short for its channel length byte")]
    Short,
    #[error("binary channel is not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Channel(#[from] ChannelError),
}

/// Is the first non-blank byte `{`? serde would also accept a JSON array
/// for a struct (fields in order), which protocol.md does not allow.
fn is_object(text: &[u8]) -> bool {
    text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Parses one client text message.
pub fn parse_request(text: &[u8]) -> Result<Request<'_>, BadRequest<'_>> {
    if !is_object(text) {
        return Err(match serde_json::from_slice::<&RawValue>(text) {
            Ok(_) => bad(None, "message must be a JSON object with an 'op' field"),
            Err(_) => bad(None, "message is not valid JSON"),
        });
    }
    let raw: RawRequest<'_> = match serde_json::from_slice(text) {
        Ok(r) => r,
        Err(e) if e.is_data() => {
            return Err(bad(
                None,
                "message must be a JSON object with an 'op' field",
            ))
        }
        Err(_) => return Err(bad(None, "message is not valid JSON")),
    };
    let id = match raw.id.map(RawValue::get) {
        None | Some("null") => None,
        Some(s) if s.starts_with('"') || s.starts_with('-') || s.as_bytes()[0].is_ascii_digit() => {
            Some(s)
        }
        Some(_) => return Err(bad(None, "field 'id' must be a number or a string")),
    };
    if raw.op.is_none() && raw.command.is_some() {
        return parse_wsify(id, raw.command, raw.args);
    }
    let op = string_field(id, raw.op, "op")?;
    let op = match &*op {
        "subscribe" => Op::Subscribe {
            channel: channel_field(id, raw.channel)?,
            since: since_field(id, raw.since)?,
        },
        "unsubscribe" => Op::Unsubscribe {
            channel: channel_field(id, raw.channel)?,
        },
        "publish" => {
            let channel = channel_field(id, raw.channel)?;
            let data = raw
                .data
                .ok_or_else(|| bad(id, "missing field 'data'"))?
                .get();
            let idempotency_key = idempotency_field(raw.idempotency_key).map_err(|m| bad(id, m))?;
            Op::Publish {
                channel,
                data,
                idempotency_key,
            }
        }
        "history" => Op::History {
            channel: channel_field(id, raw.channel)?,
            since: since_field(id, raw.since)?,
            limit: limit_field(id, raw.limit)?,
        },
        "auth" => Op::Auth {
            token: string_field(id, raw.token, "token")?,
        },
        "ping" => Op::Ping,
        other => {
            let mut shown: String = other.chars().take(32).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            return Err(bad(id, format!("unknown op '{shown}'")));
        }
    };
    Ok(Request { id, op })
}

/// wsify's commands: `join`, `leave` and `broadcast` (`args.channel`,
/// `args.content`) are subscribe, unsubscribe and publish.
fn parse_wsify<'a>(
    id: Option<&'a str>,
    command: Option<&'a RawValue>,
    args: Option<&'a RawValue>,
) -> Result<Request<'a>, BadRequest<'a>> {
    let command = string_field(id, command, "command")?;
    if !matches!(&*command, "join" | "leave" | "broadcast") {
        let mut shown: String = command.chars().take(32).collect();
        if shown.len() < command.len() {
            shown.push('…');
        }
        return Err(bad(id, format!("unknown command '{shown}'")));
    }
    let args = args.ok_or_else(|| bad(id, "missing field 'args'"))?;
    if !is_object(args.get().as_bytes()) {
        return Err(bad(id, "field 'args' must be an object"));
    }
    let args: RawArgs<'a> =
        serde_json::from_str(args.get()).map_err(|_| bad(id, "field 'args' must be an object"))?;
    let channel = channel_field(id, args.channel)?;
    let op = match &*command {
        "join" => Op::Subscribe {
            channel,
            since: None,
        },
        "leave" => Op::Unsubscribe { channel },
        "broadcast" => {
            let data = args
                .content
                .ok_or_else(|| bad(id, "missing field 'args.content'"))?
                .get();
            Op::Publish {
                channel,
                data,
                idempotency_key: None,
            }
        }
        _ => unreachable!("checked above"),
    };
    Ok(Request { id, op })
}

#[derive(Deserialize)]
struct RawHttpPublish<'a> {
    #[serde(borrow, default, deserialize_with = "raw")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    content: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "raw")]
    idempotency_key: Option<&'a RawValue>,
}

/// A parsed `POST /publish` (or `/broadcast`) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpPublish<'a> {
    pub channel: Cow<'a, str>,
    /// The raw JSON to deliver as `data`.
    pub data: &'a str,
    pub idempotency_key: Option<Cow<'a, str>>,
}

/// Parses the body of `POST /publish` (`{"channel":..,"data":..}`) or, with
/// `wsify`, of `POST /broadcast` (`{"channel":..,"content":..}`), either
/// with an optional `idempotency_key`.
pub fn parse_http_publish(body: &[u8], wsify: bool) -> Result<HttpPublish<'_>, Cow<'static, str>> {
    if !is_object(body) {
        return Err(match serde_json::from_slice::<&RawValue>(body) {
            Ok(_) => Cow::Borrowed("body must be a JSON object"),
            Err(_) => Cow::Borrowed("body is not valid JSON"),
        });
    }
    let raw: RawHttpPublish<'_> = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            Cow::Borrowed("body must be a JSON object")
        } else {
            Cow::Borrowed("body is not valid JSON")
        }
    })?;
    let channel = channel_field(None, raw.channel).map_err(|e| e.message)?;
    let (field, value) = if wsify {
        ("content", raw.content)
    } else {
        ("data", raw.data)
    };
    let data = value.ok_or_else(|| Cow::Owned(format!("missing field '{field}'")))?;
    let idempotency_key = idempotency_field(raw.idempotency_key).map_err(Cow::Borrowed)?;
    Ok(HttpPublish {
        channel,
        data: data.get(),
        idempotency_key,
    })
}

/// Splits a binary publish (`n`, `n` bytes of channel, payload).
pub fn parse_binary(payload: &[u8]) -> Result<(&str, &[u8]), BinaryError> {
    let (&n, rest) = payload.split_first().ok_or(BinaryError::Empty)?;
    let n = n as usize;
    if n == 0 || rest.len() < n {
        return Err(BinaryError::Short);
    }
    let channel = std::str::from_utf8(&rest[..n]).map_err(|_| BinaryError::NotUtf8)?;
    validate_channel(channel)?;
    Ok((channel, &rest[n..]))
}

const MSG_HEAD: &[u8] = br#"{"op":"message","channel":""#;
const MSG_MID: &[u8] = br#"","data":"#;

/// The native protocol's encoding of published messages.
pub const ENCODING: Encoding = Encoding(0);

/// Builds `{"op":"message","channel":..,"data":..}` as one text frame, with
/// `data` spliced in verbatim. One allocation, whatever the fan-out.
pub fn message_frame(channel: &str, data: &str) -> Message {
    debug_assert!(validate_channel(channel).is_ok());
    let len = MSG_HEAD.len() + channel.len() + MSG_MID.len() + data.len() + 1;
    let mut buf = frame::start(OpCode::Data(Data::Text), len);
    let channel_at = buf.len() + MSG_HEAD.len();
    buf.put_slice(MSG_HEAD);
    buf.put_slice(channel.as_bytes());
    buf.put_slice(MSG_MID);
    let data_at = buf.len();
    buf.put_slice(data.as_bytes());
    buf.put_u8(b'}');
    let channel = channel_at..channel_at + channel.len();
    let payload = data_at..data_at + data.len();
    Message::new(
        buf.freeze(),
        ENCODING,
        channel,
        payload,
        PayloadKind::Json,
        0,
    )
}

/// Builds a binary publish's frame as subscribers receive it: the channel
/// length byte, the channel, the payload (protocol.md "Binary frames").
pub fn binary_frame(channel: &str, payload: &[u8]) -> Message {
    let len = 1 + channel.len() + payload.len();
    let mut buf = frame::start(OpCode::Data(Data::Binary), len);
    buf.put_u8(channel.len() as u8);
    let channel_at = buf.len();
    buf.put_slice(channel.as_bytes());
    let payload_at = buf.len();
    buf.put_slice(payload);
    let channel = channel_at..channel_at + channel.len();
    let payload = payload_at..payload_at + len - 1 - channel.len();
    Message::new(
        buf.freeze(),
        ENCODING,
        channel,
        payload,
        PayloadKind::Binary,
        0,
    )
}

const MSG_OFFSET: &[u8] = br#"","offset":"#;
const MSG_DATA: &[u8] = br#","data":"#;

/// `{"op":"message","channel":..,"offset":N,"data":..}`: a message of a
/// channel with history (protocol.md 1.1), built once by its channel's
/// owner when the offset is known.
pub fn message_frame_at(channel: &str, offset: u64, data: &str) -> Bytes {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(offset).as_bytes();
    let len = MSG_HEAD.len()
        + channel.len()
        + MSG_OFFSET.len()
        + digits.len()
        + MSG_DATA.len()
        + data.len()
        + 1;
    let mut buf = frame::start(OpCode::Data(Data::Text), len);
    buf.put_slice(MSG_HEAD);
    buf.put_slice(channel.as_bytes());
    buf.put_slice(MSG_OFFSET);
    buf.put_slice(digits);
    buf.put_slice(MSG_DATA);
    buf.put_slice(data.as_bytes());
    buf.put_u8(b'}');
    buf.freeze()
}

/// The native frame of a message: for one published in another encoding
/// (a wspubsub publisher's raw text or bytes) a JSON payload becomes
/// `data` as it is, other text a JSON string, bytes a binary frame; with
/// an offset (a channel with history), the offset is in the frame (binary
/// frames have no place for one).
pub fn encode(m: &Message) -> Option<Bytes> {
    let channel = m.channel();
    let offset = m.offset();
    let json = |data: &str| match offset {
        0 => message_frame(channel, data).frame().clone(),
        n => message_frame_at(channel, n, data),
    };
    Some(match m.kind() {
        PayloadKind::Json => json(std::str::from_utf8(m.payload()).ok()?),
        PayloadKind::Text => {
            let text = std::str::from_utf8(m.payload()).ok()?;
            json(&serde_json::to_string(text).ok()?)
        }
        PayloadKind::Binary => binary_frame(channel, m.payload()).frame().clone(),
    })
}

/// What a stored native frame carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredData<'a> {
    /// The publisher's `data`, raw JSON.
    Json(&'a [u8]),
    /// A binary publish's payload.
    Binary(&'a [u8]),
}

/// The publisher's data inside a frame this module built (a message
/// frame, with or without offset, or a binary frame).
pub fn stored_data(frame: &[u8]) -> Option<StoredData<'_>> {
    let (&b0, rest) = frame.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    let body = match b1 & 0x7f {
        126 => rest.get(2..)?,
        127 => rest.get(8..)?,
        _ => rest,
    };
    match b0 & 0x0f {
        0x1 => {
            // Channel names hold no `"`, so the first `,"data":` is ours.
            let at = body.windows(MSG_DATA.len()).position(|w| w == MSG_DATA)?;
            body.get(at + MSG_DATA.len()..body.len().checked_sub(1)?)
                .map(StoredData::Json)
        }
        0x2 => {
            let (&n, rest) = body.split_first()?;
            rest.get(n as usize..).map(StoredData::Binary)
        }
        _ => None,
    }
}

/// A stored frame of `channel` with offset `offset` instead of its own
/// (history kept through a crash is numbered again in a new epoch).
pub fn reoffset(channel: &str, frame: &[u8], offset: u64) -> Option<Bytes> {
    match stored_data(frame)? {
        StoredData::Json(d) => Some(message_frame_at(
            channel,
            offset,
            std::str::from_utf8(d).ok()?,
        )),
        // A binary frame carries no offset.
        StoredData::Binary(_) => Some(Bytes::copy_from_slice(frame)),
    }
}

/// A channel's position in its history, as replies show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    pub epoch: &'a str,
    pub offset: u64,
}

fn push_position(out: &mut Vec<u8>, pos: Position<'_>) {
    out.extend_from_slice(br#","epoch":"#);
    // Epochs are the server's own hex strings; quoted anyway.
    let _ = serde_json::to_writer(&mut *out, pos.epoch);
    out.extend_from_slice(br#","offset":"#);
    out.extend_from_slice(itoa::Buffer::new().format(pos.offset).as_bytes());
}

/// `{"op":"subscribed","channel":..,"id":..,"epoch":..,"offset":T}`, with
/// `"recovered":..` when the subscribe asked to recover.
pub fn subscribed_at(
    channel: &str,
    id: Option<&str>,
    pos: Position<'_>,
    recovered: Option<bool>,
) -> Bytes {
    let mut out = Vec::with_capacity(96 + channel.len() + pos.epoch.len());
    out.extend_from_slice(br#"{"op":"subscribed","channel":""#);
    out.extend_from_slice(channel.as_bytes());
    out.push(b'"');
    push_id(&mut out, id);
    push_position(&mut out, pos);
    if let Some(r) = recovered {
        out.extend_from_slice(if r {
            br#","recovered":true"#.as_slice()
        } else {
            br#","recovered":false"#.as_slice()
        });
    }
    out.push(b'}');
    frame::text(&out)
}

/// `{"op":"subscribed","channel":..,"id":..,"recovered":false}`: `since`
/// on a channel without history (no epoch or offset to give).
pub fn subscribed_unrecovered(channel: &str, id: Option<&str>) -> Bytes {
    let mut out = Vec::with_capacity(64 + channel.len());
    out.extend_from_slice(br#"{"op":"subscribed","channel":""#);
    out.extend_from_slice(channel.as_bytes());
    out.push(b'"');
    push_id(&mut out, id);
    out.extend_from_slice(br#","recovered":false}"#);
    frame::text(&out)
}

/// `{"op":"ack","id":..,"offset":N}`: a publish on a channel with history.
pub fn ack_at(id: &str, offset: u64) -> Bytes {
    let mut out = Vec::with_capacity(48 + id.len());
    out.extend_from_slice(br#"{"op":"ack""#);
    push_id(&mut out, Some(id));
    out.extend_from_slice(br#","offset":"#);
    out.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
    out.push(b'}');
    frame::text(&out)
}

/// The history object (protocol.md 1.1 "Reading history"): with
/// `request` (the op's `id`, if any) as the WebSocket reply
/// `{"op":"history","channel":..,"id":..,"epoch":..,"offset":T,"messages":[..]}`,
/// without it as `GET /history`'s body. Each message is
/// `{"offset":N,"data":..}`; a binary publish's is `{"offset":N,"binary":"<base64>"}`.
pub fn history(
    channel: &str,
    request: Option<Option<&str>>,
    pos: Position<'_>,
    messages: &[(u64, Bytes)],
) -> Vec<u8> {
    use base64::Engine;
    let size: usize = messages.iter().map(|m| m.1.len() + 24).sum();
    let mut out = Vec::with_capacity(96 + channel.len() + size);
    out.push(b'{');
    if let Some(id) = request {
        out.extend_from_slice(br#""op":"history","#);
        out.extend_from_slice(br#""channel":""#);
        out.extend_from_slice(channel.as_bytes());
        out.push(b'"');
        push_id(&mut out, id);
    } else {
        out.extend_from_slice(br#""channel":""#);
        out.extend_from_slice(channel.as_bytes());
        out.push(b'"');
    }
    push_position(&mut out, pos);
    out.extend_from_slice(br#","messages":["#);
    let mut first = true;
    for (offset, frame) in messages {
        let Some(data) = stored_data(frame) else {
            continue;
        };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(br#"{"offset":"#);
        out.extend_from_slice(itoa::Buffer::new().format(*offset).as_bytes());
        match data {
            StoredData::Json(d) => {
                out.extend_from_slice(br#","data":"#);
                out.extend_from_slice(d);
            }
            StoredData::Binary(b) => {
                out.extend_from_slice(br#","binary":""#);
                out.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(b)
                        .as_bytes(),
                );
                out.push(b'"');
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

fn push_id(out: &mut Vec<u8>, id: Option<&str>) {
    if let Some(id) = id {
        out.extend_from_slice(br#","id":"#);
        out.extend_from_slice(id.as_bytes());
    }
}

/// A reply frame, written straight into the frame's one buffer (its size
/// is known before it is written: one allocation per reply).
fn reply(op: &str, channel: Option<&str>, id: Option<&str>) -> Bytes {
    const OP: &[u8] = br#"{"op":""#;
    const CHANNEL: &[u8] = br#","channel":""#;
    const ID: &[u8] = br#","id":"#;
    let len = OP.len()
        + op.len()
        + 1
        + channel.map_or(0, |c| CHANNEL.len() + c.len() + 1)
        + id.map_or(0, |i| ID.len() + i.len())
        + 1;
    let mut out = frame::start(OpCode::Data(Data::Text), len);
    out.put_slice(OP);
    out.put_slice(op.as_bytes());
    out.put_u8(b'"');
    if let Some(c) = channel {
        out.put_slice(CHANNEL);
        out.put_slice(c.as_bytes());
        out.put_u8(b'"');
    }
    if let Some(i) = id {
        out.put_slice(ID);
        out.put_slice(i.as_bytes());
    }
    out.put_u8(b'}');
    debug_assert_eq!(out.capacity(), out.len(), "sized exactly");
    out.freeze()
}

/// `{"op":"subscribed","channel":..,"id":..}`
pub fn subscribed(channel: &str, id: Option<&str>) -> Bytes {
    reply("subscribed", Some(channel), id)
}

/// `{"op":"unsubscribed","channel":..,"id":..}` (also the notice after `auth`, without id)
pub fn unsubscribed(channel: &str, id: Option<&str>) -> Bytes {
    reply("unsubscribed", Some(channel), id)
}

/// `{"op":"ack","id":..}`
pub fn ack(id: &str) -> Bytes {
    reply("ack", None, Some(id))
}

/// `{"op":"authed","id":..}`
pub fn authed(id: Option<&str>) -> Bytes {
    reply("authed", None, id)
}

/// `{"op":"pong","id":..}`
pub fn pong(id: Option<&str>) -> Bytes {
    reply("pong", None, id)
}

/// `{"op":"error","id":..,"code":..,"message":..}`
pub fn error(id: Option<&str>, code: ErrorCode, message: &str) -> Bytes {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(br#"{"op":"error""#);
    push_id(&mut out, id);
    out.extend_from_slice(br#","code":""#);
    out.extend_from_slice(code.as_str().as_bytes());
    out.extend_from_slice(br#"","message":"#);
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, message);
    out.push(b'}');
    frame::text(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::io::Cursor;
    use tungstenite::protocol::frame::FrameHeader;

    fn payload(frame: &[u8]) -> Value {
        let mut c = Cursor::new(frame);
        FrameHeader::parse(&mut c).unwrap().unwrap();
        serde_json::from_slice(&frame[c.position() as usize..]).unwrap()
    }

    #[test]
    fn parses_the_1_1_fields() {
        let r = parse_request(
            br#"{"op":"subscribe","channel":"n","id":1,"since":{"epoch":"ab","offset":17}}"#,
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Subscribe {
                channel: "n".into(),
                since: Some(Since {
                    epoch: "ab".into(),
                    offset: 17
                }),
            }
        );
        let r = parse_request(br#"{"op":"subscribe","channel":"n","since":null}"#).unwrap();
        assert!(matches!(r.op, Op::Subscribe { since: None, .. }));
        for bad in [
            r#"{"op":"subscribe","channel":"n","id":2,"since":1}"#,
            r#"{"op":"subscribe","channel":"n","id":2,"since":{"epoch":"e"}}"#,
            r#"{"op":"subscribe","channel":"n","id":2,"since":{"epoch":"e","offset":1.5}}"#,
            r#"{"op":"subscribe","channel":"n","id":2,"since":{"epoch":"e","offset":1,"x":1}}"#,
            r#"{"op":"history","channel":"n","id":2,"limit":0}"#,
            r#"{"op":"history","channel":"n","id":2,"limit":"5"}"#,
            r#"{"op":"publish","channel":"n","id":2,"data":1,"idempotency_key":""}"#,
        ] {
            let e = parse_request(bad.as_bytes()).unwrap_err();
            assert_eq!(e.id, Some("2"), "{bad}");
        }
        let r = parse_request(br#"{"op":"history","channel":"n","limit":5}"#).unwrap();
        assert_eq!(
            r.op,
            Op::History {
                channel: "n".into(),
                since: None,
                limit: Some(5)
            }
        );
        let r = parse_request(br#"{"op":"publish","channel":"n","data":1,"idempotency_key":"k"}"#)
            .unwrap();
        assert!(matches!(r.op, Op::Publish { idempotency_key: Some(k), .. } if k == "k"));
        let p = parse_http_publish(br#"{"channel":"n","data":1,"idempotency_key":"k"}"#, false)
            .unwrap();
        assert_eq!(p.idempotency_key.as_deref(), Some("k"));
    }

    #[test]
    fn frames_with_offsets_and_what_history_reads_back() {
        let f = message_frame_at("news", 42, r#"{"a":[1,2]}"#);
        assert_eq!(
            payload(&f),
            json!({"op":"message","channel":"news","offset":42,"data":{"a":[1,2]}})
        );
        assert_eq!(stored_data(&f), Some(StoredData::Json(br#"{"a":[1,2]}"#)));
        // A payload large enough for the 16-bit length form, holding the
        // marker text itself: the first occurrence is the frame's own.
        let big = format!(r#""{}""#, r#","data":"#.repeat(40));
        let f = message_frame_at("n", 1, &big);
        assert_eq!(stored_data(&f), Some(StoredData::Json(big.as_bytes())));
        let moved = reoffset("news", &message_frame_at("news", 42, r#"{"a":[1,2]}"#), 7).unwrap();
        assert_eq!(
            payload(&moved),
            json!({"op":"message","channel":"news","offset":7,"data":{"a":[1,2]}})
        );
        let plain = message_frame("n", "null");
        assert_eq!(stored_data(plain.frame()), Some(StoredData::Json(b"null")));
        let bin = binary_frame("n", &[0, 1, 2]);
        assert_eq!(
            stored_data(bin.frame()),
            Some(StoredData::Binary(&[0, 1, 2]))
        );
        assert_eq!(stored_data(b""), None);
        assert_eq!(stored_data(&[0x81]), None);

        let pos = Position {
            epoch: "ep",
            offset: 9,
        };
        assert_eq!(
            payload(&subscribed_at("n", Some("1"), pos, None)),
            json!({"op":"subscribed","channel":"n","id":1,"epoch":"ep","offset":9})
        );
        assert_eq!(
            payload(&subscribed_at("n", None, pos, Some(false))),
            json!({"op":"subscribed","channel":"n","epoch":"ep","offset":9,"recovered":false})
        );
        assert_eq!(
            payload(&ack_at("\"x\"", 3)),
            json!({"op":"ack","id":"x","offset":3})
        );
        assert_eq!(
            payload(&subscribed_unrecovered("n", Some("2"))),
            json!({"op":"subscribed","channel":"n","id":2,"recovered":false})
        );
        let msgs = vec![
            (8, message_frame_at("n", 8, "1")),
            (9, binary_frame("n", b"hi").frame().clone()),
        ];
        let h: Value = serde_json::from_slice(&history("n", Some(Some("4")), pos, &msgs)).unwrap();
        assert_eq!(
            h,
            json!({"op":"history","channel":"n","id":4,"epoch":"ep","offset":9,
                   "messages":[{"offset":8,"data":1},{"offset":9,"binary":"aGk="}]})
        );
        let h: Value = serde_json::from_slice(&history("n", None, pos, &[])).unwrap();
        assert_eq!(
            h,
            json!({"channel":"n","epoch":"ep","offset":9,"messages":[]})
        );
    }

    #[test]
    fn parses_wsify_commands() {
        let r = parse_request(br#"{"command":"join","args":{"channel":"hello"}}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Subscribe {
                channel: "hello".into(),
                since: None,
            }
        );
        let r = parse_request(br#"{"command":"leave","args":{"channel":"hello"}}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Unsubscribe {
                channel: "hello".into()
            }
        );
        let r = parse_request(
            br#"{"command":"broadcast","args":{"channel":"hello","content":"hi there"},"id":3}"#,
        )
        .unwrap();
        assert_eq!(r.id, Some("3"));
        assert_eq!(
            r.op,
            Op::Publish {
                channel: "hello".into(),
                data: r#""hi there""#,
                idempotency_key: None,
            }
        );
        let e = parse_request(br#"{"command":"broadcast","args":{"channel":"a"}}"#).unwrap_err();
        assert_eq!(e.message, "missing field 'args.content'");
        let e = parse_request(br#"{"command":"join"}"#).unwrap_err();
        assert_eq!(e.message, "missing field 'args'");
        let e = parse_request(br#"{"command":"join","args":[1]}"#).unwrap_err();
        assert_eq!(e.message, "field 'args' must be an object");
        let e = parse_request(br#"{"command":"shout","args":{"channel":"a"}}"#).unwrap_err();
        assert_eq!(e.message, "unknown command 'shout'");
        let e = parse_request(br#"{"command":"shout"}"#).unwrap_err();
        assert_eq!(e.message, "unknown command 'shout'");
        let e = parse_request(br#"{"command":"join","args":{"channel":"a b"}}"#).unwrap_err();
        assert!(e.message.starts_with("invalid channel name"));
        // `op` wins when both are present.
        let r = parse_request(br#"{"op":"ping","command":"join","args":{}}"#).unwrap();
        assert_eq!(r.op, Op::Ping);
    }

    #[test]
    fn parses_each_op() {
        let r = parse_request(br#"{"op":"subscribe","channel":"news","id":1}"#).unwrap();
        assert_eq!(r.id, Some("1"));
        assert_eq!(
            r.op,
            Op::Subscribe {
                channel: "news".into(),
                since: None,
            }
        );
        let r = parse_request(br#"{"op":"publish","channel":"a","data":{"x": [1, 2]}}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Publish {
                channel: "a".into(),
                data: r#"{"x": [1, 2]}"#,
                idempotency_key: None,
            }
        );
        let r = parse_request(br#"{"op":"publish","channel":"a","data":null,"id":"q"}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Publish {
                channel: "a".into(),
                data: "null",
                idempotency_key: None,
            }
        );
        assert_eq!(r.id, Some(r#""q""#));
        assert_eq!(parse_request(br#"{"op":"ping"}"#).unwrap().op, Op::Ping);
        let r = parse_request(br#"{"op":"auth","token":"t"}"#).unwrap();
        assert_eq!(r.op, Op::Auth { token: "t".into() });
        let r = parse_request(br#"{"op":"unsubscribe","channel":"c:1"}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Unsubscribe {
                channel: "c:1".into()
            }
        );
    }

    #[test]
    fn escaped_channel_names_are_decoded_then_checked() {
        let r = parse_request(br#"{"op":"subscribe","channel":"\u0061b"}"#).unwrap();
        assert_eq!(
            r.op,
            Op::Subscribe {
                channel: "ab".into(),
                since: None,
            }
        );
        assert!(parse_request(br#"{"op":"subscribe","channel":"a\u0020b"}"#).is_err());
    }

    #[test]
    fn bad_requests_keep_the_id_when_readable() {
        let e = parse_request(br#"{"op":"dance","id":7}"#).unwrap_err();
        assert_eq!(e.id, Some("7"));
        assert!(e.message.contains("unknown op"));
        let e = parse_request(br#"{"op":"subscribe","id":7}"#).unwrap_err();
        assert!(e.message.contains("channel"));
        let e = parse_request(br#"{"op":"subscribe","channel":5,"id":"x"}"#).unwrap_err();
        assert_eq!(e.id, Some(r#""x""#));
        let e = parse_request(br#"{"op":"publish","channel":"a"}"#).unwrap_err();
        assert!(e.message.contains("data"));
        assert!(parse_request(b"not json")
            .unwrap_err()
            .message
            .contains("JSON"));
        assert!(parse_request(b"[1,2]").is_err());
        assert!(parse_request(br#"["ping",7]"#)
            .unwrap_err()
            .message
            .contains("object"));
        assert!(parse_request(br#" ["subscribe","s","news"]"#).is_err());
        assert!(parse_request(br#"{"channel":"a"}"#)
            .unwrap_err()
            .message
            .contains("op"));
        assert!(parse_request(br#"{"op":"ping","id":[1]}"#).is_err());
        assert!(parse_request(br#"{"op":"ping","id":true}"#).is_err());
    }

    #[test]
    fn channel_rules() {
        assert!(validate_channel("a-Z_0=@,.;:").is_ok());
        assert!(validate_channel("").is_err());
        assert!(validate_channel("chat:*").is_err());
        assert!(validate_channel("has space").is_err());
        assert!(validate_channel(&"x".repeat(255)).is_ok());
        assert!(validate_channel(&"x".repeat(256)).is_err());
        assert!(validate_channel("é").is_err());
    }

    #[test]
    fn message_frame_splices_data_verbatim() {
        let data = r#"{"b": 1,   "a":"é"}"#;
        let p = message_frame("news", data);
        assert_eq!(p.channel(), "news");
        let v = payload(p.frame());
        assert_eq!(
            v,
            json!({"op":"message","channel":"news","data":{"b":1,"a":"é"}})
        );
        let text = String::from_utf8_lossy(p.frame());
        assert!(text.contains(data), "data must be byte for byte");
    }

    #[test]
    fn other_encodings_become_native_frames() {
        let raw = |payload: &[u8], kind| {
            let frame = Bytes::from([b"t:1|", payload].concat());
            Message::new(frame.clone(), Encoding(2), 0..3, 4..frame.len(), kind, 0)
        };
        let m = raw(br#"{"a":1}"#, PayloadKind::Json);
        let f = encode(&m).unwrap();
        assert_eq!(
            payload(&f),
            json!({"op":"message","channel":"t:1","data":{"a":1}})
        );
        let f = encode(&raw(b"not json", PayloadKind::Text)).unwrap();
        assert_eq!(
            payload(&f),
            json!({"op":"message","channel":"t:1","data":"not json"})
        );
        let f = encode(&raw(b"\x00\xff", PayloadKind::Binary)).unwrap();
        assert_eq!(&f[2..], b"\x03t:1\x00\xff");
    }

    #[test]
    fn binary_round_trip() {
        let p = binary_frame("ch", b"\x00\x01");
        assert_eq!(p.channel(), "ch");
        p.with_key(|k| assert_eq!(k, "ch"));
        let hl = frame::header_len(5);
        let (c, body) = parse_binary(&p.frame()[hl..]).unwrap();
        assert_eq!((c, body), ("ch", &b"\x00\x01"[..]));
        assert!(parse_binary(b"").is_err());
        assert!(parse_binary(b"\x05ab").is_err());
        assert!(parse_binary(b"\x00abc").is_err());
        assert!(parse_binary(b"\x02a b").is_err());
    }

    #[test]
    fn replies_have_id_only_when_given() {
        assert_eq!(
            payload(&subscribed("n", Some("1"))),
            json!({"op":"subscribed","channel":"n","id":1})
        );
        assert_eq!(
            payload(&unsubscribed("n", None)),
            json!({"op":"unsubscribed","channel":"n"})
        );
        assert_eq!(payload(&ack(r#""a""#)), json!({"op":"ack","id":"a"}));
        assert_eq!(payload(&pong(None)), json!({"op":"pong"}));
        assert_eq!(payload(&authed(Some("2"))), json!({"op":"authed","id":2}));
        assert_eq!(
            payload(&error(Some("3"), ErrorCode::Forbidden, "no \"write\"")),
            json!({"op":"error","id":3,"code":"forbidden","message":"no \"write\""})
        );
    }

    #[test]
    fn http_publish_bodies() {
        let p = parse_http_publish(br#"{"channel":"news","data":[1, 2]}"#, false).unwrap();
        let (c, d) = (p.channel, p.data);
        assert_eq!((&*c, d), ("news", "[1, 2]"));
        let p = parse_http_publish(br#"{"channel":"news","content":"hi"}"#, true).unwrap();
        let (c, d) = (p.channel, p.data);
        assert_eq!((&*c, d), ("news", r#""hi""#));
        assert!(parse_http_publish(br#"{"channel":"news","content":"hi"}"#, false).is_err());
        assert!(parse_http_publish(br#"{"channel":"bad name","data":1}"#, false).is_err());
        assert!(parse_http_publish(b"{", false)
            .unwrap_err()
            .contains("JSON"));
        assert!(parse_http_publish(br#"["news",1]"#, false)
            .unwrap_err()
            .contains("object"));
    }
}
