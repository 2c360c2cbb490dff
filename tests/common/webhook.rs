//! A webhook receiver for the authorizer tests: a small HTTP/1.1 server on
//! an ephemeral loopback port (plain threads, `std::net`, requests parsed
//! with `httparse`, `Content-Length` bodies, keep-alive).
//!
//! It records every request and counts the TCP connections it accepted.
//! What it answers is decided by the test's closure, which sees the parsed
//! JSON body: a status and body, or [`Reply::Stall`], which holds the
//! request until [`Webhook::release`] (or until the client hangs up, or
//! the webhook is dropped). Waiting is on a `Condvar`, never a sleep.
//!
//! [`Options`] make it behave as other servers do: answer as HTTP/1.0 and
//! close, send bodies without `Content-Length` (close-delimited), close
//! keep-alive connections after a second of idleness (Node's, nginx's
//! `keepalive_timeout`), or speak TLS.
//!
//! Include it with `#[path = "common/webhook.rs"] mod webhook;`.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a test waits for the webhook before failing.
const TIMEOUT: Duration = Duration::from_secs(10);

/// How the webhook answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// This status, with this body (`Content-Type: application/json`).
    Status(u16, String),
    /// Hold the request until [`Webhook::release`].
    Stall,
}

impl Reply {
    /// `200` with an empty body.
    pub fn allow() -> Reply {
        Reply::Status(200, String::new())
    }

    /// `200` with a JSON body.
    pub fn allow_with(body: Value) -> Reply {
        Reply::Status(200, body.to_string())
    }

    /// A status with an empty body.
    pub fn status(code: u16) -> Reply {
        Reply::Status(code, String::new())
    }
}

/// One request the webhook received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body as received.
    pub raw: String,
    /// The body parsed as JSON (`Value::Null` if it was not JSON; that is
    /// recorded as a protocol error too).
    pub body: Value,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

type Decide = dyn Fn(&Value) -> Reply + Send + Sync;

/// How the receiver speaks HTTP.
#[derive(Clone, Default)]
pub struct Options {
    /// Answer `HTTP/1.0` (no keep-alive) and close after each response.
    pub http10: bool,
    /// Answer without `Content-Length`, ending the body by closing.
    pub close_delimited: bool,
    /// Close a keep-alive connection idle this long.
    pub idle_close: Option<Duration>,
    /// Speak TLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// A stream the receiver reads requests from and writes answers to.
trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

#[derive(Default)]
struct Inner {
    requests: Vec<Request>,
    /// TCP connections accepted.
    connections: usize,
    /// Requests being held right now.
    held: usize,
    /// Bumped by each `release`; a held request goes when it changes.
    release_gen: u64,
    /// What released requests are answered.
    release_reply: Option<(u16, String)>,
    /// Anything the client did that is not plain HTTP/1.1 with JSON bodies.
    errors: Vec<String>,
    shutdown: bool,
    /// Clones of open connections, to unblock their threads on drop.
    streams: Vec<TcpStream>,
    /// Keep-alive connections the receiver closed for idleness.
    idle_closes: usize,
}

struct State {
    inner: Mutex<Inner>,
    cond: Condvar,
    decide: Box<Decide>,
    options: Options,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running webhook receiver; stops (and checks it saw only well-formed
/// requests) on drop.
pub struct Webhook {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Webhook {
    /// Starts a receiver answering each request as `decide` says.
    pub fn start(decide: impl Fn(&Value) -> Reply + Send + Sync + 'static) -> Webhook {
        Self::start_with(Options::default(), decide)
    }

    /// Starts a receiver speaking HTTP as `options` say.
    pub fn start_with(
        options: Options,
        decide: impl Fn(&Value) -> Reply + Send + Sync + 'static,
    ) -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind webhook");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            inner: Mutex::new(Inner::default()),
            cond: Condvar::new(),
            decide: Box::new(decide),
            options,
        });
        let st = state.clone();
        std::thread::spawn(move || accept_loop(listener, st));
        Webhook { addr, state }
    }

    /// A receiver that allows everything (`200`, empty body).
    pub fn allowing() -> Webhook {
        Self::start(|_| Reply::allow())
    }

