// A fragment loader for hls.js (its `fLoader` hook): media segments and init segments come through a
// FogClient (from fog nodes, verified, the origin filling in), everything else through hls.js's own loader.
// It fills hls.js's LoaderStats as a network loader does, so hls.js's bandwidth estimate and its rules for
// abandoning a slow fragment see the fog's real throughput.

import type { FogClient } from "@fogcdn/core";
import type {
  FragmentLoaderContext,
  HlsConfig,
  Loader,
  LoaderCallbacks,
  LoaderConfiguration,
  LoaderStats,
} from "hls.js";

/** What the loader needs of a `FogClient`. */
export type FogSource = Pick<FogClient, "open">;

export interface FogLoaderOptions {
  /** How long a segment may take through the fog before hls.js's loader reads it from the origin instead
   * (default: the segment's duration, at least 1 s; 4 s for init segments). A dead node can hold a chunk
   * for the client's whole first-byte timeout per scheduled node; the player's buffer cannot. */
  deadlineMs?: number;
}

const MIN_DEADLINE_MS = 1000;
const INIT_DEADLINE_MS = 4000;

type FragmentLoader = Loader<FragmentLoaderContext>;

function newStats(retry = 0): LoaderStats {
  return {
    aborted: false,
    loaded: 0,
    retry,
    total: 0,
    chunkCount: 0,
    bwEstimate: 0,
    loading: { start: 0, first: 0, end: 0 },
    parsing: { start: 0, end: 0 },
    buffering: { start: 0, first: 0, end: 0 },
  };
}

/** The class to pass as hls.js's `fLoader`: `new Hls({ fLoader: fogLoader(fog) })`. Segments it cannot
 * take from the fog (LL-HLS parts, non-HTTP URLs, an object the tracker will not resolve, a failed read)
 * go to hls.js's default `loader`, which must not be this class. */
