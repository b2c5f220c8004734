//! The tracker's HTTP API as seen by clients and nodes, over one tracker URL or several ([`crate::trackers`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fog_proto::api::{
    ApiError, ClientReport, ErrorCode, Families, HeartbeatResponse, Published, RegisterResponse, Resolve, Signed,
};
use fog_proto::credits::RedeemResponse;
use fog_proto::manifest::Manifest;
use fog_proto::origins::OriginList;
use fog_proto::{ContentId, NodeId};
use serde::de::DeserializeOwned;

use crate::trackers::{parse_list, Failover, Outcome};

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("no tracker is configured")]
    NotConfigured,
    #[error("cannot reach the tracker at {base}: {source}")]
    Unreachable { base: String, source: reqwest::Error },
    /// Not our tracker answering (a proxy's error page, say): treated like an outage.
    #[error("the tracker at {base} answered HTTP {status} without a tracker error body")]
    NotATracker { base: String, status: u16 },
    #[error("tracker refused: {} ({:?})", .0.message, .0.error)]
    Api(ApiError),
    #[error("tracker response over {limit} bytes")]
    TooLarge { limit: usize },
    /// Unparseable, or (as the caller found) inconsistent.
    #[error("tracker sent a response this client cannot read: {0}")]
    BadResponse(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl TrackerError {
    /// Whether trying again later may help (a tracker that sends garbage may be mid-upgrade).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::NotConfigured => false,
            Self::Unreachable { .. } | Self::NotATracker { .. } | Self::TooLarge { .. } | Self::BadResponse(_) => true,
            Self::Api(e) => e.retryable,
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api(e) => Some(e.error),
            _ => None,
        }
    }
}

/// The tracker's API over one URL or several (replicas of a cell): every request goes through one shared
/// [`Failover`] policy, so clones (a node's heartbeats and its redemptions, say) fail over together.
#[derive(Debug, Clone)]
pub struct TrackerClient {
    policy: Arc<Mutex<Failover>>,
    http: reqwest::Client,
}

/// Largest tracker response we read: a manifest of a 64 GiB object at 1 MiB chunks is ~5 MB of JSON.
const MAX_RESPONSE: usize = 64 << 20;

/// Whether a request may be sent again to another URL after it may have reached a tracker: reads may;
/// a node message signed once may not (a replica that saw it would refuse the copy as a replay), nor a
/// report (counted twice). Either is retried anyway when it surely never arrived (no connection, a 5xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    Safe,
    OnlyUndelivered,
}

impl TrackerClient {
    /// `list` is the tracker's URL, e.g. `http://127.0.0.1:7700`, or several comma-separated (see
    /// [`crate::trackers`]). Callers validate it first with [`crate::trackers::parse_list`]; an invalid one
    /// is kept as a single URL, so requests fail naming it.
    pub fn new(list: &str, timeout: Duration) -> Self {
        let urls = parse_list(list).unwrap_or_else(|_| vec![list.trim().to_string()]);
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .expect("static reqwest configuration is valid");
        Self { policy: Arc::new(Mutex::new(Failover::new(urls))), http }
    }

    /// Where the requests go now: the URL that answered last, its index in the list, and how many times
    /// that changed.
    pub fn current(&self) -> CurrentTracker {
        let p = self.policy.lock().expect("tracker policy lock");
        CurrentTracker { url: p.urls()[p.current()].clone(), index: p.current(), failovers: p.failovers() }
    }

    /// The manifest of `url` and a schedule of nodes per chunk. `stale` names a content id the caller found
    /// no longer matching the origin, asking the tracker to ingest the object again.
    /// `client_key`: the session's public key, asking for a credit ticket. `from`: the byte the client
    /// reads first (a seek), which an ingest still under way hashes before the rest. The query names the IP
    /// families this host has routes in, so the tracker offers only nodes it can dial.
    pub async fn resolve(
        &self,
        url: &str,
        stale: Option<ContentId>,
        client_key: Option<NodeId>,
        from: Option<u64>,
    ) -> Result<Resolve, TrackerError> {
        let mut query = vec![("url", url.to_string())];
        if let Some(from) = from.filter(|&f| f > 0) {
            query.push(("from", from.to_string()));
        }
        if let Some(s) = stale {
            query.push(("stale", s.to_string()));
        }
        if let Some(k) = client_key {
            query.push(("client_key", k.to_string()));
        }
        let families = crate::transport::local_families();
        if families != Families::default() {
            query.push(("families", families.to_query()));
        }
        self.send(Repeat::Safe, |base| self.http.get(format!("{base}/v1/resolve")).query(&query)).await
    }

