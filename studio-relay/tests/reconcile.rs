//! What a crash leaves in flight is completed when the relay starts (docs/ledger.md, "One
//! order of effects"): the ledger instructions recorded in the job store's outbox are applied,
//! and every open reservation no live job explains is released at once, not an hour past a
//! deadline nobody can see. Set up by writing the ledger and the job store directly, as a
//! relay killed between its steps would have left them, then starting `studio-relay serve`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use aimatrix_protocol::identity::Keypair;
use aimatrix_protocol::ledger::{LedgerOp, TransferId};
use aimatrix_protocol::messages::JobId;
use aimatrix_protocol::relay::{RelayConfig, RelayCore};
use aimatrix_protocol::{codec, testkit};
use studio_relay::ledger::Ledger;
use studio_relay::store::{JobRecord, JobStore};

use common::Serve;

const FUNDS: u64 = 100;

fn reserve(job: JobId, amount: u64) -> LedgerOp {
    LedgerOp::Reserve {
        id: TransferId::reserve_of(job),
        job_id: job,
        requester: "studio".into(),
        amount,
        // Far in the future: only the relay's startup may release these.
        timeout_at_ms: u64::MAX / 2,
    }
}

/// The relay core of the relay that will serve `data` (its key created there first), as
/// posting jobs before the crash.
fn relay_core(data: &Path) -> RelayCore {
    std::fs::create_dir_all(data).unwrap();
    let (key, _) = Keypair::load_or_create(&data.join("relay.key")).unwrap();
    RelayCore::new(key, RelayConfig::default(), 1)
}

/// A job of `core` that escrowed `reward` and ended (cancelled by its requester, so all of it
/// refunded), as its record stands in the job store.
fn ended(core: &mut RelayCore, reward: u64) -> JobRecord {
    let id = testkit::post(core, 1_000, "studio", testkit::batch_spec(reward)).unwrap();
    core.reserve_confirmed(1_000, id).unwrap();
    core.cancel_job(2_000, id).unwrap();
    while core.poll_event().is_some() {}
    let job = core.job(&id).unwrap();
    assert!(job.state.is_final() && job.refunded == reward);
    JobRecord {
        id,
        requester: "studio".into(),
        posted_at_ms: job.posted_at_ms,
        snapshot: codec::encode(job).unwrap(),
        final_state: true,
        outputs: BTreeMap::new(),
    }
}

#[test]
fn startup_applies_the_outbox_and_releases_reservations_no_live_job_explains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut core = relay_core(&data);
    let (in_outbox, ended_open) = (ended(&mut core, 20), ended(&mut core, 10));
    let (orphan, ended_open_id) = (JobId([1; 16]), ended_open.id);
    {
        let ledger = Ledger::open(&data.join("ledger")).unwrap();
        ledger.mint(1, "studio", FUNDS, "credits").unwrap();
        // A post the ledger reserved before the relay died, with no job record written.
        ledger.apply_op(&reserve(orphan, 30)).unwrap();
        // A job that ended, its release recorded as intended but never applied.
        ledger.apply_op(&reserve(in_outbox.id, 20)).unwrap();
        // A job that ended with its reservation still open and nothing in the outbox.
        ledger.apply_op(&reserve(ended_open.id, 10)).unwrap();
        assert_eq!(ledger.balance("studio").unwrap().available(), 40);
        ledger.close();
        let jobs = JobStore::open(&data.join("jobs")).unwrap();
        let release = LedgerOp::release(in_outbox.id, 20);
        jobs.commit(&[in_outbox, ended_open], &[release], &[]).unwrap();
    }
    let serve = Serve::start(&data, &dir.path().join("serve.log"));
    let log_text = || serve.log();
    let client = serve.client();
    // The status is answered by the relay's loop, which starts once startup has reconciled.
    assert!(client.status().unwrap().halted.is_none());
    let balance = client.balance("studio").unwrap();
    assert_eq!(balance.available, i128::from(FUNDS), "every credit is back: {}", log_text());
    let log = log_text();
    assert!(log.contains("applied 1 ledger instruction(s) left from before the restart"), "{log}");
    assert!(
        log.contains(&format!("of job {orphan}: 30 credits back to studio (no job record")),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "of job {ended_open_id}: 10 credits back to studio (its job has ended"
        )),
        "{log}"
    );
    drop(serve);

    // The outbox is empty: a second start has nothing to complete.
    assert!(JobStore::open(&data.join("jobs")).unwrap().outbox().unwrap().is_empty());
    let ledger = Ledger::open(&data.join("ledger")).unwrap();
    assert!(ledger.open_reservations().unwrap().is_empty());
    assert!(ledger.audit_open().unwrap().problems.is_empty());
}

/// A job that ended with a refund its ledger does not show (its reservation was larger than
/// the escrow its record holds): no restart can settle that. The relay refuses to start and
/// says which job and what to do; `ledger audit` lists the disagreement and exits 1; with
/// `--accept-disagreements` the relay starts.
#[test]
fn a_relay_whose_books_disagree_on_an_ended_job_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut core = relay_core(&data);
    let job = ended(&mut core, 20);
    let id = job.id;
    {
        let ledger = Ledger::open(&data.join("ledger")).unwrap();
        ledger.mint(1, "studio", FUNDS, "credits").unwrap();
        ledger.apply_op(&reserve(id, 25)).unwrap();
        ledger.apply_op(&LedgerOp::release(id, 25)).unwrap();
        ledger.close();
        JobStore::open(&data.join("jobs")).unwrap().commit(&[job], &[], &[]).unwrap();
    }
    let relay = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_studio-relay"))
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    };

    let refused = relay(&["serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    let expected = format!(
        "job {id}: the record holds an escrow of 20 from studio, the ledger's reservation 25"
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        stderr.contains("ledger audit --data-dir") && stderr.contains("--accept-disagreements")
    );

    let audit = relay(&["ledger", "audit", "--json"]);
    assert_eq!(audit.status.code(), Some(1), "{}", String::from_utf8_lossy(&audit.stderr));
    let report: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    assert_eq!(report["problems"], serde_json::json!([]), "the ledger itself is sound");
    assert_eq!(report["jobs"], 1);
    let found = report["disagreements"].as_array().unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[1].as_str().unwrap().contains("refunded 20, the ledger returned 25"));

    let serve =
        Serve::start_with(&data, &dir.path().join("serve.log"), &["--accept-disagreements"]);
    assert!(serve.client().status().unwrap().halted.is_none());
    assert!(serve.log().contains("starting anyway (--accept-disagreements)"), "{}", serve.log());
}
