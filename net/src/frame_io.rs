//! Frames over any byte stream: a quinn stream, a libp2p stream (through tokio-util's compat layer), an
//! in-memory duplex in tests. The codecs are fog-proto's ([`fog_proto::wire::Decode`]); this reads exactly
//! the bytes a frame needs, as its decoder asks for them, so a payload after a head stays in the stream for
//! the caller, and nothing is allocated past a frame's bound.

use std::time::Duration;

use fog_proto::wire::{Decode, Decoded};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum ReadError<E: std::error::Error + 'static> {
    /// The stream failed or ended (`UnexpectedEof`) before the frame was complete.
    #[error("reading a frame: {0}")]
    Io(#[from] std::io::Error),
    #[error("no frame bytes for {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Frame(#[source] E),
}

/// Reads one `T` off `r`; the caller bounds how long that may take.
pub async fn read_frame<T: Decode, R: AsyncRead + Unpin>(r: &mut R) -> Result<T, ReadError<T::Error>> {
    read(r, None).await
}

/// Reads one `T` off `r`, giving up when its first byte takes longer than `first_byte` or any later piece
/// longer than `stall`.
pub async fn read_frame_within<T: Decode, R: AsyncRead + Unpin>(
    r: &mut R,
    first_byte: Duration,
    stall: Duration,
) -> Result<T, ReadError<T::Error>> {
    read(r, Some((first_byte, stall))).await
}

async fn read<T: Decode, R: AsyncRead + Unpin>(
    r: &mut R,
    deadlines: Option<(Duration, Duration)>,
) -> Result<T, ReadError<T::Error>> {
    let mut buf = Vec::new();
    loop {
        let needed = match T::decode_prefix(&buf).map_err(ReadError::Frame)? {
            Decoded::Done { frame, len } => {
                debug_assert_eq!(len, buf.len(), "read more than the frame");
                return Ok(frame);
            }
            Decoded::NeedMore(n) => n,
        };
        // Decoders ask for at least one byte; zero would loop here for ever.
        debug_assert!(needed > 0);
        let start = buf.len();
        buf.resize(start + needed, 0);
        let piece = r.read_exact(&mut buf[start..]);
        match deadlines {
            None => piece.await?,
            Some((first_byte, stall)) => {
                let limit = if start == 0 { first_byte } else { stall };
                tokio::time::timeout(limit, piece).await.map_err(|_| ReadError::Timeout(limit))??
            }
        };
    }
}

/// Writes `frame` (as its codec encoded it) and finishes this side of the stream: each exchange here is
/// one frame (or one head and its payload) each way.
pub async fn write_last_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> std::io::Result<()> {
    w.write_all(frame).await?;
    w.shutdown().await
}

#[cfg(test)]
mod tests {
    use fog_proto::rendezvous::{self, Frame};
    use fog_proto::wire::{ChunkRequest, FrameError, PeerResponseHead, ResponseHead, Status, MAX_REQUEST_LEN};
    use fog_proto::ChunkHash;
    use tokio::io::duplex;

    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    /// `bytes` written and the writing side closed, for a reader to read from.
    async fn stream_of(bytes: &[u8]) -> tokio::io::DuplexStream {
        let (mut ours, theirs) = duplex(64 * 1024);
        write_last_frame(&mut ours, bytes).await.expect("write");
        theirs
    }

