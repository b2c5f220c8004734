#!/usr/bin/env bash
# Player QoE through the fog against straight from the origin, in one run (issue #17, "real measurements").
# A lab of network namespaces (root): a core router and, each on its own delay line to it (one-way delays,
# `testkit/netns/wire.py`: this kernel has no sch_netem), a cloud site with the origin (`fog-test-origin`)
# and the tracker (--cloud-ms, default 25 ms), a fog-node per --node-ms delay (default 8 nodes, 2..16 ms)
# whose uplinks `tc tbf` limits to --uplink (default 20mbit, 100 ms of queue), and a client site per
# --client-ms delay (default 4, 4..16 ms) where the players run. Client and cloud links are not rate-limited.
# Two streams, H.264 + AAC at --bitrate (default 2 Mbit/s), --segment-secs segments (default 4), encoded by
# ffmpeg from lavfi test sources at the start of the run:
#   - VOD: one title, every player watching its first --watch seconds (default 60) from the start;
#   - live: a channel published in real time (`scripts/bench/qoe/live.py`: a sliding window of 6 segments, 3
#     on air before the first player), each player joining at the live point ffmpeg picks (3 segments back).
# Per stream, --players pairs (default 20) start --stagger seconds apart (default 1.5), spread over the
# client sites: in each pair one player reads the origin directly, the other through its own `fog proxy`
# (one proxy per viewer, as in a player app), both at the same moment, so both halves share the machine
# and the origin. Players are ffmpeg reading in real time (-re, stream copy; `scripts/bench/qoe/players.py`).
# Reported per stream and way, from the players' own progress: startup (process start to the first media
# out) p50 / p95 / max, rebuffer ratio (stalled time / stalled + played time; a stall is the playhead
# falling behind real time by more than 0.5 s, see players.py), players that stalled, segments skipped;
# bytes delivered to the players and the fog's share of them (the proxies' /stats); the origin's body bytes
# for each way's paths (its own counters: for the fog, the tracker's ingest reads, the nodes' fills and the
# proxies' fallbacks and playlists), and origin offload = 1 - the fog way's origin bytes / the direct way's
# (same viewers, same moments). Also CPU seconds per part and the machine's load over each phase, and bytes
# per node. The fog starts cold (unless --warm-vod): the VOD title and every live segment are first views.
# ~4 min after the build; FOG_BENCH_KEEP=1 keeps the logs and each player's result ($work/{vod,live}.jsonl).
#   scripts/bench/qoe.sh [--players 20] [--watch 60] [--stagger 1.5] [--bitrate 2M] [--segment-secs 4]
#       [--uplink 20mbit] [--node-ms "2 4 6 8 10 12 14 16"] [--client-ms "4 8 12 16"] [--cloud-ms 25]
#       [--proxy-flags "FOG-PROXY-FLAGS"] [--warm-vod] [-- FOG-NODE-FLAGS...]
# --warm-vod: the VOD title has been watched before: every segment is fetched once through the fog (`fog get`
# from the first client site) before the VOD players start, and the origin's bytes for that are left out.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
players=20 watch=60 stagger=1.5 bitrate=2M segment_secs=4 uplink=20mbit
node_ms="2 4 6 8 10 12 14 16" client_ms="4 8 12 16" cloud_ms=25
node_flags=() proxy_flags=() warm_vod=""
while [ $# -gt 0 ]; do
    case $1 in
        --players) players=$2; shift 2 ;;
        --watch) watch=$2; shift 2 ;;
        --stagger) stagger=$2; shift 2 ;;
        --bitrate) bitrate=$2; shift 2 ;;
        --segment-secs) segment_secs=$2; shift 2 ;;
        --uplink) uplink=$2; shift 2 ;;
        --node-ms) node_ms=$2; shift 2 ;;
        --client-ms) client_ms=$2; shift 2 ;;
        --cloud-ms) cloud_ms=$2; shift 2 ;;
        --proxy-flags) read -r -a proxy_flags <<<"$2"; shift 2 ;;
        --warm-vod) warm_vod=1; shift ;;
        --) shift; node_flags=("$@"); break ;;
        *) log "usage: $0 [--players N] [--watch S] [--stagger S] [--bitrate 2M] [--segment-secs S] [--uplink 20mbit] [--node-ms \"MS...\"] [--client-ms \"MS...\"] [--cloud-ms MS] [--proxy-flags \"FLAGS\"] [--warm-vod] [-- fog-node flags]"; exit 2 ;;
    esac
