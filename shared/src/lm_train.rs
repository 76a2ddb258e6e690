//! The inner loop of every model: AdamW with linear warm-up and cosine decay, and clipping of
//! the global gradient norm (PyTorch's `clip_grad_norm_`), on any autodiff backend.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
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
pub struct Trainer<B: AutodiffBackend, M: AutodiffModule<B> + Objective<B>> {
    device: B::Device,
    model: M,
    optimizer: OptimizerAdaptor<AdamW, M, B>,
    spec: LmInnerSpec,
    step: u64,
}

/// The language model's trainer.
pub type LmTrainer<B> = Trainer<B, Lm<B>>;

impl<B: AutodiffBackend, M: AutodiffModule<B> + Objective<B>> core::fmt::Debug for Trainer<B, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Trainer")
            .field("spec", &self.spec)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl<B: AutodiffBackend> Trainer<B, Lm<B>> {
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

impl<B: AutodiffBackend, M: AutodiffModule<B> + Objective<B>> Trainer<B, M> {
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
