//! What group hashes cost (`scripts/bench/groups.sh`): manifest size per chunk, and verification
//! throughput of a chunk hashed whole (store-and-forward) against verified group by group, in the same run.

use std::time::Instant;

use fog_proto::groups::{GroupHashes, Verifier};
use fog_proto::manifest::{ManifestBuilder, DEFAULT_CHUNK_SIZE};
use fog_proto::ChunkHash;

const ROUNDS: usize = 200;

fn main() {
    let chunk: Vec<u8> =
        (0..DEFAULT_CHUNK_SIZE as usize).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect();
    let hash = ChunkHash::of(&chunk);
    // A 256 MiB object in 1 MiB chunks.
    let object_chunks = 256;
    println!("| group size | manifest JSON per 1 MiB chunk | 256 MiB object's manifest | verify 1 MiB (MB/s) |");
    println!("|---|---|---|---|");
    for group in [None, Some(256 << 10), Some(64 << 10), Some(16 << 10), Some(4 << 10)] {
        let mut b = ManifestBuilder::with_groups(DEFAULT_CHUNK_SIZE, group);
        for _ in 0..object_chunks {
            b.update(&chunk);
        }
        let json = serde_json::to_vec(&b.finish("https://videos.example.com/a.mp4".into(), None, None)).expect("json");
        let groups = group.map(|g| (g, GroupHashes::of(&chunk, g)));
        let started = Instant::now();
        for _ in 0..ROUNDS {
            // Pieces of 16 KiB, as they come off a QUIC stream.
            let mut v = Verifier::new(hash, DEFAULT_CHUNK_SIZE, groups.clone()).expect("valid");
            for piece in chunk.chunks(16 << 10) {
                v.update(piece).expect("matches");
            }
            assert!(v.is_done());
        }
        let mb_s = (ROUNDS * chunk.len()) as f64 / started.elapsed().as_secs_f64() / 1e6;
        let name = group.map_or("none (whole chunk)".to_string(), |g| format!("{} KiB", g >> 10));
        println!("| {name} | {} B | {} KiB | {mb_s:.0} |", json.len() / object_chunks, json.len() >> 10);
    }
}
