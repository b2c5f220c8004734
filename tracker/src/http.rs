//! The tracker's HTTP surface: the API (specified in `docs/protocol.md`), the operators' dashboard and its
//! JSON feeds, and Prometheus metrics.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fog_client::http_server::{self, json, reply, Reply};
use fog_client::origin::OriginError;
use fog_client::per_source::{Held, PerSource};
use fog_client::transport;
use fog_proto::api::now_ms;
use fog_proto::api::{
    ApiError, ClientReport, ErrorCode, Heartbeat, HeartbeatResponse, NodeContact, OverlayReport, Reachability,
    Register, RegisterResponse, Resolve, RttSample, Signed, TrackerStats, KIND_HEARTBEAT, KIND_REGISTER,
    MAX_PEERS_LISTED, WANT_PEERS,
};
use fog_proto::credits::{RedeemBatch, RedeemResponse, KIND_REDEEM, MAX_BATCH};
use fog_proto::{ChunkHash, ContentId, Manifest, NodeId};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use crate::config::TrackerConfig;
use crate::dashboard::{Dashboard, Event, Sample, TopContent, SAMPLE_EVERY};
use crate::db::Db;
use crate::ingest::{Ingest, IngestError, Origin};
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::{Metrics, PathLabel, ReachabilityLabel, ResultLabel, SourceLabel, StateLabel};
use crate::registry::{ClientPath, Registration, Registry, RegistryError, SortBy};
use fog_sched::coords::{ClientCoords, ClientNet};
use fog_sched::scheduler;

/// Largest request body (register and heartbeat messages are a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;
/// Most client connections served at once.
const MAX_CONNECTIONS: usize = 4096;
/// Most dashboards following the live stream at once, in all and per source.
const MAX_STREAMS: usize = 64;
const STREAMS_PER_SOURCE: usize = 4;

const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
const UPLOT_JS: &[u8] = include_bytes!("../assets/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &[u8] = include_bytes!("../assets/vendor/uplot/uPlot.min.css");

#[derive(Debug)]
pub struct App {
    pub cfg: TrackerConfig,
    pub ingest: Ingest,
    pub registry: Registry,
    pub metrics: Metrics,
    pub dashboard: Dashboard,
    pub ledger: Ledger,
    pub db: Arc<Db>,
    manifests: AtomicU64,
    resolves: AtomicU64,
    ingests: AtomicU64,
    ingest_errors: AtomicU64,
    streams: Arc<Semaphore>,
    streams_by_source: Held,
    /// Nodes clients reported serving wrong bytes, for the prober to check now.
    urgent_probes: mpsc::Sender<NodeId>,
    urgent_rx: std::sync::Mutex<Option<mpsc::Receiver<NodeId>>>,
    /// QUIC endpoint for probes; `None` if it could not be opened.
    pub dialer: Option<quinn::Endpoint>,
    /// QUIC endpoint for registrations' dial-backs, never used for probes: probes of nodes behind NAT are
    /// hole-punched, which opens their NAT to the prober's address, and a dial-back from there would pass.
    /// One long-lived endpoint: a fresh one per dial-back cost ~1 MiB of resident memory each under a
    /// registration flood (quinn's receive buffer, kept by the allocator).
    dial_back_endpoint: Option<quinn::Endpoint>,
    /// The scheduler's recent load and chunk popularity.
    load: std::sync::Mutex<scheduler::Load>,
    /// Client networks' coordinates, from their reports.
    clients: std::sync::Mutex<ClientCoords>,
    dial_backs: Semaphore,
    /// Fair shares per source (IPv4 address / IPv6 /64) of registrations and of new ingests.
    registrations_by_source: PerSource,
    ingests_by_source: PerSource,
    redeems_by_source: PerSource,
}

/// Registrations a source may make: a burst, then this many a minute.
const REGISTRATIONS_PER_SOURCE: (u32, u32) = (64, 60);
/// New objects a source may have ingested: a burst, then this many a minute.
const INGESTS_PER_SOURCE: (u32, u32) = (64, 60);
/// Redeem batches per source: burst, then per minute (a node drains a full backlog of 64 batches at once).
const REDEEMS_PER_SOURCE: (u32, u32) = (128, 120);

/// Client network prefixes whose coordinates are remembered.
const MAX_CLIENT_PREFIXES: usize = 100_000;

/// Dial-backs at once (each is one QUIC handshake attempt), and how long one may take.
const DIAL_BACKS: usize = 32;
const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(3);

fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>, retryable: bool) -> Reply {
    json(status, &ApiError { error: code, message: message.into(), retryable })
}

