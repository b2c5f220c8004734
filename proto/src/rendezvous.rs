//! The rendezvous protocol (ALPN `fog-rdv/1`), spoken on a publicly reachable node's QUIC endpoint so that
//! clients can reach nodes behind NAT. The normative description is in `docs/protocol.md`.
//!
//! A node the tracker cannot dial *attaches*: from its own chunk-serving UDP socket it opens a connection to
//! a public node (the rendezvous) and proves its identity with a signed [`Attach`], and its registration with
//! the tracker's signed [`crate::api::Membership`]. That connection keeps the
//! node's NAT mapping open and tells the node its external address. A client that wants the node asks the
//! rendezvous to [`Frame::Punch`]: the rendezvous tells the node the client's address, the node sends QUIC
//! packets towards it (opening its NAT for the client), and only then does the rendezvous answer with the
//! node's external address, which the client dials with the node's key pinned as usual.
//!
//! Frames are JSON preceded by a big-endian u16 length, at most [`MAX_FRAME_LEN`] bytes; one exchange per
//! bidirectional stream.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::api::Signed;
use crate::wire::{decode_length_prefixed, Decode, Decoded};
use crate::NodeId;

pub const ALPN: &[u8] = b"fog-rdv/1";
/// Largest frame body after the length prefix.
pub const MAX_FRAME_LEN: usize = 4096;
/// Signed-message kind of [`Attach`].
pub const KIND_ATTACH: &str = "attach";

/// A node's request to be reachable through `rendezvous`, signed with the node's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    /// The rendezvous node this attachment is for, so a signed attach cannot be replayed to another.
    pub rendezvous: NodeId,
    pub timestamp_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Frame {
    /// Node → rendezvous: `Signed` [`Attach`], and the tracker-signed [`crate::api::Membership`] that shows
    /// the node is registered (a rendezvous attaches no one else).
    Attach {
        attach: Signed,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        membership: Option<Signed>,
    },
    /// Rendezvous → node: accepted; `observed` is the node's address as the rendezvous sees it.
    Attached { observed: SocketAddr },
    /// Client → rendezvous: open a path to `target`.
    Punch { target: NodeId },
    /// Rendezvous → attached node: send packets to `client` now.
    PunchRequest { client: SocketAddr },
    /// Attached node → rendezvous: packets sent.
    PunchSent,
    /// Rendezvous → client: dial `target` at `addr`.
    PunchReady { addr: SocketAddr },
    /// Any refusal, with a reason for logs.
    Error { message: String },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("rendezvous frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLong(usize),
    #[error("malformed rendezvous frame: {0}")]
    Malformed(#[source] serde_json::Error),
}

impl Frame {
    /// Length prefix and JSON body.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("frames serialise");
        let mut out = Vec::with_capacity(2 + body.len());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Checks a length prefix before the body is read.
    fn check_len(len: u16) -> Result<usize, FrameError> {
        let len = usize::from(len);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLong(len));
        }
        Ok(len)
    }

    /// The JSON body (after its length prefix), which must be exactly one frame.
    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        serde_json::from_slice(body).map_err(FrameError::Malformed)
    }
}

impl Decode for Frame {
    type Error = FrameError;

    /// The framed frame ([`Frame::encode`]): the length prefix, then the body.
    fn decode_prefix(buf: &[u8]) -> Result<Decoded<Self>, FrameError> {
        decode_length_prefixed(buf, Self::check_len, Self::decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::assert_vector;

    /// Each frame type's JSON, with its length prefix, byte for byte (`docs/protocol.md`).
    #[test]
    fn hex_vectors() {
        let vectors = [
            (Frame::PunchSent, "0015 7b2274797065223a2270756e63685f73656e74227d".to_string()),
            (
                Frame::Punch { target: NodeId([0x22; 32]) },
                format!("005c 7b2274797065223a2270756e6368222c22746172676574223a22 {} 227d", "32".repeat(64)),
            ),
            (
                Frame::PunchReady { addr: "203.0.113.7:7701".parse().expect("addr") },
                "0030 7b2274797065223a2270756e63685f7265616479222c2261646472223a22 3230332e302e3131332e373a37373031 227d"
                    .into(),
            ),
            (
                Frame::Attached { observed: "[2001:db8::1]:7701".parse().expect("addr") },
                "0033 7b2274797065223a226174746163686564222c226f62736572766564223a22 \
                 5b323030313a6462383a3a315d3a37373031 227d"
                    .into(),
            ),
            (
                Frame::PunchRequest { client: "198.51.100.2:40000".parse().expect("addr") },
                "0036 7b2274797065223a2270756e63685f72657175657374222c22636c69656e74223a22 \
                 3139382e35312e3130302e323a3430303030 227d"
                    .into(),
            ),
            (
                Frame::Error { message: "full".into() },
                "0021 7b2274797065223a226572726f72222c226d657373616765223a22 66756c6c 227d".into(),
            ),
            (
                Frame::Attach {
                    attach: Signed { node_id: NodeId([1; 32]), payload: "{}".into(), signature: "00".into() },
                    membership: None,
                },
                format!(
                    "0089 7b2274797065223a22617474616368222c22617474616368223a7b226e6f64655f6964223a22 {} \
                     222c227061796c6f6164223a227b7d222c227369676e6174757265223a223030227d7d",
                    "3031".repeat(32)
                ),
            ),
        ];
        for (frame, hex) in vectors {
            assert_vector(&frame, &frame.encode(), &hex);
        }
    }

    #[test]
    fn lengths_are_bounded_and_bodies_checked() {
        assert!(matches!(Frame::decode_prefix(&5000u16.to_be_bytes()), Err(FrameError::TooLong(5000))));
        assert!(matches!(
            Frame::decode_prefix(&(MAX_FRAME_LEN as u16).to_be_bytes()),
            Ok(Decoded::NeedMore(MAX_FRAME_LEN))
        ));
        assert!(matches!(Frame::decode(b"{\"type\":\"nope\"}"), Err(FrameError::Malformed(_))));
    }
}
