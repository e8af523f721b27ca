//! Identities: one ed25519 key per install.
//!
//! The same key is a node's signing identity, its libp2p `PeerId` and its ledger account name.
//! [`NodeId`] is the 32-byte public key; [`NodeId::to_peer_id`] renders it exactly as libp2p
//! does (base58btc of the identity multihash of the protobuf-encoded public key, `12D3KooW…`)
//! and [`NodeId::from_peer_id`] parses it back, so the protocol crate needs no libp2p.

use std::fmt;
use std::path::Path;
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

/// The first line of a key file written by [`Keypair::save`].
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

    /// Writes the key file with owner-only permissions (0600 on unix), atomically: the key is
    /// written to a temporary file beside it and renamed into place, so a crash never leaves a
    /// half-written identity.
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let io = |source| KeyFileError::Io { path: path.display().to_string(), source };
        let tmp = path.with_extension("tmp");
        write_owner_only(&tmp, self.to_key_file_text().as_bytes()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Loads a key file, refusing files that other users can read.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| KeyFileError::Io { path: shown.clone(), source })?;
        check_owner_only(path, &shown)?;
        Self::from_key_file_text(&text, &shown)
    }

    /// Loads the key file at `path`, or creates a new identity there when the file does not
    /// exist. Returns the keypair and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyFileError> {
        match std::fs::metadata(path) {
            Ok(_) => Ok((Self::load(path)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate_os();
                key.save(path)?;
                Ok((key, true))
            }
            Err(source) => Err(KeyFileError::Io { path: path.display().to_string(), source }),
        }
    }
}

#[cfg(unix)]
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // The mode above only applies on creation; tighten an existing file too.
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(not(unix))]
fn write_owner_only(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(unix)]
fn check_owner_only(path: &Path, shown: &str) -> Result<(), KeyFileError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|source| KeyFileError::Io { path: shown.to_owned(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::InsecurePermissions { path: shown.to_owned(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_owner_only(_path: &Path, _shown: &str) -> Result<(), KeyFileError> {
    Ok(())
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
    fn key_file_roundtrip_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let (created, fresh) = Keypair::load_or_create(&path).unwrap();
        assert!(fresh);
        let (loaded, fresh) = Keypair::load_or_create(&path).unwrap();
        assert!(!fresh);
        assert_eq!(created.public(), loaded.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = Keypair::load(&path).unwrap_err();
            assert!(matches!(err, KeyFileError::InsecurePermissions { mode: 0o644, .. }));
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
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
