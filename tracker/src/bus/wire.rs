//! What the replicas of a cell tell each other: subjects, messages and their bounds.
//!
//! Subjects are `fog.<cell>.<version>.<kind>`: the version names the payload's encoding, so a replica skips
//! a message of a version or kind it does not read without parsing it (and counts it as of an unknown
//! version: a newer replica's). v1 is compact JSON, every kind; v2 is the binary node record
//! ([`super::record`]), the only v2 kind. A replica reads both, and publishes node records as v2 only once
//! every live replica announced it reads them ([`Alive::level`]), so older replicas keep getting v1 in a
//! mixed cell. Payloads are at most [`MAX_MESSAGE`] bytes, and every field is checked against the same
//! bounds a node's own message is held to before anything is merged: a malformed or hostile message is
//! dropped whole and counted.

use std::net::SocketAddr;

use fog_proto::api::{
    CertHash, NodeStats, OverlayReport, UploadPlan, WebTransportEndpoint, MAX_QUIC_ADDRS, MAX_REPORTED, MAX_VERSION_LEN,
};
use fog_proto::wire::MAX_URL_LEN;
use fog_proto::{ChunkHash, ContentId, NodeId};
use fog_sched::coords::Coord;
use fog_sched::scheduler::LoadDelta;
use serde::{Deserialize, Serialize};

use super::record::RecordError;

/// What this build reads, as it announces it ([`Alive::level`]): 2, every v1 kind and v2 node records.
/// Replicas from before v2 announce nothing, which reads as 1.
pub const LEVEL: u32 = 2;
/// Largest payload decoded (a node record is a few KiB at most; a load delta up to ~100 KiB).
pub const MAX_MESSAGE: usize = 256 << 10;
/// Most node and chunk entries one load delta carries; a replica publishes its delta before it holds
/// [`FLUSH_LOAD_ENTRIES`], so its own never reach the bound.
pub const MAX_LOAD_ENTRIES: usize = 2048;
pub const FLUSH_LOAD_ENTRIES: usize = 1024;
/// Longest quarantine reason carried.
pub(crate) const MAX_REASON: usize = 256;

/// A payload's encoding, named in the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// JSON, every kind.
    V1,
    /// The binary node record ([`super::record`]); node records only.
    V2,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// The kinds of message, each on its own subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Node,
    Health,
    Web,
    Block,
    Load,
    Alive,
    Manifest,
}

impl Kind {
    pub const ALL: [Kind; 7] =
        [Self::Node, Self::Health, Self::Web, Self::Block, Self::Load, Self::Alive, Self::Manifest];

    pub fn name(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Health => "health",
            Self::Web => "web",
            Self::Block => "block",
            Self::Load => "load",
            Self::Alive => "alive",
            Self::Manifest => "manifest",
        }
    }

    /// Whether this build reads this kind in `version`.
    pub fn reads(self, version: Version) -> bool {
        version == Version::V1 || self == Self::Node
    }
}

/// The subject a message of `kind` in `version` is published on in `cell`.
pub fn subject(cell: &str, version: Version, kind: Kind) -> String {
    format!("fog.{cell}.{}.{}", version.name(), kind.name())
}

/// The subject a replica of `cell` subscribes to: every version and kind.
pub fn wildcard(cell: &str) -> String {
    format!("fog.{cell}.>")
}

/// Why a received message was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A version, or a kind in a version, this replica does not read: a newer replica's.
    #[error("bus message {0:?} is of a version or kind this replica does not read")]
    UnknownVersion(String),
    #[error("malformed bus message: {0}")]
    Malformed(String),
    #[error("malformed v2 node record: {0}")]
    Record(#[from] RecordError),
}

