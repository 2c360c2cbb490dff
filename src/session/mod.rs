//! A WebSocket connection's two tasks, after the upgrade, driving any
//! front-end ([`FrontEnd`]).
//!
//! The **reader** waits for readability, then reads into its core's shared
//! read buffer ([`crate::transport::tcp`]); a connection keeps bytes of its
//! own only while a frame is cut between reads, so an idle connection owns
//! no read buffer. Frames are decoded in place
//! ([`Decoder`]); control frames are
//! answered here (RFC 6455), and each message goes to the front-end, which
//! applies it to the engine. Before each frame it checks the cross-core bus
//! and stops reading while that is congested. A message the front-end must
//! hold (waiting on the authorizer) holds back only this connection's later
//! messages.
//!
//! The **writer** sleeps until frames are queued, then hands up to
//! `WRITE_BUFFER_SIZE` bytes of them to one write.
//!
//! Closing: a close frame is queued (by either side's close, a protocol
//! error, an expired token, a slow consumer or shutdown); the writer exits
//! once it is written; the reader exits on the peer's close, EOF, or when
//! the close deadline cuts the socket; then the front-end is told and the
//! connection is removed.
//!
//! An idle connection's memory is mostly these two tasks, so their futures
//! are kept flat: no async wrapper around a transport's own future, rare
//! and large states (an authorizer call, the close) boxed.

use std::future::{poll_fn, Future};
use std::rc::Rc;

use bytes::Bytes;

use crate::engine::message::Encoding;
use crate::transport::tcp::Batch;
use crate::transport::tcp::{ReadHalf, Stream, WriteHalf};
use crate::transport::ws::codec::{Decoded, Decoder, Message, WsError};
use crate::transport::ws::frame;
use crate::worker::Worker;

