//! Tests of the envelope: signing layout, verification, the replay cache and the memo.

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
        Err(VerifyError::Duplicate { signer: key(1).public(), nonce: 5 })
    );
    // Another message under the same signer and nonce is not a copy: the signer reused it.
    assert_eq!(
        v.verify(10_001, &env(&key(1), 5, 10_000, 20_001), &[Domain::Offer]),
        Err(VerifyError::NonceReused { signer: key(1).public(), nonce: 5 })
    );
    // Same nonce from another signer is fine.
    v.verify(10_001, &env(&key(2), 5, 10_000, 20_000), &[Domain::Offer]).unwrap();
}

#[test]
fn each_rejection_has_its_own_error() {
    let mut v = verifier();
    let e = env(&key(1), 1, 10_000, 20_000);
    assert!(matches!(v.verify(10_000, &e, &[Domain::Claim]), Err(VerifyError::WrongDomain { .. })));
    assert!(matches!(v.verify(21_001, &e, &[Domain::Offer]), Err(VerifyError::Expired { .. })));
    assert!(v.verify(21_000, &env(&key(1), 2, 10_000, 20_000), &[Domain::Offer]).is_ok());
    assert!(matches!(v.verify(8_999, &e, &[Domain::Offer]), Err(VerifyError::NotYetValid { .. })));
    let mut forged = e.clone();
    forged.payload[0] ^= 1;
    assert_eq!(v.verify(10_000, &forged, &[Domain::Offer]), Err(VerifyError::BadSignature));
    let mut relabelled = e.clone();
    relabelled.domain = Domain::Claim;
    assert_eq!(v.verify(10_000, &relabelled, &[Domain::Claim]), Err(VerifyError::BadSignature));
    let mut small = Verifier::new(VerifyConfig { max_payload_bytes: 3, ..VerifyConfig::default() });
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
        Err(VerifyError::Duplicate { .. })
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
    /// Expiry, signer, nonce and fingerprint.
    entries: Vec<(Millis, NodeId, u64, u64)>,
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
        fingerprint: u64,
    ) -> Result<(), VerifyError> {
        if let Some(seen) = self.entries.iter().find(|e| (e.1, e.2) == (signer, nonce)) {
            return Err(if seen.3 == fingerprint {
                VerifyError::Duplicate { signer, nonce }
            } else {
                VerifyError::NonceReused { signer, nonce }
            });
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
        self.entries.push((expires_at_ms, signer, nonce, fingerprint));
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
                let (nonce, expires, fingerprint) = (roll(40), now + roll(60), roll(2));
                assert_eq!(
                    cache.check_and_insert(signer, nonce, expires, fingerprint),
                    model.check_and_insert(signer, nonce, expires, fingerprint),
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
    cache.check_and_insert(a, 1, 100, 0).unwrap();
    cache.check_and_insert(a, 2, 200, 0).unwrap();
    // Evicts nonce 1 (expiry 100); the floor is now 100.
    cache.check_and_insert(a, 3, 300, 0).unwrap();
    assert_eq!(cache.len(), 2);
    assert!(matches!(
        cache.check_and_insert(a, 1, 100, 0),
        Err(VerifyError::ReplayWindowExceeded { .. })
    ));
    assert!(matches!(cache.check_and_insert(a, 2, 200, 0), Err(VerifyError::Duplicate { .. })));
    assert!(matches!(cache.check_and_insert(a, 2, 200, 1), Err(VerifyError::NonceReused { .. })));
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
    let flood: Vec<Envelope> =
        (0..5).map(|n| signed(&key(10 + n), Domain::Advert, 1, 900_000 + u64::from(n))).collect();
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
    // Both caches still refuse copies.
    assert!(matches!(
        apart.verify(now, &claim, &[Domain::Claim]),
        Err(VerifyError::Duplicate { .. })
    ));
    assert!(matches!(
        apart.verify(now, &flood[4], &[Domain::Advert]),
        Err(VerifyError::Duplicate { .. })
    ));
    assert!(matches!(
        apart.verify(now, &flood[0], &[Domain::Advert]),
        Err(VerifyError::ReplayWindowExceeded { .. })
    ));
}
