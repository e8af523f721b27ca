//! The offers a node knows, with the indexes its timer and its claim loop read.
//!
//! A node hears every offer on the network and keeps each until its deadline, so the table
//! holds tens to hundreds of offers while the node's timer, its slot count and its claim loop
//! run many times a second across a large network. Each of those used to scan the whole table;
//! here each reads an index instead: offers by deadline (expiry and the next timeout), claims in
//! flight by claim time (claim timeouts and slots in use), and the offers the node may claim in
//! its claim order. Every change goes through [`OfferTable::insert`], [`OfferTable::remove`] or
//! [`OfferTable::update`], which keep the indexes in step with the offers.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use super::KnownOffer;
use crate::identity::NodeId;
use crate::matching::MatchResult;
use crate::messages::{claim_order_key, JobId};
use crate::time::Millis;

/// A position in the claim order: highest reward first, then the node's own order.
pub(super) type ClaimRank = (Reverse<u64>, u64, JobId);

/// The profile a match verdict was reached against: (profile generation, running jobs).
pub(super) type MatchedFor = (u64, u32);

#[derive(Debug)]
struct Entry {
    known: KnownOffer,
    /// What `known.matched` was evaluated against, if the table knows.
    matched_for: Option<MatchedFor>,
}

/// Known offers by job, indexed by deadline, claim time and claim order.
#[derive(Debug)]
pub(super) struct OfferTable {
    me: NodeId,
    /// Boxed: an offer carries its whole job spec, and a B-tree moves its values around.
    offers: BTreeMap<JobId, Box<Entry>>,
    by_deadline: BTreeSet<(Millis, JobId)>,
    by_claim_time: BTreeSet<(Millis, JobId)>,
    claimable: BTreeSet<ClaimRank>,
    /// The first deadline in `by_deadline` (`Millis::MAX` when empty): every input checks for
    /// expired offers, and reading this field spares the tree walk when none is due.
    earliest_deadline: Millis,
}