    /// The URL to give herald as AUTHORIZER_URL.
    pub fn url(&self) -> String {
        format!("http://{}/authorize", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().requests.clone()
    }

    /// The JSON bodies of every request received so far.
    pub fn bodies(&self) -> Vec<Value> {
        self.state
            .lock()
            .requests
            .iter()
            .map(|r| r.body.clone())
            .collect()
    }

    /// How many requests were received so far.
    pub fn request_count(&self) -> usize {
        self.state.lock().requests.len()
    }

    /// How many TCP connections were accepted so far.
    pub fn connections(&self) -> usize {
        self.state.lock().connections
    }

    /// Blocks until the receiver has closed `n` idle connections.
    pub fn wait_idle_closes(&self, n: usize) {
        drop(self.wait_until(&format!("{n} idle closes"), |i| i.idle_closes >= n));
    }

    /// Blocks until no request is held any more (answered, or given up
    /// by the client).
    pub fn wait_none_held(&self) {
        drop(self.wait_until("no held requests", |i| i.held == 0));
    }

    /// Blocks until at least `n` requests were received; returns them all.
    pub fn wait_requests(&self, n: usize) -> Vec<Request> {
        let guard = self.wait_until(&format!("{n} webhook requests"), |i| i.requests.len() >= n);
        guard.requests.clone()
    }

    /// Blocks until `n` requests are being held (stalled) at once.
    pub fn wait_held(&self, n: usize) {
        drop(self.wait_until(&format!("{n} held webhook requests"), |i| i.held >= n));
    }

    /// Answers every held request `200` with an empty body.
    pub fn release(&self) {
        self.release_with(200, "");
    }

    /// Answers every held request with `status` and `body`.
    pub fn release_with(&self, status: u16, body: &str) {
        let mut inner = self.state.lock();
        inner.release_gen += 1;
        inner.release_reply = Some((status, body.to_string()));
        self.state.cond.notify_all();
    }

    fn wait_until(&self, what: &str, cond: impl Fn(&Inner) -> bool) -> MutexGuard<'_, Inner> {
        let deadline = Instant::now() + TIMEOUT;
        let mut guard = self.state.lock();
        while !cond(&guard) {
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {what}; received so far: {:#?}",
                guard.requests.iter().map(|r| &r.body).collect::<Vec<_>>()
            );
            guard = self
                .state
                .cond
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        guard
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let errors = {
            let mut inner = self.state.lock();
            inner.shutdown = true;
            for s in inner.streams.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
            self.state.cond.notify_all();
            std::mem::take(&mut inner.errors)
        };
        // Wake the accept loop so it sees `shutdown`.
        let _ = TcpStream::connect(self.addr);
        if !std::thread::panicking() {
            assert!(
                errors.is_empty(),
                "the webhook received malformed requests:\n{}",
                errors.join("\n")
            );
        }
    }
}

fn accept_loop(listener: TcpListener, state: Arc<State>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        {
            let mut inner = state.lock();
            if inner.shutdown {
                return;
            }
            inner.connections += 1;
            if let Ok(clone) = stream.try_clone() {
                inner.streams.push(clone);
            }
            state.cond.notify_all();
        }
        let st = state.clone();
        std::thread::spawn(move || {
            let tcp = match stream.try_clone() {
                Ok(t) => t,
                Err(_) => return,
            };
            let conn: Box<dyn Conn> = match st.options.tls.clone() {
                None => Box::new(stream),
                Some(config) => match rustls::ServerConnection::new(config) {
                    Ok(tls) => Box::new(rustls::StreamOwned::new(tls, stream)),
                    Err(_) => return,
                },
            };
            serve(conn, tcp, st)
        });
    }
}

/// Most header lines a request may have.
const MAX_HEADERS: usize = 64;

/// Serves one keep-alive connection until the client closes it.
fn serve(mut stream: Box<dyn Conn>, tcp: TcpStream, state: Arc<State>) {
    let _ = tcp.set_nodelay(true);
    let opts = state.options.clone();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if buf.is_empty() {
            if let Some(idle) = opts.idle_close {
                // Idle between requests: close as a server with a
                // keep-alive timeout does.
                let _ = tcp.set_read_timeout(Some(idle));
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        let _ = tcp.shutdown(Shutdown::Both);
                        let mut inner = state.lock();
                        inner.idle_closes += 1;
                        state.cond.notify_all();
                        return;
                    }
                    Err(_) => return,
                }
                let _ = tcp.set_read_timeout(None);
            }
        }
        // Read a complete head.
        let (head_len, method, path, headers) = loop {
            let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut hs);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let headers: Vec<(String, String)> = req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    break (
                        n,
                        req.method.unwrap_or("").to_string(),
                        req.path.unwrap_or("").to_string(),
                        headers,
                    );
                }
                Ok(httparse::Status::Partial) => {
                    if !read_more(&mut *stream, &mut buf) {
                        return;
                    }
                }
                Err(e) => {
                    protocol_error(&state, format!("unparsable request head: {e}"));
                    return;
                }
            }
        };
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        if find("transfer-encoding").is_some() {
            protocol_error(&state, "request body is not sized by Content-Length".into());
            respond(&mut *stream, 411, "", true, &opts);
            return;
        }
        let len: usize = match find("content-length").map(|v| v.trim().parse()) {
            Some(Ok(len)) => len,
            None => 0,
            Some(Err(_)) => {
                protocol_error(&state, "invalid Content-Length".into());
                return;
            }
        };
        while buf.len() < head_len + len {
            if !read_more(&mut *stream, &mut buf) {
                return;
            }
        }
        let raw = String::from_utf8_lossy(&buf[head_len..head_len + len]).into_owned();
        buf.drain(..head_len + len);
        let body = match serde_json::from_str::<Value>(&raw) {
            Ok(v) => v,
            Err(e) => {
                protocol_error(&state, format!("body is not JSON ({e}): {raw:?}"));
                Value::Null
            }
        };
        let close = find("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = (state.decide)(&body);
        let gen = {
            let mut inner = state.lock();
            inner.requests.push(Request {
                method,
                path,
                headers,
                raw,
                body,
            });
            if matches!(reply, Reply::Stall) {
                inner.held += 1;
            }
            state.cond.notify_all();
            inner.release_gen
        };
        let (status, body) = match reply {
            Reply::Status(status, body) => (status, body),
            Reply::Stall => match hold(&tcp, &state, gen) {
                Some(answer) => answer,
                None => return,
            },
        };
        let close = close || opts.http10 || opts.close_delimited;
        if !respond(&mut *stream, status, &body, close, &opts) || close {
            let _ = stream.flush();
            let _ = tcp.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Holds a request until a release after generation `gen`; `None` when the
/// client hung up or the webhook stopped first.
fn hold(stream: &TcpStream, state: &State, gen: u64) -> Option<(u16, String)> {
    let mut inner = state.lock();
    let answer = loop {
        if inner.shutdown {
            break None;
        }
        if inner.release_gen != gen {
            break inner.release_reply.clone();
        }
        // The client giving up (e.g. herald's AUTHORIZER_TIMEOUT) shows as
        // EOF; check for it now and then while waiting for the release.
        if client_gone(stream) {
            break None;
        }
        inner = state
            .cond
            .wait_timeout(inner, Duration::from_millis(50))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    };
    inner.held -= 1;
    state.cond.notify_all();
    answer
}

/// Has the peer closed the connection? (A non-blocking peek sees EOF.)
fn client_gone(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut b = [0u8; 1];
    let gone = match stream.peek(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    gone
}

fn read_more(stream: &mut dyn Conn, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn respond(stream: &mut dyn Conn, status: u16, body: &str, close: bool, opts: &Options) -> bool {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        302 => "Found",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        411 => "Length Required",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    // 204 carries no body and no Content-Length; a close-delimited body
    // has no length either.
    let sized = if status == 204 {
        String::new()
    } else if opts.close_delimited {
        "Content-Type: application/json\r\n".to_string()
    } else {
        format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )
    };
    let version = if opts.http10 { "1.0" } else { "1.1" };
    let conn = if close && !opts.http10 {
        "Connection: close\r\n"
    } else {
        ""
    };
    let mut out = format!("HTTP/{version} {status} {reason}\r\n{sized}{conn}\r\n").into_bytes();
    if status != 204 {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).is_ok() && stream.flush().is_ok()
}

fn protocol_error(state: &State, msg: String) {
    let mut inner = state.lock();
    inner.errors.push(msg);
    state.cond.notify_all();
}
