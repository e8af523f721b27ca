//! `aimatrix-sim`: the command line of the aimatrix simulator.
//!
//! The simulator will run thousands of nodes and a relay as a deterministic discrete-event
//! simulation driving the same sans-IO cores (`aimatrix-protocol`) the real binaries ship, with a
//! seed that replays any run exactly. The simulation itself lives in this package's library
//! (`aimatrix_sim`); this binary is its CLI.
//!
//! Subcommands live one per file under `src/commands/`: `run` simulates a scenario.
//!
//! Exit status: 0 success, 1 the command ran and its answer is negative, 2 error. Logs go to
//! stderr, filtered by `RUST_LOG`.

use std::env::VarError;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::{CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

mod commands;

/// Exit status for every error: bad usage, bad input, a failure while running.
const EXIT_ERROR: u8 = 2;

/// Log filter used when `RUST_LOG` is unset or empty.
const LOG_FILTER_DEFAULT: &str = "warn";

/// aimatrix simulator: deterministic runs of many nodes on the real protocol cores
#[derive(Debug, Parser)]
#[command(version, about)]
#[command(after_help = "Exit status: 0 success, 1 the command ran and its answer is negative, \
                        2 error.\nLogs go to stderr; RUST_LOG sets the filter (default: warn).")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    Run(commands::run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("aimatrix-sim: error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging()?;
    let Some(command) = cli.command else {
        // A bare invocation is a usage error, like any other clap rejects: show help, exit 2.
        eprint!("{}", Cli::command().render_help());
        return Ok(ExitCode::from(EXIT_ERROR));
    };
    match command {
        Command::Run(args) => commands::run::run(args),
    }
}

/// Sends `tracing` output to stderr, filtered by `RUST_LOG`.
fn init_logging() -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .map_err(|err| {
                anyhow!(
                    "RUST_LOG={directives:?} is not a valid log filter ({err}); \
                     try RUST_LOG=info or RUST_LOG=aimatrix_sim=debug"
                )
            })?,
        Ok(_) | Err(VarError::NotPresent) => EnvFilter::new(LOG_FILTER_DEFAULT),
        Err(VarError::NotUnicode(_)) => {
            bail!("RUST_LOG is not valid UTF-8; try RUST_LOG=info or unset it")
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|err| anyhow!("installing the stderr logger failed: {err}"))
}
