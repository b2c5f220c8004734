//! Attack load generator for `scripts/bench/under-attack.sh`, and the legitimate workload it is measured
//! against. Both run on loopback for a fixed time and print one JSON line on stdout.
//!
//! `legit`: viewers fetching objects through the fog with the real client (every byte verified), each
//! fetch a fresh client, like a new viewer; reports fetch rate and bytes by source (fog / origin).
//!
//! `attack`: a mixed attack from one source address, every class bounded in count and rate (`0` turns a
//! class off): QUIC connection flood against one node, forged receipt-only requests, chunk requests for
//! random hashes with an origin hint (anonymous fills), slow request bodies to the tracker, junk
//! registrations and redeems from throwaway keys, resolves of query-string variants (ingest flood).
//! Each is done the way `testkit/tests/it/adversarial.rs` does it; the summary counts what was sent and how
//! the target answered.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ed25519_dalek::SigningKey;
use fog_client::{ClientConfig, FetchOptions, FogClient};
use fog_net::chunk::{self, ChunkError, Deadlines};
use fog_net::transport;
use fog_proto::api::{now_ms, NodeContact, Register, Resolve, Signed, KIND_REGISTER};
use fog_proto::credits::{
    Commitment, Digest, Receipt, RedeemBatch, SessionId, TicketId, KIND_COMMITMENT, KIND_REDEEM, MAX_CHAIN,
};
use fog_proto::wire::{ChunkRequest, OriginHint};
use fog_proto::{ChunkHash, NodeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
#[command(about = "Legitimate fog workload and bounded loopback attacks for scripts/bench/under-attack.sh")]
struct Args {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Viewers fetching URLs through the fog (round-robin), each fetch with a fresh client.
    Legit {
        #[arg(long)]
        tracker: String,
        /// Fetches under way at once.
        #[arg(long, default_value_t = 4)]
        viewers: usize,
        /// Local address of the viewers' QUIC endpoints.
        #[arg(long, default_value = "127.0.0.1")]
        bind: IpAddr,
        /// Fetches a second over all viewers (like players at a bitrate); 0: each viewer fetches back to
        /// back, as fast as the system allows.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(required = true)]
        urls: Vec<String>,
    },
    /// A mixed attack from one source address; every class bounded by count and rate.
    Attack(Box<AttackArgs>),
}

#[derive(clap::Args, Debug)]
struct AttackArgs {
    #[arg(long)]
    tracker: String,
    /// An object under the registered origin: its nodes are attacked, its URL is used in origin hints and
    /// query-string variants.
    #[arg(long)]
    url: String,
    /// Source address of every attack packet and connection (another loopback address is another source
    /// to the per-source limits: the attacker is one host, not the viewers' host).
    #[arg(long, default_value = "127.0.0.2")]
    bind: IpAddr,
    /// Handshake-only QUIC connections held open against the first node of the object (at most).
    #[arg(long, default_value_t = 400)]
    conns: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 50.0)]
    conn_rate: f64,
    /// Receipt-only requests with forged receipts claiming a PayWord index of 2^20 (to every node).
    #[arg(long, default_value_t = 4000)]
    receipts: u64,
    #[arg(long, default_value_t = 200.0)]
    receipt_rate: f64,
    /// Chunk requests for random hashes with an origin hint under the registered origin (to every node).
    #[arg(long, default_value_t = 2000)]
    fills: u64,
    #[arg(long, default_value_t = 100.0)]
    fill_rate: f64,
    /// Connections to the tracker sending a request body one byte a second (reconnecting when cut off).
    #[arg(long, default_value_t = 512)]
    slow_bodies: u64,
    /// Registrations from throwaway keys (their QUIC address answers nothing).
    #[arg(long, default_value_t = 400)]
    registrations: u64,
    #[arg(long, default_value_t = 20.0)]
    registration_rate: f64,
    /// Redeem batches of forged receipts, from the junk-registered keys and from unregistered ones.
    #[arg(long, default_value_t = 400)]
    redeems: u64,
    #[arg(long, default_value_t = 20.0)]
    redeem_rate: f64,
    /// Resolves of query-string variants of `url` (each a new object to ingest).
    #[arg(long, default_value_t = 400)]
    variants: u64,
    #[arg(long, default_value_t = 20.0)]
    variant_rate: f64,
    /// Run only these classes (repeatable; names as in the summary), the others' counts set to 0.
    #[arg(long)]
    only: Vec<String>,
}

