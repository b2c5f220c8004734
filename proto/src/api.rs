//! Types of the tracker's HTTP API (JSON). `docs/protocol.md` lists the endpoints.

use std::net::{IpAddr, SocketAddr};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::origins::OriginList;
use crate::web::WebOrigins;
use crate::{ContentId, Manifest, NodeId};

/// Milliseconds since the Unix epoch, as every `timestamp_ms` field carries them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A message a node signs with its identity key, so nobody can register or heartbeat in its name.
/// The signature covers `"fog-signed-v1\0" ‖ kind ‖ "\0" ‖ payload`, where `payload` is the exact JSON text
/// of the inner message: the verifier checks those bytes, then parses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub node_id: NodeId,
    pub payload: String,
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SignedError {
    #[error("node id is not a valid ed25519 public key")]
    BadKey,
    #[error("signature is malformed or does not verify")]
    BadSignature,
    #[error("payload is not a valid {kind} message: {source}")]
    Payload { kind: &'static str, source: serde_json::Error },
}

fn signed_bytes(kind: &str, payload: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(payload.len() + kind.len() + 16);
    m.extend_from_slice(b"fog-signed-v1\0");
    m.extend_from_slice(kind.as_bytes());
    m.push(0);
    m.extend_from_slice(payload.as_bytes());
    m
}

impl Signed {
    pub fn sign<T: Serialize>(key: &SigningKey, kind: &str, message: &T) -> Self {
        let payload = serde_json::to_string(message).expect("API messages always serialise");
        let signature = key.sign(&signed_bytes(kind, &payload));
        Self { node_id: key.verifying_key().into(), payload, signature: hex::encode(signature.to_bytes()) }
    }

    pub fn open<T: DeserializeOwned>(&self, kind: &'static str) -> Result<T, SignedError> {
        let key = self.node_id.verifying_key().map_err(|_| SignedError::BadKey)?;
        let mut sig = [0u8; 64];
        hex::decode_to_slice(&self.signature, &mut sig).map_err(|_| SignedError::BadSignature)?;
        key.verify(&signed_bytes(kind, &self.payload), &Signature::from_bytes(&sig))
            .map_err(|_| SignedError::BadSignature)?;
        serde_json::from_str(&self.payload).map_err(|source| SignedError::Payload { kind, source })
    }
}

/// Largest byte count or counter a node or client may report: far above any real total (8 PiB), exact in
/// JSON; the tracker sums reports with saturating arithmetic, so no report can wrap an aggregate.
pub const MAX_REPORTED: u64 = 1 << 53;
/// Most bytes one client report may claim (they cover ~10 s of playback).
pub const MAX_REPORTED_PER_REPORT: u64 = 1 << 40;
/// Longest version string a node may register with, and longest failure reason a client may report.
pub const MAX_VERSION_LEN: usize = 64;
pub const MAX_REASON_LEN: usize = 64;

fn check_label(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.len() > max || !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!("{what} must be at most {max} printable ASCII characters"));
    }
    Ok(())
}

fn check_counts(what: &str, counts: &[(&str, u64)], max: u64) -> Result<(), String> {
    match counts.iter().find(|(_, v)| *v > max) {
        Some((name, v)) => Err(format!("{what}: {name} = {v} is over the limit of {max}")),
        None => Ok(()),
    }
}

fn check_rtts(rtts_ms: impl IntoIterator<Item = f32>) -> Result<(), String> {
    if rtts_ms.into_iter().any(|rtt| !(rtt.is_finite() && (0.0..=60_000.0).contains(&rtt))) {
        return Err("RTT samples must be between 0 and 60000 ms".into());
    }
    Ok(())
}

pub const KIND_REGISTER: &str = "register";
pub const KIND_HEARTBEAT: &str = "heartbeat";

/// `POST /v1/nodes/register`, signed as [`KIND_REGISTER`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Register {
    /// Address clients should dial. An unspecified IP (0.0.0.0) means "the address you see me from".
    pub quic_addr: SocketAddr,
    pub cache_capacity: u64,
    /// Upload cap in bytes/s, if the owner set one.
    pub upload_limit: Option<u64>,
    pub version: String,
    /// Milliseconds since the Unix epoch; the tracker refuses stale or future messages (replay guard).
    pub timestamp_ms: u64,
    /// The node's overlay is still connecting its neighbourhood (see [`OverlayReport::joining`]).
    #[serde(default)]
    pub joining: bool,
    /// The region its operator placed it in (`--region`): nodes with one label share a cell, whatever
    /// their coordinates say. At most [`MAX_VERSION_LEN`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Most extra addresses a node may advertise ([`OverlayReport::quic_addrs`]): each costs the tracker a
/// dial-back.
pub const MAX_QUIC_ADDRS: usize = 4;

/// Refuses extra addresses nobody can dial, and more than [`MAX_QUIC_ADDRS`] of them.
fn check_quic_addrs(addrs: &[SocketAddr]) -> Result<(), String> {
    if addrs.len() > MAX_QUIC_ADDRS {
        return Err(format!("at most {MAX_QUIC_ADDRS} extra QUIC addresses"));
    }
    match addrs.iter().find(|a| a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast()) {
        Some(a) => Err(format!("{a} is not an address clients can dial")),
        None => Ok(()),
    }
}

impl Register {
    /// Refuses registrations with fields out of range (the tracker shows them on its dashboard).
    pub fn check_bounds(&self) -> Result<(), String> {
        check_label("version", &self.version, MAX_VERSION_LEN)?;
        if let Some(region) = &self.region {
            check_label("region", region, MAX_VERSION_LEN)?;
        }
        let limit = [("cache_capacity", self.cache_capacity), ("upload_limit", self.upload_limit.unwrap_or(0))];
        check_counts("registration", &limit, MAX_REPORTED)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub heartbeat_interval_secs: u64,
    /// The address the tracker will hand to clients.
    pub advertised_addr: SocketAddr,
    /// Origins the node may pull from on a miss.
    pub origins: OriginList,
    /// The key the tracker signs tickets and ledger heads with.
    #[serde(default)]
    pub tracker_key: Option<NodeId>,
    /// Whether the tracker's dial-back reached the node in every family it advertised an address in
    /// (`advertised_addr`, and [`OverlayReport::quic_addrs`] once a heartbeat brought them). A node that is not reachable attaches to a rendezvous
    /// node so clients can hole-punch to it.
    #[serde(default)]
    pub reachable: bool,
    /// The advertised addresses the dial-back reached: clients are handed these (in the families they use).
    #[serde(default)]
    pub verified_addrs: Vec<SocketAddr>,
    /// Overlay peers to connect to (bootstrap), publicly reachable ones first.
    #[serde(default)]
    pub peers: Vec<PeerContact>,
    /// Signed by the tracker ([`KIND_MEMBERSHIP`]): this node is registered. A node behind NAT shows it to
    /// the rendezvous it attaches to.
    #[serde(default)]
    pub membership: Option<Signed>,
    /// The node's cell, when the tracker partitions the overlay into cells.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<CellList>,
    /// Sites whose pages may open WebTransport sessions to the node (the session's `Origin`).
    #[serde(default, skip_serializing_if = "WebOrigins::is_empty")]
    pub web_origins: WebOrigins,
}

/// Signed-message kind of [`Membership`].
pub const KIND_MEMBERSHIP: &str = "membership";

/// The tracker's word that `node_id` registered, valid until `expiry_ms` (nodes register again before then).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub node_id: NodeId,
    pub issued_ms: u64,
    pub expiry_ms: u64,
}

