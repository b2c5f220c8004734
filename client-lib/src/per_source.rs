//! Fair shares per source: a keyed `governor` rate limiter over sources (an IPv4 address, or an IPv6 /64,
//! one home's whole prefix), bounded in memory, for every kind of work a stranger can ask for.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

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
        if n % 1024 == 0 || self.limiter.len() > MAX_SOURCES {
            // Sources whose allowance is back to full need no state.
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(&source_of(ip)).is_ok()
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
}
