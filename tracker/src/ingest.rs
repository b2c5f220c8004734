//! Ingest: read an origin object once, split it into fixed-size chunks, hash each with BLAKE3 and keep
//! the manifest. No viewer waits for it: a resolve gets the manifest *as far as it is hashed* after at most
//! a short wait (`--resolve-wait-ms`), and clients read the chunks not hashed yet straight from the origin.
//!
//! - One ingest per URL however many clients ask; it runs in its own task, so a resolve that gives up
//!   waiting does not stop it. The object streams through; only the hashes are kept.
//! - Range first: a resolve `from` a byte that is not hashed yet (a seek; MP4 keeps its index at the end)
//!   starts a ranged read of the chunks there, beside the sequential one, if the origin serves ranges.
//!   The sequential read checks every chunk a ranged read hashed: an object that changes under ingest
//!   fails it rather than leaving a manifest of two versions.
//! - Published manifests (`PUT /v1/admin/manifests`, or `<url>.fog-manifest.json` on the origin with
//!   `--origin-manifests`) are used without reading the object. A client that finds one wrong (its bytes
//!   do not hash to it) has the object ingested at once, and the dashboard says so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fog_net::origin::{OriginClient, OriginError};
use fog_proto::api::now_ms;
use fog_proto::groups::GroupHashes;
use fog_proto::manifest::{Groups, ManifestBuilder, Progress, MAX_HASHED_RUNS, MAX_MANIFEST_JSON, SIDECAR_SUFFIX};
use fog_proto::{ChunkHash, ContentId, Manifest};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::dashboard::Dashboard;
use crate::store::{ManifestCache, StoreError, StoredManifest};

/// Chunks a seek makes the tracker hash ahead of the sequential read: enough for a player to start.
const RANGE_FIRST_CHUNKS: u64 = 8;
/// How long the origin's body is watched before its pace says whether a resolve should wait for the end.
const PACE_CHECK: Duration = Duration::from_millis(5);
/// Ranged reads under way at once, in all (each is one more origin connection).
const MAX_RANGE_READS: usize = 16;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Origin(#[from] OriginError),
    /// Shared: one ingest's outcome goes to every client that waited on it.
    #[error(transparent)]
    Db(Arc<StoreError>),
    #[error("too many ingests in progress; retry shortly")]
    Busy,
    #[error("{url} changed at its origin while it was being ingested (chunk {chunk} differs between reads); it is ingested again on the next request")]
    ChangedDuringIngest { url: String, chunk: u64 },
    #[error("published manifest for {url} is unusable: {reason}")]
    BadPublished { url: String, reason: String },
}

impl IngestError {
    /// Whether ingesting again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Origin(e) => e.is_retryable(),
            Self::Db(e) => e.is_retryable(),
            Self::Busy | Self::ChangedDuringIngest { .. } => true,
            Self::BadPublished { .. } => false,
        }
    }
}

/// Where a resolve's manifest came from, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Stored complete (ingested earlier, or published).
    Stored,
    /// Ingested completely while the resolve waited.
    Ingested,
    /// Still being ingested: the manifest lists the chunks hashed so far.
    Ingesting,
}

/// A manifest for a resolve, and whether this resolve started the ingest.
#[derive(Debug)]
pub struct Answer {
    pub manifest: Arc<Manifest>,
    pub source: Source,
    pub started: bool,
}

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub chunk_size: u32,
    /// Group hashes of this size in every manifest (chunks then verify group by group as they stream);
    /// `None`, or a size not below the chunk size, leaves them out.
    pub group_size: Option<u32>,
    pub max_object_size: u64,
    /// A manifest younger than this is not re-ingested on a client's "stale" report.
    pub min_reingest_age: Duration,
    /// How long a resolve waits for the chunks it needs before answering with what is hashed.
    pub resolve_wait: Duration,
    /// Look for `<url>.fog-manifest.json` on the origin before reading an object.
    pub origin_manifests: bool,
    /// Ingests running at once; more are refused with [`IngestError::Busy`].
    pub max_running: usize,
}

#[derive(Debug, Clone)]
pub struct Ingest {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    origin: OriginClient,
    /// Stored manifests, those in use in memory.
    manifests: Arc<ManifestCache>,
    cfg: IngestConfig,
    dashboard: Arc<Dashboard>,
    failures: Counter,
    running: Mutex<HashMap<String, Arc<Running>>>,
    slots: Arc<Semaphore>,
    range_reads: Arc<Semaphore>,
}

