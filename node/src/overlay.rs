//! The libp2p overlay: nodes find each other (tracker bootstrap, identify, Kademlia peer routing), learn
//! whether they are reachable (AutoNAT v2), get through home NATs (relay reservations and DCUtR hole
//! punching), measure RTTs to each other (ping), and fill cache misses from each other.
//!
//! A miss is asked of a peer over the peer's own QUIC endpoint (`fog_proto::wire::PEER_ALPN`), dialled from
//! this node's (for a peer behind NAT, on a path punched through its rendezvous, as clients reach it), where
//! the uploading peer's congestion controller is the node's own (LEDBAT++ at `--upload-priority low`); over
//! a libp2p stream (`fog_proto::wire::PEER_PROTOCOL`) only when that endpoint is unknown or cannot be
//! reached. libp2p's transports choose their congestion control themselves.
//!
//! Clients never speak libp2p: they use the quinn chunk protocol. The overlay is node-to-node only.
//!
//! One task owns the swarm; everyone else talks to it through a bounded command channel or reads the
//! shared [`OverlayState`] snapshot.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use fog_net::frame_io::{read_frame_within, write_last_frame, ReadError};
use fog_net::transport;
use fog_proto::api::{
    CellDelta, CellList, Families, OverlayReport, PeerContact, Reachability, Rendezvous, RttSample, MAX_ADDR_LEN,
    MAX_PEERS_LISTED, MAX_PEER_ADDRS, MAX_RTT_SAMPLES, NEIGHBOURHOOD,
};
use fog_proto::groups::GroupHashes;
use fog_proto::placement::{peers_to_ask, PEERS_ASKED};
use fog_proto::rtt::RttFilter;
use fog_proto::wire::{
    ChunkRequest, FrameError, OriginHint, PeerHello, PeerResponseHead, PEER_ALPN, PEER_EXPORTER_LABEL,
    PEER_EXPORTER_LEN, PEER_PROTOCOL,
};
use fog_proto::{ChunkHash, NodeId};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, connection_limits, dcutr, identify, kad, memory_connection_limits, noise, ping, relay, tcp, yamux,
    Multiaddr, PeerId, StreamProtocol, Swarm,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use crate::cell::{AddressBook, Cell};
use crate::fill::Feed;
use crate::rendezvous::SharedMembership;
use crate::stats::Counters;

const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/fog/kad/1.0.0");
const CHUNK_PROTOCOL: StreamProtocol = StreamProtocol::new(PEER_PROTOCOL);
const IDENTIFY_VERSION: &str = "/fog/1.0.0";

/// Connections: enough peers for fill and measurement, few enough for a 1 GB device.
const MAX_ESTABLISHED_IN: u32 = 96;
/// Bootstrap peers, plus members of this node's cell dialled when asked for a chunk (homes it asks again
/// stay connected). Past it, an unconnected home cannot be dialled, rests, and the next takes over. A few
/// hundred idle QUIC connections fit a 1 GB device.
const MAX_ESTABLISHED_OUT: u32 = 256;
/// Two peers behind NAT may each dial the other through the relay and each complete a hole punch: two
/// relayed and two direct connections. A lower limit closes the direct ones (seen in the netns test).
const MAX_PER_PEER: u32 = 4;
const MAX_PENDING: u32 = 16;
/// Refuse new connections when the process uses more than this share of system memory.
const MAX_MEMORY_SHARE: f64 = 0.8;
/// Bootstrap peers dialled only while fewer than this many are connected: the tracker lists the nearest
/// first, so they make the neighbourhood.
const TARGET_PEERS: usize = NEIGHBOURHOOD;
/// How long a peer may take to start answering (a home filling through from the origin: to send the
/// whole chunk), and to send a whole chunk.
const PEER_FIRST_BYTE: Duration = Duration::from_secs(2);
const PEER_WHOLE_CHUNK: Duration = Duration::from_secs(10);
/// Bytes read from a peer's stream at a time.
const PEER_READ_BUF: usize = 64 * 1024;
/// How long a peer that answered busy (or too late) is left out of the neighbourhood.
const REST_FOR: Duration = Duration::from_secs(10);
/// Peers that sent wrong bytes are not dialled or asked again for this long.
const BAN_FOR: Duration = Duration::from_secs(3600);
const MAX_BANNED: usize = 1024;
const PING_EVERY: Duration = Duration::from_secs(5);
/// A peer is dialled again at most this often.
const REDIAL_AFTER: Duration = Duration::from_secs(30);
const COMMANDS: usize = 64;
/// How long the handshake with a peer's QUIC endpoint may take (for a peer behind NAT, the punch through
/// its rendezvous included), and then the hello's welcome, before libp2p is asked.
const QUIC_DIAL: Duration = PEER_FIRST_BYTE;
/// Idle timeout of a connection to a peer's QUIC endpoint (keep-alives every third of it; the peer closes
/// one that carries no fill for a minute).
const QUIC_IDLE: Duration = Duration::from_secs(30);
/// A peer whose QUIC endpoint did not answer or did not welcome this node is asked over libp2p for this long.
const QUIC_RETRY_AFTER: Duration = REDIAL_AFTER;
/// Peers' QUIC routes remembered from the tracker's bootstrap lists (cell members' come with the cell
/// list); past it, the memory starts over.
const MAX_QUIC_ADDRS: usize = 16 * MAX_PEERS_LISTED;
/// Connections to peers' QUIC endpoints kept open, as many as libp2p's outbound ones.
const MAX_QUIC_CONNS: usize = MAX_ESTABLISHED_OUT as usize;

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    memory: memory_connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    autonat_client: autonat::v2::client::Behaviour,
    autonat_server: autonat::v2::server::Behaviour,
    relay_client: relay::client::Behaviour,
    relay_server: relay::Behaviour,
    dcutr: dcutr::Behaviour,
    stream: libp2p_stream::Behaviour,
    cell_addresses: AddressBook,
}

