//! Deterministic lifecycle tests: one `RelayCore` and several `NodeCore`s on a simulated clock,
//! messages delivered in order, the ledger instructions applied to the ledger state machine
//! the Studio relay ships (`LedgerState`).

#![allow(clippy::unwrap_used)] // test harness: a panic is a test failure

use std::collections::{BTreeMap, BTreeSet};

use aimatrix_protocol::envelope::{Domain, VerifyConfig};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::job::{
    Aggregation, Compression, ContentRef, JobKind, JobSpec, TrainingParams,
};
use aimatrix_protocol::ledger::{Entry, LedgerOp, LedgerState, Op};
use aimatrix_protocol::messages::{
    self, Advert, DenyReason, JobId, Message, Outcome, OutputDigest, Usage, Verdict,
};
use aimatrix_protocol::node::{AcceptMode, NodeConfig, NodeCore, NodeEvent};
use aimatrix_protocol::relay::books::LedgerBooks;
use aimatrix_protocol::relay::training::RoundVerdict;
use aimatrix_protocol::relay::training::DELTA_DIGEST_FILE;
use aimatrix_protocol::relay::{
    JobState, LeaseStatus, RelayConfig, RelayCore, RelayEvent, RelayJob,
};
use aimatrix_protocol::time::Millis;
use aimatrix_protocol::{codec, testkit, Topic, Transmit};

const REQUESTER: &str = "requester";
const FUNDS: u64 = 1_000;

/// How a simulated node behaves when it gets a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Finishes after `ms` with the correct output.
    Honest { ms: u64 },
    /// Finishes after `ms` with a wrong output.
    Liar { ms: u64 },
    /// Finishes after `ms` with a failure.
    Failing { ms: u64 },
    /// Goes silent when it gets a lease (crash, network loss).
    Vanish,
}

struct Net {
    now: Millis,
    relay: RelayCore,
    nodes: Vec<NodeCore>,
    behaviour: Vec<Behaviour>,
    down: BTreeSet<usize>,
    /// (finish at, node index, job, lease)
    running: Vec<(Millis, usize, JobId, u32)>,
    ledger: LedgerState,
    relay_events: Vec<RelayEvent>,
    node_events: Vec<(usize, NodeEvent)>,
    /// Training: rounds closed and waiting for aggregation.
    closed_rounds: Vec<(JobId, u32, Vec<NodeId>)>,
    /// The ledger's log, for the books check.
    entries: Vec<Entry>,
}

/// What an honest node returns; for a training lease, `delta.sha256` is what a verifying
/// re-run is compared by (every honest run agrees here, whatever the chunk).
fn right_output() -> Outcome {
    Outcome::succeeded(vec![
        OutputDigest { name: "out.txt".into(), digest: Digest::of(b"right"), size_bytes: 5 },
        OutputDigest {
            name: DELTA_DIGEST_FILE.into(),
            digest: Digest::of(b"right delta"),
            size_bytes: 65,
        },
    ])
}

fn wrong_output() -> Outcome {
    Outcome::succeeded(vec![
        OutputDigest { name: "out.txt".into(), digest: Digest::of(b"wrong"), size_bytes: 5 },
        OutputDigest {
            name: DELTA_DIGEST_FILE.into(),
            digest: Digest::of(b"wrong delta"),
            size_bytes: 65,
        },
    ])
}

impl Net {
    fn new(behaviour: &[Behaviour]) -> Self {
        Self::with_relay_config(RelayConfig::default(), behaviour)
    }

