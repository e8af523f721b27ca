//! The aimatrix simulator: the network at scale, in one process, reproducibly.
//!
//! A deterministic discrete-event simulation that drives the same sans-IO cores the real
//! binaries ship ([`aimatrix_protocol::node::NodeCore`], [`aimatrix_protocol::relay::RelayCore`])
//! over a simulated network. One clock, one event queue (ties broken by scheduling order) and
//! one seeded ChaCha RNG decide everything, so a seed and a [`Scenario`] replay a run exactly.
//! Execution is simulated (duration and success by hardware class and node behaviour), the
//! relays' ledger instructions are applied to the ledger state machine the Studio relay ships
//! ([`aimatrix_protocol::ledger::LedgerState`]), and
//! invariants ([`invariants`]) are checked after every step. Announcements travel over a
//! modelled gossipsub mesh and adverts are stored in a modelled Kademlia DHT (or, for
//! comparison, go straight to every subscriber: [`scenario::GossipMode`]); links have latency,
//! uplink bandwidth, loss, duplication and partitions; Byzantine nodes lie, withhold and forge.
//!
//! ```
//! use aimatrix_sim::{Scenario, Sim};
//!
//! let scenario = Scenario { nodes: 20, duration_s: 120, ..Scenario::default() };
//! let summary = Sim::new(scenario).run();
//! assert!(summary.invariants_ok, "{}", summary.to_text());
//! ```

pub mod invariants;
mod queue;
pub mod scenario;
pub mod stats;
pub mod training;
mod world;

pub use scenario::Scenario;
pub use stats::Summary;
pub use world::Sim;
