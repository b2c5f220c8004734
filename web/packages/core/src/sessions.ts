// WebTransport sessions to fog nodes, one per node, reused for every chunk. Chromium slows a page's later
// handshakes after each failed one (for 5 minutes), so a page dials at most two nodes at once and stops
// using the fog altogether after two failed handshakes: the origin alone is better than a throttled page.

import { FogError } from "./errors.js";
import { fromHex, type NodeContact } from "./manifest.js";

const MAX_DIALS = 2;
const MAX_FAILED_HANDSHAKES = 2;

/** Page-wide, like the browser's throttling it avoids: every client on the page shares it. */
const page = { dialing: 0, waiting: [] as (() => void)[], failedHandshakes: 0 };

/** Whether the fog is off for this page (too many failed handshakes). */
export function fogDisabled(): boolean {
  return page.failedHandshakes >= MAX_FAILED_HANDSHAKES;
}

async function dialSlot(): Promise<() => void> {
  while (page.dialing >= MAX_DIALS) await new Promise<void>((r) => page.waiting.push(r));
  page.dialing++;
  return () => {
    page.dialing--;
    page.waiting.shift()?.();
  };
}

export class Sessions {
  private open = new Map<string, Promise<WebTransport>>();

  constructor(private readonly handshakeTimeoutMs: number) {}

  /** The session to `node`, dialled on first use; a closed one is dialled again. */
  session(node: NodeContact): Promise<WebTransport> {
    let s = this.open.get(node.id);
    if (s === undefined) {
      s = this.dial(node);
      this.open.set(node.id, s);
      // A closed or failed session is forgotten, so the next chunk for the node dials again.
      const forget = () => {
        if (this.open.get(node.id) === s) this.open.delete(node.id);
      };
      s.then((wt) => wt.closed.then(forget, forget), forget);
    }
    return s;
  }

  private async dial(node: NodeContact): Promise<WebTransport> {
    const web = node.web;
    if (!web) throw new FogError("no_web_endpoint", `node ${node.id} has no WebTransport endpoint`);
    const release = await dialSlot();
    try {
      if (fogDisabled()) throw new FogError("fog_disabled", "fog is off for this page after failed handshakes");
      const serverCertificateHashes = web.cert_hashes.map((h) => ({
        algorithm: "sha-256",
        value: fromHex(h) as BufferSource,
      }));
      const wt = new WebTransport(web.url, { serverCertificateHashes });
      // A failed handshake rejects `closed` too; `ready` is where it is handled.
      wt.closed.catch(() => undefined);
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new FogError("timeout", "handshake timed out")), this.handshakeTimeoutMs);
      });
      try {
        await Promise.race([wt.ready, timeout]);
      } catch (e) {
        page.failedHandshakes++;
        wt.close();
        throw e instanceof FogError ? e : new FogError("handshake", `handshake with ${web.url} failed: ${e}`);
      } finally {
        clearTimeout(timer);
      }
      return wt;
    } finally {
      release();
    }
  }

  close(): void {
    for (const s of this.open.values()) s.then((wt) => wt.close(), () => undefined);
    this.open.clear();
  }
}
