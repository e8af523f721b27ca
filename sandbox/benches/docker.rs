//! Container start-to-exit latency for a trivial job, next to the wasm executor doing the same
//! trivial work (exit 0 with nothing to read or write), printed as a table.
//!
//! Run: `cargo bench -p aimatrix-sandbox --bench docker` (needs the engine and /bin/busybox).

#![allow(clippy::unwrap_used, missing_docs)] // a benchmark binary: a panic is a failed run

use std::path::Path;
use std::time::{Duration, Instant};

use aimatrix_sandbox::docker::{ContainerWorkload, DockerConfig, DockerExecutor, DockerStatus};
use aimatrix_sandbox::wasm::{ModuleSource, WasmConfig, WasmExecutor};
use aimatrix_sandbox::{ExecLimits, ExecStatus, Executor, JobWorkload, PreparedJob, RunControl};

const IMAGE: &str = "aimatrix-test-busybox:1";

fn stats(mut runs: Vec<Duration>) -> (f64, f64, f64) {
    runs.sort();
    let at = |p: f64| runs[((runs.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    (at(0.0), at(0.5), at(0.95))
}

async fn time_runs(executor: &dyn Executor, workload: JobWorkload, n: usize) -> Vec<Duration> {
    let mut runs = Vec::with_capacity(n);
    for _ in 0..n {
        let dir = tempfile::tempdir().unwrap();
        let job = PreparedJob::new(workload.clone(), dir.path(), ExecLimits::default());
        let started = Instant::now();
        let outcome = executor.run(job, RunControl::default()).await.unwrap();
        runs.push(started.elapsed());
        assert_eq!(outcome.status, ExecStatus::Succeeded);
    }
    runs
}

#[tokio::main]
async fn main() {
    if let DockerStatus::Unavailable { reason } = aimatrix_sandbox::docker::probe().await {
        println!("docker benchmark skipped: {reason}");
        return;
    }
    let docker = DockerExecutor::connect(DockerConfig {
        owner: "aimatrix-bench".into(),
        ..DockerConfig::default()
    })
    .await
    .unwrap();
    if !docker.has_image(IMAGE).await {
        docker
            .import_rootfs(
                IMAGE,
                aimatrix_sandbox::docker::busybox_rootfs(Path::new("/bin/busybox")).unwrap(),
            )
            .await
            .unwrap();
    }
    let container = JobWorkload::Container(ContainerWorkload {
        image: IMAGE.into(),
        command: vec!["true".into()],
        gpus: 0,
    });
    let wasm = WasmExecutor::new(WasmConfig::in_memory()).unwrap();
    let module =
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
            .unwrap();
    let module = JobWorkload::Wasm(ModuleSource::new("trivial.wasm", module));
    // Warm up: image layers in the page cache, the module compiled.
    time_runs(&docker, container.clone(), 2).await;
    time_runs(&wasm, module.clone(), 20).await;
    let (d_min, d_p50, d_p95) = stats(time_runs(&docker, container, 20).await);
    let (w_min, w_p50, w_p95) = stats(time_runs(&wasm, module, 500).await);
    println!("trivial job, start to exit (create, run, collect outputs, remove), this machine");
    println!("executor          runs      min       p50       p95");
    println!("docker (busybox)    20  {d_min:>7.1}ms {d_p50:>7.1}ms {d_p95:>7.1}ms");
    println!("wasm (cached)      500  {w_min:>7.3}ms {w_p50:>7.3}ms {w_p95:>7.3}ms");
    println!("docker / wasm at p50: {:.0}×", d_p50 / w_p50);
}
