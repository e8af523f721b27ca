//! `NodeCore`: a compute node's side of the job lifecycle, as a sans-IO state machine.
//!
//! The node advertises its capability profile, hears offers from the relays it trusts and
//! matches each against its profile and policy, claims the ones it can serve (automatically,
//! or when its owner accepts), runs leased jobs through its driver (which owns the sandbox),
//! reports progress, returns results and collects receipts.
//!
//! Inputs: [`NodeCore::handle_message`], [`NodeCore::handle_timeout`] and the commands
//! ([`NodeCore::accept`], [`NodeCore::progress`], [`NodeCore::finish`], ...). Outputs:
//! [`NodeCore::poll_transmit`], [`NodeCore::poll_event`], [`NodeCore::poll_timeout`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::capability::CapabilityProfile;
use crate::envelope::{Domain, Verifier, VerifyConfig};
use crate::identity::{Keypair, NodeId};
use crate::job::JobSpec;
use crate::matching::{self, MatchResult, Mismatch};
use crate::messages::{
    open_shared, Advert, Claim, DenyReason, JobId, JobResult, Lease, Message, Offer, Opened,
    Outcome, Progress, Receipt, Refusal, RejectReason, Roster, RosterEntry, Usage, Verdict,
    PREFERRED_CLAIMANTS_MAX, TAKEN_HINT_MAX,
};
use crate::outbox::{Outbox, Topic, Transmit};
use crate::time::Millis;

mod offer_table;

use offer_table::{MatchedFor, OfferTable};

/// Whether the node claims matching offers by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AcceptMode {
    /// Claim every matching offer while slots are free.
    Auto,
    /// List offers; claim only on [`NodeCore::accept`].
    Manual,
}

/// Node tunables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Auto or manual claiming.
    pub accept: AcceptMode,
    /// The relays the node was given: it acts on their offers and leases, and (unless
    /// `pin_relays`) on those of the relays their rosters vouch for. Empty trusts any signer.
    pub trusted_relays: Vec<NodeId>,
    /// Work only for `trusted_relays`: rosters extend nothing.
    pub pin_relays: bool,
    /// Lifetime of the node's direct messages.
    pub message_ttl_ms: u64,
    /// How often the node re-publishes its advert (adverts live twice as long).
    pub advert_interval_ms: u64,
    /// A claim with no lease or denial after this long is forgotten.
    pub claim_timeout_ms: u64,
    /// Most offers remembered.
    pub max_known_offers: usize,
    /// Envelope verification limits.
    pub verify: VerifyConfig,
    /// A result with no receipt after this long is sent again, then again after twice as long
    /// each time (at most [`RECEIPT_ASK_EVERY_MAX_MS`] apart, [`RECEIPT_ASKS_MAX`] times at
    /// most), until its receipt comes: the
    /// relay answers a result it already settled with the same verdict, so a receipt lost in
    /// transit or cut by a relay crash is recovered (issue 22).
    pub receipt_ask_after_ms: u64,
}

/// Longest wait between two asks for one receipt.
pub const RECEIPT_ASK_EVERY_MAX_MS: u64 = 300_000;

/// Asks for one receipt at most (with the default delays, over about an hour and a half); the
/// result is still remembered afterwards, and a receipt that comes later is taken. A relay
/// that cannot answer (it forgot the job) is not asked forever.
pub const RECEIPT_ASKS_MAX: u32 = 20;

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            accept: AcceptMode::Auto,
            trusted_relays: Vec::new(),
            pin_relays: false,
            message_ttl_ms: 120_000,
            advert_interval_ms: 300_000,
            claim_timeout_ms: 30_000,
            max_known_offers: 1024,
            verify: VerifyConfig::default(),
            receipt_ask_after_ms: 30_000,
        }
    }
}

/// An offer the node has heard, with its verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct KnownOffer {
    /// The relay that signed it.
    pub relay: NodeId,
    /// The offer, shared with every other holder of the same decoded offer (see
    /// [`OfferMemo`](crate::messages::OfferMemo)); changed copy-on-write.
    pub offer: Arc<Offer>,
    /// Last heard.
    pub seen_at_ms: Millis,
    /// Match against the node's profile when last heard (load included).
    pub matched: MatchResult,
    /// When the node claimed it, if it did and no answer came yet.
    pub claimed_at_ms: Option<Millis>,
    /// The relay refused this node for good (excluded, already leased, profile mismatch).
    pub refused: Option<DenyReason>,
    /// The offer names this node as a preferred claimant, or names nobody.
    pub open_to_me: bool,
}

