//! The plan of one training step: what a participant puts in the guest's inputs, with which
//! arguments, and what of its outputs stays on the node.

use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::messages::Lease;

use crate::{TrainingParamsExt, CHUNK_FILE, MODEL_FILE, RESIDUAL_FILE};

/// What goes into one of the guest's input files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepInput {
    /// Content the relay serves, by digest (the round's model, the participant's chunk).
    Content(Digest),
    /// The participant's own error-feedback memory from its last step of this job.
    Residual,
}

/// How a node runs one training lease, on top of the job's own workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// The guest's input files, by name, in the order to place them.
    pub inputs: Vec<(&'static str, StepInput)>,
    /// Arguments appended to the workload's own.
    pub args: Vec<String>,
    /// Run in the sandbox's deterministic mode: a verifying re-run on another node must give
    /// the same delta digest bit for bit.
    pub deterministic: bool,
    /// After a successful run, keep the guest's `residual.bin` as this participant's memory
    /// for its next round. A verifying re-run of another participant's update keeps nothing.
    pub keep_residual: bool,
}

impl StepPlan {
    /// Whether an output file stays on the node (never uploaded): the error-feedback memory
    /// is the participant's own.
    pub fn is_private(&self, output: &str) -> bool {
        output == RESIDUAL_FILE
    }
}

/// Why a lease cannot be run as a training step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The lease names a round but its job has no `[training]` section.
    #[error("the relay leased a training round of a job with no [training] section")]
    NoTrainingSection,
}

/// Plans the training step of `lease`: `None` for a lease that is not a training round.
/// `has_residual` says whether the node kept error-feedback memory for this job; it is an
/// input only when the job's compression uses it and the lease is not a verifying re-run
/// (the delta digest a re-run is checked by does not depend on it).
///
/// # Errors
///
/// [`StepError::NoTrainingSection`] when the lease names a round of a job without training
/// parameters.
pub fn plan_step(lease: &Lease, has_residual: bool) -> Result<Option<StepPlan>, StepError> {
    let Some(round) = &lease.round else { return Ok(None) };
    let Some(params) = &lease.spec.training else { return Err(StepError::NoTrainingSection) };
    let mut inputs = vec![
        (MODEL_FILE, StepInput::Content(round.model)),
        (CHUNK_FILE, StepInput::Content(round.data)),
    ];
    if params.error_feedback() && !round.verify && has_residual {
        inputs.push((RESIDUAL_FILE, StepInput::Residual));
    }
    Ok(Some(StepPlan {
        inputs,
        args: params.step_args(),
        deterministic: true,
        keep_residual: !round.verify,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::params;
    use aimatrix_protocol::job::{Compression, JobKind};
    use aimatrix_protocol::messages::{JobId, RoundLease};
    use aimatrix_protocol::testkit;

    fn lease(compression: Compression, verify: bool) -> Lease {
        let mut spec = testkit::batch_spec(10);
        spec.kind = JobKind::Training;
        spec.training = Some(aimatrix_protocol::job::TrainingParams { compression, ..params(2) });
        Lease {
            job_id: JobId([1; 16]),
            lease: 3,
            node: testkit::keypair(1).public(),
            deadline_ms: 60_000,
            spec,
            round: Some(RoundLease {
                round: 2,
                model: Digest::of(b"model"),
                chunk: 1,
                chunks: 2,
                data: Digest::of(b"chunk"),
                verify,
            }),
        }
    }

    #[test]
    fn a_participant_trains_on_the_round_s_model_and_chunk_with_its_memory() {
        let plan = plan_step(&lease(Compression::Topk, false), true).unwrap().unwrap();
        assert_eq!(
            plan.inputs,
            [
                (MODEL_FILE, StepInput::Content(Digest::of(b"model"))),
                (CHUNK_FILE, StepInput::Content(Digest::of(b"chunk"))),
                (RESIDUAL_FILE, StepInput::Residual),
            ]
        );
        assert!(plan.deterministic && plan.keep_residual);
        assert!(plan.args.contains(&"topk".to_owned()));
        assert!(plan.is_private(RESIDUAL_FILE) && !plan.is_private(crate::UPDATE_FILE));
        // No memory yet: nothing to put in.
        let first = plan_step(&lease(Compression::Topk, false), false).unwrap().unwrap();
        assert_eq!(first.inputs.len(), 2);
    }

    #[test]
    fn a_verifying_rerun_uses_and_keeps_no_memory() {
        let plan = plan_step(&lease(Compression::Topk, true), true).unwrap().unwrap();
        assert_eq!(plan.inputs.len(), 2, "{:?}", plan.inputs);
        assert!(!plan.keep_residual);
    }

    #[test]
    fn codecs_without_error_feedback_take_no_memory() {
        let plan = plan_step(&lease(Compression::Int8, false), true).unwrap().unwrap();
        assert_eq!(plan.inputs.len(), 2);
    }

    #[test]
    fn a_batch_lease_is_no_step_and_a_round_without_training_is_refused() {
        let mut batch = lease(Compression::None, false);
        batch.round = None;
        assert_eq!(plan_step(&batch, true), Ok(None));
        let mut broken = lease(Compression::None, false);
        broken.spec.training = None;
        assert_eq!(plan_step(&broken, true), Err(StepError::NoTrainingSection));
    }
}
