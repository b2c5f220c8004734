#!/usr/bin/env bash
# Scheduling benchmark: decisions per second and latency percentiles with 10^5 registered nodes, against
# the previous policy (rendezvous over every node) in the same run. Goal: ≥ 100 000 decisions/s, p99 ≤ 1 ms.
#   scripts/bench/schedule.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
ensure_build_deps
cargo run --release --locked -q -p fog-sched --example bench_schedule
