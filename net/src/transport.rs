//! QUIC and TLS set-up shared by nodes (server side) and clients.
//!
//! There is no certificate authority. A node's TLS certificate is self-signed with its ed25519 identity key,
//! and a client pins the node id the tracker gave it: the handshake succeeds only if the server signs the
//! TLS 1.3 transcript with exactly that key. The certificate's contents are never trusted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{Signature, SigningKey, Verifier};
use fog_proto::api::NodeContact;
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

/// Dials the node in `contact`: directly, or, for a node behind NAT, through its rendezvous, which makes
/// the node open its NAT towards this endpoint first (see `fog_proto::rendezvous`).
pub async fn connect_contact(
    endpoint: &quinn::Endpoint,
    contact: &NodeContact,
    idle_timeout: Duration,
    timeout: Duration,
) -> Result<quinn::Connection, ConnectError> {
    let addr = match &contact.via {
        None => contact.addr,
        Some(via) => crate::rendezvous::punch(endpoint, via, contact.id, timeout)
            .await
            .map_err(|e| ConnectError::Punch(Box::new(e)))?,
    };
    connect(endpoint, contact.id, addr, idle_timeout, timeout).await
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
