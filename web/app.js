// The contributor page. Everything it shows comes from the npm package's events and from the
// relay's public API: /api/runs once (the run list), then every second the chosen run's status
// without history (?history=0) and only the history rows it does not have yet (/history?from=).
import init, { Trainer, exportIdentity, importIdentity, identityPeerKey } from './pkg/swarmtrain.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let runs = [];
let selected = null; // the run id whose status the page shows
let history = []; // that run's round history, oldest first
let trainer = null;
let accepted = 0; // updates of this tab the relay accepted since the page loaded
let me = null; // { run, peer }: whose credit the page shows
const CHART_ROUNDS = 1000;

function log(text, cls) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (cls) li.className = cls;
  $('log').prepend(li);
  while ($('log').children.length > 200) $('log').lastChild.remove();
}

const isLm = (status) => status?.spec?.model?.ByteLm !== undefined;

function onEvent(ev) {
  console.debug('swarmtrain event', JSON.stringify(ev).slice(0, 2000));
  switch (ev.kind) {
    case 'backend':
      // "WebGPU (why)" or "CPU (why)": the package says why it picked this backend (the
      // adapter, a software rasterizer, or what it measured); the name in data-backend.
      $('backend').dataset.backend = ev.backend;
      $('backend').textContent = `${ev.backend === 'webgpu' ? 'WebGPU' : 'CPU'} (${ev.detail.replace(/, in a worker$/, '')})`;
      log(`training backend: ${ev.backend}${ev.detail ? ` (${ev.detail})` : ''}`);
      break;
    case 'joined':
      me = { run: ev.run, peer: ev.peer };
      refreshCredit();
      $('peer').textContent = ev.peer.slice(0, 16);
      $('transport').textContent = ev.transport === 'webrtc-direct' ? 'WebRTC-direct' : ev.transport === 'ws' ? (/\/(tls\/ws|wss)\b/.test(ev.address) ? 'WebSocket (TLS)' : 'WebSocket') : ev.transport;
      $('transport').title = ev.address;
      $('state').textContent = 'Connected to the relay; waiting for a round.';
      $('state').className = 'state';
      // In a federation the tab may join another relay than the page's (the nearest, least loaded).
      log(`joined run ${ev.run} as ${ev.peer.slice(0, 16)} over ${$('transport').textContent}${ev.relay && new URL(ev.relay).origin !== location.origin ? ` at relay ${ev.relay}` : ''}`);
      break;
    case 'model':
      log(`model: ${ev.model} (${ev.n_params.toLocaleString()} parameters)`);
      break;
    case 'round':
      if (!paused) $('state').textContent = `Training round ${ev.round} (${ev.inner_steps} local steps)…`;
      if (ev.forwarded_by) log(`round ${ev.round} announced by a linked browser (${ev.forwarded_by.slice(-8)})`);
      break;
    case 'sample':
      $('sample-card').hidden = false;
      $('sample').textContent = ev.text;
      $('sample-round').textContent = `(global model of round ${ev.round})`;
      break;
    case 'progress': {
      const secs = (ms) => (ms / 1000).toFixed(1);
      $('progress').textContent = `${ev.steps} of ${ev.planned_steps} steps, ${secs(ev.elapsed_ms)} s of the round's ${secs(ev.deadline_ms)} s`;
      break;
    }
    case 'plan':
      if (ev.planned_steps < ev.run_steps) {
        log(`round ${ev.round}: planning ${ev.planned_steps} of ${ev.run_steps} steps (${ev.step_ms.toFixed(0)} ms a step here, ${(ev.budget_ms / 1000).toFixed(1)} s before the deadline)`);
      }
      break;
    case 'credits':
      $('credit').textContent = `${ev.samples.toLocaleString()} samples in ${ev.accepted_updates} updates`;
      showChecks(ev.verified_samples, ev.samples - ev.verified_samples - ev.failed_samples, ev.failed_samples);
      break;
    case 'fetching':
      $('progress').textContent = `fetching the round's θ (${(ev.bytes / 1024).toFixed(0)} KiB)${ev.linked ? ` from ${ev.linked} linked browser${ev.linked > 1 ? 's' : ''} and the relay` : ''}`;
      break;
    case 'params':
      // θ is here: the status line says so until the first step's progress replaces it (a
      // first step on WebGPU compiles its shaders and can take seconds).
      $('progress').textContent = `θ of round ${ev.round} received; training`;
      ownRound(ev.round).received = ev.bytes;
      logParams(ev);
      break;
    case 'trained':
      ownRound(ev.round).loss = ev.loss;
      $('progress').textContent = `trained ${ev.steps} of ${ev.planned_steps} steps; sending`;
      $('trained').textContent = ev.rounds_trained;
      $('loss').textContent = ev.loss.toFixed(4);
      log(`round ${ev.round}: ${ev.steps} steps in ${ev.train_ms < 10000 ? `${ev.train_ms} ms` : `${(ev.train_ms / 1000).toFixed(1)} s`}, loss ${ev.loss.toFixed(4)}${ev.steps < ev.planned_steps ? ` (of ${ev.planned_steps}: the round's deadline came first, so this update carries the steps done)` : ''}`);
      break;
    case 'submitted':
      ownRound(ev.round).sent = ev.bytes;
      drawOwnChart();
      $('progress').textContent = 'update sent; waiting for the next round';
      if (ev.accepted) {
        $('accepted').textContent = ++accepted;
      }
      // A tab paused just before its update went out keeps saying why it is paused.
      if (!paused) $('state').textContent = `Update for round ${ev.round} ${ev.accepted ? 'accepted' : 'rejected: ' + ev.reason}.`;
      if (!ev.accepted) log(`update for round ${ev.round} rejected: ${ev.reason}`, 'warn');
      if (ev.relay_rtt_ms != null) $('rtt').textContent = `${ev.relay_rtt_ms.toFixed(1)} ms`;
      refreshStatus();
      break;
    case 'revealed':
      // The relay drew this tab's update of the round for a replay; its verdict comes with the credits.
      log(ev.accepted
        ? `round ${ev.round}: the relay drew this update for a replay; sent the committed training state (${(ev.bytes / 1024).toFixed(0)} KiB)`
        : `round ${ev.round}: the relay refused the revealed state: ${ev.reason}`, ev.accepted ? undefined : 'warn');
      break;
    case 'reconnecting': {
      const secs = (ev.delay_ms / 1000).toFixed(1);
      $('state').textContent = `Lost the relay (${ev.error}). Trying again in ${secs} s (attempt ${ev.attempt}); your training state is kept.`;
      $('state').className = 'state warn';
      log(`connection failed: ${ev.error}; retrying in ${secs} s (attempt ${ev.attempt})`, 'warn');
      break;
    }
    case 'direct':
      {
        const rtts = ev.peers.map((p) => p.rtt_ms).filter((r) => r != null);
        $('direct').textContent = ev.peers.length === 0 ? 'none'
          : `${ev.peers.length} (WebRTC${rtts.length ? `, ping ${Math.min(...rtts).toFixed(1)} ms` : ''})`;
        // How each link goes: `srflx ↔ srflx` through the NATs' mappings, `relay` through TURN.
        const path = (p) => (p.path ? `${p.path.local} ↔ ${p.path.remote}` : 'path unknown');
        $('direct').title = ev.peers.map((p) => `${p.peer}: ${path(p)}`).join('\n');
        const paths = ev.peers.length ? ` (${ev.peers.map(path).join(', ')})` : '';
        log(`direct WebRTC links to other browsers: ${ev.peers.length}${paths}${ev.error ? ` (last failure: ${ev.error})` : ''}`, ev.error && ev.peers.length === 0 ? 'warn' : undefined);
      }
      break;
    case 'stopped':
      $('state').textContent = `Stopped after ${ev.rounds_trained} rounds. Press Contribute to start again.`;
      $('state').className = 'state';
      log('stopped');
      stopped();
      break;
    case 'error':
      $('state').textContent = `Stopped: ${ev.message}`;
      $('state').className = 'state error';
      log(ev.message, 'error');
      stopped();
      break;
    default:
      log(JSON.stringify(ev));
  }
}

function logParams(ev) {
  const kib = (b) => `${(b / 1024).toFixed(0)} KiB`;
  const n = ev.from_peers.length;
  if (n) log(`round ${ev.round}: θ (${kib(ev.bytes)}) from ${n} linked browser${n > 1 ? 's' : ''}${ev.relay_bytes ? ` and the relay (${kib(ev.relay_bytes)})` : ''} in ${ev.ms.toFixed(0)} ms`);
  if (ev.peer_failures.length) log(`round ${ev.round}: ${n ? '' : 'θ from the relay; '}linked browsers given up: ${ev.peer_failures.join('; ')}`);
}

// This tab's own rounds, for its chart: local loss, θ bytes received, update bytes sent.
const own = [];
function ownRound(round) {
  let r = own.find((o) => o.round === round);
  if (!r) {
    r = { round };
    own.push(r);
    if (own.length > 100) own.shift();
  }
  return r;
}

// Local loss (line, left axis) and KiB received and sent (bars, right axis) per round trained.
function drawOwnChart() {
  const c = $('own-chart');
  c.hidden = false;
  const g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  g.font = '11px sans-serif';
  g.fillStyle = '#64748b';
  g.fillText('your rounds: local loss (line); KiB received ▮ and sent ▮', 40, 10);
  const rows = own.filter((o) => o.loss != null);
  if (!rows.length) return;
  // Bars and line below the title: from y = 20 down to 16 px above the bottom.
  const h = c.height - 36;
  const base = c.height - 16;
  const topLoss = Math.max(...rows.map((o) => o.loss));
  const topKib = Math.max(1, ...rows.map((o) => Math.max(o.received ?? 0, o.sent ?? 0) / 1024));
  g.fillText(topLoss.toFixed(2), 0, base - h + 4);
  g.textAlign = 'right';
  g.fillText(`${topKib.toFixed(0)} KiB`, c.width, base - h - 4);
  g.textAlign = 'left';
  const w = (c.width - 44) / rows.length;
  rows.forEach((o, i) => {
    const x = 34 + i * w;
    g.fillStyle = '#cbd5e1';
    g.fillRect(x, base - ((o.received ?? 0) / 1024 / topKib) * h, Math.max(1, w / 2 - 1), ((o.received ?? 0) / 1024 / topKib) * h);
    g.fillStyle = '#fbbf24';
    g.fillRect(x + w / 2, base - ((o.sent ?? 0) / 1024 / topKib) * h, Math.max(1, w / 2 - 1), ((o.sent ?? 0) / 1024 / topKib) * h);
  });
  g.strokeStyle = '#16a34a';
  g.lineWidth = 2;
  g.beginPath();
  rows.forEach((o, i) => {
    const x = 34 + i * w + w / 2;
    const y = base - (o.loss / topLoss) * h;
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  g.fillStyle = '#64748b';
  g.fillText(`round ${rows.at(-1).round}`, c.width - 60, c.height - 2);
}

// What the relay's checks made of this identity's samples (docs/security.md): verified,
// unchecked (a round is checked after it closes), failed (they earn nothing).
function showChecks(verified, unchecked, failed) {
  $('credit-checks').textContent = `${verified.toLocaleString()} verified, ${unchecked.toLocaleString()} unchecked, ${failed.toLocaleString()} failed`;
}

// This identity's credit in its run, from the relay's ledger (every update it ever had
// accepted, from any tab or session with this identity).
async function refreshCredit() {
  if (!me) return;
  try {
    const res = await fetch(`api/runs/${encodeURIComponent(me.run)}/peers/${me.peer}`, { cache: 'no-store' });
    if (res.ok) {
      const c = await res.json();
      $('credit').textContent = c.accepted_updates === 0 ? 'none yet'
        : `${c.samples.toLocaleString()} samples in ${c.accepted_updates} updates`;
      if (c.accepted_updates > 0) showChecks(c.verified_samples, c.unchecked_samples, c.failed_samples);
    }
  } catch (e) {
    // The relay may be restarting; the next accepted update asks again.
  }
}

// Accuracy (digits) on a fixed 0..100% axis; held-out loss (language model) from 0 to the
// largest value seen.
function drawChart(lm) {
  const c = $('chart');
  const g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  g.strokeStyle = '#e2e8f0';
  g.fillStyle = '#64748b';
  g.font = '11px sans-serif';
  const value = (h) => (lm ? h.val_loss : h.accuracy);
  const pts = history.filter((h) => value(h) !== null && value(h) !== undefined);
  const top = lm ? Math.max(1, ...pts.map(value)) : 1;
  for (const a of [0, 0.5, 1]) {
    const y = c.height - 16 - a * (c.height - 26);
    g.beginPath(); g.moveTo(34, y); g.lineTo(c.width, y); g.stroke();
    g.fillText(lm ? (a * top).toFixed(1) : `${a * 100}%`, 0, y + 4);
  }
  g.fillText(lm ? 'held-out loss (nats/byte)' : 'held-out accuracy', 40, 10);
  if (pts.length < 1) return;
  const maxRound = Math.max(1, ...pts.map((p) => p.round));
  g.strokeStyle = '#2563eb';
  g.lineWidth = 2;
  g.beginPath();
  pts.forEach((p, i) => {
    const x = 34 + (p.round / maxRound) * (c.width - 44);
    const y = c.height - 16 - (value(p) / top) * (c.height - 26);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  g.fillText(`round ${maxRound}`, c.width - 60, c.height - 2);
}

let refreshing = false;
async function refreshStatus() {
  if (refreshing || !selected) return;
  refreshing = true;
  try {
    const run = encodeURIComponent(selected);
    const res = await fetch(`api/runs/${run}/status?history=0`, { cache: 'no-store' });
    if (res.ok) {
      const s = await res.json();
      const have = history.at(-1)?.round ?? -1;
      if (have > s.round) history = []; // the run started over
      // New rows only; the chart shows at most the last CHART_ROUNDS rounds.
      let from = Math.max(history.at(-1)?.round + 1 || 0, s.history_from, s.round + 1 - CHART_ROUNDS);
      while (from <= s.round) {
        const page = await fetch(`api/runs/${run}/history?from=${from}`, { cache: 'no-store' });
        const rows = page.ok ? await page.json() : [];
        if (rows.length === 0) break;
        history.push(...rows);
        from = rows.at(-1).round + 1;
      }
      if (history.length > CHART_ROUNDS) history.splice(0, history.length - CHART_ROUNDS);
      const lm = isLm(s);
      $('run').textContent = s.run_id;
      $('model').textContent = s.spec.model_name;
      $('round').textContent = s.round;
      $('peers').textContent = `${s.updates_this_round} of ${s.active_peers} active`;
      const last = history.at(-1);
      $('metric-name').textContent = lm ? 'Held-out loss' : 'Held-out accuracy';
      $('metric').textContent = !last ? '—'
        : lm ? (last.val_loss == null ? '—' : `${last.val_loss.toFixed(3)} nats/byte (${(last.val_loss / Math.LN2).toFixed(2)} bits)`)
          : (last.accuracy == null ? '—' : `${(last.accuracy * 100).toFixed(1)}%`);
      drawChart(lm);
    }
  } catch (e) {
    // The relay may be restarting; the next poll retries.
  } finally {
    refreshing = false;
  }
}

async function pollStatus() {
  await refreshStatus();
  setTimeout(pollStatus, 1000);
}

// The run list, once: every run with its model, the relay's default first. `?run=ID` preselects.
async function loadRuns() {
  try {
    const boot = await (await fetch('api/bootstrap', { cache: 'no-store' })).json();
    runs = await (await fetch('api/runs?history=0', { cache: 'no-store' })).json();
    runs.sort((a, b) => (b.run_id === boot.run_id) - (a.run_id === boot.run_id));
    const select = $('run-select');
    select.replaceChildren(...runs.map((r) => {
      const o = document.createElement('option');
      o.value = r.run_id;
      o.textContent = `${r.run_id}: ${r.spec.model_name}`;
      return o;
    }));
    const wanted = params.get('run');
    selected = runs.some((r) => r.run_id === wanted) ? wanted : boot.run_id;
    select.value = selected;
  } catch (e) {
    log(`could not list the relay's runs: ${e}`, 'error');
  }
}

$('run-select').addEventListener('change', () => {
  selected = $('run-select').value;
  history = [];
  refreshStatus();
});

// One tab per identity contributes at a time: two would send two updates a round under one
// peer key (the relay takes one) and interleave their sequence numbers. The Web Lock is held
// while this tab contributes and released when it stops or closes.
let releaseIdentity = null;
function lockIdentity() {
  if (!navigator.locks) return Promise.resolve(true);
  return new Promise((resolve) => {
    navigator.locks.request('swarmtrain-identity', { ifAvailable: true }, (lock) => {
      if (!lock) {
        resolve(false);
        return undefined;
      }
      resolve(true);
      return new Promise((release) => { releaseIdentity = release; });
    });
  });
}

// Back to the state before Contribute: the tab no longer trains.
function stopped() {
  releaseIdentity?.();
  releaseIdentity = null;
  trainer = null;
  $('progress').textContent = '—';
  $('contribute').textContent = 'Contribute';
  $('run-label').textContent = 'to the run';
  $('contribute').disabled = false;
  $('run-select').disabled = false;
  $('backend-select').disabled = false;
}

// The tab pauses between training steps while it is hidden (unless "keep training while this
// tab is hidden" is ticked) and while the battery is below 20% and not charging (where the
// browser has the Battery Status API), and says so; it resumes by itself.
const pauseReasons = { hidden: document.visibilityState === 'hidden', battery: false };
let paused = false;
function applyPause() {
  if (!trainer) return;
  const why = [];
  if (pauseReasons.hidden && !$('background').checked) why.push('this tab is hidden');
  if (pauseReasons.battery) why.push('the battery is below 20% and not charging');
  const now = why.length > 0;
  trainer.setPaused(now);
  if (now === paused) return;
  paused = now;
  if (now) {
    $('state').textContent = `Paused: ${why.join(' and ')}. Training resumes by itself.`;
    $('state').className = 'state warn';
    log(`paused: ${why.join(' and ')}`, 'warn');
  } else {
    $('state').textContent = 'Resumed.';
    $('state').className = 'state';
    log('resumed');
  }
}
document.addEventListener('visibilitychange', () => {
  pauseReasons.hidden = document.visibilityState === 'hidden';
  applyPause();
});
$('background').addEventListener('change', applyPause);
navigator.getBattery?.().then((battery) => {
  const check = () => {
    pauseReasons.battery = !battery.charging && battery.level < 0.2;
    applyPause();
  };
  battery.addEventListener('levelchange', check);
  battery.addEventListener('chargingchange', check);
  check();
}).catch(() => {});

// One button: Contribute starts training in this tab, Stop ends it after the current step.
$('contribute').addEventListener('click', async () => {
  if (trainer) {
    trainer.stop();
    $('contribute').disabled = true;
    $('state').textContent = 'Stopping after the current step…';
    return;
  }
  if (!(await lockIdentity())) {
    $('state').textContent = 'Another tab of this browser is already contributing with your identity; one tab at a time trains.';
    $('state').className = 'state warn';
    return;
  }
  $('contribute').disabled = true;
  $('run-select').disabled = true;
  $('backend-select').disabled = true;
  $('state').textContent = 'Starting…';
  $('state').className = 'state';
  try {
    await init();
    // `?transport=ws` or `?transport=webrtc-direct` picks the connection; the default takes
    // WebRTC-direct when the relay offers it.
    const transport = params.get('transport') ?? 'auto';
    // The tab also links to up to 3 other browsers of the relay over WebRTC (signaling through
    // the relay, STUN/TURN from the relay's operator); `?direct=N` changes how many, `?direct=0`
    // turns links off, `?ice=<JSON array of RTCIceServer>` replaces the relay's ICE servers.
    const direct = params.has('direct') ? Number(params.get('direct')) : undefined;
    // Training runs in a dedicated worker (`trainer-worker.js`) so that this page stays
    // responsive; `?worker=0` trains on the page's own thread instead.
    const worker = params.get('worker') === '0' ? undefined : new URL('trainer-worker.js', import.meta.url).href;
    const ice = params.get('ice');
    // In a federation the tab joins the nearest, least loaded of its relays (the page's own
    // or another) and fails over to another; `?pin=1` keeps it on the page's relay.
    const pinRelay = params.get('pin') === '1';
    // The backend: the package picks the faster one (`auto`) unless the backend picker or
    // `?backend=webgpu|cpu|measure` says otherwise.
    const backend = $('backend-select').value;
    $('state').textContent = backend === 'cpu' || backend === 'webgpu' ? 'Starting…' : 'Starting: choosing the faster backend…';
    trainer = await Trainer.connect({
      backend,
      relay: new URL('.', location.href).href,
      run: selected,
      transport,
      direct,
      iceServers: ice ? JSON.parse(ice) : undefined,
      worker,
      pinRelay,
    });
    trainer.on('*', onEvent);
    trainer.start();
    // "Stop training <run>", not "Stop to the run <run>".
    $('contribute').textContent = 'Stop';
    $('run-label').textContent = 'training';
    $('contribute').disabled = false;
    paused = false;
    applyPause();
  } catch (e) {
    onEvent({ kind: 'error', message: `could not start: ${e}` });
  }
});

async function showIdentity() {
  try {
    await init();
    $('identity-key').textContent = (await identityPeerKey()).slice(0, 16);
  } catch (e) {
    log(`could not read this browser's identity: ${e}`, 'error');
  }
}

$('identity-export').addEventListener('click', async () => {
  const hex = await exportIdentity();
  const link = document.createElement('a');
  link.href = URL.createObjectURL(new Blob([`${hex}\n`], { type: 'text/plain' }));
  link.download = 'swarmtrain-identity.txt';
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
  log('identity exported');
});

$('identity-import').addEventListener('change', async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  try {
    const peer = await importIdentity(await file.text());
    $('identity-key').textContent = peer.slice(0, 16);
    log(`identity imported: peer ${peer.slice(0, 16)}${trainer ? ' (used from the next start)' : ''}`);
  } catch (e) {
    log(`could not import the identity: ${e}`, 'error');
  }
  event.target.value = '';
});

// `?backend=webgpu|cpu|measure` preselects the backend picker.
if ([...$('backend-select').options].some((o) => o.value === params.get('backend'))) $('backend-select').value = params.get('backend');
await loadRuns();
showIdentity();
pollStatus();
