//! Frames of the QUIC chunk protocol (ALPN `fog/1`). The normative description is `docs/protocol.md`.
//!
//! One request per bidirectional stream. The client writes a request frame and finishes its side; the node
//! answers with a response header and, on success, the bytes, then finishes. Every length is bounded here
//! so a reader never allocates more than these limits on a peer's say-so. Decoders work on a growing prefix
//! of a stream ([`Decode`]); the tests hold each frame's encoding as hex test vectors.

use crate::groups::{self, GroupHashes, MAX_GROUPS_PER_CHUNK};
use crate::ChunkHash;

pub const ALPN: &[u8] = b"fog/1";
pub const VERSION: u8 = 1;
/// Largest request body (after its u16 length prefix): every field at its longest.
pub const MAX_REQUEST_LEN: usize = 2
    + 32
    + 8
    + (8 + 4 + 2 + MAX_URL_LEN)
    + (2 + MAX_RECEIPT_LEN)
    + (2 + MAX_TICKET_LEN)
    + (1 + 2 + 32 * MAX_GROUPS_PER_CHUNK);
/// Longest origin URL in a hint.
pub const MAX_URL_LEN: usize = 2048;
/// Longest error message in a response.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Largest payload a response may announce: one whole chunk.
pub const MAX_PAYLOAD_LEN: u32 = crate::manifest::MAX_CHUNK_SIZE;

const FLAG_RANGE: u8 = 1;
const FLAG_ORIGIN: u8 = 2;
const FLAG_RECEIPT: u8 = 4;
const FLAG_TICKET: u8 = 8;
const FLAG_GROUPS: u8 = 16;
/// Marks a push ([`NodeRequest::Push`]); only the client protocol carries it.
const FLAG_PUSH: u8 = 32;
/// Largest group size a request may name (2^24: one group for the largest chunk).
const MAX_GROUP_LOG2: u8 = 24;
/// Longest receipt (JSON) a request may carry.
pub const MAX_RECEIPT_LEN: usize = 2048;
/// Longest credit ticket (JSON of the tracker-signed `credits::Ticket`) a request may carry; the tracker
/// issues none longer.
pub const MAX_TICKET_LEN: usize = 4096;

/// Where the node may pull a chunk it does not have (pull-through), and which bytes of the object it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginHint {
    pub url: String,
    /// Offset of the chunk within the origin object.
    pub offset: u64,
    /// Chunk length.
    pub length: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRequest {
    /// The chunk wanted; all zeros asks for no chunk (a request that only carries a receipt).
    pub hash: ChunkHash,
    /// A byte range within the chunk: (offset, length). `None` asks for the whole chunk.
    pub range: Option<(u32, u32)>,
    pub origin: Option<OriginHint>,
    /// A credit receipt for chunks already verified (JSON of `credits::Receipt`), opaque to the framing.
    pub receipt: Option<Vec<u8>>,
    /// The tracker-signed ticket (JSON of `api::Signed`) that assigned this chunk to the node: a node acts on
    /// an origin hint only with a valid ticket that still has fills left, so a stranger cannot make it
    /// download from the origin for nothing.
    pub ticket: Option<Vec<u8>>,
    /// The chunk's group size and group hashes (from the manifest), so the node can verify and pass on
    /// each group as it arrives from a peer or the origin instead of waiting for the whole chunk. The node
    /// checks them against `hash` before using them.
    pub groups: Option<(u32, GroupHashes)>,
}

impl ChunkRequest {
    /// A request that asks for no chunk and only hands over a receipt.
    pub fn receipt_only(receipt: Vec<u8>) -> Self {
        Self { hash: ChunkHash([0; 32]), range: None, origin: None, receipt: Some(receipt), ticket: None, groups: None }
    }

    pub fn wants_chunk(&self) -> bool {
        self.hash.0 != [0; 32]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// Not cached and no origin hint given.
    NotFound = 1,
    /// The request frame was malformed.
    BadRequest = 2,
    /// The origin failed or timed out while the node pulled the chunk.
    OriginFailed = 3,
    /// The origin's bytes do not hash to the requested chunk: the object changed after ingest.
    OriginMismatch = 4,
    /// The hint names a URL outside the registered origins.
    OriginNotAllowed = 5,
    /// The node is over its limits; try another node.
    Busy = 6,
    /// The node failed internally (for example its disk).
    Internal = 7,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::NotFound,
            2 => Self::BadRequest,
            3 => Self::OriginFailed,
            4 => Self::OriginMismatch,
            5 => Self::OriginNotAllowed,
            6 => Self::Busy,
            7 => Self::Internal,
            _ => return None,
        })
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame ends early: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("unsupported protocol version {0} (this node speaks {VERSION})")]
    Version(u8),
    #[error("unknown flag bits {0:#04x}")]
    Flags(u8),
    #[error("{what} length {len} exceeds the limit {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("origin URL is not UTF-8")]
    Utf8,
    #[error("{0} trailing bytes after the frame")]
    Trailing(usize),
    #[error("unknown status code {0}")]
    UnknownStatus(u8),
    #[error("empty range")]
    EmptyRange,
    #[error("group size {0} is not a power of two from 1 KiB to 16 MiB")]
    GroupSize(u32),
}

