//! The model: dimensions, a flat parameter vector, initialisation and the `AMLP` format.

use crate::rng::SplitMix64;
use crate::wire;
use crate::{Dataset, FormatError, ShapeError, HIDDEN, INPUTS, MAX_DIM, OUTPUTS};

const MAGIC: &[u8; 4] = b"AMLP";
const WHAT: &str = "model";
/// Magic, version and three `u32` dimensions.
const HEADER_LEN: u64 = 20;

/// A two-layer perceptron: `inputs` → `hidden` (ReLU) → `outputs` (softmax).
///
/// `params` holds every weight and bias in one flat vector, in this order:
///
/// | block | shape | index of element |
/// |---|---|---|
/// | `w1` | `hidden × inputs`, row-major | `j * inputs + i` (hidden unit `j`, input `i`) |
/// | `b1` | `hidden` | `hidden * inputs + j` |
/// | `w2` | `outputs × hidden`, row-major | `hidden * (inputs + 1) + o * hidden + j` |
/// | `b2` | `outputs` | `hidden * (inputs + 1) + outputs * hidden + o` |
///
/// so `params.len()` is [`Model::param_count`]`(inputs, hidden, outputs)`. The fields are
/// public for easy inspection; a model whose fields disagree is rejected by [`Model::check`]
/// and makes the functions of this crate panic.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Input features per sample.
    pub inputs: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Output classes.
    pub outputs: usize,
    /// All weights and biases, laid out as described on [`Model`].
    pub params: Vec<f32>,
}

impl Model {
    /// The standard digits model ([`INPUTS`] → [`HIDDEN`] → [`OUTPUTS`]), initialised from
    /// `seed`. The same seed always gives the same parameters.
    pub fn init(seed: u64) -> Self {
        Self::init_with_dims(INPUTS, HIDDEN, OUTPUTS, seed)
    }

    /// A model of any size, initialised from `seed`: weights uniform in `±sqrt(6 / (fan_in +
    /// fan_out))` (Glorot/Xavier), biases zero.
    ///
    /// # Panics
    ///
    /// If a dimension is zero or larger than [`MAX_DIM`].
    pub fn init_with_dims(inputs: usize, hidden: usize, outputs: usize, seed: u64) -> Self {
        for (field, value) in [("inputs", inputs), ("hidden", hidden), ("outputs", outputs)] {
            assert!((1..=MAX_DIM).contains(&value), "{}", ShapeError::Dimension { field, value });
        }
        let layout = Layout::new(inputs, hidden, outputs);
        let mut params = vec![0.0_f32; layout.total];
        let mut rng = SplitMix64::new(seed);
        let w1_limit = xavier_limit(inputs, hidden);
        for w in &mut params[layout.w1..layout.b1] {
            *w = (2.0 * rng.next_unit_f32() - 1.0) * w1_limit;
        }
        let w2_limit = xavier_limit(hidden, outputs);
        for w in &mut params[layout.w2..layout.b2] {
            *w = (2.0 * rng.next_unit_f32() - 1.0) * w2_limit;
        }
        Self { inputs, hidden, outputs, params }
    }

    /// Parameters of a model with these dimensions:
    /// `hidden * inputs + hidden + outputs * hidden + outputs`.
    pub fn param_count(inputs: usize, hidden: usize, outputs: usize) -> usize {
        hidden * (inputs + 1) + outputs * (hidden + 1)
    }

    /// Checks the dimensions are in range and agree with the parameter count.
    pub fn check(&self) -> Result<(), ShapeError> {
        for (field, value) in
            [("inputs", self.inputs), ("hidden", self.hidden), ("outputs", self.outputs)]
        {
            if !(1..=MAX_DIM).contains(&value) {
                return Err(ShapeError::Dimension { field, value });
            }
        }
        let expected = Self::param_count(self.inputs, self.hidden, self.outputs);
        if self.params.len() != expected {
            return Err(ShapeError::ParamCount { expected, found: self.params.len() });
        }
        Ok(())
    }

