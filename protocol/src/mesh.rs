//! Which peers a node keeps connections to (issue 17, docs/mesh.md): a target number of other
//! nodes, found through the DHT, so that gossip (adverts, offers) travels over a mesh among
//! nodes instead of one hop from a relay. Sans-IO: `aimatrix-net` feeds it what the swarm sees
//! and carries out the [`MeshAction`]s it returns; the simulator runs the same set.
//!
//! The rules: dial known nodes, best ranked first, while fewer than the target are connected
//! (at most [`DIALS_IN_FLIGHT_MAX`] at a time, a failed dial retried after a doubling delay,
//! a peer forgotten after [`DIAL_FAILURES_MAX`] failures); drop the worst ranked node peers
//! when more than twice the target are connected (others dial us too); never dial or drop a
//! relay (the driver keeps the relays it works for); ask the DHT for more peers (a random walk)
//! every [`WALK_EVERY_BELOW_TARGET_MS`] while below the target, every [`WALK_EVERY_MS`]
//! while the list of candidates is not full, and not at all once the target is met and the
//! list is full (Kademlia refreshes its own routing table). A peer's rank is a hash of the node's own seed and the peer's id: random across
//! nodes, so the mesh does not converge on the same few peers, but stable for one node.
//!
//! ```
//! use aimatrix_protocol::mesh::{MeshAction, PeerKind, PeerSet};
//! use aimatrix_protocol::testkit;
//!
//! let me = testkit::keypair(1).public();
//! let mut set = PeerSet::new(me, 4, 7);
//! assert_eq!(set.poll(0), vec![MeshAction::Walk]); // nothing known yet: ask the DHT
//! let other = testkit::keypair(2).public();
//! set.heard_of(other);
//! assert_eq!(set.poll(1), vec![MeshAction::Dial(other)]);
//! set.connected(2, other);
//! set.identified(other, PeerKind::Node);
//! assert_eq!(set.node_peers(), 1);
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::hash::Digest;
use crate::identity::NodeId;
use crate::time::Millis;

/// The number of other nodes a node keeps connections to, by default.
pub const NODE_PEERS_DEFAULT: usize = 12;
/// The smallest target allowed (fewer would let the mesh fall apart as nodes leave).
pub const NODE_PEERS_MIN: usize = 4;
/// The largest target allowed.
pub const NODE_PEERS_MAX: usize = 64;
/// How often the DHT is asked for more peers while the target is met.
pub const WALK_EVERY_MS: Millis = 60_000;
/// How often the DHT is asked for more peers while below the target.
pub const WALK_EVERY_BELOW_TARGET_MS: Millis = 5_000;
/// Dials started and not answered yet, at most.
pub const DIALS_IN_FLIGHT_MAX: usize = 8;
/// A dial that has not connected or failed by then counts as failed.
pub const DIAL_TIMEOUT_MS: Millis = 30_000;
/// The delay before a peer whose dial failed is dialed again; it doubles with each failure.
pub const REDIAL_AFTER_MS: Millis = 10_000;
/// Failed dials after which a peer is forgotten (until it is heard of again).
pub const DIAL_FAILURES_MAX: u32 = 6;
/// Peers remembered per peer of the target, at most (48 for the default target); beyond it
/// the worst are forgotten. Enough to dial again from after churn without a walk (up to twice
/// the target are connected, as many again wait), small enough that a simulator holding
/// 100,000 sets pays a few KiB a node.
pub const KNOWN_PEERS_PER_TARGET: usize = 4;

/// What a connected peer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    /// A relay: never counted toward the target, never dialed or dropped here.
    Relay,
    /// A node (or any peer that is not a relay).
    Node,
}

/// What the driver should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshAction {
    /// Dial this peer (at the addresses the DHT gave for it).
    Dial(NodeId),
    /// Close every connection to this peer.
    Disconnect(NodeId),
    /// Ask the DHT for the peers closest to a random key, and report each with
    /// [`PeerSet::heard_of`].
    Walk,
}

/// A peer heard of.
#[derive(Clone, Copy, Debug)]
struct Known {
    rank: u64,
    failures: u32,
    retry_at_ms: Millis,
    relay: bool,
}

/// The peers one node keeps connections to. See the module documentation.
#[derive(Clone, Debug)]
pub struct PeerSet {
    local: NodeId,
    target: usize,
    seed: u64,
    known: BTreeMap<NodeId, Known>,
    /// Connected peers and their kind, once identified.
    connected: BTreeMap<NodeId, Option<PeerKind>>,
    /// Dials in flight, with when each started.
    dialing: BTreeMap<NodeId, Millis>,
    /// Peers identified as relays (kept when they disconnect, so they are never dialed here).
    relays: BTreeSet<NodeId>,
    /// Peers this set asked to disconnect that are still connected (asked once).
    closing: BTreeSet<NodeId>,
    next_walk_ms: Millis,
}

