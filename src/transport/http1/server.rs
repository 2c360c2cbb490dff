//! Everything that arrives on the port before (or instead of) a WebSocket:
//! reading a request head, the upgrade checks (path, handshake, Origin,
//! token, MAX_CONNECTIONS), and the HTTP API (`POST /publish`,
//! `POST /broadcast`, `GET /health`, `GET /metrics`) with keep-alive.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use crate::auth::{self, AuthError, Grant};
use crate::frontends::native::protocol::{self, ErrorCode};
use crate::frontends::pusher;
use crate::integrations::authorizer::{self, Action, ConnAuthz, Decision};
use crate::integrations::metrics::Format;
use crate::runtime::worker::{Shared, Worker};
use crate::session::{self, Mode};
use crate::transport::http1::forwarded;
use crate::transport::http1::head::{self, HttpError, RequestHead};

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

enum HeadError {
    /// The peer closed (or reset) before sending a complete head.
    Closed,
    Http(HttpError),
}

/// Reads at most `max` more bytes into `buf`; `Ok(0)` is EOF.
async fn read_more(stream: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    buf.reserve(max.min(16 * 1024));
    loop {
        stream.readable(false).await?;
        let spare = buf.spare_capacity_mut();
        let room = max.min(spare.len());
        let spare = &mut spare[..room];
        // SAFETY: `spare` is valid for writes of its length; recv reports
        // how many bytes it initialised.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            // SAFETY: recv initialised `n` bytes past the old length.
            unsafe { buf.set_len(buf.len() + n as usize) };
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if !matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ) {
            return Err(err);
        }
    }
}

async fn read_head(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(RequestHead, usize), HeadError> {
    loop {
        if !buf.is_empty() {
            if let Some(parsed) = head::parse_head(buf).map_err(HeadError::Http)? {
                return Ok(parsed);
            }
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::Http(HttpError::new(
                431,
                "request head too large",
            )));
        }
        match read_more(stream, buf, MAX_HEAD - buf.len()).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

async fn send(stream: &mut TcpStream, bytes: Vec<u8>) -> bool {
    let (res, _) = stream.write_all(bytes).await;
    res.is_ok()
}

/// Serves one accepted TCP connection: HTTP requests until it upgrades to
/// WebSocket or closes. Until it upgrades it is one of its worker's
/// [`pending`](crate::transport::http1::pending) connections, closed at once if evicted to
/// make room for a newer one.
pub async fn serve(worker: Rc<Worker>, stream: TcpStream, peer: SocketAddr, site: Site) {
    let (ticket, evicted_other) = worker.pending.borrow_mut().admit();
    if evicted_other {
        worker.core.stats.pending_evictions.inc();
    }
    let evicted = poll_fn(|cx| worker.pending.borrow_mut().poll_evicted(ticket, cx));
    monoio::select! {
        _ = serve_requests(worker.clone(), stream, peer, site) => {},
        _ = evicted => tracing::debug!(%peer, "pending connection evicted (MAX_PENDING)"),
    }
    worker.pending.borrow_mut().leave(ticket);
}

async fn serve_requests(worker: Rc<Worker>, mut stream: TcpStream, peer: SocketAddr, site: Site) {
    let timeout = worker.shared.config.handshake_timeout;
    let mut buf = Vec::new();
    loop {
        let (head, len) = match monoio::time::timeout(timeout, read_head(&stream, &mut buf)).await {
            Ok(Ok(parsed)) => parsed,
            Ok(Err(HeadError::Closed)) => return,
            Ok(Err(HeadError::Http(e))) => {
                tracing::debug!(%peer, error = %e, "bad request head");
                send(&mut stream, head::error_response(&e)).await;
                return;
            }
            Err(_) => {
                if !buf.is_empty() {
                    worker.core.stats.request_timeouts.inc();
                    let e = HttpError::new(408, "request head not received in time");
                    send(&mut stream, head::error_response(&e)).await;
                }
                return;
            }
        };
        buf.drain(..len);
        // Framing first, for every request: a length two parties could
        // read differently is refused before anything acts on it.
        let body_len = match head.content_length() {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "request framing refused");
                send(&mut stream, head::error_response(&e)).await;
                return;
            }
        };
        let client = forwarded::client_addr(
            peer,
            head.headers(),
            &worker.shared.config.trusted_proxies.0,
        );
        if head.wants_websocket() && site == Site::Main {
            if body_len > 0 {
                let e = HttpError::new(400, "a WebSocket upgrade request has no body");
                send(&mut stream, head::error_response(&e)).await;
                return;
            }
            upgrade(worker, stream, head, buf, &client).await;
            return;
        }
        if !Box::pin(api(
            &worker,
            &mut stream,
            &head,
            body_len,
            &mut buf,
            &client,
            site,
        ))
        .await
        {
            return;
        }
    }
}

