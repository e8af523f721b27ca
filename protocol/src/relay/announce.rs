//! Announcement: when an open job's offer goes out again, and which nodes it names first.

use std::collections::HashMap;

use super::{JobState, LeaseStatus, RelayCore, RelayJob};
use crate::capability::CapabilityProfile;
use crate::identity::NodeId;
use crate::job::JobSpec;
use crate::matching::{self, Mismatch};
use crate::messages::{claim_order_key, JobId, Message, Offer, PREFERRED_CLAIMANTS_MAX};
use crate::outbox::Topic;
use crate::time::Millis;

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

impl RelayCore {
    /// A slot of `job_id` opened (posted, a lease failed or expired, a round needs seats):
    /// announce it now, to a targeted set of nodes again.
    pub(super) fn announce_due(&mut self, now: Millis, job_id: JobId) {
        if let Some(job) = self.jobs.get_mut(&job_id) {
            if job.state == JobState::Open && job.open_slots() > 0 {
                job.announce_at_ms = job.announce_at_ms.min(now);
                job.announce_round = 0;
            }
        }
        self.announce(now);
    }

    /// Announces every open job whose announcement is due.
    pub(super) fn announce(&mut self, now: Millis) {
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
                // A spec is at most half a frame (checked at post), the preferred list bounded.
                panic!("an offer always fits a frame: {e}");
            }
        }
    }

    /// Slots each node is using or promised, as far as this relay knows: its active leases,
    /// plus the offers that named it within `targeted_wait_ms` and that it has not claimed yet
    /// (while they still have open slots).
    pub(super) fn busy_by_node(&self, now: Millis) -> HashMap<NodeId, u32> {
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
    /// free slots first, then nodes connected to this relay (the offer reaches them first and
    /// their claim needs no new connection), ties spread by [`claim_order_key`]. Each one chosen takes a slot in
    /// `busy`, so one announcement of many jobs spreads them over the nodes. Empty when no
    /// indexed node fits: the offer is then open to every node.
    pub(super) fn preferred_claimants(
        &self,
        job: &RelayJob,
        count: usize,
        busy: &mut HashMap<NodeId, u32>,
    ) -> Vec<NodeId> {
        // (free slots, not connected, claim order key, node)
        let mut candidates: Vec<(u32, bool, u64, NodeId)> = self
            .adverts
            .iter()
            .filter(|(node, _)| !job.excluded.contains(node))
            .filter(|(node, _)| !job.leases.values().any(|l| l.node == **node))
            .filter_map(|(node, (_, profile))| {
                let max = profile.policy.max_concurrent_jobs;
                let free = max.saturating_sub(busy.get(node).copied().unwrap_or(0));
                let far = !self.connected.contains(node);
                (free > 0 && serves_ignoring_load(&job.spec, profile))
                    .then(|| (free, far, claim_order_key(node, &job.id), *node))
            })
            .collect();
        let count = count.min(candidates.len());
        if count == 0 {
            return Vec::new();
        }
        let by_preference = |a: &(u32, bool, u64, NodeId), b: &(u32, bool, u64, NodeId)| {
            b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3))
        };
        if count < candidates.len() {
            candidates.select_nth_unstable_by(count - 1, by_preference);
            candidates.truncate(count);
        }
        candidates.sort_unstable_by(by_preference);
        let chosen: Vec<NodeId> = candidates.into_iter().map(|(_, _, _, node)| node).collect();
        for node in &chosen {
            *busy.entry(*node).or_default() += 1;
        }
        chosen
    }
}
