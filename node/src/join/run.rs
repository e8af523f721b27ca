//! Running one lease: fetch its content by digest, run it in the sandbox, upload its outputs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aimatrix_net::NetHandle;
use aimatrix_protocol::direct::{DirectRequest, DirectResponse};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::job::{ContentRef, JobSpec};
use aimatrix_protocol::messages::{JobId, Lease, Outcome, OutputDigest, Usage};
use aimatrix_sandbox::{ExecOutcome, ExecStatus, Executor, JobWorkload, RunControl};
use aimatrix_training::{StepInput, StepPlan, RESIDUAL_FILE};
use anyhow::{bail, Context};
use libp2p::PeerId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::prepare;

/// The output name under which a workload's stdout is reported; no collected output file can
/// have it, because collected names are relative paths.
pub(crate) const STDOUT_OUTPUT: &str = "/stdout";

/// What a run needs from the node.
#[derive(Clone)]
pub(crate) struct RunContext {
    pub(crate) net: NetHandle,
    /// The relay that granted the lease being run: inputs come from it, outputs go to it.
    pub(crate) relay_peer: PeerId,
    /// Fetched content, by digest (`<hex>` files).
    pub(crate) blob_dir: PathBuf,
    /// Where each run gets its private work directory.
    pub(crate) work_root: PathBuf,
    /// Training participants' error-feedback memory, one `<job id>.residual` file per job.
    pub(crate) training_dir: PathBuf,
    pub(crate) wasm: Arc<dyn Executor>,
    pub(crate) docker: Option<Arc<dyn Executor>>,
}

/// What a run reports back to the driver.
pub(crate) enum RunUpdate {
    /// The guest reported progress.
    Progress { job_id: JobId, lease: u32, percent: u8 },
    /// The run ended.
    Done { job_id: JobId, lease: u32, outcome: Outcome, usage: Usage, status: String },
}

/// Runs `lease` to the end and reports `Done` (always, also when it could not run).
pub(crate) async fn run_lease(
    ctx: RunContext,
    lease: Lease,
    cancel: CancellationToken,
    updates: mpsc::Sender<RunUpdate>,
) {
    let (job_id, number) = (lease.job_id, lease.lease);
    let (outcome, usage, status) = match run(&ctx, &lease, cancel, &updates).await {
        Ok(done) => done,
        Err(e) => {
            let reason = format!("{e:#}");
            tracing::warn!("job {job_id} lease {number} could not run: {reason}");
            (Outcome::Failed { reason: reason.clone() }, Usage::default(), reason)
        }
    };
    let _ = updates.send(RunUpdate::Done { job_id, lease: number, outcome, usage, status }).await;
}

async fn run(
    ctx: &RunContext,
    lease: &Lease,
    cancel: CancellationToken,
    updates: &mpsc::Sender<RunUpdate>,
) -> anyhow::Result<(Outcome, Usage, String)> {
    let spec = &lease.spec;
    let residual = residual_path(ctx, lease.job_id);
    let step = aimatrix_training::plan_step(lease, residual.exists())?;
    for digest in content_digests(spec) {
        fetch(ctx, digest).await?;
    }
    for (name, input) in step.iter().flat_map(|plan| &plan.inputs) {
        if let StepInput::Content(digest) = input {
            fetch(ctx, *digest).await.with_context(|| format!("the training step's {name}"))?;
        }
    }
    std::fs::create_dir_all(&ctx.work_root)
        .with_context(|| format!("cannot create {}", ctx.work_root.display()))?;
    let work = tempfile::Builder::new()
        .prefix(&format!("job-{}-{}-", lease.job_id, lease.lease))
        .tempdir_in(&ctx.work_root)
        .context("cannot create a work directory")?;
    std::fs::create_dir_all(work.path().join(aimatrix_sandbox::INPUTS_DIR))?;
    let blob_dir = ctx.blob_dir.clone();
    let mut resolve = |content: &ContentRef, what: prepare::ContentUse<'_>| match content {
        ContentRef::Digest(d) => Ok(blob_dir.join(d.to_hex())),
        ContentRef::Path(p) => {
            bail!("{what} names a path ({p}) in a posted job; relays send digests")
        }
    };
    let mut names = BTreeSet::new();
    let mut job = prepare::from_spec(spec, work.path(), &mut names, &mut resolve)?;
    if spec.replication > 1 {
        job.deterministic = true;
    }
    if let Some(plan) = &step {
        let inputs = work.path().join(aimatrix_sandbox::INPUTS_DIR);
        for (name, input) in &plan.inputs {
            let from = match input {
                StepInput::Content(digest) => ctx.blob_dir.join(digest.to_hex()),
                StepInput::Residual => residual.clone(),
            };
            prepare::copy_input(&from, &inputs, name, &mut names)?;
        }
        job.args.extend(plan.args.iter().cloned());
        job.deterministic |= plan.deterministic;
    }
    let executor = match &job.workload {
        JobWorkload::Wasm(_) => ctx.wasm.clone(),
        JobWorkload::Container(_) => ctx
            .docker
            .clone()
            .context("this node runs no Docker jobs (engine absent or docker = false)")?,
    };
    let (progress_tx, mut progress_rx) = mpsc::channel(16);
    let forward = {
        let updates = updates.clone();
        let (job_id, number) = (lease.job_id, lease.lease);
        tokio::spawn(async move {
            while let Some(percent) = progress_rx.recv().await {
                let _ = updates.send(RunUpdate::Progress { job_id, lease: number, percent }).await;
            }
        })
    };
    let control = RunControl { cancel, progress: Some(progress_tx) };
    let result = executor.run(job, control).await;
    forward.abort();
    let exec = result?;
    let status = exec.status.to_string();
    let outcome = match exec.status {
        ExecStatus::Succeeded => {
            if step.as_ref().is_some_and(|plan| plan.keep_residual) {
                keep_residual(ctx, lease.job_id, &exec, work.path()).await?;
            }
            upload(ctx, lease, step.as_ref(), &exec, work.path()).await?
        }
        ExecStatus::Cancelled => Outcome::HandedBack { reason: "the run was cancelled".into() },
        _ => exec.to_protocol(),
    };
    Ok((outcome, exec.usage, status))
}

