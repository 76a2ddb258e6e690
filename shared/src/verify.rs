//! Checks that an update did the work it claims: the first of the two checks behind a
//! volunteer's credit.
//!
//! **The loss check** runs on every update. The relay knows which windows a peer was given in a
//! round (its slot's shard, [`crate::text::Shards::shard`]), so it can ask of the update's Δ what
//! training on those windows does: θ − Δ should fit the windows the peer trained on better than
//! θ does, and better than it fits windows the peer was never given. Each of `k` windows drawn
//! from the peer's own steps, and `k` drawn from training windows no peer has been given yet,
//! is scored by its loss gain L(θ) − L(θ − Δ); the update passes when its own windows gain (on
//! average) and gain more than the others by a Welch t-statistic of at least
//! [`CheckPolicy::min_score`]. The windows are drawn with the verifier's randomness after the
//! update arrived, so a peer cannot train on just those.
//!
//! What it catches: a Δ that teaches nothing (zero, random noise, a huge or sign-flipped Δ:
//! no gain on the peer's own windows) and a Δ trained on other text than the peer's (another
//! peer's Δ replayed under a new identity, training on a corpus of its own choosing: its gain
//! on the peer's windows is no larger than on anyone's). What it cannot see: a peer that trains
//! honestly on part of its batch, or for fewer steps than it claims, still gains on its own
//! windows; a Δ scaled by a modest factor still fits them; and with few windows the statistic
//! is noisy. The committed-state replay of a random fraction of updates answers those.

use burn::prelude::*;

use crate::crypto::PeerKey;
use crate::data::SplitMix64;
use crate::lm::LmConfig;
use crate::params::{self, ParamsError};

/// What the loss check found for one update.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossCheck {
    /// Mean gain (nats per byte) on windows the peer trained on: L(θ − Δ_ref) − L(θ − Δ).
    pub own_gain: f32,
    /// Mean gain on windows the peer was never given.
    pub other_gain: f32,
    /// Welch's t-statistic of the own gains against the other gains.
    pub score: f32,
    /// Paired t-statistic of L(θ − Δ) − L(θ − Δ/2) on the peer's own windows: above
    /// [`OVERSHOOT`], half the update fits the windows it was trained on better than the whole
    /// (an honest update ends where its training brought its windows; a scaled or noisy one
    /// goes past).
    #[serde(default)]
    pub overshoot: f32,
    /// Windows scored on each side.
    pub windows: u32,
}

/// How the loss check judges.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckPolicy {
    /// Windows drawn from the peer's steps, and as many from windows nobody was given; 0 turns
    /// the check off.
    pub windows: u32,
    /// A score at or above this verifies the update.
    pub pass: f32,
    /// A score below this fails it, in a round whose checks can tell (see [`judge_round`]).
    pub fail: f32,
}

impl Default for CheckPolicy {
    /// Measured on honest CPU peers (docs/benchmarks.md): once training leaves its mark, an
    /// honest update scores 3 to 6 with 128 windows, a false one 0 ± 1.5; a false update then
    /// fails about half the time and an honest one (below 0) rarely.
    fn default() -> Self {
        Self {
            windows: 128,
            pass: 3.0,
            fail: 0.0,
        }
    }
}

/// What the relay concluded of one update's work.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// The work is shown: its credit is verified.
    Verified,
    /// The update did not do the work it claims: it earns nothing.
    Failed { reason: String },
    /// The check could not tell (or did not run); the credit stays unchecked.
    Inconclusive { reason: String },
}

impl Outcome {
    /// The label the relay counts it under.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Verified => "verified",
            Self::Failed { .. } => "failed",
            Self::Inconclusive { .. } => "inconclusive",
        }
    }
}

/// The relay's signed record of what it concluded of one accepted update: kept in its ledger
/// beside the peer's signed update, which `payload` names.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    pub run_id: String,
    pub round: u64,
    pub peer: PeerKey,
    /// The digest of the update's payload, as the peer signed it.
    pub payload: [u8; 32],
    /// The samples at stake ([`crate::protocol::RunSpec::samples_of`] the update's steps).
    pub samples: u64,
    pub check: Option<LossCheck>,
    pub outcome: Outcome,
}

impl crate::crypto::SigningContext for Verdict {
    const CONTEXT: &'static [u8] = b"swarmtrain/verdict/v1";
}

