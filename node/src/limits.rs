//! The owner's upload cap: one governor limiter across all clients, bytes as cells.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota};

/// Bytes written per limiter call. Governor refuses forever a request larger than its burst, so data goes
/// out in pieces no larger than this and the burst is never below it.
pub const PIECE: usize = 16 * 1024;

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
