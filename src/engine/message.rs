//! A published message, as the engine moves it between cores and onto
//! subscribers' queues.
//!
//! The publisher's front-end builds its own wire frame once (one buffer,
//! the publisher's data spliced in) and says where the channel name and
//! the data lie inside it; the engine never parses it. Subscribers that
//! speak another encoding on the same channel (a wspubsub subscriber of a
//! channel a native client publishes to) get a frame built from the same
//! data by that encoding's [`Encoder`], **at most once per message**, on
//! whichever core first needs it, and shared by every such subscriber on
//! every core.
//!
//! The routing key (the channel, or `{namespace}#{channel}` for a
//! namespace other than 0) is hashed once, when the message is made, with
//! the one hasher every core's tables and the interest map use.

use std::ops::Range;
use std::sync::OnceLock;

use bytes::Bytes;

/// Longest channel name the engine routes, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;
/// Longest routing key: a namespace number, `#`, and a channel name.
pub const MAX_KEY: usize = 6 + MAX_CHANNEL_LEN;
/// Most encodings (wire formats) a node serves.
pub const MAX_ENCODINGS: usize = 8;

/// A wire format subscribers receive frames in: an index into the node's
/// [`Encoder`]s, chosen by the front-ends when the node starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Encoding(pub u8);

/// What kind of data the publisher sent, for encodings that must carry it
/// differently (a JSON value spliced as it is, text, or bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// One valid JSON value.
    Json,
    /// UTF-8 text, not necessarily JSON.
    Text,
    /// Arbitrary bytes.
    Binary,
}

/// Builds the frame of one encoding for a message published in another
/// (`None`: this encoding cannot carry it, and its subscribers skip it).
pub type Encoder = fn(&Message) -> Option<Bytes>;

/// A connection a message must not be delivered to, wherever it lives:
/// worker, slot, generation.
type Except = (u16, u32, u64);

/// One published message. Crosses cores behind an `Arc`.
#[derive(Debug)]
pub struct Message {
    frame: Bytes,
    /// The channel name when the frame does not hold it (a raw frame):
    /// then `channel_at` indexes this instead.
    channel_src: Option<Bytes>,
    encoding: Encoding,
    channel_at: u32,
    channel_len: u8,
    payload_at: u32,
    payload_len: u32,
    kind: PayloadKind,
    namespace: u16,
    hash: u64,
    except: Option<Except>,
    /// The node of a cluster where `except` applies (0: this one).
    except_node: u64,
    /// Its offset in its channel's history (0: none).
    offset: u64,
    /// The publisher's frame lacks the offset its encoding carries: it
    /// is then only the source of channel and payload, and subscribers of
    /// that encoding get a frame built like the others'.
    reframe: bool,
    /// Delivered but never kept in history (a front-end's own notices,
    /// such as Pusher's member events).
    transient: bool,
    /// Frames of other encodings, built on first need.
    others: [OnceLock<Option<Bytes>>; MAX_ENCODINGS],
}

impl Message {
    /// A message whose `frame` (in `encoding`) holds the channel name at
    /// `channel` and the publisher's data at `payload`.
    pub fn new(
        frame: Bytes,
        encoding: Encoding,
        channel: Range<usize>,
        payload: Range<usize>,
        kind: PayloadKind,
        namespace: u16,
    ) -> Message {
        debug_assert!(channel.len() <= MAX_CHANNEL_LEN && channel.end <= frame.len());
        debug_assert!(payload.end <= frame.len());
        let mut m = Message {
            frame,
            channel_src: None,
            encoding,
            channel_at: channel.start as u32,
            channel_len: channel.len() as u8,
            payload_at: payload.start as u32,
            payload_len: payload.len() as u32,
            kind,
            namespace,
            hash: 0,
            except: None,
            except_node: 0,
            offset: 0,
            reframe: false,
            transient: false,
            others: Default::default(),
        };
        m.hash = m.with_key(route_hash);
        m
    }

