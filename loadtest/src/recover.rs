//! `recover` (herald only, on a channel with `HISTORY`): N clients
//! subscribe, go away, M messages are published meanwhile, then all N come
//! back at once with `since` and each must receive exactly those M, in
//! order. Reports how long until every client had recovered, per-client
//! latency, and the server's CPU for the recovery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::adapter::Event;
use crate::conn::Status;
use crate::report::{self, CostMeter, Latency, Outcome, RunInfo, Table};
use crate::run::{self, Ctx};
use crate::ws;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Clients that reconnect at once (at most 19000).
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Messages published while they are away (at most 100000; the
    /// server's HISTORY and HISTORY_RECOVER_MAX must keep and allow them).
    #[arg(long, default_value_t = 1000)]
    pub missed: usize,
    /// Payload bytes of each message (a JSON string).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// The channel (it must match a HISTORY pattern).
    #[arg(long, default_value = "recover")]
    pub channel: String,
}

impl Args {
    pub fn command(&self) -> String {
        format!(
            "recover --clients {} --missed {} --size {}",
            self.clients, self.missed, self.size
        )
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.clients == 0 || self.clients > run::MAX_CONNS {
            bail!("--clients must be 1..={}", run::MAX_CONNS);
        }
        if self.missed == 0 || self.missed > 100_000 {
            bail!("--missed must be 1..=100000");
        }
        if self.size == 0 || self.size > 65_000 {
            bail!("--size must be 1..=65000");
        }
        Ok(())
    }

    pub fn time_limit(&self) -> Duration {
        run::RAMP_LIMIT * 2 + Duration::from_secs(180)
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    pub clients: usize,
    pub missed: usize,
    pub recovered: u64,
    pub failed: u64,
    /// From the first reconnect to the last client holding all M messages.
    pub recovery_secs: f64,
    pub messages_per_sec: f64,
    /// Per client: from its subscribe to its M-th message.
    pub client_latency: Latency,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Report {
    pub fn table(&self) -> Table {
        let mut t = Table::for_run(&self.run);
        t.row(
            "recovered",
            format!(
                "{} of {} clients ({} failed), {} messages each, in {:.3} s = {:.0} messages/s",
                self.recovered,
                self.clients,
                self.failed,
                self.missed,
                self.recovery_secs,
                self.messages_per_sec
            ),
        );
        t.row("per client", self.client_latency.row());
        t.finish(&self.outcome, "replayed message")
    }
}

/// One HTTP/1.1 request on a fresh loopback connection; the body.
async fn http(ctx: &Ctx, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(ctx.target.addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        ctx.target.host,
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    if !head.starts_with("HTTP/1.1 2") {
        bail!("{method} {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

/// The channel's epoch and newest offset (`GET /history`).
async fn position(ctx: &Ctx, channel: &str) -> anyhow::Result<(String, u64)> {
    let body = http(
        ctx,
        "GET",
        &format!("/history?channel={channel}&limit=1"),
        "",
    )
    .await?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let epoch = v["epoch"].as_str().context("no epoch: is HISTORY set?")?;
    Ok((epoch.to_string(), v["offset"].as_u64().unwrap_or(0)))
}

pub async fn run(ctx: Arc<Ctx>, a: Args, label: Option<String>) -> anyhow::Result<Report> {
    if ctx.adapter.name() != "herald" {
        bail!("recover speaks herald's protocol only");
    }
    // 1. Everyone subscribes once, then goes away.
    let (ramp, handles) = run::ramp(&ctx, a.clients, "subscribing", |i, ready| {
        let ctx = ctx.clone();
        let channel = a.channel.clone();
        async move {
            match ctx.open_subscribed(4096, &channel, i as u64).await {
                Ok(conn) => {
                    ready.done(Ok(()));
                    conn.close(&*ctx.adapter).await;
                }
                Err(e) => ready.done(Err(format!("{e:#}"))),
            }
        }
    })
    .await;
    for h in handles {
        let _ = h.await;
    }
    if ramp.failed > 0 {
        bail!(
            "{} clients could not subscribe: {:?}",
            ramp.failed,
            ramp.errors
        );
    }
    // 2. M messages while they are away.
    let (epoch, since) = position(&ctx, &a.channel).await?;
    let payload = serde_json::Value::from("x".repeat(a.size)).to_string();
    let body = format!(r#"{{"channel":"{}","data":{payload}}}"#, a.channel);
    for _ in 0..a.missed {
        http(&ctx, "POST", "/publish", &body).await?;
    }
    let (_, top) = position(&ctx, &a.channel).await?;
    if top != since + a.missed as u64 {
        bail!(
            "the channel moved from {since} to {top}, not by {}",
            a.missed
        );
    }
    // 3. All come back at once, each resuming after `since`: connected
    // first (not measured), then every subscribe sent together.
    let opened = Arc::new(tokio::sync::Barrier::new(a.clients + 1));
    let gate = Arc::new(tokio::sync::Barrier::new(a.clients + 1));
    let mut tasks = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let ctx = ctx.clone();
        let (opened, gate) = (opened.clone(), gate.clone());
        let (channel, epoch, missed) = (a.channel.clone(), epoch.clone(), a.missed as u64);
        tasks.push(tokio::spawn(async move {
            let conn = ctx.open(1 << 16, Some(&channel), i as u64).await;
            opened.wait().await;
            let mut conn = conn?;
            gate.wait().await;
            let t0 = Instant::now();
            let req = serde_json::json!({"op":"subscribe","channel":channel,"id":1,
                                         "since":{"epoch":epoch,"offset":since}})
            .to_string();
            let mut out = Vec::new();
            ws::write_frame(&mut out, 0x1, req.as_bytes(), conn.rs.mask.key());
            conn.stream.write_all(&out).await?;
            let mut got = 0u64;
            let mut confirmed = false;
            while got < missed {
                let st = conn
                    .read_events(&*ctx.adapter, &mut |e| match e {
                        Event::Confirm => confirmed = true,
                        Event::Message { .. } => got += 1,
                        _ => {}
                    })
                    .await?;
                if st != Status::Open && got < missed {
                    bail!("connection ended after {got} of {missed} messages");
                }
            }
            if !confirmed {
                bail!("messages before `subscribed`");
            }
            let us = t0.elapsed().as_micros() as u64;
            conn.close(&*ctx.adapter).await;
            anyhow::Ok(us)
        }));
    }
    opened.wait().await;
    let meter = CostMeter::start(ctx.server_pid);
    gate.wait().await;
    let started = Instant::now();
    let mut hist = report::new_hist();
    let mut errors = Vec::new();
    let mut failed = 0u64;
    for t in tasks {
        match t.await {
            Ok(Ok(us)) => {
                hist.saturating_record(us.max(1));
            }
            Ok(Err(e)) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(format!("{e:#}"));
                }
            }
            Err(e) => {
                failed += 1;
                errors.push(e.to_string());
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let recovered = hist.len();
    let replayed = recovered * a.missed as u64;
    let (server, client) = meter.finish(ctx.threads, replayed);
    let mut problems = Vec::new();
    if failed > 0 {
        problems.push(format!("{failed} clients did not recover"));
    }
    Ok(Report {
        run: RunInfo::new(
            "recover",
            ctx.adapter.name(),
            label,
            a.command(),
            &ctx.target,
        ),
        clients: a.clients,
        missed: a.missed,
        recovered,
        failed,
        recovery_secs: report::round3(secs),
        messages_per_sec: (replayed as f64 / secs.max(1e-9)).round(),
        client_latency: Latency::of(&hist),
        outcome: Outcome::new(server, client, errors, problems),
    })
}
