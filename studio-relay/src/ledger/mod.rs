//! The relay's durable credit ledger: double-entry accounts and two-phase transfers on sled.
//!
//! The model is TigerBeetle's. Accounts carry four u128 counters (`debits_posted`,
//! `credits_posted`, `debits_pending`, `credits_pending`). Credits come from the `issuance`
//! account ([`Ledger::mint`]). A job's reward is reserved as a pending transfer from the requester
//! into `escrow`; each payment posts part of it and moves it on to the node and the fee account
//! (`relay-fees`) in linked legs; the release, or the ledger's own expiry past the reservation's
//! timeout, voids the rest back to the requester. Every accepted operation is an immutable,
//! append-only log entry; caller-chosen ids make every operation idempotent.
//!
//! The state machine ([`LedgerState`]: accounts, reservations, the rules of every operation)
//! is `aimatrix_protocol::ledger`'s, shared with the simulator; this module makes it durable.
//! [`Ledger`] owns a writer thread that takes operations from a bounded queue in batches, applies
//! each batch in memory, writes the log entries and touched balances in one atomic sled batch,
//! flushes once and only then acknowledges each operation (group commit). Opening replays the
//! whole log and refuses a database whose balances, chain hashes or head do not match.
//!
//! ```no_run
//! use studio_relay::ledger::{Ledger, Op};
//! let ledger = Ledger::open(std::path::Path::new("/tmp/relay/ledger"))?;
//! ledger.mint(1, "alice", 100, "welcome credits")?;
//! ledger.submit(Op::Reserve {
//!     id: 2, job_id: [0; 16], requester: "alice".into(), amount: 60, timeout_at_ms: 10_000,
//! })?;
//! assert_eq!(ledger.balance("alice")?.available(), 40);
//! # Ok::<(), studio_relay::ledger::LedgerError>(())
//! ```

mod store;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use aimatrix_protocol::ledger::LedgerOp;
use aimatrix_protocol::relay::books::LedgerBooks;

pub use aimatrix_protocol::ledger::{
    add_leg, Account, Applied, Closed, Entry, LedgerState, Leg, LegKind, Op, OpError, Reservation,
    ACCOUNT_NAME_LEN_MAX, ESCROW_ACCOUNT, FEE_ACCOUNT, ISSUANCE_ACCOUNT,
};
use store::Paths;
pub use writer::{Outcome, Ticket};

/// Operations waiting for the writer at most; submitters block when it is full.
pub const QUEUE_LEN_MAX: usize = 65_536;
/// Operations applied in one sled batch and one flush at most.
pub const BATCH_LEN_MAX: usize = 16_384;

/// Why the ledger could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The operation was refused; nothing was recorded.
    #[error(transparent)]
    Rejected(#[from] OpError),
    /// The database does not match its own log; it was not changed.
    #[error(
        "ledger database {} is corrupt: {detail}. Nothing new was recorded in it and it will be \
         refused again on every open: restore the ledger directory from a backup \
         (`studio-relay ledger audit --data-dir DIR` lists every problem)",
        path.display()
    )]
    Corrupt {
        /// The ledger directory.
        path: PathBuf,
        /// What did not match.
        detail: String,
    },
    /// Another process holds the database.
    #[error(
        "ledger database {} is in use by another process (a running relay?); stop it first, \
         or leave out --data-dir to go through the running relay's HTTP API (--api)",
        path.display()
    )]
    Locked {
        /// The ledger directory.
        path: PathBuf,
    },
    /// Reading or writing the files failed.
    #[error("ledger storage failed: {0}")]
    Storage(String),
    /// The writer stopped after a storage failure; reopen the ledger to recover from disk.
    #[error("the ledger writer has stopped after a storage failure; reopen the ledger")]
    Closed,
}

/// What `ledger audit` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// Log entries read.
    pub entries: u64,
    /// Accounts rebuilt from the log.
    pub accounts: usize,
    /// Reservations still open.
    pub open_reservations: usize,
    /// Every discrepancy, one line each; empty when clean.
    pub problems: Vec<String>,
    /// Each job's money as the log records it, for [`crate::store::JobStore::cross_check`].
    pub books: LedgerBooks,
}

impl From<store::Scan> for AuditReport {
    fn from(scan: store::Scan) -> Self {
        Self {
            entries: scan.entries,
            accounts: scan.state.accounts().len(),
            open_reservations: scan
                .state
                .reservations()
                .values()
                .filter(|r| r.closed == Closed::Open)
                .count(),
            problems: scan.problems,
            books: scan.books,
        }
    }
}

/// The durable ledger: a writer thread with group commit over a sled database.
pub struct Ledger {
    tx: Option<mpsc::SyncSender<writer::Request>>,
    db: sled::Db,
    /// The writer thread; it returns whether it stopped after a storage failure.
    writer: Option<std::thread::JoinHandle<bool>>,
}

