//! What a run reports: counters gathered while it runs and the summary built from them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::invariants::Violation;

/// Nearest-rank percentiles of a set of durations, in ms.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    /// From unsorted samples.
    pub fn of(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        let rank = |q: u64| {
            let n = samples.len() as u64;
            let i = (q * n).div_ceil(100).clamp(1, n) - 1;
            samples[i as usize]
        };
        if samples.is_empty() {
            return Self::default();
        }
        Self {
            count: samples.len() as u64,
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: *samples.last().unwrap_or(&0),
        }
    }

    /// From a histogram whose bucket `i` counts samples of `i` ms.
    pub fn of_histogram(buckets: &[u64]) -> Self {
        let count: u64 = buckets.iter().sum();
        if count == 0 {
            return Self::default();
        }
        let at_rank = |q: u64| {
            let target = (q * count).div_ceil(100).max(1);
            let mut seen = 0;
            for (ms, n) in buckets.iter().enumerate() {
                seen += n;
                if seen >= target {
                    return ms as u64;
                }
            }
            (buckets.len() - 1) as u64
        };
        let max = buckets.iter().rposition(|n| *n > 0).unwrap_or(0) as u64;
        Self { count, p50: at_rank(50), p90: at_rank(90), p99: at_rank(99), max }
    }
}

/// Jobs by how they ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JobCounts {
    /// Posted.
    pub posted: u64,
    /// Completed with a verified result.
    pub completed: u64,
    /// Failed (attempts exhausted, deadline passed); unpaid escrow refunded.
    pub failed: u64,
    /// Refused by the ledger (escrow not available); never offered.
    pub refused: u64,
    /// Still reserving or open when the run ended.
    pub pending: u64,
}

/// Traffic.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Traffic {
    /// Messages the cores emitted (one gossip publish counts once).
    pub sent: u64,
    /// Copies that reached a peer (a gossip publish reaches every subscriber).
    pub delivered: u64,
    /// Bytes of every delivered copy.
    pub delivered_bytes: u64,
    /// Copies the network lost.
    pub lost: u64,
    /// Copies the network duplicated.
    pub duplicated: u64,
    /// Copies addressed to a crashed node.
    pub to_down_nodes: u64,
    /// Copies dropped by a partition.
    pub partitioned: u64,
    /// Everything on the wire: point-to-point copies, gossip copies (flooded, forwarded,
    /// duplicates), gossip control (IHAVE, IWANT, GRAFT, PRUNE) and DHT requests and answers.
    pub wire_messages: u64,
    /// Bytes of everything on the wire.
    pub wire_bytes: u64,
    /// Wire messages per posted job.
    pub wire_messages_per_job: f64,
    /// Wire bytes per posted job.
    pub wire_bytes_per_job: f64,
    /// Messages sent per posted job.
    pub sent_per_job: f64,
    /// Delivered bytes per posted job.
    pub bytes_per_job: f64,
    /// Signatures made (one per message sent).
    pub signatures: u64,
    /// Envelopes verified (one per delivered copy).
    pub verifications: u64,
    /// ed25519 checks actually run: verifications of byte-identical envelopes share one
    /// (see `aimatrix_protocol::envelope::SignatureMemo`).
    pub signatures_checked: u64,
}

/// What the announcement and discovery overlays cost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OverlayStats {
    /// `gossipsub` or `direct`.
    pub mode: String,
    /// Messages published on a topic (offers and adverts).
    pub publishes: u64,
    /// Full copies of published messages sent by the gossip layer (flood publish, mesh
    /// forwarding, IWANT answers).
    pub gossip_copies: u64,
    /// Bytes of those copies, framing included.
    pub gossip_bytes: u64,
    /// Copies that reached a peer which had already seen the message (dropped by its
    /// message-id cache).
    pub gossip_duplicates: u64,
    /// IHAVE control messages.
    pub ihave: u64,
    /// Their bytes.
    pub ihave_bytes: u64,
    /// IWANT requests (each answered by a copy): a node the mesh did not reach.
    pub iwant: u64,
    /// GRAFT control messages (mesh repair after churn).
    pub graft: u64,
    /// PRUNE control messages.
    pub prune: u64,
    /// Mean mesh degree of the nodes up at the end.
    pub mesh_degree_mean: f64,
    /// Mean connections to other nodes of the nodes up at the end (their peer sets' choice;
    /// the mesh is drawn from them).
    pub node_links_mean: f64,
    /// Random walks the peer sets asked for (each a DHT lookup, counted in `kad_lookups`).
    pub walks: u64,
    /// Dials to other nodes.
    pub dials: u64,
    /// Connections a node opened to a relay other than its own (or a relay to a node), for a
    /// claim, a lease or a result.
    pub relay_dials: u64,
    /// DHT lookups (a node's advert put and its provider records).
    pub kad_lookups: u64,
    /// DHT requests (FIND_NODE, PUT_VALUE, ADD_PROVIDER), each with its answer.
    pub kad_requests: u64,
    /// Bytes of DHT requests and answers.
    pub kad_bytes: u64,
    /// Mean path length of a lookup: the round of `alpha` parallel requests whose answers
    /// first named the closest peer.
    pub kad_hops_mean: f64,
    /// Mean rounds of a lookup, until the `k` closest peers have all answered.
    pub kad_rounds_mean: f64,
}

