//! `aimatrix-sim train` as a process: short training runs on the real cores and the real wasm
//! guest, read through `--json`. Sizes are small (a few rounds, one or two local epochs) so
//! each test takes seconds in a debug build; the full runs are in docs/training.md.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use serde_json::Value;

/// Runs `aimatrix-sim train` with `args`, sharing one compiled-module cache between tests.
fn train(args: &[&str]) -> Output {
    let cache = format!("{}/train-wasm-cache", env!("CARGO_TARGET_TMPDIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_aimatrix-sim"))
        .arg("train")
        .args(["--wasm-cache", &cache])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "aimatrix-sim train {args:?} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn train_json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = train(&all);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(&text).unwrap()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not a count in {v}"))
}

/// Every accepted update was paid, nothing else was, and the escrow balances.
fn assert_paid_as_judged(v: &Value) {
    assert_eq!(v["job"], "completed", "{v}");
    assert_eq!(u(v, "updates_paid"), u(v, "updates_accepted"), "{v}");
    assert_eq!(u(v, "paid_not_accepted"), 0, "{v}");
    assert_eq!(u(v, "credits_paid"), 10 * u(v, "updates_accepted"), "{v}");
    assert_eq!(v["escrow_balanced"], true, "{v}");
    assert_eq!(u(v, "relay_rejections"), 0, "{v}");
}

#[test]
fn a_clean_run_learns_pays_every_accepted_update_and_reports_its_shape() {
    let v = train_json(&["--rounds", "4", "--local-epochs", "2"]);
    for key in ["accuracy", "baseline_accuracy", "rounds", "bytes_per_round"] {
        assert!(v[key].is_number(), "{key} missing from {v}");
    }
    assert_eq!(u(&v, "rounds"), 4);
    let acc = f(&v, "accuracy");
    assert!(acc > 0.6, "4 rounds of 10 participants should be well above chance (10 %): {acc}");
    assert!(f(&v, "baseline_accuracy") > 0.95, "{v}");
    // 10 uncompressed updates of the 4,810-parameter model each round.
    assert_eq!(u(&v, "raw_update_bytes"), 19_260);
    assert_eq!(f(&v, "bytes_per_round"), 192_600.0);
    assert_eq!(u(&v, "updates_accepted"), 40);
    let rounds = v["per_round"].as_array().unwrap();
    assert_eq!(rounds.len(), 4);
    let first = rounds[0]["test_accuracy"].as_f64().unwrap();
    assert!(acc > first, "accuracy rises: {first} -> {acc}");
    assert_paid_as_judged(&v);
}

#[test]
fn mean_collapses_under_the_scale_attack_without_the_norm_check_and_centered_clip_does_not() {
    let attack = ["--rounds", "4", "--local-epochs", "2", "--byzantine", "2", "--attack", "scale"];
    let mut mean = attack.to_vec();
    mean.extend(["--aggregation", "mean", "--max-norm-ratio", "0"]);
    let v = train_json(&mean);
    assert!(f(&v, "accuracy") < 0.2, "mean under scale -10 should collapse: {v}");
    assert_eq!(u(&v, "updates_rejected"), 0, "no norm check, nothing rejected: {v}");
    assert_paid_as_judged(&v);

    let mut clip = attack.to_vec();
    clip.extend(["--aggregation", "centered_clip", "--max-norm-ratio", "0"]);
    let v = train_json(&clip);
    assert!(f(&v, "accuracy") > 0.5, "centered_clip bounds the attackers' pull: {v}");
    assert_paid_as_judged(&v);
}

#[test]
fn the_norm_check_rejects_the_scaled_updates_and_they_are_not_paid() {
    let v = train_json(&["--rounds", "3", "--local-epochs", "1", "--byzantine", "2"]);
    let rounds = v["per_round"].as_array().unwrap();
    assert_eq!(rounds[0]["rejected"], 2, "both attackers are refused in round 0: {v}");
    // A refused participant is excluded from the job: later rounds run without them.
    assert_eq!(rounds[1]["participants"], 8, "{v}");
    assert_eq!(u(&v, "updates_accepted"), 8 + 8 + 8);
    assert_paid_as_judged(&v);
}

#[test]
fn dropped_participants_are_replaced_and_every_round_still_aggregates() {
    let v = train_json(&["--rounds", "4", "--local-epochs", "1", "--drop-rate", "0.3"]);
    assert_eq!(u(&v, "rounds"), 4, "{v}");
    assert!(u(&v, "leases_dropped") > 0, "{v}");
    assert!(u(&v, "nodes_leased") > 10, "standby nodes took the freed seats: {v}");
    assert!(f(&v, "accuracy") > 0.4, "{v}");
    assert_paid_as_judged(&v);
}

#[test]
fn topk_sends_a_fortieth_of_the_bytes() {
    let v = train_json(&["--rounds", "3", "--local-epochs", "1", "--compression", "topk"]);
    assert!(f(&v, "compression_ratio") >= 40.0, "{v}");
    // 1 % of the values a round learns slowly at first; the loss still falls every round.
    let losses: Vec<f64> = v["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["test_loss"].as_f64().unwrap())
        .collect();
    assert!(losses.windows(2).all(|w| w[1] < w[0]), "{losses:?}");
    assert_paid_as_judged(&v);
}

#[test]
fn the_same_seed_prints_the_same_run() {
    let args = [
        "--rounds",
        "2",
        "--local-epochs",
        "1",
        "--drop-rate",
        "0.2",
        "--byzantine",
        "1",
        "--attack",
        "label_flip",
    ];
    let a = train(&args).stdout;
    let b = train(&args).stdout;
    assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
    let mut other = args.to_vec();
    other.extend(["--seed", "2"]);
    assert_ne!(a, train(&other).stdout, "another seed, another run");
}
