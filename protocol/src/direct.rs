//! Direct requests: what one peer asks another over the request-response protocol
//! `/aimatrix/direct/1`, and the answer.
//!
//! A [`DirectRequest`] carries a sealed envelope for the core ([`DirectRequest::Message`]), or
//! moves a blob ([`DirectRequest::GetBlob`], [`DirectRequest::PutBlob`]). Both directions go
//! through the protocol codec (version byte, bincode) with limits that depend on the variant:
//! a message frame is bounded by about [`codec::MAX_FRAME_BYTES`], a blob frame by
//! [`FRAME_BYTES_MAX`], everything else by [`SMALL_FRAME_BYTES_MAX`]. The variant is the frame's
//! second byte, so a reader can learn its limit from the first two bytes of a frame
//! ([`request_frame_bytes_max`], [`response_frame_bytes_max`]) before it reads the rest.
//!
//! ```
//! use aimatrix_protocol::direct::{self, DirectRequest, DirectResponse};
//! use aimatrix_protocol::hash::Digest;
//!
//! let req = DirectRequest::GetBlob(Digest::of(b"module"));
//! let frame = direct::encode_request(&req).unwrap();
//! assert!(frame.len() <= direct::request_frame_bytes_max(&frame));
//! assert_eq!(direct::decode_request(&frame).unwrap(), req);
//!
//! let resp = direct::decode_response(&direct::encode_response(&DirectResponse::NotFound).unwrap());
//! assert_eq!(resp.unwrap(), DirectResponse::NotFound);
//! ```

use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError, EncodeError};
use crate::hash::Digest;
use crate::messages::JobId;

/// The largest blob a [`DirectRequest::PutBlob`] or [`DirectResponse::Blob`] may carry (64 MiB).
pub const BLOB_BYTES_MAX: usize = 64 << 20;

/// The largest frame of a blob-carrying request or response: the blob plus room for the frame
/// header, job id and lease.
pub const FRAME_BYTES_MAX: usize = BLOB_BYTES_MAX + 64;

/// The largest frame of a [`DirectRequest::Message`]: an envelope of at most
/// [`codec::MAX_FRAME_BYTES`] plus the frame header.
pub const MESSAGE_FRAME_BYTES_MAX: usize = codec::MAX_FRAME_BYTES + 16;

/// The largest frame of every other request or response (digests, verdicts, reasons).
pub const SMALL_FRAME_BYTES_MAX: usize = 4096;

/// The longest reason a [`DirectResponse::Refused`] may give, in bytes.
pub const REASON_BYTES_MAX: usize = 1024;

/// A request from one peer to another.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectRequest {
    /// A sealed envelope for the receiver's core (claim, lease, denial, progress, result,
    /// receipt, cancel). At most [`codec::MAX_FRAME_BYTES`].
    Message(#[serde(with = "raw_bytes")] Vec<u8>),
    /// Asks for the blob with this digest (a module or an input).
    GetBlob(Digest),
    /// Uploads an output of `job_id` under `lease`, before the result that names it.
    PutBlob {
        /// The job the output belongs to.
        job_id: JobId,
        /// The uploader's lease on that job.
        lease: u32,
        /// The blob, at most [`BLOB_BYTES_MAX`].
        #[serde(with = "raw_bytes")]
        bytes: Vec<u8>,
    },
}

/// The answer to a [`DirectRequest`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectResponse {
    /// The message or upload was taken (handed to the core, or stored).
    Accepted,
    /// The request was refused, with a reason of at most [`REASON_BYTES_MAX`] bytes.
    Refused(String),
    /// The requested blob, at most [`BLOB_BYTES_MAX`].
    Blob(#[serde(with = "raw_bytes")] Vec<u8>),
    /// The receiver has no blob with that digest.
    NotFound,
}

impl DirectResponse {
    /// A [`DirectResponse::Refused`] whose reason is cut to [`REASON_BYTES_MAX`] bytes (at a
    /// character boundary), so it always encodes.
    pub fn refused(reason: &str) -> Self {
        let mut end = reason.len().min(REASON_BYTES_MAX);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Self::Refused(reason[..end].to_owned())
    }
}

// Blobs can be 64 MiB: show their length, not their bytes.
impl std::fmt::Debug for DirectRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Message(bytes) => write!(f, "Message({} bytes)", bytes.len()),
            Self::GetBlob(digest) => write!(f, "GetBlob({digest:?})"),
            Self::PutBlob { job_id, lease, bytes } => {
                write!(f, "PutBlob {{ job_id: {job_id:?}, lease: {lease}, {} bytes }}", bytes.len())
            }
        }
    }
}

impl std::fmt::Debug for DirectResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Accepted => f.write_str("Accepted"),
            Self::Refused(reason) => write!(f, "Refused({reason:?})"),
            Self::Blob(bytes) => write!(f, "Blob({} bytes)", bytes.len()),
            Self::NotFound => f.write_str("NotFound"),
        }
    }
}

