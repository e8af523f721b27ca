//! Memoised decoding of offer envelopes, for a driver that runs many receivers in one thread.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use super::Offer;
use crate::codec::{self, DecodeError};
use crate::envelope::{Domain, Envelope, MemoKey};
use crate::thread_memo::{Installed, SlotCell};

/// One offer envelope, decoded once for every receiver of its bytes.
pub(super) struct SharedOffer {
    /// The exact bytes it was decoded from.
    bytes: Box<[u8]>,
    /// The decoded envelope.
    pub(super) envelope: Envelope,
    /// Its key in an installed signature memo, once computed.
    pub(super) memo_key: MemoKey,
    /// The decoded payload, or why it did not decode.
    pub(super) offer: Result<Arc<Offer>, DecodeError>,
}

/// What a lookup found for some bytes.
pub(super) enum Lookup {
    /// No memo is installed on this thread.
    Off,
    /// The bytes are an offer envelope, decoded now or before.
    Shared(Rc<SharedOffer>),
    /// The bytes were decoded here (to an envelope that is not an offer, or to an error) and
    /// not kept.
    Decoded(Result<Envelope, DecodeError>),
}

/// Where to look bytes up: their length and both ends (an envelope ends with its signature).
/// Different bytes may share a probe; an entry is used only when its bytes are the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Probe {
    len: usize,
    head: [u8; 32],
    tail: [u8; 64],
}

impl Probe {
    fn of(bytes: &[u8]) -> Self {
        let mut head = [0u8; 32];
        let mut tail = [0u8; 64];
        let h = bytes.len().min(head.len());
        head[..h].copy_from_slice(&bytes[..h]);
        let t = bytes.len().min(tail.len());
        tail[..t].copy_from_slice(&bytes[bytes.len() - t..]);
        Self { len: bytes.len(), head, tail }
    }
}

thread_local! {
    static MEMO: SlotCell<Probe, Rc<SharedOffer>> = const { RefCell::new(None) };
}

/// Counters of an installed offer memo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OfferMemoStats {
    /// Offers handed out decoded before.
    pub hits: u64,
    /// Offer envelopes decoded.
    pub misses: u64,
}

/// Memoises decoded offer envelopes on the current thread while it is alive.
///
/// Decoding is a pure function of the bytes, so a process that hands the same offer bytes to
/// many receivers (the simulator delivers one offer to thousands of simulated nodes) need
/// decode each distinct offer once, and its receivers can share the decoded offer (its job spec
/// included) instead of each holding a copy. Only decoding is memoised: every receiving
/// [`NodeCore`](crate::node::NodeCore) still verifies the envelope with its own verifier (size,
/// domain, lifetime, clock, signature, replay) and judges the offer itself. An entry is used
/// only for bytes equal to the ones it was decoded from.
///
/// Nothing installs a memo but a driver that asks for one: the node binary never does, and
/// decodes every offer it receives. Dropping the memo uninstalls it (and restores one
/// installed before, if any).
#[must_use = "the memo is uninstalled when dropped"]
pub struct OfferMemo {
    installed: Installed<Probe, Rc<SharedOffer>>,
}

impl OfferMemo {
    /// Installs a memo of at most `capacity` offers (at least 2) on this thread.
    pub fn install(capacity: usize) -> Self {
        Self { installed: Installed::install(&MEMO, capacity) }
    }

    /// Hits and misses so far.
    pub fn stats(&self) -> OfferMemoStats {
        let (hits, misses) = self.installed.counts();
        OfferMemoStats { hits, misses }
    }
}