impl Membership {
    /// Opens a membership the tracker (`tracker_key`) signed for `node`, unexpired at `now_ms`.
    pub fn verify(signed: &Signed, tracker_key: NodeId, node: NodeId, now_ms: u64) -> Result<Self, &'static str> {
        if signed.node_id != tracker_key {
            return Err("membership not signed by the tracker");
        }
        let m: Membership = signed.open(KIND_MEMBERSHIP).map_err(|_| "membership signature does not verify")?;
        if m.node_id != node {
            return Err("membership is for another node");
        }
        if m.expiry_ms <= now_ms {
            return Err("membership expired; register again");
        }
        Ok(m)
    }
}

/// A node's overlay neighbourhood: its nearest direct peers, among which peer fill finds a chunk's home.
pub const NEIGHBOURHOOD: usize = 32;
/// Most peers the tracker hands out at once (the neighbourhood, then others), and most RTT samples / bad
/// peers a heartbeat may carry.
pub const MAX_PEERS_LISTED: usize = NEIGHBOURHOOD + 16;
pub const MAX_RTT_SAMPLES: usize = 64;
/// Most libp2p addresses per peer in API messages, and their longest textual form.
pub const MAX_PEER_ADDRS: usize = 8;
pub const MAX_ADDR_LEN: usize = 256;

/// One overlay peer: its id and libp2p multiaddrs (text).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerContact {
    pub id: NodeId,
    pub addrs: Vec<String>,
    /// The peer's QUIC chunk endpoint, when it is publicly reachable (a possible rendezvous).
    #[serde(default)]
    pub rendezvous: Option<SocketAddr>,
    /// For a peer behind NAT (no `rendezvous`): the rendezvous it is attached to, which punches a path to
    /// its QUIC endpoint as for clients ([`NodeContact::via`]), so fills from it go under its congestion
    /// controller too. Nodes that predate it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Rendezvous>,
}

/// Most members a cell lists to its nodes (`fog_sched::cells` splits bigger cells into parts).
pub const MAX_CELL_LISTED: usize = 2048;

/// The members of a node's cell (issue #17): every member ranks this same list for a missed chunk, so all
/// agree on the chunk's home and it is fetched from the origin once per cell. The node is listed too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellList {
    /// [`CellList::version_of`] the members: changes whenever the members or their addresses do. The node
    /// reports the version it holds ([`OverlayReport::cell_version`]) and the tracker sends the list (or
    /// a [`CellDelta`] from the held version) only when it changed.
    pub version: u64,
    /// Sorted by id, each id once, at most [`MAX_CELL_LISTED`] ([`CellList::check_bounds`]).
    pub members: Vec<PeerContact>,
}

/// What changes a node's cell list from version `from` to version `to` (issue #17): sent instead of the
/// whole list when the node reports it holds `from` and asks for changes ([`OverlayReport::cell_deltas`]).
/// An id is in at most one of `added` and `removed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellDelta {
    pub from: u64,
    pub to: u64,
    /// Members new since `from`, or whose addresses changed: each replaces any member with its id. Sorted
    /// by id, at most [`MAX_CELL_LISTED`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<PeerContact>,
    /// Members gone since `from` (an id the node does not hold is ignored). At most [`MAX_CELL_LISTED`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<NodeId>,
}

/// Why a cell list or change from the tracker was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    /// The node holds another version (an answer crossed a newer one): its next report names the version
    /// it holds, and the tracker answers with the change from there or the whole list. Retrying helps.
    #[error("cell change from version {from:016x}, but version {held:016x} is held")]
    NotHeld { from: u64, held: u64 },
    /// The tracker broke the protocol: only the whole list can help.
    #[error("cell list from the tracker out of bounds: {0}")]
    Bounds(&'static str),
    /// The change does not lead to the version it names: only the whole list can help.
    #[error("cell change to version {to:016x} gives version {got:016x}")]
    Mismatch { to: u64, got: u64 },
}

impl CellList {
    /// The list of `members` (sorted by id here) and its version.
    pub fn new(mut members: Vec<PeerContact>) -> Self {
        members.sort_unstable_by_key(|m| m.id);
        Self { version: Self::version_of(&members), members }
    }

    /// A digest of `members` in order, ids and addresses, each length-prefixed so no two lists share a
    /// form: equal versions mean equal lists (up to a 64-bit collision), which lets a node check that a
    /// change gave it exactly the tracker's list.
    pub fn version_of(members: &[PeerContact]) -> u64 {
        let mut h = blake3::Hasher::new();
        let text = |h: &mut blake3::Hasher, t: &str| {
            h.update(&(t.len() as u64).to_be_bytes());
            h.update(t.as_bytes());
        };
        h.update(&(members.len() as u64).to_be_bytes());
        for m in members {
            h.update(m.id.as_bytes());
            h.update(&(m.addrs.len() as u64).to_be_bytes());
            for a in &m.addrs {
                text(&mut h, a);
            }
            let rendezvous = m.rendezvous.map(|r| r.to_string()).unwrap_or_default();
            match &m.via {
                // In the rendezvous's text (no address contains " via "), so lists without peers behind NAT
                // keep the versions nodes that predate `via` compute; those nodes get whole lists when a
                // list with one changes.
                Some(via) => text(&mut h, &format!("{rendezvous} via {}@{}", via.id, via.addr)),
                None => text(&mut h, &rendezvous),
            }
        }
        let mut first = [0u8; 8];
        first.copy_from_slice(&h.finalize().as_bytes()[..8]);
        u64::from_be_bytes(first)
    }

    /// Refuses lists a node could not hold or change: too many members or addresses, ids out of order.
    pub fn check_bounds(&self) -> Result<(), CellError> {
        if self.members.len() > MAX_CELL_LISTED {
            return Err(CellError::Bounds("more members than MAX_CELL_LISTED"));
        }
        if self.members.windows(2).any(|w| w[0].id >= w[1].id) {
            return Err(CellError::Bounds("members not sorted by id, each once"));
        }
        check_contacts(&self.members)
    }

