//! The ledger in PostgreSQL, shared by the replicas of a cell (`docs/credits.md`, Storage).
//!
//! The log is split into shards (`--ledger-shards`, recorded in `ledger_config` the first time: changing it
//! would move sessions between logs, so a replica started with another count refuses to start). Each
//! shard is a Merkle log of its own, with its own leaves, subtrees, sealed heads and chain state, and its
//! appends are made by one **sequencer**: the replica holding the shard's lease, a row in
//! `ledger_shards` with the holder, its advertised URL, the lease's end and a **fencing token**. Every
//! append is one transaction that reads the shard row `FOR UPDATE`, compares the token (and the log's
//! size) with the ones its state was read under, writes the leaves, subtrees, chains and totals, bumps the
//! size and commits: a replica that lost the lease (paused, partitioned, presumed dead) fails there and
//! writes nothing. Any replica takes over a lease that expired, with the token + 1. Every session runs with
//! `synchronous_commit = on` (money, and leases: a lost takeover could hand one token to two replicas).
//!
//! The replicas divide the shards: each says it is alive in `ledger_replicas` every second
//! ([`LedgerStore::tend`]), and a shard belongs to the live replica rendezvous hashing picks for it. That
//! replica takes and keeps its lease; another takes it only while its owner is not alive (and gives it
//! back once it is), so leases move only when replicas come and go.
//!
//! The store caches nothing but its lease: every read goes to the database, so a replica that takes over
//! has nothing to rebuild, and what it reads is what the previous sequencer committed.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use fog_proto::api::Signed;
use fog_proto::credits::{Digest, LedgerLeaf, SessionId, MAX_SHARDS};
use fog_proto::merkle::{self, Hash};
use fog_proto::NodeId;
use serde::de::DeserializeOwned;

use super::rocks::RocksStore;
use super::{
    Append, ChainState, EpochLine, LedgerError, LedgerStore, Rejection, StoredTicket, TreeView, LEDGER_QUERY_TIMEOUT,
};
use crate::db::Db;
use crate::metrics::LedgerMetrics;
use crate::store::pg as store_pg;

/// How long a sequencer's lease lasts; it renews it when half has passed while it appends. A replica that
/// dies holds up appends (nodes keep their receipts and redeem again) for at most this long.
pub const LEASE: Duration = Duration::from_secs(5);
/// How often a replica says it is alive and reads who else is (at most; a quarter lease if that is
/// shorter). A replica not seen for a lease is not alive; one not seen for ten is forgotten.
const TEND_EVERY: Duration = Duration::from_secs(1);
/// Rows per transaction of an export.
const EXPORT_BATCH: usize = 4096;

/// The ledger's tables: migration 1 of its component in `fog_schema` (`store::pg::migrate`).
const SCHEMA: &str = "
CREATE TABLE ledger_shards (
    shard integer PRIMARY KEY,
    size bigint NOT NULL DEFAULT 0,
    sealed bigint NOT NULL DEFAULT 0,
    token bigint NOT NULL DEFAULT 0,
    holder text,
    holder_url text,
    lease_until timestamptz NOT NULL DEFAULT '-infinity'
);
CREATE TABLE ledger_leaves (
    shard integer NOT NULL, idx bigint NOT NULL, node bytea NOT NULL, leaf bytea NOT NULL,
    PRIMARY KEY (shard, idx)
);
CREATE INDEX ledger_leaves_by_node ON ledger_leaves (shard, node, idx);
CREATE TABLE ledger_tree (
    shard integer NOT NULL, level integer NOT NULL, idx bigint NOT NULL, hash bytea NOT NULL,
    PRIMARY KEY (shard, level, idx)
);
CREATE TABLE ledger_heads (
    shard integer NOT NULL, epoch bigint NOT NULL, head text NOT NULL, PRIMARY KEY (shard, epoch)
);
CREATE TABLE ledger_tickets (
    shard integer NOT NULL, session bytea NOT NULL, expiry_ms bigint NOT NULL, epoch bigint NOT NULL,
    stored text NOT NULL, PRIMARY KEY (shard, session)
);
CREATE TABLE ledger_chains (
    shard integer NOT NULL, session bytea NOT NULL, node bytea NOT NULL, idx bigint NOT NULL,
    credited bigint NOT NULL, PRIMARY KEY (shard, session, node)
);
CREATE TABLE ledger_ticket_used (
    shard integer NOT NULL, session bytea NOT NULL, used bigint NOT NULL, PRIMARY KEY (shard, session)
);
CREATE TABLE ledger_node_epochs (
    shard integer NOT NULL, node bytea NOT NULL, epoch bigint NOT NULL, bytes bigint NOT NULL,
    PRIMARY KEY (shard, node, epoch)
);
CREATE TABLE ledger_rejections (
    shard integer NOT NULL, node bytea NOT NULL, seq bigint NOT NULL, rejection text NOT NULL,
    PRIMARY KEY (shard, node, seq)
);
CREATE TABLE ledger_rejected_seq (
    shard integer NOT NULL, node bytea NOT NULL, seq bigint NOT NULL, PRIMARY KEY (shard, node)
);
";

/// Migration 2, stateless tickets: a ticket's spending carries the ticket's expiry and epoch, which forget
/// it (no ticket is stored any more). Rows written before hold none; their stored ticket forgets them.
const TICKET_USE: &str = "
ALTER TABLE ledger_ticket_used ADD COLUMN expiry_ms bigint, ADD COLUMN epoch bigint;
CREATE INDEX ledger_ticket_used_by_expiry ON ledger_ticket_used (shard, expiry_ms);
";

/// Migration 3, shards: how many the ledger has (one row, written once), and the replicas alive lately,
/// among which the shards are divided.
const SHARDS: &str = "
CREATE TABLE ledger_config (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    shards integer NOT NULL
);
CREATE TABLE ledger_replicas (replica text PRIMARY KEY, seen timestamptz NOT NULL);
";

