//! A Kademlia DHT over the simulated nodes: XOR distance on 64-bit keys, k-bucket routing
//! tables, and iterative lookups with `alpha` requests in flight, as rust-libp2p's
//! `ClosestPeersIter` runs them.
//!
//! Keys are the first 8 bytes of the SHA-256 of a peer id or record key (libp2p hashes with
//! SHA-256 and compares 256 bits; 64 bits separate 100,000 peers as well). A node's bucket `i`
//! holds up to `k` peers whose distance from it lies in `[2^i, 2^(i+1))`, drawn at random among
//! them when the table is built: the tables of a network that has run long enough to fill its
//! buckets. Every node serves the DHT (the simulator does not model NAT). Crashed peers stay in
//! tables; asking one costs a request and gets no answer.

use std::collections::BTreeSet;

use aimatrix_protocol::hash::Digest;
use rand::rngs::ChaCha8Rng;
use rand::RngExt;

/// The 64-bit Kademlia key of some bytes.
pub(super) fn key_of(bytes: &[u8]) -> u64 {
    let d = Digest::of(bytes);
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.0[..8]);
    u64::from_be_bytes(first)
}

/// What one lookup cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Lookup {
    /// Rounds of up to `alpha` parallel requests, until the `k` closest have all answered.
    pub(super) rounds: u32,
    /// The round whose answers first named the closest peer found (0: the initiator knew it):
    /// the lookup's path length.
    pub(super) hops: u32,
    /// Requests sent (answered or not).
    pub(super) requests: u64,
    /// Requests that went to a crashed peer.
    pub(super) unanswered: u64,
    /// Peers in answers (each costs a peer entry on the wire).
    pub(super) peers_returned: u64,
    /// The `k` closest running peers found, closest first.
    pub(super) closest: Vec<u32>,
}

/// Routing tables of every node.
pub(super) struct Dht {
    k: usize,
    alpha: usize,
    keys: Vec<u64>,
    /// Every node's contacts, bucket by bucket.
    tables: Vec<Vec<u32>>,
    /// Where each node's bucket `i` starts in its table (`i` in 0..=64; entry 64 is the end).
    bucket_starts: Vec<[u32; 65]>,
    /// `candidate[p] == lookup_stamp` while peer `p` is a candidate of the lookup in progress
    /// (a lookup merges hundreds of answers; scanning its candidates for each was quadratic).
    candidate: Vec<u32>,
    lookup_stamp: u32,
}

impl Dht {
    /// Tables for nodes with `keys`, each bucket filled with up to `k` random peers of its range.
    pub(super) fn new(keys: Vec<u64>, k: u32, alpha: u32, rng: &mut ChaCha8Rng) -> Self {
        let k = k.max(1) as usize;
        let mut sorted: Vec<(u64, u32)> =
            keys.iter().enumerate().map(|(i, key)| (*key, i as u32)).collect();
        sorted.sort_unstable();
        let mut tables = Vec::with_capacity(keys.len());
        let mut bucket_starts = Vec::with_capacity(keys.len());
        for &x in &keys {
            let mut table = Vec::new();
            let mut starts = [0u32; 65];
            for bit in 0..64u32 {
                starts[bit as usize] = table.len() as u32;
                // Keys at distance [2^bit, 2^(bit+1)) from x: x's prefix above `bit`, the
                // opposite of x at `bit`, anything below.
                let low_mask = if bit == 0 { 0 } else { (1u64 << bit) - 1 };
                let lo = (x ^ (1u64 << bit)) & !low_mask;
                let hi = lo | low_mask;
                let from = sorted.partition_point(|(key, _)| *key < lo);
                let to = sorted.partition_point(|(key, _)| *key <= hi);
                let range = &sorted[from..to];
                if range.len() <= k {
                    table.extend(range.iter().map(|(_, i)| *i));
                } else {
                    let mut picked = BTreeSet::new();
                    while picked.len() < k {
                        picked.insert(range[rng.random_range(0..range.len())].1);
                    }
                    table.extend(picked);
                }
            }
            starts[64] = table.len() as u32;
            tables.push(table);
            bucket_starts.push(starts);
        }
        let candidate = vec![0; keys.len()];
        Self {
            k,
            alpha: alpha.max(1) as usize,
            keys,
            tables,
            bucket_starts,
            candidate,
            lookup_stamp: 0,
        }
    }

