//! The ledger's state machine: accounts, reservations and the rules for each operation.
//!
//! Pure and deterministic: no clock, no storage. The relay's writer thread (in `studio-relay`)
//! feeds it operations and persists the [`Entry`] each accepted operation yields; recovery and
//! audit replay those entries through a fresh state to recompute every balance. The simulator
//! and the lifecycle tests apply the cores' instructions to it in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::LedgerOp;

/// The account minted credits come from. Its balance is the negative of all credits in existence.
pub const ISSUANCE_ACCOUNT: &str = "issuance";
/// The account that holds reserved credits between a reservation and its posts or void.
pub const ESCROW_ACCOUNT: &str = "escrow";
pub use super::FEE_ACCOUNT;

/// Longest account name accepted, in bytes.
pub const ACCOUNT_NAME_LEN_MAX: usize = 128;

/// One account's totals, in the TigerBeetle style: four monotonic-ish u128 counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Credits that left this account for good.
    pub debits_posted: u128,
    /// Credits that arrived for good.
    pub credits_posted: u128,
    /// Credits held out of this account by open reservations.
    pub debits_pending: u128,
    /// Credits held for this account by open reservations (only the escrow account has these).
    pub credits_pending: u128,
}

impl Account {
    /// `credits_posted - debits_posted - debits_pending`; negative only for the issuance account.
    pub fn available(&self) -> i128 {
        to_i128(self.credits_posted) - to_i128(self.debits_posted) - to_i128(self.debits_pending)
    }
}

fn to_i128(v: u128) -> i128 {
    i128::try_from(v).unwrap_or(i128::MAX)
}

/// An operation as recorded in the log: everything needed to replay it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Credit `amount` to `account` from the issuance account.
    Mint {
        /// Caller-chosen transfer id.
        id: u128,
        /// Account credited.
        account: String,
        /// Credits minted.
        amount: u64,
        /// Free text kept with the transfer.
        memo: String,
    },
    /// Hold `amount` from `requester` (a pending transfer into escrow).
    Reserve {
        /// Caller-chosen transfer id; also the reservation's id.
        id: u128,
        /// The job.
        job_id: [u8; 16],
        /// Account debited.
        requester: String,
        /// Credits held.
        amount: u64,
        /// After this instant the ledger voids what is still held by itself.
        timeout_at_ms: u64,
    },
    /// Post `amount + fee` of a reservation: `amount` to `node`, `fee` to the fee account, linked.
    Pay {
        /// Caller-chosen transfer id.
        id: u128,
        /// The reservation paid from.
        reserve_id: u128,
        /// The job.
        job_id: [u8; 16],
        /// The node's account (its PeerId string).
        node: String,
        /// Credits to the node.
        amount: u64,
        /// Credits to the relay fee account.
        fee: u64,
    },
    /// Void the rest of a reservation (exactly `amount`) back to the requester and close it.
    Release {
        /// Caller-chosen transfer id.
        id: u128,
        /// The reservation closed.
        reserve_id: u128,
        /// The job.
        job_id: [u8; 16],
        /// Credits returned; must equal what is still held.
        amount: u64,
    },
    /// The ledger voided a reservation past its timeout (recorded by `expire(now)`).
    Expire {
        /// The reservation voided.
        reserve_id: u128,
        /// The `now` the expiry ran at.
        now_ms: u64,
    },
}

impl Op {
    /// The caller-chosen id; `None` for expiries, which the ledger itself records.
    pub fn id(&self) -> Option<u128> {
        match self {
            Self::Mint { id, .. }
            | Self::Reserve { id, .. }
            | Self::Pay { id, .. }
            | Self::Release { id, .. } => Some(*id),
            Self::Expire { .. } => None,
        }
    }

    /// The job it belongs to, if any.
    pub fn job_id(&self) -> Option<[u8; 16]> {
        match self {
            Self::Reserve { job_id, .. }
            | Self::Pay { job_id, .. }
            | Self::Release { job_id, .. } => Some(*job_id),
            Self::Mint { .. } | Self::Expire { .. } => None,
        }
    }

