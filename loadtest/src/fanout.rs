//! `fanout`: S subscribers over C channels, P publishers at a total rate R;
//! reports publishes/s, deliveries/s, loss, latency and server cost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Semaphore};

use crate::adapter::{now_ns, Adapter, Event};
use crate::conn::{Conn, Status};
use crate::report::{self, CostMeter, Latency, Outcome, RunInfo, Table};
use crate::run::{self, Ctx};
use crate::ws::Mask;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Subscriber connections (spread evenly over the channels).
    #[arg(long, default_value_t = 1000)]
    pub subs: usize,
    /// Channels (subscriber j listens on channel j mod C).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Payload bytes (herald, pusher: the `data` JSON string, quotes
    /// included; at least 22).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Total publishes per second over all publishers; 0 = as fast as the
    /// server acknowledges them (bounded by --window).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seconds of publishing (capped at 300).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Publisher connections; publisher p sends on channels p, p+P, p+2P, ... (mod C).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Most un-acknowledged publishes per publisher.
    #[arg(long, default_value_t = 256)]
    pub window: u64,
    /// Seconds to wait for stragglers after publishing stops (capped at 60).
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,
    /// Initial read buffer per subscriber, bytes.
    #[arg(long, default_value_t = 16384)]
    pub read_buffer: usize,
}

impl Args {
    pub fn command(&self) -> String {
        format!(
            "fanout --subs {} --channels {} --size {} --rate {} --duration {} --publishers {}",
            self.subs, self.channels, self.size, self.rate, self.duration, self.publishers
        )
    }

    pub fn check(&self, adapter: &dyn Adapter) -> anyhow::Result<()> {
        if self.subs == 0 || self.subs + self.publishers > run::MAX_CONNS {
            bail!(
                "--subs + --publishers must be 1..={} (got {})",
                run::MAX_CONNS,
                self.subs + self.publishers
            );
        }
        if self.channels == 0 || self.channels > 100_000 {
            bail!("--channels must be 1..=100000");
        }
        if self.publishers == 0 || self.publishers > 256 {
            bail!("--publishers must be 1..=256");
        }
        if self.size < adapter.min_size() || self.size > 60_000 {
            bail!(
                "--size must be {}..=60000 for {}",
                adapter.min_size(),
                adapter.name()
            );
        }
        if !(self.rate >= 0.0 && self.rate <= 10_000_000.0) {
            bail!("--rate must be 0..=10000000");
        }
        if !(self.duration > 0.0 && self.duration <= run::MAX_DURATION) {
            bail!("--duration must be in (0, {}] seconds", run::MAX_DURATION);
        }
        if !(0.0..=run::MAX_DRAIN).contains(&self.drain) {
            bail!("--drain must be 0..={} seconds", run::MAX_DRAIN);
        }
        if self.window == 0 || self.window > 1_000_000 {
            bail!("--window must be 1..=1000000");
        }
        if self.window < adapter.publishes_per_confirm() {
            bail!("--window must be at least --ping-every");
        }
        Ok(())
    }

    /// Upper bound of the run's wall time (for the watchdog).
    pub fn time_limit(&self) -> Duration {
        run::RAMP_LIMIT * 2 + run::secs(self.duration + 2.0 * self.drain + 30.0, 1e6)
    }
}

/// State the subscriber tasks update.
struct Subs {
    delivered: AtomicU64,
    /// Receive time (ns) of the latest delivery.
    last_ns: AtomicU64,
    per_sub: Vec<AtomicU64>,
    bad_ts: AtomicU64,
    closed: AtomicU64,
    hists: Vec<Mutex<Histogram<u64>>>,
    errors: Mutex<Vec<String>>,
}

