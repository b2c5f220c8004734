// @fogcdn/core: fogcdn for web pages. See README.md.

export { FogClient, type FetchOptions, type FogObject, type FogOptions, type NodeStats, type Stats } from "./client.js";
export { FogError } from "./errors.js";
export type { CurrentTracker } from "./trackers.js";
export type { Manifest, NodeContact, Resolve } from "./manifest.js";
export { fogDisabled } from "./sessions.js";
export { blake3Hex } from "./verify.js";
