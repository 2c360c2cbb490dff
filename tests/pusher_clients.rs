//! The Pusher Channels protocol with the real clients: pusher-js (its Node
//! build, WebSocket transport) and the Node `pusher` server library, run as
//! the scripts in `tests/js/` against a herald this test starts with APPS.
//!
//! Each script prints JSON lines: `{"barrier": ..}` asks this driver
//! something (here: whether its connections span both cores yet, read from
//! herald's per-worker `herald_connections`) and gets the answer on stdin;
//! `{"result": ..}` is what it saw, which the test checks. Webhooks go to a
//! receiver on loopback (`tests/common/webhook.rs`); their signatures are
//! checked here (HMAC-SHA256 through `jsonwebtoken`'s HS256, independent of
//! herald's code) and by the Node library's own webhook verifier.
//!
//! Needs `node` on PATH and `tests/js/node_modules` (`sh scripts/test-deps.sh`
//! runs `npm ci` there).

mod common;
#[path = "common/webhook.rs"]
mod webhook;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{unix_now, wait_for, Server};
use serde_json::{json, Value};
use webhook::{Reply, Request, Webhook};

const APP_ID: &str = "app1";
const KEY: &str = "key1";
const SECRET: &str = "secret1";
/// The key of a second app, configured with `"enabled": false`.
const DISABLED_KEY: &str = "key-off";

/// How long one script may run before it is killed.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(40);

/// How long webhooks may take to arrive once the activity is over.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Every webhook event kind, as the first webhook asks for them.
const ALL_EVENTS: [&str; 5] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
];

/// APPS: the app the scripts use (client events on, webhooks to `hook`
/// when given: every event to `/hook`, only `channel_occupied` to
/// `/occupied-only`) and a disabled app.
fn apps(hook: Option<&Webhook>) -> String {
    let mut app = json!({
        "id": APP_ID,
        "key": KEY,
        "secret": SECRET,
        "enable_client_messages": true,
    });
    if let Some(hook) = hook {
        app["webhooks"] = json!([
            {"url": format!("http://{}/hook", hook.addr), "events": ALL_EVENTS},
            {"url": format!("http://{}/occupied-only", hook.addr), "events": ["channel_occupied"]},
        ]);
    }
    json!([
        app,
        {"id": "app-off", "key": DISABLED_KEY, "secret": "secret-off", "enabled": false},
    ])
    .to_string()
}

fn start(hook: Option<&Webhook>) -> Server {
    let apps = apps(hook);
    Server::start(&[("APPS", apps.as_str())])
}

// ------------------------------------------------------------ node scripts

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// `node` from PATH.
fn node() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("node"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`node` is not on PATH: install the test dependencies with `sh scripts/test-deps.sh`")
        })
}

/// Fails clearly when the npm packages are not installed.
fn check_node_modules() {
    for pkg in ["pusher-js", "pusher"] {
        let manifest = js_dir().join("node_modules").join(pkg).join("package.json");
        assert!(
            manifest.is_file(),
            "{} is missing: install the test dependencies with `sh scripts/test-deps.sh` \
             (it runs `npm ci` in tests/js)",
            manifest.display()
        );
    }
}

