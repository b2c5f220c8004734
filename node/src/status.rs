//! The node's own status for its owner: a local page, `GET /status` (JSON) and `GET /metrics`, served on
//! `--status-listen` (127.0.0.1 by default), and the same answers for `fog-node status` in a terminal.
//!
//! Bytes served today and this month (UTC) persist in `usage.json`, so they survive restarts.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fog_net::http_server::{self, json, reply, Reply};
use fog_proto::api::{NodeStats, WebTransportEndpoint};
use fog_proto::NodeId;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};

use crate::overlay::{Overlay, OverlaySummary};
use crate::rendezvous::{RendezvousServer, SharedAttachment};
use crate::serve::Server;
use crate::tracker_link::SharedLinkState;

const STATUS_HTML: &str = include_str!("../assets/status.html");
/// Activity window for "am I getting traffic?", and the window of the current upload rate.
const ACTIVITY_WINDOW: Duration = Duration::from_secs(300);
const RATE_WINDOW: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_secs(1);
/// A chunk of the tracker's default size: a budget with less left than this serves no more chunks.
const TYPICAL_CHUNK: u64 = 1 << 20;
/// Above this share of the cap, the cap is what limits the node's traffic.
const CAP_SATURATED: f64 = 0.9;

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Today's UTC date as ("YYYY-MM-DD", "YYYY-MM").
fn today() -> (String, String) {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    (format!("{y:04}-{m:02}-{d:02}"), format!("{y:04}-{m:02}"))
}

/// Bytes served per UTC day and month, as kept in `usage.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub day: String,
    pub day_bytes: u64,
    pub month: String,
    pub month_bytes: u64,
}

impl Usage {
    /// Adds `bytes` served on (`day`, `month`), starting new periods when the date moved on.
    fn add(&mut self, bytes: u64, day: &str, month: &str) {
        if self.day != day {
            self.day = day.to_string();
            self.day_bytes = 0;
        }
        if self.month != month {
            self.month = month.to_string();
            self.month_bytes = 0;
        }
        self.day_bytes += bytes;
        self.month_bytes += bytes;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: NodeId,
    pub version: String,
    pub uptime_secs: u64,
    pub quic_listen: SocketAddr,
    pub tracker: TrackerStatus,
    /// How clients reach this node, in words.
    pub reachability: String,
    /// Where clients may dial this node (the registered address, then the others heartbeats advertise),
    /// by family, and whether the tracker's dial-back reached each.
    #[serde(default)]
    pub addresses: Vec<AddressStatus>,
    /// The libp2p overlay, when it runs.
    pub overlay: Option<OverlaySummary>,
    /// Nodes behind NAT attached to this node for hole punching.
    pub rendezvous_attached: usize,
    pub caps: Caps,
    /// The owner's schedule and monthly budget: the mode in force, the next change, the month's bytes.
    #[serde(default)]
    pub upload: Option<crate::limits::UploadStatus>,
    pub cache: CacheStatus,
    pub served: Served,
    pub credits: CreditsStatus,
    /// This month's books (`fog-node earnings` has every epoch of any month).
    #[serde(default)]
    pub earnings: Option<crate::earnings::Report>,
    /// The plain-language answer to "why am I (not) getting traffic?".
    pub traffic: Traffic,
    pub counters: NodeStats,
    /// Browsers' WebTransport endpoint: the QUIC port it listens on and the certificate hashes they pin.
    #[serde(default)]
    pub web_transport: Option<WebTransportEndpoint>,
    /// What the lower-than-best-effort controller did (`--upload-priority low`).
    #[serde(default)]
    pub ledbat: Option<LedbatStatus>,
}

/// The node's LEDBAT++ controllers ([`fog_net::ledbat`]), summed over its connections since it started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedbatStatus {
    /// Round trips in which a connection shrank its window because the uplink's queue was over the target.
    pub delay_backoffs: u64,
    /// Drops to two packets for two round trips, so that every connection re-measures the base delay.
    pub slowdowns: u64,
    /// Window reductions for loss (at most one per round trip and connection).
    pub loss_reductions: u64,
    /// Connections that started from the base delay measured to their client's address in the last 10 min,
    /// rather than taking a queue already in the uplink for the path's.
    #[serde(default)]
    pub remembered_bases: u64,
    /// Connections to new addresses that started from their first RTT less the queueing delay the node's
    /// other connections measured then.
    #[serde(default)]
    pub borrowed_bases: u64,
    /// Of the connection that measured an RTT last (within 10 s; none while nothing is sent): its path's
    /// base delay and the queueing delay above it, the uplink's queue being common to all connections.
    pub base_delay_ms: Option<f64>,
    pub queueing_delay_ms: Option<f64>,
}

