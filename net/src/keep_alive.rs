//! Keeps open the connections the peer chose (a node's mesh peers and relays, a relay's peered
//! relays), whatever the other protocols are doing on them, on both sides.
//!
//! libp2p closes a connection once every protocol on it has been idle for the swarm's idle
//! timeout, each side on its own. Gossipsub keeps a connection only while the peer is in one of
//! its topic meshes (at most 16 of a node's peers, pruned to 8 at random), so a node's other
//! chosen peers were closed a minute after each prune and dialed again. (Whether this pays for
//! itself is under review: at 100 nodes on one machine the network was slower with it,
//! docs/mesh.md.)
//!
//! The peer that wants a connection kept (`Behaviour::keep`) holds one stream of
//! [`KEEP_PROTOCOL`] open on it; a stream open is what keeps a libp2p connection alive on the
//! other side too, so the other side needs no opinion. Releasing (`Behaviour::release`) closes
//! that stream. Whom to keep is the caller's decision (`protocol::mesh::PeerSet` dials the node
//! peers it wants; the peers it drops are released); connections nobody chose, such as a
//! Kademlia query's or an AutoNAT dial-back, still close when idle. One connection per peer is
//! held (the oldest). A peer that does not speak the protocol is kept from this side only.

use std::collections::{HashMap, HashSet, VecDeque};
use std::task::{Context, Poll};

use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::Endpoint;
use libp2p::futures::AsyncRead;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound, FullyNegotiatedOutbound};
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId,
    FromSwarm, NetworkBehaviour, NotifyHandler, Stream, StreamProtocol, SubstreamProtocol,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

/// The stream a peer holds open to keep a connection: nothing is ever written on it.
pub(crate) const KEEP_PROTOCOL: StreamProtocol = StreamProtocol::new("/aimatrix/keep/1");

/// Streams the other peer may hold open on one connection (one is all a well-behaved peer
/// opens; a new one replaces the oldest).
const HELD_STREAMS_MAX: usize = 2;

/// The behaviour: which peers to keep, and which connection holds each one open.
#[derive(Default)]
pub(crate) struct Behaviour {
    /// Peers to keep while connected (forgotten when their last connection closes).
    kept: HashSet<PeerId>,
    /// Every connected peer's connections, oldest first.
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    /// The connection holding each kept peer open.
    pinned: HashMap<PeerId, ConnectionId>,
    events: VecDeque<ToSwarm<Event, bool>>,
}

/// What the behaviour reports.
#[derive(Debug)]
pub(crate) enum Event {
    /// The other side opened a keep stream: it chose this peer.
    HeldBy(PeerId),
}

impl Behaviour {
    /// Holds a connection to `peer` open from now on, while it is connected.
    pub(crate) fn keep(&mut self, peer: PeerId) {
        if self.connections.contains_key(&peer) && self.kept.insert(peer) {
            self.pin(peer);
        }
    }

    /// Lets the connection to `peer` close when idle.
    pub(crate) fn release(&mut self, peer: &PeerId) {
        self.kept.remove(peer);
        if let Some(connection) = self.pinned.remove(peer) {
            self.notify(*peer, connection, false);
        }
    }

    /// Whether a connection to `peer` is held open.
    #[cfg(test)]
    pub(crate) fn is_kept(&self, peer: &PeerId) -> bool {
        self.pinned.contains_key(peer)
    }

    fn pin(&mut self, peer: PeerId) {
        if !self.kept.contains(&peer) || self.pinned.contains_key(&peer) {
            return;
        }
        let Some(&connection) = self.connections.get(&peer).and_then(|c| c.first()) else {
            return;
        };
        self.pinned.insert(peer, connection);
        self.notify(peer, connection, true);
    }

