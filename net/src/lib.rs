//! The libp2p swarm shared by aimatrix nodes and the Studio relay (see `docs/network.md`).
//!
//! [`spawn`] builds one swarm (TCP + QUIC, noise, yamux, identify, ping, Kademlia, gossipsub,
//! the request-response protocol `/aimatrix/direct/1`, relay server or relay client + DCUtR,
//! optional mDNS) and runs it in its own tokio task. It only moves bytes: the driver holds a
//! cloneable [`NetHandle`] to publish, send [`DirectRequest`]s, use the DHT and dial, and reads
//! [`NetEvent`]s (gossip, direct requests with a [`Responder`], peers, listen addresses) from a
//! bounded channel. Both ends are bounded: a slow driver loses gossip (counted and logged) and
//! has direct requests refused with `"busy"`, but never blocks the swarm.
//!
//! Identities are the protocol's: [`peer_id_of`] and [`node_id_of`] convert between a
//! [`NodeId`] and the [`PeerId`] of the same ed25519 key.
//!
//! ```no_run
//! use aimatrix_net::{spawn, DirectRequest, NetConfig, NetEvent, Role, Topic};
//! use aimatrix_protocol::identity::Keypair;
//!
//! # async fn run() -> Result<(), aimatrix_net::NetError> {
//! let mut cfg = NetConfig::new(Keypair::generate_os(), Role::Node);
//! cfg.listen = vec!["/ip4/0.0.0.0/tcp/0".parse().expect("valid multiaddr")];
//! cfg.bootstrap = vec!["/dns4/relay.example/tcp/4001/p2p/12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"
//!     .parse()
//!     .expect("valid multiaddr")];
//! let (net, mut events) = spawn(cfg).await?;
//! while let Some(event) = events.recv().await {
//!     match event {
//!         NetEvent::Gossip { topic: Topic::Offers, bytes, .. } => { /* hand to the core */ }
//!         NetEvent::Request { request: DirectRequest::Message(_envelope), reply, .. } => {
//!             reply.send(aimatrix_net::DirectResponse::Accepted);
//!         }
//!         _ => {}
//!     }
//! }
//! net.shutdown().await;
//! # Ok(()) }
//! ```

mod behaviour;
pub mod codec;
mod keep_alive;
pub mod outbound;
pub mod store;
mod task;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aimatrix_protocol::codec::EncodeError;
use aimatrix_protocol::identity::{Keypair, NodeId};
use tokio::sync::{mpsc, oneshot};

pub use aimatrix_protocol::direct::{DirectRequest, DirectResponse};
pub use aimatrix_protocol::Topic;
pub use libp2p::{Multiaddr, PeerId};
pub use outbound::Outbound;

/// The reason a peer gives when its driver is too busy to take a direct request; the request
/// may be sent again later ([`NetHandle::request_retrying`] does).
pub const BUSY: &str = "busy";

use task::Command;

/// How many events the swarm task queues for a driver that has not read them yet.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// How many commands from [`NetHandle`]s queue for the swarm task.
pub const COMMAND_CHANNEL_CAPACITY: usize = 256;

/// The default of [`NetConfig::request_timeout`].
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Which side of the network this swarm is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The Studio relay: DHT server, relay server for nodes behind NAT.
    Relay,
    /// A compute node: DHT client until it has a confirmed direct external address, relay
    /// client (reserves a slot on every bootstrap peer that is a relay) and DCUtR.
    Node,
}

/// How to build the swarm.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The identity; its secret key is also the libp2p key, so the PeerId is the node's id.
    pub keypair: Keypair,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/4001`, `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Addresses at which others can reach this peer (a public IP, a forwarded port). They are
    /// confirmed as external addresses: a node with one serves the DHT, a relay offers circuit
    /// reservations at them. A relay with none treats its listen addresses as external (right
    /// on a public host; set this behind a NAT or when listening on `0.0.0.0`).
    pub external: Vec<Multiaddr>,
    /// Peers to connect to and seed the DHT with; each address ends in `/p2p/<peer id>`.
    /// They are redialed while disconnected.
    pub bootstrap: Vec<Multiaddr>,
    /// Relay or node.
    pub role: Role,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// How long a direct request may take, either way, before it fails.
    pub request_timeout: Duration,
    /// How many other nodes a node keeps connections to, so gossip travels over a mesh among
    /// nodes (clamped to `aimatrix_protocol::mesh::NODE_PEERS_MIN..=NODE_PEERS_MAX`; unused on
    /// a relay).
    pub node_peers: usize,
}

