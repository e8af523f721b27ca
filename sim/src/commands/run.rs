//! `aimatrix-sim run`: one deterministic run of a scenario, and its summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use aimatrix_sim::{Scenario, Sim};
use anyhow::{bail, Context};

/// Runs a scenario and prints its summary (jobs, latencies, traffic, credits, invariants)
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// Compute nodes (overrides the scenario)
    #[arg(long)]
    nodes: Option<u32>,
    /// Relays (overrides the scenario)
    #[arg(long)]
    relays: Option<u32>,
    /// Simulated time, e.g. 90s, 30m, 1h (overrides the scenario)
    #[arg(long, value_parser = parse_duration_s)]
    duration: Option<u64>,
    /// Seed every random choice derives from (overrides the scenario)
    #[arg(long)]
    seed: Option<u64>,
    /// Scenario file (TOML); without it, the built-in baseline
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

/// Parses `90`, `90s`, `30m`, `2h` into seconds.
pub(crate) fn parse_duration_s(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 =
        digits.parse().map_err(|_| format!("{text:?} is not a duration; try 90s, 30m or 1h"))?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{text:?} has unknown unit {unit:?}; use s, m or h")),
    };
    Ok(n * factor)
}

pub(crate) fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut scenario = match &args.scenario {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading scenario {}", path.display()))?;
            Scenario::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Scenario::default(),
    };
    if let Some(n) = args.nodes {
        scenario.nodes = n;
    }
    if let Some(r) = args.relays {
        scenario.relays = r;
    }
    if let Some(d) = args.duration {
        scenario.duration_s = d;
    }
    if let Some(s) = args.seed {
        scenario.seed = s;
    }
    if let Err(e) = scenario.validate() {
        bail!("{e}");
    }
    let started = Instant::now();
    let summary = Sim::new(scenario).run();
    // Wall time goes to stderr: stdout stays byte-identical for a seed and scenario.
    tracing::info!(wall_ms = started.elapsed().as_millis() as u64, "run finished");
    eprintln!("wall time: {:.2} s", started.elapsed().as_secs_f64());
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", summary.to_text());
    }
    Ok(if summary.invariants_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration_s("1h"), Ok(3600));
        assert_eq!(parse_duration_s("30m"), Ok(1800));
        assert_eq!(parse_duration_s("90"), Ok(90));
        assert!(parse_duration_s("1d").is_err());
        assert!(parse_duration_s("soon").is_err());
    }
}
