use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use fog_node::config::NodeArgs;
use fog_node::earnings::Earnings;
use fog_node::status::{render_text, NodeStatus};

#[derive(Parser, Debug)]
#[command(
    name = "fog-node",
    version,
    about = "fogcdn volunteer node: caches verified chunks and serves them over QUIC"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Print the effective configuration (flags, environment and --config merged) as TOML that --config
    /// accepts, and exit.
    #[arg(long)]
    print_config: bool,
    /// With --print-config: every option with its help as comments (what /etc/fogcdn/node.toml holds).
    #[arg(long, requires = "print_config")]
    commented: bool,
    #[command(flatten)]
    run: NodeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what the running node is doing, and why it gets no traffic if it gets none.
    Status {
        /// The node's data directory, where it recorded its status address [default: the one --config
        /// names, else ~/.local/share/fogcdn/node].
        #[arg(long, env = "FOG_NODE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The node's configuration file, for its data directory and, where that cannot be read (the
        /// service's, by other users), its status_listen [default: /etc/fogcdn/node.toml if it exists].
        #[arg(long, env = "FOG_NODE_CONFIG")]
        config: Option<PathBuf>,
        /// The status page URL, e.g. http://127.0.0.1:7702 (instead of --data-dir).
        #[arg(long)]
        url: Option<String>,
        /// Print the JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// What this node served and earned per day, and per ledger epoch whether it verified the tracker's
    /// records and how its totals compare with the tracker's (works while the node runs).
    Earnings {
        /// The node's data directory [default: the one --config names, else ~/.local/share/fogcdn/node].
        #[arg(long, env = "FOG_NODE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The node's configuration file, to find its data directory [default: /etc/fogcdn/node.toml if
        /// it exists].
        #[arg(long, env = "FOG_NODE_CONFIG")]
        config: Option<PathBuf>,
        /// The month, YYYY-MM [default: this month, local time].
        #[arg(long)]
        month: Option<String>,
        /// CSV: a row per day, per rejection or refusal reason, per epoch, and the month's total.
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// The JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// The configuration file a packaged node runs with (packaging/fog-node.service).
const INSTALLED_CONFIG: &str = "/etc/fogcdn/node.toml";

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Some(Command::Status { data_dir, config, url, json }) => status(data_dir, config, url, json),
        Some(Command::Earnings { data_dir, config, month, csv, json }) => earnings(data_dir, config, month, csv, json),
        None if cli.print_config => {
            print!("{}", fog_node::config::print_config(&matches, cli.commented)?);
            Ok(())
        }
        None => {
            fog_net::bin_support::init_logging("info");
            let cfg = cli.run.resolve()?;
            // Two workers: with one, QUIC ACK processing lags behind sending on a busy node.
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(fog_node::run(cfg, fog_net::bin_support::shutdown()))?;
            Ok(())
        }
    }
}

/// `--config`, else the installed node's configuration if there is one: what the service runs with.
fn config_file(config: Option<PathBuf>) -> Option<PathBuf> {
    config.or_else(|| Some(PathBuf::from(INSTALLED_CONFIG)).filter(|p| p.exists()))
}

/// The status page's URL, and what to check if it does not answer: the address the node recorded in its
/// data directory, else the configured status_listen (the service's data directory is closed to other
/// users, its configuration is not).
fn status_url(data_dir: Option<PathBuf>, config: Option<PathBuf>) -> anyhow::Result<(String, String)> {
    let cfg = NodeArgs { config: config_file(config), data_dir, ..NodeArgs::default() }.resolve()?;
    let file = cfg.data_dir.join(fog_node::STATUS_ADDR_FILE);
    match std::fs::read_to_string(&file) {
        Ok(addr) => Ok((
            format!("http://{}", addr.trim()),
            format!("is fog-node running with --data-dir {}?", cfg.data_dir.display()),
        )),
        Err(e) if cfg.status_listen.port() != 0 => {
            let mut addr = cfg.status_listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() });
            }
            Ok((format!("http://{addr}"), format!("is fog-node running? ({} cannot be read: {e})", file.display())))
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot read {}: {e}: is fog-node running with --data-dir {}?",
            file.display(),
            cfg.data_dir.display()
        )),
    }
}

fn status(data_dir: Option<PathBuf>, config: Option<PathBuf>, url: Option<String>, json: bool) -> anyhow::Result<()> {
    let (base, hint) = match url {
        Some(u) => (u.trim_end_matches('/').to_string(), "is fog-node running?".to_string()),
        None => status_url(data_dir, config)?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let body = runtime.block_on(async {
        let resp = reqwest::get(format!("{base}/status"))
            .await
            .with_context(|| format!("the node's status page at {base} does not answer: {hint}"))?;
        anyhow::Ok(resp.error_for_status()?.bytes().await?)
    })?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
    } else {
        let s: NodeStatus = serde_json::from_slice(&body).context("the status page sent something unexpected")?;
        print!("{}", render_text(&s));
    }
    Ok(())
}

fn earnings(
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    month: Option<String>,
    csv: bool,
    json: bool,
) -> anyhow::Result<()> {
    let data_dir = match data_dir {
        Some(d) => d,
        None => NodeArgs { config: config_file(config), ..NodeArgs::default() }.resolve()?.data_dir,
    };
    if let Some(m) = &month {
        let valid =
            m.len() == 7 && m.as_bytes()[4] == b'-' && m.chars().enumerate().all(|(i, c)| i == 4 || c.is_ascii_digit());
        anyhow::ensure!(valid, "--month {m:?}: write the month as YYYY-MM, e.g. 2026-11");
    }
    let books = Earnings::open_read_only(&data_dir.join("earnings"))?;
    let report = match &month {
        Some(m) => books.month(m)?,
        None => books.this_month()?,
    };
    if csv {
        print!("{}", fog_node::earnings::render_csv(&report));
    } else if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", fog_node::earnings::render_text(&report));
    }
    Ok(())
}
