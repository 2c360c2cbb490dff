//! Deploying on Linux (deploy/, README "Deploy on Linux"): the systemd
//! units pass `systemd-analyze verify`; herald serves on the socket a
//! service manager passes (under `systemd-socket-activate`, and across a
//! restart, when connections made meanwhile wait in the socket's queue);
//! it tells the manager when it is ready and when it stops; `cargo deb`
//! builds a package that `dpkg -i` installs, with a stripped binary.

mod common;

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A directory of its own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("herald-deploy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `systemd-analyze verify` on the units in `dir`: (success, stderr).
fn verify(units: &[PathBuf]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .expect("systemd-analyze (scripts/test-deps.sh installs systemd)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of `key=` in a unit file.
fn unit_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let dir = TempDir::new("units");
    let mut units = Vec::new();
    for name in ["herald.socket", "herald.service"] {
        let text = std::fs::read_to_string(repo().join("deploy").join(name)).unwrap();
        // The package's /usr/bin/herald is this build's binary here.
        let text = text.replace("/usr/bin/herald", env!("CARGO_BIN_EXE_herald"));
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let (ok, err) = verify(&units);
    assert!(
        ok && err.trim().is_empty(),
        "systemd-analyze verify:\n{err}"
    );
    let service = std::fs::read_to_string(repo().join("deploy/herald.service")).unwrap();
    assert_eq!(unit_value(&service, "Type").as_deref(), Some("notify"));
    for key in [
        "NoNewPrivileges",
        "ProtectSystem",
        "LimitNOFILE",
        "TimeoutStopSec",
    ] {
        assert!(unit_value(&service, key).is_some(), "{key} missing");
    }
    // systemd waits for the drain: longer than the default SHUTDOWN_TIMEOUT.
    let stop: humantime::Duration = unit_value(&service, "TimeoutStopSec")
        .unwrap()
        .parse()
        .unwrap();
    assert!(Duration::from(stop) > Duration::from_secs(10));
    let socket = std::fs::read_to_string(repo().join("deploy/herald.socket")).unwrap();
    assert_eq!(
        unit_value(&socket, "Service").as_deref(),
        Some("herald.service")
    );
}

#[test]
fn herald_serves_on_the_socket_systemd_socket_activate_passes() {
    let port = free_port();
    let mut child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}"), "--fdname=main"])
        .args(["-E", "WORKERS=2", "-E", "PORT=1", "-E", "LOGLEVEL=info"])
        .arg(env!("CARGO_BIN_EXE_herald"))
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (scripts/test-deps.sh installs systemd)");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    // It listens first, then runs herald on the first connection.
    let start = Instant::now();
    let stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < TIMEOUT => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("systemd-socket-activate never listened: {e}"),
        }
    };
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut sub = Client::handshake(stream, addr, "/ws", &[]).expect("upgrade");
    sub.subscribe("news");
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut publisher = Client::handshake(stream, addr, "/ws", &[]).expect("upgrade");
    publisher.publish("news", json!("through systemd's socket"));
    let m = sub.next_json("the message");
    assert_eq!(m["data"], "through systemd's socket", "{m}");
    // Gone before the stop, so that it does not wait for their close.
    drop((sub, publisher));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("LISTEN_FDS") && !err.contains(":1 "), "{err}");
}

#[test]
fn connections_made_while_herald_restarts_wait_in_the_sockets_queue() {
    // The test holds the listening socket, as systemd does.
    let socket = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let mut first = Server::start_activated(&[], &socket);
    assert_eq!(first.addr, addr);
    let mut c = Client::connect(&first, "/ws");
    c.subscribe("news");
    first.signal(libc::SIGTERM);
    let (code, _) = c.expect_close();
    assert_eq!(code, 1001);
    let _ = c.ws.flush();
    assert!(first.wait_exit(TIMEOUT).success());
    // No herald runs: the kernel still completes the TCP handshake, and the
    // upgrade request waits in the socket's queue.
    let waiting = TcpStream::connect(addr).expect("the socket still listens");
    waiting.set_read_timeout(Some(TIMEOUT)).unwrap();
    let upgrade = std::thread::spawn(move || Client::handshake(waiting, addr, "/ws", &[]).is_ok());
    let second = Server::start_activated(&[], &socket);
    assert!(
        upgrade.join().unwrap(),
        "the waiting connection was upgraded"
    );
    let mut c = Client::connect(&second, "/ws");
    c.subscribe("news");
}

