// What the browser tests share: the relay they start and the flags Chromium runs with here.
import { spawn } from 'node:child_process';
import { join } from 'node:path';

export const root = process.env.SWARMTRAIN_ROOT ?? join(import.meta.dirname, '..', '..');
export const relayBin = process.env.SWARMTRAIN_RELAY_BIN ?? join(root, 'target', 'debug', 'swarmtrain-relay');
export const outDir = join(import.meta.dirname, 'out');

// `tiny: false` keeps relay.toml's language model (what `cargo xtask run` trains).
// `webDir` is the folder the relay serves (default: the contributor page); `extra`: more
// `serve` options.
// `spawnWith(cmd, args, options)` starts the process (default: here; the internet test runs it
// inside a network namespace).
export function startRelay(dataDir, http = '127.0.0.1:0', { quorum = 1, tiny = true, webDir = join(root, 'web'), innerSteps = process.env.SWARMTRAIN_E2E_INNER_STEPS ?? '20', deadlineSecs = 60, extra = [], spawnWith = spawn, env = process.env } = {}) {
  const relay = spawnWith(relayBin, [
    'serve', '--config', join(root, 'relay.toml'), '--http', http, '--web-dir', webDir,
    '--data-dir', dataDir,
    // A tiny language model keeps the browser rounds short: 1 layer × 32 wide, context 32.
    ...(tiny ? ['--context', '32', '--d-model', '32', '--heads', '2', '--layers', '1', '--batch-size', '8',
      '--lr', '0.01', '--warmup-steps', '5'] : []),
    '--inner-steps', String(innerSteps), '--quorum', String(quorum), '--round-deadline-secs', String(deadlineSecs),
    ...extra,
  ], { stdio: ['ignore', 'pipe', 'inherit'], env });
  const url = new Promise((resolve, reject) => {
    let buffered = '';
    relay.stdout.on('data', (chunk) => {
      buffered += chunk;
      const m = buffered.match(/listening on (https?:\/\/\S+)/);
      if (m) resolve(m[1]);
    });
    relay.on('exit', (code) => reject(new Error(`relay exited with ${code}`)));
    setTimeout(() => reject(new Error('relay did not start in 60 s')), 60_000).unref();
  });
  return { relay, url };
}

export async function status(url) {
  const res = await fetch(new URL('api/status', url));
  return res.json();
}

// Debian's Chromium, headless, on a machine without a sandbox or a GPU.
export const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage',
];

// Collects what `page` (and its workers) report as errors: console errors and uncaught
// exceptions, into `errors`; a test asserts it stays empty.
export function collectErrors(page, errors = []) {
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`[error] ${m.text()} (${m.location().url})`); });
  page.on('pageerror', (e) => errors.push(`[pageerror] ${e.message}`));
  return errors;
}

// Opens the contributor page at `url` + `query` in a browser context of its own (its own
// IndexedDB, so its own identity) and waits for its run list. Console lines go to `logs`, the
// page's events (its `swarmtrain event {json}` debug lines, with `at`: when they arrived, in
// Date.now() ms) to `events`.
export async function openTab(browser, url, query, { logs = [], events = [] } = {}) {
  const context = await browser.newContext({ viewport: { width: 720, height: 1000 } });
  const page = await context.newPage();
  page.on('console', (m) => {
    const t = m.text();
    logs.push(`[${m.type()}] ${t}`);
    const at = t.indexOf('swarmtrain event ');
    if (at >= 0) {
      try { events.push({ ...JSON.parse(t.slice(at + 'swarmtrain event '.length)), at: Date.now() }); } catch { /* cut at 2,000 characters */ }
    }
  });
  page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));
  await page.goto(url + query);
  await page.waitForFunction(() => document.querySelectorAll('#run-select option').length === 2, null, { timeout: 30_000 });
  return page;
}
