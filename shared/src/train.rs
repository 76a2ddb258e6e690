//! The inner loop: AdamW steps on a peer's own backend.
//!
//! [`LocalTrainer`] is stepped by its caller, so a browser can yield to its event loop between
//! steps; losses stay on the device until [`LocalTrainer::finish`] reads them back
//! asynchronously.

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, AdamWConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::data::{BatchSampler, DigitsSet};
use crate::model::{DIGITS_INPUTS, DigitsMlp, DigitsMlpConfig};
use crate::params::{self, ParamsError};
use crate::protocol::InnerSpec;

/// What a peer's local round produced.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalResult {
    /// θ_local after the inner steps.
    pub params: Vec<f32>,
    /// Mean training loss over the steps.
    pub loss: f32,
    pub steps: u32,
    pub samples: u32,
}

/// One AdamW step on a batch: forward, cross-entropy, backward, update.
/// Returns the updated model and the (detached) loss.
pub fn train_step<B, O>(
    model: DigitsMlp<B>,
    optimizer: &mut O,
    loss_fn: &CrossEntropyLoss<B>,
    pixels: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    lr: f64,
) -> (DigitsMlp<B>, Tensor<B::InnerBackend, 1>)
where
    B: AutodiffBackend,
    O: Optimizer<DigitsMlp<B>, B>,
{
    let logits = model.forward(pixels); // [batch, 10]
    let loss = loss_fn.forward(logits, targets); // [1]
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = optimizer.step(lr, model, grads);
    (model, loss.inner())
}

/// Runs a peer's inner steps on backend `B`, one [`step`](Self::step) at a time.
pub struct LocalTrainer<B: AutodiffBackend> {
    device: B::Device,
    model: DigitsMlp<B>,
    optimizer: OptimizerAdaptor<AdamW, DigitsMlp<B>, B>,
    loss_fn: CrossEntropyLoss<B>,
    data: DigitsSet,
    sampler: BatchSampler,
    loss_sum: Option<Tensor<B::InnerBackend, 1>>,
    spec: InnerSpec,
    steps: u32,
}

impl<B: AutodiffBackend> core::fmt::Debug for LocalTrainer<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LocalTrainer")
            .field("steps", &self.steps)
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

impl<B: AutodiffBackend> LocalTrainer<B> {
    /// Starts from the global parameters `start`; batches come from `data` in an order fixed by
    /// `seed`.
    pub fn new(
        device: &B::Device,
        model: &DigitsMlpConfig,
        start: &[f32],
        data: DigitsSet,
        spec: &InnerSpec,
        seed: u64,
    ) -> Result<Self, ParamsError> {
        B::seed(device, seed);
        let module = params::load(model.init::<B>(device), start)?;
        let optimizer = AdamWConfig::new()
            .with_weight_decay(spec.weight_decay)
            .init();
        let sampler = BatchSampler::new(data.len(), spec.batch_size as usize, seed);
        Ok(Self {
            device: device.clone(),
            model: module,
            optimizer,
            loss_fn: CrossEntropyLoss::new(None, device),
            data,
            sampler,
            loss_sum: None,
            spec: spec.clone(),
            steps: 0,
        })
    }

    pub fn steps_done(&self) -> u32 {
        self.steps
    }

    pub fn is_done(&self) -> bool {
        self.steps >= self.spec.steps
    }

