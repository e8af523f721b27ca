//! Job specs: what a requester asks the network to run, parsed from `job.toml` and validated.
//!
//! The same [`JobSpec`] type is the TOML schema and the wire form inside an offer. Parsing
//! reports errors by field path (`requirements.vram_gb: invalid type: string "lots", expected
//! u32`); [`JobSpec::validate`] then reports every semantic problem at once. Every key is
//! documented in `docs/job-spec.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::hash::Digest;

/// The five kinds of job the network serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Distributed training or fine-tuning on a dataset, in rounds.
    Training,
    /// Batch analysis or extraction over input documents.
    Batch,
    /// Hosting a model for inference for a duration.
    Serving,
    /// ETL and transformations.
    DataProcessing,
    /// Running a test suite against an agent.
    AgentTesting,
}

impl JobKind {
    /// All kinds, in a stable order.
    pub const ALL: [Self; 5] =
        [Self::Training, Self::Batch, Self::Serving, Self::DataProcessing, Self::AgentTesting];

    /// The name used in `job.toml` and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Training => "training",
            Self::Batch => "batch",
            Self::Serving => "serving",
            Self::DataProcessing => "data_processing",
            Self::AgentTesting => "agent_testing",
        }
    }

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            format!(
                "unknown job kind {s:?}: expected one of training, batch, serving, data_processing, agent_testing"
            )
        })
    }
}

/// A set of job kinds (a bitset; serialized as a list of kinds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "Vec<JobKind>", into = "Vec<JobKind>")]
pub struct JobKindSet(u8);

impl JobKindSet {
    /// No kinds.
    pub const EMPTY: Self = Self(0);
    /// Every kind.
    pub const ALL: Self = Self(0b1_1111);

    /// Whether `kind` is in the set.
    pub const fn contains(self, kind: JobKind) -> bool {
        self.0 & kind.bit() != 0
    }

    /// Adds `kind`.
    pub fn insert(&mut self, kind: JobKind) {
        self.0 |= kind.bit();
    }

    /// The kinds in the set, in [`JobKind::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = JobKind> {
        JobKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

impl From<Vec<JobKind>> for JobKindSet {
    fn from(kinds: Vec<JobKind>) -> Self {
        kinds.into_iter().collect()
    }
}

impl From<JobKindSet> for Vec<JobKind> {
    fn from(set: JobKindSet) -> Self {
        set.iter().collect()
    }
}

impl FromIterator<JobKind> for JobKindSet {
    fn from_iter<I: IntoIterator<Item = JobKind>>(iter: I) -> Self {
        let mut set = Self::EMPTY;
        for kind in iter {
            set.insert(kind);
        }
        set
    }
}

/// Where a job's workload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// A WASI preview 1 module in wasmtime.
    Wasm,
    /// A container image under Docker.
    Docker,
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Wasm => "wasm",
            Self::Docker => "docker",
        })
    }
}

/// Content named either by a path (relative to the job file; only before posting) or by its
/// SHA-256 digest (always, once posted).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ContentRef {
    /// A path relative to the job file; resolved to a digest before the job is posted.
    Path(String),
    /// Content by digest.
    Digest(Digest),
}

impl ContentRef {
    /// The digest, once resolved.
    pub fn digest(&self) -> Option<Digest> {
        match self {
            Self::Digest(d) => Some(*d),
            Self::Path(_) => None,
        }
    }
}

impl TryFrom<String> for ContentRef {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        if text.starts_with("sha256:") {
            return text.parse().map(Self::Digest).map_err(|e| e.to_string());
        }
        if text.is_empty() {
            return Err("must be a path relative to the job file or \"sha256:<hex>\"".into());
        }
        Ok(Self::Path(text))
    }
}

impl From<ContentRef> for String {
    fn from(c: ContentRef) -> Self {
        match c {
            ContentRef::Path(p) => p,
            ContentRef::Digest(d) => d.to_string(),
        }
    }
}

