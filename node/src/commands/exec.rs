//! `aimatrix-node exec`: run a job locally under the sandbox and limits a node would apply.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use aimatrix_protocol::job::{ContentRef, JobSpec};
use aimatrix_sandbox::docker::{DockerConfig, DockerExecutor};
use aimatrix_sandbox::wasm::{ModuleSource, WasmConfig, WasmExecutor};
use aimatrix_sandbox::{
    ExecLimits, ExecOutcome, ExecStatus, Executor, JobWorkload, PreparedJob, RunControl,
};
use anyhow::{bail, Context};
use clap::Args;

use crate::data_dir;
use crate::prepare::{self, ContentUse};

/// Owner tag of `exec`'s containers: this prefix and the process id.
const EXEC_OWNER_PREFIX: &str = "aimatrix-exec-";

/// Whether `owner` names an `exec` run whose process no longer exists.
fn exec_run_is_gone(owner: &str) -> bool {
    owner
        .strip_prefix(EXEC_OWNER_PREFIX)
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Run a job locally, exactly as a node would, to try it before posting it.
///
/// Takes a job file (`job.toml`, wasm or docker runtime) or a bare wasm module. Docker jobs
/// need a reachable engine and their image present locally (nothing is pulled). Flags override the job file's limits
/// (and give the limits for a bare module). Exit status: 0 the job succeeded, 1 it ran and did
/// not succeed, 2 it could not run.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// The job file (`*.toml`) or wasm module (`*.wasm`) to run.
    job: PathBuf,
    /// An extra input file, placed in the job's input directory under its file name.
    #[arg(long = "input", value_name = "FILE")]
    inputs: Vec<PathBuf>,
    /// Wall-time limit in seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Memory limit in MiB.
    #[arg(long, value_name = "N")]
    memory_mb: Option<u64>,
    /// Fuel budget (0 = no fuel limit).
    #[arg(long, value_name = "N")]
    fuel: Option<u64>,
    /// Run in deterministic mode (always on for replicated and training jobs).
    #[arg(long)]
    deterministic: bool,
    /// Copy the output files into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The node's data directory (holds the compiled-module cache).
    #[arg(long, value_name = "DIR", env = "AIMATRIX_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
    /// Arguments for a bare module (after `--`); a job file's come from `workload.args`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

pub(crate) fn run(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let (job, work, cpu_share) = prepare(&args)?;
    let data_dir = data_dir::resolve(args.data_dir.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(async {
        let executor: Box<dyn Executor> = match &job.workload {
            JobWorkload::Wasm(_) => {
                Box::new(WasmExecutor::new(WasmConfig::in_dir(data_dir.join("wasm-cache")))?)
            }
            JobWorkload::Container(_) => {
                let owner = format!("{EXEC_OWNER_PREFIX}{}", std::process::id());
                let cfg = DockerConfig { cpu_share, owner, ..DockerConfig::default() };
                let docker = DockerExecutor::connect(cfg).await?;
                // Containers of earlier `exec` runs that were killed before they could clean up.
                let swept = docker.remove_stale_owners(exec_run_is_gone).await?;
                if swept > 0 {
                    tracing::info!("removed {swept} container(s) left by interrupted exec runs");
                }
                Box::new(docker)
            }
        };
        let control = RunControl::default();
        let cancel = control.cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        });
        executor.run(job, control).await
    })?;
    if let Some(out) = &args.out {
        copy_outputs(&work.path().join(aimatrix_sandbox::OUTPUTS_DIR), out, &outcome)?;
    }
    if args.json {
        println!("{}", to_json(&outcome));
    } else {
        print_human(&outcome, args.out.as_deref())?;
    }
    Ok(if outcome.status.is_success() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Builds the prepared job and its private work directory (with the inputs copied in).
fn prepare(args: &ExecArgs) -> anyhow::Result<(PreparedJob, tempfile::TempDir, f64)> {
    let shown = args.job.display().to_string();
    let is_toml = args.job.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml"));
    let work = tempfile::Builder::new()
        .prefix("aimatrix-exec-")
        .tempdir()
        .context("cannot create a work directory")?;
    let inputs_dir = work.path().join(aimatrix_sandbox::INPUTS_DIR);
    std::fs::create_dir_all(&inputs_dir)?;
    let mut names = BTreeSet::new();
    let mut cpu_share = aimatrix_protocol::job::Limits::default().cpu_share;
    let mut job = if is_toml {
        let text =
            std::fs::read_to_string(&args.job).with_context(|| format!("cannot read {shown}"))?;
        let spec =
            JobSpec::from_toml(&text).map_err(|e| anyhow::anyhow!("{}", e.with_source(&shown)))?;
        let base = args.job.parent().unwrap_or(Path::new("."));
        cpu_share = spec.limits.cpu_share;
        if !args.args.is_empty() {
            bail!(
                "{shown}: arguments after `--` only apply to a bare module; set workload.args in \
                 the job file"
            );
        }
        let mut resolve = |content: &ContentRef, what: ContentUse<'_>| match content {
            ContentRef::Path(p) => Ok(base.join(p)),
            ContentRef::Digest(d) => bail!(
                "{what} = \"{d}\" names content by hash, and `exec` has no content store to \
                 fetch it from; point it at a file"
            ),
        };
        prepare::from_spec(&spec, work.path(), &mut names, &mut resolve)
            .map_err(|e| anyhow::anyhow!("{shown}: {e:#}"))?
    } else {
        let module = ModuleSource::from_file(&args.job, prepare::MODULE_BYTES_MAX)?;
        let mut job =
            PreparedJob::new(JobWorkload::Wasm(module), work.path(), ExecLimits::default());
        job.args.clone_from(&args.args);
        job
    };
    for input in &args.inputs {
        let name = input
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("--input {}: not a file name", input.display()))?;
        prepare::copy_input(input, &inputs_dir, name, &mut names)
            .with_context(|| format!("--input {}", input.display()))?;
    }
    if let Some(t) = args.timeout {
        if t == 0 {
            bail!("--timeout must be at least 1 second");
        }
        job.limits.timeout = Duration::from_secs(t);
    }
    if let Some(m) = args.memory_mb {
        job.limits.memory_bytes = m.saturating_mul(1 << 20);
    }
    if let Some(f) = args.fuel {
        job.limits.fuel = (f > 0).then_some(f);
    }
    job.deterministic |= args.deterministic;
    Ok((job, work, cpu_share))
}

