//! Rendezvous frames (`fog-rdv/1`): a u16 length prefix, then JSON. What decodes re-encodes to a frame the
//! receiver's checks accept and decode to the same frame, no longer than the limit; a signed attach is
//! opened as the rendezvous opens it.
#![no_main]

use fog_fuzz::read_as_stream;
use fog_proto::api::Membership;
use fog_proto::rendezvous::{Attach, Frame, KIND_ATTACH, MAX_FRAME_LEN};
use fog_proto::wire::{Decode, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a rendezvous reads a stream: the length prefix is checked before the body is read.
    if let Some((frame, len)) = read_as_stream::<Frame>(data) {
        assert!(len - 2 <= MAX_FRAME_LEN);
        check(&frame);
    }
    if data.len() <= MAX_FRAME_LEN {
        if let Ok(frame) = Frame::decode(data) {
            check(&frame);
        }
    }
    if let Ok(attach) = serde_json::from_slice::<Attach>(data) {
        fog_fuzz::round_trips(&attach);
    }
});

fn check(frame: &Frame) {
    let bytes = frame.encode();
    match Frame::decode_prefix(&bytes) {
        Ok(Decoded::Done { frame: back, len }) => assert!(back == *frame && len == bytes.len(), "read back {back:?}"),
        other => panic!("a frame that decoded re-encodes to one the receiver refuses: {other:?}"),
    }
    if let Frame::Attach { attach, membership } = frame {
        // Fails without the node's (and the tracker's) key; must fail cleanly.
        let _ = attach.open::<Attach>(KIND_ATTACH);
        if let Some(m) = membership {
            let _ = Membership::verify(m, m.node_id, attach.node_id, 0);
        }
    }
}
