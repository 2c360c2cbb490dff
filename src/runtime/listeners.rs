//! The listening sockets: bound here (one SO_REUSEPORT socket per worker
//! on HOST:PORT, the same on HOST:TLS_PORT, and METRICS_ADDR's), or
//! received from the service manager (systemd socket activation:
//! `LISTEN_FDS`, with `LISTEN_FDNAMES` naming the metrics socket `metrics`
//! and a TLS one `tls`). With TLS_CERT and no TLS_PORT (nor a socket named
//! `tls`), the main sockets speak TLS.
//!
//! A received socket is shared with whoever passed it (systemd keeps it
//! open across restarts, queueing connections while no herald runs), so
//! herald stops accepting on it without shutting it down.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::FromRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use super::router::Site;
use crate::config::Config;

/// The sockets herald accepts on.
pub struct Listeners {
    /// Per worker, the sockets it accepts WebSocket and HTTP connections
    /// on, each with what it speaks ([`Site::Main`] or [`Site::Tls`]).
    pub main: Vec<Vec<(TcpListener, Site)>>,
    /// METRICS_ADDR's socket (only /metrics and /health), served by worker 0.
    pub metrics: Option<TcpListener>,
    /// The first main socket's address (for the log).
    pub addr: SocketAddr,
    /// The first TLS socket's address, when it is not `addr`.
    pub tls_addr: Option<SocketAddr>,
    /// Received from the service manager: never shut down here.
    pub inherited: bool,
}

/// Why the sockets cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("socket activation (LISTEN_FDS): {0}")]
    Activation(String),
    #[error("refusing to start without SECRET or AUTHORIZER_URL on the non-loopback address {0} the service manager passed: set one, or ListenStream=127.0.0.1:PORT")]
    OpenModeNotLoopback(SocketAddr),
}

impl ListenError {
    /// A mistake in the configuration (exit code 2), not a failure.
    pub fn is_configuration(&self) -> bool {
        !matches!(self, ListenError::Bind { .. })
    }
}

/// The sockets for `workers` workers: the service manager's, if it passed
/// any, else bound as `config` says.
pub fn open(config: &Config, workers: usize) -> Result<Listeners, ListenError> {
    let passed =
        sd_notify::listen_fds_with_names().map_err(|e| ListenError::Activation(e.to_string()))?;
    let passed: Vec<_> = passed.collect();
    let tls = config.tls_cert.is_some();
    if !passed.is_empty() {
        let listeners = activated(passed, workers, tls)?;
        // Open mode is for loopback only, whoever chose the address.
        if config.open_mode() {
            for (l, _) in &listeners.main[0] {
                match l.local_addr() {
                    Ok(a) if a.ip().is_loopback() => {}
                    Ok(a) => return Err(ListenError::OpenModeNotLoopback(a)),
                    Err(e) => return Err(ListenError::Activation(e.to_string())),
                }
            }
        }
        return Ok(listeners);
    }
    let wanted = SocketAddr::new(config.host(), config.port);
    let bind = |addr: SocketAddr| move |source| ListenError::Bind { addr, source };
    let per_worker = bind_listeners(wanted, workers).map_err(bind(wanted))?;
    let addr = per_worker[0].local_addr().unwrap_or(wanted);
    let main_site = match (tls, config.tls_port) {
        (true, None) => Site::Tls,
        _ => Site::Main,
    };
    let mut main: Vec<Vec<(TcpListener, Site)>> = per_worker
        .into_iter()
        .map(|l| vec![(l, main_site)])
        .collect();
    let mut tls_addr = None;
    if let Some(port) = config.tls_port.filter(|_| tls) {
        let wanted = SocketAddr::new(config.host(), port);
        let socks = bind_listeners(wanted, workers).map_err(bind(wanted))?;
        tls_addr = socks[0].local_addr().ok();
        for (w, l) in main.iter_mut().zip(socks) {
            w.push((l, Site::Tls));
        }
    }
    let metrics = match config.metrics_addr {
        Some(m) => Some(
            listener_socket(m, false)
                .and_then(|s| {
                    s.listen(1024)?;
                    Ok(TcpListener::from(s))
                })
                .map_err(bind(m))?,
        ),
        None => None,
    };
    Ok(Listeners {
        main,
        metrics,
        addr,
        tls_addr,
        inherited: false,
    })
}

/// The service manager's sockets: each worker accepts on every main one.
fn activated(
    passed: Vec<(i32, String)>,
    workers: usize,
    tls: bool,
) -> Result<Listeners, ListenError> {
    let bad = |fd: i32, why: &str| ListenError::Activation(format!("descriptor {fd}: {why}"));
    let mut main = Vec::new();
    let mut metrics = None;
    for (fd, name) in passed {
        // SAFETY: the service manager passed this descriptor to this
        // process (LISTEN_PID), to be owned by it.
        let sock = unsafe { Socket::from_raw_fd(fd) };
        let listening = sock.is_listener().unwrap_or(false);
        let tcp = sock.r#type().is_ok_and(|t| t == Type::STREAM)
            && sock.local_addr().is_ok_and(|a| a.as_socket().is_some());
        if !(listening && tcp) {
            return Err(bad(
                fd,
                "not a listening TCP socket (ListenStream= with an address)",
            ));
        }
        sock.set_nonblocking(true)
            .map_err(|e| bad(fd, &e.to_string()))?;
        match name.as_str() {
            "metrics" => metrics = Some(TcpListener::from(sock)),
            "tls" if tls => main.push((TcpListener::from(sock), Site::Tls)),
            "tls" => {
                return Err(bad(fd, "a socket named tls needs TLS_CERT and TLS_KEY"));
            }
            _ => main.push((TcpListener::from(sock), Site::Main)),
        }
    }
    // TLS_CERT without a socket named tls: the main ones speak TLS.
    if tls && !main.iter().any(|(_, s)| *s == Site::Tls) {
        for (_, site) in main.iter_mut() {
            *site = Site::Tls;
        }
    }
    let Some((first, _)) = main.first() else {
        return Err(ListenError::Activation(
            "no socket for the main port (only one named metrics)".into(),
        ));
    };
    let addr = first
        .local_addr()
        .map_err(|e| ListenError::Activation(e.to_string()))?;
    let tls_addr = main
        .iter()
        .find(|(l, s)| *s == Site::Tls && l.local_addr().ok() != Some(addr))
        .and_then(|(l, _)| l.local_addr().ok());
    let mut per_worker = Vec::with_capacity(workers);
    for _ in 0..workers {
        let socks = main
            .iter()
            .map(|(l, site)| Ok((l.try_clone()?, *site)))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| ListenError::Activation(e.to_string()))?;
        per_worker.push(socks);
    }
    Ok(Listeners {
        main: per_worker,
        metrics,
        addr,
        tls_addr,
        inherited: true,
    })
}

fn listener_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
}

/// Binds one SO_REUSEPORT listener per worker on the same address. A probe
/// bound without SO_REUSEPORT first makes a port already in use an error
/// (instead of silently sharing it with another process) and resolves port 0.
fn bind_listeners(addr: SocketAddr, n: usize) -> io::Result<Vec<TcpListener>> {
    let probe = listener_socket(addr, false)?;
    let addr = probe.local_addr()?.as_socket().unwrap_or(addr);
    drop(probe);
    (0..n)
        .map(|_| {
            let sock = listener_socket(addr, true)?;
            // The kernel caps the backlog at net.core.somaxconn.
            sock.listen(65_535)?;
            Ok(sock.into())
        })
        .collect()
}
