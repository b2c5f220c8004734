// @fogcdn/shaka: Shaka Player fetches its media segments through the fog. See README.md.

export { register, type FogPluginOptions, type FogSource, type Shaka } from "./plugin.js";