/// Why a peer gave no answer to a fill request (as distinct from answering not found or busy).
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("cannot frame the request: {0}")]
    Frame(#[source] FrameError),
    #[error("cannot open a stream: {0}")]
    Open(#[from] libp2p_stream::OpenStreamError),
    #[error("sending the request: {0}")]
    Send(#[source] std::io::Error),
    #[error("{0}")]
    Head(#[from] ReadError<FrameError>),
}

/// Why a peer's QUIC endpoint was not used: it is asked over libp2p instead.
#[derive(Debug, thiserror::Error)]
enum QuicDialError {
    #[error("{0}")]
    Connect(#[from] transport::ConnectError),
    #[error("{0}")]
    Punch(#[source] Box<fog_net::rendezvous::PunchError>),
    #[error("no punched handshake within {QUIC_DIAL:?}")]
    PunchTimeout,
    #[error("cannot export keying material for the hello")]
    Exporter,
    #[error("cannot frame the hello: {0}")]
    Frame(#[source] FrameError),
    #[error("cannot open the hello's stream: {0}")]
    Open(#[from] quinn::ConnectionError),
    #[error("sending the hello: {0}")]
    Send(#[source] std::io::Error),
    #[error("not welcomed: {0}")]
    Refused(#[from] quinn::ReadToEndError),
    #[error("no welcome within {QUIC_DIAL:?}")]
    Timeout,
}

/// Which way a fill request went: over the node's own QUIC endpoint (`fog-peer/1`, under the uploading
/// node's congestion controller) or over libp2p.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerPath {
    Quic,
    Libp2p,
}

/// How this node asked a peer: over libp2p, over the peer's QUIC endpoint, or over one punched through the
/// peer's rendezvous (a peer behind NAT). Counted apart, so operators see how much went which way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asked {
    Libp2p,
    Quic,
    Punched,
}

/// Where a peer's QUIC endpoint is, as the tracker lists it ([`PeerContact`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum QuicRoute {
    /// A public peer's endpoint ([`PeerContact::rendezvous`]).
    Direct(SocketAddr),
    /// A peer behind NAT: punched through this rendezvous, as clients reach it ([`PeerContact::via`]).
    Via(Rendezvous),
}

impl QuicRoute {
    fn of(contact: &PeerContact) -> Option<Self> {
        contact.rendezvous.map(Self::Direct).or_else(|| contact.via.clone().map(Self::Via))
    }
}

/// What asking peers over this node's own QUIC endpoint needs.
#[derive(Debug, Clone)]
pub struct QuicLink {
    /// The node's endpoint: peers see the address clients and the tracker know, and a NAT'd node's mapping.
    pub endpoint: quinn::Endpoint,
    /// Signs the hello that shows peers this is a node.
    pub key: SigningKey,
    /// The tracker's signed word that this node registered, which the hello carries (kept fresh by the
    /// tracker link); none yet: peers are asked over libp2p.
    pub membership: SharedMembership,
}

/// Connections to peers' QUIC endpoints and where those are.
#[derive(Debug)]
struct QuicPeers {
    link: QuicLink,
    /// Peers' QUIC routes from the tracker's bootstrap lists.
    routes: Mutex<HashMap<NodeId, QuicRoute>>,
    /// One connection per peer, dialled once however many misses want it at the same time.
    conns: Mutex<HashMap<NodeId, Arc<tokio::sync::OnceCell<quinn::Connection>>>>,
    /// Peers whose endpoint did not answer or did not welcome this node, and when.
    failed: Mutex<HashMap<NodeId, Instant>>,
}

impl QuicPeers {
    /// The open, welcomed connection to `node` by `route`, dialled now if there is none; `None` when it
    /// cannot be had (the reason is logged), so the peer is asked over libp2p.
    async fn connection(&self, node: NodeId, route: &QuicRoute) -> Option<quinn::Connection> {
        let failed_lately =
            || self.failed.lock().expect("quic lock").get(&node).is_some_and(|t| t.elapsed() < QUIC_RETRY_AFTER);
        if failed_lately() {
            return None;
        }
        let membership = self.link.membership.lock().expect("membership lock").clone()?;
        let cell = {
            let mut conns = self.conns.lock().expect("quic lock");
            let alive =
                |c: &tokio::sync::OnceCell<quinn::Connection>| c.get().is_none_or(|c| c.close_reason().is_none());
            if conns.get(&node).is_some_and(|c| !alive(c)) {
                conns.remove(&node);
            }
            if conns.len() >= MAX_QUIC_CONNS && !conns.contains_key(&node) {
                conns.retain(|_, c| c.get().is_some_and(|c| c.close_reason().is_none()));
                // Still full: one goes (its streams keep it open until they end).
                if let Some(any) = conns.keys().next().copied().filter(|_| conns.len() >= MAX_QUIC_CONNS) {
                    conns.remove(&any);
                }
            }
            conns.entry(node).or_default().clone()
        };
        // Misses that waited for a dial that failed do not dial again, one after the other.
        let dialled = cell
            .get_or_try_init(|| async {
                if failed_lately() {
                    return Err(None);
                }
                self.dial(node, route, &membership).await.map_err(Some)
            })
            .await;
        match dialled {
            Ok(conn) => Some(conn.clone()),
            Err(None) => None,
            Err(Some(e)) => {
                tracing::debug!(%node, ?route, error = %e, "peer's QUIC endpoint not usable; asking over libp2p");
                let mut failed = self.failed.lock().expect("quic lock");
                if failed.len() >= MAX_QUIC_ADDRS {
                    failed.retain(|_, t| t.elapsed() < QUIC_RETRY_AFTER);
                }
                if failed.len() < MAX_QUIC_ADDRS {
                    failed.insert(node, Instant::now());
                }
                None
            }
        }
    }

    /// Dials `node` (its key pinned) and shows it this node's hello, bound to the connection by a TLS
    /// exporter; the peer welcomes it by finishing the hello's stream. A peer behind NAT is punched first,
    /// through the client path's code: its rendezvous has it send packets towards this node's endpoint (as
    /// its rendezvous sees it: this node's NAT mapping, if any), which opens its NAT to this node's
    /// handshake.
    async fn dial(
        &self,
        node: NodeId,
        route: &QuicRoute,
        membership: &fog_proto::api::Signed,
    ) -> Result<quinn::Connection, QuicDialError> {
        let cfg = transport::client_config_for(node, QUIC_IDLE, PEER_ALPN);
        let endpoint = &self.link.endpoint;
        let conn = match route {
            QuicRoute::Direct(addr) => transport::connect_with(endpoint, cfg, *addr, QUIC_DIAL).await?,
            QuicRoute::Via(via) => tokio::time::timeout(QUIC_DIAL, async {
                let addr = fog_net::rendezvous::punch(endpoint, via, node, QUIC_DIAL)
                    .await
                    .map_err(|e| QuicDialError::Punch(Box::new(e)))?;
                Ok::<_, QuicDialError>(transport::connect_with(endpoint, cfg, addr, QUIC_DIAL).await?)
            })
            .await
            .map_err(|_| QuicDialError::PunchTimeout)??,
        };
        let mut exporter = [0u8; PEER_EXPORTER_LEN];
        conn.export_keying_material(&mut exporter, PEER_EXPORTER_LABEL, b"").map_err(|_| QuicDialError::Exporter)?;
        let hello =
            PeerHello::sign(&self.link.key, &exporter, membership).encode_framed().map_err(QuicDialError::Frame)?;
        let welcome = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_last_frame(&mut send, &hello).await.map_err(QuicDialError::Send)?;
            recv.read_to_end(0).await?;
            Ok::<_, QuicDialError>(())
        };
        tokio::time::timeout(QUIC_DIAL, welcome).await.map_err(|_| QuicDialError::Timeout)??;
        Ok(conn)
    }

    /// Closes the connection to a peer that sent wrong bytes.
    fn forget(&self, node: &NodeId) {
        if let Some(conn) = self.conns.lock().expect("quic lock").remove(node).and_then(|c| c.get().cloned()) {
            conn.close(0u32.into(), b"wrong bytes");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot use the node key as a libp2p identity: {0}")]
    Identity(#[source] libp2p::identity::DecodingError),
    #[error("cannot build the libp2p transport: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot listen on {addr}: {source}; pick another --p2p-listen")]
    Listen { addr: Multiaddr, source: libp2p::TransportError<std::io::Error> },
}

/// The libp2p peer id of a fog node id (the same ed25519 key).
pub fn peer_id_of(node: &NodeId) -> Option<PeerId> {
    let key = libp2p::identity::ed25519::PublicKey::try_from_bytes(&node.0).ok()?;
    Some(PeerId::from_public_key(&libp2p::identity::PublicKey::from(key)))
}

/// The fog node id of an ed25519 peer id (its multihash inlines the public key).
pub fn node_id_of(peer: &PeerId) -> Option<NodeId> {
    let hash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    if hash.code() != 0 {
        return None;
    }
    let key = libp2p::identity::PublicKey::try_decode_protobuf(hash.digest()).ok()?;
    Some(NodeId(key.try_into_ed25519().ok()?.to_bytes()))
}

#[derive(Debug, Default)]
struct PeerEntry {
    node: Option<NodeId>,
    rtt: RttFilter,
    direct: u32,
    /// Connections through a relay (their pings measure the relay's path).
    relayed_ids: HashSet<libp2p::swarm::ConnectionId>,
    /// Answered busy or not in time: left out of the neighbourhood until then, so misses pick the next home.
    busy_until: Option<Instant>,
}

/// A peer's answer to a fill request.
enum PeerAnswer {
    Chunk(PeerBody),
    NotFound,
    Busy,
}

/// The chunk a peer is sending.
struct PeerBody {
    stream: Box<dyn AsyncRead + Unpin + Send>,
    len: u32,
    /// The whole chunk must have arrived by then.
    until: tokio::time::Instant,
}

/// Why a peer's chunk did not arrive whole.
#[derive(Debug, thiserror::Error)]
enum PeerReadError {
    #[error("reading the chunk: {0}")]
    Read(#[source] std::io::Error),
    #[error("the peer stopped after {0} of the chunk's bytes")]
    Ended(u32),
    #[error("the peer was silent for {0:?}")]
    Stalled(Duration),
    #[error("the peer's bytes do not match the chunk's hash")]
    Mismatch,
}

impl PeerBody {
    /// Reads the chunk into `feed` as it arrives, under the whole-chunk deadline and a stall limit.
    async fn stream_into<E: Clone>(&mut self, feed: &mut Feed<'_, E>) -> Result<(), PeerReadError> {
        let mut buf = vec![0u8; PEER_READ_BUF.min(self.len as usize)];
        let mut got = 0u32;
        while got < self.len {
            let stall = tokio::time::Instant::now() + PEER_FIRST_BYTE;
            let want = buf.len().min((self.len - got) as usize);
            let n = match tokio::time::timeout_at(stall.min(self.until), self.stream.read(&mut buf[..want])).await {
                Err(_) => return Err(PeerReadError::Stalled(PEER_FIRST_BYTE)),
                Ok(Err(e)) => return Err(PeerReadError::Read(e)),
                Ok(Ok(0)) => return Err(PeerReadError::Ended(got)),
                Ok(Ok(n)) => n,
            };
            feed.push(&buf[..n]).map_err(|_| PeerReadError::Mismatch)?;
            got += n as u32;
        }
        Ok(())
    }
}

/// What the swarm task publishes for the rest of the node.
#[derive(Debug, Default)]
struct OverlayState {
    peers: HashMap<PeerId, PeerEntry>,
    listen: Vec<Multiaddr>,
    external: Vec<Multiaddr>,
    /// The listener on a relay circuit, while we have asked for (or hold) a reservation.
    relay_listener: Option<libp2p::core::transport::ListenerId>,
    reservation: bool,
    /// AutoNAT tried our addresses and none worked.
    autonat_failed: bool,
    /// The IP the tracker dialled this node back on (see [`Overlay::confirm_public_ip`]).
    public_ip: Option<std::net::IpAddr>,
    bad_peers: Vec<NodeId>,
    banned: HashMap<PeerId, Instant>,
    /// TCP addresses to try for peers being dialled over QUIC, should that fail (UDP blocked).
    tcp_fallback: HashMap<PeerId, Vec<Multiaddr>>,
    /// When each peer was last dialled, so suggestions repeated every heartbeat do not redial at once.
    dialled: HashMap<PeerId, Instant>,
    joining: Joining,
    /// The members of this node's cell, when the tracker partitions the overlay into cells: misses go to
    /// the chunk's home among them rather than among the nearest peers.
    cell: Option<Cell>,
    /// Cell lists and changes from the tracker refused (out of bounds, or not from the version held).
    cell_refused: u64,
}

/// A node joining the fog waits for the neighbourhood the tracker first suggested to connect before it
/// takes chunks (so its first misses are filled by peers, not the origin); at most [`JOIN_WAIT`], since some
/// peers may be gone or reachable only through a relay, and a lone node has nobody to wait for.
#[derive(Debug, Default)]
enum Joining {
    /// No suggestion from the tracker yet.
    #[default]
    Unregistered,
    Waiting {
        since: Instant,
        neighbourhood: Vec<PeerId>,
    },
    Done,
}

const JOIN_WAIT: Duration = Duration::from_secs(10);

impl OverlayState {
    fn reachability(&self) -> Reachability {
        if self.external.iter().any(|a| !is_relayed(a)) {
            Reachability::Public
        } else if self.reservation {
            Reachability::Relayed
        } else if self.autonat_failed {
            Reachability::Nat
        } else {
            Reachability::Unknown
        }
    }

    fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.get(peer).is_some_and(|t| t.elapsed() < BAN_FOR)
    }
}

fn is_relayed(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

fn is_quic(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::QuicV1))
}

fn is_loopback(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback() || ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_loopback() || ip.is_unspecified(),
        _ => false,
    })
}

#[derive(Debug)]
enum Command {
    Dial(PeerId, Vec<Multiaddr>),
    /// Get a relay reservation on this peer (we are behind NAT).
    Reserve(PeerId, Vec<Multiaddr>),
    Disconnect(PeerId),
    ConfirmIp(std::net::IpAddr),
}

/// A handle on the overlay, cheap to clone.
#[derive(Clone)]
pub struct Overlay {
    pub peer_id: PeerId,
    state: Arc<Mutex<OverlayState>>,
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    counters: Arc<Counters>,
    cell_addresses: AddressBook,
    /// Asking peers over this node's QUIC endpoint; without it, every peer is asked over libp2p.
    quic: Option<Arc<QuicPeers>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("peer_id", &self.peer_id).finish_non_exhaustive()
    }
}

/// Inbound peer-fill streams, for the chunk server to answer.
pub type IncomingChunkStreams = libp2p_stream::IncomingStreams;

impl Overlay {
    /// Builds the swarm on the node's identity key, starts listening on `listen` and spawns its task; with
    /// `quic`, peers are asked over their QUIC endpoints first.
    pub fn start(
        key: &SigningKey,
        listen: &[Multiaddr],
        counters: Arc<Counters>,
        quic: Option<QuicLink>,
    ) -> Result<(Overlay, IncomingChunkStreams), OverlayError> {
        let cell_addresses = AddressBook::default();
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes()).map_err(OverlayError::Identity)?;
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| OverlayError::Transport(Box::new(e)))?
            .with_quic()
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .map_err(|e| OverlayError::Transport(Box::new(e)))?
            .with_behaviour(|key, relay_client| {
                let local = key.public().to_peer_id();
                let limits = connection_limits::ConnectionLimits::default()
                    .with_max_pending_incoming(Some(MAX_PENDING))
                    .with_max_pending_outgoing(Some(MAX_PENDING))
                    .with_max_established_incoming(Some(MAX_ESTABLISHED_IN))
                    .with_max_established_outgoing(Some(MAX_ESTABLISHED_OUT))
                    .with_max_established_per_peer(Some(MAX_PER_PEER));
                let mut kad_config = kad::Config::new(KAD_PROTOCOL);
                kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(300)));
                let relay_config = relay::Config { max_reservations: 128, max_circuits: 32, ..Default::default() };
                Behaviour {
                    limits: connection_limits::Behaviour::new(limits),
                    memory: memory_connection_limits::Behaviour::with_max_percentage(MAX_MEMORY_SHARE),
                    identify: identify::Behaviour::new(identify::Config::new(IDENTIFY_VERSION.into(), key.public())),
                    ping: ping::Behaviour::new(ping::Config::new().with_interval(PING_EVERY)),
                    kad: kad::Behaviour::with_config(local, kad::store::MemoryStore::new(local), kad_config),
                    autonat_client: autonat::v2::client::Behaviour::default(),
                    autonat_server: autonat::v2::server::Behaviour::default(),
                    relay_client,
                    relay_server: relay::Behaviour::new(local, relay_config),
                    dcutr: dcutr::Behaviour::new(local),
                    stream: libp2p_stream::Behaviour::new(),
                    cell_addresses: cell_addresses.clone(),
                }
            })
            .map_err(|e| OverlayError::Transport(Box::new(e)))?
            // Peers are kept for fill and RTT measurement; the connection limits bound them.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        let is_ip6 = |a: &Multiaddr| a.iter().any(|p| matches!(p, Protocol::Ip6(_)));
        for addr in listen {
            match swarm.listen_on(addr.clone()) {
                Ok(_) => {}
                // The default listens on both families; a host without IPv6 keeps the IPv4 ones.
                Err(e) if is_ip6(addr) && listen.iter().any(|a| !is_ip6(a)) => {
                    tracing::info!(%addr, error = %e, "overlay not listening on IPv6 (no IPv6 on this host?)");
                }
                Err(source) => return Err(OverlayError::Listen { addr: addr.clone(), source }),
            }
        }
        let mut control = swarm.behaviour().stream.new_control();
        let incoming = control.accept(CHUNK_PROTOCOL).expect("the chunk protocol is registered once");
        let (tx, rx) = mpsc::channel(COMMANDS);
        let overlay = Overlay {
            peer_id: *swarm.local_peer_id(),
            state: Arc::new(Mutex::new(OverlayState::default())),
            commands: tx,
            control,
            counters,
            cell_addresses,
            quic: quic.map(|link| {
                Arc::new(QuicPeers {
                    link,
                    routes: Default::default(),
                    conns: Default::default(),
                    failed: Default::default(),
                })
            }),
        };
        tokio::spawn(drive(swarm, overlay.state.clone(), rx));
        Ok((overlay, incoming))
    }

    /// Connects to peers the tracker handed out (while below the target peer count); asks a reachable one
    /// for a relay reservation when `behind_nat`.
    pub fn bootstrap(&self, peers: &[PeerContact], behind_nat: bool) {
        let (connected, relaying) = {
            let s = self.state.lock().expect("overlay lock");
            (s.peers.len(), s.relay_listener.is_some())
        };
        let mut relay_asked = relaying || !behind_nat;
        if let Some(quic) = &self.quic {
            let mut routes = quic.routes.lock().expect("quic lock");
            for (id, route) in peers.iter().filter_map(|p| Some((p.id, QuicRoute::of(p)?))) {
                if routes.len() >= MAX_QUIC_ADDRS && !routes.contains_key(&id) {
                    routes.clear();
                }
                routes.insert(id, route);
            }
        }
        for p in peers {
            let Some(peer) = peer_id_of(&p.id).filter(|p| *p != self.peer_id) else { continue };
            let addrs: Vec<Multiaddr> = p.addrs.iter().take(MAX_PEER_ADDRS).filter_map(|a| a.parse().ok()).collect();
            if addrs.is_empty() {
                continue;
            }
            if !relay_asked && p.rendezvous.is_some() {
                relay_asked = true;
                let direct: Vec<Multiaddr> = addrs.iter().filter(|a| !is_relayed(a)).cloned().collect();
                let _ = self.commands.try_send(Command::Reserve(peer, direct));
            }
            if connected < TARGET_PEERS && !self.state.lock().expect("overlay lock").peers.contains_key(&peer) {
                let _ = self.commands.try_send(Command::Dial(peer, addrs));
            }
        }
        let mut s = self.state.lock().expect("overlay lock");
        if matches!(s.joining, Joining::Unregistered) {
            // The tracker lists the nearest first.
            let neighbourhood = peers
                .iter()
                .filter(|p| !p.addrs.is_empty())
                .filter_map(|p| peer_id_of(&p.id))
                .filter(|p| *p != self.peer_id)
                .take(NEIGHBOURHOOD)
                .collect();
            s.joining = Joining::Waiting { since: Instant::now(), neighbourhood };
        }
    }

    /// Whether the overlay is still connecting the neighbourhood it was first given (see [`Joining`]).
    pub fn is_joining(&self) -> bool {
        let mut guard = self.state.lock().expect("overlay lock");
        let s = &mut *guard;
        let (connected, suggested, waited) = match &s.joining {
            Joining::Done => return false,
            Joining::Unregistered => return true,
            Joining::Waiting { since, neighbourhood } => {
                let direct = |p: &PeerId| s.peers.get(p).is_some_and(|e| e.direct > 0);
                let connected = neighbourhood.iter().filter(|p| direct(p)).count();
                if connected < neighbourhood.len() && since.elapsed() < JOIN_WAIT {
                    return true;
                }
                (connected, neighbourhood.len(), since.elapsed())
            }
        };
        tracing::info!(connected, suggested, ?waited, "overlay neighbourhood connected: ready to take chunks");
        s.joining = Joining::Done;
        false
    }

    /// The tracker dialled this node back on `ip`: there is no NAT in front of it, so its overlay listen
    /// addresses on that IP are external addresses too. This stands in for AutoNAT's first verdict, which
    /// needs peers and minutes; AutoNAT v2 keeps testing every other candidate. Public nodes need
    /// confirmed addresses before they act as relays for nodes behind NAT.
    pub fn confirm_public_ip(&self, ip: std::net::IpAddr) {
        let _ = self.commands.try_send(Command::ConfirmIp(ip));
    }

    /// Live peers with a direct connection, as node ids.
    /// The [`NEIGHBOURHOOD`] nearest direct peers (those without an RTT yet last, by id).
    fn neighbourhood(&self) -> Vec<(PeerId, NodeId)> {
        let s = self.state.lock().expect("overlay lock");
        let mut near: Vec<(f32, NodeId, PeerId)> = s
            .peers
            .iter()
            .filter(|(p, e)| e.direct > 0 && !s.is_banned(p) && e.busy_until.is_none_or(|t| t <= Instant::now()))
            .filter_map(|(p, e)| Some((e.rtt.estimate().unwrap_or(f32::INFINITY), e.node?, *p)))
            .collect();
        near.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        near.into_iter().take(NEIGHBOURHOOD).map(|(_, node, peer)| (peer, node)).collect()
    }

    pub fn peer_count(&self) -> usize {
        self.state.lock().expect("overlay lock").peers.len()
    }

    /// Asks the peers that rendezvous placement ranks highest for `hash` (the same ranking the tracker
    /// uses, over this node's neighbourhood), all at once (over their QUIC endpoints where known and
    /// reachable, else over libp2p), and streams the chunk from the first that has it
    /// into `feed`, which verifies it (group by group with `groups`) and passes it on as it verifies. With
    /// an origin hint and the ticket that licensed it, the first of them — the chunk's home — is asked to
    /// fill the chunk through if it lacks it. Whether the whole chunk arrived: if not, `feed` holds what
    /// verified before the peer failed, and the rest must come from elsewhere.
    pub async fn fetch<E: Clone>(
        &self,
        hash: ChunkHash,
        fill_through: Option<(&OriginHint, &[u8])>,
        groups: Option<&(u32, GroupHashes)>,
        feed: &mut Feed<'_, E>,
    ) -> bool {
        let (peers, own_home) = self.peers_for_miss(&hash);
        let mut asks: futures::stream::FuturesUnordered<_> = peers
            .into_iter()
            .enumerate()
            .map(|(rank, (peer, node))| {
                // This node being the home itself, it fills from the origin after asking the others.
                let home = fill_through.filter(|_| rank == 0 && !own_home);
                let req = ChunkRequest {
                    hash,
                    range: None,
                    origin: home.map(|(hint, _)| hint.clone()),
                    receipt: None,
                    ticket: home.map(|(_, ticket)| ticket.to_vec()),
                    groups: groups.cloned(),
                };
                async move { (peer, node, tokio::time::timeout(PEER_WHOLE_CHUNK, self.ask(peer, node, req)).await) }
            })
            .collect();
        let chosen = loop {
            let Some((peer, node, answer)) = asks.next().await else { return false };
            match answer {
                Ok(Ok((asked, PeerAnswer::Chunk(body)))) if body.len == feed.chunk_len() => {
                    break (peer, node, asked, body)
                }
                Ok(Ok((_, PeerAnswer::Chunk(_)))) => self.punish(peer, node),
                Ok(Ok((_, PeerAnswer::NotFound))) => {}
                Ok(Ok((_, PeerAnswer::Busy))) => self.rest(peer),
                // A dropped stream is how a peer at its stream limit says busy.
                Ok(Err(e)) => {
                    tracing::debug!(%node, chunk = %hash, error = %e, "peer fill failed");
                    self.rest(peer);
                }
                Err(_) => {
                    tracing::debug!(%node, chunk = %hash, "peer fill timed out");
                    self.rest(peer);
                }
            }
        };
        // The others are not needed any more (dropping their streams tells them).
        drop(asks);
        let (peer, node, asked, mut body) = chosen;
        let from = feed.verified();
        match body.stream_into(feed).await {
            Ok(()) => {
                Counters::add(&self.counters.peer_fills, 1);
                if asked != Asked::Libp2p {
                    Counters::add(&self.counters.peer_fills_quic, 1);
                }
                if asked == Asked::Punched {
                    Counters::add(&self.counters.peer_fills_punched, 1);
                }
                Counters::add(&self.counters.peer_fill_bytes, u64::from(feed.verified() - from));
                return true;
            }
            Err(PeerReadError::Mismatch) => self.punish(peer, node),
            Err(e) => {
                tracing::debug!(%node, chunk = %hash, error = %e, got = feed.verified(), "peer fill stopped part-way");
                self.rest(peer);
            }
        }
        Counters::add(&self.counters.peer_fill_bytes, u64::from(feed.verified() - from));
        feed.restart();
        false
    }

    /// The peers to ask for `hash`, best first (the first is the chunk's home), and whether this node is
    /// the chunk's home itself: the first members of its cell in the chunk's home order, or without a cell
    /// the top of rendezvous placement over its neighbourhood.
    fn peers_for_miss(&self, hash: &ChunkHash) -> (Vec<(PeerId, NodeId)>, bool) {
        {
            let s = self.state.lock().expect("overlay lock");
            if let Some(cell) = s.cell.as_ref().filter(|c| c.members.len() > 1) {
                let (asked, own_home) = cell.homes(hash, &self.peer_id, |p| s.is_banned(p), PEERS_ASKED);
                return (asked.into_iter().map(|m| (m.peer, m.node)).collect(), own_home);
            }
        }
        let peers = self.neighbourhood();
        let ids: Vec<NodeId> = peers.iter().map(|(_, n)| *n).collect();
        (peers_to_ask(hash, &ids).into_iter().map(|i| peers[i]).collect(), false)
    }

    /// The members of this node's cell, from the tracker's whole list (refused past the protocol's bounds:
    /// [`CellList::check_bounds`]). Members still resting keep resting.
    pub fn set_cell(&self, list: CellList) {
        let mut s = self.state.lock().expect("overlay lock");
        if let Err(e) = list.check_bounds() {
            tracing::warn!(error = %e, "cell list from the tracker refused");
            s.cell_refused += 1;
            return;
        }
        self.install_cell(&mut s, list);
    }

    /// Changes this node's cell by the tracker's `delta` from the version it holds; when that is not the
    /// version held, or the change does not give the list it names, keeps the members it has (the next
    /// heartbeat asks again: [`Cell::held_version`]).
    pub fn change_cell(&self, delta: CellDelta) {
        let mut s = self.state.lock().expect("overlay lock");
        let next = match s.cell.as_mut().map(|cell| cell.changed(&delta)) {
            Some(Ok(list)) => list,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "cell change from the tracker refused");
                s.cell_refused += 1;
                return;
            }
            None => {
                // Nothing held is reported as no version: the tracker sends the whole list next time.
                tracing::warn!(from = delta.from, "cell change from the tracker, but no cell list is held");
                s.cell_refused += 1;
                return;
            }
        };
        tracing::debug!(added = delta.added.len(), removed = delta.removed.len(), "cell change from the tracker");
        self.install_cell(&mut s, next);
    }

    fn install_cell(&self, s: &mut OverlayState, list: CellList) {
        let families = transport::local_families();
        let (cell, addresses) = Cell::new(list, &self.peer_id, |a| routable(a, families), s.cell.as_ref());
        tracing::info!(members = cell.members.len(), version = cell.listed.version, "cell members from the tracker");
        self.cell_addresses.replace(addresses);
        s.cell = Some(cell);
    }

    /// Leaves a busy, failing or slow peer out of the neighbourhood (and of its cell's homes) for
    /// [`REST_FOR`]: chunks it is home to get the next peer in rendezvous order as home meanwhile (as the
    /// nodes near it will choose too).
    fn rest(&self, peer: PeerId) {
        let until = Instant::now() + REST_FOR;
        let mut s = self.state.lock().expect("overlay lock");
        if let Some(e) = s.peers.get_mut(&peer) {
            e.busy_until = Some(until);
        }
        if let Some(cell) = s.cell.as_mut() {
            cell.rest(&peer, until);
        }
    }

    /// Sends `req` to `peer` (`node`) and reads its answer's head; a chunk's bytes follow on the stream.
    /// Over the peer's QUIC endpoint when this node knows it (or its rendezvous) and it welcomes this node,
    /// else over libp2p.
    async fn ask(&self, peer: PeerId, node: NodeId, req: ChunkRequest) -> Result<(Asked, PeerAnswer), FetchError> {
        let frame = req.encode_framed().map_err(FetchError::Frame)?;
        let first_byte = if req.origin.is_some() { PEER_WHOLE_CHUNK } else { PEER_FIRST_BYTE };
        if let Some((quic, route)) = self.quic.as_ref().zip(self.quic_route(&node)) {
            if let Some(conn) = quic.connection(node, &route).await {
                let asked = if matches!(route, QuicRoute::Via(_)) { Asked::Punched } else { Asked::Quic };
                // A connection that closed since (the peer restarted, say) is dialled again next time.
                match conn.open_bi().await {
                    Ok((mut send, recv)) => {
                        write_last_frame(&mut send, &frame).await.map_err(FetchError::Send)?;
                        return Ok((asked, read_answer(Box::new(recv), first_byte).await?));
                    }
                    Err(e) => tracing::debug!(%node, error = %e, "peer's QUIC connection closed; asking over libp2p"),
                }
            }
        }
        let mut stream = self.control.clone().open_stream(peer, CHUNK_PROTOCOL).await?.compat();
        write_last_frame(&mut stream, &frame).await.map_err(FetchError::Send)?;
        Ok((Asked::Libp2p, read_answer(Box::new(stream), first_byte).await?))
    }

    /// How to reach `node`'s QUIC chunk endpoint, as the tracker listed it (public, or behind NAT with a
    /// rendezvous): in this node's cell list, or among its bootstrap peers.
    fn quic_route(&self, node: &NodeId) -> Option<QuicRoute> {
        let listed = {
            let s = self.state.lock().expect("overlay lock");
            let members = s.cell.as_ref().map(|c| &c.listed.members);
            members.and_then(|m| m.binary_search_by_key(node, |m| m.id).ok().and_then(|i| QuicRoute::of(&m[i])))
        };
        listed.or_else(|| self.quic.as_ref()?.routes.lock().expect("quic lock").get(node).cloned())
    }

    /// A peer sent bytes that do not match the hash: disconnect, ban, and tell the tracker.
    fn punish(&self, peer: PeerId, node: NodeId) {
        tracing::warn!(%node, "peer sent a chunk that does not match its hash; disconnecting it");
        Counters::add(&self.counters.peer_bad_chunks, 1);
        {
            let mut s = self.state.lock().expect("overlay lock");
            if s.banned.len() >= MAX_BANNED {
                s.banned.retain(|_, t| t.elapsed() < BAN_FOR);
            }
            if s.banned.len() < MAX_BANNED {
                s.banned.insert(peer, Instant::now());
            }
            if s.bad_peers.len() < MAX_RTT_SAMPLES && !s.bad_peers.contains(&node) {
                s.bad_peers.push(node);
            }
        }
        let _ = self.commands.try_send(Command::Disconnect(peer));
        if let Some(quic) = &self.quic {
            quic.forget(&node);
        }
    }

    /// Whether `peer` may open fill streams here.
    pub fn accepts(&self, peer: &PeerId) -> bool {
        !self.state.lock().expect("overlay lock").is_banned(peer)
    }

    /// The overlay part of the next heartbeat (takes the bad-peer list).
    pub fn report(&self) -> OverlayReport {
        let joining = self.is_joining();
        let mut s = self.state.lock().expect("overlay lock");
        OverlayReport {
            joining,
            reachability: s.reachability(),
            addrs: self.addrs_locked(&s),
            rtt: rtt_samples(&s),
            connected_peers: s.peers.len() as u32,
            bad_peers: std::mem::take(&mut s.bad_peers),
            cell_version: s.cell.as_ref().and_then(Cell::held_version),
            cell_deltas: true,
            ..Default::default()
        }
    }

    /// Addresses worth telling others: confirmed external ones, then listen addresses; QUIC before TCP
    /// (hole punching works best over UDP), loopback last.
    fn addrs_locked(&self, s: &OverlayState) -> Vec<String> {
        let mut addrs: Vec<&Multiaddr> = s.external.iter().chain(s.listen.iter()).collect();
        addrs.sort_by_key(|a| (is_loopback(a), !is_quic(a)));
        let mut out: Vec<String> = Vec::new();
        for a in addrs {
            let text = a.to_string();
            if text.len() <= MAX_ADDR_LEN && !out.contains(&text) {
                out.push(text);
            }
        }
        out.truncate(MAX_PEER_ADDRS);
        out
    }

    /// A snapshot for the status page.
    pub fn summary(&self) -> OverlaySummary {
        let s = self.state.lock().expect("overlay lock");
        OverlaySummary {
            peer_id: self.peer_id.to_string(),
            reachability: s.reachability(),
            peers: s.peers.len(),
            direct_peers: s.peers.values().filter(|e| e.direct > 0).count(),
            addrs: self.addrs_locked(&s),
            rtt: rtt_samples(&s),
            cell_members: s.cell.as_ref().map_or(0, |c| c.members.len()),
            cell_refused: s.cell_refused,
        }
    }
}

