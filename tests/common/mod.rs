//! Shared harness for the end-to-end tests: starts the real `herald`
//! binary on an ephemeral loopback port and talks to it over real sockets.
//!
//! Readiness is the server's own "listening on" log line, never a sleep.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::Message;

/// How long a test waits for anything before failing.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const SECRET: &str = "test-secret";

/// A running herald process, killed on drop.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts herald with `WORKERS=2`, `PORT=0` and the given environment.
    pub fn start(env: &[(&str, &str)]) -> Server {
        Self::try_start(env).unwrap_or_else(|log| panic!("herald did not start:\n{log}"))
    }

    /// Starts herald; on failure returns what it logged.
    pub fn try_start(env: &[(&str, &str)]) -> Result<Server, String> {
        Self::spawn(env, None, None)
    }

    /// Starts `exe` (a copy of herald elsewhere) like [`Server::start`].
    pub fn start_exe(exe: &std::path::Path, env: &[(&str, &str)]) -> Server {
        Self::spawn_cmd(Command::new(exe), env, None)
            .unwrap_or_else(|log| panic!("herald did not start:\n{log}"))
    }

    /// Starts herald on `listener` as a service manager passes it (socket
    /// activation: descriptor 3, LISTEN_FDS=1, LISTEN_PID its own pid).
    pub fn start_activated(env: &[(&str, &str)], listener: &std::net::TcpListener) -> Server {
        Self::spawn(env, None, Some(listener))
            .unwrap_or_else(|log| panic!("herald did not start:\n{log}"))
    }

    /// Starts herald with its soft RLIMIT_NOFILE lowered to `soft` first.
    pub fn start_with_nofile_limit(env: &[(&str, &str)], soft: u64) -> Server {
        Self::spawn(env, Some(soft), None)
            .unwrap_or_else(|log| panic!("herald did not start:\n{log}"))
    }

    fn spawn(
        env: &[(&str, &str)],
        soft_nofile: Option<u64>,
        activation: Option<&std::net::TcpListener>,
    ) -> Result<Server, String> {
        let cmd = match activation {
            None => Command::new(env!("CARGO_BIN_EXE_herald")),
            Some(listener) => activated_command(listener),
        };
        Self::spawn_cmd(cmd, env, soft_nofile)
    }

    fn spawn_cmd(
        mut cmd: Command,
        env: &[(&str, &str)],
        soft_nofile: Option<u64>,
    ) -> Result<Server, String> {
        if let Some(soft) = soft_nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                    Ok(())
                });
            }
        }
        cmd.env_clear()
            .env("PORT", "0")
            .env("WORKERS", "2")
            .env("LOGLEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn herald");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let addr = line.find("listening on ").map(|pos| {
                    // Text or JSON log lines.
                    line[pos + 13..]
                        .split(|c: char| c.is_whitespace() || c == '"' || c == ',')
                        .next()
                        .unwrap_or("")
                        .to_string()
                });
                // Log first, so a test that sees the server ready sees the line too.
                log2.lock().unwrap().push(line);
                if let Some(addr) = addr {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => Ok(Server {
                child: Some(child),
                addr: addr.parse().expect("listening address"),
                log,
            }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(log.lock().unwrap().join("\n"))
            }
        }
    }

    /// An open-mode server with `WORKERS=2`.
    pub fn open() -> Server {
        Self::start(&[])
    }

    /// A server requiring tokens signed with [`SECRET`], on loopback.
    pub fn with_secret(extra: &[(&str, &str)]) -> Server {
        let mut env = vec![("SECRET", SECRET), ("HOST", "127.0.0.1")];
        env.extend_from_slice(extra);
        Self::start(&env)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// Waits for the process to exit, failing after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < within,
                "herald did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The values of `name{worker="0"}`, `name{worker="1"}`, ... (WORKERS=2).
    pub fn per_worker(&self, name: &str) -> Vec<f64> {
        (0..2)
            .map(|w| self.metric(&format!("{name}{{worker=\"{w}\"}}")))
            .collect()
    }

    /// The sum of `name` over all workers.
    pub fn metric_sum(&self, name: &str) -> f64 {
        self.per_worker(name).iter().sum()
    }

    /// Fetches /metrics and returns the value of the sample `name{labels}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let (status, body) = http(self.addr, "GET", "/metrics", &[], b"");
        assert_eq!(status, 200);
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix(sample) {
                if let Some(v) = rest.strip_prefix(' ') {
                    return v.trim().parse().unwrap();
                }
            }
        }
        0.0
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A signed HS256 token with the given claims.
pub fn token(claims: Value) -> String {
    token_with(SECRET, claims)
}

