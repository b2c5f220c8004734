// The plugin against a stand-in FogClient and a stand-in `shaka` namespace: which requests reach the fog,
// what Shaka gets back (bytes, status, progress), hand-overs to Shaka's HTTP plugin, aborts and timeouts.

import assert from "node:assert/strict";
import { test } from "node:test";

import type { FogObject } from "@fogcdn/core";

import { register, type FogSource, type Shaka } from "../src/plugin.js";

const bytes = (n: number, seed = 1) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed) & 0xff);
const SEGMENT = 1;
const MANIFEST = 0;

/** A fog whose objects are `content`, in `chunk`-byte pieces, each only when `gate` allows. */
function fakeFog(content: Uint8Array, chunk: number, gate: () => Promise<void> = async () => undefined) {
  const calls = { open: [] as [string, number][], ranges: [] as { offset: number; length: number }[], cancelled: 0 };
  const fog: FogSource = {
    async open(url: string, from = 0): Promise<FogObject> {
      calls.open.push([url, from]);
      if (url.includes("refused")) throw new Error("tracker: resolve: 403");
      return {
        size: content.length,
        contentType: "video/mp4",
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

class FakeShakaError extends Error {
  constructor(
    readonly severity: number,
    readonly category: number,
    readonly code: number,
  ) {
    super(`shaka error ${code}`);
  }
  static Severity = { RECOVERABLE: 1 };
  static Category = { NETWORK: 1 };
  static Code = { OPERATION_ABORTED: 7001, TIMEOUT: 1003, HTTP_ERROR: 1002 };
}

type Plugin = Parameters<Shaka["net"]["NetworkingEngine"]["registerScheme"]>[1];

/** A `shaka` namespace whose registered plugins and default-plugin calls are recorded. */
function fakeShaka() {
  const schemes = new Map<string, { plugin: Plugin; progressSupport?: boolean }>();
  const defaulted: string[] = [];
  const parse: Plugin = (uri, request) => {
    defaulted.push(uri);
    return {
      promise: Promise.resolve({
        uri,
        originalUri: uri,
        data: new ArrayBuffer(3),
        status: 200,
        headers: {},
        fromCache: false,
        originalRequest: request,
      }),
      abort: async () => undefined,
    };
  };
  const shaka: Shaka = {
    net: {
      NetworkingEngine: {
        registerScheme: (scheme, plugin, _priority, progressSupport) => schemes.set(scheme, { plugin, progressSupport }),
        RequestType: { SEGMENT },
        PluginPriority: { APPLICATION: 3 },
      },
      HttpFetchPlugin: { parse, isSupported: () => true },
      HttpXHRPlugin: { parse },
    },
    util: {
      AbortableOperation: class<T> {
        constructor(
          readonly promise: Promise<T>,
          readonly abort: () => Promise<unknown>,
        ) {}
      },
      Error: FakeShakaError,
    },
  };
  return { shaka, schemes, defaulted };
}

const request = (headers: Record<string, string> = {}, timeout = 30_000) => ({
  method: "GET",
  body: null,
  headers,
  allowCrossSiteCredentials: false,
  retryParameters: { timeout },
});

function call(plugin: Plugin, uri: string, type: number, req = request()) {
  const progress: [number, number][] = [];
  let headers: Record<string, string> | undefined;
  const op = plugin(uri, req, type, (_ms, n, left) => progress.push([n, left]), (h) => (headers = h), {});
  return { op, progress, headers: () => headers };
}

test("segments come from the fog with progress events; http and https are both taken", async () => {
  const content = bytes(100_000);
  const { fog, calls } = fakeFog(content, 40_000);
  const { shaka, schemes, defaulted } = fakeShaka();
  register(shaka, fog);
  assert.deepEqual([...schemes.keys()], ["http", "https"]);
  assert.equal(schemes.get("https")?.progressSupport, true, "Shaka's timeouts and estimator use the progress");
  const { op, progress, headers } = call(schemes.get("https")!.plugin, "https://media.example/seg1.m4s", SEGMENT);
  const response = await op.promise;
  assert.deepEqual(new Uint8Array(response.data), content);
  assert.equal(response.status, 200);
  assert.deepEqual(progress, [
    [40_000, 60_000],
    [40_000, 20_000],
    [20_000, 0],
  ]);
  assert.equal(headers()?.["content-length"], "100000");
  assert.deepEqual(calls.open, [["https://media.example/seg1.m4s", 0]]);
  assert.deepEqual(defaulted, []);
});

test("Shaka's stream callback gets the verified chunks in order, as they come", async () => {
  const content = bytes(50_000);
  const { fog } = fakeFog(content, 16_384);
  const { shaka, schemes, defaulted } = fakeShaka();
  register(shaka, fog);
  const pieces: number[] = [];
  const streamed = {
    ...request(),
    streamDataCallback: async (data: Uint8Array) => {
      pieces.push(data.length);
    },
  };
  const response = await call(schemes.get("https")!.plugin, "https://media.example/p.m4s", SEGMENT, streamed).op.promise;
  assert.deepEqual(pieces, [16_384, 16_384, 16_384, 50_000 - 3 * 16_384]);
  assert.deepEqual(new Uint8Array(response.data), content);
  assert.deepEqual(defaulted, []);
});

test("a Range header asks the fog for just that range", async () => {
  const content = bytes(50_000);
  const { fog, calls } = fakeFog(content, 16_384);
  const { shaka, schemes } = fakeShaka();
  register(shaka, fog);
  const plugin = schemes.get("http")!.plugin;
  const response = await call(plugin, "http://media.example/all.mp4", SEGMENT, request({ Range: "bytes=1000-30999" })).op
    .promise;
  assert.deepEqual(new Uint8Array(response.data), content.slice(1000, 31_000));
  assert.equal(response.status, 206);
  const tail = await call(plugin, "http://media.example/all.mp4", SEGMENT, request({ range: "bytes=49000-" })).op.promise;
  assert.deepEqual(new Uint8Array(tail.data), content.slice(49_000));
  assert.deepEqual(calls.ranges, [
    { offset: 1000, length: 30_000 },
    { offset: 49_000, length: 1000 },
  ]);
});

test("manifests, requests the fog cannot replay and refused objects go to Shaka's HTTP plugin", async () => {
  const { fog, calls } = fakeFog(bytes(10), 10);
  const { shaka, schemes, defaulted } = fakeShaka();
  register(shaka, fog);
  const plugin = schemes.get("https")!.plugin;
  await call(plugin, "https://media.example/manifest.mpd", MANIFEST).op.promise;
  await call(plugin, "https://media.example/auth.m4s", SEGMENT, request({ Authorization: "Bearer x" })).op.promise;
  await call(plugin, "https://media.example/odd.m4s", SEGMENT, request({ Range: "bytes=-500" })).op.promise;
  assert.deepEqual(calls.open, []);
  const refused = await call(plugin, "https://media.example/refused.m4s", SEGMENT).op.promise;
  assert.equal(refused.data.byteLength, 3, "Shaka's plugin answered");
  assert.deepEqual(defaulted, [
    "https://media.example/manifest.mpd",
    "https://media.example/auth.m4s",
    "https://media.example/odd.m4s",
    "https://media.example/refused.m4s",
  ]);
});

test("an abort cancels the fog's stream and fails the request as aborted", async () => {
  const { fog, calls } = fakeFog(bytes(100_000), 10_000, () => new Promise(() => undefined));
  const { shaka, schemes } = fakeShaka();
  register(shaka, fog);
  const { op } = call(schemes.get("https")!.plugin, "https://media.example/seg2.m4s", SEGMENT);
  while (calls.ranges.length === 0) await new Promise((r) => setTimeout(r, 1));
  await op.abort();
  await assert.rejects(op.promise, (e: FakeShakaError) => e.code === 7001);
  assert.equal(calls.cancelled, 1);
});

test("a fog read slower than the request's timeout fails as a timeout, for Shaka to retry", async () => {
  const { fog, calls } = fakeFog(bytes(100_000), 10_000, () => new Promise(() => undefined));
  const { shaka, schemes } = fakeShaka();
  register(shaka, fog);
  const { op } = call(schemes.get("https")!.plugin, "https://media.example/seg3.m4s", SEGMENT, request({}, 30));
  await assert.rejects(op.promise, (e: FakeShakaError) => e.code === 1003);
  assert.equal(calls.cancelled, 1);
});

test("a segment the fog has not delivered by the deadline goes to Shaka's HTTP plugin", async () => {
  const { fog, calls } = fakeFog(bytes(100_000), 10_000, () => new Promise(() => undefined));
  const { shaka, schemes, defaulted } = fakeShaka();
  register(shaka, fog, { deadlineMs: 20 });
  const response = await call(schemes.get("https")!.plugin, "https://media.example/seg4.m4s", SEGMENT).op.promise;
  assert.equal(response.data.byteLength, 3, "Shaka's plugin answered");
  assert.deepEqual(defaulted, ["https://media.example/seg4.m4s"]);
  assert.equal(calls.cancelled, 1);
});