impl PeerSet {
    /// The set of the node `local`, keeping `target` node peers (clamped to
    /// [`NODE_PEERS_MIN`]..=[`NODE_PEERS_MAX`]); `seed` ranks peers (the driver passes a random
    /// number, the simulator one from its generator).
    pub fn new(local: NodeId, target: usize, seed: u64) -> Self {
        Self {
            local,
            target: target.clamp(NODE_PEERS_MIN, NODE_PEERS_MAX),
            seed,
            known: BTreeMap::new(),
            connected: BTreeMap::new(),
            dialing: BTreeMap::new(),
            relays: BTreeSet::new(),
            closing: BTreeSet::new(),
            next_walk_ms: 0,
        }
    }

    /// The number of node peers this set keeps.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Connected peers that are not relays (a peer not identified yet counts as a node).
    pub fn node_peers(&self) -> usize {
        self.connected.values().filter(|kind| **kind != Some(PeerKind::Relay)).count()
    }

    /// Whether `peer` is one of this set's connected peers (a node it dialed, or one that chose
    /// it).
    pub fn holds(&self, peer: &NodeId) -> bool {
        self.connected.contains_key(peer)
    }

    /// Whether this set asked to dial `peer` and has not heard back.
    pub fn is_dialing(&self, peer: &NodeId) -> bool {
        self.dialing.contains_key(peer)
    }

    /// Peers remembered as candidates.
    pub fn known_peers(&self) -> usize {
        self.known.len()
    }

    /// Peers remembered, at most.
    pub fn known_max(&self) -> usize {
        self.target * KNOWN_PEERS_PER_TARGET
    }

    /// The earliest instant at which [`PeerSet::poll`] has something to do (a walk, a dial
    /// timing out, a peer to dial again), given no other input meanwhile; at or before now
    /// when it has something to do at once; `Millis::MAX` when only an input can give it
    /// something to do. The swarm polls on a tick; the simulator arms a timer at this instant.
    pub fn poll_timeout(&self) -> Millis {
        let mut at = if self.wants_peers() { self.next_walk_ms } else { Millis::MAX };
        for started in self.dialing.values() {
            at = at.min(started.saturating_add(DIAL_TIMEOUT_MS));
        }
        let wanted = self.target > self.node_peers() + self.dialing.len();
        if wanted && self.dialing.len() < DIALS_IN_FLIGHT_MAX {
            for (peer, known) in &self.known {
                if self.is_candidate(peer, known) {
                    at = at.min(known.retry_at_ms);
                }
            }
        }
        at
    }

    /// Whether a walk's answer could change anything: the target is not met, or the list of
    /// candidates is not full. (Kademlia refreshes its own routing table; a walk is this set's
    /// way to find peers, not a keep-alive.)
    fn wants_peers(&self) -> bool {
        self.node_peers() < self.target || self.known.len() < self.known_max()
    }

    /// A known peer this set could dial (whenever its retry time has come).
    fn is_candidate(&self, peer: &NodeId, known: &Known) -> bool {
        !known.relay && !self.connected.contains_key(peer) && !self.dialing.contains_key(peer)
    }

    /// The DHT (a walk, the routing table) named `peer`. Once the list is full it takes new
    /// peers only while the target is not met.
    pub fn heard_of(&mut self, peer: NodeId) {
        if peer == self.local || self.known.contains_key(&peer) {
            return;
        }
        if self.known.len() >= self.known_max() {
            // With the target met, the candidates it has are enough; below it, one that failed
            // (or ranks worst) makes room.
            if self.node_peers() >= self.target || !self.forget_worst() {
                return;
            }
        }
        let relay = self.relays.contains(&peer);
        let rank = self.rank(&peer);
        self.known.insert(peer, Known { rank, failures: 0, retry_at_ms: 0, relay });
    }

    /// A first connection to `peer` opened (either side dialed).
    pub fn connected(&mut self, _now_ms: Millis, peer: NodeId) {
        self.dialing.remove(&peer);
        if let Some(known) = self.known.get_mut(&peer) {
            known.failures = 0;
            known.retry_at_ms = 0;
        }
        let kind = self.relays.contains(&peer).then_some(PeerKind::Relay);
        self.connected.insert(peer, kind);
    }