    /// The reservation the op resolves or creates, if any.
    pub fn reserve_id(&self) -> Option<u128> {
        match self {
            Self::Reserve { id, .. } => Some(*id),
            Self::Pay { reserve_id, .. }
            | Self::Release { reserve_id, .. }
            | Self::Expire { reserve_id, .. } => Some(*reserve_id),
            Self::Mint { .. } => None,
        }
    }

    /// A short lowercase name: `mint`, `reserve`, `pay`, `release`, `expire`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Mint { .. } => "mint",
            Self::Reserve { .. } => "reserve",
            Self::Pay { .. } => "pay",
            Self::Release { .. } => "release",
            Self::Expire { .. } => "expire",
        }
    }
}

/// How a leg moves credits between its two accounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LegKind {
    /// A posted transfer: debits_posted / credits_posted.
    Posted,
    /// A new pending transfer: debits_pending / credits_pending.
    Pending,
    /// Posting (part of) a pending transfer: pending moves to posted on both sides.
    PostPending,
    /// Voiding (the rest of) a pending transfer: pending goes back on both sides.
    VoidPending,
}

impl LegKind {
    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Posted => "posted",
            Self::Pending => "pending",
            Self::PostPending => "post_pending",
            Self::VoidPending => "void_pending",
        }
    }
}

/// One double-entry movement: `amount` debited from `debit` and credited to `credit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg {
    /// What the leg does to the counters.
    pub kind: LegKind,
    /// Account debited.
    pub debit: String,
    /// Account credited.
    pub credit: String,
    /// Credits moved.
    pub amount: u128,
}

/// One accepted operation: its place in the log, the op, and the legs it produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// The operation.
    pub op: Op,
    /// The movements it made, applied together or not at all (linked).
    pub legs: Vec<Leg>,
}

/// Why an operation was refused. Nothing was recorded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// The id was used before with different fields.
    #[error("transfer id {id} was already used for a different transfer ({existing})")]
    IdReused {
        /// The id.
        id: u128,
        /// A short description of the existing transfer.
        existing: String,
    },
    /// The requester cannot cover the reservation.
    #[error(
        "insufficient funds: {account} needs {need}, has {available} available (short by {short})"
    )]
    InsufficientFunds {
        /// Account.
        account: String,
        /// Amount asked.
        need: u128,
        /// Available balance.
        available: u128,
        /// `need - available`.
        short: u128,
    },
    /// The reservation does not exist or is closed.
    #[error("reservation {reserve_id} is {state}")]
    NotOpen {
        /// Reservation id.
        reserve_id: u128,
        /// `unknown`, `released` or `expired`.
        state: &'static str,
    },
    /// Paying would exceed what the reservation still holds.
    #[error("paying {need} exceeds the {held} still held in reservation {reserve_id}")]
    Overdraw {
        /// Reservation id.
        reserve_id: u128,
        /// `amount + fee`.
        need: u128,
        /// Still held.
        held: u128,
    },
    /// A release must return exactly what is still held.
    #[error(
        "release of {amount} does not match the {held} still held in reservation {reserve_id}"
    )]
    ReleaseMismatch {
        /// Reservation id.
        reserve_id: u128,
        /// Amount in the op.
        amount: u128,
        /// Still held.
        held: u128,
    },
    /// The job id of a pay or release is not the reservation's.
    #[error("job id does not match the job of reservation {reserve_id}")]
    JobMismatch {
        /// Reservation id.
        reserve_id: u128,
    },
    /// The account name is not usable here.
    #[error("account name {name:?} is not allowed here: {why}")]
    BadAccount {
        /// The name.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// An expiry record names a reservation that was not due (only possible in a forged log).
    #[error("reservation {reserve_id} is not past its timeout at {now_ms}")]
    NotDue {
        /// Reservation id.
        reserve_id: u128,
        /// The expiry's `now`.
        now_ms: u64,
    },
    /// A counter would overflow u128.
    #[error("amount overflows the account counters")]
    Overflow,
}

/// What an accepted (or repeated) operation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Recorded now, at this log position.
    Recorded(u64),
    /// The same op was recorded before at this position; nothing changed.
    Existing(u64),
}

impl Applied {
    /// The log position of the transfer.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Recorded(seq) | Self::Existing(seq) => *seq,
        }
    }
}

