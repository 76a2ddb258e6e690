// The relay on a simulated internet (netns.mjs): the relay and coturn on a public segment, the
// relay bound to 0.0.0.0 with TLS, told its public address, handing out STUN and TURN with
// per-peer credentials; three homes, each with its own headless Chromium behind its own NAT
// router: A and B behind cone NATs, C behind a symmetric NAT. Each tab opens the relay's page
// over HTTPS by its public address, presses Contribute with `?direct=2` and trains.
//
// Asserted: every tab dialed only the advertised public address (its `joined` event) and the
// relay saw each come from its NAT's public address (its log); every tab has updates
// accepted; A and B link directly, with candidates learned from STUN (srflx or prflx, never
// host, never relay); C's links go through TURN (a relay candidate); the selected pair of each
// link is printed; no address on loopback or in a home network is ever a path.
//
// `SWARMTRAIN_INTERNET_RUNS=N` repeats the scenario N times and prints the medians (the
// figures in docs/benchmarks.md): page load to first accepted update, link set-up, and θ's
// rate over direct and TURN links.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { chmodSync, copyFileSync, cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, openTab, outDir, root, startRelay } from './support.mjs';
import { Internet, RELAY_IP, available, sweep } from './netns.mjs';

const unavailable = available();
const HOMES = [{ name: 'a', nat: 'cone' }, { name: 'b', nat: 'cone' }, { name: 'c', nat: 'symmetric' }];
const TURN_SECRET = `secret-${process.pid}-${Date.now()}`;

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : NaN;
}

