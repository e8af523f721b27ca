//! Simulated training: one training job on the digits, run in-process over a simulated
//! network by the real cores, with every round's update computed by the real wasm guest.
//!
//! The driver is small and deterministic: one `RelayCore`, one `NodeCore` per node, a seeded
//! event queue whose messages arrive after a link latency, and a simulated clock. The relay's
//! job is posted with [`aimatrix_training::prepare_data`] on the digits training split and the
//! test split as its evaluation set (so the centralized baseline reported beside the result is
//! measured on the same images). Each lease is planned by [`aimatrix_training::plan_step`] and
//! runs the `train-step` guest in the wasmtime sandbox with the node's error-feedback memory,
//! as a real node does; each closed round is judged by [`aimatrix_training::judge_round`], as
//! the Studio relay does; the ledger is the state machine the relay ships.
//!
//! Byzantine participants (the first `byzantine` nodes) alter what they send as the native
//! harness `aimatrix_digits::federated` does: the decoded update scaled by −10, Gaussian
//! noise, or the update of training on label-flipped data. A participant that drops out of a
//! round does not answer: its lease expires at the round deadline, the round closes with the
//! updates it has, and the relay excludes the node from the job. Standby nodes come online
//! once round 0 has started and take the seats that exclusion frees.
//!
//! `aimatrix-sim train` is this module's command line.

mod report;
mod sandbox;
mod world;

use std::path::PathBuf;

use aimatrix_digits::{baseline, split};
use aimatrix_protocol::job::{Aggregation, Compression};
use aimatrix_training::{JudgeError, PrepareError};
use serde::Serialize;

pub use report::{Report, RoundRow};

use world::World;

/// The requester's account in the run's ledger.
const REQUESTER: &str = "digits-requester";
/// Credits paid per accepted update.
const REWARD: u64 = 10;
/// Simulated time a training step takes on a node: this, plus up to as much again.
const STEP_MS: u64 = 2_000;

/// A simulated training run's settings; also `aimatrix-sim train`'s flags.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct TrainConfig {
    /// Participant seats (and nodes online from the start)
    #[arg(long, default_value_t = 10)]
    pub nodes: u32,
    /// Nodes that come online once round 0 has started and fill the seats of excluded
    /// participants (default: enough for the drop rate, 1.25 × drop-rate × nodes × rounds)
    #[arg(long)]
    pub standby: Option<u32>,
    /// Training rounds
    #[arg(long, default_value_t = 50)]
    pub rounds: u32,
    /// Local epochs per round
    #[arg(long, default_value_t = 5)]
    pub local_epochs: u32,
    /// Local SGD learning rate
    #[arg(long, default_value_t = 0.1)]
    pub learning_rate: f64,
    /// Local mini-batch size
    #[arg(long, default_value_t = 16)]
    pub batch_size: u32,
    /// Hidden units of the MLP
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Aggregation rule: mean, median, trimmed_mean, centered_clip
    #[arg(long, default_value = "centered_clip", value_parser = parse_aggregation)]
    pub aggregation: Aggregation,
    /// Update compression: none, fp16, int8, topk (with error feedback)
    #[arg(long, default_value = "none", value_parser = parse_compression)]
    pub compression: Compression,
    /// Share of the values topk sends
    #[arg(long, default_value_t = 0.01)]
    pub topk_fraction: f64,
    /// Reject an update whose norm is above this times the round's median (0: no check)
    #[arg(long, default_value_t = 4.0)]
    pub max_norm_ratio: f64,
    /// Updates a round needs to close (default: half the seats)
    #[arg(long)]
    pub quorum: Option<u32>,
    /// Share of each round's updates re-run on another participant (a different delta
    /// digest voids the update)
    #[arg(long, default_value_t = 0.0)]
    pub verify_share: f64,
    /// Byzantine participants: the first K nodes
    #[arg(long, default_value_t = 0)]
    pub byzantine: u32,
    /// What Byzantine participants send: scale (update × −10), noise (σ = 1), label_flip
    #[arg(long, value_enum, default_value_t = Attack::Scale)]
    pub attack: Attack,
    /// Probability that a participant drops out of a round (does not answer)
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Round deadline, in simulated seconds
    #[arg(long, default_value_t = 60)]
    pub round_deadline_s: u64,
    /// One-way link latency, in simulated milliseconds (plus up to as much again)
    #[arg(long, default_value_t = 20)]
    pub latency_ms: u64,
    /// Seed of everything random: the initial model, latencies, drop-outs, noise
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for the compiled-module cache (default: in memory, compiled once per run)
    #[arg(long)]
    pub wasm_cache: Option<PathBuf>,
}

