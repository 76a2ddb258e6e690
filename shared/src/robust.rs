//! Byzantine-robust aggregation rules over flat pseudo-gradients.
//!
//! Every rule takes the contributions in peer-key order, so its result does not depend on the
//! order in which updates arrived. Wrongly sized or non-finite input is an error, never a
//! panic. Coordinate-wise rules split the coordinates across threads.

use crate::crypto::PeerKey;

/// One accepted, decoded pseudo-gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    pub peer: PeerKey,
    pub n_samples: u32,
    pub delta: Vec<f32>,
}

/// The contributions in peer order and their common length; `None` for none or mismatched
/// lengths. Summing in this order makes a result bitwise independent of arrival order.
pub fn in_peer_order(contributions: &[Contribution]) -> Option<(Vec<&Contribution>, usize)> {
    let mut sorted: Vec<&Contribution> = contributions.iter().collect();
    sorted.sort_by_key(|c| c.peer);
    let n = sorted.first()?.delta.len();
    sorted
        .iter()
        .all(|c| c.delta.len() == n)
        .then_some((sorted, n))
}

/// An aggregation rule and its parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Rule {
    /// The coordinate-wise mean, summed exactly ([`crate::exact`]): the same bits whatever the
    /// order or grouping of the updates.
    Mean,
    /// The coordinate-wise median.
    Median,
    /// The coordinate-wise mean after dropping the `trim` largest and `trim` smallest values.
    TrimmedMean { trim: u32 },
    /// Multi-Krum (Blanchard et al. 2017): average the `select` updates with the smallest sum of
    /// squared distances to their n − f − 2 nearest neighbours. `select = 1` is Krum.
    MultiKrum { byzantine: u32, select: u32 },
    /// The geometric median by Weiszfeld's algorithm (Pillutla et al. 2019, RFA).
    GeometricMedian { iterations: u32 },
    /// Centered clipping (Karimireddy et al. 2021) around `center`, usually the previous
    /// aggregate: v ← v + mean_i clip(x_i − v, τ), repeated.
    CenteredClipping { tau: f32, iterations: u32 },
    /// Bucketing (Karimireddy, He & Jaggi, "Byzantine-robust learning on heterogeneous datasets
    /// via bucketing", ICLR 2022) in front of `rule`: the round's n updates, in a random order
    /// seeded by the round ([`bucket_seed`]), are averaged in buckets of `size`, and `rule`
    /// aggregates the ⌈n/size⌉ bucket means. Averaging pulls the honest updates together
    /// (their spread shrinks by √size) while an attacker in a bucket still shifts only that
    /// bucket. It runs in the round engine ([`crate::round::RoundState::begin_close`]), before
    /// the contributions go to any backend, through [`bucket`]; `size = 1` is `rule` itself.
    Bucketed { size: u32, rule: Box<Rule> },
}

impl Rule {
    /// Why the rule's parameters cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Self::Bucketed { size: 0, .. } => Err("the bucket size must be at least 1".into()),
            Self::Bucketed { ref rule, .. } if matches!(**rule, Self::Bucketed { .. }) => {
                Err("bucketing is applied once, not nested".into())
            }
            Self::Bucketed { ref rule, .. } => rule.check(),
            Self::MultiKrum { select: 0, .. } => Err("multi-Krum must select at least 1".into()),
            Self::CenteredClipping { tau, .. } if !(tau.is_finite() && tau > 0.0) => {
                Err(format!("the clipping radius must be positive, not {tau}"))
            }
            Self::CenteredClipping { iterations: 0, .. }
            | Self::GeometricMedian { iterations: 0 } => {
                Err("the rule needs at least one iteration".into())
            }
            _ => Ok(()),
        }
    }

    /// The fewest updates the rule can aggregate: a round never closes with fewer.
    pub fn min_updates(&self) -> usize {
        match *self {
            Self::Mean | Self::Median | Self::GeometricMedian { .. } => 1,
            Self::CenteredClipping { .. } => 1,
            Self::TrimmedMean { trim } => 2 * trim as usize + 1,
            Self::MultiKrum { byzantine, select } => {
                (2 * byzantine as usize + 3).max(select as usize)
            }
            // The inner rule needs that many buckets: k buckets take (k − 1)·size + 1 updates.
            Self::Bucketed { size, ref rule } => {
                (rule.min_updates().max(1) - 1) * size.max(1) as usize + 1
            }
        }
    }

    /// The bucket size (1: no bucketing) and the rule that aggregates the buckets.
    pub fn bucketing(&self) -> (usize, &Rule) {
        match self {
            Self::Bucketed { size, rule } => (*size.max(&1) as usize, rule),
            other => (1, other),
        }
    }

    /// `rule` with bucketing in front when `size` is above 1 (`rule` itself otherwise).
    pub fn with_buckets(rule: Rule, size: u32) -> Rule {
        if size > 1 {
            Self::Bucketed {
                size,
                rule: Box::new(rule),
            }
        } else {
            rule
        }
    }
}

/// The seed of a round's bucket permutation: fixed by the run and the round, so a relay, a
/// simulator and the attack grid given the same round bucket the same way.
pub fn bucket_seed(run_id: &str, round: u64) -> u64 {
    crate::data::derive_seed("bucketing", &[run_id.as_bytes(), &round.to_le_bytes()])
}

/// Bucketing's pre-step: the contributions in peer order, shuffled by `seed` (Fisher–Yates),
/// averaged in consecutive buckets of `size` (the last may be smaller). Bucket i is returned as a
/// contribution from the key whose first 8 bytes are i (big-endian), so the rules keep the
/// buckets' order, with the bucket's total `n_samples`. Sizes and finiteness are checked as
/// every rule checks them; `size ≤ 1` returns the contributions unchanged (in peer order).
pub fn bucket(
    contributions: &[Contribution],
    n: usize,
    size: usize,
    seed: u64,
) -> Result<Vec<Contribution>, RobustError> {
    let sorted = validated(contributions, n)?;
    if size <= 1 {
        return Ok(sorted.into_iter().cloned().collect());
    }
    let mut order: Vec<&Contribution> = sorted;
    let mut rng = crate::data::SplitMix64::new(seed);
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    Ok(order
        .chunks(size)
        .enumerate()
        .map(|(i, members)| {
            let mut sum = vec![0.0f32; n];
            for c in members {
                sum.iter_mut().zip(&c.delta).for_each(|(s, v)| *s += v);
            }
            let scale = 1.0 / members.len() as f32;
            sum.iter_mut().for_each(|s| *s *= scale);
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_be_bytes());
            Contribution {
                peer: PeerKey(key),
                n_samples: members.iter().map(|c| c.n_samples).sum(),
                delta: sum,
            }
        })
        .collect())
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RobustError {
    #[error("no contributions")]
    Empty,
    #[error("contribution of {got} values, expected {expected}")]
    Shape { expected: usize, got: usize },
    #[error("contribution from {0} has NaN or infinite values")]
    NonFinite(String),
    #[error("rule needs more contributions: {0}")]
    TooFew(String),
    #[error("{0} contributions: the exact mean sums at most {max}", max = crate::exact::MAX_TERMS)]
    TooMany(usize),
    #[error("could not read the exact sums back from the device: {0}")]
    Readback(String),
    #[error(
        "bucketing is a pre-step: bucket the contributions (robust::bucket), then aggregate with the inner rule"
    )]
    Unbucketed,
}

