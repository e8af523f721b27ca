//! The node's receipts and job history: append-only JSON-lines files in the data directory.
//!
//! - `receipts.jsonl`: one [`ReceiptRecord`] per receipt a relay signed for this node. The
//!   credits the node has earned are summed from it at start ([`History::earned`]), so they
//!   survive restarts.
//! - `history.jsonl`: one [`RunRecord`] per lease the node ran (or gave back).
//!
//! Each record is one line, appended with one write and an fsync, in a file only the owner
//! can read. A crash can leave a torn last line; [`History::open`] skips it with a warning and
//! cuts it off so the next record starts on a line of its own. A line that does not parse
//! anywhere else is skipped with a warning too: history is never a reason not to start.
//!
//! ```ignore
//! let mut history = History::open(&data_dir)?;
//! history.record_receipt(&ReceiptRecord::new(relay, &receipt, now))?;
//! println!("{} credits earned", history.earned());
//! ```

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::job::JobKind;
use aimatrix_protocol::messages::{Lease, Outcome, Receipt, Usage, Verdict};
use aimatrix_protocol::time::Millis;
use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Receipts file name in the data directory.
pub(crate) const RECEIPTS_FILE: &str = "receipts.jsonl";
/// Job history file name in the data directory.
pub(crate) const HISTORY_FILE: &str = "history.jsonl";

/// Most runs kept in memory for [`History::recent`].
const RECENT_MAX: usize = 1000;

/// Whether a relay paid for a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReceiptVerdict {
    /// Verified and paid.
    Paid,
    /// Not paid.
    Rejected,
}

/// One line of `receipts.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReceiptRecord {
    /// The job, 32 hex digits.
    pub(crate) job_id: String,
    /// The lease within the job.
    pub(crate) lease: u32,
    /// The training round, for training jobs.
    pub(crate) round: Option<u32>,
    /// Paid or rejected.
    pub(crate) verdict: ReceiptVerdict,
    /// Credits paid (0 when rejected).
    pub(crate) amount: u64,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// The relay that signed the receipt, as a PeerId.
    pub(crate) relay: String,
    /// When the node received it, ms since the Unix epoch.
    pub(crate) time_ms: Millis,
}

impl ReceiptRecord {
    /// The record of `receipt`, signed by `relay` and received at `time_ms`.
    pub(crate) fn new(relay: NodeId, receipt: &Receipt, time_ms: Millis) -> Self {
        let (verdict, amount, reason) = match &receipt.verdict {
            Verdict::Paid { amount } => (ReceiptVerdict::Paid, *amount, None),
            Verdict::Rejected { reason } => (ReceiptVerdict::Rejected, 0, Some(reason.clone())),
        };
        Self {
            job_id: receipt.job_id.to_string(),
            lease: receipt.lease,
            round: receipt.round,
            verdict,
            amount,
            reason,
            relay: relay.to_peer_id(),
            time_ms,
        }
    }

    /// Credits this receipt paid.
    pub(crate) fn paid(&self) -> u64 {
        match self.verdict {
            ReceiptVerdict::Paid => self.amount,
            ReceiptVerdict::Rejected => 0,
        }
    }
}

/// How a run ended on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RunStatus {
    /// The workload succeeded and its result was sent.
    Succeeded,
    /// The workload failed (exit code, trap, timeout, limit).
    Failed,
    /// The node gave the lease back unfinished.
    HandedBack,
    /// The relay cancelled the lease.
    Cancelled,
}

/// One line of `history.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    /// The job, 32 hex digits.
    pub(crate) job_id: String,
    /// The lease within the job.
    pub(crate) lease: u32,
    /// The training round, for training jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) round: Option<u32>,
    /// The job kind.
    pub(crate) kind: JobKind,
    /// The job's name.
    pub(crate) name: String,
    /// When the lease arrived, ms since the Unix epoch.
    pub(crate) started_ms: Millis,
    /// When the run ended.
    pub(crate) finished_ms: Millis,
    /// How it ended.
    pub(crate) status: RunStatus,
    /// Why it failed, was handed back or cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// What the sandbox measured.
    pub(crate) usage: Usage,
    /// The result hash (`sha256:<hex>`) of a successful run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) result_hash: Option<String>,
}

