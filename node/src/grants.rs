//! Which origin hints a node acts on. Filling a miss through costs a whole chunk from the origin (or from a
//! peer that fills it through), so a hint counts only when it comes with a ticket the tracker signed that
//! assigns chunks to the node the fill is for (this node for its clients; the asking peer when this node is
//! the chunk's home), and only for as many fills as the ticket assigned that node, plus a retry or two.
//! A stranger without a ticket can still be served what the node holds; it cannot make anyone download.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use fog_proto::api::Signed;
use fog_proto::credits::{Ticket, KIND_TICKET};
use fog_proto::NodeId;

/// Fills a ticket allows beyond the chunks it assigned (a fill that failed and was asked again).
const FILL_SLACK: u32 = 2;
/// Tickets × beneficiaries remembered; beyond it, expired and used-up grants go first, then new tickets
/// are refused until some expire.
const MAX_GRANTS: usize = 16_384;

/// Why a hint was not acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no ticket came with the origin hint")]
    NoTicket,
    #[error("the tracker's key is not known yet (not registered since start)")]
    NoTrackerKey,
    #[error("the ticket is not a tracker-signed ticket")]
    Forged,
    #[error("the ticket has expired")]
    Expired,
    #[error("the ticket assigns no chunks to the node the fill is for")]
    NotAssigned,
    #[error("the ticket's fills are used up")]
    UsedUp,
    #[error("too many tickets in use; try another node")]
    Full,
}

#[derive(Debug)]
struct Grant {
    expiry_ms: u64,
    allowed: u32,
    used: AtomicU32,
}

impl Grant {
    fn spent(&self) -> bool {
        self.used.load(Ordering::Relaxed) >= self.allowed
    }
}

/// BLAKE3 of the signed ticket's bytes, and the node the fills are for.
type GrantKey = ([u8; 32], NodeId);

#[derive(Debug, Default)]
pub struct FillGrants {
    tracker_key: Mutex<Option<NodeId>>,
    grants: Mutex<HashMap<GrantKey, Arc<Grant>>>,
}

impl FillGrants {
    /// The key tickets must be signed with, learned at registration.
    pub fn set_tracker_key(&self, key: Option<NodeId>) {
        *self.tracker_key.lock().expect("tracker key lock") = key;
    }

