//! Signed envelopes: every message that carries a promise travels inside one.
//!
//! The signature covers domain-separated bytes ([`Envelope::signing_bytes`]): a fixed prefix,
//! the message kind's domain tag, the signer, a nonce, the issue and expiry times and the
//! payload. [`Verifier::verify`] rejects, each with its own [`VerifyError`]: an oversized
//! payload, a domain the receiver did not expect, a lifetime that is empty or too long, an
//! expired or not-yet-valid message (with a configurable clock-skew tolerance), a bad
//! signature, and a replay (bounded cache keyed by signer and nonce).

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
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
}

impl Domain {
    /// All domains, for tests and tables.
    pub const ALL: [Self; 9] = [
        Self::Advert,
        Self::Offer,
        Self::Claim,
        Self::Lease,
        Self::LeaseDenied,
        Self::Progress,
        Self::Result,
        Self::Receipt,
        Self::Cancel,
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
        signing_bytes(
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
        let parts = SigningParts::new(
            self.domain,
            &self.signer,
            self.nonce,
            self.issued_at_ms,
            self.expires_at_ms,
            &self.payload,
        );
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

pub use memo::{SignatureMemo, SignatureMemoStats};

/// Memoised signature verdicts for a driver that runs many receivers in one thread.
mod memo {
    use std::cell::RefCell;

    use sha2::{Digest as _, Sha256};

    use super::{MemoKey, Signature, VerifyError};
    use crate::thread_memo::{Installed, SlotCell};

    thread_local! {
        static MEMO: SlotCell<[u8; 32], Result<(), VerifyError>> = const { RefCell::new(None) };
    }

    /// Counters of an installed memo.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct SignatureMemoStats {
        /// Verdicts reused.
        pub hits: u64,
        /// Signatures actually checked.
        pub misses: u64,
    }

    /// Memoises signature verdicts on the current thread while it is alive.
    ///
    /// A signature verdict is a pure function of the signed bytes and the signature, so a
    /// process that hands the same envelope to many receivers (the simulator delivers one
    /// offer to thousands of simulated nodes, each with its own `Verifier`) need check each
    /// distinct envelope once. Only the ed25519 check is memoised: every receiver still
    /// decodes the envelope and applies its own size, domain, lifetime, clock and replay
    /// checks. The key is the SHA-256 of the signature and the signed bytes, so a forged or
    /// altered envelope never meets the verdict of the genuine one.
    ///
    /// Nothing installs a memo but a driver that asks for one: the node and the relay binaries
    /// never do, so they check every signature they receive. Dropping the memo uninstalls it
    /// (and restores one installed before, if any).
    #[must_use = "the memo is uninstalled when dropped"]
    pub struct SignatureMemo {
        installed: Installed<[u8; 32], Result<(), VerifyError>>,
    }

    impl SignatureMemo {
        /// Installs a memo of at most `capacity` verdicts (at least 2) on this thread.
        pub fn install(capacity: usize) -> Self {
            Self { installed: Installed::install(&MEMO, capacity) }
        }

        /// Hits and misses so far.
        pub fn stats(&self) -> SignatureMemoStats {
            let (hits, misses) = self.installed.counts();
            SignatureMemoStats { hits, misses }
        }
    }

    /// `check()`'s verdict on `signature` over the signed bytes (`signed`, concatenated), from
    /// the memo when one is installed. The memo key is taken from `memo_key` when it holds
    /// one (it must then be the key of these bytes), and left there when computed.
    pub(super) fn verdict(
        signature: &Signature,
        signed: &[&[u8]],
        memo_key: &MemoKey,
        check: impl FnOnce() -> Result<(), VerifyError>,
    ) -> Result<(), VerifyError> {
        MEMO.with(|m| {
            let mut guard = m.borrow_mut();
            let Some(state) = guard.as_mut() else { return check() };
            let key = memo_key.get().unwrap_or_else(|| {
                let mut hasher = Sha256::new();
                hasher.update(signature.0);
                for part in signed {
                    hasher.update(part);
                }
                hasher.finalize().into()
            });
            memo_key.set(Some(key));
            if let Some(v) = state.get(&key) {
                let v = v.clone();
                state.hits += 1;
                return v;
            }
            let v = check();
            state.insert(key, v.clone());
            v
        })
    }
}

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

/// Why an envelope was rejected. Each is counted by the receiver, never acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The payload is larger than the receiver accepts.
    #[error("payload of {len} bytes exceeds the {max} byte limit")]
    Oversized {
        /// Payload length.
        len: usize,
        /// The receiver's limit.
        max: usize,
    },
    /// The envelope is of a kind the receiver does not accept here.
    #[error("unexpected message kind {got} here (expected {expected})")]
    WrongDomain {
        /// What the receiver accepts, as text.
        expected: String,
        /// What arrived.
        got: Domain,
    },
    /// The lifetime is empty or longer than the receiver allows.
    #[error("message lifetime of {lifetime_ms} ms is outside 1..={max_ms} ms")]
    BadLifetime {
        /// `expires_at - issued_at`.
        lifetime_ms: i128,
        /// The receiver's maximum.
        max_ms: u64,
    },
    /// The message expired (beyond the skew tolerance).
    #[error("message expired at {expires_at_ms} (now {now_ms}, skew tolerance {skew_ms} ms)")]
    Expired {
        /// Expiry.
        expires_at_ms: Millis,
        /// The receiver's clock.
        now_ms: Millis,
        /// Tolerance applied.
        skew_ms: u64,
    },
    /// The message was issued in the future (beyond the skew tolerance).
    #[error("message not valid until {issued_at_ms} (now {now_ms}, skew tolerance {skew_ms} ms)")]
    NotYetValid {
        /// Issue time.
        issued_at_ms: Millis,
        /// The receiver's clock.
        now_ms: Millis,
        /// Tolerance applied.
        skew_ms: u64,
    },
    /// The signer field is not a valid ed25519 public key.
    #[error("signer is not a valid ed25519 public key")]
    InvalidSigner,
    /// The signature does not match the signed bytes.
    #[error("bad signature")]
    BadSignature,
    /// This signer already used this nonce within the message's lifetime.
    #[error("replayed message (signer {signer}, nonce {nonce})")]
    Replayed {
        /// The signer.
        signer: NodeId,
        /// The repeated nonce.
        nonce: u64,
    },
    /// The replay cache had to forget messages this old, so freshness cannot be proven.
    #[error("message too old to prove it is not a replay (expires {expires_at_ms}, cache floor {floor_ms}); resend a fresh one")]
    ReplayWindowExceeded {
        /// Expiry of the message.
        expires_at_ms: Millis,
        /// Expiry of the newest entry the cache had to evict.
        floor_ms: Millis,
    },
}

/// Limits a receiver applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyConfig {
    /// Largest payload accepted.
    pub max_payload_bytes: usize,
    /// Clock-skew tolerance applied to both ends of the validity window.
    pub skew_tolerance_ms: u64,
    /// Longest lifetime (`expires_at - issued_at`) accepted.
    pub max_lifetime_ms: u64,
    /// Entries each replay cache keeps.
    pub replay_cache_capacity: usize,
    /// Domains whose envelopes go to a replay cache of their own (of the same capacity),
    /// apart from every other domain's. A cache that fills up refuses messages expiring before
    /// the entries it evicted; kept apart, a flood of these (a relay's adverts: two live per
    /// node, from any key that signs one) cannot make the receiver refuse the others (claims
    /// and results, which expire sooner). Empty: one cache for everything.
    pub own_replay_cache: &'static [Domain],
}

