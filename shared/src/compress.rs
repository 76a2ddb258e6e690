//! Codecs for pseudo-gradients, each with an exact encoded size and a documented error bound.
//!
//! | codec | bytes for n values | error bound per value |
//! | --- | --- | --- |
//! | `F32` | 4n | exact |
//! | `F16` | 2n | \|x − x̂\| ≤ 2⁻¹¹·\|x\| + 2⁻²⁴ for \|x\| ≤ 65504 (larger values saturate) |
//! | `Int8Block { block }` | n + 4·⌈n / block⌉ | \|x − x̂\| ≤ absmax(block) / 254 · (1 + 2⁻²⁰) |
//! | `TopK { per_million }` | 8k, k = max(1, ⌊n·per_million / 10⁶⌋) | kept values exact, the rest 0 |
//! | `TopKQuant { per_million, bits }` | 4k + 4 + ⌈k·bits / 8⌉ (bits 2 or 4) | kept values within absmax(kept) / (2^bits − 1) · (1 + 2⁻²⁰), the rest 0 |
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
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("payload has {got} bytes, {expected} expected for {n} values")]
    Length { expected: usize, got: usize, n: usize },
    #[error("block size must be at least 1")]
    BadBlock,
    #[error("top-k index {index} is out of range or not increasing")]
    BadIndex { index: u32 },
    #[error("payload decodes to NaN or infinity")]
    NonFinite,
    #[error("quantized top-k takes 2 or 4 bits per value, not {0}")]
    BadBits(u8),
}