    /// Takes one fill for `beneficiary` from the ticket. A ticket seen before costs a hash; a new one also a
    /// signature check, so call this off the async workers.
    pub fn take(&self, ticket: Option<&[u8]>, beneficiary: NodeId, now_ms: u64) -> Result<(), Refusal> {
        let ticket = ticket.ok_or(Refusal::NoTicket)?;
        let key = (*blake3::hash(ticket).as_bytes(), beneficiary);
        let known = self.grants.lock().expect("grants lock").get(&key).cloned();
        let grant = match known {
            Some(g) => g,
            None => {
                let grant = Arc::new(self.verify(ticket, beneficiary)?);
                let mut grants = self.grants.lock().expect("grants lock");
                if grants.len() >= MAX_GRANTS {
                    grants.retain(|_, g| g.expiry_ms > now_ms && !g.spent());
                }
                if grants.len() >= MAX_GRANTS {
                    return Err(Refusal::Full);
                }
                grants.entry(key).or_insert(grant).clone()
            }
        };
        if grant.expiry_ms <= now_ms {
            return Err(Refusal::Expired);
        }
        let taken =
            grant.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < grant.allowed).then(|| n + 1));
        taken.map(drop).map_err(|_| Refusal::UsedUp)
    }

    fn verify(&self, ticket: &[u8], beneficiary: NodeId) -> Result<Grant, Refusal> {
        let tracker_key = self.tracker_key.lock().expect("tracker key lock").ok_or(Refusal::NoTrackerKey)?;
        let signed: Signed = serde_json::from_slice(ticket).map_err(|_| Refusal::Forged)?;
        if signed.node_id != tracker_key {
            return Err(Refusal::Forged);
        }
        let t: Ticket = signed.open(KIND_TICKET).map_err(|_| Refusal::Forged)?;
        let slot = t.nodes.iter().position(|n| *n == beneficiary).ok_or(Refusal::NotAssigned)?;
        let assigned = t.assigned_chunks.get(slot).copied().unwrap_or(0);
        if assigned == 0 {
            return Err(Refusal::NotAssigned);
        }
        Ok(Grant { expiry_ms: t.expiry_ms, allowed: assigned.saturating_add(FILL_SLACK), used: AtomicU32::new(0) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn ticket(tracker: &SigningKey, nodes: &[(NodeId, u32)], expiry_ms: u64) -> Vec<u8> {
        let t = Ticket {
            session: fog_proto::credits::SessionId([0; 16]),
            client_key: NodeId::from(SigningKey::from_bytes(&[9; 32]).verifying_key()),
            content_id: fog_proto::ContentId([0; 32]),
            nodes: nodes.iter().map(|n| n.0).collect(),
            assigned_chunks: nodes.iter().map(|n| n.1).collect(),
            unit: 1 << 20,
            byte_budget: 1 << 30,
            expiry_ms,
            epoch: 0,
        };
        serde_json::to_vec(&Signed::sign(tracker, KIND_TICKET, &t)).expect("json")
    }

    #[test]
    fn hints_count_only_with_a_tracker_ticket_and_only_as_often_as_it_assigned() {
        let tracker = SigningKey::from_bytes(&[1; 32]);
        let (me, other) = (NodeId::from(SigningKey::from_bytes(&[2; 32]).verifying_key()), NodeId([3; 32]));
        let grants = FillGrants::default();
        let good = ticket(&tracker, &[(me, 2), (other, 0)], 10_000);
        assert_eq!(grants.take(Some(&good), me, 0), Err(Refusal::NoTrackerKey));
        grants.set_tracker_key(Some(NodeId::from(tracker.verifying_key())));
        assert_eq!(grants.take(None, me, 0), Err(Refusal::NoTicket));
        for _ in 0..2 + FILL_SLACK {
            assert_eq!(grants.take(Some(&good), me, 0), Ok(()));
        }
        assert_eq!(grants.take(Some(&good), me, 0), Err(Refusal::UsedUp));
        assert_eq!(grants.take(Some(&good), other, 0), Err(Refusal::NotAssigned));
        assert_eq!(grants.take(Some(&good), NodeId([4; 32]), 0), Err(Refusal::NotAssigned));
        // Another key's ticket, a tampered one, junk.
        let forged = ticket(&SigningKey::from_bytes(&[5; 32]), &[(me, 9)], 10_000);
        assert_eq!(grants.take(Some(&forged), me, 0), Err(Refusal::Forged));
        let mut tampered: Signed = serde_json::from_slice(&good).expect("json");
        tampered.payload = tampered.payload.replace("\"expiry_ms\":10000", "\"expiry_ms\":99999");
        let tampered = serde_json::to_vec(&tampered).expect("json");
        assert_eq!(grants.take(Some(&tampered), me, 0), Err(Refusal::Forged));
        assert_eq!(grants.take(Some(b"junk"), me, 0), Err(Refusal::Forged));
        let fresh = ticket(&tracker, &[(me, 5)], 10_000);
        assert_eq!(grants.take(Some(&fresh), me, 10_000), Err(Refusal::Expired));
    }

    #[test]
    fn the_table_stays_bounded() {
        let tracker = SigningKey::from_bytes(&[1; 32]);
        let me = NodeId([2; 32]);
        let grants = FillGrants::default();
        grants.set_tracker_key(Some(NodeId::from(tracker.verifying_key())));
        for expiry in 0..MAX_GRANTS as u64 {
            grants.take(Some(&ticket(&tracker, &[(me, 1)], 1_000 + expiry)), me, 0).expect("fill");
        }
        let one_more = ticket(&tracker, &[(me, 1)], 1);
        assert_eq!(grants.take(Some(&one_more), me, 0), Err(Refusal::Full));
        // Once tickets expire, their room is reused.
        assert_eq!(grants.take(Some(&ticket(&tracker, &[(me, 1)], 1 << 40)), me, 2_000), Ok(()));
        assert!(grants.grants.lock().expect("lock").len() < MAX_GRANTS);
    }
}
