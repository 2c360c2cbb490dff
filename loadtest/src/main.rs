//! `herald-loadtest`: a load generator for herald (its own protocol or the
//! Pusher protocol) and, for comparison, nats-server over WebSocket.
//! Loopback targets only; every run is bounded.

mod adapter;
mod churn;
mod conn;
mod conns;
mod fanout;
mod floor;
mod procstat;
mod recover;
mod report;
mod run;
mod tls;
mod webhook;
mod ws;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::adapter::{Adapter, Herald, Nats, Pusher};
use crate::run::Ctx;

#[derive(Parser)]
#[command(name = "herald-loadtest", version, about, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Common {
    /// Protocol spoken to the server.
    #[arg(long, global = true, value_enum, default_value_t = Proto::Herald)]
    protocol: Proto,
    /// Server URL: loopback only (herald default ws://127.0.0.1:6380/ws,
    /// nats default ws://127.0.0.1:8080, pusher default
    /// ws://127.0.0.1:6380/app/APP_KEY; a pusher URL without a query gets
    /// ?protocol=7&client=loadtest&version=1.0).
    #[arg(long, global = true)]
    url: Option<String>,
    /// A PEM file of the CA that signed the server's certificate, for
    /// wss:// URLs (the name checked is the URL's host, e.g. localhost).
    #[arg(long, global = true)]
    tls_ca: Option<String>,
    /// Print one JSON object instead of the table (and no progress bar).
    #[arg(long, global = true)]
    json: bool,
    /// Server process to read CPU and memory from (/proc/PID).
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// fanout: more server processes (the other nodes of a cluster),
    /// counted with --server-pid; repeatable.
    #[arg(long, global = true)]
    also_pid: Vec<u32>,
    /// fanout: a cluster's broker process, reported apart.
    #[arg(long, global = true)]
    broker_pid: Option<u32>,
    /// fanout: URLs subscribers connect to instead of --url, subscriber j
    /// to the (j mod N)-th (the nodes of a cluster; publishers stay on
    /// --url); repeatable.
    #[arg(long, global = true)]
    sub_url: Vec<String>,
    /// Runtime threads of the harness.
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    /// Loopback source addresses to spread connections over
    /// (127.0.0.2, 127.0.0.3, ...); 0 lets the kernel pick.
    #[arg(long, global = true, default_value_t = 16)]
    source_addrs: usize,
    /// Connections being set up at once during ramp-up.
    #[arg(long, global = true, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds a connection may take to connect, upgrade and subscribe.
    #[arg(long, global = true, default_value_t = 10.0)]
    handshake_timeout: f64,
    /// NATS and Pusher: a PING (`pusher:ping`) after this many publishes
    /// (its PONG acknowledges them).
    #[arg(long, global = true, default_value_t = 32)]
    ping_every: u64,
    /// Pusher only: the app key (URL path and subscription `auth`).
    #[arg(long, global = true, default_value = "bench-key")]
    app_key: String,
    /// Pusher only: the app secret private-channel subscriptions are signed
    /// with.
    #[arg(long, global = true, default_value = "bench-secret")]
    app_secret: String,
    /// Name of the server configuration under test, copied into the JSON as
    /// `variant`; `summarize` compares variants instead of protocols
    /// when given (e.g. herald with and without an authorizer).
    #[arg(long, global = true)]
    variant: Option<String>,
    /// Free-form label copied into the JSON output (used by `summarize`).
    #[arg(long, global = true)]
    label: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proto {
    Herald,
    Nats,
    /// Pusher channels protocol 7: private channels, client events.
    Pusher,
}

#[derive(Subcommand)]
enum Cmd {
    /// S subscribers over C channels, publishers at a total rate R.
    Fanout(fanout::Args),
    /// N idle subscribed connections: handshakes/s, server RSS per connection.
    Conns(conns::Args),
    /// Connect, subscribe, receive one message, disconnect, at a rate.
    Churn(churn::Args),
    /// Herald with HISTORY: N clients come back at once, each recovering
    /// the M messages it missed (`subscribe` with `since`).
    Recover(recover::Args),
    /// No server: the kernel's own cost and latency of a fan-out over
    /// loopback TCP (one send per subscriber), a floor for any server.
    Floor(floor::Args),
    /// A fast always-200 authorizer webhook (for AUTHORIZER_URL benchmarks).
    Webhook(webhook::Args),
    /// Print herald vs nats medians and ratios of the JSON results in DIR
    /// (grouped by --label).
    Summarize {
        /// Directory of `*.json` results.
        dir: PathBuf,
    },
}

