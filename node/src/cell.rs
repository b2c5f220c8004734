//! This node's cell (issue #17, item 2): the members the tracker lists (`fog_proto::api::CellList`), among
//! which every member finds a missed chunk's home in the same rendezvous order
//! (`fog_sched::cells::home_order`), so a cell fetches each chunk from the origin once. Members need not be
//! connected: [`AddressBook`] gives libp2p their addresses, so asking a member dials it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use fog_proto::api::{CellDelta, CellError, CellList};
use fog_proto::{ChunkHash, NodeId};
use fog_sched::cells::home_order;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent,
    ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

use crate::overlay::peer_id_of;

/// One listed member.
#[derive(Debug, Clone)]
pub struct Member {
    pub peer: PeerId,
    pub node: NodeId,
    /// Answered busy, failed or was silent: not asked until then (the next in order is home meanwhile).
    pub resting_until: Option<Instant>,
}

/// The members of this node's cell, as last listed.
#[derive(Debug, Clone)]
pub struct Cell {
    /// The list as the tracker sent it: what its next change applies to.
    pub listed: CellList,
    /// The listed members this node can dial (and itself), among which it finds homes.
    pub members: Vec<Member>,
    /// A change from the tracker did not give the list it named: report no version, so the tracker sends
    /// the whole list (the members stay in use meanwhile).
    resync: bool,
}

impl Cell {
    /// The cell of `listed` (within its bounds: [`CellList::check_bounds`]), and the addresses to dial its
    /// members at: members other than this node (`me`) without an address `dialable` are left out.
    /// Members still resting in `previous` keep resting.
    pub fn new(
        listed: CellList,
        me: &PeerId,
        dialable: impl Fn(&Multiaddr) -> bool,
        previous: Option<&Cell>,
    ) -> (Self, HashMap<PeerId, Vec<Multiaddr>>) {
        let mut addresses = HashMap::new();
        let mut members = Vec::new();
        for m in &listed.members {
            let Some(peer) = peer_id_of(&m.id) else { continue };
            let addrs: Vec<Multiaddr> = m.addrs.iter().filter_map(|a| a.parse().ok()).filter(|a| dialable(a)).collect();
            if peer != *me {
                if addrs.is_empty() {
                    continue;
                }
                addresses.insert(peer, addrs);
            }
            let resting_until =
                previous.and_then(|p| p.members.iter().find(|o| o.peer == peer)).and_then(|o| o.resting_until);
            members.push(Member { peer, node: m.id, resting_until });
        }
        (Self { listed, members, resync: false }, addresses)
    }

    /// The version to report to the tracker: it answers with the change from there. None after a change
    /// went wrong, to get the whole list.
    pub fn held_version(&self) -> Option<u64> {
        (!self.resync).then_some(self.listed.version)
    }

    /// The list after the tracker's `delta`. A change from another version than the one held is refused
    /// (the next report names the held one); one that does not give the list it names makes the node ask
    /// for the whole list.
    pub fn changed(&mut self, delta: &CellDelta) -> Result<CellList, CellError> {
        let next = self.listed.apply(delta);
        if matches!(next, Err(CellError::Bounds(_) | CellError::Mismatch { .. })) {
            self.resync = true;
        }
        next
    }

    /// The `k` members to ask for `hash`, best first, and whether this node (`me`) is the chunk's home
    /// itself: the first members in the chunk's home order that are not resting or `banned`, this node
    /// counting as always available.
    pub fn homes(
        &self,
        hash: &ChunkHash,
        me: &PeerId,
        banned: impl Fn(&PeerId) -> bool,
        k: usize,
    ) -> (Vec<&Member>, bool) {
        let ids: Vec<NodeId> = self.members.iter().map(|m| m.node).collect();
        let now = Instant::now();
        let available = |i: usize| {
            let m = &self.members[i];
            m.peer == *me || (!banned(&m.peer) && m.resting_until.is_none_or(|t| t <= now))
        };
        let order = home_order(hash, &ids, available, k + 1);
        let own_home = order.first().is_some_and(|&i| self.members[i].peer == *me);
        let asked = order.into_iter().map(|i| &self.members[i]).filter(|m| m.peer != *me).take(k).collect();
        (asked, own_home)
    }

    pub fn rest(&mut self, peer: &PeerId, until: Instant) {
        if let Some(m) = self.members.iter_mut().find(|m| m.peer == *peer) {
            m.resting_until = Some(until);
        }
    }
}

/// Addresses of peers no other behaviour may know (cell members this node never connected to), handed to
/// libp2p when it dials them.
#[derive(Debug, Clone, Default)]
pub struct AddressBook {
    addrs: Arc<Mutex<HashMap<PeerId, Vec<Multiaddr>>>>,
}

