//! The node registry: who is registered, where clients reach them, whether they are healthy (heard from
//! within the node timeout), what they report, and which nodes the operator blocked. Registrations are soft
//! state, rebuilt from the nodes' next heartbeats after a restart; the block list is persisted by the caller.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fog_proto::api::{NodeContact, NodeStats, OverlayReport, PeerContact, Reachability, Rendezvous, NEIGHBOURHOOD};
use fog_proto::{placement, ChunkHash, NodeId};
use serde::Serialize;

use fog_sched::coords::{merge_neighbours, refit, Coord, Neighbour};
use fog_sched::scheduler::{NodeInfo, Params, Snapshot, DEFAULT_UPLOAD};

/// How far a signed message's timestamp may be from the tracker's clock.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Nodes silent this long are forgotten, so the registry cannot fill up with departed nodes.
/// How long a registered node may stay unreachable by clients before a full registry may forget it.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(120);
/// Largest page of the node table.
pub const MAX_PAGE: usize = 200;

/// What a node says about itself when it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub addr: SocketAddr,
    pub cache_capacity: u64,
    pub upload_limit: Option<u64>,
    pub version: String,
    /// The tracker's dial-back to `addr` at registration succeeded.
    pub reachable: bool,
    /// The node's overlay is still connecting (until a heartbeat says otherwise).
    pub joining: bool,
}

/// How clients reach a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPath {
    /// The tracker dialled it: clients dial it too.
    Direct,
    /// Behind NAT, attached to a directly reachable rendezvous: clients hole-punch through it.
    HolePunch,
    /// Neither: not scheduled.
    Unreachable,
}

impl ClientPath {
    pub const ALL: [ClientPath; 3] = [Self::Direct, Self::HolePunch, Self::Unreachable];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::HolePunch => "hole_punch",
            Self::Unreachable => "unreachable",
        }
    }
}

/// A node's health, from heartbeats, the tracker's probes and what it announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Scheduled.
    Active,
    /// Its overlay is still connecting the neighbourhood: not scheduled yet, so its first misses come from
    /// peers rather than the origin.
    Joining,
    /// Shutting down: serves what is in flight, gets nothing new.
    Draining,
    /// Heartbeats stopped, or probes keep failing.
    Unhealthy,
    /// Served bytes that did not match their hash: never scheduled again while the tracker runs.
    Quarantined,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Joining => "joining",
            Self::Draining => "draining",
            Self::Unhealthy => "unhealthy",
            Self::Quarantined => "quarantined",
        }
    }
}

/// What one active probe of a node found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The chunk came back and verified.
    Ok { rtt_ms: u64 },
    /// The node does not hold the chunk: no verdict.
    NoData,
    /// Timeout, refused connection, protocol error.
    Failed(String),
    /// Bytes that do not hash to the chunk.
    WrongBytes,
}

/// Consecutive probe failures that make a node unhealthy, and successes that bring it back (hysteresis,
/// so one lost packet does not flap a node in and out of schedules).
pub const PROBE_FAILURES_DOWN: u32 = 3;
pub const PROBE_SUCCESSES_UP: u32 = 2;

/// Probe history of one node.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub draining: bool,
    pub probe_down: bool,
    pub failures: u32,
    pub successes: u32,
    pub last_probe_rtt_ms: Option<u64>,
    pub quarantined: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub reg: Registration,
    pub health: Health,
    /// When it first registered (kept across re-registrations).
    pub first_seen: Instant,
    pub last_seen: Instant,
    /// Newest message timestamp accepted: older or equal ones are replays.
    pub last_timestamp_ms: u64,
    pub stats: NodeStats,
    /// Upload rate between its last two heartbeats, bytes/s.
    pub upload_rate: u64,
    /// What its overlay reported last (reachability, addresses, RTT samples, rendezvous).
    pub overlay: OverlayReport,
    /// Its network coordinate, fitted to its neighbours' RTTs.
    pub coord: Coord,
    pub neighbours: Vec<Neighbour<NodeId>>,
}

/// The tracker's own place among the neighbours (nodes report their RTT to it).
pub const TRACKER: NodeId = NodeId([0; 32]);
/// Neighbours kept per node for its coordinate.
const MAX_NEIGHBOURS: usize = 64;
/// A scheduling snapshot is reused this long unless the node set changed.
const SNAPSHOT_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("registry is full ({0} nodes)")]
    Full(usize),
    #[error("message timestamp is not newer than the last one from this node (replayed?)")]
    Replay,
    #[error("message timestamp is more than 5 minutes off the tracker's clock; check the node's clock")]
    Clock,
    #[error("this node was blocked by the operator")]
    Blocked,
}

/// Totals accumulated from the growth of node counters between heartbeats, so they keep counting when
/// nodes restart (their counters reset) or leave.
#[derive(Debug, Default)]
pub struct Totals {
    pub fog_bytes: AtomicU64,
    pub origin_fill_bytes: AtomicU64,
    pub node_requests: AtomicU64,
    pub corrupt_chunks: AtomicU64,
    /// From client reports (unauthenticated; for dashboards only).
    pub client_fog_bytes: AtomicU64,
    pub client_origin_bytes: AtomicU64,
}

