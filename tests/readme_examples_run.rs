//! The README's runnable examples, run as they are written there: each
//! fenced block preceded by `<!-- example: NAME -->` is extracted from
//! README.md at test time (only the ports are swapped for free ones), so
//! an example that stops working fails the suite instead of rotting.
//!
//! - `quick-publish`: the curl publish of "A quick session";
//! - `history-server`, `history-publish`: "History and recovery"'s server
//!   settings and curl session;
//! - `personal-native`: the backend's curl call of "Personal channels";
//! - `pusher-server`: the command that starts herald as a Pusher server;
//! - `pusher-backend`: the Node backend that triggers and sends to a user;
//! - `pusher-auth-server`: the Node auth endpoint, driven by pusher-js.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use common::{free_port, hmac_sha256_hex, http, token, Client, Server, TIMEOUT};
use serde_json::{json, Value};

/// The fenced block after `<!-- example: name -->` in README.md.
fn example(name: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let marker = format!("<!-- example: {name} -->");
    let at = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"));
    let rest = &readme[at + marker.len()..];
    let fence = rest.find("```").expect("a fenced block after the marker");
    let body = &rest[fence..];
    let start = body.find('\n').expect("fence line") + 1;
    let end = body[start..].find("\n```").expect("closing fence") + start;
    body[start..end].to_string()
}

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// A child process killed on drop, with everything it started: it leads
/// its own process group (see [`in_own_group`]), and the whole group is
/// killed, so a server started by `sh -c` is not left running.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child's process group.
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Makes `cmd` start a process group of its own.
fn in_own_group(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0)
}

/// Reads `child`'s stream `out` line by line until a line contains
/// `wanted`; returns everything read (fails after TIMEOUT).
fn wait_line(out: impl Read + Send + 'static, wanted: &'static str) -> String {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(wanted) {
                let _ = tx.send(Ok(seen.clone()));
                return;
            }
        }
        let _ = tx.send(Err(seen));
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(Ok(seen)) => seen,
        Ok(Err(seen)) => panic!("ended without {wanted:?}:\n{seen}"),
        Err(_) => panic!("no {wanted:?} within {TIMEOUT:?}"),
    }
}

#[test]
fn the_quick_session_publish_reaches_a_subscriber() {
    let server = Server::open();
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("news");
    let script = example("quick-publish").replace("127.0.0.1:6380", &server.addr.to_string());
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{script}\n{out:?}");
    assert_eq!(stdout.trim(), r#"{"ok":true}"#, "{script}");
    assert_eq!(
        sub.recv_json(),
        json!({"op":"message","channel":"news","data":{"hello":"world"}})
    );
}

#[test]
fn the_history_session_gets_offsets_and_reads_them_back() {
    let start = example("history-server");
    let history = start
        .split_once("HISTORY='")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(v, _)| v.to_string())
        .expect("HISTORY='..' in the history-server example");
    let server = Server::start(&[("HISTORY", &history)]);
    let script = example("history-publish").replace("127.0.0.1:6380", &server.addr.to_string());
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{script}\n{out:?}");
    // curl prints the bodies back to back.
    let replies: Vec<Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(replies.len(), 3, "{replies:?}");
    let epoch = replies[0]["epoch"].as_str().expect("an epoch").to_string();
    assert_eq!(replies[0], json!({"ok":true,"epoch":epoch,"offset":1}));
    assert_eq!(replies[1], json!({"ok":true,"epoch":epoch,"offset":2}));
    assert_eq!(
        replies[2],
        json!({"channel":"news","epoch":epoch,"offset":2,
               "messages":[{"offset":1,"data":"first"},{"offset":2,"data":"second"}]})
    );
}

#[test]
fn the_personal_channel_example_subscribes_a_user_durably() {
    let server = Server::with_secret(&[]);
    let backend = token(json!({"read": ["*"], "write": ["*"]}));
    let script = example("personal-native").replace("127.0.0.1:6380", &server.addr.to_string());
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("BACKEND_TOKEN", &backend)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}\n{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim(), r#"{"subscribed":true}"#, "{script}");
    // alice, whose token's sub is alice, gets what was published since.
    let (s, text) = http(
        server.addr,
        "POST",
        "/publish",
        &[("Authorization", &format!("Bearer {backend}"))],
        br#"{"channel":"news","data":"while away"}"#,
    );
    assert!(s < 300, "{text}");
    let mut alice = Client::with_token(&server, &token(json!({"sub": "alice"})));
    alice.send_json(json!({"op": "subscribe", "channel": "personal-alice", "id": 1}));
    assert_eq!(
        alice.recv_json(),
        json!({"op":"subscribed","channel":"personal-alice","id":1})
    );
    let m = alice.recv_json();
    assert_eq!(
        (&m["channel"], &m["data"]),
        (&json!("news"), &json!("while away")),
        "{m}"
    );
}

