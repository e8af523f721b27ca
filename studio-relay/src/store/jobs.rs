//! The job store: one record per job in its own sled database, so jobs survive a restart, and
//! the ledger outbox: the ledger instructions the relay intends, written in the same
//! transaction as the job records that explain them and removed once the ledger acknowledged
//! them (docs/ledger.md, "One order of effects").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use aimatrix_protocol::codec;
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::ledger::LedgerOp;
use aimatrix_protocol::messages::{JobId, OutputDigest};
use aimatrix_protocol::relay::books::{Disagreement, LedgerBooks};
use aimatrix_protocol::relay::RelayJob;
use serde::{Deserialize, Serialize};
use sled::Transactional;

/// The largest encoded job record (its core snapshot and output lists included).
pub const JOB_RECORD_BYTES_MAX: usize = 4 << 20;

/// What the relay keeps of one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job.
    pub id: JobId,
    /// The requester's ledger account.
    pub requester: String,
    /// When it was posted.
    pub posted_at_ms: u64,
    /// The core's job, codec-encoded (`aimatrix_protocol::relay::RelayJob`); opaque here.
    pub snapshot: Vec<u8>,
    /// Whether the job has ended (completed, failed or refused).
    pub final_state: bool,
    /// The outputs each lease reported, by lease number.
    pub outputs: BTreeMap<u32, Vec<OutputDigest>>,
}

/// The job store checked against the ledger ([`JobStore::cross_check`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrossCheck {
    /// Job records read.
    pub jobs: usize,
    /// Every disagreement, in job order; empty when the books agree.
    pub disagreements: Vec<Disagreement>,
}

/// Why the job store failed.
#[derive(Debug, thiserror::Error)]
pub enum JobStoreError {
    /// Another process holds the database.
    #[error("job store {} is in use by another process (a running relay?); stop it first", path.display())]
    Locked {
        /// The database directory.
        path: PathBuf,
    },
    /// A stored record does not decode; it is refused, never guessed at.
    #[error(
        "job store {}: the record of job {job} is corrupt ({detail}); restore the jobs directory \
         from a backup, or move it aside to start without the job history",
        path.display()
    )]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// The job (hex of its key).
        job: String,
        /// What is wrong.
        detail: String,
    },
    /// The record is too large to store.
    #[error("the record of job {job} is too large to store: {detail}")]
    TooLarge {
        /// The job.
        job: JobId,
        /// The encoder's complaint.
        detail: String,
    },
    /// sled failed to read, write or flush.
    #[error("job store {}: {what}: {detail}", path.display())]
    Storage {
        /// The database directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// sled's error.
        detail: String,
    },
}

/// The job records, keyed by job id, in a sled database of their own, and the ledger outbox
/// beside them.
#[derive(Debug)]
pub struct JobStore {
    db: sled::Db,
    /// Ledger instructions intended and not yet acknowledged, keyed by a sequence number
    /// (big-endian, so in the order they were intended).
    outbox: sled::Tree,
    /// Keyed posts by requester and key.
    keys: sled::Tree,
    path: PathBuf,
    /// A read or write failed: the database is not flushed when dropped (see `Drop`).
    failed: AtomicBool,
}

/// The name of the outbox's tree in the job store's database.
const OUTBOX_TREE: &str = "ledger-outbox";
/// The name of the tree of idempotency keys in the job store's database.
const KEYS_TREE: &str = "post-keys";

/// A post its requester named by an idempotency key: the job it made and its spec's digest,
/// so that a retry finds the job and a reuse of the key for another spec is told apart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedPost {
    /// The requester's account.
    pub requester: String,
    /// The key the requester chose.
    pub key: String,
    /// The job the post made.
    pub job_id: JobId,
    /// SHA-256 of the codec encoding of the posted spec.
    pub spec_digest: Digest,
}

