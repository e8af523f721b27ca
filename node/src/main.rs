//! `aimatrix-node`: the program each machine in the aimatrix network runs.
//!
//! A node is one libp2p peer with one ed25519 identity. It will detect its hardware, advertise it,
//! claim job offers it can serve, run them in a sandbox (`aimatrix-sandbox`) and return signed
//! results; every decision about a job is made by the sans-IO core in `aimatrix-protocol`, and
//! this binary only carries bytes, time and side effects in and out of it.
//!
//! Subcommands live one per file under `src/commands/`: `exec` runs a job locally in the
//! sandbox (wasm or Docker), `detect` reports the hardware and runtimes the node would
//! advertise, `workloads` lists the shipped guests; `status` and `compute` ask a running node
//! through its local control API (`src/api/`).
//!
//! Exit status: 0 success, 1 the command ran and its answer is negative, 2 error. Logs go to
//! stderr, filtered by `RUST_LOG`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The join driver serves the API and keeps the history under the policy; until it is wired
// in, only the client side of the API is used outside tests.
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
        Command::Compute(args) => commands::compute::run(args),
        Command::Join(args) => join::run(args),
        Command::Devnet(args) => commands::devnet::run(args),
    }
}