/// Looks `bytes` up in the installed memo, decoding and keeping them when they are an offer
/// envelope not seen before.
pub(super) fn lookup(bytes: &[u8]) -> Lookup {
    MEMO.with(|m| {
        let mut guard = m.borrow_mut();
        let Some(state) = guard.as_mut() else { return Lookup::Off };
        let probe = Probe::of(bytes);
        let mut replaceable = true;
        if let Some(shared) = state.get(&probe) {
            if *shared.bytes == *bytes {
                let shared = shared.clone();
                state.hits += 1;
                return Lookup::Shared(shared);
            }
            // Other bytes with the same probe (an altered copy of an offer): the first one
            // decoded keeps the place.
            replaceable = false;
        }
        let envelope = match codec::decode::<Envelope>(bytes) {
            Ok(e) if e.domain == Domain::Offer && replaceable => e,
            other => return Lookup::Decoded(other),
        };
        // What `Message::decode_payload` does for an offer.
        let offer = codec::decode::<Offer>(&envelope.payload).map(Arc::new);
        let shared = Rc::new(SharedOffer {
            bytes: bytes.into(),
            envelope,
            memo_key: MemoKey::default(),
            offer,
        });
        state.insert(probe, shared.clone());
        Lookup::Shared(shared)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::messages::{seal, JobId, Message};
    use crate::node::{NodeConfig, NodeCore};
    use crate::testkit;

    const NOW: u64 = 1_700_000_000_000;

    fn node(n: u64, relay: &crate::identity::Keypair) -> NodeCore {
        let cfg = NodeConfig { trusted_relays: vec![relay.public()], ..NodeConfig::default() };
        NodeCore::new(testkit::keypair(n), cfg, testkit::profile(), n)
    }

    /// A genuine offer's bytes, and a forgery: another offer under the genuine signature.
    fn offer_and_forgery(relay: &crate::identity::Keypair) -> (Vec<u8>, Vec<u8>) {
        let offer = |slots| {
            Message::Offer(Offer {
                job_id: JobId([1; 16]),
                spec: testkit::batch_spec(5),
                deadline_ms: NOW + 60_000,
                open_slots: slots,
                preferred: Vec::new(),
            })
        };
        let genuine = seal(relay, &offer(1), 1, NOW, 60_000).expect("seal");
        let mut envelope: Envelope = codec::decode(&genuine).expect("decode");
        envelope.payload = offer(2).encode_payload().expect("encode");
        (genuine, codec::encode(&envelope).expect("encode"))
    }

    fn held(core: &NodeCore) -> Arc<Offer> {
        core.offers().next().expect("an offer is held").offer.clone()
    }

    #[test]
    fn receivers_share_one_decoded_offer_and_still_check_it_themselves() {
        let relay = testkit::keypair(50);
        let (genuine, forged) = offer_and_forgery(&relay);
        let memo = OfferMemo::install(8);
        let (mut a, mut b, mut c) = (node(1, &relay), node(2, &relay), node(3, &relay));
        a.handle_message(NOW, None, &genuine);
        b.handle_message(NOW, None, &genuine);
        assert!(Arc::ptr_eq(&held(&a), &held(&b)), "one decoded offer for both");
        assert_eq!(memo.stats(), OfferMemoStats { hits: 1, misses: 1 });
        // Each receiver keeps its own replay cache.
        a.handle_message(NOW + 1, None, &genuine);
        assert_eq!(a.reject_counts().get("duplicate"), Some(&1));
        assert_eq!(b.reject_counts().get("duplicate"), None);
        assert_eq!(memo.stats(), OfferMemoStats { hits: 2, misses: 1 });
        // A forgery under the genuine signature (same length and ends, so the same probe) is
        // neither served from the genuine entry nor accepted; the genuine offer still is.
        assert_eq!(Probe::of(&forged), Probe::of(&genuine));
        c.handle_message(NOW, None, &forged);
        assert_eq!(c.reject_counts().get("bad_signature"), Some(&1));
        assert_eq!(c.offers().count(), 0);
        c.handle_message(NOW, None, &genuine);
        assert!(Arc::ptr_eq(&held(&a), &held(&c)));
        assert_eq!(memo.stats(), OfferMemoStats { hits: 3, misses: 1 });
    }

    #[test]
    fn only_offers_are_kept_and_the_memo_forgets_past_its_capacity() {
        let relay = testkit::keypair(50);
        let memo = OfferMemo::install(2);
        let claim = Message::Claim(crate::messages::Claim { job_id: JobId([1; 16]) });
        let bytes = seal(&relay, &claim, 1, NOW, 60_000).expect("seal");
        for _ in 0..2 {
            assert!(matches!(lookup(&bytes), Lookup::Decoded(Ok(_))));
        }
        assert!(matches!(lookup(b"garbage"), Lookup::Decoded(Err(_))));
        let offers: Vec<Vec<u8>> = (0..3u8)
            .map(|n| {
                let offer = Message::Offer(Offer {
                    job_id: JobId([n; 16]),
                    spec: testkit::batch_spec(5),
                    deadline_ms: NOW + 60_000,
                    open_slots: 1,
                    preferred: Vec::new(),
                });
                seal(&relay, &offer, u64::from(n), NOW, 60_000).expect("seal")
            })
            .collect();
        for bytes in &offers {
            assert!(matches!(lookup(bytes), Lookup::Shared(_)));
        }
        assert_eq!(memo.stats(), OfferMemoStats { hits: 0, misses: 3 });
        // Capacity 2: one per generation, so the first offer was dropped and is decoded again.
        assert!(matches!(lookup(&offers[2]), Lookup::Shared(_)));
        assert!(matches!(lookup(&offers[0]), Lookup::Shared(_)));
        assert_eq!(memo.stats(), OfferMemoStats { hits: 1, misses: 4 });
        drop(memo);
        assert!(matches!(lookup(&offers[0]), Lookup::Off));
    }

    #[test]
    fn without_a_memo_each_receiver_decodes_its_own_offer() {
        let relay = testkit::keypair(50);
        let (genuine, _) = offer_and_forgery(&relay);
        let (mut a, mut b) = (node(1, &relay), node(2, &relay));
        a.handle_message(NOW, None, &genuine);
        b.handle_message(NOW, None, &genuine);
        assert!(!Arc::ptr_eq(&held(&a), &held(&b)));
        assert_eq!(held(&a), held(&b));
    }
}
