//! Protocol adapters behind one trait: herald's JSON protocol, NATS over
//! WebSocket and the Pusher channels protocol (client events on private
//! channels); timestamps carried at the start of every payload.

use std::sync::OnceLock;
use std::time::Instant;

use crate::ws::{self, Mask};

/// Width of the ASCII send timestamp at the start of every payload.
pub const TS_LEN: usize = 20;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since a process-wide base instant.
pub fn now_ns() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Writes `ns` as 20 zero-padded ASCII digits.
pub fn write_ts(out: &mut [u8], mut ns: u64) {
    for b in out[..TS_LEN].iter_mut().rev() {
        *b = b'0' + (ns % 10) as u8;
        ns /= 10;
    }
}

/// Reads 20 ASCII digits at the start of `b`.
pub fn parse_ts(b: &[u8]) -> Option<u64> {
    let digits = b.get(..TS_LEN)?;
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((d - b'0') as u64)?;
    }
    Some(v)
}

/// What a server sent, as far as the harness cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A delivered publication; `ts_ns` is its send time, if readable.
    Message { ts_ns: Option<u64> },
    /// A confirmation: herald `subscribed`/`ack`/`pong`, NATS `PONG`,
    /// Pusher `subscription_succeeded`/`pusher:pong`.
    Confirm,
    /// The server's greeting: NATS `INFO`, Pusher `connection_established`
    /// (whose `socket_id` the parser keeps, see [`Parser::socket_id`]).
    Info,
    /// NATS `PING`, `pusher:ping`: must be answered with [`Adapter::pong`].
    ServerPing,
    /// An error reply (herald `error`, NATS `-ERR`, `pusher:error`,
    /// `pusher:subscription_error`), raw.
    Error(&'a [u8]),
    /// Anything else (`+OK`, `unsubscribed`, ...).
    Other,
}

