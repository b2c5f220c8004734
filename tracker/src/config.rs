//! fog-tracker configuration: flags, `FOG_TRACKER_*` environment variables, optional TOML file (`--config`).
//! A flag or variable wins over the file; the file wins over the defaults.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fog_net::bin_support::{default_data_dir, load_toml, ConfigError};
use fog_proto::groups::{self, DEFAULT_GROUP_SIZE};
use fog_proto::manifest::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use fog_proto::origins::OriginList;
use fog_proto::size::Size;
use fog_proto::web::WebOrigins;
use fog_sched::cells::DEFAULT_EDGE_MS;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(name = "fog-tracker", version, about = "fogcdn tracker: ingest, node registry, scheduling, stats")]
#[serde(deny_unknown_fields)]
pub struct TrackerArgs {
    /// TOML file with any of the options below (as snake_case keys; `origin` is a list).
    #[arg(long, env = "FOG_TRACKER_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HTTP listen address; port 0 picks a free one [default: 127.0.0.1:7700].
    #[arg(long, env = "FOG_TRACKER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where manifests are kept [default: ~/.local/share/fogcdn/tracker].
    #[arg(long, env = "FOG_TRACKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// URL prefix of a registered origin; repeat for several. Nothing outside these is ever fetched.
    #[arg(long = "origin", env = "FOG_TRACKER_ORIGINS", value_delimiter = ',')]
    #[serde(default)]
    pub origin: Vec<String>,
    /// Chunk size for newly ingested objects, 16KiB..16MiB [default: 1MiB].
    #[arg(long, env = "FOG_TRACKER_CHUNK_SIZE")]
    pub chunk_size: Option<Size>,
    /// Group size for newly ingested objects: manifests carry a hash per group of this many bytes, so
    /// nodes and clients pass on each verified group as it arrives instead of the whole chunk; a power
    /// of two from 1KiB, at most 256 groups a chunk; 0 leaves group hashes out [default: 64KiB].
    #[arg(long, env = "FOG_TRACKER_GROUP_SIZE")]
    pub group_size: Option<Size>,
    /// Largest object the tracker ingests [default: 64GiB].
    #[arg(long, env = "FOG_TRACKER_MAX_OBJECT_SIZE")]
    pub max_object_size: Option<Size>,
    /// Seconds between node heartbeats [default: 5].
    #[arg(long, env = "FOG_TRACKER_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<u64>,
    /// Candidate nodes returned per chunk [default: 3].
    #[arg(long, env = "FOG_TRACKER_CANDIDATES")]
    pub candidates: Option<usize>,
    /// Bounded-load slack ε: no node gets more than (1+ε)× its fair share of recent traffic (its share of
    /// all advertised upload) while a nearby node has room [default: 0.25].
    #[arg(long, env = "FOG_TRACKER_LOAD_EPSILON")]
    pub load_epsilon: Option<f64>,
    /// A client's report that an object changed at its origin re-ingests it only if the manifest is older
    /// than this, so clients cannot make the tracker hammer an origin [default: 30].
    #[arg(long, env = "FOG_TRACKER_MIN_REINGEST_SECS")]
    pub min_reingest_secs: Option<u64>,
    /// Bearer token for operator-only views (node addresses) and actions (blocking nodes); without one
    /// those are off.
    #[arg(long, env = "FOG_TRACKER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Length of a credit epoch in seconds; each ends with a signed ledger head [default: 3600].
    #[arg(long, env = "FOG_TRACKER_EPOCH_SECS")]
    pub epoch_secs: Option<u64>,
    /// Credit tickets one client address may get per minute [default: 120].
    #[arg(long, env = "FOG_TRACKER_TICKETS_PER_MINUTE")]
    pub tickets_per_minute: Option<u32>,
    /// Seconds between rounds of active probes of nodes; 0 turns probing off [default: 30].
    #[arg(long, env = "FOG_TRACKER_PROBE_SECS")]
    pub probe_secs: Option<u64>,
    /// Edge of the grid cells nodes are grouped into by network coordinate, in ms of RTT: every node of a
    /// cell (or of a region label a node was given with `--region`) asks the same member, the chunk's home,
    /// for a chunk it lacks, so a chunk is fetched from the origin once per cell. 0 turns cells off (each
    /// node finds homes among its nearest peers) [default: 100].
    #[arg(long, env = "FOG_TRACKER_CELL_MS")]
    pub cell_ms: Option<f32>,
    /// Most registered nodes kept [default: 100000].
    #[arg(long, env = "FOG_TRACKER_MAX_NODES")]
    pub max_nodes: Option<usize>,
    /// How long a resolve of an object still being ingested waits for the chunks the client needs before
    /// answering with what is hashed (the client reads the rest from the origin) [default: 50].
    #[arg(long, env = "FOG_TRACKER_RESOLVE_WAIT_MS")]
    pub resolve_wait_ms: Option<u64>,
    /// Before reading an object, look for a manifest its publisher placed beside it on the origin at
    /// `<object URL>.fog-manifest.json` (built with `fog manifest --sidecar`).
    #[arg(long, env = "FOG_TRACKER_ORIGIN_MANIFESTS")]
    #[serde(default)]
    pub origin_manifests: bool,
    /// Site whose pages may use the fog from a browser (`https://player.example.com`); repeat for several.
    /// The tracker answers their resolves and reports with CORS and tells nodes to accept their
    /// WebTransport sessions; pages of any other site are refused by both. None: browsers are refused.
    #[arg(long = "web-origin", env = "FOG_TRACKER_WEB_ORIGINS", value_delimiter = ',')]
    #[serde(default)]
    pub web_origin: Vec<String>,
    /// NATS servers (`nats://host:4222`, comma-separated or repeated): with them the tracker is one replica
    /// of a cell, sharing the node registry, load and blocks with the cell's other replicas over NATS core
    /// pub/sub. Replicas of a cell share the tracker key (`tracker.key` in the data directory).
    #[arg(long = "nats", env = "FOG_TRACKER_NATS", value_delimiter = ',')]
    #[serde(default)]
    pub nats: Vec<String>,
    /// The cell this replica belongs to (letters, digits, `-` and `_`; at most 64): replicas of one cell
    /// hold the same registry [default: default].
    #[arg(long, env = "FOG_TRACKER_CELL")]
    pub cell: Option<String>,
    /// PostgreSQL for manifests and the block list, shared by the replicas of a cell, instead of the
    /// embedded database: a libpq connection string (`host=pg1,pg2 port=5432,5432 user=fog dbname=fog`, or
    /// `postgresql://fog@pg1:5432,pg2:5432/fog`); with several hosts the tracker follows a failover to
    /// whichever is the primary. `fog-tracker export` moves an embedded tracker's state there.
    #[arg(long, env = "FOG_TRACKER_POSTGRES", hide_env_values = true)]
    pub postgres: Option<String>,
    /// The URL other replicas, nodes and operators reach this tracker at (`http://10.0.0.1:7700`): the
    /// ledger's lease names it as the sequencer's. [default: http:// and the listen address; listening on
    /// all addresses (0.0.0.0, [::]), the host's primary address]
    #[arg(long, env = "FOG_TRACKER_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Shards of the ledger in PostgreSQL (with --postgres): credit sessions are divided among this many
    /// Merkle logs, each appended by its own sequencer, and the replicas of the cell divide the sequencers.
    /// Recorded in the database the first time; a replica given another count refuses to start (it would
    /// move sessions between logs) [default: 1].
    #[arg(long, env = "FOG_TRACKER_LEDGER_SHARDS")]
    pub ledger_shards: Option<u32>,
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<TrackerCommand>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum TrackerCommand {
    /// Copy an embedded tracker's manifests, block list and ledger into PostgreSQL (run it with the
    /// tracker stopped; again after a conflict is resolved: rows already there are skipped, a different
    /// manifest for a URL is never overwritten).
    Export(ExportArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// The PostgreSQL to copy into (as for `--postgres`).
    #[arg(long, env = "FOG_TRACKER_POSTGRES", hide_env_values = true)]
    pub postgres: String,
    /// The embedded tracker's data directory [default: ~/.local/share/fogcdn/tracker].
    #[arg(long, env = "FOG_TRACKER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl ExportArgs {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| default_data_dir("tracker"))
    }
}

#[derive(Debug, Clone)]
pub struct TrackerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub origins: OriginList,
    pub chunk_size: u32,
    /// `None`: manifests without group hashes.
    pub group_size: Option<u32>,
    pub max_object_size: u64,
    pub heartbeat_interval: Duration,
    /// A node missing heartbeats this long is unhealthy: three intervals.
    pub node_timeout: Duration,
    pub candidates: usize,
    pub load_epsilon: f64,
    pub min_reingest_age: Duration,
    pub max_nodes: usize,
    /// Grid edge of cells in ms; `None`: no cells.
    pub cell_ms: Option<f32>,
    pub admin_token: Option<String>,
    pub epoch: Duration,
    pub tickets_per_minute: u32,
    /// `None`: no probes.
    pub probe_every: Option<Duration>,
    pub resolve_wait: Duration,
    pub origin_manifests: bool,
    pub web_origins: WebOrigins,
    /// NATS servers of the cell's bus; empty: a single tracker.
    pub nats: Vec<String>,
    pub cell: String,
    /// PostgreSQL connection string for the durable state; `None`: the embedded database.
    pub postgres: Option<String>,
    /// `--advertise-url`, checked and without a trailing `/`; `None`: derived ([`TrackerConfig::advertised_url`]).
    pub advertise_url: Option<String>,
    /// Shards of the ledger in PostgreSQL; 1 for the embedded one.
    pub ledger_shards: u32,
}

