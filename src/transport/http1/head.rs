//! HTTP/1.1 request heads (parsed by `httparse`) and the WebSocket opening
//! handshake of RFC 6455 §4.2, plus the plain HTTP responses herald sends.
//!
//! Pure: bytes in, values out. The IO side lives in `http.rs`.

use tungstenite::handshake::derive_accept_key;

/// Most headers accepted in one request.
const MAX_HEADERS: usize = 64;

/// A request head that cannot be served; `status` is the HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {reason}")]
pub struct HttpError {
    pub status: u16,
    pub reason: String,
}

impl HttpError {
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        HttpError {
            status,
            reason: reason.into(),
        }
    }
}

/// A byte range of [`RequestHead::raw`].
type Span = (u16, u16);

/// A parsed request head: its bytes, copied once into one buffer, and
/// where each part lies in them. One allocation for the bytes and one for
/// the header index, whatever the number of headers: a handshake's
/// short-lived strings would otherwise be scattered among the long-lived
/// objects of established connections, and keep their memory pages.
#[derive(Debug, Clone, Default)]
pub struct RequestHead {
    raw: Box<[u8]>,
    method: Span,
    /// The path without the query.
    path: Span,
    query: Option<Span>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// (name, value) of each header, in order.
    headers: Vec<(Span, Span)>,
}

impl RequestHead {
    fn text(&self, (start, end): Span) -> &str {
        // Every span was checked to be UTF-8 when the head was parsed.
        std::str::from_utf8(&self.raw[usize::from(start)..usize::from(end)]).unwrap_or("")
    }

    pub fn method(&self) -> &str {
        self.text(self.method)
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.text(self.path)
    }

    /// The query string (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.query.map(|q| self.text(q))
    }

    /// Every header as (name, value), in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> + Clone + '_ {
        self.headers
            .iter()
            .map(|&(k, v)| (self.text(k), self.text(v)))
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Does a comma-separated header contain `token` (case-insensitive)?
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Is this a request to switch to WebSocket (it has `Upgrade: websocket`)?
    pub fn wants_websocket(&self) -> bool {
        self.header_has_token("upgrade", "websocket")
    }

    /// Should the HTTP connection stay open after the response?
    pub fn keep_alive(&self) -> bool {
        if self.minor_version == 0 {
            self.header_has_token("connection", "keep-alive")
        } else {
            !self.header_has_token("connection", "close")
        }
    }

    /// The declared body length (RFC 9112 §6.3). A request whose framing
    /// two parties could read differently is refused with 400 rather than
    /// guessed at (request smuggling): more than one `Content-Length`
    /// header, a value that is not plain digits (`+5`, `5, 5`, `0x10`),
    /// or `Transfer-Encoding` together with `Content-Length`. Chunked
    /// bodies alone are refused with 411.
    pub fn content_length(&self) -> Result<usize, HttpError> {
        let mut lengths = self
            .headers()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v);
        let first = lengths.next();
        if lengths.next().is_some() {
            return Err(HttpError::new(400, "more than one Content-Length header"));
        }
        let chunked = self.header("transfer-encoding").is_some();
        match (first, chunked) {
            (Some(_), true) => Err(HttpError::new(
                400,
                "both Transfer-Encoding and Content-Length: the body's length is ambiguous",
            )),
            (None, true) => Err(HttpError::new(
                411,
                "chunked bodies are not supported: send Content-Length",
            )),
            (None, false) => Ok(0),
            (Some(v), false) => {
                // §6.3: 1*DIGIT, nothing else (Rust's parse would take "+5").
                let v = v.trim_matches(|c| c == ' ' || c == '\t');
                if v.is_empty() || v.len() > 18 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HttpError::new(400, "invalid Content-Length"));
                }
                v.parse()
                    .map_err(|_| HttpError::new(400, "invalid Content-Length"))
            }
        }
    }

    /// Does the request declare a body (any framing header)?
    pub fn has_body_framing(&self) -> bool {
        self.headers().any(|(k, _)| {
            k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
        })
    }
}

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete.
/// On success also returns the head's length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(431, "too many headers"))
        }
        Err(e) => return Err(HttpError::new(400, format!("malformed HTTP request: {e}"))),
    };
    // Spans are 16-bit: a longer head is refused (the server reads at
    // most 16 KiB of head anyway).
    if len > usize::from(u16::MAX) {
        return Err(HttpError::new(431, "request head too large"));
    }
    // Where each borrowed part lies in `buf`.
    let base = buf.as_ptr() as usize;
    let span = |part: &[u8]| -> Span {
        let start = part.as_ptr() as usize - base;
        (start as u16, (start + part.len()) as u16)
    };
    let empty = (0, 0);
    let target = req.path.unwrap_or("");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (span(p.as_bytes()), Some(span(q.as_bytes()))),
        None => (span(target.as_bytes()), None),
    };
    let path = if target.is_empty() { empty } else { path };
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        if std::str::from_utf8(h.value).is_err() {
            return Err(HttpError::new(
                400,
                format!("header {} is not UTF-8", h.name),
            ));
        }
        headers.push((span(h.name.as_bytes()), span(h.value)));
    }
    let method = req.method.map_or(empty, |m| span(m.as_bytes()));
    let minor_version = req.version.unwrap_or(1);
    Ok(Some((
        RequestHead {
            raw: buf[..len].into(),
            method,
            path,
            query,
            minor_version,
            headers,
        },
        len,
    )))
}

