//! A job as the relay tracks it, and the commands that post, reserve and cancel one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::training::{TrainingData, TrainingState};
use super::{CommandError, PostError, RelayCore, RelayEvent};
use crate::hash::Digest;
use crate::identity::NodeId;
use crate::job::{JobKind, JobSpec};
use crate::ledger::{LedgerOp, TransferId};
use crate::messages::JobId;
use crate::time::{secs, Millis};

/// Where a job stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for the ledger to confirm the escrow.
    Reserving,
    /// Offered; leasing and collecting results.
    Open,
    /// Done: the accepted result (or final model) and everyone paid.
    Completed {
        /// The agreed result hash (training: the final model digest).
        result_hash: Digest,
    },
    /// Ended without a result; unpaid escrow refunded.
    Failed {
        /// Why.
        reason: String,
    },
    /// The ledger refused the escrow; never offered.
    Refused {
        /// Why.
        reason: String,
    },
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Completed { .. } | Self::Failed { .. } | Self::Refused { .. })
    }
}

/// Where a lease stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseStatus {
    /// Running.
    Active,
    /// Returned a successful result with this hash.
    Returned(Digest),
    /// Returned a failure or was handed back.
    Failed(String),
    /// Passed its deadline without a result.
    Expired,
    /// Cancelled by the relay (job finished or ended).
    Cancelled,
}

/// One lease of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The lease number.
    pub lease: u32,
    /// Who holds it.
    pub node: NodeId,
    /// Granted at.
    pub granted_at_ms: Millis,
    /// Deadline.
    pub deadline_ms: Millis,
    /// Training round, if any.
    pub round: Option<u32>,
    /// Last progress report.
    pub progress: u8,
    /// State.
    pub status: LeaseStatus,
    /// Whether this lease's result was paid.
    pub paid: bool,
    /// Training: the digest of the result's `delta.sha256` output, which a verifying re-run
    /// must match.
    pub check: Option<Digest>,
}

/// A job as the relay tracks it.
///
/// Serializable with every private field, so a driver can store it with
/// [`crate::codec::encode`] after each change and hand it to [`RelayCore::restore_job`] after
/// a restart (see `docs/protocol.md`, "Restoring jobs after a restart").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayJob {
    /// The id.
    pub id: JobId,
    /// The spec.
    pub spec: JobSpec,
    /// The requester's ledger account.
    pub requester: String,
    /// Posted at.
    pub posted_at_ms: Millis,
    /// Deadline.
    pub deadline_ms: Millis,
    /// State.
    pub state: JobState,
    /// Escrow reserved.
    pub escrow: u64,
    /// Credits paid so far (node amounts and fees).
    pub paid: u64,
    /// Credits released back to the requester.
    pub refunded: u64,
    /// Every lease granted, by number.
    pub leases: BTreeMap<u32, LeaseRecord>,
    /// Nodes that lost or failed a lease; never leased again.
    pub excluded: BTreeSet<NodeId>,
    /// Training progress, for training jobs.
    pub training: Option<TrainingState>,
    pub(super) next_lease: u32,
    pub(super) announce_at_ms: Millis,
    /// Announcements since the job was posted or a slot last freed: each names a wider set of
    /// preferred claimants, and past [`TARGETED_ANNOUNCEMENTS`] the offer is open to every
    /// node. Not stored: a restored job starts targeting again.
    #[serde(skip)]
    pub(super) announce_round: u32,
    /// The preferred claimants of the latest announcement, and when it went out.
    #[serde(skip)]
    pub(super) nominated: (Millis, Vec<NodeId>),
    pub(super) post_seq: u64,
    /// The reservation's ledger timeout, kept so a restored job re-emits the identical
    /// `Reserve` even if `reserve_margin_ms` changed.
    pub(super) reserve_timeout_at_ms: Millis,
}

impl RelayJob {
    pub(super) fn reserve_id(&self) -> TransferId {
        TransferId::reserve_of(self.id)
    }

