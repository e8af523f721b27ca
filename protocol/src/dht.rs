//! What the network's DHT may store (issue 17, docs/mesh.md): the rules every peer applies to
//! a record before it keeps it, decided once here and applied by `aimatrix-net` (Kademlia
//! record filtering) and by the simulator's DHT.
//!
//! Two kinds of entries exist. An **advert record** is stored under
//! [`advert_record_key`]`(node)` and holds the node's latest signed advert envelope: it is kept
//! only if it is an advert, well signed, by the very node its key names, so nobody can publish
//! (or overwrite) another node's profile, and it replaces a stored one only if its advert is
//! not older ([`check_advert_update`]), so an old signed advert cannot be replayed over a newer
//! one. A **provider record** says a peer holds a capability
//! class (under [`class_provider_key`]); its key must be a class key, and Kademlia itself
//! records the sender as the provider.
//!
//! ```
//! use aimatrix_protocol::capability::advert_record_key;
//! use aimatrix_protocol::dht::{check_advert_record, check_advert_update, RecordRefusal};
//! use aimatrix_protocol::messages::{seal, Advert, Message};
//! use aimatrix_protocol::testkit;
//!
//! let key = testkit::keypair(1);
//! let advert = Message::Advert(Advert { seq: 1, profile: testkit::profile() });
//! let value = seal(&key, &advert, 1, 0, 60_000).unwrap();
//! let record_key = advert_record_key(&key.public());
//! assert_eq!(check_advert_record(&record_key, &value).unwrap().owner, key.public());
//! let other = advert_record_key(&testkit::keypair(2).public());
//! assert!(matches!(check_advert_record(&other, &value), Err(RecordRefusal::ForeignKey { .. })));
//!
//! let newer = Message::Advert(Advert { seq: 2, profile: testkit::profile() });
//! let newer = seal(&key, &newer, 2, 0, 60_000).unwrap();
//! assert_eq!(check_advert_update(&record_key, &newer, Some(&value)).unwrap().seq, 2);
//! let replay = check_advert_update(&record_key, &value, Some(&newer)).unwrap_err();
//! assert_eq!(replay.label(), "stale_record");
//! ```

use crate::capability::{advert_record_key, class_provider_key};
use crate::codec;
use crate::envelope::{Domain, Envelope};
use crate::identity::{NodeId, PUBLIC_KEY_LEN};
use crate::messages::Message;

/// The largest advert record value kept, in bytes (an advert envelope is a few KB).
pub const ADVERT_RECORD_BYTES_MAX: usize = 64 * 1024;
/// The longest capability class name in a provider key, in bytes.
pub const CLASS_NAME_BYTES_MAX: usize = 64;

/// What an advert record that passed the checks says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckedAdvert {
    /// The node the record is for (its key names it, and it signed the advert).
    pub owner: NodeId,
    /// The advert's sequence number.
    pub seq: u64,
}

/// Why a DHT record was not stored. [`RecordRefusal::label`] is the stable name it is counted
/// under.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordRefusal {
    /// The key is not `aimatrix/advert/<32-byte node key>`.
    #[error("the key is not an aimatrix advert key")]
    NotAdvertKey,
    /// The value is larger than an advert record may be.
    #[error("the value is {len} bytes; an advert record holds at most {max}")]
    Oversized {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value is not an envelope.
    #[error("the value is not a signed envelope: {0}")]
    Undecodable(String),
    /// The envelope is another kind of message.
    #[error("the value is a {0} envelope, not an advert")]
    WrongDomain(Domain),
    /// The advert is signed by another node than the one the key names.
    #[error("the advert is signed by {signer}, not by {owner}, whose record key it is under")]
    ForeignKey {
        /// The node the key names.
        owner: NodeId,
        /// The envelope's signer.
        signer: NodeId,
    },
    /// The signature does not verify.
    #[error("the advert's signature does not verify")]
    BadSignature,
    /// The payload is not an advert.
    #[error("the advert does not decode: {0}")]
    BadAdvert(String),
    /// The advert is older than the one stored under its key.
    #[error("the advert is number {seq}; the one stored is number {stored}, newer")]
    Stale {
        /// The incoming advert's sequence number.
        seq: u64,
        /// The stored advert's sequence number.
        stored: u64,
    },
    /// A provider record's key is not a capability class key.
    #[error("the key is not a capability class key (aimatrix/class/<name>)")]
    NotClassKey,
}

