//! What a front-end serves on a core ([`Endpoint`]) and what the router
//! hands it: a WebSocket [`Upgrade`] whose handshake is valid, or an HTTP
//! [`Request`] with its body, answered with an [`Answer`].
//!
//! An upgrade is admitted ([`Upgrade::admit`], or [`Upgrade::accept`] then
//! [`Accepted::start`]) into a [`session`](crate::session), or refused
//! with an HTTP error ([`Upgrade::refuse`]) or, for protocols that refuse
//! over the WebSocket, with frames after the handshake
//! ([`Accepted::send_and_close`]).

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use crate::transport::http1::head::{self, HttpError, RequestHead};
use crate::transport::tcp::{Conn, Stream};
use crate::worker::Worker;

/// A future a front-end returns to the router.
pub type LocalFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// What a front-end serves on a core: WebSocket upgrades and plain HTTP
/// requests at its paths, and a tick once a second.
pub trait Endpoint {
    /// Does it take WebSocket upgrades at `path`?
    fn serves_upgrade(&self, path: &str) -> bool;

    /// Admits or refuses an upgrade (its handshake already checked) and
    /// starts the session.
    fn upgrade(self: Rc<Self>, up: Upgrade) -> LocalFuture<'static, ()>;

    /// Does it answer plain HTTP requests at `path`?
    fn serves_http(&self, _path: &str) -> bool {
        false
    }

    /// Answers one HTTP request, its body read whole.
    fn http<'a>(&'a self, _worker: &'a Worker, _req: Request<'a>) -> LocalFuture<'a, Answer> {
        Box::pin(async { Answer::text(404, "not found\n") })
    }

    /// On each core's timer tick, ten times a second (requests from other
    /// cores, idle sweeps at their own pace); `now_ms` is
    /// [`crate::clock::now_ms`].
    fn tick(&self, _worker: &Worker, _now_ms: u64) {}
}

/// A plain HTTP request for a front-end.
pub struct Request<'a> {
    pub head: &'a RequestHead,
    pub body: &'a [u8],
    /// The client's address (behind trusted proxies, the one they name).
    pub peer: &'a str,
}

/// A front-end's answer to an HTTP request.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra headers (`Allow` on a 405).
    pub headers: Vec<(&'static str, String)>,
    /// Close the connection after it (the request cannot be followed).
    pub close: bool,
}

impl Answer {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Answer {
        Answer {
            status,
            content_type,
            body,
            headers: Vec::new(),
            close: false,
        }
    }

    pub fn json(status: u16, body: Vec<u8>) -> Answer {
        Answer::new(status, "application/json", body)
    }

    pub fn text(status: u16, body: impl Into<String>) -> Answer {
        Answer::new(
            status,
            "text/plain; charset=utf-8",
            body.into().into_bytes(),
        )
    }
}

/// A WebSocket upgrade whose handshake is valid, for a front-end to admit
/// or refuse.
pub struct Upgrade {
    pub worker: Rc<Worker>,
    stream: Conn,
    pub head: RequestHead,
    /// Bytes that arrived after the request head (the first frames).
    leftover: Vec<u8>,
    /// The `Sec-WebSocket-Accept` value.
    accept: String,
    /// The client's address (behind trusted proxies, the one they name).
    pub peer: String,
}

impl Upgrade {
    pub fn new(
        worker: Rc<Worker>,
        stream: Conn,
        head: RequestHead,
        leftover: Vec<u8>,
        accept: String,
        peer: String,
    ) -> Upgrade {
        Upgrade {
            worker,
            stream,
            head,
            leftover,
            accept,
            peer,
        }
    }

    /// Refuses with an HTTP error, counted under `reason`.
    pub async fn refuse(mut self, reason: &str, err: HttpError) {
        refuse(&self.worker, &mut self.stream, reason, err, &self.peer).await;
    }

    /// The plain admission most front-ends share: refused with 503 while
    /// the server stops or at MAX_CONNECTIONS, else accepted and run by
    /// `fe`'s session.
    pub async fn admit<F: crate::session::FrontEnd>(self, fe: Rc<F>, admitted: F::Admitted) {
        let shared = self.worker.shared.clone();
        // (After a restart's handover an upgrade that got in is served:
        // the drain closes it like the others, and it reconnects.)
        let handed_over = shared
            .handed_over
            .load(std::sync::atomic::Ordering::Acquire);
        if shared.is_shutting_down() && !handed_over {
            let err = HttpError::new(503, "server shutting down");
            return self.refuse("shutting_down", err).await;
        }
        if !shared.try_reserve_connection() {
            let err = HttpError::new(503, "connection limit reached (MAX_CONNECTIONS)");
            return self.refuse("max_connections", err).await;
        }
        self.accept().start(fe, admitted);
    }

    /// Accepts the upgrade: the response (101) goes out when the session
    /// starts, or ahead of a refusal sent over the WebSocket.
    pub fn accept(self) -> Accepted {
        // Copied to its own exact size: the handshake buffer is freed now,
        // not kept for the connection's life.
        let leftover = self.leftover.as_slice().to_vec();
        Accepted {
            response: head::switching_protocols(&self.accept),
            worker: self.worker,
            stream: self.stream.into_stream(),
            leftover,
            peer: self.peer,
        }
    }
}

/// An upgrade a front-end accepted, its response (101) not yet sent.
pub struct Accepted {
    pub worker: Rc<Worker>,
    stream: Stream,
    response: Vec<u8>,
    leftover: Vec<u8>,
    peer: String,
}

impl Accepted {
    /// Completes the handshake, sends `frames` (a refusal and a close
    /// frame, for protocols that refuse over the WebSocket) and drops the
    /// connection.
    pub async fn send_and_close(self, frames: Vec<u8>) {
        let mut out = self.response;
        out.extend_from_slice(&frames);
        self.stream.send_and_close(out).await;
    }

    /// Runs the connection's session with front-end `fe`. The connection
    /// is registered (its subscriptions live) before the response goes
    /// out, so a client that sees the handshake complete misses nothing
    /// published after. The session owns the MAX_CONNECTIONS slot the
    /// caller reserved, and releases it however the connection ends.
    pub fn start<F: crate::session::FrontEnd>(self, fe: Rc<F>, admitted: F::Admitted) {
        crate::session::start(
            self.worker,
            self.stream,
            self.response,
            self.leftover,
            fe,
            admitted,
            &self.peer,
        );
    }
}

/// Refuses an upgrade with `err`, counting it under `reason`.
pub async fn refuse(worker: &Worker, stream: &mut Conn, reason: &str, err: HttpError, peer: &str) {
    tracing::debug!(peer, reason, error = %err, "upgrade refused");
    worker.shared.metrics.reject(reason);
    stream.send(head::error_response(&err)).await;
}
