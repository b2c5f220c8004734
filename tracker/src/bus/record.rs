//! The v2 node record (`fog.<cell>.v2.node`): [`NodeRecord`] in a compact binary form, because node records
//! are nearly all of a cell's bus traffic and decoding v1's ~4 KB of JSON was ~85 % of a merged record's
//! cost (`docs/benchmarks.md`, "Cluster"). Same fields, same bounds: a v2 record decodes to exactly the
//! [`NodeRecord`] its v1 form does, and is then held to [`NodeRecord::check`] like one.
//!
//! Integers are big-endian, floats IEEE 754 binary32 big-endian. In order:
//!
//! | field | encoding |
//! |---|---|
//! | format | u8, [`FORMAT`] |
//! | flags | u32: which optional fields follow and the booleans ([`flags`]); unknown bits are refused |
//! | id, ts | 32 bytes; u64 (the node's signed timestamp, ms) |
//! | addr | address: u8 family (4 or 6), the IP (4 or 16 bytes), u16 port, for 6 also u32 scope id |
//! | capacity, upload_limit? | u64; u64 if `UPLOAD_LIMIT` |
//! | version, region? | string: u16 length, UTF-8 bytes |
//! | more | u16 count ≤ [`MAX_QUIC_ADDRS`], each an address and u8 verified (0 or 1) |
//! | stats | the 22 counters of `NodeStats`, u64 each, in declaration order |
//! | overlay | the fields of the next table |
//! | coord | 6 × f32: position, height, error |
//! | upload_rate | u64 |
//! | web? | if `WEB`: u16 port (not 0), u16 count 1..=[`MAX_WEB_CERT_HASHES`] × 32-byte hashes |
//! | plan? | if `PLAN`: u8 parts (1 next, 2 off, 4 budget), mode, then each part present (below) |
//! | quarantined? | string, if `QUARANTINED` (≤ 256 bytes) |
//! | web_served? | 32 bytes, if `WEB_SERVED` |
//!
//! The overlay report, in order:
//!
//! | field | encoding |
//! |---|---|
//! | reachability | u8: 0 unknown, 1 public, 2 nat, 3 relayed |
//! | addrs | u16 count ≤ [`MAX_PEER_ADDRS`] strings of ≤ [`MAX_ADDR_LEN`] bytes |
//! | rtt | u16 count ≤ [`MAX_RTT_SAMPLES`], each a 32-byte peer and f32 ms |
//! | tracker_rtt_ms? | f32, if `TRACKER_RTT` |
//! | rendezvous?, external_quic? | 32 bytes if `RENDEZVOUS`; an address if `EXTERNAL_QUIC` |
//! | bad_peers | u16 count ≤ [`MAX_RTT_SAMPLES`] × 32 bytes |
//! | connected_peers | u32 |
//! | attached | u16 count ≤ [`MAX_ATTACHED`] × 32 bytes |
//! | quic_addrs, cell_version? | u16 count ≤ [`MAX_QUIC_ADDRS`] addresses; u64 if `CELL_VERSION` |
//!
//! A plan's parts: next, u32 seconds and a mode; off, u32 seconds; budget, u64 bytes. A mode is u8 0
//! (unlimited), 1 (a rate: then u64 bytes/s) or 2 (off).
//!
//! Nothing may follow. Every length and count is checked against its bound before the bytes it announces
//! are read, and the whole payload against [`MAX_RECORD_LEN`] first, so a hostile message allocates
//! nothing past those. Every field the record holds is carried every time: a receiver that missed earlier
//! records (or just started) needs the whole state, so nothing is sent only "when it changed".

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use fog_proto::api::{
    CertHash, NodeStats, OverlayReport, Reachability, RttSample, UploadChange, UploadMode, UploadPlan,
    WebTransportEndpoint, MAX_ADDR_LEN, MAX_ATTACHED, MAX_PEER_ADDRS, MAX_QUIC_ADDRS, MAX_RTT_SAMPLES, MAX_VERSION_LEN,
    MAX_WEB_CERT_HASHES,
};
use fog_proto::NodeId;
use fog_sched::coords::{Coord, DIMS};

use super::wire::{NodeRecord, MAX_REASON};

/// The first byte of a v2 record: the layout above.
pub const FORMAT: u8 = 2;

