//! Cluster benchmark tool (issue #15; run by `scripts/bench/cluster.sh`).
//!
//! `publish`: a population of synthetic nodes whose heartbeats other replicas accepted — the node records
//! those replicas publish on the cell's bus, built and encoded by the bus's own types (`--format v1`: JSON,
//! as replicas publish them while an older one is live; `v2`: binary, otherwise), one message per
//! heartbeat, at a fixed rate, round-robin over the population (a node's full overlay of RTT samples,
//! counters, its signed timestamp = now). A replica under test merges them as it would its peers'.
//!
//! `apply`: in process, what each replica pays per merged record (decode, then merge into a registry built
//! as the tracker builds it) in each format, the scheduling snapshot's rebuild at a given population, and a
//! load delta's decode and apply, with no network or HTTP in the way: CPU time of the measuring thread; and
//! records merged per second of wall time by 1, 2, … threads (the bus's workers), which needs the cores
//! free.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fog_proto::api::{now_ms, NodeStats, OverlayReport, Reachability, RttSample, NEIGHBOURHOOD};
use fog_proto::{ChunkHash, NodeId};
use fog_sched::coords::{Coord, DIMS};
use fog_sched::scheduler::{Load, LoadDelta, Params};
use fog_tracker::bus::wire::{self, Kind, Message, NodeRecord, Version};
use fog_tracker::registry::{PlanRule, Registry};

#[derive(Parser, Debug)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Publishes node records on `fog.<cell>.<format>.node` at `rate` per second.
    Publish {
        #[arg(long)]
        nats: String,
        #[arg(long, default_value = "default")]
        cell: String,
        /// Synthetic nodes (the same population every run: ids and addresses follow from the index).
        #[arg(long, default_value_t = 100_000)]
        nodes: usize,
        #[arg(long)]
        rate: u64,
        /// How long to publish; without it, each node once (the population's arrival).
        #[arg(long)]
        seconds: Option<f64>,
        /// `v1` (JSON) or `v2` (binary).
        #[arg(long, default_value = "v2", value_parser = parse_format)]
        format: Version,
    },
    /// Merge, snapshot and load-delta costs in process, at each population size given.
    Apply {
        #[arg(long, value_delimiter = ',', default_value = "100000,250000,1000000")]
        nodes: Vec<usize>,
        /// Records decoded and merged per population and format (each replacing a held node's record).
        #[arg(long, default_value_t = 200_000)]
        updates: usize,
        /// The formats measured, side by side; the population arrives in the first.
        #[arg(long, value_delimiter = ',', default_value = "v1,v2", value_parser = parse_format)]
        formats: Vec<Version>,
    },
}

fn parse_format(s: &str) -> Result<Version, String> {
    match s {
        "v1" => Ok(Version::V1),
        "v2" => Ok(Version::V2),
        _ => Err(format!("{s:?}: v1 (JSON) or v2 (binary)")),
    }
}

/// Node `i`'s record as of `ts`, as a replica publishes it in `format`.
fn encode_record(format: Version, i: usize, population: usize, ts: u64) -> Vec<u8> {
    let (version, payload) = Message::Node(Box::new(record(i, population, ts))).encode(format == Version::V2);
    assert_eq!(version, format);
    payload
}

/// Regions the population is spread over (coordinates around a centre each), as the scheduling benchmark.
const REGIONS: u64 = 20;

/// splitmix64: a deterministic stream of numbers from a seed, so every run builds the same population.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A number in [0, 1) from `seed`.
fn unit(seed: u64) -> f32 {
    (mix(seed) >> 40) as f32 / (1u64 << 24) as f32
}

fn node_id(i: usize) -> NodeId {
    let mut seed = *b"fogcdn bench_cluster synthetic..";
    seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
    NodeId(*blake3::hash(&seed).as_bytes())
}

