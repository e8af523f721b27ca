//! `aimatrix-node detect`: show the hardware and sandboxes this node would advertise.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use aimatrix_protocol::capability::GpuInfo;
use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};

use crate::data_dir;
use crate::hardware::advice::{self, gib, KindReason, Recommendation};
use crate::hardware::{self, Detected};
use crate::policy::Policy;

/// Detect this machine's CPU, memory, disk, GPUs and sandboxes, the job kinds it can run and
/// what its hardware is good for.
///
/// Shows exactly the capability profile the node advertises when it joins the network with no
/// node.toml (the default policy). Parts that cannot be detected (no GPU, no Docker engine) are
/// reported with the reason, never as an error.
#[derive(Debug, Args)]
pub(crate) struct DetectArgs {
    /// The node's data directory (its filesystem's free space is the node's disk).
    #[arg(long, value_name = "DIR", env = "AIMATRIX_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print one JSON object instead of the human summary.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: DetectArgs) -> anyhow::Result<ExitCode> {
    let data_dir = data_dir::resolve(args.data_dir.as_deref()).map_err(|e| format!("{e:#}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let detected = runtime.block_on(hardware::detect(data_dir));
    let recommendation = advice::recommend(&detected);
    if args.json {
        println!("{}", to_json(&detected, &recommendation)?);
    } else {
        print_human(&detected, &recommendation)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn to_json(d: &Detected, rec: &Recommendation) -> anyhow::Result<Value> {
    let memory = match &d.memory {
        Ok(m) => json!({
            "total_bytes": m.total_bytes,
            "available_bytes": m.available_bytes,
            "host_total_bytes": m.host_total_bytes,
            "cgroup_limit_bytes": m.cgroup_limit_bytes,
        }),
        Err(reason) => json!({ "total_bytes": 0, "available_bytes": 0, "reason": reason }),
    };
    let disk = match &d.disk {
        Ok(disk) => json!({
            "path": disk.path.display().to_string(),
            "free_bytes": disk.free_bytes,
            "total_bytes": disk.total_bytes,
        }),
        Err(reason) => json!({ "free_bytes": 0, "reason": reason }),
    };
    let profile = Policy::default().apply(hardware::to_profile(d));
    let docker = match d.docker_version() {
        Ok(version) => json!({ "available": true, "version": version }),
        Err(reason) => json!({ "available": false, "reason": reason }),
    };
    let docker_gpu = match d.docker_gpu() {
        Ok(()) => json!({ "available": true }),
        Err(reason) => json!({ "available": false, "reason": reason }),
    };
    let cuda = match &d.nvidia {
        Ok(driver) => json!({
            "available": true,
            "driver_version": driver.driver_version,
            "cuda_version": driver.cuda_version,
        }),
        Err(reason) => json!({ "available": false, "reason": reason }),
    };
    Ok(json!({
        "cpu": d.cpu,
        "memory": memory,
        "disk": disk,
        "gpus": d.gpus.iter().map(gpu_json).collect::<Vec<_>>(),
        "runtimes": {
            "wasm": { "available": profile.runtimes.wasm },
            "docker": docker,
            "docker_gpu": docker_gpu,
            "cuda": cuda,
        },
        "job_kinds": advice::job_kinds(d),
        "recommendation": recommendation_json(rec),
        "notes": d.notes,
        "profile": serde_json::to_value(&profile).context("cannot encode the profile")?,
    }))
}

fn gpu_json(gpu: &GpuInfo) -> Value {
    let compute_capability =
        gpu.compute_capability.map(|(major, minor)| format!("{major}.{minor}"));
    json!({
        "vendor": gpu.vendor,
        "name": gpu.name,
        "vram_bytes": gpu.vram_bytes,
        "compute_capability": compute_capability,
        "driver": gpu.driver,
    })
}

fn recommendation_json(rec: &Recommendation) -> Value {
    let kind_reasons = |list: &[KindReason]| -> Vec<Value> {
        list.iter().map(|l| json!({ "kind": l.kind, "reason": l.reason })).collect()
    };
    json!({
        "good_for": rec.good_for,
        "leave_to_others": kind_reasons(&rec.leave_to_others),
        "not_offered": kind_reasons(&rec.not_offered),
        "gpu": rec.gpu.as_ref().map(|g| json!({
            "name": g.name,
            "vram_bytes": g.vram_bytes,
            "lora_params": g.lora_params,
            "qlora_params": g.qlora_params,
            "full_finetune_params": g.full_finetune_params,
        })),
    })
}

/// Label column width in the human summary.
const LABEL: usize = 12;

fn print_human(d: &Detected, rec: &Recommendation) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let mut line = |label: &str, text: &str| writeln!(out, "{label:<LABEL$}{text}");

    let cpu = &d.cpu;
    line(
        "cpu",
        &format!("{}: {} physical cores, {} threads", cpu.model, cpu.physical_cores, cpu.threads),
    )?;
    let memory = match &d.memory {
        Ok(m) => match m.cgroup_limit_bytes {
            Some(limit) => format!(
                "{} total (container limit; the machine has {}), {} available",
                gib(limit),
                gib(m.host_total_bytes),
                gib(m.available_bytes)
            ),
            None => format!("{} total, {} available", gib(m.total_bytes), gib(m.available_bytes)),
        },
        Err(reason) => format!("unknown ({reason})"),
    };
    line("memory", &memory)?;
    let disk = match &d.disk {
        Ok(disk) => format!(
            "{} free of {} ({})",
            gib(disk.free_bytes),
            gib(disk.total_bytes),
            disk.path.display()
        ),
        Err(reason) => format!("unknown ({reason})"),
    };
    line("disk", &disk)?;
    if d.gpus.is_empty() {
        line("gpus", "none")?;
    }
    for (i, gpu) in d.gpus.iter().enumerate() {
        let mut text = format!("{} ({})", gpu.name, gib(gpu.vram_bytes));
        if let Some((major, minor)) = gpu.compute_capability {
            text.push_str(&format!(", compute capability {major}.{minor}"));
        }
        line(if i == 0 { "gpus" } else { "" }, &text)?;
    }

    let yes_no = |r: Result<String, String>| match r {
        Ok(detail) if detail.is_empty() => "yes".to_owned(),
        Ok(detail) => format!("yes ({detail})"),
        Err(reason) => format!("no ({reason})"),
    };
    line("runtimes", "wasm: yes")?;
    let docker = d.docker_version().map(|v| format!("version {v}")).map_err(str::to_owned);
    line("", &format!("docker: {}", yes_no(docker)))?;
    let cuda = d.nvidia.clone().map(|n| {
        let driver = n.driver_version.unwrap_or_else(|| "unknown".into());
        let cuda = n.cuda_version.unwrap_or_else(|| "unknown".into());
        format!("driver {driver}, CUDA {cuda}")
    });
    line("", &format!("cuda: {}", yes_no(cuda)))?;
    // The NVML reason is on the cuda line already; say it once.
    let docker_gpu = match (&d.nvidia, d.docker_gpu()) {
        (Err(_), Err(_)) => Err("no NVIDIA GPU".to_owned()),
        (_, result) => result.map(|()| String::new()),
    };
    line("", &format!("docker-gpu: {}", yes_no(docker_gpu)))?;

    let kinds: Vec<&str> = advice::job_kinds(d).iter().map(|k| k.name()).collect();
    line("job kinds", &if kinds.is_empty() { "none".to_owned() } else { kinds.join(", ") })?;
    for (i, good) in rec.good_for.iter().enumerate() {
        line(if i == 0 { "good for" } else { "" }, good)?;
    }
    for (i, leave) in rec.leave_to_others.iter().enumerate() {
        let text = format!("{} to others: {}", leave.kind, leave.reason);
        line(if i == 0 { "leave" } else { "" }, &text)?;
    }
    for (i, kind) in rec.not_offered.iter().enumerate() {
        let text = format!("{}: {}", kind.kind, kind.reason);
        line(if i == 0 { "not offered" } else { "" }, &text)?;
    }
    for (i, note) in d.notes.iter().enumerate() {
        line(if i == 0 { "notes" } else { "" }, note)?;
    }
    Ok(())
}
