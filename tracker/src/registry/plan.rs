//! Owners' schedules and monthly budgets, as nodes report them in heartbeats ([`UploadPlan`]): a node is
//! given to clients only while it is serving and neither its next off window nor the end of its budget is
//! near, so clients are routed around it before it starts refusing them (it still refuses, `Busy`, rather
//! than exceed its owner's limits: this rule only keeps clients from meeting that).
//!
//! The rule ([`resting`]) is pure. "Near" is what the node may still be asked for: clients keep fetching
//! from a schedule for a while after the tracker gave it ([`CLIENT_LEAD`]), and the tracker hears of the
//! node again only at its next heartbeat. So a node rests when an off window starts within a heartbeat
//! interval plus that lead; or when its budget left, less what it spent since its report at its recent
//! rate, is below that rate over the same lead plus [`RESERVE_CHUNKS`] chunks. The rate is the budget's
//! fall between heartbeats, kept as a peak that decays with a one-minute half-life: a node that rested
//! (and so served nothing) is not taken back at once as if it would stay idle.

use fog_proto::api::{UploadMode, UploadPlan};

use super::*;

/// How long clients keep using nodes the tracker gave them: a resolve's schedule is fetched over the
/// following seconds (a player resolves each segment; the CLI fetches up to 8 chunks at a time).
const CLIENT_LEAD: Duration = Duration::from_secs(10);
/// Chunks of budget kept beyond what the recent rate would use, for requests the rate does not foresee
/// (a client failing over to the node, a peer's fill).
const RESERVE_CHUNKS: u64 = 4;
/// Half-life of the peak rate at which a node spends its budget.
const RATE_HALF_LIFE_SECS: f64 = 60.0;

/// What the rule takes from the tracker's configuration.
#[derive(Debug, Clone, Copy)]
pub struct PlanRule {
    pub heartbeat: Duration,
    pub chunk_size: u64,
}

impl Default for PlanRule {
    fn default() -> Self {
        Self { heartbeat: Duration::from_secs(5), chunk_size: 1 << 20 }
    }
}

/// A node's last reported plan, when it arrived, and how fast it spends its budget.
#[derive(Debug, Clone)]
pub struct PlanState {
    pub plan: UploadPlan,
    pub at: Instant,
    /// Peak budget spending, bytes/s, decaying.
    pub rate: f64,
}

impl PlanState {
    /// The state after a heartbeat reports `plan`, `secs` after the last one.
    pub fn updated(old: Option<&PlanState>, plan: UploadPlan, at: Instant) -> PlanState {
        let Some(old) = old else { return PlanState { plan, at, rate: 0.0 } };
        let secs = at.saturating_duration_since(old.at).as_secs_f64();
        let decayed = old.rate * 0.5f64.powf(secs / RATE_HALF_LIFE_SECS);
        let measured = match (old.plan.budget_left, plan.budget_left) {
            // A budget that grew started a new month (or was raised): no spending to learn from.
            (Some(before), Some(now)) if secs > 0.0 && now <= before => (before - now) as f64 / secs,
            _ => 0.0,
        };
        PlanState { plan, at, rate: measured.max(decayed) }
    }
}

/// Why a node is not given to clients for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resting {
    /// Its owner's schedule has it off.
    Off,
    /// An off window starts before clients given it now would be done.
    OffSoon,
    /// Its monthly budget would run out before then.
    Budget,
}

impl Resting {
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::OffSoon => "off_soon",
            Self::Budget => "budget",
        }
    }
}

/// Whether a node whose plan is `state`, reported `since` ago, rests now (see the module's text).
fn resting(state: &PlanState, since: Duration, rule: &PlanRule) -> Option<Resting> {
    let plan = &state.plan;
    if plan.now == UploadMode::Off {
        return Some(Resting::Off);
    }
    let lead = rule.heartbeat + CLIENT_LEAD;
    if plan.off_in_secs.is_some_and(|off_in| since + lead >= Duration::from_secs(u64::from(off_in))) {
        return Some(Resting::OffSoon);
    }
    let left = plan.budget_left? as f64 - state.rate * since.as_secs_f64();
    let needed = state.rate * lead.as_secs_f64() + (RESERVE_CHUNKS * rule.chunk_size) as f64;
    (left < needed).then_some(Resting::Budget)
}

impl Registry {
    /// The plan `id`'s latest heartbeat reported (bounds checked by the caller); `None` from nodes whose
    /// owner set no schedule nor budget, or older ones.
    pub fn set_plan(&self, id: &NodeId, plan: Option<UploadPlan>) {
        let mut nodes = self.nodes.write().expect("registry lock");
        let Some(n) = nodes.get_mut(id) else { return };
        let before = self.resting(n);
        n.plan = plan.map(|plan| PlanState::updated(n.plan.as_ref(), plan, self.clock.now()));
        if self.resting(n) != before {
            self.changed();
        }
    }

    /// Why `n` is not scheduled for its owner's limits, if it is not.
    pub(super) fn resting(&self, n: &NodeEntry) -> Option<Resting> {
        let state = n.plan.as_ref()?;
        resting(state, self.since(state.at), &self.plan_rule)
    }

