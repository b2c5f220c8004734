//! A small origin web server for tests, the demo and benchmarks. It serves objects from memory or from a
//! directory, supports `Range`, and can be told to behave like the awkward origins fogcdn meets in the wild:
//! ignore `Range`, omit `Content-Length`, send slowly, redirect, or change an object's bytes. It counts every
//! request and every body byte it sends, so tests can prove what did (not) reach the origin and what it cost.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How the origin misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quirks {
    /// Answer every request with 200 and the whole object, as servers without range support do.
    pub ignore_range: bool,
    /// Send bodies with chunked transfer encoding and no `Content-Length`.
    pub omit_length: bool,
    /// Send each response body at no more than this many bytes per second, every response on its own (a
    /// slow origin or a per-connection limit); `None` sends as fast as the client reads.
    pub rate: Option<NonZeroU64>,
}

/// What one path cost the origin.
#[derive(Debug, Default)]
struct PathCounters {
    requests: AtomicU64,
    /// GETs without a `Range` header: the tracker's ingest reads (node fills and client fallbacks send one).
    full_gets: AtomicU64,
    bytes: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    objects: RwLock<HashMap<String, Bytes>>,
    redirects: RwLock<HashMap<String, String>>,
    quirks: RwLock<Quirks>,
    dir: Option<PathBuf>,
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    per_path: Mutex<HashMap<String, Arc<PathCounters>>>,
}

impl State {
    fn counters(&self, path: &str) -> Option<Arc<PathCounters>> {
        self.per_path.lock().expect("lock").get(path).cloned()
    }
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