    fn with_relay_config(relay_config: RelayConfig, behaviour: &[Behaviour]) -> Self {
        let relay_key = testkit::keypair(1_000);
        let relay = RelayCore::new(relay_key.clone(), relay_config, 7);
        let nodes = behaviour
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let cfg = NodeConfig {
                    trusted_relays: vec![relay_key.public()],
                    ..NodeConfig::default()
                };
                NodeCore::new(testkit::keypair(i as u64), cfg, testkit::profile(), 100 + i as u64)
            })
            .collect();
        let mut ledger = LedgerState::new();
        let mint =
            Op::Mint { id: 1, account: REQUESTER.into(), amount: FUNDS, memo: String::new() };
        ledger.apply(mint, &mut Vec::new()).unwrap();
        let mut net = Self {
            now: 1_000_000,
            relay,
            nodes,
            behaviour: behaviour.to_vec(),
            down: BTreeSet::new(),
            running: Vec::new(),
            ledger,
            relay_events: Vec::new(),
            node_events: Vec::new(),
            closed_rounds: Vec::new(),
            entries: Vec::new(),
        };
        net.tick();
        net
    }

    fn node_index(&self, id: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id() == *id)
    }

    fn post(&mut self, spec: JobSpec) -> JobId {
        let id = testkit::post(&mut self.relay, self.now, REQUESTER, spec).unwrap();
        self.settle();
        id
    }

    /// Delivers every queued message and handles every event until nothing moves.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.relay.poll_transmit() {
                moved = true;
                let from = Some(self.relay.id());
                match t {
                    Transmit::Broadcast { topic: Topic::Offers, bytes } => {
                        for i in 0..self.nodes.len() {
                            if !self.down.contains(&i) {
                                self.nodes[i].handle_message(self.now, None, &bytes);
                            }
                        }
                    }
                    Transmit::Broadcast { .. } => {}
                    Transmit::Direct { to, bytes } => {
                        if let Some(i) = self.node_index(&to).filter(|i| !self.down.contains(i)) {
                            self.nodes[i].handle_message(self.now, from, &bytes);
                        }
                    }
                }
            }
            for i in 0..self.nodes.len() {
                if self.down.contains(&i) {
                    continue;
                }
                let from = Some(self.nodes[i].id());
                while let Some(t) = self.nodes[i].poll_transmit() {
                    moved = true;
                    let gossip = matches!(t, Transmit::Broadcast { .. });
                    self.relay.handle_message(
                        self.now,
                        if gossip { None } else { from },
                        t.bytes(),
                    );
                }
            }
            while let Some(e) = self.relay.poll_event() {
                moved = true;
                self.on_relay_event(e);
            }
            for i in 0..self.nodes.len() {
                while let Some(e) = self.nodes[i].poll_event() {
                    moved = true;
                    self.on_node_event(i, e);
                }
            }
            if !moved {
                break;
            }
        }
        let violations = self.ledger.violations();
        assert!(violations.is_empty(), "the ledger's invariants broke: {violations:?}");
        let disagreements = self.books().check(self.relay.jobs());
        assert!(
            disagreements.is_empty(),
            "the job records and the ledger disagree: {disagreements:?}"
        );
    }

    fn on_relay_event(&mut self, e: RelayEvent) {
        match &e {
            RelayEvent::Ledger(op) => {
                let result = self.ledger.apply(Op::from(op), &mut self.entries);
                if let LedgerOp::Reserve { job_id, .. } = op {
                    match result {
                        Ok(_) => self.relay.reserve_confirmed(self.now, *job_id).unwrap(),
                        Err(err) => {
                            self.relay.reserve_failed(self.now, *job_id, err.to_string()).unwrap()
                        }
                    }
                } else {
                    result.unwrap();
                }
            }
            RelayEvent::RoundClosed { job_id, round, updates, .. } => {
                self.closed_rounds.push((*job_id, *round, updates.iter().map(|u| u.0).collect()));
            }
            RelayEvent::Rejected { reason, .. } => panic!("relay rejected a message: {reason}"),
            _ => {}
        }
        self.relay_events.push(e);
    }

    fn on_node_event(&mut self, i: usize, e: NodeEvent) {
        if let NodeEvent::RunJob { lease, .. } = &e {
            match self.behaviour[i] {
                Behaviour::Vanish => {
                    self.down.insert(i);
                }
                Behaviour::Honest { ms } | Behaviour::Liar { ms } | Behaviour::Failing { ms } => {
                    self.running.push((self.now + ms, i, lease.job_id, lease.lease));
                }
            }
        }
        self.node_events.push((i, e));
    }

    fn outcome_of(&self, i: usize) -> Outcome {
        match self.behaviour[i] {
            Behaviour::Liar { .. } => wrong_output(),
            Behaviour::Failing { .. } => Outcome::Failed { reason: "exit code 1".into() },
            _ => right_output(),
        }
    }

    /// Advances the clock to the next timer or job completion (at most `until`).
    fn tick(&mut self) {
        let mut times: Vec<Millis> = self.running.iter().map(|r| r.0).collect();
        times.extend(self.relay.poll_timeout());
        for (i, n) in self.nodes.iter().enumerate() {
            if !self.down.contains(&i) {
                times.extend(n.poll_timeout());
            }
        }
        if let Some(next) = times.into_iter().min() {
            self.now = self.now.max(next);
        }
        let due: Vec<_> = self.running.iter().copied().filter(|r| r.0 <= self.now).collect();
        self.running.retain(|r| r.0 > self.now);
        for (_, i, job, lease) in due {
            if !self.down.contains(&i) {
                let outcome = self.outcome_of(i);
                self.nodes[i].finish(self.now, job, lease, outcome, Usage::default()).unwrap();
            }
        }
        self.relay.handle_timeout(self.now);
        for i in 0..self.nodes.len() {
            if !self.down.contains(&i) {
                self.nodes[i].handle_timeout(self.now);
            }
        }
        self.settle();
    }

    fn run_until_final(&mut self, job: JobId) {
        for _ in 0..10_000 {
            if self.relay.job(&job).unwrap().state.is_final() {
                return;
            }
            self.tick();
        }
        panic!("job {job} did not finish: {:?}", self.relay.job(&job).unwrap().state);
    }

    fn balance(&self, i: usize) -> u64 {
        self.available(&self.nodes[i].id().account_name())
    }

    /// An account's available credits in the ledger.
    fn available(&self, account: &str) -> u64 {
        u64::try_from(self.ledger.account(account).available()).unwrap()
    }

    /// The ledger's entries, gathered by job.
    fn books(&self) -> LedgerBooks {
        let mut books = LedgerBooks::default();
        for entry in &self.entries {
            books.add_entry(entry);
        }
        books
    }

    fn paid_receipts(&self, i: usize) -> u64 {
        self.node_events
            .iter()
            .filter(|(n, _)| *n == i)
            .filter_map(|(_, e)| match e {
                NodeEvent::ReceiptReceived { receipt, .. } => match receipt.verdict {
                    Verdict::Paid { amount } => Some(amount),
                    Verdict::Rejected { .. } => None,
                },
                _ => None,
            })
            .sum()
    }

    /// Stops the relay and starts a new one with the same key and a fresh nonce seed, then
    /// restores every job from the bytes a driver would have stored.
    fn restart_relay(&mut self, cfg: RelayConfig, nonce_seed: u64) {
        assert!(self.relay.poll_event().is_none() && self.relay.poll_transmit().is_none());
        let stored: Vec<Vec<u8>> =
            self.relay.jobs().map(|job| codec::encode(job).unwrap()).collect();
        self.relay = RelayCore::new(testkit::keypair(1_000), cfg, nonce_seed);
        for bytes in stored {
            let job: RelayJob = codec::decode(&bytes).unwrap();
            self.relay.restore_job(self.now, job).unwrap();
        }
    }

    /// How many ledger ops of each kind the relay emitted: (reserve, pay, release).
    fn ledger_ops(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for e in &self.relay_events {
            match e {
                RelayEvent::Ledger(LedgerOp::Reserve { .. }) => counts.0 += 1,
                RelayEvent::Ledger(LedgerOp::Pay { .. }) => counts.1 += 1,
                RelayEvent::Ledger(LedgerOp::Release { .. }) => counts.2 += 1,
                _ => {}
            }
        }
        counts
    }

    fn leases_of(&self, job: JobId) -> BTreeMap<u32, (usize, LeaseStatus)> {
        self.relay
            .job(&job)
            .unwrap()
            .leases
            .values()
            .map(|l| (l.lease, (self.node_index(&l.node).unwrap(), l.status.clone())))
            .collect()
    }
}

#[test]
fn happy_path_pays_the_node_that_ran_the_job() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 5_000 }; 3]);
    let job = net.post(testkit::batch_spec(10));
    net.run_until_final(job);
    let state = &net.relay.job(&job).unwrap().state;
    assert!(matches!(state, JobState::Completed { .. }), "{state:?}");
    let paid: Vec<usize> = (0..3).filter(|i| net.balance(*i) > 0).collect();
    assert_eq!(paid.len(), 1, "exactly one node is paid");
    assert_eq!(net.balance(paid[0]), 10);
    assert_eq!(net.paid_receipts(paid[0]), 10, "the receipt matches the ledger");
    assert_eq!(net.nodes[paid[0]].earned(), 10);
    assert_eq!(net.available(REQUESTER), FUNDS - 10);
    assert_eq!(net.ledger.held(), 0, "the reservation is closed");
    assert!(
        net.nodes[paid[0]].offers().all(|o| o.offer.job_id != job),
        "with its receipt the node forgets the offer"
    );
}

#[test]
fn a_flood_of_adverts_does_not_make_the_relay_refuse_claims_and_results() {
    // A relay whose replay caches hold 16 entries hears 200 adverts that live a day (strangers
    // or a big network, alike to the relay) before the job: claims and results, which expire
    // sooner, are still accepted (`Net` panics on any rejected message).
    let defaults = RelayConfig::default();
    let config = RelayConfig {
        verify: VerifyConfig { replay_cache_capacity: 16, ..defaults.verify },
        ..defaults
    };
    let mut net = Net::with_relay_config(config, &[Behaviour::Honest { ms: 5_000 }; 3]);
    // Nodes without wasm: the relay does not name them for the (wasm) job.
    let mut profile = testkit::profile();
    profile.runtimes.wasm = false;
    for n in 0..200 {
        let advert = Message::Advert(Advert { seq: 1, profile: profile.clone() });
        let key = testkit::keypair(5_000 + n);
        // Each expiring a little later than the last, as a network's adverts over time: the
        // advert cache evicts the soonest and accepts the rest.
        let bytes = messages::seal(&key, &advert, n, net.now, 20 * 3_600_000 + n).unwrap();
        net.relay.handle_message(net.now, None, &bytes);
    }
    let job = net.post(testkit::batch_spec(10));
    net.run_until_final(job);
    let state = &net.relay.job(&job).unwrap().state;
    assert!(matches!(state, JobState::Completed { .. }), "{state:?}");
}

