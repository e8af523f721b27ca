//! `RelayCore`: the Studio relay's side of the job lifecycle, as a sans-IO state machine.
//!
//! A job is posted ([`RelayCore::post_job`]), its escrow reserved through a
//! [`LedgerOp::Reserve`] the driver applies and confirms ([`RelayCore::reserve_confirmed`]),
//! then offered on gossip. Claims get leases with deadlines up to the replication factor;
//! results are verified by output-hash agreement among replicas; agreeing nodes are paid,
//! disagreeing ones are not; expired leases are re-offered; a job that runs out of attempts or
//! time is refunded. Training jobs run in rounds (see [`training`]).
//!
//! Inputs: [`RelayCore::handle_message`], [`RelayCore::handle_timeout`] and the commands.
//! Outputs: [`RelayCore::poll_transmit`], [`RelayCore::poll_event`],
//! [`RelayCore::poll_timeout`]. Every credit movement is a [`RelayEvent::Ledger`] carrying an
//! idempotency id. A driver can store each [`RelayJob`] and restore it into a fresh core after
//! a restart ([`RelayCore::restore_job`]).

mod restore;
pub mod training;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::capability::CapabilityProfile;
use crate::envelope::{Domain, Verifier, VerifyConfig};
use crate::hash::Digest;
use crate::identity::{Keypair, NodeId};
use crate::job::{JobKind, JobSpec};
use crate::ledger::{LedgerOp, TransferId};
use crate::matching::{self, Mismatch};
use crate::messages::{
    claim_order_key, open, Cancel, Claim, DenyReason, JobId, JobResult, Lease, LeaseDenied,
    Message, Offer, Outcome, Receipt, RejectReason, RoundLease, Verdict, PREFERRED_CLAIMANTS_MAX,
    TAKEN_HINT_MAX,
};
use crate::outbox::{Outbox, Topic, Transmit};
use crate::time::{secs, Millis};

use self::training::{TrainingData, TrainingState};

/// Relay tunables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayConfig {
    /// Lifetime of direct messages (leases, denials, receipts, cancels).
    pub message_ttl_ms: u64,
    /// How often an open job's offer is re-announced.
    pub reannounce_interval_ms: u64,
    /// Added to a job's `limits.timeout_s` to form a lease deadline (fetching, transfer).
    pub lease_grace_ms: u64,
    /// A reservation's ledger timeout is the job deadline plus this margin.
    pub reserve_margin_ms: u64,
    /// The relay's fee, in basis points of each payment (at most 10,000).
    pub fee_bps: u16,
    /// A training round starts when every wanted participant is present, or when a quorum
    /// has waited this long for the rest.
    pub round_start_wait_ms: u64,
    /// Most node profiles remembered from adverts.
    pub max_adverts: usize,
    /// How long an offer's preferred claimants have to claim it: until then each named node
    /// counts as busy for other offers, and after it the offer is announced again, to a wider
    /// set (at most every `reannounce_interval_ms`).
    pub targeted_wait_ms: u64,
    /// Envelope verification limits. By default adverts have a replay cache of their own:
    /// with one cache, a relay hearing more than about 45,000 nodes (two live adverts each)
    /// filled it with adverts and then refused every claim and result as too old.
    pub verify: VerifyConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            message_ttl_ms: 120_000,
            reannounce_interval_ms: 10_000,
            lease_grace_ms: 30_000,
            reserve_margin_ms: 3_600_000,
            fee_bps: 0,
            round_start_wait_ms: 10_000,
            max_adverts: 100_000,
            targeted_wait_ms: 1_000,
            verify: VerifyConfig { own_replay_cache: &[Domain::Advert], ..VerifyConfig::default() },
        }
    }
}

/// Where a job stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for the ledger to confirm the escrow.
    Reserving,
    /// Offered; leasing and collecting results.
    Open,
    /// Done: the accepted result (or final model) and everyone paid.
    Completed {
        /// The agreed result hash (training: the final model digest).
        result_hash: Digest,
    },
    /// Ended without a result; unpaid escrow refunded.
    Failed {
        /// Why.
        reason: String,
    },
    /// The ledger refused the escrow; never offered.
    Refused {
        /// Why.
        reason: String,
    },
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Completed { .. } | Self::Failed { .. } | Self::Refused { .. })
    }
}

/// Where a lease stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseStatus {
    /// Running.
    Active,
    /// Returned a successful result with this hash.
    Returned(Digest),
    /// Returned a failure or was handed back.
    Failed(String),
    /// Passed its deadline without a result.
    Expired,
    /// Cancelled by the relay (job finished or ended).
    Cancelled,
}

/// One lease of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The lease number.
    pub lease: u32,
    /// Who holds it.
    pub node: NodeId,
    /// Granted at.
    pub granted_at_ms: Millis,
    /// Deadline.
    pub deadline_ms: Millis,
    /// Training round, if any.
    pub round: Option<u32>,
    /// Last progress report.
    pub progress: u8,
    /// State.
    pub status: LeaseStatus,
    /// Whether this lease's result was paid.
    pub paid: bool,
    /// Training: the digest of the result's `delta.sha256` output, which a verifying re-run
    /// must match.
    pub check: Option<Digest>,
}