    pub(super) fn reserve_op(&self) -> LedgerOp {
        LedgerOp::Reserve {
            id: self.reserve_id(),
            job_id: self.id,
            requester: self.requester.clone(),
            amount: self.escrow,
            timeout_at_ms: self.reserve_timeout_at_ms,
        }
    }

    pub(super) fn active_leases(&self) -> usize {
        self.leases.values().filter(|l| l.status == LeaseStatus::Active).count()
    }

    /// Size of the largest group of agreeing successful results.
    pub(super) fn best_agreement(&self) -> usize {
        let mut groups: HashMap<Digest, usize> = HashMap::new();
        for l in self.leases.values() {
            if let LeaseStatus::Returned(h) = l.status {
                *groups.entry(h).or_default() += 1;
            }
        }
        groups.values().copied().max().unwrap_or(0)
    }

    pub(super) fn lease_budget(&self) -> u64 {
        u64::from(self.spec.replication) * u64::from(self.spec.max_attempts)
    }

    /// Leases the relay would grant now.
    pub fn open_slots(&self) -> u32 {
        if self.state != JobState::Open {
            return 0;
        }
        if let Some(t) = &self.training {
            return t.open_slots();
        }
        let needed = (self.spec.replication as usize).saturating_sub(self.best_agreement());
        let wanted = needed.saturating_sub(self.active_leases()) as u64;
        let budget_left = self.lease_budget().saturating_sub(u64::from(self.next_lease));
        wanted.min(budget_left) as u32
    }
}

impl RelayCore {
    /// Accepts a job from `requester` and emits the escrow reservation. The job is offered
    /// once the driver confirms the reservation. A training job is posted with
    /// [`RelayCore::post_training_job`].
    pub fn post_job(
        &mut self,
        now: Millis,
        requester: &str,
        spec: JobSpec,
    ) -> Result<JobId, PostError> {
        self.post(now, requester, spec, None)
    }

    /// Accepts a training job with its data: the digests of its chunks (one per participant
    /// seat, stored where participants can fetch them) and of its evaluation set (see
    /// `aimatrix_training::prepare_data`).
    pub fn post_training_job(
        &mut self,
        now: Millis,
        requester: &str,
        spec: JobSpec,
        data: TrainingData,
    ) -> Result<JobId, PostError> {
        self.post(now, requester, spec, Some(data))
    }

    pub(super) fn post(
        &mut self,
        now: Millis,
        requester: &str,
        spec: JobSpec,
        data: Option<TrainingData>,
    ) -> Result<JobId, PostError> {
        spec.validate()?;
        let training = match (spec.kind == JobKind::Training, spec.training.clone(), data) {
            (true, Some(params), Some(data)) => {
                if data.chunks.len() != params.participants as usize {
                    return Err(PostError::TrainingData(format!(
                        "{} chunks for {} participant seats",
                        data.chunks.len(),
                        params.participants
                    )));
                }
                Some(TrainingState::new(params, data))
            }
            (true, _, None) => {
                return Err(PostError::TrainingData(
                    "a training job is posted with its chunks (post_training_job)".into(),
                ))
            }
            (false, _, Some(_)) => {
                return Err(PostError::TrainingData("only a training job has training data".into()))
            }
            _ => None,
        };
        if !spec.is_resolved() {
            return Err(PostError::Unresolved);
        }
        let spec_len =
            crate::codec::encode(&spec).map_err(|e| PostError::TooLarge(e.to_string()))?.len();
        if spec_len > crate::codec::MAX_FRAME_BYTES / 2 {
            return Err(PostError::TooLarge(format!("{spec_len} bytes encoded")));
        }
        self.posted += 1;
        let id = self.job_id_for(requester, now, self.posted);
        let escrow = spec.escrow().ok_or_else(|| PostError::TooLarge("escrow overflows".into()))?;
        let deadline_ms = now.saturating_add(secs(spec.deadline_s));
        let job = RelayJob {
            id,
            requester: requester.to_owned(),
            posted_at_ms: now,
            deadline_ms,
            state: JobState::Reserving,
            escrow,
            paid: 0,
            refunded: 0,
            leases: BTreeMap::new(),
            excluded: BTreeSet::new(),
            training,
            next_lease: 0,
            announce_at_ms: now,
            announce_round: 0,
            nominated: (0, Vec::new()),
            post_seq: self.posted,
            reserve_timeout_at_ms: deadline_ms.saturating_add(self.cfg.reserve_margin_ms),
            spec,
        };
        self.events.push_back(RelayEvent::Ledger(job.reserve_op()));
        self.jobs.insert(id, job);
        Ok(id)
    }

