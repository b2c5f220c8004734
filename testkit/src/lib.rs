//! fog-testkit: what fogcdn's integration tests, demo and benchmarks share — a configurable origin server,
//! a harness that runs the real binaries, a disk-footprint sampler, a throwaway PostgreSQL (alone or under
//! pg_auto_failover), a throwaway NATS cluster, and deterministic test content.

pub mod disk;
pub mod harness;
pub mod nats;
pub mod netns;
pub mod origin;
pub mod pg;
pub mod pg_failover;

/// A free TCP port on 127.0.0.1 below the kernel's ephemeral range (32768–60999 by default), for servers a
/// test stops and restarts on the same port: no `bind(0)` or outgoing connection elsewhere can take it while
/// the server is down. Each port is handed out once per process, from an offset set by the process id, so
/// test binaries running side by side seldom probe the same ones.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let offset = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, offset, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

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
