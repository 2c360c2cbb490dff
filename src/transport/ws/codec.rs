//! Client-to-server WebSocket frames (RFC 6455 §5): header parsing (by
//! tungstenite's [`FrameHeader::parse`]), unmasking in place, reassembly of
//! fragmented messages, UTF-8 validation and the size limit.
//!
//! Sans-IO: [`Decoder::decode`] takes the bytes received so far and returns
//! either "incomplete" (distinct from invalid) or one frame's worth of
//! progress, with the finished message borrowed from the input or from the
//! decoder's reassembly buffer. It never allocates for an unfragmented
//! message: the payload is unmasked where it was received.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// A reassembly buffer larger than this is freed once its message is handled.
const KEEP_REASSEMBLY: usize = 64 * 1024;

/// Why the connection must be failed; each maps to a close code (§7.4.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    #[error("message of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: u64, max: usize },
}

impl WsError {
    /// The close code to fail the connection with.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => 1002,
            WsError::InvalidUtf8 => 1007,
            WsError::TooLarge { .. } => 1009,
        }
    }
}

/// A complete message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    /// A pong and the payload it echoes.
    Pong(&'a [u8]),
    /// The peer's close: its code and reason, if it sent a body.
    Close(Option<(u16, &'a str)>),
}

/// Result of one [`Decoder::decode`] call.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// More bytes are needed. `frame_len` is the whole frame's size once its
    /// header is known (so the caller can reserve), else 0.
    Incomplete { frame_len: usize },
    /// One frame was consumed (`consumed` bytes of input); it finished a
    /// message when `message` is `Some`.
    Frame {
        consumed: usize,
        message: Option<Message<'a>>,
    },
}

struct Partial {
    text: bool,
    /// Bytes of `buf` already known to be valid UTF-8 (text only).
    checked: usize,
}

/// Decodes the frames a client sends on one connection.
pub struct Decoder {
    max_message: usize,
    partial: Option<Partial>,
    buf: Vec<u8>,
    /// `buf` holds a message handed out by the previous call.
    handed_out: bool,
}

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Decoder {
            max_message,
            partial: None,
            buf: Vec::new(),
            handed_out: false,
        }
    }

    /// Decodes the frame at the start of `input`, unmasking it in place.
    pub fn decode<'a>(&'a mut self, input: &'a mut [u8]) -> Result<Decoded<'a>, WsError> {
        if self.handed_out {
            self.handed_out = false;
            self.buf.clear();
            if self.buf.capacity() > KEEP_REASSEMBLY {
                self.buf = Vec::new();
            }
        }
        let mut cursor = Cursor::new(&*input);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(Decoded::Incomplete { frame_len: 0 }),
            // §5.2: opcodes 3-7 and 11-15 are reserved.
            Err(_) => return Err(WsError::Protocol("reserved opcode")),
        };
        let header_len = cursor.position() as usize;
        // §5.2: RSV bits must be 0 unless an extension was negotiated (none is).
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(WsError::Protocol("reserved bits set"));
        }
        // §5.1: a server must fail the connection on an unmasked client frame.
        let Some(mask) = header.mask else {
            return Err(WsError::Protocol("client frame is not masked"));
        };
        match header.opcode {
            OpCode::Control(_) => {
                // §5.5: control frames are never fragmented and carry at most 125 bytes.
                if !header.is_final {
                    return Err(WsError::Protocol("fragmented control frame"));
                }
                if len > 125 {
                    return Err(WsError::Protocol("control frame over 125 bytes"));
                }
            }
            OpCode::Data(_) => {
                let so_far = if self.partial.is_some() {
                    self.buf.len()
                } else {
                    0
                };
                let size = len.saturating_add(so_far as u64);
                if size > self.max_message as u64 {
                    return Err(WsError::TooLarge {
                        size,
                        max: self.max_message,
                    });
                }
            }
        }
        let frame_len = header_len + len as usize;
        if input.len() < frame_len {
            return Ok(Decoded::Incomplete { frame_len });
        }
        let payload = &mut input[header_len..frame_len];
        apply_mask(payload, mask);
        let message = match header.opcode {
            OpCode::Control(Control::Ping) => Some(Message::Ping(payload)),
            OpCode::Control(Control::Pong) => Some(Message::Pong(payload)),
            OpCode::Control(Control::Close) => Some(Message::Close(parse_close(payload)?)),
            // FrameHeader::parse already refused reserved opcodes.
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(WsError::Protocol("reserved opcode"))
            }
            OpCode::Data(Data::Continue) => {
                let Some(partial) = self.partial.as_mut() else {
                    return Err(WsError::Protocol(
                        "continuation frame without a message to continue",
                    ));
                };
                self.buf.extend_from_slice(payload);
                if partial.text {
                    check_utf8(&self.buf, &mut partial.checked, header.is_final)?;
                }
                if header.is_final {
                    let text = partial.text;
                    self.partial = None;
                    self.handed_out = true;
                    Some(if text {
                        Message::Text(&self.buf)
                    } else {
                        Message::Binary(&self.buf)
                    })
                } else {
                    None
                }
            }
            OpCode::Data(data) => {
                if self.partial.is_some() {
                    return Err(WsError::Protocol(
                        "new message started before the previous one finished",
                    ));
                }
                let text = matches!(data, Data::Text);
                if header.is_final {
                    if text {
                        std::str::from_utf8(payload).map_err(|_| WsError::InvalidUtf8)?;
                        Some(Message::Text(payload))
                    } else {
                        Some(Message::Binary(payload))
                    }
                } else {
                    let mut partial = Partial { text, checked: 0 };
                    self.buf.clear();
                    self.buf.extend_from_slice(payload);
                    if text {
                        check_utf8(&self.buf, &mut partial.checked, false)?;
                    }
                    self.partial = Some(partial);
                    None
                }
            }
        };
        Ok(Decoded::Frame {
            consumed: frame_len,
            message,
        })
    }
}

