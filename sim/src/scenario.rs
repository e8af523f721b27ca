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
    /// Relays (each posts an equal share of the jobs).
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

/// Link model: latency = `base_ms` + both ends' access delays + jitter; each copy of a message
/// is lost with `loss` and duplicated with `duplicate`.
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
}

impl Default for NetworkModel {
    fn default() -> Self {
        Self { base_ms: 10, access_ms_max: 60, jitter_ms: 20, loss: 0.001, duplicate: 0.001 }
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
        let checks: [(bool, &str); 10] = [
            (self.relays >= 1, "relays must be at least 1"),
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
