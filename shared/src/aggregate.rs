//! Aggregation of pseudo-gradients. Contributions are taken in peer-key order, so the result
//! does not depend on arrival order.

use burn::prelude::*;

use crate::outer::OuterSpec;
use crate::robust::{self, RobustError, Rule};

/// Why a backend aggregation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AggregateError {
    #[error("no contributions to aggregate")]
    Empty,
    #[error("contribution of {got} values, parameters have {expected}")]
    Shape { expected: usize, got: usize },
    #[error("could not read the result back from the device: {0}")]
    Readback(String),
    #[error("the aggregation rule refused the round: {0}")]
    Rule(String),
}

pub use crate::robust::{Contribution, in_peer_order};

/// The coordinate-wise mean, summed exactly ([`crate::exact::ExactSum`]): bitwise independent
/// of the contributions' order and of how they were grouped into partial sums. Returns `None`
/// for no contributions, mismatched lengths, non-finite values or more than
/// [`crate::exact::MAX_TERMS`].
pub fn mean(contributions: &[Contribution]) -> Option<Vec<f32>> {
    let mut sum = crate::exact::ExactSum::new(contributions.first()?.delta.len());
    for c in contributions {
        sum.add(&c.delta).ok()?;
    }
    sum.mean()
}

/// The (exact) mean of the contributions followed by the outer Nesterov step, computed
/// on any Burn backend (ndarray, wgpu, cuda). Returns θ_{t+1} and the new momentum; reads back
/// asynchronously, so it is safe in browsers too.
pub async fn outer_step_on<B: Backend>(
    device: &B::Device,
    params: &[f32],
    velocity: &[f32],
    contributions: &[Contribution],
    spec: &OuterSpec,
) -> Result<(Vec<f32>, Vec<f32>), AggregateError> {
    let inputs = RoundInputs {
        params,
        velocity,
        contributions,
        rule: &Rule::Mean,
        center: None,
        outer: spec,
    };
    let stepped = outer_step_with::<B>(device, &inputs).await?;
    Ok((stepped.params, stepped.velocity))
}

/// What a round's aggregation starts from.
#[derive(Clone, Copy, Debug)]
pub struct RoundInputs<'a> {
    /// θ_t.
    pub params: &'a [f32],
    /// The outer momentum.
    pub velocity: &'a [f32],
    pub contributions: &'a [Contribution],
    pub rule: &'a Rule,
    /// The previous aggregate (centered clipping's centre).
    pub center: Option<&'a [f32]>,
    pub outer: &'a OuterSpec,
}

/// What a round's aggregation produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Stepped {
    /// θ_{t+1}.
    pub params: Vec<f32>,
    /// The new outer momentum.
    pub velocity: Vec<f32>,
    /// The rule's aggregate of the pseudo-gradients.
    pub aggregate: Vec<f32>,
}

/// The CPU entry point of a round's aggregation: the run's rule on the fast CPU kernels
/// ([`robust::aggregate`]) followed by the outer Nesterov step ([`crate::outer`]). This is what
/// the relay (by default), the simulator and the attack grid run, through
/// [`crate::round::RoundState`]; [`outer_step_with`] is the same on a Burn backend.
pub fn step_cpu(inputs: &RoundInputs<'_>) -> Result<Stepped, AggregateError> {
    let n = inputs.params.len();
    if inputs.velocity.len() != n {
        return Err(AggregateError::Shape {
            expected: n,
            got: inputs.velocity.len(),
        });
    }
    let aggregate = robust::aggregate(inputs.rule, inputs.contributions, n, inputs.center)
        .map_err(|e| match e {
            RobustError::Empty => AggregateError::Empty,
            RobustError::Shape { expected, got } => AggregateError::Shape { expected, got },
            other => AggregateError::Rule(other.to_string()),
        })?;
    let mut params = inputs.params.to_vec();
    let mut outer = crate::outer::OuterOptimizer {
        spec: inputs.outer.clone(),
        velocity: inputs.velocity.to_vec(),
    };
    outer
        .step(&mut params, &aggregate)
        .map_err(|e| AggregateError::Shape {
            expected: e.expected,
            got: e.got,
        })?;
    Ok(Stepped {
        params,
        velocity: outer.velocity,
        aggregate,
    })
}

