//! Compressed model updates: codecs, the `AMLC` format and error feedback.
//!
//! A participant turns its delta into bytes with [`compress`] (or, keeping what compression
//! lost for the next round, [`Residual::compress`]); the relay turns them back into a delta
//! with [`decompress`], which checks the bytes against the model's parameter count.
//!
//! # Codecs
//!
//! | codec | id | values | bytes for `n` values |
//! |---|---|---|---|
//! | [`Codec::None`] | 0 | `f32` as is | `20 + 4n` |
//! | [`Codec::Fp16`] | 1 | IEEE-754 half precision, round to nearest even; finite values beyond ±65504 saturate to ±65504 | `20 + 2n` |
//! | [`Codec::Int8`] | 2 | blocks of `B` values; each block has an `f32` scale `s = max|x| / 127` and values `q = round_ties_even(x / s)` in `−127..=127`, decoded as `q · s` | `20 + 4·ceil(n/B) + n` |
//! | [`Codec::TopK`] | 3 | the `k = ceil(fraction · n)` values of largest magnitude (ties: lower index first) as indices and `f32` values; every other value decodes as 0 | `20 + 8k` |
//!
//! For the standard 64-64-10 digits model (4,810 parameters) that is 19,260 bytes raw,
//! 9,640 fp16, 4,906 int8 with `B = 256` (3.93× fewer) and 412 top-k at 1 % (k = 49, 46.7×).
//!
//! # Format
//!
//! Little-endian, like the other formats of this crate:
//!
//! ```text
//! b"AMLC" | u32 version (1) | u32 codec id | u32 count n | u32 parameter | body
//! ```
//!
//! The parameter is 0 for `none` and `fp16`, the block size `B ≥ 1` for `int8` and `k ≤ n`
//! for `topk`. Bodies: `none` n × `f32`; `fp16` n × `u16`; `int8` ceil(n/B) × `f32` scales
//! then n × `i8`; `topk` k × `u32` indices (strictly increasing, below n) then k × `f32`.
//!
//! [`decompress`] never panics and never allocates more than the expected parameter count: it
//! checks the magic, the version, the codec, that `n` equals the model's parameter count, the
//! parameter, the exact length, and every scale, index and value (finite; scales not
//! negative; no `−128` in int8), and says what was wrong with an [`UpdateFormatError`].
//!
//! # Error feedback
//!
//! Lossy codecs drop information every round; with error feedback the participant keeps it in
//! a [`Residual`] and adds it to the next round's delta: it sends `C(delta + residual)` and
//! keeps `residual ← (delta + residual) − D(C(delta + residual))`. Nothing is lost for good,
//! only delayed, which is what lets top-k at 1 % train nearly as well as sending everything.

use std::fmt;

use crate::wire;
use crate::FormatError;

const MAGIC: &[u8; 4] = b"AMLC";
const WHAT: &str = "compressed update";
/// Magic, version, codec, count and parameter.
pub const HEADER_LEN: usize = 20;
/// The largest finite half-precision value.
pub const F16_MAX: f32 = 65504.0;

/// A way to compress an update (table in the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Codec {
    /// Raw `f32`.
    None,
    /// IEEE half precision.
    Fp16,
    /// Symmetric 8-bit quantization with one scale per block.
    Int8 {
        /// Values per scale, at least 1; a block at least as long as the update is one
        /// per-tensor scale.
        block: u32,
    },
    /// The largest-magnitude values only.
    TopK {
        /// Share of the values kept, in `(0, 1]`: `k = ceil(fraction · n)`.
        fraction: f64,
    },
}

impl Codec {
    /// The default int8 block size: 256 values per scale.
    pub const DEFAULT_INT8_BLOCK: u32 = 256;
    /// The default top-k share: 1 %.
    pub const DEFAULT_TOPK_FRACTION: f64 = 0.01;

    /// Int8 with [`Codec::DEFAULT_INT8_BLOCK`].
    pub const fn int8() -> Self {
        Self::Int8 { block: Self::DEFAULT_INT8_BLOCK }
    }