/// What a front-end does with one connection's messages.
///
/// The session owns the connection's state (`Conn`) for its whole life and
/// calls the front-end with it; state other connections must reach (a
/// Pusher app's presence members) lives in the front-end's per-core or
/// node-wide state instead.
pub trait FrontEnd: 'static {
    /// The wire format published messages reach this front-end's
    /// connections in.
    const ENCODING: Encoding;
    /// The close code its connections get when the server shuts down.
    const SHUTDOWN_CODE: u16;
    /// What the front-end keeps per connection.
    type Conn;
    /// What an admitted upgrade hands to [`FrontEnd::open`].
    type Admitted;
    /// An action that must wait (for the authorizer) before the
    /// connection's later messages are handled.
    type Wait;

    /// The connection exists (registered with the engine as `cx.key`):
    /// its first frames may be queued here.
    fn open(&self, cx: &Cx<'_>, admitted: Self::Admitted) -> Self::Conn;

    /// One text message.
    fn on_text(&self, cx: &Cx<'_>, conn: &mut Self::Conn, text: &[u8]) -> Flow<Self::Wait>;

    /// One binary message.
    fn on_binary(&self, cx: &Cx<'_>, conn: &mut Self::Conn, data: &[u8]) -> Flow<Self::Wait>;

    /// Any frame arrived, control frames included (a sign of life).
    fn on_activity(&self, _cx: &Cx<'_>, _conn: &mut Self::Conn) {}

    /// Waits out `wait` and applies it; later messages wait meanwhile
    /// (the session boxes this future: it may be large).
    fn resume<'a>(
        &'a self,
        cx: Cx<'a>,
        conn: &'a mut Self::Conn,
        wait: Self::Wait,
    ) -> impl Future<Output = ()> + 'a;

    /// A message over MAX_MESSAGE_SIZE: a frame to send before the 1009
    /// close (protocol.md's `too_large`), if this protocol has one.
    fn too_large(&self, _reason: &str) -> Option<Bytes> {
        None
    }

    /// The connection ended (before the engine forgets it).
    fn close(&self, cx: &Cx<'_>, conn: &mut Self::Conn);
}

/// Who a front-end call is about.
#[derive(Clone, Copy)]
pub struct Cx<'a> {
    pub worker: &'a Worker,
    /// The connection's slot in its core's shard.
    pub key: usize,
    pub gen: u64,
}

/// What the reader does after a message.
#[derive(Debug)]
pub enum Flow<W> {
    Continue,
    /// The bus towards another core is full: stop reading until it drains.
    Congested,
    /// The connection is finished (closing handshake or failure).
    Stop,
    /// An action must wait: later messages wait behind it.
    Wait(W),
}

/// Most reads per readiness event before yielding to other tasks.
const READS_PER_WAKE: usize = 4;
/// A partial-frame buffer larger than this is freed once emptied.
const KEEP_PENDING: usize = 4096;

/// Starts an accepted connection: registers it with the engine and opens
/// it with its front-end (its subscriptions are live from here), then, in
/// a task of its own (so that nothing the caller cancels can leave it half
/// made), sends the handshake's `response` and spawns the connection's
/// writer and reader. The reader's task removes the connection when it
/// ends and releases its MAX_CONNECTIONS slot (as the first task does if
/// the response cannot be sent).
///
/// The setup runs before the reader's task exists, so that the long-lived
/// task carries only what it needs for the connection's whole life (an
/// idle connection's memory is mostly its two tasks).
pub fn start<F: FrontEnd>(
    worker: Rc<Worker>,
    stream: Stream,
    response: Vec<u8>,
    leftover: Vec<u8>,
    fe: Rc<F>,
    admitted: F::Admitted,
    peer: &str,
) {
    stream.limit_kernel_backlog(worker.shared.config.send_queue_limit);
    let (key, gen) =
        worker
            .core
            .shard
            .borrow_mut()
            .open(stream.cut_handle(), F::ENCODING, F::SHUTDOWN_CODE);
    tracing::debug!(worker = worker.id, conn = gen, peer, "connection opened");
    let cx = Cx {
        worker: &worker,
        key,
        gen,
    };
    let conn = fe.open(&cx, admitted);
    let reader = Reader {
        key,
        gen,
        decoder: Decoder::new(worker.shared.config.max_message_size),
        pending: leftover,
        want: 0,
        conn,
    };
    monoio::spawn(respond(worker, stream, response, fe, reader));
}

/// Sends the handshake's response, then runs the connection.
async fn respond<F: FrontEnd>(
    worker: Rc<Worker>,
    mut stream: Stream,
    response: Vec<u8>,
    fe: Rc<F>,
    mut reader: Reader<F>,
) {
    if stream.send_all(response).await.is_err() {
        fe.close(&reader.cx(&worker), &mut reader.conn);
        worker.core.remove(reader.key, reader.gen);
        worker.shared.release_connection();
        return;
    }
    let (rd, wr) = stream.split();
    let writer = monoio::spawn(write_loop(wr, worker.clone(), reader.key, reader.gen));
    monoio::spawn(read_loop(worker, rd, fe, reader, writer));
}

/// The reader's task: reads until the connection ends, then lets the
/// writer finish (within CLOSE_TIMEOUT) and removes the connection.
///
/// An `async move` block rather than an `async fn`: an async fn's state
/// keeps its arguments twice (as captured, then as locals), which for the
/// reader would cost every idle connection another copy of its state.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn read_loop<F: FrontEnd>(
    worker: Rc<Worker>,
    rd: ReadHalf,
    fe: Rc<F>,
    mut reader: Reader<F>,
    writer: monoio::task::JoinHandle<()>,
) -> impl Future<Output = ()> {
    async move {
        reader.run(&worker, &rd, &fe).await;
        let cx = Cx {
            worker: &worker,
            key: reader.key,
            gen: reader.gen,
        };
        fe.close(&cx, &mut reader.conn);
        // Boxed: the end of a connection is rare next to its life; inline,
        // its state (a timer) would enlarge every connection's task.
        Box::pin(finish(&worker, &rd, reader.key, reader.gen, writer)).await;
        drop(rd);
        worker.shared.release_connection();
    }
}

async fn finish(
    worker: &Worker,
    rd: &ReadHalf,
    key: usize,
    gen: u64,
    writer: monoio::task::JoinHandle<()>,
) {
    worker.core.shard.borrow_mut().abandon(key, gen);
    let close_timeout = worker.shared.config.close_timeout;
    if monoio::time::timeout(close_timeout, writer).await.is_err() {
        worker.core.shard.borrow_mut().cut(key, gen);
    }
    let closed = worker.core.remove(key, gen);
    if let Some(c) = closed.filter(|_| tracing::enabled!(tracing::Level::DEBUG)) {
        let peer = rd.peer().map_or_else(|| "gone".into(), |p| p.to_string());
        tracing::debug!(
            worker = worker.id,
            conn = gen,
            peer,
            code = c.code,
            seconds = c.lasted.as_secs_f64(),
            "connection closed"
        );
    }
}

struct Reader<F: FrontEnd> {
    key: usize,
    gen: u64,
    decoder: Decoder,
    /// Bytes of a frame cut by a read (or left unprocessed by congestion).
    pending: Vec<u8>,
    /// Size of the frame `pending` starts, once its header is known.
    want: usize,
    /// The front-end's state of this connection.
    conn: F::Conn,
}

/// A reader's flow after waiting out any action it holds.
macro_rules! settle {
    ($reader:expr, $worker:expr, $fe:expr, $flow:expr) => {
        match $flow {
            Flow::Wait(w) => Box::pin($reader.wait($worker, $fe, w)).await,
            flow => flow,
        }
    };
}

impl<F: FrontEnd> Reader<F> {
    fn cx<'a>(&self, worker: &'a Worker) -> Cx<'a> {
        Cx {
            worker,
            key: self.key,
            gen: self.gen,
        }
    }

    async fn run(&mut self, worker: &Worker, rd: &ReadHalf, fe: &F) {
        let core = &worker.core;
        if !self.pending.is_empty() {
            let flow = self.process_pending(worker, fe);
            if matches!(settle!(self, worker, fe, flow), Flow::Stop) {
                return;
            }
        }
        loop {
            if core.congested() {
                core.wait_for_space().await;
                let flow = self.process_pending(worker, fe);
                if matches!(settle!(self, worker, fe, flow), Flow::Stop) {
                    return;
                }
                continue;
            }
            if rd.readable().await.is_err() {
                return;
            }
            for _ in 0..READS_PER_WAKE {
                let (flow, full) = {
                    let mut scratch = worker.scratch.borrow_mut();
                    let n = match rd.read_now(&mut scratch) {
                        Ok(Some(0)) => return,
                        Ok(Some(n)) => n,
                        Ok(None) => break,
                        Err(_) => return,
                    };
                    worker.core.shard.borrow_mut().seen(self.key);
                    let full = n == scratch.len();
                    let flow = if self.pending.is_empty() {
                        let (flow, used) = self.process(worker, fe, &mut scratch[..n]);
                        if used < n {
                            self.pending.reserve(self.want.max(n - used));
                            self.pending.extend_from_slice(&scratch[used..n]);
                        }
                        flow
                    } else {
                        self.pending.extend_from_slice(&scratch[..n]);
                        drop(scratch);
                        self.process_pending(worker, fe)
                    };
                    (flow, full)
                };
                match settle!(self, worker, fe, flow) {
                    Flow::Stop => return,
                    Flow::Congested => break,
                    Flow::Continue if !full => break,
                    Flow::Continue | Flow::Wait(_) => {}
                }
            }
        }
    }

    /// Waits out the action `w`, applying it and then the messages that
    /// arrived behind it (and any action they hold), in order. Called
    /// through [`settle!`], boxed: waits are rare, and inline their state
    /// would enlarge every connection's task for its whole life.
    async fn wait(&mut self, worker: &Worker, fe: &F, w: F::Wait) -> Flow<F::Wait> {
        let mut flow = Flow::Wait(w);
        while let Flow::Wait(w) = flow {
            let cx = self.cx(worker);
            fe.resume(cx, &mut self.conn, w).await;
            flow = self.process_pending(worker, fe);
        }
        flow
    }

    /// Processes the connection's own pending bytes.
    fn process_pending(&mut self, worker: &Worker, fe: &F) -> Flow<F::Wait> {
        let mut pending = std::mem::take(&mut self.pending);
        let (flow, used) = self.process(worker, fe, &mut pending);
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
    fn process(&mut self, worker: &Worker, fe: &F, buf: &mut [u8]) -> (Flow<F::Wait>, usize) {
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
                        let cx = Cx {
                            worker,
                            key: self.key,
                            gen: self.gen,
                        };
                        match handle(&cx, fe, &mut self.conn, m) {
                            Flow::Continue => {}
                            flow => return (flow, used),
                        }
                    }
                }
                Err(e) => {
                    fail(worker, fe, self.key, &e);
                    return (Flow::Stop, used);
                }
            }
        }
        (Flow::Continue, used)
    }
}

