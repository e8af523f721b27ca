//! Checking the updates of one round before they are aggregated.
//!
//! [`validate`] gives every update a [`Verdict`], in the order given:
//!
//! 1. **Shape**: its length must equal the model's parameter count.
//! 2. **Finite**: no NaN or infinity.
//! 3. **Norm**: among the updates that passed 1 and 2, let `m` be the median of their L2
//!    norms (the mean of the two middle ones for an even count). An update whose norm is
//!    above `max_norm_ratio · m` is rejected as far too large (a scaled or noise update), and
//!    one below `min_norm_ratio · m` as far too small (a free rider sending next to nothing).
//!    The rule is scale-free, so it follows the updates as they shrink over training, and the
//!    median is set by the honest majority: a minority cannot move it past the middle honest
//!    norm. With `m = 0` (every update zero) or fewer than [`MIN_UPDATES_FOR_NORM_CHECK`]
//!    updates, there is no distribution to compare with and the norm check is skipped.
//!
//! The defaults ([`NormCheck::default`]) are `max_norm_ratio = 4` and `min_norm_ratio = 0`
//! (off): honest deltas of one round, on IID chunks of the same size, have norms within a
//! factor of about 1.5 of each other, so 4 leaves room for non-IID chunks while an update
//! scaled by 10 is caught at once.

use std::fmt;

use crate::aggregate::l2_norm;

/// The fewest valid updates for which the norm rule is applied; below it every update of the
/// right shape with finite values is accepted.
pub const MIN_UPDATES_FOR_NORM_CHECK: usize = 3;

/// The parameters of the norm rule (step 3 in the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormCheck {
    /// `k`: reject an update whose norm is above `k` times the round's median norm.
    /// `f64::INFINITY` turns the upper bound off.
    pub max_norm_ratio: f64,
    /// Reject an update whose norm is below this times the median norm; 0 turns it off.
    pub min_norm_ratio: f64,
}

impl Default for NormCheck {
    fn default() -> Self {
        Self { max_norm_ratio: 4.0, min_norm_ratio: 0.0 }
    }
}

impl NormCheck {
    /// No norm check at all: only shape and finiteness are validated.
    pub const OFF: Self = Self { max_norm_ratio: f64::INFINITY, min_norm_ratio: 0.0 };
}

/// What [`validate`] decided about one update.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The update may be aggregated (and its sender paid). Carries its L2 norm.
    Accepted {
        /// The update's L2 norm.
        norm: f64,
    },
    /// The update is refused, with the reason.
    Rejected(Rejection),
}

impl Verdict {
    /// Whether the update was accepted.
    pub fn is_accepted(&self) -> bool {
        matches!(self, Self::Accepted { .. })
    }
}

/// Why an update was refused. Its `Display` is the reason a participant is told.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// The update does not have one value per model parameter.
    Length {
        /// The model's parameter count.
        expected: usize,
        /// The update's length.
        found: usize,
    },
    /// A value is NaN or infinite.
    NonFinite {
        /// Index of the first such value.
        index: usize,
    },
    /// The norm is above `max_norm_ratio` times the round's median norm.
    NormTooLarge {
        /// The update's L2 norm.
        norm: f64,
        /// The round's median norm.
        median: f64,
        /// The ratio allowed.
        max_ratio: f64,
    },
    /// The norm is below `min_norm_ratio` times the round's median norm.
    NormTooSmall {
        /// The update's L2 norm.
        norm: f64,
        /// The round's median norm.
        median: f64,
        /// The ratio required.
        min_ratio: f64,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length { expected, found } => {
                write!(f, "the update has {found} values but the model has {expected} parameters")
            }
            Self::NonFinite { index } => write!(f, "update value {index} is NaN or infinite"),
            Self::NormTooLarge { norm, median, max_ratio } => write!(
                f,
                "the update's L2 norm {norm:.4e} is more than {max_ratio} times the round's \
                 median norm {median:.4e}"
            ),
            Self::NormTooSmall { norm, median, min_ratio } => write!(
                f,
                "the update's L2 norm {norm:.4e} is less than {min_ratio} times the round's \
                 median norm {median:.4e}"
            ),
        }
    }
}

