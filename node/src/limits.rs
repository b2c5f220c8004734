//! The owner's limits on uploads: the cap — one governor limiter across all clients and peers, bytes as
//! cells — as `--upload-limit` and the `--schedule` set it from moment to moment, off windows, and the
//! monthly budget (`--monthly-upload`, [`crate::budget`]).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fog_proto::api::{UploadChange, UploadMode, UploadPlan, MAX_PLAN_SECS};
use governor::{DefaultDirectRateLimiter, Quota};
use serde::{Deserialize, Serialize};

use crate::budget::{Budget, Exhausted, Reservation};
use crate::schedule::{self, LocalTime, Schedule, WeekPlan};
use crate::store::Store;

/// Bytes written per limiter call. Governor refuses forever a request larger than its burst, so data goes
/// out in pieces no larger than this and the burst is never below it.
pub const PIECE: usize = 16 * 1024;

/// How often the schedule and the month are looked at again (an off window is enforced to the instant
/// anyway: its start is known in advance).
const REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct UploadLimit {
    limiter: DefaultDirectRateLimiter,
}

impl UploadLimit {
    /// `bytes_per_sec` must be in 1..=u32::MAX (checked by the config).
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = NonZeroU32::new(u32::try_from(bytes_per_sec).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        // A burst of 1/20 s keeps the cap honest over short windows while allowing one piece at any rate.
        let burst = (rate.get() / 20).max(PIECE as u32);
        let burst = NonZeroU32::new(burst).expect("burst is at least one piece");
        Self { limiter: governor::RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)) }
    }

    /// Waits until `len` (≤ [`PIECE`]) bytes may be sent.
    pub async fn acquire(&self, len: usize) {
        let Some(n) = NonZeroU32::new(len.min(PIECE) as u32) else { return };
        // Cannot fail: n ≤ PIECE ≤ burst.
        let _ = self.limiter.until_n_ready(n).await;
    }
}

/// Why a request is refused: the node answers `Busy`, and the client asks its next candidate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("the owner's schedule has this node off now{}", serving_again(.back_in))]
    Off { back_in: Option<Duration> },
    #[error("{0}")]
    Budget(#[from] Exhausted),
}

fn serving_again(d: &Option<Duration>) -> String {
    d.map_or_else(String::new, |d| format!(" (serving again in {} s)", d.as_secs()))
}

/// The owner's limits and where they stand.
#[derive(Debug)]
pub struct UploadPolicy {
    /// What applies outside the schedule's windows: `--upload-limit`, or no cap.
    default: UploadMode,
    schedule: Option<Schedule>,
    budget: Option<Budget>,
    clock: LocalTime,
    now: Mutex<Now>,
    /// Requests refused because the schedule had the node off, and for want of budget.
    refused_off: AtomicU64,
    refused_budget: AtomicU64,
}

#[derive(Debug)]
struct Now {
    mode: UploadMode,
    in_window: bool,
    limiter: Option<Arc<UploadLimit>>,
    /// The schedule's next change, and the next off window's start, on the monotonic clock.
    change: Option<(Instant, UploadMode)>,
    off_at: Option<Instant>,
    month: String,
    month_ends: Instant,
}

/// What the status page shows of the owner's limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadStatus {
    /// The mode in force: `unlimited`, `off` or `{"rate": N}`.
    pub mode: UploadMode,
    /// The cap in force now, bytes/s (none while unlimited or off).
    pub cap: Option<u64>,
    /// Whether a window of the schedule sets it (else `--upload-limit` does).
    pub in_window: bool,
    pub schedule: Option<String>,
    /// The time zone the schedule and the month follow.
    pub time_zone: String,
    pub next_change: Option<UploadChange>,
    pub next_off_in_secs: Option<u32>,
    pub budget: Option<BudgetStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetStatus {
    /// `YYYY-MM`, local time.
    pub month: String,
    pub limit: u64,
    /// Sent this month.
    pub used: u64,
    /// Promised to responses under way.
    pub reserved: u64,
    pub left: u64,
    pub resets_in_secs: u64,
}

