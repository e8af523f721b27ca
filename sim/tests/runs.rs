//! Whole runs: determinism, invariants, and Byzantine nodes that must not be paid.

#![allow(clippy::unwrap_used)]

use aimatrix_sim::scenario::{Faults, GossipMode, JobClass, Partition};
use aimatrix_sim::{Scenario, Sim};

fn small(nodes: u32, duration_s: u64, seed: u64) -> Scenario {
    Scenario { nodes, duration_s, seed, ..Scenario::default() }
}

/// A shipped scenario, shrunk to `nodes` and `duration_s` (its faults keep their rates).
fn shipped(name: &str, nodes: u32, duration_s: u64) -> Scenario {
    let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let sc = Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    Scenario { nodes, duration_s, ..sc }
}

#[test]
fn a_few_hundred_nodes_replay_byte_for_byte_and_keep_the_invariants() {
    let a = Sim::new(small(300, 120, 42)).run();
    let b = Sim::new(small(300, 120, 42)).run();
    assert!(a.invariants_ok, "{}", a.to_text());
    assert!(a.jobs.posted > 10, "the run did work: {}", a.to_text());
    assert!(a.jobs.completed > 0, "{}", a.to_text());
    assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    assert_eq!(a.to_text(), b.to_text());
    let c = Sim::new(small(300, 120, 43)).run();
    assert_ne!(a.to_text(), c.to_text(), "another seed gives another run");
}

#[test]
fn byzantine_nodes_under_replication_two_are_never_paid() {
    let base = Scenario::default();
    let training = JobClass {
        name: "training".into(),
        weight: 1,
        kind: "training".into(),
        reward: 5,
        duration_s: 20,
        deadline_s: 1_800,
        participants: 4,
        rounds: 2,
        quorum: 2,
        round_deadline_s: 120,
        ..base.workload.classes[1].clone()
    };
    let mut replicated = base.workload.classes[1].clone();
    replicated.weight = 3;
    let mut sc = Scenario {
        nodes: 40,
        duration_s: 900,
        seed: 7,
        faults: Faults { byzantine_share: 0.3, ..Faults::default() },
        ..base
    };
    sc.workload.classes = vec![replicated, training];
    sc.workload.arrivals_per_s = 0.1;
    let s = Sim::new(sc).run();
    assert!(s.invariants_ok, "{}", s.to_text());
    assert!(s.jobs.completed > 10, "{}", s.to_text());
    assert!(s.activity.rounds_aggregated > 0, "training ran: {}", s.to_text());
    assert!(s.credits.paid_to_nodes > 0);
    assert_eq!(s.credits.paid_to_byzantine, 0, "{}", s.to_text());
}

#[test]
fn churn_loses_no_job() {
    let mut sc = small(60, 600, 3);
    sc.faults = Faults {
        crashes_per_node_hour: 4.0,
        restart_after_s: 60,
        withholding_share: 0.05,
        ..Faults::default()
    };
    let s = Sim::new(sc).run();
    assert!(s.invariants_ok, "{}", s.to_text());
    assert!(s.activity.crashes > 0 && s.activity.restarts > 0, "{}", s.to_text());
    assert!(s.activity.leases_expired > 0, "{}", s.to_text());
}

