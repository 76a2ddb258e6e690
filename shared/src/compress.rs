//! Codecs for pseudo-gradients, each with an exact encoded size and a documented error bound.
//!
//! | codec | bytes for n values | error bound per value |
//! | --- | --- | --- |
//! | `F32` | 4n | exact |
//! | `F16` | 2n | \|x − x̂\| ≤ 2⁻¹¹·\|x\| + 2⁻²⁴ for \|x\| ≤ 65504 (larger values saturate) |
//! | `Int8Block { block }` | n + 4·⌈n / block⌉ | \|x − x̂\| ≤ absmax(block) / 254 · (1 + 2⁻²⁰) |
//! | `TopK { per_million }` | 8k, k = max(1, ⌊n·per_million / 10⁶⌋) | kept values exact, the rest 0 |
//! | `TopKQuant { per_million, bits }` | 4k + 4 + ⌈k·bits / 8⌉ (bits 2 or 4) | kept values within absmax(kept) / (2^bits − 1) · (1 + 2⁻²⁰), the rest 0 |
//! | `LowBitBlock { block, bits }` | Σ over blocks of length L: 4 + ⌈L·bits / 8⌉ (bits 2 or 4) | \|x − x̂\| ≤ absmax(block) / (2^bits − 1) · (1 + 2⁻²⁰) |
//! | `TopKBlock { block, keep, bits }` | Σ over blocks of length L, k = min(keep, L): 4 + k + ⌈k·bits / 8⌉ | kept values within absmax(kept in block) / (2^bits − 1) · (1 + 2⁻²⁰), the rest 0 |
//!
//! `TopKBlock` is SparseLoCo's layout: top-k within blocks of at most 256 values, so that an
//! index is one byte (the offset in its block) instead of four; at 10% density with 2-bit values
//! it sends about 0.14 bytes per parameter, 28× less than f32.
//!
//! Lossy codecs are meant to be used with [`ErrorFeedback`]: what a round's encoding dropped is
//! added to the next round's pseudo-gradient (as in SparseLoCo / EF21), so nothing is lost for
//! good. Decoding never panics: malformed input is a [`CodecError`].

use half::f16;
use serde::{Deserialize, Serialize};

/// How a pseudo-gradient is encoded on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Little-endian f32, uncompressed.
    F32,
    /// Little-endian IEEE half precision.
    F16,
    /// Blocks of `block` values: an f32 scale (absmax / 127), then one i8 per value.
    Int8Block { block: u32 },
    /// The k largest magnitudes: k u32 indices (increasing), then k f32 values.
    TopK { per_million: u32 },
    /// Top-k with `bits`-bit values (2 or 4, SparseLoCo-style): k u32 indices (increasing), an
    /// f32 scale (the kept values' absmax), then the values quantized to 2^bits evenly spaced
    /// levels in [−scale, scale], packed little-end first.
    TopKQuant { per_million: u32, bits: u8 },
    /// Blocks of `block` values at 2 or 4 bits: an f32 scale (the block's absmax), then the
    /// values quantized to 2^bits evenly spaced levels in [−scale, scale], packed little-end
    /// first from a byte boundary.
    LowBitBlock { block: u32, bits: u8 },
    /// Top-k per block (SparseLoCo-style): blocks of `block` ≤ 256 values; from each, its `keep`
    /// largest magnitudes as an f32 scale (their absmax), `keep` u8 offsets into the block
    /// (increasing), then the values at `bits` (2 or 4) bits as in `LowBitBlock`. A last,
    /// shorter block keeps min(keep, its length).
    TopKBlock { block: u16, keep: u16, bits: u8 },
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("payload has {got} bytes, {expected} expected for {n} values")]
    Length {
        expected: usize,
        got: usize,
        n: usize,
    },
    #[error("block size must be at least 1")]
    BadBlock,
    #[error("top-k index {index} is out of range or not increasing")]
    BadIndex { index: u32 },
    #[error("payload decodes to NaN or infinity")]
    NonFinite,
    #[error("quantized codecs take 2 or 4 bits per value, not {0}")]
    BadBits(u8),
    #[error("block top-k needs 1 ≤ keep ≤ block ≤ 256, not keep {keep} of {block}")]
    BadKeep { block: u16, keep: u16 },
}

