// The verification worker: BLAKE3 of each chunk off the page's main thread, so hashing never janks the
// player. It gets the chunk's buffer transferred in and transfers it back with the digest.

import { createBLAKE3 } from "hash-wasm";

const hasher = createBLAKE3();

self.onmessage = async (e: MessageEvent<{ id: number; buf: ArrayBuffer }>) => {
  const { id, buf } = e.data;
  const h = await hasher;
  h.init();
  h.update(new Uint8Array(buf));
  const hex = h.digest("hex");
  (self as unknown as Worker).postMessage({ id, hex, buf }, [buf]);
};
