//! The local player proxy: an HTTP/1.1 server on 127.0.0.1 that any player can use by fetching
//! `http://PROXY/<scheme>/<host[:port]>/<path>` instead of the origin URL.
//!
//! - Playlists (HLS `.m3u8`, DASH `.mpd`) are mutable: they pass through from the origin (cached for about
//!   a second) with their URIs rewritten to the proxy.
//! - Everything else is immutable content: it comes through the fog, chunk by verified chunk, with
//!   `Range` support. A fog fetch that would miss its deadline finishes from the origin.
//! - From the segments a player asks for, the proxy infers the playhead and prefetches the next segments.
//! - When the fog cannot serve an object at all (tracker down, an origin only the user registered) the
//!   bytes come straight from the origin: the player never stalls because of fog.
//!
//! It is no relay for web pages: it answers only requests addressed to a loopback name or its own listen
//! address (no DNS rebinding), and it fetches only URLs under the tracker's registered origins or those its
//! user registered (`--origin`), following no redirect out of them, so a page cannot reach the user's
//! router or other loopback and private services through it.

mod playlist;
mod stats;
mod urls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, HOST, RANGE,
};
use hyper::{Method, Request, Response, StatusCode};
use moka::future::Cache;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::OnceCell;

pub use playlist::{hls_segments, kind_of, rewrite_dash, rewrite_hls, Kind, Segment};
pub use stats::{Playback, PlaybackState, ProxyStats, Snapshot};
pub use urls::{origin_url, proxied_url, proxy_path, UrlError};

use fog_proto::origins::{canonical_url, OriginList};

use crate::{ClientConfig, ClientError, FetchOptions, FogClient, Resolved};
use fog_net::http_server::{self, json, reader_body, reply, Body, Reply};
use fog_net::origin::{guarded_http, SharedOrigins};
use fog_net::tracker::TrackerError;

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How far ahead of the inferred playhead to prefetch.
    pub prefetch_window: Duration,
    /// Most segments prefetched ahead at once.
    pub prefetch_segments: usize,
    /// Memory for prefetched segments.
    pub prefetch_memory: u64,
    /// How long a playlist is served from the proxy's cache before it is fetched again.
    pub playlist_ttl: Duration,
    /// How long a resolved manifest is reused.
    pub manifest_ttl: Duration,
    /// Deadline for a segment the player asks for when its duration is unknown.
    pub default_deadline: Duration,
    /// How often the proxy summarises what it saw to the tracker.
    pub report_interval: Duration,
    /// Origins the user registered locally (`fog proxy --origin`), relayed besides the tracker's.
    pub origins: OriginList,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            prefetch_window: Duration::from_secs(20),
            prefetch_segments: 4,
            prefetch_memory: 128 << 20,
            playlist_ttl: Duration::from_secs(1),
            manifest_ttl: Duration::from_secs(300),
            default_deadline: Duration::from_secs(4),
            report_interval: Duration::from_secs(10),
            origins: OriginList::default(),
        }
    }
}

/// Largest playlist accepted from an origin, and largest after rewriting.
const MAX_PLAYLIST: usize = 4 << 20;
const MAX_REWRITTEN: usize = 4 * MAX_PLAYLIST;
/// Playlists fetched and rewritten at once: bounds their transient memory.
const PLAYLIST_FETCHES: usize = 4;
/// Bounds of the proxy's small caches: playlists by count and bytes, manifests by count, the segment index
/// by entries and URL bytes (one large playlist cannot grow the proxy by more).
const MAX_PLAYLISTS: u64 = 256;
const PLAYLIST_CACHE_BYTES: u64 = 32 << 20;
const MAX_MANIFESTS: u64 = 1024;
const MAX_SEGMENT_INDEX: usize = 20_000;
const SEGMENT_INDEX_BYTES: usize = 8 << 20;
/// How often the tracker's origin list is fetched again, and retried until it first arrives.
const ORIGINS_REFRESH: Duration = Duration::from_secs(60);
const ORIGINS_RETRY: Duration = Duration::from_secs(5);
/// Most prefetched segments kept, whatever their size.
const MAX_PREFETCHED: u64 = 256;
/// Buffer between a fetch and the player's connection.
const PIPE: usize = 256 * 1024;
/// How often a live playlist the player keeps reloading is reported to the tracker (which counts a viewer
/// for 30 s after a report), and most playlists remembered as reported.
const LIVE_REPORT_EVERY: Duration = Duration::from_secs(10);
const MAX_LIVE_REPORTED: usize = 64;