impl RecordRefusal {
    /// A short, stable label for counters.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NotAdvertKey => "not_advert_key",
            Self::Oversized { .. } => "oversized_record",
            Self::Undecodable(_) => "undecodable_record",
            Self::WrongDomain(_) => "wrong_domain_record",
            Self::ForeignKey { .. } => "foreign_key_record",
            Self::BadSignature => "bad_signature_record",
            Self::BadAdvert(_) => "bad_advert_record",
            Self::Stale { .. } => "stale_record",
            Self::NotClassKey => "not_class_key",
        }
    }
}

/// Whether `value` may be stored under `key` as an advert record; the node it belongs to if
/// so. Time is not checked: a reader checks an advert's lifetime when it uses it, and the
/// DHT's own expiry drops records nobody republishes.
pub fn check_advert_record(key: &[u8], value: &[u8]) -> Result<CheckedAdvert, RecordRefusal> {
    let prefix = advert_record_key(&NodeId::from_bytes([0; PUBLIC_KEY_LEN]));
    let prefix = &prefix[..prefix.len() - PUBLIC_KEY_LEN];
    let owner = key
        .strip_prefix(prefix)
        .and_then(|rest| <[u8; PUBLIC_KEY_LEN]>::try_from(rest).ok())
        .map(NodeId::from_bytes)
        .ok_or(RecordRefusal::NotAdvertKey)?;
    if value.len() > ADVERT_RECORD_BYTES_MAX {
        return Err(RecordRefusal::Oversized { len: value.len(), max: ADVERT_RECORD_BYTES_MAX });
    }
    let envelope: Envelope =
        codec::decode(value).map_err(|e| RecordRefusal::Undecodable(e.to_string()))?;
    if envelope.domain != Domain::Advert {
        return Err(RecordRefusal::WrongDomain(envelope.domain));
    }
    if envelope.signer != owner {
        return Err(RecordRefusal::ForeignKey { owner, signer: envelope.signer });
    }
    envelope.verify_signature().map_err(|_| RecordRefusal::BadSignature)?;
    match Message::decode_payload(Domain::Advert, &envelope.payload) {
        Ok(Message::Advert(advert)) => Ok(CheckedAdvert { owner, seq: advert.seq }),
        Ok(_) => Err(RecordRefusal::BadAdvert("not an advert".into())),
        Err(e) => Err(RecordRefusal::BadAdvert(e.to_string())),
    }
}

/// Whether `value` may replace `stored` under `key`: it passes [`check_advert_record`] and its
/// advert is not older than the stored one (the same advert again is accepted: Kademlia
/// replicates records). A stored value that no longer passes the checks does not protect its
/// key.
pub fn check_advert_update(
    key: &[u8],
    value: &[u8],
    stored: Option<&[u8]>,
) -> Result<CheckedAdvert, RecordRefusal> {
    let incoming = check_advert_record(key, value)?;
    if let Some(Ok(stored)) = stored.map(|stored| check_advert_record(key, stored)) {
        if incoming.seq < stored.seq {
            return Err(RecordRefusal::Stale { seq: incoming.seq, stored: stored.seq });
        }
    }
    Ok(incoming)
}

