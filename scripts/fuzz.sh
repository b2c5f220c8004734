#!/usr/bin/env bash
# Fuzzes what fogcdn parses from strangers (issue #12): the QUIC request and response frames, the peer-fill
# and rendezvous frames, the tracker API's JSON bodies, manifests, the player proxy's playlist rewriting,
# Range headers and URL forms: each cargo-fuzz target in fuzz/ for SECONDS (default 60), one after the
# other. Installs cargo-fuzz if missing; needs the nightly toolchain (exits 3, saying so, without one).
# Builds into $FUZZ_TARGET_DIR (default ~/.cache/fogcdn/fuzz-target), where each target's corpus also
# grows from run to run (the seeds in fuzz/corpus/ are read, never written). A crash, hang or memory blow-up
# fails the run, naming the target and the input that caused it. Ends with one line:
# "fuzz: N targets, S s each, E executions, no crash" (or which targets crashed).
#   scripts/fuzz.sh [SECONDS]                          every target
#   FUZZ_TARGETS="playlist range" scripts/fuzz.sh 30   some of them
# Reproduce a crash: cargo +nightly fuzz run TARGET ARTIFACT --target-dir "$FUZZ_TARGET_DIR" -O -a
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
secs=${1:-60}
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-$HOME/.cache/fogcdn/fuzz-target}
CARGO_FUZZ_VERSION=0.13.2
# Longest input per target (libFuzzer -max_len): past every bound the decoder checks, small enough to keep
# executions fast.
declare -A MAX_LEN=(
    [request_frame]=10240 [response_head]=2048 [rendezvous_frame]=8192 [api_json]=16384
    [manifest]=16384 [playlist]=16384 [range]=256 [urls]=4096
)
targets=${FUZZ_TARGETS:-"request_frame response_head rendezvous_frame api_json manifest playlist range urls"}

if ! cargo +nightly --version >/dev/null 2>&1; then
    command -v rustup >/dev/null && rustup toolchain install nightly --profile minimal >&2 || true
    cargo +nightly --version >/dev/null 2>&1 || { log "error: no nightly toolchain (cargo fuzz needs one)"; exit 3; }
fi
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
    log "installing cargo-fuzz $CARGO_FUZZ_VERSION"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --target-dir "$FUZZ_TARGET_DIR/cargo-fuzz" >&2 ||
        { log "error: cargo-fuzz could not be installed"; exit 3; }
fi

# Release with debug assertions and overflow checks, address sanitizer (cargo fuzz's default).
flags=(-O -a --target-dir "$FUZZ_TARGET_DIR")
log "building the fuzz targets into $FUZZ_TARGET_DIR"
CARGO_TARGET_DIR="$FUZZ_TARGET_DIR" cargo +nightly fuzz build "${flags[@]}"
# Run the binaries just built (as `cargo fuzz run` would), so every target runs the same build.
bin="$FUZZ_TARGET_DIR/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
mkdir -p "$FUZZ_TARGET_DIR/logs"
total=0 count=0 crashed=()
for t in $targets; do
    corpus="$FUZZ_TARGET_DIR/corpus/$t"
    logfile="$FUZZ_TARGET_DIR/logs/$t.log"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    status=0
    "$bin/$t" -artifact_prefix="$PWD/fuzz/artifacts/$t/" -max_total_time="$secs" -max_len="${MAX_LEN[$t]:-4096}" \
        -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 "$corpus" "fuzz/corpus/$t" >"$logfile" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logfile" | tail -n1)
    total=$((total + ${runs:-0})) count=$((count + 1))
    if [ "$status" -ne 0 ]; then
        artifact=$(sed -n 's/.*Test unit written to \([^ ]*\).*/\1/p' "$logfile" | tail -n1)
        crashed+=("$t")
        log "fuzz: $t FAILED after ${runs:-?} executions; input: ${artifact:-none written (see $logfile)}"
        grep -m1 -A4 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$logfile" >&2 || tail -n 20 "$logfile" >&2
        log "  reproduce: cargo +nightly fuzz run $t ${artifact:-ARTIFACT} ${flags[*]}"
    else
        log "fuzz: $t: ${runs:-?} executions in $secs s, corpus $(find "$corpus" -type f | wc -l) inputs"
    fi
done
if [ ${#crashed[@]} -gt 0 ]; then
    log "fuzz: $count targets, $secs s each, $total executions, crashed: ${crashed[*]} (logs in $FUZZ_TARGET_DIR/logs)"
    exit 1
fi
log "fuzz: $count targets, $secs s each, $total executions, no crash"
