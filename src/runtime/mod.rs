//! Process start-up and shutdown: file-descriptor limit, listeners, one
//! pinned reactor thread per worker, signals.
//!
//! Every worker owns a listener bound to the same address with
//! SO_REUSEPORT, so the kernel spreads connections over the cores with no
//! acceptor thread; or, under a service manager's socket activation, every
//! worker accepts on the sockets it passed ([`listeners`]). Each runs a monoio runtime on io_uring, or on epoll
//! where io_uring cannot be set up (said once in the log). SIGINT/SIGTERM
//! stop accepting, close every connection with 1001 after flushing what
//! is queued, and exit within SHUTDOWN_TIMEOUT; a second signal exits at once.
//! SIGHUP reloads the TLS certificate; SIGUSR2 restarts without dropping
//! anyone ([`restart`]): a new process takes the sockets, then this one
//! closes its connections over DRAIN_SECONDS.

pub mod listeners;
pub mod logs;
pub mod restart;
pub mod router;

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crossbeam_channel::Sender;
use monoio::net::TcpListener;

use crate::clock;
use crate::config::{Config, IoDriver};
use crate::engine::core::owner_of;
use crate::engine::history::HistorySink;
use crate::engine::message::route_hash;
use crate::frontends::{FrontEnds, Loaded};
use crate::integrations::cluster::Cluster;
use crate::integrations::database::{Database, Tables};
use crate::integrations::handoff;
use crate::integrations::history_disk::{DiskError, HistoryDisk, Keeping};
use crate::integrations::metrics::Metrics;
use crate::worker::{Shared, StoredHistory, Worker};
use router::{Endpoints, Site};