/// Checks an upgrade request (§4.2.1) and returns the `Sec-WebSocket-Accept` value.
pub fn accept_key(req: &RequestHead) -> Result<String, HttpError> {
    if req.method() != "GET" {
        return Err(HttpError::new(405, "WebSocket upgrade requires GET"));
    }
    if req.minor_version < 1 {
        return Err(HttpError::new(400, "WebSocket upgrade requires HTTP/1.1"));
    }
    if !req.header_has_token("connection", "upgrade") {
        return Err(HttpError::new(400, "missing 'Connection: Upgrade' header"));
    }
    match req.header("sec-websocket-version").map(str::trim) {
        Some("13") => {}
        Some(_) => {
            return Err(HttpError::new(
                426,
                "unsupported Sec-WebSocket-Version: only 13 is supported",
            ))
        }
        None => return Err(HttpError::new(400, "missing Sec-WebSocket-Version header")),
    }
    let key = req
        .header("sec-websocket-key")
        .map(str::trim)
        .ok_or_else(|| HttpError::new(400, "missing Sec-WebSocket-Key header"))?;
    // §4.1: the key is 16 random bytes, base64-encoded: 24 characters ending in "==".
    let valid = key.len() == 24
        && key.ends_with("==")
        && key[..22]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
    if !valid {
        return Err(HttpError::new(
            400,
            "invalid Sec-WebSocket-Key: expected 16 base64-encoded bytes",
        ));
    }
    Ok(derive_accept_key(key.as_bytes()))
}

/// Is the request's `Origin` acceptable (CHECK_ORIGIN)? A request without
/// `Origin` comes from a non-browser client and is accepted. With no
/// configured list, the origin's host must equal the `Host` header (the
/// same-origin rule); otherwise it must be listed exactly (or `*`).
pub fn origin_allowed(req: &RequestHead, allowed: &[String]) -> bool {
    let Some(origin) = req.header("origin").map(|o| o.trim().trim_end_matches('/')) else {
        return true;
    };
    if allowed.is_empty() {
        let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
        return req
            .header("host")
            .is_some_and(|h| h.trim().eq_ignore_ascii_case(origin_host));
    }
    allowed.iter().any(|a| {
        let a = a.trim().trim_end_matches('/');
        a == "*" || a.eq_ignore_ascii_case(origin)
    })
}

