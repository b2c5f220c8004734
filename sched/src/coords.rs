//! Network coordinates: Vivaldi with a height (Dabek et al., SIGCOMM 2004) plus the changes that made it hold
//! up on real networks (Ledlie et al., "Network Coordinates in the Wild", NSDI 2007):
//!
//! - a **latency filter**: nodes report a moving low percentile of raw RTTs (`fog_proto::rtt`), not samples;
//! - **neighbour decay**: a node's coordinate is fitted to all its recent neighbours at once, each weighted by
//!   the age of its sample, so one chatty neighbour cannot drag it around and departed ones fade out;
//! - four Euclidean dimensions plus a height (the access link every path in and out of a host shares).
//!
//! Pure code: the tracker and the simulator run it on their own samples.

use fog_proto::api::RttSample;
use fog_proto::NodeId;
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
/// those still disagreeing at the end are not counted. Returns the coordinate and, per sample, whether it
/// agrees with the fit (unbelievable RTTs never do). `previous`, the party's last fit, is where the fit
/// starts: a few rounds then suffice (clients report every few seconds, mostly the same nodes again).
pub fn fit_client(samples: &[(Coord, f32)], previous: Option<Coord>, seed: u64) -> (Coord, Vec<bool>) {
    let believable = |r: f32| r.is_finite() && r > 0.0 && r <= MAX_RTT_MS;
    let valid: Vec<(Coord, f32)> = samples.iter().copied().filter(|(_, r)| believable(*r)).collect();
    let (rounds, reweights) = if previous.is_some() { (4u64, 1) } else { (32, 4) };
    let fit = |weights: &[f32]| {
        let mut c = previous.unwrap_or_default();
        for round in 0..rounds {
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
    for _ in 0..reweights {
        let res = residuals(&coord);
        let limit = limit_of(&res);
        weights = res.iter().map(|r| if *r <= limit { 1.0 } else { (limit / r).powi(2) }).collect();
        coord = fit(&weights);
    }
    let res = residuals(&coord);
    let limit = limit_of(&res);
    let mut agrees = res.into_iter().map(|r| r <= limit);
    (coord, samples.iter().map(|(_, r)| believable(*r) && agrees.next().unwrap_or(false)).collect())
}

/// RTTs kept per client network: the lowest ones, which are what ranking the closest nodes needs.
pub const MAX_MEASURED: usize = 32;
/// Samples that must agree before a client network gets a coordinate.
const MIN_AGREEING: usize = 3;

/// Where a client network is: a coordinate fitted from the RTTs its clients measured to nodes, and those RTTs
/// themselves, which the scheduler prefers to predictions ("measure, don't only predict").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientNet {
    pub coord: Option<Coord>,
    /// At most [`MAX_MEASURED`], lowest first.
    pub measured: Vec<Measured>,
}

/// One RTT a client network measured to a node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub node: NodeId,
    pub rtt_ms: f32,
    /// Whether it agrees with the coordinate fitted from all of them.
    pub agrees: bool,
}

impl Measured {
    /// The RTT to rank the node by, given the predicted one. The tracker validates rather than trusts: an RTT
    /// that disagrees with the rest may make a node look farther (the node's own coordinate may be wrong,
    /// and remembering that keeps it from being tried again) but never closer, so a client inventing a 1 ms
    /// path to some node cannot send its neighbours' requests there.
    pub fn effective(&self, predicted_ms: f32) -> f32 {
        if self.agrees {
            self.rtt_ms
        } else {
            self.rtt_ms.max(predicted_ms)
        }
    }
}

impl ClientNet {
    /// Folds in newly reported RTTs (they replace older ones to the same node) and refits the coordinate over
    /// all of them whose node has a coordinate (`coord_of`), marking which agree with the fit.
    pub fn learn(&mut self, samples: &[RttSample], coord_of: impl Fn(&NodeId) -> Option<Coord>, seed: u64) {
        let believable = |r: f32| r.is_finite() && r > 0.0 && r <= MAX_RTT_MS;
        for &RttSample { peer: node, rtt_ms } in samples.iter().filter(|s| believable(s.rtt_ms)) {
            match self.measured.iter_mut().find(|m| m.node == node) {
                Some(m) => m.rtt_ms = rtt_ms,
                None => self.measured.push(Measured { node, rtt_ms, agrees: false }),
            }
        }
        let located: Vec<(usize, Coord)> =
            self.measured.iter().enumerate().filter_map(|(i, m)| Some((i, coord_of(&m.node)?))).collect();
        let fit: Vec<(Coord, f32)> = located.iter().map(|&(i, c)| (c, self.measured[i].rtt_ms)).collect();
        if fit.len() >= MIN_AGREEING {
            let (coord, agrees) = fit_client(&fit, self.coord, seed);
            if agrees.iter().filter(|a| **a).count() >= MIN_AGREEING {
                self.coord = Some(coord);
                self.measured.iter_mut().for_each(|m| m.agrees = false);
                for (&(i, _), ok) in located.iter().zip(agrees) {
                    self.measured[i].agrees = ok;
                }
            }
        }
        self.measured.sort_by(|a, b| a.rtt_ms.total_cmp(&b.rtt_ms).then(a.node.cmp(&b.node)));
        self.measured.truncate(MAX_MEASURED);
    }
}

