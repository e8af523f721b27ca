//! The Studio relay: where requesters post jobs and workers get paid.
//!
//! This library will hold the relay side of aimatrix, built issue by issue:
//!
//! - the **relay driver**, which feeds network messages, time and commands into the sans-IO
//!   `RelayCore` of `aimatrix-protocol` and carries out what it yields (messages to send,
//!   timeouts to arm, ledger writes);
//! - **job intake**: reading and checking job specs from the CLI and the HTTP API, and serving
//!   job inputs to leased nodes by content hash;
//! - **verification** of returned results (hash agreement across replicas, spot checks);
//! - **training aggregation**: robust per-round aggregation of model deltas;
//! - the **ledger**, double-entry credit accounts in an embedded sled database, with rewards
//!   reserved as pending transfers and then posted or voided;
//! - the relay's **HTTP API**.
//!
//! The `studio-relay` binary in this package is the command line over this library. Nothing of
//! the above exists yet; see `docs/architecture.md` for how the pieces fit.
