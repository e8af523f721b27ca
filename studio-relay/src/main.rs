//! `studio-relay`: the Studio relay that requesters post jobs to.
//!
//! The relay takes job specs from requesters (CLI and HTTP), reserves their rewards in its
//! ledger, offers the jobs to nodes, grants leases, verifies the results that come back, judges
//! training rounds and pays workers in credits. Every decision is made by the sans-IO core in
//! `aimatrix-protocol` (and, for what training bytes mean, `aimatrix-training`); the relay
//! driver in `serve/` carries bytes, time, ledger writes and HTTP requests in and out of it,
//! over the ledger, stores, API and client of this package's library (`studio_relay`).
//!
//! Subcommands, one variant of `Command` each (one file per group under `commands/`): `serve`
//! (the relay), `status`, `job` (post, status, list, result, cancel, through the running
//! relay's HTTP API) and `ledger` (mint, balance, history, audit, export).
//!
//! Exit status: 0 success, 1 the command ran and its answer is negative, 2 error. Logs go to
//! stderr, filtered by `RUST_LOG`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod serve;

/// aimatrix Studio relay: posts jobs to nodes, verifies results, pays workers in credits
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
    /// Run the relay (libp2p peer, job intake, verification, payments, HTTP API).
    Serve(serve::ServeArgs),
    /// Show the running relay: address, peers, known nodes, open jobs, rejected messages.
    Status(commands::status::StatusArgs),
    /// Jobs on the running relay: post, status, list, result, cancel.
    Job(commands::job::JobArgs),
    /// The credit ledger: mint, balance, history, audit, export.
    ///
    /// These go through the running relay's HTTP API (--api), or, with --data-dir, work
    /// directly on the ledger files there while the relay is stopped.
    Ledger(commands::ledger::LedgerArgs),
}

fn main() -> ExitCode {
    aimatrix_cli_support::finish("studio-relay", run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    aimatrix_cli_support::init_logging("studio_relay")?;
    let Some(command) = cli.command else {
        return Ok(aimatrix_cli_support::bare_invocation::<Cli>());
    };
    match command {
        Command::Serve(args) => serve::run(args),
        Command::Status(args) => commands::status::run(args),
        Command::Job(args) => commands::job::run(args),
        Command::Ledger(args) => commands::ledger::run(args),
    }
}
