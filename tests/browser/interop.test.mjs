// Interop with js-libp2p: a js-libp2p 3.3 node (@libp2p/webrtc 6.0, @libp2p/circuit-relay-v2,
// noise, yamux, identify, ping; bundled by Vite from tests/browser/interop) runs in one page,
// our wasm peer in others, all through our relay. The js node dials a wasm tab
// browser-to-browser and pings it; another wasm tab dials the js node (found in
// /api/reachable) and pings it. Identify, exchanged on streams in both directions over the
// data channels, gives each side the other's agent.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, outDir, startRelay } from './support.mjs';

const bundle = join(import.meta.dirname, 'interop', 'dist', 'interop.js');

async function reachable(url) {
  return (await (await fetch(new URL('api/reachable', url))).json()).peers;
}

async function until(what, f, ms = 60_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

test('js-libp2p and the wasm peer connect browser-to-browser through our relay, in both directions', { timeout: 300_000 }, async () => {
  mkdirSync(outDir, { recursive: true });
  const dataDir = mkdtempSync(join(tmpdir(), 'swarmtrain-interop-'));
  // The js-libp2p node never joins a run: the relay's circuits are opened to any libp2p peer.
  const { relay, url: urlPromise } = startRelay(dataDir, '127.0.0.1:0', { extra: ['--open-circuit-relay', 'true'] });
  let browser;
  const logs = [];
  try {
    const url = await urlPromise;
    const ws = (await (await fetch(new URL('api/bootstrap', url))).json()).addresses.ws[0];
    browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
    const newPage = async (name) => {
      const context = await browser.newContext({ viewport: { width: 720, height: 1000 } });
      const page = await context.newPage();
      page.on('console', (m) => logs.push(`[${name} ${m.type()}] ${m.text()}`));
      page.on('pageerror', (e) => logs.push(`[${name} pageerror] ${e.message}`));
      return page;
    };
    const contribute = async (name, direct) => {
      const page = await newPage(name);
      await page.goto(`${url}?transport=ws&direct=${direct}`);
      await page.waitForFunction(() => document.querySelectorAll('#run-select option').length === 2, null, { timeout: 30_000 });
      await page.click('#contribute');
      await page.waitForFunction(() => Number(document.getElementById('trained').textContent) >= 1, null, { timeout: 120_000 });
      return page;
    };
    // On failure: the js node's last lines (its identify and WebRTC debug log) and the tabs'.
    const fail = (e) => new Error([e.message, ...logs.filter((l) => l.startsWith('[js')).slice(-60),
      ...logs.filter((l) => !l.startsWith('[js')).slice(-30)].join('\n'));

    // A wasm tab that listens (its reservation is the only one).
    const w1 = await contribute('wasm-1', 1);
    const [w1Id] = await until('the wasm tab\'s reservation', async () => {
      const r = await reachable(url);
      return r.length === 1 ? r : null;
    });

    // The js-libp2p node: WebSocket to the relay, a reservation, WebRTC listening.
    const jsPage = await newPage('js');
    await jsPage.goto(new URL('healthz', url).href);
    await jsPage.evaluate(() => localStorage.setItem('debug', 'libp2p:identify*,libp2p:webrtc*,libp2p:connection-manager*'));
    await jsPage.addScriptTag({ path: bundle, type: 'module' });
    await jsPage.waitForFunction(() => window.js !== undefined);
    const jsId = await jsPage.evaluate((addr) => window.js.start(addr), ws);
    await until('the js node\'s reservation', async () => (await reachable(url)).includes(jsId));

    // js-libp2p dials the wasm tab.
    const toW1 = `${ws}/p2p-circuit/webrtc/p2p/${w1Id}`;
    const started = Date.now();
    let rtt;
    try {
      await jsPage.evaluate((a) => window.js.dial(a), toW1);
      rtt = await jsPage.evaluate((a) => window.js.ping(a), toW1);
    } catch (e) { throw fail(e); }
    console.log(`js-libp2p → wasm: connected and pinged in ${Date.now() - started} ms (ping ${rtt} ms)`);
    const jsConnections = await jsPage.evaluate(() => window.js.connections());
    const direct = jsConnections.find((c) => c.peer === w1Id && c.addr.includes('/webrtc'));
    assert.ok(direct && !direct.limited, `a direct, unlimited connection: ${JSON.stringify(jsConnections)}`);
    let agent;
    try {
      agent = await until('identify from the wasm tab', () => jsPage.evaluate((p) => window.js.agent(p), w1Id));
    } catch (e) { throw fail(e); }
    assert.match(agent, /^swarmtrain-peer\//);
    try {
      await w1.waitForFunction(() => /^1 \(WebRTC, ping \d+\.\d ms\)$/.test(document.getElementById('direct').textContent), null, { timeout: 60_000 });
    } catch (e) { throw fail(e); }

    // A second wasm tab dials the js node (and the first tab), found in /api/reachable.
    const w2 = await contribute('wasm-2', 2);
    try {
      await w2.waitForFunction(() => /^2 \(WebRTC, ping \d+\.\d ms\)$/.test(document.getElementById('direct').textContent), null, { timeout: 120_000 });
    } catch (e) { throw fail(e); }
    const w2Id = (await reachable(url)).find((p) => p !== jsId && p !== w1Id);
    const fromW2 = await until('the wasm tab\'s connection at the js node', async () => (await jsPage.evaluate(() => window.js.connections()))
      .find((c) => c.peer === w2Id && c.addr.includes('/webrtc')));
    assert.ok(!fromW2.limited);
    assert.match(await until('identify from the second tab', () => jsPage.evaluate((p) => window.js.agent(p), w2Id)), /^swarmtrain-peer\//);
    console.log(`wasm → js-libp2p: ${await w2.textContent('#direct')}`);
    await w1.screenshot({ path: join(outDir, 'interop-wasm-1.png'), fullPage: true });
    await w2.screenshot({ path: join(outDir, 'interop-wasm-2.png'), fullPage: true });
  } finally {
    if (browser) await browser.close();
    relay.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
  }
});