export function fogLoader(fog: FogSource, options: FogLoaderOptions = {}): new (config: HlsConfig) => FragmentLoader {
  return class FogFragmentLoader implements FragmentLoader {
    context: FragmentLoaderContext | null = null;
    // hls.js keeps this object as the fragment's stats (`frag.stats = loader.stats`): it is filled in place.
    stats: LoaderStats = newStats();
    private callbacks: LoaderCallbacks<FragmentLoaderContext> | null = null;
    /** hls.js's default loader, once a request went to it. */
    private fallback: FragmentLoader | null = null;
    private reader: ReadableStreamDefaultReader<Uint8Array> | null = null;
    private timer: ReturnType<typeof setTimeout> | undefined;
    private deadline: ReturnType<typeof setTimeout> | undefined;
    /** Set once the fog's attempt may no longer call back: finished, aborted, timed out or handed over. */
    private ended = false;

    constructor(private readonly hlsConfig: HlsConfig) {
      if ((hlsConfig.loader as unknown) === FogFragmentLoader) {
        throw new Error("fogcdn: pass fogLoader(fog) as hls.js's fLoader, not as its loader");
      }
    }

    load(
      context: FragmentLoaderContext,
      config: LoaderConfiguration,
      callbacks: LoaderCallbacks<FragmentLoaderContext>,
    ): void {
      if (this.stats.loading.start) throw new Error("Loader can only be used once.");
      this.context = context;
      this.callbacks = callbacks;
      // LL-HLS parts are wanted at the live edge as soon as the origin has them; the fog hands out whole
      // verified chunks, so they stay with the origin.
      if (context.part || !/^https?:/i.test(context.url)) {
        this.handOver(context, config, callbacks);
        return;
      }
      this.stats.loading.start = performance.now();
      void this.fromFog(context, config, callbacks);
    }

    private async fromFog(
      context: FragmentLoaderContext,
      config: LoaderConfiguration,
      callbacks: LoaderCallbacks<FragmentLoaderContext>,
    ): Promise<void> {
      const stats = this.stats;
      const { maxTimeToFirstByteMs, maxLoadTimeMs } = config.loadPolicy;
      const limit = (ms: number) => (Number.isFinite(ms) && ms > 0 ? ms : undefined);
      this.arm(limit(maxTimeToFirstByteMs) ?? limit(maxLoadTimeMs), context, callbacks);
      const duration = context.frag.duration * 1000;
      const deadlineMs =
        options.deadlineMs ?? (duration > 0 ? Math.max(MIN_DEADLINE_MS, duration) : INIT_DEADLINE_MS);
      this.deadline = setTimeout(() => {
        console.warn(`fogcdn: ${context.url} not through the fog within ${deadlineMs} ms, from the origin`);
        this.handOver(context, config, callbacks);
      }, deadlineMs);
      // hls.js's rangeEnd is exclusive; no rangeEnd: the whole object.
      const start = context.rangeStart ?? 0;
      const ranged = Boolean(context.rangeEnd);
      try {
        const object = await fog.open(context.url, start);
        if (this.ended) return;
        const range = { offset: start, length: ranged ? context.rangeEnd! - start : object.size - start };
        const reader = object.stream(range).getReader();
        this.reader = reader;
        // The tracker answered and the size is known: the fog's equivalent of a response's headers.
        stats.loading.first = Math.max(performance.now(), stats.loading.start);
        stats.total = range.length;
        const load = limit(maxLoadTimeMs);
        this.arm(load === undefined ? undefined : load - (stats.loading.first - stats.loading.start), context, callbacks);
        const data = new Uint8Array(range.length);
        for (;;) {
          const { value, done } = await reader.read();
          if (this.ended) return;
          if (done) break;
          // Throws (and the segment goes to hls.js's loader) if the fog sent more than the range.
          data.set(value, stats.loaded);
          stats.loaded += value.length;
          stats.chunkCount++;
        }
        if (stats.loaded !== range.length) throw new Error(`the fog delivered ${stats.loaded} of ${range.length} bytes`);
        this.stop();
        stats.loading.end = Math.max(performance.now(), stats.loading.first);
        stats.bwEstimate = (stats.total * 8000) / Math.max(1, stats.loading.end - stats.loading.first);
        callbacks.onProgress?.(stats, context, data.buffer, null);
        callbacks.onSuccess({ url: context.url, data: data.buffer, code: ranged ? 206 : 200 }, stats, context, null);
      } catch (e) {
        if (this.ended) return;
        console.warn(`fogcdn: ${context.url} goes to hls.js's loader: ${e}`);
        this.handOver(context, config, callbacks);
      }
    }

    /** (Re)arms the timeout: `ms` from now, hls.js is told of a timeout (its retry policy decides what next). */
    private arm(ms: number | undefined, context: FragmentLoaderContext, callbacks: LoaderCallbacks<FragmentLoaderContext>) {
      clearTimeout(this.timer);
      if (ms === undefined) return;
      this.timer = setTimeout(() => {
        this.stop();
        callbacks.onTimeout(this.stats, context, null);
      }, Math.max(0, ms));
    }

    /** Ends the fog's attempt: no more callbacks from it, its stream cancelled (receipts still handed). */
    private stop(): void {
      this.ended = true;
      clearTimeout(this.timer);
      clearTimeout(this.deadline);
      this.reader?.cancel().catch(() => undefined);
      this.reader = null;
    }

    /** Sends the request to hls.js's default loader, which fills the same stats object hls.js holds. */
    private handOver(
      context: FragmentLoaderContext,
      config: LoaderConfiguration,
      callbacks: LoaderCallbacks<FragmentLoaderContext>,
    ): void {
      this.stop();
      Object.assign(this.stats, newStats(this.stats.retry));
      const fallback = new this.hlsConfig.loader(this.hlsConfig) as FragmentLoader;
      fallback.stats = this.stats;
      this.fallback = fallback;
      fallback.load(context, config, callbacks);
    }

    abort(): void {
      if (this.fallback) {
        this.fallback.abort();
        return;
      }
      if (!this.ended) this.stats.aborted = true;
      this.stop();
      if (this.context) this.callbacks?.onAbort?.(this.stats, this.context, null);
    }

    destroy(): void {
      this.stop();
      this.fallback?.destroy();
      this.fallback = null;
      this.callbacks = null;
      this.context = null;
    }

    getCacheAge(): number | null {
      return this.fallback?.getCacheAge?.() ?? null;
    }

    getResponseHeader(name: string): string | null {
      return this.fallback?.getResponseHeader?.(name) ?? null;
    }
  };
}