pub fn token_with(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A refused upgrade: HTTP status and body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

/// A WebSocket client (tungstenite, blocking, with timeouts).
pub struct Client {
    pub ws: WebSocket<TcpStream>,
}

impl Client {
    /// Connects to `path` (with query) and fails the test if refused.
    pub fn connect(server: &Server, path: &str) -> Client {
        Self::try_connect(server.addr, path, &[])
            .unwrap_or_else(|r| panic!("upgrade refused: {r:?}"))
    }

    /// Connects with extra request headers.
    pub fn try_connect(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, Refused> {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Self::handshake(stream, addr, path, headers)
    }

    /// Completes a WebSocket handshake on an already connected stream.
    pub fn handshake(
        stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, Refused> {
        let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        match tungstenite::client::client(req, stream) {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                Err(Refused {
                    status: resp.status().as_u16(),
                    body: String::from_utf8_lossy(resp.body().as_deref().unwrap_or(b""))
                        .into_owned(),
                })
            }
            Err(e) => panic!("handshake failed: {e}"),
        }
    }

    /// A connection authenticated with a token in `?auth=`.
    pub fn with_token(server: &Server, token: &str) -> Client {
        Self::connect(server, &format!("/ws?auth={token}"))
    }

    pub fn send_json(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    pub fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s.to_string())).expect("send");
    }

    /// The next data message (pings are answered by tungstenite).
    pub fn recv(&mut self) -> Message {
        loop {
            match self.ws.read() {
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                Ok(m) => return m,
                Err(e) => panic!("expected a message, got error: {e}"),
            }
        }
    }

    /// The next text message, parsed as JSON.
    pub fn recv_json(&mut self) -> Value {
        match self.recv() {
            Message::Text(t) => serde_json::from_str(&t).expect("server sent invalid JSON"),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// The next text message as JSON, or a failure that says what was
    /// awaited (`what`) and what came instead.
    pub fn next_json(&mut self, what: &str) -> Value {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return serde_json::from_str(&t).unwrap(),
                Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
                Ok(other) => panic!("{what}: unexpected {other:?}"),
                Err(e) => panic!("{what}: {e}"),
            }
        }
    }

    /// Subscribes and waits for the confirmation.
    pub fn subscribe(&mut self, channel: &str) {
        self.send_json(serde_json::json!({"op":"subscribe","channel":channel,"id":"sub"}));
        let reply = self.recv_json();
        assert_eq!(reply["op"], "subscribed", "subscribe {channel}: {reply}");
        assert_eq!(reply["channel"], channel);
    }

    /// Publishes with an id and waits for the ack.
    pub fn publish(&mut self, channel: &str, data: Value) {
        self.send_json(
            serde_json::json!({"op":"publish","channel":channel,"data":data,"id":"pub"}),
        );
        let reply = self.recv_json();
        assert_eq!(
            reply,
            serde_json::json!({"op":"ack","id":"pub"}),
            "publish on {channel}"
        );
    }

    /// Round-trips a ping: everything the server sent before is read first.
    pub fn sync(&mut self) -> Vec<Value> {
        self.send_json(serde_json::json!({"op":"ping","id":"sync"}));
        let mut before = Vec::new();
        loop {
            let v = self.recv_json();
            if v == serde_json::json!({"op":"pong","id":"sync"}) {
                return before;
            }
            before.push(v);
        }
    }

    /// Reads until the server closes; returns its close code and reason.
    pub fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.ws.read() {
                Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(_) => continue,
                Err(e) => panic!("expected a close frame, got error: {e}"),
            }
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read response");
    parse_response(&out)
}

/// Splits a raw HTTP response into status and body.
pub fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A process's resident memory in bytes, from /proc/PID/status.
pub fn rss_bytes(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024.0
}

/// The `{"result": ...}` line a tests/js script ends with (tests/js/lib.js).
pub fn script_result(stdout: &str) -> Value {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get("result").cloned())
        .unwrap_or_else(|| panic!("no result line in: {stdout}"))
}

/// A tests/js script run against a herald (tests/js/lib.js's protocol: JSON
/// lines on stdout, each barrier answered with a line on stdin, the
/// result last).
pub struct NodeScript {
    name: String,
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl NodeScript {
    /// Starts tests/js/`name` against `addr`, with `env` (and open mode's
    /// Pusher app, which lib.js asks for, unless `env` names another).
    pub fn start(name: &str, addr: SocketAddr, env: &[(&str, &str)]) -> NodeScript {
        let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
        let mut cmd = Command::new("node");
        cmd.arg(name)
            .current_dir(&js)
            .env("HERALD_ADDR", addr.to_string())
            .env("APP_ID", "app-id")
            .env("APP_KEY", "app-key")
            .env("APP_SECRET", "app-secret");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node (scripts/test-deps.sh installs it)");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        NodeScript {
            name: name.to_string(),
            child,
            out,
        }
    }

    /// Waits for the script to reach barrier `barrier`.
    pub fn barrier(&mut self, barrier: &str) {
        let mut line = String::new();
        let _ = self.out.read_line(&mut line);
        if !line.contains(&format!("\"barrier\":\"{barrier}\"")) {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!(
                "{}: expected barrier {barrier}, got {line:?}: {err}",
                self.name
            );
        }
    }

