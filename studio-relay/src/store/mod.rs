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
