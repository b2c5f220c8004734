//! Manifests in memory in front of their store, per tracker (per replica of a cell).
//!
//! - Resolves never wait on the database for a manifest in memory: one read, then served from the cache.
//!   The cache is bounded by an estimate of the bytes it holds, in two generations: what is used stays,
//!   what was not used since the last generation turned over goes.
//! - Writes are durable in the store before they count as done, except while the database is unavailable
//!   (a retryable error, or no answer within [`PUT_WAIT`]): then the manifest is served from memory and its
//!   write waits in a bounded queue, retried with backoff in order until the database is back. Later writes
//!   queue behind them rather than each waiting on the database. A manifest can always be made again from
//!   its origin, so one lost with its replica (before the database came back) costs a re-ingest.
//! - Replicas of a cell each cache what they read, so a write (a re-ingest after the origin changed, a
//!   published manifest) is announced to the others once it is durable ([`ManifestCache::on_written`], over
//!   the bus), and each drops a cached manifest of that URL whose content differs
//!   ([`ManifestCache::invalidate`]); its next resolve reads the database. A read or write of that URL
//!   still under way when the announcement arrives may have read or written what it replaced, so its
//!   result is served but not kept.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use fog_proto::ContentId;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use super::{ManifestStore, StoreError, StoredManifest};

/// How long a write waits for the database before the manifest is served from memory and the write queued.
pub const PUT_WAIT: Duration = Duration::from_secs(3);
/// How long a read of a manifest not in memory waits for the database.
pub const GET_WAIT: Duration = Duration::from_secs(2);
/// Retries of queued writes back off from the first to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How often a count of a store other trackers write is read again.
const RECOUNT_EVERY: Duration = Duration::from_secs(60);
/// Invalidations are counted per slot, by a hash of the URL: fixed memory however many arrive; two URLs
/// sharing a slot only cost a read not kept.
const INVALIDATION_SLOTS: usize = 4096;

/// Bounds of the cache and of the writes held for an unavailable database.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Estimated bytes of manifests kept in memory; one larger than half of it is not kept.
    pub cache_bytes: usize,
    /// Writes held, and their estimated bytes; past either, writes fail (retryably) until the database is
    /// back.
    pub pending_writes: usize,
    pub pending_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self { cache_bytes: 256 << 20, pending_writes: 10_000, pending_bytes: 256 << 20 }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `sent` (this replica wrote) or `received` (another one did).
    pub direction: &'static str,
}

/// `fog_tracker_store_*` and `fog_tracker_manifest_*`.
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    pub pending_writes: Gauge,
    /// Failed store operations by `op` (`get`, `put`, `count`).
    pub errors: Family<OpLabel, Counter>,
    pub cache_bytes: Gauge,
    /// Manifest writes announced to the other replicas, and announcements received from them.
    pub invalidations: Family<DirectionLabel, Counter>,
    /// Cached manifests dropped because another replica wrote a different one.
    pub invalidated: Counter,
}

impl StoreMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fog_tracker_store_pending_writes",
            "Manifest writes held in memory until the database is available again",
            self.pending_writes.clone(),
        );
        registry.register("fog_tracker_store_errors", "Failed manifest store operations by op", self.errors.clone());
        registry.register(
            "fog_tracker_manifest_cache_bytes",
            "Estimated bytes of manifests cached in memory",
            self.cache_bytes.clone(),
        );
        registry.register(
            "fog_tracker_manifest_invalidations",
            "Manifest writes announced to the cell's other replicas (sent) and announced by them (received)",
            self.invalidations.clone(),
        );
        registry.register(
            "fog_tracker_manifest_invalidations_applied",
            "Cached manifests dropped because another replica wrote a different one for the URL",
            self.invalidated.clone(),
        );
    }
}

/// Told of each manifest write once it is durable: its URL and new content.
type OnWritten = Box<dyn Fn(&str, ContentId) + Send + Sync>;

struct Listener(OnWritten);

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Listener")
    }
}

#[derive(Debug)]
pub struct ManifestCache {
    store: Arc<dyn ManifestStore>,
    limits: CacheLimits,
    state: Mutex<State>,
    /// A write was queued.
    queued: Notify,
    /// Manifests stored (as of the last count, plus new URLs written since).
    count: AtomicU64,
    metrics: StoreMetrics,
    written: OnceLock<Listener>,
}