/// Sorts by peer key and checks sizes; finiteness is checked inside the coordinate-wise kernels
/// (fused with their single pass over memory) and up front for the other rules.
fn checked(contributions: &[Contribution], n: usize) -> Result<Vec<&Contribution>, RobustError> {
    let mut sorted: Vec<&Contribution> = contributions.iter().collect();
    sorted.sort_by_key(|c| c.peer);
    if sorted.is_empty() {
        return Err(RobustError::Empty);
    }
    if let Some(c) = sorted.iter().find(|c| c.delta.len() != n) {
        return Err(RobustError::Shape {
            expected: n,
            got: c.delta.len(),
        });
    }
    Ok(sorted)
}

/// The error for a kernel that met a non-finite value: names the first offending peer.
fn non_finite(sorted: &[&Contribution]) -> RobustError {
    match sorted
        .iter()
        .find(|c| c.delta.iter().any(|v| !v.is_finite()))
    {
        Some(c) => RobustError::NonFinite(c.peer.short()),
        None => RobustError::NonFinite("the sum (overflow)".into()),
    }
}

/// Contributions in peer order, checked for size and finiteness: what every rule accepts.
pub fn validated(
    contributions: &[Contribution],
    n: usize,
) -> Result<Vec<&Contribution>, RobustError> {
    let sorted = checked(contributions, n)?;
    all_finite(&sorted)?;
    Ok(sorted)
}

/// `rule` on Burn tensors: `deltas` is `[peers, n]` in peer order (finite), `center` the
/// previous aggregate for centered clipping. The same rules as [`aggregate`], on any backend
/// (ndarray, wgpu, cuda). The mean sums exactly ([`crate::exact`]): its integer limbs add up on
/// the device and are read back once for the division, so it is bitwise the CPU's. The other
/// rules read nothing back; their sums run in f32 on the device, so they agree with the CPU
/// rules to rounding (bitwise for median and trimmed mean; Krum's choice can differ on exact
/// ties).
pub async fn aggregate_tensor<B: burn::prelude::Backend>(
    rule: &Rule,
    deltas: burn::prelude::Tensor<B, 2>,
    center: Option<burn::prelude::Tensor<B, 1>>,
) -> Result<burn::prelude::Tensor<B, 1>, RobustError> {
    use burn::prelude::*;
    let [m, n] = deltas.dims();
    if m == 0 {
        return Err(RobustError::Empty);
    }
    let mean_of = |t: Tensor<B, 2>| t.mean_dim(0).reshape([n]);
    // Rows added one after another in order, as the CPU kernels add them, and scaled by a
    // reciprocal (a product rounds the same everywhere; WGSL's division may not): the same
    // roundings, so median and trimmed mean are bitwise equal to [`aggregate`]'s.
    let row_sum = |t: &Tensor<B, 2>, from: usize, count: usize| {
        (from + 1..from + count).fold(t.clone().narrow(0, from, 1), |acc, r| {
            acc + t.clone().narrow(0, r, 1)
        })
    };
    let norms = |t: Tensor<B, 2>| t.powi_scalar(2).sum_dim(1).sqrt(); // [rows, 1]
    Ok(match *rule {
        Rule::Bucketed { .. } => return Err(RobustError::Unbucketed),
        Rule::Mean => {
            // The integer limbs of the exact sum add up on the device; one readback, and the
            // division on the host, as the CPU kernel does it (bitwise the same).
            if m > crate::exact::MAX_TERMS {
                return Err(RobustError::TooMany(m));
            }
            let device = deltas.device();
            let mut sums = Vec::with_capacity(crate::exact::LIMB_SHIFTS.len());
            for limb in crate::exact::limbs(deltas) {
                let data = limb
                    .sum_dim(0)
                    .into_data_async()
                    .await
                    .map_err(|e| RobustError::Readback(e.to_string()))?;
                sums.push(data.iter::<i64>().collect::<Vec<i64>>());
            }
            let mean: Vec<f32> = (0..n)
                .map(|j| {
                    let sum =
                        crate::exact::from_limbs([sums[0][j], sums[1][j], sums[2][j], sums[3][j]]);
                    crate::exact::mean_of(sum, m)
                })
                .collect();
            Tensor::from_data(TensorData::new(mean, [n]), &device)
        }
        Rule::Median => {
            let sorted = deltas.sort(0);
            if m % 2 == 1 {
                sorted.narrow(0, m / 2, 1).reshape([n])
            } else {
                row_sum(&sorted, m / 2 - 1, 2).mul_scalar(0.5).reshape([n])
            }
        }
        Rule::TrimmedMean { trim } => {
            let trim = trim as usize;
            if 2 * trim >= m {
                return Err(RobustError::TooFew(format!(
                    "trimming {trim} from each side of {m}"
                )));
            }
            let kept = m - 2 * trim;
            row_sum(&deltas.sort(0), trim, kept)
                .mul_scalar(1.0 / kept as f32)
                .reshape([n])
        }
        Rule::MultiKrum { byzantine, select } => {
            let (f, select) = (byzantine as usize, select as usize);
            if m < 2 * f + 3 || select == 0 || select > m {
                return Err(RobustError::TooFew(format!(
                    "multi-Krum with f = {f}, select {select} needs n ≥ 2f + 3; got {m}"
                )));
            }
            // ‖xᵢ − xⱼ‖² = ‖xᵢ‖² + ‖xⱼ‖² − 2 xᵢ·xⱼ
            let squared = deltas.clone().powi_scalar(2).sum_dim(1); // [m, 1]
            let gram = deltas.clone().matmul(deltas.clone().transpose()); // [m, m]
            let distances = squared.clone() + squared.transpose() - gram.mul_scalar(2.0);
            // Each row's smallest is the point itself (≈ 0): skip it, sum the next m − f − 2.
            let scores = distances
                .sort(1)
                .narrow(1, 1, m - f - 2)
                .sum_dim(1)
                .reshape([m]);
            let chosen = scores.argsort(0).narrow(0, 0, select);
            mean_of(deltas.select(0, chosen))
        }
        Rule::GeometricMedian { iterations } => {
            let mut z = mean_of(deltas.clone());
            for _ in 0..iterations {
                let weights = norms(deltas.clone() - z.clone().reshape([1, n]))
                    .clamp_min(1e-8)
                    .recip(); // [m, 1]
                let total = weights.clone().sum(); // [1]
                z = (deltas.clone() * weights).sum_dim(0).reshape([n]) / total;
            }
            z
        }
        Rule::CenteredClipping { tau, iterations } => {
            let mut v = center.unwrap_or_else(|| Tensor::zeros([n], &deltas.device()));
            for _ in 0..iterations.max(1) {
                let diff = deltas.clone() - v.clone().reshape([1, n]);
                let scale = norms(diff.clone())
                    .clamp_min(1e-30)
                    .recip()
                    .mul_scalar(tau)
                    .clamp_max(1.0); // [m, 1]
                v = v + mean_of(diff * scale);
            }
            v
        }
    })
}

