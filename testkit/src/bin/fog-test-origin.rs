//! A static origin server for the demo and benchmarks: serves files under --dir with Range support.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use fog_testkit::origin::{Quirks, TestOrigin};

#[derive(Parser, Debug)]
#[command(about = "Serve a directory over HTTP with Range support (fogcdn demo/benchmark origin)")]
struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Behave like an origin without range support.
    #[arg(long)]
    ignore_range: bool,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let quirks = Quirks { ignore_range: args.ignore_range, ..Default::default() };
    let origin = TestOrigin::start(args.listen, Some(args.dir), quirks).await?;
    eprintln!("fog-test-origin listening on http://{}", origin.addr);
    fog_net::bin_support::shutdown().await;
    Ok(())
}