impl fmt::Display for ContentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => f.write_str(p),
            Self::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// `[workload]`: what runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// `wasm` or `docker`.
    pub runtime: Runtime,
    /// wasm: the module, by path or digest.
    #[serde(default)]
    pub module: Option<ContentRef>,
    /// docker: the image by tag or digest; never pulled unless the node was told to.
    #[serde(default)]
    pub image: Option<String>,
    /// docker: the command (entrypoint override); empty uses the image's own.
    #[serde(default)]
    pub command: Vec<String>,
    /// Arguments passed to the program.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables; nothing else is visible to the guest.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `[requirements]`: what a node must have to be offered the job.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Requirements {
    /// Physical CPU cores.
    pub cpu_cores: u32,
    /// Total memory.
    pub memory_mb: u64,
    /// Number of GPUs.
    pub gpus: u32,
    /// VRAM per GPU, in GiB.
    pub vram_gb: u32,
    /// Free disk for inputs, outputs and scratch.
    pub disk_mb: u64,
}

impl Default for Requirements {
    fn default() -> Self {
        Self { cpu_cores: 1, memory_mb: 128, gpus: 0, vram_gb: 0, disk_mb: 0 }
    }
}

/// `[limits]`: the sandbox limits a node enforces while the job runs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Wall-time limit; always applies.
    pub timeout_s: u64,
    /// Memory the guest may use.
    pub memory_mb: u64,
    /// wasm fuel budget; 0 = no fuel limit.
    pub fuel: u64,
    /// Share of the node's CPU the job may use, in (0, 1].
    pub cpu_share: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { timeout_s: 60, memory_mb: 128, fuel: 0, cpu_share: 0.8 }
    }
}

/// `[[inputs]]`: a file placed read-only in the job's input directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// File name inside the input directory.
    pub name: String,
    /// The content: a path relative to the job file, or `sha256:<hex>`.
    pub source: ContentRef,
    /// Size in bytes; filled in when the path is resolved.
    #[serde(default)]
    pub size_bytes: u64,
}

/// How a training round combines participants' updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Coordinate-wise mean (not robust; for trusted participants).
    Mean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// Centered clipping around the previous aggregate.
    CenteredClip,
}

/// How participants compress their updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Raw f32.
    None,
    /// Half precision.
    Fp16,
    /// 8-bit quantization with a per-tensor scale.
    Int8,
    /// Top-k sparsification with error feedback.
    Topk,
}

/// `[training]`: parameters of a `training` job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingParams {
    /// Architecture and initial weights, by path or digest.
    pub model: ContentRef,
    /// The dataset, by path or digest; the relay splits it into chunks.
    pub dataset: ContentRef,
    /// Participants wanted per round.
    pub participants: u32,
    /// Number of rounds.
    pub rounds: u32,
    /// Local epochs per round.
    #[serde(default = "one")]
    pub local_epochs: u32,
    /// Learning rate.
    pub learning_rate: f64,
    /// Mini-batch size.
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Aggregation rule.
    #[serde(default = "default_aggregation")]
    pub aggregation: Aggregation,
    /// Update compression.
    #[serde(default = "default_compression")]
    pub compression: Compression,
    /// A round closes at this deadline even without every update.
    pub round_deadline_s: u64,
    /// Updates returned in time needed for a round to close successfully.
    pub quorum: u32,
    /// Share of each round's updates re-run on another participant to check them, in [0, 1]
    /// (`ceil(share × updates)` a round); a re-run whose delta digest differs voids the
    /// update's payment and drops its sender.
    #[serde(default)]
    pub verify_share: f64,
    /// For `compression = "topk"`: the share of values sent, in (0, 1] (default 0.01).
    #[serde(default = "default_topk_fraction")]
    pub topk_fraction: f64,
    /// An update whose L2 norm is above this times the round's median norm is rejected
    /// (default 4; 0 turns the check off).
    #[serde(default = "default_max_norm_ratio")]
    pub max_norm_ratio: f64,
    /// The evaluation set, by path or digest. Without one the relay holds out a stratified
    /// quarter of the dataset (see docs/training.md).
    #[serde(default)]
    pub holdout: Option<ContentRef>,
}

