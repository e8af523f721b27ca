//! The Studio relay's library: what `studio-relay serve` keeps and serves, and how the CLI
//! talks to a running relay.
//!
//! Every decision about a job is made by the sans-IO `RelayCore` of `aimatrix-protocol`, and
//! what a training job's bytes mean by `aimatrix-training`. This library holds the rest:
//!
//! - the **ledger** ([`ledger`]): the protocol core's ledger state machine
//!   ([`ledger::LedgerState`], re-exported) made durable: double-entry credit accounts with
//!   two-phase (reserve, post, void) transfers in an embedded sled database, group-committed and
//!   verified on open; [`ledger::Ledger::apply_op`] takes the core's `LedgerOp`s as they are;
//! - the **stores** ([`store`]): content-addressed blobs (modules, inputs, outputs, training
//!   chunks and models) and the job records that let jobs survive a restart;
//! - the relay's **HTTP API** ([`api`]): job routes become [`api::ApiCommand`]s for the relay
//!   driver, blob and ledger routes are served from the stores and the ledger; and its blocking
//!   **client** ([`client`]), which the `job` and `ledger` subcommands use.
//!
//! The `studio-relay` binary in this package holds the relay driver (`src/serve/`: the event
//! loop over the core, the network, the ledger and the stores; job intake; content serving;
//! training data and round judging through `aimatrix-training`) and the command line over this
//! library. See `docs/network.md` for the driver, `docs/api.md` for the API and
//! `docs/ledger.md` for the ledger.
//!
//! ```no_run
//! use studio_relay::client::RelayClient;
//! let relay = RelayClient::new("127.0.0.1:7780");
//! println!("{} credits available", relay.balance("studio")?.available);
//! # Ok::<(), studio_relay::client::ClientError>(())
//! ```

pub mod api;
pub mod client;
pub mod ledger;
pub mod store;
