//! The tracker's HTTP API as seen by clients and nodes.

use std::time::Duration;

use fog_proto::api::{
    ApiError, ClientReport, ErrorCode, Families, HeartbeatResponse, Published, RegisterResponse, Resolve, Signed,
};
use fog_proto::credits::RedeemResponse;
use fog_proto::manifest::Manifest;
use fog_proto::origins::OriginList;
use fog_proto::{ContentId, NodeId};
use serde::de::DeserializeOwned;

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

#[derive(Debug, Clone)]
pub struct TrackerClient {
    base: String,
    http: reqwest::Client,
}

/// Largest tracker response we read: a manifest of a 64 GiB object at 1 MiB chunks is ~5 MB of JSON.
const MAX_RESPONSE: usize = 64 << 20;

impl TrackerClient {
    /// `base` is the tracker's URL, e.g. `http://127.0.0.1:7700`.
    pub fn new(base: &str, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .timeout(timeout)
            .build()
            .expect("static reqwest configuration is valid");
        Self { base: base.trim_end_matches('/').to_string(), http }
    }

    pub fn base(&self) -> &str {
        &self.base
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
        let mut req = self.http.get(format!("{}/v1/resolve", self.base)).query(&[("url", url)]);
        if let Some(from) = from.filter(|&f| f > 0) {
            req = req.query(&[("from", from.to_string())]);
        }
        if let Some(s) = stale {
            req = req.query(&[("stale", s.to_string())]);
        }
        if let Some(k) = client_key {
            req = req.query(&[("client_key", k.to_string())]);
        }
        let families = crate::transport::local_families();
        if families != Families::default() {
            req = req.query(&[("families", families.to_query())]);
        }
        self.send(req).await
    }

    /// The origins the tracker serves: the only ones a player proxy relays.
    pub async fn origins(&self) -> Result<OriginList, TrackerError> {
        self.send(self.http.get(format!("{}/v1/origins", self.base))).await
    }

    pub async fn register(&self, msg: &Signed) -> Result<RegisterResponse, TrackerError> {
        self.send(self.http.post(format!("{}/v1/nodes/register", self.base)).json(msg)).await
    }

    pub async fn report(&self, report: &ClientReport) -> Result<serde_json::Value, TrackerError> {
        self.send(self.http.post(format!("{}/v1/reports", self.base)).json(report)).await
    }

    pub async fn redeem(&self, msg: &Signed) -> Result<RedeemResponse, TrackerError> {
        self.send(self.http.post(format!("{}/v1/credits/redeem", self.base)).json(msg)).await
    }

    /// GET a JSON document from the tracker's API (ledger heads, proofs, statements).
    pub async fn get_json<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, TrackerError> {
        self.send(self.http.get(format!("{}{path_and_query}", self.base))).await
    }

    pub async fn heartbeat(&self, msg: &Signed) -> Result<HeartbeatResponse, TrackerError> {
        self.send(self.http.post(format!("{}/v1/nodes/heartbeat", self.base)).json(msg)).await
    }

    /// Publishes a manifest built where the content is packaged (`fog manifest --publish`): the tracker
    /// serves it for its URL instead of ingesting the object. Operator-only (`--admin-token`).
    pub async fn publish(&self, manifest: &Manifest, admin_token: &str) -> Result<Published, TrackerError> {
        let req = self.http.put(format!("{}/v1/admin/manifests", self.base)).bearer_auth(admin_token).json(manifest);
        self.send(req).await
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, TrackerError> {
        let unreachable = |source| TrackerError::Unreachable { base: self.base.clone(), source };
        let mut resp = req.send().await.map_err(unreachable)?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(piece) = resp.chunk().await.map_err(unreachable)? {
            if body.len() + piece.len() > MAX_RESPONSE {
                return Err(TrackerError::TooLarge { limit: MAX_RESPONSE });
            }
            body.extend_from_slice(&piece);
        }
        if status.is_success() {
            serde_json::from_slice(&body).map_err(|e| TrackerError::BadResponse(Box::new(e)))
        } else {
            match serde_json::from_slice::<ApiError>(&body) {
                Ok(e) => Err(TrackerError::Api(e)),
                Err(_) => Err(TrackerError::NotATracker { base: self.base.clone(), status: status.as_u16() }),
            }
        }
    }
}
