//! Ledger instructions the relay core emits, and an in-memory book that applies them.
//!
//! Every transition that moves credits emits a [`LedgerOp`] with an idempotency id
//! ([`TransferId`]) derived from the job and the step, so a driver that crashes and replays
//! a step issues the same id and the ledger returns the existing transfer instead of paying
//! twice. The escrow is two-phase (TigerBeetle-style): [`LedgerOp::Reserve`] holds the job's
//! whole budget, [`LedgerOp::Pay`] posts part of it to a node (with the relay fee, linked), and
//! [`LedgerOp::Release`] returns the rest to the requester and closes the reservation.
//!
//! [`EscrowBook`] is a reference implementation used by the protocol tests and the simulator
//! to check that credits are conserved; the relay's durable ledger lives in `studio-relay`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hash::Digest;
use crate::identity::NodeId;
use crate::messages::JobId;
use crate::time::Millis;

/// A transfer's idempotency id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TransferId(pub u128);

impl TransferId {
    /// Derives an id from the job and the step (`"reserve"`, `"pay"`, ...) and its qualifiers.
    pub fn derive(job: JobId, step: &str, qualifiers: &[&[u8]]) -> Self {
        let mut parts: Vec<&[u8]> = vec![b"aimatrix/transfer", &job.0, step.as_bytes()];
        parts.extend_from_slice(qualifiers);
        let d = Digest::of_parts(&parts);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&d.0[..16]);
        Self(u128::from_le_bytes(bytes))
    }
}

/// A credit movement the driver must apply to the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerOp {
    /// Hold `amount` from the requester for the job (a pending transfer).
    Reserve {
        /// Idempotency id; also the reservation's id.
        id: TransferId,
        /// The job.
        job_id: JobId,
        /// The requester's account name.
        requester: String,
        /// Credits held.
        amount: u64,
        /// After this instant the ledger voids the reservation by itself.
        timeout_at_ms: Millis,
    },
    /// Post part of a reservation: `amount` to the node and `fee` to the relay fee account,
    /// both or neither.
    Pay {
        /// Idempotency id.
        id: TransferId,
        /// The reservation paid from.
        reserve_id: TransferId,
        /// The job.
        job_id: JobId,
        /// The node paid.
        node: NodeId,
        /// Credits to the node.
        amount: u64,
        /// Credits to the relay fee account.
        fee: u64,
    },
    /// Return `amount` (everything not paid) to the requester and close the reservation.
    Release {
        /// Idempotency id.
        id: TransferId,
        /// The reservation closed.
        reserve_id: TransferId,
        /// The job.
        job_id: JobId,
        /// Credits returned (may be 0).
        amount: u64,
    },
}

impl LedgerOp {
    /// The operation's idempotency id.
    pub fn id(&self) -> TransferId {
        match self {
            Self::Reserve { id, .. } | Self::Pay { id, .. } | Self::Release { id, .. } => *id,
        }
    }

    /// The job it belongs to.
    pub fn job_id(&self) -> JobId {
        match self {
            Self::Reserve { job_id, .. }
            | Self::Pay { job_id, .. }
            | Self::Release { job_id, .. } => *job_id,
        }
    }
}

/// Why the book refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    /// The same id was used with different fields.
    #[error("transfer id {0:?} reused with different fields")]
    IdReused(TransferId),
    /// The requester's balance is short.
    #[error("insufficient funds: {account} needs {need}, has {available} (short by {short})")]
    InsufficientFunds {
        /// Account.
        account: String,
        /// Amount needed.
        need: u64,
        /// Amount available.
        available: u64,
        /// `need - available`.
        short: u64,
    },
    /// No such open reservation.
    #[error("reservation {0:?} is unknown or already closed")]
    NotOpen(TransferId),
    /// Paying would exceed what is held.
    #[error("paying {need} exceeds the {held} still held in reservation {id:?}")]
    Overdraw {
        /// Reservation.
        id: TransferId,
        /// Amount asked.
        need: u64,
        /// Amount held.
        held: u64,
    },
    /// The release amount is not exactly what is still held.
    #[error("release of {amount} does not match the {held} still held")]
    ReleaseMismatch {
        /// Amount in the op.
        amount: u64,
        /// Amount held.
        held: u64,
    },
}

#[derive(Clone, Debug)]
struct Reservation {
    requester: String,
    held: u64,
    open: bool,
}

/// An in-memory two-phase ledger: applies [`LedgerOp`]s idempotently and checks conservation.
#[derive(Clone, Debug, Default)]
pub struct EscrowBook {
    balances: BTreeMap<String, u64>,
    reservations: BTreeMap<TransferId, Reservation>,
    applied: BTreeMap<TransferId, LedgerOp>,
    minted: u64,
}

/// The fee account's name in the book.
pub const FEE_ACCOUNT: &str = "relay-fees";

