//! How others reach a node: the path clients take (direct, hole-punched through a rendezvous, or none),
//! the contact the scheduler hands out, and the bootstrap peer directory nodes get their first peers from.

use super::*;

/// How clients reach a node (some of them, when it is direct in one family and punched in the other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPath {
    /// The tracker dialled it (at one address at least): clients dial it too.
    Direct,
    /// Behind NAT, attached to a directly reachable rendezvous: clients hole-punch through it.
    HolePunch,
    /// Neither: not scheduled.
    Unreachable,
}

impl ClientPath {
    pub const ALL: [ClientPath; 3] = [Self::Direct, Self::HolePunch, Self::Unreachable];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::HolePunch => "hole_punch",
            Self::Unreachable => "unreachable",
        }
    }
}

/// How long the bootstrap peer directory is reused before it is rebuilt from the registry.
const PEER_DIRECTORY_TTL: Duration = Duration::from_secs(2);

/// The bootstrap peer directory, and when it was built.
#[derive(Debug, Default)]
pub(super) struct PeerDirectory {
    built: Option<Instant>,
    contacts: Arc<Contacts>,
}

/// Overlay contacts of healthy nodes, split by whether the tracker could dial them.
#[derive(Debug, Default)]
pub(super) struct Contacts {
    reachable: Vec<PeerContact>,
    others: Vec<PeerContact>,
    /// The verified addresses of the reachable ones, for a rendezvous address in the asker's family.
    direct: HashMap<NodeId, Vec<SocketAddr>>,
}

impl Registry {
    pub(super) fn client_path(&self, nodes: &HashMap<NodeId, NodeEntry>, id: &NodeId, n: &NodeEntry) -> ClientPath {
        if n.reg.reachable || n.more_addrs.iter().any(|a| a.verified) {
            ClientPath::Direct
        } else if self.punch_via(nodes, id, n).is_some() {
            ClientPath::HolePunch
        } else {
            ClientPath::Unreachable
        }
    }

    /// How clients of each family (IPv4, IPv6) reach `n`: directly in a family it was dialled back in,
    /// else by a punch through its rendezvous in the family it attached in (the rendezvous's address and the
    /// node's NAT mapping are both in it), else not at all.
    pub(super) fn paths_by_family(
        &self,
        nodes: &HashMap<NodeId, NodeEntry>,
        id: &NodeId,
        n: &NodeEntry,
    ) -> [ClientPath; 2] {
        let (verified, _) = n.families();
        let punched = self.punch_via(nodes, id, n).map_or(Families::default(), |v| Families::of(v.addr.ip()));
        [(verified.ipv4, punched.ipv4), (verified.ipv6, punched.ipv6)].map(|(direct, punch)| match (direct, punch) {
            (true, _) => ClientPath::Direct,
            (false, true) => ClientPath::HolePunch,
            (false, false) => ClientPath::Unreachable,
        })
    }

    /// The rendezvous clients punch through to `n`, if it is attached to one that is alive, directly
    /// reachable and lists it (the node's word alone is not enough). Its address is in the family the node
    /// attached in, which is the family its NAT mapping is in.
    pub(super) fn punch_via(
        &self,
        nodes: &HashMap<NodeId, NodeEntry>,
        id: &NodeId,
        n: &NodeEntry,
    ) -> Option<Rendezvous> {
        let r_id = n.overlay.rendezvous?;
        let r = nodes.get(&r_id).filter(|r| self.alive(r) && r.overlay.attached.contains(id))?;
        let family = n.overlay.external_quic.map(|a| Families::of(a.ip()));
        Some(Rendezvous { id: r_id, addr: r.rendezvous_addr(family)? })
    }

    /// How clients dial `n`, if anyone can: its verified addresses, IPv6 first, and its rendezvous if it
    /// has one (for clients of a family it is not verified in). The scheduler gives each client the part
    /// of its families ([`NodeContact::for_families`]).
    pub(super) fn contact(
        &self,
        nodes: &HashMap<NodeId, NodeEntry>,
        id: &NodeId,
        n: &NodeEntry,
    ) -> Option<NodeContact> {
        let direct = n.direct_addrs();
        match (self.punch_via(nodes, id, n), direct.split_first()) {
            (Some(via), _) => Some(NodeContact {
                other_addrs: direct,
                via: Some(via),
                ..NodeContact::direct(*id, n.overlay.external_quic.unwrap_or(n.reg.addr))
            }),
            (None, Some((first, rest))) => {
                Some(NodeContact { other_addrs: rest.to_vec(), ..NodeContact::direct(*id, *first) })
            }
            (None, None) => None,
        }
    }

