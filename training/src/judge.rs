//! A closed round judged: updates decoded, validated and aggregated, the new model evaluated.

use aimatrix_mlp::{AggregateError, Dataset, FormatError, Model};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::job::TrainingParams;
use aimatrix_protocol::messages::OutputDigest;
use aimatrix_protocol::relay::training::{RoundMetrics, RoundVerdict};

use crate::{TrainingParamsExt, UPDATE_FILE};

/// Why a round could not be judged at all. Each is a fault of the relay's own files or of the
/// job's parameters, never of a participant's update (those are refused one by one in the
/// verdict).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum JudgeError {
    /// The model the round started from does not decode.
    #[error("the round's model does not decode: {0}")]
    Model(FormatError),
    /// The evaluation set does not decode.
    #[error("the evaluation set does not decode: {0}")]
    Holdout(FormatError),
    /// The aggregation rule's parameters are out of range.
    #[error("aggregation failed: {0}")]
    Aggregation(AggregateError),
}

/// What [`judge_round`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgedRound {
    /// The answer for [`RelayCore::round_aggregated`]: whom to pay, whom to refuse and why,
    /// the new model's digest and its evaluation.
    ///
    /// [`RelayCore::round_aggregated`]: aimatrix_protocol::relay::RelayCore::round_aggregated
    pub verdict: RoundVerdict,
    /// The new model (`AMLP` bytes); `verdict.new_model` is their SHA-256. The driver stores
    /// them where the next round's participants fetch them.
    pub model: Vec<u8>,
}

/// The digest of the update among a training result's outputs, if it returned one.
pub fn update_digest(outputs: &[OutputDigest]) -> Option<Digest> {
    outputs.iter().find(|o| o.name == UPDATE_FILE).map(|o| o.digest)
}