/// Kills the script if the test ends early (a failed assertion).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `tests/js/{script}` against `server` and returns its result. Each
/// barrier line is answered with `on_barrier(line)`; `input`, when given,
/// is written to the script's stdin, which is then closed.
fn run_node(
    server: &Server,
    script: &str,
    env: &[(&str, &str)],
    input: Option<&str>,
    mut on_barrier: impl FnMut(&Value) -> Value,
) -> Value {
    check_node_modules();
    let mut cmd = Command::new(node());
    cmd.arg(script)
        .current_dir(js_dir())
        .env("HERALD_ADDR", server.addr.to_string())
        .env("APP_ID", APP_ID)
        .env("APP_KEY", KEY)
        .env("APP_SECRET", SECRET)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run node {script}: {e}"));
    let mut running = Running(child);
    let mut stdin = running.0.stdin.take();
    if let Some(input) = input {
        let mut s = stdin.take().unwrap();
        s.write_all(input.as_bytes())
            .expect("write the script's stdin");
    }
    let stdout = running.0.stdout.take().unwrap();
    let mut stderr = running.0.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(Some(line)).is_err() {
                return;
            }
        }
        let _ = tx.send(None);
    });
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let mut transcript = String::new();
    let mut result = None;
    let timed_out = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Some(line)) => {
                transcript.push_str(&line);
                transcript.push('\n');
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v.get("barrier").is_some() {
                    let answer = on_barrier(&v);
                    transcript.push_str(&format!("  <- {answer}\n"));
                    let s = stdin
                        .as_mut()
                        .expect("a barrier, but the script's stdin is closed");
                    writeln!(s, "{answer}").expect("answer the script");
                    s.flush().unwrap();
                } else if let Some(r) = v.get("result") {
                    result = Some(r.clone());
                }
            }
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    drop(stdin);
    let status = if timed_out {
        None
    } else {
        // stdout closed: the script is exiting.
        let exit_by = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = running.0.try_wait().expect("try_wait") {
                break Some(status);
            }
            if Instant::now() > exit_by {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let _ = running.0.kill();
    let _ = running.0.wait();
    let report = format!(
        "--- {script} stdout\n{transcript}--- {script} stderr\n{}--- herald log\n{}",
        errors.join().unwrap_or_default(),
        server.log()
    );
    match status {
        None => panic!("{script} did not finish within {SCRIPT_TIMEOUT:?}\n{report}"),
        Some(s) if !s.success() => panic!("{script} failed ({s})\n{report}"),
        Some(_) => {}
    }
    let result = result.unwrap_or_else(|| panic!("{script} printed no result line\n{report}"));
    println!("{script} result: {result:#}");
    result
}

/// Answers the `connections` barrier: `go` once the script's connections
/// are on every core (herald's per-worker `herald_connections`), else `more`.
fn spread_barrier(server: &Server) -> impl FnMut(&Value) -> Value + '_ {
    move |b| {
        assert_eq!(b["barrier"], "connections", "unexpected barrier {b}");
        let count = b["count"].as_f64().expect("count");
        wait_for(
            &format!("herald_connections to sum to the script's {count} connections"),
            || server.metric_sum("herald_connections") == count,
        );
        let per = server.per_worker("herald_connections");
        if per.iter().all(|&c| c >= 1.0) {
            json!({"go": true, "per_worker": per})
        } else {
            json!({"more": true, "per_worker": per})
        }
    }
}

fn no_barrier(b: &Value) -> Value {
    panic!("unexpected barrier {b}")
}

/// A script's result, with assertions that show the whole of it.
struct Outcome {
    script: &'static str,
    v: Value,
}

impl Outcome {
    fn at(&self, ptr: &str) -> &Value {
        self.v
            .pointer(ptr)
            .unwrap_or_else(|| panic!("{}: no {ptr} in the result:\n{:#}", self.script, self.v))
    }

    fn expect(&self, ptr: &str, want: Value) {
        assert_eq!(
            self.at(ptr),
            &want,
            "{}: {ptr}\nthe whole result:\n{:#}",
            self.script,
            self.v
        );
    }

    fn check(&self, ptr: &str, what: &str, ok: impl FnOnce(&Value) -> bool) {
        let got = self.at(ptr);
        assert!(
            ok(got),
            "{}: {ptr} should be {what}, is {got}\nthe whole result:\n{:#}",
            self.script,
            self.v
        );
    }

    fn status(&self, ptr: &str, want: u64) {
        self.expect(&format!("{ptr}/status"), json!(want));
    }

    fn array(&self, ptr: &str) -> &Vec<Value> {
        self.at(ptr)
            .as_array()
            .unwrap_or_else(|| panic!("{}: {ptr} is not an array:\n{:#}", self.script, self.v))
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn is_socket_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        })
    })
}

// ------------------------------------------------------------------- tests

