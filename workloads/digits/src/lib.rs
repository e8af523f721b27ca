//! The 8×8 digits dataset for aimatrix's `training` jobs.
//!
//! [`load`] reads the 1,797 images of scikit-learn's `load_digits` (shipped inside the
//! `smartcore` crate) as an [`aimatrix_mlp::Dataset`] with pixels scaled to `[0, 1]`.

use aimatrix_mlp::Dataset;

/// Images in the digits dataset.
pub const SAMPLES: usize = 1797;

/// All 1,797 digits, in the dataset's own order, pixels divided by 16.
pub fn load() -> Dataset {
    let raw = smartcore::dataset::digits::load_dataset();
    let samples = raw.data.iter().map(|p| p / 16.0).collect();
    let labels = raw.target.iter().map(|&t| t as u8).collect();
    Dataset { features: raw.num_features, samples, labels }
}
