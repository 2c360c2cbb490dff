//! Configuration: every setting is an environment variable and the matching
//! command-line flag (`PORT` / `--port`), and may be a key of the file
//! `CONFIG` names ([`mod@file`]); parsed and validated once at start. A flag
//! wins over the variable, which wins over the file, which wins over the
//! default.
//!
//! This module turns strings (and the configuration file) into a
//! [`Config`]; it opens no socket. Errors carry the variable's name (and,
//! for the file, its path and line) and what was expected, so `main` can
//! print them as one line and exit with code 2.

pub mod file;

use std::net::IpAddr;
use std::time::Duration;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

/// The most reactor threads herald runs: the interest map stores the set of
/// cores interested in a channel as one `u64` bit set.
pub const MAX_WORKERS: usize = 64;

/// herald: a WebSocket publish/subscribe server.
///
/// Every option is read from the environment variable shown in brackets, or
/// from the flag, which wins. Sizes accept a plain byte count or a suffix:
/// 64KiB, 1MiB, 512k, 2m.
#[derive(Debug, Clone, Parser)]
#[command(name = "herald", version, about, long_about = None, max_term_width = 100)]
pub struct Config {
    /// A TOML file of settings, keyed by the variables' names in lower case
    /// (`port = 7000`); environment variables and flags override it.
    #[arg(long, env = "CONFIG")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (where each value comes from,
    /// secrets masked) as a configuration file, and exit.
    #[arg(long)]
    pub print_config: bool,

    /// What --print-config prints.
    #[arg(skip)]
    pub effective: Option<String>,

    /// HS256 secret that signs client tokens (at least 32 bytes advised;
    /// empty is refused). Without it (and without AUTHORIZER_URL) herald
    /// runs in open mode (no token, every permission) and only on a
    /// loopback address.
    #[arg(long, env = "SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// Address to listen on [default: 127.0.0.1 in open mode (no SECRET, no AUTHORIZER_URL), else 0.0.0.0].
    #[arg(long, env = "HOST", value_parser = parse_ip)]
    pub host: Option<IpAddr>,

    /// TCP port for WebSocket and HTTP (0 picks a free port and logs it).
    #[arg(long, env = "PORT", default_value_t = 6380, value_parser = parse_port)]
    pub port: u16,

    /// A PEM file with the server's certificate chain (leaf first): with
    /// TLS_KEY, the port serves wss:// and https:// (or TLS_PORT does, beside
    /// a plain PORT). Read again on SIGHUP.
    #[arg(long, env = "TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// A PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// A second port serving TLS while PORT stays plain (needs TLS_CERT
    /// and TLS_KEY; 0 picks a free port).
    #[arg(long, env = "TLS_PORT", value_parser = parse_port)]
    pub tls_port: Option<u16>,

    /// Log level: trace, debug, info, warning, error (fatal and panic mean
    /// error), or RUST_LOG-style directives such as
    /// `info,herald::session=debug`. RUST_LOG, when set, is used instead.
    #[arg(long, env = "LOGLEVEL", default_value = "info", value_parser = parse_level)]
    pub loglevel: String,

