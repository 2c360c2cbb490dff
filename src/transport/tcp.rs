//! TCP connections, as the router ([`Conn`]) and the session ([`Stream`])
//! read and write them: the one place that holds a socket's file
//! descriptor and makes system calls on it. A connection with TLS
//! ([`super::tls`]) has the same surface: it decrypts what it reads and
//! encrypts what it writes, so nothing above this layer knows.
//!
//! Reads are readiness-based: wait until readable, then read as much as
//! there is into the core's shared buffer (an idle connection holds no
//! read buffer). Writes own their frames ([`Batch`]): one frame goes out
//! with a plain `send`, several with one vectored write, submitted through
//! the reactor (io_uring batches the submissions).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use bytes::{Buf, Bytes};
use monoio::io::{AsyncWriteRent, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use monoio::BufResult;

use super::tls;
use crate::engine::shard::FrameSink;

/// A connection before it becomes a WebSocket: HTTP requests and
/// responses, over TLS or not.
pub struct Conn {
    tcp: TcpStream,
    tls: Option<tls::Shared>,
}

impl Conn {
    pub fn plain(tcp: TcpStream) -> Conn {
        Conn { tcp, tls: None }
    }

    pub fn with_tls(tcp: TcpStream, session: tls::Session) -> Conn {
        Conn {
            tcp,
            tls: Some(std::rc::Rc::new(session)),
        }
    }

    /// Reads at most `max` more bytes into `buf`; `Ok(0)` is EOF.
    pub async fn read_more(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        let Some(session) = &self.tls else {
            return read_more(&self.tcp, buf, max).await;
        };
        // Decrypted straight into `buf`'s new room.
        let old = buf.len();
        buf.resize(old + max.min(16 * 1024), 0);
        loop {
            match session.read_now(self.tcp.as_raw_fd(), &mut buf[old..]) {
                Ok(Some(n)) => {
                    buf.truncate(old + n);
                    return Ok(n);
                }
                Ok(None) => {}
                Err(e) => {
                    buf.truncate(old);
                    return Err(e);
                }
            }
            if let Err(e) = self.tcp.readable(false).await {
                buf.truncate(old);
                return Err(e);
            }
        }
    }

    /// Writes `bytes` whole; false if the peer is gone.
    pub async fn send(&mut self, bytes: Vec<u8>) -> bool {
        use monoio::io::AsyncWriteRentExt;
        let bytes = match &self.tls {
            None => bytes,
            Some(session) => match session.seal([bytes.as_slice()]) {
                Ok(records) => records,
                Err(_) => return false,
            },
        };
        let (res, _) = self.tcp.write_all(bytes).await;
        res.is_ok()
    }

    /// The connection's socket, for what happens before a request
    /// (TLS handshake).
    pub fn tcp(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }

    /// The upgraded connection.
    pub fn into_stream(self) -> Stream {
        Stream {
            inner: self.tcp,
            tls: self.tls,
        }
    }
}

/// An upgraded connection's socket.
pub struct Stream {
    inner: TcpStream,
    tls: Option<tls::Shared>,
}

impl Stream {
    /// What the engine cuts the connection with ([`cut`]).
    pub fn cut_handle(&self) -> i32 {
        self.inner.as_raw_fd()
    }

    /// Caps the bytes the kernel keeps unsent for this socket
    /// (TCP_NOTSENT_LOWAT). Without it, send-buffer autotuning lets a
    /// stalled client's backlog grow to `tcp_wmem`'s maximum inside the
    /// kernel, where SEND_QUEUE_LIMIT cannot see it; with it, the backlog
    /// stays in herald's queue and is counted.
    pub fn limit_kernel_backlog(&self, send_queue_limit: usize) {
        let lowat = (send_queue_limit / 4).clamp(16 * 1024, 256 * 1024) as libc::c_int;
        // SAFETY: setsockopt on an open socket with a correctly sized value.
        unsafe {
            libc::setsockopt(
                self.inner.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&lowat as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }

    /// The reading and the writing side, for two tasks.
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        let fd = self.inner.as_raw_fd();
        let (rd, wr) = self.inner.into_split();
        let tls = self.tls;
        (
            ReadHalf {
                rd,
                fd,
                tls: tls.clone(),
            },
            WriteHalf { wr, tls },
        )
    }
}

/// Plain HTTP (before a connection becomes a WebSocket):
/// reads at most `max` more bytes into `buf`; `Ok(0)` is EOF.
pub async fn read_more(stream: &TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
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

/// Shuts a connection down both ways, given its [`Stream::cut_handle`]:
/// pending reads see EOF, writes fail, and both tasks end.
pub fn cut(handle: i32) {
    // SAFETY: the engine cuts only connections it still holds, whose
    // sockets are open.
    unsafe {
        libc::shutdown(handle, libc::SHUT_RDWR);
    }
}

/// The reading side of a connection.
pub struct ReadHalf {
    rd: OwnedReadHalf<TcpStream>,
    fd: RawFd,
    tls: Option<tls::Shared>,
}

impl ReadHalf {
    /// Waits until the socket is readable (or closed). monoio's own
    /// future, unwrapped: it lives in every idle connection's task.
    pub fn readable(&self) -> impl Future<Output = io::Result<()>> + '_ {
        // SAFETY: a shared reference used only to wait for readiness; the
        // write half mutates nothing that `readable` reads (monoio's own
        // split halves share the stream the same way).
        let stream: &TcpStream = unsafe { &*self.rd.0.get() };
        // Decrypted bytes already waiting are readable now.
        use futures_util::future::Either;
        match self.tls.as_ref().is_some_and(|t| t.has_pending()) {
            false => Either::Left(stream.readable(false)),
            true => Either::Right(std::future::ready(Ok(()))),
        }
    }

    /// The peer's address, while the socket still knows it (not after a
    /// reset).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        // SAFETY: the descriptor is open for as long as `self` lives.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.fd) };
        socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
    }

    /// Reads what is there now into `buf`: `Ok(Some(0))` at EOF,
    /// `Ok(None)` when nothing is (would block).
    pub fn read_now(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match &self.tls {
            Some(session) => session.read_now(self.fd, buf),
            None => super::socket::recv_now(self.fd, buf),
        }
    }
}

/// The writing side of a connection.
pub struct WriteHalf {
    wr: OwnedWriteHalf<TcpStream>,
    tls: Option<tls::Shared>,
}

impl Stream {
    /// Writes `bytes` whole (the handshake's response, before the
    /// session's tasks exist).
    pub async fn send_all(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        use monoio::io::AsyncWriteRentExt;
        let bytes = match &self.tls {
            None => bytes,
            Some(session) => session.seal([bytes.as_slice()])?,
        };
        self.inner.write_all(bytes).await.0.map(|_| ())
    }

    /// Writes `bytes` whole (a refusal and its close frame), then drops
    /// the connection.
    pub async fn send_and_close(mut self, bytes: Vec<u8>) {
        let _ = self.send_all(bytes).await;
    }
}

/// monoio's own write futures, unwrapped: they live in every
/// connection's writer task.
impl WriteHalf {
    /// Sends one frame with a plain send (no iovec to import); returns the
    /// bytes written and the frame.
    pub fn write(&mut self, frame: Bytes) -> impl Future<Output = BufResult<usize, Bytes>> + '_ {
        use futures_util::future::Either;
        match self.tls.clone() {
            None => Either::Left(self.wr.write(frame)),
            // Boxed: a plain connection's writer does not carry its state.
            Some(session) => Either::Right(Box::pin(async move {
                let res = sealed_write(&mut self.wr, &session, [&frame[..]]).await;
                (res.map(|()| frame.len()), frame)
            })),
        }
    }

    /// Sends a prepared [`Batch`] of frames with one vectored write;
    /// returns the bytes written and the batch (advance it by them).
    pub fn writev(&mut self, batch: Batch) -> impl Future<Output = BufResult<usize, Batch>> + '_ {
        use futures_util::future::Either;
        match self.tls.clone() {
            None => Either::Left(self.wr.writev(batch)),
            Some(session) => Either::Right(Box::pin(async move {
                let frames = batch.one.iter().chain(batch.bufs.iter()).map(|b| &b[..]);
                let res = sealed_write(&mut self.wr, &session, frames).await;
                (res.map(|()| batch.bytes), batch)
            })),
        }
    }
}

