// The loader against a stand-in FogClient and a stand-in hls.js default loader: what hls.js sees (data,
// stats, callbacks) for segments from the fog, ranges, hand-overs, aborts and timeouts.

import assert from "node:assert/strict";
import { test } from "node:test";

import type { FogObject } from "@fogcdn/core";
import type {
  FragmentLoaderContext,
  HlsConfig,
  Loader,
  LoaderCallbacks,
  LoaderConfiguration,
  LoaderResponse,
  LoaderStats,
} from "hls.js";

import { fogLoader, type FogSource } from "../src/loader.js";

const bytes = (n: number, seed = 1) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff);

/** A fog whose object is `content`, delivered in `chunk`-byte pieces, each only when `gate` allows. */
function fakeFog(content: Uint8Array, chunk: number, gate: () => Promise<void> = async () => undefined) {
  const calls = { open: [] as [string, number][], ranges: [] as { offset: number; length: number }[], cancelled: 0 };
  const fog: FogSource = {
    async open(url: string, from = 0): Promise<FogObject> {
      calls.open.push([url, from]);
      return {
        size: content.length,
        stream(range = { offset: 0, length: content.length }) {
          calls.ranges.push(range);
          let at = range.offset;
          const end = range.offset + range.length;
          return new ReadableStream<Uint8Array>(
            {
              async pull(c) {
                await gate();
                if (at >= end) return c.close();
                const next = Math.min(end, (Math.floor(at / chunk) + 1) * chunk);
                c.enqueue(content.slice(at, next));
                at = next;
              },
              cancel() {
                calls.cancelled++;
              },
            },
            { highWaterMark: 0 },
          );
        },
      };
    },
  };
  return { fog, calls };
}

/** hls.js's default loader, recording what reached it. */
class DefaultLoader implements Loader<FragmentLoaderContext> {
  static loaded: string[] = [];
  context: FragmentLoaderContext | null = null;
  stats = {} as LoaderStats;
  load(context: FragmentLoaderContext, _config: LoaderConfiguration, callbacks: LoaderCallbacks<FragmentLoaderContext>) {
    DefaultLoader.loaded.push(context.url);
    this.stats.loaded = this.stats.total = 3;
    setTimeout(() => callbacks.onSuccess({ url: context.url, data: new ArrayBuffer(3), code: 200 }, this.stats, context, null));
  }
  abort() {}
  destroy() {}
}

const hlsConfig = { loader: DefaultLoader } as unknown as HlsConfig;
const loaderConfig = (maxLoadTimeMs = 120_000) =>
  ({
    loadPolicy: { maxTimeToFirstByteMs: 10_000, maxLoadTimeMs, timeoutRetry: null, errorRetry: null },
    timeout: maxLoadTimeMs,
    maxRetry: 0,
    retryDelay: 0,
    maxRetryDelay: 0,
  }) as LoaderConfiguration;
const fragContext = (url: string, extra: Partial<FragmentLoaderContext> = {}) =>
  ({ url, responseType: "arraybuffer", type: "media-fragment", frag: { duration: 2 }, part: null, ...extra }) as unknown as FragmentLoaderContext;

type Outcome = { kind: "success"; response: LoaderResponse; stats: LoaderStats } | { kind: "abort" | "timeout" | "error" };

function load(loader: Loader<FragmentLoaderContext>, context: FragmentLoaderContext, config = loaderConfig()) {
  return new Promise<Outcome>((resolve) =>
    loader.load(context, config, {
      onSuccess: (response, stats) => resolve({ kind: "success", response, stats }),
      onError: () => resolve({ kind: "error" }),
      onTimeout: () => resolve({ kind: "timeout" }),
      onAbort: () => resolve({ kind: "abort" }),
    }),
  );
}

test("a segment comes from the fog with hls.js's stats filled as it arrives", async () => {
  const content = bytes(100_000);
  let release: () => void = () => undefined;
  let pieces = 0;
  const { fog, calls } = fakeFog(content, 40_000, () => {
    pieces++;
    // The second piece waits until the test has looked at the stats.
    return pieces === 2 ? new Promise<void>((r) => (release = r)) : Promise.resolve();
  });
  const Loader = fogLoader(fog);
  const loader = new Loader(hlsConfig);
  const done = load(loader, fragContext("https://media.example/seg1.ts"));
  while (pieces < 2) await new Promise((r) => setTimeout(r, 1));
  assert.equal(loader.stats.loaded, 40_000, "progress is visible to hls.js before the segment is complete");
  assert.equal(loader.stats.total, content.length);
  assert.ok(loader.stats.loading.first >= loader.stats.loading.start && loader.stats.loading.start > 0);
  release();
  const outcome = await done;
  assert.equal(outcome.kind, "success");
  if (outcome.kind !== "success") return;
  assert.deepEqual(new Uint8Array(outcome.response.data as ArrayBuffer), content);
  assert.equal(outcome.response.code, 200);
  const s = outcome.stats;
  assert.equal(s, loader.stats, "hls.js's reference to the stats object stays valid");
  assert.equal(s.loaded, content.length);
  assert.equal(s.chunkCount, 3);
  assert.ok(s.loading.end >= s.loading.first && s.bwEstimate > 0);
  assert.deepEqual(calls.open, [["https://media.example/seg1.ts", 0]]);
  assert.deepEqual(DefaultLoader.loaded, []);
});

