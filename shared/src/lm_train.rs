//! The inner loop of every model: AdamW with linear warm-up and cosine decay, and clipping of
//! the global gradient norm (PyTorch's `clip_grad_norm_`), on any autodiff backend.

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::AdaptorRecord;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, GradientsParams, Optimizer,
};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::lm::{Lm, LmConfig};
use crate::params::{self, ParamsError};

/// Learning rate: linear warm-up to `peak` over `warmup` steps, then a cosine down to
/// `peak · min_ratio` at step `total` (and flat after).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub min_ratio: f64,
}

impl LrSchedule {
    /// The rate for 0-based `step`.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let floor = self.peak * self.min_ratio;
        floor + (self.peak - floor) * 0.5 * (1.0 + (core::f64::consts::PI * progress).cos())
    }
}

/// Inner optimizer settings of a run (AdamW, its schedule and clipping).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LmInnerSpec {
    pub schedule: LrSchedule,
    pub weight_decay: f32,
    pub beta_1: f32,
    pub beta_2: f32,
    /// Maximum global L2 norm of the gradient; `None` disables clipping.
    pub clip_norm: Option<f32>,
}

impl LmInnerSpec {
    pub fn new(schedule: LrSchedule) -> Self {
        Self {
            schedule,
            weight_decay: 0.1,
            beta_1: 0.9,
            beta_2: 0.95,
            clip_norm: Some(1.0),
        }
    }

    /// A constant rate with no warm-up and no clipping (the digits run's default).
    pub fn constant(lr: f64, weight_decay: f32) -> Self {
        Self {
            schedule: LrSchedule {
                peak: lr,
                warmup: 0,
                total: 1,
                min_ratio: 1.0,
            },
            weight_decay,
            beta_1: 0.9,
            beta_2: 0.999,
            clip_norm: None,
        }
    }

    fn optimizer(&self) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.beta_1)
            .with_beta_2(self.beta_2)
            .with_epsilon(1e-8)
            .with_weight_decay(self.weight_decay)
    }
}

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    sum: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = g.powi_scalar(2).sum();
            self.sum = Some(match self.sum.take() {
                Some(sum) => sum + s,
                None => s,
            });
        }
    }
}

struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: Tensor<B::InnerBackend, 1>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads
                .register(param.id, g * self.factor.clone().unsqueeze::<D>());
        }
    }
}

/// Scales all gradients of `module` by `min(1, max_norm / ‖g‖₂)` over every parameter at once,
/// without reading anything back (the factor stays on the device).
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    mut grads: GradientsParams,
    max_norm: f32,
) -> GradientsParams {
    let mut norm = SquaredNorm::<B> {
        grads: &grads,
        sum: None,
    };
    module.visit(&mut norm);
    let Some(squared) = norm.sum else {
        return grads;
    };
    let factor = squared
        .sqrt()
        .add_scalar(1e-6)
        .recip()
        .mul_scalar(max_norm)
        .clamp_max(1.0);
    module.visit(&mut Scale::<B> {
        grads: &mut grads,
        factor,
    });
    grads
}

/// A replica's training state beyond θ: its place in the schedule and its AdamW moments. With
/// θ_t and a round's data it decides the round's update bit for bit on one backend, which is
/// what a replay of the round checks ([`InnerLoop::state`], [`InnerLoop::restore`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// The schedule's position (the global step the next step takes).
    pub step: u64,
    /// Per parameter tensor, in the module's visit order.
    pub moments: Vec<Moments>,
}

/// AdamW's state of one parameter tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    /// Steps it has taken (0: none yet, and no moments).
    pub time: u64,
    /// First and second moments, flattened (empty when `time` is 0).
    pub first: Vec<f32>,
    pub second: Vec<f32>,
}

/// One parameter tensor's AdamW state on the device: its step count and its moments, flat.
type DeviceMoments<B> = (usize, Tensor<B, 1>, Tensor<B, 1>);