    #[tokio::test]
    async fn frames_read_back_and_leave_the_payload_behind() {
        let req = ChunkRequest::receipt_only(b"{}".to_vec());
        let mut r = stream_of(&req.encode_framed().expect("fits")).await;
        assert_eq!(read_frame::<ChunkRequest, _>(&mut r).await.expect("request"), req);

        let mut bytes = ResponseHead::Ok { len: 3 }.encode();
        bytes.extend_from_slice(b"abc");
        let mut r = stream_of(&bytes).await;
        let head: ResponseHead = read_frame_within(&mut r, LONG, LONG).await.expect("head");
        assert_eq!(head, ResponseHead::Ok { len: 3 });
        let mut payload = Vec::new();
        r.read_to_end(&mut payload).await.expect("payload");
        assert_eq!(payload, b"abc");

        let refusal = ResponseHead::Error { status: Status::Busy, message: "later".into() };
        let mut r = stream_of(&refusal.encode()).await;
        assert_eq!(read_frame::<ResponseHead, _>(&mut r).await.expect("head"), refusal);

        let mut bytes = PeerResponseHead::Ok { len: 2 }.encode();
        bytes.extend_from_slice(b"xy");
        let mut r = stream_of(&bytes).await;
        assert_eq!(read_frame::<PeerResponseHead, _>(&mut r).await.expect("head"), PeerResponseHead::Ok { len: 2 });
        let mut r = stream_of(&PeerResponseHead::Busy.encode()).await;
        assert_eq!(read_frame::<PeerResponseHead, _>(&mut r).await.expect("head"), PeerResponseHead::Busy);

        let frame = Frame::Punch { target: fog_proto::NodeId([7; 32]) };
        let mut r = stream_of(&frame.encode()).await;
        assert_eq!(read_frame::<Frame, _>(&mut r).await.expect("frame"), frame);
    }

    #[tokio::test]
    async fn truncated_streams_fail_cleanly() {
        let req = ChunkRequest {
            hash: ChunkHash::of(b"a"),
            range: None,
            origin: None,
            receipt: None,
            ticket: None,
            groups: None,
        };
        let framed = req.encode_framed().expect("fits");
        for cut in [0, 1, 2, framed.len() - 1] {
            let mut r = stream_of(&framed[..cut]).await;
            match read_frame::<ChunkRequest, _>(&mut r).await {
                Err(ReadError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
                other => panic!("a {cut}-byte request read as {other:?}"),
            }
        }
        let mut r = stream_of(&[0, 0, 1]).await;
        assert!(matches!(read_frame::<ResponseHead, _>(&mut r).await, Err(ReadError::Io(_))));
    }

    #[tokio::test]
    async fn oversize_lengths_and_unknown_statuses_are_refused() {
        let mut r = stream_of(&u16::MAX.to_be_bytes()).await;
        match read_frame::<ChunkRequest, _>(&mut r).await {
            Err(ReadError::Frame(FrameError::TooLong { what: "request", len, max })) => {
                assert_eq!((len, max), (usize::from(u16::MAX), MAX_REQUEST_LEN));
            }
            other => panic!("oversize request read as {other:?}"),
        }
        let mut r = stream_of(&5000u16.to_be_bytes()).await;
        assert!(matches!(
            read_frame::<Frame, _>(&mut r).await,
            Err(ReadError::Frame(rendezvous::FrameError::TooLong(5000)))
        ));
        let mut r = stream_of(&[0, 0xff, 0xff, 0xff, 0xff]).await;
        assert!(matches!(
            read_frame::<ResponseHead, _>(&mut r).await,
            Err(ReadError::Frame(FrameError::TooLong { what: "payload", .. }))
        ));
        let mut r = stream_of(&[9]).await;
        assert!(matches!(
            read_frame::<ResponseHead, _>(&mut r).await,
            Err(ReadError::Frame(FrameError::UnknownStatus(9)))
        ));
        let mut r = stream_of(&[3]).await;
        assert!(matches!(
            read_frame::<PeerResponseHead, _>(&mut r).await,
            Err(ReadError::Frame(FrameError::UnknownStatus(3)))
        ));
    }

    /// The first byte gets `first_byte`; a head that stops part-way gets `stall`.
    #[tokio::test]
    async fn silence_times_out_with_the_deadline_that_applies() {
        let (_silent, mut r) = duplex(64);
        let first_byte = Duration::from_millis(50);
        let stall = Duration::from_millis(20);
        assert!(matches!(
            read_frame_within::<ResponseHead, _>(&mut r, first_byte, stall).await,
            Err(ReadError::Timeout(d)) if d == first_byte
        ));
        let (mut w, mut r) = duplex(64);
        w.write_all(&[0, 0]).await.expect("write");
        assert!(matches!(
            read_frame_within::<ResponseHead, _>(&mut r, first_byte, stall).await,
            Err(ReadError::Timeout(d)) if d == stall
        ));
    }
}