#[derive(Debug, Default)]
struct State {
    hot: HashMap<String, Arc<StoredManifest>>,
    hot_bytes: usize,
    cold: HashMap<String, Arc<StoredManifest>>,
    cold_bytes: usize,
    /// Writes waiting for the database, oldest first, and each URL's latest.
    pending: BTreeMap<u64, Arc<StoredManifest>>,
    pending_by_url: HashMap<String, u64>,
    pending_bytes: usize,
    next_seq: u64,
    /// Invalidations received, per slot of URLs ([`INVALIDATION_SLOTS`]), and of everything at once.
    invalidations: Vec<u64>,
    forgotten: u64,
}

/// Estimated memory a manifest takes: its hashes, mostly.
fn approx_bytes(s: &StoredManifest) -> usize {
    let m = &s.manifest;
    let groups = m.groups.as_ref().map_or(0, |g| g.hashes.iter().map(|h| 24 + std::mem::size_of_val(&h.0[..])).sum());
    let progress = m.progress.as_ref().map_or(0, |p| p.hashed.len() * 16);
    let text =
        m.url.len() * 2 + m.content_type.as_ref().map_or(0, String::len) + m.etag.as_ref().map_or(0, String::len);
    256 + text + std::mem::size_of_val(&m.chunks[..]) + groups + progress
}

/// `url`'s slot of invalidations.
fn slot(url: &str) -> usize {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(url) as usize % INVALIDATION_SLOTS
}

impl State {
    /// Keeps `stored` in the hot generation (within `budget` bytes for both).
    fn remember(&mut self, stored: Arc<StoredManifest>, budget: usize) {
        let url = stored.manifest.url.clone();
        if let Some(old) = self.cold.remove(&url) {
            self.cold_bytes -= approx_bytes(&old);
        }
        if let Some(old) = self.hot.remove(&url) {
            self.hot_bytes -= approx_bytes(&old);
        }
        let bytes = approx_bytes(&stored);
        if bytes > budget / 2 {
            return;
        }
        // Each generation within half the budget: the older one goes when the newer one is full.
        if self.hot_bytes + bytes > budget / 2 {
            self.cold = std::mem::take(&mut self.hot);
            self.cold_bytes = std::mem::replace(&mut self.hot_bytes, 0);
        }
        self.hot.insert(url, stored);
        self.hot_bytes += bytes;
    }

    fn lookup(&mut self, url: &str, budget: usize) -> Option<Arc<StoredManifest>> {
        if let Some(seq) = self.pending_by_url.get(url) {
            return self.pending.get(seq).cloned();
        }
        if let Some(m) = self.hot.get(url) {
            return Some(m.clone());
        }
        let m = self.cold.get(url).cloned()?;
        self.remember(m.clone(), budget);
        Some(m)
    }

    /// What changes when `url` is invalidated: a read or write that began at another mark may be older
    /// than what the invalidation announced.
    fn mark(&self, url: &str) -> (u64, u64) {
        (self.forgotten, self.invalidations[slot(url)])
    }

    fn bump(&mut self, url: &str) {
        self.invalidations[slot(url)] += 1;
    }

    /// Drops `url`'s cached manifest, if it is `held` (not one cached since); whether it did.
    fn forget(&mut self, url: &str, held: &Arc<StoredManifest>) -> bool {
        for (generation, bytes) in [(&mut self.hot, &mut self.hot_bytes), (&mut self.cold, &mut self.cold_bytes)] {
            if generation.get(url).is_some_and(|m| Arc::ptr_eq(m, held)) {
                generation.remove(url);
                *bytes -= approx_bytes(held);
                return true;
            }
        }
        false
    }

    /// Drops whatever is cached for `url`.
    fn evict(&mut self, url: &str) {
        if let Some(old) = self.hot.remove(url) {
            self.hot_bytes -= approx_bytes(&old);
        }
        if let Some(old) = self.cold.remove(url) {
            self.cold_bytes -= approx_bytes(&old);
        }
    }

    /// Drops `url`'s write `seq` (done), unless a later one for its URL replaced it.
    fn written(&mut self, seq: u64) {
        let Some(stored) = self.pending.remove(&seq) else { return };
        self.pending_bytes -= approx_bytes(&stored);
        if self.pending_by_url.get(&stored.manifest.url) == Some(&seq) {
            self.pending_by_url.remove(&stored.manifest.url);
        }
    }
}

impl ManifestCache {
    /// A cache over `store`, which holds `count` manifests.
    pub fn new(store: Arc<dyn ManifestStore>, limits: CacheLimits, count: u64, metrics: StoreMetrics) -> Self {
        let state = State { invalidations: vec![0; INVALIDATION_SLOTS], ..Default::default() };
        Self {
            store,
            limits,
            state: Mutex::new(state),
            queued: Notify::new(),
            count: AtomicU64::new(count),
            metrics,
            written: OnceLock::new(),
        }
    }

