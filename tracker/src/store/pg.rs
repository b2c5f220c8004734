//! The store traits in PostgreSQL, shared by the replicas of a cell (`--postgres`).
//!
//! - A bounded pool of connections (deadpool). The connection string may name several hosts
//!   (`host=pg1,pg2 port=5432,5432 …` or `postgresql://pg1:5432,pg2:5432/fog`): connections always ask for a
//!   read-write session, so after a failover new connections find the new primary and connections to the
//!   old one break and are dropped by the pool.
//! - Every operation is bounded in time ([`OP_TIMEOUT`]) and says whether a retry may help
//!   ([`PgError::is_retryable`]): the manifest cache holds writes while the database fails over.
//! - The schema is created or migrated at start, idempotently, under an advisory lock so that replicas
//!   starting together do not race ([`migrate`]; each component keeps its version in `fog_schema`).
//! - Manifests are stored as the same JSON as in RocksDB; the TLS-less client (`NoTls`) expects the database
//!   on a private network, as for the cell's NATS servers.

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use fog_proto::NodeId;
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use super::{AdminStore, Inserted, ManifestStore, StoreFuture, StoredManifest};

/// Connections per replica: requests beyond wait for one (at most [`OP_TIMEOUT`]).
pub const POOL_SIZE: usize = 16;
/// The longest an operation (waiting for a connection included) may take before it fails, retryably.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting to one host, when the connection string does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A host that stops answering (no RST: a partition, a powered-off machine) is noticed within about this.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Most blocked nodes read at start: the list is the operator's, kept by hand.
const MAX_BLOCKED: i64 = 1_000_000;

/// This module's component in `fog_schema`, and its migrations in order (version n applies `MIGRATIONS[n-1]`).
const COMPONENT: &str = "store";
const MIGRATIONS: &[&str] = &["CREATE TABLE fog_manifests (
         url text COLLATE \"C\" PRIMARY KEY,
         stored bytea NOT NULL,
         updated_at timestamptz NOT NULL DEFAULT now()
     );
     CREATE TABLE fog_blocked_nodes (
         node_id bytea PRIMARY KEY CHECK (octet_length(node_id) = 32),
         blocked_at timestamptz NOT NULL DEFAULT now()
     );"];

/// Serialises schema changes of all replicas and components (`pg_advisory_xact_lock` key: "fogschm").
const SCHEMA_LOCK: i64 = 0x0066_6f67_7363_686d;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("--postgres connection string: {0}")]
    Config(#[source] tokio_postgres::Error),
    #[error("PostgreSQL pool: {0}")]
    Build(#[from] deadpool_postgres::BuildError),
    #[error("PostgreSQL: no connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("PostgreSQL did not answer within {OP_TIMEOUT:?}")]
    Timeout,
    #[error("manifest stored in PostgreSQL for {url} is unreadable: {source}")]
    Corrupt { url: String, source: serde_json::Error },
    #[error(
        "PostgreSQL schema of {component} is at version {found}, newer than this fog-tracker's {known}: upgrade it"
    )]
    SchemaTooNew { component: String, found: i32, known: usize },
}

impl PgError {
    /// Whether the same operation may succeed later: the database is unreachable, failing over, shutting
    /// down or overloaded, rather than refusing the operation itself.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Config(_) | Self::Build(_) | Self::Corrupt { .. } | Self::SchemaTooNew { .. } => false,
            Self::Timeout => true,
            Self::Pool(deadpool_postgres::PoolError::Backend(e)) | Self::Query(e) => retryable(e),
            Self::Pool(deadpool_postgres::PoolError::Timeout(_)) => true,
            Self::Pool(_) => false,
        }
    }
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection failed or broke (refused, reset, closed), not the statement.
        return true;
    };
    // Connection exceptions (08…), insufficient resources (53…), operator intervention (57…: shutdown,
    // cannot connect now), and a standby reached mid-failover (read-only transaction); serialisation
    // failures and deadlocks are worth a retry too.
    let class = &code.code()[..2];
    matches!(class, "08" | "53" | "57")
        || [SqlState::READ_ONLY_SQL_TRANSACTION, SqlState::T_R_SERIALIZATION_FAILURE, SqlState::T_R_DEADLOCK_DETECTED]
            .contains(code)
}

