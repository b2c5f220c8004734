//! The tracker's domain: what each request means, independent of HTTP. Resolving an object (ingest →
//! schedule → ticket), registering and heartbeating nodes (with dial-back), redeeming receipts, client
//! reports, dashboard views and operator actions. Every refusal is an [`AppError`], which `http` maps to a
//! status and an [`ApiError`](fog_proto::api::ApiError) in one place.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fog_net::origin::{OriginClient, OriginError};
use fog_net::per_source::{Held, PerSource};
use fog_net::transport;
use fog_proto::api::now_ms;
use fog_proto::api::{
    ClientReport, Families, FamilyCounts, Heartbeat, HeartbeatResponse, NodeContact, OverlayReport, Published,
    Reachability, Register, RegisterResponse, Resolve, RttSample, Signed, SignedError, TrackerStats, UploadPlan,
    MAX_PEERS_LISTED, WANT_PEERS,
};
use fog_proto::credits::{RedeemBatch, RedeemResponse};
use fog_proto::{ChunkHash, ContentId, Manifest, NodeId};
use fog_sched::coords::{ClientCoords, ClientNet};
use fog_sched::scheduler;
use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::bus::{wire, Bus};
use crate::config::TrackerConfig;
use crate::dashboard::{Dashboard, Event, Sample, TopContent};
use crate::ingest::{Ingest, IngestConfig, IngestError, Source};
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::{FamilyLabel, Metrics, PathLabel, ReachabilityLabel, ResultLabel, SourceLabel, StateLabel};
use crate::registry::{
    Advertised, CellUpdate, ClientPath, NodePage, PlanRule, Registration, Registry, RegistryError, SortBy,
};
use crate::store::{AdminStore, ManifestCache, StoreError, Stores};

/// Most dashboards following the live stream at once, in all and per source.
const MAX_STREAMS: usize = 64;
const STREAMS_PER_SOURCE: usize = 4;

/// Registrations a source may make: a burst, then this many a minute.
const REGISTRATIONS_PER_SOURCE: (u32, u32) = (64, 60);
/// New objects a source may have ingested: a burst, then this many a minute.
const INGESTS_PER_SOURCE: (u32, u32) = (64, 60);
/// Redeem batches per source: burst, then per minute (a node drains a full backlog of 64 batches at once).
const REDEEMS_PER_SOURCE: (u32, u32) = (128, 120);

/// Ingests running at once; more wait for a retry (the object streams through, so each costs little memory).
const MAX_CONCURRENT_INGESTS: usize = 32;

/// Client network prefixes whose coordinates are remembered.
const MAX_CLIENT_PREFIXES: usize = 100_000;

/// Dial-backs at once (each is one QUIC handshake attempt), and how long one may take.
const DIAL_BACKS: usize = 32;
const DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(3);

