//! A small multilayer perceptron for the 8×8 digits dataset, written so that training is
//! bitwise reproducible.
//!
//! This crate is the model behind aimatrix's `training` job kind. The `train-step` guest
//! (compiled for `wasm32-wasip1` and run in a node's sandbox) and the Studio relay (native)
//! both link it, so the relay can read what a worker sends back with the same code that
//! produced it. It has no `unsafe`; its one dependency, `wide`, gives the dot product
//! explicit four-lane SIMD on every target (see `kernel`).
//!
//! The network is [`INPUTS`] (64 pixels) → [`HIDDEN`] (32, ReLU) → [`OUTPUTS`] (10 classes,
//! softmax), trained with mean cross-entropy by plain mini-batch SGD. The dimensions are
//! stored in each model's header, so other sizes decode and train too.
//!
//! Main types and functions:
//! - [`Model`]: dimensions plus one flat `Vec<f32>` of parameters (layout on [`Model`]);
//!   [`Model::init`] (deterministic from a seed), [`Model::encode`] / [`Model::decode`].
//! - [`Dataset`]: row-major `f32` features and `u8` labels; [`Dataset::encode`] /
//!   [`Dataset::decode`].
//! - [`forward`], [`predict`], [`loss_and_accuracy`] and [`train`].
//! - [`delta`] / [`apply_delta`] and [`encode_delta`] / [`decode_delta`]: the model updates
//!   that participants return to the relay.
//! - [`aggregate`]: combining a round's updates ([`Rule`]: mean, median, trimmed mean,
//!   centered clipping), deterministically.
//! - [`validate`]: per-update verdicts (shape, NaN/Inf, norm far outside the round's).
//! - [`round`]: [`judge_round`], one round at the aggregator (decode, validate, aggregate,
//!   apply), shared by the relay, the simulator and the native harness.
//! - [`compress`]: update codecs (none, fp16, int8, top-k), the `AMLC` format, and
//!   [`Residual`] for error feedback.
//! - [`FormatError`] for bytes that are not a valid file, [`ShapeError`] for values that do
//!   not fit together (a dataset with 10 features for a model with 64 inputs).
//!
//! # Reproducibility
//!
//! [`train`] uses no threads, no randomness and no platform maths: samples are visited in
//! dataset order, every sum runs in the same order, and `exp`/`ln` are implemented here with
//! basic IEEE-754 operations only (which Rust never fuses or reorders). The same inputs give
//! the same parameters bit for bit, on the host and in wasm alike, so replicas of a training
//! job can be checked by comparing hashes.
//!
//! # File formats
//!
//! All integers and floats are little-endian; every file starts with a 4-byte magic and a
//! `u32` version (currently [`FORMAT_VERSION`], 1).
//!
//! | file | layout |
//! |---|---|
//! | model | `b"AMLP"`, version, `u32` inputs, `u32` hidden, `u32` outputs, then the parameters as `f32` |
//! | dataset | `b"ADSC"`, version, `u32` count, `u32` features, then per sample `features` × `f32` and a `u8` label |
//! | delta | `b"AMLD"`, version, `u32` count, then `count` × `f32` |
//!
//! Decoders never panic on arbitrary bytes: they check the magic, the version, every
//! dimension (1 to [`MAX_DIM`]), the exact length, that labels are below [`OUTPUTS`] and that
//! every value is finite, and return a [`FormatError`] saying what was wrong.
//!
//! # Example
//!
//! ```
//! use aimatrix_mlp::{apply_delta, decode_delta, delta, encode_delta, loss_and_accuracy};
//! use aimatrix_mlp::{train, Dataset, Model, INPUTS};
//!
//! // Two "images": one bright (label 1), one dark (label 0).
//! let mut samples = vec![0.9_f32; INPUTS];
//! samples.extend(vec![0.1_f32; INPUTS]);
//! let data = Dataset { features: INPUTS, samples, labels: vec![1, 0] };
//!
//! let model = Model::init(42);
//! let (loss_before, _) = loss_and_accuracy(&model, &data);
//! let trained = train(&model, &data, 20, 0.1, 2);
//! let (loss_after, accuracy) = loss_and_accuracy(&trained, &data);
//! assert!(loss_after < loss_before);
//! assert_eq!(accuracy, 1.0);
//!
//! // A participant sends `trained - model`; the relay applies it to its copy of `model`.
//! let wire = encode_delta(&delta(&trained, &model));
//! let update = decode_delta(&wire)?;
//! let merged = apply_delta(&model, &update)?;
//! assert_eq!(Model::decode(&merged.encode())?, merged);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod aggregate;
pub mod compress;
mod dataset;
mod delta;
mod error;
mod kernel;
mod math;
mod model;
mod rng;
pub mod round;
mod train;
pub mod validate;
mod wire;

pub use aggregate::{AggregateError, ClipRadius, ClipStart, Rule};
pub use compress::{compress, decompress, Codec, Residual, UpdateFormatError};
pub use dataset::Dataset;
pub use delta::{apply_delta, decode_delta, delta, encode_delta};
pub use error::{FormatError, ShapeError};
pub use model::Model;
pub use round::{judge_round, RoundOutcome};
pub use train::{forward, loss_and_accuracy, predict, train};
pub use validate::{validate, NormCheck, Rejection, Verdict};

/// Input features of the standard model: one per pixel of an 8×8 digit image.
pub const INPUTS: usize = 64;
/// Hidden units of the standard model (ReLU).
pub const HIDDEN: usize = 32;
/// Output classes of the standard model: the digits 0 to 9. Dataset labels must be below this.
pub const OUTPUTS: usize = 10;
/// The largest dimension a decoder accepts (inputs, hidden, outputs, features); anything larger
/// is treated as a corrupt or hostile file rather than allocated.
pub const MAX_DIM: usize = 4096;
/// The version written into, and the only version accepted from, every file format here.
pub const FORMAT_VERSION: u32 = 1;
