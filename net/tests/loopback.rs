//! A relay and two nodes on loopback: gossip, direct requests, the DHT, and identities.
//!
//! Every wait polls for a condition under a generous deadline; nothing asserts on timing.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use aimatrix_net::{
    node_id_of, peer_id_of, spawn, DhtMode, DirectRequest, DirectResponse, Multiaddr, NatStatus,
    NetConfig, NetError, NetEvent, NetHandle, PeerId, Role, Topic,
};
use aimatrix_protocol::capability::{advert_record_key, class_provider_key};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::identity::Keypair;
use aimatrix_protocol::messages::{seal, Advert, JobId, Message};
use aimatrix_protocol::testkit;
use tokio::sync::mpsc;

/// Long enough for a loaded 2-core machine; a passing run takes far less.
const DEADLINE: Duration = Duration::from_secs(60);

/// A gossip message as a peer's driver saw it.
#[derive(Debug)]
struct Seen {
    topic: Topic,
    bytes: Vec<u8>,
    from: PeerId,
}

/// One running peer: its handle and the gossip its driver received.
struct Peer {
    net: NetHandle,
    gossip: mpsc::UnboundedReceiver<Seen>,
}

/// Starts a peer whose driver answers direct requests: messages and uploads are accepted,
/// blobs are served from `blobs`.
async fn start(role: Role, seed: u8, bootstrap: Vec<Multiaddr>, blobs: Vec<Vec<u8>>) -> Peer {
    start_with(config(role, seed, bootstrap), blobs).await
}

/// The configuration [`start`] uses: loopback, the given bootstrap peers.
fn config(role: Role, seed: u8, bootstrap: Vec<Multiaddr>) -> NetConfig {
    let mut cfg = NetConfig::new(Keypair::from_secret_bytes([seed; 32]), role);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.bootstrap = bootstrap;
    cfg.request_timeout = Duration::from_secs(20);
    cfg
}

async fn start_with(cfg: NetConfig, blobs: Vec<Vec<u8>>) -> Peer {
    let (net, events) = spawn(cfg).await.unwrap();
    let blobs: HashMap<Digest, Vec<u8>> = blobs.into_iter().map(|b| (Digest::of(&b), b)).collect();
    let (gossip_tx, gossip) = mpsc::unbounded_channel();
    tokio::spawn(drive(events, blobs, gossip_tx));
    Peer { net, gossip }
}

