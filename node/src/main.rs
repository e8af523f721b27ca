//! `aimatrix-node`: the program each machine in the aimatrix network runs.
//!
//! A node is one libp2p peer with one ed25519 identity. It will detect its hardware, advertise it,
//! claim job offers it can serve, run them in a sandbox (`aimatrix-sandbox`) and return signed
//! results; every decision about a job is made by the sans-IO core in `aimatrix-protocol`, and
//! this binary only carries bytes, time and side effects in and out of it.
//!
//! Subcommands live one per file under `src/commands/`: `exec` runs a job locally in the
//! sandbox (wasm or Docker), `detect` reports the hardware and runtimes the node would
//! advertise, `workloads` lists the shipped guests; the network subcommands arrive with their
//! issues.
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
mod data_dir;
mod hardware;

/// Exit status for every error: bad usage, bad input, a failure while running.
const EXIT_ERROR: u8 = 2;

/// Log filter used when `RUST_LOG` is unset or empty.
const LOG_FILTER_DEFAULT: &str = "warn";

/// aimatrix compute node: joins the network, advertises hardware, runs jobs in a sandbox
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
    Detect(commands::detect::DetectArgs),
    Exec(commands::exec::ExecArgs),
    Workloads(commands::workloads::WorkloadsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("aimatrix-node: error: {err:#}");
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
        Command::Detect(args) => commands::detect::run(args),
        Command::Exec(args) => commands::exec::run(args),
        Command::Workloads(args) => commands::workloads::run(args),
    }
}

/// Sends `tracing` output to stderr, filtered by `RUST_LOG`.
fn init_logging() -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .map_err(|err| {
                anyhow!(
                    "RUST_LOG={directives:?} is not a valid log filter ({err}); \
                     try RUST_LOG=info or RUST_LOG=aimatrix_node=debug"
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
