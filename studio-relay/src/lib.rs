//! The Studio relay: where requesters post jobs and workers get paid.
//!
//! This library holds the relay side of aimatrix, built issue by issue:
//!
//! - the **ledger** ([`ledger`]): double-entry credit accounts with two-phase (reserve, post,
//!   void) transfers in an embedded sled database, group-committed and verified on open;
//!   [`ledger::Ledger::apply_op`] takes the protocol core's `LedgerOp`s as they are;
//! - the **relay driver** (to come), which feeds network messages, time and commands into the
//!   sans-IO `RelayCore` of `aimatrix-protocol` and carries out what it yields (messages to send,
//!   timeouts to arm, ledger writes);
//! - **job intake**: reading and checking job specs from the CLI and the HTTP API, and serving
//!   job inputs to leased nodes by content hash (to come);
//! - **verification** of returned results (hash agreement across replicas, spot checks; to come);
//! - **training aggregation**: robust per-round aggregation of model deltas (to come);
//! - the relay's **HTTP API** ([`api`]) and its client ([`client`]);
//! - the **stores** ([`store`]): content-addressed blobs and the job records that survive a
//!   restart.
//!
//! The `studio-relay` binary in this package is the command line over this library; see
//! `docs/architecture.md` for how the pieces fit and `docs/ledger.md` for the ledger.

pub mod api;
pub mod client;
pub mod ledger;
pub mod store;