/// Encrypts `frames` and writes the records whole: over TLS a write
/// counts as done once every record of it went out.
async fn sealed_write<'a>(
    wr: &mut OwnedWriteHalf<TcpStream>,
    session: &tls::Session,
    frames: impl IntoIterator<Item = &'a [u8]>,
) -> io::Result<()> {
    use monoio::io::AsyncWriteRentExt;
    let records = session.seal(frames)?;
    let (res, records) = wr.write_all(records).await;
    session.recycle(records);
    res.map(|_| ())
}

/// Frames taken from a connection's queue for one write. Owns the `Bytes`
/// (so io_uring may hold their pointers) and, for two frames or more, the
/// iovec array of a vectored write. A single frame (the common case at low
/// rates) is held apart and needs neither array, so an idle connection's
/// writer holds no allocation at all.
pub struct Batch {
    one: Option<Bytes>,
    bufs: VecDeque<Bytes>,
    iov: Vec<libc::iovec>,
    bytes: usize,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Self {
        Batch {
            one: None,
            bufs: VecDeque::new(),
            iov: Vec::new(),
            bytes: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.one.is_none() && self.bufs.is_empty()
    }

    /// Frames held.
    pub fn frames(&self) -> usize {
        usize::from(self.one.is_some()) + self.bufs.len()
    }

    /// Bytes still to write.
    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn push(&mut self, b: Bytes) {
        self.bytes += b.len();
        if self.bufs.is_empty() && self.one.is_none() {
            self.one = Some(b);
            return;
        }
        if let Some(first) = self.one.take() {
            self.bufs.push_back(first);
        }
        self.bufs.push_back(b);
    }

    /// Rebuilds the iovec array; call before handing the batch to a write.
    pub fn prepare(&mut self) {
        self.iov.clear();
        self.iov.extend(self.bufs.iter().map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }));
    }

    /// Drops what a write of `n` bytes sent.
    pub fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        if let Some(one) = self.one.as_mut() {
            if one.len() <= n {
                self.one = None;
            } else {
                one.advance(n);
            }
            return;
        }
        while n > 0 {
            let Some(front) = self.bufs.front_mut() else {
                break;
            };
            if front.len() <= n {
                n -= front.len();
                self.bufs.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }

    /// Takes the batch's only frame out, for a plain `send` (no iovec to
    /// import); `restore` puts back what was not written.
    pub fn take_single(&mut self) -> Option<Bytes> {
        self.one.take()
    }

    /// Puts back the frame [`Batch::take_single`] took.
    pub fn restore(&mut self, b: Bytes) {
        self.one = Some(b);
    }

    /// Frees the buffers of an empty batch (its writer is going idle).
    pub fn release(&mut self) {
        if self.is_empty() && (self.bufs.capacity() > 0 || self.iov.capacity() > 0) {
            *self = Batch::new();
        }
    }
}

// SAFETY: `iov` points into the `Bytes` in `bufs`, whose heap data never
// moves while the batch is owned by the runtime; `prepare` keeps the two in
// step and nothing changes `bufs` while a write is in flight.
unsafe impl monoio::buf::IoVecBuf for Batch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov.as_ptr()
    }
    fn read_iovec_len(&self) -> usize {
        self.iov.len()
    }
}

impl FrameSink for Batch {
    fn frames(&self) -> usize {
        Batch::frames(self)
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
    fn push(&mut self, frame: Bytes) {
        Batch::push(self, frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_advance_handles_partial_writes() {
        let mut b = Batch::new();
        b.push(Bytes::from_static(b"abc"));
        b.push(Bytes::from_static(b"defg"));
        b.advance(4);
        assert_eq!(b.len(), 3);
        assert_eq!(&b.bufs[0][..], b"efg");
        b.advance(3);
        assert!(b.is_empty());
        b.release();
        assert_eq!(b.bufs.capacity(), 0);
        // One frame needs no array.
        b.push(Bytes::from_static(b"hello"));
        assert_eq!(b.bufs.capacity(), 0);
        b.advance(2);
        assert_eq!(b.take_single().as_deref(), Some(&b"llo"[..]));
    }
}
