//! Membership: registrations and heartbeats (signed timestamps, replay and clock checks, room for
//! newcomers), operator blocks, and each node's network coordinate from its neighbours' RTTs.

use super::*;

/// How far a signed message's timestamp may be from the tracker's clock.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

pub(super) fn check_clock(now_ms: u64, ts: u64) -> Result<(), RegistryError> {
    if now_ms.abs_diff(ts) > MAX_CLOCK_SKEW_MS {
        return Err(RegistryError::Clock);
    }
    Ok(())
}

/// Growth of a counter that may have been reset (node restart): the new value itself in that case.
pub(super) fn growth(old: u64, new: u64) -> u64 {
    if new >= old {
        new - old
    } else {
        new
    }
}

impl Registry {
    pub fn register(&self, id: NodeId, reg: Registration, timestamp_ms: u64, now_ms: u64) -> Result<(), RegistryError> {
        check_clock(now_ms, timestamp_ms)?;
        self.check_blocked(&id)?;
        let mut nodes = self.nodes.write().expect("registry lock");
        if let Some(old) = nodes.get(&id) {
            if timestamp_ms <= old.last_timestamp_ms {
                return Err(RegistryError::Replay);
            }
        } else {
            self.make_room(&mut nodes)?;
        }
        // Re-registering keeps what the node earned and what the tracker learned: its counters, its probe
        // history and a quarantine (a restart must not wash away failed probes).
        let old = nodes.get(&id);
        let (stats, upload_rate) = old.map(|n| (n.stats.clone(), n.upload_rate)).unwrap_or_default();
        let health = Health { draining: false, ..old.map(|n| n.health.clone()).unwrap_or_default() };
        let first_seen = old.map_or_else(|| self.clock.now(), |n| n.first_seen);
        // Keep the coordinate too: it reflects the network, which a restart does not move. And its other
        // addresses: its next heartbeat names them again, and only a changed set is dialled back again.
        let (coord, neighbours) = nodes.get(&id).map(|n| (n.coord, n.neighbours.clone())).unwrap_or_default();
        let more_addrs = nodes.get(&id).map(|n| n.more_addrs.clone()).unwrap_or_default();
        let web = nodes.get(&id).and_then(|n| n.web.clone());
        let plan = nodes.get(&id).and_then(|n| n.plan.clone());
        let overlay = OverlayReport { joining: reg.joining, ..Default::default() };
        let entry = NodeEntry {
            reg,
            more_addrs,
            health,
            first_seen,
            last_seen: self.clock.now(),
            last_timestamp_ms: timestamp_ms,
            stats,
            upload_rate,
            overlay,
            coord,
            neighbours,
            web,
            plan,
        };
        nodes.insert(id, entry);
        self.changed();
        Ok(())
    }

    /// Room for one more node: when full, an entry that serves nobody is forgotten (silent past the
    /// heartbeat timeout, or never reachable by clients after a grace period), so throwaway keys cannot
    /// lock real nodes out. A quarantined node stays (forgetting it would let it re-register clean).
    pub(super) fn make_room(&self, nodes: &mut HashMap<NodeId, NodeEntry>) -> Result<(), RegistryError> {
        if nodes.len() < self.max_nodes {
            return Ok(());
        }
        let victim = nodes
            .iter()
            .filter(|(_, n)| n.health.quarantined.is_none())
            .filter(|(id, n)| {
                self.since(n.last_seen) > self.timeout
                    || (self.since(n.first_seen) > UNREACHABLE_GRACE
                        && self.client_path(nodes, id, n) == ClientPath::Unreachable)
            })
            .min_by_key(|(_, n)| n.last_seen)
            .map(|(id, _)| *id);
        match victim {
            Some(victim) => {
                tracing::info!(node = %victim, "registry full: forgetting a silent or unreachable node");
                nodes.remove(&victim);
                Ok(())
            }
            None => Err(RegistryError::Full(self.max_nodes)),
        }
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
        n.last_seen = self.clock.now();
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
            o.quic_addrs.retain(|a| *a != n.reg.addr);
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
    pub(super) fn refit(
        &self,
        nodes: &mut HashMap<NodeId, NodeEntry>,
        id: &NodeId,
        tracker_rtt: Option<f32>,
        now_ms: u64,
    ) {
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

    pub fn is_registered(&self, id: &NodeId) -> bool {
        self.nodes.read().expect("registry lock").contains_key(id)
    }

    /// Whether the tracker's dial-backs reached `id` in every family it advertised an address in.
    pub fn is_reachable(&self, id: &NodeId) -> bool {
        self.nodes.read().expect("registry lock").get(id).is_some_and(NodeEntry::reachable_everywhere)
    }

    /// The other addresses `id`'s last heartbeat advertised, when they differ from those last dialled back:
    /// the caller dials them and records the outcome with [`Registry::set_more_addrs`].
    pub fn more_addrs_to_verify(&self, id: &NodeId) -> Option<Vec<SocketAddr>> {
        let nodes = self.nodes.read().expect("registry lock");
        let n = nodes.get(id)?;
        let mut wanted = n.overlay.quic_addrs.clone();
        wanted.sort_unstable();
        wanted.dedup();
        let mut known: Vec<SocketAddr> = n.more_addrs.iter().map(|a| a.addr).collect();
        known.sort_unstable();
        (wanted != known).then_some(wanted)
    }

    /// Records the dial-backs of `id`'s other addresses.
    pub fn set_more_addrs(&self, id: &NodeId, addrs: Vec<Advertised>) {
        if let Some(n) = self.nodes.write().expect("registry lock").get_mut(id) {
            n.more_addrs = addrs;
            self.changed();
        }
    }

    /// Whether `id` is reachable in every family it advertised, and its verified addresses.
    pub fn verified(&self, id: &NodeId) -> Option<(bool, Vec<SocketAddr>)> {
        let nodes = self.nodes.read().expect("registry lock");
        nodes.get(id).map(|n| (n.reachable_everywhere(), n.direct_addrs()))
    }
}
