//! protocol.md "Authentication" and config: an invalid setting (or open mode
//! on a non-loopback address) makes herald exit with code 2 and one line on
//! stderr naming the variable; `--help` exits 0 and documents every variable.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs herald with exactly `env` (and `args`); returns (exit code, stdout, stderr).
fn run(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.env_clear()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn herald");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("herald with {env:?} {args:?} did not exit: it started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code().expect("exited by signal"), out, err)
}

#[test]
fn invalid_values_exit_2_with_one_line_naming_the_variable() {
    let cases: &[(&str, &str)] = &[
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("MAX_MESSAGE_SIZE", "huge"),
        ("WORKERS", "0"),
        ("LOGLEVEL", "loud"),
        ("LOGLEVEL", "herald=loud"),
        ("LOG_FORMAT", "xml"),
        ("RUST_LOG", "herald=loud"),
        ("MAX_CONNECTIONS", "0"),
        ("SEND_QUEUE_LIMIT", "-1"),
        ("READ_BUFFER_SIZE", "12parsecs"),
        ("WRITE_BUFFER_SIZE", "0"),
        ("CHECK_ORIGIN", "maybe"),
        ("HOST", "not-an-ip"),
        ("TRUSTED_PROXIES", "proxy.local"),
        ("TRUSTED_PROXIES", "10.0.0.0/33"),
        ("MAX_PENDING", "0"),
        ("PING_INTERVAL", "soon"),
        ("PONG_TIMEOUT", "0"),
        ("WRITE_DELAY", "soon"),
        ("WRITE_DELAY", "2s"),
        ("HISTORY", "news"),
        ("HISTORY", "news=0/1h"),
        ("HISTORY", "a*b=10/1h"),
        ("HISTORY_RECOVER_MAX", "0"),
        ("IDEMPOTENCY_WINDOW", "soon"),
        ("BROKER_URL", "localhost:6379"),
        ("BROKER_URL", "tls://127.0.0.1:4222"),
        ("BROKER_URL", "redis://"),
        ("NODE_ID", "has space"),
    ];
    for &(var, value) in cases {
        let mut env = vec![("PORT", "0"), ("WORKERS", "1")];
        env.retain(|(k, _)| *k != var);
        env.push((var, value));
        let (code, _out, err) = run(&env, &[]);
        assert_eq!(code, 2, "{var}={value}: stderr {err:?}");
        let line = err.strip_suffix('\n').unwrap_or(&err);
        assert!(
            !line.is_empty() && !line.contains('\n'),
            "{var}={value}: stderr is not exactly one line: {err:?}"
        );
        assert!(
            line.contains(var),
            "{var}={value}: stderr does not name {var}: {err:?}"
        );
    }
}

#[test]
fn history_dir_with_a_broker_exits_2() {
    let dir = std::env::temp_dir().join(format!("herald-dir-broker-{}", std::process::id()));
    let env = [
        ("PORT", "0"),
        ("WORKERS", "1"),
        ("BROKER_URL", "redis://127.0.0.1:1"),
        ("HISTORY", "news=10/1m"),
        ("HISTORY_DIR", dir.to_str().unwrap()),
    ];
    let (code, _out, err) = run(&env, &[]);
    assert_eq!(code, 2, "stderr {err:?}");
    assert!(
        err.contains("HISTORY_DIR") && err.contains("BROKER_URL"),
        "{err}"
    );
}

#[test]
fn history_with_a_nats_broker_exits_2() {
    let env = [
        ("PORT", "0"),
        ("WORKERS", "1"),
        ("BROKER_URL", "nats://127.0.0.1:1"),
        ("HISTORY", "news=10/1m"),
    ];
    let (code, _out, err) = run(&env, &[]);
    assert_eq!(code, 2, "stderr {err:?}");
    assert!(err.contains("HISTORY") && err.contains("nats://"), "{err}");
}

#[test]
fn open_mode_on_a_public_address_exits_2() {
    let (code, _out, err) = run(&[("PORT", "0"), ("WORKERS", "1"), ("HOST", "0.0.0.0")], &[]);
    assert_eq!(code, 2, "stderr {err:?}");
    let line = err.strip_suffix('\n').unwrap_or(&err);
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "stderr is not exactly one line: {err:?}"
    );
    assert!(
        line.contains("SECRET"),
        "stderr does not name SECRET: {err:?}"
    );
}

#[test]
fn help_exits_0_and_lists_every_variable_with_its_default() {
    let (code, out, err) = run(&[], &["--help"]);
    assert_eq!(code, 0, "stderr {err:?}");
    // One option's help can wrap over lines: compare with whitespace collapsed.
    let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
    // Each option's text, from its flag to the next one.
    let section = |var: &str| -> String {
        let flag = format!("--{}", var.to_lowercase().replace('_', "-"));
        let start = flat
            .find(&format!("{flag} <{var}>"))
            .unwrap_or_else(|| panic!("--help does not list {flag} <{var}>:\n{out}"));
        let rest = &flat[start + flag.len()..];
        let end = rest.find(" --").unwrap_or(rest.len());
        rest[..end].to_string()
    };
    let expected: &[(&str, Option<&str>)] = &[
        ("SECRET", None),
        ("HOST", Some("127.0.0.1")),
        ("PORT", Some("[default: 6380]")),
        ("LOGLEVEL", Some("[default: info]")),
        ("WORKERS", Some("[default:")),
        ("MAX_CONNECTIONS", Some("[default: 100000]")),
        ("MAX_MESSAGE_SIZE", Some("[default: 64KiB]")),
        ("READ_BUFFER_SIZE", Some("[default: 64KiB]")),
        ("WRITE_BUFFER_SIZE", Some("[default: 256KiB]")),
        ("SEND_QUEUE_LIMIT", Some("[default: 1MiB]")),
        ("CHECK_ORIGIN", Some("[default: false]")),
        ("ALLOWED_ORIGINS", None),
    ];
    for &(var, default) in expected {
        let text = section(var);
        assert!(
            text.contains(&format!("env: {var}")),
            "--help does not name the variable {var}: {text}"
        );
        if let Some(d) = default {
            assert!(text.contains(d), "--help for {var} lacks {d:?}: {text}");
        }
    }
}

#[test]
fn an_empty_secret_exits_2_instead_of_accepting_tokens_signed_with_no_key() {
    for args in [&[][..], &["--secret", ""][..]] {
        let (code, _out, err) = run(&[("PORT", "0"), ("WORKERS", "1"), ("SECRET", "")], args);
        assert_eq!(code, 2, "SECRET='' {args:?}: stderr {err:?}");
        let line = err.strip_suffix('\n').unwrap_or(&err);
        assert!(
            !line.is_empty() && !line.contains('\n'),
            "stderr is not exactly one line: {err:?}"
        );
        assert!(
            line.contains("SECRET") && line.contains("empty"),
            "stderr does not say SECRET is empty: {err:?}"
        );
    }
}

#[test]
fn a_history_dir_that_cannot_be_used_exits_2() {
    let file = std::env::temp_dir().join(format!("herald-not-a-dir-{}", std::process::id()));
    std::fs::write(&file, b"a file").unwrap();
    let path = file.to_str().unwrap().to_string();
    let env = [
        ("PORT", "0"),
        ("WORKERS", "1"),
        ("HISTORY", "news=10/1h"),
        ("HISTORY_DIR", path.as_str()),
    ];
    let (code, _out, err) = run(&env, &[]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, 2, "stderr {err:?}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains("HISTORY_DIR"),
        "the last line names HISTORY_DIR: {err:?}"
    );
}
