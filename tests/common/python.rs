//! The Python venv the interoperability tests run their scripts with
//! (`target/pyenv`, the one `scripts/test-deps.sh` prepares): found, and
//! completed with a package if it is missing, under an exclusive `flock`
//! so concurrent test processes never build it at the same time.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The cargo target directory (honours CARGO_TARGET_DIR).
pub fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => manifest.join(dir),
        None => manifest.join("target"),
    }
}

/// Runs `cmd`, failing the test with its output if it does not succeed.
pub fn run(cmd: &mut Command, what: &str) {
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

fn can_import(python: &Path, module: &str) -> bool {
    python.exists()
        && Command::new(python)
            .args(["-c", &format!("import {module}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// The venv's python with `module` importable, pip-installing
/// `requirement` (e.g. `websockets>=13,<16`) into it if needed.
pub fn python_with(module: &str, requirement: &str) -> PathBuf {
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
    if !can_import(&python, module) {
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
                requirement,
            ]),
            &format!("pip install {requirement}"),
        );
        assert!(
            can_import(&python, module),
            "{} still cannot import {module}",
            python.display()
        );
    }
    drop(lock);
    python
}

/// Runs `python script args..` with `env`, killing it after `timeout`.
/// Fails the test, with both output streams and `log()` (the server's
/// log), unless it exits successfully; returns its stdout.
pub fn run_script(
    python: &Path,
    script: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: std::time::Duration,
    log: impl Fn() -> String,
) -> String {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .args(args)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
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
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let [stdout, stderr] = readers.map(|t| t.join().unwrap());
    let report = format!(
        "--- script stdout\n{stdout}--- script stderr\n{stderr}--- server log\n{}",
        log()
    );
    match status {
        None => panic!(
            "{} did not finish within {timeout:?}\n{report}",
            script.display()
        ),
        Some(s) => assert!(
            s.success(),
            "{} {args:?} exited with {s}\n{report}",
            script.display()
        ),
    }
    stdout
}