/// Reads the head of a peer's answer on `stream`; a chunk's bytes follow on it.
async fn read_answer(
    mut stream: Box<dyn AsyncRead + Unpin + Send>,
    first_byte: Duration,
) -> Result<PeerAnswer, FetchError> {
    // The whole fetch runs under PEER_WHOLE_CHUNK: no shorter stall limit after the first byte.
    let len = match read_frame_within(&mut stream, first_byte, PEER_WHOLE_CHUNK).await? {
        PeerResponseHead::Ok { len } => len,
        PeerResponseHead::NotFound => return Ok(PeerAnswer::NotFound),
        PeerResponseHead::Busy => return Ok(PeerAnswer::Busy),
    };
    let until = tokio::time::Instant::now() + PEER_WHOLE_CHUNK;
    Ok(PeerAnswer::Chunk(PeerBody { stream, len, until }))
}

/// Filtered RTTs to peers, nearest first, at most [`MAX_RTT_SAMPLES`].
fn rtt_samples(s: &OverlayState) -> Vec<RttSample> {
    let mut rtt: Vec<RttSample> =
        s.peers.values().filter_map(|e| Some(RttSample { peer: e.node?, rtt_ms: e.rtt.estimate()? })).collect();
    rtt.sort_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms));
    rtt.truncate(MAX_RTT_SAMPLES);
    rtt
}

