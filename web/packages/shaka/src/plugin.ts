// A networking scheme plugin for Shaka Player (http and https): segment requests come through a FogClient
// (from fog nodes, verified, the origin filling in), everything else through Shaka's own HTTP plugin. It
// reports progress as Shaka's HTTP plugins do, so Shaka's bandwidth estimator and its stall and connection
// timeouts see the fog's real throughput.

import type { FogClient } from "@fogcdn/core";

/** What the plugin needs of a `FogClient`. */
export type FogSource = Pick<FogClient, "open">;

/** The parts of Shaka's request (`shaka.extern.Request`) the plugin reads. */
interface ShakaRequest {
  method: string;
  body: BufferSource | null;
  headers: Record<string, string>;
  allowCrossSiteCredentials: boolean;
  retryParameters: { timeout: number };
  streamDataCallback?: ((data: Uint8Array) => Promise<unknown>) | null;
}

interface ShakaResponse {
  uri: string;
  originalUri: string;
  data: ArrayBuffer;
  status: number;
  headers: Record<string, string>;
  fromCache: boolean;
  originalRequest: ShakaRequest;
}

interface Operation<T> {
  promise: Promise<T>;
  abort(): Promise<unknown>;
}

type ProgressUpdated = (elapsedMs: number, bytes: number, bytesRemaining: number) => void;
type HeadersReceived = (headers: Record<string, string>) => void;
type SchemePlugin = (
  uri: string,
  request: ShakaRequest,
  requestType: number,
  progressUpdated: ProgressUpdated,
  headersReceived: HeadersReceived,
  config: unknown,
) => Operation<ShakaResponse>;

/** The parts of the `shaka` namespace the plugin uses. */
export interface Shaka {
  net: {
    NetworkingEngine: {
      registerScheme(scheme: string, plugin: SchemePlugin, priority?: number, progressSupport?: boolean): void;
      RequestType: { SEGMENT: number };
      PluginPriority: { APPLICATION: number };
    };
    HttpFetchPlugin: { parse: SchemePlugin; isSupported(): boolean };
    HttpXHRPlugin: { parse: SchemePlugin };
  };
  util: {
    AbortableOperation: new <T>(promise: Promise<T>, onAbort: () => Promise<unknown>) => Operation<T>;
    Error: {
      new (severity: number, category: number, code: number, ...data: unknown[]): Error;
      Severity: { RECOVERABLE: number };
      Category: { NETWORK: number };
      Code: { OPERATION_ABORTED: number; TIMEOUT: number; HTTP_ERROR: number };
    };
  };
}

export interface FogPluginOptions {
  /** How long a segment may take through the fog, before any of it reached Shaka, until Shaka's HTTP
   * plugin reads it from the origin instead (default 4000). A dead node can hold a chunk for the client's
   * whole first-byte timeout per scheduled node; the player's buffer cannot. */
  deadlineMs?: number;
}

const DEFAULT_DEADLINE_MS = 4000;

/** Routes Shaka's http and https segment requests through `fog` (for every player on the page). Call it
 * once, after loading Shaka Player and before `player.load`. */
