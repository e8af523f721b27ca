//! The protocol's messages, and sealing them into (and opening them from) signed envelopes.
//!
//! Each message type has its own [`Domain`]; [`seal`] signs and encodes a message,
//! [`open`] decodes, verifies and checks that the payload is the type its domain names.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::capability::CapabilityProfile;
use crate::codec::{self, DecodeError, EncodeError};
use crate::envelope::{Domain, Envelope, EnvelopeHeader, Verifier, VerifyError};
use crate::hash::Digest;
use crate::identity::{Keypair, NodeId};
use crate::job::JobSpec;
use crate::matching::Mismatch;
use crate::time::Millis;

mod memo;
mod refusal;

pub use memo::{OfferMemo, OfferMemoStats};
pub use refusal::Refusal;

/// A job's id: 16 bytes chosen by the relay, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub [u8; 16]);

impl JobId {
    /// Derives a job id from a digest (its first 16 bytes).
    pub fn from_digest(d: &Digest) -> Self {
        let mut out = [0u8; 16];
        out.copy_from_slice(&d.0[..16]);
        Self(out)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", &hex::encode(self.0)[..8])
    }
}

impl std::str::FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(s, &mut out)
            .map_err(|_| format!("{s:?} is not a job id: expected 32 hex digits"))?;
        Ok(Self(out))
    }
}

/// A node's signed capability advert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    /// Increases with every new advert from this node; older ones are ignored.
    pub seq: u64,
    /// What the node has and allows.
    pub profile: CapabilityProfile,
}

/// A relay's roster (issue 17, docs/mesh.md): the relays it peers with, which it vouches for.
/// A node works for the relays it was given and, unless its policy pins that list, for the
/// relays in their rosters; it dials them at the addresses listed here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roster {
    /// Increases with every roster from this relay; older ones are ignored.
    pub seq: u64,
    /// The relays vouched for (at most [`ROSTER_RELAYS_MAX`]).
    pub relays: Vec<RosterEntry>,
}

/// One relay in a [`Roster`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    /// The relay.
    pub relay: NodeId,
    /// Where to dial it: multiaddrs as text, without `/p2p/<id>` (at most
    /// [`ROSTER_ADDRS_MAX`], each at most [`ROSTER_ADDR_BYTES_MAX`] bytes).
    pub addrs: Vec<String>,
}

/// Most relays one roster lists.
pub const ROSTER_RELAYS_MAX: usize = 64;
/// Most addresses listed for one relay.
pub const ROSTER_ADDRS_MAX: usize = 8;
/// Longest address listed, in bytes.
pub const ROSTER_ADDR_BYTES_MAX: usize = 256;

impl Roster {
    /// Why this roster is out of bounds, if it is.
    pub fn check(&self) -> Result<(), String> {
        Self::check_entries(&self.relays)
    }

    /// Why a roster listing `relays` would be out of bounds, if it would.
    pub fn check_entries(relays: &[RosterEntry]) -> Result<(), String> {
        if relays.len() > ROSTER_RELAYS_MAX {
            return Err(format!(
                "lists {} relays; a roster lists at most {ROSTER_RELAYS_MAX}",
                relays.len()
            ));
        }
        for entry in relays {
            if entry.addrs.len() > ROSTER_ADDRS_MAX {
                return Err(format!(
                    "lists {} addresses for {}; at most {ROSTER_ADDRS_MAX}",
                    entry.addrs.len(),
                    entry.relay
                ));
            }
            if let Some(long) = entry.addrs.iter().find(|a| a.len() > ROSTER_ADDR_BYTES_MAX) {
                return Err(format!(
                    "an address of {} is {} bytes; at most {ROSTER_ADDR_BYTES_MAX}",
                    entry.relay,
                    long.len()
                ));
            }
        }
        Ok(())
    }
}

