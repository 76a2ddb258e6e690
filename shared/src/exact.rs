//! The mean's exact sum: every value is rounded to a fixed-point grid and the resulting
//! integers are added, so a sum is the same whatever the order or the grouping of its terms.
//!
//! Floating-point addition is not associative: `(a + b) + c` and `a + (b + c)` can differ in
//! the last bit. A mean summed in f32 is therefore bitwise reproducible only in one fixed
//! order, and sums of parts (an edge relay's partial sum, a GPU's tree reduction) added
//! together are not bitwise the whole. Integers are: the mean of [`Rule::Mean`] rounds each
//! value to a multiple of 2⁻³⁶ (ties to even) within ±[`LIMIT`], adds the integers in i64
//! ([`ExactSum`]) and divides once at the end ([`mean_of`]). Any partition of the same
//! contributions, summed part by part in any order and then merged, gives the same bits, and
//! so do the CPU kernel and every Burn backend ([`limbs`] splits the integers into parts that
//! i32 sums hold exactly, for WebGPU, which has no i64).
//!
//! What the grid costs: a value's rounding error is at most 2⁻³⁷ ≈ 7.3·10⁻¹², below the f32
//! spacing of any θ coordinate larger than 10⁻⁴ in magnitude (θ moves by the outer learning
//! rate times the mean). Values beyond ±[`LIMIT`] (no honest pseudo-gradient comes near) count
//! as ±[`LIMIT`]. A sum holds at most [`MAX_TERMS`] contributions.
//!
//! [`Rule::Mean`]: crate::robust::Rule::Mean

/// Bits of the fixed-point grid below the binary point: values are multiples of 2⁻³⁶.
pub const FRACTION_BITS: i32 = 36;

/// The largest magnitude a value counts with in a sum (2¹⁰); a larger one counts as ±`LIMIT`.
pub const LIMIT: f32 = 1024.0;

/// The most contributions one sum holds: 2¹⁷ values of at most 2⁴⁶ grid steps each stay
/// within i64, and their i32 limbs ([`limbs`]) within i32.
pub const MAX_TERMS: usize = 1 << 17;

/// 2³⁶ as an f32: multiplying by a power of two is exact.
const SCALE: f32 = (1u64 << FRACTION_BITS) as f32;

/// 1.5 · 2⁵²: an f64 in [2⁵², 2⁵³), where the spacing is 1, so adding it to |x| < 2⁵¹ rounds x
/// to an integer (ties to even, as IEEE addition rounds) that its low bits hold.
const MAGIC: f64 = 6_755_399_441_055_744.0;

/// `value` on the grid: `value · 2³⁶`, clamped to ±[`LIMIT`] and rounded to the nearest
/// integer (ties to even). The product is exact in f64 and the rounding is one addition
/// ([`MAGIC`]), which vectorizes where a float-to-i64 conversion does not. Callers check
/// finiteness first (a NaN gives an unspecified integer).
#[inline]
pub fn fixed(value: f32) -> i64 {
    let scaled = f64::from(value.clamp(-LIMIT, LIMIT)) * f64::from(SCALE) + MAGIC;
    (scaled.to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64)
}

/// The mean of `count` values whose grid sum is `sum`: one division in f64, then rounded to
/// f32. IEEE arithmetic, so the same on every machine.
#[inline]
pub fn mean_of(sum: i64, count: usize) -> f32 {
    let sum = sum as f64 / SCALE as f64;
    (sum / count as f64) as f32
}

/// Why an exact sum refused a contribution.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExactError {
    #[error("contribution of {got} values, the sum has {expected}")]
    Shape { expected: usize, got: usize },
    #[error("a contribution has NaN or infinite values")]
    NonFinite,
    #[error("a sum holds at most {MAX_TERMS} contributions")]
    TooMany,
}

/// A coordinate-wise sum of contributions on the grid, and how many it holds. Adding
/// contributions and merging sums in any order and grouping gives the same sum.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExactSum {
    /// How many contributions the sum holds.
    pub count: u32,
    /// The sum of each coordinate, in grid steps (2⁻³⁶).
    pub sums: Vec<i64>,
}

impl ExactSum {
    /// An empty sum of `n` coordinates.
    pub fn new(n: usize) -> Self {
        Self {
            count: 0,
            sums: vec![0; n],
        }
    }

    /// Adds one contribution (finite, of the sum's length).
    pub fn add(&mut self, delta: &[f32]) -> Result<(), ExactError> {
        if delta.len() != self.sums.len() {
            return Err(ExactError::Shape {
                expected: self.sums.len(),
                got: delta.len(),
            });
        }
        if self.count as usize >= MAX_TERMS {
            return Err(ExactError::TooMany);
        }
        if !delta.iter().all(|v| v.is_finite()) {
            return Err(ExactError::NonFinite);
        }
        self.sums
            .iter_mut()
            .zip(delta)
            .for_each(|(s, v)| *s += fixed(*v));
        self.count += 1;
        Ok(())
    }

    /// Adds another sum of the same length: the result is the sum of both sums' contributions.
    pub fn merge(&mut self, other: &ExactSum) -> Result<(), ExactError> {
        if other.sums.len() != self.sums.len() {
            return Err(ExactError::Shape {
                expected: self.sums.len(),
                got: other.sums.len(),
            });
        }
        if self.count as usize + other.count as usize > MAX_TERMS {
            return Err(ExactError::TooMany);
        }
        self.sums
            .iter_mut()
            .zip(&other.sums)
            .for_each(|(s, o)| *s += o);
        self.count += other.count;
        Ok(())
    }

