//! Restoring jobs after a restart.
//!
//! The relay core keeps its jobs in memory. A driver stores each [`RelayJob`] (it serializes,
//! private fields included) after every change, and after a restart builds a fresh
//! [`RelayCore`] with the same key and a fresh nonce seed and hands every stored job to
//! [`RelayCore::restore_job`]. The replay cache and the node adverts are not restored.

use super::{CommandError, JobState, RelayCore, RelayEvent, RelayJob};
use crate::job::JobKind;
use crate::time::Millis;

impl RelayCore {
    /// Reinstates a job stored before a restart, exactly as stored: state, leases and their
    /// deadlines, exclusions, counters and training state. Restore every stored job before
    /// posting new ones; ids posted afterwards never collide with restored ones.
    ///
    /// The job then goes on as if the relay had never stopped. An open job is brought up to
    /// `now` at once, the way [`RelayCore::handle_timeout`] would (leases past their deadline
    /// expire, a job past its deadline fails), and re-announced if it has free slots. A job in
    /// `Reserving` re-emits its identical [`crate::ledger::LedgerOp::Reserve`] for the driver to apply (the
    /// ledger answers idempotently) and confirm. A training round waiting for aggregation
    /// re-emits [`RelayEvent::RoundClosed`]. A finished job is kept for queries and never acts.
    ///
    /// Fails with [`CommandError::AlreadyKnown`] if the relay holds the job id, and with
    /// [`CommandError::Invalid`] if the job was posted under another relay key or its records
    /// contradict each other (corrupted storage); the relay is unchanged then.
    pub fn restore_job(&mut self, now: Millis, job: RelayJob) -> Result<(), CommandError> {
        let job_id = job.id;
        if self.jobs.contains_key(&job_id) {
            return Err(CommandError::AlreadyKnown(job_id));
        }
        self.check_restorable(&job)
            .map_err(|why| CommandError::Invalid(format!("cannot restore job {job_id}: {why}")))?;
        self.posted = self.posted.max(job.post_seq);
        let state = job.state.clone();
        let reserve = job.reserve_op();
        self.jobs.insert(job_id, job);
        match state {
            JobState::Reserving => self.events.push_back(RelayEvent::Ledger(reserve)),
            JobState::Open => {
                self.on_time(now, job_id);
                // Offers sent before the restart may never have left: announce free slots now.
                if let Some(job) = self.jobs.get_mut(&job_id).filter(|j| j.open_slots() > 0) {
                    job.announce_at_ms = job.announce_at_ms.min(now);
                }
                self.announce(now);
                self.reemit_round_closed(job_id);
            }
            JobState::Completed { .. } | JobState::Failed { .. } | JobState::Refused { .. } => {}
        }
        Ok(())
    }

