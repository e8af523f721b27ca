//! What a crash leaves in flight is completed when the relay starts (docs/ledger.md, "One
//! order of effects"): the ledger instructions recorded in the job store's outbox are applied,
//! and every open reservation no live job explains is released at once, not an hour past a
//! deadline nobody can see. Set up by writing the ledger and the job store directly, as a
//! relay killed between its steps would have left them, then starting `studio-relay serve`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use aimatrix_protocol::ledger::{LedgerOp, TransferId};
use aimatrix_protocol::messages::JobId;
use studio_relay::ledger::Ledger;
use studio_relay::store::{JobRecord, JobStore};

use common::Serve;

const FUNDS: u64 = 100;

fn reserve(job: JobId, amount: u64) -> LedgerOp {
    LedgerOp::Reserve {
        id: TransferId::derive(job, "reserve", &[]),
        job_id: job,
        requester: "studio".into(),
        amount,
        // Far in the future: only the relay's startup may release these.
        timeout_at_ms: u64::MAX / 2,
    }
}

fn ended(job: JobId) -> JobRecord {
    JobRecord {
        id: job,
        requester: "studio".into(),
        posted_at_ms: 1,
        snapshot: Vec::new(),
        final_state: true,
        outputs: BTreeMap::new(),
    }
}

#[test]
fn startup_applies_the_outbox_and_releases_reservations_no_live_job_explains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (orphan, in_outbox, ended_open) = (JobId([1; 16]), JobId([2; 16]), JobId([3; 16]));
    {
        let ledger = Ledger::open(&data.join("ledger")).unwrap();
        ledger.mint(1, "studio", FUNDS, "credits").unwrap();
        // A post the ledger reserved before the relay died, with no job record written.
        ledger.apply_op(&reserve(orphan, 30)).unwrap();
        // A job that ended, its release recorded as intended but never applied.
        ledger.apply_op(&reserve(in_outbox, 20)).unwrap();
        // A job that ended with its reservation still open and nothing in the outbox.
        ledger.apply_op(&reserve(ended_open, 10)).unwrap();
        assert_eq!(ledger.balance("studio").unwrap().available(), 40);
        ledger.close();
        let jobs = JobStore::open(&data.join("jobs")).unwrap();
        let release = LedgerOp::Release {
            id: TransferId::derive(in_outbox, "release", &[]),
            reserve_id: TransferId::derive(in_outbox, "reserve", &[]),
            job_id: in_outbox,
            amount: 20,
        };
        jobs.commit(&[ended(in_outbox), ended(ended_open)], &[release], &[]).unwrap();
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
        log.contains(&format!("of job {ended_open}: 10 credits back to studio (its job has ended")),
        "{log}"
    );
    drop(serve);

    // The outbox is empty: a second start has nothing to complete.
    assert!(JobStore::open(&data.join("jobs")).unwrap().outbox().unwrap().is_empty());
    let ledger = Ledger::open(&data.join("ledger")).unwrap();
    assert!(ledger.open_reservations().unwrap().is_empty());
    assert!(ledger.audit_open().unwrap().problems.is_empty());
}