#[derive(Debug)]
pub struct Registry {
    nodes: RwLock<HashMap<NodeId, NodeEntry>>,
    directory: Mutex<PeerDirectory>,
    tracker_coord: Mutex<Coord>,
    params: Params,
    /// Bumped when the set of schedulable nodes may have changed, so the cached snapshot is rebuilt.
    generation: AtomicU64,
    snapshot: Mutex<Option<(Instant, u64, Arc<Snapshot>)>>,
    blocked: RwLock<HashSet<NodeId>>,
    pub totals: Totals,
    timeout: Duration,
    max_nodes: usize,
}

/// How long the bootstrap peer directory is reused before it is rebuilt from the registry.
const PEER_DIRECTORY_TTL: Duration = Duration::from_secs(2);

/// Overlay contacts of healthy nodes, split by whether the tracker could dial them.
#[derive(Debug, Default)]
struct PeerDirectory {
    built: Option<Instant>,
    reachable: Arc<Vec<PeerContact>>,
    others: Arc<Vec<PeerContact>>,
}

/// Node counts for stats and metrics.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Live (heartbeating) nodes by overlay reachability and by client path.
    pub by_reachability: [u64; 4],
    pub by_client_path: [u64; 3],
    pub total: u64,
    pub healthy: u64,
    /// Active but unreachable by clients.
    pub unreachable: u64,
    pub joining: u64,
    pub draining: u64,
    pub quarantined: u64,
    pub cache_used: u64,
    pub cache_capacity: u64,
    pub bytes_served: u64,
    pub origin_fill_bytes: u64,
}

/// One row of the dashboard's node table.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub id: NodeId,
    pub state: &'static str,
    pub quarantine_reason: Option<String>,
    /// Round trip of the tracker's latest successful probe.
    pub probe_rtt_ms: Option<u64>,
    /// Only shown to operators (a volunteer's address is personal data).
    pub addr: Option<SocketAddr>,
    /// How the node's overlay sees itself: unknown, public, nat, relayed.
    pub reachability: &'static str,
    /// How clients reach it: direct, hole_punch, unreachable.
    pub client_path: &'static str,
    /// Filtered RTT the node measured to the tracker.
    pub tracker_rtt_ms: Option<f32>,
    /// Overlay peers with RTT samples.
    pub peers_measured: usize,
    pub version: String,
    pub upload_limit: Option<u64>,
    pub upload_rate: u64,
    pub cache_used: u64,
    pub cache_capacity: u64,
    pub hit_ratio: Option<f64>,
    pub bytes_served: u64,
    pub corrupt_chunks: u64,
    /// Bytes the ledger credits this node with (filled in from the ledger).
    pub credits: Option<u64>,
    pub last_heartbeat_secs: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodePage {
    pub total: usize,
    pub page: usize,
    pub per_page: usize,
    pub nodes: Vec<NodeView>,
}

/// Sort orders of the node table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    Id,
    State,
    BytesServed,
    UploadRate,
    LastSeen,
}

impl SortBy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "id" => Self::Id,
            "state" => Self::State,
            "bytes" => Self::BytesServed,
            "rate" => Self::UploadRate,
            "last_seen" => Self::LastSeen,
            _ => return None,
        })
    }
}

fn check_clock(now_ms: u64, ts: u64) -> Result<(), RegistryError> {
    if now_ms.abs_diff(ts) > MAX_CLOCK_SKEW_MS {
        return Err(RegistryError::Clock);
    }
    Ok(())
}

/// Growth of a counter that may have been reset (node restart): the new value itself in that case.
fn growth(old: u64, new: u64) -> u64 {
    if new >= old {
        new - old
    } else {
        new
    }
}

impl Registry {
    pub fn new(timeout: Duration, max_nodes: usize, blocked: HashSet<NodeId>) -> Self {
        Self {
            nodes: RwLock::new(HashMap::new()),
            directory: Mutex::new(PeerDirectory::default()),
            tracker_coord: Mutex::new(Coord::default()),
            params: Params::default(),
            generation: AtomicU64::new(0),
            snapshot: Mutex::new(None),
            blocked: RwLock::new(blocked),
            totals: Totals::default(),
            timeout,
            max_nodes,
        }
    }

