//! Model updates: the difference a participant's training made, and the `AMLD` format.

use crate::model::Layout;
use crate::wire;
use crate::{FormatError, Model, ShapeError};

const MAGIC: &[u8; 4] = b"AMLD";
const WHAT: &str = "delta";
/// Magic, version and count.
const HEADER_LEN: u64 = 12;

/// `new.params - old.params`, element by element: the update a participant returns.
///
/// # Panics
///
/// If either model is inconsistent or their dimensions differ.
pub fn delta(new: &Model, old: &Model) -> Vec<f32> {
    Layout::of(new);
    Layout::of(old);
    assert!(
        (new.inputs, new.hidden, new.outputs) == (old.inputs, old.hidden, old.outputs),
        "delta: models of different shapes ({}-{}-{} and {}-{}-{})",
        new.inputs,
        new.hidden,
        new.outputs,
        old.inputs,
        old.hidden,
        old.outputs
    );
    new.params.iter().zip(&old.params).map(|(n, o)| n - o).collect()
}

/// `model.params + delta`, element by element.
///
/// Floating-point subtraction rounds, so `apply_delta(old, delta(new, old))` can differ from
/// `new` in the last bit of some parameters; it is exact wherever the two are within a
/// factor of two of each other, which is almost always the case for one training step.
///
/// # Errors
///
/// [`ShapeError::DeltaLength`] if the delta was made for a model of another size, or the
/// model's own error if it is inconsistent.
pub fn apply_delta(model: &Model, delta: &[f32]) -> Result<Model, ShapeError> {
    model.check()?;
    if delta.len() != model.params.len() {
        return Err(ShapeError::DeltaLength { expected: model.params.len(), found: delta.len() });
    }
    let params = model.params.iter().zip(delta).map(|(p, d)| p + d).collect();
    Ok(Model { inputs: model.inputs, hidden: model.hidden, outputs: model.outputs, params })
}

/// The `AMLD` bytes of a delta (layout in the [crate docs](crate#file-formats)).
///
/// # Panics
///
/// If there are more than `u32::MAX` values.
pub fn encode_delta(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + 4 * values.len());
    wire::write_header(&mut out, MAGIC, &[values.len()]);
    wire::write_f32s(&mut out, values);
    out
}

/// Reads a delta from `AMLD` bytes. Never panics: anything but a well-formed, exactly sized
/// file of finite values is a [`FormatError`]. Whether the delta fits a model is checked by
/// [`apply_delta`].
pub fn decode_delta(bytes: &[u8]) -> Result<Vec<f32>, FormatError> {
    let ([count], body) = wire::parse_header::<1>(bytes, WHAT, MAGIC)?;
    wire::exact_length(WHAT, HEADER_LEN + 4 * u64::from(count), bytes.len())?;
    let mut values = Vec::with_capacity(body.len() / 4);
    wire::read_f32s(WHAT, body, 0, &mut values)?;
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn delta_roundtrips_through_bytes_and_applies() {
        let old = Model::init_with_dims(3, 4, 2, 1);
        let mut new = old.clone();
        for (i, p) in new.params.iter_mut().enumerate() {
            *p += 0.001 * i as f32;
        }
        let d = delta(&new, &old);
        let bytes = encode_delta(&d);
        assert_eq!(&bytes[..4], b"AMLD");
        assert_eq!(bytes.len(), 12 + 4 * d.len());
        assert_eq!(decode_delta(&bytes).unwrap(), d);

        let applied = apply_delta(&old, &d).unwrap();
        for (a, n) in applied.params.iter().zip(&new.params) {
            assert!((a - n).abs() <= 1e-6, "{a} vs {n}");
        }
        assert_eq!(decode_delta(&encode_delta(&[])).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn apply_delta_refuses_a_delta_for_another_model() {
        let model = Model::init_with_dims(3, 4, 2, 1);
        assert_eq!(
            apply_delta(&model, &[0.0; 3]),
            Err(ShapeError::DeltaLength { expected: model.params.len(), found: 3 })
        );
    }

    #[test]
    fn decode_rejects_bad_input() {
        let bytes = encode_delta(&[1.0, -2.0, 3.5]);
        for len in 0..bytes.len() {
            assert!(decode_delta(&bytes[..len]).is_err(), "accepted {len} bytes");
        }
        let mut bytes_long = bytes.clone();
        bytes_long.push(1);
        assert!(matches!(decode_delta(&bytes_long), Err(FormatError::Length { .. })));
        let mut nan = bytes.clone();
        nan[16..20].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(decode_delta(&nan), Err(FormatError::NonFinite { what: "delta", index: 1 }));
        let mut huge = bytes;
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_delta(&huge), Err(FormatError::Length { .. })));
        assert!(matches!(decode_delta(b"AMLP"), Err(FormatError::BadMagic { .. })));
    }

    #[test]
    fn decode_never_panics_on_garbage() {
        let mut rng = SplitMix64::new(5);
        for round in 0..5_000 {
            let len = (rng.next_u64() % 40) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if round % 2 == 0 && bytes.len() >= 8 {
                bytes[..8].copy_from_slice(b"AMLD\x01\0\0\0");
            }
            let _ = decode_delta(&bytes);
        }
    }
}