fn copy_outputs(outputs_dir: &Path, out: &Path, outcome: &ExecOutcome) -> anyhow::Result<()> {
    for file in &outcome.outputs {
        let target = out.join(&file.name);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        // Only files the collector vetted (regular, inside the outputs, within quota) are copied.
        std::fs::copy(outputs_dir.join(&file.name), &target)
            .with_context(|| format!("cannot write {}", target.display()))?;
    }
    Ok(())
}

fn to_json(outcome: &ExecOutcome) -> serde_json::Value {
    let exit_code = match outcome.status {
        ExecStatus::Succeeded => Some(0),
        ExecStatus::Failed { exit_code } => Some(exit_code),
        _ => None,
    };
    let reason = match &outcome.status {
        ExecStatus::Trapped { reason } => Some(reason.clone()),
        ExecStatus::OutputLimitExceeded { what } => Some(what.clone()),
        _ => None,
    };
    serde_json::json!({
        "status": outcome.status.name(),
        "reason": reason,
        "exit_code": exit_code,
        "stdout": String::from_utf8_lossy(&outcome.stdout),
        "stderr": String::from_utf8_lossy(&outcome.stderr),
        "outputs": outcome.outputs.iter().map(|o| serde_json::json!({
            "name": o.name,
            "sha256": o.sha256.to_hex(),
            "bytes": o.bytes,
        })).collect::<Vec<_>>(),
        "usage": {
            "wall_ms": outcome.usage.wall_ms,
            "cpu_ms": outcome.usage.cpu_ms,
            "peak_memory_bytes": outcome.usage.peak_memory_bytes,
            "fuel": outcome.usage.fuel_consumed,
        },
    })
}

fn print_human(outcome: &ExecOutcome, out: Option<&Path>) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if !outcome.stdout.is_empty() {
        stdout.write_all(&outcome.stdout)?;
        if !outcome.stdout.ends_with(b"\n") {
            writeln!(stdout)?;
        }
    }
    if !outcome.stderr.is_empty() {
        let mut stderr = std::io::stderr().lock();
        stderr.write_all(&outcome.stderr)?;
    }
    writeln!(stdout, "status: {}", outcome.status)?;
    if !outcome.outputs.is_empty() {
        writeln!(
            stdout,
            "outputs{}:",
            out.map(|o| format!(" (copied to {})", o.display())).unwrap_or_default()
        )?;
        for o in &outcome.outputs {
            writeln!(stdout, "  {:<32} {:>10} bytes  {}", o.name, o.bytes, o.sha256)?;
        }
    }
    let u = &outcome.usage;
    writeln!(
        stdout,
        "usage: {} ms wall, {} ms cpu, {:.1} MiB peak memory, {} fuel",
        u.wall_ms,
        u.cpu_ms,
        u.peak_memory_bytes as f64 / (1 << 20) as f64,
        u.fuel_consumed
    )?;
    Ok(())
}