const fn default_topk_fraction() -> f64 {
    0.01
}
const fn default_max_norm_ratio() -> f64 {
    4.0
}

const fn one() -> u32 {
    1
}
const fn default_batch() -> u32 {
    32
}
const fn default_aggregation() -> Aggregation {
    Aggregation::TrimmedMean
}
const fn default_compression() -> Compression {
    Compression::None
}

/// `[serving]`: parameters of a `serving` job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServingParams {
    /// The model to host, by path or digest.
    pub model: ContentRef,
    /// How long to serve.
    pub duration_s: u64,
    /// The port the workload listens on inside its container.
    #[serde(default = "default_port")]
    pub port: u16,
}

const fn default_port() -> u16 {
    8080
}

/// A job spec: the contents of `job.toml`, and the job inside an offer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job kind.
    pub kind: JobKind,
    /// A short human name.
    #[serde(default)]
    pub name: String,
    /// Credits paid per accepted replica (for `training`: per accepted update).
    pub reward: u64,
    /// Distinct nodes that must run it and agree.
    #[serde(default = "one")]
    pub replication: u32,
    /// Attempt budget: a job may grant `replication × max_attempts` leases in all (for
    /// `training`: rounds in a row that may close without quorum) before it is refunded.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// The job must complete within this many seconds of posting, or it is refunded.
    #[serde(default = "default_deadline")]
    pub deadline_s: u64,
    /// What runs.
    pub workload: Workload,
    /// What a node must have.
    #[serde(default)]
    pub requirements: Requirements,
    /// Sandbox limits.
    #[serde(default)]
    pub limits: Limits,
    /// Input files.
    #[serde(default)]
    pub inputs: Vec<Input>,
    /// Training parameters (`kind = "training"` only).
    #[serde(default)]
    pub training: Option<TrainingParams>,
    /// Serving parameters (`kind = "serving"` only).
    #[serde(default)]
    pub serving: Option<ServingParams>,
}

const fn default_attempts() -> u32 {
    3
}
const fn default_deadline() -> u64 {
    600
}

/// Upper bounds the validator enforces.
pub mod bounds {
    /// Most replicas a job may ask for.
    pub const MAX_REPLICATION: u32 = 16;
    /// Most attempts per replica slot.
    pub const MAX_ATTEMPTS: u32 = 100;
    /// Longest job deadline (30 days).
    pub const MAX_DEADLINE_S: u64 = 30 * 24 * 3600;
    /// Most participants in a training job.
    pub const MAX_PARTICIPANTS: u32 = 1024;
    /// Most training rounds.
    pub const MAX_ROUNDS: u32 = 10_000;
    /// Most input files.
    pub const MAX_INPUTS: usize = 1024;
}

/// One problem with a job spec, naming the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field (`requirements.gpus`), or empty for the whole file.
    pub field: String,
    /// What is wrong and what to do.
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.problem)
        } else {
            write!(f, "{}: {}", self.field, self.problem)
        }
    }
}

/// Why a job spec was refused: every problem found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    /// The problems, in the order the checks found them.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl SpecError {
    fn one(field: &str, problem: impl Into<String>) -> Self {
        Self { errors: vec![FieldError { field: field.to_owned(), problem: problem.into() }] }
    }

    /// Prefixes every line with `source` (e.g. the file name) when displayed.
    pub fn with_source(&self, source: &str) -> String {
        self.errors.iter().map(|e| format!("{source}: {e}")).collect::<Vec<_>>().join("\n")
    }
}