/// The key of a keyed post in its tree: the requester and the key, each length-prefixed.
fn post_key(requester: &str, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + requester.len() + key.len());
    out.extend_from_slice(&(requester.len() as u64).to_be_bytes());
    out.extend_from_slice(requester.as_bytes());
    out.extend_from_slice(&(key.len() as u64).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

impl JobStore {
    /// Opens (or creates) the job store in `dir`; a lock this process has only just released is
    /// waited for ([`super::retry_while_locked`]).
    pub fn open(dir: &Path) -> Result<Self, JobStoreError> {
        super::retry_while_locked(
            || Self::open_once(dir),
            |e| matches!(e, JobStoreError::Locked { .. }),
        )
    }

    fn open_once(dir: &Path) -> Result<Self, JobStoreError> {
        let path = dir.to_owned();
        let opened = sled::Config::new().path(dir).flush_every_ms(None).open();
        let db = match opened {
            Ok(db) => db,
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(11)
                    || e.to_string().contains("lock") =>
            {
                return Err(JobStoreError::Locked { path });
            }
            Err(e) => {
                return Err(JobStoreError::Storage {
                    path,
                    what: "cannot open",
                    detail: e.to_string(),
                })
            }
        };
        let outbox = db.open_tree(OUTBOX_TREE).map_err(|e| JobStoreError::Storage {
            path: path.clone(),
            what: "cannot open the ledger outbox",
            detail: e.to_string(),
        })?;
        let keys = db.open_tree(KEYS_TREE).map_err(|e| JobStoreError::Storage {
            path: path.clone(),
            what: "cannot open the idempotency keys",
            detail: e.to_string(),
        })?;
        Ok(Self { db, outbox, keys, path, failed: AtomicBool::new(false) })
    }

    /// The keyed post `requester` made under `key`, if any.
    pub fn keyed_post(
        &self,
        requester: &str,
        key: &str,
    ) -> Result<Option<KeyedPost>, JobStoreError> {
        let Some(bytes) = self
            .keys
            .get(post_key(requester, key))
            .map_err(|e| self.storage("cannot read the idempotency keys", &e))?
        else {
            return Ok(None);
        };
        codec::decode(&bytes).map(Some).map_err(|e| JobStoreError::Corrupt {
            path: self.path.clone(),
            job: format!("idempotency key {key:?} of {requester}"),
            detail: format!("it does not decode: {e}"),
        })
    }

    /// Writes `records`, adds `intended` to the ledger outbox and removes the entries `done`,
    /// all in one transaction; returns the outbox keys of `intended` (in order) once all is on
    /// disk. A crash leaves either all of it or none.
    pub fn commit(
        &self,
        records: &[JobRecord],
        intended: &[LedgerOp],
        done: &[u64],
    ) -> Result<Vec<u64>, JobStoreError> {
        self.commit_with_keys(records, intended, done, &[])
    }

    /// [`JobStore::commit`], also recording keyed posts (in the same transaction as the job
    /// records they name).
    pub fn commit_with_keys(
        &self,
        records: &[JobRecord],
        intended: &[LedgerOp],
        done: &[u64],
        keyed: &[KeyedPost],
    ) -> Result<Vec<u64>, JobStoreError> {
        let mut posts = Vec::with_capacity(keyed.len());
        for post in keyed {
            let bytes = codec::encode(post)
                .map_err(|e| JobStoreError::TooLarge { job: post.job_id, detail: e.to_string() })?;
            posts.push((post_key(&post.requester, &post.key), bytes));
        }
        let mut encoded = Vec::with_capacity(records.len());
        for record in records {
            let bytes = codec::encode_limited::<_, JOB_RECORD_BYTES_MAX>(record)
                .map_err(|e| JobStoreError::TooLarge { job: record.id, detail: e.to_string() })?;
            encoded.push((record.id.0, bytes));
        }
        let mut keys = Vec::with_capacity(intended.len());
        let mut ops = Vec::with_capacity(intended.len());
        for op in intended {
            let key = self.db.generate_id().map_err(|e| self.storage("cannot number", &e))?;
            let bytes = codec::encode(op)
                .map_err(|e| JobStoreError::TooLarge { job: op.job_id(), detail: e.to_string() })?;
            keys.push(key);
            ops.push((key.to_be_bytes(), bytes));
        }
        let jobs: &sled::Tree = &self.db;
        (jobs, &self.outbox, &self.keys)
            .transaction(|(jobs, outbox, keys)| {
                for (key, bytes) in &posts {
                    keys.insert(key.as_slice(), bytes.as_slice())?;
                }
                for (id, bytes) in &encoded {
                    jobs.insert(&id[..], bytes.as_slice())?;
                }
                for (key, bytes) in &ops {
                    outbox.insert(&key[..], bytes.as_slice())?;
                }
                for key in done {
                    outbox.remove(&key.to_be_bytes()[..])?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| {
                self.failed.store(true, Ordering::Relaxed);
                JobStoreError::Storage {
                    path: self.path.clone(),
                    what: "cannot write",
                    detail: format!("{e:?}"),
                }
            })?;
        self.db.flush().map_err(|e| self.storage("cannot flush", &e))?;
        Ok(keys)
    }

    /// The ledger outbox: every instruction intended and not yet acknowledged, in the order
    /// it was intended, with its key.
    pub fn outbox(&self) -> Result<Vec<(u64, LedgerOp)>, JobStoreError> {
        let mut out = Vec::new();
        for item in self.outbox.iter() {
            let (key, value) = item.map_err(|e| self.storage("cannot read the outbox", &e))?;
            let corrupt = |detail: String| JobStoreError::Corrupt {
                path: self.path.clone(),
                job: format!("outbox entry {}", hex::encode(&key)),
                detail,
            };
            let key: [u8; 8] =
                key.as_ref().try_into().map_err(|_| corrupt("its key is not 8 bytes".into()))?;
            let op: LedgerOp =
                codec::decode(&value).map_err(|e| corrupt(format!("it does not decode: {e}")))?;
            out.push((u64::from_be_bytes(key), op));
        }
        Ok(out)
    }

    /// Writes `record`, replacing the job's previous one; returns once it is on disk.
    pub fn put(&self, record: &JobRecord) -> Result<(), JobStoreError> {
        let bytes = codec::encode_limited::<_, JOB_RECORD_BYTES_MAX>(record)
            .map_err(|e| JobStoreError::TooLarge { job: record.id, detail: e.to_string() })?;
        self.db.insert(record.id.0, bytes).map_err(|e| self.storage("cannot write", &e))?;
        self.db.flush().map_err(|e| self.storage("cannot flush", &e))?;
        Ok(())
    }

    /// The job's record, if stored.
    pub fn get(&self, id: &JobId) -> Result<Option<JobRecord>, JobStoreError> {
        match self.db.get(id.0).map_err(|e| self.storage("cannot read", &e))? {
            Some(bytes) => self.decode(&id.0, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Every record, newest first (by posting time, then id).
    pub fn list(&self) -> Result<Vec<JobRecord>, JobStoreError> {
        let mut out = Vec::new();
        for item in self.db.iter() {
            let (key, value) = item.map_err(|e| self.storage("cannot read", &e))?;
            out.push(self.decode(&key, &value)?);
        }
        out.sort_by(|a, b| b.posted_at_ms.cmp(&a.posted_at_ms).then(a.id.cmp(&b.id)));
        Ok(out)
    }
    /// The core's job a record stores.
    pub fn snapshot(&self, record: &JobRecord) -> Result<RelayJob, JobStoreError> {
        codec::decode(&record.snapshot).map_err(|e| JobStoreError::Corrupt {
            path: self.path.clone(),
            job: record.id.to_string(),
            detail: format!("its job snapshot does not decode: {e}"),
        })
    }

    /// Every way the job records disagree with `books` (the ledger's, from its audit). The
    /// outbox's instructions count as applied: the relay applies them at its next start, and
    /// an instruction the ledger already holds counts once.
    pub fn cross_check(&self, books: &LedgerBooks) -> Result<CrossCheck, JobStoreError> {
        let records = self.list()?;
        let jobs: Vec<RelayJob> =
            records.iter().map(|r| self.snapshot(r)).collect::<Result<_, _>>()?;
        self.cross_check_jobs(books, &jobs)
    }

    /// [`JobStore::cross_check`] of `jobs`, every job of this store already read.
    pub fn cross_check_jobs(
        &self,
        books: &LedgerBooks,
        jobs: &[RelayJob],
    ) -> Result<CrossCheck, JobStoreError> {
        let mut books = books.clone();
        for (_, op) in self.outbox()? {
            books.add_pending(&op);
        }
        Ok(CrossCheck { jobs: jobs.len(), disagreements: books.check(jobs) })
    }

    fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<JobRecord, JobStoreError> {
        let corrupt = |detail: String| JobStoreError::Corrupt {
            path: self.path.clone(),
            job: hex::encode(key),
            detail,
        };
        let record: JobRecord = codec::decode_limited::<_, JOB_RECORD_BYTES_MAX>(bytes)
            .map_err(|e| corrupt(format!("it does not decode: {e}")))?;
        if key != record.id.0 {
            return Err(corrupt(format!("it is stored under another job's key ({})", record.id)));
        }
        Ok(record)
    }

    fn storage(&self, what: &'static str, err: &sled::Error) -> JobStoreError {
        self.failed.store(true, Ordering::Relaxed);
        JobStoreError::Storage { path: self.path.clone(), what, detail: err.to_string() }
    }
}

impl Drop for JobStore {
    fn drop(&mut self) {
        if self.failed.load(Ordering::Relaxed) {
            // sled flushes a database when its last handle goes, and after a failed write that
            // flush waits forever (its failed buffer never becomes stable): a relay stopped
            // with Ctrl-C would hang. Everything acknowledged was flushed when it was written,
            // so this handle is leaked instead of dropped; the files are left as they are.
            std::mem::forget(self.db.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use aimatrix_protocol::hash::Digest;

    use super::*;

    fn record(n: u8, posted_at_ms: u64, final_state: bool) -> JobRecord {
        let output =
            OutputDigest { name: "/stdout".into(), digest: Digest::of(&[n]), size_bytes: 1 };
        JobRecord {
            id: JobId([n; 16]),
            requester: "studio".into(),
            posted_at_ms,
            snapshot: vec![n, 1, 2, 3],
            final_state,
            outputs: BTreeMap::from([(0, vec![output])]),
        }
    }

    #[test]
    fn records_survive_reopening_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = JobStore::open(dir.path()).unwrap();
            store.put(&record(1, 100, true)).unwrap();
            store.put(&record(2, 300, false)).unwrap();
            store.put(&record(3, 200, false)).unwrap();
            // Replacing a record keeps one per job.
            store.put(&record(3, 200, true)).unwrap();
        }
        let store = JobStore::open(dir.path()).unwrap();
        let ids: Vec<u8> = store.list().unwrap().iter().map(|r| r.id.0[0]).collect();
        assert_eq!(ids, [2, 3, 1]);
        let listed = store.list().unwrap();
        let unfinished: Vec<u8> =
            listed.iter().filter(|r| !r.final_state).map(|r| r.id.0[0]).collect();
        assert_eq!(unfinished, [2]);
        assert_eq!(store.get(&JobId([1; 16])).unwrap(), Some(record(1, 100, true)));
        assert_eq!(store.get(&JobId([9; 16])).unwrap(), None);
    }

    #[test]
    fn a_corrupt_record_is_refused_naming_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        store.put(&record(1, 100, false)).unwrap();
        let id = JobId([7; 16]);
        store.db.insert(id.0, &[codec::FORMAT_VERSION, 0xFF, 0xFF][..]).unwrap();
        let err = store.get(&id).unwrap_err();
        assert!(matches!(err, JobStoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&id.to_string()), "{err}");
        assert!(store.list().is_err(), "a listing does not skip a corrupt record silently");
        // A valid record under another job's key is refused too.
        let moved =
            codec::encode_limited::<_, JOB_RECORD_BYTES_MAX>(&record(1, 100, false)).unwrap();
        store.db.insert(id.0, moved).unwrap();
        let err = store.get(&id).unwrap_err();
        assert!(err.to_string().contains("another job's key"), "{err}");
    }

    fn reserve(n: u8) -> LedgerOp {
        use aimatrix_protocol::ledger::TransferId;
        let job = JobId([n; 16]);
        LedgerOp::Reserve {
            id: TransferId::derive(job, "reserve", &[]),
            job_id: job,
            requester: "studio".into(),
            amount: 10,
            timeout_at_ms: 1_000,
        }
    }

    #[test]
    fn records_and_intended_ledger_instructions_are_written_together_and_survive() {
        let dir = tempfile::tempdir().unwrap();
        let keys = {
            let store = JobStore::open(dir.path()).unwrap();
            let keys =
                store.commit(&[record(1, 100, false)], &[reserve(1), reserve(2)], &[]).unwrap();
            assert!(keys[0] < keys[1], "keys follow the order intended");
            keys
        };
        let store = JobStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&JobId([1; 16])).unwrap(), Some(record(1, 100, false)));
        assert_eq!(store.outbox().unwrap(), [(keys[0], reserve(1)), (keys[1], reserve(2))]);
        // Acknowledged entries leave the outbox with the next commit.
        let more = store.commit(&[record(1, 100, true)], &[reserve(3)], &[keys[0]]).unwrap();
        assert_eq!(store.outbox().unwrap(), [(keys[1], reserve(2)), (more[0], reserve(3))]);
        assert_eq!(store.list().unwrap().len(), 1, "the outbox is not a job record");
    }

    #[test]
    fn keyed_posts_are_recorded_with_their_job_and_found_by_requester_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let post = KeyedPost {
            requester: "studio".into(),
            key: "order-17".into(),
            job_id: JobId([1; 16]),
            spec_digest: Digest::of(b"spec"),
        };
        {
            let store = JobStore::open(dir.path()).unwrap();
            store
                .commit_with_keys(&[record(1, 100, false)], &[], &[], std::slice::from_ref(&post))
                .unwrap();
        }
        let store = JobStore::open(dir.path()).unwrap();
        assert_eq!(store.keyed_post("studio", "order-17").unwrap(), Some(post));
        assert_eq!(store.keyed_post("studio", "order-18").unwrap(), None);
        // Requester and key are length-prefixed: no other split of the same bytes matches.
        assert_eq!(store.keyed_post("studioo", "rder-17").unwrap(), None);
        assert_eq!(store.list().unwrap().len(), 1, "a key is not a job record");
    }

    #[test]
    fn a_second_open_reports_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _held = JobStore::open(dir.path()).unwrap();
        let err = JobStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("in use by another process"), "{err}");
    }
}
