//! Reachability for nodes behind NAT (protocol: `fog_proto::rendezvous`).
//!
//! Every node runs [`RendezvousServer`] on its QUIC endpoint; the tracker only points clients at the ones it
//! could dial itself. A node the tracker could not dial runs [`attach_forever`]: it keeps one connection from
//! its own chunk-serving socket to a public node, which holds its NAT mapping open and carries hole-punch
//! requests. The QUIC packets the node then sends towards a client open its NAT for that client only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use fog_net::backoff::Backoff;
use fog_net::frame_io::{read_frame, write_last_frame};
use fog_net::per_source::source_of;
use fog_net::rendezvous::{exchange, ExchangeError};
use fog_net::transport;
use fog_proto::api::{now_ms, Membership, Rendezvous, Signed, MAX_ATTACHED};
use fog_proto::rendezvous::{Attach, Frame, ALPN, KIND_ATTACH};
use fog_proto::NodeId;
use tokio::sync::watch;

/// How long the rendezvous waits for the attached node to confirm it sent its punch packets.
const PUNCH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a node keeps sending handshake packets towards a client: long enough for the client's own
/// handshake to arrive through the hole.
const PUNCH_PACKETS_FOR: Duration = Duration::from_secs(3);
/// A signed attach older or newer than this is refused (replay guard; clocks are roughly in sync).
const ATTACH_MAX_SKEW_MS: u64 = 5 * 60 * 1000;
/// Nodes attached at once from one source (IPv4 address or IPv6 /64): a household's devices behind one NAT
/// fit; one host cannot take every slot of [`MAX_ATTACHED`].
const ATTACHED_PER_SOURCE: usize = 16;
/// Idle timeout of the attachment; keep-alives every third of it hold the NAT mapping open.
const ATTACH_IDLE: Duration = Duration::from_secs(30);

/// The rendezvous side: attached nodes by id.
#[derive(Debug)]
pub struct RendezvousServer {
    id: NodeId,
    attached: Mutex<HashMap<NodeId, quinn::Connection>>,
    /// Memberships must be signed with it; learned at registration. Until then nobody is attached.
    tracker_key: Mutex<Option<NodeId>>,
}

impl RendezvousServer {
    pub fn new(id: NodeId) -> Self {
        Self { id, attached: Mutex::new(HashMap::new()), tracker_key: Mutex::new(None) }
    }

    pub fn set_tracker_key(&self, key: Option<NodeId>) {
        *self.tracker_key.lock().expect("tracker key lock") = key;
    }

    /// The tracker's key, once registered: peers' memberships (`fog-peer/1`) must be signed with it too.
    pub fn tracker_key(&self) -> Option<NodeId> {
        *self.tracker_key.lock().expect("tracker key lock")
    }

    pub fn attached(&self) -> usize {
        self.attached.lock().expect("attached lock").len()
    }

    /// The nodes attached here, for the heartbeat: the tracker schedules them only when their rendezvous
    /// says they are.
    pub fn attached_nodes(&self) -> Vec<NodeId> {
        let mut nodes: Vec<NodeId> = self.attached.lock().expect("attached lock").keys().copied().collect();
        nodes.sort_unstable(); // the tracker notices a change in the list, not in its order
        nodes
    }

