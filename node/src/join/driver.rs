//! The node's event loop: network events, control-API commands, sandbox runs and the core's
//! timer go in; messages, runs and history records come out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aimatrix_net::{NetEvent, Outbound};
use aimatrix_protocol::capability::{advert_record_key, capability_classes, class_provider_key};
use aimatrix_protocol::direct::{DirectRequest, DirectResponse};
use aimatrix_protocol::identity::NodeId;
use aimatrix_protocol::messages::{JobId, Lease, Outcome};
use aimatrix_protocol::node::{NodeCore, NodeEvent, RelayTrust};
use aimatrix_protocol::time::Millis;
use aimatrix_protocol::{Topic, Transmit};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::run::{self, RunContext, RunUpdate};
use crate::api::views::{EventTally, NetView, OfferView, RelayView, StatusView};
use crate::api::NodeApiCommand;
use crate::commands::now_ms;
use crate::history::{History, ReceiptRecord, RunRecord};

/// A lease being run.
struct Running {
    lease: Lease,
    cancel: CancellationToken,
    started_ms: Millis,
    percent: u8,
    /// The relay cancelled it: its end is not reported.
    cancelled: bool,
}

/// How long after a relay connects the latest advert is gossiped again.
const ADVERT_REGOSSIP_AFTER: Duration = Duration::from_secs(2);

/// The node driver.
pub(crate) struct Node {
    core: NodeCore,
    ctx: RunContext,
    history: History,
    /// The relays the node was given, with the address it dials each at.
    given: Vec<(PeerId, Multiaddr)>,
    running: BTreeMap<(JobId, u32), Running>,
    runs: JoinSet<()>,
    /// DHT updates in flight.
    sends: JoinSet<()>,
    /// Gossip and direct messages on their way out.
    out: Outbound,
    updates_tx: mpsc::Sender<RunUpdate>,
    updates_rx: Option<mpsc::Receiver<RunUpdate>>,
    connected: BTreeSet<PeerId>,
    listen_addrs: Vec<Multiaddr>,
    /// Capability classes this node is a provider of in the DHT.
    providing: BTreeSet<String>,
    /// The latest signed advert, sent again whenever the relay (re)connects.
    last_advert: Option<Vec<u8>>,
    /// When to gossip the latest advert again: a while after a relay connects (gossip learns
    /// the relay's subscriptions first), so relays that never heard it (it was published before
    /// any relay was connected, or they joined later) hear it without waiting for the next one.
    /// Only relays use adverts: a node connecting does not make it gossip again (each time the
    /// same bytes flood the whole network once the peers' duplicate caches have forgotten them).
    advert_regossip_at: Option<tokio::time::Instant>,
    /// What the status reports from the core's events.
    tally: EventTally,
}

impl Node {
    pub(crate) fn new(
        core: NodeCore,
        ctx: RunContext,
        history: History,
        given: Vec<(PeerId, Multiaddr)>,
    ) -> Self {
        let (updates_tx, updates_rx) = mpsc::channel(256);
        let out = Outbound::new(ctx.net.clone(), super::RETRY_FOR);
        Self {
            core,
            ctx,
            history,
            given,
            running: BTreeMap::new(),
            runs: JoinSet::new(),
            sends: JoinSet::new(),
            out,
            updates_tx,
            updates_rx: Some(updates_rx),
            connected: BTreeSet::new(),
            listen_addrs: Vec::new(),
            providing: BTreeSet::new(),
            last_advert: None,
            advert_regossip_at: None,
            tally: EventTally::default(),
        }
    }

