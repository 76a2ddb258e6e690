// The contributor page. Everything it shows comes from the npm package's events and from the
// relay's public /api/status.
import init, { Contributor } from './pkg/swarmtrain.js';

const $ = (id) => document.getElementById(id);
const history = [];
let contributor = null;

function log(text, cls) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  if (cls) li.className = cls;
  $('log').prepend(li);
  while ($('log').children.length > 200) $('log').lastChild.remove();
}

function onEvent(ev) {
  switch (ev.kind) {
    case 'backend':
      $('backend').textContent = ev.backend;
      log(`training backend: ${ev.backend}${ev.detail ? ` (${ev.detail})` : ''}`);
      break;
    case 'joined':
      $('peer').textContent = ev.peer.slice(0, 16);
      $('transport').textContent = ev.transport === 'webrtc-direct' ? 'WebRTC-direct' : ev.transport === 'ws' ? 'WebSocket' : ev.transport;
      $('state').textContent = 'Connected to the relay; waiting for a round.';
      log(`joined run ${ev.run} as ${ev.peer.slice(0, 16)} over ${$('transport').textContent}`);
      break;
    case 'round':
      $('state').textContent = `Training round ${ev.round} (${ev.inner_steps} local steps)…`;
      break;
    case 'trained':
      $('trained').textContent = ev.rounds_trained;
      $('loss').textContent = ev.loss.toFixed(4);
      log(`round ${ev.round}: ${ev.steps} steps in ${ev.train_ms < 10000 ? `${ev.train_ms} ms` : `${(ev.train_ms / 1000).toFixed(1)} s`}, loss ${ev.loss.toFixed(4)}`);
      break;
    case 'submitted':
      $('state').textContent = `Update for round ${ev.round} ${ev.accepted ? 'accepted' : 'rejected: ' + ev.reason}.`;
      if (ev.relay_rtt_ms != null) $('rtt').textContent = `${ev.relay_rtt_ms.toFixed(1)} ms`;
      refreshStatus();
      break;
    case 'error':
      $('state').textContent = ev.message;
      $('state').className = 'state error';
      log(ev.message, 'error');
      break;
    default:
      log(JSON.stringify(ev));
  }
}

function drawChart() {
  const c = $('chart');
  const g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  g.strokeStyle = '#e2e8f0';
  g.fillStyle = '#64748b';
  g.font = '11px sans-serif';
  for (const a of [0, 0.5, 1]) {
    const y = c.height - 16 - a * (c.height - 26);
    g.beginPath(); g.moveTo(30, y); g.lineTo(c.width, y); g.stroke();
    g.fillText(`${a * 100}%`, 0, y + 4);
  }
  const pts = history.filter((h) => h.accuracy !== null);
  if (pts.length < 1) return;
  const maxRound = Math.max(1, ...pts.map((p) => p.round));
  g.strokeStyle = '#2563eb';
  g.lineWidth = 2;
  g.beginPath();
  pts.forEach((p, i) => {
    const x = 30 + (p.round / maxRound) * (c.width - 40);
    const y = c.height - 16 - p.accuracy * (c.height - 26);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  g.fillText(`round ${maxRound}`, c.width - 60, c.height - 2);
}

let refreshing = false;
async function refreshStatus() {
  if (refreshing) return;
  refreshing = true;
  try {
    const res = await fetch('api/status', { cache: 'no-store' });
    if (res.ok) {
      const s = await res.json();
      $('run').textContent = s.run_id;
      $('round').textContent = s.round;
      $('peers').textContent = `${s.updates_this_round} of ${s.active_peers} active`;
      const last = s.history.length ? s.history[s.history.length - 1] : null;
      $('accuracy').textContent = last ? `${(last.accuracy * 100).toFixed(1)}%` : '—';
      history.length = 0;
      history.push(...s.history);
      drawChart();
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

$('contribute').addEventListener('click', async () => {
  $('contribute').disabled = true;
  $('state').textContent = 'Starting…';
  try {
    await init();
    // `?transport=ws` or `?transport=webrtc-direct` picks the connection; the default takes
    // WebRTC-direct when the relay offers it.
    const transport = new URLSearchParams(location.search).get('transport') ?? 'auto';
    contributor = await Contributor.start(new URL('.', location.href).href, onEvent, undefined, transport);
  } catch (e) {
    onEvent({ kind: 'error', message: `could not start: ${e}` });
    $('contribute').disabled = false;
  }
});

pollStatus();
