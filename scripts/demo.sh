#!/usr/bin/env bash
# The fogcdn demo: a local origin with sample content, a tracker and 3 fog nodes on 127.0.0.1. Fetches the
# content through the fog twice and prints the fog share; with ffmpeg, plays an HLS stream through the player
# proxy, and with npm also serves a page that plays it in a browser through the fog (hls.js, WebTransport)
# with live offload and per-node bytes, printing its URL. Then leaves everything running until Ctrl-C.
#   scripts/demo.sh [--once]     --once: exit after printing
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
once=false
[ "${1:-}" = "--once" ] && once=true

ensure_build_deps
build_release

work=$(mktemp -d -t fogcdn-demo.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    log "demo stopped; logs and data were in $work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$work/origin"
head -c $((32 * 1024 * 1024)) /dev/urandom > "$work/origin/video.bin"
log "sample content: $work/origin/video.bin (32 MiB)"

"$FOG_BIN/fog-test-origin" --dir "$work/origin" --listen 127.0.0.1:0 2> "$work/origin.log" & pids+=($!)
origin=$(wait_listening "$work/origin.log")

# The origin's site is also the demo page's, registered so its pages may use the fog; probes every 2 s let
# pages have the nodes within seconds (the tracker gives pages only nodes it opened WebTransport to).
"$FOG_BIN/fog-tracker" --listen 127.0.0.1:0 --data-dir "$work/tracker" --origin "http://$origin/" \
    --web-origin "http://$origin" --probe-secs 2 --heartbeat-secs 1 2> "$work/tracker.log" & pids+=($!)
tracker="http://$(wait_listening "$work/tracker.log")"

for i in 1 2 3; do
    "$FOG_BIN/fog-node" --tracker "$tracker" --listen 127.0.0.1:0 --status-listen 127.0.0.1:0 --data-dir "$work/node$i" \
        --cache-size 256MiB 2> "$work/node$i.log" & pids+=($!)
    wait_listening "$work/node$i.log" >/dev/null
done
for _ in $(seq 1 100); do
    healthy=$(curl -fsS "$tracker/v1/stats" | jq -r .nodes_healthy)
    [ "$healthy" = 3 ] && break
    sleep 0.2
done
log "origin http://$origin/  tracker $tracker  nodes healthy: $healthy"

url="http://$origin/video.bin"
for round in first second; do
    "$FOG_BIN/fog" get --tracker "$tracker" "$url" -o "$work/$round.bin" 2> "$work/$round.fetch.log" \
        || { cat "$work/$round.fetch.log" >&2; exit 1; }
    cmp -s "$work/$round.bin" "$work/origin/video.bin" || { log "error: $round fetch differs from the origin"; exit 1; }
    line=$(grep 'fog_bytes=' "$work/$round.fetch.log")
    share=$(sed -n 's/.*fog_share=\([^ ]*\).*/\1/p' <<<"$line")
    echo "$round fetch: byte-identical, fog share $share   ($line)"
done
sleep 1.5 # one heartbeat, so the tracker has the nodes' counters
stats=$(curl -fsS "$tracker/v1/stats")
echo "nodes served $(jq .bytes_served <<<"$stats") bytes and pulled $(jq .origin_fill_bytes <<<"$stats") from the origin:"
echo "(the tracker also read the object once to ingest it.) The first fetch filled the fog, each chunk pulled once; the second came from node caches alone."
echo "tracker stats: $stats"

# A video stream through the local player proxy, when ffmpeg is there to make one.
hls_url=""
if command -v ffmpeg >/dev/null; then
    mkdir -p "$work/origin/hls"
    # 4:2:0, as web video is: from testsrc's RGB x264 would pick 4:4:4, which Firefox's MSE refuses.
    ffmpeg -hide_banner -loglevel error -f lavfi -i testsrc=duration=60:size=640x360:rate=25 \
        -f lavfi -i sine=frequency=440:duration=60 -c:v libx264 -preset ultrafast -pix_fmt yuv420p -g 50 -c:a aac \
        -f hls -hls_time 4 -hls_playlist_type vod -hls_segment_filename "$work/origin/hls/seg_%03d.ts" \
        "$work/origin/hls/index.m3u8"
    "$FOG_BIN/fog" proxy --tracker "$tracker" --listen 127.0.0.1:0 2> "$work/proxy.log" & pids+=($!)
    proxy=$(wait_listening "$work/proxy.log")
    hls_url=$("$FOG_BIN/fog" url "http://$origin/hls/index.m3u8" --proxy "$proxy")
    for round in first second; do
        ffmpeg -hide_banner -loglevel error -i "$hls_url" -c copy -f null - \
            || { log "error: ffmpeg could not play $hls_url"; exit 1; }
        pstats=$(curl -fsS "http://$proxy/stats")
        echo "HLS $round play through the proxy: offload so far $(jq '.offload * 1000 | round / 10' <<<"$pstats") %," \
            "origin fallback $(jq .origin_bytes <<<"$pstats") B, $(jq .prefetch_hits <<<"$pstats") segments ready from prefetch"
    done
    echo "open the stream in any player:  mpv $hls_url   (or vlc / ffplay)"
else
    echo "(install ffmpeg to also see a video stream through the player proxy)"
fi

# The stream in a browser: a page of the origin's site (web/demo/index.html) plays it with hls.js, its
# segments from the nodes over WebTransport (@fogcdn/hlsjs), showing the offload and each node's bytes live.
page_url=""
if [ -n "$hls_url" ] && command -v npm >/dev/null; then
    log "building the web packages (web/: @fogcdn/core, @fogcdn/hlsjs; log: $work/web-build.log)"
    if (cd web && { [ -d node_modules ] || npm ci --ignore-scripts --no-audit --no-fund; } \
        && npm run build --workspace packages/core --workspace packages/hlsjs) > "$work/web-build.log" 2>&1; then
        mkdir -p "$work/origin/demo"
        cp web/demo/index.html web/node_modules/hls.js/dist/hls.min.js web/packages/core/dist/fog-core.js \
            web/packages/hlsjs/dist/fog-hlsjs.js "$work/origin/demo/"
        page_url="http://$origin/demo/index.html?tracker=$tracker&src=http://$origin/hls/index.m3u8"
        web_nodes=0
        for _ in $(seq 1 100); do
            web_nodes=$(curl -fsS -H "Origin: http://$origin" --get --data-urlencode "url=http://$origin/hls/seg_000.ts" \
                "$tracker/v1/resolve" | jq '[.nodes[] | select(.web)] | length') || web_nodes=0
            [ "$web_nodes" = 3 ] && break
            sleep 0.2
        done
        echo "browser demo: pages get $web_nodes nodes over WebTransport; open $page_url"
    else
        log "warning: the web packages did not build (see $work/web-build.log): no browser demo"
    fi
else
    echo "(install ffmpeg and npm to also watch the stream in a browser through the fog)"
fi

if $once; then exit 0; fi
echo "running: tracker $tracker (dashboard: $tracker/), origin http://$origin/"
echo "try: $FOG_BIN/fog get --tracker $tracker $url -o /tmp/x"
[ -n "$hls_url" ] && echo "play: mpv $hls_url"
[ -n "$page_url" ] && echo "watch in a browser (Chromium or Firefox): $page_url"
echo "press Ctrl-C to stop"
while true; do sleep 3600; done