/// The AdamW moments of each parameter tensor of a module, in visit order.
struct CollectMoments<'a, B: AutodiffBackend> {
    record: &'a dyn Fn(&ParamId) -> Option<AdaptorRecord<AdamW, B>>,
    out: Vec<Option<DeviceMoments<B::InnerBackend>>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectMoments<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let state = (self.record)(&param.id).map(|record| {
            let state: AdamWState<B::InnerBackend, D> = record.into_state::<D>();
            let m = state.momentum;
            let n = m.moment_1.shape().num_elements();
            (m.time, m.moment_1.reshape([n]), m.moment_2.reshape([n]))
        });
        self.out.push(state);
    }
}

/// AdamW records for a module's parameters from [`Moments`] in visit order.
struct RestoreMoments<'a, B: AutodiffBackend> {
    moments: &'a [Moments],
    next: usize,
    device: B::Device,
    records: Vec<(ParamId, AdaptorRecord<AdamW, B>)>,
    error: Option<ParamsError>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for RestoreMoments<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(m) = self.moments.get(self.next) else {
            self.error.get_or_insert(ParamsError::Length {
                expected: self.next + 1,
                got: self.moments.len(),
            });
            return;
        };
        self.next += 1;
        if m.time == 0 {
            return;
        }
        let shape = param.shape();
        let n = shape.num_elements();
        if m.first.len() != n || m.second.len() != n {
            self.error.get_or_insert(ParamsError::Length {
                expected: n,
                got: m.first.len().min(m.second.len()),
            });
            return;
        }
        let tensor = |values: &[f32]| {
            Tensor::<B::InnerBackend, 1>::from_data(
                TensorData::new(values.to_vec(), [n]),
                &self.device,
            )
            .reshape(shape.clone())
        };
        let state = AdamWState {
            momentum: AdaptiveMomentumState::new(
                m.time as usize,
                tensor(&m.first),
                tensor(&m.second),
            ),
        };
        self.records
            .push((param.id, AdaptorRecord::from_state::<D>(state)));
    }
}

/// A model that can be trained: the loss of one batch, on the device.
pub trait Objective<B: Backend>: Module<B> {
    /// One batch of training examples, on the host.
    type Batch;
    /// The mean loss of `batch` (shape `[1]`).
    fn batch_loss(&self, batch: &Self::Batch, device: &B::Device) -> Tensor<B, 1>;
}

/// A batch of language-model windows: `windows.len() / window` windows of `window` bytes
/// (`context + 1` each).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextBatch {
    pub windows: Vec<u8>,
    pub window: usize,
}

impl TextBatch {
    /// A round's steps over a peer's `text`: one batch of `batch` windows of `window` bytes per
    /// step, in order (what a replica trains on and a replay runs again).
    pub fn of_round(text: &[u8], window: usize, batch: u32) -> impl Iterator<Item = Self> + '_ {
        text.chunks_exact((batch as usize * window).max(1))
            .map(move |chunk| Self {
                windows: chunk.to_vec(),
                window,
            })
    }
}

impl<B: Backend> Objective<B> for Lm<B> {
    type Batch = TextBatch;

    fn batch_loss(&self, batch: &TextBatch, device: &B::Device) -> Tensor<B, 1> {
        let rows = batch.windows.len() / batch.window.max(1);
        let tokens: Vec<i64> = batch.windows.iter().map(|&b| i64::from(b)).collect();
        self.loss(Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens, [rows, batch.window]),
            device,
        ))
    }
}

/// One replica of a model with its AdamW state, stepped by its caller: the inner loop of every
/// peer (browser, native worker, simulator, attack grid). The moments persist across
/// [`load`](Self::load)s, as DiLoCo's workers keep theirs across rounds.
pub struct InnerLoop<B: AutodiffBackend, M: AutodiffModule<B> + Objective<B>> {
    device: B::Device,
    model: M,
    optimizer: OptimizerAdaptor<AdamW, M, B>,
    spec: LmInnerSpec,
    step: u64,
}

/// The language model's inner loop.
pub type LmInnerLoop<B> = InnerLoop<B, Lm<B>>;

