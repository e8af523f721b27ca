//! The derived `NetworkBehaviour`: every protocol the swarm speaks, configured, no decisions.

use std::time::Duration;

use aimatrix_protocol::hash::Digest;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, dcutr, gossipsub, identify, identity, kad, mdns, ping, relay, request_response,
    StreamProtocol,
};

use crate::codec::{DirectCodec, DIRECT_PROTOCOL};
use crate::store::DhtStore;
use crate::{NetConfig, NetError, Role};

/// The identify protocol version: peers of other networks are told apart by it.
pub(crate) const IDENTIFY_PROTOCOL_VERSION: &str = "/aimatrix/1";

/// The largest gossip message: a 1 MiB envelope plus gossipsub's own framing (signature, key,
/// topic, sequence number).
pub(crate) const GOSSIP_TRANSMIT_BYTES_MAX: usize =
    aimatrix_protocol::codec::MAX_FRAME_BYTES + (64 << 10);

/// How often gossipsub maintains its mesh. Publishing floods to every subscribed peer at once,
/// so this bounds how soon a new peer joins the mesh, not delivery latency.
const GOSSIP_HEARTBEAT: Duration = Duration::from_millis(500);

/// The network's Kademlia protocol: its own, so its DHT never merges with IPFS's
/// (`/ipfs/kad/1.0.0`) or another network's.
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/aimatrix/kad/1");

/// The largest Kademlia message: a record of the largest advert, with room for the message's
/// own fields, or an answer of `store::PROVIDERS_ANSWERED` providers with their addresses.
const KAD_PACKET_BYTES_MAX: usize = aimatrix_protocol::dht::ADVERT_RECORD_BYTES_MAX + (16 << 10);

/// How long a Kademlia query may run.
const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Every protocol of the swarm. Role-specific parts are toggled off on the other role.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    /// AutoNAT v2, asking side: has other peers dial this one's candidate addresses back and
    /// confirms those that work as external addresses (a node then serves the DHT).
    pub(crate) autonat_client: Toggle<autonat::v2::client::Behaviour>,
    /// AutoNAT v2, answering side: every peer dials back the addresses others ask it to test.
    pub(crate) autonat_server: autonat::v2::server::Behaviour,
    pub(crate) kad: kad::Behaviour<DhtStore>,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) direct: request_response::Behaviour<DirectCodec>,
    pub(crate) relay_server: Toggle<relay::Behaviour>,
    pub(crate) relay_client: Toggle<relay::client::Behaviour>,
    pub(crate) dcutr: Toggle<dcutr::Behaviour>,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    /// Holds open the connections the task chose to keep (`crate::keep_alive`).
    pub(crate) keep_alive: crate::keep_alive::Behaviour,
}

