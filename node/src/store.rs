//! The chunk store: verified chunks in RocksDB, within a disk quota that counts bytes really on disk.
//!
//! Layout, under `<data-dir>/store`:
//! - Column family `chunks`: chunk hash → bytes. Every value goes to a BlobDB blob file of its own
//!   (`min_blob_size` 0, `blob_file_size` 1 byte), so the LSM tree holds only ~60-byte blob references.
//! - Column family `chunk_meta`: chunk hash → size (u32 BE) ‖ insertion sequence (u64 BE), scanned at
//!   start-up to rebuild the in-memory eviction index without touching chunk data.
//!
//! Receipts are not here: they are money, must be synced and must survive damage to the cache
//! (`receipts.rs`).
//!
//! # Why the quota holds on disk
//! A volunteer's `--cache-size` bounds the whole data directory, not only the cache's own accounting (the
//! old layout wrote every chunk to the WAL first and took several times its quota on disk). Bytes on disk are live
//! chunks + evicted chunks not yet reclaimed + LSM and bookkeeping files, and each is bounded:
//! - **No write-ahead log.** The cache is reconstructible and every read is verified, so chunk writes skip
//!   the WAL: no second copy of each chunk, and no WAL file kept alive by a rarely flushed column family.
//!   Both column families flush together (`atomic_flush`), so after a crash the index and the chunk bytes
//!   agree; a crash costs at most the unflushed memtable (refills, never a wrong byte).
//! - **One blob file per chunk.** An evicted chunk's file is deleted as soon as compaction drops its key,
//!   whatever was written next to it; no blob GC ever rewrites a live chunk (write amplification ≈ 1).
//! - **Reclaim is counted and bounded.** Bytes evicted but not yet reclaimed are counted; past
//!   [`Store::reclaim_trigger`] a background thread flushes and compacts the small `chunks` LSM, which
//!   deletes their blob files; at twice that, new puts wait for it (and are served uncached if it takes
//!   too long).
//! - **Per-chunk overhead is charged to the quota**: each chunk counts as its size + [`CHUNK_OVERHEAD`]
//!   (filesystem block rounding, blob header, index entries).
//! - **Bookkeeping is capped**: info logs roll at 512 KiB (2 kept), the MANIFEST at 1 MiB, and small write
//!   buffers and target file sizes keep RocksDB's file preallocation to a few MiB.
//! - **Everything else in the data directory** (receipts, identity, small state files) is measured by
//!   [`Store::watch_disk`]; beyond [`OTHER_FILES_BUDGET`] the cache gives way, as it does to the
//!   `--min-free-disk` floor. [`Store::disk_allowance`] is the documented sum.
//!
//! In front of RocksDB a small RAM tier, under the same LRU policy, keeps hot chunks that were verified
//! when they entered it: a popular chunk is then served without a disk read, a copy and a re-hash each time.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fog_proto::cache::{Admission, CacheIndex};
use fog_proto::ChunkHash;
use rocksdb::{
    BottommostLevelCompaction, ColumnFamilyDescriptor, CompactOptions, ErrorKind, FlushOptions, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};

pub const CF_CHUNKS: &str = "chunks";
pub const CF_META: &str = "chunk_meta";

