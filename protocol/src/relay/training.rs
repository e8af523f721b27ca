//! Training rounds in the relay core.
//!
//! A training job gathers participants from claims. A round starts when at least `quorum`
//! participants are present: each gets a lease on one chunk of the dataset with the current
//! model digest and the round deadline. The round closes when every lease has answered or at
//! the deadline; with `quorum` updates it goes to the driver for aggregation
//! ([`super::RelayEvent::RoundClosed`]), which answers with [`super::RelayCore::round_aggregated`]:
//! accepted updates are paid, rejected ones are not, and the next round starts from the new
//! model. Claims during a round are admitted at the next round boundary; a participant that
//! misses a deadline or fails drops out and is replaced by a joiner. Late updates are not
//! counted. A round without quorum is retried, up to `max_attempts` times in a row.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{CommandError, JobState, LeaseStatus, RelayCore, RelayEvent, RelayJob};
use crate::hash::Digest;
use crate::identity::NodeId;
use crate::job::TrainingParams;
use crate::ledger::TransferId;
use crate::messages::{Cancel, DenyReason, JobId, Message, RoundLease, Verdict};
use crate::time::{secs, Millis};

/// The SHA-256 of the uncompressed delta, in the training step's outputs: a verifying re-run
/// of the same round on another node must return a file of this name with the same digest.
/// The rest of the guest's contract (its inputs, its update) is `aimatrix-training`'s.
pub const DELTA_DIGEST_FILE: &str = "delta.sha256";

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

/// Where a round stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoundPhase {
    /// Waiting for enough participants.
    Waiting,
    /// Leases out; closes at the deadline.
    Running {
        /// Round deadline.
        deadline_ms: Millis,
    },
    /// Closed with a quorum; some updates are being re-run on other participants.
    Verifying {
        /// The re-runs' deadline.
        deadline_ms: Millis,
    },
    /// Closed with a quorum; waiting for the driver's aggregation.
    Aggregating,
    /// The job ended.
    Done,
}

/// Where a training job's data is, by digest (in the relay's content store).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingData {
    /// One chunk per participant seat; seat `i` of a round trains on `chunks[i]`.
    pub chunks: Vec<Digest>,
    /// The evaluation set.
    pub holdout: Digest,
}

/// One aggregated round, as recorded with the job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round.
    pub round: u32,
    /// Updates returned in time.
    pub received: u32,
    /// Updates aggregated (and paid).
    pub accepted: u32,
    /// Updates refused, with the reason.
    pub rejected: Vec<(NodeId, String)>,
    /// Digest of the model the round produced.
    pub model: Digest,
    /// Evaluation and bytes.
    pub metrics: RoundMetrics,
    /// When it was aggregated.
    pub at_ms: Millis,
}

/// A training job's round state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// The job's training parameters.
    pub params: TrainingParams,
    /// The job's chunks and evaluation set.
    pub data: TrainingData,
    /// Every aggregated round, oldest first.
    pub history: Vec<RoundRecord>,
    /// Current round, from 0.
    pub round: u32,
    /// Digest of the model the current round starts from.
    pub model: Digest,
    /// Phase of the current round.
    pub phase: RoundPhase,
    /// Current participants.
    pub participants: BTreeSet<NodeId>,
    /// Claimants waiting for the next round boundary.
    pub joiners: BTreeSet<NodeId>,
    /// Leases of the current round.
    pub round_leases: Vec<u32>,
    /// Rounds in a row that closed without quorum.
    pub failed_rounds: u32,
    /// Since when a quorum (but not every wanted participant) has been waiting.
    pub quorum_since_ms: Option<Millis>,
    /// The current round's verifying re-runs.
    pub verifying: Vec<VerifyTask>,
    /// Updates of the current round whose re-run disagreed (not paid, not aggregated).
    pub voided: Vec<(NodeId, String)>,
}

/// A verifying re-run: `lease` (held by another participant) re-runs the update returned
/// under `target_lease`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyTask {
    /// The participant whose update is checked.
    pub target: NodeId,
    /// Its lease.
    pub target_lease: u32,
    /// The re-run's lease.
    pub lease: u32,
}

