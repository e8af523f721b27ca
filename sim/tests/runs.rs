//! Whole runs: determinism, invariants, and Byzantine nodes that must not be paid.

#![allow(clippy::unwrap_used)]

use aimatrix_sim::scenario::{Faults, JobClass};
use aimatrix_sim::{Scenario, Sim};

fn small(nodes: u32, duration_s: u64, seed: u64) -> Scenario {
    Scenario { nodes, duration_s, seed, ..Scenario::default() }
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
    for name in ["baseline", "byzantine", "churn", "gpu-scarce"] {
        let path = format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        Scenario::from_toml(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    assert_eq!(Scenario::from_toml("").unwrap(), Scenario::default());
    let err = Scenario::from_toml("[workload]\narrivals_per_s = \"lots\"").unwrap_err();
    assert!(err.contains("workload.arrivals_per_s"), "{err}");
}
