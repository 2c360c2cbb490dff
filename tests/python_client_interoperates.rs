//! Interoperability with a WebSocket client that is not tungstenite: runs
//! `tests/py/pubsub_client.py` (Python `websockets`) against a real server.
//!
//! The Python lives in a venv at `target/pyenv` (or `$CARGO_TARGET_DIR/pyenv`);
//! when it is missing this test creates it (`python3 -m venv`, `pip install
//! websockets`) under a lock file, as `scripts/test-deps.sh` does.

mod common;
#[path = "common/python.rs"]
mod python;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;

/// The version range `scripts/test-deps.sh` installs too (13 brought the
/// `websockets.asyncio` client the script uses).
const WEBSOCKETS: &str = "websockets>=13,<16";

/// How long the script may run before it is killed.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

/// The venv's python with `websockets.asyncio.client` importable.
fn python() -> PathBuf {
    python::python_with("websockets.asyncio.client", WEBSOCKETS)
}

#[test]
fn python_websockets_client_subscribes_publishes_pings_and_closes() {
    let python = python();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/pubsub_client.py");
    let server = Server::open();
    let url = server.url("/ws");

    let mut child = Command::new(&python)
        .arg(&script)
        .arg(&url)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let readers = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .map(|mut r| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if start.elapsed() > SCRIPT_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let [stdout, stderr] = readers.map(|t| t.join().unwrap());
    let report = format!(
        "--- script stdout\n{stdout}--- script stderr\n{stderr}--- server log\n{}",
        server.log()
    );
    match status {
        None => panic!(
            "{} did not finish within {SCRIPT_TIMEOUT:?}\n{report}",
            script.display()
        ),
        Some(s) => assert!(
            s.success(),
            "{} against {url} exited with {s}\n{report}",
            script.display()
        ),
    }
}
