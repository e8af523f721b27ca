//! Sandboxes that run untrusted jobs: one [`Executor`] trait and its implementations.
//!
//! A node (and the simulator's `train` command, which runs the real `train-step` guest) prepares
//! a job — the workload, a private work directory holding `inputs/` (and an empty `outputs/`;
//! [`INPUTS_DIR`], [`OUTPUTS_DIR`]), the limits — and hands it to an executor as a
//! [`PreparedJob`]. The guest sees them as `/job/inputs` (read-only) and `/job/outputs`. The
//! executor runs it under those limits, honours cancellation, forwards progress, and returns an
//! [`ExecOutcome`]: a [`ExecStatus`], capped stdout and stderr, the output files with their
//! SHA-256 and size (collected without following symlinks, see [`outputs`]), and [`Usage`].
//!
//! - [`wasm::WasmExecutor`]: WASI preview 1 modules in wasmtime, with a memory limit, a fuel
//!   budget, a wall-time deadline driven by an epoch ticker, a stack limit, capped output capture,
//!   no network and a deterministic mode; compiled modules are cached on disk and pre-linked.
//! - [`docker::DockerExecutor`]: container images through the Docker engine (bollard), hardened
//!   by default (no network, read-only root, dropped capabilities, non-root, pids/memory/CPU
//!   limits) and always removed.
//!
//! ```no_run
//! use aimatrix_sandbox::{wasm::{WasmExecutor, WasmConfig, ModuleSource}, Executor, PreparedJob,
//!     ExecLimits, JobWorkload, RunControl};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let executor = WasmExecutor::new(WasmConfig::in_dir("/var/lib/aimatrix/wasm-cache"))?;
//! let module = ModuleSource::new("hello.wasm", std::fs::read("hello.wasm")?);
//! let job = PreparedJob::new(JobWorkload::Wasm(module), "/tmp/job-1", ExecLimits::default());
//! let outcome = executor.run(job, RunControl::default()).await?;
//! println!("{:?}: {}", outcome.status, String::from_utf8_lossy(&outcome.stdout));
//! # Ok(()) }
//! ```

pub mod docker;
pub mod outputs;
pub mod wasm;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use aimatrix_protocol::hash::Digest;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use aimatrix_protocol::messages::Usage;

/// The name of the inputs directory inside a job's work directory.
pub const INPUTS_DIR: &str = "inputs";
/// The name of the outputs directory inside a job's work directory.
pub const OUTPUTS_DIR: &str = "outputs";

/// What runs.
#[derive(Clone, Debug)]
pub enum JobWorkload {
    /// A WASI preview 1 core module.
    Wasm(wasm::ModuleSource),
    /// A container image and command, for the Docker executor.
    Container(docker::ContainerWorkload),
}

/// Limits an executor enforces while a job runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecLimits {
    /// Wall-time limit; always applies.
    pub timeout: Duration,
    /// Most linear memory (wasm) or container memory+swap (docker), in bytes.
    pub memory_bytes: u64,
    /// wasm fuel budget; `None` runs without fuel metering.
    pub fuel: Option<u64>,
    /// Most bytes of stdout, and separately of stderr, kept; writing more ends the job with
    /// [`ExecStatus::OutputLimitExceeded`].
    pub stdio_bytes: usize,
    /// Most bytes the outputs directory may hold.
    pub output_quota_bytes: u64,
    /// Most files the outputs directory may hold.
    pub output_files_max: usize,
    /// wasm stack limit in bytes.
    pub stack_bytes: usize,
}

impl Default for ExecLimits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            memory_bytes: 128 << 20,
            fuel: None,
            stdio_bytes: 1 << 20,
            output_quota_bytes: 64 << 20,
            output_files_max: 1_000,
            stack_bytes: 1 << 20,
        }
    }
}

