//! `floor`: the kernel's price of a fan-out, with no server at all.
//!
//! A "null server" that does the one thing no fan-out server can avoid:
//! one `send(2)` of a ready-made WebSocket frame per subscriber socket per
//! message, from `--senders` threads (like a server's cores) that each own
//! a share of the subscribers; and the cheapest possible subscriber side,
//! `--readers` threads that `epoll_wait` and `recv` with no runtime, no
//! task and no allocation. Everything runs over loopback TCP in this one
//! process, on the same machine a real server is measured on.
//!
//! It reports CPU per delivery on each side (thread CPU clocks) and the
//! latency from the start of a message's fan-out to each subscriber's
//! `recv`. Those are lower bounds for any server and any client on this
//! machine: a real server adds its own work, a real harness its own, on
//! top of exactly this kernel path.

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::report::{self, Latency, Table};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Subscriber sockets.
    #[arg(long, default_value_t = 1000)]
    subs: usize,
    /// Payload bytes per message (at least 8: the send timestamp).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages per second (each goes to every subscriber).
    #[arg(long, default_value_t = 100)]
    rate: u64,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Threads sending (a server's cores).
    #[arg(long, default_value_t = 2)]
    senders: usize,
    /// Threads receiving (the harness's).
    #[arg(long, default_value_t = 2)]
    readers: usize,
}

impl Args {
    pub fn command(&self) -> String {
        format!(
            "floor --subs {} --size {} --rate {} --duration {} --senders {} --readers {}",
            self.subs, self.size, self.rate, self.duration, self.senders, self.readers
        )
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.subs == 0 || self.subs > 18_000 {
            bail!("--subs must be 1..=18000");
        }
        if !(8..=125).contains(&self.size) {
            bail!("--size must be 8..=125 (a one-byte-length frame)");
        }
        if self.rate == 0 || self.rate > 10_000 {
            bail!("--rate must be 1..=10000");
        }
        if !(self.duration > 0.0 && self.duration <= 120.0) {
            bail!("--duration must be in (0, 120]");
        }
        if !(1..=16).contains(&self.senders) || !(1..=16).contains(&self.readers) {
            bail!("--senders and --readers must be 1..=16");
        }
        Ok(())
    }
}

/// CPU per delivery of one side, in the field names `summarize` reads.
#[derive(Serialize)]
pub struct Side {
    pub cpu_ns_per_unit: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub scenario: &'static str,
    /// Always "floor": `summarize` shows it next to herald and nats.
    pub protocol: &'static str,
    pub label: Option<String>,
    pub command: String,
    pub messages: u64,
    pub expected_deliveries: u64,
    pub received_deliveries: u64,
    /// Sender threads' CPU (user + system) per delivery: the null server.
    pub server: Side,
    /// Reader threads' CPU per delivery: the cheapest subscriber side.
    pub client: Side,
    pub latency: Latency,
    pub ok: bool,
}