/// What the dashboard's header, charts and side panels show; pushed every sample over the live stream.
#[derive(Debug, Serialize)]
struct Summary {
    now_ms: u64,
    stats: TrackerStats,
    /// Totals since the tracker started, from the growth of node counters.
    fog_bytes_total: u64,
    origin_fill_bytes_total: u64,
    node_requests_total: u64,
    /// What players' proxies reported: bytes from the fog and from origins (fallback and pass-through).
    client_fog_bytes_total: u64,
    client_origin_bytes_total: u64,
    samples: Vec<Sample>,
    events: Vec<Event>,
    top_content: Vec<TopContent>,
    admin_enabled: bool,
}

fn query_u64(query: &str, key: &str) -> Option<u64> {
    query_pairs(query).find(|(k, _)| k == key).and_then(|(_, v)| v.parse().ok())
}

fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
}

impl App {
    pub fn new(cfg: TrackerConfig, db: Arc<Db>, ingest: Ingest, ledger: Ledger) -> Result<Self, crate::db::DbError> {
        let manifests = db.count_manifests()?;
        let (urgent_probes, urgent_rx) = mpsc::channel(64);
        let blocked = db.blocked_nodes()?;
        Ok(Self {
            registry: Registry::new(cfg.node_timeout, cfg.max_nodes, blocked).with_params(scheduler::Params {
                k: cfg.candidates,
                epsilon: cfg.load_epsilon,
                ..Default::default()
            }),
            load: Default::default(),
            clients: std::sync::Mutex::new(ClientCoords::new(MAX_CLIENT_PREFIXES)),
            metrics: Metrics::default(),
            dashboard: Dashboard::default(),
            ledger,
            cfg,
            ingest,
            db,
            manifests: AtomicU64::new(manifests),
            resolves: AtomicU64::new(0),
            ingests: AtomicU64::new(0),
            ingest_errors: AtomicU64::new(0),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            streams_by_source: Held::default(),
            urgent_probes,
            urgent_rx: std::sync::Mutex::new(Some(urgent_rx)),
            dialer: transport::client_endpoint(([0, 0, 0, 0], 0).into())
                .inspect_err(|e| tracing::error!(error = %e, "cannot open a QUIC endpoint: nodes will not be probed"))
                .ok(),
            dial_back_endpoint: transport::client_endpoint(([0, 0, 0, 0], 0).into())
                .inspect_err(|e| tracing::error!(error = %e, "cannot open a QUIC endpoint: no node will be reachable"))
                .ok(),
            dial_backs: Semaphore::new(DIAL_BACKS),
            registrations_by_source: PerSource::new(REGISTRATIONS_PER_SOURCE.1, REGISTRATIONS_PER_SOURCE.0),
            ingests_by_source: PerSource::new(INGESTS_PER_SOURCE.1, INGESTS_PER_SOURCE.0),
            redeems_by_source: PerSource::new(REDEEMS_PER_SOURCE.1, REDEEMS_PER_SOURCE.0),
        })
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Reply {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/v1/resolve") => self.resolve(&query, peer).await,
            (&Method::GET, "/v1/origins") => json(StatusCode::OK, &self.cfg.origins),
            (&Method::POST, "/v1/credits/redeem") => self.redeem(req, peer).await,
            (&Method::GET, "/v1/credits") => self.ledger_reply(self.ledger.all_credits()),
            (&Method::GET, "/v1/ledger/head") => self.ledger_head(&query),
            (&Method::GET, "/v1/ledger/leaf") => match query_u64(&query, "index") {
                Some(i) => match self.ledger.leaf(i) {
                    Ok(Some(leaf)) => json(StatusCode::OK, &leaf),
                    Ok(None) => error(StatusCode::NOT_FOUND, ErrorCode::BadRequest, "no such leaf", false),
                    Err(e) => self.ledger_error(e),
                },
                None => error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "index=N required", false),
            },
            (&Method::GET, "/v1/ledger/inclusion") => match (query_u64(&query, "index"), query_u64(&query, "size")) {
                (Some(i), Some(n)) => {
                    self.ledger_reply(self.ledger.inclusion(i, n).map(|p| serde_json::json!({ "proof": p })))
                }
                _ => error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "index=N&size=N required", false),
            },
            (&Method::GET, "/v1/ledger/consistency") => match (query_u64(&query, "first"), query_u64(&query, "second"))
            {
                (Some(a), Some(b)) => {
                    self.ledger_reply(self.ledger.consistency(a, b).map(|p| serde_json::json!({ "proof": p })))
                }
                _ => error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, "first=N&second=N required", false),
            },
            (&Method::GET, p) if p.starts_with("/v1/nodes/") && p.ends_with("/credits") => {
                let id = p.trim_start_matches("/v1/nodes/").trim_end_matches("/credits");
                match id.parse::<NodeId>() {
                    Ok(id) => self.ledger_reply(self.ledger.statement(&id, 100)),
                    Err(e) => error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string(), false),
                }
            }
            (&Method::POST, "/v1/nodes/register") => self.register(req, peer).await,
            (&Method::POST, "/v1/nodes/heartbeat") => self.heartbeat(req).await,
            (&Method::POST, "/v1/reports") => self.client_report(req, peer).await,
            (&Method::GET, "/v1/stats") => json(StatusCode::OK, &self.stats()),
            (&Method::GET, "/metrics") => http_server::metrics(self.metrics_text()),
            (&Method::GET, "/healthz") => json(StatusCode::OK, &serde_json::json!({"ok": true})),
            (&Method::GET, "/") => reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD_HTML),
            (&Method::GET, "/assets/uplot.min.js") => {
                reply(StatusCode::OK, "text/javascript", Bytes::from_static(UPLOT_JS))
            }
            (&Method::GET, "/assets/uplot.min.css") => reply(StatusCode::OK, "text/css", Bytes::from_static(UPLOT_CSS)),
            (&Method::GET, "/v1/dashboard/summary") => json(StatusCode::OK, &self.summary()),
            (&Method::GET, "/v1/dashboard/nodes") => {
                let admin = self.is_admin(&req);
                self.nodes_page(&query, admin)
            }
            (&Method::GET, "/v1/dashboard/stream") => self.stream(peer.ip()),
            (&Method::GET, "/v1/admin/blocked") => {
                self.refuse_non_admin(&req).unwrap_or_else(|| json(StatusCode::OK, &self.registry.blocked()))
            }
            (&Method::POST, p) if p.starts_with("/v1/admin/nodes/") => {
                self.refuse_non_admin(&req).unwrap_or_else(|| self.admin_node_action(p))
            }
            _ => error(StatusCode::NOT_FOUND, ErrorCode::BadRequest, format!("no such endpoint: {path}"), false),
        }
    }

    fn count_resolve(&self, result: &'static str) {
        self.metrics.resolves.get_or_create(&ResultLabel { result }).inc();
    }

    async fn resolve(&self, query: &str, peer: SocketAddr) -> Reply {
        self.resolves.fetch_add(1, Ordering::Relaxed);
        let mut url = None;
        let mut stale = None;
        let mut client_key = None;
        for (k, v) in query_pairs(query) {
            match k.as_str() {
                "url" => url = Some(v),
                "client_key" => match v.parse::<NodeId>() {
                    Ok(key) => client_key = Some(key),
                    Err(e) => return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string(), false),
                },
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
        // One form for the allow-list, the fetch and the manifest key: spellings of one URL share a manifest.
        let url = match fog_proto::origins::canonical_url(&url) {
            Ok(url) => url,
            Err(e) => {
                self.count_resolve("bad_request");
                return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e, false);
            }
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
        // Reading an object from its origin is the costliest thing a stranger can ask for: each source gets
        // its share of new ingests (query-string variants of one URL are distinct objects to an origin).
        if (stale.is_some() || !self.ingest.is_stored(&url)) && !self.ingests_by_source.check(peer.ip()) {
            self.count_resolve("rate_limited");
            let msg = "too many new objects ingested for your network; try again in a minute (the origin serves it meanwhile)";
            return error(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, msg, true);
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
        self.dashboard.count_resolve(&url);
        let client = self.clients.lock().expect("clients lock").get(peer.ip());
        let (nodes, schedule, ticket) = self.assign(
            &manifest,
            client.as_ref(),
            &mut self.load.lock().expect("load lock"),
            client_key,
            Some(peer.ip()),
        );
        json(
            StatusCode::OK,
            &Resolve { content_id: manifest.content_id(), manifest: (*manifest).clone(), nodes, schedule, ticket },
        )
    }

    /// Candidate nodes for each chunk of `manifest`, as a client network `client` gets them (charged to
    /// `load`), with a credit ticket for the session key `client_key` (tickets are shared per `source`, if
    /// given). The tracker's probes ask nodes through the same call, so they look like any client's.
    pub(crate) fn assign(
        &self,
        manifest: &Manifest,
        client: Option<&ClientNet>,
        load: &mut scheduler::Load,
        client_key: Option<NodeId>,
        source: Option<IpAddr>,
    ) -> (Vec<NodeContact>, Vec<Vec<u32>>, Option<Signed>) {
        let snapshot = self.registry.snapshot();
        let chunks: Vec<(ChunkHash, u32)> =
            manifest.chunks.iter().enumerate().map(|(i, c)| (*c, manifest.chunk_span(i).1)).collect();
        let (nodes, schedule) = scheduler::schedule(&snapshot, load, client, &chunks, self.registry.params(), now_ms());
        let ticket = match client_key {
            Some(key) if !nodes.is_empty() => {
                // A node may be paid for the chunks it is a candidate for, and no more.
                let mut assigned = vec![0u32; nodes.len()];
                for &i in schedule.iter().flatten() {
                    assigned[i as usize] += 1;
                }
                let ids = nodes.iter().map(|n| n.id).collect();
                let (unit, budget) = (manifest.chunk_size, manifest.size);
                match self.ledger.issue_ticket(source, key, manifest.content_id(), ids, assigned, unit, budget) {
                    Ok(t) => t,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot issue a credit ticket; serving without one");
                        None
                    }
                }
            }
            _ => None,
        };
        (nodes, schedule, ticket)
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
            IngestError::Origin(_) => {
                (StatusCode::BAD_GATEWAY, ErrorCode::OriginError, "origin_error", e.is_retryable())
            }
            IngestError::Busy => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Internal, "busy", e.is_retryable()),
            IngestError::Db(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, "internal", e.is_retryable())
            }
        };
        self.count_resolve(result);
        tracing::warn!(url, error = %e, "resolve failed");
        self.dashboard.event("ingest_error", e.to_string());
        error(status, code, e.to_string(), retryable)
    }

    /// A JSON request body of at most [`MAX_BODY`] bytes.
    async fn json_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Reply> {
        let body = http_server::read_body(req, MAX_BODY)
            .await
            .map_err(|e| error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string(), false))?;
        serde_json::from_slice(&body).map_err(|e| {
            error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, format!("malformed request body: {e}"), false)
        })
    }

    /// A node's signed message of `kind`: the signer and the verified payload, or the refusal to send.
    async fn signed_message<T: serde::de::DeserializeOwned>(
        &self,
        req: Request<Incoming>,
        kind: &'static str,
    ) -> Result<(NodeId, T), Reply> {
        let signed = Self::json_body::<Signed>(req).await?;
        match signed.open(kind) {
            Ok(message) => Ok((signed.node_id, message)),
            Err(e) => Err(self.reject_node(&signed.node_id, e)),
        }
    }

    fn reject_node(&self, node: &NodeId, e: impl std::fmt::Display) -> Reply {
        self.metrics.bad_node_messages.inc();
        tracing::warn!(%node, error = %e, "rejected node message");
        self.dashboard.event("node_rejected", format!("node {}: {e}", &node.to_hex()[..16]));
        error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, e.to_string(), false)
    }

    async fn register(&self, req: Request<Incoming>, peer: SocketAddr) -> Reply {
        // Each registration costs a QUIC dial-back: a source may register only so often.
        if !self.registrations_by_source.check(peer.ip()) {
            let msg = "too many registrations from your network; try again in a minute";
            return error(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, msg, true);
        }
        let (node, reg): (NodeId, Register) = match self.signed_message(req, KIND_REGISTER).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        if let Err(e) = reg.check_bounds() {
            return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e, false);
        }
        // An unspecified address means "where you see me from" (a node listening on 0.0.0.0).
        let addr = if reg.quic_addr.ip().is_unspecified() {
            SocketAddr::new(peer.ip(), reg.quic_addr.port())
        } else {
            reg.quic_addr
        };
        let reachable = self.dial_back(node, addr).await;
        let registration = Registration {
            addr,
            cache_capacity: reg.cache_capacity,
            upload_limit: reg.upload_limit,
            version: reg.version,
            reachable,
            joining: reg.joining,
        };
        match self.registry.register(node, registration, reg.timestamp_ms, now_ms()) {
            Ok(()) => {
                tracing::info!(node = %node, %addr, reachable, "node registered");
                self.dashboard.event("node_registered", format!("node {} registered", &node.to_hex()[..16]));
                json(
                    StatusCode::OK,
                    &RegisterResponse {
                        heartbeat_interval_secs: self.cfg.heartbeat_interval.as_secs(),
                        advertised_addr: addr,
                        origins: self.cfg.origins.clone(),
                        tracker_key: Some(self.ledger.public_key()),
                        reachable,
                        peers: self.registry.peers_for(&node, MAX_PEERS_LISTED),
                        membership: Some(self.ledger.membership(node, now_ms())),
                    },
                )
            }
            Err(RegistryError::Full(n)) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::RegistryFull,
                format!("tracker registry is full ({n} nodes)"),
                true,
            ),
            Err(e) => self.reject_node(&node, e),
        }
    }

    async fn heartbeat(&self, req: Request<Incoming>) -> Reply {
        let (node, hb): (NodeId, Heartbeat) = match self.signed_message(req, KIND_HEARTBEAT).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let overlay_bounds = hb.overlay.as_ref().map_or(Ok(()), OverlayReport::check_bounds);
        if let Err(e) = hb.stats.check_bounds().and(overlay_bounds) {
            return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e, false);
        }
        let bad_peers = hb.overlay.as_ref().map(|o| o.bad_peers.clone()).unwrap_or_default();
        // Few overlay peers, or behind NAT without a rendezvous: suggest peers (and rendezvous candidates).
        let wants_peers = hb.overlay.as_ref().is_some_and(|o| {
            o.connected_peers < WANT_PEERS || (o.rendezvous.is_none() && !self.registry.is_reachable(&node))
        });
        match self.registry.heartbeat(&node, hb.stats, hb.draining, hb.overlay, hb.timestamp_ms, now_ms()) {
            Ok(registered) => {
                for peer in bad_peers {
                    // Like a client's report: not believed as such, the node gets probed.
                    self.dashboard.event(
                        "peer_report",
                        format!("node {} says node {} sent wrong bytes", &node.to_hex()[..16], &peer.to_hex()[..16]),
                    );
                    let _ = self.urgent_probes.try_send(peer);
                }
                let peers = if registered && wants_peers {
                    self.registry.peers_for(&node, MAX_PEERS_LISTED)
                } else {
                    Vec::new()
                };
                json(StatusCode::OK, &HeartbeatResponse { registered, origins: self.cfg.origins.clone(), peers })
            }
            Err(e) => self.reject_node(&node, e),
        }
    }

    /// Whether a QUIC handshake with `node` at `addr` succeeds (the node proves its key): only then are
    /// clients sent to that address directly. Each dial-back uses a fresh UDP port, so the failed attempt
    /// leaves no NAT state that could later collide with the node's hole-punched flows to our prober.
    async fn dial_back(&self, node: NodeId, addr: SocketAddr) -> bool {
        let Ok(_slot) = self.dial_backs.acquire().await else { return false };
        let Some(dialer) = &self.dial_back_endpoint else { return false };
        match transport::connect(dialer, node, addr, DIAL_BACK_TIMEOUT, DIAL_BACK_TIMEOUT).await {
            Ok(conn) => {
                conn.close(0u32.into(), b"dial-back done");
                true
            }
            Err(e) => {
                tracing::info!(%node, %addr, error = %e, "dial-back failed: node is behind NAT or a firewall");
                false
            }
        }
    }

    /// `POST /v1/credits/redeem`: a node's signed batch of receipts.
    async fn redeem(&self, req: Request<Incoming>, peer: SocketAddr) -> Reply {
        let (node, batch): (NodeId, RedeemBatch) = match self.signed_message(req, KIND_REDEEM).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        // Rejections are kept per node: only registered nodes may write them (and credits go to nodes
        // the tracker schedules). A node the tracker forgot registers again, then redeems.
        if !self.registry.is_registered(&node) {
            let msg = "unknown node: register (or wait for the next heartbeat to re-register), then redeem";
            return error(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, msg, true);
        }
        if !self.redeems_by_source.check(peer.ip()) {
            let msg = "too many redeems from your network; hold the receipts and try again in a minute";
            return error(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, msg, true);
        }
        if batch.receipts.len() > MAX_BATCH {
            let msg = format!("at most {MAX_BATCH} receipts per batch");
            return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, msg, false);
        }
        // Signature checks, chain walks and a synced write: off the async workers.
        match tokio::task::block_in_place(|| self.ledger.redeem(node, &batch.receipts)) {
            Ok(results) => {
                let credited: u64 = results.iter().map(|r| r.credited_bytes).sum();
                let rejected = results.iter().filter(|r| r.outcome == "rejected").count();
                self.metrics.credited_bytes.inc_by(credited);
                self.metrics.rejected_receipts.inc_by(rejected as u64);
                if rejected > 0 {
                    let short = &node.to_hex()[..16];
                    self.dashboard.event("receipts_rejected", format!("node {short}: {rejected} receipt(s) rejected"));
                }
                json(StatusCode::OK, &RedeemResponse { results })
            }
            Err(e) => self.ledger_error(e),
        }
    }

    fn ledger_error(&self, e: LedgerError) -> Reply {
        tracing::error!(error = %e, "ledger failure");
        error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, e.to_string(), e.is_retryable())
    }

    fn ledger_reply<T: Serialize>(&self, r: Result<T, LedgerError>) -> Reply {
        match r {
            Ok(v) => json(StatusCode::OK, &v),
            Err(e) => self.ledger_error(e),
        }
    }

    /// `GET /v1/ledger/head[?epoch=E]`: the signed head now, or the one that sealed epoch E.
    fn ledger_head(&self, query: &str) -> Reply {
        match query_u64(query, "epoch") {
            None => self.ledger_reply(self.ledger.head()),
            Some(e) => match self.ledger.epoch_head(e) {
                Ok(Some(h)) => json(StatusCode::OK, &h),
                Ok(None) => {
                    error(StatusCode::NOT_FOUND, ErrorCode::BadRequest, format!("epoch {e} is not sealed yet"), true)
                }
                Err(e) => self.ledger_error(e),
            },
        }
    }

    /// `POST /v1/reports`: counted for dashboards and metrics only (reports are not authenticated).
    async fn client_report(&self, req: Request<Incoming>, peer: SocketAddr) -> Reply {
        let report: ClientReport = match Self::json_body(req).await {
            Ok(r) => r,
            Err(r) => return r,
        };
        if let Err(e) = report.check_bounds() {
            return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e, false);
        }
        self.place_client(peer, &report.node_rtt);
        let m = &self.metrics;
        m.client_bytes.get_or_create(&SourceLabel { source: "fog" }).inc_by(report.fog_bytes);
        m.client_bytes.get_or_create(&SourceLabel { source: "origin" }).inc_by(report.origin_bytes);
        m.client_bytes.get_or_create(&SourceLabel { source: "passthrough" }).inc_by(report.passthrough_bytes);
        let t = &self.registry.totals;
        crate::registry::saturating_add(&t.client_fog_bytes, report.fog_bytes);
        crate::registry::saturating_add(&t.client_origin_bytes, report.origin_bytes + report.passthrough_bytes);
        for f in &report.node_failures {
            let reason = crate::metrics::known_reason(&f.reason);
            if reason == "hash_mismatch" {
                // Not trusted as such: a probe of the node decides.
                let _ = self.urgent_probes.try_send(f.node);
            }
            m.node_failure_reports.get_or_create(&ResultLabel { result: reason }).inc_by(f.count);
            self.dashboard.event(
                "client_report",
                format!("a client saw node {} fail {}× ({reason})", &f.node.to_hex()[..16], f.count),
            );
        }
        json(StatusCode::OK, &serde_json::json!({"ok": true}))
    }

    /// Fits the reporting client's network a coordinate from its RTTs to nodes (at least 3 known nodes;
    /// samples that disagree with the rest are dropped by the fit). Only that network's own schedules use it.
    fn place_client(&self, peer: SocketAddr, rtts: &[RttSample]) {
        let coord_of = |id: &NodeId| self.registry.coord_of(id);
        self.clients.lock().expect("clients lock").learn(peer.ip(), rtts, coord_of, now_ms());
    }

    fn stats(&self) -> TrackerStats {
        let c = self.registry.counts();
        TrackerStats {
            nodes_total: c.total,
            nodes_healthy: c.healthy,
            nodes_joining: c.joining,
            nodes_draining: c.draining,
            nodes_quarantined: c.quarantined,
            nodes_unreachable: c.unreachable,
            manifests: self.manifests.load(Ordering::Relaxed),
            cache_used: c.cache_used,
            cache_capacity: c.cache_capacity,
            bytes_served: c.bytes_served,
            origin_fill_bytes: c.origin_fill_bytes,
            resolves: self.resolves.load(Ordering::Relaxed),
            ingests: self.ingests.load(Ordering::Relaxed),
            ingest_errors: self.ingest_errors.load(Ordering::Relaxed),
            nodes_by_reachability: Reachability::ALL
                .iter()
                .zip(c.by_reachability)
                .map(|(r, n)| (r.as_str().to_string(), n))
                .collect(),
            nodes_by_client_path: ClientPath::ALL
                .iter()
                .zip(c.by_client_path)
                .map(|(p, n)| (p.name().to_string(), n))
                .collect(),
        }
    }

    fn summary(&self) -> Summary {
        let t = &self.registry.totals;
        Summary {
            now_ms: now_ms(),
            stats: self.stats(),
            fog_bytes_total: t.fog_bytes.load(Ordering::Relaxed),
            origin_fill_bytes_total: t.origin_fill_bytes.load(Ordering::Relaxed),
            node_requests_total: t.node_requests.load(Ordering::Relaxed),
            client_fog_bytes_total: t.client_fog_bytes.load(Ordering::Relaxed),
            client_origin_bytes_total: t.client_origin_bytes.load(Ordering::Relaxed),
            samples: self.dashboard.samples(),
            events: self.dashboard.recent_events(),
            top_content: self.dashboard.top_content(),
            admin_enabled: self.cfg.admin_token.is_some(),
        }
    }

    /// Takes dashboard samples until the process ends.
    pub async fn sample_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            self.dashboard.sample(&self.registry, self.resolves.load(Ordering::Relaxed));
            let snapshot = self.registry.snapshot();
            self.load.lock().expect("load lock").forget_nodes_not_in(&snapshot);
            if let Err(e) = self.ledger.seal_epochs() {
                tracing::error!(error = %e, "cannot seal the ledger's epoch head");
            }
        }
    }

    /// Live summaries as server-sent events, one per sample, for a bounded number of dashboards (and of them
    /// a few per source, so one host cannot take them all).
    fn stream(self: &Arc<Self>, peer: IpAddr) -> Reply {
        let Some(slot) = self.streams_by_source.try_hold(peer, STREAMS_PER_SOURCE) else {
            let msg = format!("{STREAMS_PER_SOURCE} live dashboards are open from your network; close one");
            return error(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited, msg, true);
        };
        let Ok(permit) = self.streams.clone().try_acquire_owned() else {
            return error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Internal, "too many live dashboards", true);
        };
        let (tx, resp) = http_server::event_stream(4);
        let app = self.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tick.tick().await;
                let data = serde_json::to_string(&app.summary()).expect("summary serialises");
                // A reader that fell behind skips a summary; one that left ends the stream.
                match tx.try_send(http_server::sse_event("summary", &data)) {
                    Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        });
        resp
    }

    fn nodes_page(&self, query: &str, admin: bool) -> Reply {
        let (mut page, mut per_page, mut sort) = (0usize, 50usize, SortBy::State);
        for (k, v) in query_pairs(query) {
            let bad =
                |what: &str| error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, format!("bad {what}: {v:?}"), false);
            match k.as_str() {
                "page" => {
                    page = match v.parse() {
                        Ok(p) => p,
                        Err(_) => return bad("page"),
                    }
                }
                "per_page" => {
                    per_page = match v.parse() {
                        Ok(p) => p,
                        Err(_) => return bad("per_page"),
                    }
                }
                "sort" => {
                    sort = match SortBy::parse(&v) {
                        Some(s) => s,
                        None => return bad("sort (id, state, bytes, rate, last_seen)"),
                    }
                }
                _ => {}
            }
        }
        let mut page = self.registry.page(page, per_page, sort, admin);
        for n in &mut page.nodes {
            n.credits = self.ledger.credited(&n.id).ok();
        }
        json(StatusCode::OK, &page)
    }

    fn is_admin(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.cfg.admin_token else { return false };
        let given = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant-time comparison, so the token cannot be guessed byte by byte from response times.
        given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }

    /// The refusal for a request that lacks the admin token; `None` lets it through.
    fn refuse_non_admin(&self, req: &Request<Incoming>) -> Option<Reply> {
        if self.cfg.admin_token.is_none() {
            return Some(error(
                StatusCode::FORBIDDEN,
                ErrorCode::Unauthorized,
                "admin actions are off: start the tracker with --admin-token",
                false,
            ));
        }
        if !self.is_admin(req) {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing or wrong admin token (Authorization: Bearer …)",
                false,
            ));
        }
        None
    }

    /// `POST /v1/admin/nodes/{id}/block` and `…/unblock`.
    fn admin_node_action(&self, path: &str) -> Reply {
        let rest = path.trim_start_matches("/v1/admin/nodes/");
        let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
        let id: NodeId = match id.parse() {
            Ok(id) => id,
            Err(e) => return error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, e.to_string(), false),
        };
        let block = match action {
            "block" => true,
            "unblock" => false,
            _ => return error(StatusCode::NOT_FOUND, ErrorCode::BadRequest, "action must be block or unblock", false),
        };
        if let Err(e) = self.db.set_blocked(&id, block) {
            return error(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, e.to_string(), true);
        }
        let changed = if block { self.registry.block(id) } else { self.registry.unblock(&id) };
        let verb = if block { "blocked" } else { "unblocked" };
        tracing::info!(node = %id, "operator {verb} node");
        self.dashboard.event("node_blocked", format!("operator {verb} node {}", &id.to_hex()[..16]));
        json(StatusCode::OK, &serde_json::json!({ "node": id, verb: true, "changed": changed }))
    }

    fn metrics_text(&self) -> String {
        let s = self.stats();
        let m = &self.metrics;
        let unhealthy = s.nodes_total
            - s.nodes_healthy
            - s.nodes_joining
            - s.nodes_draining
            - s.nodes_quarantined
            - s.nodes_unreachable;
        for (state, n) in [
            ("healthy", s.nodes_healthy),
            ("joining", s.nodes_joining),
            ("draining", s.nodes_draining),
            ("quarantined", s.nodes_quarantined),
            ("unreachable", s.nodes_unreachable),
            ("unhealthy", unhealthy),
        ] {
            m.nodes.get_or_create(&StateLabel { state }).set(n as i64);
        }
        for (path, n) in &s.nodes_by_client_path {
            m.nodes_by_client_path.get_or_create(&PathLabel { path: path.clone() }).set(*n as i64);
        }
        for (reachability, n) in &s.nodes_by_reachability {
            let label = ReachabilityLabel { reachability: reachability.clone() };
            m.nodes_by_reachability.get_or_create(&label).set(*n as i64);
        }
        m.manifests.set(s.manifests as i64);
        m.node_cache_used_bytes.set(s.cache_used as i64);
        let t = &self.registry.totals;
        let catch_up = |c: &prometheus_client::metrics::counter::Counter, total: &AtomicU64| {
            c.inc_by(total.load(Ordering::Relaxed).saturating_sub(c.get()));
        };
        catch_up(&m.fog_bytes, &t.fog_bytes);
        catch_up(&m.origin_fill_bytes, &t.origin_fill_bytes);
        catch_up(&m.node_requests, &t.node_requests);
        catch_up(&m.corrupt_chunks, &t.corrupt_chunks);
        m.encode()
    }
}

/// Serves HTTP on `listener` until `shutdown` resolves; samples the dashboard history meanwhile.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    let sampler = tokio::spawn(app.clone().sample_forever());
    let urgent = app.urgent_rx.lock().expect("probe channel lock").take();
    let prober = match (app.cfg.probe_every, urgent) {
        (Some(every), Some(urgent)) => Some(tokio::spawn(crate::probe::probe_forever(app.clone(), every, urgent))),
        _ => None,
    };
    http_server::serve(listener, MAX_CONNECTIONS, move |req, peer| app.clone().handle(req, peer), shutdown).await;
    sampler.abort();
    if let Some(p) = prober {
        p.abort();
    }
}