#[test]
fn a_node_that_vanishes_mid_lease_is_replaced_and_never_paid() {
    let mut net = Net::new(&[Behaviour::Vanish, Behaviour::Honest { ms: 5_000 }]);
    let job = net.post(testkit::batch_spec(10));
    net.run_until_final(job);
    let leases = net.leases_of(job);
    assert_eq!(leases[&0], (0, LeaseStatus::Expired), "the vanished node's lease expired");
    assert!(matches!(leases[&1], (1, LeaseStatus::Returned(_))), "{leases:?}");
    assert!(net
        .relay_events
        .iter()
        .any(|e| matches!(e, RelayEvent::LeaseExpired { lease: 0, .. })));
    let expired_at = net.relay.job(&job).unwrap().leases[&0].deadline_ms;
    assert!(
        net.relay.job(&job).unwrap().leases[&1].granted_at_ms >= expired_at,
        "re-offered after the deadline"
    );

    // The vanished node comes back and reports its result late: refused, not paid.
    net.down.remove(&0);
    net.nodes[0].finish(net.now, job, 0, right_output(), Usage::default()).unwrap();
    net.settle();
    assert_eq!(net.balance(0), 0);
    assert_eq!(net.balance(1), 10);
    assert_eq!(net.available(REQUESTER), FUNDS - 10);
    let late = net.node_events.iter().any(|(i, e)| {
        *i == 0
            && matches!(e, NodeEvent::ReceiptReceived { receipt, .. }
                if matches!(&receipt.verdict, Verdict::Rejected { reason } if reason.contains("expired")))
    });
    assert!(late, "the late node gets a receipt saying why it was not paid");
}

#[test]
fn a_liar_under_replication_two_is_not_paid() {
    let mut net = Net::new(&[
        Behaviour::Liar { ms: 1_000 },
        Behaviour::Honest { ms: 2_000 },
        Behaviour::Honest { ms: 3_000 },
    ]);
    let mut spec = testkit::batch_spec(10);
    spec.replication = 2;
    spec.max_attempts = 2;
    let job = net.post(spec);
    net.run_until_final(job);
    let state = net.relay.job(&job).unwrap().state.clone();
    let JobState::Completed { result_hash } = state else { panic!("{state:?}") };
    let Outcome::Succeeded { result_hash: right, .. } = right_output() else { unreachable!() };
    assert_eq!(result_hash, right);
    assert_eq!(net.balance(0), 0, "the liar is not paid");
    assert_eq!(net.balance(1), 10);
    assert_eq!(net.balance(2), 10);
    assert_eq!(net.available(REQUESTER), FUNDS - 20);
    assert_eq!(net.relay.job(&job).unwrap().leases.len(), 3, "a third replica broke the tie");
}

#[test]
fn a_job_that_exhausts_its_attempts_is_refunded() {
    let mut net = Net::new(&[Behaviour::Failing { ms: 1_000 }; 3]);
    let mut spec = testkit::batch_spec(25);
    spec.max_attempts = 2;
    let job = net.post(spec);
    net.run_until_final(job);
    let state = &net.relay.job(&job).unwrap().state;
    assert!(
        matches!(state, JobState::Failed { reason } if reason.contains("all 2 attempts")),
        "{state:?}"
    );
    assert_eq!(net.relay.job(&job).unwrap().leases.len(), 2);
    assert_eq!(net.available(REQUESTER), FUNDS, "fully refunded");
    assert!((0..3).all(|i| net.balance(i) == 0));
    assert!(net
        .relay_events
        .iter()
        .any(|e| matches!(e, RelayEvent::Ledger(LedgerOp::Release { amount: 25, .. }))));
}

#[test]
fn a_job_past_its_deadline_is_refunded_and_its_leases_cancelled() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 500_000 }]);
    let mut spec = testkit::batch_spec(10);
    spec.deadline_s = 120;
    spec.limits.timeout_s = 110;
    let job = net.post(spec);
    net.run_until_final(job);
    let state = &net.relay.job(&job).unwrap().state;
    assert!(
        matches!(state, JobState::Failed { reason } if reason.contains("deadline")),
        "{state:?}"
    );
    assert_eq!(net.available(REQUESTER), FUNDS);
    assert!(net.node_events.iter().any(|(_, e)| matches!(e, NodeEvent::CancelJob { .. })));
}

#[test]
fn insufficient_funds_refuse_the_job_before_it_is_offered() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }]);
    let job = net.post(testkit::batch_spec(FUNDS + 1));
    let state = &net.relay.job(&job).unwrap().state;
    assert!(
        matches!(state, JobState::Refused { reason } if reason.contains("short by 1")),
        "{state:?}"
    );
    assert!(!net.node_events.iter().any(|(_, e)| matches!(e, NodeEvent::OfferSeen { .. })));
}

#[test]
fn manual_nodes_list_offers_and_claim_on_accept() {
    let relay_key = testkit::keypair(1_000);
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }]);
    let cfg = NodeConfig {
        accept: AcceptMode::Manual,
        trusted_relays: vec![relay_key.public()],
        ..NodeConfig::default()
    };
    net.nodes[0] = NodeCore::new(testkit::keypair(0), cfg, testkit::profile(), 5);
    let job = net.post(testkit::batch_spec(10));
    assert!(
        net.relay.job(&job).unwrap().leases.is_empty(),
        "a manual node does not claim by itself"
    );
    assert_eq!(net.nodes[0].offers().count(), 1);
    net.nodes[0].accept(net.now, job).unwrap();
    net.settle();
    net.run_until_final(job);
    assert_eq!(net.balance(0), 10);
}

#[test]
fn a_node_woken_only_to_act_forgets_an_unclaimed_offer_on_its_next_input() {
    let relay_key = testkit::keypair(1_000);
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }]);
    let cfg = NodeConfig {
        accept: AcceptMode::Manual,
        trusted_relays: vec![relay_key.public()],
        advert_interval_ms: 10 * 3_600_000,
        ..NodeConfig::default()
    };
    net.nodes[0] = NodeCore::new(testkit::keypair(0), cfg, testkit::profile(), 5);
    net.nodes[0].handle_timeout(net.now);
    let job = net.post(testkit::batch_spec(10));
    let deadline = net.nodes[0].offers().next().unwrap().offer.deadline_ms;
    let next_advert = net.now + 10 * 3_600_000;
    assert_eq!(net.nodes[0].poll_timeout(), Some(deadline));
    assert_eq!(net.nodes[0].poll_action_timeout(), Some(next_advert), "no wake-up to forget it");
    // Past the deadline, the first input forgets the offer before it is handled.
    net.nodes[0].handle_message(deadline, None, b"not an envelope");
    assert_eq!(net.nodes[0].offers().count(), 0);
    assert!(net.nodes[0].accept(deadline, job).is_err());
    // A claimed offer's expiry frees a slot: the node is woken for it.
    let job = net.post(testkit::batch_spec(10));
    let deadline = net.nodes[0].offers().next().unwrap().offer.deadline_ms;
    net.nodes[0].accept(net.now, job).unwrap();
    let claim_timeout = net.now + NodeConfig::default().claim_timeout_ms;
    assert_eq!(net.nodes[0].poll_action_timeout(), Some(claim_timeout.min(deadline)));
}

fn training_spec(participants: u32, quorum: u32, rounds: u32) -> JobSpec {
    let mut spec = testkit::batch_spec(3);
    spec.kind = JobKind::Training;
    spec.deadline_s = 3_600;
    spec.training = Some(TrainingParams {
        model: ContentRef::Digest(Digest::of(b"model v0")),
        dataset: ContentRef::Digest(Digest::of(b"digits")),
        participants,
        rounds,
        local_epochs: 1,
        learning_rate: 0.1,
        batch_size: 32,
        aggregation: Aggregation::TrimmedMean,
        compression: Compression::None,
        round_deadline_s: 60,
        quorum,
        verify_share: 0.0,
        topk_fraction: 0.01,
        max_norm_ratio: 4.0,
        holdout: None,
    });
    spec
}

