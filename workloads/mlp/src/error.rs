//! The two error types: bytes that are not a valid file, and values that do not fit together.

use std::fmt;

/// Why some bytes are not a valid model, dataset or delta file.
///
/// `what` names the format (`"model"`, `"dataset"` or `"delta"`), so a message read out of
/// context still says which file was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// The input ends before the fixed-size header does.
    Truncated {
        /// The format being decoded.
        what: &'static str,
        /// Bytes the header needs.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// The first four bytes are not the format's magic.
    BadMagic {
        /// The format being decoded.
        what: &'static str,
        /// The magic this format starts with.
        expected: [u8; 4],
        /// The first four bytes of the input.
        found: [u8; 4],
    },
    /// The header names a version this code does not read.
    UnsupportedVersion {
        /// The format being decoded.
        what: &'static str,
        /// The version in the header.
        found: u32,
    },
    /// A dimension in the header is zero or larger than [`crate::MAX_DIM`].
    Dimension {
        /// The format being decoded.
        what: &'static str,
        /// The header field (`"inputs"`, `"hidden"`, `"outputs"` or `"features"`).
        field: &'static str,
        /// Its value.
        value: u32,
    },
    /// The input is not exactly as long as its header says it must be.
    Length {
        /// The format being decoded.
        what: &'static str,
        /// Bytes the header implies (header included).
        expected: u64,
        /// Bytes present.
        found: usize,
    },
    /// A dataset label is not below [`crate::OUTPUTS`].
    Label {
        /// Zero-based index of the sample.
        sample: usize,
        /// The label found.
        label: u8,
    },
    /// A value is NaN or infinite.
    NonFinite {
        /// The format being decoded.
        what: &'static str,
        /// Zero-based index of the value among the file's floats.
        index: usize,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { what, needed, found } => write!(
                f,
                "{what}: truncated header: needs {needed} bytes, found {found}; \
                 the file is incomplete"
            ),
            Self::BadMagic { what, expected, found } => write!(
                f,
                "{what}: bad magic: expected {}, found {}; this is not an aimatrix-mlp {what} file",
                show_magic(expected),
                show_magic(found)
            ),
            Self::UnsupportedVersion { what, found } => write!(
                f,
                "{what}: unsupported format version {found}, this build reads version {}; \
                 re-encode the file or update aimatrix-mlp",
                crate::FORMAT_VERSION
            ),
            Self::Dimension { what, field, value } => {
                write!(f, "{what}: {field} = {value} is out of range (1 to {})", crate::MAX_DIM)
            }
            Self::Length { what, expected, found } => write!(
                f,
                "{what}: the header implies {expected} bytes but the file has {found}; \
                 the file is truncated or has trailing bytes"
            ),
            Self::Label { sample, label } => write!(
                f,
                "dataset: sample {sample} has label {label}, labels must be below {}",
                crate::OUTPUTS
            ),
            Self::NonFinite { what, index } => {
                write!(f, "{what}: value {index} is NaN or infinite")
            }
        }
    }
}

impl std::error::Error for FormatError {}

/// `b"AMLP"` as `"AMLP"`, other bytes as hex, so garbage prints readably.
fn show_magic(bytes: &[u8; 4]) -> String {
    if bytes.iter().all(|b| b.is_ascii_graphic()) {
        format!("{:?}", String::from_utf8_lossy(bytes))
    } else {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

/// Why a model, dataset or delta does not fit the value it is used with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShapeError {
    /// A model dimension is zero or larger than [`crate::MAX_DIM`].
    Dimension {
        /// `"inputs"`, `"hidden"` or `"outputs"`.
        field: &'static str,
        /// Its value.
        value: usize,
    },
    /// A model's parameter vector does not match its dimensions.
    ParamCount {
        /// Parameters the dimensions imply.
        expected: usize,
        /// Parameters present.
        found: usize,
    },
    /// A dataset's feature count is zero or larger than [`crate::MAX_DIM`].
    Features {
        /// The feature count.
        features: usize,
    },
    /// A dataset's sample buffer is not `labels.len() * features` long.
    SampleCount {
        /// Floats the labels and feature count imply.
        expected: usize,
        /// Floats present.
        found: usize,
    },
    /// A dataset's samples have a different width from the model's input.
    FeatureMismatch {
        /// The model's inputs.
        model_inputs: usize,
        /// The dataset's features.
        dataset_features: usize,
    },
    /// A label is not a valid class of the model (or of the digits, [`crate::OUTPUTS`]).
    Label {
        /// Zero-based index of the sample.
        sample: usize,
        /// The label found.
        label: u8,
        /// The number of classes.
        classes: usize,
    },
    /// A delta has a different length from the model's parameters.
    DeltaLength {
        /// The model's parameter count.
        expected: usize,
        /// The delta's length.
        found: usize,
    },
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dimension { field, value } => {
                write!(f, "model: {field} = {value} is out of range (1 to {})", crate::MAX_DIM)
            }
            Self::ParamCount { expected, found } => {
                write!(f, "model: its dimensions need {expected} parameters, it has {found}")
            }
            Self::Features { features } => write!(
                f,
                "dataset: features = {features} is out of range (1 to {})",
                crate::MAX_DIM
            ),
            Self::SampleCount { expected, found } => write!(
                f,
                "dataset: its labels and feature count need {expected} floats, it has {found}"
            ),
            Self::FeatureMismatch { model_inputs, dataset_features } => write!(
                f,
                "the dataset has {dataset_features} features per sample but the model takes \
                 {model_inputs} inputs; use a model and dataset made for each other"
            ),
            Self::Label { sample, label, classes } => write!(
                f,
                "dataset: sample {sample} has label {label} but there are only {classes} classes"
            ),
            Self::DeltaLength { expected, found } => write!(
                f,
                "the delta has {found} values but the model has {expected} parameters; \
                 it was made for a different model"
            ),
        }
    }
}

impl std::error::Error for ShapeError {}
