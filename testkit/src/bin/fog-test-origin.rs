//! A static origin server for the demo and benchmarks: serves files under --dir with Range support, at a
//! limited rate if asked, and counts what it sends (GET /__fog_test/stats).

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::PathBuf;

use clap::Parser;
use fog_proto::size::Size;
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
    /// Send each response at most this many bytes per second, each response on its own, like a slow origin
    /// (10MB = 80 Mbit/s; units: kB, MB, GB, KiB, MiB, GiB). 0 or absent: as fast as the client reads.
    #[arg(long, value_name = "BYTES_PER_SEC")]
    rate: Option<Size>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rate = args.rate.and_then(|r| NonZeroU64::new(r.0));
    let quirks = Quirks { ignore_range: args.ignore_range, rate, ..Default::default() };
    let origin = TestOrigin::start(args.listen, Some(args.dir), quirks).await?;
    eprintln!("fog-test-origin listening on http://{}", origin.addr);
    fog_net::bin_support::shutdown().await;
    Ok(())
}