test("byte-range segments ask the fog for just that range", async () => {
  const content = bytes(50_000);
  const { fog, calls } = fakeFog(content, 16_384);
  const loader = new (fogLoader(fog))(hlsConfig);
  const outcome = await load(loader, fragContext("https://media.example/all.ts", { rangeStart: 1000, rangeEnd: 31_000 }));
  assert.equal(outcome.kind, "success");
  if (outcome.kind !== "success") return;
  assert.deepEqual(new Uint8Array(outcome.response.data as ArrayBuffer), content.slice(1000, 31_000));
  assert.equal(outcome.response.code, 206);
  assert.deepEqual(calls.open, [["https://media.example/all.ts", 1000]]);
  assert.deepEqual(calls.ranges, [{ offset: 1000, length: 30_000 }]);
});

test("what the fog cannot take goes to hls.js's default loader, filling the same stats", async () => {
  DefaultLoader.loaded = [];
  const { fog, calls } = fakeFog(bytes(10), 10);
  const Loader = fogLoader(fog);
  const part = new Loader(hlsConfig);
  const outcome = await load(part, fragContext("https://media.example/part1.ts", { part: {} as never }));
  assert.equal(outcome.kind, "success");
  if (outcome.kind === "success") assert.equal(outcome.stats, part.stats);
  await load(new Loader(hlsConfig), fragContext("blob:https://media.example/1"));
  assert.deepEqual(calls.open, [], "LL-HLS parts and non-HTTP URLs never reach the fog");

  const refusing: FogSource = { open: () => Promise.reject(new Error("tracker: resolve: 403")) };
  const refused = new (fogLoader(refusing))(hlsConfig);
  assert.equal((await load(refused, fragContext("https://media.example/seg2.ts"))).kind, "success");
  assert.equal(refused.stats.loaded, 3, "the default loader's numbers, not the fog's");
  assert.deepEqual(DefaultLoader.loaded, [
    "https://media.example/part1.ts",
    "blob:https://media.example/1",
    "https://media.example/seg2.ts",
  ]);
  assert.throws(() => {
    const Fog = fogLoader(refusing);
    return new Fog({ loader: Fog } as unknown as HlsConfig);
  }, /fLoader/);
});

test("an abort cancels the fog's stream and is the last callback", async () => {
  const { fog, calls } = fakeFog(bytes(100_000), 10_000, () => new Promise(() => undefined));
  const loader = new (fogLoader(fog))(hlsConfig);
  const done = load(loader, fragContext("https://media.example/seg3.ts"));
  while (calls.ranges.length === 0) await new Promise((r) => setTimeout(r, 1));
  loader.abort();
  assert.equal((await done).kind, "abort");
  assert.equal(loader.stats.aborted, true);
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(calls.cancelled, 1);
});

test("a fog read slower than hls.js's load policy is a timeout for hls.js to retry", async () => {
  const { fog, calls } = fakeFog(bytes(100_000), 10_000, () => new Promise(() => undefined));
  const loader = new (fogLoader(fog))(hlsConfig);
  assert.equal((await load(loader, fragContext("https://media.example/seg4.ts"), loaderConfig(30))).kind, "timeout");
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(calls.cancelled, 1);
});

test("a segment the fog has not delivered by its deadline goes to hls.js's loader", async () => {
  DefaultLoader.loaded = [];
  const { fog, calls } = fakeFog(bytes(100_000), 10_000, () => new Promise(() => undefined));
  const loader = new (fogLoader(fog, { deadlineMs: 20 }))(hlsConfig);
  const outcome = await load(loader, fragContext("https://media.example/seg5.ts"));
  assert.equal(outcome.kind, "success");
  assert.deepEqual(DefaultLoader.loaded, ["https://media.example/seg5.ts"]);
  assert.equal(loader.stats.loaded, 3, "the default loader's numbers");
  await new Promise((r) => setTimeout(r, 5));
  assert.equal(calls.cancelled, 1, "the fog's stream is cancelled");
});
