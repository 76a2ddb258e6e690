// A page that embeds swarmtrain: connect to the relay that serves it, train in a worker, and
// show typed events. `?relay=URL` points it at another relay.
import init, { Trainer, type PeerEvent, type TrainerOptions } from 'swarmtrain';
import workerUrl from './worker.ts?worker&url';

const $ = (id: string) => document.getElementById(id)!;
const log = (line: string) => { $('log').textContent = `${line}\n${$('log').textContent}`; };

$('start').addEventListener('click', async () => {
  ($('start') as HTMLButtonElement).disabled = true;
  await init();
  const options: TrainerOptions = {
    relay: new URLSearchParams(location.search).get('relay') ?? new URL('/', location.href).href,
    transport: 'ws',
    worker: new URL(workerUrl, location.href).href,
  };
  const trainer = await Trainer.connect(options);
  $('status').textContent = `Connected to run ${trainer.run} as ${trainer.peer.slice(0, 16)} on ${trainer.backend}.`;
  trainer.on('progress', (e) => { $('status').textContent = `Round ${e.round}: ${e.steps} of ${e.planned_steps} steps`; });
  trainer.on('submitted', (e) => log(`round ${e.round}: update of ${e.bytes} bytes ${e.accepted ? 'accepted' : `rejected (${e.reason ?? '?'})`}`));
  trainer.on('credits', (e) => { $('credit').textContent = `${e.samples} samples in ${e.accepted_updates} updates`; });
  trainer.on('error', (e) => log(`error: ${e.message}`));
  trainer.on('*', (e: PeerEvent) => { if (e.kind === 'backend') log(`backend: ${e.backend} (${e.detail})`); });
  trainer.start();
});
