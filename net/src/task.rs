//! The swarm task: owns the swarm, serves [`Command`]s from handles, turns swarm events into
//! [`NetEvent`]s and replies.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aimatrix_protocol::dht::{check_advert_update, check_provider_key};
use aimatrix_protocol::direct::{self, DirectRequest, DirectResponse};
use aimatrix_protocol::mesh::{MeshAction, PeerKind, PeerSet};
use aimatrix_protocol::Topic;
use futures_util::stream::{FuturesUnordered, StreamExt};
use libp2p::core::transport::ListenerId;
use libp2p::gossipsub::{self, IdentTopic, TopicHash};
use libp2p::kad::store::RecordStore as _;
use libp2p::kad::{self, GetProvidersOk, GetRecordOk, QueryId, QueryResult};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId, ResponseChannel};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{identify, mdns, noise, relay, tcp, yamux, Multiaddr, PeerId, Swarm, SwarmBuilder};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use crate::{
    libp2p_keypair, node_id_of, DhtMode, NatStatus, NetConfig, NetError, NetEvent, NetStats,
    Responder, Role,
};

/// How long [`crate::spawn`] waits for each listen address to be bound.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often disconnected bootstrap peers are redialed.
const BOOTSTRAP_REDIAL: Duration = Duration::from_secs(10);

/// How often the DHT's counts in [`DhtStats`] are refreshed and expired entries pruned.
const DHT_HOUSEKEEPING: Duration = Duration::from_secs(5);

/// How often the node's peer set is asked what to dial, drop or look up.
const MESH_TICK: Duration = Duration::from_secs(1);

/// How long an idle connection stays open. The connections a peer chose are held open by
/// `keep_alive` whatever this is; what it closes are the ones nobody chose (a Kademlia query's,
/// an AutoNAT dial-back, a request to a peer not in the mesh), so they do not pile up: in the
/// 250-node runs, at 60 s, nodes sat at their peer set's cap with such connections among them.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connection and address events wait while the event channel is full, beyond which
/// the oldest are dropped.
const OVERFLOW_EVENTS_MAX: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, NetError>>;

/// What a [`crate::NetHandle`] asks of the task.
pub(crate) enum Command {
    Publish { topic: Topic, bytes: Vec<u8>, reply: Reply<()> },
    Request { peer: PeerId, request: DirectRequest, reply: Reply<DirectResponse> },
    PutRecord { key: Vec<u8>, value: Vec<u8>, reply: Reply<()> },
    GetRecord { key: Vec<u8>, reply: Reply<Option<Vec<u8>>> },
    StartProviding { key: Vec<u8>, reply: Reply<()> },
    GetProviders { key: Vec<u8>, reply: Reply<Vec<PeerId>> },
    Dial { addr: Multiaddr, reply: Reply<()> },
    AddPeerAddresses { peer: PeerId, addrs: Vec<Multiaddr>, reply: oneshot::Sender<()> },
    ListenAddrs { reply: oneshot::Sender<Vec<Multiaddr>> },
    ConnectedPeers { reply: oneshot::Sender<Vec<PeerId>> },
    Shutdown { reply: oneshot::Sender<()> },
}

/// A DHT query a handle waits on.
enum Query {
    PutRecord(Reply<()>),
    GetRecord(Reply<Option<Vec<u8>>>),
    StartProviding(Reply<()>),
    GetProviders(Reply<Vec<PeerId>>, HashSet<PeerId>),
}

/// An inbound request waiting for the driver's answer, paired with the libp2p channel.
type PendingResponse =
    Pin<Box<dyn Future<Output = (ResponseChannel<DirectResponse>, DirectResponse)> + Send>>;

pub(crate) struct SwarmTask {
    swarm: Swarm<Behaviour>,
    role: Role,
    /// A relay with no configured external address confirms its listen addresses instead.
    listen_is_external: bool,
    request_timeout: Duration,
    events: mpsc::Sender<NetEvent>,
    /// Connection and address events waiting for room in `events`.
    overflow: VecDeque<NetEvent>,
    gossip_dropped: u64,
    topics: [(Topic, TopicHash); Topic::ALL.len()],
    /// Bootstrap peers and their address (without `/p2p`).
    bootstrap: HashMap<PeerId, Multiaddr>,
    /// Relay circuit listeners (reservations) by the relay they go through.
    circuits: HashMap<ListenerId, PeerId>,
    /// The circuit addresses the relays confirmed for a node: advertised only while the node
    /// has no confirmed direct address (`SwarmTask::prefer_direct_addresses`).
    circuit_addrs: HashSet<Multiaddr>,
    requests: HashMap<OutboundRequestId, Reply<DirectResponse>>,
    queries: HashMap<QueryId, Query>,
    dials: HashMap<ConnectionId, Reply<()>>,
    inbound: FuturesUnordered<PendingResponse>,
    /// What the swarm knows, shared with every handle.
    stats: Arc<Mutex<NetStats>>,
    /// Connected peers that serve the DHT (identified as speaking its protocol).
    dht_servers: HashSet<PeerId>,
    /// Connected peers identified as relays.
    relays: HashSet<PeerId>,
    /// AutoNAT tests that failed since the last confirmed address.
    nat_failures: u32,
    /// The node peers a node keeps (`None` on a relay).
    mesh: Option<PeerSet>,
    /// Connected peers, by when their first connection opened.
    connected_since: HashMap<PeerId, Instant>,
    /// The mesh's clock starts with the task.
    started: Instant,
}

