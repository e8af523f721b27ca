//! Claims, leases and results: who may run a job, and what a returned lease means.

use super::{training, JobState, LeaseRecord, LeaseStatus, RelayCore, RelayEvent, RelayJob};
use crate::envelope::Domain;
use crate::identity::NodeId;
use crate::matching::{self, Mismatch};
use crate::messages::{
    Cancel, Claim, DenyReason, JobId, JobResult, Lease, LeaseDenied, Message, Outcome, Receipt,
    Refusal, RejectReason, RoundLease, Verdict, TAKEN_HINT_MAX,
};
use crate::time::{secs, Millis};

/// Why the relay refuses a node's upload of an output for a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UploadRefusal {
    /// The relay does not know the job (or forgot it after it ended).
    #[error("unknown job {job_id}")]
    UnknownJob {
        /// The job.
        job_id: JobId,
    },
    /// The job never had the lease.
    #[error("unknown lease {lease} of job {job_id}")]
    UnknownLease {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
    },
    /// Another node holds the lease.
    #[error("lease {lease} of job {job_id} is held by another node")]
    NotHolder {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
    },
    /// The lease ended (returned, expired, cancelled): its outputs are no longer wanted.
    #[error("lease {lease} of job {job_id} is no longer active")]
    NotActive {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
    },
}

impl RelayCore {
    /// Whether `node` may upload an output of `lease` of `job_id`: only the holder of an
    /// active lease uploads, and only for that lease. The driver asks before it stores a byte.
    ///
    /// # Errors
    ///
    /// The [`UploadRefusal`] that says why not.
    pub fn may_upload(&self, node: NodeId, job_id: JobId, lease: u32) -> Result<(), UploadRefusal> {
        let job = self.jobs.get(&job_id).ok_or(UploadRefusal::UnknownJob { job_id })?;
        let record = job.leases.get(&lease).ok_or(UploadRefusal::UnknownLease { job_id, lease })?;
        if record.node != node {
            return Err(UploadRefusal::NotHolder { job_id, lease });
        }
        if record.status != LeaseStatus::Active {
            return Err(UploadRefusal::NotActive { job_id, lease });
        }
        Ok(())
    }

    pub(super) fn deny(&mut self, now: Millis, to: NodeId, job_id: JobId, reason: DenyReason) {
        // A claim for a job that is no longer open means the node holds stale offers: say
        // which other jobs were taken lately, so it does not claim each of them in turn.
        let taken = match reason {
            DenyReason::NotOpen | DenyReason::NoOpenSlot | DenyReason::UnknownJob => {
                let jobs = &self.jobs;
                let still_taken = |j: &JobId| jobs.get(j).is_none_or(|job| job.open_slots() == 0);
                self.taken.iter().copied().filter(|j| *j != job_id && still_taken(j)).collect()
            }
            _ => Vec::new(),
        };
        self.send(now, to, &Message::LeaseDenied(LeaseDenied { job_id, reason, taken }));
    }

    /// Remembers that `job_id` stopped taking claims, for the hints in denials.
    pub(super) fn note_taken(&mut self, job_id: JobId) {
        if self.taken.contains(&job_id) {
            return;
        }
        if self.taken.len() >= TAKEN_HINT_MAX {
            self.taken.pop_front();
        }
        self.taken.push_back(job_id);
    }

    pub(super) fn on_claim(&mut self, now: Millis, node: NodeId, claim: Claim) {
        let job_id = claim.job_id;
        let Some(job) = self.jobs.get(&job_id) else {
            return self.deny(now, node, job_id, DenyReason::UnknownJob);
        };
        if job.state != JobState::Open {
            return self.deny(now, node, job_id, DenyReason::NotOpen);
        }
        if job.excluded.contains(&node) {
            return self.deny(now, node, job_id, DenyReason::Excluded);
        }
        if let Some((_, profile)) = self.adverts.get(&node) {
            let why: Vec<Mismatch> = match matching::evaluate(&job.spec, profile) {
                Ok(_) => Vec::new(),
                // The node's own load is its decision; its advert may be stale.
                Err(why) => {
                    why.into_iter().filter(|m| !matches!(m, Mismatch::AtCapacity { .. })).collect()
                }
            };
            if !why.is_empty() {
                return self.deny(now, node, job_id, DenyReason::Mismatch(why));
            }
        }
        if job.training.is_some() {
            return self.on_training_claim(now, node, job_id);
        }
        if let Some(held) = job.leases.values().find(|l| l.node == node) {
            if held.status == LeaseStatus::Active {
                // The holder claims again: its lease was lost on the way (a relay restart, a
                // dropped connection). Send the same lease again rather than strand the job
                // until the lease deadline.
                let msg = Message::Lease(Lease {
                    job_id,
                    lease: held.lease,
                    node,
                    deadline_ms: held.deadline_ms,
                    spec: job.spec.clone(),
                    round: None,
                });
                return self.send(now, node, &msg);
            }
            return self.deny(now, node, job_id, DenyReason::AlreadyLeased);
        }
        if job.open_slots() == 0 {
            return self.deny(now, node, job_id, DenyReason::NoOpenSlot);
        }
        self.grant_lease(now, job_id, node, None);
    }

