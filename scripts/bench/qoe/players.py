#!/usr/bin/env python3
"""Players for scripts/bench/qoe.sh: ffmpeg reading HLS in real time, one process per viewer.

run SPEC OUT WATCH_SECS LOG_DIR: SPEC is a JSON list of players ({"name", "group", "ns", "url", "start"}: the
network namespace it runs in, the playlist URL, seconds after the run starts; its ffmpeg log goes to LOG_DIR).
Each player is
    ip netns exec NS ffmpeg -re -i URL -t WATCH -map 0 -c copy -f null - -progress pipe:1 -stats_period 0.1
(stream copy: no decoding, so 40 players fit on a 2-core machine; a frame counts once it is demuxed). This
process reads every player's progress as it comes and stamps each block with its own monotonic clock (it
runs at a higher priority than the players and the fog, so the stamps are not late under load). One JSON
line per player goes to OUT:
  startup_s  player start (process spawned) to the first progress block with media time > 0;
  media_s    media time played (out_time of the last block; WATCH for a complete view);
  max_lag_s  how far the playhead fell behind real time: the largest (stamp - media time) over the view
             above its smallest value. ffmpeg -re never reads ahead of its own clock and catches up after
             a stall, so a player playing this read curve at 1x pauses exactly this long in all (a pause
             leaves the viewer that much behind; catching up refills its buffer);
  stall_s    rebuffering: max_lag_s, or 0 when below STALL_FLOOR_S (see there);
  skipped    segments ffmpeg skipped (failed to open, or expired from a live playlist): their media time
             counts as played by ffmpeg but was never shown, so they are reported separately;
  exit, complete (media_s within 1 s of WATCH).
Then prints the CPU seconds the players (and this process) used, as JSON.
report OUT...: prints per-group summaries as JSON (count, complete, startup p50/p95/max, rebuffer ratio =
stalled time / (stalled + played time), players that stalled, skipped segments).
"""

import json
import math
import os
import re
import resource
import selectors
import subprocess
import sys
import time

# Lag a viewer does not see. ffmpeg -re reads nothing ahead: it asks for each segment (live: first reloads the
# playlist) only once it has read the last, so every boundary costs it a round trip or two (up to ~0.35 s
# straight from the origin here), which a player reading ahead never shows; the stamps themselves jitter by
# ~0.05 s. Below this a player is counted as not stalled.
STALL_FLOOR_S = 0.5
# A player that has not finished this long after its view should have is stopped and reported incomplete.
OVERTIME_S = 90
SKIP_PATTERNS = re.compile(r"Failed to open segment|skipping \d+ segments? ahead|expired from playlists")


def ffmpeg_cmd(ns, url, watch):
    return [
        "ip", "netns", "exec", ns,
        "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "warning", "-stats_period", "0.1",
        "-re", "-i", url, "-t", str(watch), "-map", "0", "-c", "copy", "-f", "null", "-",
        "-progress", "pipe:1",
    ]