/// Drives a training job, aggregating each closed round with `judge`.
fn run_training(net: &mut Net, job: JobId, mut judge: impl FnMut(u32, &[NodeId]) -> RoundVerdict) {
    for _ in 0..10_000 {
        if net.relay.job(&job).unwrap().state.is_final() {
            return;
        }
        if let Some((job_id, round, updates)) = net.closed_rounds.pop() {
            let verdict = judge(round, &updates);
            net.relay.round_aggregated(net.now, job_id, round, verdict).unwrap();
            net.settle();
            continue;
        }
        net.tick();
    }
    panic!("training did not finish");
}

#[test]
fn training_rounds_admit_joiners_at_the_boundary_and_pay_accepted_updates() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 30_000 }; 3]);
    // The third node is offline when the job is posted: round 0 starts with the quorum
    // after the start wait, and the third node joins while it runs.
    net.down.insert(2);
    let job = net.post(training_spec(3, 2, 2));
    while !net.relay_events.iter().any(|e| matches!(e, RelayEvent::RoundStarted { .. })) {
        net.tick();
    }
    net.down.remove(&2);
    run_training(&mut net, job, |round, updates| RoundVerdict {
        metrics: Default::default(),
        accepted: updates.to_vec(),
        rejected: vec![],
        new_model: Digest::of(&round.to_le_bytes()),
    });
    let starts: Vec<usize> = net
        .relay_events
        .iter()
        .filter_map(|e| match e {
            RelayEvent::RoundStarted { participants, .. } => Some(participants.len()),
            _ => None,
        })
        .collect();
    assert_eq!(starts, [2, 3], "round 0 starts at quorum; the third node joins at round 1");
    let state = &net.relay.job(&job).unwrap().state;
    assert_eq!(*state, JobState::Completed { result_hash: Digest::of(&1u32.to_le_bytes()) });
    // 5 accepted updates at 3 credits; escrow was 3 × 3 participants × 2 rounds = 18.
    let earned: u64 = (0..3).map(|i| net.balance(i)).sum();
    assert_eq!(earned, 15);
    assert_eq!(net.available(REQUESTER), FUNDS - 15, "unused escrow refunded");
}

#[test]
fn training_drops_a_silent_participant_and_does_not_pay_rejected_updates() {
    let mut net = Net::new(&[
        Behaviour::Honest { ms: 1_000 },
        Behaviour::Vanish,
        Behaviour::Liar { ms: 1_000 },
    ]);
    // All three join at once, so the round starts at once: quorum 2 of 3, one round.
    let job = net.post(training_spec(3, 2, 1));
    let liar = net.nodes[2].id();
    run_training(&mut net, job, |round, updates| RoundVerdict {
        metrics: Default::default(),
        accepted: updates.iter().copied().filter(|n| *n != liar).collect(),
        rejected: vec![(liar, "update norm far outside the round".into())],
        new_model: Digest::of(&round.to_le_bytes()),
    });
    assert!(matches!(net.relay.job(&job).unwrap().state, JobState::Completed { .. }));
    assert!(net.relay_events.iter().any(|e| matches!(e, RelayEvent::LeaseExpired { .. })));
    assert_eq!(net.balance(0), 3);
    assert_eq!(net.balance(1), 0, "the silent participant is not paid");
    assert_eq!(net.balance(2), 0, "the rejected update is not paid");
    assert_eq!(net.available(REQUESTER), FUNDS - 3);
}

/// Every update a round closed with is accepted.
fn accept_all(round: u32, updates: &[NodeId]) -> RoundVerdict {
    RoundVerdict {
        metrics: Default::default(),
        accepted: updates.to_vec(),
        rejected: vec![],
        new_model: Digest::of(&round.to_le_bytes()),
    }
}

#[test]
fn a_share_of_updates_is_re_run_on_another_participant_and_the_re_runs_are_paid() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }; 3]);
    let mut spec = training_spec(3, 3, 2);
    spec.training.as_mut().unwrap().verify_share = 0.5;
    let job = net.post(spec);
    // Escrow: 3 credits × (3 updates + ceil(0.5 × 3) = 2 re-runs) × 2 rounds.
    assert_eq!(net.relay.job(&job).unwrap().escrow, 30);
    run_training(&mut net, job, accept_all);
    let j = net.relay.job(&job).unwrap();
    assert!(matches!(j.state, JobState::Completed { .. }), "{:?}", j.state);
    // Per round 3 updates and 2 re-runs, each re-run on a node other than the one it checks.
    assert_eq!(j.leases.len(), 10, "{:?}", j.leases);
    assert!(j.leases.values().all(|l| l.paid));
    let history = &j.training.as_ref().unwrap().history;
    assert!(history.iter().all(|r| r.accepted == 3 && r.rejected.is_empty()), "{history:?}");
    let earned: u64 = (0..3).map(|i| net.balance(i)).sum();
    assert_eq!(earned, 30);
    assert_eq!(net.available(REQUESTER), FUNDS - 30);
}

#[test]
fn a_re_run_that_disagrees_voids_the_update_and_drops_its_sender() {
    let mut net = Net::new(&[
        Behaviour::Honest { ms: 1_000 },
        Behaviour::Honest { ms: 1_000 },
        Behaviour::Liar { ms: 1_000 },
    ]);
    let mut spec = training_spec(3, 1, 1);
    spec.training.as_mut().unwrap().verify_share = 1.0;
    let job = net.post(spec);
    let liar = net.nodes[2].id();
    let mut seen = Vec::new();
    run_training(&mut net, job, |round, updates| {
        seen.extend_from_slice(updates);
        accept_all(round, updates)
    });
    let j = net.relay.job(&job).unwrap();
    assert!(matches!(j.state, JobState::Completed { .. }), "{:?}", j.state);
    assert!(!seen.contains(&liar), "the liar's update is not aggregated: {seen:?}");
    let t = j.training.as_ref().unwrap();
    let record = &t.history[0];
    assert!(
        record.rejected.iter().any(|(n, why)| *n == liar && why.contains("different delta")),
        "{record:?}"
    );
    let liar_update = j.leases.values().find(|l| l.node == liar && l.lease < 3).unwrap();
    assert!(!liar_update.paid && matches!(liar_update.status, LeaseStatus::Failed(_)));
    assert!(j.excluded.contains(&liar));
    // Each update is re-run by the next sender in the round's order; the liar's re-run of an
    // honest update disagrees too (a mismatch cannot say who lied), so exactly one honest
    // update survives: the one an honest node re-ran.
    assert_eq!(seen.len(), 1, "{seen:?}");
    let paid_updates = j.leases.values().filter(|l| l.lease < 3 && l.paid).count();
    assert_eq!(paid_updates, 1);
    // Every re-run that came back is paid (3), plus the surviving update: 4 × 3 credits.
    assert_eq!(j.paid, 12);
    assert_eq!(net.available(REQUESTER), FUNDS - 12, "the rest of the escrow is refunded");
}

#[test]
fn rounds_short_of_participants_still_train_on_every_chunk() {
    let mut net = Net::new(&[
        Behaviour::Honest { ms: 1_000 },
        Behaviour::Vanish,
        Behaviour::Honest { ms: 1_000 },
    ]);
    let job = net.post(training_spec(3, 2, 4));
    run_training(&mut net, job, accept_all);
    let mut chunks = BTreeSet::new();
    let mut rounds = 0;
    for (i, e) in &net.node_events {
        if let (0 | 2, NodeEvent::RunJob { lease, .. }) = (i, e) {
            if let Some(r) = lease.round.filter(|r| r.round >= 1) {
                chunks.insert(r.chunk);
                rounds = rounds.max(r.round + 1);
            }
        }
    }
    assert!(matches!(net.relay.job(&job).unwrap().state, JobState::Completed { .. }));
    assert_eq!(rounds, 4);
    // The silent node is dropped after round 0; from round 1 on the two left cover all three
    // chunks between them.
    assert_eq!(chunks, BTreeSet::from([0, 1, 2]));
}

