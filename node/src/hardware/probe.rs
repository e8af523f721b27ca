//! The local probes: CPU and memory (sysinfo), disk (statvfs), GPUs (NVML, then sysinfo).
//!
//! Each probe turns its failures into reason strings and runs under [`guarded`], so a panic in a
//! dependency (or in a vendor library behind it) becomes a reason too.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use aimatrix_protocol::capability::{CpuInfo, GpuInfo, GpuVendor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, System};

use super::{Disk, Memory, NvidiaDriver};

/// The library NVML is loaded from at run time (nvml-wrapper opens it with `dlopen`; the node does
/// not link against it, so it starts on machines without NVIDIA drivers).
const NVML_LIBRARY: &str = if cfg!(windows) { "nvml.dll" } else { "libnvidia-ml.so.1" };

/// What the local probes found.
pub(super) struct Local {
    pub(super) cpu: CpuInfo,
    pub(super) memory: Result<Memory, String>,
    pub(super) disk: Result<Disk, String>,
    pub(super) gpus: Vec<GpuInfo>,
    pub(super) nvidia: Result<NvidiaDriver, String>,
    pub(super) notes: Vec<String>,
}

impl Local {
    /// A detection where nothing could be probed, for `reason`.
    pub(super) fn failed(reason: String) -> Self {
        Self {
            cpu: unknown_cpu(),
            memory: Err(reason.clone()),
            disk: Err(reason.clone()),
            gpus: Vec::new(),
            nvidia: Err(format!("no NVIDIA GPU: {reason}")),
            notes: vec![reason],
        }
    }
}

/// Runs every local probe; `data_dir` is the directory whose filesystem holds the node's data.
pub(super) fn local(data_dir: Result<PathBuf, String>) -> Local {
    let mut notes = Vec::new();
    let (cpu, memory) = match guarded("CPU and memory", || cpu_and_memory(&mut notes)) {
        Ok(found) => found,
        Err(reason) => {
            notes.push(reason.clone());
            (unknown_cpu(), Err(reason))
        }
    };
    let disk = data_dir.and_then(|dir| guarded("disk", || disk(&dir)).and_then(|disk| disk));
    let (mut gpus, nvidia) = match guarded("NVIDIA GPU", || nvidia_gpus(&mut notes)) {
        Ok(found) => found,
        Err(reason) => (Vec::new(), Err(format!("no NVIDIA GPU: {reason}"))),
    };
    match guarded("GPU", || other_gpus(&mut notes)) {
        Ok(other) => gpus.extend(other),
        Err(reason) => notes.push(reason),
    }
    Local { cpu, memory, disk, gpus, nvidia, notes }
}

/// Runs `probe`, turning a panic into a reason naming `what` was being detected.
fn guarded<T>(what: &str, probe: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(probe)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        format!("{what} detection crashed: {message}")
    })
}

fn unknown_cpu() -> CpuInfo {
    CpuInfo { model: "unknown".to_owned(), physical_cores: 0, threads: 0 }
}

fn cpu_and_memory(notes: &mut Vec<String>) -> (CpuInfo, Result<Memory, String>) {
    let mut system = match System::new() {
        Ok(system) => system,
        Err(e) => {
            let reason = format!("cannot read system information: {e}");
            notes.push(format!("cpu: {reason}"));
            return (unknown_cpu(), Err(reason));
        }
    };
    (cpu(&mut system, notes), memory(&mut system))
}

fn cpu(system: &mut System, notes: &mut Vec<String>) -> CpuInfo {
    // Listing the CPUs reads /proc/cpuinfo on Linux; usage and frequency need a second sample
    // or more reads, and the profile carries neither.
    system.refresh_cpu_list(CpuRefreshKind::nothing());
    let cpus = system.cpus();
    let model = match cpus.iter().map(|c| c.brand().trim()).find(|b| !b.is_empty()) {
        Some(brand) => brand.to_owned(),
        None => {
            notes.push("cpu: the OS reports no CPU model name".to_owned());
            "unknown".to_owned()
        }
    };
    let threads = if cpus.is_empty() {
        let fallback = std::thread::available_parallelism().map_or(0, |n| n.get());
        notes.push(format!(
            "cpu: the OS lists no CPUs; counting {fallback} threads this process may use"
        ));
        fallback
    } else {
        cpus.len()
    };
    let physical_cores = match System::physical_core_count() {
        Ok(n) if n > 0 => n,
        Ok(_) | Err(_) => {
            notes.push("cpu: cannot count physical cores; assuming one per thread".to_owned());
            threads
        }
    };
    CpuInfo {
        model,
        physical_cores: u32::try_from(physical_cores).unwrap_or(u32::MAX),
        threads: u32::try_from(threads).unwrap_or(u32::MAX),
    }
}