impl JobSpec {
    /// Parses `job.toml` text and validates it.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec = Self::parse_toml(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses `job.toml` text without the semantic checks.
    pub fn parse_toml(text: &str) -> Result<Self, SpecError> {
        let deserializer = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let mut problem = inner.message().trim().to_owned();
            if let Some(span) = inner.span() {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                problem.push_str(&format!(" (line {line})"));
            }
            let field = if path == "." { String::new() } else { path };
            SpecError::one(&field, problem)
        })
    }

    /// The spec as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render spec: {e}\n"))
    }

    /// Total credits the job can pay, reserved in escrow when it is posted: `reward ×
    /// replication`, or for training `reward × (participants + verifications per round) ×
    /// rounds`.
    pub fn escrow(&self) -> Option<u64> {
        match (&self.kind, &self.training) {
            (JobKind::Training, Some(t)) => {
                let updates = u64::from(t.participants)
                    .checked_add(u64::from(t.verifications_per_round()))?;
                self.reward.checked_mul(updates)?.checked_mul(u64::from(t.rounds))
            }
            _ => self.reward.checked_mul(u64::from(self.replication)),
        }
    }

    /// Every content reference the spec holds, with the field that holds it (`workload.module`,
    /// `inputs[i] (name)`, `training.model`, `training.dataset`, `training.holdout`,
    /// `serving.model`).
    pub fn content_refs(&self) -> Vec<(String, &ContentRef)> {
        let mut out = Vec::new();
        if let Some(module) = &self.workload.module {
            out.push(("workload.module".to_owned(), module));
        }
        for (i, input) in self.inputs.iter().enumerate() {
            out.push((format!("inputs[{i}] ({})", input.name), &input.source));
        }
        if let Some(t) = &self.training {
            out.push(("training.model".to_owned(), &t.model));
            out.push(("training.dataset".to_owned(), &t.dataset));
            if let Some(holdout) = &t.holdout {
                out.push(("training.holdout".to_owned(), holdout));
            }
        }
        if let Some(s) = &self.serving {
            out.push(("serving.model".to_owned(), &s.model));
        }
        out
    }

    /// Whether every content reference is a digest, as a posted job requires.
    pub fn is_resolved(&self) -> bool {
        self.content_refs().iter().all(|(_, r)| r.digest().is_some())
    }

    /// Checks every semantic rule and reports every problem found.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut v = Validator::default();
        self.validate_economics(&mut v);
        self.validate_workload(&mut v);
        self.validate_resources(&mut v);
        self.validate_kind_params(&mut v);
        v.finish()
    }

    fn validate_economics(&self, v: &mut Validator) {
        v.check(self.reward >= 1, "reward", "must be at least 1 credit");
        v.check(
            (1..=bounds::MAX_REPLICATION).contains(&self.replication),
            "replication",
            format_args!("must be between 1 and {}", bounds::MAX_REPLICATION),
        );
        v.check(
            (1..=bounds::MAX_ATTEMPTS).contains(&self.max_attempts),
            "max_attempts",
            format_args!("must be between 1 and {}", bounds::MAX_ATTEMPTS),
        );
        v.check(
            (1..=bounds::MAX_DEADLINE_S).contains(&self.deadline_s),
            "deadline_s",
            format_args!("must be between 1 and {} (30 days)", bounds::MAX_DEADLINE_S),
        );
        v.check(
            self.deadline_s >= self.limits.timeout_s,
            "deadline_s",
            format_args!(
                "is shorter than limits.timeout_s ({} s): no attempt could finish in time",
                self.limits.timeout_s
            ),
        );
        v.check(
            self.escrow().is_some(),
            "reward",
            "reward times replication (for training, times participants plus re-runs, times rounds) overflows",
        );
        v.check(self.name.len() <= 200, "name", "must be at most 200 bytes");
    }

    fn validate_workload(&self, v: &mut Validator) {
        let w = &self.workload;
        match w.runtime {
            Runtime::Wasm => {
                v.check(
                    w.module.is_some(),
                    "workload.module",
                    "is required for runtime \"wasm\": a path relative to the job file or \"sha256:<hex>\"",
                );
                v.check(
                    w.image.is_none(),
                    "workload.image",
                    "is for runtime \"docker\"; remove it or set workload.runtime = \"docker\"",
                );
                v.check(
                    w.command.is_empty(),
                    "workload.command",
                    "is for runtime \"docker\"; a wasm module's arguments go in workload.args",
                );
                v.check(
                    self.requirements.gpus == 0,
                    "requirements.gpus",
                    "wasm jobs cannot use GPUs; set workload.runtime = \"docker\" or gpus = 0",
                );
                v.check(
                    self.requirements.vram_gb == 0,
                    "requirements.vram_gb",
                    "wasm jobs cannot use GPUs; set workload.runtime = \"docker\" or vram_gb = 0",
                );
            }
            Runtime::Docker => {
                v.check(
                    w.image.as_deref().is_some_and(|i| !i.trim().is_empty()),
                    "workload.image",
                    "is required for runtime \"docker\": an image by tag or digest present on the nodes",
                );
                v.check(
                    w.module.is_none(),
                    "workload.module",
                    "is for runtime \"wasm\"; remove it or set workload.runtime = \"wasm\"",
                );
                v.check(
                    self.limits.fuel == 0,
                    "limits.fuel",
                    "fuel only applies to wasm; docker jobs are bounded by limits.timeout_s",
                );
            }
        }
        for key in w.env.keys() {
            v.check(
                !key.is_empty() && !key.contains(['=', '\0']),
                format_args!("workload.env.{key}"),
                "an environment variable name must be non-empty and contain no '=' or NUL",
            );
        }
        v.check(
            self.inputs.len() <= bounds::MAX_INPUTS,
            "inputs",
            format_args!("at most {} input files", bounds::MAX_INPUTS),
        );
        let mut names = std::collections::BTreeSet::new();
        for (i, input) in self.inputs.iter().enumerate() {
            let ok = !input.name.is_empty()
                && !input.name.contains(['/', '\\', '\0'])
                && input.name != "."
                && input.name != "..";
            v.check(
                ok,
                format_args!("inputs[{i}].name"),
                "must be a plain file name (no '/', '\\', '.' or '..')",
            );
            v.check(
                names.insert(input.name.as_str()),
                format_args!("inputs[{i}].name"),
                format_args!("{:?} is used by another input", input.name),
            );
        }
    }

    fn validate_resources(&self, v: &mut Validator) {
        let (r, l) = (&self.requirements, &self.limits);
        v.check(r.cpu_cores >= 1, "requirements.cpu_cores", "must be at least 1");
        v.check(r.memory_mb >= 1, "requirements.memory_mb", "must be at least 1");
        v.check(
            r.vram_gb == 0 || r.gpus >= 1,
            "requirements.vram_gb",
            "asks for VRAM but requirements.gpus is 0; set gpus = 1 or more",
        );
        v.check(
            (1..=7 * 24 * 3600).contains(&l.timeout_s),
            "limits.timeout_s",
            "must be between 1 and 604800 (7 days)",
        );
        v.check(l.memory_mb >= 1, "limits.memory_mb", "must be at least 1");
        v.check(
            l.memory_mb <= r.memory_mb,
            "limits.memory_mb",
            format_args!(
                "({}) exceeds requirements.memory_mb ({}): a node must have at least the memory the job may use",
                l.memory_mb, r.memory_mb
            ),
        );
        v.check(
            l.cpu_share > 0.0 && l.cpu_share <= 1.0,
            "limits.cpu_share",
            "must be greater than 0 and at most 1",
        );
    }

    fn validate_kind_params(&self, v: &mut Validator) {
        match self.kind {
            JobKind::Training => match &self.training {
                None => v.fail(
                    "training",
                    "a training job needs a [training] section (model, dataset, participants, rounds, ...)",
                ),
                Some(t) => {
                    v.check(
                        self.replication == 1,
                        "replication",
                        "must be 1 for training; use training.verify_share to re-run updates",
                    );
                    t.validate(v);
                }
            },
            _ => v.check(
                self.training.is_none(),
                "training",
                format_args!("only applies to kind = \"training\", not {:?}", self.kind.name()),
            ),
        }
        match (self.kind, &self.serving) {
            (JobKind::Serving, None) => {
                v.fail("serving", "a serving job needs a [serving] section (model, duration_s)")
            }
            (JobKind::Serving, Some(s)) => {
                v.check(
                    self.workload.runtime == Runtime::Docker,
                    "workload.runtime",
                    "serving jobs run a long-lived server and need runtime \"docker\"",
                );
                v.check(s.duration_s >= 1, "serving.duration_s", "must be at least 1");
                v.check(
                    s.duration_s <= self.limits.timeout_s,
                    "serving.duration_s",
                    "exceeds limits.timeout_s; raise the timeout to cover the serving duration",
                );
            }
            (_, Some(_)) => v.fail(
                "serving",
                format_args!("only applies to kind = \"serving\", not {:?}", self.kind.name()),
            ),
            (_, None) => {}
        }
    }
}

