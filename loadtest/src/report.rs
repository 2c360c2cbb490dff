//! Results: latency summaries, server/client cost, the human-readable
//! table, and `summarize` (herald vs nats medians and ratios).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;

use crate::procstat::{self, Sample};

/// A latency histogram in microseconds, up to 10 minutes.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// Percentiles of a histogram (microseconds).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: (h.mean() * 10.0).round() / 10.0,
        }
    }

    pub fn row(&self) -> String {
        format!(
            "p50 {} / p99 {} / p99.9 {} / max {} us (n={})",
            self.p50_us, self.p99_us, self.p999_us, self.max_us, self.count
        )
    }
}

/// Server cost over a measured window (from /proc/PID).
#[derive(Debug, Clone, Serialize)]
pub struct ServerCost {
    pub pid: u32,
    /// Server processes counted (the nodes of a cluster: CPU and memory
    /// are their sums).
    pub processes: usize,
    /// A cluster's broker (`--broker-pid`): its CPU seconds, and per unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_ns_per_unit: Option<f64>,
    pub cpu_secs: f64,
    /// cpu_secs / window: cores the server kept busy.
    pub cpu_cores: f64,
    /// Server CPU nanoseconds per unit of work (delivery, handshake, cycle).
    pub cpu_ns_per_unit: Option<f64>,
    pub rss_before_kib: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

/// The harness's own cost over the same window.
#[derive(Debug, Clone, Serialize)]
pub struct ClientCost {
    pub cpu_secs: f64,
    pub cpu_cores: f64,
    pub threads: usize,
    /// cpu_secs per unit of work (delivery, handshake, cycle), in ns.
    pub cpu_ns_per_unit: Option<f64>,
    /// Client used over 90% of a core per runtime thread: the numbers
    /// may measure the client, not the server.
    pub client_bound: bool,
    /// Client + server used over 90% of all CPUs: they competed.
    pub machine_saturated: bool,
    /// Share of the busy CPU that was the client's.
    pub client_share: f64,
}

/// Snapshots taken at the start of a measured window.
pub struct CostMeter {
    pid: Option<u32>,
    pids: Vec<u32>,
    broker: Option<(u32, f64)>,
    server0: Option<Sample>,
    client0: f64,
    t0: Instant,
}

impl CostMeter {
    pub fn start(pid: Option<u32>) -> CostMeter {
        Self::cluster(pid, &[], None)
    }

    /// The same over a cluster: `pid` and `others` (summed), and the
    /// broker apart.
    pub fn cluster(pid: Option<u32>, others: &[u32], broker: Option<u32>) -> CostMeter {
        let pids: Vec<u32> = pid.into_iter().chain(others.iter().copied()).collect();
        CostMeter {
            pid,
            server0: procstat::sample_sum(&pids),
            pids,
            broker: broker.and_then(|b| Some((b, procstat::sample(b).ok()?.cpu_secs))),
            client0: procstat::self_cpu_secs(),
            t0: Instant::now(),
        }
    }

