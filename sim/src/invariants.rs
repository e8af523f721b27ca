//! Invariant checks run after every simulation step, without panicking: the first violation
//! is recorded with the seed and the step that replay it.

use std::fmt;

use aimatrix_protocol::ledger::{LedgerOp, LedgerState};
use aimatrix_protocol::relay::{JobState, LeaseStatus, RelayJob};
use aimatrix_protocol::time::Millis;
use serde::Serialize;

/// The invariants the simulator checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Invariant {
    /// A job reports its end (completed, failed, refused) at most once and never changes it.
    EndsOnce,
    /// Every minted credit is in exactly one balance or open reservation, and the ledger
    /// accepted every instruction the relay issued.
    CreditsConserved,
    /// A payment goes only to a result the relay verified (replicas agreed on it, or the
    /// aggregation accepted the update).
    PaidIsVerified,
    /// A batch job never has more active leases than its replication factor.
    LeasesWithinReplication,
    /// Every posted job is completed, failed, refused, or still pending before its deadline.
    NoJobLost,
    /// The driver's own calls into the cores succeeded.
    DriverConsistent,
    /// Every forged or replayed envelope delivered to a core was rejected by it.
    ForgeriesRejected,
}

impl Invariant {
    /// The snake-case name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EndsOnce => "ends_once",
            Self::CreditsConserved => "credits_conserved",
            Self::PaidIsVerified => "paid_is_verified",
            Self::LeasesWithinReplication => "leases_within_replication",
            Self::NoJobLost => "no_job_lost",
            Self::DriverConsistent => "driver_consistent",
            Self::ForgeriesRejected => "forgeries_rejected",
        }
    }
}

/// One invariant that failed, and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// Which.
    pub invariant: Invariant,
    /// The seed of the run.
    pub seed: u64,
    /// The step (event number, from 1) after which it was detected.
    pub step: u64,
    /// Simulated time since the start, ms.
    pub at_ms: Millis,
    /// What was wrong.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invariant {} failed at step {} (t = {:.3} s) with seed {}: {}; replay with --seed {}",
            self.invariant.name(),
            self.step,
            self.at_ms as f64 / 1000.0,
            self.seed,
            self.detail,
            self.seed
        )
    }
}

/// Credits conserved: the sum over every account that can hold credits (`accounts`, in
/// ascending order) plus what is held in open reservations equals what was minted. Credits in
/// an account not listed (one the run never knew of) are missing from the sum.
pub fn check_conserved<'a>(
    ledger: &LedgerState,
    accounts: impl Iterator<Item = &'a String>,
    minted: u64,
) -> Result<(), String> {
    // The ledger lists its accounts in the same order: one merged walk of both lists, instead
    // of a look-up by name per account (this runs after every ledger operation).
    let mut ledger_accounts = ledger.accounts().iter().peekable();
    let mut balances = 0i128;
    let mut previous: Option<&str> = None;
    for account in accounts {
        let account = account.as_str();
        assert!(previous.is_none_or(|p| p < account), "accounts in ascending order");
        previous = Some(account);
        while ledger_accounts.next_if(|(name, _)| name.as_str() < account).is_some() {}
        if let Some((_, a)) = ledger_accounts.next_if(|(name, _)| name.as_str() == account) {
            balances += a.available();
        }
    }
    let held = ledger.held() as i128;
    let total = balances + held;
    if total == i128::from(minted) {
        Ok(())
    } else {
        Err(format!("balances {balances} + held {held} = {total}, minted {minted}"))
    }
}

/// A payment of a batch job: the job completed with hash H, the paid node returned H, and at
/// least `replication` leases returned H.
pub fn check_batch_payment(job: &RelayJob, op: &LedgerOp) -> Result<(), String> {
    let LedgerOp::Pay { node, .. } = op else { return Ok(()) };
    let JobState::Completed { result_hash } = &job.state else {
        return Err(format!("job {} paid {node} while {:?}", job.id, job.state));
    };
    let agreeing =
        job.leases.values().filter(|l| l.status == LeaseStatus::Returned(*result_hash)).count();
    let node_agrees = job
        .leases
        .values()
        .any(|l| l.node == *node && l.status == LeaseStatus::Returned(*result_hash));
    if !node_agrees {
        return Err(format!("job {} paid {node}, whose result is not the agreed one", job.id));
    }
    if agreeing < job.spec.replication as usize {
        return Err(format!(
            "job {} paid on {agreeing} agreeing results, replication is {}",
            job.id, job.spec.replication
        ));
    }
    Ok(())
}

/// A batch job has no more active leases than its replication factor.
pub fn check_leases(job: &RelayJob) -> Result<(), String> {
    if job.training.is_some() {
        return Ok(());
    }
    let active = job.leases.values().filter(|l| l.status == LeaseStatus::Active).count();
    if active > job.spec.replication as usize {
        return Err(format!(
            "job {} has {active} active leases, replication {}",
            job.id, job.spec.replication
        ));
    }
    Ok(())
}

/// Records that a job ended: `ended` is the job's "has ended" flag, `None` when the run never
/// posted it. A job ends at most once.
pub fn check_end(job_id: &impl fmt::Display, ended: Option<&mut bool>) -> Result<(), String> {
    let Some(ended) = ended else { return Err(format!("job {job_id} ended but was never posted")) };
    if *ended {
        return Err(format!("job {job_id} ended a second time"));
    }
    *ended = true;
    Ok(())
}

