//! Cells (issue #17, item 2): the tracker partitions the overlay into cells — nodes' region labels, or the
//! grid cells of their coordinates, crowded ones split into parts (`fog_sched::cells`) — and lists each
//! node its cell. Every member ranks the same list for a missed chunk, so the whole cell agrees on the
//! chunk's home and the chunk is fetched from the origin once per cell, not once per overlapping
//! neighbourhood. The index is rebuilt from the registry at most every [`CELLS_TTL`]; a list's version
//! changes only when its members or their addresses do, and a node is sent its list only then: as the
//! change from the version it holds while the tracker keeps that change (a few versions, while small), else
//! whole. With churn nearly every rebuild changes every large cell, and whole lists (up to 2048 contacts,
//! ~544 KB) to every node every rebuild would be gigabytes per second of egress at 10^6 nodes.

use std::iter;

use fog_proto::api::{CellDelta, CellList};
use fog_sched::cells::{cell_of, home_order, listed, part_of, CellKey};

use super::*;

/// How long the cell index is reused before it is rebuilt. Coordinates move a little every heartbeat and
/// members come and go; a list's change is sent whenever it changes, so at most this often. Meanwhile a
/// member that left is skipped by its cell-mates once it fails to answer.
const CELLS_TTL: Duration = Duration::from_secs(30);

/// Changes kept per cell, from this many earlier versions. Nodes heartbeat every few seconds and the index
/// changes at most every [`CELLS_TTL`], so a node is seldom a version behind; four cover two minutes of
/// missed heartbeats.
const CELL_HISTORY: usize = 4;

/// A change is kept only while its encoded size is at most this share (1/n) of its whole list's: past that
/// the whole list costs little more, and a cell's kept changes take no more memory than its list.
const CHANGE_SHARE: usize = CELL_HISTORY;

/// Every healthy node's cell, and each cell's list.
#[derive(Debug, Default)]
pub(super) struct CellIndex {
    built: Option<Instant>,
    of: HashMap<NodeId, CellKey>,
    lists: HashMap<CellKey, CellEntry>,
}

/// One cell's current list and the changes to it from its recent earlier versions.
#[derive(Debug)]
struct CellEntry {
    list: Arc<CellList>,
    /// Newest first; at most [`CELL_HISTORY`], each at most 1/[`CHANGE_SHARE`] of the list's size.
    changes: Vec<Arc<CellDelta>>,
}

/// What a node needs to hold its cell's current list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CellUpdate {
    Whole(Arc<CellList>),
    Change(Arc<CellDelta>),
}

impl CellEntry {
    /// The entry for `list`, which follows `previous` (the same cell's last entry): the changes to it from
    /// `previous`'s version and those `previous` kept, as far as they stay small.
    fn after(previous: Option<CellEntry>, list: CellList) -> Self {
        let list = Arc::new(list);
        let Some(previous) = previous else { return Self { list, changes: Vec::new() } };
        if previous.list.version == list.version {
            return previous;
        }
        let step = CellDelta::between(&previous.list, &list);
        let limit = list_bytes(&list) / CHANGE_SHARE;
        // Older changes only grow (each is a newer one's ids and more): the first too big ends the history.
        let changes = iter::once(step.clone())
            .chain(previous.changes.iter().map(|older| older.then(&step)))
            .take(CELL_HISTORY)
            .take_while(|change| change_bytes(change) <= limit)
            .map(Arc::new)
            .collect();
        Self { list, changes }
    }

    /// Nothing when the node holds the current version, the change from the version it holds when kept
    /// and `changes` it takes, else the whole list.
    fn update_for(&self, held: Option<u64>, changes: bool) -> Option<CellUpdate> {
        if held == Some(self.list.version) {
            return None;
        }
        let change = held.filter(|_| changes).and_then(|v| self.changes.iter().find(|c| c.from == v));
        Some(match change {
            Some(change) => CellUpdate::Change(change.clone()),
            None => CellUpdate::Whole(self.list.clone()),
        })
    }
}