/// A relay's offer of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// The job.
    pub job_id: JobId,
    /// The job's spec, every content reference resolved to a digest.
    pub spec: JobSpec,
    /// The job must be done by then.
    pub deadline_ms: Millis,
    /// Leases the relay would grant now.
    pub open_slots: u32,
    /// The nodes the relay asks to claim first (at most [`PREFERRED_CLAIMANTS_MAX`]); empty
    /// means any node that can serve the job may claim it. Advisory: the relay grants a valid
    /// claim from any node, so an owner's explicit `compute accept` is never refused for it.
    pub preferred: Vec<NodeId>,
}

/// Most nodes an [`Offer`] names as preferred claimants; a node ignores longer lists.
pub const PREFERRED_CLAIMANTS_MAX: usize = 64;

/// A per-node order over jobs: nodes that see the same offers try them in different orders,
/// so they rarely race for one job. A bijection of the job for a fixed node.
pub fn claim_order_key(node: &NodeId, job: &JobId) -> u64 {
    let node_lo = u64::from_le_bytes(node.as_bytes()[..8].try_into().unwrap_or([0; 8]));
    let job_lo = u64::from_le_bytes(job.0[..8].try_into().unwrap_or([0; 8]));
    mix64(job_lo ^ mix64(node_lo))
}

/// A node's claim on an offered job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The job claimed.
    pub job_id: JobId,
}

/// The chunk of a training round a lease covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundLease {
    /// Round number, from 0.
    pub round: u32,
    /// Digest of the model to start from.
    pub model: Digest,
    /// Which chunk of the dataset to train on.
    pub chunk: u32,
    /// How many chunks the dataset is split into.
    pub chunks: u32,
    /// Digest of the chunk's data (an `ADSC` dataset the relay serves).
    pub data: Digest,
    /// A verifying re-run of another participant's update of `round`: train from `model` on
    /// `data` without error-feedback memory and keep nothing; the relay compares the delta
    /// digests.
    pub verify: bool,
}

/// A relay's grant of a lease: run the job until `deadline_ms` and return a result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The job.
    pub job_id: JobId,
    /// The lease number within the job.
    pub lease: u32,
    /// The node the lease is for.
    pub node: NodeId,
    /// A result arriving at or after this instant is not counted.
    pub deadline_ms: Millis,
    /// The job's spec.
    pub spec: JobSpec,
    /// For training jobs: the round and chunk.
    pub round: Option<RoundLease>,
}

/// Why a relay refused a claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DenyReason {
    /// The relay does not know the job.
    UnknownJob,
    /// The job is no longer open.
    NotOpen,
    /// Every replica slot is leased.
    NoOpenSlot,
    /// This node already holds or held a lease on the job (replicas must be distinct nodes).
    AlreadyLeased,
    /// This node lost or failed a lease on the job before.
    Excluded,
    /// The node's advertised profile does not match the job.
    Mismatch(Vec<Mismatch>),
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownJob => f.write_str("unknown job"),
            Self::NotOpen => f.write_str("job no longer open"),
            Self::NoOpenSlot => f.write_str("every replica slot is leased"),
            Self::AlreadyLeased => f.write_str("this node already has a lease on the job"),
            Self::Excluded => f.write_str("this node lost or failed a lease on this job"),
            Self::Mismatch(why) => {
                let parts: Vec<String> = why.iter().map(ToString::to_string).collect();
                write!(f, "advertised profile does not match: {}", parts.join("; "))
            }
        }
    }
}

/// A relay's refusal of a claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseDenied {
    /// The job.
    pub job_id: JobId,
    /// Why.
    pub reason: DenyReason,
    /// Other jobs of this relay that recently stopped taking claims (fully leased or ended),
    /// at most [`TAKEN_HINT_MAX`]: a node that claimed a stale offer stops claiming these too,
    /// instead of learning about each one from its own denial.
    pub taken: Vec<JobId>,
}

/// Most job ids a [`LeaseDenied`] lists as taken; a node ignores longer lists.
pub const TAKEN_HINT_MAX: usize = 64;

/// A node's progress report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The job.
    pub job_id: JobId,
    /// The lease.
    pub lease: u32,
    /// Percent done, 0..=100.
    pub percent: u8,
}

