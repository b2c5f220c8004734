//! A single tracker's persistence in RocksDB: manifests by URL, the operator's block list and the ledger's
//! column families. `crate::store::rocks` puts the first two behind the store traits; replicas of a cell
//! keep them in PostgreSQL instead. Node registrations are soft state kept in memory: after a tracker
//! restart nodes learn from their next heartbeat that they must register again.

use std::collections::HashSet;
use std::path::Path;

use fog_proto::{Manifest, NodeId};
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, DB};
use serde::{Deserialize, Serialize};

const CF_MANIFESTS: &str = "manifests";
/// Nodes the operator blocked: node id → empty value.
const CF_BLOCKED: &str = "blocked_nodes";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot open tracker database at {path}: {source}; is another fog-tracker using this --data-dir?")]
    Open { path: String, source: rocksdb::Error },
    #[error("tracker database: {0}")]
    Io(#[from] rocksdb::Error),
    /// The blocking task that ran a write was cancelled or panicked.
    #[error("tracker database task: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("stored manifest for {url} is unreadable: {source}")]
    Corrupt { url: String, source: serde_json::Error },
}

/// A manifest and when it was ingested or published (ms since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredManifest {
    pub manifest: Manifest,
    pub ingested_at_ms: u64,
    /// Built by the publisher, not by reading the object: a client's report that it is wrong is acted on
    /// at once.
    #[serde(default)]
    pub published: bool,
}

#[derive(Debug)]
pub struct Db {
    db: DB,
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_keep_log_file_num(3);
        let cfs = [CF_MANIFESTS, CF_BLOCKED]
            .into_iter()
            .chain(crate::ledger::COLUMN_FAMILIES)
            .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, path, cfs)
            .map_err(|source| DbError::Open { path: path.display().to_string(), source })?;
        Ok(Self { db })
    }

    fn manifests(&self) -> &rocksdb::ColumnFamily {
        self.cf(CF_MANIFESTS)
    }

    /// A column family created at open.
    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }

    pub(crate) fn raw(&self) -> &DB {
        &self.db
    }

    pub fn manifest(&self, url: &str) -> Result<Option<StoredManifest>, DbError> {
        let Some(bytes) = self.db.get_pinned_cf(self.manifests(), url.as_bytes())? else { return Ok(None) };
        serde_json::from_slice(&bytes).map(Some).map_err(|source| DbError::Corrupt { url: url.to_string(), source })
    }

    /// Durable (synced) write: a manifest handed to clients must survive a crash.
    pub fn put_manifest(&self, stored: &StoredManifest) -> Result<(), DbError> {
        let value = serde_json::to_vec(stored).expect("manifests serialise");
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.put_cf_opt(self.manifests(), stored.manifest.url.as_bytes(), value, &opts)?;
        Ok(())
    }

    /// Up to `limit` manifests with URLs after `after` (all from the first with `None`), in key order.
    pub fn manifests_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<StoredManifest>, DbError> {
        let start =
            after.map_or(IteratorMode::Start, |a| IteratorMode::From(a.as_bytes(), rocksdb::Direction::Forward));
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.manifests(), start) {
            let (key, value) = item?;
            if after.is_some_and(|a| *key == *a.as_bytes()) {
                continue;
            }
            if out.len() == limit {
                break;
            }
            let url = String::from_utf8_lossy(&key).into_owned();
            out.push(serde_json::from_slice(&value).map_err(|source| DbError::Corrupt { url, source })?);
        }
        Ok(out)
    }

    pub fn blocked_nodes(&self) -> Result<HashSet<NodeId>, DbError> {
        let cf = self.db.cf_handle(CF_BLOCKED).expect("created at open");
        let mut out = HashSet::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item?;
            if let Ok(id) = <[u8; 32]>::try_from(&*k) {
                out.insert(NodeId(id));
            }
        }
        Ok(out)
    }

    pub fn set_blocked(&self, id: &NodeId, blocked: bool) -> Result<(), DbError> {
        let cf = self.db.cf_handle(CF_BLOCKED).expect("created at open");
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        if blocked {
            self.db.put_cf_opt(cf, id.as_bytes(), [], &opts)?;
        } else {
            self.db.delete_cf_opt(cf, id.as_bytes(), &opts)?;
        }
        Ok(())
    }

    pub fn count_manifests(&self) -> Result<u64, DbError> {
        let mut n = 0;
        for item in self.db.iterator_cf(self.manifests(), IteratorMode::Start) {
            item?;
            n += 1;
        }
        Ok(n)
    }
}