    /// Top-k with [`Codec::DEFAULT_TOPK_FRACTION`].
    pub const fn topk() -> Self {
        Self::TopK { fraction: Self::DEFAULT_TOPK_FRACTION }
    }

    /// The codec's name as in a job file: `none`, `fp16`, `int8`, `topk`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Fp16 => "fp16",
            Self::Int8 { .. } => "int8",
            Self::TopK { .. } => "topk",
        }
    }

    /// The codec's id in the `AMLC` header.
    pub const fn id(&self) -> u32 {
        match self {
            Self::None => 0,
            Self::Fp16 => 1,
            Self::Int8 { .. } => 2,
            Self::TopK { .. } => 3,
        }
    }

    /// Values top-k keeps out of `len`: `ceil(fraction · len)`, at least 1 and at most `len`
    /// (0 for an empty update).
    pub fn topk_count(fraction: f64, len: usize) -> usize {
        // The small tolerance keeps an exact product (0.01 × 4800) from rounding up to 49.
        let k = (fraction * len as f64 - 1e-9).ceil();
        let k = if k.is_finite() && k > 1.0 { k as usize } else { 1 };
        k.min(len)
    }

    /// Bytes [`compress`] produces for `len` values with this codec, header included.
    ///
    /// # Panics
    ///
    /// As [`compress`], on a parameter out of range.
    pub fn encoded_len(&self, len: usize) -> usize {
        HEADER_LEN
            + match *self {
                Self::None => 4 * len,
                Self::Fp16 => 2 * len,
                Self::Int8 { block } => 4 * len.div_ceil(checked_block(block)) + len,
                Self::TopK { fraction } => 8 * Self::topk_count(checked_fraction(fraction), len),
            }
    }
}

fn checked_block(block: u32) -> usize {
    assert!(block >= 1, "int8 block size must be at least 1");
    block as usize
}

fn checked_fraction(fraction: f64) -> f64 {
    assert!(fraction > 0.0 && fraction <= 1.0, "top-k fraction must be in (0, 1], got {fraction}");
    fraction
}

/// Why bytes are not a valid compressed update for the model at hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateFormatError {
    /// The header is truncated, has the wrong magic or version, or the body does not have
    /// exactly the length the header implies.
    Format(FormatError),
    /// The codec id is not one this build knows.
    UnknownCodec {
        /// The id in the header.
        id: u32,
    },
    /// The update has a different number of values from the model's parameters.
    Count {
        /// The model's parameter count.
        expected: usize,
        /// The count in the header.
        found: u32,
    },
    /// The codec parameter is out of range (an int8 block of 0, a top-k `k` above the count).
    Parameter {
        /// The codec's name.
        codec: &'static str,
        /// The parameter in the header.
        value: u32,
    },
    /// A value or scale is NaN or infinite, or a scale is negative.
    Value {
        /// `"value"` or `"scale"`.
        field: &'static str,
        /// Its position in the body.
        index: usize,
    },
    /// An int8 value is −128 (the codec is symmetric: −127..=127).
    Int8Range {
        /// Its position among the values.
        index: usize,
    },
    /// A top-k index is not below the count or not above the previous index.
    Index {
        /// Its position among the indices.
        position: usize,
        /// The index.
        index: u32,
    },
}

impl fmt::Display for UpdateFormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Format(err) => err.fmt(f),
            Self::UnknownCodec { id } => write!(
                f,
                "{WHAT}: unknown codec id {id} (this build reads 0 none, 1 fp16, 2 int8, 3 topk)"
            ),
            Self::Count { expected, found } => write!(
                f,
                "{WHAT}: it has {found} values but the model has {expected} parameters; \
                 it was made for a different model"
            ),
            Self::Parameter { codec, value } => {
                write!(f, "{WHAT}: {codec} parameter {value} is out of range")
            }
            Self::Value { field, index } => {
                write!(f, "{WHAT}: {field} {index} is NaN, infinite or (for a scale) negative")
            }
            Self::Int8Range { index } => {
                write!(f, "{WHAT}: int8 value {index} is -128, outside the symmetric range")
            }
            Self::Index { position, index } => write!(
                f,
                "{WHAT}: top-k index {position} is {index}, which is out of range or not \
                 above the previous index"
            ),
        }
    }
}

