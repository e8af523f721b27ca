//! Property tests: random sequences of mint / reserve / pay / release / expire across many
//! accounts, with retries of the same ids (same fields and changed fields). After every step the
//! invariants hold; at the end the balances equal a replay of the log, in memory and on disk.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;
use studio_relay::ledger::{
    add_leg, Account, Applied, Entry, Ledger, LedgerError, LedgerState, Op, OpError,
    ESCROW_ACCOUNT, ISSUANCE_ACCOUNT,
};

const ACCOUNTS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];
const NODES: [&str; 3] = ["12D3KooWnodeA", "12D3KooWnodeB", "relay-fees"];

#[derive(Clone, Debug)]
enum Step {
    Mint {
        account: usize,
        amount: u64,
    },
    Reserve {
        account: usize,
        amount: u64,
        timeout_at_ms: u64,
    },
    Pay {
        reserve: usize,
        node: usize,
        amount: u64,
        fee: u64,
    },
    /// Release what is held (`exact`) or a random amount.
    Release {
        reserve: usize,
        exact: bool,
        amount: u64,
    },
    Expire {
        now_ms: u64,
    },
    /// Resubmit an earlier op unchanged.
    Retry {
        index: usize,
    },
    /// Resubmit an earlier op's id with a different amount.
    Reuse {
        index: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..ACCOUNTS.len(), 0..500u64).prop_map(|(account, amount)| Step::Mint { account, amount }),
        3 => (0..ACCOUNTS.len(), 0..300u64, 0..100u64)
            .prop_map(|(account, amount, timeout_at_ms)| Step::Reserve { account, amount, timeout_at_ms }),
        3 => (any::<usize>(), 0..NODES.len(), 0..120u64, 0..20u64)
            .prop_map(|(reserve, node, amount, fee)| Step::Pay { reserve, node, amount, fee }),
        2 => (any::<usize>(), any::<bool>(), 0..300u64)
            .prop_map(|(reserve, exact, amount)| Step::Release { reserve, exact, amount }),
        1 => (0..120u64).prop_map(|now_ms| Step::Expire { now_ms }),
        2 => any::<usize>().prop_map(|index| Step::Retry { index }),
        1 => any::<usize>().prop_map(|index| Step::Reuse { index }),
    ]
}

/// Turns steps into ops, the way a driver would: fresh ids, reservations named by earlier ids.
struct Builder {
    next_id: u128,
    reserves: Vec<(u128, [u8; 16])>,
    submitted: Vec<Op>,
}

enum Action {
    Op(Op),
    Expire(u64),
}

impl Builder {
    fn new() -> Self {
        Self { next_id: 1, reserves: Vec::new(), submitted: Vec::new() }
    }

    fn id(&mut self) -> u128 {
        self.next_id += 1;
        // Spread ids over the whole u128 range.
        self.next_id.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835)
    }

    fn action(&mut self, step: &Step, state: &LedgerState) -> Action {
        let op = match step {
            Step::Mint { account, amount } => Op::Mint {
                id: self.id(),
                account: ACCOUNTS[*account].into(),
                amount: *amount,
                memo: "prop".into(),
            },
            Step::Reserve { account, amount, timeout_at_ms } => {
                let id = self.id();
                let job_id = id.to_le_bytes();
                self.reserves.push((id, job_id));
                Op::Reserve {
                    id,
                    job_id,
                    requester: ACCOUNTS[*account].into(),
                    amount: *amount,
                    timeout_at_ms: *timeout_at_ms,
                }
            }
            Step::Pay { reserve, node, amount, fee } => {
                let (reserve_id, job_id) = self.pick(*reserve);
                Op::Pay {
                    id: self.id(),
                    reserve_id,
                    job_id,
                    node: NODES[*node].into(),
                    amount: *amount,
                    fee: *fee,
                }
            }
            Step::Release { reserve, exact, amount } => {
                let (reserve_id, job_id) = self.pick(*reserve);
                let held = state.reservations().get(&reserve_id).map_or(0, |r| r.held());
                let amount = if *exact { u64::try_from(held).unwrap() } else { *amount };
                Op::Release { id: self.id(), reserve_id, job_id, amount }
            }
            Step::Expire { now_ms } => return Action::Expire(*now_ms),
            Step::Retry { index } if !self.submitted.is_empty() => {
                self.submitted[index % self.submitted.len()].clone()
            }
            Step::Reuse { index } if !self.submitted.is_empty() => {
                let mut op = self.submitted[index % self.submitted.len()].clone();
                match &mut op {
                    Op::Mint { amount, .. }
                    | Op::Reserve { amount, .. }
                    | Op::Pay { amount, .. }
                    | Op::Release { amount, .. } => *amount += 1,
                    Op::Expire { .. } => unreachable!(),
                }
                op
            }
            Step::Retry { .. } | Step::Reuse { .. } => return Action::Expire(0),
        };
        self.submitted.push(op.clone());
        Action::Op(op)
    }

    fn pick(&self, index: usize) -> (u128, [u8; 16]) {
        if self.reserves.is_empty() {
            (7, [0; 16])
        } else {
            self.reserves[index % self.reserves.len()]
        }
    }
}