    /// `peer` said what it is.
    pub fn identified(&mut self, peer: NodeId, kind: PeerKind) {
        if let Some(slot) = self.connected.get_mut(&peer) {
            *slot = Some(kind);
        }
        if kind == PeerKind::Relay {
            self.relays.insert(peer);
            if let Some(known) = self.known.get_mut(&peer) {
                known.relay = true;
            }
        }
    }

    /// The last connection to `peer` closed.
    pub fn disconnected(&mut self, _now_ms: Millis, peer: NodeId) {
        self.connected.remove(&peer);
        self.closing.remove(&peer);
    }

    /// A dial to `peer` failed (no address worked).
    pub fn dial_failed(&mut self, now_ms: Millis, peer: NodeId) {
        if self.dialing.remove(&peer).is_none() {
            return; // not our dial
        }
        self.count_failure(now_ms, peer);
    }

    /// What to do now: dials, disconnects, a walk.
    pub fn poll(&mut self, now_ms: Millis) -> Vec<MeshAction> {
        let mut actions = Vec::new();
        let timed_out: Vec<NodeId> = self
            .dialing
            .iter()
            .filter(|(_, started)| now_ms.saturating_sub(**started) >= DIAL_TIMEOUT_MS)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in timed_out {
            self.dialing.remove(&peer);
            self.count_failure(now_ms, peer);
        }

        let nodes = self.node_peers();
        let wanted = self.target.saturating_sub(nodes + self.dialing.len());
        let room = DIALS_IN_FLIGHT_MAX.saturating_sub(self.dialing.len());
        if wanted > 0 && room > 0 {
            let mut candidates: Vec<(u64, NodeId)> = self
                .known
                .iter()
                .filter(|(peer, k)| k.retry_at_ms <= now_ms && self.is_candidate(peer, k))
                .map(|(peer, k)| (k.rank, *peer))
                .collect();
            candidates.sort_unstable();
            for (_, peer) in candidates.into_iter().take(wanted.min(room)) {
                self.dialing.insert(peer, now_ms);
                actions.push(MeshAction::Dial(peer));
            }
        }

        let most = self.target * 2;
        let excess = nodes.saturating_sub(most + self.closing.len());
        if excess > 0 {
            let mut worst: Vec<(u64, NodeId)> = self
                .connected
                .iter()
                .filter(|(peer, kind)| {
                    **kind != Some(PeerKind::Relay) && !self.closing.contains(peer)
                })
                .map(|(peer, _)| (self.rank(peer), *peer))
                .collect();
            worst.sort_unstable_by(|a, b| b.cmp(a));
            for (_, peer) in worst.into_iter().take(excess) {
                self.closing.insert(peer);
                actions.push(MeshAction::Disconnect(peer));
            }
        }

        if now_ms >= self.next_walk_ms && self.wants_peers() {
            actions.push(MeshAction::Walk);
            let below = nodes < self.target;
            let every = if below { WALK_EVERY_BELOW_TARGET_MS } else { WALK_EVERY_MS };
            self.next_walk_ms = now_ms + every;
        }
        actions
    }

    fn count_failure(&mut self, now_ms: Millis, peer: NodeId) {
        let Some(known) = self.known.get_mut(&peer) else { return };
        known.failures += 1;
        if known.failures >= DIAL_FAILURES_MAX {
            self.known.remove(&peer);
            return;
        }
        known.retry_at_ms = now_ms + (REDIAL_AFTER_MS << (known.failures - 1));
    }

    /// Forgets the known peer least worth keeping (most failures, then worst rank) that is
    /// neither connected nor being dialed; false when there is none.
    fn forget_worst(&mut self) -> bool {
        let worst = self
            .known
            .iter()
            .filter(|(peer, _)| {
                !self.connected.contains_key(peer) && !self.dialing.contains_key(peer)
            })
            .max_by_key(|(_, k)| (k.failures, k.rank))
            .map(|(peer, _)| *peer);
        match worst {
            Some(peer) => self.known.remove(&peer).is_some(),
            None => false,
        }
    }