impl std::error::Error for UpdateFormatError {}

impl From<FormatError> for UpdateFormatError {
    fn from(err: FormatError) -> Self {
        Self::Format(err)
    }
}

/// The `AMLC` bytes of `values` under `codec` (layout in the [module docs](self)).
///
/// # Panics
///
/// If a value is not finite (check the delta first: a diverged participant must say so, not
/// send garbage), there are more than `u32::MAX` values, or the codec's parameter is out of
/// range (an int8 block of 0, a top-k fraction outside `(0, 1]`).
pub fn compress(codec: Codec, values: &[f32]) -> Vec<u8> {
    if let Some(index) = values.iter().position(|x| !x.is_finite()) {
        panic!("compress: value {index} is not finite");
    }
    let mut out = Vec::with_capacity(codec.encoded_len(values.len()));
    match codec {
        Codec::None => {
            wire::write_header(&mut out, MAGIC, &[0, values.len(), 0]);
            wire::write_f32s(&mut out, values);
        }
        Codec::Fp16 => {
            wire::write_header(&mut out, MAGIC, &[1, values.len(), 0]);
            for &x in values {
                let half = f32_to_f16_bits(x.clamp(-F16_MAX, F16_MAX));
                out.extend_from_slice(&half.to_le_bytes());
            }
        }
        Codec::Int8 { block } => {
            let block = checked_block(block);
            wire::write_header(&mut out, MAGIC, &[2, values.len(), block]);
            let scales: Vec<f32> = values.chunks(block).map(int8_scale).collect();
            wire::write_f32s(&mut out, &scales);
            for (chunk, &scale) in values.chunks(block).zip(&scales) {
                out.extend(chunk.iter().map(|&x| int8_quantize(x, scale).to_le_bytes()[0]));
            }
        }
        Codec::TopK { fraction } => {
            let k = Codec::topk_count(checked_fraction(fraction), values.len());
            wire::write_header(&mut out, MAGIC, &[3, values.len(), k]);
            let chosen = topk_indices(values, k);
            for &index in &chosen {
                // `values.len()` fits in u32 (the header check above), so every index does.
                out.extend_from_slice(&(index as u32).to_le_bytes());
            }
            for &index in &chosen {
                out.extend_from_slice(&values[index].to_le_bytes());
            }
        }
    }
    debug_assert_eq!(out.len(), codec.encoded_len(values.len()));
    out
}

/// The codec id of some `AMLC` bytes, without checking the rest; `None` if the bytes are too
/// short or not `AMLC`. For reporting only: [`decompress`] does the checking.
pub fn codec_id(bytes: &[u8]) -> Option<u32> {
    if bytes.get(..4)? != MAGIC {
        return None;
    }
    let id = bytes.get(8..12)?;
    Some(u32::from_le_bytes([id[0], id[1], id[2], id[3]]))
}

/// Reads a compressed update for a model of `param_count` parameters. Never panics on any
/// bytes; see the [module docs](self) for what is checked.
pub fn decompress(bytes: &[u8], param_count: usize) -> Result<Vec<f32>, UpdateFormatError> {
    let ([codec, count, param], body) = wire::parse_header::<3>(bytes, WHAT, MAGIC)?;
    if usize::try_from(count).ok() != Some(param_count) {
        return Err(UpdateFormatError::Count { expected: param_count, found: count });
    }
    let n = param_count;
    let n64 = n as u64;
    let header = HEADER_LEN as u64;
    match codec {
        0 | 1 => {
            if param != 0 {
                let codec = if codec == 0 { "none" } else { "fp16" };
                return Err(UpdateFormatError::Parameter { codec, value: param });
            }
            let width = if codec == 0 { 4 } else { 2 };
            wire::exact_length(WHAT, header + width * n64, bytes.len())?;
            let mut out = Vec::with_capacity(n);
            if codec == 0 {
                wire::read_f32s(WHAT, body, 0, &mut out)?;
            } else {
                out.extend(
                    body.chunks_exact(2).map(|c| f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))),
                );
                if let Some(index) = out.iter().position(|x| !x.is_finite()) {
                    return Err(UpdateFormatError::Value { field: "value", index });
                }
            }
            Ok(out)
        }
        2 => decode_int8(bytes, body, n, param),
        3 => decode_topk(bytes, body, n, param),
        id => Err(UpdateFormatError::UnknownCodec { id }),
    }
}

