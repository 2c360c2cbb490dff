//! Interoperability with a WebSocket client that is not tungstenite: runs
//! `tests/py/pubsub_client.py` (Python `websockets`) against a real server.
//!
//! The Python lives in a venv at `target/pyenv` (or `$CARGO_TARGET_DIR/pyenv`);
//! when it is missing this test creates it (`python3 -m venv`, `pip install
//! websockets`) under a lock file, as `scripts/test-deps.sh` does.

mod common;
#[path = "common/python.rs"]
mod python;

use std::path::{Path, PathBuf};

use std::time::Duration;

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

    python::run_script(&python, &script, &[&url], &[], SCRIPT_TIMEOUT, || {
        server.log()
    });
}
