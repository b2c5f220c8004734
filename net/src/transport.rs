//! QUIC and TLS set-up shared by nodes (server side) and clients.
//!
//! There is no certificate authority. A node's TLS certificate is self-signed with its ed25519 identity key,
//! and a client pins the node id the tracker gave it: the handshake succeeds only if the server signs the
//! TLS 1.3 transcript with exactly that key. The certificate's contents are never trusted.
//!
//! Browsers cannot pin an ed25519 key: a node's endpoint also offers HTTP/3 (`h3`) for WebTransport, and a
//! connection that negotiates it is shown a short-lived ECDSA P-256 certificate instead ([`WebCert`]), whose
//! SHA-256 the browser pins (see `docs/protocol.md`, "WebTransport").

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{Signature, SigningKey, Verifier};
use fog_proto::api::{Families, NodeContact};
use fog_proto::wire::ALPN;
use fog_proto::NodeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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

/// How a node's uploads share the uplink with its host's own traffic (`--upload-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UploadPriority {
    /// quinn's default controller (CUBIC): an equal share with every other flow, and a full uplink buffer.
    Normal,
    /// Lower than best effort ([`crate::ledbat`]): yields to the host's own uploads within a few round trips
    /// and adds at most about [`crate::ledbat::TARGET_DELAY`] of queueing.
    #[default]
    Low,
}

impl std::str::FromStr for UploadPriority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "normal" => Ok(Self::Normal),
            "low" => Ok(Self::Low),
            other => Err(format!("{other:?} is not an upload priority: low or normal")),
        }
    }
}

impl<'de> serde::Deserialize<'de> for UploadPriority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Server configuration for a node: certificate from its identity key, ALPN `fog/1` (and rendezvous), at
/// most `max_streams_per_connection` concurrent requests per client, quinn's default congestion control.
pub fn server_config(key: &SigningKey, max_streams_per_connection: u32) -> Result<quinn::ServerConfig, TransportError> {
    Ok(node_server_config(key, max_streams_per_connection, None, UploadPriority::Normal)?.config)
}

/// [`server_config`] that also offers `h3` to browsers, showing them the certificate in `web` (which the
/// node's rotation replaces).
pub fn server_config_with_web(
    key: &SigningKey,
    max_streams_per_connection: u32,
    web: Arc<WebCertSlot>,
) -> Result<quinn::ServerConfig, TransportError> {
    Ok(node_server_config(key, max_streams_per_connection, Some(web), UploadPriority::Normal)?.config)
}

/// A node's server configuration ([`node_server_config`]), and how it accepts each connection.
#[derive(Debug, Clone)]
pub struct NodeServerConfig {
    /// What the node's endpoint is built with.
    pub config: quinn::ServerConfig,
    max_streams_per_connection: u32,
    web: bool,
    upload: UploadPriority,
}

impl NodeServerConfig {
    /// Accepts `incoming`. At `low` upload priority the connection gets a transport of its own, whose
    /// LEDBAT++ controller starts from the base delay remembered for the client's address
    /// ([`crate::ledbat::PathMemory`]): quinn does not tell the endpoint's one factory whom a connection is with.
    pub fn accept(&self, incoming: quinn::Incoming) -> Result<quinn::Connecting, quinn::ConnectionError> {
        if self.upload != UploadPriority::Low {
            return incoming.accept();
        }
        let ledbat = crate::ledbat::LedbatFactory::for_remote(incoming.remote_address().ip());
        let mut config = self.config.clone();
        config.transport_config(Arc::new(node_transport(self.max_streams_per_connection, self.web, Some(ledbat))));
        incoming.accept_with(Arc::new(config))
    }
}

