//! `FogClient`: resolve → fetch verified chunks from scheduled nodes in parallel → origin fallback.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fog_proto::api::{ErrorCode, NodeContact, Resolve};
use fog_proto::wire::{ChunkRequest, OriginHint, Status};
use fog_proto::{ChunkHash, ContentId, Manifest, NodeId};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::chunk::{self, ChunkError, Deadlines};
use crate::origin::{OriginClient, OriginError};
use crate::tracker::{TrackerClient, TrackerError};
use crate::transport::{self, TransportError};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Tracker base URL. Without one every object comes straight from its origin.
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
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            tracker: None,
            parallel: 8,
            connect_timeout: Duration::from_secs(2),
            // A miss costs the node an origin round trip before the first byte; a stall is just a stall.
            deadlines: Deadlines { first_byte: Duration::from_secs(5), stall: Duration::from_secs(2) },
            tracker_timeout: Duration::from_secs(30),
            max_direct_object: 64 << 30,
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
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
    #[error("internal error: {0}")]
    Internal(String),
}

/// Bytes by source for one fetch.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    pub bytes: u64,
    pub fog_bytes: u64,
    pub origin_bytes: u64,
    pub by_node: BTreeMap<NodeId, u64>,
    /// Node attempts that failed (error, timeout, wrong bytes) before another source succeeded.
    pub node_failures: u64,
    pub content_id: Option<ContentId>,
    /// Set when the tracker could not be used and the object came straight from the origin.
    pub tracker_unreachable: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Node(NodeId),
    Origin,
}

struct ChunkOutcome {
    bytes: Bytes,
    source: Source,
    failures: u64,
}

/// One node's connection, dialled at most once at a time.
type ConnectionSlot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

/// Connections kept open to nodes at most; beyond that an arbitrary one is closed.
const MAX_CACHED_CONNECTIONS: usize = 256;

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
    connections: Mutex<HashMap<NodeId, ConnectionSlot>>,
}

