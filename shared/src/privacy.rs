//! Differential privacy for pseudo-gradients: per-update L2 clipping, Gaussian noise, and a
//! Rényi-DP accountant.
//!
//! Each peer clips its update to L2 norm `clip_norm` (the sensitivity of one peer's round)
//! and adds N(0, (noise_multiplier · clip_norm)²) to every coordinate before compressing it.
//! One round is then a Gaussian mechanism with RDP ε(α) = α / (2 z²) (Mironov 2017, z the noise
//! multiplier); rounds compose additively, and (ε, δ)-DP follows from
//! ε = min over α of [ R·α / (2 z²) + ln(1/δ) / (α − 1) ] for R rounds. This accounts per peer
//! and without subsampling amplification, so it is an upper bound.

use serde::{Deserialize, Serialize};

use crate::data::SplitMix64;

/// A run's privacy settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacySpec {
    /// L2 norm every update is clipped to.
    pub clip_norm: f32,
    /// Noise standard deviation, in units of `clip_norm`.
    pub noise_multiplier: f32,
    /// The δ that ε is reported for.
    pub delta: f64,
}

/// Scales `values` down to L2 norm at most `max_norm`; returns the norm before clipping.
pub fn clip_l2(values: &mut [f32], max_norm: f32) -> f32 {
    let norm = values
        .iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt() as f32;
    if norm > max_norm && norm > 0.0 {
        let scale = max_norm / norm;
        values.iter_mut().for_each(|v| *v *= scale);
    }
    norm
}

/// A standard normal sample (Box–Muller) from a seeded generator: reproducible everywhere.
pub fn standard_normal(rng: &mut SplitMix64) -> f64 {
    let uniform =
        |rng: &mut SplitMix64| ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let (u1, u2) = (uniform(rng), uniform(rng));
    (-2.0 * u1.ln()).sqrt() * (2.0 * core::f64::consts::PI * u2).cos()
}

/// Adds N(0, σ²) to every value.
pub fn add_gaussian_noise(values: &mut [f32], sigma: f32, rng: &mut SplitMix64) {
    values
        .iter_mut()
        .for_each(|v| *v += (standard_normal(rng) * f64::from(sigma)) as f32);
}

/// Clips to `spec.clip_norm` and adds the spec's Gaussian noise, seeded by `seed`.
pub fn privatize(values: &mut [f32], spec: &PrivacySpec, seed: u64) {
    clip_l2(values, spec.clip_norm);
    add_gaussian_noise(
        values,
        spec.noise_multiplier * spec.clip_norm,
        &mut SplitMix64::new(seed),
    );
}

/// (ε, δ) after `rounds` Gaussian-mechanism rounds with noise multiplier `z`, via RDP.
/// Infinite without noise.
pub fn epsilon(rounds: u64, noise_multiplier: f32, delta: f64) -> f64 {
    let z = f64::from(noise_multiplier);
    if rounds == 0 {
        return 0.0;
    }
    if z <= 0.0 || delta <= 0.0 || delta >= 1.0 {
        return f64::INFINITY;
    }
    let orders = (1..=1000)
        .map(|i| 1.0 + f64::from(i) * 0.05)
        .chain((2..=64).map(|i| f64::from(i) * 8.0));
    orders
        .map(|alpha| rounds as f64 * alpha / (2.0 * z * z) + (1.0 / delta).ln() / (alpha - 1.0))
        .fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_direction() {
        let mut v = vec![3.0f32, 4.0];
        assert_eq!(clip_l2(&mut v, 1.0), 5.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut small = vec![0.1f32, 0.0];
        clip_l2(&mut small, 1.0);
        assert_eq!(small, [0.1, 0.0], "short vectors are untouched");
    }

    #[test]
    fn noise_has_the_requested_spread_and_is_reproducible() {
        let n = 200_000;
        let mut a = vec![0.0f32; n];
        add_gaussian_noise(&mut a, 2.0, &mut SplitMix64::new(1));
        let mean = a.iter().map(|v| f64::from(*v)).sum::<f64>() / n as f64;
        let var = a
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        assert!(
            mean.abs() < 0.02 && (var.sqrt() - 2.0).abs() < 0.02,
            "mean {mean} sd {}",
            var.sqrt()
        );
        let mut b = vec![0.0f32; n];
        add_gaussian_noise(&mut b, 2.0, &mut SplitMix64::new(1));
        assert_eq!(a, b);
    }

    #[test]
    fn accountant_matches_the_closed_form_and_grows_with_rounds() {
        // Closed form of min_α [Rα/(2z²) + ln(1/δ)/(α−1)]: at α* = 1 + z·sqrt(2 ln(1/δ)/R),
        // ε = R/(2z²) + sqrt(2 R ln(1/δ)) / z.
        let (z, delta) = (4.0f32, 1e-5);
        for rounds in [1u64, 10, 100] {
            let r = rounds as f64;
            let closed = r / (2.0 * 16.0) + (2.0 * r * (1.0f64 / delta).ln()).sqrt() / 4.0;
            let eps = epsilon(rounds, z, delta);
            assert!(
                eps >= closed - 1e-9 && eps < closed * 1.01,
                "rounds {rounds}: {eps} vs {closed}"
            );
        }
        assert!(epsilon(10, z, delta) < epsilon(20, z, delta));
        assert!(epsilon(10, 8.0, delta) < epsilon(10, z, delta));
        assert_eq!(epsilon(0, z, delta), 0.0);
        assert_eq!(epsilon(5, 0.0, delta), f64::INFINITY);
    }
}
