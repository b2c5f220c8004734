// The page's side: registers the worker with its configuration and reads its stats.

import { workerUrl, type WorkerConfig } from "./config.js";
import type { ToWorker, WorkerStats } from "./messages.js";

export type { WorkerStats } from "./messages.js";

export interface RegisterOptions extends WorkerConfig {
  /** Where the site serves `fog-sw.js` (default `/fog-sw.js`); same origin as the page. */
  script?: string;
  /** The worker's scope (default: the script's folder); the page must be inside it. */
  scope?: string;
  /** How long to wait for the worker to take the page over (default 10 000 ms). */
  timeoutMs?: number;
}

/** Registers the fog's service worker and resolves once it serves this page: players given a URL under
 * `origins` from then on get it through the fog. Rejects where service workers are unavailable (not a
 * secure context, some private modes) or the worker does not start: players then read the origin as usual. */
export async function registerFogServiceWorker(options: RegisterOptions): Promise<ServiceWorkerRegistration> {
  const container = navigator.serviceWorker;
  if (!container) throw new Error("fogcdn: service workers are unavailable on this page");
  const url = workerUrl(options.script ?? "/fog-sw.js", location.href, options);
  const registration = await container.register(url, options.scope === undefined ? {} : { scope: options.scope });
  const serving = () => container.controller?.scriptURL === url;
  if (serving()) return registration;
  await new Promise<void>((resolve, reject) => {
    const check = () => {
      if (!serving()) return;
      clearTimeout(timer);
      container.removeEventListener("controllerchange", check);
      resolve();
    };
    const timer = setTimeout(() => {
      container.removeEventListener("controllerchange", check);
      reject(new Error(`fogcdn: the service worker did not take this page over in ${options.timeoutMs ?? 10_000} ms`));
    }, options.timeoutMs ?? 10_000);
    container.addEventListener("controllerchange", check);
    // A worker already active took over the pages open when it activated, not one loaded bypassing it.
    if (registration.active?.scriptURL === url) registration.active.postMessage({ type: "fog-claim" } satisfies ToWorker);
  });
  return registration;
}

/** The worker's stats (fog and origin bytes, offload, per node) for every page it served since it started. */
export function fogStats(timeoutMs = 5000): Promise<WorkerStats> {
  const worker = navigator.serviceWorker?.controller;
  if (!worker) return Promise.reject(new Error("fogcdn: no service worker serves this page"));
  const channel = new MessageChannel();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      channel.port1.close();
      reject(new Error(`fogcdn: the service worker did not answer in ${timeoutMs} ms`));
    }, timeoutMs);
    channel.port1.onmessage = (e: MessageEvent<WorkerStats>) => {
      clearTimeout(timer);
      channel.port1.close();
      resolve(e.data);
    };
    worker.postMessage({ type: "fog-stats" } satisfies ToWorker, [channel.port2]);
  });
}
