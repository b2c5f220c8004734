//! What a run measured, as one JSON object (the last line `fog-sim` prints), and the CSV and SVG files of
//! a sweep.

use serde::Serialize;

use crate::player::Arrival;
use crate::{Config, Homes, Policy, Scenario};

/// A pick is suboptimal when it is more than this much, or this share, slower than the best node.
const SUBOPTIMAL_MS: f32 = 10.0;
const SUBOPTIMAL_RATIO: f32 = 1.2;

/// Counters collected while the simulation runs.
#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: u64,
    /// Bytes nodes delivered to clients.
    pub fog_bytes: u64,
    /// Bytes clients took from the origin directly (no node could serve).
    pub origin_bytes: u64,
    /// Bytes nodes pulled from the origin on misses, and from peers.
    pub origin_fill_bytes: u64,
    pub peer_fill_bytes: u64,
    /// Candidates that had left since the last snapshot (each costs the client a timeout).
    pub failed_attempts: u64,
    pub too_large: u64,
    /// Set once half the requests are done (at `steady_from`, simulated seconds): from then on what clients
    /// get and how they play it is measured.
    pub steady: bool,
    pub steady_from: f64,
    steady_all: u64,
    steady_origin: u64,
    closest_errors: Vec<f32>,
    suboptimal: u64,
    /// Players' startup delays, and their stalled and watch time (see `player`).
    startups: Vec<f64>,
    stalled_secs: f64,
    watch_secs: f64,
    /// Live: how far behind the live edge each session's playback ended.
    live_latencies: Vec<f64>,
    /// Chunks after a session's first, and how many took longer than their playback time.
    deliveries: u64,
    late: u64,
}

impl Metrics {
    /// Counts `bytes` delivered to a client, `from_origin` of them pulled from the origin on the way.
    pub fn delivered(&mut self, bytes: u64, from_origin: u64) {
        if self.steady {
            self.steady_all += bytes;
            self.steady_origin += from_origin;
        }
    }

    /// Live push: the tracker ingested `bytes` from the origin, for no client in particular.
    pub fn ingested(&mut self, bytes: u64) {
        self.origin_fill_bytes += bytes;
        if self.steady {
            self.steady_origin += bytes;
        }
    }

    pub fn closest_error(&mut self, picked_ms: f32, best_ms: f32) {
        let error = (picked_ms - best_ms).max(0.0);
        self.closest_errors.push(error);
        if error > SUBOPTIMAL_MS || picked_ms > SUBOPTIMAL_RATIO * best_ms {
            self.suboptimal += 1;
        }
    }

    /// A chunk arrived `secs` after the player asked for it, with what that did to playback. `first`: the
    /// session's first chunk (not counted as late: a later one slower than its playback time would stall a
    /// player that buffers one chunk ahead).
    pub fn chunk(&mut self, first: bool, secs: f64, chunk_secs: f64, arrival: &Arrival) {
        if let Some(startup) = arrival.startup {
            self.startups.push(startup);
        }
        self.stalled_secs += arrival.stall;
        self.watch_secs += arrival.watch;
        if !first {
            self.deliveries += 1;
            if secs > chunk_secs {
                self.late += 1;
            }
        }
    }

    pub fn live_latency(&mut self, secs: f64) {
        self.live_latencies.push(secs);
    }

