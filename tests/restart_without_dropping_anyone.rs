//! Restarting without dropping anyone (README "Deploy on Linux"): SIGUSR2
//! starts a new herald on the same listening sockets; once it accepts, the
//! old one closes its connections with 1012 (Pusher 4200) over
//! DRAIN_SECONDS and exits. Under a steady publisher and many subscribers,
//! no connection attempt is refused and every client that comes back with
//! `since` misses nothing (history in the cluster's Redis, which both
//! processes share); pusher-js is back within 2 s.

#[path = "common/broker.rs"]
mod broker;
mod common;
#[path = "common/python.rs"]
mod python;
#[path = "common/tls.rs"]
mod tls;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker::Redis;
use common::*;
use serde_json::Value;

/// The successor's pid, from the old process's log; killed on drop.
struct Successor(u32);

impl Successor {
    /// The successor's pid, from the old process's log.
    fn of(server: &Server) -> Successor {
        wait_for("the new process to accept", || {
            server.log().contains("the new process (")
        });
        let log = server.log();
        let at = log.find("the new process (").unwrap() + "the new process (".len();
        let pid = log[at..].split(')').next().unwrap().parse().unwrap();
        Successor(pid)
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid the log named.
        unsafe {
            libc::kill(self.0 as i32, libc::SIGKILL);
        }
    }
}

