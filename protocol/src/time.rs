//! Time as the protocol sees it: plain numbers handed in by the driver.
//!
//! The cores never read a clock; every `handle_*` call takes `now` in milliseconds since the
//! Unix epoch (the simulator starts its own epoch wherever it likes).

/// Milliseconds since the Unix epoch (or the simulator's epoch).
pub type Millis = u64;

/// Converts whole seconds to [`Millis`], saturating.
pub const fn secs(s: u64) -> Millis {
    s.saturating_mul(1000)
}