/// The overlay as the status page shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OverlaySummary {
    pub peer_id: String,
    pub reachability: Reachability,
    pub peers: usize,
    pub direct_peers: usize,
    pub addrs: Vec<String>,
    /// Filtered RTTs to peers on direct connections.
    pub rtt: Vec<RttSample>,
    /// Members of this node's cell (this node too) among which misses find their chunk's home; 0 without
    /// cells.
    #[serde(default)]
    pub cell_members: usize,
    /// Cell lists and changes from the tracker this node refused (out of bounds, or not from the version
    /// it held).
    #[serde(default)]
    pub cell_refused: u64,
}

/// The swarm task: applies commands and turns swarm events into [`OverlayState`].
async fn drive(mut swarm: Swarm<Behaviour>, state: Arc<Mutex<OverlayState>>, mut commands: mpsc::Receiver<Command>) {
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(c) => apply(&mut swarm, &state, c),
                None => return,
            },
            event = swarm.select_next_some() => on_event(&mut swarm, &state, event),
        }
    }
}

fn apply(swarm: &mut Swarm<Behaviour>, state: &Mutex<OverlayState>, command: Command) {
    match command {
        Command::Dial(peer, addrs) => {
            {
                let mut s = state.lock().expect("overlay lock");
                let recent = s.dialled.get(&peer).is_some_and(|t| t.elapsed() < REDIAL_AFTER);
                if s.is_banned(&peer) || recent || swarm.is_connected(&peer) {
                    return;
                }
                if s.dialled.len() >= 4 * TARGET_PEERS {
                    s.dialled.retain(|_, t| t.elapsed() < REDIAL_AFTER);
                }
                if s.dialled.len() < 4 * TARGET_PEERS {
                    s.dialled.insert(peer, Instant::now());
                }
            }
            let families = transport::local_families();
            let addrs: Vec<Multiaddr> = addrs.into_iter().filter(|a| routable(a, families)).collect();
            for a in &addrs {
                swarm.behaviour_mut().kad.add_address(&peer, a.clone());
            }
            // QUIC first, TCP only if that fails: peers then observe our UDP mappings, which is what DCUtR
            // punches (a race that TCP won would leave only a TCP-observed address).
            let (quic, tcp): (Vec<Multiaddr>, Vec<Multiaddr>) = addrs.into_iter().partition(is_quic);
            let first = if quic.is_empty() {
                tcp
            } else {
                let mut s = state.lock().expect("overlay lock");
                if s.tcp_fallback.len() < 2 * TARGET_PEERS && !tcp.is_empty() {
                    s.tcp_fallback.insert(peer, tcp);
                }
                quic
            };
            dial(swarm, peer, first);
        }
        Command::Reserve(relay, mut addrs) => {
            // Over QUIC, so the relay observes our UDP mapping: that is the address DCUtR then punches
            // (a TCP-observed address would be useless to a QUIC hole punch).
            addrs.sort_by_key(|a| (is_loopback(a), !is_quic(a)));
            let Some(addr) = addrs.first() else { return };
            let circuit = addr.clone().with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
            match swarm.listen_on(circuit.clone()) {
                Ok(id) => {
                    tracing::debug!(%circuit, "behind NAT: asking a reachable peer for a relay reservation");
                    state.lock().expect("overlay lock").relay_listener = Some(id);
                }
                Err(e) => tracing::warn!(%circuit, error = %e, "cannot listen through the relay"),
            }
        }
        Command::Disconnect(peer) => {
            let _ = swarm.disconnect_peer_id(peer);
        }
        Command::ConfirmIp(ip) => {
            let listen = {
                let mut s = state.lock().expect("overlay lock");
                s.public_ip = Some(ip);
                s.listen.clone()
            };
            for addr in listen.into_iter().filter(|a| has_ip(a, ip)) {
                confirm_external(swarm, state, addr);
            }
        }
    }
}