#[test]
fn pusher_js_public_channels_with_node_library_triggers_and_queries() {
    let server = start(None);
    let r = Outcome {
        script: "public.js",
        v: run_node(&server, "public.js", &[], None, no_barrier),
    };

    // pusher:connection_established: socket ids and an activity timeout.
    let ids = r.array("/socket_ids");
    assert!(ids.iter().all(is_socket_id), "socket ids {ids:?}");
    assert_ne!(ids[0], ids[1], "socket ids must be unique");
    r.check("/activity_timeout_ms", "a positive number of ms", |v| {
        v.as_f64().is_some_and(|t| t > 0.0)
    });

    r.status("/trigger", 200);
    r.expect("/greeting", json!([{"hello": "world"}, {"hello": "world"}]));
    r.status("/trigger_multi", 200);
    r.expect(
        "/multi",
        json!({"a_news": "plain text", "a_other": "plain text", "b_news": "plain text"}),
    );

    // socket_id excludes that connection only.
    r.status("/trigger_excluding", 200);
    r.expect("/excluded_event_at_b", json!({"n": 1}));
    r.expect("/excluded_event_count_at_a", json!(0));

    r.status("/batch", 200);
    r.expect(
        "/batch_events",
        json!({"a_news": {"i": 1}, "a_other": {"i": 2}, "b_news": {"i": 1}}),
    );

    // Queries.
    r.status("/channels", 200);
    assert_eq!(
        keys(r.at("/channels/body/channels")),
        set(&["news", "other-news"]),
        "GET /channels: {}",
        r.at("/channels")
    );
    r.status("/channels_other", 200);
    assert_eq!(
        keys(r.at("/channels_other/body/channels")),
        set(&["other-news"]),
        "GET /channels?filter_by_prefix=other-: {}",
        r.at("/channels_other")
    );
    r.status("/channel_news", 200);
    r.expect("/channel_news/body/occupied", json!(true));
    r.expect("/channel_news/body/subscription_count", json!(2));
    r.status("/channel_nobody", 200);
    r.expect("/channel_nobody/body/occupied", json!(false));
    r.check(
        "/channel_nobody/body",
        "unoccupied with no subscriptions",
        |b| b.get("subscription_count").is_none_or(|c| c == &json!(0)),
    );

    // After b unsubscribed.
    r.expect(
        "/channel_news_after_unsubscribe/body/subscription_count",
        json!(1),
    );
    r.expect("/after_unsubscribe_count_at_b", json!(0));
    r.expect("/channels_when_empty/body/channels", json!({}));
}

