// The tracker failover policy (the native clients' rules, net/src/trackers.rs) against real HTTP servers
// on 127.0.0.1: a dead one, one not ready (503), one refusing (404), one answering.

import assert from "node:assert/strict";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { test } from "node:test";

import { trackerList, Trackers } from "../src/trackers.js";

/** A server answering every request with `status` and `body`, counting them. */
async function server(status: number, body: object): Promise<{ url: string; asked: () => number; srv: Server }> {
  let asked = 0;
  const srv = createServer((req, res) => {
    asked += 1;
    req.resume();
    req.on("end", () => res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body)));
  });
  await new Promise<void>((ok) => srv.listen(0, "127.0.0.1", ok));
  return { url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}`, asked: () => asked, srv };
}

/** A URL nothing listens on: a server started, then closed. */
async function dead(): Promise<string> {
  const { url, srv } = await server(200, {});
  await new Promise((ok) => srv.close(ok));
  return url;
}

test("tracker lists parse; bad ones are refused", () => {
  assert.deepEqual(trackerList("http://a:1/, http://b:2"), ["http://a:1", "http://b:2"]);
  assert.deepEqual(trackerList(["https://a"]), ["https://a"]);
  assert.throws(() => trackerList(" , "));
  assert.throws(() => trackerList("http://a,b:7700"));
});

test("fails over past dead and unready trackers, then sticks; a refusal is an answer", async () => {
  const unready = await server(503, { error: "internal", message: "not ready", retryable: true });
  const live = await server(200, { ok: true });
  const refusing = await server(404, { error: "bad_request", message: "no", retryable: false });
  try {
    const t = new Trackers([await dead(), unready.url, live.url]);
    assert.deepEqual(await (await t.fetch("/v1/x")).json(), { ok: true });
    assert.deepEqual(t.current, { url: live.url, index: 2, failovers: 1 });
    await t.fetch("/v1/x");
    assert.equal(unready.asked(), 1, "the current tracker is asked first");
    assert.equal(live.asked(), 2);

    const r = new Trackers([refusing.url, live.url]);
    assert.equal((await r.fetch("/v1/x")).status, 404);
    assert.equal(live.asked(), 2, "not failed over on a definite answer");
    assert.equal(r.current.failovers, 0);

    // A report after a network error is not sent again elsewhere (it may have arrived).
    const p = new Trackers([await dead(), live.url]);
    await assert.rejects(p.fetch("/v1/reports", { method: "POST", body: "{}" }, false));
    assert.equal((await p.fetch("/v1/reports", { method: "POST", body: "{}" }, false)).status, 200);
    assert.equal(p.current.index, 1);
  } finally {
    for (const s of [unready, live, refusing]) s.srv.close();
  }
});

test("a URL that failed backs off, doubling, and is retried once due", () => {
  const t = new Trackers(["http://a", "http://b"]);
  let now = 0;
  for (let round = 0; round < 4; round++) {
    t.record(0, false, now);
    assert.deepEqual(t.plan(now), [1]);
    now += Math.min(1000 * 2 ** round, 60_000);
  }
  assert.deepEqual(t.plan(now), [0, 1]);
  t.record(1, false, now);
  t.record(0, false, now);
  assert.equal(t.plan(now).length, 1, "all backing off: one is still tried");
});