#[test]
fn a_node_only_obeys_the_relay_that_offered_the_job() {
    use aimatrix_protocol::messages::{seal, Lease, Message, Receipt};
    let mut net = Net::new(&[Behaviour::Vanish]);
    // A second relay the node also trusts: it must not be able to lease, cancel or pay for
    // jobs it did not offer.
    let rogue = testkit::keypair(2_000);
    let mut cfg = NodeConfig {
        trusted_relays: vec![net.relay.id(), rogue.public()],
        ..NodeConfig::default()
    };
    cfg.accept = AcceptMode::Manual;
    net.nodes[0] = NodeCore::new(testkit::keypair(0), cfg, testkit::profile(), 5);
    let job = net.post(testkit::batch_spec(10));
    net.nodes[0].accept(net.now, job).unwrap();
    let node_id = net.nodes[0].id();
    let mut evil_spec = testkit::batch_spec(10);
    evil_spec.workload.args = vec!["--exfiltrate".into()];
    let forged = Message::Lease(Lease {
        job_id: job,
        lease: 0,
        node: node_id,
        deadline_ms: net.now + 60_000,
        spec: evil_spec,
        round: None,
    });
    let bytes = seal(&rogue, &forged, 1, net.now, 60_000).unwrap();
    net.nodes[0].handle_message(net.now, Some(rogue.public()), &bytes);
    let receipt = Message::Receipt(Receipt {
        job_id: job,
        lease: 0,
        node: node_id,
        round: None,
        verdict: Verdict::Paid { amount: 1_000 },
    });
    let bytes = seal(&rogue, &receipt, 2, net.now, 60_000).unwrap();
    net.nodes[0].handle_message(net.now, Some(rogue.public()), &bytes);
    let mut events = Vec::new();
    while let Some(e) = net.nodes[0].poll_event() {
        events.push(e);
    }
    assert!(!events.iter().any(|e| matches!(e, NodeEvent::RunJob { .. })), "{events:?}");
    assert_eq!(net.nodes[0].earned(), 0, "a forged receipt earns nothing");
    let counts = net.nodes[0].reject_counts();
    assert_eq!(counts.get("not_offered"), Some(&1), "the lease: {counts:?}");
    assert_eq!(counts.get("unexpected_receipt"), Some(&1), "the receipt: {counts:?}");
}

#[test]
fn finished_jobs_can_be_forgotten_to_bound_the_relay() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }]);
    let jobs: Vec<JobId> = (0..3).map(|_| net.post(testkit::batch_spec(5))).collect();
    for job in &jobs {
        net.run_until_final(*job);
    }
    assert_eq!(net.relay.forget_finished(1), 2);
    assert!(net.relay.job(&jobs[0]).is_none() && net.relay.job(&jobs[1]).is_none());
    assert!(net.relay.job(&jobs[2]).is_some(), "the newest finished job is kept");
}

/// Runs a job whose relay restarts while node 0 holds the lease. The node's result is signed
/// before the restart (and waits in the transport while the relay is down) or after it.
fn restart_mid_job(result_signed_before_restart: bool) -> (Net, JobId, Vec<Vec<u8>>) {
    let mut net = Net::new(&[Behaviour::Honest { ms: 5_000 }; 2]);
    let job = net.post(testkit::batch_spec(10));
    assert!(matches!(net.leases_of(job)[&0], (0, LeaseStatus::Active)), "{:?}", net.leases_of(job));
    let snapshot = net.relay.job(&job).cloned().unwrap();
    let mut held = Vec::new();
    if result_signed_before_restart {
        let (finish_at, i, job_id, lease) = net.running.pop().unwrap();
        net.now = finish_at;
        net.nodes[i].finish(net.now, job_id, lease, right_output(), Usage::default()).unwrap();
        // Direct messages wait in the transport for the relay; gossip is lost.
        held.extend(std::iter::from_fn(|| net.nodes[i].poll_transmit()).filter_map(|t| match t {
            Transmit::Direct { bytes, .. } => Some(bytes),
            Transmit::Broadcast { .. } => None,
        }));
        assert!(!held.is_empty(), "the result (sent first) waits for the relay");
    }
    net.restart_relay(RelayConfig::default(), 8);
    // Compared as stored: everything but the announcement count, which a restart resets.
    let restored = codec::encode(net.relay.job(&job).unwrap()).unwrap();
    assert_eq!(restored, codec::encode(&snapshot).unwrap(), "restored exactly");
    assert!(net.relay.poll_event().is_none(), "a running job with no free slot just waits");
    for bytes in &held {
        net.relay.handle_message(net.now, Some(net.nodes[0].id()), bytes);
    }
    net.settle();
    net.run_until_final(job);
    (net, job, held)
}

fn assert_paid_once(net: &Net, job: JobId) {
    let state = &net.relay.job(&job).unwrap().state;
    assert!(matches!(state, JobState::Completed { .. }), "{state:?}");
    assert_eq!(net.ledger_ops(), (1, 1, 1), "one reserve, one pay, one release");
    assert_eq!(net.leases_of(job).len(), 1, "the restored lease finished the job");
    assert_eq!((net.balance(0), net.balance(1)), (10, 0));
    assert_eq!(net.paid_receipts(0), 10, "the receipt reached the node");
    assert_eq!(net.nodes[0].earned(), 10);
    assert_eq!(net.available(REQUESTER), FUNDS - 10);
    assert_eq!(net.ledger.held(), 0, "the escrow is released");
}

/// The books check finds each way a job record and the ledger can drift apart, and nothing
/// when they agree.
#[test]
fn the_books_check_reports_each_disagreement() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }]);
    let job = net.post(testkit::batch_spec(10));
    net.run_until_final(job);
    let record = net.relay.job(&job).unwrap().clone();
    assert!(net.books().check([&record]).is_empty());
    let node = net.nodes[0].id().account_name();

    // A payment the ledger never got (a receipt sent before the ledger acknowledged it).
    let mut books = LedgerBooks::default();
    for entry in net.entries.iter().filter(|e| !matches!(e.op, Op::Pay { .. })) {
        books.add_entry(entry);
    }
    let found: Vec<String> = books.check([&record]).iter().map(ToString::to_string).collect();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].contains(&format!("pays {node} 10 credits")) && found[0].ends_with("ledger 0")
    );
    assert!(found[1].contains("10 credits were paid, the ledger 0"), "{found:?}");

    // The same payment, still in the outbox: counted once, whether or not the ledger has it.
    let pay = net.relay_events.iter().find_map(|e| match e {
        RelayEvent::Ledger(op @ LedgerOp::Pay { .. }) => Some(op.clone()),
        _ => None,
    });
    books.add_pending(&pay.clone().unwrap());
    assert!(books.check([&record]).is_empty());
    let mut all = net.books();
    all.add_pending(&pay.unwrap());
    assert!(all.check([&record]).is_empty(), "an instruction the ledger applied counts once");

    // A record that says more was refunded than the ledger returned.
    let mut refunded = record.clone();
    refunded.refunded += 1;
    let found = net.books().check([&refunded]);
    assert!(found[0].what.contains("refunded 1, the ledger returned 0"), "{found:?}");

    // A reservation no record explains: reported while open, not once released whole.
    let orphan = JobId([9; 16]);
    let mut books = net.books();
    let reserve = Op::Reserve {
        id: 77,
        job_id: orphan.0,
        requester: REQUESTER.into(),
        amount: 6,
        timeout_at_ms: u64::MAX,
    };
    let mut ledger = net.ledger.clone();
    let mut entries = Vec::new();
    ledger.apply(reserve, &mut entries).unwrap();
    books.add_entry(&entries[0]);
    let found = books.check([&record]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].job_id, orphan);
    let expected = format!("reservation of 6 credits of {REQUESTER}");
    assert!(found[0].what.contains(&expected), "{found:?}");
    books.add_pending(&LedgerOp::release(orphan, 6));
    assert!(books.check([&record]).is_empty(), "voided whole, it moved no credits");

    // A record still open whose reservation the ledger has closed.
    let mut open = record.clone();
    open.state = JobState::Open;
    open.refunded = 0;
    let found = net.books().check([&open]);
    assert!(found.iter().any(|d| d.what.contains("still open but its reservation was released")));
}

