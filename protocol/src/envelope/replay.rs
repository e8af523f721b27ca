//! The replay cache: a bounded set of `(signer, nonce)` pairs seen within their lifetimes,
//! each with its message's fingerprint, so that a copy of a message seen (a duplicate) is told
//! apart from another message under the same pair (a reused nonce).

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};

use super::VerifyError;
use crate::identity::NodeId;
use crate::time::Millis;

/// A bounded set of `(signer, nonce)` pairs seen within their messages' lifetimes.
///
/// Entries are dropped once their message has expired (a replay would then fail the expiry
/// check anyway). When full, the entry expiring soonest is evicted and its expiry becomes a
/// floor: messages expiring at or before the floor are refused, since the cache can no longer
/// tell whether they were seen. The cache never accepts a replay; under flood it refuses old
/// messages instead.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    /// The expiry and signature fingerprint of each pair's message.
    seen: HashMap<(NodeId, u64), (Millis, u64)>,
    /// The same entries, the one expiring soonest on top (ties by signer and nonce). Only the
    /// soonest is ever read or removed, so a heap in one vector serves where a tree would
    /// scatter its nodes: a node's cache is touched on every message it receives.
    by_expiry: BinaryHeap<Reverse<(Millis, NodeId, u64)>>,
    /// The first expiry in `by_expiry` (`Millis::MAX` when empty): a purge with nothing to do,
    /// the usual case, reads this instead of the heap.
    earliest_ms: Millis,
    floor_ms: Millis,
}

impl ReplayCache {
    /// A cache holding at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seen: HashMap::new(),
            by_expiry: BinaryHeap::new(),
            earliest_ms: Millis::MAX,
            floor_ms: 0,
        }
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Drops entries whose messages expired before `horizon_ms`.
    pub fn purge_before(&mut self, horizon_ms: Millis) {
        if self.earliest_ms >= horizon_ms {
            return;
        }
        while let Some(&Reverse((expiry, signer, nonce))) = self.by_expiry.peek() {
            if expiry >= horizon_ms {
                break;
            }
            self.by_expiry.pop();
            self.seen.remove(&(signer, nonce));
        }
        self.earliest_ms = self.first_expiry();
    }

    fn first_expiry(&self) -> Millis {
        self.by_expiry.peek().map_or(Millis::MAX, |Reverse(e)| e.0)
    }

    /// Checks `(signer, nonce)` and records it with the message's `fingerprint` (of its
    /// signature); an error when the pair was seen (a [`VerifyError::Duplicate`] when with the
    /// same fingerprint, a [`VerifyError::NonceReused`] when not) or is too old.
    pub fn check_and_insert(
        &mut self,
        signer: NodeId,
        nonce: u64,
        expires_at_ms: Millis,
        fingerprint: u64,
    ) -> Result<(), VerifyError> {
        let too_old = |floor_ms| VerifyError::ReplayWindowExceeded { expires_at_ms, floor_ms };
        let seen = |(_, seen_fingerprint): (Millis, u64)| {
            if seen_fingerprint == fingerprint {
                VerifyError::Duplicate { signer, nonce }
            } else {
                VerifyError::NonceReused { signer, nonce }
            }
        };
        if self.seen.len() < self.capacity {
            // The usual case: the pair is looked up and recorded with one hash.
            let slot = match self.seen.entry((signer, nonce)) {
                Entry::Vacant(slot) => slot,
                Entry::Occupied(entry) => return Err(seen(*entry.get())),
            };
            if expires_at_ms <= self.floor_ms {
                return Err(too_old(self.floor_ms));
            }
            slot.insert((expires_at_ms, fingerprint));
        } else {
            if let Some(entry) = self.seen.get(&(signer, nonce)) {
                return Err(seen(*entry));
            }
            if expires_at_ms <= self.floor_ms {
                return Err(too_old(self.floor_ms));
            }
            if let Some(Reverse((expiry, old_signer, old_nonce))) = self.by_expiry.pop() {
                self.seen.remove(&(old_signer, old_nonce));
                self.floor_ms = self.floor_ms.max(expiry);
                self.earliest_ms = self.first_expiry();
            }
            if expires_at_ms <= self.floor_ms {
                return Err(too_old(self.floor_ms));
            }
            self.seen.insert((signer, nonce), (expires_at_ms, fingerprint));
        }
        self.by_expiry.push(Reverse((expires_at_ms, signer, nonce)));
        self.earliest_ms = self.earliest_ms.min(expires_at_ms);
        assert_eq!(self.seen.len(), self.by_expiry.len());
        Ok(())
    }
}
