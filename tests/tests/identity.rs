//! The protocol's identities are libp2p's: the same ed25519 key gives the same PeerId, and the
//! PeerId string (also the ledger account name) converts both ways.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use aimatrix_protocol::identity::{Keypair, NodeId};

#[test]
fn node_id_is_the_libp2p_peer_id_of_the_same_key() {
    for n in 0..32u8 {
        let mut secret = [n; 32];
        secret[0] = n.wrapping_mul(37);
        let ours = Keypair::from_secret_bytes(secret);
        let theirs = libp2p_identity::Keypair::ed25519_from_bytes(secret).unwrap();
        let peer_id = theirs.public().to_peer_id();

        assert_eq!(ours.public().to_peer_id(), peer_id.to_string());
        assert_eq!(ours.public().to_peer_id_bytes().to_vec(), peer_id.to_bytes());
        assert_eq!(NodeId::from_peer_id(&peer_id.to_string()).unwrap(), ours.public());
        assert_eq!(NodeId::from_peer_id_bytes(&peer_id.to_bytes()).unwrap(), ours.public());
        assert_eq!(ours.public().account_name(), peer_id.to_string());
    }
}

#[test]
fn a_key_file_written_by_the_protocol_loads_as_the_same_libp2p_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("identity.key");
    let (key, created) = Keypair::load_or_create(&path).unwrap();
    assert!(created);
    let reloaded = Keypair::load(&path).unwrap();
    let libp2p = libp2p_identity::Keypair::ed25519_from_bytes(reloaded.secret_bytes()).unwrap();
    assert_eq!(libp2p.public().to_peer_id().to_string(), key.public().to_peer_id());
}

#[test]
fn non_ed25519_peer_ids_are_refused() {
    // A sha2-256 multihash PeerId (as RSA keys get): valid for libp2p, not an ed25519 identity.
    let rsa_style: libp2p_identity::PeerId =
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N".parse().unwrap();
    assert!(NodeId::from_peer_id(&rsa_style.to_string()).is_err());
}
