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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("rendezvous frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLong(usize),
    #[error("malformed rendezvous frame: {0}")]
    Malformed(String),
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
    pub fn check_len(len: u16) -> Result<usize, FrameError> {
        let len = usize::from(len);
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLong(len));
        }
        Ok(len)
    }

    pub fn decode(body: &[u8]) -> Result<Self, FrameError> {
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_lengths_are_bounded() {
        let f = Frame::PunchReady { addr: "203.0.113.7:7701".parse().expect("addr") };
        let bytes = f.encode();
        let len = Frame::check_len(u16::from_be_bytes([bytes[0], bytes[1]])).expect("short");
        assert_eq!(Frame::decode(&bytes[2..2 + len]), Ok(f));
        assert_eq!(Frame::check_len(5000), Err(FrameError::TooLong(5000)));
        assert!(matches!(Frame::decode(b"{\"type\":\"nope\"}"), Err(FrameError::Malformed(_))));
    }
}
