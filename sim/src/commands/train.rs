//! `aimatrix-sim train`: one training job on the digits, run in-process over a simulated
//! network by the real cores, with every round's update computed by the real wasm guest.
//!
//! The driver is small and deterministic: one `RelayCore`, one `NodeCore` per node, a seeded
//! event queue whose messages arrive after a link latency, and a simulated clock. The relay's
//! job is posted with [`training::prepare_data`] on the digits training split and the test
//! split as its evaluation set (so the centralized baseline printed beside the result is
//! measured on the same images). Each lease runs the `train-step` guest in the wasmtime
//! sandbox in deterministic mode with the node's error-feedback memory, as a real node does;
//! each closed round is judged by [`training::judge_round`], as the Studio relay does.
//!
//! Byzantine participants (the first `--byzantine` nodes) alter what they send as the native
//! harness `aimatrix_digits::federated` does: the decoded update scaled by −10, Gaussian
//! noise, or the update of training on label-flipped data. A participant that drops out of a
//! round does not answer: its lease expires at the round deadline, the round closes with the
//! updates it has, and the relay excludes the node from the job. Standby nodes (`--standby`)
//! come online once round 0 has started and take the seats that exclusion frees.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aimatrix_digits::{baseline, split, CLASSES, FEATURES};
use aimatrix_mlp::{compress, decompress, Codec, Dataset, Model};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::job::{
    Aggregation, Compression, ContentRef, JobKind, JobSpec, TrainingParams,
};
use aimatrix_protocol::ledger::{LedgerOp, LedgerState, Op, TransferId};
use aimatrix_protocol::messages::{JobId, Lease, Outcome, OutputDigest, Usage};
use aimatrix_protocol::node::{NodeConfig, NodeCore, NodeEvent};
use aimatrix_protocol::relay::training::TrainingData;
use aimatrix_protocol::relay::{RelayConfig, RelayCore, RelayEvent};
use aimatrix_protocol::time::Millis;
use aimatrix_protocol::{testkit, Topic, Transmit};
use aimatrix_sandbox::wasm::{ModuleSource, WasmConfig, WasmExecutor};
use aimatrix_sandbox::{ExecLimits, ExecStatus, Executor, JobWorkload, PreparedJob, RunControl};
use aimatrix_training::{StepInput, TrainingParamsExt, CHUNK_FILE, RESIDUAL_FILE, UPDATE_FILE};
use anyhow::{bail, Context};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

#[path = "../queue.rs"]
mod queue;
use queue::EventQueue;

const REQUESTER: &str = "digits-requester";
/// Credits paid per accepted update.
const REWARD: u64 = 10;
/// Simulated time a training step takes on a node: this, plus up to as much again.
const STEP_MS: u64 = 2_000;

/// Runs a training job on the digits over the simulated network and prints each round
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TrainArgs {
    /// Participant seats (and nodes online from the start)
    #[arg(long, default_value_t = 10)]
    nodes: u32,
    /// Nodes that come online once round 0 has started and fill the seats of excluded
    /// participants (default: enough for the drop rate, 1.25 × drop-rate × nodes × rounds)
    #[arg(long)]
    standby: Option<u32>,
    /// Training rounds
    #[arg(long, default_value_t = 50)]
    rounds: u32,
    /// Local epochs per round
    #[arg(long, default_value_t = 5)]
    local_epochs: u32,
    /// Local SGD learning rate
    #[arg(long, default_value_t = 0.1)]
    learning_rate: f64,
    /// Local mini-batch size
    #[arg(long, default_value_t = 16)]
    batch_size: u32,
    /// Hidden units of the MLP
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Aggregation rule: mean, median, trimmed_mean, centered_clip
    #[arg(long, default_value = "centered_clip", value_parser = parse_aggregation)]
    aggregation: Aggregation,
    /// Update compression: none, fp16, int8, topk (with error feedback)
    #[arg(long, default_value = "none", value_parser = parse_compression)]
    compression: Compression,
    /// Share of the values topk sends
    #[arg(long, default_value_t = 0.01)]
    topk_fraction: f64,
    /// Reject an update whose norm is above this times the round's median (0: no check)
    #[arg(long, default_value_t = 4.0)]
    max_norm_ratio: f64,
    /// Updates a round needs to close (default: half the seats)
    #[arg(long)]
    quorum: Option<u32>,
    /// Share of each round's updates re-run on another participant (a different delta
    /// digest voids the update)
    #[arg(long, default_value_t = 0.0)]
    verify_share: f64,
    /// Byzantine participants: the first K nodes
    #[arg(long, default_value_t = 0)]
    byzantine: u32,
    /// What Byzantine participants send: scale (update × −10), noise (σ = 1), label_flip
    #[arg(long, value_enum, default_value_t = Attack::Scale)]
    attack: Attack,
    /// Probability that a participant drops out of a round (does not answer)
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Round deadline, in simulated seconds
    #[arg(long, default_value_t = 60)]
    round_deadline_s: u64,
    /// One-way link latency, in simulated milliseconds (plus up to as much again)
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Seed of everything random: the initial model, latencies, drop-outs, noise
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for the compiled-module cache (default: in memory, compiled once per run)
    #[arg(long)]
    wasm_cache: Option<PathBuf>,
    /// Print one JSON object instead of the table
    #[arg(long)]
    json: bool,
}

