// The service worker: answers the page's GETs under the configured prefixes (a `<video>`'s `Range`
// requests, video.js's, any player's) from the fog, streamed chunk by chunk as chunks verify, and passes
// everything else to the network untouched. A request the fog cannot start (tracker down, fog off, first
// chunk neither from a node nor the origin) goes to the network as if the worker were not there.

import { FogClient, type FogObject } from "@fogcdn/core";

import { readWorkerUrl, servedByFog, type WorkerConfig } from "./config.js";
import type { ToWorker, WorkerStats } from "./messages.js";
import { parseRange, planRange, responseHead } from "./range.js";

const worker = globalThis as unknown as ServiceWorkerGlobalScope;

/** Reports to the tracker at most this often (the native proxy's pace). */
const REPORT_EVERY_MS = 15_000;

const config: WorkerConfig | undefined = (() => {
  try {
    return readWorkerUrl(worker.location.href);
  } catch (e) {
    // A worker that cannot serve must not break the site: it lets every request through.
    console.error(`${e}; serving nothing through the fog`);
    return undefined;
  }
})();
const fog = config && new FogClient({ tracker: config.tracker });
const own = { responses: 0, bytes: 0, network: 0 };

worker.addEventListener("install", (event) => event.waitUntil(worker.skipWaiting()));
// Pages opened before the worker was active are served from now on, not from their next load.
worker.addEventListener("activate", (event) => event.waitUntil(worker.clients.claim()));

worker.addEventListener("message", (event) => {
  const msg = event.data as ToWorker | undefined;
  if (msg?.type === "fog-stats" && fog) {
    const stats: WorkerStats = {
      ...fog.stats(),
      served: { responses: own.responses, bytes: own.bytes },
      networkResponses: own.network,
    };
    event.ports[0]?.postMessage(stats);
  } else if (msg?.type === "fog-claim") {
    // A page loaded bypassing the worker (a hard reload) asks to be served.
    event.waitUntil(worker.clients.claim());
  }
});

worker.addEventListener("fetch", (event) => {
  const req = event.request;
  if (!config || !fog || req.method !== "GET" || req.mode === "navigate" || !servedByFog(req.url, config)) return;
  let finished: () => void = () => undefined;
  const done = new Promise<void>((resolve) => (finished = resolve));
  event.respondWith(serve(fog, req, finished));
  // Alive until the body is sent (or dropped), and the report due after it.
  event.waitUntil(done.then(reportSoon));
});

async function serve(fog: FogClient, req: Request, finished: () => void): Promise<Response> {
  const asked = parseRange(req.headers.get("range"));
  let object: FogObject;
  try {
    object = await fog.open(req.url, asked.kind === "from" ? asked.start : 0);
  } catch (e) {
    return network(req, `the fog cannot serve it: ${e}`, finished);
  }
  const plan = planRange(asked, object.size);
  const head = responseHead(plan, object);
  if (plan === "unsatisfiable") {
    finished();
    return new Response(null, head);
  }
  const chunks = object.stream(plan).getReader();
  // The answer starts only once its first bytes verified: until then the network can still take over.
  let first: ReadableStreamReadResult<Uint8Array> | undefined;
  try {
    first = await chunks.read();
  } catch (e) {
    return network(req, `its first chunk failed: ${e}`, finished);
  }
  own.responses++;
  // A seek makes the player drop this request for a new range: stop fetching for this one.
  req.signal.addEventListener("abort", () => chunks.cancel().catch(() => undefined), { once: true });
  const body = new ReadableStream<Uint8Array>(
    {
      pull: async (controller) => {
        let piece: ReadableStreamReadResult<Uint8Array>;
        try {
          piece = first ?? (await chunks.read());
        } catch (e) {
          finished();
          throw e;
        }
        first = undefined;
        if (piece.done) {
          finished();
          controller.close();
          return;
        }
        own.bytes += piece.value.length;
        controller.enqueue(piece.value);
      },
      cancel: (reason) => {
        finished();
        return chunks.cancel(reason);
      },
    },
    // Read from the fog only as fast as the player reads: the fog stream bounds its own look-ahead.
    { highWaterMark: 0 },
  );
  return new Response(body, head);
}

/** `req` from the network, as if the worker were not there. */
async function network(req: Request, why: string, finished: () => void): Promise<Response> {
  console.warn(`fogcdn: ${req.url} from the network: ${why}`);
  own.network++;
  try {
    return await fetch(req);
  } finally {
    finished();
  }
}

let lastReport = -Infinity;
let nextReport: Promise<void> | undefined;

/** Sends the tracker a report once `REPORT_EVERY_MS` has passed since the last (one at a time). */
function reportSoon(): Promise<void> {
  nextReport ??= (async () => {
    const wait = lastReport + REPORT_EVERY_MS - performance.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    lastReport = performance.now();
    await fog?.report().catch((e) => console.warn(`fogcdn: report to the tracker failed: ${e}`));
    nextReport = undefined;
  })();
  return nextReport;
}
