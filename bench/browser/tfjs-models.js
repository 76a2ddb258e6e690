// swarmtrain's two models written in TF.js for `cargo xtask bench browser`, layer for layer as
// Burn runs them (shared/src/lm.rs, shared/src/model.rs), trained the way a swarmtrain peer
// trains (shared/src/lm_train.rs): AdamW with decoupled weight decay, global-norm clipping, the
// batch loss summed on the device and read back once a round together with the parameters.
//
// TF.js is what DISCO, the best-known browser training system, trains with. Nothing here is
// used by swarmtrain itself: it is the reference the benchmark measures Burn against.

/** The byte-level transformer: pre-norm blocks, causal attention, exact GELU MLP, no biases. */
export function lmModel(tf, { context, d_model: d, heads, layers, mlp_ratio: ratio }) {
  const vocab = 256;
  const hd = d / heads;
  const normal = (shape) => tf.variable(tf.randomNormal(shape, 0, 0.02));
  const norm = () => ({ gain: tf.variable(tf.ones([d])), bias: tf.variable(tf.zeros([d])) });
  const p = {
    tokens: normal([vocab, d]),
    positions: normal([context, d]),
    blocks: Array.from({ length: layers }, () => ({
      attnNorm: norm(),
      qkv: normal([d, 3 * d]),
      proj: normal([d, d]),
      mlpNorm: norm(),
      up: normal([d, ratio * d]),
      down: normal([ratio * d, d]),
    })),
    norm: norm(),
    head: normal([d, vocab]),
  };
  const vars = [p.tokens, p.positions];
  for (const b of p.blocks) {
    vars.push(b.attnNorm.gain, b.attnNorm.bias, b.qkv, b.proj, b.mlpNorm.gain, b.mlpNorm.bias, b.up, b.down);
  }
  vars.push(p.norm.gain, p.norm.bias, p.head);

  // Burn's LayerNorm: (x − mean) / √(var + 1e-5) · gain + bias over the last axis.
  const layerNorm = (x, { gain, bias }) => {
    const { mean, variance } = tf.moments(x, -1, true);
    return x.sub(mean).div(variance.add(1e-5).sqrt()).mul(gain).add(bias);
  };
  // Burn's gelu: the exact form, x · Φ(x).
  const gelu = (x) => x.mul(0.5).mul(tf.erf(x.mul(Math.SQRT1_2)).add(1));

  // The embedding lookup. TF.js's wasm backend has no kernel for the gradient of `gather`
  // (UnsortedSegmentSum), so there it is a one-hot matrix product: the same function, with
  // b·t·256·d more multiply-adds (as many as the output head's).
  const embed =
    tf.getBackend() === "wasm"
      ? (inputs, batch, time) => tf.oneHot(inputs.reshape([batch * time]), vocab).matMul(p.tokens).reshape([batch, time, d])
      : (inputs) => tf.gather(p.tokens, inputs);

  /** Mean next-byte cross-entropy of windows `[batch, time + 1]` (int32). */
  function loss(windows) {
    const [batch, len] = windows.shape;
    const time = len - 1;
    const inputs = windows.slice([0, 0], [batch, time]);
    const targets = windows.slice([0, 1], [batch, time]).reshape([batch * time]);
    let x = embed(inputs, batch, time).add(p.positions.slice([0, 0], [time, d])); // [b, t, d]
    // −∞ above the diagonal (as Burn's mask_fill): a position never attends to later ones.
    const allowed = tf.linalg.bandPart(tf.ones([time, time]), -1, 0);
    const mask = tf.sub(1, allowed).mul(-1e9).reshape([1, 1, time, time]);
    for (const b of p.blocks) {
      const qkv = layerNorm(x, b.attnNorm).reshape([batch * time, d]).matMul(b.qkv).reshape([batch, time, 3 * d]);
      const split = (i) => qkv.slice([0, 0, i * d], [batch, time, d]).reshape([batch, time, heads, hd]).transpose([0, 2, 1, 3]);
      const [q, k, v] = [split(0), split(1), split(2)];
      const scores = tf.matMul(q, k, false, true).mul(1 / Math.sqrt(hd)).add(mask); // [b, h, t, t]
      const attended = tf.matMul(tf.softmax(scores), v).transpose([0, 2, 1, 3]).reshape([batch * time, d]);
      x = x.add(attended.matMul(b.proj).reshape([batch, time, d]));
      const hidden = gelu(layerNorm(x, b.mlpNorm).reshape([batch * time, d]).matMul(b.up));
      x = x.add(hidden.matMul(b.down).reshape([batch, time, d]));
    }
    const logits = layerNorm(x, p.norm).reshape([batch * time, d]).matMul(p.head);
    return tf.losses.softmaxCrossEntropy(tf.oneHot(targets, vocab), logits);
  }

  /** A batch of `batch` random windows, made on the host as a peer's text batch is. */
  function batch(size, rng) {
    const window = context + 1;
    const bytes = new Int32Array(size * window);
    for (let i = 0; i < bytes.length; i++) bytes[i] = rng() & 0xff;
    return () => tf.tensor2d(bytes, [size, window], "int32");
  }

  return { vars, loss, batch, params: count(vars) };
}

