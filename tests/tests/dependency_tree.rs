//! The protocol crate stays free of I/O stacks: no async runtime, network stack, database or
//! sandbox anywhere in its dependency tree (dev-dependencies included).

use std::process::Command;

const FORBIDDEN: [&str; 5] = ["tokio", "libp2p", "sled", "wasmtime", "bollard"];

#[test]
fn protocol_dependency_tree_has_no_io_stacks() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(cargo)
        .current_dir(root)
        .args(["tree", "--locked", "-p", "aimatrix-protocol", "--prefix", "none"])
        .args(["--edges", "normal,build,dev", "--format", "{p}"])
        .output()
        .expect("cargo tree runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("aimatrix-protocol"), "unexpected cargo tree output:\n{stdout}");
    let offenders: Vec<&str> = stdout
        .lines()
        .filter(|line| {
            let name = line.split_whitespace().next().unwrap_or("");
            FORBIDDEN.iter().any(|f| name == *f || name.starts_with(&format!("{f}-")))
        })
        .collect();
    assert!(offenders.is_empty(), "aimatrix-protocol depends on I/O crates: {offenders:?}");
}