/// What a Byzantine participant sends instead of its honest update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Attack {
    /// Its honest update scaled by −10.
    Scale,
    /// Gaussian noise, σ = 1 per coordinate.
    Noise,
    /// The update of honest training on its chunk with every label `l` replaced by `9 − l`.
    #[value(name = "label_flip")]
    LabelFlip,
}

const SCALE: f32 = -10.0;
const NOISE_STD: f32 = aimatrix_digits::federated::DEFAULT_NOISE_STD;

fn parse_aggregation(s: &str) -> Result<Aggregation, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?}: expected mean, median, trimmed_mean or centered_clip"))
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("{s:?}: expected none, fp16, int8 or topk"))
}

/// One aggregated round.
#[derive(Debug, Clone, Serialize)]
struct RoundRow {
    round: u32,
    participants: usize,
    received: usize,
    dropped: usize,
    accepted: usize,
    rejected: usize,
    bytes: u64,
    test_loss: f32,
    test_accuracy: f32,
}

/// The run, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Report {
    /// Test accuracy of the final model, 0 to 1.
    accuracy: f32,
    /// Test accuracy of the centralized baseline (same model, `train`, 100 epochs).
    baseline_accuracy: f32,
    rounds: usize,
    bytes_per_round: f64,
    bytes_per_update: f64,
    raw_update_bytes: usize,
    compression_ratio: f64,
    rounds_to_96: Option<u32>,
    final_loss: f32,
    job: String,
    nodes: u32,
    standby: u32,
    nodes_leased: usize,
    byzantine: u32,
    attack: Attack,
    aggregation: Aggregation,
    compression: Compression,
    max_norm_ratio: f64,
    drop_rate: f64,
    seed: u64,
    updates_received: usize,
    updates_accepted: usize,
    updates_rejected: usize,
    updates_paid: usize,
    /// Verifying re-runs paid (`--verify-share`).
    reruns_paid: usize,
    paid_not_accepted: usize,
    leases_dropped: usize,
    rounds_failed: usize,
    credits_escrowed: u64,
    credits_paid: u64,
    credits_refunded: u64,
    escrow_balanced: bool,
    relay_rejections: u64,
    simulated_s: f64,
    per_round: Vec<RoundRow>,
}

