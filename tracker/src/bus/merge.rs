//! The merge rules, pure: which node record wins (last writer by the node's signed timestamp), which
//! replicas are alive, which of them probes a node, and when a replica holds the whole cell. No I/O, no
//! clock of their own: callers pass the time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fog_proto::placement::weight;
use fog_proto::{ChunkHash, NodeId};

/// What a node record does to the entry a replica holds for the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// Unknown here: added (room permitting).
    Insert,
    /// Newer than the one held: replaces it.
    Replace,
    /// Older than the one held: dropped.
    Stale,
    /// As old as the one held (the same message, seen again): nothing changes.
    Duplicate,
}

/// Last writer wins, by the node's signed timestamp. Every replica applies the same rule to the same
/// records, so all end up holding the newest; a record seen twice changes nothing.
pub fn merge(held_ts: Option<u64>, incoming_ts: u64) -> Merge {
    match held_ts {
        None => Merge::Insert,
        Some(held) if incoming_ts > held => Merge::Replace,
        Some(held) if incoming_ts == held => Merge::Duplicate,
        Some(_) => Merge::Stale,
    }
}

/// Most replicas of one cell tracked; announcements from more are ignored (a cell has a handful).
pub const MAX_REPLICAS: usize = 256;

/// The live replicas of a cell, from their announcements.
#[derive(Debug)]
pub struct Replicas {
    me: NodeId,
    /// When each other replica was last heard, whether it said it was ready, and the bus level it reads.
    heard: HashMap<NodeId, (Instant, bool, u32)>,
    /// A replica not heard for this long is gone.
    ttl: Duration,
}

impl Replicas {
    pub fn new(me: NodeId, ttl: Duration) -> Self {
        Self { me, heard: HashMap::new(), ttl }
    }

    /// `replica`, reading bus `level`, announced itself at `now`. False if it was ignored (the map is full
    /// of live replicas).
    pub fn heard(&mut self, replica: NodeId, ready: bool, level: u32, now: Instant) -> bool {
        if replica == self.me {
            return true;
        }
        if self.heard.len() >= MAX_REPLICAS && !self.heard.contains_key(&replica) {
            self.expire(now);
            if self.heard.len() >= MAX_REPLICAS {
                return false;
            }
        }
        self.heard.insert(replica, (now, ready, level));
        true
    }

    /// Forgets replicas not heard within the TTL.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        self.heard.retain(|_, (at, _, _)| now.saturating_duration_since(*at) <= ttl);
    }

    /// The replicas probes are divided among, sorted: the others alive and ready (a replica still catching
    /// up does not hold every node yet), and this one, ready or not (until it is, it may probe a node
    /// another replica probes too, never leave one unprobed).
    pub fn live(&self, now: Instant) -> Vec<NodeId> {
        let others =
            self.heard.iter().filter(|(_, (at, ready, _))| *ready && now.saturating_duration_since(*at) <= self.ttl);
        let mut live: Vec<NodeId> = others.map(|(id, _)| *id).chain([self.me]).collect();
        live.sort_unstable();
        live
    }

    /// Whether every other replica heard within the TTL, ready or not, reads bus `level`: what this one may
    /// publish in it (a replica still catching up merges records too).
    pub fn all_read(&self, level: u32, now: Instant) -> bool {
        let mut alive = self.heard.values().filter(|(at, _, _)| now.saturating_duration_since(*at) <= self.ttl);
        alive.all(|(_, _, l)| *l >= level)
    }
}

/// The replica of `live` that probes `node`: the highest rendezvous weight (ties, practically impossible,
/// to the smaller id). Nodes are so divided among the live replicas and move only from a replica that
/// left.
pub fn prober(node: &NodeId, live: &[NodeId]) -> Option<NodeId> {
    let key = ChunkHash(node.0);
    live.iter().max_by(|a, b| weight(&key, a).cmp(&weight(&key, b)).then(b.cmp(a))).copied()
}