impl ExecLimits {
    /// The limits a job spec asks for (the output limits keep their defaults).
    pub fn from_spec(limits: &aimatrix_protocol::job::Limits) -> Self {
        Self {
            timeout: Duration::from_secs(limits.timeout_s),
            memory_bytes: limits.memory_mb.saturating_mul(1 << 20),
            fuel: (limits.fuel > 0).then_some(limits.fuel),
            ..Self::default()
        }
    }
}

/// A job ready to run: the workload, its work directory, its arguments and environment.
#[derive(Clone, Debug)]
pub struct PreparedJob {
    /// What runs.
    pub workload: JobWorkload,
    /// The job's private directory: `inputs/` (read-only to the guest) and `outputs/`.
    pub work_dir: PathBuf,
    /// Program arguments (after the program name).
    pub args: Vec<String>,
    /// Environment variables; nothing else is visible to the guest.
    pub env: BTreeMap<String, String>,
    /// Limits.
    pub limits: ExecLimits,
    /// Deterministic mode: canonical NaNs, fixed clocks, seeded randomness, so re-runs on other
    /// nodes give bitwise-identical outputs.
    pub deterministic: bool,
}

impl PreparedJob {
    /// A job with no arguments or environment, not deterministic.
    pub fn new(workload: JobWorkload, work_dir: impl Into<PathBuf>, limits: ExecLimits) -> Self {
        Self {
            workload,
            work_dir: work_dir.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            limits,
            deterministic: false,
        }
    }
}

/// Cancellation and progress for one run.
#[derive(Clone, Debug, Default)]
pub struct RunControl {
    /// Cancels the run when triggered.
    pub cancel: CancellationToken,
    /// Receives progress percentages the guest reports (dropped when the channel is full).
    pub progress: Option<mpsc::Sender<u8>>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ExecStatus {
    /// Exit code 0.
    Succeeded,
    /// A non-zero exit code.
    Failed {
        /// The exit code.
        exit_code: i32,
    },
    /// The wall-time limit passed.
    TimedOut,
    /// The guest tried to use more memory than its limit.
    OutOfMemory,
    /// The fuel budget ran out.
    OutOfFuel,
    /// The guest trapped (unreachable, stack overflow, bad memory access, ...).
    Trapped {
        /// What happened.
        reason: String,
    },
    /// The run was cancelled.
    Cancelled,
    /// stdout, stderr or the outputs directory went past its limit.
    OutputLimitExceeded {
        /// Which limit.
        what: String,
    },
}

impl ExecStatus {
    /// The short name used in `--json` output (`succeeded`, `timed_out`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed { .. } => "failed",
            Self::TimedOut => "timed_out",
            Self::OutOfMemory => "out_of_memory",
            Self::OutOfFuel => "out_of_fuel",
            Self::Trapped { .. } => "trapped",
            Self::Cancelled => "cancelled",
            Self::OutputLimitExceeded { .. } => "output_limit_exceeded",
        }
    }

    /// Whether the job succeeded.
    pub fn is_success(&self) -> bool {
        *self == Self::Succeeded
    }
}

impl fmt::Display for ExecStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Succeeded => f.write_str("succeeded"),
            Self::Failed { exit_code } => write!(f, "failed with exit code {exit_code}"),
            Self::TimedOut => f.write_str("timed out"),
            Self::OutOfMemory => f.write_str("out of memory"),
            Self::OutOfFuel => f.write_str("out of fuel"),
            Self::Trapped { reason } => write!(f, "trapped: {reason}"),
            Self::Cancelled => f.write_str("cancelled"),
            Self::OutputLimitExceeded { what } => write!(f, "output limit exceeded: {what}"),
        }
    }
}