/// The invariants, plus conservation: every minted credit is in exactly one available balance
/// or held in escrow.
fn check_invariants(state: &LedgerState) {
    let violations = state.violations();
    assert!(violations.is_empty(), "{violations:?}");
    let minted = state.account(ISSUANCE_ACCOUNT).debits_posted;
    let mut total: u128 = state.account(ESCROW_ACCOUNT).credits_pending;
    for (name, a) in state.accounts() {
        if name != ISSUANCE_ACCOUNT && name != ESCROW_ACCOUNT {
            total += u128::try_from(a.available()).unwrap() + a.debits_pending;
        }
    }
    // Held credits are counted in the requester's pending and in escrow's: subtract one.
    total -= state.account(ESCROW_ACCOUNT).credits_pending;
    assert_eq!(total, minted, "credits not conserved");
}

fn run_in_memory(steps: &[Step]) -> (LedgerState, Vec<Entry>, Vec<Action>) {
    let mut state = LedgerState::new();
    let mut builder = Builder::new();
    let mut log: Vec<Entry> = Vec::new();
    let mut actions = Vec::new();
    let mut recorded: BTreeMap<u128, u64> = BTreeMap::new();
    for step in steps {
        let action = builder.action(step, &state);
        let before = state.clone();
        let mut out = Vec::new();
        match &action {
            Action::Op(op) => match state.apply(op.clone(), &mut out) {
                Ok(Applied::Recorded(seq)) => {
                    assert_eq!(out.len(), 1);
                    assert!(recorded.insert(op.id().unwrap(), seq).is_none());
                }
                Ok(Applied::Existing(seq)) => {
                    assert_eq!(recorded.get(&op.id().unwrap()), Some(&seq));
                    assert_eq!(state, before, "a repeated op changed the state");
                }
                Err(err) => {
                    assert_eq!(state, before, "a refused op changed the state: {err}");
                    if let OpError::IdReused { id, .. } = err {
                        assert!(recorded.contains_key(&id));
                    }
                }
            },
            Action::Expire(now_ms) => {
                let voided = state.expire(*now_ms, &mut out);
                assert_eq!(voided.len(), out.len());
                for id in voided {
                    let r = &state.reservations()[&id];
                    assert!(r.timeout_at_ms < *now_ms);
                }
            }
        }
        log.extend(out);
        check_invariants(&state);
        actions.push(action);
    }
    (state, log, actions)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_after_every_step_and_replay_equals_state(
        steps in prop::collection::vec(step(), 1..200)
    ) {
        let (state, log, _) = run_in_memory(&steps);
        let mut replayed = LedgerState::new();
        let mut sums: BTreeMap<String, Account> = BTreeMap::new();
        for entry in &log {
            replayed.replay(entry).unwrap();
            for l in &entry.legs {
                add_leg(&mut sums, l);
            }
        }
        prop_assert_eq!(&replayed, &state);
        prop_assert_eq!(&sums, state.accounts());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The same sequence through the durable ledger: same answers, and after closing and
    /// reopening (which replays and verifies the log) the same balances.
    #[test]
    fn the_durable_ledger_matches_the_state_machine_across_reopen(
        steps in prop::collection::vec(step(), 1..80)
    ) {
        let (state, log, actions) = run_in_memory(&steps);
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let mut model = LedgerState::new();
        for action in &actions {
            let mut scratch = Vec::new();
            match action {
                Action::Op(op) => {
                    let want = model.apply(op.clone(), &mut scratch);
                    let got = ledger.submit(op.clone());
                    match (want, got) {
                        (Ok(w), Ok(g)) => prop_assert_eq!(w, g),
                        (Err(w), Err(LedgerError::Rejected(g))) => prop_assert_eq!(w, g),
                        (w, g) => prop_assert!(false, "model {w:?} but ledger {g:?}"),
                    }
                }
                Action::Expire(now_ms) => {
                    prop_assert_eq!(model.expire(*now_ms, &mut scratch), ledger.expire(*now_ms).unwrap());
                }
            }
        }
        ledger.close();
        let report = Ledger::audit(dir.path()).unwrap();
        prop_assert!(report.problems.is_empty(), "{:?}", report.problems);
        prop_assert_eq!(report.entries, log.len() as u64);
        let reopened = Ledger::open(dir.path()).unwrap();
        for (name, account) in state.accounts() {
            prop_assert_eq!(reopened.balance(name).unwrap(), *account);
        }
        let stored: Vec<Entry> = reopened.entries().map(Result::unwrap).collect();
        prop_assert_eq!(stored, log);
    }
}
