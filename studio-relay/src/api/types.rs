//! The JSON shapes of the relay's HTTP API, shared by the server ([`super::serve`]) and the
//! client ([`crate::client`]), and printed by the CLI's `--json` output.

use std::collections::BTreeMap;

use aimatrix_protocol::job::JobSpec;
use aimatrix_protocol::messages::OutputDigest;
use aimatrix_protocol::relay::training::{RoundPhase, TrainingState};
use aimatrix_protocol::relay::{JobState, LeaseStatus, RelayJob};
use aimatrix_training::TrainingParamsExt;
use serde::{Deserialize, Serialize};

use crate::ledger::{Account, AuditReport, Entry, LegKind, Op};
use crate::store::CrossCheck;

/// `POST /v1/jobs`: a job to post, charged to `account`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PostJobRequest {
    /// The spec, with every content reference resolved to a digest already uploaded.
    pub spec: JobSpec,
    /// The requester's ledger account, charged the job's escrow.
    pub account: String,
    /// A key the requester chooses for this post (1 to 128 bytes): a retry with the same key
    /// returns the job the first try posted, never a second one, also after a relay restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The answer to `POST /v1/jobs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostJobResponse {
    /// The new job's id, 32 hex digits.
    pub job_id: String,
}

/// The answer to `PUT /v1/blobs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobView {
    /// The blob's SHA-256, 64 hex digits.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

/// Every error body: `{"error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

/// One lease of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    /// The lease number.
    pub lease: u32,
    /// The holder's peer id.
    pub node: String,
    /// Granted at (the run's start on the relay's clock), ms since the Unix epoch.
    #[serde(default)]
    pub granted_at_ms: u64,
    /// `active`, `returned`, `failed`, `expired` or `cancelled`.
    pub status: String,
    /// Why a failed lease failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last progress report, in percent.
    pub progress: u8,
    /// Whether its result was paid.
    pub paid: bool,
}

/// A node that cannot serve a job, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReasons {
    /// The node's peer id.
    pub node: String,
    /// Each requirement it misses.
    pub reasons: Vec<String>,
}

/// One output file of a completed job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputView {
    /// Its name (`/stdout` is the workload's standard output).
    pub name: String,
    /// Its SHA-256, 64 hex digits; fetch it from `GET /v1/blobs/{sha256}`.
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

/// A training job's progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingView {
    /// The current round (from 0); equal to `rounds` once every round is done.
    pub round: u32,
    /// Rounds the job runs.
    pub rounds: u32,
    /// `waiting` (for participants), `running`, `verifying`, `aggregating` or `done`.
    pub phase: String,
    /// Participants of the current round (peer ids).
    pub participants: Vec<String>,
    /// Nodes admitted at the next round boundary.
    pub joiners: Vec<String>,
    /// Participants wanted.
    pub wanted: u32,
    /// Updates needed to close a round.
    pub quorum: u32,
    /// `sha256:<hex>` of the model the current round starts from.
    pub model: String,
    /// The aggregation rule.
    pub aggregation: String,
    /// Update compression.
    pub compression: String,
    /// Every aggregated round, oldest first.
    pub history: Vec<RoundView>,
}

/// One aggregated round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundView {
    /// The round.
    pub round: u32,
    /// Updates returned in time.
    pub received: u32,
    /// Updates aggregated and paid.
    pub accepted: u32,
    /// Updates refused, with the reason.
    pub rejected: Vec<RejectedUpdate>,
    /// Update bytes received.
    pub bytes_received: u64,
    /// Test loss of the new model.
    pub loss: f32,
    /// Test accuracy of the new model, 0 to 1.
    pub accuracy: f32,
    /// `sha256:<hex>` of the new model.
    pub model: String,
}

/// An update a round refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedUpdate {
    /// The participant's peer id.
    pub node: String,
    /// Why.
    pub reason: String,
}