/// The node's server configuration: [`server_config`], offering `h3` to browsers if `web` is given, and
/// sending to every client (native or browser) and to peers filling misses at `upload` priority.
pub fn node_server_config(
    key: &SigningKey,
    max_streams_per_connection: u32,
    web: Option<Arc<WebCertSlot>>,
    upload: UploadPriority,
) -> Result<NodeServerConfig, TransportError> {
    let pkcs8 = key.to_pkcs8_der().map_err(TransportError::KeyEncoding)?;
    let key_pair = rcgen::KeyPair::try_from(pkcs8.as_bytes()).map_err(TransportError::Certificate)?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(TransportError::Certificate)?;
    let cert = params.self_signed(&key_pair).map_err(TransportError::Certificate)?;
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()));
    let identity =
        CertifiedKey::from_der(vec![cert.der().clone()], private, &crypto_provider()).map_err(TransportError::Tls)?;
    // Peers' fill requests (`fog-peer/1`) come here too, so the answers go under `upload` as well.
    let alpn_protocols: Vec<Vec<u8>> = [ALPN, fog_proto::rendezvous::ALPN, fog_proto::wire::PEER_ALPN]
        .into_iter()
        .chain(web.is_some().then_some(H3_ALPN))
        .map(<[u8]>::to_vec)
        .collect();
    let resolver = CertByAlpn { identity: Arc::new(identity), web, protocols: alpn_protocols.clone() };
    let web_enabled = resolver.web.is_some();
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TransportError::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = alpn_protocols;
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(TransportError::Quic)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let ledbat = (upload == UploadPriority::Low).then(crate::ledbat::LedbatFactory::default);
    config.transport_config(Arc::new(node_transport(max_streams_per_connection, web_enabled, ledbat)));
    Ok(NodeServerConfig { config, max_streams_per_connection, web: web_enabled, upload })
}

/// The transport of a node's connections: `max_streams_per_connection` requests at a time, browsers' HTTP/3
/// streams if `web`, and uploads under `ledbat` (LEDBAT++) if given, quinn's CUBIC otherwise.
fn node_transport(
    max_streams_per_connection: u32,
    web: bool,
    ledbat: Option<crate::ledbat::LedbatFactory>,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // HTTP/3 needs the browser's control stream and its two QPACK streams (a browser hangs without them);
    // native clients open none. Unread, they can hold at most 3 stream windows per connection.
    let uni_streams: u8 = if web { 3 } else { 0 };
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 10))
        .send_window(32 << 20)
        .max_concurrent_bidi_streams(max_streams_per_connection.into())
        .max_concurrent_uni_streams(uni_streams.into())
        // Datagrams are never read (fog/1 and its WebTransport form use streams only), but HTTP/3 peers
        // expect the transport parameter: a small buffer keeps what a peer can park here bounded.
        .datagram_receive_buffer_size(Some(16 << 10))
        .max_idle_timeout(Some(Duration::from_secs(30).try_into().expect("fits")));
    if let Some(ledbat) = ledbat {
        t.congestion_controller_factory(Arc::new(ledbat));
    }
    t
}

/// The ALPN protocol of HTTP/3, which browsers' WebTransport sessions negotiate.
pub const H3_ALPN: &[u8] = b"h3";

/// Picks the certificate by the protocol the handshake will settle on: the web certificate for `h3`, the
/// identity certificate (which native clients pin by its key) otherwise.
#[derive(Debug)]
struct CertByAlpn {
    identity: Arc<CertifiedKey>,
    web: Option<Arc<WebCertSlot>>,
    /// The server's protocols in its order of preference, as rustls chooses among them.
    protocols: Vec<Vec<u8>>,
}

impl ResolvesServerCert for CertByAlpn {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered: Vec<&[u8]> = hello.alpn().map(Iterator::collect).unwrap_or_default();
        // rustls takes the first of the server's protocols that the client offers.
        let chosen = self.protocols.iter().find(|p| offered.contains(&p.as_slice()));
        match &self.web {
            Some(web) if chosen.is_some_and(|p| p == H3_ALPN) => Some(web.current()),
            _ => Some(self.identity.clone()),
        }
    }
}

/// How long a web certificate is valid, `not_before` to `not_after`: browsers refuse a pinned certificate
/// valid for more than 14 days; one day less leaves room for their rounding and clocks.
pub const WEB_CERT_VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);

/// How long before it is made a web certificate becomes valid, so that a browser whose clock is a little
/// behind accepts it too (counted within [`WEB_CERT_VALIDITY`]).
pub const WEB_CERT_BACKDATE: Duration = Duration::from_secs(3600);

/// A certificate a browser can pin by hash (W3C WebTransport `serverCertificateHashes`): X.509v3 with a
/// subject alternative name (Chromium refuses a certificate without extensions), an ECDSA P-256 key (RSA
/// and ed25519 are refused), valid for [`WEB_CERT_VALIDITY`]. Its key is never written anywhere: a restarted
/// node makes a new one and announces its hash.
#[derive(Debug, Clone)]
pub struct WebCert {
    certified: Arc<CertifiedKey>,
    sha256: [u8; 32],
    made_at: SystemTime,
}