/// A job as the relay tracks it.
///
/// Serializable with every private field, so a driver can store it with
/// [`crate::codec::encode`] after each change and hand it to [`RelayCore::restore_job`] after
/// a restart (see `docs/protocol.md`, "Restoring jobs after a restart").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayJob {
    /// The id.
    pub id: JobId,
    /// The spec.
    pub spec: JobSpec,
    /// The requester's ledger account.
    pub requester: String,
    /// Posted at.
    pub posted_at_ms: Millis,
    /// Deadline.
    pub deadline_ms: Millis,
    /// State.
    pub state: JobState,
    /// Escrow reserved.
    pub escrow: u64,
    /// Credits paid so far (node amounts and fees).
    pub paid: u64,
    /// Credits released back to the requester.
    pub refunded: u64,
    /// Every lease granted, by number.
    pub leases: BTreeMap<u32, LeaseRecord>,
    /// Nodes that lost or failed a lease; never leased again.
    pub excluded: BTreeSet<NodeId>,
    /// Training progress, for training jobs.
    pub training: Option<TrainingState>,
    next_lease: u32,
    announce_at_ms: Millis,
    /// Announcements since the job was posted or a slot last freed: each names a wider set of
    /// preferred claimants, and past [`TARGETED_ANNOUNCEMENTS`] the offer is open to every
    /// node. Not stored: a restored job starts targeting again.
    #[serde(skip)]
    announce_round: u32,
    /// The preferred claimants of the latest announcement, and when it went out.
    #[serde(skip)]
    nominated: (Millis, Vec<NodeId>),
    post_seq: u64,
    /// The reservation's ledger timeout, kept so a restored job re-emits the identical
    /// `Reserve` even if `reserve_margin_ms` changed.
    reserve_timeout_at_ms: Millis,
}

impl RelayJob {
    fn reserve_id(&self) -> TransferId {
        TransferId::derive(self.id, "reserve", &[])
    }

    fn reserve_op(&self) -> LedgerOp {
        LedgerOp::Reserve {
            id: self.reserve_id(),
            job_id: self.id,
            requester: self.requester.clone(),
            amount: self.escrow,
            timeout_at_ms: self.reserve_timeout_at_ms,
        }
    }

    fn active_leases(&self) -> usize {
        self.leases.values().filter(|l| l.status == LeaseStatus::Active).count()
    }

    /// Size of the largest group of agreeing successful results.
    fn best_agreement(&self) -> usize {
        let mut groups: HashMap<Digest, usize> = HashMap::new();
        for l in self.leases.values() {
            if let LeaseStatus::Returned(h) = l.status {
                *groups.entry(h).or_default() += 1;
            }
        }
        groups.values().copied().max().unwrap_or(0)
    }

    fn lease_budget(&self) -> u64 {
        u64::from(self.spec.replication) * u64::from(self.spec.max_attempts)
    }

    /// Leases the relay would grant now.
    pub fn open_slots(&self) -> u32 {
        if self.state != JobState::Open {
            return 0;
        }
        if let Some(t) = &self.training {
            return t.open_slots();
        }
        let needed = (self.spec.replication as usize).saturating_sub(self.best_agreement());
        let wanted = needed.saturating_sub(self.active_leases()) as u64;
        let budget_left = self.lease_budget().saturating_sub(u64::from(self.next_lease));
        wanted.min(budget_left) as u32
    }
}

/// Something the relay driver must act on or record.
#[derive(Clone, Debug, PartialEq)]
pub enum RelayEvent {
    /// Apply this to the ledger (and, for a reserve, confirm or refuse it).
    Ledger(LedgerOp),
    /// The job's escrow is confirmed and it is offered.
    JobOpen {
        /// The job.
        job_id: JobId,
    },
    /// A lease was granted.
    LeaseGranted {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
        /// To whom.
        node: NodeId,
    },
    /// A lease passed its deadline without a result.
    LeaseExpired {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
        /// Its holder.
        node: NodeId,
    },
    /// A node reported progress.
    Progress {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
        /// Percent done.
        percent: u8,
    },
    /// A result arrived on an active lease.
    ResultReceived {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
        /// From whom.
        node: NodeId,
        /// What it says.
        outcome: Outcome,
    },
    /// A receipt was issued (paid or not).
    Receipted(Receipt),
    /// A training round started.
    RoundStarted {
        /// The job.
        job_id: JobId,
        /// Round number.
        round: u32,
        /// Its participants.
        participants: Vec<NodeId>,
    },
    /// A training round closed with a quorum; aggregate these updates and call
    /// [`RelayCore::round_aggregated`].
    RoundClosed {
        /// The job.
        job_id: JobId,
        /// Round number.
        round: u32,
        /// The model the round started from.
        model: Digest,
        /// The updates received in time: node, lease, update digest.
        updates: Vec<(NodeId, u32, Digest)>,
    },
    /// A training round closed without a quorum and will be retried (or the job fails).
    RoundFailed {
        /// The job.
        job_id: JobId,
        /// Round number.
        round: u32,
        /// Why.
        reason: String,
    },
    /// The job completed.
    JobCompleted {
        /// The job.
        job_id: JobId,
        /// The agreed result (or final model).
        result_hash: Digest,
    },
    /// The job ended without a result; the unpaid escrow was released.
    JobFailed {
        /// The job.
        job_id: JobId,
        /// Why.
        reason: String,
    },
    /// The ledger refused the escrow.
    JobRefused {
        /// The job.
        job_id: JobId,
        /// Why.
        reason: String,
    },
    /// Received bytes were not acted on.
    Rejected {
        /// The transport peer, if direct.
        from: Option<NodeId>,
        /// Why.
        reason: RejectReason,
    },
}

