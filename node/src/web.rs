//! Browsers over WebTransport (`docs/protocol.md`, "WebTransport").
//!
//! A connection that negotiated `h3` on the node's QUIC endpoint is a browser's: after the HTTP/3 handshake
//! its CONNECT request must come from a web origin the operator registered (the `Origin` header; a page on
//! any other site is refused with 403) and name [`WEB_TRANSPORT_PATH`]. Inside the session each
//! bidirectional stream carries one `fog/1` request, served by [`Server::serve_requests`] exactly as on a
//! native connection: same verification, limits, upload cap, receipts.
//!
//! Browsers pin the SHA-256 of a certificate valid for at most 14 days, so the node rotates it
//! ([`RotationTiming`], every 6 days by default): the next certificate is made a day before the switch and
//! announced in heartbeats (with the current one) until the endpoint switches to it. Pages that learned both hashes connect on
//! either side of the switch; sessions already open are unaffected (a certificate only matters in a
//! handshake). Keys live in memory only: a restarted node makes a new certificate and announces it, which
//! the tracker's probe checks before it hands the hash to browsers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fog_net::transport::{TransportError, WebCert, WebCertSlot, WEB_CERT_BACKDATE};
use fog_proto::api::{CertHash, WebTransportEndpoint, WEB_TRANSPORT_PATH};
use fog_proto::web::WebOrigins;
use web_transport_quinn::http::{header, StatusCode};

use crate::serve::{RequestStreams, ResponseStream, Server};

/// `--web-cert-rotation-secs` default: the served certificate is at most 6 days old, with 7 days of its
/// 13 of validity left, so browsers with a clock days off still accept it.
pub const DEFAULT_ROTATION: Duration = Duration::from_secs(6 * 24 * 3600);
/// Bounds of `--web-cert-rotation-secs`: above, a certificate would be served with less than a day of
/// validity left; below, the announcement could not reach the tracker and pages (heartbeats, resolves).
pub const ROTATION_RANGE: std::ops::RangeInclusive<Duration> = Duration::from_secs(20)..=DEFAULT_ROTATION;
/// Longest announcement of the next certificate before the endpoint serves it: heartbeats carry it to the
/// tracker within minutes, and a day lets pages that resolved before that re-resolve.
const MAX_ANNOUNCED_FOR: Duration = Duration::from_secs(24 * 3600);
/// When the node makes the next certificate and when it serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationTiming {
    /// Age of the served certificate at which the next one is made (and announced).
    next_after: Duration,
    /// How long the next one is announced before the endpoint serves it.
    announced_for: Duration,
}

impl RotationTiming {
    /// The served certificate is replaced every `period` (within [`ROTATION_RANGE`], checked by the
    /// config); its successor is announced for half of that, at most a day.
    pub fn every(period: Duration) -> Self {
        let announced_for = (period / 2).min(MAX_ANNOUNCED_FOR);
        Self { next_after: period - announced_for, announced_for }
    }
}

impl Default for RotationTiming {
    fn default() -> Self {
        Self::every(DEFAULT_ROTATION)
    }
}

/// A served certificate with less validity left than this is replaced at once (the clock jumped).
const MIN_VALIDITY_LEFT: Duration = Duration::from_secs(24 * 3600);
/// Longest sleep between rotation checks, so that a wall-clock jump is noticed within it.
const CHECK_AT_LEAST_EVERY: Duration = Duration::from_secs(3600);

/// How long a browser has for the HTTP/3 handshake and its CONNECT request.
const SESSION_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused browser has to read the refusal before the connection is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The node's side of browsers: its web certificates and the web origins it accepts sessions from.
#[derive(Debug)]
pub struct Web {
    certs: Mutex<Rotation>,
    slot: Arc<WebCertSlot>,
    /// `--web-origin`: accepted whatever the tracker says.
    configured: WebOrigins,
    /// The tracker's list, replaced by each of its answers.
    from_tracker: RwLock<WebOrigins>,
    pub sessions: SessionCounts,
    /// Rotation steps taken, by [`Step`] (`fog_node_web_cert_rotations_total{step}`).
    rotations: [AtomicU64; 3],
}

impl Web {
    /// Makes the first certificate. `configured`: the operator's own `--web-origin` list.
    pub fn new(configured: WebOrigins, timing: RotationTiming) -> Result<Self, TransportError> {
        let rotation = Rotation::new(SystemTime::now(), timing)?;
        let slot = Arc::new(WebCertSlot::new(&rotation.current));
        Ok(Self {
            certs: Mutex::new(rotation),
            slot,
            configured,
            from_tracker: RwLock::new(WebOrigins::default()),
            sessions: SessionCounts::default(),
            rotations: Default::default(),
        })
    }

