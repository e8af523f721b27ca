//! Identities: one ed25519 key per install.
//!
//! The same key is a node's signing identity, its libp2p `PeerId` and its ledger account name.
//! [`NodeId`] is the 32-byte public key; [`NodeId::to_peer_id`] renders it exactly as libp2p
//! does (base58btc of the identity multihash of the protobuf-encoded public key, `12D3KooW…`)
//! and [`NodeId::from_peer_id`] parses it back, so the protocol crate needs no libp2p.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Length of an ed25519 public key in bytes.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Protobuf header of a libp2p ed25519 public key: field 1 (KeyType) = 1 (Ed25519),
/// field 2 (Data) with length 32.
const LIBP2P_ED25519_PUBKEY_PREFIX: [u8; 4] = [0x08, 0x01, 0x12, 0x20];
/// Identity multihash code and the length of the protobuf-encoded key (4 + 32).
const IDENTITY_MULTIHASH_PREFIX: [u8; 2] = [0x00, 0x24];
/// Byte length of an ed25519 PeerId in binary form.
pub const PEER_ID_BYTES_LEN: usize = 2 + 4 + PUBLIC_KEY_LEN;

/// The first line of a key file ([`Keypair::to_key_file_text`]).
const KEY_FILE_HEADER: &str = "aimatrix-ed25519-secret-key-v1";

/// A node's public identity: its ed25519 public key.
///
/// Displayed (and parsed) as the libp2p PeerId string, which is also its ledger account name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId([u8; PUBLIC_KEY_LEN]);

/// Why a string or byte slice is not a valid [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is not base58btc.
    #[error("peer id {0:?} is not base58: {1}")]
    NotBase58(String, String),
    /// The bytes are not an ed25519 identity multihash.
    #[error(
        "peer id is not an ed25519 identity PeerId (expected 38 bytes starting 00 24 08 01 12 20)"
    )]
    NotEd25519,
    /// The 32 bytes are not a valid ed25519 point.
    #[error("peer id does not hold a valid ed25519 public key")]
    InvalidKey,
}

impl NodeId {
    /// Wraps raw public key bytes. Use [`NodeId::verifying_key`] to check they are a valid point.
    pub const fn from_bytes(bytes: [u8; PUBLIC_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The raw 32 public key bytes.
    pub const fn as_bytes(&self) -> &[u8; PUBLIC_KEY_LEN] {
        &self.0
    }

    /// The ed25519 verifying key, or an error when the bytes are not a valid point.
    pub fn verifying_key(&self) -> Result<VerifyingKey, IdError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| IdError::InvalidKey)
    }

    /// The libp2p PeerId in binary form (identity multihash of the protobuf public key),
    /// as accepted by `libp2p::PeerId::from_bytes`.
    pub fn to_peer_id_bytes(&self) -> [u8; PEER_ID_BYTES_LEN] {
        let mut out = [0u8; PEER_ID_BYTES_LEN];
        out[..2].copy_from_slice(&IDENTITY_MULTIHASH_PREFIX);
        out[2..6].copy_from_slice(&LIBP2P_ED25519_PUBKEY_PREFIX);
        out[6..].copy_from_slice(&self.0);
        out
    }

    /// Parses the binary PeerId form produced by [`NodeId::to_peer_id_bytes`].
    pub fn from_peer_id_bytes(bytes: &[u8]) -> Result<Self, IdError> {
        if bytes.len() != PEER_ID_BYTES_LEN
            || bytes[..2] != IDENTITY_MULTIHASH_PREFIX
            || bytes[2..6] != LIBP2P_ED25519_PUBKEY_PREFIX
        {
            return Err(IdError::NotEd25519);
        }
        let mut key = [0u8; PUBLIC_KEY_LEN];
        key.copy_from_slice(&bytes[6..]);
        let id = Self(key);
        id.verifying_key()?;
        Ok(id)
    }

    /// The libp2p PeerId string (`12D3KooW…`); also the ledger account name.
    pub fn to_peer_id(&self) -> String {
        bs58::encode(self.to_peer_id_bytes()).into_string()
    }

    /// Parses a libp2p PeerId string of an ed25519 key.
    pub fn from_peer_id(text: &str) -> Result<Self, IdError> {
        let bytes = bs58::decode(text)
            .into_vec()
            .map_err(|e| IdError::NotBase58(text.to_owned(), e.to_string()))?;
        Self::from_peer_id_bytes(&bytes)
    }

    /// The ledger account name of this identity (its PeerId string).
    pub fn account_name(&self) -> String {
        self.to_peer_id()
    }

