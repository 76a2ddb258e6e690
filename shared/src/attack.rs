//! The standard Byzantine attacks on federated averaging, and a digits simulation that runs them
//! against every aggregation rule with the real shared training, aggregation and outer step.
//!
//! Attackers are omniscient where the attack needs it (ALIE, IPM, min-max, min-sum and ROP read
//! the honest updates of the round, as in their papers; ROP also reads the previous aggregate,
//! which every peer can compute from the announced θ). Updates the relay refuses before aggregation (NaN/Inf
//! payloads, replays of an earlier round: see `tests/bad_input.rs`) are dropped here the same
//! way.

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::aggregate::AggregateError;
use crate::crypto::PeerKey;
use crate::data::{BatchSampler, DigitsSet, SplitMix64, derive_seed};
use crate::lm::LmConfig;
use crate::lm_train::{InnerLoop, LmInnerLoop, LmInnerSpec, TextBatch, evaluate_lm};
use crate::model::{DigitsMlp, DigitsMlpConfig};
use crate::params::{self, ParamsError};
use crate::privacy::standard_normal;
use crate::protocol::{
    Codec, DataSource, DataSpec, InnerSpec, ModelSpec, OuterSpec, PayloadRef, RunSpec, Update,
    params_to_bytes,
};
use crate::robust::Rule;
use crate::round::RoundState;
use crate::text::{Shards, TextCorpus};
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
    /// Min-max, the AGR-agnostic attack of Shejwalkar & Houmansadr ("Manipulating the Byzantine:
    /// optimizing model poisoning attacks and defenses for federated learning", NDSS 2021):
    /// μ + γ·p, with μ the honest mean, p the `perturbation`, and γ ≥ 0 the largest (binary
    /// search) for which the update's largest distance to an honest update stays within the
    /// largest distance between two honest updates. Every attacker sends it.
    MinMax { perturbation: Perturbation },
    /// Min-sum, the same paper's other AGR-agnostic attack: μ + γ·p with the largest γ for which
    /// the update's sum of squared distances to the honest updates stays within the largest such
    /// sum of an honest update.
    MinSum { perturbation: Perturbation },
    /// Relocated orthogonal perturbation (ROP; Özfatura, Özfatura, Küpçü & Gündüz, "Byzantines
    /// can also learn from history: fall of centered clipping in federated learning", IEEE TIFS
    /// 2024, arXiv 2208.09894), the adaptive attack on centered clipping. With c the previous
    /// aggregate (centered clipping's centre) and μ the honest mean, the attacker sits at the
    /// relocated point π·c + (1 − π)·μ (π = [`ROP_PI`]) plus a perturbation of radius r
    /// orthogonal to the reference direction u = λ·c + (1 − λ)·μ (λ = [`ROP_LAMBDA`]; u = μ in
    /// the first round, which has no c): the all-ones vector with its u component removed,
    /// normalised (the paper's code, at its angle of 90°). The paper fixes r = z_max absolutely
    /// against a known clipping radius; here r = z × the largest distance from the relocated
    /// point to an honest update, so the same z fits any model's scale and the update never sits
    /// farther from the centre than the farthest honest one when z = 1.
    Rop { z: f32 },
}

/// The direction min-max and min-sum push the honest mean in (the paper's three).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Perturbation {
    /// −μ/‖μ‖.
    UnitVector,
    /// −sign(μ).
    Sign,
    /// −σ, the honest updates' per-coordinate standard deviation.
    Std,
}

/// ROP's relocation: 1 puts the attack around the previous aggregate (the paper's setting).
pub const ROP_PI: f32 = 1.0;
/// ROP's reference direction: this much previous aggregate, the rest honest mean.
pub const ROP_LAMBDA: f32 = 0.9;