    /// The origins the tracker serves: the only ones a player proxy relays.
    pub async fn origins(&self) -> Result<OriginList, TrackerError> {
        self.send(Repeat::Safe, |base| self.http.get(format!("{base}/v1/origins"))).await
    }

    pub async fn register(&self, msg: &Signed) -> Result<RegisterResponse, TrackerError> {
        self.send(Repeat::OnlyUndelivered, |base| self.http.post(format!("{base}/v1/nodes/register")).json(msg)).await
    }

    pub async fn report(&self, report: &ClientReport) -> Result<serde_json::Value, TrackerError> {
        self.send(Repeat::OnlyUndelivered, |base| self.http.post(format!("{base}/v1/reports")).json(report)).await
    }

    /// Receipts redeemed twice are answered `duplicate`, so a redemption may go to another replica.
    pub async fn redeem(&self, msg: &Signed) -> Result<RedeemResponse, TrackerError> {
        self.send(Repeat::Safe, |base| self.http.post(format!("{base}/v1/credits/redeem")).json(msg)).await
    }

    /// GET a JSON document from the tracker's API (ledger heads, proofs, statements).
    pub async fn get_json<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, TrackerError> {
        self.send(Repeat::Safe, |base| self.http.get(format!("{base}{path_and_query}"))).await
    }

    pub async fn heartbeat(&self, msg: &Signed) -> Result<HeartbeatResponse, TrackerError> {
        self.send(Repeat::OnlyUndelivered, |base| self.http.post(format!("{base}/v1/nodes/heartbeat")).json(msg)).await
    }

    /// Publishes a manifest built where the content is packaged (`fog manifest --publish`): the tracker
    /// serves it for its URL instead of ingesting the object. Operator-only (`--admin-token`).
    pub async fn publish(&self, manifest: &Manifest, admin_token: &str) -> Result<Published, TrackerError> {
        self.send(Repeat::Safe, |base| {
            self.http.put(format!("{base}/v1/admin/manifests")).bearer_auth(admin_token).json(manifest)
        })
        .await
    }

    /// Sends the request built by `request(base)` to the URLs the policy plans, in turn, until one answers
    /// or `repeat` forbids another try.
    async fn send<T: DeserializeOwned>(
        &self,
        repeat: Repeat,
        request: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<T, TrackerError> {
        let (plan, urls) = {
            let p = self.policy.lock().expect("tracker policy lock");
            (p.plan(Instant::now()), p.urls().to_vec())
        };
        let mut last = None;
        for i in plan {
            let (result, verdict) = Self::attempt(&urls[i], request(&urls[i])).await;
            let outcome = match verdict {
                Verdict::Answered => Outcome::Answered,
                Verdict::Unavailable { .. } => Outcome::Unavailable,
            };
            let moved = self.policy.lock().expect("tracker policy lock").record(i, outcome, Instant::now());
            if moved {
                tracing::info!(tracker = %urls[i], "tracker failover: now asking this one");
            }
            match verdict {
                Verdict::Unavailable { delivered: false } => {}
                Verdict::Unavailable { delivered: true } if repeat == Repeat::Safe => {}
                _ => return result,
            }
            tracing::debug!(tracker = %urls[i], error = ?result.as_ref().err(), "tracker unavailable; trying the next");
            last = Some(result);
        }
        last.expect("a plan names at least one URL")
    }

    /// One request to one URL, and what it says about that tracker's availability.
    async fn attempt<T: DeserializeOwned>(
        base: &str,
        req: reqwest::RequestBuilder,
    ) -> (Result<T, TrackerError>, Verdict) {
        let unreachable = |source: reqwest::Error| {
            // Without a connection the request cannot have arrived.
            let verdict = Verdict::Unavailable { delivered: !source.is_connect() };
            (Err(TrackerError::Unreachable { base: base.to_string(), source }), verdict)
        };
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return unreachable(e),
        };
        let status = resp.status();
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(piece)) => {
                    if body.len() + piece.len() > MAX_RESPONSE {
                        return (Err(TrackerError::TooLarge { limit: MAX_RESPONSE }), Verdict::Answered);
                    }
                    body.extend_from_slice(&piece);
                }
                Ok(None) => break,
                Err(e) => return unreachable(e),
            }
        }
        if status.is_success() {
            return match serde_json::from_slice(&body) {
                Ok(v) => (Ok(v), Verdict::Answered),
                // A replica mid-upgrade, or not a tracker at all: another may answer properly.
                Err(e) => (Err(TrackerError::BadResponse(Box::new(e))), Verdict::Unavailable { delivered: true }),
            };
        }
        // A 5xx says this server could not do it now (down, not ready, its database failing over); the
        // origin's failure relayed (502 `origin_error`) is an answer about the origin, the same everywhere.
        let parsed = serde_json::from_slice::<ApiError>(&body);
        let about_origin = parsed.as_ref().is_ok_and(|e| e.error == ErrorCode::OriginError);
        let verdict = if status.is_server_error() && !about_origin {
            Verdict::Unavailable { delivered: false }
        } else {
            Verdict::Answered
        };
        match parsed {
            Ok(e) => (Err(TrackerError::Api(e)), verdict),
            Err(_) => (Err(TrackerError::NotATracker { base: base.to_string(), status: status.as_u16() }), verdict),
        }
    }
}