impl TrainingParams {
    /// Most verifying re-runs in one round: `ceil(verify_share × participants)`. Each is paid
    /// like an update, so the escrow holds `reward × (participants + this) × rounds`.
    pub fn verifications_per_round(&self) -> u32 {
        let share = self.verify_share.clamp(0.0, 1.0);
        ((share * f64::from(self.participants)).ceil() as u32).min(self.participants)
    }

    fn validate(&self, v: &mut Validator) {
        v.check(
            (1..=bounds::MAX_PARTICIPANTS).contains(&self.participants),
            "training.participants",
            format_args!("must be between 1 and {}", bounds::MAX_PARTICIPANTS),
        );
        v.check(
            (1..=bounds::MAX_ROUNDS).contains(&self.rounds),
            "training.rounds",
            format_args!("must be between 1 and {}", bounds::MAX_ROUNDS),
        );
        v.check(self.local_epochs >= 1, "training.local_epochs", "must be at least 1");
        v.check(
            self.learning_rate.is_finite() && self.learning_rate > 0.0,
            "training.learning_rate",
            "must be a positive number",
        );
        v.check(self.batch_size >= 1, "training.batch_size", "must be at least 1");
        v.check(self.round_deadline_s >= 1, "training.round_deadline_s", "must be at least 1");
        v.check(
            self.quorum >= 1 && self.quorum <= self.participants,
            "training.quorum",
            format_args!("must be between 1 and training.participants ({})", self.participants),
        );
        v.check(
            (0.0..=1.0).contains(&self.verify_share),
            "training.verify_share",
            "must be between 0 and 1",
        );
        v.check(
            self.topk_fraction > 0.0 && self.topk_fraction <= 1.0,
            "training.topk_fraction",
            "must be above 0 and at most 1 (0.01 sends the largest 1% of the values)",
        );
        v.check(
            self.max_norm_ratio == 0.0
                || (self.max_norm_ratio.is_finite() && self.max_norm_ratio >= 1.0),
            "training.max_norm_ratio",
            "must be 0 (no norm check) or a number of at least 1",
        );
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    /// Records `problem` with `field` unless `ok`. Both are formatted only then: a valid spec
    /// (every offer a node hears) costs no string.
    fn check(&mut self, ok: bool, field: impl fmt::Display, problem: impl fmt::Display) {
        if !ok {
            self.fail(field, problem);
        }
    }

    fn fail(&mut self, field: impl fmt::Display, problem: impl fmt::Display) {
        self.errors.push(FieldError { field: field.to_string(), problem: problem.to_string() });
    }

    fn finish(self) -> Result<(), SpecError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(SpecError { errors: self.errors })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
kind = "batch"
reward = 10
replication = 1
max_attempts = 3
deadline_s = 600
[workload]
runtime = "wasm"
module = "hello.wasm"
args = []
env = {}
[requirements]
cpu_cores = 1
memory_mb = 128
gpus = 0
vram_gb = 0
[limits]
timeout_s = 60
memory_mb = 128
fuel = 0
cpu_share = 0.8
"#;

    #[test]
    fn parses_the_documented_example() {
        let spec = JobSpec::from_toml(EXAMPLE).unwrap();
        assert_eq!(spec.kind, JobKind::Batch);
        assert_eq!(spec.workload.module, Some(ContentRef::Path("hello.wasm".into())));
        assert_eq!(spec.escrow(), Some(10));
        assert!(!spec.is_resolved());
        let again = JobSpec::from_toml(&spec.to_toml()).unwrap();
        assert_eq!(again, spec);
    }

    #[test]
    fn type_errors_name_the_field() {
        let text = EXAMPLE.replace("vram_gb = 0", "vram_gb = \"lots\"");
        let err = JobSpec::from_toml(&text).unwrap_err();
        let shown = err.with_source("job.toml");
        assert!(
            shown.starts_with("job.toml: requirements.vram_gb: invalid type: string \"lots\""),
            "{shown}"
        );
        assert!(shown.contains("line 16"), "{shown}");
    }

    #[test]
    fn unknown_keys_and_kinds_are_refused() {
        let err = JobSpec::from_toml(&EXAMPLE.replace("max_attempts", "max_atempts")).unwrap_err();
        assert!(err.to_string().contains("unknown field `max_atempts`"), "{err}");
        let err = JobSpec::from_toml(&EXAMPLE.replace("\"batch\"", "\"mining\"")).unwrap_err();
        assert!(err.to_string().starts_with("kind: unknown variant `mining`"), "{err}");
    }

    #[test]
    fn gpu_on_wasm_is_refused_with_every_reason() {
        let text = EXAMPLE.replace("gpus = 0", "gpus = 1").replace("vram_gb = 0", "vram_gb = 8");
        let err = JobSpec::from_toml(&text).unwrap_err();
        let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["requirements.gpus", "requirements.vram_gb"]);
        assert!(err.to_string().contains("set workload.runtime = \"docker\""));
    }