    /// Log format: `text` (one readable line per event) or `json` (one
    /// object per line: timestamp, level, target, fields).
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = parse_log_format)]
    pub log_format: LogFormat,

    /// Reactor threads, each pinned to one CPU [default: the CPUs this process may use].
    #[arg(long, env = "WORKERS", value_parser = parse_workers)]
    pub workers: Option<usize>,

    /// Most WebSocket connections across all workers; past it an upgrade gets HTTP 503.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 100_000, value_parser = parse_count)]
    pub max_connections: usize,

    /// Largest client message (after joining fragments); past it: `too_large`, close 1009.
    #[arg(long, env = "MAX_MESSAGE_SIZE", default_value = "64KiB", value_parser = parse_size)]
    pub max_message_size: usize,

    /// Bytes read per system call into each worker's shared read buffer.
    #[arg(long, env = "READ_BUFFER_SIZE", default_value = "64KiB", value_parser = parse_size)]
    pub read_buffer_size: usize,

    /// Most bytes handed to one vectored write of a connection.
    #[arg(long, env = "WRITE_BUFFER_SIZE", default_value = "256KiB", value_parser = parse_size)]
    pub write_buffer_size: usize,

    /// Write coalescing: deliveries wait up to this long (microseconds,
    /// or a duration such as 2ms) so that each connection's writer sends
    /// what gathered in one write. 0 (the default): written at once.
    #[arg(long, env = "WRITE_DELAY", default_value = "0", value_parser = parse_delay)]
    pub write_delay: Duration,

    /// Unsent output a connection may hold; past it the connection is closed with 4008.
    #[arg(long, env = "SEND_QUEUE_LIMIT", default_value = "1MiB", value_parser = parse_size)]
    pub send_queue_limit: usize,

    /// Check the Origin header of WebSocket upgrades (mismatch: HTTP 403).
    #[arg(long, env = "CHECK_ORIGIN", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub check_origin: bool,

    /// Comma-separated origins allowed with CHECK_ORIGIN (empty: same host as the request).
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Seconds of clock skew tolerated on token expiry.
    #[arg(long, env = "JWT_LEEWAY", default_value_t = 0, value_parser = parse_u64)]
    pub jwt_leeway: u64,

    /// Publishes per second allowed per connection (0: unlimited); past it: `rate_limited`.
    #[arg(long, env = "PUBLISH_RATE", default_value_t = 0, value_parser = parse_u64)]
    pub publish_rate: u64,

    /// Which channels keep history: `pattern=size/ttl,...` (e.g.
    /// `chat:*=100/5m,news=1000/1h`; the first matching pattern wins).
    #[arg(long, env = "HISTORY", default_value = "", value_parser = parse_history)]
    pub history: crate::engine::history::Rules,

    /// A directory where history is also kept on disk, so that it and its
    /// epochs survive a restart.
    #[arg(long, env = "HISTORY_DIR")]
    pub history_dir: Option<std::path::PathBuf>,

    /// Most messages one recovery replays (and one history read returns).
    #[arg(long, env = "HISTORY_RECOVER_MAX", default_value_t = 1000, value_parser = parse_count)]
    pub history_recover_max: usize,

    /// What a channel that users subscribed to durably (personal channels)
    /// keeps for them at least: `size/ttl`, e.g. `100/24h`.
    #[arg(long, env = "PERSONAL_HISTORY", default_value = "100/24h", value_parser = parse_keep)]
    pub personal_history: crate::engine::history::Keep,

    /// Most channels one user may subscribe to durably.
    #[arg(long, env = "PERSONAL_MAX_CHANNELS", default_value_t = 100, value_parser = parse_count)]
    pub personal_max_channels: usize,

    /// The broker several herald nodes share to form a cluster:
    /// `redis://host:port` (Redis or Valkey). Without it the node is alone.
    #[arg(long, env = "BROKER_URL", value_parser = parse_broker_url)]
    pub broker_url: Option<BrokerUrl>,

    /// This node's name in its cluster (logs, metrics); a random one by
    /// default.
    #[arg(long, env = "NODE_ID", value_parser = parse_node_id)]
    pub node_id: Option<String>,

    /// Seconds a publish's idempotency_key is remembered.
    #[arg(long, env = "IDEMPOTENCY_WINDOW", default_value = "300", value_parser = parse_secs)]
    pub idempotency_window: Duration,

    /// Channels one connection may be subscribed to at once.
    #[arg(long, env = "MAX_SUBSCRIPTIONS", default_value_t = 10_000, value_parser = parse_count)]
    pub max_subscriptions: usize,

    /// Seconds a client has to send an HTTP request head, and again its
    /// body (past either: 408 and the connection is closed).
    #[arg(long, env = "HANDSHAKE_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub handshake_timeout: Duration,

    /// Most connections that have not become WebSockets (handshakes and
    /// HTTP API connections) across workers; past it the oldest is closed.
    #[arg(long, env = "MAX_PENDING", default_value_t = 4096, value_parser = parse_count)]
    pub max_pending: usize,

    /// Comma-separated addresses or CIDR blocks of reverse proxies whose
    /// Forwarded / X-Forwarded-For headers name the client.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "", value_parser = parse_trusted)]
    pub trusted_proxies: TrustedProxies,

    /// A second address (e.g. 127.0.0.1:9100) serving only /metrics and
    /// /health; /metrics is then not served on the main port.
    #[arg(long, env = "METRICS_ADDR", value_parser = parse_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Seconds of silence from a WebSocket client before the server pings
    /// it (0: never).
    #[arg(long, env = "PING_INTERVAL", default_value = "25", value_parser = parse_secs_or_zero)]
    pub ping_interval: Duration,

    /// Seconds a pinged client has to send anything before it is closed
    /// with 1001 "ping timeout".
    #[arg(long, env = "PONG_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub pong_timeout: Duration,

    /// Seconds a closing connection has to flush and answer the close frame before TCP is cut.
    #[arg(long, env = "CLOSE_TIMEOUT", default_value = "5", value_parser = parse_secs)]
    pub close_timeout: Duration,

    /// Seconds a shutdown (SIGINT/SIGTERM) may take to drain connections.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10", value_parser = parse_secs)]
    pub shutdown_timeout: Duration,

    /// Seconds over which, once a restart's new process accepts (SIGUSR2),
    /// the old one closes its connections (1012, Pusher 4200) a batch at a
    /// time, so that clients come back without a stampede.
    #[arg(long, env = "DRAIN_SECONDS", default_value = "10", value_parser = parse_secs)]
    pub drain_seconds: Duration,

    /// Serve /echo, a WebSocket echo over the same connection path (for Autobahn).
    #[arg(long, env = "ECHO_ENDPOINT", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub echo_endpoint: bool,

    /// Messages a worker may have queued towards another worker before it stops reading.
    #[arg(long, env = "BUS_CAPACITY", default_value_t = 1024, value_parser = parse_count)]
    pub bus_capacity: usize,

    /// I/O driver: auto (io_uring where it can be set up, else epoll), io_uring, or epoll.
    #[arg(long, env = "IO_DRIVER", default_value = "auto", value_parser = parse_driver)]
    pub io_driver: IoDriver,

    /// Pin each worker thread to one CPU.
    #[arg(long, env = "PIN_WORKERS", default_value = "true", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub pin_workers: bool,

    /// Webhook (http:// or https://) that approves connections and, with
    /// AUTHORIZE, subscribes, unsubscribes and publishes.
    #[arg(long, env = "AUTHORIZER_URL", value_parser = parse_authorizer_url)]
    pub authorizer_url: Option<String>,

    /// Comma-separated actions sent to AUTHORIZER_URL for approval: connect,
    /// subscribe, unsubscribe, publish.
    #[arg(long, env = "AUTHORIZE", default_value = "connect", value_parser = parse_actions)]
    pub authorize: Actions,

    /// Seconds to wait for the authorizer; past it the authorizer counts as down.
    #[arg(long, env = "AUTHORIZER_TIMEOUT", default_value = "2", value_parser = parse_secs)]
    pub authorizer_timeout: Duration,

    /// Seconds a positive decision is remembered per (connection, action,
    /// channel); 0 asks every time.
    #[arg(long, env = "AUTHORIZER_CACHE_TTL", default_value = "0", value_parser = parse_ttl)]
    pub authorizer_cache_ttl: Duration,

    /// Pusher apps, a JSON array of {id, key, secret, ...} (see README);
    /// without APPS and APPS_FILE, open mode has the app app-id/app-key/app-secret.
    #[arg(long, env = "APPS", hide_env_values = true)]
    pub apps: Option<String>,

    /// A file holding the APPS JSON.
    #[arg(long, env = "APPS_FILE")]
    pub apps_file: Option<std::path::PathBuf>,

    /// wspubsub API keys: a CSV file of `domain,apikey,active` rows; turns
    /// on /ws/sub/{domain}/{topic} and /ws/pub/{apikey}/{domain}/{topic}.
    /// Read again within a second of a change.
    #[arg(long, env = "API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,

    /// PostgreSQL holding the configuration (`postgres://user:password@host:port/db`):
    /// wspubsub's API keys from its `apikeys` table, instead of
    /// API_KEYS_FILE, and the Pusher apps from `herald_apps` unless APPS or
    /// APPS_FILE is set.
    /// Read again on a notification on `herald_config` and every
    /// DATABASE_REFRESH.
    #[arg(long, env = "DATABASE_URL", value_parser = parse_database_url)]
    pub database_url: Option<String>,

    /// The token of the debug console (`GET /console?token=...`); without
    /// it there is no console.
    #[arg(long, env = "ADMIN_TOKEN")]
    pub admin_token: Option<String>,

    /// Serve the debug console only on METRICS_ADDR (or the socket passed
    /// as `metrics`), not on the main port.
    #[arg(long, env = "CONSOLE_ON_METRICS", default_value = "false", value_parser = parse_bool, action = clap::ArgAction::Set)]
    pub console_on_metrics: bool,

    /// Seconds between two reads of the database's tables when no
    /// notification says they changed.
    #[arg(long, env = "DATABASE_REFRESH", default_value = "30", value_parser = parse_secs)]
    pub database_refresh: Duration,

    /// Seconds of silence before a Pusher connection is pinged (sent to
    /// clients as activity_timeout).
    #[arg(long, env = "PUSHER_ACTIVITY_TIMEOUT", default_value = "120", value_parser = parse_secs)]
    pub pusher_activity_timeout: Duration,

    /// Seconds a pinged Pusher connection has to answer before it is closed with 4201.
    #[arg(long, env = "PUSHER_PONG_TIMEOUT", default_value = "30", value_parser = parse_secs)]
    pub pusher_pong_timeout: Duration,
}

