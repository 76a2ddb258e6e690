//! A peer's replica of the run's model and its round of local training: the inner loop that
//! browsers, native workers and `cargo xtask bench browser` run.
//!
//! The replica wraps the simulator's [`InnerLoop`]: its AdamW moments persist across rounds (the
//! peer drops the replica when the run's θ lineage restarts), with the run's warm-up, cosine
//! schedule and clipping at the run's global step `round · H + s`. The batch losses are summed
//! on the device and read back once, with the parameters, at the end of the round.

use burn::prelude::ElementConversion;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};
use swarmtrain_shared::data::{BatchSampler, DigitsSet};
use swarmtrain_shared::lm::{Lm, LmConfig};
use swarmtrain_shared::lm_train::{InnerLoop, LmInnerLoop, LmInnerSpec, TextBatch, TrainerState};
use swarmtrain_shared::model::DigitsMlp;
use swarmtrain_shared::params::{self, ParamsError};
use swarmtrain_shared::protocol::{ModelConfig, ModelSpec};
use swarmtrain_shared::train::DigitsBatch;

use crate::flag::{Flag, while_paused};
use crate::platform;
use web_time::Instant;

/// A replica of a run's model with its optimizer state, kept across rounds. One per peer, so
/// the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Replica<B: AutodiffBackend> {
    Digits {
        trainer: InnerLoop<B, DigitsMlp<B>>,
    },
    Lm {
        config: LmConfig,
        trainer: LmInnerLoop<B>,
    },
}

/// What a round trains on: the peer's digits shard, or its text windows (`context + 1` bytes
/// each, `batch` windows a step).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum RoundData {
    Digits {
        shard: DigitsSet,
        /// Seeds the order the shard's examples are drawn in.
        sampler_seed: u64,
    },
    Text(Vec<u8>),
}

/// What a round of local training produced.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct LocalRound {
    pub steps: u32,
    pub samples: u32,
    /// The mean batch loss over the round's steps (NaN when no step ran).
    pub loss: f32,
    /// The replica's parameters after the round.
    pub params: Vec<f32>,
    /// The replica's schedule position and AdamW moments when the round started: part of what
    /// the round's update commits to ([`swarmtrain_shared::replay::CommittedState`]).
    pub state: TrainerState,
}

impl<B: AutodiffBackend> core::fmt::Debug for Replica<B> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Digits { trainer } => f.debug_tuple("Digits").field(trainer).finish(),
            Self::Lm { config, trainer } => {
                f.debug_tuple("Lm").field(config).field(trainer).finish()
            }
        }
    }
}

impl<B: AutodiffBackend> Replica<B> {
    /// A replica of `model` starting from `start`, with fresh AdamW moments.
    pub fn new(
        device: &B::Device,
        model: &ModelSpec,
        optimizer: &LmInnerSpec,
        start: &[f32],
    ) -> Result<Self, String> {
        let load = |e: ParamsError| e.to_string();
        Ok(match model.config() {
            ModelConfig::Lm(config) => {
                config.validate()?;
                let module: Lm<B> = params::load(config.init::<B>(device), start).map_err(load)?;
                Self::Lm {
                    trainer: InnerLoop::with_module(device, module, optimizer),
                    config,
                }
            }
            ModelConfig::Digits(config) => {
                let module = params::load(config.init::<B>(device), start).map_err(load)?;
                Self::Digits {
                    trainer: InnerLoop::with_module(device, module, optimizer),
                }
            }
        })
    }

    /// The language model's shape, for a language-model replica.
    pub fn lm_config(&self) -> Option<&LmConfig> {
        match self {
            Self::Lm { config, .. } => Some(config),
            Self::Digits { .. } => None,
        }
    }

    /// Trains one round from `start` (the round's global θ) at global step `first_step`: at
    /// most `steps` steps of `batch` examples for the digits, one step per `batch` windows of
    /// `data` for the language model. Waits between steps while `pause` is set (a hidden tab, a
    /// low battery), waking the moment it is cleared. Stops early when `stop` is set, and once
    /// `until` has passed (after at least one step, even while paused; on WebGPU the check sees
    /// when a step was queued, not when the device finished it). `on_step` hears the number of steps taken after each.
    #[allow(clippy::too_many_arguments)]
    pub async fn train_round(
        &mut self,
        start: &[f32],
        first_step: u64,
        data: &RoundData,
        steps: u32,
        batch: u32,
        stop: &Flag,
        pause: &Flag,
        until: Option<Instant>,
        on_step: &mut impl FnMut(u32),
    ) -> Result<LocalRound, String> {
        let load = |e: ParamsError| e.to_string();
        // After at least one step, passing `until` ends the round early: the steps taken so far
        // are the update.
        let out_of_time = |taken: u32| taken > 0 && until.is_some_and(|u| Instant::now() >= u);
        let mut taken = 0u32;
        let mut samples = 0u32;
        let mut sum = None;
        let state = match self {
            Self::Digits { trainer } => trainer.state().await,
            Self::Lm { trainer, .. } => trainer.state().await,
        }
        .map_err(load)?;
        let params = match (self, data) {
            (
                Self::Digits { trainer },
                RoundData::Digits {
                    shard,
                    sampler_seed,
                },
            ) => {
                trainer.load(start).map_err(load)?;
                trainer.seek(first_step);
                let mut sampler = BatchSampler::new(shard.len(), batch as usize, *sampler_seed);
                while taken < steps && !stop.get() && !out_of_time(taken) {
                    if pause.get() {
                        while_paused(pause, stop, until.filter(|_| taken > 0)).await;
                        continue;
                    }
                    let batch = DigitsBatch::draw(shard, &mut sampler);
                    samples += batch.targets.len() as u32;
                    accumulate(&mut sum, trainer.step(&batch));
                    taken += 1;
                    on_step(taken);
                    if taken.is_multiple_of(8) {
                        // Let the browser breathe (and the relay connection make progress).
                        platform::yield_now().await;
                    }
                }
                trainer.params().await.map_err(load)?
            }
            (Self::Lm { trainer, config }, RoundData::Text(text)) => {
                let window = config.context + 1;
                trainer.load(start).map_err(load)?;
                trainer.seek(first_step);
                for batch in TextBatch::of_round(text, window, batch).take(steps as usize) {
                    while pause.get() && !stop.get() && !out_of_time(taken) {
                        while_paused(pause, stop, until.filter(|_| taken > 0)).await;
                    }
                    if stop.get() || out_of_time(taken) {
                        break;
                    }
                    accumulate(&mut sum, trainer.step(&batch));
                    samples += (batch.windows.len() / window) as u32;
                    taken += 1;
                    on_step(taken);
                    platform::yield_now().await;
                }
                trainer.params().await.map_err(load)?
            }
            (Self::Digits { .. }, RoundData::Text(_))
            | (Self::Lm { .. }, RoundData::Digits { .. }) => {
                return Err("the round's data is not for this model".into());
            }
        };
        let loss = match sum {
            Some(sum) => {
                sum.into_scalar_async()
                    .await
                    .map_err(|e| e.to_string())?
                    .elem::<f32>()
                    / taken.max(1) as f32
            }
            None => f32::NAN,
        };
        Ok(LocalRound {
            steps: taken,
            samples,
            loss,
            params,
            state,
        })
    }
}

/// Adds a step's loss to the running sum on the device (nothing is read back per step).
fn accumulate<B: Backend>(sum: &mut Option<Tensor<B, 1>>, loss: Tensor<B, 1>) {
    *sum = Some(match sum.take() {
        Some(s) => s + loss,
        None => loss,
    });
}