impl OfferTable {
    /// An empty table for the node `me` (whose claim order it keeps).
    pub(super) fn new(me: NodeId) -> Self {
        Self {
            me,
            offers: BTreeMap::new(),
            by_deadline: BTreeSet::new(),
            by_claim_time: BTreeSet::new(),
            claimable: BTreeSet::new(),
            earliest_deadline: Millis::MAX,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.offers.len()
    }

    pub(super) fn contains(&self, job_id: &JobId) -> bool {
        self.offers.contains_key(job_id)
    }

    pub(super) fn get(&self, job_id: &JobId) -> Option<&KnownOffer> {
        self.offers.get(job_id).map(|e| &e.known)
    }

    /// Offers in job order.
    pub(super) fn values(&self) -> impl Iterator<Item = &KnownOffer> {
        self.offers.values().map(|e| &e.known)
    }

    /// Offers claimed with no lease or denial yet.
    pub(super) fn claims_in_flight(&self) -> usize {
        self.by_claim_time.len()
    }

    /// Adds `known`, replacing any offer of the same job; `matched_for` says what profile
    /// `known.matched` was evaluated against.
    pub(super) fn insert(&mut self, known: KnownOffer, matched_for: Option<MatchedFor>) {
        let job_id = known.offer.job_id;
        if let Some(old) = self.offers.get(&job_id) {
            let old = Keys::of(&self.me, &old.known);
            self.unindex(old);
        }
        self.index(Keys::of(&self.me, &known));
        let entry = Entry { known, matched_for };
        match self.offers.get_mut(&job_id) {
            Some(slot) => **slot = entry,
            None => {
                self.offers.insert(job_id, Box::new(entry));
            }
        }
        self.check(&job_id);
    }

    pub(super) fn remove(&mut self, job_id: &JobId) -> Option<KnownOffer> {
        let entry = self.offers.remove(job_id)?;
        self.unindex(Keys::of(&self.me, &entry.known));
        Some(entry.known)
    }

    /// Changes the offer of `job_id` through `f` (its job must stay; a changed spec must come
    /// with a new verdict, through [`OfferTable::insert`]) and re-indexes it.
    pub(super) fn update<R>(
        &mut self,
        job_id: &JobId,
        f: impl FnOnce(&mut KnownOffer) -> R,
    ) -> Option<R> {
        let entry = self.offers.get_mut(job_id)?;
        let before = Keys::of(&self.me, &entry.known);
        let out = f(&mut entry.known);
        assert_eq!(entry.known.offer.job_id, *job_id, "an update keeps the offer's job");
        let after = Keys::of(&self.me, &entry.known);
        if before != after {
            self.unindex(before);
            self.index(after);
        }
        self.check(job_id);
        Some(out)
    }

    /// The match verdict of `job_id` and what it was evaluated against.
    pub(super) fn matched(&self, job_id: &JobId) -> Option<(&MatchResult, Option<MatchedFor>)> {
        self.offers.get(job_id).map(|e| (&e.known.matched, e.matched_for))
    }

    /// Records a new match verdict for `job_id` (no index depends on it).
    pub(super) fn set_matched(&mut self, job_id: &JobId, matched: MatchResult, for_: MatchedFor) {
        if let Some(e) = self.offers.get_mut(job_id) {
            e.known.matched = matched;
            e.matched_for = Some(for_);
        }
    }

    /// The earliest instant an offer expires or a claim times out.
    pub(super) fn next_due(&self, claim_timeout_ms: u64) -> Option<Millis> {
        let deadline = self.by_deadline.first().map(|(t, _)| *t);
        let claim = self.by_claim_time.first().map(|(t, _)| t.saturating_add(claim_timeout_ms));
        deadline.into_iter().chain(claim).min()
    }

    /// The earliest instant a claim times out or a claimed offer expires: the changes that
    /// free a slot. The expiry of an offer with no claim in flight only forgets it.
    pub(super) fn next_slot_due(&self, claim_timeout_ms: u64) -> Option<Millis> {
        let claim = self.by_claim_time.first().map(|(t, _)| t.saturating_add(claim_timeout_ms));
        // Claims in flight are few (at most the node's slots): a look-up each.
        let deadline = self
            .by_claim_time
            .iter()
            .filter_map(|(_, job_id)| self.offers.get(job_id))
            .map(|e| e.known.offer.deadline_ms)
            .min();
        claim.into_iter().chain(deadline).min()
    }

    /// Forgets every offer whose deadline is at or before `now`.
    pub(super) fn expire(&mut self, now: Millis) {
        if self.earliest_deadline > now {
            return;
        }
        while let Some(&(deadline, job_id)) = self.by_deadline.first() {
            if deadline > now {
                break;
            }
            self.remove(&job_id);
        }
    }

    /// Forgets the claims made `timeout_ms` or longer before `now` (the offers stay).
    pub(super) fn time_out_claims(&mut self, now: Millis, timeout_ms: u64) {
        while let Some(&(claimed_at, job_id)) = self.by_claim_time.first() {
            if now < claimed_at.saturating_add(timeout_ms) {
                break;
            }
            self.update(&job_id, |o| o.claimed_at_ms = None);
        }
    }

    /// The first offer the node may claim after `after` in its claim order (from the start
    /// without one): not claimed, not refused, with an open slot, open to this node.
    pub(super) fn next_claimable(&self, after: Option<&ClaimRank>) -> Option<ClaimRank> {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.claimable.range((start, Bound::Unbounded)).next().copied()
    }

    fn index(&mut self, keys: Keys) {
        self.by_deadline.insert(keys.deadline);
        self.earliest_deadline = self.earliest_deadline.min(keys.deadline.0);
        if let Some(k) = keys.claim_time {
            self.by_claim_time.insert(k);
        }
        if let Some(r) = keys.rank {
            self.claimable.insert(r);
        }
    }

    fn unindex(&mut self, keys: Keys) {
        self.by_deadline.remove(&keys.deadline);
        if keys.deadline.0 == self.earliest_deadline {
            self.earliest_deadline = self.by_deadline.first().map_or(Millis::MAX, |(t, _)| *t);
        }
        if let Some(k) = keys.claim_time {
            self.by_claim_time.remove(&k);
        }
        if let Some(r) = keys.rank {
            self.claimable.remove(&r);
        }
    }

    /// Asserts the indexes agree with the offers in size (a cheap check on every change).
    fn check(&self, job_id: &JobId) {
        assert_eq!(self.offers.len(), self.by_deadline.len(), "deadline index of {job_id}");
        debug_assert_eq!(
            self.earliest_deadline,
            self.by_deadline.first().map_or(Millis::MAX, |(t, _)| *t),
            "earliest deadline after a change of {job_id}"
        );
        assert!(self.by_claim_time.len() <= self.offers.len(), "claim index of {job_id}");
        assert!(self.claimable.len() <= self.offers.len(), "claim order of {job_id}");
    }
}

/// An offer's entries in the indexes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Keys {
    deadline: (Millis, JobId),
    claim_time: Option<(Millis, JobId)>,
    rank: Option<ClaimRank>,
}