fn all_finite(sorted: &[&Contribution]) -> Result<(), RobustError> {
    if sorted.iter().all(|c| c.delta.iter().all(|v| v.is_finite())) {
        Ok(())
    } else {
        Err(non_finite(sorted))
    }
}

/// Aggregates `contributions` (each of `n` values) with `rule`. `center` is the reference
/// point of centered clipping (the previous aggregate; zeros when there is none).
pub fn aggregate(
    rule: &Rule,
    contributions: &[Contribution],
    n: usize,
    center: Option<&[f32]>,
) -> Result<Vec<f32>, RobustError> {
    let sorted = checked(contributions, n)?;
    let rows: Vec<&[f32]> = sorted.iter().map(|c| c.delta.as_slice()).collect();
    let fused = |result: Option<Vec<f32>>| result.ok_or_else(|| non_finite(&sorted));
    if !matches!(rule, Rule::Mean | Rule::Median | Rule::TrimmedMean { .. }) {
        all_finite(&sorted)?;
    }
    match *rule {
        Rule::Bucketed { .. } => Err(RobustError::Unbucketed),
        Rule::Mean if rows.len() > crate::exact::MAX_TERMS => Err(RobustError::TooMany(rows.len())),
        Rule::Mean => fused(mean(&rows, n)),
        Rule::Median => {
            // Only the middle rank (or the middle two, as a pair) is read.
            let m = rows.len();
            let network = selection_network(m, |rank| {
                usize::from(rank == m / 2 || (m.is_multiple_of(2) && rank + 1 == m / 2))
            });
            fused(sorted_columns(&rows, n, &network, |sorted, out| {
                let m = sorted.len();
                for (l, o) in out.iter_mut().enumerate() {
                    *o = if m % 2 == 1 {
                        sorted[m / 2][l]
                    } else {
                        0.5 * (sorted[m / 2 - 1][l] + sorted[m / 2][l])
                    };
                }
            }))
        }
        Rule::TrimmedMean { trim } => {
            let trim = trim as usize;
            if 2 * trim >= rows.len() {
                return Err(RobustError::TooFew(format!(
                    "trimming {trim} from each side of {}",
                    rows.len()
                )));
            }
            let scale = 1.0 / (rows.len() - 2 * trim) as f32;
            // Every kept rank holds exactly its value, so the sum runs in ascending order, as
            // the tensor path sums the sorted rows: the same roundings on every backend.
            let m = rows.len();
            let network = selection_network(m, |rank| {
                if rank >= trim && rank < m - trim {
                    rank + 1
                } else {
                    0
                }
            });
            fused(sorted_columns(&rows, n, &network, |sorted, out| {
                let mut sum = sorted[trim];
                for lanes in &sorted[trim + 1..sorted.len() - trim] {
                    sum.iter_mut().zip(lanes).for_each(|(s, v)| *s += v);
                }
                out.iter_mut().zip(sum).for_each(|(o, s)| *o = s * scale);
            }))
        }
        Rule::MultiKrum { byzantine, select } => {
            multi_krum(&rows, n, byzantine as usize, select as usize)
        }
        Rule::GeometricMedian { iterations } => Ok(geometric_median(&rows, n, iterations)),
        Rule::CenteredClipping { tau, iterations } => {
            let zeros;
            let center = match center {
                Some(c) if c.len() == n => c,
                Some(c) => {
                    return Err(RobustError::Shape {
                        expected: n,
                        got: c.len(),
                    });
                }
                None => {
                    zeros = vec![0.0; n];
                    &zeros
                }
            };
            Ok(centered_clipping(&rows, center, tau, iterations))
        }
    }
}

/// [`aggregate`] for any rule, bucketed ones included: with [`Rule::Bucketed`], the
/// contributions are bucketed with `seed` ([`bucket`]) and the inner rule aggregates the buckets.
pub fn aggregate_with_buckets(
    rule: &Rule,
    contributions: &[Contribution],
    n: usize,
    center: Option<&[f32]>,
    seed: u64,
) -> Result<Vec<f32>, RobustError> {
    match rule.bucketing() {
        (1, inner) => aggregate(inner, contributions, n, center),
        (size, inner) => aggregate(inner, &bucket(contributions, n, size, seed)?, n, center),
    }
}

fn threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16)
}

/// Coordinates per part in [`for_each_chunk`]: small enough that a core slowed by another
/// process hands its share of the work to the others, large enough that claiming a part costs
/// nothing next to reducing it.
const PART: usize = 1 << 16;

/// The part size for `n` coordinates: [`PART`], or less so that every thread gets work, and a
/// multiple of `align`.
fn part_size(n: usize, align: usize) -> usize {
    PART.min(n.div_ceil(threads()))
        .max(4096)
        .next_multiple_of(align)
}

/// Runs `work(index, part)` on every `chunk`-sized part of `out` and says whether every part
/// returned true. All threads, this one included, claim parts until none are left, so a thread
/// that the OS pauses delays the result by one part, not by its whole share.
fn for_each_chunk(
    out: &mut [f32],
    chunk: usize,
    work: impl Fn(usize, &mut [f32]) -> bool + Sync,
) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    let parts = std::sync::Mutex::new(out.chunks_mut(chunk).enumerate());
    let all_ok = AtomicBool::new(true);
    let worker = || {
        loop {
            let next = parts.lock().unwrap_or_else(|e| e.into_inner()).next();
            let Some((i, part)) = next else { break };
            if !work(i, part) {
                all_ok.store(false, Ordering::Relaxed);
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads() {
            s.spawn(worker);
        }
        worker();
    });
    all_ok.into_inner()
}

