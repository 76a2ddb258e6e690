//! How fast this device trains a model: a [`Replica`] stepped round after round exactly as a
//! peer steps it, on data of the right shape drawn from a fixed seed instead of the relay's.
//! `cargo xtask bench browser` runs it in the browser (the npm package's `TrainingBench`) and
//! natively (`client-wasm/benches/train.rs`), beside TF.js on the same models.

use burn::tensor::backend::AutodiffBackend;
use swarmtrain_shared::data::{DigitsSet, SplitMix64};
use swarmtrain_shared::lm_train::LmInnerSpec;
use swarmtrain_shared::model::DIGITS_INPUTS;
use swarmtrain_shared::protocol::ModelSpec;

use crate::Flag;
use crate::replica::{LocalRound, Replica, RoundData};

/// Examples in the digits shard a bench draws its batches from.
const DIGITS_SHARD: usize = 1024;

/// A replica of `model` and the data it trains on.
#[derive(Debug)]
pub struct TrainingBench<B: AutodiffBackend> {
    replica: Replica<B>,
    start: Vec<f32>,
    batch: u32,
    step: u64,
    rng: SplitMix64,
    n_params: usize,
}

impl<B: AutodiffBackend> TrainingBench<B> {
    /// A replica of `model` with `optimizer`, at θ₀ of seed 1 (the language model) or zeros
    /// plus noise (the digits), training on batches of `batch`.
    pub async fn new(
        device: &B::Device,
        model: &ModelSpec,
        optimizer: &LmInnerSpec,
        batch: u32,
    ) -> Result<Self, String> {
        let n_params = model.num_params();
        let start = match model.lm_config() {
            Some(config) => config
                .init_params::<B::InnerBackend>(device, 1)
                .await
                .map_err(|e| e.to_string())?,
            None => {
                let mut rng = SplitMix64::new(1);
                (0..n_params)
                    .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 * 0.1 - 0.1)
                    .collect()
            }
        };
        Ok(Self {
            replica: Replica::new(device, model, optimizer, &start)?,
            start,
            batch: batch.max(1),
            step: 0,
            rng: SplitMix64::new(7),
            n_params,
        })
    }

    /// The model's parameter count.
    pub fn params(&self) -> usize {
        self.n_params
    }

    /// One round of `steps` steps, as a peer trains it: load θ, step, read the summed loss and
    /// the parameters back. θ carries over to the next round, as if the round's update were
    /// the only one.
    pub async fn round(&mut self, steps: u32) -> Result<LocalRound, String> {
        let data = self.data(steps)?;
        let round = self
            .replica
            .train_round(
                &self.start,
                self.step,
                &data,
                steps,
                self.batch,
                &Flag::default(),
                &Flag::default(),
                None,
                &mut |_| {},
            )
            .await?;
        self.step += u64::from(round.steps);
        self.start.clone_from(&round.params);
        Ok(round)
    }

    fn data(&mut self, steps: u32) -> Result<RoundData, String> {
        Ok(match self.replica.lm_config() {
            Some(config) => RoundData::Text(
                (0..steps as usize * self.batch as usize * (config.context + 1))
                    .map(|_| self.rng.next_u64() as u8)
                    .collect(),
            ),
            None => {
                let pixels = (0..DIGITS_SHARD * DIGITS_INPUTS)
                    .map(|_| (self.rng.next_u64() % 17) as u8)
                    .collect();
                let labels = (0..DIGITS_SHARD)
                    .map(|_| (self.rng.next_u64() % 10) as u8)
                    .collect();
                RoundData::Digits {
                    shard: DigitsSet::new(pixels, labels).map_err(|e| e.to_string())?,
                    sampler_seed: self.rng.next_u64(),
                }
            }
        })
    }
}
