//! The tracker's time source. Passed in rather than read from the system, so tests move time across
//! epochs, expiries and heartbeat timeouts instead of sleeping through them.

#[cfg(test)]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(test)]
use std::sync::Arc;
#[cfg(test)]
use std::time::Duration;
use std::time::Instant;

#[derive(Debug, Clone, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    System,
    /// Stands still until the test that holds a clone of it moves it.
    #[cfg(test)]
    Manual(Arc<ManualTime>),
}

/// A manual clock's time: wall-clock milliseconds, and the monotonic instant that moves with them.
#[cfg(test)]
#[derive(Debug)]
pub struct ManualTime {
    start_ms: u64,
    start: Instant,
    ms: AtomicU64,
}

impl Clock {
    /// Milliseconds since the Unix epoch (dates on tickets, receipts, epochs, signed messages).
    pub fn now_ms(&self) -> u64 {
        match self {
            Self::System => fog_proto::api::now_ms(),
            #[cfg(test)]
            Self::Manual(t) => t.ms.load(Ordering::Relaxed),
        }
    }

    /// Monotonic time (heartbeat timeouts, cache ages), which a wall-clock step cannot move.
    pub fn now(&self) -> Instant {
        match self {
            Self::System => Instant::now(),
            #[cfg(test)]
            Self::Manual(t) => t.start + Duration::from_millis(t.ms.load(Ordering::Relaxed) - t.start_ms),
        }
    }
}

#[cfg(test)]
impl Clock {
    /// A clock that reads `start_ms` until moved.
    pub fn manual(start_ms: u64) -> Self {
        Self::Manual(Arc::new(ManualTime { start_ms, start: Instant::now(), ms: AtomicU64::new(start_ms) }))
    }

    /// Moves a manual clock (and every clone of it) forward by `by`.
    pub fn advance(&self, by: Duration) {
        let Self::Manual(t) = self else { panic!("only a manual clock can be moved") };
        t.ms.fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }
}