/// How a reservation ended, if it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Closed {
    /// Still open.
    Open,
    /// Closed by a release.
    Released,
    /// Voided by expiry.
    Expired,
}

/// A reservation's running state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The job.
    pub job_id: [u8; 16],
    /// Account the credits are held from.
    pub requester: String,
    /// Credits reserved.
    pub amount: u128,
    /// Credits posted so far (node amounts and fees).
    pub posted: u128,
    /// Credits voided back (release or expiry); set once, when it closes.
    pub voided: u128,
    /// Timeout instant.
    pub timeout_at_ms: u64,
    /// Whether and how it closed.
    pub closed: Closed,
}

impl Reservation {
    /// Credits still held.
    pub fn held(&self) -> u128 {
        self.amount - self.posted - self.voided
    }
}

/// Accounts, reservations and the id index; the ledger's whole logical state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerState {
    accounts: BTreeMap<String, Account>,
    reservations: BTreeMap<u128, Reservation>,
    /// Open reservations by (timeout, id), for `expire`.
    timeouts: BTreeSet<(u64, u128)>,
    ids: HashMap<u128, (u64, Op)>,
    last_seq: u64,
}

impl LedgerState {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// The position of the last recorded entry (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Every account that was ever touched.
    pub fn accounts(&self) -> &BTreeMap<String, Account> {
        &self.accounts
    }

    /// One account (all zero when never touched).
    pub fn account(&self, name: &str) -> Account {
        self.accounts.get(name).copied().unwrap_or_default()
    }

    /// Every reservation, open or closed.
    pub fn reservations(&self) -> &BTreeMap<u128, Reservation> {
        &self.reservations
    }

    /// Applies a caller's op (not an expiry). On `Recorded`, `out` receives the new entry.
    pub fn apply(&mut self, op: Op, out: &mut Vec<Entry>) -> Result<Applied, OpError> {
        if let Some(id) = op.id() {
            if let Some((seq, existing)) = self.ids.get(&id) {
                return if *existing == op {
                    Ok(Applied::Existing(*seq))
                } else {
                    Err(OpError::IdReused { id, existing: describe(existing) })
                };
            }
        }
        let legs = self.check(&op)?;
        let entry = self.commit(op, legs);
        let seq = entry.seq;
        out.push(entry);
        Ok(Applied::Recorded(seq))
    }

    /// Applies a core's instruction and keeps no log: for drivers that hold the ledger only in
    /// memory (the simulator, the lifecycle tests).
    pub fn apply_instruction(&mut self, op: &LedgerOp) -> Result<Applied, OpError> {
        self.apply(Op::from(op), &mut Vec::new())
    }

    /// Credits held in open reservations (the escrow account's pending credits).
    pub fn held(&self) -> u128 {
        self.account(ESCROW_ACCOUNT).credits_pending
    }

    /// Voids every open reservation whose timeout is before `now_ms`; pushes one entry each.
    pub fn expire(&mut self, now_ms: u64, out: &mut Vec<Entry>) -> Vec<u128> {
        let due: Vec<u128> =
            self.timeouts.range(..(now_ms, 0)).map(|&(_, reserve_id)| reserve_id).collect();
        for &reserve_id in &due {
            let op = Op::Expire { reserve_id, now_ms };
            let legs = match self.check(&op) {
                Ok(legs) => legs,
                Err(err) => panic!("a due reservation must expire cleanly: {err}"),
            };
            out.push(self.commit(op, legs));
        }
        due
    }

    /// Replays a recorded entry: the op must be accepted and yield exactly the recorded legs at
    /// the next position. Used by recovery and audit.
    pub fn replay(&mut self, entry: &Entry) -> Result<(), String> {
        if entry.seq != self.last_seq + 1 {
            return Err(format!("entry {} follows entry {}", entry.seq, self.last_seq));
        }
        if let Some(id) = entry.op.id() {
            if let Some((seq, _)) = self.ids.get(&id) {
                return Err(format!(
                    "entry {} reuses transfer id {id} of entry {seq}; ids are recorded once",
                    entry.seq
                ));
            }
        }
        let legs = self.check(&entry.op).map_err(|err| {
            format!("entry {} ({}) would be refused: {err}", entry.seq, entry.op.kind())
        })?;
        if legs != entry.legs {
            return Err(format!(
                "entry {} ({}) records legs {:?} but replaying it gives {:?}",
                entry.seq,
                entry.op.kind(),
                entry.legs,
                legs
            ));
        }
        self.commit(entry.op.clone(), legs);
        Ok(())
    }