/// One ingest under way: the manifest as far as it has got, and a signal on every change.
#[derive(Debug)]
struct Running {
    state: Mutex<State>,
    changed: watch::Sender<()>,
}

#[derive(Debug)]
struct State {
    /// `None` until the origin's headers arrive.
    partial: Option<Manifest>,
    /// Whether ranged reads may be used (the origin announced or answered ranges, and the size is known).
    ranges: bool,
    /// Chunk runs a ranged read is hashing.
    reading: Vec<(u64, u64)>,
    /// Chunks the sequential read has hashed.
    sequential: u64,
    /// When the origin's headers arrived, and body bytes read since: the origin's pace.
    headers_at: Option<tokio::time::Instant>,
    received: u64,
    outcome: Option<Result<Arc<Manifest>, IngestError>>,
}

impl State {
    /// Whether, at the pace the origin has sent so far, the sequential read cannot finish by `until`
    /// (judged once the body has had [`PACE_CHECK`] to start; an object of unknown size is waited for).
    fn cannot_finish_by(&self, now: tokio::time::Instant, until: tokio::time::Instant) -> bool {
        let (Some(at), Some(partial)) = (self.headers_at, &self.partial) else { return false };
        let elapsed = now.saturating_duration_since(at);
        if !partial.size_known() || elapsed < PACE_CHECK {
            return false;
        }
        let left = partial.size.saturating_sub(self.received) as f64;
        let pace = self.received as f64 / elapsed.as_secs_f64();
        left > pace * until.saturating_duration_since(now).as_secs_f64()
    }
}

impl Running {
    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().expect("ingest state lock"));
        self.changed.send_replace(());
    }
}