impl RunRecord {
    /// The record of `lease`, run from `started_ms` to `finished_ms` with `outcome`.
    pub(crate) fn new(
        lease: &Lease,
        started_ms: Millis,
        finished_ms: Millis,
        outcome: &Outcome,
        usage: Usage,
    ) -> Self {
        let (status, reason, result_hash) = match outcome {
            Outcome::Succeeded { result_hash, .. } => {
                (RunStatus::Succeeded, None, Some(result_hash.to_string()))
            }
            Outcome::Failed { reason } => (RunStatus::Failed, Some(reason.clone()), None),
            Outcome::HandedBack { reason } => (RunStatus::HandedBack, Some(reason.clone()), None),
        };
        Self {
            job_id: lease.job_id.to_string(),
            lease: lease.lease,
            round: lease.round.map(|r| r.round),
            kind: lease.spec.kind,
            name: lease.spec.name.clone(),
            started_ms,
            finished_ms,
            status,
            reason,
            usage,
            result_hash,
        }
    }

    /// The record of `lease`, cancelled by its relay for `reason`.
    pub(crate) fn cancelled(
        lease: &Lease,
        started_ms: Millis,
        finished_ms: Millis,
        reason: &str,
        usage: Usage,
    ) -> Self {
        let outcome = Outcome::HandedBack { reason: reason.to_owned() };
        Self {
            status: RunStatus::Cancelled,
            ..Self::new(lease, started_ms, finished_ms, &outcome, usage)
        }
    }
}

/// The open receipt and history files, with what was summed from them.
#[derive(Debug)]
pub(crate) struct History {
    receipts: File,
    runs: File,
    earned: u64,
    receipts_count: u64,
    jobs_run: u64,
    recent: VecDeque<RunRecord>,
}

impl History {
    /// Opens (creating, owner-only) `receipts.jsonl` and `history.jsonl` in `data_dir`, sums
    /// the credits earned and keeps the latest runs.
    pub(crate) fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let mut earned = 0u64;
        let mut receipts_count = 0u64;
        let receipts = open_log(&data_dir.join(RECEIPTS_FILE), |r: ReceiptRecord| {
            earned = earned.saturating_add(r.paid());
            receipts_count += 1;
        })?;
        let mut jobs_run = 0u64;
        let mut recent = VecDeque::new();
        let runs = open_log(&data_dir.join(HISTORY_FILE), |r: RunRecord| {
            jobs_run += 1;
            push_bounded(&mut recent, r);
        })?;
        Ok(Self { receipts, runs, earned, receipts_count, jobs_run, recent })
    }

    /// Appends a receipt (fsynced before this returns) and counts what it paid.
    pub(crate) fn record_receipt(&mut self, record: &ReceiptRecord) -> io::Result<()> {
        append(&mut self.receipts, record)?;
        self.earned = self.earned.saturating_add(record.paid());
        self.receipts_count += 1;
        Ok(())
    }

    /// Appends a run (fsynced before this returns).
    pub(crate) fn record_run(&mut self, record: RunRecord) -> io::Result<()> {
        append(&mut self.runs, &record)?;
        self.jobs_run += 1;
        push_bounded(&mut self.recent, record);
        Ok(())
    }

    /// Credits paid by every receipt this node has kept.
    pub(crate) fn earned(&self) -> u64 {
        self.earned
    }

    /// Receipts kept.
    #[cfg(test)]
    pub(crate) fn receipts(&self) -> u64 {
        self.receipts_count
    }

    /// Runs recorded.
    pub(crate) fn jobs_run(&self) -> u64 {
        self.jobs_run
    }

    /// The latest `n` runs (at most the last 1000), newest first.
    #[cfg(test)]
    pub(crate) fn recent(&self, n: usize) -> impl Iterator<Item = &RunRecord> {
        self.recent.iter().rev().take(n)
    }
}

fn push_bounded(recent: &mut VecDeque<RunRecord>, record: RunRecord) {
    if recent.len() >= RECENT_MAX {
        recent.pop_front();
    }
    recent.push_back(record);
}