/// Aggregates the contributions with the run's rule ([`robust::aggregate_tensor`]) and takes
/// the outer Nesterov step, all on backend `B`. Input is validated on the host first: wrongly
/// sized or non-finite contributions are errors.
pub async fn outer_step_with<B: Backend>(
    device: &B::Device,
    inputs: &RoundInputs<'_>,
) -> Result<Stepped, AggregateError> {
    let RoundInputs {
        params,
        velocity,
        contributions,
        rule,
        center,
        outer: spec,
    } = *inputs;
    let n = params.len();
    if velocity.len() != n {
        return Err(AggregateError::Shape {
            expected: n,
            got: velocity.len(),
        });
    }
    let sorted = robust::validated(contributions, n).map_err(|e| match e {
        RobustError::Empty => AggregateError::Empty,
        RobustError::Shape { expected, got } => AggregateError::Shape { expected, got },
        other => AggregateError::Rule(other.to_string()),
    })?;
    let mut stacked = Vec::with_capacity(sorted.len() * n);
    sorted
        .iter()
        .for_each(|c| stacked.extend_from_slice(&c.delta));
    let deltas = Tensor::<B, 2>::from_data(TensorData::new(stacked, [sorted.len(), n]), device); // [peers, n]
    let center = match center {
        Some(c) if c.len() == n => Some(Tensor::<B, 1>::from_data(
            TensorData::new(c.to_vec(), [n]),
            device,
        )),
        Some(c) => {
            return Err(AggregateError::Shape {
                expected: n,
                got: c.len(),
            });
        }
        None => None,
    };
    let aggregate = robust::aggregate_tensor(rule, deltas, center)
        .await
        .map_err(|e| match e {
            RobustError::Readback(e) => AggregateError::Readback(e),
            other => AggregateError::Rule(other.to_string()),
        })?; // [n]
    let theta = Tensor::<B, 1>::from_data(TensorData::new(params.to_vec(), [n]), device);
    let v = Tensor::<B, 1>::from_data(TensorData::new(velocity.to_vec(), [n]), device);
    let v = v.mul_scalar(spec.momentum).add(aggregate.clone());
    let theta = theta.sub(
        aggregate
            .clone()
            .add(v.clone().mul_scalar(spec.momentum))
            .mul_scalar(spec.lr),
    );
    let read = |t: Tensor<B, 1>| async move {
        t.into_data_async()
            .await
            .map(|d| d.iter::<f32>().collect::<Vec<f32>>())
            .map_err(|e| AggregateError::Readback(e.to_string()))
    };
    Ok(Stepped {
        params: read(theta).await?,
        velocity: read(v).await?,
        aggregate: read(aggregate).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PeerKey;
    use crate::outer::OuterOptimizer;

    fn c(id: u8, delta: Vec<f32>) -> Contribution {
        Contribution {
            peer: PeerKey([id; 32]),
            n_samples: 1,
            delta,
        }
    }

    #[test]
    fn mean_is_order_independent() {
        let a = vec![
            c(1, vec![1.0, 0.1]),
            c(2, vec![3.0, 0.2]),
            c(3, vec![-1.0, 0.7]),
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(mean(&a), mean(&b));
        let m = mean(&a).expect("mean");
        assert!((m[0] - 1.0).abs() < 1e-6 && (m[1] - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(mean(&[]), None);
        assert_eq!(mean(&[c(1, vec![1.0]), c(2, vec![1.0, 2.0])]), None);
    }

    /// What an edge relay's partial sum would give: the round's updates split between relays,
    /// each summed exactly, merged at the root in any order, then the outer step: θ bitwise the
    /// lone relay's (`step_cpu` over all of them), and the same on a Burn backend.
    #[test]
    fn partial_sums_merged_in_any_order_step_to_the_lone_relays_theta() {
        let n = 3000;
        let contributions: Vec<Contribution> = (0..11u8)
            .map(|p| {
                c(
                    p,
                    (0..n)
                        .map(|i| {
                            ((i as f32 * 0.37 + f32::from(p)).sin()) * 10f32.powi(-(i as i32 % 9))
                        })
                        .collect(),
                )
            })
            .collect();
        let params: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).cos()).collect();
        let velocity: Vec<f32> = (0..n).map(|i| (i as f32).sin() * 1e-3).collect();
        let spec = OuterSpec::default();
        let inputs = RoundInputs {
            params: &params,
            velocity: &velocity,
            contributions: &contributions,
            rule: &Rule::Mean,
            center: None,
            outer: &spec,
        };
        let lone = step_cpu(&inputs).expect("lone relay");
        let edges: [&[usize]; 3] = [&[7, 0, 3, 10], &[1, 9, 4], &[2, 8, 5, 6]];
        let mut merged = crate::exact::ExactSum::new(n);
        for edge in edges.iter().rev() {
            let mut partial = crate::exact::ExactSum::new(n);
            edge.iter()
                .for_each(|i| partial.add(&contributions[*i].delta).expect("add"));
            merged.merge(&partial).expect("merge");
        }
        let aggregate = merged.mean().expect("mean");
        assert!(
            aggregate
                .iter()
                .zip(&lone.aggregate)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        let mut theta = params.clone();
        let mut outer = OuterOptimizer {
            spec: spec.clone(),
            velocity: velocity.clone(),
        };
        outer.step(&mut theta, &aggregate).expect("shape");
        assert!(
            theta
                .iter()
                .zip(&lone.params)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        let device = Default::default();
        let tensor = futures::executor::block_on(outer_step_with::<burn::backend::NdArray>(
            &device, &inputs,
        ))
        .expect("tensor path");
        assert!(
            tensor
                .aggregate
                .iter()
                .zip(&lone.aggregate)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }

    #[test]
    fn backend_outer_step_matches_the_cpu_reference() {
        let n = 1000;
        let contributions: Vec<Contribution> = (0..5u8)
            .map(|p| {
                c(
                    p,
                    (0..n)
                        .map(|i| ((i * 7 + p as usize * 13) % 17) as f32 * 0.01 - 0.08)
                        .collect(),
                )
            })
            .collect();
        let params: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
        let velocity: Vec<f32> = (0..n).map(|i| (i as f32).cos() * 0.1).collect();
        let spec = OuterSpec::default();

        let mut expected = params.clone();
        let mut outer = OuterOptimizer {
            spec: spec.clone(),
            velocity: velocity.clone(),
        };
        outer
            .step(&mut expected, &mean(&contributions).expect("mean"))
            .expect("shape");

        let device = Default::default();
        let (theta, v) = futures::executor::block_on(outer_step_on::<burn::backend::NdArray>(
            &device,
            &params,
            &velocity,
            &contributions,
            &spec,
        ))
        .expect("aggregate");
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
        };
        assert!(close(&theta, &expected));
        assert!(close(&v, &outer.velocity));
        let bad = [c(1, vec![0.0; 3])];
        let err = futures::executor::block_on(outer_step_on::<burn::backend::NdArray>(
            &device, &params, &velocity, &bad, &spec,
        ));
        assert_eq!(
            err,
            Err(AggregateError::Shape {
                expected: n,
                got: 3
            })
        );
    }
}