impl NetConfig {
    /// A configuration with no listen, external or bootstrap addresses, no mDNS,
    /// [`REQUEST_TIMEOUT_DEFAULT`] and the default number of node peers.
    pub fn new(keypair: Keypair, role: Role) -> Self {
        Self {
            keypair,
            listen: Vec::new(),
            external: Vec::new(),
            bootstrap: Vec::new(),
            role,
            mdns: false,
            request_timeout: REQUEST_TIMEOUT_DEFAULT,
            node_peers: aimatrix_protocol::mesh::NODE_PEERS_DEFAULT,
        }
    }
}

/// What the swarm reports to its driver.
#[derive(Debug)]
pub enum NetEvent {
    /// A gossip message arrived, not validated: its author is the signer of the envelope it
    /// carries, which the core checks (gossipsub runs anonymous, without signatures of its own).
    Gossip {
        /// The topic it arrived on.
        topic: Topic,
        /// The message bytes (an encoded envelope, for the core to open).
        bytes: Vec<u8>,
        /// The peer it arrived from (which published or forwarded it).
        from: PeerId,
    },
    /// A peer sent a direct request; answer it through `reply` within the request timeout.
    Request {
        /// The peer that sent it (authenticated by the connection).
        peer: PeerId,
        /// The request.
        request: DirectRequest,
        /// Where the answer goes.
        reply: Responder,
    },
    /// The first connection to a peer was established.
    PeerConnected(PeerId),
    /// The last connection to a peer was closed.
    PeerDisconnected(PeerId),
    /// The swarm listens on a new address.
    ListenAddr(Multiaddr),
}

/// What the swarm knows about its place in the network, for status views (`status --json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetStats {
    /// Whether other peers can dial this one directly.
    pub nat: NatStatus,
    /// The addresses others can dial this peer at: confirmed by AutoNAT on a node, configured
    /// (or its listen addresses) on a relay.
    pub external_addrs: Vec<String>,
    /// The peers connected now, relays and nodes apart.
    pub peers: PeersView,
    /// The DHT.
    pub dht: DhtStats,
}

/// Whether other peers can dial this one directly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatStatus {
    /// Not tested yet (AutoNAT needs a connected peer that answers its probes).
    #[default]
    Unknown,
    /// At least one address was dialed back by another peer (or is configured as external).
    Public,
    /// Every address tested so far failed: the peer is behind a NAT or firewall that drops
    /// inbound connections; others reach it through a relay circuit.
    Private,
}

/// The peers connected now, by kind (told apart by identify: a relay speaks the circuit relay
/// protocol).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeersView {
    /// Relays, by PeerId.
    pub relays: Vec<String>,
    /// Every other peer, by PeerId (nodes, and peers not identified yet).
    pub nodes: Vec<String>,
}

/// What this peer's DHT holds and refused, for status views (`status --json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DhtStats {
    /// `server` when this peer answers other peers' DHT queries and stores their records,
    /// `client` when it only asks (a node without a confirmed direct external address).
    pub mode: DhtMode,
    /// Records (adverts) held.
    pub records: usize,
    /// Keys (capability classes) with providers held.
    pub provider_keys: usize,
    /// Provider records held, over every key.
    pub providers: usize,
    /// Records and provider records peers sent that were not stored, by reason: the labels
    /// of `aimatrix_protocol::dht::RecordRefusal`, and `store_full`.
    pub refused: BTreeMap<String, u64>,
}

/// Whether a peer serves the DHT.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DhtMode {
    /// Answers queries and stores records.
    Server,
    /// Only asks.
    #[default]
    Client,
}

/// The answer slot of one inbound direct request.
///
/// Dropping it without [`Responder::send`] answers `Refused("no response")`; not answering
/// within the request timeout answers `Refused("timed out")`.
#[derive(Debug)]
pub struct Responder {
    tx: oneshot::Sender<DirectResponse>,
}

impl Responder {
    /// Sends the response. A response over its limits (see `aimatrix_protocol::direct`) is
    /// replaced by a refusal; a response to a peer that is gone is dropped.
    pub fn send(self, resp: DirectResponse) {
        // The receiver is gone only when the request already timed out or the task stopped.
        let _ = self.tx.send(resp);
    }

