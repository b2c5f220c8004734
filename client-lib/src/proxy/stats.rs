//! What the proxy saw: bytes by source (per node, origin), offload, startup time, stalls, fallbacks with
//! reasons. Served as `/stats` (JSON) and `/metrics` (Prometheus, `fog_proxy_*`), and summarised to the
//! tracker periodically.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use fog_net::tracker::CurrentTracker;
use fog_proto::api::{ClientReport, NodeFailure, RttSample, MAX_CLIENT_RTTS, MAX_REPORTED_FAILURES};
use fog_proto::NodeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::FetchReport;

/// Nodes tracked individually; a player rarely talks to more than a few dozen.
const MAX_NODES: usize = 1024;
/// Events kept for `fog_poll_event`; the oldest are dropped when nobody polls.
const MAX_EVENTS: usize = 256;

/// What the player last said about itself (through the C ABI or the Rust API).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Playback {
    pub position_secs: f64,
    pub buffer_secs: f64,
    pub state: PlaybackState,
    #[serde(skip)]
    pub at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlaybackState {
    Idle,
    Playing,
    Paused,
    Buffering,
    Ended,
}

impl PlaybackState {
    pub fn from_code(code: i32) -> Option<Self> {
        Some(match code {
            0 => Self::Idle,
            1 => Self::Playing,
            2 => Self::Paused,
            3 => Self::Buffering,
            4 => Self::Ended,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Label {
    kind: String,
}

#[derive(Debug, Default)]
struct Metrics {
    registry: Registry,
    bytes: Family<Label, Counter>,
    requests: Family<Label, Counter>,
    fallbacks: Family<Label, Counter>,
    stalls: Counter,
    startup_ms: Gauge,
    cached: Family<Label, Gauge>,
    tracker_failovers: Counter,
    tracker_index: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut m = Self::default();
        m.registry.register(
            "fog_proxy_bytes",
            "Bytes fetched for players by source (kind: fog, origin, passthrough)",
            m.bytes.clone(),
        );
        m.registry.register(
            "fog_proxy_requests",
            "Player requests by kind (playlist, segment, range, passthrough)",
            m.requests.clone(),
        );
        m.registry.register("fog_proxy_fallbacks", "Node attempts that fell back, by reason", m.fallbacks.clone());
        m.registry.register(
            "fog_proxy_stalls",
            "Segments delivered slower than their play time (inferred stalls)",
            m.stalls.clone(),
        );
        m.registry.register(
            "fog_proxy_startup_ms",
            "Time from the first request to the first complete segment",
            m.startup_ms.clone(),
        );
        m.registry.register(
            "fog_proxy_cache_entries",
            "Entries in the proxy's caches (kind: playlist, manifest, prefetch)",
            m.cached.clone(),
        );
        m.registry.register(
            "fog_proxy_tracker_failovers",
            "Times the proxy moved to another of its --tracker URLs",
            m.tracker_failovers.clone(),
        );
        m.registry.register(
            "fog_proxy_tracker_index",
            "Which of the --tracker URLs the proxy asks now (0: the first)",
            m.tracker_index.clone(),
        );
        m
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeStat {
    pub bytes: u64,
    pub chunks: u64,
    pub errors: u64,
    pub throughput_bytes_per_s: Option<u64>,
    pub rtt_ms: Option<u64>,
    #[serde(skip)]
    busy_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub uptime_secs: u64,
    pub fog_bytes: u64,
    pub origin_bytes: u64,
    pub passthrough_bytes: u64,
    /// Share of delivered bytes that came from fog nodes.
    pub offload: Option<f64>,
    pub nodes: BTreeMap<NodeId, NodeStat>,
    pub fallbacks: BTreeMap<String, u64>,
    pub passthrough_reasons: BTreeMap<String, u64>,
    pub requests: BTreeMap<String, u64>,
    pub startup_ms: Option<u64>,
    pub stalls: u64,
    pub prefetch_hits: u64,
    pub playback: Option<Playback>,
    /// The tracker URL requests go to now (the one that answered last), and how often that changed.
    pub tracker: Option<CurrentTracker>,
}

#[derive(Debug)]
pub struct ProxyStats {
    started: Instant,
    first_request: Mutex<Option<Instant>>,
    state: Mutex<Snapshot>,
    unreported: Mutex<ClientReport>,
    events: Mutex<VecDeque<serde_json::Value>>,
    metrics: Metrics,
}

impl Default for ProxyStats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            first_request: Mutex::new(None),
            state: Mutex::new(Snapshot::default()),
            unreported: Mutex::new(ClientReport::default()),
            events: Mutex::new(VecDeque::new()),
            metrics: Metrics::new(),
        }
    }
}

impl ProxyStats {
    /// Queues an event for the embedding player (`fog_poll_event`).
    pub fn event(&self, kind: &str, detail: serde_json::Value) {
        let mut events = self.events.lock().expect("lock");
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(serde_json::json!({ "event": kind, "detail": detail }));
    }

    pub fn poll_event(&self) -> Option<serde_json::Value> {
        self.events.lock().expect("lock").pop_front()
    }

    pub fn playback(&self, p: Playback) {
        self.state.lock().expect("lock").playback = Some(p);
    }

    /// How long until the player runs dry, if it told us recently.
    pub fn buffer_left(&self) -> Option<std::time::Duration> {
        let p = self.state.lock().expect("lock").playback?;
        let age = p.at.elapsed().as_secs_f64();
        (age < 10.0 && p.state == PlaybackState::Playing)
            .then(|| std::time::Duration::from_secs_f64((p.buffer_secs - age).max(0.5)))
    }

    pub fn request(&self, kind: &str) {
        self.first_request.lock().expect("lock").get_or_insert_with(Instant::now);
        *self.state.lock().expect("lock").requests.entry(kind.to_string()).or_default() += 1;
        self.metrics.requests.get_or_create(&Label { kind: kind.into() }).inc();
    }

    /// Records a finished fog fetch; `segment_secs` (when known) and `took` infer stalls and startup.
    pub fn fetched(&self, r: &FetchReport, took: std::time::Duration, segment_secs: Option<f64>) {
        let mut s = self.state.lock().expect("lock");
        s.fog_bytes += r.fog_bytes;
        s.origin_bytes += r.origin_bytes;
        for (id, u) in &r.nodes {
            if !s.nodes.contains_key(id) && s.nodes.len() >= MAX_NODES {
                continue;
            }
            let n = s.nodes.entry(*id).or_default();
            n.bytes += u.bytes;
            n.chunks += u.chunks;
            n.errors += u.errors;
            n.busy_ms += u.busy_ms;
            n.rtt_ms = u.rtt_ms.or(n.rtt_ms);
            n.throughput_bytes_per_s = (n.busy_ms > 0).then(|| n.bytes * 1000 / n.busy_ms);
        }
        for (reason, count) in &r.fallbacks {
            self.event("fallback", serde_json::json!({ "reason": reason, "count": count }));
            *s.fallbacks.entry((*reason).to_string()).or_default() += count;
            self.metrics.fallbacks.get_or_create(&Label { kind: (*reason).into() }).inc_by(*count);
        }
        self.metrics.bytes.get_or_create(&Label { kind: "fog".into() }).inc_by(r.fog_bytes);
        self.metrics.bytes.get_or_create(&Label { kind: "origin".into() }).inc_by(r.origin_bytes);
        if let Some(secs) = segment_secs {
            if took.as_secs_f64() > secs {
                s.stalls += 1;
                self.metrics.stalls.inc();
                self.event("stall", serde_json::json!({ "took_ms": took.as_millis() as u64, "segment_secs": secs }));
            }
            if s.startup_ms.is_none() {
                let first = self.first_request.lock().expect("lock").unwrap_or(self.started);
                let ms = first.elapsed().as_millis() as u64;
                s.startup_ms = Some(ms);
                self.metrics.startup_ms.set(ms as i64);
                self.event("startup", serde_json::json!({ "ms": ms }));
            }
        }
        drop(s);
        let mut u = self.unreported.lock().expect("lock");
        u.fog_bytes += r.fog_bytes;
        u.origin_bytes += r.origin_bytes;
        for ((node, reason), count) in &r.failures_by_node {
            let failures = &mut u.node_failures;
            if let Some(f) = failures.iter_mut().find(|f| f.node == *node && f.reason == *reason) {
                f.count += count;
            } else if failures.len() < MAX_REPORTED_FAILURES {
                failures.push(NodeFailure { node: *node, reason: (*reason).into(), count: *count });
            }
        }
        // The latest RTT per node: the tracker places this client's network from them.
        let used = r.nodes.iter().filter_map(|(id, n)| Some((*id, n.rtt_ms?)));
        for (node, rtt_ms) in used.chain(r.probed_rtt.iter().copied()) {
            RttSample::record(&mut u.node_rtt, node, rtt_ms as f32, MAX_CLIENT_RTTS);
        }
    }

    /// How many entries the proxy's `kind` cache holds.
    pub fn cached(&self, kind: &str, entries: u64) {
        self.metrics.cached.get_or_create(&Label { kind: kind.into() }).set(entries as i64);
    }

    pub fn prefetch_hit(&self) {
        self.state.lock().expect("lock").prefetch_hits += 1;
    }

    /// Bytes that bypassed the fog, and why.
    pub fn passthrough(&self, bytes: u64, reason: &str) {
        let mut s = self.state.lock().expect("lock");
        s.passthrough_bytes += bytes;
        *s.passthrough_reasons.entry(reason.to_string()).or_default() += 1;
        if reason != "playlist" {
            self.event("passthrough", serde_json::json!({ "reason": reason, "bytes": bytes }));
        }
        self.metrics.bytes.get_or_create(&Label { kind: "passthrough".into() }).inc_by(bytes);
        self.unreported.lock().expect("lock").passthrough_bytes += bytes;
    }

    /// Notes which tracker the client asks now (kept by its failover policy).
    pub fn tracker(&self, current: CurrentTracker) {
        let m = &self.metrics;
        m.tracker_failovers.inc_by(current.failovers.saturating_sub(m.tracker_failovers.get()));
        m.tracker_index.set(current.index as i64);
        self.state.lock().expect("lock").tracker = Some(current);
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut s = self.state.lock().expect("lock").clone();
        s.uptime_secs = self.started.elapsed().as_secs();
        let total = s.fog_bytes + s.origin_bytes + s.passthrough_bytes;
        s.offload = (total > 0).then(|| s.fog_bytes as f64 / total as f64);
        s
    }

    /// What happened since the last report, resetting it; `None` when nothing did.
    pub fn take_report(&self) -> Option<ClientReport> {
        let mut u = self.unreported.lock().expect("lock");
        let r = std::mem::take(&mut *u);
        (r.fog_bytes + r.origin_bytes + r.passthrough_bytes > 0 || !r.node_failures.is_empty()).then_some(r)
    }

    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.metrics.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
