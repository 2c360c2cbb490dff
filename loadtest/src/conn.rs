//! Opening connections (loopback-only targets, spread over several
//! 127.0.0.x source addresses; ws:// or wss://) and reading events from
//! them.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{anyhow, bail, Context};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::adapter::{Adapter, Event, Parser};
use crate::tls::Stream;
use crate::ws::{self, Mask};

/// Where to connect: a `ws://` URL on the loopback network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Request path with query.
    pub path: String,
    /// wss://: TLS, with the CA of `--tls-ca`.
    pub tls: bool,
}

/// Parses `ws://HOST[:PORT][/path]`, refusing any host outside
/// 127.0.0.0/8 (`localhost` means 127.0.0.1).
pub fn parse_url(url: &str) -> anyhow::Result<Target> {
    let (rest, tls) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
        (Some(r), _) => (r, false),
        (_, Some(r)) => (r, true),
        _ => bail!("--url must start with ws:// or wss:// (got {url:?})"),
    };
    let (hostport, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .with_context(|| format!("bad port in --url {url:?}"))?,
        ),
        None => (hostport, 80),
    };
    let ip: Ipv4Addr = if host.eq_ignore_ascii_case("localhost") {
        Ipv4Addr::LOCALHOST
    } else {
        host.parse().map_err(|_| {
            anyhow!("--url host must be an IPv4 loopback address or localhost (got {host:?})")
        })?
    };
    if !ip.is_loopback() {
        bail!("refusing --url {url:?}: only 127.0.0.0/8 (or localhost) may be targeted");
    }
    if port == 0 {
        bail!("--url needs a port");
    }
    Ok(Target {
        addr: SocketAddr::V4(SocketAddrV4::new(ip, port)),
        host: hostport.to_string(),
        path,
        tls,
    })
}

/// Round-robin over loopback source addresses 127.0.0.2, 127.0.0.3, ...
pub struct Sources {
    addrs: Vec<Ipv4Addr>,
    next: AtomicUsize,
}

impl Sources {
    /// `n` addresses starting at 127.0.0.2; `n = 0` lets the kernel choose.
    pub fn new(n: usize) -> Sources {
        let addrs = (0..n)
            .map(|i| {
                let v = u32::from(Ipv4Addr::new(127, 0, 0, 2)) + i as u32;
                Ipv4Addr::from(v)
            })
            .collect();
        Sources {
            addrs,
            next: AtomicUsize::new(0),
        }
    }

    pub fn pick(&self) -> Option<Ipv4Addr> {
        if self.addrs.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.addrs[i % self.addrs.len()])
    }
}

