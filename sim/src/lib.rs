//! fog-sim: a discrete-event simulator of a fogcdn deployment that runs the tracker's real scheduler
//! (`fog_sched::scheduler`), the tracker's real coordinate fitting (`fog_sched::coords`) and the node's
//! real cache policy (`fog_proto::cache::CacheIndex`) at up to 10^6 nodes.
//!
//! What is modelled (see `docs/simulation.md`):
//! - latency: [`world`] — regions, per-host access delay, 15 % detouring pairs;
//! - coordinates: every node fits its Vivaldi coordinate from noisy RTTs to random neighbours, every client
//!   network from RTTs to a few nodes, exactly as the tracker does;
//! - churn: node sessions from a Weibull distribution (shape 0.5, heavy-tailed), exponential off times;
//!   the tracker's snapshot is rebuilt every `snapshot_secs`, so nodes that left since are still scheduled
//!   and cost the client a timeout, as in reality;
//! - nodes: upload caps (1–8 MiB/s) and disk quotas; each node serves its requests one after another at its
//!   upload rate (a fluid FIFO queue: flow-level, no packets);
//! - demand: Zipf(α) popularity, VOD sessions (sequential chunks from a random start) or live channels
//!   (viewers join a few segments behind the newest), clients arriving over time; each session is played by
//!   a [`player`] with a playback buffer, which decides when the next chunk is asked for and measures
//!   startup and rebuffering;
//! - a miss is filled as the node does it: from the peers rendezvous ranks highest among the node's 32
//!   nearest (its overlay neighbourhood), the first of them — the chunk's home — filling through from the
//!   origin if none holds it; the peer's upload carries the fill; busy peers are skipped. Or, with cell
//!   homes ([`homes`]), among the members of the node's cell, so a chunk has one home per cell;
//! - live push: the tracker ingests each new segment once and pushes it through the homes of the cells with
//!   viewers of its channel;
//! - warm start ([`warm`]): caches and client networks' measurements as a long-running deployment has them.

pub mod homes;
pub mod player;
pub mod report;
pub mod warm;
pub mod world;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;

use fog_proto::api::{NodeContact, RttSample, MAX_CLIENT_RTTS, NEIGHBOURHOOD};
use fog_proto::cache::{Admission, CacheIndex};
use fog_proto::placement::{peers_to_ask, weight, PEERS_ASKED};
use fog_proto::{ChunkHash, NodeId};
use fog_sched::coords::{ClientNet, Coord};
use fog_sched::scheduler::{pick, Close, Load, NodeInfo, Params, Snapshot};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::homes::CellHomes;
use crate::player::Player;
use crate::report::{Metrics, Report};
use crate::warm::{ChunkDemand, Placement, Rows, WarmCaches};
use crate::world::{Host, World};

/// Which node-choice policy to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The tracker's scheduler: coordinates, closest nodes, rendezvous, bounded load, hot replicas.
    Coords,
    /// A random healthy node per chunk (the WebTorrent-tracker baseline).
    Random,
    /// A random healthy node in the client's region (geo-DNS/anycast-like baseline).
    Region,
}

/// Where a node sends a miss: which peers are a chunk's homes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Homes {
    /// Rendezvous over the node's own 32 nearest peers (today's overlay): neighbourhoods overlap, so one
    /// region has several homes per chunk.
    Neighbourhood,
    /// Rendezvous over the node's cell of the coordinate grid (`fog_sched::cells`, edge `cell_ms`).
    Grid,
    /// Rendezvous over the nodes of the node's region (as an operator's region label would give).
    Region,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Vod,
    Live,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: usize,
    pub clients: usize,
    /// Chunk requests to simulate.
    pub requests: u64,
    pub seed: u64,
    pub scenario: Scenario,
    pub policy: Policy,
    /// Zipf exponent of content popularity.
    pub alpha: f64,
    pub regions: usize,
    /// Objects (VOD) or channels (live) in the catalogue.
    pub objects: usize,
    pub chunks_per_object: u32,
    pub chunk_bytes: u32,
    /// Playback time of one chunk, seconds.
    pub chunk_secs: f64,
    pub node_disk_bytes: u64,
    /// Mean node session (Weibull scale), seconds; mean offline time, seconds.
    pub session_secs: f64,
    pub offline_secs: f64,
    pub snapshot_secs: f64,
    /// Requests whose pick is compared with the true-closest node (each costs a scan of all nodes).
    pub oracle_samples: u64,
    /// The scheduler's tunables (`close`: how many nearest nodes share a chunk by rendezvous).
    pub params: Params,
    /// Rounds of 16 RTT samples each node's coordinate is fitted from, and RTT samples per client network.
    pub fit_rounds: usize,
    pub client_samples: usize,
    /// Whether a miss's home peer fills the chunk through from the origin (the node's peer protocol); off,
    /// peers serve only what they hold.
    pub fill_through: bool,
    /// Which peers are a chunk's homes, and the grid's edge (ms) for `Homes::Grid`.
    pub homes: Homes,
    pub cell_ms: f32,
    /// Live, with cell homes: the tracker ingests each new segment once and pushes it to the homes of the
    /// cells with viewers of its channel as it is published.
    pub live_push: bool,
    /// The player's buffer target and the media it needs before it starts playing, seconds.
    pub buffer_secs: f64,
    pub startup_secs: f64,
    /// Live: how many segments behind the newest published one a viewer starts (1: the newest).
    pub live_hold_back: u32,
    /// Start from a long-running deployment's state: client networks' measurements and (VOD) caches as
    /// `warm_hours` of the same demand leave them.
    pub warm: bool,
    pub warm_hours: f64,
    /// Reports each client network made before a warm run (each measuring every node of its close set and
    /// the one the tracker wants measured).
    pub warm_reports: usize,
}

impl Config {
    pub fn new(nodes: usize, clients: usize, requests: u64, seed: u64) -> Self {
        Self {
            nodes,
            clients,
            requests,
            seed,
            scenario: Scenario::Vod,
            policy: Policy::Coords,
            alpha: 0.8,
            regions: 16,
            objects: 500,
            chunks_per_object: 60,
            chunk_bytes: 1 << 20,
            chunk_secs: 2.0,
            node_disk_bytes: 2 << 30,
            session_secs: 3600.0,
            offline_secs: 1800.0,
            snapshot_secs: 30.0,
            oracle_samples: 2000,
            params: Params::default(),
            fit_rounds: 20,
            client_samples: 10,
            fill_through: true,
            homes: Homes::Neighbourhood,
            cell_ms: fog_sched::cells::DEFAULT_EDGE_MS,
            live_push: false,
            buffer_secs: 10.0,
            startup_secs: 1.0,
            live_hold_back: 3,
            warm: true,
            warm_hours: 24.0,
            warm_reports: 12,
        }
    }