impl<B: AutodiffBackend, M: AutodiffModule<B> + Objective<B>> core::fmt::Debug for InnerLoop<B, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("InnerLoop")
            .field("spec", &self.spec)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl<B: AutodiffBackend> InnerLoop<B, Lm<B>> {
    /// A language-model replica starting from `start`.
    pub fn new(
        device: &B::Device,
        config: &LmConfig,
        start: &[f32],
        spec: &LmInnerSpec,
    ) -> Result<Self, ParamsError> {
        Ok(Self::with_module(
            device,
            params::load(config.init::<B>(device), start)?,
            spec,
        ))
    }
}

impl<B: AutodiffBackend, M: AutodiffModule<B> + Objective<B>> InnerLoop<B, M> {
    /// A replica of `model` (already holding its starting parameters) with fresh AdamW moments.
    pub fn with_module(device: &B::Device, model: M, spec: &LmInnerSpec) -> Self {
        Self {
            device: device.clone(),
            model,
            optimizer: spec.optimizer().init(),
            spec: spec.clone(),
            step: 0,
        }
    }

    /// Replaces the parameters (the new global θ at a round start) and keeps the optimizer's
    /// moments, as DiLoCo's workers do.
    pub fn load(&mut self, values: &[f32]) -> Result<(), ParamsError> {
        self.model = params::load(self.model.clone(), values)?;
        Ok(())
    }

    /// Steps taken so far (the schedule's position).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Moves the schedule to `step` (a peer joining at round r starts at r · H).
    pub fn seek(&mut self, step: u64) {
        self.step = step;
    }

    /// One AdamW step on `batch`, clipped and scheduled as the spec says. Returns the batch
    /// loss, still on the device.
    pub fn step(&mut self, batch: &M::Batch) -> Tensor<B::InnerBackend, 1> {
        let loss = self.model.batch_loss(batch, &self.device);
        let mut grads = GradientsParams::from_grads(loss.backward(), &self.model);
        if let Some(max_norm) = self.spec.clip_norm {
            grads = clip_global_norm(&self.model, grads, max_norm);
        }
        let lr = self.spec.schedule.at(self.step);
        self.model = self.optimizer.step(lr, self.model.clone(), grads);
        self.step += 1;
        loss.inner()
    }

    /// The current parameters, read back asynchronously.
    pub async fn params(&self) -> Result<Vec<f32>, ParamsError> {
        params::to_vec(&self.model.valid()).await
    }

    /// The schedule's position and the AdamW moments, read back asynchronously.
    pub async fn state(&self) -> Result<TrainerState, ParamsError> {
        // The records and the visitor stay in this block: they are not `Send`, and the
        // readbacks below await.
        let step = self.step;
        let collected = {
            let records = self.optimizer.to_record();
            let record = |id: &ParamId| records.get(id).cloned();
            let mut collect = CollectMoments::<B> {
                record: &record,
                out: Vec::new(),
            };
            self.model.visit(&mut collect);
            collect.out
        };
        let mut moments = Vec::with_capacity(collected.len());
        for state in collected {
            moments.push(match state {
                Some((time, first, second)) => Moments {
                    time: time as u64,
                    first: first
                        .into_data_async()
                        .await?
                        .to_vec()
                        .map_err(|e| ParamsError::Readback(format!("{e:?}")))?,
                    second: second
                        .into_data_async()
                        .await?
                        .to_vec()
                        .map_err(|e| ParamsError::Readback(format!("{e:?}")))?,
                },
                None => Moments {
                    time: 0,
                    first: Vec::new(),
                    second: Vec::new(),
                },
            });
        }
        Ok(TrainerState { step, moments })
    }

    /// Takes `state` (from [`state`](Self::state) of a replica of the same model) as this
    /// replica's schedule position and moments.
    pub fn restore(&mut self, state: &TrainerState) -> Result<(), ParamsError> {
        let mut restore = RestoreMoments::<B> {
            moments: &state.moments,
            next: 0,
            device: self.device.clone(),
            records: Vec::new(),
            error: None,
        };
        self.model.visit(&mut restore);
        if let Some(e) = restore.error {
            return Err(e);
        }
        if restore.next != state.moments.len() {
            return Err(ParamsError::Length {
                expected: restore.next,
                got: state.moments.len(),
            });
        }
        let fresh = self.spec.optimizer().init();
        self.optimizer = std::mem::replace(&mut self.optimizer, fresh)
            .load_record(restore.records.into_iter().collect());
        self.step = state.step;
        Ok(())
    }
}

