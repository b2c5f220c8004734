//! Node states and probe hysteresis: which nodes are scheduled, which only take part in the overlay, and
//! how probes move nodes between states.

use super::*;

/// A node's health, from heartbeats, the tracker's probes and what it announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Scheduled.
    Active,
    /// Its overlay is still connecting the neighbourhood: not scheduled yet, so its first misses come from
    /// peers rather than the origin.
    Joining,
    /// Shutting down: serves what is in flight, gets nothing new.
    Draining,
    /// Heartbeats stopped, or probes keep failing.
    Unhealthy,
    /// Served bytes that did not match their hash: never scheduled again while the tracker runs.
    Quarantined,
}

impl NodeState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Joining => "joining",
            Self::Draining => "draining",
            Self::Unhealthy => "unhealthy",
            Self::Quarantined => "quarantined",
        }
    }
}

/// What one active probe of a node found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The chunk came back and verified.
    Ok { rtt_ms: u64 },
    /// The node does not hold the chunk: no verdict.
    NoData,
    /// Timeout, refused connection, protocol error.
    Failed(String),
    /// Bytes that do not hash to the chunk.
    WrongBytes,
}

/// Consecutive probe failures that make a node unhealthy, and successes that bring it back (hysteresis,
/// so one lost packet does not flap a node in and out of schedules).
pub const PROBE_FAILURES_DOWN: u32 = 3;
pub const PROBE_SUCCESSES_UP: u32 = 2;

/// Probe history of one node.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub draining: bool,
    pub probe_down: bool,
    pub failures: u32,
    pub successes: u32,
    pub last_probe_rtt_ms: Option<u64>,
    pub quarantined: Option<String>,
}

impl Registry {
    pub(super) fn state(&self, n: &NodeEntry) -> NodeState {
        if n.health.quarantined.is_some() {
            NodeState::Quarantined
        } else if self.since(n.last_seen) > self.timeout || n.health.probe_down {
            NodeState::Unhealthy
        } else if n.health.draining {
            NodeState::Draining
        } else if n.overlay.joining {
            NodeState::Joining
        } else {
            NodeState::Active
        }
    }

    pub(super) fn healthy(&self, n: &NodeEntry) -> bool {
        self.state(n) == NodeState::Active
    }

    /// Healthy, or joining: taking part in the overlay (peer lists, rendezvous) while not yet scheduled.
    pub(super) fn alive(&self, n: &NodeEntry) -> bool {
        matches!(self.state(n), NodeState::Active | NodeState::Joining)
    }

    /// Records a probe of `id`; returns the state change it caused, if any.
    pub fn record_probe(&self, id: &NodeId, outcome: &ProbeOutcome) -> Option<(NodeState, NodeState)> {
        let mut nodes = self.nodes.write().expect("registry lock");
        let n = nodes.get_mut(id)?;
        let before = self.state(n);
        let h = &mut n.health;
        match outcome {
            ProbeOutcome::Ok { rtt_ms } => {
                h.last_probe_rtt_ms = Some(*rtt_ms);
                h.failures = 0;
                h.successes += 1;
                if h.probe_down && h.successes >= PROBE_SUCCESSES_UP {
                    h.probe_down = false;
                }
            }
            ProbeOutcome::NoData => {}
            ProbeOutcome::Failed(_) => {
                h.successes = 0;
                h.failures += 1;
                if h.failures >= PROBE_FAILURES_DOWN {
                    h.probe_down = true;
                }
            }
            ProbeOutcome::WrongBytes => {
                h.quarantined.get_or_insert_with(|| "served bytes that do not match their hash".into());
            }
        }
        let after = self.state(n);
        if before != after {
            self.changed();
        }
        (before != after).then_some((before, after))
    }

    /// Nodes worth probing (not quarantined, still heartbeating): id and address.
    pub fn probe_targets(&self) -> Vec<NodeContact> {
        let nodes = self.nodes.read().expect("registry lock");
        nodes
            .iter()
            .filter(|(_, n)| n.health.quarantined.is_none() && self.since(n.last_seen) <= self.timeout)
            .filter_map(|(id, n)| self.contact(&nodes, id, n))
            .collect()
    }
}