    /// Applies to requests that arrive from now on.
    pub fn set_quirks(&self, quirks: Quirks) {
        *self.state.quirks.write().expect("lock") = quirks;
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn requests_for(&self, path: &str) -> u64 {
        self.state.counters(&normalise(path)).map_or(0, |c| c.requests.load(Ordering::SeqCst))
    }

    /// GETs of `path` without a `Range` header: the tracker's ingest reads of it (node fills and client
    /// fallbacks send `Range`).
    pub fn full_gets_for(&self, path: &str) -> u64 {
        self.state.counters(&normalise(path)).map_or(0, |c| c.full_gets.load(Ordering::SeqCst))
    }

    /// Object body bytes sent so far, counted frame by frame as the connection takes them: a client that
    /// hangs up mid-body is counted for what was sent, plus at most what the connection's buffers held.
    pub fn bytes_sent(&self) -> u64 {
        self.state.bytes_sent.load(Ordering::SeqCst)
    }

    /// [`TestOrigin::bytes_sent`] for one path.
    pub fn bytes_sent_for(&self, path: &str) -> u64 {
        self.state.counters(&normalise(path)).map_or(0, |c| c.bytes.load(Ordering::SeqCst))
    }
}

fn normalise(path: &str) -> String {
    format!("/{}", path.trim_start_matches('/'))
}

/// Path that answers with the number of requests served so far (not itself counted), for tests that run
/// the origin as a separate process.
pub const REQUESTS_PATH: &str = "/__fog_test/requests";

/// Path that answers with every counter as JSON (not itself counted), for tests and benchmarks that run the
/// origin as a separate process: `{"requests", "bytes_sent", "per_path": {PATH: {"requests", "full_gets",
/// "bytes"}}}`, the same numbers as [`TestOrigin::requests`], [`TestOrigin::bytes_sent`] and the `_for` calls.
pub const STATS_PATH: &str = "/__fog_test/stats";

fn stats_json(state: &State) -> serde_json::Value {
    let per_path: serde_json::Map<String, serde_json::Value> = state
        .per_path
        .lock()
        .expect("lock")
        .iter()
        .map(|(path, c)| {
            let counters = serde_json::json!({
                "requests": c.requests.load(Ordering::SeqCst),
                "full_gets": c.full_gets.load(Ordering::SeqCst),
                "bytes": c.bytes.load(Ordering::SeqCst),
            });
            (path.clone(), counters)
        })
        .collect();
    serde_json::json!({
        "requests": state.requests.load(Ordering::SeqCst),
        "bytes_sent": state.bytes_sent.load(Ordering::SeqCst),
        "per_path": per_path,
    })
}

/// Largest body frame; paced bodies use smaller ones at low rates so they flow rather than lurch.
const MAX_FRAME: u64 = 64 << 10;
const MIN_PACED_FRAME: u64 = 16 << 10;
/// How far a paced body may fall behind its schedule and catch up at full speed: a client that stalled is
/// not owed a burst of everything it missed.
const MAX_LAG: Duration = Duration::from_millis(50);

fn frame_len(rate: Option<NonZeroU64>) -> u64 {
    rate.map_or(MAX_FRAME, |r| (r.get() / 100).clamp(MIN_PACED_FRAME, MAX_FRAME))
}

/// Where an object's bytes come from: memory, or a file read as it is sent (objects may be gigabytes).
enum Source {
    Memory(Bytes),
    File(tokio::fs::File),
}

impl Source {
    async fn read(&mut self, offset: u64, len: u64) -> std::io::Result<Bytes> {
        match self {
            Source::Memory(bytes) => Ok(bytes.slice(offset as usize..(offset + len) as usize)),
            Source::File(file) => {
                let mut buf = vec![0; len as usize];
                file.read_exact(&mut buf).await?;
                Ok(Bytes::from(buf))
            }
        }
    }
}

/// Sends `len` bytes of `source` from `start` into `frames`, at most `rate` bytes per second; stops when the
/// receiver is gone (the client hung up).
async fn produce(
    mut source: Source,
    start: u64,
    len: u64,
    rate: Option<NonZeroU64>,
    frames: mpsc::Sender<std::io::Result<Bytes>>,
) {
    if let Source::File(file) = &mut source {
        if let Err(e) = file.seek(SeekFrom::Start(start)).await {
            let _ = frames.send(Err(e)).await;
            return;
        }
    }
    let step = frame_len(rate);
    let mut due = Instant::now();
    let mut sent = 0;
    while sent < len {
        if rate.is_some() {
            tokio::time::sleep_until(due).await;
        }
        let n = step.min(len - sent);
        let frame = source.read(start + sent, n).await;
        let failed = frame.is_err();
        if frames.send(frame).await.is_err() || failed {
            return;
        }
        sent += n;
        if let Some(rate) = rate {
            due = next_due(due, n, rate, Instant::now());
        }
    }
}

/// When the frame after one of `n` bytes, due at `due`, may go: `n / rate` later, but no earlier than
/// [`MAX_LAG`] before `now`, so a body that fell behind catches up only that far.
fn next_due(due: Instant, n: u64, rate: NonZeroU64, now: Instant) -> Instant {
    let on_schedule = due + Duration::from_secs_f64(n as f64 / rate.get() as f64);
    on_schedule.max(now.checked_sub(MAX_LAG).unwrap_or(now))
}

/// An object body, frame by frame, each frame counted as the connection takes it.
struct Counted {
    frames: mpsc::Receiver<std::io::Result<Bytes>>,
    /// Announced as `Content-Length`; `None` sends the body chunked.
    len: Option<u64>,
    state: Arc<State>,
    path: Arc<PathCounters>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.frames.poll_recv(cx).map(|frame| {
            frame.map(|frame| {
                let data = frame?;
                self.state.bytes_sent.fetch_add(data.len() as u64, Ordering::SeqCst);
                self.path.bytes.fetch_add(data.len() as u64, Ordering::SeqCst);
                Ok(Frame::data(data))
            })
        })
    }

