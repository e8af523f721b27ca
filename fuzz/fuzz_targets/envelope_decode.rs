//! Arbitrary bytes as a received envelope: decoding, verifying and opening must never panic,
//! and whatever decodes must re-encode to bytes that decode to the same value.
#![no_main]

use aimatrix_protocol::codec;
use aimatrix_protocol::envelope::{Domain, Envelope, Verifier, VerifyConfig};
use aimatrix_protocol::messages::{self, Message};
use aimatrix_protocol::time::Millis;
use libfuzzer_sys::fuzz_target;

/// A fixed receiver clock; any envelope also gets a second try at its own issue time below.
const NOW_MS: Millis = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    // The whole receive path, as a node or relay runs it.
    let mut verifier = Verifier::new(VerifyConfig::default());
    let _ = messages::open(&mut verifier, NOW_MS, data, &Domain::ALL);

    // The envelope decoder alone, then every later check on whatever it produced.
    if let Ok(envelope) = codec::decode::<Envelope>(data) {
        let bytes = codec::encode(&envelope).expect("a decoded envelope re-encodes");
        let again: Envelope = codec::decode(&bytes).expect("a re-encoded envelope decodes");
        assert_eq!(again, envelope, "envelope codec roundtrip");

        // At its own issue time the clock checks pass, so the signer and signature checks run
        // on attacker-chosen key bytes.
        let mut verifier = Verifier::new(VerifyConfig::default());
        let _ = verifier.verify(envelope.issued_at_ms, &envelope, &Domain::ALL);
        let _ = envelope.verify_signature();
        let _ = envelope.signer.to_peer_id();
        for domain in Domain::ALL {
            decode_payload_roundtrip(domain, &envelope.payload);
        }
    }

    // Every message decoder on the raw bytes too.
    for domain in Domain::ALL {
        decode_payload_roundtrip(domain, data);
    }
});

/// Decodes `payload` as `domain`'s message; when it decodes, checks that encoding is stable.
/// Compared as bytes, not values: a job spec holds `f64`s, and NaN is not equal to itself.
fn decode_payload_roundtrip(domain: Domain, payload: &[u8]) {
    let Ok(message) = Message::decode_payload(domain, payload) else {
        return;
    };
    assert_eq!(message.domain(), domain);
    let _ = message_text(&message);
    let bytes = message.encode_payload().expect("a decoded message re-encodes");
    let again = Message::decode_payload(domain, &bytes).expect("a re-encoded message decodes");
    let bytes_again = again.encode_payload().expect("a re-decoded message re-encodes");
    assert_eq!(bytes, bytes_again, "{domain} payload encoding is not stable");
}

/// Renders what a receiver would log about a message (Display impls must not panic either).
fn message_text(message: &Message) -> String {
    match message {
        Message::LeaseDenied(denied) => denied.reason.to_string(),
        Message::Offer(offer) => format!("{} {}", offer.job_id, offer.spec.to_toml()),
        Message::Lease(lease) => format!("{} {}", lease.node, lease.spec.to_toml()),
        other => format!("{other:?}"),
    }
}
