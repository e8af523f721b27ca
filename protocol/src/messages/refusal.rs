//! Why a receiver refused a message that decoded and verified: it is not acceptable from its
//! signer, or not in the receiver's state. Each refusal has a stable label, counted apart.

use crate::envelope::Domain;
use crate::identity::NodeId;
use crate::messages::JobId;

/// A refusal of a well-formed, correctly signed message. Counted by [`Refusal::label`] and
/// never acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A relay's roster out of bounds.
    #[error("roster from {signer}: {why}")]
    BadRoster {
        /// The relay that signed it.
        signer: NodeId,
        /// What is wrong.
        why: String,
    },
    /// A message from a relay the node does not trust.
    #[error("{domain} from {signer}, which is not a trusted relay")]
    UntrustedRelay {
        /// The message kind.
        domain: Domain,
        /// Who signed it.
        signer: NodeId,
    },
    /// A message kind the receiver never takes (a node's claim sent to a node, a relay's
    /// lease sent to a relay).
    #[error("a {receiver} does not accept {domain}")]
    NotAccepted {
        /// `node` or `relay`.
        receiver: &'static str,
        /// The message kind.
        domain: Domain,
    },
    /// An offer whose job spec does not validate.
    #[error("offer {job_id} has an invalid spec: {problem}")]
    InvalidSpec {
        /// The job.
        job_id: JobId,
        /// The first problem the validation found.
        problem: String,
    },
    /// An offer whose spec names content by path instead of digest.
    #[error("offer {job_id} names content by path instead of digest")]
    UnresolvedContent {
        /// The job.
        job_id: JobId,
    },
    /// An offer naming more preferred claimants than any relay may.
    #[error("offer {job_id} names {count} preferred claimants (at most {max})")]
    TooManyPreferred {
        /// The job.
        job_id: JobId,
        /// How many it named.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A second relay offering a job another relay offered first.
    #[error("offer {job_id} from a second relay; the first offer stands")]
    SecondRelay {
        /// The job.
        job_id: JobId,
    },
    /// A claim denial listing more taken jobs than any relay may.
    #[error("denial listing {count} taken jobs (at most {max})")]
    OversizedDenial {
        /// How many it listed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A denial or lease from a relay that did not offer the job (or a lease that does not
    /// match what was offered), or a cancel from a relay that did not grant the lease.
    #[error("{domain} for job {job_id} from a relay that did not offer it (or not as offered)")]
    NotOffered {
        /// The message kind.
        domain: Domain,
        /// The job.
        job_id: JobId,
    },
    /// A lease or receipt addressed to another node.
    #[error("{domain} addressed to another node ({node})")]
    OtherNode {
        /// The message kind.
        domain: Domain,
        /// The node it names.
        node: NodeId,
    },
    /// A receipt for a result this node did not return to the receipt's signer.
    #[error("receipt for job {job_id} lease {lease} that this node did not return to its signer")]
    UnexpectedReceipt {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
    },
    /// A result for a job the relay does not know (progress for one is an unknown lease).
    #[error("{domain} for unknown job {job_id}")]
    UnknownJob {
        /// The message kind.
        domain: Domain,
        /// The job.
        job_id: JobId,
    },
    /// A progress report or result for a lease the job never had.
    #[error("{domain} for unknown lease {lease} of job {job_id}")]
    UnknownLease {
        /// The message kind.
        domain: Domain,
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
    },
    /// A progress report or result for a lease another node holds, or that is no longer
    /// running.
    #[error("{domain} for lease {lease} of job {job_id}, which the sender does not hold")]
    LeaseNotHeld {
        /// The message kind.
        domain: Domain,
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
    },
    /// A second result for a lease whose result was already counted.
    #[error("duplicate result for lease {lease} of job {job_id}")]
    DuplicateResult {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
    },
}

impl Refusal {
    /// A short stable label for counters.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UntrustedRelay { .. } => "untrusted_relay",
            Self::NotAccepted { .. } => "not_accepted",
            Self::InvalidSpec { .. } => "invalid_spec",
            Self::UnresolvedContent { .. } => "unresolved_content",
            Self::TooManyPreferred { .. } => "too_many_preferred",
            Self::SecondRelay { .. } => "second_relay",
            Self::OversizedDenial { .. } => "oversized_denial",
            Self::NotOffered { .. } => "not_offered",
            Self::OtherNode { .. } => "other_node",
            Self::UnexpectedReceipt { .. } => "unexpected_receipt",
            Self::UnknownJob { .. } => "unknown_job",
            Self::UnknownLease { .. } => "unknown_lease",
            Self::LeaseNotHeld { .. } => "lease_not_held",
            Self::DuplicateResult { .. } => "duplicate_result",
            Self::BadRoster { .. } => "bad_roster",
        }
    }
}
