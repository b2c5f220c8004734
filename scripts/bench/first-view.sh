#!/usr/bin/env bash
# First views (issue #19): what the first viewer of an object waits for, and what that view costs the origin,
# through the fog against straight from the origin, in one run. A tracker, --nodes fog-nodes, a test origin
# sending every response at --rate (default 10MB/s = 80 Mbit/s, each response on its own) and two player
# proxies (`fog proxy`: viewer A's, and viewer B's, who starts 2 s after A), all on 127.0.0.1.
# VOD, objects of --sizes (default 10 MB, 200 MB, 2 GB; incompressible):
#   - first 64 KiB (`curl -r 0-65535`) as an object's first request, and a seek to its last MiB as another
#     object's first request (an MP4 keeps its index at the end): time to first byte / to the last byte
#     asked for, through viewer A's proxy and straight from the origin;
#   - one full view through the fog of an object nobody asked for before: its time, and the origin's body
#     bytes for it (the tracker's read, node fills, the viewer's own origin reads) in copies of the object,
#     read from the origin's counters (GET /__fog_test/stats) once the origin has been idle for 2 s;
#   - viewer B starting a full view 2 s after viewer A started one (another object): the share of B's bytes
#     that came from the fog (its proxy's /stats), and the origin's bytes for both views.
#   Full views only for objects up to --full-max (default 200MB: a 2 GB view at 10 MB/s takes over 3 min).
# Live: --segments segments of 2 MB published one at a time under an HLS playlist without an end; each is
#   fetched whole by viewer A right after it appears (playlist, then segment), straight from the origin, and
#   by viewer B 2 s after A. A first view's origin bytes are those sent by the time B starts.
# Every measurement uses its own URL (hard links to one file), so each fog request is a first view and the
# origin's per-path counters separate what each cost. Each proxy is warmed by one request for a small object
# first (a player's proxy runs before the viewer presses play). Prints a Markdown table.
#   scripts/bench/first-view.sh [--rate 10MB] [--nodes 3] [--sizes "10MB 200MB 2GB"] [--full-max 200MB]
#       [--segments 5]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
rate=10MB nodes=3 sizes="10MB 200MB 2GB" full_max=200MB segments=5
while [ $# -gt 0 ]; do
    case $1 in
        --rate) rate=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --sizes) sizes=$2; shift 2 ;;
        --full-max) full_max=$2; shift 2 ;;
        --segments) segments=$2; shift 2 ;;
        *) log "usage: $0 [--rate 10MB] [--nodes N] [--sizes \"10MB 200MB 2GB\"] [--full-max 200MB] [--segments N]"; exit 2 ;;
    esac
done

# bytes_of SIZE: 10MB → 10000000, 64MiB → 67108864 (the units fogcdn's flags take).
bytes_of() {
    local n=${1%%[!0-9]*} u=${1##*[0-9]}
    [ -n "$n" ] || { log "error: $1 is not a size (10MB, 2GB, 64MiB)"; return 1; }
    case $u in
        "" | B) echo "$n" ;;
        kB | KB) echo $((n * 1000)) ;;
        MB) echo $((n * 1000000)) ;;
        GB) echo $((n * 1000000000)) ;;
        KiB) echo $((n << 10)) ;;
        MiB) echo $((n << 20)) ;;
        GiB) echo $((n << 30)) ;;
        *) log "error: $1 is not a size (10MB, 2GB, 64MiB)"; return 1 ;;
    esac
}
rate_bytes=$(bytes_of "$rate")
[ "$rate_bytes" -gt 0 ] || { log "error: --rate must be above 0"; exit 2; }
full_max_bytes=$(bytes_of "$full_max")
segment_bytes=2000000

ensure_build_deps
ensure_packages jq
log "building (release, the whole workspace; the first build compiles RocksDB and takes ~20 min) into $CARGO_TARGET_DIR"
# With the workspace and all targets, as the tests build: another selection resolves features differently
# and recompiles RocksDB.
cargo build --release --locked --workspace --all-targets

work=$(mktemp -d -t fogcdn-first-view.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${FOG_BENCH_KEEP:-}" ] && log "kept $work" || rm -rf "$work"
}
trap cleanup EXIT

# Disk: the objects, each full view's copy in the nodes' caches and in a download, the segments, 1 GB spare.
need=$((segments * segment_bytes * 3 + (1 << 30)))
for s in $sizes; do
    b=$(bytes_of "$s")
    need=$((need + b))
    [ "$b" -le "$full_max_bytes" ] && need=$((need + 3 * b))
