// The page's fog client: resolve at the tracker, each chunk from a node the tracker scheduled (over
// WebTransport, verified before use), everything else from the origin with `Range`.

import { Payments, type Receipt, type SessionKey, type Signed } from "./credits.js";
import { FogError } from "./errors.js";
import {
  checkResolve,
  chunkHash,
  chunkSpan,
  fromHex,
  groupHashes,
  type Manifest,
  type NodeContact,
  type Resolve,
} from "./manifest.js";
import { fogDisabled, Sessions } from "./sessions.js";
import { trackerList, Trackers, type CurrentTracker } from "./trackers.js";
import { Verifier } from "./verify.js";
import { encodeRequest, readResponseHead, StreamReader, type ChunkRequest } from "./wire.js";

export interface FogOptions {
  /** The tracker's base URL, e.g. `https://tracker.example.com`; or a cell's replicas, as a list or
   * comma-separated: requests stick to the one that answered last and fail over to the next. */
  tracker: string | string[];
  /** Chunks fetched at once by one `fetchObject` (default 4). */
  parallel?: number;
  /** How long a node may take to the first byte of a response (default 5000: a miss costs it an origin
   * round trip). */
  firstByteMs?: number;
  /** How long a response may pause (default 2000). */
  stallMs?: number;
  /** If set, a chunk a node has not delivered this long after it was asked for is not waited for: the
   * bytes received are kept and only the rest comes from the origin (deadline salvage). */
  chunkDeadlineMs?: number;
  /** WebTransport handshake limit (default 5000). */
  handshakeTimeoutMs?: number;
  /** Largest `fetchObject` result (default 256 MiB): the bytes are held in memory. */
  maxBytes?: number;
}

export interface FetchOptions {
  /** Bytes of the object to fetch; default the whole object. */
  range?: { offset: number; length: number };
  /** Called as verified bytes arrive: bytes so far and in all. */
  onProgress?: (loaded: number, total: number) => void;
}

/** An object resolved through the fog, ready to stream ranges of (`FogClient.open`). */
export interface FogObject {
  /** The whole object's size. */
  readonly size: number;
  /** The origin's `Content-Type` and `ETag`, when it sent them. */
  readonly contentType?: string;
  readonly etag?: string;
  /** `range` of the object (default: all of it), in order: each chunk's bytes are enqueued once the chunk
   * verified, and chunks are fetched at most `parallel` ahead of what was read, so memory stays bounded
   * however large the object. Cancelling stops further requests (those under way finish unread) and hands
   * the nodes their receipts. Errors only when a chunk could be read neither from the fog nor the origin.
   * Throws a FogError ("bad_range") for a range outside the object. */
  stream(range?: { offset: number; length: number }): ReadableStream<Uint8Array>;
}

export interface NodeStats {
  /** Verified bytes the node delivered. */
  bytes: number;
  /** Time spent receiving them (from request to last byte), for throughput. */
  ms: number;
}

export interface Stats {
  /** Verified bytes from fog nodes. */
  fogBytes: number;
  /** Bytes from the origin for chunks the fog did not deliver (or not all of). */
  originBytes: number;
  /** Bytes from the origin because the fog could not be used at all (tracker refused or down, fog off). */
  passthroughBytes: number;
  /** Fog bytes over all bytes, 0 ..= 1. */
  offload: number;
  nodes: Record<string, NodeStats>;
  /** Failed node attempts, by node id and reason. */
  failures: { node: string; reason: string; count: number }[];
  /** Whether the fog is off for this page after failed handshakes. */
  fogDisabled: boolean;
  /** Whether chunks are hashed in Web Workers (false: on the main thread). */
  verifyInWorkers: boolean;
  /** Receipts nodes accepted from this page (each pays for the chunks a node delivered before it). */
  receiptsHanded: number;
  /** The tracker URL requests go to now. */
  tracker: CurrentTracker;
}

const RESOLVE_TTL_MS = 30_000;
const MAX_CACHED_RESOLVES = 64;
/** The tracker takes at most this many failure entries in a report. */
const MAX_REPORTED_FAILURES = 256;
/** Chunks a node delivers between two receipts handed to it (the rest at the fetch's end): each receipt
 * costs the node a signature check and a synced write, and a node takes one at most 64 chunks ahead of what
 * the session delivered (as the native client, client-lib/src/fetch.rs). */
