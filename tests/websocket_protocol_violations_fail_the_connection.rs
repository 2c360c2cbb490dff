//! RFC 6455 §5-§8 on the wire: frames that violate the protocol fail the
//! connection with the right close code (1002, 1007, 1009) and then a TCP
//! close, valid fragmentation and closing handshakes work, and the server
//! keeps serving others. Frames are built and parsed by hand on raw sockets.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use common::{assert_no_failures, Client, Server, TIMEOUT};
use serde_json::{json, Value};
use tungstenite::Message;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// RFC 6455 §1.3's accept value for [`KEY`].
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

// First bytes (FIN/RSV/opcode) of client frames.
const TEXT: u8 = 0x81;
const TEXT_START: u8 = 0x01;
const CONT: u8 = 0x00;
const CONT_FIN: u8 = 0x80;
const BINARY: u8 = 0x82;
const CLOSE: u8 = 0x88;
const PING: u8 = 0x89;

/// A masked client frame with first byte `first` (RFC 6455 §5.2).
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
    out
}

/// The same frame without a mask (forbidden for clients, §5.1).
fn unmasked(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![first, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

fn close_body(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(reason);
    body
}

fn cat(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.concat()
}

/// A server frame, parsed by hand.
#[derive(Debug)]
struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn describe(&self) -> String {
        format!(
            "frame opcode {} fin {} payload {:?}",
            self.opcode,
            self.fin,
            String::from_utf8_lossy(&self.payload)
        )
    }
}

/// Parses one unmasked server frame from the start of `buf`.
fn parse_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[0] & 0x70 != 0 {
        return Err(format!("server frame with RSV bits: {:#04x}", buf[0]));
    }
    if buf[1] & 0x80 != 0 {
        return Err("server frame is masked (RFC 6455 §5.1 forbids it)".into());
    }
    let (len, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    let payload = buf[at..at + len].to_vec();
    at += len;
    Ok(Some((
        Frame {
            fin: buf[0] & 0x80 != 0,
            opcode: buf[0] & 0x0f,
            payload,
        },
        at,
    )))
}

/// A WebSocket connection driven byte by byte.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and upgrades by hand; fails the test unless the server
    /// answers 101 with the RFC's accept value.
    fn open(server: &Server) -> Raw {
        let mut s = TcpStream::connect(server.addr).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            server.addr
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).expect("read upgrade response");
            assert!(n > 0, "server closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101 "), "upgrade refused: {head}");
        assert!(
            head.to_ascii_lowercase().contains(&format!(
                "sec-websocket-accept: {}",
                ACCEPT.to_ascii_lowercase()
            )),
            "bad accept header: {head}"
        );
        buf.drain(..end);
        Raw { s, buf }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write frames");
    }

    /// The next server frame; `Err` says why there is none.
    fn next(&mut self) -> Result<Frame, String> {
        loop {
            if let Some((f, used)) = parse_frame(&self.buf)? {
                self.buf.drain(..used);
                return Ok(f);
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return Err("TCP closed before a complete frame".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(format!("no frame within {TIMEOUT:?}"))
                }
                Err(e) => return Err(format!("read error: {e}")),
            }
        }
    }

    /// The next frame, which must be a text frame holding JSON.
    fn next_json(&mut self) -> Result<Value, String> {
        let f = self.next()?;
        if f.opcode != 1 || !f.fin {
            return Err(format!("expected a text frame, got {}", f.describe()));
        }
        serde_json::from_slice(&f.payload)
            .map_err(|e| format!("invalid JSON from server ({e}): {}", f.describe()))
    }

    /// The next frame must be a close with `code`; returns its reason.
    fn expect_close_frame(&mut self, code: u16) -> Result<String, String> {
        let f = self.next()?;
        if f.opcode != 8 {
            return Err(format!("expected close {code}, got {}", f.describe()));
        }
        if f.payload.len() < 2 {
            return Err(format!("expected close {code}, got a close without code"));
        }
        let got = u16::from_be_bytes([f.payload[0], f.payload[1]]);
        let reason = std::str::from_utf8(&f.payload[2..])
            .map_err(|_| "close reason is not UTF-8".to_string())?
            .to_string();
        if got != code {
            return Err(format!(
                "expected close {code}, got close {got} ({reason:?})"
            ));
        }
        Ok(reason)
    }

    /// After its close frame, the server must close TCP: nothing more
    /// arrives and the read ends (EOF, or a reset when bytes were unread).
    fn expect_tcp_closed(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!("bytes after the close frame: {:?}", self.buf));
        }
        let mut chunk = [0u8; 4096];
        match self.s.read(&mut chunk) {
            Ok(0) => Ok(()),
            Ok(n) => Err(format!("data after the close frame: {:?}", &chunk[..n])),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(
                format!("server did not close TCP within {TIMEOUT:?} after its close frame"),
            ),
            Err(e) => Err(format!("read error after close: {e}")),
        }
    }

    /// The server fails the connection with `code` and closes TCP.
    fn expect_failed(&mut self, code: u16) -> Result<(), String> {
        self.expect_close_frame(code)?;
        self.expect_tcp_closed()
    }
}

