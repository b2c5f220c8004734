//! Network coordinates: Vivaldi with a height (Dabek et al., SIGCOMM 2004) plus the changes that made it hold
//! up on real networks (Ledlie et al., "Network Coordinates in the Wild", NSDI 2007):
//!
//! - a **latency filter**: nodes report a moving low percentile of raw RTTs (`fog_proto::rtt`), not samples;
//! - **neighbour decay**: a node's coordinate is fitted to all its recent neighbours at once, each weighted by
//!   the age of its sample, so one chatty neighbour cannot drag it around and departed ones fade out;
//! - four Euclidean dimensions plus a height (the access link every path in and out of a host shares).
//!
//! Pure code: the tracker and the simulator run it on their own samples.

use serde::{Deserialize, Serialize};

pub const DIMS: usize = 4;
/// Step-size constant c_c and error-smoothing constant c_e from the Vivaldi paper.
const CC: f32 = 0.25;
const CE: f32 = 0.25;
/// Heights below this (ms) are clamped: every host has some access delay.
const MIN_HEIGHT: f32 = 0.1;
const MIN_ERROR: f32 = 0.01;
const MAX_ERROR: f32 = 1.5;
/// A neighbour's sample counts fully when fresh and not at all after this long.
pub const NEIGHBOUR_TTL_MS: u64 = 10 * 60 * 1000;
/// RTTs outside this range (ms) are not believed.
pub const MAX_RTT_MS: f32 = 10_000.0;

/// A position in the coordinate space; the predicted RTT between two hosts is [`Coord::rtt_to`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Coord {
    pub pos: [f32; DIMS],
    pub height: f32,
    /// Relative error of this coordinate's predictions (1.0: no confidence yet).
    pub error: f32,
}

impl Default for Coord {
    fn default() -> Self {
        Self { pos: [0.0; DIMS], height: MIN_HEIGHT, error: 1.0 }
    }
}