impl TrainingView {
    fn new(state: &TrainingState) -> Self {
        let peers = |set: &std::collections::BTreeSet<aimatrix_protocol::identity::NodeId>| {
            set.iter().map(|n| n.to_peer_id()).collect()
        };
        let phase = match state.phase {
            RoundPhase::Waiting => "waiting",
            RoundPhase::Running { .. } => "running",
            RoundPhase::Verifying { .. } => "verifying",
            RoundPhase::Aggregating => "aggregating",
            RoundPhase::Done => "done",
        };
        Self {
            round: state.round,
            rounds: state.params.rounds,
            phase: phase.to_owned(),
            participants: peers(&state.participants),
            joiners: peers(&state.joiners),
            wanted: state.params.participants,
            quorum: state.params.quorum,
            model: state.model.to_string(),
            aggregation: state.params.rule().name().to_owned(),
            compression: state.params.codec().name().to_owned(),
            history: state
                .history
                .iter()
                .map(|r| RoundView {
                    round: r.round,
                    received: r.received,
                    accepted: r.accepted,
                    rejected: r
                        .rejected
                        .iter()
                        .map(|(n, why)| RejectedUpdate {
                            node: n.to_peer_id(),
                            reason: why.clone(),
                        })
                        .collect(),
                    bytes_received: r.metrics.bytes_received,
                    loss: r.metrics.loss,
                    accuracy: r.metrics.accuracy,
                    model: r.model.to_string(),
                })
                .collect(),
        }
    }
}

/// A job as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    /// The job id, 32 hex digits.
    pub id: String,
    /// The spec's name.
    pub name: String,
    /// The job kind (`batch`, `training`, ...).
    pub kind: String,
    /// `reserving`, `open`, `completed`, `failed` or `refused`.
    pub state: String,
    /// Why a failed or refused job ended.
    pub reason: Option<String>,
    /// The requester's account.
    pub requester: String,
    /// Credits per accepted replica.
    pub reward: u64,
    /// Distinct nodes that must agree.
    pub replication: u32,
    /// Credits reserved.
    pub escrow: u64,
    /// Credits paid so far.
    pub paid: u64,
    /// Credits given back to the requester.
    pub refunded: u64,
    /// Posted at, ms since the Unix epoch.
    pub posted_at_ms: u64,
    /// The job must be done by then.
    pub deadline_ms: u64,
    /// Leases granted so far.
    pub attempts: u32,
    /// Every lease.
    pub leases: Vec<LeaseView>,
    /// When no known node can serve the job: each node's reasons.
    pub unservable: Vec<NodeReasons>,
    /// The agreed result hash (`sha256:<hex>`), once completed.
    pub result_hash: Option<String>,
    /// The agreed outputs, once completed (a training job: `model.bin` and `metrics.csv`).
    pub outputs: Vec<OutputView>,
    /// A training job's rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingView>,
}