    fn notify(&mut self, peer_id: PeerId, connection: ConnectionId, keep: bool) {
        self.events.push_back(ToSwarm::NotifyHandler {
            peer_id,
            handler: NotifyHandler::One(connection),
            event: keep,
        });
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::new())
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(established) => {
                let peer = established.peer_id;
                self.connections.entry(peer).or_default().push(established.connection_id);
                self.pin(peer);
            }
            FromSwarm::ConnectionClosed(ConnectionClosed { peer_id, connection_id, .. }) => {
                if let Some(connections) = self.connections.get_mut(&peer_id) {
                    connections.retain(|c| *c != connection_id);
                    if connections.is_empty() {
                        self.connections.remove(&peer_id);
                        self.kept.remove(&peer_id);
                    }
                }
                if self.pinned.get(&peer_id) == Some(&connection_id) {
                    self.pinned.remove(&peer_id);
                    self.pin(peer_id);
                }
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        _: ConnectionId,
        HeldByRemote: THandlerOutEvent<Self>,
    ) {
        self.events.push_back(ToSwarm::GenerateEvent(Event::HeldBy(peer)));
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Event, THandlerInEvent<Self>>> {
        match self.events.pop_front() {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }
}

/// One connection's handler: holds this side's keep stream while asked to keep the connection,
/// and the streams the other side holds.
pub(crate) struct Handler {
    keep: bool,
    /// This side's stream, open while `keep`.
    held: Option<Stream>,
    /// A stream was asked for and not yet opened or refused.
    opening: bool,
    /// The other side does not speak the protocol: kept from this side only.
    unsupported: bool,
    /// Streams the other side holds open.
    holding_us: VecDeque<Stream>,
    /// The other side's first keep stream arrived, not yet reported.
    report_held: bool,
}

/// The handler's report: the other side opened its first keep stream on this connection.
#[derive(Debug)]
pub(crate) struct HeldByRemote;

impl Handler {
    fn new() -> Self {
        Self {
            keep: false,
            held: None,
            opening: false,
            unsupported: false,
            holding_us: VecDeque::new(),
            report_held: false,
        }
    }
}

/// Whether the other side closed `stream` (or the connection failed under it); nothing is ever
/// sent on a keep stream, so any byte is ignored.
fn closed(stream: &mut Stream, cx: &mut Context<'_>) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match std::pin::Pin::new(&mut *stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(0) | Err(_)) => return true,
            Poll::Ready(Ok(_)) => continue,
            Poll::Pending => return false,
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = bool;
    type ToBehaviour = HeldByRemote;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<ReadyUpgrade<StreamProtocol>> {
        SubstreamProtocol::new(ReadyUpgrade::new(KEEP_PROTOCOL), ())
    }

    fn on_behaviour_event(&mut self, keep: bool) {
        self.keep = keep;
        if !keep {
            self.held = None; // closing it lets the other side close when idle
        }
    }

    fn connection_keep_alive(&self) -> bool {
        // This side's own wish; the held stream carries it to the other side.
        self.keep
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<ReadyUpgrade<StreamProtocol>, (), HeldByRemote>> {
        if std::mem::take(&mut self.report_held) {
            return Poll::Ready(ConnectionHandlerEvent::NotifyBehaviour(HeldByRemote));
        }
        self.holding_us.retain_mut(|stream| !closed(stream, cx));
        if self.held.as_mut().is_some_and(|stream| closed(stream, cx)) {
            self.held = None; // the other side let go (or the connection is going)
        }
        if self.keep && self.held.is_none() && !self.opening && !self.unsupported {
            self.opening = true;
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(KEEP_PROTOCOL), ()),
            });
        }
        Poll::Pending
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<ReadyUpgrade<StreamProtocol>, ReadyUpgrade<StreamProtocol>>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => {
                if self.holding_us.len() == HELD_STREAMS_MAX {
                    self.holding_us.pop_front();
                }
                self.report_held |= self.holding_us.is_empty();
                self.holding_us.push_back(stream);
            }
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                ..
            }) => {
                self.opening = false;
                if self.keep {
                    self.held = Some(stream);
                }
            }
            ConnectionEvent::DialUpgradeError(_) => {
                self.opening = false;
                self.unsupported = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use libp2p::core::ConnectedPoint;
    use libp2p::swarm::behaviour::ConnectionEstablished;

    use super::*;

    fn established(b: &mut Behaviour, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        b.on_swarm_event(FromSwarm::ConnectionEstablished(ConnectionEstablished {
            peer_id: peer,
            connection_id: id,
            endpoint,
            failed_addresses: &[],
            other_established: 0,
        }));
    }

    fn closed(b: &mut Behaviour, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        b.on_swarm_event(FromSwarm::ConnectionClosed(ConnectionClosed {
            peer_id: peer,
            connection_id: id,
            endpoint,
            cause: None,
            remaining_established: 0,
        }));
    }

    fn notified(b: &mut Behaviour) -> Vec<(ConnectionId, bool)> {
        b.events
            .drain(..)
            .map(|e| match e {
                ToSwarm::NotifyHandler { handler: NotifyHandler::One(c), event, .. } => (c, event),
                _ => panic!("unexpected event"),
            })
            .collect()
    }

    #[test]
    fn one_connection_of_a_kept_peer_is_held_and_handed_on_when_it_closes() {
        let mut b = Behaviour::default();
        let peer = PeerId::random();
        let endpoint = ConnectedPoint::Listener {
            local_addr: "/ip4/127.0.0.1/tcp/1".parse().unwrap(),
            send_back_addr: "/ip4/127.0.0.1/tcp/2".parse().unwrap(),
        };
        let (first, second) = (ConnectionId::new_unchecked(1), ConnectionId::new_unchecked(2));
        b.keep(peer); // not connected: nothing to keep
        assert!(!b.is_kept(&peer));
        established(&mut b, peer, first, &endpoint);
        established(&mut b, peer, second, &endpoint);
        assert!(notified(&mut b).is_empty(), "a peer nobody asked to keep is not held");
        b.keep(peer);
        assert_eq!(notified(&mut b), vec![(first, true)], "only the oldest connection is held");
        closed(&mut b, peer, first, &endpoint);
        assert_eq!(notified(&mut b), vec![(second, true)]);
        b.release(&peer);
        assert_eq!(notified(&mut b), vec![(second, false)]);
        assert!(!b.is_kept(&peer));
        b.keep(peer);
        closed(&mut b, peer, second, &endpoint);
        established(&mut b, peer, first, &endpoint);
        assert_eq!(
            notified(&mut b),
            vec![(second, true)],
            "a peer that went away is not held when it comes back until asked again"
        );
    }

    /// Two real swarms whose only protocol is this one, with a one-second idle timeout.
    mod swarms {
        use std::time::Duration;

        use libp2p::futures::StreamExt;
        use libp2p::swarm::{Swarm, SwarmEvent};
        use libp2p::{noise, tcp, yamux, SwarmBuilder};

        use super::super::Behaviour;

        fn swarm() -> Swarm<Behaviour> {
            SwarmBuilder::with_new_identity()
                .with_tokio()
                .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
                .expect("tcp")
                .with_behaviour(|_| Behaviour::default())
                .expect("behaviour")
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(1)))
                .build()
        }

        /// Drives both swarms for `secs`; whether they are still connected at the end.
        async fn run_for(a: &mut Swarm<Behaviour>, b: &mut Swarm<Behaviour>, secs: u64) -> bool {
            let until = tokio::time::sleep(Duration::from_secs(secs));
            tokio::pin!(until);
            loop {
                tokio::select! {
                    () = &mut until => break,
                    _ = a.select_next_some() => {}
                    _ = b.select_next_some() => {}
                }
            }
            a.is_connected(b.local_peer_id()) || b.is_connected(a.local_peer_id())
        }

        async fn connected_pair() -> (Swarm<Behaviour>, Swarm<Behaviour>) {
            let (mut a, mut b) = (swarm(), swarm());
            b.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap()).unwrap();
            let addr = loop {
                if let SwarmEvent::NewListenAddr { address, .. } = b.select_next_some().await {
                    break address;
                }
            };
            a.dial(addr).unwrap();
            let (mut up_a, mut up_b) = (false, false);
            while !(up_a && up_b) {
                tokio::select! {
                    e = a.select_next_some() => up_a |= matches!(e, SwarmEvent::ConnectionEstablished { .. }),
                    e = b.select_next_some() => up_b |= matches!(e, SwarmEvent::ConnectionEstablished { .. }),
                }
            }
            (a, b)
        }

        #[tokio::test]
        async fn a_kept_connection_outlives_the_idle_timeout_on_both_sides_until_released() {
            let (mut a, mut b) = connected_pair().await;
            assert!(
                !run_for(&mut a, &mut b, 3).await,
                "a connection nobody keeps closes when idle"
            );

            let (mut a, mut b) = connected_pair().await;
            let peer_b = *b.local_peer_id();
            a.behaviour_mut().keep(peer_b); // only `a` has an opinion
            assert!(run_for(&mut a, &mut b, 4).await, "kept by one side, open on both");
            assert!(a.is_connected(&peer_b) && b.is_connected(a.local_peer_id()));
            a.behaviour_mut().release(&peer_b);
            assert!(!run_for(&mut a, &mut b, 4).await, "released, it closes when idle");
        }
    }
}
