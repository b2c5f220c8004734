#!/usr/bin/env bash
# Serving benchmark: one fog-node serving warm 1 MiB chunks over QUIC to N concurrent clients, against
# nginx (Debian package, HTTPS with a self-signed certificate) serving the same bytes as 1 MiB files, in
# one run on this machine. Prints both results and the ratio as a Markdown table row.
#   scripts/bench/serve.sh [--clients 64] [--seconds 10]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
clients=64 seconds=10
while [ $# -gt 0 ]; do
    case $1 in
        --clients) clients=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        *) log "usage: $0 [--clients N] [--seconds S]"; exit 2 ;;
    esac
done
ensure_build_deps
ensure_packages nginx openssl
build_release

work=$(mktemp -d -t fogcdn-bench.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# 64 chunks of incompressible data: one 64 MiB object for the fog, the same bytes as 64 files for nginx.
mkdir -p "$work/origin" "$work/www"
head -c $((64 << 20)) /dev/urandom > "$work/origin/object.bin"
split -b 1M -d -a 2 "$work/origin/object.bin" "$work/www/chunk_"
chmod -R a+rX "$work"

"$FOG_BIN/fog-test-origin" --dir "$work/origin" 2> "$work/origin.log" & pids+=($!)
origin=$(wait_listening "$work/origin.log")
"$FOG_BIN/fog-tracker" --listen 127.0.0.1:0 --data-dir "$work/tracker" --origin "http://$origin/" \
    --heartbeat-secs 1 2> "$work/tracker.log" & pids+=($!)
tracker="http://$(wait_listening "$work/tracker.log")"
"$FOG_BIN/fog-node" --tracker "$tracker" --listen 127.0.0.1:0 --status-listen 127.0.0.1:0 --data-dir "$work/node" --cache-size 1GiB \
    2> "$work/node.log" & pids+=($!)
wait_listening "$work/node.log" >/dev/null
until [ "$(curl -fsS "$tracker/v1/stats" | jq -r .nodes_healthy)" = 1 ]; do sleep 0.2; done
# Warm the node: one fetch through the fog pulls every chunk into its cache.
"$FOG_BIN/fog" get --tracker "$tracker" "http://$origin/object.bin" -o "$work/warm.bin" 2>/dev/null
cmp -s "$work/warm.bin" "$work/origin/object.bin"

openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/nginx.conf" <<CONF
user root;
worker_processes auto;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    keepalive_requests 100000;
    server {
        listen 127.0.0.1:$port ssl;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        ssl_protocols TLSv1.3;
        root $work/www;
    }
}
CONF
nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;' 2> "$work/nginx.stderr" & pids+=($!)
for _ in $(seq 1 50); do curl -kfsS -o /dev/null "https://127.0.0.1:$port/chunk_00" 2>/dev/null && break; sleep 0.1; done

urls=()
for f in "$work"/www/chunk_*; do urls+=("https://127.0.0.1:$port/$(basename "$f")"); done

# CPU seconds (user+system) a process and its children have used, to report server CPU per GiB served.
cpu_seconds() {
    local total=0 p
    for p in "$@" $(pgrep -P "$1" || true); do
        total=$(awk -v t="$total" '{print t + ($14 + $15) / 100}' "/proc/$p/stat")
    done
    echo "$total"
}
node_pid=${pids[2]} nginx_pid=${pids[3]}
run() { # run NAME PID loadgen-args...: prints the loadgen JSON with the server's CPU seconds added
    local pid=$2; shift 2
    local before after out
    before=$(cpu_seconds "$pid")
    out=$("$FOG_BIN/fog-loadgen" --clients "$clients" --seconds "$seconds" "$@")
    after=$(cpu_seconds "$pid")
    jq -c --argjson cpu "$(python3 -c "print(round($after - $before, 2))")" \
        '. + {server_cpu_s: $cpu, server_cpu_s_per_gib: (if .bytes > 0 then ($cpu / (.bytes / 1073741824) * 100 | round / 100) else null end)}' <<<"$out"
}
fog=$(run fog "$node_pid" quic --tracker "$tracker" "http://$origin/object.bin")
ngx=$(run nginx "$nginx_pid" https "${urls[@]}")
echo "fog-node: $fog"
echo "nginx:    $ngx"
f=$(jq -r .mib_per_s <<<"$fog"); n=$(jq -r .mib_per_s <<<"$ngx")
ratio=$(python3 -c "print(f'{$f / $n:.2f}' if $n > 0 else 'n/a')")
row() { jq -r '"\(.mib_per_s) | \(.p50_ms) / \(.p99_ms) | \(.server_cpu_s_per_gib)"' <<<"$1"; }
echo
echo "| clients | fog-node QUIC MiB/s | p50 / p99 ms | server CPU s/GiB | nginx HTTPS MiB/s | p50 / p99 ms | server CPU s/GiB | fog/nginx |"
echo "|---|---|---|---|---|---|---|---|"
echo "| $clients | $(row "$fog") | $(row "$ngx") | $ratio |"
