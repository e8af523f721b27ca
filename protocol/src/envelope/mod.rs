//! Signed envelopes: every message that carries a promise travels inside one.
//!
//! The signature covers domain-separated bytes ([`Envelope::signing_bytes`]): a fixed prefix,
//! the message kind's domain tag, the signer, a nonce, the issue and expiry times and the
//! payload. [`Verifier::verify`] rejects, each with its own [`VerifyError`]: an oversized
//! payload, a domain the receiver did not expect, a lifetime that is empty or too long, an
//! expired or not-yet-valid message (with a configurable clock-skew tolerance), a bad
//! signature, and a replay (bounded cache keyed by signer and nonce).

use std::cell::Cell;
use std::fmt;

use ed25519_dalek::{Signature as DalekSignature, Verifier as _};
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::{Keypair, NodeId};
use crate::time::Millis;

/// The prefix of every signed byte string; a signature made for aimatrix cannot be replayed
/// into another protocol that signs with the same key, nor across format versions.
const SIGNING_PREFIX: &[u8] = b"aimatrix/envelope/v1\0";

/// The kind of message an envelope carries; part of the signed bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Domain {
    /// A node's capability advert (gossip, Kademlia record).
    Advert,
    /// A relay's job offer (gossip).
    Offer,
    /// A node's claim on an offer.
    Claim,
    /// A relay's lease grant.
    Lease,
    /// A relay's refusal of a claim.
    LeaseDenied,
    /// A node's progress report on a lease.
    Progress,
    /// A node's result for a lease.
    Result,
    /// A relay's receipt for a result: paid or not, and why.
    Receipt,
    /// A relay's cancellation of a lease.
    Cancel,
    /// A relay's roster: the relays it peers with and vouches for (gossip).
    Roster,
}

impl Domain {
    /// All domains, for tests and tables.
    pub const ALL: [Self; 10] = [
        Self::Advert,
        Self::Offer,
        Self::Claim,
        Self::Lease,
        Self::LeaseDenied,
        Self::Progress,
        Self::Result,
        Self::Receipt,
        Self::Cancel,
        Self::Roster,
    ];

    /// The tag mixed into the signed bytes.
    pub const fn tag(self) -> &'static str {
        match self {
            Self::Advert => "advert",
            Self::Offer => "offer",
            Self::Claim => "claim",
            Self::Lease => "lease",
            Self::LeaseDenied => "lease-denied",
            Self::Progress => "progress",
            Self::Result => "result",
            Self::Receipt => "receipt",
            Self::Cancel => "cancel",
            Self::Roster => "roster",
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tag())
    }
}

/// A 64-byte ed25519 signature (serialized as a fixed 64-byte tuple, no length prefix).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature(pub [u8; 64]);

impl Signature {
    /// The signature's first eight bytes: a fingerprint of the signed message that tells two
    /// messages under the same signer and nonce apart (ed25519 signatures are deterministic,
    /// so the same message always has the same one).
    pub fn fingerprint(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(64)?;
        for byte in &self.0 {
            tuple.serialize_element(byte)?;
        }
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SigVisitor;
        impl<'de> Visitor<'de> for SigVisitor {
            type Value = Signature;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Signature, A::Error> {
                let mut out = [0u8; 64];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot =
                        seq.next_element()?.ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                Ok(Signature(out))
            }
        }
        deserializer.deserialize_tuple(64, SigVisitor)
    }
}

/// A signed message. The payload is the codec encoding of the message type its domain names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// What kind of message the payload is.
    pub domain: Domain,
    /// Who signed it.
    pub signer: NodeId,
    /// Unique per signer within the message's lifetime; the replay cache key.
    pub nonce: u64,
    /// When the signer issued it (ms since the Unix epoch).
    pub issued_at_ms: Millis,
    /// After this instant the message is void (ms since the Unix epoch).
    pub expires_at_ms: Millis,
    /// The encoded message.
    #[serde(deserialize_with = "payload_bytes")]
    pub payload: Vec<u8>,
    /// ed25519 signature over [`Envelope::signing_bytes`].
    pub signature: Signature,
}

/// Reads a byte vector in one piece where the format allows, instead of one element at a
/// time: bincode lays a `Vec<u8>` out as its length and the raw bytes, exactly what
/// `deserialize_bytes` reads, so the wire format is the same either way. Formats that write
/// byte vectors as sequences are read element by element, as before.
fn payload_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    struct BytesVisitor;
    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("payload bytes")
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The hint comes from the peer: bound what it may make us reserve.
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_bytes(BytesVisitor)
}

