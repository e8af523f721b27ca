//! `studio-relay`: the Studio relay that requesters post jobs to.
//!
//! The relay will take job specs from requesters (CLI and HTTP), reserve their rewards in its
//! ledger, offer the jobs to nodes, grant leases, verify the results that come back, aggregate
//! training updates and pay workers in credits. Every decision is made by the sans-IO core in
//! `aimatrix-protocol`; the relay driver in this package's library (`studio_relay`) carries bytes,
//! time, ledger writes and HTTP requests in and out of it, and this binary is its CLI.
//!
//! Subcommands arrive with the issues that build them, one variant of `Command` each (one file
//! per group under `commands/`). Today: `ledger` (mint, balance, history, audit, export).
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

/// aimatrix Studio relay: posts jobs to nodes, verifies results, pays workers in credits
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
    /// The credit ledger: mint, balance, history, audit, export.
    ///
    /// These commands work directly on the ledger files in --data-dir, so the relay must be
    /// stopped (the database is locked while it runs). Going through a running relay's HTTP API
    /// arrives with the relay itself (issue 6).
    Ledger(commands::ledger::LedgerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("studio-relay: error: {err:#}");
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
        Command::Ledger(args) => commands::ledger::run(args),
    }
}

/// Sends `tracing` output to stderr, filtered by `RUST_LOG`.
fn init_logging() -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .map_err(|err| {
                anyhow!(
                    "RUST_LOG={directives:?} is not a valid log filter ({err}); \
                     try RUST_LOG=info or RUST_LOG=studio_relay=debug"
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
