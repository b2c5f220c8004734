//! A node's state as the replicas of a cell exchange it (`crate::bus`): the record a replica publishes after
//! accepting a node's message, and the merge of another replica's record, last writer (by the node's
//! signed timestamp) wins ([`crate::bus::merge::merge`]). Health and browser-probe verdicts belong to the
//! replica that probes the node; a record carries them only for replicas that do not hold the node yet.

use crate::bus::merge::{merge, Merge};
use crate::bus::wire::NodeRecord;

use super::members::{check_clock, growth};
use super::*;

/// What decides whether a merged record changes the schedulable set (the cached snapshot is rebuilt for
/// it): addresses and their dial-backs, how clients reach the node, its states and its owner's limits.
/// Coordinates and counters move every heartbeat and are picked up by the snapshot's TTL.
fn schedule_key(r: &Registry, n: &NodeEntry) -> impl PartialEq {
    let o = &n.overlay;
    (
        (n.reg.addr, n.reg.reachable, n.more_addrs.clone(), n.health.draining),
        (o.rendezvous, o.external_quic, o.attached.clone(), o.joining),
        (n.web.clone(), r.resting(n)),
    )
}

impl Registry {
    /// `id`'s state as this replica holds it, for the others.
    pub fn record(&self, id: &NodeId) -> Option<NodeRecord> {
        let nodes = self.nodes.read().expect("registry lock");
        let n = nodes.get(id)?;
        Some(NodeRecord {
            id: *id,
            ts: n.last_timestamp_ms,
            addr: n.reg.addr,
            capacity: n.reg.cache_capacity,
            upload_limit: n.reg.upload_limit,
            version: n.reg.version.clone(),
            reachable: n.reg.reachable,
            joining: n.reg.joining,
            region: n.reg.region.clone(),
            more: n.more_addrs.iter().map(|a| (a.addr, a.verified)).collect(),
            stats: n.stats.clone(),
            draining: n.health.draining,
            overlay: n.overlay.clone(),
            coord: n.coord,
            upload_rate: n.upload_rate,
            web: n.web.as_ref().map(|w| w.advertised.clone()),
            plan: n.plan.as_ref().map(|p| p.plan),
            down: n.health.probe_down,
            quarantined: n.health.quarantined.clone(),
            web_served: n.web.as_ref().and_then(|w| w.served),
        })
    }