/// About a contact's size in JSON (a 64-character id, field names, punctuation, a rendezvous address, and
/// a rendezvous to punch through for a node behind NAT): only compared with [`list_bytes`], so it need not
/// be exact.
fn contact_bytes(c: &PeerContact) -> usize {
    120 + c.addrs.iter().map(|a| a.len() + 3).sum::<usize>() + c.via.as_ref().map_or(0, |_| 110)
}

fn list_bytes(list: &CellList) -> usize {
    list.members.iter().map(contact_bytes).sum()
}

fn change_bytes(change: &CellDelta) -> usize {
    change.added.iter().map(contact_bytes).sum::<usize>() + change.removed.len() * 67
}

impl Registry {
    /// Partitions the overlay into cells of grid edge `edge_ms` (and region labels); with `None`, nodes
    /// find homes among their nearest peers.
    pub fn with_cells(mut self, edge_ms: Option<f32>) -> Self {
        self.cell_edge_ms = edge_ms;
        self
    }

    /// The cell `id` is in, if cells are on and it is a healthy node with overlay addresses.
    pub fn cell_of_node(&self, id: &NodeId) -> Option<CellKey> {
        self.with_cell_index(|index| index.of.get(id).copied())
    }

    /// The home of `chunk` in `cell`: its listed member first in the chunk's home order.
    pub fn cell_home(&self, cell: CellKey, chunk: &ChunkHash) -> Option<NodeId> {
        let list = self.with_cell_index(|index| index.lists.get(&cell).map(|e| e.list.clone()))?;
        let ids: Vec<NodeId> = list.members.iter().map(|m| m.id).collect();
        home_order(chunk, &ids, |_| true, 1).first().map(|&i| ids[i])
    }

    /// `id`'s whole cell list, unless the node already holds this version (for nodes that take no changes).
    pub fn cell_list_for(&self, id: &NodeId, held: Option<u64>) -> Option<Arc<CellList>> {
        match self.cell_update_for(id, held, false)? {
            CellUpdate::Whole(list) => Some(list),
            CellUpdate::Change(_) => None,
        }
    }

    /// What `id` needs to hold its cell's current list, when it holds version `held`: nothing when that is
    /// current; when it takes `changes`, the change from `held` if still kept; else the whole list.
    pub fn cell_update_for(&self, id: &NodeId, held: Option<u64>, changes: bool) -> Option<CellUpdate> {
        self.with_cell_index(|index| index.lists.get(index.of.get(id)?)?.update_for(held, changes))
    }

    /// Number of cells (parts count as cells), for stats.
    pub fn cell_count(&self) -> usize {
        self.with_cell_index(|index| Some(index.lists.len())).unwrap_or(0)
    }

    fn with_cell_index<T>(&self, read: impl FnOnce(&CellIndex) -> Option<T>) -> Option<T> {
        let edge_ms = self.cell_edge_ms?;
        let mut index = self.cells.lock().expect("cells lock");
        if index.built.is_none_or(|t| self.since(t) >= CELLS_TTL) {
            let previous = std::mem::take(&mut *index);
            *index = self.build_cells(edge_ms, previous);
        }
        read(&index)
    }