fn decode_int8(
    bytes: &[u8],
    body: &[u8],
    n: usize,
    block: u32,
) -> Result<Vec<f32>, UpdateFormatError> {
    if block == 0 {
        return Err(UpdateFormatError::Parameter { codec: "int8", value: block });
    }
    let blocks = n.div_ceil(block as usize);
    wire::exact_length(WHAT, HEADER_LEN as u64 + 4 * blocks as u64 + n as u64, bytes.len())?;
    let (scale_bytes, value_bytes) = body.split_at(4 * blocks);
    let mut scales = Vec::with_capacity(blocks);
    for (index, c) in scale_bytes.chunks_exact(4).enumerate() {
        let scale = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(UpdateFormatError::Value { field: "scale", index });
        }
        scales.push(scale);
    }
    let mut out = Vec::with_capacity(n);
    for (index, &byte) in value_bytes.iter().enumerate() {
        let q = i8::from_le_bytes([byte]);
        if q == i8::MIN {
            return Err(UpdateFormatError::Int8Range { index });
        }
        let value = f32::from(q) * scales[index / block as usize];
        // A scale near f32::MAX times 127 overflows.
        if !value.is_finite() {
            return Err(UpdateFormatError::Value { field: "value", index });
        }
        out.push(value);
    }
    Ok(out)
}

fn decode_topk(bytes: &[u8], body: &[u8], n: usize, k: u32) -> Result<Vec<f32>, UpdateFormatError> {
    let k_usize = k as usize;
    if k_usize > n {
        return Err(UpdateFormatError::Parameter { codec: "topk", value: k });
    }
    wire::exact_length(WHAT, HEADER_LEN as u64 + 8 * u64::from(k), bytes.len())?;
    let (index_bytes, value_bytes) = body.split_at(4 * k_usize);
    let mut out = vec![0.0_f32; n];
    let mut previous: Option<u32> = None;
    for (position, (i, v)) in
        index_bytes.chunks_exact(4).zip(value_bytes.chunks_exact(4)).enumerate()
    {
        let index = u32::from_le_bytes([i[0], i[1], i[2], i[3]]);
        if index as usize >= n || previous.is_some_and(|p| index <= p) {
            return Err(UpdateFormatError::Index { position, index });
        }
        let value = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
        if !value.is_finite() {
            return Err(UpdateFormatError::Value { field: "value", index: position });
        }
        out[index as usize] = value;
        previous = Some(index);
    }
    Ok(out)
}

/// What lossy compression has not sent yet: one participant's error-feedback memory, kept
/// between rounds (see the [module docs](self#error-feedback)).
#[derive(Debug, Clone, PartialEq)]
pub struct Residual {
    values: Vec<f32>,
}

impl Residual {
    /// An empty (all-zero) residual for updates of `len` values.
    pub fn new(len: usize) -> Self {
        Self { values: vec![0.0; len] }
    }

    /// A residual holding `values` (as read back from a participant's saved state).
    pub fn from_values(values: Vec<f32>) -> Self {
        Self { values }
    }

    /// The values not sent yet.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Compresses `delta + residual` and keeps what the bytes do not carry for next time.
    /// Returns the bytes; `decompress` of them gives exactly what the relay will add.
    ///
    /// # Panics
    ///
    /// If `delta` has a different length from the residual, or as [`compress`].
    pub fn compress(&mut self, codec: Codec, delta: &[f32]) -> Vec<u8> {
        assert_eq!(delta.len(), self.values.len(), "Residual::compress: delta length");
        for (r, d) in self.values.iter_mut().zip(delta) {
            *r += d;
        }
        let bytes = compress(codec, &self.values);
        let sent = match decompress(&bytes, self.values.len()) {
            Ok(sent) => sent,
            Err(err) => panic!("compress produced bytes decompress refuses: {err}"),
        };
        for (r, s) in self.values.iter_mut().zip(&sent) {
            *r -= s;
        }
        bytes
    }
}

