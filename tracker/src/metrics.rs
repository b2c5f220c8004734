//! Prometheus metrics of the tracker (`GET /metrics`). Labels stay low-cardinality: no URLs, no node ids.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

/// Failure reasons clients may report; anything else counts as `other`, keeping label values bounded.
pub fn known_reason(reason: &str) -> &'static str {
    const KNOWN: [&str; 11] = [
        "stream_error",
        "timeout",
        "node_busy",
        "node_not_found",
        "node_origin_failed",
        "origin_changed",
        "origin_not_allowed",
        "node_refused",
        "protocol_error",
        "interrupted",
        "hash_mismatch",
    ];
    KNOWN.into_iter().find(|k| *k == reason).unwrap_or("other")
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// How clients reach nodes (`direct`, `hole_punch`, `unreachable`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabel {
    pub path: String,
}

/// How nodes' overlays see themselves (`public`, `nat`, `relayed`, `unknown`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReachabilityLabel {
    pub reachability: String,
}

/// Live nodes with an address in an IP family (`ipv4`, `ipv6`), by whether a dial-back reached one
/// (`verified`, `unverified`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabel {
    pub family: String,
    pub state: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Resolve requests by outcome (stored, ingested, unknown_origin, origin_not_found, origin_error, …).
    pub resolves: Family<ResultLabel, Counter>,
    pub ingest_errors: Counter,
    pub bad_node_messages: Counter,
    pub nodes: Family<StateLabel, Gauge>,
    pub nodes_by_client_path: Family<PathLabel, Gauge>,
    pub nodes_by_reachability: Family<ReachabilityLabel, Gauge>,
    pub nodes_by_family: Family<FamilyLabel, Gauge>,
    pub manifests: Gauge,
    pub cells: Gauge,
    pub ingests_running: Gauge,
    pub node_cache_used_bytes: Gauge,
    pub fog_bytes: Counter,
    pub origin_fill_bytes: Counter,
    pub node_requests: Counter,
    pub corrupt_chunks: Counter,
    pub client_bytes: Family<SourceLabel, Counter>,
    pub node_failure_reports: Family<ResultLabel, Counter>,
    pub credited_bytes: Counter,
    pub rejected_receipts: Counter,
    /// Redemption batches passed on to the replica sequencing their shards, by result (`ok`, `failed`).
    pub ledger_forwarded: Family<ResultLabel, Counter>,
    pub probes: Family<ResultLabel, Counter>,
    /// Requests browsers made from other sites, by result (`allowed`, `preflight`, `refused`).
    pub web_requests: Family<ResultLabel, Counter>,
    /// Probes of nodes' browser (WebTransport) endpoints by result (`ok`, `failed`).
    pub web_probes: Family<ResultLabel, Counter>,
    pub live: LiveMetrics,
    /// Node registrations accepted by this tracker (a replica of a cell: by this replica).
    pub registrations: Counter,
    /// The cell's bus (`fog_tracker_bus_*`), with `--nats`.
    pub bus: crate::bus::BusMetrics,
    /// The manifest store and its cache (`fog_tracker_store_*`).
    pub store: crate::store::StoreMetrics,
}

/// Live playlists followed and segments pushed (`crate::live`).
#[derive(Debug, Default)]
pub struct LiveMetrics {
    pub playlists: Gauge,
    pub viewers: Gauge,
    /// Playlist polls by result (ok, or why the playlist could not be read).
    pub polls: Family<ResultLabel, Counter>,
    /// New segments ingested to be pushed, and those whose ingest failed.
    pub segments: Counter,
    pub segment_errors: Counter,
    /// Pushes by result (ok, failed, and those skipped: the home loaded, too many in flight).
    pub pushes: Family<ResultLabel, Counter>,
}

