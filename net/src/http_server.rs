//! A small, bounded HTTP/1.1 server for fogcdn's HTTP surfaces: the tracker API and dashboard, the node
//! status page. Connections are capped, slow request headers time out, and responses are either whole
//! (JSON, pages) or server-sent event streams fed from a bounded channel.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::per_source::source_of;

pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;
pub type Reply = Response<Body>;

pub fn empty_body() -> Body {
    Full::new(Bytes::new()).boxed()
}

/// A whole response with a content type.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Reply {
    reply(status, "application/json", serde_json::to_vec(body).expect("API types serialise"))
}

/// Prometheus text exposition.
pub fn metrics(text: String) -> Reply {
    reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text)
}

/// A server-sent event stream: the caller pushes ready-made `event:`/`data:` blocks into the returned
/// sender (bounded, so a slow reader makes the producer skip, not buffer without end). The stream ends
/// when the sender is dropped.
pub fn event_stream(capacity: usize) -> (mpsc::Sender<Bytes>, Reply) {
    let (tx, rx) = mpsc::channel(capacity);
    let mut r = Response::new(Events(rx).boxed());
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (tx, r)
}

/// Formats one server-sent event.
pub fn sse_event(event: &str, data: &str) -> Bytes {
    // `data` is one JSON line, so it needs no splitting into several data: fields.
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// A body that streams whatever `reader` yields, for responses produced while they are sent (the reader
/// is typically one end of a `tokio::io::duplex` pipe).
pub fn reader_body(reader: impl AsyncRead + Send + Sync + Unpin + 'static) -> Body {
    ReaderBody { reader: Box::new(reader), buf: vec![0u8; 64 * 1024] }.boxed()
}

struct ReaderBody {
    reader: Box<dyn AsyncRead + Send + Sync + Unpin>,
    buf: Vec<u8>,
}

impl http_body::Body for ReaderBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let mut buf = ReadBuf::new(&mut this.buf);
        match Pin::new(&mut this.reader).poll_read(cx, &mut buf) {
            Poll::Pending => Poll::Pending,
            // A read error ends the body early; hyper then closes the connection, so the client sees a
            // truncated response rather than wrong bytes.
            Poll::Ready(Err(_)) => Poll::Ready(None),
            Poll::Ready(Ok(())) if buf.filled().is_empty() => Poll::Ready(None),
            Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(buf.filled()))))),
        }
    }
}

struct Events(mpsc::Receiver<Bytes>);

impl http_body::Body for Events {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// How long a request body may take to arrive in full: a sender slower than its size over this is cut off
/// (for the tracker's 64 KiB bodies, a minimum rate of 6.4 KiB/s).
pub const BODY_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body not received within {} s; send it faster", BODY_DEADLINE.as_secs())]
    TooSlow,
    #[error("cannot read request body (limit {limit} bytes): {source}")]
    Read { limit: usize, source: Box<dyn std::error::Error + Send + Sync> },
}

/// Reads a whole request body of at most `limit` bytes within [`BODY_DEADLINE`].
pub async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, BodyError> {
    let collect = http_body_util::Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(BODY_DEADLINE, collect).await {
        Err(_) => Err(BodyError::TooSlow),
        Ok(Err(source)) => Err(BodyError::Read { limit, source }),
        Ok(Ok(body)) => Ok(body.to_bytes()),
    }
}

/// Open connections by source, oldest first, each with the means to close it. When the server is full, a
/// new connection closes the oldest one of the source holding the most: one host can take the whole
/// server only while nobody else wants in, and its stalled connections go first.
#[derive(Default)]
struct Connections {
    by_source: std::collections::HashMap<std::net::IpAddr, std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>>,
    open: usize,
    next_id: u64,
}

impl Connections {
    fn add(&mut self, source: std::net::IpAddr) -> (u64, Arc<tokio::sync::Notify>) {
        let (id, close) = (self.next_id, Arc::new(tokio::sync::Notify::new()));
        self.next_id += 1;
        self.by_source.entry(source).or_default().push_back((id, close.clone()));
        self.open += 1;
        (id, close)
    }