    /// What the QUIC endpoint shows browsers (see `fog_net::transport::server_config_with_web`).
    pub fn cert_slot(&self) -> Arc<WebCertSlot> {
        self.slot.clone()
    }

    pub fn rotations_by_step(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Step::ALL.into_iter().map(|step| (step.label(), self.rotations[step as usize].load(Ordering::Relaxed)))
    }

    pub fn set_tracker_origins(&self, origins: WebOrigins) {
        *self.from_tracker.write().unwrap_or_else(std::sync::PoisonError::into_inner) = origins;
    }

    /// Whether a CONNECT whose `Origin` header is `origin` comes from a registered site. No header (not a
    /// browser page) or an empty list lets nobody in.
    fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return false };
        self.configured.allows(origin)
            || self.from_tracker.read().unwrap_or_else(std::sync::PoisonError::into_inner).allows(origin)
    }

    /// For the heartbeat: the endpoint browsers dial at `port`, with the served certificate's hash first.
    pub fn endpoint(&self, port: u16) -> WebTransportEndpoint {
        let rotation = self.certs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        WebTransportEndpoint { port, cert_hashes: rotation.hashes() }
    }

    /// Rotates the certificate for as long as the node runs.
    pub async fn rotate_forever(self: Arc<Self>) {
        loop {
            let wait = {
                let rotation = self.certs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                rotation.next_step_at().duration_since(SystemTime::now()).unwrap_or_default()
            };
            tokio::time::sleep(wait.clamp(Duration::from_secs(1), CHECK_AT_LEAST_EVERY)).await;
            self.rotate(SystemTime::now());
        }
    }

    fn rotate(&self, now: SystemTime) {
        let mut rotation = self.certs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match rotation.step(now) {
            Ok(None) => {}
            Ok(Some(step)) => {
                if step != Step::MadeNext {
                    self.slot.set(&rotation.current);
                }
                self.rotations[step as usize].fetch_add(1, Ordering::Relaxed);
                let hashes: Vec<String> = rotation.hashes().iter().map(CertHash::to_hex).collect();
                tracing::info!(?step, ?hashes, "web certificate rotation");
            }
            // Certificate making has no reason to fail; the current one still serves and the next check retries.
            Err(e) => tracing::error!(error = %e, "cannot make a web certificate"),
        }
    }
}

/// What a rotation step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Made the next certificate, announced from now on.
    MadeNext,
    /// The endpoint now serves the next certificate.
    Switched,
    /// The served certificate was no longer valid by the clock (it jumped): replaced by a new one at once.
    Replaced,
}

impl Step {
    pub const ALL: [Step; 3] = [Step::MadeNext, Step::Switched, Step::Replaced];

    pub fn label(self) -> &'static str {
        match self {
            Step::MadeNext => "made_next",
            Step::Switched => "switched",
            Step::Replaced => "replaced",
        }
    }
}

/// The served certificate and the announced next one.
#[derive(Debug)]
struct Rotation {
    current: WebCert,
    next: Option<WebCert>,
    timing: RotationTiming,
}

impl Rotation {
    fn new(now: SystemTime, timing: RotationTiming) -> Result<Self, TransportError> {
        Ok(Self { current: WebCert::new(now)?, next: None, timing })
    }

    /// Whether browsers whose clock reads `now` accept `cert` and will for a while yet.
    fn usable(cert: &WebCert, now: SystemTime) -> bool {
        let not_before = cert.made_at().checked_sub(WEB_CERT_BACKDATE).unwrap_or(SystemTime::UNIX_EPOCH);
        not_before <= now && now + MIN_VALIDITY_LEFT < cert.not_after()
    }

    fn step(&mut self, now: SystemTime) -> Result<Option<Step>, TransportError> {
        let RotationTiming { next_after, announced_for } = self.timing;
        if let Some(next) = self.next.take_if(|next| now >= next.made_at() + announced_for && Self::usable(next, now)) {
            self.current = next;
            return Ok(Some(Step::Switched));
        }
        if !Self::usable(&self.current, now) {
            *self = Self::new(now, self.timing)?;
            return Ok(Some(Step::Replaced));
        }
        if self.next.is_none() && now >= self.current.made_at() + next_after {
            self.next = Some(WebCert::new(now)?);
            return Ok(Some(Step::MadeNext));
        }
        Ok(None)
    }

