//! Connecting the command-line client: the `--url` and `--token` arguments,
//! and one blocking WebSocket connection (tungstenite over a std
//! `TcpStream`) carrying the token in `Authorization: Bearer`.
//!
//! Plain `ws://` only: the client links no TLS stack, and says so for
//! `wss://`. A failed connection is classified here as worth retrying (the
//! server is away or busy) or final (refused for a reason a retry does not
//! fix); `sub` decides what to do with that, this module never sleeps.

use std::fmt;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use clap::Args;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::{header::AUTHORIZATION, HeaderValue, Uri};
use tungstenite::{HandshakeError, WebSocket};

/// Where the client connects when neither `--url` nor `HERALD_URL` is set.
pub const DEFAULT_URL: &str = "ws://127.0.0.1:6380/ws";

/// How long a TCP connect or an opening handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The arguments every connecting subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// WebSocket URL of the server (ws:// only: the client does not speak TLS).
    #[arg(long, env = "HERALD_URL", default_value = DEFAULT_URL, value_parser = parse_url)]
    pub url: Endpoint,

    /// Token sent as `Authorization: Bearer <TOKEN>` (not needed in open mode).
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true, value_parser = parse_token)]
    pub token: Option<String>,
}

/// A validated `ws://` URL and the address it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// Parses `--url`: a `ws://host[:port][/path][?query]` URL (port 80 when absent).
pub fn parse_url(s: &str) -> Result<Endpoint, String> {
    let uri: Uri = s
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected e.g. {DEFAULT_URL}"))?;
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => {
            return Err("TLS (wss://) is not supported by the command-line client; \
                        use ws:// (through a local TLS proxy if needed)"
                .into())
        }
        Some(other) => return Err(format!("unsupported scheme '{other}': expected ws://")),
        None => return Err(format!("expected a ws:// URL such as {DEFAULT_URL}")),
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or("missing host")?;
    // IPv6 literals come bracketed; the resolver wants them bare.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(Endpoint {
        url: s.to_string(),
        host: host.to_string(),
        port: uri.port_u16().unwrap_or(80),
    })
}

/// Parses `--token`: anything that fits an HTTP header after `Bearer `.
pub fn parse_token(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty token".into());
    }
    bearer(t)?;
    Ok(t.to_string())
}

fn bearer(token: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "a token must be printable ASCII".to_string())
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {url}: {source}")]
    Io {
        url: String,
        #[source]
        source: io::Error,
    },
    /// The server answered the upgrade with an HTTP status instead of 101.
    #[error("{url} refused the WebSocket with HTTP {status}: {reason}")]
    Refused {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("WebSocket handshake with {url} failed: {source}")]
    Handshake {
        url: String,
        #[source]
        source: tungstenite::Error,
    },
}

impl ConnectError {
    /// Could a later attempt succeed without the user changing anything?
    /// Network errors and "busy" statuses (408, 429, 5xx) could; 401 (bad
    /// token), 403 (origin, or the authorizer said no), 404 and handshake
    /// protocol errors would only repeat.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::Io { .. } => true,
            ConnectError::Refused { status, .. } => {
                matches!(status, 408 | 429) || (500..600).contains(status)
            }
            ConnectError::Handshake { source, .. } => matches!(
                source,
                tungstenite::Error::Io(_)
                    | tungstenite::Error::ConnectionClosed
                    | tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::HandshakeIncomplete
                    )
            ),
        }
    }
}

/// Opens a WebSocket to `args.url` with `args.token`. The returned stream
/// still has the handshake's read timeout; callers set their own.
pub fn connect(args: &ConnArgs) -> Result<WebSocket<TcpStream>, ConnectError> {
    let ep = &args.url;
    let io_err = |source| ConnectError::Io {
        url: ep.url.clone(),
        source,
    };
    let stream = tcp_connect(&ep.host, ep.port).map_err(io_err)?;
    stream.set_nodelay(true).map_err(io_err)?;
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(io_err)?;
    stream
        .set_write_timeout(Some(CONNECT_TIMEOUT))
        .map_err(io_err)?;

    let handshake_err = |source| ConnectError::Handshake {
        url: ep.url.clone(),
        source,
    };
    let mut request = ep
        .url
        .as_str()
        .into_client_request()
        .map_err(handshake_err)?;
    if let Some(token) = &args.token {
        let value = bearer(token).map_err(|e| {
            handshake_err(tungstenite::Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                e,
            )))
        })?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    match tungstenite::client::client(request, stream) {
        Ok((ws, _response)) => Ok(ws),
        Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
            let status = response.status();
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let body = super::one_line(&body);
            let reason = if body.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("no reason given")
                    .to_string()
            } else {
                body
            };
            Err(ConnectError::Refused {
                url: ep.url.clone(),
                status: status.as_u16(),
                reason,
            })
        }
        Err(HandshakeError::Failure(e)) => Err(handshake_err(e)),
        // A blocking stream only "would block" when its timeout expired.
        Err(HandshakeError::Interrupted(_)) => Err(io_err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no answer to the WebSocket handshake within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        ))),
    }
}

