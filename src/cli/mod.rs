//! The command-line client: `herald sub`, `herald pub` and `herald token`,
//! subcommands of the server binary for poking at a running server from a
//! terminal (what Philote's Jane does).
//!
//! This module owns the client's argument parsing and the mapping from an
//! error to one line on stderr and an exit code (2 for usage errors, 1 for
//! the rest). It must not touch the server's configuration or state: the
//! client speaks protocol.md over a blocking tungstenite connection, like any
//! outside client. `main` sends `argv` here when its first argument is one of
//! [`SUBCOMMANDS`], before the server's own flags are parsed.
//!
//! - [`conn`]: `--url`/`--token` and opening one WebSocket connection.
//! - [`line`](mod@line): pure conversions between terminal text and protocol frames.
//! - [`sub`]: subscribe and print, reconnecting with backoff.
//! - [`publish`]: publish and wait for each `ack`.
//! - [`token`]: sign a token with the claims [`crate::auth`] reads.

use std::ffi::{OsStr, OsString};
use std::process::ExitCode;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Parser, Subcommand};

pub mod conn;
pub mod line;
pub mod publish;
pub mod sub;
pub mod token;

/// The first arguments that select the client instead of the server.
pub const SUBCOMMANDS: [&str; 3] = ["sub", "pub", "token"];

/// What `herald --help` appends to the server's help.
pub const SERVER_HELP_FOOTER: &str = "\
Command-line client (see `herald <command> --help`):
  herald sub CHANNEL...               print the messages published on channels
  herald pub CHANNEL [DATA]           publish DATA, or each line of standard input
  herald token --read .. --write ..   print a signed token for trying permissions
";

/// Does `arg` (argv\[1\]) select a client subcommand?
pub fn is_subcommand(arg: &OsStr) -> bool {
    arg.to_str().is_some_and(|a| SUBCOMMANDS.contains(&a))
}

/// herald's command-line client.
#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    max_term_width = 100,
    subcommand_required = true,
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Subscribe to channels and print every message on one line, until interrupted.
    ///
    /// Each message is printed as `channel<TAB>data` (data is the JSON the
    /// publisher sent, without insignificant whitespace), or with --json as
    /// the server's frame. A binary message is printed as
    /// `channel<TAB>base64:<payload>` (with --json:
    /// {"op":"message","channel":..,"base64":..}). Status lines ("subscribed
    /// to ..", "connection lost ..; reconnecting") go to stderr. When the
    /// server goes away, herald sub reconnects with backoff (100 ms doubling
    /// to 5 s) and subscribes again; it exits non-zero when the server
    /// refuses the token or a channel. SIGINT or SIGTERM ends it with status 0.
    #[command(after_help = sub::EXAMPLES)]
    Sub(sub::SubArgs),

    /// Publish DATA, or each line of standard input, to a channel.
    ///
    /// DATA that parses as JSON is sent as it is; any other text is sent as
    /// a JSON string. Without DATA, each non-empty line of standard input is
    /// one message. Every publish waits for the server's ack; the first error
    /// (forbidden, bad_request, ..) is printed on stderr and exits with 1.
    #[command(name = "pub", after_help = publish::EXAMPLES)]
    Pub(publish::PubArgs),

    /// Print a signed token (HS256 JWT) with read/write permissions.
    ///
    /// The token carries the claims herald reads: `read` and `write` channel
    /// patterns, optional `sub`, and `exp` from --ttl. It is signed with the
    /// server's SECRET, taken from the environment or --secret.
    #[command(after_help = token::EXAMPLES)]
    Token(token::TokenArgs),
}

/// Why a client command failed. `main` prints the `Display` text as one line
/// after `herald <command>: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or environment (exit code 2).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Connect(#[from] conn::ConnectError),
    /// The server answered with `{"op":"error","code":..,"message":..}`.
    #[error("{code}: {message}")]
    Server { code: String, message: String },
    /// Anything else; the text says what happened.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// 2 for usage errors, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Runs a client subcommand; `args` is the whole `argv` (`herald sub ...`).
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let name = args
        .get(1)
        .and_then(|a| a.to_str())
        .filter(|a| SUBCOMMANDS.contains(a))
        .unwrap_or("client")
        .to_string();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "herald {name}: {} (see 'herald {name} --help')",
                usage_line(&e)
            );
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Sub(a) => sub::run(a),
        Command::Pub(a) => publish::run(a),
        Command::Token(a) => token::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald {name}: {}", one_line(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

/// A clap error as one line: its message without the usage block, with the
/// missing arguments named.
fn usage_line(e: &clap::Error) -> String {
    if e.kind() == ErrorKind::MissingRequiredArgument {
        if let Some(ContextValue::Strings(args)) = e.get(ContextKind::InvalidArg) {
            return format!("missing required argument {}", args.join(", "));
        }
    }
    let text = e.to_string();
    let before_usage = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    one_line(before_usage.trim_start_matches("error: "))
}

/// Joins the lines of `s` with "; " so that an error is always one line.
pub fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(args: &[&str]) -> String {
        usage_line(&Cli::try_parse_from(args).unwrap_err())
    }

    #[test]
    fn subcommands_are_recognised() {
        assert!(is_subcommand(OsStr::new("sub")));
        assert!(is_subcommand(OsStr::new("pub")));
        assert!(is_subcommand(OsStr::new("token")));
        assert!(!is_subcommand(OsStr::new("--port")));
        assert!(!is_subcommand(OsStr::new("subscribe")));
    }

    #[test]
    fn usage_errors_are_one_line() {
        let e = parse_error(&["herald", "sub"]);
        assert_eq!(e, "missing required argument <CHANNEL>...");
        let e = parse_error(&["herald", "pub", "--bogus", "c"]);
        assert!(e.starts_with("unexpected argument '--bogus' found"), "{e}");
        assert!(!e.contains('\n'));
        let e = parse_error(&["herald", "pub", "--url", "wss://h/ws", "c", "d"]);
        assert!(e.contains("TLS"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn one_line_joins_lines() {
        assert_eq!(one_line("a\n\n  b\r\nc"), "a; b; c");
        assert_eq!(one_line("single"), "single");
    }

    #[test]
    fn clap_definitions_are_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
