//! The group-commit writer: one thread, one batch, one flush, then the acknowledgements.

use std::sync::mpsc;

use super::store::Store;
use super::{Applied, Closed, Entry, LedgerState, Op, Reservation};
use super::{AuditReport, LedgerError, BATCH_LEN_MAX};

/// What the writer is asked to do.
pub(crate) enum Command {
    /// Apply a caller's op.
    Apply(Op),
    /// Void every reservation past its timeout at this instant.
    Expire(u64),
    /// Scan the database once this batch is durable.
    Audit,
    /// List the open reservations.
    OpenReservations,
}

/// One queued command and where to send its answer.
pub(crate) struct Request {
    pub(crate) command: Command,
    pub(crate) reply: mpsc::SyncSender<Result<Outcome, LedgerError>>,
}

/// What a durable command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An op was recorded, or had been recorded before.
    Applied(Applied),
    /// An expiry voided these reservations.
    Expired(Vec<u128>),
    /// What an audit of the open ledger found.
    Audited(AuditReport),
    /// The open reservations, by id.
    OpenReservations(Vec<(u128, Reservation)>),
}

/// The answer to one submitted command; [`Ticket::wait`] returns once it is durable.
#[derive(Debug)]
pub struct Ticket(mpsc::Receiver<Result<Outcome, LedgerError>>);

impl Ticket {
    /// Blocks until the command is durable (or refused, or the writer failed).
    pub fn wait(self) -> Result<Outcome, LedgerError> {
        self.0.recv().unwrap_or(Err(LedgerError::Closed))
    }
}

pub(crate) fn reply_pair() -> (mpsc::SyncSender<Result<Outcome, LedgerError>>, Ticket) {
    let (tx, rx) = mpsc::sync_channel(1);
    (tx, Ticket(rx))
}

/// Runs until every sender is gone (returns false) or storage fails (returns true).
pub(crate) fn run(mut store: Store, mut state: LedgerState, rx: mpsc::Receiver<Request>) -> bool {
    let mut batch: Vec<Request> = Vec::with_capacity(BATCH_LEN_MAX);
    let mut results: Vec<Result<Outcome, LedgerError>> = Vec::with_capacity(BATCH_LEN_MAX);
    let mut entries: Vec<Entry> = Vec::new();
    let mut audits: Vec<usize> = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < BATCH_LEN_MAX {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        for (i, request) in batch.iter_mut().enumerate() {
            let command = std::mem::replace(&mut request.command, Command::Expire(0));
            results.push(match command {
                Command::Audit => {
                    // Answered below, once the batch is on disk.
                    audits.push(i);
                    Ok(Outcome::Expired(Vec::new()))
                }
                Command::Apply(op) => state
                    .apply(op, &mut entries)
                    .map(Outcome::Applied)
                    .map_err(LedgerError::Rejected),
                Command::Expire(now_ms) => Ok(Outcome::Expired(state.expire(now_ms, &mut entries))),
                Command::OpenReservations => Ok(Outcome::OpenReservations(
                    state
                        .reservations()
                        .iter()
                        .filter(|(_, r)| r.closed == Closed::Open)
                        .map(|(id, r)| (*id, r.clone()))
                        .collect(),
                )),
            });
        }
        // A repeat of an op recorded in this very batch is answered after the flush too.
        if !entries.is_empty() {
            if let Err(err) = store.commit(&entries, &state) {
                tracing::error!("ledger writer stopping: {err}");
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(LedgerError::Storage(err.clone())));
                }
                // The in-memory state is now ahead of the disk: stop, so nothing else is
                // acknowledged; reopening replays what is durable.
                return true;
            }
            entries.clear();
        }
        for i in audits.drain(..) {
            results[i] = Ok(Outcome::Audited(store.audit()));
        }
        for (request, result) in batch.drain(..).zip(results.drain(..)) {
            // A submitter that stopped waiting is not an error.
            let _ = request.reply.send(result);
        }
    }
    false
}
