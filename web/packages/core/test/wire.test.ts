// The request frames against proto/src/wire.rs's hex test vectors (docs/protocol.md), byte for byte, and
// response heads decoded from theirs.

import assert from "node:assert/strict";
import { test } from "node:test";

import { encodeRequest, readResponseHead, StreamReader } from "../src/wire.js";

const HASH_11 = "11".repeat(32);
const HASH_AB = "ab".repeat(32);
const bytes = (hex: string) => Uint8Array.from(hex.replace(/ /g, "").match(/../g) ?? [], (b) => parseInt(b, 16));
const hex = (b: Uint8Array) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

test("requests encode to the protocol's vectors", () => {
  assert.equal(hex(encodeRequest({ hash: bytes(HASH_11) })), `0022 01 00 ${HASH_11}`.replace(/ /g, ""));
  const full = encodeRequest({
    hash: bytes(HASH_AB),
    range: [16, 4096],
    origin: { url: "http://o/x", offset: 2 ** 40, length: 1 << 20 },
    receipt: new TextEncoder().encode("r1"),
    ticket: new TextEncoder().encode("t"),
  });
  const want = `0049 01 0f ${HASH_AB} 00000010 00001000 0000010000000000 00100000 000a 687474703a2f2f6f2f78 0002 7231 \
    0001 74`;
  assert.equal(hex(full), want.replace(/ /g, ""));
  const grouped = encodeRequest({ hash: bytes(HASH_11), groups: { size: 1024, hashes: bytes(HASH_11 + HASH_AB) } });
  const receipt = encodeRequest({ hash: new Uint8Array(32), receipt: new TextEncoder().encode("{}") });
  assert.equal(hex(receipt), `0026 01 04 ${"00".repeat(32)} 0002 7b7d`.replace(/ /g, ""));
  assert.equal(hex(grouped), `0065 01 10 ${HASH_11} 0a 0002 ${HASH_11} ${HASH_AB}`.replace(/ /g, ""));
});

function reader(hexes: string[]): StreamReader {
  const pieces = hexes.map(bytes);
  const stream = new ReadableStream<Uint8Array>({
    pull(c) {
      const p = pieces.shift();
      if (p) c.enqueue(p);
      else c.close();
    },
  });
  return new StreamReader(stream.getReader(), () => undefined);
}

test("response heads decode from the protocol's vectors, split anywhere", async () => {
  assert.deepEqual(await readResponseHead(reader(["00 0010", "0000"])), { ok: true, len: 1 << 20 });
  assert.deepEqual(await readResponseHead(reader(["01 0003 6e6f70"])), { ok: false, status: "not_found", message: "nop" });
  await assert.rejects(readResponseHead(reader(["00 0100 0001"])), /over 16 MiB/);
  await assert.rejects(readResponseHead(reader(["09 0000"])), /unknown status/);
});