/// Longest `--advertise-url`.
const MAX_ADVERTISE_URL: usize = 256;

/// `url` as a base URL others can dial: http(s), a host, nothing after the path, printable.
fn check_advertise_url(url: &str) -> Result<String, ConfigError> {
    let url = url.trim().trim_end_matches('/');
    let bad = |why: &str| ConfigError::Invalid(format!("--advertise-url {url:?}: {why}"));
    if url.len() > MAX_ADVERTISE_URL || !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(&format!("at most {MAX_ADVERTISE_URL} printable characters")));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(bad("an http:// or https:// URL with a host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a base URL, without a query or fragment"));
    }
    if parsed
        .host_str()
        .and_then(|h| h.trim_matches(['[', ']']).parse::<IpAddr>().ok())
        .is_some_and(|ip| ip.is_unspecified())
    {
        return Err(bad("an address others can dial, not an unspecified one"));
    }
    Ok(url.to_string())
}

/// `http://` and `local` (the address the tracker listens on), the host's primary address in place of an
/// unspecified one (`primary(v6)` finds it, in that family); whether it was guessed so.
fn url_of(local: SocketAddr, primary: impl Fn(bool) -> Option<IpAddr>) -> (String, bool) {
    if !local.ip().is_unspecified() {
        return (format!("http://{local}"), false);
    }
    // A `[::]` listener takes IPv4 too (dual stack): its IPv6 address if the host has a route, else IPv4.
    let ip = match local.ip() {
        IpAddr::V4(_) => primary(false),
        IpAddr::V6(_) => primary(true).or_else(|| primary(false)),
    };
    let ip = ip.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    (format!("http://{}", SocketAddr::new(ip, local.port())), true)
}

