//! The tracker's durable state behind traits, each with two implementations: the embedded RocksDB of a
//! single tracker ([`rocks`], today's on-disk format) and PostgreSQL for the replicas of a cell ([`pg`],
//! `--postgres`). Manifests go through a per-replica in-memory cache ([`cache`]) that serves resolves without
//! the database and holds writes while the database is unavailable. The ledger has its own trait
//! (`crate::ledger`).
//!
//! - [`ManifestStore`]: manifests by URL (durable writes, a count, paging for export).
//! - [`AdminStore`]: the operator's block list.

pub mod cache;
pub mod pg;
pub mod rocks;

#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fog_proto::NodeId;

pub use crate::db::StoredManifest;
use crate::db::{Db, DbError};
pub use cache::{ManifestCache, StoreMetrics};
use pg::PgError;

/// What a store's operations return: boxed, so that the tracker picks an implementation at start.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Rocks(#[from] DbError),
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The database did not answer in time (failing over, or unreachable without a reset).
    #[error("tracker database did not answer within {0:?}")]
    NoAnswer(std::time::Duration),
    /// The database is unavailable and the writes held for it fill their bound.
    #[error("tracker database unavailable and {held} manifest writes already wait for it; retry shortly")]
    PendingFull { held: usize },
    /// Export found a different manifest for a URL in the destination.
    #[error("{url}: the destination holds a different manifest (content {theirs}, ours {ours}); not overwritten")]
    Conflict { url: String, ours: String, theirs: String },
}

impl StoreError {
    /// Whether the same operation may succeed later (the database is failing over, a disk filled up).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Rocks(e) => !matches!(e, DbError::Open { .. } | DbError::Corrupt { .. }),
            Self::Pg(e) => e.is_retryable(),
            Self::NoAnswer(_) | Self::PendingFull { .. } => true,
            Self::Conflict { .. } => false,
        }
    }
}

/// What [`ManifestStore::insert`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// There was none for the URL: stored.
    New,
    /// An identical one was there already.
    Same,
    /// A different one is there; it was left as it is.
    Conflict(Box<StoredManifest>),
}

/// Manifests by (canonical) URL.
pub trait ManifestStore: Send + Sync + std::fmt::Debug {
    fn get<'a>(&'a self, url: &'a str) -> StoreFuture<'a, Option<StoredManifest>>;
    /// Stores `stored` under its URL, replacing any, durably (synced or committed) before returning;
    /// whether the URL was new.
    fn put<'a>(&'a self, stored: &'a StoredManifest) -> StoreFuture<'a, bool>;
    /// Stores `stored` only if its URL has none: what an export does, never overwriting.
    fn insert<'a>(&'a self, stored: &'a StoredManifest) -> StoreFuture<'a, Inserted>;
    fn count(&self) -> StoreFuture<'_, u64>;
    /// Up to `limit` manifests with URLs after `after` (bytewise), in that order: paging through all.
    fn page<'a>(&'a self, after: Option<&'a str>, limit: usize) -> StoreFuture<'a, Vec<StoredManifest>>;
    /// Whether other trackers write the same store, so that counts kept in memory drift.
    fn shared(&self) -> bool;
}

/// The operator's state: nodes blocked from scheduling.
pub trait AdminStore: Send + Sync + std::fmt::Debug {
    fn blocked_nodes(&self) -> StoreFuture<'_, HashSet<NodeId>>;
    /// Durable before returning; blocking a blocked node, or unblocking one that is not, changes nothing.
    fn set_blocked<'a>(&'a self, id: &'a NodeId, blocked: bool) -> StoreFuture<'a, ()>;
}

/// The stores a tracker runs with, and what it reads from them at start.
#[derive(Debug, Clone)]
pub struct Stores {
    pub manifests: Arc<dyn ManifestStore>,
    pub admin: Arc<dyn AdminStore>,
    /// Manifests stored, at open.
    pub manifest_count: u64,
    /// The block list, at open.
    pub blocked: HashSet<NodeId>,
}

impl Stores {
    /// A single tracker's stores, in its embedded database.
    pub async fn embedded(db: Arc<Db>) -> Result<Stores, StoreError> {
        let store = Arc::new(rocks::RocksStore::new(db));
        Self::load(store.clone(), store).await
    }

    /// A replica's stores, in PostgreSQL at `conn` (libpq key=value or URL form; several hosts follow a
    /// failover). Creates or migrates the schema.
    pub async fn postgres(conn: &str) -> Result<Stores, StoreError> {
        let store = Arc::new(pg::PgStore::connect(conn).await?);
        Self::load(store.clone(), store).await
    }

    async fn load(manifests: Arc<dyn ManifestStore>, admin: Arc<dyn AdminStore>) -> Result<Stores, StoreError> {
        let manifest_count = manifests.count().await?;
        let blocked = admin.blocked_nodes().await?;
        Ok(Stores { manifests, admin, manifest_count, blocked })
    }
}

/// Manifests read per page by [`export`]: a page is held in memory at once.
const EXPORT_PAGE: usize = 64;

/// What [`export`] copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Exported {
    pub manifests_new: u64,
    /// Already there, identical (an export run again).
    pub manifests_same: u64,
    pub blocked_nodes: u64,
}

/// Copies manifests and the block list from `from` into `to` without overwriting: an identical manifest
/// already there is skipped, a different one stops the export with [`StoreError::Conflict`] (what was
/// copied before stays; running again after resolving it continues). Blocks are added to those there.
pub async fn export(from: &Stores, to: &Stores) -> Result<Exported, StoreError> {
    let mut out = Exported::default();
    let mut after: Option<String> = None;
    loop {
        let page = from.manifests.page(after.as_deref(), EXPORT_PAGE).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.manifest.url.clone());
        for stored in &page {
            match to.manifests.insert(stored).await? {
                Inserted::New => out.manifests_new += 1,
                Inserted::Same => out.manifests_same += 1,
                Inserted::Conflict(theirs) => {
                    return Err(StoreError::Conflict {
                        url: stored.manifest.url.clone(),
                        ours: stored.manifest.content_id().to_string(),
                        theirs: theirs.manifest.content_id().to_string(),
                    })
                }
            }
        }
    }
    for id in from.admin.blocked_nodes().await? {
        to.admin.set_blocked(&id, true).await?;
        out.blocked_nodes += 1;
    }
    Ok(out)
}
