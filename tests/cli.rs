//! The command-line client, run as a subprocess against a real server:
//! `herald token` makes tokens the server accepts, `herald sub` prints what
//! `herald pub` publishes (`channel<TAB>data`, `--json`, binary as base64),
//! errors are one line with a non-zero status (2 for usage), and `sub`
//! reconnects when the server restarts and exits when it is refused.
//!
//! Synchronisation is on the processes' own output: `sub` prints
//! "subscribed to .." on stderr once the server confirmed every channel.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use common::{assert_no_failures, unix_now, Client, Server, SECRET, TIMEOUT};
use serde_json::{json, Value};
use tungstenite::Message;

/// The herald binary with an empty environment (no SECRET, HERALD_URL or
/// HERALD_TOKEN leaking in from the developer's shell) plus `env`.
fn herald(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// What a finished command printed.
#[derive(Debug)]
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// The exit code, or a failure naming the signal.
    fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:?}"))
    }

    /// Asserts exit code `code` and exactly one non-empty stderr line
    /// starting with `prefix`; returns the line.
    fn assert_error(&self, code: i32, prefix: &str) -> &str {
        assert_eq!(self.code(), code, "{self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "stderr is not one line: {self:?}");
        assert!(lines[0].starts_with(prefix), "{self:?}");
        assert!(lines[0].len() > prefix.len() + 2, "{self:?}");
        lines[0]
    }
}

