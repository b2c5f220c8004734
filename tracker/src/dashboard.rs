//! What the operators' dashboard shows beyond the registry: a short history of throughput and offload,
//! recent events, and the most requested content. Everything here is bounded in memory.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fog_proto::NodeId;
use serde::Serialize;

use crate::registry::Registry;

/// How often the history gets a point, and how many points it keeps (30 minutes).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
const MAX_SAMPLES: usize = 900;
const MAX_EVENTS: usize = 200;
/// Events sent with each summary.
const EVENTS_SHOWN: usize = 50;
/// Distinct URLs counted for "top content"; when full, counts halve and the rarest are dropped.
const MAX_TRACKED_URLS: usize = 10_000;
const TOP_SHOWN: usize = 10;

use fog_proto::api::now_ms;

/// One point of history: rates over the preceding interval.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    /// Bytes/s nodes served to clients.
    pub fog_bytes_per_s: f64,
    /// Bytes/s nodes pulled from origins to fill misses.
    pub origin_fill_bytes_per_s: f64,
    /// 1 − origin pulls / fog bytes: the share of fog traffic that cost the origin nothing.
    pub offload: Option<f64>,
    pub node_requests_per_s: f64,
    pub resolves_per_s: f64,
    pub nodes_healthy: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub t_ms: u64,
    pub kind: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopContent {
    pub url: String,
    pub resolves: u64,
}

#[derive(Debug)]
struct Previous {
    at: Instant,
    fog_bytes: u64,
    origin_fill_bytes: u64,
    node_requests: u64,
    resolves: u64,
    corrupt_chunks: u64,
    healthy: HashSet<NodeId>,
}

#[derive(Debug, Default)]
pub struct Dashboard {
    samples: Mutex<VecDeque<Sample>>,
    events: Mutex<VecDeque<Event>>,
    urls: Mutex<HashMap<String, u64>>,
    previous: Mutex<Option<Previous>>,
}

impl Dashboard {
    pub fn event(&self, kind: &'static str, message: String) {
        let mut events = self.events.lock().expect("events lock");
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(Event { t_ms: now_ms(), kind, message });
    }

    pub fn count_resolve(&self, url: &str) {
        let mut urls = self.urls.lock().expect("urls lock");
        if !urls.contains_key(url) && urls.len() >= MAX_TRACKED_URLS {
            // Age everything and forget what is now rare, so new popular content can enter.
            urls.values_mut().for_each(|c| *c /= 2);
            urls.retain(|_, c| *c > 0);
            if urls.len() >= MAX_TRACKED_URLS {
                return;
            }
        }
        *urls.entry(url.to_string()).or_default() += 1;
    }

    pub fn top_content(&self) -> Vec<TopContent> {
        let urls = self.urls.lock().expect("urls lock");
        let mut top: Vec<TopContent> = urls.iter().map(|(u, c)| TopContent { url: u.clone(), resolves: *c }).collect();
        top.sort_unstable_by(|a, b| b.resolves.cmp(&a.resolves).then_with(|| a.url.cmp(&b.url)));
        top.truncate(TOP_SHOWN);
        top
    }

    /// Takes one history point and records nodes that changed health since the last one.
    pub fn sample(&self, registry: &Registry, resolves: u64) {
        let t = &registry.totals;
        let now = Instant::now();
        let healthy = registry.healthy_ids();
        let current = Previous {
            at: now,
            fog_bytes: t.fog_bytes.load(Ordering::Relaxed),
            origin_fill_bytes: t.origin_fill_bytes.load(Ordering::Relaxed),
            node_requests: t.node_requests.load(Ordering::Relaxed),
            resolves,
            corrupt_chunks: t.corrupt_chunks.load(Ordering::Relaxed),
            healthy,
        };
        let mut previous = self.previous.lock().expect("previous lock");
        if let Some(p) = previous.as_ref() {
            for id in current.healthy.difference(&p.healthy) {
                self.event("node_healthy", format!("node {} is healthy", &id.to_hex()[..16]));
            }
            for id in p.healthy.difference(&current.healthy) {
                self.event("node_unhealthy", format!("node {} stopped sending heartbeats", &id.to_hex()[..16]));
            }
            if current.corrupt_chunks > p.corrupt_chunks {
                let n = current.corrupt_chunks - p.corrupt_chunks;
                self.event("corrupt_chunks", format!("nodes found {n} corrupt chunk(s) on disk and dropped them"));
            }
            let secs = now.duration_since(p.at).as_secs_f64().max(0.001);
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
            let fog = current.fog_bytes.saturating_sub(p.fog_bytes);
            let fill = current.origin_fill_bytes.saturating_sub(p.origin_fill_bytes);
            let sample = Sample {
                t_ms: now_ms(),
                fog_bytes_per_s: rate(current.fog_bytes, p.fog_bytes),
                origin_fill_bytes_per_s: rate(current.origin_fill_bytes, p.origin_fill_bytes),
                offload: (fog > 0).then(|| 1.0 - (fill as f64 / fog as f64).min(1.0)),
                node_requests_per_s: rate(current.node_requests, p.node_requests),
                resolves_per_s: rate(current.resolves, p.resolves),
                nodes_healthy: current.healthy.len() as u64,
            };
            let mut samples = self.samples.lock().expect("samples lock");
            if samples.len() == MAX_SAMPLES {
                samples.pop_front();
            }
            samples.push_back(sample);
        }
        *previous = Some(current);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples lock").iter().copied().collect()
    }

    pub fn recent_events(&self) -> Vec<Event> {
        let events = self.events.lock().expect("events lock");
        events.iter().rev().take(EVENTS_SHOWN).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_content_is_bounded_and_ordered() {
        let d = Dashboard::default();
        for i in 0..(MAX_TRACKED_URLS + 500) {
            d.count_resolve(&format!("http://o/{i}"));
        }
        for _ in 0..5 {
            d.count_resolve("http://o/hot");
        }
        assert!(d.urls.lock().expect("lock").len() <= MAX_TRACKED_URLS);
        let top = d.top_content();
        assert_eq!(top[0].url, "http://o/hot");
        assert!(top.len() <= TOP_SHOWN);
    }

    #[test]
    fn events_are_bounded_newest_first() {
        let d = Dashboard::default();
        for i in 0..(MAX_EVENTS + 10) {
            d.event("test", format!("e{i}"));
        }
        assert_eq!(d.events.lock().expect("lock").len(), MAX_EVENTS);
        let recent = d.recent_events();
        assert_eq!(recent.len(), EVENTS_SHOWN);
        assert_eq!(recent[0].message, format!("e{}", MAX_EVENTS + 9));
    }
}
