use std::io::IsTerminal;

use clap::Parser;
use fog_node::config::NodeArgs;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cfg = NodeArgs::parse().resolve()?;
    // Two workers: with one, QUIC ACK processing lags behind sending on a busy node.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(fog_node::run(cfg, fog_client::signal::shutdown()))?;
    Ok(())
}
