//! What the cores ask of the driver: simulated execution of leases, the ledger, training
//! aggregation, job endings and job arrivals.

use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::job::{
    Aggregation, Compression, ContentRef, JobKind, JobSpec, TrainingParams,
};
use aimatrix_protocol::ledger::LedgerOp;
use aimatrix_protocol::messages::{JobId, Outcome, OutputDigest};
use aimatrix_protocol::node::NodeEvent;
use aimatrix_protocol::relay::training::RoundVerdict;
use aimatrix_protocol::relay::RelayEvent;
use aimatrix_protocol::testkit;
use rand::RngExt;

use super::{exponential, pick, requester, Behaviour, Endpoint, Event, PostedJob, Sim};
use crate::invariants::{self, Invariant};
use crate::scenario::JobClass;

impl Sim {
    pub(super) fn on_node_event(&mut self, i: u32, e: NodeEvent) {
        match e {
            NodeEvent::Claimed { .. } => self.summary.activity.claims += 1,
            NodeEvent::ClaimDenied { .. } => self.summary.activity.claims_denied += 1,
            NodeEvent::RunJob { lease, .. } => self.start_run(i, &lease),
            NodeEvent::Rejected { reason, .. } => {
                self.rejections += 1;
                *self.summary.rejected.entry(format!("node/{}", reason.label())).or_default() += 1;
            }
            // The simulated network has one relay, which publishes no roster.
            NodeEvent::OfferSeen { .. }
            | NodeEvent::CancelJob { .. }
            | NodeEvent::ReceiptReceived { .. }
            | NodeEvent::RelaysChanged { .. } => {}
        }
    }

    /// Simulates the sandbox: a duration by job and node class, and an outcome by behaviour.
    fn start_run(&mut self, i: u32, lease: &aimatrix_protocol::messages::Lease) {
        let node = &self.nodes[i as usize];
        if node.behaviour == Behaviour::Withholding {
            return;
        }
        let Some(posted) = self.jobs.get(&lease.job_id) else { return };
        let class = &self.sc.workload.classes[posted.class];
        let hw = &self.sc.hardware[node.class];
        let (behaviour, incarnation, slowness, failure_rate) =
            (node.behaviour, node.incarnation, hw.slowness, hw.failure_rate);
        let nominal_ms = class.duration_s as f64 * 1000.0 * slowness;
        let ms = (nominal_ms * self.rng.random_range(0.5..1.5)) as u64;
        // Liars do not collude: each one's wrong output is its own.
        let liar = (behaviour == Behaviour::Byzantine).then_some(i);
        let honest = match lease.round {
            Some(r) => {
                let out = update_outcome(lease.job_id, r.round, r.chunk, None);
                if let Outcome::Succeeded { result_hash, .. } = &out {
                    self.expected_updates.insert((lease.job_id, lease.lease), *result_hash);
                }
                update_outcome(lease.job_id, r.round, r.chunk, liar)
            }
            None => batch_outcome(lease.job_id, liar),
        };
        let outcome = if self.rng.random_bool(failure_rate) {
            Outcome::Failed { reason: "simulated exit code 1".into() }
        } else {
            honest
        };
        let event = Event::Finish {
            node: i,
            incarnation,
            job: lease.job_id,
            lease: lease.lease,
            outcome: Box::new(outcome),
        };
        self.queue.push(self.now + ms.max(1), event);
    }

    pub(super) fn on_relay_event(&mut self, r: u32, e: RelayEvent) {
        let now = self.now;
        match e {
            RelayEvent::Ledger(op) => self.apply_ledger(r, &op),
            RelayEvent::LeaseGranted { job_id, .. } => {
                self.summary.activity.leases_granted += 1;
                if let Some(p) = self.jobs.get_mut(&job_id) {
                    if p.first_lease_at.is_none() {
                        p.first_lease_at = Some(now);
                        self.assign_ms.push(now - p.posted_at);
                    }
                }
                if let Some(job) = self.relays[r as usize].core.job(&job_id) {
                    if let Err(why) = invariants::check_leases(job) {
                        self.fail(Invariant::LeasesWithinReplication, why);
                    }
                }
            }
            RelayEvent::LeaseExpired { .. } => self.summary.activity.leases_expired += 1,
            RelayEvent::ResultReceived { .. } => self.summary.activity.results += 1,
            RelayEvent::RoundClosed { job_id, round, model, updates } => {
                self.aggregate(r, job_id, round, model, &updates)
            }
            RelayEvent::RoundFailed { .. } => self.summary.activity.rounds_failed += 1,
            RelayEvent::JobCompleted { job_id, .. } => self.job_ended(job_id, End::Completed),
            RelayEvent::JobFailed { job_id, .. } => self.job_ended(job_id, End::Failed),
            RelayEvent::JobRefused { job_id, .. } => self.job_ended(job_id, End::Refused),
            RelayEvent::Rejected { reason, .. } => {
                self.rejections += 1;
                *self.summary.rejected.entry(format!("relay/{}", reason.label())).or_default() += 1;
            }
            RelayEvent::JobOpen { .. }
            | RelayEvent::Progress { .. }
            | RelayEvent::Receipted(_)
            | RelayEvent::RoundStarted { .. } => {}
        }
    }

