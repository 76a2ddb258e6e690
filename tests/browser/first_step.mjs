// Time from page load to the first trained round, CPU (WebSocket) and WebGPU (SwiftShader,
// WebRTC-direct), on the end-to-end tests' relay and tiny language model. Run by hand:
// `SWARMTRAIN_RELAY_BIN=… node first_step.mjs` in tests/browser; figures in docs/benchmarks.md.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, startRelay } from './support.mjs';
const dataDir = mkdtempSync(join(tmpdir(), 'swarmtrain-first-'));
const { relay, url: urlPromise } = startRelay(dataDir);
const url = await urlPromise;
for (const [name, flags, query] of [['cpu', [], '?transport=ws'], ['webgpu', ['--enable-unsafe-webgpu'], '']]) {
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: [...CHROMIUM_ARGS, ...flags] });
  const page = await (await browser.newContext()).newPage();
  const t0 = Date.now();
  await page.goto(url + query);
  await page.waitForFunction(() => document.querySelectorAll('#run-select option').length === 2);
  const loaded = Date.now() - t0;
  const t1 = Date.now();
  await page.click('#contribute');
  await page.waitForFunction(() => /Training round/.test(document.getElementById('state').textContent), null, { timeout: 120_000 });
  const toRound = Date.now() - t1;
  await page.waitForFunction(() => Number(document.getElementById('trained').textContent) >= 1, null, { timeout: 300_000 });
  const toTrained = Date.now() - t1;
  console.log(`${name}: page ready ${loaded} ms; Contribute → round announced (θ next, then the first step) ${toRound} ms; → first round of 20 steps trained ${toTrained} ms`);
  await browser.close();
}
relay.kill('SIGTERM');
rmSync(dataDir, { recursive: true, force: true });
