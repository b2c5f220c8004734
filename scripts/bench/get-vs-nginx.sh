#!/usr/bin/env bash
# `fog get` of one large object from warm nodes against `curl` of the same object from nginx, the origin
# (issue #17: throughput ratio, goal ≥ 1.0 on loopback). nginx (Debian package, `sendfile on`) serves a
# directory holding one incompressible object over HTTP (the origin registered with the tracker) and over
# HTTPS (TLS 1.3, self-signed: what encryption costs curl's side); a tracker and --nodes fog-nodes (no upload
# cap unless --upload-limit, a RAM tier that holds the object unless --memory-cache) run beside it, all on
# 127.0.0.1. The nodes are warmed by one `fog get` (its output checked against the object), then one more must
# come 100 % from the fog.
# Then --runs rounds, each timing in turn: curl over HTTP, `fog get` (its default --parallel 8), curl over
# HTTPS, and `fog get --parallel P` for each P of --parallel. Every fetch writes to /dev/null (`> /dev/null`:
# `fog get -o /dev/null` would write /dev/null.part and rename it over /dev/null) and is a fresh process
# (resolve, QUIC handshakes and the end-of-fetch receipts included, as a TCP connect is for curl).
# Reported per way: MB/s (10^6 B/s, wall time) median and min–max, CPU s/GiB of the client process and of the
# servers (the nodes summed, or nginx's workers; from /proc), the kernel's UDP receive-buffer drops per run,
# and the ratio of medians to curl over HTTP. Each run's line is printed too, then a Markdown table.
# Takes ~1 min (256 MiB, 5 runs) after the build.
#   scripts/bench/get-vs-nginx.sh [--size-mib 256] [--runs 5] [--nodes 3] [--parallel "4 16"]
#       [--memory-cache SIZE] [--upload-limit SIZE] [-- FOG-NODE-FLAGS...]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
size_mib=256 runs=5 nodes=3 parallel="4 16" memory_cache="" upload_limit=""
node_flags=()
while [ $# -gt 0 ]; do
    case $1 in
        --size-mib) size_mib=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --parallel) parallel=$2; shift 2 ;;
        --memory-cache) memory_cache=$2; shift 2 ;;
        --upload-limit) upload_limit=$2; shift 2 ;;
        --) shift; node_flags=("$@"); break ;;
        *) log "usage: $0 [--size-mib N] [--runs N] [--nodes N] [--parallel \"P...\"] [--memory-cache SIZE] [--upload-limit SIZE] [-- fog-node flags]"; exit 2 ;;
    esac
done
size=$((size_mib << 20))
# Every chunk in RAM on every node: nginx reads from the page cache, so the nodes should not hit the disk.
memory_cache=${memory_cache:-$((size + (64 << 20)))}
[ -n "$upload_limit" ] && node_flags+=(--upload-limit "$upload_limit")

ensure_build_deps
ensure_packages nginx openssl jq time python3
log "building (release, the whole workspace; the first build compiles RocksDB and takes ~20 min) into $CARGO_TARGET_DIR"
# With the workspace and all targets, as the tests build: another selection resolves features differently
# and recompiles RocksDB.
cargo build --release --locked --workspace --all-targets

work=$(mktemp -d -t fogcdn-get-vs-nginx.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${FOG_BENCH_KEEP:-}" ] && log "kept $work" || rm -rf "$work"
}
trap cleanup EXIT

# Disk: the object, a copy in the nodes' caches, the warm-up download, the binaries, 1 GiB spare.
need=$((3 * size + (3 << 30) / 2))
avail=$(df --output=avail -B1 "$work" | tail -n1)
[ "$avail" -ge "$need" ] || { log "error: $work has $avail bytes free, this run needs $need"; exit 1; }

# Copies of the binaries: a build running beside the benchmark (a shared machine) cannot swap them mid-run,
# and a profiler finds the symbols of the processes it sampled.
mkdir -p "$work/bin" "$work/www"
cp "$FOG_BIN/fog" "$FOG_BIN/fog-node" "$FOG_BIN/fog-tracker" "$work/bin/"
FOG_BIN=$work/bin
head -c "$size" /dev/urandom > "$work/www/object.bin"
chmod -R a+rX "$work"

openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port) https_port=$(free_port)
{
    [ "$(id -u)" = 0 ] && echo "user root;"
    cat <<CONF
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    server {
        listen 127.0.0.1:$http_port;
        listen 127.0.0.1:$https_port ssl;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        ssl_protocols TLSv1.3;
        root $work/www;
    }
}
CONF
} > "$work/nginx.conf"
nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;' 2> "$work/nginx.stderr" & pids+=($!)
nginx_pid=$!
origin="http://127.0.0.1:$http_port"
for _ in $(seq 1 50); do curl -fsS -o /dev/null -r 0-0 "$origin/object.bin" 2>/dev/null && break; sleep 0.1; done
curl -fsS -o /dev/null -r 0-0 "$origin/object.bin" || { log "error: nginx did not start:"; cat "$work/nginx.stderr" >&2; exit 1; }
url="$origin/object.bin"
https_url="https://127.0.0.1:$https_port/object.bin"

"$FOG_BIN/fog-tracker" --listen 127.0.0.1:0 --data-dir "$work/tracker" --origin "$origin/" \
    --heartbeat-secs 1 2> "$work/tracker.log" & pids+=($!)
tracker="http://$(wait_listening "$work/tracker.log")"
node_pids=()
for n in $(seq 1 "$nodes"); do
    "$FOG_BIN/fog-node" --tracker "$tracker" --listen 127.0.0.1:0 --status-listen 127.0.0.1:0 \
        --data-dir "$work/node$n" --cache-size "$((2 * size + (1 << 30)))" --memory-cache "$memory_cache" \
        "${node_flags[@]}" 2> "$work/node$n.log" & pids+=($!)
    node_pids+=($!)
    wait_listening "$work/node$n.log" >/dev/null
done
for _ in $(seq 1 300); do
    [ "$(curl -fsS "$tracker/v1/stats" | jq -r .nodes_healthy)" = "$nodes" ] && break
    sleep 0.2
done
[ "$(curl -fsS "$tracker/v1/stats" | jq -r .nodes_healthy)" = "$nodes" ] || { log "error: nodes not healthy"; exit 1; }

# Warm the nodes: the first fetch makes them fill every chunk from the origin; the second must be all fog.
log "warming $nodes nodes with a $size_mib MiB object"
"$FOG_BIN/fog" get --tracker "$tracker" "$url" -o "$work/warm.bin" 2> "$work/warm.log"
cmp -s "$work/warm.bin" "$work/www/object.bin" || { log "error: the warm-up fetch differs from the object"; exit 1; }
rm -f "$work/warm.bin"
warm=""
for _ in 1 2 3; do
    "$FOG_BIN/fog" get --tracker "$tracker" "$url" --json > /dev/null 2> "$work/warm.json"
    warm=$(tail -n1 "$work/warm.json")
    [ "$(jq '.fog_bytes == .bytes and .bytes > 0' <<<"$warm")" = true ] && break
    log "not all from the fog yet: $(jq -c '{bytes, fog_bytes, origin_bytes, fallbacks}' <<<"$warm")"
    warm=""
done
[ -n "$warm" ] || { log "error: the nodes did not get warm"; exit 1; }
log "warm: fog_share 100 %, bytes by node $(jq -c '[.nodes[].bytes]' <<<"$warm")"

