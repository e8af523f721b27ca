//! What a node's hardware is good for: the job kinds it runs, and the models its GPU fits.
//!
//! # Which job kinds
//!
//! - `batch`, `data_processing`, `agent_testing`, `training`: any sandbox. wasmtime is built into
//!   the node, so every node runs them, and Docker jobs too when an engine is present; a job
//!   that needs GPUs is still matched job by job (`requirements.gpus` needs docker-gpu).
//! - `serving`: not offered by any node yet ([`NOT_OFFERED`]). A node runs every job in a
//!   sandbox with no network until it ends with a result, so it cannot host a model server; a
//!   serving job would only run as a batch job. The node neither lists nor advertises it.
//!
//! # Model sizes on a GPU (a rule of thumb)
//!
//! Bytes of GPU memory per parameter for fine-tuning a language model, overheads included;
//! they assume a modest context and batch, and a model on one device (no sharding across GPUs):
//!
//! - LoRA fine-tuning on an fp16 base: 3.0 (2 for the frozen base, + 50% for the adapters, their
//!   Adam state and activations with gradient checkpointing);
//! - QLoRA fine-tuning on a 4-bit base: 0.8 (0.5 + 60%; the QLoRA paper fits a 65B model in a
//!   48 GB GPU, 0.74);
//! - full fine-tuning with Adam in mixed precision: 19.2 (16 for fp16 weights and gradients, fp32
//!   master weights and two moments, + 20% for activations).
//!
//! The budget is the largest NVIDIA GPU's VRAM. Such work reaches a node as a Docker job that
//! asks for GPUs (docker-gpu); fine-tuning a language model on the CPU is too slow to be worth
//! a job, so no CPU figure is given.

use aimatrix_protocol::capability::{GpuVendor, GIB};
use aimatrix_protocol::job::{JobKind, JobKindSet};

use aimatrix_sandbox::docker::DockerStatus;

use super::Detected;

/// Job kinds no node runs yet, with why: they are neither listed by `detect` nor advertised.
pub(crate) const NOT_OFFERED: [(JobKind, &str); 1] = [(
    JobKind::Serving,
    "aimatrix-node cannot host a model server yet (jobs run in a sandbox with no network \
     until they end with a result)",
)];

/// Bytes per parameter, in tenths of a byte (see the module docs for where they come from).
mod tenths_per_param {
    pub(super) const LORA_FP16: u64 = 30;
    pub(super) const QLORA_4BIT: u64 = 8;
    pub(super) const FULL_FINETUNE: u64 = 192;
}

/// The largest models a GPU holds for fine-tuning, in parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GpuFit {
    /// The GPU the figures are for (the one with the most VRAM).
    pub(crate) name: String,
    /// Its VRAM.
    pub(crate) vram_bytes: u64,
    /// LoRA fine-tuning on an fp16 base.
    pub(crate) lora_params: u64,
    /// QLoRA fine-tuning on a 4-bit base.
    pub(crate) qlora_params: u64,
    /// Full fine-tuning.
    pub(crate) full_finetune_params: u64,
}

/// A job kind, and which of its jobs this node leaves to others or why it runs none of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KindReason {
    /// The job kind.
    pub(crate) kind: JobKind,
    /// Which of its jobs, and why.
    pub(crate) reason: String,
}

/// What the hardware is good for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Recommendation {
    /// Fine-tuning model sizes on the best NVIDIA GPU, if there is one.
    pub(crate) gpu: Option<GpuFit>,
    /// Short sentences: the work this node suits.
    pub(crate) good_for: Vec<String>,
    /// Work to leave to other nodes.
    pub(crate) leave_to_others: Vec<KindReason>,
    /// Job kinds no node runs yet ([`NOT_OFFERED`]), with why.
    pub(crate) not_offered: Vec<KindReason>,
}

/// Whether the node can run jobs of `kind`, or why not.
pub(crate) fn kind_support(detected: &Detected, kind: JobKind) -> Result<(), String> {
    if let Some(reason) = not_offered(kind) {
        return Err(reason.to_owned());
    }
    let runtimes = detected.runtimes();
    if runtimes.wasm || runtimes.docker {
        Ok(())
    } else {
        Err("needs the wasm or docker sandbox".to_owned())
    }
}

/// Why no node runs jobs of `kind` yet, if it is one of [`NOT_OFFERED`].
pub(crate) fn not_offered(kind: JobKind) -> Option<&'static str> {
    NOT_OFFERED.iter().find(|(k, _)| *k == kind).map(|(_, reason)| *reason)
}

/// The job kinds the node can serve.
pub(crate) fn job_kinds(detected: &Detected) -> JobKindSet {
    JobKind::ALL.into_iter().filter(|k| kind_support(detected, *k).is_ok()).collect()
}

