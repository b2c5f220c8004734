#!/usr/bin/env bash
# Yielding the uplink (issue #16): a home's 20 Mbit/s uplink with 150 ms of buffer (network-namespace lab,
# `tc tbf`), the owner's backup (bulk TCP) and video call (TCP at 8 Mbit/s) through it, alone, with a real
# fog-node serving 4 clients at --upload-priority low and at normal, the node's clients arriving after the
# backup (the latecomer), and the node alone: the owner's throughput, the node's, the uplink's queueing
# delay (UDP probes every 20 ms) and the node's fog_node_ledbat_* metrics, in one run. It is the lab test
# netns::yield_uplink, run for its table (which it prints before checking its assertions).
# Needs root (network namespaces).
#   sudo scripts/bench/yield.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
[ "$(id -u)" -eq 0 ] || { log "error: needs root (network namespaces): sudo $0"; exit 1; }
ensure_build_deps
ensure_packages iptables iproute2 python3
build_release
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
cargo test --release --locked --workspace --test it -- --exact --nocapture \
    netns::yield_uplink::a_low_priority_node_gives_way_to_its_owners_uploads >"$out" 2>&1 || status=$?
grep -E '^(uplink |\| |SKIPPED)' "$out" || { cat "$out" >&2; exit 1; }
if [ "$status" -ne 0 ]; then
    log "the lab test's assertions failed (table above); its output:"
    grep -E 'panicked|assert' -A3 "$out" >&2 || true
fi
exit "$status"
