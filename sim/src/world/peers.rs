//! Connections among nodes, decided by the node's own `aimatrix_protocol::mesh::PeerSet`, and
//! connections from nodes to relays.
//!
//! Each node runs the `PeerSet` the node's swarm runs: the simulator feeds it what a swarm would
//! see (a walk's answers, connections opened and closed, dials that failed) and carries out its
//! actions. A walk is a routed Kademlia lookup of a random key ([`super::kad`]); every peer it
//! finds is heard of. A dial opens a connection after a handshake (TCP, Noise and yamux: about
//! two round trips, [`HANDSHAKE_ONE_WAYS`] one-way link delays) when the peer is running and on
//! the same side of any partition; a dial to a crashed peer is refused one round trip later; a
//! dial across a partition never answers and times out in the `PeerSet`. Both ends of a new
//! connection learn it is a node (identify). A node's set is polled again at the instant
//! [`PeerSet::poll_timeout`] names, and after every input.
//!
//! Relays: a node connects to the relay it was given when it starts, and to another relay the
//! first time one of them sends the other a message (a claim to a relay its roster vouches
//! for), paying the same handshake.

use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::mesh::{MeshAction, PeerKind, PeerSet};
use aimatrix_protocol::time::Millis;
use rand::RngExt;

use super::{Endpoint, Event, Sim};

/// One-way link delays a connection's handshake takes before its first message can be sent.
pub(super) const HANDSHAKE_ONE_WAYS: u64 = 4;

/// A node's `PeerSet` and the instant its timer is armed for.
pub(super) struct PeerSlot {
    pub(super) set: PeerSet,
    timer_at: Option<Millis>,
}

impl PeerSlot {
    pub(super) fn new(id: NodeId, target: usize, seed: u64) -> Self {
        Self { set: PeerSet::new(id, target, seed), timer_at: None }
    }
}

impl Sim {
    /// The relay node `i` was given.
    pub(super) fn given_relay(&self, i: u32) -> u32 {
        i % self.relays.len() as u32
    }

    /// Node `i` starts (at its first timer, or a restart): it connects to its relay and its
    /// peer set starts looking for peers.
    pub(super) fn start_node(&mut self, i: u32) {
        let r = self.given_relay(i);
        let slot = &mut self.nodes[i as usize];
        slot.started = true;
        slot.relay_links |= 1 << r;
        let (now, id) = (self.now, slot.core.id());
        self.relays[r as usize].core.peer_connected(now, id);
        self.drain(Endpoint::Relay(r));
        self.poll_peers(i);
    }

    /// The delay of a connection handshake between `a` and `b`.
    pub(super) fn handshake_ms(&self, a: Endpoint, b: Endpoint) -> u64 {
        HANDSHAKE_ONE_WAYS * (self.sc.network.base_ms + self.access_ms(a) + self.access_ms(b))
    }

    /// When a message `from` sends `to` now may leave: now if they are connected; otherwise
    /// after a handshake, the connection then being open (a node to a relay or the reverse).
    pub(super) fn connect_for_send(&mut self, from: Endpoint, to: Endpoint) -> Millis {
        let ((Endpoint::Node(node), Endpoint::Relay(relay))
        | (Endpoint::Relay(relay), Endpoint::Node(node))) = (from, to)
        else {
            return self.now;
        };
        let bit = 1u64 << relay;
        if self.nodes[node as usize].relay_links & bit != 0 {
            return self.now;
        }
        self.nodes[node as usize].relay_links |= bit;
        self.overlay.stats.relay_dials += 1;
        let (now, id) = (self.now, self.nodes[node as usize].core.id());
        self.relays[relay as usize].core.peer_connected(now, id);
        now + self.handshake_ms(from, to)
    }

    /// Runs node `i`'s peer set: its actions now, then its timer.
    pub(super) fn poll_peers(&mut self, i: u32) {
        let slot = &self.nodes[i as usize];
        if !slot.up || !slot.started {
            return;
        }
        let now = self.now;
        let actions = self.peers[i as usize].set.poll(now);
        for action in actions {
            match action {
                MeshAction::Walk => self.walk(i),
                MeshAction::Dial(peer) => self.dial(i, peer),
                MeshAction::Disconnect(peer) => {
                    if let Some(&Endpoint::Node(j)) = self.ids.get(&peer) {
                        self.close(i, j);
                        self.poll_peers(j);
                    }
                }
            }
        }
        let at = self.peers[i as usize].set.poll_timeout();
        if at == Millis::MAX {
            return; // only an input gives it something to do
        }
        let at = at.max(now + 1);
        let timer = &mut self.peers[i as usize].timer_at;
        if timer.is_none_or(|t| at < t || t <= now) {
            *timer = Some(at);
            let incarnation = self.nodes[i as usize].incarnation;
            self.queue.push(at, Event::PeerTimer { node: i, incarnation });
        }
    }

    /// Node `i`'s peer-set timer fired.
    pub(super) fn peer_timer(&mut self, i: u32, incarnation: u32) {
        let slot = &self.nodes[i as usize];
        if slot.incarnation != incarnation || self.peers[i as usize].timer_at != Some(self.now) {
            return; // superseded, or the node restarted since
        }
        self.peers[i as usize].timer_at = None;
        self.poll_peers(i);
    }