    /// This list changed by `delta`, which must start from this version and end at the version it names
    /// (checked by digest, so a node never holds a list the tracker did not).
    pub fn apply(&self, delta: &CellDelta) -> Result<CellList, CellError> {
        if delta.from != self.version {
            return Err(CellError::NotHeld { from: delta.from, held: self.version });
        }
        delta.check_bounds()?;
        let mut removed = delta.removed.iter().peekable();
        let mut added = delta.added.iter().peekable();
        let mut members = Vec::with_capacity(self.members.len() + delta.added.len());
        // All three are sorted by id: one merge.
        for held in &self.members {
            while let Some(a) = added.next_if(|a| a.id < held.id) {
                members.push(a.clone());
            }
            while removed.next_if(|r| **r < held.id).is_some() {}
            if removed.next_if(|r| **r == held.id).is_some() {
                continue;
            }
            match added.next_if(|a| a.id == held.id) {
                Some(a) => members.push(a.clone()),
                None => members.push(held.clone()),
            }
        }
        members.extend(added.cloned());
        if members.len() > MAX_CELL_LISTED {
            return Err(CellError::Bounds("changed list over MAX_CELL_LISTED members"));
        }
        let got = Self::version_of(&members);
        if got != delta.to {
            return Err(CellError::Mismatch { to: delta.to, got });
        }
        Ok(CellList { version: got, members })
    }
}

impl CellDelta {
    /// What changes `old` into `new` (both sorted by id, as [`CellList::check_bounds`] wants).
    pub fn between(old: &CellList, new: &CellList) -> Self {
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        let mut next = new.members.iter().peekable();
        for o in &old.members {
            while let Some(n) = next.next_if(|n| n.id < o.id) {
                added.push(n.clone());
            }
            match next.next_if(|n| n.id == o.id) {
                Some(n) if n != o => added.push(n.clone()),
                Some(_) => {}
                None => removed.push(o.id),
            }
        }
        added.extend(next.cloned());
        Self { from: old.version, to: new.version, added, removed }
    }

    /// This change, then `next` (which starts where this one ends), as one change. Exact for a node
    /// holding `self.from`; it may remove an id that node never held (added, then removed again).
    pub fn then(&self, next: &CellDelta) -> Self {
        let mut by_id: std::collections::BTreeMap<NodeId, Option<&PeerContact>> = std::collections::BTreeMap::new();
        for d in [self, next] {
            by_id.extend(d.added.iter().map(|a| (a.id, Some(a))));
            by_id.extend(d.removed.iter().map(|r| (*r, None)));
        }
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for (id, change) in by_id {
            match change {
                Some(a) => added.push(a.clone()),
                None => removed.push(id),
            }
        }
        Self { from: self.from, to: next.to, added, removed }
    }

    /// Refuses changes over the bounds, out of order, or naming an id twice.
    pub fn check_bounds(&self) -> Result<(), CellError> {
        if self.added.len() > MAX_CELL_LISTED || self.removed.len() > MAX_CELL_LISTED {
            return Err(CellError::Bounds("more changed members than MAX_CELL_LISTED"));
        }
        if self.added.windows(2).any(|w| w[0].id >= w[1].id) || self.removed.windows(2).any(|w| w[0] >= w[1]) {
            return Err(CellError::Bounds("changed members not sorted by id, each once"));
        }
        // Both sorted: an id in both shows up in one merge.
        let (mut a, mut r) = (self.added.iter().map(|m| m.id).peekable(), self.removed.iter().peekable());
        while let (Some(x), Some(y)) = (a.peek(), r.peek()) {
            match x.cmp(y) {
                std::cmp::Ordering::Less => {
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    r.next();
                }
                std::cmp::Ordering::Equal => return Err(CellError::Bounds("a member both added and removed")),
            }
        }
        check_contacts(&self.added)
    }
}

/// Each contact within [`MAX_PEER_ADDRS`] addresses of [`MAX_ADDR_LEN`] bytes, as nodes report them.
fn check_contacts(contacts: &[PeerContact]) -> Result<(), CellError> {
    if contacts.iter().any(|m| m.addrs.len() > MAX_PEER_ADDRS || m.addrs.iter().any(|a| a.len() > MAX_ADDR_LEN)) {
        return Err(CellError::Bounds("a member with more than MAX_PEER_ADDRS addresses or a too long one"));
    }
    Ok(())
}

/// How a node's overlay (libp2p) sees its own reachability.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reachability {
    /// Not yet known (AutoNAT has not finished).
    #[default]
    Unknown,
    /// An external address was confirmed by AutoNAT: peers can dial it directly.
    Public,
    /// Behind NAT without a relay reservation: only outbound connections work.
    Nat,
    /// Behind NAT, reachable through a relay reservation (and hole punching from there).
    Relayed,
}

impl Reachability {
    pub const ALL: [Reachability; 4] = [Self::Unknown, Self::Public, Self::Nat, Self::Relayed];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Public => "public",
            Self::Nat => "nat",
            Self::Relayed => "relayed",
        }
    }
}

/// One filtered round-trip time to another party.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RttSample {
    pub peer: NodeId,
    pub rtt_ms: f32,
}

impl RttSample {
    /// Records the latest RTT to `peer` in `samples`: replaces an older one to the same peer, else adds it
    /// while there are fewer than `max` (what a client's next report carries).
    pub fn record(samples: &mut Vec<RttSample>, peer: NodeId, rtt_ms: f32, max: usize) {
        if let Some(s) = samples.iter_mut().find(|s| s.peer == peer) {
            s.rtt_ms = rtt_ms;
        } else if samples.len() < max {
            samples.push(RttSample { peer, rtt_ms });
        }
    }
}

/// What a node's overlay reports with each heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OverlayReport {
    pub reachability: Reachability,
    /// Addresses peers can dial: listen addresses, AutoNAT-confirmed external ones and relayed ones.
    pub addrs: Vec<String>,
    /// Filtered RTTs to connected peers (see `fog_proto::rtt`).
    pub rtt: Vec<RttSample>,
    /// Filtered RTT to the tracker (TCP handshake time).
    pub tracker_rtt_ms: Option<f32>,
    /// The publicly reachable node this node is attached to, for clients to hole-punch through.
    pub rendezvous: Option<NodeId>,
    /// This node's QUIC chunk endpoint as the rendezvous node sees it (its NAT mapping).
    pub external_quic: Option<SocketAddr>,
    /// Peers that sent chunk bytes not matching their hash since the last heartbeat.
    pub bad_peers: Vec<NodeId>,
    /// Overlay peers connected now; below [`WANT_PEERS`] the tracker suggests more in its answer.
    #[serde(default)]
    pub connected_peers: u32,
    /// Nodes attached to this node as their rendezvous (at most [`MAX_ATTACHED`]): the tracker sends
    /// clients through a rendezvous only to nodes it lists.
    #[serde(default)]
    pub attached: Vec<NodeId>,
    /// The overlay is still connecting the neighbourhood the tracker suggested (for at most a few seconds):
    /// the tracker schedules nothing here yet, so the node's first misses are filled from its peers, not
    /// the origin.
    #[serde(default)]
    pub joining: bool,
    /// More QUIC addresses clients may dial besides the registered one, typically in the other family (a
    /// dual-stack node's global IPv6 address). The tracker dials a changed set back and hands out only the
    /// addresses that answered. At most [`MAX_QUIC_ADDRS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quic_addrs: Vec<SocketAddr>,
    /// The [`CellList::version`] the node holds, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_version: Option<u64>,
    /// The node takes a [`CellDelta`] from the version it holds instead of the whole list (older nodes
    /// do not say so and get whole lists).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cell_deltas: bool,
}

