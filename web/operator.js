// The operator view: polls the relay's own JSON and Prometheus endpoints and draws them. Every
// figure here is one the relay serves to anyone (`/api/runs`, `/metrics`, the leaderboard).
const $ = (id) => document.getElementById(id);
const base = new URL('./', window.location.href);

// Prometheus text: `name{labels} value` lines into [{ name, labels, value }].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)$/);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[3] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

const metricValue = (metrics, name) => metrics.find((m) => m.name === name)?.value;
const bytes = (n) => (n == null || Number.isNaN(n) ? '—'
  : n >= 2 ** 30 ? `${(n / 2 ** 30).toFixed(2)} GiB` : n >= 2 ** 20 ? `${(n / 2 ** 20).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`);
const count = (n) => (n == null ? '—' : n.toLocaleString('en'));

function row(tbody, cells) {
  const tr = document.createElement('tr');
  for (const c of cells) {
    const td = document.createElement('td');
    td.textContent = c;
    tr.append(td);
  }
  tbody.append(tr);
}

function drawChart(canvas, history) {
  const g = canvas.getContext('2d');
  g.clearRect(0, 0, canvas.width, canvas.height);
  const lm = history.some((h) => h.val_loss != null);
  const value = (h) => (lm ? h.val_loss : h.accuracy);
  const pts = history.filter((h) => value(h) != null && !Number.isNaN(value(h)));
  const top = lm ? Math.max(1, ...pts.map(value)) : 1;
  g.strokeStyle = '#e2e8f0';
  g.fillStyle = '#64748b';
  g.font = '11px sans-serif';
  for (const a of [0, 0.5, 1]) {
    const y = canvas.height - 16 - a * (canvas.height - 26);
    g.beginPath(); g.moveTo(34, y); g.lineTo(canvas.width, y); g.stroke();
    g.fillText(lm ? (a * top).toFixed(1) : `${a * 100}%`, 0, y + 4);
  }
  g.fillText(lm ? 'held-out loss (nats/byte) per round' : 'held-out accuracy per round', 40, 10);
  if (!pts.length) return;
  const first = pts[0].round;
  const span = Math.max(1, pts.at(-1).round - first);
  g.strokeStyle = '#2563eb';
  g.lineWidth = 2;
  g.beginPath();
  pts.forEach((p, i) => {
    const x = 34 + ((p.round - first) / span) * (canvas.width - 44);
    const y = canvas.height - 16 - (value(p) / top) * (canvas.height - 26);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
  g.fillText(`rounds ${first}–${pts.at(-1).round}`, canvas.width - 110, canvas.height - 2);
}

const cards = new Map();
function card(runId) {
  if (!cards.has(runId)) {
    const node = $('run-card').content.firstElementChild.cloneNode(true);
    node.dataset.run = runId;
    $('runs').append(node);
    cards.set(runId, node);
  }
  return cards.get(runId);
}

async function showRun(s) {
  const c = card(s.run_id);
  const q = (sel) => c.querySelector(sel);
  q('.run-id').textContent = s.run_id;
  q('.model').textContent = `${s.spec.model_name}, ${count(s.n_params)} parameters, ${s.spec.data}`;
  q('.round').textContent = s.unannounced ? `${s.round} (waiting for its checkpoint write)` : s.round;
  q('.updates').textContent = `${s.updates_this_round} of quorum ${s.spec.quorum}`;
  q('.peers').textContent = `${s.active_peers} / ${s.joined_peers}`;
  const counts = (by) => Object.entries(by).map(([k, n]) => `${k} ${count(n)}`).join(', ') || 'none';
  q('.backends').textContent = counts(s.backends);
  q('.checks').textContent = counts(s.checks);
  q('.replays').textContent = `${counts(s.replays)}; ${s.audits_pending} reveals awaited`;
  q('.verifiers').textContent = `${s.verifiers} asking, ${s.verifier_jobs} jobs out; reports: ${counts(s.verifier_reports)}`;
  q('.timeout').textContent = `${(s.round_timeout_ms / 1000).toFixed(1)} s (configured ${(s.spec.round_deadline_ms / 1000).toFixed(0)} s)`;
  q('.accepted').textContent = count(s.accepted_updates);
  q('.aggregation').textContent = `${s.spec.aggregator}, codec ${s.spec.codec} (${bytes(s.spec.update_bytes)} per update), H = ${s.spec.inner_steps}`;
  const last = s.history.at(-1);
  q('.agg-ms').textContent = last ? `${last.aggregation_ms.toFixed(1)} ms (round ${last.round})` : '—';
  q('.epsilon').textContent = s.privacy_epsilon == null ? 'off' : s.privacy_epsilon.toFixed(3);
  q('.checkpoint').textContent = `θ ${s.params_hash.slice(0, 16)}…${s.checkpoint_failures ? `, ${s.checkpoint_failures} failed writes (retried)` : ''}`;
  drawChart(q('.chart'), s.history);

  const rejected = q('.rejected tbody');
  rejected.replaceChildren();
  const reasons = Object.entries(s.rejected).sort((a, b) => b[1] - a[1]);
  for (const [reason, n] of reasons) row(rejected, [reason, count(n)]);
  if (!reasons.length) row(rejected, ['none', '0']);

  const board = await (await fetch(new URL(`api/runs/${encodeURIComponent(s.run_id)}/leaderboard?limit=10`, base))).json();
  q('.credit-peers').textContent = `${board.peers} peers credited; top 10`;
  const credits = q('.credits tbody');
  credits.replaceChildren();
  for (const c of board.top) {
    row(credits, [`${c.peer.slice(0, 16)}…`, count(c.samples), count(c.accepted_updates), `${c.first_round}–${c.last_round}`,
      `${count(c.verified_units)} ${c.unit}`, `${count(c.unchecked_units)} ${c.unit}`, `${count(c.failed_units)} ${c.unit}`]);
  }
  if (!board.top.length) row(credits, ['no accepted update yet', '', '', '', '', '', '']);

  const history = q('.history tbody');
  history.replaceChildren();
  for (const h of s.history.slice(-10).reverse()) {
    const metric = h.val_loss != null ? `loss ${h.val_loss.toFixed(3)}` : h.accuracy != null ? `${(h.accuracy * 100).toFixed(1)}%` : '—';
    row(history, [h.round, h.closed_at_ms ? `${(h.closed_at_ms / 1000).toFixed(1)} s` : '—', h.contributors, count(h.samples), metric, `${h.aggregation_ms.toFixed(1)} ms`]);
  }
}

async function refresh() {
  try {
    const [runs, metricsText, boot] = await Promise.all([
      fetch(new URL('api/runs?history=100', base)).then((r) => r.json()),
      fetch(new URL('metrics', base)).then((r) => r.text()),
      fetch(new URL('api/bootstrap', base)).then((r) => r.json()),
    ]);
    // A federation's relays as this relay lists them to clients (the root's list, on an edge),
    // with the libp2p connections each holds; none for a lone relay.
    const federation = boot.federation ?? [];
    $('federation').textContent = federation.length
      ? federation.map((m) => `${m.role} ${m.url} (${count(m.load)} connections)`).join('\n')
      : 'a lone relay';
    const metrics = parseMetrics(metricsText);
    // The federation's shared ledger (PostgreSQL, `--ledger-url`), when the relay writes to one:
    // what its queue did; else the ledger is the relay's own data directory (an edge's, its root's).
    const rows = (outcome) => metrics.find((m) => m.name === 'swarmtrain_shared_ledger_rows_total' && m.labels.outcome === outcome)?.value;
    $('ledger').textContent = rows('written') === undefined
      ? (federation.length ? 'the root\'s data directory (no shared ledger)' : 'this relay\'s data directory')
      : `shared (PostgreSQL): ${count(rows('written'))} rows written, ${count(metricValue(metrics, 'swarmtrain_shared_ledger_queued'))} queued, `
        + `${count(rows('filled_in'))} filled in by the root, ${count(rows('dropped'))} dropped, `
        + `${count(metricValue(metrics, 'swarmtrain_shared_ledger_failed_writes_total'))} failed writes, `
        + `${count(metricValue(metrics, 'swarmtrain_shared_ledger_failed_reads_total'))} failed reads`;
    $('connections').textContent = count(metricValue(metrics, 'swarmtrain_connections'));
    // How peers came (tcp, ws, wss, webrtc-direct) and where the relay tells them to dial.
    const transports = metrics.filter((m) => m.name === 'swarmtrain_connections_by_transport' && m.value > 0);
    $('transports').textContent = transports.length ? transports.map((m) => `${m.labels.transport} ${count(m.value)}`).join(', ') : 'none';
    const advertised = metrics.filter((m) => m.name === 'swarmtrain_advertised_address');
    $('advertised').textContent = advertised.map((m) => `${m.labels.address}${m.labels.loopback === 'true' ? ' (loopback clients only)' : ''}`).join('\n') || '—';
    $('sealed').textContent = count(metricValue(metrics, 'swarmtrain_sealed_connections'));
    $('reservations').textContent = count(metricValue(metrics, 'swarmtrain_circuit_reservations'));
    $('memory').textContent = bytes(metricValue(metrics, 'process_resident_memory_bytes'));
    $('served').textContent = bytes(metricValue(metrics, 'swarmtrain_params_bytes_served_total'));
    $('strikes').textContent = count(metricValue(metrics, 'swarmtrain_closed_for_strikes_total'));
    $('tracked').textContent = count(metricValue(metrics, 'swarmtrain_tracked_identities'));
    for (const s of runs) await showRun(s);
    $('state').textContent = `${runs.length} run${runs.length === 1 ? '' : 's'}; updated ${new Date().toLocaleTimeString()}.`;
    $('state').className = 'state';
  } catch (e) {
    $('state').textContent = `Could not reach the relay: ${e.message}. Trying again in 5 s.`;
    $('state').className = 'state warn';
  }
}

refresh();
setInterval(refresh, 5000);
