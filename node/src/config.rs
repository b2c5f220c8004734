//! fog-node configuration: command-line flags, environment variables (`FOG_NODE_*`) and an optional TOML
//! file (`--config`). A flag or variable wins over the file; the file wins over the defaults.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use fog_net::bin_support::{default_data_dir, load_toml, ConfigError};
use fog_net::transport::UploadPriority;
use fog_proto::api::MAX_VERSION_LEN;
use fog_proto::size::Size;
use fog_proto::web::WebOrigins;
use serde::Deserialize;

use crate::web::{RotationTiming, ROTATION_RANGE};

#[derive(Debug, Clone, Default, Parser, Deserialize)]
#[command(
    name = "fog-node",
    version,
    about = "fogcdn volunteer node: caches verified chunks and serves them over QUIC"
)]
#[serde(deny_unknown_fields)]
pub struct NodeArgs {
    /// TOML file with any of the options below (as snake_case keys).
    #[arg(long, env = "FOG_NODE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Tracker base URL, or several comma-separated (the replicas of one cell): the node sticks to the one
    /// that answers and fails over to the next (in TOML a string or a list) [default: http://127.0.0.1:7700].
    #[arg(long, env = "FOG_NODE_TRACKER")]
    #[serde(default, deserialize_with = "tracker_list")]
    pub tracker: Option<String>,
    /// Where the node keeps its identity key and cache [default: ~/.local/share/fogcdn/node].
    #[arg(long, env = "FOG_NODE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// UDP address for QUIC; port 0 picks a free one. `[::]` is one dual-stack socket for IPv4 and IPv6
    /// clients (`0.0.0.0` where the host has no IPv6) [default: [::]:7701].
    #[arg(long, env = "FOG_NODE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// TCP address of the local status page, `/status` and `/metrics`; keep it on 127.0.0.1 unless a
    /// firewall guards it [default: 127.0.0.1:7702].
    #[arg(long, env = "FOG_NODE_STATUS_LISTEN")]
    pub status_listen: Option<SocketAddr>,
    /// Addresses clients should dial, when they differ from what the tracker sees (port forwarding),
    /// comma-separated: the node registers at the first; the tracker dials each back and hands out those
    /// that answer (one per family, say `203.0.113.7:7701,[2001:db8::7]:7701`). Port 0: the QUIC port
    /// [default: the address the tracker sees, and this host's global addresses on the QUIC port].
    #[arg(long, env = "FOG_NODE_ADVERTISE")]
    pub advertise: Option<AddrList>,
    /// Disk quota: the data directory (cache, receipts, state) stays within it plus a small allowance
    /// (docs/operations.md), e.g. 10GiB [default: 1GiB].
    #[arg(long, env = "FOG_NODE_CACHE_SIZE")]
    pub cache_size: Option<Size>,
    /// Free space to leave on the data directory's disk: a size (20GiB) or a share of the disk (10%); the
    /// cache shrinks when the owner's own files need the room [default: 10%].
    #[arg(long, env = "FOG_NODE_MIN_FREE_DISK")]
    pub min_free_disk: Option<DiskFloor>,
    /// RAM for hot chunks in front of the disk cache; 0 turns it off [default: 64MiB].
    #[arg(long, env = "FOG_NODE_MEMORY_CACHE")]
    pub memory_cache: Option<Size>,
    /// Upload cap in bytes per second across all clients, e.g. 2MiB [default: no cap].
    #[arg(long, env = "FOG_NODE_UPLOAD_LIMIT")]
    pub upload_limit: Option<Size>,
    /// `low`: uploads give way to this host's own traffic (a delay-based controller, LEDBAT++) and add at
    /// most ~60 ms of queueing to the uplink; `normal`: an equal share, like any download [default: low].
    #[arg(long, env = "FOG_NODE_UPLOAD_PRIORITY")]
    pub upload_priority: Option<UploadPriority>,
    /// Weekly windows in local time that set the upload: `unlimited`, a rate (`2MiB/s`) or `off`, e.g.
    /// "mon-fri 00:00-07:00 unlimited; mon-fri 07:00-23:00 2MiB/s; sat,sun 12:00-14:00 off"; outside them
    /// --upload-limit applies (grammar: docs/operations.md) [default: none].
    #[arg(long, env = "FOG_NODE_SCHEDULE")]
    pub schedule: Option<String>,
    /// Most bytes to upload (to clients and peers) per calendar month, local time, e.g. 500GiB; kept
    /// across restarts [default: no budget].
    #[arg(long, env = "FOG_NODE_MONTHLY_UPLOAD")]
    pub monthly_upload: Option<Size>,
    /// Most client connections at once [default: 512].
    #[arg(long, env = "FOG_NODE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most origin pulls at once [default: 16].
    #[arg(long, env = "FOG_NODE_MAX_FILLS")]
    pub max_fills: Option<usize>,
    /// libp2p overlay listen addresses, comma-separated multiaddrs; "none" turns the overlay off
    /// [default: /ip4/0.0.0.0/udp/0/quic-v1,/ip4/0.0.0.0/tcp/0,/ip6/::/udp/0/quic-v1,/ip6/::/tcp/0 (ephemeral
    /// ports; the IPv6 ones are skipped on a host without IPv6)].
    #[arg(long, env = "FOG_NODE_P2P_LISTEN")]
    pub p2p_listen: Option<String>,
    /// The region this node serves, if the operator groups nodes by hand (e.g. `eu-west`): nodes with one
    /// label share a cell and its chunk homes, whatever their measured RTTs say [default: the tracker's
    /// grid cell of the node's network coordinate].
    #[arg(long, env = "FOG_NODE_REGION")]
    pub region: Option<String>,
    /// Site whose pages may open WebTransport sessions to this node (`https://player.example.com`), besides
    /// those the tracker registered; repeat for several. Pages of any other site are refused
    /// [default: only the tracker's list].
    #[arg(long = "web-origin", env = "FOG_NODE_WEB_ORIGINS", value_delimiter = ',')]
    #[serde(default)]
    pub web_origin: Vec<String>,
    /// Seconds between rotations of the certificate browsers pin (20 to 518400); its successor is announced
    /// for half of that, at most a day, before it is served [default: 518400, 6 days].
    #[arg(long, env = "FOG_NODE_WEB_CERT_ROTATION_SECS")]
    pub web_cert_rotation_secs: Option<u64>,
}