/// The reverse proxies of TRUSTED_PROXIES.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<ipnet::IpNet>);

fn parse_trusted(s: &str) -> Result<TrustedProxies, String> {
    crate::transport::http1::forwarded::parse_trusted(s).map(TrustedProxies)
}

fn parse_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    let s = s.trim();
    let s = s
        .strip_prefix("localhost:")
        .map_or(s.to_string(), |p| format!("127.0.0.1:{p}"));
    s.parse()
        .map_err(|_| "expected an address and port such as 127.0.0.1:9100".into())
}

/// Microseconds (`500`) or a duration (`2ms`), at most one second.
fn parse_delay(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let d = match s.parse::<u64>() {
        Ok(us) => Duration::from_micros(us),
        Err(_) => humantime::parse_duration(s).map_err(|_| {
            "expected microseconds such as 500, or a duration such as 2ms".to_string()
        })?,
    };
    if d > Duration::from_secs(1) {
        return Err("expected at most 1s".into());
    }
    Ok(d)
}

fn parse_secs_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim().trim_end_matches('s') == "0" {
        return Ok(Duration::ZERO);
    }
    parse_secs(s)
}

/// The actions AUTHORIZE sends for approval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Actions {
    pub connect: bool,
    pub subscribe: bool,
    pub unsubscribe: bool,
    pub publish: bool,
}

