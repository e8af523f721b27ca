//! Matching a job against a node: every reason it cannot serve the job, or a score.
//!
//! Users of other compute networks complain most that nodes silently never pick their job, so
//! [`evaluate`] never stops at the first problem: a mismatch lists every [`Mismatch`]. Among
//! matching nodes, a higher [`Score`] is a better choice ([`rank`]): idle nodes first, then the
//! tightest fit, so large GPUs stay free for jobs that need them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::capability::{CapabilityProfile, GIB, MIB};
use crate::job::{JobKind, JobSpec, Runtime};

/// One reason a node cannot serve a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mismatch {
    /// The node's policy does not allow this job kind.
    KindNotAllowed {
        /// The job's kind.
        kind: JobKind,
    },
    /// The node has no such sandbox (or docker is disabled by policy).
    RuntimeUnavailable {
        /// The runtime the job needs.
        runtime: Runtime,
    },
    /// The job asks for GPUs but the node has no docker GPU runtime.
    NoGpuRuntime,
    /// Too few CPU cores.
    CpuCores {
        /// Cores required.
        need: u32,
        /// Physical cores present.
        have: u32,
    },
    /// The job asks for more cores than the policy lets one job use.
    CpuCoresOverCap {
        /// Cores required.
        need: u32,
        /// Policy cap.
        cap: u32,
    },
    /// Too little memory.
    Memory {
        /// MiB required.
        need_mb: u64,
        /// MiB present.
        have_mb: u64,
    },
    /// The job asks for more memory than the policy lets one job use.
    MemoryOverCap {
        /// MiB required.
        need_mb: u64,
        /// Policy cap.
        cap_mb: u64,
    },
    /// Too little free disk.
    Disk {
        /// MiB required (inputs included).
        need_mb: u64,
        /// MiB free.
        have_mb: u64,
    },
    /// Too few GPUs with enough VRAM.
    Gpus {
        /// GPUs required.
        need: u32,
        /// VRAM each, GiB.
        vram_gb: u32,
        /// GPUs with that much VRAM.
        have: u32,
    },
    /// The timeout is longer than the policy allows.
    TimeoutOverCap {
        /// Job timeout.
        need_s: u64,
        /// Policy cap.
        cap_s: u64,
    },
    /// The reward is below the node's floor.
    RewardBelowFloor {
        /// Job reward.
        reward: u64,
        /// Node floor.
        floor: u64,
    },
    /// The node is running as many jobs as its policy allows.
    AtCapacity {
        /// Jobs running.
        running: u32,
        /// Policy maximum.
        max: u32,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KindNotAllowed { kind } => {
                write!(f, "job kind {kind} not allowed by node policy")
            }
            Self::RuntimeUnavailable { runtime } => write!(f, "runtime {runtime} unavailable"),
            Self::NoGpuRuntime => f.write_str("no docker GPU runtime"),
            Self::CpuCores { need, have } => write!(f, "needs {need} CPU cores, node has {have}"),
            Self::CpuCoresOverCap { need, cap } => {
                write!(f, "needs {need} CPU cores, policy allows {cap} per job")
            }
            Self::Memory { need_mb, have_mb } => {
                write!(f, "needs {need_mb} MiB memory, node has {have_mb} MiB")
            }
            Self::MemoryOverCap { need_mb, cap_mb } => {
                write!(f, "needs {need_mb} MiB memory, policy allows {cap_mb} MiB per job")
            }
            Self::Disk { need_mb, have_mb } => {
                write!(f, "needs {need_mb} MiB free disk, node has {have_mb} MiB")
            }
            Self::Gpus { need, vram_gb, have } => {
                write!(f, "needs {need} GPU(s) with {vram_gb} GiB VRAM, node has {have}")
            }
            Self::TimeoutOverCap { need_s, cap_s } => {
                write!(f, "timeout {need_s} s exceeds policy cap {cap_s} s")
            }
            Self::RewardBelowFloor { reward, floor } => {
                write!(f, "reward {reward} below node floor {floor}")
            }
            Self::AtCapacity { running, max } => {
                write!(f, "node busy: {running} of {max} job slots in use")
            }
        }
    }
}

/// How good a choice a matching node is; higher is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Score(pub u32);

/// The outcome of matching one job against one node.
pub type MatchResult = Result<Score, Vec<Mismatch>>;

