//! The relay's event loop: network events, API commands and the core's timer go in; messages,
//! ledger writes and job records come out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aimatrix_net::{NetEvent, NetHandle, Outbound, Responder};
use aimatrix_protocol::capability::{advert_record_key, class_provider_key, requirement_class};
use aimatrix_protocol::codec;
use aimatrix_protocol::direct::{DirectRequest, DirectResponse};
use aimatrix_protocol::hash::Digest;
use aimatrix_protocol::job::JobSpec;
use aimatrix_protocol::ledger::LedgerOp;
use aimatrix_protocol::messages::{JobId, Outcome, OutputDigest};
use aimatrix_protocol::relay::{RelayCore, RelayEvent, RelayJob};
use aimatrix_protocol::time::Millis;
use aimatrix_protocol::Transmit;
use libp2p::{Multiaddr, PeerId};
use studio_relay::api::types::{AuditView, JobView, RelayStatusView};
use studio_relay::api::{ApiCommand, ApiError};
use studio_relay::ledger::{Ledger, LedgerError, Op, OpError};
use studio_relay::store::{BlobStore, JobRecord, JobStore, KeyedPost};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::training::{self, RoundInput, RoundOutput, TRAINING_OUTPUTS};
use super::views;

/// Finished jobs kept in the core's memory; older ones are answered from the job store.
const FINISHED_IN_MEMORY: usize = 1024;
/// Inputs of each kind taken into one step at most.
const STEP_INPUTS_MAX: usize = 512;
/// Longest a message to a node is retried while the node cannot be reached.
const DIRECT_RETRY_FOR: Duration = Duration::from_secs(10);
/// Longest idempotency key a post may carry, in bytes.
const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;
/// How often the ledger voids reservations past their timeout.
const LEDGER_EXPIRY_EVERY: Duration = Duration::from_secs(1);

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as Millis)
}

/// Something a background task hands back to the loop.
enum Internal {
    /// An advert found in the DHT for a job nobody in the index could serve.
    Advert(Vec<u8>),
    /// A closed training round, judged.
    RoundJudged(RoundOutput),
}

/// One input to a step of the loop.
enum Input {
    /// From the network.
    Net(NetEvent),
    /// From the HTTP API.
    Command(ApiCommand),
    /// From a background task of the driver.
    Internal(Internal),
    /// The core's timer is due.
    Timeout,
    /// Time to persist and forget old finished jobs.
    Housekeeping,
}

/// An API command waiting for the end of its step to be answered.
///
/// The core changes state as soon as an input is handled (a result marks a job completed),
/// but what the driver keeps beside it (a job's outputs, the ledger's confirmation, the job
/// record) is recorded only when [`Relay::pump`] drains the core's events. Every answer waits
/// for that pump, so none shows the core ahead of the driver: a job is never seen completed
/// before its outputs are recorded, a post is answered once its escrow is reserved, a cancel
/// once the release is durable. Queries are not answered by pumping early: one pump per step
/// keeps one ledger commit and one job-store flush for a whole batch of inputs.
enum Waiting {
    /// A post the core took; refused if the ledger refuses its escrow.
    Post { id: JobId, reply: oneshot::Sender<Result<JobId, ApiError>> },
    /// A cancel, already done in the core.
    Cancel { result: Result<(), ApiError>, reply: oneshot::Sender<Result<(), ApiError>> },
    /// One job's view.
    Job { id: JobId, reply: oneshot::Sender<Option<JobView>> },
    /// Every job's view.
    Jobs { reply: oneshot::Sender<Vec<JobView>> },
    /// The relay's status.
    Status { reply: oneshot::Sender<RelayStatusView> },
    /// The ledger's audit, cross-checked with the job store.
    Audit { reply: oneshot::Sender<Result<AuditView, ApiError>> },
}

/// The relay driver.
pub(crate) struct Relay {
    core: RelayCore,
    net: NetHandle,
    ledger: Arc<Ledger>,
    blobs: Arc<BlobStore>,
    jobs: JobStore,
    address: Multiaddr,
    /// Output lists of results received, by job and lease (persisted with the job).
    outputs: HashMap<JobId, BTreeMap<u32, Vec<OutputDigest>>>,
    /// Jobs changed since they were last written to the job store.
    dirty: BTreeSet<JobId>,
    /// Pays and releases the ledger refused (e.g. the reservation had already expired).
    ledger_refused: u64,
    /// Reservations the ledger voided on its own.
    ledger_expired: Arc<std::sync::atomic::AtomicU64>,
    connected: BTreeSet<PeerId>,
    /// Gossip and direct messages on their way out.
    out: Outbound,
    /// Ledger instructions of the current step, applied as one group commit.
    ledger_ops: Vec<LedgerOp>,
    /// Outbox entries the ledger acknowledged (applied or refused for good), removed from the
    /// job store's outbox with its next commit.
    outbox_done: Vec<u64>,
    /// Messages the core produced this step, sent once what they report is durable: a receipt
    /// never leaves before the ledger acknowledged the payment it reports.
    held: Vec<Transmit>,
    /// Why the relay stopped taking work (its job store or ledger cannot write); nothing more
    /// is fed to the core, and posts, cancels and uploads are answered 503 with this reason.
    halted: Option<String>,
    /// Keyed posts of this step, recorded with their jobs' records at the next commit.
    keyed: Vec<KeyedPost>,
    /// The ledger failed to reserve an escrow this step: the relay halts once the step's
    /// refusals are recorded.
    ledger_down: Option<String>,
    /// API commands taken this step, answered once the step's core events are recorded.
    waiting: Vec<Waiting>,
    /// What the posters of jobs whose escrow the ledger refused since the last pump are told.
    escrow_refusals: HashMap<JobId, ApiError>,
    internal_tx: mpsc::Sender<Internal>,
    internal_rx: Option<mpsc::Receiver<Internal>>,
}

impl Relay {
    pub(crate) fn new(
        core: RelayCore,
        net: NetHandle,
        ledger: Arc<Ledger>,
        blobs: Arc<BlobStore>,
        jobs: JobStore,
        address: Multiaddr,
    ) -> Self {
        let (internal_tx, internal_rx) = mpsc::channel(1024);
        let out = Outbound::new(net.clone(), DIRECT_RETRY_FOR);
        Self {
            core,
            net,
            ledger,
            blobs,
            jobs,
            address,
            outputs: HashMap::new(),
            dirty: BTreeSet::new(),
            ledger_refused: 0,
            ledger_expired: Arc::default(),
            connected: BTreeSet::new(),
            out,
            ledger_ops: Vec::new(),
            outbox_done: Vec::new(),
            held: Vec::new(),
            halted: None,
            keyed: Vec::new(),
            ledger_down: None,
            waiting: Vec::new(),
            escrow_refusals: HashMap::new(),
            internal_tx,
            internal_rx: Some(internal_rx),
        }
    }