/// Most nodes one rendezvous keeps attached (each costs it one idle QUIC connection).
pub const MAX_ATTACHED: usize = 256;

/// A node with fewer connected overlay peers than this gets bootstrap peers with its heartbeat answer (so a
/// node's neighbourhood fills up as nearby nodes join).
pub const WANT_PEERS: u32 = NEIGHBOURHOOD as u32;

impl OverlayReport {
    /// Refuses reports whose lists exceed the protocol bounds.
    pub fn check_bounds(&self) -> Result<(), String> {
        if self.rtt.len() > MAX_RTT_SAMPLES || self.bad_peers.len() > MAX_RTT_SAMPLES {
            return Err(format!("at most {MAX_RTT_SAMPLES} RTT samples and bad peers per heartbeat"));
        }
        if self.attached.len() > MAX_ATTACHED {
            return Err(format!("at most {MAX_ATTACHED} attached nodes per heartbeat"));
        }
        if self.addrs.len() > MAX_PEER_ADDRS || self.addrs.iter().any(|a| a.len() > MAX_ADDR_LEN) {
            return Err(format!("at most {MAX_PEER_ADDRS} addresses of {MAX_ADDR_LEN} bytes each"));
        }
        check_quic_addrs(&self.quic_addrs)?;
        check_rtts(self.rtt.iter().map(|s| s.rtt_ms).chain(self.tracker_rtt_ms))
    }
}

/// `POST /v1/nodes/heartbeat`, signed as [`KIND_HEARTBEAT`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub timestamp_ms: u64,
    pub stats: NodeStats,
    /// The node is shutting down: finish what is in flight, send it nothing new.
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub overlay: Option<OverlayReport>,
    /// Where browsers reach the node over WebTransport (absent from nodes older than that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_transport: Option<WebTransportEndpoint>,
    /// The owner's schedule and monthly budget as they stand (absent from older nodes, and from nodes
    /// whose owner set neither).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_plan: Option<UploadPlan>,
}

/// What a node's owner allows it to upload at one moment of the schedule (`docs/operations.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadMode {
    /// No cap.
    Unlimited,
    /// At most this many bytes per second.
    Rate(u64),
    /// Not serving: new requests are answered `Busy`.
    Off,
}

impl UploadMode {
    /// The cap in bytes per second, if serving with one.
    pub fn cap(self) -> Option<u64> {
        match self {
            Self::Rate(r) => Some(r),
            Self::Unlimited | Self::Off => None,
        }
    }
}

/// The owner's limits as a heartbeat reports them: the mode in force, when the schedule changes it next,
/// when the next off window starts, and what is left of the month's upload budget. Lets the tracker stop
/// sending clients before a window or the budget ends (`docs/protocol.md`, heartbeat).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadPlan {
    pub now: UploadMode,
    /// The schedule's next change: in how many seconds, and to what (absent: the schedule never changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<UploadChange>,
    /// Seconds until the next off window starts (absent: none within a week, or off now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_in_secs: Option<u32>,
    /// Bytes of this calendar month's upload budget not yet used or reserved (absent: no budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_left: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadChange {
    pub in_secs: u32,
    pub mode: UploadMode,
}

/// A schedule repeats weekly: its next change and off window are at most a week away (plus a day of slack
/// for a daylight-saving shift).
pub const MAX_PLAN_SECS: u32 = 8 * 24 * 3600;

impl UploadPlan {
    /// Refuses plans no node's schedule or budget produces.
    pub fn check_bounds(&self) -> Result<(), String> {
        let modes = std::iter::once(self.now).chain(self.next.map(|c| c.mode));
        let rates = modes.filter_map(UploadMode::cap);
        if rates.into_iter().any(|r| r == 0 || r > MAX_REPORTED) {
            return Err(format!("upload plan: a rate must be within 1..={MAX_REPORTED} bytes/s"));
        }
        let secs = self.next.map(|c| c.in_secs).into_iter().chain(self.off_in_secs);
        if secs.into_iter().any(|s| s > MAX_PLAN_SECS) {
            return Err(format!("upload plan: changes are at most {MAX_PLAN_SECS} s ahead"));
        }
        check_counts("upload plan", &[("budget_left", self.budget_left.unwrap_or(0))], MAX_REPORTED)
    }
}

crate::id::hex_id!(
    /// SHA-256 of a node's WebTransport certificate (DER): what a browser pins (`serverCertificateHashes`).
    CertHash,
    "certificate hash",
    32
);

/// Most certificate hashes a node advertises: the one it serves and the next one, with room to spare.
pub const MAX_WEB_CERT_HASHES: usize = 4;

/// The path of a node's WebTransport URL, `https://<addr>:<port>/fog/1`: it names the protocol version, as
/// the ALPN does on native connections.
pub const WEB_TRANSPORT_PATH: &str = "/fog/1";

/// A node's WebTransport endpoint for browsers (`docs/protocol.md`, "WebTransport"). Bounds are checked
/// when it is parsed, so no reader can forget them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawWebTransportEndpoint")]
pub struct WebTransportEndpoint {
    /// UDP port at the node's addresses (its QUIC port: one endpoint serves both protocols).
    pub port: u16,
    /// Hashes of the certificates browsers may meet: the one served now first, then the next one while it
    /// is announced ahead of the switch. A page given all of them connects across a rotation. 1 to
    /// [`MAX_WEB_CERT_HASHES`].
    pub cert_hashes: Vec<CertHash>,
}

#[derive(Deserialize)]
struct RawWebTransportEndpoint {
    port: u16,
    cert_hashes: Vec<CertHash>,
}

