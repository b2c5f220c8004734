//! The cache eviction policy: an in-memory index of chunk sizes and recency (LRU) under a byte quota.
//!
//! It is pure bookkeeping: the node's RocksDB store asks it what to evict and deletes those chunks itself.
//! Keeping it free of I/O lets the simulator run the very same policy.

use std::collections::{BTreeMap, HashMap};

use crate::ChunkHash;

#[derive(Debug)]
pub struct CacheIndex {
    capacity: u64,
    used: u64,
    entries: HashMap<ChunkHash, Entry>,
    /// Recency order: the smallest tick is the least recently used chunk.
    by_recency: BTreeMap<u64, ChunkHash>,
    next_tick: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    size: u64,
    tick: u64,
}

/// What [`CacheIndex::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Store the chunk after deleting these (least recently used first).
    Admit { evict: Vec<ChunkHash> },
    /// Already indexed; its recency was refreshed.
    Present,
    /// The chunk alone is larger than the whole quota.
    TooLarge,
}

impl CacheIndex {
    pub fn new(capacity: u64) -> Self {
        Self { capacity, used: 0, entries: HashMap::new(), by_recency: BTreeMap::new(), next_tick: 0 }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes of all indexed chunks; never above the capacity.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, hash: &ChunkHash) -> bool {
        self.entries.contains_key(hash)
    }

    fn bump(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    /// Records a hit. Returns false when the chunk is not indexed.
    pub fn touch(&mut self, hash: &ChunkHash) -> bool {
        let tick = self.bump();
        let Some(e) = self.entries.get_mut(hash) else { return false };
        self.by_recency.remove(&e.tick);
        e.tick = tick;
        self.by_recency.insert(tick, *hash);
        true
    }

    /// Indexes a chunk of `size` bytes, choosing victims so that the quota holds. The chunks to evict are
    /// already removed from the index when this returns: the caller deletes them before writing the new one.
    pub fn admit(&mut self, hash: ChunkHash, size: u64) -> Admission {
        if self.touch(&hash) {
            return Admission::Present;
        }
        if size > self.capacity {
            return Admission::TooLarge;
        }
        let evict = self.evict_down_to(self.capacity - size);
        let tick = self.bump();
        self.entries.insert(hash, Entry { size, tick });
        self.by_recency.insert(tick, hash);
        self.used += size;
        Admission::Admit { evict }
    }

    /// Changes the quota; returns the least recently used chunks evicted to fit a smaller one (already
    /// removed from the index, for the caller to delete).
    pub fn set_capacity(&mut self, capacity: u64) -> Vec<ChunkHash> {
        self.capacity = capacity;
        self.evict_down_to(capacity)
    }

    /// Removes least recently used chunks until at most `limit` bytes are indexed; returns them.
    fn evict_down_to(&mut self, limit: u64) -> Vec<ChunkHash> {
        let mut evict = Vec::new();
        while self.used > limit {
            let Some((_, victim)) = self.by_recency.pop_first() else { break };
            if let Some(e) = self.entries.remove(&victim) {
                self.used -= e.size;
            }
            evict.push(victim);
        }
        evict
    }

    /// Forgets a chunk (deleted or found corrupt). Returns its size if it was indexed.
    pub fn remove(&mut self, hash: &ChunkHash) -> Option<u64> {
        let e = self.entries.remove(hash)?;
        self.by_recency.remove(&e.tick);
        self.used -= e.size;
        Some(e.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u32) -> ChunkHash {
        ChunkHash::of(&i.to_be_bytes())
    }

    #[test]
    fn evicts_least_recently_used_within_quota() {
        let mut c = CacheIndex::new(300);
        for i in 0..3 {
            assert_eq!(c.admit(h(i), 100), Admission::Admit { evict: vec![] });
        }
        assert!(c.touch(&h(0)));
        assert_eq!(c.admit(h(3), 100), Admission::Admit { evict: vec![h(1)] });
        assert_eq!(c.admit(h(4), 150), Admission::Admit { evict: vec![h(2), h(0)] });
        assert!(c.used() <= c.capacity());
        assert_eq!(c.admit(h(4), 150), Admission::Present);
        assert_eq!(c.admit(h(9), 301), Admission::TooLarge);
        assert_eq!(c.remove(&h(4)), Some(150));
        assert_eq!(c.used(), 100);
    }

    #[test]
    fn a_smaller_capacity_evicts_least_recently_used() {
        let mut c = CacheIndex::new(300);
        for i in 0..3 {
            let _ = c.admit(h(i), 100);
        }
        assert!(c.touch(&h(0)));
        assert_eq!(c.set_capacity(150), vec![h(1), h(2)]);
        assert_eq!((c.used(), c.capacity()), (100, 150));
        assert_eq!(c.set_capacity(1000), vec![]);
        assert_eq!(c.admit(h(5), 900), Admission::Admit { evict: vec![] });
    }

    #[test]
    fn quota_holds_under_random_load() {
        let mut c = CacheIndex::new(10_000);
        for i in 0..5_000u32 {
            let size = u64::from(i * 7919 % 997 + 1);
            let _ = c.admit(h(i % 300), size);
            if i % 3 == 0 {
                c.touch(&h(i % 50));
            }
            assert!(c.used() <= c.capacity());
        }
        let sum: u64 = c.entries.values().map(|e| e.size).sum();
        assert_eq!(sum, c.used());
        assert_eq!(c.by_recency.len(), c.entries.len());
    }
}