    /// Puts every unfinished job of the job store back into the core, and the most recently
    /// posted finished ones (up to [`FINISHED_IN_MEMORY`]), so a node that missed a receipt
    /// before the restart gets it when it sends its result again.
    pub(crate) fn restore(&mut self, accept_disagreements: bool) -> anyhow::Result<()> {
        self.reconcile()?;
        // Newest first; each record read and decoded once, for the books check and the core.
        let records = self.jobs.list()?;
        let jobs: Vec<RelayJob> =
            records.iter().map(|r| self.jobs.snapshot(r)).collect::<Result<_, _>>()?;
        self.check_books(&jobs, accept_disagreements)?;
        let now = now_ms();
        let (mut restored, mut finished) = (0, 0);
        for (record, job) in records.into_iter().zip(jobs) {
            if record.final_state {
                if finished >= FINISHED_IN_MEMORY {
                    continue;
                }
                finished += 1;
            } else {
                self.dirty.insert(record.id);
                restored += 1;
            }
            self.outputs.insert(record.id, record.outputs);
            self.core.restore_job(now, job)?;
        }
        if restored > 0 {
            tracing::info!("restored {restored} unfinished job(s) from the job store");
        }
        self.pump(now);
        Ok(())
    }

    /// Completes what a crash or a storage failure left in flight, before any job is restored:
    /// replays the ledger outbox (its ids are idempotent, so an instruction the ledger applied
    /// before the crash is answered as existing), then releases every open reservation that no
    /// live job explains (its job record is missing or ended), instead of leaving it to the
    /// ledger's safety expiry an hour past a deadline nobody can see. Anything it cannot
    /// complete stops the relay with what to do.
    fn reconcile(&mut self) -> anyhow::Result<()> {
        let outbox = self.jobs.outbox()?;
        let mut done = Vec::with_capacity(outbox.len());
        for (key, op) in &outbox {
            let job_id = op.job_id();
            match self.ledger.apply_op(op) {
                Ok(_) => {}
                Err(LedgerError::Rejected(e)) => tracing::warn!(
                    "job {job_id}: the ledger refuses an instruction left from before the \
                     restart ({e}); nothing to apply"
                ),
                Err(e) => anyhow::bail!(
                    "the ledger cannot apply the {} instruction(s) the relay recorded before it \
                     stopped ({e}); free space or fix the ledger's storage, then start the \
                     relay again (nothing is lost: they stay recorded in the job store)",
                    outbox.len()
                ),
            }
            done.push(*key);
        }
        if !done.is_empty() {
            self.jobs.commit(&[], &[], &done)?;
            tracing::info!(
                "applied {} ledger instruction(s) left from before the restart",
                done.len()
            );
        }
        for (reserve_id, reservation) in self.ledger.open_reservations()? {
            // Every reservation here came from a core's `Reserve`, named after its job.
            let job_id = JobId(reservation.job_id);
            let record = self.jobs.get(&job_id)?;
            if record.as_ref().is_some_and(|r| !r.final_state) {
                continue;
            }
            let why =
                if record.is_some() { "its job has ended" } else { "no job record explains it" };
            let held = u64::try_from(reservation.held())
                .map_err(|_| anyhow::anyhow!("reservation {reserve_id} holds more than a u64"))?;
            if let Err(e) = self.ledger.apply_op(&LedgerOp::release(job_id, held)) {
                anyhow::bail!(
                    "reservation {reserve_id} of job {job_id} holds {held} credits of {} and \
                     {why}, but the ledger refuses to release it ({e}); check the ledger with \
                     `studio-relay ledger audit --data-dir DIR` before starting the relay again",
                    reservation.requester
                );
            }
            tracing::warn!(
                "released reservation {reserve_id} of job {job_id}: {held} credits back to {} \
                 ({why})",
                reservation.requester
            );
        }
        Ok(())
    }

    /// Cross-checks the job store with the ledger once reconciliation is done: a job that
    /// ended must have been paid and refunded exactly as its record says, and no credits may
    /// have moved for a job without a record. Such a disagreement stops the relay (unless
    /// `accept` says the operator has seen them), with each one and what to do; one about a
    /// job still open is logged, as its settlement may yet bring the books together.
    fn check_books(&self, jobs: &[RelayJob], accept: bool) -> anyhow::Result<()> {
        let report = self.ledger.audit_open()?;
        let check = self.jobs.cross_check_jobs(&report.books, jobs)?;
        let (lasting, open): (Vec<_>, Vec<_>) =
            check.disagreements.into_iter().partition(|d| d.lasting);
        for d in &open {
            tracing::warn!("the job store and the ledger disagree on an open job: {d}");
        }
        if lasting.is_empty() {
            return Ok(());
        }
        for d in &lasting {
            tracing::error!("the job store and the ledger disagree: {d}");
        }
        if accept {
            tracing::warn!(
                "starting anyway (--accept-disagreements): {} disagreement(s) stay in the books",
                lasting.len()
            );
            return Ok(());
        }
        let shown: Vec<String> = lasting.iter().take(5).map(ToString::to_string).collect();
        anyhow::bail!(
            "the job store and the ledger disagree on {} point(s), which no restart can settle: \
             {}{}. Nothing was changed. Look at every one with `studio-relay ledger audit \
             --data-dir DIR`; restore the ledger and jobs directories from the same backup, or \
             start with `serve --accept-disagreements` to run on with them recorded",
            lasting.len(),
            shown.join("; "),
            if lasting.len() > shown.len() { "; ..." } else { "" }
        )
    }

