//! `fog`: the fogcdn command-line client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fog_client::publish;
use fog_client::{ClientConfig, FetchReport, FogClient};
use fog_net::tracker::{TrackerClient, TrackerError};
use fog_proto::api::{ErrorCode, Published};
use tokio::io::AsyncWriteExt;

#[derive(Parser, Debug)]
#[command(name = "fog", version, about = "Fetch content through fogcdn")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fetch ORIGIN_URL through the fog (verified chunks from nodes, origin fallback).
    Get {
        /// Tracker base URL, e.g. http://127.0.0.1:7700, or several comma-separated (replicas of one cell,
        /// failed over in turn).
        #[arg(long, env = "FOG_TRACKER", value_parser = tracker_list)]
        tracker: String,
        /// The origin URL to fetch.
        origin_url: String,
        /// Write here instead of standard output (a regular file is written to FILE.part and renamed when
        /// complete; a device or FIFO is written in place).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// Chunks fetched in parallel.
        #[arg(long, default_value_t = 8, env = "FOG_PARALLEL")]
        parallel: usize,
        /// Print the fetch report as one JSON object (per-node bytes, fallbacks) instead of the summary line.
        #[arg(long)]
        json: bool,
    },
    /// Run the local player proxy: players fetch http://ADDR/<scheme>/<host[:port]>/<path>.
    Proxy {
        /// Tracker base URL, or several comma-separated (replicas of one cell, failed over in turn).
        #[arg(long, env = "FOG_TRACKER", value_parser = tracker_list)]
        tracker: String,
        /// Where players connect; keep it on loopback [default: 127.0.0.1:7780].
        #[arg(long, env = "FOG_PROXY_LISTEN", default_value = "127.0.0.1:7780")]
        listen: std::net::SocketAddr,
        /// How far ahead of the playhead to prefetch, in seconds.
        #[arg(long, env = "FOG_PROXY_PREFETCH_SECS", default_value_t = 20)]
        prefetch_secs: u64,
        /// Memory for prefetched segments, e.g. 128MiB.
        #[arg(long, env = "FOG_PROXY_PREFETCH_MEMORY", default_value = "128MiB")]
        prefetch_memory: fog_proto::size::Size,
        /// An origin this proxy may relay besides the tracker's registered ones (a URL prefix such as
        /// https://videos.example.com/vod/; repeat or comma-separate). Its objects come straight from the
        /// origin unless the tracker also serves it. Nothing else is relayed.
        #[arg(long = "origin", env = "FOG_PROXY_ORIGINS", value_delimiter = ',')]
        origins: Vec<String>,
    },
    /// Print the proxied URL for ORIGIN_URL (what to give a player).
    Url {
        origin_url: String,
        /// The proxy's address.
        #[arg(long, env = "FOG_PROXY", default_value = "127.0.0.1:7780")]
        proxy: String,
    },
    /// Build the manifests of a file, or of every file below a directory, where the content is packaged:
    /// print them (JSON lines), write them next to the files (--sidecar) or publish them (--publish).
    Manifest(ManifestArgs),
}