    fn rank(&self, peer: &NodeId) -> u64 {
        let digest = Digest::of_parts(&[&self.seed.to_le_bytes(), peer.as_bytes()]);
        u64::from_le_bytes(digest.0[..8].try_into().expect("a digest has 32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::testkit;

    fn peers(n: u64) -> Vec<NodeId> {
        (100..100 + n).map(|i| testkit::keypair(i).public()).collect()
    }

    fn dials(actions: &[MeshAction]) -> Vec<NodeId> {
        actions
            .iter()
            .filter_map(|a| match a {
                MeshAction::Dial(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn dials_up_to_the_target_in_rank_order_a_few_at_a_time() {
        let mut set = PeerSet::new(testkit::keypair(1).public(), 12, 3);
        let all = peers(40);
        for p in &all {
            set.heard_of(*p);
        }
        let first = dials(&set.poll(0));
        assert_eq!(first.len(), DIALS_IN_FLIGHT_MAX);
        let mut ranked: Vec<_> = all.iter().map(|p| (set.rank(p), *p)).collect();
        ranked.sort_unstable();
        let best: Vec<NodeId> = ranked.iter().take(DIALS_IN_FLIGHT_MAX).map(|r| r.1).collect();
        assert_eq!(first, best);
        assert!(dials(&set.poll(1)).is_empty(), "no room while 8 dials are in flight");
        for p in &first {
            set.connected(2, *p);
            set.identified(*p, PeerKind::Node);
        }
        let second = dials(&set.poll(3));
        assert_eq!(second.len(), 4, "12 wanted, 8 connected");
        for p in &second {
            set.connected(4, *p);
        }
        assert_eq!(set.node_peers(), 12);
        assert!(dials(&set.poll(5)).is_empty(), "the target is met");
    }

    #[test]
    fn a_failed_peer_is_retried_later_and_forgotten_after_repeated_failures() {
        let mut set = PeerSet::new(testkit::keypair(1).public(), 4, 3);
        let p = peers(1)[0];
        set.heard_of(p);
        let mut now = 0;
        for failure in 1..=DIAL_FAILURES_MAX {
            assert_eq!(dials(&set.poll(now)), vec![p], "attempt {failure}");
            set.dial_failed(now, p);
            let delay = REDIAL_AFTER_MS << (failure - 1);
            if failure < DIAL_FAILURES_MAX {
                assert!(dials(&set.poll(now + delay - 1)).is_empty(), "too soon");
            }
            now += delay;
        }
        assert_eq!(set.known_peers(), 0);
        assert!(dials(&set.poll(now)).is_empty());
        // A dial that never answers counts as a failure too.
        set.heard_of(p);
        assert_eq!(dials(&set.poll(now)), vec![p]);
        set.poll(now + DIAL_TIMEOUT_MS);
        assert!(dials(&set.poll(now + DIAL_TIMEOUT_MS + 1)).is_empty());
        assert_eq!(dials(&set.poll(now + DIAL_TIMEOUT_MS + REDIAL_AFTER_MS)), vec![p]);
    }

    #[test]
    fn relays_are_never_dialed_counted_or_dropped() {
        let mut set = PeerSet::new(testkit::keypair(1).public(), 4, 3);
        let all = peers(20);
        let relay = all[0];
        set.connected(0, relay);
        set.identified(relay, PeerKind::Relay);
        set.disconnected(1, relay);
        set.heard_of(relay);
        assert!(!dials(&set.poll(2)).contains(&relay));
        // Many nodes dial in: the worst ranked beyond twice the target are dropped; the relay
        // stays.
        set.connected(3, relay);
        for p in &all[1..] {
            set.connected(3, *p);
            set.identified(*p, PeerKind::Node);
        }
        assert_eq!(set.node_peers(), 19);
        let drops: Vec<NodeId> = set
            .poll(4)
            .into_iter()
            .filter_map(|a| match a {
                MeshAction::Disconnect(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(drops.len(), 19 - 8);
        assert!(!drops.contains(&relay));
        let kept_worst = all[1..].iter().filter(|p| !drops.contains(p)).map(|p| set.rank(p)).max();
        let dropped_best = drops.iter().map(|p| set.rank(p)).min();
        assert!(kept_worst < dropped_best, "the worst ranked are dropped");
        let again = set.poll(5);
        assert!(
            !again.iter().any(|a| matches!(a, MeshAction::Disconnect(_))),
            "a peer is asked to go once, not again while its connection closes: {again:?}"
        );
    }

    #[test]
    fn walks_often_while_below_the_target_and_rarely_once_it_is_met() {
        let mut set = PeerSet::new(testkit::keypair(1).public(), 4, 3);
        let walks = |actions: Vec<MeshAction>| actions.contains(&MeshAction::Walk);
        assert!(walks(set.poll(0)));
        assert!(!walks(set.poll(WALK_EVERY_BELOW_TARGET_MS - 1)));
        assert!(walks(set.poll(WALK_EVERY_BELOW_TARGET_MS)));
        for p in peers(4) {
            set.connected(WALK_EVERY_BELOW_TARGET_MS, p);
        }
        let met = 2 * WALK_EVERY_BELOW_TARGET_MS;
        assert!(walks(set.poll(met)));
        assert!(!walks(set.poll(met + WALK_EVERY_MS - 1)));
        assert!(walks(set.poll(met + WALK_EVERY_MS)));
        // With the target met and a full list of candidates, it stops walking; a peer leaving
        // starts it again at once.
        let spare = peers(40);
        for p in &spare[4..4 + set.known_max()] {
            set.heard_of(*p);
        }
        let full = met + 2 * WALK_EVERY_MS;
        assert!(!walks(set.poll(full)));
        assert_eq!(set.poll_timeout(), Millis::MAX);
        set.disconnected(full + 1, peers(4)[0]);
        assert!(walks(set.poll(full + 2)));
    }

    #[test]
    fn the_known_list_is_bounded_and_the_target_clamped() {
        let me = testkit::keypair(1).public();
        let mut set = PeerSet::new(me, 1_000, 3);
        assert_eq!(set.target(), NODE_PEERS_MAX);
        assert_eq!(PeerSet::new(me, 0, 3).target(), NODE_PEERS_MIN);
        set.heard_of(me);
        assert_eq!(set.known_peers(), 0, "a node never dials itself");
        for p in peers(set.known_max() as u64 + 50) {
            set.heard_of(p);
        }
        assert_eq!(set.known_peers(), NODE_PEERS_MAX * KNOWN_PEERS_PER_TARGET);

        // Full, with the target met, a set ignores new peers; below it, the worst makes room.
        let mut set = PeerSet::new(me, 4, 3);
        let all = peers(set.known_max() as u64 + 2);
        let (first, late) = all.split_at(set.known_max());
        for p in first {
            set.heard_of(*p);
        }
        for p in &first[..4] {
            set.connected(0, *p);
            set.identified(*p, PeerKind::Node);
        }
        set.heard_of(late[0]);
        assert!(!set.known.contains_key(&late[0]), "the target is met");
        set.disconnected(1, first[0]);
        set.heard_of(late[1]);
        assert!(set.known.contains_key(&late[1]), "below the target the list takes it");
        assert_eq!(set.known_peers(), set.known_max());
    }

    #[test]
    fn two_nodes_rank_the_same_peers_differently() {
        let all = peers(64);
        let order = |seed: u64| {
            let set = PeerSet::new(testkit::keypair(1).public(), 4, seed);
            let mut ranked: Vec<_> = all.iter().map(|p| (set.rank(p), *p)).collect();
            ranked.sort_unstable();
            ranked.into_iter().take(8).map(|r| r.1).collect::<Vec<_>>()
        };
        assert_ne!(order(1), order(2));
        assert_eq!(order(1), order(1));
    }

    #[test]
    fn nothing_happens_before_the_poll_timeout_and_something_at_it() {
        // SplitMix64: the crate has no random number generator of its own.
        let mut state = 5u64;
        let mut draw = |range: std::ops::RangeInclusive<u64>| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            range.start() + (z ^ (z >> 31)) % (range.end() - range.start() + 1)
        };
        let all = peers(60);
        for seed in 0..20u64 {
            let mut set = PeerSet::new(testkit::keypair(1).public(), 4 + (seed % 8) as usize, seed);
            let mut now = 0;
            for _ in 0..300 {
                let peer = all[draw(0..=all.len() as u64 - 1) as usize];
                match draw(0..=5) {
                    0 | 1 => set.heard_of(peer),
                    2 => {
                        set.connected(now, peer);
                        set.identified(peer, PeerKind::Node);
                    }
                    3 => set.disconnected(now, peer),
                    4 => set.dial_failed(now, peer),
                    _ => {}
                }
                let _ = set.poll(now);
                let due = set.poll_timeout();
                assert!(due > now, "whatever was due was done by the poll at {now}");
                if due == Millis::MAX {
                    // Only an input can give it something to do.
                    assert!(set.clone().poll(now + 3_600_000).is_empty());
                    now += draw(1..=1_000);
                    continue;
                }
                let quiet = draw(now + 1..=due);
                if quiet < due {
                    assert!(set.clone().poll(quiet).is_empty(), "{quiet} is before {due}");
                }
                // At it the set acts, or a dial times out (which moves the next instant on).
                let mut at_due = set.clone();
                let acted = !at_due.poll(due).is_empty();
                assert!(acted || at_due.poll_timeout() > due, "nothing happened at {due}");
                now = draw(now + 1..=due + 1_000);
            }
        }
    }
}
