//! The digits classifier's training objective and evaluation. The inner loop itself is
//! [`crate::lm_train::InnerLoop`], shared by every model.

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;

use crate::data::{BatchSampler, DigitsSet};
use crate::lm_train::Objective;
use crate::model::{DIGITS_INPUTS, DigitsMlp, DigitsMlpConfig};
use crate::params::{self, ParamsError};

/// A batch of digits: `targets.len()` images of 64 features in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct DigitsBatch {
    pub features: Vec<f32>,
    pub targets: Vec<i64>,
}

impl DigitsBatch {
    /// The next batch that `sampler` draws from `data`.
    pub fn draw(data: &DigitsSet, sampler: &mut BatchSampler) -> Self {
        let batch = sampler.next_batch();
        Self {
            features: data.features(&batch),
            targets: data.targets(&batch),
        }
    }
}

impl<B: Backend> Objective<B> for DigitsMlp<B> {
    type Batch = DigitsBatch;

    fn batch_loss(&self, batch: &DigitsBatch, device: &B::Device) -> Tensor<B, 1> {
        let rows = batch.targets.len();
        let pixels = Tensor::<B, 2>::from_data(
            TensorData::new(batch.features.clone(), [rows, DIGITS_INPUTS]),
            device,
        );
        let targets =
            Tensor::<B, 1, Int>::from_data(TensorData::new(batch.targets.clone(), [rows]), device);
        let logits = self.forward(pixels); // [batch, 10]
        CrossEntropyLossConfig::new()
            .init(device)
            .forward(logits, targets)
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
        use crate::lm_train::{InnerLoop, LmInnerSpec};
        let device = Default::default();
        let config = DigitsMlpConfig::new().with_hidden(16);
        <NdArray as Backend>::seed(&device, 1);
        let start = futures::executor::block_on(params::to_vec(&config.init::<NdArray>(&device)))
            .expect("init");
        let spec = LmInnerSpec::constant(1e-2, 0.0);
        let data = toy_set(64);

        let run = |steps| {
            let module = params::load(config.init::<B>(&device), &start).expect("load");
            let mut trainer = InnerLoop::<B, DigitsMlp<B>>::with_module(&device, module, &spec);
            let mut sampler = BatchSampler::new(data.len(), 16, 5);
            let mut losses = Vec::new();
            for _ in 0..steps {
                let loss = trainer.step(&DigitsBatch::draw(&data, &mut sampler));
                losses.push(loss.into_scalar().elem::<f32>());
            }
            let params = futures::executor::block_on(trainer.params()).expect("params");
            (losses, params)
        };
        let (losses, trained) = run(30);
        let (_, again) = run(30);
        let (first, last) = (losses[0], *losses.last().expect("steps"));
        assert!(last < first * 0.8, "loss {first} -> {last}");
        assert_eq!(trained, again, "same seed, same parameters, bit for bit");
        let before =
            futures::executor::block_on(evaluate::<NdArray>(&device, &config, &start, &data))
                .expect("eval");
        let after =
            futures::executor::block_on(evaluate::<NdArray>(&device, &config, &trained, &data))
                .expect("eval");
        assert!(
            after > 0.95 && after > before,
            "accuracy {before} -> {after}"
        );
    }
}