/// Every receipt in `data_dir`'s receipts file, read without changing it (a running node may be
/// appending): an unreadable or unfinished line is skipped with a warning.
pub(crate) fn read_receipts(data_dir: &Path) -> anyhow::Result<Vec<ReceiptRecord>> {
    let path = data_dir.join(RECEIPTS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut out = Vec::new();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(record) => out.push(record),
            Err(e) => {
                tracing::warn!("{}:{}: skipped an unreadable record: {e}", path.display(), i + 1)
            }
        }
    }
    Ok(out)
}

/// One record as one line, in one write, then fsync.
fn append<T: Serialize>(file: &mut File, record: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
    line.push(b'\n');
    file.write_all(&line)?;
    file.sync_data()
}

/// Opens the log at `path` for appending (created owner-only), passing each readable record to
/// `each`. Unreadable lines are skipped with a warning; a torn last line is cut off.
fn open_log<T: DeserializeOwned>(path: &Path, mut each: impl FnMut(T)) -> anyhow::Result<File> {
    let shown = path.display();
    let existed = path.exists();
    let mut file = open_private(path).with_context(|| format!("cannot open {shown}"))?;
    if !existed {
        sync_parent(path).with_context(|| format!("cannot sync the directory of {shown}"))?;
    }
    let mut reader = BufReader::new(&file);
    let mut line = Vec::new();
    let (mut line_no, mut read, mut good_end) = (0usize, 0u64, 0u64);
    let mut unterminated_record = false;
    loop {
        line.clear();
        let n =
            reader.read_until(b'\n', &mut line).with_context(|| format!("cannot read {shown}"))?;
        if n == 0 {
            break;
        }
        read += n as u64;
        line_no += 1;
        let complete = line.ends_with(b"\n");
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        if body.iter().all(u8::is_ascii_whitespace) {
            good_end = read;
            continue;
        }
        match serde_json::from_slice::<T>(body) {
            Ok(record) => {
                each(record);
                good_end = read;
                unterminated_record = !complete;
            }
            Err(err) if complete => {
                tracing::warn!("{shown}:{line_no}: skipped an unreadable record: {err}");
                good_end = read;
            }
            Err(_) => tracing::warn!(
                "{shown}:{line_no}: skipped a torn last record (the node stopped while writing it)"
            ),
        }
    }
    drop(reader);
    if read > good_end {
        file.set_len(good_end).with_context(|| format!("cannot cut the torn end of {shown}"))?;
    } else if unterminated_record {
        // The whole record made it to disk but its newline did not.
        file.write_all(b"\n").with_context(|| format!("cannot write {shown}"))?;
    }
    Ok(file)
}