    /// Validates `op` against the current state and returns the legs it would make.
    fn check(&self, op: &Op) -> Result<Vec<Leg>, OpError> {
        let legs = match op {
            Op::Mint { account, amount, .. } => {
                user_account(account)?;
                vec![leg(LegKind::Posted, ISSUANCE_ACCOUNT, account, *amount)]
            }
            Op::Reserve { requester, amount, .. } => {
                user_account(requester)?;
                let account = self.account(requester);
                let available = u128::try_from(account.available()).unwrap_or(0);
                let need = u128::from(*amount);
                if available < need {
                    return Err(OpError::InsufficientFunds {
                        account: requester.clone(),
                        need,
                        available,
                        short: need - available,
                    });
                }
                vec![leg(LegKind::Pending, requester, ESCROW_ACCOUNT, *amount)]
            }
            Op::Pay { reserve_id, job_id, node, amount, fee, .. } => {
                user_account(node)?;
                let r = self.open_reservation(*reserve_id, Some(job_id))?;
                let need = u128::from(*amount) + u128::from(*fee);
                if need > r.held() {
                    return Err(OpError::Overdraw {
                        reserve_id: *reserve_id,
                        need,
                        held: r.held(),
                    });
                }
                let mut legs = vec![Leg {
                    kind: LegKind::PostPending,
                    debit: r.requester.clone(),
                    credit: ESCROW_ACCOUNT.to_owned(),
                    amount: need,
                }];
                legs.push(leg(LegKind::Posted, ESCROW_ACCOUNT, node, *amount));
                if *fee > 0 {
                    legs.push(leg(LegKind::Posted, ESCROW_ACCOUNT, FEE_ACCOUNT, *fee));
                }
                legs
            }
            Op::Release { reserve_id, job_id, amount, .. } => {
                let r = self.open_reservation(*reserve_id, Some(job_id))?;
                if u128::from(*amount) != r.held() {
                    return Err(OpError::ReleaseMismatch {
                        reserve_id: *reserve_id,
                        amount: u128::from(*amount),
                        held: r.held(),
                    });
                }
                vec![Leg {
                    kind: LegKind::VoidPending,
                    debit: r.requester.clone(),
                    credit: ESCROW_ACCOUNT.to_owned(),
                    amount: r.held(),
                }]
            }
            Op::Expire { reserve_id, now_ms } => {
                let r = self.open_reservation(*reserve_id, None)?;
                if r.timeout_at_ms >= *now_ms {
                    return Err(OpError::NotDue { reserve_id: *reserve_id, now_ms: *now_ms });
                }
                vec![Leg {
                    kind: LegKind::VoidPending,
                    debit: r.requester.clone(),
                    credit: ESCROW_ACCOUNT.to_owned(),
                    amount: r.held(),
                }]
            }
        };
        // Linked legs: check every counter of every leg before changing any.
        let mut trial: BTreeMap<&str, Account> = BTreeMap::new();
        for l in &legs {
            for name in [l.debit.as_str(), l.credit.as_str()] {
                trial.entry(name).or_insert_with(|| self.account(name));
            }
        }
        for l in &legs {
            apply_leg_to(&mut trial, l).ok_or(OpError::Overflow)?;
        }
        Ok(legs)
    }

    fn open_reservation(
        &self,
        reserve_id: u128,
        job_id: Option<&[u8; 16]>,
    ) -> Result<&Reservation, OpError> {
        let Some(r) = self.reservations.get(&reserve_id) else {
            return Err(OpError::NotOpen { reserve_id, state: "unknown" });
        };
        match r.closed {
            Closed::Open => {}
            Closed::Released => return Err(OpError::NotOpen { reserve_id, state: "released" }),
            Closed::Expired => return Err(OpError::NotOpen { reserve_id, state: "expired" }),
        }
        if job_id.is_some_and(|j| *j != r.job_id) {
            return Err(OpError::JobMismatch { reserve_id });
        }
        Ok(r)
    }