    fn apply_ledger(&mut self, r: u32, op: &LedgerOp) {
        let now = self.now;
        let result = self.ledger.apply_instruction(op);
        match op {
            LedgerOp::Reserve { job_id, .. } => {
                let relay = &mut self.relays[r as usize].core;
                let answer = match result {
                    Ok(_) => relay.reserve_confirmed(now, *job_id),
                    Err(e) => relay.reserve_failed(now, *job_id, e.to_string()),
                };
                if let Err(e) = answer {
                    self.fail(
                        Invariant::DriverConsistent,
                        format!("confirming a reservation: {e}"),
                    );
                }
            }
            LedgerOp::Pay { job_id, node, amount, fee, .. } => {
                if let Err(e) = result {
                    return self.fail(
                        Invariant::CreditsConserved,
                        format!("the ledger refused a payment: {e}"),
                    );
                }
                self.summary.credits.paid_to_nodes += amount;
                self.summary.credits.fees += fee;
                if let Some(Endpoint::Node(i)) = self.ids.get(node) {
                    if self.nodes[*i as usize].behaviour == Behaviour::Byzantine {
                        self.summary.credits.paid_to_byzantine += amount;
                    }
                }
                let Some(job) = self.relays[r as usize].core.job(job_id) else { return };
                let verified = if job.training.is_some() {
                    match self.last_accepted.get(job_id) {
                        Some(accepted) if accepted.contains(node) => Ok(()),
                        _ => {
                            Err(format!("job {job_id} paid {node}, whose update was not accepted"))
                        }
                    }
                } else {
                    invariants::check_batch_payment(job, op)
                };
                if let Err(why) = verified {
                    self.fail(Invariant::PaidIsVerified, why);
                }
            }
            LedgerOp::Release { amount, .. } => {
                if let Err(e) = result {
                    return self.fail(
                        Invariant::CreditsConserved,
                        format!("the ledger refused a release: {e}"),
                    );
                }
                self.summary.credits.refunded += amount;
            }
        }
        if let Err(why) =
            invariants::check_conserved(&self.ledger, self.accounts.iter(), self.minted)
        {
            self.fail(Invariant::CreditsConserved, why);
        }
    }

    /// Training: the robust aggregation is modelled as accepting exactly the honest updates.
    fn aggregate(
        &mut self,
        r: u32,
        job_id: JobId,
        round: u32,
        model: Digest,
        updates: &[(NodeId, u32, Digest)],
    ) {
        let mut accepted = Vec::new();
        let mut rejected = Vec::new();
        for (node, lease, digest) in updates {
            if self.expected_updates.remove(&(job_id, *lease)) == Some(*digest) {
                accepted.push(*node);
            } else {
                rejected.push((*node, "update is an outlier".to_owned()));
            }
        }
        self.last_accepted.insert(job_id, accepted.clone());
        let new_model = Digest::of_parts(&[&model.0, &round.to_le_bytes()]);
        let verdict = RoundVerdict { accepted, rejected, new_model, metrics: Default::default() };
        let now = self.now;
        if let Err(e) = self.relays[r as usize].core.round_aggregated(now, job_id, round, verdict) {
            return self.fail(Invariant::DriverConsistent, format!("aggregating a round: {e}"));
        }
        self.summary.activity.rounds_aggregated += 1;
    }