impl Report {
    pub fn table(&self) -> Table {
        let mut t = Table::new(format!("{} (no server: the kernel's floor)", self.command));
        t.row("messages", self.messages)
            .row(
                "deliveries",
                format!(
                    "{} of {} expected",
                    self.received_deliveries, self.expected_deliveries
                ),
            )
            .row(
                "send CPU per delivery",
                format!("{:.0} ns", self.server.cpu_ns_per_unit),
            )
            .row(
                "recv CPU per delivery",
                format!("{:.0} ns", self.client.cpu_ns_per_unit),
            )
            .row("latency", self.latency.row())
            .row(
                "result",
                if self.ok {
                    "OK"
                } else {
                    "NOT OK: lost deliveries"
                },
            );
        t
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Nanoseconds since `base` (shared by senders and readers).
fn since(base: Instant) -> u64 {
    base.elapsed().as_nanos() as u64
}

/// Sends `frame` whole on a blocking socket.
fn send_all(fd: RawFd, mut frame: &[u8]) -> std::io::Result<()> {
    while !frame.is_empty() {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        frame = &frame[n as usize..];
    }
    Ok(())
}

/// Reads every frame on `fds` until `stop` is set and nothing arrives for
/// 20 ms (or the deadline). Returns the latency histogram and CPU ns.
fn reader(
    fds: Vec<RawFd>,
    base: Instant,
    frame_len: usize,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> (Histogram<u64>, u64) {
    let cpu0 = thread_cpu_ns();
    let mut hist = report::new_hist();
    // SAFETY: plain epoll calls on sockets this thread reads.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    // Bytes of a frame cut between reads, per socket.
    let mut partial: Vec<Vec<u8>> = vec![Vec::new(); fds.len()];
    for (i, &fd) in fds.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 20) };
        if n <= 0 {
            if stop.load(Ordering::Acquire) {
                break;
            }
            continue;
        }
        for ev in &events[..n as usize] {
            let i = ev.u64 as usize;
            let got = unsafe {
                libc::recv(
                    fds[i],
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if got <= 0 {
                continue;
            }
            let now = since(base);
            let p = &mut partial[i];
            p.extend_from_slice(&buf[..got as usize]);
            let whole = p.len() / frame_len * frame_len;
            for f in p[..whole].chunks_exact(frame_len) {
                let sent = u64::from_le_bytes(f[2..10].try_into().unwrap());
                let _ = hist.record(now.saturating_sub(sent).max(1000) / 1000);
            }
            p.drain(..whole);
        }
    }
    unsafe { libc::close(ep) };
    (hist, thread_cpu_ns() - cpu0)
}

pub fn run(a: &Args, label: Option<String>) -> anyhow::Result<Report> {
    a.check()?;
    let listener = TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut clients = Vec::with_capacity(a.subs);
    let mut servers = Vec::with_capacity(a.subs);
    for _ in 0..a.subs {
        let c = TcpStream::connect(addr).context("connect over loopback")?;
        c.set_nodelay(true)?;
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        clients.push(c);
        servers.push(s);
    }
    let frame_len = 2 + a.size;
    let interval = Duration::from_nanos(1_000_000_000 / a.rate);
    let messages = ((a.duration * a.rate as f64) as u64).max(1);
    let base = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration) + Duration::from_secs(10);

    let mut readers = Vec::new();
    for r in 0..a.readers {
        let fds: Vec<RawFd> = clients
            .iter()
            .skip(r)
            .step_by(a.readers)
            .map(|c| c.as_raw_fd())
            .collect();
        let stop = stop.clone();
        readers.push(std::thread::spawn(move || {
            reader(fds, base, frame_len, stop, deadline)
        }));
    }
    // Every sender starts message k at the same instant: one "publish".
    let start = Instant::now() + Duration::from_millis(50);
    let barrier = Arc::new(Barrier::new(a.senders));
    let mut senders = Vec::new();
    for s in 0..a.senders {
        let fds: Vec<RawFd> = servers
            .iter()
            .skip(s)
            .step_by(a.senders)
            .map(|c| c.as_raw_fd())
            .collect();
        let barrier = barrier.clone();
        senders.push(std::thread::spawn(move || -> std::io::Result<u64> {
            barrier.wait();
            let cpu0 = thread_cpu_ns();
            let mut frame = vec![0u8; frame_len];
            frame[0] = 0x82; // FIN + binary, unmasked: a server frame
            frame[1] = (frame_len - 2) as u8;
            for k in 0..messages {
                let at = start + interval * k as u32;
                if let Some(d) = at.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
                let t = since(base);
                frame[2..10].copy_from_slice(&t.to_le_bytes());
                for &fd in &fds {
                    send_all(fd, &frame)?;
                }
            }
            Ok(thread_cpu_ns() - cpu0)
        }));
    }
    let mut send_cpu = 0;
    for s in senders {
        send_cpu += s.join().expect("sender thread")?;
    }
    let expected = messages * a.subs as u64;
    // Everything sent is in the sockets: readers drain it, then stop once
    // idle for one epoll timeout.
    stop.store(true, Ordering::Release);
    let mut hist = report::new_hist();
    let mut recv_cpu = 0;
    for r in readers {
        let (h, cpu) = r.join().expect("reader thread");
        hist.add(h).ok();
        recv_cpu += cpu;
    }
    let got = hist.len();
    Ok(Report {
        scenario: "floor",
        protocol: "floor",
        label,
        command: a.command(),
        messages,
        expected_deliveries: expected,
        received_deliveries: got,
        server: Side {
            cpu_ns_per_unit: report::round3(send_cpu as f64 / expected as f64),
        },
        client: Side {
            cpu_ns_per_unit: report::round3(recv_cpu as f64 / got.max(1) as f64),
        },
        latency: Latency::of(&hist),
        ok: got == expected,
    })
}