/// Checks the work directory and creates `inputs/` and `outputs/` if missing.
pub(crate) fn prepare_work_dir(work_dir: &Path) -> Result<PathBuf, ExecError> {
    let err = |reason: String| ExecError::WorkDir { path: work_dir.display().to_string(), reason };
    let meta = std::fs::metadata(work_dir).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    std::fs::create_dir_all(work_dir.join(INPUTS_DIR)).map_err(|e| err(e.to_string()))?;
    let outputs = work_dir.join(OUTPUTS_DIR);
    std::fs::create_dir_all(&outputs).map_err(|e| err(e.to_string()))?;
    Ok(outputs)
}

/// [`ExecStatus::OutputLimitExceeded`] when captured stdout or stderr went past `cap` bytes
/// (executors capture one byte more than the cap to tell the two apart).
pub(crate) fn stdio_overflow(
    stdout_len: usize,
    stderr_len: usize,
    cap: usize,
) -> Option<ExecStatus> {
    let which = if stdout_len > cap {
        "stdout"
    } else if stderr_len > cap {
        "stderr"
    } else {
        return None;
    };
    Some(ExecStatus::OutputLimitExceeded { what: format!("{which} passed {cap} bytes") })
}

/// One output file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Path relative to the outputs directory, `/`-separated.
    pub name: String,
    /// SHA-256 of the content.
    pub sha256: Digest,
    /// Size in bytes.
    pub bytes: u64,
}

/// What a run produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutcome {
    /// How it ended.
    pub status: ExecStatus,
    /// Captured stdout (at most `limits.stdio_bytes`).
    pub stdout: Vec<u8>,
    /// Captured stderr (at most `limits.stdio_bytes`).
    pub stderr: Vec<u8>,
    /// Regular files left in the outputs directory, by name.
    pub outputs: Vec<OutputFile>,
    /// What the run used.
    pub usage: Usage,
}

impl ExecOutcome {
    /// The protocol outcome a node reports for this run.
    pub fn to_protocol(&self) -> aimatrix_protocol::messages::Outcome {
        use aimatrix_protocol::messages::{Outcome, OutputDigest};
        match &self.status {
            ExecStatus::Succeeded => Outcome::succeeded(
                self.outputs
                    .iter()
                    .map(|o| OutputDigest {
                        name: o.name.clone(),
                        digest: o.sha256,
                        size_bytes: o.bytes,
                    })
                    .collect(),
            ),
            other => Outcome::Failed { reason: other.to_string() },
        }
    }
}

/// Why a job could not be run at all (as opposed to running and failing).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The module bytes are not a valid WebAssembly module.
    #[error("invalid wasm module {name}: {reason}")]
    InvalidModule {
        /// Module name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The module is larger than the executor accepts.
    #[error("wasm module {name} is {bytes} bytes, over the {max} byte limit")]
    ModuleTooLarge {
        /// Module name.
        name: String,
        /// Its size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The job's image is not present on this node (nodes never pull images on their own).
    #[error(
        "image {image} is not present on this node; nodes never pull images they were not told \
         to: build or load it locally (docker build / docker load) and try again"
    )]
    ImageMissing {
        /// The image reference.
        image: String,
    },
    /// The module imports something the sandbox does not provide.
    #[error("wasm module {name} cannot be linked: {reason}")]
    Link {
        /// Module name.
        name: String,
        /// The unresolved import.
        reason: String,
    },
    /// The work directory is missing or unusable.
    #[error("job directory {path}: {reason}")]
    WorkDir {
        /// The directory.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The executor itself failed (engine, cache, I/O).
    #[error("sandbox error: {0}")]
    Internal(String),
}

/// A boxed future returned by [`Executor::run`].
pub type RunFuture<'a> = Pin<Box<dyn Future<Output = Result<ExecOutcome, ExecError>> + Send + 'a>>;

/// Runs prepared jobs.
pub trait Executor: Send + Sync {
    /// A short name (`wasm`, `docker`).
    fn name(&self) -> &'static str;

    /// Runs `job` to completion, timeout or cancellation.
    fn run(&self, job: PreparedJob, control: RunControl) -> RunFuture<'_>;
}
