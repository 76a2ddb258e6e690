// Browser-to-browser WebRTC: two tabs in separate browser profiles (two identities) contribute
// to the language model over WebSocket with `?direct=2`. Each holds a circuit relay
// reservation on the relay; the second lists the first in /api/reachable and connects to it
// over WebRTC, signaling through the relay (libp2p's /webrtc-signaling/0.0.1). Both pages
// then show one direct link, and both keep training. Once the second tab is active a round
// needs both tabs' updates, so the first tab holds the open round's θ while the second has
// yet to fetch it: the second takes it from the first over the link, not from the relay. The
// relay's gossip fanout is 1, so of the two linked tabs it sends each round announcement to
// one; the other receives it over the link (gossipsub). Then the first tab is closed: the
// second trains on with θ from the relay.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, openTab, outDir, startRelay } from './support.mjs';

async function metric(url, name) {
  const text = await (await fetch(new URL('metrics', url))).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `) || l.startsWith(`${name}{`));
  return line ? Number(line.split(' ').at(-1)) : NaN;
}

test('two browsers link directly over WebRTC, signaling through the relay', { timeout: 400_000 }, async () => {
  mkdirSync(outDir, { recursive: true });
  const dataDir = mkdtempSync(join(tmpdir(), 'swarmtrain-webrtc-'));
  const { relay, url: urlPromise } = startRelay(dataDir, '127.0.0.1:0', { quorum: 2, extra: ['--gossip-fanout', '1'] });
  let browser;
  const logs = { a: [], b: [] };
  const events = { a: [], b: [] };
  try {
    const url = await urlPromise;
    browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
    const open = async (name) => {
      const page = await openTab(browser, url, '?transport=ws&direct=2', { logs: logs[name], events: events[name] });
      await page.click('#contribute');
      return page;
    };
    const a = await open('a');
    // A trains a round first, so its reservation is in place before B asks who is reachable.
    await a.waitForFunction(() => Number(document.getElementById('trained').textContent) >= 1, null, { timeout: 120_000 });
    assert.ok(await metric(url, 'swarmtrain_circuit_reservations') >= 1, 'A holds a reservation');
    const started = Date.now();
    const b = await open('b');
    // A ping answered over the direct connection shows that libp2p streams (multistream-select,
    // then ping's payload both ways) run over its data channels.
    const linked = (page) => page.waitForFunction(() => /^1 \(WebRTC, ping \d+\.\d ms\)$/.test(document.getElementById('direct').textContent), null, { timeout: 180_000 });
    try {
      await Promise.all([linked(a), linked(b)]);
    } catch (e) {
      await a.screenshot({ path: join(outDir, 'webrtc-a.png'), fullPage: true });
      await b.screenshot({ path: join(outDir, 'webrtc-b.png'), fullPage: true });
      // Both consoles whole in files; B (the tab that links) first in the message, as CI
      // shows only part of a long one.
      writeFileSync(join(outDir, 'webrtc-a.log'), logs.a.join('\n'));
      writeFileSync(join(outDir, 'webrtc-b.log'), logs.b.join('\n'));
      const shown = async (page) => page.evaluate(() => ['state', 'backend', 'progress', 'direct', 'trained']
        .map((id) => `${id}: ${document.getElementById(id)?.textContent}`).join('; '));
      throw new Error(`${e.message}\nB shows ${await shown(b)}\nB:\n${logs.b.slice(-25).join('\n')}\nA shows ${await shown(a)}\nA:\n${logs.a.slice(-10).join('\n')}`);
    }
    console.log(`both tabs show a direct WebRTC link with a ping answered over it ${((Date.now() - started) / 1000).toFixed(1)} s after B opened: ${await a.textContent('#direct')}, ${await b.textContent('#direct')}`);
    const fromPeer = await b.waitForFunction(() => [...document.querySelectorAll('#log li')]
      .map((li) => li.textContent).find((t) => /round \d+: θ \(\d+ KiB\) from 1 linked browser (and the relay \(\d+ KiB\) )?in \d+ ms/.test(t)), null, { timeout: 60_000 })
      .catch(async (e) => {
        const shown = await b.$$eval('#log li', (lis) => lis.map((li) => li.textContent));
        throw new Error(`${e.message}\nB's log:\n${shown.join('\n')}\nB's console:\n${logs.b.slice(-40).join('\n')}`);
      });
    console.log(`the second tab: ${await fromPeer.jsonValue()}`);
    // The relay cuts a circuit after 64 KiB each way (CIRCUIT_BYTES): the 117 KiB θ can only
    // have crossed the direct link, and no circuit was cut, so the circuits carried only the
    // signaling.
    assert.equal(await metric(url, 'swarmtrain_circuits_cut_total'), 0, 'no circuit was cut');
    const peerA = await a.textContent('#peer');
    const peerB = await b.textContent('#peer');
    assert.notEqual(peerA, peerB, 'two identities');
    // Both keep training with the link up.
    const trained = Number(await b.textContent('#trained'));
    await b.waitForFunction((n) => Number(document.getElementById('trained').textContent) > n, trained, { timeout: 120_000 });
    await a.screenshot({ path: join(outDir, 'webrtc-a.png'), fullPage: true });
    await b.screenshot({ path: join(outDir, 'webrtc-b.png'), fullPage: true });
    assert.ok(await metric(url, 'swarmtrain_circuit_reservations') >= 2, 'both hold reservations');
    // A round announcement crossed the link: one tab's `round` event names the other (its
    // libp2p peer ID, as its `direct` events list it) as the browser that forwarded it.
    assert.equal(await metric(url, 'swarmtrain_linked_peers'), 2, 'both tabs told the relay they are linked');
    const linkedTo = (name) => new Set(events[name].filter((e) => e.kind === 'direct').flatMap((e) => e.peers.map((p) => p.peer)));
    const forwardedNow = () => ['a', 'b'].flatMap((name) => events[name]
      .filter((e) => e.kind === 'round' && e.via === 'gossip' && e.forwarded_by && linkedTo(name).has(e.forwarded_by))
      .map((e) => `${name}: round ${e.round} from ${e.forwarded_by}`));
    // The gossipsub mesh over the link forms at a heartbeat (1 s): the first rounds after
    // linking may still reach both tabs from the relay. Give it a few more rounds.
    for (let waited = 0; forwardedNow().length === 0 && waited < 60_000; waited += 250) {
      await new Promise((r) => setTimeout(r, 250));
    }
    const forwarded = forwardedNow();
    assert.ok(forwarded.length > 0, `an announcement forwarded over the link: ${JSON.stringify(['a', 'b'].map((n) => events[n].filter((e) => e.kind === 'round')))}`);
    assert.ok(await metric(url, 'swarmtrain_announcements_to_mesh_total') >= 1, 'the relay left copies to the mesh');
    console.log(`announcements forwarded over the link: ${forwarded.join('; ')}; the relay sent ${await metric(url, 'swarmtrain_announcements_sent_total')} copies itself and left ${await metric(url, 'swarmtrain_announcements_to_mesh_total')} to the link`);
    // The first tab goes away: the second keeps training, θ now from the relay, the round it
    // was waiting in closing by its deadline at the latest.
    const before = Number(await b.textContent('#trained'));
    await a.context().close();
    const closed = Date.now();
    await b.waitForFunction((n) => Number(document.getElementById('trained').textContent) >= n + 2, before, { timeout: 150_000 });
    console.log(`with the first tab closed, the second trained 2 more rounds in ${((Date.now() - closed) / 1000).toFixed(1)} s`);
    const errors = [...logs.a, ...logs.b].filter((l) => l.startsWith('[pageerror]'));
    if (errors.length) console.log(`page errors (not failing the test):\n${errors.join('\n')}`);
  } finally {
    if (browser) await browser.close();
    relay.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
  }
});

// Faults: one long round (relay.toml's language model, θ 532 KiB; 2,000 inner steps, so every
// tab trains until the 40 s deadline cuts it short; quorum 3). Two tabs fetch the round's θ and
// train; a third joins, links to both and takes θ from both at once. The moment it starts
// fetching, the first tab is closed: the third finishes from the second tab and the relay,
// trains, and its update is accepted in that round, which closes by its deadline. (θ takes
// about half a second here, with three tabs training on two cores; the tab is closed within
// milliseconds of the `fetching` event.)
test('a serving tab closed mid-transfer: the joiner completes from the others and the round closes on time', { timeout: 400_000 }, async () => {
  const dataDir = mkdtempSync(join(tmpdir(), 'swarmtrain-fault-'));
  const deadlineSecs = 40;
  const { relay, url: urlPromise } = startRelay(dataDir, '127.0.0.1:0', { quorum: 3, tiny: false, innerSteps: 2000, deadlineSecs });
  let browser;
  const logs = { a: [], b: [], c: [] };
  const events = { a: [], b: [], c: [] };
  try {
    const url = await urlPromise;
    browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
    const open = (name) => openTab(browser, url, '?transport=ws&direct=2', { logs: logs[name], events: events[name] });
    const until = async (what, f, ms = 60_000) => {
      const deadline = Date.now() + ms;
      while (!f()) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\nA:\n${logs.a.slice(-20).join('\n')}\nB:\n${logs.b.slice(-20).join('\n')}\nC:\n${logs.c.slice(-30).join('\n')}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    const has = (name, kind) => () => events[name].find((e) => e.kind === kind);
    const a = await open('a');
    await a.click('#contribute');
    await until("A's θ", has('a', 'params'));
    const [aId] = (await (await fetch(new URL('api/reachable', url))).json()).peers;
    const b = await open('b');
    await b.click('#contribute');
    await until("B's θ", has('b', 'params'));
    const c = await open('c');
    let closing = null;
    c.on('console', (m) => {
      if (closing === null && m.text().includes('swarmtrain event {"kind":"fetching"')) closing = a.context().close();
    });
    await c.click('#contribute');
    await until("C's θ", has('c', 'params'));
    await closing;
    await until("C's update", has('c', 'submitted'), 90_000);
    const fetching = has('c', 'fetching')();
    const params = has('c', 'params')();
    const submitted = has('c', 'submitted')();
    assert.equal(fetching.linked, 2, `C fetched with both tabs linked: ${JSON.stringify(fetching)}`);
    assert.equal(params.round, 0, 'C took the open round');
    assert.equal(params.bytes, fetching.bytes, 'the whole θ');
    const gaveUp = params.peer_failures.find((f) => f.startsWith(aId));
    assert.ok(gaveUp, `the closed tab was given up: ${JSON.stringify(params)}`);
    assert.ok(submitted.accepted && submitted.round === 0, `C's update counts in round 0: ${JSON.stringify(submitted)}`);
    let status;
    for (let i = 0; i < 100; i++) {
      status = await (await fetch(new URL('api/status', url))).json();
      if (status.round > 0) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    // The history row of θ_1 is round 0's close.
    const row = status.history.find((h) => h.round === 1);
    assert.ok(row, 'round 0 closed');
    assert.ok(row.contributors >= 2, `round 0 took the joiner's and the other tab's updates: ${JSON.stringify(row)}`);
    // Round 0 opens as the relay starts (it loads the corpus and evaluates θ_0 first, a few
    // seconds here): closed by its deadline, not by a straggler's timeout.
    assert.ok(row.closed_at_ms <= (deadlineSecs + 8) * 1000, `round 0 closed by its deadline: ${row.closed_at_ms} ms after the relay started`);
    const from = params.from_peers.map((p) => `${(p.bytes / 1024).toFixed(0)} KiB from ${p.peer === aId ? 'the closed tab' : 'the other tab'}`);
    console.log(`the joiner's θ (${(params.bytes / 1024).toFixed(0)} KiB) in ${params.ms.toFixed(0)} ms: ${[...from, `${(params.relay_bytes / 1024).toFixed(0)} KiB from the relay`].join(', ')}; the closed tab: ${gaveUp.slice(aId.length + 1)}; round 0 closed with ${row.contributors} updates ${(row.closed_at_ms / 1000).toFixed(1)} s after the relay started (deadline ${deadlineSecs} s)`);
  } finally {
    if (browser) await browser.close();
    relay.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
  }
});