/// §5.5.1: an empty close body, or a 2-byte code plus a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::Protocol("close frame with a 1-byte body")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            // §7.4: 1005, 1006, 1015 and unassigned codes must not be sent.
            if !CloseCode::from(code).is_allowed() {
                return Err(WsError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Validates `buf[*checked..]`, allowing a sequence cut at the end unless
/// `last`; fails as soon as an invalid byte is seen (§8.1).
fn check_utf8(buf: &[u8], checked: &mut usize, last: bool) -> Result<(), WsError> {
    match std::str::from_utf8(&buf[*checked..]) {
        Ok(_) => {
            *checked = buf.len();
            Ok(())
        }
        Err(e) if e.error_len().is_none() && !last => {
            *checked += e.valid_up_to();
            Ok(())
        }
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

/// XORs `buf` with the 4-byte `mask` (§5.3), eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8])) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// Builds a masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 65535 {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&MASK);
        let mut p = payload.to_vec();
        apply_mask_reference(&mut p, MASK);
        out.extend_from_slice(&p);
        out
    }

    fn apply_mask_reference(buf: &mut [u8], mask: [u8; 4]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
    }

    /// Decodes all of `input`, returning owned messages or the first error.
    fn all(d: &mut Decoder, mut input: Vec<u8>) -> Result<Vec<String>, WsError> {
        let mut out = Vec::new();
        let mut off = 0;
        while off < input.len() {
            match d.decode(&mut input[off..])? {
                Decoded::Incomplete { .. } => break,
                Decoded::Frame { consumed, message } => {
                    off += consumed;
                    if let Some(m) = message {
                        out.push(match m {
                            Message::Text(t) => format!("text:{}", String::from_utf8_lossy(t)),
                            Message::Binary(b) => format!("bin:{}", b.len()),
                            Message::Ping(p) => format!("ping:{}", p.len()),
                            Message::Pong(_) => "pong".into(),
                            Message::Close(c) => format!("close:{c:?}"),
                        });
                    }
                }
            }
        }
        Ok(out)
    }

    #[test]
    fn mask_matches_reference_at_every_alignment_and_length() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        for start in 0..8 {
            for len in 0..64 {
                let mut a = data[start..start + len].to_vec();
                let mut b = a.clone();
                apply_mask(&mut a, MASK);
                apply_mask_reference(&mut b, MASK);
                assert_eq!(a, b, "start {start} len {len}");
            }
        }
    }

    #[test]
    fn single_text_and_binary() {
        let mut d = Decoder::new(1024);
        let mut input = frame(0x81, b"hello");
        input.extend(frame(0x82, &[1, 2, 3]));
        assert_eq!(all(&mut d, input).unwrap(), ["text:hello", "bin:3"]);
    }

    #[test]
    fn incomplete_is_not_an_error_at_any_cut() {
        let input = frame(0x81, &[b'a'; 300]);
        for cut in 0..input.len() {
            let mut d = Decoder::new(1024);
            let mut part = input[..cut].to_vec();
            assert!(
                matches!(d.decode(&mut part), Ok(Decoded::Incomplete { .. })),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut d = Decoder::new(1024);
        let mut input = frame(0x01, b"he");
        input.extend(frame(0x89, b"p"));
        input.extend(frame(0x00, b"ll"));
        input.extend(frame(0x80, b"o"));
        assert_eq!(all(&mut d, input).unwrap(), ["ping:1", "text:hello"]);
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted() {
        let s = "aé€😀".as_bytes();
        for cut in 0..s.len() {
            let mut d = Decoder::new(1024);
            let mut input = frame(0x01, &s[..cut]);
            input.extend(frame(0x80, &s[cut..]));
            assert_eq!(all(&mut d, input).unwrap(), ["text:aé€😀"], "cut {cut}");
        }
    }

    #[test]
    fn invalid_utf8_fails_fast_and_at_end() {
        let mut d = Decoder::new(1024);
        // Invalid in the first fragment: fails before the message ends.
        assert_eq!(
            all(&mut d, frame(0x01, b"a\xffb")),
            Err(WsError::InvalidUtf8)
        );
        let mut d = Decoder::new(1024);
        let mut input = frame(0x01, b"a\xe2\x82");
        input.extend(frame(0x80, b""));
        assert_eq!(all(&mut d, input), Err(WsError::InvalidUtf8));
        let mut d = Decoder::new(1024);
        assert_eq!(
            all(&mut d, frame(0x81, b"\xc0\xaf")),
            Err(WsError::InvalidUtf8)
        );
    }

    #[test]
    fn protocol_violations() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (frame(0xC1, b"x"), "rsv1"),
            (frame(0x83, b"x"), "reserved data opcode"),
            (frame(0x8B, b"x"), "reserved control opcode"),
            (frame(0x09, b"x"), "fragmented ping"),
            (frame(0x89, &[0; 126]), "long ping"),
            (frame(0x80, b"x"), "orphan continuation"),
            (frame(0x88, b"\x03"), "1-byte close"),
            (frame(0x88, &999u16.to_be_bytes()), "close code 999"),
            (frame(0x88, &1005u16.to_be_bytes()), "close code 1005"),
            (vec![0x81, 0x01, b'x'], "unmasked"),
        ];
        for (input, what) in cases {
            let mut d = Decoder::new(1024);
            assert!(
                matches!(all(&mut d, input), Err(WsError::Protocol(_))),
                "{what}"
            );
        }
        let mut d = Decoder::new(1024);
        let mut input = frame(0x01, b"a");
        input.extend(frame(0x81, b"b"));
        assert!(matches!(all(&mut d, input), Err(WsError::Protocol(_))));
    }

    #[test]
    fn close_frames() {
        let mut d = Decoder::new(1024);
        assert_eq!(all(&mut d, frame(0x88, b"")).unwrap(), ["close:None"]);
        let mut body = 4000u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"bye");
        assert_eq!(
            all(&mut d, frame(0x88, &body)).unwrap(),
            ["close:Some((4000, \"bye\"))"]
        );
        let mut body = 1000u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"\xff");
        assert_eq!(all(&mut d, frame(0x88, &body)), Err(WsError::InvalidUtf8));
    }

    #[test]
    fn size_limit_applies_before_payload_arrives_and_across_fragments() {
        let mut d = Decoder::new(10);
        let mut header_only = frame(0x82, &[0; 11])[..6].to_vec();
        assert!(matches!(
            d.decode(&mut header_only),
            Err(WsError::TooLarge { size: 11, max: 10 })
        ));
        let mut d = Decoder::new(10);
        let mut input = frame(0x02, &[0; 6]);
        input.extend(frame(0x80, &[0; 6]));
        assert!(matches!(
            all(&mut d, input),
            Err(WsError::TooLarge { size: 12, .. })
        ));
        let mut d = Decoder::new(10);
        assert_eq!(all(&mut d, frame(0x82, &[0; 10])).unwrap(), ["bin:10"]);
    }

    #[test]
    fn large_frame_lengths() {
        let mut d = Decoder::new(1 << 20);
        let payload = vec![7u8; 70_000];
        assert_eq!(all(&mut d, frame(0x82, &payload)).unwrap(), ["bin:70000"]);
        let mut d = Decoder::new(1 << 20);
        let mut input = frame(0x82, &payload);
        match d.decode(&mut input[..100]).unwrap() {
            Decoded::Incomplete { frame_len } => assert_eq!(frame_len, 14 + 70_000),
            other => panic!("{other:?}"),
        }
    }
}
