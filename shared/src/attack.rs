//! The standard Byzantine attacks on federated averaging, and a digits simulation that runs them
//! against every aggregation rule with the real shared training, aggregation and outer step.
//!
//! Attackers are omniscient where the attack needs it (ALIE and IPM read the honest updates of
//! the round, as in their papers). Updates the relay refuses before aggregation (NaN/Inf
//! payloads, replays of an earlier round: see `tests/bad_input.rs`) are dropped here the same
//! way.

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::aggregate::AggregateError;
use crate::crypto::PeerKey;
use crate::data::{BatchSampler, DigitsSet, SplitMix64, derive_seed};
use crate::lm_train::Trainer;
use crate::model::{DigitsMlp, DigitsMlpConfig};
use crate::params::{self, ParamsError};
use crate::privacy::standard_normal;
use crate::protocol::{
    Codec, DataSource, DataSpec, InnerSpec, ModelSpec, OuterSpec, PayloadRef, RunSpec, Update,
    params_to_bytes,
};
use crate::robust::Rule;
use crate::round::RoundState;
use crate::train::{DigitsBatch, evaluate};

/// What a malicious peer sends instead of its honest pseudo-gradient.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Attack {
    /// −scale × its own honest update.
    SignFlip { scale: f32 },
    /// N(0, σ²) in every coordinate.
    Gaussian { sigma: f32 },
    /// "A little is enough" (Baruch et al. 2019): honest mean − z · honest std, per coordinate.
    Alie { z: f32 },
    /// Inner-product manipulation (Xie et al. 2020): −ε × the honest mean.
    Ipm { epsilon: f32 },
    /// NaN and infinities in the payload.
    NonFinite,
    /// Resends its update of an earlier round.
    Replay,
    /// Trains honestly on its own data with every label y replaced by 9 − y.
    LabelFlip,
}

impl Attack {
    /// The standard evaluation set with the usual parameters.
    pub fn standard() -> [Attack; 7] {
        [
            Attack::SignFlip { scale: 1000.0 },
            Attack::Gaussian { sigma: 1.0 },
            Attack::Alie { z: 1.0 },
            Attack::Ipm { epsilon: 0.5 },
            Attack::NonFinite,
            Attack::Replay,
            Attack::LabelFlip,
        ]
    }

    /// The attack and its parameter, as the reports name it.
    pub fn name(&self) -> String {
        match self {
            Attack::SignFlip { scale } => format!("sign flip ×{scale}"),
            Attack::Gaussian { sigma } => format!("Gaussian σ={sigma}"),
            Attack::Alie { z } => format!("ALIE z={z}"),
            Attack::Ipm { epsilon } => format!("IPM ε={epsilon}"),
            Attack::NonFinite => "NaN/Inf".into(),
            Attack::Replay => "replay".into(),
            Attack::LabelFlip => "label flip".into(),
        }
    }
}

/// Per-coordinate mean and standard deviation of `rows`.
fn mean_std(rows: &[Vec<f32>], n: usize) -> (Vec<f32>, Vec<f32>) {
    let count = rows.len().max(1) as f32;
    let mut mean = vec![0.0f32; n];
    for row in rows {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += v / count);
    }
    let mut var = vec![0.0f32; n];
    for row in rows {
        var.iter_mut()
            .zip(row)
            .zip(&mean)
            .for_each(|((s, v), m)| *s += (v - m) * (v - m) / count);
    }
    (mean, var.into_iter().map(f32::sqrt).collect())
}

