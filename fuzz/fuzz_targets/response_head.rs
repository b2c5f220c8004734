//! Response heads, read as fog-net's frame reader reads them off a stream, with fog-proto's decoders: the
//! client's on `fog/1` (status byte, then a u32 payload length or a u16 message length, each checked) and
//! the asking node's on peer fill (a `PeerStatus` byte, then for Ok a u32 length of at most one chunk). What
//! reads back re-encodes to the same bytes; what the node's encoder writes (any message, any status) reads
//! back as written, message truncated on a character boundary.
#![no_main]

use fog_fuzz::read_as_stream;
use fog_proto::wire::{PeerResponseHead, PeerStatus, ResponseHead, Status, MAX_MESSAGE_LEN, MAX_PAYLOAD_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    // Status codes: exactly 0..=7 (client) and 0..=2 (peer) are known, and they map back to their byte.
    match Status::from_u8(first) {
        Some(s) => assert_eq!(s as u8, first),
        None => assert!(first > 7),
    }
    match PeerStatus::from_u8(first) {
        Some(s) => assert_eq!(s as u8, first),
        None => assert!(first > 2),
    }

    // The client's reader.
    if let Some((head, used)) = read_as_stream::<ResponseHead>(data) {
        match &head {
            ResponseHead::Ok { len } => assert!(*len <= MAX_PAYLOAD_LEN && used == 5),
            ResponseHead::Error { status, message } => {
                assert_ne!(*status, Status::Ok);
                assert!(used <= 3 + MAX_MESSAGE_LEN);
                // A message that is not UTF-8 is read lossily (it is for humans); any other re-encodes.
                match std::str::from_utf8(&data[3..used]) {
                    Ok(text) => assert_eq!(message, text),
                    Err(_) => assert_eq!(*message, String::from_utf8_lossy(&data[3..used])),
                }
            }
        }
        if !matches!(&head, ResponseHead::Error { .. }) || std::str::from_utf8(&data[3..used]).is_ok() {
            assert_eq!(head.encode(), &data[..used], "head does not re-encode to what was read");
        }
    }

    // The peer-fill reader; the node's writer (serve.rs) sends the same encoding.
    if let Some((head, used)) = read_as_stream::<PeerResponseHead>(data) {
        if let PeerResponseHead::Ok { len } = head {
            assert!(len <= MAX_PAYLOAD_LEN);
        }
        assert_eq!(head.encode(), &data[..used]);
    }

    // The node's writer: an error with the rest of the input as its message (as a node would make one from
    // an error's text), read back by the client.
    if let Some(status) = Status::from_u8(first % 8).filter(|s| *s != Status::Ok) {
        let message = String::from_utf8_lossy(rest).into_owned();
        let encoded = ResponseHead::Error { status, message: message.clone() }.encode();
        let (back, used) = read_as_stream::<ResponseHead>(&encoded).expect("the client reads what the node writes");
        assert_eq!(used, encoded.len());
        let ResponseHead::Error { status: s, message: m } = back else { panic!("error head read as Ok") };
        assert_eq!(s, status);
        assert!(message.starts_with(&m) && m.len() <= MAX_MESSAGE_LEN);
        assert!(m.len() == message.len() || m.len() + 4 > MAX_MESSAGE_LEN, "message cut short needlessly");
    }
    let len = rest.iter().take(4).fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) % (MAX_PAYLOAD_LEN + 1);
    let encoded = ResponseHead::Ok { len }.encode();
    assert_eq!(read_as_stream::<ResponseHead>(&encoded), Some((ResponseHead::Ok { len }, 5)));
    let encoded = PeerResponseHead::Ok { len }.encode();
    assert_eq!(read_as_stream::<PeerResponseHead>(&encoded), Some((PeerResponseHead::Ok { len }, 5)));
});