    /// The `k` contacts of `node` closest to `target`, closest first.
    ///
    /// With `b` the highest bit in which `node` and `target` differ, the contacts of bucket `b`
    /// are closer to `target` than `2^b`, those of the buckets below lie in `[2^b, 2^(b+1))`,
    /// and those of each bucket `c` above in `[2^c, 2^(c+1))`. So only the buckets in that
    /// order until `k` contacts are in hand need their distances measured.
    fn closest_known(&self, node: u32, target: u64, out: &mut Vec<(u64, u32)>) {
        out.clear();
        let table = &self.tables[node as usize];
        let starts = &self.bucket_starts[node as usize];
        let keys = &self.keys;
        let take = |out: &mut Vec<(u64, u32)>, from: u32, to: u32| {
            let bucket = &table[from as usize..to as usize];
            out.extend(bucket.iter().map(|&p| (keys[p as usize] ^ target, p)));
        };
        let apart = self.keys[node as usize] ^ target;
        if apart == 0 {
            take(out, 0, starts[64]);
        } else {
            let b = 63 - apart.leading_zeros() as usize;
            take(out, starts[b], starts[b + 1]);
            if out.len() < self.k {
                take(out, starts[0], starts[b]);
            }
            for c in b + 1..64 {
                if out.len() >= self.k {
                    break;
                }
                take(out, starts[c], starts[c + 1]);
            }
        }
        if out.len() > self.k {
            out.select_nth_unstable(self.k - 1);
            out.truncate(self.k);
        }
        out.sort_unstable();
    }

    /// An iterative lookup of `target` started by `from`: query the `alpha` closest peers not
    /// yet asked, merge their answers, until the `k` closest peers heard of have all been asked.
    pub(super) fn lookup(&mut self, from: u32, target: u64, up: impl Fn(u32) -> bool) -> Lookup {
        let mut result = Lookup::default();
        let mut answer = Vec::new();
        self.closest_known(from, target, &mut answer);
        self.lookup_stamp = self.lookup_stamp.wrapping_add(1);
        if self.lookup_stamp == 0 {
            self.candidate.fill(0);
            self.lookup_stamp = 1;
        }
        let stamp = self.lookup_stamp;
        // (distance, peer, asked, answered, round it was first heard of)
        let mut candidates: Vec<(u64, u32, bool, bool, u32)> =
            answer.iter().map(|&(d, p)| (d, p, false, false, 0)).collect();
        for c in &candidates {
            self.candidate[c.1 as usize] = stamp;
        }
        loop {
            let round: Vec<u32> = candidates
                .iter()
                .take(self.k)
                .filter(|c| !c.2)
                .take(self.alpha)
                .map(|c| c.1)
                .collect();
            if round.is_empty() {
                break;
            }
            result.rounds += 1;
            for peer in round {
                result.requests += 1;
                let alive = up(peer);
                if let Some(c) = candidates.iter_mut().find(|c| c.1 == peer) {
                    c.2 = true;
                    c.3 = alive;
                }
                if !alive {
                    result.unanswered += 1;
                    continue;
                }
                self.closest_known(peer, target, &mut answer);
                result.peers_returned += answer.len() as u64;
                for &(d, p) in &answer {
                    if p != from && self.candidate[p as usize] != stamp {
                        self.candidate[p as usize] = stamp;
                        candidates.push((d, p, false, false, result.rounds));
                    }
                }
            }
            // Unanswered peers drop out of the closest set (and may be heard of again).
            let candidate = &mut self.candidate;
            candidates.retain(|c| {
                let keep = !c.2 || c.3;
                if !keep {
                    candidate[c.1 as usize] = 0;
                }
                keep
            });
            candidates.sort_unstable();
        }
        result.hops = candidates.first().map_or(0, |c| c.4);
        result.closest = candidates.iter().take(self.k).map(|c| c.1).collect();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn closest_contacts_match_a_scan_of_the_whole_table() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let keys: Vec<u64> = (0..3_000u32).map(|i| key_of(&i.to_le_bytes())).collect();
        let dht = Dht::new(keys.clone(), 20, 3, &mut rng);
        let mut got = Vec::new();
        for node in (0..3_000u32).step_by(37) {
            for target in [key_of(&node.to_be_bytes()), keys[node as usize], keys[7], 0, u64::MAX] {
                dht.closest_known(node, target, &mut got);
                let mut all: Vec<(u64, u32)> = dht.tables[node as usize]
                    .iter()
                    .map(|&p| (keys[p as usize] ^ target, p))
                    .collect();
                all.sort_unstable();
                all.truncate(20);
                assert_eq!(got, all, "node {node}, target {target:x}");
            }
        }
    }

    #[test]
    fn lookups_find_the_true_closest_peers_in_a_few_hops() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 5_000u32;
        let keys: Vec<u64> = (0..n).map(|i| key_of(&i.to_le_bytes())).collect();
        let mut dht = Dht::new(keys.clone(), 20, 3, &mut rng);
        let target = key_of(b"some record");
        let mut truth: Vec<(u64, u32)> = (0..n).map(|i| (keys[i as usize] ^ target, i)).collect();
        truth.sort_unstable();
        let found = dht.lookup(7, target, |_| true);
        let best: Vec<u32> = truth.iter().filter(|t| t.1 != 7).take(20).map(|t| t.1).collect();
        assert_eq!(found.closest, best, "{found:?}");
        assert!((1..=4).contains(&found.hops), "{found:?}");
        assert!(found.rounds >= found.hops && found.rounds <= 12, "{found:?}");
        assert!(found.requests >= 20, "the k closest are all asked: {found:?}");
        // With a third of the peers down, the lookup still ends and skips them.
        let partial = dht.lookup(7, target, |p| p % 3 != 0);
        assert!(partial.unanswered > 0 && partial.closest.iter().all(|p| p % 3 != 0));
    }
}