/// Coordinates summed together in [`mean`].
const TILE: usize = 2048;

/// The coordinate-wise mean in one pass over the rows, summed exactly on the fixed-point grid
/// of [`crate::exact`] (so bitwise independent of the order and grouping of the rows), or
/// `None` if a value was not finite.
fn mean(rows: &[&[f32]], n: usize) -> Option<Vec<f32>> {
    let m = rows.len();
    let mut out = vec![0.0f32; n];
    let chunk = part_size(n, TILE);
    let finite = for_each_chunk(&mut out, chunk, |i, part| {
        let mut check = [0.0f32; TILE];
        // Tiles keep the accumulator (16 KiB) in L1 while the rows stream past once.
        for (t, tile) in part.chunks_mut(TILE).enumerate() {
            let start = i * chunk + t * TILE;
            let mut acc = [0i64; TILE];
            let acc = &mut acc[..tile.len()];
            for row in rows {
                acc.iter_mut()
                    .zip(check.iter_mut())
                    .zip(&row[start..start + tile.len()])
                    .for_each(|((a, c), v)| {
                        *a += crate::exact::fixed(*v);
                        // x·0 is 0 for finite x and NaN otherwise: a branch-free check.
                        *c += v * 0.0;
                    });
            }
            tile.iter_mut()
                .zip(acc.iter())
                .for_each(|(o, a)| *o = crate::exact::mean_of(*a, m));
        }
        check.iter().all(|c| *c == 0.0)
    });
    finite.then_some(out)
}

/// Coordinates processed together: one sorting network runs on all lanes at once, so each
/// compare-exchange is a few vector mins and maxes. 32 lanes (a 2 KiB block for 16 peers, in L1)
/// measured 24% faster than 16 for the trimmed mean of 16 × 1M; 64 was slower.
const LANES: usize = 32;

/// Green's 60-comparator network for 16 inputs (depth 10; Knuth, TAOCP vol. 3, §5.3.4), by
/// layer. Batcher's needs 63. The trimmed mean of 16 needs every kept rank exact (it sums them
/// in ascending order), which keeps all 60. Checked by the 0–1 principle in the tests.
const GREEN_16: [(usize, usize); 60] = [
    (0, 13),
    (1, 12),
    (2, 15),
    (3, 14),
    (4, 8),
    (5, 6),
    (7, 11),
    (9, 10),
    (0, 5),
    (1, 7),
    (2, 9),
    (3, 4),
    (6, 13),
    (8, 14),
    (10, 15),
    (11, 12),
    (0, 1),
    (2, 3),
    (4, 5),
    (6, 8),
    (7, 9),
    (10, 11),
    (12, 13),
    (14, 15),
    (0, 2),
    (1, 3),
    (4, 10),
    (5, 11),
    (6, 7),
    (8, 9),
    (12, 14),
    (13, 15),
    (1, 2),
    (3, 12),
    (4, 6),
    (5, 7),
    (8, 10),
    (9, 11),
    (13, 14),
    (1, 4),
    (2, 6),
    (5, 8),
    (7, 10),
    (9, 13),
    (11, 14),
    (2, 4),
    (3, 6),
    (9, 12),
    (11, 13),
    (3, 5),
    (6, 8),
    (7, 9),
    (10, 12),
    (3, 4),
    (5, 6),
    (7, 8),
    (9, 10),
    (11, 12),
    (6, 7),
    (8, 9),
];

/// A sorting network for `m` inputs: compare-exchange pairs (i < j). Green's for 16 inputs;
/// otherwise Batcher's odd–even merge sort, built for the next power of two, with pairs touching
/// padding (index ≥ m, conceptually +∞) dropped, which keeps it a valid sorting network for `m`.
#[cfg(test)]
fn sorting_network(m: usize) -> Vec<(usize, usize)> {
    if m == 16 {
        GREEN_16.to_vec()
    } else {
        batcher_network(m)
    }
}

/// The shortest network, of those known here, after which the outputs are as `kind` asks (see
/// [`selection`]).
fn selection_network(m: usize, kind: impl Fn(usize) -> usize + Copy) -> Vec<(usize, usize)> {
    let batcher = selection(&batcher_network(m), kind);
    if m != 16 {
        return batcher;
    }
    let green = selection(&GREEN_16, kind);
    if green.len() < batcher.len() {
        green
    } else {
        batcher
    }
}

fn batcher_network(m: usize) -> Vec<(usize, usize)> {
    let size = m.next_power_of_two();
    let mut pairs = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            for j in (k % p..size - k).step_by(2 * k) {
                for i in 0..k.min(size - j - k) {
                    if (i + j) / (2 * p) == (i + j + k) / (2 * p) && i + j + k < m {
                        pairs.push((i + j, i + j + k));
                    }
                }
            }
            k /= 2;
        }
        p *= 2;
    }
    pairs
}

/// The comparators of the sorting `network` needed so that every output holds what `kind` asks
/// of its rank: 0, nothing (it is not read); any other kind, one of the values of the ranks of
/// that kind, as a set (a kind of its own: exactly that rank's value). Walking back from the
/// outputs, a comparator is dropped if both its wires then run untouched to outputs of the same
/// kind (a swap between them changes no set), or if neither of its results is read later.
/// (Computing only the read side of the rest measured no faster: the branch costs what the
/// saved min or max does.)
fn selection(network: &[(usize, usize)], kind: impl Fn(usize) -> usize) -> Vec<(usize, usize)> {
    let wires = network.iter().map(|&(_, j)| j + 1).max().unwrap_or(0);
    // Per wire: the kind of output it runs to untouched (None once a later comparator reads it),
    // and whether its value is read at all.
    let mut tail: Vec<Option<usize>> = (0..wires).map(|w| Some(kind(w))).collect();
    let mut read: Vec<bool> = (0..wires).map(|w| kind(w) != 0).collect();
    let mut kept = Vec::new();
    for &(i, j) in network.iter().rev() {
        if (tail[i].is_some() && tail[i] == tail[j]) || !(read[i] || read[j]) {
            continue;
        }
        kept.push((i, j));
        tail[i] = None;
        tail[j] = None;
        read[i] = true;
        read[j] = true;
    }
    kept.reverse();
    kept
}

/// Values staged per superblock in [`sorted_columns`] (128 KiB, in L2), over all rows.
const STAGED: usize = 1 << 15;