/// A frame decoded from the front of a byte stream, so that a reader takes exactly the bytes the frame
/// needs and never a byte of what follows it (a payload, or the next frame): it asks the decoder, reads as
/// many more bytes as the decoder says the next field needs, and asks again. Every length is checked
/// before more bytes are asked for, so a reader never allocates past a frame's bound on a peer's say-so.
pub trait Decode: Sized {
    type Error: std::error::Error + Send + Sync + 'static;

    /// The frame at the start of `buf` and how many bytes it took, or how many more bytes (at least one)
    /// it needs. An error means no more bytes could make a frame of `buf`.
    fn decode_prefix(buf: &[u8]) -> Result<Decoded<Self>, Self::Error>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    Done { frame: T, len: usize },
    NeedMore(usize),
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated { needed: n - self.0.len() });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        self.array().map(u64::from_be_bytes)
    }
}

impl ChunkRequest {
    /// The request body, without its u16 length prefix (see [`ChunkRequest::encode_framed`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(VERSION);
        let flags = if self.range.is_some() { FLAG_RANGE } else { 0 }
            | if self.origin.is_some() { FLAG_ORIGIN } else { 0 }
            | if self.receipt.is_some() { FLAG_RECEIPT } else { 0 }
            | if self.ticket.is_some() { FLAG_TICKET } else { 0 }
            | if self.groups.is_some() { FLAG_GROUPS } else { 0 };
        out.push(flags);
        out.extend_from_slice(self.hash.as_bytes());
        if let Some((off, len)) = self.range {
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
        }
        if let Some(o) = &self.origin {
            out.extend_from_slice(&o.offset.to_be_bytes());
            out.extend_from_slice(&o.length.to_be_bytes());
            out.extend_from_slice(&(o.url.len() as u16).to_be_bytes());
            out.extend_from_slice(o.url.as_bytes());
        }
        for field in [&self.receipt, &self.ticket].into_iter().flatten() {
            out.extend_from_slice(&(field.len() as u16).to_be_bytes());
            out.extend_from_slice(field);
        }
        if let Some((size, hashes)) = &self.groups {
            out.push(size.trailing_zeros() as u8);
            out.extend_from_slice(&(hashes.0.len() as u16).to_be_bytes());
            out.extend_from_slice(&hashes.to_bytes());
        }
        out
    }

    /// The request as it goes on the wire: u16 BE body length, then the body. Fails if the URL or the receipt
    /// is too long, or both together make a body longer than a node reads ([`MAX_REQUEST_LEN`]).
    pub fn encode_framed(&self) -> Result<Vec<u8>, FrameError> {
        if let Some(o) = &self.origin {
            within("origin URL", o.url.len(), MAX_URL_LEN)?;
        }
        if let Some(r) = &self.receipt {
            within("receipt", r.len(), MAX_RECEIPT_LEN)?;
        }
        if let Some(t) = &self.ticket {
            within("ticket", t.len(), MAX_TICKET_LEN)?;
        }
        if let Some((size, hashes)) = &self.groups {
            if groups::check_size(*size).is_err() || size.trailing_zeros() > u32::from(MAX_GROUP_LOG2) {
                return Err(FrameError::GroupSize(*size));
            }
            within("group hashes", hashes.0.len(), MAX_GROUPS_PER_CHUNK)?;
        }
        let body = self.encode();
        within("request", body.len(), MAX_REQUEST_LEN)?;
        let mut out = Vec::with_capacity(body.len() + 2);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Checks a length prefix before the body is read.
    fn check_len(len: u16) -> Result<usize, FrameError> {
        within("request", usize::from(len), MAX_REQUEST_LEN)
    }

    /// The request body (after its length prefix), which must be exactly one request.
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader(body);
        read_version(&mut r)?;
        let flags = r.u8()?;
        if flags & !(FLAG_RANGE | FLAG_ORIGIN | FLAG_RECEIPT | FLAG_TICKET | FLAG_GROUPS) != 0 {
            return Err(FrameError::Flags(flags));
        }
        let hash = ChunkHash(r.array()?);
        let range = if flags & FLAG_RANGE != 0 {
            let (off, len) = (r.u32()?, r.u32()?);
            if len == 0 {
                return Err(FrameError::EmptyRange);
            }
            Some((off, len))
        } else {
            None
        };
        let origin = if flags & FLAG_ORIGIN != 0 {
            let offset = r.u64()?;
            let length = r.u32()?;
            within("hinted chunk", length as usize, MAX_PAYLOAD_LEN as usize)?;
            let url_len = usize::from(r.u16()?);
            within("origin URL", url_len, MAX_URL_LEN)?;
            let url = std::str::from_utf8(r.take(url_len)?).map_err(|_| FrameError::Utf8)?.to_owned();
            Some(OriginHint { url, offset, length })
        } else {
            None
        };
        let mut blob = |flag: u8, what: &'static str, max: usize| -> Result<Option<Vec<u8>>, FrameError> {
            if flags & flag == 0 {
                return Ok(None);
            }
            let len = within(what, usize::from(r.u16()?), max)?;
            Ok(Some(r.take(len)?.to_vec()))
        };
        let receipt = blob(FLAG_RECEIPT, "receipt", MAX_RECEIPT_LEN)?;
        let ticket = blob(FLAG_TICKET, "ticket", MAX_TICKET_LEN)?;
        let groups = if flags & FLAG_GROUPS != 0 {
            let log2 = r.u8()?;
            if !(10..=MAX_GROUP_LOG2).contains(&log2) {
                return Err(FrameError::GroupSize(1u32.checked_shl(u32::from(log2)).unwrap_or(0)));
            }
            let count = usize::from(r.u16()?);
            within("group hashes", count, MAX_GROUPS_PER_CHUNK)?;
            let hashes = GroupHashes::from_bytes(r.take(32 * count)?).expect("a multiple of 32 bytes");
            Some((1 << log2, hashes))
        } else {
            None
        };
        if !r.0.is_empty() {
            return Err(FrameError::Trailing(r.0.len()));
        }
        Ok(Self { hash, range, origin, receipt, ticket, groups })
    }
}