/// What one attack class did: requests sent and the target's answers, by kind.
#[derive(Default)]
struct Class {
    sent: AtomicU64,
    outcomes: Mutex<BTreeMap<String, u64>>,
}

impl Class {
    fn count(&self, outcome: impl Into<String>) {
        *self.outcomes.lock().expect("outcomes lock").entry(outcome.into()).or_default() += 1;
    }

    fn json(&self) -> serde_json::Value {
        let outcomes = self.outcomes.lock().expect("outcomes lock").clone();
        serde_json::json!({ "sent": self.sent.load(Ordering::Relaxed), "outcomes": outcomes })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Two workers, like the other load generators: the machine's cores are shared with the processes
    // under test.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut out = match args.mode {
        Mode::Legit { tracker, viewers, bind, rate, urls } => {
            rt.block_on(legit(tracker, viewers, bind, rate, urls, end))?
        }
        Mode::Attack(a) => rt.block_on(attack(*a, end))?,
    };
    out["seconds"] = args.seconds.into();
    // Own CPU, so a reader can tell how much of the shared machine this side took.
    out["own_cpu_s"] = own_cpu_seconds().into();
    println!("{out}");
    Ok(())
}

/// User + system CPU seconds of this process so far (`/proc/self/stat`, clock ticks of 1/100 s).
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 of what follows ')'.
    ((ticks(11) + ticks(12)) / 100.0 * 100.0).round() / 100.0
}

#[derive(Default)]
struct LegitTally {
    fetches: u64,
    errors: u64,
    bytes: u64,
    fog_bytes: u64,
    origin_bytes: u64,
    node_failures: u64,
    fallbacks: BTreeMap<String, u64>,
    error_kinds: BTreeMap<String, u64>,
    latencies_ms: Vec<f64>,
    resolve_ms: Vec<f64>,
}