    /// The rule's configuration: the heartbeat interval nodes are given and the chunk size.
    pub fn with_plan_rule(mut self, rule: PlanRule) -> Self {
        self.plan_rule = rule;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn plan(now: UploadMode, off_in_secs: Option<u32>, budget_left: Option<u64>) -> UploadPlan {
        UploadPlan { now, next: None, off_in_secs, budget_left }
    }

    fn state(plan: UploadPlan, rate: f64) -> PlanState {
        PlanState { plan, at: Instant::now(), rate }
    }

    const RULE: PlanRule = PlanRule { heartbeat: Duration::from_secs(5), chunk_size: MIB };
    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn off_and_off_windows_ahead() {
        let unlimited = UploadMode::Unlimited;
        assert_eq!(resting(&state(plan(UploadMode::Off, None, None), 0.0), SEC, &RULE), Some(Resting::Off));
        assert_eq!(resting(&state(plan(UploadMode::Rate(MIB), None, None), 0.0), SEC, &RULE), None);
        // The lead is a heartbeat interval (5 s) and the clients' 10 s: a window 16 s ahead is far enough
        // right after the report, not 2 s later.
        let soon = state(plan(unlimited, Some(16), None), 0.0);
        assert_eq!(resting(&soon, Duration::ZERO, &RULE), None);
        assert_eq!(resting(&soon, SEC, &RULE), Some(Resting::OffSoon));
        assert_eq!(resting(&state(plan(unlimited, Some(3600), None), 0.0), SEC, &RULE), None);
    }

    #[test]
    fn a_budget_rests_the_node_before_it_runs_out() {
        let unlimited = UploadMode::Unlimited;
        // Idle: four chunks in hand are enough.
        assert_eq!(resting(&state(plan(unlimited, None, Some(5 * MIB)), 0.0), SEC, &RULE), None);
        assert_eq!(resting(&state(plan(unlimited, None, Some(3 * MIB)), 0.0), SEC, &RULE), Some(Resting::Budget));
        // Spending 1 MiB/s: 15 s of lead and 4 chunks = 19 MiB needed, counted from now (2 s after a report
        // of 22 MiB left, 20 are left).
        let busy = state(plan(unlimited, None, Some(22 * MIB)), MIB as f64);
        assert_eq!(resting(&busy, 2 * SEC, &RULE), None);
        assert_eq!(resting(&busy, 4 * SEC, &RULE), Some(Resting::Budget));
    }

    #[test]
    fn resting_nodes_leave_the_schedule_and_say_why() {
        let r = Registry::new(Duration::from_secs(60), 8, HashSet::new());
        let (id, now) = (NodeId([1; 32]), 10_000_000);
        r.register(id, super::super::tests::reg(), now, now).expect("register");
        assert_eq!(r.snapshot().nodes.len(), 1);
        r.set_plan(&id, Some(plan(UploadMode::Off, None, None)));
        assert!(r.snapshot().nodes.is_empty(), "an off node must not be scheduled");
        assert_eq!(r.page(0, 10, SortBy::Id, false).nodes[0].resting, Some("off"));
        // Serving again, under a window's cap: that cap is its upload for bounded load.
        r.set_plan(&id, Some(plan(UploadMode::Rate(1000), Some(3600), Some(100 * MIB))));
        assert_eq!(r.snapshot().nodes.iter().map(|n| n.upload).collect::<Vec<_>>(), [1000]);
        assert_eq!(r.page(0, 10, SortBy::Id, false).nodes[0].resting, None);
        r.set_plan(&id, Some(plan(UploadMode::Unlimited, None, Some(MIB))));
        assert!(r.snapshot().nodes.is_empty(), "a node with a chunk of budget left must not be scheduled");
        r.set_plan(&id, None);
        assert_eq!(r.snapshot().nodes.len(), 1);
    }

    #[test]
    fn the_rate_is_the_budget_s_fall_kept_as_a_decaying_peak() {
        let t0 = Instant::now();
        let first = PlanState::updated(None, plan(UploadMode::Unlimited, None, Some(100 * MIB)), t0);
        assert_eq!(first.rate, 0.0);
        let spent = PlanState::updated(Some(&first), plan(UploadMode::Unlimited, None, Some(90 * MIB)), t0 + 5 * SEC);
        assert_eq!(spent.rate, 2.0 * MIB as f64);
        // Resting, it spends nothing; the peak halves in a minute.
        let idle = PlanState::updated(Some(&spent), plan(UploadMode::Unlimited, None, Some(90 * MIB)), t0 + 65 * SEC);
        assert!((idle.rate - MIB as f64).abs() < 1.0, "{}", idle.rate);
        // A new month: the budget grew, nothing was spent.
        let renewed =
            PlanState::updated(Some(&idle), plan(UploadMode::Unlimited, None, Some(500 * MIB)), t0 + 66 * SEC);
        assert!(renewed.rate < idle.rate);
    }
}