/// Decodes a frame sent as a big-endian u16 body length, then the body: `check_len` bounds the length
/// before any of the body is asked for.
pub fn decode_length_prefixed<T, E>(
    buf: &[u8],
    check_len: impl FnOnce(u16) -> Result<usize, E>,
    decode_body: impl FnOnce(&[u8]) -> Result<T, E>,
) -> Result<Decoded<T>, E> {
    let Some(prefix) = buf.first_chunk::<2>() else { return Ok(Decoded::NeedMore(2 - buf.len())) };
    let len = 2 + check_len(u16::from_be_bytes(*prefix))?;
    match buf.get(2..len) {
        Some(body) => Ok(Decoded::Done { frame: decode_body(body)?, len }),
        None => Ok(Decoded::NeedMore(len - buf.len())),
    }
}

impl Decode for ChunkRequest {
    type Error = FrameError;

    /// The framed request ([`ChunkRequest::encode_framed`]): the length prefix, then the body; a body that
    /// is shorter than its fields say is an error, not a reason to read on.
    fn decode_prefix(buf: &[u8]) -> Result<Decoded<Self>, FrameError> {
        decode_length_prefixed(buf, Self::check_len, Self::decode)
    }
}

/// What a stream of the client protocol opens with: a chunk request, or a push — a chunk request's fields
/// with [`FLAG_PUSH`] set. A push asks the node to get the chunk (a fill licensed by its origin hint and a
/// ticket naming the node, as for any miss), keep it, and answer with a [`ResponseHead`] only: `Ok { len }`
/// once it holds the chunk, no payload, so the node's uplink is not spent sending it back. The tracker
/// pushes live segments to the nodes its viewers will ask. Peers' fill streams carry chunk requests only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRequest {
    Chunk(ChunkRequest),
    Push(ChunkRequest),
}

impl NodeRequest {
    /// The request as it goes on the wire (see [`ChunkRequest::encode_framed`]).
    pub fn encode_framed(&self) -> Result<Vec<u8>, FrameError> {
        match self {
            Self::Chunk(req) => req.encode_framed(),
            Self::Push(req) => {
                let mut framed = req.encode_framed()?;
                // Length prefix (2), version (1), then the flags.
                framed[3] |= FLAG_PUSH;
                Ok(framed)
            }
        }
    }

    /// The request body (after its length prefix), which must be exactly one request.
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        if body.get(1).is_none_or(|flags| flags & FLAG_PUSH == 0) {
            return ChunkRequest::decode(body).map(Self::Chunk);
        }
        let mut plain = body.to_vec();
        plain[1] &= !FLAG_PUSH;
        ChunkRequest::decode(&plain).map(Self::Push)
    }
}

impl Decode for NodeRequest {
    type Error = FrameError;

    fn decode_prefix(buf: &[u8]) -> Result<Decoded<Self>, FrameError> {
        decode_length_prefixed(buf, ChunkRequest::check_len, Self::decode)
    }
}

/// The fixed part of a response: status, then either the payload length (Ok) or an error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseHead {
    Ok { len: u32 },
    Error { status: Status, message: String },
}

impl ResponseHead {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Ok { len } => {
                let mut out = vec![Status::Ok as u8];
                out.extend_from_slice(&len.to_be_bytes());
                out
            }
            Self::Error { status, message } => {
                // Truncate on a char boundary so the message stays valid UTF-8.
                let mut end = message.len().min(MAX_MESSAGE_LEN);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                let mut out = vec![*status as u8];
                out.extend_from_slice(&(end as u16).to_be_bytes());
                out.extend_from_slice(&message.as_bytes()[..end]);
                out
            }
        }
    }
}

impl Decode for ResponseHead {
    type Error = FrameError;

    /// The payload that follows an Ok head is not part of it. A message that is not UTF-8 is read lossily:
    /// it is for humans, and the status alone decides what the client does next.
    fn decode_prefix(buf: &[u8]) -> Result<Decoded<Self>, FrameError> {
        let mut r = Reader(buf);
        let head = (|| {
            let byte = r.u8()?;
            let status = Status::from_u8(byte).ok_or(FrameError::UnknownStatus(byte))?;
            if status == Status::Ok {
                return Ok(Self::Ok { len: check_payload_len(r.u32()?)? });
            }
            let len = within("message", usize::from(r.u16()?), MAX_MESSAGE_LEN)?;
            Ok(Self::Error { status, message: String::from_utf8_lossy(r.take(len)?).into_owned() })
        })();
        progress(head, buf.len() - r.0.len())
    }
}

