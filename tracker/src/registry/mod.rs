//! The node registry: who is registered, where clients reach them, whether they are healthy (heard from
//! within the node timeout), what they report, and which nodes the operator blocked. Registrations are soft
//! state, rebuilt from the nodes' next heartbeats after a restart; the block list is persisted by the caller.
//!
//! Split by concern: [`members`] (registration, heartbeats, blocking, coordinates), [`health`] (states and
//! probe hysteresis), [`peers`] (how clients and peers reach a node: client paths, the bootstrap peer
//! directory), [`cells`] (the partition that gives each chunk one home per cell), [`view`] (counts and the dashboard's node table) and [`replicas`] (a node's state as tracker replicas exchange it on the bus). Each adds methods to [`Registry`].
//!
//! A node may be reachable at several addresses (IPv4 and IPv6): the one it registered at, and the others
//! its heartbeats advertise. The tracker dials each back and keeps which answered; clients get the
//! verified ones in the families they can use.

mod cells;
mod health;
mod members;
mod peers;
mod plan;
mod replicas;
mod view;
mod web;

pub use cells::CellUpdate;
pub use health::{Health, NodeState, ProbeOutcome, PROBE_FAILURES_DOWN, PROBE_SUCCESSES_UP};
pub use members::MAX_CLOCK_SKEW_MS;
pub use peers::ClientPath;
use peers::PeerDirectory;
pub use plan::{PlanRule, PlanState, Resting};
pub use view::{Counts, NodePage, NodeView, SortBy, MAX_PAGE};
pub use web::WebState;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, TryLockError};
use std::time::{Duration, Instant};

use fog_proto::api::{
    Families, NodeContact, NodeStats, OverlayReport, PeerContact, Reachability, Rendezvous, NEIGHBOURHOOD,
};
use fog_proto::{placement, ChunkHash, NodeId};
use serde::Serialize;

use crate::clock::Clock;
use fog_sched::coords::{merge_neighbours, refit, Coord, Neighbour};
use fog_sched::scheduler::{NodeInfo, Params, Snapshot, DEFAULT_UPLOAD};

/// How long a registered node may stay unreachable by clients before a full registry may forget it.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(120);

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
    /// Its operator's region label, which decides its cell.
    pub region: Option<String>,
}

/// One more address a node advertised, and whether the tracker's dial-back to it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advertised {
    pub addr: SocketAddr,
    pub verified: bool,
}

#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub reg: Registration,
    /// Its other addresses (from heartbeats), as last dialled back; kept across re-registrations.
    pub more_addrs: Vec<Advertised>,
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
    /// Its WebTransport endpoint for browsers, if its heartbeats advertise one.
    pub web: Option<WebState>,
    /// Its owner's schedule and budget, if its heartbeats report them.
    pub plan: Option<PlanState>,
}

impl NodeEntry {
    /// Every address it advertised, the registered one first, with whether the dial-back answered.
    fn advertised(&self) -> impl Iterator<Item = Advertised> + '_ {
        let registered = Advertised { addr: self.reg.addr, verified: self.reg.reachable };
        std::iter::once(registered).chain(self.more_addrs.iter().copied())
    }

    /// Addresses clients may dial directly: the verified ones, IPv6 first (no NAT in the way; RFC 8305's
    /// preference), each once.
    pub fn direct_addrs(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in self.advertised().filter(|a| a.verified) {
            if !out.contains(&a.addr) {
                out.push(a.addr);
            }
        }
        out.sort_by_key(|a| !a.is_ipv6());
        out
    }

    /// The verified families, and those it advertised an address in.
    pub fn families(&self) -> (Families, Families) {
        self.advertised().fold((Families::default(), Families::default()), |(verified, advertised), a| {
            let f = Families::of(a.addr.ip());
            (if a.verified { verified.union(f) } else { verified }, advertised.union(f))
        })
    }

    /// Dialled back in every family it advertised an address in; otherwise it needs a rendezvous for the
    /// others.
    pub fn reachable_everywhere(&self) -> bool {
        let (verified, advertised) = self.families();
        verified == advertised
    }

    /// Where nodes behind NAT attach to it as their rendezvous, if it is directly reachable: a verified
    /// address in `family` if it has one, else IPv4 (NAT is an IPv4 thing), else any.
    pub fn rendezvous_addr(&self, family: Option<Families>) -> Option<SocketAddr> {
        rendezvous_among(&self.direct_addrs(), family)
    }

    /// The family it needs a rendezvous in, when the tracker knows it is IPv6 only: it advertised IPv6
    /// addresses and none answered (a stateful firewall), while every IPv4 one did or it has none.
    /// Otherwise `None`: IPv4 is where NAT is, and where one attachment serves most clients.
    pub fn rendezvous_family(&self) -> Option<Families> {
        let (verified, advertised) = self.families();
        let v6 = Families { ipv4: false, ipv6: true };
        (advertised.ipv6 && !verified.ipv6 && verified.ipv4 == advertised.ipv4).then_some(v6)
    }
}