/// Judges each of a round's updates against a model of `param_count` parameters (rules in
/// the [module docs](self)). The verdicts are in the order of `updates`.
pub fn validate<U: AsRef<[f32]>>(
    updates: &[U],
    param_count: usize,
    check: &NormCheck,
) -> Vec<Verdict> {
    let mut verdicts: Vec<Verdict> = updates
        .iter()
        .map(|update| {
            let update = update.as_ref();
            if update.len() != param_count {
                return Verdict::Rejected(Rejection::Length {
                    expected: param_count,
                    found: update.len(),
                });
            }
            match update.iter().position(|x| !x.is_finite()) {
                Some(index) => Verdict::Rejected(Rejection::NonFinite { index }),
                None => Verdict::Accepted { norm: l2_norm(update) },
            }
        })
        .collect();
    let mut norms: Vec<f64> = verdicts
        .iter()
        .filter_map(|v| match v {
            Verdict::Accepted { norm } => Some(*norm),
            Verdict::Rejected(_) => None,
        })
        .collect();
    if norms.len() < MIN_UPDATES_FOR_NORM_CHECK {
        return verdicts;
    }
    norms.sort_by(f64::total_cmp);
    let middle = norms.len() / 2;
    let median = if norms.len() % 2 == 1 {
        norms[middle]
    } else {
        (norms[middle - 1] + norms[middle]) / 2.0
    };
    if median <= 0.0 {
        return verdicts;
    }
    for verdict in &mut verdicts {
        let Verdict::Accepted { norm } = *verdict else { continue };
        if norm > check.max_norm_ratio * median {
            *verdict = Verdict::Rejected(Rejection::NormTooLarge {
                norm,
                median,
                max_ratio: check.max_norm_ratio,
            });
        } else if norm < check.min_norm_ratio * median {
            *verdict = Verdict::Rejected(Rejection::NormTooSmall {
                norm,
                median,
                min_ratio: check.min_norm_ratio,
            });
        }
    }
    verdicts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaled(norm: f32) -> Vec<f32> {
        // A vector of length 4 with L2 norm `norm`.
        vec![norm / 2.0; 4]
    }

    #[test]
    fn shape_and_finiteness_come_first() {
        let updates = [vec![1.0, 2.0], vec![1.0], vec![0.0, f32::NAN], vec![f32::INFINITY, 0.0]];
        let verdicts = validate(&updates, 2, &NormCheck::default());
        assert_eq!(verdicts[0], Verdict::Accepted { norm: 5.0_f64.sqrt() });
        assert_eq!(verdicts[1], Verdict::Rejected(Rejection::Length { expected: 2, found: 1 }));
        assert_eq!(verdicts[2], Verdict::Rejected(Rejection::NonFinite { index: 1 }));
        assert_eq!(verdicts[3], Verdict::Rejected(Rejection::NonFinite { index: 0 }));
        let reason = match &verdicts[1] {
            Verdict::Rejected(r) => r.to_string(),
            Verdict::Accepted { .. } => String::new(),
        };
        assert!(reason.contains("1 values but the model has 2"), "{reason}");
    }

    #[test]
    fn a_scaled_update_is_rejected_and_honest_ones_are_not() {
        let mut updates: Vec<Vec<f32>> = (0..8).map(|i| scaled(1.0 + 0.05 * i as f32)).collect();
        updates.push(scaled(-10.0));
        updates.push(scaled(12.0));
        let verdicts = validate(&updates, 4, &NormCheck::default());
        assert!(verdicts[..8].iter().all(Verdict::is_accepted), "{verdicts:?}");
        for verdict in &verdicts[8..] {
            let Verdict::Rejected(Rejection::NormTooLarge { norm, median, max_ratio }) = verdict
            else {
                panic!("expected a norm rejection, got {verdict:?}");
            };
            assert!(*norm > 9.0 && *median < 1.5 && *max_ratio == 4.0);
        }
    }

    #[test]
    fn the_lower_bound_catches_free_riders_when_enabled() {
        let mut updates: Vec<Vec<f32>> = (0..5).map(|_| scaled(1.0)).collect();
        updates.push(vec![0.0; 4]);
        let default = validate(&updates, 4, &NormCheck::default());
        assert!(default.iter().all(Verdict::is_accepted));
        let strict = NormCheck { min_norm_ratio: 0.1, ..NormCheck::default() };
        let verdicts = validate(&updates, 4, &strict);
        assert!(matches!(verdicts[5], Verdict::Rejected(Rejection::NormTooSmall { .. })));
        assert!(verdicts[..5].iter().all(Verdict::is_accepted));
    }

    #[test]
    fn the_norm_rule_needs_a_distribution() {
        // Two updates: nothing to compare with.
        let verdicts = validate(&[scaled(1.0), scaled(100.0)], 4, &NormCheck::default());
        assert!(verdicts.iter().all(Verdict::is_accepted));
        // All zero: the median is zero, nothing is "far" from it.
        let zeros = vec![vec![0.0_f32; 4]; 5];
        assert!(validate(&zeros, 4, &NormCheck::default()).iter().all(Verdict::is_accepted));
        // Off really is off.
        let updates = [scaled(1.0), scaled(1.0), scaled(1.0), scaled(1e30)];
        assert!(validate(&updates, 4, &NormCheck::OFF).iter().all(Verdict::is_accepted));
    }

    #[test]
    fn a_malformed_update_does_not_count_towards_the_median() {
        // Three honest updates of norm 1 and three malformed ones: the median is 1.
        let updates =
            [scaled(1.0), scaled(1.0), scaled(1.0), vec![1e30; 3], vec![f32::NAN; 4], scaled(5.0)];
        let verdicts = validate(&updates, 4, &NormCheck::default());
        assert!(matches!(verdicts[5], Verdict::Rejected(Rejection::NormTooLarge { .. })));
    }
}
