//! The chunk-request frame (client → node on `fog/1`; node → peer on the peer-fill protocol): a u16 length
//! prefix, then the body (group hashes included). Decoding is canonical (what decodes re-encodes to the same bytes), every field
//! stays within its bound, and whatever the encoder frames, the receiver's length check and decoder accept.
#![no_main]

use fog_fuzz::read_as_stream;
use fog_proto::groups::{GroupHashes, MAX_GROUPS_PER_CHUNK};
use fog_proto::wire::{
    ChunkRequest, Decode, Decoded, NodeRequest, OriginHint, MAX_PAYLOAD_LEN, MAX_RECEIPT_LEN, MAX_REQUEST_LEN,
    MAX_TICKET_LEN, MAX_URL_LEN,
};
use fog_proto::ChunkHash;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a node reads a stream: the length prefix is checked before the body is read.
    if let Some((req, len)) = read_as_stream::<ChunkRequest>(data) {
        assert!(len - 2 <= MAX_REQUEST_LEN);
        check_decoded(&req, &data[2..len]);
    }
    // As a node's client protocol reads it: a chunk request or a push (the same fields, one more flag).
    if let Some((req, len)) = read_as_stream::<NodeRequest>(data) {
        let (NodeRequest::Chunk(fields) | NodeRequest::Push(fields)) = &req;
        check_decoded(fields, &ChunkRequest::encode(fields));
        assert_eq!(req.encode_framed().as_deref(), Ok(&data[..len]), "decoding a push is not canonical");
    }
    // Any bytes as a body, of any length.
    if let Ok(req) = ChunkRequest::decode(data) {
        check_decoded(&req, data);
    }
    // The input as a recipe for a request, to drive the encoder with fields up to their limits.
    check_encoded(&request_from(data));
});

fn check_decoded(req: &ChunkRequest, body: &[u8]) {
    assert_eq!(req.encode(), body, "decoding is not canonical");
    if let Some((_, len)) = req.range {
        assert_ne!(len, 0);
    }
    if let Some(o) = &req.origin {
        assert!(o.url.len() <= MAX_URL_LEN && o.length <= MAX_PAYLOAD_LEN);
    }
    assert!(req.receipt.as_ref().is_none_or(|r| r.len() <= MAX_RECEIPT_LEN));
    assert!(req.ticket.as_ref().is_none_or(|t| t.len() <= MAX_TICKET_LEN));
    assert!(req.groups.as_ref().is_none_or(|(size, h)| size.is_power_of_two() && h.0.len() <= MAX_GROUPS_PER_CHUNK));
    assert_eq!(req.wants_chunk(), req.hash.0 != [0; 32]);
    // What a node accepted, a node can send on (peer fill re-frames requests).
    if body.len() <= MAX_REQUEST_LEN {
        check_encoded(req);
    }
}

/// `encode_framed` either refuses or produces a frame the receiver's checks accept and decode unchanged.
fn check_encoded(req: &ChunkRequest) {
    let Ok(framed) = req.encode_framed() else { return };
    match ChunkRequest::decode_prefix(&framed) {
        Ok(Decoded::Done { frame, len }) => assert!(frame == *req && len == framed.len(), "read back {frame:?}"),
        other => panic!("encode_framed produced a frame the receiver refuses: {other:?}"),
    }
}

/// A request whose URL, receipt and ticket lengths (up to a little past their limits) come from the input.
fn request_from(data: &[u8]) -> ChunkRequest {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let word = |i: usize| usize::from(u16::from_be_bytes([byte(i), byte(i + 1)]));
    let flags = byte(0);
    let filler = |len: usize, at: usize| -> Vec<u8> { (0..len).map(|i| b'a' + (byte(at + i % 16) % 26)).collect() };
    let mut hash = [0u8; 32];
    for (i, h) in hash.iter_mut().enumerate() {
        *h = byte(5 + i);
    }
    let range_len = u32::from(byte(37));
    ChunkRequest {
        hash: ChunkHash(hash),
        range: (flags & 1 != 0 && range_len > 0).then_some((u32::from(byte(38)) << 16, range_len)),
        origin: (flags & 2 != 0).then(|| OriginHint {
            url: String::from_utf8(filler(word(1) % (MAX_URL_LEN + 64), 40)).expect("ASCII"),
            offset: u64::from(byte(39)) << 20,
            length: (u32::from(byte(38)) << 16).min(MAX_PAYLOAD_LEN),
        }),
        receipt: (flags & 4 != 0).then(|| filler(word(3) % (MAX_RECEIPT_LEN + 64), 56)),
        ticket: (flags & 8 != 0).then(|| filler(word(72) % (MAX_TICKET_LEN + 64), 74)),
        groups: (flags & 16 != 0).then(|| {
            let count = usize::from(byte(4)) % (MAX_GROUPS_PER_CHUNK + 8);
            (1 << (10 + byte(2) % 16), GroupHashes(vec![[byte(3); 32]; count]))
        }),
    }
}