/// What `--json` prints when a run could not be made.
#[derive(Serialize)]
struct Failure<'a> {
    scenario: &'a str,
    protocol: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    label: Option<String>,
    command: String,
    error: String,
    ok: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let c = cli.common;
    let (scenario, command) = match &cli.cmd {
        Cmd::Fanout(a) => ("fanout", a.command()),
        Cmd::Conns(a) => ("conns", a.command()),
        Cmd::Churn(a) => ("churn", a.command()),
        Cmd::Recover(a) => ("recover", a.command()),
        Cmd::Floor(a) => {
            return match floor::run(a, c.label.clone()) {
                Ok(r) => {
                    if c.json {
                        println!("{}", serde_json::to_string(&r).unwrap());
                    } else {
                        r.table().print();
                    }
                    if r.ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(3)
                    }
                }
                Err(e) => {
                    eprintln!("herald-loadtest: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Webhook(a) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(c.threads)
                .enable_all()
                .build()
                .expect("tokio runtime");
            return match rt.block_on(webhook::run(a.clone())) {
                Ok(r) => {
                    println!("{}", serde_json::to_string(&r).unwrap());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("herald-loadtest: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Summarize { dir } => {
            return match report::summarize(dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald-loadtest: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let proto_name = match c.protocol {
        Proto::Herald => "herald",
        Proto::Nats => "nats",
        Proto::Pusher => "pusher",
    };
    let json = c.json;
    let label = c.label.clone();
    let variant = c.variant.clone();
    let fail = |e: anyhow::Error| {
        if json {
            let f = Failure {
                scenario,
                protocol: proto_name,
                variant: variant.clone(),
                label: label.clone(),
                command: command.clone(),
                error: format!("{e:#}"),
                ok: false,
            };
            println!("{}", serde_json::to_string(&f).unwrap());
        }
        eprintln!("herald-loadtest: {e:#}");
        ExitCode::FAILURE
    };
    match setup_and_run(c, cli.cmd) {
        Ok((out, ok)) => {
            println!("{out}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        Err(e) => fail(e),
    }
}

/// Validates, runs the scenario on a tokio runtime under a watchdog, and
/// returns the printed output and whether the run was clean.
fn setup_and_run(c: Common, cmd: Cmd) -> anyhow::Result<(String, bool)> {
    if c.protocol != Proto::Herald && (c.ping_every == 0 || c.ping_every > 100_000) {
        anyhow::bail!("--ping-every must be 1..=100000");
    }
    let adapter: Arc<dyn Adapter> = match c.protocol {
        Proto::Herald => Arc::new(Herald),
        Proto::Nats => Arc::new(Nats {
            ping_every: c.ping_every,
        }),
        Proto::Pusher => {
            // The key goes into the URL path and JSON strings unescaped.
            let key_ok = !c.app_key.is_empty()
                && c.app_key.len() <= 200
                && c.app_key.bytes().all(|b| {
                    b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'/' | b'?' | b'#' | b':')
                });
            if !key_ok {
                anyhow::bail!(
                    "--app-key must be 1..=200 printable ASCII characters, none of \" \\ / ? # :"
                );
            }
            if c.app_secret.is_empty() {
                anyhow::bail!("--app-secret must not be empty");
            }
            Arc::new(Pusher {
                key: c.app_key.clone(),
                secret: c.app_secret.clone(),
                ping_every: c.ping_every,
            })
        }
    };
    let url = c.url.clone().unwrap_or_else(|| match c.protocol {
        Proto::Herald => "ws://127.0.0.1:6380/ws".into(),
        Proto::Nats => "ws://127.0.0.1:8080".into(),
        Proto::Pusher => format!("ws://127.0.0.1:6380/app/{}", c.app_key),
    });
    if let Some(ca) = &c.tls_ca {
        tls::trust(ca)?;
    }
    let mut target = conn::parse_url(&url)?;
    if c.protocol == Proto::Pusher && !target.path.contains('?') {
        target.path.push_str(PUSHER_QUERY);
    }
    let mut sub_targets = Vec::with_capacity(c.sub_url.len());
    for u in &c.sub_url {
        let mut t = conn::parse_url(u)?;
        if c.protocol == Proto::Pusher && !t.path.contains('?') {
            t.path.push_str(PUSHER_QUERY);
        }
        sub_targets.push(t);
    }
    if c.threads == 0 || c.threads > 64 {
        anyhow::bail!("--threads must be 1..=64");
    }
    if c.source_addrs > 250 {
        anyhow::bail!("--source-addrs must be 0..=250");
    }
    if !(c.handshake_timeout > 0.0 && c.handshake_timeout <= 60.0) {
        anyhow::bail!("--handshake-timeout must be in (0, 60]");
    }
    if c.connect_concurrency == 0 || c.connect_concurrency > 10_000 {
        anyhow::bail!("--connect-concurrency must be 1..=10000");
    }
    if let Some(pid) = c.server_pid {
        procstat::sample(pid)
            .map_err(|e| anyhow::anyhow!("--server-pid {pid}: cannot read /proc/{pid}: {e}"))?;
    }
    let limit = match &cmd {
        Cmd::Fanout(a) => {
            a.check(&*adapter)?;
            a.time_limit()
        }
        Cmd::Conns(a) => {
            a.check()?;
            a.time_limit()
        }
        Cmd::Churn(a) => {
            a.check()?;
            a.time_limit()
        }
        Cmd::Recover(a) => {
            a.check()?;
            a.time_limit()
        }
        Cmd::Floor(_) | Cmd::Webhook(_) | Cmd::Summarize { .. } => unreachable!(),
    };
    procstat::raise_nofile();
    adapter::now_ns();
    watchdog(limit);
    let ctx = Arc::new(Ctx {
        adapter,
        target,
        sources: conn::Sources::new(c.source_addrs),
        server_pid: c.server_pid,
        also_pids: c.also_pid.clone(),
        broker_pid: c.broker_pid,
        sub_targets,
        threads: c.threads,
        progress: !c.json && std::io::stderr().is_terminal(),
        connect_concurrency: c.connect_concurrency,
        handshake_timeout: run::secs(c.handshake_timeout, 60.0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(c.threads)
        .enable_all()
        .build()?;
    let label = c.label;
    let json = c.json;
    let variant = c.variant;
    let res = rt.block_on(async move {
        let out = |json: bool, r: &dyn erased::Json, table: report::Table| -> String {
            if json {
                let mut v = r.value();
                if let (Some(name), Some(obj)) = (&variant, v.as_object_mut()) {
                    obj.insert("variant".into(), name.clone().into());
                }
                v.to_string()
            } else {
                table.print();
                String::new()
            }
        };
        match cmd {
            Cmd::Fanout(a) => {
                let r = fanout::run(ctx, a, label).await?;
                anyhow::Ok((out(json, &r, r.table()), r.outcome.ok))
            }
            Cmd::Conns(a) => {
                let r = conns::run(ctx, a, label).await?;
                Ok((out(json, &r, r.table()), r.outcome.ok))
            }
            Cmd::Churn(a) => {
                let r = churn::run(ctx, a, label).await?;
                Ok((out(json, &r, r.table()), r.outcome.ok))
            }
            Cmd::Recover(a) => {
                let r = recover::run(ctx, a, label).await?;
                Ok((out(json, &r, r.table()), r.outcome.ok))
            }
            Cmd::Floor(_) | Cmd::Webhook(_) | Cmd::Summarize { .. } => unreachable!(),
        }
    });
    // Thousands of sockets close with the runtime; do not wait on stragglers.
    rt.shutdown_timeout(Duration::from_secs(2));
    res
}

/// What pusher-js sends with its upgrade (protocol 7).
const PUSHER_QUERY: &str = "?protocol=7&client=loadtest&version=1.0";

mod erased {
    /// A report as a JSON value (object-safe `Serialize`).
    pub trait Json {
        fn value(&self) -> serde_json::Value;
    }

    impl<T: serde::Serialize> Json for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or_default()
        }
    }
}

/// Ends the process if a run overstays `limit` (a bug or a stuck server).
fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("herald-loadtest: run exceeded its time limit of {limit:?}; exiting");
        std::process::exit(4);
    });
}
