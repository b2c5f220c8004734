// Which of several tracker URLs to ask (a cell's replicas), by the same rules as the native clients
// (net/src/trackers.rs): stick to the URL that answered last; on no answer (a network error, a 5xx) try the
// next; a URL that did not answer is skipped for 1 s, doubling to 60 s while it keeps failing; never move on
// a definite answer (a 4xx, or the origin's failure relayed), which every replica would give.

import { FogError } from "./errors.js";

const FIRST_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 60_000;
/** Most URLs in one list, as the native clients take. */
const MAX_TRACKERS = 16;

/** The tracker requests go to now, its place in the list, and how many times that changed. */
export interface CurrentTracker {
  url: string;
  index: number;
  failovers: number;
}

/** `"https://a,https://b"` or `["https://a", "https://b"]` as base URLs (no trailing `/`). */
export function trackerList(tracker: string | string[]): string[] {
  const urls = (Array.isArray(tracker) ? tracker : tracker.split(","))
    .map((u) => u.trim().replace(/\/+$/, ""))
    .filter((u) => u !== "");
  if (urls.length === 0) throw new FogError("config", "no tracker URL given");
  if (urls.length > MAX_TRACKERS) throw new FogError("config", `at most ${MAX_TRACKERS} tracker URLs`);
  const bad = urls.find((u) => !/^https?:\/\//.test(u));
  if (bad !== undefined) throw new FogError("config", `${JSON.stringify(bad)} is not an http(s) URL`);
  return urls;
}

/** The failover policy over a fixed list of tracker URLs. Times are `performance.now()` milliseconds. */
export class Trackers {
  private currentIndex = 0;
  private failoverCount = 0;
  private readonly skipUntil: (number | undefined)[];
  private readonly nextBackoff: number[];

  constructor(readonly urls: string[]) {
    this.skipUntil = urls.map(() => undefined);
    this.nextBackoff = urls.map(() => FIRST_BACKOFF_MS);
  }

  get current(): CurrentTracker {
    return { url: this.urls[this.currentIndex], index: this.currentIndex, failovers: this.failoverCount };
  }

  /** The URLs (indices) to try for one request: the current one, then the others in list order, leaving
   * out those backing off; when every one is, only the one due first. */
  plan(now: number): number[] {
    const n = this.urls.length;
    const ring = Array.from({ length: n }, (_, k) => (this.currentIndex + k) % n);
    const ready = ring.filter((i) => (this.skipUntil[i] ?? -Infinity) <= now);
    if (ready.length > 0) return ready;
    return [ring.reduce((a, b) => ((this.skipUntil[b] ?? 0) < (this.skipUntil[a] ?? 0) ? b : a))];
  }

  /** Notes how a request to URL `i` went; true when an answer came from another URL than the current one. */
  record(i: number, answered: boolean, now: number): boolean {
    if (!answered) {
      const step = this.nextBackoff[i];
      this.nextBackoff[i] = Math.min(step * 2, MAX_BACKOFF_MS);
      this.skipUntil[i] = now + step * (0.5 + Math.random() / 2);
      return false;
    }
    this.skipUntil[i] = undefined;
    this.nextBackoff[i] = FIRST_BACKOFF_MS;
    if (i === this.currentIndex) return false;
    this.currentIndex = i;
    this.failoverCount += 1;
    return true;
  }

  /** `fetch(base + path)` at the planned URLs in turn until one answers. `repeatable`: the request may be
   * sent again after a network error, which a browser does not tell apart from one after it arrived (a
   * report may not: it would be counted twice); a 5xx is retried either way. */
  async fetch(path: string, init: RequestInit = {}, repeatable = true): Promise<Response> {
    let last: unknown;
    for (const i of this.plan(performance.now())) {
      let resp: Response;
      try {
        resp = await fetch(`${this.urls[i]}${path}`, init);
      } catch (e) {
        this.record(i, false, performance.now());
        if (!repeatable) throw e;
        last = e;
        continue;
      }
      if (resp.status >= 500 && !(await aboutOrigin(resp))) {
        this.record(i, false, performance.now());
        last = resp;
        continue;
      }
      this.record(i, true, performance.now());
      return resp;
    }
    if (last instanceof Response) return last;
    throw last;
  }
}

/** Whether a 5xx is the origin's failure relayed by the tracker (`502 origin_error`): an answer. */
async function aboutOrigin(resp: Response): Promise<boolean> {
  if (resp.status !== 502) return false;
  const body = await resp
    .clone()
    .json()
    .catch(() => ({}));
  return body?.error === "origin_error";
}