    /// The coordinate-wise mean of the contributions; `None` for an empty sum.
    pub fn mean(&self) -> Option<Vec<f32>> {
        let count = self.count as usize;
        (count > 0).then(|| self.sums.iter().map(|s| mean_of(*s, count)).collect())
    }
}

/// Limbs of the grid integers: a value's `fixed(v)` is `a·2³⁶ + b·2²⁴ + c·2¹² + d`, every limb
/// with the value's sign and |b|, |c|, |d| < 2¹², |a| ≤ 2¹⁰.
pub const LIMB_SHIFTS: [i32; 4] = [36, 24, 12, 0];

/// The grid integers of `values` (finite, any shape) split into the four limbs of
/// [`LIMB_SHIFTS`], as integer tensors. Every step is exact in f32 (scaling by powers of two,
/// rounding, and differences that are multiples of the value's own spacing), so the limbs are
/// [`fixed`]'s integer on every backend; their sums over up to [`MAX_TERMS`] rows stay within
/// i32. Recombine the summed limbs with [`from_limbs`].
pub fn limbs<B: burn::prelude::Backend, const D: usize>(
    values: burn::prelude::Tensor<B, D>,
) -> [burn::prelude::Tensor<B, D, burn::prelude::Int>; 4] {
    let grid = values.clamp(-LIMIT, LIMIT).mul_scalar(SCALE).round();
    let sign = grid.clone().sign();
    let mut rest = grid.abs();
    LIMB_SHIFTS.map(|shift| {
        let step = (1u64 << shift) as f32;
        let limb = rest.clone().div_scalar(step).floor();
        rest = rest.clone() - limb.clone().mul_scalar(step);
        (limb * sign.clone()).int()
    })
}

/// A grid integer from its summed limbs (see [`limbs`]).
#[inline]
pub fn from_limbs(limbs: [i64; 4]) -> i64 {
    limbs
        .iter()
        .zip(LIMB_SHIFTS)
        .map(|(limb, shift)| limb << shift)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // Magnitudes from 1e-12 to 10, both signs, and a few exact ties and zeros.
                let unit = (state >> 11) as f64 / (1u64 << 53) as f64;
                let exponent = -12.0 + 13.0 * ((state >> 3) % 1000) as f64 / 1000.0;
                let v = (unit - 0.5).signum() * 10f64.powf(exponent);
                match i % 97 {
                    0 => 0.0,
                    1 => 0.5 / SCALE * if state & 1 == 0 { 1.0 } else { 3.0 },
                    _ => v as f32,
                }
            })
            .collect()
    }

    /// Any grouping and order of the same contributions gives the same bits.
    #[test]
    fn partial_sums_in_any_grouping_give_the_same_mean() {
        let n = 513;
        let rows: Vec<Vec<f32>> = (0..23).map(|s| values(s, n)).collect();
        let mut whole = ExactSum::new(n);
        rows.iter().for_each(|r| whole.add(r).expect("add"));
        for parts in [2usize, 3, 7] {
            let mut sums = vec![ExactSum::new(n); parts];
            for (i, r) in rows.iter().enumerate().rev() {
                sums[(i * 5 + parts) % parts].add(r).expect("add");
            }
            let mut merged = ExactSum::new(n);
            sums.iter()
                .rev()
                .for_each(|s| merged.merge(s).expect("merge"));
            assert_eq!(merged, whole);
        }
        // The mean is close to the f64 mean of the values as given.
        let mean = whole.mean().expect("mean");
        for (j, m) in mean.iter().enumerate() {
            let exact = rows.iter().map(|r| r[j] as f64).sum::<f64>() / rows.len() as f64;
            assert!(
                (*m as f64 - exact).abs() <= 1e-11 + 1e-6 * exact.abs(),
                "{m} vs {exact}"
            );
        }
    }

    #[test]
    fn the_grid_rounds_ties_to_even_and_clamps() {
        assert_eq!(fixed(0.5 / SCALE), 0);
        assert_eq!(fixed(1.5 / SCALE), 2);
        assert_eq!(fixed(-2.5 / SCALE), -2);
        assert_eq!(fixed(1.0), 1 << 36);
        assert_eq!(fixed(5000.0), 1 << 46);
        assert_eq!(fixed(f32::NEG_INFINITY), -(1 << 46));
        for v in values(3, 10_000) {
            let plain = (v.clamp(-LIMIT, LIMIT) * SCALE).round_ties_even() as i64;
            assert_eq!(fixed(v), plain, "{v}");
        }
        let mut sum = ExactSum::new(2);
        assert_eq!(sum.add(&[1.0, f32::NAN]), Err(ExactError::NonFinite));
        assert_eq!(
            sum.add(&[1.0]),
            Err(ExactError::Shape {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(sum.mean(), None);
    }

    /// The limbs, on a Burn backend, recombine to the host's grid integers.
    #[test]
    fn limbs_on_a_backend_are_the_grid_integers() {
        use burn::backend::NdArray;
        use burn::prelude::*;
        let mut v = values(9, 4096);
        v.extend([LIMIT, -LIMIT, 3e9, -7e-12, 1_023.999_9, -0.0]);
        let device = Default::default();
        let tensor =
            Tensor::<NdArray, 1>::from_data(TensorData::new(v.clone(), [v.len()]), &device);
        let parts = limbs(tensor).map(|t| t.into_data().iter::<i64>().collect::<Vec<i64>>());
        for (i, x) in v.iter().enumerate() {
            let got = from_limbs([parts[0][i], parts[1][i], parts[2][i], parts[3][i]]);
            assert_eq!(got, fixed(*x), "{x}");
            assert!(parts[1..].iter().all(|p| p[i].abs() < 1 << 12));
        }
    }
}
