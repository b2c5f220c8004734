//! One chunk request over QUIC: open a bidirectional stream, send the frame, read a bounded response.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use fog_proto::wire::{ChunkRequest, FrameError, ResponseHead, Status};
use tokio::time::timeout;

use crate::frame_io::{read_frame_within, write_last_frame, ReadError};
use crate::transport::ConnectError;

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

impl Default for Deadlines {
    /// A miss costs the node an origin round trip before the first byte; a stall is just a stall.
    fn default() -> Self {
        Self { first_byte: Duration::from_secs(5), stall: Duration::from_secs(2) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("QUIC stream failed: {0}")]
    Stream(#[source] StreamError),
    #[error("node silent for longer than {0:?}")]
    Timeout(Duration),
    #[error("node answered {status:?}: {message}")]
    Refused { status: Status, message: String },
    #[error("node broke the protocol: {0}")]
    Protocol(#[source] ProtocolError),
    /// The payload stopped part-way after `received` bytes; the caller keeps what verified of them, so the
    /// rest can come from elsewhere.
    #[error("transfer interrupted after {received} bytes: {cause}")]
    Interrupted { received: u32, cause: Box<ChunkError> },
    /// The caller refused the bytes (they failed verification) after `received` of them.
    #[error("the node's bytes failed verification after {received} bytes")]
    Rejected { received: u32 },
}

/// What failed below the protocol: a retry on another node (or a new connection) may help.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// No connection to the node (shared by the tasks that waited on the same dial).
    #[error("cannot connect: {0}")]
    Connect(#[source] std::sync::Arc<ConnectError>),
    #[error("cannot open a stream: {0}")]
    Open(#[source] quinn::ConnectionError),
    #[error("sending the request: {0}")]
    Send(#[source] std::io::Error),
    #[error("reading the response head: {0}")]
    Head(#[source] std::io::Error),
    #[error("reading the payload: {0}")]
    Payload(#[source] quinn::ReadError),
}

/// How the node broke the protocol: it should not be asked again for this object.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("announced {announced} bytes, expected {expected}")]
    WrongLength { announced: u32, expected: u32 },
    #[error("stream ended after {received} of {len} bytes")]
    Ended { received: usize, len: usize },
}

impl From<ReadError<FrameError>> for ChunkError {
    fn from(e: ReadError<FrameError>) -> Self {
        match e {
            ReadError::Io(e) => Self::Stream(StreamError::Head(e)),
            ReadError::Timeout(limit) => Self::Timeout(limit),
            ReadError::Frame(e) => Self::Protocol(ProtocolError::Frame(e)),
        }
    }
}

/// Sends `req` on a new stream of `conn` and returns the payload, which must be exactly `expected_len`
/// bytes. The caller verifies the bytes against the chunk hash. With `until`, a transfer still running
/// then is cut off like a stall, however steadily the node was sending.
pub async fn request(
    conn: &quinn::Connection,
    req: &ChunkRequest,
    expected_len: u32,
    deadlines: Deadlines,
    until: Option<Instant>,
) -> Result<Bytes, ChunkError> {
    let mut out = BytesMut::with_capacity(expected_len as usize);
    request_into(conn, req, expected_len, deadlines, until, &mut |piece| {
        out.extend_from_slice(&piece);
        true
    })
    .await?;
    Ok(out.freeze())
}

/// Like [`request`], but hands the payload to `sink` piece by piece as it arrives, so the caller can
/// verify and pass on each group before the rest has arrived; `sink` returns false to refuse the bytes
/// ([`ChunkError::Rejected`]).
pub async fn request_into(
    conn: &quinn::Connection,
    req: &ChunkRequest,
    expected_len: u32,
    deadlines: Deadlines,
    until: Option<Instant>,
    sink: &mut (dyn FnMut(Bytes) -> bool + Send),
) -> Result<(), ChunkError> {
    let framed = req.encode_framed().map_err(|e| ChunkError::Protocol(e.into()))?;
    let (mut send, mut recv) = timeout(deadlines.first_byte, conn.open_bi())
        .await
        .map_err(|_| ChunkError::Timeout(deadlines.first_byte))?
        .map_err(|e| ChunkError::Stream(StreamError::Open(e)))?;
    write_last_frame(&mut send, &framed).await.map_err(|e| ChunkError::Stream(StreamError::Send(e)))?;

    let len = match read_frame_within(&mut recv, deadlines.first_byte, deadlines.stall).await? {
        ResponseHead::Ok { len } if len == expected_len => len as usize,
        ResponseHead::Ok { len } => {
            return Err(ChunkError::Protocol(ProtocolError::WrongLength { announced: len, expected: expected_len }))
        }
        ResponseHead::Error { status, message } => return Err(ChunkError::Refused { status, message }),
    };
    // Without a caller's deadline, a node must still deliver the whole chunk at a minimum rate: one that
    // trickles a byte now and then (never stalling for `stall`) is cut off, and the caller falls back.
    let until = until.or_else(|| Instant::now().checked_add(deadlines.stall + PER_BYTE_AT_MIN_RATE * len as u32));
    let mut got = 0;
    while got < len {
        let wait = until.map_or(deadlines.stall, |u| deadlines.stall.min(u.saturating_duration_since(Instant::now())));
        let piece = match timeout(wait, recv.read_chunk(len - got, true)).await {
            Err(_) => Err(ChunkError::Timeout(wait)),
            Ok(Err(e)) => Err(ChunkError::Stream(StreamError::Payload(e))),
            Ok(Ok(None)) => Err(ChunkError::Protocol(ProtocolError::Ended { received: got, len })),
            Ok(Ok(Some(c))) => Ok(c.bytes),
        };
        match piece {
            Ok(bytes) => {
                got += bytes.len();
                if !sink(bytes) {
                    return Err(ChunkError::Rejected { received: got as u32 });
                }
            }
            Err(cause) if got == 0 => return Err(cause),
            Err(cause) => return Err(ChunkError::Interrupted { received: got as u32, cause: Box::new(cause) }),
        }
    }
    Ok(())
}