/// A bounded pool for `conn` (libpq key=value or URL form) that always asks for a read-write session, every
/// session starting with `settings` (libpq `options`, e.g. `-c synchronous_commit=on`; empty for none).
/// Connects lazily: the first operation finds out whether the database is there.
pub fn pool(conn: &str, settings: &str) -> Result<Pool, PgError> {
    let mut config: tokio_postgres::Config = conn.parse().map_err(PgError::Config)?;
    if !settings.is_empty() {
        let options = [config.get_options().unwrap_or_default(), settings].join(" ");
        config.options(options.trim());
    }
    config.target_session_attrs(TargetSessionAttrs::ReadWrite);
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("fog-tracker");
    }
    config.keepalives(true).keepalives_idle(KEEPALIVE_IDLE).keepalives_interval(Duration::from_secs(2));
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Ok(Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(OP_TIMEOUT))
        .create_timeout(Some(OP_TIMEOUT))
        .recycle_timeout(Some(OP_TIMEOUT))
        .build()?)
}

/// Brings `component`'s tables to the last of its `migrations` (each a batch of statements, applied in
/// order once): in one transaction, under a lock all replicas take, so concurrent starts apply each once.
/// Refuses a schema newer than this binary knows.
pub async fn migrate(pool: &Pool, component: &str, migrations: &[&str]) -> Result<(), PgError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await?;
    // Not `CREATE TABLE IF NOT EXISTS`: every start would log the server's notice that it exists.
    let exists: bool = tx.query_one("SELECT to_regclass('fog_schema') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        tx.batch_execute("CREATE TABLE fog_schema (component text PRIMARY KEY, version integer NOT NULL)").await?;
    }
    let row = tx.query_opt("SELECT version FROM fog_schema WHERE component = $1", &[&component]).await?;
    let found: i32 = row.map_or(0, |r| r.get(0));
    if found as usize > migrations.len() {
        return Err(PgError::SchemaTooNew { component: component.into(), found, known: migrations.len() });
    }
    for (i, migration) in migrations.iter().enumerate().skip(found as usize) {
        tx.batch_execute(migration).await?;
        tracing::info!(component, version = i + 1, "PostgreSQL schema migrated");
    }
    let version = migrations.len() as i32;
    tx.execute(
        "INSERT INTO fog_schema (component, version) VALUES ($1, $2)
         ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
        &[&component, &version],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Manifests and the block list in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: Pool,
}

impl PgStore {
    /// Connects to `conn` and creates or migrates the schema: fails (retryably) if no read-write server
    /// answers.
    pub async fn connect(conn: &str) -> Result<Self, PgError> {
        let pool = pool(conn, "")?;
        bounded(migrate(&pool, COMPONENT, MIGRATIONS)).await?;
        Ok(Self { pool })
    }
}

/// `op`, failing with [`PgError::Timeout`] after [`OP_TIMEOUT`].
async fn bounded<T>(op: impl std::future::Future<Output = Result<T, PgError>>) -> Result<T, PgError> {
    tokio::time::timeout(OP_TIMEOUT, op).await.unwrap_or(Err(PgError::Timeout))
}

fn decode(url: &str, bytes: &[u8]) -> Result<StoredManifest, PgError> {
    serde_json::from_slice(bytes).map_err(|source| PgError::Corrupt { url: url.to_string(), source })
}

fn encode(stored: &StoredManifest) -> Vec<u8> {
    serde_json::to_vec(stored).expect("manifests serialise")
}

impl ManifestStore for PgStore {
    fn get<'a>(&'a self, url: &'a str) -> StoreFuture<'a, Option<StoredManifest>> {
        Box::pin(async move {
            let row = bounded(async {
                let client = self.pool.get().await?;
                Ok(client.query_opt("SELECT stored FROM fog_manifests WHERE url = $1", &[&url]).await?)
            })
            .await?;
            Ok(row.map(|r| decode(url, r.get(0))).transpose()?)
        })
    }