    /// Runs until SIGINT/SIGTERM, then drains: running leases get `grace` to finish, the rest
    /// are handed back, and every queued message is sent before it returns.
    pub(crate) async fn run(
        &mut self,
        mut events: mpsc::Receiver<NetEvent>,
        mut commands: mpsc::Receiver<NodeApiCommand>,
        grace: Duration,
    ) {
        let mut updates = self.updates_rx.take().expect("run is called once");
        self.listen_addrs = self.ctx.net.listen_addrs().await;
        self.core.handle_timeout(now_ms());
        self.pump();
        let signal = aimatrix_cli_support::shutdown_signal();
        tokio::pin!(signal);
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            if drain_deadline.is_some() && self.running.is_empty() {
                break;
            }
            let now = now_ms();
            let sleep = match self.core.poll_timeout() {
                Some(at) => Duration::from_millis(at.saturating_sub(now)),
                None => Duration::from_secs(3600),
            };
            let regossip = async {
                match self.advert_regossip_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let grace_over = async {
                match drain_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut signal, if drain_deadline.is_none() => {
                    tracing::info!(
                        "stopping: no new jobs; {} running job(s) get {grace:?} to finish",
                        self.running.len()
                    );
                    self.core.drain();
                    drain_deadline = Some(tokio::time::Instant::now() + grace);
                }
                () = grace_over => {
                    tracing::warn!("grace period over; handing back {} job(s)", self.running.len());
                    for running in self.running.values() {
                        running.cancel.cancel();
                    }
                    drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                }
                event = events.recv() => match event {
                    Some(event) => self.on_net_event(event),
                    None => {
                        tracing::error!("the network task stopped; shutting down");
                        break;
                    }
                },
                Some(command) = commands.recv() => self.on_command(command),
                Some(update) = updates.recv() => self.on_update(update),
                () = tokio::time::sleep(sleep) => self.core.handle_timeout(now_ms()),
                () = regossip => {
                    self.advert_regossip_at = None;
                    if let Some(advert) = self.last_advert.clone() {
                        // The same bytes: a peer that has it drops the copy as a duplicate.
                        self.out.publish(Topic::Adverts, advert);
                    }
                }
                Some(_) = self.runs.join_next(), if !self.runs.is_empty() => {}
                Some(_) = self.sends.join_next(), if !self.sends.is_empty() => {}
            }
            self.pump();
        }
        // Every result, hand-back and progress report queued so far goes out before exit.
        let sends = &mut self.sends;
        let dht = async { while sends.join_next().await.is_some() {} };
        let dht_done = tokio::time::timeout(Duration::from_secs(10), dht).await.is_ok();
        if !self.out.flush(Duration::from_secs(10)).await || !dht_done {
            tracing::warn!("some messages to the relay could not be delivered before exit");
        }
    }

    fn on_net_event(&mut self, event: NetEvent) {
        let now = now_ms();
        match event {
            NetEvent::Gossip { bytes, .. } => self.core.handle_message(now, None, &bytes),
            NetEvent::Request { peer, request, reply } => match request {
                DirectRequest::Message(bytes) => reply
                    .take_message(&peer, |from| self.core.handle_message(now, Some(from), &bytes)),
                DirectRequest::GetBlob(_) => reply.send(DirectResponse::NotFound),
                DirectRequest::PutBlob { .. } => {
                    reply.send(DirectResponse::Refused("nodes do not store uploads".into()));
                }
            },
            NetEvent::PeerConnected(peer) => {
                self.connected.insert(peer);
                let relay =
                    self.core.relays().iter().any(|(id, _)| aimatrix_net::peer_id_of(id) == peer);
                if relay && self.advert_regossip_at.is_none() {
                    self.advert_regossip_at =
                        Some(tokio::time::Instant::now() + ADVERT_REGOSSIP_AFTER);
                }
                if self.given.iter().any(|(given, _)| *given == peer) {
                    // A relay that restarted has forgotten every advert.
                    if let Some(advert) = self.last_advert.clone() {
                        self.out.send(peer, advert);
                    }
                }
            }
            NetEvent::PeerDisconnected(peer) => {
                self.connected.remove(&peer);
            }
            NetEvent::ListenAddr(addr) => {
                if !self.listen_addrs.contains(&addr) {
                    self.listen_addrs.push(addr);
                }
            }
        }
    }

