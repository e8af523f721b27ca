//! `aimatrix-node`: the program each machine in the aimatrix network runs.
//!
//! A node is one libp2p peer with one ed25519 identity (its key file in the data directory). It
//! detects its hardware and runtimes, advertises what it can run, claims job offers it can
//! serve, runs them in a sandbox (`aimatrix-sandbox`: wasmtime, or Docker when an engine is
//! present) and returns signed results. Every decision about a job is made by the sans-IO
//! `NodeCore` of `aimatrix-protocol`, and how a training round is run (its inputs, arguments and
//! private outputs) by `aimatrix-training`'s `plan_step`; this binary only carries bytes, time
//! and side effects in and out of them.
//!
//! `join` (`src/join/`) is the node driver: the libp2p swarm of `aimatrix-net`, the core, the
//! sandbox runs, receipts and job history, and the local control API (`src/api/`). The other
//! subcommands live one per file under `src/commands/`: `status` and `compute`
//! (`available`, `accept`, `join-training`) ask a running node through its control API;
//! `devnet` runs a relay and several nodes on loopback with sample jobs; `exec` runs a job
//! locally in the sandbox (wasm or Docker); `detect` reports the hardware, runtimes and job
//! kinds the node would advertise; `workloads` lists or writes the shipped guests. See
//! `docs/node.md` and `docs/network.md`.
//!
//! Exit status: 0 success, 1 the command ran and its answer is negative, 2 error. Logs go to
//! stderr, filtered by `RUST_LOG`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod api;
mod client;
mod commands;
mod data_dir;
mod hardware;
mod history;
mod join;
mod policy;
mod prepare;

/// aimatrix compute node: joins the network, advertises hardware, runs jobs in a sandbox
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
    Detect(commands::detect::DetectArgs),
    Exec(commands::exec::ExecArgs),
    Workloads(commands::workloads::WorkloadsArgs),
    Status(commands::status::StatusArgs),
    Earnings(commands::earnings::EarningsArgs),
    Compute(commands::compute::ComputeArgs),
    Join(join::JoinArgs),
    Devnet(commands::devnet::DevnetArgs),
}

fn main() -> ExitCode {
    aimatrix_cli_support::finish("aimatrix-node", run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    aimatrix_cli_support::init_logging("aimatrix_node")?;
    let Some(command) = cli.command else {
        return Ok(aimatrix_cli_support::bare_invocation::<Cli>());
    };
    match command {
        Command::Detect(args) => commands::detect::run(args),
        Command::Exec(args) => commands::exec::run(args),
        Command::Workloads(args) => commands::workloads::run(args),
        Command::Status(args) => commands::status::run(args),
        Command::Earnings(args) => commands::earnings::run(args),
        Command::Compute(args) => commands::compute::run(args),
        Command::Join(args) => join::run(args),
        Command::Devnet(args) => commands::devnet::run(args),
    }
}