impl LiveMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("fog_tracker_live_playlists", "Live playlists followed", self.playlists.clone());
        registry.register(
            "fog_tracker_live_viewers",
            "Viewers of followed live playlists (reporting addresses)",
            self.viewers.clone(),
        );
        registry.register("fog_tracker_live_polls", "Polls of followed live playlists by result", self.polls.clone());
        registry.register("fog_tracker_live_segments", "New live segments ingested for push", self.segments.clone());
        registry.register(
            "fog_tracker_live_segment_errors",
            "New live segments that could not be ingested for push",
            self.segment_errors.clone(),
        );
        registry.register(
            "fog_tracker_live_pushes",
            "Live segment chunks pushed to cell homes by result",
            self.pushes.clone(),
        );
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let (resolves, nodes) = (Family::default(), Family::default());
        let (ingest_errors, bad_node_messages) = (Counter::default(), Counter::default());
        let (manifests, node_cache_used_bytes) = (Gauge::default(), Gauge::default());
        let (fog_bytes, origin_fill_bytes) = (Counter::default(), Counter::default());
        let (node_requests, corrupt_chunks) = (Counter::default(), Counter::default());
        let (client_bytes, node_failure_reports) = (Family::default(), Family::default());
        let (credited_bytes, rejected_receipts) = (Counter::default(), Counter::default());
        let (probes, ledger_forwarded) = (Family::default(), Family::default());
        let (nodes_by_client_path, nodes_by_reachability) = (Family::default(), Family::default());
        let mut registry = Registry::default();
        registry.register("fog_tracker_probes", "Active probes of nodes by result", probes.clone());
        registry.register(
            "fog_tracker_credited_bytes",
            "Bytes credited to nodes in the ledger",
            credited_bytes.clone(),
        );
        registry.register(
            "fog_tracker_rejected_receipts",
            "Receipts rejected at redemption",
            rejected_receipts.clone(),
        );
        registry.register(
            "fog_tracker_ledger_forwarded",
            "Redemption batches passed on to the replica sequencing their ledger shards, by result",
            ledger_forwarded.clone(),
        );
        registry.register("fog_tracker_resolves", "Resolve requests by result", resolves.clone());
        registry.register("fog_tracker_ingest_errors", "Origin ingests that failed", ingest_errors.clone());
        registry.register(
            "fog_tracker_bad_node_messages",
            "Node register/heartbeat messages rejected (bad signature, replay, clock)",
            bad_node_messages.clone(),
        );
        registry.register("fog_tracker_nodes", "Registered nodes by state", nodes.clone());
        registry.register(
            "fog_tracker_nodes_by_client_path",
            "Live nodes by how clients reach them (direct, hole_punch, unreachable)",
            nodes_by_client_path.clone(),
        );
        registry.register(
            "fog_tracker_nodes_by_reachability",
            "Live nodes by their overlay's own view (public, nat, relayed, unknown)",
            nodes_by_reachability.clone(),
        );
        let nodes_by_family = Family::default();
        registry.register(
            "fog_tracker_nodes_by_family",
            "Live nodes with an address in an IP family (ipv4, ipv6), by whether the tracker dialled one back",
            nodes_by_family.clone(),
        );
        registry.register("fog_tracker_manifests", "Manifests stored", manifests.clone());
        let cells = Gauge::default();
        registry.register(
            "fog_tracker_cells",
            "Cells the healthy nodes are partitioned into, each fetching a chunk from the origin once",
            cells.clone(),
        );
        let ingests_running = Gauge::default();
        registry.register(
            "fog_tracker_ingests_running",
            "Objects being read from their origins",
            ingests_running.clone(),
        );
        registry.register(
            "fog_tracker_node_cache_used_bytes",
            "Cache bytes used across healthy nodes, as they report",
            node_cache_used_bytes.clone(),
        );
        registry.register("fog_tracker_fog_bytes", "Bytes nodes served to clients, as they report", fog_bytes.clone());
        registry.register(
            "fog_tracker_origin_fill_bytes",
            "Bytes nodes pulled from origins to fill cache misses, as they report",
            origin_fill_bytes.clone(),
        );
        registry.register(
            "fog_tracker_node_requests",
            "Chunk requests nodes received, as they report",
            node_requests.clone(),
        );
        registry.register(
            "fog_tracker_corrupt_chunks",
            "Chunks nodes found corrupt on their disks and dropped, as they report",
            corrupt_chunks.clone(),
        );
        registry.register(
            "fog_tracker_client_bytes",
            "Bytes players' proxies report by source (fog, origin, passthrough)",
            client_bytes.clone(),
        );
        registry.register(
            "fog_tracker_node_failure_reports",
            "Node failures clients report, by reason",
            node_failure_reports.clone(),
        );
        let web_requests = Family::default();
        registry.register(
            "fog_tracker_web_requests",
            "Requests from browser pages of other sites by result (allowed, preflight, refused)",
            web_requests.clone(),
        );
        let web_probes = Family::default();
        registry.register(
            "fog_tracker_web_probes",
            "Probes of nodes' WebTransport endpoints for browsers by result (ok, failed)",
            web_probes.clone(),
        );
        let live = LiveMetrics::default();
        live.register(&mut registry);
        let registrations = Counter::default();
        registry.register(
            "fog_tracker_registrations",
            "Node registrations accepted (by this replica, in a cell)",
            registrations.clone(),
        );
        let bus = crate::bus::BusMetrics::default();
        bus.register(&mut registry);
        let store = crate::store::StoreMetrics::default();
        store.register(&mut registry);
        Self {
            registry,
            live,
            registrations,
            bus,
            store,
            resolves,
            ingest_errors,
            bad_node_messages,
            nodes,
            nodes_by_client_path,
            nodes_by_reachability,
            nodes_by_family,
            manifests,
            cells,
            ingests_running,
            node_cache_used_bytes,
            fog_bytes,
            origin_fill_bytes,
            node_requests,
            corrupt_chunks,
            client_bytes,
            node_failure_reports,
            credited_bytes,
            rejected_receipts,
            ledger_forwarded,
            probes,
            web_requests,
            web_probes,
        }
    }
}

