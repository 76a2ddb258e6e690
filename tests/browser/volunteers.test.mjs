// Server-class volunteers in one run with a browser: a relay (relay.toml's runs, the tiny
// language model, quorum 3), two native volunteers from the command line (`swarmtrain-peer
// train`), one on the CPU (`--backend ndarray`) and one on wgpu (`--backend wgpu`: Mesa's
// lavapipe here, a GPU's Vulkan, Metal or DX12 elsewhere), and a tab of the contributor page.
// The three train rounds together; the relay's status (the operator view) counts the joined
// trainers by the backend each reported, and credits the wgpu volunteer every round it trained.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, openTab, outDir, root, startRelay, status } from './support.mjs';

// `cargo xtask test` builds it with the wgpu feature (SWARMTRAIN_WGPU_PEER_BIN).
const peerBin = process.env.SWARMTRAIN_WGPU_PEER_BIN ?? join(root, 'target', 'debug', 'swarmtrain-peer');

// Starts `swarmtrain-peer train` on `backend` for `rounds` rounds; resolves with its exit code,
// its log, and its peer key (from the `Joined` event it logs).
function volunteer(url, dir, backend, rounds) {
  const child = spawn(peerBin, [
    'train', '--relay', url, '--rounds', String(rounds), '--backend', backend, '--pin-relay',
    '--key-file', join(dir, `${backend}.key`),
  ], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'swarmtrain_client=info,swarmtrain_peer=info', NO_COLOR: '1' } });
  let log = '';
  child.stdout.on('data', (c) => { log += c; });
  child.stderr.on('data', (c) => { log += c; });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  return { child, exited, log: () => log, key: () => log.match(/peer: "([0-9a-f]{64})"/)?.[1] };
}

test('a wgpu volunteer, a CPU volunteer and a browser tab train one run', { timeout: 600_000 }, async () => {
  mkdirSync(outDir, { recursive: true });
  const dir = mkdtempSync(join(tmpdir(), 'swarmtrain-volunteers-'));
  const { relay, url: urlP } = startRelay(join(dir, 'data'), '127.0.0.1:0', { quorum: 3, innerSteps: 10, deadlineSecs: 180 });
  let browser;
  const peers = [];
  try {
    const url = await urlP;
    const rounds = 3;
    peers.push(volunteer(url, dir, 'ndarray', rounds), volunteer(url, dir, 'wgpu', rounds));
    browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
    const logs = [];
    const tab = await openTab(browser, url, '', { logs });
    await tab.click('#contribute');
    // While all three are joined, the operator view counts them by backend: the tab trains on
    // the CPU (SwiftShader is no GPU) and reports `ndarray`, as the CPU volunteer does.
    let s;
    for (let waited = 0; waited < 240_000; waited += 500) {
      s = await status(url);
      if (s.backends?.wgpu === 1 && s.backends?.ndarray === 2) break;
      await new Promise((r) => setTimeout(r, 500));
    }
    assert.deepEqual(s.backends, { ndarray: 2, wgpu: 1 }, `trainers by backend: ${JSON.stringify(s)}`);
    const ended = await Promise.race([
      Promise.all(peers.map((p) => p.exited)),
      new Promise((_, reject) => setTimeout(() => reject(new Error('the volunteers did not finish in 8 minutes')), 480_000).unref()),
    ]);
    for (const [i, { code }] of ended.entries()) {
      assert.equal(code, 0, `the ${['ndarray', 'wgpu'][i]} volunteer exits cleanly:\n${peers[i].log().slice(-3000)}`);
    }
    await tab.screenshot({ path: join(outDir, 'volunteers.png'), fullPage: true });
    // Each volunteer's every round reached the relay and was accepted.
    for (const [i, peer] of peers.entries()) {
      const key = peer.key();
      assert.ok(key, `the ${['ndarray', 'wgpu'][i]} volunteer logged its key:\n${peer.log().slice(-2000)}`);
      const credit = await (await fetch(new URL(`api/runs/lm/peers/${key}`, url))).json();
      assert.equal(credit.accepted_updates, rounds, `the ${['ndarray', 'wgpu'][i]} volunteer's credit: ${JSON.stringify(credit)}`);
    }
    // With all three joined, a round waits for all three (quorum 3): at least one closed with
    // the wgpu volunteer's, the CPU volunteer's and the tab's updates.
    const final = await status(url);
    const full = final.history.filter((row) => row.contributors === 3);
    assert.ok(full.length >= 1, `no round with all three: ${JSON.stringify(final.history)}`);
    assert.ok(Number(await tab.textContent('#trained')) >= 1, 'the tab trained');
  } finally {
    for (const p of peers) if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
    await browser?.close();
    relay.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});