    /// Checks that this model can be trained or evaluated on `data`: both are well-formed,
    /// the feature counts agree and every label is below `outputs`.
    pub fn check_dataset(&self, data: &Dataset) -> Result<(), ShapeError> {
        self.check()?;
        data.check()?;
        if data.features != self.inputs {
            return Err(ShapeError::FeatureMismatch {
                model_inputs: self.inputs,
                dataset_features: data.features,
            });
        }
        if let Some((sample, &label)) =
            data.labels.iter().enumerate().find(|(_, &label)| usize::from(label) >= self.outputs)
        {
            return Err(ShapeError::Label { sample, label, classes: self.outputs });
        }
        Ok(())
    }

    /// The `AMLP` bytes of this model (layout in the [crate docs](crate#file-formats)).
    ///
    /// # Panics
    ///
    /// If [`Model::check`] fails: such a model could not be decoded again.
    pub fn encode(&self) -> Vec<u8> {
        if let Err(err) = self.check() {
            panic!("cannot encode an inconsistent model: {err}");
        }
        let mut out = Vec::with_capacity(20 + 4 * self.params.len());
        wire::write_header(&mut out, MAGIC, &[self.inputs, self.hidden, self.outputs]);
        wire::write_f32s(&mut out, &self.params);
        out
    }

    /// Reads a model from `AMLP` bytes. Never panics: anything but a well-formed, exactly
    /// sized file with finite parameters is a [`FormatError`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let ([inputs, hidden, outputs], body) = wire::parse_header::<3>(bytes, WHAT, MAGIC)?;
        let inputs = wire::dimension(WHAT, "inputs", inputs)?;
        let hidden = wire::dimension(WHAT, "hidden", hidden)?;
        let outputs = wire::dimension(WHAT, "outputs", outputs)?;
        // Dimensions are at most MAX_DIM, so the count fits easily in usize and u64.
        let count = Self::param_count(inputs, hidden, outputs);
        wire::exact_length(WHAT, HEADER_LEN + 4 * count as u64, bytes.len())?;
        let mut params = Vec::with_capacity(count);
        wire::read_f32s(WHAT, body, 0, &mut params)?;
        Ok(Self { inputs, hidden, outputs, params })
    }
}

/// `sqrt(6 / (fan_in + fan_out))`; `sqrt` is exactly rounded by IEEE-754, so deterministic.
fn xavier_limit(fan_in: usize, fan_out: usize) -> f32 {
    (6.0 / (fan_in + fan_out) as f32).sqrt()
}

/// Where each block starts in `Model::params`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) inputs: usize,
    pub(crate) hidden: usize,
    pub(crate) outputs: usize,
    pub(crate) w1: usize,
    pub(crate) b1: usize,
    pub(crate) w2: usize,
    pub(crate) b2: usize,
    pub(crate) total: usize,
}

impl Layout {
    /// The digits network's layout ([`INPUTS`] → [`HIDDEN`] → [`OUTPUTS`]).
    pub(crate) const DIGITS: Self = Self::new(INPUTS, HIDDEN, OUTPUTS);

    pub(crate) const fn new(inputs: usize, hidden: usize, outputs: usize) -> Self {
        let w1 = 0;
        let b1 = w1 + hidden * inputs;
        let w2 = b1 + hidden;
        let b2 = w2 + outputs * hidden;
        let total = b2 + outputs;
        Self { inputs, hidden, outputs, w1, b1, w2, b2, total }
    }

