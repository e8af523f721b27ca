//! The embedded guests are real WebAssembly modules of a plausible size.

use aimatrix_workloads::{by_name, ALL, BATCH_STATS_WASM, TRAIN_STEP_WASM};

/// `\0asm` followed by binary format version 1.
const WASM_HEADER: &[u8] = b"\0asm\x01\0\0\0";

#[test]
fn guests_are_wasm_modules() {
    for (name, wasm) in [("batch-stats", BATCH_STATS_WASM), ("train-step", TRAIN_STEP_WASM)] {
        assert!(wasm.starts_with(WASM_HEADER), "{name} does not start with the wasm header");
        // A std program with argument parsing and file I/O is tens of kilobytes at least; a
        // stub or an empty file is not.
        assert!(wasm.len() > 20_000, "{name} is only {} bytes", wasm.len());
        assert!(wasm.len() < 5_000_000, "{name} is {} bytes: debug info not stripped?", wasm.len());
    }
    assert_ne!(BATCH_STATS_WASM, TRAIN_STEP_WASM);
}

#[test]
fn guests_are_wasi_commands() {
    for workload in ALL {
        // A command module exports `_start` and imports from WASI preview 1.
        let contains = |needle: &[u8]| workload.wasm.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"_start"), "{} exports no _start", workload.name);
        assert!(contains(b"wasi_snapshot_preview1"), "{} imports no WASI", workload.name);
    }
}

#[test]
fn the_list_is_complete_and_searchable() {
    let names: Vec<&str> = ALL.iter().map(|w| w.name).collect();
    assert_eq!(names, ["batch-stats", "train-step"]);
    assert_eq!(by_name("train-step").map(|w| w.wasm), Some(TRAIN_STEP_WASM));
    assert_eq!(by_name("nope"), None);
    assert!(ALL.iter().all(|w| !w.description.is_empty()));
}