/// The version and kind of a message on `subject`, a subject of `cell`'s.
pub fn parse_subject(cell: &str, subject: &str) -> Result<(Version, Kind), Refused> {
    let rest = subject.strip_prefix("fog.").and_then(|s| s.strip_prefix(cell)).and_then(|s| s.strip_prefix('.'));
    let Some((version, kind)) = rest.and_then(|r| r.split_once('.')) else {
        return Err(Refused::Malformed(format!("subject {subject:?}")));
    };
    let v = [Version::V1, Version::V2].into_iter().find(|v| v.name() == version);
    let k = Kind::ALL.into_iter().find(|k| k.name() == kind);
    match (v, k) {
        (Some(v), Some(k)) if k.reads(v) => Ok((v, k)),
        _ => Err(Refused::UnknownVersion(format!("{version}.{kind}").chars().take(32).collect())),
    }
}

/// A node's whole soft state as the replica that accepted its latest signed message holds it: every
/// replica takes the record with the newest signed timestamp (`merge`). The health and browser-probe
/// fields are hints for replicas that do not hold the node yet (a restarted one); for nodes they hold,
/// those come from the prober's own messages ([`Kind::Health`], [`Kind::Web`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// The node's signed timestamp of the message this state is as of.
    pub ts: u64,
    pub addr: SocketAddr,
    pub capacity: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_limit: Option<u64>,
    pub version: String,
    /// The accepting replica's dial-back to `addr` answered.
    pub reachable: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joining: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Its other addresses, and whether their dial-backs answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<(SocketAddr, bool)>,
    pub stats: NodeStats,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    pub overlay: OverlayReport,
    /// Its coordinate as the accepting replica fitted it: every replica schedules on the same one.
    pub coord: Coord,
    pub upload_rate: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web: Option<WebTransportEndpoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<UploadPlan>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub down: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_served: Option<CertHash>,
}

fn check_label(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.len() > max || !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!("{what} must be at most {max} printable ASCII characters"));
    }
    Ok(())
}

impl NodeRecord {
    /// The bounds a node's own registration and heartbeat are held to, and a few of the record's own.
    pub fn check(&self) -> Result<(), String> {
        check_label("version", &self.version, MAX_VERSION_LEN)?;
        if let Some(region) = &self.region {
            check_label("region", region, MAX_VERSION_LEN)?;
        }
        if let Some(reason) = &self.quarantined {
            check_label("quarantine reason", reason, MAX_REASON)?;
        }
        let counts = [self.capacity, self.upload_limit.unwrap_or(0), self.upload_rate];
        if self.ts == 0 || counts.iter().any(|c| *c > MAX_REPORTED) {
            return Err("a count or the timestamp is out of range".into());
        }
        if self.more.len() > MAX_QUIC_ADDRS {
            return Err(format!("at most {MAX_QUIC_ADDRS} more addresses"));
        }
        let c = &self.coord;
        if !c.pos.iter().chain([&c.height, &c.error]).all(|x| x.is_finite() && x.abs() <= 1e6) {
            return Err("coordinate out of range".into());
        }
        self.stats.check_bounds()?;
        self.overlay.check_bounds()?;
        self.plan.as_ref().map_or(Ok(()), UploadPlan::check_bounds)
    }
}

/// A probe's verdict on a node, from the replica that probed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub id: NodeId,
    /// Probes keep failing.
    pub down: bool,
    /// It served wrong bytes (sticky: never cleared by a message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined: Option<String>,
}

/// A probe of a node's browser endpoint: the certificate it met, if the session opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Web {
    pub id: NodeId,
    pub served: Option<CertHash>,
}

/// An operator's block (or unblock) of a node at one replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub id: NodeId,
    pub block: bool,
}

/// A replica says it is alive (every [`super::ALIVE_EVERY`]), whether it holds the whole cell yet, and what
/// it reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alive {
    pub replica: NodeId,
    pub ready: bool,
    /// [`LEVEL`] of the replica's build; absent (1) from replicas older than v2 records, which ignore it.
    #[serde(default = "level_1")]
    pub level: u32,
}

fn level_1() -> u32 {
    1
}

/// A replica stored a manifest for `url` (durably: it is in the cell's database when this is sent), with
/// this content: the others drop a cached manifest of the URL that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestWritten {
    pub url: String,
    pub content: ContentId,
}

