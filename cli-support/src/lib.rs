//! What the three aimatrix binaries (`aimatrix-node`, `studio-relay`, `aimatrix-sim`) share on
//! the command line: logs to stderr filtered by `RUST_LOG`, the exit status contract (0
//! success, 1 negative answer, 2 error), help on a bare invocation, and a free loopback port
//! for the processes the devnet and the tests start.
//!
//! ```no_run
//! # #[derive(clap::Parser)] struct Cli;
//! fn main() -> std::process::ExitCode {
//!     aimatrix_cli_support::finish("my-bin", aimatrix_cli_support::init_logging("my_bin").map(|()| {
//!         std::process::ExitCode::SUCCESS
//!     }))
//! }
//! ```

use std::env::VarError;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use clap::CommandFactory;
use tracing_subscriber::EnvFilter;

/// Exit status for every error: bad usage, bad input, a failure while running.
pub const EXIT_ERROR: u8 = 2;

/// Log filter used when `RUST_LOG` is unset or empty.
pub const LOG_FILTER_DEFAULT: &str = "warn";

/// The `after_help` text every binary shows.
pub const AFTER_HELP: &str = "Exit status: 0 success, 1 the command ran and its answer is \
                              negative, 2 error.\nLogs go to stderr; RUST_LOG sets the filter \
                              (default: warn).";

/// Sends `tracing` output to stderr, filtered by `RUST_LOG`; `crate_name` appears in the
/// example of the error message for an invalid filter.
pub fn init_logging(crate_name: &str) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .map_err(|err| {
                anyhow!(
                    "RUST_LOG={directives:?} is not a valid log filter ({err}); \
                     try RUST_LOG=info or RUST_LOG={crate_name}=debug"
                )
            })?,
        Ok(_) | Err(VarError::NotPresent) => EnvFilter::new(LOG_FILTER_DEFAULT),
        Err(VarError::NotUnicode(_)) => {
            bail!("RUST_LOG is not valid UTF-8; try RUST_LOG=info or unset it")
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|err| anyhow!("installing the stderr logger failed: {err}"))
}

/// The default data directory of program `app`: `$XDG_DATA_HOME/<app>`, else
/// `$HOME/.local/share/<app>` (empty variables count as unset).
pub fn default_data_dir(app: &str) -> Option<std::path::PathBuf> {
    let non_empty = |v: std::ffi::OsString| (!v.is_empty()).then(|| std::path::PathBuf::from(v));
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").and_then(non_empty) {
        return Some(xdg.join(app));
    }
    std::env::var_os("HOME").and_then(non_empty).map(|home| home.join(".local/share").join(app))
}

/// A bare invocation is a usage error, like any other clap rejects: help on stderr, exit 2.
pub fn bare_invocation<C: CommandFactory>() -> ExitCode {
    eprint!("{}", C::command().render_help());
    ExitCode::from(EXIT_ERROR)
}

/// Turns a command's result into the process exit status, printing an error as
/// `<bin>: error: <message>` (exit 2).
pub fn finish(bin: &str, result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("{bin}: error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Resolves when the process receives SIGINT (Ctrl-C) or, on Unix, SIGTERM: the long-running
/// commands (`serve`, `join`, `devnet`) stop cleanly on either.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// A free TCP port on 127.0.0.1 for a child process to bind right after (it is bound here and
/// released). It is taken below Linux's ephemeral range (32768 and up): a port from that range
/// can be taken by another process's listener on port 0 (a libp2p node on `tcp/0`) in the
/// moment before the child binds it. Successive calls in one process try successive ports.
///
/// # Errors
///
/// When no port between 20000 and 31999 can be bound.
pub fn free_loopback_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Processes started at the same time (parallel test binaries) start at different places.
    let base = 20_000 + (std::process::id() % 1_000) as u16 * 12;
    for _ in 0..12_000 {
        let port =
            20_000 + (base - 20_000 + NEXT.fetch_add(1, Ordering::Relaxed) % 12_000) % 12_000;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return Ok(listener.local_addr()?.port());
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port on 127.0.0.1 between 20000 and 31999",
    ))
}
