//! The ledger in the tracker's RocksDB, in column families of its own: the embedded default. The keys and
//! values are the ones every earlier tracker wrote, so existing ledgers stay readable and the heads nodes
//! verified still verify. One process owns the database (RocksDB's lock), so it is always the sequencer.

use std::sync::Arc;

use fog_proto::api::Signed;
use fog_proto::credits::{LedgerLeaf, SessionId};
use fog_proto::merkle::Hash;
use fog_proto::NodeId;
use rocksdb::{IteratorMode, WriteBatch};
use serde::Deserialize;

use super::pg::Record;
use super::{prunable, Append, ChainState, EpochLine, LedgerError, LedgerStore, Rejection, StoredTicket, TicketUse};
use crate::db::Db;

const CF_TICKETS: &str = "credit_tickets";
const CF_CHAINS: &str = "credit_chains";
const CF_TICKET_USED: &str = "credit_ticket_used";
const CF_NODE_EPOCHS: &str = "credit_node_epochs";
const CF_LEAVES: &str = "ledger_leaves";
const CF_TREE: &str = "ledger_tree";
const CF_HEADS: &str = "ledger_heads";
const CF_REJECTED: &str = "credit_rejected";
const CF_META: &str = "ledger_meta";
pub(crate) const COLUMN_FAMILIES: [&str; 9] =
    [CF_TICKETS, CF_CHAINS, CF_TICKET_USED, CF_NODE_EPOCHS, CF_LEAVES, CF_TREE, CF_HEADS, CF_REJECTED, CF_META];

const REJSEQ_PREFIX: &[u8] = b"rejseq/";

fn node_epoch_key(node: &NodeId, epoch: u64) -> Vec<u8> {
    [node.as_bytes().as_slice(), &epoch.to_be_bytes()].concat()
}

/// Tickets, their spending and their chains are keyed by the session's hex form, as they always were.
fn session_key(session: &SessionId) -> String {
    session.to_hex()
}

fn chain_key(session: &SessionId, node: &NodeId) -> Vec<u8> {
    [session_key(session).as_bytes(), b"/", node.as_bytes().as_slice()].concat()
}

