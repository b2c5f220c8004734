//! Which of several tracker URLs to ask: the replicas of one cell (`--tracker URL,URL…`), or one URL
//! (perhaps a load balancer). Pure: no I/O, the caller passes the time; [`crate::tracker::TrackerClient`]
//! applies it to every request of nodes and clients alike.
//!
//! The rules: stick to the tracker that last answered (its caches are warm, and a node's heartbeats land
//! where it is known); when it is unavailable (no connection, a timeout, a 5xx) try the next; a URL that
//! failed waits out a backoff of its own before it is tried again, so a dead replica is not hammered and a
//! recovered one is used again later. A definite answer (a 4xx, a signed refusal) is never a reason to move:
//! every replica would give the same.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;

/// A failed URL is skipped for 1 s at first, doubling up to a minute while it keeps failing.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Most URLs in one list: each is one replica, and a cell has a handful.
pub const MAX_TRACKERS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrackerListError {
    #[error("no tracker URL given")]
    Empty,
    #[error("{0:?} is not an http(s) URL")]
    NotHttp(String),
    #[error("at most {MAX_TRACKERS} tracker URLs")]
    TooMany,
}

/// Splits `--tracker URL[,URL…]` into base URLs (trimmed, without a trailing `/`).
pub fn parse_list(list: &str) -> Result<Vec<String>, TrackerListError> {
    let urls: Vec<String> =
        list.split(',').map(|u| u.trim().trim_end_matches('/').to_string()).filter(|u| !u.is_empty()).collect();
    if urls.is_empty() {
        return Err(TrackerListError::Empty);
    }
    if urls.len() > MAX_TRACKERS {
        return Err(TrackerListError::TooMany);
    }
    if let Some(bad) = urls.iter().find(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
        return Err(TrackerListError::NotHttp(bad.clone()));
    }
    Ok(urls)
}

/// How one request to one URL went, as far as choosing a tracker goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The tracker answered: a success or a definite refusal.
    Answered,
    /// No usable answer: no connection, a timeout, a 5xx, a body that is not the tracker's.
    Unavailable,
}

/// The failover policy over a fixed, non-empty list of tracker URLs.
#[derive(Debug, Clone)]
pub struct Failover {
    urls: Vec<String>,
    /// The URL that answered last: tried first.
    current: usize,
    /// Per URL: not tried before this instant (unless nothing else is left), and its growing delay.
    skip_until: Vec<Option<Instant>>,
    backoffs: Vec<Backoff>,
    failovers: u64,
}