fn parse_actions(s: &str) -> Result<Actions, String> {
    let mut a = Actions::default();
    for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match word.to_ascii_lowercase().as_str() {
            "connect" => a.connect = true,
            "subscribe" => a.subscribe = true,
            "unsubscribe" => a.unsubscribe = true,
            "publish" => a.publish = true,
            _ => {
                return Err(format!(
                    "unknown action '{word}': expected connect, subscribe, unsubscribe, publish"
                ))
            }
        }
    }
    Ok(a)
}

fn parse_authorizer_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let uri: http::Uri = s
        .parse()
        .map_err(|_| "expected a URL such as http://127.0.0.1:8080/authorize".to_string())?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(s.to_string()),
        _ => Err("expected an http:// or https:// URL with a host".into()),
    }
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    parse_secs_or_zero(s)
}

/// Which monoio driver the reactors run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring when the kernel allows it, otherwise epoll.
    Auto,
    IoUring,
    Epoll,
}

fn parse_driver(s: &str) -> Result<IoDriver, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "auto" | "" => Ok(IoDriver::Auto),
        "io_uring" | "iouring" | "uring" => Ok(IoDriver::IoUring),
        "epoll" | "legacy" => Ok(IoDriver::Epoll),
        _ => Err("expected auto, io_uring or epoll".into()),
    }
}

/// A cluster's broker (`BROKER_URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerUrl {
    /// Redis or Valkey, as `redis://[user:password@]host[:port][/db]`.
    Redis(String),
    /// NATS with JetStream, as `nats://[user:password@]host[:port]`.
    Nats(String),
}

impl BrokerUrl {
    /// The address without its credentials, for logs and errors.
    pub fn redacted(&self) -> String {
        let (BrokerUrl::Redis(url) | BrokerUrl::Nats(url)) = self;
        without_credentials(url)
    }
}

fn parse_broker_url(s: &str) -> Result<BrokerUrl, String> {
    const EXPECTED: &str = "expected redis://host:port or nats://host:port";
    let s = s.trim();
    let (scheme, rest) = s.split_once("://").ok_or(EXPECTED)?;
    match scheme {
        "redis" | "nats" => {}
        "rediss" | "tls" => {
            return Err(format!(
                "{scheme}:// (TLS) is not supported yet; {EXPECTED}"
            ))
        }
        _ => return Err(format!("unknown broker scheme {scheme}://; {EXPECTED}")),
    }
    let host = rest.rsplit('@').next().unwrap_or("");
    let host = host.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(EXPECTED.into());
    }
    Ok(match scheme {
        "nats" => BrokerUrl::Nats(s.to_string()),
        _ => BrokerUrl::Redis(s.to_string()),
    })
}