impl TrainingState {
    pub(super) fn new(params: TrainingParams, data: TrainingData) -> Self {
        let model = params.model.digest().unwrap_or(Digest([0; 32]));
        Self {
            params,
            data,
            history: Vec::new(),
            round: 0,
            model,
            phase: RoundPhase::Waiting,
            participants: BTreeSet::new(),
            joiners: BTreeSet::new(),
            round_leases: Vec::new(),
            failed_rounds: 0,
            quorum_since_ms: None,
            verifying: Vec::new(),
            voided: Vec::new(),
        }
    }

    /// Seats still free for joiners.
    pub fn open_slots(&self) -> u32 {
        if self.phase == RoundPhase::Done {
            return 0;
        }
        let taken = (self.participants.len() + self.joiners.len()) as u32;
        self.params.participants.saturating_sub(taken)
    }

    /// The running round's deadline, or when a waiting quorum stops waiting for more.
    pub fn next_deadline(&self, start_wait_ms: u64) -> Option<Millis> {
        match self.phase {
            RoundPhase::Running { deadline_ms } | RoundPhase::Verifying { deadline_ms } => {
                Some(deadline_ms)
            }
            RoundPhase::Waiting => self.quorum_since_ms.map(|t| t.saturating_add(start_wait_ms)),
            _ => None,
        }
    }

    fn round_deadline(&self) -> Option<Millis> {
        match self.phase {
            RoundPhase::Running { deadline_ms } => Some(deadline_ms),
            _ => None,
        }
    }

    pub(super) fn finish(&mut self) {
        self.phase = RoundPhase::Done;
    }
}

/// The chunk seat `seat` of a round with `present` participants trains on. With every seat
/// taken, seat `i` always trains on chunk `i`; with fewer participants than chunks the
/// assignment shifts by `present` each round, so no chunk is left out of training for good.
fn round_chunk(seat: usize, round: u32, present: usize, chunks: usize) -> usize {
    if chunks == 0 {
        return 0;
    }
    (seat + round as usize * present) % chunks
}

/// The driver's verdict on a closed round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundVerdict {
    /// Participants whose updates went into the aggregate (paid).
    pub accepted: Vec<NodeId>,
    /// Participants whose updates were refused, with the reason (not paid, dropped).
    pub rejected: Vec<(NodeId, String)>,
    /// Digest of the aggregated model the next round starts from.
    pub new_model: Digest,
    /// The new model's evaluation and the bytes received.
    pub metrics: RoundMetrics,
}

impl RelayCore {
    pub(super) fn on_training_claim(&mut self, now: Millis, node: NodeId, job_id: JobId) {
        let Some(t) = self.jobs.get_mut(&job_id).and_then(|j| j.training.as_mut()) else { return };
        if t.participants.contains(&node) || t.joiners.contains(&node) {
            return; // a repeated claim; the lease comes at the next round start
        }
        if t.open_slots() == 0 {
            return self.deny(now, node, job_id, DenyReason::NoOpenSlot);
        }
        t.joiners.insert(node);
        if t.phase == RoundPhase::Waiting {
            self.try_start_round(now, job_id, false);
        }
    }

