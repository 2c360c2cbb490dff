//! The configuration file (`CONFIG`): its keys are the settings, a
//! variable or flag overrides a key, a mistake exits with code 2 and one
//! line naming the file, the line and the key, and `--print-config` shows
//! the effective configuration (with where each value came from) with
//! secrets masked, as a file herald reads back.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

/// A file in a directory of its own, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, text: &str) -> TempFile {
        let dir = std::env::temp_dir().join(format!("herald-config-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("herald.toml");
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs herald with exactly `env` and `args` to its end; (code, stdout, stderr).
fn run(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().expect("exited by a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_file_configures_and_the_environment_overrides_it() {
    let file = TempFile::new(
        "serve",
        "# a test\nhistory = \"news=10/1m\"\nmax_message_size = \"1KiB\"\nport = 1\n",
    );
    // PORT=0 (the harness's) wins over the file's port 1.
    let server = Server::start(&[("CONFIG", file.path())]);
    let mut c = Client::connect(&server, "/ws");
    c.send_json(json!({"op":"subscribe","channel":"news","id":"s"}));
    let v = c.next_json("subscribed");
    assert!(v["epoch"].is_string(), "history from the file: {v}");
    c.send_json(json!({"op":"publish","channel":"news","data":"x".repeat(2000)}));
    let (code, _) = c.expect_close();
    assert_eq!(code, 1009, "MAX_MESSAGE_SIZE from the file");
    // The variable wins over the file's key.
    let server = Server::start(&[("CONFIG", file.path()), ("MAX_MESSAGE_SIZE", "64KiB")]);
    let mut c = Client::connect(&server, "/ws");
    c.send_json(json!({"op":"publish","channel":"news","data":"x".repeat(2000),"id":"p"}));
    let v = c.next_json("publish ack");
    assert_eq!(v["op"], "ack", "{v}");
}

#[test]
fn mistakes_name_the_file_line_and_key() {
    let cases = [
        (
            "port = 7000\nmax_conections = 10\n",
            "line 2",
            "max_conections",
        ),
        ("port = 7000\n\nport = \"http\"\n", "line 3", ""),
        ("workers = 1\nport = \"http\"\n", "line 2", "port"),
        ("[pusher]\nkey = 1\n", "line 1", "pusher"),
        ("port = \n", "line 1", ""),
        ("config = \"/etc/x.toml\"\n", "line 1", "config"),
        ("secret = \"\"\n", "", "SECRET"),
    ];
    for (i, (text, line, key)) in cases.iter().enumerate() {
        let file = TempFile::new(&format!("bad{i}"), text);
        let (code, _, err) = run(&[("CONFIG", file.path()), ("WORKERS", "1")], &[]);
        assert_eq!(code, 2, "{text:?}: {err}");
        let err = err.trim_end();
        assert!(!err.contains('\n'), "{text:?}: not one line: {err}");
        assert!(err.contains(line) && err.contains(key), "{text:?}: {err}");
        if !line.is_empty() {
            assert!(err.contains(file.path()), "{text:?}: {err}");
        }
    }
    let (code, _, err) = run(&[("CONFIG", "/nonexistent/herald.toml")], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/herald.toml"), "{err}");
}

#[test]
fn print_config_masks_secrets_says_where_each_value_comes_from_and_reads_back() {
    let secret = "s3cret-s3cret-s3cret-s3cret-s3cret";
    let file = TempFile::new(
        "print",
        &format!(
            "secret = \"{secret}\"\nbroker_url = \"redis://user:hunter2@127.0.0.1:6379\"\n\
             apps = '[{{\"id\":\"1\",\"key\":\"k\",\"secret\":\"appsecret\"}}]'\n\
             history = \"chat:*=100/5m\"\nallowed_origins = [\"https://a.example\", \"https://b.example\"]\n"
        ),
    );
    let (code, out, err) = run(
        &[("CONFIG", file.path()), ("PORT", "7001")],
        &["--print-config", "--workers", "3"],
    );
    assert_eq!(code, 0, "{err}");
    for hidden in [secret, "hunter2", "appsecret"] {
        assert!(!out.contains(hidden), "{hidden} shown:\n{out}");
    }
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
            .to_string()
    };
    assert!(line("secret").contains(&format!("{} line 1", file.path())));
    assert!(line("broker_url").contains("redis://***@127.0.0.1:6379"));
    assert!(line("port").starts_with("port = 7001") && line("port").ends_with("# PORT"));
    assert!(line("workers").ends_with("# --workers"));
    assert!(line("max_connections").ends_with("# default"));
    assert!(line("allowed_origins").contains("https://a.example,https://b.example"));
    assert!(
        out.contains("# host is not set: herald listens on 0.0.0.0"),
        "{out}"
    );
    // What it prints is a configuration file: read back, the same values
    // (the masked ones left out).
    let printed: String = out
        .lines()
        .filter(|l| {
            !l.starts_with("secret") && !l.starts_with("apps") && !l.starts_with("broker_url")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let again = TempFile::new("again", &printed);
    let (code, out2, err) = run(
        &[("CONFIG", again.path()), ("SECRET", secret)],
        &["--print-config"],
    );
    assert_eq!(code, 0, "{err}");
    for key in [
        "port",
        "workers",
        "history",
        "allowed_origins",
        "max_connections",
    ] {
        let value = |o: &str| {
            o.lines()
                .find(|l| l.starts_with(&format!("{key} = ")))
                .map(|l| l.split("  #").next().unwrap().to_string())
        };
        assert_eq!(value(&out2), value(&printed), "{key}");
    }
}