    /// A job's id: derived from this relay's key, the requester, the posting time and the count
    /// of jobs accepted so far (this one included).
    pub(super) fn job_id_for(&self, requester: &str, posted_at_ms: Millis, post_seq: u64) -> JobId {
        JobId::from_digest(&Digest::of_parts(&[
            b"aimatrix/job",
            self.id().as_bytes(),
            requester.as_bytes(),
            &posted_at_ms.to_le_bytes(),
            &post_seq.to_le_bytes(),
        ]))
    }

    /// The ledger holds the job's escrow: offer it.
    pub fn reserve_confirmed(&mut self, now: Millis, job_id: JobId) -> Result<(), CommandError> {
        let job = self.job_in_state(job_id, &JobState::Reserving, "confirming the escrow")?;
        job.state = JobState::Open;
        self.events.push_back(RelayEvent::JobOpen { job_id });
        self.announce_due(now, job_id);
        Ok(())
    }

    /// The ledger refused the escrow (e.g. insufficient funds): the job is never offered.
    pub fn reserve_failed(
        &mut self,
        _now: Millis,
        job_id: JobId,
        reason: String,
    ) -> Result<(), CommandError> {
        let job = self.job_in_state(job_id, &JobState::Reserving, "refusing the escrow")?;
        job.state = JobState::Refused { reason: reason.clone() };
        self.events.push_back(RelayEvent::JobRefused { job_id, reason });
        Ok(())
    }

    /// The requester withdraws the job: leases are cancelled, unpaid escrow released.
    pub fn cancel_job(&mut self, now: Millis, job_id: JobId) -> Result<(), CommandError> {
        self.end_open_job(now, job_id, "cancelling", "cancelled by the requester".into())
    }

    /// The driver cannot go on with the job (it cannot judge a round from the relay's own
    /// files): the job fails with `reason`, leases are cancelled, unpaid escrow released.
    pub fn abandon_job(
        &mut self,
        now: Millis,
        job_id: JobId,
        reason: String,
    ) -> Result<(), CommandError> {
        self.end_open_job(now, job_id, "abandoning", reason)
    }

    fn end_open_job(
        &mut self,
        now: Millis,
        job_id: JobId,
        what: &'static str,
        reason: String,
    ) -> Result<(), CommandError> {
        let job = self.jobs.get(&job_id).ok_or(CommandError::UnknownJob(job_id))?;
        if job.state != JobState::Open {
            let state = format!("{:?}", job.state);
            return Err(CommandError::WrongState { job_id, state, what });
        }
        self.fail_job(now, job_id, reason);
        Ok(())
    }

    pub(super) fn job_in_state(
        &mut self,
        job_id: JobId,
        state: &JobState,
        what: &'static str,
    ) -> Result<&mut RelayJob, CommandError> {
        let job = self.jobs.get_mut(&job_id).ok_or(CommandError::UnknownJob(job_id))?;
        if &job.state != state {
            return Err(CommandError::WrongState {
                job_id,
                state: format!("{:?}", job.state),
                what,
            });
        }
        Ok(job)
    }
}
