//! Helpers the fuzz targets share: JSON round trips, and the readers of response heads exactly as the
//! client (`client-lib/src/chunk.rs`) and the node's peer fill (`node/src/overlay.rs`) read them off a
//! stream (fog-proto has the length checks, not a decoder of the whole head).

use fog_proto::wire::{FrameError, PeerStatus, ResponseHead, Status};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `value` serialises to JSON that parses back to a value serialising to the same JSON.
pub fn round_trips<T: Serialize + DeserializeOwned>(value: &T) {
    let json = serde_json::to_vec(value).expect("API values serialise");
    let back: T = match serde_json::from_slice(&json) {
        Ok(v) => v,
        Err(e) => panic!("{} does not parse back: {e}", String::from_utf8_lossy(&json)),
    };
    assert_eq!(
        String::from_utf8_lossy(&serde_json::to_vec(&back).expect("serialises")),
        String::from_utf8_lossy(&json),
        "JSON round trip changed the value"
    );
}

/// A response head read as the client reads it: the status, the length field its status calls for, the
/// checked length, and for an error the message. Returns the head and how many bytes it took.
pub fn read_client_head(bytes: &[u8]) -> Result<(ResponseHead, usize), FrameError> {
    let mut r = Cursor(bytes);
    let byte = r.take(1)?[0];
    let status = Status::from_u8(byte).ok_or(FrameError::UnknownStatus(byte))?;
    let field = r.take(ResponseHead::len_field_size(status))?;
    let len = field.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
    let len = ResponseHead::check_len(status, len)?;
    let head = if status == Status::Ok {
        ResponseHead::Ok { len: len as u32 }
    } else {
        let message = std::str::from_utf8(r.take(len)?).map_err(|_| FrameError::Utf8)?;
        ResponseHead::Error { status, message: message.to_owned() }
    };
    Ok((head, bytes.len() - r.0.len()))
}

/// A peer-fill answer head as the asking node reads it: one [`PeerStatus`] byte and, for `Ok`, a big-endian
/// u32 length of at most one chunk. Returns the status, the length (0 unless Ok) and the bytes taken.
pub fn read_peer_head(bytes: &[u8]) -> Result<(PeerStatus, usize, usize), FrameError> {
    let mut r = Cursor(bytes);
    let byte = r.take(1)?[0];
    let status = PeerStatus::from_u8(byte).ok_or(FrameError::UnknownStatus(byte))?;
    if status != PeerStatus::Ok {
        return Ok((status, 0, 1));
    }
    let len = u32::from_be_bytes(r.take(4)?.try_into().expect("4 bytes"));
    // overlay.rs refuses `len > MAX_PAYLOAD_LEN`: the same bound as a client response's payload.
    let len = ResponseHead::check_len(Status::Ok, len)?;
    Ok((status, len, 5))
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Truncated { needed: n - self.0.len() });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

/// The values between each `open` and the next `close` after it, in order, and the text with them cut
/// out (what a rewrite of those values must leave alone).
pub fn split_values<'a>(text: &'a str, open: &str, close: &str) -> (Vec<&'a str>, String) {
    let (mut values, mut outside, mut rest) = (Vec::new(), String::new(), text);
    while let Some(pos) = rest.find(open) {
        let (head, tail) = rest.split_at(pos + open.len());
        outside.push_str(head);
        let Some(end) = tail.find(close) else {
            rest = tail;
            break;
        };
        values.push(&tail[..end]);
        rest = &tail[end..];
    }
    outside.push_str(rest);
    (values, outside)
}
