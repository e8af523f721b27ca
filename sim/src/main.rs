//! `aimatrix-sim`: the command line of the aimatrix simulator.
//!
//! The simulator runs thousands of nodes and relays as a deterministic discrete-event simulation
//! driving the same sans-IO cores (`aimatrix-protocol`) the real binaries ship, with the
//! relay's own ledger state machine and a seed that replays any run exactly. The simulation
//! itself lives in this package's library (`aimatrix_sim`); this binary is its CLI.
//!
//! Subcommands live one per file under `src/commands/`: `run` simulates a scenario, `bench`
//! times runs at several sizes, and `train` runs one training job on the digits
//! (`aimatrix_sim::training`: the real cores, `aimatrix-training`'s plan and judge, and the real
//! `train-step` guest in the wasm sandbox). See `docs/sim.md` and `docs/training.md`.
//!
//! Exit status: 0 success, 1 the command ran and its answer is negative, 2 error. Logs go to
//! stderr, filtered by `RUST_LOG`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;

/// aimatrix simulator: deterministic runs of many nodes on the real protocol cores
#[derive(Debug, Parser)]
#[command(version, about)]
#[command(after_help = aimatrix_cli_support::AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    Run(commands::run::RunArgs),
    Bench(commands::bench::BenchArgs),
    Train(commands::train::TrainArgs),
}

fn main() -> ExitCode {
    aimatrix_cli_support::finish("aimatrix-sim", run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    aimatrix_cli_support::init_logging("aimatrix_sim")?;
    let Some(command) = cli.command else {
        return Ok(aimatrix_cli_support::bare_invocation::<Cli>());
    };
    match command {
        Command::Run(args) => commands::run::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Train(args) => commands::train::run(args),
    }
}
