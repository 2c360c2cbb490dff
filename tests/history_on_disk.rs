//! `HISTORY_DIR` (protocol.md 1.1, "History"): history and epochs survive
//! a clean restart; after a crash (`kill -9`) what reached the disk goes on
//! under a new epoch, so clients are told `recovered:false` rather than
//! given a gap; a directory that cannot be used stops the server at start.

mod common;

use std::path::PathBuf;

use common::{http, Client, Server, TIMEOUT};
use serde_json::{json, Value};

const HISTORY: &str = "news=100/1h";

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "herald-history-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn server(dir: &TempDir) -> Server {
    Server::start(&[("HISTORY", HISTORY), ("HISTORY_DIR", dir.path())])
}

/// Publishes `data` over HTTP; returns (epoch, offset).
fn publish(server: &Server, data: Value) -> (String, u64) {
    let body = json!({"channel":"news","data":data}).to_string();
    let (status, reply) = http(server.addr, "POST", "/publish", &[], body.as_bytes());
    assert_eq!(status, 202, "{reply}");
    let v: Value = serde_json::from_str(&reply).unwrap();
    (
        v["epoch"].as_str().unwrap().to_string(),
        v["offset"].as_u64().unwrap(),
    )
}

fn subscribe_since(server: &Server, epoch: &str, offset: u64) -> (Client, Value) {
    let mut c = Client::connect(server, "/ws");
    c.send_json(json!({"op":"subscribe","channel":"news","id":1,
                       "since":{"epoch":epoch,"offset":offset}}));
    let r = c.recv_json();
    assert_eq!(r["op"], "subscribed", "{r}");
    (c, r)
}

#[test]
fn history_and_epochs_survive_a_clean_restart() {
    let dir = TempDir::new("clean");
    let mut first = server(&dir);
    let mut epoch = String::new();
    for i in 1..=5u64 {
        let (e, off) = publish(&first, json!(i));
        assert_eq!(off, i);
        epoch = e;
    }
    first.signal(libc::SIGTERM);
    assert!(first.wait_exit(TIMEOUT).success());

    let second = server(&dir);
    let (mut c, r) = subscribe_since(&second, &epoch, 2);
    assert_eq!(
        r,
        json!({"op":"subscribed","channel":"news","id":1,"epoch":epoch,"offset":5,"recovered":true})
    );
    for i in 3..=5u64 {
        assert_eq!(
            c.recv_json(),
            json!({"op":"message","channel":"news","offset":i,"data":i})
        );
    }
    // Offsets go on in the same epoch.
    let (e, off) = publish(&second, json!(6));
    assert_eq!((e.as_str(), off), (epoch.as_str(), 6));
    assert_eq!(c.recv_json()["offset"], 6);
    let (status, body) = http(second.addr, "GET", "/history?channel=news", &[], b"");
    assert_eq!(status, 200);
    let h: Value = serde_json::from_str(&body).unwrap();
    let offsets: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![1, 2, 3, 4, 5, 6]);

    // And once more: the second server's messages were kept too.
    drop(c);
    let mut second = second;
    second.signal(libc::SIGTERM);
    assert!(second.wait_exit(TIMEOUT).success());
    let third = server(&dir);
    let (_c, r) = subscribe_since(&third, &epoch, 6);
    assert_eq!(
        (r["recovered"].as_bool(), r["offset"].as_u64()),
        (Some(true), Some(6))
    );
}

#[test]
fn after_a_crash_what_reached_the_disk_goes_on_under_a_new_epoch() {
    let dir = TempDir::new("crash");
    let mut first = server(&dir);
    let mut epoch = String::new();
    for i in 1..=3u64 {
        epoch = publish(&first, json!({"n": i})).0;
    }
    // The three are committed (the storage thread counts them).
    common::wait_for("3 messages on disk", || {
        first.metric("herald_history_disk_written_total") >= 3.0
    });
    first.signal(libc::SIGKILL);
    first.wait_exit(TIMEOUT);

    let second = server(&dir);
    let (_c, r) = subscribe_since(&second, &epoch, 3);
    assert_eq!(r["recovered"], false, "{r}");
    let fresh = r["epoch"].as_str().unwrap().to_string();
    assert_ne!(fresh, epoch, "a new epoch after the crash");
    assert_eq!(r["offset"], 3, "what reached the disk is kept");
    let (status, body) = http(second.addr, "GET", "/history?channel=news", &[], b"");
    assert_eq!(status, 200);
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        h,
        json!({"channel":"news","epoch":fresh,"offset":3,"messages":[
            {"offset":1,"data":{"n":1}},{"offset":2,"data":{"n":2}},{"offset":3,"data":{"n":3}}]})
    );
    // Replayed frames carry their new offsets.
    let (mut c, r) = subscribe_since(&second, &fresh, 1);
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(
        c.recv_json(),
        json!({"op":"message","channel":"news","offset":2,"data":{"n":2}})
    );
    let (e, off) = publish(&second, json!("after"));
    assert_eq!((e.as_str(), off), (fresh.as_str(), 4));
}

#[test]
fn a_history_dir_that_cannot_be_used_stops_the_server_at_start() {
    let dir = TempDir::new("file");
    // A file where the directory should be.
    std::fs::write(&dir.0, b"not a directory").unwrap();
    let log = match Server::try_start(&[("HISTORY", HISTORY), ("HISTORY_DIR", dir.path())]) {
        Ok(_) => panic!("herald started with HISTORY_DIR naming a file"),
        Err(log) => log,
    };
    assert!(log.contains("HISTORY_DIR"), "{log}");
    let _ = std::fs::remove_file(&dir.0);
}

/// A 1 MiB tmpfs, unmounted on drop.
struct SmallDisk(TempDir);

impl SmallDisk {
    /// `None` where this process may not mount (not root, no
    /// CAP_SYS_ADMIN).
    fn mount() -> Option<SmallDisk> {
        let dir = TempDir::new("full");
        std::fs::create_dir_all(&dir.0).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs", dir.path()])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn a_full_disk_is_counted_logged_once_and_live_delivery_goes_on() {
    let Some(disk) = SmallDisk::mount() else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let server = Server::start(&[
        ("HISTORY", "news=100000/1h"),
        ("HISTORY_DIR", disk.0.path()),
    ]);
    let mut sub = Client::connect(&server, "/ws");
    sub.subscribe("news");
    let pad = "x".repeat(4000);
    let first_epoch = publish(&server, json!({"n": 0, "pad": pad})).0;
    // 1 MiB fills within a few hundred of these.
    let mut n = 0u64;
    while server.metric("herald_history_disk_dropped_total") == 0.0 {
        n += 1;
        assert!(n < 3000, "the disk never filled");
        publish(&server, json!({"n": n, "pad": pad}));
    }
    // Every message was delivered live, in order.
    for i in 0..=n {
        let m = sub.recv_json();
        assert_eq!(m["data"]["n"], i, "live delivery went on");
    }
    // The channel starts a new epoch at its next message once the failed
    // write is known (which may be the last publish of the loop already).
    let (epoch, offset) = publish(&server, json!({"n": "after"}));
    assert_ne!(epoch, first_epoch, "a new epoch once the disk failed");
    assert!(offset <= 2, "offsets start again at 1: {offset} after {n}");
    let (status, _) = http(server.addr, "GET", "/health", &[], b"");
    assert_eq!(status, 200);
    let log = server.log();
    assert_eq!(
        log.matches("history could not be written").count(),
        1,
        "logged once:\n{log}"
    );
    drop(sub);
    drop(server);
}
