//! `fog-sim`: simulate a fogcdn deployment with the tracker's real scheduler (see `docs/simulation.md`).
//! The last line printed is one JSON object with the run's metrics.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use fog_sim::report::{svg_chart, Report};
use fog_sim::{Config, Homes, Policy, Scenario, Sim};

#[derive(Parser, Debug)]
#[command(name = "fog-sim", about = "Discrete-event simulation of a fogcdn deployment")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[arg(long, default_value_t = 2_000)]
    clients: usize,
    /// Chunk requests to simulate.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Scenario::Vod)]
    scenario: Scenario,
    #[arg(long, value_enum, default_value_t = Policy::Coords)]
    policy: Policy,
    /// Zipf exponent of content popularity.
    #[arg(long, default_value_t = 0.8)]
    alpha: f64,
    /// Objects (VOD titles or live channels) in the catalogue.
    #[arg(long, default_value_t = 500)]
    objects: usize,
    /// Most near nodes per client network among which rendezvous places each chunk (default: k = 3).
    #[arg(long)]
    close: Option<usize>,
    /// Rounds of 16 RTT samples each node's coordinate is fitted from.
    #[arg(long, default_value_t = 20)]
    fit_rounds: usize,
    /// RTT samples each client network's coordinate is fitted from (70 % to nodes in its region).
    #[arg(long, default_value_t = 10)]
    client_samples: usize,
    /// Peers serve misses only from what they hold (no fill-through at the chunk's home): the old protocol.
    #[arg(long)]
    no_fill_through: bool,
    /// Which peers are a chunk's homes: each node's 32 nearest (neighbourhood), its cell of the coordinate
    /// grid (grid), or its region (region).
    #[arg(long, value_enum, default_value_t = Homes::Neighbourhood)]
    homes: Homes,
    /// Edge of the grid's cells for `--homes grid`, ms.
    #[arg(long, default_value_t = fog_sched::cells::DEFAULT_EDGE_MS)]
    cell_ms: f32,
    /// Live, with `--homes grid|region`: the tracker ingests each new segment once and pushes it to the
    /// homes of the cells with viewers of its channel.
    #[arg(long)]
    live_push: bool,
    /// The players' buffer target, seconds of media.
    #[arg(long, default_value_t = 10.0)]
    buffer_secs: f64,
    /// Media a player needs before it starts playing, seconds (it gets whole chunks).
    #[arg(long, default_value_t = 1.0)]
    startup_secs: f64,
    /// Live: segments behind the newest published one that viewers start at (1: the newest; 3: the HLS
    /// rule of three target durations).
    #[arg(long, default_value_t = 3)]
    live_hold_back: u32,
    /// Start from a long-running deployment's state (caches, client networks' measurements); `--warm false`
    /// starts cold.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    warm: bool,
    /// Hours of the same demand the warm caches have served.
    #[arg(long, default_value_t = 24.0)]
    warm_hours: f64,
    /// Reports (of RTTs to every node of its close set) each client network made before a warm run.
    #[arg(long, default_value_t = 12)]
    warm_reports: usize,
    /// Requests compared with the truly closest node (each scans every node).
    #[arg(long, default_value_t = 2_000)]
    oracle_samples: u64,
    /// Run every policy for α = 0.6, 0.8, 1.0, 1.2 and write sweep.csv, offload_vs_alpha.svg and
    /// closest_error_cdf.svg into --out.
    #[arg(long)]
    sweep: bool,
    /// Directory for the sweep's CSV and SVG files.
    #[arg(long, default_value = "target/fog-sim")]
    out: PathBuf,
}

fn config(args: &Args, policy: Policy, alpha: f64) -> Config {
    let mut cfg = Config::new(args.nodes, args.clients, args.requests, args.seed);
    cfg.scenario = args.scenario;
    cfg.policy = policy;
    cfg.alpha = alpha;
    cfg.oracle_samples = args.oracle_samples;
    cfg.objects = args.objects.max(1);
    cfg.fit_rounds = args.fit_rounds;
    cfg.client_samples = args.client_samples.max(1);
    cfg.fill_through = !args.no_fill_through;
    cfg.homes = args.homes;
    cfg.cell_ms = args.cell_ms;
    cfg.live_push = args.live_push;
    cfg.buffer_secs = args.buffer_secs.max(0.0);
    cfg.startup_secs = args.startup_secs.max(0.0);
    cfg.live_hold_back = args.live_hold_back.max(1);
    cfg.warm = args.warm;
    cfg.warm_hours = args.warm_hours.max(0.0);
    cfg.warm_reports = args.warm_reports;
    if let Some(close) = args.close {
        cfg.params.close = close.max(1);
    }
    cfg
}

