//! Scenarios: the network, the hardware mix, the faults and the workload of one run, as TOML.
//!
//! Every field has a default, so an empty file is the baseline; the files under
//! `sim/scenarios/` override what they study. Unknown fields are refused with their path.

use serde::{Deserialize, Serialize};

/// Everything one run simulates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// A short name shown in the summary.
    pub name: String,
    /// Compute nodes at start.
    pub nodes: u32,
    /// Relays (each posts an equal share of the jobs), peered with each other; node `i` is
    /// given relay `i % relays` and learns the others from its roster, as deployed nodes do.
    pub relays: u32,
    /// Simulated time, in seconds.
    pub duration_s: u64,
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Links between peers.
    pub network: NetworkModel,
    /// Hardware classes nodes are drawn from, by weight.
    pub hardware: Vec<HardwareClass>,
    /// Misbehaviour and churn.
    pub faults: Faults,
    /// Jobs posted.
    pub workload: Workload,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: "baseline".into(),
            nodes: 1_000,
            relays: 1,
            duration_s: 3_600,
            seed: 1,
            network: NetworkModel::default(),
            hardware: vec![
                HardwareClass::cpu("laptop", 50, 4, 16, 1.5, 0.02),
                HardwareClass::cpu("workstation", 35, 16, 64, 1.0, 0.01),
                HardwareClass {
                    gpus: 1,
                    vram_gb: 24,
                    ..HardwareClass::cpu("gpu", 15, 16, 64, 0.8, 0.01)
                },
            ],
            faults: Faults::default(),
            workload: Workload::default(),
        }
    }
}

/// Link model: latency = `base_ms` + both ends' access delays + jitter, after the sender's
/// uplink has serialized the message; each copy of a message is lost with `loss` and duplicated
/// with `duplicate`. Announcements travel over the `gossip` overlay, adverts also go into the
/// Kademlia DHT.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkModel {
    /// Fixed part of every link's one-way latency.
    pub base_ms: u64,
    /// Each endpoint's access delay is drawn once, uniformly in `0..=access_ms_max`.
    pub access_ms_max: u64,
    /// Per-message jitter, uniform in `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// Probability that one delivery is lost, in [0, 1).
    pub loss: f64,
    /// Probability that one delivery arrives twice, in [0, 1).
    pub duplicate: f64,
    /// A node's uplink, Mbit/s (serialization delay of every copy it sends); 0 = unlimited.
    pub node_upload_mbit: f64,
    /// A relay's uplink, Mbit/s; 0 = unlimited.
    pub relay_upload_mbit: f64,
    /// How announcements (offers, adverts) spread.
    pub gossip: GossipMode,
    /// Other nodes each node keeps connections to (`node_peers` in node.toml; the gossip mesh
    /// is drawn from them), clamped like the node's own setting.
    pub node_peers: u32,
    /// Gossipsub parameters (our `net` crate's configuration).
    pub gossipsub: GossipsubParams,
    /// Kademlia parameters (rust-libp2p's defaults).
    pub kademlia: KademliaParams,
}

impl Default for NetworkModel {
    fn default() -> Self {
        Self {
            base_ms: 10,
            access_ms_max: 60,
            jitter_ms: 20,
            loss: 0.001,
            duplicate: 0.001,
            node_upload_mbit: 100.0,
            relay_upload_mbit: 1_000.0,
            gossip: GossipMode::Gossipsub,
            node_peers: aimatrix_protocol::mesh::NODE_PEERS_DEFAULT as u32,
            gossipsub: GossipsubParams::default(),
            kademlia: KademliaParams::default(),
        }
    }
}

/// The announcement overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GossipMode {
    /// A gossipsub mesh: flood publish, mesh forwarding, lazy IHAVE/IWANT gossip.
    Gossipsub,
    /// Every subscriber gets one copy straight from the publisher (no overlay cost).
    Direct,
}

/// Gossipsub's knobs; the defaults are what our `net` crate configures (mesh 8, 6 to 16, a
/// 500 ms heartbeat, flood publishing; the rest rust-libp2p's `gossipsub::Config::default()`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipsubParams {
    /// Target mesh degree (`mesh_n`).
    pub d: u32,
    /// Below this a peer grafts at its heartbeat (`mesh_n_low`).
    pub d_lo: u32,
    /// Above this a peer prunes at its heartbeat (`mesh_n_high`).
    pub d_hi: u32,
    /// Peers that get IHAVE gossip at each heartbeat (`gossip_lazy`).
    pub d_lazy: u32,
    /// Heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Heartbeats a message id is gossiped in IHAVE (`history_gossip`).
    pub history_gossip: u32,
    /// The publisher sends to every connected subscriber, not only its mesh (`flood_publish`):
    /// a relay to the nodes connected to it and the other relays.
    pub flood_publish: bool,
    /// Bytes of gossipsub framing per message (its own signature, key, topic, sequence number).
    pub frame_bytes: u64,
    /// Bytes of a message id (our ids are SHA-256 digests of the data).
    pub message_id_bytes: u64,
}