/// The malicious update for `attack` given the attacker's own honest update and the honest
/// updates of the round. `None` for attacks that need another kind of input (label flip
/// trains on poisoned data; replay resends an old update).
pub fn craft(
    attack: Attack,
    own: &[f32],
    honest: &[Vec<f32>],
    rng: &mut SplitMix64,
) -> Option<Vec<f32>> {
    let n = own.len();
    Some(match attack {
        Attack::SignFlip { scale } => own.iter().map(|v| -scale * v).collect(),
        Attack::Gaussian { sigma } => (0..n)
            .map(|_| (standard_normal(rng) * f64::from(sigma)) as f32)
            .collect(),
        Attack::Alie { z } => {
            let (mean, std) = mean_std(honest, n);
            mean.iter().zip(&std).map(|(m, s)| m - z * s).collect()
        }
        Attack::Ipm { epsilon } => mean_std(honest, n).0.iter().map(|m| -epsilon * m).collect(),
        Attack::NonFinite => own
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i % 3 == 0 {
                    f32::NAN
                } else if i % 3 == 1 {
                    f32::INFINITY
                } else {
                    *v
                }
            })
            .collect(),
        Attack::Replay | Attack::LabelFlip => return None,
    })
}

/// One cell of the attack grid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackRun {
    pub model: DigitsMlpConfig,
    pub peers: u32,
    pub attackers: u32,
    pub attack: Option<Attack>,
    pub rule: Rule,
    pub rounds: u32,
    pub inner: InnerSpec,
    pub outer: OuterSpec,
    pub seed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    #[error(transparent)]
    Params(#[from] ParamsError),
    #[error("bad attack run: {0}")]
    Config(String),
}