/// Submission queue entries per io_uring (a fan-out queues one write per subscriber).
const URING_ENTRIES: u32 = 4096;
/// Cross-core messages delivered before yielding to other tasks.
const DRAIN_BATCH: usize = 4096;
/// File descriptors kept aside for listeners, io_uring, eventfds and HTTP clients.
const SPARE_FDS: u64 = 256;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Listen(#[from] listeners::ListenError),
    #[error(transparent)]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error("cannot start worker thread: {0}")]
    Thread(io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(io::Error),
    #[error("worker {0} stopped unexpectedly: {1}")]
    WorkerFailed(usize, String),
    #[error(transparent)]
    History(#[from] crate::integrations::history_disk::DiskError),
    #[error(transparent)]
    Cluster(#[from] crate::integrations::cluster::ClusterError),
    #[error(transparent)]
    Database(#[from] crate::integrations::database::DatabaseError),
}

enum Event {
    Ready,
    Signal,
    /// SIGUSR2: start a successor and hand it the sockets.
    Restart,
    /// The successor (this pid) accepts: drain and exit.
    HandedOver(u32),
    /// The successor waits for the history file: close everything now and
    /// exit, releasing it.
    ReleaseHistory(u32),
    RestartFailed(String),
    Exited(usize, Result<(), String>),
}

/// Runs herald until SIGINT/SIGTERM.
pub fn run(mut config: Config, loaded: impl Into<Loaded>) -> Result<(), ServerError> {
    if config.broker_url.is_some() && config.node_id.is_none() {
        config.node_id = Some(random_node_id());
    }
    raise_nofile_limit(config.max_connections, config.max_pending);
    let workers = config.worker_count();
    let certified = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            Some(Arc::new(crate::transport::tls::Certified::load(cert, key)?))
        }
        _ => None,
    };
    let listeners = listeners::open(&config, workers)?;
    let addr = listeners.addr;
    let inherited = listeners.inherited;
    if inherited {
        tracing::info!("serving the sockets the service manager passed (LISTEN_FDS); HOST, PORT and METRICS_ADDR do not apply");
    }
    let tls_addr = listeners.tls_addr;
    let handover = handover_of(&listeners).map_err(ServerError::Thread)?;
    let mut metrics_listener = listeners.metrics;
    if let Some(m) = &metrics_listener {
        if let Ok(a) = m.local_addr() {
            tracing::info!("serving /metrics and /health at {a}");
        }
    }
    let shutdown_timeout = config.shutdown_timeout;
    let pin = config.pin_workers;
    let loaded: Loaded = loaded.into();
    let ids: Vec<&str> = loaded.apps.iter().map(|a| a.id.as_str()).collect();
    let slots = match loaded.apps_from_database {
        true => crate::frontends::pusher::apps::MAX_DATABASE_APPS,
        false => ids.len(),
    };
    let metrics = Arc::new(Metrics::with_app_slots(workers, &ids, slots));
    let frontends = Arc::new(FrontEnds::new(&config, loaded, &metrics));
    // A restart's successor on a single node: the old process's history
    // (or, with HISTORY_DIR, its file, closed for this one) before anyone
    // is accepted. In a cluster the history is the broker's.
    let mut link = restart::take_link().filter(|_| config.broker_url.is_none());
    let mut handed = None;
    if let Some(l) = link.as_mut() {
        let owner = |key: &str| owner_of(route_hash(key), workers);
        match handoff::receive_state(l, workers, owner, clock::now_ms()) {
            Ok(state) => handed = Some(state),
            Err(e) => {
                tracing::warn!("{e}: starting without the old process's history");
                link = None;
            }
        }
    }
    let durable = Arc::new(crate::worker::durable_store(&config));
    let keeping = Keeping {
        rules: config.history.clone(),
        durable: durable.clone(),
    };
    let disk = match &config.history_dir {
        Some(dir) => {
            let open = || {
                HistoryDisk::open(
                    dir,
                    &keeping,
                    clock::now_ms(),
                    workers,
                    |key| owner_of(route_hash(key), workers),
                    crate::frontends::reoffset,
                    &metrics,
                )
            };
            let mut opened = open();
            // A restart's successor: the old process holds the file until
            // it has closed its connections and exits.
            if matches!(opened, Err(DiskError::Locked(_))) && restart::is_successor() {
                restart::ask_for_history();
                let until = std::time::Instant::now() + Duration::from_secs(60);
                while matches!(opened, Err(DiskError::Locked(_)))
                    && std::time::Instant::now() < until
                {
                    std::thread::sleep(Duration::from_millis(20));
                    opened = open();
                }
            }
            let (disk, restored) = opened.map_err(ServerError::History)?;
            Some((disk, restored))
        }
        None => None,
    };
    let history_disk = disk.as_ref().map(|d| d.0.clone());
    let mut stored = StoredHistory {
        durable: Some(durable.clone()),
        ..StoredHistory::default()
    };
    if let Some((d, streams)) = disk {
        stored.sink = Some(d as Arc<dyn HistorySink>);
        stored.streams = streams;
    }
    if let Some(state) = handed.as_mut() {
        stored.streams.resize_with(workers, Vec::new);
        for (mine, theirs) in stored
            .streams
            .iter_mut()
            .zip(std::mem::take(&mut state.streams))
        {
            mine.extend(theirs);
        }
        stored.keys = std::mem::take(&mut state.keys);
        let refused = durable.restore(std::mem::take(&mut state.durable));
        if refused > 0 {
            tracing::warn!(
                refused,
                "durable subscriptions over PERSONAL_MAX_CHANNELS left out"
            );
        }
    }
    let shared = Shared::build(
        config,
        workers,
        crate::frontends::ENCODERS,
        Some(crate::frontends::NAMESPACED_HISTORY),
        stored,
        metrics,
    );
    // Before any worker sequences: what this process numbers goes to the
    // old one too while it drains.
    if let (Some(l), Some(state)) = (link, handed) {
        handoff::Successor::start(l, shared.hub.clone(), state).map_err(ServerError::Thread)?;
    }
    if let Some(url) = &shared.config.broker_url {
        let node = shared.config.node_id.as_deref().unwrap_or("");
        let window = shared.config.idempotency_window.as_millis() as u64;
        let broker = shared.metrics.broker.clone();
        let cluster = Cluster::start(url, node, shared.hub.clone(), broker, window)?;
        shared.hub.join_cluster(cluster.clone());
        frontends.join_cluster(&(cluster as Arc<dyn crate::engine::core::Broker>));
        tracing::info!(node, "in a cluster through {}", url.redacted());
    }
    if let Some(url) = &shared.config.database_url {
        let db = start_database(url, &shared, &frontends)?;
        let _ = shared.database.set(db);
    }
    let uring = match shared.config.io_driver {
        IoDriver::Epoll => false,
        IoDriver::IoUring | IoDriver::Auto => {
            let available = monoio::utils::detect_uring();
            if !available {
                tracing::warn!("io_uring is not available here; using the epoll driver");
            }
            available
        }
    };
    if let Some(c) = certified {
        let _ = shared.tls.set(c);
    }
    shared
        .metrics_apart
        .store(metrics_listener.is_some(), Ordering::Relaxed);
    if let Some(w) = shared.config.unauthenticated_warning() {
        tracing::warn!("{w}");
    }
    if let Some(w) = shared.config.weak_secret() {
        tracing::warn!("{w}");
    }

    let (tx, rx) = crossbeam_channel::unbounded::<Event>();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut threads = Vec::with_capacity(workers);
    for (id, listener) in listeners.main.into_iter().enumerate() {
        let core = if pin && !cores.is_empty() {
            Some(cores[id % cores.len()])
        } else {
            None
        };
        let shared = shared.clone();
        let frontends = frontends.clone();
        let tx = tx.clone();
        let metrics = if id == 0 {
            metrics_listener.take()
        } else {
            None
        };
        let handle = std::thread::Builder::new()
            .name(format!("herald-w{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let sockets = Sockets {
                        main: listener,
                        metrics,
                        inherited,
                    };
                    run_worker(id, shared, &frontends, sockets, uring, &tx)
                }));
                let res = match res {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("panicked".to_string()),
                };
                let _ = tx.send(Event::Exited(id, res));
            })
            .map_err(ServerError::Thread)?;
        threads.push(handle);
    }

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR2,
    ])
    .map_err(ServerError::Signals)?;
    let sig_tx = tx.clone();
    let reloading = shared.clone();
    std::thread::Builder::new()
        .name("herald-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    reload(&reloading);
                    continue;
                }
                let ev = match sig {
                    signal_hook::consts::SIGUSR2 => Event::Restart,
                    _ => Event::Signal,
                };
                if sig_tx.send(ev).is_err() {
                    break;
                }
            }
        })
        .map_err(ServerError::Thread)?;

    let mut ready = 0;
    let mut failure = None;
    let mut restarting = false;
    let mut predecessor: Option<Arc<handoff::Predecessor>> = None;
    while let Ok(ev) = rx.recv() {
        match ev {
            Event::Ready => {
                ready += 1;
                if ready == workers {
                    let driver = if uring { "io_uring" } else { "epoll" };
                    tracing::info!(workers, driver, "herald listening on {addr}");
                    if let Some(t) = tls_addr {
                        tracing::info!("TLS (wss://, https://) on {t}");
                    }
                    // A restart's successor tells the old process first
                    // (and the service manager its new main pid).
                    restart::tell_ready();
                    // Type=notify units start their dependents now.
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                }
            }
            Event::Signal => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                tracing::info!(
                    "shutting down: closing connections (at most {:?})",
                    shutdown_timeout
                );
                break;
            }
            Event::Restart if restarting => {
                tracing::warn!("SIGUSR2: a restart is already under way");
            }
            Event::Restart if shared.hub.handoff.tapping() => {
                tracing::warn!(
                    "SIGUSR2: the process this one replaced still drains; restart again once it has exited"
                );
            }
            Event::Restart => {
                restarting = true;
                tracing::info!("SIGUSR2: starting the new process");
                let tx = tx.clone();
                let link = handover.start(move |step| {
                    let _ = tx.send(match step {
                        restart::Step::History(pid) => Event::ReleaseHistory(pid),
                        restart::Step::Ready(pid) => Event::HandedOver(pid),
                        restart::Step::Failed(why) => Event::RestartFailed(why),
                    });
                });
                // On a single node the two processes are linked for the
                // drain; in a cluster the broker already joins them.
                if let Some(link) = link.filter(|_| shared.config.broker_url.is_none()) {
                    let s = shared.clone();
                    let lost = move |handoff::OldEvent::LostAfterHandover| {
                        s.drain_ms.store(0, Ordering::Release);
                    };
                    let disk = history_disk.clone();
                    match handoff::Predecessor::start(link, shared.hub.clone(), disk, lost) {
                        Ok(p) => predecessor = Some(p),
                        Err(e) => tracing::warn!("the link to the new process: {e}"),
                    }
                }
            }
            Event::RestartFailed(why) => {
                restarting = false;
                tracing::error!("restart given up, this process keeps serving: {why}");
            }
            Event::ReleaseHistory(pid) => {
                tracing::info!(
                    "the new process ({pid}) waits for HISTORY_DIR's file, which one process holds at a time: closing every connection now and exiting"
                );
                // It will tell systemd it is ready only after this process
                // is gone: say now that it is the main process, so that
                // this one's exit does not end the service.
                let _ = sd_notify::notify(&[sd_notify::NotifyState::MainPid(pid)]);
                shared.drain_ms.store(0, Ordering::Release);
                shared.handed_over.store(true, Ordering::Release);
                break;
            }
            Event::HandedOver(pid) => {
                if let Some(p) = &predecessor {
                    p.handed_over();
                }
                tracing::info!(
                    "the new process ({pid}) accepts: closing connections over {:?} (DRAIN_SECONDS)",
                    shared.drain()
                );
                shared.handed_over.store(true, Ordering::Release);
                break;
            }
            Event::Exited(id, res) => {
                let why = res.err().unwrap_or_else(|| "exited".into());
                tracing::error!(worker = id, "worker stopped: {why}");
                failure = Some(ServerError::WorkerFailed(id, why));
                break;
            }
        }
    }
    shared.begin_shutdown();
    let draining = shared.handed_over.load(Ordering::Acquire);
    let deadline = std::time::Instant::now()
        + shutdown_timeout
        + if draining {
            shared.drain()
        } else {
            Duration::ZERO
        }
        + Duration::from_secs(1);
    let mut running = workers - usize::from(failure.is_some());
    while running > 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Exited(..)) => running -= 1,
            Ok(Event::Signal) => {
                tracing::warn!("second signal: exiting now");
                std::process::exit(1);
            }
            Ok(
                Event::Ready
                | Event::Restart
                | Event::HandedOver(_)
                | Event::ReleaseHistory(_)
                | Event::RestartFailed(_),
            ) => {}
            Err(_) => {
                tracing::warn!("shutdown timed out with {running} worker(s) still draining");
                break;
            }
        }
    }
    if running == 0 {
        for t in threads {
            let _ = t.join();
        }
    }
    // What this process forwarded last reaches the new one.
    if let Some(p) = predecessor {
        p.finish();
    }
    // Every core has stopped sequencing: write what is queued and mark the
    // history clean, so the next start continues its epochs.
    if let Some(disk) = history_disk {
        if running == 0 {
            disk.stop(shutdown_timeout.max(Duration::from_secs(1)));
        }
    }
    match failure {
        Some(e) => Err(e),
        None => {
            tracing::info!("herald stopped");
            Ok(())
        }
    }
}

