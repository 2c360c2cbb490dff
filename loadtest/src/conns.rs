//! `conns`: N idle subscribed connections; handshakes/s and the server's
//! resident memory per connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use crate::conn::Status;
use crate::procstat;
use crate::report::{self, CostMeter, Latency, Outcome, RunInfo, Table};
use crate::run::{self, Ctx};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Connections to open (at most 19000).
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Seconds to hold them open once all are up (capped at 600).
    #[arg(long, default_value_t = 3.0)]
    pub hold: f64,
    /// Channels they subscribe to (connection i: channel i mod C; with
    /// --channels-per-conn K, channels iK..iK+K-1 mod C). `--channels`
    /// equal to `--conns` gives each connection a channel of its own.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Channels each connection subscribes to (1 to 64).
    #[arg(long, default_value_t = 1)]
    pub channels_per_conn: usize,
}

impl Args {
    pub fn command(&self) -> String {
        let mut cmd = format!("conns --conns {} --hold {}", self.conns, self.hold);
        if self.channels != 1 {
            cmd.push_str(&format!(" --channels {}", self.channels));
        }
        if self.channels_per_conn != 1 {
            cmd.push_str(&format!(" --channels-per-conn {}", self.channels_per_conn));
        }
        cmd
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.conns == 0 || self.conns > run::MAX_CONNS {
            bail!("--conns must be 1..={}", run::MAX_CONNS);
        }
        if !(0.0..=run::MAX_HOLD).contains(&self.hold) {
            bail!("--hold must be 0..={} seconds", run::MAX_HOLD);
        }
        if self.channels == 0 || self.channels > self.conns * self.channels_per_conn {
            bail!("--channels must be 1..=--conns x --channels-per-conn");
        }
        if !(1..=64).contains(&self.channels_per_conn) {
            bail!("--channels-per-conn must be 1..=64");
        }
        Ok(())
    }

    pub fn time_limit(&self) -> Duration {
        run::RAMP_LIMIT + run::secs(self.hold + 60.0, 1e6)
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    pub conns: usize,
    pub opened: u64,
    pub failed: u64,
    pub ramp_secs: f64,
    pub handshakes_per_sec: f64,
    pub handshake_latency: Latency,
    pub hold_secs: f64,
    pub closed_during_hold: u64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub hwm_kib: Option<u64>,
    pub rss_per_conn_bytes: Option<f64>,
    /// Server cost of the ramp-up (per handshake).
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Report {
    pub fn table(&self) -> Table {
        let mut t = Table::for_run(&self.run);
        t.row(
            "opened",
            format!(
                "{} of {} ({} failed) in {:.2} s = {:.0} handshakes/s",
                self.opened, self.conns, self.failed, self.ramp_secs, self.handshakes_per_sec
            ),
        );
        t.row("handshake+subscribe", self.handshake_latency.row());
        t.row(
            "held",
            format!(
                "{:.1} s, {} closed by the server meanwhile",
                self.hold_secs, self.closed_during_hold
            ),
        );
        let kib = |v: Option<u64>| v.map_or("?".to_string(), |v| format!("{v} KiB"));
        t.row(
            "server RSS before / after / HWM",
            format!(
                "{} / {} / {}",
                kib(self.rss_before_kib),
                kib(self.rss_after_kib),
                kib(self.hwm_kib)
            ),
        );
        t.row(
            "server RSS per connection",
            self.rss_per_conn_bytes
                .map_or("unknown (pass --server-pid)".to_string(), |b| {
                    format!("{b:.0} bytes")
                }),
        );
        t.finish(&self.outcome, "handshake")
    }
}

pub async fn run(ctx: Arc<Ctx>, a: Args, label: Option<String>) -> anyhow::Result<Report> {
    let before = procstat::sample_opt(ctx.server_pid);
    let closed = Arc::new(AtomicU64::new(0));
    let meter = CostMeter::start(ctx.server_pid);
    let (ramp, handles) = run::ramp(&ctx, a.conns, "connecting", |i, ready| {
        let ctx = ctx.clone();
        let closed = closed.clone();
        let channels = a.channels;
        let per_conn = a.channels_per_conn;
        async move {
            let name = |j: usize| format!("idle{}", (i * per_conn + j) % channels);
            let opened = async {
                let mut conn = ctx.open_subscribed(4096, &name(0), i as u64).await?;
                for j in 1..per_conn {
                    let n = conn.subscribe(&*ctx.adapter, &name(j), i as u64).await?;
                    if n > 0 {
                        anyhow::bail!("{n} messages arrived before `subscribed`");
                    }
                }
                Ok(conn)
            };
            match opened.await {
                Ok(mut conn) => {
                    ready.done(Ok(()));
                    loop {
                        match conn.read_events(&*ctx.adapter, &mut |_| {}).await {
                            Ok(Status::Open) => {}
                            _ => {
                                closed.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                }
                Err(e) => ready.done(Err(format!("{e:#}"))),
            }
        }
    })
    .await;
    let (server, client) = meter.finish(ctx.threads, ramp.ok);

    let hold = if ramp.ok > 0 {
        run::secs(a.hold, run::MAX_HOLD)
    } else {
        Duration::ZERO
    };
    let pb = report::bar(ctx.progress, hold.as_millis() as u64, "holding");
    let t = Instant::now();
    while t.elapsed() < hold {
        tokio::time::sleep(Duration::from_millis(100).min(hold)).await;
        pb.set_position(t.elapsed().as_millis() as u64);
    }
    pb.finish_and_clear();
    let after = procstat::sample_opt(ctx.server_pid);
    let closed_during_hold = closed.load(Ordering::Relaxed);
    for h in &handles {
        h.abort();
    }
    let rss_per_conn = match (before, after) {
        (Some(b), Some(a)) if ramp.ok > 0 => {
            Some(((a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / ramp.ok as f64).round())
        }
        _ => None,
    };
    let mut problems = Vec::new();
    if ramp.failed > 0 {
        problems.push(format!("{} connections failed", ramp.failed));
    }
    if closed_during_hold > 0 {
        problems.push(format!("{closed_during_hold} closed during the hold"));
    }
    Ok(Report {
        run: RunInfo::new("conns", ctx.adapter.name(), label, a.command(), &ctx.target),
        conns: a.conns,
        opened: ramp.ok,
        failed: ramp.failed,
        ramp_secs: report::round3(ramp.secs),
        handshakes_per_sec: (ramp.ok as f64 / ramp.secs.max(1e-9)).round(),
        handshake_latency: Latency::of(&ramp.hist),
        hold_secs: report::round3(t.elapsed().as_secs_f64()),
        closed_during_hold,
        rss_before_kib: before.map(|s| s.rss_kib),
        rss_after_kib: after.map(|s| s.rss_kib),
        hwm_kib: after.map(|s| s.hwm_kib),
        rss_per_conn_bytes: rss_per_conn,
        outcome: Outcome::new(server, client, ramp.errors, problems),
    })
}