/// A lease the node holds.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldLease {
    /// The granting relay.
    pub relay: NodeId,
    /// The lease.
    pub lease: Lease,
    /// When it arrived.
    pub started_at_ms: Millis,
    /// Last progress sent.
    pub progress: u8,
}

/// Something the node driver must act on or record.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeEvent {
    /// An offer was heard; `matched` says whether the node can serve it and, if not, why.
    OfferSeen {
        /// The job.
        job_id: JobId,
        /// Match verdict.
        matched: MatchResult,
    },
    /// The node claimed a job.
    Claimed {
        /// The job.
        job_id: JobId,
    },
    /// The relay refused a claim.
    ClaimDenied {
        /// The job.
        job_id: JobId,
        /// Why.
        reason: DenyReason,
    },
    /// Run this lease in the sandbox, then call [`NodeCore::finish`].
    RunJob {
        /// The granting relay.
        relay: NodeId,
        /// The lease (spec, deadline, training round).
        lease: Box<Lease>,
    },
    /// Stop this lease; its result will not count.
    CancelJob {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
        /// Why.
        reason: String,
    },
    /// A receipt arrived; keep it.
    ReceiptReceived {
        /// The relay.
        relay: NodeId,
        /// The receipt.
        receipt: Receipt,
    },
    /// Received bytes were not acted on.
    Rejected {
        /// The transport peer, if direct.
        from: Option<NodeId>,
        /// Why.
        reason: RejectReason,
    },
    /// The relays the node works for beyond those it was given changed (a given relay's
    /// roster): every relay vouched for now, with the addresses to dial it at.
    RelaysChanged {
        /// The vouched relays (not the given ones), each once.
        vouched: Vec<RosterEntry>,
    },
}

/// Why the node works for a relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayTrust {
    /// It was given (`--relay`, node.toml).
    Given,
    /// A given relay's roster vouches for it.
    Vouched {
        /// The given relay whose roster lists it.
        by: NodeId,
        /// Where to dial it.
        addrs: Vec<String>,
    },
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeCommandError {
    /// No such offer (never heard, expired, or forgotten).
    #[error("no open offer {0}; run `aimatrix-node compute available` to list them")]
    UnknownOffer(JobId),
    /// The node cannot serve it.
    #[error("this node cannot serve job {job_id}: {}", join(.reasons))]
    CannotServe {
        /// The job.
        job_id: JobId,
        /// Every reason.
        reasons: Vec<Mismatch>,
    },
    /// Already claimed or leased.
    #[error("job {0} is already claimed or running on this node")]
    AlreadyClaimed(JobId),
    /// The relay already refused this node for the job.
    #[error("the relay refused this node for job {job_id}: {reason}")]
    RelayRefused {
        /// The job.
        job_id: JobId,
        /// The relay's reason.
        reason: String,
    },
    /// The node is shutting down.
    #[error("the node is shutting down and claims no new jobs")]
    Draining,
    /// No such lease.
    #[error("no lease {lease} of job {job_id} is held")]
    UnknownLease {
        /// The job.
        job_id: JobId,
        /// The lease.
        lease: u32,
    },
}