impl UploadPolicy {
    /// `schedule` as the owner wrote it (parsed by the config); `monthly` the budget in bytes, kept in
    /// `store`.
    pub fn new(
        upload_limit: Option<u64>,
        schedule: Option<Schedule>,
        monthly: Option<u64>,
        store: Arc<Store>,
        clock: LocalTime,
    ) -> Self {
        let t = clock.now();
        let default = upload_limit.map_or(UploadMode::Unlimited, UploadMode::Rate);
        let budget = monthly.map(|limit| Budget::open(limit, store, &schedule::month_of(&t)));
        let now = Mutex::new(Now {
            mode: default,
            in_window: false,
            limiter: upload_limit.map(|l| Arc::new(UploadLimit::new(l))),
            change: None,
            off_at: None,
            month: schedule::month_of(&t),
            month_ends: Instant::now() + schedule::until_next_month(&t),
        });
        let (refused_off, refused_budget) = (AtomicU64::new(0), AtomicU64::new(0));
        let policy = Self { default, schedule, budget, clock, now, refused_off, refused_budget };
        policy.look_again();
        policy
    }

    /// Looks at the schedule and the month again; blocking (it may save the month's count).
    fn look_again(&self) {
        let t = self.clock.now();
        let week = schedule::week_second(&t);
        let plan = self
            .schedule
            .as_ref()
            .map_or(WeekPlan { now: self.default, in_window: false, next: None, off_in: None }, |s| {
                s.plan(week, self.default)
            });
        let at = Instant::now();
        let month = schedule::month_of(&t);
        {
            let mut now = self.now.lock().expect("upload policy lock");
            if now.mode != plan.now {
                tracing::info!(from = ?now.mode, to = ?plan.now, "the owner's schedule changes the upload mode");
                now.limiter = plan.now.cap().map(|c| Arc::new(UploadLimit::new(c)));
            }
            now.mode = plan.now;
            now.in_window = plan.in_window;
            now.change = plan.next.map(|(secs, mode)| (at + schedule::real_time_until(&t, secs), mode));
            now.off_at = plan.off_in.map(|secs| at + schedule::real_time_until(&t, secs));
            now.month.clone_from(&month);
            now.month_ends = at + schedule::until_next_month(&t);
        }
        if let Some(budget) = &self.budget {
            budget.tick(&month, false);
        }
    }

