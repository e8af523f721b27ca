//! The command-line contract every aimatrix binary keeps: `--version`, `--help`, and exit 2 with
//! help when run without a subcommand.

use std::process::{Command, Output};

use aimatrix_tests::binary;

/// Each binary and the first line of its help (its `about`).
const ABOUTS: [(&str, &str); 3] = [
    (
        "aimatrix-node",
        "aimatrix compute node: joins the network, advertises hardware, runs jobs in a sandbox",
    ),
    (
        "studio-relay",
        "aimatrix Studio relay: posts jobs to nodes, verifies results, pays workers in credits",
    ),
    (
        "aimatrix-sim",
        "aimatrix simulator: deterministic runs of many nodes on the real protocol cores",
    ),
];

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(binary(name))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|err| panic!("cannot start {name}: {err}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("output is UTF-8")
}

#[test]
fn version_prints_name_and_package_version() {
    for (name, _) in ABOUTS {
        let output = run(name, &["--version"]);
        assert_eq!(output.status.code(), Some(0), "{name} --version: {output:?}");
        assert_eq!(text(&output.stdout), format!("{name} 0.1.0\n"), "{name} --version");
    }
}

#[test]
fn help_exits_0_and_shows_about() {
    for (name, about) in ABOUTS {
        for flag in ["--help", "-h"] {
            let output = run(name, &[flag]);
            assert_eq!(output.status.code(), Some(0), "{name} {flag}: {output:?}");
            let stdout = text(&output.stdout);
            assert!(
                stdout.starts_with(about),
                "{name} {flag} does not open with {about:?}:\n{stdout}"
            );
            assert!(stdout.contains(&format!("Usage: {name}")), "{name} {flag}:\n{stdout}");
        }
    }
}

#[test]
fn no_arguments_is_a_usage_error_with_help_on_stderr() {
    for (name, about) in ABOUTS {
        let output = run(name, &[]);
        assert_eq!(output.status.code(), Some(2), "{name} without arguments: {output:?}");
        assert!(output.stdout.is_empty(), "{name} without arguments wrote to stdout");
        let stderr = text(&output.stderr);
        assert!(stderr.contains(about), "{name} without arguments shows no help:\n{stderr}");
    }
}

#[test]
fn unknown_argument_is_a_usage_error() {
    for (name, _) in ABOUTS {
        let output = run(name, &["--no-such-flag"]);
        assert_eq!(output.status.code(), Some(2), "{name} --no-such-flag: {output:?}");
        assert!(text(&output.stderr).contains("--no-such-flag"), "{name} --no-such-flag");
    }
}

#[test]
fn invalid_rust_log_is_an_error_that_names_it() {
    for (name, _) in ABOUTS {
        let output = Command::new(binary(name))
            .env("RUST_LOG", "aimatrix=lots")
            .output()
            .unwrap_or_else(|err| panic!("cannot start {name}: {err}"));
        assert_eq!(output.status.code(), Some(2), "{name} with RUST_LOG=aimatrix=lots: {output:?}");
        let stderr = text(&output.stderr);
        assert!(stderr.contains("RUST_LOG"), "{name} does not say RUST_LOG is wrong:\n{stderr}");
    }
}
