//! fog-testkit: what fogcdn's integration tests, demo and benchmarks share — a configurable origin server,
//! a harness that runs the real binaries, a disk-footprint sampler, a throwaway PostgreSQL, a throwaway NATS
//! cluster, and deterministic test content.

pub mod disk;
pub mod harness;
pub mod nats;
pub mod netns;
pub mod origin;
pub mod pg;

/// Deterministic pseudo-random bytes (xorshift), so test objects are incompressible and reproducible.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