impl TryFrom<RawWebTransportEndpoint> for WebTransportEndpoint {
    type Error = String;
    fn try_from(raw: RawWebTransportEndpoint) -> Result<Self, String> {
        if raw.port == 0 {
            return Err("the WebTransport port must not be 0".into());
        }
        if raw.cert_hashes.is_empty() || raw.cert_hashes.len() > MAX_WEB_CERT_HASHES {
            return Err(format!("1 to {MAX_WEB_CERT_HASHES} WebTransport certificate hashes"));
        }
        Ok(Self { port: raw.port, cert_hashes: raw.cert_hashes })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// False when the tracker does not know this node (it restarted or forgot it): register again.
    pub registered: bool,
    pub origins: OriginList,
    #[serde(default)]
    pub peers: Vec<PeerContact>,
    /// As [`RegisterResponse::reachable`] and [`RegisterResponse::verified_addrs`], now (absent from older
    /// trackers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_addrs: Option<Vec<SocketAddr>>,
    /// The node's cell, when it changed from the version the heartbeat reported (and no `cell_delta`
    /// from there is at hand, or the node did not ask for one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<CellList>,
    /// Instead of `cell`: the change from the version the heartbeat reported to the current list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell_delta: Option<CellDelta>,
    /// As [`RegisterResponse::web_origins`], now.
    #[serde(default, skip_serializing_if = "WebOrigins::is_empty")]
    pub web_origins: WebOrigins,
}

/// What a node reports about itself. Counters are totals since the node started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    pub cache_used: u64,
    pub cache_capacity: u64,
    pub cached_chunks: u64,
    pub active_streams: u64,
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub bytes_served: u64,
    pub origin_fills: u64,
    pub origin_bytes: u64,
    /// Chunks read back from disk that no longer matched their hash (dropped, never served).
    pub corrupt_chunks: u64,
    pub bad_requests: u64,
    pub store_errors: u64,
    /// Misses filled from overlay peers instead of the origin, and their bytes.
    #[serde(default)]
    pub peer_fills: u64,
    #[serde(default)]
    pub peer_fill_bytes: u64,
    /// Bytes this node sent to peers filling their misses.
    #[serde(default)]
    pub peer_served_bytes: u64,
    /// Chunks from peers that did not match their hash (the peer was disconnected and reported).
    #[serde(default)]
    pub peer_bad_chunks: u64,
    /// Chunks this node filled through for peers that asked it as the chunk's home.
    #[serde(default)]
    pub home_fills: u64,
    /// Origin hints ignored for want of a valid ticket with fills left (the miss was then served from peers'
    /// stores only, or refused).
    #[serde(default)]
    pub unlicensed_hints: u64,
    /// Of `peer_fills`, those that came over the peer's own QUIC endpoint (`fog-peer/1`); the rest came
    /// over libp2p.
    #[serde(default)]
    pub peer_fills_quic: u64,
    /// Of `peer_served_bytes`, those sent over this node's QUIC endpoint, under its `--upload-priority`;
    /// the rest went over libp2p, under libp2p's or the kernel's congestion control.
    #[serde(default)]
    pub peer_served_quic_bytes: u64,
    /// Of `peer_fills_quic`, those from peers behind NAT, over a path punched through their rendezvous.
    #[serde(default)]
    pub peer_fills_punched: u64,
}

impl NodeStats {
    /// Refuses counters no real node reaches, which could only distort the tracker's totals.
    pub fn check_bounds(&self) -> Result<(), String> {
        let counts = [
            ("cache_used", self.cache_used),
            ("cache_capacity", self.cache_capacity),
            ("cached_chunks", self.cached_chunks),
            ("active_streams", self.active_streams),
            ("requests", self.requests),
            ("hits", self.hits),
            ("misses", self.misses),
            ("bytes_served", self.bytes_served),
            ("origin_fills", self.origin_fills),
            ("origin_bytes", self.origin_bytes),
            ("corrupt_chunks", self.corrupt_chunks),
            ("bad_requests", self.bad_requests),
            ("store_errors", self.store_errors),
            ("peer_fills", self.peer_fills),
            ("peer_fill_bytes", self.peer_fill_bytes),
            ("peer_served_bytes", self.peer_served_bytes),
            ("peer_bad_chunks", self.peer_bad_chunks),
            ("home_fills", self.home_fills),
            ("unlicensed_hints", self.unlicensed_hints),
            ("peer_fills_quic", self.peer_fills_quic),
            ("peer_served_quic_bytes", self.peer_served_quic_bytes),
            ("peer_fills_punched", self.peer_fills_punched),
        ];
        check_counts("node stats", &counts, MAX_REPORTED)
    }
}

/// One node a client may fetch from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeContact {
    pub id: NodeId,
    /// Where to dial it; for a node behind NAT, its last known NAT mapping (the rendezvous gives a fresh one).
    pub addr: SocketAddr,
    /// More verified direct addresses (another family), raced with `addr` (Happy Eyeballs); with `via`, the
    /// direct addresses to try before a punch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_addrs: Vec<SocketAddr>,
    /// For a node behind NAT: the publicly reachable node that coordinates hole punching to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<Rendezvous>,
    /// In answers to browser pages only: where the page opens a WebTransport session to the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web: Option<WebContact>,
}

/// A node's WebTransport endpoint as a browser page uses it (issue #14): a URL at the contact's `addr`, and
/// the certificate hashes to pin (`serverCertificateHashes`), which the tracker's own probe connected with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebContact {
    /// `https://ADDR:PORT/fog/1`.
    pub url: String,
    /// The served certificate's first, then the next one's while the node announces it (at most
    /// [`MAX_WEB_CERT_HASHES`]).
    pub cert_hashes: Vec<CertHash>,
}

impl WebContact {
    /// The endpoint `web` advertises, at `addr`.
    pub fn at(addr: SocketAddr, web: &WebTransportEndpoint) -> Self {
        let url = format!("https://{}{WEB_TRANSPORT_PATH}", SocketAddr::new(addr.ip().to_canonical(), web.port));
        Self { url, cert_hashes: web.cert_hashes.clone() }
    }
}

impl NodeContact {
    /// A node dialled at `addr` only.
    pub fn direct(id: NodeId, addr: SocketAddr) -> Self {
        Self { id, addr, other_addrs: Vec::new(), via: None, web: None }
    }

    /// Where the node answers directly, best first: `addr` and `other_addrs`, or only `other_addrs` for a
    /// node reached through a rendezvous (`addr` is then its NAT mapping).
    pub fn direct_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let addr = self.via.is_none().then_some(self.addr);
        addr.into_iter().chain(self.other_addrs.iter().copied())
    }

    /// Whether a client that can use `families` can dial the node ([`NodeContact::for_families`] is `Some`).
    pub fn usable_by(&self, families: Families) -> bool {
        self.direct_addrs().any(|a| families.allows(&a))
            || self.via.as_ref().is_some_and(|v| families.allows(&v.addr) && families.allows(&self.addr))
    }

    /// What a client that can use `families` may be given: the direct addresses in them, without the
    /// rendezvous (a verified direct path needs no punch); else the punch, if the node's mapping and its
    /// rendezvous are both in them; else nothing.
    pub fn for_families(&self, families: Families) -> Option<NodeContact> {
        let mut direct = self.direct_addrs().filter(|a| families.allows(a));
        if let Some(addr) = direct.next() {
            // A web contact is at `addr`, and browsers dial nodes only directly.
            let web = self.web.clone().filter(|_| addr == self.addr);
            return Some(NodeContact { id: self.id, addr, other_addrs: direct.collect(), via: None, web });
        }
        let via = self.via.as_ref().filter(|v| families.allows(&v.addr) && families.allows(&self.addr))?;
        Some(NodeContact { via: Some(via.clone()), ..NodeContact::direct(self.id, self.addr) })
    }
}