fn check_payload_len(len: u32) -> Result<u32, FrameError> {
    within("payload", len as usize, MAX_PAYLOAD_LEN as usize)?;
    Ok(len)
}

/// `len` of `what`, if it is at most `max`.
fn within(what: &'static str, len: usize, max: usize) -> Result<usize, FrameError> {
    if len > max {
        return Err(FrameError::TooLong { what, len, max });
    }
    Ok(len)
}

/// Reads the version byte that opens a body; this side speaks only [`VERSION`].
fn read_version(r: &mut Reader<'_>) -> Result<(), FrameError> {
    match r.u8()? {
        VERSION => Ok(()),
        other => Err(FrameError::Version(other)),
    }
}

/// A head decoded from the bytes so far: done, or how many more bytes its next field needs (a head's fields
/// are read in order, so a [`FrameError::Truncated`] from [`Reader`] is exactly that).
fn progress<T>(head: Result<T, FrameError>, len: usize) -> Result<Decoded<T>, FrameError> {
    match head {
        Ok(frame) => Ok(Decoded::Done { frame, len }),
        Err(FrameError::Truncated { needed }) => Ok(Decoded::NeedMore(needed)),
        Err(e) => Err(e),
    }
}

/// The libp2p stream protocol nodes fill misses from each other with (`docs/protocol.md`, "Peer fill").
///
/// The asking node writes a request frame exactly as on the client protocol ([`ChunkRequest::encode_framed`];
/// only the hash and the origin hint count); the peer answers with a [`PeerResponseHead`] (one [`PeerStatus`]
/// byte and, for [`PeerStatus::Ok`], a big-endian u32 length of at most [`MAX_PAYLOAD_LEN`]) and the chunk. Without an origin
/// hint a peer serves only what it holds. With one (sent only to the chunk's *home*, the peer rendezvous
/// ranks first) a peer that lacks the chunk fills it through — from its own peers' stores or the origin,
/// never passing the hint on — stores and serves it: tiered caching, so a neighbourhood fetches a chunk
/// from the origin once.
pub const PEER_PROTOCOL: &str = "/fog/chunk/2";

/// The status byte of a peer-fill answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PeerStatus {
    Ok = 0,
    NotFound = 1,
    Busy = 2,
}

impl PeerStatus {
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Ok),
            1 => Some(Self::NotFound),
            2 => Some(Self::Busy),
            _ => None,
        }
    }
}

/// A peer's answer to a fill request, before the chunk: [`PeerStatus::Ok`] and the chunk's length (the
/// chunk follows), or a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerResponseHead {
    Ok { len: u32 },
    NotFound,
    Busy,
}

impl PeerResponseHead {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Ok { len } => {
                let mut out = vec![PeerStatus::Ok as u8];
                out.extend_from_slice(&len.to_be_bytes());
                out
            }
            Self::NotFound => vec![PeerStatus::NotFound as u8],
            Self::Busy => vec![PeerStatus::Busy as u8],
        }
    }
}

impl Decode for PeerResponseHead {
    type Error = FrameError;

    fn decode_prefix(buf: &[u8]) -> Result<Decoded<Self>, FrameError> {
        let mut r = Reader(buf);
        let head = (|| {
            let byte = r.u8()?;
            Ok(match PeerStatus::from_u8(byte).ok_or(FrameError::UnknownStatus(byte))? {
                PeerStatus::Ok => Self::Ok { len: check_payload_len(r.u32()?)? },
                PeerStatus::NotFound => Self::NotFound,
                PeerStatus::Busy => Self::Busy,
            })
        })();
        progress(head, buf.len() - r.0.len())
    }
}

/// The ALPN protocol of peer fill on a node's own QUIC endpoint (`docs/protocol.md`, "Peer fill"): the same
/// request and answer as [`PEER_PROTOCOL`], after a [`PeerHello`] that proves the asker is a registered
/// node. It carries the uploading side's bytes under the node's congestion controller (LEDBAT++ at
/// `--upload-priority low`), which libp2p's transports do not let a node choose.
pub const PEER_ALPN: &[u8] = b"fog-peer/1";
/// The TLS exporter label (RFC 8446, section 7.5) of the value a [`PeerHello`] signs: it differs for every
/// connection, so a hello cannot be replayed on another.
pub const PEER_EXPORTER_LABEL: &[u8] = b"EXPORTER-fog-peer/1";
/// Bytes of exported keying material a [`PeerHello`] signs.
pub const PEER_EXPORTER_LEN: usize = 32;
/// The application error code a peer closes a [`PEER_ALPN`] connection with when the hello does not prove a
/// registered node (or the peer bans it); the reason says why.
pub const PEER_REFUSED: u32 = 1;
/// Longest membership (JSON of the tracker-signed `api::Signed` [`crate::api::Membership`]) a hello may
/// carry; the tracker's are about 400 bytes.
pub const MAX_MEMBERSHIP_LEN: usize = 1024;
/// Largest [`PeerHello`] body after its u16 length prefix.
pub const MAX_PEER_HELLO_LEN: usize = 1 + 32 + 64 + 2 + MAX_MEMBERSHIP_LEN;
/// What the asker's signature covers before the exported value, so it can mean nothing else.
const PEER_HELLO_CONTEXT: &[u8] = b"fog-peer-hello-v1\0";