pub(crate) fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    check(&args)?;
    let (train_set, test) = split::train_test();
    let base = baseline::centralized(
        &baseline::BaselineConfig {
            hidden: args.hidden,
            learning_rate: args.learning_rate as f32,
            batch_size: args.batch_size,
            model_seed: args.seed,
            ..baseline::BaselineConfig::default()
        },
        &train_set,
        &test,
    );
    let mut world = World::new(&args, &train_set, &test)?;
    if !args.json {
        println!(
            "{:>5} {:>6} {:>8} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9}",
            "round",
            "seats",
            "received",
            "dropped",
            "accepted",
            "rejected",
            "bytes",
            "test loss",
            "test acc"
        );
    }
    world.run()?;
    let report = world.report(base.test_accuracy);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_summary(&report);
    }
    Ok(if report.job == "completed" { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn check(args: &TrainArgs) -> anyhow::Result<()> {
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if args.byzantine > args.nodes {
        bail!("--byzantine ({}) is more than --nodes ({})", args.byzantine, args.nodes);
    }
    if !(0.0..1.0).contains(&args.drop_rate) {
        bail!("--drop-rate must be at least 0 and below 1, got {}", args.drop_rate);
    }
    if !(1..=4096).contains(&args.hidden) {
        bail!("--hidden must be between 1 and 4096, got {}", args.hidden);
    }
    Ok(())
}

fn print_summary(r: &Report) {
    println!();
    println!(
        "final test accuracy {:.2} % after {} rounds (centralized baseline {:.2} %, {:+.2} points)",
        100.0 * r.accuracy,
        r.rounds,
        100.0 * r.baseline_accuracy,
        100.0 * (r.accuracy - r.baseline_accuracy)
    );
    let to_96 = r.rounds_to_96.map_or("never".to_owned(), |n| format!("at round {n}"));
    println!("96 % reached {to_96}; final test loss {:.4}", r.final_loss);
    println!(
        "update bytes: {:.0} per round, {:.0} per update ({:.2}x fewer than {} raw)",
        r.bytes_per_round, r.bytes_per_update, r.compression_ratio, r.raw_update_bytes
    );
    println!(
        "updates: {} received, {} accepted, {} rejected, {} paid; {} re-runs paid; {} leases \
         dropped; {} rounds failed",
        r.updates_received,
        r.updates_accepted,
        r.updates_rejected,
        r.updates_paid,
        r.reruns_paid,
        r.leases_dropped,
        r.rounds_failed
    );
    println!(
        "credits: {} escrowed, {} paid, {} refunded, escrow {}",
        r.credits_escrowed,
        r.credits_paid,
        r.credits_refunded,
        if r.escrow_balanced { "balanced" } else { "NOT balanced" }
    );
    println!(
        "job {}; {} nodes took leases; {:.0} simulated seconds",
        r.job, r.nodes_leased, r.simulated_s
    );
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

/// The guest and the sandbox it runs in.
struct Sandbox {
    runtime: tokio::runtime::Runtime,
    executor: WasmExecutor,
    module: ModuleSource,
    work_dir: PathBuf,
}

impl Sandbox {
    fn new(cache: Option<&Path>) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let cfg = cache.map_or_else(WasmConfig::in_memory, WasmConfig::in_dir);
        let executor = WasmExecutor::new(cfg)?;
        let module = ModuleSource::new("train-step.wasm", aimatrix_workloads::TRAIN_STEP_WASM);
        let work_dir =
            std::env::temp_dir().join(format!("aimatrix-sim-train-{}", std::process::id()));
        Ok(Self { runtime, executor, module, work_dir })
    }

    /// Runs the guest on `inputs` and returns its outputs by name (or why it failed).
    fn run(
        &self,
        inputs: &[(&str, &[u8])],
        args: Vec<String>,
        limits: ExecLimits,
    ) -> anyhow::Result<Result<HashMap<String, Vec<u8>>, String>> {
        let _ = std::fs::remove_dir_all(&self.work_dir);
        let inputs_dir = self.work_dir.join(aimatrix_sandbox::INPUTS_DIR);
        std::fs::create_dir_all(&inputs_dir)
            .with_context(|| format!("cannot create {}", inputs_dir.display()))?;
        for (name, bytes) in inputs {
            std::fs::write(inputs_dir.join(name), bytes)?;
        }
        let mut job =
            PreparedJob::new(JobWorkload::Wasm(self.module.clone()), &self.work_dir, limits);
        job.args = args;
        job.deterministic = true;
        let exec = self.runtime.block_on(self.executor.run(job, RunControl::default()))?;
        if exec.status != ExecStatus::Succeeded {
            let stderr = String::from_utf8_lossy(&exec.stderr);
            return Ok(Err(format!("{}: {}", exec.status, stderr.trim())));
        }
        let outputs_dir = self.work_dir.join(aimatrix_sandbox::OUTPUTS_DIR);
        let mut files = HashMap::new();
        for f in &exec.outputs {
            files.insert(f.name.clone(), std::fs::read(outputs_dir.join(&f.name))?);
        }
        Ok(Ok(files))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// A round the relay closed: job, round, the model it started from, and the updates (node,
/// lease, result digest).
type ClosedRound = (JobId, u32, Digest, Vec<(NodeId, u32, Digest)>);

struct World {
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
    print_rows: bool,
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
    fn new(args: &TrainArgs, train_set: &Dataset, test: &Dataset) -> anyhow::Result<Self> {
        let standby = args.standby.unwrap_or_else(|| {
            (1.25 * args.drop_rate * f64::from(args.nodes) * f64::from(args.rounds)).ceil() as u32
        });
        let model = Model::init_with_dims(FEATURES, args.hidden, CLASSES, args.seed);
        let param_count = model.params.len();
        let (model, dataset, holdout) = (model.encode(), train_set.encode(), test.encode());
        let params = TrainingParams {
            model: ContentRef::Digest(Digest::of(&model)),
            dataset: ContentRef::Digest(Digest::of(&dataset)),
            participants: args.nodes,
            rounds: args.rounds,
            local_epochs: args.local_epochs,
            learning_rate: args.learning_rate,
            batch_size: args.batch_size,
            aggregation: args.aggregation,
            compression: args.compression,
            round_deadline_s: args.round_deadline_s,
            quorum: args.quorum.unwrap_or(args.nodes.div_ceil(2)),
            verify_share: args.verify_share,
            topk_fraction: args.topk_fraction,
            max_norm_ratio: args.max_norm_ratio,
            holdout: Some(ContentRef::Digest(Digest::of(&holdout))),
        };
        let prepared = aimatrix_training::prepare_data(&params, &model, &dataset, Some(&holdout))?;
        let mut spec = testkit::batch_spec(REWARD);
        spec.kind = JobKind::Training;
        spec.name = "digits".into();
        spec.workload.module =
            Some(ContentRef::Digest(Digest::of(aimatrix_workloads::TRAIN_STEP_WASM)));
        spec.workload.args = Vec::new();
        spec.limits.timeout_s = spec.limits.timeout_s.max(args.round_deadline_s);
        // Room for every round to run to its deadline and wait for joiners, twice over.
        spec.deadline_s = 2 * u64::from(args.rounds) * (args.round_deadline_s + 30) + 600;
        spec.training = Some(params.clone());
        spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;

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
        let relay = RelayCore::new(relay_key.clone(), RelayConfig::default(), args.seed);
        let mut nodes = Vec::new();
        let mut index = HashMap::new();
        for i in 0..args.nodes + standby {
            let cfg =
                NodeConfig { trusted_relays: vec![relay_key.public()], ..NodeConfig::default() };
            let core = NodeCore::new(
                testkit::keypair(u64::from(i)),
                cfg,
                testkit::profile(),
                args.seed.wrapping_mul(1_000_003).wrapping_add(u64::from(i)),
            );
            index.insert(core.id(), i as usize);
            nodes.push(Node {
                core,
                online: i < args.nodes,
                byzantine: i < args.byzantine,
                residual: None,
            });
        }
        let mut world = Self {
            now: 1_000_000,
            start: 1_000_000,
            rng: ChaCha8Rng::seed_from_u64(args.seed ^ 0x0074_7261_696e),
            noise_rng: ChaCha8Rng::seed_from_u64(args.seed ^ 0x006e_6f69_7365),
            latency_ms: args.latency_ms,
            drop_rate: args.drop_rate,
            attack: args.attack,
            queue: EventQueue::new(),
            relay,
            nodes,
            index,
            store,
            ledger: LedgerState::new(),
            sandbox: Sandbox::new(args.wasm_cache.as_deref())?,
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
            print_rows: !args.json,
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
            seed: args.seed,
            spec,
        };
        let amount = world.spec.escrow().unwrap_or(0);
        let mint = Op::Mint { id: 1, account: REQUESTER.into(), amount, memo: String::new() };
        world.ledger.apply(mint, &mut Vec::new()).context("minting the requester's credits")?;
        // Let the nodes advertise before the job is posted.
        world.step_timers();
        world.flush()?;
        let data = TrainingData { chunks, holdout };
        let job = world
            .relay
            .post_training_job(world.now, REQUESTER, world.spec.clone(), data)
            .map_err(|e| anyhow::anyhow!("posting the training job: {e}"))?;
        world.job = Some(job);
        world.flush()?;
        Ok(world)
    }

    /// Runs until the job ends and the messages in flight have arrived.
    fn run(&mut self) -> anyhow::Result<()> {
        let give_up_at = self.now + 1000 * (self.spec.deadline_s + 3_600);
        while self.end.is_none() {
            if self.now > give_up_at {
                bail!("the job did not end by its deadline (simulated {} s)", self.elapsed_s());
            }
            let next_timer = self.next_timer();
            if let Some((at, ev)) = self.queue.pop_until(next_timer.unwrap_or(Millis::MAX)) {
                self.now = self.now.max(at);
                self.deliver(ev)?;
            } else if let Some(at) = next_timer {
                self.now = self.now.max(at);
                self.step_timers();
            } else {
                bail!("nothing left to happen, and the job has not ended");
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

    fn deliver(&mut self, ev: Ev) -> anyhow::Result<()> {
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
    fn flush(&mut self) -> anyhow::Result<()> {
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

    fn on_relay_event(&mut self, e: RelayEvent) -> anyhow::Result<()> {
        let now = self.now;
        match e {
            RelayEvent::Ledger(op) => {
                let result = self.ledger.apply_instruction(&op).map(|_| ());
                match &op {
                    LedgerOp::Reserve { job_id, .. } => match result {
                        Ok(()) => self.relay.reserve_confirmed(now, *job_id)?,
                        Err(e) => self.relay.reserve_failed(now, *job_id, e.to_string())?,
                    },
                    LedgerOp::Pay { id, node, amount, fee, .. } => {
                        result.context("the ledger refused a payment")?;
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
                        result.context("the ledger refused a release")?;
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
    fn start_step(&mut self, i: usize, lease: &Lease) -> anyhow::Result<()> {
        let Some(round) = &lease.round else { return Ok(()) };
        self.leased.insert(i);
        if self.drop_rate > 0.0 && self.rng.random::<f64>() < self.drop_rate {
            self.leases_dropped += 1;
            return Ok(());
        }
        let node = &mut self.nodes[i];
        let plan = aimatrix_training::plan_step(lease, node.residual.is_some())?
            .context("a training round's lease plans a step")?;
        let mut inputs: Vec<(&str, Vec<u8>)> = Vec::with_capacity(plan.inputs.len());
        for (name, input) in &plan.inputs {
            let bytes = match input {
                StepInput::Content(d) => self
                    .store
                    .get(d)
                    .cloned()
                    .with_context(|| format!("the relay has no {name} {d}"))?,
                StepInput::Residual => node.residual.clone().unwrap_or_default(),
            };
            inputs.push((name, bytes));
        }
        let byzantine = node.byzantine;
        if byzantine && self.attack == Attack::LabelFlip {
            for (name, bytes) in &mut inputs {
                if *name == CHUNK_FILE {
                    let data = Dataset::decode(bytes).context("the chunk does not decode")?;
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
        let outcome = match self.sandbox.run(&inputs, plan.args.clone(), limits)? {
            Err(why) => Outcome::Failed { reason: why },
            Ok(mut files) => {
                let kept = files.remove(RESIDUAL_FILE);
                if plan.keep_residual {
                    self.nodes[i].residual = kept;
                }
                let mut update =
                    files.remove(UPDATE_FILE).context("train-step wrote no update.bin")?;
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
    fn attack_update(&mut self, update: &[u8]) -> anyhow::Result<Vec<u8>> {
        let codec = self.params.codec();
        Ok(match self.attack {
            Attack::Scale => {
                let values =
                    decompress(update, self.param_count).context("the guest's update.bin")?;
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
    ) -> anyhow::Result<()> {
        let model_bytes = self.store.get(&model).context("the round's model is not stored")?;
        let holdout = self.store.get(&self.holdout).context("the evaluation set is not stored")?;
        let sent: Vec<(NodeId, Option<&Vec<u8>>)> = updates
            .iter()
            .map(|(node, lease, _)| {
                (*node, self.update_of.get(lease).and_then(|d| self.store.get(d)))
            })
            .collect();
        let judged = aimatrix_training::judge_round(&self.params, model_bytes, holdout, &sent)
            .with_context(|| format!("judging round {round}"))?;
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
        if self.print_rows {
            println!(
                "{:>5} {:>6} {:>8} {:>7} {:>8} {:>8} {:>9} {:>9.4} {:>8.2}%",
                row.round,
                row.participants,
                row.received,
                row.dropped,
                row.accepted,
                row.rejected,
                row.bytes,
                row.test_loss,
                100.0 * row.test_accuracy
            );
        }
        self.rows.push(row);
        self.last_accepted = verdict.accepted.iter().copied().collect();
        self.relay.round_aggregated(self.now, job_id, round, verdict)?;
        Ok(())
    }

    fn report(&self, baseline_accuracy: f32) -> Report {
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
