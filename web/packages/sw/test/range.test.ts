// Range parsing and response heads as browsers' media stacks exercise them, and the worker's configuration
// round trip through its script URL.

import assert from "node:assert/strict";
import { test } from "node:test";

import { readWorkerUrl, servedByFog, workerUrl } from "../src/config.js";
import { parseRange, planRange, responseHead, type RangePlan } from "../src/range.js";

test("Range headers parse as browsers send them", () => {
  assert.deepEqual(parseRange(null), { kind: "whole" });
  // Chromium's and Firefox's first media request, then a seek.
  assert.deepEqual(parseRange("bytes=0-"), { kind: "from", start: 0 });
  assert.deepEqual(parseRange("bytes=7340032-"), { kind: "from", start: 7340032 });
  assert.deepEqual(parseRange("bytes=100-199"), { kind: "from", start: 100, end: 199 });
  assert.deepEqual(parseRange("bytes=-500"), { kind: "suffix", length: 500 });
  assert.deepEqual(parseRange(" Bytes = 5 - 9 "), { kind: "from", start: 5, end: 9 });
  // What a server may ignore: other units, several ranges, nonsense, reversed, too long, unsafe numbers.
  for (const ignored of ["items=0-1", "bytes=0-1,5-6", "bytes=", "bytes=-", "bytes=a-b", "bytes=9-3",
    `bytes=0-${"9".repeat(300)}`, "bytes=99999999999999999999-"]) {
    assert.deepEqual(parseRange(ignored), { kind: "whole" }, ignored);
  }
});

test("ranges plan against the object's size", () => {
  const size = 1000;
  assert.deepEqual(planRange({ kind: "whole" }, size), { offset: 0, length: 1000, partial: false });
  assert.deepEqual(planRange({ kind: "from", start: 0 }, size), { offset: 0, length: 1000, partial: true });
  assert.deepEqual(planRange({ kind: "from", start: 990 }, size), { offset: 990, length: 10, partial: true });
  assert.deepEqual(planRange({ kind: "from", start: 10, end: 19 }, size), { offset: 10, length: 10, partial: true });
  // An end past the object is cut to it; a start at or past it cannot be served.
  assert.deepEqual(planRange({ kind: "from", start: 900, end: 5000 }, size), { offset: 900, length: 100, partial: true });
  assert.equal(planRange({ kind: "from", start: 1000 }, size), "unsatisfiable");
  assert.deepEqual(planRange({ kind: "suffix", length: 100 }, size), { offset: 900, length: 100, partial: true });
  assert.deepEqual(planRange({ kind: "suffix", length: 5000 }, size), { offset: 0, length: 1000, partial: true });
  assert.equal(planRange({ kind: "suffix", length: 0 }, size), "unsatisfiable");
  assert.equal(planRange({ kind: "from", start: 0 }, 0), "unsatisfiable");
  assert.deepEqual(planRange({ kind: "whole" }, 0), { offset: 0, length: 0, partial: false });
});

const headers = (plan: RangePlan, info = { size: 1000 }) => {
  const { status, headers } = responseHead(plan, info);
  return { status, headers: Object.fromEntries(headers) };
};

test("response heads carry what media stacks check", () => {
  assert.deepEqual(headers({ offset: 100, length: 900, partial: true }), {
    status: 206,
    headers: { "accept-ranges": "bytes", "content-length": "900", "content-range": "bytes 100-999/1000" },
  });
  assert.deepEqual(headers({ offset: 0, length: 1000, partial: false }, { size: 1000, contentType: "video/mp4", etag: '"x"' } as never), {
    status: 200,
    headers: { "accept-ranges": "bytes", "content-length": "1000", "content-type": "video/mp4", etag: '"x"' },
  });
  assert.deepEqual(headers("unsatisfiable"), {
    status: 416,
    headers: { "accept-ranges": "bytes", "content-length": "0", "content-range": "bytes */1000" },
  });
});

test("the configuration survives the worker's URL, and only its prefixes go through the fog", () => {
  const config = { tracker: "https://tracker.example.com", origins: ["https://videos.example.com/vod/"] };
  const url = workerUrl("/fog-sw.js", "https://player.example.com/watch/1", config);
  assert.ok(url.startsWith("https://player.example.com/fog-sw.js?tracker="), url);
  const back = readWorkerUrl(url);
  assert.deepEqual(back, config);
  assert.ok(servedByFog("https://videos.example.com/vod/movie.mp4", back));
  assert.ok(!servedByFog("https://videos.example.com/live/x.ts", back));
  assert.ok(!servedByFog("https://player.example.com/app.js", back));
  assert.throws(() => workerUrl("/fog-sw.js", "https://p.example", { ...config, origins: [] }), /origin prefixes/);
  assert.throws(() => workerUrl("/fog-sw.js", "https://p.example", { ...config, tracker: "/rel" }), /absolute/);
  assert.throws(() => readWorkerUrl("https://p.example/fog-sw.js?origin=https://v.example/"), /tracker/);
  assert.throws(() => readWorkerUrl("https://p.example/fog-sw.js?tracker=https://t&origin=ftp://v/"), /http/);
});
