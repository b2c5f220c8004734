//! QUIC and TLS set-up shared by nodes (server side) and clients.
//!
//! There is no certificate authority. A node's TLS certificate is self-signed with its ed25519 identity key,
//! and a client pins the node id the tracker gave it: the handshake succeeds only if the server signs the
//! TLS 1.3 transcript with exactly that key. The certificate's contents are never trusted.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{Signature, SigningKey, Verifier};
use fog_proto::api::{Families, NodeContact};
use fog_proto::wire::ALPN;
use fog_proto::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// The TLS server name clients use; identity comes from the pinned key, not from this name.
pub const SERVER_NAME: &str = "fog-node";

/// Set-up failures: none of them goes away by trying again.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot encode the node key for its TLS certificate: {0}")]
    KeyEncoding(#[source] ed25519_dalek::pkcs8::Error),
    #[error("cannot make the node's self-signed TLS certificate: {0}")]
    Certificate(#[source] rcgen::Error),
    #[error("cannot configure TLS with the node's certificate: {0}")]
    Tls(#[source] rustls::Error),
    #[error("cannot run QUIC over the node's TLS configuration: {0}")]
    Quic(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("cannot bind QUIC endpoint on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Flow-control windows sized for 1 MiB chunks on home links: quinn's 1.25 MB default stream window would
/// cap one stream at ~12 MB/s at 100 ms RTT.
fn transport_config(idle_timeout: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(4 << 20))
        .receive_window(quinn::VarInt::from_u32(32 << 20))
        .send_window(32 << 20)
        .max_idle_timeout(Some(idle_timeout.try_into().expect("idle timeout fits a VarInt")))
        .keep_alive_interval(Some(idle_timeout / 3))
        .max_concurrent_uni_streams(0u8.into());
    Arc::new(t)
}

/// Server configuration for a node: certificate from its identity key, ALPN `fog/1`, at most
/// `max_streams_per_connection` concurrent requests per client.
pub fn server_config(key: &SigningKey, max_streams_per_connection: u32) -> Result<quinn::ServerConfig, TransportError> {
    let pkcs8 = key.to_pkcs8_der().map_err(TransportError::KeyEncoding)?;
    let key_pair = rcgen::KeyPair::try_from(pkcs8.as_bytes()).map_err(TransportError::Certificate)?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(TransportError::Certificate)?;
    let cert = params.self_signed(&key_pair).map_err(TransportError::Certificate)?;
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()));
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TransportError::Tls)?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], private)
        .map_err(TransportError::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec(), fog_proto::rendezvous::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(TransportError::Quic)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 10))
        .send_window(32 << 20)
        .max_concurrent_bidi_streams(max_streams_per_connection.into())
        .max_concurrent_uni_streams(0u8.into())
        .max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("fits")));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// Client configuration that accepts only a server proving possession of `node`'s key.
pub fn client_config(node: NodeId, idle_timeout: Duration) -> quinn::ClientConfig {
    client_config_for(node, idle_timeout, ALPN)
}

/// [`client_config`] for another protocol on the node's endpoint (`alpn`).
pub fn client_config_for(node: NodeId, idle_timeout: Duration, alpn: &[u8]) -> quinn::ClientConfig {
    let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous() // Not unverified: PinnedKey checks the handshake signature against the pinned key.
        .with_custom_certificate_verifier(Arc::new(PinnedKey(node)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("TLS 1.3 with an initial suite");
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport_config(idle_timeout));
    cfg
}

/// Why no QUIC connection to a node was made. Another candidate (or a later attempt) may succeed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Start { addr: SocketAddr, source: quinn::ConnectError },
    #[error("no handshake with {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("handshake with {addr}: {source}")]
    Handshake { addr: SocketAddr, source: quinn::ConnectionError },
    /// The node is behind NAT and its rendezvous could not open a path to it.
    #[error("{0}")]
    Punch(#[source] Box<crate::rendezvous::PunchError>),
    /// The contact names no address this endpoint can dial.
    #[error("no address of node {node} to dial")]
    NoAddress { node: NodeId },
}

/// Dials `node` at `addr` from `endpoint`, accepting only a server that holds `node`'s key; gives up after
/// `timeout`.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    node: NodeId,
    addr: SocketAddr,
    idle_timeout: Duration,
    timeout: Duration,
) -> Result<quinn::Connection, ConnectError> {
    connect_with(endpoint, client_config(node, idle_timeout), addr, timeout).await
}

