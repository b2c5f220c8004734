//! The chunk store's throughput, write amplification and disk footprint (run by `scripts/bench/store.sh`),
//! against the layout it replaced, in the same run on the same disk.
//!
//! Workload: 1 MiB chunks of distinct content, four times the quota in all (every put evicts once the
//! cache is full), then random reads of cached chunks with the RAM tier off. Write amplification is bytes
//! the process wrote to files (`wchar` in /proc/self/io) per chunk byte stored; the footprint is the
//! store directory's allocated bytes, sampled every 10 ms.
//!   bench_store [DIR]   (default: a temporary directory under $TMPDIR)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fog_node::store::{disk_usage, Lookup, Store};
use fog_proto::cache::{Admission, CacheIndex};
use fog_proto::ChunkHash;
use fog_testkit::disk::DiskSampler;
use fog_testkit::test_bytes;

const CHUNK: usize = 1 << 20;
const QUOTA: u64 = 256 << 20;
const CHUNKS: u64 = 4 * QUOTA / CHUNK as u64;
const READS: usize = 1000;

/// The layout before: chunks written through the WAL (unsynced), 64 MiB blob files with blob GC, a rarely
/// written receipts column family in the same database, no bound on WAL size.
struct OldLayout {
    db: rocksdb::DB,
    index: CacheIndex,
}

impl OldLayout {
    fn open(path: &Path) -> Self {
        let mut db_opts = rocksdb::Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_open_files(256);
        db_opts.set_keep_log_file_num(3);
        let mut chunk_opts = rocksdb::Options::default();
        chunk_opts.set_enable_blob_files(true);
        chunk_opts.set_min_blob_size(64 * 1024);
        chunk_opts.set_blob_file_size(64 << 20);
        chunk_opts.set_enable_blob_gc(true);
        chunk_opts.set_write_buffer_size(16 << 20);
        chunk_opts.set_max_write_buffer_number(2);
        let cfs = ["chunks", "chunk_meta", "receipts"].map(|name| {
            let opts = if name == "chunks" { chunk_opts.clone() } else { rocksdb::Options::default() };
            rocksdb::ColumnFamilyDescriptor::new(name, opts)
        });
        let db = rocksdb::DB::open_cf_descriptors(&db_opts, path, cfs).expect("open old layout");
        Self { db, index: CacheIndex::new(QUOTA) }
    }

    fn put(&mut self, hash: &ChunkHash, bytes: &Bytes) {
        let Admission::Admit { evict } = self.index.admit(*hash, bytes.len() as u64) else { return };
        let (chunks, meta) = (self.db.cf_handle("chunks").expect("cf"), self.db.cf_handle("chunk_meta").expect("cf"));
        let mut batch = rocksdb::WriteBatch::default();
        for victim in evict {
            batch.delete_cf(chunks, victim.as_bytes());
            batch.delete_cf(meta, victim.as_bytes());
        }
        batch.put_cf(chunks, hash.as_bytes(), &bytes[..]);
        batch.put_cf(meta, hash.as_bytes(), (bytes.len() as u32).to_be_bytes());
        self.db.write(batch).expect("write");
    }

    fn get(&self, hash: &ChunkHash) -> bool {
        let chunks = self.db.cf_handle("chunks").expect("cf");
        let value = self.db.get_pinned_cf(chunks, hash.as_bytes()).expect("read");
        value.is_some_and(|v| ChunkHash::of(&v) == *hash)
    }
}

fn chunk(i: u64) -> Bytes {
    Bytes::from(test_bytes(CHUNK, i))
}

/// Bytes this process has written to files so far.
fn written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

struct Result {
    write_mb_s: f64,
    read_mb_s: f64,
    write_amp: f64,
    peak: u64,
    idle: u64,
}

fn run(dir: &Path, put: &mut dyn FnMut(&ChunkHash, &Bytes), get: &dyn Fn(&ChunkHash) -> bool) -> Result {
    let hashes: Vec<(u64, ChunkHash)> = (0..CHUNKS).map(|i| (i, ChunkHash::of(&chunk(i)))).collect();
    let peak = DiskSampler::start(dir.to_path_buf(), Duration::from_millis(10));
    let written_before = written();
    let started = Instant::now();
    for (i, hash) in &hashes {
        put(hash, &chunk(*i));
    }
    let write_secs = started.elapsed().as_secs_f64();
    let stored = CHUNKS * CHUNK as u64;
    let write_amp = (written() - written_before) as f64 / stored as f64;
    // Reads among the chunks the last quarter of the run cached.
    let recent = &hashes[hashes.len() - (QUOTA as usize / CHUNK) / 2..];
    let mut x = 7u64;
    let started = Instant::now();
    for _ in 0..READS {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let (_, hash) = recent[(x >> 33) as usize % recent.len()];
        assert!(get(&hash), "a cached chunk did not read back");
    }
    let read_secs = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(2));
    let peak = peak.take_peak();
    let mb = |bytes: f64, secs: f64| bytes / secs / 1e6;
    Result {
        write_mb_s: mb(stored as f64, write_secs),
        read_mb_s: mb((READS * CHUNK) as f64, read_secs),
        write_amp,
        peak,
        idle: disk_usage(dir),
    }
}

fn main() {
    let base = std::env::args().nth(1).map(PathBuf::from);
    let tmp = tempfile::tempdir_in(base.unwrap_or_else(std::env::temp_dir)).expect("temporary directory");
    println!(
        "{} chunks of 1 MiB through a {} MiB quota ({}× the quota), then {READS} random reads, RAM tier off",
        CHUNKS,
        QUOTA >> 20,
        CHUNKS * CHUNK as u64 / QUOTA
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "layout", "write MB/s", "read MB/s", "write amp", "peak MiB", "idle MiB"
    );
    let print = |name: &str, r: &Result| {
        println!(
            "{name:<34} {:>10.0} {:>10.0} {:>10.2} {:>12.0} {:>12.0}",
            r.write_mb_s,
            r.read_mb_s,
            r.write_amp,
            r.peak as f64 / f64::from(1 << 20),
            r.idle as f64 / f64::from(1 << 20)
        )
    };

    let old_dir = tmp.path().join("old");
    let old = std::cell::RefCell::new(OldLayout::open(&old_dir));
    let r = run(&old_dir, &mut |h, b| old.borrow_mut().put(h, b), &|h| old.borrow().get(h));
    print("before: WAL, 64 MiB blob files + GC", &r);
    drop(old);

    let new_dir = tmp.path().join("new");
    let store = Store::open(&new_dir, QUOTA, 0).expect("open store");
    let r = run(&new_dir, &mut |h, b| store.put(h, b).expect("put"), &|h| {
        matches!(store.get(h).expect("get"), Lookup::Hit(_))
    });
    print("now: no WAL, a blob file per chunk", &r);
    println!("limit for the new layout: quota + allowance = {} MiB", (QUOTA + store.disk_allowance()) >> 20);
}
