//! Wiring: identity, store, QUIC endpoint, tracker link, graceful shutdown.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fog_net::tracker::TrackerClient;
use fog_net::transport;
use fog_proto::NodeId;
use tokio::sync::watch;

use crate::config::NodeConfig;
use crate::credits::Credits;
use crate::earnings::{Earnings, EarningsError};
use crate::limits::UploadPolicy;
use crate::overlay::{Overlay, OverlayError, QuicLink};
use crate::receipts::{ReceiptDb, ReceiptsError};
use crate::rendezvous::{self, RendezvousServer, SharedAttachment, SharedMembership};
use crate::serve::Server;
use crate::stats::Counters;
use crate::status::{Status, StatusInfo};
use crate::store::{Store, StoreError};
use crate::tracker_link::SharedLinkState;
use crate::tracker_link::{load_origins, MoreAddrs, TrackerLink};
use crate::web::Web;
use fog_net::identity::{self, IdentityError};

/// File in the data directory holding the status page's address, for `fog-node status`.
pub const STATUS_ADDR_FILE: &str = "status.addr";

/// How often, at most, the data directory and its disk are measured (and the cache resized to fit).
const DISK_WATCH_EVERY: Duration = Duration::from_secs(2);

/// Requests per client connection in flight at once.
const STREAMS_PER_CONNECTION: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Receipts(#[from] ReceiptsError),
    #[error(transparent)]
    Earnings(#[from] EarningsError),
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("cannot read the QUIC socket address: {0}")]
    LocalAddr(std::io::Error),
    #[error("cannot listen for the status page on {addr}: {source}; pick another --status-listen")]
    StatusListen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Overlay(#[from] OverlayError),
}

/// Runs the node until `shutdown` resolves, then drains in-flight requests (up to 10 s) and flushes the store.
pub async fn run(cfg: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<(), NodeError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| NodeError::DataDir { path: cfg.data_dir.display().to_string(), source })?;
    let key = identity::load_or_create(&cfg.data_dir.join("node.key"))?;
    let node_id = NodeId::from(key.verifying_key());
    let store_dir = cfg.data_dir.join("store");
    // Receipts first: they take over any an older layout kept inside the chunk store.
    let receipts = Arc::new(ReceiptDb::open(&cfg.data_dir.join("receipts"), &store_dir)?);
    let store = Arc::new(Store::open(&store_dir, cfg.cache_size, cfg.memory_cache)?);
    // Measure once before serving: a shrunk quota or a nearly full disk is applied first.
    let disk = store.watch_disk(&cfg.data_dir, |fs| cfg.min_free_disk.bytes(fs));
    let origins_file = cfg.data_dir.join("origins.json");
    let origins = Arc::new(RwLock::new(load_origins(&origins_file)));

    let web = Arc::new(Web::new(cfg.web_origins.clone(), cfg.web_cert_rotation)?);
    let server_config =
        transport::node_server_config(&key, STREAMS_PER_CONNECTION, Some(web.cert_slot()), cfg.upload_priority)?;
    // `[::]` is one dual-stack socket for IPv4 and IPv6 clients; a host without IPv6 gets `0.0.0.0`.
    let v4_only = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), cfg.listen.port());
    let endpoint = transport::endpoint(cfg.listen, Some(server_config.config.clone()))
        .or_else(|e| match cfg.listen.ip() {
            IpAddr::V6(ip) if ip.is_unspecified() => transport::endpoint(v4_only, Some(server_config.config.clone())),
            _ => Err(e),
        })
        .map_err(|source| transport::TransportError::Bind { addr: cfg.listen, source })?;
    let local = endpoint.local_addr().map_err(NodeError::LocalAddr)?;
    let (used, chunks) = store.usage();
    tracing::info!(
        %node_id, cache_used = used, cache_chunks = chunks, quota = cfg.cache_size, capacity = store.capacity(),
        data_dir_bytes = disk.data_dir_bytes, upload_priority = ?cfg.upload_priority, "fog-node listening on {local}"
    );

    let earnings = Arc::new(Earnings::open(&cfg.data_dir.join("earnings"))?);
    let credits = Arc::new(Credits::new(receipts, node_id, earnings.clone()));
    let watch_task = tokio::spawn(watch_disk_forever(store.clone(), cfg.data_dir.clone(), cfg.min_free_disk));
    let counters = Arc::new(Counters::default());
    let earnings_task = tokio::spawn(earnings.clone().count_served_forever(counters.clone()));
    let membership = SharedMembership::default();
    let (overlay, peer_streams) = if cfg.p2p_listen.is_empty() {
        (None, None)
    } else {
        // Peers are asked over their QUIC endpoints from this one, which they answer from theirs (under
        // their --upload-priority); libp2p carries fills only where that fails.
        let quic = QuicLink { endpoint: endpoint.clone(), key: key.clone(), membership: membership.clone() };
        let (overlay, incoming) = Overlay::start(&key, &cfg.p2p_listen, counters.clone(), Some(quic))?;
        tracing::info!(peer_id = %overlay.peer_id, "overlay started");
        (Some(overlay), Some(incoming))
    };
    let rendezvous = Arc::new(RendezvousServer::new(node_id));
    let clock = crate::schedule::LocalTime::system();
    let upload =
        Arc::new(UploadPolicy::new(cfg.upload_limit, cfg.schedule.clone(), cfg.monthly_upload, store.clone(), clock));
    let upload_task = tokio::spawn(upload.clone().follow_forever());
    let server = Arc::new(Server::new(
        store.clone(),
        credits.clone(),
        counters,
        origins.clone(),
        upload.clone(),
        cfg.max_connections,
        cfg.max_fills,
        overlay.clone(),
        rendezvous.clone(),
        node_id,
        web.clone(),
    ));
    let rotate_task = tokio::spawn(web.rotate_forever());
    let peers_task = peer_streams.map(|incoming| tokio::spawn(server.clone().serve_peers(incoming)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let link_state = SharedLinkState::default();
    let attachment = SharedAttachment::default();
    let (nat_plan, plan_rx) = watch::channel(None);
    let attach_task = tokio::spawn(rendezvous::attach_forever(
        endpoint.clone(),
        key.clone(),
        plan_rx,
        attachment.clone(),
        membership.clone(),
    ));
    let status = Arc::new(Status::new(
        StatusInfo {
            node_id,
            tracker_url: cfg.tracker.clone(),
            quic_listen: local,
            upload_limit: cfg.upload_limit,
            memory_cache: cfg.memory_cache,
            usage_file: cfg.data_dir.join("usage.json"),
        },
        server.clone(),
        link_state.clone(),
        overlay.clone(),
        attachment.clone(),
        rendezvous,
    ));
    let status_listener = tokio::net::TcpListener::bind(cfg.status_listen)
        .await
        .map_err(|source| NodeError::StatusListen { addr: cfg.status_listen, source })?;
    let status_addr = status_listener.local_addr().map_err(NodeError::LocalAddr)?;
    // `fog-node status` finds the page through this file.
    if let Err(e) = std::fs::write(cfg.data_dir.join(STATUS_ADDR_FILE), status_addr.to_string()) {
        tracing::warn!(error = %e, "cannot record the status address; `fog-node status` will need --url");
    }
    tracing::info!("status page at http://{status_addr}/");
    let mut stop_status = stop_rx.clone();
    let status_task = tokio::spawn(status.clone().serve(status_listener, async move {
        let _ = stop_status.changed().await;
    }));
    let track_task = tokio::spawn(status.clone().track_forever());
    let tracker = TrackerClient::new(&cfg.tracker, Duration::from_secs(10));
    let redeem_task = tokio::spawn(credits.redeem_forever(tracker.clone(), key.clone(), link_state.clone()));
    let link = TrackerLink {
        state: link_state,
        tracker,
        key,
        quic_addr: cfg.advertise.first().map_or(local, |&a| on_port(a, local.port())),
        more_addrs: match cfg.advertise.split_first() {
            Some((_, more)) => MoreAddrs::Named(more.iter().map(|&a| on_port(a, local.port())).collect()),
            None => MoreAddrs::discover(local),
        },
        server: server.clone(),
        origins,
        origins_file,
        upload_limit: cfg.upload_limit,
        region: cfg.region.clone(),
        overlay,
        nat_plan,
        attachment,
        membership,
        renew_membership_ms: Default::default(),
        told_joining: Default::default(),
        tracker_rtt: Default::default(),
    };
    let link_task = tokio::spawn(link.run(stop_rx));
    let serve_task = tokio::spawn(server.clone().run(endpoint.clone(), server_config));

    shutdown.await;
    tracing::info!("shutting down: refusing new connections, draining in-flight requests");
    let _ = stop_tx.send(true);
    endpoint.set_server_config(None);
    let drain = async {
        while server.counters.active_streams.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
        tracing::warn!("in-flight requests did not finish within 10 s; closing anyway");
    }
    endpoint.close(0u32.into(), b"node shutting down");
    serve_task.abort();
    rotate_task.abort();
    attach_task.abort();
    if let Some(t) = peers_task {
        t.abort();
    }
    track_task.abort();
    upload_task.abort();
    upload.save();
    earnings_task.abort();
    watch_task.abort();
    redeem_task.abort();
    status.save_usage();
    if let Err(e) = earnings.count_served_now(&server.counters) {
        tracing::warn!(error = %e, "cannot write down the last bytes served");
    }
    let _ = link_task.await;
    let _ = status_task.await;
    endpoint.wait_idle().await;
    store.flush()?;
    tracing::info!("fog-node stopped");
    Ok(())
}

/// `addr`, with `port` if it names none (port 0).
fn on_port(addr: SocketAddr, port: u16) -> SocketAddr {
    if addr.port() == 0 {
        SocketAddr::new(addr.ip(), port)
    } else {
        addr
    }
}

/// Measures the data directory every few seconds, so the cache gives way to the disk floor and to other
/// files, and the status page shows real bytes on disk. A walk over a large cache (a file per chunk) takes
/// a while on a small device: the pause after each is at least 50 times its length (≤ 2 % of a core).
async fn watch_disk_forever(store: Arc<Store>, data_dir: std::path::PathBuf, floor: crate::config::DiskFloor) {
    loop {
        let (store, dir) = (store.clone(), data_dir.clone());
        let started = std::time::Instant::now();
        if let Err(e) = tokio::task::spawn_blocking(move || store.watch_disk(&dir, |fs| floor.bytes(fs))).await {
            tracing::error!(error = %e, "disk measurement failed");
        }
        tokio::time::sleep(DISK_WATCH_EVERY.max(started.elapsed() * 50)).await;
    }
}
