//! herald's outgoing HTTP/1.1 client (the authorizer webhook and Pusher
//! webhooks): hyper's `client::conn::http1` over monoio sockets, TLS by
//! rustls, and a small keep-alive pool of herald's own.
//!
//! One [`Client`] per thread (each reactor has its own, the webhook thread
//! another): the pool is never shared, never locked. The pool's rules are
//! what makes one request's answer impossible to hand to another:
//!
//! - a connection goes back to the pool only after a complete, correctly
//!   framed response that allows reuse (HTTP/1.1 without `Connection:
//!   close`, or HTTP/1.0 with `Connection: keep-alive`), once hyper reports
//!   it idle again. An error, a timeout or a cancelled request drops it
//!   (hyper closes a connection whose request future is dropped);
//! - idle connections are discarded after [`IDLE_FOR`], or sooner when the
//!   server's `Keep-Alive: timeout=N` says so, and whenever hyper sees the
//!   server close them;
//! - a request that fails on a reused connection before any answer arrives
//!   (the server closed it as we sent) is retried once on a fresh
//!   connection, within the same deadline. Callers whose requests have side
//!   effects can ask for a fresh connection instead ([`Client::post`]'s
//!   `reuse`).
//!
//! Answers are read whole, with or without `Content-Length` (hyper reads a
//! close-delimited body to EOF), up to a size limit.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1;
use monoio::io::IntoPollIo;
use monoio_compat::hyper::MonoioIo;
use prometheus_client::metrics::histogram::Histogram;

/// Longest an idle pooled connection is kept (below the 5 s keep-alive of
/// Node's and Apache's defaults, so the server rarely closes it first).
pub const IDLE_FOR: Duration = Duration::from_secs(4);
/// Most idle connections kept per origin.
const MAX_IDLE: usize = 256;
/// How long a resolved host name is reused.
const DNS_TTL: Duration = Duration::from_secs(30);

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS with {host} failed: {source}")]
    Tls { host: String, source: io::Error },
    #[error("no trusted root certificates for https:// (install ca-certificates, or set SSL_CERT_FILE): {0}")]
    NoRoots(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("answer body larger than {0} bytes")]
    TooLarge(usize),
    #[error("invalid request: {0}")]
    Request(String),
}

/// Where requests go: a URL parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    https: bool,
    host: String,
    port: u16,
    /// `host[:port]` for the `Host` header.
    authority: String,
    path: String,
}

/// Why a URL is not a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("invalid URL {url}: {reason}")]
    Invalid { url: String, reason: String },
    #[error("{0}: expected an http:// or https:// URL")]
    Scheme(String),
    #[error("{0}: no host")]
    NoHost(String),
}

impl Target {
    /// Parses an `http://` or `https://` URL.
    pub fn parse(url: &str) -> Result<Target, UrlError> {
        let uri: http::Uri =
            url.trim()
                .parse()
                .map_err(|e: http::uri::InvalidUri| UrlError::Invalid {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(UrlError::Scheme(url.to_string())),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| UrlError::NoHost(url.to_string()))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, h)| h))
            .unwrap_or(&host)
            .to_string();
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        Ok(Target {
            url: url.trim().to_string(),
            https,
            host,
            port,
            authority,
            path,
        })
    }

    pub fn is_https(&self) -> bool {
        self.https
    }

    fn origin(&self) -> (bool, &str, u16) {
        (self.https, &self.host, self.port)
    }
}

/// A complete answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

type Sender = http1::SendRequest<Full<Bytes>>;

struct Idle {
    https: bool,
    host: String,
    port: u16,
    sender: Sender,
    expires: Instant,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Idle>,
    dns: HashMap<(String, u16), (Vec<SocketAddr>, Instant)>,
}

/// One thread's HTTP client and its keep-alive pool.
pub struct Client {
    pool: Rc<RefCell<Pool>>,
    max_body: usize,
    latency: Option<Histogram>,
}

/// How a request on a pooled connection failed.
enum Failed {
    /// Before any answer: worth one retry on a fresh connection.
    BeforeAnswer(Error),
    After(Error),
}

impl Client {
    /// A client reading answers of at most `max_body` bytes, recording
    /// each request's duration in `latency` if given.
    pub fn new(max_body: usize, latency: Option<Histogram>) -> Client {
        Client {
            pool: Rc::default(),
            max_body,
            latency,
        }
    }

