//! The relay's files besides the ledger: content-addressed blobs ([`BlobStore`]) and the job
//! records that let jobs survive a restart ([`JobStore`]).
//!
//! ```no_run
//! use studio_relay::store::{BlobStore, JobStore};
//! let blobs = BlobStore::open(std::path::Path::new("/tmp/relay/blobs"))?;
//! let digest = blobs.put(b"hello")?;
//! assert_eq!(blobs.get(&digest)?.as_deref(), Some(&b"hello"[..]));
//! let jobs = JobStore::open(std::path::Path::new("/tmp/relay/jobs"))?;
//! assert!(jobs.list()?.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod blobs;
mod jobs;

pub use blobs::{BlobError, BlobStore, BLOB_BYTES_MAX};
pub use jobs::{CrossCheck, JobRecord, JobStore, JobStoreError, KeyedPost, JOB_RECORD_BYTES_MAX};

/// Runs `open` again while `is_locked` says its failure is a held file lock, 50 ms apart, for up
/// to a second.
///
/// sled releases its file lock from a background thread after the last handle is dropped, so a
/// database this process has just closed can still look locked for a moment; only a lock that
/// outlasts the second is reported as held by another process.
pub(crate) fn retry_while_locked<T, E>(
    mut open: impl FnMut() -> Result<T, E>,
    is_locked: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let mut attempts = 0;
    loop {
        match open() {
            Err(e) if is_locked(&e) && attempts < LOCK_RETRIES => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Attempts of [`retry_while_locked`] after the first, 50 ms apart.
const LOCK_RETRIES: u32 = 20;
