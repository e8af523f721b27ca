//! Damaged ledger files are refused on open with a clear error and exit status 2, and stay
//! refused; `ledger audit` lists what is wrong and exits 1. Never a silent repair into
//! different balances.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn relay(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_studio-relay"))
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

/// A ledger with a few thousand transfers, and `node-0`'s balance as `--json`.
fn fixture() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = relay(&["ledger", "stress", "--rounds", "60", "--threads", "8"], dir.path());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let balance = relay(&["ledger", "balance", "node-0", "--json"], dir.path());
    assert!(balance.status.success());
    (dir, String::from_utf8(balance.stdout).unwrap())
}

fn db_file(dir: &Path) -> PathBuf {
    dir.join("ledger/db/db")
}

/// The damaged ledger must be refused (exit 2, saying it is corrupt), again on a second try, and
/// audit must exit 1 with at least one discrepancy (or 2 when sled cannot read the files at all).
fn assert_refused(dir: &Path) {
    for _ in 0..2 {
        let out = relay(&["ledger", "balance", "node-0", "--json"], dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "stdout {}", String::from_utf8_lossy(&out.stdout));
        assert!(stderr.contains("is corrupt"), "{stderr}");
        assert!(stderr.contains("restore"), "the error says what to do: {stderr}");
        assert!(out.stdout.is_empty());
    }
    let mint = relay(&["ledger", "mint", "alice", "5"], dir);
    assert_eq!(mint.status.code(), Some(2), "no writes on a corrupt ledger");
    let audit = relay(&["ledger", "audit", "--json"], dir);
    if audit.status.code() == Some(2) {
        // sled itself refused the files: there is nothing to list beyond that.
        assert!(String::from_utf8_lossy(&audit.stderr).contains("sled refused the files"));
        return;
    }
    assert_eq!(audit.status.code(), Some(1), "{}", String::from_utf8_lossy(&audit.stderr));
    let report: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(report["clean"], false);
    assert!(!report["problems"].as_array().unwrap().is_empty());
}

#[test]
fn a_truncated_db_file_is_refused_or_changes_nothing() {
    for keep in [0.0, 0.1, 0.5, 0.9, 0.99] {
        let (dir, balance) = fixture();
        let path = db_file(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let used = bytes.iter().rposition(|b| *b != 0).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len((bytes.len() as f64 * keep) as u64).unwrap();
        drop(file);
        let out = relay(&["ledger", "balance", "node-0", "--json"], dir.path());
        if ((bytes.len() as f64 * keep) as usize) <= used {
            assert_refused(dir.path());
        } else {
            // Only the zero-filled preallocated tail was cut: nothing changed.
            assert_eq!(String::from_utf8(out.stdout).unwrap(), balance);
        }
    }
}

#[test]
fn flipped_bytes_are_refused_or_change_nothing() {
    let mut refused = 0;
    // The stress run's file layout differs from run to run (eight writer threads), so where a
    // flip lands does too: enough rounds that some always hit live data (with 8, one run in
    // several found none).
    for round in 0..24u64 {
        let (dir, balance) = fixture();
        let path = db_file(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        // Flip bytes in the part of the file that holds data (it is preallocated with zeros).
        let used = bytes.iter().rposition(|b| *b != 0).unwrap();
        for i in 0..4u64 {
            let at = ((round * 7919 + i * 104_729) as usize * 31) % used;
            bytes[at] ^= 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let out = relay(&["ledger", "balance", "node-0", "--json"], dir.path());
        if out.status.code() == Some(2) {
            refused += 1;
            assert_refused(dir.path());
        } else {
            // Bytes sled never reads again: the balances must be exactly what they were.
            assert_eq!(String::from_utf8(out.stdout).unwrap(), balance);
            let audit = relay(&["ledger", "audit"], dir.path());
            assert_eq!(audit.status.code(), Some(0));
        }
    }
    assert!(refused > 0, "some flips should hit live data");
}

#[test]
fn a_deleted_database_with_its_head_file_left_is_refused() {
    let (dir, _) = fixture();
    std::fs::remove_dir_all(dir.path().join("ledger/db")).unwrap();
    // A mint would otherwise start a fresh, empty ledger in its place.
    let mint = relay(&["ledger", "mint", "alice", "5"], dir.path());
    assert_eq!(mint.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&mint.stderr).contains("missing"));
}

#[test]
fn a_balance_rewritten_behind_the_ledgers_back_is_refused() {
    let (dir, _) = fixture();
    {
        let db = sled::open(dir.path().join("ledger/db")).unwrap();
        // Double node-0's posted credits, consistently re-encoded: only the log disagrees.
        let key = b"anode-0";
        let value = db.get(key).unwrap().unwrap();
        let cfg = bincode::config::standard();
        let (mut counters, _): ([u128; 4], usize) =
            bincode::serde::decode_from_slice(&value, cfg).unwrap();
        counters[1] *= 2;
        db.insert(key, bincode::serde::encode_to_vec(counters, cfg).unwrap()).unwrap();
        db.flush().unwrap();
    }
    assert_refused(dir.path());
    let audit = relay(&["ledger", "audit"], dir.path());
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(text.contains("account node-0: stored"), "{text}");
    assert!(text.contains("posted debits"), "the sums no longer balance: {text}");
}
