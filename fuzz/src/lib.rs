//! Helpers the fuzz targets share: JSON round trips, and frames read the way fog-net's frame reader
//! (`net/src/frame_io.rs`) reads them off a stream, with fog-proto's decoders.

use std::fmt::Debug;

use fog_proto::wire::{Decode, Decoded};
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

/// Reads a `T` off `data` as fog-net's frame reader reads a stream: as many bytes as the decoder asks for
/// next, never more. Returns the frame and the bytes it took, or `None` if the decoder refuses or `data`
/// ends first; checks that the decoder, given all of `data` at once, agrees.
pub fn read_as_stream<T: Decode + PartialEq + Debug>(data: &[u8]) -> Option<(T, usize)> {
    let mut have = 0;
    let read = loop {
        match T::decode_prefix(&data[..have]) {
            Ok(Decoded::Done { frame, len }) => {
                assert_eq!(len, have, "the decoder took other than the bytes it asked for");
                break Some((frame, len));
            }
            Ok(Decoded::NeedMore(n)) => {
                assert!(n > 0, "the decoder asked for no bytes");
                have += n;
                if have > data.len() {
                    break None;
                }
            }
            Err(_) => break None,
        }
    };
    match (T::decode_prefix(data), &read) {
        (Ok(Decoded::Done { frame, len }), Some((f, l))) => assert!(frame == *f && len == *l, "{frame:?} != {f:?}"),
        (Ok(Decoded::Done { frame, .. }), None) => panic!("{frame:?} decodes from the whole input, not as a stream"),
        (_, Some((f, _))) => panic!("{f:?} decodes as a stream, not from the whole input"),
        (_, None) => {}
    }
    read
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
