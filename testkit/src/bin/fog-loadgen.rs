//! Load generator for `scripts/bench/serve.sh`: N concurrent clients, each on its own connection, pulling
//! 1 MiB objects for a fixed time, either as chunks from a fog node over QUIC or as files from an HTTPS
//! server. Payloads are not hashed here in either mode, so the two measure serving, not client CPU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use fog_net::chunk::{self, Deadlines};
use fog_net::tracker::TrackerClient;
use fog_net::transport;
use fog_proto::wire::ChunkRequest;

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent clients (one connection each).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Measurement time in seconds (after a 1 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Chunks of URL's manifest from the first node the tracker schedules (the chunks must be warm).
    Quic {
        #[arg(long)]
        tracker: String,
        url: String,
    },
    /// GET each URL in turn over HTTPS (certificate not checked: a local self-signed server).
    Https { urls: Vec<String> },
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

impl Tally {
    fn record(&self, started: Instant, bytes: usize, measuring: bool) {
        if measuring {
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            self.latencies_us.lock().expect("lock").push(started.elapsed().as_micros() as u64);
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tally = Arc::new(Tally::default());
    let warmup_end = Instant::now() + Duration::from_secs(1);
    let end = warmup_end + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    let mode_name;
    match &args.mode {
        Mode::Quic { tracker, url } => {
            mode_name = "quic-fog-node";
            let resolved = TrackerClient::new(tracker, Duration::from_secs(30)).resolve(url, None, None, None).await?;
            let Some(node) = resolved.nodes.first().cloned() else { bail!("tracker scheduled no node") };
            let m = Arc::new(resolved.manifest);
            let endpoint = transport::client_endpoint(([0, 0, 0, 0], 0).into())?;
            let deadlines = Deadlines { first_byte: Duration::from_secs(10), stall: Duration::from_secs(10) };
            for c in 0..args.clients {
                let timeout = Duration::from_secs(30);
                let conn = transport::connect(&endpoint, node.id, node.addr, timeout, timeout)
                    .await
                    .map_err(anyhow::Error::msg)?;
                let (m, tally) = (m.clone(), tally.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = c;
                    while Instant::now() < end {
                        let idx = i % m.chunks.len();
                        i += 1;
                        let req = ChunkRequest {
                            hash: m.chunks[idx],
                            range: None,
                            origin: None,
                            receipt: None,
                            ticket: None,
                            groups: None,
                        };
                        let started = Instant::now();
                        match chunk::request(&conn, &req, m.chunk_span(idx).1, deadlines, None).await {
                            Ok(b) => tally.record(started, b.len(), started >= warmup_end),
                            Err(_) => {
                                tally.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
        }
        Mode::Https { urls } => {
            mode_name = "https-nginx";
            let urls = Arc::new(urls.clone());
            for c in 0..args.clients {
                let http = reqwest::Client::builder()
                    .danger_accept_invalid_certs(true)
                    .pool_max_idle_per_host(1)
                    .http1_only()
                    .build()?;
                let (urls, tally) = (urls.clone(), tally.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = c;
                    while Instant::now() < end {
                        let url = &urls[i % urls.len()];
                        i += 1;
                        let started = Instant::now();
                        let result = async { http.get(url).send().await?.error_for_status()?.bytes().await }.await;
                        match result {
                            Ok(b) => tally.record(started, b.len(), started >= warmup_end),
                            Err(_) => {
                                tally.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
        }
    }
    for t in tasks {
        t.await?;
    }
    let mut lat = std::mem::take(&mut *tally.latencies_us.lock().expect("lock"));
    lat.sort_unstable();
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0);
    let bytes = tally.bytes.load(Ordering::Relaxed);
    let mib_s = bytes as f64 / (1 << 20) as f64 / args.seconds as f64;
    println!(
        "{}",
        serde_json::json!({
            "mode": mode_name,
            "clients": args.clients,
            "seconds": args.seconds,
            "requests": tally.requests.load(Ordering::Relaxed),
            "errors": tally.errors.load(Ordering::Relaxed),
            "bytes": bytes,
            "mib_per_s": (mib_s * 10.0).round() / 10.0,
            "p50_ms": pct(0.5) as f64 / 1000.0,
            "p99_ms": pct(0.99) as f64 / 1000.0,
        })
    );
    Ok(())
}