impl Attack {
    /// The standard evaluation set with the usual parameters.
    pub fn standard() -> [Attack; 10] {
        [
            Attack::SignFlip { scale: 1000.0 },
            Attack::Gaussian { sigma: 1.0 },
            Attack::Alie { z: 1.0 },
            Attack::Ipm { epsilon: 0.5 },
            Attack::NonFinite,
            Attack::Replay,
            Attack::LabelFlip,
            Attack::MinMax {
                perturbation: Perturbation::Std,
            },
            Attack::MinSum {
                perturbation: Perturbation::Std,
            },
            Attack::Rop { z: 1.0 },
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
            Attack::MinMax { perturbation } => format!("min-max ({})", perturbation.name()),
            Attack::MinSum { perturbation } => format!("min-sum ({})", perturbation.name()),
            Attack::Rop { z } => format!("ROP z={z}"),
        }
    }
}

impl Perturbation {
    pub fn name(&self) -> &'static str {
        match self {
            Perturbation::UnitVector => "unit",
            Perturbation::Sign => "sign",
            Perturbation::Std => "std",
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

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum()
}

/// Min-max's or min-sum's update μ + γ·p (see [`Attack::MinMax`]): the largest γ ≥ 0 whose
/// update keeps `objective` (of its squared distances to the honest updates) within the
/// honest updates' own bound, found by bisection. γ = 0 (the mean itself) always qualifies, and
/// the objective is convex in γ, so the feasible γ form an interval from 0.
fn min_max_sum(honest: &[Vec<f32>], perturbation: Perturbation, sum: bool) -> Vec<f32> {
    let n = honest.first().map_or(0, Vec::len);
    let (mean, std) = mean_std(honest, n);
    let p: Vec<f32> = match perturbation {
        Perturbation::UnitVector => {
            let norm = dot(&mean, &mean).sqrt().max(1e-30) as f32;
            mean.iter().map(|m| -m / norm).collect()
        }
        Perturbation::Sign => mean.iter().map(|m| -m.signum()).collect(),
        Perturbation::Std => std.iter().map(|s| -s).collect(),
    };
    // ‖μ + γp − gᵢ‖² = aᵢ + 2γ·bᵢ + γ²·c.
    let a: Vec<f64> = honest.iter().map(|g| squared_distance(&mean, g)).collect();
    let offsets: Vec<Vec<f32>> = honest
        .iter()
        .map(|g| mean.iter().zip(g).map(|(m, v)| m - v).collect())
        .collect();
    let b: Vec<f64> = offsets.iter().map(|o| dot(&p, o)).collect();
    let c = dot(&p, &p);
    let objective = |gamma: f64| {
        let d = a
            .iter()
            .zip(&b)
            .map(|(a, b)| a + 2.0 * gamma * b + gamma * gamma * c);
        if sum { d.sum() } else { d.fold(0.0, f64::max) }
    };
    let pairwise = |i: usize| honest.iter().map(move |h| squared_distance(&honest[i], h));
    let bound = (0..honest.len())
        .map(|i| {
            if sum {
                pairwise(i).sum()
            } else {
                pairwise(i).fold(0.0, f64::max)
            }
        })
        .fold(0.0, f64::max);
    let mut gamma = 0.0;
    if c > 0.0 {
        // Beyond this even the nearest honest update is farther than the bound allows.
        let max_a = a.iter().copied().fold(0.0, f64::max);
        let (mut lo, mut hi) = (
            0.0f64,
            (bound.sqrt() + max_a.sqrt()) / c.sqrt() * 1.01 + 1e-12,
        );
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if objective(mid) <= bound {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        gamma = lo;
    }
    mean.iter()
        .zip(&p)
        .map(|(m, p)| m + (gamma * f64::from(*p)) as f32)
        .collect()
}

/// ROP's update (see [`Attack::Rop`]).
fn rop(honest: &[Vec<f32>], center: Option<&[f32]>, z: f32) -> Vec<f32> {
    let n = honest.first().map_or(0, Vec::len);
    let mean = mean_std(honest, n).0;
    let (location, reference): (Vec<f32>, Vec<f32>) = match center {
        Some(c) if c.len() == n => (
            c.iter()
                .zip(&mean)
                .map(|(c, m)| ROP_PI * c + (1.0 - ROP_PI) * m)
                .collect(),
            c.iter()
                .zip(&mean)
                .map(|(c, m)| ROP_LAMBDA * c + (1.0 - ROP_LAMBDA) * m)
                .collect(),
        ),
        // The first round has no previous aggregate: centered clipping's centre is zero.
        _ => (vec![0.0; n], mean.clone()),
    };
    // The all-ones vector minus its projection on the reference, normalised.
    let uu = dot(&reference, &reference);
    let along = if uu > 0.0 {
        reference.iter().map(|r| f64::from(*r)).sum::<f64>() / uu
    } else {
        0.0
    };
    let mut perturbation: Vec<f32> = reference
        .iter()
        .map(|r| (1.0 - along * f64::from(*r)) as f32)
        .collect();
    let norm = dot(&perturbation, &perturbation).sqrt();
    if norm > 0.0 {
        perturbation
            .iter_mut()
            .for_each(|v| *v = (f64::from(*v) / norm) as f32);
    }
    let radius = f64::from(z)
        * honest
            .iter()
            .map(|g| squared_distance(g, &location))
            .fold(0.0, f64::max)
            .sqrt();
    location
        .iter()
        .zip(&perturbation)
        .map(|(l, p)| l + (radius * f64::from(*p)) as f32)
        .collect()
}

/// The malicious update for `attack` given the attacker's own honest update, the honest
/// updates of the round and the previous round's aggregate (`center`; ROP's reference). `None`
/// for attacks that need another kind of input (label flip trains on poisoned data; replay
/// resends an old update).
pub fn craft(
    attack: Attack,
    own: &[f32],
    honest: &[Vec<f32>],
    center: Option<&[f32]>,
    rng: &mut SplitMix64,
) -> Option<Vec<f32>> {
    let n = own.len();
    Some(match attack {
        Attack::MinMax { perturbation } => min_max_sum(honest, perturbation, false),
        Attack::MinSum { perturbation } => min_max_sum(honest, perturbation, true),
        Attack::Rop { z } => rop(honest, center, z),
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

/// Sends one round's updates to the round engine, peers `0..attackers` attacking with `attack`
/// (each of the others sends its honest update), and closes the round. With too few updates
/// left after the relay's refusals it closes without moving θ (a live relay would wait for more
/// peers).
#[allow(clippy::too_many_arguments)]
fn attack_round(
    state: &mut RoundState,
    keys: &[PeerKey],
    attack: Option<Attack>,
    attackers: usize,
    updates: Vec<Vec<f32>>,
    replayable: &mut [Option<(Update, Vec<u8>)>],
    (inner_steps, batch_size): (u32, u32),
    now: u64,
    rng: &mut SplitMix64,
) {
    let honest: Vec<Vec<f32>> = updates[attackers..].to_vec();
    let center = state.last_aggregate().map(<[f32]>::to_vec);
    for (peer, delta) in updates.into_iter().enumerate() {
        let update = |delta: &[f32]| {
            let payload = params_to_bytes(delta);
            let update = Update {
                run_id: state.spec.run_id.clone(),
                round: state.round,
                base: state.params_hash(),
                n_samples: inner_steps * batch_size,
                inner_steps,
                loss: 0.0,
                codec: Codec::F32,
                payload: PayloadRef::of(&payload),
                state: PayloadRef::of(&[]),
            };
            (update, payload)
        };
        let sent = match attack {
            Some(attack) if peer < attackers => match attack {
                Attack::LabelFlip => update(&delta),
                // The first round's update is fresh; later it resends that one, which the
                // round engine refuses (its round is over).
                Attack::Replay => replayable[peer]
                    .get_or_insert_with(|| update(&delta))
                    .clone(),
                other => match craft(other, &delta, &honest, center.as_deref(), rng) {
                    Some(crafted) => update(&crafted),
                    None => continue,
                },
            },
            _ => update(&delta),
        };
        // The relay's own checks (NaN/Inf, stale rounds) refuse some attacks here.
        let _ = state.submit(keys[peer], &sent.0, &sent.1, now);
    }
    if state.tick(now + 1_000).is_none() {
        let rule = state.spec.aggregator.clone();
        let why = format!(
            "{} updates, {rule:?} needs {}",
            state.updates_this_round(),
            rule.min_updates()
        );
        state.finish_close(Err(AggregateError::Rule(why)), now + 1_000);
    }
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
    let keys = peer_keys(run.peers);
    let mut state = RoundState::new(spec, theta0.to_vec(), 0);
    let mut trainers = (0..run.peers)
        .map(|_| {
            let module = params::load(run.model.init::<B>(device), theta0)?;
            Ok(InnerLoop::<B, DigitsMlp<B>>::with_module(
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
        attack_round(
            &mut state,
            &keys,
            run.attack,
            run.attackers as usize,
            updates,
            &mut replayable,
            (run.inner.steps, run.inner.batch_size),
            now,
            &mut rng,
        );
        accuracy
            .push(evaluate::<B::InnerBackend>(device, &run.model, state.params(), held_out).await?);
    }
    Ok(accuracy)
}

/// One cell of the language-model attack grid: the byte-level transformer on a text corpus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LmAttackRun {
    pub model: LmConfig,
    pub peers: u32,
    pub attackers: u32,
    pub attack: Option<Attack>,
    pub rule: Rule,
    pub rounds: u32,
    /// Inner AdamW steps per round (H).
    pub inner_steps: u32,
    /// Windows per step per peer.
    pub batch: u32,
    pub inner: LmInnerSpec,
    pub outer: OuterSpec,
    pub seed: u64,
    /// Held-out windows the loss is measured on.
    pub eval_windows: u32,
}

/// Runs `run` on the language model over `corpus`, from `theta0`, through the relay's round
/// engine ([`RoundState`]; bucketing, rule and outer step as the relay runs them): peer p trains
/// on data slot p as the simulator's peers do, and peers `0..attackers` attack (label flip is a
/// digits attack and is refused here). Returns the held-out loss (nats per byte) after every
/// round (index 0 is θ₀).
pub async fn run_attack_lm<B: AutodiffBackend>(
    device: &B::Device,
    corpus: &TextCorpus,
    theta0: &[f32],
    run: &LmAttackRun,
) -> Result<Vec<f32>, AttackError> {
    if run.peers == 0 || run.attackers >= run.peers || run.inner_steps == 0 || run.batch == 0 {
        return Err(AttackError::Config(
            "need at least one honest peer, inner steps and a batch".into(),
        ));
    }
    if run.attack == Some(Attack::LabelFlip) {
        return Err(AttackError::Config(
            "label flip is an attack on the digits".into(),
        ));
    }
    let window = run.model.context + 1;
    let shards = Shards::new(corpus, window, run.seed);
    let (validation, val_count) = corpus.validation_windows(window, run.eval_windows as usize);
    let spec = RunSpec {
        run_id: "attack-lm".into(),
        model: ModelSpec::byte_lm(&run.model),
        data: DataSpec {
            source: DataSource::Text {
                name: "attack grid".into(),
            },
            n_shards: run.peers,
        },
        inner: InnerSpec {
            steps: run.inner_steps,
            batch_size: run.batch,
            optimizer: run.inner.clone(),
        },
        outer: run.outer.clone(),
        codec: Codec::F32,
        quorum: run.peers,
        round_deadline_ms: 1_000,
        privacy: None,
        aggregator: run.rule.clone(),
    };
    let keys = peer_keys(run.peers);
    let mut state = RoundState::new(spec, theta0.to_vec(), 0);
    let mut trainers = (0..run.peers)
        .map(|_| LmInnerLoop::<B>::new(device, &run.model, theta0, &run.inner))
        .collect::<Result<Vec<_>, ParamsError>>()?;
    let mut replayable: Vec<Option<(Update, Vec<u8>)>> = vec![None; run.attackers as usize];
    let mut rng = SplitMix64::new(derive_seed("attack lm", &[&run.seed.to_le_bytes()]));
    let eval = |theta: Vec<f32>| {
        let validation = &validation;
        async move {
            evaluate_lm::<B::InnerBackend>(device, &run.model, &theta, validation, val_count, 32)
                .await
        }
    };
    let mut loss = vec![eval(theta0.to_vec()).await?];
    for round in 0..run.rounds {
        let now = u64::from(round) * 1_000;
        let theta = state.params().to_vec();
        let mut updates = Vec::with_capacity(run.peers as usize);
        for (peer, trainer) in trainers.iter_mut().enumerate() {
            trainer.load(&theta)?;
            let first = u64::from(round) * u64::from(run.inner_steps);
            for step in first..first + u64::from(run.inner_steps) {
                let windows = shards.batch(peer as u32, run.peers, step, run.batch as usize);
                trainer.step(&TextBatch { windows, window });
            }
            let local = trainer.params().await?;
            updates.push(crate::round::pseudo_gradient(&theta, &local));
        }
        attack_round(
            &mut state,
            &keys,
            run.attack,
            run.attackers as usize,
            updates,
            &mut replayable,
            (run.inner_steps, run.batch),
            now,
            &mut rng,
        );
        loss.push(eval(state.params().to_vec()).await?);
    }
    Ok(loss)
}

/// The simulated peers' keys: peer `i`'s is `i` big-endian in its first 4 bytes.
fn peer_keys(peers: u32) -> Vec<PeerKey> {
    (0..peers)
        .map(|peer| {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&peer.to_be_bytes());
            PeerKey(key)
        })
        .collect()
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
                None,
                &mut rng
            ),
            Some(vec![-10.0, 20.0])
        );
        // mean (2, 2), std (1, 0): ALIE z = 1 → (1, 2); IPM ε = 0.5 → (−1, −1).
        assert_eq!(
            craft(
                Attack::Alie { z: 1.0 },
                &[0.0, 0.0],
                &honest,
                None,
                &mut rng
            ),
            Some(vec![1.0, 2.0])
        );
        assert_eq!(
            craft(
                Attack::Ipm { epsilon: 0.5 },
                &[0.0, 0.0],
                &honest,
                None,
                &mut rng
            ),
            Some(vec![-1.0, -1.0])
        );
        let nan =
            craft(Attack::NonFinite, &[1.0, 1.0, 1.0], &honest, None, &mut rng).expect("crafted");
        assert!(nan[0].is_nan() && nan[1].is_infinite());
        let noise = craft(
            Attack::Gaussian { sigma: 2.0 },
            &[0.0; 4000],
            &honest,
            None,
            &mut rng,
        )
        .expect("crafted");
        let std = (noise.iter().map(|v| v * v).sum::<f32>() / 4000.0).sqrt();
        assert!((std - 2.0).abs() < 0.1, "σ {std}");
        assert_eq!(
            craft(Attack::LabelFlip, &[0.0], &honest, None, &mut rng),
            None
        );
    }

    /// Honest updates around a common direction with spread, for the optimised attacks.
    fn spread(count: usize, n: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = SplitMix64::new(seed);
        (0..count)
            .map(|_| {
                (0..n)
                    .map(|i| 0.1 * (i as f32).sin() + 0.05 * standard_normal(&mut rng) as f32)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn min_max_sits_at_the_edge_of_the_honest_spread() {
        let honest = spread(8, 500, 2);
        let mut rng = SplitMix64::new(1);
        let max_pair = honest
            .iter()
            .flat_map(|a| honest.iter().map(move |b| squared_distance(a, b)))
            .fold(0.0, f64::max);
        let mean = mean_std(&honest, 500).0;
        for perturbation in [
            Perturbation::UnitVector,
            Perturbation::Sign,
            Perturbation::Std,
        ] {
            let attack = Attack::MinMax { perturbation };
            let bad = craft(attack, &honest[0], &honest, None, &mut rng).expect("crafted");
            let farthest = honest
                .iter()
                .map(|g| squared_distance(&bad, g))
                .fold(0.0, f64::max);
            // Within the bound, and at it (γ is the largest allowed): 1% either way.
            assert!(farthest <= max_pair * 1.0001, "{perturbation:?}");
            assert!(
                farthest >= max_pair * 0.99,
                "{perturbation:?}: {farthest} vs {max_pair}"
            );
            // And pushed away from the mean, against its direction for unit and sign.
            assert!(squared_distance(&bad, &mean) > 0.0);
            if perturbation != Perturbation::Std {
                assert!(dot(&bad, &mean) < dot(&mean, &mean));
            }
        }
    }

    #[test]
    fn min_sum_meets_its_sum_bound_and_the_closed_form() {
        let honest = spread(8, 500, 3);
        let mut rng = SplitMix64::new(1);
        let sums: Vec<f64> = honest
            .iter()
            .map(|a| honest.iter().map(|b| squared_distance(a, b)).sum())
            .collect();
        let bound = sums.iter().copied().fold(0.0, f64::max);
        let attack = Attack::MinSum {
            perturbation: Perturbation::Std,
        };
        let bad = craft(attack, &honest[0], &honest, None, &mut rng).expect("crafted");
        let sum: f64 = honest.iter().map(|g| squared_distance(&bad, g)).sum();
        assert!(
            sum <= bound * 1.0001 && sum >= bound * 0.999,
            "{sum} vs {bound}"
        );
        // Σᵢ‖μ + γp − gᵢ‖² = Σᵢ‖μ − gᵢ‖² + k·γ²·‖p‖² (the cross terms cancel): γ in closed form.
        let (mean, std) = mean_std(&honest, 500);
        let base: f64 = honest.iter().map(|g| squared_distance(&mean, g)).sum();
        let gamma = ((bound - base) / (8.0 * dot(&std, &std))).sqrt();
        let expected: Vec<f32> = mean
            .iter()
            .zip(&std)
            .map(|(m, s)| m - (gamma * f64::from(*s)) as f32)
            .collect();
        assert!(squared_distance(&bad, &expected).sqrt() < 1e-3 * dot(&mean, &mean).sqrt());
    }

    #[test]
    fn rop_is_orthogonal_to_its_reference_around_the_centre() {
        let honest = spread(6, 400, 4);
        let mut rng = SplitMix64::new(1);
        let mean = mean_std(&honest, 400).0;
        let center: Vec<f32> = (0..400).map(|i| 0.08 * (i as f32).sin() + 0.01).collect();
        let bad = craft(
            Attack::Rop { z: 1.0 },
            &honest[0],
            &honest,
            Some(&center),
            &mut rng,
        )
        .expect("crafted");
        let offset: Vec<f32> = bad.iter().zip(&center).map(|(b, c)| b - c).collect();
        let reference: Vec<f32> = center
            .iter()
            .zip(&mean)
            .map(|(c, m)| ROP_LAMBDA * c + (1.0 - ROP_LAMBDA) * m)
            .collect();
        let cosine =
            dot(&offset, &reference) / (dot(&offset, &offset) * dot(&reference, &reference)).sqrt();
        assert!(cosine.abs() < 1e-4, "cos {cosine}");
        // Radius z × the farthest honest update from the centre.
        let radius = honest
            .iter()
            .map(|g| squared_distance(g, &center))
            .fold(0.0, f64::max)
            .sqrt();
        assert!((dot(&offset, &offset).sqrt() / radius - 1.0).abs() < 1e-4);
        // Without a previous aggregate it sits around zero, orthogonal to the honest mean.
        let first =
            craft(Attack::Rop { z: 2.0 }, &honest[0], &honest, None, &mut rng).expect("crafted");
        let cosine = dot(&first, &mean) / (dot(&first, &first) * dot(&mean, &mean)).sqrt();
        assert!(cosine.abs() < 1e-4, "cos {cosine}");
    }
}
