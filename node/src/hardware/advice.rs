//! What a node's hardware is good for: the job kinds it can serve, and the model sizes that fit.
//!
//! # Which job kinds
//!
//! - `batch`, `data_processing`, `agent_testing`, `training`: any sandbox. wasmtime is built into
//!   the node, so every node serves them; a job that needs GPUs is still matched job by job
//!   (`requirements.gpus` needs docker-gpu).
//! - `serving`: Docker (a model server is a long-running container), and either docker-gpu or
//!   at least [`SERVING_CPU_MEMORY_MIN_BYTES`] of memory to hold a quantized model on the CPU.
//!
//! # Model sizes (a rule of thumb)
//!
//! Bytes of memory per parameter, overheads included; they assume a modest context and batch,
//! and a model on one device (no sharding across GPUs):
//!
//! - inference, fp16/bf16 weights: 2.4 (2 for the weights, + 20% for the KV cache of a modest
//!   context, activations and the runtime);
//! - inference, 4-bit weights (GPTQ, AWQ, GGUF Q4): 0.6 (0.5 + 20%);
//! - LoRA fine-tuning on an fp16 base: 3.0 (2 for the frozen base, + 50% for the adapters, their
//!   Adam state and activations with gradient checkpointing);
//! - QLoRA fine-tuning on a 4-bit base: 0.8 (0.5 + 60%; the QLoRA paper fits a 65B model in a
//!   48 GB GPU, 0.74);
//! - full fine-tuning with Adam in mixed precision: 19.2 (16 for fp16 weights and gradients, fp32
//!   master weights and two moments, + 20% for activations).
//!
//! The GPU budget is the largest NVIDIA GPU's VRAM. The CPU budget is
//! [`CPU_MEMORY_SHARE_PERCENT`] of the node's memory (the OS and the node keep the rest), and
//! only 4-bit inference is counted on the CPU: fp16 inference and any fine-tuning of a language
//! model are too slow there to be worth a job. Memory is not the CPU's only limit: tokens per
//! second fall with model size, so a CPU is recommended at most
//! [`CPU_SERVE_PARAMS_PER_CORE`] parameters per physical core (llama.cpp serves a 4-bit 7B model
//! on 8 cores at a usable ~10 tokens/s).

use aimatrix_protocol::capability::{GpuVendor, GIB};
use aimatrix_protocol::job::{JobKind, JobKindSet};

use aimatrix_sandbox::docker::DockerStatus;

use super::Detected;

/// Memory a node without a GPU needs to be offered serving jobs.
pub(crate) const SERVING_CPU_MEMORY_MIN_BYTES: u64 = 8 * GIB;

/// Share of memory a CPU-served model may take, in percent.
pub(crate) const CPU_MEMORY_SHARE_PERCENT: u64 = 75;

/// Largest model recommended for CPU serving, per physical core, in parameters.
pub(crate) const CPU_SERVE_PARAMS_PER_CORE: u64 = 1_000_000_000;

/// Bytes per parameter, in tenths of a byte (see the module docs for where they come from).
mod tenths_per_param {
    pub(super) const SERVE_FP16: u64 = 24;
    pub(super) const SERVE_4BIT: u64 = 6;
    pub(super) const LORA_FP16: u64 = 30;
    pub(super) const QLORA_4BIT: u64 = 8;
    pub(super) const FULL_FINETUNE: u64 = 192;
}

/// The largest models a GPU holds, in parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GpuFit {
    /// The GPU the figures are for (the one with the most VRAM).
    pub(crate) name: String,
    /// Its VRAM.
    pub(crate) vram_bytes: u64,
    /// Inference with fp16 weights.
    pub(crate) serve_fp16_params: u64,
    /// Inference with 4-bit weights.
    pub(crate) serve_4bit_params: u64,
    /// LoRA fine-tuning on an fp16 base.
    pub(crate) lora_params: u64,
    /// QLoRA fine-tuning on a 4-bit base.
    pub(crate) qlora_params: u64,
    /// Full fine-tuning.
    pub(crate) full_finetune_params: u64,
}