fn dial(swarm: &mut Swarm<Behaviour>, peer: PeerId, addrs: Vec<Multiaddr>) {
    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addrs).build();
    if let Err(e) = swarm.dial(opts) {
        tracing::debug!(%peer, error = %e, "cannot dial peer");
    }
}

fn confirm_external(swarm: &mut Swarm<Behaviour>, state: &Mutex<OverlayState>, addr: Multiaddr) {
    swarm.add_external_address(addr.clone());
    let mut s = state.lock().expect("overlay lock");
    if !s.external.contains(&addr) && s.external.len() < MAX_PEER_ADDRS {
        s.external.push(addr);
    }
}

/// Whether this host can send to `a` (to its relay, for a relayed address): it is loopback, or in a family
/// the host has a route in. A v6-only home would otherwise dial its peers' IPv4 addresses in vain.
fn routable(a: &Multiaddr, families: Families) -> bool {
    let ip = a.iter().find_map(|p| match p {
        Protocol::Ip4(v4) => Some(std::net::IpAddr::V4(v4)),
        Protocol::Ip6(v6) => Some(std::net::IpAddr::V6(v6)),
        _ => None,
    });
    ip.is_none_or(|ip| ip.is_loopback() || families == Families::default() || families.allows(&(ip, 0).into()))
}

