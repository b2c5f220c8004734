use clap::Parser;
use fog_node::config::NodeArgs;

fn main() -> anyhow::Result<()> {
    fog_client::bin_support::init_logging("info");
    let cfg = NodeArgs::parse().resolve()?;
    // Two workers: with one, QUIC ACK processing lags behind sending on a busy node.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(fog_node::run(cfg, fog_client::bin_support::shutdown()))?;
    Ok(())
}