// The variant tags as bincode writes them (the variant index, one byte below 251).
const TAG_REQUEST_MESSAGE: u8 = 0;
const TAG_REQUEST_PUT_BLOB: u8 = 2;
const TAG_RESPONSE_BLOB: u8 = 2;

/// The largest frame a request may have, given at least its first two bytes (version and
/// variant). A reader calls this before reading the rest of a frame.
pub fn request_frame_bytes_max(head: &[u8]) -> usize {
    match head.get(1) {
        Some(&TAG_REQUEST_MESSAGE) => MESSAGE_FRAME_BYTES_MAX,
        Some(&TAG_REQUEST_PUT_BLOB) => FRAME_BYTES_MAX,
        _ => SMALL_FRAME_BYTES_MAX,
    }
}

/// The largest frame a response may have, given at least its first two bytes.
pub fn response_frame_bytes_max(head: &[u8]) -> usize {
    match head.get(1) {
        Some(&TAG_RESPONSE_BLOB) => FRAME_BYTES_MAX,
        _ => SMALL_FRAME_BYTES_MAX,
    }
}

/// Encodes a request, refusing one whose payload is over its limit.
pub fn encode_request(req: &DirectRequest) -> Result<Vec<u8>, EncodeError> {
    check_request(req)?;
    codec::encode_limited::<_, FRAME_BYTES_MAX>(req)
}

/// Decodes a request: the frame limit for its variant first, then the codec (version, bincode
/// under the limit, no trailing bytes), then the payload limit. Never panics.
pub fn decode_request(frame: &[u8]) -> Result<DirectRequest, DecodeError> {
    let max = request_frame_bytes_max(frame);
    if frame.len() > max {
        return Err(DecodeError::TooLarge { len: frame.len(), max });
    }
    let req = codec::decode_limited::<DirectRequest, FRAME_BYTES_MAX>(frame)?;
    check_request(&req).map_err(too_large)?;
    Ok(req)
}

/// Encodes a response, refusing one whose payload is over its limit.
pub fn encode_response(resp: &DirectResponse) -> Result<Vec<u8>, EncodeError> {
    check_response(resp)?;
    codec::encode_limited::<_, FRAME_BYTES_MAX>(resp)
}

/// Decodes a response, with the same checks as [`decode_request`]. Never panics.
pub fn decode_response(frame: &[u8]) -> Result<DirectResponse, DecodeError> {
    let max = response_frame_bytes_max(frame);
    if frame.len() > max {
        return Err(DecodeError::TooLarge { len: frame.len(), max });
    }
    let resp = codec::decode_limited::<DirectResponse, FRAME_BYTES_MAX>(frame)?;
    check_response(&resp).map_err(too_large)?;
    Ok(resp)
}

/// Checks the payload limits of a request without encoding it: a message of at most
/// [`codec::MAX_FRAME_BYTES`], a blob of at most [`BLOB_BYTES_MAX`].
pub fn check_request(req: &DirectRequest) -> Result<(), EncodeError> {
    match req {
        DirectRequest::Message(bytes) => within(bytes.len(), codec::MAX_FRAME_BYTES),
        DirectRequest::GetBlob(_) => Ok(()),
        DirectRequest::PutBlob { bytes, .. } => within(bytes.len(), BLOB_BYTES_MAX),
    }
}

/// Checks the payload limits of a response without encoding it: a blob of at most
/// [`BLOB_BYTES_MAX`], a reason of at most [`REASON_BYTES_MAX`] bytes.
pub fn check_response(resp: &DirectResponse) -> Result<(), EncodeError> {
    match resp {
        DirectResponse::Accepted | DirectResponse::NotFound => Ok(()),
        DirectResponse::Refused(reason) => within(reason.len(), REASON_BYTES_MAX),
        DirectResponse::Blob(bytes) => within(bytes.len(), BLOB_BYTES_MAX),
    }
}

const fn within(len: usize, max: usize) -> Result<(), EncodeError> {
    if len <= max {
        Ok(())
    } else {
        Err(EncodeError::TooLarge { len, max })
    }
}

/// A payload over its limit, reported by the decoder.
fn too_large(e: EncodeError) -> DecodeError {
    match e {
        EncodeError::TooLarge { len, max } => DecodeError::TooLarge { len, max },
        EncodeError::Serialize(text) => DecodeError::Malformed(text),
    }
}