impl Default for GossipsubParams {
    fn default() -> Self {
        Self {
            d: 8,
            d_lo: 6,
            d_hi: 16,
            d_lazy: 6,
            heartbeat_ms: 500,
            history_gossip: 3,
            flood_publish: true,
            frame_bytes: 140,
            message_id_bytes: 32,
        }
    }
}

/// Kademlia's knobs; the defaults are rust-libp2p's `kad::Config`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KademliaParams {
    /// Whether nodes store their adverts in the DHT (as the node driver does).
    pub enabled: bool,
    /// Bucket size and replication factor (`K_VALUE`).
    pub k: u32,
    /// Parallel requests of a lookup (`ALPHA_VALUE`).
    pub alpha: u32,
    /// Bytes of one peer entry in a FIND_NODE answer (id and one address).
    pub peer_entry_bytes: u64,
}

impl Default for KademliaParams {
    fn default() -> Self {
        Self { enabled: true, k: 20, alpha: 3, peer_entry_bytes: 80 }
    }
}

/// A kind of machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareClass {
    /// Name.
    pub name: String,
    /// Relative share of nodes.
    pub weight: u32,
    /// Physical cores.
    pub cores: u32,
    /// Memory, GiB.
    pub memory_gb: u64,
    /// GPUs.
    #[serde(default)]
    pub gpus: u32,
    /// VRAM per GPU, GiB.
    #[serde(default)]
    pub vram_gb: u64,
    /// Execution time multiplier (1.0 = the job class's nominal duration).
    pub slowness: f64,
    /// Probability that one run fails (exit code, trap).
    pub failure_rate: f64,
    /// Jobs run at once.
    #[serde(default = "one")]
    pub slots: u32,
}

const fn one() -> u32 {
    1
}

impl HardwareClass {
    fn cpu(name: &str, weight: u32, cores: u32, memory_gb: u64, slowness: f64, fail: f64) -> Self {
        Self {
            name: name.into(),
            weight,
            cores,
            memory_gb,
            gpus: 0,
            vram_gb: 0,
            slowness,
            failure_rate: fail,
            slots: 1,
        }
    }
}

/// Misbehaving nodes and churn.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Share of nodes that return wrong results (and wrong training updates).
    pub byzantine_share: f64,
    /// Share of nodes that claim jobs and never return a result.
    pub withholding_share: f64,
    /// Crashes per node per hour (a crashed node loses everything it was doing).
    pub crashes_per_node_hour: f64,
    /// A crashed node restarts after this many seconds; 0 = never.
    pub restart_after_s: u64,
    /// Scheduled partitions.
    pub partitions: Vec<Partition>,
    /// Random partitions per simulated hour (Poisson); each lasts `random_partition_s` and
    /// cuts off `random_partition_share` of the nodes.
    pub random_partitions_per_hour: f64,
    /// Length of a random partition, seconds.
    pub random_partition_s: u64,
    /// Share of nodes a random partition cuts off.
    pub random_partition_share: f64,
    /// Forged or replayed envelopes each Byzantine node sends per hour (altered payloads,
    /// altered signers, third-party replays); every one must be rejected by its receiver.
    pub forgeries_per_byzantine_hour: f64,
}

/// A scheduled partition: a share of the nodes loses every link to the rest (and to every relay).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Start, seconds after the run starts.
    pub at_s: u64,
    /// Length, seconds.
    pub duration_s: u64,
    /// Share of nodes on the far side, in (0, 1).
    pub share: f64,
}

/// Job arrivals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Mean jobs posted per second (Poisson arrivals, spread over the relays).
    pub arrivals_per_s: f64,
    /// Credits the requester starts with at each relay's ledger.
    pub requester_funds: u64,
    /// Job classes, by weight.
    pub classes: Vec<JobClass>,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            arrivals_per_s: 0.2,
            requester_funds: 10_000_000,
            classes: vec![
                JobClass::batch("batch", 70, 1, 10, 30),
                JobClass::batch("batch-replicated", 20, 2, 12, 30),
                JobClass { gpus: 1, vram_gb: 16, ..JobClass::batch("gpu", 10, 1, 50, 120) },
            ],
        }
    }
}