    /// Runs until `shutdown` is cancelled.
    pub(crate) async fn run(
        &mut self,
        mut events: mpsc::Receiver<NetEvent>,
        mut commands: mpsc::Receiver<ApiCommand>,
        shutdown: CancellationToken,
    ) {
        let mut internal = self.internal_rx.take().expect("run is called once");
        self.spawn_ledger_expiry(shutdown.clone());
        let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
        loop {
            let now = now_ms();
            let sleep = match self.core.poll_timeout() {
                Some(at) => Duration::from_millis(at.saturating_sub(now)),
                None => Duration::from_secs(3600),
            };
            let first = tokio::select! {
                () = shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(event) => Input::Net(event),
                    None => {
                        tracing::error!("the network task stopped; shutting down");
                        break;
                    }
                },
                Some(command) = commands.recv() => Input::Command(command),
                Some(msg) = internal.recv() => Input::Internal(msg),
                () = tokio::time::sleep(sleep) => Input::Timeout,
                _ = housekeeping.tick() => Input::Housekeeping,
            };
            // Take everything already waiting, so one step (one ledger commit, one job-store
            // flush) serves many messages and posts under load.
            let mut inputs = vec![first];
            inputs.extend(
                std::iter::from_fn(|| events.try_recv().ok()).take(STEP_INPUTS_MAX).map(Input::Net),
            );
            inputs.extend(
                std::iter::from_fn(|| commands.try_recv().ok())
                    .take(STEP_INPUTS_MAX)
                    .map(Input::Command),
            );
            self.step(inputs);
        }
        self.persist_all();
        if !self.out.flush(Duration::from_secs(5)).await {
            tracing::warn!("some messages to nodes could not be delivered before exit");
        }
    }

    /// One turn of the loop: takes `inputs` in order, fires the core's timer if it is due, then
    /// drains the core (one ledger group commit, one job-store flush for the whole batch).
    fn step(&mut self, inputs: Vec<Input>) {
        if self.halted.is_some() {
            return self.step_halted(inputs);
        }
        for input in inputs {
            match input {
                Input::Net(event) => self.on_net_event(event),
                Input::Command(command) => self.on_command(command),
                Input::Internal(Internal::Advert(bytes)) => {
                    self.core.handle_message(now_ms(), None, &bytes);
                }
                Input::Internal(Internal::RoundJudged(output)) => self.on_round_judged(output),
                Input::Timeout => self.core.handle_timeout(now_ms()),
                Input::Housekeeping => self.housekeeping(),
            }
        }
        let now = now_ms();
        if self.core.poll_timeout().is_some_and(|at| at <= now) {
            self.core.handle_timeout(now);
        }
        self.pump(now);
    }

    /// A step of a halted relay: nothing reaches the core; the API is answered (work refused
    /// with the reason), content is still served, every other request is refused.
    fn step_halted(&mut self, inputs: Vec<Input>) {
        let why = self.halted.clone().unwrap_or_default();
        for input in inputs {
            match input {
                Input::Command(command) => self.on_command(command),
                Input::Net(NetEvent::Request {
                    request: DirectRequest::GetBlob(digest),
                    reply,
                    ..
                }) => self.serve_blob(digest, reply),
                Input::Net(NetEvent::Request { reply, .. }) => {
                    reply.send(DirectResponse::refused(&format!("the relay is halted: {why}")));
                }
                Input::Net(event) => self.on_connection_event(event),
                Input::Internal(_) | Input::Timeout | Input::Housekeeping => {}
            }
        }
        self.answer_waiting();
    }

    fn spawn_ledger_expiry(&self, shutdown: CancellationToken) {
        let ledger = self.ledger.clone();
        let expired = self.ledger_expired.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LEDGER_EXPIRY_EVERY);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let ledger = ledger.clone();
                match tokio::task::spawn_blocking(move || ledger.expire(now_ms())).await {
                    Ok(Ok(ids)) if !ids.is_empty() => {
                        tracing::warn!(
                            "the ledger voided {} reservation(s) past their timeout",
                            ids.len()
                        );
                        expired.fetch_add(ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!("ledger expiry failed: {e}"),
                    Err(e) => tracing::error!("ledger expiry task failed: {e}"),
                }
            }
        });
    }

    fn housekeeping(&mut self) {
        self.persist_all();
        let forgotten = self.core.forget_finished(FINISHED_IN_MEMORY);
        if forgotten > 0 {
            let live: BTreeSet<JobId> = self.core.jobs().map(|j| j.id).collect();
            self.outputs.retain(|id, _| live.contains(id));
        }
    }

    fn on_net_event(&mut self, event: NetEvent) {
        let now = now_ms();
        match event {
            NetEvent::Gossip { bytes, .. } => self.core.handle_message(now, None, &bytes),
            NetEvent::Request { peer, request, reply } => match request {
                DirectRequest::Message(bytes) => reply
                    .take_message(&peer, |from| self.core.handle_message(now, Some(from), &bytes)),
                DirectRequest::GetBlob(digest) => self.serve_blob(digest, reply),
                DirectRequest::PutBlob { job_id, lease, bytes } => {
                    if let Err(why) = self.may_upload(&peer, job_id, lease) {
                        reply.send(DirectResponse::Refused(why));
                        return;
                    }
                    let blobs = self.blobs.clone();
                    tokio::task::spawn_blocking(move || {
                        reply.send(match blobs.put(&bytes) {
                            Ok(_) => DirectResponse::Accepted,
                            Err(e) => DirectResponse::Refused(format!("cannot store blob: {e}")),
                        });
                    });
                }
            },
            other => self.on_connection_event(other),
        }
    }

    /// Answers a request for content from the blob store, off the event loop (also while the
    /// relay is halted).
    fn serve_blob(&self, digest: Digest, reply: Responder) {
        let blobs = self.blobs.clone();
        tokio::task::spawn_blocking(move || {
            reply.send(match blobs.get(&digest) {
                Ok(Some(bytes)) => DirectResponse::Blob(bytes),
                Ok(None) => DirectResponse::NotFound,
                Err(e) => DirectResponse::Refused(format!("cannot read blob: {e}")),
            });
        });
    }

    /// Connections and addresses; gossip and requests are the caller's.
    fn on_connection_event(&mut self, event: NetEvent) {
        match event {
            NetEvent::PeerConnected(peer) => {
                self.connected.insert(peer);
                if let Some(id) = aimatrix_net::node_id_of(&peer) {
                    self.core.peer_connected(now_ms(), id);
                }
            }
            NetEvent::PeerDisconnected(peer) => {
                self.connected.remove(&peer);
                if let Some(id) = aimatrix_net::node_id_of(&peer) {
                    self.core.peer_disconnected(&id);
                }
            }
            NetEvent::ListenAddr(addr) => tracing::info!("listening on {addr}"),
            NetEvent::Gossip { .. } | NetEvent::Request { .. } => {}
        }
    }

    /// Whether `peer` may upload an output of the lease: the core decides
    /// ([`RelayCore::may_upload`]).
    fn may_upload(&self, peer: &PeerId, job_id: JobId, lease: u32) -> Result<(), String> {
        let node = aimatrix_net::node_id_of(peer).ok_or("peer id is not an ed25519 key")?;
        self.core.may_upload(node, job_id, lease).map_err(|e| e.to_string())
    }

    fn on_command(&mut self, command: ApiCommand) {
        match command {
            ApiCommand::PostJob { reply, .. } if self.halted.is_some() => {
                let _ = reply.send(Err(self.halted_error()));
            }
            ApiCommand::CancelJob { reply, .. } if self.halted.is_some() => {
                let _ = reply.send(Err(self.halted_error()));
            }
            ApiCommand::PostJob { req, reply } => {
                let req = *req;
                match self.post_job(req.spec, &req.account, req.idempotency_key) {
                    Ok(id) => self.waiting.push(Waiting::Post { id, reply }),
                    // Refused before the core saw it: nothing to wait for.
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            ApiCommand::Job { id, reply } => self.waiting.push(Waiting::Job { id, reply }),
            ApiCommand::Jobs { reply } => self.waiting.push(Waiting::Jobs { reply }),
            ApiCommand::CancelJob { id, reply } => {
                let result = self.core.cancel_job(now_ms(), id).map_err(|e| match e {
                    aimatrix_protocol::relay::CommandError::UnknownJob(_) => {
                        ApiError::NotFound(format!("no job {id} at this relay"))
                    }
                    other => ApiError::Invalid(other.to_string()),
                });
                self.waiting.push(Waiting::Cancel { result, reply });
            }
            ApiCommand::Status { reply } => self.waiting.push(Waiting::Status { reply }),
            ApiCommand::Audit { reply } => self.waiting.push(Waiting::Audit { reply }),
        }
    }

    fn post_job(
        &mut self,
        spec: JobSpec,
        account: &str,
        key: Option<String>,
    ) -> Result<JobId, ApiError> {
        let keyed = match key {
            Some(key) => {
                let (earlier, post) = self.keyed_post(&spec, account, key)?;
                if let Some(id) = earlier {
                    return Ok(id);
                }
                Some(post)
            }
            None => None,
        };
        let named =
            spec.content_refs().into_iter().filter_map(|(what, r)| Some((what, r.digest()?)));
        for (what, digest) in named {
            match self.blobs.has(&digest) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(ApiError::Invalid(format!(
                        "{what} names content {digest} that this relay does not have; upload it \
                         first (PUT /v1/blobs, which `studio-relay job post` does for you)"
                    )))
                }
                Err(e) => return Err(ApiError::Internal(format!("cannot read blob store: {e}"))),
            }
        }
        let Some(escrow) = spec.escrow() else {
            return Err(ApiError::Invalid(
                "the job's escrow (reward × replication; for training, reward × updates per round × \
                 rounds) is too large; lower one of them"
                    .into(),
            ));
        };
        let available = self
            .ledger
            .balance(account)
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .available();
        if available < i128::from(escrow) {
            return Err(ApiError::InsufficientFunds(format!(
                "account {account:?} has {available} credits available and this job needs \
                 {escrow} (its escrow: reward × replication; for training, reward × updates per \
                 round × rounds); nothing was posted. Add credits \
                 with `studio-relay ledger mint {account} <amount>`"
            )));
        }
        let posted = if spec.kind == aimatrix_protocol::job::JobKind::Training {
            // Checked and split before anything is reserved; the chunks are stored by digest.
            let data = tokio::task::block_in_place(|| training::prepare(&self.blobs, &spec))?;
            self.core.post_training_job(now_ms(), account, spec, data)
        } else {
            self.core.post_job(now_ms(), account, spec)
        };
        let id = posted.map_err(|e| ApiError::Invalid(e.to_string()))?;
        if let Some(post) = keyed {
            // Recorded with the job's record, in the step's first commit.
            self.keyed.push(KeyedPost { job_id: id, ..post });
        }
        tracing::info!("job {id} posted by {account}");
        Ok(id)
    }

    /// A post under idempotency `key`: the job an earlier post under the key made, if it had
    /// the same spec (a retry), and the record to keep for a new one. A key that named another
    /// spec is refused.
    fn keyed_post(
        &self,
        spec: &JobSpec,
        account: &str,
        key: String,
    ) -> Result<(Option<JobId>, KeyedPost), ApiError> {
        if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
            return Err(ApiError::Invalid(format!(
                "idempotency_key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} bytes, got {}",
                key.len()
            )));
        }
        let encoded = codec::encode(spec).map_err(|e| ApiError::Invalid(e.to_string()))?;
        let post = KeyedPost {
            requester: account.to_owned(),
            key,
            job_id: JobId([0; 16]),
            spec_digest: aimatrix_protocol::hash::Digest::of(&encoded),
        };
        let pending = self.keyed.iter().find(|p| p.requester == account && p.key == post.key);
        let earlier = match pending {
            Some(p) => Some(p.clone()),
            None => self
                .jobs
                .keyed_post(account, &post.key)
                .map_err(|e| ApiError::Internal(format!("cannot read the job store: {e}")))?,
        };
        match earlier {
            None => Ok((None, post)),
            Some(earlier) if earlier.spec_digest == post.spec_digest => {
                Ok((Some(earlier.job_id), post))
            }
            Some(earlier) => Err(ApiError::Invalid(format!(
                "idempotency_key {:?} already posted job {} with another spec; use a new key \
                 for a new job",
                post.key, earlier.job_id
            ))),
        }
    }

    /// Answers the API commands taken since the last pump, in the order they came.
    fn answer_waiting(&mut self) {
        for waiting in std::mem::take(&mut self.waiting) {
            match waiting {
                Waiting::Post { id, reply } => {
                    let answer = match self.escrow_refusals.remove(&id) {
                        Some(refusal) => Err(refusal),
                        None => Ok(id),
                    };
                    let _ = reply.send(answer);
                }
                Waiting::Cancel { result, reply } => {
                    let _ = reply.send(result);
                }
                Waiting::Job { id, reply } => {
                    let _ = reply.send(self.job_view(&id));
                }
                Waiting::Jobs { reply } => {
                    let _ = reply.send(self.job_views());
                }
                Waiting::Status { reply } => {
                    let _ = reply.send(self.status_view());
                }
                Waiting::Audit { reply } => {
                    let _ = reply.send(self.audit());
                }
            }
        }
        // Refusals of jobs restored while reserving: nobody is waiting for them.
        self.escrow_refusals.clear();
    }

    /// Drains the core's outputs until it has nothing more to say, persists changed jobs, then
    /// answers the waiting API commands.
    fn pump(&mut self, now: Millis) {
        while self.halted.is_none() {
            let mut progressed = false;
            while let Some(transmit) = self.core.poll_transmit() {
                progressed = true;
                self.held.push(transmit);
            }
            while let Some(event) = self.core.poll_event() {
                progressed = true;
                self.on_core_event(event);
            }
            if !self.ledger_ops.is_empty() {
                // Intent first: the job records and the instructions they imply are durable
                // together before the ledger sees any of them, so a crash in between leaves
                // instructions that startup replays (docs/ledger.md, "One order of effects").
                let ops = std::mem::take(&mut self.ledger_ops);
                if let Some(keys) = self.commit(&ops) {
                    self.apply_ledger(now, &ops, &keys);
                }
                continue;
            }
            if !progressed {
                break;
            }
        }
        // What the ledger's answers change is not marked for writing, but for a refused escrow
        // (written here, before its poster is told): a confirmed reservation and acknowledged
        // outbox entries are redone by startup (docs/ledger.md, "One order of effects"), so a
        // post costs two flushes, intent and ledger.
        self.persist();
        if let Some(why) = self.ledger_down.take() {
            self.halt(why);
        }
        if self.halted.is_none() {
            for transmit in std::mem::take(&mut self.held) {
                self.send(transmit);
            }
        } else {
            // What this step would have said reports what could not be recorded.
            self.held.clear();
        }
        self.answer_waiting();
    }

    /// What a post or cancel is told while the relay is halted.
    fn halted_error(&self) -> ApiError {
        let why = self.halted.as_deref().unwrap_or("");
        ApiError::LedgerUnavailable(format!(
            "the relay is halted and takes no work: {why}. Nothing was posted or changed; the \
             operator frees space or fixes the storage and restarts the relay"
        ))
    }

    /// Stops taking work, saying why; the operator fixes the cause and restarts the relay.
    fn halt(&mut self, why: String) {
        if self.halted.is_none() {
            tracing::error!(
                "{why}; the relay takes no more work (posts and cancels are answered 503): free \
                 space or fix the storage, then restart the relay, which completes or undoes \
                 what was in flight"
            );
            self.halted = Some(why);
        }
    }

    fn send(&mut self, transmit: Transmit) {
        match transmit {
            Transmit::Broadcast { topic, bytes } => self.out.publish(topic, bytes),
            // A node reconnecting (or the relay just restarted) gets a few seconds; a message
            // it never gets is recovered by the protocol (claims again, lease deadlines).
            Transmit::Direct { to, bytes } => self.out.send(aimatrix_net::peer_id_of(&to), bytes),
        }
    }

    fn on_core_event(&mut self, event: RelayEvent) {
        match event {
            RelayEvent::Ledger(op) => {
                self.dirty.insert(op.job_id());
                self.ledger_ops.push(op);
            }
            RelayEvent::JobOpen { job_id } => {
                // Not marked changed: its record keeps `Reserving` until the job's next
                // change, and a job restored as `Reserving` confirms again.
                self.look_up_nodes(job_id);
            }
            RelayEvent::ResultReceived { job_id, lease, outcome, node } => {
                if let Outcome::Succeeded { outputs, .. } = outcome {
                    self.outputs.entry(job_id).or_default().insert(lease, outputs);
                }
                tracing::debug!("result for job {job_id} lease {lease} from {}", node.short());
                self.dirty.insert(job_id);
            }
            RelayEvent::LeaseGranted { job_id, lease, node } => {
                tracing::info!("job {job_id}: lease {lease} to {}", node.to_peer_id());
                self.dirty.insert(job_id);
            }
            RelayEvent::LeaseExpired { job_id, lease, node } => {
                tracing::warn!("job {job_id}: lease {lease} of {} expired", node.to_peer_id());
                self.dirty.insert(job_id);
            }
            RelayEvent::Progress { job_id, .. } => {
                self.dirty.insert(job_id);
            }
            RelayEvent::Receipted(receipt) => {
                self.dirty.insert(receipt.job_id);
            }
            RelayEvent::JobCompleted { job_id, result_hash } => {
                tracing::info!("job {job_id} completed with result {result_hash}");
                self.dirty.insert(job_id);
                self.record_training_outputs(job_id, result_hash);
            }
            RelayEvent::JobFailed { job_id, reason } => {
                tracing::warn!("job {job_id} failed: {reason}");
                self.dirty.insert(job_id);
            }
            RelayEvent::JobRefused { job_id, reason } => {
                tracing::warn!("job {job_id} refused: {reason}");
            }
            RelayEvent::RoundStarted { job_id, .. } | RelayEvent::RoundFailed { job_id, .. } => {
                self.dirty.insert(job_id);
            }
            RelayEvent::RoundClosed { job_id, round, model, updates } => {
                self.dirty.insert(job_id);
                let Some(state) = self.core.job(&job_id).and_then(|j| j.training.as_ref()) else {
                    return;
                };
                tracing::info!(
                    "job {job_id}: round {round} closed with {} update(s)",
                    updates.len()
                );
                let input = RoundInput::new(
                    job_id,
                    round,
                    state,
                    model,
                    &updates,
                    self.outputs.get(&job_id),
                );
                let (blobs, tx) = (self.blobs.clone(), self.internal_tx.clone());
                tokio::spawn(async move {
                    let judged =
                        tokio::task::spawn_blocking(move || training::judge(&blobs, input));
                    match judged.await {
                        Ok(output) => {
                            let _ = tx.send(Internal::RoundJudged(output)).await;
                        }
                        Err(e) => {
                            tracing::error!("job {job_id}: judging round {round} failed: {e}")
                        }
                    }
                });
            }
            RelayEvent::Rejected { from, reason } => {
                tracing::debug!(
                    "rejected a message from {}: {reason}",
                    from.map_or_else(|| "gossip".to_owned(), |n| n.to_peer_id())
                );
            }
        }
    }

    /// Hands a judged round to the core: pays the accepted updates and starts the next round
    /// (or completes the job). A round the relay cannot judge (its own files unreadable) ends
    /// the job, refunding what is left of the escrow.
    fn on_round_judged(&mut self, output: RoundOutput) {
        let RoundOutput { job_id, round, verdict } = output;
        let now = now_ms();
        self.dirty.insert(job_id);
        match verdict {
            Ok(verdict) => {
                let metrics = verdict.metrics;
                tracing::info!(
                    "job {job_id}: round {round} aggregated {} update(s), rejected {}; test \
                     accuracy {:.2}%, loss {:.4}",
                    verdict.accepted.len(),
                    verdict.rejected.len(),
                    100.0 * metrics.accuracy,
                    metrics.loss
                );
                for (node, why) in &verdict.rejected {
                    tracing::warn!(
                        "job {job_id} round {round}: update of {} rejected: {why}",
                        node.to_peer_id()
                    );
                }
                if let Err(e) = self.core.round_aggregated(now, job_id, round, verdict) {
                    tracing::error!("job {job_id}: round {round} cannot be recorded: {e}");
                }
            }
            Err(why) => {
                tracing::error!(
                    "job {job_id}: round {round} cannot be judged ({why}); ending the job"
                );
                let reason = format!("the relay cannot judge round {round}: {why}");
                if let Err(e) = self.core.abandon_job(now, job_id, reason) {
                    tracing::error!("job {job_id}: cannot end it: {e}");
                }
            }
        }
        self.pump(now);
    }

    /// Keeps a completed training job's final model and metrics CSV as its outputs.
    fn record_training_outputs(
        &mut self,
        job_id: JobId,
        result_hash: aimatrix_protocol::hash::Digest,
    ) {
        let Some(state) = self.core.job(&job_id).and_then(|j| j.training.as_ref()) else { return };
        match training::final_outputs(&self.blobs, state, result_hash) {
            Ok(outputs) => {
                self.outputs.entry(job_id).or_default().insert(TRAINING_OUTPUTS, outputs);
            }
            Err(e) => tracing::error!("job {job_id}: cannot record its outputs: {e}"),
        }
    }

    /// Applies the step's ledger instructions as one group commit and waits until they are
    /// durable, so a job record never says more than the ledger holds; then confirms or refuses
    /// the reservations among them.
    fn apply_ledger(&mut self, now: Millis, ops: &[LedgerOp], keys: &[u64]) {
        let tickets: Vec<_> = ops.iter().map(|op| self.ledger.submit_async(Op::from(op))).collect();
        let results: Vec<Result<(), LedgerError>> = tokio::task::block_in_place(|| {
            tickets.into_iter().map(|t| t.and_then(|t| t.wait()).map(|_| ())).collect()
        });
        for ((op, key), result) in ops.iter().zip(keys).zip(results) {
            let job_id = op.job_id();
            match &result {
                // A reservation the ledger could not make is refused for good (the poster is
                // told nothing was charged); the job record says so at the next commit.
                Ok(()) | Err(LedgerError::Rejected(_)) => self.outbox_done.push(*key),
                Err(e) if matches!(op, LedgerOp::Reserve { .. }) => {
                    self.outbox_done.push(*key);
                    // The job is refused and recorded so first; the relay halts after the step.
                    self.ledger_down
                        .get_or_insert_with(|| format!("the ledger cannot write ({e})"));
                }
                // A payment or release stays in the outbox, replayed when the relay restarts.
                Err(e) => self.halt(format!("the ledger cannot write ({e})")),
            }
            match (op, result) {
                (LedgerOp::Reserve { .. }, Ok(())) => {
                    if let Err(e) = self.core.reserve_confirmed(now, job_id) {
                        tracing::error!("job {job_id}: cannot confirm its reservation: {e}");
                    }
                }
                (LedgerOp::Reserve { requester, .. }, Err(e)) => {
                    self.dirty.insert(job_id);
                    let (reason, refusal) = escrow_refusal(job_id, requester, e);
                    self.escrow_refusals.insert(job_id, refusal);
                    if let Err(e) = self.core.reserve_failed(now, job_id, reason) {
                        tracing::error!("job {job_id}: cannot refuse its reservation: {e}");
                    }
                }
                (_, Ok(())) => {}
                (_, Err(e)) => {
                    // A pay or release after the ledger voided the reservation by its timeout:
                    // the credits are already back with the requester; nothing to retry.
                    self.ledger_refused += 1;
                    tracing::error!("job {job_id}: the ledger refused {op:?}: {e}");
                }
            }
        }
    }

    /// When no node in the advert index can serve a job, asks the DHT for providers of its
    /// capability class and feeds their adverts to the core.
    fn look_up_nodes(&self, job_id: JobId) {
        let Some(job) = self.core.job(&job_id) else { return };
        let servable = self
            .core
            .known_nodes()
            .any(|(_, profile)| aimatrix_protocol::matching::can_serve(&job.spec, profile));
        if servable {
            return;
        }
        let class = requirement_class(&job.spec);
        let net = self.net.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let providers = match net.get_providers(class_provider_key(&class)).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("no providers of {class} in the DHT: {e}");
                    return;
                }
            };
            for peer in providers.into_iter().take(64) {
                let Some(node) = aimatrix_net::node_id_of(&peer) else { continue };
                if let Ok(Some(bytes)) = net.get_record(advert_record_key(&node)).await {
                    let _ = tx.send(Internal::Advert(bytes)).await;
                }
            }
        });
    }

    /// Writes every changed job, with the outbox removals the ledger's answers allow, unless
    /// the relay is halted. Removals alone wait for the next commit (or
    /// [`Relay::persist_all`]): an entry left in the outbox is replayed harmlessly after a
    /// crash.
    fn persist(&mut self) {
        let idle = self.dirty.is_empty() && self.keyed.is_empty();
        if self.halted.is_none() && !idle {
            self.commit(&[]);
        }
    }

    /// Writes everything pending, outbox removals included (housekeeping, exit).
    fn persist_all(&mut self) {
        let idle = self.dirty.is_empty() && self.keyed.is_empty() && self.outbox_done.is_empty();
        if self.halted.is_none() && !idle {
            self.commit(&[]);
        }
    }

    /// Writes every changed job, adds `intended` to the ledger outbox and removes the entries
    /// the ledger acknowledged, in one transaction and one flush; returns the outbox keys of
    /// `intended`, or halts the relay when the job store cannot write.
    fn commit(&mut self, intended: &[LedgerOp]) -> Option<Vec<u64>> {
        let mut records = Vec::with_capacity(self.dirty.len());
        for id in &self.dirty {
            let Some(job) = self.core.job(id) else { continue };
            let snapshot = match codec::encode(job) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::error!("job {id}: cannot encode its record: {e}");
                    continue;
                }
            };
            records.push(JobRecord {
                id: *id,
                requester: job.requester.clone(),
                posted_at_ms: job.posted_at_ms,
                snapshot,
                final_state: job.state.is_final(),
                outputs: self.outputs.get(id).cloned().unwrap_or_default(),
            });
        }
        let done = std::mem::take(&mut self.outbox_done);
        let keyed = std::mem::take(&mut self.keyed);
        let written = tokio::task::block_in_place(|| {
            self.jobs.commit_with_keys(&records, intended, &done, &keyed)
        });
        match written {
            Ok(keys) => {
                self.dirty.clear();
                Some(keys)
            }
            Err(e) => {
                self.outbox_done = done;
                self.keyed = keyed;
                self.halt(format!("the job store cannot write ({e})"));
                None
            }
        }
    }

    /// The ledger's audit and the job store's cross-check with it, at the end of a step, when
    /// every job record and ledger instruction of the step is recorded. The loop waits for
    /// the scan of both (for a large ledger, a second or more).
    fn audit(&self) -> Result<AuditView, ApiError> {
        tokio::task::block_in_place(|| {
            let report = self.ledger.audit_open()?;
            let check = self
                .jobs
                .cross_check(&report.books)
                .map_err(|e| ApiError::Internal(format!("cannot read the job store: {e}")))?;
            Ok(AuditView::new(report, Some(check)))
        })
    }

    fn job_view(&self, id: &JobId) -> Option<JobView> {
        if let Some(job) = self.core.job(id) {
            let outputs = self.outputs.get(id);
            return Some(views::job_view(job, outputs, self.core.known_nodes()));
        }
        let record = self.jobs.get(id).ok().flatten()?;
        let job: RelayJob = codec::decode(&record.snapshot).ok()?;
        Some(views::job_view(&job, Some(&record.outputs), std::iter::empty()))
    }

    fn job_views(&self) -> Vec<JobView> {
        let mut seen = BTreeSet::new();
        let mut out: Vec<JobView> = Vec::new();
        for job in self.core.jobs() {
            seen.insert(job.id);
            out.push(views::job_view(job, self.outputs.get(&job.id), self.core.known_nodes()));
        }
        for record in self.jobs.list().unwrap_or_default() {
            if seen.contains(&record.id) {
                continue;
            }
            if let Ok(job) = codec::decode::<RelayJob>(&record.snapshot) {
                out.push(views::job_view(&job, Some(&record.outputs), std::iter::empty()));
            }
        }
        out.sort_by(|a, b| b.posted_at_ms.cmp(&a.posted_at_ms).then(a.id.cmp(&b.id)));
        out
    }

    fn status_view(&self) -> RelayStatusView {
        views::status_view(
            &self.core,
            &self.address,
            &self.connected,
            self.ledger_refused,
            self.ledger_expired.load(std::sync::atomic::Ordering::Relaxed),
            self.halted.clone(),
            self.net.stats(),
        )
    }
}

