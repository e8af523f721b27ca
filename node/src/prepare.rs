//! Turning a job spec into a sandbox job: one place for `exec` and for leased jobs under `join`.
//!
//! The two differ only in where content comes from: `exec` reads files named by path next to the
//! job file, `join` fetches content named by digest from the relay. Both hand this module a
//! resolver that turns a [`ContentRef`] into a file on disk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use aimatrix_protocol::job::{ContentRef, JobSpec, Runtime};
use aimatrix_sandbox::docker::ContainerWorkload;
use aimatrix_sandbox::wasm::ModuleSource;
use aimatrix_sandbox::{ExecLimits, JobWorkload, PreparedJob};
use anyhow::{bail, Context};

/// Largest module a node reads.
pub(crate) const MODULE_BYTES_MAX: u64 = 64 << 20;

/// What a content reference is for, for error messages.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ContentUse<'a> {
    /// `workload.module`.
    Module,
    /// `inputs[i]`, named `name`.
    Input(usize, &'a str),
}

impl std::fmt::Display for ContentUse<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Module => f.write_str("workload.module"),
            Self::Input(i, name) => write!(f, "inputs[{i}] ({name})"),
        }
    }
}

/// Builds the sandbox job for `spec` in `work_dir` (which must hold an empty `inputs/`),
/// copying every input into it and adding its name to `names`. `resolve` returns the file
/// holding a reference's content.
pub(crate) fn from_spec(
    spec: &JobSpec,
    work_dir: &Path,
    names: &mut BTreeSet<String>,
    resolve: &mut dyn FnMut(&ContentRef, ContentUse<'_>) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<PreparedJob> {
    let workload = match spec.workload.runtime {
        Runtime::Wasm => {
            let module_ref = spec.workload.module.as_ref().context("workload.module is missing")?;
            let path = resolve(module_ref, ContentUse::Module)?;
            JobWorkload::Wasm(
                ModuleSource::from_file(&path, MODULE_BYTES_MAX)
                    .map_err(|e| anyhow::anyhow!("workload.module: {e}"))?,
            )
        }
        Runtime::Docker => JobWorkload::Container(ContainerWorkload {
            image: spec.workload.image.clone().context("workload.image is missing")?,
            command: spec.workload.command.clone(),
            gpus: spec.requirements.gpus,
        }),
    };
    let inputs_dir = work_dir.join(aimatrix_sandbox::INPUTS_DIR);
    for (i, input) in spec.inputs.iter().enumerate() {
        let what = ContentUse::Input(i, &input.name);
        let path = resolve(&input.source, what)?;
        copy_input(&path, &inputs_dir, &input.name, names).with_context(|| what.to_string())?;
    }
    let mut job = PreparedJob::new(workload, work_dir, ExecLimits::from_spec(&spec.limits));
    job.args.clone_from(&spec.workload.args);
    job.env.clone_from(&spec.workload.env);
    job.deterministic = spec.replication > 1 || spec.training.is_some();
    Ok(job)
}

/// Copies one input file into the inputs directory under `name`, refusing duplicate names.
pub(crate) fn copy_input(
    from: &Path,
    inputs_dir: &Path,
    name: &str,
    names: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    if !names.insert(name.to_owned()) {
        bail!("two inputs are named {name:?}; input names must be unique");
    }
    let meta =
        std::fs::metadata(from).with_context(|| format!("cannot read {}", from.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", from.display());
    }
    std::fs::copy(from, inputs_dir.join(name))
        .with_context(|| format!("cannot copy {}", from.display()))?;
    Ok(())
}
