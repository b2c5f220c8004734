// Builds dist/: the loader as an ES module and as a classic script that sets `window.FogShaka`. Neither
// bundles Shaka Player or @fogcdn/core: the page has its own Shaka Player, and hands the plugin its FogClient.
import * as esbuild from "esbuild";

const common = { bundle: true, minify: true, target: "es2022", logLevel: "warning", sourcemap: true };
await esbuild.build({ ...common, entryPoints: ["src/index.ts"], format: "esm", outfile: "dist/fog-shaka.mjs" });
await esbuild.build({
  ...common,
  entryPoints: ["src/index.ts"],
  format: "iife",
  globalName: "FogShaka",
  outfile: "dist/fog-shaka.js",
});