#[test]
fn shipped_scenarios_parse() {
    for name in ["baseline", "byzantine", "churn", "gpu-scarce", "partition"] {
        let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    assert_eq!(Scenario::from_toml("").unwrap(), Scenario::default());
    let err = Scenario::from_toml("[workload]\narrivals_per_s = \"lots\"").unwrap_err();
    assert!(err.contains("workload.arrivals_per_s"), "{err}");
}

#[test]
fn the_gossipsub_overlay_replays_byte_for_byte_with_every_fault() {
    let mut sc = small(150, 900, 11);
    assert_eq!(sc.network.gossip, GossipMode::Gossipsub, "gossipsub is the default");
    sc.faults = Faults {
        byzantine_share: 0.1,
        forgeries_per_byzantine_hour: 30.0,
        crashes_per_node_hour: 2.0,
        restart_after_s: 60,
        partitions: vec![Partition { at_s: 200, duration_s: 120, share: 0.3 }],
        random_partitions_per_hour: 4.0,
        random_partition_s: 30,
        random_partition_share: 0.1,
        ..Faults::default()
    };
    sc.workload.classes[0].replication = 2;
    let a = Sim::new(sc.clone()).run();
    let b = Sim::new(sc).run();
    assert!(a.invariants_ok, "{}", a.to_text());
    assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
    assert!(a.partitions >= 1 && a.messages.partitioned > 0, "{}", a.to_text());
    assert!(a.overlay.graft > 0, "churn repairs the mesh: {}", a.to_text());
}

#[test]
fn the_mesh_reaches_every_node_and_costs_more_than_direct_fan_out() {
    let gossip = Sim::new(small(200, 300, 5)).run();
    let mut sc = small(200, 300, 5);
    sc.network.gossip = GossipMode::Direct;
    let direct = Sim::new(sc).run();
    assert!(gossip.invariants_ok && direct.invariants_ok, "{}", gossip.to_text());
    let o = &gossip.overlay;
    assert!((6.0..=16.0).contains(&o.mesh_degree_mean), "{}", gossip.to_text());
    // The mesh is drawn from the connections each node's peer set keeps: its target of 12,
    // and up to twice that when others dial it.
    assert!((12.0..=24.0).contains(&o.node_links_mean), "{}", gossip.to_text());
    assert!(o.walks >= 200 && o.dials >= 200 * 12 / 2, "{}", gossip.to_text());
    // Every offer reaches (nearly) every node started by then (nodes start over the first
    // minute; the 0.1% of copies lost is repaired by the mesh).
    let per_offer = gossip.offer_propagation_ms.count as f64 / 200.0;
    assert!(per_offer >= gossip.jobs.posted as f64 * 0.9, "{}", gossip.to_text());
    assert!(o.gossip_duplicates > 0 && o.ihave > 0 && o.kad_requests > 0, "{}", gossip.to_text());
    assert!(gossip.messages.wire_bytes > direct.messages.wire_bytes, "{}", direct.to_text());
    assert_eq!(direct.overlay.gossip_copies, 0, "{}", direct.to_text());
    // Without flood publishing, on a lossy network, lazy gossip fetches what the mesh lost.
    let mut sc = small(200, 300, 5);
    sc.network.loss = 0.4;
    sc.network.gossipsub.flood_publish = false;
    // A thin mesh (d = 3) misses a node with every copy lost about 6% of the time.
    (sc.network.gossipsub.d, sc.network.gossipsub.d_lo, sc.network.gossipsub.d_hi) = (3, 2, 4);
    let lossy = Sim::new(sc).run();
    assert!(lossy.invariants_ok, "{}", lossy.to_text());
    assert!(lossy.overlay.iwant > 0, "{}", lossy.to_text());
    assert!(lossy.offer_propagation_ms.p50 > gossip.offer_propagation_ms.p50, "multi-hop");
}

#[test]
fn peered_relays_share_every_node_though_each_node_was_given_one() {
    // Busy enough that a relay's own nodes (a third each) cannot take all its jobs: it names
    // nodes given other relays once its own are busy.
    let mut sc = small(30, 600, 9);
    sc.relays = 3;
    sc.workload.arrivals_per_s = 0.7;
    let s = Sim::new(sc.clone()).run();
    assert!(s.invariants_ok, "{}", s.to_text());
    assert!(s.jobs.completed > 200, "{}", s.to_text());
    // Every relay's offers reach (nearly) every node: a third through their own relay, the
    // rest one relay hop on and through the mesh, trusted through their relay's roster.
    let per_offer = s.offer_propagation_ms.count as f64 / 30.0;
    assert!(per_offer >= s.jobs.posted as f64 * 0.9, "{}", s.to_text());
    // Nodes claimed from relays they were not given: they connected to them to do it.
    assert!(s.overlay.relay_dials > 5, "{}", s.to_text());
    assert!((12.0..=24.0).contains(&s.overlay.node_links_mean), "{}", s.to_text());
    // A node pinned to nothing but its own relay would refuse the others' offers; these trust
    // them through the roster, so few are refused (only before the first roster arrives).
    let untrusted = s.rejected.get("node/untrusted_relay").copied().unwrap_or(0);
    assert!(untrusted < s.offer_propagation_ms.count / 10, "{}", s.to_text());
    let again = Sim::new(sc).run();
    assert_eq!(serde_json::to_string(&s).unwrap(), serde_json::to_string(&again).unwrap());
}

#[test]
fn forged_and_replayed_envelopes_are_all_rejected() {
    let mut sc = shipped("byzantine", 80, 900);
    sc.faults.forgeries_per_byzantine_hour = 60.0;
    let s = Sim::new(sc).run();
    assert!(s.invariants_ok, "{}", s.to_text());
    let f = &s.forgeries;
    assert!(f.delivered > 10, "{}", s.to_text());
    assert_eq!(f.rejected, f.delivered, "{}", s.to_text());
    assert!(s.rejected.contains_key("node/bad_signature"), "{}", s.to_text());
}

#[test]
fn the_churn_and_partition_scenarios_lose_no_job() {
    for name in ["churn", "partition"] {
        let mut sc = shipped(name, 150, 1_500);
        sc.faults.partitions.iter_mut().for_each(|p| p.at_s = p.at_s.min(400));
        let s = Sim::new(sc).run();
        // no_job_lost is checked every simulated minute and at the end.
        assert!(s.invariants_ok, "{name}: {}", s.to_text());
        assert!(s.jobs.completed > 50, "{name}: {}", s.to_text());
        let ended = s.jobs.completed + s.jobs.failed + s.jobs.refused + s.jobs.pending;
        assert_eq!(ended, s.jobs.posted, "{name}: {}", s.to_text());
    }
    let partition = Sim::new(shipped("partition", 150, 1_500)).run();
    assert!(partition.partitions >= 1, "{}", partition.to_text());
}