/// What one kind of job asks and pays.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobClass {
    /// Name (also the spec's name).
    pub name: String,
    /// Relative share of jobs.
    pub weight: u32,
    /// `batch` or `training`.
    #[serde(default = "batch_kind")]
    pub kind: String,
    /// Reward per accepted replica (training: per accepted update).
    pub reward: u64,
    /// Replication.
    #[serde(default = "one")]
    pub replication: u32,
    /// Attempts per replica slot.
    #[serde(default = "three")]
    pub max_attempts: u32,
    /// Job deadline, seconds after posting.
    #[serde(default = "deadline")]
    pub deadline_s: u64,
    /// Nominal run time on a `slowness = 1` node, seconds (each run draws 0.5x to 1.5x).
    pub duration_s: u64,
    /// GPUs needed (docker GPU workload when > 0).
    #[serde(default)]
    pub gpus: u32,
    /// VRAM per GPU, GiB.
    #[serde(default)]
    pub vram_gb: u32,
    /// Training: participants per round.
    #[serde(default = "three")]
    pub participants: u32,
    /// Training: rounds.
    #[serde(default = "three")]
    pub rounds: u32,
    /// Training: updates needed to close a round.
    #[serde(default = "two")]
    pub quorum: u32,
    /// Training: round deadline, seconds.
    #[serde(default = "round_deadline")]
    pub round_deadline_s: u64,
}

fn batch_kind() -> String {
    "batch".into()
}
const fn two() -> u32 {
    2
}
const fn three() -> u32 {
    3
}
const fn deadline() -> u64 {
    300
}
const fn round_deadline() -> u64 {
    120
}

impl JobClass {
    fn batch(name: &str, weight: u32, replication: u32, reward: u64, duration_s: u64) -> Self {
        Self {
            name: name.into(),
            weight,
            kind: batch_kind(),
            reward,
            replication,
            max_attempts: 3,
            deadline_s: deadline(),
            duration_s,
            gpus: 0,
            vram_gb: 0,
            participants: 3,
            rounds: 3,
            quorum: 2,
            round_deadline_s: round_deadline(),
        }
    }
}

impl Scenario {
    /// Parses a scenario file; errors name the field (`workload.arrivals_per_s: ...`).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let de = toml::Deserializer::new(text);
        let scenario: Self = serde_path_to_error::deserialize(de)
            .map_err(|e| format!("{}: {}", e.path(), e.inner().message()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Checks the numbers make sense together.
    pub fn validate(&self) -> Result<(), String> {
        let p = |x: f64| (0.0..1.0).contains(&x);
        let g = &self.network.gossipsub;
        let f = &self.faults;
        let checks: [(bool, &str); 15] = [
            (
                g.d_lo <= g.d && g.d <= g.d_hi && g.d >= 1 && g.heartbeat_ms >= 1,
                "network.gossipsub needs 1 <= d, d_lo <= d <= d_hi and heartbeat_ms >= 1",
            ),
            (
                self.network.kademlia.k >= 1 && self.network.kademlia.alpha >= 1,
                "network.kademlia.k and alpha must be at least 1",
            ),
            (
                f.partitions.iter().all(|p| p.share > 0.0 && p.share < 1.0)
                    && (0.0..1.0).contains(&f.random_partition_share),
                "faults: partition shares must be in (0, 1)",
            ),
            (
                f.random_partitions_per_hour >= 0.0
                    && f.forgeries_per_byzantine_hour >= 0.0
                    && self.network.node_upload_mbit >= 0.0
                    && self.network.relay_upload_mbit >= 0.0,
                "faults and bandwidths must not be negative",
            ),
            (self.relays >= 1, "relays must be at least 1"),
            (
                self.relays as usize <= aimatrix_protocol::messages::ROSTER_RELAYS_MAX,
                "relays must be at most 64 (a roster names at most 64 relays)",
            ),
            (self.duration_s >= 1, "duration_s must be at least 1"),
            (!self.hardware.is_empty(), "hardware needs at least one class"),
            (
                self.hardware.iter().all(|h| h.weight > 0 && h.slowness > 0.0),
                "hardware: weight and slowness must be positive",
            ),
            (
                self.hardware.iter().all(|h| p(h.failure_rate)),
                "hardware.failure_rate must be in [0, 1)",
            ),
            (
                p(self.network.loss) && p(self.network.duplicate),
                "network.loss and network.duplicate must be in [0, 1)",
            ),
            (
                p(self.faults.byzantine_share + self.faults.withholding_share),
                "faults: byzantine_share + withholding_share must be in [0, 1)",
            ),
            (
                self.workload.arrivals_per_s >= 0.0 && self.faults.crashes_per_node_hour >= 0.0,
                "rates must not be negative",
            ),
            (
                !self.workload.classes.is_empty()
                    && self.workload.classes.iter().all(|c| c.weight > 0),
                "workload.classes needs at least one class, each with weight > 0",
            ),
            (
                self.workload.classes.iter().all(|c| c.kind == "batch" || c.kind == "training"),
                "workload.classes.kind must be \"batch\" or \"training\"",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(format!("scenario {:?}: {why}", self.name)),
            None => Ok(()),
        }
    }
}
