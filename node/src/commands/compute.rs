//! `aimatrix-node compute`: the offers the running node has heard, claiming one, and joining a
//! training job.

use std::io::Write;
use std::process::ExitCode;

use aimatrix_protocol::job::JobKind;
use aimatrix_protocol::messages::JobId;
use clap::{Args, Subcommand};
use serde_json::json;

use super::{now_ms, relative};
use crate::api::args::ApiArgs;
use crate::api::views::RequirementsView;
use crate::client::Client;

/// Work offered to the running node: list open offers, claim one, join a training job.
///
/// Asks the local control API of `aimatrix-node join`, which must be running (see --api).
#[derive(Debug, Args)]
pub(crate) struct ComputeArgs {
    #[command(subcommand)]
    command: ComputeCommand,
}

#[derive(Debug, Subcommand)]
enum ComputeCommand {
    Available(AvailableArgs),
    Accept(AcceptArgs),
    JoinTraining(JoinTrainingArgs),
}

/// List the open offers this node can take now (id, kind, reward, requirements, deadline).
#[derive(Debug, Args)]
struct AvailableArgs {
    /// Also list the offers it cannot take, with every reason.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    api: ApiArgs,
    /// Print one JSON object per offer instead of the table.
    #[arg(long)]
    json: bool,
}

/// Claim an offered job (for a node joined with `--accept manual`).
///
/// Exit status 1 when the node refuses the claim (it says why). A claim is not a lease: the
/// relay answers with a lease or a denial, which `aimatrix-node status` shows.
#[derive(Debug, Args)]
struct AcceptArgs {
    /// The job id (32 hex digits, from `compute available`).
    job_id: JobId,
    #[command(flatten)]
    api: ApiArgs,
    /// Print one JSON object instead of the sentence.
    #[arg(long)]
    json: bool,
}

/// Join a running training job as a participant.
///
/// Claims the job's offer like `compute accept`, for training jobs only: the relay admits the
/// node at the next round boundary and then leases it a chunk every round until the job ends
/// (or the node drops out: a missed deadline or a rejected update ends its participation).
/// Exit status 1 when the job is not a training job this node has heard of and can serve.
#[derive(Debug, Args)]
struct JoinTrainingArgs {
    /// The training job's id (32 hex digits, from `compute available`).
    job_id: JobId,
    #[command(flatten)]
    api: ApiArgs,
    /// Print one JSON object instead of the sentence.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: ComputeArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ComputeCommand::Available(args) => available(args),
        ComputeCommand::Accept(args) => accept(args),
        ComputeCommand::JoinTraining(args) => join_training(args),
    }
}

fn join_training(args: JoinTrainingArgs) -> anyhow::Result<ExitCode> {
    let addr = args.api.addr(None).map_err(anyhow::Error::msg)?;
    let client = Client::new(addr);
    let id = args.job_id;
    let offers = client.offers(true)?;
    let refuse = |reason: String| -> anyhow::Result<ExitCode> {
        if args.json {
            println!("{}", json!({ "job_id": id.to_string(), "joined": false, "reason": reason }));
        } else {
            eprintln!("aimatrix-node: the node did not join job {id}: {reason}");
        }
        Ok(ExitCode::from(1))
    };
    let Some(offer) = offers.iter().find(|o| o.job_id == id.to_string()) else {
        return refuse(
            "this node has heard no open offer for it (`aimatrix-node compute available --all` \
             lists what it has heard)"
                .to_owned(),
        );
    };
    if offer.kind != JobKind::Training {
        return refuse(format!(
            "it is a {} job, not a training job; claim it with `aimatrix-node compute accept`",
            offer.kind.name()
        ));
    }
    match client.accept(id)? {
        Ok(()) => {
            if args.json {
                println!("{}", json!({ "job_id": id.to_string(), "joined": true }));
            } else {
                println!(
                    "asked to join training job {id}; the relay admits this node at the next \
                     round boundary (`aimatrix-node status` shows each round's lease)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => refuse(reason),
    }
}

fn available(args: AvailableArgs) -> anyhow::Result<ExitCode> {
    let addr = args.api.addr(None).map_err(anyhow::Error::msg)?;
    let offers = Client::new(addr).offers(args.all)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        for offer in &offers {
            writeln!(out, "{}", serde_json::to_string(offer)?)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if offers.is_empty() {
        let none = if args.all {
            "no open offers heard"
        } else {
            "no open offers this node can take (--all lists the others and why)"
        };
        writeln!(out, "{none}")?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_ms();
    writeln!(
        out,
        "{:<32}  {:<15}  {:>8}  {:<28}  {:<12}  NAME",
        "JOB", "KIND", "REWARD", "NEEDS", "DEADLINE"
    )?;
    for offer in &offers {
        writeln!(
            out,
            "{:<32}  {:<15}  {:>8}  {:<28}  {:<12}  {}",
            offer.job_id,
            offer.kind.name(),
            offer.reward,
            needs(&offer.requirements),
            relative(offer.deadline_ms, now),
            offer.name
        )?;
        if !offer.can_serve {
            for reason in &offer.reasons {
                writeln!(out, "    cannot take: {reason}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `2 cores, 512 MiB, wasm` (`, 1 GPU 16 GiB` when it asks for GPUs).
fn needs(r: &RequirementsView) -> String {
    let cores = if r.cpu_cores == 1 { "core" } else { "cores" };
    let mut text = format!("{} {cores}, {} MiB, {}", r.cpu_cores, r.memory_mb, r.runtime);
    if r.gpus > 0 {
        text.push_str(&format!(", {} GPU {} GiB", r.gpus, r.vram_gb));
    }
    text
}

fn accept(args: AcceptArgs) -> anyhow::Result<ExitCode> {
    let addr = args.api.addr(None).map_err(anyhow::Error::msg)?;
    let answer = Client::new(addr).accept(args.job_id)?;
    let id = args.job_id;
    match answer {
        Ok(()) => {
            if args.json {
                println!("{}", json!({ "job_id": id.to_string(), "claimed": true }));
            } else {
                println!(
                    "claimed job {id}; the relay answers with a lease or a denial \
                     (`aimatrix-node status` shows the job once it runs)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            if args.json {
                let answer =
                    json!({ "job_id": id.to_string(), "claimed": false, "reason": reason });
                println!("{answer}");
            } else {
                eprintln!("aimatrix-node: the node did not claim job {id}: {reason}");
            }
            Ok(ExitCode::from(1))
        }
    }
}
