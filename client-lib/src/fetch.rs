//! `FogClient`: resolve → fetch verified chunks from scheduled nodes in parallel → origin fallback.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use fog_proto::api::{ClientReport, ErrorCode, NodeContact, Resolve, Signed, MAX_CLIENT_RTTS};
use fog_proto::credits::{
    payment_chain, ticket_on_wire, Commitment, Digest, Receipt, Ticket, TicketId, KIND_COMMITMENT, KIND_TICKET,
};
use fog_proto::groups::{Gate, Verifier, MAX_GROUPS_PER_CHUNK};
use fog_proto::origins::OriginList;
use fog_proto::wire::{ChunkRequest, OriginHint, Status};
use fog_proto::{ContentId, Manifest, NodeId};
use moka::future::Cache;
use moka::ops::compute::Op;
use moka::policy::EvictionPolicy;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use fog_net::chunk::{self, ChunkError, Deadlines, StreamError};
use fog_net::origin::{OriginClient, OriginError, SharedOrigins};
use fog_net::tracker::{CurrentTracker, TrackerClient, TrackerError};
use fog_net::transport::{self, TransportError};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Tracker base URL, or several comma-separated (replicas of one cell; see [`fog_net::trackers`]).
    /// Without one every object comes straight from its origin.
    pub tracker: Option<String>,
    /// Chunks fetched at once.
    pub parallel: usize,
    pub connect_timeout: Duration,
    pub deadlines: Deadlines,
    pub tracker_timeout: Duration,
    /// Largest object fetched without a manifest (tracker unreachable).
    pub max_direct_object: u64,
    /// Local address of the QUIC endpoint.
    pub bind: SocketAddr,
    /// When set, origin fallback fetches only URLs under these origins and follows no redirect out of
    /// them (the player proxy sets it); `None` fetches what the caller asked for (the CLI's user).
    pub origins: Option<SharedOrigins>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            tracker: None,
            parallel: 8,
            connect_timeout: Duration::from_secs(2),
            deadlines: Deadlines::default(),
            tracker_timeout: Duration::from_secs(30),
            max_direct_object: 64 << 30,
            bind: fog_net::transport::any_family(),
            origins: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url} is not under an origin registered with the tracker ({message}); ask the operator to add it with --origin")]
    UnknownOrigin { url: String, message: String },
    #[error("the tracker could not get {url} from its origin: {message}")]
    OriginViaTracker { url: String, code: ErrorCode, message: String },
    #[error("the tracker refused {url}: {0}", .source)]
    Tracker { url: String, source: TrackerError },
    #[error("{0}")]
    Origin(#[from] OriginError),
    #[error("neither the tracker nor the origin is reachable for {url}: tracker: {tracker}; origin: {origin}")]
    Unreachable { url: String, tracker: Box<TrackerError>, origin: Box<OriginError> },
    #[error("{url} changed at its origin after it was ingested; the fetch stopped rather than deliver mixed versions")]
    ContentChanged { url: String },
    #[error("tracker sent an inconsistent manifest or schedule: {0}")]
    BadSchedule(String),
    #[error("writing the output failed: {0}")]
    Output(#[source] std::io::Error),
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A chunk task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(#[source] tokio::task::JoinError),
}

impl ClientError {
    /// Whether the same fetch may succeed later (outages, overload), as opposed to a request that will
    /// keep failing (unknown origin, missing object, a broken tracker).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Origin(e) => e.is_retryable(),
            Self::Unreachable { .. } | Self::ContentChanged { .. } | Self::Output(_) | Self::Internal(_) => true,
            Self::Tracker { source, .. } => source.is_retryable(),
            Self::OriginViaTracker { code, .. } => *code == ErrorCode::OriginError,
            Self::UnknownOrigin { .. } | Self::BadSchedule(_) | Self::Transport(_) => false,
        }
    }
}

/// Bytes by source for one fetch.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FetchReport {
    pub bytes: u64,
    pub fog_bytes: u64,
    pub origin_bytes: u64,
    /// What each node contributed, and how it went.
    pub nodes: BTreeMap<NodeId, NodeUse>,
    /// Node attempts that failed (error, timeout, wrong bytes) before another source succeeded.
    pub node_failures: u64,
    /// Why chunks (or their remainders) came from the origin or another node, by reason.
    pub fallbacks: BTreeMap<&'static str, u64>,
    /// The same failures by node and reason.
    #[serde(skip)]
    pub failures_by_node: BTreeMap<(NodeId, &'static str), u64>,
    pub content_id: Option<ContentId>,
    /// Set when the tracker could not be used and the object came straight from the origin.
    pub tracker_unreachable: Option<String>,
    /// RTTs (ms) measured to candidate nodes that delivered nothing (by this fetch or a recent one).
    pub probed_rtt: Vec<(NodeId, u64)>,
}

/// One node's part in a fetch.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NodeUse {
    pub bytes: u64,
    pub chunks: u64,
    pub errors: u64,
    /// Time spent receiving its chunks, for throughput.
    pub busy_ms: u64,
    /// Latest smoothed RTT of the QUIC connection.
    pub rtt_ms: Option<u64>,
}

