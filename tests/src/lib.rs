//! Integration tests for aimatrix: the real binaries, run as processes.
//!
//! The tests are the files under `tests/` in this package; this library holds what they share.
//! [`binary`] gives the path of a freshly built aimatrix binary, to run with
//! [`std::process::Command`].
//!
//! # Why [`binary`] runs cargo
//!
//! Cargo builds a package's binaries before that package's integration tests and names them in
//! `CARGO_BIN_EXE_<name>`, but only for binaries of the same package. The binaries under test live
//! in other packages, and `cargo test --workspace` compiles those only as unit-test harnesses,
//! never as the programs themselves (artifact dependencies, which would say "build these first",
//! are unstable). Guessing a path under `target/` would find nothing on a clean checkout, or a
//! stale binary after an edit. So the first call of [`binary`] in a test process runs
//! `cargo build --bins` for the binary packages, which costs nothing when they are up to date, and
//! takes each executable's path from cargo's JSON messages instead of from the layout of the
//! target directory (which `CARGO_TARGET_DIR`, `--target` and `build.build-dir` all change).
//!
//! # Example
//!
//! ```no_run
//! let output = std::process::Command::new(aimatrix_tests::binary("aimatrix-node"))
//!     .arg("--version")
//!     .output()?;
//! assert!(output.status.success());
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The binaries under test, as (package, binary) pairs.
pub const BINARIES: [(&str, &str); 3] = [
    ("aimatrix-node", "aimatrix-node"),
    ("studio-relay", "studio-relay"),
    ("aimatrix-sim", "aimatrix-sim"),
];

/// The path of the aimatrix binary `name`, built from the current sources.
///
/// The first call in a process builds all of [`BINARIES`] with the cargo that runs the tests,
/// in the profile the tests were built in (`dev`, or `release` without debug assertions).
///
/// # Panics
///
/// If `name` is not one of [`BINARIES`], or if the build fails (the panic message carries
/// cargo's output). A test cannot go on without its binary, so it fails right there.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<HashMap<String, PathBuf>, String>> = OnceLock::new();
    let built = match BUILT.get_or_init(build_binaries) {
        Ok(built) => built,
        Err(message) => panic!("{message}"),
    };
    match built.get(name) {
        Some(path) => path.clone(),
        None => panic!("no aimatrix binary named {name:?}; the binaries are {BINARIES:?}"),
    }
}

/// The workspace the running tests belong to. Found from the `CARGO_MANIFEST_DIR` cargo sets
/// when it runs a test, not the one baked in at compile time: cargo hashes workspace members
/// by their path inside the workspace, so two checkouts sharing one target directory share
/// this crate's compiled library, and the baked path can name the other checkout (whose
/// binaries, built from other sources, the tests would then run).
fn workspace_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let is_root = |dir: &Path| {
        std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]"))
    };
    start.ancestors().find(|dir| is_root(dir)).map_or(start.join(".."), Path::to_path_buf)
}

/// Runs `cargo build --bins` for [`BINARIES`] and maps each binary's name to its executable.
fn build_binaries() -> Result<HashMap<String, PathBuf>, String> {
    let workspace_root = workspace_root();
    // Prefer the cargo running the tests; a test binary started by hand gets the one that built it.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let profile = if cfg!(debug_assertions) { "dev" } else { "release" };
    let mut command = Command::new(&cargo);
    command
        .current_dir(&workspace_root)
        .args(["build", "--locked", "--bins", "--message-format=json-render-diagnostics"])
        .args(["--profile", profile]);
    for (package, _) in BINARIES {
        command.args(["--package", package]);
    }
    let output = command.output().map_err(|err| {
        format!(
            "cannot run {cargo:?} to build the binaries under test: {err}; \
             run the tests with `cargo test`"
        )
    })?;
    if !output.status.success() {
        return Err(format!(
            "building the binaries under test failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut built = HashMap::new();
    for line in stdout.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(executable)) =
            (message["target"]["name"].as_str(), message["executable"].as_str())
        else {
            continue;
        };
        built.insert(name.to_owned(), PathBuf::from(executable));
    }
    for (_, name) in BINARIES {
        if !built.contains_key(name) {
            return Err(format!("cargo built no executable named {name:?}; its output:\n{stdout}"));
        }
    }
    Ok(built)
}

/// Calls `check` every `poll` until it returns something, for at most `limit`.
///
/// # Panics
///
/// After `limit`, naming `what`: the test cannot go on without it.
pub fn wait_for<T>(
    what: &str,
    limit: std::time::Duration,
    poll: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(started.elapsed() < limit, "gave up waiting for {what} after {limit:?}");
        std::thread::sleep(poll);
    }
}

/// `text` parsed as JSON (a command's `--json` output).
///
/// # Panics
///
/// When it is not JSON, showing the text.
pub fn parse_json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("expected JSON ({e}), got {text:?}"))
}

/// A finished command's status, stdout and stderr, for a failure message.
pub fn show(output: &std::process::Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// `cmd` without any of the aimatrix settings of the environment the tests run in (data
/// directories, API addresses, the node's config file), so each child sees only its flags.
pub fn without_aimatrix_env(cmd: &mut Command) -> &mut Command {
    for var in [
        "AIMATRIX_RELAY_DATA_DIR",
        "AIMATRIX_RELAY_API",
        "AIMATRIX_DATA_DIR",
        "AIMATRIX_NODE_API",
        "AIMATRIX_NODE_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// The first line `child` writes to its piped stdout (`studio-relay serve` prints its address
/// there), waiting at most `limit`; the rest of its stdout is drained in the background, so a
/// later write never fails on a closed pipe. `None` when nothing came in time.
///
/// # Panics
///
/// If the child's stdout was not piped.
pub fn first_stdout_line(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> Option<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("the child's stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    rx.recv_timeout(limit).ok()
}

/// Prints the last `lines` lines of each log (name, path), for a failing test's output.
pub fn print_log_tails(logs: &[(String, PathBuf)], lines: usize) {
    for (name, path) in logs {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        eprintln!("----- {name} ({}), last {} lines:", path.display(), tail.len());
        for line in tail {
            eprintln!("{line}");
        }
    }
}