    /// One AdamW step on the next batch. Enqueues work; reads nothing back.
    pub fn step(&mut self) {
        let batch = self.sampler.next_batch();
        let pixels = Tensor::<B, 2>::from_data(
            TensorData::new(self.data.features(&batch), [batch.len(), DIGITS_INPUTS]),
            &self.device,
        );
        let targets = Tensor::<B, 1, Int>::from_data(
            TensorData::new(self.data.targets(&batch), [batch.len()]),
            &self.device,
        );
        let model = self.model.clone();
        let (model, loss) = train_step(
            model,
            &mut self.optimizer,
            &self.loss_fn,
            pixels,
            targets,
            self.spec.lr,
        );
        self.model = model;
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(sum) => sum + loss,
            None => loss,
        });
        self.steps += 1;
    }

    /// Reads the parameters and the mean loss back (asynchronously: safe in browsers).
    pub async fn finish(self) -> Result<LocalResult, ParamsError> {
        let loss = match self.loss_sum {
            Some(sum) => sum.into_scalar_async().await?.elem::<f32>() / self.steps.max(1) as f32,
            None => f32::NAN,
        };
        let params = params::to_vec(&self.model.valid()).await?;
        Ok(LocalResult {
            params,
            loss,
            steps: self.steps,
            samples: self.steps * (self.spec.batch_size.min(self.data.len() as u32)),
        })
    }
}

/// Fraction of `data` that the model with parameters `params` classifies correctly.
pub async fn evaluate<B: Backend>(
    device: &B::Device,
    model: &DigitsMlpConfig,
    params: &[f32],
    data: &DigitsSet,
) -> Result<f32, ParamsError> {
    if data.is_empty() {
        return Ok(0.0);
    }
    let module = params::load(model.init::<B>(device), params)?;
    let all: Vec<usize> = (0..data.len()).collect();
    let pixels = Tensor::<B, 2>::from_data(
        TensorData::new(data.features(&all), [all.len(), DIGITS_INPUTS]),
        device,
    );
    let targets =
        Tensor::<B, 1, Int>::from_data(TensorData::new(data.targets(&all), [all.len()]), device);
    let predicted = module.forward(pixels).argmax(1).squeeze_dim::<1>(1); // [n]
    let correct = predicted
        .equal(targets)
        .int()
        .sum()
        .into_scalar_async()
        .await?
        .elem::<i64>();
    Ok(correct as f32 / data.len() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    type B = Autodiff<NdArray>;

    /// Two well-separated synthetic classes: class 0 lights the left half, class 1 the right.
    fn toy_set(n: usize) -> DigitsSet {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let label = (i % 2) as u8;
            for p in 0..64 {
                let left = p % 8 < 4;
                pixels.push(if left == (label == 0) {
                    12 + (i % 5) as u8
                } else {
                    (i % 3) as u8
                });
            }
            labels.push(label);
        }
        DigitsSet::new(pixels, labels).expect("valid")
    }

    #[test]
    fn local_training_lowers_the_loss_and_is_deterministic() {
        let device = Default::default();
        let config = DigitsMlpConfig::new().with_hidden(16);
        <NdArray as Backend>::seed(&device, 1);
        let start = futures::executor::block_on(params::to_vec(&config.init::<NdArray>(&device)))
            .expect("init");
        let spec = InnerSpec {
            steps: 30,
            batch_size: 16,
            lr: 1e-2,
            weight_decay: 0.0,
        };
        let data = toy_set(64);

        let run = |steps| {
            let spec = InnerSpec {
                steps,
                ..spec.clone()
            };
            let mut trainer =
                LocalTrainer::<B>::new(&device, &config, &start, data.clone(), &spec, 5)
                    .expect("trainer");
            while !trainer.is_done() {
                trainer.step();
            }
            futures::executor::block_on(trainer.finish()).expect("finish")
        };
        let first = run(1);
        let trained = run(30);
        let again = run(30);
        assert!(
            trained.loss < first.loss * 0.8,
            "loss {} -> {}",
            first.loss,
            trained.loss
        );
        assert_eq!(
            trained.params, again.params,
            "same seed, same parameters, bit for bit"
        );
        let before =
            futures::executor::block_on(evaluate::<NdArray>(&device, &config, &start, &data))
                .expect("eval");
        let after = futures::executor::block_on(evaluate::<NdArray>(
            &device,
            &config,
            &trained.params,
            &data,
        ))
        .expect("eval");
        assert!(
            after > 0.95 && after > before,
            "accuracy {before} -> {after}"
        );
    }
}
