//! Restarting without dropping anyone (README "Deploy on Linux"): SIGUSR2
//! starts a new herald on the same listening sockets; once it accepts, the
//! old one closes its connections with 1012 (Pusher 4200) over
//! DRAIN_SECONDS and exits. Under a steady publisher and many subscribers,
//! no connection attempt is refused and every client that comes back with
//! `since` misses nothing, on a single node (the old process hands its
//! history to the new one, which numbers every channel from then on) and
//! in a cluster (history in Redis, which both processes share); pusher-js
//! is back within 2 s.

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

/// The tests of this file run one at a time: each restarts a server under
/// clients whose timings it checks (the load tests need the machine's CPU
/// for thousands of them), and 2 cores shared with another such test
/// would make those timings the other test's.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server with one worker, so that a restart's drain closes connections
/// in the order they came (over `drain` seconds), and `fillers`
/// connections made first: the clients a test makes next are closed last.
fn draining_in_order(drain: &str, fillers: usize, env: &[(&str, &str)]) -> (Server, Vec<Client>) {
    let mut all = vec![("WORKERS", "1"), ("DRAIN_SECONDS", drain)];
    all.extend_from_slice(env);
    let server = Server::start(&all);
    let fillers = (0..fillers)
        .map(|_| Client::connect(&server, "/ws"))
        .collect();
    (server, fillers)
}

/// A connection subscribed to `news` (which keeps history), and the
/// channel's epoch.
fn news_subscriber(server: &Server) -> (Client, String) {
    let mut c = Client::connect(server, "/ws");
    c.send_json(serde_json::json!({"op":"subscribe","channel":"news","id":"s"}));
    let epoch = c.next_json("subscribed")["epoch"]
        .as_str()
        .unwrap()
        .to_string();
    (c, epoch)
}

/// Waits until no worker of the old process (of `workers`) accepts: a
/// connection made after this reaches the new one.
fn old_stopped_accepting(old: &Server, workers: usize) {
    wait_for("the old process to stop accepting", || {
        old.log().matches("no longer accepting; draining").count() >= workers
    });
}

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
    let _one = one_at_a_time();
    // A single node, history in memory: handed from process to process.
    // 3,000 subscribers, in three Python processes of 1,000.
    restart_under_load(&[], 3, 20);
}

#[test]
fn a_restart_in_a_cluster_refuses_no_one_and_recovery_misses_nothing() {
    let _one = one_at_a_time();
    let redis = Redis::start();
    let url = redis.url();
    restart_under_load(&[("BROKER_URL", url.as_str()), ("NODE_ID", "a")], 1, 5);
}

/// One of the Python client processes of [`restart_under_load`].
struct Clients {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Clients {
    fn start(python: &Path, url: &str, pause_ms: u64, publishes: bool) -> Clients {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/restart_clients.py");
        let mut child = Command::new(python)
            .arg(&script)
            .arg(url)
            .args(["1000", "6"])
            .arg(pause_ms.to_string())
            .arg(if publishes { "all" } else { "subscribers" })
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Clients { child, out }
    }

    fn wait_subscribed(&mut self) {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "subscribed");
    }

    /// Its final statistics (it exits 1 on any gap, duplicate, refused
    /// connection or failed recovery).
    fn finish(mut self, old: &Server) -> Value {
        let mut rest = String::new();
        self.out.read_to_string(&mut rest).unwrap();
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        assert!(status.success(), "clients: {err}\n{rest}\n{}", old.log());
        serde_json::from_str(rest.trim()).unwrap()
    }
}

