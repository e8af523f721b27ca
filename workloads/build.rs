//! Builds the guest programs in `guests/` for wasm32-wasip1 and copies the modules into
//! `OUT_DIR`, where `src/lib.rs` embeds them with `include_bytes!`.
//!
//! The guests are a cargo workspace of their own, built by a nested `cargo build` into
//! `OUT_DIR/guests-target`. Everything the outer build puts in the environment for its own
//! compilation (flags for the host, clippy's wrapper, the jobserver, build-script variables)
//! is removed first: the nested build must give the same modules whether the outer one is a
//! `cargo build`, a `cargo clippy`, a coverage run or an IDE's check.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target the guests are compiled for.
const TARGET: &str = "wasm32-wasip1";
/// What the `workloads/` directory is called in paths compiled into the modules.
const REMAPPED_SOURCE_DIR: &str = "/aimatrix/workloads";
/// The guest binaries, each a member of `guests/`.
const GUESTS: [&str; 2] = ["batch-stats", "train-step"];

fn main() {
    let manifest_dir = PathBuf::from(required_env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(required_env("OUT_DIR"));
    let guests_dir = manifest_dir.join("guests");

    watch_sources(&manifest_dir);
    // The compiler building this crate builds the guests too.
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    ensure_target_installed(&rustc);
    let target_dir = out_dir.join("guests-target");
    build_guests(&rustc, &guests_dir, &target_dir);
    for guest in GUESTS {
        let built = target_dir.join(TARGET).join("release").join(format!("{guest}.wasm"));
        let embedded = out_dir.join(format!("{guest}.wasm"));
        if let Err(err) = fs::copy(&built, &embedded) {
            panic!("cannot copy {} to {}: {err}", built.display(), embedded.display());
        }
    }
}

fn required_env(key: &str) -> OsString {
    let Some(value) = env::var_os(key) else {
        panic!("{key} is not set; this build script must be run by cargo");
    };
    value
}

/// Asks cargo to rerun this script when a guest, the model crate, or a manifest they inherit
/// from changes. The nested cargo then decides what actually needs recompiling.
fn watch_sources(manifest_dir: &Path) {
    let mut paths = vec![
        manifest_dir.join("guests/Cargo.toml"),
        manifest_dir.join("guests/Cargo.lock"),
        manifest_dir.join("mlp/Cargo.toml"),
        manifest_dir.join("mlp/src"),
    ];
    // aimatrix-mlp inherits its version, edition and lints from the root manifest.
    if let Some(root) = manifest_dir.parent() {
        paths.push(root.join("Cargo.toml"));
    }
    for guest in GUESTS {
        paths.push(manifest_dir.join("guests").join(guest).join("Cargo.toml"));
        paths.push(manifest_dir.join("guests").join(guest).join("src"));
    }
    for path in paths {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// Makes sure the standard library for [`TARGET`] is installed for `rustc`'s toolchain,
/// installing it with rustup if it is not.
fn ensure_target_installed(rustc: &OsString) {
    let sysroot = sysroot(rustc);
    if has_target(&sysroot) {
        return;
    }
    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", TARGET]);
    // Install for the toolchain in use, not whatever rustup's default is.
    if sysroot.parent().and_then(Path::file_name).is_some_and(|name| name == "toolchains") {
        if let Some(toolchain) = sysroot.file_name() {
            rustup.arg("--toolchain").arg(toolchain);
        }
    }
    let failure = match rustup.output() {
        Ok(output) if output.status.success() && has_target(&sysroot) => return,
        Ok(output) if output.status.success() => format!(
            "`rustup target add {TARGET}` succeeded but did not install it there \
             (it installed it for another toolchain?)"
        ),
        Ok(output) => format!(
            "`rustup target add {TARGET}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(err) if err.kind() == ErrorKind::NotFound => {
            "rustup is not installed, so it could not be added".to_owned()
        }
        Err(err) => format!("`rustup target add {TARGET}` could not be run: {err}"),
    };
    panic!(
        "\n\naimatrix-workloads compiles its guest programs for {TARGET}, but the Rust toolchain \
         at {} has no {TARGET} standard library; {failure}.\n\
         Fix: run `rustup target add {TARGET}` (or install your distribution's rust-std for \
         {TARGET}) and build again.\n\n",
        sysroot.display()
    );
}

fn sysroot(rustc: &OsString) -> PathBuf {
    let output = match Command::new(rustc).args(["--print", "sysroot"]).output() {
        Ok(output) if output.status.success() => output,
        Ok(output) => panic!(
            "`{} --print sysroot` failed ({}): {}",
            rustc.to_string_lossy(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(err) => panic!("cannot run `{} --print sysroot`: {err}", rustc.to_string_lossy()),
    };
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

fn has_target(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib").join(TARGET).join("lib").is_dir()
}

/// Runs `cargo build --release --locked --target wasm32-wasip1` on the guest workspace in a
/// clean environment.
fn build_guests(rustc: &OsString, guests_dir: &Path, target_dir: &Path) {
    let cargo = required_env("CARGO");
    let mut command = Command::new(&cargo);
    command
        .args(["build", "--release", "--locked", "--target", TARGET, "--manifest-path"])
        .arg(guests_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(guests_dir);
    // The jobserver is not inherited (its variables are cleared below), so at least respect
    // the outer build's -j.
    if let Some(jobs) = env::var_os("NUM_JOBS") {
        command.arg("--jobs").arg(jobs);
    }
    for (key, _) in env::vars_os() {
        if key.to_str().is_some_and(leaks_into_nested_build) {
            command.env_remove(&key);
        }
    }
    command.env("RUSTC", rustc);
    // Panic messages embed source paths; without this the modules' bytes (and hashes) would
    // depend on where the repository is checked out. Standard library paths are already
    // `/rustc/<commit>/...`, so the same toolchain gives the same modules everywhere.
    if let Some(workloads) = guests_dir.parent().and_then(Path::to_str) {
        // simd128 lets LLVM vectorize the guests' loops as it does natively; wasm SIMD float
        // arithmetic is IEEE-exact and NaN canonicalization covers its lanes, so
        // deterministic mode still holds. (Flags are separated by 0x1f.)
        let flags = format!(
            "--remap-path-prefix={workloads}={REMAPPED_SOURCE_DIR}\x1f-Ctarget-feature=+simd128"
        );
        command.env("CARGO_ENCODED_RUSTFLAGS", flags);
    }

    let output = match command.output() {
        Ok(output) => output,
        Err(err) => panic!("cannot run {}: {err}", cargo.to_string_lossy()),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let hint = if stderr.contains("lock file") {
            format!(
                "\nA guest's dependencies or the workspace version changed: update the guests' \
                 lock file with `cargo update --workspace --manifest-path {}` and commit it.",
                guests_dir.join("Cargo.toml").display()
            )
        } else {
            String::new()
        };
        panic!(
            "\n\nbuilding the guest programs failed ({}): {} {}\n\n{}\n{hint}\n\n",
            output.status,
            cargo.to_string_lossy(),
            command.get_args().map(|arg| arg.to_string_lossy()).collect::<Vec<_>>().join(" "),
            stderr.trim(),
        );
    }
}

/// Whether an environment variable set for (or by) the outer build must not reach the nested
/// one.
///
/// - `RUSTFLAGS`, `CARGO_ENCODED_RUSTFLAGS`, `CARGO_BUILD_RUSTFLAGS` and friends are meant for
///   the host (`-C target-cpu=native`, coverage instrumentation) and break or change wasm.
/// - `RUSTC_WRAPPER` / `RUSTC_WORKSPACE_WRAPPER` (clippy sets the latter; sccache the former)
///   would run the guests through clippy or a cache keyed for another target.
/// - `CARGO_TARGET_DIR`, `CARGO_BUILD_TARGET`, `CARGO_PROFILE_*`, `CARGO_INCREMENTAL`, … are
///   cargo configuration for the outer build; the nested build has its own profile and target.
/// - `CARGO_MAKEFLAGS` / `MAKEFLAGS` / `MFLAGS` name the outer jobserver's file descriptors,
///   which are not valid in the nested process.
/// - Build-script variables (`CARGO_CFG_*`, `CARGO_FEATURE_*`, `CARGO_PKG_*`, `TARGET`,
///   `OUT_DIR`, `DEP_*`, …) describe this crate's host build, not the guests.
///
/// `CARGO_HOME` and network/registry settings are kept, so the nested build uses the same
/// caches and proxies; `RUSTC` is set explicitly to the outer build's compiler, and
/// `CARGO_ENCODED_RUSTFLAGS` to nothing but a path remapping.
fn leaks_into_nested_build(key: &str) -> bool {
    const KEEP: [&str; 1] = ["CARGO_HOME"];
    const KEEP_PREFIXES: [&str; 4] =
        ["CARGO_NET_", "CARGO_HTTP_", "CARGO_REGISTRIES_", "CARGO_REGISTRY_"];
    const CLEAR: [&str; 19] = [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "MAKEFLAGS",
        "MFLAGS",
        "CLIPPY_ARGS",
        "CLIPPY_CONF_DIR",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "DEBUG",
        "PROFILE",
        "NUM_JOBS",
    ];
    if KEEP.contains(&key) || KEEP_PREFIXES.iter().any(|prefix| key.starts_with(prefix)) {
        return false;
    }
    CLEAR.contains(&key)
        || key.starts_with("CARGO_")
        || key.starts_with("__CARGO")
        || key.starts_with("DEP_")
}