    /// The scheduler's tunables (the defaults unless set here).
    pub fn with_params(mut self, params: Params) -> Self {
        self.params = params;
        self
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    fn check_blocked(&self, id: &NodeId) -> Result<(), RegistryError> {
        if self.blocked.read().expect("blocked lock").contains(id) {
            return Err(RegistryError::Blocked);
        }
        Ok(())
    }

    pub fn register(&self, id: NodeId, reg: Registration, timestamp_ms: u64, now_ms: u64) -> Result<(), RegistryError> {
        check_clock(now_ms, timestamp_ms)?;
        self.check_blocked(&id)?;
        let mut nodes = self.nodes.write().expect("registry lock");
        if let Some(old) = nodes.get(&id) {
            if timestamp_ms <= old.last_timestamp_ms {
                return Err(RegistryError::Replay);
            }
        } else if nodes.len() >= self.max_nodes {
            // Room for a newcomer comes from entries that serve nobody: silent past the heartbeat timeout,
            // or never reachable by clients after a grace period. Throwaway keys cannot lock real nodes out.
            // A quarantined node stays (forgetting it would let it re-register clean).
            let victim = nodes
                .iter()
                .filter(|(_, n)| n.health.quarantined.is_none())
                .filter(|(id, n)| {
                    n.last_seen.elapsed() > self.timeout
                        || (n.first_seen.elapsed() > UNREACHABLE_GRACE
                            && self.client_path(&nodes, id, n) == ClientPath::Unreachable)
                })
                .min_by_key(|(_, n)| n.last_seen)
                .map(|(id, _)| *id);
            match victim {
                Some(victim) => {
                    tracing::info!(node = %victim, "registry full: forgetting a silent or unreachable node");
                    nodes.remove(&victim);
                }
                None => return Err(RegistryError::Full(self.max_nodes)),
            }
        }
        // Re-registering keeps what the node earned and what the tracker learned: its counters, its probe
        // history and a quarantine (a restart must not wash away failed probes).
        let old = nodes.get(&id);
        let (stats, upload_rate) = old.map(|n| (n.stats.clone(), n.upload_rate)).unwrap_or_default();
        let health = Health { draining: false, ..old.map(|n| n.health.clone()).unwrap_or_default() };
        let first_seen = old.map_or_else(Instant::now, |n| n.first_seen);
        // Keep the coordinate too: it reflects the network, which a restart does not move.
        let (coord, neighbours) = nodes.get(&id).map(|n| (n.coord, n.neighbours.clone())).unwrap_or_default();
        let overlay = OverlayReport { joining: reg.joining, ..Default::default() };
        let entry = NodeEntry {
            reg,
            health,
            first_seen,
            last_seen: Instant::now(),
            last_timestamp_ms: timestamp_ms,
            stats,
            upload_rate,
            overlay,
            coord,
            neighbours,
        };
        nodes.insert(id, entry);
        self.changed();
        Ok(())
    }

    /// Records a heartbeat. `Ok(false)`: the node is unknown and must register.
    pub fn heartbeat(
        &self,
        id: &NodeId,
        stats: NodeStats,
        draining: bool,
        overlay: Option<OverlayReport>,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<bool, RegistryError> {
        check_clock(now_ms, timestamp_ms)?;
        self.check_blocked(id)?;
        let mut nodes = self.nodes.write().expect("registry lock");
        let Some(n) = nodes.get_mut(id) else { return Ok(false) };
        if timestamp_ms <= n.last_timestamp_ms {
            return Err(RegistryError::Replay);
        }
        let served = growth(n.stats.bytes_served, stats.bytes_served);
        let t = &self.totals;
        saturating_add(&t.fog_bytes, served);
        saturating_add(&t.origin_fill_bytes, growth(n.stats.origin_bytes, stats.origin_bytes));
        saturating_add(&t.node_requests, growth(n.stats.requests, stats.requests));
        saturating_add(&t.corrupt_chunks, growth(n.stats.corrupt_chunks, stats.corrupt_chunks));
        let secs = timestamp_ms.saturating_sub(n.last_timestamp_ms) as f64 / 1000.0;
        n.upload_rate = if secs > 0.0 { (served as f64 / secs) as u64 } else { 0 };
        n.last_timestamp_ms = timestamp_ms;
        n.last_seen = Instant::now();
        n.stats = stats;
        if n.health.draining != draining {
            n.health.draining = draining;
            self.changed();
        }
        if let Some(mut o) = overlay {
            // A node cannot be its own rendezvous, and bad-peer reports are handled by the caller.
            if o.rendezvous == Some(*id) {
                o.rendezvous = None;
            }
            o.bad_peers.clear();
            let path = |o: &OverlayReport| (o.rendezvous, o.external_quic);
            if path(&o) != path(&n.overlay) || o.attached != n.overlay.attached || o.joining != n.overlay.joining {
                self.changed();
            }
            let mut fresh: Vec<Neighbour<NodeId>> =
                o.rtt.iter().map(|s| Neighbour { id: s.peer, rtt_ms: s.rtt_ms, at_ms: now_ms }).collect();
            fresh.extend(o.tracker_rtt_ms.map(|rtt_ms| Neighbour { id: TRACKER, rtt_ms, at_ms: now_ms }));
            merge_neighbours(&mut n.neighbours, fresh.into_iter().filter(|s| s.id != *id), now_ms, MAX_NEIGHBOURS);
            let tracker_rtt = o.tracker_rtt_ms;
            n.overlay = o;
            self.refit(&mut nodes, id, tracker_rtt, now_ms);
        }
        Ok(true)
    }

    /// Refits `id`'s coordinate to its neighbours, and the tracker's own to the node's RTT to it.
    fn refit(&self, nodes: &mut HashMap<NodeId, NodeEntry>, id: &NodeId, tracker_rtt: Option<f32>, now_ms: u64) {
        let tracker = *self.tracker_coord.lock().expect("coord lock");
        let Some(neighbours) = nodes.get(id).map(|n| n.neighbours.clone()) else { return };
        let remote: HashMap<NodeId, Coord> = neighbours
            .iter()
            .filter_map(|nb| {
                if nb.id == TRACKER {
                    Some((TRACKER, tracker))
                } else {
                    Some((nb.id, nodes.get(&nb.id)?.coord))
                }
            })
            .collect();
        let seed = u64::from_be_bytes(id.0[..8].try_into().expect("8 bytes")) ^ now_ms;
        let Some(n) = nodes.get_mut(id) else { return };
        refit(&mut n.coord, &neighbours, |peer| remote.get(&peer).copied(), now_ms, seed);
        if let Some(rtt) = tracker_rtt {
            self.tracker_coord.lock().expect("coord lock").update(&n.coord, rtt, 1.0, seed);
        }
    }

    /// A node's coordinate, if it is registered.
    pub fn coord_of(&self, id: &NodeId) -> Option<Coord> {
        self.nodes.read().expect("registry lock").get(id).map(|n| n.coord)
    }

    /// Blocks a node: refused at its next message, dropped from scheduling now. Returns false if it
    /// already was blocked.
    pub fn block(&self, id: NodeId) -> bool {
        self.nodes.write().expect("registry lock").remove(&id);
        self.changed();
        self.blocked.write().expect("blocked lock").insert(id)
    }

    pub fn unblock(&self, id: &NodeId) -> bool {
        self.blocked.write().expect("blocked lock").remove(id)
    }

    pub fn blocked(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.blocked.read().expect("blocked lock").iter().copied().collect();
        v.sort_unstable();
        v
    }

    fn state(&self, n: &NodeEntry) -> NodeState {
        if n.health.quarantined.is_some() {
            NodeState::Quarantined
        } else if n.last_seen.elapsed() > self.timeout || n.health.probe_down {
            NodeState::Unhealthy
        } else if n.health.draining {
            NodeState::Draining
        } else if n.overlay.joining {
            NodeState::Joining
        } else {
            NodeState::Active
        }
    }

    fn healthy(&self, n: &NodeEntry) -> bool {
        self.state(n) == NodeState::Active
    }

    /// Healthy, or joining: taking part in the overlay (peer lists, rendezvous) while not yet scheduled.
    fn alive(&self, n: &NodeEntry) -> bool {
        matches!(self.state(n), NodeState::Active | NodeState::Joining)
    }

    fn client_path(&self, nodes: &HashMap<NodeId, NodeEntry>, id: &NodeId, n: &NodeEntry) -> ClientPath {
        if n.reg.reachable {
            return ClientPath::Direct;
        }
        // The node's word that it is attached is not enough: its rendezvous must list it too.
        let via = n.overlay.rendezvous.and_then(|r| nodes.get(&r));
        if via.is_some_and(|r| r.reg.reachable && self.alive(r) && r.overlay.attached.contains(id)) {
            ClientPath::HolePunch
        } else {
            ClientPath::Unreachable
        }
    }

    /// How a client dials `n`, if it can.
    fn contact(&self, nodes: &HashMap<NodeId, NodeEntry>, id: &NodeId, n: &NodeEntry) -> Option<NodeContact> {
        match self.client_path(nodes, id, n) {
            ClientPath::Direct => Some(NodeContact { id: *id, addr: n.reg.addr, via: None }),
            ClientPath::HolePunch => {
                let r = n.overlay.rendezvous?;
                Some(NodeContact {
                    id: *id,
                    addr: n.overlay.external_quic.unwrap_or(n.reg.addr),
                    via: Some(Rendezvous { id: r, addr: nodes.get(&r)?.reg.addr }),
                })
            }
            ClientPath::Unreachable => None,
        }
    }

    pub fn is_registered(&self, id: &NodeId) -> bool {
        self.nodes.read().expect("registry lock").contains_key(id)
    }

    /// Whether the tracker's dial-back to `id` worked.
    pub fn is_reachable(&self, id: &NodeId) -> bool {
        self.nodes.read().expect("registry lock").get(id).is_some_and(|n| n.reg.reachable)
    }

    /// Overlay peers for `id` to connect to: live nodes with overlay addresses. Two thirds of the list (at
    /// most [`NEIGHBOURHOOD`]) are the nodes nearest to it by coordinate (where peer fill finds a chunk's
    /// home); then directly reachable ones (which can relay and act as rendezvous), then others. Each asking node gets
    /// a different window of the directory, so bootstrap load spreads; the cost is O(`limit`), not O(nodes).
    pub fn peers_for(&self, id: &NodeId, limit: usize) -> Vec<PeerContact> {
        let (reachable, others) = self.peer_directory();
        let start = placement::weight(&ChunkHash(id.0), id) as usize;
        let mut out: Vec<PeerContact> = Vec::with_capacity(limit);
        if let Some(coord) = self.coord_of(id) {
            let snap = self.snapshot();
            let listed = |nid: &NodeId| {
                [&reachable, &others]
                    .into_iter()
                    .find_map(|l| l.binary_search_by_key(nid, |c| c.id).ok().map(|i| &l[i]))
            };
            let nearest = NEIGHBOURHOOD.min(limit * 2 / 3);
            for i in snap.nearest(&coord, nearest + 1, &self.params) {
                let nid = snap.nodes[i as usize].contact.id;
                if let Some(c) = listed(&nid).filter(|_| nid != *id && out.len() < nearest) {
                    out.push(c.clone());
                }
            }
        }
        for (list, want) in [(&reachable, limit.div_ceil(2)), (&others, limit), (&reachable, limit)] {
            let want = want.min(limit - out.len());
            let mut taken = 0;
            for i in 0..list.len() {
                if taken == want {
                    break;
                }
                let c = &list[(start + i) % list.len()];
                if c.id != *id && !out.iter().any(|o| o.id == c.id) {
                    out.push(c.clone());
                    taken += 1;
                }
            }
        }
        out
    }

    /// The (reachable, other) overlay contacts of live nodes (joining ones too: peers should dial them),
    /// rebuilt at most every
    /// [`PEER_DIRECTORY_TTL`].
    fn peer_directory(&self) -> (Arc<Vec<PeerContact>>, Arc<Vec<PeerContact>>) {
        let mut dir = self.directory.lock().expect("directory lock");
        if dir.built.is_none_or(|t| t.elapsed() >= PEER_DIRECTORY_TTL) {
            let nodes = self.nodes.read().expect("registry lock");
            let (mut reachable, mut others) = (Vec::new(), Vec::new());
            for (id, n) in nodes.iter().filter(|(_, n)| self.alive(n) && !n.overlay.addrs.is_empty()) {
                let contact = PeerContact {
                    id: *id,
                    addrs: n.overlay.addrs.clone(),
                    rendezvous: n.reg.reachable.then_some(n.reg.addr),
                };
                if n.reg.reachable {
                    reachable.push(contact)
                } else {
                    others.push(contact)
                }
            }
            // A stable order, so that windows stay put between rebuilds.
            reachable.sort_unstable_by_key(|c| c.id);
            others.sort_unstable_by_key(|c| c.id);
            *dir =
                PeerDirectory { built: Some(Instant::now()), reachable: Arc::new(reachable), others: Arc::new(others) };
        }
        (dir.reachable.clone(), dir.others.clone())
    }

    /// Records a probe of `id`; returns the state change it caused, if any.
    pub fn record_probe(&self, id: &NodeId, outcome: &ProbeOutcome) -> Option<(NodeState, NodeState)> {
        let mut nodes = self.nodes.write().expect("registry lock");
        let n = nodes.get_mut(id)?;
        let before = self.state(n);
        let h = &mut n.health;
        match outcome {
            ProbeOutcome::Ok { rtt_ms } => {
                h.last_probe_rtt_ms = Some(*rtt_ms);
                h.failures = 0;
                h.successes += 1;
                if h.probe_down && h.successes >= PROBE_SUCCESSES_UP {
                    h.probe_down = false;
                }
            }
            ProbeOutcome::NoData => {}
            ProbeOutcome::Failed(_) => {
                h.successes = 0;
                h.failures += 1;
                if h.failures >= PROBE_FAILURES_DOWN {
                    h.probe_down = true;
                }
            }
            ProbeOutcome::WrongBytes => {
                h.quarantined.get_or_insert_with(|| "served bytes that do not match their hash".into());
            }
        }
        let after = self.state(n);
        if before != after {
            self.changed();
        }
        (before != after).then_some((before, after))
    }

    /// Nodes worth probing (not quarantined, still heartbeating): id and address.
    pub fn probe_targets(&self) -> Vec<NodeContact> {
        let nodes = self.nodes.read().expect("registry lock");
        nodes
            .iter()
            .filter(|(_, n)| n.health.quarantined.is_none() && n.last_seen.elapsed() <= self.timeout)
            .filter_map(|(id, n)| self.contact(&nodes, id, n))
            .collect()
    }

    /// The schedulable nodes with their coordinates and grid index, rebuilt when the node set changed or
    /// after [`SNAPSHOT_TTL`] (coordinates and heartbeat timeouts move continuously; one scan per second
    /// instead of one per request keeps resolves cheap with many nodes).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let generation = self.generation.load(Ordering::Relaxed);
        let mut cached = self.snapshot.lock().expect("snapshot lock");
        if let Some((built, g, snap)) = cached.as_ref() {
            if *g == generation && built.elapsed() < SNAPSHOT_TTL {
                return snap.clone();
            }
        }
        let nodes = self.nodes.read().expect("registry lock");
        let infos = nodes
            .iter()
            .filter(|(_, n)| self.healthy(n))
            .filter_map(|(id, n)| {
                Some(NodeInfo {
                    contact: self.contact(&nodes, id, n)?,
                    coord: n.coord,
                    upload: n.reg.upload_limit.unwrap_or(DEFAULT_UPLOAD),
                })
            })
            .collect();
        let snap = Arc::new(Snapshot::new(infos, &self.params));
        *cached = Some((Instant::now(), generation, snap.clone()));
        snap
    }

    pub fn healthy_ids(&self) -> HashSet<NodeId> {
        let nodes = self.nodes.read().expect("registry lock");
        nodes
            .iter()
            .filter(|(id, n)| self.healthy(n) && self.client_path(&nodes, id, n) != ClientPath::Unreachable)
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn counts(&self) -> Counts {
        let nodes = self.nodes.read().expect("registry lock");
        let mut c = Counts { total: nodes.len() as u64, ..Default::default() };
        for n in nodes.values() {
            match self.state(n) {
                NodeState::Draining => c.draining += 1,
                NodeState::Joining => c.joining += 1,
                NodeState::Quarantined => c.quarantined += 1,
                _ => {}
            }
        }
        for (id, n) in nodes.iter().filter(|(_, n)| n.last_seen.elapsed() <= self.timeout) {
            let r = Reachability::ALL.iter().position(|r| *r == n.overlay.reachability).unwrap_or(0);
            c.by_reachability[r] += 1;
            let p = ClientPath::ALL.iter().position(|p| *p == self.client_path(&nodes, id, n)).unwrap_or(0);
            c.by_client_path[p] += 1;
        }
        let path = |(id, n): &(&NodeId, &NodeEntry)| self.healthy(n).then(|| self.client_path(&nodes, id, n));
        c.unreachable = nodes.iter().filter(|e| path(e) == Some(ClientPath::Unreachable)).count() as u64;
        let scheduled = |e: &(&NodeId, &NodeEntry)| path(e).is_some_and(|p| p != ClientPath::Unreachable);
        for (_, n) in nodes.iter().filter(scheduled) {
            c.healthy += 1;
            // Reports are bounded, but a million of them could still wrap a plain sum.
            c.cache_used = c.cache_used.saturating_add(n.stats.cache_used);
            c.cache_capacity = c.cache_capacity.saturating_add(n.reg.cache_capacity);
            c.bytes_served = c.bytes_served.saturating_add(n.stats.bytes_served);
            c.origin_fill_bytes = c.origin_fill_bytes.saturating_add(n.stats.origin_bytes);
        }
        c
    }

    /// One page of the node table, sorted; `with_addr` reveals addresses (operators only).
    pub fn page(&self, page: usize, per_page: usize, sort: SortBy, with_addr: bool) -> NodePage {
        let per_page = per_page.clamp(1, MAX_PAGE);
        let nodes = self.nodes.read().expect("registry lock");
        let mut rows: Vec<(&NodeId, &NodeEntry, NodeState)> =
            nodes.iter().map(|(id, n)| (id, n, self.state(n))).collect();
        match sort {
            SortBy::Id => rows.sort_unstable_by_key(|r| *r.0),
            // Worst first (quarantined, unhealthy, draining): that is what an operator looks for.
            SortBy::State => rows.sort_unstable_by_key(|r| (std::cmp::Reverse(r.2), *r.0)),
            SortBy::BytesServed => rows.sort_unstable_by_key(|r| (std::cmp::Reverse(r.1.stats.bytes_served), *r.0)),
            SortBy::UploadRate => rows.sort_unstable_by_key(|r| (std::cmp::Reverse(r.1.upload_rate), *r.0)),
            SortBy::LastSeen => rows.sort_unstable_by_key(|r| (r.1.last_seen, *r.0)),
        }
        let total = rows.len();
        let views = rows
            .into_iter()
            .skip(page.saturating_mul(per_page))
            .take(per_page)
            .map(|(id, n, state)| {
                let lookups = n.stats.hits.saturating_add(n.stats.misses);
                NodeView {
                    id: *id,
                    state: state.name(),
                    quarantine_reason: n.health.quarantined.clone(),
                    probe_rtt_ms: n.health.last_probe_rtt_ms,
                    addr: with_addr.then_some(n.reg.addr),
                    reachability: n.overlay.reachability.as_str(),
                    client_path: self.client_path(&nodes, id, n).name(),
                    tracker_rtt_ms: n.overlay.tracker_rtt_ms,
                    peers_measured: n.overlay.rtt.len(),
                    version: n.reg.version.clone(),
                    upload_limit: n.reg.upload_limit,
                    upload_rate: n.upload_rate,
                    cache_used: n.stats.cache_used,
                    cache_capacity: n.reg.cache_capacity,
                    hit_ratio: (lookups > 0).then(|| n.stats.hits as f64 / lookups as f64),
                    bytes_served: n.stats.bytes_served,
                    corrupt_chunks: n.stats.corrupt_chunks,
                    credits: None,
                    last_heartbeat_secs: n.last_seen.elapsed().as_secs(),
                }
            })
            .collect();
        NodePage { total, page, per_page, nodes: views }
    }
}

/// Adds self-reported growth to a total that no run of reports can wrap.
pub(crate) fn saturating_add(total: &AtomicU64, n: u64) {
    let _ = total.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_add(n)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u32) -> NodeId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        NodeId(b)
    }

