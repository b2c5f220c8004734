// The tracker's resolve answer and the manifest in it (docs/protocol.md, "Content model" and
// "GET /v1/resolve"). Nothing in it is trusted until the content id is recomputed from it.

import { createBLAKE3 } from "hash-wasm";

import { FogError } from "./errors.js";

export interface Manifest {
  url: string;
  size: number;
  chunk_size: number;
  chunks: string[];
  content_type?: string;
  etag?: string;
  progress?: { hashed: [number, number][]; size_known: boolean };
  groups?: { size: number; hashes: string[] };
}

export interface NodeContact {
  id: string;
  addr: string;
  /** Present in answers to pages: where the page opens its WebTransport session to the node. */
  web?: { url: string; cert_hashes: string[] };
}

export interface Resolve {
  content_id: string;
  manifest: Manifest;
  nodes: NodeContact[];
  schedule: number[][];
  /** The tracker-signed ticket, when the page sent a session key: it licenses nodes to fill misses. */
  ticket?: unknown;
}

/** Largest chunk a manifest may name (16 MiB), as nodes and the tracker enforce. */
const MAX_CHUNK_SIZE = 16 << 20;

export function fromHex(hex: string): Uint8Array {
  if (!/^([0-9a-f]{2})*$/.test(hex)) throw new FogError("bad_manifest", "not lowercase hex");
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function fromBase64(b64: string): Uint8Array {
  const bin = atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, "="));
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

/** Chunk `i`'s byte span in the object: [offset, length]. */
export function chunkSpan(m: Manifest, i: number): [number, number] {
  const offset = i * m.chunk_size;
  return [offset, Math.min(m.chunk_size, m.size - offset)];
}

/** Chunk `i`'s hash, or undefined while it is not hashed yet (its entry is a placeholder then). */
export function chunkHash(m: Manifest, i: number): string | undefined {
  if (m.progress && !m.progress.hashed.some(([start, end]) => start <= i && i < end)) return undefined;
  return m.chunks[i];
}

/** Chunk `i`'s group hashes, for the node's cut-through; none for a chunk of one group. */
export function groupHashes(m: Manifest, i: number): { size: number; hashes: Uint8Array } | undefined {
  const b64 = m.groups?.hashes[i];
  if (!m.groups || !b64) return undefined;
  return { size: m.groups.size, hashes: fromBase64(b64) };
}

/** Checks the manifest's shape (what the rest of the client relies on) and that it hashes to `content_id`
 * (the canonical encoding, docs/protocol.md "Content model"), so a tampered answer is refused. */
export async function checkResolve(r: Resolve): Promise<void> {
  const m = r.manifest;
  const count = m.size === 0 ? 0 : Math.ceil(m.size / m.chunk_size);
  if (
    !Number.isSafeInteger(m.size) ||
    m.size < 0 ||
    !(m.chunk_size >= 16 << 10 && m.chunk_size <= MAX_CHUNK_SIZE) ||
    m.chunks.length !== count ||
    r.schedule.some((c) => c.some((n) => !(n >= 0 && n < r.nodes.length)))
  ) {
    throw new FogError("bad_manifest", "the tracker's manifest is inconsistent");
  }
  const h = await createBLAKE3();
  const u32 = (n: number) => {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, n);
    return b;
  };
  const u64 = (n: number) => {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(n));
    return b;
  };
  const utf8 = new TextEncoder();
  h.update(utf8.encode("fog-manifest-v1"));
  for (const field of [m.url, m.content_type ?? "", m.etag ?? ""]) {
    const bytes = utf8.encode(field);
    h.update(u32(bytes.length));
    h.update(bytes);
  }
  h.update(u64(m.size));
  h.update(u32(m.chunk_size));
  h.update(u64(m.chunks.length));
  for (const c of m.chunks) h.update(fromHex(c));
  if (m.progress) {
    h.update(utf8.encode("partial"));
    h.update(new Uint8Array([m.progress.size_known ? 1 : 0]));
    for (const [start, end] of m.progress.hashed) {
      h.update(u64(start));
      h.update(u64(end));
    }
  }
  if (m.groups) {
    h.update(utf8.encode("groups"));
    h.update(u32(m.groups.size));
    for (const b64 of m.groups.hashes) {
      const hashes = fromBase64(b64);
      h.update(u32(hashes.length / 32));
      h.update(hashes);
    }
  }
  if (h.digest("hex") !== r.content_id) {
    throw new FogError("bad_manifest", "the manifest does not hash to its content id");
  }
}
