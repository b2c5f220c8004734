// What the page and the worker say to each other (postMessage).

import type { Stats } from "@fogcdn/core";

/** Page → worker. `fog-stats` carries a MessagePort for the answer. */
export type ToWorker = { type: "fog-stats" } | { type: "fog-claim" };

/** The worker's stats: the fog client's (all pages the worker serves, since it started) and its own. */
export interface WorkerStats extends Stats {
  /** Responses the worker answered through the fog, and the bytes it handed players in them. */
  served: { responses: number; bytes: number };
  /** Requests under the prefixes that went to the network because the fog could not serve them. */
  networkResponses: number;
}