    fn reg() -> Registration {
        Registration {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            cache_capacity: 1,
            upload_limit: None,
            version: "t".into(),
            reachable: true,
            joining: false,
        }
    }

    #[test]
    fn a_joining_node_is_scheduled_once_its_overlay_is_connected() {
        let r = Registry::new(Duration::from_secs(60), 8, HashSet::new());
        let now = 10_000_000;
        r.register(id(1), Registration { joining: true, ..reg() }, now, now).expect("register");
        let state = || r.page(0, 10, SortBy::Id, false).nodes[0].state;
        assert_eq!(state(), "joining");
        assert!(r.snapshot().nodes.is_empty(), "a joining node must not be scheduled");
        assert_eq!((r.counts().joining, r.counts().healthy), (1, 0));
        let still = OverlayReport { joining: true, ..Default::default() };
        r.heartbeat(&id(1), NodeStats::default(), false, Some(still), now + 1, now).expect("heartbeat");
        assert!(r.snapshot().nodes.is_empty());
        r.heartbeat(&id(1), NodeStats::default(), false, Some(OverlayReport::default()), now + 2, now).expect("hb");
        assert_eq!((state(), r.snapshot().nodes.len()), ("active", 1));
        // Registering again (a fresh membership) with the overlay connected keeps it scheduled.
        r.register(id(1), reg(), now + 3, now).expect("register again");
        assert_eq!(r.snapshot().nodes.len(), 1);
    }

