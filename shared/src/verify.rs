//! Checks that an update did the work it claims: the first of the two checks behind a
//! volunteer's credit ([`lm_loss_check`], judged a round at a time by [`judge_round`]).
//!
//! **The loss check.** The relay knows which windows a peer was given in a round (its slot's
//! shard, [`crate::text::Shards::shard`]), so it can ask of the update's Δ what training on
//! those windows does: θ − Δ should fit the windows the peer trained on better than windows
//! nobody was given, by more than the round's other updates do. Each of `k` windows drawn from
//! the peer's own steps, and `k` drawn from training windows nobody has been given, is scored
//! by L(θ − Δ_ref) − L(θ − Δ), where Δ_ref stands for the round's other updates (paired, so
//! that what every update of the round teaches cancels window by window); the score is the
//! Welch t-statistic of the own windows against the others. Besides, an update must not fit
//! its own windows better at half its size ([`LossCheck::overshoot`]). The windows are drawn
//! with the verifier's randomness after the round closed, so a peer cannot train on just those.
//!
//! What it catches: a Δ that teaches nothing (near zero, noise: its score is noise around 0,
//! and noise overshoots), a Δ scaled up (it overshoots), and a Δ trained on other text than the
//! peer's (another peer's Δ replayed under a new identity, training on text of its own choosing:
//! it fits the peer's windows no better than anyone's). What it cannot see: a peer that trains
//! honestly on part of its batch, or for fewer steps than it claims, still gains on its own
//! windows; a Δ scaled by a modest factor does not overshoot; early in a run (from θ₀, in the
//! warm-up) every update teaches mostly the same and the scores cannot tell; a small model on
//! text with little variety leaves no mark on single windows. Replaying a random fraction of
//! rounds from a committed state ([`crate::lm_train::TrainerState`]) answers those.

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
    /// A round's checks can tell when its power (the upper quartile of its scores) reaches
    /// this.
    pub power: f32,
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
            power: 4.0,
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
    /// The loss check's figures, for an update the loss check judged.
    pub check: Option<LossCheck>,
    /// The replay's figures, for an update drawn for a replay ([`crate::replay`]); a drawn
    /// update is judged by its replay alone.
    pub replay: Option<crate::replay::ReplayCheck>,
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
/// low score fails an update only in a round whose power reaches `policy.power`; elsewhere it is
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
    let can_tell = power.is_some_and(|p| p >= policy.power);
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

/// An update whose [`LossCheck::overshoot`] is above this fails in any round (honest updates
/// measured up to 3.6 in `cargo xtask bench verify`; a 10× update far above).
pub const OVERSHOOT: f32 = 8.0;

/// Draws `k` distinct windows of `window` bytes from `windows` (concatenated) with `seed`;
/// all of them when there are no more than `k`.
pub fn draw_windows(windows: &[u8], window: usize, k: usize, seed: u64) -> Vec<u8> {
    let n = windows.len() / window.max(1);
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed)
        .choose(&mut order, k)
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
        assert!(power.is_some_and(|p| p >= policy.power));
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