/// Disk bytes charged per chunk besides its bytes: its blob file's last filesystem block and headers, and
/// its entries in both column families (≈ 4 KiB + 200 B; rounded up).
pub const CHUNK_OVERHEAD: u64 = 5 * 1024;
/// RocksDB's own files besides chunks: info logs, MANIFEST, OPTIONS, and file preallocation during a
/// flush or compaction.
pub const BOOKKEEPING: u64 = 8 << 20;
/// Bytes of other files in the data directory (receipts, identity, state) the cache does not give way to.
pub const OTHER_FILES_BUDGET: u64 = 4 << 20;
/// How long a put waits for reclaim before the chunk is served uncached instead.
const RECLAIM_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the chunk store at {path} is locked by another process: is another fog-node using this --data-dir?")]
    Locked { path: String },
    #[error("cannot open the chunk store at {path}: {source}")]
    Open { path: String, source: rocksdb::Error },
    #[error("cannot open the chunk store at {path}: {source}; the disk is not usable as it is (check that it is mounted, writable and has space)")]
    Unusable { path: String, source: rocksdb::Error },
    #[error("cannot remove the damaged chunk store at {path}: {source}; remove it by hand and restart")]
    Rebuild { path: String, source: std::io::Error },
    #[error("chunk store read failed: {0}")]
    Read(rocksdb::Error),
    #[error("chunk store write failed (disk full?): {0}; the chunk is served but not cached")]
    Write(rocksdb::Error),
    #[error("the cache is reclaiming disk space from evicted chunks; the chunk is served but not cached")]
    Reclaiming,
    #[error(
        "the cache holds at most {capacity} bytes now, to keep the disk's free space (--min-free-disk) and \
         room for receipts; the chunk is served but not cached"
    )]
    NoRoom { capacity: u64 },
    #[error("chunk of {size} bytes is larger than the whole cache quota of {quota} bytes")]
    TooLarge { size: u64, quota: u64 },
}

impl StoreError {
    /// Whether the operation may succeed later (a disk that fills up may drain and reclaim finishes; a
    /// locked store will not unlock by itself, nor will an oversized chunk shrink).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Read(_) | Self::Write(_) | Self::Reclaiming | Self::NoRoom { .. })
    }

    /// Whether the store's files are damaged (and rebuilding the cache is the remedy), rather than held by
    /// another process or on a disk that is read-only, full or not permitted.
    fn is_damage(&self) -> bool {
        match self {
            Self::Open { source: e, .. } | Self::Read(e) | Self::Write(e) => is_damage_error(e),
            _ => false,
        }
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    Hit(Bytes),
    Miss,
    /// The stored bytes no longer matched their hash, or could not be read back; the entry was dropped.
    Corrupt,
}

/// Where the disk went, as last measured by [`Store::watch_disk`].
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DiskUsage {
    /// Bytes allocated on disk for the whole data directory.
    pub data_dir_bytes: u64,
    /// Of which the chunk store's files.
    pub store_bytes: u64,
    /// Free bytes on the data directory's filesystem (for unprivileged users).
    pub fs_free_bytes: u64,
    /// The `--min-free-disk` floor, in bytes.
    pub min_free_bytes: u64,
    /// `--cache-size + allowance`: the data directory stays below this.
    pub limit_bytes: u64,
    /// Set when the cache holds less than `--cache-size` to keep the disk floor or the whole-directory
    /// bound: why, in words.
    pub shrunk_because: Option<String>,
    /// Set when the data directory is above its limit: what the owner should know.
    pub warning: Option<String>,
}

#[derive(Debug)]
pub struct Store {
    db: Arc<DB>,
    path: PathBuf,
    /// The configured `--cache-size`.
    quota: u64,
    index: Mutex<CacheIndex>,
    next_seq: AtomicU64,
    hot: Mutex<HotTier>,
    /// Chunks indexed whose write is in progress.
    writing: Mutex<HashSet<ChunkHash>>,
    reclaim: Arc<Reclaim>,
    reclaimer: Option<std::thread::JoinHandle<()>>,
    largest_chunk: AtomicU64,
    /// Why the store was rebuilt empty at open, if it was.
    damaged: Option<String>,
    disk: Mutex<Option<DiskUsage>>,
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

/// Bytes evicted but still on disk, and the background thread that reclaims them.
#[derive(Debug)]
struct Reclaim {
    state: Mutex<ReclaimState>,
    /// Wakes the reclaimer.
    wake: Condvar,
    /// Wakes puts waiting for room.
    done: Condvar,
    trigger: u64,
}

#[derive(Debug, Default)]
struct ReclaimState {
    pending: u64,
    stop: bool,
    runs: u64,
}

impl Reclaim {
    fn add(&self, bytes: u64) {
        let mut s = self.state.lock().expect("reclaim lock");
        s.pending += bytes;
        if s.pending >= self.trigger {
            self.wake.notify_one();
        }
    }

