#!/usr/bin/env python3
"""A live HLS channel for scripts/bench/qoe.sh, published in real time from a pre-encoded stream.

Usage: live.py SOURCE_PLAYLIST WINDOW PREROLL DEST_DIR [DEST_DIR ...]

SOURCE_PLAYLIST is a VOD media playlist (ffmpeg -f hls) whose segments lie beside it. Each DEST_DIR gets the
same channel at the same moments (so players straight from the origin and through the fog see one live
edge): PREROLL segments at once (the channel has been on air), then each next segment when the one before
it has had its play time, as an encoder would publish it. A segment is hard-linked into place before the
playlist naming it is replaced (atomically, by rename); the playlist holds the last WINDOW segments, with
EXT-X-MEDIA-SEQUENCE counting the ones that slid out, and no EXT-X-ENDLIST until the source runs out.
Prints "ready" once the preroll is out, then one line per segment; runs until the source ends.
"""

import math
import os
import sys
import time


def read_source(path):
    segments, duration = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("#EXTINF:"):
                duration = float(line[len("#EXTINF:"):].split(",")[0])
            elif line and not line.startswith("#"):
                segments.append((line, duration))
    if not segments or any(d is None for _, d in segments):
        sys.exit(f"{path}: no segments with durations")
    return segments


def playlist(segments, first, last, ended):
    target = math.ceil(max(d for _, d in segments))
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{target}", f"#EXT-X-MEDIA-SEQUENCE:{first}"]
    for name, duration in segments[first:last + 1]:
        lines += [f"#EXTINF:{duration:.6f},", name]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def publish(source_dir, segments, k, window, dests):
    name = segments[k][0]
    ended = k == len(segments) - 1
    for dest in dests:
        target = os.path.join(dest, name)
        if not os.path.exists(target):
            os.link(os.path.join(source_dir, name), target)
        tmp = os.path.join(dest, ".index.m3u8.tmp")
        with open(tmp, "w") as f:
            f.write(playlist(segments, max(0, k - window + 1), k, ended))
        os.rename(tmp, os.path.join(dest, "index.m3u8"))


def main(args):
    if len(args) < 4:
        sys.exit(__doc__)
    source, window, preroll, dests = args[0], int(args[1]), int(args[2]), args[3:]
    source_dir = os.path.dirname(os.path.abspath(source))
    segments = read_source(source)
    if not 0 < preroll <= len(segments) or window < preroll:
        sys.exit("need 0 < PREROLL <= segments and WINDOW >= PREROLL")
    for dest in dests:
        os.makedirs(dest, exist_ok=True)
    for k in range(preroll):
        publish(source_dir, segments, k, window, dests)
    print("ready", flush=True)
    due = time.monotonic()
    for k in range(preroll, len(segments)):
        due += segments[k - 1][1]
        time.sleep(max(0.0, due - time.monotonic()))
        publish(source_dir, segments, k, window, dests)
        print(f"published {segments[k][0]} at {time.time():.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
