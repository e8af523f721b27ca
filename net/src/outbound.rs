//! Bounded sending for a driver: one gossip publisher and one ordered queue per peer.
//!
//! A driver's event loop must never wait on the network, and it must not spawn a task per
//! message either: under load that is an unbounded pile of tasks, each holding its bytes, all
//! racing into the swarm's command channel (the relay once grew to 2 GB this way). [`Outbound`]
//! gives the loop two non-blocking calls:
//!
//! - [`Outbound::publish`] puts a gossip message on one bounded queue, drained by one task. When
//!   the queue is full the message is dropped and counted: gossip is announcement, repeated by
//!   the protocol (offers are re-announced, adverts refreshed).
//! - [`Outbound::send`] puts a direct message on the queue of its peer. Each peer's queue is
//!   drained in order by its own task, which retries while the peer cannot be reached or
//!   answers busy, for at most the configured time. A peer that stays unreachable therefore
//!   only delays its own messages. A full peer queue drops the message and counts it (the
//!   protocol recovers: a node claims again, a lease runs to its deadline). Drops are counted
//!   and logged (at 1, 2, 4, ... of them); failed sends are logged one by one.
//!
//! [`Outbound::flush`] waits (bounded) until everything queued has been sent, for a clean exit.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinSet;

use crate::{DirectRequest, DirectResponse, NetHandle, PeerId, Topic};

/// Gossip messages waiting to be published, at most.
pub const GOSSIP_QUEUE_MAX: usize = 4096;
/// Direct messages waiting for one peer, at most.
pub const PEER_QUEUE_MAX: usize = 1024;
/// A peer's sender task stops after this long without messages (a new one starts on demand).
const PEER_IDLE: Duration = Duration::from_secs(30);

/// The sending side of a driver (see the module docs).
#[derive(Debug)]
pub struct Outbound {
    net: NetHandle,
    /// `None` once flushed.
    gossip: Option<mpsc::Sender<(Topic, Vec<u8>)>>,
    peers: HashMap<PeerId, mpsc::Sender<Vec<u8>>>,
    retry_for: Duration,
    /// Gossip messages dropped because the queue was full (logged at powers of two).
    gossip_dropped: u64,
    /// Direct messages dropped because their peer's queue was full (logged likewise).
    direct_dropped: u64,
    tasks: JoinSet<()>,
}

impl Outbound {
    /// Sends through `net`; a direct message is retried for at most `retry_for`. Must be
    /// called inside a tokio runtime (it starts the publisher task).
    pub fn new(net: NetHandle, retry_for: Duration) -> Self {
        let (gossip, rx) = mpsc::channel(GOSSIP_QUEUE_MAX);
        let mut tasks = JoinSet::new();
        tasks.spawn(publish_all(net.clone(), rx));
        Self {
            net,
            gossip: Some(gossip),
            peers: HashMap::new(),
            retry_for,
            gossip_dropped: 0,
            direct_dropped: 0,
            tasks,
        }
    }

    /// Queues `bytes` for gossip on `topic`; never waits.
    pub fn publish(&mut self, topic: Topic, bytes: Vec<u8>) {
        let Some(gossip) = &self.gossip else { return };
        if let Err(TrySendError::Full(_)) = gossip.try_send((topic, bytes)) {
            self.gossip_dropped += 1;
            if self.gossip_dropped.is_power_of_two() {
                tracing::warn!(dropped = self.gossip_dropped, "gossip queue full: message dropped");
            }
        }
    }

    /// Queues a sealed protocol message for `peer`, after every message queued for it before;
    /// never waits.
    pub fn send(&mut self, peer: PeerId, bytes: Vec<u8>) {
        self.reap();
        let mut bytes = bytes;
        // Twice at most: a queue whose task just stopped for idleness is replaced once.
        for _ in 0..2 {
            let queue = match self.peers.get(&peer) {
                Some(queue) => queue.clone(),
                None => self.start_peer(peer),
            };
            match queue.try_send(bytes) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    self.direct_dropped += 1;
                    let dropped = self.direct_dropped;
                    if dropped.is_power_of_two() {
                        tracing::warn!(%peer, dropped, "queue to peer full: message dropped");
                    }
                    return;
                }
                Err(TrySendError::Closed(back)) => {
                    self.peers.remove(&peer);
                    bytes = back;
                }
            }
        }
    }

    /// Stops taking messages and waits until every queued one has been sent or given up, for
    /// at most `limit`. Returns whether everything went out in time.
    pub async fn flush(&mut self, limit: Duration) -> bool {
        self.peers.clear();
        self.gossip = None;
        let tasks = &mut self.tasks;
        tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_ok()
    }

    fn start_peer(&mut self, peer: PeerId) -> mpsc::Sender<Vec<u8>> {
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        self.tasks.spawn(send_all(self.net.clone(), peer, rx, self.retry_for));
        self.peers.insert(peer, tx.clone());
        tx
    }

    /// Forgets finished sender tasks.
    fn reap(&mut self) {
        while self.tasks.try_join_next().is_some() {}
        self.peers.retain(|_, queue| !queue.is_closed());
    }
}

async fn publish_all(net: NetHandle, mut queue: mpsc::Receiver<(Topic, Vec<u8>)>) {
    while let Some((topic, bytes)) = queue.recv().await {
        if let Err(e) = net.publish(topic, bytes).await {
            tracing::debug!("publish on {} failed: {e}", topic.name());
        }
    }
}

async fn send_all(
    net: NetHandle,
    peer: PeerId,
    mut queue: mpsc::Receiver<Vec<u8>>,
    retry_for: Duration,
) {
    loop {
        let bytes = match tokio::time::timeout(PEER_IDLE, queue.recv()).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return,
            Err(_) => {
                // Idle: stop taking messages, but send what slipped in before the close.
                queue.close();
                while let Some(bytes) = queue.recv().await {
                    send_one(&net, peer, bytes, retry_for).await;
                }
                return;
            }
        };
        send_one(&net, peer, bytes, retry_for).await;
    }
}

async fn send_one(net: &NetHandle, peer: PeerId, bytes: Vec<u8>, retry_for: Duration) {
    let make = || DirectRequest::Message(bytes.clone());
    match net.request_retrying(peer, make, retry_for).await {
        Ok(DirectResponse::Accepted) => {}
        Ok(other) => tracing::warn!("{peer} did not take a message: {other:?}"),
        Err(e) => tracing::warn!("cannot reach {peer}: {e}"),
    }
}