    pub(super) fn grant_lease(
        &mut self,
        now: Millis,
        job_id: JobId,
        node: NodeId,
        round: Option<RoundLease>,
    ) {
        let grace = self.cfg.lease_grace_ms;
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        // The holder is the node that claimed: a batch replica goes to a claimant holding no
        // other lease of the job, a training lease to a participant admitted from its claim.
        match &job.training {
            None => assert!(
                job.leases.values().all(|l| l.node != node),
                "a batch job's replicas are distinct claimants"
            ),
            Some(t) => assert!(
                t.participants.contains(&node),
                "a training lease goes to a participant that claimed the job"
            ),
        }
        let lease = job.next_lease;
        job.next_lease += 1;
        let span = match (&job.training, round) {
            (Some(t), Some(_)) => secs(t.params.round_deadline_s),
            _ => secs(job.spec.limits.timeout_s).saturating_add(grace),
        };
        let deadline_ms = now.saturating_add(span).min(job.deadline_ms);
        job.leases.insert(
            lease,
            LeaseRecord {
                lease,
                node,
                granted_at_ms: now,
                deadline_ms,
                round: round.map(|r| r.round),
                progress: 0,
                status: LeaseStatus::Active,
                paid: false,
                check: None,
            },
        );
        let seats = match &job.training {
            None => job.spec.replication as usize,
            Some(t) => t.params.participants as usize + t.params.verifications_per_round() as usize,
        };
        assert!(job.active_leases() <= seats, "more active leases than the job has seats");
        let full = job.training.is_none() && job.open_slots() == 0;
        let msg = Message::Lease(Lease {
            job_id,
            lease,
            node,
            deadline_ms,
            spec: job.spec.clone(),
            round,
        });
        self.events.push_back(RelayEvent::LeaseGranted { job_id, lease, node });
        self.send(now, node, &msg);
        if full {
            self.note_taken(job_id);
        }
    }

    pub(super) fn on_progress(&mut self, node: NodeId, p: crate::messages::Progress) {
        let (job_id, lease) = (p.job_id, p.lease);
        let Some(l) = self.jobs.get_mut(&job_id).and_then(|j| j.leases.get_mut(&lease)) else {
            let why = Refusal::UnknownLease { domain: Domain::Progress, job_id, lease };
            return self.reject(Some(node), RejectReason::Refused(why));
        };
        if l.node != node || l.status != LeaseStatus::Active {
            let why = Refusal::LeaseNotHeld { domain: Domain::Progress, job_id, lease };
            return self.reject(Some(node), RejectReason::Refused(why));
        }
        l.progress = p.percent.min(100);
        self.events.push_back(RelayEvent::Progress {
            job_id: p.job_id,
            lease: p.lease,
            percent: l.progress,
        });
    }

