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
//!
//! The core is one struct whose methods are split by what they decide: `jobs` (the job record
//! and the post, reserve and cancel commands), `claims` (claims, leases, progress, results),
//! `settlement` (agreement, payment, refunds, the end of a job), `announce` (when an offer goes
//! out and whom it names first), [`training`] (rounds) and `restore` (jobs after a restart).

mod announce;
pub mod books;
mod claims;
mod jobs;
mod restore;
mod settlement;
pub mod training;

pub use announce::TARGETED_ANNOUNCEMENTS;
pub use claims::UploadRefusal;
pub use jobs::{JobState, LeaseRecord, LeaseStatus, RelayJob};
use settlement::pay_op;
pub use settlement::split_fee;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::capability::CapabilityProfile;
use crate::envelope::{Domain, Verifier, VerifyConfig, VerifyError};
use crate::hash::Digest;
use crate::identity::{Keypair, NodeId};
use crate::ledger::LedgerOp;
use crate::messages::{
    open, JobId, Message, Outcome, Receipt, Refusal, RejectReason, Roster, RosterEntry,
    TAKEN_HINT_MAX,
};
use crate::outbox::{Outbox, Topic, Transmit};
use crate::time::Millis;

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
        /// The updates received in time: node, lease, result hash (the update itself is the
        /// result's `update.bin` output).
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
    /// The relays this one peers with and vouches for; published while not empty.
    /// Peers with a connection to this relay, as its driver reports them: preferred as
    /// claimants (an offer reaches them first, and their claim needs no new connection).
    connected: HashSet<NodeId>,
    roster: Vec<RosterEntry>,
    roster_seq: u64,
    /// When the roster is published next.
    roster_at_ms: Option<Millis>,
}

/// How often a relay publishes its roster again (it lives twice as long).
pub const ROSTER_REPUBLISH_MS: Millis = 60_000;

/// How soon after a peer connects the roster is published again (gossip needs the peer's
/// subscriptions first; several peers connecting at once share one publication).
pub const ROSTER_AFTER_CONNECT_MS: Millis = 2_000;

const RELAY_ACCEPTS: [Domain; 5] =
    [Domain::Advert, Domain::Claim, Domain::Progress, Domain::Result, Domain::Roster];

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
            connected: HashSet::new(),
            adverts: HashMap::new(),
            events: VecDeque::new(),
            rejects: RejectCounts::new(),
            posted: 0,
            taken: VecDeque::with_capacity(TAKEN_HINT_MAX),
            roster: Vec::new(),
            roster_seq: 0,
            roster_at_ms: None,
        }
    }

    /// Sets the relays this one peers with (`serve --peer`): they are published, signed, on
    /// the relays topic now and every [`ROSTER_REPUBLISH_MS`], so the nodes that trust this
    /// relay work for them too. An empty list publishes nothing. Refused when out of bounds.
    pub fn set_roster(&mut self, now: Millis, relays: Vec<RosterEntry>) -> Result<(), String> {
        Roster::check_entries(&relays)?;
        self.roster = relays;
        self.roster_at_ms = (!self.roster.is_empty()).then_some(now);
        self.publish_roster(now);
        Ok(())
    }

    /// `peer` connected: it is preferred as a claimant while connected, and the roster goes
    /// out again soon, so a node that just joined learns which relays it may work for without
    /// waiting for the next [`ROSTER_REPUBLISH_MS`].
    pub fn peer_connected(&mut self, now: Millis, peer: NodeId) {
        self.connected.insert(peer);
        if let Some(at) = self.roster_at_ms.as_mut() {
            *at = (*at).min(now.saturating_add(ROSTER_AFTER_CONNECT_MS));
        }
    }

    /// The last connection to `peer` closed.
    pub fn peer_disconnected(&mut self, peer: &NodeId) {
        self.connected.remove(peer);
    }

    /// The relays this one vouches for.
    pub fn roster(&self) -> &[RosterEntry] {
        &self.roster
    }

    fn publish_roster(&mut self, now: Millis) {
        if self.roster_at_ms.is_none_or(|at| at > now) {
            return;
        }
        // A restarted relay starts from its clock, so its rosters supersede the old ones.
        self.roster_seq = self.roster_seq.saturating_add(1).max(now);
        let msg = Message::Roster(Roster { seq: self.roster_seq, relays: self.roster.clone() });
        if let Err(e) = self.outbox.broadcast(now, Topic::Relays, &msg, 2 * ROSTER_REPUBLISH_MS) {
            // Checked in `set_roster`: 64 relays of 8 addresses of 256 bytes fit a frame.
            panic!("a relay's roster always fits a frame: {e}");
        }
        self.roster_at_ms = Some(now.saturating_add(ROSTER_REPUBLISH_MS));
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
        if let Some(t) = self.roster_at_ms {
            consider(t);
        }
        next
    }

    /// Bytes from the network: a gossip message (`from = None`) or a direct one from `from`.
    pub fn handle_message(&mut self, now: Millis, from: Option<NodeId>, bytes: &[u8]) {
        let (signer, msg) =
            match open(&mut self.verifier, now, bytes, &RELAY_ACCEPTS) {
                Ok(x) => x,
                // Peered relays hear each other's offers on gossip: they are for nodes, not a
                // refusal (and cost no signature check: the domain is checked first).
                Err(RejectReason::Verify(VerifyError::WrongDomain {
                    got: Domain::Offer, ..
                })) if from.is_none() => return,
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
            // Other relays' rosters are for nodes; a relay peers with whom it is told to.
            Message::Roster(_) => {}
            other => {
                let why = Refusal::NotAccepted { receiver: "relay", domain: other.domain() };
                self.reject(from, RejectReason::Refused(why));
            }
        }
    }

    fn reject(&mut self, from: Option<NodeId>, reason: RejectReason) {
        *self.rejects.entry(reason.label()).or_default() += 1;
        self.events.push_back(RelayEvent::Rejected { from, reason });
    }

    fn send(&mut self, now: Millis, to: NodeId, msg: &Message) {
        if let Err(e) = self.outbox.send(now, to, msg) {
            // Leases carry a spec of at most half a frame (checked at post); the other
            // messages a relay sends are small and bounded.
            panic!("a relay's {} always fits a frame: {e}", msg.domain());
        }
    }

    /// Time passed: expires leases and jobs, closes training rounds, re-announces offers.
    pub fn handle_timeout(&mut self, now: Millis) {
        let open: Vec<JobId> =
            self.jobs.values().filter(|j| j.state == JobState::Open).map(|j| j.id).collect();
        for job_id in open {
            self.on_time(now, job_id);
        }
        self.announce(now);
        self.publish_roster(now);
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
}
