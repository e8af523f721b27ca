//! The simulated network of a training run: one relay core, one node core per participant, a
//! seeded event queue and a simulated clock. Every lease runs the real guest in the sandbox.

use std::collections::{BTreeSet, HashMap};

use aimatrix_digits::{split, CLASSES, FEATURES};
use aimatrix_mlp::{compress, decompress, Codec, Dataset, Model};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::job::{ContentRef, JobKind, JobSpec, TrainingParams};
use aimatrix_protocol::ledger::{LedgerOp, LedgerState, Op, TransferId};
use aimatrix_protocol::messages::{JobId, Lease, Outcome, OutputDigest, Usage};
use aimatrix_protocol::node::{NodeConfig, NodeCore, NodeEvent};
use aimatrix_protocol::relay::training::TrainingData;
use aimatrix_protocol::relay::{RelayConfig, RelayCore, RelayEvent};
use aimatrix_protocol::time::Millis;
use aimatrix_protocol::{testkit, Topic, Transmit};
use aimatrix_sandbox::ExecLimits;
use aimatrix_training::{StepInput, TrainingParamsExt, CHUNK_FILE, RESIDUAL_FILE, UPDATE_FILE};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use super::report::{Report, RoundRow};
use super::sandbox::Sandbox;
use super::{
    Attack, OnRound, TrainConfig, TrainError, NOISE_STD, REQUESTER, REWARD, SCALE, STEP_MS,
};
use crate::queue::EventQueue;

/// A core's refusal of a driver call, which the driver never expects.
fn core(e: impl std::fmt::Display) -> TrainError {
    TrainError::Core(e.to_string())
}

/// A message or a finished training step, due at a simulated instant.
enum Ev {
    ToRelay { from: Option<NodeId>, bytes: Vec<u8> },
    ToNode { node: usize, from: Option<NodeId>, bytes: Vec<u8> },
    Finish { node: usize, job: JobId, lease: u32, outcome: Outcome },
}

struct Node {
    core: NodeCore,
    online: bool,
    byzantine: bool,
    /// The node's error-feedback memory for the job (`residual.bin`).
    residual: Option<Vec<u8>>,
}

/// A round the relay closed: job, round, the model it started from, and the updates (node,
/// lease, result digest).
type ClosedRound = (JobId, u32, Digest, Vec<(NodeId, u32, Digest)>);

pub(super) struct World {
    now: Millis,
    start: Millis,
    rng: ChaCha8Rng,
    noise_rng: ChaCha8Rng,
    latency_ms: u64,
    drop_rate: f64,
    attack: Attack,
    queue: EventQueue<Ev>,
    relay: RelayCore,
    nodes: Vec<Node>,
    index: HashMap<NodeId, usize>,
    /// The relay's content store (and what nodes fetch from it), by digest.
    store: HashMap<Digest, Vec<u8>>,
    /// The ledger state machine the Studio relay ships, in memory.
    ledger: LedgerState,
    sandbox: Sandbox,
    spec: JobSpec,
    params: TrainingParams,
    holdout: Digest,
    param_count: usize,
    job: Option<JobId>,
    /// The digest of each lease's `update.bin`.
    update_of: HashMap<u32, Digest>,
    closed: Vec<ClosedRound>,
    round_participants: usize,
    dropped_in_round: usize,
    last_accepted: BTreeSet<NodeId>,
    leased: BTreeSet<usize>,
    rows: Vec<RoundRow>,
    /// Called with every aggregated round as it is recorded.
    on_round: OnRound,
    end: Option<String>,
    standby: u32,
    updates_paid: usize,
    reruns_paid: usize,
    /// The transfer ids of the re-runs this run's nodes did, to tell their pay from an update's.
    rerun_transfers: std::collections::BTreeSet<TransferId>,
    paid_not_accepted: usize,
    credits_paid: u64,
    credits_refunded: u64,
    rounds_failed: usize,
    leases_dropped: usize,
    relay_rejections: u64,
    seed: u64,
}