/// Why the ledger refused the escrow of `job_id`: the reason the job records, and what its
/// poster is told. 402 only when the requester cannot pay; 503 when the ledger cannot write
/// (an outage: the requester did nothing wrong and may retry); 400 for any other refusal, such
/// as an account name the ledger does not allow. The job is refused in every case and nothing
/// is charged: the ledger acknowledged no reservation for it.
fn escrow_refusal(job_id: JobId, requester: &str, err: LedgerError) -> (String, ApiError) {
    match err {
        LedgerError::Rejected(why @ OpError::InsufficientFunds { .. }) => {
            let reason = why.to_string();
            let refusal = ApiError::InsufficientFunds(format!(
                "the ledger refused the escrow of job {job_id}: {reason}; the job was refused and \
                 nothing was charged. Add credits with `studio-relay ledger mint {requester} \
                 <amount>`"
            ));
            (reason, refusal)
        }
        LedgerError::Rejected(why) => {
            let reason = why.to_string();
            let refusal = ApiError::Invalid(format!(
                "the ledger refused the escrow of job {job_id}: {reason}; the job was refused and \
                 nothing was charged"
            ));
            (reason, refusal)
        }
        outage => {
            let reason = format!("the ledger is unavailable: {outage}");
            let refusal = ApiError::LedgerUnavailable(format!(
                "the relay's ledger cannot write right now ({outage}); job {job_id} was refused \
                 and nothing was charged. Retry later; if it persists, the relay's operator \
                 finds the cause in the relay's log"
            ));
            (reason, refusal)
        }
    }
}

