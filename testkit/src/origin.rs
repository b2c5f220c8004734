//! A small origin web server for tests, the demo and benchmarks. It serves objects from memory or from a
//! directory, supports `Range`, and can be told to behave like the awkward origins fogcdn meets in the wild:
//! ignore `Range`, omit `Content-Length`, redirect, or change an object's bytes. It counts every request so
//! tests can prove what did (not) reach the origin.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How the origin misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quirks {
    /// Answer every request with 200 and the whole object, as servers without range support do.
    pub ignore_range: bool,
    /// Send bodies with chunked transfer encoding and no `Content-Length`.
    pub omit_length: bool,
}

#[derive(Debug, Default)]
struct State {
    objects: RwLock<HashMap<String, Bytes>>,
    redirects: RwLock<HashMap<String, String>>,
    quirks: RwLock<Quirks>,
    dir: Option<PathBuf>,
    requests: AtomicU64,
    per_path: Mutex<HashMap<String, u64>>,
}

/// A running origin; stops when dropped.
#[derive(Debug)]
pub struct TestOrigin {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestOrigin {
    /// Starts an origin on `listen` serving objects put in memory and, if `dir` is set, files below it.
    pub async fn start(listen: SocketAddr, dir: Option<PathBuf>, quirks: Quirks) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State { dir, quirks: RwLock::new(quirks), ..Default::default() });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// `http://ADDR/` — the prefix to register with the tracker.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    /// Serves `bytes` at `path` (replacing what was there: "the object changed at the origin").
    pub fn put(&self, path: &str, bytes: impl Into<Bytes>) {
        self.state.objects.write().expect("lock").insert(normalise(path), bytes.into());
    }

    /// Answers `from` with a 302 to `to` (a full URL).
    pub fn redirect(&self, from: &str, to: &str) {
        self.state.redirects.write().expect("lock").insert(normalise(from), to.to_string());
    }

    pub fn set_quirks(&self, quirks: Quirks) {
        *self.state.quirks.write().expect("lock") = quirks;
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn requests_for(&self, path: &str) -> u64 {
        self.state.per_path.lock().expect("lock").get(&normalise(path)).copied().unwrap_or(0)
    }
}

fn normalise(path: &str) -> String {
    format!("/{}", path.trim_start_matches('/'))
}

/// A body of known bytes that does not announce its length, so hyper sends it chunked.
struct Unsized(Option<Bytes>);

impl Body for Unsized {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn reply(status: StatusCode, body: Bytes, omit_length: bool) -> Response<OriginBody> {
    use http_body_util::BodyExt;
    let body = if omit_length { Unsized(Some(body)).boxed() } else { Full::new(body).boxed() };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

/// Parses `bytes=A-B` or `bytes=A-` against an object of `len` bytes; `None` if absent or unsupported.
fn parse_range(header: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() { len.checked_sub(1)? } else { b.parse::<u64>().ok()?.min(len.saturating_sub(1)) };
    Some(if start >= len || start > end { Err(()) } else { Ok((start, end)) })
}

/// Path that answers with the number of requests served so far (not itself counted), for tests that run
/// the origin as a separate process.
pub const REQUESTS_PATH: &str = "/__fog_test/requests";

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<OriginBody>, Infallible> {
    if req.uri().path() == REQUESTS_PATH {
        let count = state.requests.load(Ordering::SeqCst);
        return Ok(reply(StatusCode::OK, Bytes::from(count.to_string()), false));
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    *state.per_path.lock().expect("lock").entry(path.clone()).or_default() += 1;
    let quirks = *state.quirks.read().expect("lock");

    if let Some(to) = state.redirects.read().expect("lock").get(&path) {
        let mut r = reply(StatusCode::FOUND, Bytes::new(), false);
        r.headers_mut().insert(hyper::header::LOCATION, to.parse().expect("valid redirect target"));
        return Ok(r);
    }
    let mut object = state.objects.read().expect("lock").get(&path).cloned();
    if object.is_none() {
        if let Some(dir) = &state.dir {
            let rel = path.trim_start_matches('/');
            if !rel.split('/').any(|seg| seg == ".." || seg.is_empty()) {
                object = tokio::fs::read(dir.join(rel)).await.ok().map(Bytes::from);
            }
        }
    }
    let Some(object) = object else {
        return Ok(reply(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n"), false));
    };
    let len = object.len() as u64;
    let range = req.headers().get(hyper::header::RANGE).and_then(|v| v.to_str().ok()).and_then(|h| parse_range(h, len));
    let mut r = match range {
        Some(Ok((start, end))) if !quirks.ignore_range => {
            let mut r =
                reply(StatusCode::PARTIAL_CONTENT, object.slice(start as usize..=end as usize), quirks.omit_length);
            let cr = format!("bytes {start}-{end}/{len}");
            r.headers_mut().insert(hyper::header::CONTENT_RANGE, cr.parse().expect("valid header"));
            r
        }
        Some(Err(())) if !quirks.ignore_range => {
            let mut r = reply(StatusCode::RANGE_NOT_SATISFIABLE, Bytes::new(), false);
            r.headers_mut()
                .insert(hyper::header::CONTENT_RANGE, format!("bytes */{len}").parse().expect("valid header"));
            r
        }
        _ => reply(StatusCode::OK, object, quirks.omit_length),
    };
    if !quirks.ignore_range {
        r.headers_mut().insert(hyper::header::ACCEPT_RANGES, hyper::header::HeaderValue::from_static("bytes"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=90-200", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("items=1-2", 100), None);
    }
}