impl JobView {
    /// The view of `job`, with its agreed `outputs` and the nodes that cannot serve it.
    pub fn new(job: &RelayJob, outputs: &[OutputDigest], unservable: Vec<NodeReasons>) -> Self {
        let (state, reason, result_hash) = match &job.state {
            JobState::Reserving => ("reserving", None, None),
            JobState::Open => ("open", None, None),
            JobState::Completed { result_hash } => {
                ("completed", None, Some(result_hash.to_string()))
            }
            JobState::Failed { reason } => ("failed", Some(reason.clone()), None),
            JobState::Refused { reason } => ("refused", Some(reason.clone()), None),
        };
        let leases = job
            .leases
            .values()
            .map(|l| {
                let (status, reason) = match &l.status {
                    LeaseStatus::Active => ("active", None),
                    LeaseStatus::Returned(_) => ("returned", None),
                    LeaseStatus::Failed(why) => ("failed", Some(why.clone())),
                    LeaseStatus::Expired => ("expired", None),
                    LeaseStatus::Cancelled => ("cancelled", None),
                };
                LeaseView {
                    lease: l.lease,
                    node: l.node.to_peer_id(),
                    granted_at_ms: l.granted_at_ms,
                    status: status.to_owned(),
                    reason,
                    progress: l.progress,
                    paid: l.paid,
                }
            })
            .collect();
        Self {
            id: job.id.to_string(),
            name: job.spec.name.clone(),
            kind: job.spec.kind.name().to_owned(),
            state: state.to_owned(),
            reason,
            requester: job.requester.clone(),
            reward: job.spec.reward,
            replication: job.spec.replication,
            escrow: job.escrow,
            paid: job.paid,
            refunded: job.refunded,
            posted_at_ms: job.posted_at_ms,
            deadline_ms: job.deadline_ms,
            attempts: u32::try_from(job.leases.len()).unwrap_or(u32::MAX),
            leases,
            unservable,
            result_hash,
            outputs: outputs
                .iter()
                .map(|o| OutputView {
                    name: o.name.clone(),
                    sha256: o.digest.to_hex(),
                    bytes: o.size_bytes,
                })
                .collect(),
            training: job.training.as_ref().map(TrainingView::new),
        }
    }

    /// Whether the job has ended.
    pub fn is_final(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "failed" | "refused")
    }
}

/// `GET /v1/status`: the relay process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatusView {
    /// The relay's peer id.
    pub peer_id: String,
    /// Addresses nodes can dial.
    pub listen_addrs: Vec<String>,
    /// Peers connected now.
    pub connected_peers: Vec<String>,
    /// Nodes whose adverts the relay holds.
    pub known_nodes: usize,
    /// Jobs open now.
    pub jobs_open: usize,
    /// Rejected messages by reason.
    pub reject_counts: BTreeMap<String, u64>,
    /// Reservations the ledger expired since the start.
    pub ledger_expired: u64,
    /// The relay's place in the network: reachability, peers connected (relays and nodes
    /// apart), the DHT (what it holds, what peers sent that it refused).
    #[serde(default)]
    pub network: aimatrix_net::NetStats,
    /// Why the relay stopped taking work (its job store or ledger cannot write), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
}

/// `POST /v1/ledger/mint`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintRequest {
    /// The account credited.
    pub account: String,
    /// Whole credits.
    pub amount: u64,
    /// Free text kept with the transfer.
    #[serde(default)]
    pub memo: String,
    /// Transfer id, a decimal u128 (a string: JSON numbers lose precision); repeating a mint
    /// with the same id and fields does nothing. Default: a new id from the clock.
    #[serde(default)]
    pub id: Option<String>,
}

/// A mint, as `ledger mint --json` and `POST /v1/ledger/mint` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintView {
    /// The transfer id (decimal).
    pub id: String,
    /// Its log entry.
    pub seq: u64,
    /// Whether this id had been recorded before (nothing changed).
    pub already_recorded: bool,
    /// The account.
    pub account: String,
    /// Credits minted.
    pub amount: u64,
    /// The account's available balance after it.
    pub available: i128,
}

/// A balance, as `ledger balance --json` and `GET /v1/ledger/balance/{account}` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceView {
    /// The account.
    pub account: String,
    /// Credits it can spend.
    pub available: i128,
    /// Credits held in its reservations.
    pub pending: u128,
    /// Credits it received.
    pub posted_credits: u128,
    /// Credits it spent.
    pub posted_debits: u128,
    /// Credits pending towards it (escrow only).
    pub pending_credits: u128,
}

impl BalanceView {
    /// The view of `account`'s counters.
    pub fn new(account: &str, a: &Account) -> Self {
        Self {
            account: account.to_owned(),
            available: a.available(),
            pending: a.debits_pending,
            posted_credits: a.credits_posted,
            posted_debits: a.debits_posted,
            pending_credits: a.credits_pending,
        }
    }
}