/// [`NodeEntry::rendezvous_addr`] of a node verified at `direct`.
fn rendezvous_among(direct: &[SocketAddr], family: Option<Families>) -> Option<SocketAddr> {
    let pick = |f: Families| direct.iter().copied().find(|a| f.allows(a));
    family.and_then(pick).or_else(|| pick(Families { ipv4: true, ipv6: false })).or(direct.first().copied())
}

/// The tracker's own place among the neighbours (nodes report their RTT to it).
pub const TRACKER: NodeId = NodeId([0; 32]);
/// Neighbours kept per node for its coordinate.
const MAX_NEIGHBOURS: usize = 64;
/// A scheduling snapshot is reused this long unless the node set changed.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(1);
/// While snapshots are refreshed in the background, how old one may get before a resolve builds it itself
/// (the refresher is stuck or far behind).
const AGED_LIMIT: Duration = Duration::from_secs(5);
/// A snapshot, when it was built and the generation it was built at.
type Built = (Instant, u64, Arc<Snapshot>);

/// The last snapshot built, and the lock its builders take. A build takes long with many nodes (~80 ms at
/// 10^5, ~1 s at 10^6): resolves keep the snapshot in hand while it is only older than [`SNAPSHOT_TTL`] and
/// another is being built or a background task refreshes it ([`Registry::refresh_snapshots`]), instead of
/// queueing behind the build; a changed node set is waited for.
#[derive(Debug, Default)]
struct SnapshotCache {
    current: Mutex<Option<Built>>,
    building: Mutex<()>,
}

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
    /// The grid edge of cells (ms), when the overlay is partitioned into them.
    cell_edge_ms: Option<f32>,
    cells: Mutex<cells::CellIndex>,
    tracker_coord: Mutex<Coord>,
    params: Params,
    /// Bumped when the set of schedulable nodes may have changed, so the cached snapshot is rebuilt.
    generation: AtomicU64,
    snapshot: SnapshotCache,
    /// [`Registry::web_snapshot`]'s.
    web_snapshot: SnapshotCache,
    /// Set once a background task refreshes the snapshots: resolves then serve an aged one.
    refreshed: AtomicBool,
    blocked: RwLock<HashSet<NodeId>>,
    pub totals: Totals,
    clock: Clock,
    timeout: Duration,
    max_nodes: usize,
    /// When owners' schedules and budgets rest their nodes.
    plan_rule: PlanRule,
}

impl Registry {
    pub fn new(timeout: Duration, max_nodes: usize, blocked: HashSet<NodeId>) -> Self {
        Self {
            nodes: RwLock::new(HashMap::new()),
            directory: Mutex::new(PeerDirectory::default()),
            cell_edge_ms: None,
            cells: Mutex::new(cells::CellIndex::default()),
            tracker_coord: Mutex::new(Coord::default()),
            params: Params::default(),
            generation: AtomicU64::new(0),
            snapshot: SnapshotCache::default(),
            web_snapshot: SnapshotCache::default(),
            refreshed: AtomicBool::new(false),
            blocked: RwLock::new(blocked),
            totals: Totals::default(),
            clock: Clock::System,
            timeout,
            max_nodes,
            plan_rule: PlanRule::default(),
        }
    }