/// One output file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDigest {
    /// Path relative to the outputs directory.
    pub name: String,
    /// Content digest.
    pub digest: Digest,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// What the sandbox measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Wall time.
    pub wall_ms: u64,
    /// CPU time.
    pub cpu_ms: u64,
    /// Peak memory.
    pub peak_memory_bytes: u64,
    /// wasm fuel consumed.
    pub fuel_consumed: u64,
}

/// How a lease ended on the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The workload succeeded.
    Succeeded {
        /// Digest over the outputs; replicas must agree on it.
        result_hash: Digest,
        /// The output files.
        outputs: Vec<OutputDigest>,
    },
    /// The workload failed (exit code, trap, timeout, limit).
    Failed {
        /// What happened.
        reason: String,
    },
    /// The node gave the lease back unfinished (shutting down, cancelled locally).
    HandedBack {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// A successful outcome whose result hash covers the outputs' names and digests.
    pub fn succeeded(mut outputs: Vec<OutputDigest>) -> Self {
        outputs.sort_by(|a, b| a.name.cmp(&b.name));
        Self::Succeeded { result_hash: result_hash(&outputs), outputs }
    }
}

/// The digest replicas must agree on: over each output's name, digest and size, in name order.
pub fn result_hash(outputs: &[OutputDigest]) -> Digest {
    let mut parts: Vec<Vec<u8>> = Vec::with_capacity(outputs.len());
    for o in outputs {
        let mut p = Vec::with_capacity(o.name.len() + 40);
        p.extend_from_slice(o.name.as_bytes());
        p.extend_from_slice(&o.digest.0);
        p.extend_from_slice(&o.size_bytes.to_le_bytes());
        parts.push(p);
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Digest::of_parts(&refs)
}

/// A node's result for a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job.
    pub job_id: JobId,
    /// The lease.
    pub lease: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// What it used.
    pub usage: Usage,
}

/// Whether a result was paid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Verified and paid `amount` credits (after the relay fee).
    Paid {
        /// Credits paid to the node.
        amount: u64,
    },
    /// Not paid, and why.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// A relay's signed receipt for a result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The job.
    pub job_id: JobId,
    /// The lease.
    pub lease: u32,
    /// The node the receipt is for.
    pub node: NodeId,
    /// For training jobs: the round.
    pub round: Option<u32>,
    /// Paid or not.
    pub verdict: Verdict,
}

/// A relay's cancellation of a lease: stop, the result will not be counted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// The job.
    pub job_id: JobId,
    /// The lease.
    pub lease: u32,
    /// Why.
    pub reason: String,
}

/// Any protocol message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// See [`Advert`].
    Advert(Advert),
    /// See [`Offer`].
    Offer(Offer),
    /// See [`Claim`].
    Claim(Claim),
    /// See [`Lease`].
    Lease(Lease),
    /// See [`LeaseDenied`].
    LeaseDenied(LeaseDenied),
    /// See [`Progress`].
    Progress(Progress),
    /// See [`JobResult`].
    Result(JobResult),
    /// See [`Receipt`].
    Receipt(Receipt),
    /// See [`Cancel`].
    Cancel(Cancel),
    /// See [`Roster`].
    Roster(Roster),
}

impl Message {
    /// The domain this message is signed under.
    pub const fn domain(&self) -> Domain {
        match self {
            Self::Advert(_) => Domain::Advert,
            Self::Offer(_) => Domain::Offer,
            Self::Claim(_) => Domain::Claim,
            Self::Lease(_) => Domain::Lease,
            Self::LeaseDenied(_) => Domain::LeaseDenied,
            Self::Progress(_) => Domain::Progress,
            Self::Result(_) => Domain::Result,
            Self::Receipt(_) => Domain::Receipt,
            Self::Cancel(_) => Domain::Cancel,
            Self::Roster(_) => Domain::Roster,
        }
    }

    /// Encodes the message body (without the domain, which the envelope carries).
    pub fn encode_payload(&self) -> Result<Vec<u8>, EncodeError> {
        match self {
            Self::Advert(m) => codec::encode(m),
            Self::Offer(m) => codec::encode(m),
            Self::Claim(m) => codec::encode(m),
            Self::Lease(m) => codec::encode(m),
            Self::LeaseDenied(m) => codec::encode(m),
            Self::Progress(m) => codec::encode(m),
            Self::Result(m) => codec::encode(m),
            Self::Receipt(m) => codec::encode(m),
            Self::Cancel(m) => codec::encode(m),
            Self::Roster(m) => codec::encode(m),
        }
    }

