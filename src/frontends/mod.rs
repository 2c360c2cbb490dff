//! The protocols herald speaks on top of the engine, each a folder: its
//! own ([`native`]: protocol.md, wsify's commands, the HTTP publish API),
//! the conformance [`echo`], and Pusher Channels ([`pusher`]).
//!
//! A front-end plugs in here, in three places: its node-wide state in
//! [`FrontEnds`], its per-core [`Endpoint`] in [`endpoints`], and its
//! encoder in [`ENCODERS`]. The router ([`crate::transport::http1::server`])
//! hands each WebSocket upgrade and each HTTP request to the endpoint that
//! serves its path, and ticks each endpoint ten times a second; the session
//! ([`crate::session`]) drives the connections it admits through its [`FrontEnd`](crate::session::FrontEnd)
//! implementation. Nothing else names a front-end.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;

use crate::config::Config;
use crate::engine::message::Encoder;
use crate::integrations::metrics::Metrics;
use crate::runtime::worker::{Shared, Worker};
use crate::transport::http1::head::{HttpError, RequestHead};
use crate::transport::http1::server;
use crate::transport::tcp::Stream;

pub mod echo;
pub mod native;
pub mod pusher;

/// Every front-end's encoder, by encoding: each front-end's `ENCODING` is
/// its index here (checked by a test below).
pub static ENCODERS: &[Encoder] = &[native::protocol::encode, pusher::encode];

/// The front-ends' node-wide state.
pub struct FrontEnds {
    /// Pusher apps and their cross-core state, when any app exists.
    pub pusher: Option<Arc<pusher::PusherShared>>,
}

impl FrontEnds {
    pub fn new(config: &Config, apps: pusher::apps::Apps, metrics: &Arc<Metrics>) -> FrontEnds {
        FrontEnds {
            pusher: pusher::PusherShared::start(config, apps, metrics),
        }
    }
}

/// One core's endpoints, in the order the router asks them.
pub fn endpoints(worker_id: usize, shared: &Arc<Shared>) -> Vec<Rc<dyn Endpoint>> {
    let mut all: Vec<Rc<dyn Endpoint>> = vec![Rc::new(native::Native::new(shared))];
    if shared.config.echo_endpoint {
        all.push(Rc::new(echo::Echo));
    }
    if let Some(p) = &shared.frontends.pusher {
        all.push(Rc::new(pusher::Pusher::new(worker_id, p.clone())));
    }
    all
}

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
    /// cores, idle sweeps at their own pace).
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
    stream: TcpStream,
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
        stream: TcpStream,
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
        server::refuse(&self.worker, &mut self.stream, reason, err, &self.peer).await;
    }

    /// The plain admission most front-ends share: refused with 503 while
    /// the server stops or at MAX_CONNECTIONS, else accepted and run by
    /// `fe`'s session.
    pub async fn admit<F: crate::session::FrontEnd>(self, fe: Rc<F>, admitted: F::Admitted) {
        let shared = self.worker.shared.clone();
        if shared.is_shutting_down() {
            let err = HttpError::new(503, "server shutting down");
            return self.refuse("shutting_down", err).await;
        }
        if !shared.try_reserve_connection() {
            let err = HttpError::new(503, "connection limit reached (MAX_CONNECTIONS)");
            return self.refuse("max_connections", err).await;
        }
        match self.accept().await {
            Some(conn) => conn.start(fe, admitted),
            None => shared.release_connection(),
        }
    }

    /// Completes the handshake (101): the connection is a WebSocket, with
    /// what the client sent after its request head. `None` if the client
    /// is gone.
    pub async fn accept(mut self) -> Option<Accepted> {
        let ok = server::send(
            &mut self.stream,
            crate::transport::http1::head::switching_protocols(&self.accept),
        )
        .await;
        if !ok {
            return None;
        }
        tracing::trace!(peer = self.peer, worker = self.worker.id, "websocket open");
        // Copied to its own exact size: the handshake buffer is freed now,
        // not kept for the connection's life.
        let leftover = self.leftover.as_slice().to_vec();
        Some(Accepted {
            worker: self.worker,
            stream: Stream::new(self.stream),
            leftover,
        })
    }
}

/// A connection that became a WebSocket, ready for
/// [`session::start`](crate::session::start).
pub struct Accepted {
    pub worker: Rc<Worker>,
    pub stream: Stream,
    pub leftover: Vec<u8>,
}

impl Accepted {
    /// Sends `bytes` (frames written before the session starts, such as a
    /// refusal and a close frame) and drops the connection.
    pub async fn send_and_close(self, bytes: Vec<u8>) {
        self.stream.send_and_close(bytes).await;
    }

    /// Runs the connection's session with front-end `fe`.
    pub fn start<F: crate::session::FrontEnd>(self, fe: Rc<F>, admitted: F::Admitted) {
        crate::session::start(self.worker, self.stream, self.leftover, fe, admitted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_index_their_encoders() {
        assert_eq!(usize::from(native::protocol::ENCODING.0), 0);
        assert_eq!(usize::from(pusher::ENCODING.0), 1);
        assert_eq!(ENCODERS.len(), 2);
    }
}
