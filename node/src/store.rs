//! The chunk store: verified chunks in RocksDB under a disk quota.
//!
//! - Column family `chunks`: chunk hash → bytes, in BlobDB blob files (values ≥ 64 KiB stay out of the LSM
//!   tree, so compaction does not rewrite video).
//! - Column family `chunk_meta`: chunk hash → size (u32 BE) ‖ insertion sequence (u64 BE), small enough to
//!   scan at start-up to rebuild the in-memory eviction index without touching chunk data.
//!
//! The quota is enforced by [`fog_proto::cache::CacheIndex`] before every write, so the bytes of indexed
//! chunks never exceed it. In front of RocksDB a small RAM tier, under the same policy, keeps hot chunks
//! that were verified when they entered it: a popular chunk is then served without a disk read, a copy
//! and a re-hash each time (measured in `docs/benchmarks.md`). Writes are not synced: the cache is reconstructible and every read is verified,
//! so a crash costs at most some refills (never a wrong byte).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use fog_proto::cache::{Admission, CacheIndex};
use fog_proto::ChunkHash;
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};

pub const CF_CHUNKS: &str = "chunks";
pub const CF_META: &str = "chunk_meta";
/// Credit receipts held until the tracker acknowledges them (see `credits.rs`).
pub const CF_RECEIPTS: &str = "receipts";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the chunk store at {path}: {source}; is another fog-node using this --data-dir?")]
    Open { path: String, source: rocksdb::Error },
    #[error("chunk store read failed: {0}")]
    Read(rocksdb::Error),
    #[error("chunk store write failed (disk full?): {0}; the chunk is served but not cached")]
    Write(rocksdb::Error),
    #[error("chunk of {size} bytes is larger than the whole cache quota of {quota} bytes")]
    TooLarge { size: u64, quota: u64 },
}

impl StoreError {
    /// Whether the operation may succeed later (a disk that fills up may drain; a locked store will not
    /// unlock by itself, nor will an oversized chunk shrink).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Read(_) | Self::Write(_))
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Hit(Bytes),
    Miss,
    /// The stored bytes no longer matched their hash; the entry was dropped.
    Corrupt,
}

#[derive(Debug)]
pub struct Store {
    db: DB,
    index: Mutex<CacheIndex>,
    next_seq: AtomicU64,
    hot: Mutex<HotTier>,
}

/// Verified chunks held in memory, least recently used evicted first.
#[derive(Debug)]
struct HotTier {
    index: CacheIndex,
    chunks: HashMap<ChunkHash, Bytes>,
}

impl HotTier {
    fn get(&mut self, hash: &ChunkHash) -> Option<Bytes> {
        let bytes = self.chunks.get(hash)?.clone();
        self.index.touch(hash);
        Some(bytes)
    }

    /// Keeps `bytes`, which the caller has verified.
    fn insert(&mut self, hash: ChunkHash, bytes: &Bytes) {
        if let Admission::Admit { evict } = self.index.admit(hash, bytes.len() as u64) {
            for victim in evict {
                self.chunks.remove(&victim);
            }
            self.chunks.insert(hash, bytes.clone());
        }
    }

    fn remove(&mut self, hash: &ChunkHash) {
        self.index.remove(hash);
        self.chunks.remove(hash);
    }
}

fn meta_value(size: u32, seq: u64) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&size.to_be_bytes());
    v[4..].copy_from_slice(&seq.to_be_bytes());
    v
}

impl Store {
    /// Opens the store at `path` with a disk `quota` and a RAM tier of `memory` bytes (0: none).
    pub fn open(path: &Path, quota: u64, memory: u64) -> Result<Self, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_open_files(256);
        db_opts.set_keep_log_file_num(3);

