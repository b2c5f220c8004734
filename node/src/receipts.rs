//! Receipts awaiting redemption, on disk apart from the chunk cache.
//!
//! They are money: each write is synced through RocksDB's WAL, and they live in their own small database
//! (`<data-dir>/receipts`) so that damage to the cache, which is rebuilt empty, cannot take them. A
//! receipts database that does not open is repaired (RocksDB's repairer salvages what its files still
//! hold); if even that fails it is moved aside, not deleted, and the node starts with none.
//! Write buffers are small so the WAL, which holds only receipts, stays around 1 MiB.
//!
//! Beside the receipts (the default column family, keyed by chain id) are the tracker-signed tickets they
//! were made under (`tickets`, keyed by ticket id): the tracker keeps no tickets, so a receipt is redeemed
//! with its ticket. A ticket is written with the first receipt that brings it and deleted with the last
//! receipt naming it, in the same synced writes.

use std::path::{Path, PathBuf};

use fog_proto::credits::{ChainId, TicketId};
use rocksdb::{DBRecoveryMode, IteratorMode, Options, WriteBatch, WriteOptions, DB};

use crate::store::{is_damage_error, is_lock_error};

/// Receipts held at most: beyond this (a tracker unreachable for long on a busy node) new chains are
/// refused until redemption catches up; about 1 KiB each on disk.
pub const MAX_HELD: u64 = 16_384;

/// The column family receipts lived in inside the chunk store before they moved here.
pub(crate) const LEGACY_CF: &str = "receipts";
/// The tickets held receipts name, by ticket id.
const TICKETS_CF: &str = "tickets";

#[derive(Debug, thiserror::Error)]
pub enum ReceiptsError {
    #[error("the receipts database at {path} is locked: is another fog-node using this --data-dir?")]
    Locked { path: String },
    #[error("cannot open the receipts database at {path}: {source}; check that the disk is mounted and writable")]
    Open { path: String, source: rocksdb::Error },
    #[error("cannot move the damaged receipts database at {path} aside: {source}")]
    MoveAside { path: String, source: std::io::Error },
    #[error("receipts database failed: {0}")]
    Db(#[from] rocksdb::Error),
}

impl ReceiptsError {
    /// Whether trying again may help (a full disk may drain; a lock or a broken disk will not go away).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Db(_))
    }
}

#[derive(Debug)]
pub struct ReceiptDb {
    db: DB,
    /// What happened when the database did not open cleanly, for the log and the status page.
    recovered: Option<String>,
}

fn options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    // Databases from before tickets were kept here gain the column family.
    o.create_missing_column_families(true);
    // A torn last write (power cut mid-append) is dropped. Damage before the tail fails the open instead
    // of silently dropping every later receipt, and the repairer then salvages each intact record.
    o.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
    o.set_write_buffer_size(1 << 20);
    o.set_max_write_buffer_number(2);
    o.set_target_file_size_base(1 << 20);
    o.set_max_log_file_size(256 << 10);
    o.set_keep_log_file_num(2);
    o.set_max_manifest_file_size(1 << 20);
    o.set_manifest_preallocation_size(64 << 10);
    o
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

impl ReceiptDb {
    /// Opens the receipts database at `path`, repairing or setting aside a damaged one, and takes over
    /// receipts still held by an older chunk store at `legacy_store`.
    pub fn open(path: &Path, legacy_store: &Path) -> Result<Self, ReceiptsError> {
        let display = path.display().to_string();
        let (db, recovered) = match open_checked(path) {
            Ok(db) => (db, None),
            Err(e) if is_lock_error(&e) => return Err(ReceiptsError::Locked { path: display }),
            Err(e) if !is_damage_error(&e) => return Err(ReceiptsError::Open { path: display, source: e }),
            Err(damage) => {
                tracing::error!(error = %damage, "the receipts database is damaged; repairing it");
                let repaired = DB::repair(&options(), path).and_then(|()| open_checked(path));
                match repaired {
                    Ok(db) => (db, Some(format!("receipts database was damaged ({damage}) and repaired"))),
                    Err(e) => {
                        let aside = moved_aside(path);
                        std::fs::rename(path, &aside)
                            .map_err(|source| ReceiptsError::MoveAside { path: display.clone(), source })?;
                        let why = format!(
                            "receipts database was damaged beyond repair ({e}); moved to {} and started empty",
                            aside.display()
                        );
                        tracing::error!("{why}");
                        let db = open_db(path).map_err(|source| ReceiptsError::Open { path: display, source })?;
                        (db, Some(why))
                    }
                }
            }
        };
        let receipts = Self { db, recovered };
        receipts.take_legacy(legacy_store);
        Ok(receipts)
    }