/// A segment being prefetched, then its bytes (`None`: the prefetch failed). A player asking for it meanwhile
/// waits for it; a cell is in the cache from the moment its prefetch starts, so none starts twice.
type Prefetched = Arc<OnceCell<Option<Bytes>>>;

/// The weight of a cached value of `bytes` in a cache of `max_bytes` holding at most `max_entries`: its size,
/// but at least an equal share of the budget, so that one weighted capacity bounds both count and bytes.
fn weight(bytes: u64, max_bytes: u64, max_entries: u64) -> u32 {
    u32::try_from(bytes.max(max_bytes / max_entries)).unwrap_or(u32::MAX)
}

/// Least recently used goes first: the proxy's entries are read a few times while fresh, then not again,
/// which frequency-based admission would hold against newcomers.
fn lru_cache<V: Clone + Send + Sync + 'static>(
    max_capacity: u64,
    weigher: impl Fn(&String, &V) -> u32 + Send + Sync + 'static,
    ttl: Option<Duration>,
) -> Cache<String, V> {
    let builder = Cache::builder().max_capacity(max_capacity).eviction_policy(EvictionPolicy::lru()).weigher(weigher);
    match ttl {
        Some(ttl) => builder.time_to_live(ttl).build(),
        None => builder.build(),
    }
}

/// Where each known segment sits in the latest version of its media playlist, bounded by segments and URL
/// bytes. A refreshed playlist replaces its previous list, so a live stream does not pile up old ones.
#[derive(Debug, Default)]
struct SegmentIndex {
    entries: HashMap<String, SegmentPos>,
    lists: HashMap<String, Arc<Vec<Segment>>>,
    segments: usize,
    url_bytes: usize,
}

impl SegmentIndex {
    fn forget(&mut self, playlist: &str) {
        let Some(old) = self.lists.remove(playlist) else { return };
        for s in old.iter() {
            if self.entries.get(&s.url).is_some_and(|p| Arc::ptr_eq(&p.list, &old)) {
                self.entries.remove(&s.url);
            }
        }
        self.segments -= old.len();
        self.url_bytes -= old.iter().map(|s| s.url.len()).sum::<usize>();
    }

    /// Indexes `list` as the current segments of `playlist`. A list the index cannot hold whole is cut
    /// short; an index that would overflow starts again from this list.
    fn insert(&mut self, playlist: &str, mut list: Vec<Segment>) {
        self.forget(playlist);
        let mut url_bytes = 0;
        let fits = list
            .iter()
            .position(|s| {
                url_bytes += s.url.len();
                url_bytes > SEGMENT_INDEX_BYTES
            })
            .unwrap_or(list.len())
            .min(MAX_SEGMENT_INDEX);
        list.truncate(fits);
        if list.is_empty() {
            return;
        }
        let bytes: usize = list.iter().map(|s| s.url.len()).sum();
        if self.segments + list.len() > MAX_SEGMENT_INDEX || self.url_bytes + bytes > SEGMENT_INDEX_BYTES {
            *self = Self::default();
        }
        let list = Arc::new(list);
        for (i, s) in list.iter().enumerate() {
            self.entries.insert(s.url.clone(), SegmentPos { list: list.clone(), index: i });
        }
        self.segments += list.len();
        self.url_bytes += bytes;
        self.lists.insert(playlist.to_string(), list);
    }
}

/// Where a known segment sits in its media playlist.
#[derive(Debug, Clone)]
struct SegmentPos {
    list: Arc<Vec<Segment>>,
    index: usize,
}