impl Default for VerifyConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: crate::codec::MAX_FRAME_BYTES - 512,
            skew_tolerance_ms: 30_000,
            max_lifetime_ms: 24 * 3600 * 1000,
            replay_cache_capacity: 100_000,
            own_replay_cache: &[],
        }
    }
}

/// A bounded set of `(signer, nonce)` pairs seen within their messages' lifetimes.
///
/// Entries are dropped once their message has expired (a replay would then fail the expiry
/// check anyway). When full, the entry expiring soonest is evicted and its expiry becomes a
/// floor: messages expiring at or before the floor are refused, since the cache can no longer
/// tell whether they were seen. The cache never accepts a replay; under flood it refuses old
/// messages instead.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    seen: HashMap<(NodeId, u64), Millis>,
    /// The same entries, the one expiring soonest on top (ties by signer and nonce). Only the
    /// soonest is ever read or removed, so a heap in one vector serves where a tree would
    /// scatter its nodes: a node's cache is touched on every message it receives.
    by_expiry: BinaryHeap<Reverse<(Millis, NodeId, u64)>>,
    /// The first expiry in `by_expiry` (`Millis::MAX` when empty): a purge with nothing to do,
    /// the usual case, reads this instead of the heap.
    earliest_ms: Millis,
    floor_ms: Millis,
}