impl LedbatStatus {
    fn now() -> Self {
        let s = fog_net::ledbat::LedbatStats::process().snapshot(Instant::now());
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        Self {
            delay_backoffs: s.delay_backoffs,
            slowdowns: s.slowdowns,
            loss_reductions: s.loss_reductions,
            remembered_bases: s.remembered_bases,
            borrowed_bases: s.borrowed_bases,
            base_delay_ms: ms(s.base_delay),
            queueing_delay_ms: ms(s.queueing_delay),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressStatus {
    pub addr: SocketAddr,
    /// `ipv4` or `ipv6`.
    pub family: String,
    pub verified: bool,
}

impl AddressStatus {
    /// The registered address and the other advertised ones, each once, with what the dial-backs found.
    fn list(link: &crate::tracker_link::LinkState) -> Vec<AddressStatus> {
        let mut out: Vec<AddressStatus> = Vec::new();
        for addr in link.advertised.iter().chain(&link.more_addrs) {
            if out.iter().all(|a| a.addr != *addr) {
                let family = if addr.ip().to_canonical().is_ipv4() { "ipv4" } else { "ipv6" };
                out.push(AddressStatus {
                    addr: *addr,
                    family: family.into(),
                    verified: link.verified_addrs.contains(addr),
                });
            }
        }
        out
    }

    /// How many of `list` are in `family`, and verified if `verified`.
    fn count(list: &[AddressStatus], family: &str, verified: bool) -> u64 {
        list.iter().filter(|a| a.family == family && (a.verified || !verified)).count() as u64
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrackerStatus {
    /// The tracker exchanges go to now (with several `--tracker` URLs, the one that answered last).
    pub url: String,
    /// `url`'s place in the `--tracker` list, and how many times the node failed over to another URL.
    #[serde(default)]
    pub index: usize,
    #[serde(default)]
    pub failovers: u64,
    /// `connected`, `unreachable`, `refused` or `connecting`.
    pub state: String,
    pub last_contact_secs_ago: Option<u64>,
    pub last_error: Option<String>,
    pub advertised_addr: Option<SocketAddr>,
    /// Filtered round-trip time to the tracker.
    pub rtt_ms: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Caps {
    pub upload_limit: Option<u64>,
    pub upload_rate: u64,
    pub cache_quota: u64,
    pub memory_cache: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheStatus {
    /// Bytes the cache accounts for (chunks and their per-chunk disk overhead).
    pub used: u64,
    /// `--cache-size`.
    pub quota: u64,
    /// What the cache may hold now: the quota, or less while the disk floor or other files need room.
    pub capacity: u64,
    pub chunks: u64,
    pub hit_ratio: Option<f64>,
    /// Bytes really on disk, as last measured.
    pub disk: Option<crate::store::DiskUsage>,
    /// Why the cache was rebuilt empty at start-up, if its files were damaged.
    pub damaged: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Served {
    pub today_bytes: u64,
    pub month_bytes: u64,
    pub since_start_bytes: u64,
    pub requests_last_5_min: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreditsStatus {
    /// Bytes this node served since it started, by its own count.
    pub own_bytes_served: u64,
    #[serde(flatten)]
    pub ledger: crate::credits::CreditView,
    /// Plain-language summary of own count against the tracker's.
    pub note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Traffic {
    pub getting_traffic: bool,
    pub why: String,
}

#[derive(Debug, Clone, Copy)]
struct Tick {
    at: Instant,
    bytes_served: u64,
    requests: u64,
}

/// Static facts the status reports.
#[derive(Debug, Clone)]
pub struct StatusInfo {
    pub node_id: NodeId,
    pub tracker_url: String,
    pub quic_listen: SocketAddr,
    pub upload_limit: Option<u64>,
    pub memory_cache: u64,
    pub usage_file: PathBuf,
}

#[derive(Debug)]
pub struct Status {
    info: StatusInfo,
    started: Instant,
    server: Arc<Server>,
    link: SharedLinkState,
    overlay: Option<Overlay>,
    attachment: SharedAttachment,
    rendezvous: Arc<RendezvousServer>,
    usage: Mutex<Usage>,
    ticks: Mutex<VecDeque<Tick>>,
    metrics: NodeMetrics,
}

impl Status {
    pub fn new(
        info: StatusInfo,
        server: Arc<Server>,
        link: SharedLinkState,
        overlay: Option<Overlay>,
        attachment: SharedAttachment,
        rendezvous: Arc<RendezvousServer>,
    ) -> Self {
        let usage =
            std::fs::read(&info.usage_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Self {
            info,
            started: Instant::now(),
            server,
            link,
            overlay,
            attachment,
            rendezvous,
            usage: Mutex::new(usage),
            ticks: Mutex::new(VecDeque::new()),
            metrics: NodeMetrics::default(),
        }
    }

    /// Once a second: account usage and keep the activity window; saves usage every 10 s.
    pub async fn track_forever(self: Arc<Self>) {
        let mut interval = tokio::time::interval(TICK);
        let mut n = 0u64;
        loop {
            interval.tick().await;
            self.tick();
            n += 1;
            if n.is_multiple_of(10) {
                self.save_usage();
            }
        }
    }

    fn tick(&self) {
        let c = &self.server.counters;
        let now = Tick {
            at: Instant::now(),
            bytes_served: c.bytes_served.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
        };
        let mut ticks = self.ticks.lock().expect("ticks lock");
        let served = ticks.back().map_or(now.bytes_served, |t| now.bytes_served.saturating_sub(t.bytes_served));
        let (day, month) = today();
        self.usage.lock().expect("usage lock").add(served, &day, &month);
        ticks.push_back(now);
        while ticks.front().is_some_and(|t| now.at.duration_since(t.at) > ACTIVITY_WINDOW) {
            ticks.pop_front();
        }
    }

    /// Writes `usage.json` (atomically); called periodically and at shutdown.
    pub fn save_usage(&self) {
        let usage = self.usage.lock().expect("usage lock").clone();
        let tmp = self.info.usage_file.with_extension("tmp");
        let json = serde_json::to_vec(&usage).expect("usage serialises");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|()| std::fs::rename(&tmp, &self.info.usage_file)) {
            tracing::warn!(error = %e, "cannot save usage counters");
        }
    }

    /// (upload rate over the last seconds, requests in the activity window).
    fn activity(&self) -> (u64, u64) {
        let ticks = self.ticks.lock().expect("ticks lock");
        let (Some(last), Some(first)) = (ticks.back(), ticks.front()) else { return (0, 0) };
        let recent = ticks.iter().rev().find(|t| last.at.duration_since(t.at) >= RATE_WINDOW).unwrap_or(first);
        let secs = last.at.duration_since(recent.at).as_secs_f64();
        let rate = if secs > 0.0 { (last.bytes_served - recent.bytes_served) as f64 / secs } else { 0.0 };
        (rate as u64, last.requests - first.requests)
    }

    pub fn status(&self) -> NodeStatus {
        let store = &self.server.store;
        let (used, chunks) = store.usage();
        let counters = self.server.counters.snapshot(used, chunks, store.capacity());
        let (upload_rate, recent_requests) = self.activity();
        let link = self.link.lock().expect("link state lock").clone();
        let tracker_state = if link.refused.is_some() {
            "refused"
        } else if link.last_error.is_some() {
            "unreachable"
        } else if link.registered {
            "connected"
        } else {
            "connecting"
        };
        let usage = self.usage.lock().expect("usage lock").clone();
        let lookups = counters.hits + counters.misses;
        let traffic = self.why(&link, tracker_state, upload_rate, recent_requests);
        NodeStatus {
            node_id: self.info.node_id,
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            quic_listen: self.info.quic_listen,
            tracker: TrackerStatus {
                url: link.tracker.as_ref().map_or_else(|| self.info.tracker_url.clone(), |t| t.url.clone()),
                index: link.tracker.as_ref().map_or(0, |t| t.index),
                failovers: link.tracker.as_ref().map_or(0, |t| t.failovers),
                state: tracker_state.to_string(),
                last_contact_secs_ago: link.last_ok.map(|t| t.elapsed().as_secs()),
                last_error: link.refused.clone().or(link.last_error.clone()),
                advertised_addr: link.advertised,
                rtt_ms: link.rtt_ms,
            },
            reachability: self.reachability(&link),
            addresses: AddressStatus::list(&link),
            overlay: self.overlay.as_ref().map(Overlay::summary),
            rendezvous_attached: self.rendezvous.attached(),
            caps: Caps {
                upload_limit: self.info.upload_limit,
                upload_rate,
                cache_quota: store.quota(),
                memory_cache: self.info.memory_cache,
            },
            upload: Some(self.server.upload.status()),
            cache: CacheStatus {
                used,
                quota: store.quota(),
                capacity: store.capacity(),
                chunks,
                hit_ratio: (lookups > 0).then(|| counters.hits as f64 / lookups as f64),
                disk: store.disk(),
                damaged: store.damaged().map(str::to_string),
            },
            served: Served {
                today_bytes: usage.day_bytes,
                month_bytes: usage.month_bytes,
                since_start_bytes: counters.bytes_served,
                requests_last_5_min: recent_requests,
            },
            credits: self.credits_status(counters.bytes_served),
            earnings: self.earnings(),
            traffic,
            counters,
            web_transport: Some(self.server.web.endpoint(self.info.quic_listen.port())),
            ledbat: Some(LedbatStatus::now()),
        }
    }

    fn reachability(&self, link: &crate::tracker_link::LinkState) -> String {
        let port = self.info.quic_listen.port();
        let verified: Vec<String> = link.verified_addrs.iter().map(ToString::to_string).collect();
        // Direct in one family (a global IPv6 address), behind NAT in the other.
        let partly = if verified.is_empty() {
            String::new()
        } else {
            format!("direct at {} for clients of that family; otherwise ", verified.join(", "))
        };
        match (link.reachable, *self.attachment.lock().expect("attachment lock")) {
            (None, _) => "unknown until the tracker has tried to dial this node".into(),
            (Some(true), _) => format!(
                "direct: the tracker reached this node at {}; clients dial it",
                if verified.is_empty() { "its address".into() } else { verified.join(", ") }
            ),
            (Some(false), Some(a)) => format!(
                "{partly}behind NAT: attached to rendezvous node {} which sees this node at {}; clients reach it by \
                 hole punching (forward UDP port {port} to serve directly)",
                a.rendezvous, a.external
            ),
            (Some(false), None) => format!(
                "{partly}behind NAT and not attached to a rendezvous yet: clients cannot reach this node. Forward \
                 UDP port {port} on your router, or wait for a reachable peer (docs/operations.md)"
            ),
        }
    }

    fn credits_status(&self, served: u64) -> CreditsStatus {
        let ledger = self.server.credits.view();
        let mut note = match ledger.tracker_credited {
            Some(c) => format!(
                "served {served} bytes since start; the tracker's ledger credits {c} bytes in all; {} receipts await redemption",
                ledger.receipts_held
            ),
            None => format!("served {served} bytes since start; no statement from the tracker yet"),
        };
        if let Some(r) = &ledger.receipts_recovered {
            note = format!("{note}; at start-up the {r}");
        }
        if let Some(p) = &ledger.ledger_problem {
            note = format!("WARNING: the tracker's ledger failed verification: {p}. {note}");
        } else if let Some(n) = ledger.ledger_verified_size {
            note.push_str(&format!("; ledger verified up to {n} records"));
        }
        CreditsStatus { own_bytes_served: served, ledger, note }
    }

    /// This month's books, with the latest epochs.
    fn earnings(&self) -> Option<crate::earnings::Report> {
        const EPOCHS_SHOWN: usize = 24;
        self.server
            .credits
            .earnings()
            .summary(EPOCHS_SHOWN)
            .inspect_err(|e| tracing::warn!(error = %e, "cannot read the books"))
            .ok()
    }

    fn why(&self, link: &crate::tracker_link::LinkState, state: &str, rate: u64, requests: u64) -> Traffic {
        let tracker = &self.info.tracker_url;
        let paused = self.server.upload.check(TYPICAL_CHUNK).err();
        let (getting_traffic, why) = match state {
            "refused" => (false, format!(
                "The tracker refuses this node: {}. It will send you no clients until that is resolved; if your clock is off, fix it; if the operator blocked the node, contact them.",
                link.refused.as_deref().unwrap_or("no reason given")
            )),
            "unreachable" => (requests > 0, format!(
                "The tracker at {tracker} cannot be reached ({}). Clients are only sent to nodes the tracker sees as healthy, so new traffic stops until it is reachable again. Check this device's internet connection and the --tracker URL. The node keeps serving clients that already know it.",
                link.last_error.as_deref().unwrap_or("unknown error")
            )),
            "connecting" => (false, format!("Registering with the tracker at {tracker}…")),
            _ if self.overlay.as_ref().is_some_and(Overlay::is_joining) => (false, "Joining: connecting to the nearby nodes the tracker suggested (at most 10 seconds), so this node's first chunks come from them rather than the origin. The tracker sends clients once that is done.".into()),
            _ => match (paused, self.server.upload.cap()) {
                (Some(refusal), _) => (false, format!(
                    "Paused by your limits: {refusal}. The tracker sends clients elsewhere meanwhile (--schedule, --monthly-upload)."
                )),
                (None, Some(limit)) if rate as f64 >= CAP_SATURATED * limit as f64 => (true, format!(
                    "Serving at your upload cap ({} bytes/s): the cap you set is what limits this node. Raise --upload-limit (or the --schedule window's rate) to serve more.",
                    limit
                )),
                _ if requests > 0 => (true, format!("Serving: {requests} requests in the last 5 minutes.")),
                _ => (false, "Nothing is wrong: the tracker knows this node and it is healthy, but no clients have been sent here in the last 5 minutes. Traffic follows demand for the content this node is assigned; quiet periods are normal.".into()),
            },
        };
        Traffic { getting_traffic, why }
    }

    fn metrics_text(&self) -> String {
        let s = self.status();
        self.metrics.update(&s);
        self.metrics.update_families(&self.server.web, &self.server.upload);
        self.metrics.encode()
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Reply {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/") => reply(StatusCode::OK, "text/html; charset=utf-8", STATUS_HTML),
            (&Method::GET, "/status") => json(StatusCode::OK, &self.status()),
            (&Method::GET, "/metrics") => http_server::metrics(self.metrics_text()),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: try / , /status or /metrics\n"),
        }
    }

    /// Serves the status page on `listener` until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        http_server::serve(listener, 64, move |req, _| self.clone().handle(req), shutdown).await;
    }
}

/// Reads one metric's value from a node counter snapshot or from the whole status.
type ReadCounter = fn(&NodeStats) -> u64;
type ReadGauge = fn(&NodeStatus) -> u64;

/// Registers one metric per `(name, help, read)` and pairs it with the function that reads its value.
fn register_each<M, R>(
    registry: &mut prometheus_client::registry::Registry,
    defs: impl IntoIterator<Item = (&'static str, &'static str, R)>,
) -> Vec<(M, R)>
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    defs.into_iter()
        .map(|(name, help, read)| {
            let metric = M::default();
            registry.register(name, help, metric.clone());
            (metric, read)
        })
        .collect()
}

/// Prometheus metrics of a node (`fog_node_*`).
#[derive(Debug)]
struct NodeMetrics {
    registry: prometheus_client::registry::Registry,
    counters: Vec<(Counter, ReadCounter)>,
    /// Counters kept outside [`NodeStats`], read from the whole status.
    status_counters: Vec<(Counter, ReadGauge)>,
    gauges: Vec<(Gauge, ReadGauge)>,
    /// `fog_node_web_sessions_total{result}`.
    web_sessions: Family<[(&'static str, &'static str); 1], Counter>,
    /// `fog_node_web_cert_rotations_total{step}`.
    web_cert_rotations: Family<[(&'static str, &'static str); 1], Counter>,
    /// `fog_node_upload_refusals_total{reason}`.
    upload_refusals: Family<[(&'static str, &'static str); 1], Counter>,
    /// `fog_node_tracker_failovers_total` and `fog_node_tracker_index`.
    tracker_failovers: Counter,
    tracker_index: Gauge,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        let mut registry = prometheus_client::registry::Registry::default();
        let counter_defs: [(&str, &str, ReadCounter); 18] = [
            ("fog_node_requests", "Chunk requests received", |s| s.requests),
            ("fog_node_hits", "Requests served from the cache", |s| s.hits),
            ("fog_node_misses", "Requests not in the cache", |s| s.misses),
            ("fog_node_served_bytes", "Bytes sent to clients", |s| s.bytes_served),
            ("fog_node_origin_fills", "Chunks pulled from origins", |s| s.origin_fills),
            ("fog_node_origin_bytes", "Bytes pulled from origins", |s| s.origin_bytes),
            ("fog_node_corrupt_chunks", "Stored chunks found corrupt and dropped", |s| s.corrupt_chunks),
            ("fog_node_bad_requests", "Malformed requests received", |s| s.bad_requests),
            ("fog_node_store_errors", "Chunk store read/write failures", |s| s.store_errors),
            ("fog_node_peer_fills", "Misses filled from overlay peers", |s| s.peer_fills),
            ("fog_node_peer_fill_bytes", "Bytes received from peers filling misses", |s| s.peer_fill_bytes),
            ("fog_node_peer_served_bytes", "Bytes sent to peers filling their misses", |s| s.peer_served_bytes),
            ("fog_node_peer_bad_chunks", "Chunks from peers that did not match their hash", |s| s.peer_bad_chunks),
            ("fog_node_home_fills", "Chunks filled through for peers as the chunk's home", |s| s.home_fills),
            ("fog_node_peer_fills_quic", "Of fog_node_peer_fills, those over the peer's QUIC endpoint", |s| {
                s.peer_fills_quic
            }),
            (
                "fog_node_peer_served_quic_bytes",
                "Of fog_node_peer_served_bytes, those sent over this node's QUIC endpoint (under --upload-priority)",
                |s| s.peer_served_quic_bytes,
            ),
            (
                "fog_node_peer_fills_punched",
                "Of fog_node_peer_fills_quic, those from peers behind NAT, over a path punched through their rendezvous",
                |s| s.peer_fills_punched,
            ),
            ("fog_node_unlicensed_hints", "Origin hints ignored for want of a valid ticket with fills left", |s| {
                s.unlicensed_hints
            }),
        ];
        let gauge_defs: [(&str, &str, ReadGauge); 21] = [
            ("fog_node_ipv4_addresses", "IPv4 addresses advertised to the tracker", |s| {
                AddressStatus::count(&s.addresses, "ipv4", false)
            }),
            ("fog_node_ipv4_verified_addresses", "IPv4 addresses the tracker dialled back", |s| {
                AddressStatus::count(&s.addresses, "ipv4", true)
            }),
            ("fog_node_ipv6_addresses", "IPv6 addresses advertised to the tracker", |s| {
                AddressStatus::count(&s.addresses, "ipv6", false)
            }),
            ("fog_node_ipv6_verified_addresses", "IPv6 addresses the tracker dialled back", |s| {
                AddressStatus::count(&s.addresses, "ipv6", true)
            }),
            ("fog_node_cache_used_bytes", "Bytes the cache accounts for (chunks and per-chunk overhead)", |s| {
                s.cache.used
            }),
            ("fog_node_cache_quota_bytes", "Cache quota (--cache-size)", |s| s.cache.quota),
            ("fog_node_cache_capacity_bytes", "What the cache may hold now (below the quota to keep disk room)", |s| {
                s.cache.capacity
            }),
            ("fog_node_data_dir_bytes", "Bytes on disk in the whole data directory", |s| {
                s.cache.disk.as_ref().map_or(0, |d| d.data_dir_bytes)
            }),
            ("fog_node_store_disk_bytes", "Bytes on disk of the chunk store's files", |s| {
                s.cache.disk.as_ref().map_or(0, |d| d.store_bytes)
            }),
            ("fog_node_disk_limit_bytes", "The data directory stays below this (quota + allowance)", |s| {
                s.cache.disk.as_ref().map_or(0, |d| d.limit_bytes)
            }),
            ("fog_node_disk_free_bytes", "Free bytes on the data directory's filesystem", |s| {
                s.cache.disk.as_ref().map_or(0, |d| d.fs_free_bytes)
            }),
            ("fog_node_cached_chunks", "Cached chunks", |s| s.cache.chunks),
            ("fog_node_active_streams", "Requests in progress", |s| s.counters.active_streams),
            ("fog_node_upload_rate_bytes", "Upload rate over the last 5 s, bytes/s", |s| s.caps.upload_rate),
            ("fog_node_upload_limit_bytes", "Upload cap, bytes/s (0: none)", |s| s.caps.upload_limit.unwrap_or(0)),
            ("fog_node_tracker_connected", "1 when the last tracker exchange succeeded", |s| {
                u64::from(s.tracker.state == "connected")
            }),
            ("fog_node_tracker_rtt_ms", "Filtered RTT to the tracker, ms", |s| {
                s.tracker.rtt_ms.map_or(0, |r| r.round() as u64)
            }),
            ("fog_node_overlay_peers", "Connected overlay peers", |s| s.overlay.as_ref().map_or(0, |o| o.peers as u64)),
            ("fog_node_cell_members", "Nodes in this node's cell (0: no cells)", |s| {
                s.overlay.as_ref().map_or(0, |o| o.cell_members as u64)
            }),
            ("fog_node_overlay_direct_peers", "Overlay peers with a direct (not relayed) connection", |s| {
                s.overlay.as_ref().map_or(0, |o| o.direct_peers as u64)
            }),
            ("fog_node_rendezvous_attached", "Nodes behind NAT attached here for hole punching", |s| {
                s.rendezvous_attached as u64
            }),
        ];
        let upload_defs: [(&str, &str, ReadGauge); 5] = [
            (
                "fog_node_upload_cap_bytes",
                "Upload cap in force now (--upload-limit or a --schedule window), bytes/s (0: none)",
                |s| s.upload.as_ref().and_then(|u| u.cap).unwrap_or(0),
            ),
            ("fog_node_upload_off", "1 while the owner's --schedule has the node off", |s| {
                u64::from(s.upload.as_ref().is_some_and(|u| u.mode == fog_proto::api::UploadMode::Off))
            }),
            ("fog_node_monthly_upload_limit_bytes", "The month's upload budget, --monthly-upload (0: none)", |s| {
                s.upload.as_ref().and_then(|u| u.budget.as_ref()).map_or(0, |b| b.limit)
            }),
            (
                "fog_node_monthly_upload_used_bytes",
                "Bytes uploaded this month (local time), counted against the budget",
                |s| s.upload.as_ref().and_then(|u| u.budget.as_ref()).map_or(0, |b| b.used),
            ),
            (
                "fog_node_monthly_upload_left_bytes",
                "Bytes of the month's upload budget neither used nor reserved",
                |s| s.upload.as_ref().and_then(|u| u.budget.as_ref()).map_or(0, |b| b.left),
            ),
        ];
        let ledbat_counter_defs: [(&str, &str, ReadGauge); 5] = [
            (
                "fog_node_ledbat_delay_backoffs",
                "Round trips in which an upload (--upload-priority low, LEDBAT++) shrank its window because the \
                 uplink's queueing delay was over the 60 ms target: the owner's traffic is being given way to",
                |s| s.ledbat.as_ref().map_or(0, |l| l.delay_backoffs),
            ),
            (
                "fog_node_ledbat_slowdowns",
                "LEDBAT++ slowdowns: an upload held two packets for two round trips to re-measure the base delay",
                |s| s.ledbat.as_ref().map_or(0, |l| l.slowdowns),
            ),
            ("fog_node_ledbat_loss_reductions", "LEDBAT++ window reductions for packet loss", |s| {
                s.ledbat.as_ref().map_or(0, |l| l.loss_reductions)
            }),
            (
                "fog_node_ledbat_remembered_bases",
                "LEDBAT++ uploads that started from the base delay measured to their client's address in the last \
                 10 min, so that a queue already in the uplink does not read as the path's base",
                |s| s.ledbat.as_ref().map_or(0, |l| l.remembered_bases),
            ),
            (
                "fog_node_ledbat_borrowed_bases",
                "LEDBAT++ uploads to new addresses that started from their first RTT less the queueing delay the \
                 node's other uploads measured then",
                |s| s.ledbat.as_ref().map_or(0, |l| l.borrowed_bases),
            ),
        ];
        let ledbat_gauge_defs: [(&str, &str, ReadGauge); 2] = [
            (
                "fog_node_ledbat_base_delay_ms",
                "Base delay (smallest RTT over 10 min) of the LEDBAT++ upload that measured an RTT last, ms; 0 when \
                 none did in 10 s",
                |s| s.ledbat.as_ref().and_then(|l| l.base_delay_ms).map_or(0, |d| d.round() as u64),
            ),
            (
                "fog_node_ledbat_queueing_delay_ms",
                "Queueing delay over the base delay that the LEDBAT++ upload that measured an RTT last saw, ms (the \
                 uplink's queue is common to all uploads); 0 when none did in 10 s",
                |s| s.ledbat.as_ref().and_then(|l| l.queueing_delay_ms).map_or(0, |d| d.round() as u64),
            ),
        ];
        let status_counters = register_each(&mut registry, ledbat_counter_defs);
        let counters = register_each(&mut registry, counter_defs);
        let gauges = register_each(&mut registry, gauge_defs.into_iter().chain(upload_defs).chain(ledbat_gauge_defs));
        let web_sessions = Family::default();
        registry.register("fog_node_web_sessions", "Browsers' WebTransport sessions by outcome", web_sessions.clone());
        let web_cert_rotations = Family::default();
        registry.register(
            "fog_node_web_cert_rotations",
            "Steps of the browsers' certificate rotation: made_next (announced), switched, replaced (clock jump)",
            web_cert_rotations.clone(),
        );
        let upload_refusals = Family::default();
        registry.register(
            "fog_node_upload_refusals",
            "Requests refused (Busy) for the owner's limits: off (the schedule) or budget (the month's)",
            upload_refusals.clone(),
        );
        let tracker_failovers = Counter::default();
        registry.register(
            "fog_node_tracker_failovers",
            "Times the node moved to another of its --tracker URLs",
            tracker_failovers.clone(),
        );
        let tracker_index = Gauge::default();
        registry.register(
            "fog_node_tracker_index",
            "Which of the --tracker URLs the node talks to now (0: the first)",
            tracker_index.clone(),
        );
        Self {
            registry,
            counters,
            status_counters,
            gauges,
            web_sessions,
            web_cert_rotations,
            upload_refusals,
            tracker_failovers,
            tracker_index,
        }
    }
}

impl NodeMetrics {
    fn update(&self, s: &NodeStatus) {
        for (c, read) in &self.counters {
            // Counters only go up: add what the node counted since the last scrape.
            c.inc_by(read(&s.counters).saturating_sub(c.get()));
        }
        for (c, read) in &self.status_counters {
            c.inc_by(read(s).saturating_sub(c.get()));
        }
        for (g, read) in &self.gauges {
            g.set(read(s) as i64);
        }
        self.tracker_failovers.inc_by(s.tracker.failovers.saturating_sub(self.tracker_failovers.get()));
        self.tracker_index.set(s.tracker.index as i64);
    }

    /// The counters kept by label outside [`NodeStatus`].
    fn update_families(&self, web: &crate::web::Web, upload: &crate::limits::UploadPolicy) {
        let counts = web.sessions.by_result().map(|(result, n)| (&self.web_sessions, ("result", result), n));
        let steps = web.rotations_by_step().map(|(step, n)| (&self.web_cert_rotations, ("step", step), n));
        let refusals = upload.refusals().map(|(reason, n)| (&self.upload_refusals, ("reason", reason), n));
        for (family, label, n) in counts.into_iter().chain(steps).chain(refusals) {
            let c = family.get_or_create(&[label]);
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Text for `fog-node status`.
pub fn render_text(s: &NodeStatus) -> String {
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / f64::from(1u32 << 30));
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20));
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18} {v}\n"));
    line("node", s.node_id.to_string());
    line("version", format!("{} (up {} s)", s.version, s.uptime_secs));
    line("tracker", format!("{} — {}", s.tracker.url, s.tracker.state));
    if s.tracker.failovers > 0 {
        line("  failovers", format!("{} (now the list's #{})", s.tracker.failovers, s.tracker.index + 1));
    }
    if let Some(e) = &s.tracker.last_error {
        line("  last error", e.clone());
    }
    line("listening (QUIC)", s.quic_listen.to_string());
    if let Some(a) = s.tracker.advertised_addr {
        line("advertised as", a.to_string());
    }
    line("reachability", s.reachability.clone());
    for a in &s.addresses {
        let verdict = if a.verified { "reached by the tracker" } else { "not reached by the tracker" };
        line("  address", format!("{} ({}, {verdict})", a.addr, a.family));
    }
    if let Some(o) = &s.overlay {
        line(
            "overlay",
            format!("{} peers ({} direct), sees itself as {}", o.peers, o.direct_peers, o.reachability.as_str()),
        );
        if o.cell_members > 0 {
            line("cell", format!("{} nodes share this node's chunk homes", o.cell_members));
        }
    }
    let cap = s.caps.upload_limit.map_or("no cap".into(), |l| format!("{}/s", mib(l)));
    line("upload", format!("{}/s now, cap {cap}", mib(s.caps.upload_rate)));
    if let Some(u) = &s.upload {
        render_upload(u, &mut line);
    }
    if let Some(l) = &s.ledbat {
        line("  giving way", render_ledbat(l));
    }
    let hit = s.cache.hit_ratio.map_or("–".into(), |h| format!("{:.1} %", h * 100.0));
    line(
        "cache",
        format!("{} of {} in {} chunks, hit ratio {hit}", gib(s.cache.used), gib(s.cache.quota), s.cache.chunks),
    );
    if let Some(d) = &s.cache.disk {
        line(
            "on disk",
            format!(
                "{} in the data directory ({} chunk store), limit {}; {} free on the disk",
                gib(d.data_dir_bytes),
                gib(d.store_bytes),
                gib(d.limit_bytes),
                gib(d.fs_free_bytes)
            ),
        );
        if let Some(why) = &d.shrunk_because {
            line("  cache shrunk", format!("to {}: {why}", gib(s.cache.capacity)));
        }
        if let Some(w) = &d.warning {
            line("  WARNING", w.clone());
        }
    }
    if let Some(d) = &s.cache.damaged {
        line("  repaired", format!("the cache's files were damaged and it was rebuilt empty at start-up: {d}"));
    }
    line("served", format!("today {}, this month {}", mib(s.served.today_bytes), mib(s.served.month_bytes)));
    line("credits", s.credits.note.clone());
    if let Some(e) = &s.earnings {
        let t = &e.totals;
        line(
            "earned this month",
            format!(
                "{} credited for {} receipts ({} rejected); settled epochs: node {} bytes, tracker {} bytes{}",
                mib(t.credited_bytes),
                t.receipts_claimed,
                t.receipts_rejected,
                t.settled_node_bytes,
                t.settled_tracker_bytes,
                if t.epochs_disagreeing > 0 {
                    format!(", {} epochs DISAGREE", t.epochs_disagreeing)
                } else {
                    String::new()
                }
            ),
        );
        line("  details", "fog-node earnings [--month YYYY-MM] [--csv]".into());
    }
    out.push('\n');
    out.push_str(if s.traffic.getting_traffic { "Traffic: yes. " } else { "Why no traffic? " });
    out.push_str(&s.traffic.why);
    out.push('\n');
    out
}

/// What the LEDBAT++ controller did, in a line of `fog-node status`.
fn render_ledbat(l: &LedbatStatus) -> String {
    let delays = match (l.base_delay_ms, l.queueing_delay_ms) {
        (Some(base), Some(queueing)) => format!("; now {queueing:.0} ms of queueing over a {base:.0} ms base delay"),
        _ => String::new(),
    };
    format!(
        "{} round trips backed off for the owner's traffic (LEDBAT++), {} slowdowns, {} reductions for loss, {} \
         connections started from a remembered and {} from a borrowed base delay{delays}",
        l.delay_backoffs, l.slowdowns, l.loss_reductions, l.remembered_bases, l.borrowed_bases
    )
}

/// The schedule's and the budget's lines of `fog-node status`.
fn render_upload(u: &crate::limits::UploadStatus, line: &mut impl FnMut(&str, String)) {
    use fog_proto::api::UploadMode;
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20));
    let mode = |m: UploadMode| match m {
        UploadMode::Unlimited => "unlimited".to_string(),
        UploadMode::Off => "off".to_string(),
        UploadMode::Rate(r) => format!("{}/s", mib(r)),
    };
    if let Some(text) = &u.schedule {
        let source = if u.in_window { "a window of the schedule" } else { "outside the schedule's windows" };
        line("schedule", format!("{text} ({})", u.time_zone));
        line("  now", format!("{} ({source})", mode(u.mode)));
        if let Some(next) = u.next_change {
            line("  next change", format!("{} in {} s", mode(next.mode), next.in_secs));
        }
    }
    if let Some(b) = &u.budget {
        line(
            "monthly budget",
            format!(
                "{} of {} used in {}, {} left; starts again in {} h",
                mib(b.used + b.reserved),
                mib(b.limit),
                b.month,
                mib(b.left),
                b.resets_in_secs / 3600
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
    }

    #[test]
    fn usage_rolls_over_days_and_months() {
        let mut u = Usage::default();
        u.add(10, "2026-11-30", "2026-11");
        u.add(5, "2026-11-30", "2026-11");
        assert_eq!((u.day_bytes, u.month_bytes), (15, 15));
        u.add(7, "2026-12-01", "2026-12");
        assert_eq!(u, Usage { day: "2026-12-01".into(), day_bytes: 7, month: "2026-12".into(), month_bytes: 7 });
    }
}