// One run of the scenario; returns its figures.
async function scenario(run) {
  sweep();
  const net = new Internet(HOMES).up();
  const dir = mkdtempSync(join(tmpdir(), 'swarmtrain-internet-'));
  const browsers = [];
  const logs = { a: [], b: [], c: [] };
  const events = { a: [], b: [], c: [] };
  const relayLog = [];
  const onExit = () => net.down();
  process.once('exit', onExit);
  try {
    // A certificate for the relay's public IP (what an operator gets from their CA); the
    // browsers are told to accept it, as they would a CA-signed one.
    const cert = join(dir, 'cert.pem');
    const key = join(dir, 'key.pem');
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
      '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=swarmtrain relay',
      '-addext', `subjectAltName=IP:${RELAY_IP}`], { stdio: 'ignore' });
    chmodSync(key, 0o600);
    // coturn with the REST API's shared secret, as docs/deploy describes.
    const turn = net.spawn('relay', 'turnserver', ['-n', '--no-cli', '--listening-ip', RELAY_IP, '--relay-ip', RELAY_IP,
      '--listening-port', '3478', '--use-auth-secret', '--static-auth-secret', TURN_SECRET, '--realm', 'swarmtrain.test',
      '--no-tls', '--no-dtls', '--no-tcp-relay', '--min-port', '49160', '--max-port', '49200', '--fingerprint',
      '--no-multicast-peers', '--log-file', 'stdout', '--simple-log'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const turnLog = [];
    turn.stdout.on('data', (d) => turnLog.push(String(d)));
    const { relay, url: started } = startRelay(join(dir, 'data'), '0.0.0.0:8443', {
      quorum: 2,
      deadlineSecs: 30,
      extra: ['--external-address', RELAY_IP, '--tls-cert', cert, '--tls-key', key,
        '--ice-server', `stun:${RELAY_IP}:3478`, '--ice-server', `turn:${RELAY_IP}:3478?transport=udp`,
        '--tcp-port', '4001', '--ws-port', '4002', '--webrtc-port', '4003'],
      env: { ...process.env, SWARMTRAIN_TURN_SECRET: TURN_SECRET, RUST_LOG: 'swarmtrain_relay=debug,warn,dtls=error' },
      spawnWith: (cmd, args, options) => {
        const child = net.spawn('relay', cmd, args, { ...options, stdio: ['ignore', 'pipe', 'pipe'] });
        // Without its colour codes (tracing writes them to pipes too).
        child.stderr.on('data', (d) => relayLog.push(...String(d).replace(/\x1b\[[0-9;]*m/g, '').split('\n').filter(Boolean)));
        return child;
      },
    });
    assert.match(await started, /^https:\/\//, 'the relay serves HTTPS');
    const url = `https://${RELAY_IP}:8443/`;
    const open = async (home) => {
      const executablePath = net.wrapper(`home-${home}`, '/usr/bin/chromium', dir, writeFileSync, chmodSync);
      const browser = await chromium.launch({ executablePath, headless: true, args: [...CHROMIUM_ARGS, '--ignore-certificate-errors'] });
      browsers.push(browser);
      const t0 = Date.now();
      const page = await openTab(browser, url, '?direct=2&worker=0', { logs: logs[home], events: events[home] });
      await page.click('#contribute');
      return { page, t0 };
    };
    const until = async (what, f, ms = 150_000) => {
      const deadline = Date.now() + ms;
      for (;;) {
        const v = f();
        if (v) return v;
        if (Date.now() > deadline) {
          const tail = (name) => `${name}:\n${logs[name].slice(-25).join('\n')}`;
          throw new Error(`timed out waiting for ${what}\n${tail('a')}\n${tail('b')}\n${tail('c')}\nrelay:\n${relayLog.slice(-30).join('\n')}\nturn:\n${turnLog.join('').split('\n').slice(-15).join('\n')}`);
        }
        await new Promise((r) => setTimeout(r, 200));
      }
    };
    const accepted = (name) => () => events[name].find((e) => e.kind === 'submitted' && e.accepted);
    const tabs = {};
    // A first, so that it holds its circuit reservation when B and C ask who is reachable.
    for (const name of ['a', 'b', 'c']) {
      tabs[name] = await open(name);
      const first = await until(`${name.toUpperCase()}'s first accepted update`, accepted(name));
      tabs[name].firstAcceptedMs = first.at - tabs[name].t0;
    }
    // Every tab dialed the advertised public address, nothing else.
    for (const name of ['a', 'b', 'c']) {
      const joined = events[name].filter((e) => e.kind === 'joined');
      assert.ok(joined.length > 0, `${name} joined`);
      for (const j of joined) assert.ok(j.address.startsWith(`/ip4/${RELAY_IP}/`), `${name} dialed ${j.address}`);
    }
    // The links: each tab's newest `direct` event, with the selected candidate pairs.
    const links = (name) => events[name].filter((e) => e.kind === 'direct').at(-1)?.peers ?? [];
    await until('every tab linked to the other two, each link with its candidate pair', () => ['a', 'b', 'c']
      .every((n) => links(n).length >= 2 && links(n).every((p) => p.path)));
    // Which libp2p peer ID is which tab: B is the one A and C both link to, and so on.
    const peers = Object.fromEntries(['a', 'b', 'c'].map((n) => [n, new Set(links(n).map((p) => p.peer))]));
    const common = (x, y) => [...peers[x]].find((p) => peers[y].has(p));
    const nameOf = { [common('b', 'c')]: 'a', [common('a', 'c')]: 'b', [common('a', 'b')]: 'c' };
    assert.equal(Object.keys(nameOf).length, 3, `three distinct linked tabs: ${JSON.stringify(Object.values(peers).map((s) => [...s]))}`);
    const printed = [];
    const kindOf = (path) => (path.local === 'relay' || path.remote === 'relay' ? 'relay' : 'direct');
    for (const name of ['a', 'b', 'c']) {
      for (const p of links(name)) {
        const other = nameOf[p.peer];
        const { local, remote, local_address: la, remote_address: ra, protocol } = p.path;
        const line = `${name.toUpperCase()} → ${other.toUpperCase()}: ${local} ${la} ↔ ${remote} ${ra} (${protocol})`;
        printed.push(line);
        for (const addr of [la, ra]) {
          assert.ok(!addr.startsWith('127.') && !addr.startsWith('10.77.') && !addr.startsWith('::1'), `no loopback or home address as a path: ${line}`);
        }
        if (name !== 'c' && other !== 'c') {
          assert.ok(['srflx', 'prflx'].includes(local) && ['srflx', 'prflx'].includes(remote),
            `A and B link directly through their NATs' mappings (STUN): ${line}`);
        } else {
          assert.equal(kindOf(p.path), 'relay', `a link with the tab behind the symmetric NAT goes through TURN: ${line}`);
        }
      }
    }
    console.log(`run ${run}: selected candidate pairs (getStats):\n  ${printed.join('\n  ')}`);
    // The relay saw each tab come from its NAT's public address, never from a home network.
    const seen = relayLog.filter((l) => l.includes('connection established')).map((l) => (l.match(/addr=(\S+)/) ?? [])[1]).filter(Boolean);
    for (const home of net.homes) {
      assert.ok(seen.some((a) => a.startsWith(`/ip4/${home.wan}/`)), `the relay saw ${home.name} come from ${home.wan}: ${seen.join(' ')}`);
    }
    assert.ok(seen.every((a) => a.startsWith('/ip4/203.0.113.')), `only public-segment addresses reach the relay: ${seen.join(' ')}`);
    // The relay counted the browsers' connections by transport and advertises only its public
    // address to them (its /metrics, fetched from a home).
    const metrics = await tabs.a.page.evaluate(() => fetch('/metrics').then((r) => r.text()));
    assert.match(metrics, /swarmtrain_connections_by_transport\{transport="webrtc-direct"\} [1-9]/);
    const advertised = metrics.split('\n').filter((l) => l.startsWith('swarmtrain_advertised_address{') && l.includes('loopback="false"'));
    assert.ok(advertised.length === 3 && advertised.every((l) => l.includes(`/ip4/${RELAY_IP}/`)), advertised.join('\n'));

    // A developer's page on another origin embeds the package (examples/plain, served from
    // http://localhost in C's home, a secure context): its API calls cross origins (CORS) and
    // its WebSocket to the relay is `wss`, the relay's only WebSocket with TLS on.
    const site = join(dir, 'site');
    mkdirSync(site);
    copyFileSync(join(root, 'examples', 'plain', 'index.html'), join(site, 'index.html'));
    cpSync(join(root, 'web', 'pkg'), join(site, 'pkg'), { recursive: true });
    net.spawn('home-c', 'python3', ['-m', 'http.server', '8000', '--bind', '127.0.0.1', '--directory', site], { stdio: 'ignore' });
    const embedContext = await browsers[2].newContext();
    const embed = await embedContext.newPage();
    const embedLogs = [];
    embed.on('console', (m) => embedLogs.push(m.text()));
    for (let i = 0; ; i++) {
      try {
        await embed.goto(`http://localhost:8000/?relay=${encodeURIComponent(url)}&backend=cpu`);
        break;
      } catch (e) {
        if (i > 50) throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    await embed.click('#start');
    await embed.waitForFunction(() => /accepted/.test(document.getElementById('log').textContent), null, { timeout: 120_000 })
      .catch(async (e) => {
        throw new Error(`${e.message}\nembed: ${await embed.textContent('#status')}\n${embedLogs.slice(-20).join('\n')}`);
      });
    console.log(`run ${run}: the embedding page on http://localhost:8000: ${(await embed.textContent('#status')).trim()} ${(await embed.textContent('#log')).trim().split('\n').at(-1)}`);
    const afterEmbed = await tabs.a.page.evaluate(() => fetch('/metrics').then((r) => r.text()));
    assert.match(afterEmbed, /swarmtrain_connections_by_transport\{transport="wss"\} [1-9]/, 'the embedding page connected over wss');
    await embed.screenshot({ path: join(outDir, 'internet-embed.png'), fullPage: true });

    // Figures: page load to first accepted update; link set-up (from the later of the two tabs
    // joining to the first `direct` event naming the link); θ's rate over each kind of link.
    const joinedAt = Object.fromEntries(['a', 'b', 'c'].map((n) => [n, events[n].find((e) => e.kind === 'joined').at]));
    const linkMs = { direct: [], relay: [] };
    for (const name of ['a', 'b', 'c']) {
      for (const p of links(name)) {
        const other = nameOf[p.peer];
        // Links to the embedding page (another identity in C's browser) are not counted.
        if (!other || other < name) continue;
        const up = Math.min(...[name, other].map((n) => events[n].find((e) => e.kind === 'direct' && e.peers.some((q) => nameOf[q.peer] === (n === name ? other : name)))?.at ?? Infinity));
        linkMs[kindOf(p.path)].push(up - Math.max(joinedAt[name], joinedAt[other]));
      }
    }
    const thetaKiBs = { direct: [], relay: [] };
    for (const name of ['a', 'b', 'c']) {
      const kinds = Object.fromEntries(links(name).map((p) => [p.peer, kindOf(p.path)]));
      for (const e of events[name].filter((e) => e.kind === 'params' && e.from_peers.length === 1 && e.relay_bytes === 0 && e.ms > 0)) {
        const kind = kinds[e.from_peers[0].peer];
        if (kind) thetaKiBs[kind].push(e.bytes / 1024 / (e.ms / 1000));
      }
    }
    const figures = {
      firstAcceptedMs: Object.fromEntries(['a', 'b', 'c'].map((n) => [n, tabs[n].firstAcceptedMs])),
      linkMs,
      thetaKiBs,
      pairs: printed,
    };
    console.log(`run ${run}: ${JSON.stringify({ ...figures, pairs: undefined })}`);
    mkdirSync(outDir, { recursive: true });
    for (const name of ['a', 'b', 'c']) {
      await tabs[name].page.screenshot({ path: join(outDir, `internet-${name}.png`), fullPage: true });
    }
    const errors = Object.values(logs).flat().filter((l) => l.startsWith('[pageerror]'));
    if (errors.length) console.log(`page errors (not failing the test):\n${errors.join('\n')}`);
    return figures;
  } finally {
    for (const b of browsers) await b.close().catch(() => {});
    net.down();
    process.off('exit', onExit);
    rmSync(dir, { recursive: true, force: true });
  }
}

test('on a simulated internet: HTTPS by public address, direct links through cone NATs, TURN through a symmetric NAT', { skip: unavailable ?? false, timeout: 900_000 }, async () => {
  const runs = Number(process.env.SWARMTRAIN_INTERNET_RUNS ?? 1);
  const all = [];
  for (let run = 1; run <= runs; run++) all.push(await scenario(run));
  const flat = (f) => all.flatMap(f);
  const fmt = (xs, unit, digits = 0) => (xs.length ? `${median(xs).toFixed(digits)} ${unit} (${xs.length}: ${Math.min(...xs).toFixed(digits)}–${Math.max(...xs).toFixed(digits)})` : 'none measured');
  const rows = [
    ['page load to first accepted update', fmt(flat((f) => Object.values(f.firstAcceptedMs)), 'ms')],
    ['link set-up, direct (srflx) link', fmt(flat((f) => f.linkMs.direct), 'ms')],
    ['link set-up, TURN link', fmt(flat((f) => f.linkMs.relay), 'ms')],
    ['θ over a direct link', fmt(flat((f) => f.thetaKiBs.direct), 'KiB/s')],
    ['θ over a TURN link', fmt(flat((f) => f.thetaKiBs.relay), 'KiB/s')],
  ];
  console.log(`medians of ${runs} run(s):\n${rows.map(([k, v]) => `  ${k}: ${v}`).join('\n')}`);
  const report = process.env.SWARMTRAIN_INTERNET_REPORT;
  if (report) {
    writeFileSync(report, `# The relay on a simulated internet

\`cargo xtask bench internet\` runs \`tests/browser/internet.test.mjs\` ${runs} times and writes this page.
Each run builds the network anew: the relay (bound to 0.0.0.0 with TLS and its public address)
and coturn on a public segment, three homes behind NAT routers (A and B: cone, C: symmetric),
one headless Chromium in each, training the tiny language model (quorum 2, 20 inner steps) on
the CPU backend; 2 cores, one machine, so every path is a veth pair: the figures are the
protocol's and the browsers' costs, not a real network's latency.

Medians over all runs (count: range):

| what | median |
| --- | --- |
${rows.map(([k, v]) => `| ${k} | ${v} |`).join('\n')}

- *Page load to first accepted update*: from opening the page (HTTPS, by the relay's public
  address) to the \`submitted\` event of its first accepted update; the tabs open one after
  another, each once the one before has an update accepted.
- *Link set-up*: from the later of the two tabs joining to the first \`direct\` event naming the
  link (reservation, \`/api/reachable\`, signaling through the relay, ICE, the first ping).
- *θ over a link*: θ's bytes over the time of \`params\` events that took the whole θ from one
  linked browser (the tiny model's θ is 117 KiB; the leaf protocol asks 4 leaves of 8 KiB at a
  time).

The selected candidate pairs of the last run (\`getStats\`; Chromium does not show the address
of a peer-reflexive remote candidate):

${all.at(-1).pairs.map((p) => `- ${p}`).join('\n')}
`);
  }
});