async fn drive(
    mut events: mpsc::Receiver<NetEvent>,
    blobs: HashMap<Digest, Vec<u8>>,
    gossip: mpsc::UnboundedSender<Seen>,
) {
    while let Some(event) = events.recv().await {
        match event {
            NetEvent::Gossip { topic, bytes, from } => {
                let _ = gossip.send(Seen { topic, bytes, from });
            }
            NetEvent::Request { request, reply, .. } => reply.send(match request {
                DirectRequest::Message(bytes) if bytes.is_empty() => {
                    DirectResponse::refused("empty envelope")
                }
                DirectRequest::Message(_) | DirectRequest::PutBlob { .. } => {
                    DirectResponse::Accepted
                }
                DirectRequest::GetBlob(digest) => match blobs.get(&digest) {
                    Some(bytes) => DirectResponse::Blob(bytes.clone()),
                    None => DirectResponse::NotFound,
                },
            }),
            _ => {}
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after [`DEADLINE`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A relay (holding `blob`) and two nodes bootstrapped to it, both connected.
struct Network {
    relay: Peer,
    a: Peer,
    b: Peer,
}

async fn network(blobs: Vec<Vec<u8>>) -> Network {
    let relay = start(Role::Relay, 1, Vec::new(), blobs).await;
    let relay_id = relay.net.local_peer_id();
    let addr = relay.net.listen_addrs().await.into_iter().next().unwrap();
    let bootstrap = vec![addr.with(libp2p::multiaddr::Protocol::P2p(relay_id))];
    let a = start(Role::Node, 2, bootstrap.clone(), Vec::new()).await;
    let b = start(Role::Node, 3, bootstrap, Vec::new()).await;
    let (a_id, b_id) = (a.net.local_peer_id(), b.net.local_peer_id());
    eventually("both nodes to connect to the relay", || async {
        let peers = relay.net.connected_peers().await;
        (peers.contains(&a_id) && peers.contains(&b_id)).then_some(())
    })
    .await;
    for node in [&a, &b] {
        eventually("each node to reserve a relay slot", || async {
            let addrs = node.net.listen_addrs().await;
            addrs.iter().any(|a| a.to_string().contains("/p2p-circuit")).then_some(())
        })
        .await;
    }
    Network { relay, a, b }
}

/// Publishes fresh messages from `from` until every peer in `to` has received one (gossipsub
/// needs a heartbeat or two to learn subscriptions and build its mesh).
async fn gossip_reaches(from: &Peer, to: &mut [&mut Peer], topic: Topic) {
    let source = from.net.local_peer_id();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut reached = vec![false; to.len()];
    for round in 0u32.. {
        // Gossip ids are hashes of the bytes: every message must differ.
        let bytes = format!("{topic:?} #{round} from {source}").into_bytes();
        match from.net.publish(topic, bytes).await {
            Ok(()) | Err(NetError::NoPeers) => {}
            Err(e) => panic!("publish failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (peer, done) in to.iter_mut().zip(reached.iter_mut()) {
            while let Ok(seen) = peer.gossip.try_recv() {
                assert_eq!(seen.topic, topic, "{seen:?}");
                // Gossip is anonymous: the bytes name their author, `from` the peer that
                // passed them on (the publisher, or a peer that forwarded them).
                assert!(seen.bytes.starts_with(format!("{topic:?} #").as_bytes()), "{seen:?}");
                assert!(seen.bytes.ends_with(source.to_string().as_bytes()), "{seen:?}");
                assert_ne!(seen.from, peer.net.local_peer_id(), "{seen:?}");
                *done = true;
            }
        }
        if reached.iter().all(|d| *d) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "gossip on {topic:?} did not arrive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_on_each_topic_reaches_the_other_peers() {
    let Network { mut relay, mut a, mut b } = network(Vec::new()).await;
    for topic in [Topic::Adverts, Topic::Offers] {
        gossip_reaches(&a, &mut [&mut relay, &mut b], topic).await;
        gossip_reaches(&relay, &mut [&mut a, &mut b], topic).await;
    }
    for peer in [&relay, &a, &b] {
        peer.net.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_requests_are_answered_both_ways() {
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let net = network(vec![blob.clone()]).await;
    let (relay, a, b) = (&net.relay.net, &net.a.net, &net.b.net);

    // Node to relay and relay to node.
    let envelope = DirectRequest::Message(vec![7; 500]);
    assert_eq!(
        a.request(relay.local_peer_id(), envelope.clone()).await.unwrap(),
        DirectResponse::Accepted
    );
    assert_eq!(
        relay.request(b.local_peer_id(), envelope.clone()).await.unwrap(),
        DirectResponse::Accepted
    );
    let refused = a.request(relay.local_peer_id(), DirectRequest::Message(Vec::new())).await;
    assert_eq!(refused.unwrap(), DirectResponse::Refused("empty envelope".into()));

    // Blobs larger than a message frame come back whole; unknown ones are NotFound.
    let got = a.request(relay.local_peer_id(), DirectRequest::GetBlob(Digest::of(&blob))).await;
    assert_eq!(got.unwrap(), DirectResponse::Blob(blob.clone()));
    let missing =
        a.request(relay.local_peer_id(), DirectRequest::GetBlob(Digest::of(b"nope"))).await;
    assert_eq!(missing.unwrap(), DirectResponse::NotFound);
    let put = DirectRequest::PutBlob { job_id: JobId([1; 16]), lease: 1, bytes: blob };
    assert_eq!(b.request(relay.local_peer_id(), put).await.unwrap(), DirectResponse::Accepted);

    // Node to node, once a knows where b listens.
    let b_addr =
        b.listen_addrs().await.into_iter().find(|a| a.to_string().contains("/tcp/")).unwrap();
    a.dial(b_addr).await.unwrap();
    assert_eq!(
        a.request(b.local_peer_id(), envelope.clone()).await.unwrap(),
        DirectResponse::Accepted
    );

    // Oversize requests fail before they leave; unknown peers fail instead of hanging.
    let huge = DirectRequest::Message(vec![0; aimatrix_protocol::codec::MAX_FRAME_BYTES + 1]);
    assert!(matches!(a.request(relay.local_peer_id(), huge).await, Err(NetError::TooLarge(_))));
    let stranger = peer_id_of(&Keypair::from_secret_bytes([99; 32]).public());
    assert!(matches!(a.request(stranger, envelope).await, Err(NetError::Dial(_))));
}

/// The advert record of the node with secret `seed`, numbered `seq`: its DHT key and value.
fn advert_record(seed: u8, seq: u64) -> (Vec<u8>, Vec<u8>) {
    let key = Keypair::from_secret_bytes([seed; 32]);
    let advert = Message::Advert(Advert { seq, profile: testkit::profile() });
    (advert_record_key(&key.public()), seal(&key, &advert, seq, 0, 60_000).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_providers_travel_through_the_relay() {
    let net = network(Vec::new()).await;
    let (a, b) = (&net.a.net, &net.b.net);

    let (key, advert) = advert_record(2, 1);
    a.put_record(key.clone(), advert.clone()).await.unwrap();
    let found =
        eventually("b to find a's advert", || async { b.get_record(key.clone()).await.unwrap() })
            .await;
    assert_eq!(found, advert);
    let (nobody, _) = advert_record(77, 1);
    assert_eq!(b.get_record(nobody).await.unwrap(), None);

    let wasm = class_provider_key("runtime/wasm");
    a.start_providing(wasm.clone()).await.unwrap();
    let a_id = a.local_peer_id();
    eventually("b to find a as a provider", || async {
        b.get_providers(wasm.clone()).await.unwrap().contains(&a_id).then_some(())
    })
    .await;
    assert!(b.get_providers(class_provider_key("gpu/vram>=16g")).await.unwrap().is_empty());

    let stats = eventually("the relay to count what it holds", || async {
        let stats = net.relay.net.stats().dht;
        (stats.records == 1 && stats.providers == 1).then_some(stats)
    })
    .await;
    assert_eq!((stats.mode, stats.provider_keys), (DhtMode::Server, 1));
    assert!(stats.refused.is_empty(), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autonat_confirms_a_reachable_node_which_then_serves_the_dht() {
    let net = network(Vec::new()).await;
    let relay_id = net.relay.net.local_peer_id().to_string();
    // Before any probe, or until one succeeds, a node only asks the DHT.
    let stats = eventually("the relay to dial node a back and confirm its address", || async {
        let stats = net.a.net.stats();
        (stats.nat == NatStatus::Public).then_some(stats)
    })
    .await;
    assert_eq!(stats.dht.mode, DhtMode::Server, "{stats:?}");
    assert!(stats.external_addrs.iter().any(|a| a.starts_with("/ip4/127.0.0.1/tcp/")), "{stats:?}");
    assert!(stats.external_addrs.iter().all(|a| !a.contains("p2p-circuit")), "{stats:?}");
    assert_eq!(stats.peers.relays, vec![relay_id], "{stats:?}");

    let relay = net.relay.net.stats();
    assert_eq!((relay.nat, relay.dht.mode), (NatStatus::Public, DhtMode::Server));
    assert!(relay.peers.relays.is_empty(), "{relay:?}");
    let a_id = net.a.net.local_peer_id().to_string();
    assert!(relay.peers.nodes.contains(&a_id), "{relay:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dht_refuses_forged_foreign_and_stale_records_and_keeps_what_it_had() {
    let net = network(Vec::new()).await;
    let (relay, a, b) = (&net.relay.net, &net.a.net, &net.b.net);
    let (a_key, a_advert) = advert_record(2, 5);
    a.put_record(a_key.clone(), a_advert.clone()).await.unwrap();
    eventually("the relay to hold a's advert", || async {
        relay.get_record(a_key.clone()).await.unwrap().filter(|v| *v == a_advert)
    })
    .await;

    // b is hostile: it overwrites a's record with its own advert, replays an older advert a
    // signed, forges a's signature, stores junk under junk, and provides a key that is no
    // capability class. (A peer's own store keeps what it puts; only others check.)
    let (_, b_advert) = advert_record(3, 9);
    let (_, a_old) = advert_record(2, 1);
    let mut forged = a_advert.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let _ = b.put_record(a_key.clone(), b_advert).await;
    let _ = b.put_record(a_key.clone(), a_old).await;
    let _ = b.put_record(a_key.clone(), forged).await;
    let _ = b.put_record(b"junk".to_vec(), b"junk".to_vec()).await;
    let _ = b.start_providing(b"/ipfs/anything".to_vec()).await;

    let expected = [
        "foreign_key_record",
        "stale_record",
        "bad_signature_record",
        "not_advert_key",
        "not_class_key",
    ];
    let refused = eventually("the relay to count every refusal", || async {
        let refused = relay.stats().dht.refused;
        expected.iter().all(|label| refused.get(*label) == Some(&1)).then_some(refused)
    })
    .await;
    assert_eq!(refused.len(), expected.len(), "{refused:?}");

    // Nothing stored was lost or replaced: the relay still answers a's own advert, and a
    // third peer finds it there.
    assert_eq!(relay.get_record(a_key.clone()).await.unwrap(), Some(a_advert.clone()));
    assert_eq!(relay.get_record(b"junk".to_vec()).await.unwrap(), None);
    let c = start(Role::Node, 4, vec![relay_addr(relay).await], Vec::new()).await;
    let found = eventually("a fresh node to find a's advert", || async {
        c.net.get_record(a_key.clone()).await.ok().flatten()
    })
    .await;
    assert_eq!(found, a_advert);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_publishes_its_records_again_when_a_restarted_relay_comes_back() {
    let relay = start(Role::Relay, 1, Vec::new(), Vec::new()).await;
    let addr = relay_addr(&relay.net).await;
    let a = start(Role::Node, 2, vec![addr.clone()], Vec::new()).await;
    let (key, advert) = advert_record(2, 1);
    let wasm = class_provider_key("runtime/wasm");
    eventually("a to store its advert and provide its class at the relay", || async {
        let stored = a.net.put_record(key.clone(), advert.clone()).await.is_ok()
            && a.net.start_providing(wasm.clone()).await.is_ok();
        let stats = relay.net.stats().dht;
        (stored && stats.records == 1 && stats.providers == 1).then_some(())
    })
    .await;

    // The relay restarts with an empty store, on the same address.
    relay.net.shutdown().await;
    let mut listen = addr.clone();
    listen.pop(); // the /p2p suffix
    let mut cfg = NetConfig::new(Keypair::from_secret_bytes([1; 32]), Role::Relay);
    cfg.listen = vec![listen];
    let (restarted, _events) = spawn(cfg).await.unwrap();
    assert_eq!(restarted.stats().dht.records, 0);

    // The node redials it and publishes again without being asked; nothing waits hours.
    let a_id = a.net.local_peer_id();
    eventually("the restarted relay to hold a's advert and provider record", || async {
        let record = restarted.get_record(key.clone()).await.ok().flatten();
        let providers = restarted.get_providers(wasm.clone()).await.unwrap_or_default();
        (record.as_ref() == Some(&advert) && providers.contains(&a_id)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_form_a_mesh_that_carries_gossip_without_the_relay() {
    const NODES: u8 = 12;
    const TARGET: usize = 4;
    let relay = start(Role::Relay, 1, Vec::new(), Vec::new()).await;
    let bootstrap = vec![relay_addr(&relay.net).await];
    let mut nodes = Vec::new();
    for seed in 10..10 + NODES {
        let mut cfg = config(Role::Node, seed, bootstrap.clone());
        cfg.node_peers = TARGET;
        nodes.push(start_with(cfg, Vec::new()).await);
    }
    // Each node dialed only the relay; AutoNAT confirms them, they serve the DHT, random walks
    // find the others, and each keeps its target of node peers (at most twice as many).
    eventually("every node to keep its target of node peers", || async {
        nodes
            .iter()
            .map(|n| n.net.stats())
            .all(|s| {
                s.dht.mode == DhtMode::Server
                    && (TARGET..=2 * TARGET).contains(&s.peers.nodes.len())
            })
            .then_some(())
    })
    .await;

    // The relay goes away; the nodes keep their mesh and gossip still reaches every node,
    // also one the publisher has no connection to.
    relay.net.shutdown().await;
    eventually("every node to see the relay gone", || async {
        nodes.iter().all(|n| n.net.stats().peers.relays.is_empty()).then_some(())
    })
    .await;
    let ids: Vec<String> = nodes.iter().map(|n| n.net.local_peer_id().to_string()).collect();
    let (x, y) = (0..nodes.len())
        .flat_map(|x| (0..nodes.len()).map(move |y| (x, y)))
        .find(|&(x, y)| x != y && !nodes[x].net.stats().peers.nodes.contains(&ids[y]))
        .expect("at most 8 peers each: some pair of the 12 is not connected");
    let mut rest: Vec<&mut Peer> = Vec::new();
    let mut from = None;
    for (i, node) in nodes.iter_mut().enumerate() {
        if i == x {
            from = Some(&*node);
        } else {
            rest.push(node);
        }
    }
    let (from, y_at) = (from.unwrap(), if y < x { y } else { y - 1 });
    assert!(!from.net.stats().peers.nodes.contains(&ids[y]));
    assert_eq!(rest[y_at].net.local_peer_id().to_string(), ids[y]);
    gossip_reaches(from, &mut rest, Topic::Adverts).await;
}

/// The relay's first listen address, ending in its `/p2p` id.
async fn relay_addr(relay: &NetHandle) -> Multiaddr {
    let addr = relay.listen_addrs().await.into_iter().next().unwrap();
    addr.with(libp2p::multiaddr::Protocol::P2p(relay.local_peer_id()))
}

#[tokio::test]
async fn a_lone_node_has_no_gossip_peers_and_stops_cleanly() {
    let key = Keypair::from_secret_bytes([42; 32]);
    let mut cfg = NetConfig::new(key.clone(), Role::Node);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    let (net, _events) = spawn(cfg).await.unwrap();

    assert_eq!(net.local_peer_id(), peer_id_of(&key.public()));
    assert_eq!(node_id_of(&net.local_peer_id()), Some(key.public()));
    let addrs = net.listen_addrs().await;
    assert!(addrs.iter().any(|a| a.to_string().starts_with("/ip4/127.0.0.1/tcp/")), "{addrs:?}");
    assert!(matches!(net.publish(Topic::Offers, b"offer".to_vec()).await, Err(NetError::NoPeers)));

    net.shutdown().await;
    assert!(matches!(net.publish(Topic::Offers, b"x".to_vec()).await, Err(NetError::Shutdown)));
    assert!(net.listen_addrs().await.is_empty());
}

#[tokio::test]
async fn a_bootstrap_address_must_name_its_peer() {
    let mut cfg = NetConfig::new(Keypair::from_secret_bytes([5; 32]), Role::Node);
    cfg.bootstrap = vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()];
    let err = spawn(cfg).await.err().unwrap();
    assert!(matches!(err, NetError::BootstrapAddr(_)), "{err}");
    assert!(err.to_string().contains("/p2p/"), "{err}");
}
