//! The DiLoCo outer optimizer: SGD with Nesterov momentum on the averaged pseudo-gradient.
//!
//! With Δ = θ_t − mean(θ_local) (a "gradient": it points uphill), one outer step is
//!
//! ```text
//! v ← μ·v + Δ
//! θ ← θ − lr·(Δ + μ·v)
//! ```
//!
//! the same update as PyTorch's `SGD(lr, momentum=μ, nesterov=True)` used by DiLoCo.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("pseudo-gradient has {got} values, parameters have {expected}")]
pub struct ShapeMismatch {
    pub expected: usize,
    pub got: usize,
}

/// Outer optimizer: SGD with Nesterov momentum on the averaged pseudo-gradient.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OuterSpec {
    pub lr: f32,
    pub momentum: f32,
}

impl Default for OuterSpec {
    fn default() -> Self {
        Self {
            lr: 0.7,
            momentum: 0.9,
        }
    }
}

/// Outer optimizer state: the momentum buffer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OuterOptimizer {
    pub spec: OuterSpec,
    pub velocity: Vec<f32>,
}

impl OuterOptimizer {
    pub fn new(spec: OuterSpec, n_params: usize) -> Self {
        Self {
            spec,
            velocity: vec![0.0; n_params],
        }
    }

    /// Applies one Nesterov step to `params` in place.
    pub fn step(
        &mut self,
        params: &mut [f32],
        pseudo_gradient: &[f32],
    ) -> Result<(), ShapeMismatch> {
        if pseudo_gradient.len() != params.len() || self.velocity.len() != params.len() {
            return Err(ShapeMismatch {
                expected: params.len(),
                got: pseudo_gradient.len(),
            });
        }
        let OuterSpec { lr, momentum } = self.spec;
        for ((p, v), &g) in params
            .iter_mut()
            .zip(&mut self.velocity)
            .zip(pseudo_gradient)
        {
            *v = momentum * *v + g;
            *p -= lr * (g + momentum * *v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesterov_matches_hand_computed_values() {
        let mut opt = OuterOptimizer::new(
            OuterSpec {
                lr: 0.7,
                momentum: 0.9,
            },
            2,
        );
        let mut theta = [1.0f32, -2.0];
        // Step 1: v = [0.5, -1.0]; θ -= 0.7·(Δ + 0.9·v) = 0.7·[0.95, -1.9] = [0.665, -1.33]
        opt.step(&mut theta, &[0.5, -1.0]).expect("shape");
        assert!(
            (theta[0] - 0.335).abs() < 1e-6 && (theta[1] + 0.67).abs() < 1e-6,
            "{theta:?}"
        );
        assert_eq!(opt.velocity, [0.5, -1.0]);
        // Step 2 with Δ = [0.1, 0.0]: v = [0.55, -0.9]; θ -= 0.7·[0.595, -0.81] = [0.4165, -0.567]
        opt.step(&mut theta, &[0.1, 0.0]).expect("shape");
        assert!((theta[0] - (0.335 - 0.4165)).abs() < 1e-6, "{theta:?}");
        assert!((theta[1] - (-0.67 + 0.567)).abs() < 1e-6, "{theta:?}");
    }

    #[test]
    fn lr_one_without_momentum_is_plain_averaging() {
        let mut opt = OuterOptimizer::new(
            OuterSpec {
                lr: 1.0,
                momentum: 0.0,
            },
            3,
        );
        let mut theta = [1.0f32, 2.0, 3.0];
        opt.step(&mut theta, &[0.25, -0.5, 1.0]).expect("shape");
        assert_eq!(theta, [0.75, 2.5, 2.0]);
    }

    #[test]
    fn wrong_shape_is_an_error_and_changes_nothing() {
        let mut opt = OuterOptimizer::new(OuterSpec::default(), 2);
        let mut theta = [1.0f32, 2.0];
        assert_eq!(
            opt.step(&mut theta, &[1.0]),
            Err(ShapeMismatch {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(theta, [1.0, 2.0]);
    }
}
