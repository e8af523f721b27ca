//! Collecting a job's output files without trusting anything the guest left behind.
//!
//! The outputs directory is opened as a capability (`cap-std`): every lookup is confined to it,
//! so no path can resolve outside it. Symlinks (to anywhere) and special files are skipped, never
//! followed; regular files are hashed while they are read, and reading stops as soon as the
//! quota is passed, whatever sizes the metadata claimed.

use std::io::Read;
use std::path::Path;

use aimatrix_protocol::hash::Digest;
use cap_std::fs::Dir;
use sha2::{Digest as _, Sha256};

use crate::{ExecLimits, ExecStatus, OutputFile};

/// Deepest directory nesting followed inside the outputs directory.
pub const MAX_DEPTH: usize = 16;

/// Why outputs could not be collected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectError {
    /// The files add up to more than the quota.
    #[error("outputs exceed the {quota} byte quota")]
    QuotaExceeded {
        /// The quota.
        quota: u64,
    },
    /// More files than allowed.
    #[error("outputs hold more than {max} files")]
    TooManyFiles {
        /// The limit.
        max: usize,
    },
    /// The directory could not be read.
    #[error("cannot read outputs: {0}")]
    Io(String),
}

/// Collects every regular file under `outputs_dir`, sorted by name.
pub fn collect(
    outputs_dir: &Path,
    quota: u64,
    max_files: usize,
) -> Result<Vec<OutputFile>, CollectError> {
    let dir = Dir::open_ambient_dir(outputs_dir, cap_std::ambient_authority())
        .map_err(|e| CollectError::Io(format!("{}: {e}", outputs_dir.display())))?;
    let mut out = Vec::new();
    let mut used = 0u64;
    walk(&dir, "", 0, quota, max_files, &mut used, &mut out)?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn walk(
    dir: &Dir,
    prefix: &str,
    depth: usize,
    quota: u64,
    max_files: usize,
    used: &mut u64,
    out: &mut Vec<OutputFile>,
) -> Result<(), CollectError> {
    let io = |e: std::io::Error| CollectError::Io(e.to_string());
    let mut entries: Vec<_> = dir.entries().map_err(io)?.collect::<Result<_, _>>().map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        let file_type = entry.file_type().map_err(io)?;
        let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        if file_type.is_dir() {
            if depth + 1 < MAX_DEPTH {
                let sub = entry.open_dir().map_err(io)?;
                walk(&sub, &path, depth + 1, quota, max_files, used, out)?;
            }
        } else if file_type.is_file() {
            if out.len() >= max_files {
                return Err(CollectError::TooManyFiles { max: max_files });
            }
            let file = dir.open(&name).map_err(io)?;
            if !file.metadata().map_err(io)?.is_file() {
                continue;
            }
            let (sha256, bytes) = hash_capped(file, quota.saturating_sub(*used))
                .map_err(io)?
                .ok_or(CollectError::QuotaExceeded { quota })?;
            *used += bytes;
            out.push(OutputFile { name: path, sha256, bytes });
        }
        // Symlinks, sockets, fifos and devices are skipped, never followed or read.
    }
    Ok(())
}

/// Collects a finished run's outputs under `limits`; a quota or file-count breach (or, for a
/// run that otherwise succeeded, any collection failure) turns `status` into
/// [`ExecStatus::OutputLimitExceeded`] and reports no outputs.
pub fn collect_for_run(
    outputs_dir: &Path,
    limits: &ExecLimits,
    status: &mut ExecStatus,
) -> Vec<OutputFile> {
    match collect(outputs_dir, limits.output_quota_bytes, limits.output_files_max) {
        Ok(files) => files,
        Err(e) => {
            let limit_hit =
                matches!(e, CollectError::QuotaExceeded { .. } | CollectError::TooManyFiles { .. });
            if status.is_success() || limit_hit {
                *status = ExecStatus::OutputLimitExceeded { what: e.to_string() };
            }
            Vec::new()
        }
    }
}

/// Hashes at most `budget` bytes; `None` when the file holds more.
fn hash_capped(file: impl Read, budget: u64) -> std::io::Result<Option<(Digest, u64)>> {
    let mut hasher = Sha256::new();
    let mut limited = file.take(budget.saturating_add(1));
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = limited.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > budget {
            return Ok(None);
        }
        hasher.update(&buf[..n]);
    }
    Ok(Some((Digest(hasher.finalize().into()), total)))
}

/// Bytes held by regular files under `outputs_dir` (by metadata, symlinks not followed),
/// stopping once `limit` is passed. Used while a guest runs to stop it early.
pub fn usage(outputs_dir: &Path, limit: u64) -> u64 {
    let Ok(dir) = Dir::open_ambient_dir(outputs_dir, cap_std::ambient_authority()) else {
        return 0;
    };
    let mut total = 0;
    usage_in(&dir, 0, limit, &mut total);
    total
}

fn usage_in(dir: &Dir, depth: usize, limit: u64, total: &mut u64) {
    let Ok(entries) = dir.entries() else { return };
    for entry in entries.flatten() {
        if *total > limit {
            return;
        }
        let Ok(file_type) = entry.file_type() else { continue };
        if file_type.is_file() {
            if let Ok(meta) = entry.metadata() {
                *total = total.saturating_add(meta.len());
            }
        } else if file_type.is_dir() && depth + 1 < MAX_DEPTH {
            if let Ok(sub) = entry.open_dir() {
                usage_in(&sub, depth + 1, limit, total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_files_and_skips_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), b"hello").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), b"world!").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
            std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
            std::os::unix::fs::symlink("a.txt", dir.path().join("inner-link")).unwrap();
        }
        let files = collect(dir.path(), 1 << 20, 10).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["a.txt", "sub/b.txt"]);
        assert_eq!(files[0].sha256, Digest::of(b"hello"));
        assert_eq!(files[1].bytes, 6);
        assert_eq!(usage(dir.path(), u64::MAX), 11);
    }

    #[test]
    fn quota_and_file_count_are_enforced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 100]).unwrap();
        std::fs::write(dir.path().join("b"), vec![0u8; 100]).unwrap();
        assert_eq!(collect(dir.path(), 150, 10), Err(CollectError::QuotaExceeded { quota: 150 }));
        assert_eq!(collect(dir.path(), 1000, 1), Err(CollectError::TooManyFiles { max: 1 }));
        assert_eq!(collect(dir.path(), 200, 2).unwrap().len(), 2);
    }
}
