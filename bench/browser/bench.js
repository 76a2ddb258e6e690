// The page `cargo xtask bench browser` opens once per engine and backend. The query string's
// `plan` names the engine (`burn`: the swarmtrain npm package; `tfjs`: TF.js 4.22), the backend
// and the models; the result lands in `window.benchResult`. Times are `performance.now()`,
// which counts from the start of the navigation, so the first step's time includes loading
// the engine.
import { digitsModel, lmModel, trainer } from "./tfjs-models.js";

const plan = JSON.parse(new URLSearchParams(location.search).get("plan"));
const out = document.getElementById("out");

function rng(seed) {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return s >>> 0;
  };
}

function script(src) {
  return new Promise((resolve, reject) => {
    const el = document.createElement("script");
    el.src = src;
    el.onload = resolve;
    el.onerror = () => reject(new Error(`could not load ${src}`));
    document.head.append(el);
  });
}

async function burn(backend) {
  const pkg = await import("/pkg/swarmtrain.js");
  await pkg.default();
  return {
    detail: null,
    async replica(m) {
      const bench = await pkg.TrainingBench.create(backend, JSON.stringify(m.model), JSON.stringify(m.optimizer), m.batch);
      this.detail = bench.detail;
      return { params: bench.params, round: (steps) => bench.round(steps) };
    },
  };
}

async function tfjs(backend) {
  await script("/tfjs/tfjs/dist/tf.min.js");
  const tf = window.tf;
  if (backend === "webgpu") {
    await script("/tfjs/tfjs-backend-webgpu/dist/tf-backend-webgpu.min.js");
  } else {
    await script("/tfjs/tfjs-backend-wasm/dist/tf-backend-wasm.min.js");
    tf.wasm.setWasmPaths("/tfjs/tfjs-backend-wasm/dist/");
  }
  if (!(await tf.setBackend(backend))) throw new Error(`TF.js could not start its ${backend} backend`);
  await tf.ready();
  const threads = backend === "wasm" ? `, ${tf.wasm.getThreadsCount()} thread(s)` : "";
  return {
    detail: `TF.js ${tf.version.tfjs} ${tf.getBackend()}${threads}`,
    async replica(m) {
      const model = m.model.ByteLm ? lmModel(tf, m.model.ByteLm) : digitsModel(tf, m.model.DigitsMlp);
      const replica = trainer(tf, model, m.optimizer);
      const makeBatch = model.batch(m.batch, rng(7));
      return { params: model.params, round: (steps) => replica.round(steps, makeBatch) };
    },
  };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function main() {
  const result = { engine: plan.engine, backend: plan.backend, models: [] };
  try {
    const engine = plan.engine === "burn" ? await burn(plan.backend) : await tfjs(plan.backend);
    for (const m of plan.models) {
      const replica = await engine.replica(m);
      const started = performance.now();
      await replica.round(1);
      const first = performance.now();
      result.firstStepMs ??= first;
      await replica.round(m.steps); // warm: every kernel compiled, every buffer allocated
      const rounds = [];
      let loss = NaN;
      for (let r = 0; r < m.rounds; r++) {
        const t = performance.now();
        loss = await replica.round(m.steps);
        rounds.push(performance.now() - t);
      }
      result.models.push({
        name: m.name,
        params: replica.params,
        batch: m.batch,
        steps: m.steps,
        firstStepMs: first - started,
        roundMs: rounds,
        stepsPerSecond: (1000 * m.steps) / median(rounds),
        loss,
      });
      out.textContent = JSON.stringify(result, null, 2);
    }
    result.detail = engine.detail;
  } catch (e) {
    result.error = String(e?.stack ?? e);
  }
  out.textContent = JSON.stringify(result, null, 2);
  window.benchResult = result;
}

main();