done
read -r -a node_delays <<<"$node_ms"
read -r -a client_delays <<<"$client_ms"
nodes=${#node_delays[@]} sites=${#client_delays[@]}
[ "$nodes" -ge 1 ] && [ "$sites" -ge 1 ] && [ "$players" -ge 1 ] || { log "error: need nodes, client sites and players"; exit 2; }
[ "$(id -u)" = 0 ] || { log "error: needs root (network namespaces, tc)"; exit 1; }
[ -e /dev/net/tun ] || { log "error: needs /dev/net/tun for the delay lines"; exit 1; }

ensure_build_deps
ensure_packages ffmpeg jq iproute2 python3
log "building (release, the whole workspace; the first build compiles RocksDB and takes ~20 min) into $CARGO_TARGET_DIR"
# With the workspace and all targets, as the tests build: another selection resolves features differently
# and recompiles RocksDB.
cargo build --release --locked --workspace --all-targets

work=$(mktemp -d -t fogcdn-qoe.XXXXXX)
# Names of namespaces and devices (at most 15 bytes) unique to this run.
p="q$(($$ % 100000))"
pids=() namespaces=() wire_pids=() server_pids=() node_pids=() proxy_pids=()
cleanup() {
    # Newest first: the delay lines go last, so nodes drain over a network that still works.
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[$i]}" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    [ -n "${FOG_BENCH_KEEP:-}" ] && log "kept $work" || rm -rf "$work"
}
trap cleanup EXIT

# Copies of the binaries: a build running beside the benchmark (a shared machine) cannot swap them mid-run.
mkdir -p "$work/bin"
cp "$FOG_BIN/fog" "$FOG_BIN/fog-node" "$FOG_BIN/fog-tracker" "$FOG_BIN/fog-test-origin" "$work/bin/"
FOG_BIN=$work/bin

# The media. VOD: the watched part plus a minute (prefetch reads ahead). Live: the preroll, every join, the
# watch and a margin. Video bits = bitrate - 64k of audio; CBR with filler so every segment is the bitrate.
vod_secs=$((watch + 60))
live_secs=$(awk -v s="$segment_secs" -v n="$players" -v g="$stagger" -v w="$watch" 'BEGIN { printf "%d", 3 * s + g * (n - 1) + w + 30 }')
video_kbit=$(awk -v b="$bitrate" 'BEGIN { u = substr(b, length(b)); v = b + 0; if (u == "M") v *= 1000; else if (u == "k") v *= 1; else v /= 1000; printf "%d", v - 64 }')
[ "$video_kbit" -gt 100 ] || { log "error: --bitrate $bitrate leaves no room for video"; exit 2; }
# encode PATTERN TONE SECONDS DIR: an HLS VOD rendition of a lavfi test pattern with a sine tone.
encode() {
    mkdir -p "$4"
    ffmpeg -hide_banner -loglevel error -f lavfi -i "$1=size=640x360:rate=25" -f lavfi -i "sine=frequency=$2:sample_rate=48000" \
        -t "$3" -map 0:v -map 1:a -c:v libx264 -preset veryfast -b:v "${video_kbit}k" -maxrate "${video_kbit}k" \
        -minrate "${video_kbit}k" -bufsize "${video_kbit}k" -x264-params nal-hrd=cbr -g $((25 * segment_secs)) \
        -keyint_min $((25 * segment_secs)) -sc_threshold 0 -c:a aac -b:a 64k -f hls -hls_time "$segment_secs" \
        -hls_playlist_type vod -hls_segment_filename "$4/seg_%05d.ts" "$4/index.m3u8"
}
log "encoding ${vod_secs} s of VOD and ${live_secs} s of live at $bitrate"
encode testsrc2 440 "$vod_secs" "$work/origin/vod-direct"
encode testsrc 880 "$live_secs" "$work/live-source"
# The fog's players read their own copy of the VOD title (hard links: the same bytes) so the origin's per-path
# counters tell the two ways apart.
mkdir -p "$work/origin/vod-fog"
ln "$work/origin/vod-direct/"* "$work/origin/vod-fog/"
printf '#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-ENDLIST\n' > "$work/origin/warmup.m3u8"