const DEFAULT_P2P_LISTEN: &str = "/ip4/0.0.0.0/udp/0/quic-v1,/ip4/0.0.0.0/tcp/0,/ip6/::/udp/0/quic-v1,/ip6/::/tcp/0";

/// Comma-separated socket addresses (`--advertise`), at most `1 + MAX_QUIC_ADDRS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrList(pub Vec<SocketAddr>);

impl std::str::FromStr for AddrList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addrs = s
            .split(',')
            .map(|a| a.trim().parse().map_err(|e| format!("{a:?} is not an address ({e}); e.g. [2001:db8::7]:7701")))
            .collect::<Result<Vec<SocketAddr>, String>>()?;
        if addrs.len() > 1 + fog_proto::api::MAX_QUIC_ADDRS {
            return Err(format!("at most {} addresses", 1 + fog_proto::api::MAX_QUIC_ADDRS));
        }
        Ok(Self(addrs))
    }
}

impl<'de> Deserialize<'de> for AddrList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// The configuration after merging, with defaults applied.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub tracker: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `--advertise`: empty when not set.
    pub advertise: Vec<SocketAddr>,
    pub status_listen: SocketAddr,
    pub cache_size: u64,
    pub min_free_disk: DiskFloor,
    pub memory_cache: u64,
    pub upload_limit: Option<u64>,
    pub upload_priority: UploadPriority,
    pub schedule: Option<crate::schedule::Schedule>,
    pub monthly_upload: Option<u64>,
    pub max_connections: usize,
    pub max_fills: usize,
    /// Empty: no overlay.
    pub p2p_listen: Vec<libp2p::Multiaddr>,
    pub region: Option<String>,
    /// `--web-origin`: accepted besides the tracker's list.
    pub web_origins: WebOrigins,
    pub web_cert_rotation: RotationTiming,
}

