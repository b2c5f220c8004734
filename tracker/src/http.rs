//! The tracker's HTTP surface, and only that: routing, query and body parsing, and the one mapping from an
//! [`AppError`] to a status code and an [`ApiError`] body. What each request means is `app`'s; the API is
//! specified in `docs/protocol.md`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use fog_net::http_server::{self, json, reply, Reply};
use fog_net::origin::OriginError;
use fog_proto::api::{ApiError, ClientReport, ErrorCode, Families, Signed};
use fog_proto::credits::{redeem_body_bound, MAX_REDEEM_BODY};
use fog_proto::manifest::MAX_MANIFEST_JSON;
use fog_proto::{ContentId, NodeId};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, StatusCode};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::app::{App, AppError, Reach};
use crate::dashboard::SAMPLE_EVERY;
use crate::ingest::IngestError;
use crate::ledger::{LedgerError, FORWARD_PATH, MAX_RECORDS};
use crate::metrics::ResultLabel;
use crate::registry::SortBy;

/// Largest request body (register and heartbeat messages are a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;
/// Most client connections served at once.
const MAX_CONNECTIONS: usize = 4096;

const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
const UPLOT_JS: &[u8] = include_bytes!("../assets/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &[u8] = include_bytes!("../assets/vendor/uplot/uPlot.min.css");

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(app: Arc<App>, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    http_server::serve(listener, MAX_CONNECTIONS, move |req, peer| handle(app.clone(), req, peer), shutdown).await;
}

async fn handle(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Reply {
    match cross_site_origin(&req) {
        None => route(app, req, peer, false).await,
        Some(origin) => cross_site(app, req, peer, origin).await,
    }
}

/// What browser pages of other sites may ask for: resolving objects and reporting what they fetched.
const WEB_ENDPOINTS: [(Method, &str); 2] = [(Method::GET, "/v1/resolve"), (Method::POST, "/v1/reports")];
/// How long a browser may reuse a preflight's answer.
const PREFLIGHT_MAX_AGE_SECS: &str = "600";

/// The `Origin` of a request a browser page of another site made: none for native clients (which send no
/// `Origin`) and for the dashboard's own requests (same site: the origin's authority is the `Host`).
fn cross_site_origin(req: &Request<Incoming>) -> Option<String> {
    let origin = req.headers().get(hyper::header::ORIGIN)?;
    // An origin that is not text cannot be registered: it is refused like any unknown one.
    let origin = origin.to_str().unwrap_or("null");
    let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok());
    let authority = origin.split_once("://").map(|(_, authority)| authority);
    match (authority, host) {
        (Some(authority), Some(host)) if authority.eq_ignore_ascii_case(host) => None,
        _ => Some(origin.to_string()),
    }
}

/// A request from a page of another site: refused unless the site is registered (`--web-origin`) and it
/// asks for a [web endpoint](WEB_ENDPOINTS); answered with CORS headers naming the site, so only its pages
/// read the answers. Preflights (`OPTIONS`, for the reports' JSON body) are answered here.
async fn cross_site(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr, origin: String) -> Reply {
    let web_requests = |result| app.metrics.web_requests.get_or_create(&ResultLabel { result }).inc();
    let path = req.uri().path();
    let preflight = req.method() == Method::OPTIONS;
    let asked = if preflight {
        req.headers()
            .get(hyper::header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
    } else {
        Some(req.method().clone())
    };
    let endpoint = WEB_ENDPOINTS.iter().any(|(m, p)| asked.as_ref() == Some(m) && *p == path);
    let refusal = if !app.cfg.web_origins.allows(&origin) {
        Some("use this fog")
    } else if !endpoint {
        Some("call this endpoint (only GET /v1/resolve and POST /v1/reports)")
    } else {
        None
    };
    if let Some(what) = refusal {
        web_requests("refused");
        tracing::info!(%origin, %path, %peer, "refused a request from a browser page of another site");
        return error_reply(&AppError::UnknownWebOrigin { origin, what });
    }
    let mut reply = if preflight {
        web_requests("preflight");
        let mut reply = Reply::new(http_server::empty_body());
        *reply.status_mut() = StatusCode::NO_CONTENT;
        let headers = reply.headers_mut();
        headers.insert(hyper::header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
        headers.insert(hyper::header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("content-type"));
        headers.insert(hyper::header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECS));
        reply
    } else {
        web_requests("allowed");
        route(app, req, peer, true).await
    };
    let headers = reply.headers_mut();
    // Registered origins are serialised origins, so valid header values.
    if let Ok(value) = HeaderValue::from_str(&origin) {
        headers.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
    headers.insert(hyper::header::VARY, HeaderValue::from_static("Origin"));
    reply
}

/// Answers a request; `browser`: from a page of a registered site.
async fn route(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr, browser: bool) -> Reply {
    // Behind a dual-stack listener (`--listen [::]:7700`) IPv4 clients arrive v4-mapped: they are IPv4
    // sources, networks and nodes.
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let result = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/resolve") => resolve(&app, &query, peer.ip(), browser).await,
        (&Method::GET, "/v1/origins") => ok(&app.cfg.origins),
        // A batch of receipts with their tickets: larger than other signed messages.
        (&Method::POST, "/v1/credits/redeem") => match json_body::<Signed>(req, MAX_REDEEM_BODY).await {
            Ok(signed) => app.redeem(&signed, peer.ip()).await.and_then(|r| ok(&r)),
            Err(e) => Err(e),
        },
        // Another replica passing on receipts of shards this one sequences: the batch, wrapped.
        (&Method::POST, FORWARD_PATH) => {
            match json_body::<Signed>(req, redeem_body_bound(MAX_REDEEM_BODY) + 4096).await {
                Ok(signed) => app.redeem_forwarded(&signed).and_then(|r| ok(&r)),
                Err(e) => Err(e),
            }
        }
        (&Method::GET, "/v1/credits") => app.ledger.all_credits().map_err(ledger_failure).and_then(|c| ok(&c)),
        (&Method::GET, "/v1/ledger/head") => ledger_head(&app, &query),
        (&Method::GET, "/v1/ledger/leaf") => required(&query, &["index"]).and_then(|[i]| {
            let leaf = app.ledger.leaf(shard(&app, &query)?, i).map_err(ledger_failure)?;
            ok(&leaf.ok_or(AppError::NotFound { what: "no such leaf".into(), retryable: false })?)
        }),
        (&Method::GET, "/v1/ledger/inclusion") => required(&query, &["index", "size"]).and_then(|[i, n]| {
            let proof = app.ledger.inclusion(shard(&app, &query)?, i, n).map_err(ledger_failure)?;
            ok(&serde_json::json!({ "proof": proof }))
        }),
        (&Method::GET, "/v1/ledger/records") => ledger_records(&app, &query),
        (&Method::GET, "/v1/ledger/consistency") => required(&query, &["first", "second"]).and_then(|[a, b]| {
            let proof = app.ledger.consistency(shard(&app, &query)?, a, b).map_err(ledger_failure)?;
            ok(&serde_json::json!({ "proof": proof }))
        }),
        (&Method::GET, p) if p.starts_with("/v1/nodes/") && p.ends_with("/credits") => {
            let id = p.trim_start_matches("/v1/nodes/").trim_end_matches("/credits");
            parse_id(id).and_then(|id| app.ledger.statement(&id, 100).map_err(ledger_failure)).and_then(|s| ok(&s))
        }
        (&Method::POST, "/v1/nodes/register") => match signed_body(req).await {
            Ok(signed) => app.register(&signed, peer).await.and_then(|r| ok(&r)),
            Err(e) => Err(e),
        },
        (&Method::POST, "/v1/nodes/heartbeat") => match signed_body(req).await {
            Ok(signed) => app.heartbeat(&signed, peer.ip()).await.and_then(|r| ok(&r)),
            Err(e) => Err(e),
        },
        (&Method::POST, "/v1/reports") => match json_body::<ClientReport>(req, MAX_BODY).await {
            Ok(report) => app.client_report(&report, peer.ip()).and_then(|()| ok(&serde_json::json!({"ok": true}))),
            Err(e) => Err(e),
        },
        (&Method::GET, "/v1/stats") => ok(&app.stats()),
        (&Method::GET, "/metrics") => Ok(http_server::metrics(app.metrics_text())),
        (&Method::GET, "/healthz") => ok(&serde_json::json!({"ok": true})),
        (&Method::GET, "/readyz") => Ok(readyz(&app)),
        (&Method::GET, "/") => Ok(reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD_HTML)),
        (&Method::GET, "/assets/uplot.min.js") => {
            Ok(reply(StatusCode::OK, "text/javascript", Bytes::from_static(UPLOT_JS)))
        }
        (&Method::GET, "/assets/uplot.min.css") => Ok(reply(StatusCode::OK, "text/css", Bytes::from_static(UPLOT_CSS))),
        (&Method::GET, "/v1/dashboard/summary") => ok(&app.summary()),
        (&Method::GET, "/v1/dashboard/nodes") => {
            let admin = app.check_admin(bearer(&req)).is_ok();
            nodes_page(&app, &query, admin)
        }
        (&Method::GET, "/v1/dashboard/stream") => stream(&app, peer.ip()),
        (&Method::GET, "/v1/admin/blocked") => app.check_admin(bearer(&req)).and_then(|()| ok(&app.registry.blocked())),
        (&Method::PUT, "/v1/admin/manifests") => match app.check_admin(bearer(&req)) {
            Ok(()) => match json_body(req, MAX_MANIFEST_JSON).await {
                Ok(manifest) => app.publish(manifest).await.and_then(|p| ok(&p)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        (&Method::POST, p) if p.starts_with("/v1/admin/nodes/") => {
            app.check_admin(bearer(&req)).and_then(|()| admin_node_action(&app, p))
        }
        _ => Err(AppError::NotFound { what: format!("no such endpoint: {path}"), retryable: false }),
    };
    result.unwrap_or_else(|e| error_reply(&e))
}

fn ok<T: Serialize>(body: &T) -> Result<Reply, AppError> {
    Ok(json(StatusCode::OK, body))
}

/// The one place an [`AppError`] becomes a status code and an [`ApiError`] body.
fn error_reply(e: &AppError) -> Reply {
    let (status, code) = match e {
        AppError::BadRequest(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        AppError::UnknownOrigin { .. } => (StatusCode::FORBIDDEN, ErrorCode::UnknownOrigin),
        AppError::RateLimited(_) | AppError::StreamsPerSource { .. } => {
            (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited)
        }
        AppError::NodeRejected(_) | AppError::UnknownNode | AppError::NotAdmin => {
            (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized)
        }
        AppError::AdminOff => (StatusCode::FORBIDDEN, ErrorCode::Unauthorized),
        AppError::UnknownWebOrigin { .. } => (StatusCode::FORBIDDEN, ErrorCode::UnknownWebOrigin),
        AppError::RegistryFull(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::RegistryFull),
        AppError::Ingest(IngestError::Origin(OriginError::Status { status: 404 | 410, .. })) => {
            (StatusCode::NOT_FOUND, ErrorCode::OriginNotFound)
        }
        AppError::Ingest(IngestError::Origin(OriginError::TooLarge { .. })) => {
            (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge)
        }
        AppError::Ingest(IngestError::Origin(_) | IngestError::ChangedDuringIngest { .. }) => {
            (StatusCode::BAD_GATEWAY, ErrorCode::OriginError)
        }
        AppError::Ingest(IngestError::BadPublished { .. }) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        AppError::Ingest(IngestError::Busy) | AppError::StreamsFull => {
            (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Internal)
        }
        // Another replica sequences the ledger: a node with the cell's URLs moves on to the next one.
        AppError::Ledger(LedgerError::NotSequencer { .. }) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Internal),
        AppError::Ingest(IngestError::Db(_)) | AppError::Ledger(_) | AppError::Db(_) => {
            (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal)
        }
        AppError::NotFound { .. } => (StatusCode::NOT_FOUND, ErrorCode::BadRequest),
        AppError::NotReady => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Internal),
    };
    json(status, &ApiError { error: code, message: e.to_string(), retryable: e.is_retryable() })
}

/// Whether this tracker holds the whole registry: always alone; as a replica of a cell, once it has been
/// on the bus for a heartbeat interval (load balancers send it traffic from then on).
fn readyz(app: &App) -> Reply {
    let reason = match app.bus.get() {
        Some(bus) => bus.not_ready_reason(),
        None if !app.cfg.nats.is_empty() => Some("not on the cell's bus".into()),
        None => None,
    };
    match reason {
        None => json(StatusCode::OK, &serde_json::json!({"ready": true})),
        Some(reason) => json(StatusCode::SERVICE_UNAVAILABLE, &serde_json::json!({"ready": false, "reason": reason})),
    }
}

fn ledger_failure(e: LedgerError) -> AppError {
    tracing::error!(error = %e, "ledger failure");
    AppError::Ledger(e)
}

fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
}

fn query_u64(query: &str, key: &str) -> Option<u64> {
    query_pairs(query).find(|(k, _)| k == key).and_then(|(_, v)| v.parse().ok())
}

/// The numeric query parameters `keys`, all required.
fn required<const N: usize>(query: &str, keys: &[&str; N]) -> Result<[u64; N], AppError> {
    let mut values = [0u64; N];
    for (value, key) in values.iter_mut().zip(keys) {
        *value = query_u64(query, key).ok_or_else(|| {
            let wanted: Vec<String> = keys.iter().map(|k| format!("{k}=N")).collect();
            AppError::BadRequest(format!("{} required", wanted.join("&")))
        })?;
    }
    Ok(values)
}

fn parse_id(id: &str) -> Result<NodeId, AppError> {
    id.parse::<NodeId>().map_err(|e| AppError::BadRequest(e.to_string()))
}

/// The bearer token of the request, if any.
fn bearer(req: &Request<Incoming>) -> Option<&str> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// A JSON request body of at most `limit` bytes.
async fn json_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>, limit: usize) -> Result<T, AppError> {
    let body = http_server::read_body(req, limit).await.map_err(|e| AppError::BadRequest(e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| AppError::BadRequest(format!("malformed request body: {e}")))
}

async fn signed_body(req: Request<Incoming>) -> Result<Signed, AppError> {
    json_body::<Signed>(req, MAX_BODY).await
}

/// `GET /v1/resolve?url=U[&client_key=K][&stale=C][&from=BYTE]`.
async fn resolve(app: &App, query: &str, peer: IpAddr, browser: bool) -> Result<Reply, AppError> {
    let (mut url, mut stale, mut client_key, mut from) = (None, None, None, 0);
    let mut families = Families::default();
    for (k, v) in query_pairs(query) {
        let parsed = match k.as_str() {
            "url" => {
                url = Some(v);
                Ok(())
            }
            "client_key" => parse_id(&v).map(|key| client_key = Some(key)),
            "stale" => {
                v.parse::<ContentId>().map(|id| stale = Some(id)).map_err(|e| AppError::BadRequest(e.to_string()))
            }
            "from" => {
                v.parse().map(|f| from = f).map_err(|_| AppError::BadRequest(format!("from={v} is not a byte offset")))
            }
            "families" => Families::parse(&v).map(|f| families = f).map_err(AppError::BadRequest),
            _ => Ok(()),
        };
        if let Err(e) = parsed {
            return app.resolve_refused(e);
        }
    }
    let Some(url) = url else {
        return app.resolve_refused(AppError::BadRequest("missing query parameter url".into()));
    };
    ok(&app.resolve(&url, stale, client_key, from, peer, Reach { families, browser }).await?)
}

/// `?shard=S` of the `/v1/ledger/*` endpoints: the ledger shard asked about (0 when not given, so nodes
/// from before shards read the only log there was).
fn shard(app: &App, query: &str) -> Result<u32, AppError> {
    let Some((_, v)) = query_pairs(query).find(|(k, _)| k == "shard") else { return Ok(0) };
    match v.parse::<u32>() {
        Ok(s) if s < app.ledger.shard_count() => Ok(s),
        _ => Err(AppError::NotFound {
            what: format!("no ledger shard {v:?}: this ledger has {}", app.ledger.shard_count()),
            retryable: false,
        }),
    }
}

/// `GET /v1/ledger/head[?epoch=E][&shard=S]`: the shard's signed head now, or the one that sealed epoch E.
fn ledger_head(app: &App, query: &str) -> Result<Reply, AppError> {
    let shard = shard(app, query)?;
    match query_u64(query, "epoch") {
        None => ok(&app.ledger.head(shard).map_err(ledger_failure)?),
        Some(e) => match app.ledger.epoch_head(shard, e).map_err(ledger_failure)? {
            Some(h) => ok(&h),
            None => Err(AppError::NotFound { what: format!("epoch {e} is not sealed yet"), retryable: true }),
        },
    }
}

/// `GET /v1/ledger/records?size=N&index=I,J,…[&shard=S]`: a shard's leaves with their inclusion proofs in
/// its tree of size N.
fn ledger_records(app: &App, query: &str) -> Result<Reply, AppError> {
    let shard = shard(app, query)?;
    let size = query_u64(query, "size").ok_or_else(|| AppError::BadRequest("missing query parameter size".into()))?;
    let list = query_pairs(query).find(|(k, _)| k == "index").map(|(_, v)| v).unwrap_or_default();
    let indices = list
        .split(',')
        .filter(|i| !i.is_empty())
        .map(|i| i.parse::<u64>().map_err(|_| AppError::BadRequest(format!("index {i:?} is not a leaf index"))))
        .collect::<Result<Vec<u64>, AppError>>()?;
    if indices.len() > MAX_RECORDS {
        return Err(AppError::BadRequest(format!("at most {MAX_RECORDS} indices")));
    }
    let records = app.ledger.records(shard, &indices, size).map_err(ledger_failure)?;
    ok(&serde_json::json!({ "records": records }))
}

fn nodes_page(app: &App, query: &str, admin: bool) -> Result<Reply, AppError> {
    let (mut page, mut per_page, mut sort) = (0usize, 50usize, SortBy::State);
    for (k, v) in query_pairs(query) {
        let bad = |what: &str| AppError::BadRequest(format!("bad {what}: {v:?}"));
        match k.as_str() {
            "page" => page = v.parse().map_err(|_| bad("page"))?,
            "per_page" => per_page = v.parse().map_err(|_| bad("per_page"))?,
            "sort" => sort = SortBy::parse(&v).ok_or_else(|| bad("sort (id, state, bytes, rate, last_seen)"))?,
            _ => {}
        }
    }
    ok(&app.nodes_page(page, per_page, sort, admin))
}

/// `POST /v1/admin/nodes/{id}/block` and `…/unblock`.
fn admin_node_action(app: &App, path: &str) -> Result<Reply, AppError> {
    let rest = path.trim_start_matches("/v1/admin/nodes/");
    let (id, action) = rest.split_once('/').unwrap_or((rest, ""));
    let id = parse_id(id)?;
    let block = match action {
        "block" => true,
        "unblock" => false,
        _ => return Err(AppError::NotFound { what: "action must be block or unblock".into(), retryable: false }),
    };
    ok(&app.set_blocked(id, block)?)
}

/// Live summaries as server-sent events, one per sample, for a bounded number of dashboards (and of them
/// a few per source, so one host cannot take them all).
fn stream(app: &Arc<App>, peer: IpAddr) -> Result<Reply, AppError> {
    let slot = app.hold_stream(peer)?;
    let (tx, resp) = http_server::event_stream(4);
    let app = app.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            let data = serde_json::to_string(&app.summary()).expect("summary serialises");
            // A reader that fell behind skips a summary; one that left ends the stream.
            match tx.try_send(http_server::sse_event("summary", &data)) {
                Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    });
    Ok(resp)
}