/// Subscribe/publish round trip between two fresh clients.
fn assert_still_serves(server: &Server) {
    let mut a = Client::connect(server, "/ws");
    let mut b = Client::connect(server, "/ws");
    b.subscribe("alive");
    a.publish("alive", json!({"still":"serving"}));
    assert_eq!(
        b.recv_json(),
        json!({"op":"message","channel":"alive","data":{"still":"serving"}})
    );
}

#[test]
fn each_protocol_violation_fails_with_its_close_code_then_tcp_close() {
    let server = Server::open();
    let ping_json = br#"{"op":"ping","id":1}"#;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        // §5.1: "a server MUST close the connection upon receiving a frame
        // that is not masked".
        ("unmasked text frame", unmasked(TEXT, ping_json), 1002),
        ("unmasked ping", unmasked(PING, b"x"), 1002),
        // §5.2: RSV bits must be 0 without a negotiated extension.
        ("RSV1 set", frame(0xC1, ping_json), 1002),
        ("RSV2 set", frame(0xA1, ping_json), 1002),
        ("RSV3 set", frame(0x91, ping_json), 1002),
        // §5.2: reserved opcodes.
        ("reserved data opcode 3", frame(0x83, b"x"), 1002),
        ("reserved control opcode 11", frame(0x8B, b"x"), 1002),
        // §5.5: control frames carry at most 125 bytes and are not fragmented.
        (
            "ping with 126-byte payload",
            frame(PING, &[b'p'; 126]),
            1002,
        ),
        ("fragmented ping", frame(0x09, b"x"), 1002),
        // §5.4: a continuation needs a message to continue; a new data
        // frame may not start while one is in progress.
        ("continuation without a start", frame(CONT_FIN, b"x"), 1002),
        (
            "non-final continuation without a start",
            frame(CONT, b"x"),
            1002,
        ),
        (
            "new text message inside a fragmented one",
            cat(&[frame(TEXT_START, b"{\"op\""), frame(TEXT, ping_json)]),
            1002,
        ),
        // §8.1: text must be UTF-8 (fail with 1007, §7.4.1).
        (
            "invalid UTF-8 text (0xff)",
            frame(TEXT, b"{\"op\":\"ping\",\"x\":\"\xff\"}"),
            1007,
        ),
        ("overlong UTF-8 text", frame(TEXT, b"\"\xc0\xaf\""), 1007),
        (
            "UTF-16 surrogate in text",
            frame(TEXT, b"\"\xed\xa0\x80\""),
            1007,
        ),
        (
            "invalid UTF-8 split across fragments",
            cat(&[frame(TEXT_START, b"\"a\xe2\x82"), frame(CONT_FIN, b"(\"")]),
            1007,
        ),
        (
            "text message ending inside a UTF-8 sequence",
            cat(&[frame(TEXT_START, b"\"a\xe2\x82"), frame(CONT_FIN, b"")]),
            1007,
        ),
        // §5.5.1 / §7.4: close bodies.
        ("close with a 1-byte body", frame(CLOSE, &[0x03]), 1002),
        (
            "close code 1005",
            frame(CLOSE, &close_body(1005, b"")),
            1002,
        ),
        ("close code 999", frame(CLOSE, &close_body(999, b"")), 1002),
        (
            "close code 1006",
            frame(CLOSE, &close_body(1006, b"")),
            1002,
        ),
        (
            "close code 1015",
            frame(CLOSE, &close_body(1015, b"")),
            1002,
        ),
        (
            "close code 5000",
            frame(CLOSE, &close_body(5000, b"")),
            1002,
        ),
        (
            "close reason not UTF-8",
            frame(CLOSE, &close_body(1000, b"\xff")),
            1007,
        ),
    ];
    let mut failures = Vec::new();
    for (what, bytes, code) in &cases {
        let mut raw = Raw::open(&server);
        raw.send(bytes);
        if let Err(e) = raw.expect_failed(*code) {
            failures.push(format!("{what}: {e}"));
        }
    }
    // The violations cost only their own connections.
    assert_still_serves(&server);
    assert_no_failures(&failures, cases.len());
}

