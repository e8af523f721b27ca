//! One module per subcommand.

pub(crate) mod compute;
pub(crate) mod detect;
pub(crate) mod devnet;
pub(crate) mod earnings;
pub(crate) mod exec;
pub(crate) mod status;
pub(crate) mod workloads;

/// Milliseconds since the Unix epoch, as the node's clock reads it.
pub(crate) fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `at_ms` relative to `now_ms`, for people: `in 4m 10s`, `2h 5m ago`.
fn relative(at_ms: u64, now_ms: u64) -> String {
    let (span_ms, future) =
        if at_ms >= now_ms { (at_ms - now_ms, true) } else { (now_ms - at_ms, false) };
    let s = span_ms / 1000;
    let span = match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    };
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::relative;

    #[test]
    fn relative_times_read_naturally() {
        assert_eq!(relative(250_000, 0), "in 4m 10s");
        assert_eq!(relative(0, 7_500_000), "2h 5m ago");
        assert_eq!(relative(5_000, 5_000), "in 0s");
        assert_eq!(relative(90_000_000, 0), "in 1d 1h");
    }
}