/// Refuses an upgrade with `err`, counting it under `reason`.
async fn refuse(worker: &Worker, stream: &mut TcpStream, reason: &str, err: HttpError, peer: &str) {
    tracing::debug!(peer, reason, error = %err, "upgrade refused");
    worker.shared.metrics.reject(reason);
    send(stream, head::error_response(&err)).await;
}

async fn upgrade(
    worker: Rc<Worker>,
    mut stream: TcpStream,
    head: RequestHead,
    leftover: Vec<u8>,
    peer: &str,
) {
    let shared = worker.shared.clone();
    let cfg = &shared.config;
    let mode = match head.path() {
        "/" | "/ws" => Mode::PubSub,
        "/echo" if cfg.echo_endpoint => Mode::Echo,
        p if p.starts_with("/app/") => Mode::Pusher,
        _ => {
            let err = HttpError::new(404, format!("no WebSocket endpoint at {}", head.path()));
            return refuse(&worker, &mut stream, "not_found", err, peer).await;
        }
    };
    let accept = match head::accept_key(&head) {
        Ok(a) => a,
        Err(e) => return refuse(&worker, &mut stream, "bad_handshake", e, peer).await,
    };
    if cfg.check_origin && !head::origin_allowed(&head, &cfg.allowed_origins) {
        let err = HttpError::new(403, "origin not allowed");
        return refuse(&worker, &mut stream, "origin", err, peer).await;
    }
    if mode == Mode::Pusher {
        return Box::pin(pusher_upgrade(
            worker, stream, head, leftover, &accept, peer,
        ))
        .await;
    }
    let (grant, authz) = match mode {
        // The echo endpoint is a conformance-testing aid, off by default.
        Mode::Echo | Mode::Pusher => (Grant::open(), None),
        Mode::PubSub if worker.authorizer.is_some() => {
            // Boxed, like the API below: a webhook call is large, and
            // inline it would enlarge every handshake's task.
            match Box::pin(authorize_connect(&worker, &head, peer)).await {
                Ok(pair) => pair,
                Err((reason, err)) => return refuse(&worker, &mut stream, reason, err, peer).await,
            }
        }
        Mode::PubSub => match shared
            .auth
            .authenticate(head.header("authorization"), head.query())
        {
            Ok(g) => (g, None),
            Err(e) => {
                let err = HttpError::new(401, e.to_string());
                return refuse(&worker, &mut stream, "unauthorized", err, peer).await;
            }
        },
    };
    if shared.is_shutting_down() {
        let err = HttpError::new(503, "server shutting down");
        return refuse(&worker, &mut stream, "shutting_down", err, peer).await;
    }
    if !shared.try_reserve_connection() {
        let err = HttpError::new(503, "connection limit reached (MAX_CONNECTIONS)");
        return refuse(&worker, &mut stream, "max_connections", err, peer).await;
    }
    if !send(&mut stream, head::switching_protocols(&accept)).await {
        shared.release_connection();
        return;
    }
    tracing::trace!(peer, worker = worker.id, "websocket open");
    // The session runs as a task of its own, so this (larger) task, the
    // request head and the handshake buffer are freed now rather than
    // held for the connection's lifetime.
    let leftover = leftover.as_slice().to_vec();
    drop(head);
    session::start(worker, stream, leftover, grant, authz, mode, None);
}