    pub(super) fn on_result(&mut self, now: Millis, node: NodeId, r: JobResult) {
        let (job_id, lease_no) = (r.job_id, r.lease);
        let Some(job) = self.jobs.get_mut(&job_id) else {
            let why = Refusal::UnknownJob { domain: Domain::Result, job_id };
            return self.reject(Some(node), RejectReason::Refused(why));
        };
        let Some(lease) = job.leases.get_mut(&lease_no) else {
            let why = Refusal::UnknownLease { domain: Domain::Result, job_id, lease: lease_no };
            return self.reject(Some(node), RejectReason::Refused(why));
        };
        if lease.node != node {
            let why = Refusal::LeaseNotHeld { domain: Domain::Result, job_id, lease: lease_no };
            return self.reject(Some(node), RejectReason::Refused(why));
        }
        let round = lease.round;
        if lease.status != LeaseStatus::Active {
            // A result for a lease that already has one, or that ended: a node that missed its
            // receipt (lost in transit, or cut by a relay crash) sends its result again. A
            // settled lease is answered with its verdict again; nothing changes. One whose job
            // or round has not settled yet gets its receipt when that happens.
            let asked_again = matches!(
                (&lease.status, &r.outcome),
                (LeaseStatus::Returned(held), Outcome::Succeeded { result_hash, .. })
                    if held == result_hash
            );
            let Some(verdict) = settled_verdict(job, lease_no, self.cfg.fee_bps) else {
                if asked_again {
                    return;
                }
                let why = Refusal::DuplicateResult { job_id, lease: lease_no };
                return self.reject(Some(node), RejectReason::Refused(why));
            };
            let receipt = Receipt { job_id, lease: lease_no, node, round, verdict };
            return self.send(now, node, &Message::Receipt(receipt));
        }
        if now >= lease.deadline_ms {
            lease.status = LeaseStatus::Expired;
            job.excluded.insert(node);
            self.events.push_back(RelayEvent::LeaseExpired { job_id, lease: lease_no, node });
            let reason = "result arrived after the lease deadline".to_owned();
            self.receipt(now, job_id, lease_no, node, round, Verdict::Rejected { reason });
            if round.is_some() {
                return self.after_training_result(now, job_id, node);
            }
            return self.after_slot_change(now, job_id);
        }
        self.events.push_back(RelayEvent::ResultReceived {
            job_id,
            lease: lease_no,
            node,
            outcome: r.outcome.clone(),
        });
        match r.outcome {
            Outcome::Succeeded { result_hash, outputs } => {
                lease.status = LeaseStatus::Returned(result_hash);
                lease.check = outputs
                    .iter()
                    .find(|o| round.is_some() && o.name == training::DELTA_DIGEST_FILE)
                    .map(|o| o.digest);
            }
            Outcome::Failed { reason } | Outcome::HandedBack { reason } => {
                lease.status = LeaseStatus::Failed(reason.clone());
                job.excluded.insert(node);
                let reason = format!("workload did not succeed: {reason}");
                self.receipt(now, job_id, lease_no, node, round, Verdict::Rejected { reason });
            }
        }
        if self.jobs.get(&job_id).is_some_and(|j| j.training.is_some()) {
            return self.after_training_result(now, job_id, node);
        }
        self.after_slot_change(now, job_id);
    }

    pub(super) fn expire_leases(&mut self, now: Millis, job_id: JobId) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        if job.training.is_some() {
            return self.training_timeout(now, job_id);
        }
        let mut expired = Vec::new();
        for l in job.leases.values_mut() {
            if l.status == LeaseStatus::Active && now >= l.deadline_ms {
                l.status = LeaseStatus::Expired;
                expired.push((l.lease, l.node));
            }
        }
        if expired.is_empty() {
            return;
        }
        for &(lease, node) in &expired {
            job.excluded.insert(node);
            self.events.push_back(RelayEvent::LeaseExpired { job_id, lease, node });
        }
        for (lease, node) in expired {
            let reason = "the lease deadline passed; a late result is not paid".to_owned();
            self.send(now, node, &Message::Cancel(Cancel { job_id, lease, reason }));
        }
        self.after_slot_change(now, job_id);
    }
}

/// The verdict on lease number `lease` of `job` once it is settled: paid, or why not. `None` while its result waits
/// for the job's replicas or the training round to close. A paid amount is the reward less
/// the relay's current fee, the amount the ledger was told to pay unless `fee_bps` changed
/// between the payment and this answer.
fn settled_verdict(job: &RelayJob, lease: u32, fee_bps: u16) -> Option<Verdict> {
    let lease = job.leases.get(&lease)?;
    if lease.paid {
        let (amount, _) = super::split_fee(job.spec.reward, fee_bps);
        return Some(Verdict::Paid { amount });
    }
    let reason = match &lease.status {
        LeaseStatus::Active => return None,
        LeaseStatus::Expired => "result arrived after the lease expired".to_owned(),
        LeaseStatus::Cancelled => "lease was cancelled before the result arrived".to_owned(),
        LeaseStatus::Failed(reason) => format!("not paid: {reason}"),
        LeaseStatus::Returned(_) => {
            let round_closed = match (lease.round, &job.training) {
                (Some(round), Some(t)) => round < t.round,
                _ => false,
            };
            match &job.state {
                JobState::Failed { reason } => format!("job failed: {reason}"),
                JobState::Refused { reason } => format!("job refused: {reason}"),
                _ if round_closed => "update not accepted by the aggregation".to_owned(),
                JobState::Completed { .. } if job.training.is_none() => {
                    "result disagrees with the result the replicas agreed on".to_owned()
                }
                JobState::Completed { .. } => "update not accepted by the aggregation".to_owned(),
                JobState::Reserving | JobState::Open => return None,
            }
        }
    };
    Some(Verdict::Rejected { reason })
}
