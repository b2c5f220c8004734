//! A WebTransport session to a node as a browser page opens one (issue #14): HTTP/3 over QUIC, the node's
//! certificate pinned by the hashes it advertised (`serverCertificateHashes`), the page's site in `Origin`.
//! The tracker probes nodes' browser endpoints this way before it hands them to pages.

use std::time::Duration;

use fog_proto::api::{CertHash, WebContact};
use rustls::pki_types::CertificateDer;
use web_transport_quinn::http::{header, HeaderValue};
use web_transport_quinn::proto::ConnectRequest;
use web_transport_quinn::{ClientBuilder, Session};

/// Why no session was opened. The node (or the path to it) may do better later.
#[derive(Debug, thiserror::Error)]
pub enum WebSessionError {
    #[error("{what} is not usable in a WebTransport request: {detail}")]
    Request { what: &'static str, detail: String },
    #[error("cannot start a WebTransport client: {0}")]
    Client(String),
    #[error("no WebTransport session within {0:?}")]
    Timeout(Duration),
    #[error("WebTransport session refused or failed: {0}")]
    Session(#[source] web_transport_quinn::ClientError),
    #[error("the node showed no certificate")]
    NoCertificate,
}

/// Opens a session at `web` as a page of `page_origin` would, within `timeout`; with the hash of the
/// certificate the node served (one of `web.cert_hashes`, or the handshake would have failed).
pub async fn open_as_page(
    web: &WebContact,
    page_origin: &str,
    timeout: Duration,
) -> Result<(Session, CertHash), WebSessionError> {
    let url = url::Url::parse(&web.url)
        .map_err(|e| WebSessionError::Request { what: "the node's URL", detail: e.to_string() })?;
    let origin = HeaderValue::from_str(page_origin)
        .map_err(|e| WebSessionError::Request { what: "the page's origin", detail: e.to_string() })?;
    let pinned = web.cert_hashes.iter().map(|h| h.0.to_vec()).collect();
    let client = ClientBuilder::new()
        .with_server_certificate_hashes(pinned)
        .map_err(|e| WebSessionError::Client(e.to_string()))?;
    let request = ConnectRequest::new(url).with_header(header::ORIGIN, origin);
    let session = tokio::time::timeout(timeout, client.connect(request))
        .await
        .map_err(|_| WebSessionError::Timeout(timeout))?
        .map_err(WebSessionError::Session)?;
    let served = session
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| certs.first().map(|c| CertHash(crate::transport::sha256(c))))
        .ok_or(WebSessionError::NoCertificate)?;
    Ok((session, served))
}
