//! What the control API answers: plain serde views of the node's state, shared by the server
//! (built from the `NodeCore`) and the client subcommands (parsed from JSON).

use std::collections::BTreeMap;

use aimatrix_net::NetStats;
use aimatrix_protocol::capability::CapabilityProfile;
use aimatrix_protocol::job::{JobKind, Runtime};
use aimatrix_protocol::matching;
use aimatrix_protocol::node::{AcceptMode, HeldLease, KnownOffer, NodeCore, NodeEvent};
use aimatrix_protocol::time::Millis;
use serde::{Deserialize, Serialize};

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatusView {
    /// This node's PeerId.
    pub(crate) peer_id: String,
    /// Addresses the swarm listens on.
    pub(crate) listen_addrs: Vec<String>,
    /// PeerIds of the peers connected now.
    pub(crate) connected_peers: Vec<String>,
    /// The relays the node works for: those it was given, then those their rosters vouch for.
    pub(crate) relays: Vec<RelayView>,
    /// Whether the node claims offers by itself.
    pub(crate) accept_mode: AcceptMode,
    /// The node is shutting down and claims nothing new.
    pub(crate) draining: bool,
    /// Leases running now.
    pub(crate) running: Vec<RunningView>,
    /// Credits earned, summed from every receipt kept (across restarts).
    pub(crate) earned: u64,
    /// Runs recorded in the job history.
    pub(crate) jobs_run: u64,
    /// Claims the node sent since it started: by itself in auto mode, on `compute accept` in
    /// manual mode. The core decides whether to claim an offer in the same step that records
    /// it, so once an offer is listed this count includes any claim made for it.
    pub(crate) claims_sent: u64,
    /// Messages not acted on, by reason.
    pub(crate) reject_counts: BTreeMap<String, u64>,
    /// The node's place in the network: reachability (AutoNAT), peers connected (relays and
    /// nodes apart), the DHT (mode, what it holds, what it refused).
    pub(crate) network: NetStats,
}

/// A relay the node works for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RelayView {
    /// Its PeerId.
    pub(crate) peer_id: String,
    /// The address the node dials it at.
    pub(crate) address: String,
    /// Whether a connection to it is open now (the node connects to a vouched relay only when
    /// it claims one of its offers).
    pub(crate) connected: bool,
    /// The given relay whose roster vouches for it; absent for a relay the node was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) vouched_by: Option<String>,
}

/// One lease running on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RunningView {
    /// The job, 32 hex digits.
    pub(crate) job_id: String,
    /// The lease within the job.
    pub(crate) lease: u32,
    /// The job's name.
    pub(crate) name: String,
    /// The job's kind.
    pub(crate) kind: JobKind,
    /// Last progress reported, 0..=100.
    pub(crate) percent: u8,
    /// When the lease arrived, ms since the Unix epoch.
    pub(crate) started_ms: Millis,
    /// The result must reach the relay before this.
    pub(crate) deadline_ms: Millis,
}

impl RunningView {
    /// The view of a lease the core holds.
    pub(crate) fn from_held(held: &HeldLease) -> Self {
        Self {
            job_id: held.lease.job_id.to_string(),
            lease: held.lease.lease,
            name: held.lease.spec.name.clone(),
            kind: held.lease.spec.kind,
            percent: held.progress,
            started_ms: held.started_at_ms,
            deadline_ms: held.lease.deadline_ms,
        }
    }
}

/// What the driver counts from the core's events as it drains them, for
/// [`StatusView::from_core`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct EventTally {
    /// [`NodeEvent::Claimed`] events: claims sent.
    pub(crate) claims_sent: u64,
}

impl EventTally {
    /// Counts `event`; the driver calls this for every event it takes from the core.
    pub(crate) fn record(&mut self, event: &NodeEvent) {
        if matches!(event, NodeEvent::Claimed { .. }) {
            self.claims_sent += 1;
        }
    }
}

/// What the swarm knows, for [`StatusView::from_core`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NetView {
    /// Addresses the swarm listens on.
    pub(crate) listen_addrs: Vec<String>,
    /// PeerIds of the peers connected now.
    pub(crate) connected_peers: Vec<String>,
    /// The relays.
    pub(crate) relays: Vec<RelayView>,
    /// Reachability, peers by kind, the DHT.
    pub(crate) network: NetStats,
}