/// The IP families a client can use. It names them in `resolve` (`families=ipv4,ipv6`); the tracker adds
/// the family the request came in by, and hands out only addresses in them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Families {
    pub const BOTH: Families = Families { ipv4: true, ipv6: true };

    /// The family of `ip` (a v4-mapped IPv6 address is IPv4).
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(_) => Self { ipv4: true, ipv6: false },
            IpAddr::V6(_) => Self { ipv4: false, ipv6: true },
        }
    }

    pub fn allows(self, addr: &SocketAddr) -> bool {
        match addr.ip().to_canonical() {
            IpAddr::V4(_) => self.ipv4,
            IpAddr::V6(_) => self.ipv6,
        }
    }

    pub fn union(self, other: Self) -> Self {
        Self { ipv4: self.ipv4 || other.ipv4, ipv6: self.ipv6 || other.ipv6 }
    }

    /// The query form: `ipv4`, `ipv6`, `ipv4,ipv6` or empty.
    pub fn to_query(self) -> String {
        [(self.ipv4, "ipv4"), (self.ipv6, "ipv6")].iter().filter(|f| f.0).map(|f| f.1).collect::<Vec<_>>().join(",")
    }

    /// Parses [`Families::to_query`]'s form.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut families = Self::default();
        for name in text.split(',').filter(|n| !n.is_empty()) {
            match name {
                "ipv4" => families.ipv4 = true,
                "ipv6" => families.ipv6 = true,
                _ => return Err(format!("families: {name:?} is neither ipv4 nor ipv6")),
            }
        }
        Ok(families)
    }
}

/// A publicly reachable node that a NAT'd node keeps a connection to (see `docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendezvous {
    pub id: NodeId,
    pub addr: SocketAddr,
}

/// `GET /v1/resolve?url=…`: the manifest and, per chunk, candidate nodes best first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resolve {
    pub content_id: ContentId,
    pub manifest: Manifest,
    pub nodes: Vec<NodeContact>,
    /// `schedule[i]` lists indices into `nodes` for chunk `i`, best candidate first.
    pub schedule: Vec<Vec<u32>>,
    /// The session's credit ticket (signed by the tracker), when the client sent a session key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<Signed>,
}

/// `PUT /v1/admin/manifests` (admin token): the tracker now serves this manifest, built where the content
/// is packaged (`fog manifest`), and never downloads the object to hash it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The URL as the tracker keys it (canonical form).
    pub url: String,
    pub content_id: ContentId,
}

/// `POST /v1/reports`: what a client (player proxy) saw since its last report. Unauthenticated, so the
/// tracker only counts it for dashboards and metrics; it never decides scheduling on its own.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClientReport {
    pub fog_bytes: u64,
    pub origin_bytes: u64,
    /// Bytes fetched straight from the origin because the fog could not be used (tracker down, unknown origin).
    pub passthrough_bytes: u64,
    pub node_failures: Vec<NodeFailure>,
    /// QUIC RTTs the client measured to nodes (at most [`MAX_CLIENT_RTTS`]): the tracker fits the client's
    /// network prefix a coordinate from them, after dropping samples that disagree with the rest.
    #[serde(default)]
    pub node_rtt: Vec<RttSample>,
    /// Live HLS media playlists the client plays (at most [`MAX_LIVE_PLAYLISTS`], each URL at most
    /// [`MAX_LIVE_URL_LEN`] bytes): the tracker follows them while they have viewers and pushes their new
    /// segments to the nodes of the client's cell before it asks. A proxy reports one as it fetches it.
    #[serde(default)]
    pub live_playlists: Vec<String>,
}

/// Most node RTTs one client report may carry.
pub const MAX_CLIENT_RTTS: usize = 16;

/// Most live playlists one client report may name, and the longest URL of one.
pub const MAX_LIVE_PLAYLISTS: usize = 8;
pub const MAX_LIVE_URL_LEN: usize = 2048;

/// Most failure entries one report may carry.
pub const MAX_REPORTED_FAILURES: usize = 256;

impl ClientReport {
    /// Refuses reports longer or larger than a real client sends.
    pub fn check_bounds(&self) -> Result<(), String> {
        if self.node_failures.len() > MAX_REPORTED_FAILURES || self.node_rtt.len() > MAX_CLIENT_RTTS {
            return Err(format!(
                "at most {MAX_REPORTED_FAILURES} node failure entries and {MAX_CLIENT_RTTS} node RTTs per report"
            ));
        }
        let bytes = [
            ("fog_bytes", self.fog_bytes),
            ("origin_bytes", self.origin_bytes),
            ("passthrough_bytes", self.passthrough_bytes),
        ];
        check_counts("client report", &bytes, MAX_REPORTED_PER_REPORT)?;
        for f in &self.node_failures {
            check_label("failure reason", &f.reason, MAX_REASON_LEN)?;
            check_counts("client report", &[("failure count", f.count)], u64::from(u32::MAX))?;
        }
        if self.live_playlists.len() > MAX_LIVE_PLAYLISTS
            || self.live_playlists.iter().any(|u| u.len() > MAX_LIVE_URL_LEN)
        {
            return Err(format!(
                "at most {MAX_LIVE_PLAYLISTS} live playlists per report, each URL at most {MAX_LIVE_URL_LEN} bytes"
            ));
        }
        check_rtts(self.node_rtt.iter().map(|s| s.rtt_ms))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFailure {
    pub node: NodeId,
    /// Short reason code (timeout, stream_error, hash_mismatch, …).
    pub reason: String,
    pub count: u64,
}

/// Machine-readable error codes of the tracker API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownOrigin,
    OriginNotFound,
    OriginError,
    TooLarge,
    Unauthorized,
    RegistryFull,
    /// The requester's source (IPv4 address or IPv6 /64) used up its share of this kind of work.
    RateLimited,
    /// A browser page from a site the operator did not register (`--web-origin`).
    UnknownWebOrigin,
    Internal,
}

/// The body of every non-2xx tracker response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: ErrorCode,
    pub message: String,
    /// Whether the same request may succeed later.
    pub retryable: bool,
}