    /// Why a stored job cannot be restored into this relay, if it cannot.
    fn check_restorable(&self, job: &RelayJob) -> Result<(), String> {
        if self.job_id_for(&job.requester, job.posted_at_ms, job.post_seq) != job.id {
            return Err(format!(
                "it was not posted by this relay (key {}); restore it into the relay that posted it",
                self.id()
            ));
        }
        if job.paid > job.escrow {
            return Err(format!("it paid {} out of an escrow of {}", job.paid, job.escrow));
        }
        if let Some((&n, l)) = job.leases.iter().find(|(&n, l)| n != l.lease || n >= job.next_lease)
        {
            return Err(format!("lease record {n} (lease {}) is out of sequence", l.lease));
        }
        let is_training = job.spec.kind == JobKind::Training && job.spec.training.is_some();
        if job.training.is_some() != is_training {
            return Err("its training state does not match its spec".into());
        }
        if job.state == JobState::Reserving && !job.leases.is_empty() {
            return Err("it holds leases before its escrow was confirmed".into());
        }
        match &job.training {
            None if job.active_leases() > job.spec.replication as usize => {
                Err("it has more active leases than its replication".into())
            }
            Some(t) if t.round_leases.iter().any(|n| !job.leases.contains_key(n)) => {
                Err("its training round names a lease it does not hold".into())
            }
            Some(t) if t.data.chunks.len() != t.params.participants as usize => {
                Err("its training data does not have one chunk per participant seat".into())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::codec;
    use crate::hash::Digest;
    use crate::job::{Aggregation, Compression, ContentRef, JobSpec, TrainingParams};
    use crate::messages::{seal, Claim, JobId, JobResult, Message, Outcome, Usage};
    use crate::relay::training::RoundPhase;
    use crate::relay::RelayConfig;
    use crate::testkit;

    const NOW: Millis = 1_000_000;

    fn relay(seed: u64) -> RelayCore {
        RelayCore::new(testkit::keypair(1_000), RelayConfig::default(), seed)
    }

    fn training_spec() -> JobSpec {
        let mut spec = testkit::batch_spec(3);
        spec.kind = JobKind::Training;
        spec.training = Some(TrainingParams {
            model: ContentRef::Digest(Digest::of(b"model v0")),
            dataset: ContentRef::Digest(Digest::of(b"digits")),
            participants: 3,
            rounds: 2,
            local_epochs: 1,
            learning_rate: 0.1,
            batch_size: 32,
            aggregation: Aggregation::TrimmedMean,
            compression: Compression::None,
            round_deadline_s: 60,
            quorum: 2,
            verify_share: 0.0,
            topk_fraction: 0.01,
            max_norm_ratio: 4.0,
            holdout: None,
        });
        spec
    }

    /// Signs `msg` as node `n` (nonce `nonce`).
    fn sealed(n: u64, msg: &Message, nonce: u64) -> Vec<u8> {
        seal(&testkit::keypair(n), msg, nonce, NOW, 60_000).unwrap()
    }

    fn deliver(relay: &mut RelayCore, n: u64, bytes: &[u8]) {
        relay.handle_message(NOW, Some(testkit::keypair(n).public()), bytes);
    }

    fn result(job_id: JobId, lease: u32, outcome: Outcome) -> Message {
        Message::Result(JobResult { job_id, lease, outcome, usage: Usage::default() })
    }

    fn drain(relay: &mut RelayCore) -> Vec<RelayEvent> {
        while relay.poll_transmit().is_some() {}
        std::iter::from_fn(|| relay.poll_event()).collect()
    }

    fn lease_of(relay: &RelayCore, job_id: JobId, n: u64) -> u32 {
        let node = testkit::keypair(n).public();
        relay.job(&job_id).unwrap().leases.values().find(|l| l.node == node).unwrap().lease
    }

    #[test]
    fn a_training_job_survives_a_codec_roundtrip_and_a_restore() {
        let mut before = relay(1);
        let job_id = testkit::post(&mut before, NOW, "requester", training_spec()).unwrap();
        before.reserve_confirmed(NOW, job_id).unwrap();
        for n in 1..=3 {
            deliver(&mut before, n, &sealed(n, &Message::Claim(Claim { job_id }), 1));
        }
        let update = Outcome::succeeded(Vec::new());
        let update_bytes = sealed(1, &result(job_id, lease_of(&before, job_id, 1), update), 2);
        deliver(&mut before, 1, &update_bytes);
        let failed = Outcome::Failed { reason: "out of memory".into() };
        let failed_bytes = sealed(2, &result(job_id, lease_of(&before, job_id, 2), failed), 2);
        deliver(&mut before, 2, &failed_bytes);
        drain(&mut before);

        let mut job = before.job(&job_id).unwrap().clone();
        // The one field not stored: a restored job's next announcement is targeted again.
        assert!(job.announce_round > 0);
        job.announce_round = 0;
        job.nominated = Default::default();
        let t = job.training.as_ref().unwrap();
        assert!(matches!(t.phase, RoundPhase::Running { .. }), "{:?}", t.phase);
        assert_eq!((t.participants.len(), t.round_leases.len()), (2, 3));
        assert!(job.excluded.contains(&testkit::keypair(2).public()));
        let bytes = codec::encode(&job).unwrap();
        assert!(bytes.len() < codec::MAX_FRAME_BYTES / 2, "{} bytes", bytes.len());
        let decoded: RelayJob = codec::decode(&bytes).unwrap();
        assert_eq!(decoded, job, "every field, private ones included, survives the codec");

        let mut after = relay(2);
        after.restore_job(NOW, decoded).unwrap();
        let mut restored = after.job(&job_id).unwrap().clone();
        assert_eq!(restored.announce_round, 1, "announced again, targeted, on restore");
        restored.announce_round = 0;
        restored.nominated = Default::default();
        assert_eq!(restored, job);
        assert_eq!(after.poll_timeout(), before.poll_timeout());
        // The same update again, to a relay whose replay cache is empty: the node asking for
        // its receipt before the round closed. Nothing changes; the receipt comes with the
        // round's verdict.
        deliver(&mut after, 1, &update_bytes);
        let events = drain(&mut after);
        assert!(events.is_empty(), "{events:?}");
        assert!(after.poll_transmit().is_none(), "no receipt before the round settles");
        // The last participant answers: the round closes with a quorum of two updates.
        let lease3 = lease_of(&after, job_id, 3);
        let update3 = result(job_id, lease3, Outcome::succeeded(Vec::new()));
        deliver(&mut after, 3, &sealed(3, &update3, 2));
        let events = drain(&mut after);
        assert!(
            events.iter().any(|e| matches!(e, RelayEvent::RoundClosed { round: 0, updates, .. }
                if updates.len() == 2)),
            "{events:?}"
        );
    }

    #[test]
    fn a_round_waiting_for_aggregation_asks_again_after_a_restore() {
        let mut before = relay(1);
        let job_id = testkit::post(&mut before, NOW, "requester", training_spec()).unwrap();
        before.reserve_confirmed(NOW, job_id).unwrap();
        for n in 1..=3 {
            deliver(&mut before, n, &sealed(n, &Message::Claim(Claim { job_id }), 1));
        }
        for n in 1..=3 {
            let update = result(job_id, lease_of(&before, job_id, n), Outcome::succeeded(vec![]));
            deliver(&mut before, n, &sealed(n, &update, 2));
        }
        let closed: Vec<RelayEvent> = drain(&mut before)
            .into_iter()
            .filter(|e| matches!(e, RelayEvent::RoundClosed { .. }))
            .collect();
        assert_eq!(closed.len(), 1);

        let mut after = relay(2);
        after.restore_job(NOW, before.job(&job_id).unwrap().clone()).unwrap();
        let again = drain(&mut after);
        assert_eq!(again, closed, "the same RoundClosed, for the driver to aggregate");
    }

    #[test]
    fn restore_refuses_a_known_job_a_foreign_job_and_a_corrupt_one() {
        let mut before = relay(1);
        let job_id = before.post_job(NOW, "requester", testkit::batch_spec(10)).unwrap();
        let job = before.job(&job_id).unwrap().clone();
        assert_eq!(before.restore_job(NOW, job.clone()), Err(CommandError::AlreadyKnown(job_id)));

        let mut foreign = RelayCore::new(testkit::keypair(2_000), RelayConfig::default(), 2);
        let err = foreign.restore_job(NOW, job.clone()).unwrap_err();
        assert!(err.to_string().contains("not posted by this relay"), "{err}");
        assert!(foreign.job(&job_id).is_none());

        let mut corrupt = job.clone();
        corrupt.paid = corrupt.escrow + 1;
        let mut after = relay(2);
        let err = after.restore_job(NOW, corrupt).unwrap_err();
        assert!(err.to_string().contains("out of an escrow"), "{err}");
        assert!(after.job(&job_id).is_none(), "a refused restore changes nothing");

        after.restore_job(NOW, job.clone()).unwrap();
        assert_eq!(after.restore_job(NOW, job), Err(CommandError::AlreadyKnown(job_id)));
    }

    #[test]
    fn jobs_posted_after_a_restore_get_fresh_ids() {
        // Same requester, same instant: only the count of accepted jobs tells the ids apart.
        let mut before = relay(1);
        let ids: Vec<JobId> = (0..3)
            .map(|_| before.post_job(NOW, "requester", testkit::batch_spec(1)).unwrap())
            .collect();
        let mut after = relay(2);
        for job in before.jobs() {
            after.restore_job(NOW, job.clone()).unwrap();
        }
        let fresh = after.post_job(NOW, "requester", testkit::batch_spec(1)).unwrap();
        assert!(!ids.contains(&fresh), "a new job reused a restored id");
        assert_eq!(after.jobs().count(), 4);
    }
}