/// A load delta on the wire: bytes charged per node (all, and fetched now), requests per chunk, total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub nodes: Vec<(NodeId, f64, f64)>,
    pub chunks: Vec<(ChunkHash, f64)>,
    pub total: f64,
}

impl Load {
    pub fn from_delta(delta: &LoadDelta) -> Self {
        Self {
            nodes: delta.nodes.iter().map(|(id, (all, now))| (*id, *all, *now)).collect(),
            chunks: delta.chunks.iter().map(|(c, n)| (*c, *n)).collect(),
            total: delta.total,
        }
    }

    /// The delta, if within bounds (a replica charges at most [`MAX_REPORTED`] bytes per entry, and never
    /// a negative or non-finite amount).
    pub fn into_delta(self) -> Result<LoadDelta, String> {
        if self.nodes.len() > MAX_LOAD_ENTRIES || self.chunks.len() > MAX_LOAD_ENTRIES {
            return Err(format!("at most {MAX_LOAD_ENTRIES} node and chunk entries"));
        }
        let fine = |x: f64| x.is_finite() && (0.0..=MAX_REPORTED as f64).contains(&x);
        let amounts = self.nodes.iter().flat_map(|(_, a, n)| [*a, *n]).chain(self.chunks.iter().map(|c| c.1));
        if !amounts.chain([self.total]).all(fine) {
            return Err("load amounts must be finite, non-negative and bounded".into());
        }
        Ok(LoadDelta {
            nodes: self.nodes.into_iter().map(|(id, a, n)| (id, (a, n))).collect(),
            chunks: self.chunks.into_iter().collect(),
            total: self.total,
        })
    }
}

