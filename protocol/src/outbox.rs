//! What the cores hand to their drivers: bytes to send, and the signing that produces them.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::codec::EncodeError;
use crate::identity::{Keypair, NodeId};
use crate::messages::{seal, Message, NonceGen};
use crate::time::Millis;

/// A gossip topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Topic {
    /// Capability adverts (the driver also stores them in Kademlia).
    Adverts,
    /// Job offers.
    Offers,
    /// Relays' rosters (the relays each vouches for).
    Relays,
}

impl Topic {
    /// Every topic, in a fixed order.
    pub const ALL: [Self; 3] = [Self::Adverts, Self::Offers, Self::Relays];

    /// The gossipsub topic name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Adverts => "aimatrix/adverts/1",
            Self::Offers => "aimatrix/offers/1",
            Self::Relays => "aimatrix/relays/1",
        }
    }
}

/// Bytes for the driver to send: an encoded signed envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// Publish on a gossip topic.
    Broadcast {
        /// The topic.
        topic: Topic,
        /// The encoded envelope.
        bytes: Vec<u8>,
    },
    /// Send to one peer (request-response).
    Direct {
        /// The peer.
        to: NodeId,
        /// The encoded envelope.
        bytes: Vec<u8>,
    },
}

impl Transmit {
    /// The encoded envelope.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Broadcast { bytes, .. } | Self::Direct { bytes, .. } => bytes,
        }
    }
}

/// Signs messages and queues them; shared by both cores.
#[derive(Debug)]
pub(crate) struct Outbox {
    key: Keypair,
    nonces: NonceGen,
    ttl_ms: u64,
    queue: VecDeque<Transmit>,
}

impl Outbox {
    pub(crate) fn new(key: Keypair, nonce_seed: u64, ttl_ms: u64) -> Self {
        Self { key, nonces: NonceGen::new(nonce_seed), ttl_ms, queue: VecDeque::new() }
    }

    pub(crate) fn id(&self) -> NodeId {
        self.key.public()
    }

    fn seal(&mut self, now: Millis, msg: &Message, ttl_ms: u64) -> Result<Vec<u8>, EncodeError> {
        let nonce = self.nonces.next_nonce();
        seal(&self.key, msg, nonce, now, ttl_ms)
    }

    /// Queues `msg` for `to`.
    pub(crate) fn send(
        &mut self,
        now: Millis,
        to: NodeId,
        msg: &Message,
    ) -> Result<(), EncodeError> {
        let bytes = self.seal(now, msg, self.ttl_ms)?;
        self.queue.push_back(Transmit::Direct { to, bytes });
        Ok(())
    }

    /// Queues `msg` on `topic`, valid for `ttl_ms`.
    pub(crate) fn broadcast(
        &mut self,
        now: Millis,
        topic: Topic,
        msg: &Message,
        ttl_ms: u64,
    ) -> Result<(), EncodeError> {
        let bytes = self.seal(now, msg, ttl_ms)?;
        self.queue.push_back(Transmit::Broadcast { topic, bytes });
        Ok(())
    }

    pub(crate) fn pop(&mut self) -> Option<Transmit> {
        self.queue.pop_front()
    }
}
