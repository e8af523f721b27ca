//! `studio-relay job ...`: post a job to the running relay, follow it, fetch its result.
//!
//! Every subcommand talks to the relay's HTTP API (`--api`). `post` uploads the files a
//! `job.toml` names by path (module, inputs, training model and dataset, serving model) and
//! posts the spec with each replaced by its digest.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::job::{ContentRef, Input, JobSpec};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Serialize;
use studio_relay::api::types::{JobView, PostJobRequest, TrainingView};
use studio_relay::api::ApiArg;
use studio_relay::client::RelayClient;
use studio_relay::store::BLOB_BYTES_MAX;

/// The name under which a workload's standard output is stored.
const STDOUT_OUTPUT: &str = "/stdout";
/// How often `--wait` asks for the job's state.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Post jobs to the running relay and follow them.
#[derive(Debug, Args)]
pub(crate) struct JobArgs {
    #[command(flatten)]
    api: ApiArg,
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Debug, Subcommand)]
enum JobCommand {
    /// Post a job: upload the files job.toml names by path, charge the escrow to an account and
    /// print the job id. With --wait, wait for the end and print the workload's stdout and
    /// outputs (exit 0 when it succeeded, 1 when it failed).
    Post {
        /// The job spec (see docs/job-spec.md); paths in it are relative to its directory.
        job: PathBuf,
        /// An extra input file (repeatable), named by its file name.
        #[arg(long = "input", value_name = "FILE")]
        inputs: Vec<PathBuf>,
        /// The ledger account charged (credits come from `studio-relay ledger mint`).
        #[arg(long, default_value = "studio")]
        account: String,
        /// Wait for the job to end and print its result.
        #[arg(long)]
        wait: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Post under this idempotency key (1 to 128 bytes) instead of a fresh one: a script
        /// that runs `job post` again after it gave up passes the same key, and the relay
        /// answers with the job the first attempt made, if it made one
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
    },
    /// Show a job: state, attempts, leases, and the reasons when no node can serve it.
    Status {
        /// The job id.
        id: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the relay's jobs, newest first.
    List {
        /// Print one JSON object per job instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Download a completed job's outputs into a directory (the workload's stdout as `stdout`).
    Result {
        /// The job id.
        id: String,
        /// Where to write the files (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: its leases are cancelled and the unpaid escrow goes back to the requester.
    Cancel {
        /// The job id.
        id: String,
    },
}

pub(crate) fn run(args: JobArgs) -> anyhow::Result<ExitCode> {
    let client = RelayClient::new(args.api.addr);
    match args.command {
        JobCommand::Post { job, inputs, account, wait, json, idempotency_key: key } => {
            let key = key.unwrap_or_else(idempotency_key);
            post(&client, &job, &inputs, &account, &key, wait, json)
        }
        JobCommand::Status { id, json } => status(&client, &id, json),
        JobCommand::List { json } => list(&client, json),
        JobCommand::Result { id, out, json } => result(&client, &id, &out, json),
        JobCommand::Cancel { id } => {
            client.cancel_job(&id)?;
            println!("cancelled job {id}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

/// Tries a post this many times when the relay cannot be reached or the connection drops.
const POST_TRIES: u32 = 5;

/// A fresh idempotency key: 16 random bytes, in hex.
fn idempotency_key() -> String {
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    hex::encode(bytes)
}

/// Posts `req`, trying again (with the same idempotency key, so the relay posts the job at
/// most once) when the relay cannot be reached or the request fails on the way; an answer of
/// the relay, error or not, is final.
fn post_retrying(
    client: &RelayClient,
    req: &PostJobRequest,
) -> Result<studio_relay::api::types::PostJobResponse, studio_relay::client::ClientError> {
    use studio_relay::client::ClientError;
    let mut delay = Duration::from_millis(500);
    let mut tries = 1;
    loop {
        match client.post_job(req) {
            Err(e @ (ClientError::Unreachable { .. } | ClientError::Transport { .. }))
                if tries < POST_TRIES =>
            {
                tracing::warn!("post failed ({e}); trying again in {delay:?} with the same key");
                std::thread::sleep(delay);
                delay *= 2;
                tries += 1;
            }
            answer => return answer,
        }
    }
}

fn post(
    client: &RelayClient,
    job: &Path,
    extra_inputs: &[PathBuf],
    account: &str,
    key: &str,
    wait: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let shown = job.display().to_string();
    let text = std::fs::read_to_string(job).with_context(|| format!("cannot read {shown}"))?;
    let mut spec =
        JobSpec::from_toml(&text).map_err(|e| anyhow::anyhow!("{}", e.with_source(&shown)))?;
    let base = job.parent().unwrap_or(Path::new("."));
    let mut uploader = Uploader { client, base, done: BTreeMap::new() };
    resolve_paths(&mut spec, &mut uploader).map_err(|e| anyhow::anyhow!("{shown}: {e:#}"))?;
    add_inputs(&mut spec, extra_inputs, &mut uploader)?;
    spec.validate().map_err(|e| anyhow::anyhow!("{}", e.with_source(&shown)))?;
    let posted = post_retrying(
        client,
        &PostJobRequest {
            spec,
            account: account.to_owned(),
            idempotency_key: Some(key.to_owned()),
        },
    )?;
    if !wait {
        if json {
            print_json(&posted)?;
        } else {
            println!("{}", posted.job_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let view = wait_for_end(client, &posted.job_id)?;
    let stdout = match view.outputs.iter().find(|o| o.name == STDOUT_OUTPUT) {
        Some(o) => Some(fetch_checked(client, &o.sha256)?),
        None => None,
    };
    if json {
        #[derive(Serialize)]
        struct Waited<'a> {
            job: &'a JobView,
            stdout: Option<String>,
        }
        let stdout = stdout.as_deref().map(|b| String::from_utf8_lossy(b).into_owned());
        print_json(&Waited { job: &view, stdout })?;
    } else {
        print_result(&view, stdout.as_deref())?;
    }
    Ok(exit_for(&view))
}

/// Uploads files once each and remembers their digests.
struct Uploader<'a> {
    client: &'a RelayClient,
    base: &'a Path,
    done: BTreeMap<PathBuf, (Digest, u64)>,
}

impl Uploader<'_> {
    /// Uploads `path` (relative to the job file unless absolute); returns its digest and size.
    fn upload(&mut self, path: &Path) -> anyhow::Result<(Digest, u64)> {
        let full = self.base.join(path);
        if let Some(done) = self.done.get(&full) {
            return Ok(*done);
        }
        let meta =
            std::fs::metadata(&full).with_context(|| format!("cannot read {}", full.display()))?;
        if !meta.is_file() {
            bail!("{} is not a file", full.display());
        }
        if meta.len() > BLOB_BYTES_MAX as u64 {
            bail!(
                "{} is {} bytes; the relay takes files up to {BLOB_BYTES_MAX} bytes",
                full.display(),
                meta.len()
            );
        }
        let bytes =
            std::fs::read(&full).with_context(|| format!("cannot read {}", full.display()))?;
        let digest = Digest::of(&bytes);
        let stored = self
            .client
            .put_blob(&bytes)
            .with_context(|| format!("uploading {}", full.display()))?;
        if stored.sha256 != digest.to_hex() {
            bail!(
                "uploading {}: the relay stored it as {} but it hashes to {}",
                full.display(),
                stored.sha256,
                digest.to_hex()
            );
        }
        let size = bytes.len() as u64;
        self.done.insert(full, (digest, size));
        Ok((digest, size))
    }

    fn resolve(&mut self, field: &str, content: &mut ContentRef) -> anyhow::Result<Option<u64>> {
        let ContentRef::Path(path) = content else { return Ok(None) };
        let (digest, size) = self.upload(Path::new(path)).with_context(|| field.to_owned())?;
        *content = ContentRef::Digest(digest);
        Ok(Some(size))
    }
}

/// Replaces every content reference given by path with the digest of the uploaded file.
fn resolve_paths(spec: &mut JobSpec, up: &mut Uploader<'_>) -> anyhow::Result<()> {
    if let Some(module) = &mut spec.workload.module {
        up.resolve("workload.module", module)?;
    }
    for (i, input) in spec.inputs.iter_mut().enumerate() {
        if let Some(size) = up.resolve(&format!("inputs[{i}].source"), &mut input.source)? {
            input.size_bytes = size;
        }
    }
    if let Some(t) = &mut spec.training {
        up.resolve("training.model", &mut t.model)?;
        up.resolve("training.dataset", &mut t.dataset)?;
        if let Some(holdout) = &mut t.holdout {
            up.resolve("training.holdout", holdout)?;
        }
    }
    if let Some(s) = &mut spec.serving {
        up.resolve("serving.model", &mut s.model)?;
    }
    assert!(spec.is_resolved(), "every content reference was resolved");
    Ok(())
}

/// Adds each `--input FILE`, named by its file name, refusing a name already taken.
fn add_inputs(spec: &mut JobSpec, files: &[PathBuf], up: &mut Uploader<'_>) -> anyhow::Result<()> {
    let mut names: BTreeSet<String> = spec.inputs.iter().map(|i| i.name.clone()).collect();
    for file in files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("--input {}: not a file name", file.display()))?
            .to_owned();
        if !names.insert(name.clone()) {
            bail!("--input {}: another input is already named {name:?}", file.display());
        }
        // --input paths are relative to the current directory, not to the job file.
        let full =
            std::path::absolute(file).with_context(|| format!("--input {}", file.display()))?;
        let (digest, size) =
            up.upload(&full).with_context(|| format!("--input {}", file.display()))?;
        spec.inputs.push(Input { name, source: ContentRef::Digest(digest), size_bytes: size });
    }
    Ok(())
}

/// Polls the job until it ends; shows a status line on stderr when it is a terminal.
fn wait_for_end(client: &RelayClient, id: &str) -> anyhow::Result<JobView> {
    let progress = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let view = client.job(id)?;
        if progress {
            let line = progress_line(&view);
            if line != last {
                eprint!("\r\x1b[2K{line}");
                last = line;
            }
        }
        if view.is_final() {
            if progress {
                eprintln!();
            }
            return Ok(view);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn progress_line(view: &JobView) -> String {
    let short = &view.id[..view.id.len().min(8)];
    let running: Vec<String> = view
        .leases
        .iter()
        .filter(|l| l.status == "active")
        .map(|l| format!("{}%", l.progress))
        .collect();
    let mut line = format!("job {short}: {}, {} attempt(s)", view.state, view.attempts);
    if !running.is_empty() {
        line.push_str(&format!(", running {}", running.join(" ")));
    } else if view.state == "open" && !view.unservable.is_empty() {
        line.push_str(", no node can serve it yet (`job status` says why)");
    }
    line
}

fn exit_for(view: &JobView) -> ExitCode {
    if view.state == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Downloads a blob and checks it against its digest.
fn fetch_checked(client: &RelayClient, sha256: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = client.get_blob(sha256).with_context(|| format!("downloading sha256:{sha256}"))?;
    if Digest::of(&bytes).to_hex() != sha256 {
        bail!("the relay sent content for sha256:{sha256} that hashes to something else");
    }
    Ok(bytes)
}

fn print_result(view: &JobView, stdout_bytes: Option<&[u8]>) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if let Some(bytes) = stdout_bytes.filter(|b| !b.is_empty()) {
        stdout.write_all(bytes)?;
        if !bytes.ends_with(b"\n") {
            writeln!(stdout)?;
        }
    }
    match &view.reason {
        Some(reason) => writeln!(stdout, "job {}: {}: {reason}", view.id, view.state)?,
        None => writeln!(stdout, "job {}: {}", view.id, view.state)?,
    }
    write_outputs(&mut stdout, view)?;
    Ok(())
}

fn write_outputs(out: &mut impl Write, view: &JobView) -> anyhow::Result<()> {
    if !view.outputs.is_empty() {
        writeln!(out, "outputs:")?;
        for o in &view.outputs {
            writeln!(out, "  {:<32} {:>10} bytes  sha256:{}", o.name, o.bytes, o.sha256)?;
        }
    }
    Ok(())
}

fn status(client: &RelayClient, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let v = client.job(id)?;
    if json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "job         {}{}",
        v.id,
        if v.name.is_empty() { String::new() } else { format!(" ({})", v.name) }
    )?;
    writeln!(out, "kind        {}", v.kind)?;
    writeln!(out, "state       {}", v.state)?;
    if let Some(reason) = &v.reason {
        writeln!(out, "reason      {reason}")?;
    }
    writeln!(out, "requester   {}", v.requester)?;
    writeln!(
        out,
        "credits     reward {} x {} replica(s); escrow {}, paid {}, refunded {}",
        v.reward, v.replication, v.escrow, v.paid, v.refunded
    )?;
    writeln!(out, "posted      {} ms, deadline {} ms", v.posted_at_ms, v.deadline_ms)?;
    writeln!(out, "attempts    {}", v.attempts)?;
    for l in &v.leases {
        let reason = l.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default();
        let paid = if l.paid { ", paid" } else { "" };
        writeln!(
            out,
            "  lease {:<3} {}  {}{reason}, {}%{paid}",
            l.lease, l.node, l.status, l.progress
        )?;
    }
    if !v.unservable.is_empty() {
        writeln!(out, "no node can serve it:")?;
        for n in &v.unservable {
            writeln!(out, "  {}: {}", n.node, n.reasons.join("; "))?;
        }
    }
    if let Some(t) = &v.training {
        write_training(&mut out, t)?;
    }
    if let Some(hash) = &v.result_hash {
        writeln!(out, "result      {hash}")?;
    }
    write_outputs(&mut out, &v)?;
    Ok(ExitCode::SUCCESS)
}

/// A training job's rounds: where it stands, then one line per aggregated round.
fn write_training(out: &mut impl Write, t: &TrainingView) -> anyhow::Result<()> {
    writeln!(
        out,
        "training    round {} of {}, {}; {} of {} participant(s) (quorum {}), {} joining; {}, {}",
        if t.phase == "done" { t.rounds } else { t.round + 1 },
        t.rounds,
        t.phase,
        t.participants.len(),
        t.wanted,
        t.quorum,
        t.joiners.len(),
        t.aggregation,
        t.compression
    )?;
    writeln!(out, "model       {}", t.model)?;
    if t.history.is_empty() {
        return Ok(());
    }
    writeln!(
        out,
        "  {:>5}  {:>8}  {:>8}  {:>8}  {:>10}  {:>9}  {:>8}",
        "round", "received", "accepted", "rejected", "bytes", "test loss", "accuracy"
    )?;
    for r in &t.history {
        writeln!(
            out,
            "  {:>5}  {:>8}  {:>8}  {:>8}  {:>10}  {:>9.4}  {:>7.2}%",
            r.round,
            r.received,
            r.accepted,
            r.rejected.len(),
            r.bytes_received,
            r.loss,
            100.0 * r.accuracy
        )?;
        for rej in &r.rejected {
            writeln!(out, "         rejected {}: {}", rej.node, rej.reason)?;
        }
    }
    Ok(())
}

fn list(client: &RelayClient, json: bool) -> anyhow::Result<ExitCode> {
    let jobs = client.jobs()?;
    if json {
        for j in &jobs {
            print_json(j)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{:<32}  {:<9}  {:<15}  {:>8}  name", "job", "state", "kind", "attempts")?;
    for j in &jobs {
        writeln!(
            out,
            "{:<32}  {:<9}  {:<15}  {:>8}  {}",
            j.id, j.state, j.kind, j.attempts, j.name
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Where an output goes inside the result directory: `/stdout` as `stdout`, other names as
/// relative paths with no `..`, refused otherwise.
fn output_path(name: &str) -> anyhow::Result<PathBuf> {
    if name == STDOUT_OUTPUT {
        return Ok(PathBuf::from("stdout"));
    }
    let path = Path::new(name);
    let plain = !name.is_empty()
        && !name.contains('\0')
        && path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && path.components().any(|c| matches!(c, Component::Normal(_)));
    if !plain {
        bail!("refusing output {name:?}: its name is absolute or leaves the output directory");
    }
    Ok(path.to_owned())
}

fn result(client: &RelayClient, id: &str, out_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let view = client.job(id)?;
    if view.state != "completed" {
        let why = view.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
        if view.is_final() {
            eprintln!("job {id} {}{why}; it has no result", view.state);
            return Ok(ExitCode::from(1));
        }
        bail!("job {id} is {}; wait for it to end (`studio-relay job status {id}`)", view.state);
    }
    // Check every name before writing anything.
    let targets = view
        .outputs
        .iter()
        .map(|o| output_path(&o.name).map(|p| (o, out_dir.join(p))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    #[derive(Serialize)]
    struct Written {
        name: String,
        path: String,
        sha256: String,
        bytes: u64,
    }
    let mut written = Vec::new();
    for (o, target) in targets {
        let bytes = fetch_checked(client, &o.sha256)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&target, &bytes)
            .with_context(|| format!("cannot write {}", target.display()))?;
        written.push(Written {
            name: o.name.clone(),
            path: target.display().to_string(),
            sha256: o.sha256.clone(),
            bytes: bytes.len() as u64,
        });
    }
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            job_id: &'a str,
            files: &'a [Written],
        }
        print_json(&Out { job_id: &view.id, files: &written })?;
    } else {
        let mut out = std::io::stdout().lock();
        for w in &written {
            writeln!(out, "{}  ({} bytes)", w.path, w.bytes)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_stay_inside_the_directory() {
        assert_eq!(output_path("/stdout").unwrap(), PathBuf::from("stdout"));
        assert_eq!(output_path("a/b.txt").unwrap(), PathBuf::from("a/b.txt"));
        for bad in ["/etc/passwd", "../x", "a/../../x", "", ".", "/", "a/.."] {
            assert!(output_path(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