/// Judges a round's checks together. A check can only tell honest from false work once
/// training on a window leaves a mark on it that other updates do not share: from θ₀, in the
/// warm-up, every update teaches mostly the same. So a round's `power` is the upper quartile of
/// its scores (or, in a round with fewer than three, `previous`, the last round's power): while
/// more than a quarter of a round's updates are honest, that is an honest update's score. A
/// low score fails an update only in a round whose power reaches `policy.pass`; elsewhere it is
/// inconclusive. A zero Δ (`None`: no work at all) and one that overshoots its own windows
/// ([`LossCheck::overshoot`]) fail in any round.
pub fn judge_round(
    policy: &CheckPolicy,
    checks: &[Option<LossCheck>],
    previous: Option<f32>,
) -> (Vec<Outcome>, Option<f32>) {
    let mut scores: Vec<f32> = checks
        .iter()
        .flatten()
        .map(|c| c.score)
        .filter(|s| !s.is_nan())
        .collect();
    scores.sort_by(f32::total_cmp);
    let power = if scores.len() >= 3 {
        Some(scores[scores.len() * 3 / 4])
    } else {
        previous
    };
    let can_tell = power.is_some_and(|p| p >= policy.pass);
    let outcomes = checks
        .iter()
        .map(|check| match check {
            None => Outcome::Failed {
                reason: "the update is zero: it did no work".into(),
            },
            Some(c) if c.overshoot > OVERSHOOT => Outcome::Failed {
                reason: format!(
                    "half the update fits the windows its peer trained on better than the whole \
                     (t = {:.2}): it goes past where training brought them (scaled or noise)",
                    c.overshoot
                ),
            },
            Some(c) if c.score >= policy.pass => Outcome::Verified,
            Some(c) if can_tell && (c.score.is_nan() || c.score < policy.fail) => Outcome::Failed {
                reason: format!(
                    "the update fits the windows its peer was given no better than others \
                     (score {:.2}, under {:.2}; the round's honest updates score {:.2})",
                    c.score,
                    policy.fail,
                    power.unwrap_or(f32::NAN)
                ),
            },
            Some(c) => Outcome::Inconclusive {
                reason: format!(
                    "score {:.2}: under {:.2} to verify{}",
                    c.score,
                    policy.pass,
                    if can_tell {
                        ""
                    } else {
                        "; the round's checks cannot tell honest work from false"
                    }
                ),
            },
        })
        .collect();
    (outcomes, power)
}

/// An update whose [`LossCheck::overshoot`] is above this fails in any round.
pub const OVERSHOOT: f32 = 3.0;

/// Draws `k` distinct windows of `window` bytes from `windows` (concatenated) with `seed`;
/// all of them when there are no more than `k`.
pub fn draw_windows(windows: &[u8], window: usize, k: usize, seed: u64) -> Vec<u8> {
    let n = windows.len() / window.max(1);
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    let k = k.min(n);
    // A partial Fisher–Yates shuffle: the first k are a uniform draw without replacement.
    for i in 0..k {
        let j = i + rng.below((n - i) as u64) as usize;
        order.swap(i, j);
    }
    order[..k]
        .iter()
        .flat_map(|&i| &windows[i * window..(i + 1) * window])
        .copied()
        .collect()
}

/// Per-window losses of `params` on `windows` (concatenated, `config.context + 1` bytes each),
/// in batches of 32. Reads back asynchronously.
pub async fn window_losses<B: Backend>(
    device: &B::Device,
    config: &LmConfig,
    params: &[f32],
    windows: &[u8],
) -> Result<Vec<f32>, ParamsError> {
    let window = config.context + 1;
    let model = params::load(config.init::<B>(device), params)?;
    let mut out = Vec::with_capacity(windows.len() / window);
    for chunk in windows.chunks(window * 32) {
        let n = chunk.len() / window;
        if n == 0 {
            break;
        }
        let tokens: Vec<i64> = chunk[..n * window].iter().map(|&b| i64::from(b)).collect();
        let losses = model.window_losses(Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens, [n, window]),
            device,
        ));
        let data = losses.into_data_async().await?;
        out.extend(data.iter::<f32>());
    }
    Ok(out)
}

/// The loss check of a language-model update Δ = θ − θ_local: per window, how much better
/// θ − Δ fits it than θ − Δ_ref does, where Δ_ref is made of the same round's other updates,
/// none trained on this peer's windows (the relay takes their coordinate-wise median), or θ
/// itself when there are none.
/// The comparison is paired, so what every update of the round teaches (most of what an early
/// round teaches) cancels window by window; what is left is what Δ learnt from its own windows.
pub async fn lm_loss_check<B: Backend>(
    device: &B::Device,
    config: &LmConfig,
    theta: &[f32],
    delta: &[f32],
    reference: Option<&[f32]>,
    own: &[u8],
    other: &[u8],
) -> Result<LossCheck, ParamsError> {
    let minus = |d: &[f32]| -> Vec<f32> { theta.iter().zip(d).map(|(t, d)| t - d).collect() };
    let both: Vec<u8> = own.iter().chain(other).copied().collect();
    let base = match reference {
        Some(reference) => minus(reference),
        None => theta.to_vec(),
    };
    let before = window_losses::<B>(device, config, &base, &both).await?;
    let after = window_losses::<B>(device, config, &minus(delta), &both).await?;
    let half: Vec<f32> = delta.iter().map(|d| 0.5 * d).collect();
    let halfway = window_losses::<B>(device, config, &minus(&half), own).await?;
    let n_own = own.len() / (config.context + 1);
    let past: Vec<f64> = after
        .iter()
        .zip(&halfway)
        .map(|(a, h)| f64::from(*a) - f64::from(*h))
        .collect();
    let gains: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| f64::from(*b) - f64::from(*a))
        .collect();
    let (own_gains, other_gains) = gains.split_at(n_own.min(gains.len()));
    let mut check = check_from_gains(own_gains, other_gains);
    let (mean, var) = mean_var(&past);
    let se = (var / past.len().max(1) as f64).sqrt();
    check.overshoot = if se > 0.0 { (mean / se) as f32 } else { 0.0 };
    Ok(check)
}

