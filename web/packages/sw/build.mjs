// Builds dist/: the worker (`fog-sw.js`, a classic script with @fogcdn/core inside, as a site serves it at
// the root of the scope it serves) and the page helper, as a classic script that sets `window.FogSW`
// (`fog-sw-page.js`) and as an ES module (`fog-sw-page.mjs`).
import * as esbuild from "esbuild";

const common = { bundle: true, minify: true, target: "es2022", sourcemap: true, logLevel: "warning" };
await esbuild.build({ ...common, entryPoints: ["src/sw.ts"], format: "iife", outfile: "dist/fog-sw.js" });
await esbuild.build({
  ...common,
  entryPoints: ["src/page.ts"],
  format: "iife",
  globalName: "FogSW",
  outfile: "dist/fog-sw-page.js",
});
await esbuild.build({ ...common, entryPoints: ["src/page.ts"], format: "esm", outfile: "dist/fog-sw-page.mjs" });