    /// The reclaimer: compacts whenever enough evicted bytes are pending, until told to stop.
    fn run(&self, db: &DB) {
        loop {
            let batch = {
                let mut s = self.state.lock().expect("reclaim lock");
                while !s.stop && s.pending < self.trigger {
                    s = self.wake.wait(s).expect("reclaim lock");
                }
                if s.stop {
                    return;
                }
                s.pending
            };
            // Evicted keys meet their tombstones when L0 is compacted into the bottom level; the bottom
            // level itself need not be rewritten.
            let result = compact(db, BottommostLevelCompaction::Skip).and_then(|()| healthy(db));
            let mut s = self.state.lock().expect("reclaim lock");
            match result {
                Ok(()) => {
                    s.pending -= batch;
                    s.runs += 1;
                    self.done.notify_all();
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reclaim evicted chunks' disk space; retrying in 5 s");
                    // A failing compaction (full disk?) must not spin; a stop request still ends the wait.
                    drop(self.wake.wait_timeout_while(s, Duration::from_secs(5), |s| !s.stop).expect("reclaim lock"));
                }
            }
        }
    }
}

/// Flushes both column families together and compacts the `chunks` LSM, which drops evicted keys and so
/// deletes their blob files. Cheap: the LSM holds blob references, not chunks.
fn compact(db: &DB, bottommost: BottommostLevelCompaction) -> Result<(), rocksdb::Error> {
    let (chunks, meta) = (cf(db, CF_CHUNKS), cf(db, CF_META));
    db.flush_cfs_opt(&[chunks, meta], &FlushOptions::default())?;
    let mut opts = CompactOptions::default();
    opts.set_bottommost_level_compaction(bottommost);
    db.compact_range_cf_opt(chunks, None::<&[u8]>, None::<&[u8]>, &opts);
    Ok(())
}

/// RocksDB reports a failed compaction only by entering a background-error state in which writes fail:
/// a write is the way to learn whether it did, and why.
fn healthy(db: &DB) -> Result<(), rocksdb::Error> {
    if db.property_int_value("rocksdb.background-errors")?.unwrap_or(0) == 0 {
        return Ok(());
    }
    db.delete_cf_opt(cf(db, CF_META), b"", &unsynced_without_wal())
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name).expect("column families are created at open")
}

/// State keys live apart from anything a chunk hash could be.
fn state_key(key: &str) -> Vec<u8> {
    [b"state/".as_slice(), key.as_bytes()].concat()
}

fn meta_value(size: u32, seq: u64) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&size.to_be_bytes());
    v[4..].copy_from_slice(&seq.to_be_bytes());
    v
}

fn unsynced_without_wal() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.set_sync(false);
    opts.disable_wal(true);
    opts
}

fn db_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Writes skip the WAL; flushing both families at once keeps index and chunks consistent after a crash.
    o.set_atomic_flush(true);
    o.set_max_open_files(256);
    o.set_max_log_file_size(512 << 10);
    o.set_keep_log_file_num(2);
    o.set_max_manifest_file_size(1 << 20);
    o.set_manifest_preallocation_size(64 << 10);
    // Only the small state keys ([`Store::set_state`]) go through the WAL: past this, their column family
    // is flushed, so the WAL never outgrows the disk allowance.
    o.set_max_total_wal_size(1 << 20);
    o
}

fn chunk_options() -> Options {
    let mut o = Options::default();
    o.set_enable_blob_files(true);
    o.set_min_blob_size(0);
    // A blob file is closed as soon as it reaches this size: one chunk per file.
    o.set_blob_file_size(1);
    o.set_enable_blob_gc(false);
    // Memtables hold chunks until flush (RAM on 1 GB devices); flush and compaction preallocate ~1.1×
    // these sizes on disk while they write.
    o.set_write_buffer_size(4 << 20);
    o.set_max_write_buffer_number(2);
    o.set_target_file_size_base(1 << 20);
    o
}

fn meta_options() -> Options {
    let mut o = Options::default();
    o.set_write_buffer_size(1 << 20);
    o.set_target_file_size_base(1 << 20);
    o
}

/// A RocksDB error that means another process holds the database, not that it is damaged.
pub(crate) fn is_lock_error(e: &rocksdb::Error) -> bool {
    e.kind() == ErrorKind::IOError && e.to_string().contains("lock")
}