/// Matches `spec` against `profile` (hardware, runtimes, policy and load).
///
/// Returns every reason the node cannot serve the job, or its score. Allocates only when
/// there is a mismatch to report.
pub fn evaluate(spec: &JobSpec, profile: &CapabilityProfile) -> MatchResult {
    let mut why = Vec::new();
    check_policy(spec, profile, &mut why);
    check_hardware(spec, profile, &mut why);
    if why.is_empty() {
        Ok(score(spec, profile))
    } else {
        Err(why)
    }
}

/// Whether `profile` can serve `spec`, without collecting reasons.
pub fn can_serve(spec: &JobSpec, profile: &CapabilityProfile) -> bool {
    evaluate(spec, profile).is_ok()
}

fn check_policy(spec: &JobSpec, profile: &CapabilityProfile, why: &mut Vec<Mismatch>) {
    let p = &profile.policy;
    if !p.allowed_kinds.contains(spec.kind) {
        why.push(Mismatch::KindNotAllowed { kind: spec.kind });
    }
    if spec.reward < p.reward_floor {
        why.push(Mismatch::RewardBelowFloor { reward: spec.reward, floor: p.reward_floor });
    }
    let r = &spec.requirements;
    if r.cpu_cores > p.max_cpu_cores {
        why.push(Mismatch::CpuCoresOverCap { need: r.cpu_cores, cap: p.max_cpu_cores });
    }
    if r.memory_mb > p.max_memory_mb {
        why.push(Mismatch::MemoryOverCap { need_mb: r.memory_mb, cap_mb: p.max_memory_mb });
    }
    if spec.limits.timeout_s > p.max_timeout_s {
        why.push(Mismatch::TimeoutOverCap {
            need_s: spec.limits.timeout_s,
            cap_s: p.max_timeout_s,
        });
    }
    if profile.load.running_jobs >= p.max_concurrent_jobs {
        why.push(Mismatch::AtCapacity {
            running: profile.load.running_jobs,
            max: p.max_concurrent_jobs,
        });
    }
}

fn check_hardware(spec: &JobSpec, profile: &CapabilityProfile, why: &mut Vec<Mismatch>) {
    let r = &spec.requirements;
    if !profile.has_runtime(spec.workload.runtime) {
        why.push(Mismatch::RuntimeUnavailable { runtime: spec.workload.runtime });
    }
    if r.cpu_cores > profile.cpu.physical_cores {
        why.push(Mismatch::CpuCores { need: r.cpu_cores, have: profile.cpu.physical_cores });
    }
    let have_mb = profile.memory.total_bytes / MIB;
    if r.memory_mb > have_mb {
        why.push(Mismatch::Memory { need_mb: r.memory_mb, have_mb });
    }
    let input_mb = spec.inputs.iter().map(|i| i.size_bytes).sum::<u64>().div_ceil(MIB);
    let need_disk_mb = r.disk_mb.saturating_add(input_mb);
    let free_mb = profile.disk.free_bytes / MIB;
    if need_disk_mb > free_mb {
        why.push(Mismatch::Disk { need_mb: need_disk_mb, have_mb: free_mb });
    }
    if r.gpus > 0 {
        if !profile.runtimes.docker_gpu {
            why.push(Mismatch::NoGpuRuntime);
        }
        let have = profile.gpus_with_vram(r.vram_gb);
        if have < r.gpus {
            why.push(Mismatch::Gpus { need: r.gpus, vram_gb: r.vram_gb, have });
        }
    }
}

/// Score of a node that matches: up to 1000 for free job slots, up to 500 for a tight memory
/// fit, up to 500 for not tying up GPUs (or VRAM) the job does not need.
fn score(spec: &JobSpec, profile: &CapabilityProfile) -> Score {
    let p = &profile.policy;
    let slots = u64::from(p.max_concurrent_jobs.max(1));
    let free = slots.saturating_sub(u64::from(profile.load.running_jobs));
    let idle = 1000 * free / slots;
    // u128: advertised sizes are untrusted and may be absurd.
    let need_mem = u128::from(spec.requirements.memory_mb.max(1)) * u128::from(MIB);
    let mem_fit = 500 * need_mem / u128::from(profile.memory.total_bytes).max(need_mem);
    let gpu_fit = if profile.gpus.is_empty() {
        500
    } else if spec.requirements.gpus == 0 {
        0
    } else {
        let need_vram = u128::from(spec.requirements.vram_gb.max(1)) * u128::from(GIB);
        500 * need_vram / u128::from(profile.max_vram_bytes()).max(need_vram)
    };
    Score((u128::from(idle) + mem_fit + gpu_fit) as u32)
}