fn parse_database_url(s: &str) -> Result<String, String> {
    const EXPECTED: &str = "expected postgres://user:password@host:port/database";
    let s = s.trim();
    let (scheme, rest) = s.split_once("://").ok_or(EXPECTED)?;
    if scheme != "postgres" && scheme != "postgresql" {
        return Err(format!("unknown scheme {scheme}://; {EXPECTED}"));
    }
    let host = rest.rsplit('@').next().unwrap_or("");
    if host.split(['/', '?']).next().unwrap_or("").is_empty() && !rest.contains("host=") {
        return Err(EXPECTED.into());
    }
    Ok(s.to_string())
}

fn parse_node_id(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then(|| s.to_string())
        .ok_or_else(|| "expected 1 to 64 of A-Z a-z 0-9 - _ .".into())
}

/// A configuration that parsed but cannot be used as given.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("refusing to start without SECRET or AUTHORIZER_URL on non-loopback address {0}: set one, or HOST=127.0.0.1")]
    OpenModeNotLoopback(IpAddr),
    #[error("WORKERS={0} exceeds the {max} reactors herald supports", max = MAX_WORKERS)]
    TooManyWorkers(usize),
    #[error("SECRET is set but empty: tokens signed with an empty key would be accepted; set a long random SECRET (e.g. openssl rand -hex 32) or unset it")]
    EmptySecret,
    #[error("HISTORY_DIR with BROKER_URL: in a cluster history is kept in the broker, not on each node's disk; unset HISTORY_DIR")]
    HistoryDirInCluster,
    #[error("HISTORY with a nats:// BROKER_URL: history is kept only with a redis:// broker; unset HISTORY or use Redis")]
    HistoryOverNats,
    #[error("TLS_CERT and TLS_KEY go together: set both, or neither")]
    TlsHalf,
    #[error("API_KEYS_FILE with DATABASE_URL: the API keys come from one place; unset one")]
    KeysTwice,
    #[error("TLS_PORT needs TLS_CERT and TLS_KEY")]
    TlsPortWithoutCert,
    #[error(
        "TLS_PORT={0} is PORT too: give TLS its own port, or unset TLS_PORT to serve TLS on PORT"
    )]
    TlsPortIsPort(u16),
}

impl Config {
    /// Parses `std::env::args` and the environment. On a bad value returns
    /// the one-line message to print and the exit code (2, or 0 for --help).
    pub fn from_env() -> Result<Config, (String, i32)> {
        Self::try_from_args(std::env::args_os())
    }

