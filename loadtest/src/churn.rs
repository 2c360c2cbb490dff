//! `churn`: connect, subscribe, receive one message, disconnect, started
//! at a fixed rate; reports completed cycles/s and failures.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};

use crate::adapter::{now_ns, Event};
use crate::conn::Status;
use crate::report::{self, CostMeter, Latency, Outcome, RunInfo, Table};
use crate::run::{self, Ctx};
use crate::ws::Mask;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Cycles started per second (at most 5000).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds during which cycles are started (capped at 300).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds one cycle may take before it counts as failed.
    #[arg(long, default_value_t = 10.0)]
    pub cycle_timeout: f64,
    /// Most cycles in flight; past it, starts wait (and the achieved rate drops).
    #[arg(long, default_value_t = 2000)]
    pub max_inflight: usize,
}

impl Args {
    pub fn command(&self) -> String {
        format!("churn --rate {} --duration {}", self.rate, self.duration)
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if !(self.rate > 0.0 && self.rate <= 5000.0) {
            bail!("--rate must be in (0, 5000]");
        }
        if !(self.duration > 0.0 && self.duration <= run::MAX_DURATION) {
            bail!("--duration must be in (0, {}]", run::MAX_DURATION);
        }
        if !(self.cycle_timeout > 0.0 && self.cycle_timeout <= 60.0) {
            bail!("--cycle-timeout must be in (0, 60]");
        }
        if self.max_inflight == 0 || self.max_inflight > run::MAX_CONNS {
            bail!("--max-inflight must be 1..={}", run::MAX_CONNS);
        }
        Ok(())
    }

    pub fn time_limit(&self) -> Duration {
        run::secs(self.duration + self.cycle_timeout + 60.0, 1e6)
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    pub rate: f64,
    pub duration: f64,
    pub started: u64,
    pub completed: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub secs: f64,
    pub cycles_per_sec: f64,
    /// Starts that ran over 100 ms late (the in-flight cap was reached).
    pub late_starts: u64,
    pub cycle_latency: Latency,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Report {
    pub fn table(&self) -> Table {
        let mut t = Table::for_run(&self.run);
        t.row(
            "cycles",
            format!(
                "{} started, {} completed, {} failed in {:.2} s = {:.1} completed/s",
                self.started, self.completed, self.failed, self.secs, self.cycles_per_sec
            ),
        );
        for (k, v) in &self.failures {
            t.row(format!("failed: {k}"), v);
        }
        if self.late_starts > 0 {
            t.row("late starts", self.late_starts);
        }
        t.row("cycle time", self.cycle_latency.row());
        t.finish(&self.outcome, "cycle")
    }
}

/// Results of the cycles so far.
struct Tally {
    completed: u64,
    failures: BTreeMap<String, u64>,
    first_errors: Vec<String>,
    hist: hdrhistogram::Histogram<u64>,
    last_done: Instant,
}

impl Tally {
    fn take(&mut self, r: Result<u64, (String, String)>, pb: &indicatif::ProgressBar) {
        pb.inc(1);
        match r {
            Ok(us) => {
                self.completed += 1;
                self.hist.saturating_record(us.max(1));
                self.last_done = Instant::now();
            }
            Err((stage, msg)) => {
                *self.failures.entry(stage).or_default() += 1;
                if self.first_errors.len() < 5 {
                    self.first_errors.push(msg);
                }
            }
        }
    }

    fn seen(&self) -> u64 {
        self.completed + self.failures.values().sum::<u64>()
    }
}

/// One cycle's failure, by stage.
fn stage_err(stage: &str, e: impl std::fmt::Display) -> (String, String) {
    (stage.to_string(), format!("{stage}: {e}"))
}

pub async fn run(ctx: Arc<Ctx>, a: Args, label: Option<String>) -> anyhow::Result<Report> {
    let adapter = ctx.adapter.clone();
    // The publisher: one connection that publishes to each cycle's channel.
    let pub_conn = ctx.open(65536, None, 7).await?;
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let (pub_tx, mut pub_rx) = mpsc::unbounded_channel::<String>();
    let stopping = Arc::new(AtomicBool::new(false));
    let crate::conn::Conn { stream, mut rs } = pub_conn;
    // Pusher: the publisher joins each cycle's channel just before its one
    // client event and leaves it right after (in order on one connection).
    let pub_socket_id = rs.parser.socket_id().map(str::to_string);
    let (mut rh, mut wh) = stream.into_split();
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let pub_reader = {
        let adapter = adapter.clone();
        let errors = errors.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            loop {
                let mut errs = Vec::new();
                let r = rs
                    .read_events(&*adapter, &mut rh, &mut |e| {
                        if let Event::Error(b) = e {
                            errs.push(String::from_utf8_lossy(b).into_owned())
                        }
                    })
                    .await;
                if !rs.replies.is_empty() {
                    let _ = ctl_tx.send(std::mem::take(&mut rs.replies));
                }
                let mut v = errors.lock().unwrap();
                for e in errs {
                    if v.len() < 10 {
                        v.push(format!("publisher: server error {e}"));
                    }
                }
                if !matches!(r, Ok(Status::Open)) {
                    if !stopping.load(Ordering::Relaxed) {
                        v.push(format!("publisher connection ended: {r:?}"));
                    }
                    return;
                }
            }
        })
    };
    let pub_writer = {
        let adapter = adapter.clone();
        let errors = errors.clone();
        let size = adapter.min_size().max(32);
        tokio::spawn(async move {
            let mut mask = Mask::new(99);
            let mut out = Vec::new();
            let join = adapter.publisher_subscribes();
            let sid = pub_socket_id.as_deref();
            let publish = |out: &mut Vec<u8>, mask: &mut Mask, ch: &str| {
                if join {
                    adapter.subscribe(out, mask, ch, 0, sid);
                }
                adapter.publish(out, mask, ch, now_ns(), size, None);
                if join {
                    adapter.unsubscribe(out, mask, ch);
                }
            };
            while let Some(ch) = pub_rx.recv().await {
                out.clear();
                while let Ok(b) = ctl_rx.try_recv() {
                    out.extend_from_slice(&b);
                }
                publish(&mut out, &mut mask, &ch);
                while let Ok(ch) = pub_rx.try_recv() {
                    publish(&mut out, &mut mask, &ch);
                }
                if let Err(e) = wh.write_all(&out).await {
                    errors.lock().unwrap().push(format!("publisher write: {e}"));
                    return;
                }
            }
            let _ = wh.shutdown().await;
        })
    };

