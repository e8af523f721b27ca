//! The relay's two books of the same money, checked against each other: its job records
//! ([`RelayJob`]: escrow, paid, refunded, which leases were paid) and its ledger's entries
//! (reservations, payments, releases, expiries). `ledger audit` and the relay's startup both
//! run this check; what counts as agreement is decided here, once (docs/ledger.md, "Books that
//! agree").
//!
//! ```
//! use aimatrix_protocol::relay::books::LedgerBooks;
//! let books = LedgerBooks::default();
//! assert!(books.check(std::iter::empty()).is_empty());
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use super::{JobState, RelayJob};
use crate::ledger::{Entry, LedgerOp, Op};
use crate::messages::JobId;

/// What the ledger recorded for one job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerJob {
    /// The reservation: the requester's account and the credits held.
    pub reserved: Option<(String, u128)>,
    /// Credits each node's payments took from the escrow (its amount and the relay fee), by
    /// the node's account.
    pub paid: BTreeMap<String, u128>,
    /// Credits the relay released back to the requester.
    pub released: Option<u128>,
    /// Credits the ledger voided back by its safety expiry.
    pub expired: Option<u128>,
}

impl LedgerJob {
    fn paid_total(&self) -> u128 {
        self.paid.values().sum()
    }

    fn returned(&self) -> Option<u128> {
        match (self.released, self.expired) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        }
    }
}

/// Every job's money as the ledger recorded it, gathered entry by entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerBooks {
    jobs: BTreeMap<JobId, LedgerJob>,
    /// The job of each reservation, for expiries (which name only the reservation).
    reservation_job: HashMap<u128, JobId>,
    /// Transfer ids recorded, so an instruction still in the outbox is counted once.
    ids: HashSet<u128>,
}

impl LedgerBooks {
    /// Counts one recorded ledger entry (mints move no job's money and are skipped).
    pub fn add_entry(&mut self, entry: &Entry) {
        let voided = entry.legs.iter().map(|l| l.amount).sum();
        self.add(&entry.op, voided);
    }

    /// Counts an instruction the relay intended and the ledger may not have applied yet (its
    /// outbox, replayed at the next start), unless the ledger already holds its id.
    pub fn add_pending(&mut self, op: &LedgerOp) {
        let amount = match op {
            LedgerOp::Release { amount, .. } => u128::from(*amount),
            _ => 0,
        };
        self.add(&Op::from(op), amount);
    }

    fn add(&mut self, op: &Op, voided: u128) {
        if let Some(id) = op.id() {
            if !self.ids.insert(id) {
                return;
            }
        }
        match op {
            Op::Mint { .. } => {}
            Op::Reserve { id, job_id, requester, amount, .. } => {
                let job_id = JobId(*job_id);
                self.reservation_job.insert(*id, job_id);
                let job = self.jobs.entry(job_id).or_default();
                job.reserved = Some((requester.clone(), u128::from(*amount)));
            }
            Op::Pay { job_id, node, amount, fee, .. } => {
                let job = self.jobs.entry(JobId(*job_id)).or_default();
                *job.paid.entry(node.clone()).or_default() +=
                    u128::from(*amount) + u128::from(*fee);
            }
            Op::Release { job_id, amount, .. } => {
                self.jobs.entry(JobId(*job_id)).or_default().released = Some(u128::from(*amount));
            }
            Op::Expire { reserve_id, .. } => {
                if let Some(job_id) = self.reservation_job.get(reserve_id) {
                    self.jobs.entry(*job_id).or_default().expired = Some(voided);
                }
            }
        }
    }

    /// What the ledger recorded for `job_id`, if anything.
    pub fn job(&self, job_id: &JobId) -> Option<&LedgerJob> {
        self.jobs.get(job_id)
    }