    #[test]
    fn replay_clock_capacity_block_and_health() {
        let r = Registry::new(Duration::from_millis(50), 2, HashSet::new());
        let now = 10_000_000;
        r.register(id(1), reg(), now, now).expect("register");
        assert_eq!(r.register(id(1), reg(), now, now), Err(RegistryError::Replay));
        assert_eq!(r.register(id(2), reg(), 1, now), Err(RegistryError::Clock));
        r.register(id(2), reg(), now, now).expect("second");
        assert_eq!(r.register(id(3), reg(), now, now), Err(RegistryError::Full(2)));
        assert_eq!(r.heartbeat(&id(9), NodeStats::default(), false, None, now, now), Ok(false));
        assert_eq!(r.heartbeat(&id(1), NodeStats::default(), false, None, now + 1, now), Ok(true));
        assert_eq!(r.counts().healthy, 2);
        assert!(r.block(id(2)));
        assert_eq!(r.heartbeat(&id(2), NodeStats::default(), false, None, now + 2, now), Err(RegistryError::Blocked));
        assert_eq!(r.register(id(2), reg(), now + 3, now), Err(RegistryError::Blocked));
        assert_eq!(r.counts().total, 1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.counts().healthy, 0);
        assert!(r.snapshot().nodes.is_empty());
        // Full, with one entry silent: a newcomer takes its place.
        r.register(id(4), reg(), now + 4, now).expect("room left");
        r.register(id(5), reg(), now + 5, now).expect("the silent entry makes room");
        assert_eq!(r.counts().total, 2);
        assert_eq!(r.heartbeat(&id(1), NodeStats::default(), false, None, now + 6, now), Ok(false), "not forgotten");
    }