/// Byte vectors as one serde byte string instead of a sequence of `u8`s: the same bincode layout
/// (varint length, raw bytes), without a call per byte for a 64 MiB blob.
mod raw_bytes {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        // Self-describing formats may hand bytes over as a sequence.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests() -> Vec<DirectRequest> {
        vec![
            DirectRequest::Message(vec![1, 2, 3]),
            DirectRequest::Message(Vec::new()),
            DirectRequest::GetBlob(Digest::of(b"x")),
            DirectRequest::PutBlob { job_id: JobId([7; 16]), lease: 3, bytes: vec![9; 1000] },
        ]
    }

    fn responses() -> Vec<DirectResponse> {
        vec![
            DirectResponse::Accepted,
            DirectResponse::Refused("no lease".into()),
            DirectResponse::Blob(vec![5; 300]),
            DirectResponse::NotFound,
        ]
    }

    #[test]
    fn roundtrip_every_variant() {
        for req in requests() {
            let frame = encode_request(&req).unwrap();
            assert!(frame.len() <= request_frame_bytes_max(&frame[..2]), "{req:?}");
            assert_eq!(decode_request(&frame).unwrap(), req);
        }
        for resp in responses() {
            let frame = encode_response(&resp).unwrap();
            assert!(frame.len() <= response_frame_bytes_max(&frame[..2]), "{resp:?}");
            assert_eq!(decode_response(&frame).unwrap(), resp);
        }
    }

    #[test]
    fn raw_bytes_keep_the_layout_of_a_byte_vector() {
        let bytes = vec![0u8, 1, 250, 255];
        let frame = encode_request(&DirectRequest::Message(bytes.clone())).unwrap();
        // Version, variant 0, then exactly what the codec writes for a plain Vec<u8>.
        let plain = codec::encode(&bytes).unwrap();
        assert_eq!(frame[..2], [codec::FORMAT_VERSION, 0]);
        assert_eq!(frame[2..], plain[1..]);
    }

    #[test]
    fn the_largest_payloads_fit_their_frames() {
        let msg = DirectRequest::Message(vec![0; codec::MAX_FRAME_BYTES]);
        let frame = encode_request(&msg).unwrap();
        assert!(frame.len() <= MESSAGE_FRAME_BYTES_MAX);
        assert_eq!(decode_request(&frame).unwrap(), msg);

        let put = DirectRequest::PutBlob {
            job_id: JobId([0xff; 16]),
            lease: u32::MAX,
            bytes: vec![1; BLOB_BYTES_MAX],
        };
        let frame = encode_request(&put).unwrap();
        assert!(frame.len() <= FRAME_BYTES_MAX);
        assert_eq!(decode_request(&frame).unwrap(), put);

        let reason = "é".repeat(REASON_BYTES_MAX); // 2 bytes each: cut at a char boundary
        let DirectResponse::Refused(cut) = DirectResponse::refused(&reason) else { unreachable!() };
        assert_eq!(cut.len(), REASON_BYTES_MAX);
        assert!(encode_response(&DirectResponse::Refused(cut)).is_ok());
    }

    #[test]
    fn oversize_payloads_are_refused_both_ways() {
        let msg = DirectRequest::Message(vec![0; codec::MAX_FRAME_BYTES + 1]);
        assert!(matches!(encode_request(&msg), Err(EncodeError::TooLarge { .. })));
        let blob = DirectResponse::Blob(vec![0; BLOB_BYTES_MAX + 1]);
        assert!(matches!(encode_response(&blob), Err(EncodeError::TooLarge { .. })));
        let reason = DirectResponse::Refused("x".repeat(REASON_BYTES_MAX + 1));
        assert!(matches!(encode_response(&reason), Err(EncodeError::TooLarge { .. })));

        // A peer that encodes without the checks: the decoder refuses by frame size.
        let frame = codec::encode_limited::<_, FRAME_BYTES_MAX>(&msg).unwrap();
        assert!(matches!(decode_request(&frame), Err(DecodeError::TooLarge { .. })));
        let frame = codec::encode_limited::<_, FRAME_BYTES_MAX>(&reason).unwrap();
        assert!(matches!(decode_response(&frame), Err(DecodeError::TooLarge { .. })));
        let mut huge = vec![codec::FORMAT_VERSION, TAG_REQUEST_PUT_BLOB];
        huge.resize(FRAME_BYTES_MAX + 1, 0);
        assert!(matches!(decode_request(&huge), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn a_lying_length_prefix_is_refused_without_allocating() {
        // PutBlob claiming a u64::MAX byte blob, with no bytes behind it.
        let mut frame = vec![codec::FORMAT_VERSION, TAG_REQUEST_PUT_BLOB];
        frame.extend_from_slice(&[0; 16]); // job id
        frame.push(1); // lease
        frame.push(0xFD);
        frame.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode_request(&frame), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn trailing_bytes_and_bad_frames_are_refused() {
        let mut frame = encode_request(&DirectRequest::GetBlob(Digest::of(b"y"))).unwrap();
        frame.push(0);
        assert_eq!(decode_request(&frame), Err(DecodeError::TrailingBytes(1)));
        let mut frame = encode_response(&DirectResponse::Accepted).unwrap();
        frame.push(0);
        assert_eq!(decode_response(&frame), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(decode_request(&[]), Err(DecodeError::Empty));
        assert!(matches!(
            decode_request(&[codec::FORMAT_VERSION, 9]),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(decode_response(&[9, 0]), Err(DecodeError::UnknownVersion { got: 9 }));
    }
}