/// Dials the node in `contact`: at its direct addresses, raced Happy Eyeballs style (see [`race`]), and,
/// if there are none or none answers, through its rendezvous, which makes a node behind NAT open its NAT
/// towards this endpoint first (see `fog_proto::rendezvous`). The player proxy, the C ABI, `fog get` and the
/// tracker's probes all dial nodes through here.
pub async fn connect_contact(
    endpoint: &quinn::Endpoint,
    contact: &NodeContact,
    idle_timeout: Duration,
    timeout: Duration,
) -> Result<quinn::Connection, ConnectError> {
    let node = contact.id;
    let addrs = eyeballs_order(contact.direct_addrs().collect(), FAMILY_MEMORY.worked(&node));
    let direct = if addrs.is_empty() {
        Err(ConnectError::NoAddress { node })
    } else {
        let dial = |addr| connect(endpoint, node, addr, idle_timeout, timeout);
        race(&addrs, ATTEMPT_DELAY, dial).await.map(|(addr, conn)| {
            FAMILY_MEMORY.remember(node, addr);
            conn
        })
    };
    match (&contact.via, direct) {
        (_, Ok(conn)) => Ok(conn),
        (None, Err(e)) => Err(e),
        (Some(via), Err(_)) => {
            let addr = crate::rendezvous::punch(endpoint, via, node, timeout)
                .await
                .map_err(|e| ConnectError::Punch(Box::new(e)))?;
            connect(endpoint, node, addr, idle_timeout, timeout).await
        }
    }
}

/// How long a Happy Eyeballs attempt has before the next address is tried alongside it (RFC 8305
/// recommends 250 ms, at least 100 ms; the first handshake is one round trip).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(150);

/// Dials `addrs` in order, starting the next one `delay` after the previous one (or at once when it
/// fails), until one succeeds; the first success wins and the attempts still running are dropped (which
/// abandons their handshakes). Gives the address that won, or the last error. `addrs` must not be empty.
pub async fn race<T, E, F, Fut>(addrs: &[SocketAddr], delay: Duration, mut dial: F) -> Result<(SocketAddr, T), E>
where
    F: FnMut(SocketAddr) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    assert!(!addrs.is_empty(), "race needs an address");
    let mut start = |addr: SocketAddr| {
        let attempt = dial(addr);
        Box::pin(async move { (addr, attempt.await) })
    };
    let mut running = vec![start(addrs[0])];
    let mut next = 1;
    let mut last_error = None;
    loop {
        let delay = (next < addrs.len()).then_some(delay);
        match ready_or_timer(&mut running, delay).await {
            Some((addr, Ok(t))) => return Ok((addr, t)),
            Some((_, Err(e))) => last_error = Some(e),
            None => {}
        }
        // The delay passed, or an attempt failed: the next address goes now.
        if next < addrs.len() {
            running.push(start(addrs[next]));
            next += 1;
        } else if running.is_empty() {
            return Err(last_error.expect("every attempt failed"));
        }
    }
}