/// splitmix64: a deterministic stream of pseudo-random numbers from a seed (also used by the benchmark and
/// the simulator, whose runs must repeat exactly).
pub fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A unit vector in a direction chosen by `seed`.
fn direction(seed: u64) -> [f32; DIMS] {
    let mut state = seed;
    let mut v = [0f32; DIMS];
    for x in &mut v {
        *x = (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.map(|x| x / norm)
}

impl Coord {
    /// Predicted RTT in milliseconds.
    pub fn rtt_to(&self, other: &Coord) -> f32 {
        let d: f32 = self.pos.iter().zip(&other.pos).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        d + self.height + other.height
    }

    /// One Vivaldi step: moves this coordinate so its prediction to `remote` agrees better with `rtt_ms`.
    /// `weight` (0..=1) scales the step (neighbour decay); `seed` picks the direction when the two
    /// coordinates coincide (deterministic, so runs repeat).
    pub fn update(&mut self, remote: &Coord, rtt_ms: f32, weight: f32, seed: u64) {
        if !(rtt_ms.is_finite() && rtt_ms > 0.0 && rtt_ms <= MAX_RTT_MS) || weight <= 0.0 {
            return;
        }
        let predicted = self.rtt_to(remote);
        // Trust our own position less, and move more, while we are less certain than the remote.
        let w = self.error / (self.error + remote.error).max(f32::EPSILON);
        let sample_error = (predicted - rtt_ms).abs() / rtt_ms;
        self.error = (sample_error * CE * w + self.error * (1.0 - CE * w)).clamp(MIN_ERROR, MAX_ERROR);
        let force = CC * w * weight.min(1.0) * (rtt_ms - predicted);
        let mut diff = [0f32; DIMS];
        for (d, (a, b)) in diff.iter_mut().zip(self.pos.iter().zip(&remote.pos)) {
            *d = a - b;
        }
        let mut norm = diff.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm < 1e-3 {
            diff = direction(seed);
            norm = 1.0;
        }
        // The unit vector of (x_i - x_j) in the height model: ((x_i - x_j), h_i + h_j) / (|x_i - x_j| + h_i + h_j).
        let total = norm + self.height + remote.height;
        for (p, d) in self.pos.iter_mut().zip(&diff) {
            *p += force * d / total;
        }
        self.height = (self.height + force * (self.height + remote.height) / total).max(MIN_HEIGHT);
    }
}

/// One neighbour's filtered RTT and when it was reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour<Id> {
    pub id: Id,
    pub rtt_ms: f32,
    pub at_ms: u64,
}

/// Weight of a sample of age `age_ms` (neighbour decay): 1 when fresh, falling linearly to 0.
pub fn decay(age_ms: u64) -> f32 {
    1.0 - (age_ms.min(NEIGHBOUR_TTL_MS) as f32 / NEIGHBOUR_TTL_MS as f32)
}

/// Merges `fresh` samples into `neighbours` (newest per id wins), drops expired ones and keeps at most
/// `max` (the freshest).
pub fn merge_neighbours<Id: PartialEq + Copy>(
    neighbours: &mut Vec<Neighbour<Id>>,
    fresh: impl IntoIterator<Item = Neighbour<Id>>,
    now_ms: u64,
    max: usize,
) {
    for n in fresh {
        match neighbours.iter_mut().find(|o| o.id == n.id) {
            Some(o) => *o = n,
            None => neighbours.push(n),
        }
    }
    neighbours.retain(|n| now_ms.saturating_sub(n.at_ms) < NEIGHBOUR_TTL_MS);
    if neighbours.len() > max {
        neighbours.sort_unstable_by_key(|n| std::cmp::Reverse(n.at_ms));
        neighbours.truncate(max);
    }
}

/// Refits `coord` against its neighbours (whose coordinates `lookup` gives), each weighted by age.
pub fn refit<Id: Copy>(
    coord: &mut Coord,
    neighbours: &[Neighbour<Id>],
    lookup: impl Fn(Id) -> Option<Coord>,
    now_ms: u64,
    seed: u64,
) {
    for (i, n) in neighbours.iter().enumerate() {
        if let Some(remote) = lookup(n.id) {
            coord.update(&remote, n.rtt_ms, decay(now_ms.saturating_sub(n.at_ms)), seed.wrapping_add(i as u64));
        }
    }
}

/// Fits a coordinate for a party that measured `samples` (landmark coordinate, RTT) but is not a landmark
/// itself (a client): the landmarks stay put. Robust to a few wrong or made-up RTTs: the fit is repeated
/// with samples that disagree with the rest (residual above 3× the median and 20 ms) down-weighted, and
/// those still disagreeing at the end are not counted. Returns the coordinate and the samples it agrees with.
pub fn fit_client(samples: &[(Coord, f32)], seed: u64) -> (Coord, usize) {
    let valid: Vec<(Coord, f32)> =
        samples.iter().copied().filter(|(_, r)| r.is_finite() && *r > 0.0 && *r <= MAX_RTT_MS).collect();
    let fit = |weights: &[f32]| {
        let mut c = Coord::default();
        for round in 0..32u64 {
            for (i, ((remote, rtt), w)) in valid.iter().zip(weights).enumerate() {
                c.update(remote, *rtt, *w, seed ^ (round << 16) ^ i as u64);
            }
        }
        c
    };
    let residuals = |c: &Coord| valid.iter().map(|(r, rtt)| (c.rtt_to(r) - rtt).abs()).collect::<Vec<f32>>();
    let limit_of = |res: &[f32]| {
        let mut sorted = res.to_vec();
        sorted.sort_by(f32::total_cmp);
        (3.0 * sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)).max(20.0)
    };
    let mut weights = vec![1.0f32; valid.len()];
    let mut coord = fit(&weights);
    for _ in 0..4 {
        let res = residuals(&coord);
        let limit = limit_of(&res);
        weights = res.iter().map(|r| if *r <= limit { 1.0 } else { (limit / r).powi(2) }).collect();
        coord = fit(&weights);
    }
    let res = residuals(&coord);
    let limit = limit_of(&res);
    (coord, res.iter().filter(|r| **r <= limit).count())
}

/// Coordinates of client networks (IPv4 /24, IPv6 /48), fitted from the RTTs their clients report; at
/// most `max` prefixes, the least recently updated evicted first.
#[derive(Debug)]
pub struct ClientCoords {
    map: std::collections::HashMap<std::net::IpAddr, (Coord, u64)>,
    max: usize,
}

impl ClientCoords {
    pub fn new(max: usize) -> Self {
        Self { map: std::collections::HashMap::new(), max: max.max(1) }
    }

    /// The network prefix a client address belongs to.
    pub fn prefix(ip: std::net::IpAddr) -> std::net::IpAddr {
        match ip {
            std::net::IpAddr::V4(v4) => std::net::IpAddr::V4((u32::from(v4) & 0xFFFF_FF00).into()),
            std::net::IpAddr::V6(v6) => std::net::IpAddr::V6((u128::from(v6) & !((1u128 << 80) - 1)).into()),
        }
    }

    pub fn get(&self, ip: std::net::IpAddr) -> Option<Coord> {
        self.map.get(&Self::prefix(ip)).map(|(c, _)| *c)
    }