/// Node `i`'s record as of `ts`: what the replica that accepted its heartbeat at `ts` publishes.
fn record(i: usize, population: usize, ts: u64) -> NodeRecord {
    let n = i as u64;
    let region = n % REGIONS;
    let mut pos = [0f32; DIMS];
    for (d, p) in pos.iter_mut().enumerate() {
        // Region centres within ±150 ms, nodes within ±15 ms of theirs, a little movement per heartbeat.
        *p = 300.0 * (unit(region * 16 + d as u64) - 0.5)
            + 30.0 * (unit(n * 16 + d as u64 + 1_000_000) - 0.5)
            + 0.5 * (unit(ts ^ n.rotate_left(17)) - 0.5);
    }
    let coord = Coord { pos, height: 1.0 + 9.0 * unit(n + 7_000_000), error: 0.2 };
    // Its overlay's neighbourhood: a full one, each with a filtered RTT (as `fog_node::overlay` reports).
    let rtt = (1..=NEIGHBOURHOOD as u64)
        .map(|k| RttSample {
            peer: node_id(((n + k * 7919) % population as u64) as usize),
            rtt_ms: 2.0 + 60.0 * unit(n * 64 + k + (ts / 1000)),
        })
        .collect();
    let addr = SocketAddr::from(([10, (n >> 16) as u8, (n >> 8) as u8, n as u8], 7000 + (n % 2000) as u16));
    // Counters grow with time, as a serving node's do (the merge adds their growth to the totals).
    let served = ts / 1000 * (1 + n % 8) * 65_536;
    let requests = served / (1 << 20);
    let stats = NodeStats {
        cache_used: 40 << 30,
        cache_capacity: 64 << 30,
        cached_chunks: 40_960,
        active_streams: n % 4,
        requests,
        hits: requests * 9 / 10,
        misses: requests / 10,
        bytes_served: served,
        origin_fills: requests / 20,
        origin_bytes: served / 20,
        peer_fills: requests / 20,
        peer_fill_bytes: served / 20,
        peer_served_bytes: served / 10,
        ..Default::default()
    };
    let overlay = OverlayReport {
        reachability: Reachability::Public,
        addrs: vec![format!("/ip4/{}/udp/{}/quic-v1", addr.ip(), addr.port() + 1)],
        rtt,
        tracker_rtt_ms: Some(5.0 + 80.0 * unit(n + 9_000_000)),
        connected_peers: NEIGHBOURHOOD as u32,
        ..Default::default()
    };
    NodeRecord {
        id: node_id(i),
        ts,
        addr,
        capacity: 64 << 30,
        upload_limit: Some((1 + n % 8) << 20),
        version: "0.1.0".into(),
        reachable: true,
        joining: false,
        region: None,
        more: Vec::new(),
        stats,
        draining: false,
        overlay,
        coord,
        upload_rate: (n % 8) << 18,
        web: None,
        plan: None,
        down: false,
        quarantined: None,
        web_served: None,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Args::parse().mode {
        Mode::Publish { nats, cell, nodes, rate, seconds, format } => {
            publish(&nats, &cell, nodes, rate, seconds, format).await
        }
        Mode::Apply { nodes, updates, formats } => {
            anyhow::ensure!(!formats.is_empty(), "--formats names none");
            for n in nodes {
                apply(n, updates, &formats)?;
            }
            Ok(())
        }
    }
}

async fn publish(
    nats: &str,
    cell: &str,
    nodes: usize,
    rate: u64,
    seconds: Option<f64>,
    format: Version,
) -> anyhow::Result<()> {
    anyhow::ensure!(nodes > 0 && rate > 0, "--nodes and --rate must be positive");
    let client = async_nats::connect(nats).await.with_context(|| format!("NATS {nats}"))?;
    let subject = wire::subject(cell, format, Kind::Node);
    let total = seconds.map_or(nodes as u64, |s| (s * rate as f64) as u64);
    // Each node's record is encoded once; later messages rewrite only its timestamp (v1: its 13 decimal
    // digits, until the year 2286; v2: its 8 bytes), so the sender keeps up with 10^5 records/s on a
    // shared core. The bytes are the encoder's for that record at that timestamp.
    let stamp = |ts: u64| match format {
        Version::V1 => format!("\"ts\":{ts}").into_bytes(),
        Version::V2 => ts.to_be_bytes().to_vec(),
    };
    let mut encoded: Vec<Option<(Vec<u8>, usize, usize)>> = vec![None; nodes];
    // A node's timestamps must grow (an equal one is a duplicate): milliseconds, bumped past the last.
    let mut last_ts = vec![0u64; nodes];
    let (mut sent, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            let i = (sent % nodes as u64) as usize;
            let ts = now_ms().max(last_ts[i] + 1);
            last_ts[i] = ts;
            let stamped = stamp(ts);
            let (payload, at, width) = encoded[i].get_or_insert_with(|| {
                let payload = encode_record(format, i, nodes, ts);
                let at = payload.windows(stamped.len()).position(|w| w == stamped).expect("ts field");
                (payload, at, stamped.len())
            });
            anyhow::ensure!(stamped.len() == *width, "timestamp {ts} changed width");
            payload[*at..*at + stamped.len()].copy_from_slice(&stamped);
            bytes += payload.len() as u64;
            client.publish(subject.clone(), payload.clone().into()).await?;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    client.flush().await?;
    let secs = started.elapsed().as_secs_f64();
    let line = serde_json::json!({
        "format": format.name(),
        "published": sent,
        "seconds": secs,
        "rate": sent as f64 / secs,
        "bytes_per_record": bytes / sent.max(1),
    });
    println!("{line}");
    Ok(())
}

fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next());
    kib.and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) / 1024
}

