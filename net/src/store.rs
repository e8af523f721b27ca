//! The DHT's record store: advert records and provider records in memory, with limits sized
//! for a network of 100,000 nodes (docs/mesh.md, "The DHT's store").
//!
//! Records are kept in libp2p's `MemoryStore` (one per key, replaced in place). Provider
//! records are kept here, not there: a capability class such as `runtime/wasm` is provided by
//! nearly every node, so the peers closest to its key hold one record per node, and
//! `MemoryStore` both caps a key at 20 providers (dropping the rest silently) and scans the
//! whole list on every update. Here a key holds up to [`PROVIDERS_PER_KEY_MAX`] providers,
//! updated in constant time, and a lookup is answered with [`PROVIDERS_ANSWERED`] of them at a
//! time, a different window each time, so an answer fits one Kademlia message and repeated
//! lookups walk the whole list.
//!
//! What may be stored at all (a valid advert signed by the node its key names, a capability
//! class key) is decided by `aimatrix_protocol::dht` before anything reaches this store.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::{hash_map, HashMap, HashSet};
use std::time::Instant;

use libp2p::kad::store::{Error, MemoryStore, MemoryStoreConfig, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::PeerId;

/// Most records kept: one advert per node of a 100,000-node network, with room to spare.
pub const RECORDS_MAX: usize = 131_072;
/// Most keys with providers (capability classes; a few dozen exist).
pub const PROVIDER_KEYS_MAX: usize = 4_096;
/// Most providers kept for one key: every node of a 100,000-node network, with room to spare.
pub const PROVIDERS_PER_KEY_MAX: usize = 131_072;
/// Most providers given in one answer; a window that moves on with every lookup.
pub const PROVIDERS_ANSWERED: usize = 64;
/// Most addresses kept for one provider; a peer listing more has the rest dropped.
pub const PROVIDER_ADDRS_MAX: usize = 8;

/// The store behind this peer's Kademlia behaviour.
pub struct DhtStore {
    local: PeerId,
    records: MemoryStore,
    providers: HashMap<RecordKey, Providers>,
    /// Provider records for which this peer is the provider.
    provided: HashSet<ProviderRecord>,
    /// Where the next answer's window starts (wraps around each key's list).
    cursor: Cell<usize>,
}

/// The providers of one key, in insertion order, indexed by peer.
#[derive(Default)]
struct Providers {
    list: Vec<ProviderRecord>,
    index: HashMap<PeerId, usize>,
}

/// How many entries the store holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Records (adverts).
    pub records: usize,
    /// Keys with at least one provider.
    pub provider_keys: usize,
    /// Provider records, over every key.
    pub providers: usize,
}

impl DhtStore {
    /// An empty store for the peer `local`.
    pub fn new(local: PeerId) -> Self {
        let config = MemoryStoreConfig {
            max_records: RECORDS_MAX,
            // MemoryStore refuses a value of this many bytes or more.
            max_value_bytes: aimatrix_protocol::dht::ADVERT_RECORD_BYTES_MAX + 1,
            // Unused: provider records are kept here, not in the MemoryStore.
            max_provided_keys: 0,
            max_providers_per_key: 0,
        };
        Self {
            local,
            records: MemoryStore::with_config(local, config),
            providers: HashMap::new(),
            provided: HashSet::new(),
            cursor: Cell::new(0),
        }
    }

    /// How many entries the store holds now.
    pub fn counts(&self) -> StoreCounts {
        StoreCounts {
            records: self.records.records().count(),
            provider_keys: self.providers.len(),
            providers: self.providers.values().map(|p| p.list.len()).sum(),
        }
    }

    /// Drops every expired record and provider record (Kademlia drops them lazily, when they
    /// are read; a provider that is never in an answer's window would otherwise stay).
    pub fn prune(&mut self, now: Instant) {
        self.records.retain(|_, record| !record.is_expired(now));
        let keys: Vec<RecordKey> = self.providers.keys().cloned().collect();
        for key in keys {
            let expired: Vec<PeerId> = self.providers[&key]
                .list
                .iter()
                .filter(|p| p.is_expired(now))
                .map(|p| p.provider)
                .collect();
            for peer in expired {
                self.remove_provider(&key, &peer);
            }
        }
    }
}

