//! Configuration kept in PostgreSQL (`DATABASE_URL`): wspubsub's API keys,
//! from the `apikeys` table as wspubsub lays it out (`domain`, `apikey`,
//! `active`; other columns are ignored), and Pusher apps, from the
//! `herald_apps` table (`deploy/database.sql`), each row read as the JSON
//! object an app is in `APPS`.
//!
//! A thread of its own holds the one connection (no reactor ever waits on
//! the database): it reads the tables, hands what it read to the front-ends
//! ([`Tables`]), then waits for a notification on the `herald_config`
//! channel (the README's trigger sends one on every change) or for
//! `DATABASE_REFRESH`, whichever comes first, and reads them again. When
//! the database goes away, what was read last stays in force; the outage
//! shows in `/health` (`database`) and in the metrics, and the thread
//! reconnects with a growing pause. Every wait is bounded: a connection
//! attempt, and a peer that vanishes without closing (TCP user timeout and
//! keepalives). With `sslmode=require` the connection is TLS (rustls), the
//! server's certificate checked against the system's trust store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// The channel the tables' trigger notifies.
pub const NOTIFY_CHANNEL: &str = "herald_config";
/// How long a connection attempt, or unanswered data, may take.
const WAIT_MAX: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Notifications arriving this close together are read as one change.
const SETTLE: Duration = Duration::from_millis(50);
/// Most rows read from a table.
const MAX_ROWS: i64 = 1_000_000;

/// One row of `apikeys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub domain: String,
    pub apikey: String,
    pub active: bool,
}

/// What one read of the tables found.
#[derive(Debug, Default)]
pub struct Tables {
    /// `apikeys`; `None` when it could not be read (the error is logged and
    /// the keys in force stay).
    pub api_keys: Option<Vec<KeyRow>>,
    /// `herald_apps`, a JSON object per row; `None` when not asked for or
    /// not read (the apps in force stay).
    pub apps: Option<Vec<String>>,
}

/// The apps' columns, as the JSON object `APPS` holds for each app.
const APPS_SQL: &str = "SELECT json_build_object(\
    'id', id, 'key', key, 'secret', secret, 'enabled', enabled, \
    'enable_client_messages', enable_client_messages, \
    'max_connections', max_connections, \
    'max_client_events_per_second', max_client_events_per_second, \
    'max_event_payload_in_kb', max_event_payload_in_kb, \
    'webhooks', coalesce(webhooks, '[]'::jsonb))::text \
    FROM herald_apps ORDER BY id LIMIT 100000";

/// The database's counters (registered with the other metrics).
#[derive(Debug, Clone, Default)]
pub struct DatabaseMetrics {
    /// 1 while the connection is up.
    pub up: Gauge,
    /// Reads of the tables.
    pub reads: Counter,
    /// Failed connection attempts and lost connections.
    pub errors: Counter,
}

/// The state `/health` shows.
#[derive(Debug, Clone, Default)]
struct Status {
    reason: Option<String>,
    api_keys: Option<usize>,
    apps: Option<usize>,
    /// The last error of each table, logged once until it changes.
    table_errors: [Option<String>; 2],
}

/// The link to the database.
pub struct Database {
    /// Read `herald_apps` too.
    apps: bool,
    up: AtomicBool,
    status: Mutex<Status>,
    metrics: DatabaseMetrics,
}

/// Why `DATABASE_URL` cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("DATABASE_URL: {0}")]
    Url(String),
    #[error("cannot start the database thread: {0}")]
    Thread(std::io::Error),
}