/// The matching candidates for `spec`, best first (ties broken by the candidate key, so the
/// order is deterministic).
pub fn rank<'a, K: Ord + Copy>(
    spec: &JobSpec,
    candidates: impl IntoIterator<Item = (K, &'a CapabilityProfile)>,
) -> Vec<(K, Score)> {
    let mut out: Vec<(K, Score)> = candidates
        .into_iter()
        .filter_map(|(k, p)| evaluate(spec, p).ok().map(|s| (k, s)))
        .collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::{
        CpuInfo, DiskInfo, GpuInfo, GpuVendor, MemoryInfo, NodePolicy, Runtimes,
    };
    use crate::job::JobKindSet;
    use crate::testkit;

    #[test]
    fn a_fitting_node_matches() {
        let spec = testkit::batch_spec(10);
        assert!(evaluate(&spec, &testkit::profile()).is_ok());
    }

    #[test]
    fn every_reason_is_reported() {
        let mut spec = testkit::docker_gpu_spec(5);
        spec.requirements.cpu_cores = 64;
        spec.requirements.memory_mb = 1 << 20;
        spec.limits.timeout_s = 100_000;
        let profile = CapabilityProfile {
            cpu: CpuInfo { model: "x".into(), physical_cores: 2, threads: 4 },
            memory: MemoryInfo { total_bytes: 4 * GIB, available_bytes: GIB },
            disk: DiskInfo { free_bytes: 0 },
            gpus: vec![],
            runtimes: Runtimes { wasm: true, docker: false, docker_gpu: false },
            policy: NodePolicy {
                allowed_kinds: [JobKind::Training].into_iter().collect::<JobKindSet>(),
                reward_floor: 50,
                max_memory_mb: 1024,
                max_cpu_cores: 1,
                max_timeout_s: 3600,
                max_concurrent_jobs: 1,
                docker_enabled: true,
            },
            load: crate::capability::Load { running_jobs: 1, cpu_percent: 90 },
        };
        let why = evaluate(&spec, &profile).unwrap_err();
        let expected = [
            Mismatch::KindNotAllowed { kind: JobKind::Batch },
            Mismatch::RewardBelowFloor { reward: 5, floor: 50 },
            Mismatch::CpuCoresOverCap { need: 64, cap: 1 },
            Mismatch::MemoryOverCap { need_mb: 1 << 20, cap_mb: 1024 },
            Mismatch::TimeoutOverCap { need_s: 100_000, cap_s: 3600 },
            Mismatch::AtCapacity { running: 1, max: 1 },
            Mismatch::RuntimeUnavailable { runtime: Runtime::Docker },
            Mismatch::CpuCores { need: 64, have: 2 },
            Mismatch::Memory { need_mb: 1 << 20, have_mb: 4096 },
            Mismatch::Disk { need_mb: 1, have_mb: 0 },
            Mismatch::NoGpuRuntime,
            Mismatch::Gpus { need: 1, vram_gb: 16, have: 0 },
        ];
        assert_eq!(why, expected);
        for m in &why {
            assert!(!m.to_string().is_empty());
        }
    }

    #[test]
    fn ranking_prefers_idle_nodes_and_keeps_big_gpus_free() {
        let spec = testkit::batch_spec(1);
        let idle = testkit::profile();
        let mut busy = testkit::profile();
        busy.policy.max_concurrent_jobs = 4;
        busy.load.running_jobs = 3;
        let mut gpu = testkit::profile();
        gpu.gpus.push(GpuInfo {
            vendor: GpuVendor::Nvidia,
            name: "A100".into(),
            vram_bytes: 80 * GIB,
            compute_capability: Some((8, 0)),
            driver: None,
        });
        let ranked = rank(&spec, [(1u32, &busy), (2, &gpu), (3, &idle)]);
        let order: Vec<u32> = ranked.iter().map(|(k, _)| *k).collect();
        assert_eq!(order, [3, 2, 1]);
    }
}
