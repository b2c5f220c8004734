//! Single flight: concurrent callers asking for the same key share one run of the work (one origin read
//! per object at the tracker, one fill per chunk at a node). The entry lives only while the work runs, so
//! the map is bounded by the callers in flight, which their own limits bound.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

#[derive(Debug)]
pub struct SingleFlight<K, V> {
    in_flight: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self { in_flight: Mutex::new(HashMap::new()) }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    /// Runs `work` for `key`, or waits for the run already in progress and shares its result (errors
    /// too: callers that arrived together fail together; the next caller starts afresh). If the caller
    /// running the work goes away, a waiting caller runs its own `work` instead.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = self.in_flight.lock().expect("single-flight lock").entry(key.clone()).or_default().clone();
        let result = cell.get_or_init(work).await.clone();
        let mut in_flight = self.in_flight.lock().expect("single-flight lock");
        if in_flight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            in_flight.remove(&key);
        }
        result
    }

    /// Keys with work in progress.
    pub fn len(&self) -> usize {
        self.in_flight.lock().expect("single-flight lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_later_callers_run_again() {
        let flights = Arc::new(SingleFlight::<&str, Result<u32, String>>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let mut callers = Vec::new();
        for _ in 0..8 {
            let (flights, runs, mut released) = (flights.clone(), runs.clone(), released.clone());
            callers.push(tokio::spawn(async move {
                flights
                    .run("chunk", || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = released.wait_for(|r| *r).await;
                        Err::<u32, _>("origin said 503".to_string())
                    })
                    .await
            }));
        }
        while flights.is_empty() {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        release.send(true).expect("callers wait");
        for caller in callers {
            assert_eq!(caller.await.expect("caller"), Err("origin said 503".to_string()));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for all concurrent callers");
        assert!(flights.is_empty(), "finished work leaves no entry");
        assert_eq!(flights.run("chunk", || async { Ok(7) }).await, Ok(7), "an error is not kept for later callers");
    }

    #[tokio::test]
    async fn a_waiter_takes_over_when_the_running_caller_goes_away() {
        let flights = Arc::new(SingleFlight::<u8, u32>::default());
        let first = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(1, std::future::pending::<u32>).await })
        };
        while flights.is_empty() {
            tokio::task::yield_now().await;
        }
        let second = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(1, || async { 5 }).await })
        };
        tokio::task::yield_now().await;
        first.abort();
        assert_eq!(second.await.expect("second caller"), 5);
    }
}