    /// Ends the window; `units` is the work done (deliveries, ...).
    pub fn finish(&self, threads: usize, units: u64) -> (Option<ServerCost>, ClientCost) {
        let secs = self.t0.elapsed().as_secs_f64().max(1e-9);
        let client_cpu = procstat::self_cpu_secs() - self.client0;
        let broker_cpu = self.broker.and_then(|(pid, c0)| {
            Some(round3((procstat::sample(pid).ok()?.cpu_secs - c0).max(0.0)))
        });
        let server = match (self.pid, self.server0, procstat::sample_sum(&self.pids)) {
            (Some(pid), Some(a), Some(b)) => {
                let cpu = (b.cpu_secs - a.cpu_secs).max(0.0);
                Some(ServerCost {
                    pid,
                    processes: self.pids.len(),
                    broker_cpu_secs: broker_cpu,
                    broker_ns_per_unit: broker_cpu
                        .filter(|_| units > 0)
                        .map(|c| (c * 1e9 / units as f64).round()),
                    cpu_secs: round3(cpu),
                    cpu_cores: round3(cpu / secs),
                    cpu_ns_per_unit: (units > 0).then(|| (cpu * 1e9 / units as f64).round()),
                    rss_before_kib: a.rss_kib,
                    rss_kib: b.rss_kib,
                    hwm_kib: b.hwm_kib,
                })
            }
            _ => None,
        };
        let client_cores = client_cpu / secs;
        let server_cores = server.as_ref().map_or(0.0, |s| s.cpu_cores);
        let busy = client_cores + server_cores;
        let client = ClientCost {
            cpu_secs: round3(client_cpu),
            cpu_cores: round3(client_cores),
            threads,
            cpu_ns_per_unit: (units > 0).then(|| (client_cpu * 1e9 / units as f64).round()),
            client_bound: client_cores > 0.9 * threads as f64,
            machine_saturated: busy > 0.9 * procstat::cpus() as f64,
            client_share: if busy > 0.0 {
                round3(client_cores / busy)
            } else {
                0.0
            },
        };
        (server, client)
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// What every scenario's report starts with: which run this was.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub scenario: &'static str,
    pub protocol: &'static str,
    pub label: Option<String>,
    pub command: String,
    pub url: String,
}

impl RunInfo {
    pub fn new(
        scenario: &'static str,
        protocol: &'static str,
        label: Option<String>,
        command: String,
        target: &crate::conn::Target,
    ) -> RunInfo {
        let url = format!("ws://{}{}", target.host, target.path);
        RunInfo {
            scenario,
            protocol,
            label,
            command,
            url,
        }
    }
}

/// What every scenario's report ends with: the costs on both sides, the
/// first errors seen, and whether the run is OK (no problem found).
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub server: Option<ServerCost>,
    pub client: ClientCost,
    pub errors: Vec<String>,
    pub ok: bool,
    pub problems: Vec<String>,
}

impl Outcome {
    pub fn new(
        server: Option<ServerCost>,
        client: ClientCost,
        errors: Vec<String>,
        problems: Vec<String>,
    ) -> Outcome {
        Outcome {
            server,
            client,
            errors,
            ok: problems.is_empty(),
            problems,
        }
    }
}

/// A two-column table printed to stdout.
#[derive(Default)]
pub struct Table {
    title: String,
    rows: Vec<(String, String)>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Table {
        Table {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    /// A table titled "COMMAND against PROTOCOL (URL)".
    pub fn for_run(run: &RunInfo) -> Table {
        Table::new(format!(
            "{} against {} ({})",
            run.command, run.protocol, run.url
        ))
    }

    /// The closing rows every scenario prints: costs (per `unit`), errors, result.
    pub fn finish(mut self, o: &Outcome, unit: &str) -> Table {
        self.cost(&o.server, &o.client, unit);
        for e in &o.errors {
            self.row("error", e);
        }
        let result = if o.ok {
            "OK".to_string()
        } else {
            format!("NOT OK: {}", o.problems.join("; "))
        };
        self.row("result", result);
        self
    }

    pub fn row(&mut self, k: impl Into<String>, v: impl std::fmt::Display) -> &mut Table {
        self.rows.push((k.into(), v.to_string()));
        self
    }

    /// Rows for the server and client cost.
    pub fn cost(&mut self, server: &Option<ServerCost>, client: &ClientCost, unit: &str) {
        match server {
            Some(s) => {
                self.row(
                    "server CPU",
                    format!("{:.3} s ({:.2} cores)", s.cpu_secs, s.cpu_cores),
                );
                if let Some(ns) = s.cpu_ns_per_unit {
                    self.row(format!("server CPU per {unit}"), format!("{ns:.0} ns"));
                }
                self.row(
                    "server VmRSS / VmHWM",
                    format!(
                        "{} / {} KiB (before: {} KiB)",
                        s.rss_kib, s.hwm_kib, s.rss_before_kib
                    ),
                );
            }
            None => {
                self.row("server cost", "unknown (pass --server-pid)");
            }
        }
        let mut flags = Vec::new();
        if client.client_bound {
            flags.push("CLIENT-BOUND: client used >90% of its threads");
        }
        if client.machine_saturated {
            flags.push("machine saturated (client + server > 90% of CPUs)");
        }
        self.row(
            "client CPU",
            format!(
                "{:.3} s ({:.2} cores on {} threads, {:.0}% of busy CPU){}{}",
                client.cpu_secs,
                client.cpu_cores,
                client.threads,
                client.client_share * 100.0,
                if flags.is_empty() { "" } else { "  ! " },
                flags.join("; ")
            ),
        );
    }

    pub fn print(&self) {
        let w = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        println!("{}", self.title);
        println!("{}", "-".repeat(self.title.len().max(20)));
        for (k, v) in &self.rows {
            println!("{k:<w$}  {v}");
        }
    }
}

/// A progress bar on stderr, or a hidden one.
pub fn bar(enabled: bool, len: u64, what: &str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Median of some numbers (mean of the two middle ones).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A value at a dotted path of a JSON object, as a number.
pub fn num(v: &Value, path: &str) -> Option<f64> {
    let mut cur = v;
    for k in path.split('.') {
        cur = cur.get(k)?;
    }
    cur.as_f64()
}

/// The metrics `summarize` compares: (label, JSON path, ratio wanted).
const METRICS: &[(&str, &str, bool)] = &[
    ("published/s", "published_per_sec", false),
    ("delivered/s", "delivered_per_sec", true),
    ("missing deliveries", "missing", false),
    ("latency p50 us", "latency.p50_us", false),
    ("latency p99 us", "latency.p99_us", true),
    ("latency p99.9 us", "latency.p999_us", false),
    ("latency max us", "latency.max_us", false),
    ("server CPU ns/UNIT", "server.cpu_ns_per_unit", true),
    ("server CPU cores", "server.cpu_cores", false),
    ("server VmHWM KiB", "server.hwm_kib", false),
    ("handshakes/s", "handshakes_per_sec", true),
    ("handshake p99 us", "handshake_latency.p99_us", false),
    ("RSS per conn bytes", "rss_per_conn_bytes", true),
    ("failed conns", "failed", false),
    ("cycles/s", "cycles_per_sec", true),
    ("client CPU cores", "client.cpu_cores", false),
    ("client CPU ns/UNIT", "client.cpu_ns_per_unit", false),
];

/// Reads every `*.json` result in `dir` and prints, per `label`, the
/// median of each metric for each protocol (or `variant`, when the runs
/// name one) and the ratio of the first to the second (herald/nats).
pub fn summarize(dir: &Path) -> anyhow::Result<()> {
    let mut groups: BTreeMap<String, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    // Column names in order of appearance: "herald", "nats" for compare.sh,
    // or the --variant names.
    let mut names: Vec<String> = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p)?;
        let Ok(v) = serde_json::from_str::<Value>(text.trim()) else {
            eprintln!("skipping {}: not one JSON object", p.display());
            continue;
        };
        let label = v
            .get("label")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let proto = v
            .get("variant")
            .or_else(|| v.get("protocol"))
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        if proto != "floor" && !names.contains(&proto) {
            names.push(proto.clone());
        }
        if !order.contains(&label) {
            order.push(label.clone());
        }
        groups
            .entry(label)
            .or_default()
            .entry(proto)
            .or_default()
            .push(v);
    }
    if names.is_empty() {
        names.push("herald".into());
    }
    if names.len() < 2 {
        names.push("nats".into());
    }
    let (a, b) = (names[0].as_str(), names[1].as_str());
    for label in order {
        let g = &groups[&label];
        // Title from a server's run, not a `floor` run, when there is one.
        let any = g
            .iter()
            .filter(|(p, _)| p.as_str() != "floor")
            .flat_map(|(_, v)| v)
            .chain(g.values().flatten())
            .next()
            .unwrap();
        let scenario = any.get("command").and_then(Value::as_str).unwrap_or("?");
        let unit = match any.get("scenario").and_then(Value::as_str) {
            Some("conns") => "handshake",
            Some("churn") => "cycle",
            _ => "delivery",
        };
        println!();
        println!("== {label}: {scenario}");
        let runs: Vec<String> = g.iter().map(|(p, v)| format!("{p} x{}", v.len())).collect();
        println!("   runs: {}", runs.join(", "));
        for (p, vs) in g {
            for v in vs {
                if let Some(e) = v.get("error").and_then(Value::as_str) {
                    println!("   {p} run failed: {e}");
                }
                if v.get("ok").and_then(Value::as_bool) == Some(false) {
                    let why = v.get("problems").map(|x| x.to_string()).unwrap_or_default();
                    println!("   {p} run NOT OK: {why}");
                }
            }
        }
        // `floor` runs (no server, kernel only) get a column of their own.
        let floor = g.contains_key("floor");
        println!(
            "   {:<24} {:>14} {:>14} {:>14}{}",
            "metric (median)",
            a,
            b,
            format!("{a}/{b}"),
            if floor { "  floor (no server)" } else { "" }
        );
        let med = |proto: &str, path: &str| -> Option<f64> {
            let vs = g.get(proto)?;
            median(vs.iter().filter_map(|v| num(v, path)).collect())
        };
        for (name, path, ratio) in METRICS {
            let h = med(a, path);
            let n = med(b, path);
            let f = if floor { med("floor", path) } else { None };
            if h.is_none() && n.is_none() && f.is_none() {
                continue;
            }
            let fmt = |x: Option<f64>| x.map_or("-".to_string(), fmt_num);
            let r = match (h, n) {
                (Some(h), Some(n)) if *ratio && n != 0.0 => format!("{:.2}", h / n),
                _ => String::new(),
            };
            let name = name.replace("UNIT", unit);
            let f = f.map_or(String::new(), |f| format!(" {:>18}", fmt_num(f)));
            println!("   {:<24} {:>14} {:>14} {:>14}{f}", name, fmt(h), fmt(n), r);
        }
    }
    Ok(())
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 100.0 || x == x.trunc() {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0]), Some(3.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![5.0, 1.0, 3.0]), Some(3.0));
    }

    #[test]
    fn latency_summary() {
        let mut h = new_hist();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        assert_eq!(l.p50_us, 500);
        assert_eq!(l.max_us, 1000);
        assert!(l.p99_us >= 989 && l.p99_us <= 991);
    }

    #[test]
    fn json_paths() {
        let v: Value = serde_json::json!({"a":{"b":2.5},"c":3});
        assert_eq!(num(&v, "a.b"), Some(2.5));
        assert_eq!(num(&v, "c"), Some(3.0));
        assert_eq!(num(&v, "a.x"), None);
    }
}