    /// The layout of `model`.
    ///
    /// # Panics
    ///
    /// If the model is inconsistent (a programmer error: decoded models are always consistent).
    pub(crate) fn of(model: &Model) -> Self {
        if let Err(err) = model.check() {
            panic!("inconsistent model: {err}");
        }
        Self::new(model.inputs, model.hidden, model.outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_deterministic_and_in_range() {
        let a = Model::init(7);
        assert_eq!(a, Model::init(7));
        assert_ne!(a.params, Model::init(8).params);
        assert_eq!(a.params.len(), 64 * 32 + 32 + 32 * 10 + 10);
        let layout = Layout::of(&a);
        let limit = xavier_limit(64, 32);
        assert!(a.params[..layout.b1].iter().all(|w| w.abs() <= limit));
        assert!(a.params[layout.b1..layout.w2].iter().all(|&b| b == 0.0));
        assert!(a.params[layout.b2..].iter().all(|&b| b == 0.0));
        // Not all the same value: the generator is actually used.
        assert!(a.params[..layout.b1].windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn encode_decode_roundtrip() {
        let model = Model::init(1);
        let bytes = model.encode();
        assert_eq!(&bytes[..4], b"AMLP");
        assert_eq!(bytes.len(), 20 + 4 * model.params.len());
        assert_eq!(Model::decode(&bytes).unwrap(), model);

        let odd = Model::init_with_dims(3, 5, 2, 9);
        assert_eq!(Model::decode(&odd.encode()).unwrap(), odd);
    }

    #[test]
    fn decode_rejects_every_truncation_and_extension() {
        let bytes = Model::init_with_dims(2, 3, 2, 0).encode();
        for len in 0..bytes.len() {
            assert!(Model::decode(&bytes[..len]).is_err(), "accepted {len} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        let err = Model::decode(&longer).unwrap_err();
        assert!(matches!(err, FormatError::Length { .. }), "{err}");
    }

    #[test]
    fn decode_explains_what_is_wrong() {
        let good = Model::init_with_dims(2, 3, 2, 0).encode();

        let err = Model::decode(b"ADSC\x01\0\0\0").unwrap_err();
        assert!(err.to_string().contains("bad magic"), "{err}");
        assert!(err.to_string().contains("\"AMLP\""), "{err}");

        let mut bytes = good.clone();
        bytes[4] = 2;
        assert_eq!(
            Model::decode(&bytes).unwrap_err(),
            FormatError::UnsupportedVersion { what: "model", found: 2 }
        );

        let mut bytes = good.clone();
        bytes[12..16].copy_from_slice(&0u32.to_le_bytes());
        assert!(Model::decode(&bytes).unwrap_err().to_string().contains("hidden = 0"));

        let mut bytes = good.clone();
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = Model::decode(&bytes).unwrap_err();
        assert_eq!(err, FormatError::Dimension { what: "model", field: "inputs", value: u32::MAX });

        let mut bytes = good;
        bytes[20..24].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(
            Model::decode(&bytes).unwrap_err(),
            FormatError::NonFinite { what: "model", index: 0 }
        );
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        let mut rng = SplitMix64::new(99);
        let good = Model::init_with_dims(2, 2, 2, 0).encode();
        for round in 0..5_000 {
            let len = (rng.next_u64() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            // Half the time keep a valid header so the checks behind it are reached.
            if round % 2 == 0 && bytes.len() >= 20 {
                bytes[..20].copy_from_slice(&good[..20]);
            }
            let _ = Model::decode(&bytes);
        }
    }

    #[test]
    fn check_dataset_reports_mismatches() {
        let model = Model::init_with_dims(2, 3, 2, 0);
        let data = Dataset { features: 3, samples: vec![0.0; 3], labels: vec![0] };
        assert_eq!(
            model.check_dataset(&data),
            Err(ShapeError::FeatureMismatch { model_inputs: 2, dataset_features: 3 })
        );
        let data = Dataset { features: 2, samples: vec![0.0; 4], labels: vec![1, 5] };
        assert_eq!(
            model.check_dataset(&data),
            Err(ShapeError::Label { sample: 1, label: 5, classes: 2 })
        );
        let mut broken = model.clone();
        broken.params.pop();
        assert!(matches!(broken.check(), Err(ShapeError::ParamCount { .. })));
    }
}
