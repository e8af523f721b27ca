//! Content-addressed files: `<dir>/<sha256 hex>`, written whole or not at all.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aimatrix_protocol::hash::Digest;

/// The largest blob stored (modules, inputs, outputs): the direct protocol's blob limit.
pub const BLOB_BYTES_MAX: usize = aimatrix_protocol::direct::BLOB_BYTES_MAX;

/// Why a blob could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob is larger than [`BLOB_BYTES_MAX`].
    #[error("blob of {len} bytes exceeds the {max} byte limit; split the data into smaller files")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes do not hash to the digest they were announced under.
    #[error("content hashes to {actual}, not the expected {expected}; nothing was stored")]
    Mismatch {
        /// The digest asked for.
        expected: Digest,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// The disk is full; nothing was stored.
    #[error("no space left on the device holding {}: free some space; nothing was stored", dir.display())]
    DiskFull {
        /// The blob directory.
        dir: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("blob store {}: {what}: {source}", dir.display())]
    Io {
        /// The blob directory.
        dir: PathBuf,
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
}

/// Content-addressed blobs in one directory, each named by the lowercase hex of its SHA-256.
///
/// A blob is written to a temporary file in the same directory, synced, then renamed into place,
/// so a reader never sees a partial blob, even after a crash.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    temp_seq: AtomicU64,
}

impl BlobStore {
    /// Opens (creating) the blob directory `dir`, removing temporary files a crash left behind.
    pub fn open(dir: &Path) -> Result<Self, BlobError> {
        let store = Self { dir: dir.to_owned(), temp_seq: AtomicU64::new(0) };
        fs::create_dir_all(dir).map_err(|e| store.io("cannot create the directory", e))?;
        let entries = fs::read_dir(dir).map_err(|e| store.io("cannot list the directory", e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                // A leftover of an interrupted write; the blob itself was never renamed in.
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(store)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.to_hex())
    }

    /// Stores `bytes` and returns their digest; storing the same bytes again does nothing.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, BlobError> {
        let digest = Digest::of(bytes);
        self.write(digest, bytes)?;
        Ok(digest)
    }

    /// Stores `bytes` announced as `expected`, refusing them if they hash to anything else.
    pub fn put_expected(&self, expected: Digest, bytes: &[u8]) -> Result<(), BlobError> {
        let actual = Digest::of(bytes);
        if actual != expected {
            return Err(BlobError::Mismatch { expected, actual });
        }
        self.write(expected, bytes)
    }

    /// The blob's bytes, or `None` when it is not stored.
    pub fn get(&self, digest: &Digest) -> Result<Option<Vec<u8>>, BlobError> {
        match fs::read(self.path(digest)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&format!("cannot read {}", digest.to_hex()), e)),
        }
    }

    /// Whether the blob is stored.
    pub fn has(&self, digest: &Digest) -> Result<bool, BlobError> {
        self.path(digest)
            .try_exists()
            .map_err(|e| self.io(&format!("cannot look for {}", digest.to_hex()), e))
    }

    fn write(&self, digest: Digest, bytes: &[u8]) -> Result<(), BlobError> {
        if bytes.len() > BLOB_BYTES_MAX {
            return Err(BlobError::TooLarge { len: bytes.len(), max: BLOB_BYTES_MAX });
        }
        let target = self.path(&digest);
        if target.is_file() {
            return Ok(());
        }
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let temp = self.dir.join(format!(".tmp-{}-{seq}-{}", std::process::id(), digest.to_hex()));
        let written = write_synced(&temp, bytes).and_then(|()| fs::rename(&temp, &target));
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(self.io(&format!("cannot write {}", digest.to_hex()), e));
        }
        // The rename is durable once the directory itself is synced.
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    fn io(&self, what: &str, source: io::Error) -> BlobError {
        if source.kind() == io::ErrorKind::StorageFull || source.raw_os_error() == Some(28) {
            return BlobError::DiskFull { dir: self.dir.clone() };
        }
        BlobError::Io { dir: self.dir.clone(), what: what.to_owned(), source }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::options().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_has_roundtrip_and_names_files_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&dir.path().join("blobs")).unwrap();
        let d = store.put(b"abc").unwrap();
        assert_eq!(d, Digest::of(b"abc"));
        assert!(store.has(&d).unwrap());
        assert_eq!(store.get(&d).unwrap().unwrap(), b"abc");
        assert!(dir.path().join("blobs").join(d.to_hex()).is_file());
        // Storing it again is a no-op, and an unknown digest is absent.
        assert_eq!(store.put(b"abc").unwrap(), d);
        let other = Digest::of(b"other");
        assert!(!store.has(&other).unwrap());
        assert_eq!(store.get(&other).unwrap(), None);
    }

    #[test]
    fn a_hash_mismatch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let claimed = Digest::of(b"what was announced");
        let err = store.put_expected(claimed, b"something else").unwrap_err();
        assert!(matches!(err, BlobError::Mismatch { expected, .. } if expected == claimed));
        assert!(err.to_string().contains("nothing was stored"), "{err}");
        assert!(!store.has(&claimed).unwrap());
        assert!(!store.has(&Digest::of(b"something else")).unwrap());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "no file, not even a temp one");
        store.put_expected(Digest::of(b"ok"), b"ok").unwrap();
        assert!(store.has(&Digest::of(b"ok")).unwrap());
    }

    #[test]
    fn too_large_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let big = vec![0u8; BLOB_BYTES_MAX + 1];
        assert!(matches!(store.put(&big), Err(BlobError::TooLarge { .. })));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn writes_are_atomic_and_leftover_temp_files_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        // A crash between write and rename leaves only a temp file: never visible as the blob.
        let digest = Digest::of(b"whole blob");
        let leftover = dir.path().join(format!(".tmp-1-0-{}", digest.to_hex()));
        fs::write(&leftover, b"whole").unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        assert!(!leftover.exists(), "open sweeps interrupted writes");
        assert!(!store.has(&digest).unwrap());
        // A write that fails (the target name is a directory) leaves neither blob nor temp file.
        fs::create_dir(store.path(&digest)).unwrap();
        assert!(store.put_expected(digest, b"whole blob").is_err());
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [digest.to_hex()], "only the pre-existing directory remains");
    }
}
