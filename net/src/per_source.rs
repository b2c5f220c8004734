//! Fair shares per source (an IPv4 address, or an IPv6 /64, one home's whole prefix): a keyed `governor`
//! rate limiter, bounded in memory, for every kind of work a stranger can ask for; and [`Held`], what each
//! source holds at once (connections, live streams).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota};

/// Sources tracked before idle ones are forgotten on the spot (otherwise every 1024 checks).
const MAX_SOURCES: usize = 100_000;

/// The source a request is charged to.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// `burst` requests at once per source, refilled at `per_minute`.
#[derive(Debug)]
pub struct PerSource {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    checks: AtomicU64,
}

impl PerSource {
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self { limiter: governor::RateLimiter::keyed(quota), checks: AtomicU64::new(0) }
    }

    /// Whether the source of `ip` may do one more; counts it if so.
    pub fn check(&self, ip: IpAddr) -> bool {
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(1024) || self.limiter.len() > MAX_SOURCES {
            // Sources whose allowance is back to full need no state.
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(&source_of(ip)).is_ok()
    }
}

/// What each source holds at once; a slot is given back when its [`HeldSlot`] drops, however the work ends.
/// Only sources holding something are kept, so the map is bounded by the slots handed out.
#[derive(Debug, Default, Clone)]
pub struct Held(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl Held {
    /// Slots the source of `ip` holds.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.0.lock().expect("held lock").get(&source_of(ip)).copied().unwrap_or(0)
    }

    /// One more slot for the source of `ip`, whatever it holds (the caller checked its share).
    pub fn hold(&self, ip: IpAddr) -> HeldSlot {
        let source = source_of(ip);
        *self.0.lock().expect("held lock").entry(source).or_default() += 1;
        HeldSlot(self.clone(), source)
    }

    /// One more slot, if the source holds fewer than `max`.
    pub fn try_hold(&self, ip: IpAddr, max: usize) -> Option<HeldSlot> {
        let source = source_of(ip);
        let mut held = self.0.lock().expect("held lock");
        let n = held.entry(source).or_default();
        if *n >= max {
            if *n == 0 {
                held.remove(&source);
            }
            return None;
        }
        *n += 1;
        Some(HeldSlot(self.clone(), source))
    }
}

#[derive(Debug)]
pub struct HeldSlot(Held, IpAddr);

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let mut held = (self.0).0.lock().expect("held lock");
        if let Some(n) = held.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_or_ipv6_prefixes_with_separate_allowances() {
        let limit = PerSource::new(1, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("addr");
        let b: IpAddr = "2001:db8:1:2:3:4:5:6".parse().expect("addr");
        let b_same_home: IpAddr = "2001:db8:1:2::9".parse().expect("addr");
        assert!(limit.check(a) && limit.check(a));
        assert!(!limit.check(a), "burst exceeded");
        assert!(limit.check(b) && limit.check(b_same_home));
        assert!(!limit.check(b), "one /64 is one source");
        assert_eq!(source_of("::ffff:10.0.0.1".parse().expect("addr")), a);
    }

    #[test]
    fn held_slots_come_back_however_they_end() {
        let held = Held::default();
        let a: IpAddr = "10.0.0.1".parse().expect("addr");
        let slots: Vec<HeldSlot> = (0..3).map(|_| held.try_hold(a, 3).expect("room")).collect();
        assert!(held.try_hold(a, 3).is_none());
        assert!(held.try_hold("10.0.0.2".parse().expect("addr"), 3).is_some());
        let extra = held.hold(a);
        assert_eq!(held.count(a), 4);
        drop((slots, extra));
        assert_eq!(held.count(a), 0);
        assert!(held.try_hold(a, 0).is_none());
        assert!(held.0.lock().expect("lock").is_empty(), "nothing held, nothing kept");
    }
}
