// The worker's configuration travels in its script URL's query (`fog-sw.js?tracker=…&origin=…`): a service
// worker is stopped when idle and started again for the next request, and its script URL is the one thing
// it always has when it starts. Changing the configuration changes the URL, which browsers treat as an
// update of the worker.

export interface WorkerConfig {
  /** The tracker's base URL. */
  tracker: string;
  /** URL prefixes whose GETs the worker serves through the fog, e.g. `https://videos.example.com/vod/`. */
  origins: string[];
}

/** Most prefixes one worker serves: each request is checked against all of them. */
export const MAX_ORIGINS = 32;

/** An absolute http(s) URL, or throws saying what `what` is wrong. */
function httpUrl(value: string, what: string): URL {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new Error(`fogcdn: ${what} ${JSON.stringify(value)} is not an absolute URL`);
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    throw new Error(`fogcdn: ${what} ${JSON.stringify(value)} is not an http(s) URL`);
  }
  return url;
}

/** Checks `config` and writes it into the query of `script` (resolved against `base`). */
export function workerUrl(script: string, base: string, config: WorkerConfig): string {
  const url = new URL(script, base);
  httpUrl(config.tracker, "tracker");
  if (config.origins.length === 0 || config.origins.length > MAX_ORIGINS) {
    throw new Error(`fogcdn: give 1 to ${MAX_ORIGINS} origin prefixes, not ${config.origins.length}`);
  }
  url.searchParams.set("tracker", config.tracker);
  for (const o of config.origins) url.searchParams.append("origin", httpUrl(o, "origin prefix").href);
  return url.href;
}

/** The configuration in the worker's own URL (`self.location`). */
export function readWorkerUrl(href: string): WorkerConfig {
  const params = new URL(href).searchParams;
  const tracker = params.get("tracker");
  if (tracker === null) throw new Error("fogcdn: the worker's URL has no tracker= parameter");
  httpUrl(tracker, "tracker");
  const origins = params.getAll("origin").map((o) => httpUrl(o, "origin prefix").href);
  if (origins.length === 0 || origins.length > MAX_ORIGINS) {
    throw new Error(`fogcdn: the worker's URL names ${origins.length} origin prefixes (1 to ${MAX_ORIGINS})`);
  }
  return { tracker, origins };
}

/** Whether the worker serves `url` through the fog: it starts with one of the prefixes. */
export function servedByFog(url: string, config: WorkerConfig): boolean {
  return config.origins.some((prefix) => url.startsWith(prefix));
}