#[test]
fn message_over_max_message_size_gets_too_large_then_close_1009() {
    let server = Server::start(&[("MAX_MESSAGE_SIZE", "1KiB")]);
    let publish_of = |len: usize| {
        let head = r#"{"op":"publish","channel":"big","id":1,"data":""#;
        let pad = len - head.len() - 2;
        format!("{head}{}\"}}", "x".repeat(pad)).into_bytes()
    };
    // Exactly at the limit: accepted.
    let mut raw = Raw::open(&server);
    raw.send(&frame(TEXT, &publish_of(1024)));
    assert_eq!(raw.next_json().unwrap(), json!({"op":"ack","id":1}));

    let one_frame = frame(TEXT, &publish_of(2048));
    let msg = publish_of(1200);
    let fragmented = cat(&[frame(TEXT_START, &msg[..600]), frame(CONT_FIN, &msg[600..])]);
    let binary = frame(BINARY, &[b'b'; 1025]);
    for (what, bytes) in [
        ("one 2 KiB text frame", one_frame),
        ("1200 bytes in two fragments", fragmented),
        ("one 1025-byte binary frame", binary),
    ] {
        let mut raw = Raw::open(&server);
        raw.send(&bytes);
        let err = raw.next_json().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(err["op"], "error", "{what}: {err}");
        assert_eq!(err["code"], "too_large", "{what}: {err}");
        assert!(err["message"].is_string(), "{what}: {err}");
        assert!(err.get("id").is_none(), "{what}: {err}");
        raw.expect_close_frame(1009)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        raw.expect_tcp_closed()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    assert_still_serves(&server);
}

#[test]
fn fragmented_publish_with_interleaved_ping_is_reassembled() {
    let server = Server::open();
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("frag");
    let mut raw = Raw::open(&server);
    let msg = br#"{"op":"publish","channel":"frag","data":{"k":"v","n":[1,2,3]},"id":7}"#;
    // §5.4: control frames may be injected between fragments.
    raw.send(&cat(&[
        frame(TEXT_START, &msg[..20]),
        frame(PING, b"hb"),
        frame(CONT, &msg[20..45]),
        frame(CONT_FIN, &msg[45..]),
    ]));
    let pong = raw.next().unwrap();
    assert_eq!(
        (pong.opcode, pong.fin, &pong.payload[..]),
        (0xA, true, &b"hb"[..]),
        "{}",
        pong.describe()
    );
    assert_eq!(raw.next_json().unwrap(), json!({"op":"ack","id":7}));
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"frag","data":{"k":"v","n":[1,2,3]}})
    );
    // The connection is still usable afterwards.
    raw.send(&frame(TEXT, br#"{"op":"ping","id":8}"#));
    assert_eq!(raw.next_json().unwrap(), json!({"op":"pong","id":8}));
}

#[test]
fn client_close_is_echoed_and_the_server_closes_tcp() {
    let server = Server::open();
    for code in [1000u16, 1001, 3000, 4999] {
        let mut raw = Raw::open(&server);
        raw.send(&frame(CLOSE, &close_body(code, b"bye now")));
        // §5.5.1: the endpoint answers with a close, typically echoing the code.
        raw.expect_close_frame(code)
            .unwrap_or_else(|e| panic!("close {code}: {e}"));
        // §7.1.1: the server closes the TCP connection first.
        raw.expect_tcp_closed()
            .unwrap_or_else(|e| panic!("close {code}: {e}"));
    }
    // An empty close body is answered too.
    let mut raw = Raw::open(&server);
    raw.send(&frame(CLOSE, b""));
    let f = raw.next().unwrap();
    assert_eq!(f.opcode, 8, "{}", f.describe());
    assert!(f.payload.is_empty() || f.payload.len() >= 2, "{f:?}");
    raw.expect_tcp_closed().unwrap();
    assert_still_serves(&server);
}

#[test]
fn utf8_split_at_every_offset_across_fragments_is_accepted() {
    let server = Server::open();
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("utf");
    let mut raw = Raw::open(&server);
    let data = "aé€😀";
    let template = |id: usize| {
        format!(r#"{{"op":"publish","channel":"utf","data":"{data}","id":"u{id:02}"}}"#)
    };
    let len = template(0).len();
    let data_at = template(0).find(data).unwrap();
    // Every cut inside and around the 2-, 3- and 4-byte characters, and
    // the empty first and last fragments.
    let cuts: Vec<usize> = (0..=data.len())
        .map(|i| data_at + i)
        .chain([0, len])
        .collect();
    let mut bytes = Vec::new();
    for (id, &cut) in cuts.iter().enumerate() {
        let msg = template(id).into_bytes();
        assert_eq!(msg.len(), len);
        bytes.extend(frame(TEXT_START, &msg[..cut]));
        bytes.extend(frame(CONT_FIN, &msg[cut..]));
    }
    // The same split over three fragments, cutting one character twice.
    let three = template(cuts.len()).into_bytes();
    let emoji_at = data_at + data.find('😀').unwrap();
    bytes.extend(frame(TEXT_START, &three[..emoji_at + 1]));
    bytes.extend(frame(CONT, &three[emoji_at + 1..emoji_at + 3]));
    bytes.extend(frame(CONT_FIN, &three[emoji_at + 3..]));
    raw.send(&bytes);
    for id in 0..=cuts.len() {
        assert_eq!(
            raw.next_json().unwrap(),
            json!({"op":"ack","id":format!("u{id:02}")}),
            "message {id}"
        );
        assert_eq!(
            sub.recv_json(),
            json!({"op":"message","channel":"utf","data":data}),
            "message {id}"
        );
    }
}

#[test]
fn binary_fragments_are_reassembled() {
    let server = Server::open();
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("bin");
    let mut raw = Raw::open(&server);
    let mut msg = vec![3u8];
    msg.extend_from_slice(b"bin");
    msg.extend((0..=255u8).collect::<Vec<_>>());
    raw.send(&cat(&[
        frame(0x02, &msg[..2]),
        frame(PING, b""),
        frame(CONT_FIN, &msg[2..]),
        frame(TEXT, br#"{"op":"ping","id":1}"#),
    ]));
    let pong = raw.next().unwrap();
    assert_eq!((pong.opcode, pong.payload.len()), (0xA, 0));
    assert_eq!(raw.next_json().unwrap(), json!({"op":"pong","id":1}));
    match sub.recv() {
        Message::Binary(b) => assert_eq!(&b[..], &msg[..]),
        other => panic!("binary expected, got {other:?}"),
    }
}