    /// Calls `tell` with the URL and content of every manifest write once it is durable (set once: the
    /// bus, which tells the cell's other replicas).
    pub fn on_written(&self, tell: impl Fn(&str, ContentId) + Send + Sync + 'static) {
        let _ = self.written.set(Listener(Box::new(tell)));
    }

    fn announce(&self, stored: &StoredManifest) {
        if let Some(Listener(tell)) = self.written.get() {
            tell(&stored.manifest.url, stored.manifest.content_id());
            self.metrics.invalidations.get_or_create(&DirectionLabel { direction: "sent" }).inc();
        }
    }

    /// Another replica stored `content` for `url`: a cached manifest of it that differs is dropped (the
    /// next resolve reads the database, where that write is by now), and reads or writes of it under way
    /// are not kept. A write of it this replica still holds for the database stays: it is stored after
    /// that one, and announced then.
    pub fn invalidate(&self, url: &str, content: ContentId) {
        self.metrics.invalidations.get_or_create(&DirectionLabel { direction: "received" }).inc();
        let held = {
            let mut state = self.state();
            state.bump(url);
            if state.pending_by_url.contains_key(url) {
                return;
            }
            state.hot.get(url).or_else(|| state.cold.get(url)).cloned()
        };
        // Hashing a large manifest's chunk list takes a while: outside the lock.
        let Some(held) = held.filter(|m| m.manifest.content_id() != content) else { return };
        let mut state = self.state();
        if state.forget(url, &held) {
            self.metrics.invalidated.inc();
            self.update_gauges(&state);
        }
    }

    /// Drops every manifest cached (writes held for the database stay), and keeps no read or write under
    /// way: announcements of other replicas' writes may have been missed (the bus was lost).
    pub fn forget_all(&self) {
        let mut state = self.state();
        let state = &mut *state;
        state.forgotten += 1;
        for (generation, bytes) in [(&mut state.hot, &mut state.hot_bytes), (&mut state.cold, &mut state.cold_bytes)] {
            generation.retain(|url, _| state.pending_by_url.contains_key(url));
            *bytes = generation.values().map(|m| approx_bytes(m)).sum();
        }
        self.update_gauges(state);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("manifest cache lock")
    }

    fn failed(&self, op: &'static str) {
        self.metrics.errors.get_or_create(&OpLabel { op }).inc();
    }

    fn update_gauges(&self, state: &State) {
        self.metrics.pending_writes.set(state.pending.len() as i64);
        self.metrics.cache_bytes.set((state.hot_bytes + state.cold_bytes) as i64);
    }

    /// Manifests stored.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Writes waiting for the database.
    pub fn pending(&self) -> usize {
        self.state().pending.len()
    }

    /// `url`'s manifest if it is in memory: no database involved.
    pub fn cached(&self, url: &str) -> Option<Arc<StoredManifest>> {
        self.state().lookup(url, self.limits.cache_bytes)
    }

