//! The `herald` binary: parse the configuration, set up logging, run.
//!
//! `herald sub`, `herald pub` and `herald token` are the command-line client
//! ([`herald::cli`]); they are dispatched before the server's configuration
//! is read, so the server's flags and environment do not apply to them.

use std::process::ExitCode;

use herald::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| herald::cli::is_subcommand(&a))
    {
        return herald::cli::run(std::env::args_os());
    }
    let config = match Config::from_env() {
        Ok(c) => c,
        Err((msg, 0)) => {
            // --help (not --version, which is one line) also lists the client.
            if msg.lines().nth(1).is_some() {
                print!("{msg}\n{}", herald::cli::SERVER_HELP_FOOTER);
            } else {
                print!("{msg}");
            }
            return ExitCode::SUCCESS;
        }
        Err((msg, code)) => {
            eprintln!("{msg}");
            return ExitCode::from(code as u8);
        }
    };
    if let Some(effective) = &config.effective {
        print!("{effective}");
        return ExitCode::SUCCESS;
    }
    let loaded = match herald::frontends::load(&config) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("herald: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = herald::runtime::logs::init(&config) {
        eprintln!("herald: {e}");
        return ExitCode::from(2);
    }
    match herald::runtime::run(config, loaded) {
        Ok(()) => ExitCode::SUCCESS,
        // A HISTORY_DIR that cannot be used is a configuration mistake.
        Err(
            e @ (herald::runtime::ServerError::History(_)
            | herald::runtime::ServerError::Cluster(_)
            | herald::runtime::ServerError::Tls(_)),
        ) => {
            eprintln!("herald: {e}");
            ExitCode::from(2)
        }
        Err(herald::runtime::ServerError::Listen(e)) if e.is_configuration() => {
            eprintln!("herald: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::from(1)
        }
    }
}
