//! Manifests as clients and nodes receive them (JSON, then `validate`). A valid manifest's chunk spans tile
//! the object exactly; every manifest survives a JSON round trip with the same content id.
#![no_main]

use fog_proto::manifest::{Manifest, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = serde_json::from_slice::<Manifest>(data) else { return };
    let json = serde_json::to_vec(&m).expect("manifests serialise");
    let back: Manifest = serde_json::from_slice(&json).expect("a manifest parses back");
    assert_eq!(back, m);
    assert_eq!(back.content_id(), m.content_id());
    if m.validate().is_err() {
        return;
    }
    assert!((MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&m.chunk_size));
    assert_eq!(m.chunks.len() as u64, Manifest::chunk_count_for(m.size, m.chunk_size));
    let mut end = 0u64;
    for i in 0..m.chunks.len() {
        let (offset, len) = m.chunk_span(i);
        assert_eq!(offset, end, "chunk {i} does not start where the previous one ended");
        assert!(len > 0 && len <= m.chunk_size);
        assert!(len == m.chunk_size || i + 1 == m.chunks.len(), "a short chunk before the last");
        end += u64::from(len);
    }
    assert_eq!(end, m.size);
    // The content id names this version: any change of a field changes it.
    let mut other = m.clone();
    other.size ^= 1;
    assert_ne!(other.content_id(), m.content_id());
    other = m.clone();
    other.etag = Some(format!("{}x", m.etag.as_deref().unwrap_or_default()));
    assert_ne!(other.content_id(), m.content_id());
});