impl Database {
    /// Connects from a thread of its own; `apply` runs there with each
    /// read of the tables (the first as soon as the database answers).
    /// `apps`: the Pusher apps come from the database too.
    pub fn start(
        url: &str,
        refresh: Duration,
        apps: bool,
        metrics: DatabaseMetrics,
        apply: impl Fn(Tables) + Send + 'static,
    ) -> Result<Arc<Database>, DatabaseError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| DatabaseError::Url(e.to_string()))?;
        config
            .connect_timeout(WAIT_MAX)
            .tcp_user_timeout(WAIT_MAX)
            .keepalives(true)
            .keepalives_idle(WAIT_MAX)
            .application_name("herald");
        let db = Arc::new(Database {
            apps,
            up: AtomicBool::new(false),
            status: Mutex::new(Status {
                reason: Some("not connected yet".into()),
                ..Status::default()
            }),
            metrics,
        });
        let d = db.clone();
        std::thread::Builder::new()
            .name("herald-database".into())
            .spawn(move || d.run(config, refresh, apply))
            .map_err(DatabaseError::Thread)?;
        Ok(db)
    }

    /// Why the database cannot be reached now, if it cannot.
    pub fn unavailable(&self) -> Option<String> {
        if self.up.load(Ordering::Acquire) {
            return None;
        }
        self.status().reason
    }

    /// What `/health` shows of the database.
    pub fn health(&self) -> serde_json::Value {
        let s = self.status();
        let mut v = serde_json::json!({
            "status": if self.up.load(Ordering::Acquire) { "ok" } else { "unreachable" },
        });
        if let Some(r) = s.reason.filter(|_| !self.up.load(Ordering::Acquire)) {
            v["reason"] = r.into();
        }
        if let Some(n) = s.api_keys {
            v["api_keys"] = n.into();
        }
        if let Some(n) = s.apps {
            v["apps"] = n.into();
        }
        v
    }

    fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_down(&self, reason: String) {
        if self.up.swap(false, Ordering::AcqRel) || self.status().reason.is_none() {
            tracing::warn!(
                "database unreachable: {reason}; the configuration read last stays in force"
            );
        }
        self.metrics.up.set(0);
        self.metrics.errors.inc();
        self.status.lock().unwrap_or_else(|e| e.into_inner()).reason = Some(reason);
    }

    fn set_up(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            tracing::info!("database connected");
        }
        self.metrics.up.set(1);
        self.status.lock().unwrap_or_else(|e| e.into_inner()).reason = None;
    }

    fn run(&self, config: postgres::Config, refresh: Duration, apply: impl Fn(Tables)) {
        let mut backoff = BACKOFF_MIN;
        loop {
            // TLS with `sslmode=require` in the URL, the server's
            // certificate checked (name and chain) against the system's
            // trust store or SSL_CERT_FILE; without it, no TLS (as before).
            let connected = match config.get_ssl_mode() {
                postgres::config::SslMode::Require => {
                    match crate::transport::http1::client::trusting_the_system() {
                        Ok(tls) => {
                            config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                        }
                        Err(why) => {
                            self.set_down(format!("sslmode=require: {why}"));
                            std::thread::sleep(BACKOFF_MAX);
                            continue;
                        }
                    }
                }
                _ => config.connect(postgres::NoTls),
            };
            match connected {
                Ok(mut client) => {
                    backoff = BACKOFF_MIN;
                    let why = self.serve(&mut client, refresh, &apply);
                    self.set_down(why);
                }
                Err(e) => self.set_down(describe(&e)),
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Reads, then waits for a change or the refresh, until the connection
    /// fails; returns why.
    fn serve(
        &self,
        client: &mut postgres::Client,
        refresh: Duration,
        apply: &impl Fn(Tables),
    ) -> String {
        if let Err(e) = client.batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}")) {
            return describe(&e);
        }
        self.set_up();
        loop {
            match self.read(client) {
                Ok(tables) => apply(tables),
                Err(e) => return describe(&e),
            }
            // A change, or the refresh.
            let changed = client.notifications().timeout_iter(refresh).next();
            match changed {
                Ok(Some(_)) => {
                    // A burst of changes is read once.
                    while let Ok(Some(_)) = client.notifications().timeout_iter(SETTLE).next() {}
                }
                Ok(None) => {}
                Err(e) => return describe(&e),
            }
            if client.is_closed() {
                return "the connection closed".into();
            }
        }
    }

    /// Reads every table; an error that is the table's own (missing, a
    /// column of another type) is logged and leaves that table out.
    fn read(&self, client: &mut postgres::Client) -> Result<Tables, postgres::Error> {
        self.metrics.reads.inc();
        let mut tables = Tables::default();
        let sql = format!(
            "SELECT domain::text, apikey::text, coalesce(active, false) FROM apikeys LIMIT {MAX_ROWS}"
        );
        match client.query(sql.as_str(), &[]) {
            Ok(rows) => {
                let mut keys = Vec::with_capacity(rows.len());
                for row in rows {
                    let (domain, apikey, active) =
                        match (row.try_get(0), row.try_get(1), row.try_get(2)) {
                            (Ok(d), Ok(k), Ok(a)) => (d, k, a),
                            _ => continue,
                        };
                    keys.push(KeyRow {
                        domain,
                        apikey,
                        active,
                    });
                }
                let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
                s.api_keys = Some(keys.len());
                s.table_errors[0] = None;
                tables.api_keys = Some(keys);
            }
            Err(e) if e.as_db_error().is_some() => self.table_error(0, "apikeys", &e),
            Err(e) => return Err(e),
        }
        if !self.apps {
            return Ok(tables);
        }
        match client.query(APPS_SQL, &[]) {
            Ok(rows) => {
                let apps: Vec<String> = rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
                let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
                s.apps = Some(apps.len());
                s.table_errors[1] = None;
                tables.apps = Some(apps);
            }
            Err(e) if e.as_db_error().is_some() => self.table_error(1, "herald_apps", &e),
            Err(e) => return Err(e),
        }
        Ok(tables)
    }

    /// A table could not be read (missing, a column of another type):
    /// logged once until the error changes; what was read last stays.
    fn table_error(&self, i: usize, table: &str, e: &postgres::Error) {
        let why = describe(e);
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if s.table_errors[i].as_deref() != Some(why.as_str()) {
            tracing::error!(
                "DATABASE_URL: cannot read {table}: {why}; what was read last stays in force"
            );
            s.table_errors[i] = Some(why);
        }
    }
}

/// An error in one line, with the server's message when it sent one.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}
