//! The request-response codec of `/aimatrix/direct/1`.
//!
//! One frame per stream and direction: a 4-byte big-endian length, then a frame of the protocol
//! codec (`aimatrix_protocol::direct`). The reader learns the frame's limit from the length and
//! the frame's first two bytes (version and variant) before it reads the rest, and grows its
//! buffer only as bytes arrive, so a peer that announces a large frame and sends nothing costs
//! nothing, and no frame ever costs more than its limit.

use std::io;

use aimatrix_protocol::direct::{self, DirectRequest, DirectResponse};
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

/// The protocol name of direct requests.
pub const DIRECT_PROTOCOL: StreamProtocol = StreamProtocol::new("/aimatrix/direct/1");

/// How much the read buffer grows at least per step.
const READ_CHUNK_BYTES: usize = 64 << 10;

/// The [`libp2p::request_response::Codec`] for [`DirectRequest`] and [`DirectResponse`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DirectCodec;

impl libp2p::request_response::Codec for DirectCodec {
    type Protocol = StreamProtocol;
    type Request = DirectRequest;
    type Response = DirectResponse;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<DirectRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_frame(io, direct::request_frame_bytes_max).await?;
        direct::decode_request(&frame).map_err(invalid_data)
    }

    async fn read_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> io::Result<DirectResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let frame = read_frame(io, direct::response_frame_bytes_max).await?;
        direct::decode_response(&frame).map_err(invalid_data)
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        req: DirectRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = direct::encode_request(&req).map_err(invalid_data)?;
        write_frame(io, &frame).await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        resp: DirectResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let frame = direct::encode_response(&resp).map_err(invalid_data)?;
        write_frame(io, &frame).await
    }
}

fn invalid_data(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Reads one length-prefixed frame whose limit `frame_max` computes from its first two bytes.
pub(crate) async fn read_frame<T>(io: &mut T, frame_max: fn(&[u8]) -> usize) -> io::Result<Vec<u8>>
where
    T: AsyncRead + Unpin,
{
    let mut len_bytes = [0u8; 4];
    io.read_exact(&mut len_bytes).await?;
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > direct::FRAME_BYTES_MAX {
        return Err(invalid_data(format!(
            "frame of {len} bytes exceeds the {} byte limit",
            direct::FRAME_BYTES_MAX
        )));
    }
    let mut frame = vec![0u8; len.min(2)];
    io.read_exact(&mut frame).await?;
    let max = frame_max(&frame);
    if len > max {
        return Err(invalid_data(format!("frame of {len} bytes exceeds the {max} byte limit")));
    }
    while frame.len() < len {
        let start = frame.len();
        let step = start.max(READ_CHUNK_BYTES).min(len - start);
        frame.reserve_exact(step);
        frame.resize(start + step, 0);
        io.read_exact(&mut frame[start..]).await?;
    }
    Ok(frame)
}

/// Writes one length-prefixed frame.
pub(crate) async fn write_frame<T>(io: &mut T, frame: &[u8]) -> io::Result<()>
where
    T: AsyncWrite + Unpin,
{
    // The encoders refuse anything over FRAME_BYTES_MAX, far below u32::MAX.
    let len = u32::try_from(frame.len()).map_err(invalid_data)?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(frame).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use aimatrix_protocol::codec;
    use aimatrix_protocol::hash::Digest;
    use libp2p::futures::executor::block_on;
    use libp2p::futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    fn roundtrip_request(req: DirectRequest) -> DirectRequest {
        let mut wire = Vec::new();
        block_on(DirectCodec.write_request(&DIRECT_PROTOCOL, &mut wire, req)).unwrap();
        block_on(DirectCodec.read_request(&DIRECT_PROTOCOL, &mut Cursor::new(wire))).unwrap()
    }

    #[test]
    fn requests_and_responses_roundtrip() {
        for req in [
            DirectRequest::Message(vec![1; 3000]),
            DirectRequest::GetBlob(Digest::of(b"m")),
            DirectRequest::PutBlob {
                job_id: aimatrix_protocol::messages::JobId([3; 16]),
                lease: 9,
                bytes: vec![7; 200_000],
            },
        ] {
            assert_eq!(roundtrip_request(req.clone()), req);
        }
        for resp in [DirectResponse::Blob(vec![4; 150_000]), DirectResponse::refused("busy")] {
            let mut wire = Vec::new();
            block_on(DirectCodec.write_response(&DIRECT_PROTOCOL, &mut wire, resp.clone()))
                .unwrap();
            let back =
                block_on(DirectCodec.read_response(&DIRECT_PROTOCOL, &mut Cursor::new(wire)))
                    .unwrap();
            assert_eq!(back, resp);
        }
    }

    #[test]
    fn an_oversize_frame_is_refused_before_its_body_is_read() {
        // Announces a blob frame one byte over the limit, and sends no body.
        let len = (direct::FRAME_BYTES_MAX + 1) as u32;
        let wire = len.to_be_bytes().to_vec();
        let err = block_on(DirectCodec.read_request(&DIRECT_PROTOCOL, &mut Cursor::new(wire)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("exceeds"), "{err}");

        // A Message frame may not be blob-sized: its variant byte gives it a smaller limit.
        let len = (direct::MESSAGE_FRAME_BYTES_MAX + 1) as u32;
        let mut wire = len.to_be_bytes().to_vec();
        wire.extend_from_slice(&[codec::FORMAT_VERSION, 0]);
        let err = block_on(DirectCodec.read_request(&DIRECT_PROTOCOL, &mut Cursor::new(wire)))
            .unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");

        // Responses: only Blob frames may be large.
        let len = (direct::SMALL_FRAME_BYTES_MAX + 1) as u32;
        let mut wire = len.to_be_bytes().to_vec();
        wire.extend_from_slice(&[codec::FORMAT_VERSION, 1]);
        let err = block_on(DirectCodec.read_response(&DIRECT_PROTOCOL, &mut Cursor::new(wire)))
            .unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[test]
    fn a_truncated_frame_is_an_error_not_a_hang() {
        let frame = direct::encode_request(&DirectRequest::Message(vec![1; 100])).unwrap();
        let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(&frame[..50]);
        let err = block_on(DirectCodec.read_request(&DIRECT_PROTOCOL, &mut Cursor::new(wire)))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn writing_an_oversize_request_fails() {
        let req = DirectRequest::Message(vec![0; codec::MAX_FRAME_BYTES + 1]);
        let mut wire = Vec::new();
        let err = block_on(DirectCodec.write_request(&DIRECT_PROTOCOL, &mut wire, req));
        assert!(err.is_err());
        assert!(wire.is_empty());
    }
}