impl Failover {
    /// `urls` must not be empty ([`parse_list`] ensures it).
    pub fn new(urls: Vec<String>) -> Self {
        assert!(!urls.is_empty(), "a tracker list has at least one URL");
        let n = urls.len();
        Self {
            urls,
            current: 0,
            skip_until: vec![None; n],
            backoffs: vec![Backoff::new(FIRST_BACKOFF, MAX_BACKOFF); n],
            failovers: 0,
        }
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// The index of the URL that answered last (the first until one has).
    pub fn current(&self) -> usize {
        self.current
    }

    /// How many times the tracker that answered changed.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// The URLs (indices) to try for one request, in order: the current one, then the others after it in
    /// list order, leaving out those waiting out a backoff. When every one is, only the one whose backoff
    /// ends first: a request is still made (a single URL behaves as it always did), but no more than one.
    pub fn plan(&self, now: Instant) -> Vec<usize> {
        let n = self.urls.len();
        let ring = (0..n).map(|k| (self.current + k) % n);
        let ready: Vec<usize> = ring.clone().filter(|&i| self.skip_until[i].is_none_or(|t| t <= now)).collect();
        if !ready.is_empty() {
            return ready;
        }
        ring.min_by_key(|&i| self.skip_until[i]).into_iter().collect()
    }

    /// Notes how a request to URL `i` went. Returns true when an answer came from another URL than the
    /// current one (a failover), which becomes the current one.
    pub fn record(&mut self, i: usize, outcome: Outcome, now: Instant) -> bool {
        match outcome {
            Outcome::Answered => {
                self.skip_until[i] = None;
                self.backoffs[i].reset();
                if i == self.current {
                    return false;
                }
                self.current = i;
                self.failovers += 1;
                true
            }
            Outcome::Unavailable => {
                self.skip_until[i] = Some(now + self.backoffs[i].next_delay());
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Failover {
        Failover::new(parse_list("http://a:1, http://b:2/ ,http://c:3").expect("valid"))
    }

    #[test]
    fn lists_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_list("http://t:7700/").expect("one"), vec!["http://t:7700"]);
        assert_eq!(three().urls(), ["http://a:1", "http://b:2", "http://c:3"]);
        assert_eq!(parse_list(" , "), Err(TrackerListError::Empty));
        assert_eq!(parse_list("http://a,t:7700"), Err(TrackerListError::NotHttp("t:7700".into())));
        assert_eq!(parse_list(&vec!["http://a"; MAX_TRACKERS + 1].join(",")), Err(TrackerListError::TooMany));
    }

    #[test]
    fn sticks_to_the_tracker_that_answered_and_fails_over_past_dead_ones() {
        let mut f = three();
        let now = Instant::now();
        assert_eq!(f.plan(now), [0, 1, 2]);
        // a refuses connections, b answers: b becomes current and stays so.
        assert!(!f.record(0, Outcome::Unavailable, now));
        assert!(f.record(1, Outcome::Answered, now));
        assert_eq!((f.current(), f.failovers()), (1, 1));
        assert_eq!(f.plan(now), [1, 2], "a is backing off");
        // Long after a's backoff ended, b still comes first: a is only a fallback now.
        let later = now + MAX_BACKOFF * 2;
        assert_eq!(f.plan(later), [1, 2, 0]);
        assert!(!f.record(1, Outcome::Answered, later));
        assert_eq!(f.failovers(), 1);
    }

    #[test]
    fn a_definite_answer_moves_nothing() {
        let mut f = three();
        let now = Instant::now();
        // A refusal (4xx) is an answer: the current tracker stays, nothing backs off.
        assert!(!f.record(0, Outcome::Answered, now));
        assert_eq!(f.plan(now), [0, 1, 2]);
        assert_eq!(f.failovers(), 0);
    }

    #[test]
    fn backoff_per_url_grows_while_it_fails_and_resets_when_it_answers() {
        let mut f = three();
        let now = Instant::now();
        let mut until = now;
        for round in 0..6u32 {
            f.record(2, Outcome::Unavailable, until);
            let step = (FIRST_BACKOFF * 2u32.pow(round)).min(MAX_BACKOFF);
            let skip = f.skip_until[2].expect("backing off") - until;
            assert!(skip >= step / 2 && skip <= step, "round {round}: {skip:?} outside [{:?}, {step:?}]", step / 2);
            assert_eq!(f.plan(until), [0, 1]);
            until += skip;
        }
        assert_eq!(f.plan(until), [0, 1, 2], "retried once its backoff ends");
        f.record(2, Outcome::Answered, until);
        f.record(2, Outcome::Unavailable, until);
        assert!(f.skip_until[2].expect("backing off") - until <= FIRST_BACKOFF, "reset after an answer");
    }

    #[test]
    fn with_every_url_backing_off_one_is_still_tried_the_first_due() {
        let mut f = three();
        let now = Instant::now();
        for i in [0, 1, 2] {
            f.record(i, Outcome::Unavailable, now);
        }
        // Push b further out: a and c are due first; of them, whichever ends first is the one tried.
        f.record(1, Outcome::Unavailable, now + MAX_BACKOFF);
        let plan = f.plan(now);
        assert_eq!(plan.len(), 1);
        let first_due = [0, 2].into_iter().min_by_key(|&i| f.skip_until[i]).expect("two");
        assert_eq!(plan, [first_due]);
        // One URL: always tried, however often it failed (as before lists existed).
        let mut one = Failover::new(vec!["http://t".into()]);
        for _ in 0..10 {
            one.record(0, Outcome::Unavailable, now);
            assert_eq!(one.plan(now), [0]);
        }
        assert_eq!(one.failovers(), 0);
    }
}