/// Whether `key` may be provided: a capability class key whose class name is 1 to
/// [`CLASS_NAME_BYTES_MAX`] bytes of printable ASCII.
pub fn check_provider_key(key: &[u8]) -> Result<(), RecordRefusal> {
    let prefix = class_provider_key("");
    let class = key.strip_prefix(prefix.as_slice()).ok_or(RecordRefusal::NotClassKey)?;
    let printable = class.iter().all(|b| b.is_ascii_graphic());
    if class.is_empty() || class.len() > CLASS_NAME_BYTES_MAX || !printable {
        return Err(RecordRefusal::NotClassKey);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::capability::capability_classes;
    use crate::messages::{seal, Advert, Claim, JobId};
    use crate::testkit;

    fn advert_value(n: u64) -> Vec<u8> {
        advert_value_seq(n, 1)
    }

    fn advert_value_seq(n: u64, seq: u64) -> Vec<u8> {
        let advert = Message::Advert(Advert { seq, profile: testkit::profile() });
        seal(&testkit::keypair(n), &advert, seq, 0, 60_000).unwrap()
    }

    #[test]
    fn an_advert_record_is_kept_only_under_its_signers_key() {
        let owner = testkit::keypair(1).public();
        let key = advert_record_key(&owner);
        assert_eq!(
            check_advert_record(&key, &advert_value(1)),
            Ok(CheckedAdvert { owner, seq: 1 })
        );

        let foreign = check_advert_record(&key, &advert_value(2)).unwrap_err();
        assert_eq!(foreign.label(), "foreign_key_record");
        assert!(foreign.to_string().contains(&owner.to_peer_id()), "{foreign}");

        let claim = Message::Claim(Claim { job_id: JobId([1; 16]) });
        let claim = seal(&testkit::keypair(1), &claim, 2, 0, 60_000).unwrap();
        let wrong = check_advert_record(&key, &claim).unwrap_err();
        assert_eq!(
            (wrong.label(), wrong.to_string().as_str()),
            ("wrong_domain_record", "the value is a claim envelope, not an advert")
        );

        let mut forged = advert_value(1);
        let last = forged.len() - 1;
        forged[last] ^= 1; // the last byte is the signature's
        assert_eq!(check_advert_record(&key, &forged), Err(RecordRefusal::BadSignature));

        let garbage = check_advert_record(&key, b"not an envelope").unwrap_err();
        assert_eq!(garbage.label(), "undecodable_record");
        let huge = vec![0u8; ADVERT_RECORD_BYTES_MAX + 1];
        assert_eq!(check_advert_record(&key, &huge).unwrap_err().label(), "oversized_record");
    }

    #[test]
    fn an_advert_record_is_replaced_only_by_a_newer_or_equal_advert() {
        let key = advert_record_key(&testkit::keypair(1).public());
        let (old, new) = (advert_value_seq(1, 3), advert_value_seq(1, 7));
        assert_eq!(check_advert_update(&key, &new, None).unwrap().seq, 7);
        assert_eq!(check_advert_update(&key, &new, Some(&old)).unwrap().seq, 7);
        assert_eq!(check_advert_update(&key, &new, Some(&new)).unwrap().seq, 7);
        assert_eq!(
            check_advert_update(&key, &old, Some(&new)),
            Err(RecordRefusal::Stale { seq: 3, stored: 7 })
        );
        // A stored value that does not pass protects nothing; a bad incoming one is refused.
        assert_eq!(check_advert_update(&key, &old, Some(b"junk")).unwrap().seq, 3);
        let foreign = advert_value_seq(2, 9);
        assert_eq!(
            check_advert_update(&key, &foreign, Some(&old)).unwrap_err().label(),
            "foreign_key_record"
        );
    }

    #[test]
    fn only_advert_keys_hold_advert_records() {
        let value = advert_value(1);
        let owner = testkit::keypair(1).public();
        let short = &advert_record_key(&owner)[..20];
        for key in [&b"aimatrix/class/runtime/wasm"[..], short, b"", b"/ipfs/whatever"] {
            assert_eq!(check_advert_record(key, &value), Err(RecordRefusal::NotAdvertKey));
        }
    }

    #[test]
    fn provider_keys_are_capability_classes() {
        for class in capability_classes(&testkit::profile()) {
            assert_eq!(check_provider_key(&class_provider_key(&class)), Ok(()), "{class}");
        }
        let long = "x".repeat(CLASS_NAME_BYTES_MAX + 1);
        for key in [
            b"aimatrix/class/".to_vec(),
            class_provider_key(&long),
            class_provider_key("has space"),
            b"aimatrix/advert/runtime/wasm".to_vec(),
        ] {
            assert_eq!(check_provider_key(&key), Err(RecordRefusal::NotClassKey), "{key:?}");
        }
    }
}