    /// A short form for logs: the last 8 characters of the PeerId.
    pub fn short(&self) -> String {
        let full = self.to_peer_id();
        full[full.len().saturating_sub(8)..].to_owned()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_peer_id())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_peer_id(s)
    }
}

/// An ed25519 keypair: the secret identity of one install.
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair").field("public", &self.public()).finish_non_exhaustive()
    }
}

/// Why a key file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file exists but is not an aimatrix key file.
    #[error(
        "key file {path} is malformed: {problem}; move it aside to let a new identity be created, \
         or restore it from your backup"
    )]
    Malformed {
        /// The key file.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The file is readable by users other than its owner.
    #[error(
        "key file {path} has permissions {mode:o}; it holds a secret key and must be readable by \
         its owner only: run `chmod 600 {path}`"
    )]
    InsecurePermissions {
        /// The key file.
        path: String,
        /// Its unix mode bits.
        mode: u32,
    },
}

impl Keypair {
    /// Creates a fresh keypair from a cryptographically secure RNG.
    pub fn generate<R: rand_core::CryptoRngCore + ?Sized>(rng: &mut R) -> Self {
        Self { signing: SigningKey::generate(rng) }
    }

    /// Creates a fresh keypair from the operating system's RNG.
    pub fn generate_os() -> Self {
        Self::generate(&mut rand_core::OsRng)
    }

    /// Builds a keypair from its 32-byte secret seed (deterministic; used by tests and the simulator).
    pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
        Self { signing: SigningKey::from_bytes(&secret) }
    }

    /// The 32-byte secret seed. Handle with care.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// The public identity of this keypair.
    pub fn public(&self) -> NodeId {
        NodeId(self.signing.verifying_key().to_bytes())
    }

    /// Signs `message` (already domain-separated by the caller).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// The key file text: a header line and the hex secret seed.
    pub fn to_key_file_text(&self) -> String {
        format!("{KEY_FILE_HEADER}\n{}\n", hex::encode(self.secret_bytes()))
    }

    /// Parses key file text written by [`Keypair::to_key_file_text`]; `path` is used in errors.
    pub fn from_key_file_text(text: &str, path: &str) -> Result<Self, KeyFileError> {
        let malformed = |problem: &str| KeyFileError::Malformed {
            path: path.to_owned(),
            problem: problem.into(),
        };
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        match lines.next() {
            Some(KEY_FILE_HEADER) => {}
            Some(_) => return Err(malformed(&format!("first line is not {KEY_FILE_HEADER:?}"))),
            None => return Err(malformed("the file is empty")),
        }
        let hex_line = lines.next().ok_or_else(|| malformed("the secret key line is missing"))?;
        if lines.next().is_some() {
            return Err(malformed("unexpected text after the secret key line"));
        }
        let bytes = hex::decode(hex_line)
            .map_err(|e| malformed(&format!("the secret key is not hex ({e})")))?;
        let secret: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            malformed(&format!("the secret key is {} bytes, expected 32", b.len()))
        })?;
        Ok(Self::from_secret_bytes(secret))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_roundtrip_and_prefix() {
        let key = Keypair::from_secret_bytes([7u8; 32]);
        let id = key.public();
        let text = id.to_peer_id();
        assert!(text.starts_with("12D3KooW"), "{text}");
        assert_eq!(NodeId::from_peer_id(&text).unwrap(), id);
        assert_eq!(text.parse::<NodeId>().unwrap(), id);
        assert_eq!(NodeId::from_peer_id_bytes(&id.to_peer_id_bytes()).unwrap(), id);
    }

    #[test]
    fn peer_id_rejects_garbage() {
        assert!(matches!(NodeId::from_peer_id("0OIl"), Err(IdError::NotBase58(..))));
        assert_eq!(NodeId::from_peer_id("12D3Koo"), Err(IdError::NotEd25519));
        // A secp256k1-style / sha256 PeerId (Qm…) is not an ed25519 identity.
        assert_eq!(
            NodeId::from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"),
            Err(IdError::NotEd25519)
        );
    }

    #[test]
    fn malformed_key_files_name_the_problem() {
        let cases = [
            ("", "empty"),
            ("hello\n", "first line"),
            ("aimatrix-ed25519-secret-key-v1\n", "missing"),
            ("aimatrix-ed25519-secret-key-v1\nzz\n", "not hex"),
            ("aimatrix-ed25519-secret-key-v1\nabcd\n", "2 bytes, expected 32"),
        ];
        for (text, needle) in cases {
            let err = Keypair::from_key_file_text(text, "k").unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            assert!(err.contains("move it aside"), "{err}");
        }
    }
}