    /// Answers a [`DirectRequest::Message`] from `peer`: hands the sender's node id to
    /// `handle` (which gives the bytes to the core), then answers `Accepted`. A peer whose id
    /// is not an ed25519 key cannot have signed a protocol message: refused, `handle` not
    /// called.
    pub fn take_message(self, peer: &PeerId, handle: impl FnOnce(NodeId)) {
        let Some(from) = node_id_of(peer) else {
            return self.send(DirectResponse::refused("peer id is not an ed25519 key"));
        };
        handle(from);
        self.send(DirectResponse::Accepted);
    }
}

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A behaviour or transport could not be built from the configuration.
    #[error("invalid network configuration: {0}")]
    Config(String),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A bootstrap address does not name its peer.
    #[error("bootstrap address {0} must end in /p2p/<peer id>")]
    BootstrapAddr(Multiaddr),
    /// No connected peer subscribes to the topic yet; retry once peers are connected.
    #[error("no peers subscribe to the topic yet")]
    NoPeers,
    /// Gossipsub refused the message.
    #[error("cannot publish: {0}")]
    Publish(String),
    /// A request or message is over its size limit.
    #[error("message too large: {0}")]
    TooLarge(#[from] EncodeError),
    /// The peer could not be reached (no known address, or every dial failed).
    #[error("cannot reach peer: {0}")]
    Dial(String),
    /// No response arrived within the request timeout.
    #[error("request timed out")]
    Timeout,
    /// The connection closed before the response arrived.
    #[error("connection closed before the response arrived")]
    ConnectionClosed,
    /// The peer does not speak `/aimatrix/direct/1`.
    #[error("peer does not speak /aimatrix/direct/1")]
    UnsupportedProtocol,
    /// The stream failed, or the peer sent a malformed or oversize response.
    #[error("direct request stream failed: {0}")]
    Stream(String),
    /// A DHT query or store failed.
    #[error("dht: {0}")]
    Dht(String),
    /// The swarm task has stopped (shutdown, or every handle dropped).
    #[error("the network task has stopped")]
    Shutdown,
}

/// A cloneable handle on the swarm task. The task stops on [`NetHandle::shutdown`] or when
/// every handle is dropped.
#[derive(Clone, Debug)]
pub struct NetHandle {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    stats: Arc<Mutex<NetStats>>,
}

