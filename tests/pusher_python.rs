//! A second Pusher server library against herald: `tests/py/pusher_trigger.py`
//! runs the Python `pusher` package unchanged (triggers, a batch, an
//! excluded socket_id, the channels / channel / users queries, refused
//! requests) while raw Pusher-protocol WebSocket clients (tungstenite)
//! subscribed to public and presence channels receive its events.
//!
//! The Python lives in the venv at `target/pyenv` (or `$CARGO_TARGET_DIR/pyenv`)
//! that `scripts/test-deps.sh` sets up; when `pusher` is missing there this
//! test installs it (under the same lock file), like
//! `tests/python_client_interoperates.rs` does for `websockets`.

mod common;
#[path = "common/python.rs"]
mod python;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use std::time::Duration;

use common::{Client, Server};
use serde_json::{json, Value};

/// The version range `scripts/test-deps.sh` installs too.
const PUSHER: &str = "pusher>=3.3,<4";

/// The Python library accepts only numeric app ids (as Pusher issues
/// them); APPS gives it as a JSON number.
const APP_ID: u64 = 12345;
const KEY: &str = "key1";
const SECRET: &str = "secret1";

/// How long the script may run before it is killed.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The venv's python with `pusher` importable.
fn python() -> PathBuf {
    python::python_with("pusher", PUSHER)
}

use common::hmac_sha256_hex;

/// A Pusher-protocol client on a raw WebSocket.
struct PusherWs {
    ws: Client,
    socket_id: String,
    /// Events read so far (after the subscriptions).
    received: Vec<Value>,
}

impl PusherWs {
    fn connect(server: &Server) -> PusherWs {
        let mut ws = Client::connect(
            server,
            &format!("/app/{KEY}?protocol=7&client=herald-test&version=1.0"),
        );
        let hello = ws.recv_json();
        assert_eq!(hello["event"], "pusher:connection_established", "{hello}");
        let data: Value = serde_json::from_str(hello["data"].as_str().expect("data is a string"))
            .expect("connection_established data is JSON");
        let socket_id = data["socket_id"].as_str().expect("socket_id").to_string();
        assert!(
            socket_id.split_once('.').is_some_and(|(a, b)| !a.is_empty()
                && !b.is_empty()
                && (a.to_string() + b).bytes().all(|c| c.is_ascii_digit())),
            "socket_id {socket_id}"
        );
        assert!(
            data["activity_timeout"].as_u64().is_some_and(|t| t > 0),
            "{data}"
        );
        PusherWs {
            ws,
            socket_id,
            received: Vec::new(),
        }
    }

    /// The next event that is not a ping (pings are answered).
    fn next(&mut self) -> Value {
        loop {
            let v = self.ws.recv_json();
            if v["event"] == "pusher:ping" {
                self.ws
                    .send_json(json!({"event": "pusher:pong", "data": {}}));
                continue;
            }
            return v;
        }
    }

    /// Subscribes and returns the subscription_succeeded data.
    fn subscribe(&mut self, channel: &str, auth: Option<(String, Option<String>)>) -> Value {
        let mut data = json!({"channel": channel});
        if let Some((auth, channel_data)) = auth {
            data["auth"] = json!(auth);
            if let Some(cd) = channel_data {
                data["channel_data"] = json!(cd);
            }
        }
        self.ws
            .send_json(json!({"event": "pusher:subscribe", "data": data}));
        let v = self.next();
        assert_eq!(
            v["event"], "pusher_internal:subscription_succeeded",
            "subscribe {channel}: {v}"
        );
        assert_eq!(v["channel"], channel, "{v}");
        match &v["data"] {
            Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
            other => other.clone(),
        }
    }

    /// Reads until every name in `wanted` was seen on `channel`; returns
    /// (event, data) of everything received on that channel, in order.
    fn until_seen(&mut self, channel: &str, wanted: &[&str]) -> Vec<(String, Value)> {
        loop {
            let got: Vec<(String, Value)> = self
                .received
                .iter()
                .filter(|v| v["channel"] == channel)
                .map(|v| {
                    let data = match &v["data"] {
                        Value::String(s) => {
                            serde_json::from_str(s).unwrap_or(Value::String(s.clone()))
                        }
                        other => other.clone(),
                    };
                    (v["event"].as_str().unwrap_or("").to_string(), data)
                })
                .collect();
            if wanted.iter().all(|w| got.iter().any(|(e, _)| e == w)) {
                return got;
            }
            let v = self.next();
            self.received.push(v);
        }
    }
}

