//! One chunk request over QUIC: open a bidirectional stream, send the frame, read a bounded response.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fog_proto::wire::{ChunkRequest, FrameError, ResponseHead, Status};
use tokio::time::timeout;

/// The slowest delivery of a whole chunk a request accepts when its caller sets no deadline of its own:
/// 16 KiB/s (a 1 MiB chunk gets 64 s after its first byte, plus one stall interval).
const PER_BYTE_AT_MIN_RATE: Duration = Duration::from_nanos(1_000_000_000 / (16 * 1024));

/// How long a node may stay silent before we give up on it.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// From sending the request to the first response byte (covers a node's origin pull on a miss).
    pub first_byte: Duration,
    /// Longest gap between two pieces of the payload: a node that stalls is abandoned, not waited out.
    pub stall: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ChunkError {
    #[error("QUIC stream failed: {0}")]
    Stream(String),
    #[error("node silent for longer than {0:?}")]
    Timeout(Duration),
    #[error("node answered {status:?}: {message}")]
    Refused { status: Status, message: String },
    #[error("node broke the protocol: {0}")]
    Protocol(String),
    /// The payload stopped part-way; what arrived is kept so the rest can come from elsewhere.
    #[error("transfer interrupted after {} bytes: {cause}", received.len())]
    Interrupted { received: Bytes, cause: Box<ChunkError> },
}

impl From<FrameError> for ChunkError {
    fn from(e: FrameError) -> Self {
        Self::Protocol(e.to_string())
    }
}

async fn read_exact_within(recv: &mut quinn::RecvStream, buf: &mut [u8], limit: Duration) -> Result<(), ChunkError> {
    timeout(limit, recv.read_exact(buf))
        .await
        .map_err(|_| ChunkError::Timeout(limit))?
        .map_err(|e| ChunkError::Stream(e.to_string()))
}

/// Sends `req` on a new stream of `conn` and returns the payload, which must be exactly `expected_len`
/// bytes. The caller verifies the bytes against the chunk hash. With `until`, a transfer still running
/// then is cut off like a stall (keeping what arrived), however steadily the node was sending.
pub async fn request(
    conn: &quinn::Connection,
    req: &ChunkRequest,
    expected_len: u32,
    deadlines: Deadlines,
    until: Option<Instant>,
) -> Result<Bytes, ChunkError> {
    let framed = req.encode_framed()?;
    let (mut send, mut recv) = timeout(deadlines.first_byte, conn.open_bi())
        .await
        .map_err(|_| ChunkError::Timeout(deadlines.first_byte))?
        .map_err(|e| ChunkError::Stream(e.to_string()))?;
    send.write_all(&framed).await.map_err(|e| ChunkError::Stream(e.to_string()))?;
    send.finish().map_err(|e| ChunkError::Stream(e.to_string()))?;

    let mut status = [0u8; 1];
    read_exact_within(&mut recv, &mut status, deadlines.first_byte).await?;
    let status = Status::from_u8(status[0]).ok_or(FrameError::UnknownStatus(status[0]))?;
    let mut len_buf = [0u8; 4];
    let len_field = &mut len_buf[..ResponseHead::len_field_size(status)];
    read_exact_within(&mut recv, len_field, deadlines.stall).await?;
    let len = len_field.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
    let len = ResponseHead::check_len(status, len)?;

    if status != Status::Ok {
        let mut msg = vec![0u8; len];
        read_exact_within(&mut recv, &mut msg, deadlines.stall).await?;
        return Err(ChunkError::Refused { status, message: String::from_utf8_lossy(&msg).into_owned() });
    }
    if len != expected_len as usize {
        return Err(ChunkError::Protocol(format!("announced {len} bytes, expected {expected_len}")));
    }
    // Without a caller's deadline, a node must still deliver the whole chunk at a minimum rate: one that
    // trickles a byte now and then (never stalling for `stall`) is cut off, and the caller falls back.
    let until = until.or_else(|| Instant::now().checked_add(deadlines.stall + PER_BYTE_AT_MIN_RATE * len as u32));
    let mut out = BytesMut::with_capacity(len);
    while out.len() < len {
        let wait = until.map_or(deadlines.stall, |u| deadlines.stall.min(u.saturating_duration_since(Instant::now())));
        let piece = match timeout(wait, recv.read_chunk(len - out.len(), true)).await {
            Err(_) => Err(ChunkError::Timeout(wait)),
            Ok(Err(e)) => Err(ChunkError::Stream(e.to_string())),
            Ok(Ok(None)) => Err(ChunkError::Protocol(format!("stream ended after {} of {len} bytes", out.len()))),
            Ok(Ok(Some(c))) => Ok(c.bytes),
        };
        match piece {
            Ok(bytes) => out.extend_from_slice(&bytes),
            Err(cause) if out.is_empty() => return Err(cause),
            Err(cause) => return Err(ChunkError::Interrupted { received: out.freeze(), cause: Box::new(cause) }),
        }
    }
    Ok(out.freeze())
}