/// One transfer (log entry), as `ledger history --json` and `ledger export --format json`
/// print it, one per line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferView {
    /// The log sequence number.
    pub seq: u64,
    /// `mint`, `reserve`, `pay`, `release` or `expire`.
    pub kind: String,
    /// The transfer id (decimal), absent for expiries.
    pub id: Option<String>,
    /// The job (hex).
    pub job_id: Option<String>,
    /// The reservation a pay, release or expiry resolves (decimal).
    pub reserve_id: Option<String>,
    /// A mint's memo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memo: Option<String>,
    /// How it changed the account asked about (history only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<i128>,
    /// Its double-entry legs.
    pub legs: Vec<LegView>,
}

/// One leg of a transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegView {
    /// `posted`, `pending`, `post_pending` or `void_pending`.
    pub kind: String,
    /// The debited account.
    pub debit: String,
    /// The credited account.
    pub credit: String,
    /// Credits moved.
    pub amount: u128,
}

impl TransferView {
    /// The view of `entry`; with `account`, its change to that account's available balance.
    pub fn new(entry: Entry, account: Option<&str>) -> Self {
        let change = account.map(|a| available_change(&entry, a));
        let memo = match &entry.op {
            Op::Mint { memo, .. } => Some(memo.clone()),
            _ => None,
        };
        Self {
            seq: entry.seq,
            kind: entry.op.kind().to_owned(),
            id: entry.op.id().map(|id| id.to_string()),
            job_id: entry.op.job_id().map(hex::encode),
            reserve_id: match entry.op {
                Op::Reserve { .. } | Op::Mint { .. } => None,
                _ => entry.op.reserve_id().map(|id| id.to_string()),
            },
            memo,
            change,
            legs: entry
                .legs
                .into_iter()
                .map(|l| LegView {
                    kind: l.kind.name().to_owned(),
                    debit: l.debit,
                    credit: l.credit,
                    amount: l.amount,
                })
                .collect(),
        }
    }
}

/// How the entry changed `account`'s available balance.
fn available_change(entry: &Entry, account: &str) -> i128 {
    let mut change: i128 = 0;
    for l in &entry.legs {
        let a = i128::try_from(l.amount).unwrap_or(i128::MAX);
        if l.debit == account {
            change -= match l.kind {
                LegKind::Posted | LegKind::Pending => a,
                LegKind::PostPending => 0,
                LegKind::VoidPending => -a,
            };
        }
        if l.credit == account {
            change += match l.kind {
                LegKind::Posted | LegKind::PostPending => a,
                LegKind::Pending | LegKind::VoidPending => 0,
            };
        }
    }
    change
}

/// An audit, as `ledger audit --json` and `GET /v1/ledger/audit` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditView {
    /// No discrepancy found.
    pub clean: bool,
    /// Log entries replayed.
    pub entries: u64,
    /// Accounts rebuilt.
    pub accounts: usize,
    /// Reservations still open.
    pub open_reservations: usize,
    /// Each discrepancy within the ledger.
    pub problems: Vec<String>,
    /// Job records cross-checked with the ledger; absent when there was no job store.
    #[serde(default)]
    pub jobs: Option<usize>,
    /// Each disagreement between the job store and the ledger (`job <id>: ...`).
    #[serde(default)]
    pub disagreements: Vec<String>,
}

impl AuditView {
    /// The ledger's own audit and, if a job store was read, how it disagrees with the ledger.
    pub fn new(r: AuditReport, check: Option<CrossCheck>) -> Self {
        let jobs = check.as_ref().map(|c| c.jobs);
        let disagreements: Vec<String> = check
            .map(|c| c.disagreements.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        Self {
            jobs,
            clean: r.problems.is_empty() && disagreements.is_empty(),
            entries: r.entries,
            accounts: r.accounts,
            open_reservations: r.open_reservations,
            problems: r.problems,
            disagreements,
        }
    }
}