/// The largest model worth serving on the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CpuFit {
    /// Memory a model may take.
    pub(crate) memory_budget_bytes: u64,
    /// The largest 4-bit model that fits in that memory.
    pub(crate) memory_fit_4bit_params: u64,
    /// The largest 4-bit model recommended: the memory fit, capped by the cores.
    pub(crate) serve_4bit_params: u64,
}

/// A kind of work better left to other nodes, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LeaveToOthers {
    /// The job kind.
    pub(crate) kind: JobKind,
    /// Which of its jobs, and why.
    pub(crate) reason: String,
}

/// What the hardware is good for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Recommendation {
    /// Model sizes on the best NVIDIA GPU, if there is one.
    pub(crate) gpu: Option<GpuFit>,
    /// Model sizes on the CPU.
    pub(crate) cpu: CpuFit,
    /// Short sentences: the work this node suits.
    pub(crate) good_for: Vec<String>,
    /// Work to leave to other nodes.
    pub(crate) leave_to_others: Vec<LeaveToOthers>,
}

/// Whether the node can serve jobs of `kind`, or why not.
pub(crate) fn kind_support(detected: &Detected, kind: JobKind) -> Result<(), String> {
    let runtimes = detected.runtimes();
    match kind {
        JobKind::Training | JobKind::Batch | JobKind::DataProcessing | JobKind::AgentTesting => {
            if runtimes.wasm || runtimes.docker {
                Ok(())
            } else {
                Err("needs the wasm or docker sandbox".to_owned())
            }
        }
        JobKind::Serving => {
            if let Err(reason) = detected.docker_version() {
                return Err(format!("needs docker, which is unavailable: {reason}"));
            }
            let memory = detected.memory.as_ref().map_or(0, |m| m.total_bytes);
            if runtimes.docker_gpu || memory >= SERVING_CPU_MEMORY_MIN_BYTES {
                Ok(())
            } else {
                Err(format!(
                    "without a GPU, serving needs {} of memory to hold a model; this node has {}",
                    gib(SERVING_CPU_MEMORY_MIN_BYTES),
                    gib(memory)
                ))
            }
        }
    }
}

/// The job kinds the node can serve.
pub(crate) fn job_kinds(detected: &Detected) -> JobKindSet {
    JobKind::ALL.into_iter().filter(|k| kind_support(detected, *k).is_ok()).collect()
}

/// What the node's hardware is good for, and what to leave to others.
pub(crate) fn recommend(detected: &Detected) -> Recommendation {
    let gpu = gpu_fit(detected);
    let cpu = cpu_fit(detected);
    let kinds = job_kinds(detected);
    let docker_gpu = detected.docker_gpu();
    let mut good_for = Vec::new();
    let mut leave_to_others = Vec::new();

    let cpu_kinds: Vec<&str> = [JobKind::Batch, JobKind::DataProcessing, JobKind::AgentTesting]
        .into_iter()
        .filter(|k| kinds.contains(*k))
        .map(JobKind::name)
        .collect();
    if !cpu_kinds.is_empty() {
        good_for.push(format!(
            "{} jobs on {} threads",
            cpu_kinds.join(", "),
            detected.cpu.threads.max(1)
        ));
    }
    if kinds.contains(JobKind::Training) {
        good_for.push("training rounds of small models on the CPU (the wasm training step)".into());
    }
    if let Some(fit) = &gpu {
        let via = match &docker_gpu {
            Ok(()) => String::new(),
            Err(reason) => format!(" once docker-gpu works ({reason})"),
        };
        good_for.push(format!(
            "on {} ({}): serving models up to {} parameters in fp16 or {} in 4-bit; \
             fine-tuning up to {} with LoRA, {} with QLoRA, {} in full{via}",
            fit.name,
            gib(fit.vram_bytes),
            params(fit.serve_fp16_params),
            params(fit.serve_4bit_params),
            params(fit.lora_params),
            params(fit.qlora_params),
            params(fit.full_finetune_params),
        ));
    }
    if kinds.contains(JobKind::Serving) && docker_gpu.is_err() {
        good_for.push(format!(
            "serving 4-bit models up to {} parameters on the CPU ({} physical cores)",
            params(cpu.serve_4bit_params),
            detected.cpu.physical_cores.max(1)
        ));
    }

    for kind in JobKind::ALL {
        if let Err(reason) = kind_support(detected, kind) {
            leave_to_others.push(LeaveToOthers { kind, reason });
        }
    }
    if docker_gpu.is_err() {
        let missing = missing_for_gpu_jobs(detected);
        leave_to_others.push(LeaveToOthers {
            kind: JobKind::Training,
            reason: format!("GPU training and fine-tuning ({missing})"),
        });
        if kinds.contains(JobKind::Serving) {
            leave_to_others.push(LeaveToOthers {
                kind: JobKind::Serving,
                reason: format!(
                    "models over {} parameters (4-bit) and anything needing a GPU ({missing})",
                    params(cpu.serve_4bit_params)
                ),
            });
        }
    }
    Recommendation { gpu, cpu, good_for, leave_to_others }
}

