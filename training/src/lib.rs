//! The training domain of aimatrix, decided once for the three drivers.
//!
//! [`aimatrix_protocol::relay::RelayCore`] runs a training job's rounds: who trains on which
//! chunk, deadlines, quorum, verification re-runs and payment. What the bytes mean is decided
//! here, with the `aimatrix-mlp` maths the `train-step` guest runs, and the node, the Studio
//! relay and the simulator all call the same functions:
//! - at post, [`prepare_data`] checks the model and dataset and splits the dataset into one
//!   chunk per participant plus an evaluation set (relay, simulator);
//! - for every training lease, [`plan_step`] says what goes into the guest's inputs, with which
//!   arguments, and what of its outputs stays private (node, simulator);
//! - when a round closes, [`judge_round`] decodes, validates and aggregates the updates,
//!   applies them, evaluates the new model and gives the core its [`RoundVerdict`] (relay,
//!   simulator).
//!
//! The crate depends on `aimatrix-protocol` and `aimatrix-mlp`; the protocol core does not
//! depend on it, so the core stays free of any one model's maths.
//!
//! ```
//! use aimatrix_protocol::job::JobSpec;
//! use aimatrix_training::TrainingParamsExt;
//!
//! let spec = JobSpec::from_toml(r#"
//!     kind = "training"
//!     reward = 10
//!     [workload]
//!     runtime = "wasm"
//!     module = "train-step.wasm"
//!     [training]
//!     model = "model.bin"
//!     dataset = "digits.bin"
//!     participants = 4
//!     rounds = 3
//!     learning_rate = 0.05
//!     round_deadline_s = 120
//!     quorum = 3
//!     compression = "topk"
//! "#).unwrap();
//! let params = spec.training.unwrap();
//! assert!(params.error_feedback());
//! assert!(params.step_args().contains(&"--compression".to_owned()));
//! ```
//!
//! [`RoundVerdict`]: aimatrix_protocol::relay::training::RoundVerdict

mod data;
mod judge;
mod params;
mod step;

pub use aimatrix_protocol::relay::training::{RoundMetrics, DELTA_DIGEST_FILE};
pub use data::{prepare_data, PrepareError, PreparedData, HOLDOUT_SHARE};
pub use judge::{judge_round, update_digest, JudgeError, JudgedRound};
pub use params::TrainingParamsExt;
pub use step::{plan_step, StepError, StepInput, StepPlan};

/// The model a round starts from, in the guest's inputs.
pub const MODEL_FILE: &str = "model.bin";
/// The participant's chunk of the dataset, in the guest's inputs.
pub const CHUNK_FILE: &str = "chunk.bin";
/// Error-feedback memory (top-k): an input when the node has one, always an output. It stays
/// on the node: it is never uploaded.
pub const RESIDUAL_FILE: &str = "residual.bin";
/// The compressed update (`AMLC`), in the guest's outputs.
pub const UPDATE_FILE: &str = "update.bin";
/// The guest's report on its chunk, in its outputs.
pub const METRICS_FILE: &str = "metrics.json";

#[cfg(test)]
mod tests {
    use aimatrix_mlp::{Dataset, INPUTS};
    use aimatrix_protocol::hash::Digest;
    use aimatrix_protocol::job::{Aggregation, Compression, ContentRef, TrainingParams};

    /// Top-k, centered clipping, every participant needed for quorum.
    pub(crate) fn params(participants: u32) -> TrainingParams {
        TrainingParams {
            model: ContentRef::Digest(Digest::of(b"m")),
            dataset: ContentRef::Digest(Digest::of(b"d")),
            participants,
            rounds: 3,
            local_epochs: 2,
            learning_rate: 0.1,
            batch_size: 8,
            aggregation: Aggregation::CenteredClip,
            compression: Compression::Topk,
            round_deadline_s: 60,
            quorum: participants,
            verify_share: 0.0,
            topk_fraction: 0.05,
            max_norm_ratio: 4.0,
            holdout: None,
        }
    }

    /// `n` samples of the digits' shape, labels cycling through 0..10.
    pub(crate) fn dataset(n: usize) -> Dataset {
        let samples = (0..n * INPUTS).map(|i| ((i * 7919) % 17) as f32 / 16.0).collect();
        Dataset { features: INPUTS, samples, labels: (0..n).map(|i| (i % 10) as u8).collect() }
    }
}