/// This thread's time on a CPU so far, in seconds (the kernel's scheduler statistics): the costs below are
/// CPU time, not wall time, so other work on a shared machine does not inflate them.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|ns| ns.parse::<u64>().ok()).unwrap_or(0) as f64 / 1e9
}

/// CPU seconds since `since` (a [`cpu_secs`] reading).
fn cpu_since(since: f64) -> f64 {
    cpu_secs() - since
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_unstable_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn apply(nodes: usize, updates: usize, formats: &[Version]) -> anyhow::Result<()> {
    // Built as `App` builds it, with the defaults' parameters (3 candidates, ε 0.25, 100 ms cells).
    let params = Params { k: 3, epsilon: 0.25, ..Default::default() };
    let registry = Registry::new(Duration::from_secs(3600), nodes + 1, HashSet::new())
        .with_params(params)
        .with_cells(Some(fog_sched::cells::DEFAULT_EDGE_MS))
        .with_plan_rule(PlanRule { heartbeat: Duration::from_secs(10), chunk_size: 1 << 20 });
    let start_ms = now_ms();
    let decode = |format: Version, payload: &[u8]| match Message::decode(format, Kind::Node, payload) {
        Ok(Message::Node(record)) => Ok(*record),
        other => anyhow::bail!("not a node record: {other:?}"),
    };

    // The population's arrival, in the first format: every record new here.
    let started = cpu_secs();
    for i in 0..nodes {
        registry.merge(decode(formats[0], &encode_record(formats[0], i, nodes, start_ms))?, now_ms())?;
    }
    let arrival = cpu_since(started);
    let rss = rss_mib();

    // Snapshot rebuilds: the first after the arrival, then after each change of the schedulable set (a
    // node draining and back: `schedule_key` moves, so the cached snapshot is stale).
    let mut rebuilds = Vec::new();
    for round in 0..5u64 {
        let started = cpu_secs();
        let snapshot = registry.snapshot();
        rebuilds.push(cpu_since(started) * 1e3);
        anyhow::ensure!(snapshot.nodes.len() + 1 >= nodes, "only {} nodes scheduled", snapshot.nodes.len());
        let toggled = NodeRecord { draining: round % 2 == 0, ..record(0, nodes, start_ms + 1 + round) };
        registry.merge(toggled, now_ms())?;
    }

    // Each format in turn, with timestamps newer than everything merged before it (a format's rounds stay
    // within 100 s; all of them within the registry's 5-minute clock check).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    let mut by_format = serde_json::Map::new();
    for (f, &format) in formats.iter().enumerate() {
        let base_ms = start_ms + 10 + 100_000 * f as u64;
        // Steady state: records replacing held ones, encoded beforehand (the sender's cost, not the receiver's).
        let batch: Vec<Vec<u8>> = (0..updates)
            .map(|u| {
                let ts = base_ms + (u / nodes) as u64 * 1000 + (u % 1000) as u64;
                encode_record(format, u % nodes, nodes, ts)
            })
            .collect();
        let bytes = batch.iter().map(Vec::len).sum::<usize>() / updates.max(1);
        let started = cpu_secs();
        let records = batch.iter().map(|p| decode(format, p)).collect::<Result<Vec<_>, _>>()?;
        let decode_us = cpu_since(started) * 1e6 / updates as f64;
        let started = cpu_secs();
        let mut replaced = 0usize;
        for r in records {
            replaced += usize::from(registry.merge(r, now_ms())? == fog_tracker::bus::merge::Merge::Replace);
        }
        let merge_us = cpu_since(started) * 1e6 / updates as f64;
        anyhow::ensure!(replaced == updates, "{replaced} of {updates} records replaced the held one");

        // Records decoded and merged per second (wall time) by 1, 2, … threads sharing the registry, as the
        // bus's workers do: what a replica with that many cores free takes in at most.
        let mut merged_per_s = serde_json::Map::new();
        for threads in 1..=cores {
            // Newer than everything merged before (the steady state's timestamps stay within 3 s of the base).
            let base = base_ms + 10_000 * threads as u64;
            let batch: Vec<Vec<u8>> =
                (0..updates).map(|u| encode_record(format, u % nodes, nodes, base + (u / nodes) as u64)).collect();
            let started = Instant::now();
            let replaced = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|scope| {
                // Each thread its own nodes, in order: a node's records are newer one after the other.
                for t in 0..threads {
                    let (registry, replaced, batch, decode) = (&registry, &replaced, &batch, &decode);
                    scope.spawn(move || {
                        for payload in
                            batch.iter().enumerate().filter(|(u, _)| u % nodes % threads == t).map(|(_, p)| p)
                        {
                            let merged = decode(format, payload).and_then(|r| Ok(registry.merge(r, now_ms())?));
                            if matches!(merged, Ok(fog_tracker::bus::merge::Merge::Replace)) {
                                replaced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            let per_s = updates as f64 / started.elapsed().as_secs_f64();
            anyhow::ensure!(
                replaced.into_inner() == updates,
                "{threads} threads: not every record replaced the held one"
            );
            merged_per_s.insert(threads.to_string(), per_s.round().into());
        }
        let line = serde_json::json!({
            "bytes_per_record": bytes,
            "update_decode_us": decode_us,
            "update_merge_us": merge_us,
            "update_us": decode_us + merge_us,
            "merged_per_s_by_threads": merged_per_s,
        });
        by_format.insert(format.name().into(), line);
    }

    // Another replica's load delta, as full as one is published (`FLUSH_LOAD_ENTRIES` nodes and chunks).
    let snapshot = registry.snapshot();
    let mut delta = LoadDelta::default();
    for k in 0..wire::FLUSH_LOAD_ENTRIES {
        delta.nodes.insert(node_id(k * 97 % nodes), (1048576.0, 524288.0));
        delta.chunks.insert(ChunkHash(*blake3::hash(&k.to_be_bytes()).as_bytes()), 1.0);
    }
    delta.total = 1e9;
    let (version, payload) = Message::Load(delta).encode(true);
    let mut load = Load::default();
    let rounds = 200;
    let started = cpu_secs();
    for _ in 0..rounds {
        let Ok(Message::Load(delta)) = Message::decode(version, Kind::Load, &payload) else {
            anyhow::bail!("load delta")
        };
        load.apply(&delta, &snapshot, now_ms(), &params);
    }
    let load_us = cpu_since(started) * 1e6 / rounds as f64;

    let line = serde_json::json!({
        "nodes": nodes,
        "arrival_format": formats[0].name(),
        "arrival_us_per_record": arrival * 1e6 / nodes as f64,
        "rss_mib": rss,
        "snapshot_ms_first": rebuilds[0],
        "snapshot_ms_median": median(rebuilds.clone()),
        "snapshot_ms_min": rebuilds.iter().copied().fold(f64::INFINITY, f64::min),
        "formats": by_format,
        "load_delta_bytes": payload.len(),
        "load_delta_us": load_us,
    });
    println!("{line}");
    Ok(())
}
