//! Rendezvous frames (`fog-rdv/1`): a u16 length prefix, then JSON. What decodes re-encodes to a frame the
//! receiver's checks accept and decode to the same frame, no longer than the limit; a signed attach is
//! opened as the rendezvous opens it.
#![no_main]

use fog_proto::api::Membership;
use fog_proto::rendezvous::{Attach, Frame, KIND_ATTACH, MAX_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let [a, b, rest @ ..] = data {
        if let Ok(n) = Frame::check_len(u16::from_be_bytes([*a, *b])) {
            assert!(n <= MAX_FRAME_LEN);
            if let Some(Ok(frame)) = rest.get(..n).map(Frame::decode) {
                check(&frame);
            }
        }
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
    let len = Frame::check_len(u16::from_be_bytes([bytes[0], bytes[1]]))
        .unwrap_or_else(|e| panic!("a frame that decoded re-encodes too long: {e}"));
    assert_eq!(len, bytes.len() - 2);
    assert_eq!(Frame::decode(&bytes[2..]).as_ref(), Ok(frame));
    if let Frame::Attach { attach, membership } = frame {
        // Fails without the node's (and the tracker's) key; must fail cleanly.
        let _ = attach.open::<Attach>(KIND_ATTACH);
        if let Some(m) = membership {
            let _ = Membership::verify(m, m.node_id, attach.node_id, 0);
        }
    }
}
