#!/usr/bin/env bash
# Web players (issue #14): one page, in Chromium and in Firefox ESR (each where installed), fetching one
# object through 3 warm fog nodes over WebTransport, every chunk BLAKE3-verified in the page, against the
# same page fetching the same bytes over HTTPS from nginx (TLS 1.3, sendfile), alternating; and the time to
# the first video frame of hls.js on a 20 s HLS stream through the fog (@fogcdn/hlsjs) against hls.js
# reading it from nginx. Everything on 127.0.0.1. Prints a Markdown table (docs/benchmarks.md, "Web players").
# The measuring code is the ignored test web_bench:: in testkit/tests/it (it reuses the suite's browser
# driver, cluster and media helpers).
#   scripts/bench/web.sh [--size-mib 64] [--runs 5]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
size_mib=64 runs=5
while [ $# -gt 0 ]; do
    case $1 in
        --size-mib) size_mib=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        *) log "usage: $0 [--size-mib N] [--runs N]"; exit 2 ;;
    esac
done
ensure_build_deps
ensure_packages nginx openssl ffmpeg chromium chromium-driver firefox-esr
command -v npm >/dev/null || ensure_packages nodejs npm
ensure_geckodriver
(cd web && npm ci --ignore-scripts --no-audit --no-fund && npm run build) >&2
cargo build --release --locked --workspace --all-targets
FOG_BENCH_SIZE_MIB=$size_mib FOG_BENCH_RUNS=$runs \
    cargo test --release --locked --workspace --test it -- --ignored --exact web_bench::web_fog_against_https_nginx \
    --nocapture --test-threads 1