    fn on_command(&mut self, command: NodeApiCommand) {
        match command {
            NodeApiCommand::Status { reply } => {
                let _ = reply.send(self.status_view());
            }
            NodeApiCommand::Offers { all, reply } => {
                let _ = reply.send(OfferView::list(&self.core, all));
            }
            NodeApiCommand::Accept { job_id, reply } => {
                let result = self.core.accept(now_ms(), job_id).map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
        }
    }

    fn on_update(&mut self, update: RunUpdate) {
        let now = now_ms();
        match update {
            RunUpdate::Progress { job_id, lease, percent } => {
                if let Some(running) = self.running.get_mut(&(job_id, lease)) {
                    running.percent = percent;
                    if !running.cancelled {
                        let _ = self.core.progress(now, job_id, lease, percent);
                    }
                }
            }
            RunUpdate::Done { job_id, lease, outcome, usage, status } => {
                let Some(running) = self.running.remove(&(job_id, lease)) else { return };
                let record = if running.cancelled {
                    RunRecord::cancelled(
                        &running.lease,
                        running.started_ms,
                        now,
                        "cancelled by the relay",
                        usage,
                    )
                } else {
                    RunRecord::new(&running.lease, running.started_ms, now, &outcome, usage)
                };
                if let Err(e) = self.history.record_run(record) {
                    tracing::error!("cannot record job history: {e:#}");
                }
                if running.cancelled {
                    return;
                }
                let result = match outcome {
                    Outcome::HandedBack { reason } if self.core.is_draining() => {
                        self.core.hand_back(
                            now,
                            job_id,
                            lease,
                            &format!("node is shutting down ({reason})"),
                        )
                    }
                    outcome => self.core.finish(now, job_id, lease, outcome, usage),
                };
                match result {
                    Ok(()) => tracing::info!("job {job_id} lease {lease}: {status}"),
                    Err(e) => tracing::warn!("job {job_id} lease {lease}: result not sent: {e}"),
                }
            }
        }
    }

    /// Drains the core's outputs until it has nothing more to say.
    fn pump(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(transmit) = self.core.poll_transmit() {
                progressed = true;
                self.send(transmit);
            }
            while let Some(event) = self.core.poll_event() {
                progressed = true;
                self.on_core_event(event);
            }
            if !progressed {
                break;
            }
        }
    }

    fn send(&mut self, transmit: Transmit) {
        match transmit {
            Transmit::Broadcast { topic, bytes } => {
                if topic == Topic::Adverts {
                    // Gossip reaches every relay, the DHT serves lookups, and the direct copy
                    // reaches our relay even before the gossip mesh has formed.
                    self.publish_in_dht(bytes.clone());
                    self.send_to_relay(bytes.clone());
                    self.last_advert = Some(bytes.clone());
                }
                self.out.publish(topic, bytes);
            }
            Transmit::Direct { to, bytes } => self.out.send(aimatrix_net::peer_id_of(&to), bytes),
        }
    }

    /// Sends a sealed message to every relay the node was given, retrying while one cannot be
    /// reached.
    fn send_to_relay(&mut self, bytes: Vec<u8>) {
        for (relay, _) in &self.given {
            self.out.send(*relay, bytes.clone());
        }
    }

    /// Stores the signed advert under the node's own key and provides its capability classes.
    fn publish_in_dht(&mut self, advert: Vec<u8>) {
        let net = self.ctx.net.clone();
        let key = advert_record_key(&self.core.id());
        let classes: BTreeSet<String> =
            capability_classes(&self.core.profile()).into_iter().collect();
        let new_classes: Vec<String> = classes.difference(&self.providing).cloned().collect();
        self.providing = classes;
        self.sends.spawn(async move {
            if let Err(e) = net.put_record(key, advert).await {
                tracing::debug!("cannot store the advert in the DHT: {e}");
            }
            for class in new_classes {
                if let Err(e) = net.start_providing(class_provider_key(&class)).await {
                    tracing::debug!("cannot provide {class} in the DHT: {e}");
                }
            }
        });
    }