    /// `warm_share`: the share of the catalogue a node's warm cache holds; `phases`: wall seconds per phase.
    pub fn finish(
        mut self,
        cfg: &Config,
        sim_secs: f64,
        origin_per_sec: &[u64],
        loads: &[f64],
        warm_share: Option<f64>,
        phases: Vec<(&'static str, f64)>,
    ) -> Report {
        let all = (self.fog_bytes + self.origin_bytes).max(1) as f64;
        let from_origin = (self.origin_bytes + self.origin_fill_bytes) as f64;
        // Egress over the measured seconds (whole ones; seconds without origin traffic count as zero).
        let from = (self.steady_from.ceil() as usize).min(sim_secs as usize);
        let mut egress: Vec<f64> = origin_per_sec.iter().skip(from).map(|b| *b as f64 * 8.0).collect();
        egress.resize((sim_secs as usize).saturating_sub(from).max(1), 0.0);
        egress.sort_by(f64::total_cmp);
        self.closest_errors.sort_by(f32::total_cmp);
        self.startups.sort_by(f64::total_cmp);
        self.live_latencies.sort_by(f64::total_cmp);
        let live = |p: f64| (cfg.scenario == Scenario::Live).then(|| percentile(&self.live_latencies, p) * 1000.0);
        let mean_load = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
        let max_load = loads.iter().copied().fold(0.0, f64::max);
        Report {
            nodes: cfg.nodes,
            clients: cfg.clients,
            requests: self.requests,
            seed: cfg.seed,
            scenario: cfg.scenario,
            policy: cfg.policy,
            homes: cfg.homes,
            alpha: cfg.alpha,
            offload_ratio: 1.0 - self.steady_origin as f64 / self.steady_all.max(1) as f64,
            offload_ratio_whole_run: 1.0 - from_origin / all,
            peer_fill_share: self.peer_fill_bytes as f64 / all,
            origin_egress_p95_bps: percentile(&egress, 0.95),
            closest_error_ms_p50: f64::from(percentile(&self.closest_errors, 0.5)),
            closest_error_ms_p90: f64::from(percentile(&self.closest_errors, 0.9)),
            suboptimal_fraction: self.suboptimal as f64 / self.closest_errors.len().max(1) as f64,
            load_max_over_mean: if mean_load > 0.0 { max_load / mean_load } else { 0.0 },
            startup_ms_p50: percentile(&self.startups, 0.5) * 1000.0,
            startup_ms_p95: percentile(&self.startups, 0.95) * 1000.0,
            rebuffer_ratio: self.stalled_secs / self.watch_secs.max(f64::MIN_POSITIVE),
            live_latency_ms_p50: live(0.5),
            live_latency_ms_p95: live(0.95),
            stall_fraction: self.late as f64 / self.deliveries.max(1) as f64,
            failed_attempts: self.failed_attempts,
            sim_secs,
            measured_from_s: self.steady_from,
            warm: cfg.warm.then_some(cfg.warm_hours),
            warm_cache_share: warm_share,
            buffer_secs: cfg.buffer_secs,
            wall_s: phases.iter().map(|p| p.1).sum(),
            wall_phases_s: phases.into_iter().collect(),
            closest_errors: self.closest_errors,
        }
    }
}

fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub nodes: usize,
    pub clients: usize,
    pub requests: u64,
    pub seed: u64,
    pub scenario: Scenario,
    pub policy: Policy,
    pub homes: Homes,
    pub alpha: f64,
    /// Bytes clients got that did not come from the origin, over all bytes clients got, in the second half
    /// of the run (steady state: caches have warmed up).
    pub offload_ratio: f64,
    /// The same over the whole run, cold start included.
    pub offload_ratio_whole_run: f64,
    /// Bytes nodes filled from peers, over all bytes clients got.
    pub peer_fill_share: f64,
    /// 95th percentile over the measured simulated seconds of the origin's egress, bits/s.
    pub origin_egress_p95_bps: f64,
    /// How much slower the first candidate is than the truly closest online node (sampled requests).
    pub closest_error_ms_p50: f64,
    pub closest_error_ms_p90: f64,
    pub suboptimal_fraction: f64,
    /// Max over mean of nodes' utilisation (bytes served / (upload × time online)).
    pub load_max_over_mean: f64,
    /// Time from pressing play until playback starts (see `player`), over sessions that started measured.
    pub startup_ms_p50: f64,
    pub startup_ms_p95: f64,
    /// Stalled time over watch time (playing plus stalled), summed over the measured chunks.
    pub rebuffer_ratio: f64,
    /// Live: how far behind the live edge sessions' playback ended.
    pub live_latency_ms_p50: Option<f64>,
    pub live_latency_ms_p95: Option<f64>,
    /// Share of chunks (after a session's first) that took longer to arrive than their playback time: what a
    /// player buffering only one chunk ahead would stall on.
    pub stall_fraction: f64,
    pub failed_attempts: u64,
    pub sim_secs: f64,
    /// When measuring began (half the requests done), simulated seconds.
    pub measured_from_s: f64,
    /// Hours of demand the warm start assumed (none: a cold start), and the share of the catalogue a node's
    /// warm cache held before its disk limited it.
    pub warm: Option<f64>,
    pub warm_cache_share: Option<f64>,
    pub buffer_secs: f64,
    /// Wall time in all and per phase (building the world and fitting coordinates, the warm start, the run).
    pub wall_s: f64,
    pub wall_phases_s: std::collections::BTreeMap<&'static str, f64>,
    #[serde(skip)]
    pub closest_errors: Vec<f32>,
}

/// A line chart as a standalone SVG: one polyline per series, axes with min/max labels.
pub fn svg_chart(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, m) = (640.0, 400.0, 60.0);
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, 0.0f64, f64::MIN);
    for &(x, y) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let sx = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
    let sy = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 2.0 * m);
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n\
         <line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x_label}</text>\n\
         <text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">{y_label}</text>\n\
         <text x=\"{m}\" y=\"{}\" text-anchor=\"middle\">{x0:.3}</text><text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{x1:.3}</text>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y0:.3}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y1:.3}</text>\n",
        w / 2.0,
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 16.0,
        h / 2.0,
        h / 2.0,
        h - m + 16.0,
        w - m,
        h - m + 16.0,
        m - 4.0,
        h - m,
        m - 4.0,
        m + 4.0,
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = colours[i % colours.len()];
        let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{colour}\">{name}</text>\n",
            path.join(" "),
            w - m - 120.0,
            m + 16.0 * (i as f64 + 1.0)
        ));
    }
    out.push_str("</svg>\n");
    out
}