    /// Parses the given arguments (and the environment).
    pub fn try_from_args<I, T>(args: I) -> Result<Config, (String, i32)>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let clap_error = |e: clap::Error| match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => (e.to_string(), 0),
            _ => (one_line(&e), 2),
        };
        let given = Config::command()
            .try_get_matches_from(&args)
            .map_err(clap_error)?;
        let mut all = args;
        let mut from_file = Vec::new();
        let path = given.get_one::<PathBuf>("config").cloned();
        if let Some(path) = &path {
            for (flag, key, line) in file_flags(path, &given)? {
                all.push(flag);
                from_file.push((key, line));
            }
        }
        let matches = Config::command()
            .try_get_matches_from(&all)
            .map_err(clap_error)?;
        let mut cfg = Config::from_arg_matches(&matches).map_err(clap_error)?;
        cfg.validate().map_err(|e| (format!("herald: {e}"), 2))?;
        if cfg.print_config {
            let host = cfg.host();
            cfg.effective = Some(effective(&matches, path.as_deref(), &from_file, host));
        }
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.secret.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::EmptySecret);
        }
        if let Some(w) = self.workers {
            if w > MAX_WORKERS {
                return Err(ConfigError::TooManyWorkers(w));
            }
        }
        if self.open_mode() && !self.host().is_loopback() {
            return Err(ConfigError::OpenModeNotLoopback(self.host()));
        }
        if self.broker_url.is_some() && self.history_dir.is_some() {
            return Err(ConfigError::HistoryDirInCluster);
        }
        if matches!(self.broker_url, Some(BrokerUrl::Nats(_))) && !self.history.is_empty() {
            return Err(ConfigError::HistoryOverNats);
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConfigError::TlsHalf);
        }
        if self.api_keys_file.is_some() && self.database_url.is_some() {
            return Err(ConfigError::KeysTwice);
        }
        match self.tls_port {
            Some(_) if self.tls_cert.is_none() => return Err(ConfigError::TlsPortWithoutCert),
            Some(p) if p == self.port && p != 0 => return Err(ConfigError::TlsPortIsPort(p)),
            _ => {}
        }
        Ok(())
    }

    /// True when neither SECRET nor AUTHORIZER_URL is set: no tokens, every
    /// permission, loopback only.
    pub fn open_mode(&self) -> bool {
        self.secret.is_none() && self.authorizer_url.is_none()
    }

    /// The address to bind, with its mode-dependent default.
    pub fn host(&self) -> IpAddr {
        self.host.unwrap_or(if self.open_mode() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            IpAddr::from([0, 0, 0, 0])
        })
    }

    /// Why the secret is weak, if it is: shorter than 32 bytes (an HS256
    /// key should be as long as the hash, RFC 7518 §3.2).
    pub fn weak_secret(&self) -> Option<String> {
        let len = self.secret.as_deref()?.len();
        (len < 32).then(|| {
            format!("SECRET is only {len} bytes: use at least 32 random bytes (e.g. openssl rand -hex 32), or tokens can be forged by guessing it")
        })
    }

    /// The one-line start-up warning for running without SECRET, if any:
    /// what is true of this configuration.
    pub fn unauthenticated_warning(&self) -> Option<String> {
        if self.secret.is_some() {
            return None;
        }
        let host = self.host();
        Some(match &self.authorizer_url {
            None => format!(
                "no SECRET set: open mode, every client may read and write every channel (address {host}, loopback only)"
            ),
            Some(url) => format!(
                "no SECRET set: tokens are not checked; the authorizer at {url} approves every connection and HTTP publish (address {host}{})",
                if host.is_loopback() { "" } else { ", reachable from other machines" }
            ),
        })
    }

    /// Each worker's share of MAX_PENDING.
    pub fn pending_per_worker(&self) -> usize {
        self.max_pending.div_ceil(self.worker_count())
    }

    /// The number of reactors to run.
    pub fn worker_count(&self) -> usize {
        self.workers
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            })
            .clamp(1, MAX_WORKERS)
    }
}

/// Settings that only the command line and environment can give.
const NOT_IN_FILE: &[&str] = &["config", "print_config", "effective", "help", "version"];

/// A flag the configuration file adds, with its key and line.
type FileFlag = (OsString, String, usize);

/// The flags the file at `path` adds: one per key that neither a flag nor
/// a variable already sets (`given`), each value checked on its own so that
/// an error names the file, line and key.
fn file_flags(path: &Path, given: &ArgMatches) -> Result<Vec<FileFlag>, (String, i32)> {
    let at = |why: String| (format!("herald: CONFIG file {}: {why}", path.display()), 2);
    let text = std::fs::read_to_string(path).map_err(|e| at(format!("cannot be read: {e}")))?;
    let settings = file::parse(&text).map_err(|e| at(e.to_string()))?;
    let cmd = Config::command();
    let mut flags = Vec::new();
    for s in settings {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == s.key.as_str() && !NOT_IN_FILE.contains(&s.key.as_str()))
            .ok_or_else(|| at(format!("line {}: unknown setting `{}`", s.line, s.key)))?;
        if matches!(
            given.value_source(&s.key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let long = arg.get_long().unwrap_or(&s.key);
        let flag: OsString = format!("--{long}={}", s.value).into();
        // Alone (the variables parsed already): an error is this value's.
        if let Err(e) =
            Config::command().try_get_matches_from([OsString::from("herald"), flag.clone()])
        {
            let why = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "not a valid value".into());
            let shown = if SECRET_KEYS.contains(&s.key.as_str()) {
                "***"
            } else {
                s.value.as_str()
            };
            return Err(at(format!(
                "line {}: `{}`: invalid value '{shown}': {why}",
                s.line, s.key
            )));
        }
        flags.push((flag, s.key, s.line));
    }
    Ok(flags)
}

