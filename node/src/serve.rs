//! The QUIC chunk server: one request per bidirectional stream (see `docs/protocol.md`).
//!
//! A hit is read from the store (verified on read); a miss is filled from the overlay peers most likely to
//! hold the chunk, then (given an origin hint and a tracker ticket that licenses the fill, see
//! [`crate::grants`]) from the origin. A fill runs on its own, shared by every request for the chunk: its
//! bytes are served as each group verifies (cut-through, [`crate::fill`]) and stored once whole. The same
//! server answers peers' fill requests — on its own endpoint (`fog-peer/1`, so the answers go under the
//! node's congestion controller) and over libp2p streams, by the same code — and hands connections that
//! negotiated the rendezvous protocol to
//! [`RendezvousServer`] and those that negotiated HTTP/3 to [`crate::web`]: a browser's WebTransport session
//! carries the same requests on its streams, served by the same code (generic over [`RequestStreams`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fog_net::frame_io::{read_frame, write_last_frame, ReadError};
use fog_net::origin::{OriginClient, OriginError, SharedOrigins};
use fog_net::per_source::Held;
use fog_net::transport::NodeServerConfig;
use fog_proto::api::now_ms;
use fog_proto::groups::{GroupHashes, Verifier};
use fog_proto::web::WebOrigins;
use fog_proto::wire::{
    ChunkRequest, FrameError, NodeRequest, OriginHint, PeerHello, PeerHelloError, PeerResponseHead, ResponseHead,
    Status, PEER_ALPN, PEER_EXPORTER_LABEL, PEER_EXPORTER_LEN, PEER_REFUSED,
};
use fog_proto::{ChunkHash, NodeId};
use futures::StreamExt;
use libp2p::PeerId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::budget::Reservation;
use crate::credits::Credits;
use crate::fill::{Feed, Filling, Follower, Next};
use crate::grants::FillGrants;
use crate::limits::{UploadPolicy, PIECE};
use crate::overlay::{node_id_of, peer_id_of, IncomingChunkStreams, Overlay, PeerPath};
use crate::rendezvous::RendezvousServer;
use crate::stats::Counters;
use crate::store::{Lookup, Store};
use crate::web::Web;

/// Chunks a receipt may pay for beyond those its connection delivered (a client that reconnected pays for
/// chunks the earlier connection delivered).
const RECEIPT_SLACK: u32 = 64;

/// A client connection that opens no stream for this long is closed.
const IDLE_CONNECTION: Duration = Duration::from_secs(60);

/// How long a client may take to send its request frame.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error)]
enum FillError {
    #[error("{0}")]
    Origin(#[from] OriginError),
    #[error("origin bytes at {url} offset {offset} do not hash to chunk {hash}: the object changed after ingest")]
    Mismatch { url: String, offset: u64, hash: ChunkHash },
    #[error("too many origin pulls in progress")]
    Busy,
    #[error("the fill stopped without a result (a bug; see the log)")]
    Lost,
}

impl FillError {
    fn status(&self) -> Status {
        match self {
            Self::Origin(OriginError::NotAllowed { .. }) => Status::OriginNotAllowed,
            Self::Origin(_) => Status::OriginFailed,
            Self::Mismatch { .. } => Status::OriginMismatch,
            Self::Busy => Status::Busy,
            Self::Lost => Status::Internal,
        }
    }
}

type Fill = Filling<FillError>;

/// Where a requested chunk's bytes come from.
enum Source {
    Stored(Bytes),
    /// A fill in progress: verified pieces as they come.
    Filling(Follower<FillError>),
}

/// Stream reset code for a response cut off after its head: the fill behind it failed.
const FILL_FAILED: u32 = 1;

/// A connection whose bidirectional streams each carry one request: a native QUIC connection (`fog/1`) or a
/// browser's WebTransport session, whose streams carry the same frames.
pub(crate) trait RequestStreams: Send + Sync + 'static {
    type Send: ResponseStream;
    type Recv: AsyncRead + Unpin + Send + 'static;
    type Error: std::fmt::Display + Send;
    /// The next stream the client opened.
    fn accept(&self) -> impl Future<Output = Result<(Self::Send, Self::Recv), Self::Error>> + Send;
    fn close(&self, reason: &[u8]);
    fn remote(&self) -> SocketAddr;
}

/// The sending half of a request's stream.
pub(crate) trait ResponseStream: AsyncWrite + Unpin + Send + 'static {
    /// Queues `piece` without copying it (chunks are 1 MiB).
    fn write_piece(&mut self, piece: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Ends the response; what was queued is still delivered.
    fn finish(&mut self);
    /// Cuts the response off with `code`: the client keeps what it verified and learns it is incomplete.
    fn reset(&mut self, code: u32);
    fn id(&self) -> quinn::StreamId;
}