    /// Overlay peers for `id` to connect to: live nodes with overlay addresses. Two thirds of the list (at
    /// most [`NEIGHBOURHOOD`]) are the nodes nearest to it by coordinate (where peer fill finds a chunk's
    /// home); then directly reachable ones (which can relay and act as rendezvous), then others. Each asking node gets
    /// a different window of the directory, so bootstrap load spreads; the cost is O(`limit`), not O(nodes).
    /// Each contact's rendezvous address is in the family `id` needs one in (see
    /// [`NodeEntry::rendezvous_family`]): an IPv6-only node behind a firewall cannot attach over IPv4.
    pub fn peers_for(&self, id: &NodeId, limit: usize) -> Vec<PeerContact> {
        let contacts = self.peer_directory();
        let (reachable, others) = (&contacts.reachable, &contacts.others);
        let start = placement::weight(&ChunkHash(id.0), id) as usize;
        let mut out: Vec<PeerContact> = Vec::with_capacity(limit);
        if let Some(coord) = self.coord_of(id) {
            let snap = self.snapshot();
            let listed = |nid: &NodeId| {
                [reachable, others].into_iter().find_map(|l| l.binary_search_by_key(nid, |c| c.id).ok().map(|i| &l[i]))
            };
            let nearest = NEIGHBOURHOOD.min(limit * 2 / 3);
            for i in snap.nearest(&coord, nearest + 1, &self.params) {
                let nid = snap.nodes[i as usize].contact.id;
                if let Some(c) = listed(&nid).filter(|_| nid != *id && out.len() < nearest) {
                    out.push(c.clone());
                }
            }
        }
        for (list, want) in [(reachable, limit.div_ceil(2)), (others, limit), (reachable, limit)] {
            let want = want.min(limit - out.len());
            let mut taken = 0;
            for i in 0..list.len() {
                if taken == want {
                    break;
                }
                let c = &list[(start + i) % list.len()];
                if c.id != *id && !out.iter().any(|o| o.id == c.id) {
                    out.push(c.clone());
                    taken += 1;
                }
            }
        }
        let family = self.nodes.read().expect("registry lock").get(id).and_then(NodeEntry::rendezvous_family);
        if family.is_some() {
            for c in &mut out {
                c.rendezvous = contacts.direct.get(&c.id).and_then(|d| rendezvous_among(d, family));
            }
        }
        out
    }

    /// The (reachable, other) overlay contacts of live nodes (joining ones too: peers should dial them),
    /// the others with the rendezvous peers punch through to their QUIC endpoints (as clients do), and the
    /// reachable ones' verified addresses; rebuilt at most every [`PEER_DIRECTORY_TTL`].
    pub(super) fn peer_directory(&self) -> Arc<Contacts> {
        let mut dir = self.directory.lock().expect("directory lock");
        if dir.built.is_none_or(|t| self.since(t) >= PEER_DIRECTORY_TTL) {
            let nodes = self.nodes.read().expect("registry lock");
            let (mut reachable, mut others, mut direct) = (Vec::new(), Vec::new(), HashMap::new());
            for (id, n) in nodes.iter().filter(|(_, n)| self.alive(n) && !n.overlay.addrs.is_empty()) {
                let addrs = n.direct_addrs();
                let rendezvous = rendezvous_among(&addrs, None);
                let via = rendezvous.is_none().then(|| self.punch_via(&nodes, id, n)).flatten();
                let contact = PeerContact { id: *id, addrs: n.overlay.addrs.clone(), rendezvous, via };
                if rendezvous.is_some() {
                    reachable.push(contact);
                    direct.insert(*id, addrs);
                } else {
                    others.push(contact)
                }
            }
            // A stable order, so that windows stay put between rebuilds.
            reachable.sort_unstable_by_key(|c| c.id);
            others.sort_unstable_by_key(|c| c.id);
            let contacts = Arc::new(Contacts { reachable, others, direct });
            *dir = PeerDirectory { built: Some(self.clock.now()), contacts };
        }
        dir.contacts.clone()
    }
}