/// Starts reading the configuration kept in the database, and waits (a
/// bounded time) for the first read, so that the node does not start by
/// refusing every key it will know a moment later.
fn start_database(
    url: &str,
    shared: &Shared,
    frontends: &FrontEnds,
) -> Result<Arc<Database>, ServerError> {
    let keys = frontends.wspubsub.as_ref().map(|w| w.keys().clone());
    let apps_from_database = frontends
        .pusher
        .clone()
        .filter(|_| frontends.apps_from_database);
    let wants_apps = apps_from_database.is_some();
    let metrics = shared.metrics.clone();
    let (first, read) = crossbeam_channel::bounded::<()>(1);
    let apply = move |tables: Tables| {
        if let (Some(pusher), Some(rows)) = (&apps_from_database, tables.apps) {
            for p in pusher.apps.replace_json(&rows) {
                tracing::warn!("herald_apps: left out: {p}");
            }
            metrics.set_app_names(pusher.apps.names());
        }
        if let (Some(keys), Some(rows)) = (&keys, tables.api_keys) {
            let rows = rows.into_iter().map(|r| (r.domain, r.apikey, r.active));
            let (set, skipped) = crate::frontends::wspubsub::keys::from_rows(rows);
            if skipped > 0 {
                tracing::warn!(
                    skipped,
                    "apikeys: rows left out (invalid domain or key, or a key twice)"
                );
            }
            tracing::debug!(keys = set.len(), "API keys read from the database");
            keys.replace(set);
        }
        let _ = first.try_send(());
    };
    let db = Database::start(
        url,
        shared.config.database_refresh,
        wants_apps,
        shared.metrics.database.clone(),
        apply,
    )?;
    let shown = crate::config::without_credentials(url);
    match read.recv_timeout(Duration::from_secs(5)) {
        Ok(()) => tracing::info!("configuration read from the database at {shown}"),
        Err(_) => tracing::warn!(
            "the database at {shown} did not answer in time: starting without its configuration, which is read as soon as it answers"
        ),
    }
    Ok(db)
}