#[test]
fn a_restart_under_load_refuses_no_one_and_recovery_misses_nothing() {
    let redis = Redis::start();
    let url = redis.url();
    let mut old = Server::start(&[
        ("BROKER_URL", url.as_str()),
        ("NODE_ID", "a"),
        ("HISTORY", "live=100000/1h"),
        ("HISTORY_RECOVER_MAX", "100000"),
        ("DRAIN_SECONDS", "2"),
        ("MAX_CONNECTIONS", "5000"),
    ]);
    let python = python::python_with("websockets.asyncio.client", "websockets>=13,<16");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/restart_clients.py");
    let mut clients = Command::new(&python)
        .arg(&script)
        .arg(old.url("/ws"))
        .args(["1000", "6"])
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(clients.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "subscribed", "{}", old.log());
    // Connections keep being made while the restart happens.
    let addr = old.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut made, mut refused) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match Client::try_connect(addr, "/ws", &[]) {
                    Ok(_) => made += 1,
                    Err(r) => refused.push(format!("{r:?}")),
                }
                // Paced, so that the clients under test get the CPU.
                std::thread::sleep(Duration::from_millis(5));
            }
            (made, refused)
        })
    };
    old.signal(libc::SIGUSR2);
    let successor = Successor::of(&old);
    assert_ne!(successor.0, old.pid());
    let status = old.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "the old process exits 0 after its drain");
    let started = Instant::now();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = clients.wait().unwrap();
    let mut err = String::new();
    clients
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (made, refused) = prober.join().unwrap();
    assert!(status.success(), "clients: {err}\n{rest}\n{}", old.log());
    let stats: Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(stats["refused"], 0, "{stats}");
    assert!(
        refused.is_empty(),
        "{} of {} refused: {:?}",
        refused.len(),
        made,
        &refused[..refused.len().min(3)]
    );
    assert!(made > 0);
    assert_eq!(stats["closes"]["1012"], 1000, "{stats}");
    // Spread over DRAIN_SECONDS=2, not all at once.
    let spread = stats["close_spread_ms"].as_u64().unwrap();
    assert!((1000..4000).contains(&spread), "{stats}");
    assert_eq!(stats["reconnects"], 1000, "{stats}");
    assert!(stats["published"].as_u64().unwrap() >= 20, "{stats}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn pusher_js_is_back_within_two_seconds() {
    let mut old = Server::start(&[("DRAIN_SECONDS", "1")]);
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let mut node = Command::new("node")
        .arg("restart.js")
        .current_dir(&js)
        .env("HERALD_ADDR", old.addr.to_string())
        .env("APP_ID", "app-id")
        .env("APP_KEY", "app-key")
        .env("APP_SECRET", "app-secret")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node (scripts/test-deps.sh installs it)");
    let mut out = BufReader::new(node.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.contains("\"barrier\":\"restart\""), "{line}");
    old.signal(libc::SIGUSR2);
    let _successor = Successor::of(&old);
    use std::io::Write;
    writeln!(node.stdin.as_mut().unwrap(), "{{}}").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = node.wait().unwrap();
    let mut err = String::new();
    node.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "restart.js: {err}\n{rest}");
    let result = script_result(&rest);
    assert!(result["back_ms"].as_u64().unwrap() < 2000, "{result}");
    // It went away (4200) and came back.
    let states = result["states"].as_array().unwrap();
    assert!(
        states.len() >= 2 && states.last().unwrap() == "connected",
        "{result}"
    );
    assert!(old.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn a_new_process_that_cannot_start_leaves_the_old_one_serving() {
    // The certificate's key went away since the start: the new process
    // cannot load it, and the restart is given up.
    let ca = tls::TestCa::new();
    let dir = tls::TempDir::new("restart-tls");
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::write(&cert, &ca.cert_pem).unwrap();
    std::fs::write(&key, &ca.key_pem).unwrap();
    let old = Server::start(&[
        ("TLS_CERT", cert.to_str().unwrap()),
        ("TLS_KEY", key.to_str().unwrap()),
        ("TLS_PORT", "0"),
    ]);
    let mut c = Client::connect(&old, "/ws");
    c.subscribe("news");
    std::fs::remove_file(&key).unwrap();
    old.signal(libc::SIGUSR2);
    wait_for("the restart to be given up", || {
        old.log().contains("restart given up")
    });
    assert!(old.log().contains("TLS_KEY"), "{}", old.log());
    // Still serving, and the subscriber still subscribed.
    let mut p = Client::connect(&old, "/ws");
    p.publish("news", serde_json::json!("still here"));
    let m = c.next_json("a message after the failed restart");
    assert_eq!(m["data"], "still here");
}

#[test]
fn a_restart_with_history_on_disk_hands_the_file_over() {
    // HISTORY_DIR's file is held by one process at a time: the old one
    // closes everyone at once and exits, the new one opens the file and
    // accepts; connections made meanwhile wait, and the history (epoch
    // and offsets) goes on.
    let dir = std::env::temp_dir().join(format!("herald-restart-hd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // systemd's side: the main pid must move to the new process before the
    // old one exits, or its exit would end the service.
    let notify_path = dir.join("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    manager.set_read_timeout(Some(TIMEOUT)).unwrap();
    let history_dir = dir.join("history");
    let mut old = Server::start(&[
        ("HISTORY", "news=100/1h"),
        ("HISTORY_DIR", history_dir.to_str().unwrap()),
        ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
    ]);
    let mut c = Client::connect(&old, "/ws");
    c.send_json(serde_json::json!({"op":"subscribe","channel":"news","id":"s"}));
    let first = c.next_json("subscribed");
    let epoch = first["epoch"].as_str().unwrap().to_string();
    let mut p = Client::connect(&old, "/ws");
    for n in 1..=3 {
        p.send_json(serde_json::json!({"op":"publish","channel":"news","data":n,"id":"p"}));
        assert_eq!(p.next_json("ack")["offset"], n);
    }
    for n in 1..=3 {
        assert_eq!(c.next_json("message")["offset"], n);
    }
    old.signal(libc::SIGUSR2);
    let (code, _) = c.expect_close();
    assert_eq!(code, 1012);
    let _ = c.ws.flush();
    let successor = Successor::of(&old);
    assert!(old.wait_exit(Duration::from_secs(15)).success());
    // What the manager heard: READY=1 (the old process at start), then
    // MAINPID from the old process (before it exits), then the new one's
    // MAINPID and READY=1 (it can only be ready once the old one is gone).
    let said_main = format!("MAINPID={}\n", successor.0);
    let (mut readies, mut mains) = (0, 0);
    let mut buf = [0u8; 128];
    while readies < 2 {
        let n = manager.recv(&mut buf).expect("the new process's READY=1");
        match &buf[..n] {
            b"READY=1\n" => readies += 1,
            m if m == said_main.as_bytes() => mains += 1,
            _ => {}
        }
    }
    assert_eq!(
        mains, 2,
        "the old process named the new main pid, then the new one did"
    );
    // The new process may not accept yet: this waits in the queue.
    let mut back = Client::connect(&old, "/ws");
    let mut p = Client::connect(&old, "/ws");
    p.send_json(serde_json::json!({"op":"publish","channel":"news","data":4,"id":"p"}));
    assert_eq!(p.next_json("ack")["offset"], 4, "offsets go on");
    back.send_json(
        serde_json::json!({"op":"subscribe","channel":"news","id":"s",
                                      "since":{"epoch":epoch,"offset":3}}),
    );
    let v = back.next_json("subscribed");
    assert_eq!(v["recovered"], true, "{v}");
    assert_eq!(v["epoch"], epoch.as_str());
    assert_eq!(back.next_json("the missed message")["offset"], 4);
    let _ = std::fs::remove_dir_all(&dir);
}
