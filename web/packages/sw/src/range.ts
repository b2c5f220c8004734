// HTTP byte ranges as media elements send them (RFC 9110 §14): Chromium and Firefox ask `bytes=N-` to start
// and to seek; other players may ask `bytes=N-M` or a suffix `bytes=-N`. Answers are 206 with the range's
// `Content-Range`, 200 with the whole object when there is no usable `Range`, or 416.

/** What a `Range` header asks for, before the object's size is known. */
export type RangeRequest =
  /** The whole object: no `Range`, or one the server may ignore (not bytes, several ranges, malformed). */
  | { kind: "whole" }
  /** From byte `start`, to byte `end` inclusive if given, else to the end. */
  | { kind: "from"; start: number; end?: number }
  /** The last `length` bytes. */
  | { kind: "suffix"; length: number };

/** Longest header value parsed: a real single range is far shorter. */
const MAX_RANGE_HEADER = 256;

/** Parses a `Range` header value (null: no header). A malformed, unsupported (several ranges) or
 * over-long one asks for the whole object, which RFC 9110 allows a server to answer. */
export function parseRange(header: string | null): RangeRequest {
  if (header === null || header.length > MAX_RANGE_HEADER) return { kind: "whole" };
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(header);
  if (!m || (m[1] === "" && m[2] === "")) return { kind: "whole" };
  const [first, last] = [m[1] === "" ? undefined : Number(m[1]), m[2] === "" ? undefined : Number(m[2])];
  if ((first !== undefined && !Number.isSafeInteger(first)) || (last !== undefined && !Number.isSafeInteger(last))) {
    return { kind: "whole" };
  }
  if (first === undefined) return { kind: "suffix", length: last! };
  if (last !== undefined && last < first) return { kind: "whole" };
  return last === undefined ? { kind: "from", start: first } : { kind: "from", start: first, end: last };
}

/** The bytes to send of an object of `size` bytes: `offset` and `length`, and whether it is a part (206)
 * or the whole (200); or "unsatisfiable" (416). */
export type RangePlan = { offset: number; length: number; partial: boolean } | "unsatisfiable";

export function planRange(req: RangeRequest, size: number): RangePlan {
  switch (req.kind) {
    case "whole":
      return { offset: 0, length: size, partial: false };
    case "from": {
      if (req.start >= size) return "unsatisfiable";
      const end = Math.min(req.end ?? size - 1, size - 1);
      return { offset: req.start, length: end - req.start + 1, partial: true };
    }
    case "suffix": {
      // RFC 9110: a suffix longer than the object selects all of it; a zero-length suffix nothing.
      if (req.length === 0 || size === 0) return "unsatisfiable";
      const length = Math.min(req.length, size);
      return { offset: size - length, length, partial: true };
    }
  }
}

/** What the origin said of the object, repeated to the player. */
export interface ObjectInfo {
  size: number;
  contentType?: string;
  etag?: string;
}

/** Status and headers of the answer to `plan` for `object`. */
export function responseHead(plan: RangePlan, object: ObjectInfo): { status: number; headers: Headers } {
  const headers = new Headers({ "accept-ranges": "bytes" });
  if (plan === "unsatisfiable") {
    headers.set("content-range", `bytes */${object.size}`);
    headers.set("content-length", "0");
    return { status: 416, headers };
  }
  headers.set("content-length", String(plan.length));
  if (object.contentType) headers.set("content-type", object.contentType);
  if (object.etag) headers.set("etag", object.etag);
  if (!plan.partial) return { status: 200, headers };
  headers.set("content-range", `bytes ${plan.offset}-${plan.offset + plan.length - 1}/${object.size}`);
  return { status: 206, headers };
}