    /// The index as the registry stands, each list following `previous`'s list of the same cell.
    fn build_cells(&self, edge_ms: f32, previous: CellIndex) -> CellIndex {
        let nodes = self.nodes.read().expect("registry lock");
        let members: Vec<(&NodeId, &NodeEntry, CellKey)> = nodes
            .iter()
            .filter(|(_, n)| self.healthy(n) && !n.overlay.addrs.is_empty())
            .map(|(id, n)| (id, n, cell_of(&n.coord, n.reg.region.as_deref(), edge_ms)))
            .collect();
        let mut sizes: HashMap<CellKey, usize> = HashMap::new();
        for (_, _, key) in &members {
            *sizes.entry(*key).or_default() += 1;
        }
        let mut parts: HashMap<CellKey, Vec<(&NodeId, &NodeEntry)>> = HashMap::new();
        let mut of = HashMap::with_capacity(members.len());
        for (id, n, key) in members {
            let part = part_of(key, id, sizes[&key]);
            of.insert(*id, part);
            parts.entry(part).or_default().push((id, n));
        }
        let mut previous = previous.lists;
        let lists = parts
            .into_iter()
            .map(|(key, mut members)| {
                members.sort_unstable_by_key(|(id, _)| **id);
                let ids: Vec<NodeId> = members.iter().map(|(id, _)| **id).collect();
                let mut chosen = listed(key, &ids);
                chosen.sort_unstable();
                let contacts: Vec<PeerContact> = chosen
                    .into_iter()
                    .map(|i| {
                        let (id, n) = members[i];
                        let rendezvous = n.rendezvous_addr(None);
                        // Behind NAT: where members punch through to its QUIC endpoint, as clients do.
                        let via = rendezvous.is_none().then(|| self.punch_via(&nodes, id, n)).flatten();
                        PeerContact { id: *id, addrs: n.overlay.addrs.clone(), rendezvous, via }
                    })
                    .collect();
                (key, CellEntry::after(previous.remove(&key), CellList::new(contacts)))
            })
            .collect();
        CellIndex { built: Some(self.clock.now()), of, lists }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u32) -> NodeId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_be_bytes());
        NodeId(b)
    }

    /// A member as nodes typically advertise themselves: QUIC and TCP over IPv4, QUIC over IPv6, and half
    /// of them publicly reachable (a rendezvous), the others behind NAT, attached to one of those.
    fn contact(i: u32, port: u16) -> PeerContact {
        let v4 = format!("198.51.{}.{}", (i >> 8) & 0xff, i & 0xff);
        let public = |i: u32| SocketAddr::from(([198, 51, (i >> 8) as u8, i as u8], 7701));
        PeerContact {
            id: id(i),
            addrs: vec![
                format!("/ip4/{v4}/udp/{port}/quic-v1"),
                format!("/ip4/{v4}/tcp/{port}"),
                format!("/ip6/2001:db8::{i:x}/udp/{port}/quic-v1"),
            ],
            rendezvous: (i.is_multiple_of(2)).then(|| public(i)),
            via: (!i.is_multiple_of(2)).then(|| Rendezvous { id: id(i - 1), addr: public(i - 1) }),
        }
    }

    fn list(ids: impl IntoIterator<Item = u32>) -> CellList {
        CellList::new(ids.into_iter().map(|i| contact(i, 7702)).collect())
    }

    fn registration() -> Registration {
        Registration { region: Some("lab".into()), ..crate::registry::tests::reg() }
    }

    /// Through the registry: a node holding the previous version gets the change from it (which gives the
    /// current list), a node holding an unknown version or none the whole list, an up-to-date one nothing,
    /// and a node that takes no changes whole lists.
    #[test]
    fn a_node_holding_a_recent_version_gets_the_change() {
        let clock = Clock::manual(10_000_000);
        let r = Registry::new(Duration::from_secs(600), 100, HashSet::new())
            .with_clock(clock.clone())
            .with_cells(Some(100.0));
        let beat = |i: u32, port: u16| {
            let overlay =
                OverlayReport { addrs: vec![format!("/ip4/127.0.0.1/udp/{port}/quic-v1")], ..Default::default() };
            clock.advance(Duration::from_millis(1)); // each message newer than the last (replays are refused)
            let now = clock.now_ms();
            r.heartbeat(&id(i), NodeStats::default(), false, Some(overlay), now, now).expect("heartbeat");
        };
        for i in 0..20 {
            r.register(id(i), registration(), clock.now_ms(), clock.now_ms()).expect("register");
            beat(i, 4000 + i as u16);
        }
        let Some(CellUpdate::Whole(first)) = r.cell_update_for(&id(0), None, true) else { panic!("a whole list") };
        assert_eq!(first.members.len(), 20);
        assert_eq!(r.cell_update_for(&id(0), Some(first.version), true), None, "up to date");

        clock.advance(CELLS_TTL + Duration::from_secs(1));
        r.block(id(19));
        r.register(id(20), registration(), clock.now_ms(), clock.now_ms()).expect("register");
        beat(20, 4020);
        beat(7, 5007);
        let Some(CellUpdate::Change(change)) = r.cell_update_for(&id(0), Some(first.version), true) else {
            panic!("a change")
        };
        let Some(current) = r.cell_list_for(&id(0), None) else { panic!("a whole list") };
        assert_eq!((change.from, change.to), (first.version, current.version));
        assert_eq!(change.added.iter().map(|m| m.id).collect::<Vec<_>>(), [id(7), id(20)]);
        assert_eq!(change.removed, [id(19)]);
        assert_eq!(first.apply(&change).as_ref(), Ok(&*current));
        assert_eq!(r.cell_update_for(&id(0), Some(12345), true), Some(CellUpdate::Whole(current.clone())));
        assert_eq!(r.cell_update_for(&id(0), None, true), Some(CellUpdate::Whole(current.clone())));
        assert_eq!(r.cell_update_for(&id(0), Some(first.version), false), Some(CellUpdate::Whole(current.clone())));
        assert_eq!(r.cell_list_for(&id(0), Some(current.version)), None);
    }

    /// At most CELL_HISTORY versions back, each change at most 1/CHANGE_SHARE of the list; older versions
    /// and big changes get the whole list. Every change kept gives exactly the current list.
    #[test]
    fn history_is_bounded_by_versions_and_size() {
        let mut versions = vec![list(0..400)];
        let mut entry = CellEntry::after(None, versions[0].clone());
        for v in 1..=6u32 {
            // One member leaves, one joins, one moves, every version.
            let moved = |i: u32| contact(i, if i == 100 + v { 7703 } else { 7702 });
            let next = CellList::new((v..400 + v).map(moved).collect());
            entry = CellEntry::after(Some(entry), next.clone());
            versions.push(next);
        }
        let current = versions.last().expect("versions");
        assert_eq!(entry.changes.len(), CELL_HISTORY);
        for (age, held) in versions.iter().rev().enumerate().skip(1) {
            match entry.update_for(Some(held.version), true) {
                Some(CellUpdate::Change(c)) => {
                    assert!(age <= CELL_HISTORY, "{age} versions back");
                    assert_eq!(held.apply(&c).as_ref(), Ok(current));
                }
                Some(CellUpdate::Whole(_)) => assert!(age > CELL_HISTORY, "{age} versions back"),
                None => panic!("{age} versions back is not current"),
            }
        }
        // Half the members replaced at once: the change would cost about half the list, so none is kept.
        let replaced = CellEntry::after(Some(entry), list(200..600));
        assert!(replaced.changes.is_empty());
        assert!(matches!(replaced.update_for(Some(current.version), true), Some(CellUpdate::Whole(_))));
    }

    /// What a node downloads in a heartbeat answer for its cell: a whole list of MAX_CELL_LISTED members
    /// vs the change after 1 % of them left and 1 % joined (numbers in docs/protocol.md).
    #[test]
    fn a_change_costs_a_fraction_of_the_whole_list() {
        let n = fog_proto::api::MAX_CELL_LISTED as u32;
        let churn = n / 100;
        let old = list(0..n);
        let new = list(churn..n + churn);
        let answer = |cell: Option<CellList>, cell_delta: Option<CellDelta>| {
            let plain = r#"{"registered": true, "origins": ["https://videos.example.com/vod/"], "reachable": true,
                "verified_addrs": ["198.51.100.7:7701"]}"#;
            let mut answer: fog_proto::api::HeartbeatResponse = serde_json::from_str(plain).expect("answer");
            (answer.cell, answer.cell_delta) = (cell, cell_delta);
            serde_json::to_vec(&answer).expect("json").len()
        };
        let (whole, change) = (answer(Some(new.clone()), None), answer(None, Some(CellDelta::between(&old, &new))));
        println!("heartbeat answer with a cell of {n}: {whole} bytes whole, {change} bytes after 1 % churn");
        assert!(change * 20 < whole, "{change} vs {whole}");
        // The size estimate that bounds the history stays near the real size.
        let estimate = list_bytes(&new);
        assert!(estimate * 10 > whole * 8 && estimate * 10 < whole * 12, "estimate {estimate} vs {whole}");
    }
}
