//! Real brokers for the cluster tests: a `redis-server` or a
//! `nats-server` (with JetStream) of the test's own on a loopback port
//! (both installed by scripts/test-deps.sh), and a TCP proxy that can cut
//! a node off from it without closing anything, as a network partition
//! does.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{free_port, wait_for};

/// Which broker a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Nats,
}

impl Kind {
    pub fn start(self) -> Box<dyn TestBroker> {
        self.on(free_port())
    }

    /// Starts (or restarts, empty) on `port`.
    pub fn on(self, port: u16) -> Box<dyn TestBroker> {
        match self {
            Kind::Redis => Box::new(Redis::on(port)),
            Kind::Nats => Box::new(Nats::on(port)),
        }
    }

    pub fn scheme(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Nats => "nats",
        }
    }
}

/// What the cluster tests need of either broker.
pub trait TestBroker {
    fn port(&self) -> u16;
    fn url(&self) -> String;
    /// How many nodes are subscribed to the channel of routing key `key`.
    fn subscribers(&self, key: &str) -> u64;
    /// Kills the server at once (SIGKILL), as a crash does.
    fn kill(&mut self);
}

impl TestBroker for Redis {
    fn port(&self) -> u16 {
        self.port
    }
    fn url(&self) -> String {
        Redis::url(self)
    }
    fn subscribers(&self, key: &str) -> u64 {
        Redis::subscribers(self, &format!("herald:{key}"))
    }
    fn kill(&mut self) {
        Redis::kill(self)
    }
}

/// A `nats-server -js` on a loopback port (its JetStream store in a
/// temporary directory, its monitoring on another port), killed on drop.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    monitor: u16,
    dir: std::path::PathBuf,
}

impl Nats {
    pub fn start() -> Nats {
        Self::on(free_port())
    }

    /// Starts (or restarts, empty) on `port`, and waits until it answers.
    pub fn on(port: u16) -> Nats {
        let monitor = free_port();
        let dir = std::env::temp_dir().join(format!("herald-nats-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = ["nats-server", "/usr/sbin/nats-server"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("nats-server (scripts/test-deps.sh installs it)");
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string()])
            .args(["-m", &monitor.to_string(), "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server");
        let n = Nats {
            child: Some(child),
            port,
            monitor,
            dir,
        };
        wait_for("nats-server to answer", || {
            n.monitoring("/healthz").is_some_and(|b| b.contains("ok"))
        });
        n
    }

    /// A monitoring page's body.
    fn monitoring(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.monitor)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (_, body) = out.split_once("\r\n\r\n")?;
        Some(body.to_string())
    }
}

impl TestBroker for Nats {
    fn port(&self) -> u16 {
        self.port
    }
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    fn subscribers(&self, key: &str) -> u64 {
        let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        let subject = format!("herald.o.{hex}");
        let Some(body) = self.monitoring("/connz?subs=1&limit=1024") else {
            return 0;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["connections"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .filter(|c| {
                        c["subscriptions_list"]
                            .as_array()
                            .is_some_and(|l| l.iter().any(|s| *s == *subject))
                    })
                    .count() as u64
            })
            .unwrap_or(0)
    }
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        TestBroker::kill(self);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` on a loopback port, without persistence, killed on
/// drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        Self::on(free_port())
    }

    /// Starts (or restarts) on `port`, and waits until it answers.
    pub fn on(port: u16) -> Redis {
        Self::spawn(port, None)
    }

    /// Starts (or restarts) on `port` with an append-only file in `dir`,
    /// written before each command is answered: what Redis answered
    /// survives a `kill -9`.
    pub fn durable(port: u16, dir: &std::path::Path) -> Redis {
        Self::spawn(port, Some(dir))
    }

    fn spawn(port: u16, dir: Option<&std::path::Path>) -> Redis {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--protected-mode", "no"]);
        match dir {
            None => cmd.args(["--appendonly", "no"]),
            Some(d) => cmd
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .arg("--dir")
                .arg(d),
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test-deps.sh installs it)");
        let r = Redis {
            child: Some(child),
            port,
        };
        wait_for("redis-server to answer", || r.cli(&["PING"]) == "PONG");
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs a command with `redis-cli`; its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// How many connections are subscribed to broker channel `channel`.
    pub fn subscribers(&self, channel: &str) -> u64 {
        let out = self.cli(&["PUBSUB", "NUMSUB", channel]);
        out.lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Kills the server at once (SIGKILL), as a crash does.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP proxy to `127.0.0.1:upstream` that can be frozen: while frozen it
/// forwards nothing and closes nothing (bytes are dropped, new
/// connections wait), as when a network partition drops packets.
pub struct Proxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (frozen.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let (f, s) = (f.clone(), s.clone());
                std::thread::spawn(move || {
                    // A connection made during a partition goes nowhere.
                    while f.load(Ordering::SeqCst) && !s.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                        let mut probe = [0u8; 1];
                        client.set_nonblocking(true).ok();
                        if let Ok(0) = client.peek(&mut probe) {
                            return;
                        }
                    }
                    client.set_nonblocking(false).ok();
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    pump_both(client, up, f, s);
                });
            }
        });
        Proxy { port, frozen, stop }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The proxy's address for a broker of `kind`.
    pub fn url_for(&self, kind: Kind) -> String {
        format!("{}://127.0.0.1:{}", kind.scheme(), self.port)
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump_both(a: TcpStream, b: TcpStream, frozen: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (f2, s2) = (frozen.clone(), stop.clone());
    std::thread::spawn(move || pump(b2, a2, f2, s2));
    pump(a, b, frozen, stop);
}

/// Copies `from` to `to` until either closes; drops what it reads while
/// frozen (once frozen, this connection never forwards again: its stream
/// lost bytes, as after a partition).
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    let mut buf = [0u8; 16384];
    let mut broken = false;
    from.set_read_timeout(Some(Duration::from_millis(100))).ok();
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                broken |= frozen.load(Ordering::SeqCst);
                if !broken && to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                broken |= frozen.load(Ordering::SeqCst);
            }
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
