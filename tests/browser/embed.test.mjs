// The npm package embedded as a developer would. examples/vite: a Vite + TypeScript page
// (type-checked against the package's generated declarations and bundled by `cargo xtask
// test`), served by the relay from examples/vite/dist. It connects with `Trainer.connect`,
// trains in its own Vite-bundled worker and shows typed events: an accepted update and the
// credit the relay's ledger gives it. examples/plain: one HTML file with a module script and
// no build step, served beside the package; it says why it cannot start when asked for
// WebGPU where there is none, then trains on the CPU.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, mkdtempSync, mkdirSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, collectErrors, outDir, root, startRelay } from './support.mjs';

const dist = join(root, 'examples', 'vite', 'dist');

test('a Vite + TypeScript page embeds the package and trains in its worker', { timeout: 300_000 }, async () => {
  assert.ok(existsSync(join(dist, 'index.html')), 'examples/vite is built (cargo xtask test builds it)');
  mkdirSync(outDir, { recursive: true });
  const dataDir = mkdtempSync(join(tmpdir(), 'swarmtrain-embed-'));
  const { relay, url: urlPromise } = startRelay(dataDir, '127.0.0.1:0', { webDir: dist });
  let browser;
  const logs = [];
  try {
    const url = await urlPromise;
    browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
    const page = await (await browser.newContext()).newPage();
    page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()} (${m.location().url})`));
    page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));
    await page.goto(url);
    await page.click('#start');
    try {
      await page.waitForFunction(() => /^[1-9]\d* samples in [1-9]\d* updates$/.test(document.getElementById('credit').textContent), null, { timeout: 120_000 });
    } catch (e) {
      await page.screenshot({ path: join(outDir, 'embed.png'), fullPage: true });
      throw new Error(`${e.message}\n${await page.textContent('body')}\n${logs.join('\n')}`);
    }
    const log = await page.textContent('#log');
    assert.match(log, /update of \d+ bytes accepted/);
    assert.match(log, /backend: cpu \(.*, in a worker\)/);
    assert.match(await page.textContent('#status'), /^(Connected to run lm|Round \d+: \d+ of 20 steps)/);
    console.log(`embedded page: ${await page.textContent('#credit')}; ${log.trim().split('\n').at(-1)}`);
    await page.screenshot({ path: join(outDir, 'embed.png'), fullPage: true });
    const errors = logs.filter((l) => /^\[(error|pageerror)\]/.test(l));
    assert.deepEqual(errors, [], 'no console errors');
  } finally {
    if (browser) await browser.close();
    relay.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test('a plain module page embeds the package: a clear error without WebGPU, training on the CPU, and the CPU chosen over a software WebGPU adapter', { timeout: 300_000 }, async () => {
  mkdirSync(outDir, { recursive: true });
  const dataDir = mkdtempSync(join(tmpdir(), 'swarmtrain-plain-'));
  // The page and the package, as a site would serve them.
  const site = mkdtempSync(join(tmpdir(), 'swarmtrain-plain-site-'));
  copyFileSync(join(root, 'examples', 'plain', 'index.html'), join(site, 'index.html'));
  symlinkSync(join(root, 'web', 'pkg'), join(site, 'pkg'));
  const { relay, url: urlPromise } = startRelay(dataDir, '127.0.0.1:0', { webDir: site });
  let browser;
  try {
    const url = await urlPromise;
    // Without --enable-unsafe-webgpu: no adapter.
    browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
    const page = await (await browser.newContext()).newPage();
    const errors = collectErrors(page);
    await page.goto(`${url}?backend=webgpu`);
    await page.click('#start');
    await page.waitForFunction(() => /^Could not start: /.test(document.getElementById('status').textContent), null, { timeout: 60_000 });
    assert.equal(await page.textContent('#status'), 'Could not start: this browser offers no WebGPU adapter');
    await page.goto(`${url}?backend=auto`);
    await page.click('#start');
    await page.waitForFunction(() => /round \d+: accepted/.test(document.getElementById('log').textContent), null, { timeout: 120_000 });
    assert.match(await page.textContent('#status'), /^Connected to run lm on cpu\.$/);
    assert.match(await page.textContent('#log'), /backend: cpu \(no WebGPU adapter\)/);
    console.log(`plain page: ${(await page.textContent('#log')).trim().split('\n').reverse().join('; ')}`);
    await page.screenshot({ path: join(outDir, 'plain.png'), fullPage: true });
    await browser.close();

    // With WebGPU on SwiftShader (a software rasterizer): `auto` takes the CPU without
    // measuring and says why; `measure` times a few steps of the run's model on both and takes
    // the faster, which on SwiftShader is the CPU too.
    browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: [...CHROMIUM_ARGS, '--enable-unsafe-webgpu'] });
    const gpuPage = await (await browser.newContext()).newPage();
    collectErrors(gpuPage, errors);
    for (const [choice, why] of [['auto', /backend: cpu \(the WebGPU adapter \(.*swiftshader.*\) is a software rasterizer/i], ['measure', /backend: cpu \(measured \d+ ms a step, \d+ ms on WebGPU \(.*swiftshader.*\)( \(its first step\))?\)/i]]) {
      await gpuPage.goto(`${url}?backend=${choice}`);
      await gpuPage.click('#start');
      await gpuPage.waitForFunction(() => /backend: /.test(document.getElementById('log').textContent), null, { timeout: 120_000 });
      const log = await gpuPage.textContent('#log');
      console.log(`plain page, ${choice} on SwiftShader: ${log.trim().split('\n').at(-1)}`);
      assert.match(log, why);
    }
    // A refused start (no adapter) is an answer on the page, not a console error.
    assert.deepEqual(errors, [], 'no console errors');
  } finally {
    if (browser) await browser.close();
    relay.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(site, { recursive: true, force: true });
  }
});