fn open_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let file = options.open(path)?;
        // A file from an older version, or copied in, may be readable by others.
        let mode = file.metadata()?.permissions().mode();
        if mode & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(file)
    }
    #[cfg(not(unix))]
    {
        options.open(path)
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        File::open(parent.unwrap_or(Path::new(".")))?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aimatrix_protocol::hash::Digest;
    use aimatrix_protocol::messages::{JobId, OutputDigest};
    use aimatrix_protocol::testkit;

    fn receipt(job: u8, verdict: Verdict) -> Receipt {
        Receipt {
            job_id: JobId([job; 16]),
            lease: 1,
            node: testkit::keypair(1).public(),
            round: None,
            verdict,
        }
    }

    fn lease(job: u8) -> Lease {
        Lease {
            job_id: JobId([job; 16]),
            lease: 2,
            node: testkit::keypair(1).public(),
            deadline_ms: 10_000,
            spec: testkit::batch_spec(10),
            round: None,
        }
    }

    fn paid(job: u8, amount: u64) -> ReceiptRecord {
        ReceiptRecord::new(testkit::keypair(2).public(), &receipt(job, Verdict::Paid { amount }), 5)
    }

    #[test]
    fn earned_is_summed_from_receipts_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::open(dir.path()).unwrap();
        assert_eq!((history.earned(), history.jobs_run()), (0, 0));
        history.record_receipt(&paid(1, 30)).unwrap();
        let rejected = Verdict::Rejected { reason: "late".into() };
        let rejected = ReceiptRecord::new(testkit::keypair(2).public(), &receipt(2, rejected), 6);
        assert_eq!(rejected.amount, 0);
        history.record_receipt(&rejected).unwrap();
        history.record_receipt(&paid(3, 12)).unwrap();
        assert_eq!(history.earned(), 42);
        drop(history);

        let history = History::open(dir.path()).unwrap();
        assert_eq!(history.earned(), 42);
        assert_eq!(history.receipts(), 3);
        let text = std::fs::read_to_string(dir.path().join(RECEIPTS_FILE)).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["job_id"], "01".repeat(16));
        assert_eq!(first["verdict"], "paid");
        assert_eq!(first["amount"], 30);
        assert_eq!(first["relay"], testkit::keypair(2).public().to_peer_id());
        assert!(text.lines().nth(1).unwrap().contains("\"reason\":\"late\""), "{text}");
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::open(dir.path()).unwrap();
        history.record_receipt(&paid(1, 10)).unwrap();
        drop(history);
        let path = dir.path().join(RECEIPTS_FILE);
        let whole = serde_json::to_string(&paid(2, 99)).unwrap();
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&whole.as_bytes()[..whole.len() / 2]).unwrap();
        drop(file);

        let mut history = History::open(dir.path()).unwrap();
        assert_eq!(history.earned(), 10, "the torn record is not counted");
        history.record_receipt(&paid(3, 5)).unwrap();
        drop(history);
        let history = History::open(dir.path()).unwrap();
        assert_eq!(history.earned(), 15, "the record after the torn one starts its own line");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn a_whole_record_missing_its_newline_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RECEIPTS_FILE);
        std::fs::write(&path, serde_json::to_string(&paid(1, 7)).unwrap()).unwrap();
        let mut history = History::open(dir.path()).unwrap();
        assert_eq!(history.earned(), 7);
        history.record_receipt(&paid(2, 1)).unwrap();
        drop(history);
        assert_eq!(History::open(dir.path()).unwrap().earned(), 8);
    }

    #[test]
    fn a_garbled_line_in_the_middle_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RECEIPTS_FILE);
        let line = |amount| serde_json::to_string(&paid(1, amount)).unwrap();
        std::fs::write(&path, format!("{}\nnot json\n\n{}\n", line(4), line(6))).unwrap();
        let history = History::open(dir.path()).unwrap();
        assert_eq!((history.earned(), history.receipts()), (10, 2));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 4, "nothing is cut");
    }

    #[test]
    fn runs_are_recorded_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut history = History::open(dir.path()).unwrap();
        let outputs =
            vec![OutputDigest { name: "/stdout".into(), digest: Digest::of(b"x"), size_bytes: 1 }];
        let ok = Outcome::succeeded(outputs);
        let usage = Usage { wall_ms: 40, ..Usage::default() };
        history.record_run(RunRecord::new(&lease(1), 100, 140, &ok, usage)).unwrap();
        let failed = Outcome::Failed { reason: "exit code 3".into() };
        history.record_run(RunRecord::new(&lease(2), 150, 160, &failed, usage)).unwrap();
        history.record_run(RunRecord::cancelled(&lease(3), 170, 171, "job done", usage)).unwrap();
        drop(history);

        let history = History::open(dir.path()).unwrap();
        assert_eq!(history.jobs_run(), 3);
        let recent: Vec<&RunRecord> = history.recent(2).collect();
        assert_eq!(recent[0].status, RunStatus::Cancelled);
        assert_eq!(recent[0].reason.as_deref(), Some("job done"));
        assert_eq!(recent[1].status, RunStatus::Failed);
        let first = history.recent(3).last().unwrap();
        assert_eq!(first.status, RunStatus::Succeeded);
        assert!(first.result_hash.as_deref().unwrap().starts_with("sha256:"));
        assert_eq!((first.kind, first.usage.wall_ms), (JobKind::Batch, 40));
    }

    #[cfg(unix)]
    #[test]
    fn files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(HISTORY_FILE), "").unwrap();
        std::fs::set_permissions(
            dir.path().join(HISTORY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        drop(History::open(dir.path()).unwrap());
        for name in [RECEIPTS_FILE, HISTORY_FILE] {
            let mode = std::fs::metadata(dir.path().join(name)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }
}