/// What the node's hardware is good for, and what to leave to others.
pub(crate) fn recommend(detected: &Detected) -> Recommendation {
    let gpu = gpu_fit(detected);
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
        let sandboxes = if detected.runtimes().docker { "wasm or Docker" } else { "wasm" };
        good_for.push(format!(
            "{} jobs in {sandboxes} on {} threads",
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
            "GPU jobs on {} ({}) in Docker; it fits fine-tuning up to {} parameters with LoRA, \
             {} with QLoRA, {} in full{via}",
            fit.name,
            gib(fit.vram_bytes),
            params(fit.lora_params),
            params(fit.qlora_params),
            params(fit.full_finetune_params),
        ));
    }

    for kind in JobKind::ALL {
        if not_offered(kind).is_some() {
            continue;
        }
        if let Err(reason) = kind_support(detected, kind) {
            leave_to_others.push(KindReason { kind, reason });
        }
    }
    if docker_gpu.is_err() {
        let missing = missing_for_gpu_jobs(detected);
        leave_to_others.push(KindReason {
            kind: JobKind::Training,
            reason: format!("GPU training and fine-tuning ({missing})"),
        });
    }
    let not_offered = NOT_OFFERED
        .iter()
        .map(|(kind, reason)| KindReason { kind: *kind, reason: (*reason).to_owned() })
        .collect();
    Recommendation { gpu, good_for, leave_to_others, not_offered }
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
        lora_params: fits(tenths_per_param::LORA_FP16),
        qlora_params: fits(tenths_per_param::QLORA_4BIT),
        full_finetune_params: fits(tenths_per_param::FULL_FINETUNE),
    })
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
    fn a_cpu_node_without_docker_runs_every_kind_but_serving() {
        let d = detected(32, &[], no_docker());
        assert_eq!(kinds(job_kinds(&d)), ["training", "batch", "data_processing", "agent_testing"]);
        let r = recommend(&d);
        assert!(r.gpu.is_none());
        assert_eq!(
            r.good_for[0],
            "batch, data_processing, agent_testing jobs in wasm on 16 threads"
        );
        let left: Vec<_> = r.leave_to_others.iter().map(|l| l.kind).collect();
        assert_eq!(left, [JobKind::Training]);
        assert_eq!(r.leave_to_others[0].reason, "GPU training and fine-tuning (no NVIDIA GPU)");
        assert_eq!(r.not_offered.len(), 1);
        assert_eq!(r.not_offered[0].kind, JobKind::Serving);
    }

    /// No hardware makes a node a model server: serving is never listed, never advertised and
    /// never recommended, with or without Docker, memory or a GPU.
    #[test]
    fn serving_is_not_offered_on_any_hardware() {
        for d in [
            detected(4, &[], no_docker()),
            detected(64, &[], docker_with(false)),
            detected(64, &[80], docker_with(true)),
        ] {
            assert!(!job_kinds(&d).contains(JobKind::Serving), "{d:?}");
            let why = kind_support(&d, JobKind::Serving).unwrap_err();
            assert!(why.starts_with("aimatrix-node cannot host a model server yet"), "{why}");
            let r = recommend(&d);
            assert!(r.good_for.iter().all(|g| !g.contains("serv")), "{r:?}");
            assert!(r.leave_to_others.iter().all(|l| l.kind != JobKind::Serving), "{r:?}");
            assert_eq!(
                r.not_offered.iter().map(|n| n.kind).collect::<Vec<_>>(),
                [JobKind::Serving]
            );
        }
        let with_docker = recommend(&detected(64, &[], docker_with(false)));
        assert!(with_docker.good_for[0].contains("in wasm or Docker"), "{with_docker:?}");
    }

    #[test]
    fn model_sizes_follow_the_documented_bytes_per_parameter() {
        let d = detected(64, &[8, 24], docker_with(true));
        let fit = recommend(&d).gpu.unwrap();
        assert_eq!(fit.vram_bytes, 24 * GIB);
        let vram = 24 * GIB;
        assert_eq!(fit.lora_params, vram / 3); // 3 B/param
        assert_eq!(fit.qlora_params, vram * 10 / 8); // 0.8 B/param
        assert_eq!(fit.full_finetune_params, vram * 10 / 192); // 19.2 B/param

        // A 24 GiB card: LoRA on 7-8B, no full 7B.
        assert_eq!(params(fit.lora_params), "8.6B");
        assert!(fit.full_finetune_params < 2_000_000_000);
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
        assert!(ready.good_for.iter().any(|g| g.starts_with("GPU jobs on Test GPU 24 GiB")));
    }

    #[test]
    fn parameter_counts_read_like_model_cards() {
        assert_eq!(params(7_241_732_096), "7.2B");
        assert_eq!(params(350_000_000), "350M");
        assert_eq!(params(12), "under 1M");
        assert_eq!(gib(24 * GIB + GIB / 2), "24.5 GiB");
    }
}