/// Why a job could not be posted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    /// The spec failed validation.
    #[error("invalid job spec:\n{0}")]
    Invalid(#[from] crate::job::SpecError),
    /// A path reference was not resolved to a digest.
    #[error("job spec still names files by path; resolve them to sha256 digests before posting")]
    Unresolved,
    /// The spec is too large to offer.
    #[error("job spec is too large to send: {0}")]
    TooLarge(String),
    /// A training job's data does not match its spec (or a job that is not training has some).
    #[error("training data: {0}")]
    TrainingData(String),
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No such job.
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    /// The job is not in a state that allows this.
    #[error("job {job_id} is {state}; {what} is not possible now")]
    WrongState {
        /// The job.
        job_id: JobId,
        /// Its state.
        state: String,
        /// The command.
        what: &'static str,
    },
    /// The command's arguments do not fit the job.
    #[error("{0}")]
    Invalid(String),
    /// The job is already in this relay's memory; restore each stored job once.
    #[error("job {0} is already known to this relay; restore each stored job once")]
    AlreadyKnown(JobId),
}

/// Counters of rejected messages by reason label.
pub type RejectCounts = BTreeMap<&'static str, u64>;

/// The relay's state machine.
#[derive(Debug)]
pub struct RelayCore {
    cfg: RelayConfig,
    outbox: Outbox,
    verifier: Verifier,
    jobs: BTreeMap<JobId, RelayJob>,
    adverts: HashMap<NodeId, (u64, CapabilityProfile)>,
    events: VecDeque<RelayEvent>,
    rejects: RejectCounts,
    posted: u64,
    /// Jobs that most recently stopped taking claims, newest last (hints in denials).
    taken: VecDeque<JobId>,
}

const RELAY_ACCEPTS: [Domain; 4] =
    [Domain::Advert, Domain::Claim, Domain::Progress, Domain::Result];

impl RelayCore {
    /// A relay signing with `key`; `nonce_seed` must be fresh randomness at every start.
    pub fn new(key: Keypair, mut cfg: RelayConfig, nonce_seed: u64) -> Self {
        cfg.fee_bps = cfg.fee_bps.min(10_000);
        cfg.reannounce_interval_ms = cfg.reannounce_interval_ms.max(1);
        Self {
            outbox: Outbox::new(key, nonce_seed, cfg.message_ttl_ms),
            verifier: Verifier::new(cfg.verify),
            cfg,
            jobs: BTreeMap::new(),
            adverts: HashMap::new(),
            events: VecDeque::new(),
            rejects: RejectCounts::new(),
            posted: 0,
            taken: VecDeque::with_capacity(TAKEN_HINT_MAX),
        }
    }

    /// The relay's identity.
    pub fn id(&self) -> NodeId {
        self.outbox.id()
    }

    /// The relay's configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    /// A job by id.
    pub fn job(&self, id: &JobId) -> Option<&RelayJob> {
        self.jobs.get(id)
    }

    /// Every job, by id.
    pub fn jobs(&self) -> impl Iterator<Item = &RelayJob> {
        self.jobs.values()
    }

    /// The latest advertised profile of every node heard from.
    pub fn known_nodes(&self) -> impl Iterator<Item = (&NodeId, &CapabilityProfile)> {
        self.adverts.iter().map(|(id, (_, p))| (id, p))
    }

    /// Forgets finished jobs (completed, failed, refused) beyond the newest `keep`, so a
    /// long-running relay stays bounded; the driver persists what it needs first. Returns how
    /// many were forgotten.
    pub fn forget_finished(&mut self, keep: usize) -> usize {
        let mut finished: Vec<(u64, JobId)> =
            self.jobs.values().filter(|j| j.state.is_final()).map(|j| (j.post_seq, j.id)).collect();
        if finished.len() <= keep {
            return 0;
        }
        finished.sort();
        let drop = finished.len() - keep;
        for (_, id) in &finished[..drop] {
            self.jobs.remove(id);
        }
        drop
    }

    /// Rejected messages by reason.
    pub fn reject_counts(&self) -> &RejectCounts {
        &self.rejects
    }

