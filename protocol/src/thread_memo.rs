//! The store behind the opt-in per-thread memos ([`SignatureMemo`], [`OfferMemo`]): a bounded
//! map in two generations, installed in a thread-local slot by a guard that restores what was
//! there before when dropped.
//!
//! [`SignatureMemo`]: crate::envelope::SignatureMemo
//! [`OfferMemo`]: crate::messages::OfferMemo

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::thread::LocalKey;

/// Entries in two generations, each at most half the capacity: when the young one fills up,
/// the old one is dropped and the young one becomes old. A lookup sees both.
pub(crate) struct Generations<K, V> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    generation_max: usize,
    /// Lookups answered from the store (counted by the caller, which decides what a hit is).
    pub(crate) hits: u64,
    /// Values computed and stored.
    pub(crate) misses: u64,
}

impl<K: Hash + Eq, V> Generations<K, V> {
    /// A store of at most `capacity` entries (at least 2).
    fn new(capacity: usize) -> Self {
        Self {
            young: HashMap::new(),
            old: HashMap::new(),
            generation_max: (capacity / 2).max(1),
            hits: 0,
            misses: 0,
        }
    }

    /// The value kept for `key`, young generation first.
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.young.get(key).or_else(|| self.old.get(key))
    }

    /// Keeps `value` for `key` (a miss), dropping the old generation when the young is full.
    pub(crate) fn insert(&mut self, key: K, value: V) {
        self.misses += 1;
        if self.young.len() >= self.generation_max {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, value);
    }
}

/// What a memo's `thread_local!` holds: its store, when one is installed.
pub(crate) type SlotCell<K, V> = RefCell<Option<Generations<K, V>>>;

/// A thread-local slot that may hold a store.
pub(crate) type Slot<K, V> = LocalKey<SlotCell<K, V>>;

/// An installed store: dropping it uninstalls it and puts back the one it replaced, if any.
pub(crate) struct Installed<K: 'static, V: 'static> {
    slot: &'static Slot<K, V>,
    previous: Option<Generations<K, V>>,
}

impl<K: Hash + Eq, V> Installed<K, V> {
    /// Installs an empty store of at most `capacity` entries in `slot` on this thread.
    pub(crate) fn install(slot: &'static Slot<K, V>, capacity: usize) -> Self {
        let previous = slot.with(|s| s.borrow_mut().replace(Generations::new(capacity)));
        Self { slot, previous }
    }

    /// `(hits, misses)` of the installed store.
    pub(crate) fn counts(&self) -> (u64, u64) {
        self.slot.with(|s| s.borrow().as_ref().map_or((0, 0), |g| (g.hits, g.misses)))
    }
}

impl<K: 'static, V: 'static> Drop for Installed<K, V> {
    fn drop(&mut self) {
        let previous = self.previous.take();
        self.slot.with(|s| *s.borrow_mut() = previous);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static SLOT: SlotCell<u32, u32> = const { RefCell::new(None) };
    }

    #[test]
    fn a_full_young_generation_becomes_old_and_the_old_one_is_dropped() {
        let _memo = Installed::install(&SLOT, 4);
        SLOT.with(|s| {
            let mut guard = s.borrow_mut();
            let store = guard.as_mut().expect("installed");
            for k in 0..5 {
                store.insert(k, k * 10);
            }
            // Generations of two: {4} young, {2, 3} old; 0 and 1 are gone.
            assert_eq!(store.get(&4), Some(&40));
            assert_eq!(store.get(&2), Some(&20));
            assert_eq!(store.get(&1), None);
            assert_eq!(store.misses, 5);
        });
    }

    #[test]
    fn dropping_restores_the_store_installed_before() {
        let outer = Installed::install(&SLOT, 4);
        SLOT.with(|s| s.borrow_mut().as_mut().expect("installed").insert(1, 1));
        {
            let inner = Installed::install(&SLOT, 4);
            assert_eq!(inner.counts(), (0, 0));
        }
        assert_eq!(outer.counts(), (0, 1));
        drop(outer);
        assert!(SLOT.with(|s| s.borrow().is_none()));
    }
}
