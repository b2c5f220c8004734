//! Scheduling throughput and latency with 10^5 registered nodes (run by `scripts/bench/schedule.sh`).
//!
//! A decision is one chunk's candidate list for one client, including that client's pre-filter (the worst
//! case: a request for a single chunk). Requests of 32 chunks share one pre-filter. The anchor, measured in
//! the same run, is the policy the tracker used before network coordinates: rendezvous over every node.
//! Single-threaded; the tracker serves resolves on several.

use std::net::SocketAddr;
use std::time::Instant;

use fog_proto::api::{Families, NodeContact};
use fog_proto::placement::top_k;
use fog_proto::{ChunkHash, NodeId};
use fog_sched::coords::{splitmix, ClientNet, Coord, Measured, MAX_MEASURED};
use fog_sched::scheduler::{pick, schedule, Load, NodeInfo, Params, Snapshot};

const NODES: usize = 100_000;
const DECISIONS: usize = 200_000;

fn unit(state: &mut u64) -> f32 {
    (splitmix(state) >> 40) as f32 / (1u64 << 24) as f32
}

/// A coordinate in one of 20 regions spread over a 300 × 150 ms plane.
fn place(state: &mut u64) -> Coord {
    let region = splitmix(state) % 20;
    let (rx, ry) = ((region % 5) as f32 * 60.0, (region / 5) as f32 * 40.0);
    Coord {
        pos: [rx + unit(state) * 20.0, ry + unit(state) * 20.0, unit(state) * 5.0, unit(state) * 5.0],
        height: 1.0 + unit(state) * 10.0,
        error: 0.2,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let mut rng = 42u64;
    let nodes: Vec<NodeInfo> = (0..NODES)
        .map(|i| NodeInfo {
            contact: NodeContact::direct(
                NodeId(*blake3::hash(&(i as u64).to_be_bytes()).as_bytes()),
                SocketAddr::from(([10, 0, 0, 1], 7701)),
            ),
            coord: place(&mut rng),
            upload: (1 + splitmix(&mut rng) % 8) << 20,
        })
        .collect();
    let params = Params::default();
    let started = Instant::now();
    let snapshot = Snapshot::new(nodes, &params);
    let build_ms = started.elapsed().as_secs_f64() * 1000.0;

    // Each client network with a full table of measured RTTs, as the tracker keeps them (looked up per
    // decision): to nodes near it by prediction, measured 0–40 % off.
    let clients: Vec<ClientNet> = (0..4096)
        .map(|_| {
            let coord = place(&mut rng);
            let near = snapshot.close_set(Some(&ClientNet { coord: Some(coord), measured: Vec::new() }), &params);
            let measured = near
                .nodes
                .iter()
                .take(MAX_MEASURED)
                .map(|&i| {
                    let n = &snapshot.nodes[i as usize];
                    let rtt_ms = coord.rtt_to(&n.coord) * (1.0 + 0.4 * unit(&mut rng));
                    Measured { node: n.contact.id, rtt_ms, agrees: true }
                })
                .collect();
            ClientNet { coord: Some(coord), measured }
        })
        .collect();
    let chunks: Vec<ChunkHash> = (0..100_000u32).map(|c| ChunkHash::of(&c.to_be_bytes())).collect();
    let mut load = Load::default();
    let mut latencies = Vec::with_capacity(DECISIONS);
    let started = Instant::now();
    for d in 0..DECISIONS {
        let client = &clients[d % clients.len()];
        // Zipf-ish popularity: low chunk numbers much more often.
        let chunk = chunks[((unit(&mut rng).powi(3)) * chunks.len() as f32) as usize % chunks.len()];
        let t = Instant::now();
        let close = snapshot.close_set(Some(client), &params);
        let picked = pick(&snapshot, &mut load, &close, &chunk, 1 << 20, true, &params, (d / 100) as u64);
        latencies.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(picked);
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);

    // Requests of 32 chunks: one pre-filter, 32 decisions.
    let requests = 20_000;
    let started = Instant::now();
    for r in 0..requests {
        let client = &clients[r % clients.len()];
        let first = (r * 32) % (chunks.len() - 32);
        let request: Vec<(ChunkHash, u32)> = chunks[first..first + 32].iter().map(|c| (*c, 1 << 20)).collect();
        std::hint::black_box(schedule(&snapshot, &mut load, Some(client), Families::BOTH, &request, &params, r as u64));
    }
    let batched = (requests * 32) as f64 / started.elapsed().as_secs_f64();

    // Anchor: rendezvous hashing over all nodes (the previous scheduler).
    let ids: Vec<NodeId> = snapshot.nodes.iter().map(|n| n.contact.id).collect();
    let anchor_decisions = 200;
    let mut anchor = Vec::with_capacity(anchor_decisions);
    for c in chunks.iter().take(anchor_decisions) {
        let t = Instant::now();
        std::hint::black_box(top_k(c, &ids, params.k));
        anchor.push(t.elapsed().as_secs_f64() * 1e6);
    }
    anchor.sort_by(f64::total_cmp);
    let anchor_rate = anchor_decisions as f64 / (anchor.iter().sum::<f64>() / 1e6);

    println!("nodes: {NODES}; snapshot build (grid, default pool): {build_ms:.0} ms");
    println!(
        "coordinates + bounded load, single-chunk decisions: {:.0} decisions/s, p50 {:.1} µs, p99 {:.1} µs, max {:.0} µs ({DECISIONS} decisions)",
        DECISIONS as f64 / secs,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
    println!("coordinates + bounded load, 32-chunk requests: {batched:.0} chunk decisions/s");
    println!(
        "anchor (rendezvous over all nodes): {anchor_rate:.0} decisions/s, p50 {:.0} µs, p99 {:.0} µs",
        percentile(&anchor, 0.5),
        percentile(&anchor, 0.99)
    );
    println!("goal: ≥ 100000 decisions/s, p99 ≤ 1000 µs");
}