    /// Next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// When [`RelayCore::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let mut next: Option<Millis> = None;
        let mut consider = |t: Millis| next = Some(next.map_or(t, |n| n.min(t)));
        for job in self.jobs.values().filter(|j| j.state == JobState::Open) {
            consider(job.deadline_ms);
            if job.open_slots() > 0 {
                consider(job.announce_at_ms);
            }
            for l in job.leases.values().filter(|l| l.status == LeaseStatus::Active) {
                consider(l.deadline_ms);
            }
            let wait = self.cfg.round_start_wait_ms;
            if let Some(t) = job.training.as_ref().and_then(|t| t.next_deadline(wait)) {
                consider(t);
            }
        }
        next
    }

    /// Accepts a job from `requester` and emits the escrow reservation. The job is offered
    /// once the driver confirms the reservation. A training job is posted with
    /// [`RelayCore::post_training_job`].
    pub fn post_job(
        &mut self,
        now: Millis,
        requester: &str,
        spec: JobSpec,
    ) -> Result<JobId, PostError> {
        self.post(now, requester, spec, None)
    }

    /// Accepts a training job with its data: the digests of its chunks (one per participant
    /// seat, stored where participants can fetch them) and of its evaluation set (see
    /// `aimatrix_training::prepare_data`).
    pub fn post_training_job(
        &mut self,
        now: Millis,
        requester: &str,
        spec: JobSpec,
        data: TrainingData,
    ) -> Result<JobId, PostError> {
        self.post(now, requester, spec, Some(data))
    }

    fn post(
        &mut self,
        now: Millis,
        requester: &str,
        spec: JobSpec,
        data: Option<TrainingData>,
    ) -> Result<JobId, PostError> {
        spec.validate()?;
        let training = match (spec.kind == JobKind::Training, spec.training.clone(), data) {
            (true, Some(params), Some(data)) => {
                if data.chunks.len() != params.participants as usize {
                    return Err(PostError::TrainingData(format!(
                        "{} chunks for {} participant seats",
                        data.chunks.len(),
                        params.participants
                    )));
                }
                Some(TrainingState::new(params, data))
            }
            (true, _, None) => {
                return Err(PostError::TrainingData(
                    "a training job is posted with its chunks (post_training_job)".into(),
                ))
            }
            (false, _, Some(_)) => {
                return Err(PostError::TrainingData("only a training job has training data".into()))
            }
            _ => None,
        };
        if !spec.is_resolved() {
            return Err(PostError::Unresolved);
        }
        let spec_len =
            crate::codec::encode(&spec).map_err(|e| PostError::TooLarge(e.to_string()))?.len();
        if spec_len > crate::codec::MAX_FRAME_BYTES / 2 {
            return Err(PostError::TooLarge(format!("{spec_len} bytes encoded")));
        }
        self.posted += 1;
        let id = self.job_id_for(requester, now, self.posted);
        let escrow = spec.escrow().ok_or_else(|| PostError::TooLarge("escrow overflows".into()))?;
        let deadline_ms = now.saturating_add(secs(spec.deadline_s));
        let job = RelayJob {
            id,
            requester: requester.to_owned(),
            posted_at_ms: now,
            deadline_ms,
            state: JobState::Reserving,
            escrow,
            paid: 0,
            refunded: 0,
            leases: BTreeMap::new(),
            excluded: BTreeSet::new(),
            training,
            next_lease: 0,
            announce_at_ms: now,
            announce_round: 0,
            nominated: (0, Vec::new()),
            post_seq: self.posted,
            reserve_timeout_at_ms: deadline_ms.saturating_add(self.cfg.reserve_margin_ms),
            spec,
        };
        self.events.push_back(RelayEvent::Ledger(job.reserve_op()));
        self.jobs.insert(id, job);
        Ok(id)
    }

    /// A job's id: derived from this relay's key, the requester, the posting time and the count
    /// of jobs accepted so far (this one included).
    fn job_id_for(&self, requester: &str, posted_at_ms: Millis, post_seq: u64) -> JobId {
        JobId::from_digest(&Digest::of_parts(&[
            b"aimatrix/job",
            self.id().as_bytes(),
            requester.as_bytes(),
            &posted_at_ms.to_le_bytes(),
            &post_seq.to_le_bytes(),
        ]))
    }

    /// The ledger holds the job's escrow: offer it.
    pub fn reserve_confirmed(&mut self, now: Millis, job_id: JobId) -> Result<(), CommandError> {
        let job = self.job_in_state(job_id, &JobState::Reserving, "confirming the escrow")?;
        job.state = JobState::Open;
        self.events.push_back(RelayEvent::JobOpen { job_id });
        self.announce_due(now, job_id);
        Ok(())
    }

    /// The ledger refused the escrow (e.g. insufficient funds): the job is never offered.
    pub fn reserve_failed(
        &mut self,
        _now: Millis,
        job_id: JobId,
        reason: String,
    ) -> Result<(), CommandError> {
        let job = self.job_in_state(job_id, &JobState::Reserving, "refusing the escrow")?;
        job.state = JobState::Refused { reason: reason.clone() };
        self.events.push_back(RelayEvent::JobRefused { job_id, reason });
        Ok(())
    }

    /// The requester withdraws the job: leases are cancelled, unpaid escrow released.
    pub fn cancel_job(&mut self, now: Millis, job_id: JobId) -> Result<(), CommandError> {
        let job = self.jobs.get(&job_id).ok_or(CommandError::UnknownJob(job_id))?;
        if job.state != JobState::Open {
            return Err(CommandError::WrongState {
                job_id,
                state: format!("{:?}", job.state),
                what: "cancelling",
            });
        }
        self.fail_job(now, job_id, "cancelled by the requester".into());
        Ok(())
    }

    fn job_in_state(
        &mut self,
        job_id: JobId,
        state: &JobState,
        what: &'static str,
    ) -> Result<&mut RelayJob, CommandError> {
        let job = self.jobs.get_mut(&job_id).ok_or(CommandError::UnknownJob(job_id))?;
        if &job.state != state {
            return Err(CommandError::WrongState {
                job_id,
                state: format!("{:?}", job.state),
                what,
            });
        }
        Ok(job)
    }

    /// Bytes from the network: a gossip message (`from = None`) or a direct one from `from`.
    pub fn handle_message(&mut self, now: Millis, from: Option<NodeId>, bytes: &[u8]) {
        let (signer, msg) = match open(&mut self.verifier, now, bytes, &RELAY_ACCEPTS) {
            Ok(x) => x,
            Err(reason) => return self.reject(from, reason),
        };
        if let Some(sender) = from {
            if sender != signer && !matches!(msg, Message::Advert(_)) {
                return self.reject(from, RejectReason::SenderMismatch { signer, sender });
            }
        }
        match msg {
            Message::Advert(a) => {
                let newer = self.adverts.get(&signer).is_none_or(|(seq, _)| a.seq > *seq);
                if newer {
                    if !self.adverts.contains_key(&signer)
                        && self.adverts.len() >= self.cfg.max_adverts
                    {
                        // Forget the lowest advert seq: nodes start their seq from their clock, so that is
                        // roughly the node heard from longest ago.
                        let oldest =
                            self.adverts.iter().min_by_key(|(_, (seq, _))| *seq).map(|(id, _)| *id);
                        if let Some(oldest) = oldest {
                            self.adverts.remove(&oldest);
                        }
                    }
                    self.adverts.insert(signer, (a.seq, a.profile));
                }
            }
            Message::Claim(c) => self.on_claim(now, signer, c),
            Message::Progress(p) => self.on_progress(signer, p),
            Message::Result(r) => self.on_result(now, signer, r),
            other => self.reject(
                from,
                RejectReason::Refused(format!("a relay does not accept {}", other.domain())),
            ),
        }
    }

    fn reject(&mut self, from: Option<NodeId>, reason: RejectReason) {
        *self.rejects.entry(reason.label()).or_default() += 1;
        self.events.push_back(RelayEvent::Rejected { from, reason });
    }

    fn send(&mut self, now: Millis, to: NodeId, msg: &Message) {
        if let Err(e) = self.outbox.send(now, to, msg) {
            self.reject(None, RejectReason::Refused(format!("cannot send {}: {e}", msg.domain())));
        }
    }

    fn deny(&mut self, now: Millis, to: NodeId, job_id: JobId, reason: DenyReason) {
        // A claim for a job that is no longer open means the node holds stale offers: say
        // which other jobs were taken lately, so it does not claim each of them in turn.
        let taken = match reason {
            DenyReason::NotOpen | DenyReason::NoOpenSlot | DenyReason::UnknownJob => {
                let jobs = &self.jobs;
                let still_taken = |j: &JobId| jobs.get(j).is_none_or(|job| job.open_slots() == 0);
                self.taken.iter().copied().filter(|j| *j != job_id && still_taken(j)).collect()
            }
            _ => Vec::new(),
        };
        self.send(now, to, &Message::LeaseDenied(LeaseDenied { job_id, reason, taken }));
    }

    /// Remembers that `job_id` stopped taking claims, for the hints in denials.
    fn note_taken(&mut self, job_id: JobId) {
        if self.taken.contains(&job_id) {
            return;
        }
        if self.taken.len() >= TAKEN_HINT_MAX {
            self.taken.pop_front();
        }
        self.taken.push_back(job_id);
    }

    fn on_claim(&mut self, now: Millis, node: NodeId, claim: Claim) {
        let job_id = claim.job_id;
        let Some(job) = self.jobs.get(&job_id) else {
            return self.deny(now, node, job_id, DenyReason::UnknownJob);
        };
        if job.state != JobState::Open {
            return self.deny(now, node, job_id, DenyReason::NotOpen);
        }
        if job.excluded.contains(&node) {
            return self.deny(now, node, job_id, DenyReason::Excluded);
        }
        if let Some((_, profile)) = self.adverts.get(&node) {
            let why: Vec<Mismatch> = match matching::evaluate(&job.spec, profile) {
                Ok(_) => Vec::new(),
                // The node's own load is its decision; its advert may be stale.
                Err(why) => {
                    why.into_iter().filter(|m| !matches!(m, Mismatch::AtCapacity { .. })).collect()
                }
            };
            if !why.is_empty() {
                return self.deny(now, node, job_id, DenyReason::Mismatch(why));
            }
        }
        if job.training.is_some() {
            return self.on_training_claim(now, node, job_id);
        }
        if let Some(held) = job.leases.values().find(|l| l.node == node) {
            if held.status == LeaseStatus::Active {
                // The holder claims again: its lease was lost on the way (a relay restart, a
                // dropped connection). Send the same lease again rather than strand the job
                // until the lease deadline.
                let msg = Message::Lease(Lease {
                    job_id,
                    lease: held.lease,
                    node,
                    deadline_ms: held.deadline_ms,
                    spec: job.spec.clone(),
                    round: None,
                });
                return self.send(now, node, &msg);
            }
            return self.deny(now, node, job_id, DenyReason::AlreadyLeased);
        }
        if job.open_slots() == 0 {
            return self.deny(now, node, job_id, DenyReason::NoOpenSlot);
        }
        self.grant_lease(now, job_id, node, None);
    }

    fn grant_lease(&mut self, now: Millis, job_id: JobId, node: NodeId, round: Option<RoundLease>) {
        let grace = self.cfg.lease_grace_ms;
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let lease = job.next_lease;
        job.next_lease += 1;
        let span = match (&job.training, round) {
            (Some(t), Some(_)) => secs(t.params.round_deadline_s),
            _ => secs(job.spec.limits.timeout_s).saturating_add(grace),
        };
        let deadline_ms = now.saturating_add(span).min(job.deadline_ms);
        job.leases.insert(
            lease,
            LeaseRecord {
                lease,
                node,
                granted_at_ms: now,
                deadline_ms,
                round: round.map(|r| r.round),
                progress: 0,
                status: LeaseStatus::Active,
                paid: false,
                check: None,
            },
        );
        assert!(
            job.training.is_some() || job.active_leases() <= job.spec.replication as usize,
            "more active leases than the replication factor"
        );
        let full = job.training.is_none() && job.open_slots() == 0;
        let msg = Message::Lease(Lease {
            job_id,
            lease,
            node,
            deadline_ms,
            spec: job.spec.clone(),
            round,
        });
        self.events.push_back(RelayEvent::LeaseGranted { job_id, lease, node });
        self.send(now, node, &msg);
        if full {
            self.note_taken(job_id);
        }
    }

    fn on_progress(&mut self, node: NodeId, p: crate::messages::Progress) {
        let Some(l) = self.jobs.get_mut(&p.job_id).and_then(|j| j.leases.get_mut(&p.lease)) else {
            return self
                .reject(Some(node), RejectReason::Refused("progress for an unknown lease".into()));
        };
        if l.node != node || l.status != LeaseStatus::Active {
            return self
                .reject(Some(node), RejectReason::Refused("progress for a lease not held".into()));
        }
        l.progress = p.percent.min(100);
        self.events.push_back(RelayEvent::Progress {
            job_id: p.job_id,
            lease: p.lease,
            percent: l.progress,
        });
    }

    fn on_result(&mut self, now: Millis, node: NodeId, r: JobResult) {
        let (job_id, lease_no) = (r.job_id, r.lease);
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return self.reject(
                Some(node),
                RejectReason::Refused(format!("result for unknown job {job_id}")),
            );
        };
        let Some(lease) = job.leases.get_mut(&lease_no) else {
            return self.reject(
                Some(node),
                RejectReason::Refused(format!("result for unknown lease {lease_no}")),
            );
        };
        if lease.node != node {
            return self.reject(
                Some(node),
                RejectReason::Refused("result for a lease held by another node".into()),
            );
        }
        let round = lease.round;
        if lease.status != LeaseStatus::Active {
            let reason = match lease.status {
                LeaseStatus::Expired => "result arrived after the lease expired",
                LeaseStatus::Cancelled => "lease was cancelled before the result arrived",
                _ => {
                    return self
                        .reject(Some(node), RejectReason::Refused("duplicate result".into()))
                }
            };
            return self.receipt(
                now,
                job_id,
                lease_no,
                node,
                round,
                Verdict::Rejected { reason: reason.into() },
            );
        }
        if now >= lease.deadline_ms {
            lease.status = LeaseStatus::Expired;
            job.excluded.insert(node);
            self.events.push_back(RelayEvent::LeaseExpired { job_id, lease: lease_no, node });
            let reason = "result arrived after the lease deadline".to_owned();
            self.receipt(now, job_id, lease_no, node, round, Verdict::Rejected { reason });
            if round.is_some() {
                return self.after_training_result(now, job_id, node);
            }
            return self.after_slot_change(now, job_id);
        }
        self.events.push_back(RelayEvent::ResultReceived {
            job_id,
            lease: lease_no,
            node,
            outcome: r.outcome.clone(),
        });
        match r.outcome {
            Outcome::Succeeded { result_hash, outputs } => {
                lease.status = LeaseStatus::Returned(result_hash);
                lease.check = outputs
                    .iter()
                    .find(|o| round.is_some() && o.name == training::DELTA_DIGEST_FILE)
                    .map(|o| o.digest);
            }
            Outcome::Failed { reason } | Outcome::HandedBack { reason } => {
                lease.status = LeaseStatus::Failed(reason.clone());
                job.excluded.insert(node);
                let reason = format!("workload did not succeed: {reason}");
                self.receipt(now, job_id, lease_no, node, round, Verdict::Rejected { reason });
            }
        }
        if self.jobs.get(&job_id).is_some_and(|j| j.training.is_some()) {
            return self.after_training_result(now, job_id, node);
        }
        self.after_slot_change(now, job_id);
    }

    /// Settles the job if enough replicas agree, fails it if it cannot finish, or re-offers.
    fn after_slot_change(&mut self, now: Millis, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else { return };
        if job.state != JobState::Open || job.training.is_some() {
            return;
        }
        let replication = job.spec.replication as usize;
        let mut groups: BTreeMap<Digest, Vec<u32>> = BTreeMap::new();
        for l in job.leases.values() {
            if let LeaseStatus::Returned(h) = l.status {
                groups.entry(h).or_default().push(l.lease);
            }
        }
        if let Some((hash, members)) = groups.into_iter().find(|(_, m)| m.len() >= replication) {
            return self.complete_job(now, job_id, hash, &members[..replication]);
        }
        let remaining = job.lease_budget().saturating_sub(u64::from(job.next_lease));
        if remaining == 0 && job.active_leases() == 0 {
            let reason = if job.best_agreement() == 0 {
                format!("all {} attempts failed or expired", job.next_lease)
            } else {
                format!("replicas did not agree on a result after {} leases", job.next_lease)
            };
            return self.fail_job(now, job_id, reason);
        }
        self.announce_due(now, job_id);
    }

    fn complete_job(&mut self, now: Millis, job_id: JobId, hash: Digest, winners: &[u32]) {
        self.note_taken(job_id);
        let fee_bps = self.cfg.fee_bps;
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let mut receipts = Vec::new();
        let mut cancels = Vec::new();
        let mut ops = Vec::new();
        for l in job.leases.values_mut() {
            match &l.status {
                LeaseStatus::Returned(h) if winners.contains(&l.lease) => {
                    assert_eq!(*h, hash);
                    let id = TransferId::derive(job_id, "pay", &[l.node.as_bytes()]);
                    let (op, amount, spent) = pay_op(job_id, l.node, id, job.spec.reward, fee_bps);
                    ops.push(op);
                    job.paid += spent;
                    l.paid = true;
                    receipts.push((l.lease, l.node, Verdict::Paid { amount }));
                }
                LeaseStatus::Returned(_) => {
                    let reason =
                        "result disagrees with the result the replicas agreed on".to_owned();
                    receipts.push((l.lease, l.node, Verdict::Rejected { reason }));
                }
                LeaseStatus::Active => {
                    l.status = LeaseStatus::Cancelled;
                    cancels.push((l.lease, l.node));
                }
                _ => {}
            }
        }
        assert!(job.paid <= job.escrow, "paid more than the escrow");
        job.state = JobState::Completed { result_hash: hash };
        self.events.extend(ops.into_iter().map(RelayEvent::Ledger));
        for (lease, node, verdict) in receipts {
            self.receipt(now, job_id, lease, node, None, verdict);
        }
        for (lease, node) in cancels {
            let reason = "the job completed without this replica".to_owned();
            self.send(now, node, &Message::Cancel(Cancel { job_id, lease, reason }));
        }
        self.release_rest(job_id);
        self.events.push_back(RelayEvent::JobCompleted { job_id, result_hash: hash });
    }

    /// Ends an open job without a result: cancels active leases, rejects unpaid results,
    /// releases what was not paid.
    fn fail_job(&mut self, now: Millis, job_id: JobId, reason: String) {
        self.note_taken(job_id);
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        assert_eq!(job.state, JobState::Open);
        let current_round = job.training.as_ref().map(|t| t.round);
        let mut cancels = Vec::new();
        let mut receipts = Vec::new();
        for l in job.leases.values_mut() {
            match l.status {
                LeaseStatus::Active => {
                    l.status = LeaseStatus::Cancelled;
                    cancels.push((l.lease, l.node));
                }
                // Results not settled yet (for training: updates of the unfinished round) get a
                // receipt saying why they will not be paid.
                LeaseStatus::Returned(_)
                    if !l.paid && l.round.is_none_or(|r| Some(r) == current_round) =>
                {
                    receipts.push((l.lease, l.node, l.round));
                }
                _ => {}
            }
        }
        job.state = JobState::Failed { reason: reason.clone() };
        if let Some(t) = job.training.as_mut() {
            t.finish();
        }
        for (lease, node) in cancels {
            self.send(
                now,
                node,
                &Message::Cancel(Cancel { job_id, lease, reason: reason.clone() }),
            );
        }
        for (lease, node, round) in receipts {
            let reason = format!("job failed: {reason}");
            self.receipt(now, job_id, lease, node, round, Verdict::Rejected { reason });
        }
        self.release_rest(job_id);
        self.events.push_back(RelayEvent::JobFailed { job_id, reason });
    }

    fn release_rest(&mut self, job_id: JobId) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        let amount = job.escrow - job.paid;
        job.refunded = amount;
        self.events.push_back(RelayEvent::Ledger(LedgerOp::Release {
            id: TransferId::derive(job_id, "release", &[]),
            reserve_id: TransferId::derive(job_id, "reserve", &[]),
            job_id,
            amount,
        }));
    }

    fn receipt(
        &mut self,
        now: Millis,
        job_id: JobId,
        lease: u32,
        node: NodeId,
        round: Option<u32>,
        verdict: Verdict,
    ) {
        let receipt = Receipt { job_id, lease, node, round, verdict };
        self.send(now, node, &Message::Receipt(receipt.clone()));
        self.events.push_back(RelayEvent::Receipted(receipt));
    }

    /// A slot of `job_id` opened (posted, a lease failed or expired, a round needs seats):
    /// announce it now, to a targeted set of nodes again.
    fn announce_due(&mut self, now: Millis, job_id: JobId) {
        if let Some(job) = self.jobs.get_mut(&job_id) {
            if job.state == JobState::Open && job.open_slots() > 0 {
                job.announce_at_ms = job.announce_at_ms.min(now);
                job.announce_round = 0;
            }
        }
        self.announce(now);
    }

    /// Announces every open job whose announcement is due.
    fn announce(&mut self, now: Millis) {
        let interval = self.cfg.reannounce_interval_ms;
        let due: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Open && j.announce_at_ms <= now)
            .filter(|j| j.open_slots() > 0)
            .map(|j| j.id)
            .collect();
        if due.is_empty() {
            return;
        }
        let mut busy = self.busy_by_node(now);
        let mut offers = Vec::with_capacity(due.len());
        for job_id in due {
            let Some(job) = self.jobs.get(&job_id) else { continue };
            let open_slots = job.open_slots();
            let preferred = match targeted_count(open_slots, job.announce_round) {
                Some(count) => self.preferred_claimants(job, count, &mut busy),
                None => Vec::new(),
            };
            let wait = if preferred.is_empty() {
                interval
            } else {
                interval.min(self.cfg.targeted_wait_ms.max(1))
            };
            let Some(job) = self.jobs.get_mut(&job_id) else { continue };
            job.announce_at_ms = now.saturating_add(wait);
            job.announce_round = job.announce_round.saturating_add(1);
            job.nominated = (now, preferred.clone());
            let ttl = job.deadline_ms.saturating_sub(now).clamp(1, interval.saturating_mul(3));
            let offer = Offer {
                job_id,
                spec: job.spec.clone(),
                deadline_ms: job.deadline_ms,
                open_slots,
                preferred,
            };
            offers.push((offer, ttl));
        }
        for (offer, ttl) in offers {
            let msg = Message::Offer(offer);
            if let Err(e) = self.outbox.broadcast(now, Topic::Offers, &msg, ttl) {
                self.reject(None, RejectReason::Refused(format!("cannot announce offer: {e}")));
            }
        }
    }

    /// Slots each node is using or promised, as far as this relay knows: its active leases,
    /// plus the offers that named it within `targeted_wait_ms` and that it has not claimed yet
    /// (while they still have open slots).
    fn busy_by_node(&self, now: Millis) -> HashMap<NodeId, u32> {
        let hold = self.cfg.targeted_wait_ms;
        let mut busy: HashMap<NodeId, u32> = HashMap::new();
        for job in self.jobs.values().filter(|j| j.state == JobState::Open) {
            for l in job.leases.values().filter(|l| l.status == LeaseStatus::Active) {
                *busy.entry(l.node).or_default() += 1;
            }
            let (named_at, named) = &job.nominated;
            if named.is_empty() || now >= named_at.saturating_add(hold) || job.open_slots() == 0 {
                continue;
            }
            for node in named.iter().filter(|n| !job.leases.values().any(|l| l.node == **n)) {
                *busy.entry(*node).or_default() += 1;
            }
        }
        busy
    }

    /// Up to `count` indexed nodes that can serve `job` and have a free slot as far as this
    /// relay knows (its own active leases, and the claims it just asked for in `busy`), most
    /// free slots first, ties spread by [`claim_order_key`]. Each one chosen takes a slot in
    /// `busy`, so one announcement of many jobs spreads them over the nodes. Empty when no
    /// indexed node fits: the offer is then open to every node.
    fn preferred_claimants(
        &self,
        job: &RelayJob,
        count: usize,
        busy: &mut HashMap<NodeId, u32>,
    ) -> Vec<NodeId> {
        let mut candidates: Vec<(u32, u64, NodeId)> = self
            .adverts
            .iter()
            .filter(|(node, _)| !job.excluded.contains(node))
            .filter(|(node, _)| !job.leases.values().any(|l| l.node == **node))
            .filter_map(|(node, (_, profile))| {
                let max = profile.policy.max_concurrent_jobs;
                let free = max.saturating_sub(busy.get(node).copied().unwrap_or(0));
                (free > 0 && serves_ignoring_load(&job.spec, profile))
                    .then(|| (free, claim_order_key(node, &job.id), *node))
            })
            .collect();
        let count = count.min(candidates.len());
        if count == 0 {
            return Vec::new();
        }
        let by_preference = |a: &(u32, u64, NodeId), b: &(u32, u64, NodeId)| {
            b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
        };
        if count < candidates.len() {
            candidates.select_nth_unstable_by(count - 1, by_preference);
            candidates.truncate(count);
        }
        candidates.sort_unstable_by(by_preference);
        let chosen: Vec<NodeId> = candidates.into_iter().map(|(_, _, node)| node).collect();
        for node in &chosen {
            *busy.entry(*node).or_default() += 1;
        }
        chosen
    }

    /// Time passed: expires leases and jobs, closes training rounds, re-announces offers.
    pub fn handle_timeout(&mut self, now: Millis) {
        let open: Vec<JobId> =
            self.jobs.values().filter(|j| j.state == JobState::Open).map(|j| j.id).collect();
        for job_id in open {
            self.on_time(now, job_id);
        }
        self.announce(now);
    }

    /// Brings one open job up to `now`: fails it past its deadline, or expires its leases.
    fn on_time(&mut self, now: Millis, job_id: JobId) {
        let Some(job) = self.jobs.get(&job_id) else { return };
        if job.state != JobState::Open {
            return;
        }
        if now >= job.deadline_ms {
            self.fail_job(now, job_id, "the job's deadline passed".into());
        } else {
            self.expire_leases(now, job_id);
        }
    }

    fn expire_leases(&mut self, now: Millis, job_id: JobId) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        if job.training.is_some() {
            return self.training_timeout(now, job_id);
        }
        let mut expired = Vec::new();
        for l in job.leases.values_mut() {
            if l.status == LeaseStatus::Active && now >= l.deadline_ms {
                l.status = LeaseStatus::Expired;
                expired.push((l.lease, l.node));
            }
        }
        if expired.is_empty() {
            return;
        }
        for &(lease, node) in &expired {
            job.excluded.insert(node);
            self.events.push_back(RelayEvent::LeaseExpired { job_id, lease, node });
        }
        for (lease, node) in expired {
            let reason = "the lease deadline passed; a late result is not paid".to_owned();
            self.send(now, node, &Message::Cancel(Cancel { job_id, lease, reason }));
        }
        self.after_slot_change(now, job_id);
    }
}

