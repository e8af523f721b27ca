//! A training job's parameters mapped to the maths and to the guest's command line.

use aimatrix_mlp::{Codec, NormCheck, Rule};
use aimatrix_protocol::job::{Aggregation, Compression, TrainingParams};

/// What a training job's `[training]` section means for the maths and the guest.
pub trait TrainingParamsExt {
    /// The update codec participants compress with.
    fn codec(&self) -> Codec;
    /// Whether participants keep error-feedback memory between rounds (top-k only).
    fn error_feedback(&self) -> bool;
    /// The aggregation rule, with the defaults of docs/training.md.
    fn rule(&self) -> Rule;
    /// The norm check every update passes before aggregation.
    fn norm_check(&self) -> NormCheck;
    /// The `train-step` guest's arguments for one round (its inputs and outputs directories
    /// are the sandbox's defaults).
    fn step_args(&self) -> Vec<String>;
}

impl TrainingParamsExt for TrainingParams {
    fn codec(&self) -> Codec {
        match self.compression {
            Compression::None => Codec::None,
            Compression::Fp16 => Codec::Fp16,
            Compression::Int8 => Codec::int8(),
            Compression::Topk => Codec::TopK { fraction: self.topk_fraction },
        }
    }

    fn error_feedback(&self) -> bool {
        self.compression == Compression::Topk
    }

    fn rule(&self) -> Rule {
        match self.aggregation {
            Aggregation::Mean => Rule::Mean,
            Aggregation::Median => Rule::Median,
            Aggregation::TrimmedMean => Rule::trimmed_mean(),
            Aggregation::CenteredClip => Rule::centered_clip(),
        }
    }

    fn norm_check(&self) -> NormCheck {
        if self.max_norm_ratio == 0.0 {
            NormCheck::OFF
        } else {
            NormCheck { max_norm_ratio: self.max_norm_ratio, ..NormCheck::default() }
        }
    }

    fn step_args(&self) -> Vec<String> {
        let mut args = vec![
            "--epochs".to_owned(),
            self.local_epochs.to_string(),
            "--lr".to_owned(),
            self.learning_rate.to_string(),
            "--batch".to_owned(),
            self.batch_size.to_string(),
            "--compression".to_owned(),
            self.codec().name().to_owned(),
        ];
        if let Codec::TopK { fraction } = self.codec() {
            args.extend(["--topk-fraction".to_owned(), fraction.to_string()]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::params;

    #[test]
    fn params_map_to_the_maths_and_the_guest_command_line() {
        let p = params(4);
        assert_eq!(p.codec(), Codec::TopK { fraction: 0.05 });
        assert!(p.error_feedback());
        assert_eq!(p.rule().name(), "centered_clip");
        assert_eq!(
            p.step_args(),
            [
                "--epochs",
                "2",
                "--lr",
                "0.1",
                "--batch",
                "8",
                "--compression",
                "topk",
                "--topk-fraction",
                "0.05"
            ]
        );
        let off = TrainingParams { max_norm_ratio: 0.0, ..params(4) };
        assert_eq!(off.norm_check(), NormCheck::OFF);
        let int8 = TrainingParams { compression: Compression::Int8, ..params(4) };
        assert!(!int8.error_feedback());
        assert!(!int8.step_args().contains(&"--topk-fraction".to_owned()));
    }
}
