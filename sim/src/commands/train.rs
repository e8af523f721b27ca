//! `aimatrix-sim train`: one training job on the digits over a simulated network, every
//! round's update computed by the real wasm guest (see `aimatrix_sim::training`).

use std::process::ExitCode;

use aimatrix_sim::training::{self, Report, RoundRow, TrainConfig};

/// Runs a training job on the digits over the simulated network and prints each round
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    config: TrainConfig,
    /// Print one JSON object instead of the table
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    args.config.check()?;
    let on_round: training::OnRound = if args.json {
        Box::new(|_: &RoundRow| {})
    } else {
        println!(
            "{:>5} {:>6} {:>8} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9}",
            "round",
            "seats",
            "received",
            "dropped",
            "accepted",
            "rejected",
            "bytes",
            "test loss",
            "test acc"
        );
        Box::new(print_row)
    };
    let report = training::run(&args.config, on_round)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(if report.job == "completed" { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_row(row: &RoundRow) {
    println!(
        "{:>5} {:>6} {:>8} {:>7} {:>8} {:>8} {:>9} {:>9.4} {:>8.2}%",
        row.round,
        row.participants,
        row.received,
        row.dropped,
        row.accepted,
        row.rejected,
        row.bytes,
        row.test_loss,
        100.0 * row.test_accuracy
    );
}

fn print_summary(r: &Report) {
    println!();
    println!(
        "final test accuracy {:.2} % after {} rounds (centralized baseline {:.2} %, {:+.2} points)",
        100.0 * r.accuracy,
        r.rounds,
        100.0 * r.baseline_accuracy,
        100.0 * (r.accuracy - r.baseline_accuracy)
    );
    let to_96 = r.rounds_to_96.map_or("never".to_owned(), |n| format!("at round {n}"));
    println!("96 % reached {to_96}; final test loss {:.4}", r.final_loss);
    println!(
        "update bytes: {:.0} per round, {:.0} per update ({:.2}x fewer than {} raw)",
        r.bytes_per_round, r.bytes_per_update, r.compression_ratio, r.raw_update_bytes
    );
    println!(
        "updates: {} received, {} accepted, {} rejected, {} paid; {} re-runs paid; {} leases \
         dropped; {} rounds failed",
        r.updates_received,
        r.updates_accepted,
        r.updates_rejected,
        r.updates_paid,
        r.reruns_paid,
        r.leases_dropped,
        r.rounds_failed
    );
    println!(
        "credits: {} escrowed, {} paid, {} refunded, escrow {}",
        r.credits_escrowed,
        r.credits_paid,
        r.credits_refunded,
        if r.escrow_balanced { "balanced" } else { "NOT balanced" }
    );
    println!(
        "job {}; {} nodes took leases; {:.0} simulated seconds",
        r.job, r.nodes_leased, r.simulated_s
    );
}