impl ReplayCache {
    /// A cache holding at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seen: HashMap::new(),
            by_expiry: BinaryHeap::new(),
            earliest_ms: Millis::MAX,
            floor_ms: 0,
        }
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Drops entries whose messages expired before `horizon_ms`.
    pub fn purge_before(&mut self, horizon_ms: Millis) {
        if self.earliest_ms >= horizon_ms {
            return;
        }
        while let Some(&Reverse((expiry, signer, nonce))) = self.by_expiry.peek() {
            if expiry >= horizon_ms {
                break;
            }
            self.by_expiry.pop();
            self.seen.remove(&(signer, nonce));
        }
        self.earliest_ms = self.first_expiry();
    }

    fn first_expiry(&self) -> Millis {
        self.by_expiry.peek().map_or(Millis::MAX, |Reverse(e)| e.0)
    }

    /// Checks `(signer, nonce)` and records it; an error when it was seen or is too old.
    pub fn check_and_insert(
        &mut self,
        signer: NodeId,
        nonce: u64,
        expires_at_ms: Millis,
    ) -> Result<(), VerifyError> {
        let too_old = |floor_ms| VerifyError::ReplayWindowExceeded { expires_at_ms, floor_ms };
        if self.seen.len() < self.capacity {
            // The usual case: the pair is looked up and recorded with one hash.
            let Entry::Vacant(slot) = self.seen.entry((signer, nonce)) else {
                return Err(VerifyError::Replayed { signer, nonce });
            };
            if expires_at_ms <= self.floor_ms {
                return Err(too_old(self.floor_ms));
            }
            slot.insert(expires_at_ms);
        } else {
            if self.seen.contains_key(&(signer, nonce)) {
                return Err(VerifyError::Replayed { signer, nonce });
            }
            if expires_at_ms <= self.floor_ms {
                return Err(too_old(self.floor_ms));
            }
            if let Some(Reverse((expiry, old_signer, old_nonce))) = self.by_expiry.pop() {
                self.seen.remove(&(old_signer, old_nonce));
                self.floor_ms = self.floor_ms.max(expiry);
                self.earliest_ms = self.first_expiry();
            }
            if expires_at_ms <= self.floor_ms {
                return Err(too_old(self.floor_ms));
            }
            self.seen.insert((signer, nonce), expires_at_ms);
        }
        self.by_expiry.push(Reverse((expires_at_ms, signer, nonce)));
        self.earliest_ms = self.earliest_ms.min(expires_at_ms);
        assert_eq!(self.seen.len(), self.by_expiry.len());
        Ok(())
    }
}

/// Verifies envelopes for one receiver: limits, time, signature and replays.
#[derive(Debug)]
pub struct Verifier {
    config: VerifyConfig,
    replay: ReplayCache,
    /// The cache for the domains in `config.own_replay_cache`.
    own_replay: ReplayCache,
}

