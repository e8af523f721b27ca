//! Faults beyond crashes: partitions (scheduled and random) and Byzantine nodes that send
//! forged or replayed envelopes.

use std::rc::Rc;

use aimatrix_protocol::codec;
use aimatrix_protocol::envelope::Envelope;
use rand::RngExt;

use super::{exponential, Behaviour, Carried, Endpoint, Event, Sim, EPOCH_MS};

impl Sim {
    /// Schedules the scenario's partitions and the first random partition and forgery.
    pub(super) fn schedule_faults(&mut self) {
        for p in self.sc.faults.partitions.clone() {
            let event = Event::PartitionStart { share: p.share, duration_ms: p.duration_s * 1000 };
            self.queue.push(EPOCH_MS + p.at_s * 1000, event);
        }
        self.schedule_random_partition();
        self.schedule_forgery();
    }

    fn schedule_random_partition(&mut self) {
        let per_s = self.sc.faults.random_partitions_per_hour / 3600.0;
        if per_s > 0.0 {
            let gap_ms = exponential(&mut self.rng, per_s) * 1000.0;
            self.queue.push(self.now + gap_ms as u64 + 1, Event::RandomPartition);
        }
    }

    fn schedule_forgery(&mut self) {
        let liars = self.nodes.iter().filter(|n| n.behaviour == Behaviour::Byzantine).count();
        let per_s = self.sc.faults.forgeries_per_byzantine_hour * liars as f64 / 3600.0;
        if per_s > 0.0 {
            let gap_ms = exponential(&mut self.rng, per_s) * 1000.0;
            self.queue.push(self.now + gap_ms as u64 + 1, Event::Forge);
        }
    }

    pub(super) fn random_partition(&mut self) {
        let (share, s) = (self.sc.faults.random_partition_share, self.sc.faults.random_partition_s);
        self.partition_start(share, s * 1000);
        self.schedule_random_partition();
    }

    /// Cuts a random `share` of the nodes off from the rest and from every relay, until
    /// `duration_ms` later. One partition at a time: a second one while one holds is skipped.
    pub(super) fn partition_start(&mut self, share: f64, duration_ms: u64) {
        if self.partitioned || share <= 0.0 {
            return;
        }
        for i in 0..self.nodes.len() {
            self.nodes[i].cut = self.rng.random_bool(share);
        }
        self.partitioned = true;
        self.summary.partitions += 1;
        self.queue.push(self.now + duration_ms.max(1), Event::PartitionEnd);
    }

    pub(super) fn partition_end(&mut self) {
        self.partitioned = false;
        for n in &mut self.nodes {
            n.cut = false;
        }
    }

    /// A running Byzantine node sends one forged or replayed envelope: a genuine offer with its
    /// payload altered, a genuine offer re-signed in name only (its signer swapped for the
    /// liar), or another node's direct message to a relay replayed as its own.
    pub(super) fn forge(&mut self) {
        self.schedule_forgery();
        let liars: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|&i| {
                let n = &self.nodes[i as usize];
                n.up && n.behaviour == Behaviour::Byzantine
            })
            .collect();
        if liars.is_empty() || self.nodes.len() < 2 {
            return;
        }
        let liar = liars[self.rng.random_range(0..liars.len())];
        let kind = self.rng.random_range(0..3u32);
        let (to, bytes) = match (kind, &self.last_to_relay, &self.last_offer) {
            (2, Some((origin, relay, bytes)), _) if *origin != liar => {
                (Endpoint::Relay(*relay), bytes.clone())
            }
            (_, _, Some(offer)) => {
                let Ok(mut envelope) = codec::decode::<Envelope>(offer) else { return };
                if kind == 1 {
                    envelope.signer = self.nodes[liar as usize].core.id();
                } else if let Some(last) = envelope.payload.last_mut() {
                    *last ^= 0x01;
                } else {
                    envelope.signature.0[0] ^= 0x01;
                }
                let Ok(bytes) = codec::encode(&envelope) else { return };
                let mut target = self.rng.random_range(0..self.nodes.len() as u32);
                if target == liar {
                    target = (target + 1) % self.nodes.len() as u32;
                }
                (Endpoint::Node(target), Rc::from(bytes))
            }
            _ => return,
        };
        self.summary.forgeries.sent += 1;
        let from = Endpoint::Node(liar);
        let now = self.now;
        self.send_copy(from, to, Some(from), Carried::Forged, &bytes, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::Invariant;
    use crate::Scenario;

    #[test]
    fn a_forgery_a_core_accepts_fails_the_run() {
        let sc = Scenario { nodes: 20, duration_s: 600, ..Scenario::default() };
        let mut sim = Sim::new(sc);
        while sim.last_offer.is_none() {
            let (at, event) = sim.queue.pop_until(sim.end).expect("an offer within 10 minutes");
            sim.now = at;
            sim.step += 1;
            sim.handle(event);
        }
        let offer = sim.last_offer.clone().expect("an offer");
        let mut altered = codec::decode::<Envelope>(&offer).expect("an envelope");
        altered.payload[0] ^= 1;
        let altered: Rc<[u8]> = codec::encode(&altered).expect("encodes").into();
        let liar = Some(Endpoint::Node(1));
        sim.deliver(Endpoint::Node(0), liar, sim.now, Carried::Forged, &altered);
        assert!(sim.violation.is_none(), "an altered offer is rejected");
        assert_eq!(sim.summary.forgeries.rejected, 1);
        // A deliberately broken forger: the "forgery" is the genuine offer, not yet delivered,
        // so the node accepts it and the check must fire.
        sim.deliver(Endpoint::Node(0), liar, sim.now, Carried::Forged, &offer);
        let v = sim.violation.expect("the accepted forgery is caught");
        assert_eq!(v.invariant, Invariant::ForgeriesRejected);
    }
}