/// The check's figures from per-window gains.
pub fn check_from_gains(own: &[f64], other: &[f64]) -> LossCheck {
    let (own_mean, own_var) = mean_var(own);
    let (other_mean, other_var) = mean_var(other);
    let se = (own_var / own.len().max(1) as f64 + other_var / other.len().max(1) as f64).sqrt();
    let diff = own_mean - other_mean;
    let score = if se > 0.0 {
        diff / se
    } else if diff > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    LossCheck {
        own_gain: own_mean as f32,
        other_gain: other_mean as f32,
        score: score as f32,
        overshoot: 0.0,
        windows: own.len().min(other.len()) as u32,
    }
}

/// Mean and unbiased variance (0 for fewer than two values).
fn mean_var(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draw_is_distinct_windows_fixed_by_the_seed() {
        let windows: Vec<u8> = (0..20u8).flat_map(|i| [i; 3]).collect();
        let a = draw_windows(&windows, 3, 5, 9);
        assert_eq!(a, draw_windows(&windows, 3, 5, 9));
        assert_ne!(a, draw_windows(&windows, 3, 5, 10));
        let mut firsts: Vec<u8> = a.chunks(3).map(|w| w[0]).collect();
        assert!(
            a.chunks(3).all(|w| w[0] == w[1] && w[1] == w[2]),
            "whole windows"
        );
        firsts.sort_unstable();
        firsts.dedup();
        assert_eq!(firsts.len(), 5, "distinct");
        assert_eq!(
            draw_windows(&windows, 3, 50, 1).len(),
            60,
            "all when k exceeds them"
        );
    }

    #[test]
    fn a_round_fails_low_scores_only_when_its_checks_can_tell() {
        let policy = CheckPolicy::default();
        let check = |own: f64| {
            check_from_gains(&[own, own + 0.01, own - 0.01, own], &[0.1, 0.11, 0.09, 0.1])
        };
        let (honest, cheat) = (Some(check(0.3)), Some(check(0.08)));
        assert!(honest.expect("check").score > policy.pass);
        let (outcomes, power) = judge_round(&policy, &[honest, honest, cheat, None], None);
        assert!(power.is_some_and(|p| p >= policy.pass));
        assert_eq!(outcomes[0], Outcome::Verified);
        assert_eq!(outcomes[2].label(), "failed", "{outcomes:?}");
        assert_eq!(outcomes[3].label(), "failed", "a zero Δ fails in any round");
        // A round where most updates are no better than the cheat cannot tell them apart.
        let (outcomes, _) = judge_round(&policy, &[honest, cheat, cheat, cheat, cheat], None);
        assert_eq!(outcomes[0], Outcome::Verified);
        assert_eq!(outcomes[1].label(), "inconclusive");
        // Too few checks: the last round's power decides.
        let (outcomes, power) = judge_round(&policy, &[cheat], Some(5.0));
        assert_eq!((outcomes[0].label(), power), ("failed", Some(5.0)));
        // An update past its own windows' fit fails whatever its score.
        let mut scaled = honest.expect("check");
        scaled.overshoot = OVERSHOOT + 1.0;
        assert_eq!(
            judge_round(&policy, &[Some(scaled)], None).0[0].label(),
            "failed"
        );
        let nan = check_from_gains(&[f64::NAN; 4], &[0.0; 4]);
        assert_ne!(
            judge_round(&policy, &[Some(nan)], Some(5.0)).0[0],
            Outcome::Verified
        );
    }
}

#[cfg(test)]
mod experiment {
    use super::*;
    use crate::lm_train::{LmInnerSpec, LmTrainer, LrSchedule, TextBatch};
    use crate::text::{Shards, TextCorpus};
    use burn::backend::{Autodiff, NdArray};

    type B = Autodiff<NdArray>;