#[derive(Debug)]
pub struct Proxy {
    cfg: ProxyConfig,
    client: FogClient,
    http: reqwest::Client,
    /// Authorities this proxy answers to besides loopback names.
    listen: String,
    /// The only origins relayed: the tracker's and the user's own. The client's fallback and every
    /// redirect are held to the same list.
    origins: SharedOrigins,
    origins_known: AtomicBool,
    origins_fetch: tokio::sync::Mutex<()>,
    playlist_fetches: tokio::sync::Semaphore,
    /// Rewritten playlists served from memory for `playlist_ttl`, bounded by count and bytes.
    playlists: Cache<String, Bytes>,
    /// Resolved manifests reused for `manifest_ttl`, bounded by count.
    manifests: Cache<String, Resolved>,
    segments: Mutex<SegmentIndex>,
    /// Live playlists reported to the tracker, and when (bounded by `MAX_LIVE_REPORTED`).
    live_reported: Mutex<HashMap<String, Instant>>,
    /// Prefetched segments, bounded by `prefetch_memory` and `MAX_PREFETCHED`.
    prefetch: Cache<String, Prefetched>,
    pub stats: ProxyStats,
}

/// Parses a `Range` header against an object of `size` bytes: `Ok(None)` for no (or an unsupported) range,
/// `Err(())` when unsatisfiable.
#[allow(clippy::result_unit_err)]
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None); // Multipart ranges: answer with the whole object, which HTTP allows.
    }
    let Some((a, b)) = spec.split_once('-') else { return Ok(None) };
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            (size.saturating_sub(n), size)
        }
        (a, "") => (a.parse().map_err(|_| ())?, size),
        (a, b) => (a.parse().map_err(|_| ())?, b.parse::<u64>().map_err(|_| ())?.saturating_add(1).min(size)),
    };
    if start >= size || start >= end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// The first byte a `Range` header asks for (`bytes=A-…`), 0 for a suffix or no range: where a player seeks.
