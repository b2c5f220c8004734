//! This node's cell (issue #17, item 2): the members the tracker lists (`fog_proto::api::CellList`), among
//! which every member finds a missed chunk's home in the same rendezvous order
//! (`fog_sched::cells::home_order`), so a cell fetches each chunk from the origin once. Members need not be
//! connected: [`AddressBook`] gives libp2p their addresses, so asking a member dials it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use fog_proto::{ChunkHash, NodeId};
use fog_sched::cells::home_order;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent,
    ToSwarm,
};
use libp2p::{Multiaddr, PeerId};

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
    pub version: u64,
    pub members: Vec<Member>,
}

impl Cell {
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