#[cfg(test)]
mod tests {
    //! The driver's steps over a real core, ledger, job store and libp2p swarm on loopback; the
    //! node is played by signing its messages with its key and handing them in as net events.

    #![allow(clippy::unwrap_used)]

    use aimatrix_net::{NetConfig, Role};
    use aimatrix_protocol::hash::Digest;
    use aimatrix_protocol::identity::Keypair;
    use aimatrix_protocol::messages::{self, Advert, Claim, JobResult, Message, Usage};
    use aimatrix_protocol::relay::RelayConfig;
    use aimatrix_protocol::{testkit, Topic};
    use studio_relay::api::types::{OutputView, PostJobRequest};

    use super::*;

    const REQUESTER: &str = "studio";

    struct Harness {
        relay: Relay,
        node: Keypair,
        nonce: u64,
        /// Kept open so the swarm keeps running.
        _events: mpsc::Receiver<NetEvent>,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        async fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let key = testkit::keypair(1_000);
            let mut cfg = NetConfig::new(key.clone(), Role::Relay);
            cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
            let (net, events) = aimatrix_net::spawn(cfg).await.unwrap();
            let ledger = Arc::new(Ledger::open(&dir.path().join("ledger")).unwrap());
            ledger.mint(1, REQUESTER, 1_000, "test credits").unwrap();
            let blobs = Arc::new(BlobStore::open(&dir.path().join("blobs")).unwrap());
            blobs.put(b"test module").unwrap();
            let jobs = JobStore::open(&dir.path().join("jobs")).unwrap();
            let core = RelayCore::new(key, RelayConfig::default(), 7);
            let address = "/ip4/127.0.0.1/tcp/7700".parse().unwrap();
            let relay = Relay::new(core, net, ledger, blobs, jobs, address);
            Self { relay, node: testkit::keypair(1), nonce: 0, _events: events, _dir: dir }
        }