    #[test]
    fn kind_sections_must_match_the_kind() {
        let training = EXAMPLE.replace("\"batch\"", "\"training\"");
        let err = JobSpec::from_toml(&training).unwrap_err();
        assert_eq!(err.errors[0].field, "training");
        let serving = EXAMPLE.replace("\"batch\"", "\"serving\"");
        let err = JobSpec::from_toml(&serving).unwrap_err();
        assert!(err.errors.iter().any(|e| e.field == "serving"), "{err}");
    }

    #[test]
    fn training_spec_validates_and_escrows_per_update() {
        let text = EXAMPLE.replace("\"batch\"", "\"training\"")
            + r#"
[training]
model = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
dataset = "digits.bin"
participants = 4
rounds = 5
learning_rate = 0.1
round_deadline_s = 30
quorum = 3
"#;
        let spec = JobSpec::from_toml(&text).unwrap();
        assert_eq!(spec.escrow(), Some(10 * 4 * 5));
        let bad = text.replace("quorum = 3", "quorum = 9");
        let err = JobSpec::from_toml(&bad).unwrap_err();
        assert_eq!(err.errors[0].field, "training.quorum");
    }

    #[test]
    fn limits_must_fit_requirements() {
        let text = EXAMPLE.replacen("memory_mb = 128", "memory_mb = 64", 1);
        let err = JobSpec::from_toml(&text).unwrap_err();
        assert_eq!(err.errors[0].field, "limits.memory_mb");
    }
}
