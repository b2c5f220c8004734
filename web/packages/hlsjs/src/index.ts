// @fogcdn/hlsjs: hls.js fetches its media segments through the fog. See README.md.

export { fogLoader, type FogLoaderOptions, type FogSource } from "./loader.js";