    /// Applies checked legs and the op's effect on reservations; returns the new entry.
    fn commit(&mut self, op: Op, legs: Vec<Leg>) -> Entry {
        for l in &legs {
            let mut pair: BTreeMap<&str, Account> = BTreeMap::new();
            for name in [l.debit.as_str(), l.credit.as_str()] {
                pair.insert(name, self.account(name));
            }
            assert!(apply_leg_to(&mut pair, l).is_some(), "checked legs cannot overflow");
            for (name, account) in pair {
                self.accounts.insert(name.to_owned(), account);
            }
        }
        match &op {
            Op::Reserve { id, job_id, requester, amount, timeout_at_ms } => {
                let previous = self.reservations.insert(
                    *id,
                    Reservation {
                        job_id: *job_id,
                        requester: requester.clone(),
                        amount: u128::from(*amount),
                        posted: 0,
                        voided: 0,
                        timeout_at_ms: *timeout_at_ms,
                        closed: Closed::Open,
                    },
                );
                assert!(previous.is_none(), "a reservation id is recorded once");
                self.timeouts.insert((*timeout_at_ms, *id));
            }
            Op::Pay { reserve_id, amount, fee, .. } => {
                let r = self.reservation_mut(*reserve_id);
                r.posted += u128::from(*amount) + u128::from(*fee);
            }
            Op::Release { reserve_id, .. } | Op::Expire { reserve_id, .. } => {
                let expired = matches!(op, Op::Expire { .. });
                let r = self.reservation_mut(*reserve_id);
                assert_eq!(r.closed, Closed::Open, "a reservation resolves at most once");
                r.voided = r.held();
                r.closed = if expired { Closed::Expired } else { Closed::Released };
                let key = (r.timeout_at_ms, *reserve_id);
                self.timeouts.remove(&key);
            }
            Op::Mint { .. } => {}
        }
        self.last_seq += 1;
        if let Some(id) = op.id() {
            self.ids.insert(id, (self.last_seq, op.clone()));
        }
        Entry { seq: self.last_seq, op, legs }
    }

    fn reservation_mut(&mut self, reserve_id: u128) -> &mut Reservation {
        match self.reservations.get_mut(&reserve_id) {
            Some(r) => r,
            None => panic!("checked op names a known reservation {reserve_id}"),
        }
    }

    /// Checks the invariants; returns every violation found (empty when clean).
    pub fn violations(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut sums = [0u128; 4];
        for (name, a) in &self.accounts {
            for (sum, v) in sums.iter_mut().zip([
                a.debits_posted,
                a.credits_posted,
                a.debits_pending,
                a.credits_pending,
            ]) {
                *sum = sum.saturating_add(v);
            }
            if name != ISSUANCE_ACCOUNT && a.available() < 0 {
                found.push(format!(
                    "account {name} has a negative available balance {}",
                    a.available()
                ));
            }
        }
        if sums[0] != sums[1] {
            found.push(format!("posted debits {} != posted credits {}", sums[0], sums[1]));
        }
        if sums[2] != sums[3] {
            found.push(format!("pending debits {} != pending credits {}", sums[2], sums[3]));
        }
        let escrow = self.account(ESCROW_ACCOUNT);
        if escrow.debits_posted != escrow.credits_posted {
            found.push(format!(
                "escrow posted {} in but {} out",
                escrow.credits_posted, escrow.debits_posted
            ));
        }
        let mut held_by: BTreeMap<&str, u128> = BTreeMap::new();
        let mut held_total = 0u128;
        for (id, r) in &self.reservations {
            if r.posted + r.voided > r.amount {
                found.push(format!(
                    "reservation {id} resolved {} of {}",
                    r.posted + r.voided,
                    r.amount
                ));
                continue;
            }
            if r.closed == Closed::Open && r.voided != 0 {
                found.push(format!("open reservation {id} has voided credits"));
            }
            if r.closed != Closed::Open && r.held() != 0 {
                found.push(format!("closed reservation {id} still holds {}", r.held()));
            }
            *held_by.entry(r.requester.as_str()).or_default() += r.held();
            held_total += r.held();
        }
        if escrow.credits_pending != held_total {
            found.push(format!(
                "escrow pending {} != {} held by open reservations",
                escrow.credits_pending, held_total
            ));
        }
        for (name, a) in &self.accounts {
            let held = held_by.get(name.as_str()).copied().unwrap_or(0);
            if name != ESCROW_ACCOUNT && a.debits_pending != held {
                found.push(format!(
                    "account {name} has {} pending debits but its reservations hold {held}",
                    a.debits_pending
                ));
            }
        }
        found
    }
}