/// Bits of the flags word.
pub mod flags {
    pub const UPLOAD_LIMIT: u32 = 1;
    pub const REACHABLE: u32 = 1 << 1;
    pub const JOINING: u32 = 1 << 2;
    pub const REGION: u32 = 1 << 3;
    pub const DRAINING: u32 = 1 << 4;
    pub const WEB: u32 = 1 << 5;
    pub const PLAN: u32 = 1 << 6;
    pub const DOWN: u32 = 1 << 7;
    pub const QUARANTINED: u32 = 1 << 8;
    pub const WEB_SERVED: u32 = 1 << 9;
    pub const TRACKER_RTT: u32 = 1 << 10;
    pub const RENDEZVOUS: u32 = 1 << 11;
    pub const EXTERNAL_QUIC: u32 = 1 << 12;
    pub const OVERLAY_JOINING: u32 = 1 << 13;
    pub const CELL_VERSION: u32 = 1 << 14;
    pub const CELL_DELTAS: u32 = 1 << 15;
    pub const ALL: u32 = (1 << 16) - 1;
}

const PLAN_NEXT: u8 = 1;
const PLAN_OFF: u8 = 2;
const PLAN_BUDGET: u8 = 4;

/// Counters in `NodeStats`.
const STATS: usize = 22;
const ADDR_MAX: usize = 1 + 16 + 2 + 4;
const MODE_MAX: usize = 1 + 8;
/// The longest record: every optional field present, every list and string at its bound.
pub const MAX_RECORD_LEN: usize = 1
    + 4
    + 32
    + 8
    + ADDR_MAX
    + 8
    + 8
    + 2 * (2 + MAX_VERSION_LEN)
    + 2
    + MAX_QUIC_ADDRS * (ADDR_MAX + 1)
    + 8 * STATS
    + 1
    + 2
    + MAX_PEER_ADDRS * (2 + MAX_ADDR_LEN)
    + 2
    + MAX_RTT_SAMPLES * 36
    + 4
    + 32
    + ADDR_MAX
    + 2
    + 32 * MAX_RTT_SAMPLES
    + 4
    + 2
    + 32 * MAX_ATTACHED
    + 2
    + MAX_QUIC_ADDRS * ADDR_MAX
    + 8
    + 4 * (DIMS + 2)
    + 8
    + 2
    + 2
    + 32 * MAX_WEB_CERT_HASHES
    + 1
    + MODE_MAX
    + 4
    + MODE_MAX
    + 4
    + 8
    + 2
    + MAX_REASON
    + 32;

/// Why a v2 record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record ends early: needed {needed} more bytes")]
    Truncated { needed: usize },
    #[error("record format {0} (this replica reads {FORMAT})")]
    Format(u8),
    #[error("unknown flag bits {0:#x}")]
    Flags(u32),
    #[error("{what}: {len} is over the limit {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    #[error("{what}: unknown value {value}")]
    Value { what: &'static str, value: u8 },
    #[error("{0} trailing bytes after the record")]
    Trailing(usize),
    /// Decoded, but out of the bounds every record is held to ([`NodeRecord::check`]).
    #[error("{0}")]
    Bounds(String),
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Truncated { needed: n - self.0.len() });
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, RecordError> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        self.array().map(u64::from_be_bytes)
    }
    fn f32(&mut self) -> Result<f32, RecordError> {
        self.array().map(f32::from_be_bytes)
    }
    fn id(&mut self) -> Result<NodeId, RecordError> {
        self.array().map(NodeId)
    }
    /// A u16 count, refused past `max` before anything it counts is read.
    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, RecordError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(RecordError::TooLong { what, len, max });
        }
        Ok(len)
    }
    fn string(&mut self, what: &'static str, max: usize) -> Result<String, RecordError> {
        let len = self.count(what, max)?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map(str::to_owned).map_err(|_| RecordError::Utf8(what))
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, RecordError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(RecordError::Value { what, value }),
        }
    }
    fn addr(&mut self) -> Result<SocketAddr, RecordError> {
        match self.u8()? {
            4 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                Ok(SocketAddr::new(IpAddr::V4(ip), self.u16()?))
            }
            6 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                let port = self.u16()?;
                Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, self.u32()?)))
            }
            value => Err(RecordError::Value { what: "address family", value }),
        }
    }
    fn ids(&mut self, what: &'static str, max: usize) -> Result<Vec<NodeId>, RecordError> {
        let n = self.count(what, max)?;
        (0..n).map(|_| self.id()).collect()
    }
    fn mode(&mut self) -> Result<UploadMode, RecordError> {
        match self.u8()? {
            0 => Ok(UploadMode::Unlimited),
            1 => Ok(UploadMode::Rate(self.u64()?)),
            2 => Ok(UploadMode::Off),
            value => Err(RecordError::Value { what: "upload mode", value }),
        }
    }
}

