//! The simulation: one clock, one event queue, one seeded RNG, the real protocol cores, a
//! network model between them, simulated execution, and the ledger.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use aimatrix_protocol::capability::{CapabilityProfile, GpuInfo, GpuVendor, GIB};
use aimatrix_protocol::envelope::{SignatureMemo, VerifyConfig};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::ledger::{LedgerState, Op, FEE_ACCOUNT};
use aimatrix_protocol::messages::{JobId, OfferMemo, Outcome, RosterEntry, Usage};
use aimatrix_protocol::node::{NodeConfig, NodeCore};
use aimatrix_protocol::relay::{RelayConfig, RelayCore};
use aimatrix_protocol::time::Millis;
use aimatrix_protocol::{testkit, Topic, Transmit};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use crate::invariants::{self, Invariant, Violation};
use crate::queue::EventQueue;
use crate::scenario::{GossipMode, Scenario};
use crate::stats::{Percentiles, Sample, Series, Summary};

mod faults;
mod gossip;
mod jobs;
mod kad;
mod peers;

use gossip::Overlay;
use peers::PeerSlot;

/// The simulated epoch: 2025-01-01T00:00:00Z, so envelope timestamps look real.
const EPOCH_MS: Millis = 1_735_689_600_000;
/// How often jobs are swept for the "no job lost" invariant.
const SWEEP_INTERVAL_MS: u64 = 60_000;
/// Time the relay's timer may lag a job deadline before the job counts as lost.
const DEADLINE_SLACK_MS: u64 = 2_000;
/// Offer propagation is histogrammed per ms up to this bound (later arrivals land in the last bucket).
const PROPAGATION_BUCKETS: usize = 60_001;
/// Replay-cache entries a relay keeps per node: about two live adverts each, and the node's
/// claims, progress reports and results, with room to spare.
const RELAY_REPLAY_ENTRIES_PER_NODE: usize = 4;
/// Signature verdicts remembered across simulated receivers.
const SIGNATURE_MEMO_CAPACITY: usize = 1 << 16;
/// Decoded offers remembered across simulated receivers (an offer reaches every node within a
/// few heartbeats; a few hundred are announced per simulated hour).
const OFFER_MEMO_CAPACITY: usize = 1 << 12;

/// How often the run samples its time series (and reports progress).
const SAMPLE_INTERVAL_MS: u64 = 10_000;

/// A core that receives messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Endpoint {
    Relay(u32),
    Node(u32),
}

/// How a node behaves when it runs a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Honest,
    /// Returns wrong results and wrong training updates.
    Byzantine,
    /// Never returns a result.
    Withholding,
}

/// What a delivered copy is, for the statistics and checks it feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carried {
    /// Any message.
    Plain,
    /// An offer (its arrival feeds the propagation histogram).
    Offer,
    /// A forged or replayed envelope a Byzantine node sent: the receiver must reject it.
    Forged,
}

enum Event {
    Deliver {
        to: Endpoint,
        from: Option<Endpoint>,
        sent_at: Millis,
        carried: Carried,
        bytes: Rc<[u8]>,
    },
    Timer {
        to: Endpoint,
    },
    Finish {
        node: u32,
        incarnation: u32,
        job: JobId,
        lease: u32,
        outcome: Box<Outcome>,
    },
    Post,
    Crash,
    Restart {
        node: u32,
    },
    Sweep,
    Sample,
    /// The gossipsub heartbeat (mesh repair, IHAVE accounting), one for the whole network.
    Heartbeat,
    /// A node's peer set has something to do.
    PeerTimer {
        node: u32,
        incarnation: u32,
    },
    /// A dial between two nodes completed its handshake.
    Connected {
        from: u32,
        to: u32,
        from_incarnation: u32,
        to_incarnation: u32,
    },
    /// A dial reached a host whose node was not running.
    DialRefused {
        from: u32,
        to: u32,
        from_incarnation: u32,
    },
    PartitionStart {
        share: f64,
        duration_ms: u64,
    },
    PartitionEnd,
    RandomPartition,
    Forge,
}

struct RelaySlot {
    core: RelayCore,
    timer_at: Option<Millis>,
    access_ms: u64,
    /// When its uplink has sent everything queued so far, µs.
    uplink_free_us: u64,
}