async fn legit(
    tracker: String,
    viewers: usize,
    bind: IpAddr,
    rate: f64,
    urls: Vec<String>,
    end: Instant,
) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let tally = Arc::new(Mutex::new(LegitTally::default()));
    let urls = Arc::new(urls);
    let mut tasks = JoinSet::new();
    for v in 0..viewers {
        let (tracker, urls, tally) = (tracker.clone(), urls.clone(), tally.clone());
        tasks.spawn(async move {
            let mut i = v;
            // Paced viewers start one after the other and keep their own cadence; a late fetch delays the
            // next one rather than bunching them up.
            let mut pace = (rate > 0.0).then(|| {
                let period = Duration::from_secs_f64(viewers as f64 / rate);
                let first = tokio::time::Instant::now() + period.mul_f64(v as f64 / viewers as f64);
                let mut p = tokio::time::interval_at(first, period);
                p.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                p
            });
            while Instant::now() < end {
                if let Some(p) = &mut pace {
                    p.tick().await;
                    if Instant::now() >= end {
                        break;
                    }
                }
                let url = &urls[i % urls.len()];
                i += 1;
                let cfg = ClientConfig {
                    tracker: Some(tracker.clone()),
                    bind: SocketAddr::new(bind, 0),
                    ..Default::default()
                };
                let t0 = Instant::now();
                let mut resolve_ms = None;
                let result = match FogClient::new(cfg) {
                    // Resolve, then fetch, timed apart (where an attack slows a fetch down); a failed resolve
                    // goes the real client's whole way (retry, origin fallback) instead.
                    Ok(client) => match client.resolve(url, None, 0).await {
                        Ok(resolved) => {
                            resolve_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
                            let (mut out, mut written) = (Vec::new(), 0);
                            client.fetch_resolved(&resolved, FetchOptions::default(), &mut out, &mut written).await
                        }
                        Err(_) => client.get(url).await.map(|(_, report)| report),
                    },
                    Err(e) => Err(e),
                };
                let mut t = tally.lock().expect("tally lock");
                match result {
                    Ok(r) => {
                        t.fetches += 1;
                        t.bytes += r.bytes;
                        t.fog_bytes += r.fog_bytes;
                        t.origin_bytes += r.origin_bytes;
                        t.node_failures += r.node_failures;
                        for (reason, n) in r.fallbacks {
                            *t.fallbacks.entry(reason.to_string()).or_default() += n;
                        }
                        if let Some(why) = r.tracker_unreachable {
                            *t.error_kinds.entry(format!("tracker unreachable: {}", short(&why))).or_default() += 1;
                        }
                        t.latencies_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                        t.resolve_ms.extend(resolve_ms);
                    }
                    Err(e) => {
                        t.errors += 1;
                        *t.error_kinds.entry(short(&e.to_string())).or_default() += 1;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = started.elapsed().as_secs_f64();
    let mut t = std::mem::take(&mut *tally.lock().expect("tally lock"));
    t.latencies_ms.sort_by(f64::total_cmp);
    t.resolve_ms.sort_by(f64::total_cmp);
    let pct_of = |l: &[f64], p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or(0.0)
    };
    let pct = |p: f64| pct_of(&t.latencies_ms, p);
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    Ok(serde_json::json!({
        "mode": "legit",
        "viewers": viewers,
        "rate": rate,
        "fetches": t.fetches,
        "errors": t.errors,
        "bytes": t.bytes,
        "fog_bytes": t.fog_bytes,
        "origin_bytes": t.origin_bytes,
        "fog_share": if t.bytes > 0 { round2(t.fog_bytes as f64 / t.bytes as f64 * 100.0) / 100.0 } else { 0.0 },
        "mib_per_s": round2(t.bytes as f64 / f64::from(1u32 << 20) / secs),
        "fetches_per_s": round2(t.fetches as f64 / secs),
        "p50_ms": round2(pct(0.5)),
        "p99_ms": round2(pct(0.99)),
        "resolve_p50_ms": round2(pct_of(&t.resolve_ms, 0.5)),
        "resolve_p99_ms": round2(pct_of(&t.resolve_ms, 0.99)),
        "node_failures": t.node_failures,
        "fallbacks": t.fallbacks,
        "error_kinds": t.error_kinds,
    }))
}

/// The first line of an error, cut short: summaries group errors by it.
fn short(s: &str) -> String {
    s.lines().next().unwrap_or("").chars().take(100).collect()
}

/// Runs `f(i)` for i in 0..count, `rate` a second, at most `in_flight` at once, until `end`; then waits up
/// to 5 s for what is still under way.
async fn paced<F, Fut>(class: Arc<Class>, count: u64, rate: f64, in_flight: usize, end: Instant, f: F)
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    if count == 0 || rate <= 0.0 {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    // A late tick must not turn into a burst: the rate is a bound.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        ticker.tick().await;
        if Instant::now() >= end {
            break;
        }
        let Ok(permit) = slots.clone().acquire_owned().await else { break };
        class.sent.fetch_add(1, Ordering::Relaxed);
        let job = f(i);
        tasks.spawn(async move {
            job.await;
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
    }
    let grace = tokio::time::sleep_until((end.max(Instant::now()) + Duration::from_secs(5)).into());
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { break },
            _ = &mut grace => {
                let left = tasks.len() as u64;
                tasks.abort_all();
                for _ in 0..left {
                    class.count("unfinished");
                }
                break;
            }
        }
    }
}

/// Pseudo-random 32 bytes: BLAKE3 of a seed and a counter (no RNG crate needed; unpredictability does not
/// matter here, only that hashes and keys are fresh).
fn fresh32(seed: u64, label: &str, i: u64) -> [u8; 32] {
    ChunkHash::of(format!("{seed}/{label}/{i}").as_bytes()).0
}

fn fresh_session(seed: u64, label: &str, i: u64) -> SessionId {
    let mut session = [0u8; 16];
    session.copy_from_slice(&fresh32(seed, label, i)[..16]);
    SessionId(session)
}

fn node_error(e: &ChunkError) -> String {
    match e {
        ChunkError::Refused { status, .. } => format!("{status:?}"),
        ChunkError::Timeout(_) => "timeout".into(),
        ChunkError::Stream(m) => format!("stream: {}", short(&m.to_string())),
        ChunkError::Protocol(m) => format!("protocol: {}", short(&m.to_string())),
        ChunkError::Interrupted { .. } => "interrupted".into(),
        ChunkError::Rejected { .. } => "rejected".into(),
    }
}

/// What every attack class shares.
struct Target {
    seed: u64,
    bind: IpAddr,
    tracker: String,
    url: String,
    http: reqwest::Client,
    endpoint: quinn::Endpoint,
    nodes: Vec<NodeContact>,
    manifest: fog_proto::Manifest,
    /// One connection per node, for receipts and fills.
    conns: Vec<quinn::Connection>,
    /// Keys whose junk registration the tracker accepted, for redeems.
    registered: Mutex<Vec<SigningKey>>,
    end: Instant,
}

const CLASSES: [&str; 7] = [
    "quic_conn_flood",
    "forged_receipts",
    "anonymous_fills",
    "slow_bodies",
    "junk_registrations",
    "junk_redeems",
    "ingest_variants",
];

async fn attack(mut a: AttackArgs, end: Instant) -> anyhow::Result<serde_json::Value> {
    if let Some(bad) = a.only.iter().find(|c| !CLASSES.contains(&c.as_str())) {
        bail!("unknown class {bad:?}; classes: {}", CLASSES.join(", "));
    }
    if !a.only.is_empty() {
        let on = |name: &str, n: u64| if a.only.iter().any(|c| c == name) { n } else { 0 };
        (a.conns, a.receipts, a.fills, a.slow_bodies) = (
            on("quic_conn_flood", a.conns),
            on("forged_receipts", a.receipts),
            on("anonymous_fills", a.fills),
            on("slow_bodies", a.slow_bodies),
        );
        (a.registrations, a.redeems, a.variants) = (
            on("junk_registrations", a.registrations),
            on("junk_redeems", a.redeems),
            on("ingest_variants", a.variants),
        );
    }
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64;
    let http = reqwest::Client::builder()
        .local_address(a.bind)
        .timeout(Duration::from_secs(10))
        // A refused body may close its connection; each request on its own keeps the counts simple.
        .pool_max_idle_per_host(0)
        .build()
        .context("HTTP client")?;
    let tracker = a.tracker.trim_end_matches('/').to_string();
    let resolved: Resolve = http
        .get(format!("{tracker}/v1/resolve"))
        .query(&[("url", &a.url)])
        .send()
        .await
        .context("resolve")?
        .error_for_status()
        .context("resolve")?
        .json()
        .await
        .context("resolve json")?;
    if resolved.nodes.is_empty() {
        bail!("the tracker scheduled no node for {}", a.url);
    }
    let endpoint = transport::client_endpoint(SocketAddr::new(a.bind, 0))?;
    // Opened before the flood takes the attacker's share of the first node's connections.
    let mut conns = Vec::new();
    for n in &resolved.nodes {
        let conn = transport::connect(&endpoint, n.id, n.addr, Duration::from_secs(30), Duration::from_secs(5))
            .await
            .map_err(anyhow::Error::msg)?;
        conns.push(conn);
    }
    let t = Arc::new(Target {
        seed,
        bind: a.bind,
        tracker,
        url: a.url.clone(),
        http,
        endpoint,
        nodes: resolved.nodes,
        manifest: resolved.manifest,
        conns,
        registered: Mutex::new(Vec::new()),
        end,
    });
    let classes: BTreeMap<&str, Arc<Class>> = CLASSES.into_iter().map(|n| (n, Arc::new(Class::default()))).collect();
    let class = |n: &str| classes[n].clone();

    let mut all = JoinSet::new();
    let (tc, c) = (t.clone(), class("quic_conn_flood"));
    all.spawn(paced(c.clone(), a.conns, a.conn_rate, a.conns as usize, end, move |_| {
        conn_flood(tc.clone(), c.clone())
    }));
    let (tc, c) = (t.clone(), class("forged_receipts"));
    all.spawn(paced(c.clone(), a.receipts, a.receipt_rate, 64, end, move |i| forged_receipt(tc.clone(), c.clone(), i)));
    let (tc, c) = (t.clone(), class("anonymous_fills"));
    all.spawn(paced(c.clone(), a.fills, a.fill_rate, 64, end, move |i| anonymous_fill(tc.clone(), c.clone(), i)));
    // Slow senders connect at 100 a second; each then keeps one connection dribbling until the end.
    let (tc, c) = (t.clone(), class("slow_bodies"));
    all.spawn(paced(c.clone(), a.slow_bodies, 100.0, a.slow_bodies as usize, end, move |_| {
        slow_body(tc.clone(), c.clone())
    }));
    let (tc, c) = (t.clone(), class("junk_registrations"));
    all.spawn(paced(c.clone(), a.registrations, a.registration_rate, 64, end, move |i| {
        junk_registration(tc.clone(), c.clone(), i)
    }));
    let (tc, c) = (t.clone(), class("junk_redeems"));
    all.spawn(paced(c.clone(), a.redeems, a.redeem_rate, 64, end, move |i| junk_redeem(tc.clone(), c.clone(), i)));
    let (tc, c) = (t.clone(), class("ingest_variants"));
    all.spawn(paced(c.clone(), a.variants, a.variant_rate, 64, end, move |i| ingest_variant(tc.clone(), c.clone(), i)));
    while all.join_next().await.is_some() {}

    let mut out = serde_json::json!({ "mode": "attack", "bind": a.bind.to_string() });
    for (name, c) in &classes {
        out[*name] = c.json();
    }
    Ok(out)
}

/// Class 1: a handshake, then nothing: the connection holds one of the node's slots until the end.
async fn conn_flood(t: Arc<Target>, c: Arc<Class>) {
    let n = &t.nodes[0];
    match transport::connect(&t.endpoint, n.id, n.addr, Duration::from_secs(30), Duration::from_secs(5)).await {
        Ok(conn) => {
            c.count("connected");
            tokio::select! {
                _ = tokio::time::sleep_until(t.end.into()) => c.count("held_to_end"),
                _ = conn.closed() => c.count("closed_by_node"),
            }
        }
        // quinn reports a refused connection as the peer closing or refusing it.
        Err(transport::ConnectError::Timeout { .. }) => c.count("handshake_timeout"),
        Err(e) => c.count(format!("refused: {}", short(&e.to_string()))),
    }
}

/// Class 2: a receipt-only request on a connection that was served nothing, under a fresh throwaway key,
/// claiming the longest chain there is.
async fn forged_receipt(t: Arc<Target>, c: Arc<Class>, i: u64) {
    let slot = (i % t.nodes.len() as u64) as usize;
    let key = SigningKey::from_bytes(&fresh32(t.seed, "receipt-key", i));
    let commitment = Commitment {
        session: fresh_session(t.seed, "session", i),
        ticket_id: TicketId(fresh32(t.seed, "ticket", i)),
        node: t.nodes[slot].id,
        anchor: Digest(fresh32(t.seed, "anchor", i)),
        length: MAX_CHAIN,
        epoch: 0,
    };
    let receipt = Receipt {
        commitment: Signed::sign(&key, KIND_COMMITMENT, &commitment),
        index: MAX_CHAIN,
        preimage: Digest(fresh32(t.seed, "preimage", i)),
    };
    let req = ChunkRequest::receipt_only(serde_json::to_vec(&receipt).expect("receipt json"));
    let deadlines = Deadlines { first_byte: Duration::from_secs(10), stall: Duration::from_secs(10) };
    // The node acknowledges every receipt the same way; whether it kept it shows in its status page.
    match chunk::request(&t.conns[slot], &req, 0, deadlines, None).await {
        Ok(_) => c.count("acknowledged"),
        Err(e) => c.count(node_error(&e)),
    }
}

/// Class 3: a chunk nobody has, with an origin hint under the registered origin: the node may pull the span from
/// the origin, and the bytes never match.
async fn anonymous_fill(t: Arc<Target>, c: Arc<Class>, i: u64) {
    let slot = (i % t.nodes.len() as u64) as usize;
    let index = (i / t.nodes.len() as u64 % t.manifest.chunks.len() as u64) as usize;
    let (offset, length) = t.manifest.chunk_span(index);
    // Built from `receipt_only` so that fields the protocol grows (a ticket, say) stay unset: anonymous.
    let mut req = ChunkRequest::receipt_only(Vec::new());
    req.receipt = None;
    req.hash = ChunkHash(fresh32(t.seed, "chunk", i));
    req.origin = Some(OriginHint { url: t.url.clone(), offset, length });
    let deadlines = Deadlines { first_byte: Duration::from_secs(10), stall: Duration::from_secs(10) };
    match chunk::request(&t.conns[slot], &req, length, deadlines, None).await {
        Ok(_) => c.count("served"),
        Err(e) => c.count(node_error(&e)),
    }
}

/// Class 4: a request body announced at 60 000 bytes and sent one byte a second; when the tracker cuts it off,
/// again on a new connection, until the end.
async fn slow_body(t: Arc<Target>, c: Arc<Class>) {
    let addr = t.tracker.trim_start_matches("http://");
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        c.count("tracker address is not IP:PORT");
        return;
    };
    let head = "POST /v1/nodes/heartbeat HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n";
    let mut first = true;
    while Instant::now() < t.end {
        if !first {
            c.sent.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let socket = match tokio::net::TcpSocket::new_v4().and_then(|s| s.bind(SocketAddr::new(t.bind, 0)).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => return c.count(format!("socket: {e}")),
        };
        let stream = match socket.connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                c.count(format!("connect: {}", e.kind()));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        if wr.write_all(head.as_bytes()).await.is_err() {
            c.count("closed_at_headers");
            continue;
        }
        let mut buf = vec![0u8; 4096];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(t.end.into()) => {
                    c.count("open_at_end");
                    return;
                }
                _ = tick.tick() => {
                    if wr.write_all(b" ").await.is_err() {
                        c.count("closed_while_sending");
                        break;
                    }
                }
                n = rd.read(&mut buf) => {
                    let answer = String::from_utf8_lossy(&buf[..n.unwrap_or(0)]).to_string();
                    let status = answer.split_whitespace().nth(1).unwrap_or("");
                    c.count(if answer.is_empty() { "closed_by_tracker".to_string() } else { format!("cut_off_{status}") });
                    break;
                }
            }
        }
    }
}

/// Class 5a: a registration signed by a fresh key, naming a QUIC address where nothing answers (each costs the
/// tracker a dial-back).
async fn junk_registration(t: Arc<Target>, c: Arc<Class>, i: u64) {
    let key = SigningKey::from_bytes(&fresh32(t.seed, "node-key", i));
    let reg = Register {
        quic_addr: SocketAddr::new(t.bind, 9),
        cache_capacity: 1 << 30,
        upload_limit: None,
        version: "attack".into(),
        timestamp_ms: now_ms(),
        joining: false,
        region: None,
    };
    let body = Signed::sign(&key, KIND_REGISTER, &reg);
    match t.http.post(format!("{}/v1/nodes/register", t.tracker)).json(&body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            c.count(status.to_string());
            if status == 200 {
                t.registered.lock().expect("registered lock").push(key);
            }
        }
        Err(e) => c.count(if e.is_timeout() { "timeout".into() } else { "error".to_string() }),
    }
}

