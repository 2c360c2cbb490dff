//! Minimal RFC 6455 client side: a hand-made HTTP/1.1 upgrade, masked client
//! frames, and an incremental reader of the server's (unmasked) frames.

use std::io;

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt};

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest frame the reader accepts (bigger means a broken stream).
pub const MAX_FRAME: usize = 64 << 20;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value the server must answer to `key`.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A random-enough 16-byte key, base64-encoded.
pub fn new_key(rng: &mut Mask) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The upgrade request for `path` on `host`.
pub fn handshake_request(host: &str, path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Why an upgrade failed.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// The server answered with another status than 101.
    Refused(u16),
    /// Not an HTTP response, or a 101 without the right accept key.
    Invalid(String),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Refused(s) => write!(f, "upgrade refused with HTTP {s}"),
            HandshakeError::Invalid(m) => write!(f, "bad upgrade response: {m}"),
        }
    }
}

/// Parses the server's answer to the upgrade: `Ok(None)` while the head is
/// incomplete, `Ok(Some(head_len))` for a valid 101.
pub fn parse_handshake_response(buf: &[u8], key: &str) -> Result<Option<usize>, HandshakeError> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 16 * 1024 {
            return Err(HandshakeError::Invalid("response head over 16 KiB".into()));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end])
        .map_err(|_| HandshakeError::Invalid("response head is not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HandshakeError::Invalid(format!(
            "status line {status_line:?}"
        )));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HandshakeError::Invalid(format!("status line {status_line:?}")))?;
    if status != 101 {
        return Err(HandshakeError::Refused(status));
    }
    let want = accept_key(key);
    let ok = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == want
        })
    });
    if !ok {
        return Err(HandshakeError::Invalid(
            "missing or wrong Sec-WebSocket-Accept".into(),
        ));
    }
    Ok(Some(end + 4))
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// xorshift64* generator for masking keys (RFC 6455 wants unpredictable
/// keys against proxies; this only has to be cheap and non-constant).
pub struct Mask(u64);

impl Mask {
    pub fn new(seed: u64) -> Mask {
        Mask(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn key(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_le_bytes()
    }
}

/// XORs `data` with the 4-byte `key`, starting at key offset 0.
pub fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let k32 = u32::from_ne_bytes(key) as u64;
    let k64 = k32 | (k32 << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().unwrap()) ^ k64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Appends one final, masked client frame carrying `payload`.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], key: [u8; 4]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    let at = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[at..], key);
}

/// A close frame with `code`.
pub fn write_close(out: &mut Vec<u8>, code: u16, key: [u8; 4]) {
    write_frame(out, OP_CLOSE, &code.to_be_bytes(), key);
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    pub header_len: usize,
    pub payload_len: usize,
    pub mask: Option<[u8; 4]>,
}

impl FrameHead {
    pub fn total(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses a frame header at the start of `buf`; `Ok(None)` if incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<FrameHead>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(format!("reserved bits set in frame header {b0:#04x}"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    if !matches!(
        opcode,
        OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(format!("unknown opcode {opcode:#x}"));
    }
    let masked = b1 & 0x80 != 0;
    let len7 = (b1 & 0x7F) as usize;
    let (payload_len, mut at) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let v = u64::from_be_bytes(buf[2..10].try_into().unwrap());
            if v > MAX_FRAME as u64 {
                return Err(format!("frame of {v} bytes"));
            }
            (v as usize, 10)
        }
        n => (n, 2),
    };
    if opcode >= OP_CLOSE && (payload_len > 125 || !fin) {
        return Err("bad control frame".into());
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let k = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(k)
    } else {
        None
    };
    Ok(Some(FrameHead {
        fin,
        opcode,
        header_len: at,
        payload_len,
        mask,
    }))
}

/// An incremental reader of server frames over one growable buffer.
pub struct Reader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Reader {
    pub fn new(capacity: usize) -> Reader {
        Reader {
            buf: vec![0; capacity.max(256)],
            start: 0,
            end: 0,
        }
    }

