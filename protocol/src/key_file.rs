//! Key files on disk: the only file I/O of the protocol crate, behind its `key-file` feature
//! (the node and the relay enable it; the simulator and the core's default build do not).
//!
//! A key file is [`Keypair::to_key_file_text`]: a header line and the hex secret seed, written
//! with owner-only permissions and refused when other users can read it.

use std::path::Path;

use crate::identity::{KeyFileError, Keypair};

impl Keypair {
    /// Writes the key file with owner-only permissions (0600 on unix), atomically: the key is
    /// written to a temporary file beside it and renamed into place, so a crash never leaves a
    /// half-written identity.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let io = |source| KeyFileError::Io { path: path.display().to_string(), source };
        let tmp = path.with_extension("tmp");
        write_owner_only(&tmp, self.to_key_file_text().as_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Loads a key file, refusing files that other users can read.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyFileError::Io { path: shown.clone(), source })?;
        check_owner_only(path, &shown)?;
        Self::from_key_file_text(&text, &shown)
    }

    /// Loads the key file at `path`, or creates a new identity there when the file does not
    /// exist. Returns the keypair and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyFileError> {
        match std::fs::metadata(path) {
            Ok(_) => Ok((Self::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate_os();
                key.save(path)?;
                Ok((key, true))
            }
            Err(source) => Err(KeyFileError::Io { path: path.display().to_string(), source }),
        }
    }
}

#[cfg(unix)]
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // The mode above only applies on creation; tighten an existing file too.
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(unix)]
fn check_owner_only(path: &Path, shown: &str) -> Result<(), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|source| KeyFileError::Io { path: shown.to_owned(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::InsecurePermissions { path: shown.to_owned(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_owner_only(_path: &Path, _shown: &str) -> Result<(), KeyFileError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_roundtrip_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let (created, fresh) = Keypair::load_or_create(&path).unwrap();
        assert!(fresh);
        let (loaded, fresh) = Keypair::load_or_create(&path).unwrap();
        assert!(!fresh);
        assert_eq!(created.public(), loaded.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = Keypair::load(&path).unwrap_err();
            assert!(matches!(err, KeyFileError::InsecurePermissions { mode: 0o644, .. }));
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }
}
