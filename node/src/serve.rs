//! The QUIC chunk server: one request per bidirectional stream (see `docs/protocol.md`).
//!
//! A hit is read from the store (verified on read); a miss is filled from the overlay peers most likely to
//! hold the chunk, then (given an origin hint) from the origin, verified, stored and served; concurrent
//! misses for one chunk share a single fill. The same server answers peers' fill requests from the store
//! only, and hands connections that negotiated the rendezvous protocol to [`RendezvousServer`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fog_client::origin::{OriginClient, OriginError, SharedOrigins};
use fog_proto::wire::{ChunkRequest, FrameError, OriginHint, PeerStatus, ResponseHead, Status};
use fog_proto::ChunkHash;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::PeerId;
use tokio::sync::{OnceCell, Semaphore};

use crate::credits::Credits;
use crate::limits::{UploadLimit, PIECE};
use crate::overlay::{IncomingChunkStreams, Overlay};
use crate::rendezvous::RendezvousServer;
use crate::stats::Counters;
use crate::store::{Lookup, Store};

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
    #[error("chunk {0} is not cached here or on any peer asked, and no origin hint was given")]
    NotHere(ChunkHash),
}

impl FillError {
    fn status(&self) -> Status {
        match self {
            Self::Origin(OriginError::NotAllowed { .. }) => Status::OriginNotAllowed,
            Self::Origin(_) => Status::OriginFailed,
            Self::Mismatch { .. } => Status::OriginMismatch,
            Self::Busy => Status::Busy,
            Self::NotHere(_) => Status::NotFound,
        }
    }
}

type FillCell = Arc<OnceCell<Result<Bytes, FillError>>>;

