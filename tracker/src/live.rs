//! Live push (issue #17, item 3; the simulator's model is `docs/simulation.md`, "Live push"): the tracker
//! follows the live HLS playlists players watch, ingests each new segment once, and pushes its chunks to the
//! chunk's home in every cell with viewers, before the viewers ask. Viewers of a channel in a cell then get
//! each segment from the cell, and the origin serves it to the tracker's ingest and to one fill.
//!
//! - *Viewers.* A player's proxy reports each live media playlist it fetches (at most every few seconds,
//!   `ClientReport::live_playlists`). A viewer is the reporting source (IPv4 address, IPv6 /64: players
//!   behind one address share a network, so a cell, and count once), counted per playlist until
//!   [`VIEWER_TTL`] after its last report, with the node the scheduler would send it to first: its cell is
//!   the viewer's (looked up at push time, so a cell that changed since the report counts).
//! - *Following.* A playlist is followed (at most [`MAX_FOLLOWED`], each source starting only so many) while
//!   it has viewers: fetched from its registered origin at its target duration, with a timeout and a size
//!   bound. One that cannot be read (an error, not HLS, a master playlist) is counted and logged, and
//!   dropped after [`MAX_FAILURES`] polls in a row; an ended one (`#EXT-X-ENDLIST`) is dropped at once.
//! - *New segments*: those a poll lists that no earlier poll did (the first poll only learns the list:
//!   players are fetching those already). Each is ingested through the ingest path — one origin read,
//!   shared with resolves of the same URL — at most [`NEW_PER_POLL`] per poll.
//! - *Pushes.* Each chunk of a new segment goes to its home in each cell with viewers (the cells with the
//!   most viewers first, never more homes than the channel has viewers; with cells off, or a node in none
//!   yet, to the viewers' first nodes themselves), skipping homes whose recent
//!   assignments exceed [`LOADED_SECS`] of their upload or that have [`PUSHES_PER_HOME`] pushes under way,
//!   at most [`PUSHES_IN_FLIGHT`] at once. A push is a chunk request with the push flag
//!   (`fog_proto::wire::NodeRequest::Push`), an origin hint and a ticket that assigns the chunk to the home:
//!   the home fills it as for any miss (its cell's peers, then the origin), keeps it and answers with a
//!   response head only, so its uplink is spent on viewers, not on the tracker.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_net::frame_io::{read_frame, write_last_frame};
use fog_net::origin::OriginError;
use fog_net::per_source::{source_of, PerSource};
use fog_net::transport;
use fog_proto::api::{now_ms, Families, NodeContact};
use fog_proto::credits::ticket_on_wire;
use fog_proto::hls::{media_playlist, PlaylistError};
use fog_proto::wire::{ChunkRequest, FrameError, NodeRequest, OriginHint, ResponseHead, Status};
use fog_proto::{ChunkHash, Manifest, NodeId};
use fog_sched::cells::CellKey;
use fog_sched::scheduler::{self, Load};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::app::App;
use crate::ingest::IngestError;
use crate::ledger::LedgerError;
use crate::metrics::ResultLabel;

