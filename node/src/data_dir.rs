//! The node's data directory: identity, compiled-module cache, receipts.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The directory to use: `explicit`, else `$XDG_DATA_HOME/aimatrix`, else
/// `$HOME/.local/share/aimatrix`; created owner-only when missing.
pub(crate) fn resolve(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match explicit {
        Some(dir) => dir.to_owned(),
        None => aimatrix_cli_support::default_data_dir("aimatrix").context(
            "cannot find a data directory: set --data-dir, AIMATRIX_DATA_DIR, XDG_DATA_HOME or HOME",
        )?,
    };
    create_private(&dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    Ok(dir)
}

fn create_private(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir)
    }
}
