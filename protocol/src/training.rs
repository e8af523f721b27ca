//! Training jobs: the data split, the training step's command line and the judging of a round.
//!
//! [`relay::RelayCore`](crate::relay::RelayCore) runs a training job's rounds (who trains on
//! which chunk, deadlines, quorum, payment). What the relay's driver and the simulator do with
//! the bytes is decided here, once, with the `aimatrix-mlp` maths the `train-step` guest runs:
//! - at post, [`prepare_data`] checks the model and dataset and splits the dataset into one
//!   chunk per participant plus an evaluation set;
//! - every participant runs the guest with [`TrainingParams::step_args`] on the files named by
//!   the constants below;
//! - when a round closes, [`judge_round`] decodes, validates and aggregates the updates,
//!   applies them and evaluates the new model.

use aimatrix_mlp::{Codec, Dataset, Model, NormCheck, Rule};
use serde::{Deserialize, Serialize};

use crate::job::{Aggregation, Compression, TrainingParams};

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
/// The SHA-256 of the uncompressed delta, in the guest's outputs: a verifying re-run of the
/// same round on another node must give a file with the same digest.
pub const DELTA_DIGEST_FILE: &str = "delta.sha256";
/// Share of the dataset held out for evaluation when the job names no `holdout`.
pub const HOLDOUT_SHARE: f64 = 0.25;

impl TrainingParams {
    /// The update codec participants compress with.
    pub fn codec(&self) -> Codec {
        match self.compression {
            Compression::None => Codec::None,
            Compression::Fp16 => Codec::Fp16,
            Compression::Int8 => Codec::int8(),
            Compression::Topk => Codec::TopK { fraction: self.topk_fraction },
        }
    }

    /// Whether participants keep error-feedback memory between rounds (top-k only).
    pub fn error_feedback(&self) -> bool {
        self.compression == Compression::Topk
    }

    /// The aggregation rule, with the defaults of docs/training.md.
    pub fn rule(&self) -> Rule {
        match self.aggregation {
            Aggregation::Mean => Rule::Mean,
            Aggregation::Median => Rule::Median,
            Aggregation::TrimmedMean => Rule::trimmed_mean(),
            Aggregation::CenteredClip => Rule::centered_clip(),
        }
    }

    /// The norm check every update passes before aggregation.
    pub fn norm_check(&self) -> NormCheck {
        if self.max_norm_ratio == 0.0 {
            NormCheck::OFF
        } else {
            NormCheck { max_norm_ratio: self.max_norm_ratio, ..NormCheck::default() }
        }
    }

    /// The `train-step` guest's arguments for one round (its inputs and outputs directories
    /// are the sandbox's defaults).
    pub fn step_args(&self) -> Vec<String> {
        let mut args = vec![
            "--epochs".to_owned(),
            self.local_epochs.to_string(),
            "--lr".to_owned(),
            self.learning_rate.to_string(),
            "--batch".to_owned(),
            self.batch_size.to_string(),
            "--compression".to_owned(),
            self.codec().name().to_owned(),
        ];
        if let Codec::TopK { fraction } = self.codec() {
            args.extend(["--topk-fraction".to_owned(), fraction.to_string()]);
        }
        args
    }
}

/// A training job's data, ready to lease: encoded chunks and evaluation set.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedData {
    /// One `ADSC` chunk per participant seat, in chunk order.
    pub chunks: Vec<Vec<u8>>,
    /// The `ADSC` evaluation set.
    pub holdout: Vec<u8>,
    /// Training samples over all chunks.
    pub training_samples: usize,
}

