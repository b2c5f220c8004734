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
    #[error("origin ignored a Range request for {url}")]
    RangeIgnored { url: String },
}

impl OriginError {
    /// Whether the same request may succeed later (network trouble, 5xx, 429).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Network { .. } | Self::Truncated { .. } => true,
            Self::WrongRange { .. } | Self::TooLarge { .. } | Self::NotAllowed { .. } => false,
            Self::RangeIgnored { .. } => false,
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
        if len == 0 {
            self.check_allowed(url)?;
            return Ok(Bytes::new());
        }
        let end = offset + u64::from(len);
        let mut body = self.open_range(url, offset, Some(end), u64::from(len), false).await?;
        let mut out = BytesMut::with_capacity(len as usize);
        while let Some(piece) = body.next_piece().await? {
            out.extend_from_slice(&piece);
        }
        if out.len() < len as usize {
            return Err(OriginError::Truncated { url: url.into(), expected: len.into(), got: out.len() as u64 });
        }
        Ok(out.freeze())
    }

    /// Opens bytes `[offset, end)` of the object (to its end when `end` is `None`) for streaming; `limit`
    /// bounds how many bytes the body may have. An origin that ignores `Range` sends the whole object: with
    /// `strict` that is refused ([`OriginError::RangeIgnored`]), else the bytes before `offset` are skipped
    /// as they stream by and the body ends at `end`.
    pub async fn open_range(
        &self,
        url: &str,
        offset: u64,
        end: Option<u64>,
        limit: u64,
        strict: bool,
    ) -> Result<OriginBody, OriginError> {
        self.check_allowed(url)?;
        let spec = match end {
            Some(end) => format!("bytes={offset}-{}", end.saturating_sub(1)),
            None => format!("bytes={offset}-"),
        };
        let resp = self.http.get(url).header(RANGE, spec).send().await.map_err(|e| Self::network(url, e))?;
        let (skip, total) = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let got = resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
                let want = format!("bytes {offset}-");
                let Some(total) = got.strip_prefix(&want).and_then(parse_content_range_rest) else {
                    return Err(OriginError::WrongRange { url: url.into(), want, got: got.into() });
                };
                (0, total)
            }
            // The origin ignored Range and sends the whole object.
            StatusCode::OK if strict => return Err(OriginError::RangeIgnored { url: url.into() }),
            StatusCode::OK => {
                tracing::debug!(url, offset, "origin ignored Range; reading through to the offset");
                (offset, resp.content_length())
            }
            s => return Err(OriginError::Status { url: url.into(), status: s.as_u16() }),
        };
        // What the body will hold once the skipped head is dropped, when it can be told.
        let object_end = total.map(|t| end.map_or(t, |e| e.min(t)));
        let expected = object_end.map(|e| e.saturating_sub(offset)).or(end.map(|e| e.saturating_sub(offset)));
        if let Some(n) = expected.filter(|n| *n > limit) {
            tracing::debug!(url, n, limit, "range over the size limit");
            return Err(OriginError::TooLarge { url: url.into(), limit });
        }
        let mut body = OriginBody::new(url, resp, limit);
        body.total = total;
        body.skip = skip;
        body.take = end.map(|e| e.saturating_sub(offset));
        body.expected = expected;
        Ok(body)
    }

    /// Opens the whole object for streaming; `limit` bounds how many bytes it may have.
    pub async fn get(&self, url: &str, limit: u64) -> Result<OriginBody, OriginError> {
        self.check_allowed(url)?;
        let resp = self.http.get(url).send().await.map_err(|e| Self::network(url, e))?;
        if !resp.status().is_success() {
            return Err(OriginError::Status { url: url.into(), status: resp.status().as_u16() });
        }
        if let Some(n) = resp.content_length().filter(|n| *n > limit) {
            tracing::debug!(url, n, limit, "object over the size limit");
            return Err(OriginError::TooLarge { url: url.into(), limit });
        }
        let mut body = OriginBody::new(url, resp, limit);
        body.total = body.expected;
        Ok(body)
    }
}

/// The object's total size from the part of a `Content-Range` after `bytes START-`: `END/TOTAL`, where
/// TOTAL may be `*` (unknown). `None` if malformed.
fn parse_content_range_rest(rest: &str) -> Option<Option<u64>> {
    let (_, total) = rest.split_once('/')?;
    match total {
        "*" => Some(None),
        t => t.parse().ok().map(Some),
    }
}

/// The body of an origin response, read piece by piece with its size bounded and its length checked.
#[derive(Debug)]
pub struct OriginBody {
    url: String,
    resp: reqwest::Response,
    /// How many bytes the body will deliver, when the origin said.
    pub expected: Option<u64>,
    /// The whole object's size, when the origin said (`Content-Length` of a full response, or the total
    /// of a `Content-Range`).
    pub total: Option<u64>,
    /// Whether the origin serves byte ranges (it answered one, or announced `Accept-Ranges: bytes`).
    pub ranges: bool,
    limit: u64,
    received: u64,
    /// Bytes still to drop before the requested range starts (an origin that ignored `Range`).
    skip: u64,
    /// Bytes the caller asked for at most, when bounded.
    take: Option<u64>,
    pub content_type: Option<String>,
    pub etag: Option<String>,
}

impl OriginBody {
    fn new(url: &str, resp: reqwest::Response, limit: u64) -> Self {
        let header = |name: reqwest::header::HeaderName| {
            resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
        };
        let (content_type, etag) = (header(reqwest::header::CONTENT_TYPE), header(reqwest::header::ETAG));
        let ranges = resp.status() == StatusCode::PARTIAL_CONTENT
            || header(reqwest::header::ACCEPT_RANGES).is_some_and(|v| v.eq_ignore_ascii_case("bytes"));
        Self {
            url: url.into(),
            expected: resp.content_length(),
            total: None,
            ranges,
            resp,
            limit,
            received: 0,
            skip: 0,
            take: None,
            content_type,
            etag,
        }
    }

    /// The next piece of the body, or `None` at its end.
    pub async fn next_piece(&mut self) -> Result<Option<Bytes>, OriginError> {
        loop {
            if self.take.is_some_and(|t| self.received >= t) {
                return Ok(None);
            }
            let url = &self.url;
            let Some(mut piece) = self.resp.chunk().await.map_err(|e| OriginClient::network(url, e))? else {
                break;
            };
            if self.skip > 0 {
                let drop = self.skip.min(piece.len() as u64);
                let _ = piece.split_to(drop as usize);
                self.skip -= drop;
                if piece.is_empty() {
                    continue;
                }
            }
            if let Some(take) = self.take {
                piece.truncate((take - self.received).min(piece.len() as u64) as usize);
            }
            self.received += piece.len() as u64;
            if self.received > self.limit {
                return Err(OriginError::TooLarge { url: url.clone(), limit: self.limit });
            }
            return Ok(Some(piece));
        }
        match self.expected {
            Some(expected) if self.received < expected => {
                Err(OriginError::Truncated { url: self.url.clone(), expected, got: self.received })
            }
            _ => Ok(None),
        }
    }
}
