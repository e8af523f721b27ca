//! The aimatrix protocol core.
//!
//! Everything the network decides lives here, with no I/O: identities ([`identity`]), signed
//! envelopes ([`envelope`]), the wire codec ([`codec`]), capability profiles
//! ([`capability`]), job specs ([`job`]), matching ([`matching`]), the messages
//! ([`messages`]), ledger instructions ([`ledger`]), and the job lifecycle as sans-IO state
//! machines: [`relay::RelayCore`] and [`node::NodeCore`]. What a training job's bytes mean (its
//! data split, a step's plan, the judging of a round) is the `aimatrix-training` crate's, above
//! this one.
//! The libp2p node, the Studio relay and the simulator drive the same cores: inputs go in
//! through `handle_*(now, ...)`, outputs come out of `poll_*()`. Time and randomness are
//! inputs; no clock, socket or database here.
//!
//! ```
//! use aimatrix_protocol::{job::JobSpec, matching, testkit};
//!
//! let spec = JobSpec::from_toml(r#"
//!     kind = "batch"
//!     reward = 10
//!     [workload]
//!     runtime = "wasm"
//!     module = "hello.wasm"
//! "#).unwrap();
//! assert!(matching::evaluate(&spec, &testkit::profile()).is_ok());
//! ```
#![deny(clippy::unwrap_used)]

pub mod capability;
pub mod codec;
pub mod dht;
pub mod direct;
pub mod envelope;
pub mod hash;
pub mod identity;
pub mod job;
#[cfg(feature = "key-file")]
mod key_file;
pub mod ledger;
pub mod matching;
pub mod mesh;
pub mod messages;
pub mod node;
mod outbox;
pub mod relay;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
mod thread_memo;
pub mod time;

pub use outbox::{Topic, Transmit};