/// Class 5b: a redeem batch of forged receipts (each claiming 2^20 chunks), signed by a junk-registered key
/// (every other batch, once there are some) or by a fresh one the tracker never saw.
async fn junk_redeem(t: Arc<Target>, c: Arc<Class>, i: u64) {
    let registered = {
        let keys = t.registered.lock().expect("registered lock");
        if i.is_multiple_of(2) && !keys.is_empty() {
            Some(keys[(i / 2) as usize % keys.len()].clone())
        } else {
            None
        }
    };
    let which = if registered.is_some() { "registered_key" } else { "fresh_key" };
    let key = registered.unwrap_or_else(|| SigningKey::from_bytes(&fresh32(t.seed, "redeem-key", i)));
    let node: NodeId = key.verifying_key().into();
    let receipts = (0..8u64)
        .map(|j| {
            let client = SigningKey::from_bytes(&fresh32(t.seed, "redeem-client", i * 8 + j));
            let commitment = Commitment {
                session: fresh_session(t.seed, "redeem-session", i * 8 + j),
                ticket_id: TicketId(fresh32(t.seed, "redeem-ticket", i * 8 + j)),
                node,
                anchor: Digest(fresh32(t.seed, "redeem-anchor", i * 8 + j)),
                length: MAX_CHAIN,
                epoch: 0,
            };
            Receipt {
                commitment: Signed::sign(&client, KIND_COMMITMENT, &commitment),
                index: MAX_CHAIN,
                preimage: Digest(fresh32(t.seed, "redeem-preimage", i * 8 + j)),
            }
        })
        .collect();
    let batch = RedeemBatch { timestamp_ms: now_ms(), receipts, tickets: Vec::new() };
    let body = Signed::sign(&key, KIND_REDEEM, &batch);
    match t.http.post(format!("{}/v1/credits/redeem", t.tracker)).json(&body).send().await {
        Ok(r) => c.count(format!("{which}: {}", r.status().as_u16())),
        Err(e) => c.count(format!("{which}: {}", if e.is_timeout() { "timeout" } else { "error" })),
    }
}

/// Class 6: a resolve of a query-string variant of the object: a new object to the tracker, ingested from the
/// origin unless the source's share of ingests is spent.
async fn ingest_variant(t: Arc<Target>, c: Arc<Class>, i: u64) {
    let sep = if t.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}fog-attack={}-{i}", t.url, t.seed);
    match t.http.get(format!("{}/v1/resolve", t.tracker)).query(&[("url", &url)]).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            // Read the body: an answered resolve carries the whole manifest.
            let _ = r.bytes().await;
            c.count(status.to_string());
        }
        Err(e) => c.count(if e.is_timeout() { "timeout".into() } else { "error".to_string() }),
    }
}