/// The first thing GPU jobs miss on this node, in a few words (the runtimes say it in full).
fn missing_for_gpu_jobs(detected: &Detected) -> &'static str {
    let nvidia_gpu = detected.gpus.iter().any(|g| g.vendor == GpuVendor::Nvidia);
    match &detected.docker {
        _ if !nvidia_gpu => "no NVIDIA GPU",
        DockerStatus::Unavailable { .. } => "no Docker engine",
        DockerStatus::Available { nvidia_runtime: false, .. } => "Docker has no nvidia runtime",
        DockerStatus::Available { nvidia_runtime: true, .. } => "no docker-gpu",
    }
}

/// Figures for the NVIDIA GPU with the most VRAM.
fn gpu_fit(detected: &Detected) -> Option<GpuFit> {
    let best = detected
        .gpus
        .iter()
        .filter(|g| g.vendor == GpuVendor::Nvidia && g.vram_bytes > 0)
        .max_by_key(|g| g.vram_bytes)?;
    let fits = |tenths| params_fitting(best.vram_bytes, tenths);
    Some(GpuFit {
        name: best.name.clone(),
        vram_bytes: best.vram_bytes,
        serve_fp16_params: fits(tenths_per_param::SERVE_FP16),
        serve_4bit_params: fits(tenths_per_param::SERVE_4BIT),
        lora_params: fits(tenths_per_param::LORA_FP16),
        qlora_params: fits(tenths_per_param::QLORA_4BIT),
        full_finetune_params: fits(tenths_per_param::FULL_FINETUNE),
    })
}

fn cpu_fit(detected: &Detected) -> CpuFit {
    let memory = detected.memory.as_ref().map_or(0, |m| m.total_bytes);
    let memory_budget_bytes =
        u64::try_from(u128::from(memory) * u128::from(CPU_MEMORY_SHARE_PERCENT) / 100)
            .unwrap_or(u64::MAX);
    let memory_fit_4bit_params = params_fitting(memory_budget_bytes, tenths_per_param::SERVE_4BIT);
    let cores = u64::from(detected.cpu.physical_cores.max(1));
    CpuFit {
        memory_budget_bytes,
        memory_fit_4bit_params,
        serve_4bit_params: memory_fit_4bit_params
            .min(cores.saturating_mul(CPU_SERVE_PARAMS_PER_CORE)),
    }
}

/// Parameters that fit in `bytes` at `tenths` tenths of a byte each.
fn params_fitting(bytes: u64, tenths: u64) -> u64 {
    assert!(tenths > 0, "bytes per parameter must be positive");
    u64::try_from(u128::from(bytes) * 10 / u128::from(tenths)).unwrap_or(u64::MAX)
}

/// A parameter count the way model cards write it: `7.2B`, `350M`.
pub(crate) fn params(n: u64) -> String {
    const BILLION: u64 = 1_000_000_000;
    const MILLION: u64 = 1_000_000;
    if n >= BILLION {
        format!("{:.1}B", n as f64 / BILLION as f64)
    } else if n >= MILLION {
        format!("{}M", n / MILLION)
    } else {
        "under 1M".to_owned()
    }
}