    fn put<'a>(&'a self, stored: &'a StoredManifest) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let bytes = encode(stored);
            let url = stored.manifest.url.as_str();
            // `xmax = 0`: the row version was inserted, not updated.
            let row = bounded(async {
                let client = self.pool.get().await?;
                Ok(client
                    .query_one(
                        "INSERT INTO fog_manifests (url, stored) VALUES ($1, $2)
                         ON CONFLICT (url) DO UPDATE SET stored = EXCLUDED.stored, updated_at = now()
                         RETURNING (xmax = 0)",
                        &[&url, &bytes],
                    )
                    .await?)
            })
            .await?;
            Ok(row.get(0))
        })
    }

    fn insert<'a>(&'a self, stored: &'a StoredManifest) -> StoreFuture<'a, Inserted> {
        Box::pin(async move {
            let bytes = encode(stored);
            let url = stored.manifest.url.as_str();
            let there = bounded(async {
                let client = self.pool.get().await?;
                let inserted = client
                    .execute(
                        "INSERT INTO fog_manifests (url, stored) VALUES ($1, $2) ON CONFLICT (url) DO NOTHING",
                        &[&url, &bytes],
                    )
                    .await?;
                if inserted == 1 {
                    return Ok(None);
                }
                let row = client.query_one("SELECT stored FROM fog_manifests WHERE url = $1", &[&url]).await?;
                Ok(Some(decode(url, row.get(0))?))
            })
            .await?;
            Ok(match there {
                None => Inserted::New,
                Some(there) if there == *stored => Inserted::Same,
                Some(there) => Inserted::Conflict(Box::new(there)),
            })
        })
    }

    fn count(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let row = bounded(async {
                let client = self.pool.get().await?;
                Ok(client.query_one("SELECT count(*) FROM fog_manifests", &[]).await?)
            })
            .await?;
            Ok(row.get::<_, i64>(0) as u64)
        })
    }

    fn page<'a>(&'a self, after: Option<&'a str>, limit: usize) -> StoreFuture<'a, Vec<StoredManifest>> {
        Box::pin(async move {
            // Every URL sorts after the empty string (bytewise: the column's collation is "C").
            let after = after.unwrap_or("");
            let rows = bounded(async {
                let client = self.pool.get().await?;
                Ok(client
                    .query(
                        "SELECT url, stored FROM fog_manifests WHERE url > $1 ORDER BY url LIMIT $2",
                        &[&after, &(limit as i64)],
                    )
                    .await?)
            })
            .await?;
            Ok(rows.iter().map(|r| decode(r.get(0), r.get(1))).collect::<Result<_, _>>()?)
        })
    }

    fn shared(&self) -> bool {
        true
    }
}

impl AdminStore for PgStore {
    fn blocked_nodes(&self) -> StoreFuture<'_, HashSet<NodeId>> {
        Box::pin(async move {
            let rows = bounded(async {
                let client = self.pool.get().await?;
                Ok(client.query("SELECT node_id FROM fog_blocked_nodes LIMIT $1", &[&MAX_BLOCKED]).await?)
            })
            .await?;
            // The column's check keeps every id 32 bytes.
            Ok(rows.iter().filter_map(|r| <[u8; 32]>::try_from(r.get::<_, &[u8]>(0)).ok()).map(NodeId).collect())
        })
    }

    fn set_blocked<'a>(&'a self, id: &'a NodeId, blocked: bool) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let id: &[u8] = id.as_bytes();
            let sql = if blocked {
                "INSERT INTO fog_blocked_nodes (node_id) VALUES ($1) ON CONFLICT DO NOTHING"
            } else {
                "DELETE FROM fog_blocked_nodes WHERE node_id = $1"
            };
            bounded(async {
                let client = self.pool.get().await?;
                client.execute(sql, &[&id]).await?;
                Ok(())
            })
            .await?;
            Ok(())
        })
    }
}
