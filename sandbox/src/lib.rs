//! Sandboxed execution of aimatrix workloads.
//!
//! This crate will hold the `Executor` trait, through which a node runs a leased job under the
//! job's resource limits and gets back its outputs and a usage
//! account, and the two executors behind it: a wasmtime executor for `wasm32-wasip1` workloads
//! (issue 3) and a Docker executor, through bollard, for container workloads (issue 4).
//!
//! It depends on `aimatrix-protocol` for job specs and limits, and on no network stack; the node
//! (`aimatrix-node`) is its only user. Nothing of the above exists yet.