/// The `101 Switching Protocols` response.
pub fn switching_protocols(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A complete HTTP response with a body.
pub fn response(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    response_with(status, content_type, body, keep_alive, &[])
}

/// [`response`] with extra headers (e.g. `Allow` on a 405).
pub fn response_with(
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        reason_phrase(status),
        body.len()
    );
    if status == 426 {
        head.push_str("Sec-WebSocket-Version: 13\r\n");
    }
    if status == 401 {
        head.push_str("WWW-Authenticate: Bearer\r\n");
    }
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// A plain-text error response carrying a one-line reason.
pub fn error_response(err: &HttpError) -> Vec<u8> {
    let mut body = err.reason.clone();
    body.push('\n');
    // A 405 here refuses a WebSocket upgrade, which only GET may request.
    let allow: &[(&str, &str)] = if err.status == 405 {
        &[("Allow", "GET")]
    } else {
        &[]
    };
    response_with(
        err.status,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        false,
        allow,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /ws?auth=abc HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nEXTRA";

    #[test]
    fn parses_upgrade_and_derives_rfc_accept_key() {
        let (head, len) = parse_head(UPGRADE).unwrap().unwrap();
        assert_eq!(&UPGRADE[len..], b"EXTRA");
        assert_eq!(head.path(), "/ws");
        assert_eq!(head.query(), Some("auth=abc"));
        assert_eq!(head.method(), "GET");
        assert_eq!(head.header("HOST"), Some("x"));
        assert_eq!(head.headers().count(), 5);
        assert!(head.wants_websocket());
        // The example of RFC 6455 §1.3.
        assert_eq!(accept_key(&head).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn a_head_longer_than_its_spans_is_refused() {
        let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 70_000));
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&raw).unwrap_err().status, 431);
    }

    #[test]
    fn incomplete_and_malformed_heads() {
        assert!(parse_head(&UPGRADE[..20]).unwrap().is_none());
        assert_eq!(parse_head(b"GARBAGE\x01\r\n\r\n").unwrap_err().status, 400);
    }

    #[test]
    fn bad_upgrades_are_refused_with_reasons() {
        let base = String::from_utf8_lossy(UPGRADE).replace("EXTRA", "");
        let cases = [
            ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "", 400),
            (
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Key: short",
                400,
            ),
            ("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8", 426),
            ("Sec-WebSocket-Version: 13\r\n", "", 400),
            (
                "Connection: keep-alive, Upgrade",
                "Connection: keep-alive",
                400,
            ),
            ("GET", "POST", 405),
        ];
        for (from, to, status) in cases {
            let req = base.replacen(from, to, 1);
            let (head, _) = parse_head(req.as_bytes()).unwrap().unwrap();
            assert_eq!(
                accept_key(&head).unwrap_err().status,
                status,
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn keep_alive_rules() {
        let (h, _) = parse_head(b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive());
        assert_eq!(h.content_length().unwrap(), 5);
        let (h, _) = parse_head(b"POST / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive());
        let (h, _) = parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.content_length().unwrap_err().status, 411);
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        let len = |headers: &str| {
            let raw = format!("POST /publish HTTP/1.1\r\n{headers}\r\n");
            parse_head(raw.as_bytes())
                .unwrap()
                .unwrap()
                .0
                .content_length()
        };
        assert_eq!(len("Content-Length:  12 \r\n"), Ok(12));
        assert_eq!(len(""), Ok(0));
        for bad in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5\r\ncontent-length: 5\r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: 0x10\r\n",
            "Content-Length: \r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ] {
            assert_eq!(len(bad).unwrap_err().status, 400, "{bad:?}");
        }
        assert_eq!(
            len("Transfer-Encoding: gzip, chunked\r\n")
                .unwrap_err()
                .status,
            411
        );
    }

    #[test]
    fn responses_are_well_formed() {
        let r = String::from_utf8(response(202, "application/json", b"{}", true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 202 Accepted\r\n"));
        assert!(r.contains("Content-Length: 2\r\n") && r.ends_with("\r\n\r\n{}"));
        let e = String::from_utf8(error_response(&HttpError::new(401, "token expired"))).unwrap();
        assert!(e.starts_with("HTTP/1.1 401") && e.ends_with("token expired\n"));
    }

    #[test]
    fn origin_rules() {
        let req = |origin: &str| {
            let raw =
                format!("GET / HTTP/1.1\r\nHost: app.example:8080\r\nOrigin: {origin}\r\n\r\n");
            parse_head(raw.as_bytes()).unwrap().unwrap().0
        };
        assert!(origin_allowed(&req("https://app.example:8080"), &[]));
        assert!(!origin_allowed(&req("https://evil.example"), &[]));
        let list = vec!["https://a.example".to_string()];
        assert!(origin_allowed(&req("https://a.example/"), &list));
        assert!(!origin_allowed(&req("https://b.example"), &list));
        assert!(origin_allowed(
            &req("https://b.example"),
            &["*".to_string()]
        ));
        let (no_origin, _) = parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(origin_allowed(&no_origin, &list));
    }
}
