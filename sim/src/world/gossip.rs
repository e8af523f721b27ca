//! The announcement and discovery overlays: a gossipsub mesh and a Kademlia DHT.
//!
//! Connections: every node keeps the connections its `aimatrix_protocol::mesh::PeerSet`
//! decides (the same set the node's swarm runs; driven in [`super::peers`]), and one to the
//! relay it was given; it connects to another relay the first time it sends that relay a
//! message. Relays are connected to each other.
//!
//! Gossipsub: every node keeps a mesh of `d` peers drawn from its connections (grafting below
//! `d_lo`, refusing grafts above `d_hi`). A relay publishes to every node connected to it and
//! to the other relays (`flood_publish`), or to `d` of its nodes; each other relay forwards
//! what it receives to `d` of its own nodes (its mesh). Every node forwards a message to its
//! mesh peers on first receipt (before its core validates it, as our gossipsub config does);
//! later copies are duplicates its message-id cache drops. One publish is computed at once as
//! a shortest-path search over the mesh whose edge weights are the sampled link latencies, so
//! a message costs O(nodes × d) work and no queue events besides one delivery per node. A
//! node the mesh did not reach learns the id from a peer's IHAVE at that peer's next heartbeat
//! and fetches it with IWANT. IHAVE traffic is counted per heartbeat: every node running sends
//! IHAVE to `d_lazy` peers while its gossip window (`history_gossip` heartbeats) holds ids.
//!
//! Adverts are costed, not routed through the mesh: a relay the node is connected to hears it
//! on that link, the others one relay hop later (the given relay forwards it), the mesh flood
//! to every node adds its copies and duplicates, and the DHT put of the advert record (and,
//! once per start, the provider records of the node's capability classes) runs an iterative
//! Kademlia lookup over the nodes' routing tables ([`super::kad`]) and stores at the `k`
//! closest peers found.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::rc::Rc;

use aimatrix_protocol::capability::{advert_record_key, capability_classes, class_provider_key};
use aimatrix_protocol::time::Millis;
use rand::rngs::ChaCha8Rng;
use rand::RngExt;

use super::kad::{key_of, Dht};
use super::{profile_of, Carried, Endpoint, Event, Sim};
use crate::scenario::{GossipMode, Scenario};
use crate::stats::{OverlayStats, CONTROL_BYTES};

/// Not reached (yet).
const NEVER: Millis = Millis::MAX;
/// No peer: the publisher's own copies.
const NO_PEER: u32 = u32::MAX;
/// Random draws tried when looking for a peer on the same side of a partition.
const PEER_TRIES: usize = 8;

/// Overlay state: the mesh, scratch space for one propagation, counters.
pub(super) struct Overlay {
    /// Each node's connections to other nodes (symmetric).
    links: Vec<Vec<u32>>,
    /// Connections between running nodes.
    link_edges: u64,
    mesh: Vec<Vec<u32>>,
    up: Vec<bool>,
    up_count: u64,
    /// Mesh edges between running nodes.
    edges: u64,
    /// Nodes below `d_lo`, grafting at the next heartbeat.
    needy: BTreeSet<u32>,
    /// Nodes that have put their provider records since they started.
    providing: Vec<bool>,
    /// Provider keys of the capability classes of each hardware class.
    class_keys_by_hardware: Vec<Vec<u64>>,
    /// The DHT, when nodes store adverts in it.
    dht: Option<Dht>,
    kad_hops_total: u64,
    kad_rounds_total: u64,
    /// Publishes in each of the last `history_gossip` heartbeats, and since the last one.
    window: VecDeque<u64>,
    published_since_heartbeat: u64,
    dist: Vec<Millis>,
    /// The earliest copy of the propagation in progress on its way to each node: (arrival,
    /// sender). A later copy of a node not yet reached never leaves the heap first, so it is
    /// counted as a duplicate at once instead of being queued.
    best: Vec<(Millis, u32)>,
    heap: BinaryHeap<Reverse<(Millis, u32, u32)>>,
    reached: Vec<u32>,
    pub(super) stats: OverlayStats,
}