impl Ledger {
    /// Opens (or creates) the ledger in `dir`, verifying the whole log before accepting writes.
    pub fn open(dir: &Path) -> Result<Self, LedgerError> {
        std::fs::create_dir_all(dir).map_err(|err| {
            LedgerError::Storage(format!("cannot create {}: {err}", dir.display()))
        })?;
        let paths = Paths::new(dir);
        let db = store::open_db(&paths)?;
        let scan = store::scan(&db, &paths, db.was_recovered());
        if let Some(first) = scan.problems.first() {
            let more = scan.problems.len() - 1;
            let detail =
                if more == 0 { first.clone() } else { format!("{first} (and {more} more)") };
            return Err(store::corrupt(&paths, detail));
        }
        let store = store::Store::new(db.clone(), &paths, scan.head)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE_LEN_MAX);
        let writer = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer::run(store, scan.state, rx))
            .map_err(|err| LedgerError::Storage(format!("cannot start the writer: {err}")))?;
        Ok(Self { tx: Some(tx), db, writer: Some(writer) })
    }

    /// Reads and checks a ledger directory without changing it; never fails on discrepancies,
    /// only on files sled cannot open at all.
    pub fn audit(dir: &Path) -> Result<AuditReport, LedgerError> {
        let paths = Paths::new(dir);
        if !paths.db.exists() {
            return Err(LedgerError::Storage(format!(
                "no ledger in {} (nothing to audit)",
                dir.display()
            )));
        }
        let db = store::open_db(&paths)?;
        Ok(AuditReport::from(store::scan(&db, &paths, db.was_recovered())))
    }

    /// The same scan as [`Ledger::audit`], on this open ledger: it runs on the writer thread
    /// between two batches, so it sees every acknowledged operation and nothing half-written.
    pub fn audit_open(&self) -> Result<AuditReport, LedgerError> {
        match self.send(writer::Command::Audit)?.wait()? {
            Outcome::Audited(report) => Ok(report),
            _ => unreachable!("an audit is answered with Audited"),
        }
    }

    /// The reservations still open, by id, as of every operation acknowledged so far.
    pub fn open_reservations(&self) -> Result<Vec<(u128, Reservation)>, LedgerError> {
        match self.send(writer::Command::OpenReservations)?.wait()? {
            Outcome::OpenReservations(open) => Ok(open),
            _ => unreachable!("a listing is answered with OpenReservations"),
        }
    }

    /// Queues `op`; the ticket resolves once the op is durable (or refused).
    pub fn submit_async(&self, op: Op) -> Result<Ticket, LedgerError> {
        self.send(writer::Command::Apply(op))
    }

    /// Voids, at `now_ms`, every open reservation past its timeout; resolves once durable.
    pub fn expire_async(&self, now_ms: u64) -> Result<Ticket, LedgerError> {
        self.send(writer::Command::Expire(now_ms))
    }

    fn send(&self, command: writer::Command) -> Result<Ticket, LedgerError> {
        let tx = self.tx.as_ref().ok_or(LedgerError::Closed)?;
        let (reply, ticket) = writer::reply_pair();
        tx.send(writer::Request { command, reply }).map_err(|_| LedgerError::Closed)?;
        Ok(ticket)
    }

    /// Applies `op` and waits until it is durable.
    pub fn submit(&self, op: Op) -> Result<Applied, LedgerError> {
        match self.submit_async(op)?.wait()? {
            Outcome::Applied(applied) => Ok(applied),
            _ => unreachable!("an op is answered with Applied"),
        }
    }

    /// Applies one of the protocol core's ledger instructions and waits until it is durable.
    pub fn apply_op(&self, op: &LedgerOp) -> Result<Applied, LedgerError> {
        self.submit(Op::from(op))
    }

    /// Mints `amount` credits into `account` under transfer id `id`.
    pub fn mint(
        &self,
        id: u128,
        account: &str,
        amount: u64,
        memo: &str,
    ) -> Result<Applied, LedgerError> {
        self.submit(Op::Mint { id, account: account.to_owned(), amount, memo: memo.to_owned() })
    }

    /// Voids every reservation past its timeout at `now_ms`; returns their ids once durable.
    pub fn expire(&self, now_ms: u64) -> Result<Vec<u128>, LedgerError> {
        match self.expire_async(now_ms)?.wait()? {
            Outcome::Expired(ids) => Ok(ids),
            _ => unreachable!("an expiry is answered with Expired"),
        }
    }

    /// One account's counters (zero when the account was never used).
    pub fn balance(&self, account: &str) -> Result<Account, LedgerError> {
        store::read_account(&self.db, account)
            .map(Option::unwrap_or_default)
            .map_err(LedgerError::Storage)
    }

    /// Entries that moved credits of `account`, newest first, at most `limit`.
    pub fn history(&self, account: &str, limit: usize) -> Result<Vec<Entry>, LedgerError> {
        let mut found = Vec::new();
        for entry in store::log_entries(&self.db, true) {
            if found.len() >= limit {
                break;
            }
            let entry = entry.map_err(LedgerError::Storage)?;
            if entry.legs.iter().any(|l| l.debit == account || l.credit == account)
                || matches!(&entry.op, Op::Reserve { requester, .. } if requester == account)
            {
                found.push(entry);
            }
        }
        Ok(found)
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = Result<Entry, LedgerError>> + '_ {
        store::log_entries(&self.db, false).map(|e| e.map_err(LedgerError::Storage))
    }

    /// Stops the writer after it has acknowledged everything queued.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            // A panicking writer already failed every waiting ticket; nothing more to report.
            if let Ok(true) = writer.join() {
                // sled flushes a database when its last handle goes, and after a failed write
                // that flush waits forever (its failed buffer never becomes stable): a relay
                // stopped with Ctrl-C would hang. Everything acknowledged was flushed before it
                // was acknowledged, so this handle is leaked instead of dropped.
                std::mem::forget(self.db.clone());
            }
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.shutdown();
    }
}