/// Lengths are written as u16; a record that passed [`NodeRecord::check`] has none past its bound (all under
/// 2^16). One that did not is written saturated, and receivers refuse it.
fn put_count(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_count(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.scope_id().to_be_bytes());
        }
    }
}

fn put_ids(out: &mut Vec<u8>, ids: &[NodeId]) {
    put_count(out, ids.len());
    for id in ids {
        out.extend_from_slice(&id.0);
    }
}

fn put_mode(out: &mut Vec<u8>, mode: UploadMode) {
    match mode {
        UploadMode::Unlimited => out.push(0),
        UploadMode::Rate(r) => {
            out.push(1);
            out.extend_from_slice(&r.to_be_bytes());
        }
        UploadMode::Off => out.push(2),
    }
}

fn flag(on: bool, bit: u32) -> u32 {
    if on {
        bit
    } else {
        0
    }
}

/// The stats' counters in declaration order (destructured whole, so a counter added to `NodeStats` does not
/// compile until it is carried here).
fn counters_mut(s: &mut NodeStats) -> [&mut u64; STATS] {
    let NodeStats {
        cache_used,
        cache_capacity,
        cached_chunks,
        active_streams,
        requests,
        hits,
        misses,
        bytes_served,
        origin_fills,
        origin_bytes,
        corrupt_chunks,
        bad_requests,
        store_errors,
        peer_fills,
        peer_fill_bytes,
        peer_served_bytes,
        peer_bad_chunks,
        home_fills,
        unlicensed_hints,
        peer_fills_quic,
        peer_served_quic_bytes,
        peer_fills_punched,
    } = s;
    [
        cache_used,
        cache_capacity,
        cached_chunks,
        active_streams,
        requests,
        hits,
        misses,
        bytes_served,
        origin_fills,
        origin_bytes,
        corrupt_chunks,
        bad_requests,
        store_errors,
        peer_fills,
        peer_fill_bytes,
        peer_served_bytes,
        peer_bad_chunks,
        home_fills,
        unlicensed_hints,
        peer_fills_quic,
        peer_served_quic_bytes,
        peer_fills_punched,
    ]
}

fn counters(s: &NodeStats) -> [u64; STATS] {
    counters_mut(&mut s.clone()).map(|c| *c)
}

fn stats_from(c: [u64; STATS]) -> NodeStats {
    let mut s = NodeStats::default();
    for (field, value) in counters_mut(&mut s).into_iter().zip(c) {
        *field = value;
    }
    s
}