fn run(cfg: Config) -> Report {
    eprintln!(
        "fog-sim: {} nodes, {} clients, {} requests, {:?}, {:?}, α={}, seed {}, {}, {:?} homes",
        cfg.nodes,
        cfg.clients,
        cfg.requests,
        cfg.scenario,
        cfg.policy,
        cfg.alpha,
        cfg.seed,
        if cfg.warm { "warm" } else { "cold" },
        cfg.homes
    );
    Sim::new(cfg).run()
}

fn sweep(args: &Args) -> anyhow::Result<Vec<Report>> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let policies = [Policy::Coords, Policy::Region, Policy::Random];
    let mut reports = Vec::new();
    for alpha in [0.6, 0.8, 1.0, 1.2] {
        for policy in policies {
            let r = run(config(args, policy, alpha));
            eprintln!("{}", serde_json::to_string(&r)?);
            reports.push(r);
        }
    }
    let mut csv = String::from(
        "policy,alpha,offload_ratio,closest_error_ms_p50,closest_error_ms_p90,suboptimal_fraction,load_max_over_mean,origin_egress_p95_bps,startup_ms_p50,startup_ms_p95,rebuffer_ratio,stall_fraction,wall_s\n",
    );
    for r in &reports {
        csv.push_str(&format!(
            "{},{},{:.4},{:.2},{:.2},{:.4},{:.2},{:.0},{:.0},{:.0},{:.5},{:.4},{:.1}\n",
            serde_json::to_value(r.policy)?.as_str().unwrap_or("?"),
            r.alpha,
            r.offload_ratio,
            r.closest_error_ms_p50,
            r.closest_error_ms_p90,
            r.suboptimal_fraction,
            r.load_max_over_mean,
            r.origin_egress_p95_bps,
            r.startup_ms_p50,
            r.startup_ms_p95,
            r.rebuffer_ratio,
            r.stall_fraction,
            r.wall_s
        ));
    }
    std::fs::write(args.out.join("sweep.csv"), csv)?;
    let name = |p: Policy| serde_json::to_value(p).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
    let offload: Vec<(String, Vec<(f64, f64)>)> = policies
        .iter()
        .map(|p| (name(*p), reports.iter().filter(|r| r.policy == *p).map(|r| (r.alpha, r.offload_ratio)).collect()))
        .collect();
    std::fs::write(
        args.out.join("offload_vs_alpha.svg"),
        svg_chart("Offload vs Zipf α", "α", "offload ratio", &offload),
    )?;
    let cdf: Vec<(String, Vec<(f64, f64)>)> = policies
        .iter()
        .filter_map(|p| reports.iter().find(|r| r.policy == *p && (r.alpha - 0.8).abs() < 1e-9))
        .map(|r| {
            let n = r.closest_errors.len().max(1) as f64;
            let pts = r
                .closest_errors
                .iter()
                .enumerate()
                .filter(|(i, e)| **e <= 100.0 && i % (r.closest_errors.len() / 200).max(1) == 0)
                .map(|(i, e)| (f64::from(*e), (i + 1) as f64 / n))
                .collect();
            (name(r.policy), pts)
        })
        .collect();
    std::fs::write(
        args.out.join("closest_error_cdf.svg"),
        svg_chart("Closest-node error (α = 0.8)", "ms slower than the closest node", "fraction of picks", &cdf),
    )?;
    eprintln!("fog-sim: wrote sweep.csv, offload_vs_alpha.svg, closest_error_cdf.svg to {}", args.out.display());
    Ok(reports)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.live_push && args.homes == Homes::Neighbourhood {
        anyhow::bail!("--live-push pushes to cell homes: give --homes grid or --homes region");
    }
    if args.sweep {
        let reports = sweep(&args)?;
        println!("{}", serde_json::json!({ "runs": reports }));
    } else {
        let report = run(config(&args, args.policy, args.alpha));
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
