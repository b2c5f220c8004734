//! What dashboards and metrics see of the registry: node counts and the paged node table.

use super::*;

/// Largest page of the node table.
pub const MAX_PAGE: usize = 200;

/// Node counts for stats and metrics.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// Live (heartbeating) nodes by overlay reachability and by client path.
    pub by_reachability: [u64; 4],
    pub by_client_path: [u64; 3],
    /// Live nodes with an address in IPv4 and in IPv6 (in that order): (dialled back, not dialled back).
    pub by_family: [(u64, u64); 2],
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
    /// Why an active node is not given to clients for now: its owner's schedule (`off`, `off_soon`) or
    /// monthly budget (`budget`).
    pub resting: Option<&'static str>,
    pub quarantine_reason: Option<String>,
    /// Round trip of the tracker's latest successful probe.
    pub probe_rtt_ms: Option<u64>,
    /// Only shown to operators (a volunteer's address is personal data).
    pub addr: Option<SocketAddr>,
    /// How the node's overlay sees itself: unknown, public, nat, relayed.
    pub reachability: &'static str,
    /// How clients reach it: direct, hole_punch, unreachable.
    pub client_path: &'static str,
    /// The same for clients of one IP family: direct in a family the tracker dialled it back in, hole_punch
    /// in the family it attached to its rendezvous in.
    pub client_path_ipv4: &'static str,
    pub client_path_ipv6: &'static str,
    /// The IP families the tracker dialled it back in (`ipv4`, `ipv6`, both or none), and those it
    /// advertised addresses in.
    pub families_verified: String,
    pub families_advertised: String,
    /// Its other advertised addresses (operators only).
    pub more_addrs: Option<Vec<SocketAddr>>,
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

impl Registry {
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
        for (id, n) in nodes.iter().filter(|(_, n)| self.since(n.last_seen) <= self.timeout) {
            let r = Reachability::ALL.iter().position(|r| *r == n.overlay.reachability).unwrap_or(0);
            c.by_reachability[r] += 1;
            let p = ClientPath::ALL.iter().position(|p| *p == self.client_path(&nodes, id, n)).unwrap_or(0);
            c.by_client_path[p] += 1;
            let (verified, advertised) = n.families();
            for (i, (v, a)) in
                [(verified.ipv4, advertised.ipv4), (verified.ipv6, advertised.ipv6)].into_iter().enumerate()
            {
                if v {
                    c.by_family[i].0 += 1;
                } else if a {
                    c.by_family[i].1 += 1;
                }
            }
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
                let (verified, advertised) = n.families();
                let [path_ipv4, path_ipv6] = self.paths_by_family(&nodes, id, n);
                NodeView {
                    id: *id,
                    state: state.name(),
                    resting: self.resting(n).map(Resting::name),
                    quarantine_reason: n.health.quarantined.clone(),
                    probe_rtt_ms: n.health.last_probe_rtt_ms,
                    addr: with_addr.then_some(n.reg.addr),
                    reachability: n.overlay.reachability.as_str(),
                    client_path: self.client_path(&nodes, id, n).name(),
                    client_path_ipv4: path_ipv4.name(),
                    client_path_ipv6: path_ipv6.name(),
                    families_verified: verified.to_query(),
                    families_advertised: advertised.to_query(),
                    more_addrs: with_addr.then(|| n.more_addrs.iter().map(|a| a.addr).collect()),
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
                    last_heartbeat_secs: self.since(n.last_seen).as_secs(),
                }
            })
            .collect();
        NodePage { total, page, per_page, nodes: views }
    }
}