    /// Merges another replica's record of a node (bounds checked when it was decoded): added if unknown
    /// (room permitting), replacing the entry if newer, else nothing. Refused like the node's own message
    /// when the node is blocked here or the timestamp is far off this replica's clock.
    pub fn merge(&self, rec: NodeRecord, now_ms: u64) -> Result<Merge, RegistryError> {
        check_clock(now_ms, rec.ts)?;
        self.check_blocked(&rec.id)?;
        // What the entry is made of is built before the write lock, which every bus worker and heartbeat
        // takes: it is held only to compare and move.
        let now = self.clock.now();
        let reg = Registration {
            addr: rec.addr,
            cache_capacity: rec.capacity,
            upload_limit: rec.upload_limit,
            version: rec.version,
            reachable: rec.reachable,
            joining: rec.joining,
            region: rec.region,
        };
        let more_addrs: Vec<Advertised> =
            rec.more.iter().map(|&(addr, verified)| Advertised { addr, verified }).collect();
        // The node's RTTs count towards this replica's neighbour history too, should the node move here.
        let fresh: Vec<Neighbour<NodeId>> = rec
            .overlay
            .rtt
            .iter()
            .map(|s| Neighbour { id: s.peer, rtt_ms: s.rtt_ms, at_ms: now_ms })
            .chain(rec.overlay.tracker_rtt_ms.map(|rtt_ms| Neighbour { id: TRACKER, rtt_ms, at_ms: now_ms }))
            .filter(|s| s.id != rec.id)
            .collect();
        let mut nodes = self.nodes.write().expect("registry lock");
        let verdict = merge(nodes.get(&rec.id).map(|n| n.last_timestamp_ms), rec.ts);
        match verdict {
            Merge::Stale | Merge::Duplicate => return Ok(verdict),
            Merge::Insert => {
                self.make_room(&mut nodes)?;
                let web = rec.web.map(|advertised| {
                    let served = rec.web_served.filter(|h| advertised.cert_hashes.contains(h));
                    WebState { advertised, served, confirmed: served.is_some() }
                });
                let mut neighbours = Vec::new();
                merge_neighbours(&mut neighbours, fresh, now_ms, MAX_NEIGHBOURS);
                let health = Health {
                    draining: rec.draining,
                    probe_down: rec.down,
                    quarantined: rec.quarantined,
                    ..Default::default()
                };
                let entry = NodeEntry {
                    reg,
                    more_addrs,
                    health,
                    first_seen: now,
                    last_seen: now,
                    last_timestamp_ms: rec.ts,
                    stats: rec.stats,
                    upload_rate: rec.upload_rate,
                    overlay: rec.overlay,
                    coord: rec.coord,
                    neighbours,
                    web,
                    plan: rec.plan.map(|p| PlanState::updated(None, p, now)),
                };
                nodes.insert(rec.id, entry);
                self.changed();
            }
            Merge::Replace => {
                let n = nodes.get_mut(&rec.id).expect("held, by the verdict");
                let before = schedule_key(self, n);
                let t = &self.totals;
                saturating_add(&t.fog_bytes, growth(n.stats.bytes_served, rec.stats.bytes_served));
                saturating_add(&t.origin_fill_bytes, growth(n.stats.origin_bytes, rec.stats.origin_bytes));
                saturating_add(&t.node_requests, growth(n.stats.requests, rec.stats.requests));
                saturating_add(&t.corrupt_chunks, growth(n.stats.corrupt_chunks, rec.stats.corrupt_chunks));
                n.reg = reg;
                n.more_addrs = more_addrs;
                n.last_seen = now;
                n.last_timestamp_ms = rec.ts;
                n.stats = rec.stats;
                n.upload_rate = rec.upload_rate;
                n.health.draining = rec.draining;
                merge_neighbours(&mut n.neighbours, fresh, now_ms, MAX_NEIGHBOURS);
                n.overlay = rec.overlay;
                n.coord = rec.coord;
                n.web = rec.web.map(|advertised| WebState::updated(n.web.as_ref(), advertised));
                n.plan = rec.plan.map(|p| PlanState::updated(n.plan.as_ref(), p, now));
                if schedule_key(self, n) != before {
                    self.changed();
                }
            }
        }
        Ok(verdict)
    }

    /// The probing replica's verdict on `id`: probes keep failing (or no longer do), or it served wrong
    /// bytes (a quarantine is never lifted by a message).
    pub fn merge_health(&self, id: &NodeId, down: bool, quarantined: Option<String>) {
        let mut nodes = self.nodes.write().expect("registry lock");
        let Some(n) = nodes.get_mut(id) else { return };
        let before = self.state(n);
        n.health.probe_down = down;
        if n.health.quarantined.is_none() {
            n.health.quarantined = quarantined;
        }
        if self.state(n) != before {
            self.changed();
        }
    }