impl RequestStreams for quinn::Connection {
    type Send = quinn::SendStream;
    type Recv = quinn::RecvStream;
    type Error = quinn::ConnectionError;
    fn accept(&self) -> impl Future<Output = Result<(Self::Send, Self::Recv), Self::Error>> + Send {
        self.accept_bi()
    }
    fn close(&self, reason: &[u8]) {
        quinn::Connection::close(self, 0u32.into(), reason);
    }
    fn remote(&self) -> SocketAddr {
        self.remote_address()
    }
}

impl ResponseStream for quinn::SendStream {
    async fn write_piece(&mut self, piece: Bytes) -> std::io::Result<()> {
        Ok(self.write_chunk(piece).await?)
    }
    fn finish(&mut self) {
        // Already finished or reset: the client is gone, nobody is left to tell.
        let _ = quinn::SendStream::finish(self);
    }
    fn reset(&mut self, code: u32) {
        let _ = quinn::SendStream::reset(self, code.into());
    }
    fn id(&self) -> quinn::StreamId {
        quinn::SendStream::id(self)
    }
}

/// Why a response was not completed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("{0}")]
    Stream(#[from] std::io::Error),
    #[error("the fill behind it failed part-way")]
    FillFailed,
}

/// Everything a stream handler needs.
#[derive(Debug)]
pub struct Server {
    pub store: Arc<Store>,
    pub credits: Arc<Credits>,
    pub counters: Arc<Counters>,
    origin: OriginClient,
    /// The owner's cap, schedule and monthly budget: every response reserves its length first.
    pub upload: Arc<UploadPolicy>,
    /// Fills in progress, by chunk: a request for a chunk being filled follows that fill. Bounded by the
    /// fill slots.
    fills: Mutex<HashMap<ChunkHash, Arc<Fill>>>,
    fill_slots: Arc<Semaphore>,
    max_connections: usize,
    connections: AtomicUsize,
    /// Open client connections by source (IPv4 address or IPv6 /64).
    by_source: Held,
    overlay: Option<Overlay>,
    pub rendezvous: Arc<RendezvousServer>,
    /// Which origin hints this node acts on (tracker-signed tickets with fills left).
    pub grants: Arc<FillGrants>,
    node_id: NodeId,
    peer_streams: Arc<Semaphore>,
    peer_streams_by_peer: Mutex<HashMap<PeerId, usize>>,
    /// Browsers' side: web certificates and the web origins sessions are accepted from.
    pub web: Arc<Web>,
}

/// Peers' fill requests served at once, in all and per peer.
const PEER_STREAMS: usize = 32;
const PEER_STREAMS_PER_PEER: usize = 4;

