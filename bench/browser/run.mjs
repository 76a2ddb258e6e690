// `cargo xtask bench browser`'s browser half: serves this folder, the npm package (web/pkg)
// and TF.js from node_modules on loopback, then opens the bench page in Debian's headless
// Chromium once per engine and backend (a fresh browser context each, so nothing is cached),
// and writes every page's result to the JSON file named by the first argument.
//
// usage: node run.mjs OUT.json [CELL ...]   (cells: burn-webgpu burn-cpu tfjs-webgpu tfjs-wasm)
// SWARMTRAIN_BENCH_PLAN names another plan file (a quicker one while working on this).

import { createServer } from "node:http";
import { mkdirSync, readFileSync, writeFileSync, statSync } from "node:fs";
import { dirname, extname, join, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "../..");
const [outFile, ...only] = process.argv.slice(2);
if (!outFile) throw new Error("usage: node run.mjs OUT.json [CELL ...]");
const plan = JSON.parse(readFileSync(process.env.SWARMTRAIN_BENCH_PLAN ?? join(here, "plan.json"), "utf8"));
const cells = [
  ["burn", "webgpu"],
  ["burn", "cpu"],
  ["tfjs", "webgpu"],
  ["tfjs", "wasm"],
].filter(([e, b]) => only.length === 0 || only.includes(`${e}-${b}`));

const mounts = [
  ["/pkg/", join(root, "web/pkg")],
  ["/tfjs/", join(here, "node_modules/@tensorflow")],
  ["/", here],
];
const types = { ".html": "text/html", ".js": "text/javascript", ".json": "application/json", ".wasm": "application/wasm" };

const server = createServer((req, res) => {
  const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
  const [prefix, dir] = mounts.find(([p]) => path.startsWith(p));
  const file = normalize(join(dir, path.slice(prefix.length) || "index.html"));
  let ok = file.startsWith(dir);
  try {
    ok &&= statSync(file).isFile();
  } catch {
    ok = false;
  }
  if (!ok) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, {
    "content-type": types[extname(file)] ?? "application/octet-stream",
    // Cross-origin isolation, so that TF.js's wasm backend may use its threads, as a site that
    // deploys it well would.
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-embedder-policy": "require-corp",
  });
  res.end(readFileSync(file));
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const base = `http://127.0.0.1:${server.address().port}`;

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: [
    "--headless", "--no-sandbox", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--enable-unsafe-webgpu",
  ],
});
const shots = join(dirname(outFile), "screenshots");
mkdirSync(shots, { recursive: true });
const results = [];
const version = browser.version();
try {
  for (const [engine, backend] of cells) {
    const context = await browser.newContext({ viewport: { width: 800, height: 900 } });
    const page = await context.newPage();
    const logs = [];
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`pageerror: ${e}`));
    const query = encodeURIComponent(JSON.stringify({ engine, backend, models: plan.models }));
    const started = Date.now();
    process.stdout.write(`${engine} ${backend}: `);
    await page.goto(`${base}/index.html?plan=${query}`);
    await page.waitForFunction(() => window.benchResult, null, { timeout: 20 * 60_000, polling: 500 });
    const result = await page.evaluate(() => window.benchResult);
    await page.screenshot({ path: join(shots, `${engine}-${backend}.png`) });
    result.wallSeconds = (Date.now() - started) / 1000;
    result.console = logs.slice(-20);
    results.push(result);
    process.stdout.write(
      result.error
        ? `error: ${result.error}\n`
        : `${result.models.map((m) => `${m.name} ${m.stepsPerSecond.toFixed(2)} steps/s`).join(", ")}\n`,
    );
    await context.close();
  }
} finally {
  await browser.close();
  server.close();
}
writeFileSync(outFile, JSON.stringify({ chromium: version, results }, null, 2));