/// Settings whose values --print-config and errors never show.
const SECRET_KEYS: &[&str] = &["secret", "apps", "admin_token"];

/// The effective configuration as a configuration file: every setting
/// with its value and where it comes from, secrets masked, credentials
/// taken out of URLs.
fn effective(
    matches: &ArgMatches,
    path: Option<&Path>,
    from_file: &[(String, usize)],
    host: IpAddr,
) -> String {
    let mut out = String::from("# herald's effective configuration (herald --print-config)\n");
    if let Some(p) = path {
        out.push_str(&format!(
            "# read from {}, then the environment and flags\n",
            p.display()
        ));
    }
    for arg in Config::command().get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_IN_FILE.contains(&id) {
            continue;
        }
        let raw: Option<Vec<String>> = matches
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect());
        let Some(raw) = raw else {
            match id {
                "host" => out.push_str(&format!("# host is not set: herald listens on {host}\n")),
                _ => out.push_str(&format!("# {id} is not set\n")),
            }
            continue;
        };
        let value = raw.join(",");
        let shown = match id {
            _ if SECRET_KEYS.contains(&id) => "***".to_string(),
            "broker_url" | "authorizer_url" | "database_url" => without_credentials(&value),
            _ => value,
        };
        let literal = match shown.as_str() {
            "true" | "false" => shown.clone(),
            v if !v.is_empty() && v.len() < 16 && v.bytes().all(|b| b.is_ascii_digit()) => {
                shown.clone()
            }
            v => serde_json::to_string(v).unwrap_or_default(),
        };
        let source = match (from_file.iter().find(|(k, _)| k == id), path) {
            (Some((_, line)), Some(p)) => format!("{} line {line}", p.display()),
            _ => match matches.value_source(id) {
                Some(ValueSource::CommandLine) => {
                    format!("--{}", arg.get_long().unwrap_or(id))
                }
                Some(ValueSource::EnvVariable) => arg
                    .get_env()
                    .map_or("environment".into(), |e| e.to_string_lossy().into_owned()),
                _ => "default".into(),
            },
        };
        out.push_str(&format!("{id} = {literal}  # {source}\n"));
    }
    out
}

/// `scheme://user:password@host/...` without `user:password@`.
pub fn without_credentials(url: &str) -> String {
    let shown = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    };
    // A password in the query (`?password=...`, as libpq takes it).
    match shown.split_once('?') {
        Some((base, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
        None => shown,
    }
}

/// Renders a clap error as one line naming the environment variable.
fn one_line(e: &clap::Error) -> String {
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    if let (Some(arg), Some(value)) = (&arg, &value) {
        // "--max-connections <MAX_CONNECTIONS>" -> MAX_CONNECTIONS
        let flag = arg.split_whitespace().next().unwrap_or(arg);
        let var = flag
            .trim_start_matches('-')
            .replace('-', "_")
            .to_uppercase();
        let why = std::error::Error::source(e)
            .map(|s| s.to_string())
            .unwrap_or_else(|| "a valid value".to_string());
        return format!("herald: invalid {var} ({flag}) value '{value}': {why}");
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid arguments");
    format!("herald: {}", first.trim_start_matches("error: "))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected a port number from 0 to 65535".into())
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let s = s.trim();
    if s == "localhost" {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    s.parse()
        .map_err(|_| "expected an IP address such as 127.0.0.1 or 0.0.0.0".into())
}

/// A level word (`warning`, `fatal`: the names other servers use) or
/// RUST_LOG-style directives (`info,herald::session=debug`).
pub fn parse_level(s: &str) -> Result<String, String> {
    let level = match s.trim().to_ascii_lowercase().as_str() {
        "trace" => "trace",
        "debug" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        "error" | "fatal" | "panic" => "error",
        "off" => "off",
        // Directives (target=level, comma-separated), as RUST_LOG takes.
        _ if s.contains('=') || s.contains(',') => {
            return tracing_subscriber::EnvFilter::builder()
                .parse(s.trim())
                .map(|_| s.trim().to_string())
                .map_err(|e| format!("{e}; expected a level or directives such as info,herald::session=debug"));
        }
        _ => return Err("expected one of trace, debug, info, warning, error, or directives such as info,herald::session=debug".into()),
    };
    Ok(level.to_string())
}

/// How log lines are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "text" | "" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected text or json".into()),
    }
}

fn parse_workers(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {MAX_WORKERS}")),
    }
}