        let mut chunk_opts = Options::default();
        chunk_opts.set_enable_blob_files(true);
        chunk_opts.set_min_blob_size(64 * 1024);
        chunk_opts.set_blob_file_size(64 << 20);
        chunk_opts.set_enable_blob_gc(true);
        // Memtables hold values until flush; keep them small for 1 GB devices.
        chunk_opts.set_write_buffer_size(16 << 20);
        chunk_opts.set_max_write_buffer_number(2);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_opts),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_RECEIPTS, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs)
            .map_err(|source| StoreError::Open { path: path.display().to_string(), source })?;
        let store = Self {
            db,
            index: Mutex::new(CacheIndex::new(quota)),
            next_seq: AtomicU64::new(0),
            hot: Mutex::new(HotTier { index: CacheIndex::new(memory), chunks: HashMap::new() }),
        };
        store.rebuild_index()?;
        Ok(store)
    }

    pub(crate) fn db(&self) -> &DB {
        &self.db
    }

    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }

    /// Re-admits stored chunks in insertion order; if the quota shrank, the oldest are deleted.
    fn rebuild_index(&self) -> Result<(), StoreError> {
        let mut entries = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_META), IteratorMode::Start) {
            let (k, v) = item.map_err(StoreError::Read)?;
            let (Ok(key), Ok(val)) = (<[u8; 32]>::try_from(&*k), <[u8; 12]>::try_from(&*v)) else {
                continue;
            };
            let size = u32::from_be_bytes(val[..4].try_into().expect("4 bytes"));
            let seq = u64::from_be_bytes(val[4..].try_into().expect("8 bytes"));
            entries.push((seq, ChunkHash(key), size));
        }
        entries.sort_unstable();
        let mut batch = WriteBatch::default();
        {
            let mut index = self.index.lock().expect("store index lock");
            for (_, hash, size) in &entries {
                let evict = match index.admit(*hash, u64::from(*size)) {
                    Admission::Admit { evict } => evict,
                    Admission::TooLarge => vec![*hash],
                    Admission::Present => vec![],
                };
                for victim in evict {
                    batch.delete_cf(self.cf(CF_CHUNKS), victim.as_bytes());
                    batch.delete_cf(self.cf(CF_META), victim.as_bytes());
                }
            }
        }
        self.next_seq.store(entries.last().map_or(0, |e| e.0 + 1), Ordering::Relaxed);
        self.db.write(batch).map_err(StoreError::Write)
    }

    /// Reads a chunk, from the RAM tier or from disk. What comes from disk is verified against its hash,
    /// so a damaged disk never serves a wrong byte.
    pub fn get(&self, hash: &ChunkHash) -> Result<Lookup, StoreError> {
        if !self.index.lock().expect("store index lock").touch(hash) {
            return Ok(Lookup::Miss);
        }
        if let Some(bytes) = self.hot.lock().expect("hot tier lock").get(hash) {
            return Ok(Lookup::Hit(bytes));
        }
        // RocksDB's own CRC check is redundant under the BLAKE3 check below, and costs as much CPU again.
        let mut opts = ReadOptions::default();
        opts.set_verify_checksums(false);
        let value = self.db.get_pinned_cf_opt(self.cf(CF_CHUNKS), hash.as_bytes(), &opts).map_err(StoreError::Read)?;
        let Some(value) = value else {
            // Indexed but gone (a write that did not survive a crash): forget it.
            self.index.lock().expect("store index lock").remove(hash);
            return Ok(Lookup::Miss);
        };
        if ChunkHash::of(&value) != *hash {
            tracing::error!(chunk = %hash, "stored chunk does not match its hash (disk corruption?); dropping it");
            self.remove(hash)?;
            return Ok(Lookup::Corrupt);
        }
        let bytes = Bytes::copy_from_slice(&value);
        self.hot.lock().expect("hot tier lock").insert(*hash, &bytes);
        Ok(Lookup::Hit(bytes))
    }

    /// Stores a chunk the caller has verified, evicting least recently used chunks to stay within quota.
    pub fn put(&self, hash: &ChunkHash, bytes: &Bytes) -> Result<(), StoreError> {
        debug_assert_eq!(ChunkHash::of(bytes), *hash, "only verified chunks are stored");
        let admission = self.index.lock().expect("store index lock").admit(*hash, bytes.len() as u64);
        let evict = match admission {
            Admission::Present => return Ok(()),
            Admission::TooLarge => {
                return Err(StoreError::TooLarge { size: bytes.len() as u64, quota: self.capacity() })
            }
            Admission::Admit { evict } => evict,
        };
        let mut batch = WriteBatch::default();
        {
            let mut hot = self.hot.lock().expect("hot tier lock");
            for victim in &evict {
                hot.remove(victim);
                batch.delete_cf(self.cf(CF_CHUNKS), victim.as_bytes());
                batch.delete_cf(self.cf(CF_META), victim.as_bytes());
            }
            hot.insert(*hash, bytes);
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        batch.put_cf(self.cf(CF_CHUNKS), hash.as_bytes(), &bytes[..]);
        batch.put_cf(self.cf(CF_META), hash.as_bytes(), meta_value(bytes.len() as u32, seq));
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        self.db.write_opt(batch, &opts).map_err(|e| {
            self.index.lock().expect("store index lock").remove(hash);
            self.hot.lock().expect("hot tier lock").remove(hash);
            StoreError::Write(e)
        })
    }

    pub fn remove(&self, hash: &ChunkHash) -> Result<(), StoreError> {
        self.index.lock().expect("store index lock").remove(hash);
        self.hot.lock().expect("hot tier lock").remove(hash);
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_CHUNKS), hash.as_bytes());
        batch.delete_cf(self.cf(CF_META), hash.as_bytes());
        self.db.write(batch).map_err(StoreError::Write)
    }

    /// (bytes used, chunk count) of indexed chunks.
    pub fn usage(&self) -> (u64, u64) {
        let index = self.index.lock().expect("store index lock");
        (index.used(), index.len() as u64)
    }

    pub fn capacity(&self) -> u64 {
        self.index.lock().expect("store index lock").capacity()
    }

    /// Flushes memtables so a clean shutdown does not replay the WAL on the next start.
    pub fn flush(&self) -> Result<(), StoreError> {
        for cf in [CF_CHUNKS, CF_META] {
            self.db.flush_cf(self.cf(cf)).map_err(StoreError::Write)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8, len: usize) -> (ChunkHash, Bytes) {
        let bytes = Bytes::from(vec![i; len]);
        (ChunkHash::of(&bytes), bytes)
    }

    #[test]
    fn put_get_evict_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let quota = 3 * 100_000;
        {
            let store = Store::open(dir.path(), quota, 100_000).expect("open");
            for i in 0..5 {
                let (h, b) = chunk(i, 100_000);
                store.put(&h, &b).expect("put");
                assert!(store.usage().0 <= quota);
            }
            assert!(matches!(store.get(&chunk(0, 100_000).0).expect("get"), Lookup::Miss));
            match store.get(&chunk(4, 100_000).0).expect("get") {
                Lookup::Hit(b) => assert_eq!(&b[..], &chunk(4, 100_000).1[..]),
                other => panic!("expected a hit, got {other:?}"),
            }
            store.flush().expect("flush");
        }
        // A smaller quota on restart evicts the oldest chunks.
        let store = Store::open(dir.path(), 2 * 100_000, 0).expect("reopen");
        assert_eq!(store.usage(), (200_000, 2));
        assert!(matches!(store.get(&chunk(2, 100_000).0).expect("get"), Lookup::Miss));
        assert!(matches!(store.get(&chunk(3, 100_000).0).expect("get"), Lookup::Hit(_)));
        assert!(matches!(store.put(&chunk(9, 300_000).0, &chunk(9, 300_000).1), Err(StoreError::TooLarge { .. })));
    }

    #[test]
    fn corrupted_chunk_is_dropped_not_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        // No RAM tier: every read comes from disk and is verified.
        let store = Store::open(dir.path(), 1 << 20, 0).expect("open");
        let (h, b) = chunk(1, 70_000);
        store.put(&h, &b).expect("put");
        let mut bad = b.to_vec();
        bad[123] ^= 0xff;
        store.db.put_cf(store.cf(CF_CHUNKS), h.as_bytes(), &bad).expect("corrupt");
        assert!(matches!(store.get(&h).expect("get"), Lookup::Corrupt));
        assert!(matches!(store.get(&h).expect("get"), Lookup::Miss));
        assert_eq!(store.usage(), (0, 0));
    }
}