    fn size_hint(&self) -> SizeHint {
        self.len.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A short reply that is not an object's body (not counted as bytes sent).
fn reply(status: StatusCode, body: Bytes) -> Response<OriginBody> {
    let mut r = Response::new(Full::new(body).map_err(|never: Infallible| match never {}).boxed());
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

/// The `Content-Type` of the pages and scripts the demo and web tests serve (browsers register a service
/// worker only from a JavaScript response); other objects go without, as from many origins.
fn content_type(path: &str) -> Option<&'static str> {
    match path.rsplit_once('.')?.1 {
        "html" => Some("text/html; charset=utf-8"),
        "js" | "mjs" => Some("text/javascript"),
        _ => None,
    }
}

/// The object at `path` and its length: from memory, else a regular file below the origin's directory.
async fn find(state: &State, path: &str) -> Option<(Source, u64)> {
    if let Some(bytes) = state.objects.read().expect("lock").get(path) {
        return Some((Source::Memory(bytes.clone()), bytes.len() as u64));
    }
    let dir = state.dir.as_ref()?;
    let rel = path.trim_start_matches('/');
    if rel.split('/').any(|seg| seg == ".." || seg.is_empty()) {
        return None;
    }
    let file = tokio::fs::File::open(dir.join(rel)).await.ok()?;
    let meta = file.metadata().await.ok()?;
    meta.is_file().then(|| (Source::File(file), meta.len()))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<OriginBody>, Infallible> {
    match req.uri().path() {
        REQUESTS_PATH => {
            let count = state.requests.load(Ordering::SeqCst);
            return Ok(reply(StatusCode::OK, Bytes::from(count.to_string())));
        }
        STATS_PATH => {
            let mut r = reply(StatusCode::OK, Bytes::from(stats_json(&state).to_string()));
            r.headers_mut()
                .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
            return Ok(r);
        }
        _ => {}
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let range_header = req.headers().get(hyper::header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let counters = state.per_path.lock().expect("lock").entry(path.clone()).or_default().clone();
    counters.requests.fetch_add(1, Ordering::SeqCst);
    if req.method() == Method::GET && range_header.is_none() {
        counters.full_gets.fetch_add(1, Ordering::SeqCst);
    }
    let quirks = *state.quirks.read().expect("lock");

    if let Some(to) = state.redirects.read().expect("lock").get(&path) {
        let mut r = reply(StatusCode::FOUND, Bytes::new());
        r.headers_mut().insert(hyper::header::LOCATION, to.parse().expect("valid redirect target"));
        return Ok(r);
    }
    let Some((source, len)) = find(&state, &path).await else {
        return Ok(reply(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")));
    };
    let range = range_header.and_then(|h| parse_range(&h, len)).filter(|_| !quirks.ignore_range);
    let (status, start, end) = match range {
        Some(Ok((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end + 1),
        Some(Err(())) => {
            let mut r = reply(StatusCode::RANGE_NOT_SATISFIABLE, Bytes::new());
            r.headers_mut()
                .insert(hyper::header::CONTENT_RANGE, format!("bytes */{len}").parse().expect("valid header"));
            return Ok(r);
        }
        None => (StatusCode::OK, 0, len),
    };
    let announced = (!quirks.omit_length).then_some(end - start);
    let mut r = if req.method() == Method::HEAD {
        // No body goes out, so none is produced or counted; the length is announced all the same.
        let mut r = reply(status, Bytes::new());
        if let Some(n) = announced {
            r.headers_mut().insert(hyper::header::CONTENT_LENGTH, n.into());
        }
        r
    } else {
        let (tx, frames) = mpsc::channel(1);
        tokio::spawn(produce(source, start, end - start, quirks.rate, tx));
        let body = Counted { frames, len: announced, state: state.clone(), path: counters };
        let mut r = Response::new(body.boxed());
        *r.status_mut() = status;
        r
    };
    if let Some(kind) = content_type(&path) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(kind));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let cr = format!("bytes {start}-{}/{len}", end - 1);
        r.headers_mut().insert(hyper::header::CONTENT_RANGE, cr.parse().expect("valid header"));
    }
    if !quirks.ignore_range {
        r.headers_mut().insert(hyper::header::ACCEPT_RANGES, hyper::header::HeaderValue::from_static("bytes"));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use std::time::Duration;

    use tokio::time::Instant;

    use super::{
        frame_len, next_due, parse_range, Quirks, TestOrigin, MAX_FRAME, MAX_LAG, MIN_PACED_FRAME, STATS_PATH,
    };
    use crate::test_bytes;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=90-200", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("items=1-2", 100), None);
    }

    #[test]
    fn a_paced_body_keeps_its_schedule_and_does_not_burst_after_a_stall() {
        let rate = NonZeroU64::new(1 << 20).expect("non-zero");
        let start = Instant::now();
        let frame = Duration::from_secs_f64(64.0 / 1024.0);
        // On time (or early): the next frame is due one frame's time after this one was.
        assert_eq!(next_due(start, 64 << 10, rate, start), start + frame);
        // A little late (a coarse timer): still due on the original schedule, so the rate holds.
        assert_eq!(next_due(start, 64 << 10, rate, start + frame + MAX_LAG / 2), start + frame);
        // Stalled for seconds (a slow reader): catching up is capped at MAX_LAG's worth of frames.
        let later = start + Duration::from_secs(5);
        assert_eq!(next_due(start, 64 << 10, rate, later), later - MAX_LAG);
    }

    #[test]
    fn frames_are_small_enough_to_flow() {
        assert_eq!(frame_len(None), MAX_FRAME);
        assert_eq!(frame_len(NonZeroU64::new(10_000_000)), MAX_FRAME);
        assert_eq!(frame_len(NonZeroU64::new(2_000_000)), 20_000);
        assert_eq!(frame_len(NonZeroU64::new(1000)), MIN_PACED_FRAME);
    }

    async fn get(url: &str, range: Option<&str>) -> reqwest::Response {
        let mut req = reqwest::Client::new().get(url);
        if let Some(range) = range {
            req = req.header("range", range);
        }
        req.send().await.expect("request")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paced_responses_deliver_exact_bytes_and_are_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let object = test_bytes(300 << 10, 2);
        std::fs::write(dir.path().join("file.bin"), &object).expect("write");
        for omit_length in [false, true] {
            let quirks = Quirks { omit_length, rate: NonZeroU64::new(4 << 20), ..Default::default() };
            let origin =
                TestOrigin::start(([127, 0, 0, 1], 0).into(), Some(dir.path().into()), quirks).await.expect("start");
            origin.put("memory.bin", object.clone());
            for path in ["memory.bin", "file.bin"] {
                let full = get(&origin.url(path), None).await;
                assert_eq!(full.status(), 200);
                assert_eq!(full.content_length().is_some(), !omit_length, "{path} omit_length {omit_length}");
                assert!(full.bytes().await.expect("body") == object, "{path}: wrong bytes");

                let ranged = get(&origin.url(path), Some("bytes=1000-200000")).await;
                assert_eq!(ranged.status(), 206);
                assert_eq!(ranged.headers()["content-range"], "bytes 1000-200000/307200");
                assert_eq!(ranged.headers()["accept-ranges"], "bytes");
                assert!(ranged.bytes().await.expect("body") == object[1000..=200_000], "{path}: wrong range");

                assert_eq!(origin.requests_for(path), 2);
                assert_eq!(origin.full_gets_for(path), 1, "the ranged GET is not a full one");
                assert_eq!(origin.bytes_sent_for(path), object.len() as u64 + 199_001);
            }
            assert_eq!(origin.bytes_sent(), 2 * (object.len() as u64 + 199_001));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_origin_ignoring_range_sends_whole_objects_without_accept_ranges() {
        let quirks = Quirks { ignore_range: true, rate: NonZeroU64::new(8 << 20), ..Default::default() };
        let origin = TestOrigin::start(([127, 0, 0, 1], 0).into(), None, quirks).await.expect("start");
        let object = test_bytes(100 << 10, 3);
        origin.put("a.bin", object.clone());
        let r = get(&origin.url("a.bin"), Some("bytes=10-20")).await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().get("accept-ranges").is_none());
        assert!(r.bytes().await.expect("body") == object);
        assert_eq!(origin.full_gets_for("a.bin"), 0, "it asked for a range");
        assert_eq!(origin.bytes_sent_for("a.bin"), object.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_hanging_up_is_not_counted_for_bytes_never_sent() {
        let origin = TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Quirks::default()).await.expect("start");
        let object = test_bytes(64 << 20, 4);
        origin.put("big.bin", object);
        let mut r = get(&origin.url("big.bin"), None).await;
        r.chunk().await.expect("first bytes").expect("a chunk");
        drop(r);
        // The origin stops once its writes fail; until then it sends at most what the buffers hold.
        let mut last = u64::MAX;
        while origin.bytes_sent_for("big.bin") != last {
            last = origin.bytes_sent_for("big.bin");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(last > 0 && last < 32 << 20, "counted {last} bytes for a client that hung up");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stats_over_http_are_not_counted() {
        let origin = TestOrigin::start(([127, 0, 0, 1], 0).into(), None, Quirks::default()).await.expect("start");
        origin.put("/x/a.bin", test_bytes(5000, 5));
        get(&origin.url("x/a.bin"), None).await.bytes().await.expect("body");
        get(&origin.url("x/a.bin"), Some("bytes=0-99")).await.bytes().await.expect("body");
        let head = reqwest::Client::new().head(origin.url("x/a.bin")).send().await.expect("head");
        assert_eq!(head.headers()["content-length"], "5000", "HEAD announces the length");
        get(&origin.url("missing"), None).await.bytes().await.expect("body");
        for _ in 0..2 {
            let stats: serde_json::Value = get(&origin.url(STATS_PATH), None).await.json().await.expect("stats json");
            assert_eq!(stats["requests"], 4);
            assert_eq!(stats["bytes_sent"], 5100, "HEAD and 404 bodies are not object bytes");
            assert_eq!(stats["per_path"]["/x/a.bin"]["requests"], 3);
            assert_eq!(stats["per_path"]["/x/a.bin"]["full_gets"], 1);
            assert_eq!(stats["per_path"]["/x/a.bin"]["bytes"], 5100);
            assert_eq!(stats["per_path"]["/missing"]["full_gets"], 1);
        }
        assert_eq!(origin.requests(), 4);
    }
}