/// The first of `running` to finish (removed from it), or `None` once `timer` passed first.
async fn ready_or_timer<F: Future + Unpin>(running: &mut Vec<F>, timer: Option<Duration>) -> Option<F::Output> {
    let sleep = async {
        match timer {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let first = std::future::poll_fn(|cx| {
        for i in 0..running.len() {
            if let std::task::Poll::Ready(out) = std::pin::Pin::new(&mut running[i]).poll(cx) {
                running.swap_remove(i);
                return std::task::Poll::Ready(out);
            }
        }
        std::task::Poll::Pending
    });
    tokio::select! {
        out = first => Some(out),
        () = sleep => None,
    }
}

/// `addrs` in the order to try them: the family that last worked for this node first, else IPv6 (no NAT,
/// the path that needs no rendezvous), alternating families after the first (RFC 8305, section 4).
pub fn eyeballs_order(addrs: Vec<SocketAddr>, worked: Option<Families>) -> Vec<SocketAddr> {
    let first_v6 = worked.is_none_or(|f| f.ipv6);
    let (mut first, mut second): (Vec<SocketAddr>, Vec<SocketAddr>) =
        addrs.into_iter().partition(|a| a.ip().to_canonical().is_ipv6() == first_v6);
    if first.is_empty() {
        std::mem::swap(&mut first, &mut second);
    }
    let mut out = Vec::with_capacity(first.len() + second.len());
    let (mut a, mut b) = (first.into_iter(), second.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

/// Nodes whose family is remembered; past that, the memory starts over (it is only a preference).
const FAMILIES_REMEMBERED: usize = 4096;

/// Which family last completed a handshake with each node, for the whole process: every dialler of it
/// (the proxy's sessions, C ABI sessions, `fog get`) starts with what worked.
static FAMILY_MEMORY: FamilyMemory = FamilyMemory(Mutex::new(None));

struct FamilyMemory(Mutex<Option<HashMap<NodeId, Families>>>);

impl FamilyMemory {
    fn worked(&self, node: &NodeId) -> Option<Families> {
        self.0.lock().expect("family memory lock").as_ref()?.get(node).copied()
    }

    fn remember(&self, node: NodeId, addr: SocketAddr) {
        let mut memory = self.0.lock().expect("family memory lock");
        let map = memory.get_or_insert_with(HashMap::new);
        if map.len() >= FAMILIES_REMEMBERED && !map.contains_key(&node) {
            map.clear();
        }
        map.insert(node, Families::of(addr.ip()));
    }
}

/// Completes a handshake with `cfg` (which pins the node key) within `timeout`.
pub async fn connect_with(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<quinn::Connection, ConnectError> {
    let connecting =
        endpoint.connect_with(cfg, addr, SERVER_NAME).map_err(|source| ConnectError::Start { addr, source })?;
    tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| ConnectError::Timeout { addr, timeout })?
        .map_err(|source| ConnectError::Handshake { addr, source })
}

/// A client endpoint on an ephemeral UDP port. Bound to `[::]`, it is dual-stack (Linux's default,
/// `net.ipv6.bindv6only = 0`): it dials IPv4 and IPv6 nodes alike, IPv4 ones as v4-mapped addresses. On a
/// host without IPv6, `[::]` falls back to `0.0.0.0`.
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
    match endpoint(bind, None) {
        Err(_) if bind == any_family() => client_endpoint((std::net::Ipv4Addr::UNSPECIFIED, 0).into()),
        bound => bound.map_err(|source| TransportError::Bind { addr: bind, source }),
    }
}

/// Receive buffer asked for on QUIC sockets. The kernel's default (~208 KiB) overflows when several nodes
/// send to one client at once (measured: 700–1100 datagrams dropped per 256 MiB fetch from 3 nodes, each
/// a retransmission and a slower sender); the kernel caps it at `net.core.rmem_max`.
const RECV_BUFFER: usize = 8 << 20;

/// A QUIC endpoint on a UDP socket bound to `addr` with a large receive buffer; a server too if
/// `server` is given.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), RECV_BUFFER) {
        tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, Arc::new(quinn::TokioRuntime))
}

/// Where `conn`'s peer is, as anyone can dial it: an IPv4 peer of a dual-stack socket is given as IPv4,
/// not as the v4-mapped IPv6 address the socket sees.
pub fn remote_addr(conn: &quinn::Connection) -> SocketAddr {
    let addr = conn.remote_address();
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// `[::]:0`: where a client endpoint that reaches nodes of either address family binds.
pub fn any_family() -> SocketAddr {
    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
}

/// Client endpoints of each IP family, for dials whose family must not depend on the host's dual-stack
/// setting (`net.ipv6.bindv6only`): the tracker verifies each address a node advertises from an endpoint
/// of that address's family.
#[derive(Debug, Clone, Default)]
pub struct FamilyEndpoints {
    ipv4: Option<quinn::Endpoint>,
    ipv6: Option<quinn::Endpoint>,
}

impl FamilyEndpoints {
    /// One endpoint per family the host can bind (an IPv6-less host has none for IPv6).
    pub fn open() -> Self {
        let open = |bind: SocketAddr| {
            endpoint(bind, None)
                .inspect_err(|e| tracing::warn!(%bind, error = %e, "cannot open a QUIC endpoint for this family"))
                .ok()
        };
        Self { ipv4: open((Ipv4Addr::UNSPECIFIED, 0).into()), ipv6: open(any_family()) }
    }

    /// The endpoint that dials `addr`, if the host has its family.
    pub fn for_addr(&self, addr: &SocketAddr) -> Option<&quinn::Endpoint> {
        match addr.ip().to_canonical() {
            IpAddr::V4(_) => self.ipv4.as_ref(),
            IpAddr::V6(_) => self.ipv6.as_ref(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ipv4.is_none() && self.ipv6.is_none()
    }
}

/// Destinations whose routes tell whether the host has a family: documentation addresses (RFC 5737, RFC
/// 3849), looked up in the routing table only; nothing is sent to them.
const ROUTE_PROBE_V4: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 9);
const ROUTE_PROBE_V6: SocketAddr = SocketAddr::new(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)), 9);

/// The address this host would send from to the Internet in `probe`'s family, if it has a route there.
fn source_towards(probe: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if probe.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { any_family() };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(probe).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// The IP families this host can reach the Internet in (a route exists), which clients tell the tracker
/// so that it hands out addresses they can dial.
pub fn local_families() -> Families {
    Families { ipv4: source_towards(ROUTE_PROBE_V4).is_some(), ipv6: source_towards(ROUTE_PROBE_V6).is_some() }
}

/// This host's public addresses as it would send from them (at most one a family): a global IPv6
/// address, and an IPv4 one that is not private (no NAT in front of it). A node listening on an
/// unspecified address advertises them, for the tracker to verify.
pub fn global_addrs() -> Vec<IpAddr> {
    [ROUTE_PROBE_V6, ROUTE_PROBE_V4].into_iter().filter_map(source_towards).filter(|ip| is_global(*ip)).collect()
}

/// Whether `ip` may be reachable from the Internet: not loopback, link-local, private, shared (CGNAT),
/// unique-local, documentation or unspecified.
pub fn is_global(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let shared = v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64;
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_documentation()
                || v4.is_broadcast()
                || shared)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            let link_local = first & 0xffc0 == 0xfe80;
            let unique_local = first & 0xfe00 == 0xfc00;
            let documentation = first == 0x2001 && v6.segments()[1] == 0xdb8;
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || link_local
                || unique_local
                || documentation)
        }
    }
}