/// Memory, with the cgroup limit applied: a node in a container must not advertise the host's
/// memory, or it claims jobs that the kernel then kills for exceeding the container's limit.
fn memory(system: &mut System) -> Result<Memory, String> {
    system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    let host_total_bytes = system.total_memory();
    if host_total_bytes == 0 {
        return Err("the OS reports no memory".to_owned());
    }
    let host_available_bytes = system.available_memory().min(host_total_bytes);
    // sysinfo reads cgroup v1 (`memory/memory.limit_in_bytes`, `memory.usage_in_bytes`) and v2
    // (`memory.max`, `memory.current`) under /sys/fs/cgroup, and answers only when a limit is set
    // at or below the machine's memory.
    let limit = system.cgroup_limits().filter(|l| l.total_memory < host_total_bytes);
    Ok(match limit {
        Some(limit) => Memory {
            total_bytes: limit.total_memory,
            available_bytes: host_available_bytes.min(limit.free_memory),
            host_total_bytes,
            cgroup_limit_bytes: Some(limit.total_memory),
        },
        None => Memory {
            total_bytes: host_total_bytes,
            available_bytes: host_available_bytes,
            host_total_bytes,
            cgroup_limit_bytes: None,
        },
    })
}

#[cfg(unix)]
fn disk(dir: &Path) -> Result<Disk, String> {
    let stat = rustix::fs::statvfs(dir)
        .map_err(|e| format!("cannot read free space of {}: {e}", dir.display()))?;
    // Sizes count in fragments (f_frsize); some filesystems leave it 0 and mean the block size.
    let unit = if stat.f_frsize > 0 { stat.f_frsize } else { stat.f_bsize };
    Ok(Disk {
        path: dir.to_owned(),
        free_bytes: stat.f_bavail.saturating_mul(unit),
        total_bytes: stat.f_blocks.saturating_mul(unit),
    })
}

#[cfg(not(unix))]
fn disk(dir: &Path) -> Result<Disk, String> {
    Err(format!(
        "cannot read free space of {}: disk detection is implemented for Unix only",
        dir.display()
    ))
}

/// NVIDIA GPUs through NVML, with the driver's versions; `Err` says why there are none.
fn nvidia_gpus(notes: &mut Vec<String>) -> (Vec<GpuInfo>, Result<NvidiaDriver, String>) {
    let nvml = match Nvml::init() {
        Ok(nvml) => nvml,
        Err(e) => return (Vec::new(), Err(format!("no NVIDIA GPU: {}", nvml_init_reason(&e)))),
    };
    let driver = NvidiaDriver {
        driver_version: nvml
            .sys_driver_version()
            .map_err(|e| notes.push(format!("nvidia: cannot read the driver version: {e}")))
            .ok(),
        cuda_version: nvml
            .sys_cuda_driver_version()
            .map(|v| {
                format!(
                    "{}.{}",
                    nvml_wrapper::cuda_driver_version_major(v),
                    nvml_wrapper::cuda_driver_version_minor(v)
                )
            })
            .map_err(|e| notes.push(format!("nvidia: cannot read the CUDA version: {e}")))
            .ok(),
    };
    let count = match nvml.device_count() {
        Ok(0) => return (Vec::new(), Err("no NVIDIA GPU: NVML lists no devices".to_owned())),
        Ok(n) => n,
        Err(e) => {
            return (Vec::new(), Err(format!("no NVIDIA GPU: NVML cannot count devices: {e}")))
        }
    };
    let gpus: Vec<GpuInfo> =
        (0..count).filter_map(|i| nvidia_gpu(&nvml, i, &driver, notes)).collect();
    if gpus.is_empty() {
        let reason = format!("no NVIDIA GPU: none of the {count} devices NVML lists can be read");
        return (gpus, Err(reason));
    }
    (gpus, Ok(driver))
}

/// One NVIDIA GPU; `None` (with a note) when NVML cannot open it.
fn nvidia_gpu(
    nvml: &Nvml,
    index: u32,
    driver: &NvidiaDriver,
    notes: &mut Vec<String>,
) -> Option<GpuInfo> {
    let device = nvml
        .device_by_index(index)
        .map_err(|e| notes.push(format!("nvidia: GPU {index} skipped: {e}")))
        .ok()?;
    let name = device.name().unwrap_or_else(|e| {
        notes.push(format!("nvidia: GPU {index}: cannot read its name: {e}"));
        format!("NVIDIA GPU {index}")
    });
    let vram_bytes = device.memory_info().map(|m| m.total).unwrap_or_else(|e| {
        notes.push(format!("nvidia: GPU {index} ({name}): cannot read its memory: {e}"));
        0
    });
    let compute_capability = device
        .cuda_compute_capability()
        .map_err(|e| {
            notes.push(format!("nvidia: GPU {index} ({name}): no compute capability: {e}"));
        })
        .ok()
        .and_then(|c| Some((u32::try_from(c.major).ok()?, u32::try_from(c.minor).ok()?)));
    Some(GpuInfo {
        vendor: GpuVendor::Nvidia,
        name,
        vram_bytes,
        compute_capability,
        driver: driver.driver_version.clone(),
    })
}