    /// Chunks one viewing session asks for.
    fn session_chunks(&self) -> u32 {
        match self.scenario {
            Scenario::Vod => 30.min(self.chunks_per_object),
            Scenario::Live => 60,
        }
    }
}

#[derive(Debug)]
struct Node {
    id: NodeId,
    coord: Coord,
    upload: u64,
    online: bool,
    cache: Option<CacheIndex>,
    busy_until: f64,
    served: u64,
    online_since: f64,
    online_secs: f64,
    /// Overlay peers (node indices): the nearest nodes by coordinate, as the tracker's directory lists them;
    /// computed at snapshot `peers_for`.
    peers: Vec<u32>,
    peers_for: Option<u64>,
}

#[derive(Debug)]
struct Client {
    host: Host,
    /// What the tracker knows about this client's network (one client per network here).
    net: ClientNet,
    /// RTTs measured since the last report, and when the next report is due (as the player proxy does).
    unreported: Vec<RttSample>,
    report_at: f64,
    /// The close set, valid while `close_for` is the snapshot's generation and no report came in.
    close: Close,
    close_for: u64,
    session: Session,
}

/// One viewing session: a title (VOD) or channel (live) played from chunk `next` on.
#[derive(Debug)]
struct Session {
    object: u32,
    /// The next chunk to ask for, and how many the session still asks for after it.
    next: u32,
    left: u32,
    player: Player,
    /// Live: when the viewer's player reloads the playlist (every segment duration from this phase).
    playlist_phase: f64,
    /// Live push: the cell the tracker counts the viewer in.
    cell: Option<u32>,
}

/// How often clients report measured RTTs, seconds (the player proxy's report interval).
const REPORT_SECS: f64 = 10.0;
/// Candidates a client measures per request: all it is given (the proxy measures unused ones in the
/// background).
const MEASURED_CANDIDATES: usize = 3;
/// Queued upload, seconds, beyond which a peer is busy for fills.
const PEER_BUSY_SECS: f64 = 1.0;
/// Snapshots (of 30 s) between refreshes of a node's overlay neighbourhood.
const PEER_REFRESH_SNAPSHOTS: u64 = 10;
/// Mean pause between a viewer's sessions, seconds.
const PAUSE_SECS: f64 = 30.0;

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Node goes online (true) or offline (false).
    Churn {
        node: u32,
        online: bool,
    },
    /// The client's player asks for its session's next chunk.
    Fetch {
        client: u32,
    },
    Snapshot,
    /// Live push: segment `segment` of `channel` is published.
    Publish {
        channel: u32,
        segment: u32,
    },
}

/// Time in microseconds, so events order totally and deterministically.
type Micros = u64;

fn micros(secs: f64) -> Micros {
    (secs * 1e6) as Micros
}

/// The id the scheduler sees for node `i`: its index first (so the snapshot's id order is index order and
/// an id maps back to its node without a table), then hash bytes for rendezvous.
fn node_id(i: u32) -> NodeId {
    let mut id = *blake3::hash(&i.to_be_bytes()).as_bytes();
    id[..4].copy_from_slice(&i.to_be_bytes());
    NodeId(id)
}

fn index_of(id: &NodeId) -> usize {
    u32::from_be_bytes([id.0[0], id.0[1], id.0[2], id.0[3]]) as usize
}

/// A chunk hash's first 8 bytes: a key for maps of chunks (collisions are practically impossible).
fn prefix(hash: &ChunkHash) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.0[..8]);
    u64::from_be_bytes(first)
}

fn chunk_hash(object: u32, chunk: u32) -> ChunkHash {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&object.to_be_bytes());
    b[4..].copy_from_slice(&chunk.to_be_bytes());
    ChunkHash(*blake3::hash(&b).as_bytes())
}

/// Weibull draw with shape `k` and the scale that gives mean `mean`.
fn weibull(rng: &mut StdRng, k: f64, mean: f64) -> f64 {
    // Γ(1 + 1/k) for k = 0.5 is Γ(3) = 2.
    let gamma = if (k - 0.5).abs() < 1e-9 { 2.0 } else { 1.0 };
    let scale = mean / gamma;
    scale * (-(rng.gen_range(1e-12..1.0f64)).ln()).powf(1.0 / k)
}

fn exponential(rng: &mut StdRng, mean: f64) -> f64 {
    -mean * rng.gen_range(1e-12..1.0f64).ln()
}

/// Zipf sampler over `n` items by inverse CDF.
#[derive(Debug)]
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, alpha: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|r| {
                acc += 1.0 / (r as f64).powf(alpha);
                acc
            })
            .collect();
        let total = acc;
        cdf.iter_mut().for_each(|c| *c /= total);
        Self { cdf }
    }

    fn sample(&self, rng: &mut StdRng) -> u32 {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1) as u32
    }

    fn probability(&self, item: usize) -> f64 {
        self.cdf[item] - item.checked_sub(1).map_or(0.0, |i| self.cdf[i])
    }
}