impl Ingest {
    /// `failures` counts ingests that failed (`fog_tracker_ingest_errors`).
    pub fn new(
        origin: OriginClient,
        manifests: Arc<ManifestCache>,
        cfg: IngestConfig,
        dashboard: Arc<Dashboard>,
        failures: Counter,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(cfg.max_running));
        let inner = Inner {
            origin,
            manifests,
            cfg,
            dashboard,
            failures,
            running: Mutex::default(),
            slots,
            range_reads: Arc::new(Semaphore::new(MAX_RANGE_READS)),
        };
        Self { inner: Arc::new(inner) }
    }

    /// The client ingest reads origins with (held to the registered origins).
    pub fn origin(&self) -> &OriginClient {
        &self.inner.origin
    }

    /// Manifests stored.
    pub fn manifests(&self) -> u64 {
        self.inner.manifests.count()
    }

    /// The stored manifests, with those in use in memory.
    pub fn cache(&self) -> &Arc<ManifestCache> {
        &self.inner.manifests
    }

    /// Whether a resolve of `url` would not start reading its origin (a manifest is stored or being made),
    /// unless the client reports the object stale.
    pub async fn is_known(&self, url: &str) -> bool {
        self.inner.running.lock().expect("running lock").contains_key(url)
            || self.inner.manifests.get(url).await.is_ok_and(|m| m.is_some())
    }

    /// Ingests under way.
    pub fn running(&self) -> usize {
        self.inner.running.lock().expect("running lock").len()
    }

    /// The manifest for `url`, ingesting it on first use, as far as it is hashed after the chunks at `from`
    /// are (or the resolve wait ends). `stale`: the client found the origin no longer matches this content
    /// id; if it is still the stored one (and not brand new, unless it was published) the object is
    /// ingested again.
    pub async fn manifest(&self, url: &str, stale: Option<ContentId>, from: u64) -> Result<Answer, IngestError> {
        let inner = &self.inner;
        let running = inner.running.lock().expect("running lock").get(url).cloned();
        if let Some(run) = running {
            return inner.wait(url, &run, from, false).await;
        }
        let mut replacing = None;
        let stored = match inner.manifests.get(url).await {
            Ok(stored) => stored,
            // The database is unavailable (failing over): the origin still has the object, so it is read
            // again, and its manifest kept in memory until the database is back.
            Err(e) if e.is_retryable() => {
                tracing::info!(url, error = %e, "manifest store unavailable; ingesting from the origin");
                None
            }
            Err(e) => return Err(IngestError::Db(Arc::new(e))),
        };
        if let Some(stored) = stored {
            let id = stored.manifest.content_id();
            let young = now_ms().saturating_sub(stored.ingested_at_ms) < inner.cfg.min_reingest_age.as_millis() as u64;
            if stale != Some(id) || (young && !stored.published) {
                let manifest = Arc::new(stored.manifest.clone());
                return Ok(Answer { manifest, source: Source::Stored, started: false });
            }
            tracing::info!(url, stale = %id, published = stored.published, "client reports the origin object changed; ingesting it again");
            replacing = stored.published.then(|| stored.manifest.clone());
        }
        let (run, started) = {
            let mut map = inner.running.lock().expect("running lock");
            match map.get(url) {
                Some(run) => (run.clone(), false),
                None => {
                    let slot = inner.slots.clone().try_acquire_owned().map_err(|_| IngestError::Busy)?;
                    let state = State {
                        partial: None,
                        ranges: false,
                        reading: Vec::new(),
                        sequential: 0,
                        headers_at: None,
                        received: 0,
                        outcome: None,
                    };
                    let run = Arc::new(Running { state: Mutex::new(state), changed: watch::Sender::new(()) });
                    map.insert(url.to_string(), run.clone());
                    tokio::spawn(inner.clone().run(url.to_string(), run.clone(), slot, replacing));
                    (run, true)
                }
            }
        };
        inner.wait(url, &run, from, started).await
    }

    /// `url`'s complete manifest, ingesting it on first use as a resolve does (one read, shared with
    /// resolves of it), waiting for the whole read at most `within`; `None` if it is not done by then.
    /// The tracker's live push needs a segment's every chunk hashed before it names them to nodes.
    pub async fn complete(&self, url: &str, within: Duration) -> Result<Option<Arc<Manifest>>, IngestError> {
        let answer = self.manifest(url, None, 0).await?;
        if answer.manifest.is_complete() {
            return Ok(Some(answer.manifest));
        }
        let running = self.inner.running.lock().expect("running lock").get(url).cloned();
        let Some(run) = running else {
            // It finished in between: stored by now.
            let stored = self.inner.manifests.get(url).await.map_err(|e| IngestError::Db(Arc::new(e)))?;
            return Ok(stored.map(|s| Arc::new(s.manifest.clone())));
        };
        let mut changed = run.changed.subscribe();
        let outcome = async {
            loop {
                if let Some(outcome) = &run.state.lock().expect("ingest state lock").outcome {
                    return outcome.clone();
                }
                // The sender lives in `run`, which this holds: it cannot close.
                let _ = changed.changed().await;
            }
        };
        match tokio::time::timeout(within, outcome).await {
            Ok(outcome) => outcome.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Stores a manifest built where the content is packaged; the object is never read to hash it.
    pub async fn publish(&self, manifest: Manifest) -> Result<ContentId, IngestError> {
        let url = manifest.url.clone();
        check_published(&manifest, &url)?;
        let id = manifest.content_id();
        self.inner.store(manifest, true).await?;
        tracing::info!(url, content_id = %id, "manifest published");
        Ok(id)
    }
}

/// A published manifest is complete, consistent and for `url`.
fn check_published(m: &Manifest, url: &str) -> Result<(), IngestError> {
    let bad = |reason: String| IngestError::BadPublished { url: url.to_string(), reason };
    if m.url != url {
        return Err(bad(format!("it names {}", m.url)));
    }
    if !m.is_complete() {
        return Err(bad("it lists progress: only complete manifests can be published".into()));
    }
    m.validate().map_err(|e| bad(e.to_string()))
}

impl Inner {
    /// Waits for the ingest to complete, at most the resolve wait (less once the origin's pace shows it
    /// cannot complete in time), then answers with the manifest so far. A resolve `from` a chunk not
    /// hashed yet starts a ranged read there first.
    async fn wait(
        self: &Arc<Self>,
        url: &str,
        run: &Arc<Running>,
        from: u64,
        started: bool,
    ) -> Result<Answer, IngestError> {
        let mut changed = run.changed.subscribe();
        let until = tokio::time::Instant::now() + self.cfg.resolve_wait;
        let mut range_asked = false;
        loop {
            let range_read = {
                let mut state = run.state.lock().expect("ingest state lock");
                if let Some(outcome) = &state.outcome {
                    return outcome.clone().map(|m| Answer { manifest: m, source: Source::Ingested, started });
                }
                if state.cannot_finish_by(tokio::time::Instant::now(), until) {
                    break;
                }
                match &state.partial {
                    Some(partial) if !range_asked && wanted(partial, from) => {
                        range_asked = true;
                        self.start_range_read(&mut state, from)
                    }
                    _ => None,
                }
            };
            if let Some((chunks, permit)) = range_read {
                let (this, url, run) = (self.clone(), url.to_string(), run.clone());
                tokio::spawn(async move {
                    this.range_read(&url, &run, chunks).await;
                    drop(permit);
                    run.update(|s| s.reading.retain(|&r| r != chunks));
                });
            }
            // Chunks signal changes; the pace is looked at in between.
            let tick = until.min(tokio::time::Instant::now() + PACE_CHECK);
            if tokio::time::timeout_at(tick, changed.changed()).await.is_err() && tick == until {
                break;
            }
        }
        let state = run.state.lock().expect("ingest state lock");
        let partial = state.partial.clone().unwrap_or_else(|| self.nothing_yet(url));
        Ok(Answer { manifest: Arc::new(partial), source: Source::Ingesting, started })
    }

    /// Claims a ranged read of the chunks from the one at `from`, if the origin serves ranges, the
    /// sequential read is not about to get there, no read covers that chunk yet, and the bounds on runs
    /// and concurrent reads allow.
    fn start_range_read(&self, state: &mut State, from: u64) -> Option<((u64, u64), OwnedSemaphorePermit)> {
        let partial = state.partial.as_ref()?;
        let chunk = from / u64::from(partial.chunk_size);
        let soon = chunk < state.sequential + RANGE_FIRST_CHUNKS;
        if !state.ranges || soon || state.reading.iter().any(|&(s, e)| (s..e).contains(&chunk)) {
            return None;
        }
        let progress = partial.progress.as_ref()?;
        let count = partial.chunks.len() as u64;
        let end = (chunk..(chunk + RANGE_FIRST_CHUNKS).min(count))
            .find(|&i| progress.is_hashed(i))
            .unwrap_or((chunk + RANGE_FIRST_CHUNKS).min(count));
        // Each read may add a run; keep the manifest's runs within bounds.
        if progress.hashed.len() + state.reading.len() + 1 >= MAX_HASHED_RUNS || end <= chunk {
            return None;
        }
        let permit = self.range_reads.clone().try_acquire_owned().ok()?;
        state.reading.push((chunk, end));
        Some(((chunk, end), permit))
    }

    /// The manifest of an object whose origin has not answered yet: no size, nothing hashed.
    fn nothing_yet(&self, url: &str) -> Manifest {
        Manifest {
            url: url.to_string(),
            size: 0,
            chunk_size: self.cfg.chunk_size,
            chunks: Vec::new(),
            content_type: None,
            etag: None,
            progress: Some(Progress { hashed: Vec::new(), size_known: false }),
            groups: None,
        }
    }

    /// The group size manifests get, if any.
    fn group_size(&self) -> Option<u32> {
        self.cfg.group_size.filter(|&g| g < self.cfg.chunk_size)
    }

    /// The ingest task: reads the object (or its published manifest), stores the manifest, and tells
    /// every waiting resolve. `replacing`: a published manifest a client found wrong.
    async fn run(
        self: Arc<Self>,
        url: String,
        run: Arc<Running>,
        _slot: OwnedSemaphorePermit,
        replacing: Option<Manifest>,
    ) {
        let outcome = match self.read(&url, &run, replacing.is_some()).await {
            Ok((manifest, published)) => self.store(manifest, published).await,
            Err(e) => Err(e),
        };
        match &outcome {
            Ok(m) => {
                tracing::info!(url, size = m.size, chunks = m.chunks.len(), content_id = %m.content_id(), "ingested");
                if let Some(old) = replacing {
                    let text = if old.chunks == m.chunks && old.size == m.size {
                        format!(
                            "{url}: a client reported its published manifest wrong, but the origin's bytes match it"
                        )
                    } else {
                        format!("{url}: the published manifest disagreed with the origin's bytes; replaced by ingest")
                    };
                    tracing::warn!(url, "{text}");
                    self.dashboard.event("manifest_replaced", text);
                }
            }
            Err(e) => {
                tracing::warn!(url, error = %e, "ingest failed");
                self.failures.inc();
                self.dashboard.event("ingest_error", e.to_string());
            }
        }
        // Stored first, then forgotten here: a resolve in between finds one or the other.
        run.update(|s| s.outcome = Some(outcome));
        let mut map = self.running.lock().expect("running lock");
        if map.get(&url).is_some_and(|r| Arc::ptr_eq(r, &run)) {
            map.remove(&url);
        }
    }

    /// The object's manifest: a published one on the origin (unless `distrust_published`), else the
    /// object read and hashed as it streams, published chunk by chunk to `run`.
    async fn read(&self, url: &str, run: &Running, distrust_published: bool) -> Result<(Manifest, bool), IngestError> {
        if self.cfg.origin_manifests && !distrust_published {
            if let Some(m) = self.sidecar(url).await {
                return Ok((m, true));
            }
        }
        let mut body = self.origin.get(url, self.cfg.max_object_size).await?;
        let chunk_size = self.cfg.chunk_size;
        let size_known = body.total.is_some();
        let count = body.total.map_or(0, |t| Manifest::chunk_count_for(t, chunk_size));
        run.update(|s| {
            s.ranges = body.ranges && size_known;
            s.headers_at = Some(tokio::time::Instant::now());
            s.partial = Some(Manifest {
                url: url.to_string(),
                size: body.total.unwrap_or(0),
                chunk_size,
                chunks: vec![ChunkHash([0; 32]); count as usize],
                content_type: body.content_type.clone(),
                etag: body.etag.clone(),
                progress: Some(Progress { hashed: Vec::new(), size_known }),
                groups: self
                    .group_size()
                    .map(|size| Groups { size, hashes: vec![GroupHashes::default(); count as usize] }),
            });
        });
        let mut builder = ManifestBuilder::with_groups(chunk_size, self.group_size());
        let mut told = 0;
        while let Some(piece) = body.next_piece().await? {
            builder.update(&piece);
            // Counted for the pace without waking waiters; whole chunks wake them.
            run.state.lock().expect("ingest state lock").received = builder.size();
            if builder.chunks().len() > told {
                self.record(url, run, told as u64, &builder.chunks()[told..], builder.groups().get(told..))?;
                told = builder.chunks().len();
            }
        }
        let manifest = builder.finish(url.to_string(), body.content_type.take(), body.etag.take());
        // The last (short) chunk, checked against a ranged read's; without a known size the complete
        // manifest follows at once.
        if size_known {
            let groups = manifest.groups.as_ref().and_then(|g| g.hashes.get(told..));
            self.record(url, run, told as u64, &manifest.chunks[told..], groups)?;
        }
        Ok((manifest, false))
    }

    /// Records chunks `first..` (and their group hashes, when grouping) hashed by the sequential read,
    /// checking any a ranged read hashed first.
    fn record(
        &self,
        url: &str,
        run: &Running,
        first: u64,
        hashes: &[ChunkHash],
        groups: Option<&[GroupHashes]>,
    ) -> Result<(), IngestError> {
        if hashes.is_empty() {
            return Ok(());
        }
        let mut result = Ok(());
        run.update(|s| {
            let Some(partial) = s.partial.as_mut() else { return };
            let Some(progress) = partial.progress.as_mut() else { return };
            let end = first + hashes.len() as u64;
            if !progress.size_known {
                // No length from the origin: the manifest is the hashed prefix.
                partial.chunks.truncate(first as usize);
                partial.chunks.extend_from_slice(hashes);
                partial.size = end * u64::from(partial.chunk_size);
                if let (Some(g), Some(new)) = (partial.groups.as_mut(), groups) {
                    g.hashes.truncate(first as usize);
                    g.hashes.extend_from_slice(new);
                }
            } else {
                for (i, hash) in (first..end).zip(hashes) {
                    let Some(slot) = partial.chunks.get_mut(i as usize) else {
                        // More bytes than the origin announced: the body reader reports that.
                        return;
                    };
                    if progress.is_hashed(i) && slot != hash {
                        result = Err(IngestError::ChangedDuringIngest { url: url.to_string(), chunk: i });
                        return;
                    }
                    *slot = *hash;
                }
                set_groups(&mut partial.groups, first, groups);
            }
            progress.add(first, end.min(partial.chunks.len() as u64));
            s.sequential = end;
        });
        result
    }

    /// Hashes chunks `[first, end)` with one ranged read, recording each as it completes. Failures only
    /// cost the head start: the sequential read gets there anyway.
    async fn range_read(&self, url: &str, run: &Running, (first, end): (u64, u64)) {
        let (size, chunk_size) = {
            let state = run.state.lock().expect("ingest state lock");
            match &state.partial {
                Some(p) => (p.size, p.chunk_size),
                None => return,
            }
        };
        let offset = first * u64::from(chunk_size);
        let stop = (end * u64::from(chunk_size)).min(size);
        let mut body = match self.origin.open_range(url, offset, Some(stop), stop - offset, true).await {
            Ok(b) => b,
            Err(e) => {
                tracing::info!(url, offset, error = %e, "ranged read failed; the sequential read will get there");
                if matches!(e, OriginError::RangeIgnored { .. }) {
                    run.update(|s| s.ranges = false);
                }
                return;
            }
        };
        let mut builder = ManifestBuilder::with_groups(chunk_size, self.group_size());
        let mut told = 0;
        let record = |hashes: &[ChunkHash], groups: Option<&[GroupHashes]>, at: u64| {
            run.update(|s| {
                let Some(partial) = s.partial.as_mut() else { return };
                let Some(progress) = partial.progress.as_mut() else { return };
                let mut fresh = Vec::new();
                for (i, hash) in (at..).zip(hashes) {
                    // The sequential read got there first: it has checked or will check this one.
                    if !progress.is_hashed(i) {
                        partial.chunks[i as usize] = *hash;
                        fresh.push(i);
                    }
                }
                progress.add(at, at + hashes.len() as u64);
                for i in fresh {
                    let one = groups.and_then(|g| g.get((i - at) as usize..=(i - at) as usize));
                    set_groups(&mut partial.groups, i, one);
                }
            });
        };
        loop {
            match body.next_piece().await {
                Ok(Some(piece)) => builder.update(&piece),
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(url, offset, error = %e, "ranged read failed; the sequential read will get there");
                    return;
                }
            }
            if builder.chunks().len() > told {
                record(&builder.chunks()[told..], builder.groups().get(told..), first + told as u64);
                told = builder.chunks().len();
            }
        }
        // The object's short last chunk, when the read reached the end.
        if stop == size {
            let (chunks, groups) = builder.into_parts();
            record(&chunks[told..], groups.get(told..), first + told as u64);
        }
    }

    /// A manifest the publisher placed next to the object on the origin, if there is a valid one.
    async fn sidecar(&self, url: &str) -> Option<Manifest> {
        let at = format!("{url}{SIDECAR_SUFFIX}");
        let mut body = match self.origin.get(&at, MAX_MANIFEST_JSON as u64).await {
            Ok(b) => b,
            Err(OriginError::Status { status: 404 | 410, .. }) => return None,
            Err(e) => {
                tracing::info!(url, error = %e, "cannot read a published manifest on the origin; ingesting");
                return None;
            }
        };
        let mut json = Vec::new();
        loop {
            match body.next_piece().await {
                Ok(Some(piece)) => json.extend_from_slice(&piece),
                Ok(None) => break,
                Err(e) => {
                    tracing::info!(url, error = %e, "cannot read a published manifest on the origin; ingesting");
                    return None;
                }
            }
        }
        let checked = serde_json::from_slice::<Manifest>(&json)
            .map_err(|e| IngestError::BadPublished { url: url.to_string(), reason: e.to_string() })
            .and_then(|m| check_published(&m, url).map(|()| m));
        match checked {
            Ok(m) => {
                tracing::info!(url, content_id = %m.content_id(), "using the manifest published on the origin");
                Some(m)
            }
            Err(e) => {
                tracing::warn!(url, error = %e, "ignoring the manifest published on the origin; ingesting");
                self.dashboard.event("manifest_rejected", e.to_string());
                None
            }
        }
    }

    /// Stores a complete manifest: durably, or, while the database is unavailable, in memory until it is
    /// back (`ManifestCache::put`).
    async fn store(&self, manifest: Manifest, published: bool) -> Result<Arc<Manifest>, IngestError> {
        let stored = StoredManifest { manifest, ingested_at_ms: now_ms(), published };
        let stored = self.manifests.put(stored).await.map_err(|e| IngestError::Db(Arc::new(e)))?;
        Ok(Arc::new(stored.manifest.clone()))
    }
}

