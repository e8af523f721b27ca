//! Byte-level helpers shared by the three file formats: header parsing and `f32` runs.
//!
//! Every read is bounds-checked against the input; nothing here allocates before the input's
//! length has been checked against what the header claims.

use crate::{FormatError, FORMAT_VERSION, MAX_DIM};

/// Bytes taken by the magic and the version.
const PREAMBLE: usize = 8;

/// Parses `magic`, the version and `N` `u32` header fields; returns the fields and the body.
pub(crate) fn parse_header<'a, const N: usize>(
    bytes: &'a [u8],
    what: &'static str,
    magic: &[u8; 4],
) -> Result<([u32; N], &'a [u8]), FormatError> {
    let header_len = PREAMBLE + 4 * N;
    let truncated = || FormatError::Truncated { what, needed: header_len, found: bytes.len() };
    // Check the magic as soon as four bytes exist: for a wrong file that is the useful message.
    let found = bytes.get(..4).ok_or_else(truncated)?;
    if found != magic {
        let found = [found[0], found[1], found[2], found[3]];
        return Err(FormatError::BadMagic { what, expected: *magic, found });
    }
    // Then the version, before the rest of the header: a future version may have a longer one.
    let version = read_u32(bytes, 4).ok_or_else(truncated)?;
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { what, found: version });
    }
    let body = bytes.get(header_len..).ok_or_else(truncated)?;
    let mut fields = [0u32; N];
    for (index, field) in fields.iter_mut().enumerate() {
        *field = read_u32(bytes, PREAMBLE + 4 * index).ok_or_else(truncated)?;
    }
    Ok((fields, body))
}

/// The little-endian `u32` at `offset`, if the input is long enough.
fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let word = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes([word[0], word[1], word[2], word[3]]))
}

/// Checks a header dimension is in `1..=MAX_DIM` and returns it as `usize`.
pub(crate) fn dimension(
    what: &'static str,
    field: &'static str,
    value: u32,
) -> Result<usize, FormatError> {
    match usize::try_from(value) {
        Ok(dim) if (1..=MAX_DIM).contains(&dim) => Ok(dim),
        _ => Err(FormatError::Dimension { what, field, value }),
    }
}

/// Fails unless `found` bytes is exactly `expected` (computed in `u64`, so no overflow).
pub(crate) fn exact_length(
    what: &'static str,
    expected: u64,
    found: usize,
) -> Result<(), FormatError> {
    if u64::try_from(found).ok() == Some(expected) {
        Ok(())
    } else {
        Err(FormatError::Length { what, expected, found })
    }
}

/// Decodes little-endian `f32`s, refusing NaN and infinities. `first_index` numbers the
/// values within the whole file, for the error message.
pub(crate) fn read_f32s(
    what: &'static str,
    bytes: &[u8],
    first_index: usize,
    out: &mut Vec<f32>,
) -> Result<(), FormatError> {
    for (i, c) in bytes.chunks_exact(4).enumerate() {
        let value = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if !value.is_finite() {
            return Err(FormatError::NonFinite { what, index: first_index + i });
        }
        out.push(value);
    }
    Ok(())
}

/// Starts a file: magic, version and header fields.
pub(crate) fn write_header(out: &mut Vec<u8>, magic: &[u8; 4], fields: &[usize]) {
    out.extend_from_slice(magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for &field in fields {
        let Ok(field) = u32::try_from(field) else {
            panic!("header field {field} does not fit in a u32");
        };
        out.extend_from_slice(&field.to_le_bytes());
    }
}

/// Appends `f32`s little-endian.
pub(crate) fn write_f32s(out: &mut Vec<u8>, values: &[f32]) {
    for value in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
}