/// A copy of every listening socket, named, for a restart's successor:
/// each worker's own (bound here), or the service manager's (shared by
/// all workers, so worker 0's copies name them all).
fn handover_of(listeners: &listeners::Listeners) -> io::Result<restart::Handover> {
    let lists = match listeners.inherited {
        true => &listeners.main[..1],
        false => &listeners.main[..],
    };
    let mut sockets = Vec::new();
    for list in lists {
        for (l, site) in list {
            let name = match site {
                Site::Tls => "tls",
                _ => "main",
            };
            sockets.push((std::os::fd::OwnedFd::from(l.try_clone()?), name));
        }
    }
    if let Some(m) = &listeners.metrics {
        sockets.push((std::os::fd::OwnedFd::from(m.try_clone()?), "metrics"));
    }
    restart::Handover::new(sockets)
}

/// SIGHUP: reads TLS_CERT and TLS_KEY again (new handshakes present the
/// new certificate; open connections keep theirs). A bad file keeps the
/// current certificate.
fn reload(shared: &Shared) {
    let Some(certified) = shared.tls.get() else {
        tracing::info!("SIGHUP: nothing to reload (no TLS_CERT)");
        return;
    };
    match certified.reload() {
        Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
        Err(e) => {
            tracing::error!("SIGHUP: TLS certificate not reloaded, keeping the current one: {e}")
        }
    }
}