impl FetchReport {
    fn merge_chunk(&mut self, outcome: &ChunkOutcome, delivered: u64) {
        self.bytes += delivered;
        self.node_failures += outcome.failures.len() as u64;
        for (node, reason) in &outcome.failures {
            self.nodes.entry(*node).or_default().errors += 1;
            *self.fallbacks.entry(reason).or_default() += 1;
            *self.failures_by_node.entry((*node, reason)).or_default() += 1;
        }
        // A chunk finished from the origin after a node's partial transfer counts each source's share.
        let from_node = outcome.node_bytes.min(delivered);
        if let Some((id, ms, rtt)) = outcome.node {
            let n = self.nodes.entry(id).or_default();
            n.bytes += from_node;
            n.chunks += 1;
            n.busy_ms += ms;
            n.rtt_ms = rtt.or(n.rtt_ms);
            self.fog_bytes += from_node;
        }
        self.origin_bytes += delivered - from_node;
    }
}

/// What to fetch of an object, and by when.
#[derive(Debug, Clone, Copy, Default)]
pub struct FetchOptions {
    /// Bytes `[start, end)` of the object; `None` for all of it.
    pub range: Option<(u64, u64)>,
    /// When set, a node that has not delivered by then (or stalls) is not waited for: the rest of its
    /// chunk comes from the origin, keeping what it already sent.
    pub deadline: Option<Instant>,
}

/// A validated resolve: manifest, candidates per chunk, and the session's credit state.
#[derive(Debug, Clone)]
pub struct Resolved(Arc<Resolve>, Option<Arc<Session>>);

/// A fetch session's credits: its own key, the tracker's ticket, one payment chain per node.
#[derive(Debug)]
struct Session {
    key: SigningKey,
    ticket: Ticket,
    ticket_id: TicketId,
    /// The signed ticket as chunk requests carry it: nodes fill misses through only with it.
    signed_ticket: Option<Vec<u8>>,
    chains: Mutex<HashMap<NodeId, PaymentChain>>,
}

#[derive(Debug)]
struct PaymentChain {
    commitment: Signed,
    preimages: Vec<Digest>,
    paid: u32,
}

impl Session {
    fn new(key: SigningKey, signed: &Signed) -> Option<Self> {
        let ticket: Ticket = signed.open(KIND_TICKET).ok()?;
        if ticket.client_key != NodeId::from(key.verifying_key()) {
            return None;
        }
        let ticket_id = fog_proto::credits::ticket_id(signed);
        let signed_ticket = ticket_on_wire(signed);
        Some(Self { key, ticket, ticket_id, signed_ticket, chains: Mutex::new(HashMap::new()) })
    }

    /// Pays `node` for one more chunk it delivered and that verified: the receipt to hand it.
    fn pay(&self, node: NodeId) -> Option<Receipt> {
        let slot = self.ticket.nodes.iter().position(|n| *n == node)?;
        let length = *self.ticket.assigned_chunks.get(slot)?;
        let mut chains = self.chains.lock().expect("lock");
        let chain = chains.entry(node).or_insert_with(|| {
            // One signature per (session, node): the commitment to the chain's anchor.
            let preimages = payment_chain(rand::random(), length);
            let commitment = Commitment {
                session: self.ticket.session,
                ticket_id: self.ticket_id,
                node,
                anchor: preimages[0],
                length,
                epoch: self.ticket.epoch,
            };
            PaymentChain { commitment: Signed::sign(&self.key, KIND_COMMITMENT, &commitment), preimages, paid: 0 }
        });
        if chain.paid >= length {
            return None;
        }
        chain.paid += 1;
        let index = chain.paid;
        Some(Receipt { commitment: chain.commitment.clone(), index, preimage: chain.preimages[index as usize] })
    }
}

impl Resolved {
    pub fn manifest(&self) -> &Manifest {
        &self.0.manifest
    }

    pub fn content_id(&self) -> ContentId {
        self.0.content_id
    }

    fn validate(r: Resolve, key: SigningKey) -> Result<Self, ClientError> {
        r.manifest.validate().map_err(|e| ClientError::BadSchedule(e.to_string()))?;
        if r.schedule.len() != r.manifest.chunks.len()
            || r.schedule.iter().flatten().any(|&i| i as usize >= r.nodes.len())
        {
            return Err(ClientError::BadSchedule("schedule does not match the manifest or node list".into()));
        }
        if r.manifest.content_id() != r.content_id {
            return Err(ClientError::BadSchedule("content id does not match the manifest".into()));
        }
        let session = r.ticket.as_ref().and_then(|t| Session::new(key, t)).map(Arc::new);
        Ok(Self(Arc::new(r), session))
    }
}

/// A receipt, and the signed ticket (as chunk requests carry it) it was made under: a node redeems the
/// receipt with it, since the tracker keeps no tickets.
type Paid = (Receipt, Option<Vec<u8>>);