    /// Keeps the mode and the month current until the task is dropped.
    pub async fn follow_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(REFRESH).await;
            let policy = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || policy.look_again()).await {
                tracing::error!(error = %e, "upload schedule update failed");
            }
        }
    }

    /// Saves the month's count (at shutdown, once responses drained).
    pub fn save(&self) {
        if let Some(budget) = &self.budget {
            let month = self.now.lock().expect("upload policy lock").month.clone();
            budget.tick(&month, true);
        }
    }

    /// The mode in force at this instant: a change due since the last look counts already, so an off
    /// window starts on time.
    fn mode(&self) -> (UploadMode, Option<Duration>) {
        let now = self.now.lock().expect("upload policy lock");
        let at = Instant::now();
        match now.change {
            Some((when, mode)) if when <= at => (mode, None),
            change => (now.mode, change.map(|(when, _)| when - at)),
        }
    }

    /// The cap in force now, bytes/s (none while unlimited or off).
    pub fn cap(&self) -> Option<u64> {
        self.mode().0.cap()
    }

    /// Whether a response of `len` bytes may start (before work such as a fill is spent on it).
    pub fn check(&self, len: u64) -> Result<(), Refusal> {
        if let (UploadMode::Off, back_in) = self.mode() {
            return Err(self.refused(Refusal::Off { back_in }));
        }
        match &self.budget {
            Some(budget) => budget.check(len).map_err(|e| self.refused(e.into())),
            None => Ok(()),
        }
    }

    /// Reserves `len` bytes for a response that is about to start.
    pub fn reserve(&self, len: u64) -> Result<Reservation<'_>, Refusal> {
        if let (UploadMode::Off, back_in) = self.mode() {
            return Err(self.refused(Refusal::Off { back_in }));
        }
        match &self.budget {
            Some(budget) => budget.reserve(len).map_err(|e| self.refused(e.into())),
            None => Ok(Reservation::none()),
        }
    }

    /// Counts a refusal (each request meets at most one: `check` before any work, or `reserve`).
    fn refused(&self, refusal: Refusal) -> Refusal {
        let counter = match refusal {
            Refusal::Off { .. } => &self.refused_off,
            Refusal::Budget(_) => &self.refused_budget,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        refusal
    }

    /// Requests refused for the owner's limits, by reason (`fog_node_upload_refusals_total{reason}`).
    pub fn refusals(&self) -> [(&'static str, u64); 2] {
        [("off", self.refused_off.load(Ordering::Relaxed)), ("budget", self.refused_budget.load(Ordering::Relaxed))]
    }

    /// Waits until `len` (≤ [`PIECE`]) bytes may go out under the cap in force.
    pub async fn acquire(&self, len: usize) {
        let limiter = self.now.lock().expect("upload policy lock").limiter.clone();
        if let Some(limiter) = limiter {
            limiter.acquire(len).await;
        }
    }

    /// The heartbeat's report; none when the owner set neither a schedule nor a budget.
    pub fn plan(&self) -> Option<UploadPlan> {
        if self.schedule.is_none() && self.budget.is_none() {
            return None;
        }
        let (mode, _) = self.mode();
        let now = self.now.lock().expect("upload policy lock");
        let at = Instant::now();
        let secs = |when: Instant| when.saturating_duration_since(at).as_secs().min(u64::from(MAX_PLAN_SECS)) as u32;
        Some(UploadPlan {
            now: mode,
            next: now
                .change
                .filter(|(when, _)| *when > at)
                .map(|(when, mode)| UploadChange { in_secs: secs(when), mode }),
            off_in_secs: now.off_at.filter(|when| *when > at && mode != UploadMode::Off).map(secs),
            budget_left: self.budget.as_ref().map(Budget::left),
        })
    }

    /// For the status page.
    pub fn status(&self) -> UploadStatus {
        let plan = self.plan();
        let (mode, _) = self.mode();
        let now = self.now.lock().expect("upload policy lock");
        let budget = self.budget.as_ref().map(|b| {
            let (used, reserved) = b.usage();
            BudgetStatus {
                month: now.month.clone(),
                limit: b.limit(),
                used,
                reserved,
                left: b.limit().saturating_sub(used + reserved),
                resets_in_secs: now.month_ends.saturating_duration_since(Instant::now()).as_secs(),
            }
        });
        UploadStatus {
            mode,
            cap: mode.cap(),
            in_window: now.in_window,
            schedule: self.schedule.as_ref().map(|s| s.text().to_string()),
            time_zone: self.clock.zone_name(),
            next_change: plan.and_then(|p| p.next),
            next_off_in_secs: plan.and_then(|p| p.off_in_secs),
            budget,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::tz::TimeZone;

    #[tokio::test]
    async fn off_windows_and_the_budget_refuse_and_the_plan_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("store"), 64 << 20, 0).expect("store"));
        let clock = LocalTime::with_zone(TimeZone::UTC);
        let off_now = Schedule::parse("daily off").expect("valid");
        let policy = UploadPolicy::new(Some(1 << 20), Some(off_now), Some(5000), store.clone(), clock.clone());
        assert!(matches!(policy.check(1), Err(Refusal::Off { back_in: None })));
        let plan = policy.plan().expect("a plan");
        assert_eq!(
            (plan.now, plan.next, plan.off_in_secs, plan.budget_left),
            (UploadMode::Off, None, None, Some(5000))
        );
        drop(policy);

        let policy = UploadPolicy::new(Some(1 << 20), None, Some(5000), store, clock);
        let plan = policy.plan().expect("a plan");
        assert_eq!((plan.now, plan.next), (UploadMode::Rate(1 << 20), None));
        let mut r = policy.reserve(4000).expect("fits");
        assert!(matches!(policy.check(1001), Err(Refusal::Budget(_))));
        r.sent(4000);
        drop(r);
        assert_eq!(policy.plan().and_then(|p| p.budget_left), Some(1000));
        let status = policy.status();
        assert_eq!(status.budget.map(|b| (b.used, b.left)), Some((4000, 1000)));
        assert_eq!(status.cap, Some(1 << 20));
    }
}
