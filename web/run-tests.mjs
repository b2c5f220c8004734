// Bundles a package's tests (test/*.test.ts, TypeScript) for Node's own test runner and runs them; each
// package's `npm test` runs it in the package's folder.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";

import * as esbuild from "esbuild";

const tests = readdirSync("test").filter((f) => f.endsWith(".test.ts"));
await esbuild.build({
  entryPoints: tests.map((f) => `test/${f}`),
  bundle: true,
  platform: "node",
  format: "esm",
  outdir: "dist/test",
  outExtension: { ".js": ".mjs" },
  logLevel: "warning",
});
const run = spawnSync(process.execPath, ["--test", ...tests.map((f) => `dist/test/${f.replace(/\.ts$/, ".mjs")}`)], {
  stdio: "inherit",
});
process.exit(run.status ?? 1);
