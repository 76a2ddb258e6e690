// The page's main thread while a tab trains, with training on that thread (`?worker=0`) and in
// its dedicated worker (the default), one after the other in one run: long tasks (over 50 ms,
// PerformanceObserver 'longtask') and the worst lateness of a 100 ms timer over 20 s of
// training, CPU backend over WebSocket, relay.toml's language model (what `cargo xtask run`
// trains) with 50 inner steps a round. By hand: `node longtasks.mjs` after `cargo xtask build-wasm` and a debug build
// of the relay; prints a Markdown table.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, startRelay } from './support.mjs';

process.env.SWARMTRAIN_E2E_INNER_STEPS ??= '50';
const WINDOW_MS = 20_000;

async function once(worker) {
  const dataDir = mkdtempSync(join(tmpdir(), 'swarmtrain-longtasks-'));
  const { relay, url: urlPromise } = startRelay(dataDir, '127.0.0.1:0', { tiny: false });
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  try {
    const url = await urlPromise;
    const page = await (await browser.newContext()).newPage();
    await page.addInitScript(() => {
      window.longTasks = [];
      new PerformanceObserver((list) => {
        for (const e of list.getEntries()) window.longTasks.push(e.duration);
      }).observe({ type: 'longtask', buffered: true });
      window.lateness = [];
      let last = performance.now();
      setInterval(() => {
        const now = performance.now();
        window.lateness.push(now - last - 100);
        last = now;
      }, 100);
    });
    await page.goto(`${url}?transport=ws&worker=${worker ? 1 : 0}`);
    await page.waitForFunction(() => document.querySelectorAll('#run-select option').length === 2, null, { timeout: 30_000 });
    await page.click('#contribute');
    await page.waitForFunction(() => Number(document.getElementById('trained').textContent) >= 1, null, { timeout: 120_000 });
    const before = Number(await page.textContent('#trained'));
    await page.evaluate(() => { window.longTasks = []; window.lateness = []; });
    await new Promise((r) => setTimeout(r, WINDOW_MS));
    const { longTasks, lateness } = await page.evaluate(() => ({ longTasks: window.longTasks, lateness: window.lateness }));
    const rounds = Number(await page.textContent('#trained')) - before;
    const sorted = [...lateness].sort((a, b) => a - b);
    return {
      worker,
      count: longTasks.length,
      total: longTasks.reduce((a, b) => a + b, 0),
      max: Math.max(0, ...longTasks),
      lateP99: sorted[Math.floor(sorted.length * 0.99)] ?? NaN,
      lateMax: sorted.at(-1) ?? NaN,
      rounds,
    };
  } finally {
    await browser.close();
    relay.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
  }
}

const rows = [await once(false), await once(true)];
console.log(`| training on | long tasks in ${WINDOW_MS / 1000} s | their total | longest | 100 ms timer late, p99 | late, worst | rounds trained |`);
console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: |');
for (const r of rows) {
  console.log(`| ${r.worker ? 'a dedicated worker' : "the page's thread"} | ${r.count} | ${r.total.toFixed(0)} ms | ${r.max.toFixed(0)} ms | ${r.lateP99.toFixed(0)} ms | ${r.lateMax.toFixed(0)} ms | ${r.rounds} |`);
}