/// A node name for a cluster member started without NODE_ID.
fn random_node_id() -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::fill(&mut b);
    b.iter().fold(String::from("node-"), |mut s, x| {
        s.push_str(&format!("{x:02x}"));
        s
    })
}

/// Raises RLIMIT_NOFILE's soft limit to what MAX_CONNECTIONS and
/// MAX_PENDING need (up to the hard limit) and warns when the hard limit
/// is too low.
fn raise_nofile_limit(max_connections: usize, max_pending: usize) {
    let needed = (max_connections + max_pending) as u64 + SPARE_FDS;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur >= needed {
        return;
    }
    let target = needed.min(lim.rlim_max);
    if target > lim.rlim_cur {
        let new = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            lim.rlim_cur = target;
        }
    }
    if lim.rlim_cur < needed {
        tracing::warn!(
            "MAX_CONNECTIONS={max_connections} (with MAX_PENDING={max_pending}) needs about {needed} open files but RLIMIT_NOFILE allows {}: \
             with MAX_PENDING connections in their handshake, about {} WebSocket connections fit \
             (raise the hard limit: ulimit -Hn, LimitNOFILE=; or lower MAX_PENDING)",
            lim.rlim_cur,
            lim.rlim_cur.saturating_sub(SPARE_FDS + max_pending as u64)
        );
    } else {
        tracing::debug!("RLIMIT_NOFILE raised to {}", lim.rlim_cur);
    }
}

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// One worker's listening sockets.
struct Sockets {
    main: Vec<(std::net::TcpListener, Site)>,
    metrics: Option<std::net::TcpListener>,
    /// Shared with the service manager: stop accepting, never shut down.
    inherited: bool,
}

fn run_worker(
    id: usize,
    shared: Arc<Shared>,
    frontends: &FrontEnds,
    sockets: Sockets,
    uring: bool,
    events: &Sender<Event>,
) -> io::Result<()> {
    if uring {
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(URING_ENTRIES)
            .enable_timer()
            .build()
        {
            Ok(mut rt) => return rt.block_on(worker_main(id, shared, frontends, sockets, events)),
            Err(e) => {
                if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::warn!("io_uring setup failed ({e}); using the epoll driver");
                }
            }
        }
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()?;
    rt.block_on(worker_main(id, shared, frontends, sockets, events))
}

/// Yields once to the other tasks of this thread.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