impl Behaviour {
    /// Builds the behaviour for `cfg.role`; `relay_client` comes from the transport builder.
    pub(crate) fn new(
        key: &identity::Keypair,
        relay_client: relay::client::Behaviour,
        cfg: &NetConfig,
    ) -> Result<Self, NetError> {
        let peer_id = key.public().to_peer_id();
        let is_relay = cfg.role == Role::Relay;

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), key.public())
                .with_agent_version(format!("aimatrix/{}", env!("CARGO_PKG_VERSION")))
                .with_push_listen_addr_updates(true)
                // A node tells its peers only its confirmed external addresses: a direct one
                // once AutoNAT confirmed it, else its relay circuit addresses
                // (`SwarmTask::prefer_direct_addresses`). Its listen addresses may be private,
                // and peers dialing unconfirmed ones waste their dials.
                .with_hide_listen_addrs(!is_relay),
        );

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_query_timeout(KAD_QUERY_TIMEOUT);
        kad_config.set_max_packet_size(KAD_PACKET_BYTES_MAX);
        // Nothing a peer sends is stored before the protocol's checks (`SwarmTask::on_dht_inbound`).
        kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
        let mut kad = kad::Behaviour::with_config(peer_id, DhtStore::new(peer_id), kad_config);
        // The relay always serves the DHT; a node serves it only once it has a confirmed direct
        // external address (see `SwarmTask::update_kad_mode`).
        kad.set_mode(Some(if is_relay { kad::Mode::Server } else { kad::Mode::Client }));

        let gossip_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(GOSSIP_HEARTBEAT)
            // A node keeps about a dozen node peers (`protocol::mesh`); most of them join the
            // topic meshes, which also keeps their connections open.
            .mesh_n(8)
            .mesh_n_low(6)
            .mesh_n_high(16)
            .mesh_outbound_min(3)
            // Anonymous: gossipsub neither signs messages nor checks signatures. Every message
            // is an envelope its author signed, which the receiving core checks once; gossipsub's
            // own signature was checked on every copy a peer received, duplicates included, in
            // the codec before deduplication: about a dozen ed25519 checks per offer per node
            // in a mesh, which made the nodes, not the relay, the network's bottleneck.
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            .message_id_fn(|msg: &gossipsub::Message| {
                gossipsub::MessageId::new(&Digest::of(&msg.data).0)
            })
            .max_transmit_size(GOSSIP_TRANSMIT_BYTES_MAX)
            .flood_publish(true)
            .build()
            .map_err(|e| NetError::Config(format!("gossipsub: {e}")))?;
        let mut gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_config)
                .map_err(|e| NetError::Config(format!("gossipsub: {e}")))?;
        gossipsub
            .with_peer_score(gossip_score_params(), gossip_score_thresholds())
            .map_err(|e| NetError::Config(format!("gossipsub scoring: {e}")))?;

        let direct = request_response::Behaviour::with_codec(
            DirectCodec,
            [(DIRECT_PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(cfg.request_timeout),
        );

        let mdns = if cfg.mdns {
            let behaviour = mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                .map_err(|e| NetError::Config(format!("mdns: {e}")))?;
            Some(behaviour)
        } else {
            None
        };

        Ok(Self {
            identify,
            ping: ping::Behaviour::default(),
            // A relay is told its external addresses (or takes its listen addresses); a node
            // finds out.
            // (libp2p's defaults: a candidate tested every 5 s, at most 10 candidates.)
            autonat_client: (!is_relay).then(autonat::v2::client::Behaviour::default).into(),
            autonat_server: autonat::v2::server::Behaviour::default(),
            kad,
            gossipsub,
            direct,
            relay_server: is_relay
                .then(|| relay::Behaviour::new(peer_id, relay_server_config()))
                .into(),
            relay_client: (!is_relay).then_some(relay_client).into(),
            dcutr: (!is_relay).then(|| dcutr::Behaviour::new(peer_id)).into(),
            mdns: mdns.into(),
            keep_alive: crate::keep_alive::Behaviour::default(),
        })
    }
}

/// Circuit reservations a relay holds at once: one for each node it serves, with room.
pub(crate) const RELAY_RESERVATIONS_MAX: usize = 16_384;

/// The relay server's limits. libp2p's defaults hold 128 reservations and grant 60 a minute
/// per IP address, so at 250 nodes (or many nodes behind one NAT address) most nodes were
/// refused a slot and asked again at every identify push, in a storm that starved the relay
/// (seen in the 250-node bench). Reservations are limited per peer only (one every two minutes,
/// 30 an hour, as libp2p's default), up to [`RELAY_RESERVATIONS_MAX`]; circuits keep libp2p's
/// defaults. Per-peer limits against floods are issue 18's.
fn relay_server_config() -> relay::Config {
    let defaults = relay::Config::default();
    relay::Config {
        max_reservations: RELAY_RESERVATIONS_MAX,
        reservation_rate_limiters: Vec::new(),
        ..defaults
    }
    .reservation_rate_per_peer(
        std::num::NonZeroU32::new(30).expect("30 > 0"),
        Duration::from_secs(120),
    )
}

/// Gossipsub peer scoring (docs/network.md, "Gossip scoring"): a peer gains score for
/// delivering messages first and for time in the mesh, and loses it fast for messages that fail
/// gossipsub's validation (malformed, or signed in our anonymous gossip) and for protocol
/// misbehaviour. Mesh-delivery penalties are off:
/// offers and adverts are rare, so a quiet mesh peer is normal, not a sign of an attack. The
/// same-address penalty is off: many honest nodes share one public address behind a NAT.
fn gossip_score_params() -> gossipsub::PeerScoreParams {
    let topic = gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        first_message_deliveries_weight: 1.0,
        first_message_deliveries_decay: 0.5,
        first_message_deliveries_cap: 100.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -100.0,
        invalid_message_deliveries_decay: 0.3,
        ..gossipsub::TopicScoreParams::default()
    };
    let mut params = gossipsub::PeerScoreParams {
        ip_colocation_factor_weight: 0.0,
        ..gossipsub::PeerScoreParams::default()
    };
    for t in aimatrix_protocol::Topic::ALL {
        params.topics.insert(gossipsub::IdentTopic::new(t.name()).hash(), topic.clone());
    }
    params
}

/// Below `gossip_threshold` a peer gets no gossip from us, below `publish_threshold` none of
/// our messages, below `graylist_threshold` nothing it sends is read. One invalid message costs
/// 100, so a peer sending them is graylisted at its first.
fn gossip_score_thresholds() -> gossipsub::PeerScoreThresholds {
    gossipsub::PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    }
}
