//! The node registry: who is registered, where clients reach them, and whether they are healthy (heard
//! from within the node timeout). Soft state, rebuilt from registrations after a restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use fog_proto::api::{NodeContact, NodeStats};
use fog_proto::NodeId;

use crate::scheduler::Snapshot;

/// How far a signed message's timestamp may be from the tracker's clock.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Nodes silent this long are forgotten, so the registry cannot fill up with departed nodes.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub addr: SocketAddr,
    pub cache_capacity: u64,
    pub upload_limit: Option<u64>,
    pub version: String,
    pub last_seen: Instant,
    /// Newest message timestamp accepted: older or equal ones are replays.
    pub last_timestamp_ms: u64,
    pub stats: NodeStats,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("registry is full ({0} nodes)")]
    Full(usize),
    #[error("message timestamp is not newer than the last one from this node (replayed?)")]
    Replay,
    #[error("message timestamp is more than 5 minutes off the tracker's clock; check the node's clock")]
    Clock,
}

#[derive(Debug)]
pub struct Registry {
    nodes: RwLock<HashMap<NodeId, NodeEntry>>,
    timeout: Duration,
    max_nodes: usize,
}

/// Node counts for stats and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub total: u64,
    pub healthy: u64,
    pub cache_used: u64,
    pub cache_capacity: u64,
    pub bytes_served: u64,
    pub origin_fill_bytes: u64,
}

fn check_clock(now_ms: u64, ts: u64) -> Result<(), RegistryError> {
    if now_ms.abs_diff(ts) > MAX_CLOCK_SKEW_MS {
        return Err(RegistryError::Clock);
    }
    Ok(())
}

impl Registry {
    pub fn new(timeout: Duration, max_nodes: usize) -> Self {
        Self { nodes: RwLock::new(HashMap::new()), timeout, max_nodes }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        id: NodeId,
        addr: SocketAddr,
        cache_capacity: u64,
        upload_limit: Option<u64>,
        version: String,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), RegistryError> {
        check_clock(now_ms, timestamp_ms)?;
        let mut nodes = self.nodes.write().expect("registry lock");
        if let Some(old) = nodes.get(&id) {
            if timestamp_ms <= old.last_timestamp_ms {
                return Err(RegistryError::Replay);
            }
        } else if nodes.len() >= self.max_nodes {
            let timeout = FORGET_AFTER;
            nodes.retain(|_, n| n.last_seen.elapsed() < timeout);
            if nodes.len() >= self.max_nodes {
                return Err(RegistryError::Full(self.max_nodes));
            }
        }
        let stats = nodes.get(&id).map(|n| n.stats.clone()).unwrap_or_default();
        nodes.insert(
            id,
            NodeEntry {
                addr,
                cache_capacity,
                upload_limit,
                version,
                last_seen: Instant::now(),
                last_timestamp_ms: timestamp_ms,
                stats,
            },
        );
        Ok(())
    }

    /// Records a heartbeat. `Ok(false)`: the node is unknown and must register.
    pub fn heartbeat(
        &self,
        id: &NodeId,
        stats: NodeStats,
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<bool, RegistryError> {
        check_clock(now_ms, timestamp_ms)?;
        let mut nodes = self.nodes.write().expect("registry lock");
        let Some(n) = nodes.get_mut(id) else { return Ok(false) };
        if timestamp_ms <= n.last_timestamp_ms {
            return Err(RegistryError::Replay);
        }
        n.last_timestamp_ms = timestamp_ms;
        n.last_seen = Instant::now();
        n.stats = stats;
        Ok(true)
    }

    fn healthy(&self, n: &NodeEntry) -> bool {
        n.last_seen.elapsed() <= self.timeout
    }

    pub fn snapshot(&self) -> Snapshot {
        let nodes = self.nodes.read().expect("registry lock");
        Snapshot::new(
            nodes
                .iter()
                .filter(|(_, n)| self.healthy(n))
                .map(|(id, n)| NodeContact { id: *id, addr: n.addr })
                .collect(),
        )
    }

    pub fn counts(&self) -> Counts {
        let nodes = self.nodes.read().expect("registry lock");
        let mut c = Counts { total: nodes.len() as u64, ..Default::default() };
        for n in nodes.values().filter(|n| self.healthy(n)) {
            c.healthy += 1;
            c.cache_used += n.stats.cache_used;
            c.cache_capacity += n.cache_capacity;
            c.bytes_served += n.stats.bytes_served;
            c.origin_fill_bytes += n.stats.origin_bytes;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    #[test]
    fn replay_clock_capacity_and_health() {
        let r = Registry::new(Duration::from_millis(50), 2);
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        let now = 10_000_000;
        r.register(id(1), addr, 1, None, "t".into(), now, now).expect("register");
        assert_eq!(r.register(id(1), addr, 1, None, "t".into(), now, now), Err(RegistryError::Replay));
        assert_eq!(r.register(id(2), addr, 1, None, "t".into(), 1, now), Err(RegistryError::Clock));
        r.register(id(2), addr, 1, None, "t".into(), now, now).expect("second");
        assert_eq!(r.register(id(3), addr, 1, None, "t".into(), now, now), Err(RegistryError::Full(2)));
        assert_eq!(r.heartbeat(&id(9), NodeStats::default(), now, now), Ok(false));
        assert_eq!(r.heartbeat(&id(1), NodeStats::default(), now + 1, now), Ok(true));
        assert_eq!(r.counts().healthy, 2);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.counts().healthy, 0);
        assert!(r.snapshot().nodes.is_empty());
        assert_eq!(r.counts().total, 2);
    }
}