/// `processes` x 1,000 subscribers and a steady publisher (pausing
/// `pause_ms` between publishes) through a restart.
fn restart_under_load(env: &[(&str, &str)], processes: usize, pause_ms: u64) {
    let mut env = env.to_vec();
    env.extend([
        ("HISTORY", "live=100000/1h"),
        ("HISTORY_RECOVER_MAX", "100000"),
        ("DRAIN_SECONDS", "2"),
        ("MAX_CONNECTIONS", "5000"),
    ]);
    let mut old = Server::start(&env);
    let python = python::python_with("websockets.asyncio.client", "websockets>=13,<16");
    let url = old.url("/ws");
    let mut all: Vec<Clients> = (0..processes)
        .map(|i| Clients::start(&python, &url, pause_ms, i == 0))
        .collect();
    for c in &mut all {
        c.wait_subscribed();
    }
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
    let mut rest = all.split_off(1);
    let first = all.pop().unwrap().finish(&old);
    let published = first["published"].as_u64().unwrap();
    for c in &mut rest {
        use std::io::Write;
        writeln!(c.child.stdin.as_mut().unwrap(), "{published}").unwrap();
    }
    let mut stats = vec![first];
    stats.extend(rest.into_iter().map(|c| c.finish(&old)));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (made, refused) = prober.join().unwrap();
    assert!(
        refused.is_empty(),
        "{} of {} refused: {:?}",
        refused.len(),
        made,
        &refused[..refused.len().min(3)]
    );
    assert!(made > 0);
    let sum = |f: &dyn Fn(&Value) -> u64| stats.iter().map(f).sum::<u64>();
    let subscribers = 1000 * processes as u64;
    assert_eq!(sum(&|s| s["refused"].as_u64().unwrap()), 0, "{stats:?}");
    assert_eq!(
        sum(&|s| s["closes"]["1012"].as_u64().unwrap_or(0)),
        subscribers,
        "{stats:?}"
    );
    assert_eq!(
        sum(&|s| s["reconnects"].as_u64().unwrap()),
        subscribers,
        "{stats:?}"
    );
    // Spread over DRAIN_SECONDS=2, not all at once.
    let times = |k: &str| -> Vec<f64> { stats.iter().map(|s| s[k].as_f64().unwrap()).collect() };
    let last = times("last_close").into_iter().fold(0.0, f64::max);
    let spread = last - times("first_close").into_iter().fold(f64::MAX, f64::min);
    assert!((1.0..4.5).contains(&spread), "{spread} s: {stats:?}");
    assert!(published >= 20, "{stats:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn pusher_js_is_back_within_two_seconds() {
    let _one = one_at_a_time();
    let mut old = Server::start(&[("DRAIN_SECONDS", "1")]);
    let mut node = NodeScript::start("restart.js", old.addr, &[]);
    node.barrier("restart");
    old.signal(libc::SIGUSR2);
    let _successor = Successor::of(&old);
    node.go_on();
    let result = node.result(&old.log());
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
    let _one = one_at_a_time();
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
fn during_the_drain_both_processes_are_one_node() {
    let _one = one_at_a_time();
    // One worker, so that the drain closes connections in the order they
    // came: the fillers first, the two clients under test last, about
    // 10 s after the restart.
    let (mut old, _fillers) = draining_in_order("10", 40, &[("HISTORY", "news=100/1h")]);
    let mut p_old = Client::connect(&old, "/ws");
    let (mut c_old, epoch) = news_subscriber(&old);
    let publish = |c: &mut Client, n: u64, key: &str| -> Value {
        c.send_json(serde_json::json!({"op":"publish","channel":"news","data":n,
                                       "id":"p","idempotency_key":key}));
        c.next_json("ack")
    };
    for n in 1..=2 {
        assert_eq!(publish(&mut p_old, n, &format!("k{n}"))["offset"], n);
        assert_eq!(c_old.next_json("message")["offset"], n);
    }
    old.signal(libc::SIGUSR2);
    let _successor = Successor::of(&old);
    assert!(old.log().contains("history handed to the new process"));
    old_stopped_accepting(&old, 1);
    // The old process no longer accepts: this is the new one's client.
    let mut p_new = Client::connect(&old, "/ws");
    // Numbered by the new process, in the same epoch, and delivered to
    // the subscriber still on the old one.
    assert_eq!(publish(&mut p_new, 3, "k3")["offset"], 3);
    let m = c_old.next_json("a message the new process numbered");
    assert_eq!(
        (m["offset"].as_u64(), m["data"].as_u64()),
        (Some(3), Some(3))
    );
    // Published on the old process: the new one numbers it.
    assert_eq!(publish(&mut p_old, 4, "k4")["offset"], 4);
    let m = c_old.next_json("a message the old process forwarded");
    assert_eq!(
        (m["offset"].as_u64(), m["data"].as_u64()),
        (Some(4), Some(4))
    );
    // Idempotency keys: those the old process saw, and those the new one
    // saw, from either side, are answered as the first time.
    assert_eq!(publish(&mut p_new, 1, "k1")["offset"], 1);
    assert_eq!(publish(&mut p_old, 3, "k3")["offset"], 3);
    // A recovery on either process: the new one has the old one's
    // history, the old one keeps what the new one numbers.
    let mut c_new = Client::connect(&old, "/ws");
    c_new.send_json(
        serde_json::json!({"op":"subscribe","channel":"news","id":"s",
                                       "since":{"epoch":epoch,"offset":1}}),
    );
    let v = c_new.next_json("subscribed");
    assert_eq!(
        (v["recovered"].as_bool(), v["epoch"].as_str()),
        (Some(true), Some(epoch.as_str())),
        "{v}"
    );
    for n in 2..=4 {
        assert_eq!(c_new.next_json("replayed")["offset"], n);
    }
    c_old.send_json(
        serde_json::json!({"op":"subscribe","channel":"news","id":"s2",
                                       "since":{"epoch":epoch,"offset":2}}),
    );
    let v = c_old.next_json("subscribed again");
    assert_eq!(v["recovered"], true, "{v}");
    for n in 3..=4 {
        assert_eq!(c_old.next_json("replayed by the old process")["offset"], n);
    }
    // Nothing was delivered twice: the next message is 5, on both.
    assert_eq!(publish(&mut p_new, 5, "k5")["offset"], 5);
    assert_eq!(c_old.next_json("message 5")["offset"], 5);
    assert_eq!(c_new.next_json("message 5")["offset"], 5);
    // The old process drains and exits; the new one goes on alone.
    let (code, _) = c_old.expect_close();
    assert_eq!(code, 1012);
    assert!(old.wait_exit(Duration::from_secs(20)).success());
    wait_for("the new process to see the old one gone", || {
        old.log().contains("the old process is gone")
    });
    assert_eq!(publish(&mut p_new, 6, "k6")["offset"], 6);
    assert_eq!(c_new.next_json("message 6")["offset"], 6);
}

#[test]
fn a_restart_with_history_on_disk_hands_the_file_over() {
    let _one = one_at_a_time();
    // HISTORY_DIR's file is held by one process at a time: the old one
    // stops numbering and closes it, the new one opens it before it
    // accepts, and the history (epoch and offsets) goes on; the old
    // process's clients are closed over DRAIN_SECONDS as without it.
    let tmp = tls::TempDir::new("restart-hd");
    let dir = &tmp.0;
    let notify_path = dir.join("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    manager.set_read_timeout(Some(TIMEOUT)).unwrap();
    let history_dir = dir.join("history");
    let mut old = Server::start(&[
        ("HISTORY", "news=100/1h"),
        ("HISTORY_DIR", history_dir.to_str().unwrap()),
        ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
        ("DRAIN_SECONDS", "1"),
    ]);
    let (mut c, epoch) = news_subscriber(&old);
    let mut p = Client::connect(&old, "/ws");
    for n in 1..=3 {
        p.send_json(serde_json::json!({"op":"publish","channel":"news","data":n,"id":"p"}));
        assert_eq!(p.next_json("ack")["offset"], n);
    }
    for n in 1..=3 {
        assert_eq!(c.next_json("message")["offset"], n);
    }
    old.signal(libc::SIGUSR2);
    let successor = Successor::of(&old);
    // The service manager heard the new process take over as main pid
    // and say it is ready.
    let said_main = format!("MAINPID={}\n", successor.0);
    let (mut readies, mut mains) = (0, 0);
    let mut buf = [0u8; 128];
    while readies < 2 || mains < 1 {
        let n = manager.recv(&mut buf).expect("the new process's READY=1");
        match &buf[..n] {
            b"READY=1\n" => readies += 1,
            m if m == said_main.as_bytes() => mains += 1,
            _ => {}
        }
    }
    old_stopped_accepting(&old, 2);
    let mut p = Client::connect(&old, "/ws");
    p.send_json(serde_json::json!({"op":"publish","channel":"news","data":4,"id":"p"}));
    assert_eq!(p.next_json("ack")["offset"], 4, "offsets go on");
    let (code, _) = c.expect_close();
    assert_eq!(code, 1012);
    assert!(old.wait_exit(Duration::from_secs(15)).success());
    let mut back = Client::connect(&old, "/ws");
    back.send_json(
        serde_json::json!({"op":"subscribe","channel":"news","id":"s",
                                      "since":{"epoch":epoch,"offset":3}}),
    );
    let v = back.next_json("subscribed");
    assert_eq!(v["recovered"], true, "{v}");
    assert_eq!(v["epoch"], epoch.as_str());
    assert_eq!(back.next_json("the missed message")["offset"], 4);
    // The new process writes the file now: a message of its own is there
    // after it stops (read back by a third process).
    p.send_json(serde_json::json!({"op":"publish","channel":"news","data":5,"id":"p"}));
    assert_eq!(p.next_json("ack")["offset"], 5);
    drop((p, back));
    // SAFETY: kill(2) on the pid the log named.
    unsafe {
        libc::kill(successor.0 as i32, libc::SIGTERM);
    }
    wait_for("the new process to stop", || {
        old.log().matches("herald stopped").count() >= 2
    });
    let third = Server::start(&[
        ("HISTORY", "news=100/1h"),
        ("HISTORY_DIR", history_dir.to_str().unwrap()),
    ]);
    let mut r = Client::connect(&third, "/ws");
    r.send_json(
        serde_json::json!({"op":"subscribe","channel":"news","id":"s",
                                   "since":{"epoch":epoch,"offset":3}}),
    );
    let v = r.next_json("subscribed on the third process");
    assert_eq!(v["recovered"], true, "{v}");
    assert_eq!(r.next_json("4")["offset"], 4);
    assert_eq!(r.next_json("5")["offset"], 5);
}

#[test]
fn a_new_process_lost_during_the_drain_sends_the_rest_to_reconnect_at_once() {
    let _one = one_at_a_time();
    // The new process vanishes (SIGKILL) while the old one drains: the
    // old one's remaining clients would get no more messages, so they are
    // closed now (to reconnect and recover) rather than over the drain.
    let (mut old, _fillers) = draining_in_order("30", 20, &[("HISTORY", "news=100/1h")]);
    let mut c_old = Client::connect(&old, "/ws");
    c_old.subscribe("news");
    old.signal(libc::SIGUSR2);
    let successor = Successor::of(&old);
    let started = Instant::now();
    drop(successor);
    let (code, _) = c_old.expect_close();
    assert_eq!(code, 1012);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed at once, not over the 30 s drain: {:?}",
        started.elapsed()
    );
    assert!(old.wait_exit(Duration::from_secs(15)).success());
    assert!(
        old.log().contains("closing this process's clients now"),
        "{}",
        old.log()
    );
}

#[test]
fn a_new_process_that_dies_after_taking_the_history_leaves_the_old_one_numbering() {
    let _one = one_at_a_time();
    // The new process takes the history, then cannot open HISTORY_DIR
    // (its path is now a file) and exits: the old process numbers its
    // channels again and keeps serving.
    let tmp = tls::TempDir::new("restart-dies");
    let dir = &tmp.0;
    let history_dir = dir.join("history");
    let old = Server::start(&[
        ("HISTORY", "news=100/1h"),
        ("HISTORY_DIR", history_dir.to_str().unwrap()),
    ]);
    let mut c = Client::connect(&old, "/ws");
    c.subscribe("news");
    let mut p = Client::connect(&old, "/ws");
    let publish = |p: &mut Client, n: u64| -> Value {
        p.send_json(serde_json::json!({"op":"publish","channel":"news","data":n,"id":"p"}));
        p.next_json("ack")
    };
    assert_eq!(publish(&mut p, 1)["offset"], 1);
    std::fs::rename(&history_dir, dir.join("moved")).unwrap();
    std::fs::write(&history_dir, b"not a directory").unwrap();
    old.signal(libc::SIGUSR2);
    wait_for("the restart to be given up", || {
        old.log().contains("restart given up")
    });
    assert!(
        old.log().contains("numbering every channel here again"),
        "{}",
        old.log()
    );
    // Still serving, and numbering: the publish is acked and delivered.
    assert_eq!(c.next_json("message 1")["offset"], 1);
    let ack = publish(&mut p, 2);
    assert_eq!(ack["op"], "ack", "{ack}");
    let m = c.next_json("a message after the failed restart");
    assert_eq!(m["data"], 2);
}

#[test]
fn a_restart_after_the_binary_was_replaced_runs_the_new_file() {
    let _one = one_at_a_time();
    // What a package upgrade does: the new file is written beside the
    // running one and renamed over it. The new "binary" here is a script
    // that says it runs, then runs herald (exec keeps the pid).
    let dir = tls::TempDir::new("restart-replaced");
    let exe = dir.0.join("herald");
    std::fs::copy(env!("CARGO_BIN_EXE_herald"), &exe).unwrap();
    let mut old = Server::start_exe(&exe, &[("DRAIN_SECONDS", "1")]);
    let mut c = Client::connect(&old, "/ws");
    c.subscribe("news");
    let next = dir.0.join("herald.new");
    std::fs::write(
        &next,
        format!(
            "#!/bin/sh\necho 'the replaced file runs' >&2\nexec '{}' \"$@\"\n",
            env!("CARGO_BIN_EXE_herald")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&next, &exe).unwrap();
    old.signal(libc::SIGUSR2);
    let _successor = Successor::of(&old);
    assert!(
        old.log().contains("the replaced file runs"),
        "{}",
        old.log()
    );
    let (code, _) = c.expect_close();
    assert_eq!(code, 1012);
    assert!(old.wait_exit(Duration::from_secs(15)).success());
    // The new process serves.
    let mut c = Client::connect(&old, "/ws");
    c.subscribe("news");
    let mut p = Client::connect(&old, "/ws");
    p.publish("news", serde_json::json!("after the upgrade"));
    assert_eq!(c.next_json("a message")["data"], "after the upgrade");
}

#[test]
fn an_old_process_that_stops_reading_the_link_loses_it_and_sends_its_clients_over() {
    let _one = one_at_a_time();
    // The old process stops (SIGSTOP) while the new one numbers messages
    // for it: the new one gives the link up (its writes time out) rather
    // than queue without bound, and once the old one runs again it sees the
    // link gone and closes its remaining clients at once (they recover from
    // the new one), instead of serving them a stream with a hole.
    let history = [
        ("HISTORY", "news=100000/1h"),
        ("HISTORY_RECOVER_MAX", "100000"),
    ];
    let (mut old, _fillers) = draining_in_order("60", 20, &history);
    let (mut c_old, epoch) = news_subscriber(&old);
    old.signal(libc::SIGUSR2);
    let _successor = Successor::of(&old);
    old_stopped_accepting(&old, 1);
    old.signal(libc::SIGSTOP);
    let mut p = Client::connect(&old, "/ws");
    let big = "x".repeat(200);
    let n = 3000;
    for i in 1..=n {
        p.send_json(
            serde_json::json!({"op":"publish","channel":"news","data":big,"id":format!("{i}")}),
        );
        assert_eq!(p.next_json("ack")["offset"], i);
    }
    // Past the link's write timeout (5 s), with more waiting than it holds.
    let gave_up = Instant::now();
    while !old.log().contains("it is given up") {
        assert!(gave_up.elapsed() < Duration::from_secs(15), "{}", old.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gave_up.elapsed() < Duration::from_secs(15));
    old.signal(libc::SIGCONT);
    // The old process's client is closed now, not at the end of the 60 s
    // drain, having seen no message out of order.
    let started = Instant::now();
    let mut last = 0;
    loop {
        match c_old.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                let off = v["offset"].as_u64().unwrap();
                assert_eq!(off, last + 1, "in order, no hole");
                last = off;
            }
            Ok(tungstenite::Message::Close(f)) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1012));
                break;
            }
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // It comes back to the new process and recovers the rest.
    let mut back = Client::connect(&old, "/ws");
    back.send_json(
        serde_json::json!({"op":"subscribe","channel":"news","id":"s",
                                      "since":{"epoch":epoch,"offset":last}}),
    );
    let v = back.next_json("subscribed");
    assert_eq!(v["recovered"], true, "{v}");
    for i in last + 1..=n {
        assert_eq!(back.next_json("replayed")["offset"], i);
    }
    assert!(old.wait_exit(Duration::from_secs(20)).success());
}