    /// A message whose frame does not name its channel (a wspubsub
    /// publisher's raw frame): the name is `channel`, which the publisher
    /// keeps for its connection's life, so this costs no allocation.
    pub fn with_channel(
        frame: Bytes,
        encoding: Encoding,
        channel: Bytes,
        payload: Range<usize>,
        kind: PayloadKind,
        namespace: u16,
    ) -> Message {
        debug_assert!(channel.len() <= MAX_CHANNEL_LEN);
        debug_assert!(payload.end <= frame.len());
        let mut m = Message {
            frame,
            channel_at: 0,
            channel_len: channel.len() as u8,
            channel_src: Some(channel),
            encoding,
            payload_at: payload.start as u32,
            payload_len: payload.len() as u32,
            kind,
            namespace,
            hash: 0,
            except: None,
            except_node: 0,
            offset: 0,
            reframe: false,
            transient: false,
            others: Default::default(),
        };
        m.hash = m.with_key(route_hash);
        m
    }

    /// The frame the publisher's front-end built.
    pub fn frame(&self) -> &Bytes {
        &self.frame
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The channel this message was published on.
    pub fn channel(&self) -> &str {
        let start = self.channel_at as usize;
        let src = self.channel_src.as_ref().unwrap_or(&self.frame);
        let bytes = &src[start..start + self.channel_len as usize];
        // Channel names are validated ASCII before a frame is built.
        std::str::from_utf8(bytes).unwrap_or("")
    }

    /// The publisher's data, as it sent it.
    pub fn payload(&self) -> &[u8] {
        let start = self.payload_at as usize;
        &self.frame[start..start + self.payload_len as usize]
    }

    pub fn kind(&self) -> PayloadKind {
        self.kind
    }

    /// 0 for herald's own channels, `n` for those of namespace `n` (a
    /// Pusher app), which never meet.
    pub fn namespace(&self) -> u16 {
        self.namespace
    }

    /// The routing key's hash, computed once.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// Excludes connection `slot` (generation `gen`) of `worker`.
    pub fn set_except(&mut self, worker: u16, slot: u32, gen: u64) {
        self.except = Some((worker, slot, gen));
        self.except_node = 0;
    }

    /// Excludes connection `slot` (generation `gen`) of `worker` on
    /// another node of the cluster, the one whose tag is `node`.
    pub fn set_except_at(&mut self, node: u64, worker: u16, slot: u32, gen: u64) {
        self.except = Some((worker, slot, gen));
        self.except_node = node;
    }

    /// The excluded connection if it lives on `worker` of this node:
    /// (slot, generation).
    pub fn except_on(&self, worker: usize) -> Option<(usize, u64)> {
        self.except
            .filter(|e| usize::from(e.0) == worker && self.except_node == 0)
            .map(|e| (e.1 as usize, e.2))
    }

    /// Calls `f` with the routing key (the channel itself in namespace 0,
    /// no copy; see [`route_key`] otherwise).
    pub fn with_key<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        if self.namespace == 0 {
            return f(self.channel());
        }
        let mut buf = [0u8; MAX_KEY];
        f(route_key(&mut buf, self.namespace, self.channel()))
    }

