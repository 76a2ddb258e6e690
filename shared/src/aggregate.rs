//! Aggregation of pseudo-gradients. Contributions are taken in peer-key order, so the result
//! does not depend on arrival order.

use crate::crypto::PeerKey;

/// One accepted, decoded pseudo-gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    pub peer: PeerKey,
    pub n_samples: u32,
    pub delta: Vec<f32>,
}

/// The coordinate-wise mean, summed in peer order (bitwise independent of arrival order).
/// Returns `None` for no contributions or mismatched lengths.
pub fn mean(contributions: &[Contribution]) -> Option<Vec<f32>> {
    let mut sorted: Vec<&Contribution> = contributions.iter().collect();
    sorted.sort_by_key(|c| c.peer);
    let n = sorted.first()?.delta.len();
    if sorted.iter().any(|c| c.delta.len() != n) {
        return None;
    }
    let mut sum = vec![0.0f32; n];
    for c in &sorted {
        for (s, d) in sum.iter_mut().zip(&c.delta) {
            *s += d;
        }
    }
    let scale = 1.0 / sorted.len() as f32;
    sum.iter_mut().for_each(|s| *s *= scale);
    Some(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u8, delta: Vec<f32>) -> Contribution {
        Contribution { peer: PeerKey([id; 32]), n_samples: 1, delta }
    }

    #[test]
    fn mean_is_order_independent() {
        let a = vec![c(1, vec![1.0, 0.1]), c(2, vec![3.0, 0.2]), c(3, vec![-1.0, 0.7])];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(mean(&a), mean(&b));
        let m = mean(&a).expect("mean");
        assert!((m[0] - 1.0).abs() < 1e-6 && (m[1] - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(mean(&[]), None);
        assert_eq!(mean(&[c(1, vec![1.0]), c(2, vec![1.0, 2.0])]), None);
    }
}