/// Why NVML did not start, in words an operator can act on.
fn nvml_init_reason(e: &NvmlError) -> String {
    match e {
        NvmlError::LibloadingError(e) => {
            format!("the NVIDIA management library ({NVML_LIBRARY}) cannot be loaded: {e}")
        }
        NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".to_owned(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".to_owned(),
        e => format!("NVML failed to start: {e}"),
    }
}

/// GPUs of other vendors, through sysinfo (PCI display devices under /sys/class/drm on Linux,
/// with VRAM from sysfs for AMD and from Vulkan for others; IOKit on macOS; DXGI on Windows).
///
/// NVIDIA devices are skipped here: the NVML probe reports them with what CUDA jobs need. Vendors
/// other than AMD, Intel and Apple make display adapters (server BMC graphics, virtual VGA) that
/// no job can compute on; they are noted, not advertised, since an advertised GPU makes the
/// network keep the node free for GPU jobs.
fn other_gpus(notes: &mut Vec<String>) -> Vec<GpuInfo> {
    let list = match sysinfo::Gpus::new_with_refreshed_list() {
        Ok(list) => list,
        Err(e) => {
            notes.push(format!("gpu: cannot list non-NVIDIA GPUs: {e}"));
            return Vec::new();
        }
    };
    let mut gpus = Vec::new();
    for gpu in &list {
        let vendor_name = gpu.vendor().unwrap_or("unknown vendor");
        let name = gpu.model().map_or_else(|| format!("{vendor_name} GPU"), str::to_owned);
        let vendor = match gpu_vendor(vendor_name) {
            // Reported by the NVML probe (sysinfo itself lists NVIDIA GPUs only through NVML).
            Some(GpuVendor::Nvidia) => continue,
            Some(vendor) => vendor,
            None => {
                notes.push(format!(
                    "gpu: display adapter {name} ({vendor_name}) at PCI {} ignored: not a \
                     compute GPU",
                    gpu.pci()
                ));
                continue;
            }
        };
        gpus.push(GpuInfo {
            vendor,
            name,
            vram_bytes: gpu.total_memory().unwrap_or(0),
            compute_capability: None,
            driver: None,
        });
    }
    gpus
}

/// The vendor from sysinfo's vendor name (the PCI ID database's, e.g. `Advanced Micro Devices,
/// Inc. [AMD/ATI]`); `None` for vendors that make no compute GPUs.
fn gpu_vendor(name: &str) -> Option<GpuVendor> {
    let lower = name.to_ascii_lowercase();
    if lower.contains("nvidia") {
        Some(GpuVendor::Nvidia)
    } else if lower.contains("amd") || lower.contains("advanced micro devices") {
        Some(GpuVendor::Amd)
    } else if lower.contains("intel") {
        Some(GpuVendor::Intel)
    } else if lower.contains("apple") {
        Some(GpuVendor::Apple)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_names_from_the_pci_database() {
        assert_eq!(gpu_vendor("NVIDIA Corporation"), Some(GpuVendor::Nvidia));
        assert_eq!(gpu_vendor("Advanced Micro Devices, Inc. [AMD/ATI]"), Some(GpuVendor::Amd));
        assert_eq!(gpu_vendor("Intel Corporation"), Some(GpuVendor::Intel));
        assert_eq!(gpu_vendor("Apple"), Some(GpuVendor::Apple));
        assert_eq!(gpu_vendor("ASPEED Technology, Inc."), None);
        assert_eq!(gpu_vendor("Red Hat, Inc."), None);
    }

    #[test]
    fn a_panicking_probe_becomes_a_reason() {
        let reason = guarded("test", || -> u32 { panic!("boom") }).unwrap_err();
        assert_eq!(reason, "test detection crashed: boom");
        assert_eq!(guarded("test", || 7), Ok(7));
    }

    #[test]
    fn a_missing_data_dir_is_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("missing");
        let reason = disk(&gone).unwrap_err();
        assert!(reason.contains("missing"), "{reason}");
        let here = disk(dir.path()).unwrap();
        assert!(here.total_bytes >= here.free_bytes);
    }
}