    /// The routing key, copied into `buf`: for a caller that changes the
    /// message while it holds the key.
    pub fn key_in<'a>(&self, buf: &'a mut [u8; MAX_KEY]) -> &'a str {
        if self.namespace != 0 {
            return route_key(buf, self.namespace, self.channel());
        }
        let c = self.channel().as_bytes();
        buf[..c.len()].copy_from_slice(c);
        // A validated ASCII channel name.
        std::str::from_utf8(&buf[..c.len()]).unwrap_or("")
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Gives the message its offset, before it is shared. `carried_by`
    /// is the encoding whose frames show offsets: if the publisher's frame
    /// is in it, that frame is rebuilt (once) rather than sent as it is.
    pub fn set_offset(&mut self, offset: u64, carried_by: Encoding) {
        self.offset = offset;
        self.reframe = offset > 0 && carried_by == self.encoding;
    }

    /// Marks the message as one history never keeps.
    pub fn set_transient(&mut self) {
        self.transient = true;
    }

    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// Is the publisher's frame only a source, subscribers of its encoding
    /// getting a rebuilt one?
    pub fn reframed(&self) -> bool {
        self.reframe
    }

    /// The frame for subscribers in `encoding`: the publisher's own, or one
    /// built by `encoders[encoding]` the first time any core asks.
    pub fn frame_for(&self, encoding: Encoding, encoders: &[Encoder]) -> Option<Bytes> {
        if encoding == self.encoding && !self.reframe {
            return Some(self.frame.clone());
        }
        let i = usize::from(encoding.0);
        let cell = self.others.get(i)?;
        cell.get_or_init(|| encoders.get(i).and_then(|encode| encode(self)))
            .clone()
    }
}

/// Why a message from another node could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a herald message (or another version)")]
    Version,
    #[error("truncated")]
    Truncated,
    #[error("a field out of range")]
    Range,
    #[error("an invalid channel name")]
    Channel,
}

/// The version byte of [`Message::encode_wire`]'s format.
const WIRE_V1: [u8; 2] = *b"h1";
const WIRE_TRANSIENT: u8 = 1;
const WIRE_RAW: u8 = 2;
const WIRE_EXCEPT: u8 = 4;
/// Fixed part: magic and version, flags, encoding, kind, namespace,
/// origin.
const WIRE_FIXED: usize = 2 + 1 + 1 + 1 + 2 + 8;

impl Message {
    /// Appends the message as it crosses to other nodes (through a
    /// broker) to `out`: a small header, then the publisher's frame as it
    /// is, so a receiving node rebuilds the same `Message` (and sends the
    /// same frame) without parsing the frame. `origin` names the sending
    /// node: the exclusion applies there, unless it names another node
    /// ([`Message::set_except_at`]).
    pub fn encode_wire(&self, origin: u64, out: &mut Vec<u8>) {
        let mut flags = 0;
        if self.transient {
            flags |= WIRE_TRANSIENT;
        }
        if self.channel_src.is_some() {
            flags |= WIRE_RAW;
        }
        if self.except.is_some() {
            flags |= WIRE_EXCEPT;
        }
        out.reserve(WIRE_FIXED + 14 + 1 + MAX_CHANNEL_LEN + 13 + self.frame.len());
        out.extend_from_slice(&WIRE_V1);
        out.push(flags);
        out.push(self.encoding.0);
        out.push(match self.kind {
            PayloadKind::Json => 0,
            PayloadKind::Text => 1,
            PayloadKind::Binary => 2,
        });
        out.extend_from_slice(&self.namespace.to_le_bytes());
        // Where the exclusion applies: here, or the node it names.
        let at = match self.except_node {
            0 => origin,
            node => node,
        };
        out.extend_from_slice(&at.to_le_bytes());
        if let Some((worker, slot, gen)) = self.except {
            out.extend_from_slice(&worker.to_le_bytes());
            out.extend_from_slice(&slot.to_le_bytes());
            out.extend_from_slice(&gen.to_le_bytes());
        }
        match &self.channel_src {
            Some(name) => {
                out.push(name.len() as u8);
                out.extend_from_slice(name);
            }
            None => {
                out.extend_from_slice(&self.channel_at.to_le_bytes());
                out.push(self.channel_len);
            }
        }
        out.extend_from_slice(&self.payload_at.to_le_bytes());
        out.extend_from_slice(&self.payload_len.to_le_bytes());
        out.extend_from_slice(&self.frame);
    }