/// `GET /v1/stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrackerStats {
    pub nodes_total: u64,
    /// Nodes being scheduled (heartbeating, passing probes, not joining, draining or quarantined).
    pub nodes_healthy: u64,
    /// Nodes whose overlay is still connecting its neighbourhood (not scheduled yet).
    #[serde(default)]
    pub nodes_joining: u64,
    #[serde(default)]
    pub nodes_draining: u64,
    #[serde(default)]
    pub nodes_quarantined: u64,
    /// Nodes otherwise healthy that no client can reach (not dialled back, no rendezvous): not scheduled.
    #[serde(default)]
    pub nodes_unreachable: u64,
    pub manifests: u64,
    pub cache_used: u64,
    pub cache_capacity: u64,
    /// Sum of bytes served as reported by healthy nodes.
    pub bytes_served: u64,
    /// Sum of bytes healthy nodes pulled from origins on misses, as they report.
    pub origin_fill_bytes: u64,
    pub resolves: u64,
    pub ingests: u64,
    pub ingest_errors: u64,
    /// Objects being read from their origins right now (resolves meanwhile get the chunks hashed so far).
    #[serde(default)]
    pub ingests_running: u64,
    /// Live nodes by how their overlay sees itself (`unknown`, `public`, `nat`, `relayed`).
    #[serde(default)]
    pub nodes_by_reachability: std::collections::BTreeMap<String, u64>,
    /// Live nodes by how clients reach them: `direct` (tracker dial-back worked), `hole_punch` (through a
    /// rendezvous) or `unreachable` (not scheduled).
    #[serde(default)]
    pub nodes_by_client_path: std::collections::BTreeMap<String, u64>,
    /// Live nodes by IP family (`ipv4`, `ipv6`): how many the tracker dialled back in it, and how many
    /// advertised an address in it that it could not dial.
    #[serde(default)]
    pub nodes_by_family: std::collections::BTreeMap<String, FamilyCounts>,
    /// Cells the healthy nodes are partitioned into (parts of split cells count; 0: cells are off).
    #[serde(default)]
    pub cells: u64,
}