/// Stores the group hashes of chunks `first..` in a partial manifest's (when both group).
fn set_groups(partial: &mut Option<Groups>, first: u64, groups: Option<&[GroupHashes]>) {
    let (Some(g), Some(new)) = (partial.as_mut(), groups) else { return };
    for (slot, hashes) in g.hashes.iter_mut().skip(first as usize).zip(new) {
        slot.clone_from(hashes);
    }
}

/// Whether the chunk at byte `from` is not hashed yet but will be (it lies within the object, or the
/// object's size is not known yet).
fn wanted(partial: &Manifest, from: u64) -> bool {
    let within = if partial.size_known() { from < partial.size } else { true };
    within && partial.hash((from / u64::from(partial.chunk_size)) as usize).is_none()
}

#[cfg(test)]
mod tests {
    use fog_proto::manifest::MIN_CHUNK_SIZE;

    use super::*;

    fn reading(size: Option<u64>, received: u64, since: Duration) -> (State, tokio::time::Instant) {
        let now = tokio::time::Instant::now();
        let partial = Manifest {
            url: "http://o.example/a".into(),
            size: size.unwrap_or(0),
            chunk_size: MIN_CHUNK_SIZE,
            chunks: vec![ChunkHash([0; 32]); Manifest::chunk_count_for(size.unwrap_or(0), MIN_CHUNK_SIZE) as usize],
            content_type: None,
            etag: None,
            progress: Some(Progress { hashed: Vec::new(), size_known: size.is_some() }),
            groups: None,
        };
        partial.validate().expect("consistent");
        let state = State {
            partial: Some(partial),
            ranges: true,
            reading: Vec::new(),
            sequential: 0,
            headers_at: Some(now - since),
            received,
            outcome: None,
        };
        (state, now)
    }