impl Overlay {
    /// No connections and no mesh yet (nodes connect as they start), and the DHT routing
    /// tables of the nodes with these `keys`.
    pub(super) fn new(sc: &Scenario, keys: Vec<u64>, rng: &mut ChaCha8Rng) -> Self {
        let n = sc.nodes as usize;
        let kad = &sc.network.kademlia;
        let dht = kad.enabled.then(|| Dht::new(keys, kad.k, kad.alpha, rng));
        Self {
            links: vec![Vec::new(); n],
            link_edges: 0,
            mesh: vec![Vec::new(); n],
            up: vec![true; n],
            up_count: n as u64,
            edges: 0,
            needy: BTreeSet::new(),
            providing: vec![false; n],
            class_keys_by_hardware: (0..sc.hardware.len())
                .map(|c| {
                    let classes = capability_classes(&profile_of(sc, c));
                    classes.iter().map(|class| key_of(&class_provider_key(class))).collect()
                })
                .collect(),
            dht,
            kad_hops_total: 0,
            kad_rounds_total: 0,
            window: VecDeque::new(),
            published_since_heartbeat: 0,
            dist: Vec::new(),
            best: Vec::new(),
            heap: BinaryHeap::new(),
            reached: Vec::new(),
            stats: OverlayStats {
                mode: match sc.network.gossip {
                    GossipMode::Gossipsub => "gossipsub",
                    GossipMode::Direct => "direct",
                }
                .into(),
                ..OverlayStats::default()
            },
        }
    }

    /// Grafts running peers among `i`'s connections onto its mesh, from a random one on, until
    /// it has `d` (a peer at `d_hi` answers PRUNE).
    fn graft(
        &mut self,
        i: u32,
        d: u32,
        d_hi: u32,
        rng: &mut ChaCha8Rng,
        reachable: impl Fn(u32) -> bool,
    ) {
        let count = self.links[i as usize].len();
        if count == 0 {
            return;
        }
        let start = rng.random_range(0..count);
        for k in 0..count {
            if self.mesh[i as usize].len() as u32 >= d {
                break;
            }
            let j = self.links[i as usize][(start + k) % count];
            if !self.up[j as usize] || !reachable(j) || self.mesh[i as usize].contains(&j) {
                continue;
            }
            self.stats.graft += 1;
            if self.mesh[j as usize].len() as u32 >= d_hi {
                self.stats.prune += 1;
                continue;
            }
            self.mesh[i as usize].push(j);
            self.mesh[j as usize].push(i);
            self.edges += 1;
        }
    }

    /// The DHT, when the scenario runs one.
    pub(super) fn dht_mut(&mut self) -> Option<&mut Dht> {
        self.dht.as_mut()
    }

    /// Counts the cost of a lookup that was not a put (a random walk).
    pub(super) fn count_lookup(&mut self, found: &super::kad::Lookup, peer_entry_bytes: u64) {
        let answered = found.requests - found.unanswered;
        self.kad_hops_total += u64::from(found.hops);
        self.kad_rounds_total += u64::from(found.rounds);
        self.stats.kad_lookups += 1;
        self.stats.kad_requests += found.requests;
        self.stats.kad_bytes += found.requests * (CONTROL_BYTES + 32)
            + answered * CONTROL_BYTES
            + found.peers_returned * peer_entry_bytes;
    }

    /// Whether nodes `a` and `b` are connected.
    pub(super) fn linked(&self, a: u32, b: u32) -> bool {
        self.links[a as usize].contains(&b)
    }

    /// Node `i`'s connections to other nodes.
    pub(super) fn links_of(&self, i: u32) -> &[u32] {
        &self.links[i as usize]
    }

    /// Nodes `a` and `b` connected: each grafts the other at its next heartbeat if its mesh is
    /// below `d_lo` (gossipsub adds new subscribed peers to a thin mesh).
    pub(super) fn link(&mut self, a: u32, b: u32, d_lo: u32) {
        if a == b || self.linked(a, b) {
            return;
        }
        self.links[a as usize].push(b);
        self.links[b as usize].push(a);
        self.link_edges += 1;
        for x in [a, b] {
            if (self.mesh[x as usize].len() as u32) < d_lo {
                self.needy.insert(x);
            }
        }
    }