    /// What happened at open if the database was damaged.
    pub fn recovered(&self) -> Option<&str> {
        self.recovered.as_deref()
    }

    pub fn get(&self, chain_id: &ChainId) -> Result<Option<Vec<u8>>, ReceiptsError> {
        Ok(self.db.get(key(chain_id))?)
    }

    fn tickets(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(TICKETS_CF).expect("opened with the tickets column family")
    }

    /// The ticket (JSON of the tracker-signed ticket) held under `id`.
    pub fn ticket(&self, id: &TicketId) -> Result<Option<Vec<u8>>, ReceiptsError> {
        Ok(self.db.get_cf(self.tickets(), id.as_bytes())?)
    }

    /// Stores a receipt (its chain id and JSON) and a ticket to keep with it (its id and JSON), either or
    /// both, in one write synced to disk before it returns. Blocking.
    pub fn put(
        &self,
        receipt: Option<(&ChainId, &[u8])>,
        ticket: Option<(&TicketId, &[u8])>,
    ) -> Result<(), ReceiptsError> {
        let mut batch = WriteBatch::default();
        if let Some((id, json)) = receipt {
            batch.put(key(id), json);
        }
        if let Some((id, json)) = ticket {
            batch.put_cf(self.tickets(), id.as_bytes(), json);
        }
        Ok(self.db.write_opt(batch, &synced())?)
    }

    /// Deletes settled receipts, and the tickets no receipt names any more, in one synced write. Blocking.
    pub fn delete_all(&self, chain_ids: &[ChainId], tickets: &[TicketId]) -> Result<(), ReceiptsError> {
        let mut batch = WriteBatch::default();
        for id in chain_ids {
            batch.delete(key(id));
        }
        for id in tickets {
            batch.delete_cf(self.tickets(), id.as_bytes());
        }
        Ok(self.db.write_opt(batch, &synced())?)
    }

    /// The ids of the tickets held.
    pub fn ticket_ids(&self) -> Vec<TicketId> {
        let ids = self.db.iterator_cf(self.tickets(), IteratorMode::Start).filter_map(Result::ok);
        ids.filter_map(|(k, _)| <[u8; 32]>::try_from(&*k).ok().map(TicketId)).collect()
    }

    /// Up to `n` held receipts' JSON, in key order; unreadable entries are skipped.
    pub fn first(&self, n: usize) -> Vec<Vec<u8>> {
        self.db.iterator(IteratorMode::Start).filter_map(Result::ok).take(n).map(|(_, v)| v.to_vec()).collect()
    }

    pub fn count(&self) -> u64 {
        self.db.iterator(IteratorMode::Start).filter(Result::is_ok).count() as u64
    }

