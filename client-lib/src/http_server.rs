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
use tokio::sync::{mpsc, Semaphore};

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

/// Serves `handler` on `listener` with at most `max_connections` at once, until `shutdown` resolves.
pub async fn serve<H, F>(listener: TcpListener, max_connections: usize, handler: H, shutdown: impl Future<Output = ()>)
where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "HTTP connection limit reached; dropping connection");
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = handler(req, peer);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
}