# CPU seconds (user+system) of processes and their children, from /proc/PID/stat (clock ticks of 1/100 s).
cpu_seconds() {
    local total=0 p c
    for p in "$@"; do
        for c in "$p" $(pgrep -P "$p" || true); do
            total=$(awk -v t="$total" '{ sub(/^.*\) /, ""); print t + ($12 + $13) / 100 }' "/proc/$c/stat")
        done
    done
    echo "$total"
}
# UDP datagrams the kernel dropped because a socket's receive buffer was full (all sockets: run the benchmark
# on an otherwise quiet machine). Each is a packet QUIC must detect as lost and resend, and its congestion
# controller backs off.
udp_drops() { awk '/^Udp:/ && $2 ~ /^[0-9]/ { print $6 }' /proc/net/snmp; }
# measure NAME SERVER-PIDS COMMAND...: runs COMMAND (a fetch to /dev/null, its stderr kept in $work/err) and
# prints one JSON line: wall seconds, the client's and the servers' CPU seconds, UDP receive-buffer drops,
# and what the command's stderr reports as `bytes` (curl's -w, fog's --json report) and `fog_share`.
measure() {
    local name=$1 servers=$2 s0 s1 t0 t1 d0 drops cpu report
    shift 2
    s0=$(cpu_seconds $servers)
    d0=$(udp_drops)
    t0=$EPOCHREALTIME
    /usr/bin/time -f '%U %S' -o "$work/time" "$@" > /dev/null 2> "$work/err" || {
        log "error: $name failed:"; cat "$work/err" >&2; exit 1
    }
    t1=$EPOCHREALTIME
    s1=$(cpu_seconds $servers)
    drops=$(($(udp_drops) - d0))
    cpu=$(awk '{ print $1 + $2 }' "$work/time")
    report=$(tail -n1 "$work/err")
    jq -nc --arg name "$name" --argjson wall "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" \
        --argjson client "$cpu" --argjson server "$(awk -v a="$s0" -v b="$s1" 'BEGIN { print b - a }')" \
        --argjson drops "$drops" --argjson r "$report" \
        '{name: $name, wall_s: $wall, bytes: $r.bytes, mb_per_s: ($r.bytes / $wall / 1e6 * 10 | round / 10),
          client_cpu_s: $client, server_cpu_s: ($server * 100 | round / 100), udp_drops: $drops,
          fog_share: (if $r.fog_bytes then $r.fog_bytes / $r.bytes else null end)}'
}
# The ways, in the order each round runs them (curl over HTTP first: the anchor), as the table lists them.
ways=("curl HTTP" "fog get --parallel 8" "curl HTTPS")
for p in $parallel; do [ "$p" != 8 ] && ways+=("fog get --parallel $p"); done
curl_cmd=(curl -fsS -k -o /dev/null -w '%{stderr}{"bytes": %{size_download}}\n')
results="$work/results.jsonl"
: > "$results"
for r in $(seq 1 "$runs"); do
    log "round $r/$runs"
    for way in "${ways[@]}"; do
        case $way in
            "curl HTTP") line=$(measure "$way" "$nginx_pid" "${curl_cmd[@]}" "$url") ;;
            "curl HTTPS") line=$(measure "$way" "$nginx_pid" "${curl_cmd[@]}" "$https_url") ;;
            *) line=$(measure "$way" "${node_pids[*]}" "$FOG_BIN/fog" get --tracker "$tracker" "$url" --json --parallel "${way##* }") ;;
        esac
        [ "$(jq .bytes <<<"$line")" = "$size" ] || { log "error: $way got $(jq .bytes <<<"$line") bytes, not $size"; exit 1; }
        [ "$(jq '.fog_share // 1' <<<"$line")" = 1 ] || log "warning: $way was not all from the fog"
        echo "round $r: $line"
        echo "$line" >> "$results"
    done
done

echo
echo "$size_mib MiB object, $nodes warm nodes (RAM tier $memory_cache B${upload_limit:+, upload cap $upload_limit}), $runs runs each, alternating; 127.0.0.1, $(nproc) cores."
echo
echo "| client ← server | MB/s median | min–max | client CPU s/GiB | server CPU s/GiB | UDP drops/run | fog share | ratio to curl HTTP |"
echo "|---|---|---|---|---|---|---|---|"
jq -rs --argjson ways "$(printf '%s\n' "${ways[@]}" | jq -Rsc 'split("\n")[:-1]')" --arg nodes "$nodes" '
    def median: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
    def per_gib(f): (map(f) | add) / (map(.bytes) | add) * 1073741824 * 100 | round / 100;
    . as $runs
    | ($runs | map(select(.name == "curl HTTP") | .mb_per_s) | median) as $base
    | $ways[] as $way
    | ($runs | map(select(.name == $way))) as $rs
    | ($rs | map(.mb_per_s) | median * 10 | round / 10) as $m
    | "| \($way) ← \(if ($way | startswith("curl")) then "nginx" else "\($nodes) nodes" end) | \($m) | \($rs | map(.mb_per_s) | min)–\($rs | map(.mb_per_s) | max) | \($rs | per_gib(.client_cpu_s)) | \($rs | per_gib(.server_cpu_s)) | \($rs | map(.udp_drops) | median) | \(if $rs[0].fog_share == null then "—" else "\($rs | map(.fog_share) | min * 100 | round) %" end) | \($m / $base * 100 | round / 100 | tostring | if test("\\.") then . else . + ".0" end) |"
' "$results"
log "done in ${SECONDS} s"