    /// Moves receipts an older node kept in the chunk store's `receipts` column family into this database,
    /// then drops that column family (only once every receipt is copied; otherwise it stays, and the move
    /// is tried again at the next start).
    fn take_legacy(&self, store: &Path) {
        let opts = Options::default();
        let Ok(families) = DB::list_cf(&opts, store) else { return };
        if !families.iter().any(|f| f == LEGACY_CF) {
            return;
        }
        let moved = DB::open_cf(&opts, store, &families).and_then(|mut old| {
            let cf = old.cf_handle(LEGACY_CF).expect("listed");
            let mut n = 0;
            for item in old.iterator_cf(cf, IteratorMode::Start) {
                let (k, v) = item?;
                if self.db.get(&k)?.is_none() {
                    self.db.put_opt(&k, &v, &synced())?;
                    n += 1;
                }
            }
            old.drop_cf(LEGACY_CF)?;
            Ok(n)
        });
        match moved {
            Ok(n) => tracing::info!(receipts = n, "moved held receipts out of the chunk store"),
            Err(e) => {
                tracing::error!(error = %e, "cannot move held receipts out of the old chunk store; trying again at the next start")
            }
        }
    }
}

/// Receipts are keyed by their chain id's hex form, as they always were: held receipts survive upgrades.
fn key(chain_id: &ChainId) -> String {
    chain_id.to_hex()
}

fn open_db(path: &Path) -> Result<DB, rocksdb::Error> {
    DB::open_cf(&options(), path, [TICKETS_CF])
}

/// Opens the database and reads every record once, so damage shows now rather than at redemption.
fn open_checked(path: &Path) -> Result<DB, rocksdb::Error> {
    let db = open_db(path)?;
    for item in db.iterator(IteratorMode::Start) {
        item?;
    }
    let tickets = db.cf_handle(TICKETS_CF).expect("opened with the tickets column family");
    for item in db.iterator_cf(tickets, IteratorMode::Start) {
        item?;
    }
    Ok(db)
}

/// A free name beside `path` for a damaged database: `receipts.damaged-<unix seconds>`.
fn moved_aside(path: &Path) -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".damaged-{secs}"));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_survive_a_damaged_table_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, legacy) = (dir.path().join("receipts"), dir.path().join("store"));
        {
            let r = ReceiptDb::open(&path, &legacy).expect("open");
            for i in 0..200 {
                r.put(Some((&ChainId([i; 16]), format!("{{\"n\":{i}}}").as_bytes())), None).expect("put");
            }
            r.db.flush().expect("flush");
            r.put(Some((&ChainId([255; 16]), b"{}")), Some((&TicketId([1; 32]), b"{}"))).expect("put after flush");
        }
        // Damage the middle of every table file (as a dying SD card would).
        for e in std::fs::read_dir(&path).expect("dir").filter_map(Result::ok) {
            if e.path().extension().is_some_and(|x| x == "sst") {
                let mut bytes = std::fs::read(e.path()).expect("read");
                let mid = bytes.len() / 3;
                bytes[mid] ^= 0x55;
                std::fs::write(e.path(), bytes).expect("write");
            }
        }
        let r = ReceiptDb::open(&path, &legacy).expect("reopen damaged");
        assert!(r.recovered().is_some(), "damage went unnoticed");
        // The write that only reached the WAL is always kept; what the repairer salvages of the table varies.
        assert!(r.get(&ChainId([255; 16])).expect("get").is_some());
        assert!(r.ticket(&TicketId([1; 32])).expect("get").is_some());
    }

    #[test]
    fn legacy_receipts_move_out_of_the_chunk_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, legacy) = (dir.path().join("receipts"), dir.path().join("store"));
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let old = DB::open_cf(&opts, &legacy, [LEGACY_CF]).expect("old store");
            let cf = old.cf_handle(LEGACY_CF).expect("cf");
            old.put_cf(cf, ChainId([7; 16]).to_hex(), b"{\"old\":1}").expect("put");
        }
        let r = ReceiptDb::open(&path, &legacy).expect("open");
        assert_eq!(r.get(&ChainId([7; 16])).expect("get").as_deref(), Some(&b"{\"old\":1}"[..]));
        let store = crate::store::Store::open(&legacy, 1 << 20, 0).expect("the chunk store opens");
        drop(store);
        assert!(!DB::list_cf(&Options::default(), &legacy).expect("list").iter().any(|f| f == LEGACY_CF));
    }
}