/// Sorts each coordinate's values across peers, `LANES` coordinates at a time with a sorting
/// network, and lets `reduce` turn the sorted block (`sorted[rank][lane]`) into up to `LANES`
/// outputs. Parts run in parallel. Each part first stages a superblock (up to 2,048 coordinates
/// of every row, side by side), so that every row is read in runs of kilobytes that the hardware
/// prefetchers follow; reading 32 coordinates of each row straight into a block took the
/// trimmed mean of 16 × 1M from about 14 to about 21 ms.
fn sorted_columns(
    rows: &[&[f32]],
    n: usize,
    network: &[(usize, usize)],
    reduce: impl Fn(&[[f32; LANES]], &mut [f32]) + Sync,
) -> Option<Vec<f32>> {
    let m = rows.len();
    let mut out = vec![0.0f32; n];
    let span = (STAGED / m.max(1)).clamp(LANES, 2048) / LANES * LANES;
    let chunk = part_size(n, span);
    let finite = for_each_chunk(&mut out, chunk, |c, part| {
        let mut staged = vec![0.0f32; m * span];
        let mut block = vec![[0.0f32; LANES]; m];
        // Per lane, so that the check vectorizes instead of forming one long chain of adds.
        let mut check = [0.0f32; LANES];
        for (q, outs) in part.chunks_mut(span).enumerate() {
            let start = c * chunk + q * span;
            let len = outs.len();
            for (r, row) in rows.iter().enumerate() {
                let dst = &mut staged[r * span..r * span + len];
                dst.copy_from_slice(&row[start..start + len]);
                // The network would misplace a NaN and trim an infinity away: check while the
                // values are hot. A sum is non-finite if any term is (one add per value); a
                // finite sum that overflowed is told apart below.
                for lanes in dst.chunks(LANES) {
                    check.iter_mut().zip(lanes).for_each(|(c, v)| *c += v);
                }
            }
            for (b, outs) in outs.chunks_mut(LANES).enumerate() {
                let lanes = outs.len();
                for (r, lane_values) in block.iter_mut().enumerate() {
                    let from = r * span + b * LANES;
                    lane_values[..lanes].copy_from_slice(&staged[from..from + lanes]);
                }
                for &(i, j) in network {
                    let (lo, hi) = block.split_at_mut(j);
                    let (a, b) = (&mut lo[i], &mut hi[0]);
                    // Plain comparisons, not f32::min/max: the values were checked finite above,
                    // so the NaN handling of min/max (three more instructions per vector on x86)
                    // buys nothing here. Whole arrays, so that both picks vectorize to one
                    // minps/maxps each.
                    let (x, y) = (*a, *b);
                    *a = std::array::from_fn(|l| if y[l] < x[l] { y[l] } else { x[l] });
                    *b = std::array::from_fn(|l| if y[l] < x[l] { x[l] } else { y[l] });
                }
                let mut result = [0.0f32; LANES];
                reduce(&block, &mut result);
                outs.copy_from_slice(&result[..lanes]);
            }
        }
        let range = c * chunk..c * chunk + part.len();
        check.iter().all(|c| c.is_finite())
            || rows
                .iter()
                .all(|r| r[range.clone()].iter().all(|v| v.is_finite()))
    });
    finite.then_some(out)
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y) * f64::from(x - y))
        .sum()
}