    /// `url`'s manifest: from memory, else read from the store (and kept).
    pub async fn get(&self, url: &str) -> Result<Option<Arc<StoredManifest>>, StoreError> {
        if let Some(m) = self.cached(url) {
            return Ok(Some(m));
        }
        // Read again once if another replica's write was announced meanwhile: this read may predate it.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mark = self.state().mark(url);
            let read = tokio::time::timeout(GET_WAIT, self.store.get(url))
                .await
                .unwrap_or(Err(StoreError::NoAnswer(GET_WAIT)))
                .inspect_err(|_| self.failed("get"))?;
            let Some(stored) = read else { return Ok(None) };
            let mut state = self.state();
            // A write while this read was under way is newer than what it read.
            if let Some(newer) = state.lookup(url, self.limits.cache_bytes) {
                return Ok(Some(newer));
            }
            let stored = Arc::new(stored);
            if state.mark(url) == mark {
                state.remember(stored.clone(), self.limits.cache_bytes);
                self.update_gauges(&state);
                return Ok(Some(stored));
            }
            if attempts == 2 {
                // Announcements keep arriving: served, not kept, so the next resolve reads again.
                return Ok(Some(stored));
            }
        }
    }

    /// Stores `stored` (replacing its URL's): durably before returning, or, while the database is
    /// unavailable, in memory with its write queued. Fails if the database refuses it, or is unavailable
    /// with the queue full.
    pub async fn put(&self, stored: StoredManifest) -> Result<Arc<StoredManifest>, StoreError> {
        let stored = Arc::new(stored);
        if self.pending() > 0 {
            // The database is not back yet: in order, behind the writes already waiting.
            self.enqueue(&stored)?;
            return Ok(stored);
        }
        let mark = self.state().mark(&stored.manifest.url);
        let put = tokio::time::timeout(PUT_WAIT, self.store.put(&stored)).await;
        let error = match put.unwrap_or(Err(StoreError::NoAnswer(PUT_WAIT))) {
            Ok(new) => {
                if new {
                    self.count.fetch_add(1, Ordering::Relaxed);
                }
                let mut state = self.state();
                // Another replica's write of the URL, announced meanwhile, may have been stored after
                // this one: the next resolve reads which.
                if state.mark(&stored.manifest.url) == mark {
                    state.remember(stored.clone(), self.limits.cache_bytes);
                } else {
                    state.evict(&stored.manifest.url);
                }
                self.update_gauges(&state);
                drop(state);
                self.announce(&stored);
                return Ok(stored);
            }
            Err(e) if !e.is_retryable() => {
                self.failed("put");
                return Err(e);
            }
            Err(e) => e,
        };
        self.failed("put");
        tracing::warn!(url = %stored.manifest.url, %error, "manifest store unavailable: serving the manifest from memory, its write is queued");
        self.enqueue(&stored)?;
        Ok(stored)
    }

    /// Holds `stored` in memory and queues its write (replacing a queued one for its URL).
    fn enqueue(&self, stored: &Arc<StoredManifest>) -> Result<(), StoreError> {
        let mut state = self.state();
        let url = &stored.manifest.url;
        let replaced = state.pending_by_url.get(url).copied();
        let bytes = approx_bytes(stored);
        let room = state.pending.len() - usize::from(replaced.is_some()) < self.limits.pending_writes
            && state.pending_bytes + bytes <= self.limits.pending_bytes;
        if !room {
            return Err(StoreError::PendingFull { held: state.pending.len() });
        }
        if let Some(seq) = replaced {
            state.written(seq);
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.pending.insert(seq, stored.clone());
        state.pending_by_url.insert(url.clone(), seq);
        state.pending_bytes += bytes;
        state.remember(stored.clone(), self.limits.cache_bytes);
        self.update_gauges(&state);
        drop(state);
        self.queued.notify_one();
        Ok(())
    }

    /// Writes the queued manifests, oldest first, retrying with backoff while the database is unavailable;
    /// keeps the count of a shared store current. Runs for as long as the tracker does.
    pub async fn write_pending_forever(self: Arc<Self>) {
        let mut backoff = BACKOFF.0;
        let mut failing = false;
        loop {
            let oldest = self.state().pending.first_key_value().map(|(seq, m)| (*seq, m.clone()));
            let Some((seq, stored)) = oldest else {
                if !self.store.shared() {
                    self.queued.notified().await;
                } else if tokio::time::timeout(RECOUNT_EVERY, self.queued.notified()).await.is_err() {
                    match self.store.count().await {
                        Ok(n) => self.count.store(n, Ordering::Relaxed),
                        Err(e) => {
                            self.failed("count");
                            tracing::info!(error = %e, "cannot count the stored manifests");
                        }
                    }
                }
                continue;
            };
            let mark = self.state().mark(&stored.manifest.url);
            match self.store.put(&stored).await {
                Ok(new) => {
                    if new {
                        self.count.fetch_add(1, Ordering::Relaxed);
                    }
                    let mut state = self.state();
                    state.written(seq);
                    // As for a write through: another replica's, announced meanwhile, may be the later one.
                    if state.mark(&stored.manifest.url) != mark
                        && !state.pending_by_url.contains_key(&stored.manifest.url)
                    {
                        state.evict(&stored.manifest.url);
                    }
                    self.update_gauges(&state);
                    if failing && state.pending.is_empty() {
                        failing = false;
                        tracing::info!("manifest store available again: every queued write is stored");
                    }
                    drop(state);
                    self.announce(&stored);
                    backoff = BACKOFF.0;
                }
                Err(e) if !e.is_retryable() => {
                    // Refused for good: retrying would hold up every write behind it. The manifest stays in
                    // memory; a later ingest writes it again.
                    self.failed("put");
                    tracing::error!(url = %stored.manifest.url, error = %e, "manifest store refused a queued write; dropped");
                    let mut state = self.state();
                    state.written(seq);
                    self.update_gauges(&state);
                }
                Err(e) => {
                    self.failed("put");
                    if !failing {
                        failing = true;
                        tracing::warn!(error = %e, pending = self.pending(), "manifest store still unavailable: retrying the queued writes");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }

    /// Waits until every queued write is stored, at most `within` (the writer must be running); the writes
    /// still queued then.
    pub async fn drain(&self, within: Duration) -> usize {
        let until = tokio::time::Instant::now() + within;
        loop {
            let left = self.pending();
            if left == 0 || tokio::time::Instant::now() >= until {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
