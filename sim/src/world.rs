//! The synthetic Internet: regions on a plane, hosts scattered around their region's centre, each behind an
//! access link of its own, and a share of host pairs whose path takes a detour (routing that violates the
//! triangle inequality), so coordinates are no easier to fit than on real latency data.

use fog_sched::coords::splitmix;
use rand::rngs::StdRng;
use rand::Rng;

/// Plane size (ms of propagation) and host spread around a region's centre.
const WIDTH: f32 = 400.0;
const HEIGHT: f32 = 200.0;
const SPREAD: f32 = 12.0;
/// Share of host pairs whose path detours, and how much longer it gets (×1.3 to ×2.5).
const DETOUR_PERCENT: u64 = 15;

#[derive(Debug, Clone, Copy)]
pub struct Host {
    /// Unique across nodes and clients; seeds the pair's detour.
    pub id: u32,
    pub region: u16,
    pub pos: [f32; 2],
    /// Access-link delay, ms, added once to every RTT through this host.
    pub access: f32,
}

#[derive(Debug, Clone)]
pub struct World {
    pub centres: Vec<[f32; 2]>,
}

/// A normal draw (Box–Muller).
fn normal(rng: &mut StdRng) -> f32 {
    let (u, v): (f32, f32) = (rng.gen_range(1e-6..1.0), rng.gen());
    (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
}

impl World {
    pub fn new(regions: usize, rng: &mut StdRng) -> Self {
        Self { centres: (0..regions).map(|_| [rng.gen::<f32>() * WIDTH, rng.gen::<f32>() * HEIGHT]).collect() }
    }

    /// A host in a uniformly chosen region.
    pub fn host(&self, id: u32, rng: &mut StdRng) -> Host {
        let region = rng.gen_range(0..self.centres.len());
        let c = self.centres[region];
        // Access delay: mostly 2–10 ms, a heavy tail to ~60 ms (DSL, Wi-Fi, mobile).
        let access = (2.0 + rng.gen::<f32>().powi(3) * 58.0).min(60.0);
        Host { id, region: region as u16, pos: [c[0] + normal(rng) * SPREAD, c[1] + normal(rng) * SPREAD], access }
    }

    /// The true round-trip time between two hosts, ms.
    pub fn rtt(a: &Host, b: &Host) -> f32 {
        if a.id == b.id {
            return 0.0;
        }
        let d = ((a.pos[0] - b.pos[0]).powi(2) + (a.pos[1] - b.pos[1]).powi(2)).sqrt();
        let base = d + a.access + b.access;
        let (lo, hi) = (a.id.min(b.id) as u64, a.id.max(b.id) as u64);
        let h = splitmix(&mut ((lo << 32) | hi));
        if h % 100 < DETOUR_PERCENT {
            base * (1.3 + ((h >> 8) % 1000) as f32 / 1000.0 * 1.2)
        } else {
            base
        }
    }
}
