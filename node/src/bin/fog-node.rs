use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fog_node::config::NodeArgs;
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
    #[command(flatten)]
    run: NodeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show what the running node is doing, and why it gets no traffic if it gets none.
    Status {
        /// The node's data directory (where it recorded its status address).
        #[arg(long, env = "FOG_NODE_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The status page URL, e.g. http://127.0.0.1:7702 (instead of --data-dir).
        #[arg(long)]
        url: Option<String>,
        /// Print the JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Status { data_dir, url, json }) => status(data_dir, url, json),
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

fn status(data_dir: Option<PathBuf>, url: Option<String>, json: bool) -> anyhow::Result<()> {
    let base = match url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => {
            let dir = data_dir.unwrap_or_else(|| fog_net::bin_support::default_data_dir("node"));
            let file = dir.join(fog_node::STATUS_ADDR_FILE);
            let addr = std::fs::read_to_string(&file).with_context(|| {
                format!("cannot read {}: is fog-node running with --data-dir {}?", file.display(), dir.display())
            })?;
            format!("http://{}", addr.trim())
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let body = runtime.block_on(async {
        let resp = reqwest::get(format!("{base}/status"))
            .await
            .with_context(|| format!("the node's status page at {base} does not answer: is fog-node running?"))?;
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
