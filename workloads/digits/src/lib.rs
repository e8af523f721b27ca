//! The 8×8 digits dataset for aimatrix's `training` jobs: the data, its fixed split, the
//! participants' chunks, the centralized baseline and a native federated-training harness.
//!
//! The maths of training lives in [`aimatrix_mlp`] (the model, SGD, aggregation, validation,
//! compression), shared by the wasm `train-step` guest, the relay and the simulator. This crate
//! is what sits around it when the dataset is the digits:
//!
//! - [`load`]: the 1,797 images of scikit-learn's `load_digits` (the copy shipped inside the
//!   `smartcore` crate, feature `datasets`), pixels divided by 16, as an
//!   [`aimatrix_mlp::Dataset`].
//! - [`split`]: the fixed stratified 75/25 train/test split ([`split::train_test`], seed
//!   [`split::SPLIT_SEED`]), and IID or non-IID chunking into participants' shares.
//! - [`baseline`]: the same MLP trained by the same [`aimatrix_mlp::train`] on the whole train
//!   split in one process: the number every distributed result is printed beside.
//! - [`federated`]: rounds of local training, compression, validation and robust aggregation
//!   in-process, with Byzantine participants and drop-outs; one seed replays a run exactly.
//!
//! # Example
//!
//! ```
//! use aimatrix_digits::split;
//!
//! let (train, test) = split::train_test();
//! assert_eq!((train.len(), test.len()), (1347, 450));
//! let chunks = split::iid_chunks(&train, 10, 7);
//! assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), train.len());
//! ```

pub mod baseline;
pub mod federated;
pub mod split;

use aimatrix_mlp::Dataset;

/// Images in the digits dataset.
pub const SAMPLES: usize = 1797;
/// Pixels per image (8×8).
pub const FEATURES: usize = 64;
/// Classes: the digits 0 to 9.
pub const CLASSES: usize = 10;
/// Hidden units of the model the issue's numbers are about (the `aimatrix_mlp` default is 32).
pub const HIDDEN: usize = 64;

/// The files of a digits training job, in the `aimatrix-mlp` formats: what a `training` job
/// names as `training.model` (`AMLP`), `training.dataset` (`ADSC`, the training split, which
/// the relay cuts into one chunk per participant) and `training.holdout` (`ADSC`, the test
/// split it evaluates every round on).
#[derive(Debug, Clone, PartialEq)]
pub struct JobFiles {
    /// A fresh 64 → `hidden` → 10 model.
    pub model: Vec<u8>,
    /// The 1,347 training images, shuffled.
    pub dataset: Vec<u8>,
    /// The 450 test images.
    pub holdout: Vec<u8>,
}

/// [`JobFiles`] for a model with `hidden` hidden units initialised from `model_seed`, on the
/// project's fixed split ([`split::train_test`]).
///
/// # Panics
///
/// As [`load`], or if `hidden` is 0 or above [`aimatrix_mlp::MAX_DIM`].
pub fn job_files(hidden: usize, model_seed: u64) -> JobFiles {
    let (train, test) = split::train_test();
    let model = aimatrix_mlp::Model::init_with_dims(FEATURES, hidden, CLASSES, model_seed);
    JobFiles { model: model.encode(), dataset: train.encode(), holdout: test.encode() }
}

/// All 1,797 digits in the dataset's own order, pixels (0 to 16) divided by 16.
///
/// # Panics
///
/// If the copy inside `smartcore` is not the expected 1,797 × 64 images with labels 0 to 9
/// (it is compiled into that crate, so this would be a broken dependency, not bad input).
pub fn load() -> Dataset {
    let raw = smartcore::dataset::digits::load_dataset();
    assert_eq!(
        (raw.num_samples, raw.num_features, raw.data.len(), raw.target.len()),
        (SAMPLES, FEATURES, SAMPLES * FEATURES, SAMPLES),
        "smartcore's digits dataset has an unexpected shape"
    );
    let samples = raw.data.iter().map(|&pixel| pixel / 16.0).collect();
    let labels = raw
        .target
        .iter()
        .map(|&target| {
            assert!(
                (0.0..CLASSES as f32).contains(&target) && target.fract() == 0.0,
                "smartcore's digits dataset has label {target}"
            );
            target as u8
        })
        .collect();
    let data = Dataset { features: FEATURES, samples, labels };
    if let Err(err) = data.check() {
        panic!("smartcore's digits dataset: {err}");
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dataset_is_scikit_learns_digits() {
        let data = load();
        assert_eq!(data.len(), SAMPLES);
        let mut per_class = [0usize; CLASSES];
        for &label in &data.labels {
            per_class[usize::from(label)] += 1;
        }
        // The class counts of sklearn.datasets.load_digits().
        assert_eq!(per_class, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
        assert!(data.samples.iter().all(|&p| (0.0..=1.0).contains(&p)));
        // The first image is a 0; its first row is 0 0 5 13 9 1 0 0 (in sixteenths).
        assert_eq!(data.labels[0], 0);
        let row: Vec<f32> = data.sample(0)[..8].iter().map(|p| p * 16.0).collect();
        assert_eq!(row, vec![0.0, 0.0, 5.0, 13.0, 9.0, 1.0, 0.0, 0.0]);
    }
}