impl World {
    pub(super) fn new(
        config: &TrainConfig,
        train_set: &Dataset,
        test: &Dataset,
        on_round: OnRound,
    ) -> Result<Self, TrainError> {
        let standby = config.standby.unwrap_or_else(|| {
            (1.25 * config.drop_rate * f64::from(config.nodes) * f64::from(config.rounds)).ceil()
                as u32
        });
        let model = Model::init_with_dims(FEATURES, config.hidden, CLASSES, config.seed);
        let param_count = model.params.len();
        let (model, dataset, holdout) = (model.encode(), train_set.encode(), test.encode());
        let params = TrainingParams {
            model: ContentRef::Digest(Digest::of(&model)),
            dataset: ContentRef::Digest(Digest::of(&dataset)),
            participants: config.nodes,
            rounds: config.rounds,
            local_epochs: config.local_epochs,
            learning_rate: config.learning_rate,
            batch_size: config.batch_size,
            aggregation: config.aggregation,
            compression: config.compression,
            round_deadline_s: config.round_deadline_s,
            quorum: config.quorum.unwrap_or(config.nodes.div_ceil(2)),
            verify_share: config.verify_share,
            topk_fraction: config.topk_fraction,
            max_norm_ratio: config.max_norm_ratio,
            holdout: Some(ContentRef::Digest(Digest::of(&holdout))),
        };
        let prepared = aimatrix_training::prepare_data(&params, &model, &dataset, Some(&holdout))?;
        let mut spec = testkit::batch_spec(REWARD);
        spec.kind = JobKind::Training;
        spec.name = "digits".into();
        spec.workload.module =
            Some(ContentRef::Digest(Digest::of(aimatrix_workloads::TRAIN_STEP_WASM)));
        spec.workload.args = Vec::new();
        spec.limits.timeout_s = spec.limits.timeout_s.max(config.round_deadline_s);
        // Room for every round to run to its deadline and wait for joiners, twice over.
        spec.deadline_s = 2 * u64::from(config.rounds) * (config.round_deadline_s + 30) + 600;
        spec.training = Some(params.clone());
        spec.validate().map_err(|e| TrainError::Spec(e.to_string()))?;

        let mut store = HashMap::new();
        let mut put = |bytes: Vec<u8>| {
            let d = Digest::of(&bytes);
            store.insert(d, bytes);
            d
        };
        put(model);
        let chunks: Vec<Digest> = prepared.chunks.into_iter().map(&mut put).collect();
        let holdout = put(prepared.holdout);
        let relay_key = testkit::keypair(1_000_000);
        let relay = RelayCore::new(relay_key.clone(), RelayConfig::default(), config.seed);
        let mut nodes = Vec::new();
        let mut index = HashMap::new();
        for i in 0..config.nodes + standby {
            let cfg =
                NodeConfig { trusted_relays: vec![relay_key.public()], ..NodeConfig::default() };
            let core = NodeCore::new(
                testkit::keypair(u64::from(i)),
                cfg,
                testkit::profile(),
                config.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(i)),
            );
            index.insert(core.id(), i as usize);
            nodes.push(Node {
                core,
                online: i < config.nodes,
                byzantine: i < config.byzantine,
                residual: None,
            });
        }
        let mut world = Self {
            now: 1_000_000,
            start: 1_000_000,
            rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x0074_7261_696e),
            noise_rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x006e_6f69_7365),
            latency_ms: config.latency_ms,
            drop_rate: config.drop_rate,
            attack: config.attack,
            queue: EventQueue::new(),
            relay,
            nodes,
            index,
            store,
            ledger: LedgerState::new(),
            sandbox: Sandbox::new(config.wasm_cache.as_deref())?,
            params,
            holdout,
            param_count,
            job: None,
            update_of: HashMap::new(),
            closed: Vec::new(),
            round_participants: 0,
            dropped_in_round: 0,
            last_accepted: BTreeSet::new(),
            leased: BTreeSet::new(),
            rows: Vec::new(),
            on_round,
            end: None,
            standby,
            updates_paid: 0,
            reruns_paid: 0,
            rerun_transfers: Default::default(),
            paid_not_accepted: 0,
            credits_paid: 0,
            credits_refunded: 0,
            rounds_failed: 0,
            leases_dropped: 0,
            relay_rejections: 0,
            seed: config.seed,
            spec,
        };
        let amount = world.spec.escrow().unwrap_or(0);
        let mint = Op::Mint { id: 1, account: REQUESTER.into(), amount, memo: String::new() };
        world
            .ledger
            .apply(mint, &mut Vec::new())
            .map_err(|source| TrainError::Ledger { what: "the requester's credits", source })?;
        // Let the nodes advertise before the job is posted.
        world.step_timers();
        world.flush()?;
        let data = TrainingData { chunks, holdout };
        let job = world
            .relay
            .post_training_job(world.now, REQUESTER, world.spec.clone(), data)
            .map_err(|e| TrainError::Core(format!("posting the training job: {e}")))?;
        world.job = Some(job);
        world.flush()?;
        Ok(world)
    }

    /// Runs until the job ends and the messages in flight have arrived.
    pub(super) fn run(&mut self) -> Result<(), TrainError> {
        let give_up_at = self.now + 1000 * (self.spec.deadline_s + 3_600);
        while self.end.is_none() {
            if self.now > give_up_at {
                let at = self.elapsed_s();
                return Err(TrainError::Stalled(format!(
                    "the job did not end by its deadline (simulated {at} s)"
                )));
            }
            let next_timer = self.next_timer();
            if let Some((at, ev)) = self.queue.pop_until(next_timer.unwrap_or(Millis::MAX)) {
                self.now = self.now.max(at);
                self.deliver(ev)?;
            } else if let Some(at) = next_timer {
                self.now = self.now.max(at);
                self.step_timers();
            } else {
                let why = "nothing left to happen, and the job has not ended";
                return Err(TrainError::Stalled(why.to_owned()));
            }
            self.flush()?;
        }
        // Receipts and cancels still on the wire.
        while let Some((at, ev)) = self.queue.pop_until(Millis::MAX) {
            self.now = self.now.max(at);
            self.deliver(ev)?;
            self.flush()?;
        }
        Ok(())
    }

    fn elapsed_s(&self) -> f64 {
        (self.now - self.start) as f64 / 1000.0
    }

    fn next_timer(&self) -> Option<Millis> {
        let nodes = self.nodes.iter().filter(|n| n.online).filter_map(|n| n.core.poll_timeout());
        self.relay.poll_timeout().into_iter().chain(nodes).min()
    }

    fn step_timers(&mut self) {
        let now = self.now;
        if self.relay.poll_timeout().is_some_and(|t| t <= now) {
            self.relay.handle_timeout(now);
        }
        for n in self.nodes.iter_mut().filter(|n| n.online) {
            if n.core.poll_timeout().is_some_and(|t| t <= now) {
                n.core.handle_timeout(now);
            }
        }
    }

    fn link_delay(&mut self) -> Millis {
        self.latency_ms + self.rng.random_range(0..=self.latency_ms)
    }

    fn deliver(&mut self, ev: Ev) -> Result<(), TrainError> {
        let now = self.now;
        match ev {
            Ev::ToRelay { from, bytes } => self.relay.handle_message(now, from, &bytes),
            Ev::ToNode { node, from, bytes } => {
                if self.nodes[node].online {
                    self.nodes[node].core.handle_message(now, from, &bytes);
                }
            }
            Ev::Finish { node, job, lease, outcome } => {
                // Refused when the lease was cancelled meanwhile (the round deadline passed).
                let _ = self.nodes[node].core.finish(now, job, lease, outcome, Usage::default());
            }
        }
        Ok(())
    }

    /// Moves messages onto the wire and handles events until nothing moves; judges closed
    /// rounds.
    fn flush(&mut self) -> Result<(), TrainError> {
        loop {
            let mut moved = false;
            let relay_id = self.relay.id();
            while let Some(t) = self.relay.poll_transmit() {
                moved = true;
                match t {
                    Transmit::Broadcast { topic: Topic::Offers, bytes } => {
                        for node in 0..self.nodes.len() {
                            let at = self.now + self.link_delay();
                            let ev = Ev::ToNode { node, from: None, bytes: bytes.clone() };
                            self.queue.push(at, ev);
                        }
                    }
                    Transmit::Broadcast { .. } => {}
                    Transmit::Direct { to, bytes } => {
                        if let Some(&node) = self.index.get(&to) {
                            let at = self.now + self.link_delay();
                            self.queue.push(at, Ev::ToNode { node, from: Some(relay_id), bytes });
                        }
                    }
                }
            }
            for i in 0..self.nodes.len() {
                let id = self.nodes[i].core.id();
                while let Some(t) = self.nodes[i].core.poll_transmit() {
                    moved = true;
                    let from = match t {
                        Transmit::Direct { .. } => Some(id),
                        Transmit::Broadcast { .. } => None,
                    };
                    let at = self.now + self.link_delay();
                    self.queue.push(at, Ev::ToRelay { from, bytes: t.bytes().to_vec() });
                }
            }
            while let Some(e) = self.relay.poll_event() {
                moved = true;
                self.on_relay_event(e)?;
            }
            for i in 0..self.nodes.len() {
                while let Some(e) = self.nodes[i].core.poll_event() {
                    moved = true;
                    match e {
                        NodeEvent::RunJob { lease, .. } => self.start_step(i, &lease)?,
                        NodeEvent::Claimed { .. } | NodeEvent::ClaimDenied { .. } => {
                            tracing::debug!(node = i, at = self.now, "{e:?}");
                        }
                        _ => {}
                    }
                }
            }
            if let Some((job, round, model, updates)) = self.closed.pop() {
                moved = true;
                self.judge(job, round, model, &updates)?;
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn on_relay_event(&mut self, e: RelayEvent) -> Result<(), TrainError> {
        let now = self.now;
        match e {
            RelayEvent::Ledger(op) => {
                let result = self.ledger.apply_instruction(&op).map(|_| ());
                match &op {
                    LedgerOp::Reserve { job_id, .. } => match result {
                        Ok(()) => self.relay.reserve_confirmed(now, *job_id).map_err(core)?,
                        Err(e) => {
                            self.relay.reserve_failed(now, *job_id, e.to_string()).map_err(core)?;
                        }
                    },
                    LedgerOp::Pay { id, node, amount, fee, .. } => {
                        result
                            .map_err(|source| TrainError::Ledger { what: "a payment", source })?;
                        self.credits_paid += amount + fee;
                        if self.rerun_transfers.contains(id) {
                            self.reruns_paid += 1;
                        } else {
                            self.updates_paid += 1;
                            if !self.last_accepted.contains(node) {
                                self.paid_not_accepted += 1;
                            }
                        }
                    }
                    LedgerOp::Release { amount, .. } => {
                        result
                            .map_err(|source| TrainError::Ledger { what: "a release", source })?;
                        self.credits_refunded += amount;
                    }
                }
                let violations = self.ledger.violations();
                assert!(violations.is_empty(), "the ledger's invariants broke: {violations:?}");
            }
            RelayEvent::RoundStarted { participants, round, .. } => {
                tracing::debug!(round, at = now, "round started with {}", participants.len());
                self.round_participants = participants.len();
                for n in &mut self.nodes {
                    if !n.online {
                        n.online = true;
                        n.core.handle_timeout(now);
                    }
                }
            }
            RelayEvent::LeaseExpired { .. } => self.dropped_in_round += 1,
            RelayEvent::RoundClosed { job_id, round, model, updates } => {
                self.closed.push((job_id, round, model, updates));
            }
            RelayEvent::RoundFailed { round, reason, .. } => {
                self.rounds_failed += 1;
                self.dropped_in_round = 0;
                tracing::info!("round {round} failed: {reason}");
            }
            RelayEvent::JobCompleted { .. } => self.end = Some("completed".into()),
            RelayEvent::JobFailed { reason, .. } => self.end = Some(format!("failed: {reason}")),
            RelayEvent::JobRefused { reason, .. } => {
                self.end = Some(format!("refused: {reason}"));
            }
            RelayEvent::Rejected { reason, .. } => {
                self.relay_rejections += 1;
                tracing::warn!("the relay rejected a message: {reason}");
            }
            _ => {}
        }
        Ok(())
    }

    /// A node got a round's lease: it drops out, or runs the guest now and answers after the
    /// step's simulated duration.
    fn start_step(&mut self, i: usize, lease: &Lease) -> Result<(), TrainError> {
        let Some(round) = &lease.round else { return Ok(()) };
        self.leased.insert(i);
        if self.drop_rate > 0.0 && self.rng.random::<f64>() < self.drop_rate {
            self.leases_dropped += 1;
            return Ok(());
        }
        let node = &mut self.nodes[i];
        let plan = aimatrix_training::plan_step(lease, node.residual.is_some())
            .map_err(|e| TrainError::Broken(e.to_string()))?
            .ok_or_else(|| TrainError::Broken("a round's lease plans no step".to_owned()))?;
        let mut inputs: Vec<(&str, Vec<u8>)> = Vec::with_capacity(plan.inputs.len());
        for (name, input) in &plan.inputs {
            let bytes =
                match input {
                    StepInput::Content(d) => self.store.get(d).cloned().ok_or_else(|| {
                        TrainError::Broken(format!("the relay has no {name} {d}"))
                    })?,
                    StepInput::Residual => node.residual.clone().unwrap_or_default(),
                };
            inputs.push((name, bytes));
        }
        let byzantine = node.byzantine;
        if byzantine && self.attack == Attack::LabelFlip {
            for (name, bytes) in &mut inputs {
                if *name == CHUNK_FILE {
                    let data = Dataset::decode(bytes).map_err(|e| {
                        TrainError::Broken(format!("the chunk does not decode: {e}"))
                    })?;
                    *bytes = split::flip_labels(&data).encode();
                }
            }
        }
        if round.verify {
            let node = self.nodes[i].core.id();
            let parts: [&[u8]; 3] =
                [node.as_bytes(), &round.round.to_le_bytes(), &lease.lease.to_le_bytes()];
            self.rerun_transfers.insert(TransferId::derive(lease.job_id, "verify", &parts));
        }
        let inputs: Vec<(&str, &[u8])> = inputs.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        let limits = ExecLimits::from_spec(&lease.spec.limits);
        let outcome =
            match self.sandbox.run(&inputs, plan.args.clone(), plan.deterministic, limits)? {
                Err(why) => Outcome::Failed { reason: why },
                Ok(mut files) => {
                    let kept = files.remove(RESIDUAL_FILE);
                    if plan.keep_residual {
                        self.nodes[i].residual = kept;
                    }
                    let mut update = files.remove(UPDATE_FILE).ok_or_else(|| {
                        TrainError::Broken(format!("train-step wrote no {UPDATE_FILE}"))
                    })?;
                    if byzantine {
                        update = self.attack_update(&update)?;
                    }
                    let digest = Digest::of(&update);
                    let size_bytes = update.len() as u64;
                    self.store.insert(digest, update);
                    self.update_of.insert(lease.lease, digest);
                    let mut outputs: Vec<OutputDigest> = files
                        .iter()
                        .map(|(name, b)| OutputDigest {
                            name: name.clone(),
                            digest: Digest::of(b),
                            size_bytes: b.len() as u64,
                        })
                        .collect();
                    outputs.push(OutputDigest { name: UPDATE_FILE.into(), digest, size_bytes });
                    outputs.sort_by(|a, b| a.name.cmp(&b.name));
                    Outcome::succeeded(outputs)
                }
            };
        let at = self.now + STEP_MS + self.rng.random_range(0..=STEP_MS);
        let ev = Ev::Finish { node: i, job: lease.job_id, lease: lease.lease, outcome };
        self.queue.push(at, ev);
        Ok(())
    }

    /// What a Byzantine participant sends in place of its honest `update`.
    fn attack_update(&mut self, update: &[u8]) -> Result<Vec<u8>, TrainError> {
        let codec = self.params.codec();
        Ok(match self.attack {
            Attack::Scale => {
                let values = decompress(update, self.param_count)
                    .map_err(|e| TrainError::Broken(format!("the guest's {UPDATE_FILE}: {e}")))?;
                compress(codec, &values.iter().map(|x| x * SCALE).collect::<Vec<_>>())
            }
            Attack::Noise => {
                let values: Vec<f32> = (0..self.param_count)
                    .map(|_| NOISE_STD * gaussian(&mut self.noise_rng))
                    .collect();
                compress(codec, &values)
            }
            Attack::LabelFlip => update.to_vec(),
        })
    }

    /// Judges a closed round as the Studio relay does, and answers the core.
    fn judge(
        &mut self,
        job_id: JobId,
        round: u32,
        model: Digest,
        updates: &[(NodeId, u32, Digest)],
    ) -> Result<(), TrainError> {
        let missing = |what: &str| TrainError::Broken(format!("{what} is not stored"));
        let model_bytes = self.store.get(&model).ok_or_else(|| missing("the round's model"))?;
        let holdout = self.store.get(&self.holdout).ok_or_else(|| missing("the evaluation set"))?;
        let sent: Vec<(NodeId, Option<&Vec<u8>>)> = updates
            .iter()
            .map(|(node, lease, _)| {
                (*node, self.update_of.get(lease).and_then(|d| self.store.get(d)))
            })
            .collect();
        let judged = aimatrix_training::judge_round(&self.params, model_bytes, holdout, &sent)
            .map_err(|source| TrainError::Judge { round, source })?;
        let verdict = judged.verdict;
        self.store.insert(verdict.new_model, judged.model);
        let row = RoundRow {
            round,
            participants: self.round_participants,
            received: updates.len(),
            dropped: std::mem::take(&mut self.dropped_in_round),
            accepted: verdict.accepted.len(),
            rejected: verdict.rejected.len(),
            bytes: verdict.metrics.bytes_received,
            test_loss: verdict.metrics.loss,
            test_accuracy: verdict.metrics.accuracy,
        };
        (self.on_round)(&row);
        self.rows.push(row);
        self.last_accepted = verdict.accepted.iter().copied().collect();
        self.relay.round_aggregated(self.now, job_id, round, verdict).map_err(core)?;
        Ok(())
    }

    pub(super) fn report(&self, baseline_accuracy: f32) -> Report {
        let rows = &self.rows;
        let sum = |f: fn(&RoundRow) -> usize| rows.iter().map(f).sum::<usize>();
        let bytes: u64 = rows.iter().map(|r| r.bytes).sum();
        let received = sum(|r| r.received);
        let bytes_per_update = bytes as f64 / received.max(1) as f64;
        let raw_update_bytes = Codec::None.encoded_len(self.param_count);
        let escrow = self.spec.escrow().unwrap_or(0);
        Report {
            accuracy: rows.last().map_or(0.0, |r| r.test_accuracy),
            baseline_accuracy,
            rounds: rows.len(),
            bytes_per_round: bytes as f64 / rows.len().max(1) as f64,
            bytes_per_update,
            raw_update_bytes,
            compression_ratio: raw_update_bytes as f64 / bytes_per_update.max(1.0),
            rounds_to_96: rows.iter().find(|r| r.test_accuracy >= 0.96).map(|r| r.round + 1),
            final_loss: rows.last().map_or(0.0, |r| r.test_loss),
            job: self.end.clone().unwrap_or_else(|| "running".into()),
            nodes: self.params.participants,
            standby: self.standby,
            nodes_leased: self.leased.len(),
            byzantine: self.nodes.iter().filter(|n| n.byzantine).count() as u32,
            attack: self.attack,
            aggregation: self.params.aggregation,
            compression: self.params.compression,
            max_norm_ratio: self.params.max_norm_ratio,
            drop_rate: self.drop_rate,
            seed: self.seed,
            updates_received: received,
            updates_accepted: sum(|r| r.accepted),
            updates_rejected: sum(|r| r.rejected),
            updates_paid: self.updates_paid,
            reruns_paid: self.reruns_paid,
            paid_not_accepted: self.paid_not_accepted,
            leases_dropped: self.leases_dropped,
            rounds_failed: self.rounds_failed,
            credits_escrowed: escrow,
            credits_paid: self.credits_paid,
            credits_refunded: self.credits_refunded,
            escrow_balanced: self.ledger.held() == 0
                && self.credits_paid + self.credits_refunded == escrow
                && self.ledger.account(REQUESTER).available()
                    == i128::from(escrow - self.credits_paid),
            relay_rejections: self.relay_rejections,
            simulated_s: self.elapsed_s(),
            per_round: rows.clone(),
        }
    }
}

/// A standard normal sample (Box–Muller).
fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    // 1 - u is in (0, 1], so the logarithm is finite.
    let u1 = 1.0 - rng.random::<f64>();
    let u2 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
