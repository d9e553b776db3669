//! `cosine-train`: parse the command line, run the command, print an error once, exit.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use cosine_train::commands::{self, Cli, doctor};

fn main() -> ExitCode {
    cosine_train::runtime::memory::tune_allocator();
    init_logging();
    let mut command = Cli::command();
    // The long version describes the environment; only probe it when asked for.
    if std::env::args().any(|a| a == "--version") {
        let line: &'static str = Box::leak(doctor::collect().summary_line().into_boxed_str());
        command = command.long_version(line);
    }
    let matches = command.get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match commands::run(cli, &matches) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("cosine-train: {err:#}");
            commands::exit_code(&err)
        }
    }
}

/// Log lines go to stderr; `COSINE_LOG` (or `RUST_LOG`) sets the filter, default `info`.
fn init_logging() {
    let filter = std::env::var("COSINE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