export function register(shaka: Shaka, fog: FogSource, options: FogPluginOptions = {}): void {
  const deadlineMs = options.deadlineMs ?? DEFAULT_DEADLINE_MS;
  const { NetworkingEngine, HttpFetchPlugin, HttpXHRPlugin } = shaka.net;
  const fallback = HttpFetchPlugin.isSupported() ? HttpFetchPlugin.parse : HttpXHRPlugin.parse;
  const plugin: SchemePlugin = (uri, request, requestType, progressUpdated, headersReceived, config) => {
    const range = segmentRange(request);
    // Manifests, licences and the like stay with the origin, as do requests the fog cannot replay (a body,
    // credentials, headers other than Range).
    if (requestType !== NetworkingEngine.RequestType.SEGMENT || range === undefined) {
      return fallback(uri, request, requestType, progressUpdated, headersReceived, config);
    }
    const stop = new AbortController();
    let why: "aborted" | "timeout" | "deadline" | undefined;
    let delegated: Operation<ShakaResponse> | undefined;
    /** Whether Shaka's stream callback got bytes already: then the request cannot start over elsewhere. */
    const streamed = { any: false };
    const fail = (code: number, cause?: unknown) =>
      cause === undefined
        ? new shaka.util.Error(shaka.util.Error.Severity.RECOVERABLE, shaka.util.Error.Category.NETWORK, code, uri, requestType)
        : new shaka.util.Error(shaka.util.Error.Severity.RECOVERABLE, shaka.util.Error.Category.NETWORK, code, uri, cause, requestType);
    const run = async (): Promise<ShakaResponse> => {
      try {
        return await fromFog(fog, uri, request, range, progressUpdated, headersReceived, stop.signal, streamed);
      } catch (e) {
        if (why === "aborted") throw fail(shaka.util.Error.Code.OPERATION_ABORTED);
        if (why === "timeout") throw fail(shaka.util.Error.Code.TIMEOUT);
        // The core's stream fails only when the origin failed too; Shaka's retry policy decides.
        if (streamed.any) throw fail(shaka.util.Error.Code.HTTP_ERROR, e);
        const reason = why === "deadline" ? `not through the fog within ${deadlineMs} ms` : String(e);
        console.warn(`fogcdn: ${uri} goes to Shaka's HTTP plugin: ${reason}`);
        delegated = fallback(uri, request, requestType, progressUpdated, headersReceived, config);
        return delegated.promise;
      } finally {
        clearTimeout(timer);
        clearTimeout(deadline);
      }
    };
    // Once bytes went to Shaka's stream callback the fog must finish the segment (it falls back to the
    // origin itself, chunk by chunk).
    const deadline = setTimeout(() => {
      if (streamed.any || why !== undefined) return;
      why = "deadline";
      stop.abort();
    }, deadlineMs);
    // As Shaka's HTTP plugins do: the request's timeout covers the whole transfer.
    const timeout = request.retryParameters.timeout;
    const timer =
      timeout > 0
        ? setTimeout(() => {
            if (delegated) return;
            why = "timeout";
            stop.abort();
          }, timeout)
        : undefined;
    return new shaka.util.AbortableOperation(run(), async () => {
      why ??= "aborted";
      stop.abort();
      await delegated?.abort();
    });
  };
  for (const scheme of ["http", "https"]) {
    NetworkingEngine.registerScheme(scheme, plugin, NetworkingEngine.PluginPriority.APPLICATION, true);
  }
}

/** The byte range a GET asks for (`Range: bytes=a-b` or `bytes=a-`; none: the whole object), or undefined
 * when the request is not one the fog can answer. */
function segmentRange(request: ShakaRequest): { offset: number; end?: number } | undefined {
  if (request.method !== "GET" || request.body || request.allowCrossSiteCredentials) return undefined;
  let range: { offset: number; end?: number } = { offset: 0 };
  for (const [name, value] of Object.entries(request.headers)) {
    if (name.toLowerCase() !== "range") return undefined;
    const m = /^bytes=(\d+)-(\d*)$/.exec(value.trim());
    if (!m) return undefined;
    range = { offset: Number(m[1]), end: m[2] === "" ? undefined : Number(m[2]) + 1 };
    if (range.end !== undefined && range.end <= range.offset) return undefined;
  }
  return range;
}

async function fromFog(
  fog: FogSource,
  uri: string,
  request: ShakaRequest,
  range: { offset: number; end?: number },
  progressUpdated: ProgressUpdated,
  headersReceived: HeadersReceived,
  signal: AbortSignal,
  streamed: { any: boolean },
): Promise<ShakaResponse> {
  const object = await fog.open(uri, range.offset);
  signal.throwIfAborted();
  const length = Math.min(range.end ?? object.size, object.size) - range.offset;
  const reader = object.stream({ offset: range.offset, length }).getReader();
  // Cancelling the stream stops further chunk requests (those under way still pay their nodes).
  const cancel = () => reader.cancel().catch(() => undefined);
  signal.addEventListener("abort", cancel, { once: true });
  try {
    // The tracker answered and the size is known: the fog's equivalent of a response's headers. Shaka
    // counts the time to here as time to first byte, and progress from here as throughput.
    const headers: Record<string, string> = { "content-length": String(length) };
    if (object.contentType) headers["content-type"] = object.contentType;
    headersReceived(headers);
    let last = performance.now();
    const data = new Uint8Array(length);
    let loaded = 0;
    for (;;) {
      const { value, done } = await reader.read();
      signal.throwIfAborted();
      if (done) break;
      // Throws (and the request goes to Shaka's plugin) if the fog sent more than the range.
      data.set(value, loaded);
      loaded += value.length;
      // As Shaka's HTTP plugins do: verified bytes go on to Shaka as they come (its segment prefetch and
      // low-latency streaming take them so).
      if (request.streamDataCallback) {
        streamed.any = true;
        await request.streamDataCallback(value);
        signal.throwIfAborted();
      }
      const now = performance.now();
      progressUpdated(now - last, value.length, length - loaded);
      last = now;
    }
    if (loaded !== length) throw new Error(`the fog delivered ${loaded} of ${length} bytes`);
    return {
      uri,
      originalUri: uri,
      data: data.buffer,
      status: range.offset > 0 || range.end !== undefined ? 206 : 200,
      headers,
      fromCache: false,
      originalRequest: request,
    };
  } finally {
    signal.removeEventListener("abort", cancel);
  }
}