impl StatusView {
    /// The status of `core` with the swarm's view `net`, the accept mode the core was built
    /// with, what the driver counted from its events (`tally`), and `earned` and `jobs_run`
    /// from the node's history files.
    pub(crate) fn from_core(
        core: &NodeCore,
        accept_mode: AcceptMode,
        net: NetView,
        tally: EventTally,
        earned: u64,
        jobs_run: u64,
    ) -> Self {
        Self {
            peer_id: core.id().to_peer_id(),
            listen_addrs: net.listen_addrs,
            connected_peers: net.connected_peers,
            relays: net.relays,
            network: net.network,
            accept_mode,
            draining: core.is_draining(),
            running: core.leases().map(RunningView::from_held).collect(),
            earned,
            jobs_run,
            claims_sent: tally.claims_sent,
            reject_counts: core
                .reject_counts()
                .iter()
                .map(|(label, n)| ((*label).to_owned(), *n))
                .collect(),
        }
    }
}

/// `GET /v1/offers`: one open offer and whether this node can take it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OfferView {
    /// The job, 32 hex digits.
    pub(crate) job_id: String,
    /// The job's name.
    pub(crate) name: String,
    /// The job's kind.
    pub(crate) kind: JobKind,
    /// Credits per accepted replica.
    pub(crate) reward: u64,
    /// Distinct nodes that must run it.
    pub(crate) replication: u32,
    /// What a node must have.
    pub(crate) requirements: RequirementsView,
    /// The job must be done by then, ms since the Unix epoch.
    pub(crate) deadline_ms: Millis,
    /// Leases the relay would grant now.
    pub(crate) open_slots: u32,
    /// This node claimed it and awaits the relay's answer.
    pub(crate) claimed: bool,
    /// `compute accept` would claim it now.
    pub(crate) can_serve: bool,
    /// Why this node cannot take it (empty when it can).
    pub(crate) reasons: Vec<String>,
}

/// A job's requirements, summarized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RequirementsView {
    /// Physical CPU cores.
    pub(crate) cpu_cores: u32,
    /// Memory, MiB.
    pub(crate) memory_mb: u64,
    /// GPUs.
    pub(crate) gpus: u32,
    /// VRAM per GPU, GiB.
    pub(crate) vram_gb: u32,
    /// The sandbox.
    pub(crate) runtime: Runtime,
}

impl OfferView {
    /// The view of an offer the core knows, matched against the node's `profile` as it is now
    /// (the offer's stored verdict is from when it was heard, and load changes); `running`
    /// says whether the node holds a lease on the job.
    pub(crate) fn from_known(
        known: &KnownOffer,
        profile: &CapabilityProfile,
        running: bool,
    ) -> Self {
        let spec = &known.offer.spec;
        let mut reasons = Vec::new();
        if running {
            reasons.push("running on this node".to_owned());
        } else if known.claimed_at_ms.is_some() {
            reasons.push("claimed; waiting for the relay's lease or denial".to_owned());
        }
        if let Some(refused) = &known.refused {
            reasons.push(format!("the relay refused this node: {refused}"));
        }
        if known.offer.open_slots == 0 {
            reasons.push("no open slot now (every replica is leased)".to_owned());
        }
        if let Err(mismatches) = matching::evaluate(spec, profile) {
            reasons.extend(mismatches.iter().map(ToString::to_string));
        }
        let r = &spec.requirements;
        Self {
            job_id: known.offer.job_id.to_string(),
            name: spec.name.clone(),
            kind: spec.kind,
            reward: spec.reward,
            replication: spec.replication,
            requirements: RequirementsView {
                cpu_cores: r.cpu_cores,
                memory_mb: r.memory_mb,
                gpus: r.gpus,
                vram_gb: r.vram_gb,
                runtime: spec.workload.runtime,
            },
            deadline_ms: known.offer.deadline_ms,
            open_slots: known.offer.open_slots,
            claimed: known.claimed_at_ms.is_some(),
            can_serve: reasons.is_empty(),
            reasons,
        }
    }