class Player:
    def __init__(self, spec, watch, logdir):
        self.spec = spec
        self.watch = watch
        self.log_path = os.path.join(logdir, spec["name"] + ".log")
        self.proc = None
        self.spawned = None
        self.buf = b""
        self.block = {}
        self.first_media = None  # stamp of the first block with media time > 0
        self.min_offset = math.inf  # smallest (stamp - media time)
        self.max_offset = -math.inf
        self.media = 0.0
        self.eof = False

    def start(self, selector):
        log = open(self.log_path, "wb")
        self.spawned = time.monotonic()
        # Players run at the default priority, like the fog's processes and the origin, not at this one's.
        self.proc = subprocess.Popen(ffmpeg_cmd(self.spec["ns"], self.spec["url"], self.watch),
                                     stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                     preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 0))
        log.close()
        os.set_blocking(self.proc.stdout.fileno(), False)
        selector.register(self.proc.stdout, selectors.EVENT_READ, self)

    def feed(self, data, stamp):
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            key, _, value = line.decode(errors="replace").strip().partition("=")
            if key != "progress":
                self.block[key] = value
                continue
            if value == "end":
                # The summary ffmpeg prints once WATCH is reached, after flushing: not a playback moment.
                self.block = {}
                continue
            try:
                media = int(self.block.get("out_time_us", "")) / 1e6
            except ValueError:
                media = 0.0
            self.block = {}
            # Blocks without new media are ffmpeg waiting for its -re clock or finishing after WATCH; a read
            # that blocks prints nothing, so a pause shows as the next block arriving late.
            if media <= self.media:
                continue
            if self.first_media is None:
                self.first_media = stamp
            self.media = media
            offset = stamp - media
            self.min_offset = min(self.min_offset, offset)
            self.max_offset = max(self.max_offset, offset)

    def result(self):
        with open(self.log_path, errors="replace") as f:
            skipped = len(SKIP_PATTERNS.findall(f.read()))
        started = self.first_media is not None
        lag = self.max_offset - self.min_offset if started else None
        return {
            **{k: self.spec[k] for k in ("name", "group", "ns", "url", "start")},
            "startup_s": round(self.first_media - self.spawned, 3) if started else None,
            "media_s": round(self.media, 3),
            "stall_s": round(lag if lag >= STALL_FLOOR_S else 0.0, 3) if started else None,
            "max_lag_s": round(lag, 3) if started else None,
            "skipped": skipped,
            "exit": self.proc.returncode,
            "complete": started and self.media >= self.watch - 1 and self.proc.returncode == 0,
        }


def run(spec_path, out_path, watch, logdir):
    with open(spec_path) as f:
        players = [Player(s, watch, logdir) for s in json.load(f)]
    players.sort(key=lambda p: p.spec["start"])
    selector = selectors.DefaultSelector()
    begin = time.monotonic()
    pending = list(players)
    running = []
    while pending or running:
        now = time.monotonic()
        while pending and begin + pending[0].spec["start"] <= now:
            player = pending.pop(0)
            player.start(selector)
            running.append(player)
        timeout = max(0.0, begin + pending[0].spec["start"] - now) if pending else 0.5
        for key, _ in selector.select(min(timeout, 0.5)):
            player = key.data
            stamp = time.monotonic()
            try:
                data = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if data:
                player.feed(data, stamp)
            else:
                selector.unregister(key.fileobj)
                player.eof = True
        for player in list(running):
            if player.proc.poll() is None and time.monotonic() - player.spawned > watch + OVERTIME_S:
                player.proc.kill()
            if player.eof and player.proc.poll() is not None:
                player.proc.stdout.close()
                running.remove(player)
                with open(out_path, "a") as out:
                    out.write(json.dumps(player.result()) + "\n")
    players, own = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"players_cpu_s": round(players.ru_utime + players.ru_stime, 2),
                      "runner_cpu_s": round(own.ru_utime + own.ru_stime, 2)}))


def nearest_rank(values, q):
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)]


def report(paths):
    groups = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                groups.setdefault(r["group"], []).append(r)
    summary = {}
    for group, rs in groups.items():
        started = [r for r in rs if r["startup_s"] is not None]
        startups = [r["startup_s"] for r in started]
        stalled = sum(r["stall_s"] for r in started)
        played = sum(r["media_s"] for r in started)
        summary[group] = {
            "players": len(rs),
            "complete": sum(1 for r in rs if r["complete"]),
            "startup_p50_s": nearest_rank(startups, 0.5) if startups else None,
            "startup_p95_s": nearest_rank(startups, 0.95) if startups else None,
            "startup_max_s": max(startups) if startups else None,
            "stalled_s": round(stalled, 3),
            "rebuffer_ratio": stalled / (stalled + played) if played else None,
            "players_stalled": sum(1 for r in started if r["stall_s"] > 0),
            "max_lag_s": max((r["max_lag_s"] for r in started), default=None),
            "skipped_segments": sum(r["skipped"] for r in rs),
        }
    json.dump(summary, sys.stdout, indent=1, sort_keys=True)
    print()


def main(args):
    if len(args) == 5 and args[0] == "run":
        run(args[1], args[2], float(args[3]), args[4])
    elif len(args) >= 2 and args[0] == "report":
        report(args[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
