//! A WebSocket connection's two tasks, after the upgrade.
//!
//! The **reader** waits for readability, then `recv`s into its core's
//! shared read buffer; a connection keeps bytes of its own only while a
//! frame is cut between reads, so an idle connection owns no read buffer.
//! Frames are decoded in place ([`Decoder`]) and each message is handled at
//! once: requests are applied to the [`Shard`](crate::engine::shard::Shard),
//! publishes go through [`Core::publish`](crate::engine::core::Core::publish). Before each frame it checks
//! the cross-core bus and stops reading while that is congested.
//!
//! The **writer** sleeps until frames are queued, then hands up to
//! `WRITE_BUFFER_SIZE` bytes of them to one vectored write.
//!
//! Closing: a close frame is queued (by either side's close, a protocol
//! error, an expired token, a slow consumer or shutdown); the writer exits
//! once it is written; the reader exits on the peer's close, EOF, or when
//! the close deadline cuts the socket; then the connection is removed.

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use monoio::io::{AsyncWriteRent, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use crate::auth::Grant;
use crate::engine::message::Message as Published;
use crate::engine::shard::unix_ms;
use crate::engine::shard::{Batch, SubscribeError};
use crate::frontends::native::protocol::{self, ErrorCode, Op};
use crate::frontends::pusher::{self, apps::App, connection::PusherConn};
use crate::integrations::authorizer::{self, Action, ConnAuthz, Decision};
use crate::runtime::worker::Worker;
use crate::transport::ws::codec::{Decoded, Decoder, Message, WsError};
use crate::transport::ws::frame;

/// What a connection does with the messages it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The protocol of protocol.md.
    PubSub,
    /// Echo every message back (`/echo`, for conformance testing).
    Echo,
    /// The Pusher Channels protocol (`/app/{key}`).
    Pusher,
}

/// The Pusher app a Pusher-mode connection belongs to, and its namespace.
pub type PusherApp = (Arc<App>, u16);

#[derive(Debug)]
enum Flow {
    Continue,
    /// The bus towards another core is full: stop reading until it drains.
    Congested,
    /// The connection is finished (closing handshake or failure).
    Stop,
    /// An action awaits the authorizer: later messages wait behind it.
    Wait(Box<Deferred>),
}

/// A subscribe, unsubscribe or publish waiting for the authorizer, with
/// everything needed to apply it once allowed (the message it came from is
/// gone by then).
#[derive(Debug)]
struct Deferred {
    action: Action,
    channel: Box<str>,
    id: Option<Box<str>>,
    /// The request to POST.
    body: Vec<u8>,
    /// The encoded frame, for a publish.
    publish: Option<Published>,
}

/// Most `recv` calls per readiness event before yielding to other tasks.
const READS_PER_WAKE: usize = 4;
/// A partial-frame buffer larger than this is freed once emptied.
const KEEP_PENDING: usize = 4096;