log "building the lab: a core, the cloud ($cloud_ms ms), $nodes nodes (${node_ms// /, } ms; uplinks $uplink), $sites client sites (${client_ms// /, } ms)"
mkns() {
    ip netns add "$1"
    namespaces+=("$1")
    ip -n "$1" link set lo up
}
mkns "${p}core"
ip netns exec "${p}core" sysctl -qw net.ipv4.ip_forward=1
# link K NS ONE_WAY_MS: a delay line between NS (10.78.K.2) and the core (10.78.K.1).
link() {
    local k=$1 ns=$2 delay=$3 edge="${p}e$1" core="${p}c$1"
    python3 testkit/netns/wire.py "$edge" "$core" "$delay" > "$work/wire$k.out" & pids+=($!)
    wire_pids+=($!)
    for _ in $(seq 1 100); do grep -q ready "$work/wire$k.out" 2>/dev/null && break; sleep 0.05; done
    grep -q ready "$work/wire$k.out" || { log "error: the delay line $k did not start"; exit 1; }
    ip link set "$edge" netns "$ns"
    ip link set "$core" netns "${p}core"
    ip -n "$ns" addr add "10.78.$k.2/24" dev "$edge"
    ip -n "${p}core" addr add "10.78.$k.1/24" dev "$core"
    ip -n "$ns" link set "$edge" up
    ip -n "${p}core" link set "$core" up
    ip -n "$ns" route add default dev "$edge"
}
mkns "${p}cloud"
link 1 "${p}cloud" "$cloud_ms"
for i in $(seq 1 "$nodes"); do
    mkns "${p}n$i"
    link $((i + 1)) "${p}n$i" "${node_delays[$((i - 1))]}"
    # The volunteer's home uplink: what leaves the node's site, before the delay line.
    ip netns exec "${p}n$i" tc qdisc replace dev "${p}e$((i + 1))" root tbf rate "$uplink" burst 32kb latency 100ms
done
for s in $(seq 1 "$sites"); do
    mkns "${p}c$s"
    link $((nodes + 1 + s)) "${p}c$s" "${client_delays[$((s - 1))]}"
done
cloud_ip=10.78.1.2

ip netns exec "${p}cloud" "$FOG_BIN/fog-test-origin" --dir "$work/origin" --listen "$cloud_ip:0" \
    2> "$work/origin.log" & pids+=($!)
server_pids+=($!)
origin=$(wait_listening "$work/origin.log")
ip netns exec "${p}cloud" "$FOG_BIN/fog-tracker" --listen "$cloud_ip:0" --data-dir "$work/tracker" \
    --origin "http://$origin/" --heartbeat-secs 1 2> "$work/tracker.log" & pids+=($!)
server_pids+=($!)
tracker="http://$(wait_listening "$work/tracker.log")"
for i in $(seq 1 "$nodes"); do
    ip netns exec "${p}n$i" "$FOG_BIN/fog-node" --tracker "$tracker" --listen 0.0.0.0:7701 \
        --status-listen 127.0.0.1:7702 --data-dir "$work/node$i" --cache-size 4GiB "${node_flags[@]}" \
        2> "$work/node$i.log" & pids+=($!)
    node_pids+=($!)
    wait_listening "$work/node$i.log" >/dev/null