fn tree_key(level: u32, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&level.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

fn rejseq_key(node: &NodeId) -> Vec<u8> {
    [REJSEQ_PREFIX, node.as_bytes()].concat()
}

fn rejection_key(node: &NodeId, seq: u64) -> Vec<u8> {
    [node.as_bytes().as_slice(), &seq.to_be_bytes()].concat()
}

fn be_u64(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

/// A ticket's spending: the bytes credited, then (since tickets are not stored) the ticket's expiry and
/// epoch, which forget it. Older rows hold the bytes only; their ticket is stored, and forgets them.
fn use_value(u: &TicketUse) -> [u8; 24] {
    let mut v = [0u8; 24];
    v[..8].copy_from_slice(&u.used.to_be_bytes());
    v[8..16].copy_from_slice(&u.expiry_ms.to_be_bytes());
    v[16..].copy_from_slice(&u.epoch.to_be_bytes());
    v
}

/// The bytes credited, and the ticket's (expiry, epoch) when the row carries them.
fn read_use(v: &[u8]) -> Option<(u64, Option<(u64, u64)>)> {
    match v.len() {
        8 => Some((be_u64(v)?, None)),
        24 => Some((be_u64(&v[..8])?, Some((be_u64(&v[8..16])?, be_u64(&v[16..])?)))),
        _ => None,
    }
}

#[derive(Debug)]
pub struct RocksStore {
    db: Arc<Db>,
}

impl RocksStore {
    pub fn new(db: Arc<Db>) -> Self {
        Self { db }
    }

    fn get<T: for<'de> Deserialize<'de>>(&self, cf: &'static str, key: &[u8]) -> Result<Option<T>, LedgerError> {
        let Some(v) = self.db.raw().get_pinned_cf(self.db.cf(cf), key)? else { return Ok(None) };
        serde_json::from_slice(&v).map(Some).map_err(|source| LedgerError::Corrupt {
            cf,
            key: hex::encode(key),
            source,
        })
    }

    fn get_u64(&self, cf: &str, key: &[u8]) -> Result<u64, LedgerError> {
        let v = self.db.raw().get_pinned_cf(self.db.cf(cf), key)?;
        Ok(v.and_then(|v| be_u64(&v)).unwrap_or(0))
    }

    fn put_json(&self, batch: &mut WriteBatch, cf: &str, key: impl AsRef<[u8]>, value: &impl serde::Serialize) {
        batch.put_cf(self.db.cf(cf), key, serde_json::to_vec(value).expect("ledger records serialise"));
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), LedgerError> {
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        self.db.raw().write_opt(batch, &opts)?;
        Ok(())
    }

    /// Calls `each` with every record of the ledger, for `fog-tracker export`: leaves and subtrees byte for
    /// byte, heads, tickets, redemption state and statements.
    pub(super) fn for_each_record(
        &self,
        each: &mut dyn FnMut(Record) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let cf = |name| self.db.cf(name);
        let bad = |cf: &'static str, k: &[u8]| LedgerError::BadKey { cf, key: hex::encode(k) };
        let corrupt = |cf: &'static str, k: &[u8]| {
            let key = hex::encode(k);
            move |source| LedgerError::Corrupt { cf, key, source }
        };
        for item in self.db.raw().iterator_cf(cf(CF_LEAVES), IteratorMode::Start) {
            let (k, v) = item?;
            let index = be_u64(&k).ok_or_else(|| bad(CF_LEAVES, &k))?;
            let leaf: LedgerLeaf = serde_json::from_slice(&v).map_err(corrupt(CF_LEAVES, &k))?;
            each(Record::Leaf { index, node: leaf.node, bytes: v.to_vec() })?;
        }
        for item in self.db.raw().iterator_cf(cf(CF_TREE), IteratorMode::Start) {
            let (k, v) = item?;
            let (Some(level), Some(index), Ok(hash)) = (
                k.get(..4).and_then(|l| <[u8; 4]>::try_from(l).ok()).map(u32::from_be_bytes),
                k.get(4..).and_then(be_u64),
                <Hash>::try_from(&*v),
            ) else {
                return Err(bad(CF_TREE, &k));
            };
            each(Record::Subtree { level, index, hash })?;
        }
        for item in self.db.raw().iterator_cf(cf(CF_HEADS), IteratorMode::Start) {
            let (k, v) = item?;
            let epoch = be_u64(&k).ok_or_else(|| bad(CF_HEADS, &k))?;
            each(Record::Head { epoch, head: serde_json::from_slice(&v).map_err(corrupt(CF_HEADS, &k))? })?;
        }
        for item in self.db.raw().iterator_cf(cf(CF_TICKETS), IteratorMode::Start) {
            let (k, v) = item?;
            each(Record::Ticket(serde_json::from_slice(&v).map_err(corrupt(CF_TICKETS, &k))?))?;
        }
        for item in self.db.raw().iterator_cf(cf(CF_CHAINS), IteratorMode::Start) {
            let (k, v) = item?;
            let session = k.get(..32).and_then(|h| std::str::from_utf8(h).ok()?.parse::<SessionId>().ok());
            let node = k.get(33..).and_then(|n| <[u8; 32]>::try_from(n).ok()).map(NodeId);
            let (Some(session), Some(node)) = (session, node) else { return Err(bad(CF_CHAINS, &k)) };
            let state = serde_json::from_slice(&v).map_err(corrupt(CF_CHAINS, &k))?;
            each(Record::Chain { session, node, state })?;
        }
        for item in self.db.raw().iterator_cf(cf(CF_TICKET_USED), IteratorMode::Start) {
            let (k, v) = item?;
            let session = std::str::from_utf8(&k).ok().and_then(|h| h.parse::<SessionId>().ok());
            let (Some(session), Some((used, expiry))) = (session, read_use(&v)) else {
                return Err(bad(CF_TICKET_USED, &k));
            };
            each(Record::Used { session, used, expiry })?;
        }
        for item in self.db.raw().iterator_cf(cf(CF_NODE_EPOCHS), IteratorMode::Start) {
            let (k, v) = item?;
            let node = k.get(..32).and_then(|n| <[u8; 32]>::try_from(n).ok()).map(NodeId);
            let (Some(node), Some(epoch), Some(bytes)) = (node, k.get(32..).and_then(be_u64), be_u64(&v)) else {
                return Err(bad(CF_NODE_EPOCHS, &k));
            };
            each(Record::NodeEpoch { node, epoch, bytes })?;
        }
        for item in self.db.raw().iterator_cf(cf(CF_REJECTED), IteratorMode::Start) {
            let (k, v) = item?;
            let node = k.get(..32).and_then(|n| <[u8; 32]>::try_from(n).ok()).map(NodeId);
            let (Some(node), Some(seq)) = (node, k.get(32..).and_then(be_u64)) else {
                return Err(bad(CF_REJECTED, &k));
            };
            let rejection = serde_json::from_slice(&v).map_err(corrupt(CF_REJECTED, &k))?;
            each(Record::Rejection { node, seq, rejection })?;
        }
        for item in self.db.raw().prefix_iterator_cf(cf(CF_META), REJSEQ_PREFIX) {
            let (k, v) = item?;
            let Some(node) = k.strip_prefix(REJSEQ_PREFIX) else { break };
            let node = <[u8; 32]>::try_from(node).ok().map(NodeId);
            let (Some(node), Some(seq)) = (node, be_u64(&v)) else { return Err(bad(CF_META, &k)) };
            each(Record::RejectedSeq { node, seq })?;
        }
        each(Record::Meta { size: self.size()?, sealed: self.sealed()? })
    }
}

impl LedgerStore for RocksStore {
    fn sequence(&self) -> Result<u64, LedgerError> {
        Ok(0)
    }

    fn commit(&self, a: &Append) -> Result<(), LedgerError> {
        let mut batch = WriteBatch::default();
        for (index, leaf) in &a.leaves {
            batch.put_cf(self.db.cf(CF_LEAVES), index.to_be_bytes(), leaf);
        }
        for (level, index, hash) in &a.subtrees {
            batch.put_cf(self.db.cf(CF_TREE), tree_key(*level, *index), hash);
        }
        for (session, node, state) in &a.chains {
            self.put_json(&mut batch, CF_CHAINS, chain_key(session, node), state);
        }
        for (session, used) in &a.used {
            batch.put_cf(self.db.cf(CF_TICKET_USED), session_key(session), use_value(used));
        }
        if let Some((epoch, bytes)) = a.node_epoch {
            batch.put_cf(self.db.cf(CF_NODE_EPOCHS), node_epoch_key(&a.node, epoch), bytes.to_be_bytes());
        }
        for (seq, rejection) in &a.rejections {
            self.put_json(&mut batch, CF_REJECTED, rejection_key(&a.node, *seq), rejection);
        }
        for seq in &a.forget_rejections {
            batch.delete_cf(self.db.cf(CF_REJECTED), rejection_key(&a.node, *seq));
        }
        batch.put_cf(self.db.cf(CF_META), rejseq_key(&a.node), a.rejected_seq.to_be_bytes());
        batch.put_cf(self.db.cf(CF_META), b"size", a.new_size().to_be_bytes());
        self.write_synced(batch)
    }

    fn seal(&self, _token: u64, epoch: u64, head: &Signed) -> Result<(), LedgerError> {
        let mut batch = WriteBatch::default();
        self.put_json(&mut batch, CF_HEADS, epoch.to_be_bytes(), head);
        batch.put_cf(self.db.cf(CF_META), b"sealed", (epoch + 1).to_be_bytes());
        // Unsynced, as it always was: a head lost in a crash is sealed again from the same log.
        self.db.raw().write(batch)?;
        Ok(())
    }

    #[cfg(test)]
    fn put_ticket(&self, t: &StoredTicket) -> Result<(), LedgerError> {
        let stored = serde_json::to_vec(t).expect("tickets serialise");
        self.db.raw().put_cf(self.db.cf(CF_TICKETS), session_key(&t.ticket.session), stored)?;
        Ok(())
    }

    fn prune_tickets(&self, horizon_ms: u64, current_epoch: u64) -> Result<usize, LedgerError> {
        let mut batch = WriteBatch::default();
        let mut dropped = std::collections::HashSet::new();
        // Tickets older trackers stored, with their spending and chains.
        for item in self.db.raw().iterator_cf(self.db.cf(CF_TICKETS), IteratorMode::Start) {
            let (k, v) = item?;
            let Ok(stored) = serde_json::from_slice::<StoredTicket>(&v) else { continue };
            if !prunable(stored.ticket.expiry_ms, stored.ticket.epoch, horizon_ms, current_epoch) {
                continue;
            }
            batch.delete_cf(self.db.cf(CF_TICKETS), &k);
            batch.delete_cf(self.db.cf(CF_TICKET_USED), &k);
            for node in &stored.ticket.nodes {
                batch.delete_cf(self.db.cf(CF_CHAINS), chain_key(&stored.ticket.session, node));
            }
            dropped.insert(k);
        }
        // Spending that carries its ticket's expiry, and the session's chains (keys `session/node`).
        for item in self.db.raw().iterator_cf(self.db.cf(CF_TICKET_USED), IteratorMode::Start) {
            let (k, v) = item?;
            let Some((_, Some((expiry_ms, epoch)))) = read_use(&v) else { continue };
            if !prunable(expiry_ms, epoch, horizon_ms, current_epoch) || dropped.contains(&k) {
                continue;
            }
            batch.delete_cf(self.db.cf(CF_TICKET_USED), &k);
            let prefix = [&*k, b"/"].concat();
            let from = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
            for chain in self.db.raw().iterator_cf(self.db.cf(CF_CHAINS), from) {
                let (ck, _) = chain?;
                if !ck.starts_with(&prefix) {
                    break;
                }
                batch.delete_cf(self.db.cf(CF_CHAINS), &ck);
            }
            dropped.insert(k);
        }
        self.db.raw().write(batch)?;
        Ok(dropped.len())
    }

    fn size(&self) -> Result<u64, LedgerError> {
        self.get_u64(CF_META, b"size")
    }

    fn sealed(&self) -> Result<u64, LedgerError> {
        self.get_u64(CF_META, b"sealed")
    }

    fn subtree(&self, level: u32, index: u64) -> Result<Option<Hash>, LedgerError> {
        let raw = self.db.raw().get_pinned_cf(self.db.cf(CF_TREE), tree_key(level, index))?;
        Ok(raw.and_then(|v| <Hash>::try_from(&*v).ok()))
    }

    fn leaf(&self, index: u64) -> Result<Option<LedgerLeaf>, LedgerError> {
        self.get(CF_LEAVES, &index.to_be_bytes())
    }

    fn node_records(
        &self,
        node: &NodeId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<(u64, LedgerLeaf)>, LedgerError> {
        let mut records = Vec::new();
        for index in (from..to).rev() {
            if records.len() >= max {
                break;
            }
            if let Some(leaf) = self.leaf(index)? {
                if leaf.node == *node {
                    records.push((index, leaf));
                }
            }
        }
        Ok(records)
    }

    fn epoch_head(&self, epoch: u64) -> Result<Option<Signed>, LedgerError> {
        self.get(CF_HEADS, &epoch.to_be_bytes())
    }

    fn ticket(&self, session: &SessionId) -> Result<Option<StoredTicket>, LedgerError> {
        self.get(CF_TICKETS, session_key(session).as_bytes())
    }

    fn chain(&self, session: &SessionId, node: &NodeId) -> Result<Option<ChainState>, LedgerError> {
        self.get(CF_CHAINS, &chain_key(session, node))
    }

    fn ticket_used(&self, session: &SessionId) -> Result<u64, LedgerError> {
        let v = self.db.raw().get_pinned_cf(self.db.cf(CF_TICKET_USED), session_key(session))?;
        Ok(v.and_then(|v| read_use(&v)).map_or(0, |(used, _)| used))
    }

    fn node_epoch(&self, node: &NodeId, epoch: u64) -> Result<u64, LedgerError> {
        self.get_u64(CF_NODE_EPOCHS, &node_epoch_key(node, epoch))
    }

    fn node_epochs(&self, node: &NodeId) -> Result<Vec<EpochLine>, LedgerError> {
        let mut epochs = Vec::new();
        let prefix = node.as_bytes().to_vec();
        for item in self.db.raw().prefix_iterator_cf(self.db.cf(CF_NODE_EPOCHS), &prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let epoch = k.get(32..40).and_then(be_u64);
            let epoch = epoch.ok_or_else(|| LedgerError::BadKey { cf: CF_NODE_EPOCHS, key: hex::encode(&k) })?;
            epochs.push(EpochLine { epoch, credited_bytes: be_u64(&v).unwrap_or(0) });
        }
        Ok(epochs)
    }

    fn credited_nodes(&self) -> Result<Vec<NodeId>, LedgerError> {
        let mut nodes: Vec<NodeId> = Vec::new();
        for item in self.db.raw().iterator_cf(self.db.cf(CF_NODE_EPOCHS), IteratorMode::Start) {
            let (k, _) = item?;
            if let Some(id) = k.get(..32).and_then(|k| <[u8; 32]>::try_from(k).ok()) {
                if nodes.last() != Some(&NodeId(id)) {
                    nodes.push(NodeId(id));
                }
            }
        }
        Ok(nodes)
    }

    fn rejected_seq(&self, node: &NodeId) -> Result<u64, LedgerError> {
        self.get_u64(CF_META, &rejseq_key(node))
    }

    fn rejections(&self, node: &NodeId) -> Result<Vec<Rejection>, LedgerError> {
        let mut rejected = Vec::new();
        let prefix = node.as_bytes().to_vec();
        for item in self.db.raw().prefix_iterator_cf(self.db.cf(CF_REJECTED), &prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if let Ok(r) = serde_json::from_slice::<Rejection>(&v) {
                rejected.push(r);
            }
        }
        Ok(rejected)
    }
}