/// Verifies that the server holds the pinned ed25519 key, like a TLS raw public key (RFC 7250): the
/// CertificateVerify signature over the handshake transcript must verify under the pinned key.
#[derive(Debug)]
struct PinnedKey(NodeId);

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The certificate proves nothing by itself; the transcript signature below does.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        _cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let bad = || rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(bad());
        }
        let key = self.0.verifying_key().map_err(|_| bad())?;
        let sig = Signature::from_slice(dss.signature()).map_err(|_| bad())?;
        key.verify(message, &sig).map_err(|_| bad())?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(port: u16) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, port).into()
    }

    fn v6(port: u16) -> SocketAddr {
        (Ipv6Addr::LOCALHOST, port).into()
    }

    #[test]
    fn eyeballs_try_ipv6_first_then_alternate_unless_ipv4_worked() {
        assert_eq!(eyeballs_order(vec![v4(1), v4(2), v6(3), v6(4)], None), vec![v6(3), v4(1), v6(4), v4(2)]);
        let worked_v4 = Some(Families { ipv4: true, ipv6: false });
        assert_eq!(eyeballs_order(vec![v6(3), v4(1)], worked_v4), vec![v4(1), v6(3)]);
        assert_eq!(eyeballs_order(vec![v4(1)], None), vec![v4(1)], "one family only");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5".parse().expect("addr");
        assert_eq!(eyeballs_order(vec![mapped, v6(3)], None), vec![v6(3), mapped], "v4-mapped counts as IPv4");
    }

    /// One attempt of a test race: how long it takes and whether it succeeds (`None`: it never finishes).
    type Plan = HashMap<SocketAddr, (Duration, Option<bool>)>;

    /// Runs a race over `addrs` with dials that follow `plan`; gives its outcome and the dial order.
    async fn run(
        addrs: &[SocketAddr],
        delay: Duration,
        plan: Plan,
    ) -> (Result<SocketAddr, SocketAddr>, Vec<SocketAddr>) {
        let started = Arc::new(Mutex::new(Vec::new()));
        let log = started.clone();
        let dial = |addr: SocketAddr| {
            log.lock().expect("log").push(addr);
            let (after, outcome) = plan[&addr];
            async move {
                tokio::time::sleep(after).await;
                match outcome {
                    Some(true) => Ok(()),
                    Some(false) => Err(addr),
                    None => std::future::pending().await,
                }
            }
        };
        // A bound on a test that would otherwise hang, not a timing assertion.
        let outcome = tokio::time::timeout(Duration::from_secs(60), race(addrs, delay, dial)).await.expect("race ends");
        let order = started.lock().expect("log").clone();
        (outcome.map(|(addr, ())| addr), order)
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn a_quick_first_family_wins_without_dialling_the_other() {
        let plan = Plan::from([(v6(1), (Duration::ZERO, Some(true))), (v4(2), (Duration::ZERO, Some(true)))]);
        assert_eq!(run(&[v6(1), v4(2)], LONG, plan).await, (Ok(v6(1)), vec![v6(1)]));
    }

    #[tokio::test]
    async fn a_failed_attempt_starts_the_next_at_once() {
        // The attempt delay is an hour: only the failure can have started the IPv4 dial.
        let plan = Plan::from([(v6(1), (Duration::ZERO, Some(false))), (v4(2), (Duration::ZERO, Some(true)))]);
        assert_eq!(run(&[v6(1), v4(2)], LONG, plan).await, (Ok(v4(2)), vec![v6(1), v4(2)]));
    }

    #[tokio::test]
    async fn a_silent_family_loses_to_the_other_after_the_delay() {
        // IPv6 packets vanish (a firewall): IPv4 starts after the delay and wins.
        let plan = Plan::from([(v6(1), (Duration::ZERO, None)), (v4(2), (Duration::from_millis(5), Some(true)))]);
        assert_eq!(run(&[v6(1), v4(2)], Duration::from_millis(10), plan).await, (Ok(v4(2)), vec![v6(1), v4(2)]));
        // A slow IPv6 handshake that finishes first still wins over a later, slower IPv4 one.
        let plan = Plan::from([(v6(1), (Duration::from_millis(20), Some(true))), (v4(2), (LONG, Some(true)))]);
        assert_eq!(run(&[v6(1), v4(2)], Duration::from_millis(1), plan).await, (Ok(v6(1)), vec![v6(1), v4(2)]));
    }

    #[tokio::test]
    async fn when_every_address_fails_the_last_error_is_given() {
        let plan =
            Plan::from([(v6(1), (Duration::ZERO, Some(false))), (v4(2), (Duration::from_millis(1), Some(false)))]);
        assert_eq!(run(&[v6(1), v4(2)], LONG, plan).await, (Err(v4(2)), vec![v6(1), v4(2)]));
    }

    #[test]
    fn global_addresses_are_told_from_local_ones() {
        for ip in ["2a00:1450:4001:80b::200e", "8.8.8.8", "::ffff:8.8.8.8"] {
            assert!(is_global(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["::1", "fe80::1", "fd00::1", "2001:db8::1", "10.1.2.3", "192.168.1.1", "100.64.0.1", "127.0.0.1"] {
            assert!(!is_global(ip.parse().expect("ip")), "{ip}");
        }
    }
}
