//! The tracker's HTTP API (hyper). Endpoints are specified in `docs/protocol.md`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fog_client::origin::OriginError;
use fog_proto::api::{
    ApiError, ErrorCode, Heartbeat, HeartbeatResponse, Register, RegisterResponse, Resolve, Signed, TrackerStats,
    KIND_HEARTBEAT, KIND_REGISTER,
};
use fog_proto::ContentId;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::TrackerConfig;
use crate::db::Db;
use crate::ingest::{Ingest, IngestError, Origin};
use crate::metrics::{Metrics, ResultLabel, StateLabel};
use crate::registry::{Registry, RegistryError};
use crate::scheduler;

/// Largest request body (register and heartbeat messages are a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;
/// Most client connections served at once.
const MAX_CONNECTIONS: usize = 4096;

#[derive(Debug)]
pub struct App {
    pub cfg: TrackerConfig,
    pub ingest: Ingest,
    pub registry: Registry,
    pub metrics: Metrics,
    pub db: Arc<Db>,
    manifests: AtomicU64,
    resolves: AtomicU64,
    ingests: AtomicU64,
    ingest_errors: AtomicU64,
}

type Reply = Response<Full<Bytes>>;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).expect("API types serialise"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>, retryable: bool) -> Reply {
    json(status, &ApiError { error: code, message: message.into(), retryable })
}