impl Codec {
    /// Number of values that top-k keeps out of `n`.
    pub fn top_k(per_million: u32, n: usize) -> usize {
        ((n as u128 * u128::from(per_million) / 1_000_000) as usize).clamp(1, n.max(1))
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
        }
    }

    /// The k largest magnitudes of `values`, as increasing indices.
    fn top_indices(per_million: u32, values: &[f32]) -> Vec<u32> {
        let k = Self::top_k(per_million, values.len()).min(values.len());
        let mut order: Vec<u32> = (0..values.len() as u32).collect();
        if k < values.len() {
            // Largest magnitudes first; ties broken by index, so encoding is deterministic.
            order.select_nth_unstable_by(k, |&a, &b| values[b as usize].abs().total_cmp(&values[a as usize].abs()).then(a.cmp(&b)));
        }
        let mut kept = order[..k].to_vec();
        kept.sort_unstable();
        kept
    }

    /// Encodes `values` (which must be finite).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len(values.len()));
        match self {
            Self::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&f16::from_f32(v.clamp(-65504.0, 65504.0)).to_le_bytes())),
            Self::Int8Block { block } => {
                for chunk in values.chunks(block.max(1) as usize) {
                    let absmax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let scale = absmax / 127.0;
                    out.extend_from_slice(&scale.to_le_bytes());
                    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    out.extend(chunk.iter().map(|v| ((v * inverse).round().clamp(-127.0, 127.0) as i8) as u8));
                }
            }
            Self::TopK { per_million } => {
                let kept = Self::top_indices(per_million, values);
                kept.iter().for_each(|i| out.extend_from_slice(&i.to_le_bytes()));
                kept.iter().for_each(|&i| out.extend_from_slice(&values[i as usize].to_le_bytes()));
            }
            Self::TopKQuant { per_million, bits } => {
                let kept = Self::top_indices(per_million, values);
                kept.iter().for_each(|i| out.extend_from_slice(&i.to_le_bytes()));
                let scale = kept.iter().fold(0.0f32, |m, &i| m.max(values[i as usize].abs()));
                out.extend_from_slice(&scale.to_le_bytes());
                // Unsupported widths encode as 4 bits; the decoder refuses them (the relay
                // checks the run's codec before any peer sees it).
                let bits = if bits == 2 { 2u32 } else { 4 };
                let top = ((1u32 << bits) - 1) as f32;
                let mut packed = vec![0u8; (kept.len() * bits as usize).div_ceil(8)];
                for (j, &i) in kept.iter().enumerate() {
                    let unit = if scale > 0.0 { values[i as usize] / scale } else { 0.0 };
                    let q = ((unit + 1.0) * 0.5 * top).round().clamp(0.0, top) as u8;
                    let bit = j * bits as usize;
                    packed[bit / 8] |= q << (bit % 8);
                }
                out.extend_from_slice(&packed);
            }
        }
        out
    }

    /// Decodes `n` values from `bytes`, checking the length, indices and finiteness.
    pub fn decode(self, bytes: &[u8], n: usize) -> Result<Vec<f32>, CodecError> {
        if let Self::TopKQuant { bits, .. } = self
            && bits != 2
            && bits != 4
        {
            return Err(CodecError::BadBits(bits));
        }
        let expected = self.encoded_len(n);
        if bytes.len() != expected {
            return Err(CodecError::Length { expected, got: bytes.len(), n });
        }
        let f32_at = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let values: Vec<f32> = match self {
            Self::F32 => bytes.chunks_exact(4).map(f32_at).collect(),
            Self::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
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
                let bits = usize::from(bits);
                let top = ((1u32 << bits) - 1) as f32;
                let mask = ((1u32 << bits) - 1) as u8;
                let mut out = vec![0.0f32; n];
                for (j, index) in indices.into_iter().enumerate() {
                    let bit = j * bits;
                    let q = (packed[bit / 8] >> (bit % 8)) & mask;
                    out[index] = (f32::from(q) / top * 2.0 - 1.0) * scale;
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
    /// Encodes `delta` plus the carried residual, and keeps what the encoding lost.
    pub fn encode(&mut self, codec: Codec, delta: &[f32]) -> Vec<u8> {
        if self.residual.len() != delta.len() {
            self.residual = vec![0.0; delta.len()];
        }
        let corrected: Vec<f32> = delta.iter().zip(&self.residual).map(|(d, r)| d + r).collect();
        let bytes = codec.encode(&corrected);
        // Our own encoding always decodes; if it somehow did not, carry everything.
        let sent = codec.decode(&bytes, delta.len()).unwrap_or_else(|_| vec![0.0; delta.len()]);
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

    const CODECS: [Codec; 8] = [
        Codec::F32,
        Codec::F16,
        Codec::Int8Block { block: 64 },
        Codec::Int8Block { block: 1000 },
        Codec::TopK { per_million: 10_000 },
        Codec::TopK { per_million: 30_000 },
        Codec::TopKQuant { per_million: 20_000, bits: 2 },
        Codec::TopKQuant { per_million: 10_000, bits: 4 },
    ];

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
                            assert!((a - b).abs() <= a.abs() * 2f32.powi(-11) + 2f32.powi(-24), "case {case}: {a} vs {b}");
                        }
                    }
                    Codec::Int8Block { block } => {
                        for (cx, cy) in x.chunks(block as usize).zip(y.chunks(block as usize)) {
                            let absmax = cx.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                            for (a, b) in cx.iter().zip(cy) {
                                assert!((a - b).abs() <= absmax / 254.0 * (1.0 + 2f32.powi(-20)), "case {case}: {a} vs {b}");
                            }
                        }
                    }
                    Codec::TopK { per_million } => {
                        let k = Codec::top_k(per_million, n);
                        let kept: Vec<usize> = (0..n).filter(|&i| y[i] != 0.0).collect();
                        assert!(kept.len() <= k);
                        kept.iter().for_each(|&i| assert_eq!(x[i], y[i]));
                        let smallest_kept = kept.iter().map(|&i| x[i].abs()).fold(f32::INFINITY, f32::min);
                        let largest_dropped = (0..n).filter(|i| y[*i] == 0.0).map(|i| x[i].abs()).fold(0.0, f32::max);
                        assert!(kept.len() < k || largest_dropped <= smallest_kept, "top-k keeps the largest");
                    }
                    Codec::TopKQuant { per_million, bits } => {
                        let kept = Codec::top_indices(per_million, &x);
                        let absmax = kept.iter().fold(0.0f32, |m, &i| m.max(x[i as usize].abs()));
                        let bound = absmax / ((1u32 << bits) - 1) as f32 * (1.0 + 2f32.powi(-20)) + f32::MIN_POSITIVE;
                        for i in 0..n {
                            if kept.contains(&(i as u32)) {
                                assert!((x[i] - y[i]).abs() <= bound, "case {case} {codec:?}: {} vs {}", x[i], y[i]);
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
            assert!(matches!(codec.decode(&bytes[..bytes.len() - 1], 4), Err(CodecError::Length { .. })), "{codec:?}");
            if !matches!(codec, Codec::TopK { .. } | Codec::TopKQuant { .. }) {
                // (Top-k of a 4-vector is a valid sparse 5-vector: the model's size decides.)
                assert!(matches!(codec.decode(&bytes, 5), Err(CodecError::Length { .. })), "{codec:?}");
            }
        }
        let top = Codec::TopK { per_million: 500_000 };
        let mut bytes = top.encode(&x);
        bytes[0..4].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(top.decode(&bytes, 4), Err(CodecError::BadIndex { index: 9 }));
        let odd = Codec::TopKQuant { per_million: 500_000, bits: 3 };
        assert_eq!(odd.decode(&[0; 64], 4), Err(CodecError::BadBits(3)));
        let mut nan = Codec::F32.encode(&x);
        nan[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(Codec::F32.decode(&nan, 4), Err(CodecError::NonFinite));
    }

    #[test]
    fn two_bit_top_k_is_smaller_than_f32_top_k() {
        let n = 1_000_000;
        let dense = Codec::TopK { per_million: 20_000 }.encoded_len(n);
        let two = Codec::TopKQuant { per_million: 20_000, bits: 2 }.encoded_len(n);
        assert_eq!(two, 4 * 20_000 + 4 + 5_000);
        assert!(dense as f64 / two as f64 > 1.8, "{dense} vs {two}");
        assert!(Codec::F32.encoded_len(n) / two > 45);
    }

    #[test]
    fn error_feedback_delivers_everything_eventually() {
        for codec in [Codec::TopK { per_million: 20_000 }, Codec::TopKQuant { per_million: 20_000, bits: 2 }] {
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
            let decoded = codec.decode(&feedback.encode(codec, &delta), n).expect("decode");
            sent.iter_mut().zip(&decoded).for_each(|(s, d)| *s += d);
        }
        // What was sent plus what is still carried is exactly what was produced.
        for i in 0..n {
            assert!((sent[i] + feedback.residual()[i] - total[i]).abs() <= 1e-4 * (1.0 + total[i].abs()));
        }
    }
}