    /// POSTs `body` to `target` with `headers`, and reads the whole answer,
    /// all within `timeout`. With `reuse`, a pooled connection may carry
    /// it (retried once on a fresh one if that connection turns out dead);
    /// without, a fresh connection does, and still goes back to the pool.
    pub async fn post(
        &self,
        target: &Target,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
        reuse: bool,
    ) -> Result<Response, Error> {
        let start = Instant::now();
        let res = match monoio::time::timeout(timeout, self.exchange(target, headers, body, reuse))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(timeout)),
        };
        if let Some(h) = &self.latency {
            h.observe(start.elapsed().as_secs_f64());
        }
        res
    }

    async fn exchange(
        &self,
        target: &Target,
        headers: &[(&str, &str)],
        body: Bytes,
        reuse: bool,
    ) -> Result<Response, Error> {
        if reuse {
            if let Some(sender) = self.checkout(target) {
                match self.send(target, sender, headers, body.clone()).await {
                    Ok(r) => return Ok(r),
                    Err(Failed::After(e)) => return Err(e),
                    Err(Failed::BeforeAnswer(e)) => {
                        tracing::debug!(url = %target.url, error = %e, "pooled connection failed; retrying on a fresh one");
                    }
                }
            }
        }
        let sender = self.connect(target).await?;
        match self.send(target, sender, headers, body).await {
            Ok(r) => Ok(r),
            Err(Failed::BeforeAnswer(e) | Failed::After(e)) => Err(e),
        }
    }

    async fn send(
        &self,
        target: &Target,
        mut sender: Sender,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Response, Failed> {
        let mut req = http::Request::post(target.path.as_str())
            .header(http::header::HOST, target.authority.as_str());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| Failed::After(Error::Request(e.to_string())))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Failed::BeforeAnswer(Error::Http(e)))?;
        let status = resp.status().as_u16();
        let reusable = allows_reuse(resp.version(), resp.headers());
        let idle_for = keep_alive_timeout(resp.headers()).map_or(IDLE_FOR, |t| t.min(IDLE_FOR));
        let body = Limited::new(resp.into_body(), self.max_body)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => Failed::After(Error::Http(*e)),
                Err(_) => Failed::After(Error::TooLarge(self.max_body)),
            })?
            .to_bytes();
        if reusable && !idle_for.is_zero() {
            self.checkin(target, sender, idle_for);
        }
        Ok(Response { status, body })
    }

    /// Puts `sender` back once hyper says its connection is idle again
    /// (the response's end has been processed), or drops it.
    fn checkin(&self, target: &Target, mut sender: Sender, idle_for: Duration) {
        let pool = self.pool.clone();
        let (https, host, port) = target.origin();
        let host = host.to_string();
        monoio::spawn(async move {
            let ready = monoio::time::timeout(Duration::from_secs(1), sender.ready()).await;
            if !matches!(ready, Ok(Ok(()))) {
                return;
            }
            let mut pool = pool.borrow_mut();
            let same = pool
                .idle
                .iter()
                .filter(|i| i.https == https && i.port == port && i.host == host)
                .count();
            if same < MAX_IDLE {
                pool.idle.push(Idle {
                    https,
                    host,
                    port,
                    sender,
                    expires: Instant::now() + idle_for,
                });
            }
        });
    }

    /// The most recently used idle connection to `target`'s origin that is
    /// still open and ready.
    fn checkout(&self, target: &Target) -> Option<Sender> {
        let now = Instant::now();
        let (https, host, port) = target.origin();
        let mut pool = self.pool.borrow_mut();
        pool.idle
            .retain(|i| i.expires > now && !i.sender.is_closed());
        while let Some(pos) = pool
            .idle
            .iter()
            .rposition(|i| i.https == https && i.port == port && i.host == host)
        {
            let idle = pool.idle.swap_remove(pos);
            if idle.sender.is_ready() {
                return Some(idle.sender);
            }
        }
        None
    }

    /// Idle connections held (for tests and metrics).
    pub fn idle_connections(&self) -> usize {
        self.pool.borrow().idle.len()
    }

    async fn resolve(&self, target: &Target) -> Result<Vec<SocketAddr>, Error> {
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, target.port)]);
        }
        let key = (target.host.clone(), target.port);
        if let Some((addrs, until)) = self.pool.borrow().dns.get(&key) {
            if *until > Instant::now() {
                return Ok(addrs.clone());
            }
        }
        // getaddrinfo blocks: ask it on a thread of its own, never on the reactor.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let name = (target.host.clone(), target.port);
        std::thread::Builder::new()
            .name("herald-dns".into())
            .spawn(move || {
                use std::net::ToSocketAddrs;
                let _ = tx.send(name.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
            })
            .map_err(|source| Error::Resolve {
                host: target.host.clone(),
                source,
            })?;
        let addrs =
            match rx.await {
                Ok(Ok(a)) if !a.is_empty() => a,
                Ok(Ok(_)) => Err(io::Error::new(io::ErrorKind::NotFound, "no addresses")).map_err(
                    |source| Error::Resolve {
                        host: target.host.clone(),
                        source,
                    },
                )?,
                Ok(Err(source)) => {
                    return Err(Error::Resolve {
                        host: target.host.clone(),
                        source,
                    })
                }
                Err(_) => {
                    return Err(Error::Resolve {
                        host: target.host.clone(),
                        source: io::Error::other("resolver thread failed"),
                    })
                }
            };
        self.pool
            .borrow_mut()
            .dns
            .insert(key, (addrs.clone(), Instant::now() + DNS_TTL));
        Ok(addrs)
    }

    /// A fresh connection to `target`, its HTTP/1.1 driver spawned on this
    /// thread's runtime.
    async fn connect(&self, target: &Target) -> Result<Sender, Error> {
        let addrs = self.resolve(target).await?;
        let mut last = None;
        let mut stream = None;
        for addr in addrs {
            match monoio::net::TcpStream::connect_addr(addr).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(source) => last = Some(Error::Connect { addr, source }),
            }
        }
        let stream = match stream {
            Some(s) => s,
            None => {
                return Err(last.unwrap_or_else(|| Error::Resolve {
                    host: target.host.clone(),
                    source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
                }))
            }
        };
        let _ = stream.set_nodelay(true);
        let addr = stream
            .peer_addr()
            .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        let io = stream
            .into_poll_io()
            .map_err(|source| Error::Connect { addr, source })?;
        let mut builder = http1::Builder::new();
        builder.max_buf_size(self.max_body.max(16 * 1024) + 16 * 1024);
        if target.https {
            let config = tls_config()?;
            let name =
                rustls::pki_types::ServerName::try_from(target.host.clone()).map_err(|e| {
                    Error::Tls {
                        host: target.host.clone(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, e),
                    }
                })?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, io)
                .await
                .map_err(|source| Error::Tls {
                    host: target.host.clone(),
                    source,
                })?;
            let (sender, conn) = builder.handshake(MonoioIo::new(tls)).await?;
            monoio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        } else {
            let (sender, conn) = builder.handshake(MonoioIo::new(io)).await?;
            monoio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
    }
}

