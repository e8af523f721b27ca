//! One training round at the aggregator: decode, validate, aggregate, apply.
//!
//! The relay's round driver, the simulator's `train` command and the native federated harness
//! all call [`judge_round`], so a round's verdicts and its new model are the same bits
//! wherever the round is judged.

use crate::{apply_delta, decompress, validate, AggregateError, Model, NormCheck, Rule, Verdict};

/// What [`judge_round`] decided.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundOutcome {
    /// One verdict per update, in the order given: `Ok(())` accepted (aggregated), or the
    /// reason it was refused (bytes that do not decode, wrong shape, NaN/Inf, norm).
    pub verdicts: Vec<Result<(), String>>,
    /// The aggregate of the accepted updates (`None` when none was accepted).
    pub aggregate: Option<Vec<f32>>,
    /// The model after the round: `model` plus the aggregate (`model` itself when nothing
    /// was accepted).
    pub model: Model,
    /// Bytes received: the sum of the updates' lengths.
    pub bytes_received: usize,
}

impl RoundOutcome {
    /// How many updates were accepted.
    pub fn accepted(&self) -> usize {
        self.verdicts.iter().filter(|v| v.is_ok()).count()
    }
}

/// Judges one round's compressed updates (`AMLC` bytes, one per participant, in a fixed order)
/// against `model`: every update is decompressed, then [`validate`]d with `norm_check`; the
/// accepted ones are aggregated with `rule` (`previous` is the last round's aggregate, for
/// centered clipping) and applied to the model.
///
/// # Errors
///
/// Only if `rule`'s parameters are out of range (the updates given to it all have the
/// model's length, so nothing else can fail).
pub fn judge_round<B: AsRef<[u8]>>(
    model: &Model,
    updates: &[B],
    rule: &Rule,
    norm_check: &NormCheck,
    previous: Option<&[f32]>,
) -> Result<RoundOutcome, AggregateError> {
    let param_count = model.params.len();
    let mut verdicts: Vec<Result<(), String>> = Vec::with_capacity(updates.len());
    let mut decoded = Vec::with_capacity(updates.len());
    let mut decoded_at = Vec::with_capacity(updates.len());
    for (index, bytes) in updates.iter().enumerate() {
        match decompress(bytes.as_ref(), param_count) {
            Ok(values) => {
                decoded.push(values);
                decoded_at.push(index);
                verdicts.push(Ok(()));
            }
            Err(err) => verdicts.push(Err(format!("the update does not decode: {err}"))),
        }
    }
    let judged = validate(&decoded, param_count, norm_check);
    let mut accepted = Vec::with_capacity(decoded.len());
    for ((index, values), verdict) in decoded_at.into_iter().zip(decoded).zip(judged) {
        match verdict {
            Verdict::Accepted { .. } => accepted.push(values),
            Verdict::Rejected(reason) => verdicts[index] = Err(reason.to_string()),
        }
    }
    let bytes_received = updates.iter().map(|u| u.as_ref().len()).sum();
    if accepted.is_empty() {
        return Ok(RoundOutcome {
            verdicts,
            aggregate: None,
            model: model.clone(),
            bytes_received,
        });
    }
    let aggregate = rule.aggregate(&accepted, previous)?;
    let Ok(next) = apply_delta(model, &aggregate) else {
        unreachable!("an aggregate of updates with the model's length fits the model")
    };
    Ok(RoundOutcome { verdicts, aggregate: Some(aggregate), model: next, bytes_received })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compress, Codec};

    #[test]
    fn a_round_rejects_bad_updates_with_reasons_and_applies_the_rest() {
        let model = Model::init_with_dims(2, 2, 2, 1);
        let n = model.params.len();
        let good: Vec<Vec<u8>> =
            (0..4).map(|i| compress(Codec::None, &vec![0.01 * (i + 1) as f32; n])).collect();
        let mut updates = good.clone();
        updates.push(b"not an update".to_vec());
        updates.push(compress(Codec::None, &vec![0.0; n + 1]));
        updates.push(compress(Codec::None, &vec![100.0; n]));
        let outcome =
            judge_round(&model, &updates, &Rule::Mean, &NormCheck::default(), None).unwrap();
        assert_eq!(outcome.accepted(), 4);
        assert!(outcome.verdicts[4].as_ref().unwrap_err().contains("does not decode"));
        assert!(outcome.verdicts[5].is_err());
        assert!(outcome.verdicts[6].as_ref().unwrap_err().contains("median norm"));
        let aggregate = outcome.aggregate.unwrap();
        assert!((aggregate[0] - 0.025).abs() < 1e-6, "{}", aggregate[0]);
        assert!((outcome.model.params[0] - (model.params[0] + 0.025)).abs() < 1e-6);
        assert_eq!(outcome.bytes_received, updates.iter().map(Vec::len).sum::<usize>());
    }

    #[test]
    fn a_round_with_nothing_accepted_keeps_the_model() {
        let model = Model::init_with_dims(2, 2, 2, 1);
        let outcome =
            judge_round(&model, &[b"junk".to_vec()], &Rule::Mean, &NormCheck::OFF, None).unwrap();
        assert_eq!(outcome.accepted(), 0);
        assert_eq!(outcome.aggregate, None);
        assert_eq!(outcome.model, model);
    }
}
