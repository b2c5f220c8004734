//! Watching a directory's footprint from outside, as a volunteer's `du` would: for the disk-quota tests and
//! the store benchmark.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fog_node::store::disk_usage;

/// Samples a directory's bytes on disk at a fixed interval on its own thread, keeping the largest seen;
/// stops when dropped.
#[derive(Debug)]
pub struct DiskSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskSampler {
    pub fn start(dir: PathBuf, every: Duration) -> Self {
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(disk_usage(&dir), Ordering::Relaxed);
                std::thread::sleep(every);
            }
        });
        Self { peak, stop, thread: Some(thread) }
    }

    /// The largest size seen since the last call.
    pub fn take_peak(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }
}

impl Drop for DiskSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