    /// Decodes a body of the type `domain` names.
    pub fn decode_payload(domain: Domain, payload: &[u8]) -> Result<Self, DecodeError> {
        Ok(match domain {
            Domain::Advert => Self::Advert(codec::decode(payload)?),
            Domain::Offer => Self::Offer(codec::decode(payload)?),
            Domain::Claim => Self::Claim(codec::decode(payload)?),
            Domain::Lease => Self::Lease(codec::decode(payload)?),
            Domain::LeaseDenied => Self::LeaseDenied(codec::decode(payload)?),
            Domain::Progress => Self::Progress(codec::decode(payload)?),
            Domain::Result => Self::Result(codec::decode(payload)?),
            Domain::Receipt => Self::Receipt(codec::decode(payload)?),
            Domain::Cancel => Self::Cancel(codec::decode(payload)?),
            Domain::Roster => Self::Roster(codec::decode(payload)?),
        })
    }
}

/// Why received bytes were not acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The envelope did not decode.
    #[error("undecodable envelope: {0}")]
    Envelope(DecodeError),
    /// The envelope failed verification.
    #[error("{0}")]
    Verify(VerifyError),
    /// The payload is not the message its domain names.
    #[error("undecodable {domain} payload: {error}")]
    Payload {
        /// The envelope's domain.
        domain: Domain,
        /// The decode error.
        error: DecodeError,
    },
    /// The transport's sender is not the envelope's signer (for direct messages).
    #[error("signed by {signer} but sent by {sender}")]
    SenderMismatch {
        /// The envelope's signer.
        signer: NodeId,
        /// The transport peer.
        sender: NodeId,
    },
    /// The message is well-formed but not acceptable from this signer or in this state.
    #[error("{0}")]
    Refused(Refusal),
}

impl RejectReason {
    /// A short stable label for counters (`bad_signature`, `duplicate`, `unknown_lease`, ...).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Envelope(_) => "undecodable",
            Self::Payload { .. } => "bad_payload",
            Self::SenderMismatch { .. } => "sender_mismatch",
            Self::Refused(refusal) => refusal.label(),
            Self::Verify(v) => match v {
                VerifyError::Oversized { .. } => "oversized",
                VerifyError::WrongDomain { .. } => "wrong_domain",
                VerifyError::BadLifetime { .. } => "bad_lifetime",
                VerifyError::Expired { .. } => "expired",
                VerifyError::NotYetValid { .. } => "not_yet_valid",
                VerifyError::InvalidSigner => "invalid_signer",
                VerifyError::BadSignature => "bad_signature",
                VerifyError::Duplicate { .. } => "duplicate",
                VerifyError::NonceReused { .. } => "nonce_reused",
                VerifyError::ReplayWindowExceeded { .. } => "replay_window",
            },
        }
    }
}

/// Signs `message` into an encoded envelope valid from `now_ms` for `ttl_ms`.
pub fn seal(
    key: &Keypair,
    message: &Message,
    nonce: u64,
    now_ms: Millis,
    ttl_ms: u64,
) -> Result<Vec<u8>, EncodeError> {
    let header = EnvelopeHeader {
        domain: message.domain(),
        nonce,
        issued_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(ttl_ms.max(1)),
    };
    codec::encode(&Envelope::sign(key, header, message.encode_payload()?))
}

/// Decodes and verifies an envelope, then decodes its message.
pub fn open(
    verifier: &mut Verifier,
    now_ms: Millis,
    bytes: &[u8],
    expected: &[Domain],
) -> Result<(NodeId, Message), RejectReason> {
    let envelope: Envelope = codec::decode(bytes).map_err(RejectReason::Envelope)?;
    open_envelope(verifier, now_ms, &envelope, expected)
}