/// Records the shard count the first time; a ledger written before shards were counted has one (its
/// sessions are all in shard 0, and must stay there).
const RECORD_SHARDS: &str = "
INSERT INTO ledger_config (shards)
SELECT CASE WHEN EXISTS (SELECT 1 FROM ledger_shards WHERE size > 0 OR sealed > 0)
              OR EXISTS (SELECT 1 FROM ledger_chains) OR EXISTS (SELECT 1 FROM ledger_tickets)
            THEN 1 ELSE $1::int4 END
ON CONFLICT DO NOTHING";

/// Renews the lease if this replica holds it (same token: nobody else can have written since it took it),
/// or, if `$5`, takes it if it expired (token + 1). Times are the database's, so replicas' clocks do not
/// matter.
const TAKE_LEASE: &str = "
UPDATE ledger_shards
   SET token = CASE WHEN holder = $2 THEN token ELSE token + 1 END,
       holder = $2, holder_url = $3, lease_until = clock_timestamp() + make_interval(secs => $4)
 WHERE shard = $1 AND (holder = $2 OR ($5 AND lease_until < clock_timestamp()))
RETURNING token";

/// One ledger record, as `fog-tracker export` copies it. A ticket's spending (`Used`) carries the ticket's
/// (expiry, epoch), unless the ticket is stored (`Ticket`, from before tickets were stateless).
pub(super) enum Record {
    Leaf { index: u64, node: NodeId, bytes: Vec<u8> },
    Subtree { level: u32, index: u64, hash: Hash },
    Head { epoch: u64, head: Signed },
    Ticket(StoredTicket),
    Chain { session: SessionId, node: NodeId, state: ChainState },
    Used { session: SessionId, used: u64, expiry: Option<(u64, u64)> },
    NodeEpoch { node: NodeId, epoch: u64, bytes: u64 },
    Rejection { node: NodeId, seq: u64, rejection: Rejection },
    RejectedSeq { node: NodeId, seq: u64 },
    Meta { size: u64, sealed: u64 },
}

/// The lease this replica holds, and when to renew it.
#[derive(Debug, Clone, Copy)]
struct Held {
    token: u64,
    renew_at: Instant,
}

/// What the shards of one replica share: the database client, and who this replica is.
struct Client {
    /// The client's own runtime: the ledger's callers are blocking code, on any runtime or none.
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    pool: Pool,
    /// This process, as the leases' holder.
    replica: String,
    /// Where this replica answers, advertised in the lease for operators and for the other replicas, which
    /// forward a shard's receipts there.
    url: String,
    lease: Duration,
    metrics: LedgerMetrics,
    /// The replicas alive at the last look (sorted; empty: never looked, as a store nobody tends), and when
    /// that was.
    live: Mutex<(Option<Instant>, Vec<String>)>,
}

/// One shard of the ledger in PostgreSQL, as one replica sees it.
pub struct PgStore {
    client: Arc<Client>,
    shard: i32,
    held: Mutex<Option<Held>>,
    /// The token this process held last (0: none): a token taken that is neither is a takeover.
    last_token: Mutex<u64>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("shard", &self.shard)
            .field("replica", &self.client.replica)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async caller's thread must not; its tasks need no goodbye.
        if let Some(rt) = self.rt.get_mut().ok().and_then(Option::take) {
            rt.shutdown_background();
        }
    }
}

fn i(v: u64) -> i64 {
    v as i64
}

fn u(v: i64) -> u64 {
    v as u64
}

fn json<T: DeserializeOwned>(cf: &'static str, key: String, raw: &[u8]) -> Result<T, LedgerError> {
    serde_json::from_slice(raw).map_err(|source| LedgerError::Corrupt { cf, key, source })
}

fn to_json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("ledger records serialise")
}

/// The live replica rendezvous hashing gives `shard` to: the highest hash of (shard, replica).
pub(super) fn owner(shard: u32, live: &[String]) -> Option<&str> {
    let weight = |r: &String| {
        let mut h = blake3::Hasher::new();
        h.update(b"fog-ledger-shard-v1");
        h.update(&shard.to_be_bytes());
        h.update(r.as_bytes());
        *h.finalize().as_bytes()
    };
    live.iter().max_by_key(|r| weight(r)).map(String::as_str)
}

impl PgStore {
    /// A one-shard ledger: [`connect_shards`](Self::connect_shards) with one shard, as a database exported
    /// from an embedded tracker has.
    pub fn connect(conn: &str, url: &str, lease: Duration) -> Result<Self, LedgerError> {
        let mut shards = Self::connect_shards(conn, url, lease, 1)?;
        Ok(Arc::into_inner(shards.remove(0)).expect("only this reference"))
    }