impl App {
    pub fn new(cfg: TrackerConfig, db: Arc<Db>, ingest: Ingest) -> Result<Self, crate::db::DbError> {
        let manifests = db.count_manifests()?;
        Ok(Self {
            registry: Registry::new(cfg.node_timeout, cfg.max_nodes),
            metrics: Metrics::default(),
            cfg,
            ingest,
            db,
            manifests: AtomicU64::new(manifests),
            resolves: AtomicU64::new(0),
            ingests: AtomicU64::new(0),
            ingest_errors: AtomicU64::new(0),
        })
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Result<Reply, Infallible> {
        let path = req.uri().path().to_string();
        let reply = match (req.method(), path.as_str()) {
            (&Method::GET, "/v1/resolve") => self.resolve(req.uri().query().unwrap_or("")).await,
            (&Method::POST, "/v1/nodes/register") => self.register(req, peer).await,
            (&Method::POST, "/v1/nodes/heartbeat") => self.heartbeat(req).await,
            (&Method::GET, "/v1/stats") => json(StatusCode::OK, &self.stats()),
            (&Method::GET, "/metrics") => self.metrics_text(),
            (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"ok": true})),
            _ => error(StatusCode::NOT_FOUND, ErrorCode::BadRequest, format!("no such endpoint: {path}"), false),
        };
        Ok(reply)
    }

    fn count_resolve(&self, result: &'static str) {
        self.metrics.resolves.get_or_create(&ResultLabel { result }).inc();
    }

    async fn resolve(&self, query: &str) -> Reply {
        self.resolves.fetch_add(1, Ordering::Relaxed);
        let mut url = None;
        let mut stale = None;
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "url" => url = Some(v.into_owned()),
                "stale" => match v.parse::<ContentId>() {
                    Ok(id) => stale = Some(id),
                    Err(e) => return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string(), false),
                },
                _ => {}
            }
        }
        let Some(url) = url else {
            self.count_resolve("bad_request");
            return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "missing query parameter url", false);
        };
        if !self.cfg.origins.allows(&url) {
            self.count_resolve("unknown_origin");
            tracing::info!(url, "refused: not under a registered origin");
            return error(
                StatusCode::FORBIDDEN,
                ErrorCode::UnknownOrigin,
                format!(
                    "{url} is not under a registered origin (registered: {})",
                    self.cfg.origins.prefixes().join(", ")
                ),
                false,
            );
        }
        let manifest = match self.ingest.manifest(&url, stale).await {
            Ok((m, how)) => {
                if how == Origin::Ingested {
                    self.ingests.fetch_add(1, Ordering::Relaxed);
                    if stale.is_none() {
                        self.manifests.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.count_resolve(if how == Origin::Ingested { "ingested" } else { "stored" });
                m
            }
            Err(e) => return self.ingest_error(&url, e),
        };
        let snapshot = self.registry.snapshot();
        let (nodes, schedule) = scheduler::schedule(&snapshot, &manifest.chunks, self.cfg.candidates);
        let content_id = manifest.content_id();
        json(StatusCode::OK, &Resolve { content_id, manifest: (*manifest).clone(), nodes, schedule })
    }

    fn ingest_error(&self, url: &str, e: IngestError) -> Reply {
        self.ingest_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.ingest_errors.inc();
        let (status, code, result, retryable) = match &e {
            IngestError::Origin(OriginError::Status { status: 404 | 410, .. }) => {
                (StatusCode::NOT_FOUND, ErrorCode::OriginNotFound, "origin_not_found", false)
            }
            IngestError::Origin(OriginError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, "too_large", false)
            }
            IngestError::Origin(o) => {
                (StatusCode::BAD_GATEWAY, ErrorCode::OriginError, "origin_error", o.is_retryable())
            }
            IngestError::Busy => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Internal, "busy", true),
            IngestError::Db(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "internal", true),
        };
        self.count_resolve(result);
        tracing::warn!(url, error = %e, "resolve failed");
        error(status, code, e.to_string(), retryable)
    }

    async fn signed_body(req: Request<Incoming>) -> Result<Signed, Reply> {
        let body = Limited::new(req.into_body(), MAX_BODY).collect().await.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("cannot read body (limit {MAX_BODY} bytes): {e}"),
                false,
            )
        })?;
        serde_json::from_slice(&body.to_bytes()).map_err(|e| {
            error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, format!("not a signed message: {e}"), false)
        })
    }

    fn reject_node(&self, e: impl std::fmt::Display) -> Reply {
        self.metrics.bad_node_messages.inc();
        tracing::warn!(error = %e, "rejected node message");
        error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, e.to_string(), false)
    }

    async fn register(&self, req: Request<Incoming>, peer: SocketAddr) -> Reply {
        let signed = match Self::signed_body(req).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        let reg: Register = match signed.open(KIND_REGISTER) {
            Ok(r) => r,
            Err(e) => return self.reject_node(e),
        };
        // An unspecified address means "where you see me from" (a node listening on 0.0.0.0).
        let addr = if reg.quic_addr.ip().is_unspecified() {
            SocketAddr::new(peer.ip(), reg.quic_addr.port())
        } else {
            reg.quic_addr
        };
        let result = self.registry.register(
            signed.node_id,
            addr,
            reg.cache_capacity,
            reg.upload_limit,
            reg.version,
            reg.timestamp_ms,
            now_ms(),
        );
        match result {
            Ok(()) => {
                tracing::info!(node = %signed.node_id, %addr, "node registered");
                json(
                    StatusCode::OK,
                    &RegisterResponse {
                        heartbeat_interval_secs: self.cfg.heartbeat_interval.as_secs(),
                        advertised_addr: addr,
                        origins: self.cfg.origins.clone(),
                    },
                )
            }
            Err(RegistryError::Full(n)) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::RegistryFull,
                format!("tracker registry is full ({n} nodes)"),
                true,
            ),
            Err(e) => self.reject_node(e),
        }
    }

    async fn heartbeat(&self, req: Request<Incoming>) -> Reply {
        let signed = match Self::signed_body(req).await {
            Ok(s) => s,
            Err(r) => return r,
        };
        let hb: Heartbeat = match signed.open(KIND_HEARTBEAT) {
            Ok(h) => h,
            Err(e) => return self.reject_node(e),
        };
        match self.registry.heartbeat(&signed.node_id, hb.stats, hb.timestamp_ms, now_ms()) {
            Ok(registered) => {
                json(StatusCode::OK, &HeartbeatResponse { registered, origins: self.cfg.origins.clone() })
            }
            Err(e) => self.reject_node(e),
        }
    }

    fn stats(&self) -> TrackerStats {
        let c = self.registry.counts();
        TrackerStats {
            nodes_total: c.total,
            nodes_healthy: c.healthy,
            manifests: self.manifests.load(Ordering::Relaxed),
            cache_used: c.cache_used,
            cache_capacity: c.cache_capacity,
            bytes_served: c.bytes_served,
            origin_fill_bytes: c.origin_fill_bytes,
            resolves: self.resolves.load(Ordering::Relaxed),
            ingests: self.ingests.load(Ordering::Relaxed),
            ingest_errors: self.ingest_errors.load(Ordering::Relaxed),
        }
    }

    fn metrics_text(&self) -> Reply {
        let s = self.stats();
        let m = &self.metrics;
        m.nodes.get_or_create(&StateLabel { state: "healthy" }).set(s.nodes_healthy as i64);
        m.nodes.get_or_create(&StateLabel { state: "unhealthy" }).set((s.nodes_total - s.nodes_healthy) as i64);
        m.manifests.set(s.manifests as i64);
        m.node_cache_used_bytes.set(s.cache_used as i64);
        m.node_bytes_served.set(s.bytes_served as i64);
        let mut resp = Response::new(Full::new(Bytes::from(m.encode())));
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        resp
    }
}

/// Serves HTTP on `listener` until `shutdown` resolves.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; dropping connection");
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| app.clone().handle(req, peer));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
}