impl TrainConfig {
    /// Checks the settings a run cannot start with.
    ///
    /// # Errors
    ///
    /// [`TrainError::Config`] naming the flag at fault.
    pub fn check(&self) -> Result<(), TrainError> {
        let bad = |why: String| Err(TrainError::Config(why));
        if self.nodes == 0 {
            return bad("--nodes must be at least 1".to_owned());
        }
        if self.byzantine > self.nodes {
            return bad(format!(
                "--byzantine ({}) is more than --nodes ({})",
                self.byzantine, self.nodes
            ));
        }
        if !(0.0..1.0).contains(&self.drop_rate) {
            return bad(format!(
                "--drop-rate must be at least 0 and below 1, got {}",
                self.drop_rate
            ));
        }
        if !(1..=4096).contains(&self.hidden) {
            return bad(format!("--hidden must be between 1 and 4096, got {}", self.hidden));
        }
        Ok(())
    }
}

/// What a Byzantine participant sends instead of its honest update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Attack {
    /// Its honest update scaled by −10.
    Scale,
    /// Gaussian noise, σ = 1 per coordinate.
    Noise,
    /// The update of honest training on its chunk with every label `l` replaced by `9 − l`.
    #[value(name = "label_flip")]
    LabelFlip,
}

pub(crate) const SCALE: f32 = -10.0;
pub(crate) const NOISE_STD: f32 = aimatrix_digits::federated::DEFAULT_NOISE_STD;

pub(crate) fn parse_aggregation(s: &str) -> Result<Aggregation, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?}: expected mean, median, trimmed_mean or centered_clip"))
}

pub(crate) fn parse_compression(s: &str) -> Result<Compression, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?}: expected none, fp16, int8 or topk"))
}

/// Called with every aggregated round as the run records it.
pub type OnRound = Box<dyn FnMut(&RoundRow)>;

/// Why a simulated training run stopped before its job ended.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A setting is out of range.
    #[error("{0}")]
    Config(String),
    /// The training job's data was refused at post.
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    /// The training job's spec was refused.
    #[error("the training job's spec: {0}")]
    Spec(String),
    /// The sandbox could not run the guest.
    #[error("the sandbox: {0}")]
    Sandbox(String),
    /// A file of the guest's work directory could not be written or read.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A core refused a call the driver makes.
    #[error("{0}")]
    Core(String),
    /// The ledger refused an instruction.
    #[error("the ledger refused {what}: {source}")]
    Ledger {
        /// The instruction.
        what: &'static str,
        /// Why.
        #[source]
        source: aimatrix_protocol::ledger::OpError,
    },
    /// The simulated relay or the guest broke a contract the driver relies on.
    #[error("{0}")]
    Broken(String),
    /// A round could not be judged.
    #[error("judging round {round}: {source}")]
    Judge {
        /// The round.
        round: u32,
        /// Why.
        #[source]
        source: JudgeError,
    },
    /// The job did not end.
    #[error("{0}")]
    Stalled(String),
}

impl TrainError {
    fn sandbox(e: impl std::fmt::Display) -> Self {
        Self::Sandbox(e.to_string())
    }
}

/// An I/O error with what was being done.
fn io(what: impl Into<String>, source: std::io::Error) -> TrainError {
    TrainError::Io { what: what.into(), source }
}

/// Runs `config`'s training job to its end: the digits split, the centralized baseline, then
/// the simulated network until the job completes, fails or is refused. `on_round` sees every
/// aggregated round as it is recorded.
///
/// # Errors
///
/// When the settings are out of range, the sandbox cannot run the guest, or a core, the
/// ledger or the judge refuses what the driver relies on; a job that fails in the network is
/// reported in [`Report::job`], not as an error.
pub fn run(config: &TrainConfig, on_round: OnRound) -> Result<Report, TrainError> {
    config.check()?;
    let (train_set, test) = split::train_test();
    let base = baseline::centralized(
        &baseline::BaselineConfig {
            hidden: config.hidden,
            learning_rate: config.learning_rate as f32,
            batch_size: config.batch_size,
            model_seed: config.seed,
            ..baseline::BaselineConfig::default()
        },
        &train_set,
        &test,
    );
    let mut world = World::new(config, &train_set, &test, on_round)?;
    world.run()?;
    Ok(world.report(base.test_accuracy))
}