impl AddressBook {
    /// Replaces what the book knows (bounded by the caller: one cell list).
    pub fn replace(&self, addrs: HashMap<PeerId, Vec<Multiaddr>>) {
        *self.addrs.lock().expect("address book lock") = addrs;
    }
}

impl NetworkBehaviour for AddressBook {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        let book = self.addrs.lock().expect("address book lock");
        Ok(peer.and_then(|p| book.get(&p).cloned()).unwrap_or_default())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ed25519_dalek::SigningKey;
    use fog_proto::api::PeerContact;

    use super::*;

    fn node(i: u8) -> NodeId {
        SigningKey::from_bytes(&[i; 32]).verifying_key().into()
    }

    fn contact(i: u8, port: u16) -> PeerContact {
        PeerContact {
            id: node(i),
            addrs: vec![format!("/ip4/10.0.0.{i}/udp/{port}/quic-v1")],
            rendezvous: None,
            via: None,
        }
    }

    fn cell(list: CellList, previous: Option<&Cell>) -> Cell {
        // Members at 10.0.0.13 are not dialable from here: left out of either list alike.
        let dialable = |a: &Multiaddr| !a.to_string().contains("10.0.0.13/");
        Cell::new(list, &peer_id_of(&node(1)).expect("peer id"), dialable, previous).0
    }

    fn members(c: &Cell) -> Vec<(PeerId, NodeId)> {
        c.members.iter().map(|m| (m.peer, m.node)).collect()
    }

    /// A change from the version held gives exactly the members the whole list would (so every member
    /// agrees on homes), and who is resting stays resting.
    #[test]
    fn a_change_gives_the_whole_lists_members() {
        let old = CellList::new((1..=40).map(|i| contact(i, 7000)).collect());
        let changed = |i: u8| [5, 13, 20].contains(&i);
        let new = CellList::new(
            (1..=44)
                .filter(|i| ![3, 17, 30].contains(i))
                .map(|i| contact(i, if changed(i) { 7001 } else { 7000 }))
                .collect(),
        );
        let mut held = cell(old, None);
        assert_eq!(held.members.len(), 39, "the undialable member is left out");
        let resting = peer_id_of(&node(2)).expect("peer id");
        let until = Instant::now() + Duration::from_secs(60);
        held.rest(&resting, until);

        let delta = fog_proto::api::CellDelta::between(&held.listed, &new);
        assert_eq!((delta.added.len(), delta.removed.len()), (7, 3), "4 new and 3 changed, 3 gone");
        let next = held.changed(&delta).expect("the change applies");
        assert_eq!(next, new);
        let after = cell(next, Some(&held));
        let mut whole = cell(new.clone(), None);
        whole.rest(&resting, until);
        assert_eq!(members(&after), members(&whole));
        assert_eq!(after.held_version(), Some(new.version));
        assert_eq!(after.members.iter().find(|m| m.peer == resting).and_then(|m| m.resting_until), Some(until));
        let me = peer_id_of(&node(1)).expect("peer id");
        for c in 0..50u32 {
            let hash = ChunkHash::of(&c.to_be_bytes());
            let homes = |c: &Cell| c.homes(&hash, &me, |_| false, 3).0.iter().map(|m| m.node).collect::<Vec<_>>();
            assert_eq!(homes(&after), homes(&whole), "chunk {c}");
        }
    }

    /// A change from a version this node does not hold is refused and the node keeps reporting the version
    /// it holds (the tracker answers from there); one that does not give the list it names makes it report
    /// no version, so the whole list comes next.
    #[test]
    fn a_change_from_another_version_is_refused() {
        let a = CellList::new((1..=5).map(|i| contact(i, 7000)).collect());
        let b = CellList::new((1..=6).map(|i| contact(i, 7000)).collect());
        let c = CellList::new((1..=7).map(|i| contact(i, 7000)).collect());
        let mut held = cell(a.clone(), None);
        let from_b = fog_proto::api::CellDelta::between(&b, &c);
        assert_eq!(held.changed(&from_b), Err(CellError::NotHeld { from: b.version, held: a.version }));
        assert_eq!(held.held_version(), Some(a.version));
        assert_eq!(held.listed, a, "nothing changed");

        let wrong = fog_proto::api::CellDelta { to: c.version, ..fog_proto::api::CellDelta::between(&a, &b) };
        assert!(matches!(held.changed(&wrong), Err(CellError::Mismatch { .. })));
        assert_eq!(held.held_version(), None, "asks for the whole list");
        assert_eq!(held.members.len(), 5, "and keeps its members meanwhile");
    }
}