/// A job not yet ended must be reserving, or open before its deadline (`slack_ms` allows for
/// the relay's timer to run).
pub fn check_not_lost(job: Option<&RelayJob>, now: Millis, slack_ms: u64) -> Result<(), String> {
    let Some(job) = job else { return Err("the relay no longer knows a posted job".into()) };
    match &job.state {
        JobState::Reserving => Ok(()),
        JobState::Open if now <= job.deadline_ms.saturating_add(slack_ms) => Ok(()),
        JobState::Open => Err(format!(
            "job {} is still open {} ms after its deadline",
            job.id,
            now - job.deadline_ms
        )),
        other => Err(format!("job {} is {other:?} but its end was never reported", job.id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aimatrix_protocol::ledger::{Op, TransferId};
    use aimatrix_protocol::messages::{self, Advert, Claim, Message};
    use aimatrix_protocol::relay::{RelayConfig, RelayCore};
    use aimatrix_protocol::testkit;

    fn open_job(replication: u32) -> (RelayCore, aimatrix_protocol::messages::JobId) {
        let mut relay = RelayCore::new(testkit::keypair(9), RelayConfig::default(), 1);
        let mut spec = testkit::batch_spec(10);
        spec.replication = replication;
        let id = relay.post_job(1_000, "r", spec).unwrap();
        relay.reserve_confirmed(1_000, id).unwrap();
        (relay, id)
    }

    fn mint(ledger: &mut LedgerState, account: &str, amount: u64) {
        let id = ledger.last_seq().into();
        let op = Op::Mint { id, account: account.into(), amount, memo: String::new() };
        ledger.apply(op, &mut Vec::new()).unwrap();
    }

    #[test]
    fn conservation_fires_when_a_credit_is_invented() {
        let mut ledger = LedgerState::new();
        mint(&mut ledger, "a", 10);
        let accounts = ["a".to_owned()];
        assert!(check_conserved(&ledger, accounts.iter(), 10).is_ok());
        assert!(check_conserved(&ledger, accounts.iter(), 9).is_err());
    }

    #[test]
    fn conservation_counts_exactly_the_listed_accounts() {
        let mut ledger = LedgerState::new();
        for (account, amount) in [("b", 1), ("d", 10), ("f", 100), ("h", 1_000)] {
            mint(&mut ledger, account, amount);
        }
        let listed = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        let all = listed(&["a", "b", "c", "d", "f", "g", "h", "i"]);
        assert!(check_conserved(&ledger, all.iter(), 1_111).is_ok());
        // Credits in an account the run does not know of are missing from the sum.
        let some = listed(&["b", "c", "f", "h"]);
        let err = check_conserved(&ledger, some.iter(), 1_111).unwrap_err();
        assert!(err.starts_with("balances 1101 "), "{err}");
        assert!(check_conserved(&ledger, listed(&["d"]).iter(), 10).is_ok());
        assert!(check_conserved(&ledger, listed(&[]).iter(), 0).is_ok());
    }

    #[test]
    fn payment_of_an_unfinished_job_fires() {
        let (relay, id) = open_job(2);
        let node = testkit::keypair(1).public();
        let pay = LedgerOp::Pay {
            id: TransferId(1),
            reserve_id: TransferId(2),
            job_id: id,
            node,
            amount: 10,
            fee: 0,
        };
        let err = check_batch_payment(relay.job(&id).unwrap(), &pay).unwrap_err();
        assert!(err.contains("paid"), "{err}");
    }

    #[test]
    fn a_second_end_and_the_end_of_an_unposted_job_fire() {
        let mut ended = false;
        assert!(check_end(&"j1", Some(&mut ended)).is_ok());
        assert!(ended);
        assert!(check_end(&"j1", Some(&mut ended)).unwrap_err().contains("second time"));
        assert!(check_end(&"j2", None).unwrap_err().contains("never posted"));
    }

    #[test]
    fn an_active_lease_beyond_the_replication_factor_fires() {
        let (mut relay, id) = open_job(1);
        // A real grant through the relay (a node advertises, then claims), then a second
        // active lease injected beside it.
        let node = testkit::keypair(1);
        let advert = Message::Advert(Advert { seq: 1, profile: testkit::profile() });
        let claim = Message::Claim(Claim { job_id: id });
        for (nonce, msg) in [(1, advert), (2, claim)] {
            let bytes = messages::seal(&node, &msg, nonce, 1_000, 60_000).unwrap();
            relay.handle_message(1_000, Some(node.public()), &bytes);
        }
        let mut job = relay.job(&id).unwrap().clone();
        assert!(check_leases(&job).is_ok());
        let mut extra = job.leases.values().next().expect("a lease was granted").clone();
        extra.lease += 1;
        extra.node = testkit::keypair(2).public();
        job.leases.insert(extra.lease, extra);
        let err = check_leases(&job).unwrap_err();
        assert!(err.contains("2 active leases, replication 1"), "{err}");
    }

    #[test]
    fn an_open_job_past_its_deadline_is_lost() {
        let (relay, id) = open_job(1);
        let job = relay.job(&id).unwrap();
        assert!(check_not_lost(Some(job), job.deadline_ms, 1_000).is_ok());
        assert!(check_not_lost(Some(job), job.deadline_ms + 5_000, 1_000).is_err());
        assert!(check_not_lost(None, 0, 0).is_err());
        assert!(check_leases(job).is_ok());
    }
}