impl RecordStore for DhtStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = std::iter::Map<
        std::collections::hash_set::Iter<'a, ProviderRecord>,
        fn(&'a ProviderRecord) -> Cow<'a, ProviderRecord>,
    >;

    fn get(&self, key: &RecordKey) -> Option<Cow<'_, Record>> {
        self.records.get(key)
    }

    fn put(&mut self, record: Record) -> Result<()> {
        self.records.put(record)
    }

    fn remove(&mut self, key: &RecordKey) {
        self.records.remove(key);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.records.records()
    }

    fn add_provider(&mut self, mut record: ProviderRecord) -> Result<()> {
        record.addresses.truncate(PROVIDER_ADDRS_MAX);
        let keys = self.providers.len();
        let providers = match self.providers.entry(record.key.clone()) {
            hash_map::Entry::Occupied(e) => e.into_mut(),
            hash_map::Entry::Vacant(_) if keys >= PROVIDER_KEYS_MAX => {
                return Err(Error::MaxProvidedKeys)
            }
            hash_map::Entry::Vacant(e) => e.insert(Providers::default()),
        };
        let is_local = record.provider == self.local;
        if let Some(&i) = providers.index.get(&record.provider) {
            if is_local {
                self.provided.remove(&providers.list[i]);
                self.provided.insert(record.clone());
            }
            providers.list[i] = record;
            return Ok(());
        }
        if providers.list.len() >= PROVIDERS_PER_KEY_MAX {
            // Full: refused, not dropped silently; Kademlia logs it and the provider finds
            // the other peers closest to the key.
            return Err(Error::MaxProvidedKeys);
        }
        if is_local {
            self.provided.insert(record.clone());
        }
        providers.index.insert(record.provider, providers.list.len());
        providers.list.push(record);
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let Some(providers) = self.providers.get(key) else { return Vec::new() };
        let list = &providers.list;
        if list.len() <= PROVIDERS_ANSWERED {
            return list.clone();
        }
        let start = self.cursor.get() % list.len();
        self.cursor.set(start + PROVIDERS_ANSWERED);
        list.iter().cycle().skip(start).take(PROVIDERS_ANSWERED).cloned().collect()
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.provided.iter().map(Cow::Borrowed)
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        let hash_map::Entry::Occupied(mut entry) = self.providers.entry(key.clone()) else {
            return;
        };
        let providers = entry.get_mut();
        let Some(i) = providers.index.remove(provider) else { return };
        let removed = providers.list.swap_remove(i);
        if let Some(moved) = providers.list.get(i) {
            providers.index.insert(moved.provider, i);
        }
        if removed.provider == self.local {
            self.provided.remove(&removed);
        }
        if providers.list.is_empty() {
            entry.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn provider(key: &RecordKey, peer: PeerId) -> ProviderRecord {
        ProviderRecord::new(key.clone(), peer, Vec::new())
    }

    #[test]
    fn a_key_keeps_far_more_than_twenty_providers_and_answers_in_windows() {
        let mut store = DhtStore::new(PeerId::random());
        let key = RecordKey::new(&"aimatrix/class/runtime/wasm");
        let peers: Vec<PeerId> = (0..1000).map(|_| PeerId::random()).collect();
        for &peer in &peers {
            store.add_provider(provider(&key, peer)).unwrap();
        }
        // Updating a provider keeps one record for it.
        store.add_provider(provider(&key, peers[7])).unwrap();
        assert_eq!(store.counts().providers, 1000);

        let mut seen = HashSet::new();
        for _ in 0..(1000 / PROVIDERS_ANSWERED + 1) {
            let answer = store.providers(&key);
            assert_eq!(answer.len(), PROVIDERS_ANSWERED);
            seen.extend(answer.into_iter().map(|p| p.provider));
        }
        assert_eq!(seen.len(), 1000, "successive answers cover every provider");

        for &peer in &peers[..990] {
            store.remove_provider(&key, &peer);
        }
        let left: HashSet<PeerId> = store.providers(&key).into_iter().map(|p| p.provider).collect();
        assert_eq!(left, peers[990..].iter().copied().collect());
        for &peer in &peers[990..] {
            store.remove_provider(&key, &peer);
        }
        assert_eq!(store.counts(), StoreCounts::default());
    }

    #[test]
    fn own_provider_records_are_listed_as_provided_and_addresses_are_bounded() {
        let local = PeerId::random();
        let mut store = DhtStore::new(local);
        let key = RecordKey::new(&"aimatrix/class/runtime/docker");
        let addrs = (0..20).map(|i| format!("/ip4/10.0.0.{i}/tcp/1").parse().unwrap()).collect();
        store.add_provider(ProviderRecord::new(key.clone(), local, addrs)).unwrap();
        store.add_provider(provider(&key, PeerId::random())).unwrap();
        let provided: Vec<_> = store.provided().collect();
        assert_eq!(provided.len(), 1);
        assert_eq!(provided[0].provider, local);
        assert_eq!(provided[0].addresses.len(), PROVIDER_ADDRS_MAX);
        store.remove_provider(&key, &local);
        assert_eq!(store.provided().count(), 0);
        assert_eq!(store.counts().providers, 1);
    }

    #[test]
    fn too_many_keys_are_refused_and_expired_entries_are_pruned() {
        let mut store = DhtStore::new(PeerId::random());
        let peer = PeerId::random();
        for i in 0..PROVIDER_KEYS_MAX {
            store.add_provider(provider(&RecordKey::new(&format!("k{i}")), peer)).unwrap();
        }
        let one_more = store.add_provider(provider(&RecordKey::new(&"another"), peer));
        assert!(matches!(one_more, Err(Error::MaxProvidedKeys)));

        let now = Instant::now();
        let mut old = provider(&RecordKey::new(&"k0"), PeerId::random());
        old.expires = Some(now);
        store.add_provider(old).unwrap();
        let mut record = Record::new(RecordKey::new(&"r"), b"v".to_vec());
        record.expires = Some(now);
        store.put(record).unwrap();
        store.prune(now + Duration::from_secs(1));
        let counts = store.counts();
        assert_eq!((counts.records, counts.providers), (0, PROVIDER_KEYS_MAX));
    }
}
