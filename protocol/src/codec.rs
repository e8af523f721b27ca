//! The wire format, owned by this one module.
//!
//! Every message on the wire is `[FORMAT_VERSION][bincode body]`: bincode `=2.0.1` through its
//! serde integration, `standard()` configuration (little-endian, variable-length integers),
//! with a hard decode limit of [`MAX_FRAME_BYTES`]. Decoding checks the frame length before it
//! touches the body, gives bincode the same limit so no length prefix can make it allocate more,
//! and refuses trailing bytes. See `docs/wire.md`.
//!
//! bincode is no longer maintained upstream; keeping it behind this module keeps a later swap to
//! one change.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The version byte that starts every frame. Bump it on any incompatible change.
pub const FORMAT_VERSION: u8 = 1;

/// The largest frame this codec encodes or decodes, version byte included (1 MiB).
pub const MAX_FRAME_BYTES: usize = 1 << 20;

type Config<const LIMIT: usize> = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<LIMIT>,
>;

const fn config<const LIMIT: usize>() -> Config<LIMIT> {
    bincode::config::standard().with_limit::<LIMIT>()
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty frame")]
    Empty,
    /// The frame is longer than the hard limit.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Length of the frame.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The version byte is not one this build understands.
    #[error("unknown wire format version {got} (this build speaks version {FORMAT_VERSION}); upgrade aimatrix")]
    UnknownVersion {
        /// The version byte received.
        got: u8,
    },
    /// The body is not a valid encoding of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The body decoded but bytes were left over.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded value would exceed the frame limit, so no peer could decode it.
    #[error("encoded message of {len} bytes exceeds the {max} byte frame limit")]
    TooLarge {
        /// Length of the encoding.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The serializer refused the value.
    #[error("cannot encode message: {0}")]
    Serialize(String),
}

/// Encodes `value` as a versioned frame.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    encode_limited::<T, MAX_FRAME_BYTES>(value)
}

/// Decodes a versioned frame. Never panics; never allocates beyond [`MAX_FRAME_BYTES`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode_limited::<T, MAX_FRAME_BYTES>(bytes)
}

/// [`encode`] with a frame limit of `LIMIT` bytes instead of [`MAX_FRAME_BYTES`], for the few
/// frames allowed to be larger (blobs, see `direct`).
pub fn encode_limited<T: Serialize + ?Sized, const LIMIT: usize>(
    value: &T,
) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![FORMAT_VERSION];
    bincode::serde::encode_into_std_write(value, &mut out, config::<LIMIT>())
        .map_err(|e| EncodeError::Serialize(e.to_string()))?;
    if out.len() > LIMIT {
        return Err(EncodeError::TooLarge { len: out.len(), max: LIMIT });
    }
    Ok(out)
}

/// [`decode`] with a frame limit of `LIMIT` bytes instead of [`MAX_FRAME_BYTES`]. Never panics;
/// never allocates beyond `LIMIT`.
pub fn decode_limited<T: DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > LIMIT {
        return Err(DecodeError::TooLarge { len: bytes.len(), max: LIMIT });
    }
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion { got: version });
    }
    let (value, used) = bincode::serde::decode_from_slice::<T, _>(body, config::<LIMIT>())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(DecodeError::TrailingBytes(body.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_byte_and_roundtrip() {
        let bytes = encode(&(42u64, "hi".to_owned())).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<(u64, String)>(&bytes).unwrap(), (42, "hi".to_owned()));
    }

    #[test]
    fn rejects_bad_frames_with_distinct_errors() {
        assert_eq!(decode::<u64>(&[]), Err(DecodeError::Empty));
        assert_eq!(decode::<u64>(&[9, 1]), Err(DecodeError::UnknownVersion { got: 9 }));
        assert!(matches!(decode::<u64>(&[FORMAT_VERSION]), Err(DecodeError::Malformed(_))));
        assert_eq!(decode::<u8>(&[FORMAT_VERSION, 1, 2]), Err(DecodeError::TrailingBytes(1)));
        let huge = vec![FORMAT_VERSION; MAX_FRAME_BYTES + 1];
        assert!(matches!(decode::<Vec<u8>>(&huge), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn a_huge_length_prefix_does_not_allocate() {
        // Claims a Vec<u64> of u64::MAX elements (varint 0xFD + 8 bytes) with no body.
        let mut bytes = vec![FORMAT_VERSION, 0xFD];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<Vec<u64>>(&bytes), Err(DecodeError::Malformed(_))));
        let mut bytes = vec![FORMAT_VERSION, 0xFD];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<String>(&bytes), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn encode_refuses_what_no_peer_could_decode() {
        let big = vec![0u8; MAX_FRAME_BYTES];
        assert!(matches!(encode(&big), Err(EncodeError::TooLarge { .. })));
    }
}
