//! The aimatrix simulator: the network at scale, in one process, reproducibly.
//!
//! This library will hold a deterministic discrete-event simulation that runs thousands of nodes
//! and a relay by driving the same sans-IO cores (`NodeCore`, `RelayCore` from
//! `aimatrix-protocol`) that the real binaries ship. Time, message delivery, loss, latency and
//! failures come from a seeded scheduler, so a failing run prints the seed that replays it
//! exactly, and what the simulation shows about 10,000 nodes holds for the code that ships.
//!
//! The `aimatrix-sim` binary in this package is the command line over this library. Nothing of
//! the above exists yet; see `docs/architecture.md` for how the pieces fit.
