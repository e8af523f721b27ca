//! The subcommands, one file per group.

pub(crate) mod job;
pub(crate) mod ledger;
pub(crate) mod status;

/// The relay's data directory: `explicit`, else the default (`$XDG_DATA_HOME/aimatrix-relay`,
/// else `~/.local/share/aimatrix-relay`).
pub(crate) fn relay_data_dir(
    explicit: Option<&std::path::Path>,
) -> anyhow::Result<std::path::PathBuf> {
    match explicit {
        Some(dir) => Ok(dir.to_owned()),
        None => aimatrix_cli_support::default_data_dir("aimatrix-relay").ok_or_else(|| {
            anyhow::anyhow!("cannot find a data directory: set --data-dir, XDG_DATA_HOME or HOME")
        }),
    }
}