/// Runs `run` on the digits: peer i trains on `shards[i % len]`, peers `0..attackers` attack.
/// Returns the held-out accuracy after every round (index 0 is θ₀).
pub async fn run_attack<B: AutodiffBackend>(
    device: &B::Device,
    shards: &[DigitsSet],
    held_out: &DigitsSet,
    theta0: &[f32],
    run: &AttackRun,
) -> Result<Vec<f32>, AttackError> {
    if shards.is_empty() || run.peers == 0 || run.attackers >= run.peers {
        return Err(AttackError::Config(
            "need shards and at least one honest peer".into(),
        ));
    }
    let spec = RunSpec {
        run_id: "attack".into(),
        model: ModelSpec::DigitsMlp {
            hidden: run.model.hidden as u32,
        },
        data: DataSpec {
            source: DataSource::Digits,
            n_shards: shards.len() as u32,
        },
        inner: run.inner.clone(),
        outer: run.outer.clone(),
        codec: Codec::F32,
        quorum: run.peers,
        round_deadline_ms: 1_000,
        privacy: None,
        aggregator: run.rule.clone(),
    };
    let keys: Vec<PeerKey> = (0..run.peers)
        .map(|peer| {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&peer.to_be_bytes());
            PeerKey(key)
        })
        .collect();
    let mut state = RoundState::new(spec, theta0.to_vec(), 0);
    let mut trainers = (0..run.peers)
        .map(|_| {
            let module = params::load(run.model.init::<B>(device), theta0)?;
            Ok(Trainer::<B, DigitsMlp<B>>::with_module(
                device,
                module,
                &run.inner.optimizer,
            ))
        })
        .collect::<Result<Vec<_>, ParamsError>>()?;
    let mut replayable: Vec<Option<(Update, Vec<u8>)>> = vec![None; run.attackers as usize];
    let mut rng = SplitMix64::new(derive_seed("attack", &[&run.seed.to_le_bytes()]));
    let mut accuracy =
        vec![evaluate::<B::InnerBackend>(device, &run.model, state.params(), held_out).await?];
    for round in 0..run.rounds {
        let now = u64::from(round) * 1_000;
        let theta = state.params().to_vec();
        // Every peer's honest update (attackers compute theirs too: sign flip and replay use it).
        let mut updates = Vec::with_capacity(run.peers as usize);
        for (peer, trainer) in trainers.iter_mut().enumerate() {
            let peer = peer as u32;
            let mut data = shards[peer as usize % shards.len()].clone();
            if peer < run.attackers && run.attack == Some(Attack::LabelFlip) {
                data.labels.iter_mut().for_each(|y| *y = 9 - (*y).min(9));
            }
            let seed = derive_seed(
                "attack peer",
                &[
                    &run.seed.to_le_bytes(),
                    &round.to_le_bytes(),
                    &peer.to_le_bytes(),
                ],
            );
            trainer.load(&theta)?;
            trainer.seek(u64::from(round) * u64::from(run.inner.steps));
            let mut sampler = BatchSampler::new(data.len(), run.inner.batch_size as usize, seed);
            for _ in 0..run.inner.steps {
                trainer.step(&DigitsBatch::draw(&data, &mut sampler));
            }
            let local = trainer.params().await?;
            updates.push(crate::round::pseudo_gradient(&theta, &local));
        }
        let honest: Vec<Vec<f32>> = updates[run.attackers as usize..].to_vec();
        for (peer, delta) in updates.into_iter().enumerate() {
            let update = |delta: &[f32]| {
                let payload = params_to_bytes(delta);
                let update = Update {
                    run_id: state.spec.run_id.clone(),
                    round: state.round,
                    base: state.params_hash(),
                    n_samples: run.inner.steps * run.inner.batch_size,
                    inner_steps: run.inner.steps,
                    loss: 0.0,
                    codec: Codec::F32,
                    payload: PayloadRef::of(&payload),
                };
                (update, payload)
            };
            let sent = match run.attack {
                Some(attack) if peer < run.attackers as usize => match attack {
                    Attack::LabelFlip => update(&delta),
                    // The first round's update is fresh; later it resends that one, which the
                    // round engine refuses (its round is over).
                    Attack::Replay => replayable[peer]
                        .get_or_insert_with(|| update(&delta))
                        .clone(),
                    other => match craft(other, &delta, &honest, &mut rng) {
                        Some(crafted) => update(&crafted),
                        None => continue,
                    },
                },
                _ => update(&delta),
            };
            // The relay's own checks (NaN/Inf, stale rounds) refuse some attacks here.
            let _ = state.submit(keys[peer], &sent.0, &sent.1, now);
        }
        // The round closes when the rule has what it needs; with too few left after the
        // refusals it closes without moving θ (a live relay would wait for more peers).
        if state.tick(now + 1_000).is_none() {
            let why = format!(
                "{} updates, {:?} needs {}",
                state.updates_this_round(),
                run.rule,
                run.rule.min_updates()
            );
            state.finish_close(Err(AggregateError::Rule(why)), now + 1_000);
        }
        accuracy
            .push(evaluate::<B::InnerBackend>(device, &run.model, state.params(), held_out).await?);
    }
    Ok(accuracy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_updates_follow_their_definitions() {
        let honest = vec![vec![1.0f32, 2.0], vec![3.0, 2.0]];
        let mut rng = SplitMix64::new(1);
        assert_eq!(
            craft(
                Attack::SignFlip { scale: 10.0 },
                &[1.0, -2.0],
                &honest,
                &mut rng
            ),
            Some(vec![-10.0, 20.0])
        );
        // mean (2, 2), std (1, 0): ALIE z = 1 → (1, 2); IPM ε = 0.5 → (−1, −1).
        assert_eq!(
            craft(Attack::Alie { z: 1.0 }, &[0.0, 0.0], &honest, &mut rng),
            Some(vec![1.0, 2.0])
        );
        assert_eq!(
            craft(Attack::Ipm { epsilon: 0.5 }, &[0.0, 0.0], &honest, &mut rng),
            Some(vec![-1.0, -1.0])
        );
        let nan = craft(Attack::NonFinite, &[1.0, 1.0, 1.0], &honest, &mut rng).expect("crafted");
        assert!(nan[0].is_nan() && nan[1].is_infinite());
        let noise = craft(
            Attack::Gaussian { sigma: 2.0 },
            &[0.0; 4000],
            &honest,
            &mut rng,
        )
        .expect("crafted");
        let std = (noise.iter().map(|v| v * v).sum::<f32>() / 4000.0).sqrt();
        assert!((std - 2.0).abs() < 0.1, "σ {std}");
        assert_eq!(craft(Attack::LabelFlip, &[0.0], &honest, &mut rng), None);
    }
}
