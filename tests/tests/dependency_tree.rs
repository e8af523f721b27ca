//! The dependency graph is the architecture (docs/architecture.md), and these tests keep it so:
//! - the protocol core has no I/O stack and no workspace crate anywhere in its tree
//!   (dev-dependencies included): not the model maths (`aimatrix-mlp`), not a driver;
//! - its default build has neither the predictable test keys (`testkit`) nor key-file I/O, and
//!   the shipped node and relay take key files but never the testkit;
//! - every crate depends only on the crates above it on its branch: no driver on another
//!   driver, the sandbox only under the node and the simulator, the training domain on the
//!   core and the maths.

use std::collections::BTreeSet;
use std::process::Command;

const IO_STACKS: [&str; 5] = ["tokio", "libp2p", "sled", "wasmtime", "bollard"];

/// `cargo tree` for `package` with `args`, one package per line as `{p} [{f}]`.
fn tree(package: &str, args: &[&str]) -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(cargo)
        .current_dir(root)
        .args(["tree", "--locked", "-p", package, "--prefix", "none", "--format", "{p} [{f}]"])
        .args(args)
        .output()
        .expect("cargo tree runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(package), "unexpected cargo tree output:\n{stdout}");
    stdout
}

fn name(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or("")
}

/// The workspace crates `package` depends on directly (normal and build edges).
fn workspace_deps(package: &str) -> BTreeSet<String> {
    tree(package, &["--edges", "normal,build", "--depth", "1"])
        .lines()
        .map(name)
        .filter(|n| (n.starts_with("aimatrix-") || *n == "studio-relay") && *n != package)
        .map(str::to_owned)
        .collect()
}

/// The features `package`'s build turns on in `dependency`, as `cargo tree` lists them.
fn features_of(package: &str, dependency: &str) -> BTreeSet<String> {
    let out = tree(package, &["--edges", "normal,build"]);
    let line = out
        .lines()
        .find(|l| name(l) == dependency)
        .unwrap_or_else(|| panic!("{package} does not depend on {dependency}:\n{out}"));
    let inside = line.rsplit_once('[').map_or("", |(_, f)| f.trim_end_matches(']'));
    inside.split(',').map(str::trim).filter(|f| !f.is_empty()).map(str::to_owned).collect()
}

#[test]
fn protocol_dependency_tree_has_no_io_stacks_and_no_workspace_crate() {
    let out = tree("aimatrix-protocol", &["--edges", "normal,build,dev"]);
    let offenders: Vec<&str> = out
        .lines()
        .filter(|line| {
            let name = name(line);
            let io = IO_STACKS.iter().any(|f| name == *f || name.starts_with(&format!("{f}-")));
            let workspace = (name.starts_with("aimatrix-") || name == "studio-relay")
                && name != "aimatrix-protocol";
            io || workspace
        })
        .collect();
    assert!(offenders.is_empty(), "aimatrix-protocol depends on {offenders:?}");
}

#[test]
fn the_core_s_default_build_has_no_testkit_and_no_key_files_and_drivers_ship_no_testkit() {
    assert_eq!(features_of("aimatrix-protocol", "aimatrix-protocol"), BTreeSet::new());
    for shipped in ["aimatrix-node", "studio-relay"] {
        let features = features_of(shipped, "aimatrix-protocol");
        assert_eq!(features, BTreeSet::from(["key-file".to_owned()]), "{shipped}");
    }
}

#[test]
fn every_crate_depends_only_on_the_crates_above_it() {
    let allowed: [(&str, &[&str]); 7] = [
        ("aimatrix-protocol", &[]),
        ("aimatrix-training", &["aimatrix-protocol", "aimatrix-mlp"]),
        ("aimatrix-sandbox", &["aimatrix-protocol"]),
        ("aimatrix-net", &["aimatrix-protocol"]),
        (
            "aimatrix-node",
            &[
                "aimatrix-protocol",
                "aimatrix-training",
                "aimatrix-sandbox",
                "aimatrix-net",
                "aimatrix-workloads",
                "aimatrix-digits",
                "aimatrix-cli-support",
            ],
        ),
        (
            "studio-relay",
            &["aimatrix-protocol", "aimatrix-training", "aimatrix-net", "aimatrix-cli-support"],
        ),
        (
            "aimatrix-sim",
            &[
                "aimatrix-protocol",
                "aimatrix-training",
                "aimatrix-sandbox",
                "aimatrix-mlp",
                "aimatrix-workloads",
                "aimatrix-digits",
                "aimatrix-cli-support",
            ],
        ),
    ];
    for (package, above) in allowed {
        let above: BTreeSet<String> = above.iter().map(|s| (*s).to_owned()).collect();
        let extra: Vec<String> = workspace_deps(package).difference(&above).cloned().collect();
        assert!(extra.is_empty(), "{package} must not depend on {extra:?}");
    }
}