impl Codec {
    /// Number of values that top-k keeps out of `n`.
    pub fn top_k(per_million: u32, n: usize) -> usize {
        ((n as u128 * u128::from(per_million) / 1_000_000) as usize).clamp(1, n.max(1))
    }

    /// Whether the codec's parameters are ones it can encode with; decoding checks this first.
    pub fn check(self) -> Result<(), CodecError> {
        match self {
            Self::F32 | Self::F16 | Self::TopK { .. } => Ok(()),
            Self::Int8Block { block: 0 } | Self::LowBitBlock { block: 0, .. } => {
                Err(CodecError::BadBlock)
            }
            Self::Int8Block { .. } => Ok(()),
            Self::TopKQuant { bits, .. } => check_bits(bits),
            Self::LowBitBlock { bits, .. } => check_bits(bits),
            Self::TopKBlock { block, keep, bits } => {
                if keep == 0 || keep > block || block > 256 {
                    return Err(CodecError::BadKeep { block, keep });
                }
                check_bits(bits)
            }
        }
    }

    /// Exact encoded size, in bytes, of `n` values.
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Self::F32 => 4 * n,
            Self::F16 => 2 * n,
            Self::Int8Block { block } => n + 4 * n.div_ceil(block.max(1) as usize),
            Self::TopK { per_million } => 8 * Self::top_k(per_million, n),
            Self::TopKQuant { per_million, bits } => {
                let k = Self::top_k(per_million, n);
                4 * k + 4 + (k * usize::from(bits)).div_ceil(8)
            }
            Self::LowBitBlock { block, bits } => blockwise_len(n, block as usize, |len| {
                4 + (len * usize::from(bits)).div_ceil(8)
            }),
            Self::TopKBlock { block, keep, bits } => blockwise_len(n, usize::from(block), |len| {
                let k = usize::from(keep).min(len);
                4 + k + (k * usize::from(bits)).div_ceil(8)
            }),
        }
    }

    /// The k largest magnitudes of `values`, as increasing indices.
    fn top_indices(per_million: u32, values: &[f32]) -> Vec<u32> {
        largest(values, Self::top_k(per_million, values.len()))
    }

    /// Encodes `values` (which must be finite).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len(values.len()));
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => values.iter().for_each(|v| {
                out.extend_from_slice(&f16::from_f32(v.clamp(-65504.0, 65504.0)).to_le_bytes())
            }),
            Self::Int8Block { block } => {
                for chunk in values.chunks(block.max(1) as usize) {
                    let absmax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let scale = absmax / 127.0;
                    out.extend_from_slice(&scale.to_le_bytes());
                    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    out.extend(
                        chunk
                            .iter()
                            .map(|v| ((v * inverse).round().clamp(-127.0, 127.0) as i8) as u8),
                    );
                }
            }
            Self::TopK { per_million } => {
                let kept = Self::top_indices(per_million, values);
                kept.iter()
                    .for_each(|i| out.extend_from_slice(&i.to_le_bytes()));
                kept.iter()
                    .for_each(|&i| out.extend_from_slice(&values[i as usize].to_le_bytes()));
            }
            Self::TopKQuant { per_million, bits } => {
                let kept = Self::top_indices(per_million, values);
                kept.iter()
                    .for_each(|i| out.extend_from_slice(&i.to_le_bytes()));
                let scale = kept
                    .iter()
                    .fold(0.0f32, |m, &i| m.max(values[i as usize].abs()));
                out.extend_from_slice(&scale.to_le_bytes());
                pack_levels(
                    kept.iter().map(|&i| values[i as usize]),
                    scale,
                    bits,
                    &mut out,
                );
            }
            Self::LowBitBlock { block, bits } => {
                for chunk in values.chunks(block.max(1) as usize) {
                    let scale = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    out.extend_from_slice(&scale.to_le_bytes());
                    pack_levels(chunk.iter().copied(), scale, bits, &mut out);
                }
            }
            Self::TopKBlock { block, keep, bits } => {
                for chunk in values.chunks(usize::from(block.max(1))) {
                    let kept = largest(chunk, usize::from(keep));
                    let scale = kept
                        .iter()
                        .fold(0.0f32, |m, &i| m.max(chunk[i as usize].abs()));
                    out.extend_from_slice(&scale.to_le_bytes());
                    // Offsets are below 256 for every block size `check` accepts.
                    out.extend(kept.iter().map(|&i| i as u8));
                    pack_levels(
                        kept.iter().map(|&i| chunk[i as usize]),
                        scale,
                        bits,
                        &mut out,
                    );
                }
            }
        }
        out
    }

    /// Decodes `n` values from `bytes`, checking the length, indices and finiteness.
    pub fn decode(self, bytes: &[u8], n: usize) -> Result<Vec<f32>, CodecError> {
        self.check()?;
        let expected = self.encoded_len(n);
        if bytes.len() != expected {
            return Err(CodecError::Length {
                expected,
                got: bytes.len(),
                n,
            });
        }
        let f32_at = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let values: Vec<f32> = match self {
            Self::F32 => bytes.chunks_exact(4).map(f32_at).collect(),
            Self::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Self::Int8Block { block } => {
                let block = block.max(1) as usize;
                let mut out = Vec::with_capacity(n);
                let mut rest = bytes;
                while out.len() < n {
                    let len = block.min(n - out.len());
                    let (scale, tail) = rest.split_at(4);
                    let (q, tail) = tail.split_at(len);
                    let scale = f32_at(scale);
                    out.extend(q.iter().map(|&b| f32::from(b as i8) * scale));
                    rest = tail;
                }
                out
            }
            Self::TopK { per_million } => {
                let k = Self::top_k(per_million, n);
                let (indices, vals) = bytes.split_at(4 * k);
                let indices = sparse_indices(indices, n)?;
                let mut out = vec![0.0f32; n];
                for (index, v) in indices.into_iter().zip(vals.chunks_exact(4)) {
                    out[index] = f32_at(v);
                }
                out
            }
            Self::TopKQuant { per_million, bits } => {
                let k = Self::top_k(per_million, n);
                let (indices, rest) = bytes.split_at(4 * k);
                let indices = sparse_indices(indices, n)?;
                let (scale, packed) = rest.split_at(4);
                let scale = f32_at(scale);
                let mut out = vec![0.0f32; n];
                for (j, index) in indices.into_iter().enumerate() {
                    out[index] = unpack_level(packed, j, bits, scale);
                }
                out
            }
            Self::LowBitBlock { block, bits } => {
                let mut out = Vec::with_capacity(n);
                let mut rest = bytes;
                while out.len() < n {
                    let len = (block as usize).min(n - out.len());
                    let (scale, tail) = rest.split_at(4);
                    let (packed, tail) = tail.split_at((len * usize::from(bits)).div_ceil(8));
                    let scale = f32_at(scale);
                    out.extend((0..len).map(|j| unpack_level(packed, j, bits, scale)));
                    rest = tail;
                }
                out
            }
            Self::TopKBlock { block, keep, bits } => {
                let mut out = vec![0.0f32; n];
                let mut rest = bytes;
                for start in (0..n).step_by(usize::from(block)) {
                    let len = usize::from(block).min(n - start);
                    let k = usize::from(keep).min(len);
                    let (scale, tail) = rest.split_at(4);
                    let (offsets, tail) = tail.split_at(k);
                    let (packed, tail) = tail.split_at((k * usize::from(bits)).div_ceil(8));
                    let scale = f32_at(scale);
                    let mut previous: Option<u8> = None;
                    for (j, &offset) in offsets.iter().enumerate() {
                        if usize::from(offset) >= len || previous.is_some_and(|p| offset <= p) {
                            return Err(CodecError::BadIndex {
                                index: (start + usize::from(offset)) as u32,
                            });
                        }
                        previous = Some(offset);
                        out[start + usize::from(offset)] = unpack_level(packed, j, bits, scale);
                    }
                    rest = tail;
                }
                out
            }
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(CodecError::NonFinite);
        }
        Ok(values)
    }
}

