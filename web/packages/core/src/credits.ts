// PayWord receipts (docs/credits.md; proto/src/credits.rs is the reference): the page pays each node for
// the chunks it delivered and that verified, so volunteers are credited for browser traffic as for native
// clients. One ed25519 signature per node (a commitment to a hash chain's anchor, signed in WebCrypto), then
// one chain link per chunk.

import { createBLAKE3 } from "hash-wasm";

import { blake3Hex } from "./verify.js";

/** The tracker's signed envelope (`api::Signed`): `payload` is the exact JSON text that was signed. */
export interface Signed {
  node_id: string;
  payload: string;
  signature: string;
}

interface Ticket {
  session: string;
  client_key: string;
  nodes: string[];
  assigned_chunks: number[];
  epoch: number;
}

/** A receipt as nodes take it (`credits::Receipt`). */
export interface Receipt {
  commitment: Signed;
  index: number;
  preimage: string;
}

/** Longest chain the page builds: a node assigned more chunks than this is paid for none (bounds the
 * hashing and memory one ticket can ask of the page). */
const MAX_PAID_CHAIN = 1 << 16;

const hex = (b: Uint8Array) => Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");

/** The session key a page resolves with: the tracker names it in the ticket. */
export interface SessionKey {
  pair: CryptoKeyPair;
  hex: string;
}

interface Chain {
  commitment: Signed;
  /** `links[i]` pays for the i-th chunk; `links[0]` is the anchor. */
  links: string[];
  paid: number;
}

/** The payments of one resolve's ticket, one chain per node. */
export class Payments {
  private chains = new Map<string, Promise<Chain | undefined>>();

  private constructor(
    private readonly key: SessionKey,
    private readonly ticket: Ticket,
    private readonly ticketId: string,
  ) {}

  /** Payments under `signed` (the resolve's ticket), if it names this page's key. */
  static async open(signed: Signed, key: SessionKey): Promise<Payments | undefined> {
    const ticket = JSON.parse(signed.payload) as Ticket;
    if (ticket.client_key !== key.hex) return undefined;
    return new Payments(key, ticket, await blake3Hex(new TextEncoder().encode(signed.payload)));
  }

  /** A receipt paying `node` for one more verified chunk, or undefined if the ticket pays it no more. */
  async pay(node: string): Promise<Receipt | undefined> {
    let chain = this.chains.get(node);
    if (chain === undefined) {
      chain = this.commit(node);
      this.chains.set(node, chain);
    }
    const c = await chain;
    if (c === undefined || c.paid >= c.links.length - 1) return undefined;
    c.paid++;
    return { commitment: c.commitment, index: c.paid, preimage: c.links[c.paid] };
  }

  private async commit(node: string): Promise<Chain | undefined> {
    const slot = this.ticket.nodes.indexOf(node);
    const length = this.ticket.assigned_chunks[slot];
    if (slot < 0 || !(length > 0 && length <= MAX_PAID_CHAIN)) return undefined;
    // chain[length] is a random seed; chain[i] = BLAKE3("fog-payword-v1" ‖ chain[i + 1]).
    const h = await createBLAKE3();
    const tag = new TextEncoder().encode("fog-payword-v1");
    const links = new Array<string>(length + 1);
    let link: Uint8Array = crypto.getRandomValues(new Uint8Array(32));
    links[length] = hex(link);
    for (let i = length - 1; i >= 0; i--) {
      h.init();
      h.update(tag);
      h.update(link);
      link = h.digest("binary");
      links[i] = hex(link);
    }
    const payload = JSON.stringify({
      session: this.ticket.session,
      ticket_id: this.ticketId,
      node,
      anchor: links[0],
      length,
      epoch: this.ticket.epoch,
    });
    const signedBytes = new TextEncoder().encode(`fog-signed-v1\0commitment\0${payload}`);
    const signature = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, this.key.pair.privateKey, signedBytes));
    return { commitment: { node_id: this.key.hex, payload, signature: hex(signature) }, links, paid: 0 };
  }
}