/// The process's TLS settings for outgoing https:// requests: the system's
/// trust store (or `SSL_CERT_FILE` / `SSL_CERT_DIR`), ALPN `http/1.1`.
/// Loaded once, on first use.
pub fn tls_config() -> Result<Arc<rustls::ClientConfig>, Error> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut config = trusting_the_system()?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
        .map_err(Error::NoRoots)
}

/// A TLS client configuration that trusts the system's store (or
/// `SSL_CERT_FILE` / `SSL_CERT_DIR`), without ALPN; the error says why
/// there is none.
pub fn trusting_the_system() -> Result<rustls::ClientConfig, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or("none found".to_string(), |e| e.to_string());
        return Err(format!("no trusted certificates: {why}"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// May the connection carry another request after this response? HTTP/1.1
/// unless `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`
/// (RFC 9112 §9.3).
pub fn allows_reuse(version: http::Version, headers: &http::HeaderMap) -> bool {
    let has = |token: &str| {
        headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match version {
        http::Version::HTTP_11 => !has("close"),
        http::Version::HTTP_10 => has("keep-alive") && !has("close"),
        _ => false,
    }
}

/// The server's `Keep-Alive: timeout=N`, less a second of margin, so the
/// connection is dropped before the server closes it.
pub fn keep_alive_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("keep-alive")?.to_str().ok()?;
    let secs: u64 = v
        .split(',')
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("timeout"))?
        .1
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.saturating_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn reuse_follows_rfc_9112() {
        use http::Version;
        assert!(allows_reuse(Version::HTTP_11, &headers(&[])));
        assert!(!allows_reuse(
            Version::HTTP_11,
            &headers(&[("Connection", "Close")])
        ));
        assert!(!allows_reuse(
            Version::HTTP_11,
            &headers(&[("Connection", "upgrade, close")])
        ));
        assert!(!allows_reuse(Version::HTTP_10, &headers(&[])));
        assert!(allows_reuse(
            Version::HTTP_10,
            &headers(&[("Connection", "Keep-Alive")])
        ));
    }

    #[test]
    fn keep_alive_timeout_is_read_with_a_margin() {
        let h = headers(&[("Keep-Alive", "timeout=5, max=1000")]);
        assert_eq!(keep_alive_timeout(&h), Some(Duration::from_secs(4)));
        let h = headers(&[("Keep-Alive", "max=3")]);
        assert_eq!(keep_alive_timeout(&h), None);
        let h = headers(&[("Keep-Alive", "timeout=1")]);
        assert_eq!(keep_alive_timeout(&h), Some(Duration::ZERO));
    }

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:8080/authorize?x=1").unwrap();
        assert_eq!(
            (
                t.https,
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.path.as_str()
            ),
            (false, "127.0.0.1", 8080, "127.0.0.1:8080", "/authorize?x=1")
        );
        let t = Target::parse("https://hooks.example").unwrap();
        assert_eq!((t.https, t.port, t.path.as_str()), (true, 443, "/"));
        let t = Target::parse("http://[::1]:9/h").unwrap();
        assert_eq!((t.host.as_str(), t.authority.as_str()), ("::1", "[::1]:9"));
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("/relative").is_err());
    }
}
