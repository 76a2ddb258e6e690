//! An in-process simulator of a DiLoCo run on the language model: N peers, each with its own
//! replica and AdamW state, trained with the same code the browser and native peers run, and a
//! byte counter on every message. Rounds go through the relay's engine: every update is
//! submitted to a [`RoundState`] and the round closes with [`RoundState::tick`], so the same
//! checks, aggregation kernels and outer step decide θ. Given the same seeds, peers (keys and
//! slots) and rounds, a live relay with native peers ends with the same θ, bit for bit.
//!
//! Bytes are counted the way the DiLoCo papers count them: every sync costs each worker its
//! payload twice (its update up, the new parameters down). The data-parallel baseline averages
//! f32 gradients every step (2 × 4 bytes per parameter per worker per step); it is computed as
//! one replica stepping on all peers' batches at once, which is the same mean gradient.

use serde::{Deserialize, Serialize};

use crate::compress::{Codec, CodecError, ErrorFeedback};
use crate::crypto::PeerKey;
use crate::data::derive_seed;
use crate::lm::LmConfig;
use crate::lm_train::{LmInnerLoop, LmInnerSpec, LrSchedule, TextBatch, evaluate_lm};
use crate::params::ParamsError;
use crate::protocol::{
    DataSource, DataSpec, InnerSpec, ModelSpec, OuterSpec, PayloadRef, RunSpec, Update,
};
use crate::robust::{RobustError, Rule};
use crate::round::RoundState;
use crate::text::{Shards, TextCorpus};
use burn::tensor::backend::AutodiffBackend;

/// How replicas are kept in agreement: DiLoCo rounds or a gradient exchange every step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// DiLoCo: `inner_steps` local AdamW steps, then the pseudo-gradients θ − θ_local are
    /// compressed, aggregated and applied by the outer optimizer. FedAvg is `OuterSpec { lr: 1,
    /// momentum: 0 }`.
    DiLoCo { inner_steps: u32, outer: OuterSpec },
    /// Data-parallel training: the peers' gradients are averaged after every step.
    DataParallel,
}

/// One simulated run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    pub model: LmConfig,
    pub peers: u32,
    /// Inner steps per peer (the data-parallel baseline takes as many steps, on all peers'
    /// batches at once: equal tokens).
    pub steps: u32,
    /// Windows per step per peer.
    pub batch: u32,
    pub sync: Schedule,
    pub codec: Codec,
    pub aggregator: Rule,
    pub inner: LmInnerSpec,
    /// Fixes θ₀ and the data order.
    pub seed: u64,
    /// Steps of one replica (on `peers · batch` windows, from a separate data order) that
    /// produce the shared starting point, as the DiLoCo paper starts from a pretrained model.
    /// Not counted in tokens or bytes; 0 starts from θ₀.
    #[serde(default)]
    pub pretrain_steps: u32,
    /// Windows per warm-start step: fixed, so runs with different peer counts share θ_start.
    #[serde(default = "default_pretrain_batch")]
    pub pretrain_batch: u32,
    /// Validation loss is measured at step 0, every `eval_every` steps (at syncs for DiLoCo)
    /// and at the end.
    pub eval_every: u32,
    pub eval_windows: u32,
    /// The peers' keys, in slot order (peer p trains on data slot p). Empty: made-up keys.
    /// A live run's keys make the reduction order, and so θ, the live run's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peer_keys: Vec<PeerKey>,
}

/// The relay's view of a simulated DiLoCo run (its round engine needs a spec).
pub fn run_spec(config: &SimConfig, inner_steps: u32, outer: &OuterSpec) -> RunSpec {
    RunSpec {
        run_id: "sim".into(),
        model: ModelSpec::byte_lm(&config.model),
        data: DataSpec {
            source: DataSource::Text {
                name: "simulation".into(),
            },
            n_shards: config.peers,
        },
        inner: InnerSpec {
            steps: inner_steps,
            batch_size: config.batch,
            optimizer: config.inner.clone(),
        },
        outer: outer.clone(),
        codec: config.codec,
        quorum: config.peers,
        round_deadline_ms: u64::MAX / 4,
        privacy: None,
        aggregator: config.aggregator.clone(),
    }
}

fn default_pretrain_batch() -> u32 {
    64
}

/// A point on the loss curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimPoint {
    /// Inner steps per peer so far.
    pub step: u32,
    /// Tokens trained on, over all peers.
    pub tokens: u64,
    /// Bytes communicated so far, over all peers.
    pub bytes: u64,
    /// Mean next-byte cross-entropy of the global model on held-out text (nats).
    pub val_loss: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub points: Vec<SimPoint>,
    pub syncs: u32,
    pub tokens: u64,
    pub bytes: u64,
    pub final_val_loss: f32,
    pub num_params: usize,
    /// The final global parameters.
    pub params: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("bad simulation config: {0}")]
    Config(String),
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Aggregate(#[from] RobustError),
    #[error("the round engine refused the run: {0}")]
    Round(String),
}