#[test]
fn a_socket_named_metrics_serves_metrics_and_the_main_one_no_longer_does() {
    let main = TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = activated_command_with(&[(&main, "main"), (&metrics, "metrics")]);
    let mut child = cmd
        .env_clear()
        .env("WORKERS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut child);
    let get = |addr| http(addr, "GET", "/metrics", &[], b"").0;
    // The sockets already listen: the requests wait until herald serves.
    assert_eq!(get(metrics.local_addr().unwrap()), 200);
    assert_eq!(get(main.local_addr().unwrap()), 404);
}

#[test]
fn open_mode_on_a_public_address_passed_by_the_manager_exits_2() {
    let socket = TcpListener::bind("0.0.0.0:0").unwrap();
    let mut cmd = activated_command(&socket);
    let out = cmd
        .env_clear()
        .env("WORKERS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("SECRET") && err.contains("0.0.0.0"), "{err}");
}

#[test]
fn readiness_and_stopping_are_told_to_the_service_manager() {
    let dir = TempDir::new("notify");
    let path = dir.0.join("notify.sock");
    let manager = UnixDatagram::bind(&path).unwrap();
    manager.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut server = Server::start(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).expect("READY=1 within the timeout");
    assert_eq!(
        &buf[..n],
        b"READY=1\n",
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Ready means accepting: a client gets in.
    let mut c = Client::connect(&server, "/ws");
    server.signal(libc::SIGTERM);
    let (code, _) = c.expect_close();
    assert_eq!(code, 1001);
    let _ = c.ws.flush();
    let n = manager.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    assert!(server.wait_exit(TIMEOUT).success());
}

/// The section names of a 64-bit little-endian ELF file.
fn elf_sections(elf: &[u8]) -> Vec<String> {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&elf[..5], b"\x7fELF\x02", "a 64-bit ELF file");
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let names_at = u64_at(header(shstrndx) + 0x18);
    (0..shnum)
        .map(|i| {
            let start = names_at + u32_at(header(i));
            let end = start + elf[start..].iter().position(|&b| b == 0).unwrap();
            String::from_utf8_lossy(&elf[start..end]).into_owned()
        })
        .collect()
}

/// The release profile ships no debug information; the profiling one
/// keeps it.
#[test]
fn the_release_profile_strips_and_the_profiling_one_keeps_symbols() {
    let manifest: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let profile = |name: &str| manifest["profile"][name].as_table().unwrap().clone();
    let release = profile("release");
    assert_eq!(release["debug"].as_bool(), Some(false));
    assert_eq!(release["strip"].as_str(), Some("symbols"));
    let profiling = profile("profiling");
    assert_eq!(profiling["inherits"].as_str(), Some("release"));
    assert_eq!(profiling["strip"].as_str(), Some("none"));
    assert_eq!(profiling["debug"].as_integer(), Some(1));
    let check = profile("package-check");
    assert!(!check.contains_key("debug") && !check.contains_key("strip"));
}

#[test]
fn the_debian_package_installs_a_stripped_binary_the_units_and_the_configuration() {
    // Root installs for real, as an operator would (CI runs as root).
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "dpkg -i needs root: run the suite as root"
    );
    let out_dir = repo().join("target/deb-check");
    let _ = std::fs::remove_dir_all(&out_dir);
    let built = Command::new(env!("CARGO"))
        .args(["deb", "--profile", "package-check", "--output"])
        .arg(&out_dir)
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .expect("cargo deb (scripts/test-deps.sh installs cargo-deb)");
    assert!(
        built.status.success(),
        "cargo deb failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for file in [
        "./usr/bin/herald",
        "./usr/lib/systemd/system/herald.service",
        "./usr/lib/systemd/system/herald.socket",
        "./etc/herald/herald.toml",
        "./etc/herald/herald.env",
    ] {
        assert!(
            listing.contains(file),
            "{file} not in the package:\n{listing}"
        );
    }
    let env_line = listing.lines().find(|l| l.ends_with("herald.env")).unwrap();
    assert!(env_line.starts_with("-rw-------"), "{env_line}");
    let installed = Command::new("dpkg").arg("-i").arg(&deb).output().unwrap();
    assert!(
        installed.status.success(),
        "dpkg -i:\n{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    let check = || -> Result<(), String> {
        let v = Command::new("/usr/bin/herald")
            .arg("--version")
            .output()
            .unwrap();
        let v = String::from_utf8_lossy(&v.stdout);
        if !v.starts_with("herald ") {
            return Err(format!("herald --version: {v}"));
        }
        let binary = std::fs::read("/usr/bin/herald").unwrap();
        let sections = elf_sections(&binary);
        if !sections.iter().any(|s| s == ".text") {
            return Err(format!("not an ELF binary with .text: {sections:?}"));
        }
        if let Some(s) = sections
            .iter()
            .find(|s| s.starts_with(".debug_") || *s == ".symtab")
        {
            return Err(format!("{s} in the installed binary: {sections:?}"));
        }
        let units = [
            PathBuf::from("/usr/lib/systemd/system/herald.socket"),
            PathBuf::from("/usr/lib/systemd/system/herald.service"),
        ];
        let (ok, err) = verify(&units);
        if !ok || !err.trim().is_empty() {
            return Err(format!("installed units: {err}"));
        }
        // The installed configuration is one herald reads.
        let p = Command::new("/usr/bin/herald")
            .arg("--print-config")
            .env_clear()
            .env("CONFIG", "/etc/herald/herald.toml")
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&p.stdout);
        if !p.status.success() || !printed.contains("/etc/herald/herald.toml line") {
            return Err(format!(
                "--print-config: {printed}{}",
                String::from_utf8_lossy(&p.stderr)
            ));
        }
        Ok(())
    };
    let result = check();
    let purged = Command::new("dpkg")
        .args(["-P", "herald"])
        .output()
        .unwrap();
    result.unwrap();
    assert!(purged.status.success());
    assert!(!Path::new("/usr/bin/herald").exists());
}
