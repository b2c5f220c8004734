//! Retry delays for long-lived links (tracker registration, rendezvous attachment): exponential, capped,
//! with jitter so that nodes which lost the tracker together do not all return in the same second.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays start at `first` and double up to `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { first, max, next: first }
    }

    /// How long to wait before the next attempt: between half and all of the current step, which then
    /// doubles.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    /// After a success: the next failure starts from the first step again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_within_their_jitter_and_reset() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(30));
        let mut b = Backoff::new(first, max);
        let mut step = first;
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "{d:?} outside [{:?}, {step:?}]", step / 2);
            step = (step * 2).min(max);
        }
        assert_eq!(step, max);
        b.reset();
        assert!(b.next_delay() <= first);
    }
}
