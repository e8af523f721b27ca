//! The centralized baseline: the same model trained by the same code on the whole training
//! split, in one process.

use aimatrix_mlp::{loss_and_accuracy, train, Dataset, Model};

use crate::{CLASSES, FEATURES, HIDDEN};

/// How the baseline trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineConfig {
    /// Hidden units.
    pub hidden: usize,
    /// Passes over the whole training split.
    pub epochs: u32,
    /// SGD learning rate.
    pub learning_rate: f32,
    /// Samples per mini-batch.
    pub batch_size: u32,
    /// Seed of the model's initial weights ([`Model::init_with_dims`]).
    pub model_seed: u64,
}

impl Default for BaselineConfig {
    /// 64 hidden units, 100 epochs at learning rate 0.1 in batches of 16, model seed 1: the
    /// participants' local hyperparameters ([`crate::federated::Config::default`]) and the
    /// same initial model; by 100 epochs it fits the training split exactly, so more would
    /// not change the comparison.
    fn default() -> Self {
        Self { hidden: HIDDEN, epochs: 100, learning_rate: 0.1, batch_size: 16, model_seed: 1 }
    }
}

/// What the baseline reached.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineReport {
    /// Accuracy on the test split, 0 to 1.
    pub test_accuracy: f32,
    /// Mean cross-entropy on the test split.
    pub test_loss: f32,
    /// Accuracy on the training split.
    pub train_accuracy: f32,
    /// The trained model.
    pub model: Model,
}

/// Trains the baseline on `train` and evaluates it on `test`.
///
/// # Panics
///
/// If the datasets are not 64-feature digits or `config.batch_size` is 0.
pub fn centralized(config: &BaselineConfig, train_set: &Dataset, test: &Dataset) -> BaselineReport {
    let model = Model::init_with_dims(FEATURES, config.hidden, CLASSES, config.model_seed);
    let model = train(&model, train_set, config.epochs, config.learning_rate, config.batch_size);
    let (test_loss, test_accuracy) = loss_and_accuracy(&model, test);
    let (_, train_accuracy) = loss_and_accuracy(&model, train_set);
    BaselineReport { test_accuracy, test_loss, train_accuracy, model }
}