    /// A random walk: a Kademlia lookup of a random key; every peer found is heard of.
    fn walk(&mut self, i: u32) {
        self.overlay.stats.walks += 1;
        let target: u64 = self.rng.random();
        let found = self.dht_lookup(i, target);
        for j in found {
            let id = self.nodes[j as usize].core.id();
            self.peers[i as usize].set.heard_of(id);
        }
    }

    /// Node `i` dials `peer`.
    fn dial(&mut self, i: u32, peer: NodeId) {
        let Some(&Endpoint::Node(j)) = self.ids.get(&peer) else { return };
        self.overlay.stats.dials += 1;
        let (a, b) = (Endpoint::Node(i), Endpoint::Node(j));
        let far = self.partitioned && self.nodes[i as usize].cut != self.nodes[j as usize].cut;
        if far {
            return; // never answers: the peer set times the dial out
        }
        let handshake = self.handshake_ms(a, b);
        let (from_incarnation, to_incarnation) =
            (self.nodes[i as usize].incarnation, self.nodes[j as usize].incarnation);
        let event = if self.nodes[j as usize].up {
            Event::Connected { from: i, to: j, from_incarnation, to_incarnation }
        } else {
            Event::DialRefused { from: i, to: j, from_incarnation }
        };
        // A refusal comes back after one round trip; a connection after the handshake.
        let at = if self.nodes[j as usize].up { handshake } else { handshake / 2 };
        self.queue.push(self.now + at.max(1), event);
    }

    /// A dial from `from` to `to` completed.
    pub(super) fn connected(
        &mut self,
        from: u32,
        to: u32,
        from_incarnation: u32,
        to_incarnation: u32,
    ) {
        let (a, b) = (&self.nodes[from as usize], &self.nodes[to as usize]);
        if !a.up || a.incarnation != from_incarnation {
            return; // the dialer is gone
        }
        let now = self.now;
        let to_id = b.core.id();
        if !b.up || b.incarnation != to_incarnation || !b.started {
            self.peers[from as usize].set.dial_failed(now, to_id);
            self.poll_peers(from);
            return;
        }
        let from_id = a.core.id();
        let d_lo = self.sc.network.gossipsub.d_lo;
        self.overlay.link(from, to, d_lo);
        for (x, other) in [(from, to_id), (to, from_id)] {
            let set = &mut self.peers[x as usize].set;
            set.connected(now, other);
            set.identified(other, PeerKind::Node);
        }
        self.poll_peers(from);
        self.poll_peers(to);
    }

    /// A dial from `from` to `to` was refused (the peer was not running).
    pub(super) fn dial_refused(&mut self, from: u32, to: u32, from_incarnation: u32) {
        let a = &self.nodes[from as usize];
        if !a.up || a.incarnation != from_incarnation {
            return;
        }
        let id = self.nodes[to as usize].core.id();
        let now = self.now;
        self.peers[from as usize].set.dial_failed(now, id);
        self.poll_peers(from);
    }

    /// Closes the connection between nodes `a` and `b`; both peer sets hear of it.
    fn close(&mut self, a: u32, b: u32) {
        if !self.overlay.linked(a, b) {
            return;
        }
        let d_lo = self.sc.network.gossipsub.d_lo;
        self.overlay.unlink(a, b, d_lo);
        let now = self.now;
        let (id_a, id_b) = (self.nodes[a as usize].core.id(), self.nodes[b as usize].core.id());
        self.peers[a as usize].set.disconnected(now, id_b);
        self.peers[b as usize].set.disconnected(now, id_a);
    }

    /// Node `i` crashed: every connection it had closes, and its peers look for others.
    pub(super) fn drop_connections(&mut self, i: u32) {
        let peers = self.overlay.links_of(i).to_vec();
        for j in &peers {
            self.close(i, *j);
        }
        for j in peers {
            self.poll_peers(j);
        }
        let id = self.nodes[i as usize].core.id();
        let links = self.nodes[i as usize].relay_links;
        for r in 0..self.relays.len() {
            if links & (1 << r) != 0 {
                self.relays[r].core.peer_disconnected(&id);
            }
        }
        let slot = &mut self.nodes[i as usize];
        slot.relay_links = 0;
        slot.started = false;
        self.peers[i as usize].timer_at = None;
    }

    /// The started peers closest to `target` that a lookup from node `i` finds (without a DHT,
    /// `k` random started nodes).
    fn dht_lookup(&mut self, i: u32, target: u64) -> Vec<u32> {
        let nodes = &self.nodes;
        let up = |p: u32| {
            let n = &nodes[p as usize];
            n.up && n.started && n.cut == nodes[i as usize].cut
        };
        match self.overlay.dht_mut() {
            Some(dht) => {
                let found = dht.lookup(i, target, up);
                self.overlay.count_lookup(&found, self.sc.network.kademlia.peer_entry_bytes);
                found.closest
            }
            None => {
                let n = self.nodes.len() as u32;
                let k = self.sc.network.kademlia.k;
                (0..k).map(|_| self.rng.random_range(0..n)).filter(|&j| j != i && up(j)).collect()
            }
        }
    }
}
