// Builds the package: `tsc` checks the types and writes build/ (one ES module per source
// file, with declarations), which the unit tests import; esbuild then bundles
// src/relay.ts with its dependencies into dist/relay.js, one minified ES module for browsers,
// and dist/relay.d.ts re-exports the declarations. Prints the bundle's size, raw and gzipped,
// and that of RelayClient alone (what a bundler keeps of it for a page without OpenFeature).
import { execFileSync } from "node:child_process";
import { cpSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";
import { build } from "esbuild";

const here = fileURLToPath(new URL(".", import.meta.url));
rmSync(`${here}build`, { recursive: true, force: true });
rmSync(`${here}dist`, { recursive: true, force: true });
execFileSync(process.execPath, [`${here}node_modules/typescript/bin/tsc`, "-p", here],
  { stdio: "inherit" });
await build({
  entryPoints: [`${here}src/relay.ts`],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: ["es2020"],
  minify: true,
  mangleProps: /_$/,  // private members end in "_" (src/client.ts): short names in the bundle
  sourcemap: true,
  legalComments: "none",
  outfile: `${here}dist/relay.js`,
  logLevel: "warning",
});
mkdirSync(`${here}dist/types`, { recursive: true });
cpSync(`${here}build`, `${here}dist/types`, {
  recursive: true, filter: (p) => !/\.js(\.map)?$/.test(p) });
writeFileSync(`${here}dist/relay.d.ts`, 'export * from "./types/relay.js";\n');
const size = (bytes) => `${bytes.length} bytes minified, ${gzipSync(bytes, { level: 9 }).length} gzipped`;
console.log(`dist/relay.js (RelayClient, RelayWebProvider, msgpack): ${size(readFileSync(`${here}dist/relay.js`))}`);
// What a page that imports RelayClient alone carries (a bundler drops the provider).
const alone = await build({
  stdin: { contents: 'export { RelayClient } from "./src/client.ts";', resolveDir: here, loader: "ts" },
  bundle: true, format: "esm", platform: "browser", target: ["es2020"], minify: true,
  mangleProps: /_$/, legalComments: "none", write: false, logLevel: "warning",
});
console.log(`RelayClient alone, with msgpack: ${size(alone.outputFiles[0].contents)}`);