fn multi_krum(rows: &[&[f32]], n: usize, f: usize, m: usize) -> Result<Vec<f32>, RobustError> {
    let count = rows.len();
    if count < 2 * f + 3 || m == 0 || m > count {
        return Err(RobustError::TooFew(format!(
            "Krum with f = {f}, m = {m} needs n ≥ 2f + 3, got {count}"
        )));
    }
    let mut distances = vec![0.0f64; count * count];
    for i in 0..count {
        for j in i + 1..count {
            let d = squared_distance(rows[i], rows[j]);
            distances[i * count + j] = d;
            distances[j * count + i] = d;
        }
    }
    let neighbours = count - f - 2;
    let mut scores: Vec<(f64, usize)> = (0..count)
        .map(|i| {
            let mut row: Vec<f64> = (0..count)
                .filter(|&j| j != i)
                .map(|j| distances[i * count + j])
                .collect();
            row.sort_unstable_by(f64::total_cmp);
            (row[..neighbours].iter().sum(), i)
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let chosen: Vec<&[f32]> = scores[..m].iter().map(|&(_, i)| rows[i]).collect();
    mean(&chosen, n).ok_or_else(|| RobustError::NonFinite("the sum (overflow)".into()))
}

/// Σ wᵢ·rowᵢ / Σ wᵢ, accumulated in f64.
fn weighted_mean(rows: &[&[f32]], weights: &[f64], n: usize) -> Vec<f32> {
    let total: f64 = weights.iter().sum();
    let mut sum = vec![0.0f64; n];
    for (row, w) in rows.iter().zip(weights) {
        for (acc, v) in sum.iter_mut().zip(row.iter()) {
            *acc += w * f64::from(*v);
        }
    }
    sum.into_iter().map(|v| (v / total) as f32).collect()
}

fn geometric_median(rows: &[&[f32]], n: usize, iterations: u32) -> Vec<f32> {
    // Start from the plain mean (in f64: finite inputs never overflow it; not the exact mean,
    // which clamps what an attacker makes huge).
    let mut z = weighted_mean(rows, &vec![1.0; rows.len()], n);
    for _ in 0..iterations {
        let weights: Vec<f64> = rows
            .iter()
            .map(|r| 1.0 / squared_distance(r, &z).sqrt().max(1e-8))
            .collect();
        z = weighted_mean(rows, &weights, n);
    }
    z
}

fn centered_clipping(rows: &[&[f32]], center: &[f32], tau: f32, iterations: u32) -> Vec<f32> {
    let mut v = center.to_vec();
    let scale = 1.0 / rows.len() as f64;
    for _ in 0..iterations.max(1) {
        let mut step = vec![0.0f64; v.len()];
        for row in rows {
            let norm = squared_distance(row, &v).sqrt();
            let clip = if norm > f64::from(tau) {
                f64::from(tau) / norm
            } else {
                1.0
            };
            for ((s, x), c) in step.iter_mut().zip(row.iter()).zip(&v) {
                *s += f64::from(x - c) * clip * scale;
            }
        }
        for (c, s) in v.iter_mut().zip(step) {
            *c += s as f32;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PeerKey;
    use crate::data::SplitMix64;

    fn gaussian(rng: &mut SplitMix64) -> f32 {
        // Irwin–Hall approximation: good enough for test data.
        (0..12)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
            .sum::<f32>()
            - 6.0
    }

    fn honest(count: usize, n: usize, seed: u64) -> (Vec<f32>, Vec<Contribution>) {
        let mut rng = SplitMix64::new(seed);
        let truth: Vec<f32> = (0..n).map(|_| gaussian(&mut rng)).collect();
        let contributions = (0..count)
            .map(|p| Contribution {
                peer: PeerKey([p as u8; 32]),
                n_samples: 1,
                delta: truth.iter().map(|t| t + 0.1 * gaussian(&mut rng)).collect(),
            })
            .collect();
        (truth, contributions)
    }

    fn rules() -> Vec<Rule> {
        vec![
            Rule::Median,
            Rule::TrimmedMean { trim: 6 },
            Rule::MultiKrum {
                byzantine: 6,
                select: 4,
            },
            Rule::GeometricMedian { iterations: 8 },
            Rule::CenteredClipping {
                tau: 10.0,
                iterations: 5,
            },
        ]
    }

    fn distance(a: &[f32], b: &[f32]) -> f32 {
        squared_distance(a, b).sqrt() as f32
    }

    #[test]
    fn every_rule_is_independent_of_input_order() {
        let (_, mut contributions) = honest(9, 300, 1);
        for rule in [Rule::Mean].into_iter().chain(rules()) {
            let rule = match rule {
                Rule::TrimmedMean { .. } => Rule::TrimmedMean { trim: 2 },
                Rule::MultiKrum { .. } => Rule::MultiKrum {
                    byzantine: 2,
                    select: 3,
                },
                r => r,
            };
            let a = aggregate(&rule, &contributions, 300, None).expect("aggregate");
            contributions.reverse();
            let b = aggregate(&rule, &contributions, 300, None).expect("aggregate");
            assert_eq!(a, b, "{rule:?}");
        }
    }

    /// Runs a comparator network on one column.
    fn select<T: PartialOrd + Copy>(network: &[(usize, usize)], v: &mut [T]) {
        for &(i, j) in network {
            if v[j] < v[i] {
                v.swap(i, j);
            }
        }
    }

    #[test]
    fn selection_networks_put_the_used_ranks_in_place_as_a_set() {
        let mut rng = SplitMix64::new(5);
        for m in 1..=30usize {
            let mut cases: Vec<(usize, usize)> = (1..m.div_ceil(2))
                .filter(|t| 2 * t < m)
                .map(|t| (t, m - t))
                .collect();
            cases.push(((m - 1) / 2, m / 2 + 1)); // the median (pair)
            for (from, to) in cases {
                let network = selection_network(m, |r| usize::from((from..to).contains(&r)));
                assert!(network.len() <= sorting_network(m).len());
                for _ in 0..30 {
                    let mut v: Vec<f32> = (0..m).map(|_| (rng.next_u64() % 9) as f32).collect();
                    let mut sorted = v.clone();
                    sorted.sort_by(f32::total_cmp);
                    select(&network, &mut v);
                    let mut kept = v[from..to].to_vec();
                    kept.sort_by(f32::total_cmp);
                    assert_eq!(kept, sorted[from..to], "m {m} ranks {from}..{to}");
                }
            }
        }
    }

    #[test]
    fn green_16_and_its_selections_are_right_on_every_0_1_input() {
        // The 0–1 principle: a comparator network that sorts (or selects) every 0–1 input does so
        // for every input. A selection holds its ranks as a set: the count of ones there is checked.
        let full = GREEN_16.to_vec();
        // The trimmed mean's kept ranks each hold exactly their value (it sums them in order).
        let trimmed = selection_network(16, |r| if (3..13).contains(&r) { r + 1 } else { 0 });
        let median = selection_network(16, |r| usize::from(r == 7 || r == 8));
        // Ten exact ranks keep all of Green's 60 comparators (as a set they needed 42, but then
        // the sum's order, and so its rounding, depended on the network); the median pair, as a
        // set, needs 52 (of Batcher's network, which then is the shorter; rank-exact, 54).
        assert_eq!((trimmed.len(), median.len()), (60, 52));
        for bits in 0..1u32 << 16 {
            let ones = bits.count_ones() as usize;
            let sorted: Vec<u32> = (0..16).map(|r| u32::from(r >= 16 - ones)).collect();
            let input: Vec<u32> = (0..16).map(|b| (bits >> b) & 1).collect();
            let mut v = input.clone();
            select(&full, &mut v);
            assert_eq!(v, sorted);
            let mut v = input.clone();
            select(&trimmed, &mut v);
            assert_eq!(v[3..13], sorted[3..13]);
            let mut v = input.clone();
            select(&median, &mut v);
            let count = |s: &[u32]| s.iter().sum::<u32>();
            assert_eq!(count(&v[7..9]), count(&sorted[7..9]));
        }
    }

    #[test]
    fn median_and_trimmed_mean_match_a_sort_per_coordinate_at_any_size() {
        // Sizes around the kernel's blocks (32 lanes), superblocks (up to 2,048) and parts.
        let mut rng = SplitMix64::new(11);
        for (m, n) in [
            (1, 5),
            (2, 33),
            (3, 2049),
            (7, 4097),
            (16, 70_001),
            (16, 2048),
            (19, 3000),
            (40, 1000),
            (64, 777),
        ] {
            let rows: Vec<Contribution> = (0..m)
                .map(|p| Contribution {
                    peer: PeerKey([p as u8; 32]),
                    n_samples: 1,
                    delta: (0..n)
                        .map(|_| ((rng.next_u64() % 2001) as f32 - 1000.0) / 8.0)
                        .collect(),
                })
                .collect();
            let trim = (m - 1) / 3;
            let median = aggregate(&Rule::Median, &rows, n, None).expect("median");
            let trimmed = aggregate(&Rule::TrimmedMean { trim: trim as u32 }, &rows, n, None)
                .expect("trimmed mean");
            for i in 0..n {
                let mut column: Vec<f32> = rows.iter().map(|r| r.delta[i]).collect();
                column.sort_by(f32::total_cmp);
                let expected = if m % 2 == 1 {
                    column[m / 2]
                } else {
                    0.5 * (column[m / 2 - 1] + column[m / 2])
                };
                assert_eq!(median[i], expected, "median, m {m} n {n} at {i}");
                let kept = &column[trim..m - trim];
                let expected = kept.iter().sum::<f32>() / kept.len() as f32;
                assert!(
                    (trimmed[i] - expected).abs() <= 1e-3,
                    "trimmed mean, m {m} n {n} at {i}: {} vs {expected}",
                    trimmed[i]
                );
            }
        }
    }

    #[test]
    fn overflowing_but_finite_values_are_not_taken_for_non_finite_ones() {
        let c = |p: u8, v: f32| Contribution {
            peer: PeerKey([p; 32]),
            n_samples: 1,
            delta: vec![v; 100],
        };
        let big: Vec<Contribution> = (0..5).map(|p| c(p, f32::MAX)).collect();
        assert_eq!(
            aggregate(&Rule::Median, &big, 100, None).expect("median"),
            vec![f32::MAX; 100]
        );
        assert_eq!(
            aggregate(&Rule::TrimmedMean { trim: 1 }, &big[..3], 100, None).expect("trimmed"),
            vec![f32::MAX; 100]
        );
        let mut with_inf = big.clone();
        with_inf[2].delta[57] = f32::INFINITY;
        assert!(matches!(
            aggregate(&Rule::TrimmedMean { trim: 1 }, &with_inf, 100, None),
            Err(RobustError::NonFinite(_))
        ));
    }

    #[test]
    fn sorting_networks_sort_every_small_size() {
        let mut rng = SplitMix64::new(9);
        for m in 1..=40 {
            let network = sorting_network(m);
            for _ in 0..50 {
                let mut v: Vec<f32> = (0..m).map(|_| (rng.next_u64() % 7) as f32).collect();
                for &(i, j) in &network {
                    if v[i] > v[j] {
                        v.swap(i, j);
                    }
                }
                assert!(v.windows(2).all(|w| w[0] <= w[1]), "m = {m}: {v:?}");
            }
        }
    }

    #[test]
    fn median_and_trimmed_mean_match_hand_computed_values() {
        let c = |p: u8, v: Vec<f32>| Contribution {
            peer: PeerKey([p; 32]),
            n_samples: 1,
            delta: v,
        };
        let five = vec![
            c(1, vec![1.0, -4.0]),
            c(2, vec![5.0, 0.0]),
            c(3, vec![2.0, 3.0]),
            c(4, vec![100.0, 1.0]),
            c(5, vec![3.0, 2.0]),
        ];
        assert_eq!(
            aggregate(&Rule::Median, &five, 2, None).expect("median"),
            vec![3.0, 1.0]
        );
        assert_eq!(
            aggregate(&Rule::TrimmedMean { trim: 1 }, &five, 2, None).expect("trimmed"),
            // (2 + 3) + 5 in ascending order, times the reciprocal of 3 (as on every backend).
            vec![10.0 * (1.0f32 / 3.0), 1.0]
        );
        let four = &five[..4];
        assert_eq!(
            aggregate(&Rule::Median, four, 2, None).expect("median"),
            vec![3.5, 0.5]
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let (_, contributions) = honest(5, 10, 2);
        assert_eq!(
            aggregate(&Rule::Median, &[], 10, None),
            Err(RobustError::Empty)
        );
        assert!(matches!(
            aggregate(&Rule::Median, &contributions, 11, None),
            Err(RobustError::Shape { .. })
        ));
        assert!(matches!(
            aggregate(&Rule::TrimmedMean { trim: 3 }, &contributions, 10, None),
            Err(RobustError::TooFew(_))
        ));
        assert!(matches!(
            aggregate(
                &Rule::MultiKrum {
                    byzantine: 2,
                    select: 1
                },
                &contributions,
                10,
                None
            ),
            Err(RobustError::TooFew(_))
        ));
        // Every rule refuses NaN and ±∞ wherever they sit (the fused kernels check in-pass),
        // and names the peer that sent them.
        let n = 5000;
        let (_, clean) = honest(20, n, 4);
        let mut all_rules = rules();
        all_rules.push(Rule::Mean);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for position in [0, 17, 4095, 4096, n - 1] {
                let mut contributions = clean.clone();
                contributions[3].delta[position] = bad;
                let expected = RobustError::NonFinite(contributions[3].peer.short());
                for rule in &all_rules {
                    assert_eq!(
                        aggregate(rule, &contributions, n, None),
                        Err(expected.clone()),
                        "{rule:?} {bad} at {position}"
                    );
                }
            }
        }
        // Finite values whose f32 sum would overflow: the exact mean counts each as ±LIMIT.
        let mut huge = clean.clone();
        huge.iter_mut().for_each(|c| c.delta[9] = f32::MAX);
        let mean = aggregate(&Rule::Mean, &huge, n, None).expect("finite");
        assert_eq!(mean[9], crate::exact::LIMIT);
    }

    /// The tensor rules (any Burn backend; ndarray here, wgpu and CUDA in the relay's backend
    /// test) agree with the CPU rules, under attack too, and for odd and even peer counts.
    #[test]
    fn tensor_rules_match_the_cpu_rules() {
        use burn::backend::NdArray;
        use burn::prelude::*;
        let device = Default::default();
        let n = 3000;
        for count in [19usize, 20] {
            let (truth, mut contributions) = honest(count, n, 9);
            for c in contributions.iter_mut().take(5) {
                c.delta.iter_mut().for_each(|v| *v *= -1000.0);
            }
            let center: Vec<f32> = truth.iter().map(|t| 0.9 * t).collect();
            let mut all = rules();
            all.push(Rule::Mean);
            all.push(Rule::MultiKrum {
                byzantine: 5,
                select: 1,
            });
            for rule in all {
                let cpu = aggregate(&rule, &contributions, n, Some(&center)).expect("cpu");
                let sorted = validated(&contributions, n).expect("valid");
                let rows: Vec<f32> = sorted
                    .iter()
                    .flat_map(|c| c.delta.iter().copied())
                    .collect();
                let deltas =
                    Tensor::<NdArray, 2>::from_data(TensorData::new(rows, [count, n]), &device);
                let center =
                    Tensor::<NdArray, 1>::from_data(TensorData::new(center.clone(), [n]), &device);
                let gpu =
                    futures::executor::block_on(aggregate_tensor(&rule, deltas, Some(center)))
                        .expect("tensor")
                        .into_data()
                        .to_vec::<f32>()
                        .expect("f32");
                let scale = cpu.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1.0);
                let worst = cpu
                    .iter()
                    .zip(&gpu)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    worst <= 1e-4 * scale,
                    "{rule:?} with {count} peers: max |Δ| {worst} (scale {scale})"
                );
            }
        }
        let empty = Tensor::<NdArray, 2>::zeros([0, 4], &device);
        assert_eq!(
            futures::executor::block_on(aggregate_tensor(&Rule::Median, empty, None)).err(),
            Some(RobustError::Empty)
        );
    }

    /// 30% of 20 peers flip their sign ×1000: every robust rule stays near the honest mean,
    /// the plain mean does not.
    #[test]
    fn thirty_percent_sign_flip_attackers_are_shrugged_off() {
        let n = 2000;
        let (truth, mut contributions) = honest(20, n, 3);
        for c in contributions.iter_mut().take(6) {
            c.delta.iter_mut().for_each(|v| *v *= -1000.0);
        }
        let honest_mean = aggregate(&Rule::Mean, &contributions[6..], n, None).expect("mean");
        let scale = distance(&truth, &vec![0.0; n]);
        let plain = aggregate(&Rule::Mean, &contributions, n, None).expect("mean");
        assert!(
            distance(&plain, &honest_mean) > 100.0 * scale,
            "the plain mean is dragged away"
        );
        // Centered clipping starts from the previous round's aggregate: near, not at, the truth.
        let previous: Vec<f32> = truth.iter().map(|t| 0.9 * t).collect();
        for rule in rules() {
            let robust = aggregate(&rule, &contributions, n, Some(&previous)).expect("aggregate");
            let error = distance(&robust, &honest_mean);
            assert!(
                error < 0.5 * scale,
                "{rule:?}: distance {error} vs scale {scale}"
            );
        }
    }

    #[test]
    fn bucketing_of_one_is_the_rule_itself_and_deterministic_per_seed() {
        let n = 300;
        let (_, contributions) = honest(20, n, 5);
        let previous = vec![0.1f32; n];
        for rule in [Rule::Mean].into_iter().chain(rules()) {
            let plain = aggregate(&rule, &contributions, n, Some(&previous)).expect("rule");
            assert_eq!(Rule::with_buckets(rule.clone(), 1), rule);
            let one = Rule::Bucketed {
                size: 1,
                rule: Box::new(rule.clone()),
            };
            assert_eq!(
                aggregate_with_buckets(&one, &contributions, n, Some(&previous), 7),
                Ok(plain)
            );
        }
        // The buckets are means of a permutation: the same seed gives the same buckets, their
        // sizes are 2, 2, 2, 2, 1 and they hold every update once (equal sizes: same mean).
        let nine = &contributions[..9];
        let a = bucket(nine, n, 2, 11).expect("buckets");
        assert_eq!(a, bucket(nine, n, 2, 11).expect("buckets"));
        assert_ne!(a, bucket(nine, n, 2, 12).expect("buckets"));
        assert_eq!(a.len(), 5);
        assert_eq!(
            a.iter().map(|b| b.n_samples).collect::<Vec<_>>(),
            vec![2, 2, 2, 2, 1]
        );
        let mut reversed = nine.to_vec();
        reversed.reverse();
        assert_eq!(a, bucket(&reversed, n, 2, 11).expect("buckets"));
        let even = bucket(&contributions[..8], n, 4, 3).expect("buckets");
        let by_bucket = aggregate(&Rule::Mean, &even, n, None).expect("mean");
        let direct = aggregate(&Rule::Mean, &contributions[..8], n, None).expect("mean");
        assert!(distance(&by_bucket, &direct) < 1e-4);
        // The rule needs that many buckets, so that many more updates.
        let krum = Rule::with_buckets(
            Rule::MultiKrum {
                byzantine: 1,
                select: 1,
            },
            2,
        );
        assert_eq!(krum.min_updates(), 9);
        assert!(krum.check().is_ok());
        assert!(aggregate_with_buckets(&krum, nine, n, None, 1).is_ok());
        assert!(aggregate_with_buckets(&krum, &nine[..8], n, None, 1).is_err());
        let nested = Rule::Bucketed {
            size: 2,
            rule: Box::new(krum.clone()),
        };
        assert!(nested.check().is_err());
        assert_eq!(
            aggregate(&krum, &contributions, n, None),
            Err(RobustError::Unbucketed)
        );
        let mut bad = contributions.clone();
        bad[3].delta[0] = f32::NAN;
        assert!(matches!(
            bucket(&bad, n, 2, 1),
            Err(RobustError::NonFinite(_))
        ));
    }

    /// 6 of 20 peers (30%) flip their sign ×1000, and the median aggregates buckets of 2. Each
    /// poisoned bucket is lost, so the median holds exactly when fewer than half of the 10
    /// buckets hold an attacker: bucketing buys robustness to heterogeneity, not to more
    /// attackers (Karimireddy et al. need s·δ < 1/2; here 2 × 0.3 > 1/2), and which buckets the
    /// attackers fall into is the round's seed. Over 40 seeds both cases occur.
    #[test]
    fn bucketed_median_holds_against_30_percent_sign_flip_when_most_buckets_are_clean() {
        let n = 2000;
        let (truth, mut contributions) = honest(20, n, 3);
        for c in contributions.iter_mut().take(6) {
            c.delta.iter_mut().for_each(|v| *v *= -1000.0);
        }
        let honest_mean = aggregate(&Rule::Mean, &contributions[6..], n, None).expect("mean");
        let scale = distance(&truth, &vec![0.0; n]);
        let rule = Rule::with_buckets(Rule::Median, 2);
        let (mut held, mut lost) = (0, 0);
        for seed in 0..40 {
            let buckets = bucket(&contributions, n, 2, seed).expect("buckets");
            let poisoned = buckets
                .iter()
                .filter(|b| distance(&b.delta, &honest_mean) > 10.0 * scale)
                .count();
            assert!(
                (3..=6).contains(&poisoned),
                "6 attackers in pairs: 3 to 6 buckets"
            );
            let robust =
                aggregate_with_buckets(&rule, &contributions, n, None, seed).expect("median");
            let error = distance(&robust, &honest_mean);
            if poisoned < 5 {
                assert!(
                    error < 0.5 * scale,
                    "seed {seed}: {poisoned} poisoned, {error}"
                );
                held += 1;
            } else {
                assert!(error > scale, "seed {seed}: {poisoned} poisoned, {error}");
                lost += 1;
            }
        }
        assert!(held > 0 && lost > 0, "held {held}, lost {lost}");
        // 3 attackers of 20 (15%) can poison at most 3 of 10 buckets: it always holds.
        let mut fewer = contributions.clone();
        for c in fewer.iter_mut().skip(3).take(3) {
            c.delta.iter_mut().for_each(|v| *v /= -1000.0);
        }
        let honest_mean = aggregate(&Rule::Mean, &fewer[3..], n, None).expect("mean");
        for seed in 0..20 {
            let robust = aggregate_with_buckets(&rule, &fewer, n, None, seed).expect("median");
            assert!(distance(&robust, &honest_mean) < 0.5 * scale, "seed {seed}");
        }
    }
}
