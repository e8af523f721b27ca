//! Settlement: replicas that agree are paid, the rest of the escrow goes back, a job ends once.

use std::collections::BTreeMap;

use super::{JobState, LeaseStatus, RelayCore, RelayEvent};
use crate::hash::Digest;
use crate::identity::NodeId;
use crate::ledger::{LedgerOp, TransferId};
use crate::messages::{Cancel, JobId, Message, Receipt, Verdict};
use crate::time::Millis;

/// The ledger instruction paying `node` one `reward` from `job_id`'s escrow under transfer
/// `id`: the amount the node gets, and what leaves the escrow (amount and relay fee).
pub(super) fn pay_op(
    job_id: JobId,
    node: NodeId,
    id: TransferId,
    reward: u64,
    fee_bps: u16,
) -> (LedgerOp, u64, u64) {
    let (amount, fee) = split_fee(reward, fee_bps);
    let reserve_id = TransferId::reserve_of(job_id);
    (LedgerOp::Pay { id, reserve_id, job_id, node, amount, fee }, amount, amount + fee)
}

/// Splits a reward into the node's amount and the relay fee.
pub fn split_fee(reward: u64, fee_bps: u16) -> (u64, u64) {
    let fee = (u128::from(reward) * u128::from(fee_bps.min(10_000)) / 10_000) as u64;
    (reward - fee, fee)
}

impl RelayCore {
    /// Settles the job if enough replicas agree, fails it if it cannot finish, or re-offers.
    pub(super) fn after_slot_change(&mut self, now: Millis, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else { return };
        if job.state != JobState::Open || job.training.is_some() {
            return;
        }
        let replication = job.spec.replication as usize;
        let mut groups: BTreeMap<Digest, Vec<u32>> = BTreeMap::new();
        for l in job.leases.values() {
            if let LeaseStatus::Returned(h) = l.status {
                groups.entry(h).or_default().push(l.lease);
            }
        }
        if let Some((hash, members)) = groups.into_iter().find(|(_, m)| m.len() >= replication) {
            return self.complete_job(now, job_id, hash, &members[..replication]);
        }
        let remaining = job.lease_budget().saturating_sub(u64::from(job.next_lease));
        if remaining == 0 && job.active_leases() == 0 {
            let reason = if job.best_agreement() == 0 {
                format!("all {} attempts failed or expired", job.next_lease)
            } else {
                format!("replicas did not agree on a result after {} leases", job.next_lease)
            };
            return self.fail_job(now, job_id, reason);
        }
        self.announce_due(now, job_id);
    }

    pub(super) fn complete_job(
        &mut self,
        now: Millis,
        job_id: JobId,
        hash: Digest,
        winners: &[u32],
    ) {
        self.note_taken(job_id);
        let fee_bps = self.cfg.fee_bps;
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let mut receipts = Vec::new();
        let mut cancels = Vec::new();
        let mut ops = Vec::new();
        for l in job.leases.values_mut() {
            match &l.status {
                LeaseStatus::Returned(h) if winners.contains(&l.lease) => {
                    assert_eq!(*h, hash);
                    let id = TransferId::derive(job_id, "pay", &[l.node.as_bytes()]);
                    let (op, amount, spent) = pay_op(job_id, l.node, id, job.spec.reward, fee_bps);
                    ops.push(op);
                    job.paid += spent;
                    l.paid = true;
                    receipts.push((l.lease, l.node, Verdict::Paid { amount }));
                }
                LeaseStatus::Returned(_) => {
                    let reason =
                        "result disagrees with the result the replicas agreed on".to_owned();
                    receipts.push((l.lease, l.node, Verdict::Rejected { reason }));
                }
                LeaseStatus::Active => {
                    l.status = LeaseStatus::Cancelled;
                    cancels.push((l.lease, l.node));
                }
                _ => {}
            }
        }
        assert!(job.paid <= job.escrow, "paid more than the escrow");
        job.state = JobState::Completed { result_hash: hash };
        self.events.extend(ops.into_iter().map(RelayEvent::Ledger));
        for (lease, node, verdict) in receipts {
            self.receipt(now, job_id, lease, node, None, verdict);
        }
        for (lease, node) in cancels {
            let reason = "the job completed without this replica".to_owned();
            self.send(now, node, &Message::Cancel(Cancel { job_id, lease, reason }));
        }
        self.release_rest(job_id);
        self.events.push_back(RelayEvent::JobCompleted { job_id, result_hash: hash });
    }

    /// Ends an open job without a result: cancels active leases, rejects unpaid results,
    /// releases what was not paid.
    pub(super) fn fail_job(&mut self, now: Millis, job_id: JobId, reason: String) {
        self.note_taken(job_id);
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        assert_eq!(job.state, JobState::Open);
        let current_round = job.training.as_ref().map(|t| t.round);
        let mut cancels = Vec::new();
        let mut receipts = Vec::new();
        for l in job.leases.values_mut() {
            match l.status {
                LeaseStatus::Active => {
                    l.status = LeaseStatus::Cancelled;
                    cancels.push((l.lease, l.node));
                }
                // Results not settled yet (for training: updates of the unfinished round) get a
                // receipt saying why they will not be paid.
                LeaseStatus::Returned(_)
                    if !l.paid && l.round.is_none_or(|r| Some(r) == current_round) =>
                {
                    receipts.push((l.lease, l.node, l.round));
                }
                _ => {}
            }
        }
        job.state = JobState::Failed { reason: reason.clone() };
        if let Some(t) = job.training.as_mut() {
            t.finish();
        }
        for (lease, node) in cancels {
            self.send(
                now,
                node,
                &Message::Cancel(Cancel { job_id, lease, reason: reason.clone() }),
            );
        }
        for (lease, node, round) in receipts {
            let reason = format!("job failed: {reason}");
            self.receipt(now, job_id, lease, node, round, Verdict::Rejected { reason });
        }
        self.release_rest(job_id);
        self.events.push_back(RelayEvent::JobFailed { job_id, reason });
    }

    pub(super) fn release_rest(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        assert!(job.state.is_final(), "the rest of an escrow is released only when its job ends");
        assert_eq!(job.refunded, 0, "a job's escrow is released once");
        let amount = job.escrow.checked_sub(job.paid);
        let amount = amount.unwrap_or_else(|| panic!("job {job_id} paid more than its escrow"));
        job.refunded = amount;
        assert_eq!(job.paid + job.refunded, job.escrow, "paid + refunded = escrow at the end");
        self.events.push_back(RelayEvent::Ledger(LedgerOp::release(job_id, amount)));
    }

    pub(super) fn receipt(
        &mut self,
        now: Millis,
        job_id: JobId,
        lease: u32,
        node: NodeId,
        round: Option<u32>,
        verdict: Verdict,
    ) {
        let receipt = Receipt { job_id, lease, node, round, verdict };
        self.send(now, node, &Message::Receipt(receipt.clone()));
        self.events.push_back(RelayEvent::Receipted(receipt));
    }
}
