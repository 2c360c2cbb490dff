//! What every scenario shares: the run context and the bounded,
//! concurrency-limited connection ramp-up.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::adapter::Adapter;
use crate::conn::{self, Conn, Sources, Target};
use crate::report;

/// Hard caps: every run is bounded in count and time.
pub const MAX_CONNS: usize = 19_000;
pub const MAX_DURATION: f64 = 300.0;
pub const MAX_DRAIN: f64 = 60.0;
pub const MAX_HOLD: f64 = 600.0;
/// Longest a ramp-up of connections may take.
pub const RAMP_LIMIT: Duration = Duration::from_secs(180);

/// Settings shared by all scenarios.
pub struct Ctx {
    pub adapter: Arc<dyn Adapter>,
    pub target: Target,
    pub sources: Sources,
    pub server_pid: Option<u32>,
    /// Other server processes (cluster nodes), counted with `server_pid`.
    pub also_pids: Vec<u32>,
    pub broker_pid: Option<u32>,
    /// Where subscribers connect, by turns (empty: `target`).
    pub sub_targets: Vec<Target>,
    pub threads: usize,
    pub progress: bool,
    pub connect_concurrency: usize,
    pub handshake_timeout: Duration,
}

impl Ctx {
    /// Opens one connection (upgrade and hello) within the handshake timeout.
    pub async fn open(
        &self,
        read_buf: usize,
        channel: Option<&str>,
        seed: u64,
    ) -> anyhow::Result<Conn> {
        self.open_at(&self.target, read_buf, channel, seed).await
    }

    async fn open_at(
        &self,
        target: &Target,
        read_buf: usize,
        channel: Option<&str>,
        seed: u64,
    ) -> anyhow::Result<Conn> {
        let src = self.sources.pick();
        match tokio::time::timeout(
            self.handshake_timeout,
            conn::open(&*self.adapter, target, src, read_buf, channel, seed),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => anyhow::bail!("connection not set up within {:?}", self.handshake_timeout),
        }
    }

    /// Opens a connection and subscribes it to `channel`, within the
    /// handshake timeout.
    pub async fn open_subscribed(
        &self,
        read_buf: usize,
        channel: &str,
        seed: u64,
    ) -> anyhow::Result<Conn> {
        let t = Instant::now();
        // Subscriber `seed` on the (seed mod N)-th of --sub-url, if any.
        let target = match self.sub_targets.len() {
            0 => &self.target,
            n => &self.sub_targets[seed as usize % n],
        };
        let mut c = self.open_at(target, read_buf, Some(channel), seed).await?;
        let left = self.handshake_timeout.saturating_sub(t.elapsed());
        match tokio::time::timeout(left, c.subscribe(&*self.adapter, channel, seed)).await {
            Ok(Ok(0)) => Ok(c),
            Ok(Ok(n)) => anyhow::bail!("{n} messages arrived before `subscribed`"),
            Ok(Err(e)) => Err(e),
            Err(_) => anyhow::bail!("subscription not confirmed within the handshake timeout"),
        }
    }
}

/// Outcome of a ramp-up.
pub struct Ramp {
    pub ok: u64,
    pub failed: u64,
    /// The first few failure reasons.
    pub errors: Vec<String>,
    pub secs: f64,
    /// Set-up time of each successful connection, microseconds.
    pub hist: Histogram<u64>,
}

/// Handed to each ramp task: report set-up done (or failed) exactly once.
pub struct Ready {
    tx: Option<mpsc::UnboundedSender<Result<u64, String>>>,
    t: Instant,
    permit: Option<OwnedSemaphorePermit>,
    pb: ProgressBar,
}

impl Ready {
    pub fn done(mut self, r: Result<(), String>) {
        self.report(r);
    }

    fn report(&mut self, r: Result<(), String>) {
        self.permit.take();
        if let Some(tx) = self.tx.take() {
            self.pb.inc(1);
            let _ = tx.send(r.map(|()| self.t.elapsed().as_micros() as u64));
        }
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        self.report(Err("set-up task ended without reporting".into()));
    }
}

/// Spawns `task(i, ready)` for `i` in `0..n`, at most
/// `ctx.connect_concurrency` of them setting up at once; waits until all
/// reported (or [`RAMP_LIMIT`]). Tasks keep running after reporting.
pub async fn ramp<F, Fut>(ctx: &Ctx, n: usize, what: &str, task: F) -> (Ramp, Vec<JoinHandle<()>>)
where
    F: Fn(usize, Ready) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let pb = report::bar(ctx.progress, n as u64, what);
    let sem = Arc::new(Semaphore::new(ctx.connect_concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + RAMP_LIMIT;
    let mut handles = Vec::with_capacity(n);
    let mut r = Ramp {
        ok: 0,
        failed: 0,
        errors: Vec::new(),
        secs: 0.0,
        hist: report::new_hist(),
    };
    let mut seen = 0usize;
    for i in 0..n {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p.expect("semaphore"),
            _ = tokio::time::sleep_until(deadline) => break,
        };
        while let Ok(res) = rx.try_recv() {
            take(res, &mut r);
            seen += 1;
        }
        let ready = Ready {
            tx: Some(tx.clone()),
            t: Instant::now(),
            permit: Some(permit),
            pb: pb.clone(),
        };
        handles.push(tokio::spawn(task(i, ready)));
    }
    drop(tx);
    let spawned = handles.len();
    while seen < spawned {
        tokio::select! {
            res = rx.recv() => match res {
                Some(res) => {
                    take(res, &mut r);
                    seen += 1;
                }
                None => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let missing = n as u64 - r.ok - r.failed;
    if missing > 0 {
        r.failed += missing;
        r.errors.push(format!(
            "{missing} connections not set up within {RAMP_LIMIT:?}"
        ));
    }
    r.secs = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    (r, handles)
}

fn take(res: Result<u64, String>, r: &mut Ramp) {
    match res {
        Ok(us) => {
            r.ok += 1;
            r.hist.saturating_record(us.max(1));
        }
        Err(e) => {
            r.failed += 1;
            if r.errors.len() < 5 {
                r.errors.push(e);
            }
        }
    }
}

/// Seconds as a Duration, clamped to `[0, max]`.
pub fn secs(v: f64, max: f64) -> Duration {
    Duration::from_secs_f64(v.clamp(0.0, max))
}