/// Nodes with an address in one IP family, by whether the tracker's dial-back reached one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyCounts {
    pub verified: u64,
    pub unverified: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_fields_are_bounded() {
        let reg = |version: &str, cache_capacity| Register {
            quic_addr: "127.0.0.1:1".parse().expect("addr"),
            cache_capacity,
            upload_limit: None,
            version: version.into(),
            timestamp_ms: 1,
            joining: false,
            region: None,
        };
        assert!(reg("0.1.0", 1 << 40).check_bounds().is_ok());
        assert!(Register { region: Some("eu-west".into()), ..reg("0.1.0", 1) }.check_bounds().is_ok());
        assert!(Register { region: Some("r".repeat(MAX_VERSION_LEN + 1)), ..reg("0.1.0", 1) }.check_bounds().is_err());
        assert!(reg(&"v".repeat(MAX_VERSION_LEN + 1), 1).check_bounds().is_err());
        assert!(reg("0.1\n<script>", 1).check_bounds().is_err());
        assert!(reg("0.1.0", u64::MAX).check_bounds().is_err());
        assert!(NodeStats { hits: MAX_REPORTED, ..Default::default() }.check_bounds().is_ok());
        assert!(NodeStats { home_fills: MAX_REPORTED + 1, ..Default::default() }.check_bounds().is_err());
        let failure = |reason: &str, count| NodeFailure { node: NodeId([1; 32]), reason: reason.into(), count };
        let report =
            |fog_bytes, f: NodeFailure| ClientReport { fog_bytes, node_failures: vec![f], ..Default::default() };
        assert!(report(1 << 30, failure("timeout", 3)).check_bounds().is_ok());
        assert!(report(u64::MAX, failure("timeout", 3)).check_bounds().is_err());
        assert!(report(1, failure(&"x".repeat(1000), 3)).check_bounds().is_err());
        assert!(report(1, failure("timeout", u64::MAX)).check_bounds().is_err());
        let live =
            |n: usize, len: usize| ClientReport { live_playlists: vec!["h".repeat(len); n], ..Default::default() };
        assert!(live(MAX_LIVE_PLAYLISTS, MAX_LIVE_URL_LEN).check_bounds().is_ok());
        assert!(live(MAX_LIVE_PLAYLISTS + 1, 10).check_bounds().is_err());
        assert!(live(1, MAX_LIVE_URL_LEN + 1).check_bounds().is_err());
        let overlay = |tracker_rtt_ms| OverlayReport { tracker_rtt_ms, ..Default::default() };
        assert!(overlay(Some(12.5)).check_bounds().is_ok());
        assert!(overlay(Some(f32::INFINITY)).check_bounds().is_err());
        assert!(overlay(Some(-1.0)).check_bounds().is_err());
    }

    fn contact(i: u8, port: u16) -> PeerContact {
        PeerContact {
            id: NodeId([i; 32]),
            addrs: vec![format!("/ip4/10.0.0.{i}/udp/{port}/quic-v1")],
            rendezvous: None,
            via: None,
        }
    }

    /// A change between two lists, through JSON, turns the first into exactly the second; changes in a row
    /// compose; a change from another version, out of bounds or to a list it does not give is refused.
    #[test]
    fn cell_changes_round_trip_and_are_checked() {
        let old = CellList::new((1..=6).map(|i| contact(i, 7000)).collect());
        let mid = CellList::new([1, 2, 4, 5, 6, 9].map(|i| contact(i, if i == 4 { 7001 } else { 7000 })).to_vec());
        let new = CellList::new([0, 2, 4, 5, 9].map(|i| contact(i, if i == 4 { 7001 } else { 7000 })).to_vec());
        assert!(old.check_bounds().is_ok() && mid.check_bounds().is_ok());
        let step = CellDelta::between(&old, &mid);
        let ids = |v: &[PeerContact]| v.iter().map(|m| m.id.0[0]).collect::<Vec<_>>();
        assert_eq!((ids(&step.added), step.removed.clone()), (vec![4, 9], vec![NodeId([3; 32])]));
        let wire: CellDelta = serde_json::from_slice(&serde_json::to_vec(&step).expect("json")).expect("parse");
        assert_eq!(old.apply(&wire), Ok(mid.clone()));
        let two = step.then(&CellDelta::between(&mid, &new));
        assert_eq!((two.from, two.to), (old.version, new.version));
        assert_eq!(old.apply(&two), Ok(new.clone()));
        assert_eq!(new.apply(&CellDelta::between(&new, &new)), Ok(new.clone()));

        assert_eq!(mid.apply(&step), Err(CellError::NotHeld { from: old.version, held: mid.version }));
        let wrong_to = CellDelta { to: new.version, ..step.clone() };
        assert!(matches!(old.apply(&wrong_to), Err(CellError::Mismatch { .. })));
        let both = CellDelta { removed: vec![NodeId([4; 32])], ..step.clone() };
        assert!(matches!(old.apply(&both), Err(CellError::Bounds(_))));
        let unsorted = CellDelta { added: step.added.iter().rev().cloned().collect(), ..step.clone() };
        assert!(matches!(old.apply(&unsorted), Err(CellError::Bounds(_))));
        let node = |i: usize| {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i as u64).to_be_bytes());
            NodeId(b)
        };
        let many = CellDelta { added: Vec::new(), removed: (0..=MAX_CELL_LISTED).map(node).collect(), ..step };
        assert!(matches!(old.apply(&many), Err(CellError::Bounds(_))));
        let long_addr = PeerContact { addrs: vec!["x".repeat(MAX_ADDR_LEN + 1)], ..contact(1, 1) };
        assert!(CellList::new(vec![long_addr]).check_bounds().is_err());
        let twice = CellList { version: 0, members: vec![contact(1, 1), contact(1, 2)] };
        assert!(twice.check_bounds().is_err());

        // The version names the list: addresses and rendezvous count, an address cannot pass for two.
        let with_rendezvous = PeerContact { rendezvous: Some("10.0.0.1:7700".parse().expect("addr")), ..contact(1, 1) };
        let split = PeerContact { addrs: vec!["/a".into(), "/b".into()], ..contact(1, 1) };
        let joined = PeerContact { addrs: vec!["/a\0/b".into()], ..contact(1, 1) };
        let via = |port| Some(Rendezvous { id: NodeId([2; 32]), addr: SocketAddr::from(([10, 0, 0, 2], port)) });
        let (with_via, other_via) =
            (PeerContact { via: via(7700), ..contact(1, 1) }, PeerContact { via: via(7701), ..contact(1, 1) });
        let versions = [
            vec![contact(1, 1)],
            vec![contact(1, 2)],
            vec![with_rendezvous],
            vec![split],
            vec![joined],
            vec![with_via.clone()],
            vec![other_via],
        ]
        .map(|m| CellList::version_of(&m));
        for (i, v) in versions.iter().enumerate() {
            assert!(!versions[..i].contains(v), "version {i} repeats");
        }
        // A rendezvous to punch through travels in lists and changes; nodes that predate it read them.
        let list = CellList::new(vec![with_via, contact(3, 1)]);
        let wire: CellList = serde_json::from_slice(&serde_json::to_vec(&list).expect("json")).expect("parse");
        assert_eq!(wire, list);
        #[derive(Deserialize)]
        struct OldContact {
            id: NodeId,
            addrs: Vec<String>,
            rendezvous: Option<SocketAddr>,
        }
        let old: Vec<OldContact> =
            serde_json::from_value(serde_json::to_value(&list.members).expect("json")).expect("old");
        assert_eq!((old[0].id, old[0].addrs.len(), old[0].rendezvous), (list.members[0].id, 1, None));
    }

    #[test]
    fn families_parse_and_allow_by_canonical_address() {
        assert_eq!(Families::parse("ipv4,ipv6"), Ok(Families::BOTH));
        assert_eq!(Families::parse(""), Ok(Families::default()));
        assert!(Families::parse("ipv5").is_err());
        for f in [Families::BOTH, Families::default(), Families::of("::1".parse().expect("ip"))] {
            assert_eq!(Families::parse(&f.to_query()), Ok(f));
        }
        let v4 = Families::of("::ffff:10.0.0.1".parse().expect("ip"));
        assert_eq!(v4, Families { ipv4: true, ipv6: false }, "v4-mapped is IPv4");
        assert!(v4.allows(&"[::ffff:10.0.0.1]:1".parse().expect("addr")));
        assert!(!v4.allows(&"[2001:db8::1]:1".parse().expect("addr")));
        assert_eq!(v4.union(Families::of("::1".parse().expect("ip"))), Families::BOTH);
        let overlay = |quic_addrs: Vec<SocketAddr>| OverlayReport { quic_addrs, ..Default::default() };
        assert!(overlay(vec!["[2001:db8::1]:7701".parse().expect("addr")]).check_bounds().is_ok());
        assert!(overlay(vec!["[::]:7701".parse().expect("addr")]).check_bounds().is_err());
        assert!(overlay(vec!["[2001:db8::1]:0".parse().expect("addr")]).check_bounds().is_err());
        let many = vec!["[2001:db8::1]:7701".parse().expect("addr"); MAX_QUIC_ADDRS + 1];
        assert!(overlay(many).check_bounds().is_err());
    }

    #[test]
    fn signed_messages_verify_and_resist_tampering() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let hb = Heartbeat {
            timestamp_ms: 1,
            stats: NodeStats::default(),
            draining: false,
            overlay: None,
            web_transport: None,
            upload_plan: None,
        };
        let s = Signed::sign(&key, KIND_HEARTBEAT, &hb);
        let back: Heartbeat = s.open(KIND_HEARTBEAT).expect("verifies");
        assert_eq!(back.timestamp_ms, 1);
        assert!(matches!(s.open::<Heartbeat>(KIND_REGISTER), Err(SignedError::BadSignature)));
        let mut tampered = s.clone();
        tampered.payload = tampered.payload.replace("\"timestamp_ms\":1", "\"timestamp_ms\":2");
        assert!(matches!(tampered.open::<Heartbeat>(KIND_HEARTBEAT), Err(SignedError::BadSignature)));
        let mut other = s;
        other.node_id = SigningKey::from_bytes(&[8u8; 32]).verifying_key().into();
        assert!(matches!(other.open::<Heartbeat>(KIND_HEARTBEAT), Err(SignedError::BadSignature)));
    }

    #[test]
    fn web_transport_endpoints_are_bounded_when_parsed() {
        let hash = CertHash([0xab; 32]);
        let endpoint = WebTransportEndpoint { port: 7701, cert_hashes: vec![hash, CertHash([1; 32])] };
        let json = serde_json::to_string(&endpoint).expect("json");
        assert_eq!(serde_json::from_str::<WebTransportEndpoint>(&json).expect("valid"), endpoint);
        let parse = |port: u16, n: usize| {
            let text = serde_json::json!({ "port": port, "cert_hashes": vec![hash; n] }).to_string();
            serde_json::from_str::<WebTransportEndpoint>(&text)
        };
        assert!(parse(7701, MAX_WEB_CERT_HASHES).is_ok());
        assert!(parse(7701, MAX_WEB_CERT_HASHES + 1).is_err(), "a node advertises a few hashes, not a list");
        assert!(parse(7701, 0).is_err(), "a browser needs a hash to pin");
        assert!(parse(0, 1).is_err());
        let old_node = r#"{"timestamp_ms":1,"stats":{"cache_used":0,"cache_capacity":0,"cached_chunks":0,
            "active_streams":0,"requests":0,"hits":0,"misses":0,"bytes_served":0,"origin_fills":0,"origin_bytes":0,
            "corrupt_chunks":0,"bad_requests":0,"store_errors":0}}"#;
        assert_eq!(serde_json::from_str::<Heartbeat>(old_node).expect("older nodes still parse").web_transport, None);
    }
}