/// Live playlists followed at once; reports of others are ignored until one ends.
pub const MAX_FOLLOWED: usize = 64;
/// Playlists one source may start following: a burst, then this many a minute.
const FOLLOWS_PER_SOURCE: (u32, u32) = (8, 8);
/// Viewers counted over all playlists.
const MAX_VIEWERS: usize = 100_000;
/// How long a viewer counts after its last report (a proxy reports each playlist at least every 10 s while
/// its player reloads it).
pub const VIEWER_TTL: Duration = Duration::from_secs(30);
/// Largest playlist read, and how long a poll may take.
const MAX_PLAYLIST_BYTES: u64 = 4 << 20;
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on the poll interval (the playlist's target duration); without one, the default.
const MIN_POLL: Duration = Duration::from_secs(1);
const MAX_POLL: Duration = Duration::from_secs(30);
const DEFAULT_POLL: Duration = Duration::from_secs(6);
/// Polls in a row that may fail before a playlist is no longer followed.
const MAX_FAILURES: u32 = 5;
/// New segments ingested per poll, the newest (a playlist that suddenly lists hundreds is not a reason to
/// read them all); and segment URLs remembered per playlist, to know which are new.
const NEW_PER_POLL: usize = 4;
const REMEMBERED: usize = 1024;
/// How long a new segment's ingest may take before it is not pushed (viewers fetch it as any object).
const INGEST_WAIT: Duration = Duration::from_secs(60);
/// Chunks of one segment pushed (segments are a few MiB), and viewers' first nodes looked at per segment.
const MAX_PUSHED_CHUNKS: usize = 16;
const MAX_PLACES: usize = 256;
/// Pushes under way at once, in all and per home.
const PUSHES_IN_FLIGHT: usize = 32;
const PUSHES_PER_HOME: usize = 2;
/// A home whose recent assignments exceed this many seconds of its upload is loaded: it is not pushed to
/// (the scheduler's own floor of a node's share, `Params::min_load_secs`).
const LOADED_SECS: f64 = 15.0;
/// How long a push may take: the handshake, then the home's fill.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// Playlists waiting for a follower task to start.
const START_QUEUE: usize = MAX_FOLLOWED;

/// Why a followed playlist or one of its segments could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("reading the playlist: {0}")]
    Origin(#[from] OriginError),
    #[error("the playlist did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Playlist(#[from] PlaylistError),
    #[error("ingesting a segment: {0}")]
    Ingest(#[from] IngestError),
    #[error("the segment was not ingested within {0:?}")]
    IngestTimeout(Duration),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
}

impl LiveError {
    /// Whether a later poll may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Origin(e) => e.is_retryable(),
            Self::Timeout(_) | Self::IngestTimeout(_) => true,
            Self::Playlist(_) => false,
            Self::Ingest(e) => e.is_retryable(),
            Self::Ledger(e) => e.is_retryable(),
        }
    }

    /// The `fog_tracker_live_polls_total{result}` label of a failed poll.
    fn poll_result(&self) -> &'static str {
        match self {
            Self::Origin(OriginError::TooLarge { .. }) => "too_large",
            Self::Origin(_) => "origin_error",
            Self::Timeout(_) => "timeout",
            Self::Playlist(PlaylistError::NotHls) => "not_hls",
            Self::Playlist(PlaylistError::Master) => "master",
            Self::Ingest(_) | Self::IngestTimeout(_) | Self::Ledger(_) => "internal",
        }
    }
}

/// Why a push did not leave the home holding the chunk.
#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error("{0}")]
    Connect(#[from] transport::ConnectError),
    #[error("stream: {0}")]
    Stream(String),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("refused ({status:?}): {message}")]
    Refused { status: Status, message: String },
    #[error("the home holds {got} bytes, not the chunk's {want}")]
    WrongLength { got: u32, want: u32 },
}

/// One viewer of a playlist: the node it is sent to first, and when it last said it watches.
#[derive(Debug, Clone, Copy)]
struct Viewer {
    node: Option<NodeId>,
    seen: Instant,
}

/// The followed playlists and their viewers, by playlist URL (canonical).
#[derive(Debug)]
pub struct Live {
    channels: Mutex<HashMap<String, HashMap<IpAddr, Viewer>>>,
    start: mpsc::Sender<String>,
    pub(crate) start_rx: Mutex<Option<mpsc::Receiver<String>>>,
    follows_by_source: PerSource,
    pushes: Arc<Semaphore>,
    pushing: Mutex<HashMap<NodeId, usize>>,
}