/// What a signer fills in; [`Envelope::sign`] adds the signature.
#[derive(Clone, Copy, Debug)]
pub struct EnvelopeHeader {
    /// The message kind.
    pub domain: Domain,
    /// Nonce, unique per signer.
    pub nonce: u64,
    /// Issue time.
    pub issued_at_ms: Millis,
    /// Expiry time.
    pub expires_at_ms: Millis,
}

impl Envelope {
    /// Signs `payload` under `header` with `key`.
    pub fn sign(key: &Keypair, header: EnvelopeHeader, payload: Vec<u8>) -> Self {
        let signer = key.public();
        let bytes = signing_bytes(
            header.domain,
            &signer,
            header.nonce,
            header.issued_at_ms,
            header.expires_at_ms,
            &payload,
        );
        Self {
            domain: header.domain,
            signer,
            nonce: header.nonce,
            issued_at_ms: header.issued_at_ms,
            expires_at_ms: header.expires_at_ms,
            payload,
            signature: Signature(key.sign(&bytes)),
        }
    }

    /// The exact bytes the signature covers.
    pub fn signing_bytes(&self) -> Vec<u8> {
        self.signing_parts().concat()
    }

    fn signing_parts(&self) -> SigningParts<'_> {
        SigningParts::new(
            self.domain,
            &self.signer,
            self.nonce,
            self.issued_at_ms,
            self.expires_at_ms,
            &self.payload,
        )
    }

    /// Checks only the signature (no time, domain or replay checks).
    ///
    /// When a [`SignatureMemo`] is installed on this thread, a verdict already reached for the
    /// same signed bytes and signature is reused instead of checked again.
    pub fn verify_signature(&self) -> Result<(), VerifyError> {
        self.verify_signature_keyed(&MemoKey::default())
    }

    /// [`Envelope::verify_signature`], keeping this envelope's key in an installed
    /// [`SignatureMemo`] in `memo_key` once it is computed, so that a caller that holds one
    /// decoded envelope for many receivers hashes its signed bytes once.
    pub(crate) fn verify_signature_keyed(&self, memo_key: &MemoKey) -> Result<(), VerifyError> {
        let parts = self.signing_parts();
        // The signed bytes are put together only when the signature is actually checked.
        let check = || {
            let key = self.signer.verifying_key().map_err(|_| VerifyError::InvalidSigner)?;
            let sig = DalekSignature::from_bytes(&self.signature.0);
            key.verify(&parts.concat(), &sig).map_err(|_| VerifyError::BadSignature)
        };
        memo::verdict(&self.signature, &parts.slices(), memo_key, check)
    }
}

/// An envelope's key in a [`SignatureMemo`], once computed (it depends only on the envelope).
pub(crate) type MemoKey = Cell<Option<[u8; 32]>>;

mod memo;
mod replay;
mod verify;

pub use memo::{SignatureMemo, SignatureMemoStats};
pub use replay::ReplayCache;
pub use verify::{Verifier, VerifyConfig, VerifyError};

fn signing_bytes(
    domain: Domain,
    signer: &NodeId,
    nonce: u64,
    issued_at_ms: Millis,
    expires_at_ms: Millis,
    payload: &[u8],
) -> Vec<u8> {
    SigningParts::new(domain, signer, nonce, issued_at_ms, expires_at_ms, payload).concat()
}

/// The signed bytes in their parts, in order: the prefix, the domain tag and a zero byte,
/// the signer, the nonce, issue and expiry times and the payload length (little-endian), and
/// the payload.
struct SigningParts<'a> {
    tag: &'a [u8],
    signer: &'a [u8],
    /// Nonce, issue time, expiry time, payload length.
    numbers: [u8; 32],
    payload: &'a [u8],
}

impl<'a> SigningParts<'a> {
    fn new(
        domain: Domain,
        signer: &'a NodeId,
        nonce: u64,
        issued_at_ms: Millis,
        expires_at_ms: Millis,
        payload: &'a [u8],
    ) -> Self {
        let mut numbers = [0u8; 32];
        let fields = [nonce, issued_at_ms, expires_at_ms, payload.len() as u64];
        for (chunk, n) in numbers.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&n.to_le_bytes());
        }
        Self { tag: domain.tag().as_bytes(), signer: signer.as_bytes(), numbers, payload }
    }

    fn slices(&self) -> [&[u8]; 6] {
        [SIGNING_PREFIX, self.tag, &[0], self.signer, &self.numbers, self.payload]
    }

    fn concat(&self) -> Vec<u8> {
        self.slices().concat()
    }
}

#[cfg(test)]
mod tests;