done
avail=$(df --output=avail -B1 "$work" | tail -n1)
[ "$avail" -ge "$need" ] || { log "error: $work has $avail bytes free, this run needs $need"; exit 1; }

mkdir -p "$work/origin/vod" "$work/origin/live"
head -c 1000 /dev/urandom > "$work/origin/warmup.bin"
for s in $sizes; do
    log "making a $s object"
    head -c "$(bytes_of "$s")" /dev/urandom > "$work/origin/vod/$s.bin"
    for use in first seek full pair; do ln "$work/origin/vod/$s.bin" "$work/origin/vod/$s.$use.bin"; done
done

"$FOG_BIN/fog-test-origin" --dir "$work/origin" --rate "$rate" 2> "$work/origin.log" & pids+=($!)
origin=$(wait_listening "$work/origin.log")
"$FOG_BIN/fog-tracker" --listen 127.0.0.1:0 --data-dir "$work/tracker" --origin "http://$origin/" \
    --heartbeat-secs 1 2> "$work/tracker.log" & pids+=($!)
tracker="http://$(wait_listening "$work/tracker.log")"
for n in $(seq 1 "$nodes"); do
    "$FOG_BIN/fog-node" --tracker "$tracker" --listen 127.0.0.1:0 --status-listen 127.0.0.1:0 \
        --data-dir "$work/node$n" --cache-size 4GiB 2> "$work/node$n.log" & pids+=($!)
    wait_listening "$work/node$n.log" >/dev/null
done
for _ in $(seq 1 300); do
    [ "$(curl -fsS "$tracker/v1/stats" | jq -r .nodes_healthy)" = "$nodes" ] && break
    sleep 0.2
done
[ "$(curl -fsS "$tracker/v1/stats" | jq -r .nodes_healthy)" = "$nodes" ] || { log "error: nodes not healthy"; exit 1; }
proxies=()
for viewer in a b; do
    "$FOG_BIN/fog" proxy --tracker "$tracker" --listen 127.0.0.1:0 2> "$work/proxy-$viewer.log" & pids+=($!)
    proxies+=("$(wait_listening "$work/proxy-$viewer.log")")
done
proxy_a=${proxies[0]} proxy_b=${proxies[1]}
# via PROXY PATH: the URL a player on that proxy fetches for the origin's PATH.
via() { "$FOG_BIN/fog" url "http://$origin/$2" --proxy "$1"; }
for p in "$proxy_a" "$proxy_b"; do curl -fsS -o /dev/null "$(via "$p" warmup.bin)"; done

# timed URL EXPECT_FILE [curl args]: fetches URL, checks the bytes against EXPECT_FILE and prints
# "TTFB TOTAL" in milliseconds, or "failed failed" (logging what came back).
timed() {
    local url=$1 expect=$2 got out
    shift 2
    got=$(mktemp -p "$work")
    out=$(curl -sS -o "$got" --max-time "$max_time" -w '%{time_starttransfer} %{time_total} %{http_code}' \
        "$@" "$url" 2> "$got.err") || true
    if cmp -s "$expect" "$got"; then
        awk '{ printf "%.1f %.1f\n", $1 * 1000, $2 * 1000 }' <<<"$out"
    else
        log "failed: $url $*: HTTP ${out##* }, $(stat -c %s "$got") bytes; $(cat "$got.err")"
        echo "failed failed"
    fi
    rm -f "$got" "$got.err"
}
# cell "TTFB TOTAL": "TTFB / TOTAL" for the table.
cell() { [ "${1%% *}" = failed ] && echo failed || awk '{ printf "%s / %s", $1, $2 }' <<<"$1"; }
origin_path() { curl -fsS "http://$origin/__fog_test/stats" | jq -c --arg p "/$1" '.per_path[$p] // {}'; }
origin_bytes() { origin_path "$1" | jq -r '.bytes // 0'; }
# settled_origin_bytes PATH: the origin's body bytes for PATH once it sent none for 2 s (ingest, fills done).
settled_origin_bytes() {
    local last=-1 now
    for _ in $(seq 1 600); do
        now=$(origin_bytes "$1")
        [ "$now" = "$last" ] && { echo "$now"; return; }
        last=$now
        sleep 2
    done
    log "warning: the origin was still sending $1 after 20 min"
    echo "$now"
}
proxy_stat() { curl -fsS "http://$1/stats" | jq -r "$2"; }
# view PROXY PATH EXPECT_FILE [curl args]: a viewer's fetch of the origin's PATH through PROXY; prints
# "TTFB TOTAL FOG_BYTES OTHER_BYTES", the last two from the proxy's /stats around it (other: what the proxy
# read from the origin itself, falling back or passing through). One fetch at a time per proxy.
view() {
    local proxy=$1 path=$2 expect=$3 f0 o0 t
    shift 3
    f0=$(proxy_stat "$proxy" .fog_bytes); o0=$(proxy_stat "$proxy" '.origin_bytes + .passthrough_bytes')
    t=$(timed "$(via "$proxy" "$path")" "$expect" "$@")
    echo "$t $(($(proxy_stat "$proxy" .fog_bytes) - f0)) $(($(proxy_stat "$proxy" '.origin_bytes + .passthrough_bytes') - o0))"
}
# told "TTFB TOTAL [FOG OTHER]": the same, for the log lines.
told() {
    awk '{ printf "first byte %s ms, done %s ms", $1, $2; if (NF > 2) printf " (fog %s B, origin %s B)", $3, $4 }' <<<"$1"
}
share() { awk -v f="$1" -v o="$2" 'BEGIN { if (f + o > 0) printf "%.0f %%", 100 * f / (f + o); else print "n/a" }'; }
copies() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.2f×", b / s }'; }