#[test]
fn a_relay_restarted_mid_job_completes_the_job_and_pays_once() {
    let (net, job, _) = restart_mid_job(false);
    assert_paid_once(&net, job);

    let (mut net, job, held) = restart_mid_job(true);
    assert_paid_once(&net, job);
    // Restarted again, the relay has forgotten the result's nonce, but the lease is settled:
    // the same bytes (a node that missed its receipt sends its result again) are answered with
    // the same receipt, nothing is paid twice, and the finished job stays quiet.
    net.restart_relay(RelayConfig::default(), 9);
    assert_eq!(net.relay.poll_timeout(), None, "a finished job sets no timer");
    assert!(net.relay.poll_event().is_none() && net.relay.poll_transmit().is_none());
    net.relay.handle_message(net.now, Some(net.nodes[0].id()), &held[0]);
    let events: Vec<RelayEvent> = std::iter::from_fn(|| net.relay.poll_event()).collect();
    assert!(events.is_empty(), "{events:?}");
    let answers: Vec<Transmit> = std::iter::from_fn(|| net.relay.poll_transmit()).collect();
    let [Transmit::Direct { to, bytes }] = &answers[..] else { panic!("{answers:?}") };
    assert_eq!(*to, net.nodes[0].id());
    let mut verifier = aimatrix_protocol::envelope::Verifier::new(VerifyConfig::default());
    let opened = messages::open(&mut verifier, net.now, bytes, &[Domain::Receipt]).unwrap();
    let Message::Receipt(receipt) = opened.1 else { panic!("{opened:?}") };
    assert_eq!((receipt.job_id, receipt.verdict), (job, Verdict::Paid { amount: 10 }));
    net.settle();
    assert_paid_once(&net, job);
}

/// The relay crashed after the ledger paid a result and before its receipt left: the node,
/// with no receipt after `receipt_ask_after_ms`, sends its result again, and the restarted
/// relay answers with the receipt it never sent. Paid once, and the node stops asking.
#[test]
fn a_receipt_cut_by_a_relay_crash_reaches_the_node_when_it_asks_again() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 5_000 }; 2]);
    let job = net.post(testkit::batch_spec(10));
    let (finish_at, i, job_id, lease) = net.running.pop().unwrap();
    net.now = finish_at;
    net.nodes[i].finish(net.now, job_id, lease, right_output(), Usage::default()).unwrap();
    let from = Some(net.nodes[i].id());
    while let Some(t) = net.nodes[i].poll_transmit() {
        net.relay.handle_message(net.now, from, t.bytes());
    }
    while let Some(e) = net.relay.poll_event() {
        net.on_relay_event(e);
    }
    assert!(matches!(net.relay.job(&job).unwrap().state, JobState::Completed { .. }));
    assert_eq!(net.balance(0), 10, "the ledger paid");
    let cut = std::iter::from_fn(|| net.relay.poll_transmit()).count();
    assert!(cut > 0, "the receipt was to go out now");
    net.restart_relay(RelayConfig::default(), 8);
    assert_eq!(net.paid_receipts(0), 0, "the node has no receipt yet");

    let asked_from = net.now;
    for _ in 0..10 {
        net.tick();
    }
    assert_paid_once(&net, job);
    let asked_after = net.now - asked_from;
    assert!(asked_after >= NodeConfig::default().receipt_ask_after_ms, "{asked_after} ms");
    let receipts = net.node_events.iter();
    let receipts = receipts.filter(|(_, e)| matches!(e, NodeEvent::ReceiptReceived { .. }));
    assert_eq!(receipts.count(), 1, "one receipt");
    assert!(
        net.nodes[0].poll_timeout() > Some(net.now + 60_000),
        "no more asks once it came (next timer: the advert)"
    );
}

/// A node whose relay never answers asks for the receipt after 30 s, then after twice as long
/// each time (at most 5 minutes apart), and stops after `RECEIPT_ASKS_MAX` asks.
#[test]
fn a_node_asks_for_a_missing_receipt_a_bounded_number_of_times() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }]);
    let _job = net.post(testkit::batch_spec(10));
    let (finish_at, i, job_id, lease) = net.running.pop().unwrap();
    let node = &mut net.nodes[i];
    node.finish(finish_at, job_id, lease, right_output(), Usage::default()).unwrap();
    while node.poll_transmit().is_some() {} // the relay never hears it
    let mut asks = Vec::new();
    while let Some(now) = node.poll_timeout().filter(|&t| t < finish_at + 6 * 3_600_000) {
        node.handle_timeout(now);
        while let Some(t) = node.poll_transmit() {
            if let Transmit::Direct { .. } = t {
                asks.push(now - finish_at);
            }
        }
    }
    assert_eq!(asks.len() as u32, aimatrix_protocol::node::RECEIPT_ASKS_MAX, "{asks:?}");
    assert_eq!(&asks[..6], &[30_000, 90_000, 210_000, 450_000, 750_000, 1_050_000]);
}

#[test]
fn a_lease_that_expires_while_the_relay_is_down_is_reoffered_after_the_restart() {
    let mut net = Net::new(&[Behaviour::Vanish, Behaviour::Honest { ms: 5_000 }]);
    let job = net.post(testkit::batch_spec(10));
    let deadline = net.relay.job(&job).unwrap().leases[&0].deadline_ms;
    assert_eq!(net.leases_of(job)[&0], (0, LeaseStatus::Active));
    // The relay is down from here until well past the lease deadline.
    net.now = deadline + 60_000;
    net.restart_relay(RelayConfig::default(), 8);
    assert_eq!(net.leases_of(job)[&0], (0, LeaseStatus::Expired), "expired on restore");
    let restarted_at = net.now;
    net.settle();
    let leases = net.leases_of(job);
    assert!(matches!(leases[&1], (1, LeaseStatus::Active)), "re-offered at once: {leases:?}");
    assert_eq!(net.relay.job(&job).unwrap().leases[&1].granted_at_ms, restarted_at);
    assert!(net.relay.job(&job).unwrap().excluded.contains(&net.nodes[0].id()));
    net.run_until_final(job);
    assert!(matches!(net.relay.job(&job).unwrap().state, JobState::Completed { .. }));
    assert_eq!((net.balance(0), net.balance(1)), (0, 10));
    assert_eq!(net.ledger_ops(), (1, 1, 1));
    assert_eq!(net.available(REQUESTER), FUNDS - 10);
    assert_eq!(net.ledger.held(), 0);
}