    /// Every way `jobs` (all of the relay's job records) and the ledger disagree, in job order.
    /// Empty when the books agree: each job's reservation is its escrow, each node was paid
    /// exactly for its paid leases, an ended job's reservation is closed with its refund, an
    /// open job's is still open, and no credits moved for a job without a record. A reservation
    /// without a record that was voided whole and paid nothing moved no credits and is not
    /// reported (startup releases such reservations).
    pub fn check<'a>(&self, jobs: impl IntoIterator<Item = &'a RelayJob>) -> Vec<Disagreement> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for job in jobs {
            seen.insert(job.id);
            let ledger = self.jobs.get(&job.id).cloned().unwrap_or_default();
            let lasting = job.state.is_final();
            for what in disagreements(job, &ledger) {
                out.push(Disagreement { job_id: job.id, what, lasting });
            }
        }
        for (job_id, ledger) in &self.jobs {
            if seen.contains(job_id) {
                continue;
            }
            let paid = ledger.paid_total();
            let neutral = paid == 0
                && ledger
                    .reserved
                    .as_ref()
                    .is_none_or(|(_, held)| ledger.returned() == Some(*held));
            if !neutral {
                let what = match &ledger.reserved {
                    Some((requester, held)) => format!(
                        "no job record explains the ledger's reservation of {held} credits of \
                         {requester} (paid {paid}, returned {})",
                        ledger.returned().unwrap_or(0)
                    ),
                    None => format!("no job record explains {paid} credits paid from its escrow"),
                };
                out.push(Disagreement { job_id: *job_id, what, lasting: true });
            }
        }
        out.sort_by_key(|d| d.job_id);
        out
    }
}

/// How one job's record and the ledger's entries for it disagree.
fn disagreements(job: &RelayJob, ledger: &LedgerJob) -> Vec<String> {
    let mut out = Vec::new();
    match &ledger.reserved {
        Some((requester, held))
            if *requester != job.requester || *held != u128::from(job.escrow) =>
        {
            out.push(format!(
                "the record holds an escrow of {} from {}, the ledger's reservation {held} from \
                 {requester}",
                job.escrow, job.requester
            ));
        }
        _ => {}
    }
    let mut owed: BTreeMap<String, u128> = BTreeMap::new();
    for lease in job.leases.values().filter(|l| l.paid) {
        *owed.entry(lease.node.account_name()).or_default() += u128::from(job.spec.reward);
    }
    for node in owed.keys().chain(ledger.paid.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (record, paid) = (owed.get(node).copied(), ledger.paid.get(node).copied());
        if record != paid {
            out.push(format!(
                "the record pays {node} {} credits for its paid leases, the ledger {}",
                record.unwrap_or(0),
                paid.unwrap_or(0)
            ));
        }
    }
    if ledger.paid_total() != u128::from(job.paid) {
        out.push(format!(
            "the record says {} credits were paid, the ledger {}",
            job.paid,
            ledger.paid_total()
        ));
    }
    let returned = ledger.returned();
    match &job.state {
        JobState::Reserving | JobState::Open => {
            if let Some(returned) = returned {
                let how = if ledger.expired.is_some() {
                    "voided by the ledger's safety expiry"
                } else {
                    "released"
                };
                out.push(format!(
                    "the job is still open but its reservation was {how} ({returned} credits \
                     back to the requester)"
                ));
            } else if job.state == JobState::Open && ledger.reserved.is_none() {
                out.push(format!(
                    "the job is open but the ledger holds no reservation for its escrow of {}",
                    job.escrow
                ));
            }
        }
        JobState::Completed { .. } | JobState::Failed { .. } => match returned {
            None if ledger.reserved.is_none() => out.push(format!(
                "the job ended, paid {} and refunded {}, but the ledger never reserved its escrow",
                job.paid, job.refunded
            )),
            None => out.push(format!(
                "the job ended and refunded {}, but the ledger still holds its reservation open",
                job.refunded
            )),
            Some(returned) if returned != u128::from(job.refunded) => out.push(format!(
                "the record refunded {}, the ledger returned {returned} to the requester",
                job.refunded
            )),
            Some(_) => {}
        },
        JobState::Refused { .. } => {
            if let Some((_, held)) = &ledger.reserved {
                if returned.unwrap_or(0) + ledger.paid_total() != *held {
                    out.push(format!(
                        "the job was refused, but the ledger holds {} of its reservation of \
                         {held}",
                        held - returned.unwrap_or(0).min(*held)
                    ));
                }
            }
        }
    }
    out
}

/// One way a job record and the ledger disagree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disagreement {
    /// The job.
    pub job_id: JobId,
    /// What differs, with both books' numbers.
    pub what: String,
    /// Whether it stays as it is: the job has ended, or there is no record of it. Otherwise
    /// the job is still open and its settlement may yet bring the books together (a
    /// reservation the ledger voided by its safety expiry while the relay was down, say).
    pub lasting: bool,
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {}: {}", self.job_id, self.what)
    }
}