impl Subs {
    fn error(&self, e: String) {
        let mut v = self.errors.lock().unwrap();
        if v.len() < 10 {
            v.push(e);
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    pub subs: usize,
    pub channels: usize,
    pub size: usize,
    pub rate: f64,
    pub duration: f64,
    pub publishers: usize,
    pub window: u64,
    pub ramp_secs: f64,
    pub published: u64,
    pub publish_secs: f64,
    pub published_per_sec: f64,
    pub expected: u64,
    pub delivered: u64,
    pub missing: u64,
    pub extra: u64,
    pub subs_short: u64,
    pub subs_closed: u64,
    pub deliver_secs: f64,
    pub delivered_per_sec: f64,
    pub drain_secs: f64,
    pub drain_timed_out: bool,
    pub bad_timestamps: u64,
    pub latency: Latency,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Report {
    pub fn table(&self) -> Table {
        let mut t = Table::for_run(&self.run);
        t.row("subscribed in", format!("{:.2} s", self.ramp_secs));
        t.row(
            "published",
            format!(
                "{} in {:.2} s = {:.0}/s",
                self.published, self.publish_secs, self.published_per_sec
            ),
        );
        t.row(
            "delivered",
            format!(
                "{} of {} expected in {:.2} s = {:.0}/s",
                self.delivered, self.expected, self.deliver_secs, self.delivered_per_sec
            ),
        );
        t.row(
            "LOSS",
            format!(
                "missing {} / extra {} ({} subscribers short, {} closed){}",
                self.missing,
                self.extra,
                self.subs_short,
                self.subs_closed,
                if self.drain_timed_out {
                    "  drain timed out"
                } else {
                    ""
                }
            ),
        );
        t.row("latency", self.latency.row());
        t.finish(&self.outcome, "delivery")
    }
}

/// Where publisher `p`'s `i`-th publish goes.
pub fn channel_of(p: usize, i: u64, publishers: usize, channels: usize) -> usize {
    ((p as u64 + i * publishers as u64) % channels as u64) as usize
}

/// Expected deliveries: each channel's publishes times its subscribers.
pub fn expected_total(published: &[u64], subs: usize) -> u64 {
    let c = published.len();
    published
        .iter()
        .enumerate()
        .map(|(ch, &n)| n * subs_on(ch, subs, c) as u64)
        .sum()
}

/// Subscribers of channel `ch` when subscriber j listens on j mod c.
pub fn subs_on(ch: usize, subs: usize, c: usize) -> usize {
    subs / c + usize::from(ch < subs % c)
}

pub async fn run(ctx: Arc<Ctx>, a: Args, label: Option<String>) -> anyhow::Result<Report> {
    let adapter = ctx.adapter.clone();
    let chans: Arc<Vec<String>> = Arc::new((0..a.channels).map(|c| format!("ch{c}")).collect());
    let shared = Arc::new(Subs {
        delivered: AtomicU64::new(0),
        last_ns: AtomicU64::new(0),
        per_sub: (0..a.subs).map(|_| AtomicU64::new(0)).collect(),
        bad_ts: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        hists: (0..16).map(|_| Mutex::new(report::new_hist())).collect(),
        errors: Mutex::new(Vec::new()),
    });

    // 1. Subscribers, each confirmed before anything is published.
    let (ramp, mut handles) = run::ramp(&ctx, a.subs, "subscribing", |j, ready| {
        let ctx = ctx.clone();
        let chans = chans.clone();
        let shared = shared.clone();
        let read_buf = a.read_buffer;
        async move {
            let ch = &chans[j % chans.len()];
            match ctx.open_subscribed(read_buf, ch, j as u64).await {
                Ok(conn) => {
                    ready.done(Ok(()));
                    subscriber(j, conn, &*ctx.adapter, &shared).await;
                }
                Err(e) => ready.done(Err(format!("{e:#}"))),
            }
        }
    })
    .await;
    if ramp.failed > 0 {
        abort_all(&handles);
        bail!(
            "{} of {} subscribers failed to subscribe: {}",
            ramp.failed,
            a.subs,
            ramp.errors.join("; ")
        );
    }

    // 2. Publishers (subscribed to the channels they publish on where the
    // protocol requires it: Pusher client events).
    let mut pubs = Vec::new();
    for p in 0..a.publishers {
        match open_publisher(&ctx, &chans, p, a.publishers).await {
            Ok(c) => pubs.push(c),
            Err(e) => {
                abort_all(&handles);
                bail!("publisher {p}: {e:#}");
            }
        }
    }

    // 3. Measure.
    let published: Arc<Vec<AtomicU64>> =
        Arc::new((0..a.channels).map(|_| AtomicU64::new(0)).collect());
    let pub_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let meter = CostMeter::cluster(ctx.server_pid, &ctx.also_pids, ctx.broker_pid);
    let t0 = Instant::now();
    let t0_ns = now_ns();
    let deadline = t0 + run::secs(a.duration, run::MAX_DURATION);
    let drain = run::secs(a.drain, run::MAX_DRAIN);
    let stop = Arc::new(AtomicBool::new(false));
    let mut pub_tasks = Vec::new();
    for (p, conn) in pubs.into_iter().enumerate() {
        let cfg = PubCfg {
            p,
            publishers: a.publishers,
            rate: a.rate / a.publishers as f64,
            size: a.size,
            window: a.window,
            t0,
            deadline,
            drain,
        };
        pub_tasks.push(tokio::spawn(publisher(
            cfg,
            conn,
            adapter.clone(),
            chans.clone(),
            published.clone(),
            pub_errors.clone(),
            stop.clone(),
        )));
    }
    let pb = report::bar(ctx.progress, (a.duration * 1000.0) as u64, "publishing");
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let el = t0.elapsed().as_secs_f64().max(1e-3);
        let d = shared.delivered.load(Ordering::Relaxed);
        pb.set_position((el * 1000.0) as u64);
        pb.set_message(format!("delivered {d} ({:.0}/s)", d as f64 / el));
    }
    pb.finish_and_clear();
    let mut publish_end = t0;
    let mut sent_total = 0u64;
    for t in pub_tasks {
        match t.await {
            Ok(r) => {
                sent_total += r.sent;
                publish_end = publish_end.max(r.last_write);
            }
            Err(e) => pub_errors
                .lock()
                .unwrap()
                .push(format!("publisher task: {e}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let per_channel: Vec<u64> = published
        .iter()
        .map(|x| x.load(Ordering::Relaxed))
        .collect();
    let expected = expected_total(&per_channel, a.subs);

    // 4. Drain stragglers (bounded).
    let drain_start = Instant::now();
    let mut drain_timed_out = false;
    let pb = report::bar(ctx.progress, expected, "draining");
    loop {
        let d = shared.delivered.load(Ordering::Relaxed);
        pb.set_position(d);
        if d >= expected {
            break;
        }
        if shared.closed.load(Ordering::Relaxed) == a.subs as u64 {
            break;
        }
        if drain_start.elapsed() >= drain {
            drain_timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    pb.finish_and_clear();
    let drain_secs = drain_start.elapsed().as_secs_f64();
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let (server, client) = meter.finish(ctx.threads, delivered);
    // Let a late duplicate show up as `extra` rather than vanish.
    tokio::time::sleep(Duration::from_millis(50)).await;
    abort_all(&handles);
    handles.clear();

    // 5. Per-subscriber accounting.
    let (mut missing, mut extra, mut short) = (0u64, 0u64, 0u64);
    for (j, got) in shared.per_sub.iter().enumerate() {
        let want = per_channel[j % a.channels];
        let got = got.load(Ordering::Relaxed);
        if got < want {
            missing += want - got;
            short += 1;
        } else {
            extra += got - want;
        }
    }
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let last = shared.last_ns.load(Ordering::Relaxed);
    let deliver_secs = if last > t0_ns {
        (last - t0_ns) as f64 / 1e9
    } else {
        0.0
    };
    let mut hist = report::new_hist();
    for h in &shared.hists {
        hist.add(&*h.lock().unwrap()).ok();
    }
    let publish_secs = (publish_end - t0).as_secs_f64();
    let mut errors = pub_errors.lock().unwrap().clone();
    errors.extend(shared.errors.lock().unwrap().iter().cloned());
    let subs_closed = shared.closed.load(Ordering::Relaxed);
    let bad_ts = shared.bad_ts.load(Ordering::Relaxed);
    let mut problems = Vec::new();
    if missing > 0 {
        problems.push(format!("{missing} deliveries missing"));
    }
    if extra > 0 {
        problems.push(format!("{extra} unexpected deliveries"));
    }
    if subs_closed > 0 {
        problems.push(format!("{subs_closed} subscribers disconnected"));
    }
    if sent_total == 0 {
        problems.push("nothing was published".into());
    }
    if bad_ts > 0 {
        problems.push(format!("{bad_ts} deliveries without a readable timestamp"));
    }
    if !errors.is_empty() {
        problems.push(format!("{} errors", errors.len()));
    }
    Ok(Report {
        run: RunInfo::new("fanout", adapter.name(), label, a.command(), &ctx.target),
        subs: a.subs,
        channels: a.channels,
        size: a.size,
        rate: a.rate,
        duration: a.duration,
        publishers: a.publishers,
        window: a.window,
        ramp_secs: report::round3(ramp.secs),
        published: sent_total,
        publish_secs: report::round3(publish_secs),
        published_per_sec: (sent_total as f64 / publish_secs.max(1e-9)).round(),
        expected,
        delivered,
        missing,
        extra,
        subs_short: short,
        subs_closed,
        deliver_secs: report::round3(deliver_secs),
        delivered_per_sec: (delivered as f64 / deliver_secs.max(1e-9)).round(),
        drain_secs: report::round3(drain_secs),
        drain_timed_out,
        bad_timestamps: bad_ts,
        latency: Latency::of(&hist),
        outcome: Outcome::new(server, client, errors, problems),
    })
}

/// Opens publisher `p`; subscribes it to every channel it publishes on
/// when the adapter requires that ([`Adapter::publisher_subscribes`]).
async fn open_publisher(
    ctx: &Ctx,
    chans: &[String],
    p: usize,
    publishers: usize,
) -> anyhow::Result<Conn> {
    let seed = 1_000_000 + p as u64;
    let mut conn = ctx.open(65536, None, seed).await?;
    if ctx.adapter.publisher_subscribes() {
        for ch in publisher_channels(p, publishers, chans.len()) {
            let sub = conn.subscribe(&*ctx.adapter, &chans[ch], seed);
            match tokio::time::timeout(ctx.handshake_timeout, sub).await {
                Ok(r) => {
                    r?;
                }
                Err(_) => bail!("subscription to {} not confirmed in time", chans[ch]),
            }
        }
    }
    Ok(conn)
}

/// The channels publisher `p` of `publishers` sends on ([`channel_of`]),
/// each once, in order.
pub fn publisher_channels(p: usize, publishers: usize, channels: usize) -> Vec<usize> {
    let mut seen = vec![false; channels];
    for i in 0..channels as u64 {
        seen[channel_of(p, i, publishers, channels)] = true;
    }
    (0..channels).filter(|&c| seen[c]).collect()
}

fn abort_all(h: &[tokio::task::JoinHandle<()>]) {
    for t in h {
        t.abort();
    }
}

/// Reads deliveries until the connection ends (or the task is aborted).
async fn subscriber(j: usize, mut conn: Conn, adapter: &dyn Adapter, s: &Subs) {
    let mut lats: Vec<u64> = Vec::with_capacity(256);
    let shard = &s.hists[j % s.hists.len()];
    loop {
        let mut n = 0u64;
        let mut bad = 0u64;
        let mut now = 0u64;
        let mut err: Option<String> = None;
        lats.clear();
        let r = conn
            .read_events(adapter, &mut |e| match e {
                Event::Message { ts_ns } => {
                    n += 1;
                    if now == 0 {
                        now = now_ns();
                    }
                    match ts_ns {
                        Some(ts) => lats.push(now.saturating_sub(ts) / 1000),
                        None => bad += 1,
                    }
                }
                Event::Error(b) if err.is_none() => {
                    err = Some(String::from_utf8_lossy(b).into_owned())
                }
                _ => {}
            })
            .await;
        if n > 0 {
            s.per_sub[j].fetch_add(n, Ordering::Relaxed);
            s.delivered.fetch_add(n, Ordering::Relaxed);
            s.last_ns.fetch_max(now, Ordering::Relaxed);
            let mut h = shard.lock().unwrap();
            for &l in &lats {
                h.saturating_record(l.max(1));
            }
        }
        if bad > 0 {
            s.bad_ts.fetch_add(bad, Ordering::Relaxed);
        }
        if let Some(e) = err {
            s.error(format!("subscriber {j}: server error {e}"));
        }
        match r {
            Ok(Status::Open) => continue,
            Ok(st) => {
                s.closed.fetch_add(1, Ordering::Relaxed);
                s.error(format!("subscriber {j}: connection ended: {st:?}"));
                return;
            }
            Err(e) => {
                s.closed.fetch_add(1, Ordering::Relaxed);
                s.error(format!("subscriber {j}: {e}"));
                return;
            }
        }
    }
}

struct PubCfg {
    p: usize,
    publishers: usize,
    /// This publisher's rate (0: window-bound).
    rate: f64,
    size: usize,
    window: u64,
    t0: Instant,
    deadline: Instant,
    drain: Duration,
}

struct PubResult {
    sent: u64,
    last_write: Instant,
}

/// Most publishes written in one go.
const BATCH: u64 = 64;

/// Publishes until the deadline, keeping at most `window` unconfirmed,
/// then waits (bounded) for the last confirmations.
async fn publisher(
    cfg: PubCfg,
    conn: Conn,
    adapter: Arc<dyn Adapter>,
    chans: Arc<Vec<String>>,
    published: Arc<Vec<AtomicU64>>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
) -> PubResult {
    let k = adapter.publishes_per_confirm();
    let sem = Arc::new(Semaphore::new(cfg.window as usize));
    let confirms = Arc::new(AtomicU64::new(0));
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let Conn { stream, mut rs } = conn;
    let (mut rh, mut wh) = stream.into_split();
    let p = cfg.p;
    let reader = {
        let adapter = adapter.clone();
        let sem = sem.clone();
        let confirms = confirms.clone();
        let errors = errors.clone();
        tokio::spawn(async move {
            loop {
                let mut c = 0u64;
                let mut errs = Vec::new();
                let r = rs
                    .read_events(&*adapter, &mut rh, &mut |e| match e {
                        Event::Confirm => c += 1,
                        Event::Error(b) => errs.push(String::from_utf8_lossy(b).into_owned()),
                        _ => {}
                    })
                    .await;
                if c > 0 {
                    confirms.fetch_add(c, Ordering::Relaxed);
                    sem.add_permits((c * k) as usize);
                }
                if !rs.replies.is_empty() {
                    let _ = ctl_tx.send(std::mem::take(&mut rs.replies));
                }
                if !errs.is_empty() {
                    let mut v = errors.lock().unwrap();
                    for e in errs.into_iter().take(10usize.saturating_sub(v.len())) {
                        v.push(format!("publisher {p}: server error {e}"));
                    }
                }
                match r {
                    Ok(Status::Open) => {}
                    Ok(st) => {
                        if !stop.load(Ordering::Relaxed) {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("publisher {p}: connection ended: {st:?}"));
                        }
                        return;
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(format!("publisher {p}: {e}"));
                        return;
                    }
                }
            }
        })
    };

    let mut mask = Mask::new(0xC0FFEE + p as u64);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut sent = 0u64;
    let mut last_write = cfg.t0;
    let deadline = tokio::time::Instant::from_std(cfg.deadline);
    let mut failed = false;
    loop {
        let now = Instant::now();
        if now >= cfg.deadline {
            break;
        }
        let allowed = if cfg.rate > 0.0 {
            let due = ((now - cfg.t0).as_secs_f64() * cfg.rate) as u64 + 1;
            if due <= sent {
                let next = cfg.t0 + Duration::from_secs_f64(sent as f64 / cfg.rate);
                tokio::time::sleep_until(tokio::time::Instant::from_std(next).min(deadline)).await;
                continue;
            }
            due - sent
        } else {
            BATCH
        };
        tokio::select! {
            p = sem.acquire() => p.expect("semaphore").forget(),
            _ = tokio::time::sleep_until(deadline) => break,
        }
        let mut n = 1;
        while n < allowed.min(BATCH) {
            match sem.try_acquire() {
                Ok(p) => {
                    p.forget();
                    n += 1;
                }
                Err(_) => break,
            }
        }
        out.clear();
        while let Ok(b) = ctl_rx.try_recv() {
            out.extend_from_slice(&b);
        }
        for _ in 0..n {
            let ch = channel_of(cfg.p, sent, cfg.publishers, chans.len());
            adapter.publish(
                &mut out,
                &mut mask,
                &chans[ch],
                now_ns(),
                cfg.size,
                Some(sent),
            );
            published[ch].fetch_add(1, Ordering::Relaxed);
            sent += 1;
            if sent % k == 0 {
                adapter.sync(&mut out, &mut mask);
            }
        }
        if let Err(e) = wh.write_all(&out).await {
            errors
                .lock()
                .unwrap()
                .push(format!("publisher {}: write: {e}", cfg.p));
            failed = true;
            break;
        }
        last_write = Instant::now();
    }
    // Confirm the tail, then wait for every confirmation (bounded).
    if !failed {
        out.clear();
        while let Ok(b) = ctl_rx.try_recv() {
            out.extend_from_slice(&b);
        }
        if sent % k != 0 {
            adapter.sync(&mut out, &mut mask);
        }
        if !out.is_empty() && wh.write_all(&out).await.is_err() {
            failed = true;
        }
    }
    let want = sent.div_ceil(k);
    let until = Instant::now() + cfg.drain.max(Duration::from_secs(1));
    while !failed && confirms.load(Ordering::Relaxed) < want && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let got = confirms.load(Ordering::Relaxed);
    if !failed && got < want {
        errors.lock().unwrap().push(format!(
            "publisher {}: {} of {want} confirmations arrived",
            cfg.p, got
        ));
    }
    reader.abort();
    let _ = wh.shutdown().await;
    PubResult { sent, last_write }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_and_expectations() {
        // 10 subscribers over 4 channels: 3,3,2,2.
        let counts: Vec<usize> = (0..4).map(|c| subs_on(c, 10, 4)).collect();
        assert_eq!(counts, [3, 3, 2, 2]);
        assert_eq!(expected_total(&[1, 2, 3, 4], 10), 3 + 6 + 6 + 8);
        // Publishers cover channels round robin.
        let mut seen = [0; 5];
        for p in 0..2 {
            for i in 0..5 {
                seen[channel_of(p, i, 2, 5)] += 1;
            }
        }
        assert_eq!(seen, [2, 2, 2, 2, 2]);
        assert_eq!(channel_of(0, 7, 1, 1), 0);
        // What each publisher must subscribe to (Pusher client events).
        assert_eq!(publisher_channels(0, 1, 3), [0, 1, 2]);
        assert_eq!(publisher_channels(1, 2, 4), [1, 3]);
        assert_eq!(publisher_channels(2, 4, 2), [0]);
        assert_eq!(publisher_channels(1, 2, 5), [0, 1, 2, 3, 4]);
        for (p, pubs, c) in [(0, 3, 9), (2, 4, 6), (5, 16, 1), (3, 16, 100)] {
            let want: std::collections::BTreeSet<usize> =
                (0..1000).map(|i| channel_of(p, i, pubs, c)).collect();
            let got: Vec<usize> = want.into_iter().collect();
            assert_eq!(publisher_channels(p, pubs, c), got);
        }
    }
}