    #[test]
    fn probes_and_draining_move_nodes_between_states_with_hysteresis() {
        let r = Registry::new(Duration::from_secs(60), 10, HashSet::new());
        let now = 10_000_000;
        r.register(id(1), reg(), now, now).expect("register");
        let state = || r.page(0, 10, SortBy::Id, false).nodes[0].state;
        let fail = ProbeOutcome::Failed("timeout".into());
        assert_eq!(r.record_probe(&id(1), &fail), None);
        assert_eq!(r.record_probe(&id(1), &ProbeOutcome::NoData), None);
        assert_eq!(r.record_probe(&id(1), &fail), None);
        assert_eq!(r.record_probe(&id(1), &fail), Some((NodeState::Active, NodeState::Unhealthy)));
        assert!(r.snapshot().nodes.is_empty());
        r.register(id(1), reg(), now + 1, now).expect("re-register");
        assert_eq!(state(), "unhealthy", "re-registering must not wash away failed probes");
        assert_eq!(r.record_probe(&id(1), &ProbeOutcome::Ok { rtt_ms: 3 }), None, "one success is not enough");
        assert_eq!(
            r.record_probe(&id(1), &ProbeOutcome::Ok { rtt_ms: 3 }),
            Some((NodeState::Unhealthy, NodeState::Active))
        );
        r.heartbeat(&id(1), NodeStats::default(), true, None, now + 2, now).expect("draining heartbeat");
        assert_eq!(state(), "draining");
        assert!(r.snapshot().nodes.is_empty(), "a draining node must not be scheduled");
        r.heartbeat(&id(1), NodeStats::default(), false, None, now + 3, now).expect("heartbeat");
        assert_eq!(
            r.record_probe(&id(1), &ProbeOutcome::WrongBytes),
            Some((NodeState::Active, NodeState::Quarantined))
        );
        r.register(id(1), reg(), now + 4, now).expect("re-register");
        assert_eq!(state(), "quarantined", "re-registering must not lift a quarantine");
        assert!(r.probe_targets().is_empty());
    }