#[test]
fn pusher_js_private_channels_auth_client_events_and_rate_limit() {
    let server = start(None);
    let r = Outcome {
        script: "private.js",
        v: run_node(&server, "private.js", &[], None, no_barrier),
    };

    // The auth endpoint was asked by both clients, for their socket ids.
    let asked: BTreeSet<(String, String)> = r
        .array("/auth_requests")
        .iter()
        .map(|q| {
            (
                q["channel"].as_str().unwrap_or("").to_string(),
                q["socket_id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for who in ["a", "b"] {
        let sid = r
            .at(&format!("/socket_ids/{who}"))
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            asked.contains(&("private-chat".to_string(), sid.clone())),
            "no auth request for private-chat from {who} ({sid}): {asked:?}"
        );
    }

    r.status("/trigger", 200);
    r.expect("/server_event", json!([{"n": 1}, {"n": 1}]));

    // Client events: delivered to the other subscriber, never echoed.
    r.expect("/client_event_sent", json!(true));
    r.expect("/client_event_at_b", json!({"who": "alice"}));
    r.expect("/client_event_echoed_to_a", json!(0));

    // A forged signature: pusher:subscription_error (401), connection stays.
    r.expect("/forged_error/status", json!(401));
    r.expect("/state_after_forged", json!("connected"));
    let raw = r.array("/raw_errors");
    assert_eq!(raw.len(), 4, "one subscription_error per bad auth: {raw:?}");
    for e in raw {
        assert_eq!(
            e["status"],
            json!(401),
            "subscription_error for a bad auth: {e}"
        );
    }
    r.expect("/errors_after_raw", json!([]));
    r.expect("/state_after_raw", json!("connected"));
    r.expect("/states_a", json!(["connecting", "connected"]));

    // A burst over max_client_events_per_second (10): pusher:error 4301,
    // and no more than the limit reached the other subscriber.
    r.check("/rate_error_codes", "a list holding 4301", |v| {
        v.as_array().is_some_and(|a| a.contains(&json!(4301)))
    });
    r.check(
        "/rate_pusher_errors",
        "pusher:error frames with code 4301",
        |v| {
            v.as_array()
                .is_some_and(|a| a.iter().any(|e| e["code"] == json!(4301)))
        },
    );
    r.check("/burst_received_by_b", "between 1 and 10", |v| {
        v.as_u64().is_some_and(|n| (1..=10).contains(&n))
    });
}

#[test]
fn pusher_js_presence_members_across_cores_client_events_and_terminate() {
    let server = start(None);
    let r = Outcome {
        script: "presence.js",
        v: run_node(&server, "presence.js", &[], None, spread_barrier(&server)),
    };
    r.check("/per_worker", "at least one connection on each core", |v| {
        v.as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|c| c.as_f64() >= Some(1.0)))
    });
    let users: Vec<String> = r
        .array("/users")
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    let n = users.len();
    assert!(n >= 4, "at least 4 users: {users:?}");
    let member = |u: &str| json!({"id": u, "info": {"name": format!("name of {u}")}});

    // Each join lists everyone so far and is member_added at every earlier member.
    // (The script lists members sorted by id.)
    let sorted = |us: &[String]| {
        let mut v = us.to_vec();
        v.sort();
        v
    };
    for (i, join) in r.array("/joins").iter().enumerate() {
        let so_far = sorted(&users[..=i]);
        assert_eq!(join["user"], json!(users[i]));
        assert_eq!(
            join["members"]["ids"],
            json!(so_far),
            "members at join {i}: {join}"
        );
        assert_eq!(join["members"]["count"], json!(i + 1), "join {i}: {join}");
        assert_eq!(join["members"]["me"], json!(users[i]), "join {i}: {join}");
        let with_info: Vec<Value> = so_far.iter().map(|u| member(u.as_str())).collect();
        assert_eq!(
            join["members"]["members"],
            json!(with_info),
            "user_info in the members list: {join}"
        );
        let heard = join["member_added_at_others"].as_array().unwrap();
        assert_eq!(heard.len(), i, "join {i}: {join}");
        for h in heard {
            assert_eq!(h, &member(users[i].as_str()), "member_added at join {i}");
        }
    }

    // A second connection of u0 is not a new member.
    r.expect("/second_connection_members/count", json!(n));
    r.expect("/second_connection_members/ids", json!(sorted(&users)));
    r.expect("/member_added_for_second_connection", json!(vec![0; n]));

    // Queries count users once.
    r.status("/users_query", 200);
    let listed: BTreeSet<String> = r
        .array("/users_query/body/users")
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, users.iter().cloned().collect(), "users query");
    r.status("/channels_query", 200);
    r.expect(
        "/channels_query/body/channels",
        json!({"presence-room": {"user_count": n}}),
    );
    r.status("/channel_query", 200);
    r.expect("/channel_query/body/occupied", json!(true));
    r.expect("/channel_query/body/user_count", json!(n));
    r.expect("/channel_query/body/subscription_count", json!(n + 1));

    // Client events carry the sender's user_id, and are not echoed.
    r.expect("/client_event_sent", json!(true));
    let got = r.array("/client_event_at_others");
    assert_eq!(got.len(), n, "every other connection (u0 has two): {got:?}");
    for g in got {
        assert_eq!(g["data"], json!({"from": "u1"}), "{g}");
        assert_eq!(
            g["metadata"]["user_id"],
            json!("u1"),
            "metadata.user_id: {g}"
        );
    }
    r.expect("/client_event_echoed_to_sender", json!(0));

    // Leaving.
    r.expect(
        "/member_removed_u0_after_first_close",
        json!(vec![0; n - 1]),
    );
    r.expect("/member_removed_u0", json!(vec![member("u0"); n - 1]));
    r.expect("/member_removed_u1", json!(vec![member("u1"); n - 2]));
    r.status("/terminate", 200);
    r.check("/terminate_error_codes", "a list holding 4009", |v| {
        v.as_array().is_some_and(|a| a.contains(&json!(4009)))
    });
    // Terminated, and pusher-js does not reconnect.
    r.expect(
        "/terminated_states",
        json!(["connecting", "connected", "disconnected"]),
    );
    r.expect("/member_removed_u2", json!(vec![member("u2"); n - 3]));
    r.status("/users_query_after", 200);
}

