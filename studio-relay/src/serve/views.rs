//! What the relay's HTTP API shows of its jobs and of itself.

use std::collections::{BTreeMap, BTreeSet};

use aimatrix_protocol::capability::CapabilityProfile;
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::matching;
use aimatrix_protocol::messages::OutputDigest;
use aimatrix_protocol::relay::{JobState, LeaseStatus, RelayCore, RelayJob};
use libp2p::{Multiaddr, PeerId};
use studio_relay::api::types::{JobView, NodeReasons, RelayStatusView};

/// Nodes listed with their reasons when nobody can serve a job.
const UNSERVABLE_LISTED_MAX: usize = 16;

/// The view of one job: its agreed outputs once completed, and why no known node can serve it
/// while it is open with no lease running.
pub(crate) fn job_view<'a>(
    job: &RelayJob,
    outputs: Option<&BTreeMap<u32, Vec<OutputDigest>>>,
    known_nodes: impl Iterator<Item = (&'a NodeId, &'a CapabilityProfile)>,
) -> JobView {
    let agreed: &[OutputDigest] = match (&job.state, outputs) {
        (JobState::Completed { .. }, Some(outputs)) if job.training.is_some() => {
            outputs.get(&super::training::TRAINING_OUTPUTS).map_or(&[], Vec::as_slice)
        }
        (JobState::Completed { result_hash }, Some(outputs)) => job
            .leases
            .values()
            .find(|l| l.status == LeaseStatus::Returned(*result_hash))
            .and_then(|l| outputs.get(&l.lease))
            .map_or(&[], Vec::as_slice),
        _ => &[],
    };
    JobView::new(job, agreed, unservable(job, known_nodes))
}

fn unservable<'a>(
    job: &RelayJob,
    known_nodes: impl Iterator<Item = (&'a NodeId, &'a CapabilityProfile)>,
) -> Vec<NodeReasons> {
    let running = job.leases.values().any(|l| l.status == LeaseStatus::Active);
    if job.state != JobState::Open || running {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut any = false;
    for (node, profile) in known_nodes {
        any = true;
        match matching::evaluate(&job.spec, profile) {
            Ok(_) => return Vec::new(),
            Err(reasons) if out.len() < UNSERVABLE_LISTED_MAX => out.push(NodeReasons {
                node: node.to_peer_id(),
                reasons: reasons.iter().map(ToString::to_string).collect(),
            }),
            Err(_) => {}
        }
    }
    if !any {
        out.push(NodeReasons {
            node: "-".to_owned(),
            reasons: vec!["no node has advertised its capabilities to this relay yet".to_owned()],
        });
    }
    out
}

pub(crate) fn status_view(
    core: &RelayCore,
    address: &Multiaddr,
    connected: &BTreeSet<PeerId>,
    ledger_refused: u64,
    ledger_expired: u64,
    halted: Option<String>,
    network: aimatrix_net::NetStats,
) -> RelayStatusView {
    let mut reject_counts: BTreeMap<String, u64> =
        core.reject_counts().iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    if ledger_refused > 0 {
        reject_counts.insert("ledger_refused".to_owned(), ledger_refused);
    }
    RelayStatusView {
        peer_id: core.id().to_peer_id(),
        listen_addrs: vec![address.to_string()],
        connected_peers: connected.iter().map(ToString::to_string).collect(),
        known_nodes: core.known_nodes().count(),
        jobs_open: core.jobs().filter(|j| j.state == JobState::Open).count(),
        reject_counts,
        ledger_expired,
        network,
        halted,
    }
}