/// Checks a training job's model and dataset and splits the dataset: the evaluation set is
/// `holdout` when given, otherwise a stratified [`HOLDOUT_SHARE`] of the dataset
/// ([`Dataset::hold_out`]); the rest is cut into `params.participants` consecutive chunks
/// ([`Dataset::chunks`]).
///
/// # Errors
///
/// A message naming the field at fault: a file that does not decode, a dataset that does not
/// fit the model, or too few samples for the participants or the evaluation.
pub fn prepare_data(
    params: &TrainingParams,
    model: &[u8],
    dataset: &[u8],
    holdout: Option<&[u8]>,
) -> Result<PreparedData, String> {
    let model = Model::decode(model)
        .map_err(|e| format!("training.model is not an aimatrix-mlp model (AMLP): {e}"))?;
    let data = Dataset::decode(dataset)
        .map_err(|e| format!("training.dataset is not an aimatrix-mlp dataset (ADSC): {e}"))?;
    model
        .check_dataset(&data)
        .map_err(|e| format!("training.dataset does not fit the model: {e}"))?;
    let (train, eval) = match holdout {
        Some(bytes) => {
            let eval = Dataset::decode(bytes).map_err(|e| {
                format!("training.holdout is not an aimatrix-mlp dataset (ADSC): {e}")
            })?;
            model
                .check_dataset(&eval)
                .map_err(|e| format!("training.holdout does not fit the model: {e}"))?;
            (data, eval)
        }
        None => data.hold_out(HOLDOUT_SHARE),
    };
    if eval.is_empty() {
        return Err("the evaluation set is empty: name a training.holdout dataset, or post a \
                    dataset with at least 4 samples of a label"
            .to_owned());
    }
    let seats = params.participants as usize;
    if train.len() < seats {
        return Err(format!(
            "training.dataset has {} training samples, fewer than training.participants ({seats}); \
             every participant needs at least one",
            train.len()
        ));
    }
    let chunks = train.chunks(seats).iter().map(Dataset::encode).collect();
    Ok(PreparedData { chunks, holdout: eval.encode(), training_samples: train.len() })
}

/// A round's numbers, recorded with the job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// Mean cross-entropy of the new model on the evaluation set.
    pub loss: f32,
    /// Accuracy of the new model on the evaluation set, 0 to 1.
    pub accuracy: f32,
    /// Update bytes received this round.
    pub bytes_received: u64,
}

/// What [`judge_round`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundJudgement {
    /// One verdict per update, in the order given: accepted, or the reason it was refused.
    pub verdicts: Vec<Result<(), String>>,
    /// The new model (`AMLP` bytes).
    pub model: Vec<u8>,
    /// Evaluation of the new model and bytes received.
    pub metrics: RoundMetrics,
}