impl NodeRecord {
    /// The record in the v2 form. Every field is destructured, so a field added to the record (or to its
    /// overlay) does not compile until the codec carries it.
    pub fn encode_v2(&self) -> Vec<u8> {
        let NodeRecord {
            id,
            ts,
            addr,
            capacity,
            upload_limit,
            version,
            reachable,
            joining,
            region,
            more,
            stats,
            draining,
            overlay,
            coord,
            upload_rate,
            web,
            plan,
            down,
            quarantined,
            web_served,
        } = self;
        let OverlayReport {
            reachability,
            addrs,
            rtt,
            tracker_rtt_ms,
            rendezvous,
            external_quic,
            bad_peers,
            connected_peers,
            attached,
            joining: overlay_joining,
            quic_addrs,
            cell_version,
            cell_deltas,
        } = overlay;
        let flags = flag(upload_limit.is_some(), flags::UPLOAD_LIMIT)
            | flag(*reachable, flags::REACHABLE)
            | flag(*joining, flags::JOINING)
            | flag(region.is_some(), flags::REGION)
            | flag(*draining, flags::DRAINING)
            | flag(web.is_some(), flags::WEB)
            | flag(plan.is_some(), flags::PLAN)
            | flag(*down, flags::DOWN)
            | flag(quarantined.is_some(), flags::QUARANTINED)
            | flag(web_served.is_some(), flags::WEB_SERVED)
            | flag(tracker_rtt_ms.is_some(), flags::TRACKER_RTT)
            | flag(rendezvous.is_some(), flags::RENDEZVOUS)
            | flag(external_quic.is_some(), flags::EXTERNAL_QUIC)
            | flag(*overlay_joining, flags::OVERLAY_JOINING)
            | flag(cell_version.is_some(), flags::CELL_VERSION)
            | flag(*cell_deltas, flags::CELL_DELTAS);
        let mut out = Vec::with_capacity(512 + 36 * rtt.len());
        out.push(FORMAT);
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&id.0);
        out.extend_from_slice(&ts.to_be_bytes());
        put_addr(&mut out, addr);
        out.extend_from_slice(&capacity.to_be_bytes());
        if let Some(limit) = upload_limit {
            out.extend_from_slice(&limit.to_be_bytes());
        }
        put_str(&mut out, version);
        if let Some(region) = region {
            put_str(&mut out, region);
        }
        put_count(&mut out, more.len());
        for (addr, verified) in more {
            put_addr(&mut out, addr);
            out.push(u8::from(*verified));
        }
        for c in counters(stats) {
            out.extend_from_slice(&c.to_be_bytes());
        }
        out.push(Reachability::ALL.iter().position(|r| r == reachability).expect("one of ALL") as u8);
        put_count(&mut out, addrs.len());
        for a in addrs {
            put_str(&mut out, a);
        }
        put_count(&mut out, rtt.len());
        for s in rtt {
            out.extend_from_slice(&s.peer.0);
            out.extend_from_slice(&s.rtt_ms.to_be_bytes());
        }
        if let Some(ms) = tracker_rtt_ms {
            out.extend_from_slice(&ms.to_be_bytes());
        }
        if let Some(r) = rendezvous {
            out.extend_from_slice(&r.0);
        }
        if let Some(a) = external_quic {
            put_addr(&mut out, a);
        }
        put_ids(&mut out, bad_peers);
        out.extend_from_slice(&connected_peers.to_be_bytes());
        put_ids(&mut out, attached);
        put_count(&mut out, quic_addrs.len());
        for a in quic_addrs {
            put_addr(&mut out, a);
        }
        if let Some(v) = cell_version {
            out.extend_from_slice(&v.to_be_bytes());
        }
        for x in coord.pos.iter().chain([&coord.height, &coord.error]) {
            out.extend_from_slice(&x.to_be_bytes());
        }
        out.extend_from_slice(&upload_rate.to_be_bytes());
        if let Some(w) = web {
            out.extend_from_slice(&w.port.to_be_bytes());
            put_count(&mut out, w.cert_hashes.len());
            for h in &w.cert_hashes {
                out.extend_from_slice(&h.0);
            }
        }
        if let Some(p) = plan {
            let parts = flag(p.next.is_some(), u32::from(PLAN_NEXT))
                | flag(p.off_in_secs.is_some(), u32::from(PLAN_OFF))
                | flag(p.budget_left.is_some(), u32::from(PLAN_BUDGET));
            out.push(parts as u8);
            put_mode(&mut out, p.now);
            if let Some(next) = p.next {
                out.extend_from_slice(&next.in_secs.to_be_bytes());
                put_mode(&mut out, next.mode);
            }
            if let Some(s) = p.off_in_secs {
                out.extend_from_slice(&s.to_be_bytes());
            }
            if let Some(b) = p.budget_left {
                out.extend_from_slice(&b.to_be_bytes());
            }
        }
        if let Some(reason) = quarantined {
            put_str(&mut out, reason);
        }
        if let Some(h) = web_served {
            out.extend_from_slice(&h.0);
        }
        out
    }

    /// A record from its v2 form, if well formed and within every bound a record is held to.
    pub fn decode_v2(payload: &[u8]) -> Result<NodeRecord, RecordError> {
        if payload.len() > MAX_RECORD_LEN {
            return Err(RecordError::TooLong { what: "record", len: payload.len(), max: MAX_RECORD_LEN });
        }
        let mut r = Reader(payload);
        let format = r.u8()?;
        if format != FORMAT {
            return Err(RecordError::Format(format));
        }
        let f = r.u32()?;
        if f & !flags::ALL != 0 {
            return Err(RecordError::Flags(f & !flags::ALL));
        }
        let has = |bit: u32| f & bit != 0;
        let id = r.id()?;
        let ts = r.u64()?;
        let addr = r.addr()?;
        let capacity = r.u64()?;
        let upload_limit = if has(flags::UPLOAD_LIMIT) { Some(r.u64()?) } else { None };
        let version = r.string("version", MAX_VERSION_LEN)?;
        let region = if has(flags::REGION) { Some(r.string("region", MAX_VERSION_LEN)?) } else { None };
        let n = r.count("more addresses", MAX_QUIC_ADDRS)?;
        let more = (0..n).map(|_| Ok((r.addr()?, r.bool("verified")?))).collect::<Result<_, RecordError>>()?;
        let mut c = [0u64; STATS];
        for x in &mut c {
            *x = r.u64()?;
        }
        let stats = stats_from(c);
        let reachability = r.u8()?;
        let reachability = *Reachability::ALL
            .get(usize::from(reachability))
            .ok_or(RecordError::Value { what: "reachability", value: reachability })?;
        let n = r.count("overlay addresses", MAX_PEER_ADDRS)?;
        let addrs = (0..n).map(|_| r.string("overlay address", MAX_ADDR_LEN)).collect::<Result<_, _>>()?;
        let n = r.count("RTT samples", MAX_RTT_SAMPLES)?;
        let rtt = (0..n).map(|_| Ok(RttSample { peer: r.id()?, rtt_ms: r.f32()? })).collect::<Result<_, _>>()?;
        let tracker_rtt_ms = if has(flags::TRACKER_RTT) { Some(r.f32()?) } else { None };
        let rendezvous = if has(flags::RENDEZVOUS) { Some(r.id()?) } else { None };
        let external_quic = if has(flags::EXTERNAL_QUIC) { Some(r.addr()?) } else { None };
        let bad_peers = r.ids("bad peers", MAX_RTT_SAMPLES)?;
        let connected_peers = r.u32()?;
        let attached = r.ids("attached nodes", MAX_ATTACHED)?;
        let n = r.count("QUIC addresses", MAX_QUIC_ADDRS)?;
        let quic_addrs = (0..n).map(|_| r.addr()).collect::<Result<_, _>>()?;
        let cell_version = if has(flags::CELL_VERSION) { Some(r.u64()?) } else { None };
        let overlay = OverlayReport {
            reachability,
            addrs,
            rtt,
            tracker_rtt_ms,
            rendezvous,
            external_quic,
            bad_peers,
            connected_peers,
            attached,
            joining: has(flags::OVERLAY_JOINING),
            quic_addrs,
            cell_version,
            cell_deltas: has(flags::CELL_DELTAS),
        };
        let mut pos = [0f32; DIMS];
        for x in &mut pos {
            *x = r.f32()?;
        }
        let coord = Coord { pos, height: r.f32()?, error: r.f32()? };
        let upload_rate = r.u64()?;
        let web = if has(flags::WEB) {
            let port = r.u16()?;
            let n = r.count("certificate hashes", MAX_WEB_CERT_HASHES)?;
            let cert_hashes = (0..n).map(|_| r.array().map(CertHash)).collect::<Result<Vec<_>, _>>()?;
            if port == 0 || cert_hashes.is_empty() {
                return Err(RecordError::Bounds("a browser endpoint needs a port and a certificate hash".into()));
            }
            Some(WebTransportEndpoint { port, cert_hashes })
        } else {
            None
        };
        let plan = if has(flags::PLAN) {
            let parts = r.u8()?;
            if parts & !(PLAN_NEXT | PLAN_OFF | PLAN_BUDGET) != 0 {
                return Err(RecordError::Value { what: "upload plan flags", value: parts });
            }
            let now = r.mode()?;
            let next =
                if parts & PLAN_NEXT != 0 { Some(UploadChange { in_secs: r.u32()?, mode: r.mode()? }) } else { None };
            let off_in_secs = if parts & PLAN_OFF != 0 { Some(r.u32()?) } else { None };
            let budget_left = if parts & PLAN_BUDGET != 0 { Some(r.u64()?) } else { None };
            Some(UploadPlan { now, next, off_in_secs, budget_left })
        } else {
            None
        };
        let quarantined = if has(flags::QUARANTINED) { Some(r.string("quarantine reason", MAX_REASON)?) } else { None };
        let web_served = if has(flags::WEB_SERVED) { Some(CertHash(r.array()?)) } else { None };
        if !r.0.is_empty() {
            return Err(RecordError::Trailing(r.0.len()));
        }
        let record = NodeRecord {
            id,
            ts,
            addr,
            capacity,
            upload_limit,
            version,
            reachable: has(flags::REACHABLE),
            joining: has(flags::JOINING),
            region,
            more,
            stats,
            draining: has(flags::DRAINING),
            overlay,
            coord,
            upload_rate,
            web,
            plan,
            down: has(flags::DOWN),
            quarantined,
            web_served,
        };
        record.check().map_err(RecordError::Bounds)?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::wire::{Kind, Message, Version};

    fn v4(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 7], port))
    }

    /// A record with nothing optional.
    fn bare() -> NodeRecord {
        NodeRecord {
            id: NodeId([1; 32]),
            ts: 1_700_000_000_000,
            addr: v4(7000),
            capacity: 1 << 30,
            upload_limit: None,
            version: "0.1.0".into(),
            reachable: false,
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

    /// A record with every field set, each list at `n` entries (within every bound for n ≤ 4).
    fn full(n: usize) -> NodeRecord {
        let v6 = SocketAddr::V6(SocketAddrV6::new("2001:db8::7".parse().expect("v6"), 7001, 0, 3));
        let ids = |seed: u8, n: usize| (0..n).map(|i| NodeId([seed.wrapping_add(i as u8); 32])).collect::<Vec<_>>();
        let mut c = [0u64; STATS];
        for (i, x) in c.iter_mut().enumerate() {
            *x = (i as u64 + 1) << 20;
        }
        NodeRecord {
            id: NodeId([2; 32]),
            ts: 1_700_000_000_123,
            addr: v6,
            capacity: 64 << 30,
            upload_limit: Some(2 << 20),
            version: "0.1.0 (test)".into(),
            reachable: true,
            joining: true,
            region: Some("eu west".into()),
            more: (0..n).map(|i| (v4(8000 + i as u16), i % 2 == 0)).collect(),
            stats: stats_from(c),
            draining: true,
            overlay: OverlayReport {
                reachability: Reachability::Relayed,
                addrs: (0..n).map(|i| format!("/ip4/192.0.2.7/udp/{}/quic-v1", 9000 + i)).collect(),
                rtt: ids(10, n).into_iter().map(|peer| RttSample { peer, rtt_ms: 12.5 }).collect(),
                tracker_rtt_ms: Some(31.25),
                rendezvous: Some(NodeId([3; 32])),
                external_quic: Some(v4(4433)),
                bad_peers: ids(40, n),
                connected_peers: 29,
                attached: ids(80, n),
                joining: true,
                quic_addrs: (0..n).map(|i| v4(5000 + i as u16)).collect(),
                cell_version: Some(77),
                cell_deltas: true,
            },
            coord: Coord { pos: [1.5, -2.25, 3.0, -40.0], height: 2.0, error: 0.3 },
            upload_rate: 123_456,
            web: Some(WebTransportEndpoint { port: 443, cert_hashes: vec![CertHash([5; 32]), CertHash([6; 32])] }),
            plan: Some(UploadPlan {
                now: UploadMode::Rate(1 << 20),
                next: Some(UploadChange { in_secs: 3600, mode: UploadMode::Off }),
                off_in_secs: Some(3600),
                budget_left: Some(1 << 40),
            }),
            down: true,
            quarantined: Some("served wrong bytes".into()),
            web_served: Some(CertHash([5; 32])),
        }
    }

    fn decode(bytes: &[u8]) -> Result<NodeRecord, RecordError> {
        NodeRecord::decode_v2(bytes)
    }

    /// `bytes` with the byte where the encodings of `a` and `b` first differ set to `value`.
    fn patched(a: &NodeRecord, b: &NodeRecord, value: u8) -> Vec<u8> {
        let (mut x, y) = (a.encode_v2(), b.encode_v2());
        let at = x.iter().zip(&y).position(|(p, q)| p != q).expect("they differ");
        x[at] = value;
        x
    }

    #[test]
    fn records_round_trip_and_decode_as_their_json_form_does() {
        for record in [bare(), full(0), full(1), full(4)] {
            assert_eq!(record.check(), Ok(()));
            let bytes = record.encode_v2();
            assert_eq!(decode(&bytes), Ok(record.clone()));
            // The same record as an older replica publishes it (v1 JSON) still decodes, to the same.
            let (version, json) = Message::Node(Box::new(record.clone())).encode(false);
            assert_eq!(version, Version::V1);
            assert_eq!(Message::decode(Version::V1, Kind::Node, &json), Ok(Message::Node(Box::new(record.clone()))));
            assert!(bytes.len() * 2 < json.len(), "{} bytes vs {} of JSON", bytes.len(), json.len());
        }
        // Format, flags, id, ts, an IPv4 address, capacity, version, no more addresses, the counters,
        // reachability, four empty lists and the connected peers, coordinate, upload rate.
        let layout = 1 + 4 + 32 + 8 + 7 + 8 + (2 + 5) + 2 + 8 * STATS + 1 + 2 + 2 + 2 + 4 + 2 + 2 + 24 + 8;
        assert_eq!(bare().encode_v2().len(), layout);
    }

    #[test]
    fn the_longest_record_is_max_record_len() {
        let mut r = full(0);
        r.version = "v".repeat(MAX_VERSION_LEN);
        r.region = Some("r".repeat(MAX_VERSION_LEN));
        r.more = vec![(r.addr, true); MAX_QUIC_ADDRS];
        let o = &mut r.overlay;
        o.external_quic = Some(r.addr);
        o.addrs = vec!["a".repeat(MAX_ADDR_LEN); MAX_PEER_ADDRS];
        o.rtt = vec![RttSample { peer: NodeId([9; 32]), rtt_ms: 1.0 }; MAX_RTT_SAMPLES];
        o.bad_peers = vec![NodeId([9; 32]); MAX_RTT_SAMPLES];
        o.attached = vec![NodeId([9; 32]); MAX_ATTACHED];
        o.quic_addrs = vec![r.addr; MAX_QUIC_ADDRS];
        r.web.as_mut().expect("web").cert_hashes = vec![CertHash([5; 32]); MAX_WEB_CERT_HASHES];
        r.plan = Some(UploadPlan {
            now: UploadMode::Rate(1),
            next: Some(UploadChange { in_secs: 1, mode: UploadMode::Rate(2) }),
            off_in_secs: Some(1),
            budget_left: Some(1),
        });
        r.quarantined = Some("q".repeat(MAX_REASON));
        let bytes = r.encode_v2();
        assert_eq!(bytes.len(), MAX_RECORD_LEN);
        assert_eq!(decode(&bytes), Ok(r));
        let mut over = bytes.clone();
        over.push(0);
        let too_long = RecordError::TooLong { what: "record", len: MAX_RECORD_LEN + 1, max: MAX_RECORD_LEN };
        assert_eq!(decode(&over), Err(too_long));
    }

    #[test]
    fn truncated_and_trailing_bytes_are_refused() {
        for record in [bare(), full(3)] {
            let bytes = record.encode_v2();
            for len in 0..bytes.len() {
                match decode(&bytes[..len]) {
                    Err(RecordError::Truncated { needed }) => assert!(needed >= 1),
                    other => panic!("{len} of {} bytes: {other:?}", bytes.len()),
                }
            }
            let mut longer = bytes.clone();
            longer.extend_from_slice(&[0, 0]);
            assert_eq!(decode(&longer), Err(RecordError::Trailing(2)));
        }
    }

    #[test]
    fn every_list_and_string_past_its_bound_is_refused_before_it_is_read() {
        let too_long = |what, len, max| Err(RecordError::TooLong { what, len, max });
        let refused = |f: &dyn Fn(&mut NodeRecord)| {
            let mut r = full(1);
            f(&mut r);
            decode(&r.encode_v2())
        };
        let v = MAX_VERSION_LEN;
        assert_eq!(refused(&|r| r.version = "v".repeat(v + 1)), too_long("version", v + 1, v));
        assert_eq!(refused(&|r| r.region = Some("r".repeat(v + 1))), too_long("region", v + 1, v));
        let q = MAX_QUIC_ADDRS;
        assert_eq!(refused(&|r| r.more = vec![(r.addr, true); q + 1]), too_long("more addresses", q + 1, q));
        let (a, l) = (MAX_PEER_ADDRS, MAX_ADDR_LEN);
        assert_eq!(refused(&|r| r.overlay.addrs = vec!["a".into(); a + 1]), too_long("overlay addresses", a + 1, a));
        assert_eq!(refused(&|r| r.overlay.addrs = vec!["a".repeat(l + 1)]), too_long("overlay address", l + 1, l));
        let s = MAX_RTT_SAMPLES;
        let sample = RttSample { peer: NodeId([9; 32]), rtt_ms: 1.0 };
        assert_eq!(refused(&|r| r.overlay.rtt = vec![sample; s + 1]), too_long("RTT samples", s + 1, s));
        assert_eq!(refused(&|r| r.overlay.bad_peers = vec![NodeId([9; 32]); s + 1]), too_long("bad peers", s + 1, s));
        let t = MAX_ATTACHED;
        let attached = &|r: &mut NodeRecord| r.overlay.attached = vec![NodeId([9; 32]); t + 1];
        assert_eq!(refused(attached), too_long("attached nodes", t + 1, t));
        assert_eq!(refused(&|r| r.overlay.quic_addrs = vec![r.addr; q + 1]), too_long("QUIC addresses", q + 1, q));
        let w = MAX_WEB_CERT_HASHES;
        let hashes = &|r: &mut NodeRecord| r.web.as_mut().expect("web").cert_hashes = vec![CertHash([1; 32]); w + 1];
        assert_eq!(refused(hashes), too_long("certificate hashes", w + 1, w));
        let m = MAX_REASON;
        assert_eq!(refused(&|r| r.quarantined = Some("q".repeat(m + 1))), too_long("quarantine reason", m + 1, m));
        // A count far past everything: refused on the count, not after reading (or allocating) its entries.
        let mut bytes = bare().encode_v2();
        let at = bytes.len() - (2 + 2 + 2 + 4 + 2 + 2 + 24 + 8);
        bytes[at..at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(decode(&bytes), too_long("overlay addresses", 65535, a));
    }

    #[test]
    fn unknown_formats_flags_and_values_are_refused() {
        let mut bytes = bare().encode_v2();
        bytes[0] = 1;
        assert_eq!(decode(&bytes), Err(RecordError::Format(1)));
        let mut bytes = bare().encode_v2();
        bytes[1..5].copy_from_slice(&(1u32 << 16).to_be_bytes());
        assert_eq!(decode(&bytes), Err(RecordError::Flags(1 << 16)));
        let mut bytes = bare().encode_v2();
        bytes[1 + 4 + 32 + 8] = 5;
        assert_eq!(decode(&bytes), Err(RecordError::Value { what: "address family", value: 5 }));
        let value = |what, value| Err(RecordError::Value { what, value });
        let (a, mut b) = (full(1), full(1));
        b.overlay.reachability = Reachability::Public;
        assert_eq!(decode(&patched(&a, &b, 4)), value("reachability", 4));
        b = full(1);
        b.more[0].1 = !a.more[0].1;
        assert_eq!(decode(&patched(&a, &b, 2)), value("verified", 2));
        b = full(1);
        b.plan.as_mut().expect("plan").now = UploadMode::Off;
        assert_eq!(decode(&patched(&a, &b, 3)), value("upload mode", 3));
        b = full(1);
        b.plan.as_mut().expect("plan").next = None;
        assert_eq!(decode(&patched(&a, &b, 8 | 7)), value("upload plan flags", 15));
        b = full(1);
        b.overlay.addrs = vec!["/ip4/192.0.2.7/udp/9001/quic-v1".into()];
        assert_eq!(decode(&patched(&a, &b, 0xff)), Err(RecordError::Utf8("overlay address")));
    }

    #[test]
    fn decoded_records_are_held_to_the_bounds_of_a_json_one() {
        let refused = |f: &dyn Fn(&mut NodeRecord)| {
            let mut r = full(1);
            f(&mut r);
            let json = serde_json::to_vec(&r).expect("json");
            let v1 = Message::decode(Version::V1, Kind::Node, &json);
            assert!(matches!(v1, Err(crate::bus::wire::Refused::Malformed(_))), "v1 refuses it too: {v1:?}");
            matches!(decode(&r.encode_v2()), Err(RecordError::Bounds(_)))
        };
        assert!(refused(&|r| r.ts = 0));
        assert!(refused(&|r| r.capacity = u64::MAX));
        assert!(refused(&|r| r.stats.bytes_served = u64::MAX));
        assert!(refused(&|r| r.coord.pos[2] = 1e30));
        assert!(refused(&|r| r.overlay.rtt[0].rtt_ms = -1.0));
        assert!(refused(&|r| r.overlay.tracker_rtt_ms = Some(1e9)));
        assert!(refused(&|r| r.version = "bad\nversion".into()));
        assert!(refused(&|r| r.plan.as_mut().expect("plan").now = UploadMode::Rate(0)));
        assert!(refused(&|r| r.web.as_mut().expect("web").port = 0));
        assert!(refused(&|r| r.web.as_mut().expect("web").cert_hashes.clear()));
        // NaN is not JSON (v1 cannot even carry it); v2 can, and refuses it.
        let mut r = full(1);
        r.coord.height = f32::NAN;
        assert!(matches!(decode(&r.encode_v2()), Err(RecordError::Bounds(_))));
    }
}