/// The first stream of a [`PEER_ALPN`] connection, asker → peer: the asker's node key, its signature over
/// the connection's exported keying material ([`PEER_EXPORTER_LABEL`]), and its membership, signed by the
/// tracker. The peer answers by finishing the stream (welcome) or closes the connection (refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHello {
    pub node: crate::NodeId,
    pub signature: [u8; 64],
    /// JSON of the tracker-signed membership, opaque to the framing.
    pub membership: Vec<u8>,
}

/// Why a [`PeerHello`] does not prove a registered node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerHelloError {
    #[error("the hello's signature does not verify under its node key")]
    BadSignature,
    #[error("the hello's membership is not a signed message")]
    MalformedMembership,
    #[error("{0}")]
    Membership(&'static str),
}

impl PeerHello {
    /// `key`'s hello on the connection whose exported keying material is `exporter`.
    pub fn sign(key: &ed25519_dalek::SigningKey, exporter: &[u8], membership: &crate::api::Signed) -> Self {
        use ed25519_dalek::Signer;
        let signature = key.sign(&Self::signed_bytes(exporter)).to_bytes();
        let membership = serde_json::to_vec(membership).expect("signed messages serialise");
        Self { node: key.verifying_key().into(), signature, membership }
    }

    fn signed_bytes(exporter: &[u8]) -> Vec<u8> {
        [PEER_HELLO_CONTEXT, exporter].concat()
    }

    /// Checks that the hello was signed on this connection (`exporter`) by a node the tracker
    /// (`tracker_key`) registered and whose membership is unexpired at `now_ms`; gives that node.
    pub fn verify(
        &self,
        exporter: &[u8],
        tracker_key: crate::NodeId,
        now_ms: u64,
    ) -> Result<crate::NodeId, PeerHelloError> {
        use ed25519_dalek::Verifier;
        let key = self.node.verifying_key().map_err(|_| PeerHelloError::BadSignature)?;
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature);
        key.verify(&Self::signed_bytes(exporter), &signature).map_err(|_| PeerHelloError::BadSignature)?;
        let membership: crate::api::Signed =
            serde_json::from_slice(&self.membership).map_err(|_| PeerHelloError::MalformedMembership)?;
        crate::api::Membership::verify(&membership, tracker_key, self.node, now_ms)
            .map_err(PeerHelloError::Membership)?;
        Ok(self.node)
    }

    /// u16 BE body length, then the body: version, node key, signature, u16 BE membership length and the
    /// membership. Fails if the membership is longer than [`MAX_MEMBERSHIP_LEN`].
    pub fn encode_framed(&self) -> Result<Vec<u8>, FrameError> {
        let len = within("membership", self.membership.len(), MAX_MEMBERSHIP_LEN)?;
        let body_len = 1 + 32 + 64 + 2 + len;
        let mut out = Vec::with_capacity(2 + body_len);
        out.extend_from_slice(&(body_len as u16).to_be_bytes());
        out.push(VERSION);
        out.extend_from_slice(self.node.as_bytes());
        out.extend_from_slice(&self.signature);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(&self.membership);
        Ok(out)
    }

    fn check_len(len: u16) -> Result<usize, FrameError> {
        within("peer hello", usize::from(len), MAX_PEER_HELLO_LEN)
    }

    /// The body (after its length prefix), which must be exactly one hello.
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader(body);
        read_version(&mut r)?;
        let node = crate::NodeId(r.array()?);
        let signature = r.array()?;
        let len = within("membership", usize::from(r.u16()?), MAX_MEMBERSHIP_LEN)?;
        let membership = r.take(len)?.to_vec();
        if !r.0.is_empty() {
            return Err(FrameError::Trailing(r.0.len()));
        }
        Ok(Self { node, signature, membership })
    }
}

impl Decode for PeerHello {
    type Error = FrameError;

    fn decode_prefix(buf: &[u8]) -> Result<Decoded<Self>, FrameError> {
        decode_length_prefixed(buf, Self::check_len, Self::decode)
    }
}

