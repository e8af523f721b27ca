//! Hardware detection: what this machine has, which sandboxes it can run, and so which jobs it
//! can serve.
//!
//! [`detect`] looks at the CPU, memory (cgroup limits applied), free disk in the data dir, GPUs
//! (NVIDIA through NVML, others through sysinfo) and the Docker engine. Every probe that fails
//! becomes a reason string in the result, never an error or a panic: a node with no GPU, no Docker
//! or an unreadable `/proc` still gets a profile, and the operator sees why a part is missing.
//!
//! [`to_profile`] turns the detection into the [`CapabilityProfile`] the node advertises, so
//! `detect` shows exactly what `join` will send. [`advice`] derives the job kinds the node can
//! serve and what its hardware is good for.

use std::path::PathBuf;
use std::time::Duration;

use aimatrix_protocol::capability::{
    CapabilityProfile, CpuInfo, DiskInfo, GpuInfo, GpuVendor, Load, MemoryInfo, NodePolicy,
    Runtimes,
};
use aimatrix_sandbox::docker::{self, DockerStatus};

pub(crate) mod advice;
mod probe;

/// How long the Docker probe may take before detection reports the engine as unavailable.
///
/// The probe has its own timeouts; this bounds the whole of it, so `detect` stays fast even when
/// a socket accepts connections and never answers.
const DOCKER_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything detection found, with a reason for each part it could not find.
#[derive(Clone, Debug)]
pub(crate) struct Detected {
    /// The CPU (`model` is `"unknown"` and counts are best effort when probing failed; see
    /// [`Self::notes`]).
    pub(crate) cpu: CpuInfo,
    /// Memory, or why it could not be read.
    pub(crate) memory: Result<Memory, String>,
    /// Free space for the data dir, or why it could not be read.
    pub(crate) disk: Result<Disk, String>,
    /// GPUs jobs can use: NVIDIA ones through NVML, then other vendors' through sysinfo.
    pub(crate) gpus: Vec<GpuInfo>,
    /// The NVIDIA driver as NVML reports it, or `"no NVIDIA GPU: <reason>"`.
    pub(crate) nvidia: Result<NvidiaDriver, String>,
    /// The Docker engine.
    pub(crate) docker: DockerStatus,
    /// Things the operator should know that do not fit a field (partial failures, ignored
    /// devices).
    pub(crate) notes: Vec<String>,
}

/// Memory usable by the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Memory {
    /// Total memory usable: the machine's, or the cgroup limit when it is lower.
    pub(crate) total_bytes: u64,
    /// Available now, within the cgroup limit when one applies.
    pub(crate) available_bytes: u64,
    /// The machine's memory, as the kernel reports it (`MemTotal`).
    pub(crate) host_total_bytes: u64,
    /// The container's (cgroup's) memory limit, when one is set below the machine's memory.
    pub(crate) cgroup_limit_bytes: Option<u64>,
}

/// Space on the data dir's filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Disk {
    /// The data dir.
    pub(crate) path: PathBuf,
    /// Bytes an unprivileged process can still write (`f_bavail`).
    pub(crate) free_bytes: u64,
    /// Size of the filesystem.
    pub(crate) total_bytes: u64,
}

/// The NVIDIA driver stack, when NVML could be initialized.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct NvidiaDriver {
    /// Driver version (`550.54.15`).
    pub(crate) driver_version: Option<String>,
    /// Highest CUDA version the driver supports (`12.4`).
    pub(crate) cuda_version: Option<String>,
}

/// Detects this machine's hardware and sandboxes; `data_dir` is where the node keeps its data
/// (its filesystem's free space is the node's disk), or why it could not be resolved.
///
/// The local probes run on a blocking thread while the Docker engine is asked its version, so
/// the whole takes about as long as the slower of the two, and at most a few seconds.
pub(crate) async fn detect(data_dir: Result<PathBuf, String>) -> Detected {
    let local = tokio::task::spawn_blocking(move || probe::local(data_dir));
    let docker = async {
        tokio::time::timeout(DOCKER_PROBE_TIMEOUT, docker::probe()).await.unwrap_or_else(|_| {
            DockerStatus::Unavailable {
                reason: format!(
                    "the Docker probe did not finish within {} s",
                    DOCKER_PROBE_TIMEOUT.as_secs()
                ),
            }
        })
    };
    let (local, docker) = tokio::join!(local, docker);
    // Each probe catches its own panics; a failed join would mean the blocking pool itself is
    // gone, and even then the node gets a (bare) detection rather than a crash.
    let local = local.unwrap_or_else(|e| probe::Local::failed(format!("detection failed: {e}")));
    Detected {
        cpu: local.cpu,
        memory: local.memory,
        disk: local.disk,
        gpus: local.gpus,
        nvidia: local.nvidia,
        docker,
        notes: local.notes,
    }
}

/// The profile this node advertises for what was detected: owner policy at its defaults and no
/// load (a fresh node). `join` advertises this value.
pub(crate) fn to_profile(detected: &Detected) -> CapabilityProfile {
    let memory = detected.memory.as_ref().map_or(MemoryInfo::default(), |m| MemoryInfo {
        total_bytes: m.total_bytes,
        available_bytes: m.available_bytes,
    });
    let disk = detected
        .disk
        .as_ref()
        .map_or(DiskInfo::default(), |d| DiskInfo { free_bytes: d.free_bytes });
    CapabilityProfile {
        cpu: detected.cpu.clone(),
        memory,
        disk,
        gpus: detected.gpus.clone(),
        runtimes: detected.runtimes(),
        policy: NodePolicy::default(),
        load: Load::default(),
    }
}