    fn on_core_event(&mut self, event: NodeEvent) {
        self.tally.record(&event);
        match event {
            NodeEvent::OfferSeen { job_id, matched } => match matched {
                Ok(_) => tracing::debug!("offer {job_id}: can serve"),
                Err(reasons) => tracing::debug!("offer {job_id}: cannot serve ({reasons:?})"),
            },
            NodeEvent::Claimed { job_id } => tracing::info!("claimed job {job_id}"),
            NodeEvent::ClaimDenied { job_id, reason } => {
                tracing::debug!("claim for job {job_id} denied: {reason:?}");
            }
            NodeEvent::RunJob { relay, lease } => self.start(relay, *lease),
            NodeEvent::RelaysChanged { vouched } => {
                for entry in vouched {
                    let peer = aimatrix_net::peer_id_of(&entry.relay);
                    let addrs: Vec<Multiaddr> =
                        entry.addrs.iter().filter_map(|a| a.parse().ok()).collect();
                    tracing::info!(
                        "working for relay {peer} too (vouched for by a relay this node joined)"
                    );
                    let net = self.ctx.net.clone();
                    self.sends.spawn(async move { net.add_peer_addresses(peer, addrs).await });
                }
            }
            NodeEvent::CancelJob { job_id, lease, reason } => {
                if let Some(running) = self.running.get_mut(&(job_id, lease)) {
                    tracing::info!("job {job_id} lease {lease} cancelled by the relay: {reason}");
                    running.cancelled = true;
                    running.cancel.cancel();
                }
            }
            NodeEvent::ReceiptReceived { relay, receipt } => {
                let record = ReceiptRecord::new(relay, &receipt, now_ms());
                if let Err(e) = self.history.record_receipt(&record) {
                    tracing::error!("cannot record a receipt: {e:#}");
                }
            }
            NodeEvent::Rejected { from, reason } => {
                tracing::debug!(
                    "rejected a message from {}: {reason}",
                    from.map_or_else(|| "gossip".to_owned(), |n| n.to_peer_id())
                );
            }
        }
    }

    fn start(&mut self, relay: NodeId, lease: Lease) {
        let key = (lease.job_id, lease.lease);
        tracing::info!("running job {} lease {} ({})", key.0, key.1, lease.spec.name);
        let cancel = CancellationToken::new();
        self.running.insert(
            key,
            Running {
                lease: lease.clone(),
                cancel: cancel.clone(),
                started_ms: now_ms(),
                percent: 0,
                cancelled: false,
            },
        );
        let mut ctx = self.ctx.clone();
        ctx.relay_peer = aimatrix_net::peer_id_of(&relay);
        let task = run::run_lease(ctx, lease, cancel, self.updates_tx.clone());
        self.runs.spawn(task);
    }

    fn status_view(&self) -> StatusView {
        let net = NetView {
            listen_addrs: self.listen_addrs.iter().map(ToString::to_string).collect(),
            connected_peers: self.connected.iter().map(ToString::to_string).collect(),
            relays: self
                .core
                .relays()
                .into_iter()
                .map(|(relay, trust)| {
                    let peer = aimatrix_net::peer_id_of(&relay);
                    let (address, vouched_by) = match trust {
                        RelayTrust::Given => {
                            let addr = self.given.iter().find(|(p, _)| *p == peer);
                            (addr.map(|(_, a)| a.to_string()).unwrap_or_default(), None)
                        }
                        RelayTrust::Vouched { by, addrs } => {
                            (addrs.first().cloned().unwrap_or_default(), Some(by.to_peer_id()))
                        }
                    };
                    RelayView {
                        peer_id: peer.to_string(),
                        address,
                        connected: self.connected.contains(&peer),
                        vouched_by,
                    }
                })
                .collect(),
            network: self.ctx.net.stats(),
        };
        StatusView::from_core(
            &self.core,
            self.core.config().accept,
            net,
            self.tally,
            self.history.earned(),
            self.history.jobs_run(),
        )
    }
}