const RECEIPT_EVERY = 16;

/** A node's newest receipt in one fetch, not handed over yet, and the chunk count the last one paid to; and
 * the signed ticket the receipts were made under, which goes with them (the tracker keeps no tickets: a node
 * redeems a receipt with its ticket). */
interface Owed {
  node: NodeContact;
  newest?: Receipt;
  ticket?: Uint8Array;
  handed: number;
}

interface Attempt {
  /** The chunk's buffer; its first `got` bytes arrived. */
  buf: Uint8Array;
  got: number;
  error?: FogError;
}

export class FogClient {
  private readonly opts: Required<Omit<FogOptions, "chunkDeadlineMs">> & { chunkDeadlineMs?: number };
  private readonly sessions: Sessions;
  private readonly trackers: Trackers;
  private readonly verifier = new Verifier();
  private readonly resolves = new Map<string, { at: number; resolve: Promise<Resolve> }>();
  /** Nodes that sent wrong bytes, per content id: never asked again for that object. */
  private readonly liars = new Map<string, Set<string>>();
  private clientKey: Promise<SessionKey | undefined> | undefined;
  private readonly payments = new WeakMap<Resolve, Payments>();
  private receiptsHanded = 0;
  private readonly totals = { fog: 0, origin: 0, passthrough: 0 };
  private readonly nodes = new Map<string, NodeStats>();
  private readonly failures = new Map<string, number>();
  private reported = { fog: 0, origin: 0, passthrough: 0, failures: new Map<string, number>() };

  constructor(opts: FogOptions) {
    this.opts = {
      parallel: 4,
      firstByteMs: 5000,
      stallMs: 2000,
      handshakeTimeoutMs: 5000,
      maxBytes: 256 << 20,
      ...opts,
    };
    this.trackers = new Trackers(trackerList(opts.tracker));
    this.sessions = new Sessions(this.opts.handshakeTimeoutMs);
  }

  /** The tracker's answer for `url` (cached for 30 s once the manifest is complete), content id checked. */
  async resolve(url: string, from = 0): Promise<Resolve> {
    const cached = this.resolves.get(url);
    if (cached && performance.now() - cached.at < RESOLVE_TTL_MS) return cached.resolve;
    const resolve = this.fetchResolve(url, from);
    this.resolves.delete(url);
    if (this.resolves.size >= MAX_CACHED_RESOLVES) this.resolves.delete(this.resolves.keys().next().value!);
    this.resolves.set(url, { at: performance.now(), resolve });
    resolve.then(
      (r) => r.manifest.progress && this.resolves.delete(url),
      () => this.resolves.delete(url),
    );
    return resolve;
  }