    fn remove(&mut self, source: std::net::IpAddr, id: u64) {
        if let Some(list) = self.by_source.get_mut(&source) {
            if let Some(pos) = list.iter().position(|(i, _)| *i == id) {
                list.remove(pos);
                self.open -= 1;
            }
            if list.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }

    /// Closes the oldest connection of the busiest source (it stops counting at once); returns that source.
    fn evict_one(&mut self) -> Option<std::net::IpAddr> {
        let (source, list) = self.by_source.iter_mut().max_by_key(|(_, l)| l.len())?;
        let source = *source;
        let (_, close) = list.pop_front()?;
        close.notify_one();
        self.open -= 1;
        if list.is_empty() {
            self.by_source.remove(&source);
        }
        Some(source)
    }
}

/// File descriptors kept for everything but HTTP connections (stores, QUIC sockets, logs).
const OTHER_FILES: u64 = 256;

/// Raises the soft open-file limit (often 1024) to fit `connections` HTTP connections and the rest, as far
/// as the hard limit allows; returns how many connections fit, so that `accept` does not fail for want of a
/// file descriptor while the connection cap is not reached.
fn open_file_room(connections: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let want = connections as u64 + OTHER_FILES;
    let limit = getrlimit(Resource::Nofile);
    let mut soft = limit.current.unwrap_or(u64::MAX);
    if soft < want {
        let raised = limit.maximum.map_or(want, |hard| hard.min(want));
        match setrlimit(Resource::Nofile, Rlimit { current: Some(raised), maximum: limit.maximum }) {
            Ok(()) => soft = raised,
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    let room = usize::try_from(soft.saturating_sub(OTHER_FILES)).unwrap_or(usize::MAX).max(1);
    if room < connections {
        tracing::warn!(
            connections = room,
            wanted = connections,
            "the open-file limit allows fewer HTTP connections than wanted; raise it (ulimit -n, or LimitNOFILE= in a systemd unit)"
        );
    }
    room.min(connections)
}

/// Serves `handler` on `listener` with at most `max_connections` at once (fewer if the open-file limit
/// cannot fit them), until `shutdown` resolves.
pub async fn serve<H, F>(listener: TcpListener, max_connections: usize, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let max_connections = open_file_room(max_connections);
    let connections = Arc::new(std::sync::Mutex::new(Connections::default()));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let source = source_of(peer.ip());
        let (id, close) = {
            let mut c = connections.lock().expect("connections lock");
            if c.open >= max_connections {
                if let Some(busiest) = c.evict_one() {
                    tracing::warn!(%peer, %busiest, "HTTP connection limit reached; closing the busiest source's oldest connection");
                }
            }
            c.add(source)
        };
        let (handler, connections) = (handler.clone(), connections.clone());
        let span = tracing::debug_span!("http_connection", %peer);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let span = tracing::info_span!("http_request", method = %req.method(), path = req.uri().path());
                    let response = tracing::Instrument::instrument(handler(req, peer), span);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    result = conn => if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                    },
                    () = close.notified() => tracing::debug!(%peer, "HTTP connection closed to make room"),
                }
                connections.lock().expect("connections lock").remove(source, id);
            },
            span,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_raised_to_fit_the_connections() {
        use rustix::process::{getrlimit, Resource};
        let hard = getrlimit(Resource::Nofile).maximum.unwrap_or(u64::MAX);
        let wanted = 2000usize.min(usize::try_from(hard - OTHER_FILES).unwrap_or(usize::MAX));
        assert_eq!(open_file_room(wanted), wanted);
        assert!(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX) >= wanted as u64 + OTHER_FILES);
        // Beyond the hard limit: as many as fit.
        if hard < u64::MAX / 2 {
            assert_eq!(open_file_room(usize::MAX / 2) as u64, hard - OTHER_FILES);
        }
    }

    #[test]
    fn a_full_server_closes_the_busiest_sources_oldest_connection() {
        let mut c = Connections::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let (first, _) = c.add(a);
        c.add(a);
        c.add(b);
        assert_eq!(c.evict_one(), Some(a));
        assert_eq!(c.open, 2);
        // The evicted connection's own removal, when its task ends, does not count twice.
        c.remove(a, first);
        assert_eq!(c.open, 2);
    }
}