/// `frame` encodes (as `encoded`) to `hex` (spaces ignored) and decodes back from it, taking exactly its bytes
/// even with more behind them; every proper prefix asks for at least one more byte and never for more than
/// the rest of the frame, so a reader never reads past it.
#[cfg(test)]
pub(crate) fn assert_vector<T>(frame: &T, encoded: &[u8], hex: &str)
where
    T: Decode + PartialEq + std::fmt::Debug,
{
    let expected = hex::decode(hex.replace([' ', '\n'], "")).expect("test vector is hex");
    assert_eq!(hex::encode(encoded), hex::encode(&expected), "{frame:?} does not encode to its vector");
    let mut followed = expected.clone();
    followed.extend_from_slice(b"next");
    match T::decode_prefix(&followed) {
        Ok(Decoded::Done { frame: back, len }) => {
            assert!(back == *frame && len == expected.len(), "read back {back:?}")
        }
        other => panic!("{frame:?} does not decode from its vector: {other:?}"),
    }
    for cut in 0..expected.len() {
        match T::decode_prefix(&expected[..cut]) {
            Ok(Decoded::NeedMore(n)) => assert!(n >= 1 && cut + n <= expected.len(), "{cut} bytes in, asked for {n}"),
            other => panic!("a {cut}-byte prefix of {frame:?} decoded as {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        let reqs = [
            ChunkRequest {
                hash: ChunkHash::of(b"a"),
                range: None,
                origin: None,
                receipt: None,
                ticket: None,
                groups: None,
            },
            ChunkRequest::receipt_only(b"{\"receipt\": 1}".to_vec()),
            ChunkRequest {
                hash: ChunkHash::of(b"b"),
                range: Some((10, 20)),
                origin: Some(OriginHint { url: "http://o/x".into(), offset: 1 << 40, length: 1 << 20 }),
                receipt: None,
                ticket: Some(b"{\"ticket\": 1}".to_vec()),
                groups: None,
            },
            ChunkRequest {
                hash: ChunkHash::of(b"c"),
                range: None,
                origin: None,
                receipt: None,
                ticket: None,
                groups: Some((65_536, GroupHashes(vec![[1; 32], [2; 32]]))),
            },
        ];
        for r in reqs {
            let framed = r.encode_framed().expect("encode");
            let len = u16::from_be_bytes([framed[0], framed[1]]);
            assert_eq!(usize::from(len), framed.len() - 2);
            assert_eq!(ChunkRequest::decode(&framed[2..]).expect("decode"), r);
        }
    }

    #[test]
    fn malformed_requests_are_rejected() {
        let good = ChunkRequest {
            hash: ChunkHash::of(b"a"),
            range: None,
            origin: Some(OriginHint { url: "http://o/x".into(), offset: 0, length: 5 }),
            receipt: None,
            ticket: Some(b"t".to_vec()),
            groups: None,
        }
        .encode();
        for cut in 0..good.len() {
            assert!(ChunkRequest::decode(&good[..cut]).is_err(), "prefix of {cut} bytes accepted");
        }
        let mut bad_version = good.clone();
        bad_version[0] = 9;
        assert_eq!(ChunkRequest::decode(&bad_version), Err(FrameError::Version(9)));
        let mut bad_flags = good.clone();
        bad_flags[1] = 0x80;
        assert!(matches!(ChunkRequest::decode(&bad_flags), Err(FrameError::Flags(_))));
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(ChunkRequest::decode(&trailing), Err(FrameError::Trailing(1)));
        assert!(ChunkRequest::check_len(u16::MAX).is_err());
        let long = ChunkRequest {
            hash: ChunkHash::of(b"a"),
            range: None,
            origin: Some(OriginHint { url: "x".repeat(MAX_URL_LEN + 1), offset: 0, length: 1 }),
            receipt: None,
            ticket: None,
            groups: None,
        };
        assert!(long.encode_framed().is_err());
        let long_ticket = ChunkRequest { ticket: Some(vec![b't'; MAX_TICKET_LEN + 1]), ..long.clone() };
        assert!(long_ticket.encode_framed().is_err());
        let mut forged = ChunkRequest { ticket: Some(vec![b't'; MAX_TICKET_LEN]), origin: None, ..long }.encode();
        let at = forged.len() - MAX_TICKET_LEN - 2;
        forged[at..at + 2].copy_from_slice(&(MAX_TICKET_LEN as u16 + 1).to_be_bytes());
        forged.push(b't');
        assert!(matches!(ChunkRequest::decode(&forged), Err(FrameError::TooLong { what: "ticket", .. })));
        // Group hashes: a size that is no group size, or more hashes than a chunk can have.
        let grouped = |size, count| ChunkRequest {
            hash: ChunkHash::of(b"a"),
            range: None,
            origin: None,
            receipt: None,
            ticket: None,
            groups: Some((size, GroupHashes(vec![[0; 32]; count]))),
        };
        assert_eq!(grouped(3000, 2).encode_framed(), Err(FrameError::GroupSize(3000)));
        assert!(grouped(1024, MAX_GROUPS_PER_CHUNK + 1).encode_framed().is_err());
        let mut tiny = grouped(1024, 2).encode();
        tiny[2 + 32] = 9;
        assert_eq!(ChunkRequest::decode(&tiny), Err(FrameError::GroupSize(512)));
        let mut many = grouped(1024, 2).encode();
        many[2 + 32 + 1..2 + 32 + 3].copy_from_slice(&(MAX_GROUPS_PER_CHUNK as u16 + 1).to_be_bytes());
        assert!(matches!(ChunkRequest::decode(&many), Err(FrameError::TooLong { what: "group hashes", .. })));
    }

    /// Found by `fuzz/fuzz_targets/request_frame.rs`: a URL and a receipt each within their limits made a
    /// frame whose length the receiving node refused. Every field at its longest now fits the frame limit.
    #[test]
    fn encoder_never_frames_what_the_receiver_refuses() {
        let longest = ChunkRequest {
            hash: ChunkHash::of(b"a"),
            range: Some((0, 1)),
            origin: Some(OriginHint { url: "x".repeat(MAX_URL_LEN), offset: 0, length: 1 }),
            receipt: Some(vec![b'r'; MAX_RECEIPT_LEN]),
            ticket: Some(vec![b't'; MAX_TICKET_LEN]),
            groups: Some((1 << MAX_GROUP_LOG2, GroupHashes(vec![[0; 32]; MAX_GROUPS_PER_CHUNK]))),
        };
        assert_eq!(longest.encode().len(), MAX_REQUEST_LEN);
        let framed = longest.encode_framed().expect("fits");
        assert_eq!(ChunkRequest::check_len(u16::from_be_bytes([framed[0], framed[1]])), Ok(framed.len() - 2));
    }

    #[test]
    fn error_messages_are_cut_to_the_limit_on_a_char_boundary() {
        let err = ResponseHead::Error { status: Status::NotFound, message: "é".repeat(600) }.encode();
        let Ok(Decoded::Done { frame: ResponseHead::Error { status, message }, len }) =
            ResponseHead::decode_prefix(&err)
        else {
            panic!("the node's error head does not decode")
        };
        assert_eq!((status, len), (Status::NotFound, err.len()));
        assert_eq!(message, "é".repeat(MAX_MESSAGE_LEN / 2));
    }

    const HASH_11: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const HASH_AB: &str = "abababababababababababababababababababababababababababababababab";

    /// The encodings `docs/protocol.md` specifies, byte for byte: each value encodes to its hex and decodes
    /// back from it, a byte at a time.
    #[test]
    fn hex_vectors() {
        let minimal = ChunkRequest {
            hash: ChunkHash([0x11; 32]),
            range: None,
            origin: None,
            receipt: None,
            ticket: None,
            groups: None,
        };
        assert_vector(&minimal, &minimal.encode_framed().expect("fits"), &format!("0022 01 00 {HASH_11}"));
        let full = ChunkRequest {
            hash: ChunkHash([0xab; 32]),
            range: Some((16, 4096)),
            origin: Some(OriginHint { url: "http://o/x".into(), offset: 1 << 40, length: 1 << 20 }),
            receipt: Some(b"r1".to_vec()),
            ticket: Some(b"t".to_vec()),
            groups: None,
        };
        let full_hex = format!(
            "0049 01 0f {HASH_AB} 00000010 00001000 0000010000000000 00100000 000a 687474703a2f2f6f2f78 0002 7231 \
             0001 74"
        );
        assert_vector(&full, &full.encode_framed().expect("fits"), &full_hex);
        let grouped =
            ChunkRequest { groups: Some((1024, GroupHashes(vec![[0x11; 32], [0xab; 32]]))), ..minimal.clone() };
        assert_vector(
            &grouped,
            &grouped.encode_framed().expect("fits"),
            &format!("0065 01 10 {HASH_11} 0a 0002 {HASH_11} {HASH_AB}"),
        );
        // A push: the same fields, flag 0x20; a chunk request decoder refuses it.
        let push = NodeRequest::Push(ChunkRequest { ticket: Some(b"t".to_vec()), ..minimal.clone() });
        let push_hex = format!("0025 01 28 {HASH_11} 0001 74");
        assert_vector(&push, &push.encode_framed().expect("fits"), &push_hex);
        let plain = NodeRequest::Chunk(minimal.clone());
        assert_vector(&plain, &plain.encode_framed().expect("fits"), &format!("0022 01 00 {HASH_11}"));
        let push_bytes = ::hex::decode(push_hex.replace(' ', "")).expect("hex");
        assert_eq!(ChunkRequest::decode_prefix(&push_bytes), Err(FrameError::Flags(0x28)));
        let receipt = ChunkRequest::receipt_only(b"{}".to_vec());
        assert_vector(
            &receipt,
            &receipt.encode_framed().expect("fits"),
            &format!("0026 01 04 {} 0002 7b7d", "00".repeat(32)),
        );

        for (head, hex) in [
            (ResponseHead::Ok { len: 1 << 20 }, "00 00100000"),
            (ResponseHead::Ok { len: 0 }, "00 00000000"),
            (ResponseHead::Error { status: Status::NotFound, message: "no".into() }, "01 0002 6e6f"),
            (ResponseHead::Error { status: Status::Busy, message: String::new() }, "06 0000"),
        ] {
            assert_vector(&head, &head.encode(), hex);
        }
        for (head, hex) in [
            (PeerResponseHead::Ok { len: 5 }, "00 00000005"),
            (PeerResponseHead::NotFound, "01"),
            (PeerResponseHead::Busy, "02"),
        ] {
            assert_vector(&head, &head.encode(), hex);
        }
    }

    /// Bad heads and prefixes are refused as soon as the offending field is in, before any byte more is
    /// asked for.
    #[test]
    fn bad_heads_are_refused_before_reading_on() {
        let bytes = |hex: &str| ::hex::decode(hex).expect("hex");
        assert_eq!(ResponseHead::decode_prefix(&bytes("08")), Err(FrameError::UnknownStatus(8)));
        assert!(matches!(
            ResponseHead::decode_prefix(&bytes("0001000001")),
            Err(FrameError::TooLong { what: "payload", .. })
        ));
        assert!(matches!(
            ResponseHead::decode_prefix(&bytes("010401")),
            Err(FrameError::TooLong { what: "message", .. })
        ));
        assert_eq!(PeerResponseHead::decode_prefix(&bytes("03")), Err(FrameError::UnknownStatus(3)));
        assert!(matches!(
            PeerResponseHead::decode_prefix(&bytes("0001000001")),
            Err(FrameError::TooLong { what: "payload", .. })
        ));
        assert!(matches!(
            ChunkRequest::decode_prefix(&bytes("4040")),
            Err(FrameError::TooLong { what: "request", .. })
        ));
        assert_eq!(ChunkRequest::decode_prefix(&bytes("403f")), Ok(Decoded::NeedMore(MAX_REQUEST_LEN)));
        // A whole body that is shorter than its fields say is malformed, not waiting for more.
        assert_eq!(ChunkRequest::decode_prefix(&bytes("000101")), Err(FrameError::Truncated { needed: 1 }));
    }

    /// A hello proves a registered node on this connection only: its encoding is byte for byte as
    /// `docs/protocol.md` gives it, and it verifies only with the connection's exporter, under the tracker
    /// that signed an unexpired membership for the same node.
    #[test]
    fn peer_hellos_encode_bounded_and_prove_a_registered_node_on_one_connection() {
        use crate::api::{Membership, Signed, KIND_MEMBERSHIP};
        let hello = PeerHello { node: crate::NodeId([0x11; 32]), signature: [0xab; 64], membership: b"{}".to_vec() };
        let hex = format!("0065 01 {HASH_11} {HASH_AB}{HASH_AB} 0002 7b7d");
        assert_vector(&hello, &hello.encode_framed().expect("fits"), &hex);
        let long = PeerHello { membership: vec![b'm'; MAX_MEMBERSHIP_LEN + 1], ..hello.clone() };
        assert!(matches!(long.encode_framed(), Err(FrameError::TooLong { what: "membership", .. })));
        let longest = PeerHello { membership: vec![b'm'; MAX_MEMBERSHIP_LEN], ..hello.clone() };
        assert_eq!(longest.encode_framed().expect("fits").len(), 2 + MAX_PEER_HELLO_LEN);
        let too_long = ((MAX_PEER_HELLO_LEN + 1) as u16).to_be_bytes();
        assert!(matches!(PeerHello::decode_prefix(&too_long), Err(FrameError::TooLong { what: "peer hello", .. })));
        let mut forged = longest.encode_framed().expect("fits");
        forged[2 + 1 + 32 + 64..2 + 1 + 32 + 64 + 2].copy_from_slice(&(MAX_MEMBERSHIP_LEN as u16 + 1).to_be_bytes());
        assert!(matches!(PeerHello::decode(&forged[2..]), Err(FrameError::TooLong { what: "membership", .. })));

        let tracker = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let tracker_id = crate::NodeId::from(tracker.verifying_key());
        let node = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
        let node_id = crate::NodeId::from(node.verifying_key());
        let member = |id, expiry_ms| {
            Signed::sign(&tracker, KIND_MEMBERSHIP, &Membership { node_id: id, issued_ms: 0, expiry_ms })
        };
        let exporter = [7u8; PEER_EXPORTER_LEN];
        let hello = PeerHello::sign(&node, &exporter, &member(node_id, 2_000));
        let framed = hello.encode_framed().expect("a real membership fits");
        assert_eq!(PeerHello::decode(&framed[2..]).expect("decodes"), hello);
        assert_eq!(hello.verify(&exporter, tracker_id, 1_000), Ok(node_id));
        assert_eq!(hello.verify(&[8u8; PEER_EXPORTER_LEN], tracker_id, 1_000), Err(PeerHelloError::BadSignature));
        assert!(matches!(hello.verify(&exporter, node_id, 1_000), Err(PeerHelloError::Membership(_))));
        assert!(matches!(hello.verify(&exporter, tracker_id, 2_000), Err(PeerHelloError::Membership(_))));
        let someone_elses = PeerHello::sign(&node, &exporter, &member(tracker_id, 2_000));
        assert!(matches!(someone_elses.verify(&exporter, tracker_id, 1_000), Err(PeerHelloError::Membership(_))));
        let self_signed = PeerHello::sign(
            &node,
            &exporter,
            &Signed::sign(&node, KIND_MEMBERSHIP, &Membership { node_id, issued_ms: 0, expiry_ms: 2_000 }),
        );
        assert!(matches!(self_signed.verify(&exporter, tracker_id, 1_000), Err(PeerHelloError::Membership(_))));
        let garbled = PeerHello { membership: b"not json".to_vec(), ..hello.clone() };
        assert_eq!(garbled.verify(&exporter, tracker_id, 1_000), Err(PeerHelloError::MalformedMembership));
        let impostor = PeerHello { node: tracker_id, ..hello };
        assert_eq!(impostor.verify(&exporter, tracker_id, 1_000), Err(PeerHelloError::BadSignature));
    }
}
