//! Reading what the real processes logged: the relay's post, lease and completion lines and the
//! nodes' offer, claim and run lines, each with its `tracing` timestamp (µs, the shared system
//! clock of one machine).
//!
//! The lines come from `studio-relay serve` at `info` and from the node's join driver at
//! `debug` (`aimatrix_node::join::driver`): `offer <job>: can serve` is logged when the node's
//! core takes an offer announcement, `claimed job <job>` when it sends a claim, `running job
//! <job> lease <n>` when a lease arrives.

use std::collections::HashMap;
use std::path::Path;

/// Microseconds since the Unix epoch.
pub(crate) type Micros = i64;

/// What the relay logged, by job id (32 hex digits).
#[derive(Debug, Default)]
pub(crate) struct RelayLog {
    /// `job <id> posted by <account>`.
    pub(crate) posted: HashMap<String, Micros>,
    /// `job <id>: lease <n> to <peer>`: (lease, peer, when).
    pub(crate) leases: HashMap<String, Vec<(u32, String, Micros)>>,
    /// `job <id> completed with result <hash>`.
    pub(crate) completed: HashMap<String, Micros>,
}

/// What one node logged, by job id.
#[derive(Debug, Default)]
pub(crate) struct NodeLog {
    /// Every offer announcement its core took (the first one first).
    pub(crate) offers: HashMap<String, Vec<Micros>>,
    /// Every claim it sent.
    pub(crate) claims: HashMap<String, Vec<Micros>>,
    /// Claims the relay denied, when the node heard so.
    pub(crate) denials: Vec<Micros>,
    /// Leases that arrived: (job, lease) -> when.
    pub(crate) runs: HashMap<(String, u32), Micros>,
}

impl RelayLog {
    /// Parses a relay's stderr log.
    pub(crate) fn read(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let mut log = Self::default();
        for (at, message) in text.lines().filter_map(split_line) {
            let Some(rest) = message.strip_prefix("job ") else { continue };
            let Some((id, rest)) = job_id(rest) else { continue };
            if rest.starts_with(" posted by ") {
                log.posted.entry(id).or_insert(at);
            } else if let Some(rest) = rest.strip_prefix(": lease ") {
                let Some((lease, peer)) = rest.split_once(" to ") else { continue };
                let Ok(lease) = lease.parse() else { continue };
                log.leases.entry(id).or_default().push((lease, peer.trim().to_owned(), at));
            } else if rest.starts_with(" completed with result ") {
                log.completed.entry(id).or_insert(at);
            }
        }
        Ok(log)
    }
}

impl NodeLog {
    /// Parses a node's stderr log.
    pub(crate) fn read(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let mut log = Self::default();
        for (at, message) in text.lines().filter_map(split_line) {
            if let Some(rest) = message.strip_prefix("offer ") {
                if let Some((id, rest)) = job_id(rest) {
                    if rest.starts_with(": can serve") || rest.starts_with(": cannot serve") {
                        log.offers.entry(id).or_default().push(at);
                    }
                }
            } else if let Some(rest) = message.strip_prefix("claimed job ") {
                if let Some((id, _)) = job_id(rest) {
                    log.claims.entry(id).or_default().push(at);
                }
            } else if let Some(rest) = message.strip_prefix("claim for job ") {
                if job_id(rest).is_some_and(|(_, rest)| rest.starts_with(" denied")) {
                    log.denials.push(at);
                }
            } else if let Some(rest) = message.strip_prefix("running job ") {
                let Some((id, rest)) = job_id(rest) else { continue };
                let Some(rest) = rest.strip_prefix(" lease ") else { continue };
                let lease = rest.split(' ').next().and_then(|l| l.parse().ok());
                if let Some(lease) = lease {
                    log.runs.entry((id, lease)).or_insert(at);
                }
            }
        }
        Ok(log)
    }
}

/// A job id (32 hex digits) at the start of `s`, and what follows it.
fn job_id(s: &str) -> Option<(String, &str)> {
    let id = s.get(..32)?;
    id.bytes().all(|b| b.is_ascii_hexdigit()).then(|| (id.to_owned(), &s[32..]))
}

/// `2025-01-01T00:00:00.123456Z  INFO target: message` -> (µs since the epoch, message).
fn split_line(line: &str) -> Option<(Micros, &str)> {
    let (stamp, rest) = line.split_once(' ')?;
    let at = parse_rfc3339_utc(stamp)?;
    let (_, message) = rest.split_once(": ")?;
    Some((at, message))
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (what `tracing-subscriber` writes) into µs since
/// the Unix epoch.
fn parse_rfc3339_utc(s: &str) -> Option<Micros> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let digits: String = fraction.chars().take(6).collect();
    let mut micros: i64 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    for _ in digits.len()..6 {
        micros *= 10;
    }
    let days = days_from_civil(y, m, day);
    Some(((days * 86_400 + hh * 3_600 + mm * 60 + ss) * 1_000_000) + micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