    /// When [`Self::step`] has something to do, by the clock as it runs now.
    fn next_step_at(&self) -> SystemTime {
        let planned = match &self.next {
            Some(next) => next.made_at() + self.timing.announced_for,
            None => self.current.made_at() + self.timing.next_after,
        };
        planned.min(self.current.not_after() - MIN_VALIDITY_LEFT)
    }

    fn hashes(&self) -> Vec<CertHash> {
        std::iter::once(&self.current).chain(&self.next).map(|c| CertHash(c.sha256())).collect()
    }
}

/// WebTransport sessions by outcome (`fog_node_web_sessions_total{result}`).
#[derive(Debug, Default)]
pub struct SessionCounts {
    accepted: AtomicU64,
    /// The page's site is not registered (or the request had no `Origin`).
    forbidden_origin: AtomicU64,
    /// The CONNECT named another path (another protocol version).
    unknown_path: AtomicU64,
    /// The HTTP/3 handshake or the CONNECT request was broken.
    failed: AtomicU64,
    /// The browser asked for no session in time, or closed the connection first.
    no_request: AtomicU64,
}

impl SessionCounts {
    pub fn by_result(&self) -> [(&'static str, u64); 5] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("accepted", get(&self.accepted)),
            ("forbidden_origin", get(&self.forbidden_origin)),
            ("unknown_path", get(&self.unknown_path)),
            ("failed", get(&self.failed)),
            ("no_request", get(&self.no_request)),
        ]
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves a connection that negotiated `h3`: the WebTransport handshake, the origin check, then requests
/// on the session's streams until it ends. The connection holds its slot under the node's connection
/// limits throughout, as a native one does.
pub(crate) async fn serve_session(server: &Arc<Server>, conn: quinn::Connection) {
    let (web, remote) = (&server.web, conn.remote_address());
    let request =
        match tokio::time::timeout(SESSION_REQUEST_TIMEOUT, web_transport_quinn::Request::accept(conn.clone())).await {
            Ok(Ok(request)) => request,
            // Browsers open spare connections (Firefox keeps some it never asks a session on) and close
            // them when done: those are not failures.
            Ok(Err(_))
                if matches!(
                    conn.close_reason(),
                    Some(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::ConnectionClosed(_))
                ) =>
            {
                SessionCounts::count(&web.sessions.no_request);
                tracing::debug!(%remote, "a browser closed a connection without asking for a session");
                return;
            }
            Ok(Err(e)) => {
                SessionCounts::count(&web.sessions.failed);
                tracing::debug!(%remote, error = %e, "WebTransport handshake failed");
                return;
            }
            Err(_) => {
                SessionCounts::count(&web.sessions.no_request);
                tracing::debug!(%remote, "no WebTransport request within {SESSION_REQUEST_TIMEOUT:?}");
                conn.close(0u32.into(), b"no request in time");
                return;
            }
        };
    let origin = request.headers.get(header::ORIGIN).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let refusal = if !web.allows(origin.as_deref()) {
        tracing::warn!(%remote, ?origin, "refusing a WebTransport session from a web origin nobody registered");
        Some((&web.sessions.forbidden_origin, StatusCode::FORBIDDEN))
    } else if request.url.path() != WEB_TRANSPORT_PATH {
        tracing::warn!(%remote, path = request.url.path(), "refusing a WebTransport session for an unknown path");
        Some((&web.sessions.unknown_path, StatusCode::NOT_FOUND))
    } else {
        None
    };
    if let Some((counter, status)) = refusal {
        SessionCounts::count(counter);
        if request.reject(status).await.is_ok() {
            // Let the answer reach the page before the connection goes.
            let _ = tokio::time::timeout(REFUSAL_LINGER, conn.closed()).await;
        }
        conn.close(0u32.into(), b"refused");
        return;
    }
    match request.ok().await {
        Ok(session) => {
            SessionCounts::count(&web.sessions.accepted);
            tracing::debug!(%remote, ?origin, "WebTransport session open");
            server.serve_requests(session).await;
        }
        Err(e) => {
            SessionCounts::count(&web.sessions.failed);
            tracing::debug!(%remote, error = %e, "WebTransport session not established");
        }
    }
}

impl RequestStreams for web_transport_quinn::Session {
    type Send = web_transport_quinn::SendStream;
    type Recv = web_transport_quinn::RecvStream;
    type Error = web_transport_quinn::SessionError;
    fn accept(&self) -> impl std::future::Future<Output = Result<(Self::Send, Self::Recv), Self::Error>> + Send {
        self.accept_bi()
    }
    fn close(&self, reason: &[u8]) {
        web_transport_quinn::Session::close(self, 0, reason);
    }
    fn remote(&self) -> std::net::SocketAddr {
        self.remote_address()
    }
}

impl ResponseStream for web_transport_quinn::SendStream {
    async fn write_piece(&mut self, piece: bytes::Bytes) -> std::io::Result<()> {
        self.write_chunk(piece).await.map_err(std::io::Error::other)
    }
    fn finish(&mut self) {
        // Already finished or reset: the page is gone, nobody is left to tell.
        let _ = web_transport_quinn::SendStream::finish(self);
    }
    fn reset(&mut self, code: u32) {
        let _ = web_transport_quinn::SendStream::reset(self, code);
    }
    fn id(&self) -> quinn::StreamId {
        self.quic_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn start() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn the_next_certificate_is_announced_before_it_is_served_and_overlaps_the_current() {
        let t0 = start();
        let mut rotation = Rotation::new(t0, RotationTiming::default()).expect("certificate");
        let RotationTiming { next_after, announced_for } = rotation.timing;
        assert_eq!((next_after, announced_for), (5 * DAY, DAY));
        let first = rotation.current.sha256();
        assert_eq!(rotation.step(t0 + DAY).expect("step"), None, "nothing to do while the certificate is young");
        assert_eq!(rotation.next_step_at(), t0 + next_after);

        assert_eq!(rotation.step(t0 + next_after).expect("step"), Some(Step::MadeNext));
        let next = rotation.next.clone().expect("a next certificate");
        assert_eq!(rotation.hashes(), [CertHash(first), CertHash(next.sha256())], "served first, then the next");
        assert_ne!(first, next.sha256());
        // Browsers given both hashes accept either while both are valid: the validity periods overlap.
        let current = &rotation.current;
        assert!(Rotation::usable(current, t0 + next_after) && Rotation::usable(&next, t0 + next_after));
        assert!(Rotation::usable(current, t0 + next_after + announced_for), "the old one outlives the switch");

        assert_eq!(rotation.step(t0 + next_after + announced_for / 2).expect("step"), None, "still announcing");
        assert_eq!(rotation.step(t0 + next_after + announced_for).expect("step"), Some(Step::Switched));
        assert_eq!(rotation.hashes(), [CertHash(next.sha256())], "the old certificate is no longer served");
        assert_eq!(rotation.next_step_at(), t0 + next_after + next_after, "the cycle starts again");
    }

    #[test]
    fn a_clock_jump_past_the_certificate_replaces_it_at_once() {
        let t0 = start();
        let mut rotation = Rotation::new(t0, RotationTiming::default()).expect("certificate");
        let first = rotation.current.sha256();
        assert_eq!(rotation.step(t0 + 30 * DAY).expect("step"), Some(Step::Replaced));
        assert_ne!(rotation.current.sha256(), first);
        assert!(Rotation::usable(&rotation.current, t0 + 30 * DAY));
        assert_eq!(rotation.step(t0 - 2 * DAY).expect("step"), Some(Step::Replaced), "a clock set back too");
    }

    #[test]
    fn a_fast_rotation_announces_for_half_its_period() {
        let timing = RotationTiming::every(Duration::from_secs(40));
        assert_eq!((timing.next_after, timing.announced_for), (Duration::from_secs(20), Duration::from_secs(20)));
        let t0 = start();
        let mut rotation = Rotation::new(t0, timing).expect("certificate");
        assert_eq!(rotation.step(t0 + Duration::from_secs(20)).expect("step"), Some(Step::MadeNext));
        assert_eq!(rotation.step(t0 + Duration::from_secs(40)).expect("step"), Some(Step::Switched));
    }

    #[test]
    fn sessions_need_a_registered_origin() {
        let configured = WebOrigins::new(["https://player.example".to_string()]).expect("origin");
        let web = Web::new(configured, RotationTiming::default()).expect("web");
        assert!(web.allows(Some("https://player.example")));
        assert!(!web.allows(Some("https://evil.example")));
        assert!(!web.allows(None), "no Origin: not a page the operator registered");
        web.set_tracker_origins(WebOrigins::new(["https://tv.example".to_string()]).expect("origin"));
        assert!(web.allows(Some("https://tv.example")) && web.allows(Some("https://player.example")));
        assert!(!Web::new(WebOrigins::default(), RotationTiming::default())
            .expect("web")
            .allows(Some("https://player.example")));
    }
}