/** The digits MLP: 64 pixels → hidden (ReLU) → 10 classes, with biases (Burn's Linear). */
export function digitsModel(tf, { hidden }) {
  const normal = (shape) => tf.variable(tf.randomNormal(shape, 0, 0.1));
  const p = {
    w1: normal([64, hidden]),
    b1: tf.variable(tf.zeros([hidden])),
    w2: normal([hidden, 10]),
    b2: tf.variable(tf.zeros([10])),
  };
  const vars = [p.w1, p.b1, p.w2, p.b2];
  function loss({ features, targets }) {
    const logits = features.matMul(p.w1).add(p.b1).relu().matMul(p.w2).add(p.b2);
    return tf.losses.softmaxCrossEntropy(tf.oneHot(targets, 10), logits);
  }
  function batch(size, rng) {
    const pixels = new Float32Array(size * 64);
    const labels = new Int32Array(size);
    for (let i = 0; i < pixels.length; i++) pixels[i] = (rng() % 17) / 16;
    for (let i = 0; i < size; i++) labels[i] = rng() % 10;
    return () => ({ features: tf.tensor2d(pixels, [size, 64]), targets: tf.tensor1d(labels, "int32") });
  }
  return { vars, loss, batch, params: count(vars) };
}

function count(vars) {
  return vars.reduce((n, v) => n + v.size, 0);
}

/**
 * One replica with its optimizer: `round(steps, batch)` runs `steps` AdamW steps, then reads the
 * summed loss and every parameter back, as a swarmtrain peer does at the end of its round.
 * `optimizer` is swarmtrain's `LmInnerSpec` (the peak learning rate is used throughout).
 */
export function trainer(tf, model, optimizer) {
  const lr = optimizer.schedule.peak;
  const adam = tf.train.adam(lr, optimizer.beta_1, optimizer.beta_2, 1e-8);
  const decay = 1 - lr * optimizer.weight_decay;
  function step(makeBatch, sum) {
    return tf.tidy(() => {
      const batch = makeBatch();
      const { value, grads } = tf.variableGrads(() => model.loss(batch), model.vars);
      let scaled = grads;
      if (optimizer.clip_norm != null) {
        // Summed one by one: `tf.addN` over every parameter needs more storage buffers than
        // WebGPU's default limit of 8 per shader stage, and its pipeline fails validation.
        const squared = Object.values(grads)
          .map((g) => g.square().sum())
          .reduce((a, b) => a.add(b));
        const factor = tf.minimum(1, tf.div(optimizer.clip_norm, squared.sqrt().add(1e-6)));
        scaled = Object.fromEntries(Object.entries(grads).map(([k, g]) => [k, g.mul(factor)]));
      }
      // Decoupled weight decay (AdamW), then the Adam update.
      if (decay !== 1) for (const v of model.vars) v.assign(v.mul(decay));
      adam.applyGradients(scaled);
      return sum ? sum.add(value) : value.clone();
    });
  }
  async function round(steps, makeBatch) {
    let sum = null;
    for (let s = 0; s < steps; s++) {
      const next = step(makeBatch, sum);
      sum?.dispose();
      sum = next;
    }
    const loss = (await sum.data())[0] / steps;
    sum.dispose();
    await Promise.all(model.vars.map((v) => v.data()));
    return loss;
  }
  return { round };
}
