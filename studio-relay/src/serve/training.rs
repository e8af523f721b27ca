//! The relay's side of training jobs: the data split at post, the judging of each closed round
//! (off the event loop), and the final model and metrics CSV.
//!
//! The decisions are `aimatrix_training`'s (the simulator calls the same functions); this module
//! only moves bytes between the content store and the core.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::job::{ContentRef, JobSpec};
use aimatrix_protocol::messages::{JobId, OutputDigest};
use aimatrix_protocol::relay::training::{RoundMetrics, RoundVerdict, TrainingData, TrainingState};
use aimatrix_training::update_digest;
use studio_relay::api::ApiError;
use studio_relay::store::BlobStore;

/// The key under which a completed training job's outputs (final model, metrics CSV) are kept
/// beside its leases' outputs: no lease gets this number.
pub(crate) const TRAINING_OUTPUTS: u32 = u32::MAX;
/// Output name of the final model.
pub(crate) const MODEL_OUTPUT: &str = "model.bin";
/// Output name of the per-round metrics.
pub(crate) const METRICS_OUTPUT: &str = "metrics.csv";

/// Reads a content reference the post check found in the store.
fn read(blobs: &BlobStore, field: &str, content: &ContentRef) -> Result<Vec<u8>, ApiError> {
    let Some(digest) = content.digest() else {
        return Err(ApiError::Invalid(format!("{field} names a path; upload it first")));
    };
    match blobs.get(&digest) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(ApiError::Invalid(format!("{field}: this relay has no content {digest}"))),
        Err(e) => Err(ApiError::Internal(format!("cannot read blob store: {e}"))),
    }
}

/// Checks a training job's model and dataset, splits the dataset and stores the chunks and
/// the evaluation set where participants (and the round judge) can fetch them.
pub(crate) fn prepare(blobs: &BlobStore, spec: &JobSpec) -> Result<TrainingData, ApiError> {
    let Some(params) = &spec.training else {
        return Err(ApiError::Invalid("a training job needs a [training] section".into()));
    };
    let model = read(blobs, "training.model", &params.model)?;
    let dataset = read(blobs, "training.dataset", &params.dataset)?;
    let holdout = match &params.holdout {
        Some(h) => Some(read(blobs, "training.holdout", h)?),
        None => None,
    };
    let prepared = aimatrix_training::prepare_data(params, &model, &dataset, holdout.as_deref())
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    let store = |bytes: &[u8]| {
        blobs.put(bytes).map_err(|e| ApiError::Internal(format!("cannot store training data: {e}")))
    };
    let chunks = prepared.chunks.iter().map(|c| store(c)).collect::<Result<Vec<_>, _>>()?;
    let holdout = store(&prepared.holdout)?;
    Ok(TrainingData { chunks, holdout })
}

/// A closed round's inputs, gathered on the event loop.
pub(crate) struct RoundInput {
    pub(crate) job_id: JobId,
    pub(crate) round: u32,
    pub(crate) params: aimatrix_protocol::job::TrainingParams,
    pub(crate) model: Digest,
    pub(crate) holdout: Digest,
    /// Each update's sender and the digest of its `update.bin` (`None`: it returned none).
    pub(crate) updates: Vec<(NodeId, Option<Digest>)>,
}

impl RoundInput {
    /// The round the core closed, with each update located among the results' outputs.
    pub(crate) fn new(
        job_id: JobId,
        round: u32,
        state: &TrainingState,
        model: Digest,
        updates: &[(NodeId, u32, Digest)],
        outputs: Option<&BTreeMap<u32, Vec<OutputDigest>>>,
    ) -> Self {
        let updates = updates
            .iter()
            .map(|(node, lease, _)| {
                let file = outputs.and_then(|o| o.get(lease)).and_then(|f| update_digest(f));
                (*node, file)
            })
            .collect();
        Self {
            job_id,
            round,
            params: state.params.clone(),
            model,
            holdout: state.data.holdout,
            updates,
        }
    }
}

/// What judging a round gave: the verdict for the core and the new model's bytes (stored).
pub(crate) struct RoundOutput {
    pub(crate) job_id: JobId,
    pub(crate) round: u32,
    pub(crate) verdict: Result<RoundVerdict, String>,
}

/// Judges a round: reads the model, evaluation set and updates from the store, runs
/// [`aimatrix_training::judge_round`] and stores the new model. Blocking: run it off the event
/// loop.
pub(crate) fn judge(blobs: &Arc<BlobStore>, input: RoundInput) -> RoundOutput {
    let (job_id, round) = (input.job_id, input.round);
    RoundOutput { job_id, round, verdict: judge_inner(blobs, input) }
}

fn judge_inner(blobs: &BlobStore, input: RoundInput) -> Result<RoundVerdict, String> {
    let get = |digest: &Digest, what: &str| match blobs.get(digest) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(format!("the {what} {digest} is missing from the content store")),
        Err(e) => Err(format!("cannot read the {what} {digest}: {e}")),
    };
    let model = get(&input.model, "round's model")?;
    let holdout = get(&input.holdout, "evaluation set")?;
    // An update the store cannot give back is judged as missing.
    let updates: Vec<(NodeId, Option<Vec<u8>>)> = input
        .updates
        .iter()
        .map(|(node, file)| (*node, file.and_then(|d| blobs.get(&d).ok().flatten())))
        .collect();
    let judged = aimatrix_training::judge_round(&input.params, &model, &holdout, &updates)
        .map_err(|e| e.to_string())?;
    let stored =
        blobs.put(&judged.model).map_err(|e| format!("cannot store the new model: {e}"))?;
    assert_eq!(stored, judged.verdict.new_model, "the store names content by its SHA-256");
    Ok(judged.verdict)
}

/// The per-round metrics of a training job as CSV, one line per aggregated round.
pub(crate) fn metrics_csv(state: &TrainingState) -> String {
    let mut csv = String::from(
        "round,received,accepted,rejected,bytes_received,test_loss,test_accuracy,model_sha256\n",
    );
    for r in &state.history {
        let RoundMetrics { loss, accuracy, bytes_received } = r.metrics;
        let _ = writeln!(
            csv,
            "{},{},{},{},{bytes_received},{loss},{accuracy},{}",
            r.round,
            r.received,
            r.accepted,
            r.rejected.len(),
            r.model.to_hex()
        );
    }
    csv
}

/// Stores a completed training job's metrics CSV and returns its outputs: the final model and
/// the CSV.
pub(crate) fn final_outputs(
    blobs: &BlobStore,
    state: &TrainingState,
    final_model: Digest,
) -> Result<Vec<OutputDigest>, String> {
    let model_bytes = match blobs.get(&final_model) {
        Ok(Some(bytes)) => bytes.len() as u64,
        _ => return Err(format!("the final model {final_model} is missing from the store")),
    };
    let csv = metrics_csv(state);
    let csv_digest = blobs.put(csv.as_bytes()).map_err(|e| format!("cannot store metrics: {e}"))?;
    Ok(vec![
        OutputDigest {
            name: MODEL_OUTPUT.to_owned(),
            digest: final_model,
            size_bytes: model_bytes,
        },
        OutputDigest {
            name: METRICS_OUTPUT.to_owned(),
            digest: csv_digest,
            size_bytes: csv.len() as u64,
        },
    ])
}