/// A TCP connection from `src` (port chosen at connect time, so the
/// 4-tuple, not the port alone, has to be unique).
pub async fn tcp_connect(target: &Target, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    if let Some(src) = src {
        let one: libc::c_int = 1;
        // Best effort: without it, bind() reserves the port for every
        // destination and the ephemeral range runs out sooner.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    }
    let std_stream: std::net::TcpStream = sock.into();
    let s = tokio::net::TcpSocket::from_std_stream(std_stream);
    s.connect(target.addr).await
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Open,
    /// The server sent a close frame with this code (1005: none).
    Closed(u16),
    /// The TCP stream ended.
    Eof,
}

/// The read side of a connection: frame buffer, protocol parser, and the
/// replies (pongs) the reads made necessary.
pub struct ReadSide {
    pub reader: ws::Reader,
    pub parser: Box<dyn Parser>,
    /// Frames to send back (WebSocket pongs, NATS `PONG`s).
    pub replies: Vec<u8>,
    pub mask: Mask,
}

impl ReadSide {
    /// Reads once from `r` and calls `f` for every event in what arrived.
    pub async fn read_events<R: AsyncRead + Unpin>(
        &mut self,
        adapter: &dyn Adapter,
        r: &mut R,
        f: &mut (dyn FnMut(Event<'_>) + Send),
    ) -> io::Result<Status> {
        if self.reader.fill(r).await? == 0 {
            return Ok(Status::Eof);
        }
        self.dispatch(adapter, f)
    }

    /// Handles the frames already buffered.
    pub fn dispatch(
        &mut self,
        adapter: &dyn Adapter,
        f: &mut dyn FnMut(Event<'_>),
    ) -> io::Result<Status> {
        let mut status = Status::Open;
        let parser = &mut self.parser;
        let replies = &mut self.replies;
        let mask = &mut self.mask;
        self.reader
            .frames(|h, p| match h.opcode {
                ws::OP_PING => ws::write_frame(replies, ws::OP_PONG, p, mask.key()),
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    let code = if p.len() >= 2 {
                        u16::from_be_bytes([p[0], p[1]])
                    } else {
                        1005
                    };
                    if status == Status::Open {
                        status = Status::Closed(code);
                    }
                }
                _ if status == Status::Open => parser.feed(h.opcode, h.fin, p, &mut |e| {
                    if e == Event::ServerPing {
                        adapter.pong(replies, mask);
                    }
                    f(e)
                }),
                _ => {}
            })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(status)
    }
}

/// An open WebSocket connection that has spoken the protocol's hello.
pub struct Conn {
    pub stream: Stream,
    pub rs: ReadSide,
}

/// Connects, upgrades, and reads the greeting where the server speaks
/// first (NATS `INFO`, then `CONNECT` is sent; Pusher
/// `connection_established`, whose `socket_id` the parser keeps).
pub async fn open(
    adapter: &dyn Adapter,
    target: &Target,
    src: Option<Ipv4Addr>,
    read_buf: usize,
    channel: Option<&str>,
    seed: u64,
) -> anyhow::Result<Conn> {
    let tcp = tcp_connect(target, src)
        .await
        .with_context(|| format!("connect to {} from {src:?}", target.addr))?;
    let mut stream = match target.tls {
        false => Stream::Plain(tcp),
        true => {
            let host = target
                .host
                .rsplit_once(':')
                .map_or(&*target.host, |(h, _)| h);
            crate::tls::connect(tcp, host)
                .await
                .with_context(|| format!("TLS handshake with {}", target.addr))?
        }
    };
    let mut mask = Mask::new(seed ^ crate::adapter::now_ns());
    let key = ws::new_key(&mut mask);
    stream
        .write_all(ws::handshake_request(&target.host, &target.path, &key).as_bytes())
        .await?;
    let mut reader = ws::Reader::new(read_buf);
    loop {
        if reader.fill(&mut stream).await? == 0 {
            bail!("server closed the connection during the upgrade");
        }
        match ws::parse_handshake_response(reader.pending(), &key) {
            Ok(None) => continue,
            Ok(Some(n)) => {
                reader.consume(n);
                break;
            }
            Err(e) => bail!("{e}"),
        }
    }
    let mut rs = ReadSide {
        reader,
        parser: adapter.parser(channel),
        replies: Vec::new(),
        mask,
    };
    let mut conn_out = Vec::new();
    if adapter.expects_greeting() {
        let mut got_info = false;
        let mut err = None;
        let mut status = rs.dispatch(adapter, &mut |e| match e {
            Event::Info => got_info = true,
            Event::Error(b) => err = Some(String::from_utf8_lossy(b).into_owned()),
            _ => {}
        })?;
        while !got_info && err.is_none() && status == Status::Open {
            status = rs
                .read_events(adapter, &mut stream, &mut |e| match e {
                    Event::Info => got_info = true,
                    Event::Error(b) => err = Some(String::from_utf8_lossy(b).into_owned()),
                    _ => {}
                })
                .await?;
        }
        if let Some(e) = err {
            bail!("server error before its greeting: {e}");
        }
        if !got_info {
            bail!("connection ended before the server's greeting ({status:?})");
        }
    }
    adapter.hello(&mut conn_out, &mut rs.mask);
    conn_out.append(&mut rs.replies);
    if !conn_out.is_empty() {
        stream.write_all(&conn_out).await?;
    }
    Ok(Conn { stream, rs })
}

impl Conn {
    /// Writes any pending replies.
    pub async fn flush_replies(&mut self) -> io::Result<()> {
        if !self.rs.replies.is_empty() {
            self.stream.write_all(&self.rs.replies).await?;
            self.rs.replies.clear();
        }
        Ok(())
    }

    /// Reads once, calls `f` on the events, answers pings.
    pub async fn read_events(
        &mut self,
        adapter: &dyn Adapter,
        f: &mut (dyn FnMut(Event<'_>) + Send),
    ) -> io::Result<Status> {
        let st = self.rs.read_events(adapter, &mut self.stream, f).await?;
        self.flush_replies().await?;
        Ok(st)
    }

    /// Subscribes to `channel` and waits for the server's confirmation.
    /// Messages arriving meanwhile are counted in the return value.
    pub async fn subscribe(
        &mut self,
        adapter: &dyn Adapter,
        channel: &str,
        sid: u64,
    ) -> anyhow::Result<u64> {
        let mut out = Vec::new();
        let socket_id = self.rs.parser.socket_id();
        adapter.subscribe(&mut out, &mut self.rs.mask, channel, sid, socket_id);
        self.stream.write_all(&out).await?;
        let mut confirmed = false;
        let mut early = 0u64;
        let mut err = None;
        while !confirmed {
            let st = self
                .read_events(adapter, &mut |e| match e {
                    Event::Confirm => confirmed = true,
                    Event::Message { .. } => early += 1,
                    Event::Error(b) => err = Some(String::from_utf8_lossy(b).into_owned()),
                    _ => {}
                })
                .await?;
            if let Some(e) = err.take() {
                bail!("subscribe {channel}: {e}");
            }
            if st != Status::Open && !confirmed {
                bail!("subscribe {channel}: connection ended ({st:?})");
            }
        }
        Ok(early)
    }

    /// Sends a close frame and waits (briefly) for the server's answer.
    pub async fn close(mut self, adapter: &dyn Adapter) {
        let mut out = Vec::new();
        ws::write_close(&mut out, 1000, self.rs.mask.key());
        if self.stream.write_all(&out).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
            while let Ok(Status::Open) = self.read_events(adapter, &mut |_| {}).await {}
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_loopback() {
        let t = parse_url("ws://127.0.0.1:6380/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:6380".parse().unwrap());
        assert_eq!(t.path, "/ws");
        assert_eq!(t.host, "127.0.0.1:6380");
        let t = parse_url("wss://localhost:6443/ws").unwrap();
        assert!(t.tls && t.host == "localhost:6443" && t.path == "/ws");
        assert!(!parse_url("ws://127.0.0.1:6380/ws").unwrap().tls);
        let t = parse_url("ws://localhost:4222").unwrap();
        assert_eq!(t.addr, "127.0.0.1:4222".parse().unwrap());
        assert_eq!(t.path, "/");
        let t = parse_url("ws://127.9.8.7:1?x=1").unwrap();
        assert_eq!(t.path, "/?x=1");
        for bad in [
            "ws://10.0.0.1:80/ws",
            "ws://192.168.1.2:6380",
            "ws://example.com:80",
            "http://127.0.0.1:6380",
            "ws://[::1]:6380",
            "ws://127.0.0.1:0",
            "ws://127.0.0.1:port",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sources_rotate_from_127_0_0_2() {
        let s = Sources::new(3);
        let got: Vec<_> = (0..4).map(|_| s.pick().unwrap().to_string()).collect();
        assert_eq!(got, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2"]);
        assert_eq!(Sources::new(0).pick(), None);
    }
}