/// Mean next-byte cross-entropy (nats) of `params` on `windows` (`count` windows), in batches of
/// `batch`. Reads back asynchronously.
pub async fn evaluate_lm<B: Backend>(
    device: &B::Device,
    config: &LmConfig,
    params: &[f32],
    windows: &[u8],
    count: usize,
    batch: usize,
) -> Result<f32, ParamsError> {
    if count == 0 {
        return Ok(f32::NAN);
    }
    let window = windows.len() / count;
    let model = params::load(config.init::<B>(device), params)?;
    let mut total = 0.0f64;
    for chunk in windows.chunks(window * batch.max(1)) {
        let n = chunk.len() / window;
        let tokens: Vec<i64> = chunk.iter().map(|&b| i64::from(b)).collect();
        let loss = model.loss(Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens, [n, window]),
            device,
        ));
        total += f64::from(loss.into_scalar_async().await?.elem::<f32>()) * n as f64;
    }
    Ok((total / count as f64) as f32)
}

/// What this crate's tests of a round train: a one-layer, 16-wide LM with a context of 8, its
/// inner optimizer (peak 1e-2, 2 warm-up steps of 100) and θ₀ drawn with `seed`.
#[cfg(test)]
pub(crate) fn tiny_lm(seed: u64) -> (LmConfig, LmInnerSpec, Vec<f32>) {
    let config = LmConfig::new()
        .with_d_model(16)
        .with_heads(2)
        .with_layers(1)
        .with_context(8);
    let spec = LmInnerSpec::new(LrSchedule {
        peak: 1e-2,
        warmup: 2,
        total: 100,
        min_ratio: 0.1,
    });
    let theta = futures::executor::block_on(
        config.init_params::<burn::backend::NdArray>(&Default::default(), seed),
    )
    .expect("θ");
    (config, spec, theta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};

    #[test]
    fn schedule_warms_up_then_follows_a_cosine() {
        let s = LrSchedule {
            peak: 1e-3,
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        };
        assert!((s.at(0) - 1e-4).abs() < 1e-12);
        assert!((s.at(9) - 1e-3).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12, "cosine starts at the peak");
        // Halfway through the decay: floor + (peak − floor)/2 = 1e-4 + 4.5e-4.
        assert!((s.at(60) - 5.5e-4).abs() < 1e-12, "{}", s.at(60));
        assert!((s.at(110) - 1e-4).abs() < 1e-12);
        assert!((s.at(10_000) - 1e-4).abs() < 1e-12, "flat after the end");
    }

    /// AdamW on one weight w = 1 of `y = w·x`, loss = y (so ∂L/∂w = x = 2), against the formulas
    /// of Loshchilov & Hutter with bias correction.
    #[test]
    fn adamw_matches_hand_computed_values() {
        type B = Autodiff<NdArray>;
        let device = Default::default();
        let linear: Linear<B> = LinearConfig::new(1, 1).with_bias(false).init(&device);
        let mut linear = params::load(linear, &[1.0]).expect("load");
        let config = AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.95)
            .with_epsilon(1e-8)
            .with_weight_decay(0.1);
        let mut optimizer = config.init::<B, Linear<B>>();
        let (lr, g) = (0.01f64, 2.0f64);
        let (mut w, mut m, mut v) = (1.0f64, 0.0f64, 0.0f64);
        for t in 1..=3 {
            let x = Tensor::<B, 2>::from_data([[g as f32]], &device);
            let loss = linear.forward(x).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &linear);
            linear = optimizer.step(lr, linear, grads);
            // Hand computation.
            w *= 1.0 - lr * 0.1;
            m = 0.9 * m + 0.1 * g;
            v = 0.95 * v + 0.05 * g * g;
            let (m_hat, v_hat) = (m / (1.0 - 0.9f64.powi(t)), v / (1.0 - 0.95f64.powi(t)));
            w -= lr * m_hat / (v_hat.sqrt() + 1e-8);
            let got = futures::executor::block_on(params::to_vec(&linear)).expect("read")[0];
            assert!(
                (f64::from(got) - w).abs() < 1e-6,
                "step {t}: burn {got}, by hand {w}"
            );
        }
    }

    /// A round replayed from θ, the data and the trainer's state at the round's start lands
    /// on the same parameters bit for bit; the state survives its bytes; another step count
    /// does not land there.
    #[test]
    fn a_round_replayed_from_the_committed_state_matches_bit_for_bit() {
        type B = Autodiff<NdArray>;
        let device = Default::default();
        let (config, spec, theta) = tiny_lm(3);
        let window = config.context + 1;
        let batches: Vec<TextBatch> = (0..6u8)
            .map(|i| TextBatch {
                windows: (0..2 * window)
                    .map(|j| (j as u8).wrapping_mul(7).wrapping_add(i * 13))
                    .collect(),
                window,
            })
            .collect();
        let mut trainer = LmInnerLoop::<B>::new(&device, &config, &theta, &spec).expect("trainer");
        let fresh = futures::executor::block_on(trainer.state()).expect("state");
        assert!(
            fresh.moments.iter().all(|m| m.time == 0),
            "no moments before a step"
        );
        // Round 0: three steps; round 1 starts from its own θ with the moments kept.
        for batch in &batches[..3] {
            trainer.step(batch);
        }
        let theta1 = futures::executor::block_on(trainer.params()).expect("params");
        let state = futures::executor::block_on(trainer.state()).expect("state");
        assert!(state.moments.iter().all(|m| m.time == 3));
        let bytes = postcard::to_allocvec(&state).expect("encodes");
        let state: TrainerState = postcard::from_bytes(&bytes).expect("round trip");
        for batch in &batches[3..] {
            trainer.step(batch);
        }
        let honest = futures::executor::block_on(trainer.params()).expect("params");
        let replay = |state: &TrainerState, steps: usize| {
            let mut replica =
                LmInnerLoop::<B>::new(&device, &config, &theta, &spec).expect("replica");
            replica.load(&theta1).expect("θ₁");
            replica.restore(state).expect("restore");
            for batch in &batches[3..3 + steps] {
                replica.step(batch);
            }
            futures::executor::block_on(replica.params()).expect("params")
        };
        let replayed = replay(&state, 3);
        assert!(
            honest
                .iter()
                .zip(&replayed)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "the replay lands on the peer's parameters bit for bit"
        );
        assert_ne!(replay(&state, 2), honest, "two steps are not three");
        let mut fresh_moments = state.clone();
        fresh_moments.moments.iter_mut().for_each(|m| {
            *m = Moments {
                time: 0,
                first: Vec::new(),
                second: Vec::new(),
            }
        });
        assert_ne!(replay(&fresh_moments, 3), honest, "the moments matter");
    }

    #[test]
    fn global_norm_clipping_scales_every_gradient_together() {
        type B = Autodiff<NdArray>;
        let device = Default::default();
        let linear: Linear<B> = LinearConfig::new(2, 1).with_bias(true).init(&device);
        let linear = params::load(linear, &[1.0, 1.0, 0.0]).expect("load");
        // loss = 4·(w·x + b) with x = [3, 0]: ∂/∂w = [12, 0], ∂/∂b = 4.
        let x = Tensor::<B, 2>::from_data([[3.0f32, 0.0]], &device);
        let loss = linear.forward(x).sum().mul_scalar(4.0);
        let grads = GradientsParams::from_grads(loss.backward(), &linear);
        let grads = clip_global_norm(&linear, grads, 1.0);
        // ‖(12, 0, 4)‖ = √160; every component is scaled by 1/√160.
        let w = grads
            .get::<NdArray, 2>(linear.weight.id)
            .expect("weight grad")
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        let b = grads
            .get::<NdArray, 1>(linear.bias.as_ref().expect("bias").id)
            .expect("bias grad")
            .into_data()
            .to_vec::<f32>()
            .expect("f32");
        let s = 160f32.sqrt();
        assert!(
            (w[0] - 12.0 / s).abs() < 1e-5 && w[1].abs() < 1e-6 && (b[0] - 4.0 / s).abs() < 1e-5,
            "{w:?} {b:?}"
        );
    }
}