    /// Connects to `conn` (a libpq connection string; several hosts with `target_session_attrs=read-write`
    /// follow a failover), creates the ledger's tables if missing, records `shards` if no count is
    /// recorded yet, and names this replica by `url`: the stores of shards `0..shards`, sharing one client.
    /// Fails with [`LedgerError::ShardCount`] when the database's ledger has another count.
    pub fn connect_shards(conn: &str, url: &str, lease: Duration, shards: u32) -> Result<Vec<Arc<Self>>, LedgerError> {
        if !(1..=MAX_SHARDS).contains(&shards) {
            return Err(LedgerError::Setup(format!("a ledger has 1 to {MAX_SHARDS} shards, not {shards}")));
        }
        // Money: every ledger commit waits until the synchronous standby has it.
        let pool = store_pg::pool(conn, "-c synchronous_commit=on")?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fog-ledger-pg")
            .enable_all()
            .build()
            .map_err(|e| LedgerError::Setup(e.to_string()))?;
        let client = Arc::new(Client {
            rt: Mutex::new(Some(rt)),
            pool,
            replica: hex::encode(rand::random::<[u8; 8]>()),
            url: url.to_string(),
            lease,
            metrics: LedgerMetrics::default(),
            live: Mutex::new((None, Vec::new())),
        });
        let pool = client.pool.clone();
        let recorded = client.block("creating the ledger's tables", async move {
            store_pg::migrate(&pool, "ledger", &[SCHEMA, TICKET_USE, SHARDS]).await?;
            let c = pool.get().await?;
            c.execute(RECORD_SHARDS, &[&(shards as i32)]).await?;
            let recorded: i32 = c.query_one("SELECT shards FROM ledger_config", &[]).await?.get(0);
            if recorded as u32 == shards {
                let sql =
                    "INSERT INTO ledger_shards (shard) SELECT generate_series(0, $1::int4 - 1) ON CONFLICT DO NOTHING";
                c.execute(sql, &[&(shards as i32)]).await?;
            }
            Ok(recorded as u32)
        })?;
        if recorded != shards {
            return Err(LedgerError::ShardCount { database: recorded, configured: shards });
        }
        client.metrics.shards(shards);
        Ok((0..shards)
            .map(|shard| {
                Arc::new(Self {
                    client: client.clone(),
                    shard: shard as i32,
                    held: Mutex::new(None),
                    last_token: Mutex::new(0),
                })
            })
            .collect())
    }

    fn pool(&self) -> Pool {
        self.client.pool.clone()
    }