/// The address this host sends from by its default route, in one family: a UDP socket connected to a
/// documentation address (nothing is sent) says which.
fn primary_ip(v6: bool) -> Option<IpAddr> {
    let (bind, to): (IpAddr, SocketAddr) = if v6 {
        (Ipv6Addr::UNSPECIFIED.into(), SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 9)))
    } else {
        (Ipv4Addr::UNSPECIFIED.into(), SocketAddr::from(([192, 0, 2, 1], 9)))
    };
    let socket = UdpSocket::bind(SocketAddr::new(bind, 0)).ok()?;
    socket.connect(to).ok()?;
    socket.local_addr().ok().map(|a| a.ip()).filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
}

impl TrackerConfig {
    /// The URL this tracker is reached at, which the ledger's lease names as the sequencer's:
    /// `--advertise-url`, else derived from `local`, the address it listens on. Whether it was guessed
    /// (listening on all addresses, the host's primary one stands in).
    pub fn advertised_url(&self, local: SocketAddr) -> (String, bool) {
        match &self.advertise_url {
            Some(url) => (url.clone(), false),
            None => url_of(local, primary_ip),
        }
    }
}

impl TrackerArgs {
    pub fn resolve(self) -> Result<TrackerConfig, ConfigError> {
        let file: TrackerArgs = load_toml(self.config.as_deref())?;
        let origins = if self.origin.is_empty() { file.origin } else { self.origin };
        if origins.is_empty() {
            return Err(ConfigError::Invalid(
                "no origins registered: pass --origin URL_PREFIX (e.g. --origin https://videos.example.com/)".into(),
            ));
        }
        let origins = OriginList::new(origins).map_err(ConfigError::Invalid)?;
        let web_origins = if self.web_origin.is_empty() { file.web_origin } else { self.web_origin };
        let web_origins =
            WebOrigins::new(web_origins).map_err(|e| ConfigError::Invalid(format!("--web-origin: {e}")))?;
        let chunk_size = self.chunk_size.or(file.chunk_size).map_or(u64::from(DEFAULT_CHUNK_SIZE), |s| s.0);
        if !(u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&chunk_size) {
            return Err(ConfigError::Invalid(format!(
                "--chunk-size {chunk_size} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes"
            )));
        }
        let group_size = self.group_size.or(file.group_size).map_or(u64::from(DEFAULT_GROUP_SIZE), |s| s.0);
        let group_size = groups::configured(group_size, chunk_size as u32)
            .map_err(|e| ConfigError::Invalid(format!("--group-size: {e} (0 turns group hashes off)")))?;
        let heartbeat = self.heartbeat_secs.or(file.heartbeat_secs).unwrap_or(5).clamp(1, 300);
        let data_dir = self.data_dir.or(file.data_dir).unwrap_or_else(|| default_data_dir("tracker"));
        let admin_token = self.admin_token.or(file.admin_token).filter(|t| !t.is_empty());
        if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::Invalid("--admin-token must be at least 16 characters".into()));
        }
        let nats: Vec<String> = if self.nats.is_empty() { file.nats } else { self.nats };
        let nats: Vec<String> = nats.into_iter().map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
        let postgres = self.postgres.or(file.postgres).map(|c| c.trim().to_string()).filter(|c| !c.is_empty());
        // Replicas share the tracker key, so each would accept the others' tickets: with a ledger of its own
        // each, one receipt could be credited once per replica.
        if !nats.is_empty() && postgres.is_none() {
            return Err(ConfigError::Invalid(
                "--nats needs --postgres: the replicas of a cell keep one ledger and one set of manifests in \
                 PostgreSQL (without --nats the tracker runs alone on its embedded database)"
                    .into(),
            ));
        }
        let ledger_shards = self.ledger_shards.or(file.ledger_shards).unwrap_or(1);
        let max_shards = crate::ledger::MAX_SHARDS;
        if !(1..=max_shards).contains(&ledger_shards) {
            return Err(ConfigError::Invalid(format!("--ledger-shards {ledger_shards}: 1 to {max_shards}")));
        }
        if ledger_shards > 1 && postgres.is_none() {
            return Err(ConfigError::Invalid(
                "--ledger-shards needs --postgres: the embedded ledger is one log, appended by this tracker".into(),
            ));
        }
        let cell = self.cell.or(file.cell).unwrap_or_else(|| "default".into());
        // The cell is a token of NATS subjects: no dots, wildcards or spaces.
        if cell.is_empty()
            || cell.len() > 64
            || !cell.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::Invalid(format!("--cell {cell:?}: letters, digits, - and _ only, at most 64")));
        }
        Ok(TrackerConfig {
            listen: self.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7700))),
            data_dir,
            origins,
            chunk_size: chunk_size as u32,
            group_size,
            max_object_size: self.max_object_size.or(file.max_object_size).map_or(64 << 30, |s| s.0),
            heartbeat_interval: Duration::from_secs(heartbeat),
            node_timeout: Duration::from_secs(heartbeat * 3),
            candidates: self.candidates.or(file.candidates).unwrap_or(3).clamp(1, 16),
            load_epsilon: self.load_epsilon.or(file.load_epsilon).unwrap_or(0.25).clamp(0.0, 10.0),
            min_reingest_age: Duration::from_secs(self.min_reingest_secs.or(file.min_reingest_secs).unwrap_or(30)),
            max_nodes: self.max_nodes.or(file.max_nodes).unwrap_or(100_000).max(1),
            cell_ms: Some(self.cell_ms.or(file.cell_ms).unwrap_or(DEFAULT_EDGE_MS))
                .filter(|ms| ms.is_finite() && *ms > 0.0)
                .map(|ms| ms.max(1.0)),
            admin_token,
            epoch: Duration::from_secs(self.epoch_secs.or(file.epoch_secs).unwrap_or(3600).max(1)),
            probe_every: Some(self.probe_secs.or(file.probe_secs).unwrap_or(30))
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
            tickets_per_minute: self.tickets_per_minute.or(file.tickets_per_minute).unwrap_or(120),
            resolve_wait: Duration::from_millis(
                self.resolve_wait_ms.or(file.resolve_wait_ms).unwrap_or(50).min(30_000),
            ),
            origin_manifests: self.origin_manifests || file.origin_manifests,
            web_origins,
            nats,
            cell,
            postgres,
            advertise_url: self.advertise_url.or(file.advertise_url).map(|u| check_advertise_url(&u)).transpose()?,
            ledger_shards,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requires_origins_and_valid_chunk_size() {
        assert!(matches!(TrackerArgs::parse_from(["t"]).resolve(), Err(ConfigError::Invalid(_))));
        let cfg = TrackerArgs::parse_from(["t", "--origin", "http://a.example", "--chunk-size", "64KiB"])
            .resolve()
            .expect("valid");
        assert_eq!(cfg.chunk_size, 64 << 10);
        assert!(cfg.origins.allows("http://a.example/x"));
        let bad = TrackerArgs::parse_from(["t", "--origin", "http://a", "--chunk-size", "1"]).resolve();
        assert!(matches!(bad, Err(ConfigError::Invalid(_))));
        // 64 KiB chunks are one default group each: nothing to gain from group hashes.
        assert_eq!(cfg.group_size, None);
        let default = TrackerArgs::parse_from(["t", "--origin", "http://a"]).resolve().expect("valid");
        assert_eq!(default.group_size, Some(DEFAULT_GROUP_SIZE));
        let groups = |g: &str, chunk: &str| {
            TrackerArgs::parse_from(["t", "--origin", "http://a", "--chunk-size", chunk, "--group-size", g])
                .resolve()
                .map(|c| c.group_size)
        };
        assert_eq!(groups("0", "1MiB").expect("off"), None);
        assert_eq!(groups("4KiB", "1MiB").expect("256 groups"), Some(4096));
        assert!(matches!(groups("3000", "1MiB"), Err(ConfigError::Invalid(_))));
        assert!(matches!(groups("16KiB", "16MiB"), Err(ConfigError::Invalid(m)) if m.contains("65536")));
        assert_eq!(groups("1MiB", "1MiB").expect("one group a chunk"), None);
    }

    #[test]
    fn web_origins_are_origins_only() {
        let web = |o: &str| TrackerArgs::parse_from(["t", "--origin", "http://a", "--web-origin", o]).resolve();
        let cfg = web("https://Player.example.com,http://localhost:8080").expect("two origins");
        assert_eq!(cfg.web_origins.as_slice(), ["https://player.example.com", "http://localhost:8080"]);
        assert!(matches!(web("https://player.example.com/embed"), Err(ConfigError::Invalid(m)) if m.contains("path")));
        assert!(TrackerArgs::parse_from(["t", "--origin", "http://a"]).resolve().expect("none").web_origins.is_empty());
    }

    #[test]
    fn nats_servers_and_a_cell_name_that_fits_a_subject() {
        let single = TrackerArgs::parse_from(["t", "--origin", "http://a"]).resolve().expect("single");
        assert!(single.nats.is_empty());
        assert_eq!(single.cell, "default");
        let nats = ["--nats", "nats://127.0.0.1:4222,nats://127.0.0.1:4223", "--cell", "eu-1"];
        let alone = TrackerArgs::parse_from(["t", "--origin", "http://a"].into_iter().chain(nats)).resolve();
        assert!(matches!(alone, Err(ConfigError::Invalid(e)) if e.contains("--nats needs --postgres")));
        let args = ["t", "--origin", "http://a", "--postgres", "host=pg dbname=fog"].into_iter().chain(nats);
        let replica = TrackerArgs::parse_from(args).resolve().expect("replica");
        assert_eq!(replica.nats, ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]);
        assert_eq!(replica.cell, "eu-1");
        for bad in ["a.b", "a*", "", "a b"] {
            let cfg = TrackerArgs::parse_from(["t", "--origin", "http://a", "--cell", bad]).resolve();
            assert!(matches!(cfg, Err(ConfigError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn postgres_for_a_replica_and_the_export_command() {
        let single = TrackerArgs::parse_from(["t", "--origin", "http://a"]).resolve().expect("single");
        assert_eq!(single.postgres, None);
        let conn = "host=pg1,pg2 port=5432,5433 user=fog dbname=fog";
        let replica = TrackerArgs::parse_from(["t", "--origin", "http://a", "--postgres", conn]).resolve();
        assert_eq!(replica.expect("replica").postgres.as_deref(), Some(conn));
        assert_eq!(single.ledger_shards, 1);
        let sharded = |n: &str, pg: bool| {
            let mut args = vec!["t", "--origin", "http://a", "--ledger-shards", n];
            if pg {
                args.extend(["--postgres", conn]);
            }
            TrackerArgs::parse_from(args).resolve()
        };
        assert_eq!(sharded("4", true).expect("sharded").ledger_shards, 4);
        assert!(matches!(sharded("4", false), Err(ConfigError::Invalid(e)) if e.contains("needs --postgres")));
        assert_eq!(sharded("1", false).expect("one shard alone").ledger_shards, 1);
        for bad in ["0", "100000"] {
            assert!(matches!(sharded(bad, true), Err(ConfigError::Invalid(_))), "{bad}");
        }
        let export = TrackerArgs::parse_from(["t", "export", "--postgres", conn, "--data-dir", "/var/lib/fog"]);
        let Some(TrackerCommand::Export(export)) = export.command else { panic!("export parsed") };
        assert_eq!((export.postgres.as_str(), export.data_dir()), (conn, PathBuf::from("/var/lib/fog")));
    }

    #[test]
    fn the_advertised_url_is_checked_or_derived_from_the_listen_address() {
        let advertise =
            |u: &str| TrackerArgs::parse_from(["t", "--origin", "http://a", "--advertise-url", u]).resolve();
        let cfg = advertise("http://10.0.0.1:7700/").expect("valid");
        assert_eq!(cfg.advertise_url.as_deref(), Some("http://10.0.0.1:7700"));
        let local: SocketAddr = "0.0.0.0:7700".parse().expect("addr");
        assert_eq!(cfg.advertised_url(local), ("http://10.0.0.1:7700".into(), false), "given: never guessed");
        assert!(advertise("https://t1.example.com").is_ok());
        for bad in [
            "10.0.0.1:7700",
            "ftp://a",
            "http://",
            "http://0.0.0.0:7700",
            "http://[::]:1",
            "http://a/?x=1",
            "http://a b",
        ] {
            assert!(matches!(advertise(bad), Err(ConfigError::Invalid(_))), "{bad:?}");
        }
        assert!(matches!(advertise(&format!("http://{}", "a".repeat(300))), Err(ConfigError::Invalid(_))));

        let host =
            |v6: bool| Some(if v6 { "2001:db8::5".parse().expect("ip") } else { "10.0.0.5".parse().expect("ip") });
        let none = |_| None;
        let addr = |a: &str| a.parse::<SocketAddr>().expect("addr");
        assert_eq!(url_of(addr("10.0.0.1:7700"), host), ("http://10.0.0.1:7700".into(), false));
        assert_eq!(url_of(addr("[2001:db8::1]:7700"), host), ("http://[2001:db8::1]:7700".into(), false));
        assert_eq!(url_of(addr("0.0.0.0:7700"), host), ("http://10.0.0.5:7700".into(), true));
        assert_eq!(url_of(addr("[::]:7700"), host), ("http://[2001:db8::5]:7700".into(), true));
        let v4_only = |v6: bool| (!v6).then(|| "10.0.0.5".parse().expect("ip"));
        assert_eq!(url_of(addr("[::]:7700"), v4_only), ("http://10.0.0.5:7700".into(), true));
        assert_eq!(url_of(addr("0.0.0.0:7700"), none), ("http://127.0.0.1:7700".into(), true), "no route at all");
    }
}
