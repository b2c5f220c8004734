//! The owner's monthly upload budget (`--monthly-upload`): chunk bytes sent to clients and to peers in one
//! calendar month of local time.
//!
//! A response reserves its whole length before its first byte goes out, and is refused (`Busy`) if that
//! would take the month past the budget; each piece sent moves from reserved to used, and what a response
//! did not send is given back when it ends. So the budget is never exceeded, and a reservation costs at
//! most one chunk that was not sent. The month's count is kept in the chunk store ([`Store::set_state`])
//! at most every [`PERSIST_EVERY`], used and reserved together (a crash then over-counts what was in
//! flight rather than forgetting what was sent), and read back at start-up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::Store;

/// The store key of the month's count.
const STATE_KEY: &str = "monthly_upload";
/// How often, at most, the count is written while it moves.
pub const PERSIST_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Budget {
    limit: u64,
    store: Arc<Store>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// `YYYY-MM`, local time.
    month: String,
    /// Sent this month.
    used: u64,
    /// Promised to responses under way, not sent yet.
    reserved: u64,
    /// What the store holds, and when it was written.
    persisted: u64,
    persisted_at: Option<Instant>,
}

/// Why a response may not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the owner's monthly upload budget of {limit} bytes has {left} left, less than this response's {wanted}")]
pub struct Exhausted {
    pub limit: u64,
    pub left: u64,
    pub wanted: u64,
}

/// Bytes a response may send, counted as they go; what it did not send is given back when it is dropped.
#[derive(Debug)]
pub struct Reservation<'a> {
    budget: Option<&'a Budget>,
    unsent: u64,
}

impl Reservation<'_> {
    /// A reservation of nothing, for responses without a payload or a node without a budget.
    pub fn none() -> Self {
        Reservation { budget: None, unsent: 0 }
    }

    /// `n` bytes went out.
    pub fn sent(&mut self, n: u64) {
        let Some(budget) = self.budget else { return };
        let n = n.min(self.unsent);
        self.unsent -= n;
        let mut s = budget.state.lock().expect("budget lock");
        s.reserved -= n;
        s.used += n;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(budget) = self.budget {
            let mut s = budget.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            s.reserved -= self.unsent;
        }
    }
}

impl Budget {
    /// A budget of `limit` bytes for `month` (`YYYY-MM`), resuming the count the store kept for it.
    pub fn open(limit: u64, store: Arc<Store>, month: &str) -> Self {
        let kept = match store.state(STATE_KEY) {
            Ok(v) => v.and_then(|v| decode(&v)),
            Err(e) => {
                tracing::error!(error = %e, "cannot read this month's upload count; counting from zero");
                None
            }
        };
        let used = kept.filter(|(m, _)| m == month).map_or(0, |(_, used)| used);
        if store.damaged().is_some() {
            tracing::warn!(
                "the chunk store was rebuilt after damage: this month's upload count starts again from zero"
            );
        }
        tracing::info!(limit, used, month, "monthly upload budget");
        let state = State { month: month.to_string(), used, reserved: 0, persisted: used, persisted_at: None };
        Self { limit, store, state: Mutex::new(state) }
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether `len` more bytes fit this month, without reserving them (a check before costly work).
    pub fn check(&self, len: u64) -> Result<(), Exhausted> {
        let s = self.state.lock().expect("budget lock");
        self.fits(&s, len)
    }

    fn fits(&self, s: &State, len: u64) -> Result<(), Exhausted> {
        let left = self.limit.saturating_sub(s.used + s.reserved);
        if len > left {
            return Err(Exhausted { limit: self.limit, left, wanted: len });
        }
        Ok(())
    }

    /// Reserves `len` bytes for one response.
    pub fn reserve(&self, len: u64) -> Result<Reservation<'_>, Exhausted> {
        let mut s = self.state.lock().expect("budget lock");
        self.fits(&s, len)?;
        s.reserved += len;
        Ok(Reservation { budget: Some(self), unsent: len })
    }

    /// (sent this month, reserved now).
    pub fn usage(&self) -> (u64, u64) {
        let s = self.state.lock().expect("budget lock");
        (s.used, s.reserved)
    }