fn has_ip(a: &Multiaddr, ip: std::net::IpAddr) -> bool {
    !is_relayed(a)
        && a.iter().any(|p| match p {
            Protocol::Ip4(v4) => std::net::IpAddr::V4(v4) == ip,
            Protocol::Ip6(v6) => std::net::IpAddr::V6(v6) == ip,
            _ => false,
        })
}

fn on_event(swarm: &mut Swarm<Behaviour>, state: &Mutex<OverlayState>, event: SwarmEvent<BehaviourEvent>) {
    let mut s = state.lock().expect("overlay lock");
    match event {
        SwarmEvent::NewListenAddr { address, .. } => {
            tracing::info!(%address, "overlay listening");
            if !s.listen.contains(&address) && s.listen.len() < 2 * MAX_PEER_ADDRS {
                s.listen.push(address.clone());
            }
            if s.public_ip.is_some_and(|ip| has_ip(&address, ip)) {
                drop(s);
                confirm_external(swarm, state, address);
            }
        }
        SwarmEvent::ExpiredListenAddr { address, .. } => s.listen.retain(|a| *a != address),
        SwarmEvent::ExternalAddrConfirmed { address } => {
            tracing::info!(%address, "external address confirmed");
            if !s.external.contains(&address) && s.external.len() < MAX_PEER_ADDRS {
                s.external.push(address);
            }
        }
        SwarmEvent::ExternalAddrExpired { address } => s.external.retain(|a| *a != address),
        SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
            if s.is_banned(&peer_id) {
                drop(s);
                let _ = swarm.disconnect_peer_id(peer_id);
                return;
            }
            s.tcp_fallback.remove(&peer_id);
            let e = s.peers.entry(peer_id).or_default();
            e.node = node_id_of(&peer_id);
            if endpoint.is_relayed() {
                e.relayed_ids.insert(connection_id);
            } else {
                e.direct += 1;
            }
            tracing::debug!(peer = %peer_id, relayed = endpoint.is_relayed(), "peer connected");
        }
        SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, .. } => {
            if num_established == 0 {
                s.peers.remove(&peer_id);
            } else if let Some(e) = s.peers.get_mut(&peer_id) {
                if !e.relayed_ids.remove(&connection_id) {
                    e.direct = e.direct.saturating_sub(1);
                }
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, connection, result: Ok(rtt) })) => {
            // RTT through a relay measures the relay's path, not the peer's.
            if let Some(e) = s.peers.get_mut(&peer).filter(|e| !e.relayed_ids.contains(&connection)) {
                e.rtt.add(rtt.as_secs_f32() * 1000.0);
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
            drop(s);
            for addr in info.listen_addrs.into_iter().filter(|a| !is_relayed(a)).take(MAX_PEER_ADDRS) {
                swarm.behaviour_mut().kad.add_address(&peer_id, addr);
            }
        }
        SwarmEvent::Behaviour(BehaviourEvent::AutonatClient(e)) => match e.result {
            Ok(()) => tracing::info!(addr = %e.tested_addr, "AutoNAT: address reachable"),
            Err(err) => {
                tracing::debug!(addr = %e.tested_addr, error = %err, "AutoNAT: address not reachable");
                s.autonat_failed = true;
            }
        },
        SwarmEvent::Behaviour(BehaviourEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
            relay_peer_id,
            ..
        })) => {
            tracing::info!(relay = %relay_peer_id, "relay reservation accepted");
            s.reservation = true;
        }
        SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event { remote_peer_id, result })) => match result {
            Ok(_) => tracing::info!(peer = %remote_peer_id, "hole punch succeeded: direct connection"),
            Err(e) => tracing::info!(peer = %remote_peer_id, error = %e, "hole punch failed; staying relayed"),
        },
        SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), .. } => {
            if let Some(tcp) = s.tcp_fallback.remove(&peer) {
                drop(s);
                tracing::debug!(%peer, "QUIC dial failed; trying TCP");
                dial(swarm, peer, tcp);
            }
        }
        SwarmEvent::ListenerClosed { listener_id, addresses, reason } => {
            if s.relay_listener == Some(listener_id) {
                tracing::debug!(reason = ?reason, "relay reservation ended; will ask again");
                s.relay_listener = None;
                s.reservation = false;
            }
            s.listen.retain(|a| !addresses.contains(a));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fill::Filling;
    use bytes::Bytes;
    use fog_proto::groups::Verifier;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Fetches `hash` (of `len` bytes, verified whole) from the asker's peers: the chunk, if it arrived.
    async fn fetch(asker: &Overlay, hash: ChunkHash, len: u32) -> Option<Bytes> {
        let filling = Filling::<()>::new(len);
        let mut feed = Feed::new(&filling, Verifier::new(hash, len, None).expect("no groups"));
        asker.fetch(hash, None, None, &mut feed).await.then(|| feed.into_whole())
    }

    #[test]
    fn node_and_peer_ids_name_the_same_key() {
        let key = SigningKey::from_bytes(&[9u8; 32]);
        let node = NodeId::from(key.verifying_key());
        let peer = peer_id_of(&node).expect("ed25519 key");
        assert_eq!(node_id_of(&peer), Some(node));
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes()).expect("key");
        assert_eq!(keypair.public().to_peer_id(), peer);
    }

    fn start(seed: u8) -> (Overlay, IncomingChunkStreams, NodeId) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let listen: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("multiaddr");
        let (overlay, incoming) =
            Overlay::start(&key, &[listen], Arc::new(Counters::default()), None).expect("overlay");
        (overlay, incoming, NodeId::from(key.verifying_key()))
    }

    async fn listen_addrs(o: &Overlay) -> Vec<String> {
        for _ in 0..100 {
            let addrs = o.summary().addrs;
            if !addrs.is_empty() {
                return addrs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("overlay did not start listening");
    }

    /// A scripted peer: reads each fill request frame and answers `answer`, whatever was asked.
    fn answer_every_request(mut incoming: IncomingChunkStreams, answer: Vec<u8>) {
        tokio::spawn(async move {
            while let Some((_, stream)) = incoming.next().await {
                let mut stream = stream.compat();
                if fog_net::frame_io::read_frame::<ChunkRequest, _>(&mut stream).await.is_ok() {
                    let _ = write_last_frame(&mut stream, &answer).await;
                }
            }
        });
    }

    /// Connects `asker` to `peer` directly and waits until it is in the asker's neighbourhood.
    async fn connect(asker: &Overlay, peer: &Overlay, id: NodeId) {
        connect_listing(asker, peer, id, None).await;
    }

    /// [`connect`], the tracker having listed `peer`'s QUIC endpoint as `quic`.
    async fn connect_listing(asker: &Overlay, peer: &Overlay, id: NodeId, quic: Option<SocketAddr>) {
        connect_contact(asker, peer, PeerContact { id, addrs: Vec::new(), rendezvous: quic, via: None }).await;
    }

    /// [`connect`], the tracker having listed `peer` as `contact` (its libp2p addresses added).
    async fn connect_contact(asker: &Overlay, peer: &Overlay, contact: PeerContact) {
        asker.bootstrap(&[PeerContact { addrs: listen_addrs(peer).await, ..contact }], false);
        for _ in 0..100 {
            if !asker.neighbourhood().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(asker.neighbourhood().len(), 1, "did not connect to the peer");
    }

    /// A peer that answers busy is left out of the neighbourhood for a while, so the next peer becomes home.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_peer_rests() {
        let (asker, _asker_incoming, _) = start(3);
        let (busy, busy_incoming, busy_id) = start(4);
        answer_every_request(busy_incoming, PeerResponseHead::Busy.encode());
        connect(&asker, &busy, busy_id).await;
        assert!(fetch(&asker, ChunkHash::of(b"x"), 1).await.is_none());
        assert!(asker.neighbourhood().is_empty(), "the busy peer is still asked first");
        assert_eq!(asker.peer_count(), 1, "a busy peer is not disconnected");
    }

    /// Real libp2p on loopback: a peer that answers with the wrong bytes is not believed, is disconnected,
    /// banned and reported; an honest peer's chunk is returned verified.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peer_fill_verifies_and_punishes_wrong_bytes() {
        let (asker, _asker_incoming, _) = start(1);
        let (liar, liar_incoming, liar_id) = start(2);
        let chunk = Bytes::from(vec![7u8; 100_000]);
        let hash = ChunkHash::of(&chunk);
        let mut answer = PeerResponseHead::Ok { len: 100_000 }.encode();
        answer.extend_from_slice(&[8u8; 100_000]);
        answer_every_request(liar_incoming, answer);
        connect(&asker, &liar, liar_id).await;
        assert!(fetch(&asker, hash, 100_000).await.is_none(), "wrong bytes were accepted");
        assert_eq!(asker.report().bad_peers, vec![liar_id]);
        assert!(!asker.accepts(&liar.peer_id), "the liar is not banned");
        for _ in 0..100 {
            if asker.peer_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(asker.peer_count(), 0, "the liar is still connected");
        assert_eq!(asker.counters.peer_bad_chunks.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    /// The test's tracker, which signs memberships.
    fn tracker_key() -> SigningKey {
        SigningKey::from_bytes(&[99; 32])
    }

    /// The membership the test's tracker signed for `key`'s node.
    fn membership_of(key: &SigningKey) -> SharedMembership {
        let m = fog_proto::api::Membership { node_id: key.verifying_key().into(), issued_ms: 0, expiry_ms: u64::MAX };
        let signed = fog_proto::api::Signed::sign(&tracker_key(), fog_proto::api::KIND_MEMBERSHIP, &m);
        Arc::new(Mutex::new(Some(signed)))
    }

    /// An asker whose overlay asks over its own QUIC endpoint, showing a membership the test's tracker signed.
    fn start_with_quic(seed: u8) -> (Overlay, IncomingChunkStreams) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let endpoint = transport::endpoint(([127, 0, 0, 1], 0).into(), None).expect("endpoint");
        let link = QuicLink { endpoint, key: key.clone(), membership: membership_of(&key) };
        let listen: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("multiaddr");
        Overlay::start(&key, &[listen], Arc::new(Counters::default()), Some(link)).expect("overlay")
    }

    /// A scripted peer's QUIC endpoint (`fog-peer/1`, holding `key`): welcomes every hello unchecked, then
    /// answers each fill request with `answer`, whatever was asked. Counts the requests.
    fn answer_every_request_over_quic(key: &SigningKey, answer: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
        let (endpoint, asked) = answer_every_request_on_endpoint(key, answer);
        (endpoint.local_addr().expect("addr"), asked)
    }

    /// [`answer_every_request_over_quic`], giving the endpoint.
    fn answer_every_request_on_endpoint(key: &SigningKey, answer: Vec<u8>) -> (quinn::Endpoint, Arc<AtomicUsize>) {
        let config = transport::server_config(key, 8).expect("server config");
        let endpoint = transport::endpoint(([127, 0, 0, 1], 0).into(), Some(config)).expect("endpoint");
        let asked = Arc::new(AtomicUsize::new(0));
        let (counted, accepting) = (asked.clone(), endpoint.clone());
        tokio::spawn(async move {
            let endpoint = accepting;
            while let Some(incoming) = endpoint.accept().await {
                let (answer, asked) = (answer.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
                    if fog_net::frame_io::read_frame::<PeerHello, _>(&mut recv).await.is_err() {
                        return;
                    }
                    let _ = send.finish();
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        if fog_net::frame_io::read_frame::<ChunkRequest, _>(&mut recv).await.is_ok() {
                            asked.fetch_add(1, Ordering::Relaxed);
                            let _ = write_last_frame(&mut send, &answer).await;
                        }
                    }
                });
            }
        });
        (endpoint, asked)
    }

    /// Over a peer's QUIC endpoint: an honest peer's chunk arrives (counted as a QUIC fill) and never
    /// touches libp2p; a peer that sends wrong bytes there is not believed, banned, reported and
    /// disconnected, as over libp2p.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quic_peer_fill_verifies_counts_and_punishes_wrong_bytes() {
        let chunk = Bytes::from(vec![7u8; 100_000]);
        let hash = ChunkHash::of(&chunk);
        let answer = |byte: u8| {
            let mut answer = PeerResponseHead::Ok { len: 100_000 }.encode();
            answer.extend_from_slice(&[byte; 100_000]);
            answer
        };

        let (asker, _asker_incoming) = start_with_quic(11);
        let (honest, honest_incoming, honest_id) = start(12);
        let (quic, asked) = answer_every_request_over_quic(&SigningKey::from_bytes(&[12; 32]), answer(7));
        answer_every_request(honest_incoming, PeerResponseHead::NotFound.encode());
        connect_listing(&asker, &honest, honest_id, Some(quic)).await;
        assert_eq!(fetch(&asker, hash, 100_000).await, Some(chunk.clone()), "the honest peer's chunk over QUIC");
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        assert_eq!(asker.counters.peer_fills_quic.load(Ordering::Relaxed), 1);
        assert_eq!(asker.counters.peer_fills.load(Ordering::Relaxed), 1);

        let (asker, _asker_incoming) = start_with_quic(13);
        let (liar, liar_incoming, liar_id) = start(14);
        let (quic, asked) = answer_every_request_over_quic(&SigningKey::from_bytes(&[14; 32]), answer(8));
        answer_every_request(liar_incoming, answer(7));
        connect_listing(&asker, &liar, liar_id, Some(quic)).await;
        assert!(fetch(&asker, hash, 100_000).await.is_none(), "wrong bytes were accepted");
        assert_eq!(asked.load(Ordering::Relaxed), 1, "the liar was not asked over QUIC");
        assert_eq!(asker.report().bad_peers, vec![liar_id]);
        assert!(!asker.accepts(&liar.peer_id), "the liar is not banned");
        assert_eq!(asker.counters.peer_bad_chunks.load(Ordering::Relaxed), 1);
        assert_eq!(asker.counters.peer_fills.load(Ordering::Relaxed), 0);
        for _ in 0..100 {
            if asker.peer_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(asker.peer_count(), 0, "the liar is still connected");
    }

    /// A peer whose listed QUIC endpoint does not answer is asked over libp2p, and the fill counts as such.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_quic_endpoint_falls_back_to_libp2p() {
        let chunk = Bytes::from(vec![5u8; 50_000]);
        let hash = ChunkHash::of(&chunk);
        let (asker, _asker_incoming) = start_with_quic(15);
        let (peer, peer_incoming, peer_id) = start(16);
        let mut answer = PeerResponseHead::Ok { len: 50_000 }.encode();
        answer.extend_from_slice(&chunk);
        answer_every_request(peer_incoming, answer);
        // A UDP port nobody answers on.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        connect_listing(&asker, &peer, peer_id, Some(silent.local_addr().expect("addr"))).await;
        assert_eq!(fetch(&asker, hash, 50_000).await, Some(chunk));
        assert_eq!(asker.counters.peer_fills.load(Ordering::Relaxed), 1);
        assert_eq!(asker.counters.peer_fills_quic.load(Ordering::Relaxed), 0);
    }

    /// A peer behind NAT, listed with no endpoint but the rendezvous it is attached to, is punched through
    /// that rendezvous (the clients' code) and asked over its QUIC endpoint; the fill counts as QUIC and as
    /// punched, and never touches libp2p. Loopback has no NAT, so this checks the path, not the hole:
    /// `testkit/tests/it/netns.rs` checks that through masquerading routers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_behind_nat_is_asked_over_a_path_punched_through_its_rendezvous() {
        use crate::rendezvous::{attach_forever, RendezvousServer, SharedAttachment};
        let chunk = Bytes::from(vec![6u8; 60_000]);
        let hash = ChunkHash::of(&chunk);
        let mut answer = PeerResponseHead::Ok { len: 60_000 }.encode();
        answer.extend_from_slice(&chunk);

        // A public node running the rendezvous on its endpoint.
        let r_key = SigningKey::from_bytes(&[21; 32]);
        let r_id = NodeId::from(r_key.verifying_key());
        let rendezvous = Arc::new(RendezvousServer::new(r_id));
        rendezvous.set_tracker_key(Some(NodeId::from(tracker_key().verifying_key())));
        let config = transport::server_config(&r_key, 8).expect("server config");
        let r_endpoint = transport::endpoint(([127, 0, 0, 1], 0).into(), Some(config)).expect("endpoint");
        let via = Rendezvous { id: r_id, addr: r_endpoint.local_addr().expect("addr") };
        let server = rendezvous.clone();
        tokio::spawn(async move {
            while let Some(incoming) = r_endpoint.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        server.serve_connection(conn).await;
                    }
                });
            }
        });

        // The peer: its endpoint answers fill requests and is attached to the rendezvous from it; over libp2p
        // it has nothing.
        let p_key = SigningKey::from_bytes(&[22; 32]);
        let (p_endpoint, asked) = answer_every_request_on_endpoint(&p_key, answer);
        let (_plan, plan) = tokio::sync::watch::channel(Some(vec![via.clone()]));
        let attachment = SharedAttachment::default();
        tokio::spawn(attach_forever(p_endpoint, p_key.clone(), plan, attachment.clone(), membership_of(&p_key)));
        for _ in 0..200 {
            if attachment.lock().expect("attachment lock").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(rendezvous.attached(), 1, "the peer did not attach");
        let (peer, peer_incoming, peer_id) = start(22);
        answer_every_request(peer_incoming, PeerResponseHead::NotFound.encode());

        let (asker, _asker_incoming) = start_with_quic(23);
        let contact = PeerContact { id: peer_id, addrs: Vec::new(), rendezvous: None, via: Some(via) };
        connect_contact(&asker, &peer, contact).await;
        assert_eq!(fetch(&asker, hash, 60_000).await, Some(chunk.clone()), "the chunk over the punched path");
        assert_eq!(fetch(&asker, hash, 60_000).await, Some(chunk), "again, on the same connection");
        assert_eq!(asked.load(Ordering::Relaxed), 2);
        let count = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let c = &asker.counters;
        assert_eq!((count(&c.peer_fills), count(&c.peer_fills_quic), count(&c.peer_fills_punched)), (2, 2, 2));
    }
}