/// Turns the data frames of one connection into [`Event`]s.
pub trait Parser: Send {
    /// Feeds the payload of one WebSocket data frame (text, binary or
    /// continuation).
    fn feed(&mut self, opcode: u8, fin: bool, data: &[u8], f: &mut dyn FnMut(Event<'_>));
    /// The connection's id from the server's greeting, once it arrived
    /// (Pusher `socket_id`, signed into private-channel subscriptions).
    fn socket_id(&self) -> Option<&str> {
        None
    }
}

/// One pub/sub protocol spoken over WebSocket.
pub trait Adapter: Send + Sync {
    fn name(&self) -> &'static str;
    /// Does the server speak first (NATS `INFO`, Pusher
    /// `connection_established`)?
    fn expects_greeting(&self) -> bool;
    /// Sent once after the greeting (NATS `CONNECT`).
    fn hello(&self, out: &mut Vec<u8>, m: &mut Mask);
    /// Subscribes to `channel`; the server answers with one `Confirm`.
    /// `socket_id` is the connection's id from the greeting, if any
    /// ([`Parser::socket_id`]; Pusher signs it into the subscription).
    fn subscribe(
        &self,
        out: &mut Vec<u8>,
        m: &mut Mask,
        channel: &str,
        sid: u64,
        socket_id: Option<&str>,
    );
    /// Must a connection be subscribed to a channel to publish on it
    /// (Pusher client events)? Then publishers subscribe first.
    fn publisher_subscribes(&self) -> bool {
        false
    }
    /// Leaves `channel` without waiting for an answer (only used where
    /// [`Adapter::publisher_subscribes`]).
    fn unsubscribe(&self, _out: &mut Vec<u8>, _m: &mut Mask, _channel: &str) {}
    /// Publishes a `size`-byte payload starting with the timestamp `ts_ns`.
    /// With `Some(seq)`, the publish is (eventually) confirmed, see
    /// [`Adapter::publishes_per_confirm`].
    fn publish(
        &self,
        out: &mut Vec<u8>,
        m: &mut Mask,
        channel: &str,
        ts_ns: u64,
        size: usize,
        seq: Option<u64>,
    );
    /// How many acked publishes one `Confirm` covers (herald 1: every
    /// publish has an id; NATS K: a `PING` after every K publishes).
    fn publishes_per_confirm(&self) -> u64;
    /// Asks for a `Confirm` covering everything published so far (NATS
    /// `PING`); nothing for herald, whose publishes carry ids.
    fn sync(&self, out: &mut Vec<u8>, m: &mut Mask);
    /// Answers a [`Event::ServerPing`].
    fn pong(&self, out: &mut Vec<u8>, m: &mut Mask);
    /// A parser for one connection; `channel` is the one channel it
    /// subscribes to, if any (lets herald find timestamps at a fixed offset).
    fn parser(&self, channel: Option<&str>) -> Box<dyn Parser>;
    /// The smallest payload size this adapter can carry a timestamp in.
    fn min_size(&self) -> usize;
}

/// Joins the fragments of a text message; a whole message passes through
/// without a copy.
#[derive(Default)]
struct Fragments {
    partial: Vec<u8>,
    in_partial: bool,
}

impl Fragments {
    /// Feeds one data frame's payload: `whole` gets each complete text
    /// message, or `None` for a binary one.
    fn feed(&mut self, opcode: u8, fin: bool, data: &[u8], whole: &mut dyn FnMut(Option<&[u8]>)) {
        if opcode == ws::OP_BINARY && !self.in_partial {
            return whole(None);
        }
        if !fin || self.in_partial {
            if opcode != ws::OP_CONT {
                self.partial.clear();
            }
            self.partial.extend_from_slice(data);
            self.in_partial = !fin;
            if fin {
                whole(Some(&self.partial));
                self.partial.clear();
            }
            return;
        }
        whole(Some(data));
    }
}

/// Padding byte after the timestamp.
const PAD: u8 = b'x';

// ---------------------------------------------------------------- herald

/// herald's JSON protocol (protocol.md). The `data` of a publish is a JSON
/// string `"<20 digits><x padding>"` of `size` bytes, quotes included.
pub struct Herald;

const MSG_HEAD: &[u8] = br#"{"op":"message","channel":""#;
const MSG_MID: &[u8] = br#"","data":"#;
const DATA_KEY: &[u8] = br#""data":""#;

impl Adapter for Herald {
    fn name(&self) -> &'static str {
        "herald"
    }

    fn expects_greeting(&self) -> bool {
        false
    }

    fn hello(&self, _out: &mut Vec<u8>, _m: &mut Mask) {}

    fn subscribe(
        &self,
        out: &mut Vec<u8>,
        m: &mut Mask,
        channel: &str,
        sid: u64,
        _socket_id: Option<&str>,
    ) {
        let msg = format!(r#"{{"op":"subscribe","channel":"{channel}","id":{sid}}}"#);
        ws::write_frame(out, ws::OP_TEXT, msg.as_bytes(), m.key());
    }

    fn publish(
        &self,
        out: &mut Vec<u8>,
        m: &mut Mask,
        channel: &str,
        ts_ns: u64,
        size: usize,
        seq: Option<u64>,
    ) {
        let mut msg = Vec::with_capacity(size + channel.len() + 64);
        msg.extend_from_slice(br#"{"op":"publish","channel":""#);
        msg.extend_from_slice(channel.as_bytes());
        msg.extend_from_slice(b"\",");
        if let Some(seq) = seq {
            msg.extend_from_slice(br#""id":"#);
            msg.extend_from_slice(seq.to_string().as_bytes());
            msg.push(b',');
        }
        msg.extend_from_slice(br#""data":""#);
        let at = msg.len();
        let content = size.max(self.min_size()) - 2;
        msg.resize(at + content, PAD);
        write_ts(&mut msg[at..], ts_ns);
        msg.extend_from_slice(b"\"}");
        ws::write_frame(out, ws::OP_TEXT, &msg, m.key());
    }

    fn publishes_per_confirm(&self) -> u64 {
        1
    }

    fn sync(&self, _out: &mut Vec<u8>, _m: &mut Mask) {}

    fn pong(&self, _out: &mut Vec<u8>, _m: &mut Mask) {}

    fn parser(&self, channel: Option<&str>) -> Box<dyn Parser> {
        Box::new(HeraldParser::for_channel(channel))
    }

    fn min_size(&self) -> usize {
        TS_LEN + 2
    }
}

/// Classifies herald's text frames without parsing JSON.
pub struct HeraldParser {
    /// Offset of the timestamp in a message on the subscribed channel.
    data_at: Option<usize>,
    frags: Fragments,
}

impl HeraldParser {
    pub fn for_channel(channel: Option<&str>) -> HeraldParser {
        HeraldParser {
            data_at: channel.map(|c| MSG_HEAD.len() + c.len() + MSG_MID.len() + 1),
            frags: Fragments::default(),
        }
    }

    /// The send timestamp of a `message` frame.
    pub fn timestamp(&self, msg: &[u8]) -> Option<u64> {
        if let Some(at) = self.data_at {
            if msg.len() >= at + TS_LEN && &msg[at - MSG_MID.len() - 1..at] == br#"","data":""# {
                return parse_ts(&msg[at..]);
            }
        }
        // Another channel or layout: look for the data key.
        let at = ws::find(msg, DATA_KEY)? + DATA_KEY.len();
        parse_ts(&msg[at..])
    }

    fn classify(&self, msg: &[u8], f: &mut dyn FnMut(Event<'_>)) {
        let Some(rest) = msg.strip_prefix(br#"{"op":""#) else {
            return f(Event::Other);
        };
        if rest.starts_with(br#"message""#) {
            f(Event::Message {
                ts_ns: self.timestamp(msg),
            })
        } else if rest.starts_with(br#"ack""#)
            || rest.starts_with(br#"subscribed""#)
            || rest.starts_with(br#"pong""#)
        {
            f(Event::Confirm)
        } else if rest.starts_with(br#"error""#) {
            f(Event::Error(msg))
        } else {
            f(Event::Other)
        }
    }
}

impl Parser for HeraldParser {
    fn feed(&mut self, opcode: u8, fin: bool, data: &[u8], f: &mut dyn FnMut(Event<'_>)) {
        let mut frags = std::mem::take(&mut self.frags);
        frags.feed(opcode, fin, data, &mut |msg| match msg {
            Some(m) => self.classify(m, f),
            None => f(Event::Other),
        });
        self.frags = frags;
    }
}

// ---------------------------------------------------------------- NATS

/// NATS text protocol inside binary WebSocket frames. The payload is
/// `size` bytes: the timestamp then `x` padding.
pub struct Nats {
    /// A `PING` after this many acked publishes.
    pub ping_every: u64,
}

impl Adapter for Nats {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn expects_greeting(&self) -> bool {
        true
    }

    fn hello(&self, out: &mut Vec<u8>, m: &mut Mask) {
        ws::write_frame(
            out,
            ws::OP_BINARY,
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,\"protocol\":1}\r\n",
            m.key(),
        );
    }

    fn subscribe(
        &self,
        out: &mut Vec<u8>,
        m: &mut Mask,
        channel: &str,
        sid: u64,
        _socket_id: Option<&str>,
    ) {
        let msg = format!("SUB {channel} {sid}\r\nPING\r\n");
        ws::write_frame(out, ws::OP_BINARY, msg.as_bytes(), m.key());
    }

    fn publish(
        &self,
        out: &mut Vec<u8>,
        m: &mut Mask,
        channel: &str,
        ts_ns: u64,
        size: usize,
        _seq: Option<u64>,
    ) {
        let size = size.max(self.min_size());
        let mut msg = Vec::with_capacity(size + channel.len() + 24);
        msg.extend_from_slice(format!("PUB {channel} {size}\r\n").as_bytes());
        let at = msg.len();
        msg.resize(at + size, PAD);
        write_ts(&mut msg[at..], ts_ns);
        msg.extend_from_slice(b"\r\n");
        ws::write_frame(out, ws::OP_BINARY, &msg, m.key());
    }

    fn publishes_per_confirm(&self) -> u64 {
        self.ping_every
    }

    fn sync(&self, out: &mut Vec<u8>, m: &mut Mask) {
        ws::write_frame(out, ws::OP_BINARY, b"PING\r\n", m.key());
    }

    fn pong(&self, out: &mut Vec<u8>, m: &mut Mask) {
        ws::write_frame(out, ws::OP_BINARY, b"PONG\r\n", m.key());
    }

    fn parser(&self, _channel: Option<&str>) -> Box<dyn Parser> {
        Box::new(NatsParser::default())
    }

    fn min_size(&self) -> usize {
        TS_LEN
    }
}

/// Parses the NATS server protocol as a byte stream, whatever the framing.
#[derive(Default)]
pub struct NatsParser {
    pending: Vec<u8>,
}

/// Result of parsing one command.
enum Step {
    /// Need more bytes.
    Incomplete,
    /// Consumed this many bytes.
    Done(usize),
}

fn parse_one(b: &[u8], f: &mut dyn FnMut(Event<'_>)) -> Step {
    let Some(nl) = b.iter().position(|&c| c == b'\n') else {
        return Step::Incomplete;
    };
    let line = &b[..nl];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let word_end = line.iter().position(|&c| c == b' ' || c == b'\t');
    let word = &line[..word_end.unwrap_or(line.len())];
    if word.eq_ignore_ascii_case(b"MSG") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let len = line
            .rsplit(|&c| c == b' ' || c == b'\t')
            .find(|s| !s.is_empty())
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<usize>().ok());
        let Some(len) = len else {
            f(Event::Error(line));
            return Step::Done(nl + 1);
        };
        let need = nl + 1 + len + 2;
        if b.len() < need {
            return Step::Incomplete;
        }
        let payload = &b[nl + 1..nl + 1 + len];
        f(Event::Message {
            ts_ns: parse_ts(payload),
        });
        return Step::Done(need);
    }
    let ev = if word.eq_ignore_ascii_case(b"PING") {
        Event::ServerPing
    } else if word.eq_ignore_ascii_case(b"PONG") {
        Event::Confirm
    } else if word.eq_ignore_ascii_case(b"INFO") {
        Event::Info
    } else if word.eq_ignore_ascii_case(b"-ERR") {
        Event::Error(line)
    } else if word.eq_ignore_ascii_case(b"+OK") || line.is_empty() {
        Event::Other
    } else {
        Event::Error(line)
    };
    f(ev);
    Step::Done(nl + 1)
}

fn parse_all(b: &[u8], f: &mut dyn FnMut(Event<'_>)) -> usize {
    let mut at = 0;
    while at < b.len() {
        match parse_one(&b[at..], f) {
            Step::Incomplete => break,
            Step::Done(n) => at += n,
        }
    }
    at
}

impl Parser for NatsParser {
    fn feed(&mut self, _opcode: u8, _fin: bool, data: &[u8], f: &mut dyn FnMut(Event<'_>)) {
        if self.pending.is_empty() {
            let used = parse_all(data, f);
            self.pending.extend_from_slice(&data[used..]);
        } else {
            self.pending.extend_from_slice(data);
            let used = parse_all(&self.pending, f);
            self.pending.drain(..used);
        }
    }
}

// ---------------------------------------------------------------- Pusher

/// The Pusher channels protocol (version 7), as pusher-js speaks it. The
/// harness's channel `<name>` is the private channel `private-<name>`,
/// subscribed with an `auth` signed by the app secret; publishing is a
/// client event `client-m` (which the server forwards to the channel's
/// other subscribers, never back to the sender, and only from a connection
/// subscribed to the channel). Client events have no acknowledgement: a
/// `pusher:ping` after every `ping_every` of them, answered in order by
/// `pusher:pong`, confirms them (as NATS `PING`/`PONG`). The `data` of an
/// event is a JSON string `"<20 digits><x padding>"` of `size` bytes,
/// quotes included, as with herald.
pub struct Pusher {
    /// The app key (`/app/{key}` and the `key:` of every `auth`).
    pub key: String,
    /// The app secret the `auth` signatures are made with.
    pub secret: String,
    /// A `pusher:ping` after this many acked publishes.
    pub ping_every: u64,
}

/// The prefix the harness's channel names get.
pub const PUSHER_PREFIX: &str = "private-";
/// The client event every publish sends.
const PUSHER_EVENT: &str = "client-m";
/// A client event as the server forwards it, up to the channel name.
const PUSHER_MSG_HEAD: &[u8] = br#"{"event":"client-m","channel":"private-"#;
const PUSHER_MSG_MID: &[u8] = br#"","data":""#;
const PUSHER_EVENT_KEY: &[u8] = br#"{"event":""#;

/// Lower-case hex of HMAC-SHA256(`secret`, `msg`).
pub fn hmac_sha256_hex(secret: &[u8], msg: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(secret)
        .expect("HMAC takes keys of any length");
    mac.update(msg);
    hex::encode(mac.finalize().into_bytes())
}

impl Pusher {
    /// `key:hex(HMAC-SHA256(secret, "socket_id:channel"))`: the `auth` of a
    /// private channel subscription (`channel` is the full name).
    pub fn auth(&self, socket_id: &str, channel: &str) -> String {
        let sig = hmac_sha256_hex(
            self.secret.as_bytes(),
            format!("{socket_id}:{channel}").as_bytes(),
        );
        format!("{}:{sig}", self.key)
    }
}

impl Adapter for Pusher {
    fn name(&self) -> &'static str {
        "pusher"
    }

    fn expects_greeting(&self) -> bool {
        true
    }

    fn hello(&self, _out: &mut Vec<u8>, _m: &mut Mask) {}

    fn subscribe(
        &self,
        out: &mut Vec<u8>,
        m: &mut Mask,
        channel: &str,
        _sid: u64,
        socket_id: Option<&str>,
    ) {
        // Without a socket id the signature is wrong and the server says
        // so (`pusher:subscription_error`), which the caller reports.
        let name = format!("{PUSHER_PREFIX}{channel}");
        let auth = self.auth(socket_id.unwrap_or(""), &name);
        let msg = format!(
            r#"{{"event":"pusher:subscribe","data":{{"channel":"{name}","auth":"{auth}"}}}}"#
        );
        ws::write_frame(out, ws::OP_TEXT, msg.as_bytes(), m.key());
    }

    fn publisher_subscribes(&self) -> bool {
        true
    }

    fn unsubscribe(&self, out: &mut Vec<u8>, m: &mut Mask, channel: &str) {
        let msg = format!(
            r#"{{"event":"pusher:unsubscribe","data":{{"channel":"{PUSHER_PREFIX}{channel}"}}}}"#
        );
        ws::write_frame(out, ws::OP_TEXT, msg.as_bytes(), m.key());
    }

    fn publish(
        &self,
        out: &mut Vec<u8>,
        m: &mut Mask,
        channel: &str,
        ts_ns: u64,
        size: usize,
        _seq: Option<u64>,
    ) {
        let mut msg = Vec::with_capacity(size + channel.len() + 64);
        msg.extend_from_slice(br#"{"event":""#);
        msg.extend_from_slice(PUSHER_EVENT.as_bytes());
        msg.extend_from_slice(br#"","channel":""#);
        msg.extend_from_slice(PUSHER_PREFIX.as_bytes());
        msg.extend_from_slice(channel.as_bytes());
        msg.extend_from_slice(PUSHER_MSG_MID);
        let at = msg.len();
        let content = size.max(self.min_size()) - 2;
        msg.resize(at + content, PAD);
        write_ts(&mut msg[at..], ts_ns);
        msg.extend_from_slice(b"\"}");
        ws::write_frame(out, ws::OP_TEXT, &msg, m.key());
    }

    fn publishes_per_confirm(&self) -> u64 {
        self.ping_every
    }

    fn sync(&self, out: &mut Vec<u8>, m: &mut Mask) {
        ws::write_frame(
            out,
            ws::OP_TEXT,
            br#"{"event":"pusher:ping","data":{}}"#,
            m.key(),
        );
    }

    fn pong(&self, out: &mut Vec<u8>, m: &mut Mask) {
        ws::write_frame(
            out,
            ws::OP_TEXT,
            br#"{"event":"pusher:pong","data":{}}"#,
            m.key(),
        );
    }

    fn parser(&self, channel: Option<&str>) -> Box<dyn Parser> {
        Box::new(PusherParser::for_channel(channel))
    }

    fn min_size(&self) -> usize {
        TS_LEN + 2
    }
}

/// Classifies Pusher server messages: by the prefix `{"event":"<name>"`
/// without parsing JSON on the hot path (herald and Pusher itself put
/// `event` first); other layouts go through `serde_json`.
pub struct PusherParser {
    /// Offset of the timestamp in a `client-m` event on the subscribed
    /// channel.
    data_at: Option<usize>,
    socket_id: Option<String>,
    frags: Fragments,
}

impl PusherParser {
    /// `channel` is the harness's name (without `private-`).
    pub fn for_channel(channel: Option<&str>) -> PusherParser {
        PusherParser {
            data_at: channel.map(|c| PUSHER_MSG_HEAD.len() + c.len() + PUSHER_MSG_MID.len()),
            socket_id: None,
            frags: Fragments::default(),
        }
    }

    /// The send timestamp of an event whose `data` is a string.
    pub fn timestamp(&self, msg: &[u8]) -> Option<u64> {
        if let Some(at) = self.data_at {
            if msg.len() >= at + TS_LEN
                && &msg[at - PUSHER_MSG_MID.len()..at] == PUSHER_MSG_MID
                && msg.starts_with(PUSHER_MSG_HEAD)
            {
                return parse_ts(&msg[at..]);
            }
        }
        let at = ws::find(msg, DATA_KEY)? + DATA_KEY.len();
        parse_ts(&msg[at..])
    }

    fn classify(&mut self, msg: &[u8], f: &mut dyn FnMut(Event<'_>)) {
        let Some(rest) = msg.strip_prefix(PUSHER_EVENT_KEY) else {
            return self.classify_slow(msg, f);
        };
        if !rest.starts_with(b"pusher") {
            // A channel event (client events, or triggered through the API).
            return f(Event::Message {
                ts_ns: self.timestamp(msg),
            });
        }
        let Some(end) = rest.iter().position(|&c| c == b'"') else {
            return f(Event::Other);
        };
        let event = std::str::from_utf8(&rest[..end]).unwrap_or("");
        self.control(event, msg, f)
    }

    /// A `pusher:*` / `pusher_internal:*` message.
    fn control(&mut self, event: &str, msg: &[u8], f: &mut dyn FnMut(Event<'_>)) {
        match event {
            "pusher:pong" | "pusher_internal:subscription_succeeded" => f(Event::Confirm),
            "pusher:ping" => f(Event::ServerPing),
            "pusher:connection_established" => match socket_id_of(msg) {
                Some(id) => {
                    self.socket_id = Some(id);
                    f(Event::Info)
                }
                None => f(Event::Error(msg)),
            },
            "pusher:error" | "pusher:subscription_error" => f(Event::Error(msg)),
            _ => f(Event::Other),
        }
    }

    /// Any other layout (another server's field order): parsed as JSON.
    fn classify_slow(&mut self, msg: &[u8], f: &mut dyn FnMut(Event<'_>)) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(msg) else {
            return f(Event::Other);
        };
        let Some(event) = v.get("event").and_then(|e| e.as_str()) else {
            return f(Event::Other);
        };
        if event.starts_with("pusher") {
            return self.control(event, msg, f);
        }
        let ts_ns = v
            .get("data")
            .and_then(|d| d.as_str())
            .and_then(|d| parse_ts(d.as_bytes()));
        f(Event::Message { ts_ns })
    }
}

/// The `socket_id` of a `pusher:connection_established`, whose `data` is a
/// JSON-encoded string (or, leniently, an object).
fn socket_id_of(msg: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(msg).ok()?;
    let data = v.get("data")?;
    let inner: serde_json::Value = match data {
        serde_json::Value::String(s) => serde_json::from_str(s).ok()?,
        other => other.clone(),
    };
    Some(inner.get("socket_id")?.as_str()?.to_string())
}

impl Parser for PusherParser {
    fn feed(&mut self, opcode: u8, fin: bool, data: &[u8], f: &mut dyn FnMut(Event<'_>)) {
        let mut frags = std::mem::take(&mut self.frags);
        frags.feed(opcode, fin, data, &mut |msg| match msg {
            Some(m) => self.classify(m, f),
            None => f(Event::Other),
        });
        self.frags = frags;
    }

    fn socket_id(&self) -> Option<&str> {
        self.socket_id.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(p: &mut dyn Parser, chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        for c in chunks {
            p.feed(ws::OP_BINARY, true, c, &mut |e| {
                out.push(match e {
                    Event::Message { ts_ns } => format!("msg {ts_ns:?}"),
                    Event::Error(b) => format!("err {}", String::from_utf8_lossy(b)),
                    other => format!("{other:?}"),
                })
            });
        }
        out
    }

    #[test]
    fn timestamps_round_trip() {
        let mut b = [0u8; 24];
        write_ts(&mut b, 1_234_567_890_123);
        assert_eq!(&b[..20], b"00000001234567890123");
        assert_eq!(parse_ts(&b), Some(1_234_567_890_123));
        write_ts(&mut b, u64::MAX);
        assert_eq!(parse_ts(&b), Some(u64::MAX));
        assert_eq!(parse_ts(b"0000000000000000012"), None);
        assert_eq!(parse_ts(b"00000000000000000x12"), None);
    }

    fn unmasked_payload(frame: &[u8]) -> Vec<u8> {
        let h = ws::parse_head(frame).unwrap().unwrap();
        let mut p = frame[h.header_len..h.total()].to_vec();
        ws::apply_mask(&mut p, h.mask.unwrap());
        p
    }

    #[test]
    fn herald_publish_is_valid_json_of_the_right_size() {
        let mut out = Vec::new();
        Herald.publish(&mut out, &mut Mask::new(1), "ch7", 42, 64, Some(9));
        let p = unmasked_payload(&out);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["op"], "publish");
        assert_eq!(v["channel"], "ch7");
        assert_eq!(v["id"], 9);
        let data = v["data"].as_str().unwrap();
        assert_eq!(data.len() + 2, 64);
        assert_eq!(parse_ts(data.as_bytes()), Some(42));
        out.clear();
        Herald.publish(&mut out, &mut Mask::new(1), "c", 1, 30, None);
        let v: serde_json::Value = serde_json::from_slice(&unmasked_payload(&out)).unwrap();
        assert!(v.get("id").is_none());
    }

    #[test]
    fn herald_message_timestamp_at_fixed_offset_and_fallback() {
        let msg = br#"{"op":"message","channel":"ch12","data":"00000000000000000777xxxx"}"#;
        let p = HeraldParser::for_channel(Some("ch12"));
        assert_eq!(p.timestamp(msg), Some(777));
        // Another channel than expected still parses by search.
        let other = br#"{"op":"message","channel":"zz","data":"00000000000000000555xx"}"#;
        assert_eq!(p.timestamp(other), Some(555));
        assert_eq!(HeraldParser::for_channel(None).timestamp(other), Some(555));
        let not_ts = br#"{"op":"message","channel":"ch12","data":{"a":1}}"#;
        assert_eq!(p.timestamp(not_ts), None);
    }

    #[test]
    fn herald_frames_are_classified() {
        let mut p = HeraldParser::for_channel(Some("a"));
        let mut got = Vec::new();
        for m in [
            &br#"{"op":"subscribed","channel":"a","id":1}"#[..],
            br#"{"op":"ack","id":2}"#,
            br#"{"op":"message","channel":"a","data":"00000000000000000009x"}"#,
            br#"{"op":"error","id":3,"code":"forbidden","message":"no"}"#,
            br#"{"op":"unsubscribed","channel":"a"}"#,
        ] {
            p.feed(ws::OP_TEXT, true, m, &mut |e| got.push(format!("{e:?}")));
        }
        assert_eq!(got[0], "Confirm");
        assert_eq!(got[1], "Confirm");
        assert_eq!(got[2], "Message { ts_ns: Some(9) }");
        assert!(got[3].starts_with("Error"));
        assert_eq!(got[4], "Other");
        // A fragmented message is reassembled.
        got.clear();
        let m = br#"{"op":"message","channel":"a","data":"00000000000000000011x"}"#;
        p.feed(ws::OP_TEXT, false, &m[..10], &mut |e| {
            got.push(format!("{e:?}"))
        });
        p.feed(ws::OP_CONT, false, &m[10..30], &mut |e| {
            got.push(format!("{e:?}"))
        });
        p.feed(ws::OP_CONT, true, &m[30..], &mut |e| {
            got.push(format!("{e:?}"))
        });
        assert_eq!(got, vec!["Message { ts_ns: Some(11) }"]);
    }

    #[test]
    fn nats_stream_parser_handles_any_split() {
        let stream: &[u8] = b"INFO {\"server_id\":\"x\"}\r\n+OK\r\nPING\r\nMSG ch0 1 24\r\n00000000000000000123xxxx\r\nMSG ch0 1 reply.to 20\r\n00000000000000000456\r\nPONG\r\n-ERR 'Slow Consumer'\r\n";
        let want = vec![
            "Info",
            "Other",
            "ServerPing",
            "msg Some(123)",
            "msg Some(456)",
            "Confirm",
            "err -ERR 'Slow Consumer'",
        ];
        // Whole, byte by byte, and in every two-piece split.
        assert_eq!(collect(&mut NatsParser::default(), &[stream]), want);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(collect(&mut NatsParser::default(), &bytes), want);
        for cut in 0..stream.len() {
            let got = collect(
                &mut NatsParser::default(),
                &[&stream[..cut], &stream[cut..]],
            );
            assert_eq!(got, want, "cut at {cut}");
        }
    }

    #[test]
    fn nats_payload_containing_crlf_is_skipped_by_length() {
        let stream: &[u8] = b"MSG s 9 22\r\n00000000000000000007\r\n\r\nPONG\r\n";
        assert_eq!(
            collect(&mut NatsParser::default(), &[stream]),
            vec!["msg Some(7)", "Confirm"]
        );
    }

    #[test]
    fn nats_commands_are_binary_frames() {
        let n = Nats { ping_every: 8 };
        let mut out = Vec::new();
        let mut m = Mask::new(3);
        n.hello(&mut out, &mut m);
        assert_eq!(
            unmasked_payload(&out),
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,\"protocol\":1}\r\n"
        );
        out.clear();
        n.publish(&mut out, &mut m, "ch1", 5, 32, Some(0));
        let p = unmasked_payload(&out);
        assert!(p.starts_with(b"PUB ch1 32\r\n00000000000000000005xx"));
        assert!(p.ends_with(b"x\r\n"));
        assert_eq!(p.len(), "PUB ch1 32\r\n".len() + 32 + 2);
    }

    fn pusher() -> Pusher {
        Pusher {
            key: "bench-key".into(),
            secret: "bench-secret".into(),
            ping_every: 4,
        }
    }

    fn feed_all(p: &mut dyn Parser, msgs: &[&[u8]]) -> Vec<String> {
        let mut got = Vec::new();
        for m in msgs {
            p.feed(ws::OP_TEXT, true, m, &mut |e| got.push(format!("{e:?}")));
        }
        got
    }

    #[test]
    fn pusher_auth_matches_independent_hmac() {
        // python3 -c 'import hmac,hashlib; print(hmac.new(b"bench-secret",
        //   b"123.456:private-ch0", hashlib.sha256).hexdigest())'
        assert_eq!(
            pusher().auth("123.456", "private-ch0"),
            "bench-key:29dd28e9e983932d46d4c390667c53bef325292e89342ef629584ca11c7a06f4"
        );
        // The example of Pusher's channel authorization docs (key
        // 278d425bdf160c739803, secret 7ad3773142a6692b25b8), checked with
        // python3's hmac as well.
        let docs = Pusher {
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            ping_every: 1,
        };
        assert_eq!(
            docs.auth("1234.1234", "private-foobar"),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }

    #[test]
    fn pusher_frames_are_valid_json() {
        let a = pusher();
        let mut m = Mask::new(5);
        let mut out = Vec::new();
        a.subscribe(&mut out, &mut m, "ch0", 3, Some("123.456"));
        let v: serde_json::Value = serde_json::from_slice(&unmasked_payload(&out)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"pusher:subscribe","data":{
                "channel":"private-ch0",
                "auth":"bench-key:29dd28e9e983932d46d4c390667c53bef325292e89342ef629584ca11c7a06f4"}})
        );
        out.clear();
        a.publish(&mut out, &mut m, "ch0", 42, 64, Some(0));
        let v: serde_json::Value = serde_json::from_slice(&unmasked_payload(&out)).unwrap();
        assert_eq!(v["event"], "client-m");
        assert_eq!(v["channel"], "private-ch0");
        let data = v["data"].as_str().unwrap();
        assert_eq!(data.len() + 2, 64);
        assert_eq!(parse_ts(data.as_bytes()), Some(42));
        out.clear();
        a.sync(&mut out, &mut m);
        let v: serde_json::Value = serde_json::from_slice(&unmasked_payload(&out)).unwrap();
        assert_eq!(v, serde_json::json!({"event":"pusher:ping","data":{}}));
        out.clear();
        a.pong(&mut out, &mut m);
        let v: serde_json::Value = serde_json::from_slice(&unmasked_payload(&out)).unwrap();
        assert_eq!(v, serde_json::json!({"event":"pusher:pong","data":{}}));
        out.clear();
        a.unsubscribe(&mut out, &mut m, "ch0");
        let v: serde_json::Value = serde_json::from_slice(&unmasked_payload(&out)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"pusher:unsubscribe","data":{"channel":"private-ch0"}})
        );
        assert!(a.expects_greeting() && a.publisher_subscribes());
        assert_eq!(a.publishes_per_confirm(), 4);
        assert!(!Herald.publisher_subscribes());
    }

    #[test]
    fn pusher_events_are_classified() {
        let mut p = PusherParser::for_channel(Some("ch0"));
        assert_eq!(p.socket_id(), None);
        let got = feed_all(
            &mut p,
            &[
                br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"123.456\",\"activity_timeout\":120}"}"#,
                br#"{"event":"pusher_internal:subscription_succeeded","channel":"private-ch0","data":"{}"}"#,
                br#"{"event":"client-m","channel":"private-ch0","data":"00000000000000000777xxxx"}"#,
                br#"{"event":"pusher:pong","data":"{}"}"#,
                br#"{"event":"pusher:ping","data":{}}"#,
                br#"{"event":"pusher:error","data":{"code":4301,"message":"slow down"}}"#,
                br#"{"event":"pusher:subscription_error","channel":"private-ch0","data":{"type":"AuthError","error":"bad","status":401}}"#,
                br#"{"event":"pusher_internal:member_added","channel":"presence-a","data":"{}"}"#,
                br#"not json"#,
            ],
        );
        assert_eq!(p.socket_id(), Some("123.456"));
        assert_eq!(got[0], "Info");
        assert_eq!(got[1], "Confirm");
        assert_eq!(got[2], "Message { ts_ns: Some(777) }");
        assert_eq!(got[3], "Confirm");
        assert_eq!(got[4], "ServerPing");
        assert!(got[5].starts_with("Error"));
        assert!(got[6].starts_with("Error"));
        assert_eq!(got[7], "Other");
        assert_eq!(got[8], "Other");
        // A greeting without a socket id is an error.
        let got = feed_all(
            &mut PusherParser::for_channel(None),
            &[br#"{"event":"pusher:connection_established","data":"{}"}"#],
        );
        assert!(got[0].starts_with("Error"));
    }

    #[test]
    fn pusher_timestamps_fixed_offset_search_and_other_layouts() {
        let p = PusherParser::for_channel(Some("ch12"));
        let m = br#"{"event":"client-m","channel":"private-ch12","data":"00000000000000000777xx"}"#;
        assert_eq!(p.timestamp(m), Some(777));
        // Another channel, another event: found by search.
        let other =
            br#"{"event":"client-zz","channel":"private-a","data":"00000000000000000555x"}"#;
        assert_eq!(p.timestamp(other), Some(555));
        assert_eq!(PusherParser::for_channel(None).timestamp(m), Some(777));
        let not_ts = br#"{"event":"client-m","channel":"private-ch12","data":{"a":1}}"#;
        assert_eq!(p.timestamp(not_ts), None);
        // Fields in another order (another server) and a fragmented frame.
        let mut p = PusherParser::for_channel(Some("ch12"));
        let mut got = feed_all(
            &mut p,
            &[
                br#"{"channel":"private-ch12","event":"client-m","data":"00000000000000000009x"}"#,
                br#"{ "data": "{}", "event": "pusher:pong" }"#,
            ],
        );
        let m = br#"{"event":"client-m","channel":"private-ch12","data":"00000000000000000011x"}"#;
        p.feed(ws::OP_TEXT, false, &m[..10], &mut |e| {
            got.push(format!("{e:?}"))
        });
        p.feed(ws::OP_CONT, false, &m[10..50], &mut |e| {
            got.push(format!("{e:?}"))
        });
        p.feed(ws::OP_CONT, true, &m[50..], &mut |e| {
            got.push(format!("{e:?}"))
        });
        assert_eq!(
            got,
            vec![
                "Message { ts_ns: Some(9) }",
                "Confirm",
                "Message { ts_ns: Some(11) }"
            ]
        );
    }
}