    fn job_ended(&mut self, job_id: JobId, end: End) {
        let now = self.now;
        let ended = self.jobs.get_mut(&job_id).map(|p| &mut p.ended);
        if let Err(why) = invariants::check_end(&job_id, ended) {
            return self.fail(Invariant::EndsOnce, format!("{why} ({end:?})"));
        }
        let since_post = now - self.jobs[&job_id].posted_at;
        let j = &mut self.summary.jobs;
        match end {
            End::Completed => {
                j.completed += 1;
                self.complete_ms.push(since_post);
            }
            End::Failed => j.failed += 1,
            End::Refused => j.refused += 1,
        }
    }

    pub(super) fn schedule_next_post(&mut self) {
        let rate = self.sc.workload.arrivals_per_s;
        if rate > 0.0 {
            let gap_ms = exponential(&mut self.rng, rate) * 1000.0;
            self.queue.push(self.now + gap_ms as u64 + 1, Event::Post);
        }
    }

    pub(super) fn post(&mut self) {
        let weights: Vec<u32> = self.sc.workload.classes.iter().map(|c| c.weight).collect();
        let class = pick(&mut self.rng, &weights);
        let relay = (self.summary.jobs.posted % u64::from(self.sc.relays)) as u32;
        let spec = spec_of(&self.sc.workload.classes[class]);
        let now = self.now;
        match testkit::post(&mut self.relays[relay as usize].core, now, &requester(relay), spec) {
            Ok(id) => {
                self.summary.jobs.posted += 1;
                self.jobs.insert(
                    id,
                    PostedJob { relay, class, posted_at: now, first_lease_at: None, ended: false },
                );
                self.drain(Endpoint::Relay(relay));
            }
            Err(e) => self.fail(Invariant::DriverConsistent, format!("posting a job: {e}")),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum End {
    Completed,
    Failed,
    Refused,
}

fn spec_of(c: &JobClass) -> JobSpec {
    let mut spec = if c.gpus > 0 {
        let mut s = testkit::docker_gpu_spec(c.reward);
        s.requirements.gpus = c.gpus;
        s.requirements.vram_gb = c.vram_gb;
        s
    } else {
        testkit::batch_spec(c.reward)
    };
    spec.name = c.name.clone();
    spec.max_attempts = c.max_attempts;
    spec.deadline_s = c.deadline_s;
    // The slowest node (1.5x class, 1.5x draw) must fit in the timeout.
    spec.limits.timeout_s = (c.duration_s * 5).div_ceil(2).max(1);
    if c.kind == "training" {
        spec.kind = JobKind::Training;
        spec.replication = 1;
        spec.limits.timeout_s = spec.limits.timeout_s.max(c.round_deadline_s);
        spec.training = Some(TrainingParams {
            model: ContentRef::Digest(Digest::of(b"sim model v0")),
            dataset: ContentRef::Digest(Digest::of(b"sim dataset")),
            participants: c.participants,
            rounds: c.rounds,
            local_epochs: 1,
            learning_rate: 0.1,
            batch_size: 32,
            aggregation: Aggregation::TrimmedMean,
            compression: Compression::None,
            round_deadline_s: c.round_deadline_s,
            quorum: c.quorum,
            verify_share: 0.0,
            topk_fraction: 0.01,
            max_norm_ratio: 4.0,
            holdout: None,
        });
    } else {
        spec.replication = c.replication;
    }
    spec
}

/// The output of a batch run: the right one, or node `liar`'s own wrong one.
fn batch_outcome(job: JobId, liar: Option<u32>) -> Outcome {
    let tag = liar.map_or(u64::MAX, u64::from).to_le_bytes();
    Outcome::succeeded(vec![OutputDigest {
        name: "out.bin".into(),
        digest: Digest::of_parts(&[b"sim result", &job.0, &tag]),
        size_bytes: 1024,
    }])
}

/// A training update: the right one for the chunk, or node `liar`'s own wrong one.
fn update_outcome(job: JobId, round: u32, chunk: u32, liar: Option<u32>) -> Outcome {
    let tag = liar.map_or(u64::MAX, u64::from).to_le_bytes();
    Outcome::succeeded(vec![OutputDigest {
        name: "update.bin".into(),
        digest: Digest::of_parts(&[
            b"sim update",
            &job.0,
            &round.to_le_bytes(),
            &chunk.to_le_bytes(),
            &tag,
        ]),
        size_bytes: 4096,
    }])
}