fn leg(kind: LegKind, debit: &str, credit: &str, amount: u64) -> Leg {
    Leg { kind, debit: debit.to_owned(), credit: credit.to_owned(), amount: u128::from(amount) }
}

/// Applies one leg to the accounts in `accounts` (which must hold both); `None` on under- or
/// overflow, leaving `accounts` partly changed (callers use a scratch copy).
fn apply_leg_to(accounts: &mut BTreeMap<&str, Account>, l: &Leg) -> Option<()> {
    let amount = l.amount;
    let debit = accounts.get_mut(l.debit.as_str())?;
    match l.kind {
        LegKind::Posted => debit.debits_posted = debit.debits_posted.checked_add(amount)?,
        LegKind::Pending => debit.debits_pending = debit.debits_pending.checked_add(amount)?,
        LegKind::PostPending => {
            debit.debits_pending = debit.debits_pending.checked_sub(amount)?;
            debit.debits_posted = debit.debits_posted.checked_add(amount)?;
        }
        LegKind::VoidPending => debit.debits_pending = debit.debits_pending.checked_sub(amount)?,
    }
    let credit = accounts.get_mut(l.credit.as_str())?;
    match l.kind {
        LegKind::Posted => credit.credits_posted = credit.credits_posted.checked_add(amount)?,
        LegKind::Pending => credit.credits_pending = credit.credits_pending.checked_add(amount)?,
        LegKind::PostPending => {
            credit.credits_pending = credit.credits_pending.checked_sub(amount)?;
            credit.credits_posted = credit.credits_posted.checked_add(amount)?;
        }
        LegKind::VoidPending => {
            credit.credits_pending = credit.credits_pending.checked_sub(amount)?
        }
    }
    Some(())
}

/// Adds one leg to account totals computed from legs alone (the audit's independent sum).
/// Wrapping arithmetic: a damaged log shows up as a mismatch, not a panic.
pub fn add_leg(accounts: &mut BTreeMap<String, Account>, l: &Leg) {
    let a = l.amount;
    let d = accounts.entry(l.debit.clone()).or_default();
    match l.kind {
        LegKind::Posted => d.debits_posted = d.debits_posted.wrapping_add(a),
        LegKind::Pending => d.debits_pending = d.debits_pending.wrapping_add(a),
        LegKind::PostPending => {
            d.debits_pending = d.debits_pending.wrapping_sub(a);
            d.debits_posted = d.debits_posted.wrapping_add(a);
        }
        LegKind::VoidPending => d.debits_pending = d.debits_pending.wrapping_sub(a),
    }
    let c = accounts.entry(l.credit.clone()).or_default();
    match l.kind {
        LegKind::Posted => c.credits_posted = c.credits_posted.wrapping_add(a),
        LegKind::Pending => c.credits_pending = c.credits_pending.wrapping_add(a),
        LegKind::PostPending => {
            c.credits_pending = c.credits_pending.wrapping_sub(a);
            c.credits_posted = c.credits_posted.wrapping_add(a);
        }
        LegKind::VoidPending => c.credits_pending = c.credits_pending.wrapping_sub(a),
    }
}

fn user_account(name: &str) -> Result<(), OpError> {
    let bad = |why| Err(OpError::BadAccount { name: name.to_owned(), why });
    if name == ISSUANCE_ACCOUNT || name == ESCROW_ACCOUNT {
        return bad("it is a system account");
    }
    if name.is_empty() || name.len() > ACCOUNT_NAME_LEN_MAX {
        return bad("names are 1 to 128 bytes");
    }
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("names have no spaces or control characters");
    }
    Ok(())
}