impl Default for Live {
    fn default() -> Self {
        let (start, start_rx) = mpsc::channel(START_QUEUE);
        Self {
            channels: Mutex::default(),
            start,
            start_rx: Mutex::new(Some(start_rx)),
            follows_by_source: PerSource::new(FOLLOWS_PER_SOURCE.1, FOLLOWS_PER_SOURCE.0),
            pushes: Arc::new(Semaphore::new(PUSHES_IN_FLIGHT)),
            pushing: Mutex::default(),
        }
    }
}

/// What a report of a playlist did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// A viewer counted for a playlist already followed.
    Counted,
    /// The playlist is followed from now on.
    Started,
    /// Not followed: the tracker follows [`MAX_FOLLOWED`] already, or the source started its share.
    Refused,
}

impl Live {
    /// Counts the viewer at `peer` (sent to `node` first) of `playlist`, and starts following it if need be.
    pub fn watch(&self, playlist: &str, peer: IpAddr, node: Option<NodeId>, now: Instant) -> Watched {
        let mut channels = self.channels.lock().expect("live lock");
        let viewer = Viewer { node, seen: now };
        let viewers: usize = channels.values().map(HashMap::len).sum();
        if let Some(channel) = channels.get_mut(playlist) {
            if channel.contains_key(&source_of(peer)) || viewers < MAX_VIEWERS {
                channel.insert(source_of(peer), viewer);
            }
            return Watched::Counted;
        }
        if channels.len() >= MAX_FOLLOWED || viewers >= MAX_VIEWERS || !self.follows_by_source.check(peer) {
            return Watched::Refused;
        }
        if self.start.try_send(playlist.to_string()).is_err() {
            return Watched::Refused;
        }
        channels.insert(playlist.to_string(), HashMap::from([(source_of(peer), viewer)]));
        Watched::Started
    }

    /// The nodes viewers of `playlist` are sent to first and how many viewers each, most first, after
    /// forgetting viewers not heard from within [`VIEWER_TTL`]; `None` when none is left (the playlist is
    /// then no longer followed).
    fn places(&self, playlist: &str, now: Instant) -> Option<Vec<(NodeId, usize)>> {
        let mut channels = self.channels.lock().expect("live lock");
        let channel = channels.get_mut(playlist)?;
        channel.retain(|_, v| now.saturating_duration_since(v.seen) < VIEWER_TTL);
        if channel.is_empty() {
            channels.remove(playlist);
            return None;
        }
        let mut places: HashMap<NodeId, usize> = HashMap::new();
        for node in channel.values().filter_map(|v| v.node) {
            *places.entry(node).or_default() += 1;
        }
        let mut places: Vec<(NodeId, usize)> = places.into_iter().collect();
        places.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Some(places)
    }

    /// Stops following `playlist`.
    fn stop(&self, playlist: &str) {
        self.channels.lock().expect("live lock").remove(playlist);
    }

    /// Playlists followed and viewers counted.
    pub fn counts(&self) -> (usize, usize) {
        let channels = self.channels.lock().expect("live lock");
        (channels.len(), channels.values().map(HashMap::len).sum())
    }

    /// Takes a place for one more push to `home`, if neither bound is reached.
    fn hold_push(self: &Arc<Self>, home: NodeId) -> Option<PushSlot> {
        let permit = self.pushes.clone().try_acquire_owned().ok()?;
        let mut pushing = self.pushing.lock().expect("pushing lock");
        let n = pushing.entry(home).or_default();
        if *n >= PUSHES_PER_HOME {
            return None;
        }
        *n += 1;
        Some(PushSlot { live: self.clone(), home, _permit: permit })
    }
}