/// Bytes in GiB with one decimal: `23.5 GiB`.
pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::tests::{detected, docker_with, no_docker};

    fn kinds(set: JobKindSet) -> Vec<&'static str> {
        set.iter().map(JobKind::name).collect()
    }

    #[test]
    fn a_cpu_node_without_docker_serves_everything_but_serving() {
        let d = detected(32, &[], no_docker());
        assert_eq!(kinds(job_kinds(&d)), ["training", "batch", "data_processing", "agent_testing"]);
        let r = recommend(&d);
        assert!(r.gpu.is_none());
        let left: Vec<_> = r.leave_to_others.iter().map(|l| l.kind).collect();
        assert_eq!(left, [JobKind::Serving, JobKind::Training]);
        assert!(r.leave_to_others[0].reason.contains("needs docker"));
        assert_eq!(r.leave_to_others[1].reason, "GPU training and fine-tuning (no NVIDIA GPU)");
    }

    #[test]
    fn serving_needs_docker_and_a_gpu_or_enough_memory() {
        assert!(job_kinds(&detected(16, &[], docker_with(false))).contains(JobKind::Serving));
        let small = detected(4, &[], docker_with(false));
        assert!(kind_support(&small, JobKind::Serving).unwrap_err().contains("8.0 GiB"));
        assert!(job_kinds(&detected(4, &[24], docker_with(true))).contains(JobKind::Serving));
        // A GPU the engine cannot hand to containers does not make up for the memory.
        assert!(!job_kinds(&detected(4, &[24], docker_with(false))).contains(JobKind::Serving));
    }

    #[test]
    fn model_sizes_follow_the_documented_bytes_per_parameter() {
        let d = detected(64, &[8, 24], docker_with(true));
        let fit = recommend(&d).gpu.unwrap();
        assert_eq!(fit.vram_bytes, 24 * GIB);
        let vram = 24 * GIB;
        assert_eq!(fit.serve_fp16_params, vram * 10 / 24); // 2.4 B/param
        assert_eq!(fit.serve_4bit_params, vram * 10 / 6); // 0.6 B/param
        assert_eq!(fit.lora_params, vram / 3); // 3 B/param
        assert_eq!(fit.qlora_params, vram * 10 / 8); // 0.8 B/param
        assert_eq!(fit.full_finetune_params, vram * 10 / 192); // 19.2 B/param

        // A 24 GiB card: a 7B model served in fp16 with room to spare, LoRA on 7-8B, no full 7B.
        assert_eq!(params(fit.serve_fp16_params), "10.7B");
        assert_eq!(params(fit.lora_params), "8.6B");
        assert!(fit.full_finetune_params < 2_000_000_000);
        let cpu = recommend(&d).cpu;
        assert_eq!(cpu.memory_budget_bytes, 48 * GIB);
        assert_eq!(cpu.memory_fit_4bit_params, 48 * GIB * 10 / 6);
        // 8 physical cores: capped at 1B parameters each.
        assert_eq!(cpu.serve_4bit_params, 8_000_000_000);
        let small = recommend(&detected(4, &[], no_docker())).cpu;
        assert_eq!(small.serve_4bit_params, 3 * GIB * 10 / 6);
    }

    #[test]
    fn a_gpu_without_docker_gpu_says_what_is_missing() {
        let r = recommend(&detected(64, &[24], docker_with(false)));
        assert!(r.good_for.iter().any(|g| g.contains("once docker-gpu works")), "{r:?}");
        assert!(r
            .leave_to_others
            .iter()
            .any(|l| l.reason.ends_with("(Docker has no nvidia runtime)")));
        let ready = recommend(&detected(64, &[24], docker_with(true)));
        assert!(ready.leave_to_others.is_empty(), "{ready:?}");
    }

    #[test]
    fn parameter_counts_read_like_model_cards() {
        assert_eq!(params(7_241_732_096), "7.2B");
        assert_eq!(params(350_000_000), "350M");
        assert_eq!(params(12), "under 1M");
        assert_eq!(gib(24 * GIB + GIB / 2), "24.5 GiB");
    }
}