struct NodeSlot {
    /// Boxed: a propagation reads the driver's fields below (up, cut, access delay, uplink)
    /// for every node it crosses; apart from the core, the slots of all nodes stay compact.
    core: Box<NodeCore>,
    up: bool,
    incarnation: u32,
    behaviour: Behaviour,
    class: usize,
    timer_at: Option<Millis>,
    access_ms: u64,
    /// When its uplink has sent everything queued so far, µs.
    uplink_free_us: u64,
    /// On the far side of the current partition.
    cut: bool,
    /// Started (connected to its relay, its peer set running) since it last came up.
    started: bool,
    /// The relays it is connected to, one bit each.
    relay_links: u64,
}

/// What the driver remembers of a job it posted.
struct PostedJob {
    relay: u32,
    class: usize,
    posted_at: Millis,
    first_lease_at: Option<Millis>,
    ended: bool,
}

/// One deterministic run of a scenario.
pub struct Sim {
    sc: Scenario,
    rng: ChaCha8Rng,
    now: Millis,
    end: Millis,
    step: u64,
    queue: EventQueue<Event>,
    relays: Vec<RelaySlot>,
    nodes: Vec<NodeSlot>,
    /// Each node's peer set (apart from the slots a propagation reads).
    peers: Vec<PeerSlot>,
    ids: HashMap<NodeId, Endpoint>,
    /// The nodes' configuration but for `trusted_relays` (each is given one relay).
    node_cfg: NodeConfig,
    /// The ledger state machine the Studio relay ships, in memory.
    ledger: LedgerState,
    accounts: BTreeSet<String>,
    minted: u64,
    jobs: BTreeMap<JobId, PostedJob>,
    /// Training: the honest update digest of each running lease, by (job, lease).
    expected_updates: HashMap<(JobId, u32), Digest>,
    /// Training: the nodes whose updates the last aggregation of a job accepted.
    last_accepted: HashMap<JobId, Vec<NodeId>>,
    violation: Option<Violation>,
    summary: Summary,
    assign_ms: Vec<u64>,
    complete_ms: Vec<u64>,
    propagation: Vec<u64>,
    overlay: Overlay,
    /// A partition is in force (nodes with `cut` are unreachable from the rest).
    partitioned: bool,
    nodes_up: u32,
    /// Rejections reported by cores so far (forged deliveries must add one).
    rejections: u64,
    /// The latest offer published and the latest direct message a node sent a relay: the
    /// material Byzantine nodes forge and replay.
    last_offer: Option<Rc<[u8]>>,
    last_to_relay: Option<(u32, u32, Rc<[u8]>)>,
    series: Series,
}

/// A run's summary and its time series.
pub struct Report {
    /// The summary (byte-identical for a seed and scenario).
    pub summary: Summary,
    /// Samples, latencies and the propagation histogram, for CSV files and plots.
    pub series: Series,
}

