//! The request-response codec of `/swarmtrain/rpc/1` and `/swarmtrain/theta/2`: one frame
//! each way, everything up to the end of the stream, at most
//! [`MAX_FRAME_BYTES`](swarmtrain_shared::protocol::MAX_FRAME_BYTES); a longer frame is refused
//! without being buffered.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;
use swarmtrain_shared::protocol::{MAX_FRAME_BYTES, WireError};

/// Length-delimited by the stream itself: a frame is everything up to EOF, at most
/// `MAX_FRAME_BYTES`.
#[derive(Clone, Debug, Default)]
pub struct FrameCodec;

pub async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut frame = Vec::new();
    io.take(MAX_FRAME_BYTES as u64 + 1)
        .read_to_end(&mut frame)
        .await?;
    if frame.len() > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            WireError::TooLarge(frame.len()),
        ));
    }
    Ok(frame)
}

pub async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    frame: Vec<u8>,
) -> io::Result<()> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            WireError::TooLarge(frame.len()),
        ));
    }
    io.write_all(&frame).await?;
    io.close().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, res).await
    }
}