/// Runs the script; returns its result line.
fn run_script(python: &Path, server: &Server, exclude: &str) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/pusher_trigger.py");
    let (port, app_id) = (server.addr.port().to_string(), APP_ID.to_string());
    let env = [
        ("HERALD_HOST", server.addr.ip().to_string()),
        ("HERALD_PORT", port),
        ("APP_ID", app_id),
        ("APP_KEY", KEY.to_string()),
        ("APP_SECRET", SECRET.to_string()),
        ("EXCLUDE_SOCKET_ID", exclude.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stdout = python::run_script(python, &script, &[], &env, SCRIPT_TIMEOUT, || server.log());
    let line = stdout
        .lines()
        .find(|l| l.starts_with("{\"result\""))
        .unwrap_or_else(|| panic!("no result line in:\n{stdout}"));
    let v: Value = serde_json::from_str(line).expect("result JSON");
    println!("pusher_trigger.py result: {:#}", v["result"]);
    v["result"].clone()
}

#[test]
fn python_pusher_library_triggers_and_queries() {
    let python = python();
    let apps = json!([{"id": APP_ID, "key": KEY, "secret": SECRET}]).to_string();
    let server = Server::start(&[("APPS", apps.as_str())]);

    // A subscriber of py-news, py-other and presence-py (as py-user) ...
    let mut sub = PusherWs::connect(&server);
    sub.subscribe("py-news", None);
    sub.subscribe("py-other", None);
    let channel_data = json!({"user_id": "py-user", "user_info": {"lang": "rust"}}).to_string();
    let sig = hmac_sha256_hex(
        SECRET,
        format!("{}:presence-py:{channel_data}", sub.socket_id).as_bytes(),
    );
    let presence = sub.subscribe(
        "presence-py",
        Some((format!("{KEY}:{sig}"), Some(channel_data))),
    );
    assert_eq!(presence["presence"]["count"], json!(1), "{presence}");
    assert_eq!(
        presence["presence"]["ids"],
        json!(["py-user"]),
        "{presence}"
    );
    // ... and one the excluding trigger names.
    let mut excluded = PusherWs::connect(&server);
    excluded.subscribe("py-news", None);

    let r = run_script(&python, &server, &excluded.socket_id);
    let show = format!("{r:#}");

    // What the subscribers received.
    let news = sub.until_seen(
        "py-news",
        &["py-event", "py-multi", "py-excluded", "py-batch"],
    );
    let find = |evs: &[(String, Value)], name: &str| {
        evs.iter()
            .find(|(e, _)| e == name)
            .map(|(_, d)| d.clone())
            .unwrap()
    };
    assert_eq!(find(&news, "py-event"), json!({"from": "python"}));
    assert_eq!(find(&news, "py-multi"), json!("plain text"));
    assert_eq!(find(&news, "py-excluded"), json!({"x": 1}));
    assert_eq!(find(&news, "py-batch"), json!({"i": 1}));
    let other = sub.until_seen("py-other", &["py-multi", "py-batch"]);
    assert_eq!(find(&other, "py-batch"), json!({"i": 2}));
    let seen = excluded.until_seen("py-news", &["py-event", "py-multi", "py-batch"]);
    assert!(
        seen.iter().all(|(e, _)| e != "py-excluded"),
        "the excluded socket got py-excluded: {seen:?}"
    );

    // What the library got back.
    for t in [
        "trigger",
        "trigger_multi",
        "trigger_excluding",
        "trigger_batch",
    ] {
        assert!(r[t].is_object(), "{t}: {show}");
    }
    let names = |v: &Value| -> BTreeSet<String> {
        v["channels"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let want = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        names(&r["channels"]),
        want(&["py-news", "py-other", "presence-py"]),
        "{show}"
    );
    assert_eq!(
        names(&r["channels_py"]),
        want(&["py-news", "py-other"]),
        "{show}"
    );
    assert_eq!(
        r["channels_presence"],
        json!({"channels": {"presence-py": {"user_count": 1}}}),
        "{show}"
    );
    assert_eq!(r["channel_news"]["occupied"], json!(true), "{show}");
    assert_eq!(r["channel_news"]["subscription_count"], json!(2), "{show}");
    assert_eq!(r["channel_presence"]["occupied"], json!(true), "{show}");
    assert_eq!(r["channel_presence"]["user_count"], json!(1), "{show}");
    assert_eq!(r["channel_unused"]["occupied"], json!(false), "{show}");
    assert_eq!(r["users"], json!({"users": [{"id": "py-user"}]}), "{show}");

    // Refusals, as the library reports them.
    for k in ["bad_secret_trigger", "bad_secret_get"] {
        assert_eq!(r[k]["type"], "PusherBadAuth", "{k} (401): {show}");
    }
    for k in ["unknown_app_trigger", "unknown_app_get"] {
        assert!(
            r[k]["message"].as_str().is_some_and(|m| m.contains("404")),
            "{k} (404): {show}"
        );
    }
}
