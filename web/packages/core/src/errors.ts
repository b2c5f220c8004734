/** Why the fog could not deliver something. `reason` is the short code the tracker's reports use
 * (`node_failures[].reason`): timeout, handshake, stream_error, hash_mismatch, a node's status name, … */
export class FogError extends Error {
  constructor(
    readonly reason: string,
    message: string,
  ) {
    super(message);
    this.name = "FogError";
  }
}