fn range_start(header: Option<&str>) -> u64 {
    header
        .and_then(|h| h.trim().strip_prefix("bytes="))
        .and_then(|spec| spec.split(['-', ',']).next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or(0)
}

fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl Proxy {
    /// A proxy fetching through a client made from `client` (its `origins` is replaced by the proxy's).
    /// Must be called within a tokio runtime.
    pub fn new(client: ClientConfig, listen: SocketAddr, cfg: ProxyConfig) -> Result<Self, ClientError> {
        let origins: SharedOrigins = Arc::new(RwLock::new(cfg.origins.clone()));
        let client = FogClient::new(ClientConfig { origins: Some(origins.clone()), ..client })?;
        let http = guarded_http(Some(origins.clone()), concat!("fogcdn-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("static reqwest configuration is valid");
        let prefetch_memory = cfg.prefetch_memory;
        Ok(Self {
            client,
            http,
            listen: listen.to_string(),
            origins,
            origins_known: AtomicBool::new(false),
            origins_fetch: tokio::sync::Mutex::new(()),
            playlist_fetches: tokio::sync::Semaphore::new(PLAYLIST_FETCHES),
            playlists: lru_cache(
                PLAYLIST_CACHE_BYTES,
                |_, body: &Bytes| weight(body.len() as u64, PLAYLIST_CACHE_BYTES, MAX_PLAYLISTS),
                Some(cfg.playlist_ttl),
            ),
            manifests: lru_cache(MAX_MANIFESTS, |_, _| 1, Some(cfg.manifest_ttl)),
            segments: Mutex::new(SegmentIndex::default()),
            live_reported: Mutex::default(),
            // Weighed by its bytes once fetched (the prefetcher puts it again then); at the least share before.
            prefetch: lru_cache(
                prefetch_memory,
                move |_, cell: &Prefetched| {
                    let bytes = cell.get().and_then(Option::as_ref).map_or(0, |b| b.len() as u64);
                    weight(bytes, prefetch_memory, MAX_PREFETCHED)
                },
                None,
            ),
            stats: ProxyStats::default(),
            cfg,
        })
    }

    /// What `/stats` shows (and `fog_stats_json`).
    pub fn snapshot(&self) -> Snapshot {
        self.note_tracker();
        self.stats.snapshot()
    }

    fn note_tracker(&self) {
        if let Some(t) = self.client.tracker() {
            self.stats.tracker(t);
        }
    }

    /// What the player says about itself: playhead, seconds buffered ahead, state. Used for deadlines.
    pub fn report_playback(&self, position_secs: f64, buffer_secs: f64, state: PlaybackState) {
        self.stats.playback(Playback { position_secs, buffer_secs, state, at: Instant::now() });
    }

    /// Serves on `listener` until `shutdown` resolves; reports to the tracker meanwhile.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        let reporter = tokio::spawn(self.clone().report_forever());
        let origins = tokio::spawn(self.clone().origins_forever());
        let proxy = self.clone();
        http_server::serve(listener, 256, move |req, _| proxy.clone().handle(req), shutdown).await;
        reporter.abort();
        origins.abort();
    }

    async fn origins_forever(self: Arc<Self>) {
        loop {
            let wait = match self.refresh_origins().await {
                Ok(()) => ORIGINS_REFRESH,
                Err(e) => {
                    // The last list stays in force: players keep playing while the tracker is away.
                    tracing::debug!(error = %e, "could not fetch the tracker's origin list");
                    ORIGINS_RETRY
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn refresh_origins(&self) -> Result<(), TrackerError> {
        let mut list = self.client.origins().await?;
        list.extend(&self.cfg.origins);
        *self.origins.write().expect("lock") = list;
        self.origins_known.store(true, Ordering::Release);
        Ok(())
    }

    fn allows(&self, url: &str) -> bool {
        self.origins.read().expect("lock").allows(url)
    }

    /// The canonical form of `url` if the proxy may fetch it, or the reply refusing it.
    async fn registered(&self, url: &str) -> Result<String, Reply> {
        let url = canonical_url(url).map_err(|e| reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")))?;
        if !self.allows(&url) && !self.origins_known.load(Ordering::Acquire) {
            // Before the tracker's list first arrives, one request asks for it and the others wait.
            let _one = self.origins_fetch.lock().await;
            if !self.origins_known.load(Ordering::Acquire) {
                if let Err(e) = self.refresh_origins().await {
                    let msg = format!(
                        "{url} is not under an origin registered with this proxy, and the tracker's list is \
                         unknown ({e}); retry, or start the proxy with --origin PREFIX\n"
                    );
                    return Err(reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", msg));
                }
            }
        }
        if self.allows(&url) {
            return Ok(url);
        }
        self.stats.request("refused");
        let msg = format!(
            "{url} is not under a registered origin; this proxy relays only those (the operator registers origins \
             at the tracker, a user with `fog proxy --origin PREFIX`)\n"
        );
        Err(reply(StatusCode::FORBIDDEN, "text/plain", msg))
    }

    async fn report_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.report_interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Some(report) = self.stats.take_report() {
                if let Err(e) = self.client.report(&report).await {
                    tracing::debug!(error = %e, "could not report to the tracker");
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Reply {
        let host = req.headers().get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !(is_loopback_host(host) || host == self.listen) {
            return reply(StatusCode::FORBIDDEN, "text/plain", "this proxy only answers local players\n");
        }
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        match path.as_str() {
            "/stats" => return json(StatusCode::OK, &self.snapshot()),
            "/metrics" => {
                self.count_cached().await;
                self.note_tracker();
                return http_server::metrics(self.stats.metrics_text());
            }
            "/healthz" => return json(StatusCode::OK, &serde_json::json!({"ok": true})),
            "/" => {
                let help =
                    "fogcdn player proxy: fetch http://THIS/<scheme>/<host[:port]>/<path>; see /stats and /metrics\n";
                return reply(StatusCode::OK, "text/plain", help);
            }
            _ => {}
        }
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET and HEAD\n"),
        };
        let url = match origin_url(&path) {
            Ok(u) => u,
            Err(e) => return reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        };
        let url = match self.registered(&url).await {
            Ok(u) => u,
            Err(refused) => return refused,
        };
        let range = req.headers().get(RANGE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        match kind_of(&url) {
            Some(kind) => self.playlist(&url, kind, head).await,
            None => self.object(url, range, head).await,
        }
    }

    async fn playlist(&self, url: &str, kind: Kind, head: bool) -> Reply {
        self.stats.request("playlist");
        let body = match self.playlists.get(url).await {
            Some(body) => body,
            None => match self.fetch_playlist(url, kind).await {
                Ok(body) => body,
                Err(resp) => return resp,
            },
        };
        let mut r = reply(StatusCode::OK, playlist::content_type(kind), if head { Bytes::new() } else { body });
        r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }

    async fn fetch_playlist(&self, url: &str, kind: Kind) -> Result<Bytes, Reply> {
        let bad_gateway = |msg: String| reply(StatusCode::BAD_GATEWAY, "text/plain", msg);
        let _slot = self.playlist_fetches.acquire().await.expect("never closed");
        let mut resp =
            self.http.get(url).send().await.map_err(|e| bad_gateway(format!("origin unreachable: {e}\n")))?;
        if !resp.status().is_success() {
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            return Err(reply(status, "text/plain", format!("origin answered {status} for {url}\n")));
        }
        // Relative URIs resolve against where the playlist really came from (after redirects).
        let base = resp.url().to_string();
        let mut raw = Vec::new();
        while let Some(piece) = resp.chunk().await.map_err(|e| bad_gateway(format!("origin read failed: {e}\n")))? {
            if raw.len() + piece.len() > MAX_PLAYLIST {
                return Err(bad_gateway(format!("playlist larger than {MAX_PLAYLIST} bytes\n")));
            }
            raw.extend_from_slice(&piece);
        }
        self.stats.passthrough(raw.len() as u64, "playlist");
        let text = String::from_utf8_lossy(&raw);
        let rewritten = match kind {
            Kind::Hls => {
                let (segments, live) = match fog_proto::hls::media_playlist(&text, &base) {
                    Ok(media) => {
                        let live = media.is_live() && !media.segments.is_empty();
                        (media.segments, live)
                    }
                    Err(_) => (hls_segments(&text, &base), false),
                };
                // Where each segment sits tells, when the player asks for it, where the playhead is.
                self.segments.lock().expect("lock").insert(url, segments);
                if live {
                    self.report_live(url);
                }
                rewrite_hls(&text, &base)
            }
            Kind::Dash => rewrite_dash(&text, &base),
        };
        if rewritten.len() > MAX_REWRITTEN {
            return Err(bad_gateway(format!("playlist larger than {MAX_REWRITTEN} bytes once rewritten\n")));
        }
        let body = Bytes::from(rewritten.into_bytes().into_boxed_slice());
        self.playlists.insert(url.to_string(), body.clone()).await;
        Ok(body)
    }

    /// Tells the tracker the player plays the live playlist `url`, so that it pushes the segments to come
    /// to the nodes this network is sent to, before the player asks (at most every [`LIVE_REPORT_EVERY`]).
    fn report_live(&self, url: &str) {
        if url.len() > fog_proto::api::MAX_LIVE_URL_LEN {
            return;
        }
        let now = Instant::now();
        {
            let mut reported = self.live_reported.lock().expect("lock");
            if reported.get(url).is_some_and(|at| now.duration_since(*at) < LIVE_REPORT_EVERY) {
                return;
            }
            if reported.len() >= MAX_LIVE_REPORTED {
                reported.retain(|_, at| now.duration_since(*at) < LIVE_REPORT_EVERY);
            }
            if reported.len() >= MAX_LIVE_REPORTED && !reported.contains_key(url) {
                return;
            }
            reported.insert(url.to_string(), now);
        }
        let report = fog_proto::api::ClientReport { live_playlists: vec![url.to_string()], ..Default::default() };
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(e) = client.report(&report).await {
                tracing::debug!(error = %e, "could not report a live playlist to the tracker");
            }
        });
    }

    /// `url`'s manifest and candidates; `from`: the byte the player reads first. A manifest still being
    /// ingested is not kept, so the next request picks up the chunks hashed since.
    async fn resolved(&self, url: &str, from: u64) -> Result<Resolved, fog_net::tracker::TrackerError> {
        if let Some(r) = self.manifests.get(url).await {
            return Ok(r);
        }
        let r = self.client.resolve(url, None, from).await?;
        if r.manifest().is_complete() {
            self.manifests.insert(url.to_string(), r.clone()).await;
        }
        Ok(r)
    }

    /// Brings the cache gauges up to date (pending evictions and expiries first).
    async fn count_cached(&self) {
        self.playlists.run_pending_tasks().await;
        self.manifests.run_pending_tasks().await;
        self.prefetch.run_pending_tasks().await;
        self.stats.cached("playlist", self.playlists.entry_count());
        self.stats.cached("manifest", self.manifests.entry_count());
        self.stats.cached("prefetch", self.prefetch.entry_count());
    }

    async fn object(self: &Arc<Self>, url: String, range: Option<String>, head: bool) -> Reply {
        let asked = Instant::now();
        let pos = self.segments.lock().expect("lock").entries.get(&url).cloned();
        let segment_secs = pos.as_ref().map(|p| p.list[p.index].duration);
        // The player runs dry when its buffer does (if it tells us); else allow one segment's play time.
        let budget =
            self.stats.buffer_left().or(segment_secs.map(Duration::from_secs_f64)).unwrap_or(self.cfg.default_deadline);
        // Players often ask for a whole object as `Range: bytes=0-`; that is not a partial request.
        let whole = range.as_deref().is_none_or(|r| r.trim() == "bytes=0-");
        let range = if whole { None } else { range };
        // A whole-segment request the prefetcher already has (or is fetching) is served from memory.
        if whole && !head {
            if let Some(cell) = self.prefetch.get(&url).await {
                // Waits for a prefetch in progress, for half the player's budget at most: then its own
                // fetch starts (joining the nodes' fills of the prefetch). One that failed (None) falls
                // through to a fresh fetch too.
                let prefetched = tokio::time::timeout(budget / 2, cell.get_or_init(|| async { None })).await;
                if let Ok(Some(bytes)) = prefetched.cloned() {
                    self.stats.request("segment");
                    self.stats.prefetch_hit();
                    if let Some(p) = &pos {
                        self.prefetch_after(p, asked).await;
                    }
                    let len = bytes.len() as u64;
                    return with_length(reply(StatusCode::OK, "application/octet-stream", bytes), len);
                }
            }
        }
        let resolved = match self.resolved(&url, range_start(range.as_deref())).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(url, error = %e, "fog cannot serve this object; passing it through from the origin");
                return self.passthrough(&url, range, head, reason_code(&e)).await;
            }
        };
        // Ingest has not learnt the object's size yet: the origin answers this request, as without fogcdn.
        if !resolved.manifest().size_known() {
            return self.passthrough(&url, range, head, "ingesting").await;
        }
        self.stats.request(if range.is_some() { "range" } else { "segment" });
        let size = resolved.manifest().size;
        let span = match parse_range(range.as_deref(), size) {
            Ok(s) => s,
            Err(()) => {
                let mut r = reply(StatusCode::RANGE_NOT_SATISFIABLE, "text/plain", "");
                r.headers_mut().insert(CONTENT_RANGE, header(&format!("bytes */{size}")));
                return r;
            }
        };
        let (start, end) = span.unwrap_or((0, size));
        let content_type =
            resolved.manifest().content_type.clone().unwrap_or_else(|| "application/octet-stream".into());
        let mut resp: Reply = Response::new(http_server::empty_body());
        *resp.status_mut() = if span.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
        resp.headers_mut().insert(CONTENT_TYPE, header(&content_type));
        resp.headers_mut().insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        resp.headers_mut().insert(CONTENT_LENGTH, header(&(end - start).to_string()));
        if span.is_some() {
            resp.headers_mut().insert(CONTENT_RANGE, header(&format!("bytes {start}-{}/{size}", end - 1)));
        }
        if head {
            return resp;
        }
        let deadline = asked + budget;
        let (reader, mut writer) = tokio::io::duplex(PIPE);
        let proxy = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut written = 0;
            let opts = FetchOptions { range: span, deadline: Some(deadline) };
            let fetched = proxy.client.fetch_resolved(&resolved, opts, &mut writer, &mut written).await;
            // Prefetching starts once the segment the player waits for is out, not against it: at startup
            // a player's first segment would otherwise share the nodes' uplinks with the next four.
            if let Some(p) = &pos {
                proxy.prefetch_after(p, asked).await;
            }
            match fetched {
                Ok(report) => proxy.stats.fetched(&report, started.elapsed(), segment_secs),
                // The player went away (a seek, a closed tab): nothing is wrong.
                Err(ClientError::Output(_)) => tracing::debug!(url, written, "player stopped reading"),
                // The origin object changed since ingest: headers are out, so end the body early (the
                // player retries) and have the tracker ingest the new version for that retry.
                Err(ClientError::ContentChanged { .. }) => {
                    tracing::warn!(url, "origin object changed since ingest; refreshing its manifest");
                    proxy.manifests.invalidate(&url).await;
                    if let Ok(fresh) = proxy.client.resolve_changed(&url, &resolved).await {
                        if fresh.manifest().is_complete() {
                            proxy.manifests.insert(url, fresh).await;
                        }
                    }
                }
                // Headers are out; ending the body early makes the player retry.
                Err(e) => tracing::warn!(url, error = %e, written, "fetch for the player failed"),
            }
            let _ = writer.shutdown().await;
        });
        *resp.body_mut() = reader_body(reader);
        resp
    }

    /// Starts fetching the segments after `pos` that fall within the prefetch window; the player asked for
    /// `pos` at `asked`, which is when its playhead was there.
    async fn prefetch_after(self: &Arc<Self>, pos: &SegmentPos, asked: Instant) {
        let mut ahead = Duration::ZERO;
        let mut started = 0;
        for next in pos.list.iter().skip(pos.index + 1) {
            if started >= self.cfg.prefetch_segments || ahead >= self.cfg.prefetch_window {
                break;
            }
            // The playhead reaches this segment once everything before it has played.
            let due = (ahead + Duration::from_secs_f64(pos.list[pos.index].duration)).saturating_sub(asked.elapsed());
            ahead += Duration::from_secs_f64(next.duration);
            let cell = Prefetched::default();
            if !self.prefetch.entry(next.url.clone()).or_insert(cell.clone()).await.is_fresh() {
                continue;
            }
            started += 1;
            let (proxy, url) = (self.clone(), next.url.clone());
            let secs = next.duration;
            tokio::spawn(async move {
                let fetched = cell.get_or_init(|| proxy.prefetch_one(&url, due, secs)).await.is_some();
                // Put it again to weigh it by its bytes; when there is nothing to keep, forget it, so the player's
                // request (or a later prefetch) fetches it. One the cache dropped meanwhile stays out.
                proxy
                    .prefetch
                    .entry(url)
                    .and_compute_with(|cached| {
                        let op = match cached {
                            Some(c) if Arc::ptr_eq(c.value(), &cell) && fetched => Op::Put(cell.clone()),
                            Some(c) if Arc::ptr_eq(c.value(), &cell) => Op::Remove,
                            _ => Op::Nop,
                        };
                        std::future::ready(op)
                    })
                    .await;
            });
        }
    }

    async fn prefetch_one(&self, url: &str, due: Duration, secs: f64) -> Option<Bytes> {
        let resolved = self.resolved(url, 0).await.ok()?;
        let started = Instant::now();
        let mut out = Vec::with_capacity(resolved.manifest().size as usize);
        let mut written = 0;
        let opts = FetchOptions { range: None, deadline: Some(Instant::now() + due) };
        match self.client.fetch_resolved(&resolved, opts, &mut out, &mut written).await {
            Ok(report) => {
                self.stats.fetched(&report, started.elapsed(), Some(secs.max(due.as_secs_f64())));
                Some(Bytes::from(out))
            }
            Err(e) => {
                tracing::debug!(url, error = %e, "prefetch failed; the player's own request will fetch it");
                None
            }
        }
    }

    /// Streams the object straight from the origin, forwarding a `Range`.
    async fn passthrough(
        self: &Arc<Self>,
        url: &str,
        range: Option<String>,
        head: bool,
        reason: &'static str,
    ) -> Reply {
        self.stats.request("passthrough");
        let mut req = if head { self.http.head(url) } else { self.http.get(url) };
        if let Some(r) = &range {
            req = req.header(RANGE, r);
        }
        let mut upstream = match req.send().await {
            Ok(r) => r,
            Err(e) => return reply(StatusCode::BAD_GATEWAY, "text/plain", format!("origin unreachable: {e}\n")),
        };
        let mut resp: Reply = Response::new(http_server::empty_body());
        *resp.status_mut() = StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        for name in [CONTENT_TYPE, CONTENT_LENGTH, CONTENT_RANGE, ACCEPT_RANGES] {
            if let Some(v) =
                upstream.headers().get(name.as_str()).and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
            {
                resp.headers_mut().insert(name, v);
            }
        }
        if head {
            return resp;
        }
        let (reader, mut writer) = tokio::io::duplex(PIPE);
        let proxy = self.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok(Some(piece)) = upstream.chunk().await {
                n += piece.len() as u64;
                if writer.write_all(&piece).await.is_err() {
                    break;
                }
            }
            proxy.stats.passthrough(n, reason);
            let _ = writer.shutdown().await;
        });
        *resp.body_mut() = reader_body(reader);
        resp
    }
}

fn reason_code(e: &fog_net::tracker::TrackerError) -> &'static str {
    match e.code() {
        Some(fog_proto::api::ErrorCode::UnknownOrigin) => "unknown_origin",
        Some(_) => "tracker_refused",
        None => "tracker_unreachable",
    }
}

fn header(v: &str) -> HeaderValue {
    HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

fn with_length(mut r: Response<Body>, len: u64) -> Response<Body> {
    r.headers_mut().insert(CONTENT_LENGTH, header(&len.to_string()));
    r.headers_mut().insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Ok(Some((0, 10))));
        assert_eq!(parse_range(Some("bytes=90-"), 100), Ok(Some((90, 100))));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Ok(Some((90, 100))));
        assert_eq!(parse_range(Some("bytes=50-500"), 100), Ok(Some((50, 100))));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Err(()));
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Ok(None));
    }

    fn segments(prefix: &str, range: std::ops::Range<usize>) -> Vec<Segment> {
        range.map(|i| Segment { url: format!("http://o/{prefix}{i}.ts"), duration: 2.0 }).collect()
    }

    #[test]
    fn a_live_playlist_keeps_one_list_in_the_segment_index() {
        let mut index = SegmentIndex::default();
        for start in 0..500 {
            index.insert("http://o/live.m3u8", segments("s", start..start + 10));
        }
        assert_eq!((index.lists.len(), index.segments, index.entries.len()), (1, 10, 10));
        assert_eq!(index.entries["http://o/s499.ts"].index, 0);
        index.insert("http://o/other.m3u8", segments("t", 0..5));
        assert_eq!((index.lists.len(), index.segments, index.entries.len()), (2, 15, 15));
    }

    #[test]
    fn the_segment_index_is_bounded() {
        let mut index = SegmentIndex::default();
        index.insert("http://o/huge.m3u8", segments("s", 0..MAX_SEGMENT_INDEX * 3));
        assert_eq!(index.segments, MAX_SEGMENT_INDEX);
        for i in 0..10 {
            index.insert(&format!("http://o/{i}.m3u8"), segments(&format!("{i}/"), 0..MAX_SEGMENT_INDEX / 4));
            assert!(index.segments <= MAX_SEGMENT_INDEX && index.entries.len() <= MAX_SEGMENT_INDEX);
        }
        let long = "x".repeat(SEGMENT_INDEX_BYTES / 100);
        index.insert("http://o/long.m3u8", segments(&long, 0..200));
        assert!(index.url_bytes <= SEGMENT_INDEX_BYTES && index.segments < 200, "{}", index.segments);
    }

    #[tokio::test]
    async fn one_weight_bounds_both_count_and_bytes() {
        let cache = lru_cache(
            PLAYLIST_CACHE_BYTES,
            |_, body: &Bytes| weight(body.len() as u64, PLAYLIST_CACHE_BYTES, MAX_PLAYLISTS),
            None,
        );
        for i in 0..MAX_PLAYLISTS * 4 {
            cache.insert(format!("http://o/{i}.m3u8"), Bytes::from_static(b"#EXTM3U\n")).await;
        }
        cache.run_pending_tasks().await;
        assert_eq!(cache.entry_count(), MAX_PLAYLISTS);
        let big = Bytes::from(vec![0; (PLAYLIST_CACHE_BYTES / 10) as usize]);
        for i in 0..20 {
            cache.insert(format!("http://o/big{i}.m3u8"), big.clone()).await;
        }
        cache.run_pending_tasks().await;
        let bytes: u64 = cache.iter().map(|(_, body)| body.len() as u64).sum();
        assert!(bytes <= PLAYLIST_CACHE_BYTES, "{bytes}");
        assert!(cache.contains_key("http://o/big19.m3u8"), "the newest entry stays");
    }

    #[test]
    fn only_local_hosts() {
        assert!(is_loopback_host("127.0.0.1:7780"));
        assert!(is_loopback_host("localhost:1"));
        assert!(is_loopback_host("[::1]:7780"));
        assert!(!is_loopback_host("evil.example:7780"));
        assert!(!is_loopback_host("127.0.0.1.evil.example"));
    }
}