/// A Pusher client's upgrade (`/app/{key}?protocol=7&...`). Pusher clients
/// learn why they are refused from a `pusher:error` and a close code after
/// the handshake (4001 unknown app, 4003 disabled, 4004 over the app's
/// quota, 4006/4007 protocol version, 4100 over capacity, 4200 shutting
/// down), so those refusals complete the upgrade first.
async fn pusher_upgrade(
    worker: Rc<Worker>,
    mut stream: TcpStream,
    head: RequestHead,
    leftover: Vec<u8>,
    accept: &str,
    peer: &str,
) {
    let shared = worker.shared.clone();
    let key = &head.path()["/app/".len()..];
    let version = head.query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "protocol")
            .map(|(_, v)| v.into_owned())
    });
    let app = shared
        .pusher
        .as_ref()
        .and_then(|p| p.apps.by_key(key).map(|a| (p, a.clone())));
    let refusal: Option<(u16, String)> = match (&app, version.as_deref()) {
        _ if key.is_empty() || key.contains('/') => {
            Some((4005, format!("no Pusher endpoint at {}", head.path())))
        }
        (None, _) => Some((4001, format!("App key {key} does not exist"))),
        (Some((_, app)), _) if !app.enabled => Some((4003, "App is disabled".into())),
        (_, Some(v)) if v.parse::<u32>().is_err() => {
            Some((4006, format!("Invalid version string format: {v}")))
        }
        (_, Some(v)) if !matches!(v.parse::<u32>(), Ok(5..=7)) => {
            Some((4007, format!("Unsupported protocol version {v}")))
        }
        _ if shared.is_shutting_down() => Some((4200, "Server is shutting down".into())),
        _ => None,
    };
    let admitted = match (&refusal, &app) {
        (None, Some((p, app))) => {
            let ns = p.apps.index_of(app) + 1;
            if !pusher::api::admit(p, app, ns) {
                Err((4004, "Application is over connection quota".to_string()))
            } else if !shared.try_reserve_connection() {
                pusher::api::release(p, ns);
                Err((4100, "Over capacity".to_string()))
            } else {
                Ok((app.clone(), ns))
            }
        }
        (Some(r), _) => Err(r.clone()),
        (None, None) => Err((4001, "App key does not exist".to_string())),
    };
    if !send(&mut stream, head::switching_protocols(accept)).await {
        if let (Ok((_, ns)), Some((p, _))) = (&admitted, &app) {
            pusher::api::release(p, *ns);
            shared.release_connection();
        }
        return;
    }
    let pusher_app = match admitted {
        Ok(a) => a,
        Err((code, msg)) => {
            tracing::debug!(peer, code, msg, "pusher connection refused");
            shared.metrics.reject("pusher");
            let mut out = pusher::wire::error(Some(code), &msg).to_vec();
            out.extend_from_slice(&crate::transport::ws::frame::close(Some(code), &msg));
            send(&mut stream, out).await;
            return;
        }
    };
    let leftover = leftover.as_slice().to_vec();
    drop(head);
    let grant = Grant::open();
    session::start(
        worker,
        stream,
        leftover,
        grant,
        None,
        Mode::Pusher,
        Some(pusher_app),
    );
}