impl WebCert {
    /// A new key and certificate, valid from [`WEB_CERT_BACKDATE`] before `made_at`.
    pub fn new(made_at: SystemTime) -> Result<Self, TransportError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(TransportError::Certificate)?;
        let mut params =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(TransportError::Certificate)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, SERVER_NAME);
        // Whole seconds, as the certificate encodes them; a closure, so the date crate rcgen uses need not
        // be named.
        let x509_time = |t: SystemTime| {
            let since_epoch = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(since_epoch.as_secs())
        };
        let not_before = made_at.checked_sub(WEB_CERT_BACKDATE).unwrap_or(SystemTime::UNIX_EPOCH);
        params.not_before = x509_time(not_before);
        params.not_after = x509_time(not_before + WEB_CERT_VALIDITY);
        let cert = params.self_signed(&key).map_err(TransportError::Certificate)?;
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(vec![cert.der().clone()], private, &crypto_provider())
            .map_err(TransportError::Tls)?;
        Ok(Self { sha256: sha256(cert.der()), certified: Arc::new(certified), made_at })
    }

    /// SHA-256 of the DER certificate: what browsers are given to pin.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    pub fn der(&self) -> &CertificateDer<'static> {
        &self.certified.cert[0]
    }

    pub fn made_at(&self) -> SystemTime {
        self.made_at
    }

    /// When browsers stop accepting it.
    pub fn not_after(&self) -> SystemTime {
        self.made_at.checked_sub(WEB_CERT_BACKDATE).unwrap_or(SystemTime::UNIX_EPOCH) + WEB_CERT_VALIDITY
    }
}

/// SHA-256 with ring through rustls, which this crate links already.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13().expect("a TLS 1.3 suite");
    suite.common.hash_provider.hash(bytes).as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The web certificate the endpoint shows browsers now. The node's rotation replaces it; connections
/// already made keep theirs (the certificate only matters during a handshake).
#[derive(Debug)]
pub struct WebCertSlot(RwLock<Arc<CertifiedKey>>);

impl WebCertSlot {
    pub fn new(cert: &WebCert) -> Self {
        Self(RwLock::new(cert.certified.clone()))
    }

    /// Shows `cert` to browsers from the next handshake on.
    pub fn set(&self, cert: &WebCert) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = cert.certified.clone();
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
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
    fn web_certificates_are_what_browsers_pin() {
        use x509_parser::prelude::*;
        let made_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let cert = WebCert::new(made_at).expect("certificate");
        let (rest, x509) = X509Certificate::from_der(cert.der()).expect("DER certificate");
        assert!(rest.is_empty());
        assert_eq!(x509.version(), X509Version::V3);
        // ECDSA P-256: id-ecPublicKey on prime256v1, signed with ecdsa-with-SHA256.
        let spki = x509.public_key();
        assert_eq!(spki.algorithm.algorithm, x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).expect("named curve");
        assert_eq!(curve, x509_parser::oid_registry::OID_EC_P256);
        assert_eq!(x509.signature_algorithm.algorithm, x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256);
        // Browsers refuse more than 14 days; valid from a little before it was made.
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).expect("after 1970").as_secs() as i64;
        let validity = x509.validity();
        assert_eq!(validity.not_before.timestamp(), secs(made_at - WEB_CERT_BACKDATE));
        assert_eq!(validity.not_after.timestamp(), secs(cert.not_after()));
        let valid_for = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert!(valid_for > 0 && valid_for <= 13 * 24 * 3600, "{valid_for} s");
        // Chromium wants extensions: the subject alternative name is one.
        let san = x509.subject_alternative_name().expect("one SAN extension").expect("a SAN");
        assert_eq!(san.value.general_names, [GeneralName::DNSName(SERVER_NAME)]);
        // The hash browsers pin is SHA-256 of the DER certificate (checked against the FIPS 180-2 vector).
        let abc: String = sha256(b"abc").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(abc, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(cert.sha256(), sha256(cert.der()));
        assert_ne!(WebCert::new(made_at).expect("another").sha256(), cert.sha256(), "a new key each time");
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