#[derive(Args, Debug)]
struct ManifestArgs {
    /// A file, or a directory (walked recursively; FILE.fog-manifest.json sidecars are left out).
    path: PathBuf,
    /// Where the origin serves PATH. For a file: the object's URL, or a URL ending in '/' that the file's name
    /// is appended to. For a directory: its URL, to which each file's path below it is appended.
    #[arg(long)]
    base_url: String,
    /// Chunk size, 16KiB..16MiB: any size in that range may be published, whatever the tracker's --chunk-size.
    #[arg(long, default_value = "1MiB")]
    chunk_size: fog_proto::size::Size,
    /// Group hashes in the manifests, so nodes and players pass on each verified group as it arrives: a
    /// power of two from 1KiB, at most 256 groups a chunk; 0 leaves them out (smaller manifests).
    #[arg(long, default_value = "64KiB")]
    group_size: fog_proto::size::Size,
    /// Write each manifest next to its file, as FILE.fog-manifest.json (for a tracker run with
    /// --origin-manifests).
    #[arg(long)]
    sidecar: bool,
    /// Publish each manifest to the tracker (needs --tracker and --admin-token).
    #[arg(long)]
    publish: bool,
    /// Tracker base URL (or several comma-separated), for --publish.
    #[arg(long, env = "FOG_TRACKER", value_parser = tracker_list)]
    tracker: Option<String>,
    /// The tracker's admin token, for --publish.
    #[arg(long, env = "FOG_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

/// `--tracker URL[,URL…]`, checked as the client will use it.
fn tracker_list(s: &str) -> Result<String, String> {
    fog_net::trackers::parse_list(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// Manifests being published at once: uploads overlap the hashing of the next files without flooding the
/// tracker. Files are hashed one at a time: reading them, not hashing, is the limit.
const PUBLISH_CONCURRENCY: usize = 4;
/// Time for one publish request; a manifest is at most 8 MiB of JSON.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// Prints a publish outcome; false if it failed. A refused token ends the run: every object would fail.
fn report_published(
    (manifest, answer): (fog_proto::manifest::Manifest, Result<Published, TrackerError>),
) -> anyhow::Result<bool> {
    match answer {
        Ok(p) => {
            if p.content_id != manifest.content_id() {
                eprintln!(
                    "fog: warning: the tracker recorded {} as content {}, not {} as built",
                    p.url,
                    p.content_id,
                    manifest.content_id()
                );
            }
            println!("published url={} chunks={} content_id={}", p.url, manifest.chunks.len(), p.content_id);
            Ok(true)
        }
        Err(e) if e.code() == Some(ErrorCode::Unauthorized) => Err(anyhow::Error::new(e).context("publishing")),
        Err(e) => {
            eprintln!("fog: error: publishing {}: {e}", manifest.url);
            Ok(false)
        }
    }
}

async fn manifest(args: ManifestArgs) -> anyhow::Result<()> {
    let chunk_size = publish::chunk_size(args.chunk_size.0).context("--chunk-size")?;
    let group_size = fog_proto::groups::configured(args.group_size.0, chunk_size).context("--group-size")?;
    let publisher = match (args.publish, args.tracker, args.admin_token) {
        (false, ..) => None,
        (true, Some(tracker), Some(token)) => {
            Some((TrackerClient::new(&tracker, PUBLISH_TIMEOUT), Arc::<str>::from(token)))
        }
        (true, None, _) => anyhow::bail!("--publish needs --tracker (or FOG_TRACKER)"),
        (true, _, None) => anyhow::bail!("--publish needs --admin-token (or FOG_ADMIN_TOKEN)"),
    };
    let plan = publish::plan(&args.path, &args.base_url).await?;
    for s in &plan.skipped {
        eprintln!("fog: skipped {}: {}", s.path.display(), s.reason);
    }
    for e in &plan.failed {
        eprintln!("fog: error: {e}");
    }
    let (objects, skipped) = (plan.objects.len() + plan.failed.len(), plan.skipped.len());
    let (mut failed, mut sidecars, mut published) = (plan.failed.len(), 0, 0);
    let mut publishing = tokio::task::JoinSet::new();
    for object in plan.objects {
        let manifest = match publish::build(&object.path, object.url, chunk_size, group_size).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("fog: error: {e}");
                failed += 1;
                continue;
            }
        };
        if !args.sidecar && publisher.is_none() {
            println!("{}", serde_json::to_string(&manifest)?);
            continue;
        }
        if args.sidecar {
            match publish::write_sidecar(&object.path, &manifest).await {
                Ok(path) => {
                    println!(
                        "wrote {} url={} chunks={} content_id={}",
                        path.display(),
                        manifest.url,
                        manifest.chunks.len(),
                        manifest.content_id()
                    );
                    sidecars += 1;
                }
                Err(e) => {
                    eprintln!("fog: error: {e}");
                    failed += 1;
                    continue;
                }
            }
        }
        if let Some((tracker, token)) = &publisher {
            while publishing.len() >= PUBLISH_CONCURRENCY {
                let outcome = publishing.join_next().await.context("a publish task is running")??;
                if report_published(outcome)? {
                    published += 1
                } else {
                    failed += 1
                }
            }
            let (tracker, token) = (tracker.clone(), token.clone());
            publishing.spawn(async move {
                let answer = tracker.publish(&manifest, &token).await;
                (manifest, answer)
            });
        }
    }
    while let Some(outcome) = publishing.join_next().await {
        if report_published(outcome?)? {
            published += 1
        } else {
            failed += 1
        }
    }
    if args.sidecar || publisher.is_some() || failed > 0 {
        eprintln!("fog: manifest: objects={objects} sidecars={sidecars} published={published} failed={failed} skipped={skipped}");
    }
    anyhow::ensure!(failed == 0, "{failed} of {objects} objects failed");
    Ok(())
}

async fn proxy(
    tracker: String,
    listen: std::net::SocketAddr,
    prefetch_secs: u64,
    prefetch_memory: u64,
    origins: Vec<String>,
) -> anyhow::Result<()> {
    if !listen.ip().is_loopback() {
        eprintln!("fog: warning: the proxy listens on {listen}, not loopback: anyone who can reach it can use it");
    }
    let origins = fog_proto::origins::OriginList::new(origins).map_err(anyhow::Error::msg).context("--origin")?;
    let client = ClientConfig { tracker: Some(tracker), ..Default::default() };
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    let cfg = fog_client::proxy::ProxyConfig {
        prefetch_window: Duration::from_secs(prefetch_secs),
        prefetch_memory,
        origins,
        ..Default::default()
    };
    let proxy = std::sync::Arc::new(fog_client::proxy::Proxy::new(client, local, cfg)?);
    tracing::info!("fog proxy listening on {local}");
    eprintln!("fog proxy listening on {local} (players open http://{local}/<scheme>/<host[:port]>/<path>)");
    proxy.serve(listener, fog_net::bin_support::shutdown()).await;
    Ok(())
}

fn summary(url: &str, r: &FetchReport, elapsed: Duration) -> String {
    let share = if r.bytes == 0 { 0.0 } else { r.fog_bytes as f64 * 100.0 / r.bytes as f64 };
    let tracker = if r.tracker_unreachable.is_some() { "unreachable" } else { "ok" };
    format!(
        "fog: url={url} bytes={} fog_bytes={} origin_bytes={} fog_share={share:.1}% nodes={} node_failures={} tracker={tracker} elapsed_ms={}",
        r.bytes,
        r.fog_bytes,
        r.origin_bytes,
        r.nodes.len(),
        r.node_failures,
        elapsed.as_millis()
    )
}

/// Bytes collected before each write to standard output. Tokio writes it on a blocking thread, one
/// hand-over per write: the fetch delivers 64 KiB groups, and 16 times fewer hand-overs cost less than the
/// extra copy.
const OUTPUT_BUFFER: usize = 1 << 20;

async fn get(tracker: String, url: String, output: Option<PathBuf>, parallel: usize, json: bool) -> anyhow::Result<()> {
    let client = FogClient::new(ClientConfig { tracker: Some(tracker), parallel, ..Default::default() })?;
    let started = Instant::now();
    let report = match &output {
        // Not a regular file (a device such as /dev/null, a FIFO): written in place, never replaced by a rename.
        Some(path) if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) => {
            let mut target = tokio::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            let r = client.fetch_to(&url, &mut target).await?;
            target.flush().await?;
            r
        }
        Some(path) => {
            let mut part = path.clone().into_os_string();
            part.push(".part");
            let part = PathBuf::from(part);
            let mut file =
                tokio::fs::File::create(&part).await.with_context(|| format!("cannot create {}", part.display()))?;
            let result = client.fetch_to(&url, &mut file).await;
            drop(file);
            match result {
                Ok(r) => {
                    tokio::fs::rename(&part, path)
                        .await
                        .with_context(|| format!("cannot move {} to {}", part.display(), path.display()))?;
                    r
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(&part).await;
                    return Err(e.into());
                }
            }
        }
        None => {
            let mut stdout = tokio::io::BufWriter::with_capacity(OUTPUT_BUFFER, tokio::io::stdout());
            let r = client.fetch_to(&url, &mut stdout).await?;
            stdout.flush().await?;
            r
        }
    };
    if let Some(why) = &report.tracker_unreachable {
        eprintln!("fog: warning: fetched straight from the origin without verification: {why}");
    }
    if json {
        eprintln!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!("{}", summary(&url, &report, started.elapsed()));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    fog_net::bin_support::init_logging("warn");
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fog: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Get { tracker, origin_url, output, parallel, json } => {
                get(tracker, origin_url, output, parallel, json).await
            }
            Command::Proxy { tracker, listen, prefetch_secs, prefetch_memory, origins } => {
                proxy(tracker, listen, prefetch_secs, prefetch_memory.0, origins).await
            }
            Command::Url { origin_url, proxy } => {
                println!("{}", fog_client::proxy::proxied_url(&origin_url, &proxy)?);
                Ok(())
            }
            Command::Manifest(args) => manifest(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fog: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
