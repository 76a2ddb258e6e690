// A federation in the browser: a root relay and two edge relays (`serve --upstream`, each its
// own process with relay.toml's runs), and two tabs in separate browser profiles, one on each
// edge's page. Each tab joins its edge over WebRTC-direct, agrees session keys with the edge
// under the root's delegation, fetches θ and its text from the edge and trains; the root closes
// every round with one update from each edge (quorum 2), and both tabs train the same model.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, openTab, outDir, startRelay, status } from './support.mjs';

test('two tabs on two edges of one root train one model', { timeout: 400_000 }, async () => {
  mkdirSync(outDir, { recursive: true });
  const dirs = [0, 1, 2].map((i) => mkdtempSync(join(tmpdir(), `swarmtrain-federation-${i}-`)));
  const relays = [];
  let browser;
  const logs = { a: [], b: [] };
  try {
    const root = startRelay(dirs[0], '127.0.0.1:0', { quorum: 2 });
    relays.push(root.relay);
    const rootUrl = await root.url;
    const edges = [1, 2].map((i) => startRelay(dirs[i], '127.0.0.1:0', { quorum: 2, extra: ['--upstream', rootUrl] }));
    relays.push(...edges.map((e) => e.relay));
    const [edgeA, edgeB] = await Promise.all(edges.map((e) => e.url));
    browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
    // Pinned (`?pin=1`): each tab stays on its page's edge rather than choosing the federation's
    // least loaded relay.
    const events = { a: [], b: [] };
    const a = await openTab(browser, edgeA, '?pin=1', { logs: logs.a, events: events.a });
    const b = await openTab(browser, edgeB, '?pin=1', { logs: logs.b, events: events.b });
    await a.click('#contribute');
    await b.click('#contribute');
    const rounds = 2;
    const trained = (page, name) => page.waitForFunction((n) => Number(document.getElementById('trained').textContent) >= n, rounds, { timeout: 300_000 })
      .catch(async (e) => {
        await page.screenshot({ path: join(outDir, `federation-${name}.png`), fullPage: true });
        throw new Error(`${e.message}\n${name}:\n${logs[name].slice(-30).join('\n')}`);
      });
    await Promise.all([trained(a, 'a'), trained(b, 'b')]);
    await a.screenshot({ path: join(outDir, 'federation-a.png'), fullPage: true });
    await b.screenshot({ path: join(outDir, 'federation-b.png'), fullPage: true });
    // The root closed the rounds (the last just after the tabs' updates were accepted), each
    // with an update from each edge's tab.
    let rootStatus = await status(rootUrl);
    for (let waited = 0; rootStatus.round < rounds && waited < 60_000; waited += 250) {
      await new Promise((r) => setTimeout(r, 250));
      rootStatus = await status(rootUrl);
    }
    assert.ok(rootStatus.round >= rounds, `the root is at round ${rootStatus.round}`);
    assert.equal(rootStatus.joined_peers, 2, 'the root counts both tabs');
    for (const row of rootStatus.history.filter((r) => r.round >= 1 && r.round <= rounds)) {
      assert.equal(row.contributors, 2, `round ${row.round - 1} had an update from each edge: ${JSON.stringify(row)}`);
    }
    // Each tab joined its own page's edge (pinned), over the package's `joined` event.
    assert.equal(events.a.find((e) => e.kind === 'joined')?.relay, edgeA);
    assert.equal(events.b.find((e) => e.kind === 'joined')?.relay, edgeB);
    // Every relay's bootstrap lists the federation (the root first, then the edges that
    // reported to it), for tabs that are not pinned to choose from. An edge refreshes its copy
    // with each report (every 10 s), so an edge that reported before the other lists it later.
    const expected = [`edge ${edgeA}`, `edge ${edgeB}`, `root ${rootUrl}`].sort();
    for (const url of [rootUrl, edgeA, edgeB]) {
      let listed = [];
      for (let waited = 0; waited <= 30_000; waited += 500) {
        const boot = await (await fetch(new URL('api/bootstrap', url))).json();
        listed = (boot.federation ?? []).map((m) => `${m.role} ${m.url}`).sort();
        if (JSON.stringify(listed) === JSON.stringify(expected)) break;
        await new Promise((r) => setTimeout(r, 500));
      }
      assert.deepEqual(listed, expected, `${url}'s bootstrap`);
    }
    // Both edges follow the root: same round and θ.
    const edgeStatus = await Promise.all([edgeA, edgeB].map((u) => status(u)));
    const settled = await status(rootUrl);
    for (const s of edgeStatus) {
      assert.ok(Math.abs(s.round - settled.round) <= 1, `an edge at round ${s.round}, the root at ${settled.round}`);
    }
    // The root's leaderboard counts both tabs' work, which reached it through two edges.
    const board = await (await fetch(new URL(`api/runs/${rootStatus.run_id}/leaderboard`, rootUrl))).json();
    assert.equal(board.peers, 2, `two contributors at the root: ${JSON.stringify(board)}`);
    for (const entry of board.top) {
      assert.ok(entry.accepted_updates >= rounds, `a tab's credit at the root: ${JSON.stringify(entry)}`);
    }
    // No console errors but the known one over WebRTC-direct (rust-libp2p#6551; see
    // e2e.test.mjs), counted.
    const upstream = /^\[pageerror\] closure invoked recursively or after being dropped$/;
    const all = [...logs.a, ...logs.b];
    const errors = all.filter((l) => /^\[(error|pageerror)\]/.test(l)).filter((l) => !upstream.test(l));
    assert.deepEqual(errors, [], `console errors:\n${errors.join('\n')}`);
    // Every relay stops cleanly on SIGTERM (the edges while their root is going away too).
    await browser.close();
    browser = undefined;
    const exited = (relay) => new Promise((resolve) => {
      if (relay.exitCode !== null || relay.signalCode !== null) resolve(relay.exitCode);
      else relay.once('exit', (code) => resolve(code));
    });
    for (const relay of relays) relay.kill('SIGTERM');
    const codes = await Promise.race([
      Promise.all(relays.map(exited)),
      new Promise((resolve) => setTimeout(() => resolve('timeout'), 30_000).unref()),
    ]);
    assert.deepEqual(codes, [0, 0, 0], 'the root and both edges exit cleanly within 30 s of SIGTERM');
    console.log(`root at round ${rootStatus.round}; rows ${JSON.stringify(rootStatus.history.map((r) => [r.round, r.contributors]))}; ${all.filter((l) => upstream.test(l)).length} errors from rust-libp2p#6551`);
  } finally {
    if (browser) await browser.close();
    for (const relay of relays) if (relay.exitCode === null && relay.signalCode === null) relay.kill('SIGKILL');
    for (const dir of dirs) rmSync(dir, { recursive: true, force: true });
  }
});