    fn block<T, F>(&self, what: &'static str, fut: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, LedgerError>> + Send + 'static,
    {
        self.client.block(what, fut)
    }

    /// Whether this replica may take this shard's lease: it is the shard's owner among the live replicas,
    /// or it does not know who is alive (nobody tends this store).
    fn may_take(&self) -> bool {
        let live = self.client.live.lock().expect("ledger replicas lock");
        live.1.is_empty() || owner(self.shard as u32, &live.1) == Some(self.client.replica.as_str())
    }
}

impl Client {
    /// Runs `fut` on the client's runtime and waits for it, for at most [`LEDGER_QUERY_TIMEOUT`].
    fn block<T, F>(&self, what: &'static str, fut: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, LedgerError>> + Send + 'static,
    {
        let handle = self.rt.lock().expect("ledger runtime lock").as_ref().map(|rt| rt.handle().clone());
        let handle = handle.ok_or(LedgerError::Stopped)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        handle.spawn(async move {
            let out =
                tokio::time::timeout(LEDGER_QUERY_TIMEOUT, fut).await.unwrap_or(Err(LedgerError::Timeout { what }));
            let _ = tx.send(out);
        });
        let wait = move || rx.recv().unwrap_or(Err(LedgerError::Stopped));
        // On a multi-threaded runtime's worker, let the runtime move its other tasks away while this waits.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    /// Says this replica is alive and reads which replicas are (at most once per [`TEND_EVERY`]).
    fn tend(&self) -> Result<(), LedgerError> {
        let every = TEND_EVERY.min(self.lease / 4);
        if self.live.lock().expect("ledger replicas lock").0.is_some_and(|at| at.elapsed() < every) {
            return Ok(());
        }
        let (pool, replica, alive) = (self.pool.clone(), self.replica.clone(), self.lease.as_secs_f64());
        let live = self.block("saying this replica is alive", async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(
                    "INSERT INTO ledger_replicas (replica, seen) VALUES ($1, clock_timestamp())
                     ON CONFLICT (replica) DO UPDATE SET seen = EXCLUDED.seen",
                )
                .await?;
            c.execute(&st, &[&replica]).await?;
            let st = c
                .prepare_cached("DELETE FROM ledger_replicas WHERE seen < clock_timestamp() - make_interval(secs => $1::float8 * 10)")
                .await?;
            c.execute(&st, &[&alive]).await?;
            let st = c
                .prepare_cached(
                    "SELECT replica FROM ledger_replicas WHERE seen > clock_timestamp() - make_interval(secs => $1::float8)
                     ORDER BY replica",
                )
                .await?;
            Ok(c.query(&st, &[&alive]).await?.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
        })?;
        *self.live.lock().expect("ledger replicas lock") = (Some(Instant::now()), live);
        Ok(())
    }
}

impl PgStore {
    /// One row's first column, or `None`.
    fn one<T>(&self, what: &'static str, sql: &'static str, params: Params) -> Result<Option<T>, LedgerError>
    where
        T: for<'a> tokio_postgres::types::FromSql<'a> + Send + 'static,
    {
        let pool = self.pool();
        self.block(what, async move {
            let c = pool.get().await?;
            let st = c.prepare_cached(sql).await?;
            let refs = params.refs();
            Ok(c.query_opt(&st, &refs).await?.map(|row| row.get::<_, T>(0)))
        })
    }

    /// Every row of `sql`, mapped by `f`.
    fn all<T, F>(&self, what: &'static str, sql: &'static str, params: Params, f: F) -> Result<Vec<T>, LedgerError>
    where
        T: Send + 'static,
        F: Fn(&tokio_postgres::Row) -> Result<T, LedgerError> + Send + 'static,
    {
        let pool = self.pool();
        self.block(what, async move {
            let c = pool.get().await?;
            let st = c.prepare_cached(sql).await?;
            let refs = params.refs();
            c.query(&st, &refs).await?.iter().map(f).collect()
        })
    }

    /// Copies exported records in, in one transaction fenced by this replica's lease (so no replica appends
    /// while an export runs).
    fn import(&self, records: Vec<Record>) -> Result<(), LedgerError> {
        let token = self.sequence()?;
        let (pool, shard) = (self.pool(), self.shard);
        self.block("importing ledger records", async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            fence(&tx, shard, token, None).await?;
            for r in records {
                let (sql, params) = match r {
                    Record::Leaf { index, node, bytes } => (
                        "INSERT INTO ledger_leaves (shard, idx, node, leaf) VALUES ($1, $2, $3, $4)",
                        Params::new().int(shard).big(index).bytes(node.as_bytes()).bytes(&bytes),
                    ),
                    Record::Subtree { level, index, hash } => (
                        "INSERT INTO ledger_tree (shard, level, idx, hash) VALUES ($1, $2, $3, $4)",
                        Params::new().int(shard).int(level as i32).big(index).bytes(&hash),
                    ),
                    Record::Head { epoch, head } => (
                        "INSERT INTO ledger_heads (shard, epoch, head) VALUES ($1, $2, $3)",
                        Params::new().int(shard).big(epoch).text(to_json(&head)),
                    ),
                    Record::Ticket(t) => (
                        "INSERT INTO ledger_tickets (shard, session, expiry_ms, epoch, stored)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                        Params::new()
                            .int(shard)
                            .bytes(t.ticket.session.as_bytes())
                            .big(t.ticket.expiry_ms)
                            .big(t.ticket.epoch)
                            .text(to_json(&t)),
                    ),
                    Record::Chain { session, node, state } => (
                        "INSERT INTO ledger_chains (shard, session, node, idx, credited) VALUES ($1, $2, $3, $4, $5)",
                        Params::new()
                            .int(shard)
                            .bytes(session.as_bytes())
                            .bytes(node.as_bytes())
                            .big(state.index.into())
                            .big(state.credited),
                    ),
                    Record::Used { session, used, expiry } => (
                        "INSERT INTO ledger_ticket_used (shard, session, used, expiry_ms, epoch)
                         VALUES ($1, $2, $3, $4, $5)",
                        Params::new()
                            .int(shard)
                            .bytes(session.as_bytes())
                            .big(used)
                            .opt(expiry.map(|(expiry_ms, _)| expiry_ms))
                            .opt(expiry.map(|(_, epoch)| epoch)),
                    ),
                    Record::NodeEpoch { node, epoch, bytes } => (
                        "INSERT INTO ledger_node_epochs (shard, node, epoch, bytes) VALUES ($1, $2, $3, $4)",
                        Params::new().int(shard).bytes(node.as_bytes()).big(epoch).big(bytes),
                    ),
                    Record::Rejection { node, seq, rejection } => (
                        "INSERT INTO ledger_rejections (shard, node, seq, rejection) VALUES ($1, $2, $3, $4)",
                        Params::new().int(shard).bytes(node.as_bytes()).big(seq).text(to_json(&rejection)),
                    ),
                    Record::RejectedSeq { node, seq } => (
                        "INSERT INTO ledger_rejected_seq (shard, node, seq) VALUES ($1, $2, $3)",
                        Params::new().int(shard).bytes(node.as_bytes()).big(seq),
                    ),
                    Record::Meta { size, sealed } => (
                        "UPDATE ledger_shards SET size = $2, sealed = $3 WHERE shard = $1",
                        Params::new().int(shard).big(size).big(sealed),
                    ),
                };
                let st = tx.prepare_cached(sql).await?;
                tx.execute(&st, &params.refs()).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// The lease's metrics (`fog_tracker_ledger_*`), for the tracker's registry.
    pub fn metrics(&self) -> LedgerMetrics {
        self.client.metrics.clone()
    }

    /// The lease was lost to another replica: `what` was refused.
    fn fenced(&self, token: u64, what: &str) {
        tracing::warn!(token, shard = self.shard, "lost the ledger shard's lease to another replica; {what}");
        *self.held.lock().expect("ledger lease lock") = None;
        self.client.metrics.sequencer(self.shard as u32).held_until(None);
        self.client.metrics.fenced(self.shard as u32).inc();
    }

    /// Gives up the lease if this replica holds it, so that another takes over without waiting it out.
    pub fn release(&self) -> Result<(), LedgerError> {
        let (pool, shard, replica) = (self.pool(), self.shard, self.client.replica.clone());
        *self.held.lock().expect("ledger lease lock") = None;
        self.client.metrics.sequencer(self.shard as u32).held_until(None);
        self.block("releasing the ledger's lease", async move {
            let c = pool.get().await?;
            // No holder: whoever takes it next, this replica included, moves the token on.
            let sql = "UPDATE ledger_shards SET lease_until = '-infinity', holder = NULL, holder_url = NULL
                       WHERE shard = $1 AND holder = $2";
            c.execute(sql, &[&shard, &replica]).await?;
            Ok(())
        })
    }

    /// Rows in one of the ledger's tables, for an export's check.
    fn count(&self, table: &'static str) -> Result<u64, LedgerError> {
        let sql = match table {
            "ledger_leaves" => "SELECT count(*) FROM ledger_leaves WHERE shard = $1",
            _ => "SELECT count(*) FROM ledger_tree WHERE shard = $1",
        };
        Ok(self.one::<i64>("counting ledger rows", sql, Params::new().int(self.shard))?.map_or(0, u))
    }

    /// Whether the database names this replica the lease's holder.
    #[cfg(test)]
    pub(super) fn holds_lease(&self) -> bool {
        let sql = "SELECT holder FROM ledger_shards WHERE shard = $1";
        let holder = self.one::<Option<String>>("reading the lease", sql, Params::new().int(self.shard));
        holder.ok().flatten().flatten().as_deref() == Some(self.client.replica.as_str())
    }

    /// This replica's id, as leases and `ledger_replicas` name it.
    #[cfg(test)]
    pub(super) fn replica(&self) -> &str {
        &self.client.replica
    }

    /// Ends the client as a killed replica's would end: in-flight transactions are cut off mid-way.
    #[cfg(test)]
    pub(super) fn kill(&self) {
        if let Some(rt) = self.client.rt.lock().expect("ledger runtime lock").take() {
            rt.shutdown_background();
        }
    }
}

/// Query parameters, owned (queries run on the client's runtime, apart from the caller's borrows).
#[derive(Default)]
struct Params(Vec<Box<dyn tokio_postgres::types::ToSql + Send + Sync>>);

impl Params {
    fn new() -> Self {
        Self::default()
    }

    fn int(mut self, v: i32) -> Self {
        self.0.push(Box::new(v));
        self
    }

    fn big(mut self, v: u64) -> Self {
        self.0.push(Box::new(i(v)));
        self
    }

    fn bytes(mut self, v: &[u8]) -> Self {
        self.0.push(Box::new(v.to_vec()));
        self
    }

    fn text(mut self, v: String) -> Self {
        self.0.push(Box::new(v));
        self
    }

    fn opt(mut self, v: Option<u64>) -> Self {
        self.0.push(Box::new(v.map(i)));
        self
    }

    fn refs(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        self.0.iter().map(|b| &**b as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
    }
}

/// Locks the shard row and checks that `token` still holds the lease (and, for appends, that the log has
/// `size` leaves): the fence every write passes inside its own transaction.
async fn fence(
    tx: &deadpool_postgres::Transaction<'_>,
    shard: i32,
    token: u64,
    size: Option<u64>,
) -> Result<(), LedgerError> {
    let row = tx.query_one("SELECT token, size FROM ledger_shards WHERE shard = $1 FOR UPDATE", &[&shard]).await?;
    let (now_token, now_size): (i64, i64) = (row.get(0), row.get(1));
    if u(now_token) != token || size.is_some_and(|s| s != u(now_size)) {
        return Err(LedgerError::Fenced { token });
    }
    Ok(())
}

impl LedgerStore for PgStore {
    fn tend(&self) -> Result<bool, LedgerError> {
        self.client.tend()?;
        if self.may_take() {
            return Ok(true);
        }
        // Another live replica owns this shard: it takes the lease once this one gives it up.
        if self.held.lock().expect("ledger lease lock").is_some() {
            tracing::info!(shard = self.shard, "handing the ledger shard's lease to the replica that owns it");
            self.release()?;
        }
        Ok(false)
    }

    fn sequence(&self) -> Result<u64, LedgerError> {
        let mut held = self.held.lock().expect("ledger lease lock");
        if let Some(h) = *held {
            if Instant::now() < h.renew_at {
                return Ok(h.token);
            }
        }
        let started = Instant::now();
        let (pool, shard, replica, url) =
            (self.pool(), self.shard, self.client.replica.clone(), self.client.url.clone());
        let (lease, may_take) = (self.client.lease.as_secs_f64(), self.may_take());
        let got = self.block("taking the ledger's lease", async move {
            let c = pool.get().await?;
            let st = c.prepare_cached(TAKE_LEASE).await?;
            if let Some(row) = c.query_opt(&st, &[&shard, &replica, &url, &lease, &may_take]).await? {
                return Ok(Ok(u(row.get::<_, i64>(0))));
            }
            let row = c.query_one("SELECT holder_url FROM ledger_shards WHERE shard = $1", &[&shard]).await?;
            Ok(Err(row.get::<_, Option<String>>(0).unwrap_or_default()))
        });
        match got {
            Ok(Ok(token)) => {
                if held.is_none_or(|h| h.token != token) {
                    tracing::info!(token, shard = self.shard, "this replica sequences the ledger shard now");
                }
                // The token moves on only when the holder changes; 1 is the first holder's.
                let mut last = self.last_token.lock().expect("ledger lease lock");
                if token != *last && token > 1 {
                    self.client.metrics.takeovers(self.shard as u32).inc();
                }
                *last = token;
                *held = Some(Held { token, renew_at: started + self.client.lease / 2 });
                // The database started the lease after `started`: it lasts at least this long.
                self.client.metrics.sequencer(self.shard as u32).held_until(Some(started + self.client.lease));
                Ok(token)
            }
            Ok(Err(holder_url)) => {
                *held = None;
                self.client.metrics.sequencer(self.shard as u32).held_until(None);
                Err(LedgerError::NotSequencer { holder_url })
            }
            Err(e) => Err(e),
        }
    }

    fn commit(&self, a: &Append) -> Result<(), LedgerError> {
        let a_size = a.new_size();
        let (pool, shard, a) = (self.pool(), self.shard, a.clone());
        let result = self.block("appending to the ledger", async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            fence(&tx, shard, a.token, Some(a.base_size)).await?;
            let node = a.node.as_bytes().to_vec();
            if !a.leaves.is_empty() {
                let idx: Vec<i64> = a.leaves.iter().map(|(index, _)| i(*index)).collect();
                let nodes = vec![node.clone(); a.leaves.len()];
                let leaves: Vec<&[u8]> = a.leaves.iter().map(|(_, l)| l.as_slice()).collect();
                let st = tx
                    .prepare_cached(
                        "INSERT INTO ledger_leaves (shard, idx, node, leaf)
                         SELECT $1::int4, * FROM UNNEST($2::int8[], $3::bytea[], $4::bytea[])",
                    )
                    .await?;
                tx.execute(&st, &[&shard, &idx, &nodes, &leaves]).await?;
                let levels: Vec<i32> = a.subtrees.iter().map(|(l, _, _)| *l as i32).collect();
                let idx: Vec<i64> = a.subtrees.iter().map(|(_, index, _)| i(*index)).collect();
                let hashes: Vec<&[u8]> = a.subtrees.iter().map(|(_, _, h)| h.as_slice()).collect();
                let st = tx
                    .prepare_cached(
                        "INSERT INTO ledger_tree (shard, level, idx, hash)
                         SELECT $1::int4, * FROM UNNEST($2::int4[], $3::int8[], $4::bytea[])",
                    )
                    .await?;
                tx.execute(&st, &[&shard, &levels, &idx, &hashes]).await?;
            }
            if !a.chains.is_empty() {
                let sessions: Vec<&[u8]> = a.chains.iter().map(|(s, _, _)| s.as_bytes().as_slice()).collect();
                let nodes: Vec<&[u8]> = a.chains.iter().map(|(_, n, _)| n.as_bytes().as_slice()).collect();
                let idx: Vec<i64> = a.chains.iter().map(|(_, _, c)| i(c.index.into())).collect();
                let credited: Vec<i64> = a.chains.iter().map(|(_, _, c)| i(c.credited)).collect();
                let st = tx
                    .prepare_cached(
                        "INSERT INTO ledger_chains (shard, session, node, idx, credited)
                         SELECT $1::int4, * FROM UNNEST($2::bytea[], $3::bytea[], $4::int8[], $5::int8[])
                         ON CONFLICT (shard, session, node) DO UPDATE SET idx = EXCLUDED.idx, credited = EXCLUDED.credited",
                    )
                    .await?;
                tx.execute(&st, &[&shard, &sessions, &nodes, &idx, &credited]).await?;
            }
            if !a.used.is_empty() {
                let sessions: Vec<&[u8]> = a.used.iter().map(|(s, _)| s.as_bytes().as_slice()).collect();
                let used: Vec<i64> = a.used.iter().map(|(_, u)| i(u.used)).collect();
                let expiry: Vec<i64> = a.used.iter().map(|(_, u)| i(u.expiry_ms)).collect();
                let epochs: Vec<i64> = a.used.iter().map(|(_, u)| i(u.epoch)).collect();
                let st = tx
                    .prepare_cached(
                        "INSERT INTO ledger_ticket_used (shard, session, used, expiry_ms, epoch)
                         SELECT $1::int4, * FROM UNNEST($2::bytea[], $3::int8[], $4::int8[], $5::int8[])
                         ON CONFLICT (shard, session) DO UPDATE
                         SET used = EXCLUDED.used, expiry_ms = EXCLUDED.expiry_ms, epoch = EXCLUDED.epoch",
                    )
                    .await?;
                tx.execute(&st, &[&shard, &sessions, &used, &expiry, &epochs]).await?;
            }
            if let Some((epoch, bytes)) = a.node_epoch {
                let st = tx
                    .prepare_cached(
                        "INSERT INTO ledger_node_epochs (shard, node, epoch, bytes) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (shard, node, epoch) DO UPDATE SET bytes = EXCLUDED.bytes",
                    )
                    .await?;
                tx.execute(&st, &[&shard, &node, &i(epoch), &i(bytes)]).await?;
            }
            if !a.rejections.is_empty() {
                let seqs: Vec<i64> = a.rejections.iter().map(|(s, _)| i(*s)).collect();
                let texts: Vec<String> = a.rejections.iter().map(|(_, r)| to_json(r)).collect();
                let st = tx
                    .prepare_cached(
                        "INSERT INTO ledger_rejections (shard, node, seq, rejection)
                         SELECT $1::int4, $2::bytea, * FROM UNNEST($3::int8[], $4::text[])",
                    )
                    .await?;
                tx.execute(&st, &[&shard, &node, &seqs, &texts]).await?;
                let forget: Vec<i64> = a.forget_rejections.iter().map(|s| i(*s)).collect();
                let st = tx
                    .prepare_cached("DELETE FROM ledger_rejections WHERE shard = $1 AND node = $2 AND seq = ANY($3)")
                    .await?;
                tx.execute(&st, &[&shard, &node, &forget]).await?;
                let st = tx
                    .prepare_cached(
                        "INSERT INTO ledger_rejected_seq (shard, node, seq) VALUES ($1, $2, $3)
                         ON CONFLICT (shard, node) DO UPDATE SET seq = EXCLUDED.seq",
                    )
                    .await?;
                tx.execute(&st, &[&shard, &node, &i(a.rejected_seq)]).await?;
            }
            let st = tx.prepare_cached("UPDATE ledger_shards SET size = $2 WHERE shard = $1").await?;
            tx.execute(&st, &[&shard, &i(a.new_size())]).await?;
            tx.commit().await?;
            Ok(())
        });
        if result.is_ok() {
            self.client.metrics.size(self.shard as u32).set(i(a_size));
        }
        if let Err(LedgerError::Fenced { token }) = &result {
            self.fenced(*token, "the batch was not written");
        }
        result
    }

    fn seal(&self, token: u64, epoch: u64, head: &Signed) -> Result<(), LedgerError> {
        let (pool, shard, head) = (self.pool(), self.shard, to_json(head));
        let result = self.block("sealing an epoch", async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            fence(&tx, shard, token, None).await?;
            tx.execute(
                "INSERT INTO ledger_heads (shard, epoch, head) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                &[&shard, &i(epoch), &head],
            )
            .await?;
            tx.execute(
                "UPDATE ledger_shards SET sealed = GREATEST(sealed, $2) WHERE shard = $1",
                &[&shard, &i(epoch + 1)],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        });
        if let Err(LedgerError::Fenced { token }) = &result {
            self.fenced(*token, "the epoch's head was not sealed");
        }
        result
    }

    #[cfg(test)]
    fn put_ticket(&self, t: &StoredTicket) -> Result<(), LedgerError> {
        let (pool, shard) = (self.pool(), self.shard);
        let (session, expiry, epoch, stored) =
            (t.ticket.session.as_bytes().to_vec(), i(t.ticket.expiry_ms), i(t.ticket.epoch), to_json(t));
        self.block("storing a ticket", async move {
            let c = pool.get().await?;
            let st = c
                .prepare_cached(
                    "INSERT INTO ledger_tickets (shard, session, expiry_ms, epoch, stored) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT DO NOTHING",
                )
                .await?;
            c.execute(&st, &[&shard, &session, &expiry, &epoch, &stored]).await?;
            Ok(())
        })
    }

    fn prune_tickets(&self, horizon_ms: u64, current_epoch: u64) -> Result<usize, LedgerError> {
        let (pool, shard) = (self.pool(), self.shard);
        self.block("forgetting expired tickets", async move {
            let mut c = pool.get().await?;
            let tx = c.transaction().await?;
            // `prunable` in SQL: expired before the horizon, and past the grace epoch. Tickets older
            // trackers stored, then the spending that carries its ticket's expiry.
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&shard, &i(horizon_ms), &i(current_epoch)];
            let rows = tx
                .query(
                    "DELETE FROM ledger_tickets WHERE shard = $1 AND expiry_ms < $2 AND epoch + 1 < $3 RETURNING session",
                    &params,
                )
                .await?;
            let mut sessions: Vec<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
            tx.execute("DELETE FROM ledger_ticket_used WHERE shard = $1 AND session = ANY($2)", &[&shard, &sessions])
                .await?;
            let rows = tx
                .query(
                    "DELETE FROM ledger_ticket_used WHERE shard = $1 AND expiry_ms < $2 AND epoch + 1 < $3
                     RETURNING session",
                    &params,
                )
                .await?;
            sessions.extend(rows.iter().map(|r| r.get::<_, Vec<u8>>(0)));
            tx.execute("DELETE FROM ledger_chains WHERE shard = $1 AND session = ANY($2)", &[&shard, &sessions]).await?;
            tx.commit().await?;
            Ok(sessions.len())
        })
    }

    fn size(&self) -> Result<u64, LedgerError> {
        let sql = "SELECT size FROM ledger_shards WHERE shard = $1";
        Ok(self.one::<i64>("reading the ledger's size", sql, Params::new().int(self.shard))?.map_or(0, u))
    }

    fn sealed(&self) -> Result<u64, LedgerError> {
        let sql = "SELECT sealed FROM ledger_shards WHERE shard = $1";
        Ok(self.one::<i64>("reading the sealed epoch", sql, Params::new().int(self.shard))?.map_or(0, u))
    }

    fn subtree(&self, level: u32, index: u64) -> Result<Option<Hash>, LedgerError> {
        let sql = "SELECT hash FROM ledger_tree WHERE shard = $1 AND level = $2 AND idx = $3";
        let params = Params::new().int(self.shard).int(level as i32).big(index);
        Ok(self.one::<Vec<u8>>("reading a subtree", sql, params)?.and_then(|h| Hash::try_from(h.as_slice()).ok()))
    }

    fn leaf(&self, index: u64) -> Result<Option<LedgerLeaf>, LedgerError> {
        let sql = "SELECT leaf FROM ledger_leaves WHERE shard = $1 AND idx = $2";
        let raw = self.one::<Vec<u8>>("reading a leaf", sql, Params::new().int(self.shard).big(index))?;
        raw.map(|raw| json("ledger_leaves", index.to_string(), &raw)).transpose()
    }

    fn node_records(
        &self,
        node: &NodeId,
        from: u64,
        to: u64,
        max: usize,
    ) -> Result<Vec<(u64, LedgerLeaf)>, LedgerError> {
        let sql = "SELECT idx, leaf FROM ledger_leaves WHERE shard = $1 AND node = $2 AND idx >= $3 AND idx < $4
                   ORDER BY idx DESC LIMIT $5";
        let params = Params::new().int(self.shard).bytes(node.as_bytes()).big(from).big(to).big(max as u64);
        self.all("reading a node's records", sql, params, |row| {
            let index = u(row.get(0));
            Ok((index, json("ledger_leaves", index.to_string(), row.get(1))?))
        })
    }

    fn epoch_head(&self, epoch: u64) -> Result<Option<Signed>, LedgerError> {
        let sql = "SELECT head FROM ledger_heads WHERE shard = $1 AND epoch = $2";
        let raw = self.one::<String>("reading an epoch's head", sql, Params::new().int(self.shard).big(epoch))?;
        raw.map(|raw| json("ledger_heads", epoch.to_string(), raw.as_bytes())).transpose()
    }

    fn ticket(&self, session: &SessionId) -> Result<Option<StoredTicket>, LedgerError> {
        let sql = "SELECT stored FROM ledger_tickets WHERE shard = $1 AND session = $2";
        let raw =
            self.one::<String>("reading a ticket", sql, Params::new().int(self.shard).bytes(session.as_bytes()))?;
        raw.map(|raw| json("ledger_tickets", session.to_hex(), raw.as_bytes())).transpose()
    }

    fn chain(&self, session: &SessionId, node: &NodeId) -> Result<Option<ChainState>, LedgerError> {
        let sql = "SELECT idx, credited FROM ledger_chains WHERE shard = $1 AND session = $2 AND node = $3";
        let params = Params::new().int(self.shard).bytes(session.as_bytes()).bytes(node.as_bytes());
        let rows = self.all("reading a chain", sql, params, |row| {
            Ok(ChainState { index: u(row.get(0)) as u32, credited: u(row.get(1)) })
        })?;
        Ok(rows.into_iter().next())
    }

    fn ticket_used(&self, session: &SessionId) -> Result<u64, LedgerError> {
        let sql = "SELECT used FROM ledger_ticket_used WHERE shard = $1 AND session = $2";
        let params = Params::new().int(self.shard).bytes(session.as_bytes());
        Ok(self.one::<i64>("reading a ticket's spending", sql, params)?.map_or(0, u))
    }

    fn node_epoch(&self, node: &NodeId, epoch: u64) -> Result<u64, LedgerError> {
        let sql = "SELECT bytes FROM ledger_node_epochs WHERE shard = $1 AND node = $2 AND epoch = $3";
        let params = Params::new().int(self.shard).bytes(node.as_bytes()).big(epoch);
        Ok(self.one::<i64>("reading a node's epoch", sql, params)?.map_or(0, u))
    }

    fn node_epochs(&self, node: &NodeId) -> Result<Vec<EpochLine>, LedgerError> {
        // Summed over shards: a node is credited in every shard its sessions fall in.
        let sql =
            "SELECT epoch, sum(bytes)::int8 FROM ledger_node_epochs WHERE node = $1 GROUP BY epoch ORDER BY epoch";
        self.all("reading a node's credit", sql, Params::new().bytes(node.as_bytes()), |row| {
            Ok(EpochLine { epoch: u(row.get(0)), credited_bytes: u(row.get(1)) })
        })
    }

    fn credited_nodes(&self) -> Result<Vec<NodeId>, LedgerError> {
        let sql = "SELECT DISTINCT node FROM ledger_node_epochs ORDER BY node";
        let ids = self.all("listing credited nodes", sql, Params::new(), |row| Ok(row.get::<_, Vec<u8>>(0)))?;
        Ok(ids.into_iter().filter_map(|id| <[u8; 32]>::try_from(id.as_slice()).ok().map(NodeId)).collect())
    }

    fn rejected_seq(&self, node: &NodeId) -> Result<u64, LedgerError> {
        let sql = "SELECT seq FROM ledger_rejected_seq WHERE shard = $1 AND node = $2";
        let params = Params::new().int(self.shard).bytes(node.as_bytes());
        Ok(self.one::<i64>("reading a node's rejections", sql, params)?.map_or(0, u))
    }

    fn rejections(&self, node: &NodeId) -> Result<Vec<Rejection>, LedgerError> {
        let sql = "SELECT rejection FROM ledger_rejections WHERE node = $1 ORDER BY shard, seq";
        let texts = self.all("reading a node's rejections", sql, Params::new().bytes(node.as_bytes()), |row| {
            Ok(row.get::<_, String>(0))
        })?;
        // A damaged rejection is left out of the statement, as the embedded store does.
        Ok(texts.iter().filter_map(|t| serde_json::from_str(t).ok()).collect())
    }
}

/// What `fog-tracker export` copied of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportStats {
    pub leaves: u64,
    pub subtrees: u64,
    pub size: u64,
    /// The root of the whole log, the same in both stores.
    pub root: Digest,
    pub heads: u64,
    pub tickets: u64,
    /// False when the same ledger was there already (an export run again), and nothing was copied.
    pub copied: bool,
}

impl std::fmt::Display for ExportStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.copied {
            return write!(f, "ledger: already there, {} records (root {})", self.size, self.root);
        }
        write!(
            f,
            "ledger: {} records (root {}), {} sealed heads, {} stored tickets (from before tickets were stateless)",
            self.size, self.root, self.heads, self.tickets
        )
    }
}

/// Copies the embedded tracker's ledger (in `db`) into the PostgreSQL database at `conn`, which must hold
/// no ledger yet, or the same one (an export run again copies nothing): every leaf keeps its index and bytes and every subtree its hash, so the roots — and the
/// heads nodes already verified — are the same; then checks that they are. Blocking.
pub fn export_to_postgres(db: Arc<Db>, conn: &str) -> Result<ExportStats, LedgerError> {
    let src = RocksStore::new(db);
    let dst = PgStore::connect(conn, "fog-tracker export", LEASE)?;
    let mut stats =
        ExportStats { leaves: 0, subtrees: 0, size: 0, root: Digest([0; 32]), heads: 0, tickets: 0, copied: false };
    let size = dst.size()?;
    if size != 0 || dst.sealed()? != 0 {
        // Exported before (an export run again): the same log is there, or refuse to mix two.
        let (src_view, dst_view) = (TreeView::new(&src, None), TreeView::new(&dst, None));
        let (src_root, dst_root) = (merkle::root(&src_view, size), merkle::root(&dst_view, size));
        if src.size()? == size && src_view.finish(src_root)? == dst_view.finish(dst_root)? {
            return Ok(ExportStats { size, root: Digest(src_root), ..stats });
        }
        return Err(LedgerError::NotEmpty { size });
    }
    stats.copied = true;
    let mut batch = Vec::with_capacity(EXPORT_BATCH);
    src.for_each_record(&mut |r| {
        match &r {
            Record::Leaf { .. } => stats.leaves += 1,
            Record::Subtree { .. } => stats.subtrees += 1,
            Record::Head { .. } => stats.heads += 1,
            Record::Ticket(_) => stats.tickets += 1,
            Record::Meta { size, .. } => stats.size = *size,
            _ => {}
        }
        batch.push(r);
        if batch.len() >= EXPORT_BATCH {
            dst.import(std::mem::take(&mut batch))?;
        }
        Ok(())
    })?;
    dst.import(batch)?;
    let (src_view, dst_view) = (TreeView::new(&src, None), TreeView::new(&dst, None));
    let (src_root, dst_root) = (merkle::root(&src_view, stats.size), merkle::root(&dst_view, stats.size));
    let (src_root, dst_root) = (src_view.finish(src_root)?, dst_view.finish(dst_root)?);
    if src_root != dst_root {
        return Err(LedgerError::ExportMismatch(format!("the roots of size {} differ", stats.size)));
    }
    let counts = (dst.count("ledger_leaves")?, dst.count("ledger_tree")?, dst.size()?);
    if counts != (stats.leaves, stats.subtrees, stats.size) {
        return Err(LedgerError::ExportMismatch(format!(
            "copied {} leaves and {} subtrees of a log of {}, found {counts:?}",
            stats.leaves, stats.subtrees, stats.size
        )));
    }
    stats.root = Digest(src_root);
    dst.release()?;
    Ok(stats)
}