/// Connects to the first address of `host` that answers.
fn tcp_connect(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Did a read end because the socket's read timeout expired?
pub fn is_timeout(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io)
        if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// Did a read end because a signal arrived? Sockets with a timeout are not
/// restarted after a signal handler even with `SA_RESTART` (signal(7)); no
/// bytes were consumed, so the read can simply be repeated.
pub fn is_interrupted(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::Interrupted)
}

/// A close frame in words: `close 1001 (going away: "shutting down")`.
pub fn describe_close(code: u16, reason: &str) -> String {
    let meaning = match code {
        1000 => "normal closure",
        1001 => "server going away",
        1002 => "protocol error",
        1003 => "unsupported data",
        1005 => "no status code",
        1006 => "abnormal closure",
        1007 => "invalid data",
        1008 => "policy violation",
        1009 => "message too big",
        1011 => "server error",
        1012 => "server restarting",
        1013 => "try again later",
        4001 => "token expired or revoked",
        4008 => "slow consumer: too much unsent output",
        _ => "",
    };
    let reason = super::one_line(reason);
    match (meaning.is_empty(), reason.is_empty()) {
        (true, true) => format!("close {code}"),
        (true, false) => format!("close {code}: {reason}"),
        (false, true) => format!("close {code}, {meaning}"),
        (false, false) => format!("close {code}, {meaning}: {reason}"),
    }
}

/// Turns a read or write error into the words "connection lost (..)" needs.
pub fn describe_error(e: &tungstenite::Error) -> String {
    use tungstenite::error::ProtocolError;
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            "connection closed".into()
        }
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            "connection closed without a close frame".into()
        }
        tungstenite::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls_are_parsed() {
        let ep = parse_url("ws://127.0.0.1:6380/ws").unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("127.0.0.1", 6380));
        let ep = parse_url("ws://example.com/ws?auth=x").unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("example.com", 80));
        let ep = parse_url("ws://[::1]:7000/").unwrap();
        assert_eq!((ep.host.as_str(), ep.port), ("::1", 7000));
        assert_eq!(ep.to_string(), "ws://[::1]:7000/");
    }

    #[test]
    fn other_urls_are_refused_with_a_reason() {
        assert!(parse_url("wss://example.com/ws")
            .unwrap_err()
            .contains("TLS"));
        assert!(parse_url("http://example.com/ws")
            .unwrap_err()
            .contains("'http'"));
        assert!(parse_url("127.0.0.1:6380").is_err());
        assert!(parse_url("not a url").is_err());
    }

    #[test]
    fn tokens_must_fit_a_header() {
        assert_eq!(parse_token(" abc.def.ghi \n").unwrap(), "abc.def.ghi");
        assert!(parse_token("").is_err());
        assert!(parse_token("a\u{1}b").is_err());
    }

    #[test]
    fn refusals_are_retryable_only_when_the_server_is_busy_or_away() {
        let refused = |status| ConnectError::Refused {
            url: "ws://h/ws".into(),
            status,
            reason: String::new(),
        };
        assert!(refused(503).is_retryable());
        assert!(refused(429).is_retryable());
        assert!(!refused(401).is_retryable());
        assert!(!refused(403).is_retryable());
        assert!(!refused(404).is_retryable());
        let io = ConnectError::Io {
            url: "ws://h/ws".into(),
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        assert!(io.is_retryable());
    }

    #[test]
    fn close_frames_are_described() {
        assert_eq!(describe_close(1001, ""), "close 1001, server going away");
        assert_eq!(
            describe_close(4001, "token expired"),
            "close 4001, token expired or revoked: token expired"
        );
        assert_eq!(describe_close(4999, ""), "close 4999");
        assert_eq!(describe_close(4999, "why"), "close 4999: why");
    }
}