fn join(reasons: &[Mismatch]) -> String {
    reasons.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

const NODE_ACCEPTS: [Domain; 6] = [
    Domain::Offer,
    Domain::Lease,
    Domain::LeaseDenied,
    Domain::Receipt,
    Domain::Cancel,
    Domain::Roster,
];

/// Most training jobs remembered as joined (their later round leases need no new claim).
const MAX_JOINED_TRAINING: usize = 256;

/// Most results remembered while their receipts are awaited.
const MAX_AWAITING_RECEIPTS: usize = 4096;

/// A result sent whose receipt has not come yet.
#[derive(Debug)]
struct AwaitedReceipt {
    relay: NodeId,
    /// The result as sent, sent again (freshly sealed) at `ask_at_ms`.
    result: JobResult,
    ask_at_ms: Millis,
    /// How many times it was sent again.
    asked: u32,
}

impl AwaitedReceipt {
    fn is_for(&self, job_id: JobId, lease: u32, relay: NodeId) -> bool {
        self.result.job_id == job_id && self.result.lease == lease && self.relay == relay
    }
}

/// The node's state machine.
#[derive(Debug)]
pub struct NodeCore {
    cfg: NodeConfig,
    outbox: Outbox,
    verifier: Verifier,
    /// The hardware and policy profile; `load.running_jobs` is kept current by
    /// [`NodeCore::loaded_profile`] before every use.
    profile: CapabilityProfile,
    /// Bumped whenever the profile changes (other than its load), so a match verdict records
    /// what it was evaluated against.
    profile_generation: u64,
    advert_seq: u64,
    next_advert_ms: Millis,
    offers: OfferTable,
    leases: BTreeMap<(JobId, u32), HeldLease>,
    joined_training: VecDeque<(JobId, NodeId, JobSpec)>,
    awaiting_receipt: VecDeque<AwaitedReceipt>,
    /// The latest roster of each given relay.
    rosters: BTreeMap<NodeId, Roster>,
    events: VecDeque<NodeEvent>,
    rejects: BTreeMap<&'static str, u64>,
    earned: u64,
    draining: bool,
}

impl NodeCore {
    /// A node signing with `key`, advertising `profile`; `nonce_seed` must be fresh randomness
    /// at every start. The first advert goes out on the first [`NodeCore::handle_timeout`].
    pub fn new(key: Keypair, cfg: NodeConfig, profile: CapabilityProfile, nonce_seed: u64) -> Self {
        let offers = OfferTable::new(key.public());
        Self {
            outbox: Outbox::new(key, nonce_seed, cfg.message_ttl_ms),
            verifier: Verifier::new(cfg.verify),
            cfg,
            profile,
            profile_generation: 0,
            advert_seq: 0,
            next_advert_ms: 0,
            offers,
            leases: BTreeMap::new(),
            joined_training: VecDeque::new(),
            awaiting_receipt: VecDeque::new(),
            rosters: BTreeMap::new(),
            events: VecDeque::new(),
            rejects: BTreeMap::new(),
            earned: 0,
            draining: false,
        }
    }

    /// The node's identity.
    pub fn id(&self) -> NodeId {
        self.outbox.id()
    }

    /// The configuration the node was built with.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The profile as advertised and matched: hardware and policy, with the current load.
    pub fn profile(&self) -> CapabilityProfile {
        let mut p = self.profile.clone();
        p.load.running_jobs = self.slots_in_use();
        p
    }

    /// The profile with its current load, without a copy, and what a match verdict against
    /// it is evaluated against.
    fn loaded_profile(&mut self) -> (&CapabilityProfile, MatchedFor) {
        let running = self.slots_in_use();
        self.profile.load.running_jobs = running;
        (&self.profile, (self.profile_generation, running))
    }

    fn slots_in_use(&self) -> u32 {
        (self.leases.len() + self.offers.claims_in_flight()) as u32
    }

    /// Offers heard and not expired, with their match verdicts.
    pub fn offers(&self) -> impl Iterator<Item = &KnownOffer> {
        self.offers.values()
    }

    /// Leases held now.
    pub fn leases(&self) -> impl Iterator<Item = &HeldLease> {
        self.leases.values()
    }

    /// Credits earned from receipts since start.
    pub fn earned(&self) -> u64 {
        self.earned
    }

    /// Rejected messages by reason.
    pub fn reject_counts(&self) -> &BTreeMap<&'static str, u64> {
        &self.rejects
    }

    /// Whether the node stopped claiming.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.outbox.pop()
    }

    /// Next event for the driver.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// When [`NodeCore::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let offers = self.offers.next_due(self.cfg.claim_timeout_ms);
        let advert = (!self.draining).then_some(self.next_advert_ms);
        offers.into_iter().chain(advert).chain(self.next_receipt_ask()).min()
    }

    /// When the next result without a receipt is sent again.
    fn next_receipt_ask(&self) -> Option<Millis> {
        self.awaiting_receipt
            .iter()
            .filter(|a| a.asked < RECEIPT_ASKS_MAX)
            .map(|a| a.ask_at_ms)
            .min()
    }

    /// When [`NodeCore::handle_timeout`] must next be called for the node to act (advertise,
    /// forget a stale claim, claim again): [`NodeCore::poll_timeout`] without the deadlines of
    /// offers the node has not claimed. Expiring such an offer only forgets it, and every input
    /// forgets the offers past their deadline before it is handled, so a driver that sleeps
    /// through those deadlines sees the node send and decide exactly the same; only
    /// [`NodeCore::offers`] lists the expired offers until the next input. The simulator wakes
    /// its nodes here (half of a run's events were these expiries); the node binary, which
    /// lists offers to its owner, wakes at [`NodeCore::poll_timeout`].
    pub fn poll_action_timeout(&self) -> Option<Millis> {
        let offers = self.offers.next_slot_due(self.cfg.claim_timeout_ms);
        let advert = (!self.draining).then_some(self.next_advert_ms);
        offers.into_iter().chain(advert).chain(self.next_receipt_ask()).min()
    }

    /// Replaces the hardware/policy profile (load is computed) and re-advertises.
    pub fn set_profile(&mut self, now: Millis, mut profile: CapabilityProfile) {
        profile.load.running_jobs = self.profile.load.running_jobs;
        if profile != self.profile {
            self.profile = profile;
            self.profile_generation += 1;
            self.next_advert_ms = now;
            self.advertise_if_due(now);
        }
    }

    /// Stops claiming new jobs; running leases continue until finished or handed back.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Time passed: advertises, forgets stale claims and expired offers, claims more work.
    pub fn handle_timeout(&mut self, now: Millis) {
        self.advertise_if_due(now);
        self.offers.expire(now);
        self.offers.time_out_claims(now, self.cfg.claim_timeout_ms);
        self.claim_more(now);
        self.ask_for_receipts(now);
    }

    /// Sends again every result whose receipt is due, doubling the wait for the next ask.
    fn ask_for_receipts(&mut self, now: Millis) {
        let after = self.cfg.receipt_ask_after_ms;
        for i in 0..self.awaiting_receipt.len() {
            let awaited = &mut self.awaiting_receipt[i];
            if awaited.ask_at_ms > now || awaited.asked >= RECEIPT_ASKS_MAX {
                continue;
            }
            awaited.asked = awaited.asked.saturating_add(1);
            let wait = after.saturating_mul(1u64 << awaited.asked.min(16));
            awaited.ask_at_ms = now.saturating_add(wait.min(RECEIPT_ASK_EVERY_MAX_MS));
            let (relay, msg) = (awaited.relay, Message::Result(awaited.result.clone()));
            if let Err(e) = self.outbox.send(now, relay, &msg) {
                panic!("a result that was sent once always fits a frame: {e}");
            }
        }
    }

    fn advertise_if_due(&mut self, now: Millis) {
        if self.draining || now < self.next_advert_ms {
            return;
        }
        // A restarted node starts from its clock, so its adverts supersede the old ones.
        self.advert_seq = self.advert_seq.saturating_add(1).max(now);
        self.next_advert_ms = now.saturating_add(self.cfg.advert_interval_ms);
        let msg = Message::Advert(Advert { seq: self.advert_seq, profile: self.profile() });
        let ttl = self.cfg.advert_interval_ms.saturating_mul(2);
        if let Err(e) = self.outbox.broadcast(now, Topic::Adverts, &msg, ttl) {
            // The profile is the node's own and small; it always fits a frame.
            panic!("the node cannot encode its own advert: {e}");
        }
    }

    /// Whether the node acts on `relay`'s messages: a given relay, one a given relay's roster
    /// vouches for (unless the policy pins the list), or one the node still holds a lease
    /// from or awaits a receipt from (a relay dropped from a roster is owed its results).
    fn trusts(&self, relay: &NodeId) -> bool {
        self.cfg.trusted_relays.is_empty()
            || self.cfg.trusted_relays.contains(relay)
            || (!self.cfg.pin_relays && self.vouched_by(relay).is_some())
            || self.leases.values().any(|held| held.relay == *relay)
            || self.awaiting_receipt.iter().any(|awaited| awaited.relay == *relay)
    }

    /// The given relay whose roster lists `relay`, and the entry.
    fn vouched_by(&self, relay: &NodeId) -> Option<(NodeId, &RosterEntry)> {
        self.rosters.iter().find_map(|(by, roster)| {
            roster.relays.iter().find(|e| e.relay == *relay).map(|entry| (*by, entry))
        })
    }

    /// Every relay the node works for and why: the given ones, then (unless pinned) those
    /// their rosters vouch for.
    pub fn relays(&self) -> Vec<(NodeId, RelayTrust)> {
        let mut out: Vec<(NodeId, RelayTrust)> =
            self.cfg.trusted_relays.iter().map(|r| (*r, RelayTrust::Given)).collect();
        if self.cfg.pin_relays {
            return out;
        }
        for (by, roster) in &self.rosters {
            for entry in &roster.relays {
                if out.iter().all(|(known, _)| *known != entry.relay) && entry.relay != self.id() {
                    let trust = RelayTrust::Vouched { by: *by, addrs: entry.addrs.clone() };
                    out.push((entry.relay, trust));
                }
            }
        }
        out
    }

    /// A roster from `signer`: kept if `signer` is a given relay and it is newer than the one
    /// held; rosters of vouched relays extend nothing (trust goes one step from what the
    /// owner gave).
    fn on_roster(&mut self, from: Option<NodeId>, signer: NodeId, roster: Roster) {
        if !self.cfg.trusted_relays.contains(&signer) || self.cfg.pin_relays {
            return;
        }
        if let Err(why) = roster.check() {
            return self.reject(from, RejectReason::Refused(Refusal::BadRoster { signer, why }));
        }
        if self.rosters.get(&signer).is_some_and(|held| held.seq >= roster.seq) {
            return;
        }
        let before: Vec<(NodeId, RelayTrust)> = self.relays();
        self.rosters.insert(signer, roster);
        let after = self.relays();
        if after != before {
            let vouched = after
                .into_iter()
                .filter_map(|(relay, trust)| match trust {
                    RelayTrust::Vouched { addrs, .. } => Some(RosterEntry { relay, addrs }),
                    RelayTrust::Given => None,
                })
                .collect();
            self.events.push_back(NodeEvent::RelaysChanged { vouched });
        }
    }

    fn reject(&mut self, from: Option<NodeId>, reason: RejectReason) {
        *self.rejects.entry(reason.label()).or_default() += 1;
        self.events.push_back(NodeEvent::Rejected { from, reason });
    }

    /// Bytes from the network: a gossip message (`from = None`) or a direct one from `from`.
    pub fn handle_message(&mut self, now: Millis, from: Option<NodeId>, bytes: &[u8]) {
        // A driver may have slept through deadlines (see `poll_action_timeout`).
        self.offers.expire(now);
        let (signer, msg) = match open_shared(&mut self.verifier, now, bytes, &NODE_ACCEPTS) {
            Ok(x) => x,
            Err(reason) => return self.reject(from, reason),
        };
        if let Some(sender) = from {
            if sender != signer && !matches!(msg, Opened::Offer(_)) {
                return self.reject(from, RejectReason::SenderMismatch { signer, sender });
            }
        }
        if let Opened::Other(Message::Roster(roster)) = msg {
            // Every relay publishes one; only a given relay's counts (`on_roster`), and the
            // others are normal traffic, not a refusal.
            return self.on_roster(from, signer, roster);
        }
        if !self.trusts(&signer) {
            let why = Refusal::UntrustedRelay { domain: msg.domain(), signer };
            return self.reject(from, RejectReason::Refused(why));
        }
        let msg = match msg {
            Opened::Offer(offer) => return self.on_offer(now, signer, offer),
            Opened::Other(msg) => msg,
        };
        match msg {
            Message::Lease(lease) => self.on_lease(now, signer, lease),
            Message::LeaseDenied(d) => {
                if d.taken.len() > TAKEN_HINT_MAX {
                    let why =
                        Refusal::OversizedDenial { count: d.taken.len(), max: TAKEN_HINT_MAX };
                    return self.reject(from, RejectReason::Refused(why));
                }
                // Hints apply only to offers from the same relay, like the denial itself.
                for job_id in &d.taken {
                    if self.offers.get(job_id).is_some_and(|o| o.relay == signer) {
                        self.offers.update(job_id, close_slots);
                    }
                }
                if self.offers.get(&d.job_id).is_none_or(|o| o.relay != signer) {
                    let why = Refusal::NotOffered { domain: Domain::LeaseDenied, job_id: d.job_id };
                    return self.reject(from, RejectReason::Refused(why));
                }
                match d.reason {
                    DenyReason::NotOpen | DenyReason::UnknownJob => {
                        self.offers.remove(&d.job_id);
                    }
                    DenyReason::NoOpenSlot
                    | DenyReason::AlreadyLeased
                    | DenyReason::Excluded
                    | DenyReason::Mismatch(_) => {
                        let refused =
                            (d.reason != DenyReason::NoOpenSlot).then(|| d.reason.clone());
                        self.offers.update(&d.job_id, |o| {
                            o.claimed_at_ms = None;
                            // No slot now: wait for the next announcement before claiming again.
                            close_slots(o);
                            if refused.is_some() {
                                o.refused = refused;
                            }
                        });
                    }
                }
                self.events
                    .push_back(NodeEvent::ClaimDenied { job_id: d.job_id, reason: d.reason });
                self.claim_more(now);
            }
            Message::Receipt(r) => {
                self.on_receipt(signer, r);
                self.claim_more(now);
            }
            Message::Cancel(c) => {
                let key = (c.job_id, c.lease);
                if self.leases.get(&key).is_some_and(|h| h.relay != signer) {
                    let why = Refusal::NotOffered { domain: Domain::Cancel, job_id: c.job_id };
                    return self.reject(from, RejectReason::Refused(why));
                }
                if self.leases.remove(&key).is_some() {
                    self.events.push_back(NodeEvent::CancelJob {
                        job_id: c.job_id,
                        lease: c.lease,
                        reason: c.reason,
                    });
                    self.claim_more(now);
                }
            }
            other => {
                let why = Refusal::NotAccepted { receiver: "node", domain: other.domain() };
                self.reject(from, RejectReason::Refused(why));
            }
        }
    }

    fn on_offer(&mut self, now: Millis, relay: NodeId, offer: Arc<Offer>) {
        let job_id = offer.job_id;
        if let Err(e) = offer.spec.validate() {
            let problem = e.errors.first().map_or(String::new(), ToString::to_string);
            return self
                .reject(None, RejectReason::Refused(Refusal::InvalidSpec { job_id, problem }));
        }
        if !offer.spec.is_resolved() {
            return self.reject(None, RejectReason::Refused(Refusal::UnresolvedContent { job_id }));
        }
        if offer.preferred.len() > PREFERRED_CLAIMANTS_MAX {
            let why = Refusal::TooManyPreferred {
                job_id,
                count: offer.preferred.len(),
                max: PREFERRED_CLAIMANTS_MAX,
            };
            return self.reject(None, RejectReason::Refused(why));
        }
        if self.offers.get(&job_id).is_some_and(|o| o.relay != relay) {
            return self.reject(None, RejectReason::Refused(Refusal::SecondRelay { job_id }));
        }
        let (profile, matched_for) = self.loaded_profile();
        let matched = matching::evaluate(&offer.spec, profile);
        let previous = self.offers.get(&job_id);
        let claimed_at_ms = previous.and_then(|o| o.claimed_at_ms);
        let refused = previous.and_then(|o| o.refused.clone());
        if !self.offers.contains(&job_id) && self.offers.len() >= self.cfg.max_known_offers {
            // Never an offer with a claim in flight (its lease would then be refused as
            // unknown and left to expire); stale offers (no open slot) before live ones, then
            // the one closest to its deadline.
            let victim = self
                .offers
                .values()
                .filter(|o| o.claimed_at_ms.is_none())
                .min_by_key(|o| (o.offer.open_slots > 0, o.offer.deadline_ms, o.seen_at_ms))
                .map(|o| o.offer.job_id);
            if let Some(victim) = victim {
                self.offers.remove(&victim);
            }
        }
        self.events.push_back(NodeEvent::OfferSeen { job_id, matched: matched.clone() });
        self.offers.insert(
            KnownOffer {
                relay,
                open_to_me: offer.preferred.is_empty() || offer.preferred.contains(&self.id()),
                offer,
                seen_at_ms: now,
                matched,
                claimed_at_ms,
                refused,
            },
            Some(matched_for),
        );
        self.claim_more(now);
    }

    /// Auto mode: claims matching offers while slots are free: offers that name this node (or
    /// nobody) as a preferred claimant, highest reward first, then in this node's own order
    /// ([`claim_order_key`](crate::messages::claim_order_key)) so that nodes hearing the same
    /// offers try different jobs first. The table keeps the claimable offers in that order.
    fn claim_more(&mut self, now: Millis) {
        if self.cfg.accept != AcceptMode::Auto || self.draining {
            return;
        }
        let mut free = self.profile.policy.max_concurrent_jobs.saturating_sub(self.slots_in_use());
        if free == 0 {
            return;
        }
        // One load serves every candidate: the load only matters once no slot is free, and the
        // loop stops there. A verdict already reached against this profile and load stands.
        let (_, matched_for) = self.loaded_profile();
        let mut cursor = None;
        while let Some(rank) = self.offers.next_claimable(cursor.as_ref()) {
            let job_id = rank.2;
            cursor = Some(rank);
            if self.leases.keys().any(|(j, _)| *j == job_id)
                || self.joined_training.iter().any(|(j, _, _)| *j == job_id)
            {
                continue;
            }
            let ok = match self.offers.matched(&job_id) {
                Some((matched, Some(f))) if f == matched_for => matched.is_ok(),
                Some(_) => {
                    let spec = &self.offers.get(&job_id).expect("offer in the table").offer.spec;
                    let matched = matching::evaluate(spec, &self.profile);
                    let ok = matched.is_ok();
                    self.offers.set_matched(&job_id, matched, matched_for);
                    ok
                }
                None => false,
            };
            if ok {
                self.send_claim(now, job_id);
                free -= 1;
                if free == 0 {
                    break;
                }
            }
        }
    }

    fn send_claim(&mut self, now: Millis, job_id: JobId) {
        let Some(relay) = self.offers.update(&job_id, |o| {
            o.claimed_at_ms = Some(now);
            o.relay
        }) else {
            return;
        };
        if let Err(e) = self.outbox.send(now, relay, &Message::Claim(Claim { job_id })) {
            panic!("a claim always fits a frame: {e}");
        }
        self.events.push_back(NodeEvent::Claimed { job_id });
    }

    /// Manual mode (or an owner's explicit choice): claims an offered job.
    pub fn accept(&mut self, now: Millis, job_id: JobId) -> Result<(), NodeCommandError> {
        if self.draining {
            return Err(NodeCommandError::Draining);
        }
        self.offers.expire(now);
        if self.leases.keys().any(|(j, _)| *j == job_id) {
            return Err(NodeCommandError::AlreadyClaimed(job_id));
        }
        let (_, matched_for) = self.loaded_profile();
        let o = self.offers.get(&job_id).ok_or(NodeCommandError::UnknownOffer(job_id))?;
        if o.claimed_at_ms.is_some() {
            return Err(NodeCommandError::AlreadyClaimed(job_id));
        }
        if let Some(reason) = &o.refused {
            return Err(NodeCommandError::RelayRefused { job_id, reason: reason.to_string() });
        }
        if o.offer.deadline_ms <= now {
            return Err(NodeCommandError::UnknownOffer(job_id));
        }
        let matched = matching::evaluate(&o.offer.spec, &self.profile);
        self.offers.set_matched(&job_id, matched.clone(), matched_for);
        if let Err(reasons) = matched {
            return Err(NodeCommandError::CannotServe { job_id, reasons });
        }
        self.send_claim(now, job_id);
        Ok(())
    }

    fn on_lease(&mut self, now: Millis, relay: NodeId, lease: Lease) {
        if lease.node != self.id() {
            let why = Refusal::OtherNode { domain: Domain::Lease, node: lease.node };
            return self.reject(Some(relay), RejectReason::Refused(why));
        }
        let job_id = lease.job_id;
        // The lease must come from the relay that offered the job, for the job as offered.
        let offered =
            self.offers.get(&job_id).filter(|o| o.relay == relay && o.offer.spec == lease.spec);
        let claimed = offered.is_some_and(|o| o.claimed_at_ms.is_some());
        let joined = lease.round.is_some()
            && self
                .joined_training
                .iter()
                .any(|(j, r, s)| *j == job_id && *r == relay && *s == lease.spec);
        if offered.is_none() && !joined {
            let why = Refusal::NotOffered { domain: Domain::Lease, job_id };
            return self.reject(Some(relay), RejectReason::Refused(why));
        }
        self.offers.update(&job_id, |o| o.claimed_at_ms = None);
        let unclaimed = !claimed && !joined;
        if self.draining
            || unclaimed
            || (!claimed && self.leases.len() as u32 >= self.profile.policy.max_concurrent_jobs)
        {
            let reason = if self.draining {
                "node is shutting down"
            } else if unclaimed {
                "the claim had timed out on this node"
            } else {
                "node has no free slot"
            };
            self.send_result(
                now,
                relay,
                &lease,
                Outcome::HandedBack { reason: reason.into() },
                Usage::default(),
            );
            return;
        }
        if lease.round.is_some() && !joined {
            // Joined for the job's later rounds too (their leases come without a new claim).
            if self.joined_training.len() >= MAX_JOINED_TRAINING {
                self.joined_training.pop_front();
            }
            self.joined_training.push_back((job_id, relay, lease.spec.clone()));
        }
        let key = (job_id, lease.lease);
        self.leases.insert(
            key,
            HeldLease { relay, lease: lease.clone(), started_at_ms: now, progress: 0 },
        );
        self.events.push_back(NodeEvent::RunJob { relay, lease: Box::new(lease) });
    }

    fn on_receipt(&mut self, relay: NodeId, receipt: Receipt) {
        if receipt.node != self.id() {
            let why = Refusal::OtherNode { domain: Domain::Receipt, node: receipt.node };
            return self.reject(Some(relay), RejectReason::Refused(why));
        }
        let (job_id, lease) = (receipt.job_id, receipt.lease);
        let Some(pos) = self.awaiting_receipt.iter().position(|a| a.is_for(job_id, lease, relay))
        else {
            let why = Refusal::UnexpectedReceipt { job_id: receipt.job_id, lease: receipt.lease };
            return self.reject(Some(relay), RejectReason::Refused(why));
        };
        self.awaiting_receipt.remove(pos);
        // An offer heard again after the result went out (the job re-announced for another
        // replica) is over for this node too.
        self.forget_offer_when_done(receipt.job_id);
        if let Verdict::Paid { amount } = receipt.verdict {
            self.earned = self.earned.saturating_add(amount);
        }
        self.events.push_back(NodeEvent::ReceiptReceived { relay, receipt });
    }

    /// Reports progress on a held lease.
    pub fn progress(
        &mut self,
        now: Millis,
        job_id: JobId,
        lease: u32,
        percent: u8,
    ) -> Result<(), NodeCommandError> {
        let held = self
            .leases
            .get_mut(&(job_id, lease))
            .ok_or(NodeCommandError::UnknownLease { job_id, lease })?;
        held.progress = percent.min(100);
        let (relay, percent) = (held.relay, held.progress);
        let msg = Message::Progress(Progress { job_id, lease, percent });
        if let Err(e) = self.outbox.send(now, relay, &msg) {
            panic!("a progress report always fits a frame: {e}");
        }
        Ok(())
    }

    /// The sandbox finished a lease: sends the signed result and frees the slot.
    pub fn finish(
        &mut self,
        now: Millis,
        job_id: JobId,
        lease: u32,
        outcome: Outcome,
        usage: Usage,
    ) -> Result<(), NodeCommandError> {
        self.offers.expire(now);
        let held = self
            .leases
            .remove(&(job_id, lease))
            .ok_or(NodeCommandError::UnknownLease { job_id, lease })?;
        self.send_result(now, held.relay, &held.lease, outcome, usage);
        // Or the freed slot would claim the finished job again.
        self.forget_offer_when_done(job_id);
        self.claim_more(now);
        Ok(())
    }

    /// Forgets the offer of `job_id` once this node holds no lease of it: a node gets one lease
    /// per job (a training job's later rounds come without a claim), so the job is over here.
    fn forget_offer_when_done(&mut self, job_id: JobId) {
        if !self.leases.keys().any(|(j, _)| *j == job_id) {
            self.offers.remove(&job_id);
        }
    }

    /// Gives a lease back unfinished (shutdown, local cancel) so the relay re-offers it now.
    pub fn hand_back(
        &mut self,
        now: Millis,
        job_id: JobId,
        lease: u32,
        reason: &str,
    ) -> Result<(), NodeCommandError> {
        self.finish(
            now,
            job_id,
            lease,
            Outcome::HandedBack { reason: reason.into() },
            Usage::default(),
        )
    }

    fn send_result(
        &mut self,
        now: Millis,
        relay: NodeId,
        lease: &Lease,
        outcome: Outcome,
        usage: Usage,
    ) {
        let (job_id, number) = (lease.job_id, lease.lease);
        let mut result = JobResult { job_id, lease: number, outcome, usage };
        if let Err(e) = self.outbox.send(now, relay, &Message::Result(result.clone())) {
            // The workload named more outputs than a frame holds: the relay hears why instead.
            let reason = format!(
                "the result is too large to send ({e}); the workload wrote too many outputs"
            );
            result.outcome = Outcome::Failed { reason };
            if let Err(e) = self.outbox.send(now, relay, &Message::Result(result.clone())) {
                panic!("a failed result without outputs always fits a frame: {e}");
            }
        }
        if self.awaiting_receipt.len() >= MAX_AWAITING_RECEIPTS {
            self.awaiting_receipt.pop_front();
        }
        let ask_at_ms = now.saturating_add(self.cfg.receipt_ask_after_ms);
        self.awaiting_receipt.push_back(AwaitedReceipt { relay, result, ask_at_ms, asked: 0 });
    }

    /// Jobs (by id) the node has joined as a training participant.
    pub fn training_jobs(&self) -> BTreeSet<JobId> {
        self.joined_training.iter().map(|(j, _, _)| *j).collect()
    }
}

/// Marks a known offer as having no open slot (copying the offer only if it had one).
fn close_slots(o: &mut KnownOffer) {
    if o.offer.open_slots != 0 {
        Arc::make_mut(&mut o.offer).open_slots = 0;
    }
}