    /// The connection between `a` and `b` closed: it leaves both meshes too, and a peer left
    /// below `d_lo` grafts again at the next heartbeat.
    pub(super) fn unlink(&mut self, a: u32, b: u32, d_lo: u32) {
        if !self.linked(a, b) {
            return;
        }
        self.links[a as usize].retain(|&q| q != b);
        self.links[b as usize].retain(|&q| q != a);
        self.link_edges -= 1;
        if self.mesh[a as usize].contains(&b) {
            self.mesh[a as usize].retain(|&q| q != b);
            self.mesh[b as usize].retain(|&q| q != a);
            self.edges -= 1;
        }
        for x in [a, b] {
            if self.up[x as usize] && (self.mesh[x as usize].len() as u32) < d_lo {
                self.needy.insert(x);
            }
        }
    }

    /// Node `i` crashed (its connections are already closed).
    pub(super) fn node_down(&mut self, i: u32) {
        if !self.up[i as usize] {
            return;
        }
        self.up[i as usize] = false;
        self.up_count -= 1;
        self.providing[i as usize] = false;
        self.needy.remove(&i);
    }

    /// Node `i` restarted: it grafts a mesh from its new connections.
    pub(super) fn node_up(&mut self, i: u32) {
        if !self.up[i as usize] {
            self.up[i as usize] = true;
            self.up_count += 1;
            self.needy.insert(i);
        }
    }

    /// Final numbers.
    pub(super) fn finish(&mut self, sc: &Scenario) -> OverlayStats {
        let mut s = self.stats.clone();
        if self.up_count > 0 {
            let per_node = |edges: u64| (2 * edges) as f64 / self.up_count as f64;
            s.node_links_mean = (per_node(self.link_edges) * 100.0).round() / 100.0;
            if sc.network.gossip == GossipMode::Gossipsub {
                s.mesh_degree_mean = (per_node(self.edges) * 100.0).round() / 100.0;
            }
        }
        if s.kad_lookups > 0 {
            let mean = |total: u64| (total as f64 / s.kad_lookups as f64 * 100.0).round() / 100.0;
            s.kad_hops_mean = mean(self.kad_hops_total);
            s.kad_rounds_mean = mean(self.kad_rounds_total);
        }
        s
    }
}