    /// Lets the script go on past its barrier.
    pub fn go_on(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{{}}").expect("the script's stdin");
    }

    /// The script's result, once it exited 0 (`context` is added to the
    /// failure otherwise).
    pub fn result(mut self, context: &str) -> Value {
        let mut rest = String::new();
        let _ = self.out.read_to_string(&mut rest);
        let status = self.child.wait().expect("wait for node");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "{}: {err}\n{rest}\n{context}", self.name);
        script_result(&rest)
    }
}

/// A free loopback port (bound, then released for a server to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A command that runs herald with `listener` as a service manager passes
/// it (socket activation: descriptor 3, LISTEN_FDS=1, LISTEN_PID herald's
/// own pid, kept by the shell's exec).
pub fn activated_command(listener: &std::net::TcpListener) -> Command {
    activated_command_with(&[(listener, "main")])
}

/// The same with several sockets and their names (LISTEN_FDNAMES).
pub fn activated_command_with(sockets: &[(&std::net::TcpListener, &str)]) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fds: Vec<i32> = sockets.iter().map(|(l, _)| l.as_raw_fd()).collect();
    let names: Vec<&str> = sockets.iter().map(|(_, n)| *n).collect();
    let mut parked = vec![0; fds.len()];
    // In the shell's line, not the environment: the caller may clear that.
    let line = format!(
        r#"LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={} exec "$0""#,
        fds.len(),
        names.join(":")
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &line, env!("CARGO_BIN_EXE_herald")]);
    // SAFETY: fcntl and dup2 are async-signal-safe; every descriptor is
    // parked above the targets first, so placing one overwrites none not
    // yet placed; dup2 onto itself keeps close-on-exec, which is cleared.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                parked[i] = libc::fcntl(*fd, libc::F_DUPFD, 1024);
                if parked[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, fd) in parked.iter().enumerate() {
                let target = 3 + i as i32;
                if libc::dup2(*fd, target) < 0 || libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Polls `cond` every 20 ms until it holds, failing after [`TIMEOUT`]. For
/// conditions only observable by polling (metrics, /health).
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client whose kernel receive buffer is a few KiB (set before connect,
/// so the advertised window stays small and output backs up in the server).
pub fn small_window_client(server: &Server) -> Client {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(server.addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&server.addr.into()).unwrap();
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    Client::handshake(stream, server.addr, "/ws", &[]).expect("upgrade")
}

/// Reads `client` until the server ends it, handing each text message to
/// `on_text`. The end must be a close frame with `code`, or (protocol.md:
/// "when not even the close frame can be written, the TCP connection is
/// cut") a reset or EOF; returns which, for the test's log.
pub fn read_until_closed_or_cut(
    client: &mut Client,
    code: u16,
    mut on_text: impl FnMut(&str),
) -> &'static str {
    loop {
        match client.ws.read() {
            Ok(Message::Text(t)) => on_text(&t),
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {}
            Ok(Message::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), code, "close reason {:?}", f.reason);
                return "close frame";
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )) => return "EOF without close frame",
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                return "connection reset"
            }
            Err(e) => panic!("neither close {code} nor a cut connection: {e}"),
        }
    }
}

/// Fails the test listing every wrong case, if any: table-driven tests
/// check all their cases before failing, so one run shows them all.
pub fn assert_no_failures(failures: &[String], cases: usize) {
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        cases,
        failures.join("\n")
    );
}

/// Hex HMAC-SHA256 (Pusher's signatures), computed with `jsonwebtoken`'s
/// HS256, not herald's code.
/// Pings a Pusher connection and returns every frame it got before the
/// pong (a round trip: whatever the server sent earlier has arrived).
pub fn pusher_sync(c: &mut Client) -> Vec<Value> {
    c.send_json(serde_json::json!({"event":"pusher:ping","data":{}}));
    let mut before = Vec::new();
    loop {
        let v = c.recv_json();
        if v["event"] == "pusher:pong" {
            return before;
        }
        before.push(v);
    }
}

/// A signed Pusher HTTP API request (the auth_* query parameters) with
/// the app credentials `(key, secret)`.
pub fn pusher_api(
    addr: SocketAddr,
    (key, secret): (&str, &str),
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use md5::Digest;
    let ts = unix_now().to_string();
    let md5: String = md5::Md5::digest(body.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let q = format!("auth_key={key}&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}");
    let sig = hmac_sha256_hex(secret, format!("{method}\n{path}\n{q}").as_bytes());
    let headers = [("Content-Type", "application/json")];
    http(
        addr,
        method,
        &format!("{path}?{q}&auth_signature={sig}"),
        &headers,
        body.as_bytes(),
    )
}

pub fn hmac_sha256_hex(secret: &str, msg: &[u8]) -> String {
    use base64::Engine;
    let b64 = jsonwebtoken::crypto::sign(
        msg,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        jsonwebtoken::Algorithm::HS256,
    )
    .expect("hmac");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .expect("base64url")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