/// Hosts in an order that keeps nearby ones together (a Z-order curve over their position), so the nodes a
/// neighbourhood or close set gathers sit close in memory; each gets its index as id.
fn spatially_ordered(mut hosts: Vec<Host>) -> Vec<Host> {
    let spread = |v: u32| {
        let mut v = u64::from(v);
        v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
        v = (v | (v << 8)) & 0x00FF_00FF_00FF_00FF;
        v = (v | (v << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
        v = (v | (v << 2)) & 0x3333_3333_3333_3333;
        (v | (v << 1)) & 0x5555_5555_5555_5555
    };
    let quantise = |x: f32| ((x + 1000.0).max(0.0) * 16.0) as u32;
    hosts.sort_by_key(|h| (spread(quantise(h.pos[0])) | (spread(quantise(h.pos[1])) << 1), h.id));
    for (i, h) in hosts.iter_mut().enumerate() {
        h.id = i as u32;
    }
    hosts
}

/// Fits every node's coordinate from RTTs to neighbours, the way the tracker does from heartbeats: each
/// round a node refits to 16 neighbour samples (5 % measurement noise), half of them peers in its own
/// region (overlay peers are mostly nearby) and half anywhere.
fn fit_nodes(hosts: &[Host], coords: &mut [Coord], by_region: &[Vec<u32>], rng: &mut StdRng, rounds: usize) {
    let n = hosts.len();
    for round in 0..rounds {
        for i in 0..n {
            for s in 0..16 {
                let local = &by_region[hosts[i].region as usize];
                let j = if s % 2 == 0 { local[rng.gen_range(0..local.len())] as usize } else { rng.gen_range(0..n) };
                if i == j {
                    continue;
                }
                let rtt = World::rtt(&hosts[i], &hosts[j]) * (1.0 + rng.gen::<f32>() * 0.05);
                let remote = coords[j];
                coords[i].update(&remote, rtt, 1.0, (round * 16 + s) as u64);
            }
        }
    }
}

#[derive(Debug)]
pub struct Sim {
    cfg: Config,
    rng: StdRng,
    /// Node hosts apart from the nodes: the oracle scans them all.
    hosts: Vec<Host>,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    /// Pending events by (time, sequence): players' fetches apart from the rest (a million nodes' churn), so
    /// that the frequent fetches are popped from a heap small enough to stay in cache.
    events: BinaryHeap<Reverse<(Micros, u64, Event)>>,
    fetches: BinaryHeap<Reverse<(Micros, u64, Event)>>,
    sequence: u64,
    snapshot: Snapshot,
    snapshot_gen: u64,
    load: Load,
    params: Params,
    zipf: Zipf,
    metrics: Metrics,
    origin_per_sec: Vec<u64>,
    warm_caches: Option<WarmCaches>,
    /// With cell homes: the cells and the chunks' home orders in them.
    cell_homes: Option<CellHomes>,
    /// Live push: viewers per (channel, cell), counted from when a viewer picks the channel (ordered, so
    /// pushes go out in the same order every run), and
    /// when each pushed segment has arrived at a node (node, chunk hash's first 8 bytes).
    viewers: BTreeMap<(u32, u32), u32>,
    pushed: HashMap<(u32, u64), f64>,
    /// When construction began (`wall_s` covers it), and wall seconds per phase.
    started: std::time::Instant,
    phases: Vec<(&'static str, f64)>,
}

impl Sim {
    pub fn new(cfg: Config) -> Self {
        let started = std::time::Instant::now();
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let world = World::new(cfg.regions, &mut rng);
        let hosts = spatially_ordered((0..cfg.nodes as u32).map(|i| world.host(i, &mut rng)).collect());
        let mut by_region: Vec<Vec<u32>> = vec![Vec::new(); cfg.regions];
        for (i, h) in hosts.iter().enumerate() {
            by_region[h.region as usize].push(i as u32);
        }
        let mut coords = vec![Coord::default(); cfg.nodes];
        fit_nodes(&hosts, &mut coords, &by_region, &mut rng, cfg.fit_rounds);
        let nodes: Vec<Node> = coords
            .into_iter()
            .enumerate()
            .map(|(i, coord)| Node {
                id: node_id(i as u32),
                coord,
                upload: rng.gen_range(1..=8u64) << 20,
                online: false,
                cache: None,
                busy_until: 0.0,
                served: 0,
                online_since: 0.0,
                online_secs: 0.0,
                peers: Vec::new(),
                peers_for: None,
            })
            .collect();
        let clients: Vec<Client> = (0..cfg.clients as u32)
            .map(|c| {
                let host = world.host(cfg.nodes as u32 + c, &mut rng);
                // The client network's RTTs to nodes it was sent to before (5 % noise): mostly in its own
                // region, as a first schedule from the default pool or a region guess would give.
                let local = &by_region[host.region as usize];
                let samples: Vec<RttSample> = (0..cfg.client_samples)
                    .map(|s| {
                        let j = if s * 10 < cfg.client_samples * 7 && !local.is_empty() {
                            local[rng.gen_range(0..local.len())] as usize
                        } else {
                            rng.gen_range(0..nodes.len())
                        };
                        let rtt_ms = World::rtt(&host, &hosts[j]) * (1.0 + rng.gen::<f32>() * 0.05);
                        RttSample { peer: nodes[j].id, rtt_ms }
                    })
                    .collect();
                let mut net = ClientNet::default();
                net.learn(&samples, |id| Some(nodes[index_of(id)].coord), u64::from(c));
                Client {
                    host,
                    net,
                    unreported: Vec::new(),
                    report_at: 0.0,
                    close: Close::default(),
                    close_for: u64::MAX,
                    // Replaced by the client's first session in `start`.
                    session: Session {
                        object: 0,
                        next: 0,
                        left: 0,
                        player: Player::new(0.0, cfg.chunk_secs, cfg.buffer_secs, cfg.startup_secs),
                        playlist_phase: 0.0,
                        cell: None,
                    },
                }
            })
            .collect();
        let zipf = Zipf::new(cfg.objects, cfg.alpha);
        let params = cfg.params;
        let cell_homes = (cfg.homes != Homes::Neighbourhood).then(|| {
            let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
            let coords: Vec<Coord> = nodes.iter().map(|n| n.coord).collect();
            let regions: Vec<u16> = hosts.iter().map(|h| h.region).collect();
            CellHomes::new(&ids, &coords, (cfg.homes == Homes::Region).then_some(&regions[..]), cfg.cell_ms)
        });
        let mut sim = Self {
            rng,
            hosts,
            nodes,
            clients,
            events: BinaryHeap::new(),
            fetches: BinaryHeap::new(),
            sequence: 0,
            snapshot: Snapshot::default(),
            snapshot_gen: 0,
            load: Load::default(),
            params,
            zipf,
            metrics: Metrics::default(),
            origin_per_sec: Vec::new(),
            warm_caches: None,
            cell_homes,
            viewers: BTreeMap::new(),
            pushed: HashMap::new(),
            started,
            phases: vec![("fit", started.elapsed().as_secs_f64())],
            cfg,
        };
        sim.start();
        sim
    }

    /// Records the wall time since the last phase ended as `phase`'s.
    fn phase_done(&mut self, phase: &'static str) {
        let before: f64 = self.phases.iter().map(|p| p.1).sum();
        self.phases.push((phase, self.started.elapsed().as_secs_f64() - before));
    }

    fn push(&mut self, at: f64, event: Event) {
        self.sequence += 1;
        let heap = if matches!(event, Event::Fetch { .. }) { &mut self.fetches } else { &mut self.events };
        heap.push(Reverse((micros(at), self.sequence, event)));
    }

    /// Initial node states (each online with its long-run probability), the first snapshot, the warm start
    /// and client arrivals.
    fn start(&mut self) {
        let on_share = self.cfg.session_secs / (self.cfg.session_secs + self.cfg.offline_secs);
        for i in 0..self.nodes.len() as u32 {
            let online = self.rng.gen_bool(on_share);
            let node = &mut self.nodes[i as usize];
            node.online = online;
            if online || self.cfg.warm {
                // A warm deployment's offline nodes have caches too.
                node.cache = Some(CacheIndex::new(self.cfg.node_disk_bytes));
            }
            let next = if online {
                weibull(&mut self.rng, 0.5, self.cfg.session_secs)
            } else {
                exponential(&mut self.rng, self.cfg.offline_secs)
            };
            self.push(next, Event::Churn { node: i, online: !online });
        }
        self.rebuild_snapshot();
        self.push(self.cfg.snapshot_secs, Event::Snapshot);
        if self.pushing() {
            for channel in 0..self.cfg.objects as u32 {
                self.push(self.cfg.chunk_secs, Event::Publish { channel, segment: 0 });
            }
        }
        if self.cfg.warm {
            self.warm_start();
        }
        // Clients arrive over the length of one session, then watch session after session (with pauses)
        // until the run's requests are done.
        let arrivals = f64::from(self.cfg.session_chunks()) * self.cfg.chunk_secs;
        for client in 0..self.cfg.clients as u32 {
            let at = self.rng.gen::<f64>() * arrivals;
            self.new_session(client, at);
        }
    }

    /// Client networks' measurements as after a while of playing, and (VOD) the caches' content.
    fn warm_start(&mut self) {
        if self.cfg.policy == Policy::Coords {
            let (snapshot, hosts, nodes, params) = (&self.snapshot, &self.hosts, &self.nodes, &self.params);
            let (reports, seed, generation) = (self.cfg.warm_reports, self.cfg.seed, self.snapshot_gen);
            // Client networks are independent: fit them on all cores, each from a random stream of its own.
            let warm_up = |first: usize, clients: &mut [Client]| {
                for (c, client) in (first..).zip(clients) {
                    let mut rng = StdRng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    for round in 0..reports {
                        let close = snapshot.close_set(Some(&client.net), params);
                        let mut samples = Vec::new();
                        for &i in close.nodes.iter().chain(&close.explore) {
                            let n = index_of(&snapshot.nodes[i as usize].contact.id);
                            let rtt = World::rtt(&client.host, &hosts[n]) * (1.0 + rng.gen::<f32>() * 0.05);
                            RttSample::record(&mut samples, nodes[n].id, rtt, MAX_CLIENT_RTTS);
                        }
                        let seed = (c * reports + round) as u64;
                        client.net.learn(&samples, |id| Some(nodes[index_of(id)].coord), seed);
                    }
                    // The run starts with this close set.
                    client.close = snapshot.close_set(Some(&client.net), params);
                    client.close_for = generation;
                }
            };
            let threads = std::thread::available_parallelism().map_or(1, usize::from);
            let per_thread = self.clients.len().div_ceil(threads).max(1);
            std::thread::scope(|scope| {
                for (t, clients) in self.clients.chunks_mut(per_thread).enumerate() {
                    scope.spawn(move || warm_up(t * per_thread, clients));
                }
            });
            self.phase_done("warm_measurements");
        }
        if self.cfg.scenario == Scenario::Vod {
            self.warm_caches = Some(self.warm_caches());
        }
    }

    /// The warm caches, from neighbourhoods with every node online, client networks' near sets and the
    /// demand per chunk.
    fn warm_caches(&mut self) -> WarmCaches {
        let everyone = Snapshot::new(
            self.nodes
                .iter()
                .map(|n| NodeInfo {
                    contact: NodeContact::direct(n.id, SocketAddr::from(([0, 0, 0, 0], 0))),
                    coord: n.coord,
                    upload: n.upload,
                })
                .collect(),
            &self.params,
        );
        let mut placement = Placement::default();
        let (nodes, params) = (&self.nodes, &self.params);
        let hoods = |first: usize, count: usize| {
            let mut hoods = Rows::default();
            for (n, node) in nodes.iter().enumerate().skip(first).take(count) {
                // As `peers_asked` builds a node's neighbourhood.
                let near = everyone.nearest(&node.coord, NEIGHBOURHOOD + 1, params);
                let peers = near.into_iter().map(|i| index_of(&everyone.nodes[i as usize].contact.id) as u32);
                hoods.push(peers.filter(|&p| p as usize != n).take(NEIGHBOURHOOD));
            }
            hoods
        };
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        // With cell homes neighbourhoods play no part.
        let per_thread = if self.cell_homes.is_some() { 0 } else { nodes.len().div_ceil(threads).max(1) };
        let parts: Vec<Rows> = std::thread::scope(|scope| {
            let handles: Vec<_> =
                (0..threads).map(|t| scope.spawn(move || hoods(t * per_thread, per_thread))).collect();
            handles.into_iter().map(|h| h.join().expect("neighbourhood thread")).collect()
        });
        for row in parts.iter().flat_map(Rows::rows) {
            placement.hoods.push(row.iter().copied());
        }
        placement.cells = self.cell_homes.as_ref().map(|c| (0..nodes.len()).map(|n| c.cell(n)).collect());
        drop(everyone);
        self.phase_done("warm_neighbourhoods");
        if self.cfg.policy == Policy::Coords {
            for client in &self.clients {
                let close = &client.close;
                let nodes = close.nodes[..close.near].iter();
                placement.near.push(nodes.map(|&i| index_of(&self.snapshot.nodes[i as usize].contact.id) as u32));
                placement.place.push(close.place as u8);
            }
        }
        // Requests per second of each chunk: a client starts a session every session plus pause; a session
        // starts anywhere its chunks fit in the title.
        let chunks = self.cfg.session_chunks();
        let sessions_per_sec = self.cfg.clients as f64 / (f64::from(chunks) * self.cfg.chunk_secs + PAUSE_SECS);
        let starts = self.cfg.chunks_per_object.saturating_sub(chunks).max(1);
        let span = |j: u32| (0..starts).filter(|&s| s <= j && j < s + chunks).count() as f64;
        // The scheduler's request count of a chunk is a decayed sum: at rate λ it holds about λ × half-life / ln 2.
        let window = self.params.half_life_ms as f64 / 1000.0 / std::f64::consts::LN_2;
        let demand: Vec<ChunkDemand> = (0..self.cfg.objects)
            .flat_map(|o| (0..self.cfg.chunks_per_object).map(move |j| (o, j)))
            .map(|(o, j)| {
                let rate = sessions_per_sec * self.zipf.probability(o) * span(j) / f64::from(starts);
                let replicas = (1.0 + rate * window / self.params.hot_requests).floor().min(255.0) as u8;
                ChunkDemand { rate, replicas }
            })
            .collect();
        let disk_chunks = (self.cfg.node_disk_bytes / u64::from(self.cfg.chunk_bytes)) as u32;
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        let per_object = self.cfg.chunks_per_object as usize;
        let hash_of = |key: usize| chunk_hash((key / per_object) as u32, (key % per_object) as u32);
        let horizon = self.cfg.warm_hours * 3600.0;
        let cell_homes = &mut self.cell_homes;
        let is_home = |h: usize, hash: &ChunkHash| cell_homes.as_mut().is_some_and(|c| c.home(h, hash) == h);
        let warm = WarmCaches::new(
            placement,
            demand,
            self.cfg.clients,
            horizon,
            disk_chunks,
            &ids,
            hash_of,
            is_home,
            &mut self.rng,
        );
        self.phase_done("warm_caches");
        warm
    }

    fn new_session(&mut self, client: u32, at: f64) {
        let object = self.zipf.sample(&mut self.rng);
        let chunks = self.cfg.session_chunks();
        let d = self.cfg.chunk_secs;
        let (first, fetch_at) = match self.cfg.scenario {
            Scenario::Vod => (self.rng.gen_range(0..self.cfg.chunks_per_object.saturating_sub(chunks).max(1)), at),
            // Segment k is published when its media has been produced, at (k + 1) × d; the player loads the
            // playlist and starts `live_hold_back` segments behind the newest it lists.
            Scenario::Live => {
                let newest = (at / d).floor() as i64 - 1;
                let first = (newest + 1 - i64::from(self.cfg.live_hold_back.max(1))).max(0) as u32;
                (first, at.max(f64::from(first + 1) * d))
            }
        };
        let startup = self.cfg.startup_secs.min(f64::from(chunks) * d);
        let cell = self.viewer_cell(client);
        if let Some(cell) = cell {
            *self.viewers.entry((object, cell)).or_default() += 1;
        }
        self.clients[client as usize].session = Session {
            object,
            next: first,
            left: chunks,
            player: Player::new(at, d, self.cfg.buffer_secs, startup),
            playlist_phase: at,
            cell,
        };
        self.push(fetch_at, Event::Fetch { client });
    }

    /// The player asks for its session's next chunk; when it has arrived, the player asks for the one after
    /// as its buffer allows, or the session ends when its media has played out.
    fn fetch(&mut self, now: f64, client: u32) {
        let (object, chunk) = {
            let s = &self.clients[client as usize].session;
            (s.object, s.next)
        };
        let secs = self.deliver(now, client, object, chunk);
        let at = now + secs;
        let d = self.cfg.chunk_secs;
        let steady = self.metrics.steady;
        let s = &mut self.clients[client as usize].session;
        let first = s.player.is_new();
        let arrival = s.player.arrived(at);
        if steady {
            self.metrics.chunk(first, secs, d, &arrival);
        }
        s.next += 1;
        s.left -= 1;
        if s.left > 0 {
            let mut next = s.player.next_request(at);
            if self.cfg.scenario == Scenario::Live {
                // A segment can be asked for once a playlist reload has listed it.
                let listed = f64::from(s.next + 1) * d;
                let reloads = ((listed - s.playlist_phase) / d).ceil().max(0.0);
                next = next.max(s.playlist_phase + reloads * d);
            }
            self.push(next, Event::Fetch { client });
        } else {
            let end = s.player.playback_end().unwrap_or(at);
            if steady && self.cfg.scenario == Scenario::Live {
                // How far playback ended behind the live edge: the last segment's media ended at next × d.
                self.metrics.live_latency(end - f64::from(s.next) * d);
            }
            if let Some(cell) = s.cell {
                let key = (s.object, cell);
                if let Some(count) = self.viewers.get_mut(&key) {
                    *count -= 1;
                    if *count == 0 {
                        self.viewers.remove(&key);
                    }
                }
            }
            let pause = exponential(&mut self.rng, PAUSE_SECS);
            self.new_session(client, end + pause);
        }
    }

    fn rebuild_snapshot(&mut self) {
        let infos: Vec<NodeInfo> = self
            .nodes
            .iter()
            .filter(|n| n.online)
            .map(|n| NodeInfo {
                contact: NodeContact::direct(n.id, SocketAddr::from(([0, 0, 0, 0], 0))),
                coord: n.coord,
                upload: n.upload,
            })
            .collect();
        self.snapshot = Snapshot::new(infos, &self.params);
        self.snapshot_gen += 1;
        self.load.forget_nodes_not_in(&self.snapshot);
    }

    /// Candidates (node indices) for one chunk under the configured policy.
    fn candidates(&mut self, client: u32, chunk: &ChunkHash, now: f64) -> Vec<usize> {
        let snap_len = self.snapshot.nodes.len();
        if snap_len == 0 {
            return Vec::new();
        }
        let to_node = |s: &Snapshot, i: u32| index_of(&s.nodes[i as usize].contact.id);
        match self.cfg.policy {
            Policy::Coords => {
                let c = &mut self.clients[client as usize];
                if now >= c.report_at && !c.unreported.is_empty() {
                    let nodes = &self.nodes;
                    c.net.learn(&c.unreported, |id| Some(nodes[index_of(id)].coord), micros(now));
                    c.unreported.clear();
                    c.report_at = now + REPORT_SECS;
                    c.close_for = u64::MAX;
                }
                if c.close_for != self.snapshot_gen {
                    c.close = self.snapshot.close_set(Some(&c.net), &self.params);
                    c.close_for = self.snapshot_gen;
                }
                let len = u64::from(self.cfg.chunk_bytes);
                pick(&self.snapshot, &mut self.load, &c.close, chunk, len, true, &self.params, micros(now) / 1000)
                    .into_iter()
                    .map(|i| to_node(&self.snapshot, i))
                    .collect()
            }
            Policy::Random => {
                (0..self.params.k).map(|_| to_node(&self.snapshot, self.rng.gen_range(0..snap_len as u32))).collect()
            }
            Policy::Region => {
                let region = self.clients[client as usize].host.region;
                let mut out = Vec::new();
                for _ in 0..64 {
                    let i = to_node(&self.snapshot, self.rng.gen_range(0..snap_len as u32));
                    if self.hosts[i].region == region {
                        out.push(i);
                        if out.len() == self.params.k {
                            break;
                        }
                    }
                }
                out
            }
        }
    }

    /// Serves one chunk request; returns the seconds until the chunk has arrived at the client.
    fn deliver(&mut self, now: f64, client: u32, object: u32, chunk: u32) -> f64 {
        let hash = chunk_hash(object, chunk);
        let key = object as usize * self.cfg.chunks_per_object as usize + chunk as usize;
        let len = self.cfg.chunk_bytes;
        let candidates = self.candidates(client, &hash, now);
        // Oracle samples are spread over the steady-state half, like offload.
        let every = (self.cfg.requests / 2 / self.cfg.oracle_samples.max(1)).max(1);
        self.metrics.requests += 1;
        if !self.metrics.steady && self.metrics.requests > self.cfg.requests / 2 {
            self.metrics.steady = true;
            self.metrics.steady_from = now;
        }
        let sample_oracle =
            self.cfg.oracle_samples > 0 && self.metrics.steady && self.metrics.requests.is_multiple_of(every);
        let chost = self.clients[client as usize].host;
        if sample_oracle {
            if let Some(&first_pick) = candidates.first() {
                let picked = World::rtt(&chost, &self.hosts[first_pick]);
                let best = self
                    .nodes
                    .iter()
                    .zip(&self.hosts)
                    .filter(|(n, _)| n.online)
                    .map(|(_, h)| World::rtt(&chost, h))
                    .fold(f32::INFINITY, f32::min);
                self.metrics.closest_error(picked, best);
            }
        }
        let mut delay = 0.0;
        let mut served_by = None;
        for &n in &candidates {
            if self.nodes[n].online {
                served_by = Some(n);
                break;
            }
            // Gone since the snapshot: the client waits out its first-byte timeout (2 s).
            delay += 2.0;
            self.metrics.failed_attempts += 1;
        }
        let reached: Vec<usize> =
            candidates.iter().copied().filter(|&c| self.nodes[c].online).take(MEASURED_CANDIDATES).collect();
        for c in reached {
            self.observe_rtt(client, c);
        }
        let Some(n) = served_by else {
            // No node: the origin serves the client directly.
            self.metrics.origin_bytes += u64::from(len);
            self.metrics.delivered(u64::from(len), u64::from(len));
            self.count_origin(now, u64::from(len));
            let rtt = 2.0 * (chost.access as f64 + 30.0) / 1000.0;
            return delay + rtt + f64::from(len) / (8.0 * 1024.0 * 1024.0);
        };
        // Hit, else fill as the node does: the live peers rendezvous ranks highest for the chunk, the first of
        // them filling through from the origin if none has it; then the node's cache admits it.
        let hit = self.nodes[n].cache.as_mut().is_some_and(|c| c.touch(&hash)) || self.warm_hit(n, key, &hash);
        let (mut from_origin, mut filled_at) = (0, if hit { self.ready_at(n, &hash, now) } else { now });
        if !hit {
            let (asked, own_home) = self.peers_asked(n, &hash, now);
            let holder = asked.iter().copied().find(|&p| self.holds(p, key, &hash));
            // A node that is the chunk's home itself fetches it from the origin.
            let home = asked.first().copied().filter(|_| self.cfg.fill_through && !own_home);
            if holder.is_none() {
                self.metrics.origin_fill_bytes += u64::from(len);
                from_origin = u64::from(len);
                self.count_origin(now, u64::from(len));
            }
            if let Some(p) = holder.or(home) {
                // The peer uploads the chunk to the node, which serves it once it has arrived.
                self.metrics.peer_fill_bytes += u64::from(len);
                self.nodes[p].served += u64::from(len);
                // The peer sends once it has the chunk (a pushed segment may still be on its way); the request
                // to it and the last byte back cost a round trip between them.
                let start = self.nodes[p].busy_until.max(now);
                let start = if holder == Some(p) { start.max(self.ready_at(p, &hash, now)) } else { start };
                let peer = &mut self.nodes[p];
                peer.busy_until = start + f64::from(len) / peer.upload as f64;
                filled_at = peer.busy_until + f64::from(World::rtt(&self.hosts[n], &self.hosts[p])) / 1000.0;
            }
            for m in home.filter(|_| holder.is_none()).into_iter().chain([n]) {
                self.admit(m, hash);
            }
        }
        self.metrics.fog_bytes += u64::from(len);
        self.metrics.delivered(u64::from(len), from_origin);
        let node = &mut self.nodes[n];
        let rtt = f64::from(World::rtt(&chost, &self.hosts[n])) / 1000.0;
        // The node's upload is work-conserving: it serves others while this transfer waits for its fill or
        // for the client (still timing out on departed candidates), so the wait does not hold up its queue.
        let transfer = f64::from(len) / node.upload as f64;
        node.busy_until = node.busy_until.max(now) + transfer;
        node.served += u64::from(len);
        let done = node.busy_until.max((now + delay).max(filled_at) + transfer);
        done - now + rtt
    }

    /// Whether node `m` holds the chunk (`key`, `hash`).
    fn holds(&mut self, m: usize, key: usize, hash: &ChunkHash) -> bool {
        self.nodes[m].cache.as_ref().is_some_and(|c| c.contains(hash)) || self.warm_hit(m, key, hash)
    }

    /// Whether node `m` has held the chunk since the warm start, the first time the run asks (it is then
    /// indexed; later questions are the cache index's).
    fn warm_hit(&mut self, m: usize, key: usize, hash: &ChunkHash) -> bool {
        let Some(warm) = self.warm_caches.as_mut() else { return false };
        let (nodes, cell_homes) = (&self.nodes, &mut self.cell_homes);
        let is_home = || cell_homes.as_mut().is_some_and(|c| c.home(m, hash) == m);
        if nodes[m].cache.is_none() || !warm.holds(m, key, hash, |p| weight(hash, &nodes[p as usize].id), is_home) {
            return false;
        }
        warm.decided(m);
        self.index(m, *hash);
        true
    }

    /// Node `m` stores a chunk it filled.
    fn admit(&mut self, m: usize, hash: ChunkHash) {
        let disk_chunks = (self.cfg.node_disk_bytes / u64::from(self.cfg.chunk_bytes)) as u32;
        let Some(cache) = self.nodes[m].cache.as_mut() else { return };
        if let Some(warm) = self.warm_caches.as_mut() {
            warm.make_room(m, cache.len(), disk_chunks);
        }
        self.index(m, hash);
    }

    /// Enters a chunk into node `m`'s cache index. The simulator keeps no chunk bytes: evicting is forgetting,
    /// done by the index itself; the warm start is told, so a chunk it placed does not come back.
    fn index(&mut self, m: usize, hash: ChunkHash) {
        let Some(cache) = self.nodes[m].cache.as_mut() else { return };
        match cache.admit(hash, u64::from(self.cfg.chunk_bytes)) {
            Admission::TooLarge => self.metrics.too_large += 1,
            Admission::Admit { evict } => {
                if let Some(warm) = self.warm_caches.as_mut() {
                    warm.evicted(m, evict);
                }
            }
            Admission::Present => {}
        }
    }

    /// The online peers node `n` asks for `hash`, best first, and whether `n` is the chunk's home itself.
    /// Neighbourhood homes: ranked as the node ranks them ([`peers_to_ask`] over its live overlay peers, the
    /// node's `Overlay::fetch`; `n` is never its own home). Cell homes: the first available members of `n`'s
    /// cell in the chunk's home order ([`fog_sched::cells::home_order`]).
    fn peers_asked(&mut self, n: usize, hash: &ChunkHash, now: f64) -> (Vec<usize>, bool) {
        // A peer with more than a second of upload queued answers busy or late, and the node leaves it out of
        // its neighbourhood for a while (the node's `Overlay::rest`): modelled as skipping it while queued.
        let busy = |p: &Node| p.busy_until - now > PEER_BUSY_SECS;
        if let Some(cells) = self.cell_homes.as_mut() {
            let nodes = &self.nodes;
            let available = |p: usize| p == n || (nodes[p].online && !busy(&nodes[p]));
            let order = cells.order(cells.cell(n), hash, available, PEERS_ASKED + 1);
            let own_home = order.first() == Some(&n);
            return (order.into_iter().filter(|&p| p != n).take(PEERS_ASKED).collect(), own_home);
        }
        // Overlay neighbourhoods change slowly (peers are kept while connected): refresh every few snapshots.
        if self.nodes[n].peers_for.is_none_or(|at| self.snapshot_gen - at >= PEER_REFRESH_SNAPSHOTS) {
            let snap = &self.snapshot;
            let near = snap.nearest(&self.nodes[n].coord, NEIGHBOURHOOD + 1, &self.params);
            let peers = near.into_iter().map(|i| index_of(&snap.nodes[i as usize].contact.id) as u32);
            let node = &mut self.nodes[n];
            node.peers = peers.filter(|&p| p as usize != n).take(NEIGHBOURHOOD).collect();
            node.peers_for = Some(self.snapshot_gen);
        }
        let live: Vec<usize> = self.nodes[n]
            .peers
            .iter()
            .map(|&p| p as usize)
            .filter(|&p| self.nodes[p].online && !busy(&self.nodes[p]))
            .collect();
        let ids: Vec<NodeId> = live.iter().map(|&p| self.nodes[p].id).collect();
        (peers_to_ask(hash, &ids).into_iter().map(|i| live[i]).collect(), false)
    }

    /// The client measured its RTT to node `n` (a QUIC handshake; 5 % noise); its next report carries it.
    fn observe_rtt(&mut self, client: u32, n: usize) {
        let c = &mut self.clients[client as usize];
        let measured = World::rtt(&c.host, &self.hosts[n]) * (1.0 + self.rng.gen::<f32>() * 0.05);
        RttSample::record(&mut c.unreported, self.nodes[n].id, measured, MAX_CLIENT_RTTS);
    }

    /// Whether live segments are pushed (live, with cell homes to push to).
    fn pushing(&self) -> bool {
        self.cfg.live_push && self.cfg.scenario == Scenario::Live && self.cell_homes.is_some()
    }

    /// The cell the tracker counts a viewer in for live push: its network's region (region cells) or the grid
    /// cell of its network's coordinate, if a node is in it.
    fn viewer_cell(&self, client: u32) -> Option<u32> {
        let cells = self.cell_homes.as_ref().filter(|_| self.pushing())?;
        let c = &self.clients[client as usize];
        cells.cell_at(c.net.coord.as_ref()?, c.host.region, client as usize)
    }

    /// When node `m` has the chunk it holds: a pushed segment may still be on its way.
    fn ready_at(&self, m: usize, hash: &ChunkHash, now: f64) -> f64 {
        self.pushed.get(&(m as u32, prefix(hash))).map_or(now, |&at| at.max(now))
    }

    /// Live push: the new segment leaves the origin once, for one cell's home (the tracker's ingest); every
    /// home that has it passes it on to two more (a binary tree on the homes' uploads, the fastest
    /// uploads nearest the root, as the tracker knows them). A home is the first member of a cell with
    /// viewers of the channel in the segment's home order that is online and not busy, as for a miss; a cell
    /// without one is left out.
    fn publish(&mut self, now: f64, channel: u32, segment: u32) {
        let cells: Vec<u32> = self.viewers.range((channel, 0)..=(channel, u32::MAX)).map(|(&(_, c), _)| c).collect();
        if cells.is_empty() {
            return;
        }
        let (hash, len) = (chunk_hash(channel, segment), self.cfg.chunk_bytes);
        self.metrics.ingested(u64::from(len));
        self.count_origin(now, u64::from(len));
        let Some(homes) = self.cell_homes.as_mut() else { return };
        let nodes = &self.nodes;
        let available = |p: usize| nodes[p].online && nodes[p].busy_until - now <= PEER_BUSY_SECS;
        let mut targets: Vec<usize> =
            cells.into_iter().filter_map(|c| homes.order(c, &hash, available, 1).first().copied()).collect();
        targets.sort_by_key(|&t| Reverse(nodes[t].upload));
        let mut ready: Vec<f64> = Vec::with_capacity(targets.len());
        for (i, &t) in targets.iter().enumerate() {
            let at = if i == 0 {
                // The first home fetches it from the origin on the tracker's word: an origin fetch costs no
                // time in this model beyond a round trip of the home's access link.
                now + 2.0 * f64::from(self.hosts[t].access) / 1000.0
            } else {
                let (from, from_ready) = (targets[(i - 1) / 2], ready[(i - 1) / 2]);
                let sender = &mut self.nodes[from];
                sender.busy_until = sender.busy_until.max(from_ready) + f64::from(len) / sender.upload as f64;
                sender.served += u64::from(len);
                self.metrics.peer_fill_bytes += u64::from(len);
                sender.busy_until + f64::from(World::rtt(&self.hosts[from], &self.hosts[t])) / 1000.0
            };
            ready.push(at);
            self.admit(t, hash);
            self.pushed.insert((t as u32, prefix(&hash)), at);
        }
    }

    fn count_origin(&mut self, now: f64, bytes: u64) {
        let sec = now as usize;
        if self.origin_per_sec.len() <= sec {
            self.origin_per_sec.resize(sec + 1, 0);
        }
        self.origin_per_sec[sec] += bytes;
    }

    fn churn(&mut self, now: f64, node: u32, online: bool) {
        let n = &mut self.nodes[node as usize];
        n.online = online;
        if online {
            n.online_since = now;
            // Volunteers' disks keep their cache across sessions.
            n.cache.get_or_insert_with(|| CacheIndex::new(self.cfg.node_disk_bytes));
        } else {
            n.online_secs += now - n.online_since;
        }
        let next = if online {
            weibull(&mut self.rng, 0.5, self.cfg.session_secs)
        } else {
            exponential(&mut self.rng, self.cfg.offline_secs)
        };
        self.push(now + next, Event::Churn { node, online: !online });
    }

    /// Runs until every request was served; returns the metrics.
    pub fn run(mut self) -> Report {
        let mut now = 0.0;
        while self.metrics.requests < self.cfg.requests {
            let heap = match (self.events.peek(), self.fetches.peek()) {
                // Reversed: the greater is the earlier.
                (Some(e), Some(f)) if f > e => &mut self.fetches,
                (None, _) => &mut self.fetches,
                _ => &mut self.events,
            };
            let Some(Reverse((at, _, event))) = heap.pop() else { break };
            now = at as f64 / 1e6;
            match event {
                Event::Snapshot => {
                    self.rebuild_snapshot();
                    self.push(now + self.cfg.snapshot_secs, Event::Snapshot);
                }
                Event::Churn { node, online } => self.churn(now, node, online),
                Event::Fetch { client } => self.fetch(now, client),
                Event::Publish { channel, segment } => {
                    self.publish(now, channel, segment);
                    self.push(now + self.cfg.chunk_secs, Event::Publish { channel, segment: segment + 1 });
                }
            }
        }
        for n in self.nodes.iter_mut().filter(|n| n.online) {
            n.online_secs += now - n.online_since;
        }
        let loads: Vec<f64> = self
            .nodes
            .iter()
            .filter(|n| n.online_secs > 0.5 * now && n.served > 0)
            .map(|n| n.served as f64 / (n.upload as f64 * n.online_secs))
            .collect();
        self.phase_done("run");
        let share = self.warm_caches.as_ref().map(|w| w.share);
        self.metrics.finish(&self.cfg, now, &self.origin_per_sec, &loads, share, self.phases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(policy: Policy, seed: u64) -> Report {
        let mut cfg = Config::new(2_000, 400, 40_000, seed);
        cfg.policy = policy;
        cfg.objects = 50;
        cfg.oracle_samples = 200;
        Sim::new(cfg).run()
    }

    #[test]
    fn runs_are_deterministic_for_a_seed() {
        let (a, b) = (small(Policy::Coords, 7), small(Policy::Coords, 7));
        let strip = |r: &Report| {
            let mut v = serde_json::to_value(r).expect("json");
            v["wall_s"] = serde_json::Value::Null;
            v["wall_phases_s"] = serde_json::Value::Null;
            v
        };
        assert_eq!(strip(&a), strip(&b));
        assert_eq!(a.requests, 40_000);
        assert_ne!(strip(&a), strip(&small(Policy::Coords, 8)), "the seed changes nothing");
    }

    #[test]
    fn a_warm_start_measures_more_offload_than_a_cold_one() {
        let run = |warm| {
            let mut cfg = Config::new(2_000, 400, 40_000, 5);
            cfg.objects = 50;
            cfg.oracle_samples = 0;
            cfg.warm = warm;
            Sim::new(cfg).run()
        };
        let (warm, cold) = (run(true), run(false));
        assert!(
            warm.offload_ratio > cold.offload_ratio + 0.05,
            "warm {} cold {}",
            warm.offload_ratio,
            cold.offload_ratio
        );
        assert!(warm.warm_cache_share.is_some_and(|s| s > 0.0) && cold.warm_cache_share.is_none());
        assert!(warm.startup_ms_p50 > 0.0 && warm.rebuffer_ratio < 0.05);
    }

    #[test]
    fn live_viewers_play_the_hold_back_behind_the_newest_segment() {
        let run = |hold_back| {
            let mut cfg = Config::new(2_000, 400, 40_000, 9);
            cfg.scenario = Scenario::Live;
            cfg.objects = 10;
            cfg.oracle_samples = 0;
            cfg.live_hold_back = hold_back;
            Sim::new(cfg).run()
        };
        for hold_back in [1, 3] {
            let r = run(hold_back);
            let latency = r.live_latency_ms_p50.expect("live latency") / 1000.0;
            // Joining up to one segment after the newest was published, plus the startup.
            let least = f64::from(hold_back) * 2.0;
            assert!((least..least + 2.0 + 3.0).contains(&latency), "hold-back {hold_back}: {latency} s behind");
        }
    }

    #[test]
    fn region_homes_fetch_from_the_origin_less_than_neighbourhood_homes() {
        let run = |homes| {
            let mut cfg = Config::new(2_000, 400, 40_000, 11);
            cfg.objects = 50;
            cfg.oracle_samples = 0;
            cfg.warm = false;
            cfg.homes = homes;
            Sim::new(cfg).run()
        };
        let (cells, hoods) = (run(Homes::Region), run(Homes::Neighbourhood));
        assert!(
            cells.offload_ratio > hoods.offload_ratio + 0.05,
            "region homes {} neighbourhood homes {}",
            cells.offload_ratio,
            hoods.offload_ratio
        );
    }

    #[test]
    fn pushing_live_segments_to_cell_homes_takes_load_off_the_origin() {
        let run = |push| {
            let mut cfg = Config::new(2_000, 400, 40_000, 13);
            cfg.scenario = Scenario::Live;
            cfg.objects = 20;
            cfg.oracle_samples = 0;
            cfg.homes = Homes::Region;
            cfg.live_push = push;
            Sim::new(cfg).run()
        };
        let (pushed, pulled) = (run(true), run(false));
        let strip = |r: &Report| {
            let mut v = serde_json::to_value(r).expect("json");
            v["wall_s"] = serde_json::Value::Null;
            v["wall_phases_s"] = serde_json::Value::Null;
            v
        };
        assert_eq!(strip(&pushed), strip(&run(true)), "deterministic with cells and push");
        assert!(
            pushed.offload_ratio > pulled.offload_ratio + 0.05,
            "pushed {} pulled {}",
            pushed.offload_ratio,
            pulled.offload_ratio
        );
        assert!(pushed.origin_egress_p95_bps < pulled.origin_egress_p95_bps);
    }

    #[test]
    fn the_scheduler_beats_random_nodes_on_distance_and_offload_is_measured() {
        let (ours, random) = (small(Policy::Coords, 3), small(Policy::Random, 3));
        assert!(
            ours.closest_error_ms_p50 < random.closest_error_ms_p50 / 2.0,
            "coordinates {} ms vs random {} ms",
            ours.closest_error_ms_p50,
            random.closest_error_ms_p50
        );
        assert!((0.0..=1.0).contains(&ours.offload_ratio) && ours.offload_ratio > 0.0);
    }
}
