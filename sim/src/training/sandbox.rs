//! The `train-step` guest in the real wasmtime sandbox, run as a node runs it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aimatrix_sandbox::wasm::{ModuleSource, WasmConfig, WasmExecutor};
use aimatrix_sandbox::{ExecLimits, ExecStatus, Executor, JobWorkload, PreparedJob, RunControl};

use super::{io, TrainError};

/// The guest and the sandbox it runs in.
pub(super) struct Sandbox {
    runtime: tokio::runtime::Runtime,
    executor: WasmExecutor,
    module: ModuleSource,
    work_dir: PathBuf,
}

impl Sandbox {
    pub(super) fn new(cache: Option<&Path>) -> Result<Self, TrainError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io("cannot start the async runtime", e))?;
        let cfg = cache.map_or_else(WasmConfig::in_memory, WasmConfig::in_dir);
        let executor = WasmExecutor::new(cfg).map_err(TrainError::sandbox)?;
        let module = ModuleSource::new("train-step.wasm", aimatrix_workloads::TRAIN_STEP_WASM);
        let work_dir =
            std::env::temp_dir().join(format!("aimatrix-sim-train-{}", std::process::id()));
        Ok(Self { runtime, executor, module, work_dir })
    }

    /// Runs the guest on `inputs` and returns its outputs by name (or why it failed).
    pub(super) fn run(
        &self,
        inputs: &[(&str, &[u8])],
        args: Vec<String>,
        deterministic: bool,
        limits: ExecLimits,
    ) -> Result<Result<HashMap<String, Vec<u8>>, String>, TrainError> {
        let _ = std::fs::remove_dir_all(&self.work_dir);
        let inputs_dir = self.work_dir.join(aimatrix_sandbox::INPUTS_DIR);
        std::fs::create_dir_all(&inputs_dir)
            .map_err(|e| io(format!("cannot create {}", inputs_dir.display()), e))?;
        for (name, bytes) in inputs {
            let path = inputs_dir.join(name);
            std::fs::write(&path, bytes)
                .map_err(|e| io(format!("cannot write {}", path.display()), e))?;
        }
        let mut job =
            PreparedJob::new(JobWorkload::Wasm(self.module.clone()), &self.work_dir, limits);
        job.args = args;
        job.deterministic = deterministic;
        let exec = self
            .runtime
            .block_on(self.executor.run(job, RunControl::default()))
            .map_err(TrainError::sandbox)?;
        if exec.status != ExecStatus::Succeeded {
            let stderr = String::from_utf8_lossy(&exec.stderr);
            return Ok(Err(format!("{}: {}", exec.status, stderr.trim())));
        }
        let outputs_dir = self.work_dir.join(aimatrix_sandbox::OUTPUTS_DIR);
        let mut files = HashMap::new();
        for f in &exec.outputs {
            let path = outputs_dir.join(&f.name);
            let bytes = std::fs::read(&path)
                .map_err(|e| io(format!("cannot read {}", path.display()), e))?;
            files.insert(f.name.clone(), bytes);
        }
        Ok(Ok(files))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}