# Live first (the VOD objects' ingests may still run in the background afterwards).
log "live: $segments segments of 2 MB, each fetched as soon as it is in the playlist"
playlist="$work/origin/live/index.m3u8"
live_a=() live_direct=() live_first=0 live_both=0 live_b_fog=0 live_b_other=0
max_time=60
for k in $(seq 0 $((segments - 1))); do
    seg=$(printf 'seg_%03d.ts' "$k")
    head -c "$segment_bytes" /dev/urandom > "$work/origin/live/$seg"
    ln "$work/origin/live/$seg" "$work/origin/live/direct-$seg"
    {
        printf '#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n'
        for j in $(seq 0 "$k"); do printf '#EXTINF:2.000,\nseg_%03d.ts\n' "$j"; done
    } > "$playlist.tmp"
    mv "$playlist.tmp" "$playlist"
    sleep 1.1 # the proxies keep a playlist for 1 s
    started=$(date +%s.%N)
    curl -fsS -o /dev/null "$(via "$proxy_a" live/index.m3u8)"
    live_a+=("$(view "$proxy_a" "live/$seg" "$work/origin/live/$seg")")
    live_direct+=("$(timed "http://$origin/live/direct-$seg" "$work/origin/live/$seg")")
    sleep "$(awk -v s="$started" -v n="$(date +%s.%N)" 'BEGIN { w = s + 2 - n; print (w > 0 ? w : 0) }')"
    # What the first view cost by now: the segment's ingest and viewer A's reads are long over (0.2 s at
    # 10 MB/s), and viewer B, whose fetches may make nodes fill, has not started.
    first=$(origin_bytes "live/$seg")
    curl -fsS -o /dev/null "$(via "$proxy_b" live/index.m3u8)"
    read -r _ _ fog other <<<"$(view "$proxy_b" "live/$seg" "$work/origin/live/$seg")"
    live_b_fog=$((live_b_fog + fog)) live_b_other=$((live_b_other + other))
    both=$(settled_origin_bytes "live/$seg")
    live_first=$((live_first + first)) live_both=$((live_both + both))
    echo "live $seg: viewer A $(told "${live_a[-1]}"); direct $(told "${live_direct[-1]}"); viewer B fog $fog B," \
        "origin $other B; the origin sent $first B before viewer B, $both B in all: $(origin_path "live/$seg")"
done
# median_max "TTFB TOTAL"...: "median / median (max max / max)" of the TTFBs and of the totals, or "failed".
median_max() {
    printf '%s\n' "$@" | grep -q failed && { echo failed; return; }
    local t d n=$#
    t=($(printf '%s\n' "$@" | cut -d' ' -f1 | sort -n)) d=($(printf '%s\n' "$@" | cut -d' ' -f2 | sort -n))
    echo "${t[$(((n - 1) / 2))]} / ${d[$(((n - 1) / 2))]} (max ${t[-1]} / ${d[-1]})"
}

vod_rows=()
for s in $sizes; do
    b=$(bytes_of "$s")
    file="$work/origin/vod/$s.bin"
    max_time=$((b / rate_bytes * 4 + 120))
    log "VOD $s: first 64 KiB and a seek to the last MiB, through the fog and straight from the origin"
    head -c 65536 "$file" > "$work/head.expect"
    tail -c 1048576 "$file" > "$work/tail.expect"
    last_mib="$((b - 1048576))-$((b - 1))"
    first_direct=$(timed "http://$origin/vod/$s.bin" "$work/head.expect" -r 0-65535)
    first_fog=$(view "$proxy_a" "vod/$s.first.bin" "$work/head.expect" -r 0-65535)
    seek_direct=$(timed "http://$origin/vod/$s.bin" "$work/tail.expect" -r "$last_mib")
    seek_fog=$(view "$proxy_a" "vod/$s.seek.bin" "$work/tail.expect" -r "$last_mib")
    echo "VOD $s: first 64 KiB direct $(told "$first_direct"), fog $(told "$first_fog");" \
        "last MiB direct $(told "$seek_direct"), fog $(told "$seek_fog");" \
        "the origin's counters so far: $(origin_path "vod/$s.first.bin"), $(origin_path "vod/$s.seek.bin")"
    full_time="—" full_copies="—" pair_copies="—" b_share="—"
    if [ "$b" -le "$full_max_bytes" ]; then
        log "VOD $s: a full first view, then viewers A and B (2 s later) on another object"
        full=$(view "$proxy_a" "vod/$s.full.bin" "$file")
        full_bytes=$(settled_origin_bytes "vod/$s.full.bin")
        full_time=$(awk '{ if ($2 == "failed") print $2; else printf "%.2f s", $2 / 1000 }' <<<"$full")
        full_copies="$(copies "$full_bytes" "$b") ($full_bytes B)"
        view "$proxy_a" "vod/$s.pair.bin" "$file" > "$work/pair-a.out" &
        pair_a=$!
        sleep 2
        read -r _ b_total fog other <<<"$(view "$proxy_b" "vod/$s.pair.bin" "$file")"
        wait "$pair_a"
        b_share="$(share "$fog" "$other") ($fog B)"
        [ "$b_total" = failed ] && b_share="failed"
        pair_bytes=$(settled_origin_bytes "vod/$s.pair.bin")
        pair_copies="$(copies "$pair_bytes" "$b") ($pair_bytes B)"
        echo "VOD $s: full view $(told "$full"), the origin's counters: $(origin_path "vod/$s.full.bin");" \
            "viewer A $(told "$(cat "$work/pair-a.out")"), viewer B 2 s later fog $fog B, origin $other B;" \
            "the origin's counters for both: $(origin_path "vod/$s.pair.bin")"
    fi
    vod_rows+=("| $s | $(cell "$first_direct") | $(cell "$first_fog") | $(cell "$seek_direct") | $(cell "$seek_fog") | $full_time | $full_copies | $b_share | $pair_copies |")
done

echo
echo "Origin at $rate/s per response, $nodes nodes, on 127.0.0.1. Times in ms: first byte / last byte asked for."
echo
echo "| VOD object | first 64 KiB, direct | first 64 KiB, fog (first view) | last MiB, direct | last MiB, fog (first view) | full first view, fog | origin bytes for it | 2nd viewer (+2 s) from the fog | origin bytes, 1st + 2nd viewer |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${vod_rows[@]}"
echo
live_bytes=$((segments * segment_bytes))
echo "| live | segment, direct: median (max) | segment, fog (first view): median (max) | origin bytes per first view | 2nd viewer (+2 s) from the fog | origin bytes, 1st + 2nd viewer |"
echo "|---|---|---|---|---|---|"
echo "| $segments × 2 MB | $(median_max "${live_direct[@]}") | $(median_max "${live_a[@]}") | $(copies "$live_first" "$live_bytes") | $(share "$live_b_fog" "$live_b_other") | $(copies "$live_both" "$live_bytes") |"
[ "$full_max_bytes" -lt "$(for s in $sizes; do bytes_of "$s"; done | sort -n | tail -n1)" ] &&
    echo && echo "—: no full view of objects over $full_max (--full-max)."
log "done in ${SECONDS} s"