impl EscrowBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Credits `amount` to `account` from issuance.
    pub fn mint(&mut self, account: &str, amount: u64) {
        *self.balances.entry(account.to_owned()).or_default() += amount;
        self.minted += amount;
    }

    /// The available balance of `account`.
    pub fn balance(&self, account: &str) -> u64 {
        self.balances.get(account).copied().unwrap_or(0)
    }

    /// Every account's available balance, in account-name order.
    pub fn balances(&self) -> impl Iterator<Item = (&str, u64)> {
        self.balances.iter().map(|(account, balance)| (account.as_str(), *balance))
    }

    /// Credits held in open reservations.
    pub fn held(&self) -> u64 {
        self.reservations.values().filter(|r| r.open).map(|r| r.held).sum()
    }

    /// Whether the reservation is still open.
    pub fn is_open(&self, id: TransferId) -> bool {
        self.reservations.get(&id).is_some_and(|r| r.open)
    }

    /// Applies `op`; repeating an applied op with the same fields is a no-op.
    pub fn apply(&mut self, op: &LedgerOp) -> Result<(), BookError> {
        if let Some(existing) = self.applied.get(&op.id()) {
            return if existing == op { Ok(()) } else { Err(BookError::IdReused(op.id())) };
        }
        match op {
            LedgerOp::Reserve { id, requester, amount, .. } => {
                let available = self.balance(requester);
                if available < *amount {
                    return Err(BookError::InsufficientFunds {
                        account: requester.clone(),
                        need: *amount,
                        available,
                        short: amount - available,
                    });
                }
                self.balances.insert(requester.clone(), available - amount);
                self.reservations.insert(
                    *id,
                    Reservation { requester: requester.clone(), held: *amount, open: true },
                );
            }
            LedgerOp::Pay { reserve_id, node, amount, fee, .. } => {
                let r = self.open_reservation(*reserve_id)?;
                let need = amount + fee;
                if need > r.held {
                    return Err(BookError::Overdraw { id: *reserve_id, need, held: r.held });
                }
                r.held -= need;
                *self.balances.entry(node.account_name()).or_default() += amount;
                *self.balances.entry(FEE_ACCOUNT.to_owned()).or_default() += fee;
            }
            LedgerOp::Release { reserve_id, amount, .. } => {
                let r = self.open_reservation(*reserve_id)?;
                if *amount != r.held {
                    return Err(BookError::ReleaseMismatch { amount: *amount, held: r.held });
                }
                r.open = false;
                r.held = 0;
                let requester = r.requester.clone();
                *self.balances.entry(requester).or_default() += amount;
            }
        }
        self.applied.insert(op.id(), op.clone());
        Ok(())
    }

    fn open_reservation(&mut self, id: TransferId) -> Result<&mut Reservation, BookError> {
        match self.reservations.get_mut(&id) {
            Some(r) if r.open => Ok(r),
            _ => Err(BookError::NotOpen(id)),
        }
    }

    /// Checks that every minted credit is in exactly one balance or reservation.
    pub fn assert_conserved(&self) {
        let total: u64 = self.balances.values().sum::<u64>() + self.held();
        assert_eq!(total, self.minted, "credits not conserved: {total} != minted {}", self.minted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_pay_release_conserves_and_is_idempotent() {
        let job = JobId([1; 16]);
        let node = crate::identity::Keypair::from_secret_bytes([3; 32]).public();
        let mut book = EscrowBook::new();
        book.mint("alice", 100);
        let rid = TransferId::derive(job, "reserve", &[]);
        let reserve = LedgerOp::Reserve {
            id: rid,
            job_id: job,
            requester: "alice".into(),
            amount: 30,
            timeout_at_ms: 0,
        };
        book.apply(&reserve).unwrap();
        book.apply(&reserve).unwrap();
        assert_eq!(book.balance("alice"), 70);
        let pay = LedgerOp::Pay {
            id: TransferId::derive(job, "pay", &[node.as_bytes()]),
            reserve_id: rid,
            job_id: job,
            node,
            amount: 18,
            fee: 2,
        };
        book.apply(&pay).unwrap();
        book.apply(&pay).unwrap();
        let release = LedgerOp::Release {
            id: TransferId::derive(job, "release", &[]),
            reserve_id: rid,
            job_id: job,
            amount: 10,
        };
        book.apply(&release).unwrap();
        assert_eq!(book.balance("alice"), 80);
        assert_eq!(book.balance(&node.account_name()), 18);
        assert_eq!(book.balance(FEE_ACCOUNT), 2);
        book.assert_conserved();
        assert!(!book.is_open(rid));
    }

    #[test]
    fn short_reservations_say_by_how_much() {
        let mut book = EscrowBook::new();
        book.mint("bob", 5);
        let op = LedgerOp::Reserve {
            id: TransferId(1),
            job_id: JobId([0; 16]),
            requester: "bob".into(),
            amount: 8,
            timeout_at_ms: 0,
        };
        assert!(matches!(book.apply(&op), Err(BookError::InsufficientFunds { short: 3, .. })));
    }
}
