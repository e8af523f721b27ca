//! What a simulated training run reports: one row per aggregated round and a summary.

use aimatrix_protocol::job::{Aggregation, Compression};
use serde::Serialize;

use super::Attack;

/// One aggregated round.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRow {
    /// The round, from 0.
    pub round: u32,
    /// Participants leased in the round.
    pub participants: usize,
    /// Updates returned in time.
    pub received: usize,
    /// Leases that expired without an answer.
    pub dropped: usize,
    /// Updates aggregated (and paid).
    pub accepted: usize,
    /// Updates refused.
    pub rejected: usize,
    /// Update bytes received.
    pub bytes: u64,
    /// Mean cross-entropy of the new model on the test split.
    pub test_loss: f32,
    /// Accuracy of the new model on the test split, 0 to 1.
    pub test_accuracy: f32,
}

/// The run, as `aimatrix-sim train --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Test accuracy of the final model, 0 to 1.
    pub accuracy: f32,
    /// Test accuracy of the centralized baseline (same model, `train`, 100 epochs).
    pub baseline_accuracy: f32,
    /// Rounds aggregated.
    pub rounds: usize,
    /// Update bytes received per round.
    pub bytes_per_round: f64,
    /// Bytes of one update, on average.
    pub bytes_per_update: f64,
    /// Bytes of one uncompressed update.
    pub raw_update_bytes: usize,
    /// `raw_update_bytes / bytes_per_update`.
    pub compression_ratio: f64,
    /// The first round (counted from 1) whose model reached 96 % test accuracy.
    pub rounds_to_96: Option<u32>,
    /// Test loss of the final model.
    pub final_loss: f32,
    /// How the job ended: `completed`, `failed: …`, `refused: …` or `running`.
    pub job: String,
    /// Participant seats.
    pub nodes: u32,
    /// Standby nodes.
    pub standby: u32,
    /// Nodes that took at least one lease.
    pub nodes_leased: usize,
    /// Byzantine participants.
    pub byzantine: u32,
    /// What the Byzantine participants sent.
    pub attack: Attack,
    /// The aggregation rule.
    pub aggregation: Aggregation,
    /// The update compression.
    pub compression: Compression,
    /// The norm check's ratio (0: off).
    pub max_norm_ratio: f64,
    /// Probability that a participant dropped out of a round.
    pub drop_rate: f64,
    /// The seed of the run.
    pub seed: u64,
    /// Updates returned in time, over all rounds.
    pub updates_received: usize,
    /// Updates aggregated.
    pub updates_accepted: usize,
    /// Updates refused.
    pub updates_rejected: usize,
    /// Updates paid.
    pub updates_paid: usize,
    /// Verifying re-runs paid (`--verify-share`).
    pub reruns_paid: usize,
    /// Payments to a node whose update the last aggregation did not accept (must be 0).
    pub paid_not_accepted: usize,
    /// Leases a participant dropped.
    pub leases_dropped: usize,
    /// Rounds that closed without a quorum.
    pub rounds_failed: usize,
    /// Credits the job escrowed.
    pub credits_escrowed: u64,
    /// Credits paid out (node amounts and fees).
    pub credits_paid: u64,
    /// Credits returned to the requester.
    pub credits_refunded: u64,
    /// Whether the escrow closed with paid + refunded = escrowed and nothing left held.
    pub escrow_balanced: bool,
    /// Messages the relay rejected.
    pub relay_rejections: u64,
    /// Simulated time the run took, in seconds.
    pub simulated_s: f64,
    /// Every aggregated round.
    pub per_round: Vec<RoundRow>,
}
