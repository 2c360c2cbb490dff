//! At start herald raises its soft RLIMIT_NOFILE to what MAX_CONNECTIONS (and MAX_PENDING)
//! needs (up to the hard limit), and warns, naming the shortfall, when the
//! hard limit is too low.

mod common;

use common::Server;

/// The (soft, hard) "Max open files" of a process, from /proc/PID/limits.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

fn hard_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_max
}

#[test]
fn soft_limit_is_raised_to_what_max_connections_needs() {
    let hard = hard_limit();
    assert!(
        hard >= 2000,
        "this test needs a hard limit of at least 2000 (have {hard})"
    );
    let server = Server::start_with_nofile_limit(
        &[("MAX_CONNECTIONS", "1000"), ("MAX_PENDING", "100")],
        256,
    );
    let (soft, _) = nofile(server.pid());
    assert!(
        soft >= 1000 + 100 + 256,
        "soft limit {soft} was not raised for 1000 connections"
    );
    assert!(
        !server.log().contains("RLIMIT_NOFILE allows"),
        "{}",
        server.log()
    );
}

#[test]
fn a_hard_limit_below_the_need_is_used_and_reported() {
    let hard = hard_limit();
    let wanted = hard * 2;
    let server = Server::start_with_nofile_limit(&[("MAX_CONNECTIONS", &wanted.to_string())], 256);
    let (soft, _) = nofile(server.pid());
    assert_eq!(soft, hard, "soft limit should be raised to the hard limit");
    let log = server.log();
    assert!(
        log.contains(&format!("MAX_CONNECTIONS={wanted}"))
            && log.contains(&format!("RLIMIT_NOFILE allows {hard}")),
        "no warning naming the shortfall: {log}"
    );
}
