//! Everything that arrives on the port before (or instead of) a WebSocket:
//! reading a request head (and body) within HANDSHAKE_TIMEOUT, refusing
//! ambiguous framing, the checks every WebSocket upgrade gets (handshake,
//! Origin), and the routing of each upgrade and each HTTP request to the
//! front-end that serves its path ([`Endpoint`]). It
//! answers `GET /health` and `GET /metrics` itself, with keep-alive.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use monoio::net::TcpStream;

use crate::frontends::endpoint::{refuse, Answer, Endpoint, Request, Upgrade};
use crate::integrations::metrics::Format;
use crate::transport::http1::forwarded;
use crate::transport::http1::head::{self, HttpError, RequestHead};
use crate::transport::tcp::Conn;
use crate::transport::tls;
use crate::worker::{Shared, Worker};

/// One core's endpoints, in the order they are asked.
pub type Endpoints = Rc<[Rc<dyn Endpoint>]>;

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

enum HeadError {
    /// The peer closed (or reset) before sending a complete head.
    Closed,
    Http(HttpError),
}

async fn read_head(
    stream: &mut Conn,
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
        match stream.read_more(buf, MAX_HEAD - buf.len()).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

/// Serves one accepted TCP connection: HTTP requests until it upgrades to
/// WebSocket or closes. Until it upgrades it is one of its worker's
/// [`pending`](crate::transport::http1::pending) connections, closed at once if evicted to
/// make room for a newer one.
pub async fn serve(
    worker: Rc<Worker>,
    endpoints: Endpoints,
    stream: TcpStream,
    peer: SocketAddr,
    site: Site,
) {
    let (ticket, evicted_other) = worker.pending.borrow_mut().admit();
    if evicted_other {
        worker.core.stats.pending_evictions.inc();
    }
    let evicted = poll_fn(|cx| worker.pending.borrow_mut().poll_evicted(ticket, cx));
    monoio::select! {
        _ = serve_requests(worker.clone(), &endpoints, stream, peer, site) => {},
        _ = evicted => tracing::debug!(%peer, "pending connection evicted (MAX_PENDING)"),
    }
    worker.pending.borrow_mut().leave(ticket);
}

async fn serve_requests(
    worker: Rc<Worker>,
    endpoints: &[Rc<dyn Endpoint>],
    stream: TcpStream,
    peer: SocketAddr,
    site: Site,
) {
    let timeout = worker.shared.config.handshake_timeout;
    let mut stream = match (site, worker.shared.tls.get()) {
        (Site::Tls, Some(certified)) => {
            let config = certified.current();
            let mut tcp = stream;
            match monoio::time::timeout(timeout, tls::accept(&mut tcp, config)).await {
                Ok(Ok(session)) => {
                    worker.core.stats.tls_handshakes.inc();
                    Conn::with_tls(tcp, session)
                }
                Ok(Err(e)) => {
                    worker.core.stats.tls_failures.inc();
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    worker.core.stats.tls_failures.inc();
                    tracing::debug!(%peer, "TLS handshake not completed in time");
                    return;
                }
            }
        }
        _ => Conn::plain(stream),
    };
    let mut buf = Vec::new();
    loop {
        let (head, len) =
            match monoio::time::timeout(timeout, read_head(&mut stream, &mut buf)).await {
                Ok(Ok(parsed)) => parsed,
                Ok(Err(HeadError::Closed)) => return,
                Ok(Err(HeadError::Http(e))) => {
                    tracing::debug!(%peer, error = %e, "bad request head");
                    stream.send(head::error_response(&e)).await;
                    return;
                }
                Err(_) => {
                    if !buf.is_empty() {
                        worker.core.stats.request_timeouts.inc();
                        let e = HttpError::new(408, "request head not received in time");
                        stream.send(head::error_response(&e)).await;
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
                stream.send(head::error_response(&e)).await;
                return;
            }
        };
        let client = forwarded::client_addr(
            peer,
            head.headers(),
            &worker.shared.config.trusted_proxies.0,
        );
        if head.wants_websocket() && site != Site::Metrics {
            if body_len > 0 {
                let e = HttpError::new(400, "a WebSocket upgrade request has no body");
                stream.send(head::error_response(&e)).await;
                return;
            }
            upgrade(worker, endpoints, stream, head, buf, client).await;
            return;
        }
        // Boxed: a request's handling is large and rare next to a
        // connection's life; inline it would enlarge every handshake.
        let keep = Box::pin(api(
            Here {
                worker: &worker,
                endpoints,
                site,
            },
            &mut stream,
            &head,
            body_len,
            &mut buf,
            &client,
        ));
        if !keep.await {
            return;
        }
    }
}

/// Checks an upgrade's handshake and Origin, then hands it to the
/// front-end serving its path.
async fn upgrade(
    worker: Rc<Worker>,
    endpoints: &[Rc<dyn Endpoint>],
    mut stream: Conn,
    head: RequestHead,
    leftover: Vec<u8>,
    peer: String,
) {
    let Some(endpoint) = endpoints
        .iter()
        .find(|e| e.serves_upgrade(head.path()))
        .cloned()
    else {
        let err = HttpError::new(404, format!("no WebSocket endpoint at {}", head.path()));
        return refuse(&worker, &mut stream, "not_found", err, &peer).await;
    };
    let accept = match head::accept_key(&head) {
        Ok(a) => a,
        Err(e) => return refuse(&worker, &mut stream, "bad_handshake", e, &peer).await,
    };
    let cfg = &worker.shared.config;
    if cfg.check_origin && !head::origin_allowed(&head, &cfg.allowed_origins) {
        let err = HttpError::new(403, "origin not allowed");
        return refuse(&worker, &mut stream, "origin", err, &peer).await;
    }
    let up = Upgrade::new(worker, stream, head, leftover, accept, peer);
    endpoint.upgrade(up).await;
}

/// `GET /health`: 200 once every reactor accepts, 503 while starting or
/// stopping.
/// In a cluster, also 503 (`"status":"broker_unreachable"`, with the
/// reason) while the node cannot reach its broker. With DATABASE_URL,
/// `database` says whether the database is reachable (still 200 when it
/// is not: the configuration read last stays in force).
fn health(shared: &Shared) -> (u16, Vec<u8>) {
    let ready = shared.ready.load(Ordering::Acquire);
    let broker = shared.hub.broker().and_then(|b| b.unavailable());
    let ok = ready == shared.workers && !shared.is_shutting_down() && broker.is_none();
    let status = if shared.is_shutting_down() {
        "stopping"
    } else if ready < shared.workers {
        "starting"
    } else if broker.is_some() {
        "broker_unreachable"
    } else {
        "ok"
    };
    let mut body = serde_json::json!({
        "status": status,
        "workers": shared.workers,
        "ready_workers": ready,
        "connections": shared.connections.load(Ordering::Relaxed),
    });
    if let Some(node) = shared.config.node_id.as_deref() {
        body["node"] = node.into();
    }
    if let Some(why) = broker {
        body["reason"] = why.into();
    }
    // The configuration read last stays in force while the database is
    // away: shown, but the node still serves.
    if let Some(db) = shared.database.get() {
        body["database"] = db.health();
    }
    (if ok { 200 } else { 503 }, body.to_string().into_bytes())
}

/// `GET /metrics` in the format the request's `Accept` asks for.
fn metrics_page(shared: &Shared, head: &RequestHead) -> (&'static str, Vec<u8>) {
    let format = Format::from_accept(head.header("accept"));
    shared.metrics.set_gauges(
        shared.hub.interest.channel_count(),
        shared.hub.durable.len(),
    );
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
    /// The same over TLS (TLS_PORT, or the main port with TLS_CERT).
    Tls,
    /// METRICS_ADDR: /metrics and /health only.
    Metrics,
}

/// Serves one plain HTTP request; returns whether to keep the connection.
/// Where a request is served: the core, its endpoints, the listener.
struct Here<'a> {
    worker: &'a Worker,
    endpoints: &'a [Rc<dyn Endpoint>],
    site: Site,
}

async fn api(
    here: Here<'_>,
    stream: &mut Conn,
    head: &RequestHead,
    body_len: usize,
    buf: &mut Vec<u8>,
    peer: &str,
) -> bool {
    let Here {
        worker,
        endpoints,
        site,
    } = here;
    let shared = &worker.shared;
    let (method, path) = (head.method(), head.path());
    // CONSOLE_ON_METRICS: the console only where /metrics is.
    let console_apart =
        shared.config.console_on_metrics && shared.metrics_apart.load(Ordering::Relaxed);
    let console = path == "/console" || path.starts_with("/console/");
    let answer = match (method, path) {
        ("GET", "/health") => {
            let (status, body) = health(shared);
            Answer::json(status, body)
        }
        ("GET", "/metrics")
            if site == Site::Metrics || !shared.metrics_apart.load(Ordering::Relaxed) =>
        {
            let (ctype, body) = metrics_page(shared, head);
            Answer::new(200, ctype, body)
        }
        _ if site == Site::Metrics && !(console && console_apart) => {
            let mut a = Answer::text(404, "only GET /metrics and GET /health are served here\n");
            a.close = true;
            a
        }
        _ if console && console_apart && site != Site::Metrics => {
            let mut a = Answer::text(404, "/console is served on METRICS_ADDR\n");
            a.close = true;
            a
        }
        ("GET", "/metrics") => {
            let mut a = Answer::text(404, "/metrics is served on METRICS_ADDR\n");
            a.close = true;
            a
        }
        (_, "/health" | "/metrics") => {
            let msg = format!("method {method} not allowed on {path}: use GET");
            let body = serde_json::json!({ "code": "bad_request", "message": msg });
            let mut a = Answer::json(405, body.to_string().into_bytes());
            a.headers.push(("Allow", "GET".into()));
            a.close = true;
            a
        }
        _ => {
            if let Some(endpoint) = endpoints.iter().find(|e| e.serves_http(path)) {
                let Some(len) = read_body(worker, stream, body_len, buf).await else {
                    return false;
                };
                // A publish waits here for the cross-core queues, as a
                // WebSocket publisher's next message does.
                if worker.core.congested() {
                    worker.core.wait_for_space().await;
                }
                let req = Request {
                    head,
                    body: &buf[..len],
                    peer,
                };
                let answer = endpoint.http(worker, req).await;
                buf.drain(..len);
                answer
            } else if method == "GET" && endpoints.iter().any(|e| e.serves_upgrade(path)) {
                let mut a = Answer::text(426, "this endpoint expects a WebSocket upgrade\n");
                a.close = true;
                a
            } else {
                let mut a = Answer::text(404, "not found\n");
                a.close = true;
                a
            }
        }
    };
    // A body nobody read must not be parsed as the next request: close
    // after answering instead.
    let body_read = endpoints.iter().any(|e| e.serves_http(path)) && site != Site::Metrics;
    let keep = head.keep_alive()
        && !shared.is_shutting_down()
        && !answer.close
        && (body_len == 0 || body_read);
    let extra: Vec<(&str, &str)> = answer
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let out = head::response_with(
        answer.status,
        answer.content_type,
        &answer.body,
        keep,
        &extra,
    );
    stream.send(out).await && keep
}

/// Reads a request's `Content-Length` body of `len` bytes into `buf` (its
/// first `len` bytes), within HANDSHAKE_TIMEOUT. On a body over
/// MAX_MESSAGE_SIZE (413), one that does not arrive in time (408) or a
/// peer gone, answers if it can and returns `None`: the connection is done.
async fn read_body(
    worker: &Worker,
    stream: &mut Conn,
    len: usize,
    buf: &mut Vec<u8>,
) -> Option<usize> {
    let max = worker.shared.config.max_message_size;
    if len > max {
        let msg = format!("body of {len} bytes exceeds MAX_MESSAGE_SIZE ({max})");
        let body = serde_json::json!({ "code": "too_large", "message": msg });
        let json = "application/json";
        stream
            .send(head::response(
                413,
                json,
                body.to_string().as_bytes(),
                false,
            ))
            .await;
        return None;
    }
    let read = async {
        while buf.len() < len {
            match stream.read_more(buf, len - buf.len()).await {
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
            stream.send(head::error_response(&e)).await;
            None
        }
    }
}