/// The per-block int8 scale: `max|x| / 127` (0 for an all-zero block).
fn int8_scale(block: &[f32]) -> f32 {
    block.iter().fold(0.0_f32, |max, x| max.max(x.abs())) / 127.0
}

/// `round_ties_even(x / scale)` clamped to `−127..=127`; 0 when the scale is 0.
fn int8_quantize(x: f32, scale: f32) -> i8 {
    if scale == 0.0 {
        return 0;
    }
    // Division rounding can give 127.00001 for the block's maximum; the clamp keeps it.
    (x / scale).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// The indices of the `k` values of largest magnitude (ties: lower index first), ascending.
fn topk_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    // A total order with no ties, so the chosen set does not depend on the selection
    // algorithm.
    let by_magnitude =
        |a: &usize, b: &usize| values[*b].abs().total_cmp(&values[*a].abs()).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k, by_magnitude);
    }
    order.truncate(k);
    order.sort_unstable();
    order
}

/// `x` as IEEE-754 half-precision bits, rounded to nearest, ties to even. Overflow gives
/// infinity, NaN stays NaN (quiet, with the top of its payload).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32;
    let mantissa = bits & 0x7f_ffff;
    if exponent == 0xff {
        let nan = if mantissa != 0 { 0x200 | (mantissa >> 13) as u16 } else { 0 };
        return sign | 0x7c00 | nan;
    }
    // The half-precision biased exponent.
    let half_exponent = exponent - 127 + 15;
    if half_exponent >= 0x1f {
        return sign | 0x7c00;
    }
    if half_exponent <= 0 {
        // A half subnormal (or zero): the value in units of 2^-24 is m >> (14 - e), with m
        // the 24-bit significand. Below 2^-25 it rounds to zero.
        if half_exponent < -10 {
            return sign;
        }
        let significand = mantissa | 0x80_0000;
        let shift = (14 - half_exponent) as u32;
        // May round up to 0x400, the smallest normal: the bit pattern is right as it is.
        return sign | round_shift(significand, shift) as u16;
    }
    let combined = ((half_exponent as u32) << 10) | (mantissa >> 13);
    let rest = mantissa & 0x1fff;
    // Rounding up may carry into the exponent, up to 0x7c00 (infinity): also right.
    let rounded = if rest > 0x1000 || (rest == 0x1000 && combined & 1 == 1) {
        combined + 1
    } else {
        combined
    };
    sign | rounded as u16
}

/// `value >> shift`, rounded to nearest, ties to even (`1 <= shift <= 31`).
fn round_shift(value: u32, shift: u32) -> u32 {
    let kept = value >> shift;
    let rest = value & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    if rest > half || (rest == half && kept & 1 == 1) {
        kept + 1
    } else {
        kept
    }
}

/// The `f32` with the value of half-precision bits `half` (exact: every half is an `f32`).
pub fn f16_bits_to_f32(half: u16) -> f32 {
    let negative = half & 0x8000 != 0;
    let exponent = u32::from((half >> 10) & 0x1f);
    let mantissa = u32::from(half & 0x3ff);
    let bits = match exponent {
        0 => {
            // Zero or subnormal: mantissa × 2^-24, exact in f32; negation keeps -0.0.
            let magnitude = mantissa as f32 * (1.0 / 16_777_216.0);
            return if negative { -magnitude } else { magnitude };
        }
        0x1f => 0x7f80_0000 | (mantissa << 13),
        _ => ((exponent + 127 - 15) << 23) | (mantissa << 13),
    };
    f32::from_bits(if negative { bits | 0x8000_0000 } else { bits })
}

#[cfg(test)]
mod tests;