/// Bytes of one gossip control message or DHT header without its ids or records.
pub const CONTROL_BYTES: u64 = 64;

impl OverlayStats {
    /// Wire messages the overlays added.
    pub fn wire_messages(&self) -> u64 {
        self.gossip_copies
            + self.ihave
            + self.iwant
            + self.graft
            + self.prune
            + 2 * self.kad_requests
    }

    /// Wire bytes the overlays added.
    pub fn wire_bytes(&self) -> u64 {
        self.gossip_bytes
            + self.ihave_bytes
            + self.kad_bytes
            + CONTROL_BYTES * (self.iwant + self.graft + self.prune)
    }
}

/// Forged and replayed envelopes sent by Byzantine nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Forgeries {
    /// Sent.
    pub sent: u64,
    /// Delivered to a running core.
    pub delivered: u64,
    /// Rejected by that core (the `forgeries_rejected` invariant wants all of them).
    pub rejected: u64,
}

/// One point of the time series, taken every simulated 10 s.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// Simulated seconds since the start.
    pub t_s: u64,
    /// Jobs posted and not ended (the queue).
    pub open_jobs: u64,
    /// Jobs posted so far.
    pub posted: u64,
    /// Jobs completed so far.
    pub completed: u64,
    /// Jobs failed so far.
    pub failed: u64,
    /// Nodes running.
    pub nodes_up: u32,
    /// Nodes cut off by a partition.
    pub nodes_cut: u32,
    /// Bytes on the wire so far.
    pub wire_bytes: u64,
}

/// The time series of a run, beside its summary.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// Samples every simulated 10 s, and one at the end.
    pub samples: Vec<Sample>,
    /// Offer arrivals by ms after publishing (the last bucket holds later ones).
    pub propagation_ms: Vec<u64>,
    /// Post-to-completion time of every completed job, ms.
    pub complete_ms: Vec<u64>,
}

/// Credits moved by the ledger.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Credits {
    /// Paid to nodes.
    pub paid_to_nodes: u64,
    /// Paid as relay fees.
    pub fees: u64,
    /// Released back to requesters.
    pub refunded: u64,
    /// Paid to nodes configured to lie.
    pub paid_to_byzantine: u64,
}

/// Lease and round activity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Activity {
    /// Leases granted.
    pub leases_granted: u64,
    /// Leases that expired.
    pub leases_expired: u64,
    /// Results received by relays.
    pub results: u64,
    /// Claims sent by nodes.
    pub claims: u64,
    /// Claims the relay denied.
    pub claims_denied: u64,
    /// Training rounds aggregated.
    pub rounds_aggregated: u64,
    /// Training rounds that closed without quorum.
    pub rounds_failed: u64,
    /// Node crashes.
    pub crashes: u64,
    /// Node restarts.
    pub restarts: u64,
}

/// The report of one run; the same seed and scenario give the same summary, byte for byte.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Nodes at start.
    pub nodes: u32,
    /// Relays.
    pub relays: u32,
    /// Simulated seconds.
    pub duration_s: u64,
    /// Events processed.
    pub steps: u64,
    /// Jobs.
    pub jobs: JobCounts,
    /// Post to first lease, ms.
    pub time_to_assign_ms: Percentiles,
    /// Post to completion, ms (completed jobs).
    pub time_to_complete_ms: Percentiles,
    /// Offer publish to arrival at a node, ms (every delivered copy).
    pub offer_propagation_ms: Percentiles,
    /// Traffic.
    pub messages: Traffic,
    /// Credits.
    pub credits: Credits,
    /// Activity.
    pub activity: Activity,
    /// Announcement and discovery overlays.
    pub overlay: OverlayStats,
    /// Forged and replayed envelopes.
    pub forgeries: Forgeries,
    /// Partitions started.
    pub partitions: u64,
    /// Messages the cores rejected, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Whether every invariant held.
    pub invariants_ok: bool,
    /// The first violation, if any.
    pub violation: Option<Violation>,
}

