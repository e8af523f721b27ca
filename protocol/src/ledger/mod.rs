//! Ledger instructions the relay core emits, and an in-memory book that applies them.
//!
//! Every transition that moves credits emits a [`LedgerOp`] with an idempotency id
//! ([`TransferId`]) derived from the job and the step, so a driver that crashes and replays
//! a step issues the same id and the ledger returns the existing transfer instead of paying
//! twice. The escrow is two-phase (TigerBeetle-style): [`LedgerOp::Reserve`] holds the job's
//! whole budget, [`LedgerOp::Pay`] posts part of it to a node (with the relay fee, linked), and
//! [`LedgerOp::Release`] returns the rest to the requester and closes the reservation.
//!
//! The ledger itself is [`LedgerState`] ([`state`]): accounts with TigerBeetle's four
//! counters, reservations and the rules of every operation, with no clock and no storage. The
//! Studio relay persists the [`Entry`] each accepted operation yields (its sled store and
//! writer thread live in `studio-relay`); the simulator and the lifecycle tests apply the same
//! operations to the same state machine in memory, so what they show about credits holds for
//! the ledger that ships. [`Op::from`] turns a core's [`LedgerOp`] into the ledger's [`Op`].

pub mod state;

pub use state::{
    add_leg, Account, Applied, Closed, Entry, LedgerState, Leg, LegKind, Op, OpError, Reservation,
    ACCOUNT_NAME_LEN_MAX, ESCROW_ACCOUNT, ISSUANCE_ACCOUNT,
};

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

    /// The id of `job`'s reservation, which its payments and its release name too.
    pub fn reserve_of(job: JobId) -> Self {
        Self::derive(job, "reserve", &[])
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
    /// The instruction that closes `job_id`'s reservation, returning `amount` (everything it
    /// still holds) to the requester: the one release a job ever has.
    pub fn release(job_id: JobId, amount: u64) -> Self {
        Self::Release {
            id: TransferId::derive(job_id, "release", &[]),
            reserve_id: TransferId::reserve_of(job_id),
            job_id,
            amount,
        }
    }

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

/// The fee account's name in the ledger.
pub const FEE_ACCOUNT: &str = "relay-fees";

impl From<&LedgerOp> for Op {
    fn from(op: &LedgerOp) -> Self {
        match op {
            LedgerOp::Reserve { id, job_id, requester, amount, timeout_at_ms } => Self::Reserve {
                id: id.0,
                job_id: job_id.0,
                requester: requester.clone(),
                amount: *amount,
                timeout_at_ms: *timeout_at_ms,
            },
            LedgerOp::Pay { id, reserve_id, job_id, node, amount, fee } => Self::Pay {
                id: id.0,
                reserve_id: reserve_id.0,
                job_id: job_id.0,
                node: node.account_name(),
                amount: *amount,
                fee: *fee,
            },
            LedgerOp::Release { id, reserve_id, job_id, amount } => Self::Release {
                id: id.0,
                reserve_id: reserve_id.0,
                job_id: job_id.0,
                amount: *amount,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_core_s_instructions_move_credits_in_the_ledger_and_repeat_harmlessly() {
        let job = JobId([1; 16]);
        let node = crate::identity::Keypair::from_secret_bytes([3; 32]).public();
        let mut ledger = LedgerState::new();
        let mut entries = Vec::new();
        let mint = Op::Mint { id: 1, account: "alice".into(), amount: 100, memo: String::new() };
        ledger.apply(mint, &mut entries).unwrap();
        let rid = TransferId::derive(job, "reserve", &[]);
        let reserve = LedgerOp::Reserve {
            id: rid,
            job_id: job,
            requester: "alice".into(),
            amount: 30,
            timeout_at_ms: 0,
        };
        let pay = LedgerOp::Pay {
            id: TransferId::derive(job, "pay", &[node.as_bytes()]),
            reserve_id: rid,
            job_id: job,
            node,
            amount: 18,
            fee: 2,
        };
        let release = LedgerOp::Release {
            id: TransferId::derive(job, "release", &[]),
            reserve_id: rid,
            job_id: job,
            amount: 10,
        };
        for op in [&reserve, &reserve, &pay, &pay, &release] {
            ledger.apply(Op::from(op), &mut entries).unwrap();
        }
        assert_eq!(entries.len(), 4, "a repeated instruction records nothing");
        assert_eq!(ledger.account("alice").available(), 80);
        assert_eq!(ledger.account(&node.account_name()).available(), 18);
        assert_eq!(ledger.account(FEE_ACCOUNT).available(), 2);
        assert_eq!(ledger.reservations()[&rid.0].closed, Closed::Released);
        assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
    }
}