    fn fortunes() -> Vec<u8> {
        let mut out = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir("/usr/share/games/fortunes")
            .expect("fortunes")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_none())
            .collect();
        files.sort();
        for f in files {
            if let Ok(t) = std::fs::read(&f) {
                out.extend(t);
            }
        }
        out
    }

    #[test]
    #[ignore = "an experiment: cargo test -p swarmtrain-shared --release -- --ignored --nocapture"]
    fn calibrate() {
        let env = |k: &str, d: usize| -> usize {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        let config = LmConfig::new()
            .with_d_model(env("EXP_D", 64))
            .with_layers(env("EXP_L", 2))
            .with_heads(env("EXP_HEADS", 4))
            .with_context(env("EXP_CTX", 64));
        let window = config.context + 1;
        let text = fortunes();
        let corpus = TextCorpus::new(&text, window, 7).expect("corpus");
        let shards = Shards::new(&corpus, window, 7);
        let (h, batch, peers) = (env("EXP_H", 50) as u32, env("EXP_B", 16), 16u32);
        let spec = LmInnerSpec::new(LrSchedule {
            peak: env("EXP_LR_E4", 30) as f64 * 1e-4,
            warmup: env("EXP_WARMUP", 100) as u64,
            total: 20_000,
            min_ratio: 0.1,
        });
        let device = Default::default();
        let mut theta =
            futures::executor::block_on(config.init_params::<NdArray>(&device, 7)).expect("θ₀");
        let policy = CheckPolicy::default();
        let mut trainers: Vec<LmTrainer<B>> = (0..3)
            .map(|_| LmTrainer::<B>::new(&device, &config, &theta, &spec).expect("trainer"))
            .collect();
        for round in 0..env("EXP_ROUNDS", 6) as u64 {
            let mut deltas = Vec::new();
            for (slot, trainer) in trainers.iter_mut().enumerate() {
                trainer.load(&theta).expect("load");
                trainer.seek(round * u64::from(h));
                let shard = shards.shard(round, slot as u32, peers, h, batch);
                for chunk in shard.chunks_exact(batch * window) {
                    trainer.step(&TextBatch {
                        windows: chunk.to_vec(),
                        window,
                    });
                }
                let local = futures::executor::block_on(trainer.params()).expect("params");
                deltas.push(crate::round::pseudo_gradient(&theta, &local));
            }
            let other = shards.batch(0, 1, 1 << 40 | round, env("EXP_W", 128));
            let loo = |skip: usize| -> Vec<f32> {
                (0..theta.len())
                    .map(|i| {
                        deltas
                            .iter()
                            .enumerate()
                            .filter(|(j, _)| *j != skip)
                            .map(|(_, d)| d[i])
                            .sum::<f32>()
                            / (deltas.len() - 1) as f32
                    })
                    .collect()
            };
            let score = |delta: &[f32], slot: u32, seed: u64| {
                let own = draw_windows(
                    &shards.shard(round, slot, peers, h, batch),
                    window,
                    env("EXP_W", 128),
                    seed,
                );
                let reference = loo(slot as usize);
                futures::executor::block_on(lm_loss_check::<NdArray>(
                    &device,
                    &config,
                    &theta,
                    delta,
                    Some(&reference),
                    &own,
                    &other,
                ))
                .expect("check")
            };
            for (slot, delta) in deltas.iter().enumerate() {
                for seed in 0..3 {
                    let c = score(delta, slot as u32, seed);
                    println!(
                        "round {round} honest slot {slot} seed {seed}: {c:?} {}",
                        c.score >= policy.pass
                    );
                }
            }
            let c = score(&deltas[0], 1, 0);
            println!(
                "round {round} replayed 0 as 1: {c:?} {}",
                c.score >= policy.pass
            );
            let zero = vec![0.0; theta.len()];
            let c = score(&zero, 0, 0);
            println!("round {round} zero: {c:?} {}", c.score >= policy.pass);
            let scaled: Vec<f32> = deltas[0].iter().map(|d| d * 10.0).collect();
            let c = score(&scaled, 0, 0);
            println!("round {round} scaled×10: {c:?} {}", c.score >= policy.pass);
            let norm = deltas[0].iter().map(|d| d * d).sum::<f32>().sqrt();
            let mut rng = SplitMix64::new(round);
            let mut random: Vec<f32> = (0..theta.len())
                .map(|_| crate::privacy::standard_normal(&mut rng) as f32)
                .collect();
            let rn = random.iter().map(|d| d * d).sum::<f32>().sqrt();
            random.iter_mut().for_each(|d| *d *= norm / rn);
            let c = score(&random, 0, 0);
            println!("round {round} random: {c:?} {}", c.score >= policy.pass);
            // The mean of the three is the next θ (plain DiLoCo without momentum, for the test).
            for i in 0..theta.len() {
                theta[i] -= deltas.iter().map(|d| d[i]).sum::<f32>() / 3.0 * 0.7;
            }
        }
    }
}
