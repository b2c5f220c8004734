// Builds dist/: the loader as an ES module and as a classic script that sets `window.FogHls`. Neither
// bundles hls.js or @fogcdn/core: the page has its own hls.js, and hands the loader its FogClient.
import * as esbuild from "esbuild";

const common = { bundle: true, minify: true, target: "es2022", logLevel: "warning", sourcemap: true };
await esbuild.build({ ...common, entryPoints: ["src/index.ts"], format: "esm", outfile: "dist/fog-hlsjs.mjs" });
await esbuild.build({
  ...common,
  entryPoints: ["src/index.ts"],
  format: "iife",
  globalName: "FogHls",
  outfile: "dist/fog-hlsjs.js",
});