/// Bytes for `n` values in blocks of `block` (at least 1), `per(len)` for a block of `len`.
fn blockwise_len(n: usize, block: usize, per: impl Fn(usize) -> usize) -> usize {
    let block = block.max(1);
    (n / block) * per(block)
        + if n.is_multiple_of(block) {
            0
        } else {
            per(n % block)
        }
}

fn check_bits(bits: u8) -> Result<(), CodecError> {
    if bits == 2 || bits == 4 {
        Ok(())
    } else {
        Err(CodecError::BadBits(bits))
    }
}

/// The offsets of the `k` largest magnitudes of `values`, increasing; ties go to the lower
/// offset, so encoding is deterministic.
fn largest(values: &[f32], k: usize) -> Vec<u32> {
    let k = k.min(values.len());
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    if k < values.len() {
        order.select_nth_unstable_by(k, |&a, &b| {
            values[b as usize]
                .abs()
                .total_cmp(&values[a as usize].abs())
                .then(a.cmp(&b))
        });
    }
    let mut kept = order[..k].to_vec();
    kept.sort_unstable();
    kept
}

/// Appends `values` quantized to 2^bits evenly spaced levels in [−scale, scale], packed little
/// end first from a byte boundary. Widths other than 2 encode as 4 bits (`Codec::check` refuses
/// them before anything is decoded).
fn pack_levels(
    values: impl ExactSizeIterator<Item = f32>,
    scale: f32,
    bits: u8,
    out: &mut Vec<u8>,
) {
    let bits = if bits == 2 { 2usize } else { 4 };
    let top = ((1u32 << bits) - 1) as f32;
    let start = out.len();
    out.resize(start + (values.len() * bits).div_ceil(8), 0);
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (j, v) in values.enumerate() {
        let q = ((v * inverse + 1.0) * 0.5 * top).round().clamp(0.0, top) as u8;
        let bit = j * bits;
        out[start + bit / 8] |= q << (bit % 8);
    }
}