/// A refused upgrade: the metric reason and the HTTP error.
type Refusal = (&'static str, HttpError);

/// The permissions of a connection the authorizer is asked about: a token,
/// if one is sent (and SECRET is set), must be valid; then the webhook
/// decides, and the claims of its answer, if any, replace the token's.
async fn authorize_connect(
    worker: &Worker,
    head: &RequestHead,
    peer: &str,
) -> Result<(Arc<Grant>, Option<Box<ConnAuthz>>), Refusal> {
    let shared = &worker.shared;
    let Some(authorizer) = worker.authorizer.as_ref() else {
        return Ok((Grant::open(), None));
    };
    let token_grant = if shared.auth.is_open() {
        None
    } else {
        match auth::find_token(head.header("authorization"), head.query()) {
            Ok(t) => match shared.auth.verify(&t) {
                Ok(g) => Some(g),
                Err(e) => return Err(("unauthorized", HttpError::new(401, e.to_string()))),
            },
            Err(AuthError::Missing) => None,
            Err(e) => return Err(("unauthorized", HttpError::new(401, e.to_string()))),
        }
    };
    let body = authorizer::connect_body(head.headers(), head.query(), peer);
    let decision = authorizer.ask(body).await;
    shared.metrics.authorized("connect", decision.label());
    let answer = match decision {
        Decision::Allow(body) => authorizer::parse_connect_answer(&body).map_err(|e| {
            tracing::warn!(error = %e, "authorizer answer to connect ignored");
            ("authorizer_unavailable", HttpError::new(503, e))
        })?,
        Decision::Deny(status) => {
            let msg = format!("not authorized (authorizer answered {status})");
            return Err(("authorizer_denied", HttpError::new(403, msg)));
        }
        Decision::Unavailable(why) => {
            tracing::warn!(peer, error = %why, "authorizer unavailable");
            let msg = "authorizer unavailable, try again later";
            return Err(("authorizer_unavailable", HttpError::new(503, msg)));
        }
    };
    let grant = match (answer.claims, token_grant) {
        (Some(claims), _) => Arc::new(Grant::from_claims(claims)),
        (None, Some(g)) => match answer.sub {
            Some(sub) => Arc::new(Grant {
                sub: Some(sub.into()),
                ..(*g).clone()
            }),
            None => g,
        },
        (None, None) => Arc::new(Grant {
            sub: answer.sub.map(Into::into),
            ..(*Grant::open()).clone()
        }),
    };
    let per_action = [Action::Subscribe, Action::Unsubscribe, Action::Publish];
    let authz = per_action.iter().any(|a| authorizer.wants(*a)).then(|| {
        let client =
            authorizer::client_json(grant.sub.as_deref(), &worker.connection_id(), head.query());
        Box::new(ConnAuthz::new(client))
    });
    Ok((grant, authz))
}

fn json_error(code: ErrorCode, message: &str) -> (u16, Vec<u8>) {
    let body = serde_json::json!({ "code": code.as_str(), "message": message });
    (code.http_status(), body.to_string().into_bytes())
}

/// `GET /health`: 200 once every reactor accepts, 503 while starting or
/// stopping.
fn health(shared: &Shared) -> (u16, Vec<u8>) {
    let ready = shared.ready.load(Ordering::Acquire);
    let ok = ready == shared.workers && !shared.is_shutting_down();
    let body = serde_json::json!({
        "status": if ok { "ok" } else if shared.is_shutting_down() { "stopping" } else { "starting" },
        "workers": shared.workers,
        "ready_workers": ready,
        "connections": shared.connections.load(Ordering::Relaxed),
    });
    (if ok { 200 } else { 503 }, body.to_string().into_bytes())
}

/// `GET /metrics` in the format the request's `Accept` asks for.
fn metrics_page(shared: &Shared, head: &RequestHead) -> (&'static str, Vec<u8>) {
    let format = Format::from_accept(head.header("accept"));
    let pusher = shared.pusher.as_ref();
    let per_app = pusher.into_iter().flat_map(|p| {
        p.apps
            .iter()
            .zip(&p.app_connections)
            .map(|(a, n)| (a.id.as_str(), n.load(Ordering::Relaxed)))
    });
    shared
        .metrics
        .set_gauges(shared.hub.interest.channel_count(), per_app);
    (
        format.content_type(),
        shared.metrics.render(format).into_bytes(),
    )
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The main port: WebSocket, the HTTP API, /health, /metrics.
    Main,
    /// METRICS_ADDR: /metrics and /health only.
    Metrics,
}

/// Serves one plain HTTP request; returns whether to keep the connection.
async fn api(
    worker: &Worker,
    stream: &mut TcpStream,
    head: &RequestHead,
    body_len: usize,
    buf: &mut Vec<u8>,
    peer: &str,
    site: Site,
) -> bool {
    let shared = &worker.shared;
    // A body nobody reads must not be parsed as the next request: close
    // after answering instead.
    let mut keep = head.keep_alive() && !shared.is_shutting_down() && body_len == 0;
    let json = "application/json";
    let (status, ctype, body): (u16, &str, Vec<u8>) = match (head.method(), head.path()) {
        ("GET", "/health") => {
            let (status, body) = health(shared);
            (status, json, body)
        }
        ("GET", "/metrics") if site == Site::Metrics || shared.config.metrics_addr.is_none() => {
            let (ctype, body) = metrics_page(shared, head);
            (200, ctype, body)
        }
        _ if site == Site::Metrics => {
            keep = false;
            let msg = "only GET /metrics and GET /health are served here\n";
            (404, "text/plain; charset=utf-8", msg.as_bytes().to_vec())
        }
        ("GET", "/metrics") => {
            keep = false;
            let msg = "/metrics is served on METRICS_ADDR\n";
            (404, "text/plain; charset=utf-8", msg.as_bytes().to_vec())
        }
        ("POST", "/publish") | ("POST", "/broadcast") => {
            let Some(len) = read_body(worker, stream, body_len, buf).await else {
                return false;
            };
            keep = head.keep_alive() && !shared.is_shutting_down();
            if worker.core.congested() {
                worker.core.wait_for_space().await;
            }
            let (status, body) =
                publish(worker, head, &buf[..len], head.path() == "/broadcast", peer).await;
            buf.drain(..len);
            (status, json, body)
        }
        (method, path @ ("/publish" | "/broadcast" | "/health" | "/metrics")) => {
            let allow = if path.starts_with("/p") || path.starts_with("/b") {
                "POST"
            } else {
                "GET"
            };
            let msg = format!("method {method} not allowed on {path}: use {allow}");
            let (_, body) = json_error(ErrorCode::BadRequest, &msg);
            let reply = head::response_with(405, json, &body, false, &[("Allow", allow)]);
            send(stream, reply).await;
            return false;
        }
        (method, path) if pusher::api::is_api_path(path) => {
            let Some(len) = read_body(worker, stream, body_len, buf).await else {
                return false;
            };
            keep = head.keep_alive() && !shared.is_shutting_down();
            if worker.core.congested() {
                worker.core.wait_for_space().await;
            }
            let query = head.query().unwrap_or("");
            let now = crate::engine::shard::unix_ms() / 1000;
            let answer = pusher::api::handle(worker, method, path, query, &buf[..len], now);
            buf.drain(..len);
            answer
        }
        ("GET", "/" | "/ws" | "/echo") => {
            keep = false;
            (
                426,
                "text/plain; charset=utf-8",
                b"this endpoint expects a WebSocket upgrade\n".to_vec(),
            )
        }
        _ => {
            keep = false;
            (404, "text/plain; charset=utf-8", b"not found\n".to_vec())
        }
    };
    send(stream, head::response(status, ctype, &body, keep)).await && keep
}

/// Reads a request's `Content-Length` body of `len` bytes into `buf` (its
/// first `len` bytes), within HANDSHAKE_TIMEOUT. On a body over
/// MAX_MESSAGE_SIZE (413), one that does not arrive in time (408) or a
/// peer gone, answers if it can and returns `None`: the connection is done.
async fn read_body(
    worker: &Worker,
    stream: &mut TcpStream,
    len: usize,
    buf: &mut Vec<u8>,
) -> Option<usize> {
    let max = worker.shared.config.max_message_size;
    if len > max {
        let msg = format!("body of {len} bytes exceeds MAX_MESSAGE_SIZE ({max})");
        let (status, body) = json_error(ErrorCode::TooLarge, &msg);
        let json = "application/json";
        send(stream, head::response(status, json, &body, false)).await;
        return None;
    }
    let read = async {
        while buf.len() < len {
            match read_more(stream, buf, len - buf.len()).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        true
    };
    let timeout = worker.shared.config.handshake_timeout;
    match monoio::time::timeout(timeout, read).await {
        Ok(true) => Some(len),
        Ok(false) => None,
        Err(_) => {
            worker.core.stats.request_timeouts.inc();
            let e = HttpError::new(408, "request body not received in time");
            send(stream, head::error_response(&e)).await;
            None
        }
    }
}

/// `POST /publish` and `POST /broadcast`: authenticate, parse, publish.
/// With AUTHORIZER_URL and no SECRET there are no tokens to check, so the
/// authorizer approves each request instead (`publish`, with the request's
/// headers in `client`).
async fn publish(
    worker: &Worker,
    head: &RequestHead,
    body: &[u8],
    wsify: bool,
    peer: &str,
) -> (u16, Vec<u8>) {
    let shared = &worker.shared;
    worker.core.stats.messages_in.inc();
    worker.core.stats.bytes_in.add(body.len() as u64);
    if let (Some(authorizer), true) = (&worker.authorizer, shared.auth.is_open()) {
        let (channel, data) = match protocol::parse_http_publish(body, wsify) {
            Ok(parts) => parts,
            Err(msg) => return json_error(ErrorCode::BadRequest, &msg),
        };
        let client = authorizer::http_client_json(head.headers(), peer);
        let req = authorizer::action_body(Action::Publish, &channel, Some(data), &client);
        let decision = authorizer.ask(req).await;
        shared.metrics.authorized("publish", decision.label());
        return match decision {
            Decision::Allow(_) => {
                worker
                    .core
                    .publish(protocol::message_frame(&channel, data), None);
                (202, br#"{"ok":true}"#.to_vec())
            }
            Decision::Deny(status) => {
                let msg = format!("not authorized (authorizer answered {status})");
                json_error(ErrorCode::Forbidden, &msg)
            }
            Decision::Unavailable(_) => {
                let body = serde_json::json!({
                    "code": "unavailable",
                    "message": "authorizer unavailable, try again later",
                });
                (503, body.to_string().into_bytes())
            }
        };
    }
    let grant = match shared
        .auth
        .authenticate(head.header("authorization"), head.query())
    {
        Ok(g) => g,
        Err(e) => return json_error(ErrorCode::Unauthorized, &e.to_string()),
    };
    let (channel, data) = match protocol::parse_http_publish(body, wsify) {
        Ok(parts) => parts,
        Err(msg) => return json_error(ErrorCode::BadRequest, &msg),
    };
    if !grant.write.allows(&channel) {
        let msg = format!("no write permission on channel {channel}");
        return json_error(ErrorCode::Forbidden, &msg);
    }
    worker
        .core
        .publish(protocol::message_frame(&channel, data), None);
    (202, br#"{"ok":true}"#.to_vec())
}