/// Caps the bytes the kernel keeps unsent for this socket (TCP_NOTSENT_LOWAT).
/// Without it, send-buffer autotuning lets a stalled client's backlog grow
/// to `tcp_wmem`'s maximum inside the kernel, where SEND_QUEUE_LIMIT cannot
/// see it; with it, the backlog stays in herald's queue and is counted.
fn limit_kernel_backlog(fd: RawFd, send_queue_limit: usize) {
    let lowat = (send_queue_limit / 4).clamp(16 * 1024, 256 * 1024) as libc::c_int;
    // SAFETY: setsockopt on an open socket with a correctly sized value.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&lowat as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Starts an upgraded connection: registers it with the shard, then spawns
/// its writer and its reader; the reader's task removes it when it ends
/// and releases its MAX_CONNECTIONS slot.
///
/// The setup runs here, before any task exists, so that the long-lived
/// reader task carries only what it needs for the connection's whole life
/// (an idle connection's memory is mostly its two tasks).
pub fn start(
    worker: Rc<Worker>,
    stream: TcpStream,
    leftover: Vec<u8>,
    grant: Arc<Grant>,
    authz: Option<Box<ConnAuthz>>,
    mode: Mode,
    pusher_app: Option<PusherApp>,
) {
    let fd = stream.as_raw_fd();
    limit_kernel_backlog(fd, worker.shared.config.send_queue_limit);
    let encoding = match mode {
        Mode::Pusher => crate::frontends::pusher::ENCODING,
        Mode::PubSub | Mode::Echo => protocol::ENCODING,
    };
    let (key, gen) = {
        let mut shard = worker.core.shard.borrow_mut();
        let (key, gen) = shard.open(fd, grant, encoding);
        shard.set_authz(key, authz);
        if let Some((app, ns)) = pusher_app {
            let socket_id = pusher::socket::format(worker.id, key, gen);
            let timeout = worker
                .shared
                .pusher
                .as_ref()
                .map_or(120, |p| p.activity_timeout.as_secs() as u32);
            shard.push(
                key,
                pusher::wire::connection_established(&socket_id, timeout),
            );
            shard.set_pusher(key, PusherConn::new(app, ns, socket_id, unix_ms()));
        }
        (key, gen)
    };
    let (rd, wr) = stream.into_split();
    let writer = monoio::spawn(write_loop(wr, worker.clone(), key, gen));
    let reader = Reader {
        key,
        mode,
        fd,
        decoder: Decoder::new(worker.shared.config.max_message_size),
        pending: leftover,
        want: 0,
    };
    monoio::spawn(read_loop(worker, rd, reader, writer, gen));
}

/// The reader's task: reads until the connection ends, then lets the
/// writer finish (within CLOSE_TIMEOUT) and removes the connection.
async fn read_loop(
    worker: Rc<Worker>,
    rd: OwnedReadHalf<TcpStream>,
    mut reader: Reader,
    writer: monoio::task::JoinHandle<()>,
    gen: u64,
) {
    reader.run(&worker, &rd).await;
    // Boxed: the end of a connection is rare next to its life; inline, its
    // state (a timer) would enlarge every connection's task.
    Box::pin(finish(&worker, reader.key, gen, reader.mode, writer)).await;
    drop(rd);
    worker.shared.release_connection();
}

async fn finish(
    worker: &Worker,
    key: usize,
    gen: u64,
    mode: Mode,
    writer: monoio::task::JoinHandle<()>,
) {
    if mode == Mode::Pusher {
        pusher::connection::on_close(worker, key);
    }
    worker.core.shard.borrow_mut().abandon(key, gen);
    let close_timeout = worker.shared.config.close_timeout;
    if monoio::time::timeout(close_timeout, writer).await.is_err() {
        worker.core.shard.borrow_mut().cut(key, gen);
    }
    worker.core.remove(key, gen);
}

struct Reader {
    key: usize,
    mode: Mode,
    fd: RawFd,
    decoder: Decoder,
    /// Bytes of a frame cut by a read (or left unprocessed by congestion).
    pending: Vec<u8>,
    /// Size of the frame `pending` starts, once its header is known.
    want: usize,
}

/// `recv(2)` without blocking.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

impl Reader {
    async fn run(&mut self, worker: &Worker, rd: &OwnedReadHalf<TcpStream>) {
        // SAFETY: a shared reference used only to wait for readiness; the
        // write half mutates nothing that `readable` reads (monoio's own
        // split halves share the stream the same way).
        let stream: &TcpStream = unsafe { &*rd.0.get() };
        let core = &worker.core;
        if !self.pending.is_empty() {
            let flow = self.process_pending(worker);
            if matches!(self.settle(worker, flow).await, Flow::Stop) {
                return;
            }
        }
        loop {
            if core.congested() {
                core.wait_for_space().await;
                let flow = self.process_pending(worker);
                if matches!(self.settle(worker, flow).await, Flow::Stop) {
                    return;
                }
                continue;
            }
            if stream.readable(false).await.is_err() {
                return;
            }
            for _ in 0..READS_PER_WAKE {
                let (flow, full) = {
                    let mut scratch = worker.scratch.borrow_mut();
                    let n = match recv(self.fd, &mut scratch) {
                        Ok(0) => return,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => return,
                    };
                    worker.core.shard.borrow_mut().seen(self.key);
                    let full = n == scratch.len();
                    let flow = if self.pending.is_empty() {
                        let (flow, used) = self.process(worker, &mut scratch[..n]);
                        if used < n {
                            self.pending.reserve(self.want.max(n - used));
                            self.pending.extend_from_slice(&scratch[used..n]);
                        }
                        flow
                    } else {
                        self.pending.extend_from_slice(&scratch[..n]);
                        drop(scratch);
                        self.process_pending(worker)
                    };
                    (flow, full)
                };
                match self.settle(worker, flow).await {
                    Flow::Stop => return,
                    Flow::Congested => break,
                    Flow::Continue if !full => break,
                    Flow::Continue | Flow::Wait(_) => {}
                }
            }
        }
    }

    /// Waits out every authorization `flow` asks for, applying each answer
    /// and then the messages that arrived behind it, in order.
    async fn settle(&mut self, worker: &Worker, mut flow: Flow) -> Flow {
        while let Flow::Wait(d) = flow {
            // Boxed: the HTTP request is large and rare; inline it would
            // enlarge every connection's task for its whole life.
            Box::pin(self.authorize(worker, *d)).await;
            flow = self.process_pending(worker);
        }
        flow
    }

    /// Asks the authorizer about `d` and applies the answer: allowed, the
    /// action happens; denied, `forbidden`; authorizer down, close 1013.
    async fn authorize(&mut self, worker: &Worker, d: Deferred) {
        let Some(authorizer) = worker.authorizer.as_ref() else {
            return;
        };
        let decision = authorizer.ask(d.body).await;
        worker
            .shared
            .metrics
            .authorized(d.action.as_str(), decision.label());
        let key = self.key;
        let gone = worker
            .core
            .shard
            .borrow()
            .conn(key)
            .is_none_or(|c| c.is_closing());
        if gone {
            return;
        }
        let id = d.id.as_deref();
        match decision {
            Decision::Allow(_) => {
                // Many connections may be answered at once: each publish
                // respects the bus's backpressure like a fresh one.
                if d.publish.is_some() && worker.core.congested() {
                    worker.core.wait_for_space().await;
                }
                let ttl = authorizer.cache_ttl;
                if !ttl.is_zero() {
                    if let Some(a) = worker.core.shard.borrow_mut().authz_mut(key) {
                        a.remember(d.action, &d.channel, Instant::now() + ttl);
                    }
                }
                apply(worker, key, d.action, &d.channel, id, d.publish);
            }
            Decision::Deny(status) => {
                let msg = format!(
                    "not authorized to {} on channel {} (authorizer answered {status})",
                    d.action.as_str(),
                    d.channel
                );
                let reply = protocol::error(id, ErrorCode::Forbidden, &msg);
                worker.core.shard.borrow_mut().push(key, reply);
            }
            Decision::Unavailable(why) => {
                tracing::warn!(error = %why, "authorizer unavailable: closing connection with 1013");
                worker.core.shard.borrow_mut().close(
                    key,
                    Some(1013),
                    "authorizer unavailable, try again later",
                    false,
                );
            }
        }
    }

    /// Processes the connection's own pending bytes.
    fn process_pending(&mut self, worker: &Worker) -> Flow {
        let mut pending = std::mem::take(&mut self.pending);
        let (flow, used) = self.process(worker, &mut pending);
        pending.drain(..used);
        if pending.is_empty() && pending.capacity() > KEEP_PENDING {
            pending = Vec::new();
        } else if self.want > pending.capacity() {
            pending.reserve(self.want - pending.len());
        }
        self.pending = pending;
        flow
    }

    /// Decodes and handles the frames in `buf`; returns how far it got.
    fn process(&mut self, worker: &Worker, buf: &mut [u8]) -> (Flow, usize) {
        let mut used = 0;
        self.want = 0;
        while used < buf.len() {
            if worker.core.congested() {
                return (Flow::Congested, used);
            }
            match self.decoder.decode(&mut buf[used..]) {
                Ok(Decoded::Incomplete { frame_len }) => {
                    self.want = frame_len;
                    break;
                }
                Ok(Decoded::Frame { consumed, message }) => {
                    used += consumed;
                    if let Some(m) = message {
                        match handle(worker, self.key, self.mode, m) {
                            Flow::Continue => {}
                            flow => return (flow, used),
                        }
                    }
                }
                Err(e) => {
                    fail(worker, self.key, self.mode, &e);
                    return (Flow::Stop, used);
                }
            }
        }
        (Flow::Continue, used)
    }
}

/// Fails the connection (RFC 6455 §7.1.7) with the close code of `err`.
fn fail(worker: &Worker, key: usize, mode: Mode, err: &WsError) {
    let mut shard = worker.core.shard.borrow_mut();
    match err {
        WsError::TooLarge { .. } => {
            if mode == Mode::PubSub {
                shard.push(
                    key,
                    protocol::error(None, ErrorCode::TooLarge, &err.to_string()),
                );
            }
            shard.close(key, Some(err.close_code()), "message too big", false);
        }
        _ => {
            worker.core.stats.protocol_errors.inc();
            shard.close(key, Some(err.close_code()), &err.to_string(), false);
        }
    }
}

/// Handles one complete message or control frame.
fn handle(worker: &Worker, key: usize, mode: Mode, msg: Message<'_>) -> Flow {
    let closing = worker
        .core
        .shard
        .borrow()
        .conn(key)
        .is_none_or(|c| c.is_closing());
    match msg {
        Message::Close(body) => {
            // §5.5.1: answer a close with a close echoing its code, then
            // stop; if we sent ours first, this completes the handshake.
            if !closing {
                let code = body.map(|(code, _)| code);
                worker.core.shard.borrow_mut().close(key, code, "", false);
            }
            Flow::Stop
        }
        // §1.4: after sending a close frame, data is no longer processed.
        _ if closing => Flow::Continue,
        Message::Ping(payload) => {
            let mut shard = worker.core.shard.borrow_mut();
            if let Some(p) = shard.pusher_mut(key) {
                p.seen(unix_ms());
            }
            shard.push(key, frame::pong(payload));
            Flow::Continue
        }
        Message::Pong => {
            if let Some(p) = worker.core.shard.borrow_mut().pusher_mut(key) {
                p.seen(unix_ms());
            }
            Flow::Continue
        }
        Message::Text(text) => {
            worker.core.stats.messages_in.inc();
            worker.core.stats.bytes_in.add(text.len() as u64);
            match mode {
                Mode::PubSub => handle_request(worker, key, text),
                Mode::Echo => {
                    worker.core.shard.borrow_mut().push(key, frame::text(text));
                    Flow::Continue
                }
                Mode::Pusher => {
                    pusher::connection::handle_text(worker, key, text, unix_ms());
                    Flow::Continue
                }
            }
        }
        Message::Binary(data) => {
            worker.core.stats.messages_in.inc();
            worker.core.stats.bytes_in.add(data.len() as u64);
            match mode {
                Mode::PubSub => handle_binary(worker, key, data),
                Mode::Echo => {
                    worker
                        .core
                        .shard
                        .borrow_mut()
                        .push(key, frame::binary(data));
                    Flow::Continue
                }
                Mode::Pusher => {
                    let msg = "binary frames are not part of the Pusher protocol";
                    let reply = pusher::wire::error(None, msg);
                    worker.core.shard.borrow_mut().push(key, reply);
                    Flow::Continue
                }
            }
        }
    }
}

/// Checks write permission and rate; `Err` is the error frame to send.
fn may_publish(
    worker: &Worker,
    key: usize,
    channel: &str,
    id: Option<&str>,
) -> Result<(), bytes::Bytes> {
    let mut shard = worker.core.shard.borrow_mut();
    let allowed = shard
        .conn(key)
        .is_some_and(|c| c.grant.write.allows(channel));
    if !allowed {
        let msg = format!("no write permission on channel {channel}");
        return Err(protocol::error(id, ErrorCode::Forbidden, &msg));
    }
    if !shard.take_publish_token(key) {
        return Err(protocol::error(
            id,
            ErrorCode::RateLimited,
            "publish rate limit exceeded",
        ));
    }
    Ok(())
}

/// Returns the action to wait for when the authorizer must approve
/// `action` on `channel` for this connection (and has not recently).
fn needs_approval(
    worker: &Worker,
    key: usize,
    action: Action,
    channel: &str,
    data: Option<&str>,
) -> Option<Vec<u8>> {
    let authorizer = worker.authorizer.as_ref()?;
    if !authorizer.wants(action) {
        return None;
    }
    let mut shard = worker.core.shard.borrow_mut();
    let authz = shard.authz_mut(key)?;
    if !authorizer.cache_ttl.is_zero() && authz.cached(action, channel, Instant::now()) {
        worker.shared.metrics.authorized(action.as_str(), "cached");
        return None;
    }
    Some(authorizer::action_body(
        action,
        channel,
        data,
        &authz.client_json,
    ))
}

/// Defers `action` behind the authorizer if it must approve it.
fn defer(
    worker: &Worker,
    key: usize,
    action: Action,
    channel: &str,
    id: Option<&str>,
    data: Option<&str>,
    publish: impl FnOnce() -> Option<Published>,
) -> Option<Flow> {
    let body = needs_approval(worker, key, action, channel, data)?;
    Some(Flow::Wait(Box::new(Deferred {
        action,
        channel: channel.into(),
        id: id.map(Into::into),
        body,
        publish: publish(),
    })))
}

/// Carries out an allowed action and queues its reply.
fn apply(
    worker: &Worker,
    key: usize,
    action: Action,
    channel: &str,
    id: Option<&str>,
    publish: Option<Published>,
) {
    let reply = match action {
        Action::Subscribe => match worker.core.subscribe(key, channel) {
            Ok(()) => protocol::subscribed(channel, id),
            Err(SubscribeError::TooMany(n)) => {
                let msg = format!("subscription limit of {n} channels reached");
                protocol::error(id, ErrorCode::Forbidden, &msg)
            }
        },
        Action::Unsubscribe => {
            worker.core.unsubscribe(key, channel);
            protocol::unsubscribed(channel, id)
        }
        Action::Publish => {
            if let Some(frame) = publish {
                worker.core.publish(frame, Some(key));
            }
            match id {
                Some(id) => protocol::ack(id),
                None => return,
            }
        }
        Action::Connect => return,
    };
    worker.core.shard.borrow_mut().push(key, reply);
}

/// Applies one JSON request of protocol.md and queues its reply.
fn handle_request(worker: &Worker, key: usize, text: &[u8]) -> Flow {
    let req = match protocol::parse_request(text) {
        Ok(req) => req,
        Err(e) => {
            let reply = protocol::error(e.id, ErrorCode::BadRequest, &e.message);
            worker.core.shard.borrow_mut().push(key, reply);
            return Flow::Continue;
        }
    };
    let id = req.id;
    let reply = match req.op {
        Op::Subscribe { channel } => {
            let allowed = worker
                .core
                .shard
                .borrow()
                .conn(key)
                .is_some_and(|c| c.grant.read.allows(&channel));
            if !allowed {
                let msg = format!("no read permission on channel {channel}");
                protocol::error(id, ErrorCode::Forbidden, &msg)
            } else {
                let action = Action::Subscribe;
                if let Some(wait) = defer(worker, key, action, &channel, id, None, || None) {
                    return wait;
                }
                apply(worker, key, action, &channel, id, None);
                return Flow::Continue;
            }
        }
        Op::Unsubscribe { channel } => {
            let action = Action::Unsubscribe;
            if let Some(wait) = defer(worker, key, action, &channel, id, None, || None) {
                return wait;
            }
            apply(worker, key, action, &channel, id, None);
            return Flow::Continue;
        }
        Op::Publish { channel, data } => match may_publish(worker, key, &channel, id) {
            Err(reply) => reply,
            Ok(()) => {
                let frame = || Some(protocol::message_frame(&channel, data));
                let action = Action::Publish;
                if let Some(wait) = defer(worker, key, action, &channel, id, Some(data), frame) {
                    return wait;
                }
                apply(worker, key, action, &channel, id, frame());
                return Flow::Continue;
            }
        },
        Op::Auth { token } => match worker.shared.auth.verify(&token) {
            Ok(grant) => {
                let interest = &worker.shared.hub.interest;
                worker
                    .core
                    .shard
                    .borrow_mut()
                    .reauthorize(key, grant, interest);
                protocol::authed(id)
            }
            Err(e) => protocol::error(id, ErrorCode::Unauthorized, &e.to_string()),
        },
        Op::Ping => protocol::pong(id),
    };
    worker.core.shard.borrow_mut().push(key, reply);
    Flow::Continue
}

/// Applies a binary publish (protocol.md, "Binary frames"): no ack. The
/// authorizer sees its payload as a JSON string when it is UTF-8 text, as
/// `null` otherwise.
fn handle_binary(worker: &Worker, key: usize, data: &[u8]) -> Flow {
    let (channel, payload) = match protocol::parse_binary(data) {
        Ok(parts) => parts,
        Err(msg) => {
            let reply = protocol::error(None, ErrorCode::BadRequest, msg);
            worker.core.shard.borrow_mut().push(key, reply);
            return Flow::Continue;
        }
    };
    if let Err(reply) = may_publish(worker, key, channel, None) {
        worker.core.shard.borrow_mut().push(key, reply);
        return Flow::Continue;
    }
    let frame = || Some(protocol::binary_frame(channel, payload));
    let asked = worker
        .authorizer
        .as_ref()
        .is_some_and(|a| a.wants(Action::Publish));
    let shown = match std::str::from_utf8(payload) {
        Ok(text) if asked => serde_json::to_string(text).unwrap_or_else(|_| "null".into()),
        _ => "null".into(),
    };
    let action = Action::Publish;
    if let Some(wait) = defer(worker, key, action, channel, None, Some(&shown), frame) {
        return wait;
    }
    apply(worker, key, action, channel, None, frame());
    Flow::Continue
}

/// Writes queued frames, many per system call, until the connection ends.
async fn write_loop(mut wr: OwnedWriteHalf<TcpStream>, worker: Rc<Worker>, key: usize, gen: u64) {
    let max = worker.shared.config.write_buffer_size;
    let mut batch = Batch::new();
    loop {
        let go = poll_fn(|cx| {
            let ready = worker
                .core
                .shard
                .borrow_mut()
                .fill(key, gen, &mut batch, max, cx);
            if ready.is_pending() {
                // Going idle: hold no buffers while waiting.
                batch.release();
            }
            ready
        })
        .await;
        if !go {
            break;
        }
        // One frame (the common case at low rates): a plain send, without
        // the iovec import of writev; several: one vectored write.
        let res = if let Some(one) = batch.take_single() {
            let (res, one) = wr.write(one).await;
            batch.restore(one);
            res
        } else {
            batch.prepare();
            let (res, b) = wr.writev(batch).await;
            batch = b;
            res
        };
        match res {
            Ok(n) if n > 0 => {
                batch.advance(n);
                worker.core.shard.borrow_mut().written(key, gen, n);
            }
            _ => {
                worker.core.shard.borrow_mut().cut(key, gen);
                break;
            }
        }
    }
}