done
in_cloud() { ip netns exec "${p}cloud" "$@"; }
healthy() { in_cloud curl -fsS "$tracker/v1/stats" | jq -r .nodes_healthy; }
for _ in $(seq 1 300); do [ "$(healthy)" = "$nodes" ] && break; sleep 0.2; done
[ "$(healthy)" = "$nodes" ] || { log "error: $(healthy) of $nodes nodes healthy"; exit 1; }
node_status() { ip netns exec "${p}n$1" curl -fsS http://127.0.0.1:7702/status; }
# A fog that has been running: every node in the overlay with every other, with measured RTTs.
meshed() {
    local i
    for i in $(seq 1 "$nodes"); do
        [ "$(node_status "$i" | jq '[.overlay.peers, (.overlay.rtt | length)] | min')" = $((nodes - 1)) ] || return 1
    done
}
for _ in $(seq 1 60); do meshed && break; sleep 0.5; done
meshed || log "warning: the overlay is not a full mesh with RTTs after 30 s; going on"
node_ids=()
for i in $(seq 1 "$nodes"); do node_ids+=("$(node_status "$i" | jq -r .node_id)"); done

# One proxy per fog viewer (index 0..players-1 for VOD, players.. for live), the v-th viewer of a stream at
# client site v % sites + 1; each proxy answers a playlist first (it has the tracker's origin list, as in an
# app whose proxy runs before the viewer presses play).
site_of() { echo $(($1 % sites + 1)); }
proxies=()
for v in $(seq 0 $((2 * players - 1))); do
    ns="${p}c$(site_of $((v % players)))"
    ip netns exec "$ns" "$FOG_BIN/fog" proxy --tracker "$tracker" --listen 127.0.0.1:0 "${proxy_flags[@]}" \
        2> "$work/proxy$v.log" & pids+=($!)
    proxy_pids+=($!)
    proxies+=("$(wait_listening "$work/proxy$v.log")")
    ip netns exec "$ns" curl -fsS -o /dev/null "$("$FOG_BIN/fog" url "http://$origin/warmup.m3u8" --proxy "${proxies[-1]}")"
done
log "lab up: origin $origin, tracker $tracker, $nodes nodes healthy, $((2 * players)) proxies"

# proxy_stats FIRST COUNT: the /stats of proxies FIRST.. as one JSON array.
proxy_stats() {
    local v
    for v in $(seq "$1" $(($1 + $2 - 1))); do
        ip netns exec "${p}c$(site_of $((v % players)))" curl -fsS "http://${proxies[$v]}/stats"
    done | jq -s .
}
origin_stats() { in_cloud curl -fsS "http://$origin/__fog_test/stats"; }
# spec STREAM FIRST_PROXY DIRECT_PATH FOG_PATH: the players of one stream, pairs starting together.
spec() {
    local v
    for v in $(seq 0 $((players - 1))); do
        local ns="${p}c$(site_of "$v")" start
        start=$(awk -v v="$v" -v g="$stagger" 'BEGIN { print v * g }')
        jq -nc --arg name "$1-direct-$v" --arg group "$1 direct" --arg ns "$ns" --argjson start "$start" \
            --arg url "http://$origin/$3" '{name: $name, group: $group, ns: $ns, url: $url, start: $start}'
        jq -nc --arg name "$1-fog-$v" --arg group "$1 fog" --arg ns "$ns" --argjson start "$start" \
            --arg url "$("$FOG_BIN/fog" url "http://$origin/$4" --proxy "${proxies[$(($2 + v))]}")" \
            '{name: $name, group: $group, ns: $ns, url: $url, start: $start}'
    done | jq -s .
}
# CPU seconds (user+system) of processes, from /proc/PID/stat (clock ticks of 1/100 s).
cpu_seconds() {
    local pid
    for pid in "$@"; do awk '{ sub(/^.*\) /, ""); print ($12 + $13) / 100 }' "/proc/$pid/stat"; done |
        awk '{ t += $1 } END { print t + 0 }'
}
# The machine's busy CPU seconds, all processes (other work on a shared machine included).
busy_seconds() { awk '/^cpu / { print ($2 + $3 + $4 + $7 + $8 + $9) / 100 }' /proc/stat; }
cpu_snapshot() {
    jq -n --argjson busy "$(busy_seconds)" --argjson nodes "$(cpu_seconds "${node_pids[@]}")" \
        --argjson proxies "$(cpu_seconds "${proxy_pids[@]}")" --argjson wires "$(cpu_seconds "${wire_pids[@]}")" \
        --argjson servers "$(cpu_seconds "${server_pids[@]}")" --argjson at "$EPOCHREALTIME" \
        '{at: $at, busy: $busy, nodes: $nodes, proxies: $proxies, delay_lines: $wires, origin_tracker: $servers}'
}
# uplinks: per node, the bytes its uplink sent and the packets its queue dropped so far ("NODE SENT DROPPED").
uplinks() {
    local i
    for i in $(seq 1 "$nodes"); do
        ip netns exec "${p}n$i" tc -s qdisc show dev "${p}e$((i + 1))" |
            awk -v i="$i" '/Sent/ { gsub(/[(),]/, ""); print i, $2, $7; exit }'
    done
}
# phase STREAM FIRST_PROXY DIRECT_PATH FOG_PATH: runs the players; leaves $work/STREAM.{jsonl,before,after}.
phase() {
    uplinks > "$work/$1.uplinks-before"
    spec "$1" "$2" "$3" "$4" > "$work/$1.spec.json"
    jq -n --argjson origin "$(origin_stats)" --argjson proxies "$(proxy_stats "$2" "$players")" \
        --argjson cpu "$(cpu_snapshot)" '{origin: $origin, proxies: $proxies, cpu: $cpu}' > "$work/$1.before.json"
    mkdir -p "$work/$1.players"
    nice -n -5 python3 scripts/bench/qoe/players.py run "$work/$1.spec.json" "$work/$1.jsonl" "$watch" \
        "$work/$1.players" > "$work/$1.players-cpu.json"
    sleep 2 # fills and ingests of the last segments asked for
    jq -n --argjson origin "$(origin_stats)" --argjson proxies "$(proxy_stats "$2" "$players")" \
        --argjson cpu "$(cpu_snapshot)" --slurpfile players "$work/$1.players-cpu.json" \
        '{origin: $origin, proxies: $proxies, cpu: ($cpu + $players[0])}' > "$work/$1.after.json"
    uplinks > "$work/$1.uplinks-after"
}

if [ -n "$warm_vod" ]; then
    log "warming the fog with the VOD title (each segment fetched once, 4 at a time)"
    ls "$work/origin/vod-fog" | grep '\.ts$' | xargs -P 4 -I{} ip netns exec "${p}c1" "$FOG_BIN/fog" get \
        --tracker "$tracker" "http://$origin/vod-fog/{}" > /dev/null 2>> "$work/warm.log"
    sleep 2 # the nodes' last fills
fi
log "VOD: $players pairs of players, ${stagger} s apart, each watching ${watch} s (~$(awk -v n="$players" -v g="$stagger" -v w="$watch" 'BEGIN { printf "%d", g * (n - 1) + w + 5 }') s)"
phase vod 0 vod-direct/index.m3u8 vod-fog/index.m3u8

log "live: publishing the channel, then $players pairs of players"
python3 scripts/bench/qoe/live.py "$work/live-source/index.m3u8" 6 3 "$work/origin/live-direct" "$work/origin/live-fog" \
    > "$work/live.out" & pids+=($!)
live_pid=$!
for _ in $(seq 1 100); do grep -q ready "$work/live.out" 2>/dev/null && break; sleep 0.05; done
phase live "$players" live-direct/index.m3u8 live-fog/index.m3u8
kill "$live_pid" 2>/dev/null || true

# The report: players' QoE per group, and bytes per way from the proxies' and the origin's counters.
python3 scripts/bench/qoe/players.py report "$work/vod.jsonl" "$work/live.jsonl" > "$work/qoe.json"
for stream in vod live; do
    jq -n --arg stream "$stream" --slurpfile before "$work/$stream.before.json" --slurpfile after "$work/$stream.after.json" '
        def origin_bytes($s; $prefix): [$s.origin.per_path | to_entries[] | select(.key | startswith($prefix)) | .value.bytes] | add // 0;
        def sum($s; f): [$s.proxies[] | f] | add // 0;
        $before[0] as $b | $after[0] as $a
        | {stream: $stream,
           direct_origin: (origin_bytes($a; "/\($stream)-direct/") - origin_bytes($b; "/\($stream)-direct/")),
           fog_origin: (origin_bytes($a; "/\($stream)-fog/") - origin_bytes($b; "/\($stream)-fog/")),
           fog: (sum($a; .fog_bytes) - sum($b; .fog_bytes)),
           proxy_origin: (sum($a; .origin_bytes) - sum($b; .origin_bytes)),
           passthrough: (sum($a; .passthrough_bytes) - sum($b; .passthrough_bytes)),
           fallbacks: ([$a.proxies[].fallbacks | to_entries[]] | group_by(.key) | map({(.[0].key): (map(.value) | add)}) | add // {}),
           passthrough_reasons: ([$a.proxies[].passthrough_reasons | to_entries[]] | group_by(.key) | map({(.[0].key): (map(.value) | add)}) | add // {}),
           prefetch_hits: sum($a; .prefetch_hits),
           cpu_s: ($a.cpu | with_entries(.value -= ($b.cpu[.key] // 0)) | map_values(. * 10 | round / 10)),
           by_node: ([$a.proxies[].nodes | to_entries[]] | group_by(.key) | map({(.[0].key): (map(.value.bytes) | add)}) | add // {})}'
done | jq -s . > "$work/bytes.json"
for stream in vod live; do
    echo "$stream: $(jq -c --arg s "$stream" '.[] | select(.stream == $s) | del(.by_node, .stream, .cpu_s)' "$work/bytes.json")"
    jq -r --arg s "$stream" --arg cores "$(nproc)" '.[] | select(.stream == $s) | .cpu_s
        | "  CPU over \(.at) s: the machine \(.busy / .at / ($cores | tonumber) * 100 | round) % busy (\(.busy) s, other work included);"
          + " nodes \(.nodes) s, proxies \(.proxies) s, delay lines \(.delay_lines) s, origin + tracker \(.origin_tracker) s,"
          + " players \(.players_cpu_s) s, their runner \(.runner_cpu_s) s"' "$work/bytes.json"
    for i in $(seq 1 "$nodes"); do
        read -r _ sent0 dropped0 <<<"$(sed -n "${i}p" "$work/$stream.uplinks-before")"
        read -r _ sent1 dropped1 <<<"$(sed -n "${i}p" "$work/$stream.uplinks-after")"
        printf '  node %d (%s ms): %s bytes to the %s players; its uplink sent %s bytes, dropped %s packets\n' \
            "$i" "${node_delays[$((i - 1))]}" \
            "$(jq -r --arg s "$stream" --arg id "${node_ids[$((i - 1))]}" '.[] | select(.stream == $s) | .by_node[$id] // 0' "$work/bytes.json")" \
            "$stream" $((sent1 - sent0)) $((dropped1 - dropped0))
    done
done
for f in "$work"/vod.jsonl "$work"/live.jsonl; do
    jq -r 'select(.complete | not) | "incomplete: \(.name) media \(.media_s) s, exit \(.exit), skipped \(.skipped)"' "$f"
done
echo "players' QoE: $(jq -c . "$work/qoe.json")"

echo
echo "$nodes nodes (uplinks $uplink, one-way ${node_ms// /, } ms), $sites client sites (${client_ms// /, } ms), origin and tracker at $cloud_ms ms;" \
    "H.264 + AAC at $bitrate, ${segment_secs} s segments; $players players per row, ${stagger} s apart, ${watch} s each;" \
    "fog cold at the start${warm_vod:+ (VOD warmed by one fetch of each segment first)}${proxy_flags[*]:+; fog proxy ${proxy_flags[*]}}; $(nproc) cores."
echo
echo "| stream, way | players complete | startup p50 / p95 / max | rebuffer ratio | players stalled (longest lag) | segments skipped | MB delivered | from the fog | origin MB | origin offload |"
echo "|---|---|---|---|---|---|---|---|---|---|"
jq -r --slurpfile bytes "$work/bytes.json" '
    def s: if . == null then "—" else (. * 100 | round / 100 | tostring) + " s" end;
    def pct: if . == null then "—" else (. * 1000 | round / 10 | tostring) + " %" end;
    def mb: . / 1e6 * 10 | round / 10 | tostring;
    . as $q
    | ["vod", "live"][] as $stream
    | ($bytes[0][] | select(.stream == $stream)) as $b
    | ("direct", "fog") as $way
    | $q["\($stream) \($way)"] as $g
    | (if $way == "direct" then $b.direct_origin else $b.fog + $b.proxy_origin + $b.passthrough end) as $delivered
    | (if $way == "direct" then $b.direct_origin else $b.fog_origin end) as $origin
    | "| \(if $stream == "vod" then "VOD" else "live" end), \(if $way == "direct" then "origin direct" else "fog proxy" end) | \($g.complete)/\($g.players) | \($g.startup_p50_s | s) / \($g.startup_p95_s | s) / \($g.startup_max_s | s) | \($g.rebuffer_ratio | pct) | \($g.players_stalled) (\($g.max_lag_s | s)) | \($g.skipped_segments) | \($delivered | mb) | \(if $way == "direct" then "—" elif $delivered > 0 then ($b.fog / $delivered | pct) else "—" end) | \($origin | mb) | \(if $way == "direct" then "—" elif $b.direct_origin > 0 then (1 - $origin / $b.direct_origin | pct) else "—" end) |"
' "$work/qoe.json"
log "done in ${SECONDS} s"
