//! Fetching byte ranges from origins, which are ordinary web servers: some ignore `Range` (answer 200 with
//! the whole object), some omit `Content-Length`, some redirect. Shared by the client's fallback and the
//! node's pull-through, so both handle these cases the same way.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fog_proto::origins::OriginList;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;

/// Origins a fetcher may follow redirects into; shared so a node can update it from the tracker.
pub type SharedOrigins = Arc<RwLock<OriginList>>;

/// Clone: one fill's failure is handed to every request waiting on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    #[error("origin answered HTTP {status} for {url}")]
    Status { url: String, status: u16 },
    // reqwest's own message hides the cause (e.g. "connection refused") in its source chain: shown here.
    #[error("cannot reach origin for {url}: {}", with_causes(source))]
    Network { url: String, source: Arc<reqwest::Error> },
    #[error("origin sent {got} bytes for {url} where {expected} were expected (object shorter than its manifest?)")]
    Truncated { url: String, expected: u64, got: u64 },
    #[error("origin answered {url} with Content-Range {got:?}, not the requested bytes {want}")]
    WrongRange { url: String, want: String, got: String },
    #[error("{url} is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url} is not under a registered origin")]
    NotAllowed { url: String },
}

impl OriginError {
    /// Whether the same request may succeed later (network trouble, 5xx, 429).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Network { .. } | Self::Truncated { .. } => true,
            Self::WrongRange { .. } | Self::TooLarge { .. } | Self::NotAllowed { .. } => false,
        }
    }
}

/// `e` and the errors beneath it, joined by colons.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// An HTTP client builder for origins: bounded connect and read times, at most 5 redirects and, when
/// `allowed` is set, none that leave the registered origins (a redirect into loopback or a private network
/// is refused unless an operator registered it).
pub fn guarded_http(allowed: Option<SharedOrigins>, user_agent: &'static str) -> reqwest::ClientBuilder {
    let redirect = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 5 {
            return attempt.error("more than 5 redirects");
        }
        match &allowed {
            Some(g) if !g.read().map(|o| o.allows(attempt.url().as_str())).unwrap_or(false) => {
                attempt.error("redirect leaves the registered origins")
            }
            _ => attempt.follow(),
        }
    });
    reqwest::Client::builder()
        .redirect(redirect)
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(15))
        .user_agent(user_agent)
}

/// An HTTP client for origins.
#[derive(Debug, Clone)]
pub struct OriginClient {
    http: reqwest::Client,
    allowed: Option<SharedOrigins>,
}

impl OriginClient {
    /// `allowed`: when set, only URLs under these origins are fetched, and redirects leaving them are
    /// refused, so an untrusted requester cannot make us fetch arbitrary URLs. `None` allows any URL (a
    /// player fetching what its user asked for).
    pub fn new(allowed: Option<SharedOrigins>) -> Self {
        let http = guarded_http(allowed.clone(), concat!("fogcdn/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(16)
            .build()
            .expect("static reqwest configuration is valid");
        Self { http, allowed }
    }

    fn check_allowed(&self, url: &str) -> Result<(), OriginError> {
        match &self.allowed {
            Some(g) if !g.read().map(|o| o.allows(url)).unwrap_or(false) => {
                Err(OriginError::NotAllowed { url: url.to_string() })
            }
            _ => Ok(()),
        }
    }

    fn network(url: &str, source: reqwest::Error) -> OriginError {
        OriginError::Network { url: url.to_string(), source: Arc::new(source) }
    }

    /// Exactly `len` bytes at `offset` of the object at `url`.
    pub async fn fetch_range(&self, url: &str, offset: u64, len: u32) -> Result<Bytes, OriginError> {
        self.check_allowed(url)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let last = offset + u64::from(len) - 1;
        let want = format!("bytes {offset}-{last}/");
        let mut resp = self
            .http
            .get(url)
            .header(RANGE, format!("bytes={offset}-{last}"))
            .send()
            .await
            .map_err(|e| Self::network(url, e))?;
        let mut skip = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let got = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
                if !got.starts_with(&want) {
                    return Err(OriginError::WrongRange { url: url.into(), want, got: got.into() });
                }
                0
            }
            // The origin ignored Range and sends the whole object: skip to our offset as it streams by.
            StatusCode::OK => {
                tracing::debug!(url, offset, "origin ignored Range; reading through to the offset");
                offset
            }
            s => return Err(OriginError::Status { url: url.into(), status: s.as_u16() }),
        };
        let mut out = BytesMut::with_capacity(len as usize);
        while out.len() < len as usize {
            let Some(mut piece) = resp.chunk().await.map_err(|e| Self::network(url, e))? else { break };
            if skip > 0 {
                let drop = skip.min(piece.len() as u64);
                let _ = piece.split_to(drop as usize);
                skip -= drop;
            }
            let room = len as usize - out.len();
            out.extend_from_slice(&piece[..piece.len().min(room)]);
        }
        if out.len() < len as usize {
            return Err(OriginError::Truncated { url: url.into(), expected: len.into(), got: out.len() as u64 });
        }
        Ok(out.freeze())
    }

    /// Opens the whole object for streaming; `limit` bounds how many bytes it may have.
    pub async fn get(&self, url: &str, limit: u64) -> Result<OriginBody, OriginError> {
        self.check_allowed(url)?;
        let resp = self.http.get(url).send().await.map_err(|e| Self::network(url, e))?;
        if !resp.status().is_success() {
            return Err(OriginError::Status { url: url.into(), status: resp.status().as_u16() });
        }
        let header = |name: reqwest::header::HeaderName| {
            resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
        };
        let (content_type, etag) = (header(reqwest::header::CONTENT_TYPE), header(reqwest::header::ETAG));
        if let Some(n) = resp.content_length().filter(|n| *n > limit) {
            tracing::debug!(url, n, limit, "object over the size limit");
            return Err(OriginError::TooLarge { url: url.into(), limit });
        }
        Ok(OriginBody {
            url: url.into(),
            expected: resp.content_length(),
            resp,
            limit,
            received: 0,
            content_type,
            etag,
        })
    }
}

/// The body of an origin response, read piece by piece with its size bounded and its length checked.
#[derive(Debug)]
pub struct OriginBody {
    url: String,
    resp: reqwest::Response,
    /// `Content-Length`, when the origin sent one.
    pub expected: Option<u64>,
    limit: u64,
    received: u64,
    pub content_type: Option<String>,
    pub etag: Option<String>,
}

impl OriginBody {
    /// The next piece of the body, or `None` at its end.
    pub async fn next_piece(&mut self) -> Result<Option<Bytes>, OriginError> {
        let url = &self.url;
        match self.resp.chunk().await.map_err(|e| OriginClient::network(url, e))? {
            Some(piece) => {
                self.received += piece.len() as u64;
                if self.received > self.limit {
                    return Err(OriginError::TooLarge { url: url.clone(), limit: self.limit });
                }
                Ok(Some(piece))
            }
            None => match self.expected {
                Some(expected) if self.received < expected => {
                    Err(OriginError::Truncated { url: url.clone(), expected, got: self.received })
                }
                _ => Ok(None),
            },
        }
    }
}