/// [`open`] after the envelope frame is decoded: verify, then decode the payload.
fn open_envelope(
    verifier: &mut Verifier,
    now_ms: Millis,
    envelope: &Envelope,
    expected: &[Domain],
) -> Result<(NodeId, Message), RejectReason> {
    verifier.verify(now_ms, envelope, expected).map_err(RejectReason::Verify)?;
    let message = Message::decode_payload(envelope.domain, &envelope.payload)
        .map_err(|error| RejectReason::Payload { domain: envelope.domain, error })?;
    Ok((envelope.signer, message))
}

/// A message as a node receives it: an offer comes shared, since many receivers may hold the
/// same one (see [`OfferMemo`]).
#[allow(
    clippy::large_enum_variant,
    reason = "`Other` is the message as `open` returns it; boxing it would allocate per message"
)]
pub(crate) enum Opened {
    /// An offer.
    Offer(Arc<Offer>),
    /// Any other message.
    Other(Message),
}

impl Opened {
    /// The domain the message was signed under.
    pub(crate) const fn domain(&self) -> Domain {
        match self {
            Self::Offer(_) => Domain::Offer,
            Self::Other(m) => m.domain(),
        }
    }
}

/// [`open`], with offers shared: an offer envelope already decoded by an installed
/// [`OfferMemo`] is not decoded again, but verified by `verifier` all the same.
pub(crate) fn open_shared(
    verifier: &mut Verifier,
    now_ms: Millis,
    bytes: &[u8],
    expected: &[Domain],
) -> Result<(NodeId, Opened), RejectReason> {
    let decoded = match memo::lookup(bytes) {
        memo::Lookup::Shared(shared) => {
            let envelope = &shared.envelope;
            verifier
                .verify_keyed(now_ms, envelope, expected, &shared.memo_key)
                .map_err(RejectReason::Verify)?;
            let offer = shared
                .offer
                .clone()
                .map_err(|error| RejectReason::Payload { domain: envelope.domain, error })?;
            return Ok((envelope.signer, Opened::Offer(offer)));
        }
        memo::Lookup::Decoded(decoded) => decoded,
        memo::Lookup::Off => codec::decode(bytes),
    };
    let envelope: Envelope = decoded.map_err(RejectReason::Envelope)?;
    let (signer, message) = open_envelope(verifier, now_ms, &envelope, expected)?;
    let opened = match message {
        Message::Offer(offer) => Opened::Offer(Arc::new(offer)),
        other => Opened::Other(other),
    };
    Ok((signer, opened))
}

/// Generates nonces that never repeat for one seed: a bijective mix of a counter.
#[derive(Clone, Debug)]
pub struct NonceGen {
    seed: u64,
    counter: u64,
}

impl NonceGen {
    /// Nonces from `seed` (pass fresh randomness at every start, so restarts do not repeat).
    pub const fn new(seed: u64) -> Self {
        // Mixing the seed first keeps nearby seeds (consecutive timestamps) from sharing nonces.
        Self { seed: mix64(seed ^ 0x5bd1_e995_9e37_79b9), counter: 0 }
    }

    /// The next nonce.
    pub fn next_nonce(&mut self) -> u64 {
        self.counter = self.counter.wrapping_add(1);
        mix64(self.seed.wrapping_add(self.counter))
    }
}

/// SplitMix64's finalizer: a bijection on u64 (distinct inputs give distinct outputs).
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;

    #[test]
    fn nodes_order_the_same_jobs_differently() {
        let jobs: Vec<JobId> = (0..64u8).map(|i| JobId::from_digest(&Digest::of(&[i]))).collect();
        let first_choice = |seed: u64| {
            let node = testkit::keypair(seed).public();
            *jobs.iter().min_by_key(|j| claim_order_key(&node, j)).expect("jobs")
        };
        let choices: std::collections::BTreeSet<JobId> = (0..8).map(first_choice).collect();
        // Eight nodes, 64 jobs: a shared order would give one first choice.
        assert!(choices.len() >= 5, "{} distinct first choices", choices.len());
        assert_eq!(first_choice(3), first_choice(3), "stable for one node");
    }
}