    /// `id`'s health as this replica's probes left it, for the others.
    pub fn health_of(&self, id: &NodeId) -> Option<(bool, Option<String>)> {
        let nodes = self.nodes.read().expect("registry lock");
        nodes.get(id).map(|n| (n.health.probe_down, n.health.quarantined.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_proto::api::{RttSample, WebTransportEndpoint};

    const NOW: u64 = 10_000_000;

    fn registry(max: usize) -> Registry {
        Registry::new(Duration::from_secs(60), max, HashSet::new())
    }

    /// The record of a node registered at another replica, as of `ts`.
    fn record(id: u8, ts: u64) -> NodeRecord {
        let (a, id) = (registry(8), NodeId([id; 32]));
        a.register(id, super::super::tests::reg(), NOW, NOW).expect("register");
        NodeRecord { ts, ..a.record(&id).expect("held") }
    }

    #[test]
    fn a_record_moves_a_node_whole_and_the_newest_wins() {
        let (a, b) = (registry(8), registry(8));
        let id = NodeId([1; 32]);
        a.register(id, super::super::tests::reg(), NOW, NOW).expect("register");
        let overlay = OverlayReport {
            rtt: vec![RttSample { peer: NodeId([2; 32]), rtt_ms: 12.0 }],
            addrs: vec!["/ip4/127.0.0.1/udp/1/quic-v1".into()],
            ..Default::default()
        };
        let stats = NodeStats { bytes_served: 1000, ..Default::default() };
        a.heartbeat(&id, stats, false, Some(overlay), NOW + 1, NOW).expect("heartbeat");
        let web = WebTransportEndpoint { port: 443, cert_hashes: vec![fog_proto::api::CertHash([7; 32])] };
        a.set_web(&id, Some(web));
        let rec = a.record(&id).expect("held");
        assert_eq!(b.merge(rec.clone(), NOW), Ok(Merge::Insert));
        assert_eq!(b.record(&id), Some(rec.clone()), "the same state on both replicas");
        assert_eq!(b.snapshot().nodes.len(), 1, "scheduled at the other replica");
        // Seen again: nothing changes. An older one loses.
        assert_eq!(b.merge(rec.clone(), NOW), Ok(Merge::Duplicate));
        let older = NodeRecord { ts: NOW, stats: NodeStats::default(), ..rec.clone() };
        assert_eq!(b.merge(older, NOW), Ok(Merge::Stale));
        assert_eq!(b.record(&id).expect("held").stats.bytes_served, 1000);
        // A newer one replaces it, and its growth counts in the totals.
        let newer = NodeRecord { ts: NOW + 2, stats: NodeStats { bytes_served: 1500, ..Default::default() }, ..rec };
        assert_eq!(b.merge(newer, NOW), Ok(Merge::Replace));
        assert_eq!(b.totals.fog_bytes.load(Ordering::Relaxed), 500);
        // The node can now heartbeat at the other replica without registering again.
        assert_eq!(b.heartbeat(&id, NodeStats::default(), false, None, NOW + 3, NOW), Ok(true));
        assert_eq!(b.heartbeat(&id, NodeStats::default(), false, None, NOW + 2, NOW), Err(RegistryError::Replay));
    }

    #[test]
    fn merges_respect_blocks_clocks_and_the_registry_bound() {
        let b = registry(2);
        b.block(NodeId([1; 32]));
        assert_eq!(b.merge(record(1, NOW), NOW), Err(RegistryError::Blocked));
        assert_eq!(b.merge(record(2, NOW - 2 * MAX_CLOCK_SKEW_MS), NOW), Err(RegistryError::Clock));
        assert_eq!(b.merge(record(2, NOW), NOW), Ok(Merge::Insert));
        assert_eq!(b.merge(record(3, NOW), NOW), Ok(Merge::Insert));
        // Full of live, reachable nodes: no room for another.
        assert_eq!(b.merge(record(4, NOW), NOW), Err(RegistryError::Full(2)));
        assert_eq!(b.counts().total, 2);
    }

    #[test]
    fn health_belongs_to_the_prober_and_hints_only_seed_unknown_nodes() {
        let b = registry(8);
        let id = NodeId([1; 32]);
        let quarantined = NodeRecord { quarantined: Some("wrong bytes".into()), ..record(1, NOW) };
        assert_eq!(b.merge(quarantined, NOW), Ok(Merge::Insert));
        assert!(b.snapshot().nodes.is_empty(), "a quarantined node stays out at a replica that just learnt of it");
        let c = registry(8);
        c.merge(record(1, NOW), NOW).expect("merge");
        assert_eq!(c.snapshot().nodes.len(), 1);
        // A newer record's hints do not override what the prober said.
        c.merge_health(&id, true, None);
        assert!(c.snapshot().nodes.is_empty());
        c.merge(record(1, NOW + 1), NOW).expect("merge");
        assert!(c.snapshot().nodes.is_empty(), "still down by the prober's word");
        c.merge_health(&id, false, Some("wrong bytes".into()));
        c.merge_health(&id, false, None);
        assert_eq!(c.health_of(&id), Some((false, Some("wrong bytes".into()))), "a quarantine sticks");
    }
}