    /// Bytes neither sent nor reserved this month.
    pub fn left(&self) -> u64 {
        let (used, reserved) = self.usage();
        self.limit.saturating_sub(used + reserved)
    }

    pub fn month(&self) -> String {
        self.state.lock().expect("budget lock").month.clone()
    }

    /// Starts a new month's count when the local month is no longer the one counted (what responses under
    /// way send from now on counts to the new month), and writes the count if it moved. Blocking (a synced
    /// write); called every second or so, and at shutdown with `force`.
    pub fn tick(&self, month: &str, force: bool) {
        let (month, value) = {
            let mut s = self.state.lock().expect("budget lock");
            if s.month != month {
                tracing::info!(month, last_month = %s.month, sent = s.used, "a new month: the upload budget starts again");
                s.month = month.to_string();
                s.used = 0;
            }
            let value = s.used + s.reserved;
            let due = s.persisted_at.is_none_or(|at| at.elapsed() >= PERSIST_EVERY);
            if !force && (value == s.persisted || !due) {
                return;
            }
            s.persisted = value;
            s.persisted_at = Some(Instant::now());
            (s.month.clone(), value)
        };
        if let Err(e) = self.store.set_state(STATE_KEY, &encode(&month, value)) {
            tracing::error!(error = %e, "cannot save this month's upload count; retrying");
            self.state.lock().expect("budget lock").persisted_at = None;
        }
    }
}

/// `YYYY-MM` ‖ u64 big-endian.
fn encode(month: &str, used: u64) -> Vec<u8> {
    [month.as_bytes(), &used.to_be_bytes()].concat()
}

fn decode(value: &[u8]) -> Option<(String, u64)> {
    let (month, used) = value.split_at_checked(value.len().checked_sub(8)?)?;
    Some((std::str::from_utf8(month).ok()?.to_string(), u64::from_be_bytes(used.try_into().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path) -> Arc<Store> {
        Arc::new(Store::open(&dir.join("store"), 64 << 20, 0).expect("store"))
    }

    #[test]
    fn reservations_never_overrun_and_unsent_bytes_come_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = Budget::open(2500, store(dir.path()), "2026-12");
        let mut a = budget.reserve(1000).expect("fits");
        let b = budget.reserve(1000).expect("fits");
        assert_eq!(
            budget.reserve(1000).expect_err("would overrun"),
            Exhausted { limit: 2500, left: 500, wanted: 1000 }
        );
        assert!(budget.check(500).is_ok());
        a.sent(600);
        assert_eq!(budget.usage(), (600, 1400));
        drop(a); // 400 unsent come back
        drop(b);
        assert_eq!((budget.usage(), budget.left()), ((600, 0), 1900));
        let mut c = budget.reserve(1900).expect("the rest fits");
        c.sent(5000); // never counts more than was reserved
        drop(c);
        assert_eq!(budget.left(), 0);
        assert!(budget.check(1).is_err());
        let mut none = Reservation::none();
        none.sent(10);
        assert_eq!(budget.usage(), (2500, 0));
    }

    #[test]
    fn the_count_survives_a_restart_and_starts_again_each_month() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let budget = Budget::open(10_000, store(dir.path()), "2026-11");
            budget.reserve(700).expect("fits").sent(700);
            let _in_flight = budget.reserve(100).expect("fits");
            budget.tick("2026-11", false);
        }
        // Reopened the same month: what was sent, and conservatively what was in flight, still counts.
        let budget = Budget::open(10_000, store(dir.path()), "2026-11");
        assert_eq!(budget.usage(), (800, 0));
        budget.reserve(200).expect("fits").sent(200);
        budget.tick("2026-11", true);
        drop(budget);
        // A new month starts from zero, on reopening as while running.
        assert_eq!(Budget::open(10_000, store(dir.path()), "2026-12").usage(), (0, 0));
        let budget = Budget::open(10_000, store(dir.path()), "2026-11");
        assert_eq!(budget.usage(), (1000, 0));
        budget.tick("2026-12", true);
        assert_eq!((budget.usage(), budget.month()), ((0, 0), "2026-12".to_string()));
    }
}