/// Fails the connection (RFC 6455 §7.1.7) with the close code of `err`.
fn fail<F: FrontEnd>(worker: &Worker, fe: &F, key: usize, err: &WsError) {
    let mut shard = worker.core.shard.borrow_mut();
    match err {
        WsError::TooLarge { .. } => {
            if let Some(f) = fe.too_large(&err.to_string()) {
                shard.push(key, f);
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
fn handle<F: FrontEnd>(cx: &Cx<'_>, fe: &F, conn: &mut F::Conn, msg: Message<'_>) -> Flow<F::Wait> {
    let core = &cx.worker.core;
    let closing = core
        .shard
        .borrow()
        .conn(cx.key)
        .is_none_or(|c| c.is_closing());
    match msg {
        Message::Close(body) => {
            // §5.5.1: answer a close with a close echoing its code, then
            // stop; if we sent ours first, this completes the handshake.
            if !closing {
                let code = body.map(|(code, _)| code);
                core.shard.borrow_mut().close(cx.key, code, "", false);
            }
            Flow::Stop
        }
        // §1.4: after sending a close frame, data is no longer processed.
        _ if closing => Flow::Continue,
        Message::Ping(payload) => {
            fe.on_activity(cx, conn);
            core.shard.borrow_mut().push(cx.key, frame::pong(payload));
            Flow::Continue
        }
        Message::Pong(payload) => {
            fe.on_activity(cx, conn);
            core.pong(cx.key, payload);
            Flow::Continue
        }
        Message::Text(text) => {
            core.stats.messages_in.inc();
            core.stats.bytes_in.add(text.len() as u64);
            fe.on_activity(cx, conn);
            fe.on_text(cx, conn, text)
        }
        Message::Binary(data) => {
            core.stats.messages_in.inc();
            core.stats.bytes_in.add(data.len() as u64);
            fe.on_activity(cx, conn);
            fe.on_binary(cx, conn, data)
        }
    }
}

/// Writes queued frames, many per system call, until the connection ends
/// (an `async move` block, like the reader's, for its size).
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn write_loop(
    mut wr: WriteHalf,
    worker: Rc<Worker>,
    key: usize,
    gen: u64,
) -> impl Future<Output = ()> {
    async move {
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
            // the iovec import of writev; several: one vectored write. Each
            // awaited here, not in a wrapper: a wrapper's state would hold the
            // batch twice in every connection's writer.
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
}
