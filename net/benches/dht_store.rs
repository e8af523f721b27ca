//! What the DHT's store costs when one peer holds the whole network's entries: every node's
//! signed advert and a provider record per node for each class it belongs to, as a relay (or
//! a DHT server closest to the class keys) would for a network of `--nodes` nodes.
//!
//! ```text
//! cargo bench -p aimatrix-net --bench dht_store -- --nodes 100000
//! ```
//!
//! Prints a table: entries held, how fast they are checked and stored, the resident memory
//! they add (from /proc/self/status), and how long one lookup's answer takes.

#![allow(clippy::unwrap_used, clippy::print_stdout)] // a bench binary: a panic is a failure

use std::time::Instant;

use aimatrix_net::store::{DhtStore, PROVIDERS_ANSWERED};
use aimatrix_protocol::capability::{advert_record_key, capability_classes, class_provider_key};
use aimatrix_protocol::dht::{check_advert_update, check_provider_key};
use aimatrix_protocol::identity::Keypair;
use aimatrix_protocol::messages::{seal, Advert, Message};
use aimatrix_protocol::testkit;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use libp2p::{Multiaddr, PeerId};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let nodes: usize = args
        .iter()
        .position(|a| a == "--nodes")
        .and_then(|i| args.get(i + 1))
        .map_or(100_000, |n| n.parse().expect("--nodes takes a number"));

    // A node of the kind the devnet runs: wasm and Docker, two classes.
    let mut profile = testkit::profile();
    profile.runtimes.docker = true;
    let classes = capability_classes(&profile);
    println!("{nodes} nodes, each with one advert and {} classes {classes:?}", classes.len());

    let started = Instant::now();
    let adverts: Vec<(Keypair, Vec<u8>)> = (0..nodes)
        .map(|i| {
            let mut secret = [0u8; 32];
            secret[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
            let key = Keypair::from_secret_bytes(secret);
            let advert = Message::Advert(Advert { seq: 1, profile: profile.clone() });
            let value = seal(&key, &advert, 1, 0, 3_600_000).unwrap();
            (key, value)
        })
        .collect();
    let advert_bytes = adverts.iter().map(|(_, v)| v.len()).sum::<usize>() / nodes.max(1);
    println!("signed {nodes} adverts ({advert_bytes} bytes each) in {:.1?}", started.elapsed());

    let local = PeerId::random();
    let mut store = DhtStore::new(local);
    let before = rss_bytes();

    let started = Instant::now();
    for (key, value) in &adverts {
        let record_key = advert_record_key(&key.public());
        let stored = store.get(&RecordKey::new(&record_key)).map(|r| r.value.clone());
        check_advert_update(&record_key, value, stored.as_deref()).unwrap();
        store.put(Record::new(record_key, value.clone())).unwrap();
    }
    let records_secs = started.elapsed().as_secs_f64();
    let after_records = rss_bytes();

    let addr: Multiaddr = "/ip4/203.0.113.7/tcp/4001".parse().unwrap();
    let started = Instant::now();
    for (key, _) in &adverts {
        let peer = aimatrix_net::peer_id_of(&key.public());
        for class in &classes {
            let class_key = class_provider_key(class);
            check_provider_key(&class_key).unwrap();
            let record = ProviderRecord::new(class_key, peer, vec![addr.clone()]);
            store.add_provider(record).unwrap();
        }
    }
    let providers_secs = started.elapsed().as_secs_f64();
    let after_providers = rss_bytes();
    drop(adverts);

    let wasm = RecordKey::new(&class_provider_key(&classes[0]));
    let lookups = 10_000;
    let started = Instant::now();
    for _ in 0..lookups {
        assert_eq!(store.providers(&wasm).len(), PROVIDERS_ANSWERED.min(nodes));
    }
    let answer_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(lookups);

    let counts = store.counts();
    let providers = counts.providers;
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    println!();
    println!("| entries | held | stored/s (checked) | resident memory added |");
    println!("|---|---|---|---|");
    println!(
        "| advert records | {} | {:.0} | {:.1} MiB ({:.0} bytes each) |",
        counts.records,
        counts.records as f64 / records_secs,
        mib(after_records.saturating_sub(before)),
        after_records.saturating_sub(before) as f64 / counts.records.max(1) as f64,
    );
    println!(
        "| provider records | {providers} in {} keys | {:.0} | {:.1} MiB ({:.0} bytes each) |",
        counts.provider_keys,
        providers as f64 / providers_secs,
        mib(after_providers.saturating_sub(after_records)),
        after_providers.saturating_sub(after_records) as f64 / providers.max(1) as f64,
    );
    println!();
    println!("one lookup's answer ({PROVIDERS_ANSWERED} of {nodes} providers): {answer_us:.1} µs");
}
