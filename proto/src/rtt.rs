//! RTT filtering: raw round-trip times are noisy (queueing, a busy peer, a lost packet), and one spike would
//! throw a network coordinate far off. Like Ledlie et al.'s latency filter we keep a short window of raw
//! samples per peer and report a low percentile of it, so the estimate follows real path changes within a
//! window but ignores transient delay. Memory is fixed: `WINDOW` samples per peer.

use std::collections::VecDeque;

/// Raw samples kept per peer.
pub const WINDOW: usize = 16;
/// Which percentile of the window is reported (0.25: robust to queueing spikes, not just the minimum).
pub const PERCENTILE: f32 = 0.25;

/// A moving-percentile filter over the last [`WINDOW`] RTT samples.
#[derive(Debug, Clone, Default)]
pub struct RttFilter {
    samples: VecDeque<f32>,
}

impl RttFilter {
    /// Adds one raw sample in milliseconds; non-finite or negative samples are ignored.
    pub fn add(&mut self, rtt_ms: f32) {
        if !rtt_ms.is_finite() || rtt_ms < 0.0 {
            return;
        }
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(rtt_ms);
    }

    /// The filtered RTT, or `None` before the first sample.
    pub fn estimate(&self) -> Option<f32> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted: Vec<f32> = self.samples.iter().copied().collect();
        sorted.sort_by(f32::total_cmp);
        let index = ((sorted.len() - 1) as f32 * PERCENTILE).round() as usize;
        Some(sorted[index])
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spikes_do_not_move_the_estimate_and_memory_is_bounded() {
        let mut f = RttFilter::default();
        assert_eq!(f.estimate(), None);
        for i in 0..100 {
            // A 40 ms path with every fourth sample delayed by queueing.
            f.add(if i % 4 == 0 { 400.0 } else { 40.0 + (i % 3) as f32 });
        }
        assert_eq!(f.len(), WINDOW);
        let e = f.estimate().expect("has samples");
        assert!((40.0..=42.0).contains(&e), "estimate {e}");
        f.add(f32::NAN);
        f.add(-1.0);
        assert_eq!(f.len(), WINDOW);
    }

    #[test]
    fn follows_a_lasting_path_change_within_a_window() {
        let mut f = RttFilter::default();
        for _ in 0..WINDOW {
            f.add(20.0);
        }
        for _ in 0..WINDOW {
            f.add(80.0);
        }
        assert_eq!(f.estimate(), Some(80.0));
    }
}