fn parse_history(s: &str) -> Result<crate::engine::history::Rules, String> {
    crate::engine::history::Rules::parse(s).map_err(|e| e.to_string())
}

fn parse_keep(s: &str) -> Result<crate::engine::history::Keep, String> {
    let rules = crate::engine::history::Rules::parse(&format!("*={s}"))
        .map_err(|_| "expected size/ttl, e.g. 100/24h (size 1 to 1000000, ttl 1s to 365d)")?;
    rules.keep("").ok_or_else(|| "expected size/ttl".into())
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("expected a whole number greater than 0".into()),
    }
}

fn parse_u64(s: &str) -> Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| "expected a whole number, 0 or more".into())
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| "expected a number of seconds such as 10 or 0.5".to_string())?;
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return Err("expected a number of seconds above 0 and at most 86400".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Accepts true/false, 1/0, yes/no, on/off (any case).
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// Parses a byte size: `65536`, `64KiB`, `64k`, `1MiB`, `1m`, `1GiB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    const EXPECTED: &str = "expected a size in bytes such as 65536, 64KiB or 1MiB";
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|_| EXPECTED.to_string())?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(EXPECTED.into()),
    };
    match n.checked_mul(mult) {
        Some(v) if v > 0 => Ok(v),
        _ => Err("expected a size greater than 0".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, (String, i32)> {
        let mut all = vec!["herald"];
        all.extend_from_slice(args);
        Config::try_from_args(all)
    }

    #[test]
    fn sizes_accept_suffixes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("16m"), Ok(16 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12parsecs").is_err());
    }

    #[test]
    fn defaults_match_the_documentation() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 6380);
        assert_eq!(c.max_connections, 100_000);
        assert_eq!(c.max_message_size, 64 * 1024);
        assert_eq!(c.send_queue_limit, 1 << 20);
        assert!(c.open_mode());
        assert_eq!(c.host(), IpAddr::from([127, 0, 0, 1]));
    }

    #[test]
    fn secret_changes_default_host() {
        let c = parse(&["--secret", "s"]).unwrap();
        assert_eq!(c.host(), IpAddr::from([0, 0, 0, 0]));
    }

    #[test]
    fn open_mode_refuses_public_address() {
        let (msg, code) = parse(&["--host", "0.0.0.0"]).unwrap_err();
        assert_eq!(code, 2);
        assert!(msg.contains("SECRET"), "{msg}");
        assert_eq!(msg.lines().count(), 1);
    }

    #[test]
    fn bad_value_is_one_line_naming_the_variable() {
        let (msg, code) = parse(&["--port", "http"]).unwrap_err();
        assert_eq!(code, 2);
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(msg.contains("PORT") && msg.contains("expected"), "{msg}");
        let (msg, _) = parse(&["--max-message-size", "huge"]).unwrap_err();
        assert!(msg.contains("MAX_MESSAGE_SIZE"), "{msg}");
    }

    #[test]
    fn empty_secret_is_refused_and_short_one_is_weak() {
        let (msg, code) = parse(&["--secret", ""]).unwrap_err();
        assert_eq!(code, 2);
        assert!(msg.contains("SECRET") && msg.contains("empty"), "{msg}");
        assert_eq!(msg.lines().count(), 1);
        let c = parse(&["--secret", "short"]).unwrap();
        assert!(c.weak_secret().unwrap().contains("5 bytes"));
        let c = parse(&["--secret", &"k".repeat(32)]).unwrap();
        assert_eq!(c.weak_secret(), None);
    }

    #[test]
    fn warnings_say_where_herald_listens() {
        let c = parse(&[]).unwrap();
        let w = c.unauthenticated_warning().unwrap();
        assert!(w.contains("open mode") && w.contains("127.0.0.1"), "{w}");
        let c = parse(&["--authorizer-url", "http://127.0.0.1:1/a"]).unwrap();
        let w = c.unauthenticated_warning().unwrap();
        assert!(!w.contains("loopback only"), "{w}");
        assert!(w.contains("0.0.0.0") && w.contains("other machines"), "{w}");
        assert_eq!(
            parse(&["--secret", "s"]).unwrap().unauthenticated_warning(),
            None
        );
    }

    #[test]
    fn origins_are_comma_separated() {
        let c = parse(&["--allowed-origins", "https://a.example,https://b.example"]).unwrap();
        assert_eq!(c.allowed_origins.len(), 2);
    }
}