/// Judges a closed round. `updates` holds each sender with its update's bytes, or `None` when
/// its result carried no readable update (refused with that reason). The rest is
/// [`aimatrix_mlp::judge_round`] with the job's rule and norm check on the `model` the round
/// started from; the new model is evaluated on `holdout`.
///
/// # Errors
///
/// When the model or the evaluation set (the relay's own files) do not decode, or the rule's
/// parameters are out of range.
pub fn judge_round<B: AsRef<[u8]>>(
    params: &TrainingParams,
    model: &[u8],
    holdout: &[u8],
    updates: &[(NodeId, Option<B>)],
) -> Result<JudgedRound, JudgeError> {
    let model = Model::decode(model).map_err(JudgeError::Model)?;
    let eval = Dataset::decode(holdout).map_err(JudgeError::Holdout)?;
    let mut rejected = Vec::new();
    let mut senders = Vec::with_capacity(updates.len());
    let mut bytes = Vec::with_capacity(updates.len());
    for (node, update) in updates {
        match update {
            Some(b) => {
                senders.push(*node);
                bytes.push(b.as_ref());
            }
            None => {
                rejected.push((*node, format!("the result has no readable {UPDATE_FILE} output")))
            }
        }
    }
    let mut outcome =
        aimatrix_mlp::judge_round(&model, &bytes, &params.rule(), &params.norm_check(), None)
            .map_err(JudgeError::Aggregation)?;
    // Finite updates can still sum past f32::MAX when a whole round sends huge values (the
    // norm check is relative to the round's median): such a round changes nothing, so the
    // job goes on from the model it had instead of failing on a model no one can decode.
    let overflowed = outcome.model.params.iter().any(|v| !v.is_finite());
    if overflowed {
        let why =
            "the aggregate of the accepted updates overflows the model (values past f32::MAX)";
        for verdict in outcome.verdicts.iter_mut().filter(|v| v.is_ok()) {
            *verdict = Err(why.to_owned());
        }
        outcome.model = model;
    }
    let (loss, accuracy) = aimatrix_mlp::loss_and_accuracy(&outcome.model, &eval);
    let mut accepted = Vec::new();
    for (node, verdict) in senders.into_iter().zip(outcome.verdicts) {
        match verdict {
            Ok(()) => accepted.push(node),
            Err(why) => rejected.push((node, why)),
        }
    }
    let model = outcome.model.encode();
    let metrics = RoundMetrics { loss, accuracy, bytes_received: outcome.bytes_received as u64 };
    let verdict = RoundVerdict { accepted, rejected, new_model: Digest::of(&model), metrics };
    Ok(JudgedRound { verdict, model })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{dataset, params};
    use crate::{prepare_data, UPDATE_FILE};
    use aimatrix_mlp::{compress, delta, train};
    use aimatrix_protocol::job::Compression;
    use aimatrix_protocol::testkit;

    #[test]
    fn a_round_is_judged_and_evaluated() {
        let p = TrainingParams { compression: Compression::None, ..params(3) };
        let model = Model::init(1);
        let data = dataset(60);
        let prepared = prepare_data(&p, &model.encode(), &data.encode(), None).unwrap();
        let node = |i| testkit::keypair(i).public();
        let mut updates: Vec<(NodeId, Option<Vec<u8>>)> = prepared
            .chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let chunk = Dataset::decode(c).unwrap();
                let update = compress(p.codec(), &delta(&train(&model, &chunk, 1, 0.1, 8), &model));
                (node(i as u64), Some(update))
            })
            .collect();
        updates.push((node(7), Some(b"garbage".to_vec())));
        updates.push((node(8), None));
        let judged = judge_round(&p, &model.encode(), &prepared.holdout, &updates).unwrap();
        let verdict = &judged.verdict;
        assert_eq!(verdict.accepted, [node(0), node(1), node(2)]);
        let refused: Vec<NodeId> = verdict.rejected.iter().map(|(n, _)| *n).collect();
        assert_eq!(refused, [node(8), node(7)]);
        assert!(verdict.rejected[0].1.contains(UPDATE_FILE), "{:?}", verdict.rejected);
        assert!(verdict.rejected[1].1.contains("does not decode"), "{:?}", verdict.rejected);
        assert_ne!(judged.model, model.encode());
        assert_eq!(verdict.new_model, Digest::of(&judged.model));
        assert!(verdict.metrics.accuracy >= 0.0 && verdict.metrics.accuracy <= 1.0);
        let sent: usize = updates.iter().filter_map(|(_, u)| u.as_ref().map(Vec::len)).sum();
        assert_eq!(verdict.metrics.bytes_received, sent as u64);
    }

    #[test]
    fn a_round_that_would_overflow_the_model_changes_nothing_and_pays_nobody() {
        let p = TrainingParams { compression: Compression::None, ..params(2) };
        let mut model = Model::init(1);
        model.params.iter_mut().for_each(|v| *v = 3.0e38);
        let huge = compress(p.codec(), &vec![f32::MAX; model.params.len()]);
        let updates = [
            (testkit::keypair(1).public(), Some(huge.clone())),
            (testkit::keypair(2).public(), Some(huge)),
        ];
        let holdout = dataset(10).encode();
        let judged = judge_round(&p, &model.encode(), &holdout, &updates).unwrap();
        assert!(judged.verdict.accepted.is_empty(), "{:?}", judged.verdict);
        assert_eq!(judged.verdict.rejected.len(), 2);
        assert!(
            judged.verdict.rejected[0].1.contains("overflows"),
            "{:?}",
            judged.verdict.rejected
        );
        assert_eq!(judged.model, model.encode(), "the round starts again from the same model");
        Model::decode(&judged.model).unwrap();
    }

    #[test]
    fn a_round_whose_own_files_do_not_decode_is_not_judged() {
        let p = params(2);
        let none: [(NodeId, Option<Vec<u8>>); 0] = [];
        let holdout = dataset(10).encode();
        let err = judge_round(&p, b"junk", &holdout, &none).unwrap_err();
        assert!(matches!(err, JudgeError::Model(_)), "{err}");
        let err = judge_round(&p, &Model::init(1).encode(), b"junk", &none).unwrap_err();
        assert!(matches!(err, JudgeError::Holdout(_)), "{err}");
    }

    #[test]
    fn the_update_is_found_among_the_outputs_by_name() {
        let file = |name: &str, d: &[u8]| OutputDigest {
            name: name.into(),
            digest: Digest::of(d),
            size_bytes: d.len() as u64,
        };
        let outputs = [file("metrics.json", b"{}"), file(UPDATE_FILE, b"u")];
        assert_eq!(update_digest(&outputs), Some(Digest::of(b"u")));
        assert_eq!(update_digest(&outputs[..1]), None);
    }
}
