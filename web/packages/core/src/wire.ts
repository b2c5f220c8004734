// The `fog/1` request and response frames (docs/protocol.md, "QUIC chunk protocol"; proto/src/wire.rs is
// the reference, with hex test vectors). A page sends them on WebTransport bidirectional streams exactly as
// native clients send them on QUIC streams. All integers are big-endian.

import { FogError } from "./errors.js";

const VERSION = 1;
const FLAG_RANGE = 1;
const FLAG_ORIGIN = 2;
const FLAG_RECEIPT = 4;
const FLAG_TICKET = 8;
const FLAG_GROUPS = 16;
/** Limits a node enforces; a request past them would be refused, so it is never sent. */
const MAX_URL_LEN = 2048;
const MAX_TICKET_LEN = 4096;
const MAX_RECEIPT_LEN = 2048;
const MAX_GROUPS_PER_CHUNK = 256;
/** Largest payload a response may announce (one whole chunk, 16 MiB). */
export const MAX_PAYLOAD_LEN = 16 << 20;
const MAX_MESSAGE_LEN = 1024;

export interface ChunkRequest {
  hash: Uint8Array;
  /** Bytes within the chunk: [offset, length]. */
  range?: [number, number];
  /** Where the node may fill a miss from, licensed by `ticket`. */
  origin?: { url: string; offset: number; length: number };
  /** JSON of a credit receipt for chunks this node delivered (an all-zero hash asks for nothing else). */
  receipt?: Uint8Array;
  /** JSON of the tracker-signed ticket. */
  ticket?: Uint8Array;
  /** Group size and the chunk's group hashes (32 bytes each, concatenated), for the node's cut-through. */
  groups?: { size: number; hashes: Uint8Array };
}

const utf8 = new TextEncoder();

/** The request as it goes on the wire: u16 body length, then the body. Oversized optional fields are left
 * out (the node would refuse the whole request), so a request is always one a node accepts. */
export function encodeRequest(req: ChunkRequest): Uint8Array {
  const url = req.origin ? utf8.encode(req.origin.url) : undefined;
  const origin = url && url.length <= MAX_URL_LEN ? req.origin : undefined;
  const receipt = req.receipt && req.receipt.length <= MAX_RECEIPT_LEN ? req.receipt : undefined;
  const ticket = req.ticket && req.ticket.length <= MAX_TICKET_LEN ? req.ticket : undefined;
  const groupCount = req.groups ? req.groups.hashes.length / 32 : 0;
  const groups = req.groups && groupCount <= MAX_GROUPS_PER_CHUNK ? req.groups : undefined;
  let len = 2 + 32;
  if (req.range) len += 8;
  if (origin && url) len += 8 + 4 + 2 + url.length;
  if (receipt) len += 2 + receipt.length;
  if (ticket) len += 2 + ticket.length;
  if (groups) len += 1 + 2 + groups.hashes.length;
  const out = new Uint8Array(2 + len);
  const view = new DataView(out.buffer);
  view.setUint16(0, len);
  out[2] = VERSION;
  out[3] =
    (req.range ? FLAG_RANGE : 0) |
    (origin ? FLAG_ORIGIN : 0) |
    (receipt ? FLAG_RECEIPT : 0) |
    (ticket ? FLAG_TICKET : 0) |
    (groups ? FLAG_GROUPS : 0);
  out.set(req.hash, 4);
  let at = 36;
  if (req.range) {
    view.setUint32(at, req.range[0]);
    view.setUint32(at + 4, req.range[1]);
    at += 8;
  }
  if (origin && url) {
    view.setBigUint64(at, BigInt(origin.offset));
    view.setUint32(at + 8, origin.length);
    view.setUint16(at + 12, url.length);
    out.set(url, at + 14);
    at += 14 + url.length;
  }
  for (const field of [receipt, ticket]) {
    if (!field) continue;
    view.setUint16(at, field.length);
    out.set(field, at + 2);
    at += 2 + field.length;
  }
  if (groups) {
    out[at] = Math.log2(groups.size);
    view.setUint16(at + 1, groupCount);
    out.set(groups.hashes, at + 3);
  }
  return out;
}

/** Status codes of a response head. */
export const STATUS_NAMES = [
  "ok",
  "not_found",
  "bad_request",
  "origin_failed",
  "origin_mismatch",
  "origin_not_allowed",
  "busy",
  "internal",
] as const;

/** Reads a stream's bytes in exactly the amounts asked for, never holding more than one piece past them. */
export class StreamReader {
  private pending: Uint8Array = new Uint8Array(0);
  /** How much of the buffer the last `readInto` filled, also when it threw (a reset mid-payload). */
  filled = 0;

  constructor(
    private readonly reader: ReadableStreamDefaultReader<Uint8Array>,
    /** Called with each piece's size as it arrives (progress, stall timers). */
    private readonly onBytes: (n: number) => void,
  ) {}

  /** Fills `into` from the stream; gives how many bytes it got (fewer only if the stream ended). */
  async readInto(into: Uint8Array): Promise<number> {
    this.filled = 0;
    while (this.filled < into.length) {
      if (this.pending.length === 0) {
        const { value, done } = await this.reader.read();
        if (done) return this.filled;
        this.onBytes(value.length);
        this.pending = value;
      }
      const n = Math.min(this.pending.length, into.length - this.filled);
      into.set(this.pending.subarray(0, n), this.filled);
      this.pending = this.pending.subarray(n);
      this.filled += n;
    }
    return this.filled;
  }

  async exact(n: number, what: string): Promise<Uint8Array> {
    const buf = new Uint8Array(n);
    if ((await this.readInto(buf)) < n) throw new FogError("stream_error", `the stream ended inside the ${what}`);
    return buf;
  }

  /** Whether the stream ends here, as a response must after its payload. */
  async atEnd(): Promise<boolean> {
    if (this.pending.length > 0) return false;
    const { value, done } = await this.reader.read();
    return done || value.length === 0;
  }
}

export type ResponseHead = { ok: true; len: number } | { ok: false; status: string; message: string };

export async function readResponseHead(r: StreamReader): Promise<ResponseHead> {
  const status = (await r.exact(1, "response status"))[0];
  if (status === 0) {
    const len = new DataView((await r.exact(4, "payload length")).buffer).getUint32(0);
    if (len > MAX_PAYLOAD_LEN) throw new FogError("bad_response", `payload length ${len} is over 16 MiB`);
    return { ok: true, len };
  }
  const name = STATUS_NAMES[status];
  if (name === undefined) throw new FogError("bad_response", `unknown status ${status}`);
  const msgLen = new DataView((await r.exact(2, "message length")).buffer).getUint16(0);
  if (msgLen > MAX_MESSAGE_LEN) throw new FogError("bad_response", `message length ${msgLen} is over 1024`);
  const message = new TextDecoder().decode(await r.exact(msgLen, "message"));
  return { ok: false, status: name, message };
}