#[derive(Debug)]
struct ChunkOutcome {
    /// What the serving node is owed for this chunk.
    receipt: Option<(NodeContact, Paid)>,
    /// The last node that sent any of the chunk: (id, ms spent, RTT ms).
    node: Option<(NodeId, u64, Option<u64>)>,
    /// The chunk's first bytes came from nodes, this many (the rest from the origin).
    node_bytes: u64,
    failures: Vec<(NodeId, &'static str)>,
}

/// Chunks a node delivers in a fetch between two receipts handed to it (the rest at the fetch's end). A
/// receipt pays for every chunk before it, and each costs the node a request, a signature check and a synced
/// write: one per chunk was ~12 % of the nodes' CPU in `scripts/bench/get-vs-nginx.sh`. At most the 64 chunks
/// a node accepts a receipt ahead of what its connection delivered (`RECEIPT_SLACK` in node/src/serve.rs).
const RECEIPT_EVERY: u32 = 16;

/// A node's newest receipt in a fetch, not handed over yet, and the chunk index the last one paid up to.
#[derive(Debug)]
struct Owed {
    node: NodeContact,
    newest: Option<Paid>,
    handed: u32,
}

impl Owed {
    /// The newest receipt, if it pays for at least `chunks` more than the last one handed over.
    fn due(&mut self, chunks: u32) -> Option<Paid> {
        let due = self.newest.take_if(|(r, _)| r.index >= self.handed.saturating_add(chunks))?;
        self.handed = due.0.index;
        Some(due)
    }
}

/// A chunk being fetched: its index, its verified bytes as they come, and how it went.
type InFlight = (usize, mpsc::Receiver<Bytes>, JoinHandle<Result<ChunkOutcome, ClientError>>);

/// Connections kept open to nodes at most; beyond that the least recently used one is closed.
const MAX_CACHED_CONNECTIONS: u64 = 256;

#[derive(Debug, Clone)]
pub struct FogClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: ClientConfig,
    tracker: Option<TrackerClient>,
    origin: OriginClient,
    endpoint: quinn::Endpoint,
    /// One connection per node; the cache dials each node at most once at a time.
    connections: Cache<NodeId, quinn::Connection>,
    /// RTTs measured to candidates no chunk needed, for the next fetch's report; and probes under way.
    probed: Mutex<Vec<(NodeId, u64)>>,
    probing: AtomicUsize,
}

/// Candidates no chunk needed that one fetch measures (a QUIC handshake each), and the most under way at
/// once: the tracker's last candidate per chunk is a node it wants the client's network measured to.
const PROBES_PER_FETCH: usize = 2;
const MAX_PROBING: usize = 4;

impl FogClient {
    /// Must be called within a tokio runtime (it binds the QUIC endpoint).
    pub fn new(cfg: ClientConfig) -> Result<Self, ClientError> {
        let endpoint = transport::client_endpoint(cfg.bind)?;
        let tracker = cfg.tracker.as_deref().map(|t| TrackerClient::new(t, cfg.tracker_timeout));
        Ok(Self {
            inner: Arc::new(Inner {
                tracker,
                origin: OriginClient::new(cfg.origins.clone()),
                endpoint,
                // Dropping a connection from the cache drops its handle; quinn closes it once no task uses it.
                connections: Cache::builder()
                    .max_capacity(MAX_CACHED_CONNECTIONS)
                    .eviction_policy(EvictionPolicy::lru())
                    .build(),
                probed: Mutex::new(Vec::new()),
                probing: AtomicUsize::new(0),
                cfg,
            }),
        })
    }

    /// Fetches `url` into memory.
    pub async fn get(&self, url: &str) -> Result<(Vec<u8>, FetchReport), ClientError> {
        let mut out = Vec::new();
        let report = self.fetch_to(url, &mut out).await?;
        Ok((out, report))
    }

    /// Asks the tracker for `url`'s manifest and candidates. `stale` and `from` (the byte to be read
    /// first): see [`TrackerClient::resolve`].
    pub async fn resolve(&self, url: &str, stale: Option<ContentId>, from: u64) -> Result<Resolved, TrackerError> {
        let Some(tracker) = &self.inner.tracker else {
            return Err(TrackerError::NotConfigured);
        };
        // A fresh key per session: receipts cannot be linked across sessions.
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let r = tracker.resolve(url, stale, Some(key.verifying_key().into()), Some(from)).await?;
        Resolved::validate(r, key).map_err(|e| TrackerError::BadResponse(Box::new(e)))
    }

    /// The tracker URL requests go to now (with several, the one that answered last); `None` without one.
    pub fn tracker(&self) -> Option<CurrentTracker> {
        self.inner.tracker.as_ref().map(TrackerClient::current)
    }

    /// The origins the tracker serves.
    pub async fn origins(&self) -> Result<OriginList, TrackerError> {
        match &self.inner.tracker {
            Some(tracker) => tracker.origins().await,
            None => Err(TrackerError::NotConfigured),
        }
    }