    pub fn set(&mut self, ip: std::net::IpAddr, coord: Coord, now_ms: u64) {
        let prefix = Self::prefix(ip);
        if self.map.len() >= self.max && !self.map.contains_key(&prefix) {
            // Evict the oldest eighth at once, so eviction costs O(1) per insert on average.
            let mut ages: Vec<u64> = self.map.values().map(|(_, at)| *at).collect();
            let cut = ages.len() / 8;
            ages.select_nth_unstable(cut);
            let threshold = ages[cut];
            self.map.retain(|_, (_, at)| *at > threshold);
        }
        self.map.insert(prefix, (coord, now_ms));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hosts on a plane with access delays: a metric space Vivaldi with height can embed.
    fn world(n: usize) -> Vec<([f32; 2], f32)> {
        let mut s = 7u64;
        (0..n)
            .map(|_| {
                let x = (splitmix(&mut s) % 200) as f32;
                let y = (splitmix(&mut s) % 100) as f32;
                let access = 1.0 + (splitmix(&mut s) % 10) as f32;
                ([x, y], access)
            })
            .collect()
    }

    fn true_rtt(a: &([f32; 2], f32), b: &([f32; 2], f32)) -> f32 {
        ((a.0[0] - b.0[0]).powi(2) + (a.0[1] - b.0[1]).powi(2)).sqrt() + a.1 + b.1
    }

    #[test]
    fn converges_on_an_embeddable_world_and_predicts_within_a_few_percent() {
        let hosts = world(60);
        let mut coords = vec![Coord::default(); hosts.len()];
        let mut s = 11u64;
        for round in 0..300u64 {
            for i in 0..hosts.len() {
                // Each host measures 8 random neighbours per round.
                for _ in 0..8 {
                    let j = (splitmix(&mut s) % hosts.len() as u64) as usize;
                    if i != j {
                        let remote = coords[j];
                        coords[i].update(&remote, true_rtt(&hosts[i], &hosts[j]), 1.0, round * 1000 + i as u64);
                    }
                }
            }
        }
        let mut errors: Vec<f32> = Vec::new();
        for i in 0..hosts.len() {
            for j in 0..hosts.len() {
                if i != j {
                    let t = true_rtt(&hosts[i], &hosts[j]);
                    errors.push((coords[i].rtt_to(&coords[j]) - t).abs() / t);
                }
            }
        }
        errors.sort_by(f32::total_cmp);
        let median = errors[errors.len() / 2];
        assert!(median < 0.05, "median relative error {median}");
    }

    #[test]
    fn client_fit_ignores_a_lie_and_neighbours_decay() {
        let landmarks: Vec<Coord> = [[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0], [50.0, 50.0]]
            .iter()
            .map(|p| Coord { pos: [p[0], p[1], 0.0, 0.0], height: 1.0, error: 0.05 })
            .collect();
        let client = Coord { pos: [20.0, 30.0, 0.0, 0.0], height: 2.0, error: 0.0 };
        let mut samples: Vec<(Coord, f32)> = landmarks.iter().map(|l| (*l, l.rtt_to(&client))).collect();
        samples[3].1 = 1.0; // claims to be next to the far corner
        let (fitted, kept) = fit_client(&samples, 1);
        assert_eq!(kept, 4, "the lie was not dropped");
        for l in &landmarks {
            let (p, t) = (fitted.rtt_to(l), client.rtt_to(l));
            assert!((p - t).abs() < 0.1 * t + 2.0, "predicted {p} vs true {t}");
        }
        assert_eq!(decay(0), 1.0);
        assert_eq!(decay(NEIGHBOUR_TTL_MS), 0.0);
        let mut ns = vec![Neighbour { id: 1, rtt_ms: 10.0, at_ms: 0 }];
        merge_neighbours(&mut ns, [Neighbour { id: 2, rtt_ms: 20.0, at_ms: NEIGHBOUR_TTL_MS }], NEIGHBOUR_TTL_MS, 8);
        assert_eq!(ns.iter().map(|n| n.id).collect::<Vec<_>>(), vec![2], "an expired neighbour stayed");
    }

    #[test]
    fn client_coordinates_are_per_prefix_and_bounded() {
        let mut cc = ClientCoords::new(16);
        let c = Coord { pos: [1.0, 2.0, 3.0, 4.0], height: 1.0, error: 0.2 };
        cc.set("203.0.113.7".parse().expect("ip"), c, 1);
        assert_eq!(cc.get("203.0.113.200".parse().expect("ip")), Some(c));
        assert_eq!(cc.get("203.0.114.7".parse().expect("ip")), None);
        for i in 0..100u32 {
            cc.set(std::net::IpAddr::V4((i << 8).into()), c, 10 + u64::from(i));
        }
        assert!(cc.len() <= 16);
        assert!(cc.get(std::net::IpAddr::V4((99u32 << 8).into())).is_some(), "the newest was evicted");
    }
}