fn describe(op: &Op) -> String {
    match op {
        Op::Mint { account, amount, .. } => format!("mint of {amount} to {account}"),
        Op::Reserve { requester, amount, .. } => format!("reserve of {amount} from {requester}"),
        Op::Pay { node, amount, fee, .. } => format!("pay of {amount} + fee {fee} to {node}"),
        Op::Release { reserve_id, amount, .. } => {
            format!("release of {amount} from reservation {reserve_id}")
        }
        Op::Expire { reserve_id, .. } => format!("expiry of reservation {reserve_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mint(id: u128, account: &str, amount: u64) -> Op {
        Op::Mint { id, account: account.into(), amount, memo: String::new() }
    }

    #[test]
    fn reserve_pay_release_moves_credits_and_keeps_invariants() {
        let mut s = LedgerState::new();
        let mut out = Vec::new();
        s.apply(mint(1, "alice", 100), &mut out).unwrap();
        let reserve = Op::Reserve {
            id: 2,
            job_id: [7; 16],
            requester: "alice".into(),
            amount: 60,
            timeout_at_ms: 10,
        };
        s.apply(reserve.clone(), &mut out).unwrap();
        assert_eq!(s.account("alice").available(), 40);
        let pay = Op::Pay {
            id: 3,
            reserve_id: 2,
            job_id: [7; 16],
            node: "n1".into(),
            amount: 30,
            fee: 3,
        };
        assert_eq!(s.apply(pay.clone(), &mut out).unwrap(), Applied::Recorded(3));
        assert_eq!(s.apply(pay, &mut out).unwrap(), Applied::Existing(3));
        s.apply(Op::Release { id: 4, reserve_id: 2, job_id: [7; 16], amount: 27 }, &mut out)
            .unwrap();
        assert_eq!(s.account("alice").available(), 67);
        assert_eq!(s.account("n1").available(), 30);
        assert_eq!(s.account(FEE_ACCOUNT).available(), 3);
        assert!(s.violations().is_empty(), "{:?}", s.violations());
        assert!(matches!(
            s.apply(Op::Release { id: 5, reserve_id: 2, job_id: [7; 16], amount: 0 }, &mut out),
            Err(OpError::NotOpen { state: "released", .. })
        ));
        let mut replayed = LedgerState::new();
        for e in &out {
            replayed.replay(e).unwrap();
        }
        assert_eq!(replayed, s);
    }

    #[test]
    fn short_reservations_say_by_how_much_and_reused_ids_are_refused() {
        let mut s = LedgerState::new();
        let mut out = Vec::new();
        s.apply(mint(1, "bob", 5), &mut out).unwrap();
        let r = Op::Reserve {
            id: 2,
            job_id: [0; 16],
            requester: "bob".into(),
            amount: 8,
            timeout_at_ms: 0,
        };
        assert!(matches!(s.apply(r, &mut out), Err(OpError::InsufficientFunds { short: 3, .. })));
        assert!(matches!(
            s.apply(mint(1, "bob", 6), &mut out),
            Err(OpError::IdReused { id: 1, .. })
        ));
    }

    #[test]
    fn expiry_voids_what_is_held_once() {
        let mut s = LedgerState::new();
        let mut out = Vec::new();
        s.apply(mint(1, "carol", 50), &mut out).unwrap();
        let r = Op::Reserve {
            id: 2,
            job_id: [1; 16],
            requester: "carol".into(),
            amount: 50,
            timeout_at_ms: 100,
        };
        s.apply(r, &mut out).unwrap();
        assert!(s.expire(100, &mut out).is_empty());
        assert_eq!(s.expire(101, &mut out), vec![2]);
        assert!(s.expire(1000, &mut out).is_empty());
        assert_eq!(s.account("carol").available(), 50);
        let pay =
            Op::Pay { id: 3, reserve_id: 2, job_id: [1; 16], node: "n".into(), amount: 1, fee: 0 };
        assert!(matches!(s.apply(pay, &mut out), Err(OpError::NotOpen { state: "expired", .. })));
    }
}