impl Detected {
    /// The sandboxes the node offers.
    pub(crate) fn runtimes(&self) -> Runtimes {
        Runtimes {
            // wasmtime is compiled into the node: it runs wherever the node runs.
            wasm: true,
            docker: self.docker_version().is_ok(),
            docker_gpu: self.docker_gpu().is_ok(),
        }
    }

    /// The Docker engine's version, or why there is no usable engine.
    pub(crate) fn docker_version(&self) -> Result<&str, &str> {
        match &self.docker {
            DockerStatus::Available { version, .. } => Ok(version),
            DockerStatus::Unavailable { reason } => Err(reason),
        }
    }

    /// Whether GPU containers can run: an engine with the NVIDIA runtime and an NVIDIA GPU that
    /// NVML sees; otherwise why not.
    pub(crate) fn docker_gpu(&self) -> Result<(), String> {
        let nvidia_runtime = match &self.docker {
            DockerStatus::Available { nvidia_runtime, .. } => *nvidia_runtime,
            DockerStatus::Unavailable { .. } => {
                return Err("needs docker, which is unavailable".to_owned())
            }
        };
        if let Err(reason) = &self.nvidia {
            return Err(reason.clone());
        }
        if !self.gpus.iter().any(|g| g.vendor == GpuVendor::Nvidia) {
            return Err("no NVIDIA GPU could be read through NVML".to_owned());
        }
        if !nvidia_runtime {
            return Err("the Docker engine has no \"nvidia\" runtime; install the NVIDIA \
                        Container Toolkit and restart Docker"
                .to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aimatrix_protocol::capability::GIB;

    /// A detection with the given GPUs and Docker status, 8 cores and `ram_gb` GiB.
    pub(crate) fn detected(ram_gb: u64, vram_gb: &[u64], docker: DockerStatus) -> Detected {
        let gpus: Vec<GpuInfo> = vram_gb
            .iter()
            .map(|gb| GpuInfo {
                vendor: GpuVendor::Nvidia,
                name: format!("Test GPU {gb} GiB"),
                vram_bytes: gb * GIB,
                compute_capability: Some((8, 6)),
                driver: Some("550.54".to_owned()),
            })
            .collect();
        let nvidia = if gpus.is_empty() {
            Err("no NVIDIA GPU: the NVIDIA management library cannot be loaded".to_owned())
        } else {
            Ok(NvidiaDriver {
                driver_version: Some("550.54".to_owned()),
                cuda_version: Some("12.4".to_owned()),
            })
        };
        Detected {
            cpu: CpuInfo { model: "Test CPU".to_owned(), physical_cores: 8, threads: 16 },
            memory: Ok(Memory {
                total_bytes: ram_gb * GIB,
                available_bytes: ram_gb * GIB / 2,
                host_total_bytes: ram_gb * GIB,
                cgroup_limit_bytes: None,
            }),
            disk: Ok(Disk {
                path: PathBuf::from("/data"),
                free_bytes: 100 * GIB,
                total_bytes: 200 * GIB,
            }),
            gpus,
            nvidia,
            docker,
            notes: Vec::new(),
        }
    }

    pub(crate) fn docker_with(nvidia_runtime: bool) -> DockerStatus {
        DockerStatus::Available { version: "27.3.1".to_owned(), nvidia_runtime }
    }

    pub(crate) fn no_docker() -> DockerStatus {
        DockerStatus::Unavailable { reason: "cannot connect: no socket".to_owned() }
    }

    #[test]
    fn profile_carries_what_was_detected() {
        let d = detected(32, &[24], docker_with(true));
        let p = to_profile(&d);
        assert_eq!(p.cpu, d.cpu);
        assert_eq!(p.memory.total_bytes, 32 * GIB);
        assert_eq!(p.memory.available_bytes, 16 * GIB);
        assert_eq!(p.disk.free_bytes, 100 * GIB);
        assert_eq!(p.gpus, d.gpus);
        assert_eq!(p.runtimes, Runtimes { wasm: true, docker: true, docker_gpu: true });
        assert_eq!(p.policy, NodePolicy::default());
        assert_eq!(p.load, Load::default());
    }

    #[test]
    fn failed_probes_advertise_zero_not_garbage() {
        let mut d = detected(32, &[], no_docker());
        d.memory = Err("cannot read /proc/meminfo".to_owned());
        d.disk = Err("statvfs failed".to_owned());
        let p = to_profile(&d);
        assert_eq!(p.memory, MemoryInfo::default());
        assert_eq!(p.disk, DiskInfo::default());
        assert_eq!(p.runtimes, Runtimes { wasm: true, docker: false, docker_gpu: false });
    }

    #[test]
    fn docker_gpu_needs_engine_runtime_and_a_gpu() {
        let no_gpu = detected(32, &[], docker_with(true));
        assert!(no_gpu.docker_gpu().unwrap_err().starts_with("no NVIDIA GPU"));
        let no_runtime = detected(32, &[24], docker_with(false));
        assert!(no_runtime.docker_gpu().unwrap_err().contains("nvidia"));
        let no_engine = detected(32, &[24], no_docker());
        assert!(no_engine.docker_gpu().unwrap_err().contains("needs docker"));
        assert!(detected(32, &[24], docker_with(true)).docker_gpu().is_ok());
    }
}