/// The first heartbeat of node `v` after `t` (each node's heartbeat has its own phase).
fn next_heartbeat(v: u32, t: Millis, heartbeat_ms: u64) -> Millis {
    let phase = (u64::from(v).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % heartbeat_ms;
    let k = (t.saturating_sub(phase)) / heartbeat_ms + 1;
    k * heartbeat_ms + phase
}

impl Sim {
    /// Gossipsub heartbeat: IHAVE accounting and mesh repair.
    pub(super) fn heartbeat(&mut self) {
        let p = self.sc.network.gossipsub.clone();
        let o = &mut self.overlay;
        o.window.push_back(std::mem::take(&mut o.published_since_heartbeat));
        while o.window.len() > p.history_gossip as usize {
            o.window.pop_front();
        }
        let ids: u64 = o.window.iter().sum();
        if ids > 0 {
            let messages = o.up_count * u64::from(p.d_lazy);
            o.stats.ihave += messages;
            o.stats.ihave_bytes += messages * (CONTROL_BYTES + ids * p.message_id_bytes);
        }
        let needy = std::mem::take(&mut self.overlay.needy);
        for i in needy {
            let below = (self.overlay.mesh[i as usize].len() as u32) < p.d_lo;
            if self.overlay.up[i as usize] && below {
                let (partitioned, cut) = (self.partitioned, self.nodes[i as usize].cut);
                let nodes = &self.nodes;
                let reachable = |j: u32| !partitioned || nodes[j as usize].cut == cut;
                self.overlay.graft(i, p.d, p.d_hi, &mut self.rng, reachable);
            }
        }
    }

    /// Publishes a relay's message (an offer, a roster) from relay `r` over the relays and the
    /// mesh, and schedules one delivery per node reached, at its first arrival.
    pub(super) fn spread_from_relay(&mut self, r: u32, bytes: &Rc<[u8]>, carried: Carried) {
        let p = self.sc.network.gossipsub.clone();
        let len = bytes.len() as u64 + p.frame_bytes;
        let n = self.nodes.len();
        let mut heap = std::mem::take(&mut self.overlay.heap);
        let mut dist = std::mem::take(&mut self.overlay.dist);
        let mut best = std::mem::take(&mut self.overlay.best);
        let mut reached = std::mem::take(&mut self.overlay.reached);
        heap.clear();
        dist.clear();
        dist.resize(n, NEVER);
        best.clear();
        best.resize(n, (NEVER, NO_PEER));
        reached.clear();
        let (mut copies, mut duplicates, mut iwant) = (0u64, 0u64, 0u64);
        self.overlay.stats.publishes += 1;
        self.overlay.published_since_heartbeat += 1;
        let now = self.now;
        // The publisher's copies: to its nodes (all of them when flood publishing, else `d`),
        // and to every other relay, which forwards to `d` of its own.
        let own = if p.flood_publish { usize::MAX } else { p.d as usize };
        let mut sends: Vec<(u32, u32, Millis)> =
            self.relay_nodes(r, own).into_iter().map(|i| (r, i, now)).collect();
        for other in 0..self.relays.len() as u32 {
            if other == r {
                continue;
            }
            copies += 1;
            let Some(at) = self.transit(Endpoint::Relay(r), Endpoint::Relay(other), len, now)
            else {
                continue;
            };
            for i in self.relay_nodes(other, p.d as usize) {
                sends.push((other, i, at));
            }
        }
        for (relay, i, at) in sends {
            copies += 1;
            if let Some(at) = self.transit(Endpoint::Relay(relay), Endpoint::Node(i), len, at) {
                if (at, NO_PEER) < best[i as usize] {
                    best[i as usize] = (at, NO_PEER);
                    heap.push(Reverse((at, i, NO_PEER)));
                } else {
                    duplicates += 1;
                }
            }
        }
        let mut peers = Vec::new();
        while let Some(Reverse((t, u, src))) = heap.pop() {
            if dist[u as usize] != NEVER {
                duplicates += 1;
                continue;
            }
            if !self.nodes[u as usize].up {
                continue;
            }
            dist[u as usize] = t;
            reached.push(u);
            peers.clear();
            peers.extend(self.overlay.mesh[u as usize].iter().copied().filter(|&v| v != src));
            for &v in &peers {
                copies += 1;
                let Some(at) = self.transit(Endpoint::Node(u), Endpoint::Node(v), len, t) else {
                    continue;
                };
                if dist[v as usize] != NEVER {
                    duplicates += 1;
                } else if (at, u) < best[v as usize] {
                    best[v as usize] = (at, u);
                    heap.push(Reverse((at, v, u)));
                } else if self.nodes[v as usize].up {
                    // Behind an earlier copy: popped, it would have found `v` reached.
                    duplicates += 1;
                }
            }
        }
        // Lazy gossip: a node the mesh missed hears the id in a peer's IHAVE at that peer's
        // next heartbeat, asks with IWANT and gets the message.
        if !reached.is_empty() {
            for u in 0..n as u32 {
                let node = &self.nodes[u as usize];
                // A node not started yet has no peer to hear an IHAVE from.
                if !node.up || !node.started || dist[u as usize] != NEVER {
                    continue;
                }
                let cut = self.nodes[u as usize].cut;
                let mut holder = None;
                for _ in 0..PEER_TRIES {
                    let v = reached[self.rng.random_range(0..reached.len())];
                    if !self.partitioned || self.nodes[v as usize].cut == cut {
                        holder = Some(v);
                        break;
                    }
                }
                let Some(v) = holder else { continue };
                let hb = next_heartbeat(v, dist[v as usize], p.heartbeat_ms);
                let (a, b) = (Endpoint::Node(v), Endpoint::Node(u));
                let Some(ihave) = self.transit(a, b, CONTROL_BYTES, hb) else { continue };
                iwant += 1;
                let Some(asked) = self.transit(b, a, CONTROL_BYTES, ihave) else { continue };
                copies += 1;
                let Some(at) = self.transit(a, b, len, asked) else { continue };
                dist[u as usize] = at;
                reached.push(u);
            }
        }
        for &u in &reached {
            let event = Event::Deliver {
                to: Endpoint::Node(u),
                from: None,
                sent_at: now,
                carried,
                bytes: bytes.clone(),
            };
            self.queue.push(dist[u as usize], event);
        }
        let s = &mut self.overlay.stats;
        s.gossip_copies += copies;
        s.gossip_bytes += copies * len;
        s.gossip_duplicates += duplicates;
        s.iwant += iwant;
        self.overlay.heap = heap;
        self.overlay.dist = dist;
        self.overlay.best = best;
        self.overlay.reached = reached;
    }

    /// Up to `most` running nodes connected to relay `r`: all of them, or a random draw (the
    /// relay's mesh). The nodes given `r` are `r`, `r + relays`, ...; nodes given another relay
    /// that connected to `r` are not drawn for its mesh.
    fn relay_nodes(&mut self, r: u32, most: usize) -> Vec<u32> {
        let n = self.nodes.len() as u32;
        let step = self.relays.len() as u32;
        let bit = 1u64 << r;
        let connected = |nodes: &[super::NodeSlot], i: u32| {
            let slot = &nodes[i as usize];
            slot.up && slot.relay_links & bit != 0
        };
        if most == usize::MAX {
            return (0..n).filter(|&i| connected(&self.nodes, i)).collect();
        }
        let given = n.saturating_sub(r).div_ceil(step);
        let mut picked = BTreeSet::new();
        for _ in 0..PEER_TRIES * most {
            if picked.len() >= most || given == 0 {
                break;
            }
            let i = r + step * self.rng.random_range(0..given);
            if connected(&self.nodes, i) {
                picked.insert(i);
            }
        }
        picked.into_iter().collect()
    }

    /// The cost of an advert's mesh flood: every running node forwards it once to each mesh
    /// peer but the one it came from; all but the first copy a node gets are duplicates.
    pub(super) fn spread_advert_cost(&mut self, len: u64) {
        let len = len + self.sc.network.gossipsub.frame_bytes;
        let o = &mut self.overlay;
        o.stats.publishes += 1;
        o.published_since_heartbeat += 1;
        let copies = (2 * o.edges + 1).saturating_sub(o.up_count);
        o.stats.gossip_copies += copies;
        o.stats.gossip_bytes += copies * len;
        o.stats.gossip_duplicates += copies.saturating_sub(o.up_count.saturating_sub(1));
    }

    /// Node `i` stores its advert in the DHT, as the node driver does at every advert: a lookup
    /// of the `k` peers closest to the record key, then a PUT_VALUE to each (whose answer
    /// echoes the record); once per start, the same with ADD_PROVIDER for the provider record
    /// of each of its capability classes.
    pub(super) fn put_advert_in_dht(&mut self, i: u32, len: u64) {
        let kad = self.sc.network.kademlia.clone();
        let Some(dht) = self.overlay.dht.as_mut() else { return };
        let nodes = &self.nodes;
        let up = |p: u32| nodes[p as usize].up && !nodes[p as usize].cut;
        let record = key_of(&advert_record_key(&self.nodes[i as usize].core.id()));
        let mut stores = vec![(record, CONTROL_BYTES + 32 + len, CONTROL_BYTES + 32 + len)];
        if !self.overlay.providing[i as usize] {
            let entry = CONTROL_BYTES + 32 + kad.peer_entry_bytes;
            for &key in &self.overlay.class_keys_by_hardware[self.nodes[i as usize].class] {
                stores.push((key, entry, CONTROL_BYTES));
            }
        }
        let (mut lookups, mut hops, mut rounds, mut requests, mut bytes) = (0u64, 0, 0, 0, 0);
        for (key, store_bytes, answer_bytes) in stores {
            let found = dht.lookup(i, key, up);
            lookups += 1;
            hops += u64::from(found.hops);
            rounds += u64::from(found.rounds);
            let answered = found.requests - found.unanswered;
            requests += found.requests + found.closest.len() as u64;
            bytes += found.requests * (CONTROL_BYTES + 32)
                + answered * CONTROL_BYTES
                + found.peers_returned * kad.peer_entry_bytes
                + found.closest.len() as u64 * (store_bytes + answer_bytes);
        }
        let o = &mut self.overlay;
        o.providing[i as usize] = true;
        o.kad_hops_total += hops;
        o.kad_rounds_total += rounds;
        o.stats.kad_lookups += lookups;
        o.stats.kad_requests += requests;
        o.stats.kad_bytes += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_come_after_the_instant() {
        for v in 0..50 {
            let hb = next_heartbeat(v, 12_345, 1_000);
            assert!(hb > 12_345 && hb <= 13_345, "{hb}");
        }
    }
}