/// A push's place among those in flight, given back when the push ends.
struct PushSlot {
    live: Arc<Live>,
    home: NodeId,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for PushSlot {
    fn drop(&mut self) {
        let mut pushing = self.live.pushing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = pushing.get_mut(&self.home) {
            *n -= 1;
            if *n == 0 {
                pushing.remove(&self.home);
            }
        }
    }
}

impl App {
    /// A client's report that it plays the live `playlists`, from `peer`: each under a registered origin is
    /// followed (within the bounds), with the client counted as a viewer.
    pub(crate) fn watch_live(&self, playlists: &[String], peer: IpAddr) {
        let mut node = None;
        for url in playlists {
            let Ok(url) = fog_proto::origins::canonical_url(url) else { continue };
            if !self.cfg.origins.allows(&url) {
                tracing::debug!(url, "live playlist not under a registered origin; not followed");
                continue;
            }
            let node = *node.get_or_insert_with(|| self.first_node(peer, &url));
            match self.live.watch(&url, peer, node, Instant::now()) {
                Watched::Started => tracing::info!(url, "following a live playlist"),
                Watched::Refused => tracing::info!(url, "not following a live playlist: too many followed"),
                Watched::Counted => {}
            }
        }
        self.count_live();
    }

    /// The node the scheduler sends a client at `peer` to first (for a chunk keyed by the playlist, on a
    /// scratch load): where its proxy fetches the playlist's segments from, or a node as close.
    fn first_node(&self, peer: IpAddr, playlist: &str) -> Option<NodeId> {
        let snapshot = self.registry.snapshot();
        let client = self.clients.lock().expect("clients lock").get(peer);
        let key = [(ChunkHash::of(playlist.as_bytes()), 1)];
        let params = self.registry.params();
        let (nodes, schedule) = scheduler::schedule(
            &snapshot,
            &mut Load::default(),
            client.as_ref(),
            Families::BOTH,
            &key,
            params,
            now_ms(),
        );
        let first = *schedule.first()?.first()?;
        Some(nodes.get(first as usize)?.id)
    }