/// Runs `config` on backend `B` over `corpus`; `progress` sees every curve point as it comes.
pub async fn simulate<B: AutodiffBackend>(
    device: &B::Device,
    corpus: &TextCorpus,
    config: &SimConfig,
    mut progress: impl FnMut(&SimPoint),
) -> Result<SimReport, SimError> {
    config.model.validate().map_err(SimError::Config)?;
    if config.peers == 0 || config.batch == 0 || config.steps == 0 || config.eval_every == 0 {
        return Err(SimError::Config(
            "peers, batch, steps and eval_every must be positive".into(),
        ));
    }
    let window = config.model.context + 1;
    let (peers, batch) = (config.peers, config.batch as usize);
    let shards = Shards::new(corpus, window, config.seed);
    if shards.windows() == 0 {
        return Err(SimError::Config("the corpus has no training window".into()));
    }
    let (validation, val_count) = corpus.validation_windows(window, config.eval_windows as usize);
    let validation = &validation;
    let eval = |theta: Vec<f32>| async move {
        evaluate_lm::<B::InnerBackend>(device, &config.model, &theta, validation, val_count, 32)
            .await
    };
    let mut theta = config
        .model
        .init_params::<B::InnerBackend>(
            device,
            derive_seed("lm init", &[&config.seed.to_le_bytes()]),
        )
        .await?;
    let n = theta.len();
    if config.pretrain_steps > 0 {
        let spec = LmInnerSpec {
            schedule: LrSchedule {
                total: u64::from(config.pretrain_steps),
                min_ratio: 1.0,
                ..config.inner.schedule.clone()
            },
            ..config.inner.clone()
        };
        let mut trainer = LmInnerLoop::<B>::new(device, &config.model, &theta, &spec)?;
        let pretrain = Shards::new(
            corpus,
            window,
            derive_seed("pretrain", &[&config.seed.to_le_bytes()]),
        );
        for step in 0..config.pretrain_steps {
            trainer.step(&TextBatch {
                windows: pretrain.batch(
                    0,
                    1,
                    u64::from(step),
                    config.pretrain_batch.max(1) as usize,
                ),
                window,
            });
        }
        theta = trainer.params().await?;
    }
    let tokens_per_step = u64::from(peers) * batch as u64 * config.model.context as u64;

    let mut points = Vec::new();
    let mut record = |step: u32, bytes: u64, val_loss: f32| {
        let point = SimPoint {
            step,
            tokens: u64::from(step) * tokens_per_step,
            bytes,
            val_loss,
        };
        progress(&point);
        points.push(point);
    };
    record(0, 0, eval(theta.clone()).await?);

    let (mut bytes, mut syncs) = (0u64, 0u32);
    match &config.sync {
        Schedule::DataParallel => {
            let mut trainer = LmInnerLoop::<B>::new(device, &config.model, &theta, &config.inner)?;
            for step in 0..config.steps {
                trainer.step(&TextBatch {
                    windows: shards.batch(0, 1, u64::from(step), peers as usize * batch),
                    window,
                });
                bytes += 2 * u64::from(peers) * 4 * n as u64;
                syncs += 1;
                let done = step + 1;
                if done % config.eval_every == 0 || done == config.steps {
                    theta = trainer.params().await?;
                    record(done, bytes, eval(theta.clone()).await?);
                }
            }
        }
        Schedule::DiLoCo { inner_steps, outer } => {
            if *inner_steps == 0 {
                return Err(SimError::Config("inner_steps must be positive".into()));
            }
            if !config.peer_keys.is_empty() && config.peer_keys.len() != peers as usize {
                return Err(SimError::Config(format!(
                    "{} peer keys for {peers} peers",
                    config.peer_keys.len()
                )));
            }
            let keys: Vec<PeerKey> = (0..peers)
                .map(|p| {
                    config
                        .peer_keys
                        .get(p as usize)
                        .copied()
                        .unwrap_or_else(|| {
                            let mut key = [0u8; 32];
                            key[..4].copy_from_slice(&p.to_be_bytes());
                            PeerKey(key)
                        })
                })
                .collect();
            let spec = run_spec(config, *inner_steps, outer);
            let mut state = RoundState::new(spec, theta.clone(), 0);
            let mut trainers = (0..peers)
                .map(|_| LmInnerLoop::<B>::new(device, &config.model, &theta, &config.inner))
                .collect::<Result<Vec<_>, _>>()?;
            let mut feedback = vec![ErrorFeedback::default(); peers as usize];
            let mut step = 0u32;
            while step < config.steps {
                let h = (*inner_steps).min(config.steps - step);
                let now = u64::from(step);
                for (p, trainer) in trainers.iter_mut().enumerate() {
                    trainer.load(&theta)?;
                    for s in step..step + h {
                        let windows = shards.batch(p as u32, peers, u64::from(s), batch);
                        trainer.step(&TextBatch { windows, window });
                    }
                    let local = trainer.params().await?;
                    let payload = crate::round::update_payload(
                        crate::round::pseudo_gradient(&theta, &local),
                        state.spec.privacy.as_ref(),
                        config.codec,
                        &mut feedback[p],
                    );
                    bytes += 2 * payload.len() as u64;
                    let update = Update {
                        run_id: state.spec.run_id.clone(),
                        round: state.round,
                        base: state.params_hash(),
                        n_samples: h * batch as u32,
                        inner_steps: h,
                        loss: 0.0,
                        codec: config.codec,
                        payload: PayloadRef::of(&payload),
                        state: PayloadRef::of(&[]),
                    };
                    state
                        .submit(keys[p], &update, &payload, now)
                        .map_err(|e| SimError::Round(e.to_string()))?;
                }
                let closed = state
                    .tick(now)
                    .ok_or_else(|| SimError::Round("the round did not close".into()))?;
                if let Some(why) = closed.failed {
                    return Err(SimError::Round(why));
                }
                theta = state.params().to_vec();
                step += h;
                syncs += 1;
                let crossed = (step - h) / config.eval_every != step / config.eval_every;
                if crossed || step == config.steps {
                    record(step, bytes, eval(theta.clone()).await?);
                }
            }
        }
    }
    let final_val_loss = points.last().map_or(f32::NAN, |p| p.val_loss);
    Ok(SimReport {
        syncs,
        tokens: u64::from(config.steps) * tokens_per_step,
        bytes,
        final_val_loss,
        num_params: n,
        params: theta,
        points,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    /// A generated corpus with structure to learn: sentences from a small grammar.
    fn corpus() -> TextCorpus {
        let subjects = ["the cat ", "a dog ", "my friend ", "the old man "];
        let verbs = ["sees ", "likes ", "follows ", "finds "];
        let objects = [
            "the ball.\n",
            "a red hat.\n",
            "the river.\n",
            "some bread.\n",
        ];
        let mut rng = crate::data::SplitMix64::new(9);
        let mut text = String::new();
        while text.len() < 120_000 {
            for part in [&subjects[..], &verbs[..], &objects[..]] {
                text.push_str(part[rng.below(part.len() as u64) as usize]);
            }
        }
        TextCorpus::new(text.as_bytes(), 17, 1).expect("corpus")
    }

    fn config(sync: Schedule, steps: u32) -> SimConfig {
        SimConfig {
            model: LmConfig::new()
                .with_context(16)
                .with_d_model(32)
                .with_heads(2)
                .with_layers(1),
            peers: 2,
            steps,
            batch: 8,
            sync,
            codec: Codec::F32,
            aggregator: Rule::Mean,
            inner: LmInnerSpec::new(LrSchedule {
                peak: 3e-3,
                warmup: 5,
                total: u64::from(steps),
                min_ratio: 0.1,
            }),
            seed: 11,
            pretrain_steps: 0,
            pretrain_batch: 64,
            eval_every: 10,
            eval_windows: 64,
            peer_keys: Vec::new(),
        }
    }

    #[test]
    fn a_short_diloco_run_lowers_the_loss_and_counts_bytes() {
        let device = Default::default();
        let corpus = corpus();
        let cfg = config(
            Schedule::DiLoCo {
                inner_steps: 10,
                outer: OuterSpec::default(),
            },
            40,
        );
        let report = futures::executor::block_on(simulate::<Autodiff<NdArray>>(
            &device,
            &corpus,
            &cfg,
            |_| {},
        ))
        .expect("sim");
        let first = report.points[0].val_loss;
        assert!(
            first > 5.0,
            "an untrained byte model is near ln 256 = 5.5, got {first}"
        );
        assert!(
            report.final_val_loss < first * 0.7,
            "loss {first} -> {}",
            report.final_val_loss
        );
        assert_eq!(report.syncs, 4);
        // 4 syncs × 2 peers × 2 directions × 4 bytes × params.
        assert_eq!(report.bytes, 4 * 2 * 2 * 4 * report.num_params as u64);
        assert_eq!(report.tokens, 40 * 2 * 8 * 16);

        // Same seeds, same parameters, bit for bit.
        let again = futures::executor::block_on(simulate::<Autodiff<NdArray>>(
            &device,
            &corpus,
            &cfg,
            |_| {},
        ))
        .expect("sim");
        assert!(
            report
                .params
                .iter()
                .zip(&again.params)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );

        // The data-parallel baseline at equal tokens sends 10× more here (H = 10).
        let dp = config(Schedule::DataParallel, 40);
        let baseline = futures::executor::block_on(simulate::<Autodiff<NdArray>>(
            &device,
            &corpus,
            &dp,
            |_| {},
        ))
        .expect("sim");
        assert_eq!(baseline.tokens, report.tokens);
        assert_eq!(baseline.bytes, 10 * report.bytes);
        assert!(
            baseline.final_val_loss < first * 0.7,
            "baseline learns too: {}",
            baseline.final_val_loss
        );
    }
}
