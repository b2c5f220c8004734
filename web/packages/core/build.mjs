// Builds dist/: the verification worker first (its code is embedded in the bundle and started from a
// blob: URL, so a site serves one file), then the library as an ES module and as a classic script that
// sets `window.Fog`.
import * as esbuild from "esbuild";

const common = { bundle: true, minify: true, target: "es2022", logLevel: "warning" };
const worker = await esbuild.build({
  ...common,
  entryPoints: ["src/worker.ts"],
  format: "iife",
  write: false,
});
const define = { __FOG_VERIFY_WORKER__: JSON.stringify(worker.outputFiles[0].text) };
await esbuild.build({
  ...common,
  entryPoints: ["src/index.ts"],
  format: "esm",
  define,
  sourcemap: true,
  outfile: "dist/fog-core.mjs",
});
await esbuild.build({
  ...common,
  entryPoints: ["src/index.ts"],
  format: "iife",
  globalName: "Fog",
  define,
  sourcemap: true,
  outfile: "dist/fog-core.js",
});
