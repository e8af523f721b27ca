//! Ledger benchmark (placeholder).
fn main() {}
