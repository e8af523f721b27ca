//! Capability profiles: what a node has and what it is willing to run.
//!
//! A node fills a [`CapabilityProfile`] from hardware detection and its config, signs it in an
//! [`crate::messages::Advert`], and publishes it on gossip and in Kademlia. Provider records go
//! under the [`capability_classes`] the profile belongs to, so a relay can find nodes for a
//! requirement ([`requirement_class`]) without hearing every advert.

use serde::{Deserialize, Serialize};

use crate::job::{JobKindSet, JobSpec, Runtime};

/// Bytes in one GiB.
pub const GIB: u64 = 1 << 30;
/// Bytes in one MiB.
pub const MIB: u64 = 1 << 20;

/// The CPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// Model name as the OS reports it.
    pub model: String,
    /// Physical cores.
    pub physical_cores: u32,
    /// Hardware threads.
    pub threads: u32,
}

/// Memory (cgroup limits applied when the node runs in a container).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Total memory usable by the node.
    pub total_bytes: u64,
    /// Currently available memory.
    pub available_bytes: u64,
}

/// Disk space for the node's data dir.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Free bytes on the data dir's filesystem.
    pub free_bytes: u64,
}

/// A GPU vendor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuVendor {
    /// NVIDIA (seen through NVML).
    Nvidia,
    /// AMD.
    Amd,
    /// Intel.
    Intel,
    /// Apple.
    Apple,
    /// Anything else.
    Other,
}

/// One GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Vendor.
    pub vendor: GpuVendor,
    /// Product name.
    pub name: String,
    /// Memory on the device.
    pub vram_bytes: u64,
    /// CUDA compute capability `(major, minor)`, when known.
    pub compute_capability: Option<(u32, u32)>,
    /// Driver version, when known.
    pub driver: Option<String>,
}

/// Sandboxes the node can run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtimes {
    /// wasmtime (always true for a working node).
    pub wasm: bool,
    /// A reachable Docker engine.
    pub docker: bool,
    /// Docker with the NVIDIA runtime.
    pub docker_gpu: bool,
}

/// What the node's owner allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePolicy {
    /// Job kinds the node accepts.
    pub allowed_kinds: JobKindSet,
    /// Lowest reward the node accepts.
    pub reward_floor: u64,
    /// Most memory one job may use, in MiB.
    pub max_memory_mb: u64,
    /// Most CPU cores one job may ask for.
    pub max_cpu_cores: u32,
    /// Longest timeout one job may have.
    pub max_timeout_s: u64,
    /// Jobs run at once.
    pub max_concurrent_jobs: u32,
    /// Whether docker jobs are accepted at all.
    pub docker_enabled: bool,
}

impl Default for NodePolicy {
    fn default() -> Self {
        Self {
            allowed_kinds: JobKindSet::ALL,
            reward_floor: 0,
            max_memory_mb: u64::MAX,
            max_cpu_cores: u32::MAX,
            max_timeout_s: 24 * 3600,
            max_concurrent_jobs: 1,
            docker_enabled: true,
        }
    }
}

/// Current load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Jobs running now.
    pub running_jobs: u32,
    /// CPU use over the last minute, 0..=100.
    pub cpu_percent: u8,
}

/// Everything a node advertises about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityProfile {
    /// CPU.
    pub cpu: CpuInfo,
    /// Memory.
    pub memory: MemoryInfo,
    /// Disk.
    pub disk: DiskInfo,
    /// GPUs.
    pub gpus: Vec<GpuInfo>,
    /// Sandboxes.
    pub runtimes: Runtimes,
    /// Owner policy.
    pub policy: NodePolicy,
    /// Current load.
    pub load: Load,
}

/// VRAM thresholds used for provider-record classes, in GiB.
pub const VRAM_CLASSES_GB: [u32; 6] = [4, 8, 16, 24, 40, 80];

impl CapabilityProfile {
    /// Whether the node offers `runtime` (docker counts only when the policy enables it).
    pub fn has_runtime(&self, runtime: Runtime) -> bool {
        match runtime {
            Runtime::Wasm => self.runtimes.wasm,
            Runtime::Docker => self.runtimes.docker && self.policy.docker_enabled,
        }
    }

    /// The largest VRAM of any GPU, in bytes.
    pub fn max_vram_bytes(&self) -> u64 {
        self.gpus.iter().map(|g| g.vram_bytes).max().unwrap_or(0)
    }

    /// Number of GPUs with at least `vram_gb` GiB each.
    pub fn gpus_with_vram(&self, vram_gb: u32) -> u32 {
        let need = u64::from(vram_gb) * GIB;
        self.gpus.iter().filter(|g| g.vram_bytes >= need).count() as u32
    }
}

/// The provider-record classes a profile belongs to (`runtime/wasm`, `gpu/vram>=16g`, ...).
pub fn capability_classes(profile: &CapabilityProfile) -> Vec<String> {
    let mut out = Vec::new();
    if profile.runtimes.wasm {
        out.push("runtime/wasm".to_owned());
    }
    if profile.has_runtime(Runtime::Docker) {
        out.push("runtime/docker".to_owned());
        if profile.runtimes.docker_gpu && !profile.gpus.is_empty() {
            out.push("runtime/docker-gpu".to_owned());
            let max_gb = profile.max_vram_bytes() / GIB;
            for gb in VRAM_CLASSES_GB {
                if max_gb >= u64::from(gb) {
                    out.push(format!("gpu/vram>={gb}g"));
                }
            }
        }
    }
    out
}

/// The most selective class a node serving `spec` must belong to; a relay looks up its
/// providers first.
pub fn requirement_class(spec: &JobSpec) -> String {
    let r = &spec.requirements;
    if r.gpus > 0 {
        let class = VRAM_CLASSES_GB.iter().rev().find(|gb| r.vram_gb >= **gb);
        return match class {
            Some(gb) => format!("gpu/vram>={gb}g"),
            None => "runtime/docker-gpu".to_owned(),
        };
    }
    match spec.workload.runtime {
        Runtime::Wasm => "runtime/wasm".to_owned(),
        Runtime::Docker => "runtime/docker".to_owned(),
    }
}

/// The Kademlia key under which a node stores its latest signed advert (an encoded envelope).
pub fn advert_record_key(node: &crate::identity::NodeId) -> Vec<u8> {
    let mut key = b"aimatrix/advert/".to_vec();
    key.extend_from_slice(node.as_bytes());
    key
}

/// The Kademlia key under which nodes of a capability class ([`capability_classes`],
/// [`requirement_class`]) are providers.
pub fn class_provider_key(class: &str) -> Vec<u8> {
    format!("aimatrix/class/{class}").into_bytes()
}
