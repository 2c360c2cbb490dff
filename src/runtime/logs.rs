//! Logging, set up once at start: which events are written (LOGLEVEL, or
//! RUST_LOG when set, with the dependencies' chatter kept at `warn` unless
//! a directive names them) and how (LOG_FORMAT: readable text or one JSON
//! object per line), always on standard error.

use std::io::IsTerminal;

use crate::config::{parse_level, Config, LogFormat};

/// Dependencies whose debug and trace output (a line per frame, record,
/// poll or command) would drown herald's own: kept at `warn` unless a
/// directive names them.
const QUIET: &[&str] = &[
    "tungstenite",
    "rustls",
    "hyper",
    "hyper_util",
    "monoio",
    "mio",
    "redis",
    "async_nats",
    "redb",
];

/// The filter's directives: RUST_LOG when set and not empty, else
/// LOGLEVEL, each quiet dependency at `warn` unless named.
pub fn directives(loglevel: &str, rust_log: Option<&str>) -> Result<String, String> {
    let chosen = match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(r) => parse_level(r).map_err(|e| format!("invalid RUST_LOG value '{r}': {e}"))?,
        None => loglevel.to_string(),
    };
    let mut out = chosen.clone();
    for dep in QUIET {
        if !chosen.contains(dep) {
            out.push_str(&format!(",{dep}=warn"));
        }
    }
    Ok(out)
}

/// Installs the process's logger as `config` says.
pub fn init(config: &Config) -> Result<(), String> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let directives = directives(&config.loglevel, rust_log.as_deref())?;
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&directives)
        .map_err(|e| format!("invalid log filter '{directives}': {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_stay_quiet_unless_named() {
        let d = directives("debug", None).unwrap();
        assert!(d.starts_with("debug,"), "{d}");
        assert!(d.contains("tungstenite=warn") && d.contains("rustls=warn"));
        let d = directives("info", Some("trace,tungstenite=trace")).unwrap();
        assert!(d.starts_with("trace,tungstenite=trace,"), "{d}");
        assert!(!d.contains("tungstenite=warn"), "{d}");
        assert!(d.contains("hyper=warn"), "{d}");
    }

    #[test]
    fn rust_log_wins_and_is_checked() {
        assert!(directives("info", Some("warning"))
            .unwrap()
            .starts_with("warn,"));
        assert!(directives("info", Some("  ")).unwrap().starts_with("info,"));
        let e = directives("info", Some("herald=loud")).unwrap_err();
        assert!(e.contains("RUST_LOG"), "{e}");
    }
}
