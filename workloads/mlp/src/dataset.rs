//! Labelled samples and the `ADSC` format.

use crate::wire;
use crate::{FormatError, ShapeError, MAX_DIM, OUTPUTS};

const MAGIC: &[u8; 4] = b"ADSC";
const WHAT: &str = "dataset";
/// Magic, version, count and features.
const HEADER_LEN: u64 = 16;

/// Labelled samples: `labels.len()` rows of `features` floats each.
///
/// Labels are digit classes, so they must be below [`OUTPUTS`] (10) whatever model they are
/// used with; [`Model::check_dataset`](crate::Model::check_dataset) also checks them against
/// that model's `outputs`. Features are used as given: scale pixel values to about `[0, 1]`
/// (the 8×8 digits have values 0 to 16, so divide by 16) before encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Floats per sample.
    pub features: usize,
    /// All samples, row-major: sample `s` is `samples[s * features..(s + 1) * features]`.
    pub samples: Vec<f32>,
    /// One label per sample, each below [`OUTPUTS`].
    pub labels: Vec<u8>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The features of sample `index`.
    ///
    /// # Panics
    ///
    /// If `index >= self.len()` or the dataset is inconsistent.
    pub fn sample(&self, index: usize) -> &[f32] {
        &self.samples[index * self.features..(index + 1) * self.features]
    }

    /// Checks the feature count is in range, the sample buffer matches the labels, and every
    /// label is below [`OUTPUTS`].
    pub fn check(&self) -> Result<(), ShapeError> {
        if !(1..=MAX_DIM).contains(&self.features) {
            return Err(ShapeError::Features { features: self.features });
        }
        let expected = self.labels.len() * self.features;
        if self.samples.len() != expected {
            return Err(ShapeError::SampleCount { expected, found: self.samples.len() });
        }
        if let Some((sample, &label)) =
            self.labels.iter().enumerate().find(|(_, &label)| usize::from(label) >= OUTPUTS)
        {
            return Err(ShapeError::Label { sample, label, classes: OUTPUTS });
        }
        Ok(())
    }

    /// The samples at `indices`, in that order.
    ///
    /// # Panics
    ///
    /// If an index is out of range.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let mut samples = Vec::with_capacity(indices.len() * self.features);
        let mut labels = Vec::with_capacity(indices.len());
        for &index in indices {
            samples.extend_from_slice(self.sample(index));
            labels.push(self.labels[index]);
        }
        Self { features: self.features, samples, labels }
    }

    /// Splits the samples, in order, into `n` consecutive chunks whose sizes differ by at most
    /// one (the first `len % n` chunks hold the extra sample). Shuffle a dataset before
    /// chunking it if its order is not random: chunk `i` is a plain slice.
    ///
    /// # Panics
    ///
    /// If `n` is 0.
    pub fn chunks(&self, n: usize) -> Vec<Self> {
        assert!(n > 0, "Dataset::chunks: n must be at least 1");
        let (base, extra) = (self.len() / n, self.len() % n);
        let mut start = 0;
        (0..n)
            .map(|i| {
                let size = base + usize::from(i < extra);
                let indices: Vec<usize> = (start..start + size).collect();
                start += size;
                self.subset(&indices)
            })
            .collect()
    }

    /// Holds out a stratified share of the samples, without randomness: within each label,
    /// in dataset order, sample `j` (counting from 0) is held out when `floor((j + 1) · share)`
    /// exceeds `floor(j · share)`, so every label gives up `floor(count · share)` samples,
    /// spread evenly through the file. Returns `(rest, held_out)`, each in dataset order.
    ///
    /// # Panics
    ///
    /// If `share` is not in `[0, 1]`.
    pub fn hold_out(&self, share: f64) -> (Self, Self) {
        assert!((0.0..=1.0).contains(&share), "Dataset::hold_out: share must be in [0, 1]");
        let mut seen = [0_u64; 256];
        let (mut rest, mut held) = (Vec::new(), Vec::new());
        for (index, &label) in self.labels.iter().enumerate() {
            let j = seen[usize::from(label)] as f64;
            seen[usize::from(label)] += 1;
            if ((j + 1.0) * share).floor() > (j * share).floor() {
                held.push(index);
            } else {
                rest.push(index);
            }
        }
        (self.subset(&rest), self.subset(&held))
    }

    /// The `ADSC` bytes of this dataset (layout in the [crate docs](crate#file-formats)).
    ///
    /// # Panics
    ///
    /// If [`Dataset::check`] fails or there are more than `u32::MAX` samples.
    pub fn encode(&self) -> Vec<u8> {
        if let Err(err) = self.check() {
            panic!("cannot encode an inconsistent dataset: {err}");
        }
        let mut out = Vec::with_capacity(16 + self.len() * (4 * self.features + 1));
        wire::write_header(&mut out, MAGIC, &[self.len(), self.features]);
        for (index, &label) in self.labels.iter().enumerate() {
            wire::write_f32s(&mut out, self.sample(index));
            out.push(label);
        }
        out
    }

    /// Reads a dataset from `ADSC` bytes. Never panics: anything but a well-formed, exactly
    /// sized file with finite features and labels below [`OUTPUTS`] is a [`FormatError`].
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let ([count, features], body) = wire::parse_header::<2>(bytes, WHAT, MAGIC)?;
        let features = wire::dimension(WHAT, "features", features)?;
        // In u64 the size cannot overflow (u32::MAX * (4 * 4096 + 1) < 2^47), and checking it
        // before allocating means a lying header cannot make us reserve memory.
        let stride = 4 * features + 1;
        wire::exact_length(WHAT, HEADER_LEN + u64::from(count) * stride as u64, bytes.len())?;
        // The length check proves count * stride bytes exist, so count fits in usize.
        let count = body.len() / stride;
        let mut samples = Vec::with_capacity(count * features);
        let mut labels = Vec::with_capacity(count);
        for (sample, row) in body.chunks_exact(stride).enumerate() {
            let (values, label) = row.split_at(4 * features);
            wire::read_f32s(WHAT, values, sample * features, &mut samples)?;
            let label = label[0];
            if usize::from(label) >= OUTPUTS {
                return Err(FormatError::Label { sample, label });
            }
            labels.push(label);
        }
        Ok(Self { features, samples, labels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn example() -> Dataset {
        Dataset { features: 3, samples: vec![0.0, 0.5, 1.0, -1.0, 2.5, 16.0], labels: vec![9, 0] }
    }

    #[test]
    fn encode_decode_roundtrip() {
        let data = example();
        let bytes = data.encode();
        assert_eq!(&bytes[..4], b"ADSC");
        assert_eq!(bytes.len(), 16 + 2 * (3 * 4 + 1));
        assert_eq!(Dataset::decode(&bytes).unwrap(), data);

        let empty = Dataset { features: 64, samples: vec![], labels: vec![] };
        assert_eq!(Dataset::decode(&empty.encode()).unwrap(), empty);
    }

    #[test]
    fn decode_rejects_every_truncation_and_extension() {
        let bytes = example().encode();
        for len in 0..bytes.len() {
            assert!(Dataset::decode(&bytes[..len]).is_err(), "accepted {len} bytes");
        }
        let mut longer = bytes;
        longer.extend_from_slice(&[0; 13]);
        assert!(matches!(Dataset::decode(&longer), Err(FormatError::Length { .. })));
    }

    #[test]
    fn decode_explains_what_is_wrong() {
        let good = example().encode();

        let mut bytes = good.clone();
        bytes[16 + 12] = 10;
        let err = Dataset::decode(&bytes).unwrap_err();
        assert_eq!(err, FormatError::Label { sample: 0, label: 10 });
        assert!(err.to_string().contains("below 10"), "{err}");

        let mut bytes = good.clone();
        bytes[16 + 13 + 4..16 + 13 + 8].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert_eq!(
            Dataset::decode(&bytes).unwrap_err(),
            FormatError::NonFinite { what: "dataset", index: 4 }
        );

        // A header claiming four billion samples is refused without allocating for them.
        let mut bytes = good.clone();
        bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = Dataset::decode(&bytes).unwrap_err();
        assert!(matches!(err, FormatError::Length { found, .. } if found == good.len()));

        let mut bytes = good;
        bytes[12..16].copy_from_slice(&5000u32.to_le_bytes());
        assert!(Dataset::decode(&bytes).unwrap_err().to_string().contains("features = 5000"));

        let model = crate::Model::init_with_dims(1, 1, 1, 0).encode();
        let err = Dataset::decode(&model).unwrap_err();
        assert!(matches!(err, FormatError::BadMagic { what: "dataset", .. }));
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        let mut rng = SplitMix64::new(3);
        let good = example().encode();
        for round in 0..5_000 {
            let len = (rng.next_u64() % 64) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if round % 2 == 0 && bytes.len() >= 16 {
                bytes[..16].copy_from_slice(&good[..16]);
            }
            let _ = Dataset::decode(&bytes);
        }
    }

    #[test]
    fn chunks_cover_every_sample_once_in_order() {
        let data = Dataset {
            features: 1,
            samples: (0..11).map(|i| i as f32).collect(),
            labels: (0..11).map(|i| (i % 10) as u8).collect(),
        };
        let chunks = data.chunks(3);
        let sizes: Vec<usize> = chunks.iter().map(Dataset::len).collect();
        assert_eq!(sizes, [4, 4, 3]);
        let joined: Vec<f32> = chunks.iter().flat_map(|c| c.samples.clone()).collect();
        assert_eq!(joined, data.samples);
        assert_eq!(data.chunks(20).iter().filter(|c| c.is_empty()).count(), 9);
    }

    #[test]
    fn hold_out_takes_the_share_of_every_label() {
        let labels: Vec<u8> = (0..100).map(|i| if i < 60 { 1 } else { 2 }).collect();
        let data = Dataset { features: 1, samples: (0..100).map(|i| i as f32).collect(), labels };
        let (rest, held) = data.hold_out(0.25);
        assert_eq!(held.labels.iter().filter(|&&l| l == 1).count(), 15);
        assert_eq!(held.labels.iter().filter(|&&l| l == 2).count(), 10);
        assert_eq!(rest.len() + held.len(), 100);
        // Every 4th sample of each label, so the held-out samples are spread out.
        assert_eq!(&held.samples[..3], &[3.0, 7.0, 11.0]);
        let (all, none) = data.hold_out(0.0);
        assert_eq!((all.len(), none.len()), (100, 0));
    }

    #[test]
    fn check_catches_inconsistent_values() {
        let mut data = example();
        data.samples.pop();
        assert_eq!(data.check(), Err(ShapeError::SampleCount { expected: 6, found: 5 }));
        let data = Dataset { features: 0, samples: vec![], labels: vec![] };
        assert_eq!(data.check(), Err(ShapeError::Features { features: 0 }));
    }
}