/// One message of any kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Node(Box<NodeRecord>),
    Health(Health),
    Web(Web),
    Block(Block),
    Load(LoadDelta),
    Alive(Alive),
    Manifest(ManifestWritten),
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Node(_) => Kind::Node,
            Self::Health(_) => Kind::Health,
            Self::Web(_) => Kind::Web,
            Self::Block(_) => Kind::Block,
            Self::Load(_) => Kind::Load,
            Self::Alive(_) => Kind::Alive,
            Self::Manifest(_) => Kind::Manifest,
        }
    }

    /// The payload and its version: a node record as v2 if `node_v2` (every live replica reads it), else
    /// v1; every other kind as v1.
    pub fn encode(&self, node_v2: bool) -> (Version, Vec<u8>) {
        let json = match self {
            Self::Node(r) if node_v2 => return (Version::V2, r.encode_v2()),
            Self::Node(r) => serde_json::to_vec(r),
            Self::Health(h) => serde_json::to_vec(h),
            Self::Web(w) => serde_json::to_vec(w),
            Self::Block(b) => serde_json::to_vec(b),
            Self::Load(d) => serde_json::to_vec(&Load::from_delta(d)),
            Self::Alive(a) => serde_json::to_vec(a),
            Self::Manifest(m) => serde_json::to_vec(m),
        };
        (Version::V1, json.expect("bus messages always serialise"))
    }

    /// A message of `kind` in `version` from `payload`, if it is within every bound.
    pub fn decode(version: Version, kind: Kind, payload: &[u8]) -> Result<Message, Refused> {
        if version == Version::V2 {
            return match kind {
                Kind::Node => Ok(Self::Node(Box::new(NodeRecord::decode_v2(payload)?))),
                _ => Err(Refused::UnknownVersion(format!("v2.{}", kind.name()))),
            };
        }
        if payload.len() > MAX_MESSAGE {
            return Err(Refused::Malformed(format!("{} bytes is over {MAX_MESSAGE}", payload.len())));
        }
        let bad = |e: String| Refused::Malformed(format!("{}: {e}", kind.name()));
        let json = |e: serde_json::Error| bad(e.to_string());
        Ok(match kind {
            Kind::Node => {
                let record: NodeRecord = serde_json::from_slice(payload).map_err(json)?;
                record.check().map_err(bad)?;
                Self::Node(Box::new(record))
            }
            Kind::Health => {
                let health: Health = serde_json::from_slice(payload).map_err(json)?;
                if let Some(reason) = &health.quarantined {
                    check_label("quarantine reason", reason, MAX_REASON).map_err(bad)?;
                }
                Self::Health(health)
            }
            Kind::Web => Self::Web(serde_json::from_slice(payload).map_err(json)?),
            Kind::Block => Self::Block(serde_json::from_slice(payload).map_err(json)?),
            Kind::Load => {
                let load: Load = serde_json::from_slice(payload).map_err(json)?;
                Self::Load(load.into_delta().map_err(bad)?)
            }
            Kind::Alive => Self::Alive(serde_json::from_slice(payload).map_err(json)?),
            Kind::Manifest => {
                let m: ManifestWritten = serde_json::from_slice(payload).map_err(json)?;
                if m.url.is_empty() || m.url.len() > MAX_URL_LEN {
                    return Err(bad(format!("a URL of 1..={MAX_URL_LEN} bytes")));
                }
                Self::Manifest(m)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(id: u8, ts: u64) -> NodeRecord {
        NodeRecord {
            id: NodeId([id; 32]),
            ts,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(id))),
            capacity: 1 << 30,
            upload_limit: None,
            version: "test".into(),
            reachable: true,
            joining: false,
            region: None,
            more: Vec::new(),
            stats: NodeStats::default(),
            draining: false,
            overlay: OverlayReport::default(),
            coord: Coord::default(),
            upload_rate: 0,
            web: None,
            plan: None,
            down: false,
            quarantined: None,
            web_served: None,
        }
    }

    #[test]
    fn subjects_name_the_version_and_kind() {
        let s = subject("eu-1", Version::V1, Kind::Node);
        assert_eq!(s, "fog.eu-1.v1.node");
        assert_eq!(parse_subject("eu-1", &s), Ok((Version::V1, Kind::Node)));
        assert_eq!(parse_subject("eu-1", "fog.eu-1.v2.node"), Ok((Version::V2, Kind::Node)));
        assert_eq!(parse_subject("eu-1", "fog.eu-1.v1.manifest"), Ok((Version::V1, Kind::Manifest)));
        // What a newer replica may send: a version, or a kind, this one does not read. Not malformed.
        let unknown = |s: &str| Err(Refused::UnknownVersion(s.into()));
        assert_eq!(parse_subject("eu-1", "fog.eu-1.v3.node"), unknown("v3.node"));
        assert_eq!(parse_subject("eu-1", "fog.eu-1.v2.health"), unknown("v2.health"));
        assert_eq!(parse_subject("eu-1", "fog.eu-1.v1.gossip"), unknown("v1.gossip"));
        assert!(matches!(parse_subject("eu-1", "fog.eu-2.v1.node"), Err(Refused::Malformed(_))));
        assert!(matches!(parse_subject("eu-1", "fog.eu-1"), Err(Refused::Malformed(_))));
    }

    #[test]
    fn messages_round_trip_and_a_node_record_is_small() {
        let messages = [
            Message::Node(Box::new(record(1, 5))),
            Message::Health(Health { id: NodeId([2; 32]), down: true, quarantined: Some("wrong bytes".into()) }),
            Message::Web(Web { id: NodeId([2; 32]), served: Some(CertHash([3; 32])) }),
            Message::Block(Block { id: NodeId([4; 32]), block: true }),
            Message::Alive(Alive { replica: NodeId([5; 32]), ready: false, level: LEVEL }),
            Message::Manifest(ManifestWritten { url: "https://o.example/a.mp4".into(), content: ContentId([6; 32]) }),
        ];
        for m in messages {
            for node_v2 in [false, true] {
                let (version, payload) = m.encode(node_v2);
                let v2 = node_v2 && m.kind() == Kind::Node;
                assert_eq!(version, if v2 { Version::V2 } else { Version::V1 }, "only node records go as v2");
                assert_eq!(Message::decode(version, m.kind(), &payload).expect("decodes"), m);
            }
        }
        let node = Message::Node(Box::new(record(1, 5)));
        assert!(node.encode(false).1.len() < 1024);
        assert!(node.encode(true).1.len() < 300);
        let mut delta = LoadDelta::default();
        delta.nodes.insert(NodeId([1; 32]), (1e6, 5e5));
        delta.chunks.insert(ChunkHash([2; 32]), 3.0);
        delta.total = 1e6;
        let (version, payload) = Message::Load(delta.clone()).encode(true);
        assert_eq!(Message::decode(version, Kind::Load, &payload), Ok(Message::Load(delta)));
    }

    #[test]
    fn an_older_replicas_alive_reads_as_level_1_and_ours_parses_there() {
        let old = br#"{"replica":"0505050505050505050505050505050505050505050505050505050505050505","ready":true}"#;
        let Ok(Message::Alive(alive)) = Message::decode(Version::V1, Kind::Alive, old) else { panic!("an Alive") };
        assert_eq!(alive.level, 1);
        // An older build's Alive had only these two fields; serde skips the new one.
        #[derive(Deserialize)]
        struct OldAlive {
            replica: NodeId,
            ready: bool,
        }
        let ours = Message::Alive(Alive { replica: NodeId([5; 32]), ready: true, level: LEVEL }).encode(true).1;
        let theirs: OldAlive = serde_json::from_slice(&ours).expect("parses");
        assert_eq!((theirs.replica, theirs.ready), (NodeId([5; 32]), true));
        assert_eq!(Message::decode(Version::V2, Kind::Alive, b"{}"), Err(Refused::UnknownVersion("v2.alive".into())));
    }

    #[test]
    fn garbage_and_out_of_bounds_messages_are_refused() {
        let malformed =
            |kind, payload: &[u8]| matches!(Message::decode(Version::V1, kind, payload), Err(Refused::Malformed(_)));
        assert!(malformed(Kind::Node, b"{\"id\":"));
        assert!(malformed(Kind::Node, &vec![b' '; MAX_MESSAGE + 1]));
        let mut r = record(1, 5);
        r.version = "x".repeat(MAX_VERSION_LEN + 1);
        assert!(malformed(Kind::Node, &serde_json::to_vec(&r).expect("json")));
        let mut r = record(1, 5);
        r.stats.bytes_served = u64::MAX;
        assert!(malformed(Kind::Node, &serde_json::to_vec(&r).expect("json")));
        let mut r = record(1, 5);
        r.coord.pos[0] = f32::NAN;
        assert!(malformed(Kind::Node, &serde_json::to_vec(&r).expect("json")), "NaN is not JSON, nor accepted");
        r.coord.pos[0] = 1e30;
        assert!(malformed(Kind::Node, &serde_json::to_vec(&r).expect("json")));
        let mut r = record(1, 5);
        r.overlay.attached = vec![NodeId([9; 32]); fog_proto::api::MAX_ATTACHED + 1];
        assert!(malformed(Kind::Node, &serde_json::to_vec(&r).expect("json")));
        let load = |nodes: usize, amount: f64| Load {
            nodes: (0..nodes).map(|i| (NodeId([(i % 256) as u8; 32]), amount, 0.0)).collect(),
            chunks: Vec::new(),
            total: 0.0,
        };
        assert!(malformed(Kind::Load, &serde_json::to_vec(&load(MAX_LOAD_ENTRIES + 1, 1.0)).expect("json")));
        assert!(malformed(Kind::Load, &serde_json::to_vec(&load(1, -1.0)).expect("json")));
        assert!(malformed(Kind::Load, &serde_json::to_vec(&load(1, 1e300)).expect("json")));
        let written = |url: String| ManifestWritten { url, content: ContentId([1; 32]) };
        assert!(malformed(Kind::Manifest, &serde_json::to_vec(&written(String::new())).expect("json")));
        let long = format!("https://o.example/{}", "a".repeat(MAX_URL_LEN));
        assert!(malformed(Kind::Manifest, &serde_json::to_vec(&written(long)).expect("json")));
        assert!(malformed(Kind::Manifest, br#"{"url":"https://o.example/a","content":"zz"}"#));
    }
}