/// Judges a closed round: decodes the `model` the round started from, runs
/// [`aimatrix_mlp::judge_round`] on the compressed `updates` with the job's rule and norm
/// check, and evaluates the new model on `holdout`.
///
/// # Errors
///
/// When the model or the evaluation set (the relay's own files) do not decode, or the rule's
/// parameters are out of range.
pub fn judge_round<B: AsRef<[u8]>>(
    params: &TrainingParams,
    model: &[u8],
    holdout: &[u8],
    updates: &[B],
) -> Result<RoundJudgement, String> {
    let model = Model::decode(model).map_err(|e| format!("the round's model: {e}"))?;
    let eval = Dataset::decode(holdout).map_err(|e| format!("the evaluation set: {e}"))?;
    let outcome =
        aimatrix_mlp::judge_round(&model, updates, &params.rule(), &params.norm_check(), None)
            .map_err(|e| format!("aggregation failed: {e}"))?;
    let (loss, accuracy) = aimatrix_mlp::loss_and_accuracy(&outcome.model, &eval);
    Ok(RoundJudgement {
        verdicts: outcome.verdicts,
        model: outcome.model.encode(),
        metrics: RoundMetrics { loss, accuracy, bytes_received: outcome.bytes_received as u64 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Digest;
    use crate::job::ContentRef;
    use aimatrix_mlp::{compress, delta, train, INPUTS};

    fn params(participants: u32) -> TrainingParams {
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

    fn dataset(n: usize) -> Dataset {
        let samples = (0..n * INPUTS).map(|i| ((i * 7919) % 17) as f32 / 16.0).collect();
        Dataset { features: INPUTS, samples, labels: (0..n).map(|i| (i % 10) as u8).collect() }
    }

    #[test]
    fn params_map_to_the_maths_and_the_guest_command_line() {
        let p = params(4);
        assert_eq!(p.codec(), Codec::TopK { fraction: 0.05 });
        assert!(p.error_feedback());
        assert_eq!(p.rule().name(), "centered_clip");
        assert_eq!(
            p.step_args(),
            [
                "--epochs",
                "2",
                "--lr",
                "0.1",
                "--batch",
                "8",
                "--compression",
                "topk",
                "--topk-fraction",
                "0.05"
            ]
        );
        let off = TrainingParams { max_norm_ratio: 0.0, ..params(4) };
        assert_eq!(off.norm_check(), NormCheck::OFF);
        let int8 = TrainingParams { compression: Compression::Int8, ..params(4) };
        assert!(!int8.error_feedback());
        assert!(!int8.step_args().contains(&"--topk-fraction".to_owned()));
    }

    #[test]
    fn data_is_split_into_chunks_and_an_evaluation_set() {
        let model = Model::init(1).encode();
        let data = dataset(100);
        let prepared = prepare_data(&params(4), &model, &data.encode(), None).unwrap();
        assert_eq!(prepared.chunks.len(), 4);
        let eval = Dataset::decode(&prepared.holdout).unwrap();
        assert_eq!(eval.len(), 20); // a quarter of each label's 10 samples, rounded down
        assert_eq!(prepared.training_samples, 80);
        let sizes: Vec<usize> =
            prepared.chunks.iter().map(|c| Dataset::decode(c).unwrap().len()).collect();
        assert_eq!(sizes, [20, 20, 20, 20]);

        let given = dataset(10).encode();
        let prepared = prepare_data(&params(4), &model, &data.encode(), Some(&given)).unwrap();
        assert_eq!((prepared.training_samples, prepared.holdout), (100, given));
    }

    #[test]
    fn bad_training_data_is_refused_with_the_field_at_fault() {
        let model = Model::init(1).encode();
        let data = dataset(100).encode();
        let err = prepare_data(&params(4), b"junk", &data, None).unwrap_err();
        assert!(err.starts_with("training.model"), "{err}");
        let err = prepare_data(&params(4), &model, &model, None).unwrap_err();
        assert!(err.starts_with("training.dataset"), "{err}");
        let narrow = Dataset { features: 3, samples: vec![0.0; 30], labels: vec![1; 10] };
        let err = prepare_data(&params(4), &model, &narrow.encode(), None).unwrap_err();
        assert!(err.contains("does not fit the model"), "{err}");
        let err = prepare_data(&params(50), &model, &dataset(40).encode(), None).unwrap_err();
        assert!(err.contains("fewer than training.participants (50)"), "{err}");
        let err = prepare_data(&params(2), &model, &data, Some(b"x")).unwrap_err();
        assert!(err.starts_with("training.holdout"), "{err}");
    }

    #[test]
    fn a_round_is_judged_and_evaluated() {
        let p = TrainingParams { compression: Compression::None, ..params(3) };
        let model = Model::init(1);
        let data = dataset(60);
        let prepared = prepare_data(&p, &model.encode(), &data.encode(), None).unwrap();
        let mut updates: Vec<Vec<u8>> = prepared
            .chunks
            .iter()
            .map(|c| {
                let chunk = Dataset::decode(c).unwrap();
                compress(p.codec(), &delta(&train(&model, &chunk, 1, 0.1, 8), &model))
            })
            .collect();
        updates.push(b"garbage".to_vec());
        let judged = judge_round(&p, &model.encode(), &prepared.holdout, &updates).unwrap();
        assert_eq!(judged.verdicts.iter().filter(|v| v.is_ok()).count(), 3);
        assert!(judged.verdicts[3].is_err());
        assert_ne!(judged.model, model.encode());
        assert!(judged.metrics.accuracy >= 0.0 && judged.metrics.accuracy <= 1.0);
        assert_eq!(
            judged.metrics.bytes_received,
            updates.iter().map(Vec::len).sum::<usize>() as u64
        );
    }
}