/// A replica holds the whole cell once it has been subscribed, without a break, for one heartbeat
/// interval: every live node sent a heartbeat to some replica meanwhile, and that replica published it.
pub fn complete(subscribed_since: Option<Instant>, now: Instant, heartbeat: Duration) -> bool {
    subscribed_since.is_some_and(|since| now.saturating_duration_since(since) >= heartbeat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_signed_timestamp_wins_and_a_repeat_changes_nothing() {
        assert_eq!(merge(None, 5), Merge::Insert);
        assert_eq!(merge(Some(5), 6), Merge::Replace);
        assert_eq!(merge(Some(5), 5), Merge::Duplicate);
        assert_eq!(merge(Some(5), 4), Merge::Stale);
        // Any order of the same records ends at the newest.
        let records = [3u64, 9, 1, 9, 7];
        let mut held = None;
        for ts in records {
            if matches!(merge(held, ts), Merge::Insert | Merge::Replace) {
                held = Some(ts);
            }
        }
        assert_eq!(held, Some(9));
    }

    #[test]
    fn replicas_expire_and_the_map_stays_bounded() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(2);
        let me = NodeId([0; 32]);
        let mut r = Replicas::new(me, ttl);
        assert_eq!(r.live(t0), [me]);
        assert!(r.heard(NodeId([1; 32]), true, 2, t0));
        assert!(r.heard(NodeId([2; 32]), false, 2, t0));
        assert_eq!(r.live(t0), [me, NodeId([1; 32])], "a replica still catching up probes nothing for others");
        assert_eq!(r.live(t0 + 3 * ttl), [me], "a silent replica is gone");
        for i in 2..MAX_REPLICAS {
            let mut id = [7u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            assert!(r.heard(NodeId(id), false, 2, t0));
        }
        assert!(!r.heard(NodeId([9; 32]), true, 2, t0), "full of live replicas");
        assert!(r.heard(NodeId([9; 32]), true, 2, t0 + 3 * ttl), "room once the silent ones expired");
        assert_eq!(r.live(t0 + 3 * ttl).len(), 2);
    }

    #[test]
    fn a_level_is_used_once_every_live_replica_reads_it() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(2);
        let mut r = Replicas::new(NodeId([0; 32]), ttl);
        assert!(r.all_read(2, t0), "alone");
        r.heard(NodeId([1; 32]), true, 2, t0);
        assert!(r.all_read(2, t0));
        // An older replica, even one not ready yet (it merges records all the same), holds the cell at 1.
        r.heard(NodeId([2; 32]), false, 1, t0 + ttl / 2);
        assert!(!r.all_read(2, t0 + ttl / 2));
        assert!(r.all_read(1, t0 + ttl / 2));
        // Until it is gone; a newer one does not hold anyone back.
        r.heard(NodeId([1; 32]), true, 3, t0 + 3 * ttl);
        assert!(r.all_read(2, t0 + 3 * ttl));
        r.heard(NodeId([2; 32]), true, 2, t0 + 3 * ttl);
        assert!(r.all_read(2, t0 + 3 * ttl), "upgraded");
    }

    #[test]
    fn probes_are_divided_among_live_replicas_and_move_only_from_one_that_left() {
        let live: Vec<NodeId> = (1..=3u8).map(|i| NodeId([i; 32])).collect();
        let nodes: Vec<NodeId> = (0..3000u32)
            .map(|i| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&i.to_be_bytes());
                NodeId(*blake3::hash(&id).as_bytes())
            })
            .collect();
        let owner: Vec<NodeId> = nodes.iter().map(|n| prober(n, &live).expect("a prober")).collect();
        for r in &live {
            let share = owner.iter().filter(|o| *o == r).count();
            assert!((800..1200).contains(&share), "{share} of 3000");
        }
        // Replica 3 leaves: only its nodes move.
        let after: Vec<NodeId> = nodes.iter().map(|n| prober(n, &live[..2]).expect("a prober")).collect();
        for (before, after) in owner.iter().zip(&after) {
            if *before != live[2] {
                assert_eq!(before, after);
            }
        }
        assert_eq!(prober(&nodes[0], &[]), None);
    }

    #[test]
    fn complete_one_heartbeat_interval_after_subscribing() {
        let t0 = Instant::now();
        let hb = Duration::from_secs(2);
        assert!(!complete(None, t0, hb));
        assert!(!complete(Some(t0), t0 + hb / 2, hb));
        assert!(complete(Some(t0), t0 + hb, hb));
    }
}