#[test]
fn pusher_js_and_node_library_error_paths() {
    let server = start(None);
    let r = Outcome {
        script: "errors.js",
        v: run_node(
            &server,
            "errors.js",
            &[("DISABLED_APP_KEY", DISABLED_KEY)],
            None,
            no_barrier,
        ),
    };
    // Unknown key: 4001, and pusher-js gives up instead of retrying.
    for (who, code) in [("bad_key", 4001), ("disabled_app", 4003)] {
        r.check(
            &format!("/{who}/error_codes"),
            &format!("a list holding {code}"),
            |v| v.as_array().is_some_and(|a| a.contains(&json!(code))),
        );
        r.expect(&format!("/{who}/state"), json!("disconnected"));
        r.expect(&format!("/{who}/states_after_stop"), json!([]));
        r.expect(&format!("/{who}/socket_id"), json!(null));
    }

    r.status("/good_trigger", 200);
    r.status("/good_get", 200);
    r.status("/bad_secret_trigger", 401);
    r.status("/bad_secret_get", 401);
    r.status("/old_timestamp", 401);
    r.status("/old_timestamp_get", 401);
    r.status("/future_timestamp", 401);
    r.status("/slightly_old_timestamp", 200);
    r.status("/unknown_app", 404);
    r.status("/unknown_app_get", 404);
}

/// Server-to-user events through pusher-js `signin()` and `user.bind()`
/// and the Node library's `sendToUser`: every connection signed in as the
/// user gets each event once, on every core; no one else does.
#[test]
fn pusher_js_signin_and_node_library_send_to_user() {
    let server = start(None);
    let r = Outcome {
        script: "users.js",
        v: run_node(&server, "users.js", &[], None, spread_barrier(&server)),
    };
    r.check("/per_worker", "alice's connections on every core", |v| {
        v.as_array()
            .is_some_and(|a| a.len() == 2 && a.iter().all(|c| c.as_f64() >= Some(1.0)))
    });
    let n = r.array("/alice_got").len();
    assert!(n >= 2, "at least two connections of alice: {}", r.v);
    for i in 0..n {
        r.expect(&format!("/alice_got/{i}"), json!({"text": "hi alice"}));
        r.expect(&format!("/alice_greetings/{i}"), json!(1));
        r.expect(&format!("/user_data/{i}/id"), json!("alice"));
    }
    r.status("/send_alice", 200);
    r.status("/send_bob", 200);
    r.expect("/bob_got", json!({"text": "hi bob"}));
    r.expect("/bob_greetings", json!(1));
    r.expect(&format!("/user_data/{n}/id"), json!("bob"));
    r.check("/mallory_refused", "an AuthError", |v| {
        v["type"] == "AuthError" || v.to_string().contains("sign in")
    });
    r.expect("/mallory_user_events", json!(0));
    // The users' own channels are not listed as the app's channels.
    r.status("/channels", 200);
    r.check(
        "/channels/body/channels",
        "no #server-to-user- channel",
        |v| {
            v.as_object()
                .is_some_and(|m| m.keys().all(|k| !k.starts_with("#server-to-user-")))
        },
    );
}

use common::hmac_sha256_hex;