async fn worker_main(
    id: usize,
    shared: Arc<Shared>,
    frontends: &FrontEnds,
    sockets: Sockets,
    events: &Sender<Event>,
) -> io::Result<()> {
    let worker = Rc::new(Worker::new(id, shared.clone()));
    let endpoints = crate::frontends::endpoints(id, &shared, frontends);
    let mut owned_fds = Vec::new();
    let mut addrs = Vec::new();
    let all = sockets
        .main
        .into_iter()
        .chain(sockets.metrics.map(|m| (m, Site::Metrics)));
    for (listener, site) in all {
        let listener = TcpListener::from_std(listener)?;
        if !sockets.inherited {
            owned_fds.push(listener.as_raw_fd());
        }
        addrs.extend(listener.local_addr().ok());
        monoio::spawn(accept_loop(
            worker.clone(),
            endpoints.clone(),
            listener,
            site,
        ));
    }
    monoio::spawn(timer_loop(worker.clone(), endpoints));
    if !shared.config.write_delay.is_zero() {
        monoio::spawn(flush_loop(worker.clone()));
    }
    shared.ready.fetch_add(1, Ordering::AcqRel);
    let _ = events.send(Event::Ready);

    // This task delivers what other cores publish, until shutdown.
    while !shared.is_shutting_down() {
        worker.core.wait_for_messages().await;
        while worker.core.drain(DRAIN_BATCH) && !shared.is_shutting_down() {
            yield_now().await;
        }
    }

    // Stop accepting. A socket of our own is shut down, so that the
    // kernel refuses what would wait in its queue; one the service manager
    // passed stays open for the next herald.
    worker.stop_accepting();
    // After a restart's handover the sockets are the successor's too: they
    // stay open, and the connections are closed a batch at a time.
    let handed_over = shared.handed_over.load(Ordering::Acquire);
    let timeout = shared.config.shutdown_timeout;
    if handed_over || sockets.inherited {
        // Shared sockets stay open: each accept in flight completes.
        kick_accepts(&worker, &addrs).await;
        if handed_over {
            let connections = worker.core.shard.borrow().connection_count();
            tracing::info!(worker = id, connections, "no longer accepting; draining");
        }
    } else {
        for fd in owned_fds {
            // SAFETY: the listener is owned by the accept task, still alive.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RD);
            }
        }
    }
    if !handed_over {
        worker.core.shard.borrow_mut().close_all(
            clock::now_ms() + timeout.as_millis() as u64,
            "server shutting down",
        );
    }
    let spread = async {
        if handed_over {
            drain_spread(&worker).await;
        }
        std::future::pending::<()>().await
    };
    let limit = timeout
        + if handed_over {
            shared.drain()
        } else {
            Duration::ZERO
        };
    // Keep draining the bus while connections close, so a publisher on
    // another core waiting for queue space is never stuck behind us.
    let empty = async {
        loop {
            poll_fn(|cx| worker.core.shard.borrow_mut().poll_empty(cx)).await;
            // After a handover, the connections accepted last may still be
            // in their handshake: they are served (and drained) too.
            if !handed_over || worker.pending.borrow().is_empty() {
                break;
            }
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let drain = async {
        loop {
            worker.core.wait_for_messages().await;
            while worker.core.drain(DRAIN_BATCH) {
                yield_now().await;
            }
        }
    };
    let closed = async {
        monoio::select! {
            _ = empty => {},
            _ = drain => {},
            _ = spread => {},
        }
    };
    let _ = monoio::time::timeout(limit + Duration::from_millis(500), closed).await;
    Ok(())
}

/// Completes the accepts still in flight on shared sockets (a cancelled
/// one could lose a connection the kernel already handed over): connects
/// to each socket until every accept loop of this worker has ended. A
/// connection it makes is served like any other (it sends nothing and
/// closes), here or by the process the sockets are shared with.
async fn kick_accepts(worker: &Worker, addrs: &[SocketAddr]) {
    let started = std::time::Instant::now();
    while worker.accept_loops.get() > 0 && started.elapsed() < Duration::from_secs(2) {
        for addr in addrs {
            let mut to = *addr;
            if to.ip().is_unspecified() {
                to.set_ip(match to {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let _ = monoio::time::timeout(
                Duration::from_millis(100),
                monoio::net::TcpStream::connect(to),
            )
            .await;
        }
        monoio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A restart's drain: closes this worker's connections with their
/// front-end's restart code (1012, Pusher 4200) evenly over DRAIN_SECONDS,
/// so that they reconnect to the new process a few at a time; then any
/// still open (an upgrade that completed meanwhile).
async fn drain_spread(worker: &Worker) {
    const STEP: Duration = Duration::from_millis(100);
    let config = &worker.shared.config;
    let close_ms = config.close_timeout.as_millis() as u64;
    let total = worker.core.shard.borrow().connection_count();
    let start = std::time::Instant::now();
    let mut closed = 0;
    loop {
        let drain = worker.shared.drain().as_secs_f64();
        let part = match drain > 0.0 {
            true => (start.elapsed().as_secs_f64() / drain).min(1.0),
            false => 1.0,
        };
        let target = (total as f64 * part).ceil() as usize;
        let close = match part < 1.0 {
            true => target.saturating_sub(closed),
            false => usize::MAX,
        };
        closed += worker.core.shard.borrow_mut().close_some(
            close,
            crate::worker::restart_code,
            "server restarting",
            clock::now_ms() + close_ms,
        );
        monoio::time::sleep(STEP).await;
    }
}

/// Accepts until the worker stops accepting. An accept in flight is
/// never cancelled: with io_uring the kernel may already have taken a
/// connection off the queue, which a cancelled accept would lose (reset
/// at exit). So the loop stops after its accept completes: with an error
/// on a socket of its own that was shut down, or with a connection (a
/// real one, served like any other, or [`kick_accepts`]'s).
async fn accept_loop(worker: Rc<Worker>, endpoints: Endpoints, listener: TcpListener, site: Site) {
    let mut last_warning = 0;
    worker.accept_loops.set(worker.accept_loops.get() + 1);
    loop {
        let accepted = listener.accept().await;
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(router::serve(
                    worker.clone(),
                    endpoints.clone(),
                    stream,
                    peer,
                    site,
                ));
                if worker.accepting_stopped_now() {
                    break;
                }
            }
            Err(e) => {
                if worker.accepting_stopped_now() || worker.shared.is_shutting_down() {
                    break;
                }
                let now = clock::now_ms();
                if now - last_warning > 1000 {
                    last_warning = now;
                    tracing::warn!(worker = worker.id, "accept failed: {e}");
                }
                // Out of descriptors or memory: back off instead of spinning.
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    monoio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    worker.accept_loops.set(worker.accept_loops.get() - 1);
}

/// Runs the shard's timers (token expiry, close deadlines) every 100 ms,
/// the keep-alive sweep (server pings), the Pusher requests from other
/// cores, and once a second the Pusher idle sweep (pings, 4201) and the
/// pruning of expired history.
async fn timer_loop(worker: Rc<Worker>, endpoints: Endpoints) {
    const TICK_MS: u64 = 100;
    let mut tick = monoio::time::interval(Duration::from_millis(TICK_MS));
    let keepalive_every = (worker.core.shard.borrow().keepalive().sweep_ms / TICK_MS).max(1);
    let mut ticks = 0u64;
    loop {
        tick.tick().await;
        if worker.shared.is_shutting_down() && worker.core.shard.borrow().is_empty() {
            break;
        }
        ticks += 1;
        let now = clock::now_ms();
        worker.core.shard.borrow_mut().run_timers();
        if ticks % keepalive_every == 0 {
            worker.core.shard.borrow_mut().sweep_idle();
        }
        for endpoint in endpoints.iter() {
            endpoint.tick(&worker, now);
        }
        if ticks % 10 == 0 {
            worker.core.prune_history();
            give_back_memory(&worker);
        }
    }
}

/// Write coalescing (WRITE_DELAY): once a delivery leaves a writer
/// waiting, waits out the delay, then wakes every writer that gathered
/// frames meanwhile. One timer per core, none per connection.
async fn flush_loop(worker: Rc<Worker>) {
    let delay = worker.shared.config.write_delay;
    loop {
        poll_fn(|cx| worker.core.shard.borrow_mut().poll_deferred(cx)).await;
        monoio::time::sleep(delay).await;
        worker.core.shard.borrow_mut().flush();
    }
}

/// After connections opened or closed (checked once a second): shrinks the shard's
/// tables and asks the allocator to return this thread's free pages to the
/// system at once, rather than whenever it next allocates (an idle reactor
/// may not for hours), so RSS follows the connections down.
fn give_back_memory(worker: &Worker) {
    if worker.core.shard.borrow_mut().take_churn() == 0 {
        return;
    }
    worker.core.shard.borrow_mut().shrink();
    worker.pending.borrow_mut().shrink();
    // SAFETY: mi_collect only walks the calling thread's mimalloc heap;
    // harmless when another allocator is in use.
    unsafe { libmimalloc_sys::mi_collect(true) };
    worker.core.stats.memory_collections.inc();
}