    fn count_live(&self) {
        let (playlists, viewers) = self.live.counts();
        self.metrics.live.playlists.set(playlists as i64);
        self.metrics.live.viewers.set(viewers as i64);
    }
}

/// Follows each playlist [`Live::watch`] started, until the process ends.
pub async fn follow_forever(app: Arc<App>, mut started: mpsc::Receiver<String>) {
    let mut followers = JoinSet::new();
    loop {
        tokio::select! {
            Some(url) = started.recv() => {
                followers.spawn(follow(app.clone(), url));
            }
            Some(_) = followers.join_next(), if !followers.is_empty() => {}
            else => return,
        }
    }
}

/// Polls `url` at its target duration while it has viewers, pushing each new segment.
async fn follow(app: Arc<App>, url: String) {
    let mut known: Option<Vec<String>> = None;
    let mut failures = 0;
    let mut pushes = JoinSet::new();
    loop {
        let interval = match poll(&app, &url, &mut known, &mut pushes).await {
            Ok(Some(interval)) => {
                failures = 0;
                app.metrics.live.polls.get_or_create(&ResultLabel { result: "ok" }).inc();
                interval
            }
            Ok(None) => {
                app.metrics.live.polls.get_or_create(&ResultLabel { result: "ended" }).inc();
                tracing::info!(url, "live playlist ended; no longer followed");
                break;
            }
            Err(e) => {
                failures += 1;
                app.metrics.live.polls.get_or_create(&ResultLabel { result: e.poll_result() }).inc();
                tracing::warn!(url, error = %e, failures, "cannot read a followed live playlist");
                if !e.is_retryable() || failures >= MAX_FAILURES {
                    app.dashboard.event("live_error", format!("{url}: no longer followed: {e}"));
                    break;
                }
                DEFAULT_POLL
            }
        };
        tokio::time::sleep(interval).await;
        while pushes.try_join_next().is_some() {}
        if app.live.places(&url, Instant::now()).is_none() {
            tracing::info!(url, "live playlist has no viewers left; no longer followed");
            break;
        }
    }
    app.live.stop(&url);
    app.count_live();
    // Pushes under way finish: their homes are filling already.
    while pushes.join_next().await.is_some() {}
}

/// One poll: reads the playlist, starts pushing its new segments; the time to the next poll, or `None`
/// once it ended.
async fn poll(
    app: &Arc<App>,
    url: &str,
    known: &mut Option<Vec<String>>,
    pushes: &mut JoinSet<()>,
) -> Result<Option<Duration>, LiveError> {
    let text = tokio::time::timeout(POLL_TIMEOUT, read_playlist(app, url))
        .await
        .map_err(|_| LiveError::Timeout(POLL_TIMEOUT))??;
    let playlist = media_playlist(&text, url)?;
    let listed: Vec<String> = playlist.segments.iter().map(|s| s.url.clone()).collect();
    let fresh = match known.as_mut() {
        Some(known) => new_segments(known, &listed),
        None => {
            // The first poll learns the list: players are fetching those segments already.
            *known = Some(listed.iter().rev().take(REMEMBERED).rev().cloned().collect());
            Vec::new()
        }
    };
    for segment in fresh {
        // Segment URLs come from the origin's playlist: held to the registered origins like any other.
        let Ok(segment) = fog_proto::origins::canonical_url(&segment) else { continue };
        if !app.cfg.origins.allows(&segment) {
            continue;
        }
        let (app, url) = (app.clone(), url.to_string());
        pushes.spawn(async move {
            if let Err(e) = push_segment(&app, &url, &segment).await {
                app.metrics.live.segment_errors.inc();
                tracing::warn!(playlist = url, segment, error = %e, "live segment not pushed");
            }
        });
    }
    if playlist.ended {
        return Ok(None);
    }
    let every = playlist.target_duration.map_or(DEFAULT_POLL, Duration::from_secs_f64);
    Ok(Some(every.clamp(MIN_POLL, MAX_POLL)))
}

/// The segments of `listed` not in `known` (the newest [`NEW_PER_POLL`] of them), remembering them.
fn new_segments(known: &mut Vec<String>, listed: &[String]) -> Vec<String> {
    let seen: HashSet<&String> = known.iter().collect();
    let fresh: Vec<String> = listed.iter().filter(|s| !seen.contains(s)).cloned().collect();
    known.extend(fresh.iter().cloned());
    let excess = known.len().saturating_sub(REMEMBERED);
    known.drain(..excess);
    let skip = fresh.len().saturating_sub(NEW_PER_POLL);
    fresh.into_iter().skip(skip).collect()
}

/// The playlist's text, read from its registered origin within [`MAX_PLAYLIST_BYTES`].
async fn read_playlist(app: &App, url: &str) -> Result<String, LiveError> {
    let mut body = app.ingest.origin().get(url, MAX_PLAYLIST_BYTES).await?;
    let mut raw = Vec::new();
    while let Some(piece) = body.next_piece().await? {
        raw.extend_from_slice(&piece);
    }
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// Ingests `segment` of `playlist` and pushes its chunks to the homes of the cells with viewers.
async fn push_segment(app: &Arc<App>, playlist: &str, segment: &str) -> Result<(), LiveError> {
    let manifest = app.ingest.complete(segment, INGEST_WAIT).await?.ok_or(LiveError::IngestTimeout(INGEST_WAIT))?;
    app.metrics.live.segments.inc();
    let Some(places) = app.live.places(playlist, Instant::now()) else { return Ok(()) };
    let targets = homes(app, &manifest, &places[..places.len().min(MAX_PLACES)]);
    if targets.is_empty() {
        return Ok(());
    }
    // One ticket for the segment: each home assigned the chunks pushed to it, so it may fill them.
    let mut ids: Vec<NodeId> = Vec::new();
    let mut assigned: Vec<u32> = Vec::new();
    for (_, home) in &targets {
        match ids.iter().position(|id| *id == home.id) {
            Some(i) => assigned[i] += 1,
            None => {
                ids.push(home.id);
                assigned.push(1);
            }
        }
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng).verifying_key().into();
    let ticket =
        app.ledger.issue_ticket(None, key, manifest.content_id(), ids, assigned, manifest.chunk_size, manifest.size)?;
    let Some(ticket) = ticket.as_ref().and_then(ticket_on_wire) else {
        tracing::warn!(segment, "no ticket for a live push; not pushed");
        return Ok(());
    };
    let Some(endpoint) = app.dialer.clone() else { return Ok(()) };
    let mut running = JoinSet::new();
    for (index, home) in targets {
        let Some(slot) = app.live.hold_push(home.id) else {
            app.metrics.live.pushes.get_or_create(&ResultLabel { result: "skipped_busy" }).inc();
            continue;
        };
        let (offset, length) = manifest.chunk_span(index);
        let req = ChunkRequest {
            hash: manifest.chunks[index],
            range: None,
            origin: Some(OriginHint { url: manifest.url.clone(), offset, length }),
            receipt: None,
            ticket: Some(ticket.clone()),
            groups: manifest.group_hashes(index),
        };
        let (app, endpoint) = (app.clone(), endpoint.clone());
        running.spawn(async move {
            let _slot = slot;
            let result = match push(&endpoint, &home, req, length).await {
                Ok(()) => "ok",
                Err(e) => {
                    tracing::info!(node = %home.id, error = %e, "live push failed");
                    "failed"
                }
            };
            app.metrics.live.pushes.get_or_create(&ResultLabel { result }).inc();
        });
    }
    while running.join_next().await.is_some() {}
    Ok(())
}

/// Each chunk of `manifest` (its index) with its home in the cell of each of `places` (viewers' first
/// nodes; the node itself when it is in no cell), once per home and chunk: never more homes than viewers.
/// Homes that are loaded, or not schedulable now, are left out.
fn homes(app: &App, manifest: &Manifest, places: &[(NodeId, usize)]) -> Vec<(usize, NodeContact)> {
    let snapshot = app.registry.snapshot();
    let params = app.registry.params();
    let now = now_ms();
    let cells: Vec<Option<CellKey>> = places.iter().map(|(node, _)| app.registry.cell_of_node(node)).collect();
    let mut out = Vec::new();
    for (index, hash) in manifest.chunks.iter().enumerate().take(MAX_PUSHED_CHUNKS) {
        let mut seen = HashSet::new();
        for ((node, _), cell) in places.iter().zip(&cells) {
            let home = cell.and_then(|c| app.registry.cell_home(c, hash)).unwrap_or(*node);
            if !seen.insert(home) {
                continue;
            }
            let Ok(at) = snapshot.nodes.binary_search_by(|n| n.contact.id.cmp(&home)) else { continue };
            let node = &snapshot.nodes[at];
            let assigned = app.load.lock().expect("load lock").assigned(&home, now, params);
            if assigned > node.upload.max(1) as f64 * LOADED_SECS {
                app.metrics.live.pushes.get_or_create(&ResultLabel { result: "skipped_loaded" }).inc();
                continue;
            }
            out.push((index, node.contact.clone()));
        }
    }
    out
}

/// Pushes one chunk to `home`: a push request, answered with a head once the home holds the chunk.
async fn push(endpoint: &quinn::Endpoint, home: &NodeContact, req: ChunkRequest, len: u32) -> Result<(), PushError> {
    let conn = transport::connect_contact(endpoint, home, PUSH_TIMEOUT, CONNECT_TIMEOUT).await?;
    let answer = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| PushError::Stream(e.to_string()))?;
        let frame = NodeRequest::Push(req).encode_framed()?;
        write_last_frame(&mut send, &frame).await.map_err(|e| PushError::Stream(e.to_string()))?;
        read_frame::<ResponseHead, _>(&mut recv).await.map_err(|e| PushError::Stream(e.to_string()))
    };
    let head = tokio::time::timeout(PUSH_TIMEOUT, answer).await.map_err(|_| PushError::Timeout(PUSH_TIMEOUT));
    conn.close(0u32.into(), b"push done");
    match head?? {
        ResponseHead::Ok { len: got } if got == len => Ok(()),
        ResponseHead::Ok { len: got } => Err(PushError::WrongLength { got, want: len }),
        ResponseHead::Error { status, message } => Err(PushError::Refused { status, message }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_segments_no_poll_listed_before_are_new_and_memory_is_bounded() {
        let urls = |r: std::ops::Range<usize>| r.map(|i| format!("http://o/s{i}.ts")).collect::<Vec<_>>();
        let mut known = urls(0..5);
        assert!(new_segments(&mut known, &urls(1..5)).is_empty());
        assert_eq!(new_segments(&mut known, &urls(3..7)), urls(5..7));
        // A playlist that suddenly lists many new ones: only the newest are pushed, all are remembered.
        assert_eq!(new_segments(&mut known, &urls(7..107)), urls(107 - NEW_PER_POLL..107));
        assert!(new_segments(&mut known, &urls(50..107)).is_empty());
        new_segments(&mut known, &urls(1000..1000 + 3 * REMEMBERED));
        assert_eq!(known.len(), REMEMBERED);
    }

    #[test]
    fn viewers_expire_and_the_bounds_hold() {
        let live = Live::default();
        let now = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().expect("ip"), "2001:db8::1".parse().expect("ip"));
        let (n1, n2) = (NodeId([1; 32]), NodeId([2; 32]));
        assert_eq!(live.watch("http://o/a.m3u8", a, Some(n1), now), Watched::Started);
        assert_eq!(live.watch("http://o/a.m3u8", b, Some(n2), now), Watched::Counted);
        // The same /64: the same viewer.
        let b2: IpAddr = "2001:db8::2".parse().expect("ip");
        assert_eq!(live.watch("http://o/a.m3u8", b2, Some(n2), now + VIEWER_TTL / 2), Watched::Counted);
        assert_eq!(live.counts(), (1, 2));
        assert_eq!(live.places("http://o/a.m3u8", now).expect("viewers").len(), 2);
        // a's report expires; b's (renewed) does not yet.
        assert_eq!(live.places("http://o/a.m3u8", now + VIEWER_TTL), Some(vec![(n2, 1)]));
        assert_eq!(live.places("http://o/a.m3u8", now + 2 * VIEWER_TTL), None, "no viewers: not followed");
        assert_eq!(live.counts(), (0, 0));
        // At most MAX_FOLLOWED playlists, and each source starts only its share.
        let live = Live::default();
        let mut started = 0;
        for i in 0..2 * MAX_FOLLOWED {
            let peer = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            if live.watch(&format!("http://o/{i}.m3u8"), peer, None, now) == Watched::Started {
                started += 1;
            }
        }
        assert_eq!(started, MAX_FOLLOWED);
        let one = IpAddr::from([198, 51, 100, 1]);
        let live = Live::default();
        let from_one = (0..2 * FOLLOWS_PER_SOURCE.0)
            .filter(|i| live.watch(&format!("http://o/{i}.m3u8"), one, None, now) == Watched::Started)
            .count();
        assert_eq!(from_one, FOLLOWS_PER_SOURCE.0 as usize);
    }

    #[tokio::test]
    async fn pushes_in_flight_are_bounded_per_home() {
        let live = Arc::new(Live::default());
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let held: Vec<PushSlot> = (0..PUSHES_PER_HOME).map(|_| live.hold_push(a).expect("room")).collect();
        assert!(live.hold_push(a).is_none(), "the home has its share");
        let other = live.hold_push(b).expect("another home has room");
        drop(held);
        drop(other);
        assert!(live.pushing.lock().expect("lock").is_empty());
        assert!(live.hold_push(a).is_some());
    }
}