    /// Reads what [`Message::encode_wire`] wrote, on node `here`: the
    /// frame is a slice of `buf` (no copy), and the exclusion applies only
    /// when the message comes from `here`. Everything is checked: a broker
    /// hands over bytes anyone with access to it could have written.
    pub fn decode_wire(buf: Bytes, here: u64) -> Result<Message, WireError> {
        let mut r = WireReader { buf: &buf, at: 0 };
        if r.take(2)? != WIRE_V1 {
            return Err(WireError::Version);
        }
        let flags = r.u8()?;
        let encoding = r.u8()?;
        if usize::from(encoding) >= MAX_ENCODINGS || flags & !7 != 0 {
            return Err(WireError::Range);
        }
        let kind = match r.u8()? {
            0 => PayloadKind::Json,
            1 => PayloadKind::Text,
            2 => PayloadKind::Binary,
            _ => return Err(WireError::Range),
        };
        let namespace = u16::from_le_bytes(r.array()?);
        let origin = u64::from_le_bytes(r.array()?);
        let except = match flags & WIRE_EXCEPT {
            0 => None,
            _ => Some((
                u16::from_le_bytes(r.array()?),
                u32::from_le_bytes(r.array()?),
                u64::from_le_bytes(r.array()?),
            )),
        };
        let channel = match flags & WIRE_RAW {
            0 => Err((u32::from_le_bytes(r.array()?), r.u8()?)),
            _ => {
                let n = usize::from(r.u8()?);
                Ok(buf.slice(r.at..r.at + r.take(n)?.len()))
            }
        };
        let payload_at = u32::from_le_bytes(r.array()?) as usize;
        let payload_len = u32::from_le_bytes(r.array()?) as usize;
        let frame = buf.slice(r.at..);
        let payload = payload_at
            ..payload_at
                .checked_add(payload_len)
                .ok_or(WireError::Range)?;
        if payload.end > frame.len() {
            return Err(WireError::Range);
        }
        let mut m = match channel {
            Ok(name) => {
                check_channel(&name)?;
                Message::with_channel(frame, Encoding(encoding), name, payload, kind, namespace)
            }
            Err((at, len)) => {
                let c = at as usize..at as usize + usize::from(len);
                if c.end > frame.len() {
                    return Err(WireError::Range);
                }
                check_channel(&frame[c.clone()])?;
                Message::new(frame, Encoding(encoding), c, payload, kind, namespace)
            }
        };
        m.transient = flags & WIRE_TRANSIENT != 0;
        // Elsewhere it is kept, naming its node, for a node that hands the
        // message on (a restart's new process, back to the old one).
        match (origin == here, origin) {
            (true, _) => m.except = except,
            (false, 0) => {}
            (false, node) => {
                m.except = except;
                m.except_node = node;
            }
        }
        Ok(m)
    }
}

/// A channel name as every protocol allows it: 1 to 255 printable ASCII
/// bytes (each front-end checked its own, stricter, rules before).
fn check_channel(name: &[u8]) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name.iter().all(|b| b.is_ascii_graphic());
    ok.then_some(()).ok_or(WireError::Channel)
}

struct WireReader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> WireReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.buf.get(self.at..end).ok_or(WireError::Truncated)?;
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

/// The hasher of routing keys: random per process (keys come from
/// clients), the same on every core.
fn hasher() -> &'static ahash::RandomState {
    static HASHER: OnceLock<ahash::RandomState> = OnceLock::new();
    HASHER.get_or_init(ahash::RandomState::new)
}

/// The hash of a routing key, as every table of the engine computes it.
pub fn route_hash(key: &str) -> u64 {
    hasher().hash_one(key)
}

/// Writes the routing key of `channel` in `namespace` (> 0) into `buf`:
/// `{namespace}#{channel}`. `#` is not allowed in any protocol's channel
/// names (but for Pusher's `#server-to-user-`, which splits on the first
/// `#`), so namespaces never collide with each other or with namespace 0.
pub fn route_key<'a>(buf: &'a mut [u8; MAX_KEY], namespace: u16, channel: &str) -> &'a str {
    use std::io::Write;
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cur, "{namespace}#");
    let at = cur.position() as usize;
    let n = channel.len().min(MAX_KEY - at);
    buf[at..at + n].copy_from_slice(&channel.as_bytes()[..n]);
    // Digits, `#` and a validated ASCII channel name.
    std::str::from_utf8(&buf[..at + n]).unwrap_or("")
}

