//! The store traits over a single tracker's embedded RocksDB ([`Db`]): the on-disk format stays what it
//! was, so existing trackers open unchanged. RocksDB calls block (synced writes wait for the disk), so each
//! runs on the blocking pool.

use std::collections::HashSet;
use std::sync::Arc;

use fog_proto::NodeId;

use super::{AdminStore, Inserted, ManifestStore, StoreError, StoreFuture, StoredManifest};
use crate::db::{Db, DbError};

#[derive(Debug, Clone)]
pub struct RocksStore {
    db: Arc<Db>,
}

impl RocksStore {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
    }

    /// Runs `f` on the database off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        Ok(tokio::task::spawn_blocking(move || f(&db)).await.map_err(DbError::from)??)
    }
}

impl ManifestStore for RocksStore {
    fn get<'a>(&'a self, url: &'a str) -> StoreFuture<'a, Option<StoredManifest>> {
        let url = url.to_string();
        Box::pin(self.blocking(move |db| db.manifest(&url)))
    }

    fn put<'a>(&'a self, stored: &'a StoredManifest) -> StoreFuture<'a, bool> {
        let stored = stored.clone();
        Box::pin(self.blocking(move |db| {
            let new = db.manifest(&stored.manifest.url)?.is_none();
            db.put_manifest(&stored).map(|()| new)
        }))
    }

    fn insert<'a>(&'a self, stored: &'a StoredManifest) -> StoreFuture<'a, Inserted> {
        let stored = stored.clone();
        Box::pin(self.blocking(move |db| match db.manifest(&stored.manifest.url)? {
            None => db.put_manifest(&stored).map(|()| Inserted::New),
            Some(there) if there == stored => Ok(Inserted::Same),
            Some(there) => Ok(Inserted::Conflict(Box::new(there))),
        }))
    }

    fn count(&self) -> StoreFuture<'_, u64> {
        Box::pin(self.blocking(Db::count_manifests))
    }

    fn page<'a>(&'a self, after: Option<&'a str>, limit: usize) -> StoreFuture<'a, Vec<StoredManifest>> {
        let after = after.map(str::to_string);
        Box::pin(self.blocking(move |db| db.manifests_after(after.as_deref(), limit)))
    }

    fn shared(&self) -> bool {
        false
    }
}

impl AdminStore for RocksStore {
    fn blocked_nodes(&self) -> StoreFuture<'_, HashSet<NodeId>> {
        Box::pin(self.blocking(Db::blocked_nodes))
    }

    fn set_blocked<'a>(&'a self, id: &'a NodeId, blocked: bool) -> StoreFuture<'a, ()> {
        let id = *id;
        Box::pin(self.blocking(move |db| db.set_blocked(&id, blocked)))
    }
}
