//! Ready-made profiles and specs for tests, benchmarks and the simulator.
//!
//! Deterministic: the same call always returns the same value.

use crate::capability::{
    CapabilityProfile, CpuInfo, DiskInfo, GpuInfo, GpuVendor, Load, MemoryInfo, NodePolicy,
    Runtimes, GIB,
};
use crate::hash::Digest;
use crate::identity::Keypair;
use crate::job::{ContentRef, JobKind, JobSpec, Limits, Requirements, Runtime, Workload};

/// A deterministic keypair for index `n`.
pub fn keypair(n: u64) -> Keypair {
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&n.to_le_bytes());
    secret[8] = 0xA1;
    Keypair::from_secret_bytes(secret)
}

/// A 4-core, 16 GiB, wasm+docker node with no GPU, one job slot, and a permissive policy.
pub fn profile() -> CapabilityProfile {
    CapabilityProfile {
        cpu: CpuInfo { model: "Test CPU".into(), physical_cores: 4, threads: 8 },
        memory: MemoryInfo { total_bytes: 16 * GIB, available_bytes: 12 * GIB },
        disk: DiskInfo { free_bytes: 100 * GIB },
        gpus: Vec::new(),
        runtimes: Runtimes { wasm: true, docker: true, docker_gpu: false },
        policy: NodePolicy::default(),
        load: Load::default(),
    }
}

/// A node with one NVIDIA GPU of `vram_gb` GiB and the docker GPU runtime.
pub fn gpu_profile(vram_gb: u64) -> CapabilityProfile {
    let mut p = profile();
    p.runtimes.docker_gpu = true;
    p.gpus.push(GpuInfo {
        vendor: GpuVendor::Nvidia,
        name: format!("Test GPU {vram_gb}G"),
        vram_bytes: vram_gb * GIB,
        compute_capability: Some((8, 6)),
        driver: Some("550.0".into()),
    });
    p
}

/// A resolved wasm batch job paying `reward`, replication 1.
pub fn batch_spec(reward: u64) -> JobSpec {
    JobSpec {
        kind: JobKind::Batch,
        name: "test batch".into(),
        reward,
        replication: 1,
        max_attempts: 3,
        deadline_s: 600,
        workload: Workload {
            runtime: Runtime::Wasm,
            module: Some(ContentRef::Digest(Digest::of(b"test module"))),
            image: None,
            command: Vec::new(),
            args: vec!["--demo".into()],
            env: Default::default(),
        },
        requirements: Requirements::default(),
        limits: Limits::default(),
        inputs: Vec::new(),
        training: None,
        serving: None,
    }
}

/// A docker job needing one 16 GiB GPU and 1 MiB of disk.
pub fn docker_gpu_spec(reward: u64) -> JobSpec {
    let mut spec = batch_spec(reward);
    spec.workload.runtime = Runtime::Docker;
    spec.workload.module = None;
    spec.workload.image = Some("aimatrix/test:1".into());
    spec.requirements.gpus = 1;
    spec.requirements.vram_gb = 16;
    spec.requirements.disk_mb = 1;
    spec
}

/// Stand-in training data for `spec`'s participant seats (digests of nothing a test fetches):
/// what [`crate::relay::RelayCore::post_training_job`] needs when the bytes do not matter.
pub fn training_data(spec: &JobSpec) -> crate::relay::training::TrainingData {
    let seats = spec.training.as_ref().map_or(0, |t| t.participants);
    crate::relay::training::TrainingData {
        chunks: (0..seats).map(|i| Digest::of(format!("chunk {i}").as_bytes())).collect(),
        holdout: Digest::of(b"holdout"),
    }
}

/// Posts `spec` at `relay`: as a training job with [`training_data`] when it is one.
///
/// # Errors
///
/// As [`crate::relay::RelayCore::post_job`].
pub fn post(
    relay: &mut crate::relay::RelayCore,
    now: crate::time::Millis,
    requester: &str,
    spec: JobSpec,
) -> Result<crate::messages::JobId, crate::relay::PostError> {
    if spec.kind == JobKind::Training {
        let data = training_data(&spec);
        relay.post_training_job(now, requester, spec, data)
    } else {
        relay.post_job(now, requester, spec)
    }
}