#[test]
fn a_job_restored_while_reserving_asks_for_the_same_reservation_again() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 5_000 }]);
    let job = net.relay.post_job(net.now, REQUESTER, testkit::batch_spec(10)).unwrap();
    // The driver applies the reservation; the relay stops before it is confirmed.
    let Some(RelayEvent::Ledger(reserve)) = net.relay.poll_event() else { panic!("no reserve") };
    net.ledger.apply(Op::from(&reserve), &mut net.entries).unwrap();
    net.relay_events.push(RelayEvent::Ledger(reserve.clone()));
    // A changed margin must not change the op: the ledger refuses an id reused differently.
    let cfg = RelayConfig { reserve_margin_ms: 1, ..RelayConfig::default() };
    net.restart_relay(cfg, 8);
    net.settle();
    let reserves: Vec<&RelayEvent> = net
        .relay_events
        .iter()
        .filter(|e| matches!(e, RelayEvent::Ledger(LedgerOp::Reserve { .. })))
        .collect();
    assert_eq!(reserves, [&RelayEvent::Ledger(reserve.clone()); 2], "the identical op again");
    net.run_until_final(job);
    let state = &net.relay.job(&job).unwrap().state;
    assert!(matches!(state, JobState::Completed { .. }), "{state:?}");
    assert_eq!(net.balance(0), 10);
    assert_eq!(net.available(REQUESTER), FUNDS - 10, "the escrow was taken once");
    assert_eq!(net.ledger.held(), 0);
}

#[test]
fn a_lease_lost_on_the_way_is_sent_again_when_its_holder_claims_again() {
    let relay_key = testkit::keypair(1_000);
    let mut relay = RelayCore::new(relay_key.clone(), RelayConfig::default(), 7);
    let cfg = NodeConfig { trusted_relays: vec![relay_key.public()], ..NodeConfig::default() };
    let mut node = NodeCore::new(testkit::keypair(0), cfg, testkit::profile(), 100);
    let mut now: Millis = 1_000_000;
    node.handle_timeout(now);
    while node.poll_transmit().is_some() {}
    let job = relay.post_job(now, REQUESTER, testkit::batch_spec(10)).unwrap();
    let Some(RelayEvent::Ledger(LedgerOp::Reserve { .. })) = relay.poll_event() else {
        panic!("no reserve")
    };
    relay.reserve_confirmed(now, job).unwrap();
    // Offer to the node; its claim to the relay; the relay's lease is lost on the way.
    let offer = relay.poll_transmit().unwrap();
    node.handle_message(now, None, offer.bytes());
    let claim = node.poll_transmit().unwrap();
    relay.handle_message(now, Some(node.id()), claim.bytes());
    let lost = relay.poll_transmit().unwrap();
    assert!(matches!(lost, Transmit::Direct { .. }));
    assert_eq!(relay.job(&job).unwrap().leases.len(), 1);
    // The node's claim times out and it claims again; the relay sends the same lease.
    now += NodeConfig::default().claim_timeout_ms + 1;
    node.handle_timeout(now);
    let again = std::iter::from_fn(|| node.poll_transmit())
        .find(|t| matches!(t, Transmit::Direct { .. }))
        .expect("a second claim");
    relay.handle_message(now, Some(node.id()), again.bytes());
    let resent = relay.poll_transmit().expect("the lease, sent again");
    assert_eq!(relay.job(&job).unwrap().leases.len(), 1, "no second lease granted");
    node.handle_message(now, Some(relay.id()), resent.bytes());
    let events: Vec<NodeEvent> = std::iter::from_fn(|| node.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(e, NodeEvent::RunJob { lease, .. } if lease.lease == 0)),
        "{events:?}"
    );
}

/// The nodes that claimed `job` so far, by index.
fn claimants(net: &Net, job: JobId) -> BTreeSet<usize> {
    net.node_events
        .iter()
        .filter(|(_, e)| matches!(e, NodeEvent::Claimed { job_id } if *job_id == job))
        .map(|(i, _)| *i)
        .collect()
}

/// The preferred claimants of `job` as node `i` heard them in the latest offer.
fn preferred_heard(net: &Net, i: usize, job: JobId) -> Vec<NodeId> {
    let offer = net.nodes[i].offers().find(|o| o.offer.job_id == job).expect("offer heard");
    offer.offer.preferred.clone()
}

#[test]
fn an_offer_names_two_claimants_per_slot_and_only_they_claim() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }; 8]);
    let job = net.post(testkit::batch_spec(10));
    let preferred = preferred_heard(&net, 0, job);
    assert_eq!(preferred.len(), 2, "two per open slot: {preferred:?}");
    let named: BTreeSet<usize> = preferred.iter().filter_map(|id| net.node_index(id)).collect();
    assert_eq!(claimants(&net, job), named, "only the named nodes claim; no storm of eight");
    net.run_until_final(job);
    assert!(matches!(net.relay.job(&job).unwrap().state, JobState::Completed { .. }));
}

#[test]
fn connected_nodes_are_named_before_others_with_as_many_free_slots() {
    let named = |connect: &[usize]| {
        let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }; 8]);
        for &i in connect {
            let id = net.nodes[i].id();
            net.relay.peer_connected(net.now, id);
        }
        let job = net.post(testkit::batch_spec(10));
        let named: BTreeSet<usize> =
            preferred_heard(&net, 0, job).iter().filter_map(|id| net.node_index(id)).collect();
        named
    };
    // The same network, the same job: by claim order alone, two nodes are named.
    let by_order = named(&[]);
    assert_eq!(by_order.len(), 2);
    assert_eq!(named(&[]), by_order, "the runs are deterministic");
    // Two others connected: they are named instead.
    let near: Vec<usize> = (0..8).filter(|i| !by_order.contains(i)).take(2).collect();
    assert_eq!(named(&near), near.iter().copied().collect::<BTreeSet<usize>>());
}

#[test]
fn a_busy_node_is_not_named_for_the_next_job() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 60_000 }; 4]);
    let first = net.post(testkit::batch_spec(10));
    let (holder, _) = net.leases_of(first)[&0];
    let second = net.post(testkit::batch_spec(10));
    let named: BTreeSet<usize> =
        preferred_heard(&net, 0, second).iter().filter_map(|id| net.node_index(id)).collect();
    assert_eq!(named.len(), 2);
    assert!(!named.contains(&holder), "node {holder} holds a lease (1 slot): {named:?}");
    let (second_holder, _) = net.leases_of(second)[&0];
    assert_ne!(second_holder, holder);
}

#[test]
fn an_offer_nobody_named_takes_is_widened_then_opened_to_every_node() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }; 6]);
    // Every node advertised, then went quiet: no claim ever comes.
    net.down = (0..6).collect();
    let job = net.post(testkit::batch_spec(10));
    let mut sizes = Vec::new();
    for _ in 0..4 {
        net.now = net.relay.poll_timeout().unwrap();
        net.relay.handle_timeout(net.now);
        let offer = std::iter::from_fn(|| net.relay.poll_transmit())
            .find(|t| matches!(t, Transmit::Broadcast { topic: Topic::Offers, .. }))
            .expect("re-announced");
        net.nodes[0].handle_message(net.now, None, offer.bytes());
        sizes.push(preferred_heard(&net, 0, job).len());
    }
    // 2 named at first; then 4, then all 6 indexed nodes, then nobody: open to every node.
    assert_eq!(sizes, vec![4, 6, 0, 0]);
}