  private async fetchResolve(url: string, from: number): Promise<Resolve> {
    const q = new URLSearchParams({ url, from: String(from) });
    const key = await this.sessionKey();
    if (key) q.set("client_key", key.hex);
    const resp = await this.trackers.fetch(`/v1/resolve?${q}`);
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      throw new FogError("tracker", `resolve: ${resp.status} ${body.error ?? ""} ${body.message ?? ""}`);
    }
    const r = (await resp.json()) as Resolve;
    await checkResolve(r);
    if (key && r.ticket !== undefined) {
      const payments = await Payments.open(r.ticket as Signed, key).catch(() => undefined);
      if (payments) this.payments.set(r, payments);
    }
    return r;
  }

  /** A per-client ed25519 key (WebCrypto), sent with resolves so the tracker issues a ticket: the ticket
   * licenses nodes to fill misses from the origin. Without Ed25519 in WebCrypto, nodes serve hits only. */
  private sessionKey(): Promise<SessionKey | undefined> {
    this.clientKey ??= (async () => {
      try {
        const pair = (await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"])) as CryptoKeyPair;
        const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
        return { pair, hex: Array.from(raw, (b) => b.toString(16).padStart(2, "0")).join("") };
      } catch {
        return undefined;
      }
    })();
    return this.clientKey;
  }

  /** The object at `url`, resolved (for bytes from `from` on), to stream ranges of. Rejects when the fog
   * cannot serve it at all (tracker down or refusing, fog off for the page, ingest still sizing the object):
   * the caller reads it elsewhere then. */
  async open(url: string, from = 0): Promise<FogObject> {
    if (fogDisabled()) throw new FogError("fog_disabled", "fog is off for this page after failed handshakes");
    const r = await this.resolve(url, from);
    const m = r.manifest;
    if (m.progress && !m.progress.size_known) throw new FogError("size_unknown", `${url} is still being sized`);
    return {
      size: m.size,
      contentType: m.content_type,
      etag: m.etag,
      stream: (range) => this.streamChunks(r, range?.offset ?? 0, range?.length ?? m.size),
    };
  }

  private streamChunks(r: Resolve, offset: number, length: number): ReadableStream<Uint8Array> {
    const m = r.manifest;
    // No maxBytes: a stream holds at most `parallel` chunks.
    checkRange(m, offset, length, Infinity);
    const first = Math.floor(offset / m.chunk_size);
    const last = length === 0 ? first - 1 : Math.floor((offset + length - 1) / m.chunk_size);
    const owed = new Map<string, Owed>();
    const handovers: Promise<void>[] = [];
    /** Chunks asked for and not read yet, in order. */
    const ahead: Promise<Uint8Array>[] = [];
    let next = first;
    let settled = false;
    const fill = () => {
      while (next <= last && ahead.length < this.opts.parallel) {
        const chunk = this.chunk(r, next++, owed, handovers);
        chunk.catch(() => undefined); // read (and its failure surfaced) when its turn comes, or never
        ahead.push(chunk);
      }
    };
    // Chunks still under way when the stream ends unread are paid for too, once they arrive.
    const settle = () => {
      if (settled) return;
      settled = true;
      next = last + 1;
      const pay = () => payOwed(owed, handovers, (node, receipt, ticket) => this.handOver(node, receipt, ticket));
      Promise.allSettled(ahead).then(pay);
    };
    let i = first;
    return new ReadableStream<Uint8Array>(
      {
        pull: async (controller) => {
          fill();
          const chunk = ahead.shift();
          if (chunk === undefined) {
            settle();
            controller.close();
            return;
          }
          try {
            const bytes = await chunk;
            const [chunkOffset] = chunkSpan(m, i++);
            const from = Math.max(offset, chunkOffset) - chunkOffset;
            const to = Math.min(offset + length, chunkOffset + bytes.length) - chunkOffset;
            controller.enqueue(bytes.subarray(from, to));
          } catch (e) {
            settle();
            throw e;
          }
          if (i > last) {
            settle();
            controller.close();
          } else {
            fill();
          }
        },
        cancel: settle,
      },
      // Nothing is read ahead by the stream itself: `fill` bounds the look-ahead.
      { highWaterMark: 0 },
    );
  }

  /** The object's bytes (or `range` of them), every byte from a node verified against the manifest. */
  async fetchObject(url: string, options: FetchOptions = {}): Promise<Uint8Array> {
    const offset = options.range?.offset ?? 0;
    let r: Resolve | undefined;
    if (!fogDisabled()) {
      try {
        r = await this.resolve(url, offset);
      } catch (e) {
        console.warn(`fogcdn: resolving ${url} failed, reading it from the origin: ${e}`);
      }
    }
    if (r === undefined) {
      const bytes = await this.fromOrigin(url, offset, options.range?.length);
      this.totals.passthrough += bytes.length;
      options.onProgress?.(bytes.length, bytes.length);
      return bytes;
    }
    const m = r.manifest;
    const length = options.range ? options.range.length : m.size - offset;
    checkRange(m, offset, length, this.opts.maxBytes);
    const out = new Uint8Array(length);
    if (length === 0) return out;
    const first = Math.floor(offset / m.chunk_size);
    const last = Math.floor((offset + length - 1) / m.chunk_size);
    let next = first;
    let loaded = 0;
    const owed = new Map<string, Owed>();
    const handovers: Promise<void>[] = [];
    const worker = async () => {
      while (next <= last) {
        const i = next++;
        const chunk = await this.chunk(r, i, owed, handovers);
        const [chunkOffset] = chunkSpan(m, i);
        const from = Math.max(offset, chunkOffset);
        const to = Math.min(offset + length, chunkOffset + chunk.length);
        out.set(chunk.subarray(from - chunkOffset, to - chunkOffset), from - offset);
        loaded += to - from;
        options.onProgress?.(loaded, length);
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.opts.parallel, last - first + 1) }, worker));
    payOwed(owed, handovers, (node, receipt, ticket) => this.handOver(node, receipt, ticket));
    await Promise.all(handovers);
    return out;
  }

  /** Chunk `i` whole: from its scheduled nodes in order, else (or for the rest after a partial delivery)
   * from the origin. */
  private async chunk(r: Resolve, i: number, owed: Map<string, Owed>, handovers: Promise<void>[]): Promise<Uint8Array> {
    const m = r.manifest;
    const [offset, len] = chunkSpan(m, i);
    const hash = chunkHash(m, i);
    const liars = this.liars.get(r.content_id) ?? new Set<string>();
    this.liars.set(r.content_id, liars);
    // A chunk not hashed yet has no candidates: the origin is the only source.
    const candidates = hash === undefined ? [] : r.schedule[i].map((slot) => r.nodes[slot]);
    for (const node of candidates) {
      if (hash === undefined || liars.has(node.id) || fogDisabled()) continue;
      const started = performance.now();
      const attempt = await this.fromNode(node, this.request(r, i, hash), len);
      if (attempt.error === undefined) {
        const verified = await this.verifier.check(attempt.buf, hash).catch(() => undefined);
        // A verification worker that died took the bytes with it: the origin serves, nobody is blamed.
        if (verified === undefined) break;
        if (verified) {
          this.creditNode(node.id, len, performance.now() - started);
          // Only a node that delivered the whole chunk is paid for it.
          const receipt = await this.payments.get(r)?.pay(node.id);
          if (receipt) {
            const o = owed.get(node.id) ?? { node, handed: 0 };
            owed.set(node.id, o);
            if (o.newest === undefined || o.newest.index < receipt.index) {
              o.newest = receipt;
              o.ticket = ticketJson(r);
            }
            if (o.newest.index >= o.handed + RECEIPT_EVERY) {
              handovers.push(this.handOver(node, o.newest, o.ticket));
              o.handed = o.newest.index;
              o.newest = undefined;
            }
          }
          return verified;
        }
        this.fail(node.id, "hash_mismatch");
        liars.add(node.id);
        continue;
      }
      // The fog going off for the page is no fault of this node's.
      if (attempt.error.reason !== "fog_disabled") this.fail(node.id, attempt.error.reason);
      if (attempt.got === 0) continue;
      // Salvage: keep what the node sent, read only the rest from the origin, and check the whole chunk.
      const rest = await this.fromOrigin(m.url, offset + attempt.got, len - attempt.got);
      attempt.buf.set(rest, attempt.got);
      const verified = await this.verifier.check(attempt.buf, hash).catch(() => undefined);
      if (verified === undefined) break;
      if (verified) {
        this.creditNode(node.id, attempt.got, performance.now() - started);
        this.totals.origin += rest.length;
        return verified;
      }
      this.fail(node.id, "hash_mismatch");
      liars.add(node.id);
      break;
    }
    const bytes = await this.fromOrigin(m.url, offset, len);
    this.totals.origin += bytes.length;
    return bytes;
  }

  /** Hands `node` a receipt on its session, with the ticket it was made under (best effort: a later receipt
   * pays for this one's chunks too). */
  private async handOver(node: NodeContact, receipt: Receipt, ticket?: Uint8Array): Promise<void> {
    const req = { hash: new Uint8Array(32), receipt: new TextEncoder().encode(JSON.stringify(receipt)), ticket };
    const attempt = await this.fromNode(node, req, 0);
    if (attempt.error === undefined) this.receiptsHanded++;
  }

  private request(r: Resolve, i: number, hash: string): ChunkRequest {
    const req: ChunkRequest = { hash: fromHex(hash) };
    if (r.ticket !== undefined) {
      // The hint is only worth its bytes with a ticket: without one a node ignores it.
      const [offset, length] = chunkSpan(r.manifest, i);
      req.origin = { url: r.manifest.url, offset, length };
      req.ticket = ticketJson(r);
      req.groups = groupHashes(r.manifest, i);
    }
    return req;
  }

  /** One request to `node` on a new stream of its session; a failure says how many bytes had arrived. */
  private async fromNode(node: NodeContact, req: ChunkRequest, len: number): Promise<Attempt> {
    const buf = new Uint8Array(len);
    let wt: WebTransport;
    try {
      wt = await this.sessions.session(node);
    } catch (e) {
      return { buf, got: 0, error: e instanceof FogError ? e : new FogError("handshake", String(e)) };
    }
    let timedOut: string | undefined;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
    let expire: (e: FogError) => void = () => undefined;
    const expired = new Promise<never>((_, reject) => (expire = reject));
    expired.catch(() => undefined);
    /** `p`, unless the timer fires first. */
    const within = <T>(p: Promise<T>) => Promise.race([p, expired]);
    const deadline = this.opts.chunkDeadlineMs === undefined ? Infinity : performance.now() + this.opts.chunkDeadlineMs;
    // Each piece re-arms the timer; when it fires the read is cancelled and the attempt ends as a timeout.
    const arm = (ms: number, what: string) => {
      clearTimeout(timer);
      const left = deadline - performance.now();
      const [wait, why] = left < ms ? [left, "chunk deadline"] : [ms, what];
      timer = setTimeout(() => {
        timedOut = why;
        reader?.cancel().catch(() => undefined);
        expire(new FogError("timeout", `${node.id}: ${why}`));
      }, Math.max(0, wait));
    };
    let stream: StreamReader | undefined;
    try {
      arm(this.opts.firstByteMs, "first byte");
      const bidi = await within(wt.createBidirectionalStream());
      const writer = bidi.writable.getWriter();
      // Not awaited: a node stops reading (STOP_SENDING) once it has the whole request, which can fail the
      // browser's close before the FIN is acknowledged. The response says whether the request was heard.
      writer.write(encodeRequest(req)).catch(() => undefined);
      writer.close().catch(() => undefined);
      reader = bidi.readable.getReader() as ReadableStreamDefaultReader<Uint8Array>;
      stream = new StreamReader(reader, () => arm(this.opts.stallMs, "stall"));
      const head = await within(readResponseHead(stream));
      if (!head.ok) return { buf, got: 0, error: new FogError(head.status, `${node.id}: ${head.message}`) };
      if (head.len !== len) {
        return { buf, got: 0, error: new FogError("bad_response", `${node.id} announced ${head.len} of ${len} bytes`) };
      }
      const got = await stream.readInto(buf);
      if (got < len) return { buf, got, error: new FogError(timedOut ? "timeout" : "stream_error", "short response") };
      if (!(await stream.atEnd())) return { buf, got: 0, error: new FogError("bad_response", "bytes past the payload") };
      return { buf, got };
    } catch (e) {
      // A reset mid-payload (code 1: the node's fill failed part-way) keeps the bytes that arrived.
      const got = stream?.filled ?? 0;
      return { buf, got, error: new FogError(timedOut ? "timeout" : "stream_error", `${node.id}: ${e}`) };
    } finally {
      clearTimeout(timer);
      reader?.cancel().catch(() => undefined);
    }
  }

  /** `length` bytes of `url` from `offset` (to the end if undefined), with `Range`; an origin that ignores
   * `Range` is read through to the offset. */
  private async fromOrigin(url: string, offset: number, length?: number): Promise<Uint8Array> {
    if (length === 0) return new Uint8Array(0);
    const range = length === undefined ? `bytes=${offset}-` : `bytes=${offset}-${offset + length - 1}`;
    const resp = await fetch(url, { headers: offset === 0 && length === undefined ? {} : { Range: range } });
    if (!resp.ok || !resp.body) throw new FogError("origin", `origin answered ${resp.status} for ${url}`);
    let skip = resp.status === 206 ? 0 : offset;
    const want = length ?? Number(resp.headers.get("content-length") ?? NaN) - skip;
    const parts: Uint8Array[] = [];
    let have = 0;
    const reader = resp.body.getReader();
    while (length === undefined || have < length) {
      const { value, done } = await reader.read();
      if (done) break;
      const piece = value.subarray(Math.min(skip, value.length));
      skip -= value.length - piece.length;
      const take = length === undefined ? piece : piece.subarray(0, length - have);
      have += take.length;
      if (have > this.opts.maxBytes) throw new FogError("too_large", `${url} is over maxBytes`);
      parts.push(take);
    }
    await reader.cancel().catch(() => undefined);
    if (length !== undefined && have < length) throw new FogError("origin", `origin sent ${have} of ${length} bytes`);
    if (length === undefined && Number.isFinite(want) && have !== want) {
      throw new FogError("origin", `origin sent ${have} of ${want} bytes`);
    }
    const out = new Uint8Array(have);
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  private creditNode(id: string, bytes: number, ms: number): void {
    this.totals.fog += bytes;
    const n = this.nodes.get(id) ?? { bytes: 0, ms: 0 };
    n.bytes += bytes;
    n.ms += ms;
    this.nodes.set(id, n);
  }

  private fail(node: string, reason: string): void {
    const key = `${node} ${reason}`;
    this.failures.set(key, (this.failures.get(key) ?? 0) + 1);
  }

  stats(): Stats {
    const { fog, origin, passthrough } = this.totals;
    const all = fog + origin + passthrough;
    return {
      fogBytes: fog,
      originBytes: origin,
      passthroughBytes: passthrough,
      offload: all === 0 ? 0 : fog / all,
      nodes: Object.fromEntries([...this.nodes].map(([id, n]) => [id, { ...n }])),
      failures: [...this.failures].map(([key, count]) => {
        const [node, reason] = key.split(" ");
        return { node, reason, count };
      }),
      fogDisabled: fogDisabled(),
      verifyInWorkers: this.verifier.inWorkers,
      receiptsHanded: this.receiptsHanded,
      tracker: this.trackers.current,
    };
  }

  /** Sends the tracker what happened since the last report (`POST /v1/reports`, as the player proxy does):
   * its dashboard counts fog and origin bytes, and failures make it probe the nodes named. */
  async report(): Promise<void> {
    const failures = new Map(this.failures);
    const totals = { ...this.totals };
    const node_failures = [...failures]
      .map(([key, count]) => {
        const [node, reason] = key.split(" ");
        return { node, reason, count: count - (this.reported.failures.get(key) ?? 0) };
      })
      .filter((f) => f.count > 0)
      .slice(0, MAX_REPORTED_FAILURES);
    const body = {
      fog_bytes: totals.fog - this.reported.fog,
      origin_bytes: totals.origin - this.reported.origin,
      passthrough_bytes: totals.passthrough - this.reported.passthrough,
      node_failures,
    };
    const init = { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
    const resp = await this.trackers.fetch("/v1/reports", init, false);
    if (!resp.ok) throw new FogError("tracker", `report: ${resp.status}`);
    this.reported = { ...totals, failures };
  }

  /** Closes the node sessions. */
  close(): void {
    this.sessions.close();
  }
}

/** Throws unless `offset`+`length` is within the object and `length` within `maxBytes`. */
function checkRange(m: Manifest, offset: number, length: number, maxBytes: number): void {
  if (offset < 0 || length < 0 || offset + length > m.size) {
    throw new FogError("bad_range", `range ${offset}+${length} is outside the object (${m.size} bytes)`);
  }
  if (length > maxBytes) throw new FogError("too_large", `${length} bytes is over maxBytes`);
}

/** Hands each node the newest receipt one fetch still owes it (the fetch's end). */
function payOwed(
  owed: Map<string, Owed>,
  handovers: Promise<void>[],
  handOver: (node: NodeContact, receipt: Receipt, ticket?: Uint8Array) => Promise<void>,
): void {
  for (const o of owed.values()) if (o.newest) handovers.push(handOver(o.node, o.newest, o.ticket));
  owed.clear();
}

/** The resolve's signed ticket as requests carry it (JSON), if it came with one. */
function ticketJson(r: Resolve): Uint8Array | undefined {
  return r.ticket === undefined ? undefined : new TextEncoder().encode(JSON.stringify(r.ticket));
}

export type { Manifest };