/// Runs herald to completion with `stdin`, failing after [`TIMEOUT`].
fn run(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Ran {
    let mut child = herald(args, env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald");
    let pid = child.id();
    let mut input = child.stdin.take().expect("stdin");
    let stdin = stdin.to_string();
    std::thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(out) => {
            let out = out.expect("wait for herald");
            Ran {
                status: out.status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("herald {args:?} did not finish within {TIMEOUT:?}");
        }
    }
}

/// A token from `herald token ARGS`, signed with SECRET from the environment.
fn cli_token(args: &[&str]) -> String {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    let ran = run(&all, &[("SECRET", SECRET)], "");
    assert_eq!(ran.code(), 0, "{ran:?}");
    assert!(ran.stderr.is_empty(), "{ran:?}");
    let token = ran.stdout.strip_suffix('\n').expect("one line");
    assert!(!token.contains('\n') && token.split('.').count() == 3);
    token.to_string()
}

/// Publishes with `herald pub` and asserts it succeeded quietly.
fn publish(server: &Server, token: Option<&str>, channel: &str, data: Option<&str>, stdin: &str) {
    let url = server.url("/ws");
    let mut args = vec!["pub", "--url", &url];
    if let Some(t) = token {
        args.extend(["--token", t]);
    }
    args.push(channel);
    args.extend(data);
    let ran = run(&args, &[], stdin);
    assert_eq!(ran.code(), 0, "{ran:?}");
    assert_eq!((ran.stdout.as_str(), ran.stderr.as_str()), ("", ""));
}

fn lines(from: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A running `herald sub`, killed on drop.
struct Sub {
    child: Option<Child>,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stderr line read so far, for failure messages.
    seen: Vec<String>,
}

impl Sub {
    /// Starts `herald sub --url <server> [--token T] ARGS...`.
    fn start(server: &Server, token: Option<&str>, args: &[&str]) -> Sub {
        Self::start_with_env(&server.url("/ws"), token, args, &[])
    }

    fn start_with_env(url: &str, token: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Sub {
        let mut all = vec!["sub", "--url", url];
        if let Some(t) = token {
            all.extend(["--token", t]);
        }
        all.extend_from_slice(args);
        let mut child = herald(&all, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herald sub");
        let stdout: ChildStdout = child.stdout.take().expect("stdout");
        let stderr: ChildStderr = child.stderr.take().expect("stderr");
        Sub {
            child: Some(child),
            stdout: lines(stdout),
            stderr: lines(stderr),
            seen: Vec::new(),
        }
    }

    /// The next line on stdout.
    fn next_line(&self) -> String {
        self.stdout
            .recv_timeout(TIMEOUT)
            .unwrap_or_else(|e| panic!("no line on stdout ({e:?}); stderr: {:?}", self.seen))
    }

    /// Reads stderr until a line containing `needle`; returns that line.
    fn wait_stderr(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no stderr line with {needle:?} ({e:?}); saw {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits for the process to exit; returns its status and the stderr
    /// lines not read yet.
    fn wait_exit(&mut self) -> (ExitStatus, Vec<String>) {
        let child = self.child.as_mut().expect("running");
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "herald sub did not exit; stderr: {:?}",
                self.seen
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = None;
        let mut rest = Vec::new();
        loop {
            match self.stderr.recv_timeout(TIMEOUT) {
                Ok(line) => rest.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("stderr not closed after exit"),
            }
        }
        (status, rest)
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id();
        unsafe { libc::kill(pid as i32, sig) };
    }

    /// Stdout lines printed but not read yet (after the process exited).
    fn remaining_stdout(&self) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            match self.stdout.recv_timeout(TIMEOUT) {
                Ok(line) => out.push(line),
                Err(RecvTimeoutError::Disconnected) => return out,
                Err(RecvTimeoutError::Timeout) => panic!("stdout not closed after exit"),
            }
        }
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn token_from_herald_token_lets_sub_and_pub_round_trip() {
    let server = Server::with_secret(&[]);
    let reader = cli_token(&["--read", "chan", "--sub", "reader"]);
    let writer = cli_token(&["--write", "chat:*,chan", "--ttl", "15m"]);

    let mut sub = Sub::start(&server, Some(&reader), &["chan"]);
    let line = sub.wait_stderr("subscribed to");
    assert!(
        line.starts_with("herald sub: ") && line.ends_with("subscribed to chan"),
        "{line}"
    );

    publish(&server, Some(&writer), "chan", Some(r#"{"x":1}"#), "");
    assert_eq!(sub.next_line(), "chan\t{\"x\":1}");

    // Interrupted: status 0, nothing more said or printed.
    sub.signal(libc::SIGINT);
    let (status, stderr) = sub.wait_exit();
    assert_eq!(status.code(), Some(0), "stderr: {stderr:?}");
    assert!(stderr.is_empty(), "{stderr:?}");
    assert!(sub.remaining_stdout().is_empty());
}

#[test]
fn token_claims_follow_the_flags() {
    let decode = |token: &str, secret: &str| {
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        jsonwebtoken::decode::<Value>(
            token,
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &v,
        )
        .map(|d| d.claims)
    };

    let before = unix_now();
    let t = cli_token(&[
        "--read", "a,b", "--write", "chat:*", "--sub", "alice", "--ttl", "1h",
    ]);
    let c = decode(&t, SECRET).expect("signed with SECRET");
    assert_eq!(c["read"], json!(["a", "b"]));
    assert_eq!(c["write"], json!(["chat:*"]));
    assert_eq!(c["sub"], "alice");
    let iat = c["iat"].as_u64().unwrap();
    assert!(iat >= before && iat <= unix_now(), "{c}");
    assert_eq!(c["exp"].as_u64(), Some(iat + 3600), "{c}");
    assert!(decode(&t, "other-secret").is_err());

    // Repeated flags add up; --ttl none leaves out exp; --secret wins over SECRET.
    let ran = run(
        &[
            "token",
            "--read",
            "a",
            "--read",
            "b",
            "--ttl",
            "none",
            "--secret",
            "flag-secret",
        ],
        &[("SECRET", SECRET)],
        "",
    );
    assert_eq!(ran.code(), 0, "{ran:?}");
    let c = decode(ran.stdout.trim_end(), "flag-secret").expect("signed with --secret");
    assert_eq!(c["read"], json!(["a", "b"]));
    assert_eq!(c["write"], json!([]));
    assert!(c.get("exp").is_none() && c.get("sub").is_none(), "{c}");

    let c = decode(&cli_token(&["--ttl", "90"]), SECRET).unwrap();
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 90);
}

#[test]
fn pub_sends_bare_words_as_json_strings_and_each_stdin_line() {
    let server = Server::open();
    let url = server.url("/ws");
    let mut sub = Sub::start(&server, None, &["chan"]);
    sub.wait_stderr("subscribed to chan");

    // The URL from HERALD_URL this time.
    let ran = run(&["pub", "chan", "hello"], &[("HERALD_URL", &url)], "");
    assert_eq!(ran.code(), 0, "{ran:?}");
    assert_eq!(sub.next_line(), "chan\t\"hello\"");

    // Blank lines are skipped, CRLF is accepted, JSON is compacted on output.
    publish(
        &server,
        None,
        "chan",
        None,
        "{\"a\": 2}\n\n   \nworld wide\r\n[1, 2]\nnull\n",
    );
    assert_eq!(sub.next_line(), "chan\t{\"a\":2}");
    assert_eq!(sub.next_line(), "chan\t\"world wide\"");
    assert_eq!(sub.next_line(), "chan\t[1,2]");
    assert_eq!(sub.next_line(), "chan\tnull");
}

#[test]
fn sub_json_prints_frames_and_binary_messages_as_base64() {
    let server = Server::open();
    let mut plain = Sub::start(&server, None, &["chan"]);
    let mut json = Sub::start(&server, None, &["--json", "chan"]);
    plain.wait_stderr("subscribed to chan");
    json.wait_stderr("subscribed to chan");

    publish(&server, None, "chan", Some(r#"{ "x": [1, "a b"] }"#), "");
    assert_eq!(plain.next_line(), "chan\t{\"x\":[1,\"a b\"]}");
    let frame = json.next_line();
    assert_eq!(
        frame,
        r#"{"op":"message","channel":"chan","data":{"x":[1,"a b"]}}"#
    );

    // protocol.md "Binary frames": length byte, channel, payload.
    let mut publisher = Client::connect(&server, "/ws");
    let mut bin = vec![4u8];
    bin.extend_from_slice(b"chan");
    bin.extend_from_slice(&[0, 1, 2, 255]);
    publisher.ws.send(Message::binary(bin)).expect("send");
    assert_eq!(plain.next_line(), "chan\tbase64:AAEC/w==");
    let v: Value = serde_json::from_str(&json.next_line()).unwrap();
    assert_eq!(
        v,
        json!({"op":"message","channel":"chan","base64":"AAEC/w=="})
    );
}

#[test]
fn pub_without_write_permission_exits_1_with_forbidden() {
    let server = Server::with_secret(&[]);
    let read_only = cli_token(&["--read", "chan"]);
    let url = server.url("/ws");

    let ran = run(
        &["pub", "--url", &url, "--token", &read_only, "chan", "x"],
        &[],
        "",
    );
    let line = ran.assert_error(1, "herald pub: forbidden: ");
    assert!(line.contains("chan"), "{line}");

    // From standard input the line is named; the token may come from HERALD_TOKEN.
    let writer = cli_token(&["--write", "ok"]);
    let ran = run(
        &["pub", "--url", &url, "chan"],
        &[("HERALD_TOKEN", &writer)],
        "\n1\n",
    );
    let line = ran.assert_error(1, "herald pub: forbidden: ");
    assert!(line.ends_with("(standard input line 2)"), "{line}");

    // A bad token is refused at the upgrade.
    let forged = run(&["token", "--write", "*", "--secret", "wrong"], &[], "");
    let ran = run(
        &[
            "pub",
            "--url",
            &url,
            "--token",
            forged.stdout.trim(),
            "chan",
            "x",
        ],
        &[],
        "",
    );
    let line = ran.assert_error(1, "herald pub: ");
    assert!(line.contains("HTTP 401"), "{line}");
}

#[test]
fn sub_to_a_channel_it_may_not_read_exits_1_with_forbidden() {
    let server = Server::with_secret(&[]);
    let token = cli_token(&["--read", "a"]);
    let mut sub = Sub::start(&server, Some(&token), &["a", "b"]);
    let (status, stderr) = sub.wait_exit();
    assert_eq!(status.code(), Some(1), "{stderr:?}");
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(
        stderr[0].starts_with("herald sub: forbidden: "),
        "{stderr:?}"
    );
    assert!(stderr[0].contains('b'), "{stderr:?}");
}

#[test]
fn sub_exits_instead_of_retrying_when_refused_or_its_token_expires() {
    let server = Server::with_secret(&[]);

    let forged = run(&["token", "--read", "*", "--secret", "wrong"], &[], "");
    let mut sub = Sub::start(&server, Some(forged.stdout.trim()), &["chan"]);
    let (status, stderr) = sub.wait_exit();
    assert_eq!(status.code(), Some(1), "{stderr:?}");
    assert_eq!(stderr.len(), 1, "{stderr:?}");
    assert!(stderr[0].contains("HTTP 401"), "{stderr:?}");

    // Expires while connected: close 4001 (or 401 if it already had).
    let short = cli_token(&["--read", "chan", "--ttl", "1s"]);
    let mut sub = Sub::start(&server, Some(&short), &["chan"]);
    let (status, stderr) = sub.wait_exit();
    assert_eq!(status.code(), Some(1), "{stderr:?}");
    let last = stderr.last().expect("an error line");
    assert!(
        last.starts_with("herald sub: ") && last.contains("expired"),
        "{stderr:?}"
    );
}

#[test]
fn token_without_a_secret_exits_2() {
    let ran = run(&["token", "--read", "a"], &[], "");
    ran.assert_error(2, "herald token: ");
    assert!(ran.stdout.is_empty());
    assert!(ran.stderr.contains("SECRET"), "{ran:?}");
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let cases: &[(&[&str], &str)] = &[
        (&["sub"], "CHANNEL"),
        (&["pub"], "CHANNEL"),
        (&["pub", "--url", "wss://example.com/ws", "c", "d"], "TLS"),
        (&["sub", "--url", "http://example.com/ws", "c"], "ws://"),
        (&["sub", "no spaces"], "channel"),
        (&["pub", "--bogus", "c", "d"], "--bogus"),
        (&["token", "--ttl", "5x", "--secret", "s"], "5x"),
        (&["token", "--read", "a*b", "--secret", "s"], "*"),
    ];
    let mut failures = Vec::new();
    for (args, needle) in cases {
        let ran = run(args, &[], "");
        let prefix = format!("herald {}: ", args[0]);
        let one_line = ran.stderr.lines().count() == 1;
        if ran.status.code() != Some(2)
            || !one_line
            || !ran.stderr.starts_with(&prefix)
            || !ran.stderr.contains(needle)
        {
            failures.push(format!("{args:?}: {ran:?}"));
        }
    }
    assert_no_failures(&failures, cases.len());
}

#[test]
fn pub_to_a_server_that_is_not_there_exits_1() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("ws://127.0.0.1:{port}/ws");
    let ran = run(&["pub", "--url", &url, "c", "d"], &[], "");
    let line = ran.assert_error(1, "herald pub: cannot connect to ");
    assert!(line.contains(&url), "{line}");
}

#[test]
fn help_shows_examples_and_the_server_help_lists_the_client() {
    let ran = run(&["--help"], &[], "");
    assert_eq!(ran.code(), 0, "{ran:?}");
    assert!(ran.stdout.contains("--port"), "{}", ran.stdout);
    assert!(ran.stdout.contains("herald sub CHANNEL"), "{}", ran.stdout);
    for cmd in ["sub", "pub", "token"] {
        let ran = run(&[cmd, "--help"], &[], "");
        assert_eq!(ran.code(), 0, "{ran:?}");
        assert!(ran.stdout.contains("Examples:"), "{cmd}: {}", ran.stdout);
        assert!(
            ran.stdout.contains(&format!("herald {cmd} ")),
            "{cmd}: {}",
            ran.stdout
        );
    }
}

#[test]
fn sub_reconnects_when_the_server_restarts_on_the_same_port() {
    // The harness picks a free port (PORT=0); later servers are started
    // with PORT set to the port the first one got.
    let mut first = Server::open();
    let port = first.addr.port().to_string();
    let mut sub = Sub::start(&first, None, &["chan"]);
    sub.wait_stderr("connected to");

    // A graceful shutdown closes with 1001.
    first.signal(libc::SIGTERM);
    first.wait_exit(TIMEOUT);
    let lost = sub.wait_stderr("connection lost");
    assert!(
        lost.contains("1001") && lost.ends_with("reconnecting"),
        "{lost}"
    );

    let mut second = Server::start(&[("PORT", &port)]);
    sub.wait_stderr("reconnected to");
    publish(&second, None, "chan", Some("1"), "");
    assert_eq!(sub.next_line(), "chan\t1");

    // A crash cuts TCP with no close frame.
    second.signal(libc::SIGKILL);
    second.wait_exit(TIMEOUT);
    sub.wait_stderr("connection lost");
    let third = Server::start(&[("PORT", &port)]);
    sub.wait_stderr("reconnected to");
    publish(&third, None, "chan", Some("2"), "");
    assert_eq!(sub.next_line(), "chan\t2");

    sub.signal(libc::SIGTERM);
    let (status, stderr) = sub.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    assert!(stderr.is_empty(), "{stderr:?}");
}

/// A loopback TCP relay the test can cut: each accepted connection is
/// relayed to `to` until [`Relay::cut`], and the next connection is only
/// accepted after [`Relay::resume`].
struct Relay {
    addr: std::net::SocketAddr,
    cut: std::sync::mpsc::Sender<()>,
    resume: std::sync::mpsc::Sender<()>,
}

impl Relay {
    fn start(to: std::net::SocketAddr) -> Relay {
        use std::net::{Shutdown, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = mpsc::channel::<()>();
        let (resume, resume_rx) = mpsc::channel::<()>();
        std::thread::spawn(move || loop {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let server = TcpStream::connect(to).unwrap();
            for (mut from, mut into) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server.try_clone().unwrap(), client.try_clone().unwrap()),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(Shutdown::Write);
                });
            }
            if cut_rx.recv().is_err() {
                return;
            }
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            if resume_rx.recv().is_err() {
                return;
            }
        });
        Relay { addr, cut, resume }
    }

    fn cut(&self) {
        self.cut.send(()).unwrap();
    }

    fn resume(&self) {
        self.resume.send(()).unwrap();
    }
}

#[test]
fn sub_resumes_where_it_stopped_after_a_reconnect() {
    let server = Server::start(&[("HISTORY", "feed=100/1h")]);
    let relay = Relay::start(server.addr);
    let url = format!("ws://{}/ws", relay.addr);
    let mut sub = Sub::start_with_env(&url, None, &["feed"], &[]);
    sub.wait_stderr("connected to");
    publish(&server, None, "feed", Some("1"), "");
    assert_eq!(sub.next_line(), "feed\t1");

    // The connection drops; two messages are published while sub is away
    // (the relay holds its reconnect until they are in).
    relay.cut();
    sub.wait_stderr("connection lost");
    publish(&server, None, "feed", Some("2"), "");
    publish(&server, None, "feed", Some("3"), "");
    relay.resume();
    sub.wait_stderr("reconnected to");
    publish(&server, None, "feed", Some("4"), "");
    for want in ["feed\t2", "feed\t3", "feed\t4"] {
        assert_eq!(sub.next_line(), want, "missed or repeated while away");
    }
    sub.signal(libc::SIGTERM);
    let (status, stderr) = sub.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    assert!(
        stderr.iter().all(|l| !l.contains("could not be recovered")),
        "{stderr:?}"
    );
}

#[test]
fn sub_says_when_a_restart_lost_the_history() {
    let mut first = Server::start(&[("HISTORY", "feed=100/1h")]);
    let port = first.addr.port().to_string();
    let mut sub = Sub::start(&first, None, &["feed"]);
    sub.wait_stderr("connected to");
    publish(&first, None, "feed", Some("1"), "");
    assert_eq!(sub.next_line(), "feed\t1");
    first.signal(libc::SIGTERM);
    first.wait_exit(TIMEOUT);
    sub.wait_stderr("connection lost");
    // History in memory: the new server's epochs are new ones.
    let second = Server::start(&[("PORT", &port), ("HISTORY", "feed=100/1h")]);
    let line = sub.wait_stderr("could not be recovered");
    assert!(line.contains("feed"), "{line}");
    sub.wait_stderr("reconnected to");
    publish(&second, None, "feed", Some("2"), "");
    assert_eq!(sub.next_line(), "feed\t2");
}

#[test]
fn sub_misses_nothing_across_a_restart_with_history_dir() {
    let dir = std::env::temp_dir().join(format!("herald-cli-history-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_s = dir.to_str().unwrap().to_string();
    let env = [("HISTORY", "feed=100/1h"), ("HISTORY_DIR", dir_s.as_str())];
    let mut first = Server::start(&env);
    let port = first.addr.port().to_string();
    let mut sub = Sub::start(&first, None, &["feed"]);
    sub.wait_stderr("connected to");
    publish(&first, None, "feed", Some("1"), "");
    assert_eq!(sub.next_line(), "feed\t1");
    first.signal(libc::SIGTERM);
    first.wait_exit(TIMEOUT);
    sub.wait_stderr("connection lost");
    // Published as soon as the new server is up, before or after sub is
    // back: printed once either way.
    let second = Server::start(&[env[0], env[1], ("PORT", &port)]);
    publish(&second, None, "feed", Some("2"), "");
    sub.wait_stderr("reconnected to");
    publish(&second, None, "feed", Some("3"), "");
    assert_eq!(sub.next_line(), "feed\t2");
    assert_eq!(sub.next_line(), "feed\t3");
    sub.signal(libc::SIGTERM);
    let (status, stderr) = sub.wait_exit();
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    assert!(
        stderr.iter().all(|l| !l.contains("could not be recovered")),
        "{stderr:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