#[test]
fn hmac_helper_matches_a_known_vector() {
    assert_eq!(
        hmac_sha256_hex("key", b"The quick brown fox jumps over the lazy dog"),
        "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    );
}

/// The events of every request to `path`, in arrival order.
fn events_to(requests: &[Request], path: &str) -> Vec<Value> {
    requests
        .iter()
        .filter(|r| r.path == path)
        .flat_map(|r| r.body["events"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["name"] == name).collect()
}

#[test]
fn webhooks_report_channels_members_and_client_events_signed() {
    let hook = Webhook::start(|_| Reply::allow());
    let server = start(Some(&hook));
    let r = Outcome {
        script: "webhooks.js",
        v: run_node(&server, "webhooks.js", &[], None, spread_barrier(&server)),
    };
    let channels = ["wh-public", "private-wh", "presence-wh"];

    // Everything happened; wait for the last events (vacated, removed).
    let done = |reqs: &[Request]| {
        let ev = events_to(reqs, "/hook");
        channels.iter().all(|c| {
            named(&ev, "channel_vacated")
                .iter()
                .any(|e| e["channel"] == *c)
        }) && ["alice", "bob"].iter().all(|u| {
            named(&ev, "member_removed")
                .iter()
                .any(|e| e["user_id"] == *u)
        }) && {
            let only = events_to(reqs, "/occupied-only");
            channels
                .iter()
                .all(|c| only.iter().any(|e| e["channel"] == *c))
        }
    };
    let dump_of = |requests: &[Request]| {
        requests
            .iter()
            .map(|q| format!("{} {} {}", q.method, q.path, q.raw))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let deadline = Instant::now() + WEBHOOK_TIMEOUT;
    while !done(&hook.requests()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the last webhooks (vacated, member_removed, /occupied-only); \
             received:\n{}\n--- herald log\n{}",
            dump_of(&hook.requests()),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let requests = hook.requests();
    let dump = || dump_of(&requests);

    // Every request: POST, JSON, signed with the app's secret.
    let now_ms = unix_now() as i64 * 1000;
    for q in &requests {
        assert_eq!(q.method, "POST", "{q:?}");
        assert_eq!(q.header("x-pusher-key"), Some(KEY), "X-Pusher-Key: {q:?}");
        let want = hmac_sha256_hex(SECRET, q.raw.as_bytes());
        assert_eq!(
            q.header("x-pusher-signature"),
            Some(want.as_str()),
            "X-Pusher-Signature must be the hex HMAC-SHA256 of the body: {q:?}"
        );
        assert!(
            q.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "Content-Type: {q:?}"
        );
        let time_ms = q.body["time_ms"]
            .as_i64()
            .unwrap_or_else(|| panic!("time_ms: {q:?}"));
        assert!(
            (time_ms - now_ms).abs() < 60_000,
            "time_ms {time_ms} vs now {now_ms}"
        );
        assert!(
            q.body["events"].as_array().is_some_and(|e| !e.is_empty()),
            "events: {q:?}"
        );
    }

    let ev = events_to(&requests, "/hook");
    let position = |pred: &dyn Fn(&Value) -> bool| ev.iter().position(pred);
    // Channels: occupied once and vacated once each, in that order, though
    // their subscribers were on both cores.
    for c in channels {
        let occupied = named(&ev, "channel_occupied");
        let occupied: Vec<_> = occupied.iter().filter(|e| e["channel"] == c).collect();
        let vacated = named(&ev, "channel_vacated");
        let vacated: Vec<_> = vacated.iter().filter(|e| e["channel"] == c).collect();
        assert_eq!(occupied.len(), 1, "channel_occupied for {c}:\n{}", dump());
        assert_eq!(vacated.len(), 1, "channel_vacated for {c}:\n{}", dump());
        assert_eq!(
            **occupied[0],
            json!({"name": "channel_occupied", "channel": c})
        );
        assert_eq!(
            **vacated[0],
            json!({"name": "channel_vacated", "channel": c})
        );
        let o = position(&|e| e["name"] == "channel_occupied" && e["channel"] == c);
        let v = position(&|e| e["name"] == "channel_vacated" && e["channel"] == c);
        assert!(o < v, "{c}: occupied must come before vacated:\n{}", dump());
    }
    // Members: added once and removed once per user (each had connections
    // on several sockets).
    for u in ["alice", "bob"] {
        for kind in ["member_added", "member_removed"] {
            let got: Vec<_> = named(&ev, kind)
                .into_iter()
                .filter(|e| e["user_id"] == u)
                .collect();
            assert_eq!(got.len(), 1, "{kind} for {u}:\n{}", dump());
            assert_eq!(
                *got[0],
                json!({"name": kind, "channel": "presence-wh", "user_id": u})
            );
        }
        let a = position(&|e| e["name"] == "member_added" && e["user_id"] == u);
        let b = position(&|e| e["name"] == "member_removed" && e["user_id"] == u);
        assert!(a < b, "{u}: added must come before removed:\n{}", dump());
    }
    // Client events: the event, its data as a string, the sender's socket
    // id, and on the presence channel its user_id.
    let sender = r.at("/client_event_sender/socket_id").clone();
    let client_events = named(&ev, "client_event");
    assert_eq!(client_events.len(), 2, "client_event:\n{}", dump());
    for (channel, text, user) in [
        ("private-wh", "on private", None),
        ("presence-wh", "on presence", Some("alice")),
    ] {
        let e = client_events
            .iter()
            .find(|e| e["channel"] == channel)
            .unwrap_or_else(|| panic!("no client_event for {channel}:\n{}", dump()));
        assert_eq!(e["event"], "client-note", "{e}");
        assert_eq!(e["socket_id"], sender, "{e}");
        let data: Value = serde_json::from_str(
            e["data"]
                .as_str()
                .unwrap_or_else(|| panic!("client_event data must be a string: {e}")),
        )
        .unwrap_or_else(|err| panic!("client_event data is not JSON ({err}): {e}"));
        assert_eq!(data, json!({"text": text}), "{e}");
        match user {
            Some(u) => assert_eq!(e["user_id"], u, "{e}"),
            None => assert!(e.get("user_id").is_none(), "no user_id off presence: {e}"),
        }
    }
    // The second webhook asked for channel_occupied only.
    let only = events_to(&requests, "/occupied-only");
    assert!(
        only.iter().all(|e| e["name"] == "channel_occupied"),
        "the /occupied-only webhook got other events:\n{}",
        dump()
    );
    for c in channels {
        assert!(
            only.iter().any(|e| e["channel"] == c),
            "/occupied-only: no channel_occupied for {c}:\n{}",
            dump()
        );
    }

    // The Node library's own webhook check accepts every request.
    let input: Vec<Value> = requests
        .iter()
        .map(|q| {
            let headers: serde_json::Map<String, Value> = q
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            json!({"headers": headers, "body": q.raw})
        })
        .collect();
    let checked = run_node(
        &server,
        "verify_webhooks.js",
        &[],
        Some(&Value::Array(input).to_string()),
        no_barrier,
    );
    let checked = checked.as_array().expect("an array");
    assert_eq!(checked.len(), requests.len());
    for (c, q) in checked.iter().zip(&requests) {
        assert_eq!(
            c["valid"],
            json!(true),
            "pusher.webhook(..).isValid(): {q:?}"
        );
        assert_eq!(c["valid_with_wrong_secret"], json!(false), "{q:?}");
        assert_eq!(c["events"], q.body["events"], "getEvents(): {q:?}");
        assert_eq!(c["time_ms"], q.body["time_ms"], "getTime(): {q:?}");
    }
}

#[test]
fn pusher_js_cache_channels_replay_the_last_event_or_miss() {
    let server = start(None);
    let r = Outcome {
        script: "cache.js",
        v: run_node(&server, "cache.js", &[], None, no_barrier),
    };
    r.expect("/miss_at_a", json!(1));
    r.status("/trigger", 200);
    r.expect("/live_1", json!({"home": 1}));
    r.expect("/live_2", json!({"home": 2}));
    // The last event, first; then the live one; and no miss.
    r.expect("/cached_at_b", json!({"home": 2}));
    r.expect("/live_at_b", json!({"home": 3}));
    r.expect("/scores_at_b", json!(2));
    r.expect("/miss_at_b", json!(0));
}

/// Personal channels through pusher-js and the Node library's signed
/// `post()`: what was missed offline, then live, at the global bindings;
/// nothing twice after a reconnection (pusher-js's WebSocket answers the
/// acknowledging pings by itself).
#[test]
fn pusher_js_follows_a_personal_channel_with_what_was_missed_offline() {
    let server = start(None);
    let r = Outcome {
        script: "personal.js",
        v: run_node(&server, "personal.js", &[], None, no_barrier),
    };
    r.status("/sub_news", 200);
    r.status("/sub_alerts", 200);
    r.expect("/sub_news/body", json!({"subscribed": true}));
    // What she missed, each channel in order, then live; sports never.
    let first: Vec<&str> = r.array("/first").iter().filter_map(Value::as_str).collect();
    let news: Vec<&str> = first
        .iter()
        .copied()
        .filter(|n| n.starts_with("news"))
        .collect();
    assert_eq!(news, ["news-1", "news-2", "news-3", "news-4"], "{}", r.v);
    assert!(first.contains(&"alert-1"), "{}", r.v);
    assert_eq!(first.len(), 5, "nothing else, nothing twice: {}", r.v);
    // Back again: only what came meanwhile.
    r.expect("/second", json!(["news-5"]));
    r.check("/bob_refused", "a 403", |v| v["status"] == 403);
    r.expect("/unsub/body", json!({"unsubscribed": true}));
    r.expect("/after_unsubscribe", json!(["news-5", "alert-2"]));
}