    let (res_tx, mut res_rx) = mpsc::unbounded_channel::<Result<u64, (String, String)>>();
    let inflight = Arc::new(Semaphore::new(a.max_inflight));
    let cycle_timeout = run::secs(a.cycle_timeout, 60.0);
    let meter = CostMeter::start(ctx.server_pid);
    let t0 = Instant::now();
    let dur = run::secs(a.duration, run::MAX_DURATION);
    let total = (a.rate * dur.as_secs_f64()).floor().max(1.0) as u64;
    let pb = report::bar(ctx.progress, total, "churning");
    let mut started = 0u64;
    let mut late = 0u64;
    let mut handles = Vec::new();
    let mut tally = Tally {
        completed: 0,
        failures: BTreeMap::new(),
        first_errors: Vec::new(),
        hist: report::new_hist(),
        last_done: t0,
    };
    for i in 0..total {
        let at = t0 + Duration::from_secs_f64(i as f64 / a.rate);
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        let permit = inflight.clone().acquire_owned().await.expect("semaphore");
        if at.elapsed() > Duration::from_millis(100) {
            late += 1;
        }
        while let Ok(r) = res_rx.try_recv() {
            tally.take(r, &pb);
        }
        started += 1;
        let ctx = ctx.clone();
        let res_tx = res_tx.clone();
        let pub_tx = pub_tx.clone();
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let ch = format!("churn{i}");
            let r = tokio::time::timeout(cycle_timeout, async {
                let mut conn = ctx
                    .open_subscribed(4096, &ch, i)
                    .await
                    .map_err(|e| stage_err("connect+subscribe", format!("{e:#}")))?;
                pub_tx
                    .send(ch.clone())
                    .map_err(|_| stage_err("publish", "publisher gone"))?;
                let mut got = false;
                while !got {
                    let st = conn
                        .read_events(&*ctx.adapter, &mut |e| {
                            if matches!(e, Event::Message { .. }) {
                                got = true;
                            }
                        })
                        .await
                        .map_err(|e| stage_err("receive", e))?;
                    if !got && st != Status::Open {
                        return Err(stage_err("receive", format!("connection ended {st:?}")));
                    }
                }
                conn.close(&*ctx.adapter).await;
                Ok(t.elapsed().as_micros() as u64)
            })
            .await
            .unwrap_or_else(|_| {
                Err(stage_err(
                    "timeout",
                    format!("cycle over {cycle_timeout:?}"),
                ))
            });
            drop(permit);
            let _ = res_tx.send(r);
        }));
    }
    drop(res_tx);
    let until = Instant::now() + cycle_timeout + Duration::from_secs(2);
    while tally.seen() < started {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, res_rx.recv()).await {
            Ok(Some(r)) => tally.take(r, &pb),
            _ => break,
        }
    }
    pb.finish_and_clear();
    let Tally {
        completed,
        mut failures,
        first_errors,
        hist,
        last_done,
    } = tally;
    let (server, client) = meter.finish(ctx.threads, completed);
    for h in &handles {
        h.abort();
    }
    let unreported = started - completed - failures.values().sum::<u64>();
    if unreported > 0 {
        *failures.entry("unfinished".into()).or_default() += unreported;
    }
    stopping.store(true, Ordering::Relaxed);
    drop(pub_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), pub_writer).await;
    pub_reader.abort();
    let failed: u64 = failures.values().sum();
    let secs = (last_done - t0).as_secs_f64();
    let mut errors_all = first_errors;
    errors_all.extend(errors.lock().unwrap().iter().cloned());
    let mut problems = Vec::new();
    if failed > 0 {
        problems.push(format!("{failed} cycles failed"));
    }
    if completed == 0 {
        problems.push("no cycle completed".into());
    }
    Ok(Report {
        run: RunInfo::new("churn", adapter.name(), label, a.command(), &ctx.target),
        rate: a.rate,
        duration: a.duration,
        started,
        completed,
        failed,
        failures,
        secs: report::round3(secs),
        cycles_per_sec: report::round3(completed as f64 / secs.max(1e-9)),
        late_starts: late,
        cycle_latency: Latency::of(&hist),
        outcome: Outcome::new(server, client, errors_all, problems),
    })
}
