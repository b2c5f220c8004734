// BLAKE3 checks of whole chunks, in Web Workers. The worker's code is built into this bundle and started
// from a blob: URL, so a site ships one file; where workers are unavailable (a CSP without `worker-src
// blob:`) hashing runs on the main thread instead.
//
// Chunks verify whole, not group by group: group hashes are BLAKE3 chaining values (non-root subtrees),
// which no npm BLAKE3 package exposes; chunk hashes are the same with or without groups.

import { createBLAKE3 } from "hash-wasm";

declare const __FOG_VERIFY_WORKER__: string;

/** Verifying workers: enough to keep up with a few chunks in flight without taking every core. */
const WORKERS = 2;

interface Slot {
  worker: Worker;
  /** Chunks given to it and not answered yet. */
  busy: number;
}

interface Pending {
  slot: Slot;
  resolve: (r: { hex: string; buf: ArrayBuffer }) => void;
  reject: (e: unknown) => void;
}

export class Verifier {
  private workers: Slot[] = [];
  private pending = new Map<number, Pending>();
  private nextId = 0;

  constructor() {
    try {
      const url = URL.createObjectURL(new Blob([__FOG_VERIFY_WORKER__], { type: "text/javascript" }));
      for (let i = 0; i < WORKERS; i++) {
        const worker = new Worker(url);
        const slot: Slot = { worker, busy: 0 };
        worker.onmessage = (e: MessageEvent<{ id: number; hex: string; buf: ArrayBuffer }>) => {
          slot.busy--;
          const p = this.pending.get(e.data.id);
          this.pending.delete(e.data.id);
          p?.resolve(e.data);
        };
        worker.onerror = (e) => {
          // A worker that fails fails the chunks given to it; later ones go to the others, or to the main
          // thread once none is left.
          e.preventDefault();
          this.workers = this.workers.filter((w) => w !== slot);
          for (const [id, p] of this.pending) {
            if (p.slot !== slot) continue;
            this.pending.delete(id);
            p.reject(new Error(`verification worker failed: ${e.message}`));
          }
        };
        this.workers.push(slot);
      }
    } catch {
      this.workers = [];
    }
  }

  /** Whether hashing runs in workers (false: on the main thread). */
  get inWorkers(): boolean {
    return this.workers.length > 0;
  }

  /** The chunk back (its buffer travels to the worker and back) if its BLAKE3 hash is `hex`, else null.
   * `chunk` must own its whole buffer. */
  async check(chunk: Uint8Array, hex: string): Promise<Uint8Array | null> {
    const slot = this.workers.reduce<Slot | undefined>(
      (best, w) => (best === undefined || w.busy < best.busy ? w : best),
      undefined,
    );
    if (slot === undefined) return (await mainThreadHex(chunk)) === hex ? chunk : null;
    const id = this.nextId++;
    const done = new Promise<{ hex: string; buf: ArrayBuffer }>((resolve, reject) =>
      this.pending.set(id, { slot, resolve, reject }),
    );
    slot.busy++;
    slot.worker.postMessage({ id, buf: chunk.buffer }, [chunk.buffer as ArrayBuffer]);
    const r = await done;
    return r.hex === hex ? new Uint8Array(r.buf) : null;
  }
}

let mainHasher: ReturnType<typeof createBLAKE3> | undefined;

async function mainThreadHex(bytes: Uint8Array): Promise<string> {
  mainHasher ??= createBLAKE3();
  const h = await mainHasher;
  h.init();
  h.update(bytes);
  return h.digest("hex");
}

/** BLAKE3 of `bytes`, lowercase hex: the hash fogcdn names chunks and content by. */
export const blake3Hex = mainThreadHex;