/// Preferred claimants an announcement names per open slot, first time round.
const PREFERRED_PER_SLOT: usize = 2;
/// Announcements of a job that name preferred claimants (each twice as many as the one
/// before) before its offer is open to every node.
pub const TARGETED_ANNOUNCEMENTS: u32 = 3;

/// How many preferred claimants the `round`-th announcement of a job with `open_slots` names;
/// `None` when the offer is open to every node.
fn targeted_count(open_slots: u32, round: u32) -> Option<usize> {
    if round >= TARGETED_ANNOUNCEMENTS {
        return None;
    }
    let count = (open_slots as usize).saturating_mul(PREFERRED_PER_SLOT) << round;
    (count <= PREFERRED_CLAIMANTS_MAX).then_some(count)
}

/// Whether `profile` can serve `spec` apart from its advertised load (which is stale by the
/// time the relay reads it; the relay counts its own leases instead).
fn serves_ignoring_load(spec: &JobSpec, profile: &CapabilityProfile) -> bool {
    match matching::evaluate(spec, profile) {
        Ok(_) => true,
        Err(why) => why.iter().all(|m| matches!(m, Mismatch::AtCapacity { .. })),
    }
}

/// The ledger instruction paying `node` one `reward` from `job_id`'s escrow under transfer
/// `id`: the amount the node gets, and what leaves the escrow (amount and relay fee).
fn pay_op(
    job_id: JobId,
    node: NodeId,
    id: TransferId,
    reward: u64,
    fee_bps: u16,
) -> (LedgerOp, u64, u64) {
    let (amount, fee) = split_fee(reward, fee_bps);
    let reserve_id = TransferId::derive(job_id, "reserve", &[]);
    (LedgerOp::Pay { id, reserve_id, job_id, node, amount, fee }, amount, amount + fee)
}

/// Splits a reward into the node's amount and the relay fee.
pub fn split_fee(reward: u64, fee_bps: u16) -> (u64, u64) {
    let fee = (u128::from(reward) * u128::from(fee_bps.min(10_000)) / 10_000) as u64;
    (reward - fee, fee)
}
