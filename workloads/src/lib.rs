//! The guest programs that ship with aimatrix, as WebAssembly modules embedded in the binary.
//!
//! `build.rs` compiles the cargo workspace in `workloads/guests` for `wasm32-wasip1` (release,
//! LTO, `panic = "abort"`) and this crate embeds the modules: [`BATCH_STATS_WASM`] and
//! [`TRAIN_STEP_WASM`], also listed in [`ALL`]. The node's `exec` command and the sandbox
//! tests run them; the Studio relay uses them as the default modules of `batch` and
//! `training` jobs.
//!
//! Both are WASI preview 1 command modules (`_start`): arguments on the command line, files
//! in two preopened directories, one summary line on stdout, errors on stderr.
//!
//! # `batch-stats`: word statistics over documents
//!
//! `batch-stats [--inputs DIR] [--outputs DIR] [--top N]`
//!
//! - Inputs: every regular file in `--inputs` (default `/job/inputs`), in byte order of the
//!   names, read as UTF-8 (invalid sequences replaced).
//! - Output: `report.json` in `--outputs` (default `/job/outputs`): per document and in total,
//!   `bytes`, `lines`, `words` (maximal runs of alphanumeric characters, lowercased),
//!   `unique_words`, `average_word_length` and the `--top` (default 10) `top_words` (ties
//!   alphabetical). Deterministic: the same inputs give the same bytes.
//! - Stdout: `3 documents, 1234 words, 456 unique`.
//! - Exit status: 0 success; 1 the inputs directory, a document or the output could not be
//!   read or written; 2 bad arguments.
//!
//! # `train-step`: local epochs of distributed training
//!
//! `train-step [--inputs DIR] [--outputs DIR] [--epochs E] [--lr LR] [--batch B]`
//!
//! - Inputs: `model.bin` (an `aimatrix_mlp::Model`, `AMLP`) and `chunk.bin` (an
//!   `aimatrix_mlp::Dataset`, `ADSC`) in `--inputs` (default `/job/inputs`).
//! - Runs `aimatrix_mlp::train` for `--epochs` (default 1) at learning rate `--lr` (default
//!   0.1) with mini-batches of `--batch` (default 32); bitwise reproducible.
//! - Outputs in `--outputs` (default `/job/outputs`): `delta.bin` (trained minus original
//!   parameters, `AMLD`, read with `aimatrix_mlp::decode_delta`) and `metrics.json`:
//!   `{"samples":N,"loss_before":x,"loss_after":y,"accuracy_after":z}`.
//! - Stdout: `trained N samples for E epoch(s): loss x -> y, accuracy z`.
//! - Exit status: 0 success; 1 a file could not be read or written, `model.bin` or
//!   `chunk.bin` is malformed (the decoder's message is on stderr), they do not fit together,
//!   or training diverged to NaN or infinity; 2 bad arguments.
//!
//! # Example
//!
//! ```
//! let workload = aimatrix_workloads::by_name("batch-stats").expect("shipped");
//! assert!(workload.wasm.starts_with(b"\0asm"));
//! for workload in aimatrix_workloads::ALL {
//!     println!("{}: {} bytes, {}", workload.name, workload.wasm.len(), workload.description);
//! }
//! ```
//!
//! Building this crate needs the `wasm32-wasip1` target; `build.rs` installs it with rustup if
//! it is missing, and otherwise fails saying so (`rustup target add wasm32-wasip1`).

/// The `batch-stats` guest: word statistics over the documents in its inputs directory.
pub const BATCH_STATS_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/batch-stats.wasm"));

/// The `train-step` guest: local SGD epochs on one data chunk, returning a model delta.
pub const TRAIN_STEP_WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/train-step.wasm"));

/// A guest program that ships with aimatrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Short name, as used on the command line and in job specs (`batch-stats`).
    pub name: &'static str,
    /// The `wasm32-wasip1` module.
    pub wasm: &'static [u8],
    /// One line saying what it does.
    pub description: &'static str,
}

/// Every shipped guest, in alphabetical order of name.
pub const ALL: &[Workload] = &[
    Workload {
        name: "batch-stats",
        wasm: BATCH_STATS_WASM,
        description: "word statistics over the documents in /job/inputs, written to \
                      /job/outputs/report.json",
    },
    Workload {
        name: "train-step",
        wasm: TRAIN_STEP_WASM,
        description: "local SGD epochs of the digits MLP on /job/inputs/chunk.bin, writing \
                      the model delta and metrics to /job/outputs",
    },
];

/// The shipped guest called `name`, if there is one.
pub fn by_name(name: &str) -> Option<&'static Workload> {
    ALL.iter().find(|workload| workload.name == name)
}
