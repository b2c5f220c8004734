//! Counters the node keeps about itself and reports in heartbeats.

use std::sync::atomic::{AtomicU64, Ordering};

use fog_proto::api::NodeStats;

#[derive(Debug, Default)]
pub struct Counters {
    pub active_streams: AtomicU64,
    pub requests: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_served: AtomicU64,
    pub origin_fills: AtomicU64,
    pub origin_bytes: AtomicU64,
    pub corrupt_chunks: AtomicU64,
    pub bad_requests: AtomicU64,
    pub store_errors: AtomicU64,
    pub peer_fills: AtomicU64,
    pub peer_fill_bytes: AtomicU64,
    pub peer_served_bytes: AtomicU64,
    /// Chunks from peers that did not match their hash.
    pub peer_bad_chunks: AtomicU64,
    /// Chunks filled through for peers, as their home.
    pub home_fills: AtomicU64,
    /// Origin hints ignored: no valid ticket with fills left came with them.
    pub unlicensed_hints: AtomicU64,
    /// Of `peer_fills` and `peer_served_bytes`, those over the nodes' own QUIC endpoints (`fog-peer/1`).
    pub peer_fills_quic: AtomicU64,
    pub peer_served_quic_bytes: AtomicU64,
    /// Of `peer_fills_quic`, those from peers behind NAT, over a path punched through their rendezvous.
    pub peer_fills_punched: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self, cache_used: u64, cached_chunks: u64, cache_capacity: u64) -> NodeStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NodeStats {
            cache_used,
            cache_capacity,
            cached_chunks,
            active_streams: get(&self.active_streams),
            requests: get(&self.requests),
            hits: get(&self.hits),
            misses: get(&self.misses),
            bytes_served: get(&self.bytes_served),
            origin_fills: get(&self.origin_fills),
            origin_bytes: get(&self.origin_bytes),
            corrupt_chunks: get(&self.corrupt_chunks),
            bad_requests: get(&self.bad_requests),
            store_errors: get(&self.store_errors),
            peer_fills: get(&self.peer_fills),
            peer_fill_bytes: get(&self.peer_fill_bytes),
            peer_served_bytes: get(&self.peer_served_bytes),
            peer_bad_chunks: get(&self.peer_bad_chunks),
            home_fills: get(&self.home_fills),
            unlicensed_hints: get(&self.unlicensed_hints),
            peer_fills_quic: get(&self.peer_fills_quic),
            peer_served_quic_bytes: get(&self.peer_served_quic_bytes),
            peer_fills_punched: get(&self.peer_fills_punched),
        }
    }
}