    /// Serves one connection that negotiated the rendezvous ALPN: attaches or punch requests.
    pub async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        loop {
            let Ok((mut send, mut recv)) = conn.accept_bi().await else { return };
            let (this, conn) = (self.clone(), conn.clone());
            tokio::spawn(async move {
                let reply = match tokio::time::timeout(PUNCH_TIMEOUT, read_frame(&mut recv)).await {
                    Ok(Ok(Frame::Attach { attach, membership })) => {
                        let reply = this.attach(&conn, &attach, membership.as_ref());
                        if matches!(reply, Frame::Attached { .. }) {
                            tokio::spawn(this.clone().detach_when_closed(attach.node_id, conn.clone()));
                        }
                        reply
                    }
                    Ok(Ok(Frame::Punch { target })) => this.punch(&conn, target).await,
                    Ok(Ok(other)) => Frame::Error { message: format!("unexpected frame {other:?}") },
                    // The answer tells the asker what was wrong with its frame.
                    Ok(Err(e)) => Frame::Error { message: e.to_string() },
                    Err(_) => Frame::Error { message: "no request in time".into() },
                };
                if let Frame::Error { message } = &reply {
                    tracing::debug!(remote = %conn.remote_address(), %message, "rendezvous refused a request");
                }
                let _ = write_last_frame(&mut send, &reply.encode()).await;
            });
        }
    }

    /// Attaches the node that signed `signed`, if the tracker's `membership` shows it registered.
    fn attach(&self, conn: &quinn::Connection, signed: &Signed, membership: Option<&Signed>) -> Frame {
        let attach: Attach = match signed.open(KIND_ATTACH) {
            Ok(a) => a,
            Err(e) => return Frame::Error { message: format!("attach refused: {e}") },
        };
        if attach.rendezvous != self.id {
            return Frame::Error { message: "attach is signed for another rendezvous".into() };
        }
        if now_ms().abs_diff(attach.timestamp_ms) > ATTACH_MAX_SKEW_MS {
            return Frame::Error { message: "attach timestamp is more than 5 minutes off; check the clock".into() };
        }
        let node = signed.node_id;
        let Some(tracker_key) = *self.tracker_key.lock().expect("tracker key lock") else {
            return Frame::Error { message: "this rendezvous has not registered with the tracker yet".into() };
        };
        let Some(membership) = membership else {
            return Frame::Error { message: "attach refused: no membership (register with the tracker first)".into() };
        };
        if let Err(e) = Membership::verify(membership, tracker_key, node, now_ms()) {
            return Frame::Error { message: format!("attach refused: {e}") };
        }
        {
            let mut attached = self.attached.lock().expect("attached lock");
            let others = || attached.iter().filter(|(id, _)| **id != node);
            // One connection is one node: throwaway keys on one connection cannot take every slot.
            if others().any(|(_, c)| c.stable_id() == conn.stable_id()) {
                return Frame::Error { message: "this connection already holds another node's attachment".into() };
            }
            let source = source_of(conn.remote_address().ip());
            if others().filter(|(_, c)| source_of(c.remote_address().ip()) == source).count() >= ATTACHED_PER_SOURCE {
                let message =
                    format!("{ATTACHED_PER_SOURCE} nodes from your network are attached here; try another rendezvous");
                return Frame::Error { message };
            }
            if attached.len() >= MAX_ATTACHED && !attached.contains_key(&node) {
                return Frame::Error { message: format!("this rendezvous is full ({MAX_ATTACHED} nodes)") };
            }
            attached.insert(node, conn.clone());
        }
        tracing::info!(%node, remote = %conn.remote_address(), "node attached for hole punching");
        Frame::Attached { observed: transport::remote_addr(conn) }
    }

    /// Forgets `node` when its attachment closes (unless it re-attached on a newer connection).
    async fn detach_when_closed(self: Arc<Self>, node: NodeId, conn: quinn::Connection) {
        conn.closed().await;
        let mut attached = self.attached.lock().expect("attached lock");
        if attached.get(&node).is_some_and(|c| c.stable_id() == conn.stable_id()) {
            attached.remove(&node);
        }
    }

    async fn punch(&self, client: &quinn::Connection, target: NodeId) -> Frame {
        let Some(node) = self.attached.lock().expect("attached lock").get(&target).cloned() else {
            return Frame::Error { message: format!("node {target} is not attached here") };
        };
        let (client_addr, node_addr) = (transport::remote_addr(client), transport::remote_addr(&node));
        // The node's mapping is in the family it attached in: packets from it cannot reach a client of the
        // other family, nor could that client dial it (the tracker hands out `via` in the node's family).
        if client_addr.is_ipv4() != node_addr.is_ipv4() {
            let family = if node_addr.is_ipv4() { "IPv4" } else { "IPv6" };
            return Frame::Error { message: format!("node {target} is attached over {family}; ask over {family}") };
        }
        let request = Frame::PunchRequest { client: client_addr };
        match tokio::time::timeout(PUNCH_TIMEOUT, exchange(&node, &request)).await {
            Ok(Ok(Frame::PunchSent)) => Frame::PunchReady { addr: node_addr },
            Ok(Ok(other)) => Frame::Error { message: format!("node answered {other:?}") },
            Ok(Err(e)) => Frame::Error { message: format!("node unreachable: {e}") },
            Err(_) => Frame::Error { message: "node did not answer the punch request in time".into() },
        }
    }
}