impl NodeArgs {
    pub fn resolve(self) -> Result<NodeConfig, ConfigError> {
        let file: NodeArgs = load_toml(self.config.as_deref())?;
        let web_origins = if self.web_origin.is_empty() { file.web_origin } else { self.web_origin };
        let web_origins =
            WebOrigins::new(web_origins).map_err(|e| ConfigError::Invalid(format!("--web-origin: {e}")))?;
        let cfg = NodeConfig {
            tracker: self.tracker.or(file.tracker).unwrap_or_else(|| "http://127.0.0.1:7700".into()),
            data_dir: self.data_dir.or(file.data_dir).unwrap_or_else(|| default_data_dir("node")),
            listen: self.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from((Ipv6Addr::UNSPECIFIED, 7701))),
            advertise: self.advertise.or(file.advertise).map(|a| a.0).unwrap_or_default(),
            status_listen: self
                .status_listen
                .or(file.status_listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7702))),
            cache_size: self.cache_size.or(file.cache_size).map_or(1 << 30, |s| s.0),
            min_free_disk: self.min_free_disk.or(file.min_free_disk).unwrap_or(DiskFloor::Percent(10.0)),
            memory_cache: self.memory_cache.or(file.memory_cache).map_or(64 << 20, |s| s.0),
            upload_limit: self.upload_limit.or(file.upload_limit).map(|s| s.0),
            upload_priority: self.upload_priority.or(file.upload_priority).unwrap_or_default(),
            schedule: (self.schedule.or(file.schedule).as_deref())
                .map(crate::schedule::Schedule::parse)
                .transpose()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            monthly_upload: self.monthly_upload.or(file.monthly_upload).map(|s| s.0),
            max_connections: self.max_connections.or(file.max_connections).unwrap_or(512),
            max_fills: self.max_fills.or(file.max_fills).unwrap_or(16),
            p2p_listen: parse_p2p_listen(self.p2p_listen.or(file.p2p_listen).as_deref().unwrap_or(DEFAULT_P2P_LISTEN))?,
            region: self.region.or(file.region).filter(|r| !r.is_empty()),
            web_origins,
            web_cert_rotation: web_cert_rotation(self.web_cert_rotation_secs.or(file.web_cert_rotation_secs))?,
        };
        fog_net::trackers::parse_list(&cfg.tracker).map_err(|e| ConfigError::Invalid(format!("--tracker: {e}")))?;
        if cfg.region.as_ref().is_some_and(|r| r.len() > MAX_VERSION_LEN) {
            return Err(ConfigError::Invalid(format!("--region must be at most {MAX_VERSION_LEN} bytes")));
        }
        if cfg.upload_limit == Some(0) {
            return Err(ConfigError::Invalid("--upload-limit must be above 0 (omit it for no cap)".into()));
        }
        if cfg.upload_limit.is_some_and(|l| l > u64::from(u32::MAX)) {
            return Err(ConfigError::Invalid("--upload-limit must be below 4GiB per second".into()));
        }
        if cfg.monthly_upload == Some(0) {
            return Err(ConfigError::Invalid("--monthly-upload must be above 0 (omit it for no budget)".into()));
        }
        if cfg.max_connections == 0 || cfg.max_fills == 0 {
            return Err(ConfigError::Invalid("--max-connections and --max-fills must be above 0".into()));
        }
        Ok(cfg)
    }
}

/// `tracker` in the TOML file: `"URL,URL"` as on the command line, or a list of URLs.
fn tracker_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s,
        OneOrMany::Many(v) => v.join(","),
    }))
}

/// `--min-free-disk`: bytes, or a percentage of the filesystem's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DiskFloor {
    Bytes(u64),
    Percent(f64),
}

impl DiskFloor {
    /// The floor in bytes on a filesystem of `fs_size` bytes.
    pub fn bytes(self, fs_size: u64) -> u64 {
        match self {
            Self::Bytes(b) => b,
            Self::Percent(p) => (fs_size as f64 * p / 100.0) as u64,
        }
    }
}

impl std::str::FromStr for DiskFloor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(Self::Percent(p)),
                _ => Err(format!("{s:?} is not a share of the disk: write e.g. 10%")),
            },
            None => fog_proto::size::parse_size(s).map(Self::Bytes),
        }
    }
}