/// Everything a stream handler needs.
#[derive(Debug)]
pub struct Server {
    pub store: Arc<Store>,
    pub credits: Arc<Credits>,
    pub counters: Arc<Counters>,
    origin: OriginClient,
    upload: Option<UploadLimit>,
    /// Fills in progress, by chunk and whether an origin hint came with the request (a request without
    /// one must not make a request with one fail).
    fills: Mutex<HashMap<(ChunkHash, bool), FillCell>>,
    fill_slots: Semaphore,
    max_connections: usize,
    connections: AtomicUsize,
    overlay: Option<Overlay>,
    rendezvous: Arc<RendezvousServer>,
    peer_streams: Arc<Semaphore>,
    peer_streams_by_peer: Mutex<HashMap<PeerId, usize>>,
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
        upload_limit: Option<u64>,
        max_connections: usize,
        max_fills: usize,
        overlay: Option<Overlay>,
        rendezvous: Arc<RendezvousServer>,
    ) -> Self {
        Self {
            store,
            credits,
            counters,
            origin: OriginClient::new(Some(origins)),
            upload: upload_limit.map(UploadLimit::new),
            fills: Mutex::new(HashMap::new()),
            fill_slots: Semaphore::new(max_fills),
            max_connections,
            connections: AtomicUsize::new(0),
            overlay,
            rendezvous,
            peer_streams: Arc::new(Semaphore::new(PEER_STREAMS)),
            peer_streams_by_peer: Mutex::new(HashMap::new()),
        }
    }

    /// Accepts connections until the endpoint is closed.
    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            if self.connections.load(Ordering::Relaxed) >= self.max_connections {
                tracing::warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
                incoming.refuse();
                continue;
            }
            self.connections.fetch_add(1, Ordering::Relaxed);
            let server = self.clone();
            tokio::spawn(async move {
                let _gauge = Gauge(&server.connections);
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) if negotiated(&conn, fog_proto::rendezvous::ALPN) => {
                        server.rendezvous.clone().serve_connection(conn).await
                    }
                    Ok(conn) => server.serve_connection(conn).await,
                    Err(e) => tracing::debug!(%remote, error = %e, "handshake failed"),
                }
            });
        }
    }

    async fn serve_connection(self: &Arc<Self>, conn: quinn::Connection) {
        // quinn's max_concurrent_bidi_streams bounds the streams in flight per connection.
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(remote = %conn.remote_address(), reason = %e, "connection closed");
                    return;
                }
            };
            let server = self.clone();
            tokio::spawn(async move {
                server.counters.active_streams.fetch_add(1, Ordering::Relaxed);
                server.serve_stream(send, recv).await;
                server.counters.active_streams.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    async fn serve_stream(&self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        Counters::add(&self.counters.requests, 1);
        let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut recv)).await {
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
        if !req.wants_chunk() {
            // A receipt-only request: acknowledged once checked (whether or not the receipt was good).
            self.check_receipt(&req).await;
            return self.send_payload(&mut send, Bytes::new()).await.unwrap_or(());
        }
        // A receipt riding on a chunk request is checked while the chunk is served.
        tokio::join!(self.check_receipt(&req), self.respond(&req, &mut send));
    }

    async fn check_receipt(&self, req: &ChunkRequest) {
        let Some(receipt) = req.receipt.clone() else { return };
        // Checking walks hash-chain links and the write is synced: off the async workers.
        let credits = self.credits.clone();
        match tokio::task::spawn_blocking(move || credits.accept(&receipt)).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "refused a client's receipt"),
            Err(e) => tracing::error!(error = %e, "receipt check failed"),
            Ok(Ok(())) => {}
        }
    }

    async fn respond(&self, req: &ChunkRequest, send: &mut quinn::SendStream) {
        let bytes = match self.chunk(req).await {
            Ok(b) => b,
            Err((status, message)) => return respond_error(send, status, &message).await,
        };
        let body = match req.range {
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
        if let Err(e) = self.send_payload(send, body).await {
            tracing::debug!(chunk = %req.hash, error = %e, "client went away mid-response");
        }
    }

    /// The verified chunk, from the store or pulled through from the origin.
    async fn chunk(&self, req: &ChunkRequest) -> Result<Bytes, (Status, String)> {
        let store = self.store.clone();
        let hash = req.hash;
        let lookup = tokio::task::spawn_blocking(move || store.get(&hash))
            .await
            .map_err(|e| (Status::Internal, e.to_string()))?;
        match lookup {
            Ok(Lookup::Hit(b)) => {
                Counters::add(&self.counters.hits, 1);
                return Ok(b);
            }
            Ok(Lookup::Corrupt) => Counters::add(&self.counters.corrupt_chunks, 1),
            Ok(Lookup::Miss) => {}
            Err(e) => {
                Counters::add(&self.counters.store_errors, 1);
                tracing::error!(error = %e, "store read failed; treating as a miss");
            }
        }
        Counters::add(&self.counters.misses, 1);
        self.fill(hash, req.origin.as_ref(), Tier::Edge).await.map_err(|e| (e.status(), e.to_string()))
    }

    async fn fill(&self, hash: ChunkHash, hint: Option<&OriginHint>, tier: Tier) -> Result<Bytes, FillError> {
        let key = (hash, hint.is_some());
        let cell = self.fills.lock().expect("fills lock").entry(key).or_default().clone();
        let result = cell.get_or_init(|| self.pull(hash, hint, tier)).await.clone();
        let mut fills = self.fills.lock().expect("fills lock");
        if fills.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            fills.remove(&key);
        }
        result
    }

    /// Peers first (they cost the origin nothing; at the edge, the chunk's home fills through), then the
    /// origin; stores what verified.
    async fn pull(&self, hash: ChunkHash, hint: Option<&OriginHint>, tier: Tier) -> Result<Bytes, FillError> {
        let _slot = self.fill_slots.try_acquire().map_err(|_| FillError::Busy)?;
        let from_peer = match &self.overlay {
            Some(overlay) => overlay.fetch(hash, hint.filter(|_| tier == Tier::Edge)).await,
            None => None,
        };
        let bytes = match (from_peer, hint) {
            (Some(bytes), _) => bytes,
            (None, Some(hint)) => self.pull_from_origin(hash, hint).await?,
            (None, None) => return Err(FillError::NotHere(hash)),
        };
        let (store, stored) = (self.store.clone(), bytes.clone());
        match tokio::task::spawn_blocking(move || store.put(&hash, &stored)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                Counters::add(&self.counters.store_errors, 1);
                tracing::error!(chunk = %hash, error = %e, "could not cache chunk; serving it anyway");
            }
            Err(e) => tracing::error!(error = %e, "store task failed"),
        }
        Ok(bytes)
    }

    async fn pull_from_origin(&self, hash: ChunkHash, hint: &OriginHint) -> Result<Bytes, FillError> {
        let bytes = self.origin.fetch_range(&hint.url, hint.offset, hint.length).await.inspect_err(|e| {
            tracing::warn!(url = %hint.url, offset = hint.offset, error = %e, "origin pull failed");
        })?;
        Counters::add(&self.counters.origin_fills, 1);
        Counters::add(&self.counters.origin_bytes, bytes.len() as u64);
        if ChunkHash::of(&bytes) != hash {
            tracing::warn!(url = %hint.url, offset = hint.offset, chunk = %hash, "origin bytes do not match the requested chunk");
            return Err(FillError::Mismatch { url: hint.url.clone(), offset: hint.offset, hash });
        }
        Ok(bytes)
    }

    /// Answers peers' fill requests until the overlay stops: from the store only, under the upload cap,
    /// at most [`PEER_STREAMS`] at once and [`PEER_STREAMS_PER_PEER`] per peer; extra streams are dropped.
    pub async fn serve_peers(self: Arc<Self>, mut incoming: IncomingChunkStreams) {
        while let Some((peer, stream)) = incoming.next().await {
            if self.overlay.as_ref().is_some_and(|o| !o.accepts(&peer)) {
                continue;
            }
            let Ok(permit) = self.peer_streams.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many peer fill streams; dropping one");
                continue;
            };
            {
                let mut by_peer = self.peer_streams_by_peer.lock().expect("peer streams lock");
                let n = by_peer.entry(peer).or_default();
                if *n >= PEER_STREAMS_PER_PEER {
                    continue;
                }
                *n += 1;
            }
            let server = self.clone();
            tokio::spawn(async move {
                match server.serve_peer_stream(stream).await {
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        Counters::add(&server.counters.bad_requests, 1);
                        tracing::warn!(%peer, error = %e, "malformed peer fill request");
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "peer fill stream failed"),
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
    }

    async fn serve_peer_stream(&self, mut stream: libp2p::Stream) -> std::io::Result<()> {
        let req = tokio::time::timeout(REQUEST_TIMEOUT, read_peer_request(&mut stream))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request in time"))??;
        let (store, hash) = (self.store.clone(), req.hash);
        let lookup = tokio::task::spawn_blocking(move || store.get(&hash)).await.map_err(std::io::Error::other)?;
        let bytes = match (lookup, &req.origin) {
            (Ok(Lookup::Hit(bytes)), _) => bytes,
            // This node is the chunk's home for the asking peer: fill it through (never passing the hint on).
            (_, Some(hint)) => match self.fill(hash, Some(hint), Tier::Home).await {
                Ok(bytes) => {
                    Counters::add(&self.counters.home_fills, 1);
                    bytes
                }
                Err(e) => {
                    tracing::debug!(chunk = %hash, error = %e, "could not fill a chunk through for a peer");
                    let status = if matches!(e, FillError::Busy) { PeerStatus::Busy } else { PeerStatus::NotFound };
                    stream.write_all(&[status as u8]).await?;
                    return stream.close().await;
                }
            },
            (_, None) => {
                stream.write_all(&[PeerStatus::NotFound as u8]).await?;
                return stream.close().await;
            }
        };
        let mut head = vec![PeerStatus::Ok as u8];
        head.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        stream.write_all(&head).await?;
        for piece in bytes.chunks(PIECE) {
            if let Some(limit) = &self.upload {
                limit.acquire(piece.len()).await;
            }
            stream.write_all(piece).await?;
            Counters::add(&self.counters.peer_served_bytes, piece.len() as u64);
        }
        stream.close().await
    }

    async fn send_payload(&self, send: &mut quinn::SendStream, body: Bytes) -> Result<(), quinn::WriteError> {
        let head = ResponseHead::Ok { len: body.len() as u32 }.encode();
        send.write_all(&head).await?;
        let mut offset = 0;
        while offset < body.len() {
            let end = (offset + PIECE).min(body.len());
            if let Some(limit) = &self.upload {
                limit.acquire(end - offset).await;
            }
            send.write_chunk(body.slice(offset..end)).await?;
            Counters::add(&self.counters.bytes_served, (end - offset) as u64);
            offset = end;
        }
        let _ = send.finish();
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("reading request: {0}")]
    Read(#[from] quinn::ReadExactError),
}

/// Where a fill was asked for: by a client at this node (the edge), which may ask the chunk's home among its
/// peers to fill through; or by a peer for which this node is the home, which must not pass that on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Edge,
    Home,
}

/// A peer's request frame (the client protocol's framing, see `fog_proto::wire::PEER_PROTOCOL`).
async fn read_peer_request(stream: &mut libp2p::Stream) -> std::io::Result<ChunkRequest> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let bad = |e: FrameError| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut body = vec![0u8; ChunkRequest::check_len(u16::from_be_bytes(len)).map_err(bad)?];
    stream.read_exact(&mut body).await?;
    ChunkRequest::decode(&body).map_err(bad)
}

async fn read_request(recv: &mut quinn::RecvStream) -> Result<ChunkRequest, RequestError> {
    let mut len = [0u8; 2];
    recv.read_exact(&mut len).await?;
    let len = ChunkRequest::check_len(u16::from_be_bytes(len))?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(ChunkRequest::decode(&body)?)
}

/// Whether `conn` negotiated the ALPN protocol `alpn`.
fn negotiated(conn: &quinn::Connection, alpn: &[u8]) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == alpn)
}

async fn respond_error(send: &mut quinn::SendStream, status: Status, message: &str) {
    let head = ResponseHead::Error { status, message: message.to_string() }.encode();
    if send.write_all(&head).await.is_ok() {
        let _ = send.finish();
    }
}