/// Decrements a gauge when a connection or stream ends, however it ends.
struct Gauge<'a>(&'a AtomicUsize);
impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Server {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        credits: Arc<Credits>,
        counters: Arc<Counters>,
        origins: SharedOrigins,
        upload: Arc<UploadPolicy>,
        max_connections: usize,
        max_fills: usize,
        overlay: Option<Overlay>,
        rendezvous: Arc<RendezvousServer>,
        node_id: NodeId,
        web: Arc<Web>,
    ) -> Self {
        Self {
            store,
            credits,
            counters,
            origin: OriginClient::new(Some(origins)),
            upload,
            fills: Mutex::new(HashMap::new()),
            fill_slots: Arc::new(Semaphore::new(max_fills)),
            max_connections,
            connections: AtomicUsize::new(0),
            by_source: Held::default(),
            overlay,
            rendezvous,
            grants: Arc::new(FillGrants::default()),
            node_id,
            peer_streams: Arc::new(Semaphore::new(PEER_STREAMS)),
            peer_streams_by_peer: Mutex::new(HashMap::new()),
            web,
        }
    }

    /// The web origins the tracker registered (sent with its answers to this node): browser pages from them,
    /// or from the operator's own `--web-origin`, may open WebTransport sessions here.
    pub fn set_web_origins(&self, origins: WebOrigins) {
        self.web.set_tracker_origins(origins);
    }

    /// Accepts connections until the endpoint is closed, each as `config` says.
    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint, config: NodeServerConfig) {
        while let Some(incoming) = endpoint.accept().await {
            let source = incoming.remote_address().ip();
            let open = self.connections.load(Ordering::Relaxed);
            let from_source = self.by_source.count(source);
            // No source may hold more than its share: a few hosts cannot take every slot.
            let share = (self.max_connections / 8).max(16);
            if open >= self.max_connections || from_source >= share {
                tracing::warn!(remote = %incoming.remote_address(), open, from_source, "connection limit reached; refusing");
                incoming.refuse();
                continue;
            }
            self.connections.fetch_add(1, Ordering::Relaxed);
            let slot = self.by_source.hold(source);
            let server = self.clone();
            let remote = incoming.remote_address();
            let span = tracing::info_span!("connection", %remote);
            let connecting = config.accept(incoming);
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let _gauge = Gauge(&server.connections);
                    let _slot = slot;
                    let conn = match connecting {
                        Ok(connecting) => connecting.await,
                        Err(e) => Err(e),
                    };
                    match conn {
                        Ok(conn) if negotiated(&conn, fog_proto::rendezvous::ALPN) => {
                            server.rendezvous.clone().serve_connection(conn).await
                        }
                        Ok(conn) if negotiated(&conn, fog_net::transport::H3_ALPN) => {
                            crate::web::serve_session(&server, conn).await
                        }
                        Ok(conn) if negotiated(&conn, PEER_ALPN) => server.serve_peer_connection(conn).await,
                        Ok(conn) => server.serve_requests(conn).await,
                        Err(e) => tracing::debug!(%remote, error = %e, "handshake failed"),
                    }
                },
                span,
            ));
        }
    }

    /// Serves each stream `conn` opens as one request until it closes, or stays idle.
    pub(crate) async fn serve_requests<C: RequestStreams>(self: &Arc<Self>, conn: C) {
        // Chunks delivered on this connection: what its receipts may pay for.
        let served = Arc::new(AtomicU32::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        // quinn's max_concurrent_bidi_streams bounds the streams in flight per connection.
        loop {
            let (send, recv) = match tokio::time::timeout(IDLE_CONNECTION, conn.accept()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(remote = %conn.remote(), reason = %e, "connection closed");
                    return;
                }
                // Keep-alives hold a QUIC connection open forever; one that asks for nothing gives its
                // slot back.
                Err(_) if in_flight.load(Ordering::Relaxed) == 0 => {
                    tracing::debug!(remote = %conn.remote(), "closing a connection idle for {IDLE_CONNECTION:?}");
                    conn.close(b"idle");
                    return;
                }
                Err(_) => continue,
            };
            let (server, served, in_flight) = (self.clone(), served.clone(), in_flight.clone());
            in_flight.fetch_add(1, Ordering::Relaxed);
            let span = tracing::debug_span!("stream", id = %send.id());
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let _in_flight = Gauge(&in_flight);
                    server.counters.active_streams.fetch_add(1, Ordering::Relaxed);
                    server.serve_stream(send, recv, &served).await;
                    server.counters.active_streams.fetch_sub(1, Ordering::Relaxed);
                },
                span,
            ));
        }
    }

    async fn serve_stream<S: ResponseStream, R: AsyncRead + Unpin>(
        self: &Arc<Self>,
        mut send: S,
        mut recv: R,
        served: &AtomicU32,
    ) {
        Counters::add(&self.counters.requests, 1);
        let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_frame::<NodeRequest, _>(&mut recv)).await {
            Ok(Ok(req)) => req,
            Ok(Err(e)) => {
                Counters::add(&self.counters.bad_requests, 1);
                tracing::warn!(error = %e, "malformed chunk request");
                return respond_error(&mut send, Status::BadRequest, &e.to_string()).await;
            }
            Err(_) => {
                Counters::add(&self.counters.bad_requests, 1);
                return respond_error(&mut send, Status::BadRequest, "request frame not received in time").await;
            }
        };
        // Clients finish their side right after the frame. A stream dropped before its end was read makes
        // QUIC tell the client to stop sending, which browsers report as a failed `close()`.
        let request_end = async {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, recv.read(&mut [0u8; 1])).await;
        };
        tokio::join!(request_end, self.serve_request(req, &mut send, served));
    }

    async fn serve_request<S: ResponseStream>(self: &Arc<Self>, req: NodeRequest, send: &mut S, served: &AtomicU32) {
        let req = match req {
            NodeRequest::Chunk(req) => req,
            NodeRequest::Push(req) => return self.keep_pushed(&req, send).await,
        };
        if !req.wants_chunk() {
            // A receipt-only request: acknowledged once checked (whether or not the receipt was good).
            self.check_receipt(&req, served).await;
            return self.send_payload(send, Bytes::new(), Reservation::none()).await.unwrap_or(());
        }
        // A receipt riding on a chunk request is checked while the chunk is served.
        tokio::join!(self.check_receipt(&req, served), self.respond(&req, send, served));
    }

    /// Keeps a receipt the request carries, if it pays for no more chunks than this connection delivered
    /// (plus a little slack for a client that reconnected): so a stranger cannot make the node walk a
    /// long hash chain for free.
    async fn check_receipt(&self, req: &ChunkRequest, served: &AtomicU32) {
        let Some(receipt) = req.receipt.clone() else { return };
        // The ticket the receipt was made under goes with it to the tracker.
        let ticket = req.ticket.clone();
        let max_advance = served.load(Ordering::Relaxed).saturating_add(RECEIPT_SLACK);
        // Checking walks hash-chain links and the write is synced: off the async workers.
        let credits = self.credits.clone();
        match tokio::task::spawn_blocking(move || credits.accept(&receipt, ticket.as_deref(), max_advance)).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "refused a client's receipt"),
            Err(e) => tracing::error!(error = %e, "receipt check failed"),
            Ok(Ok(())) => {}
        }
    }

    async fn respond<S: ResponseStream>(self: &Arc<Self>, req: &ChunkRequest, send: &mut S, served: &AtomicU32) {
        // Off, or without budget for what the request names: refused before a fill is spent on it.
        let named = req.range.map(|(_, len)| len).or(req.origin.as_ref().map(|h| h.length));
        if let Err(refusal) = self.upload.check(named.map_or(1, u64::from)) {
            tracing::debug!(chunk = %req.hash, %refusal, "refused: the owner's limits");
            return respond_error(send, Status::Busy, &refusal.to_string()).await;
        }
        let source = match self.chunk(req).await {
            Ok(source) => source,
            Err((status, message)) => return respond_error(send, status, &message).await,
        };
        let len = match (&source, req.range) {
            (_, Some((_, len))) => len,
            (Source::Stored(bytes), None) => bytes.len() as u32,
            (Source::Filling(follower), None) => follower.chunk_len(),
        };
        let reservation = match self.upload.reserve(u64::from(len)) {
            Ok(reservation) => reservation,
            Err(refusal) => {
                tracing::debug!(chunk = %req.hash, %refusal, "refused: the owner's limits");
                return respond_error(send, Status::Busy, &refusal.to_string()).await;
            }
        };
        let sent = match (source, req.range) {
            (Source::Filling(follower), None) => self.send_following(send, follower, reservation).await,
            (source, range) => {
                let bytes = match source {
                    Source::Stored(bytes) => bytes,
                    // Only whole chunks are served as they verify; a range waits for the whole.
                    Source::Filling(follower) => match follower.whole().await {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            let e = e.unwrap_or(FillError::Lost);
                            return respond_error(send, e.status(), &e.to_string()).await;
                        }
                    },
                };
                let body = match range {
                    None => bytes,
                    Some((off, len)) => {
                        let end = u64::from(off) + u64::from(len);
                        if end > bytes.len() as u64 {
                            Counters::add(&self.counters.bad_requests, 1);
                            let msg = format!("range {off}+{len} is outside the {}-byte chunk", bytes.len());
                            return respond_error(send, Status::BadRequest, &msg).await;
                        }
                        bytes.slice(off as usize..end as usize)
                    }
                };
                self.send_payload(send, body, reservation).await
            }
        };
        match sent {
            Ok(()) => {
                served.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(chunk = %req.hash, error = %e, "response not completed"),
        }
    }

    /// A push (the tracker's live push): gets the chunk as for a client's miss (a fill licensed by the
    /// request's ticket; a chunk held already costs nothing), keeps it, and answers with the response head
    /// alone once it holds the chunk, so no upload is spent on the tracker.
    async fn keep_pushed<S: ResponseStream>(self: &Arc<Self>, req: &ChunkRequest, send: &mut S) {
        if !req.wants_chunk() {
            Counters::add(&self.counters.bad_requests, 1);
            return respond_error(send, Status::BadRequest, "a push names a chunk").await;
        }
        // A chunk this node may not upload now is of no use to its viewers.
        if let Err(refusal) = self.upload.check(req.origin.as_ref().map_or(1, |h| u64::from(h.length))) {
            return respond_error(send, Status::Busy, &refusal.to_string()).await;
        }
        let held = match self.chunk(req).await {
            Ok(Source::Stored(bytes)) => Ok(bytes),
            Ok(Source::Filling(follower)) => follower.whole().await.map_err(|e| e.unwrap_or(FillError::Lost)),
            Err((status, message)) => return respond_error(send, status, &message).await,
        };
        match held {
            Ok(bytes) => {
                tracing::debug!(chunk = %req.hash, "holding a pushed chunk");
                let _ = write_last_frame(send, &ResponseHead::Ok { len: bytes.len() as u32 }.encode()).await;
            }
            Err(e) => respond_error(send, e.status(), &e.to_string()).await,
        }
    }

    /// The chunk from the store, or the fill that pulls it through.
    async fn chunk(self: &Arc<Self>, req: &ChunkRequest) -> Result<Source, (Status, String)> {
        let store = self.store.clone();
        let hash = req.hash;
        let lookup = tokio::task::spawn_blocking(move || store.get(&hash))
            .await
            .map_err(|e| (Status::Internal, e.to_string()))?;
        match lookup {
            Ok(Lookup::Hit(b)) => {
                Counters::add(&self.counters.hits, 1);
                return Ok(Source::Stored(b));
            }
            Ok(Lookup::Corrupt) => Counters::add(&self.counters.corrupt_chunks, 1),
            Ok(Lookup::Miss) => {}
            Err(e) => {
                Counters::add(&self.counters.store_errors, 1);
                tracing::error!(error = %e, "store read failed; treating as a miss");
            }
        }
        Counters::add(&self.counters.misses, 1);
        // Filling costs peers' or the origin's work: only for what the tracker assigned here.
        let Some(hint) = self.licensed(req, self.node_id).await else {
            let msg =
                format!("chunk {hash} is not cached here; misses are filled only with an origin hint and a ticket");
            return Err((Status::NotFound, msg));
        };
        let follower = self
            .fill(hash, hint, req.ticket.as_deref(), req.groups.as_ref(), Tier::Edge)
            .map_err(|e| (e.status(), e.to_string()))?;
        Ok(Source::Filling(follower))
    }

    /// Answers with a chunk being filled, group by group as it verifies. The head waits for the first
    /// verified bytes, so a fill that fails at once still answers with its status; one that fails later
    /// resets the stream, and the client keeps what arrived.
    async fn send_following<S: ResponseStream>(
        &self,
        send: &mut S,
        mut follower: Follower<FillError>,
        mut reservation: Reservation<'_>,
    ) -> Result<(), SendError> {
        let mut next = follower.next().await;
        if let Next::Failed(e) = next {
            let e = e.unwrap_or(FillError::Lost);
            respond_error(send, e.status(), &e.to_string()).await;
            return Err(SendError::FillFailed);
        }
        send.write_all(&ResponseHead::Ok { len: follower.chunk_len() }.encode()).await?;
        loop {
            match next {
                Next::Piece(piece) => self.send_limited(send, piece, &mut reservation).await?,
                Next::Done => break,
                Next::Failed(e) => {
                    tracing::debug!(error = ?e, "fill failed part-way; resetting the response");
                    send.reset(FILL_FAILED);
                    return Err(SendError::FillFailed);
                }
            }
            next = follower.next().await;
        }
        send.finish();
        Ok(())
    }

    /// The request's origin hint, if its ticket still licenses a fill for `beneficiary` (this node for its
    /// clients, the asking peer for a home fill); otherwise the node serves only what it holds.
    async fn licensed<'a>(&self, req: &'a ChunkRequest, beneficiary: NodeId) -> Option<&'a OriginHint> {
        let hint = req.origin.as_ref()?;
        let (grants, ticket) = (self.grants.clone(), req.ticket.clone());
        let taken = tokio::task::spawn_blocking(move || grants.take(ticket.as_deref(), beneficiary, now_ms())).await;
        match taken {
            Ok(Ok(())) => return Some(hint),
            Ok(Err(refusal)) => tracing::debug!(chunk = %req.hash, %refusal, "ignoring an origin hint"),
            Err(e) => tracing::error!(error = %e, "ticket check failed"),
        }
        Counters::add(&self.counters.unlicensed_hints, 1);
        None
    }

    /// Follows the fill of `hash` in progress, or starts one if a fill slot is free. `hint` is licensed;
    /// `ticket` licensed it, and goes on with it to the chunk's home. `groups` (the request's group hashes)
    /// are used when they check out against `hash`; else the chunk verifies whole.
    fn fill(
        self: &Arc<Self>,
        hash: ChunkHash,
        hint: &OriginHint,
        ticket: Option<&[u8]>,
        groups: Option<&(u32, GroupHashes)>,
        tier: Tier,
    ) -> Result<Follower<FillError>, FillError> {
        let mut fills = self.fills.lock().expect("fills lock");
        if let Some(filling) = fills.get(&hash) {
            return Ok(filling.follow());
        }
        let slot = self.fill_slots.clone().try_acquire_owned().map_err(|_| FillError::Busy)?;
        let groups = groups.filter(|(size, hashes)| match hashes.check(hash, hint.length, *size) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(chunk = %hash, error = %e, "ignoring a request's group hashes; verifying the chunk whole");
                false
            }
        });
        let filling = Arc::new(Fill::new(hint.length));
        fills.insert(hash, filling.clone());
        let follower = filling.follow();
        let job =
            FillJob { hash, hint: hint.clone(), ticket: ticket.map(<[u8]>::to_vec), groups: groups.cloned(), tier };
        tokio::spawn(self.clone().run_fill(job, filling, slot));
        Ok(follower)
    }

    /// Runs one fill to its end, whoever still follows it: stores the chunk once whole.
    async fn run_fill(self: Arc<Self>, job: FillJob, filling: Arc<Fill>, _slot: OwnedSemaphorePermit) {
        let hash = job.hash;
        // However this task ends (a panic included), its followers learn it and the chunk is not left
        // "being filled" for ever.
        let _forget = ForgetFill { fills: &self.fills, hash, filling: &filling };
        match self.pull(&job, &filling).await {
            Ok(bytes) => {
                filling.end(Ok(()));
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || store.put(&hash, &bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        Counters::add(&self.counters.store_errors, 1);
                        tracing::error!(chunk = %hash, error = %e, "could not cache chunk; served it anyway");
                    }
                    Err(e) => tracing::error!(error = %e, "store task failed"),
                }
            }
            Err(e) => filling.end(Err(e)),
        }
    }

    /// Peers first (they cost the origin nothing; at the edge, the chunk's home fills through), then the
    /// origin for what the peers did not deliver; every byte verified before it is passed on.
    async fn pull(&self, job: &FillJob, filling: &Fill) -> Result<Bytes, FillError> {
        let FillJob { hash, hint, ticket, groups, tier } = job;
        let verifier = Verifier::new(*hash, hint.length, groups.clone())
            .unwrap_or_else(|_| Verifier::new(*hash, hint.length, None).expect("no group hashes to check"));
        let mut feed = Feed::new(filling, verifier);
        if let Some(overlay) = &self.overlay {
            let fill_through = ticket.as_deref().map(|t| (hint, t)).filter(|_| *tier == Tier::Edge);
            if overlay.fetch(*hash, fill_through, groups.as_ref(), &mut feed).await {
                return Ok(feed.into_whole());
            }
        }
        self.pull_from_origin(*hash, hint, &mut feed).await?;
        Ok(feed.into_whole())
    }

    /// The chunk's bytes from the origin, from the first one `feed` has not verified.
    async fn pull_from_origin(
        &self,
        hash: ChunkHash,
        hint: &OriginHint,
        feed: &mut Feed<'_, FillError>,
    ) -> Result<(), FillError> {
        let (start, end) = (hint.offset + u64::from(feed.verified()), hint.offset + u64::from(hint.length));
        let warn = |e: &OriginError| tracing::warn!(url = %hint.url, offset = start, error = %e, "origin pull failed");
        let mut body =
            self.origin.open_range(&hint.url, start, Some(end), end - start, false).await.inspect_err(warn)?;
        Counters::add(&self.counters.origin_fills, 1);
        while let Some(piece) = body.next_piece().await.inspect_err(warn)? {
            Counters::add(&self.counters.origin_bytes, piece.len() as u64);
            if feed.push(&piece).is_err() {
                tracing::warn!(url = %hint.url, offset = hint.offset, chunk = %hash, "origin bytes do not match the requested chunk");
                return Err(FillError::Mismatch { url: hint.url.clone(), offset: hint.offset, hash });
            }
        }
        if !feed.is_done() {
            let got = u64::from(feed.verified());
            let e = OriginError::Truncated { url: hint.url.clone(), expected: hint.length.into(), got };
            warn(&e);
            return Err(e.into());
        }
        Ok(())
    }

    /// Answers peers' fill requests over libp2p until the overlay stops (see [`Server::answer_peer`]).
    pub async fn serve_peers(self: Arc<Self>, mut incoming: IncomingChunkStreams) {
        while let Some((peer, stream)) = incoming.next().await {
            self.answer_peer(peer, node_id_of(&peer), PeerPath::Libp2p, stream.compat());
        }
    }

    /// Serves a peer's `fog-peer/1` connection: its first stream must prove a registered node
    /// ([`PeerHello`]), which finishing that stream welcomes; each later stream is one fill request,
    /// answered as over libp2p ([`Server::answer_peer`]). Closed when no fill is in flight for a minute.
    async fn serve_peer_connection(self: &Arc<Self>, conn: quinn::Connection) {
        let node = match tokio::time::timeout(REQUEST_TIMEOUT, self.welcome_peer(&conn)).await {
            Ok(Ok(node)) => node,
            Ok(Err(e)) => return refuse_peer_connection(&conn, &e.to_string()),
            Err(_) => return refuse_peer_connection(&conn, "no hello in time"),
        };
        let Some(peer) = peer_id_of(&node) else { return refuse_peer_connection(&conn, "not an ed25519 key") };
        loop {
            let (send, recv) = match tokio::time::timeout(IDLE_CONNECTION, conn.accept_bi()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%node, reason = %e, "peer connection closed"),
                Err(_) if !self.peer_streams_by_peer.lock().expect("peer streams lock").contains_key(&peer) => {
                    return conn.close(0u32.into(), b"idle");
                }
                Err(_) => continue,
            };
            self.answer_peer(peer, Some(node), PeerPath::Quic, tokio::io::join(recv, send));
        }
    }

    /// The node whose hello opens `conn`, if it proves one the tracker registered and this node has not
    /// banned; the hello's stream is then finished (the welcome).
    async fn welcome_peer(&self, conn: &quinn::Connection) -> Result<NodeId, PeerRefusal> {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let hello: PeerHello = read_frame(&mut recv).await?;
        let tracker_key = self.rendezvous.tracker_key().ok_or(PeerRefusal::Unregistered)?;
        let mut exporter = [0u8; PEER_EXPORTER_LEN];
        conn.export_keying_material(&mut exporter, PEER_EXPORTER_LABEL, b"").map_err(|_| PeerRefusal::Exporter)?;
        let node = hello.verify(&exporter, tracker_key, now_ms())?;
        if peer_id_of(&node).is_some_and(|p| self.overlay.as_ref().is_some_and(|o| !o.accepts(&p))) {
            return Err(PeerRefusal::Banned);
        }
        // Finished already means the asker is gone; its next request finds the connection closed.
        let _ = send.finish();
        Ok(node)
    }

    /// Answers one of `peer`'s fill streams (from either path): from the store only (or filled through, as
    /// the chunk's home, for `node`'s ticket), under the upload cap, at most [`PEER_STREAMS`] at once and
    /// [`PEER_STREAMS_PER_PEER`] per peer; extra streams and banned peers' are dropped.
    fn answer_peer<S>(self: &Arc<Self>, peer: PeerId, node: Option<NodeId>, path: PeerPath, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if self.overlay.as_ref().is_some_and(|o| !o.accepts(&peer)) {
            return;
        }
        let Ok(permit) = self.peer_streams.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many peer fill streams; dropping one");
            return;
        };
        {
            let mut by_peer = self.peer_streams_by_peer.lock().expect("peer streams lock");
            let n = by_peer.entry(peer).or_default();
            if *n >= PEER_STREAMS_PER_PEER {
                return;
            }
            *n += 1;
        }
        let server = self.clone();
        tokio::spawn(async move {
            match server.serve_peer_stream(stream, node, path).await {
                Err(e @ PeerStreamError::Request(ReadError::Frame(_))) => {
                    Counters::add(&server.counters.bad_requests, 1);
                    tracing::warn!(%peer, error = %e, "malformed peer fill request");
                }
                Err(e) => tracing::debug!(%peer, ?path, error = %e, "peer fill stream failed"),
                Ok(()) => {}
            }
            let mut by_peer = server.peer_streams_by_peer.lock().expect("peer streams lock");
            if let Some(n) = by_peer.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    by_peer.remove(&peer);
                }
            }
            drop(permit);
        });
    }

    /// `asker`: the peer's node id, which the request's ticket must assign chunks to for a fill through.
    async fn serve_peer_stream<S: AsyncRead + AsyncWrite + Unpin>(
        self: &Arc<Self>,
        mut stream: S,
        asker: Option<NodeId>,
        path: PeerPath,
    ) -> Result<(), PeerStreamError> {
        let req: ChunkRequest = tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut stream))
            .await
            .map_err(|_| PeerStreamError::Timeout)??;
        let (store, hash) = (self.store.clone(), req.hash);
        let lookup = tokio::task::spawn_blocking(move || store.get(&hash)).await?;
        let hint = match (&lookup, asker) {
            (Ok(Lookup::Hit(_)), _) | (_, None) => None,
            (_, Some(asker)) => self.licensed(&req, asker).await,
        };
        let mut follower = match (lookup, hint) {
            (Ok(Lookup::Hit(bytes)), _) => {
                let Ok(mut reservation) = self.upload.reserve(bytes.len() as u64) else {
                    return Ok(write_last_frame(&mut stream, &PeerResponseHead::Busy.encode()).await?);
                };
                stream.write_all(&PeerResponseHead::Ok { len: bytes.len() as u32 }.encode()).await?;
                self.send_to_peer(&mut stream, &bytes, &mut reservation, path).await?;
                return Ok(stream.shutdown().await?);
            }
            // Off, or without budget for the chunk: the peer asks the next home.
            (_, Some(hint)) if self.upload.check(u64::from(hint.length)).is_err() => {
                return Ok(write_last_frame(&mut stream, &PeerResponseHead::Busy.encode()).await?);
            }
            // This node is the chunk's home for the asking peer: fill it through (never passing the hint on).
            (_, Some(hint)) => match self.fill(hash, hint, None, req.groups.as_ref(), Tier::Home) {
                Ok(following) => following,
                Err(e) => return self.refuse_peer(&mut stream, hash, &e).await,
            },
            (_, None) => return Ok(write_last_frame(&mut stream, &PeerResponseHead::NotFound.encode()).await?),
        };
        // As on the client protocol: the head once the first bytes verified, then each group as it verifies.
        let mut next = follower.next().await;
        if let Next::Failed(e) = &next {
            let e = e.clone().unwrap_or(FillError::Lost);
            return self.refuse_peer(&mut stream, hash, &e).await;
        }
        let Ok(mut reservation) = self.upload.reserve(u64::from(follower.chunk_len())) else {
            return Ok(write_last_frame(&mut stream, &PeerResponseHead::Busy.encode()).await?);
        };
        Counters::add(&self.counters.home_fills, 1);
        stream.write_all(&PeerResponseHead::Ok { len: follower.chunk_len() }.encode()).await?;
        loop {
            match next {
                Next::Piece(piece) => self.send_to_peer(&mut stream, &piece, &mut reservation, path).await?,
                Next::Done => return Ok(stream.shutdown().await?),
                // Dropping the stream tells the peer; it keeps what verified.
                Next::Failed(e) => return Err(PeerStreamError::Fill(e.unwrap_or(FillError::Lost))),
            }
            next = follower.next().await;
        }
    }

    async fn refuse_peer<S: tokio::io::AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        hash: ChunkHash,
        e: &FillError,
    ) -> Result<(), PeerStreamError> {
        tracing::debug!(chunk = %hash, error = %e, "could not fill a chunk through for a peer");
        let head = if matches!(e, FillError::Busy) { PeerResponseHead::Busy } else { PeerResponseHead::NotFound };
        Ok(write_last_frame(stream, &head.encode()).await?)
    }

    async fn send_to_peer<S: tokio::io::AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        bytes: &[u8],
        reservation: &mut Reservation<'_>,
        path: PeerPath,
    ) -> std::io::Result<()> {
        for piece in bytes.chunks(PIECE) {
            self.upload.acquire(piece.len()).await;
            stream.write_all(piece).await?;
            reservation.sent(piece.len() as u64);
            Counters::add(&self.counters.peer_served_bytes, piece.len() as u64);
            if path == PeerPath::Quic {
                Counters::add(&self.counters.peer_served_quic_bytes, piece.len() as u64);
            }
        }
        Ok(())
    }

    async fn send_payload<S: ResponseStream>(
        &self,
        send: &mut S,
        body: Bytes,
        mut reservation: Reservation<'_>,
    ) -> Result<(), SendError> {
        let head = ResponseHead::Ok { len: body.len() as u32 }.encode();
        send.write_all(&head).await?;
        self.send_limited(send, body, &mut reservation).await?;
        send.finish();
        Ok(())
    }

    /// Sends `body` under the upload cap, a piece at a time, each counted against `reservation` once sent.
    async fn send_limited<S: ResponseStream>(
        &self,
        send: &mut S,
        body: Bytes,
        reservation: &mut Reservation<'_>,
    ) -> Result<(), SendError> {
        let mut offset = 0;
        while offset < body.len() {
            let end = (offset + PIECE).min(body.len());
            self.upload.acquire(end - offset).await;
            send.write_piece(body.slice(offset..end)).await?;
            reservation.sent((end - offset) as u64);
            Counters::add(&self.counters.bytes_served, (end - offset) as u64);
            offset = end;
        }
        Ok(())
    }
}

