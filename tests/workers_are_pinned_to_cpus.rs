//! Each reactor thread (`herald-wN`) is pinned to its own CPU, unless
//! PIN_WORKERS=false.

mod common;

use common::Server;

/// `Cpus_allowed_list` of each `herald-w*` thread, in worker order.
fn worker_cpus(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if let Some(n) = comm.trim().strip_prefix("herald-w") {
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            out.push((n.parse::<usize>().unwrap(), cpus));
        }
    }
    out.sort();
    out.into_iter().map(|(_, c)| c).collect()
}

fn cpus_available() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn each_worker_runs_on_its_own_cpu() {
    let server = Server::open();
    let cpus = worker_cpus(server.pid());
    assert_eq!(cpus.len(), 2, "two worker threads expected: {cpus:?}");
    if cpus_available() >= 2 {
        for c in &cpus {
            assert!(
                c.parse::<usize>().is_ok(),
                "worker not pinned to one CPU: {cpus:?}"
            );
        }
        assert_ne!(cpus[0], cpus[1], "workers share a CPU: {cpus:?}");
    }
}

#[test]
fn pin_workers_false_leaves_threads_unpinned() {
    if cpus_available() < 2 {
        return;
    }
    let server = Server::start(&[("PIN_WORKERS", "false")]);
    let cpus = worker_cpus(server.pid());
    assert_eq!(cpus.len(), 2);
    for c in &cpus {
        assert!(
            c.parse::<usize>().is_err(),
            "worker pinned although PIN_WORKERS=false: {cpus:?}"
        );
    }
}
