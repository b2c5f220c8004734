//! Response heads, read exactly as the two readers read them: the client's on `fog/1` (status byte, then a
//! u32 payload length or a u16 message length, each checked) and the asking node's on peer fill (a
//! `PeerStatus` byte, then for Ok a u32 length of at most one chunk). What reads back re-encodes to the same
//! bytes; what the node's encoder writes (any message, any status) reads back as written, message truncated
//! on a character boundary.
#![no_main]

use fog_fuzz::{read_client_head, read_peer_head};
use fog_proto::wire::{PeerStatus, ResponseHead, Status, MAX_MESSAGE_LEN, MAX_PAYLOAD_LEN};
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
    if let Ok((head, used)) = read_client_head(data) {
        match &head {
            ResponseHead::Ok { len } => assert!(*len <= MAX_PAYLOAD_LEN && used == 5),
            ResponseHead::Error { status, message } => {
                assert_ne!(*status, Status::Ok);
                assert!(message.len() <= MAX_MESSAGE_LEN && used == 3 + message.len());
            }
        }
        assert_eq!(head.encode(), &data[..used], "head does not re-encode to what was read");
    }

    // The peer-fill reader; the node's writer (serve.rs) sends the status byte and for Ok the BE length.
    if let Ok((status, len, used)) = read_peer_head(data) {
        assert!(len <= MAX_PAYLOAD_LEN as usize);
        let mut written = vec![status as u8];
        if status == PeerStatus::Ok {
            written.extend_from_slice(&(len as u32).to_be_bytes());
        }
        assert_eq!(written, &data[..used]);
    }

    // The node's writer: an error with the rest of the input as its message (as a node would make one from
    // an error's text), read back by the client.
    if let Some(status) = Status::from_u8(first % 8).filter(|s| *s != Status::Ok) {
        let message = String::from_utf8_lossy(rest).into_owned();
        let encoded = ResponseHead::Error { status, message: message.clone() }.encode();
        let (back, used) = read_client_head(&encoded).expect("the client reads what the node writes");
        assert_eq!(used, encoded.len());
        let ResponseHead::Error { status: s, message: m } = back else { panic!("error head read as Ok") };
        assert_eq!(s, status);
        assert!(message.starts_with(&m) && m.len() <= MAX_MESSAGE_LEN);
        assert!(m.len() == message.len() || m.len() + 4 > MAX_MESSAGE_LEN, "message cut short needlessly");
    }
    let len = rest.iter().take(4).fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) % (MAX_PAYLOAD_LEN + 1);
    let encoded = ResponseHead::Ok { len }.encode();
    assert_eq!(read_client_head(&encoded), Ok((ResponseHead::Ok { len }, 5)));
});