/// Why answering a peer's fill request failed.
#[derive(Debug, thiserror::Error)]
enum PeerStreamError {
    #[error("no request within {REQUEST_TIMEOUT:?}")]
    Timeout,
    #[error("{0}")]
    Request(#[from] ReadError<FrameError>),
    #[error("store task failed: {0}")]
    Store(#[from] tokio::task::JoinError),
    #[error("sending the answer: {0}")]
    Send(#[from] std::io::Error),
    #[error("the fill failed part-way: {0}")]
    Fill(FillError),
}

/// Why a `fog-peer/1` connection was refused (closed with [`PEER_REFUSED`] and this as the reason).
#[derive(Debug, thiserror::Error)]
enum PeerRefusal {
    #[error("no hello: {0}")]
    Closed(#[from] quinn::ConnectionError),
    #[error("bad peer hello: {0}")]
    Hello(#[from] ReadError<FrameError>),
    #[error("this node has not registered with the tracker yet")]
    Unregistered,
    #[error("cannot export keying material")]
    Exporter,
    #[error("{0}")]
    Proof(#[from] PeerHelloError),
    #[error("banned for sending wrong bytes")]
    Banned,
}

/// Closes a `fog-peer/1` connection whose asker is not welcome, telling it why.
fn refuse_peer_connection(conn: &quinn::Connection, why: &str) {
    tracing::debug!(remote = %conn.remote_address(), %why, "refused a peer connection");
    conn.close(PEER_REFUSED.into(), why.as_bytes());
}

/// Forgets a fill when its task ends: only once its chunk is stored, so a request in between follows the
/// finished fill; a fill that ended without an outcome (its task panicked) fails for its followers.
struct ForgetFill<'a> {
    fills: &'a Mutex<HashMap<ChunkHash, Arc<Fill>>>,
    hash: ChunkHash,
    filling: &'a Arc<Fill>,
}

impl Drop for ForgetFill<'_> {
    fn drop(&mut self) {
        self.filling.end_unless_ended(FillError::Lost);
        let mut fills = self.fills.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if fills.get(&self.hash).is_some_and(|f| Arc::ptr_eq(f, self.filling)) {
            fills.remove(&self.hash);
        }
    }
}

/// What one fill needs to know.
struct FillJob {
    hash: ChunkHash,
    hint: OriginHint,
    ticket: Option<Vec<u8>>,
    groups: Option<(u32, GroupHashes)>,
    tier: Tier,
}

/// Where a fill was asked for: by a client at this node (the edge), which may ask the chunk's home among its
/// peers to fill through; or by a peer for which this node is the home, which must not pass that on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Edge,
    Home,
}

/// Whether `conn` negotiated the ALPN protocol `alpn`.
fn negotiated(conn: &quinn::Connection, alpn: &[u8]) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == alpn)
}

async fn respond_error<S: ResponseStream>(send: &mut S, status: Status, message: &str) {
    let head = ResponseHead::Error { status, message: message.to_string() }.encode();
    // The client may be gone; there is nobody left to tell.
    let _ = write_last_frame(send, &head).await;
}
