//! Server-to-client WebSocket frames (RFC 6455 §5.2), built once into
//! shared [`Bytes`].
//!
//! Server frames are never masked (§5.1) and never fragmented here. Headers
//! are written by tungstenite's [`FrameHeader::format`]; this module only
//! sizes the buffer so each frame costs exactly one allocation.

use bytes::{BufMut, Bytes, BytesMut};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Bytes a server frame header takes for a payload of `len` bytes.
pub const fn header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= u16::MAX as usize {
        4
    } else {
        10
    }
}

/// Starts a frame: a buffer with room for the whole frame and its header written.
pub fn start(opcode: OpCode, payload_len: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(header_len(payload_len) + payload_len);
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    // Writing into a BytesMut cannot fail.
    let _ = header.format(payload_len as u64, &mut (&mut buf).writer());
    buf
}

fn whole(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = start(opcode, payload.len());
    buf.extend_from_slice(payload);
    buf.freeze()
}

/// A text frame holding `payload` (which must be UTF-8).
pub fn text(payload: &[u8]) -> Bytes {
    whole(OpCode::Data(Data::Text), payload)
}

/// A binary frame holding `payload`.
pub fn binary(payload: &[u8]) -> Bytes {
    whole(OpCode::Data(Data::Binary), payload)
}

/// An empty ping (§5.5.2), the server's keep-alive probe.
pub fn ping() -> Bytes {
    whole(OpCode::Control(Control::Ping), &[])
}

/// A ping carrying `payload` (at most 125 bytes, §5.5), which the peer's
/// pong echoes.
pub fn ping_with(payload: &[u8]) -> Bytes {
    whole(OpCode::Control(Control::Ping), payload)
}

/// A pong answering a ping's `payload` (§5.5.3: same application data).
pub fn pong(payload: &[u8]) -> Bytes {
    whole(OpCode::Control(Control::Pong), payload)
}

/// A close frame (§5.5.1). `code = None` sends an empty close body.
/// The reason is cut, on a character boundary, to fit the 125-byte limit.
pub fn close(code: Option<u16>, reason: &str) -> Bytes {
    let Some(code) = code else {
        return whole(OpCode::Control(Control::Close), &[]);
    };
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut body = Vec::with_capacity(2 + end);
    body.extend_from_slice(&code.to_be_bytes());
    body.extend_from_slice(&reason.as_bytes()[..end]);
    whole(OpCode::Control(Control::Close), &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(frame: &[u8]) -> (FrameHeader, u64, usize) {
        let mut c = Cursor::new(frame);
        let (h, len) = FrameHeader::parse(&mut c).unwrap().unwrap();
        (h, len, c.position() as usize)
    }

    #[test]
    fn header_lengths_at_every_boundary() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            let f = binary(&payload);
            let (h, plen, hlen) = parse(&f);
            assert_eq!(plen as usize, len);
            assert_eq!(hlen, header_len(len), "len {len}");
            assert_eq!(f.len(), hlen + len);
            assert!(h.is_final && h.mask.is_none());
            assert_eq!(&f[hlen..], &payload[..]);
        }
    }

    #[test]
    fn close_frame_carries_code_and_fits_control_limit() {
        let f = close(Some(4008), "slow consumer");
        let (h, len, hl) = parse(&f);
        assert_eq!(h.opcode, OpCode::Control(Control::Close));
        assert_eq!(&f[hl..hl + 2], &4008u16.to_be_bytes());
        assert_eq!(len as usize, 2 + "slow consumer".len());
        let long = "é".repeat(100);
        let (_, len, _) = parse(&close(Some(1000), &long));
        assert!(len <= 125);
        assert_eq!(close(None, "").len(), 2);
    }
}