    /// Admits joiners and leases the round's chunks once every wanted participant is present,
    /// or once a quorum has waited `round_start_wait_ms` for the rest.
    ///
    /// `seats_opened` says that a round boundary just freed seats: the offer is then announced
    /// at once and targeted afresh; otherwise it keeps its announcement schedule (so its list
    /// of preferred claimants widens as usual while the round waits).
    fn try_start_round(&mut self, now: Millis, job_id: JobId, seats_opened: bool) {
        let start_wait_ms = self.cfg.round_start_wait_ms;
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let Some(t) = job.training.as_mut() else { return };
        if job.state != JobState::Open || t.phase != RoundPhase::Waiting {
            return;
        }
        while t.participants.len() < t.params.participants as usize {
            let Some(next) = t.joiners.pop_first() else { break };
            t.participants.insert(next);
        }
        if t.participants.len() < t.params.quorum as usize {
            t.quorum_since_ms = None;
            return self.announce_waiting(now, job_id, seats_opened);
        }
        if t.participants.len() < t.params.participants as usize {
            let since = *t.quorum_since_ms.get_or_insert(now);
            if now < since.saturating_add(start_wait_ms) {
                return self.announce_waiting(now, job_id, seats_opened);
            }
        }
        t.quorum_since_ms = None;
        let deadline_ms = now.saturating_add(secs(t.params.round_deadline_s)).min(job.deadline_ms);
        t.phase = RoundPhase::Running { deadline_ms };
        t.round_leases.clear();
        let chunks = t.params.participants;
        let (round, model) = (t.round, t.model);
        let participants: Vec<NodeId> = t.participants.iter().copied().collect();
        self.events.push_back(RelayEvent::RoundStarted {
            job_id,
            round,
            participants: participants.clone(),
        });
        let chunk_data = t.data.chunks.clone();
        let present = participants.len();
        for (seat, node) in participants.into_iter().enumerate() {
            let lease_no = self.jobs.get(&job_id).map_or(0, |j| j.next_lease);
            let chunk = round_chunk(seat, round, present, chunk_data.len());
            let Some(&data) = chunk_data.get(chunk) else { break }; // checked at post and restore
            let assignment =
                RoundLease { round, model, chunk: chunk as u32, chunks, data, verify: false };
            self.grant_lease(now, job_id, node, Some(assignment));
            if let Some(t) = self.jobs.get_mut(&job_id).and_then(|j| j.training.as_mut()) {
                t.round_leases.push(lease_no);
            }
        }
    }