/// The `j`th value that [`pack_levels`] packed into `packed` (bits 2 or 4).
fn unpack_level(packed: &[u8], j: usize, bits: u8, scale: f32) -> f32 {
    let bits = usize::from(bits);
    let top = ((1u32 << bits) - 1) as u8;
    let bit = j * bits;
    let q = (packed[bit / 8] >> (bit % 8)) & top;
    // (2q − top) / top is exact before the division, so a level is off by at most two roundings.
    (2.0 * f32::from(q) - f32::from(top)) / f32::from(top) * scale
}

/// Reads k little-endian u32 indices, which must be increasing and below `n`.
fn sparse_indices(bytes: &[u8], n: usize) -> Result<Vec<usize>, CodecError> {
    let mut previous: Option<u32> = None;
    bytes
        .chunks_exact(4)
        .map(|i| {
            let index = u32::from_le_bytes([i[0], i[1], i[2], i[3]]);
            if index as usize >= n || previous.is_some_and(|p| index <= p) {
                return Err(CodecError::BadIndex { index });
            }
            previous = Some(index);
            Ok(index as usize)
        })
        .collect()
}

/// Per-peer error feedback: the part of past pseudo-gradients that compression dropped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Error feedback carrying `residual` (a committed state's, for a replay).
    pub fn with_residual(residual: Vec<f32>) -> Self {
        Self { residual }
    }

    /// Encodes `delta` plus the carried residual, and keeps what the encoding lost.
    pub fn encode(&mut self, codec: Codec, delta: &[f32]) -> Vec<u8> {
        if self.residual.len() != delta.len() {
            self.residual = vec![0.0; delta.len()];
        }
        let corrected: Vec<f32> = delta
            .iter()
            .zip(&self.residual)
            .map(|(d, r)| d + r)
            .collect();
        let bytes = codec.encode(&corrected);
        // Our own encoding always decodes; if it somehow did not, carry everything.
        let sent = codec
            .decode(&bytes, delta.len())
            .unwrap_or_else(|_| vec![0.0; delta.len()]);
        for ((r, c), s) in self.residual.iter_mut().zip(&corrected).zip(&sent) {
            *r = c - s;
        }
        bytes
    }

    pub fn residual(&self) -> &[f32] {
        &self.residual
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SplitMix64;

    const CODECS: [Codec; 13] = [
        Codec::F32,
        Codec::F16,
        Codec::Int8Block { block: 64 },
        Codec::Int8Block { block: 1000 },
        Codec::TopK {
            per_million: 10_000,
        },
        Codec::TopK {
            per_million: 30_000,
        },
        Codec::TopKQuant {
            per_million: 20_000,
            bits: 2,
        },
        Codec::TopKQuant {
            per_million: 10_000,
            bits: 4,
        },
        Codec::LowBitBlock { block: 64, bits: 2 },
        Codec::LowBitBlock {
            block: 100,
            bits: 4,
        },
        Codec::TopKBlock {
            block: 256,
            keep: 26,
            bits: 2,
        },
        Codec::TopKBlock {
            block: 256,
            keep: 64,
            bits: 4,
        },
        Codec::TopKBlock {
            block: 7,
            keep: 7,
            bits: 4,
        },
    ];

    /// The bound of a 2^bits-level quantizer over [−scale, scale].
    fn level_bound(scale: f32, bits: u8) -> f32 {
        scale / ((1u32 << bits) - 1) as f32 * (1.0 + 2f32.powi(-20)) + f32::MIN_POSITIVE
    }

    /// Random vectors with a wide range of magnitudes, including zeros.
    fn sample(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let r = rng.next_u64();
                if r.is_multiple_of(17) {
                    return 0.0;
                }
                let mantissa = (r >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                mantissa * 10f32.powi((r % 9) as i32 - 6)
            })
            .collect()
    }

    #[test]
    fn every_codec_has_its_exact_size_and_stays_within_its_bound() {
        let mut rng = SplitMix64::new(42);
        for case in 0..200 {
            let n = 1 + (rng.next_u64() % 3000) as usize;
            let x = sample(&mut rng, n);
            for codec in CODECS {
                let bytes = codec.encode(&x);
                assert_eq!(bytes.len(), codec.encoded_len(n), "{codec:?} n={n}");
                let y = codec.decode(&bytes, n).expect("decodes");
                match codec {
                    Codec::F32 => assert_eq!(x, y),
                    Codec::F16 => {
                        for (a, b) in x.iter().zip(&y) {
                            assert!(
                                (a - b).abs() <= a.abs() * 2f32.powi(-11) + 2f32.powi(-24),
                                "case {case}: {a} vs {b}"
                            );
                        }
                    }
                    Codec::Int8Block { block } => {
                        for (cx, cy) in x.chunks(block as usize).zip(y.chunks(block as usize)) {
                            let absmax = cx.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                            for (a, b) in cx.iter().zip(cy) {
                                assert!(
                                    (a - b).abs() <= absmax / 254.0 * (1.0 + 2f32.powi(-20)),
                                    "case {case}: {a} vs {b}"
                                );
                            }
                        }
                    }
                    Codec::TopK { per_million } => {
                        let k = Codec::top_k(per_million, n);
                        let kept: Vec<usize> = (0..n).filter(|&i| y[i] != 0.0).collect();
                        assert!(kept.len() <= k);
                        kept.iter().for_each(|&i| assert_eq!(x[i], y[i]));
                        let smallest_kept = kept
                            .iter()
                            .map(|&i| x[i].abs())
                            .fold(f32::INFINITY, f32::min);
                        let largest_dropped = (0..n)
                            .filter(|i| y[*i] == 0.0)
                            .map(|i| x[i].abs())
                            .fold(0.0, f32::max);
                        assert!(
                            kept.len() < k || largest_dropped <= smallest_kept,
                            "top-k keeps the largest"
                        );
                    }
                    Codec::LowBitBlock { block, bits } => {
                        for (cx, cy) in x.chunks(block as usize).zip(y.chunks(block as usize)) {
                            let bound =
                                level_bound(cx.iter().fold(0.0f32, |m, v| m.max(v.abs())), bits);
                            for (a, b) in cx.iter().zip(cy) {
                                assert!(
                                    (a - b).abs() <= bound,
                                    "case {case} {codec:?}: {a} vs {b}"
                                );
                            }
                        }
                    }
                    Codec::TopKBlock { block, keep, bits } => {
                        for (cx, cy) in x
                            .chunks(usize::from(block))
                            .zip(y.chunks(usize::from(block)))
                        {
                            let kept = largest(cx, usize::from(keep));
                            assert_eq!(kept.len(), usize::from(keep).min(cx.len()));
                            let bound = level_bound(
                                kept.iter()
                                    .fold(0.0f32, |m, &i| m.max(cx[i as usize].abs())),
                                bits,
                            );
                            let smallest_kept = kept
                                .iter()
                                .map(|&i| cx[i as usize].abs())
                                .fold(f32::INFINITY, f32::min);
                            for i in 0..cx.len() {
                                if kept.contains(&(i as u32)) {
                                    assert!(
                                        (cx[i] - cy[i]).abs() <= bound,
                                        "case {case} {codec:?}: {} vs {}",
                                        cx[i],
                                        cy[i]
                                    );
                                } else {
                                    assert_eq!(cy[i], 0.0, "dropped values decode to 0");
                                    assert!(
                                        cx[i].abs() <= smallest_kept,
                                        "each block keeps its largest"
                                    );
                                }
                            }
                        }
                    }
                    Codec::TopKQuant { per_million, bits } => {
                        let kept = Codec::top_indices(per_million, &x);
                        let bound = level_bound(
                            kept.iter().fold(0.0f32, |m, &i| m.max(x[i as usize].abs())),
                            bits,
                        );
                        for i in 0..n {
                            if kept.contains(&(i as u32)) {
                                assert!(
                                    (x[i] - y[i]).abs() <= bound,
                                    "case {case} {codec:?}: {} vs {}",
                                    x[i],
                                    y[i]
                                );
                            } else {
                                assert_eq!(y[i], 0.0, "dropped values decode to 0");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        for codec in CODECS {
            let bytes = codec.encode(&x);
            assert!(
                matches!(
                    codec.decode(&bytes[..bytes.len() - 1], 4),
                    Err(CodecError::Length { .. })
                ),
                "{codec:?}"
            );
            if !matches!(
                codec,
                Codec::TopK { .. } | Codec::TopKQuant { .. } | Codec::TopKBlock { .. }
            ) {
                // (Top-k of a 4-vector is a valid sparse 5-vector: the model's size decides.)
                assert!(
                    matches!(codec.decode(&bytes, 5), Err(CodecError::Length { .. })),
                    "{codec:?}"
                );
            }
        }
        let top = Codec::TopK {
            per_million: 500_000,
        };
        let mut bytes = top.encode(&x);
        bytes[0..4].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(
            top.decode(&bytes, 4),
            Err(CodecError::BadIndex { index: 9 })
        );
        let odd = Codec::TopKQuant {
            per_million: 500_000,
            bits: 3,
        };
        assert_eq!(odd.decode(&[0; 64], 4), Err(CodecError::BadBits(3)));
        assert_eq!(
            Codec::LowBitBlock { block: 0, bits: 2 }.decode(&[0; 64], 4),
            Err(CodecError::BadBlock)
        );
        assert_eq!(
            Codec::LowBitBlock { block: 8, bits: 8 }.decode(&[0; 64], 4),
            Err(CodecError::BadBits(8))
        );
        for (block, keep) in [(300, 10), (16, 0), (16, 17)] {
            let bad = Codec::TopKBlock {
                block,
                keep,
                bits: 2,
            };
            assert_eq!(
                bad.decode(&[0; 64], 4),
                Err(CodecError::BadKeep { block, keep })
            );
        }
        // Block top-k offsets must be increasing and inside their block.
        let block = Codec::TopKBlock {
            block: 4,
            keep: 2,
            bits: 4,
        };
        let y = [1.0f32, -2.0, 3.0, 0.5, 7.0, 1.0];
        let good = block.encode(&y);
        assert_eq!(good.len(), (4 + 2 + 1) * 2);
        assert_eq!(good[4..6], [1, 2]);
        let mut swapped = good.clone();
        swapped.swap(4, 5);
        assert_eq!(
            block.decode(&swapped, 6),
            Err(CodecError::BadIndex { index: 1 })
        );
        let mut outside = good.clone();
        outside[12] = 2; // the last block has 2 values
        assert!(matches!(
            block.decode(&outside, 6),
            Err(CodecError::BadIndex { .. })
        ));
        let mut nan_scale = good;
        nan_scale[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(block.decode(&nan_scale, 6), Err(CodecError::NonFinite));
        let mut nan = Codec::F32.encode(&x);
        nan[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(Codec::F32.decode(&nan, 4), Err(CodecError::NonFinite));
    }

    #[test]
    fn two_bit_top_k_is_smaller_than_f32_top_k() {
        let n = 1_000_000;
        let dense = Codec::TopK {
            per_million: 20_000,
        }
        .encoded_len(n);
        let two = Codec::TopKQuant {
            per_million: 20_000,
            bits: 2,
        }
        .encoded_len(n);
        assert_eq!(two, 4 * 20_000 + 4 + 5_000);
        assert!(dense as f64 / two as f64 > 1.8, "{dense} vs {two}");
        assert!(Codec::F32.encoded_len(n) / two > 45);
    }

    #[test]
    fn block_top_k_sends_a_tenth_at_two_bits_in_under_a_seventh_of_a_byte_per_value() {
        let n = 82_000;
        let codec = Codec::TopKBlock {
            block: 256,
            keep: 26,
            bits: 2,
        };
        // 320 full blocks of 4 + 26 + 7 bytes, and a last block of 80 values keeping 26.
        assert_eq!(codec.encoded_len(n), 320 * 37 + 37);
        assert!(codec.encoded_len(n) as f64 / (n as f64) < 0.15);
        assert_eq!(
            Codec::LowBitBlock { block: 64, bits: 2 }.encoded_len(130),
            2 * (4 + 16) + 4 + 1
        );
    }

    #[test]
    fn error_feedback_delivers_everything_eventually() {
        for codec in [
            Codec::TopK {
                per_million: 20_000,
            },
            Codec::TopKQuant {
                per_million: 20_000,
                bits: 2,
            },
            Codec::LowBitBlock { block: 64, bits: 2 },
            Codec::TopKBlock {
                block: 256,
                keep: 26,
                bits: 2,
            },
        ] {
            error_feedback_delivers_everything_with(codec);
        }
    }

    fn error_feedback_delivers_everything_with(codec: Codec) {
        let mut rng = SplitMix64::new(7);
        let n = 500;
        let mut feedback = ErrorFeedback::default();
        let mut sent = vec![0.0f32; n];
        let mut total = vec![0.0f32; n];
        for _ in 0..200 {
            let delta = sample(&mut rng, n);
            total.iter_mut().zip(&delta).for_each(|(t, d)| *t += d);
            let decoded = codec
                .decode(&feedback.encode(codec, &delta), n)
                .expect("decode");
            sent.iter_mut().zip(&decoded).for_each(|(s, d)| *s += d);
        }
        // What was sent plus what is still carried is exactly what was produced.
        for i in 0..n {
            assert!(
                (sent[i] + feedback.residual()[i] - total[i]).abs()
                    <= 1e-4 * (1.0 + total[i].abs())
            );
        }
    }
}