/// The routing key of `channel` in `namespace`, as an owned string.
pub fn route_key_string(namespace: u16, channel: &str) -> String {
    if namespace == 0 {
        return channel.to_string();
    }
    format!("{namespace}#{channel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame `<channel>|<payload>` standing in for a front-end's.
    fn message(channel: &str, payload: &str, ns: u16) -> Message {
        let frame = Bytes::from(format!("{channel}|{payload}"));
        let c = 0..channel.len();
        let p = channel.len() + 1..frame.len();
        Message::new(frame, Encoding(0), c, p, PayloadKind::Text, ns)
    }

    fn upper(m: &Message) -> Option<Bytes> {
        Some(Bytes::from(
            String::from_utf8_lossy(m.payload()).to_uppercase(),
        ))
    }

    fn never(_: &Message) -> Option<Bytes> {
        None
    }

    #[test]
    fn parts_and_keys() {
        let m = message("room", "hello", 0);
        assert_eq!(m.channel(), "room");
        assert_eq!(m.payload(), b"hello");
        assert_eq!(m.hash(), route_hash("room"));
        m.with_key(|k| assert_eq!(k, "room"));
        let m = message("room", "x", 3);
        m.with_key(|k| assert_eq!(k, "3#room"));
        assert_eq!(m.hash(), route_hash("3#room"));
        assert_eq!(route_key_string(3, "room"), "3#room");
        assert_eq!(route_key_string(0, "room"), "room");
    }

    #[test]
    fn other_encodings_are_built_once_and_shared() {
        let encoders: [Encoder; 3] = [upper, upper, never];
        let m = message("room", "hello", 0);
        let own = m.frame_for(Encoding(0), &encoders).unwrap();
        assert_eq!(
            own.as_ptr(),
            m.frame().as_ptr(),
            "the publisher's frame itself"
        );
        let a = m.frame_for(Encoding(1), &encoders).unwrap();
        let b = m.frame_for(Encoding(1), &encoders).unwrap();
        assert_eq!(&a[..], b"HELLO");
        assert_eq!(a.as_ptr(), b.as_ptr(), "built once, then shared");
        assert_eq!(m.frame_for(Encoding(2), &encoders), None);
        assert_eq!(m.frame_for(Encoding(7), &encoders), None, "no such encoder");
        assert_eq!(m.frame_for(Encoding(9), &encoders), None);
    }

    #[test]
    fn a_raw_frame_names_its_channel_apart() {
        let channel = Bytes::from_static(b"news:today");
        let frame = Bytes::from_static(b"\x81\x05hello");
        let m = Message::with_channel(frame, Encoding(2), channel, 2..7, PayloadKind::Text, 0);
        assert_eq!(m.channel(), "news:today");
        assert_eq!(m.payload(), b"hello");
        assert_eq!(m.hash(), route_hash("news:today"));
        assert_eq!(&m.frame()[..], b"\x81\x05hello");
    }

    #[test]
    fn crosses_nodes_as_it_was() {
        let mut m = message("room", "hello", 3);
        m.set_except(1, 5, 9);
        m.set_transient();
        let mut wire = Vec::new();
        m.encode_wire(42, &mut wire);
        let wire = Bytes::from(wire);
        let back = Message::decode_wire(wire.clone(), 42).unwrap();
        assert_eq!(back.channel(), "room");
        assert_eq!(back.payload(), b"hello");
        assert_eq!(back.namespace(), 3);
        assert_eq!(back.hash(), m.hash());
        assert_eq!(back.frame(), m.frame());
        assert!(back.is_transient());
        assert_eq!(
            back.except_on(1),
            Some((5, 9)),
            "the exclusion is kept at home"
        );
        // The frame is a slice of what arrived: no copy.
        let start = wire.as_ptr() as usize;
        let f = back.frame().as_ptr() as usize;
        assert!(f >= start && f < start + wire.len());
        let elsewhere = Message::decode_wire(wire, 7).unwrap();
        assert_eq!(elsewhere.except_on(1), None, "and ignored elsewhere");
        // Handed on from there, it still names its home.
        let mut again = Vec::new();
        elsewhere.encode_wire(7, &mut again);
        let home = Message::decode_wire(Bytes::from(again), 42).unwrap();
        assert_eq!(home.except_on(1), Some((5, 9)), "and applies back home");
        assert!(!message("a", "b", 0).is_transient());
    }

    #[test]
    fn an_exclusion_can_name_another_node() {
        let mut m = message("room", "x", 1);
        m.set_except_at(7, 0, 3, 4);
        assert_eq!(m.except_on(0), None, "not on this node");
        let mut wire = Vec::new();
        m.encode_wire(1, &mut wire);
        let wire = Bytes::from(wire);
        let at7 = Message::decode_wire(wire.clone(), 7).unwrap();
        assert_eq!(at7.except_on(0), Some((3, 4)));
        assert_eq!(Message::decode_wire(wire, 1).unwrap().except_on(0), None);
    }

    #[test]
    fn a_raw_frame_crosses_with_its_channel() {
        let channel = Bytes::from_static(b"news:today");
        let frame = Bytes::from_static(b"\x82\x03abc");
        let m = Message::with_channel(frame, Encoding(2), channel, 2..5, PayloadKind::Binary, 0);
        let mut wire = Vec::new();
        m.encode_wire(1, &mut wire);
        let back = Message::decode_wire(Bytes::from(wire), 1).unwrap();
        assert_eq!(back.channel(), "news:today");
        assert_eq!(back.payload(), b"abc");
        assert_eq!(back.kind(), PayloadKind::Binary);
        assert_eq!(back.encoding(), Encoding(2));
        assert_eq!(back.except_on(0), None);
    }

    #[test]
    fn hostile_bytes_are_refused_not_trusted() {
        let mut wire = Vec::new();
        message("room", "hello", 0).encode_wire(1, &mut wire);
        // Every truncation is an error, never a panic.
        for n in 0..wire.len() - "room|hello".len() {
            assert!(Message::decode_wire(Bytes::copy_from_slice(&wire[..n]), 1).is_err());
        }
        let bad = |i: usize, v: u8| {
            let mut w = wire.clone();
            w[i] = v;
            Message::decode_wire(Bytes::from(w), 1).err()
        };
        assert_eq!(bad(0, b'x'), Some(WireError::Version));
        assert_eq!(bad(2, 0x80), Some(WireError::Range), "unknown flag");
        assert_eq!(bad(3, 200), Some(WireError::Range), "encoding");
        assert_eq!(bad(4, 9), Some(WireError::Range), "kind");
        // The channel range (at 15) pointing past the frame.
        assert_eq!(bad(15, 250), Some(WireError::Range));
        // A channel that is not printable ASCII.
        assert_eq!(bad(19, 0), Some(WireError::Channel), "empty channel");
        // The payload length past the frame.
        assert_eq!(bad(24, 0xff), Some(WireError::Range));
        let mut random = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut w = wire.clone();
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            let i = random as usize % w.len();
            w[i] = (random >> 32) as u8;
            if let Ok(m) = Message::decode_wire(Bytes::from(w), 1) {
                let _ = (m.channel(), m.payload());
            }
        }
    }

    #[test]
    fn exclusion_names_one_connection_on_one_worker() {
        let mut m = message("room", "x", 0);
        assert_eq!(m.except_on(0), None);
        m.set_except(1, 5, 9);
        assert_eq!(m.except_on(0), None);
        assert_eq!(m.except_on(1), Some((5, 9)));
    }
}
