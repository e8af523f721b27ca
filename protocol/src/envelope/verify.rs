//! Verification: what a receiver checks before it acts on an envelope, and why it refuses one.

use super::{Domain, Envelope, MemoKey, ReplayCache};
use crate::identity::NodeId;
use crate::time::Millis;

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
    /// The same signed message arrived again within its lifetime: an echo (gossip delivers a
    /// message by several paths), a retry, or a copy a third party replays. Harmless: it is
    /// never acted on twice.
    #[error("duplicate of a message already received (signer {signer}, nonce {nonce})")]
    Duplicate {
        /// The signer.
        signer: NodeId,
        /// The nonce.
        nonce: u64,
    },
    /// A different message under a (signer, nonce) pair already used within its lifetime.
    /// Only the signer can make one (the signature covers the nonce): a broken or hostile
    /// signer.
    #[error("nonce reused by its signer for another message (signer {signer}, nonce {nonce})")]
    NonceReused {
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
        replay.check_and_insert(
            envelope.signer,
            envelope.nonce,
            envelope.expires_at_ms,
            envelope.signature.fingerprint(),
        )
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