/// Starts the README's Pusher server command with the test binary as
/// `herald`, on a free loopback port; returns it and its address.
fn pusher_server() -> (Running, SocketAddr) {
    let port = free_port();
    let script = example("pusher-server")
        .replace("HOST=0.0.0.0", "HOST=127.0.0.1")
        .replace("PORT=6001", &format!("PORT={port} WORKERS=2"));
    let bin = Path::new(env!("CARGO_BIN_EXE_herald"));
    let mut child = in_own_group(&mut Command::new("sh"))
        .arg("-c")
        .arg(&script)
        .env(
            "PATH",
            format!("{}:/usr/bin:/bin", bin.parent().unwrap().display()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    wait_line(stderr, "listening on");
    (running, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A raw Pusher connection to the README's app: (client, socket_id).
fn pusher_connect(addr: SocketAddr) -> (Client, String) {
    let mut c = Client::try_connect(addr, "/app/app-key?protocol=7", &[]).expect("upgrade");
    let hello = c.recv_json();
    let data: Value = serde_json::from_str(hello["data"].as_str().unwrap()).unwrap();
    (c, data["socket_id"].as_str().unwrap().to_string())
}

fn pusher_subscribe(c: &mut Client, channel: &str) {
    c.send_json(json!({"event":"pusher:subscribe","data":{"channel":channel}}));
    let r = c.recv_json();
    assert_eq!(r["event"], "pusher_internal:subscription_succeeded", "{r}");
}

/// Runs a README Node example with the test's npm packages.
fn node_example(name: &str, replace: &[(&str, String)]) -> Command {
    let mut code = example(name);
    for (from, to) in replace {
        code = code.replace(from, to);
    }
    let dir = std::env::temp_dir().join(format!("herald-readme-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.js"));
    std::fs::write(&file, code).unwrap();
    let mut cmd = Command::new("node");
    cmd.arg(&file)
        .env("NODE_PATH", js_dir().join("node_modules"))
        .stdin(Stdio::null());
    cmd
}

#[test]
fn the_pusher_backend_example_triggers_and_sends_to_a_user() {
    let (_server, addr) = pusher_server();
    let (mut news, _) = pusher_connect(addr);
    pusher_subscribe(&mut news, "news");
    // A connection signed in as user-42, on its own channel.
    let (mut user, socket_id) = pusher_connect(addr);
    let user_data = r#"{"id":"user-42"}"#;
    let sig = hmac_sha256_hex(
        "app-secret",
        format!("{socket_id}::user::{user_data}").as_bytes(),
    );
    user.send_json(json!({"event":"pusher:signin",
        "data":{"auth":format!("app-key:{sig}"),"user_data":user_data}}));
    assert_eq!(user.recv_json()["event"], "pusher:signin_success");
    pusher_subscribe(&mut user, "#server-to-user-user-42");

    let out = node_example(
        "pusher-backend",
        &[("\"6001\"", format!("\"{}\"", addr.port()))],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "backend.js failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "sent");
    let got = news.recv_json();
    assert_eq!(
        (&got["event"], &got["channel"]),
        (&json!("update"), &json!("news"))
    );
    assert_eq!(got["data"], r#"{"text":"hello"}"#);
    let got = user.recv_json();
    assert_eq!(got["event"], "greeting", "{got}");
    assert_eq!(got["data"], r#"{"text":"hi"}"#);
}

#[test]
fn the_pusher_auth_endpoint_example_authorizes_pusher_js() {
    let (_server, addr) = pusher_server();
    let auth_port = free_port();
    let mut child = node_example(
        "pusher-auth-server",
        &[
            ("\"6001\"", format!("\"{}\"", addr.port())),
            ("3000", auth_port.to_string()),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _auth = Running(child);
    wait_line(stdout, "auth endpoint on");

    let out = Command::new("node")
        .arg("readme_auth.js")
        .current_dir(js_dir())
        .env("HERALD_ADDR", addr.to_string())
        .env("APP_ID", "app-id")
        .env("APP_KEY", "app-key")
        .env("APP_SECRET", "app-secret")
        .env("AUTH_BASE", format!("http://127.0.0.1:{auth_port}"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "readme_auth.js failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        result["result"],
        json!({"private": true, "presence_me": {"id": "user-42", "info": {"name": "Ann"}},
               "user": {"id": "user-42", "name": "Ann"}}),
        "{stdout}"
    );
}