/// A RocksDB error that says the database's files are damaged: a checksum or format failure, or a file
/// the database needs gone missing. Anything else (no permission, a read-only or full disk, a quota, too
/// many open files) is the environment: rebuilding would not help and could lose data.
pub(crate) fn is_damage_error(e: &rocksdb::Error) -> bool {
    match e.kind() {
        ErrorKind::Corruption => true,
        ErrorKind::IOError => e.to_string().contains("No such file or directory"),
        _ => false,
    }
}

/// Bytes allocated on disk under `path` (files and directories, recursively); what `du` reports.
pub fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else { return 0 };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let Ok(entries) = std::fs::read_dir(path) else { return own };
    own + entries.filter_map(Result::ok).map(|e| disk_usage(&e.path())).sum::<u64>()
}

impl Store {
    /// Opens the store at `path` with a disk `quota` and a RAM tier of `memory` bytes (0: none). A store
    /// that cannot be read back (damaged files, e.g. a dying SD card) is rebuilt empty: it is a cache.
    pub fn open(path: &Path, quota: u64, memory: u64) -> Result<Self, StoreError> {
        match Self::open_checked(path, quota, memory) {
            Ok(store) => Ok(store),
            Err(e) if !e.is_damage() => Err(e),
            Err(damage) => {
                let why = damage.to_string();
                tracing::error!(error = %why, "the chunk cache is damaged; rebuilding it empty (chunks will be refetched)");
                std::fs::remove_dir_all(path)
                    .map_err(|source| StoreError::Rebuild { path: path.display().to_string(), source })?;
                let mut store = Self::open_checked(path, quota, memory)?;
                store.damaged = Some(why);
                Ok(store)
            }
        }
    }

