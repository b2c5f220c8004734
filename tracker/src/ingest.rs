//! Ingest: fetch an origin object once, split it into fixed-size chunks, hash each with BLAKE3 and keep
//! the manifest. Concurrent requests for one URL share a single fetch. The object streams through; only
//! the hashes are kept, so memory does not grow with object size.

use std::sync::Arc;
use std::time::Duration;

use fog_net::origin::{OriginClient, OriginError};
use fog_net::single_flight::SingleFlight;
use fog_proto::manifest::ManifestBuilder;
use fog_proto::{ContentId, Manifest};
use tokio::sync::Semaphore;

use crate::db::{Db, DbError, StoredManifest};

#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Origin(#[from] OriginError),
    /// Shared: one ingest's outcome goes to every client that waited on it.
    #[error(transparent)]
    Db(Arc<DbError>),
    #[error("too many ingests in progress; retry shortly")]
    Busy,
}

impl IngestError {
    /// Whether ingesting again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Origin(e) => e.is_retryable(),
            Self::Db(_) | Self::Busy => true,
        }
    }
}

#[derive(Debug)]
pub struct Ingest {
    origin: OriginClient,
    db: Arc<Db>,
    chunk_size: u32,
    max_object_size: u64,
    /// A manifest younger than this is not re-ingested on a client's "stale" report.
    min_reingest_age: Duration,
    /// One ingest per URL however many clients ask at once.
    in_flight: SingleFlight<String, Result<Arc<Manifest>, IngestError>>,
    slots: Semaphore,
}

/// What [`Ingest::manifest`] did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Stored,
    Ingested,
}

use fog_proto::api::now_ms;

impl Ingest {
    pub fn new(origin: OriginClient, db: Arc<Db>, cfg: &crate::config::TrackerConfig, max_concurrent: usize) -> Self {
        Self {
            origin,
            db,
            chunk_size: cfg.chunk_size,
            max_object_size: cfg.max_object_size,
            min_reingest_age: cfg.min_reingest_age,
            in_flight: SingleFlight::default(),
            slots: Semaphore::new(max_concurrent),
        }
    }

    /// The manifest for `url`, ingesting it on first use. `stale`: the client found the origin no longer
    /// matches this content id; if it is still the stored one (and not brand new) the object is re-ingested.
    /// Whether a manifest for `url` is stored (so a resolve will not ingest, unless the client reports
    /// the object stale).
    pub fn is_stored(&self, url: &str) -> bool {
        self.db.manifest(url).is_ok_and(|m| m.is_some())
    }

    pub async fn manifest(&self, url: &str, stale: Option<ContentId>) -> Result<(Arc<Manifest>, Origin), IngestError> {
        if let Some(stored) = self.db.manifest(url).map_err(|e| IngestError::Db(Arc::new(e)))? {
            let id = stored.manifest.content_id();
            let young = now_ms().saturating_sub(stored.ingested_at_ms) < self.min_reingest_age.as_millis() as u64;
            if stale != Some(id) || young {
                return Ok((Arc::new(stored.manifest), Origin::Stored));
            }
            tracing::info!(url, stale = %id, "client reports the origin object changed; re-ingesting");
        }
        let manifest = self.in_flight.run(url.to_string(), || self.ingest_and_store(url)).await?;
        Ok((manifest, Origin::Ingested))
    }

    async fn ingest_and_store(&self, url: &str) -> Result<Arc<Manifest>, IngestError> {
        let _slot = self.slots.try_acquire().map_err(|_| IngestError::Busy)?;
        let manifest = self.ingest(url).await.inspect_err(|e| tracing::warn!(url, error = %e, "ingest failed"))?;
        let stored = StoredManifest { manifest, ingested_at_ms: now_ms() };
        // A synced write: off the async workers.
        let db = self.db.clone();
        let stored = tokio::task::spawn_blocking(move || db.put_manifest(&stored).map(|()| stored))
            .await
            .map_err(DbError::from)
            .and_then(|put| put)
            .map_err(|e| IngestError::Db(Arc::new(e)))?;
        tracing::info!(
            url,
            size = stored.manifest.size,
            chunks = stored.manifest.chunks.len(),
            content_id = %stored.manifest.content_id(),
            "ingested"
        );
        Ok(Arc::new(stored.manifest))
    }

    async fn ingest(&self, url: &str) -> Result<Manifest, IngestError> {
        let mut body = self.origin.get(url, self.max_object_size).await?;
        let mut manifest = ManifestBuilder::new(self.chunk_size);
        while let Some(piece) = body.next_piece().await? {
            manifest.update(&piece);
        }
        Ok(manifest.finish(url.to_string(), body.content_type.take(), body.etag.take()))
    }
}