        /// `msg` signed by the node, handed in as gossip: a claim or a result really comes as a
        /// direct request, whose responder only the swarm can make; the core goes by the
        /// signer either way.
        fn signed_by_node(&mut self, msg: &Message) -> Input {
            self.nonce += 1;
            let bytes = messages::seal(&self.node, msg, self.nonce, now_ms(), 60_000).unwrap();
            let from = aimatrix_net::peer_id_of(&self.node.public());
            Input::Net(NetEvent::Gossip { topic: Topic::Adverts, bytes, from })
        }

        /// Posts a batch job in one step and returns its id.
        fn post(&mut self) -> JobId {
            let (input, answer) = post_command(REQUESTER);
            self.relay.step(vec![input]);
            answer.blocking_recv().unwrap().unwrap()
        }

        /// The node advertises itself and claims `job`; returns the lease it was granted.
        fn lease(&mut self, job: JobId) -> u32 {
            let advert = Message::Advert(Advert { seq: 1, profile: testkit::profile() });
            let claim = Message::Claim(Claim { job_id: job });
            let inputs = vec![self.signed_by_node(&advert), self.signed_by_node(&claim)];
            self.relay.step(inputs);
            let node = self.node.public();
            let leases = &self.relay.core.job(&job).unwrap().leases;
            let lease = leases.values().find(|l| {
                l.node == node && l.status == aimatrix_protocol::relay::LeaseStatus::Active
            });
            lease.unwrap_or_else(|| panic!("no lease granted: {leases:?}")).lease
        }
    }

    /// A post of a batch job escrowing 10 credits (reward 10, replication 1) from `account`.
    fn post_command(account: &str) -> (Input, oneshot::Receiver<Result<JobId, ApiError>>) {
        let (reply, answer) = oneshot::channel();
        let req = PostJobRequest {
            spec: testkit::batch_spec(10),
            account: account.into(),
            idempotency_key: None,
        };
        (Input::Command(ApiCommand::PostJob { req: Box::new(req), reply }), answer)
    }

    /// A query taken in the same step as the result that completes the job is answered with
    /// the job's outputs (issue 16: it was answered between the two, completed with none).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_is_never_seen_completed_without_its_outputs() {
        let mut h = Harness::start().await;
        let job = tokio::task::block_in_place(|| h.post());
        let lease = tokio::task::block_in_place(|| h.lease(job));
        let stdout = OutputDigest {
            name: "/stdout".into(),
            digest: Digest::of(b"hello world\n"),
            size_bytes: 12,
        };
        let result = Message::Result(JobResult {
            job_id: job,
            lease,
            outcome: Outcome::succeeded(vec![stdout.clone()]),
            usage: Usage::default(),
        });
        let (job_reply, job_answer) = oneshot::channel();
        let (jobs_reply, jobs_answer) = oneshot::channel();
        let inputs = vec![
            h.signed_by_node(&result),
            Input::Command(ApiCommand::Job { id: job, reply: job_reply }),
            Input::Command(ApiCommand::Jobs { reply: jobs_reply }),
        ];
        tokio::task::block_in_place(|| h.relay.step(inputs));

        let expected = vec![OutputView {
            name: "/stdout".into(),
            sha256: stdout.digest.to_hex(),
            bytes: stdout.size_bytes,
        }];
        let view = job_answer.await.unwrap().unwrap();
        assert_eq!(view.state, "completed", "{view:?}");
        assert_eq!(view.outputs, expected, "the Job answer shows the outputs");
        let listed = jobs_answer.await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].state.as_str(), &listed[0].outputs), ("completed", &expected));
    }

    /// Two posts in one step that the account can pay one at a time: both pass the balance
    /// check at intake, the ledger refuses the second escrow, and only that is a 402.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_escrow_the_ledger_refuses_for_funds_is_a_402() {
        let mut h = Harness::start().await;
        h.relay.ledger.mint(2, "tight", 15, "enough for one job").unwrap();
        let (first, first_answer) = post_command("tight");
        let (second, second_answer) = post_command("tight");
        tokio::task::block_in_place(|| h.relay.step(vec![first, second]));
        let first = first_answer.await.unwrap().unwrap();
        let refused = second_answer.await.unwrap().unwrap_err();
        assert!(matches!(refused, ApiError::InsufficientFunds(_)), "{refused:?}");
        assert_eq!(refused.status(), axum::http::StatusCode::PAYMENT_REQUIRED);
        assert!(refused.to_string().contains("ledger mint tight"), "{refused}");
        let account = h.relay.ledger.balance("tight").unwrap();
        assert_eq!((account.available(), account.debits_pending), (5, 10), "one escrow held");
        let states: Vec<String> = h.relay.job_views().into_iter().map(|v| v.state).collect();
        assert_eq!(states.len(), 2);
        assert!(states.contains(&"open".to_owned()) && states.contains(&"refused".to_owned()));
        assert_eq!(h.relay.job_view(&first).unwrap().state, "open");
    }

    #[test]
    fn an_escrow_refusal_says_whose_fault_it_is() {
        let job = JobId([7; 16]);
        let short = LedgerError::Rejected(OpError::InsufficientFunds {
            account: "studio".into(),
            need: 30,
            available: 10,
            short: 20,
        });
        let (reason, refusal) = escrow_refusal(job, "studio", short);
        assert_eq!(reason, "insufficient funds: studio needs 30, has 10 available (short by 20)");
        assert!(matches!(refusal, ApiError::InsufficientFunds(_)), "{refusal:?}");

        let bad_name =
            LedgerError::Rejected(OpError::BadAccount { name: "escrow".into(), why: "reserved" });
        let (_, refusal) = escrow_refusal(job, "escrow", bad_name);
        assert!(matches!(refusal, ApiError::Invalid(_)), "{refusal:?}");
        assert_eq!(refusal.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(refusal.to_string().contains("\"escrow\" is not allowed here"), "{refusal}");

        for outage in [LedgerError::Closed, LedgerError::Storage("disk full".into())] {
            let shown = outage.to_string();
            let (reason, refusal) = escrow_refusal(job, "studio", outage);
            assert!(reason.contains(&shown), "{reason}");
            assert!(matches!(refusal, ApiError::LedgerUnavailable(_)), "{refusal:?}");
            assert_eq!(refusal.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
            let message = refusal.to_string();
            assert!(
                message.contains(&shown) && message.contains("nothing was charged"),
                "{message}"
            );
        }
    }
}