impl Metrics {
    /// Adds the ledger's lease metrics (a PostgreSQL ledger's store makes them before the tracker is
    /// built).
    pub fn register_ledger(&mut self, ledger: &LedgerMetrics) {
        ledger.register(&mut self.registry);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The ledger shard a metric is about.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    pub shard: u32,
}

/// `fog_tracker_ledger_*`: the sequencers' leases of a ledger in PostgreSQL, per shard, as this replica sees
/// them, and the size of each shard's log as this replica appended it.
#[derive(Debug, Clone, Default)]
pub struct LedgerMetrics {
    sequencer: Family<ShardLabel, LeaseGauge>,
    /// Leases this replica took over from another holder (expired, or given up by it).
    takeovers: Family<ShardLabel, Counter>,
    /// Appends and seals refused because another replica had taken the lease over.
    fenced: Family<ShardLabel, Counter>,
    size: Family<ShardLabel, Gauge>,
}

impl LedgerMetrics {
    pub fn sequencer(&self, shard: u32) -> LeaseGauge {
        self.sequencer.get_or_create(&ShardLabel { shard }).clone()
    }

    pub fn takeovers(&self, shard: u32) -> Counter {
        self.takeovers.get_or_create(&ShardLabel { shard }).clone()
    }

    pub fn fenced(&self, shard: u32) -> Counter {
        self.fenced.get_or_create(&ShardLabel { shard }).clone()
    }

    pub fn size(&self, shard: u32) -> Gauge {
        self.size.get_or_create(&ShardLabel { shard }).clone()
    }

    /// Makes every shard's series exist from the start (a shard this replica never sequences shows 0).
    pub fn shards(&self, shards: u32) {
        for shard in 0..shards {
            let _ = (self.sequencer(shard), self.takeovers(shard), self.fenced(shard));
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "fog_tracker_ledger_sequencer",
            "1 while this replica holds the lease of the ledger shard (it sequences the shard's appends)",
            self.sequencer.clone(),
        );
        registry.register(
            "fog_tracker_ledger_takeovers",
            "Ledger shard leases this replica took over from another replica",
            self.takeovers.clone(),
        );
        registry.register(
            "fog_tracker_ledger_fenced",
            "Ledger appends and seals refused because this replica had lost the shard's lease",
            self.fenced.clone(),
        );
        registry.register(
            "fog_tracker_ledger_size",
            "Records in the ledger shard's log, as this replica last appended or sealed it",
            self.size.clone(),
        );
    }
}

/// 1 until the lease this replica took or renewed last runs out, read when scraped: a sequencer with
/// nothing to append does not renew, and its lease ends by itself.
#[derive(Debug, Clone, Default)]
pub struct LeaseGauge(Arc<Mutex<Option<Instant>>>);

impl LeaseGauge {
    /// The lease held lasts until `until` (`None`: not held).
    pub fn held_until(&self, until: Option<Instant>) {
        *self.0.lock().expect("lease gauge lock") = until;
    }

    pub fn get(&self) -> i64 {
        i64::from(self.0.lock().expect("lease gauge lock").is_some_and(|until| Instant::now() < until))
    }
}

impl TypedMetric for LeaseGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for LeaseGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}