/// Where this node is attached: the rendezvous and the node's own address as the rendezvous sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attachment {
    pub rendezvous: NodeId,
    pub external: SocketAddr,
}

pub type SharedAttachment = Arc<Mutex<Option<Attachment>>>;

/// The tracker's signed word that this node registered (`api::Membership`), shown when attaching.
pub type SharedMembership = Arc<Mutex<Option<Signed>>>;

/// Keeps this node attached to one of the rendezvous candidates in `plan` while it holds `Some` (the
/// tracker could not dial this node); detaches when it turns `None`. Tries candidates in turn with backoff.
pub async fn attach_forever(
    endpoint: quinn::Endpoint,
    key: SigningKey,
    mut plan: watch::Receiver<Option<Vec<Rendezvous>>>,
    attachment: SharedAttachment,
    membership: SharedMembership,
) {
    let mut next = 0usize;
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    loop {
        let candidates = plan.borrow_and_update().clone();
        let Some(candidates) = candidates.filter(|c| !c.is_empty()) else {
            *attachment.lock().expect("attachment lock") = None;
            if plan.changed().await.is_err() {
                return;
            }
            continue;
        };
        let via = &candidates[next % candidates.len()];
        next += 1;
        let membership = membership.lock().expect("membership lock").clone();
        match attach_once(&endpoint, &key, via, membership).await {
            Ok((conn, external)) => {
                backoff.reset();
                *attachment.lock().expect("attachment lock") = Some(Attachment { rendezvous: via.id, external });
                tracing::info!(rendezvous = %via.id, %external, "attached: clients can reach this node by hole punching");
                tokio::select! {
                    reason = serve_punch_requests(&endpoint, &conn) => {
                        tracing::warn!(rendezvous = %via.id, %reason, "attachment lost; attaching again");
                    }
                    () = no_longer_needed(&mut plan) => conn.close(0u32.into(), b"detaching"),
                }
                *attachment.lock().expect("attachment lock") = None;
            }
            Err(e) => {
                tracing::warn!(rendezvous = %via.id, addr = %via.addr, error = %e, "cannot attach to rendezvous");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Resolves when the plan turns `None` (the node became reachable) or its sender is gone.
async fn no_longer_needed(plan: &mut watch::Receiver<Option<Vec<Rendezvous>>>) {
    while plan.changed().await.is_ok() {
        if plan.borrow().is_none() {
            return;
        }
    }
}

/// Why an attempt to attach failed; the node tries the next rendezvous after a backoff.
#[derive(Debug, thiserror::Error)]
enum AttachError {
    #[error("{0}")]
    Connect(#[source] transport::ConnectError),
    #[error("{0}")]
    Exchange(#[from] ExchangeError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("unexpected answer {0:?}")]
    OutOfTurn(Box<Frame>),
    #[error("no answer within {PUNCH_TIMEOUT:?}")]
    Timeout,
}

async fn attach_once(
    endpoint: &quinn::Endpoint,
    key: &SigningKey,
    via: &Rendezvous,
    membership: Option<Signed>,
) -> Result<(quinn::Connection, SocketAddr), AttachError> {
    let cfg = transport::client_config_for(via.id, ATTACH_IDLE, ALPN);
    let conn =
        transport::connect_with(endpoint, cfg, via.addr, Duration::from_secs(5)).await.map_err(AttachError::Connect)?;
    let attach = Signed::sign(key, KIND_ATTACH, &Attach { rendezvous: via.id, timestamp_ms: now_ms() });
    match tokio::time::timeout(PUNCH_TIMEOUT, exchange(&conn, &Frame::Attach { attach, membership })).await {
        Ok(Ok(Frame::Attached { observed })) => Ok((conn, observed)),
        Ok(Ok(Frame::Error { message })) => Err(AttachError::Refused(message)),
        Ok(Ok(other)) => Err(AttachError::OutOfTurn(Box::new(other))),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(AttachError::Timeout),
    }
}

/// Answers the rendezvous's punch requests until the attachment closes; returns why it closed.
async fn serve_punch_requests(endpoint: &quinn::Endpoint, conn: &quinn::Connection) -> quinn::ConnectionError {
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => return e,
        };
        let reply = match tokio::time::timeout(PUNCH_TIMEOUT, read_frame(&mut recv)).await {
            Ok(Ok(Frame::PunchRequest { client })) => {
                punch_towards(endpoint, client);
                Frame::PunchSent
            }
            Ok(Ok(other)) => Frame::Error { message: format!("unexpected frame {other:?}") },
            Ok(Err(e)) => Frame::Error { message: e.to_string() },
            Err(_) => Frame::Error { message: "no request in time".into() },
        };
        let _ = write_last_frame(&mut send, &reply.encode()).await;
    }
}

/// Sends QUIC handshake packets from the serving socket to `client`, so this node's NAT lets the client's
/// packets in. The handshake itself is expected to fail (the client does not accept connections); the
/// packets are the point.
fn punch_towards(endpoint: &quinn::Endpoint, client: SocketAddr) {
    let cfg = transport::client_config(NodeId([0; 32]), PUNCH_PACKETS_FOR);
    match endpoint.connect_with(cfg, client, transport::SERVER_NAME) {
        Ok(connecting) => {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(PUNCH_PACKETS_FOR, connecting).await;
            });
        }
        Err(e) => tracing::debug!(%client, error = %e, "cannot send punch packets"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_proto::api::NodeContact;

    /// A node endpoint on loopback that runs the rendezvous for connections that ask for it and completes
    /// every other handshake.
    fn node_endpoint(key: &SigningKey, rendezvous: Option<Arc<RendezvousServer>>) -> quinn::Endpoint {
        node_endpoint_on(([127, 0, 0, 1], 0).into(), key, rendezvous)
    }

    /// [`node_endpoint`] bound to `bind`.
    fn node_endpoint_on(
        bind: SocketAddr,
        key: &SigningKey,
        rendezvous: Option<Arc<RendezvousServer>>,
    ) -> quinn::Endpoint {
        let config = transport::server_config(key, 8).expect("server config");
        let endpoint = quinn::Endpoint::server(config, bind).expect("bind");
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let rendezvous = rendezvous.clone();
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    match rendezvous {
                        Some(r) => r.serve_connection(conn).await,
                        None => drop(conn.closed().await),
                    }
                });
            }
        });
        endpoint
    }

    /// Real QUIC on loopback (no NAT, so this checks the protocol, not the hole: `testkit/tests/it/netns.rs`
    /// checks that through real masquerading routers).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attach_then_punch_and_refusals() {
        let (r_key, x_key) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        let (r_id, x_id) = (NodeId::from(r_key.verifying_key()), NodeId::from(x_key.verifying_key()));
        let tracker = SigningKey::from_bytes(&[3; 32]);
        let member = |node: NodeId, expiry_ms: u64| {
            let m = Membership { node_id: node, issued_ms: 0, expiry_ms };
            Signed::sign(&tracker, fog_proto::api::KIND_MEMBERSHIP, &m)
        };
        let server = Arc::new(RendezvousServer::new(r_id));
        server.set_tracker_key(Some(NodeId::from(tracker.verifying_key())));
        let r_endpoint = node_endpoint(&r_key, Some(server.clone()));
        let x_endpoint = node_endpoint(&x_key, None);
        let via = Rendezvous { id: r_id, addr: r_endpoint.local_addr().expect("addr") };
        let (_plan, plan_rx) = watch::channel(Some(vec![via.clone()]));
        let attachment = SharedAttachment::default();
        let membership = SharedMembership::new(Mutex::new(Some(member(x_id, u64::MAX))));
        tokio::spawn(attach_forever(x_endpoint.clone(), x_key.clone(), plan_rx, attachment.clone(), membership));
        let started = std::time::Instant::now();
        while attachment.lock().expect("lock").is_none() {
            assert!(started.elapsed() < Duration::from_secs(10), "node did not attach");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let x_addr = x_endpoint.local_addr().expect("addr");
        assert_eq!(*attachment.lock().expect("lock"), Some(Attachment { rendezvous: r_id, external: x_addr }));
        assert_eq!(server.attached(), 1);

        // A client reaches the node through the rendezvous, even with a stale address in hand.
        let client = transport::client_endpoint(([127, 0, 0, 1], 0).into()).expect("client endpoint");
        let stale_addr = "127.0.0.1:9".parse().expect("addr");
        let stale = NodeContact { via: Some(via.clone()), ..NodeContact::direct(x_id, stale_addr) };
        let conn = transport::connect_contact(&client, &stale, Duration::from_secs(5), Duration::from_secs(5))
            .await
            .expect("connected through the rendezvous");
        assert_eq!(conn.remote_address(), x_addr);

        // Punching to a node that is not attached, and an attach signed for another rendezvous, are refused.
        let stranger = NodeId([9; 32]);
        let err = fog_net::rendezvous::punch(&client, &via, stranger, Duration::from_secs(5)).await;
        assert!(
            matches!(&err, Err(fog_net::rendezvous::PunchError::Refused { message, .. }) if message.contains("not attached")),
            "{err:?}"
        );
        let cfg = transport::client_config_for(r_id, Duration::from_secs(5), ALPN);
        let conn = transport::connect_with(&client, cfg, via.addr, Duration::from_secs(5)).await.expect("connect");
        let forged = Signed::sign(&x_key, KIND_ATTACH, &Attach { rendezvous: stranger, timestamp_ms: now_ms() });
        let membership = Some(member(x_id, u64::MAX));
        let reply = exchange(&conn, &Frame::Attach { attach: forged, membership }).await.expect("answer");
        assert!(matches!(reply, Frame::Error { .. }), "{reply:?}");

        // Nodes the tracker did not register: no membership, an expired one, another node's, one the
        // tracker did not sign.
        let y_key = SigningKey::from_bytes(&[4; 32]);
        let y_id = NodeId::from(y_key.verifying_key());
        let y_attach = Signed::sign(&y_key, KIND_ATTACH, &Attach { rendezvous: r_id, timestamp_ms: now_ms() });
        let unsigned = Membership { node_id: y_id, issued_ms: 0, expiry_ms: u64::MAX };
        let self_signed = Signed::sign(&y_key, fog_proto::api::KIND_MEMBERSHIP, &unsigned);
        for (membership, why) in [
            (None, "no membership"),
            (Some(member(y_id, 1)), "expired"),
            (Some(member(x_id, u64::MAX)), "another node"),
            (Some(self_signed), "not signed by the tracker"),
        ] {
            let reply = exchange(&conn, &Frame::Attach { attach: y_attach.clone(), membership }).await.expect("answer");
            assert!(matches!(&reply, Frame::Error { message } if message.contains(why)), "{why}: {reply:?}");
        }

        // Throwaway keys (registered, say): one per connection, and a source's share, then refusals; the real
        // node stays.
        let attach = |seed: u8| {
            let key = SigningKey::from_bytes(&[seed; 32]);
            let membership = Some(member(NodeId::from(key.verifying_key()), u64::MAX));
            let attach = Signed::sign(&key, KIND_ATTACH, &Attach { rendezvous: r_id, timestamp_ms: now_ms() });
            Frame::Attach { attach, membership }
        };
        let reply = exchange(&conn, &attach(100)).await.expect("answer");
        assert!(matches!(reply, Frame::Attached { .. }), "{reply:?}");
        let reply = exchange(&conn, &attach(101)).await.expect("answer");
        assert!(matches!(&reply, Frame::Error { message } if message.contains("another node")), "{reply:?}");
        let mut held = vec![conn];
        for seed in 102..=120 {
            let cfg = transport::client_config_for(r_id, Duration::from_secs(5), ALPN);
            let conn = transport::connect_with(&client, cfg, via.addr, Duration::from_secs(5)).await.expect("connect");
            let reply = exchange(&conn, &attach(seed)).await.expect("answer");
            // The real node and the throwaway above hold two of this source's slots.
            let room = held.len() + 1 < ATTACHED_PER_SOURCE;
            assert_eq!(matches!(reply, Frame::Attached { .. }), room, "attach {seed}: {reply:?}");
            held.push(conn);
        }
        assert_eq!(server.attached(), ATTACHED_PER_SOURCE);
        assert!(server.attached_nodes().contains(&x_id));
    }

    /// A rendezvous on a dual-stack socket: a node attached over IPv4 cannot be punched for a client that
    /// asks over IPv6 (its packets would go nowhere), and the client is told so; over IPv4 it is reached.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn punches_stay_in_the_family_the_node_attached_in() {
        if std::net::UdpSocket::bind("[::1]:0").is_err() {
            eprintln!("SKIPPED: no IPv6 loopback ([::1]) on this host");
            return;
        }
        let (r_key, x_key) = (SigningKey::from_bytes(&[5; 32]), SigningKey::from_bytes(&[6; 32]));
        let (r_id, x_id) = (NodeId::from(r_key.verifying_key()), NodeId::from(x_key.verifying_key()));
        let tracker = SigningKey::from_bytes(&[7; 32]);
        let server = Arc::new(RendezvousServer::new(r_id));
        server.set_tracker_key(Some(NodeId::from(tracker.verifying_key())));
        let r_endpoint = node_endpoint_on(transport::any_family(), &r_key, Some(server.clone()));
        let port = r_endpoint.local_addr().expect("addr").port();
        let x_endpoint = node_endpoint(&x_key, None);
        let via_v4 = Rendezvous { id: r_id, addr: ([127, 0, 0, 1], port).into() };
        let (_plan, plan_rx) = watch::channel(Some(vec![via_v4.clone()]));
        let attachment = SharedAttachment::default();
        let m = Membership { node_id: x_id, issued_ms: 0, expiry_ms: u64::MAX };
        let membership = Signed::sign(&tracker, fog_proto::api::KIND_MEMBERSHIP, &m);
        let membership = SharedMembership::new(Mutex::new(Some(membership)));
        tokio::spawn(attach_forever(x_endpoint.clone(), x_key, plan_rx, attachment.clone(), membership));
        let started = std::time::Instant::now();
        while attachment.lock().expect("lock").is_none() {
            assert!(started.elapsed() < Duration::from_secs(10), "node did not attach");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let client = transport::client_endpoint(transport::any_family()).expect("client endpoint");
        let via_v6 = Rendezvous { id: r_id, addr: (std::net::Ipv6Addr::LOCALHOST, port).into() };
        let err = fog_net::rendezvous::punch(&client, &via_v6, x_id, Duration::from_secs(5)).await;
        assert!(
            matches!(&err, Err(fog_net::rendezvous::PunchError::Refused { message, .. }) if message.contains("attached over IPv4")),
            "{err:?}"
        );
        let addr = fog_net::rendezvous::punch(&client, &via_v4, x_id, Duration::from_secs(5)).await.expect("punched");
        assert_eq!(addr, x_endpoint.local_addr().expect("addr"));
    }
}