impl Summary {
    /// Human-readable text, one fact per line.
    pub fn to_text(&self) -> String {
        let p = |x: &Percentiles| {
            format!(
                "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms (n = {})",
                x.p50, x.p90, x.p99, x.max, x.count
            )
        };
        let j = &self.jobs;
        let m = &self.messages;
        let c = &self.credits;
        let a = &self.activity;
        let mut out = format!(
            "scenario {} seed {}: {} nodes, {} relay(s), {} s simulated, {} steps\n",
            self.scenario, self.seed, self.nodes, self.relays, self.duration_s, self.steps
        );
        out += &format!(
            "jobs: {} posted, {} completed, {} failed, {} refused, {} pending\n",
            j.posted, j.completed, j.failed, j.refused, j.pending
        );
        out += &format!("time to assign:   {}\n", p(&self.time_to_assign_ms));
        out += &format!("time to complete: {}\n", p(&self.time_to_complete_ms));
        out += &format!("offer propagation: {}\n", p(&self.offer_propagation_ms));
        out += &format!(
            "messages: {} sent ({:.1} per job), {} delivered, {} bytes delivered ({:.0} per job), {} lost, {} duplicated, {} to crashed nodes\n",
            m.sent, m.sent_per_job, m.delivered, m.delivered_bytes, m.bytes_per_job, m.lost, m.duplicated, m.to_down_nodes
        );
        let o = &self.overlay;
        out += &format!(
            "wire: {} messages ({:.1} per job), {} bytes ({:.0} per job), {} dropped by partitions\n",
            m.wire_messages, m.wire_messages_per_job, m.wire_bytes, m.wire_bytes_per_job, m.partitioned
        );
        out += &format!(
            "overlay {}: {} publishes, {} gossip copies ({} bytes, {} duplicates), {} IHAVE ({} bytes), {} IWANT, {} GRAFT, {} PRUNE, mesh degree {:.2}\n",
            o.mode, o.publishes, o.gossip_copies, o.gossip_bytes, o.gossip_duplicates, o.ihave, o.ihave_bytes, o.iwant, o.graft, o.prune, o.mesh_degree_mean
        );
        out += &format!(
            "connections: {:.2} node peers per node, {} walks, {} dials to nodes, {} dials between nodes and relays not their own\n",
            o.node_links_mean, o.walks, o.dials, o.relay_dials
        );
        out += &format!(
            "dht: {} lookups ({:.2} hops, {:.2} rounds of requests on average), {} requests, {} bytes\n",
            o.kad_lookups, o.kad_hops_mean, o.kad_rounds_mean, o.kad_requests, o.kad_bytes
        );
        if self.forgeries.sent > 0 || self.partitions > 0 {
            let f = &self.forgeries;
            out += &format!(
                "faults: {} partitions; forgeries: {} sent, {} delivered, {} rejected\n",
                self.partitions, f.sent, f.delivered, f.rejected
            );
        }
        out += &format!(
            "crypto: {} signatures, {} verifications ({} signature checks after memoisation)\n",
            m.signatures, m.verifications, m.signatures_checked
        );
        out += &format!(
            "credits: {} paid to nodes ({} to byzantine nodes), {} fees, {} refunded\n",
            c.paid_to_nodes, c.paid_to_byzantine, c.fees, c.refunded
        );
        out += &format!(
            "leases: {} granted, {} expired, {} results; claims: {} sent, {} denied; rounds: {} aggregated, {} failed; churn: {} crashes, {} restarts\n",
            a.leases_granted, a.leases_expired, a.results, a.claims, a.claims_denied, a.rounds_aggregated, a.rounds_failed, a.crashes, a.restarts
        );
        if !self.rejected.is_empty() {
            let r: Vec<String> = self.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out += &format!("rejected: {}\n", r.join(", "));
        }
        match &self.violation {
            None => out += "invariants: ok\n",
            Some(v) => out += &format!("invariants: FAILED: {v}\n"),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let p = Percentiles::of((1..=100).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.max, p.count), (50, 90, 99, 100, 100));
        let mut h = vec![0u64; 10];
        h[2] = 5;
        h[7] = 5;
        let q = Percentiles::of_histogram(&h);
        assert_eq!((q.p50, q.p90, q.max, q.count), (2, 7, 7, 10));
        assert_eq!(Percentiles::of(Vec::new()), Percentiles::default());
    }
}