impl FogClient {
    /// Must be called within a tokio runtime (it binds the QUIC endpoint).
    pub fn new(cfg: ClientConfig) -> Result<Self, ClientError> {
        let endpoint = transport::client_endpoint(cfg.bind)?;
        let tracker = cfg.tracker.as_deref().map(|t| TrackerClient::new(t, cfg.tracker_timeout));
        Ok(Self {
            inner: Arc::new(Inner {
                tracker,
                origin: OriginClient::new(None),
                endpoint,
                connections: Mutex::new(HashMap::new()),
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

    /// Streams `url` into `out`, in order, every byte verified against the manifest when there is one.
    pub async fn fetch_to<W: AsyncWrite + Unpin>(&self, url: &str, out: &mut W) -> Result<FetchReport, ClientError> {
        let Some(tracker) = &self.inner.tracker else {
            return self.direct(url, out, "no tracker configured".into()).await;
        };
        let mut stale = None;
        loop {
            let resolved = match tracker.resolve(url, stale).await {
                Ok(r) => r,
                Err(e) => return self.after_tracker_error(url, e, out).await,
            };
            let content_id = resolved.content_id;
            let mut written = 0u64;
            match self.fetch_resolved(resolved, out, &mut written).await {
                // Nothing delivered yet: ask the tracker to ingest the new version and start over, once.
                Err(ClientError::ContentChanged { .. }) if written == 0 && stale.is_none() => {
                    tracing::warn!(url, %content_id, "origin object changed since ingest; asking the tracker to re-ingest");
                    stale = Some(content_id);
                }
                other => return other,
            }
        }
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
        let mut body = self.inner.origin.get(url, self.inner.cfg.max_direct_object).await?;
        let mut report = FetchReport { tracker_unreachable: Some(why), ..Default::default() };
        while let Some(piece) = body.next_piece().await? {
            out.write_all(&piece).await.map_err(ClientError::Output)?;
            report.bytes += piece.len() as u64;
        }
        out.flush().await.map_err(ClientError::Output)?;
        report.origin_bytes = report.bytes;
        Ok(report)
    }

    async fn fetch_resolved<W: AsyncWrite + Unpin>(
        &self,
        resolved: Resolve,
        out: &mut W,
        written: &mut u64,
    ) -> Result<FetchReport, ClientError> {
        let Resolve { content_id, manifest, nodes, schedule } = resolved;
        manifest.validate().map_err(|e| ClientError::BadSchedule(e.to_string()))?;
        if schedule.len() != manifest.chunks.len() || schedule.iter().flatten().any(|&i| i as usize >= nodes.len()) {
            return Err(ClientError::BadSchedule("schedule does not match the manifest or node list".into()));
        }
        if manifest.content_id() != content_id {
            return Err(ClientError::BadSchedule("content id does not match the manifest".into()));
        }
        let manifest = Arc::new(manifest);
        let failed = Arc::new(Mutex::new(HashSet::new()));
        let mut report = FetchReport { content_id: Some(content_id), ..Default::default() };
        let mut inflight: VecDeque<JoinHandle<Result<ChunkOutcome, ClientError>>> = VecDeque::new();
        let mut next = 0usize;
        let result = loop {
            while next < manifest.chunks.len() && inflight.len() < self.inner.cfg.parallel.max(1) {
                let candidates: Vec<NodeContact> = schedule[next].iter().map(|&i| nodes[i as usize].clone()).collect();
                let task = self.inner.clone().fetch_chunk(manifest.clone(), next, candidates, failed.clone());
                inflight.push_back(tokio::spawn(task));
                next += 1;
            }
            let Some(head) = inflight.pop_front() else { break Ok(()) };
            let outcome = match head.await {
                Ok(Ok(o)) => o,
                Ok(Err(e)) => break Err(e),
                Err(join) => break Err(ClientError::Internal(join.to_string())),
            };
            if let Err(e) = out.write_all(&outcome.bytes).await {
                break Err(ClientError::Output(e));
            }
            let n = outcome.bytes.len() as u64;
            *written += n;
            report.bytes += n;
            report.node_failures += outcome.failures;
            match outcome.source {
                Source::Node(id) => {
                    report.fog_bytes += n;
                    *report.by_node.entry(id).or_default() += n;
                }
                Source::Origin => report.origin_bytes += n,
            }
        };
        for task in inflight {
            task.abort();
        }
        result?;
        out.flush().await.map_err(ClientError::Output)?;
        Ok(report)
    }
}

impl Inner {
    async fn fetch_chunk(
        self: Arc<Self>,
        manifest: Arc<Manifest>,
        index: usize,
        candidates: Vec<NodeContact>,
        failed: Arc<Mutex<HashSet<NodeId>>>,
    ) -> Result<ChunkOutcome, ClientError> {
        let hash = manifest.chunks[index];
        let (offset, len) = manifest.chunk_span(index);
        let req = ChunkRequest {
            hash,
            range: None,
            origin: Some(OriginHint { url: manifest.url.clone(), offset, length: len }),
        };
        let mut failures = 0;
        for node in candidates {
            if failed.lock().expect("lock").contains(&node.id) {
                continue;
            }
            let err = match self.fetch_from_node(&node, &req, len).await {
                Ok(bytes) if ChunkHash::of(&bytes) == hash => {
                    return Ok(ChunkOutcome { bytes, source: Source::Node(node.id), failures });
                }
                Ok(_) => {
                    tracing::warn!(node = %node.id, addr = %node.addr, chunk = %hash, "node sent bytes that do not match the chunk hash; not using it again");
                    failed.lock().expect("lock").insert(node.id);
                    failures += 1;
                    continue;
                }
                Err(e) => e,
            };
            failures += 1;
            match &err {
                // The node is healthy but could not help with this chunk.
                ChunkError::Refused { status: Status::Busy | Status::NotFound | Status::OriginFailed, .. } => {
                    tracing::debug!(node = %node.id, chunk = %hash, error = %err, "node could not serve chunk");
                }
                // The origin no longer has these bytes; more nodes would only ask it again.
                ChunkError::Refused { status: Status::OriginMismatch, .. } => break,
                _ => {
                    tracing::warn!(node = %node.id, addr = %node.addr, chunk = %hash, error = %err, "node failed; trying the next source");
                    failed.lock().expect("lock").insert(node.id);
                    self.connections.lock().expect("lock").remove(&node.id);
                }
            }
        }
        let bytes = self.origin.fetch_range(&manifest.url, offset, len).await?;
        if ChunkHash::of(&bytes) != hash {
            return Err(ClientError::ContentChanged { url: manifest.url.clone() });
        }
        Ok(ChunkOutcome { bytes, source: Source::Origin, failures })
    }

    async fn fetch_from_node(&self, node: &NodeContact, req: &ChunkRequest, len: u32) -> Result<Bytes, ChunkError> {
        let conn = self.connection(node).await?;
        chunk::request(&conn, req, len, self.cfg.deadlines).await
    }

    /// A live connection to `node`, reusing one if open. Chunk tasks that need the same node while it is
    /// being dialled wait for that handshake instead of starting their own.
    async fn connection(&self, node: &NodeContact) -> Result<quinn::Connection, ChunkError> {
        let slot = {
            let mut conns = self.connections.lock().expect("lock");
            if conns.len() >= MAX_CACHED_CONNECTIONS && !conns.contains_key(&node.id) {
                // Dropping the slot drops the connection handle; quinn closes it once no task uses it.
                if let Some(victim) = conns.keys().next().copied() {
                    conns.remove(&victim);
                }
            }
            conns.entry(node.id).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let idle = self.cfg.deadlines.first_byte * 2;
        let conn = transport::connect(&self.endpoint, node.id, node.addr, idle, self.cfg.connect_timeout)
            .await
            .map_err(ChunkError::Stream)?;
        *slot = Some(conn.clone());
        Ok(conn)
    }
}