/// Client networks (IPv4 /24, IPv6 /48) and what their clients reported; at most `max` prefixes, the least
/// recently updated evicted first.
#[derive(Debug)]
pub struct ClientCoords {
    map: std::collections::HashMap<std::net::IpAddr, (ClientNet, u64)>,
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

    pub fn get(&self, ip: std::net::IpAddr) -> Option<ClientNet> {
        self.map.get(&Self::prefix(ip)).map(|(c, _)| c.clone())
    }

    /// Folds RTTs a client at `ip` reported into its network's [`ClientNet`].
    pub fn learn(
        &mut self,
        ip: std::net::IpAddr,
        samples: &[RttSample],
        coord_of: impl Fn(&NodeId) -> Option<Coord>,
        now_ms: u64,
    ) {
        let prefix = Self::prefix(ip);
        if self.map.len() >= self.max && !self.map.contains_key(&prefix) {
            // Evict the oldest eighth at once, so eviction costs O(1) per insert on average.
            let mut ages: Vec<u64> = self.map.values().map(|(_, at)| *at).collect();
            let cut = ages.len() / 8;
            ages.select_nth_unstable(cut);
            let threshold = ages[cut];
            self.map.retain(|_, (_, at)| *at > threshold);
        }
        let (net, at) = self.map.entry(prefix).or_default();
        net.learn(samples, coord_of, now_ms);
        *at = now_ms;
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
        let (fitted, agrees) = fit_client(&samples, None, 1);
        assert_eq!(agrees, vec![true, true, true, false, true], "the lie was not singled out");
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

    fn id(i: u8) -> NodeId {
        NodeId([i; 32])
    }

    fn rtt(i: u8, rtt_ms: f32) -> RttSample {
        RttSample { peer: id(i), rtt_ms }
    }

    /// Landmarks 1..=5 at the corners and centre of a 100 ms square.
    fn landmark(id: &NodeId) -> Option<Coord> {
        let p = [[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0], [50.0, 50.0]]
            .get(usize::from(id.0[0]).checked_sub(1)?)?;
        Some(Coord { pos: [p[0], p[1], 0.0, 0.0], height: 1.0, error: 0.05 })
    }

    #[test]
    fn client_coordinates_are_per_prefix_and_bounded() {
        let mut cc = ClientCoords::new(16);
        let samples: Vec<RttSample> = (1..=5).map(|i| rtt(i, 40.0 + f32::from(i))).collect();
        cc.learn("203.0.113.7".parse().expect("ip"), &samples, landmark, 1);
        let net = cc.get("203.0.113.200".parse().expect("ip")).expect("same /24");
        assert!(net.coord.is_some() && net.measured.len() == 5);
        assert_eq!(cc.get("203.0.114.7".parse().expect("ip")), None);
        for i in 0..100u32 {
            cc.learn(std::net::IpAddr::V4((i << 8).into()), &samples, landmark, 10 + u64::from(i));
        }
        assert!(cc.len() <= 16);
        assert!(cc.get(std::net::IpAddr::V4((99u32 << 8).into())).is_some(), "the newest was evicted");
    }

    #[test]
    fn measured_rtts_are_validated_merged_and_bounded() {
        let client = Coord { pos: [20.0, 30.0, 0.0, 0.0], height: 2.0, error: 0.0 };
        let truth = |i: u8| client.rtt_to(&landmark(&id(i)).expect("landmark"));
        let mut net = ClientNet::default();
        // Two samples cannot place anyone: kept, but no coordinate yet.
        net.learn(&[rtt(1, truth(1)), rtt(2, truth(2))], landmark, 1);
        assert!(net.coord.is_none() && net.measured.len() == 2 && net.measured.iter().all(|m| !m.agrees));
        // The rest, with a made-up 1 ms path to the far corner: once the fit shows it disagrees, it can make
        // that node look no closer than predicted.
        net.learn(&[rtt(3, truth(3)), rtt(4, 1.0), rtt(5, truth(5))], landmark, 2);
        assert!(net.coord.is_some());
        let lie = net.measured.iter().find(|m| m.node == id(4)).expect("kept");
        assert!(!lie.agrees && lie.effective(130.0) == 130.0, "{lie:?}");
        assert!(net.measured.iter().filter(|m| m.node != id(4)).all(|m| m.agrees && m.effective(500.0) < 100.0));
        // A newer RTT to a node replaces the older one; nodes without a coordinate are kept, lowest first.
        net.learn(&[rtt(1, truth(1) + 1.0)], landmark, 3);
        assert_eq!(net.measured.iter().filter(|m| m.node == id(1)).count(), 1);
        let many: Vec<RttSample> = (100..140).map(|i| rtt(i, f32::from(i))).collect();
        net.learn(&many, landmark, 4);
        assert_eq!(net.measured.len(), MAX_MEASURED);
        assert!(net.measured.windows(2).all(|w| w[0].rtt_ms <= w[1].rtt_ms), "not lowest first");
        assert!(net.measured.iter().any(|m| m.node == id(5)), "a close landmark was pushed out by farther nodes");
    }
}