/// Why the tracker refused a request: where it came from and whether a retry may help. `http` turns each
/// into a status code and an `ApiError` body.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request itself is wrong (a malformed parameter, a message out of bounds).
    #[error("{0}")]
    BadRequest(String),
    #[error("{url} is not under a registered origin (registered: {registered})")]
    UnknownOrigin { url: String, registered: String },
    /// The requester's source used up its share of this kind of work.
    #[error("{0}")]
    RateLimited(&'static str),
    /// A node's message failed verification or was refused by the registry.
    #[error("{0}")]
    NodeRejected(#[source] NodeRejection),
    #[error("unknown node: register (or wait for the next heartbeat to re-register), then redeem")]
    UnknownNode,
    #[error("tracker registry is full ({0} nodes)")]
    RegistryFull(usize),
    #[error("{0}")]
    Ingest(#[from] IngestError),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("tracker database: {0}")]
    Db(#[from] StoreError),
    /// What was asked for does not exist (yet, if `retryable`).
    #[error("{what}")]
    NotFound { what: String, retryable: bool },
    #[error("admin actions are off: start the tracker with --admin-token")]
    AdminOff,
    #[error("missing or wrong admin token (Authorization: Bearer …)")]
    NotAdmin,
    #[error("{limit} live dashboards are open from your network; close one")]
    StreamsPerSource { limit: usize },
    #[error("too many live dashboards")]
    StreamsFull,
    /// A browser page of a site the operator did not register, or asking for more than resolve and reports.
    #[error("pages of {origin} may not {what}: the operator registers the sites that embed the fog with --web-origin")]
    UnknownWebOrigin { origin: String, what: &'static str },
    /// A replica that does not hold the whole cell yet (just started, or reconnecting to the bus).
    #[error("this tracker replica is catching up with its cell; retry (or another replica)")]
    NotReady,
}

/// Why a node's message was refused.
#[derive(Debug, thiserror::Error)]
pub enum NodeRejection {
    #[error(transparent)]
    Signature(#[from] SignedError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl AppError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::BadRequest(_) | Self::UnknownOrigin { .. } | Self::NodeRejected(_) | Self::AdminOff => false,
            Self::NotAdmin | Self::UnknownWebOrigin { .. } => false,
            Self::RateLimited(_) | Self::UnknownNode | Self::RegistryFull(_) => true,
            Self::StreamsPerSource { .. } | Self::StreamsFull | Self::Db(_) | Self::NotReady => true,
            Self::Ingest(e) => e.is_retryable(),
            Self::Ledger(e) => e.is_retryable(),
            Self::NotFound { retryable, .. } => *retryable,
        }
    }

    /// The `fog_tracker_resolves_total{result}` label of a failed resolve.
    fn resolve_result(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::UnknownOrigin { .. } => "unknown_origin",
            Self::RateLimited(_) => "rate_limited",
            Self::Ingest(IngestError::Origin(OriginError::Status { status: 404 | 410, .. })) => "origin_not_found",
            Self::Ingest(IngestError::Origin(OriginError::TooLarge { .. })) => "too_large",
            Self::Ingest(IngestError::Origin(_)) => "origin_error",
            Self::Ingest(IngestError::Busy) => "busy",
            Self::Ingest(IngestError::ChangedDuringIngest { .. }) => "origin_changed",
            _ => "internal",
        }
    }
}

/// How a client reaches nodes: over QUIC in its IP `families`, or, for a `browser` page, over WebTransport
/// (to directly reachable nodes whose endpoint the tracker's probe vouched for).
#[derive(Debug, Clone, Copy, Default)]
pub struct Reach {
    pub families: Families,
    pub browser: bool,
}

/// A live dashboard stream's place, held for as long as the stream is open.
#[derive(Debug)]
pub struct StreamSlot {
    _held: (OwnedSemaphorePermit, fog_net::per_source::HeldSlot),
}

#[derive(Debug)]
pub struct App {
    pub cfg: TrackerConfig,
    pub ingest: Ingest,
    pub registry: Registry,
    pub metrics: Metrics,
    pub dashboard: Arc<Dashboard>,
    pub ledger: Ledger,
    /// The operator's block list, persisted.
    pub admin: Arc<dyn AdminStore>,
    /// Live playlists followed, their viewers and pushes.
    pub live: Arc<crate::live::Live>,
    resolves: AtomicU64,
    ingests: AtomicU64,
    streams: Arc<Semaphore>,
    streams_by_source: Held,
    /// Nodes clients reported serving wrong bytes, for the prober to check now.
    urgent_probes: mpsc::Sender<NodeId>,
    pub(crate) urgent_rx: std::sync::Mutex<Option<mpsc::Receiver<NodeId>>>,
    /// The cell's bus, once connected (`--nats`): this tracker is then one replica of the cell.
    pub bus: std::sync::OnceLock<Arc<Bus>>,
    /// QUIC endpoint for probes; `None` if it could not be opened.
    pub dialer: Option<quinn::Endpoint>,
    /// QUIC endpoints for dial-backs (one per IP family, each address verified in its own family), never
    /// used for probes: probes of nodes behind NAT are hole-punched, which opens their NAT to the prober's
    /// address, and a dial-back from there would pass. Long-lived: a fresh endpoint per dial-back cost
    /// ~1 MiB of resident memory each under a registration flood (quinn's receive buffer, kept by the
    /// allocator).
    dial_back_endpoints: transport::FamilyEndpoints,
    /// The scheduler's recent load and chunk popularity.
    pub(crate) load: std::sync::Mutex<scheduler::Load>,
    /// Client networks' coordinates, from their reports.
    pub(crate) clients: std::sync::Mutex<ClientCoords>,
    dial_backs: Semaphore,
    /// Fair shares per source (IPv4 address / IPv6 /64) of registrations and of new ingests.
    registrations_by_source: PerSource,
    ingests_by_source: PerSource,
    redeems_by_source: PerSource,
    /// Passes receipts on to the replicas sequencing their shards.
    forwarder: reqwest::Client,
}

/// What the dashboard's header, charts and side panels show; pushed every sample over the live stream.
#[derive(Debug, Serialize)]
pub struct Summary {
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

impl App {
    /// A tracker over `stores` (their manifest count and block list read at open).
    pub fn new(cfg: TrackerConfig, stores: Stores, origin: OriginClient, ledger: Ledger) -> Self {
        let dashboard = Arc::new(Dashboard::default());
        let metrics = Metrics::default();
        let ingest_cfg = IngestConfig {
            chunk_size: cfg.chunk_size,
            group_size: cfg.group_size,
            max_object_size: cfg.max_object_size,
            min_reingest_age: cfg.min_reingest_age,
            resolve_wait: cfg.resolve_wait,
            origin_manifests: cfg.origin_manifests,
            max_running: MAX_CONCURRENT_INGESTS,
        };
        let manifests =
            ManifestCache::new(stores.manifests, Default::default(), stores.manifest_count, metrics.store.clone());
        let ingest =
            Ingest::new(origin, Arc::new(manifests), ingest_cfg, dashboard.clone(), metrics.ingest_errors.clone());
        let (urgent_probes, urgent_rx) = mpsc::channel(64);
        Self {
            registry: Registry::new(cfg.node_timeout, cfg.max_nodes, stores.blocked)
                .with_params(scheduler::Params { k: cfg.candidates, epsilon: cfg.load_epsilon, ..Default::default() })
                .with_cells(cfg.cell_ms)
                .with_plan_rule(PlanRule { heartbeat: cfg.heartbeat_interval, chunk_size: u64::from(cfg.chunk_size) }),
            // A replica records what it charges, for the others (`bus`).
            load: std::sync::Mutex::new(if cfg.nats.is_empty() {
                scheduler::Load::default()
            } else {
                scheduler::Load::recording()
            }),
            clients: std::sync::Mutex::new(ClientCoords::new(MAX_CLIENT_PREFIXES)),
            metrics,
            dashboard,
            ledger,
            cfg,
            ingest,
            admin: stores.admin,
            live: Arc::default(),
            resolves: AtomicU64::new(0),
            ingests: AtomicU64::new(0),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
            streams_by_source: Held::default(),
            urgent_probes,
            urgent_rx: std::sync::Mutex::new(Some(urgent_rx)),
            bus: std::sync::OnceLock::new(),
            dialer: transport::client_endpoint(transport::any_family())
                .inspect_err(|e| tracing::error!(error = %e, "cannot open a QUIC endpoint: nodes will not be probed"))
                .ok(),
            dial_back_endpoints: {
                let endpoints = transport::FamilyEndpoints::open();
                if endpoints.is_empty() {
                    tracing::error!("cannot open a QUIC endpoint: no node will be reachable");
                }
                endpoints
            },
            dial_backs: Semaphore::new(DIAL_BACKS),
            registrations_by_source: PerSource::new(REGISTRATIONS_PER_SOURCE.1, REGISTRATIONS_PER_SOURCE.0),
            ingests_by_source: PerSource::new(INGESTS_PER_SOURCE.1, INGESTS_PER_SOURCE.0),
            redeems_by_source: PerSource::new(REDEEMS_PER_SOURCE.1, REDEEMS_PER_SOURCE.0),
            forwarder: reqwest::Client::builder()
                .connect_timeout(crate::ledger::FORWARD_TIMEOUT)
                .build()
                .expect("an HTTP client without TLS settings builds"),
        }
    }

    fn count_resolve(&self, result: &'static str) {
        self.metrics.resolves.get_or_create(&ResultLabel { result }).inc();
    }

    /// `url`'s manifest (ingested now if need be, again if the client saw it `stale`) and a schedule of
    /// nodes for the client at `peer`, with a credit ticket for its session key `client_key`. While the
    /// object is being ingested the manifest lists the chunks hashed so far, those at `from` (the byte the
    /// client reads first) first. Only nodes the client can dial in `families` (those it named, and the one
    /// it asked from) are offered; to a browser page, only nodes it can open a WebTransport session to.
    pub async fn resolve(
        &self,
        url: &str,
        stale: Option<ContentId>,
        client_key: Option<NodeId>,
        from: u64,
        peer: IpAddr,
        reach: Reach,
    ) -> Result<Resolve, AppError> {
        self.resolves.fetch_add(1, Ordering::Relaxed);
        let reach = Reach { families: reach.families.union(Families::of(peer)), ..reach };
        match self.resolve_counted(url, stale, client_key, from, peer, reach).await {
            Ok(resolve) => Ok(resolve),
            Err(e) => {
                // Failed ingests themselves are counted and shown by the ingest task, once each.
                if let AppError::Ingest(ingest) = &e {
                    tracing::info!(url, error = %ingest, "resolve failed");
                }
                self.count_resolve(e.resolve_result());
                Err(e)
            }
        }
    }

    /// Publishes a manifest built where the content is packaged (operator only: `http` checks the token).
    pub async fn publish(&self, mut manifest: Manifest) -> Result<Published, AppError> {
        let url = fog_proto::origins::canonical_url(&manifest.url).map_err(AppError::BadRequest)?;
        if !self.cfg.origins.allows(&url) {
            return Err(AppError::UnknownOrigin { url, registered: self.cfg.origins.prefixes().join(", ") });
        }
        manifest.url = url.clone();
        let content_id = self.ingest.publish(manifest).await?;
        self.dashboard.event("manifest_published", format!("{url} ({content_id})"));
        Ok(Published { url, content_id })
    }

    /// Counts a resolve that `http` refused before it could ask (a malformed query).
    pub fn resolve_refused<T>(&self, e: AppError) -> Result<T, AppError> {
        self.resolves.fetch_add(1, Ordering::Relaxed);
        self.count_resolve(e.resolve_result());
        Err(e)
    }

    async fn resolve_counted(
        &self,
        url: &str,
        stale: Option<ContentId>,
        client_key: Option<NodeId>,
        from: u64,
        peer: IpAddr,
        reach: Reach,
    ) -> Result<Resolve, AppError> {
        // One form for the allow-list, the fetch and the manifest key: spellings of one URL share a manifest.
        let url = fog_proto::origins::canonical_url(url).map_err(AppError::BadRequest)?;
        if !self.cfg.origins.allows(&url) {
            tracing::info!(url, "refused: not under a registered origin");
            return Err(AppError::UnknownOrigin { url, registered: self.cfg.origins.prefixes().join(", ") });
        }
        // Reading an object from its origin is the costliest thing a stranger can ask for: each source gets
        // its share of new ingests (query-string variants of one URL are distinct objects to an origin).
        if (stale.is_some() || !self.ingest.is_known(&url).await) && !self.ingests_by_source.check(peer) {
            return Err(AppError::RateLimited(
                "too many new objects ingested for your network; try again in a minute (the origin serves it meanwhile)",
            ));
        }
        let answer = self.ingest.manifest(&url, stale, from).await?;
        if answer.started {
            self.ingests.fetch_add(1, Ordering::Relaxed);
        }
        let manifest = answer.manifest;
        self.count_resolve(match answer.source {
            Source::Stored => "stored",
            Source::Ingested => "ingested",
            Source::Ingesting => "ingesting",
        });
        self.dashboard.count_resolve(&url);
        let client = self.clients.lock().expect("clients lock").get(peer);
        let mut load = self.load.lock().expect("load lock");
        let (nodes, schedule, ticket) =
            self.assign(&manifest, client.as_ref(), reach, &mut load, client_key, Some(peer));
        if let Some(bus) = self.bus.get() {
            bus.flush_load_if_full(&mut load);
        }
        drop(load);
        Ok(Resolve { content_id: manifest.content_id(), manifest: (*manifest).clone(), nodes, schedule, ticket })
    }

    /// Candidate nodes for each chunk of `manifest`, as a client network `client` gets them (charged to
    /// `load`), with a credit ticket for the session key `client_key` (tickets are shared per `source`, if
    /// given). Only nodes a client of that `reach` can dial are offered. The tracker's probes ask nodes
    /// through the same call, so they look like any client's.
    pub(crate) fn assign(
        &self,
        manifest: &Manifest,
        client: Option<&ClientNet>,
        reach: Reach,
        load: &mut scheduler::Load,
        client_key: Option<NodeId>,
        source: Option<IpAddr>,
    ) -> (Vec<NodeContact>, Vec<Vec<u32>>, Option<Signed>) {
        let snapshot = if reach.browser { self.registry.web_snapshot() } else { self.registry.snapshot() };
        let families = reach.families;
        // Only hashed chunks can be fetched from nodes (and verified); the others get no candidates.
        let hashed: Vec<usize> = (0..manifest.chunks.len()).filter(|&i| manifest.hash(i).is_some()).collect();
        let chunks: Vec<(ChunkHash, u32)> =
            hashed.iter().map(|&i| (manifest.chunks[i], manifest.chunk_span(i).1)).collect();
        let (nodes, mut schedule) =
            scheduler::schedule(&snapshot, load, client, families, &chunks, self.registry.params(), now_ms());
        if hashed.len() < manifest.chunks.len() {
            let mut full = vec![Vec::new(); manifest.chunks.len()];
            for (i, candidates) in hashed.into_iter().zip(schedule) {
                full[i] = candidates;
            }
            schedule = full;
        }
        let ticket = match client_key {
            Some(key) if !nodes.is_empty() => {
                // A node may be paid for the chunks it is a candidate for, and no more.
                let mut assigned = vec![0u32; nodes.len()];
                for &i in schedule.iter().flatten() {
                    assigned[i as usize] += 1;
                }
                let ids = nodes.iter().map(|n| n.id).collect();
                let hashed_bytes = manifest.progress.as_ref().map_or(manifest.size, |p| {
                    p.hashed.iter().flat_map(|&(s, e)| s..e).map(|i| u64::from(manifest.chunk_span(i as usize).1)).sum()
                });
                let (unit, budget) = (manifest.chunk_size, hashed_bytes);
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

    /// A node's signed message of `kind`: the signer and the verified payload.
    pub fn open_signed<T: serde::de::DeserializeOwned>(
        &self,
        signed: &Signed,
        kind: &'static str,
    ) -> Result<(NodeId, T), AppError> {
        match signed.open(kind) {
            Ok(message) => Ok((signed.node_id, message)),
            Err(e) => Err(self.reject_node(&signed.node_id, e.into())),
        }
    }

    fn reject_node(&self, node: &NodeId, e: NodeRejection) -> AppError {
        self.metrics.bad_node_messages.inc();
        tracing::warn!(%node, error = %e, "rejected node message");
        self.dashboard.event("node_rejected", format!("node {}: {e}", &node.to_hex()[..16]));
        AppError::NodeRejected(e)
    }

    /// A node's registration, seen from `peer`: dials it back to learn whether clients can reach it.
    pub async fn register(&self, signed: &Signed, peer: SocketAddr) -> Result<RegisterResponse, AppError> {
        // Each registration costs a QUIC dial-back: a source may register only so often.
        if !self.registrations_by_source.check(peer.ip()) {
            return Err(AppError::RateLimited("too many registrations from your network; try again in a minute"));
        }
        let (node, reg): (NodeId, Register) = self.open_signed(signed, fog_proto::api::KIND_REGISTER)?;
        reg.check_bounds().map_err(AppError::BadRequest)?;
        // An unspecified address means "where you see me from" (a node listening on 0.0.0.0 or [::]); an
        // IPv4 node seen through a dual-stack listener is given as IPv4, which every client can dial.
        let addr = if reg.quic_addr.ip().is_unspecified() {
            SocketAddr::new(peer.ip().to_canonical(), reg.quic_addr.port())
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
            region: reg.region,
        };
        match self.registry.register(node, registration, reg.timestamp_ms, now_ms()) {
            Ok(()) => {
                tracing::info!(node = %node, %addr, reachable, "node registered");
                self.metrics.registrations.inc();
                self.publish_node(&node);
                self.dashboard.event("node_registered", format!("node {} registered", &node.to_hex()[..16]));
                // Its other addresses, dialled back since an earlier registration, count too.
                let (reachable, verified_addrs) = self.registry.verified(&node).unwrap_or((reachable, Vec::new()));
                Ok(RegisterResponse {
                    heartbeat_interval_secs: self.cfg.heartbeat_interval.as_secs(),
                    advertised_addr: addr,
                    origins: self.cfg.origins.clone(),
                    tracker_key: Some(self.ledger.public_key()),
                    reachable,
                    verified_addrs,
                    peers: self.registry.peers_for(&node, MAX_PEERS_LISTED),
                    membership: Some(self.ledger.membership(node, now_ms())),
                    cell: self.registry.cell_list_for(&node, None).map(|c| (*c).clone()),
                    web_origins: self.cfg.web_origins.clone(),
                })
            }
            Err(RegistryError::Full(n)) => Err(AppError::RegistryFull(n)),
            Err(e) => Err(self.reject_node(&node, e.into())),
        }
    }

    /// A node's heartbeat, from `peer`: its stats and overlay view; dials back the addresses it advertises
    /// when they changed; answers with peers when it needs more.
    pub async fn heartbeat(&self, signed: &Signed, peer: IpAddr) -> Result<HeartbeatResponse, AppError> {
        let (node, hb): (NodeId, Heartbeat) = self.open_signed(signed, fog_proto::api::KIND_HEARTBEAT)?;
        let overlay_bounds = hb.overlay.as_ref().map_or(Ok(()), OverlayReport::check_bounds);
        let plan_bounds = hb.upload_plan.as_ref().map_or(Ok(()), UploadPlan::check_bounds);
        hb.stats.check_bounds().and(overlay_bounds).and(plan_bounds).map_err(AppError::BadRequest)?;
        let bad_peers = hb.overlay.as_ref().map(|o| o.bad_peers.clone()).unwrap_or_default();
        let cell_held = hb.overlay.as_ref().and_then(|o| o.cell_version);
        let cell_deltas = hb.overlay.as_ref().is_some_and(|o| o.cell_deltas);
        // Few overlay peers, or behind NAT without a rendezvous: suggest peers (and rendezvous candidates).
        let wants_peers = hb.overlay.as_ref().is_some_and(|o| {
            o.connected_peers < WANT_PEERS || (o.rendezvous.is_none() && !self.registry.is_reachable(&node))
        });
        let registered = self
            .registry
            .heartbeat(&node, hb.stats, hb.draining, hb.overlay, hb.timestamp_ms, now_ms())
            .map_err(|e| self.reject_node(&node, e.into()))?;
        if registered {
            self.registry.set_web(&node, hb.web_transport);
            self.registry.set_plan(&node, hb.upload_plan);
        }
        for peer in bad_peers {
            // Like a client's report: not believed as such, the node gets probed.
            self.dashboard.event(
                "peer_report",
                format!("node {} says node {} sent wrong bytes", &node.to_hex()[..16], &peer.to_hex()[..16]),
            );
            let _ = self.urgent_probes.try_send(peer);
        }
        if registered {
            self.verify_more_addrs(node, peer).await;
            self.publish_node(&node);
        } else if self.bus.get().is_some_and(|bus| !bus.ready()) {
            // Perhaps registered at another replica: a replica catching up does not send it to register.
            return Err(AppError::NotReady);
        }
        let peers =
            if registered && wants_peers { self.registry.peers_for(&node, MAX_PEERS_LISTED) } else { Vec::new() };
        let (reachable, verified_addrs) = self.registry.verified(&node).unzip();
        let cell_update = if registered { self.registry.cell_update_for(&node, cell_held, cell_deltas) } else { None };
        let (cell, cell_delta) = match cell_update {
            Some(CellUpdate::Whole(list)) => (Some((*list).clone()), None),
            Some(CellUpdate::Change(change)) => (None, Some((*change).clone())),
            None => (None, None),
        };
        Ok(HeartbeatResponse {
            registered,
            origins: self.cfg.origins.clone(),
            peers,
            reachable,
            verified_addrs,
            cell,
            cell_delta,
            web_origins: self.cfg.web_origins.clone(),
        })
    }

    /// Tells the cell's other replicas `node`'s state, as this replica accepted it.
    fn publish_node(&self, node: &NodeId) {
        if let (Some(bus), Some(record)) = (self.bus.get(), self.registry.record(node)) {
            bus.publish(wire::Message::Node(Box::new(record)));
        }
    }

    /// Dials back the other addresses `node` advertises, when they changed since the last time, from
    /// `peer`'s share of dial-backs (past it, the next heartbeat tries again).
    async fn verify_more_addrs(&self, node: NodeId, peer: IpAddr) {
        let Some(addrs) = self.registry.more_addrs_to_verify(&node) else { return };
        if !self.registrations_by_source.check(peer) {
            return;
        }
        let Ok(_slots) = self.dial_backs.acquire_many(addrs.len().max(1) as u32).await else { return };
        let mut dials = JoinSet::new();
        for addr in addrs {
            let endpoint = self.dial_back_endpoints.for_addr(&addr).cloned();
            dials.spawn(async move { Advertised { addr, verified: reaches(endpoint, node, addr).await } });
        }
        let mut advertised = Vec::new();
        while let Some(joined) = dials.join_next().await {
            advertised.extend(joined.ok());
        }
        advertised.sort_unstable_by_key(|a| a.addr);
        tracing::info!(%node, addrs = ?advertised, "node's other addresses dialled back");
        self.registry.set_more_addrs(&node, advertised);
    }

    /// Whether a QUIC handshake with `node` at `addr` succeeds (the node proves its key): only then are
    /// clients sent to that address directly. Each dial-back uses a fresh UDP port, so the failed attempt
    /// leaves no NAT state that could later collide with the node's hole-punched flows to our prober.
    async fn dial_back(&self, node: NodeId, addr: SocketAddr) -> bool {
        let Ok(_slot) = self.dial_backs.acquire().await else { return false };
        reaches(self.dial_back_endpoints.for_addr(&addr).cloned(), node, addr).await
    }

    /// A node's signed batch of receipts, from `peer`. The receipts of shards another replica sequences
    /// are passed on to it (`ledger::forward`); the answer leaves out receipts redeemed nowhere now.
    pub async fn redeem(&self, signed: &Signed, peer: IpAddr) -> Result<RedeemResponse, AppError> {
        let (node, batch): (NodeId, RedeemBatch) = self.open_signed(signed, fog_proto::credits::KIND_REDEEM)?;
        // Rejections are kept per node: only registered nodes may write them (and credits go to nodes
        // the tracker schedules). A node the tracker forgot registers again, then redeems.
        if !self.registry.is_registered(&node) {
            return Err(AppError::UnknownNode);
        }
        if !self.redeems_by_source.check(peer) {
            return Err(AppError::RateLimited(
                "too many redeems from your network; hold the receipts and try again in a minute",
            ));
        }
        let done = self.redeem_here(node, &batch, None)?;
        let mut results = done.results;
        // Shards another replica sequences: the node's batch goes there, once, naming them.
        let mut elsewhere: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        let mut failed = Vec::new();
        for (shard, e) in done.failed {
            match e {
                LedgerError::NotSequencer { holder_url } if !holder_url.is_empty() => {
                    elsewhere.entry(holder_url).or_default().push(shard)
                }
                e => failed.push(e),
            }
        }
        let forwards = elsewhere.into_iter().map(|(url, shards)| {
            let wrapped = self.ledger.sign_forward(shards, signed);
            async move { (crate::ledger::forward(&self.forwarder, &url, &wrapped).await, url) }
        });
        for (answer, url) in futures::future::join_all(forwards).await {
            let result = if answer.is_ok() { "ok" } else { "failed" };
            self.metrics.ledger_forwarded.get_or_create(&ResultLabel { result }).inc();
            match answer {
                Ok(answer) => {
                    // Matched to the batch by chain and index: a holder answers in the batch's order, for
                    // its shards' receipts only.
                    for r in answer.results {
                        let slot = batch.receipts.iter().zip(results.iter_mut()).find(|(sent, slot)| {
                            slot.is_none() && sent.index == r.index && sent.chain_id() == r.chain_id
                        });
                        if let Some((_, slot)) = slot {
                            *slot = Some(r);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pass receipts on to the replica sequencing their shard");
                    failed.push(LedgerError::NotSequencer { holder_url: url });
                }
            }
        }
        if results.iter().all(Option::is_none) {
            if let Some(e) = failed.into_iter().next() {
                return Err(e.into());
            }
        }
        Ok(RedeemResponse { results: results.into_iter().flatten().collect() })
    }

    /// A forward from another replica of the cell (`POST /v1/ledger/forward`): the node's batch, redeemed
    /// in the shards it names only, and passed on nowhere.
    pub fn redeem_forwarded(&self, signed: &Signed) -> Result<RedeemResponse, AppError> {
        let Some(forward) = self.ledger.open_forward(signed) else {
            return Err(AppError::BadRequest("not a forward signed by a replica of this cell".into()));
        };
        let (node, batch): (NodeId, RedeemBatch) = self.open_signed(&forward.batch, fog_proto::credits::KIND_REDEEM)?;
        let mut done = self.redeem_here(node, &batch, Some(&forward.shards))?;
        if done.results.iter().all(Option::is_none) && !done.failed.is_empty() {
            return Err(done.failed.swap_remove(0).1.into());
        }
        Ok(RedeemResponse { results: done.answered() })
    }

    /// Redeems the batch's receipts of `only` these shards (all: `None`) that this replica sequences, and
    /// counts what it credited and rejected.
    fn redeem_here(
        &self,
        node: NodeId,
        batch: &RedeemBatch,
        only: Option<&[u32]>,
    ) -> Result<crate::ledger::Redemption, AppError> {
        // Bounds first (receipts, and the tickets they were made under), before any verification.
        fog_proto::credits::check_batch(&batch.receipts, &batch.tickets)
            .map_err(|e| AppError::BadRequest(format!("redemption batch refused: {e}")))?;
        // Signature checks, chain walks and a synced write: off the async workers.
        let done =
            tokio::task::block_in_place(|| self.ledger.redeem_shards(node, &batch.receipts, &batch.tickets, only))
                .inspect_err(|e| tracing::error!(error = %e, "ledger failure"))?;
        for (shard, e) in &done.failed {
            match e {
                // Routine in a cell: the shard's sequencer is another replica.
                LedgerError::NotSequencer { .. } => {
                    tracing::debug!(shard, error = %e, "receipts left to the sequencer")
                }
                e => tracing::error!(shard, error = %e, "ledger failure"),
            }
        }
        let answered = done.results.iter().flatten();
        let credited: u64 = answered.clone().map(|r| r.credited_bytes).sum();
        let rejected = answered.filter(|r| r.outcome == fog_proto::credits::Outcome::Rejected).count();
        self.metrics.credited_bytes.inc_by(credited);
        self.metrics.rejected_receipts.inc_by(rejected as u64);
        if rejected > 0 {
            let short = &node.to_hex()[..16];
            self.dashboard.event("receipts_rejected", format!("node {short}: {rejected} receipt(s) rejected"));
        }
        Ok(done)
    }

    /// A client's report, from `peer`: counted for dashboards and metrics, and its RTTs place its network
    /// (reports are not authenticated; a report of wrong bytes only gets the node probed).
    pub fn client_report(&self, report: &ClientReport, peer: IpAddr) -> Result<(), AppError> {
        report.check_bounds().map_err(AppError::BadRequest)?;
        self.place_client(peer, &report.node_rtt);
        if !report.live_playlists.is_empty() {
            self.watch_live(&report.live_playlists, peer);
        }
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
        Ok(())
    }

    /// Fits the reporting client's network a coordinate from its RTTs to nodes (at least 3 known nodes;
    /// samples that disagree with the rest are dropped by the fit). Only that network's own schedules use it.
    fn place_client(&self, peer: IpAddr, rtts: &[RttSample]) {
        let coord_of = |id: &NodeId| self.registry.coord_of(id);
        self.clients.lock().expect("clients lock").learn(peer, rtts, coord_of, now_ms());
    }

    pub fn stats(&self) -> TrackerStats {
        let c = self.registry.counts();
        TrackerStats {
            nodes_total: c.total,
            nodes_healthy: c.healthy,
            nodes_joining: c.joining,
            nodes_draining: c.draining,
            nodes_quarantined: c.quarantined,
            nodes_unreachable: c.unreachable,
            manifests: self.ingest.manifests(),
            cache_used: c.cache_used,
            cache_capacity: c.cache_capacity,
            bytes_served: c.bytes_served,
            origin_fill_bytes: c.origin_fill_bytes,
            resolves: self.resolves.load(Ordering::Relaxed),
            ingests: self.ingests.load(Ordering::Relaxed),
            ingest_errors: self.metrics.ingest_errors.get(),
            ingests_running: self.ingest.running() as u64,
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
            nodes_by_family: ["ipv4", "ipv6"]
                .into_iter()
                .zip(c.by_family)
                .map(|(f, (verified, unverified))| (f.to_string(), FamilyCounts { verified, unverified }))
                .collect(),
            cells: self.registry.cell_count() as u64,
        }
    }

    pub fn summary(&self) -> Summary {
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

    /// One page of the node table, with each node's credits (addresses only for operators).
    pub fn nodes_page(&self, page: usize, per_page: usize, sort: SortBy, admin: bool) -> NodePage {
        let mut page = self.registry.page(page, per_page, sort, admin);
        for n in &mut page.nodes {
            n.credits = self.ledger.credited(&n.id).ok();
        }
        page
    }

    /// A place for one live dashboard stream from `peer`, within the per-source and total bounds.
    pub fn hold_stream(&self, peer: IpAddr) -> Result<StreamSlot, AppError> {
        let slot = self
            .streams_by_source
            .try_hold(peer, STREAMS_PER_SOURCE)
            .ok_or(AppError::StreamsPerSource { limit: STREAMS_PER_SOURCE })?;
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| AppError::StreamsFull)?;
        Ok(StreamSlot { _held: (permit, slot) })
    }

    /// Checks an operator's bearer token (`None`: none was given).
    pub fn check_admin(&self, given: Option<&str>) -> Result<(), AppError> {
        let Some(token) = &self.cfg.admin_token else { return Err(AppError::AdminOff) };
        let given = given.unwrap_or("");
        // Constant-time comparison, so the token cannot be guessed byte by byte from response times.
        let equal =
            given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if equal {
            Ok(())
        } else {
            Err(AppError::NotAdmin)
        }
    }

    /// An operator blocks (or unblocks) a node: persisted, and applied to the registry at once.
    pub fn set_blocked(&self, id: NodeId, block: bool) -> Result<serde_json::Value, AppError> {
        let changed = self.apply_block(id, block)?;
        if let Some(bus) = self.bus.get() {
            bus.publish(wire::Message::Block(wire::Block { id, block }));
        }
        let verb = if block { "blocked" } else { "unblocked" };
        tracing::info!(node = %id, "operator {verb} node");
        self.dashboard.event("node_blocked", format!("operator {verb} node {}", &id.to_hex()[..16]));
        Ok(serde_json::json!({ "node": id, verb: true, "changed": changed }))
    }

    /// A block (or unblock), persisted and applied to the registry (an operator's here, or another
    /// replica's); whether it changed anything.
    pub fn apply_block(&self, id: NodeId, block: bool) -> Result<bool, AppError> {
        // A durable write (synced, or committed in PostgreSQL): off the async workers.
        let handle = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| handle.block_on(self.admin.set_blocked(&id, block)))?;
        Ok(if block { self.registry.block(id) } else { self.registry.unblock(&id) })
    }

    /// One dashboard sample; forgets the load of nodes that left.
    pub fn sample(&self) {
        self.dashboard.sample(&self.registry, self.resolves.load(Ordering::Relaxed));
        let snapshot = self.registry.snapshot();
        self.load.lock().expect("load lock").forget_nodes_not_in(&snapshot);
    }

    pub fn metrics_text(&self) -> String {
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
        for (family, counts) in &s.nodes_by_family {
            for (state, n) in [("verified", counts.verified), ("unverified", counts.unverified)] {
                let label = FamilyLabel { family: family.clone(), state };
                m.nodes_by_family.get_or_create(&label).set(n as i64);
            }
        }
        for (reachability, n) in &s.nodes_by_reachability {
            let label = ReachabilityLabel { reachability: reachability.clone() };
            m.nodes_by_reachability.get_or_create(&label).set(*n as i64);
        }
        m.manifests.set(s.manifests as i64);
        m.cells.set(s.cells as i64);
        m.ingests_running.set(s.ingests_running as i64);
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

/// Whether a QUIC handshake with `node` at `addr` from `endpoint` (of `addr`'s family; `None` if the host
/// has none) succeeds: the node proves its key there.
async fn reaches(endpoint: Option<quinn::Endpoint>, node: NodeId, addr: SocketAddr) -> bool {
    let Some(endpoint) = endpoint else { return false };
    match transport::connect(&endpoint, node, addr, DIAL_BACK_TIMEOUT, DIAL_BACK_TIMEOUT).await {
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