impl Verifier {
    /// A verifier with `config`.
    pub fn new(config: VerifyConfig) -> Self {
        Self {
            replay: ReplayCache::new(config.replay_cache_capacity),
            own_replay: ReplayCache::new(config.replay_cache_capacity),
            config,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &VerifyConfig {
        &self.config
    }

    /// Verifies `envelope` at time `now_ms`, accepting only the `expected` domains.
    ///
    /// Cheap checks (size, domain, lifetime, clock) run before the signature; the replay cache
    /// only records envelopes whose signature verified, so forgeries cannot poison it.
    pub fn verify(
        &mut self,
        now_ms: Millis,
        envelope: &Envelope,
        expected: &[Domain],
    ) -> Result<(), VerifyError> {
        self.verify_keyed(now_ms, envelope, expected, &MemoKey::default())
    }

    /// [`Verifier::verify`], with the envelope's signature memo key kept in `memo_key` (see
    /// [`Envelope::verify_signature_keyed`]).
    pub(crate) fn verify_keyed(
        &mut self,
        now_ms: Millis,
        envelope: &Envelope,
        expected: &[Domain],
        memo_key: &MemoKey,
    ) -> Result<(), VerifyError> {
        self.check_unsigned_fields(now_ms, envelope, expected)?;
        envelope.verify_signature_keyed(memo_key)?;
        let replay = if self.config.own_replay_cache.contains(&envelope.domain) {
            &mut self.own_replay
        } else {
            &mut self.replay
        };
        replay.purge_before(now_ms.saturating_sub(self.config.skew_tolerance_ms));
        replay.check_and_insert(envelope.signer, envelope.nonce, envelope.expires_at_ms)
    }

    /// Size, domain, lifetime and clock checks, without the signature or the replay cache.
    pub fn check_unsigned_fields(
        &self,
        now_ms: Millis,
        envelope: &Envelope,
        expected: &[Domain],
    ) -> Result<(), VerifyError> {
        let cfg = &self.config;
        if envelope.payload.len() > cfg.max_payload_bytes {
            return Err(VerifyError::Oversized {
                len: envelope.payload.len(),
                max: cfg.max_payload_bytes,
            });
        }
        if !expected.contains(&envelope.domain) {
            let names: Vec<&str> = expected.iter().map(|d| d.tag()).collect();
            return Err(VerifyError::WrongDomain {
                expected: names.join(" or "),
                got: envelope.domain,
            });
        }
        let lifetime = i128::from(envelope.expires_at_ms) - i128::from(envelope.issued_at_ms);
        if lifetime <= 0 || lifetime > i128::from(cfg.max_lifetime_ms) {
            return Err(VerifyError::BadLifetime {
                lifetime_ms: lifetime,
                max_ms: cfg.max_lifetime_ms,
            });
        }
        let skew = cfg.skew_tolerance_ms;
        if now_ms > envelope.expires_at_ms.saturating_add(skew) {
            return Err(VerifyError::Expired {
                expires_at_ms: envelope.expires_at_ms,
                now_ms,
                skew_ms: skew,
            });
        }
        if envelope.issued_at_ms > now_ms.saturating_add(skew) {
            return Err(VerifyError::NotYetValid {
                issued_at_ms: envelope.issued_at_ms,
                now_ms,
                skew_ms: skew,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Keypair {
        Keypair::from_secret_bytes([n; 32])
    }

    fn env(k: &Keypair, nonce: u64, issued: Millis, expires: Millis) -> Envelope {
        let header = EnvelopeHeader {
            domain: Domain::Offer,
            nonce,
            issued_at_ms: issued,
            expires_at_ms: expires,
        };
        Envelope::sign(k, header, b"payload".to_vec())
    }

    fn verifier() -> Verifier {
        Verifier::new(VerifyConfig { skew_tolerance_ms: 1_000, ..VerifyConfig::default() })
    }

    #[test]
    fn accepts_a_fresh_envelope_once() {
        let mut v = verifier();
        let e = env(&key(1), 5, 10_000, 20_000);
        v.verify(10_000, &e, &[Domain::Offer]).unwrap();
        assert_eq!(
            v.verify(10_001, &e, &[Domain::Offer]),
            Err(VerifyError::Replayed { signer: key(1).public(), nonce: 5 })
        );
        // Same nonce from another signer is fine.
        v.verify(10_001, &env(&key(2), 5, 10_000, 20_000), &[Domain::Offer]).unwrap();
    }

    #[test]
    fn each_rejection_has_its_own_error() {
        let mut v = verifier();
        let e = env(&key(1), 1, 10_000, 20_000);
        assert!(matches!(
            v.verify(10_000, &e, &[Domain::Claim]),
            Err(VerifyError::WrongDomain { .. })
        ));
        assert!(matches!(v.verify(21_001, &e, &[Domain::Offer]), Err(VerifyError::Expired { .. })));
        assert!(v.verify(21_000, &env(&key(1), 2, 10_000, 20_000), &[Domain::Offer]).is_ok());
        assert!(matches!(
            v.verify(8_999, &e, &[Domain::Offer]),
            Err(VerifyError::NotYetValid { .. })
        ));
        let mut forged = e.clone();
        forged.payload[0] ^= 1;
        assert_eq!(v.verify(10_000, &forged, &[Domain::Offer]), Err(VerifyError::BadSignature));
        let mut relabelled = e.clone();
        relabelled.domain = Domain::Claim;
        assert_eq!(v.verify(10_000, &relabelled, &[Domain::Claim]), Err(VerifyError::BadSignature));
        let mut small =
            Verifier::new(VerifyConfig { max_payload_bytes: 3, ..VerifyConfig::default() });
        assert!(matches!(
            small.verify(10_000, &e, &[Domain::Offer]),
            Err(VerifyError::Oversized { .. })
        ));
        let backwards = env(&key(1), 3, 20_000, 10_000);
        assert!(matches!(
            v.verify(15_000, &backwards, &[Domain::Offer]),
            Err(VerifyError::BadLifetime { .. })
        ));
    }

    #[test]
    fn a_memo_reuses_verdicts_but_never_for_other_bytes() {
        let k = key(1);
        let good = env(&k, 1, 10_000, 20_000);
        let mut forged = good.clone();
        forged.payload[0] ^= 1;
        let memo = SignatureMemo::install(4);
        for _ in 0..3 {
            assert_eq!(good.verify_signature(), Ok(()));
            assert_eq!(forged.verify_signature(), Err(VerifyError::BadSignature));
        }
        assert_eq!(memo.stats(), SignatureMemoStats { hits: 4, misses: 2 });
        // Each receiver keeps its own replay cache: a memoised signature is still a replay.
        let mut v = verifier();
        v.verify(10_000, &good, &[Domain::Offer]).unwrap();
        assert!(matches!(
            v.verify(10_000, &good, &[Domain::Offer]),
            Err(VerifyError::Replayed { .. })
        ));
        // Past its capacity the memo forgets, and checks again.
        for n in 2..10 {
            env(&k, n, 10_000, 20_000).verify_signature().unwrap();
        }
        assert_eq!(good.verify_signature(), Ok(()));
        assert_eq!(memo.stats().misses, 2 + 8 + 1);
        drop(memo);
        assert_eq!(SignatureMemo::install(4).stats(), SignatureMemoStats::default());
    }

    #[test]
    fn signed_bytes_keep_their_layout() {
        let e = env(&key(1), 5, 10_000, 20_000);
        let mut expected = b"aimatrix/envelope/v1\0offer\0".to_vec();
        expected.extend_from_slice(key(1).public().as_bytes());
        for n in [5u64, 10_000, 20_000, 7] {
            expected.extend_from_slice(&n.to_le_bytes());
        }
        expected.extend_from_slice(b"payload");
        assert_eq!(e.signing_bytes(), expected);
    }

    #[test]
    fn the_payload_keeps_the_layout_of_a_byte_vector() {
        let e = env(&key(1), 5, 10_000, 20_000);
        let frame = crate::codec::encode(&e).unwrap();
        // The payload is the frame's tail but for the signature: length, then raw bytes.
        let tail = crate::codec::encode(&e.payload).unwrap();
        let end = frame.len() - 64;
        assert_eq!(frame[end - (tail.len() - 1)..end], tail[1..]);
        assert_eq!(crate::codec::decode::<Envelope>(&frame).unwrap(), e);
        // A format that writes byte vectors as sequences reads them back the same.
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Envelope>(&json).unwrap(), e);
    }

    /// The cache as its documentation states it, by scanning a list: what `ReplayCache` must
    /// answer through any mix of inserts and purges, full or not.
    struct ScanModel {
        capacity: usize,
        entries: Vec<(Millis, NodeId, u64)>,
        floor_ms: Millis,
    }

    impl ScanModel {
        fn purge_before(&mut self, horizon_ms: Millis) {
            self.entries.retain(|e| e.0 >= horizon_ms);
        }

        fn check_and_insert(
            &mut self,
            signer: NodeId,
            nonce: u64,
            expires_at_ms: Millis,
        ) -> Result<(), VerifyError> {
            if self.entries.iter().any(|e| (e.1, e.2) == (signer, nonce)) {
                return Err(VerifyError::Replayed { signer, nonce });
            }
            let too_old = |floor_ms| VerifyError::ReplayWindowExceeded { expires_at_ms, floor_ms };
            if expires_at_ms <= self.floor_ms {
                return Err(too_old(self.floor_ms));
            }
            if self.entries.len() >= self.capacity {
                let soonest = self.entries.iter().copied().min().expect("full");
                self.entries.retain(|e| *e != soonest);
                self.floor_ms = self.floor_ms.max(soonest.0);
                if expires_at_ms <= self.floor_ms {
                    return Err(too_old(self.floor_ms));
                }
            }
            self.entries.push((expires_at_ms, signer, nonce));
            Ok(())
        }
    }

    #[test]
    fn the_cache_answers_as_a_scan_of_its_entries_would() {
        let signers = [key(1).public(), key(2).public(), key(3).public()];
        for capacity in [1, 3, 8, 1000] {
            let mut cache = ReplayCache::new(capacity);
            let mut model = ScanModel { capacity, entries: Vec::new(), floor_ms: 0 };
            let mut state = u64::try_from(capacity).expect("small");
            let mut roll = |n: u64| {
                state = crate::messages::mix64(state);
                state % n
            };
            let mut now = 1_000;
            for _ in 0..5_000 {
                now += roll(3);
                if roll(4) == 0 {
                    let horizon = now.saturating_sub(roll(50));
                    cache.purge_before(horizon);
                    model.purge_before(horizon);
                } else {
                    let signer = signers[roll(3) as usize];
                    let (nonce, expires) = (roll(40), now + roll(60));
                    assert_eq!(
                        cache.check_and_insert(signer, nonce, expires),
                        model.check_and_insert(signer, nonce, expires),
                        "capacity {capacity}, now {now}"
                    );
                }
                assert_eq!(cache.len(), model.entries.len());
            }
        }
    }

    #[test]
    fn full_cache_refuses_old_messages_instead_of_forgetting_them() {
        let mut cache = ReplayCache::new(2);
        let a = key(1).public();
        cache.check_and_insert(a, 1, 100).unwrap();
        cache.check_and_insert(a, 2, 200).unwrap();
        // Evicts nonce 1 (expiry 100); the floor is now 100.
        cache.check_and_insert(a, 3, 300).unwrap();
        assert_eq!(cache.len(), 2);
        assert!(matches!(
            cache.check_and_insert(a, 1, 100),
            Err(VerifyError::ReplayWindowExceeded { .. })
        ));
        assert!(matches!(cache.check_and_insert(a, 2, 200), Err(VerifyError::Replayed { .. })));
        cache.purge_before(250);
        assert_eq!(cache.len(), 1);
    }

    /// A verifier holding two entries per cache, adverts in a cache of their own or not.
    fn small_verifier(own: &'static [Domain]) -> Verifier {
        Verifier::new(VerifyConfig {
            replay_cache_capacity: 2,
            own_replay_cache: own,
            ..VerifyConfig::default()
        })
    }

    fn signed(k: &Keypair, domain: Domain, nonce: u64, expires: Millis) -> Envelope {
        let header = EnvelopeHeader { domain, nonce, issued_at_ms: 1_000, expires_at_ms: expires };
        Envelope::sign(k, header, b"payload".to_vec())
    }

    #[test]
    fn a_flood_in_a_domain_with_its_own_cache_leaves_the_others_alone() {
        let now = 2_000;
        // Five adverts that live long fill a two-entry cache and raise its floor past the
        // claim's expiry.
        let flood: Vec<Envelope> = (0..5)
            .map(|n| signed(&key(10 + n), Domain::Advert, 1, 900_000 + u64::from(n)))
            .collect();
        let claim = signed(&key(1), Domain::Claim, 7, 60_000);

        let mut shared = small_verifier(&[]);
        for advert in &flood {
            shared.verify(now, advert, &[Domain::Advert]).unwrap();
        }
        assert!(matches!(
            shared.verify(now, &claim, &[Domain::Claim]),
            Err(VerifyError::ReplayWindowExceeded { .. })
        ));

        let mut apart = small_verifier(&[Domain::Advert]);
        for advert in &flood {
            apart.verify(now, advert, &[Domain::Advert]).unwrap();
        }
        apart.verify(now, &claim, &[Domain::Claim]).unwrap();
        // Both caches still refuse replays.
        assert!(matches!(
            apart.verify(now, &claim, &[Domain::Claim]),
            Err(VerifyError::Replayed { .. })
        ));
        assert!(matches!(
            apart.verify(now, &flood[4], &[Domain::Advert]),
            Err(VerifyError::Replayed { .. })
        ));
        assert!(matches!(
            apart.verify(now, &flood[0], &[Domain::Advert]),
            Err(VerifyError::ReplayWindowExceeded { .. })
        ));
    }
}