#[test]
fn nodes_named_in_a_recent_offer_are_not_named_for_the_next_one() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }; 4]);
    // Every node advertised one slot, then went quiet; a listener that never advertised (so is
    // never named) hears the offers.
    net.down = (0..4).collect();
    let cfg = NodeConfig { trusted_relays: vec![net.relay.id()], ..NodeConfig::default() };
    let mut listener = NodeCore::new(testkit::keypair(99), cfg, testkit::profile(), 9);
    let mut named = Vec::new();
    for _ in 0..3 {
        let job = net.relay.post_job(net.now, REQUESTER, testkit::batch_spec(10)).unwrap();
        while let Some(e) = net.relay.poll_event() {
            if let RelayEvent::Ledger(op) = e {
                net.ledger.apply(Op::from(&op), &mut net.entries).unwrap();
                net.relay.reserve_confirmed(net.now, job).unwrap();
            }
        }
        while let Some(t) = net.relay.poll_transmit() {
            if matches!(t, Transmit::Broadcast { topic: Topic::Offers, .. }) {
                listener.handle_message(net.now, None, t.bytes());
            }
        }
        let offer = listener.offers().find(|o| o.offer.job_id == job).expect("offer heard");
        named.push(offer.offer.preferred.iter().copied().collect::<BTreeSet<NodeId>>());
    }
    assert_eq!((named[0].len(), named[1].len()), (2, 2));
    assert!(named[0].is_disjoint(&named[1]), "the second offer names the other two: {named:?}");
    assert!(named[2].is_empty(), "every slot is promised: the third offer is open to all");
}

#[test]
fn a_node_does_not_claim_again_the_job_it_just_finished() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }]);
    let job = net.post(testkit::batch_spec(10));
    net.run_until_final(job);
    let claims = net
        .node_events
        .iter()
        .filter(|(_, e)| matches!(e, NodeEvent::Claimed { job_id } if *job_id == job))
        .count();
    assert_eq!(claims, 1, "finishing freed the slot; the finished job's offer must not take it");
    assert!(net.nodes[0].offers().all(|o| o.offer.job_id != job), "its offer is forgotten");
}

#[test]
fn a_denial_for_a_stale_offer_lists_the_other_taken_jobs() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }; 2]);
    // Node 1 only lists offers (manual mode): it hears three jobs that node 0 then runs.
    let cfg = NodeConfig {
        accept: AcceptMode::Manual,
        trusted_relays: vec![net.relay.id()],
        ..NodeConfig::default()
    };
    net.nodes[1] = NodeCore::new(testkit::keypair(1), cfg, testkit::profile(), 555);
    let jobs: Vec<JobId> = (0..3).map(|_| net.post(testkit::batch_spec(10))).collect();
    for job in &jobs {
        net.run_until_final(*job);
    }
    let open_slots = |net: &Net, job: JobId| {
        net.nodes[1].offers().find(|o| o.offer.job_id == job).map(|o| o.offer.open_slots)
    };
    assert_eq!(open_slots(&net, jobs[1]), Some(1), "a stale offer");
    // Its owner accepts the first; the denial says the other two are taken as well.
    net.nodes[1].accept(net.now, jobs[0]).unwrap();
    net.settle();
    assert!(net
        .node_events
        .iter()
        .any(|(i, e)| *i == 1
            && matches!(e, NodeEvent::ClaimDenied { reason: DenyReason::NotOpen, .. })));
    assert_eq!(open_slots(&net, jobs[1]), Some(0));
    assert_eq!(open_slots(&net, jobs[2]), Some(0));
}

#[test]
fn a_full_offer_table_never_forgets_an_offer_with_a_claim_in_flight() {
    let relay = testkit::keypair(1_000);
    let now: Millis = 1_000_000;
    let cfg = NodeConfig {
        trusted_relays: vec![relay.public()],
        max_known_offers: 2,
        ..NodeConfig::default()
    };
    let mut node = NodeCore::new(testkit::keypair(0), cfg, testkit::profile(), 1);
    let offer = |job: u8| {
        let msg = aimatrix_protocol::messages::Message::Offer(aimatrix_protocol::messages::Offer {
            job_id: JobId([job; 16]),
            spec: testkit::batch_spec(10),
            // The claimed job has the nearest deadline: the old rule evicted it first.
            deadline_ms: now + 60_000 + u64::from(job) * 1_000,
            open_slots: 1,
            preferred: Vec::new(),
        });
        aimatrix_protocol::messages::seal(&relay, &msg, u64::from(job), now, 60_000).unwrap()
    };
    node.handle_message(now, None, &offer(1));
    assert!(std::iter::from_fn(|| node.poll_event())
        .any(|e| matches!(e, NodeEvent::Claimed { job_id } if job_id == JobId([1; 16]))));
    for job in 2..5 {
        node.handle_message(now, None, &offer(job));
    }
    let known: Vec<JobId> = node.offers().map(|o| o.offer.job_id).collect();
    assert_eq!(known.len(), 2);
    assert!(known.contains(&JobId([1; 16])), "the claimed offer stays: {known:?}");
}

#[test]
fn a_training_offer_waiting_for_participants_widens_like_any_other() {
    let mut net = Net::new(&[Behaviour::Honest { ms: 1_000 }; 4]);
    // Every node advertised, then went quiet: the round waits for participants.
    net.down = (0..4).collect();
    let job = net.post(training_spec(2, 2, 1));
    let mut sizes = Vec::new();
    for _ in 0..4 {
        net.now = net.relay.poll_timeout().unwrap();
        net.relay.handle_timeout(net.now);
        if let Some(offer) = std::iter::from_fn(|| net.relay.poll_transmit())
            .find(|t| matches!(t, Transmit::Broadcast { topic: Topic::Offers, .. }))
        {
            net.nodes[0].handle_message(net.now, None, offer.bytes());
            sizes.push(preferred_heard(&net, 0, job).len());
        }
    }
    // 4 named at first (2 per seat), then all 4 indexed nodes twice, then nobody.
    assert_eq!(sizes.last(), Some(&0), "opened to every node in the end: {sizes:?}");
}

#[test]
fn only_the_holder_of_an_active_lease_may_upload_its_outputs() {
    use aimatrix_protocol::relay::UploadRefusal;
    let mut net = Net::new(&[Behaviour::Honest { ms: 5_000 }, Behaviour::Honest { ms: 5_000 }]);
    let job = net.post(testkit::batch_spec(10));
    let lease = net.relay.job(&job).unwrap().leases.values().next().unwrap().clone();
    let holder = lease.node;
    let other = net.nodes.iter().map(NodeCore::id).find(|n| *n != holder).unwrap();
    assert_eq!(net.relay.may_upload(holder, job, lease.lease), Ok(()));
    let number = lease.lease;
    assert_eq!(
        net.relay.may_upload(other, job, number),
        Err(UploadRefusal::NotHolder { job_id: job, lease: number })
    );
    assert_eq!(
        net.relay.may_upload(holder, job, number + 7),
        Err(UploadRefusal::UnknownLease { job_id: job, lease: number + 7 })
    );
    let unknown = JobId([9; 16]);
    assert_eq!(
        net.relay.may_upload(holder, unknown, number),
        Err(UploadRefusal::UnknownJob { job_id: unknown })
    );
    net.run_until_final(job);
    assert_eq!(
        net.relay.may_upload(holder, job, number),
        Err(UploadRefusal::NotActive { job_id: job, lease: number })
    );
}

#[test]
fn a_job_the_driver_cannot_go_on_with_fails_with_its_reason_and_is_refunded() {
    let mut net = Net::new(&[Behaviour::Vanish]);
    let job = net.post(testkit::batch_spec(10));
    let reason = "the relay cannot judge round 3: the evaluation set is missing".to_owned();
    net.relay.abandon_job(net.now, job, reason.clone()).unwrap();
    net.settle();
    assert_eq!(net.relay.job(&job).unwrap().state, JobState::Failed { reason });
    assert_eq!(net.available(REQUESTER), FUNDS, "fully refunded");
    assert!(net.relay.abandon_job(net.now, job, "again".into()).is_err(), "a job ends once");
}
