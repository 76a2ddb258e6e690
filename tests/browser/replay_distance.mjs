// How far an honest browser's update lands from the relay's CPU replay of its round: the
// distribution the replay check's tolerance (`--replay-tolerance`) is set from. One tab on
// WebGPU (SwiftShader) and one on the CPU (WebAssembly) train the end-to-end tests' tiny
// language model (1 layer × 32 wide, context 32, batch 8; 50 inner steps a round) together
// (relay.toml's 136K-parameter model takes SwiftShader about 5 minutes a round here); the
// relay draws every update for a replay (`--replay-fraction 1`) and its verdicts carry each
// replay's relative L2 distance.
// By hand: `node replay_distance.mjs` after `cargo xtask build-wasm` and a build of the relay
// (SWARMTRAIN_RELAY_BIN); SWARMTRAIN_REPLAY_ROUNDS rounds (default 12). Prints a Markdown table.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, openTab, startRelay, status } from './support.mjs';

process.env.SWARMTRAIN_E2E_INNER_STEPS ??= '50';
const ROUNDS = Number(process.env.SWARMTRAIN_REPLAY_ROUNDS ?? '12');

const dataDir = mkdtempSync(join(tmpdir(), 'swarmtrain-replay-'));
const { relay, url: urlPromise } = startRelay(dataDir, '127.0.0.1:0', {
  quorum: 2, deadlineSecs: 300,
  extra: ['--replay-fraction', '1', '--replays-per-round', '8'],
});
const browsers = [];
const quantiles = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p) => s[Math.round((s.length - 1) * p)];
  return s.length ? [0, 0.5, 0.9, 0.99, 1].map(q).map((v) => v.toExponential(2)).join(' / ') : '—';
};
try {
  const url = await urlPromise;
  const tabs = [];
  for (const [backend, flags] of [['webgpu', ['--enable-unsafe-webgpu']], ['cpu', []]]) {
    const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: [...CHROMIUM_ARGS, ...flags] });
    browsers.push(browser);
    const events = [];
    const page = await openTab(browser, url, '', { events });
    await page.click('#contribute');
    tabs.push({ backend, page, events });
  }
  const started = Date.now();
  while ((await status(url)).round < ROUNDS + 1) {
    await new Promise((r) => setTimeout(r, 2000));
    if (Date.now() - started > 40 * 60_000) throw new Error('too slow');
  }
  // The last round's replays run after the next announcement's reveals.
  await new Promise((r) => setTimeout(r, 30_000));
  const rows = [];
  for (const { backend, page, events } of tabs) {
    const shown = events.find((e) => e.kind === 'backend')?.backend;
    const peer = events.find((e) => e.kind === 'joined')?.peer;
    const mine = await (await fetch(new URL(`api/runs/lm/peers/${peer}`, url))).json();
    const replays = mine.verdicts.filter((v) => v.replay);
    const distances = replays.map((v) => v.replay.distance);
    const steps = events.filter((e) => e.kind === 'trained').map((e) => e.steps);
    rows.push(`| ${backend} (shown: ${shown}) | ${replays.length} | ${replays.filter((v) => v.replay.exact).length} | ${quantiles(distances)} | ${mine.failed_updates} | ${Math.min(...steps)}–${Math.max(...steps)} |`);
    await page.click('#contribute');
  }
  const metrics = await (await fetch(new URL('metrics', url))).text();
  console.log(`${ROUNDS} rounds, ${((Date.now() - started) / 1000).toFixed(0)} s\n`);
  console.log('| tab | replays | bit for bit | distance (min / median / p90 / p99 / max) | failed | steps a round |\n|---|---|---|---|---|---|');
  console.log(rows.join('\n'));
  console.log(`\n${metrics.split('\n').filter((l) => /^swarmtrain_(replays|reveal_bytes)_total/.test(l)).join('\n')}`);
} finally {
  for (const b of browsers) await b.close();
  relay.kill();
  rmSync(dataDir, { recursive: true, force: true });
}