/// What one request to one tracker URL showed.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Answered,
    /// `delivered`: the tracker may have acted on the request before failing.
    Unavailable {
        delivered: bool,
    },
}

/// The tracker requests go to now ([`TrackerClient::current`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CurrentTracker {
    pub url: String,
    pub index: usize,
    pub failovers: u64,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An HTTP server on 127.0.0.1 answering every request with `status` and `body` (`None`: never
    /// answers); counts the connections it accepted.
    async fn server(status: u16, body: Option<&'static str>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 << 10];
                    let _ = conn.read(&mut buf).await;
                    let Some(body) = body else {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                         connection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(format!("{head}{body}").as_bytes()).await;
                });
            }
        });
        (url, seen)
    }

    /// A URL nothing listens on: a port bound, then closed.
    fn dead() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    }

    const NOT_READY: &str = r#"{"error":"internal","message":"replica not ready","retryable":true}"#;
    const NOT_FOUND: &str = r#"{"error":"bad_request","message":"no such statement","retryable":false}"#;

    #[tokio::test]
    async fn fails_over_past_dead_and_unready_trackers_then_sticks() {
        let (unready, unready_seen) = server(503, Some(NOT_READY)).await;
        let (live, live_seen) = server(200, Some("{}")).await;
        let t = TrackerClient::new(&format!("{},{unready},{live}", dead()), Duration::from_secs(5));
        let v: serde_json::Value = t.get_json("/v1/x").await.expect("the live tracker answers");
        assert_eq!(v, serde_json::json!({}));
        assert_eq!((t.current().index, t.current().failovers), (2, 1));
        let _: serde_json::Value = t.get_json("/v1/x").await.expect("again");
        assert_eq!(unready_seen.load(Ordering::SeqCst), 1, "the current tracker is asked first");
        assert_eq!(live_seen.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_definite_refusal_is_not_failed_over() {
        let (refusing, _) = server(404, Some(NOT_FOUND)).await;
        let (other, other_seen) = server(200, Some("{}")).await;
        let t = TrackerClient::new(&format!("{refusing},{other}"), Duration::from_secs(5));
        let e = t.get_json::<serde_json::Value>("/v1/x").await.expect_err("refused");
        assert_eq!(e.code(), Some(ErrorCode::BadRequest));
        assert_eq!(other_seen.load(Ordering::SeqCst), 0);
        assert_eq!(t.current().failovers, 0);
    }

    #[tokio::test]
    async fn a_signed_message_that_may_have_arrived_is_not_sent_twice() {
        let (silent, _) = server(200, None).await;
        let (other, other_seen) = server(200, Some("{}")).await;
        let t = TrackerClient::new(&format!("{silent},{other}"), Duration::from_millis(300));
        let e = t.report(&ClientReport::default()).await.expect_err("timed out");
        assert!(matches!(e, TrackerError::Unreachable { .. }), "{e}");
        assert_eq!(other_seen.load(Ordering::SeqCst), 0, "not repeated elsewhere");
        // The next one goes to the other tracker; a read would have gone there at once.
        t.report(&ClientReport::default()).await.expect("the other tracker answers");
        assert_eq!((t.current().index, other_seen.load(Ordering::SeqCst)), (1, 1));
        let t = TrackerClient::new(&format!("{silent},{other}"), Duration::from_millis(300));
        let _: serde_json::Value = t.get_json("/v1/x").await.expect("a read fails over within the call");
        assert_eq!(t.current().index, 1);
    }
}