impl<'de> Deserialize<'de> for DiskFloor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Self::Bytes(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

fn web_cert_rotation(secs: Option<u64>) -> Result<RotationTiming, ConfigError> {
    let Some(secs) = secs else { return Ok(RotationTiming::default()) };
    let period = Duration::from_secs(secs);
    if !ROTATION_RANGE.contains(&period) {
        let (low, high) = (ROTATION_RANGE.start().as_secs(), ROTATION_RANGE.end().as_secs());
        return Err(ConfigError::Invalid(format!("--web-cert-rotation-secs must be within {low}..={high}")));
    }
    Ok(RotationTiming::every(period))
}

fn parse_p2p_listen(text: &str) -> Result<Vec<libp2p::Multiaddr>, ConfigError> {
    if text.trim() == "none" {
        return Ok(Vec::new());
    }
    text.split(',')
        .map(|a| {
            a.trim().parse().map_err(|e| {
                ConfigError::Invalid(format!(
                    "--p2p-listen: {a:?} is not a multiaddr ({e}); e.g. /ip4/0.0.0.0/udp/7703/quic-v1"
                ))
            })
        })
        .collect()
}

/// `fog-node --print-config`: the configuration `matches` (flags and environment) and its `--config` file
/// give, as TOML that `--config` accepts back. Every option is listed, from clap's own definitions so the
/// list cannot fall behind them: a set one as `key = value` (flag or variable over the file, as
/// [`NodeArgs::resolve`] merges them), an unset one commented out with its default. `commented`: each with
/// its help, flag and variable above it (how the installers write `/etc/fogcdn/node.toml`).
pub fn print_config(matches: &clap::ArgMatches, commented: bool) -> Result<String, ConfigError> {
    use clap::parser::ValueSource;
    use clap::CommandFactory;
    let file: toml::Table = match matches.get_one::<PathBuf>("config") {
        Some(path) => {
            // Refuses what `--config` would refuse (unknown keys, bad values) before echoing it.
            load_toml::<NodeArgs>(Some(path))?;
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            toml::from_str(&text)
                .map_err(|source| ConfigError::Parse { path: path.clone(), source: Box::new(source) })?
        }
        None => toml::Table::new(),
    };
    let mut out = String::from(
        "# fog-node configuration (`fog-node --config FILE`): snake_case keys of the command-line options.\n\
         # Flags and FOG_NODE_* environment variables override this file; the file overrides the defaults.\n",
    );
    if commented {
        out.push_str("# Sizes take bytes or units (64MiB, 10GiB, 5MB). Options below that are commented out take their default.\n");
    }
    for arg in NodeArgs::command().get_arguments() {
        let key = arg.get_id().as_str();
        if matches!(key, "config" | "help" | "version") {
            continue;
        }
        let help = arg.get_long_help().or(arg.get_help()).map(ToString::to_string).unwrap_or_default();
        let value = match matches.value_source(key) {
            Some(ValueSource::CommandLine | ValueSource::EnvVariable) => {
                let raw: Vec<String> =
                    matches.get_raw(key).into_iter().flatten().map(|v| v.to_string_lossy().into_owned()).collect();
                let many = matches!(arg.get_action(), clap::ArgAction::Append);
                Some(toml_value(key, &raw, many)?)
            }
            _ => file.get(key).cloned(),
        };
        if commented {
            out.push('\n');
            for line in wrap(&help, 100) {
                out.push_str(&format!("# {line}\n"));
            }
            let env = arg.get_env().map(|e| format!(", {}", e.to_string_lossy())).unwrap_or_default();
            out.push_str(&format!("# (--{}{env})\n", arg.get_long().unwrap_or(key)));
        }
        match value {
            Some(v) => out.push_str(&format!("{key} = {v}\n")),
            None => {
                let default =
                    help.rfind("[default: ").map(|i| help[i + 10..].trim_end_matches(['.', ']'])).unwrap_or("none");
                out.push_str(&format!("# {key} =    (not set; default: {default})\n"));
            }
        }
    }
    Ok(out)
}

/// The TOML value of a flag's or variable's raw text: the first of string, integer, float and boolean
/// that the option's own deserializer accepts (so `512` for a count, `"2MiB"` for a size).
fn toml_value(key: &str, raw: &[String], many: bool) -> Result<toml::Value, ConfigError> {
    let accepts = |v: &toml::Value| toml::from_str::<NodeArgs>(&format!("{key} = {v}")).is_ok();
    let as_kind = |kind: usize, text: &str| -> Option<toml::Value> {
        match kind {
            0 => Some(toml::Value::String(text.to_string())),
            1 => text.parse().ok().map(toml::Value::Integer),
            2 => text.parse().ok().map(toml::Value::Float),
            _ => text.parse().ok().map(toml::Value::Boolean),
        }
    };
    let value = (0..4).find_map(|kind| {
        let value = if many {
            toml::Value::Array(raw.iter().map(|r| as_kind(kind, r)).collect::<Option<Vec<_>>>()?)
        } else {
            as_kind(kind, raw.first()?)?
        };
        accepts(&value).then_some(value)
    });
    value.ok_or_else(|| ConfigError::Invalid(format!("--{key}: {raw:?} cannot be written as a configuration value")))
}

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for paragraph in text.lines() {
        let mut line = String::new();
        for word in paragraph.split_whitespace() {
            if !line.is_empty() && line.len() + 1 + word.len() > width {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_and_sizes_parse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "cache_size = \"2MiB\"\nupload_limit = 1000\ntracker = \"http://file\"\n")
            .expect("write");
        let args =
            NodeArgs::parse_from(["fog-node", "--config", path.to_str().expect("utf8"), "--tracker", "http://flag"]);
        let cfg = args.resolve().expect("valid");
        assert_eq!(cfg.tracker, "http://flag");
        assert_eq!(cfg.cache_size, 2 << 20);
        assert_eq!(cfg.upload_limit, Some(1000));
        assert_eq!(cfg.upload_priority, UploadPriority::Low);
        assert_eq!(cfg.p2p_listen.len(), 4);
        assert!(cfg.advertise.is_empty());
        assert_eq!(cfg.min_free_disk, DiskFloor::Percent(10.0));
        std::fs::write(&path, "min_free_disk = \"5%\"\n").expect("write");
        let args = NodeArgs::parse_from(["fog-node", "--config", path.to_str().expect("utf8")]);
        assert_eq!(args.resolve().expect("valid").min_free_disk.bytes(1000), 50);
        std::fs::write(&path, "advertise = \"203.0.113.7:7701, [2001:db8::7]:0\"\n").expect("write");
        let args = NodeArgs::parse_from(["fog-node", "--config", path.to_str().expect("utf8")]);
        let want: Vec<SocketAddr> = vec!["203.0.113.7:7701".parse().expect("a"), "[2001:db8::7]:0".parse().expect("a")];
        assert_eq!(args.resolve().expect("valid").advertise, want);
        assert!("1.2.3.4:1,nonsense".parse::<AddrList>().is_err());
        std::fs::write(&path, "web_origin = [\"https://Player.example\"]\n").expect("write");
        let args = NodeArgs::parse_from(["fog-node", "--config", path.to_str().expect("utf8")]);
        assert_eq!(args.resolve().expect("valid").web_origins.as_slice(), ["https://player.example"]);
        let args =
            NodeArgs::parse_from(["fog-node", "--web-origin", "https://a.example", "--web-origin", "http://b:8080"]);
        assert_eq!(args.resolve().expect("valid").web_origins.as_slice(), ["https://a.example", "http://b:8080"]);
        let args = NodeArgs::parse_from(["fog-node", "--web-origin", "https://a.example/player"]);
        assert!(matches!(args.resolve(), Err(ConfigError::Invalid(_))), "a page, not an origin");
        std::fs::write(&path, "tracker = [\"http://a:7700\", \"http://b:7700\"]\n").expect("write");
        let args = NodeArgs::parse_from(["fog-node", "--config", path.to_str().expect("utf8")]);
        assert_eq!(args.resolve().expect("a list").tracker, "http://a:7700,http://b:7700");
        let args = NodeArgs::parse_from(["fog-node", "--tracker", "http://a:7700,b:7700"]);
        assert!(matches!(args.resolve(), Err(ConfigError::Invalid(_))), "every URL names its scheme");
        let args = NodeArgs::parse_from(["fog-node", "--min-free-disk", "2GiB"]);
        assert_eq!(args.resolve().expect("valid").min_free_disk, DiskFloor::Bytes(2 << 30));
        assert!("120%".parse::<DiskFloor>().is_err());
        std::fs::write(&path, "upload_priority = \"normal\"\n").expect("write");
        let args = NodeArgs::parse_from(["fog-node", "--config", path.to_str().expect("utf8")]);
        assert_eq!(args.resolve().expect("valid").upload_priority, UploadPriority::Normal);
        let config = path.to_str().expect("utf8");
        let args = NodeArgs::parse_from(["fog-node", "--config", config, "--upload-priority", "low"]);
        assert_eq!(args.resolve().expect("valid").upload_priority, UploadPriority::Low);
        assert!(NodeArgs::try_parse_from(["fog-node", "--upload-priority", "high"]).is_err());
        std::fs::write(&path, "schedule = \"weekdays 09:00-17:00 1MiB/s\"\nmonthly_upload = \"500GiB\"\n")
            .expect("write");
        let args = NodeArgs::parse_from(["fog-node", "--config", path.to_str().expect("utf8")]);
        let cfg = args.resolve().expect("valid");
        assert_eq!(cfg.schedule.as_ref().map(|s| s.text()), Some("weekdays 09:00-17:00 1MiB/s"));
        assert_eq!(cfg.monthly_upload, Some(500 << 30));
        let args = NodeArgs::parse_from(["fog-node", "--schedule", "weekdays 09:00 off"]);
        let Err(ConfigError::Invalid(e)) = args.resolve() else { panic!("a schedule without a range's end") };
        assert!(e.starts_with("--schedule, at character 16: expected \"-\""), "{e}");
        let args = NodeArgs::parse_from(["fog-node", "--web-cert-rotation-secs", "60"]);
        assert_eq!(args.resolve().expect("valid").web_cert_rotation, RotationTiming::every(Duration::from_secs(60)));
        let args = NodeArgs::parse_from(["fog-node", "--web-cert-rotation-secs", "1000000"]);
        assert!(matches!(args.resolve(), Err(ConfigError::Invalid(_))), "beyond the certificate's validity");
        std::fs::write(&path, "cache_sise = 1\n").expect("write");
        let args = NodeArgs::parse_from(["fog-node", "--config", path.to_str().expect("utf8")]);
        assert!(matches!(args.resolve(), Err(ConfigError::Parse { .. })));
    }
}

#[cfg(test)]
mod print_config_tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;

    #[test]
    fn printed_config_names_every_option_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "cache_size = \"2MiB\"\nweb_origin = [\"https://a.example\"]\nmax_fills = 3\n")
            .expect("write");
        let argv = [
            "fog-node",
            "--config",
            file.to_str().expect("utf8"),
            "--tracker",
            "http://flag.example:7700",
            "--max-connections",
            "7",
            "--min-free-disk",
            "5%",
            "--p2p-listen",
            "none",
            "--upload-limit",
            "1MiB",
            "--advertise",
            "203.0.113.7:7701,[2001:db8::7]:0",
            "--web-origin",
            "https://b.example,https://c.example",
        ];
        let matches = NodeArgs::command().get_matches_from(argv);
        let printed = print_config(&matches, true).expect("printed");
        for arg in NodeArgs::command().get_arguments() {
            let key = arg.get_id().as_str();
            if !matches!(key, "config" | "help" | "version") {
                assert!(
                    printed.contains(&format!("\n{key} = ")) || printed.contains(&format!("\n# {key} = ")),
                    "{key} missing:\n{printed}"
                );
            }
        }
        assert!(printed.contains("\nmax_connections = 7\n") && printed.contains("\nmax_fills = 3\n"), "{printed}");
        assert!(printed.contains("\n# region =    (not set; default: "), "{printed}");
        let printed_file = dir.path().join("printed.toml");
        std::fs::write(&printed_file, &printed).expect("write");
        let from_print = NodeArgs::parse_from(["fog-node", "--config", printed_file.to_str().expect("utf8")]);
        let original = NodeArgs::from_arg_matches(&matches).expect("args").resolve().expect("valid");
        assert_eq!(format!("{:?}", from_print.resolve().expect("valid")), format!("{original:?}"));
    }
}
