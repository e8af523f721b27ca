//! A training job's data at post: checked against the model and split for the participants.

use aimatrix_mlp::{Dataset, FormatError, Model, ShapeError};
use aimatrix_protocol::job::TrainingParams;

/// Share of the dataset held out for evaluation when the job names no `holdout`.
pub const HOLDOUT_SHARE: f64 = 0.25;

/// A training job's data, ready to lease: encoded chunks and evaluation set.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedData {
    /// One `ADSC` chunk per participant seat, in chunk order.
    pub chunks: Vec<Vec<u8>>,
    /// The `ADSC` evaluation set.
    pub holdout: Vec<u8>,
    /// Training samples over all chunks.
    pub training_samples: usize,
}

/// Why a training job's data was refused; each message names the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// `training.model` is not an `AMLP` model.
    #[error("training.model is not an aimatrix-mlp model (AMLP): {0}")]
    Model(FormatError),
    /// `training.dataset` is not an `ADSC` dataset.
    #[error("training.dataset is not an aimatrix-mlp dataset (ADSC): {0}")]
    Dataset(FormatError),
    /// `training.dataset` does not fit the model's shape.
    #[error("training.dataset does not fit the model: {0}")]
    DatasetShape(ShapeError),
    /// `training.holdout` is not an `ADSC` dataset.
    #[error("training.holdout is not an aimatrix-mlp dataset (ADSC): {0}")]
    Holdout(FormatError),
    /// `training.holdout` does not fit the model's shape.
    #[error("training.holdout does not fit the model: {0}")]
    HoldoutShape(ShapeError),
    /// Nothing is left to evaluate the model on.
    #[error(
        "the evaluation set is empty: name a training.holdout dataset, or post a dataset with at \
         least 4 samples of a label"
    )]
    EmptyEvaluation,
    /// Fewer training samples than participant seats.
    #[error(
        "training.dataset has {samples} training samples, fewer than training.participants \
         ({participants}); every participant needs at least one"
    )]
    TooFewSamples {
        /// Training samples left after the evaluation set.
        samples: usize,
        /// `training.participants`.
        participants: usize,
    },
}

/// Checks a training job's model and dataset and splits the dataset: the evaluation set is
/// `holdout` when given, otherwise a stratified [`HOLDOUT_SHARE`] of the dataset
/// ([`Dataset::hold_out`]); the rest is cut into `params.participants` consecutive chunks
/// ([`Dataset::chunks`]).
///
/// # Errors
///
/// A file that does not decode, a dataset that does not fit the model, or too few samples
/// for the participants or the evaluation.
pub fn prepare_data(
    params: &TrainingParams,
    model: &[u8],
    dataset: &[u8],
    holdout: Option<&[u8]>,
) -> Result<PreparedData, PrepareError> {
    let model = Model::decode(model).map_err(PrepareError::Model)?;
    let data = Dataset::decode(dataset).map_err(PrepareError::Dataset)?;
    model.check_dataset(&data).map_err(PrepareError::DatasetShape)?;
    let (train, eval) = match holdout {
        Some(bytes) => {
            let eval = Dataset::decode(bytes).map_err(PrepareError::Holdout)?;
            model.check_dataset(&eval).map_err(PrepareError::HoldoutShape)?;
            (data, eval)
        }
        None => data.hold_out(HOLDOUT_SHARE),
    };
    if eval.is_empty() {
        return Err(PrepareError::EmptyEvaluation);
    }
    let participants = params.participants as usize;
    if train.len() < participants {
        return Err(PrepareError::TooFewSamples { samples: train.len(), participants });
    }
    let chunks = train.chunks(participants).iter().map(Dataset::encode).collect();
    Ok(PreparedData { chunks, holdout: eval.encode(), training_samples: train.len() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{dataset, params};

    #[test]
    fn data_is_split_into_chunks_and_an_evaluation_set() {
        let model = Model::init(1).encode();
        let data = dataset(100);
        let prepared = prepare_data(&params(4), &model, &data.encode(), None).unwrap();
        assert_eq!(prepared.chunks.len(), 4);
        let eval = Dataset::decode(&prepared.holdout).unwrap();
        assert_eq!(eval.len(), 20); // a quarter of each label's 10 samples, rounded down
        assert_eq!(prepared.training_samples, 80);
        let sizes: Vec<usize> =
            prepared.chunks.iter().map(|c| Dataset::decode(c).unwrap().len()).collect();
        assert_eq!(sizes, [20, 20, 20, 20]);

        let given = dataset(10).encode();
        let prepared = prepare_data(&params(4), &model, &data.encode(), Some(&given)).unwrap();
        assert_eq!((prepared.training_samples, prepared.holdout), (100, given));
    }

    #[test]
    fn bad_training_data_is_refused_with_the_field_at_fault() {
        let model = Model::init(1).encode();
        let data = dataset(100).encode();
        let err = prepare_data(&params(4), b"junk", &data, None).unwrap_err();
        assert!(matches!(err, PrepareError::Model(_)));
        assert!(err.to_string().starts_with("training.model"), "{err}");
        let err = prepare_data(&params(4), &model, &model, None).unwrap_err();
        assert!(err.to_string().starts_with("training.dataset"), "{err}");
        let narrow = Dataset { features: 3, samples: vec![0.0; 30], labels: vec![1; 10] };
        let err = prepare_data(&params(4), &model, &narrow.encode(), None).unwrap_err();
        assert!(matches!(err, PrepareError::DatasetShape(_)), "{err}");
        assert!(err.to_string().contains("does not fit the model"), "{err}");
        let err = prepare_data(&params(50), &model, &dataset(40).encode(), None).unwrap_err();
        assert_eq!(err, PrepareError::TooFewSamples { samples: 30, participants: 50 });
        assert!(err.to_string().contains("fewer than training.participants (50)"), "{err}");
        let err = prepare_data(&params(2), &model, &data, Some(b"x")).unwrap_err();
        assert!(err.to_string().starts_with("training.holdout"), "{err}");
    }
}