    pub(super) fn after_training_result(&mut self, now: Millis, job_id: JobId, node: NodeId) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let Some(t) = job.training.as_mut() else { return };
        let mut all_answered = true;
        for lease_no in &t.round_leases {
            match job.leases.get(lease_no).map(|l| &l.status) {
                Some(LeaseStatus::Failed(_) | LeaseStatus::Expired)
                    if job.leases[lease_no].node == node =>
                {
                    t.participants.remove(&node);
                }
                Some(LeaseStatus::Active) => all_answered = false,
                _ => {}
            }
        }
        let verified = t
            .verifying
            .iter()
            .all(|v| job.leases.get(&v.lease).is_none_or(|l| l.status != LeaseStatus::Active));
        match t.phase {
            RoundPhase::Running { .. } if all_answered => self.close_round(now, job_id),
            RoundPhase::Verifying { .. } if verified => self.finish_verification(now, job_id),
            _ => {}
        }
    }

    /// A round waits for participants: announce now with fresh targeting when seats just
    /// opened, or else only when the offer's own schedule says so.
    fn announce_waiting(&mut self, now: Millis, job_id: JobId, seats_opened: bool) {
        if seats_opened {
            self.announce_due(now, job_id);
        } else {
            self.announce(now);
        }
    }

    pub(super) fn training_timeout(&mut self, now: Millis, job_id: JobId) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let Some(t) = job.training.as_mut() else { return };
        if t.phase == RoundPhase::Waiting {
            return self.try_start_round(now, job_id, false);
        }
        if let RoundPhase::Verifying { deadline_ms } = t.phase {
            if now < deadline_ms {
                return;
            }
            let mut expired = Vec::new();
            for v in &t.verifying {
                if let Some(l) = job.leases.get_mut(&v.lease) {
                    if l.status == LeaseStatus::Active {
                        l.status = LeaseStatus::Expired;
                        expired.push((l.lease, l.node));
                    }
                }
            }
            for (lease, node) in expired {
                self.events.push_back(RelayEvent::LeaseExpired { job_id, lease, node });
                let reason = "the re-run's deadline passed; it is not counted".to_owned();
                self.send(now, node, &Message::Cancel(Cancel { job_id, lease, reason }));
            }
            return self.finish_verification(now, job_id);
        }
        let Some(deadline) = t.round_deadline() else { return };
        if now < deadline {
            return;
        }
        let mut expired = Vec::new();
        for lease_no in &t.round_leases {
            if let Some(l) = job.leases.get_mut(lease_no) {
                if l.status == LeaseStatus::Active {
                    l.status = LeaseStatus::Expired;
                    t.participants.remove(&l.node);
                    job.excluded.insert(l.node);
                    expired.push((l.lease, l.node));
                }
            }
        }
        for (lease, node) in expired {
            self.events.push_back(RelayEvent::LeaseExpired { job_id, lease, node });
            let reason = "the round deadline passed; a late update is not counted".to_owned();
            self.send(now, node, &Message::Cancel(Cancel { job_id, lease, reason }));
        }
        self.close_round(now, job_id);
    }

    /// The updates returned in the current round: node, lease, update digest.
    fn round_updates(job: &RelayJob) -> Vec<(NodeId, u32, Digest)> {
        let Some(t) = &job.training else { return Vec::new() };
        t.round_leases
            .iter()
            .filter_map(|n| job.leases.get(n))
            .filter_map(|l| match l.status {
                LeaseStatus::Returned(h) => Some((l.node, l.lease, h)),
                _ => None,
            })
            .collect()
    }

    /// A restored job waiting for aggregation asks the driver again: the `RoundClosed` it
    /// emitted before the restart may never have been handled.
    pub(super) fn reemit_round_closed(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else { return };
        let Some(t) = &job.training else { return };
        if job.state != JobState::Open || t.phase != RoundPhase::Aggregating {
            return;
        }
        let (round, model) = (t.round, t.model);
        let updates = Self::round_updates(job);
        self.events.push_back(RelayEvent::RoundClosed { job_id, round, model, updates });
    }

    /// Closes the running round: with a quorum, to verification (when the job re-runs a share
    /// of its updates) and then aggregation; otherwise retried or failed.
    fn close_round(&mut self, now: Millis, job_id: JobId) {
        if self.start_verification(now, job_id) {
            return;
        }
        self.begin_aggregation(now, job_id);
    }

    /// Picks `ceil(verify_share × updates)` of the round's updates (by a digest of job, round
    /// and sender, so the choice cannot be steered and replays the same) and leases each to
    /// the next participant that returned one, as a re-run. False when nothing is re-run.
    fn start_verification(&mut self, now: Millis, job_id: JobId) -> bool {
        let Some(job) = self.jobs.get(&job_id) else { return false };
        let Some(t) = job.training.as_ref() else { return false };
        let updates = Self::round_updates(job);
        if updates.len() < t.params.quorum as usize
            || updates.len() < 2
            || t.params.verify_share <= 0.0
        {
            return false;
        }
        let count = ((t.params.verify_share * updates.len() as f64).ceil() as usize)
            .min(t.params.verifications_per_round() as usize);
        let round = t.round;
        let mut chosen: Vec<&(NodeId, u32, Digest)> = updates.iter().collect();
        chosen.sort_by_key(|(node, _, _)| {
            Digest::of_parts(&[&job_id.0, &round.to_le_bytes(), node.as_bytes()])
        });
        chosen.truncate(count);
        // Who re-runs what: the next sender in the round's order, never the sender itself.
        let mut work = Vec::new();
        for (node, lease, _) in chosen {
            let at = updates.iter().position(|(n, _, _)| n == node).unwrap_or(0);
            let (verifier, _, _) = updates[(at + 1) % updates.len()];
            let seat = t.round_leases.iter().position(|l| l == lease).unwrap_or(0);
            let chunk = round_chunk(seat, round, t.round_leases.len(), t.data.chunks.len());
            let Some(&data) = t.data.chunks.get(chunk) else { continue };
            let assignment = RoundLease {
                round,
                model: t.model,
                chunk: chunk as u32,
                chunks: t.params.participants,
                data,
                verify: true,
            };
            work.push((*node, *lease, verifier, assignment));
        }
        let deadline_ms = now.saturating_add(secs(t.params.round_deadline_s)).min(job.deadline_ms);
        let mut tasks = Vec::with_capacity(work.len());
        for (target, target_lease, verifier, assignment) in work {
            let lease = self.jobs.get(&job_id).map_or(0, |j| j.next_lease);
            self.grant_lease(now, job_id, verifier, Some(assignment));
            tasks.push(VerifyTask { target, target_lease, lease });
        }
        let Some(t) = self.jobs.get_mut(&job_id).and_then(|j| j.training.as_mut()) else {
            return false;
        };
        if tasks.is_empty() {
            return false;
        }
        t.verifying = tasks;
        t.phase = RoundPhase::Verifying { deadline_ms };
        true
    }

    /// Settles the round's re-runs: a re-run that returned is paid; where its delta digest
    /// differs from the original's, the original update is voided (not paid, not aggregated)
    /// and its sender dropped. An update whose re-run did not come back stays. Then the round
    /// goes to aggregation.
    fn finish_verification(&mut self, now: Millis, job_id: JobId) {
        let fee_bps = self.cfg.fee_bps;
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let reward = job.spec.reward;
        let Some(t) = job.training.as_mut() else { return };
        let round = t.round;
        let mut receipts = Vec::new();
        for v in std::mem::take(&mut t.verifying) {
            let (Some(rerun), Some(original)) =
                (job.leases.get(&v.lease), job.leases.get(&v.target_lease))
            else {
                continue;
            };
            if !matches!(rerun.status, LeaseStatus::Returned(_)) {
                if rerun.status == LeaseStatus::Expired {
                    let reason = "the re-run was not returned before its deadline".to_owned();
                    receipts.push((v.lease, rerun.node, Verdict::Rejected { reason }));
                }
                continue;
            }
            let verifier = rerun.node;
            let agrees = rerun.check.is_some() && rerun.check == original.check;
            let parts: [&[u8]; 3] =
                [verifier.as_bytes(), &round.to_le_bytes(), &v.lease.to_le_bytes()];
            let id = TransferId::derive(job_id, "verify", &parts);
            let (op, amount, spent) = super::pay_op(job_id, verifier, id, reward, fee_bps);
            self.events.push_back(RelayEvent::Ledger(op));
            job.paid += spent;
            if let Some(l) = job.leases.get_mut(&v.lease) {
                l.paid = true;
            }
            receipts.push((v.lease, verifier, Verdict::Paid { amount }));
            if !agrees {
                let why = format!(
                    "a re-run of round {round} on {} gave a different delta; the update is void",
                    verifier.to_peer_id()
                );
                if let Some(l) = job.leases.get_mut(&v.target_lease) {
                    l.status = LeaseStatus::Failed(why.clone());
                }
                t.participants.remove(&v.target);
                job.excluded.insert(v.target);
                t.voided.push((v.target, why.clone()));
                receipts.push((v.target_lease, v.target, Verdict::Rejected { reason: why }));
            }
        }
        assert!(job.paid <= job.escrow, "training paid more than its escrow");
        for (lease, node, verdict) in receipts {
            self.receipt(now, job_id, lease, node, Some(round), verdict);
        }
        self.begin_aggregation(now, job_id);
    }

    /// Hands the round's updates to the driver with a quorum; otherwise retries or fails it.
    fn begin_aggregation(&mut self, now: Millis, job_id: JobId) {
        let max_attempts = self.jobs.get(&job_id).map_or(1, |j| j.spec.max_attempts);
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let updates = Self::round_updates(job);
        let Some(t) = job.training.as_mut() else { return };
        let round = t.round;
        if updates.len() >= t.params.quorum as usize {
            t.phase = RoundPhase::Aggregating;
            let model = t.model;
            self.events.push_back(RelayEvent::RoundClosed { job_id, round, model, updates });
            return;
        }
        t.failed_rounds += 1;
        t.phase = RoundPhase::Waiting;
        t.voided.clear(); // already receipted
        let reason = format!(
            "round {round} closed with {} of the {} updates its quorum needs",
            updates.len(),
            t.params.quorum
        );
        let give_up = t.failed_rounds >= max_attempts;
        self.events.push_back(RelayEvent::RoundFailed { job_id, round, reason: reason.clone() });
        for (node, lease, _) in updates {
            // Settled now: not counted, and never receipted again.
            if let Some(l) = self.jobs.get_mut(&job_id).and_then(|j| j.leases.get_mut(&lease)) {
                l.status = LeaseStatus::Failed(reason.clone());
            }
            let verdict = Verdict::Rejected { reason: reason.clone() };
            self.receipt(now, job_id, lease, node, Some(round), verdict);
        }
        if give_up {
            let why =
                format!("{max_attempts} rounds in a row closed without quorum; last: {reason}");
            return self.fail_job(now, job_id, why);
        }
        self.try_start_round(now, job_id, true);
    }

    /// The driver aggregated a closed round: pay the accepted updates, reject the others, and
    /// start the next round from `verdict.new_model` (or complete the job after the last).
    pub fn round_aggregated(
        &mut self,
        now: Millis,
        job_id: JobId,
        round: u32,
        verdict: RoundVerdict,
    ) -> Result<(), CommandError> {
        let fee_bps = self.cfg.fee_bps;
        let job = self.jobs.get_mut(&job_id).ok_or(CommandError::UnknownJob(job_id))?;
        let reward = job.spec.reward;
        let Some(t) = job.training.as_mut() else {
            return Err(CommandError::Invalid(format!("job {job_id} is not a training job")));
        };
        if t.phase != RoundPhase::Aggregating || t.round != round {
            return Err(CommandError::Invalid(format!(
                "job {job_id} is not aggregating round {round} (round {}, {:?})",
                t.round, t.phase
            )));
        }
        let returned: Vec<(NodeId, u32)> = t
            .round_leases
            .iter()
            .filter_map(|n| job.leases.get(n))
            .filter(|l| matches!(l.status, LeaseStatus::Returned(_)))
            .map(|l| (l.node, l.lease))
            .collect();
        let lease_of = |node: &NodeId| returned.iter().find(|(n, _)| n == node).map(|(_, l)| *l);
        for node in verdict.accepted.iter().chain(verdict.rejected.iter().map(|(n, _)| n)) {
            if lease_of(node).is_none() {
                return Err(CommandError::Invalid(format!(
                    "node {node} has no update in round {round} of job {job_id}"
                )));
            }
        }
        let mut receipts = Vec::new();
        for (node, lease) in &returned {
            if verdict.accepted.contains(node) {
                let id =
                    TransferId::derive(job_id, "pay", &[node.as_bytes(), &round.to_le_bytes()]);
                let (op, amount, spent) = super::pay_op(job_id, *node, id, reward, fee_bps);
                self.events.push_back(RelayEvent::Ledger(op));
                job.paid += spent;
                if let Some(l) = job.leases.get_mut(lease) {
                    l.paid = true;
                }
                receipts.push((*lease, *node, Verdict::Paid { amount }));
            } else {
                let reason = verdict
                    .rejected
                    .iter()
                    .find(|(n, _)| n == node)
                    .map_or("update not accepted by the aggregation".to_owned(), |(_, r)| {
                        r.clone()
                    });
                t.participants.remove(node);
                job.excluded.insert(*node);
                receipts.push((*lease, *node, Verdict::Rejected { reason }));
            }
        }
        assert!(job.paid <= job.escrow, "training paid more than its escrow");
        let mut rejected = std::mem::take(&mut t.voided);
        rejected.extend(verdict.rejected.iter().cloned());
        t.history.push(RoundRecord {
            round,
            received: (returned.len() + rejected.len() - verdict.rejected.len()) as u32,
            accepted: verdict.accepted.len() as u32,
            rejected,
            model: verdict.new_model,
            metrics: verdict.metrics,
            at_ms: now,
        });
        t.round += 1;
        t.model = verdict.new_model;
        t.failed_rounds = 0;
        let finished = t.round >= t.params.rounds;
        t.phase = if finished { RoundPhase::Done } else { RoundPhase::Waiting };
        if finished {
            job.state = JobState::Completed { result_hash: verdict.new_model };
        }
        for (lease, node, v) in receipts {
            self.receipt(now, job_id, lease, node, Some(round), v);
        }
        if finished {
            self.release_rest(job_id);
            self.events
                .push_back(RelayEvent::JobCompleted { job_id, result_hash: verdict.new_model });
        } else {
            self.try_start_round(now, job_id, true);
        }
        Ok(())
    }
}