    /// Reads time from `clock` instead of the system's.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Time since `then` on the registry's clock.
    fn since(&self, then: Instant) -> Duration {
        self.clock.now().saturating_duration_since(then)
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

    /// The schedulable nodes with their coordinates and grid index, rebuilt when the node set changed or
    /// after [`SNAPSHOT_TTL`] (coordinates and heartbeat timeouts move continuously; one scan per second
    /// instead of one per request keeps resolves cheap with many nodes).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.cached_snapshot(&self.snapshot, self.serve_aged(), |nodes, id, n| self.contact(nodes, id, n))
    }

    /// Rebuilds the scheduling snapshots that are older than [`SNAPSHOT_TTL`] (blocking: ~80 ms at 10^5
    /// nodes). Called every half TTL off the async workers, so that from then on resolves never build one
    /// for its age alone; the pages' snapshot only once pages asked for it.
    pub fn refresh_snapshots(&self) {
        self.refreshed.store(true, Ordering::Relaxed);
        self.cached_snapshot(&self.snapshot, false, |nodes, id, n| self.contact(nodes, id, n));
        if self.web_snapshot.current.lock().expect("snapshot lock").is_some() {
            self.web_snapshot_built(false);
        }
    }

    /// Whether an aged snapshot serves a resolve: a background task is refreshing them.
    fn serve_aged(&self) -> bool {
        self.refreshed.load(Ordering::Relaxed)
    }

    /// The snapshot in `cache`, or a new one of the healthy nodes `contact` gives a contact for. An aged one
    /// (same node set, older than [`SNAPSHOT_TTL`]) is kept when `serve_aged` (up to [`AGED_LIMIT`]), or
    /// while another caller builds the next.
    fn cached_snapshot(
        &self,
        cache: &SnapshotCache,
        serve_aged: bool,
        contact: impl Fn(&HashMap<NodeId, NodeEntry>, &NodeId, &NodeEntry) -> Option<NodeContact>,
    ) -> Arc<Snapshot> {
        let generation = self.generation.load(Ordering::Relaxed);
        // Built at this generation or a later one, and young enough.
        let usable = |b: &Built| b.1 >= generation && self.since(b.0) < SNAPSHOT_TTL;
        let held = cache.current.lock().expect("snapshot lock").clone();
        let _building = match held {
            Some(b) if usable(&b) => return b.2,
            // Only aged: the one in hand serves while the refresher or another caller builds the next.
            Some((built, g, snap)) if g >= generation && serve_aged && self.since(built) < AGED_LIMIT => return snap,
            Some((_, g, snap)) if g >= generation => match cache.building.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::WouldBlock) => return snap,
                Err(TryLockError::Poisoned(e)) => panic!("snapshot builder panicked: {e}"),
            },
            _ => cache.building.lock().expect("snapshot builder lock"),
        };
        // Built by the caller this one waited for.
        if let Some(b) = cache.current.lock().expect("snapshot lock").clone().filter(usable) {
            return b.2;
        }
        let infos = {
            let nodes = self.nodes.read().expect("registry lock");
            nodes
                .iter()
                .filter(|(_, n)| self.healthy(n) && self.resting(n).is_none())
                .filter_map(|(id, n)| {
                    // The cap in force (a schedule's window may change it) over the one registered.
                    let upload = n.plan.as_ref().map_or(n.reg.upload_limit, |p| p.plan.now.cap());
                    Some(NodeInfo {
                        contact: contact(&nodes, id, n)?,
                        coord: n.coord,
                        upload: upload.unwrap_or(DEFAULT_UPLOAD),
                    })
                })
                .collect()
        };
        // Indexing happens outside the registry lock: heartbeats and merges go on meanwhile.
        let snap = Arc::new(Snapshot::new(infos, &self.params));
        *cache.current.lock().expect("snapshot lock") = Some((self.clock.now(), generation, snap.clone()));
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
}

/// Adds self-reported growth to a total that no run of reports can wrap.
pub(crate) fn saturating_add(total: &AtomicU64, n: u64) {
    let _ = total.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_add(n)));
}

#[cfg(test)]
mod tests;