    /// Bytes received but not consumed yet.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Marks `n` pending bytes as consumed (used after the HTTP head).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends bytes as if they had been read (tests).
    #[cfg(test)]
    pub fn push(&mut self, data: &[u8]) {
        self.reserve(data.len());
        self.buf[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// Makes room for at least `want` more bytes after `end`.
    fn reserve(&mut self, want: usize) {
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            let new_len = (self.end + want).max(self.buf.len() * 2);
            self.buf.resize(new_len, 0);
        }
    }

    /// One `read` from `r`; returns the byte count (0 at end of stream).
    pub async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<usize> {
        // Keep room for a whole frame when its header says it is big.
        let mut want = 1024.min(self.buf.len());
        if let Ok(Some(h)) = parse_head(self.pending()) {
            want = want.max(h.total().saturating_sub(self.end - self.start));
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        self.reserve(want);
        let n = r.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Calls `f` on every complete frame buffered (payload unmasked), then
    /// drops them from the buffer.
    pub fn frames(&mut self, mut f: impl FnMut(&FrameHead, &[u8])) -> Result<(), String> {
        while let Some(h) = parse_head(&self.buf[self.start..self.end])? {
            if self.end - self.start < h.total() {
                break;
            }
            let p0 = self.start + h.header_len;
            let p1 = p0 + h.payload_len;
            if let Some(k) = h.mask {
                apply_mask(&mut self.buf[p0..p1], k);
            }
            f(&h, &self.buf[p0..p1]);
            self.start = p1;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked).
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let n = payload.len();
        if n < 126 {
            v.push(n as u8);
        } else if n <= 65535 {
            v.push(126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn handshake_response_checks_status_and_accept() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nXY";
        assert_eq!(parse_handshake_response(ok, key), Ok(Some(ok.len() - 2)));
        assert_eq!(parse_handshake_response(&ok[..20], key), Ok(None));
        let refused = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            parse_handshake_response(refused, key),
            Err(HandshakeError::Refused(503))
        );
        let wrong = b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert!(matches!(
            parse_handshake_response(wrong, key),
            Err(HandshakeError::Invalid(_))
        ));
    }

    #[test]
    fn client_frames_are_masked_with_all_length_forms() {
        for n in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            write_frame(&mut out, OP_TEXT, &payload, [1, 2, 3, 4]);
            let h = parse_head(&out).unwrap().unwrap();
            assert!(h.fin);
            assert_eq!(h.opcode, OP_TEXT);
            assert_eq!(h.payload_len, n);
            assert_eq!(h.mask, Some([1, 2, 3, 4]));
            assert_eq!(out.len(), h.total());
            let mut body = out[h.header_len..].to_vec();
            apply_mask(&mut body, [1, 2, 3, 4]);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn mask_matches_bytewise_definition() {
        let key = [0xA1, 0x02, 0xF3, 0x44];
        let data: Vec<u8> = (0..37u8).collect();
        let mut fast = data.clone();
        apply_mask(&mut fast, key);
        let slow: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(fast, slow);
    }

    #[test]
    fn head_parser_waits_for_bytes_and_rejects_garbage() {
        let f = server_frame(true, OP_BINARY, &[7u8; 300]);
        assert_eq!(parse_head(&f[..1]), Ok(None));
        assert_eq!(parse_head(&f[..3]), Ok(None));
        assert_eq!(parse_head(&f).unwrap().unwrap().payload_len, 300);
        assert!(parse_head(&[0xF1, 0]).is_err()); // RSV bits
        assert!(parse_head(&[0x83, 0]).is_err()); // opcode 3
        assert!(parse_head(&[0x09, 0]).is_err()); // fragmented ping
    }

    #[test]
    fn reader_splits_frames_across_reads() {
        let mut all = Vec::new();
        all.extend(server_frame(true, OP_TEXT, b"hello"));
        all.extend(server_frame(false, OP_BINARY, &[1u8; 200]));
        all.extend(server_frame(true, OP_CONT, &[2u8; 70000]));
        all.extend(server_frame(true, OP_PING, b"p"));
        let mut r = Reader::new(256);
        let mut seen = Vec::new();
        for chunk in all.chunks(97) {
            r.push(chunk);
            r.frames(|h, p| seen.push((h.opcode, h.fin, p.len(), p.first().copied())))
                .unwrap();
        }
        assert_eq!(
            seen,
            vec![
                (OP_TEXT, true, 5, Some(b'h')),
                (OP_BINARY, false, 200, Some(1)),
                (OP_CONT, true, 70000, Some(2)),
                (OP_PING, true, 1, Some(b'p')),
            ]
        );
        assert!(r.pending().is_empty());
    }
}
