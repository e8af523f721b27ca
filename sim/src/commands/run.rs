//! `aimatrix-sim run`: one deterministic run of a scenario, and its summary.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use aimatrix_sim::{Scenario, Sim};
use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

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
    /// Write CSV time series and SVG plots (queue length, propagation CDF, completion
    /// latency) into this directory
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Add wall time and peak RSS to the output (`wall_s`, `peak_rss_mib`); they vary from run
    /// to run, so the output is no longer byte-identical for a seed
    #[arg(long)]
    timing: bool,
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
    let bar = progress_bar(scenario.duration_s);
    let report = Sim::new(scenario).run_with_progress(&mut |done_ms, _| {
        if let Some(bar) = &bar {
            bar.set_position(done_ms / 1000);
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let wall_s = started.elapsed().as_secs_f64();
    let peak_rss_mib = peak_rss_mib();
    // Wall time and memory go to stderr: stdout stays byte-identical for a seed and scenario
    // (unless --timing asks for them there).
    tracing::info!(wall_ms = (wall_s * 1000.0) as u64, "run finished");
    let rss = peak_rss_mib.map_or("unknown".to_owned(), |m| format!("{m:.0} MiB"));
    eprintln!("wall time: {wall_s:.2} s, peak RSS: {rss}");
    let summary = &report.summary;
    if args.json {
        let mut value = serde_json::to_value(summary)?;
        if args.timing {
            value["wall_s"] = serde_json::json!((wall_s * 100.0).round() / 100.0);
            value["peak_rss_mib"] = serde_json::json!(peak_rss_mib.map(f64::round));
        }
        println!("{value}");
    } else {
        print!("{}", summary.to_text());
        if args.timing {
            println!("timing: wall {wall_s:.2} s, peak RSS {rss}");
        }
    }
    if let Some(dir) = &args.out {
        for path in super::out::write(dir, &report.series)? {
            tracing::info!(path = %path.display(), "wrote");
        }
    }
    Ok(if summary.invariants_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// A bar over simulated seconds, only when stderr is a terminal.
fn progress_bar(duration_s: u64) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(duration_s);
    let style = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} simulated s (eta {eta})",
    )
    .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    Some(bar)
}

/// The process's peak resident set (VmHWM), MiB; `None` where /proc is not there.
pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
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
