//! Cells (issue #17, item 2): the tracker partitions the overlay into cells — nodes' region labels, or the
//! grid cells of their coordinates, crowded ones split into parts (`fog_sched::cells`) — and lists each
//! node its cell. Every member ranks the same list for a missed chunk, so the whole cell agrees on the
//! chunk's home and the chunk is fetched from the origin once per cell, not once per overlapping
//! neighbourhood. The index is rebuilt from the registry at most every [`CELLS_TTL`]; a list's version
//! changes only when its members or their addresses do, and a node is sent its list only then.

use fog_proto::api::CellList;
use fog_sched::cells::{cell_of, home_order, listed, part_of, CellKey};

use super::*;

/// How long the cell index is reused before it is rebuilt. Coordinates move a little every heartbeat and
/// members come and go; a list (up to 2048 contacts) is sent again whenever it changes, so at most this
/// often. Meanwhile a member that left is skipped by its cell-mates once it fails to answer.
const CELLS_TTL: Duration = Duration::from_secs(30);

/// Every healthy node's cell, and each cell's list.
#[derive(Debug, Default)]
pub(super) struct CellIndex {
    built: Option<Instant>,
    of: HashMap<NodeId, CellKey>,
    lists: HashMap<CellKey, Arc<CellList>>,
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
        let list = self.with_cell_index(|index| index.lists.get(&cell).cloned())?;
        let ids: Vec<NodeId> = list.members.iter().map(|m| m.id).collect();
        home_order(chunk, &ids, |_| true, 1).first().map(|&i| ids[i])
    }

    /// `id`'s cell list, unless the node already holds this version.
    pub fn cell_list_for(&self, id: &NodeId, held: Option<u64>) -> Option<Arc<CellList>> {
        self.with_cell_index(|index| index.lists.get(index.of.get(id)?).cloned())
            .filter(|list| held != Some(list.version))
    }

    /// Number of cells (parts count as cells), for stats.
    pub fn cell_count(&self) -> usize {
        self.with_cell_index(|index| Some(index.lists.len())).unwrap_or(0)
    }

    fn with_cell_index<T>(&self, read: impl FnOnce(&CellIndex) -> Option<T>) -> Option<T> {
        let edge_ms = self.cell_edge_ms?;
        let mut index = self.cells.lock().expect("cells lock");
        if index.built.is_none_or(|t| self.since(t) >= CELLS_TTL) {
            *index = self.build_cells(edge_ms);
        }
        read(&index)
    }

    fn build_cells(&self, edge_ms: f32) -> CellIndex {
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
                        PeerContact { id: *id, addrs: n.overlay.addrs.clone(), rendezvous: n.rendezvous_addr(None) }
                    })
                    .collect();
                (key, Arc::new(CellList { version: version_of(&contacts), members: contacts }))
            })
            .collect();
        CellIndex { built: Some(self.clock.now()), of, lists }
    }
}

/// A digest of the listed members and their addresses.
fn version_of(members: &[PeerContact]) -> u64 {
    let mut h = blake3::Hasher::new();
    for m in members {
        h.update(m.id.as_bytes());
        for a in &m.addrs {
            h.update(a.as_bytes());
            h.update(b"\0");
        }
        h.update(format!("{:?}", m.rendezvous).as_bytes());
        h.update(b"\n");
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_be_bytes(first)
}
