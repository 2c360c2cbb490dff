//! The `herald` binary: parse the configuration, set up logging, run.

use std::io::IsTerminal;
use std::process::ExitCode;

use herald::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err((msg, 0)) => {
            print!("{msg}");
            return ExitCode::SUCCESS;
        }
        Err((msg, code)) => {
            eprintln!("{msg}");
            return ExitCode::from(code as u8);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.loglevel))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    match herald::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::from(1)
        }
    }
}
