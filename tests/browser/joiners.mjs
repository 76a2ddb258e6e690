// `cargo xtask bench joiners`: the relay's θ bytes out when N browsers join the same round,
// without and with browser-to-browser links. Rounds of 1,500 inner steps keep round 0 open
// while N Chromium contexts (N identities, CPU backend, WebSocket) open a second apart and
// contribute, first with `?direct=0`, then, on a fresh relay, with `?direct=3`. Reported: the
// relay's `swarmtrain_params_bytes_served_total` once every tab has fetched its first θ, and
// how each tab got it. Writes docs/benchmarks/joiners.md.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, openTab, root, startRelay } from './support.mjs';

const N = Number(process.env.JOINERS ?? 8);
process.env.SWARMTRAIN_E2E_INNER_STEPS = '1500';

async function metric(url, name) {
  const text = await (await fetch(new URL('metrics', url))).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ').at(-1)) : NaN;
}

async function once(direct) {
  const dataDir = mkdtempSync(join(tmpdir(), 'swarmtrain-joiners-'));
  const { relay, url: urlPromise } = startRelay(dataDir, '127.0.0.1:0', { quorum: N });
  const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  try {
    const url = await urlPromise;
    const events = [];
    for (let i = 0; i < N; i++) {
      events.push([]);
      const page = await openTab(browser, url, `?transport=ws&direct=${direct}&run=lm`, { events: events[i] });
      await page.click('#contribute');
      await new Promise((r) => setTimeout(r, 1000));
    }
    // Each tab's first θ.
    const firsts = () => events.map((evs, tab) => ({ tab, ev: evs.find((e) => e.kind === 'params') })).filter((f) => f.ev);
    const deadline = Date.now() + 180_000;
    while (firsts().length < N && Date.now() < deadline) await new Promise((r) => setTimeout(r, 250));
    const fetched = firsts().map(({ tab, ev }) => ({ tab, ...ev }));
    const bytes = await metric(url, 'swarmtrain_params_bytes_served_total');
    const rounds = [...new Set(fetched.map((f) => f.round))];
    return { direct, bytes, fetched, rounds };
  } finally {
    await browser.close();
    relay.kill('SIGTERM');
    rmSync(dataDir, { recursive: true, force: true });
  }
}

const runs = [await once(0), await once(3)];
const theta = runs[0].fetched[0]?.bytes ?? NaN;
const kib = (b) => `${(b / 1024).toFixed(0)} KiB`;
let md = `# θ for ${N} browsers joining one round\n\n\`cargo xtask bench joiners\` (\`tests/browser/joiners.mjs\`): ${N} headless Chromium tabs (separate identities, CPU, WebSocket) opened a second apart; rounds of 1,500 inner steps keep the first round open while they join; each fetches that round's θ (${kib(theta)}, the end-to-end tests' tiny language model) when it joins. The relay's θ bytes out (\`swarmtrain_params_bytes_served_total\`) once all ${N} have it (rounds fetched: ${runs.map((r) => r.rounds.join(', ')).join(' and ')}):\n\n| links | relay θ bytes out | × one θ | tabs that took leaves from linked browsers | θ bytes from browsers | median fetch with browsers | median fetch from the relay alone |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n`;
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s.length ? s[Math.floor(s.length / 2)] : NaN; };
for (const r of runs) {
  const peer = r.fetched.filter((f) => f.from_peers.length > 0);
  const relayed = r.fetched.filter((f) => f.from_peers.length === 0);
  const fromBrowsers = r.fetched.reduce((n, f) => n + f.bytes - f.relay_bytes, 0);
  md += `| ${r.direct === 0 ? 'none' : `up to ${r.direct} per tab`} | ${r.bytes} | ${(r.bytes / theta).toFixed(2)} | ${peer.length} of ${r.fetched.length} | ${kib(fromBrowsers)} | ${peer.length ? `${median(peer.map((f) => f.ms)).toFixed(0)} ms` : '—'} | ${relayed.length ? `${median(relayed.map((f) => f.ms)).toFixed(0)} ms` : '—'} |\n`;
}
const saved = 1 - runs[1].bytes / runs[0].bytes;
const withPeers = runs[1].fetched.filter((f) => f.from_peers.length > 0);
md += `\nWith links the relay sent ${(saved * 100).toFixed(0)}% fewer θ bytes. Each fetch with browsers, in order of joining: ${withPeers.map((f) => `${f.from_peers.length} browser${f.from_peers.length > 1 ? 's' : ''}${f.relay_bytes ? ` + relay ${kib(f.relay_bytes)}` : ''}, ${f.ms.toFixed(0)} ms`).join('; ') || 'none'}. A tab takes the θ's manifest from a linked browser, then 8 KiB leaves from all its linked browsers at once (4 requests in flight each, each leaf checked against the manifest, which hashes to the announced θ); a browser that does not hold the θ yet answers \`NotHere\` and is passed over; the relay takes leaves when no browser is left or after 2 s.\n`;
writeFileSync(join(root, 'docs', 'benchmarks', 'joiners.md'), md);
console.log(md);