    /// Opens the store and reads all of its index back (the `chunk_meta` scan, and a compaction that
    /// rewrites the `chunks` LSM: damage there shows now, not as a failed write later).
    fn open_checked(path: &Path, quota: u64, memory: u64) -> Result<Self, StoreError> {
        let db = Arc::new(open_db(path)?);
        let trigger = (4 << 20).max(quota / 1024);
        let reclaim = Arc::new(Reclaim {
            state: Mutex::new(ReclaimState::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
            trigger,
        });
        let mut store = Self {
            db: db.clone(),
            path: path.to_path_buf(),
            quota,
            index: Mutex::new(CacheIndex::new(quota)),
            next_seq: AtomicU64::new(0),
            hot: Mutex::new(HotTier { index: CacheIndex::new(memory), chunks: HashMap::new() }),
            writing: Mutex::new(HashSet::new()),
            reclaim: reclaim.clone(),
            reclaimer: None,
            largest_chunk: AtomicU64::new(0),
            damaged: None,
            disk: Mutex::new(None),
        };
        store.rebuild_index()?;
        // Reclaims whatever an earlier run (or a shrunk quota, just now) evicted before serving.
        compact(&db, BottommostLevelCompaction::Force).and_then(|()| healthy(&db)).map_err(StoreError::Write)?;
        store.reclaimer = Some(
            std::thread::Builder::new()
                .name("fog-reclaim".into())
                .spawn(move || reclaim.run(&db))
                .expect("spawning a thread"),
        );
        Ok(store)
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        cf(&self.db, name)
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
        let mut victims = Vec::new();
        let mut evicted = 0;
        {
            let mut index = self.index.lock().expect("store index lock");
            for (_, hash, size) in &entries {
                self.largest_chunk.fetch_max(u64::from(*size), Ordering::Relaxed);
                let before = index.used();
                let charged = u64::from(*size) + CHUNK_OVERHEAD;
                let evict = match index.admit(*hash, charged) {
                    Admission::Admit { evict } => {
                        evicted += before + charged - index.used();
                        evict
                    }
                    Admission::TooLarge => vec![*hash],
                    Admission::Present => vec![],
                };
                victims.extend(evict);
            }
        }
        if evicted > 0 {
            tracing::info!(evicted, quota = self.quota, "the cache quota shrank; evicted the oldest chunks");
        }
        self.next_seq.store(entries.last().map_or(0, |e| e.0 + 1), Ordering::Relaxed);
        self.db.write_opt(self.deletion(&victims), &unsynced_without_wal()).map_err(StoreError::Write)
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
        let value = match self.db.get_pinned_cf_opt(self.cf(CF_CHUNKS), hash.as_bytes(), &opts) {
            Ok(value) => value,
            Err(e) if matches!(e.kind(), ErrorKind::Corruption | ErrorKind::IOError) => {
                // A damaged blob or index block: this chunk cannot be read back; drop it and refill.
                tracing::error!(chunk = %hash, error = %e, "stored chunk cannot be read (disk damage?); dropping it");
                self.remove(hash)?;
                return Ok(Lookup::Corrupt);
            }
            Err(e) => return Err(StoreError::Read(e)),
        };
        let Some(value) = value else {
            // Indexed but gone: a write that did not survive a crash (forget it), or one being made now.
            if !self.writing.lock().expect("writing lock").contains(hash) {
                self.forget(hash);
            }
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
        let size = bytes.len() as u64;
        let charged = size + CHUNK_OVERHEAD;
        // Room to evict more is checked and taken under one lock held until the deletions are written, so
        // concurrent puts cannot together overshoot the bound on unreclaimed bytes by more than one put's
        // victims, and the reclaimer never counts bytes whose deletion it cannot yet see.
        let reclaim = self.reclaim.state.lock().expect("reclaim lock");
        let (mut reclaim, waited) = self
            .reclaim
            .done
            .wait_timeout_while(reclaim, RECLAIM_WAIT, |s| s.pending >= 2 * self.reclaim.trigger)
            .expect("reclaim lock");
        if waited.timed_out() {
            return Err(StoreError::Reclaiming);
        }
        let (evict, evicted) = {
            let mut index = self.index.lock().expect("store index lock");
            let before = index.used();
            match index.admit(*hash, charged) {
                Admission::Present => return Ok(()),
                Admission::TooLarge if index.capacity() < self.quota => {
                    return Err(StoreError::NoRoom { capacity: index.capacity() })
                }
                Admission::TooLarge => return Err(StoreError::TooLarge { size, quota: self.quota }),
                Admission::Admit { evict } => {
                    // Indexed before written: a concurrent read must not take it for a lost write.
                    self.writing.lock().expect("writing lock").insert(*hash);
                    (evict, before + charged - index.used())
                }
            }
        };
        self.largest_chunk.fetch_max(size, Ordering::Relaxed);
        let mut batch = self.deletion(&evict);
        self.hot.lock().expect("hot tier lock").insert(*hash, bytes);
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        batch.put_cf(self.cf(CF_CHUNKS), hash.as_bytes(), &bytes[..]);
        batch.put_cf(self.cf(CF_META), hash.as_bytes(), meta_value(size as u32, seq));
        let written = self.db.write_opt(batch, &unsynced_without_wal());
        self.writing.lock().expect("writing lock").remove(hash);
        match written {
            Ok(()) => {
                reclaim.pending += evicted;
                if reclaim.pending >= self.reclaim.trigger {
                    self.reclaim.wake.notify_one();
                }
                Ok(())
            }
            Err(e) => {
                self.forget(hash);
                Err(StoreError::Write(e))
            }
        }
    }

    /// A batch deleting `victims` (already out of the index) from disk; drops them from the RAM tier.
    fn deletion(&self, victims: &[ChunkHash]) -> WriteBatch {
        let mut batch = WriteBatch::default();
        let mut hot = self.hot.lock().expect("hot tier lock");
        for victim in victims {
            hot.remove(victim);
            batch.delete_cf(self.cf(CF_CHUNKS), victim.as_bytes());
            batch.delete_cf(self.cf(CF_META), victim.as_bytes());
        }
        batch
    }

    /// Drops a chunk from the index and the RAM tier; returns the bytes charged for it, if it was indexed.
    fn forget(&self, hash: &ChunkHash) -> Option<u64> {
        self.hot.lock().expect("hot tier lock").remove(hash);
        self.index.lock().expect("store index lock").remove(hash)
    }

    pub fn remove(&self, hash: &ChunkHash) -> Result<(), StoreError> {
        let charged = self.forget(hash);
        self.db.write_opt(self.deletion(&[*hash]), &unsynced_without_wal()).map_err(StoreError::Write)?;
        self.reclaim.add(charged.unwrap_or(0));
        Ok(())
    }

    /// (bytes charged, chunk count) of indexed chunks; bytes include [`CHUNK_OVERHEAD`] per chunk.
    pub fn usage(&self) -> (u64, u64) {
        let index = self.index.lock().expect("store index lock");
        (index.used(), index.len() as u64)
    }

    /// What the cache may hold now: the quota, or less while the disk floor or other files need room.
    pub fn capacity(&self) -> u64 {
        self.index.lock().expect("store index lock").capacity()
    }

    /// The configured `--cache-size`.
    pub fn quota(&self) -> u64 {
        self.quota
    }

    /// Evicted bytes that make the reclaimer run (half the bound on unreclaimed bytes).
    pub fn reclaim_trigger(&self) -> u64 {
        self.reclaim.trigger
    }

    /// How far above the quota the data directory may go, at most: RocksDB's bookkeeping, unreclaimed
    /// evicted chunks (twice the trigger, plus one put's victims: two of the largest chunks), and the
    /// other files' budget.
    pub fn disk_allowance(&self) -> u64 {
        BOOKKEEPING
            + 2 * self.reclaim.trigger
            + 2 * (self.largest_chunk.load(Ordering::Relaxed) + CHUNK_OVERHEAD)
            + OTHER_FILES_BUDGET
    }

    /// Why the cache was rebuilt empty when the node started, if it was.
    pub fn damaged(&self) -> Option<&str> {
        self.damaged.as_deref()
    }

    /// Compactions the reclaimer ran since start.
    pub fn reclaim_runs(&self) -> u64 {
        self.reclaim.state.lock().expect("reclaim lock").runs
    }

    /// The last disk measurement, if one was taken.
    pub fn disk(&self) -> Option<DiskUsage> {
        self.disk.lock().expect("disk lock").clone()
    }

    /// Measures the data directory and its filesystem, and sets what the cache may hold: the quota, less
    /// what other files in `data_dir` take beyond [`OTHER_FILES_BUDGET`], less whatever would take the
    /// filesystem's free space below `min_free` (given as a function of the filesystem's size). Blocking
    /// (walks the directory); call it from a blocking thread every few seconds.
    pub fn watch_disk(&self, data_dir: &Path, min_free: impl Fn(u64) -> u64) -> DiskUsage {
        let data_dir_bytes = disk_usage(data_dir);
        let store_bytes = disk_usage(&self.path);
        let (fs_free_bytes, fs_size) = match rustix::fs::statvfs(data_dir) {
            Ok(s) => (s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the data directory's free space; --min-free-disk not applied");
                (u64::MAX, u64::MAX)
            }
        };
        let min_free_bytes = min_free(fs_size);
        let used = self.usage().0;
        let other = data_dir_bytes.saturating_sub(store_bytes);
        let mut capacity = self.quota;
        let mut shrunk_because = None;
        let other_excess = other.saturating_sub(OTHER_FILES_BUDGET);
        if other_excess > 0 {
            capacity = capacity.saturating_sub(other_excess);
            shrunk_because = Some(format!(
                "other files in the data directory (receipts awaiting redemption, state) take {other} bytes"
            ));
        }
        // Evicting moves bytes from the store to the free space, so their sum bounds the cache: even at that
        // capacity plus its whole allowance, the floor stays free. When the owner's files grow, the least
        // recently used chunks go.
        let disk_limit = fs_free_bytes
            .saturating_add(store_bytes)
            .saturating_sub(min_free_bytes.saturating_add(self.disk_allowance()));
        if disk_limit < capacity {
            capacity = disk_limit;
            shrunk_because = Some(format!(
                "the disk has {fs_free_bytes} bytes free and --min-free-disk keeps {min_free_bytes} free"
            ));
        }
        self.set_capacity(capacity);
        let limit_bytes = self.quota + self.disk_allowance();
        let warning = (data_dir_bytes > limit_bytes).then(|| {
            format!(
                "the data directory takes {data_dir_bytes} bytes on disk, above --cache-size {} plus the {}-byte \
                 allowance; the cache accounts for {used}. Please report this (docs/operations.md)",
                self.quota,
                self.disk_allowance()
            )
        });
        if let Some(w) = &warning {
            tracing::warn!("{w}");
        }
        let usage = DiskUsage {
            data_dir_bytes,
            store_bytes,
            fs_free_bytes,
            min_free_bytes,
            limit_bytes,
            shrunk_because,
            warning,
        };
        *self.disk.lock().expect("disk lock") = Some(usage.clone());
        usage
    }

    /// Sets what the cache may hold, evicting least recently used chunks when it shrinks.
    fn set_capacity(&self, capacity: u64) {
        let (evict, freed) = {
            let mut index = self.index.lock().expect("store index lock");
            if index.capacity() == capacity {
                return;
            }
            let before = index.used();
            let evict = index.set_capacity(capacity);
            (evict, before - index.used())
        };
        if evict.is_empty() {
            return;
        }
        tracing::info!(capacity, quota = self.quota, evicted = evict.len(), "cache shrinks to leave disk room");
        if let Err(e) = self.db.write_opt(self.deletion(&evict), &unsynced_without_wal()) {
            tracing::error!(error = %e, "cannot delete evicted chunks");
        }
        self.reclaim.add(freed);
    }

    /// A small value the node keeps across restarts (the month's upload counter), if one was set.
    pub fn state(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(state_key(key)).map_err(StoreError::Read)
    }

    /// Sets a state value, in the default column family. Unlike chunks it cannot be fetched again, so it
    /// goes through the WAL, synced. A cache rebuilt after damage loses it with the chunks.
    pub fn set_state(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.put_opt(state_key(key), value, &opts).map_err(StoreError::Write)
    }

    /// Flushes memtables: without a WAL, what is not flushed is lost at exit.
    pub fn flush(&self) -> Result<(), StoreError> {
        let (chunks, meta) = (self.cf(CF_CHUNKS), self.cf(CF_META));
        self.db.flush_cfs_opt(&[chunks, meta], &FlushOptions::default()).map_err(StoreError::Write)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.reclaim.state.lock().expect("reclaim lock").stop = true;
        self.reclaim.wake.notify_all();
        if let Some(thread) = self.reclaimer.take() {
            let _ = thread.join();
        }
    }
}

/// Opens (or creates) the RocksDB instance, dropping column families of older layouts.
fn open_db(path: &Path) -> Result<DB, StoreError> {
    let opts = db_options();
    let open_err = |source: rocksdb::Error| {
        if is_lock_error(&source) {
            StoreError::Locked { path: path.display().to_string() }
        } else if is_damage_error(&source) {
            StoreError::Open { path: path.display().to_string(), source }
        } else {
            StoreError::Unusable { path: path.display().to_string(), source }
        }
    };
    let existing = if path.join("CURRENT").exists() { DB::list_cf(&opts, path).map_err(open_err)? } else { vec![] };
    // `receipts` (an older layout's) is left to `receipts.rs`, which drops it once its receipts are moved.
    let known = [CF_CHUNKS, CF_META, rocksdb::DEFAULT_COLUMN_FAMILY_NAME, crate::receipts::LEGACY_CF];
    let mut cfs = vec![
        ColumnFamilyDescriptor::new(CF_CHUNKS, chunk_options()),
        ColumnFamilyDescriptor::new(CF_META, meta_options()),
    ];
    let legacy: Vec<String> = existing.iter().filter(|n| !known.contains(&n.as_str())).cloned().collect();
    let kept = existing.iter().filter(|n| n.as_str() == crate::receipts::LEGACY_CF);
    cfs.extend(legacy.iter().chain(kept).map(|n| ColumnFamilyDescriptor::new(n, Options::default())));
    let mut db = DB::open_cf_descriptors(&opts, path, cfs).map_err(open_err)?;
    for name in legacy {
        tracing::info!(column_family = %name, "dropping a column family of an older store layout");
        db.drop_cf(&name).map_err(open_err)?;
    }
    Ok(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u8, len: usize) -> (ChunkHash, Bytes) {
        let bytes = Bytes::from(vec![i; len]);
        (ChunkHash::of(&bytes), bytes)
    }

    const CHARGED: u64 = 100_000 + CHUNK_OVERHEAD;

    #[test]
    fn put_get_evict_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let quota = 3 * CHARGED;
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
        let store = Store::open(dir.path(), 2 * CHARGED, 0).expect("reopen");
        assert_eq!(store.usage(), (2 * CHARGED, 2));
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

    /// The store directory stays within quota + allowance while many times the quota passes through, and
    /// each chunk has a blob file of its own.
    #[test]
    fn disk_stays_within_quota_and_allowance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let quota = 16 << 20;
        let store = Store::open(dir.path(), quota, 0).expect("open");
        let mut peak = 0;
        for i in 0..160u32 {
            let bytes = Bytes::from((0..1 << 20).map(|j: u32| (j ^ i).to_le_bytes()[0]).collect::<Vec<u8>>());
            let hash = ChunkHash::of(&bytes);
            store.put(&hash, &bytes).expect("put");
            peak = peak.max(disk_usage(dir.path()));
        }
        store.flush().expect("flush");
        let blobs = std::fs::read_dir(dir.path())
            .expect("read dir")
            .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "blob")))
            .count();
        let chunks = store.usage().1 as usize;
        let limit = quota + store.disk_allowance();
        assert!(peak <= limit, "store peaked at {peak} bytes on disk; quota + allowance is {limit}");
        assert!(store.reclaim_runs() > 0, "evicted chunks were never reclaimed");
        // Blob files of evicted chunks may wait for the next reclaim; none holds two chunks.
        assert!(
            blobs >= chunks && blobs <= chunks + 2 * (store.reclaim_trigger() >> 20) as usize,
            "{blobs} blob files for {chunks} chunks"
        );
    }

    #[test]
    fn damaged_store_is_rebuilt_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path(), 1 << 20, 0).expect("open");
            let (h, b) = chunk(1, 70_000);
            store.put(&h, &b).expect("put");
            store.flush().expect("flush");
        }
        let current = std::fs::read_to_string(dir.path().join("CURRENT")).expect("CURRENT");
        std::fs::write(dir.path().join(current.trim()), b"not a manifest").expect("damage the manifest");
        let store = Store::open(dir.path(), 1 << 20, 0).expect("reopen a damaged store");
        assert!(store.damaged().is_some());
        assert_eq!(store.usage(), (0, 0));
        let (h, b) = chunk(2, 70_000);
        store.put(&h, &b).expect("put after rebuild");
        assert!(matches!(store.get(&h).expect("get"), Lookup::Hit(_)));
    }

    #[test]
    fn a_locked_store_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Store::open(dir.path(), 1 << 20, 0).expect("open");
        let err = Store::open(dir.path(), 1 << 20, 0).expect_err("second open");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }

    #[test]
    fn a_disk_floor_above_the_free_space_empties_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 10 * CHARGED, 0).expect("open");
        for i in 0..10 {
            let (h, b) = chunk(i, 100_000);
            store.put(&h, &b).expect("put");
        }
        let roomy = store.watch_disk(dir.path(), |_| 0);
        assert_eq!((store.capacity(), store.usage().1), (10 * CHARGED, 10), "{roomy:?}");
        let full = store.watch_disk(dir.path(), |fs_size| fs_size);
        assert!(full.shrunk_because.is_some_and(|why| why.contains("--min-free-disk")));
        assert_eq!(store.usage(), (0, 0));
        assert!(matches!(store.put(&chunk(11, 100_000).0, &chunk(11, 100_000).1), Err(StoreError::NoRoom { .. })));
    }

    #[test]
    fn shrinking_capacity_evicts_and_reclaims() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 10 * CHARGED, 0).expect("open");
        for i in 0..10 {
            let (h, b) = chunk(i, 100_000);
            store.put(&h, &b).expect("put");
        }
        store.set_capacity(4 * CHARGED);
        assert_eq!(store.usage(), (4 * CHARGED, 4));
        assert!(matches!(store.get(&chunk(0, 100_000).0).expect("get"), Lookup::Miss));
        assert!(matches!(store.get(&chunk(9, 100_000).0).expect("get"), Lookup::Hit(_)));
    }
}
