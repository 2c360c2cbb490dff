//! Process cost from /proc (server CPU, VmRSS, VmHWM) and getrusage (the
//! harness's own CPU), plus the open-file limit.

use std::io;

/// CPU ticks and memory of one process at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// user + system CPU seconds of all its threads so far.
    pub cpu_secs: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
}

/// `utime` and `stime` (fields 14 and 15, in clock ticks) of a
/// /proc/PID/stat line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after the last `)`.
pub fn parse_stat(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.rfind(')')? + 1..];
    let mut it = rest.split_ascii_whitespace();
    // rest starts at field 3 (state); utime is field 14.
    let utime = it.nth(11)?.parse().ok()?;
    let stime = it.next()?.parse().ok()?;
    Some((utime, stime))
}

/// `VmRSS` and `VmHWM` (KiB) of a /proc/PID/status text.
pub fn parse_status(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> u64 {
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Reads /proc/PID/stat and /proc/PID/status.
pub fn sample(pid: u32) -> io::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "unreadable /proc/PID/stat");
    let (u, s) = parse_stat(&stat).ok_or_else(bad)?;
    let (rss, hwm) = parse_status(&status);
    Ok(Sample {
        cpu_secs: (u + s) as f64 / clk_tck() as f64,
        rss_kib: rss.unwrap_or(0),
        hwm_kib: hwm.unwrap_or(0),
    })
}

/// The server's sample, or `None` without `--server-pid` (or once it died).
pub fn sample_opt(pid: Option<u32>) -> Option<Sample> {
    pid.and_then(|p| sample(p).ok())
}

/// The sum of several processes' samples (the nodes of a cluster); `None`
/// if any cannot be read or there is none.
pub fn sample_sum(pids: &[u32]) -> Option<Sample> {
    let mut total: Option<Sample> = None;
    for &p in pids {
        let s = sample(p).ok()?;
        total = Some(match total {
            None => s,
            Some(t) => Sample {
                cpu_secs: t.cpu_secs + s.cpu_secs,
                rss_kib: t.rss_kib + s.rss_kib,
                hwm_kib: t.hwm_kib + s.hwm_kib,
            },
        });
    }
    total
}

/// This process's user + system CPU seconds (getrusage, microseconds).
pub fn self_cpu_secs() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns it.
pub fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return rl.rlim_max;
            }
        }
    }
    rl.rlim_cur
}

/// Online CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1516 0 0 0 \
                    731 129 0 0 20 0 3 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_stat(line), Some((731, 129)));
        assert_eq!(parse_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_gives_rss_and_hwm() {
        let text = "Name:\therald\nVmPeak:\t  900 kB\nVmHWM:\t    5120 kB\nVmRSS:\t    4096 kB\nThreads:\t3\n";
        assert_eq!(parse_status(text), (Some(4096), Some(5120)));
        assert_eq!(parse_status("Name: x\n"), (None, None));
    }

    #[test]
    fn own_process_is_readable() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib);
        assert!(self_cpu_secs() >= 0.0);
        assert!(clk_tck() > 0);
    }
}