    #[test]
    fn totals_survive_counter_resets() {
        let r = Registry::new(Duration::from_secs(60), 10, HashSet::new());
        let now = 10_000_000;
        r.register(id(1), reg(), now, now).expect("register");
        let stats = |b| NodeStats { bytes_served: b, ..Default::default() };
        r.heartbeat(&id(1), stats(100), false, None, now + 1000, now).expect("hb");
        r.heartbeat(&id(1), stats(300), false, None, now + 2000, now).expect("hb");
        r.heartbeat(&id(1), stats(50), false, None, now + 3000, now).expect("hb after restart");
        assert_eq!(r.totals.fog_bytes.load(Ordering::Relaxed), 350);
        assert_eq!(r.page(0, 10, SortBy::Id, false).nodes[0].upload_rate, 50);
    }

    #[test]
    fn pages_are_bounded_and_complete_with_ten_thousand_nodes() {
        let r = Registry::new(Duration::from_secs(60), 20_000, HashSet::new());
        let now = 10_000_000;
        for i in 0..10_000 {
            r.register(id(i), reg(), now, now).expect("register");
        }
        let huge = r.page(0, 1_000_000, SortBy::Id, false);
        assert_eq!(huge.per_page, MAX_PAGE);
        assert_eq!(huge.nodes.len(), MAX_PAGE);
        assert!(huge.nodes.iter().all(|n| n.addr.is_none()));
        let mut seen = HashSet::new();
        for p in 0..(10_000 / 100) {
            let page = r.page(p, 100, SortBy::Id, true);
            assert_eq!(page.total, 10_000);
            assert!(page.nodes.iter().all(|n| n.addr.is_some()));
            seen.extend(page.nodes.into_iter().map(|n| n.id));
        }
        assert_eq!(seen.len(), 10_000);
        assert!(r.page(100, 100, SortBy::State, false).nodes.is_empty());
    }