    /// Sends the tracker a summary of what this client saw (see [`ClientReport`]).
    pub async fn report(&self, report: &ClientReport) -> Result<(), TrackerError> {
        match &self.inner.tracker {
            Some(t) => t.report(report).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Streams `url` into `out`, in order, every byte verified against the manifest when there is one.
    #[tracing::instrument(name = "fetch", skip_all, fields(url = %url))]
    pub async fn fetch_to<W: AsyncWrite + Unpin>(&self, url: &str, out: &mut W) -> Result<FetchReport, ClientError> {
        let mut resolved = match self.resolve(url, None, 0).await {
            Ok(r) => r,
            Err(e) => return self.after_tracker_error(url, e, out).await,
        };
        let mut retried = false;
        loop {
            let mut written = 0u64;
            match self.fetch_resolved(&resolved, FetchOptions::default(), out, &mut written).await {
                // Nothing delivered yet: ask the tracker to ingest the new version and start over, once.
                Err(ClientError::ContentChanged { .. }) if written == 0 && !retried => {
                    let content_id = resolved.content_id();
                    tracing::warn!(url, %content_id, "origin object changed since ingest; asking the tracker to re-ingest");
                    retried = true;
                    resolved = match self.resolve_changed(url, &resolved).await {
                        Ok(r) => r,
                        Err(e) => return self.after_tracker_error(url, e, out).await,
                    };
                }
                other => return other,
            }
        }
    }

    /// Asks the tracker to ingest `url` again because its origin's bytes no longer hash to `seen`. The
    /// report must name a stored (complete) manifest: one seen while ingest was still running is first
    /// resolved to the manifest it became.
    pub async fn resolve_changed(&self, url: &str, seen: &Resolved) -> Result<Resolved, TrackerError> {
        let mut stale = seen.content_id();
        if !seen.manifest().is_complete() {
            let now = self.resolve(url, None, 0).await?;
            // Still being ingested (that read gets the new bytes), or another version already.
            if !now.manifest().is_complete() || !continues(seen.manifest(), now.manifest()) {
                return Ok(now);
            }
            stale = now.content_id();
        }
        self.resolve(url, Some(stale), 0).await
    }

    async fn after_tracker_error<W: AsyncWrite + Unpin>(
        &self,
        url: &str,
        e: TrackerError,
        out: &mut W,
    ) -> Result<FetchReport, ClientError> {
        match &e {
            TrackerError::Api(api) => match api.error {
                ErrorCode::UnknownOrigin => {
                    Err(ClientError::UnknownOrigin { url: url.into(), message: api.message.clone() })
                }
                code @ (ErrorCode::OriginNotFound | ErrorCode::OriginError | ErrorCode::TooLarge) => {
                    Err(ClientError::OriginViaTracker { url: url.into(), code, message: api.message.clone() })
                }
                _ if e.is_retryable() => self.direct(url, out, e.to_string()).await,
                _ => Err(ClientError::Tracker { url: url.into(), source: e }),
            },
            _ => {
                tracing::warn!(url, error = %e, "tracker unavailable; fetching straight from the origin");
                match self.direct(url, out, e.to_string()).await {
                    Err(ClientError::Origin(origin)) if origin.is_retryable() => Err(ClientError::Unreachable {
                        url: url.into(),
                        tracker: Box::new(e),
                        origin: Box::new(origin),
                    }),
                    other => other,
                }
            }
        }
    }

    /// Without a manifest there is nothing to verify against: the origin is trusted, as without fogcdn.
    async fn direct<W: AsyncWrite + Unpin>(
        &self,
        url: &str,
        out: &mut W,
        why: String,
    ) -> Result<FetchReport, ClientError> {
        let mut report = FetchReport { tracker_unreachable: Some(why), ..Default::default() };
        self.origin_span(url, (0, None), None, out, &mut 0, &mut report).await?;
        out.flush().await.map_err(ClientError::Output)?;
        Ok(report)
    }

    /// Streams bytes of a resolved object (all, or `opts.range`) into `out`, in order, each chunk verified
    /// before any of its bytes are written. Chunks the tracker has not hashed yet (an object still being
    /// ingested) come straight from the origin, unverified, as they would without fogcdn. `written` counts
    /// what reached `out`.
    pub async fn fetch_resolved<W: AsyncWrite + Unpin>(
        &self,
        resolved: &Resolved,
        opts: FetchOptions,
        out: &mut W,
        written: &mut u64,
    ) -> Result<FetchReport, ClientError> {
        let r = &resolved.0;
        let manifest = &r.manifest;
        let (start, wanted_end) = match opts.range {
            Some((start, end)) => (start, Some(end)),
            None => (0, None),
        };
        let end = wanted_end.unwrap_or(manifest.size).min(manifest.size);
        let mut report = FetchReport { content_id: Some(r.content_id), ..Default::default() };
        let result = self.fetch_chunks(resolved, opts, (start, end), out, written, &mut report).await;
        result?;
        // Beyond what the manifest covers yet (the origin has not told the object's size): the origin.
        if !manifest.size_known() && wanted_end.is_none_or(|e| e > manifest.size) {
            let from = start.max(manifest.size);
            self.origin_span(&manifest.url, (from, wanted_end), None, out, written, &mut report).await?;
        }
        out.flush().await.map_err(ClientError::Output)?;
        Ok(report)
    }

    /// Bytes `[start, end)` of the object, each hashed chunk from nodes (verified) and each run of chunks
    /// not hashed yet from the origin.
    async fn fetch_chunks<W: AsyncWrite + Unpin>(
        &self,
        resolved: &Resolved,
        opts: FetchOptions,
        (start, end): (u64, u64),
        out: &mut W,
        written: &mut u64,
        report: &mut FetchReport,
    ) -> Result<(), ClientError> {
        if start >= end {
            return Ok(());
        }
        let mut resolved = resolved.clone();
        let mut manifest = resolved.manifest().clone();
        let mut refresh = Refresh::new(resolved.clone());
        let chunk_size = u64::from(manifest.chunk_size);
        let (first, last) = ((start / chunk_size) as usize, ((end - 1) / chunk_size) as usize);
        let failed = Arc::new(Mutex::new(HashSet::new()));
        let mut receipts = tokio::task::JoinSet::new();
        let mut owed: HashMap<NodeId, Owed> = HashMap::new();
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        let mut next = first;
        let result = loop {
            // Pipelined up to the next chunk that is not hashed yet.
            while next <= last && manifest.hash(next).is_some() && inflight.len() < self.inner.cfg.parallel.max(1) {
                // Each verified piece is one or more whole groups: the channel never fills.
                let (tx, rx) = mpsc::channel(MAX_GROUPS_PER_CHUNK + 1);
                let task = self.inner.clone().fetch_chunk(resolved.clone(), next, failed.clone(), opts.deadline, tx);
                inflight.push_back((next, rx, tokio::spawn(task)));
                next += 1;
            }
            let Some((index, mut pieces, head)) = inflight.pop_front() else {
                if next > last {
                    break Ok(());
                }
                // A run of chunks not hashed yet: one origin read for all of it, unless the tracker
                // hashes ahead of it meanwhile.
                let run_end = (next..=last).find(|&i| manifest.hash(i).is_some()).unwrap_or(last + 1);
                let from = start.max(next as u64 * chunk_size);
                let to = end.min(run_end as u64 * chunk_size);
                *report.fallbacks.entry("not_hashed_yet").or_default() += 1;
                let refresh = Some(&mut refresh);
                match self.origin_span(&manifest.url, (from, Some(to)), refresh, out, written, report).await {
                    Ok(Some((at, newer))) => {
                        (resolved, next) = (newer, at);
                        manifest = resolved.manifest().clone();
                    }
                    Ok(None) => next = run_end,
                    Err(e) => break Err(e),
                }
                continue;
            };
            // The head chunk's verified bytes go out as they arrive, trimmed to the requested range.
            let mut at = index as u64 * chunk_size;
            let mut delivered = 0;
            let mut output = Ok(());
            while let Some(piece) = pieces.recv().await {
                let (from, to) = (start.max(at), end.min(at + piece.len() as u64));
                if from < to {
                    if let Err(e) = out.write_all(&piece[(from - at) as usize..(to - at) as usize]).await {
                        output = Err(ClientError::Output(e));
                        break;
                    }
                    delivered += to - from;
                    *written += to - from;
                }
                at += piece.len() as u64;
            }
            if let Err(e) = output {
                head.abort();
                break Err(e);
            }
            let outcome = match head.await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => break Err(e),
                Err(join) => break Err(ClientError::Internal(join)),
            };
            report.merge_chunk(&outcome, delivered);
            if let Some((node, receipt)) = outcome.receipt {
                let debt = owed.entry(node.id).or_insert_with(|| Owed { node, newest: None, handed: 0 });
                if debt.newest.as_ref().is_none_or(|(r, _)| r.index < receipt.0.index) {
                    debt.newest = Some(receipt);
                }
                if let Some(due) = debt.due(RECEIPT_EVERY) {
                    receipts.spawn(self.inner.clone().hand_over(debt.node.clone(), due));
                }
            }
        };
        for (_, _, task) in inflight {
            task.abort();
        }
        // Whatever the outcome, nodes are paid for the chunks they delivered.
        for mut debt in owed.into_values() {
            if let Some(due) = debt.due(1) {
                receipts.spawn(self.inner.clone().hand_over(debt.node, due));
            }
        }
        report.probed_rtt = std::mem::take(&mut *self.inner.probed.lock().expect("lock"));
        self.inner.clone().probe_unused(&resolved, first..=last.min(next.saturating_sub(1)), &report.nodes);
        // Receipts go out as chunks verify, in batches; give the last ones a moment to arrive.
        let _ =
            tokio::time::timeout(Duration::from_secs(3), async { while receipts.join_next().await.is_some() {} }).await;
        result
    }

    /// Streams bytes `[from, to)` (to the object's end if `to` is `None`) straight from the origin: parts
    /// of an object the tracker has not hashed yet, trusted as they would be without fogcdn. With a
    /// `refresh`, stops at a chunk boundary once a fresher manifest lists the next chunk: that chunk's
    /// index and the manifest.
    async fn origin_span<W: AsyncWrite + Unpin>(
        &self,
        url: &str,
        (from, to): (u64, Option<u64>),
        mut refresh: Option<&mut Refresh>,
        out: &mut W,
        written: &mut u64,
        report: &mut FetchReport,
    ) -> Result<Option<(usize, Resolved)>, ClientError> {
        let limit = self.inner.cfg.max_direct_object;
        let mut body = match self.inner.origin.open_range(url, from, to, limit, false).await {
            Ok(body) => body,
            // Asked from where the hashed part ended, and the object ends right there.
            Err(OriginError::Status { status: 416, .. }) if to.is_none() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut at = from;
        while let Some(mut piece) = body.next_piece().await? {
            while !piece.is_empty() {
                let chunk_size = refresh.as_ref().map_or(u64::MAX, |r| u64::from(r.current.manifest().chunk_size));
                let boundary = (at / chunk_size + 1).saturating_mul(chunk_size);
                let head = piece.split_to(piece.len().min((boundary - at) as usize));
                out.write_all(&head).await.map_err(ClientError::Output)?;
                let n = head.len() as u64;
                (at, *written, report.bytes, report.origin_bytes) =
                    (at + n, *written + n, report.bytes + n, report.origin_bytes + n);
                if let Some(refresh) = refresh.as_deref_mut().filter(|_| at == boundary) {
                    let index = (at / chunk_size) as usize;
                    if let Some(newer) = refresh.poll(self, index, at) {
                        tracing::debug!(url, at, "the tracker hashed ahead of this origin read; back to the fog");
                        return Ok(Some((index, newer)));
                    }
                }
            }
        }
        Ok(None)
    }
}

/// How often a client reading an object's unhashed part from the origin asks the tracker whether it has
/// hashed further (a player reading slower than the origin sends falls behind the tracker's ingest).
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// Fresher manifests of an object still being ingested, asked for in the background during origin reads.
struct Refresh {
    current: Resolved,
    asked: Instant,
    pending: Option<tokio::sync::oneshot::Receiver<Result<Resolved, TrackerError>>>,
}

impl Refresh {
    fn new(current: Resolved) -> Self {
        Self { current, asked: Instant::now(), pending: None }
    }

    /// A fresher manifest that lists chunk `index` (at byte `offset`), if one has arrived; asks for one
    /// every [`REFRESH_EVERY`] while the current one is incomplete.
    fn poll(&mut self, client: &FogClient, index: usize, offset: u64) -> Option<Resolved> {
        if let Some(Ok(answer)) = self.pending.as_mut().map(|rx| rx.try_recv()) {
            self.pending = None;
            match answer {
                Ok(newer) if continues(self.current.manifest(), newer.manifest()) => self.current = newer,
                Ok(_) => {
                    tracing::warn!(url = %self.current.manifest().url, "the tracker's manifest changed under a fetch; staying with the origin")
                }
                Err(e) => tracing::debug!(error = %e, "could not refresh a manifest; staying with the origin"),
            }
            if self.current.manifest().hash(index).is_some() {
                return Some(self.current.clone());
            }
        }
        let incomplete = !self.current.manifest().is_complete();
        if incomplete && self.pending.is_none() && self.asked.elapsed() >= REFRESH_EVERY {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (client, url) = (client.clone(), self.current.manifest().url.clone());
            tokio::spawn(async move {
                let _ = tx.send(client.resolve(&url, None, offset).await);
            });
            (self.pending, self.asked) = (Some(rx), Instant::now());
        }
        None
    }
}

/// Whether `newer` describes the same object version as `older`, further hashed: same URL, chunking and
/// size (once known), and the same hash wherever both have one.
fn continues(older: &Manifest, newer: &Manifest) -> bool {
    let same = older.url == newer.url && older.chunk_size == newer.chunk_size && older.etag == newer.etag;
    let size = !older.size_known() || older.size == newer.size;
    same && size
        && (0..older.chunks.len()).all(|i| match (older.hash(i), newer.hash(i)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        })
}

/// A short, stable name for why a node attempt failed, for reports and metrics.
fn failure_reason(e: &ChunkError) -> &'static str {
    match e {
        ChunkError::Stream(_) => "stream_error",
        ChunkError::Timeout(_) => "timeout",
        ChunkError::Refused { status, .. } => match status {
            Status::Busy => "node_busy",
            Status::NotFound => "node_not_found",
            Status::OriginFailed => "node_origin_failed",
            Status::OriginMismatch => "origin_changed",
            Status::OriginNotAllowed => "origin_not_allowed",
            _ => "node_refused",
        },
        ChunkError::Protocol(_) => "protocol_error",
        ChunkError::Interrupted { .. } => "interrupted",
        ChunkError::Rejected { .. } => "hash_mismatch",
    }
}

impl Inner {
    /// Measures, in the background, candidates of `chunks` that delivered nothing and have no connection yet.
    fn probe_unused(
        self: Arc<Self>,
        resolved: &Resolved,
        chunks: RangeInclusive<usize>,
        used: &BTreeMap<NodeId, NodeUse>,
    ) {
        let r = &resolved.0;
        let mut unused: Vec<NodeContact> = Vec::new();
        for &i in r.schedule.get(chunks).unwrap_or_default().iter().flatten() {
            let node = &r.nodes[i as usize];
            if unused.len() < PROBES_PER_FETCH
                && !used.contains_key(&node.id)
                && !self.connections.contains_key(&node.id)
                && !unused.iter().any(|u| u.id == node.id)
            {
                unused.push(node.clone());
            }
        }
        for node in unused {
            if self.probing.fetch_add(1, Ordering::Relaxed) >= MAX_PROBING {
                self.probing.fetch_sub(1, Ordering::Relaxed);
                return;
            }
            let inner = self.clone();
            tokio::spawn(async move {
                if let Ok(conn) = inner.connection(&node).await {
                    let mut probed = inner.probed.lock().expect("lock");
                    if probed.len() < MAX_CLIENT_RTTS {
                        probed.push((node.id, conn.rtt().as_millis() as u64));
                    }
                }
                inner.probing.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// Fetches chunk `index` and sends its bytes to `verified` as they verify (group by group when the
    /// manifest has group hashes): from the scheduled nodes in turn, each asked only for what the previous
    /// one did not deliver, then from the origin.
    async fn fetch_chunk(
        self: Arc<Self>,
        resolved: Resolved,
        index: usize,
        failed: Arc<Mutex<HashSet<NodeId>>>,
        deadline: Option<Instant>,
        verified: mpsc::Sender<Bytes>,
    ) -> Result<ChunkOutcome, ClientError> {
        let r = &resolved.0;
        let manifest = &r.manifest;
        let hash = manifest.hash(index).expect("only hashed chunks are fetched from nodes");
        let (offset, len) = manifest.chunk_span(index);
        let groups = manifest.group_hashes(index);
        let verifier = Verifier::new(hash, len, groups.clone()).unwrap_or_else(|e| {
            tracing::warn!(chunk = %hash, error = %e, "the manifest's group hashes are wrong; verifying the chunk whole");
            Verifier::new(hash, len, None).expect("no group hashes to check")
        });
        let mut gate = Gate::new(verifier);
        // The writer may be gone (the fetch was abandoned): then nobody needs the bytes.
        let pass = |gate: &mut Gate, piece: &[u8]| match gate.push(piece) {
            Ok(Some(ready)) => {
                let _ = verified.try_send(ready);
                true
            }
            Ok(None) => true,
            Err(_) => false,
        };
        let mut req = ChunkRequest {
            hash,
            range: None,
            origin: Some(OriginHint { url: manifest.url.clone(), offset, length: len }),
            receipt: None,
            ticket: resolved.1.as_ref().and_then(|s| s.signed_ticket.clone()),
            groups,
        };
        let mut failures = Vec::new();
        let mut node_used = None;
        for &i in &r.schedule[index] {
            let node = &r.nodes[i as usize];
            if failed.lock().expect("lock").contains(&node.id) {
                continue;
            }
            let mut deadlines = self.cfg.deadlines;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
                deadlines.first_byte = deadlines.first_byte.min(left);
                deadlines.stall = deadlines.stall.min(left);
            }
            // After a node delivered part of the chunk, the next is asked for the rest only.
            let from = gate.verified();
            req.range = (from > 0).then_some((from, len - from));
            let started = Instant::now();
            let mut sink = |piece: Bytes| pass(&mut gate, &piece);
            let (result, rtt) = self.fetch_from_node(node, &req, len - from, deadlines, deadline, &mut sink).await;
            let ms = started.elapsed().as_millis() as u64;
            if gate.verified() > from || result.is_ok() {
                node_used = Some((node.id, ms, rtt));
            }
            let err = match result {
                Ok(()) => {
                    // Only a node that delivered the whole chunk earns a receipt for it.
                    let paid = (from == 0).then(|| resolved.1.as_ref().and_then(|s| s.pay(node.id))).flatten();
                    let receipt = paid.map(|r| (node.clone(), (r, req.ticket.clone())));
                    // Every byte came from nodes: this one, and any that delivered part before it.
                    let node = Some((node.id, ms, rtt));
                    return Ok(ChunkOutcome { receipt, node, node_bytes: u64::from(len), failures });
                }
                Err(ChunkError::Rejected { .. }) => {
                    tracing::warn!(node = %node.id, addr = %node.addr, chunk = %hash, "node sent bytes that do not match the chunk hash; not using it again");
                    failed.lock().expect("lock").insert(node.id);
                    failures.push((node.id, "hash_mismatch"));
                    gate.rewind();
                    continue;
                }
                Err(e) => e,
            };
            gate.rewind();
            failures.push((node.id, failure_reason(&err)));
            match err {
                // The node is healthy but could not help with this chunk.
                ChunkError::Refused { status: Status::Busy | Status::NotFound | Status::OriginFailed, .. } => {
                    tracing::debug!(node = %node.id, chunk = %hash, error = %err, "node could not serve chunk");
                }
                // The origin no longer has these bytes; more nodes would only ask it again.
                ChunkError::Refused { status: Status::OriginMismatch, .. } => break,
                // Against a deadline, keep what the node sent and take only the rest from the origin.
                ChunkError::Interrupted { received, cause } if deadline.is_some() => {
                    tracing::info!(node = %node.id, chunk = %hash, got = received, verified = gate.verified(), error = %cause, "node too slow for the deadline; finishing the chunk from the origin");
                    failed.lock().expect("lock").insert(node.id);
                    break;
                }
                err => {
                    tracing::warn!(node = %node.id, addr = %node.addr, chunk = %hash, error = %err, "node failed; trying the next source");
                    failed.lock().expect("lock").insert(node.id);
                    self.connections.invalidate(&node.id).await;
                }
            }
        }
        // The rest from the origin, verified as from a node.
        let from = gate.verified();
        let (start, end) = (offset + u64::from(from), offset + u64::from(len));
        let mut body = self.origin.open_range(&manifest.url, start, Some(end), end - start, false).await?;
        while let Some(piece) = body.next_piece().await? {
            if !pass(&mut gate, &piece) {
                return Err(ClientError::ContentChanged { url: manifest.url.clone() });
            }
        }
        if !gate.is_done() {
            let got = u64::from(gate.verified() - from);
            let short = OriginError::Truncated { url: manifest.url.clone(), expected: end - start, got };
            return Err(short.into());
        }
        Ok(ChunkOutcome { receipt: None, node: node_used, node_bytes: u64::from(from), failures })
    }

    /// Hands `node` a receipt for chunks it delivered, with the ticket it was made under (best effort: a
    /// later receipt covers this one too).
    async fn hand_over(self: Arc<Self>, node: NodeContact, (receipt, ticket): Paid) {
        let Ok(json) = serde_json::to_vec(&receipt) else { return };
        let req = ChunkRequest { ticket, ..ChunkRequest::receipt_only(json) };
        let (result, _) = self.fetch_from_node(&node, &req, 0, self.cfg.deadlines, None, &mut |_| true).await;
        if let Err(e) = result {
            tracing::debug!(node = %node.id, error = %e, "could not hand over a receipt");
        }
    }

    /// The chunk (or the range `req` asks for) from `node`, piece by piece to `sink`, and the connection's
    /// RTT in ms when one was established.
    async fn fetch_from_node(
        &self,
        node: &NodeContact,
        req: &ChunkRequest,
        len: u32,
        deadlines: Deadlines,
        until: Option<Instant>,
        sink: &mut (dyn FnMut(Bytes) -> bool + Send),
    ) -> (Result<(), ChunkError>, Option<u64>) {
        let conn = match self.connection(node).await {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        };
        let result = chunk::request_into(&conn, req, len, deadlines, until, sink).await;
        (result, Some(conn.rtt().as_millis() as u64))
    }

    /// A live connection to `node`, reusing one if open. Chunk tasks that need the same node while it is
    /// being dialled wait for that handshake instead of starting their own (and share its failure).
    async fn connection(&self, node: &NodeContact) -> Result<quinn::Connection, ChunkError> {
        let idle = self.cfg.deadlines.first_byte * 2;
        let dial = || transport::connect_contact(&self.endpoint, node, idle, self.cfg.connect_timeout);
        let failed = |e| ChunkError::Stream(StreamError::Connect(e));
        let conn = self.connections.try_get_with(node.id, dial()).await.map_err(failed)?;
        if conn.close_reason().is_none() {
            return Ok(conn);
        }
        // Closed since (idle timeout, node restart): forget it, unless another task has already replaced it.
        let closed = conn.stable_id();
        self.connections
            .entry(node.id)
            .and_compute_with(|cached| {
                let op = match cached {
                    Some(c) if c.value().stable_id() == closed => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        self.connections.try_get_with(node.id, dial()).await.map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use fog_proto::manifest::{Progress, MIN_CHUNK_SIZE};
    use fog_proto::ChunkHash;

    use super::*;

    fn manifest(hashed: Vec<(u64, u64)>, flip: Option<usize>) -> Manifest {
        let mut chunks: Vec<ChunkHash> = (0..8u8).map(|i| ChunkHash::of(&[i])).collect();
        if let Some(i) = flip {
            chunks[i] = ChunkHash::of(b"other");
        }
        let progress = (hashed.len() != 1 || hashed[0] != (0, 8)).then_some(Progress { hashed, size_known: true });
        let size = 8 * u64::from(MIN_CHUNK_SIZE);
        Manifest {
            url: "http://o/a".into(),
            size,
            chunk_size: MIN_CHUNK_SIZE,
            chunks,
            content_type: None,
            etag: None,
            progress,
            groups: None,
        }
    }

    #[test]
    fn a_refreshed_manifest_must_extend_the_one_in_use() {
        let older = manifest(vec![(0, 2)], None);
        assert!(continues(&older, &manifest(vec![(0, 5)], None)));
        assert!(continues(&older, &manifest(vec![(0, 8)], None)), "complete now");
        assert!(continues(&older, &manifest(vec![(0, 2), (6, 8)], Some(4))), "differs only where unhashed before");
        assert!(!continues(&older, &manifest(vec![(0, 8)], Some(1))), "a hash changed: another version");
        let mut moved = manifest(vec![(0, 4)], None);
        moved.size -= 1;
        assert!(!continues(&older, &moved), "another size");
    }
}