impl Keys {
    fn of(me: &NodeId, known: &KnownOffer) -> Self {
        let job_id = known.offer.job_id;
        Self {
            deadline: (known.offer.deadline_ms, job_id),
            claim_time: known.claimed_at_ms.map(|t| (t, job_id)),
            rank: claim_rank(me, known),
        }
    }
}

/// Where `known` stands in `me`'s claim order, or `None` when the node may not claim it.
fn claim_rank(me: &NodeId, known: &KnownOffer) -> Option<ClaimRank> {
    let claimable = known.claimed_at_ms.is_none()
        && known.refused.is_none()
        && known.offer.open_slots > 0
        && known.open_to_me;
    let job_id = known.offer.job_id;
    claimable.then(|| (Reverse(known.offer.spec.reward), claim_order_key(me, &job_id), job_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Digest;
    use crate::messages::Offer;
    use crate::testkit;

    fn known(n: u8, deadline_ms: Millis, reward: u64) -> KnownOffer {
        KnownOffer {
            relay: testkit::keypair(99).public(),
            offer: std::sync::Arc::new(Offer {
                job_id: JobId::from_digest(&Digest::of(&[n])),
                spec: testkit::batch_spec(reward),
                deadline_ms,
                open_slots: 1,
                preferred: Vec::new(),
            }),
            seen_at_ms: 0,
            matched: Ok(crate::matching::Score(0)),
            claimed_at_ms: None,
            refused: None,
            open_to_me: true,
        }
    }

    /// The indexes answer as a scan over every offer would, through any mix of changes.
    #[test]
    fn indexes_agree_with_a_scan_of_the_offers() {
        let me = testkit::keypair(1).public();
        let mut table = OfferTable::new(me);
        let mut state = 7u64;
        let mut roll = |n: u64| {
            state = crate::messages::mix64(state);
            state % n
        };
        for step in 0..2_000u64 {
            let n = roll(40) as u8;
            let job_id = JobId::from_digest(&Digest::of(&[n]));
            match roll(6) {
                0 | 1 => table.insert(known(n, 1_000 + roll(500), roll(3)), None),
                2 => {
                    table.remove(&job_id);
                }
                3 => {
                    let claimed = (roll(2) == 0).then_some(step);
                    table.update(&job_id, |o| o.claimed_at_ms = claimed);
                }
                4 => {
                    let slots = roll(2) as u32;
                    table.update(&job_id, |o| {
                        std::sync::Arc::make_mut(&mut o.offer).open_slots = slots
                    });
                }
                _ => table.time_out_claims(step, 100),
            }
            if step % 97 == 0 {
                table.expire(1_000 + roll(500));
            }
            let all: Vec<&KnownOffer> = table.values().collect();
            let claims = all.iter().filter(|o| o.claimed_at_ms.is_some()).count();
            assert_eq!(table.claims_in_flight(), claims);
            let due = all
                .iter()
                .filter_map(|o| o.claimed_at_ms.map(|t| t + 100))
                .chain(all.iter().map(|o| o.offer.deadline_ms))
                .min();
            assert_eq!(table.next_due(100), due);
            let slot_due = all
                .iter()
                .filter(|o| o.claimed_at_ms.is_some())
                .flat_map(|o| [o.claimed_at_ms.map_or(0, |t| t + 100), o.offer.deadline_ms])
                .min();
            assert_eq!(table.next_slot_due(100), slot_due);
            let mut order: Vec<ClaimRank> = all.iter().filter_map(|o| claim_rank(&me, o)).collect();
            order.sort_unstable();
            let walked: Vec<ClaimRank> = std::iter::successors(table.next_claimable(None), |r| {
                table.next_claimable(Some(r))
            })
            .collect();
            assert_eq!(walked, order);
        }
    }
}