    #[test]
    fn a_resolve_stops_waiting_once_the_origin_is_too_slow_to_finish_in_time() {
        let wait = Duration::from_millis(50);
        // 100 MB at 10 MB/s (50 kB in 5 ms): hopeless within 45 ms.
        let (slow, now) = reading(Some(100_000_000), 50_000, Duration::from_millis(5));
        assert!(slow.cannot_finish_by(now, now + wait - Duration::from_millis(5)));
        // 1 MB at 1 GB/s: it will finish; keep waiting.
        let (fast, now) = reading(Some(1_000_000), 500_000, Duration::from_millis(5));
        assert!(!fast.cannot_finish_by(now, now + wait));
        // Too early to judge the pace, or no size to judge against: keep waiting.
        let (early, now) = reading(Some(100_000_000), 0, Duration::from_millis(1));
        assert!(!early.cannot_finish_by(now, now + wait));
        let (no_size, now) = reading(None, 50_000, Duration::from_millis(10));
        assert!(!no_size.cannot_finish_by(now, now + wait));
    }

    #[test]
    fn seeks_near_the_sequential_read_are_left_to_it() {
        let (mut state, _) = reading(Some(100 * u64::from(MIN_CHUNK_SIZE)), 0, Duration::ZERO);
        state.sequential = 10;
        let near = 12 * u64::from(MIN_CHUNK_SIZE);
        let (ingest, _dir) = test_inner();
        assert!(ingest.start_range_read(&mut state, near).is_none(), "the sequential read gets there soon");
        let far = 90 * u64::from(MIN_CHUNK_SIZE) + 5;
        let ((first, end), _permit) = ingest.start_range_read(&mut state, far).expect("a ranged read");
        assert_eq!((first, end), (90, 90 + RANGE_FIRST_CHUNKS));
        assert!(ingest.start_range_read(&mut state, far).is_none(), "one read per chunk");
        state.ranges = false;
        assert!(ingest.start_range_read(&mut state, 50 * u64::from(MIN_CHUNK_SIZE)).is_none(), "no ranges");
    }

    fn test_inner() -> (Inner, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Arc::new(crate::db::Db::open(dir.path()).expect("db"));
        let store = Arc::new(crate::store::rocks::RocksStore::new(db));
        let manifests = Arc::new(ManifestCache::new(store, Default::default(), 0, Default::default()));
        let cfg = IngestConfig {
            chunk_size: MIN_CHUNK_SIZE,
            group_size: Some(4096),
            max_object_size: 1 << 30,
            min_reingest_age: Duration::from_secs(30),
            resolve_wait: Duration::from_millis(50),
            origin_manifests: false,
            max_running: 4,
        };
        let inner = Inner {
            origin: OriginClient::new(None),
            manifests,
            cfg,
            dashboard: Arc::default(),
            failures: Counter::default(),
            running: Mutex::default(),
            slots: Arc::new(Semaphore::new(4)),
            range_reads: Arc::new(Semaphore::new(MAX_RANGE_READS)),
        };
        (inner, dir)
    }
}