    /// The offers `core` knows: those it can take now, or with `all` every one, best first
    /// (takeable, then highest reward, then job id).
    pub(crate) fn list(core: &NodeCore, all: bool) -> Vec<Self> {
        let profile = core.profile();
        let mut out: Vec<Self> = core
            .offers()
            .map(|known| {
                let job_id = known.offer.job_id;
                let running = core.leases().any(|held| held.lease.job_id == job_id);
                Self::from_known(known, &profile, running)
            })
            .filter(|view| all || view.can_serve)
            .collect();
        out.sort_by(|a, b| {
            b.can_serve
                .cmp(&a.can_serve)
                .then(b.reward.cmp(&a.reward))
                .then_with(|| a.job_id.cmp(&b.job_id))
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aimatrix_protocol::identity::Keypair;
    use aimatrix_protocol::messages::{seal, JobId, Lease, Message, Offer};
    use aimatrix_protocol::node::NodeConfig;
    use aimatrix_protocol::testkit;

    const NOW: Millis = 1_000_000;

    fn manual_core(max_memory_mb: u64) -> (NodeCore, Keypair) {
        core_in(AcceptMode::Manual, max_memory_mb)
    }

    fn core_in(accept: AcceptMode, max_memory_mb: u64) -> (NodeCore, Keypair) {
        let relay = testkit::keypair(100);
        let cfg =
            NodeConfig { accept, trusted_relays: vec![relay.public()], ..NodeConfig::default() };
        let mut profile = testkit::profile();
        profile.policy.max_memory_mb = max_memory_mb;
        (NodeCore::new(testkit::keypair(1), cfg, profile, 7), relay)
    }

    fn offer(core: &mut NodeCore, relay: &Keypair, job: u8, reward: u64, memory_mb: u64) {
        let mut spec = testkit::batch_spec(reward);
        spec.name = format!("job {job}");
        spec.requirements.memory_mb = memory_mb;
        let msg = Message::Offer(Offer {
            job_id: JobId([job; 16]),
            spec,
            deadline_ms: NOW + 60_000,
            open_slots: 1,
            preferred: Vec::new(),
        });
        let bytes = seal(relay, &msg, u64::from(job), NOW, 60_000).unwrap();
        core.handle_message(NOW, None, &bytes);
    }

    #[test]
    fn offers_list_what_can_be_served_and_why_not() {
        let (mut core, relay) = manual_core(1024);
        offer(&mut core, &relay, 1, 5, 128);
        offer(&mut core, &relay, 2, 50, 4096);
        offer(&mut core, &relay, 3, 9, 256);

        let servable = OfferView::list(&core, false);
        let ids: Vec<&str> = servable.iter().map(|o| o.job_id.as_str()).collect();
        assert_eq!(ids, ["03".repeat(16), "01".repeat(16)], "highest reward first");
        assert!(servable.iter().all(|o| o.can_serve && o.reasons.is_empty()));
        assert_eq!(servable[0].name, "job 3");
        assert_eq!(servable[0].requirements.memory_mb, 256);
        assert_eq!(servable[0].requirements.runtime, Runtime::Wasm);
        assert_eq!(servable[0].deadline_ms, NOW + 60_000);

        let all = OfferView::list(&core, true);
        assert_eq!(all.len(), 3);
        let big = all.last().unwrap();
        assert_eq!(big.job_id, "02".repeat(16));
        assert!(!big.can_serve);
        assert_eq!(big.reasons, ["needs 4096 MiB memory, policy allows 1024 MiB per job"]);
    }

    #[test]
    fn a_claimed_offer_says_so_and_busy_slots_show_as_a_reason() {
        let (mut core, relay) = manual_core(u64::MAX);
        offer(&mut core, &relay, 1, 5, 128);
        offer(&mut core, &relay, 2, 6, 128);
        core.accept(NOW, JobId([1; 16])).unwrap();

        let all = OfferView::list(&core, true);
        let claimed = all.iter().find(|o| o.job_id == "01".repeat(16)).unwrap();
        assert!(claimed.claimed && !claimed.can_serve);
        assert!(claimed.reasons[0].starts_with("claimed"), "{:?}", claimed.reasons);
        // One slot, taken by the claim: the other offer is not takeable now, and says why.
        let other = all.iter().find(|o| o.job_id == "02".repeat(16)).unwrap();
        assert!(!other.can_serve);
        assert_eq!(other.reasons, ["node busy: 1 of 1 job slots in use"]);
        assert!(OfferView::list(&core, false).is_empty());
    }

    #[test]
    fn status_shows_running_leases_and_rejects() {
        let (mut core, relay) = manual_core(u64::MAX);
        offer(&mut core, &relay, 1, 5, 128);
        core.accept(NOW, JobId([1; 16])).unwrap();
        let spec = core.offers().next().unwrap().offer.spec.clone();
        let lease = Message::Lease(Lease {
            job_id: JobId([1; 16]),
            lease: 4,
            node: core.id(),
            deadline_ms: NOW + 30_000,
            spec,
            round: None,
        });
        let bytes = seal(&relay, &lease, 99, NOW + 5, 60_000).unwrap();
        core.handle_message(NOW + 5, Some(relay.public()), &bytes);
        core.progress(NOW + 6, JobId([1; 16]), 4, 40).unwrap();
        core.handle_message(NOW + 7, None, b"garbage");

        let net = NetView {
            listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            connected_peers: vec![relay.public().to_peer_id()],
            relays: vec![RelayView {
                peer_id: relay.public().to_peer_id(),
                address: "/ip4/127.0.0.1/tcp/4000".into(),
                connected: true,
                vouched_by: None,
            }],
            network: NetStats {
                dht: aimatrix_net::DhtStats {
                    records: 2,
                    refused: [("foreign_key_record".to_owned(), 5)].into(),
                    ..Default::default()
                },
                ..NetStats::default()
            },
        };
        let tally = EventTally { claims_sent: 1 };
        let status = StatusView::from_core(&core, AcceptMode::Manual, net, tally, 77, 3);
        assert_eq!(status.peer_id, testkit::keypair(1).public().to_peer_id());
        assert_eq!(status.running.len(), 1);
        let running = &status.running[0];
        assert_eq!((running.lease, running.percent), (4, 40));
        assert_eq!((running.started_ms, running.deadline_ms), (NOW + 5, NOW + 30_000));
        assert_eq!(running.name, "job 1");
        assert_eq!((status.earned, status.jobs_run, status.claims_sent), (77, 3, 1));
        assert_eq!(status.reject_counts.get("undecodable"), Some(&1));
        assert!(!status.draining);

        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["accept_mode"], "manual");
        assert_eq!(json["running"][0]["job_id"], "01".repeat(16));
        assert_eq!(json["running"][0]["kind"], "batch");
        assert_eq!(json["claims_sent"], 1);
        assert_eq!(json["network"]["dht"]["mode"], "client");
        assert_eq!(json["network"]["dht"]["refused"]["foreign_key_record"], 5);
        assert_eq!(json["network"]["nat"], "unknown");
        let back: StatusView = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
    }

    /// Drains the core's events into `tally`, as the driver does after every input.
    fn drain(core: &mut NodeCore, tally: &mut EventTally) {
        while let Some(event) = core.poll_event() {
            tally.record(&event);
        }
    }

    /// What the network tests rely on: an offer the node lists has been decided on, and the
    /// claim count says whether the node claimed it.
    #[test]
    fn claims_sent_counts_claims_made_when_an_offer_is_heard_or_accepted() {
        let (mut manual, relay) = manual_core(u64::MAX);
        let mut tally = EventTally::default();
        offer(&mut manual, &relay, 1, 5, 128);
        drain(&mut manual, &mut tally);
        let listed = OfferView::list(&manual, true);
        assert!(listed[0].can_serve && !listed[0].claimed, "{listed:?}");
        assert_eq!(tally.claims_sent, 0, "a manual node claims nothing by itself");
        manual.handle_timeout(NOW + 1);
        offer(&mut manual, &relay, 2, 9, 128);
        drain(&mut manual, &mut tally);
        assert_eq!(tally.claims_sent, 0, "nor on a later input");

        manual.accept(NOW + 2, JobId([1; 16])).unwrap();
        drain(&mut manual, &mut tally);
        assert_eq!(tally.claims_sent, 1);
        assert!(OfferView::list(&manual, true).iter().any(|o| o.claimed));

        // An auto node claims in the same step that records the offer: by the time the offer
        // can be listed, the claim is counted.
        let (mut auto, relay) = core_in(AcceptMode::Auto, u64::MAX);
        let mut tally = EventTally::default();
        offer(&mut auto, &relay, 1, 5, 128);
        drain(&mut auto, &mut tally);
        assert_eq!(tally.claims_sent, 1);
        assert!(OfferView::list(&auto, true)[0].claimed);
    }
}