/// Builds the swarm, binds every listen address, starts dialing the bootstrap peers and runs
/// the swarm in its own tokio task. Returns the handle and the event stream.
///
/// Must be called within a tokio runtime.
pub async fn spawn(cfg: NetConfig) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), NetError> {
    let peer_id = peer_id_of(&cfg.keypair.public());
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let (events_tx, events_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let stats = Arc::new(Mutex::new(NetStats::default()));
    let task = task::SwarmTask::start(cfg, events_tx, stats.clone()).await?;
    tokio::spawn(task.run(commands_rx));
    Ok((NetHandle { peer_id, commands: commands_tx, stats }, events_rx))
}

impl NetHandle {
    /// This swarm's PeerId (the node's id).
    pub fn local_peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Publishes `bytes` on `topic`, flooding it to every subscribed peer.
    /// [`NetError::NoPeers`] when no connected peer subscribes to it yet.
    pub async fn publish(&self, topic: Topic, bytes: Vec<u8>) -> Result<(), NetError> {
        self.call(|reply| Command::Publish { topic, bytes, reply }).await?
    }

    /// [`NetHandle::request`], retried with backoff (200 ms doubling to 5 s) while the peer
    /// cannot be reached — a relay restarting, a dropped connection — or answers [`BUSY`], for
    /// at most `retry_for`. Any other answer is returned at once; `make` builds each attempt.
    pub async fn request_retrying(
        &self,
        peer: PeerId,
        make: impl Fn() -> DirectRequest,
        retry_for: Duration,
    ) -> Result<DirectResponse, NetError> {
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            match self.request(peer, make()).await {
                Ok(DirectResponse::Refused(why))
                    if why == BUSY && started.elapsed() + delay <= retry_for =>
                {
                    tracing::debug!("{peer} is busy; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Ok(response) => return Ok(response),
                Err(e @ (NetError::TooLarge(_) | NetError::Shutdown)) => return Err(e),
                Err(e) if started.elapsed() + delay > retry_for => return Err(e),
                Err(e) => {
                    tracing::debug!("request to {peer} failed ({e}); retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Sends a direct request and waits for the response (at most the request timeout). Dials
    /// the peer through its known addresses (bootstrap, identify, mDNS, DHT) if not connected.
    pub async fn request(
        &self,
        peer: PeerId,
        request: DirectRequest,
    ) -> Result<DirectResponse, NetError> {
        aimatrix_protocol::direct::check_request(&request)?;
        self.call(|reply| Command::Request { peer, request, reply }).await?
    }

    /// Stores `value` under `key` in the DHT (locally, and on the closest servers).
    pub async fn put_record(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), NetError> {
        self.call(|reply| Command::PutRecord { key, value, reply }).await?
    }

    /// Looks `key` up in the DHT: the first record found, or `None`.
    pub async fn get_record(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, NetError> {
        self.call(|reply| Command::GetRecord { key, reply }).await?
    }

    /// Announces in the DHT that this peer provides `key` (e.g. a capability class).
    pub async fn start_providing(&self, key: Vec<u8>) -> Result<(), NetError> {
        self.call(|reply| Command::StartProviding { key, reply }).await?
    }

    /// Every provider of `key` the DHT knows of (this peer included, if it provides it).
    pub async fn get_providers(&self, key: Vec<u8>) -> Result<Vec<PeerId>, NetError> {
        self.call(|reply| Command::GetProviders { key, reply }).await?
    }

    /// Remembers addresses of `peer` (e.g. a relay named in a roster), so a request to it can
    /// dial it.
    pub async fn add_peer_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let _ = self.call(|reply| Command::AddPeerAddresses { peer, addrs, reply }).await;
    }

    /// Dials `addr` and waits until the connection is established or fails.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.call(|reply| Command::Dial { addr, reply }).await?
    }

    /// Every address the swarm listens on (empty once the task has stopped).
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.call(|reply| Command::ListenAddrs { reply }).await.unwrap_or_default()
    }

    /// Every peer with an open connection (empty once the task has stopped).
    pub async fn connected_peers(&self) -> Vec<PeerId> {
        self.call(|reply| Command::ConnectedPeers { reply }).await.unwrap_or_default()
    }

    /// Reachability, connected peers by kind and the DHT, as of the swarm's last update (the
    /// DHT's counts are refreshed every few seconds, everything else at once). Does not wait
    /// for the swarm task.
    pub fn stats(&self) -> NetStats {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Stops the swarm task and waits until it has stopped. Pending operations fail with
    /// [`NetError::Shutdown`]. Does nothing if the task has already stopped.
    pub async fn shutdown(&self) {
        let _ = self.call(|reply| Command::Shutdown { reply }).await;
    }

    async fn call<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(command(tx)).await.map_err(|_| NetError::Shutdown)?;
        rx.await.map_err(|_| NetError::Shutdown)
    }
}

/// The libp2p PeerId of a node id (the same ed25519 key).
pub fn peer_id_of(id: &NodeId) -> PeerId {
    let peer = PeerId::from_bytes(&id.to_peer_id_bytes());
    // NodeId renders exactly libp2p's identity-multihash PeerId bytes.
    peer.expect("an ed25519 NodeId is a valid PeerId")
}

/// The node id of a PeerId, or `None` when it is not an ed25519 identity PeerId.
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    NodeId::from_peer_id_bytes(&peer.to_bytes()).ok()
}

/// The libp2p keypair of a protocol keypair (the same secret key).
pub(crate) fn libp2p_keypair(key: &Keypair) -> libp2p::identity::Keypair {
    let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.secret_bytes());
    // Any 32 bytes are a valid ed25519 secret key.
    keypair.expect("a 32-byte ed25519 secret is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_convert_both_ways_and_match_the_libp2p_key() {
        for n in 0..16u8 {
            let key = Keypair::from_secret_bytes([n; 32]);
            let peer = peer_id_of(&key.public());
            assert_eq!(peer, libp2p_keypair(&key).public().to_peer_id());
            assert_eq!(peer.to_string(), key.public().to_peer_id());
            assert_eq!(node_id_of(&peer), Some(key.public()));
        }
        let rsa_style: PeerId = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N".parse().unwrap();
        assert_eq!(node_id_of(&rsa_style), None);
    }
}