    /// Most of a node's bootstrap peers are its nearest by coordinate: where its misses' homes are.
    #[test]
    fn bootstrap_peers_start_with_the_nearest_nodes() {
        let r = Registry::new(Duration::from_secs(60), 100, HashSet::new());
        let now = 10_000_000;
        // Two sites 100 ms apart (even and odd ids, so no window of the id-sorted directory is one site), ten
        // nodes each, every node measuring 5 ms to its site and 100 ms across.
        let site = |i: u32| i % 2;
        for i in 0..20 {
            r.register(id(i), reg(), now, now).expect("register");
        }
        for round in 0..30u64 {
            for i in 0..20 {
                let rtt = (0..20)
                    .filter(|&j| j != i)
                    .map(|j| fog_proto::api::RttSample {
                        peer: id(j),
                        rtt_ms: if site(i) == site(j) { 5.0 } else { 100.0 },
                    })
                    .collect();
                let overlay = OverlayReport {
                    addrs: vec![format!("/ip4/127.0.0.1/udp/{}/quic-v1", 4000 + i)],
                    rtt,
                    ..Default::default()
                };
                let at = now + (round + 1) * 1000;
                r.heartbeat(&id(i), NodeStats::default(), false, Some(overlay), at, at).expect("heartbeat");
            }
        }
        for i in [0, 15] {
            let peers = r.peers_for(&id(i), 8);
            assert_eq!(peers.len(), 8);
            let near: Vec<u32> =
                peers[..4].iter().map(|p| u32::from_be_bytes(p.id.0[..4].try_into().expect("4"))).collect();
            assert!(near.iter().all(|&j| site(j) == site(i) && j != i), "node {i}'s first peers: {near:?}");
        }
    }

    #[test]
    fn nodes_behind_nat_are_scheduled_only_through_a_live_rendezvous() {
        let r = Registry::new(Duration::from_secs(60), 10, HashSet::new());
        let now = 10_000_000;
        r.register(id(1), reg(), now, now).expect("public node");
        let natted = Registration { reachable: false, addr: SocketAddr::from(([10, 0, 0, 2], 7701)), ..reg() };
        r.register(id(2), natted, now, now).expect("node behind NAT");
        assert_eq!(r.snapshot().nodes.len(), 1, "not reachable and not attached: not scheduled");
        assert_eq!(r.counts().by_client_path, [1, 0, 1]);
        let external = SocketAddr::from(([198, 51, 100, 9], 40000));
        let overlay = OverlayReport {
            reachability: Reachability::Relayed,
            addrs: vec!["/ip4/198.51.100.9/udp/4001/quic-v1".into()],
            rendezvous: Some(id(1)),
            external_quic: Some(external),
            ..Default::default()
        };
        r.heartbeat(&id(2), NodeStats::default(), false, Some(overlay), now + 1, now).expect("heartbeat");
        assert_eq!(r.snapshot().nodes.len(), 1, "its rendezvous has not confirmed the attachment: not scheduled");
        let confirms = OverlayReport { attached: vec![id(2)], ..Default::default() };
        r.heartbeat(&id(1), NodeStats::default(), false, Some(confirms), now + 1, now).expect("heartbeat");
        let snap = r.snapshot();
        let contact =
            &snap.nodes.iter().find(|c| c.contact.id == id(2)).expect("scheduled through the rendezvous").contact;
        assert_eq!(contact.addr, external);
        assert_eq!(contact.via, Some(Rendezvous { id: id(1), addr: reg().addr }));
        assert_eq!(r.counts().by_client_path, [1, 1, 0]);
        assert_eq!(
            r.counts().by_reachability
                [Reachability::ALL.iter().position(|x| *x == Reachability::Relayed).expect("listed")],
            1
        );
        // Node 1 has no overlay addresses yet; node 2 does and is offered to node 1, without a rendezvous
        // address since the tracker cannot dial it.
        let peers = r.peers_for(&id(1), 8);
        assert_eq!(peers.len(), 1);
        assert_eq!((peers[0].id, peers[0].rendezvous), (id(2), None));
        assert!(r.peers_for(&id(2), 8).is_empty());
        // The rendezvous leaves: node 2 is no longer reachable.
        r.block(id(1));
        assert!(r.snapshot().nodes.is_empty());
    }
}
