//! Interoperability with a WebSocket client that is not tungstenite: runs
//! `tests/py/pubsub_client.py` (Python `websockets`) against a real server.
//!
//! The Python lives in a venv at `target/pyenv` (or `$CARGO_TARGET_DIR/pyenv`);
//! when it is missing this test creates it (`python3 -m venv`, `pip install
//! websockets`) under a lock file, as `scripts/test-deps.sh` does.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;

/// The version range `scripts/test-deps.sh` installs too (13 brought the
/// `websockets.asyncio` client the script uses).
const WEBSOCKETS: &str = "websockets>=13,<16";

/// How long the script may run before it is killed.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => manifest.join(dir),
        None => manifest.join("target"),
    }
}

/// Runs `cmd`, failing the test with its output if it does not succeed.
fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn has_websockets(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .args(["-c", "import websockets.asyncio.client"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// The venv's python with `websockets` importable, creating the venv if
/// needed. An exclusive `flock` keeps concurrent test processes (and
/// `scripts/test-deps.sh`) from building it at the same time.
fn python() -> PathBuf {
    let target = target_dir();
    std::fs::create_dir_all(&target).expect("create target dir");
    let venv = target.join("pyenv");
    let python = venv.join("bin/python");
    let lock = File::create(target.join("pyenv.lock")).expect("create pyenv.lock");
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(
        rc,
        0,
        "flock pyenv.lock: {}",
        std::io::Error::last_os_error()
    );
    if !has_websockets(&python) {
        if !venv.join("bin/pip").exists() {
            let _ = std::fs::remove_dir_all(&venv);
            run(
                Command::new("python3").arg("-m").arg("venv").arg(&venv),
                "creating the venv (Debian: apt-get install python3-venv)",
            );
        }
        run(
            Command::new(venv.join("bin/pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                WEBSOCKETS,
            ]),
            "pip install websockets",
        );
        assert!(
            has_websockets(&python),
            "{} still cannot import websockets.asyncio.client",
            python.display()
        );
    }
    drop(lock);
    python
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
