//! `aimatrix-sim bench`: wall time and peak memory of runs at several sizes, as a table.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context};

/// Times runs at several sizes (each in its own process, so each peak RSS is its own)
#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// A run as NODES:DURATION, e.g. 10000:1h; repeat for several (default: 1000:1h,
    /// 10000:1h, 100000:10m)
    #[arg(long = "case", value_name = "NODES:DURATION")]
    cases: Vec<String>,
    /// Scenario file (TOML); without it, the built-in baseline
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Print one JSON object per run instead of a table
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let cases = if args.cases.is_empty() {
        vec!["1000:1h".to_owned(), "10000:1h".to_owned(), "100000:10m".to_owned()]
    } else {
        args.cases.clone()
    };
    let exe = std::env::current_exe().context("finding the aimatrix-sim executable")?;
    if !args.json {
        println!(
            "{:>8} {:>9} {:>9} {:>13} {:>10} {:>8} {:>10} {:>10}",
            "nodes",
            "simulated",
            "wall s",
            "peak RSS MiB",
            "steps",
            "jobs",
            "completed",
            "invariants"
        );
    }
    let mut all_ok = true;
    for case in &cases {
        let Some((nodes, duration)) = case.split_once(':') else {
            bail!("--case {case:?}: expected NODES:DURATION, e.g. 10000:1h");
        };
        let nodes: u32 =
            nodes.parse().with_context(|| format!("--case {case:?}: {nodes:?} is not a count"))?;
        super::run::parse_duration_s(duration)
            .map_err(|e| anyhow::anyhow!("--case {case:?}: {e}"))?;
        let mut cmd = Command::new(&exe);
        cmd.args([
            "run",
            "--json",
            "--timing",
            "--nodes",
            &nodes.to_string(),
            "--duration",
            duration,
        ]);
        if let Some(s) = &args.scenario {
            cmd.arg("--scenario").arg(s);
        }
        let out = cmd.stderr(Stdio::null()).output().context("running a case")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("case {case}: no JSON summary (exit {})", out.status))?;
        let ok = v["invariants_ok"].as_bool().unwrap_or(false);
        all_ok &= ok;
        if args.json {
            println!("{v}");
        } else {
            println!(
                "{:>8} {:>9} {:>9.2} {:>13} {:>10} {:>8} {:>10} {:>10}",
                nodes,
                duration,
                v["wall_s"].as_f64().unwrap_or(f64::NAN),
                v["peak_rss_mib"].as_f64().map_or("?".to_owned(), |m| format!("{m:.0}")),
                v["steps"].as_u64().unwrap_or(0),
                v["jobs"]["posted"].as_u64().unwrap_or(0),
                v["jobs"]["completed"].as_u64().unwrap_or(0),
                if ok { "ok" } else { "FAILED" }
            );
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