/// Where the error-feedback memory of training job `job_id` is kept between rounds.
fn residual_path(ctx: &RunContext, job_id: JobId) -> PathBuf {
    ctx.training_dir.join(format!("{job_id}.residual"))
}

/// Moves the training step's `residual.bin` out of the outputs into the node's training
/// directory: it is this participant's memory for the next round, never uploaded.
async fn keep_residual(
    ctx: &RunContext,
    job_id: JobId,
    exec: &ExecOutcome,
    work_dir: &Path,
) -> anyhow::Result<()> {
    if !exec.outputs.iter().any(|f| f.name == RESIDUAL_FILE) {
        return Ok(());
    }
    let from = work_dir.join(aimatrix_sandbox::OUTPUTS_DIR).join(RESIDUAL_FILE);
    let bytes = tokio::fs::read(&from).await.context("cannot read the step's residual")?;
    write_atomic(&ctx.training_dir, &residual_path(ctx, job_id), &bytes).await
}

/// Every content digest a job names.
fn content_digests(spec: &JobSpec) -> Vec<Digest> {
    let module = spec.workload.module.iter().filter_map(ContentRef::digest);
    let inputs = spec.inputs.iter().filter_map(|i| i.source.digest());
    module.chain(inputs).collect()
}

/// Makes sure the content with `digest` is in the blob directory, fetching it from the relay.
async fn fetch(ctx: &RunContext, digest: Digest) -> anyhow::Result<()> {
    let path = ctx.blob_dir.join(digest.to_hex());
    if let Ok(bytes) = tokio::fs::read(&path).await {
        if Digest::of(&bytes) == digest {
            return Ok(());
        }
        tracing::warn!("cached content {digest} is damaged; fetching it again");
    }
    let get = || DirectRequest::GetBlob(digest);
    let bytes = match ctx.net.request_retrying(ctx.relay_peer, get, super::RETRY_FOR).await? {
        DirectResponse::Blob(bytes) => bytes,
        DirectResponse::NotFound => bail!("the relay has no content {digest}"),
        other => bail!("the relay refused content {digest}: {other:?}"),
    };
    if Digest::of(&bytes) != digest {
        bail!("the relay sent content that does not match {digest}; refusing it");
    }
    write_atomic(&ctx.blob_dir, &path, &bytes).await
}

async fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    tokio::fs::write(&tmp, bytes)
        .await
        .with_context(|| format!("cannot write {} (is the disk full?)", tmp.display()))?;
    tokio::fs::rename(&tmp, path).await?;
    Ok(())
}

/// Uploads stdout and every output file to the relay, and returns the outcome naming them.
async fn upload(
    ctx: &RunContext,
    lease: &Lease,
    step: Option<&StepPlan>,
    exec: &ExecOutcome,
    work_dir: &Path,
) -> anyhow::Result<Outcome> {
    let mut outputs = Vec::with_capacity(exec.outputs.len() + 1);
    put(ctx, lease, exec.stdout.clone()).await?;
    outputs.push(OutputDigest {
        name: STDOUT_OUTPUT.to_owned(),
        digest: Digest::of(&exec.stdout),
        size_bytes: exec.stdout.len() as u64,
    });
    let outputs_dir = work_dir.join(aimatrix_sandbox::OUTPUTS_DIR);
    // A training participant's residual is its own memory, kept by `keep_residual`.
    let private = |name: &str| step.is_some_and(|plan| plan.is_private(name));
    for file in exec.outputs.iter().filter(|f| !private(&f.name)) {
        // Only files the collector vetted (regular, inside the outputs, within quota).
        let bytes = tokio::fs::read(outputs_dir.join(&file.name))
            .await
            .with_context(|| format!("cannot read output {}", file.name))?;
        if Digest::of(&bytes) != file.sha256 {
            bail!("output {} changed after the run", file.name);
        }
        put(ctx, lease, bytes).await?;
        outputs.push(OutputDigest {
            name: file.name.clone(),
            digest: file.sha256,
            size_bytes: file.bytes,
        });
    }
    Ok(Outcome::succeeded(outputs))
}

async fn put(ctx: &RunContext, lease: &Lease, bytes: Vec<u8>) -> anyhow::Result<()> {
    let request = || DirectRequest::PutBlob {
        job_id: lease.job_id,
        lease: lease.lease,
        bytes: bytes.clone(),
    };
    match ctx.net.request_retrying(ctx.relay_peer, request, super::RETRY_FOR).await? {
        DirectResponse::Accepted => Ok(()),
        other => bail!("the relay refused an output: {other:?}"),
    }
}