impl Sim {
    /// Builds the network of `sc`: relays, nodes drawn from the hardware mix, the ledger.
    pub fn new(sc: Scenario) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(sc.seed);
        let mut relays = Vec::new();
        let mut ids = HashMap::new();
        // A relay sized for its network: room for every node's advert, and replay caches
        // above the envelopes they must remember at once. Each node's adverts live twice the
        // advert interval (plus the clock-skew tolerance), so about two per node are live; with
        // the default capacity (100,000) the relay's advert cache fills past 50,000 nodes and
        // then refuses adverts expiring before the ones it evicted (late or reordered copies).
        // Before adverts had a cache of their own, a full cache refused every claim and result.
        let defaults = RelayConfig::default();
        let relay_cfg = RelayConfig {
            max_adverts: defaults.max_adverts.max(sc.nodes as usize * 2),
            verify: VerifyConfig {
                replay_cache_capacity: defaults
                    .verify
                    .replay_cache_capacity
                    .max(sc.nodes as usize * RELAY_REPLAY_ENTRIES_PER_NODE),
                ..defaults.verify
            },
            ..defaults
        };
        for r in 0..sc.relays {
            let core =
                RelayCore::new(testkit::keypair(1 << 40 | u64::from(r)), relay_cfg, rng.random());
            ids.insert(core.id(), Endpoint::Relay(r));
            let access_ms = rng.random_range(0..=sc.network.access_ms_max);
            relays.push(RelaySlot { core, timer_at: None, access_ms, uplink_free_us: 0 });
        }
        // Each relay vouches for the others, as `studio-relay serve --peer` makes it do.
        if relays.len() > 1 {
            let entries: Vec<RosterEntry> = relays
                .iter()
                .enumerate()
                .map(|(r, slot)| RosterEntry {
                    relay: slot.core.id(),
                    addrs: vec![format!("/ip4/10.0.0.{}/tcp/7000", r + 1)],
                })
                .collect();
            for (r, slot) in relays.iter_mut().enumerate() {
                let others = entries.iter().enumerate().filter(|(o, _)| *o != r);
                let roster = others.map(|(_, e)| e.clone()).collect();
                if let Err(e) = slot.core.set_roster(EPOCH_MS, roster) {
                    panic!("the simulated roster is within bounds: {e}");
                }
            }
        }
        let node_cfg = NodeConfig::default();
        let weights: Vec<u32> = sc.hardware.iter().map(|h| h.weight).collect();
        let mut nodes = Vec::new();
        let mut peers = Vec::new();
        for i in 0..sc.nodes {
            let class = pick(&mut rng, &weights);
            let roll: f64 = rng.random();
            let behaviour = if roll < sc.faults.byzantine_share {
                Behaviour::Byzantine
            } else if roll < sc.faults.byzantine_share + sc.faults.withholding_share {
                Behaviour::Withholding
            } else {
                Behaviour::Honest
            };
            let core = NodeCore::new(
                testkit::keypair(u64::from(i)),
                node_config(&node_cfg, &relays, i),
                profile_of(&sc, class),
                rng.random(),
            );
            ids.insert(core.id(), Endpoint::Node(i));
            peers.push(PeerSlot::new(core.id(), sc.network.node_peers as usize, rng.random()));
            let access_ms = rng.random_range(0..=sc.network.access_ms_max);
            nodes.push(NodeSlot {
                core: Box::new(core),
                up: true,
                incarnation: 0,
                behaviour,
                class,
                timer_at: None,
                access_ms,
                uplink_free_us: 0,
                cut: false,
                started: false,
                relay_links: 0,
            });
        }
        let mut ledger = LedgerState::new();
        let mut accounts = BTreeSet::from([FEE_ACCOUNT.to_owned()]);
        let mut minted = 0;
        for r in 0..sc.relays {
            let account = requester(r);
            let amount = sc.workload.requester_funds;
            let mint = Op::Mint {
                id: u128::from(r),
                account: account.clone(),
                amount,
                memo: String::new(),
            };
            if let Err(e) = ledger.apply(mint, &mut Vec::new()) {
                panic!("minting the requester's funds: {e}");
            }
            minted += sc.workload.requester_funds;
            accounts.insert(account);
        }
        for n in &nodes {
            accounts.insert(n.core.id().account_name());
        }
        let summary = Summary {
            scenario: sc.name.clone(),
            seed: sc.seed,
            nodes: sc.nodes,
            relays: sc.relays,
            duration_s: sc.duration_s,
            ..Summary::default()
        };
        let dht_keys = nodes.iter().map(|n| kad::key_of(n.core.id().as_bytes())).collect();
        let overlay = Overlay::new(&sc, dht_keys, &mut rng);
        let mut sim = Self {
            overlay,
            partitioned: false,
            nodes_up: sc.nodes,
            rejections: 0,
            last_offer: None,
            last_to_relay: None,
            series: Series::default(),
            now: EPOCH_MS,
            end: EPOCH_MS + sc.duration_s * 1000,
            sc,
            rng,
            step: 0,
            queue: EventQueue::new(),
            relays,
            nodes,
            peers,
            ids,
            node_cfg,
            ledger,
            accounts,
            minted,
            jobs: BTreeMap::new(),
            expected_updates: HashMap::new(),
            last_accepted: HashMap::new(),
            violation: None,
            summary,
            assign_ms: Vec::new(),
            complete_ms: Vec::new(),
            propagation: vec![0; PROPAGATION_BUCKETS],
        };
        // Relays' first messages (their rosters) go out at once; they reach no node yet.
        for r in 0..sim.relays.len() as u32 {
            sim.drain(Endpoint::Relay(r));
        }
        // Nodes start over the first minute, so their adverts are not one burst.
        for i in 0..sim.nodes.len() {
            let at = EPOCH_MS + sim.rng.random_range(0..60_000);
            sim.nodes[i].timer_at = Some(at);
            sim.queue.push(at, Event::Timer { to: Endpoint::Node(i as u32) });
        }
        sim.schedule_next_post();
        sim.schedule_next_crash();
        sim.queue.push(EPOCH_MS + SWEEP_INTERVAL_MS, Event::Sweep);
        sim.queue.push(EPOCH_MS, Event::Sample);
        if sim.sc.network.gossip == GossipMode::Gossipsub {
            sim.queue.push(EPOCH_MS + sim.sc.network.gossipsub.heartbeat_ms, Event::Heartbeat);
        }
        sim.schedule_faults();
        sim
    }

    /// Runs to the scenario's end (or the first violated invariant) and reports.
    pub fn run(self) -> Summary {
        self.run_with_progress(&mut |_, _| {}).summary
    }

    /// Runs like [`Sim::run`], calling `progress(simulated_ms, total_ms)` every simulated
    /// 10 s, and returns the time series too.
    pub fn run_with_progress(mut self, progress: &mut dyn FnMut(u64, u64)) -> Report {
        // Every simulated receiver of an offer gets the same bytes; each still decodes and
        // verifies them with its own verifier, but the ed25519 check runs once per envelope.
        let memo = SignatureMemo::install(SIGNATURE_MEMO_CAPACITY);
        // Likewise each offer's bytes are decoded once, and its receivers share the decoded
        // offer: every core still verifies and judges it with its own state.
        let _offers = OfferMemo::install(OFFER_MEMO_CAPACITY);
        let total_ms = self.end - EPOCH_MS;
        while let Some((at, event)) = self.queue.pop_until(self.end) {
            self.now = at;
            self.step += 1;
            if matches!(event, Event::Sample) {
                progress(at - EPOCH_MS, total_ms);
            }
            self.handle(event);
            if self.violation.is_some() {
                break;
            }
        }
        if self.violation.is_none() {
            self.now = self.now.max(self.end.min(self.now));
            self.sweep();
        }
        progress(total_ms, total_ms);
        self.summary.messages.signatures_checked = memo.stats().misses;
        self.finish_summary()
    }

    fn fail(&mut self, invariant: Invariant, detail: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation {
                invariant,
                seed: self.sc.seed,
                step: self.step,
                at_ms: self.now - EPOCH_MS,
                detail,
            });
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { to, from, sent_at, carried, bytes } => {
                self.deliver(to, from, sent_at, carried, &bytes)
            }
            Event::Timer { to } => self.fire_timer(to),
            Event::Finish { node, incarnation, job, lease, outcome } => {
                let slot = &mut self.nodes[node as usize];
                if slot.up && slot.incarnation == incarnation {
                    // A cancelled lease is gone from the core: that error is the expected answer.
                    let _ = slot.core.finish(self.now, job, lease, *outcome, Usage::default());
                    self.drain(Endpoint::Node(node));
                }
            }
            Event::Post => {
                self.post();
                self.schedule_next_post();
            }
            Event::Crash => {
                self.crash();
                self.schedule_next_crash();
            }
            Event::Restart { node } => self.restart(node),
            Event::Sweep => {
                self.sweep();
                self.queue.push(self.now + SWEEP_INTERVAL_MS, Event::Sweep);
            }
            Event::Sample => {
                self.sample();
                self.queue.push(self.now + SAMPLE_INTERVAL_MS, Event::Sample);
            }
            Event::Heartbeat => {
                self.heartbeat();
                self.queue
                    .push(self.now + self.sc.network.gossipsub.heartbeat_ms, Event::Heartbeat);
            }
            Event::PeerTimer { node, incarnation } => self.peer_timer(node, incarnation),
            Event::Connected { from, to, from_incarnation, to_incarnation } => {
                self.connected(from, to, from_incarnation, to_incarnation)
            }
            Event::DialRefused { from, to, from_incarnation } => {
                self.dial_refused(from, to, from_incarnation)
            }
            Event::PartitionStart { share, duration_ms } => {
                self.partition_start(share, duration_ms)
            }
            Event::PartitionEnd => self.partition_end(),
            Event::RandomPartition => self.random_partition(),
            Event::Forge => self.forge(),
        }
    }

    fn sample(&mut self) {
        let j = &self.summary.jobs;
        let ended = j.completed + j.failed + j.refused;
        self.series.samples.push(Sample {
            t_s: (self.now - EPOCH_MS) / 1000,
            open_jobs: j.posted - ended,
            posted: j.posted,
            completed: j.completed,
            failed: j.failed,
            nodes_up: self.nodes_up,
            nodes_cut: if self.partitioned {
                self.nodes.iter().filter(|n| n.cut).count() as u32
            } else {
                0
            },
            wire_bytes: self.summary.messages.wire_bytes + self.overlay.stats.wire_bytes(),
        });
    }

    fn deliver(
        &mut self,
        to: Endpoint,
        from: Option<Endpoint>,
        sent_at: Millis,
        carried: Carried,
        bytes: &[u8],
    ) {
        let from_id = from.map(|e| self.id_of(e));
        let rejections_before = self.rejections;
        match to {
            Endpoint::Relay(r) => {
                self.relays[r as usize].core.handle_message(self.now, from_id, bytes)
            }
            Endpoint::Node(i) => {
                let slot = &mut self.nodes[i as usize];
                if !slot.up {
                    self.summary.messages.to_down_nodes += 1;
                    return;
                }
                slot.core.handle_message(self.now, from_id, bytes);
                if carried == Carried::Offer {
                    let ms = (self.now - sent_at).min(PROPAGATION_BUCKETS as u64 - 1);
                    self.propagation[ms as usize] += 1;
                }
            }
        }
        self.summary.messages.delivered += 1;
        self.summary.messages.verifications += 1;
        self.summary.messages.delivered_bytes += bytes.len() as u64;
        self.drain(to);
        if carried == Carried::Forged {
            self.summary.forgeries.delivered += 1;
            if self.rejections == rejections_before {
                self.fail(
                    Invariant::ForgeriesRejected,
                    format!("a forged envelope delivered to {to:?} was accepted"),
                );
            } else {
                self.summary.forgeries.rejected += 1;
            }
        }
    }

    fn id_of(&self, e: Endpoint) -> NodeId {
        match e {
            Endpoint::Relay(r) => self.relays[r as usize].core.id(),
            Endpoint::Node(i) => self.nodes[i as usize].core.id(),
        }
    }

    fn fire_timer(&mut self, to: Endpoint) {
        let now = self.now;
        match to {
            Endpoint::Relay(r) => {
                let slot = &mut self.relays[r as usize];
                if slot.timer_at != Some(now) {
                    return; // superseded
                }
                slot.timer_at = None;
                slot.core.handle_timeout(now);
            }
            Endpoint::Node(i) => {
                let slot = &mut self.nodes[i as usize];
                if !slot.up || slot.timer_at != Some(now) {
                    return;
                }
                slot.timer_at = None;
                if !slot.started {
                    self.start_node(i);
                }
                self.nodes[i as usize].core.handle_timeout(now);
            }
        }
        self.drain(to);
    }

    /// Moves everything a core produced into the network and the driver, until it is quiet,
    /// then arms its timer.
    fn drain(&mut self, ep: Endpoint) {
        loop {
            let mut moved = false;
            while let Some(t) = self.poll_transmit(ep) {
                moved = true;
                self.route(ep, t);
            }
            match ep {
                Endpoint::Relay(r) => {
                    while let Some(e) = self.relays[r as usize].core.poll_event() {
                        moved = true;
                        self.on_relay_event(r, e);
                    }
                }
                Endpoint::Node(i) => {
                    while let Some(e) = self.nodes[i as usize].core.poll_event() {
                        moved = true;
                        self.on_node_event(i, e);
                    }
                }
            }
            if !moved {
                break;
            }
        }
        self.arm_timer(ep);
    }

    fn poll_transmit(&mut self, ep: Endpoint) -> Option<Transmit> {
        match ep {
            Endpoint::Relay(r) => self.relays[r as usize].core.poll_transmit(),
            Endpoint::Node(i) => self.nodes[i as usize].core.poll_transmit(),
        }
    }

    fn arm_timer(&mut self, ep: Endpoint) {
        let now = self.now;
        let (wanted, timer_at) = match ep {
            Endpoint::Relay(r) => {
                let s = &mut self.relays[r as usize];
                (s.core.poll_timeout(), &mut s.timer_at)
            }
            Endpoint::Node(i) => {
                let s = &mut self.nodes[i as usize];
                if !s.up {
                    return;
                }
                // Not at the deadline of every offer heard: a node forgets those on its next
                // input, and only a claimed offer's expiry makes it act.
                (s.core.poll_action_timeout(), &mut s.timer_at)
            }
        };
        // Whatever is due now was handled by this call; what is due again runs a ms later.
        let Some(at) = wanted.map(|t| t.max(now + 1)) else { return };
        if timer_at.is_none_or(|t| at < t) {
            *timer_at = Some(at);
            self.queue.push(at, Event::Timer { to: ep });
        }
    }

    fn access_ms(&self, e: Endpoint) -> u64 {
        match e {
            Endpoint::Relay(r) => self.relays[r as usize].access_ms,
            Endpoint::Node(i) => self.nodes[i as usize].access_ms,
        }
    }

    fn route(&mut self, from: Endpoint, t: Transmit) {
        self.summary.messages.sent += 1;
        self.summary.messages.signatures += 1;
        match t {
            Transmit::Broadcast { topic, bytes } => {
                let bytes: Rc<[u8]> = bytes.into();
                match (topic, from) {
                    (Topic::Offers | Topic::Relays, Endpoint::Relay(r)) => {
                        let carried =
                            if topic == Topic::Offers { Carried::Offer } else { Carried::Plain };
                        if topic == Topic::Offers {
                            self.last_offer = Some(bytes.clone());
                        }
                        match self.sc.network.gossip {
                            GossipMode::Direct => {
                                // Every subscriber: every node started (and not crashed since).
                                for i in 0..self.nodes.len() as u32 {
                                    if self.nodes[i as usize].started {
                                        let to = Endpoint::Node(i);
                                        self.send_copy(from, to, None, carried, &bytes, self.now);
                                    }
                                }
                            }
                            GossipMode::Gossipsub => self.spread_from_relay(r, &bytes, carried),
                        }
                    }
                    (Topic::Adverts, Endpoint::Node(i)) => {
                        // A relay the node is connected to hears its advert on that link (the
                        // driver also sends it straight to its relay); the others one relay hop
                        // later. The mesh flood and the DHT put are costs only.
                        let given = self.given_relay(i);
                        for r in 0..self.relays.len() as u32 {
                            let to = Endpoint::Relay(r);
                            if self.nodes[i as usize].relay_links & (1 << r) != 0 {
                                self.send_copy(from, to, None, Carried::Plain, &bytes, self.now);
                            } else {
                                let hop = Endpoint::Relay(given);
                                self.send_via(from, hop, to, &bytes);
                            }
                        }
                        if self.sc.network.gossip == GossipMode::Gossipsub {
                            self.spread_advert_cost(bytes.len() as u64);
                        }
                        self.put_advert_in_dht(i, bytes.len() as u64);
                    }
                    _ => {}
                }
            }
            Transmit::Direct { to, bytes } => {
                let Some(&target) = self.ids.get(&to) else { return };
                let bytes: Rc<[u8]> = bytes.into();
                if let (Endpoint::Node(i), Endpoint::Relay(r)) = (from, target) {
                    self.last_to_relay = Some((i, r, bytes.clone()));
                }
                let leaves_at = self.connect_for_send(from, target);
                self.send_copy(from, target, Some(from), Carried::Plain, &bytes, leaves_at);
            }
        }
    }

    /// A gossiped message `from` sends that reaches `to` through `hop` (a relay forwarding it).
    fn send_via(&mut self, from: Endpoint, hop: Endpoint, to: Endpoint, bytes: &Rc<[u8]>) {
        self.summary.messages.wire_messages += 2;
        self.summary.messages.wire_bytes += 2 * bytes.len() as u64;
        let len = bytes.len() as u64;
        let Some(at_hop) = self.transit(from, hop, len, self.now) else { return };
        let Some(at) = self.transit(hop, to, len, at_hop) else { return };
        let sent_at = self.now;
        let event = Event::Deliver {
            to,
            from: None,
            sent_at,
            carried: Carried::Plain,
            bytes: bytes.clone(),
        };
        self.queue.push(at, event);
    }

    /// One message from `from` to `to` on a point-to-point link, leaving at `leaves_at` (now, or
    /// after a handshake): lost, duplicated, delayed.
    fn send_copy(
        &mut self,
        from: Endpoint,
        to: Endpoint,
        sender: Option<Endpoint>,
        carried: Carried,
        bytes: &Rc<[u8]>,
        leaves_at: Millis,
    ) {
        self.summary.messages.wire_messages += 1;
        self.summary.messages.wire_bytes += bytes.len() as u64;
        let Some(at) = self.transit(from, to, bytes.len() as u64, leaves_at) else { return };
        let dup = self.sc.network.duplicate;
        let copies = if dup > 0.0 && self.rng.random_bool(dup) {
            self.summary.messages.duplicated += 1;
            2
        } else {
            1
        };
        for copy in 0..copies {
            let jitter =
                if copy == 0 { 0 } else { self.rng.random_range(0..=self.sc.network.jitter_ms) };
            let event = Event::Deliver {
                to,
                from: sender,
                sent_at: self.now,
                carried,
                bytes: bytes.clone(),
            };
            self.queue.push(at + jitter, event);
        }
    }

    /// When `len` bytes that `from` sends at `at` reach `to`, or `None` when the network drops
    /// them (a partition between the two, or loss). The sender's uplink sends its copies one
    /// after the other; latency is the fixed part, both access delays and jitter.
    fn transit(&mut self, from: Endpoint, to: Endpoint, len: u64, at: Millis) -> Option<Millis> {
        if self.partitioned && self.cut_off(from) != self.cut_off(to) {
            self.summary.messages.partitioned += 1;
            return None;
        }
        let net = &self.sc.network;
        let (loss, jitter, base) = (net.loss, net.jitter_ms, net.base_ms);
        if loss > 0.0 && self.rng.random_bool(loss) {
            self.summary.messages.lost += 1;
            return None;
        }
        let (mbit, uplink) = match from {
            Endpoint::Relay(r) => {
                (net.relay_upload_mbit, &mut self.relays[r as usize].uplink_free_us)
            }
            Endpoint::Node(i) => (net.node_upload_mbit, &mut self.nodes[i as usize].uplink_free_us),
        };
        let mut depart_ms = at;
        if mbit > 0.0 {
            // bits / (Mbit/s) = µs
            let serialize_us = ((len * 8) as f64 / mbit).ceil() as u64;
            let done_us = (*uplink).max(at * 1000) + serialize_us;
            *uplink = done_us;
            depart_ms = done_us.div_ceil(1000);
        }
        let path = base + self.access_ms(from) + self.access_ms(to);
        Some(depart_ms + path + self.rng.random_range(0..=jitter))
    }

    fn cut_off(&self, e: Endpoint) -> bool {
        match e {
            Endpoint::Relay(_) => false,
            Endpoint::Node(i) => self.nodes[i as usize].cut,
        }
    }

    fn schedule_next_crash(&mut self) {
        let per_s = self.sc.faults.crashes_per_node_hour * f64::from(self.sc.nodes) / 3600.0;
        if per_s > 0.0 {
            let gap_ms = exponential(&mut self.rng, per_s) * 1000.0;
            self.queue.push(self.now + gap_ms as u64 + 1, Event::Crash);
        }
    }

    fn crash(&mut self) {
        if self.nodes.is_empty() {
            return;
        }
        let i = self.rng.random_range(0..self.nodes.len() as u32);
        let slot = &mut self.nodes[i as usize];
        if !slot.up {
            return;
        }
        slot.up = false;
        slot.incarnation += 1;
        slot.timer_at = None;
        self.nodes_up -= 1;
        self.drop_connections(i);
        self.overlay.node_down(i);
        self.summary.activity.crashes += 1;
        if self.sc.faults.restart_after_s > 0 {
            self.queue
                .push(self.now + self.sc.faults.restart_after_s * 1000, Event::Restart { node: i });
        }
    }

    fn restart(&mut self, i: u32) {
        let class = self.nodes[i as usize].class;
        let core = NodeCore::new(
            testkit::keypair(u64::from(i)),
            node_config(&self.node_cfg, &self.relays, i),
            profile_of(&self.sc, class),
            self.rng.random(),
        );
        let peers =
            PeerSlot::new(core.id(), self.sc.network.node_peers as usize, self.rng.random());
        self.peers[i as usize] = peers;
        let slot = &mut self.nodes[i as usize];
        *slot.core = core;
        slot.up = true;
        self.nodes_up += 1;
        self.overlay.node_up(i);
        self.summary.activity.restarts += 1;
        self.start_node(i);
        let now = self.now;
        self.nodes[i as usize].core.handle_timeout(now);
        self.drain(Endpoint::Node(i));
    }

    /// Checks every posted job: ended exactly as reported, or pending before its deadline.
    fn sweep(&mut self) {
        let now = self.now;
        let mut problem = None;
        for (id, p) in &self.jobs {
            let job = self.relays[p.relay as usize].core.job(id);
            let result = if p.ended {
                match job {
                    Some(j) if j.state.is_final() => Ok(()),
                    _ => Err(format!("job {id} was reported ended but is not final")),
                }
            } else {
                invariants::check_not_lost(job, now, DEADLINE_SLACK_MS)
            };
            if let Err(why) = result {
                problem = Some(why);
                break;
            }
        }
        if let Some(why) = problem {
            self.fail(Invariant::NoJobLost, why);
        }
    }

    fn finish_summary(mut self) -> Report {
        self.sample();
        self.summary.overlay = self.overlay.finish(&self.sc);
        self.series.propagation_ms = self.propagation.clone();
        self.series.complete_ms = self.complete_ms.clone();
        let s = &mut self.summary;
        s.steps = self.step;
        s.jobs.pending = s.jobs.posted - s.jobs.completed - s.jobs.failed - s.jobs.refused;
        s.time_to_assign_ms = Percentiles::of(std::mem::take(&mut self.assign_ms));
        s.time_to_complete_ms = Percentiles::of(std::mem::take(&mut self.complete_ms));
        s.offer_propagation_ms = Percentiles::of_histogram(&self.propagation);
        let posted = s.jobs.posted.max(1) as f64;
        s.messages.sent_per_job = round1(s.messages.sent as f64 / posted);
        s.messages.bytes_per_job = round1(s.messages.delivered_bytes as f64 / posted);
        s.messages.wire_messages += s.overlay.wire_messages();
        s.messages.wire_bytes += s.overlay.wire_bytes();
        s.messages.wire_messages_per_job = round1(s.messages.wire_messages as f64 / posted);
        s.messages.wire_bytes_per_job = round1(s.messages.wire_bytes as f64 / posted);
        s.invariants_ok = self.violation.is_none();
        s.violation = self.violation;
        Report { summary: self.summary, series: self.series }
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn requester(relay: u32) -> String {
    format!("requester-{relay}")
}

/// An index drawn by weight.
fn pick(rng: &mut ChaCha8Rng, weights: &[u32]) -> usize {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    let mut roll = rng.random_range(0..total.max(1));
    for (i, w) in weights.iter().enumerate() {
        if roll < u64::from(*w) {
            return i;
        }
        roll -= u64::from(*w);
    }
    weights.len() - 1
}

/// An exponentially distributed gap, in seconds, for events at `rate_per_s`.
fn exponential(rng: &mut ChaCha8Rng, rate_per_s: f64) -> f64 {
    let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    -u.ln() / rate_per_s
}

/// Node `i`'s configuration: the shared one, given relay `i % relays` (it trusts the others
/// through that relay's roster).
fn node_config(base: &NodeConfig, relays: &[RelaySlot], i: u32) -> NodeConfig {
    let given = relays[i as usize % relays.len()].core.id();
    NodeConfig { trusted_relays: vec![given], ..base.clone() }
}

fn profile_of(sc: &Scenario, class: usize) -> CapabilityProfile {
    let hw = &sc.hardware[class];
    let mut p = testkit::profile();
    p.cpu.model = hw.name.clone();
    p.cpu.physical_cores = hw.cores;
    p.cpu.threads = hw.cores * 2;
    p.memory.total_bytes = hw.memory_gb * GIB;
    p.memory.available_bytes = hw.memory_gb * GIB * 3 / 4;
    p.policy.max_concurrent_jobs = hw.slots.max(1);
    p.runtimes.docker_gpu = hw.gpus > 0;
    p.gpus = (0..hw.gpus)
        .map(|g| GpuInfo {
            vendor: GpuVendor::Nvidia,
            name: format!("{} GPU {g}", hw.name),
            vram_bytes: hw.vram_gb * GIB,
            compute_capability: Some((8, 6)),
            driver: Some("550.0".into()),
        })
        .collect();
    p
}