impl SwarmTask {
    /// Builds the swarm, binds every listen address and starts dialing the bootstrap peers.
    pub(crate) async fn start(
        cfg: NetConfig,
        events: mpsc::Sender<NetEvent>,
        stats: Arc<Mutex<NetStats>>,
    ) -> Result<Self, NetError> {
        let bootstrap = parse_bootstrap(&cfg.bootstrap)?;
        let swarm = build_swarm(&cfg)?;
        let topics = Topic::ALL.map(|t| (t, IdentTopic::new(t.name()).hash()));
        let mut task = Self {
            swarm,
            role: cfg.role,
            listen_is_external: cfg.role == Role::Relay && cfg.external.is_empty(),
            request_timeout: cfg.request_timeout,
            events,
            overflow: VecDeque::new(),
            gossip_dropped: 0,
            topics,
            bootstrap,
            circuits: HashMap::new(),
            circuit_addrs: HashSet::new(),
            connected_since: HashMap::new(),
            requests: HashMap::new(),
            queries: HashMap::new(),
            dials: HashMap::new(),
            inbound: FuturesUnordered::new(),
            stats,
            dht_servers: HashSet::new(),
            relays: HashSet::new(),
            nat_failures: 0,
            mesh: (cfg.role == Role::Node)
                .then(|| PeerSet::new(cfg.keypair.public(), cfg.node_peers, rand_seed())),
            started: Instant::now(),
        };
        task.update_kad_mode();
        for topic in Topic::ALL {
            task.swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&IdentTopic::new(topic.name()))
                .map_err(|e| {
                    NetError::Config(format!("cannot subscribe to {}: {e}", topic.name()))
                })?;
        }
        for addr in &cfg.external {
            task.swarm.add_external_address(addr.clone());
        }
        task.bind(&cfg.listen).await?;
        let bootstrap: Vec<_> = task.bootstrap.iter().map(|(p, a)| (*p, a.clone())).collect();
        for (peer, addr) in bootstrap {
            task.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            task.swarm.add_peer_address(peer, addr);
        }
        task.redial_bootstrap();
        info!(peer = %task.swarm.local_peer_id(), role = ?task.role, "network started");
        Ok(task)
    }

    /// Listens on every address and waits until each has reported an address.
    async fn bind(&mut self, listen: &[Multiaddr]) -> Result<(), NetError> {
        let mut waiting = HashMap::new();
        for addr in listen {
            let id = self
                .swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen { addr: addr.clone(), reason: e.to_string() })?;
            waiting.insert(id, addr.clone());
        }
        let deadline = tokio::time::sleep(LISTEN_TIMEOUT);
        tokio::pin!(deadline);
        while !waiting.is_empty() {
            tokio::select! {
                event = self.swarm.select_next_some() => {
                    let failed = match &event {
                        SwarmEvent::NewListenAddr { listener_id, .. } => {
                            waiting.remove(listener_id);
                            None
                        }
                        SwarmEvent::ListenerError { listener_id, error } => {
                            waiting.get(listener_id).map(|a| (a.clone(), error.to_string()))
                        }
                        SwarmEvent::ListenerClosed { listener_id, reason, .. } => waiting
                            .get(listener_id)
                            .map(|a| (a.clone(), format!("listener closed: {reason:?}"))),
                        _ => None,
                    };
                    if let Some((addr, reason)) = failed {
                        return Err(NetError::Listen { addr, reason });
                    }
                    self.on_swarm_event(event);
                }
                () = &mut deadline => {
                    let addr = waiting.into_values().next().expect("waiting is not empty");
                    return Err(NetError::Listen { addr, reason: "timed out binding".into() });
                }
            }
        }
        Ok(())
    }

    /// Runs until shutdown or until every handle is dropped.
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut redial = tokio::time::interval(BOOTSTRAP_REDIAL);
        redial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        redial.reset();
        let mut mesh_tick = tokio::time::interval(MESH_TICK);
        mesh_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dht_housekeeping = tokio::time::interval(DHT_HOUSEKEEPING);
        dht_housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A permit borrows its sender: reserve through a clone, not through `self`.
        let events = self.events.clone();
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        self.stop();
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    None => {
                        self.stop();
                        return;
                    }
                },
                Some((channel, resp)) = self.inbound.next(), if !self.inbound.is_empty() => {
                    self.respond(channel, resp);
                }
                permit = events.reserve(), if !self.overflow.is_empty() => match permit {
                    Ok(permit) => {
                        let event = self.overflow.pop_front().expect("overflow is not empty");
                        permit.send(event);
                    }
                    Err(_) => self.overflow.clear(), // the driver is gone
                },
                _ = redial.tick() => self.redial_bootstrap(),
                _ = dht_housekeeping.tick() => self.dht_housekeeping(),
                _ = mesh_tick.tick(), if self.mesh.is_some() => self.mesh_tick(),
            }
        }
    }

    /// Stops: pending operations fail with [`NetError::Shutdown`] as their replies drop.
    fn stop(&mut self) {
        info!(peer = %self.swarm.local_peer_id(), "network stopped");
        if self.gossip_dropped > 0 {
            warn!(
                dropped = self.gossip_dropped,
                "gossip messages dropped while the driver was busy"
            );
        }
    }

    fn on_command(&mut self, command: Command) {
        let behaviour = self.swarm.behaviour_mut();
        match command {
            Command::Publish { topic, bytes, reply } => {
                let result = behaviour.gossipsub.publish(IdentTopic::new(topic.name()), bytes);
                let _ = reply.send(result.map(drop).map_err(|e| match e {
                    gossipsub::PublishError::NoPeersSubscribedToTopic => NetError::NoPeers,
                    other => NetError::Publish(format!("{other:?}")),
                }));
            }
            Command::Request { peer, request, reply } => {
                if peer == *self.swarm.local_peer_id() {
                    let _ =
                        reply.send(Err(NetError::Dial("cannot send a request to itself".into())));
                    return;
                }
                let id = self.swarm.behaviour_mut().direct.send_request(&peer, request);
                self.requests.insert(id, reply);
            }
            Command::PutRecord { key, value, reply } => {
                let record = kad::Record::new(key, value);
                match behaviour.kad.put_record(record, kad::Quorum::One) {
                    Ok(id) => drop(self.queries.insert(id, Query::PutRecord(reply))),
                    Err(e) => drop(reply.send(Err(NetError::Dht(format!("cannot store: {e:?}"))))),
                }
            }
            Command::GetRecord { key, reply } => {
                let id = behaviour.kad.get_record(key.into());
                self.queries.insert(id, Query::GetRecord(reply));
            }
            Command::StartProviding { key, reply } => {
                match behaviour.kad.start_providing(key.into()) {
                    Ok(id) => drop(self.queries.insert(id, Query::StartProviding(reply))),
                    Err(e) => drop(reply.send(Err(NetError::Dht(format!("cannot store: {e:?}"))))),
                }
            }
            Command::GetProviders { key, reply } => {
                let id = behaviour.kad.get_providers(key.into());
                self.queries.insert(id, Query::GetProviders(reply, HashSet::new()));
            }
            Command::Dial { addr, reply } => {
                let opts = DialOpts::from(addr);
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => drop(self.dials.insert(id, reply)),
                    Err(e) => drop(reply.send(Err(NetError::Dial(e.to_string())))),
                }
            }
            Command::AddPeerAddresses { peer, addrs, reply } => {
                for addr in addrs {
                    self.swarm.add_peer_address(peer, addr);
                }
                let _ = reply.send(());
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Shutdown { .. } => unreachable!("handled by run"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            SwarmEvent::ConnectionEstablished {
                peer_id, connection_id, num_established, ..
            } => {
                if let Some(reply) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
                // A dial the peer set asked for: chosen.
                let dialed = node_id_of(&peer_id)
                    .zip(self.mesh.as_ref())
                    .is_some_and(|(node, mesh)| mesh.is_dialing(&node));
                if dialed {
                    self.join_mesh(peer_id);
                }
                if num_established.get() == 1 {
                    debug!(peer = %peer_id, "connected");
                    self.connected_since.insert(peer_id, Instant::now());
                    self.update_peers();
                    self.emit(NetEvent::PeerConnected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                debug!(peer = %peer_id, "disconnected");
                self.connected_since.remove(&peer_id);
                self.dht_servers.remove(&peer_id);
                self.relays.remove(&peer_id);
                let now = self.now_ms();
                self.with_mesh(peer_id, |mesh, peer| mesh.disconnected(now, peer));
                self.update_peers();
                self.emit(NetEvent::PeerDisconnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                debug!(peer = ?peer_id, %error, "dial failed");
                if let Some(peer) = peer_id {
                    let now = self.now_ms();
                    self.with_mesh(peer, |mesh, peer| mesh.dial_failed(now, peer));
                }
                if let Some(reply) = self.dials.remove(&connection_id) {
                    let _ = reply.send(Err(NetError::Dial(error.to_string())));
                }
            }
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if self.listen_is_external && !is_circuit(&address) {
                    self.swarm.add_external_address(address.clone());
                }
                self.emit(NetEvent::ListenAddr(address));
            }
            SwarmEvent::ListenerClosed { listener_id, reason, addresses, .. } => {
                if let Some(relay) = self.circuits.remove(&listener_id) {
                    info!(%relay, ?reason, "relay reservation closed");
                    for address in &addresses {
                        self.circuit_addrs.remove(address);
                    }
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "external address confirmed");
                if !is_circuit(&address) {
                    self.nat_failures = 0;
                }
                self.prefer_direct_addresses(Some(address));
                self.update_kad_mode();
                self.reannounce_provided();
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                if !is_circuit(&address) {
                    self.prefer_direct_addresses(None);
                }
                self.update_kad_mode();
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message,
                ..
            }) => {
                let Some(topic) =
                    self.topics.iter().find(|(_, hash)| *hash == message.topic).map(|(t, _)| *t)
                else {
                    debug!(topic = %message.topic, "gossip on an unknown topic");
                    return;
                };
                let from = propagation_source;
                self.emit(NetEvent::Gossip { topic, bytes: message.data, from });
            }
            BehaviourEvent::Direct(event) => self.on_direct_event(event),
            BehaviourEvent::KeepAlive(crate::keep_alive::Event::HeldBy(peer)) => {
                self.join_mesh(peer);
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: QueryResult::GetClosestPeers(result),
                ..
            }) => {
                // Only the mesh's random walks ask for closest peers.
                let found = match result {
                    Ok(ok) => ok.peers,
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                for info in found {
                    for addr in info.addrs {
                        self.swarm.add_peer_address(info.peer_id, addr);
                    }
                    self.with_mesh(info.peer_id, |mesh, peer| mesh.heard_of(peer));
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => {
                self.on_query_progress(id, result, step.last);
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }) => {
                // A peer that serves the DHT, so one others can dial.
                self.with_mesh(peer, |mesh, peer| mesh.heard_of(peer));
            }
            BehaviourEvent::Kad(kad::Event::InboundRequest { request }) => {
                self.on_dht_inbound(request);
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.on_identified(peer_id, info);
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    self.swarm.add_peer_address(peer, addr.clone());
                    let opts = DialOpts::peer_id(peer)
                        .addresses(vec![addr])
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(%peer, error = %e, "cannot dial an mDNS peer");
                    }
                }
            }
            BehaviourEvent::AutonatClient(event) => {
                match &event.result {
                    Ok(()) => {
                        debug!(addr = %event.tested_addr, server = %event.server, "reachable")
                    }
                    Err(e) => {
                        self.nat_failures += 1;
                        // AutoNAT keeps probing every few seconds: say it once, not each time.
                        if self.nat_failures == 1 {
                            info!(
                                addr = %event.tested_addr,
                                server = %event.server,
                                "not reachable at this address (behind a NAT or firewall?): {e}"
                            );
                        } else {
                            debug!(addr = %event.tested_addr, "not reachable: {e}");
                        }
                    }
                }
                self.update_kad_mode();
            }
            BehaviourEvent::AutonatServer(event) => {
                debug!(client = %event.client, addr = %event.tested_addr, ok = event.result.is_ok(), "dialed back");
            }
            BehaviourEvent::RelayClient(event) => debug!(?event, "relay client"),
            BehaviourEvent::RelayServer(event) => debug!(?event, "relay server"),
            BehaviourEvent::Dcutr(event) => debug!(?event, "dcutr"),
            _ => {}
        }
    }

    fn on_direct_event(&mut self, event: request_response::Event<DirectRequest, DirectResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.on_inbound_request(peer, request, channel);
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = self.requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                debug!(%peer, %error, "direct request failed");
                if let Some(reply) = self.requests.remove(&request_id) {
                    let _ = reply.send(Err(match error {
                        OutboundFailure::DialFailure => {
                            NetError::Dial(format!("no reachable address for {peer}"))
                        }
                        OutboundFailure::Timeout => NetError::Timeout,
                        OutboundFailure::ConnectionClosed => NetError::ConnectionClosed,
                        OutboundFailure::UnsupportedProtocols => NetError::UnsupportedProtocol,
                        OutboundFailure::Io(e) => NetError::Stream(e.to_string()),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, %error, "inbound direct request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Hands an inbound request to the driver, and queues its answer (or a refusal once the
    /// driver drops the responder or the request times out).
    fn on_inbound_request(
        &mut self,
        peer: PeerId,
        request: DirectRequest,
        channel: ResponseChannel<DirectResponse>,
    ) {
        let (tx, rx) = oneshot::channel();
        let timeout = self.request_timeout;
        self.inbound.push(Box::pin(async move {
            let resp = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(_)) => DirectResponse::refused("no response"),
                Err(_) => DirectResponse::refused("timed out"),
            };
            (channel, resp)
        }));
        self.emit(NetEvent::Request { peer, request, reply: Responder { tx } });
    }

    fn respond(&mut self, channel: ResponseChannel<DirectResponse>, resp: DirectResponse) {
        let resp = match direct::check_response(&resp) {
            Ok(()) => resp,
            Err(e) => {
                warn!(error = %e, "refusing instead of sending an oversize response");
                DirectResponse::refused("response too large")
            }
        };
        if self.swarm.behaviour_mut().direct.send_response(channel, resp).is_err() {
            debug!("the requester is gone; response dropped");
        }
    }

    fn on_query_progress(&mut self, id: QueryId, result: QueryResult, last: bool) {
        let Some(query) = self.queries.remove(&id) else { return };
        let dht = |e: &dyn std::fmt::Display| NetError::Dht(e.to_string());
        match (query, result) {
            (Query::PutRecord(reply), QueryResult::PutRecord(result)) => {
                let _ = reply.send(result.map(drop).map_err(|e| dht(&e)));
            }
            (Query::StartProviding(reply), QueryResult::StartProviding(result)) => {
                let _ = reply.send(result.map(drop).map_err(|e| dht(&e)));
            }
            (Query::GetRecord(reply), QueryResult::GetRecord(result)) => match result {
                Ok(GetRecordOk::FoundRecord(found)) => {
                    let _ = reply.send(Ok(Some(found.record.value)));
                    if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                        query.finish();
                    }
                }
                Ok(GetRecordOk::FinishedWithNoAdditionalRecord { .. })
                | Err(kad::GetRecordError::NotFound { .. }) => {
                    let _ = reply.send(Ok(None));
                }
                Err(e) if last => drop(reply.send(Err(dht(&e)))),
                Err(_) => drop(self.queries.insert(id, Query::GetRecord(reply))),
            },
            (Query::GetProviders(reply, mut found), QueryResult::GetProviders(result)) => {
                let error = match result {
                    Ok(GetProvidersOk::FoundProviders { providers, .. }) => {
                        found.extend(providers);
                        None
                    }
                    Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. }) => None,
                    Err(e) => Some(e),
                };
                if !last {
                    self.queries.insert(id, Query::GetProviders(reply, found));
                } else if let (Some(e), true) = (error, found.is_empty()) {
                    let _ = reply.send(Err(dht(&e)));
                } else {
                    let _ = reply.send(Ok(found.into_iter().collect()));
                }
            }
            (query, result) => {
                // A query id names one kind of query; anything else is a bug in this module.
                unreachable!("query result {result:?} for a different query kind {}", query.kind());
            }
        }
    }

    fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        let serves_dht = info.protocols.contains(&KAD_PROTOCOL);
        if serves_dht && self.dht_servers.insert(peer) && self.dht_servers.len() == 1 {
            debug!(%peer, "first DHT server connected: publishing own records again");
            self.republish_own();
        }
        for addr in info.listen_addrs {
            if serves_dht {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            self.swarm.add_peer_address(peer, addr);
        }
        let is_relay = info.protocols.contains(&relay::HOP_PROTOCOL_NAME);
        if is_relay && self.relays.insert(peer) {
            self.update_peers();
        }
        let kind = if is_relay { PeerKind::Relay } else { PeerKind::Node };
        self.with_mesh(peer, |mesh, peer| mesh.identified(peer, kind));
        // Every peer keeps its connections to relays (a relay its peered relays, a node the
        // relays it works for); a node also those to the node peers its peer set dialed
        // (`SwarmEvent::ConnectionEstablished`).
        if is_relay {
            self.swarm.behaviour_mut().keep_alive.keep(peer);
        }
        if self.role == Role::Node && is_relay && !self.circuits.values().any(|r| *r == peer) {
            if let Some(addr) = self.bootstrap.get(&peer) {
                let circuit = addr.clone().with(Protocol::P2p(peer)).with(Protocol::P2pCircuit);
                match self.swarm.listen_on(circuit.clone()) {
                    Ok(id) => {
                        info!(%circuit, "reserving a relay slot");
                        self.circuits.insert(id, peer);
                    }
                    Err(e) => warn!(%circuit, error = %e, "cannot reserve a relay slot"),
                }
            }
        }
    }

    /// A node advertises its relay circuit addresses (identify tells its peers only its external
    /// addresses, `behaviour::Behaviour::new`) only while it has no confirmed direct address:
    /// otherwise peers that learn of it through identify or the DHT dial it through the relay,
    /// and with hundreds of nodes the relays spend their circuit slots on connections that could
    /// have been direct. Called with the address just confirmed, or `None` when a direct
    /// address expired.
    fn prefer_direct_addresses(&mut self, confirmed: Option<Multiaddr>) {
        if self.role != Role::Node {
            return;
        }
        if let Some(address) = confirmed.filter(is_circuit) {
            self.circuit_addrs.insert(address);
        }
        let has_direct = self.swarm.external_addresses().any(|a| !is_circuit(a));
        if has_direct {
            let advertised: Vec<Multiaddr> =
                self.swarm.external_addresses().filter(|a| is_circuit(a)).cloned().collect();
            for address in advertised {
                debug!(%address, "a direct address is confirmed: circuit address not advertised");
                self.swarm.remove_external_address(&address);
            }
        } else {
            let held: Vec<Multiaddr> = self.circuit_addrs.iter().cloned().collect();
            for address in held {
                if !self.swarm.external_addresses().any(|a| *a == address) {
                    debug!(%address, "no direct address: circuit address advertised");
                    self.swarm.add_external_address(address);
                }
            }
        }
    }

    /// A node serves the DHT only while it has a confirmed external address that is not a
    /// relay circuit: a DHT server behind a relay would send every query through it.
    ///
    /// Also records the reachability this implies in the stats.
    fn update_kad_mode(&mut self) {
        let direct: Vec<String> = self
            .swarm
            .external_addresses()
            .filter(|a| !is_circuit(a))
            .map(ToString::to_string)
            .collect();
        let public = self.role == Role::Relay || !direct.is_empty();
        if self.role == Role::Node {
            let mode = if public { kad::Mode::Server } else { kad::Mode::Client };
            self.swarm.behaviour_mut().kad.set_mode(Some(mode));
        }
        let mut stats = self.stats();
        stats.dht.mode = if public { DhtMode::Server } else { DhtMode::Client };
        stats.nat = match (public, self.nat_failures) {
            (true, _) => NatStatus::Public,
            (false, 0) => NatStatus::Unknown,
            (false, _) => NatStatus::Private,
        };
        stats.external_addrs = direct;
    }

    /// Records the connected peers, relays and nodes apart, in the stats.
    fn update_peers(&mut self) {
        let (relays, nodes): (Vec<PeerId>, Vec<PeerId>) =
            self.swarm.connected_peers().partition(|peer| self.relays.contains(peer));
        let mut stats = self.stats();
        stats.peers.relays = relays.iter().map(ToString::to_string).collect();
        stats.peers.nodes = nodes.iter().map(ToString::to_string).collect();
    }

    /// Stores what a peer sent only if the protocol's rules allow it
    /// (`aimatrix_protocol::dht`), and counts each refusal by reason.
    fn on_dht_inbound(&mut self, request: kad::InboundRequest) {
        let refused = match request {
            kad::InboundRequest::PutRecord { source, record: Some(record), .. } => {
                let store = self.swarm.behaviour_mut().kad.store_mut();
                let stored = store.get(&record.key).map(|r| r.value.clone());
                match check_advert_update(record.key.as_ref(), &record.value, stored.as_deref()) {
                    Ok(_) => match store.put(record) {
                        Ok(()) => None,
                        Err(e) => Some((source, "store_full", e.to_string())),
                    },
                    Err(refusal) => Some((source, refusal.label(), refusal.to_string())),
                }
            }
            kad::InboundRequest::AddProvider { record: Some(record) } => {
                let source = record.provider;
                match check_provider_key(record.key.as_ref()) {
                    Ok(()) => match self.swarm.behaviour_mut().kad.store_mut().add_provider(record)
                    {
                        Ok(()) => None,
                        Err(e) => Some((source, "store_full", e.to_string())),
                    },
                    Err(refusal) => Some((source, refusal.label(), refusal.to_string())),
                }
            }
            _ => None,
        };
        if let Some((peer, label, why)) = refused {
            debug!(%peer, reason = label, "DHT entry refused: {why}");
            *self.stats().dht.refused.entry(label.to_owned()).or_default() += 1;
        }
    }

    /// Publishes this peer's own records and provider records again, at once. Called when a
    /// DHT server connects while no other is connected (the peer has just started, or lost
    /// every DHT peer and found one again, such as a restarted relay): the DHT may have
    /// forgotten them or never had them (they were stored while no peer was connected), and
    /// Kademlia would otherwise republish them only hours later.
    fn republish_own(&mut self) {
        let local = *self.swarm.local_peer_id();
        let kad = &mut self.swarm.behaviour_mut().kad;
        let own: Vec<kad::Record> = kad
            .store_mut()
            .records()
            .filter(|r| r.publisher == Some(local))
            .map(std::borrow::Cow::into_owned)
            .collect();
        for record in own {
            if let Err(e) = kad.put_record(record, kad::Quorum::One) {
                warn!(error = ?e, "cannot publish an own record again");
            }
        }
        self.reannounce_provided();
    }

    /// Carries out what the node's peer set asks for now.
    fn mesh_tick(&mut self) {
        let now = self.now_ms();
        let Some(mesh) = self.mesh.as_mut() else { return };
        for action in mesh.poll(now) {
            match action {
                MeshAction::Dial(node) => {
                    let peer = crate::peer_id_of(&node);
                    if self.swarm.is_connected(&peer) {
                        // Connected for something else (a Kademlia query): chosen now.
                        self.join_mesh(peer);
                        continue;
                    }
                    let opts = DialOpts::peer_id(peer)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .build();
                    if let Err(e) = self.swarm.dial(opts) {
                        debug!(%peer, error = %e, "cannot dial a mesh peer");
                        if let Some(mesh) = self.mesh.as_mut() {
                            mesh.dial_failed(now, node);
                        }
                    }
                }
                MeshAction::Disconnect(node) => {
                    let peer = crate::peer_id_of(&node);
                    self.swarm.behaviour_mut().keep_alive.release(&peer);
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                MeshAction::Walk => {
                    let kad = &mut self.swarm.behaviour_mut().kad;
                    if kad.kbuckets().any(|bucket| bucket.num_entries() > 0) {
                        kad.get_closest_peers(PeerId::random());
                    }
                }
            }
        }
        self.drop_unchosen();
    }

    /// Closes connections to nodes that are not in the mesh once a node has more node
    /// connections than twice its target, oldest first. Only connections older than the idle
    /// timeout are closed: a younger one may be a Kademlia query's, which closes by itself; an
    /// older one is held by something else (gossipsub keeps the peers of its topic meshes).
    fn drop_unchosen(&mut self) {
        let Some(mesh) = self.mesh.as_ref() else { return };
        let most = 2 * mesh.target();
        let nodes = self.connected_since.keys().filter(|p| !self.relays.contains(p)).count();
        if nodes <= most {
            return;
        }
        let now = Instant::now();
        let mut unchosen: Vec<(Instant, PeerId)> = self
            .connected_since
            .iter()
            .filter(|(peer, since)| {
                !self.relays.contains(peer)
                    && now.duration_since(**since) >= IDLE_CONNECTION_TIMEOUT
                    && node_id_of(peer).is_some_and(|node| !mesh.holds(&node))
            })
            .map(|(peer, since)| (*since, *peer))
            .collect();
        unchosen.sort_unstable();
        for (_, peer) in unchosen.into_iter().take(nodes - most) {
            debug!(%peer, "closing a connection to a node outside the mesh");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// `peer` joins the node's mesh: its peer set dialed it, or it holds a keep stream open to
    /// this node (it chose this node). The connection is kept from this side too, and the set
    /// counts it. Connections nobody chose (a Kademlia query's, an AutoNAT dial-back) are not
    /// counted: they close when idle, and counted, they made a set at twice its target drop
    /// chosen peers to make room for them.
    fn join_mesh(&mut self, peer: PeerId) {
        if self.mesh.is_none() {
            return;
        }
        self.swarm.behaviour_mut().keep_alive.keep(peer);
        let now = self.now_ms();
        let kind = if self.relays.contains(&peer) { PeerKind::Relay } else { PeerKind::Node };
        self.with_mesh(peer, |mesh, node| {
            mesh.connected(now, node);
            mesh.identified(node, kind);
        });
    }

    /// Hands `peer` to the peer set, if this is a node and the peer has an aimatrix identity.
    fn with_mesh(
        &mut self,
        peer: PeerId,
        f: impl FnOnce(&mut PeerSet, aimatrix_protocol::identity::NodeId),
    ) {
        if let (Some(mesh), Some(node)) = (self.mesh.as_mut(), node_id_of(&peer)) {
            f(mesh, node);
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Refreshes the store counts and drops expired entries.
    fn dht_housekeeping(&mut self) {
        let store = self.swarm.behaviour_mut().kad.store_mut();
        store.prune(Instant::now());
        let counts = store.counts();
        let mut stats = self.stats();
        stats.dht.records = counts.records;
        stats.dht.provider_keys = counts.provider_keys;
        stats.dht.providers = counts.providers;
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, NetStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Announces every provided key again: a provider record carries the provider's external
    /// addresses as they were when it was sent, and one without addresses cannot be found by
    /// peers that do not already know where the provider is.
    fn reannounce_provided(&mut self) {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let keys: Vec<_> = kad.store_mut().provided().map(|r| r.key.clone()).collect();
        for key in keys {
            if let Err(e) = kad.start_providing(key) {
                warn!(error = ?e, "cannot announce a provided key again");
            }
        }
    }

    fn redial_bootstrap(&mut self) {
        let peers: Vec<_> = self
            .bootstrap
            .iter()
            .filter(|(peer, _)| !self.swarm.is_connected(peer))
            .map(|(peer, addr)| (*peer, addr.clone()))
            .collect();
        for (peer, addr) in peers {
            let opts = DialOpts::peer_id(peer)
                .addresses(vec![addr])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, error = %e, "cannot dial a bootstrap peer");
            }
        }
    }

    /// Sends an event to the driver without ever waiting: gossip is dropped (and counted) and
    /// requests are refused `busy` when the channel is full; other events wait in `overflow`.
    fn emit(&mut self, event: NetEvent) {
        let event = if self.overflow.is_empty() {
            match self.events.try_send(event) {
                Ok(()) | Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Full(event)) => event,
            }
        } else {
            event
        };
        match event {
            NetEvent::Gossip { topic, .. } => {
                self.gossip_dropped += 1;
                if self.gossip_dropped.is_power_of_two() {
                    warn!(?topic, dropped = self.gossip_dropped, "driver busy: gossip dropped");
                }
            }
            NetEvent::Request { peer, reply, .. } => {
                warn!(%peer, "driver busy: direct request refused");
                reply.send(DirectResponse::refused(crate::BUSY));
            }
            other => {
                if self.overflow.len() >= OVERFLOW_EVENTS_MAX {
                    let dropped = self.overflow.pop_front();
                    warn!(?dropped, "driver busy: event dropped");
                }
                self.overflow.push_back(other);
            }
        }
    }
}

impl Query {
    fn kind(&self) -> &'static str {
        match self {
            Self::PutRecord(_) => "put_record",
            Self::GetRecord(_) => "get_record",
            Self::StartProviding(_) => "start_providing",
            Self::GetProviders(..) => "get_providers",
        }
    }
}

fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// A seed for the peer set's ranking: random per process.
fn rand_seed() -> u64 {
    // A random PeerId is a multihash of 32 random bytes: its last 8 are random.
    let random = PeerId::random().to_bytes();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&random[random.len() - 8..]);
    u64::from_le_bytes(bytes)
}

/// Bootstrap peers by id, with their address without the `/p2p` suffix.
fn parse_bootstrap(addrs: &[Multiaddr]) -> Result<HashMap<PeerId, Multiaddr>, NetError> {
    let mut out = HashMap::new();
    for addr in addrs {
        let mut base = addr.clone();
        let Some(Protocol::P2p(peer)) = base.pop() else {
            return Err(NetError::BootstrapAddr(addr.clone()));
        };
        out.insert(peer, base);
    }
    Ok(out)
}

fn build_swarm(cfg: &NetConfig) -> Result<Swarm<Behaviour>, NetError> {
    let config_error =
        |what: &str, e: &dyn std::fmt::Display| NetError::Config(format!("{what}: {e}"));
    let swarm = SwarmBuilder::with_existing_identity(libp2p_keypair(&cfg.keypair))
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| config_error("tcp", &e))?
        .with_quic()
        .with_dns()
        .map_err(|e| config_error("dns", &e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| config_error("relay client", &e))?
        .with_behaviour(|key, relay_client| {
            Behaviour::new(key, relay_client, cfg)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| config_error("behaviour", &e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    Ok(swarm)
}
