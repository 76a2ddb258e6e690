//! The data pipeline: deterministic splits, shard assignment and batches.
//!
//! Examples are 8×8 images with pixel intensities 0..=16 and a label 0..=9. A shard travels in
//! a small binary form (see [`DigitsSet::to_bytes`]) that the relay serves over HTTP.

use crate::crypto::PeerKey;
use crate::model::{DIGITS_CLASSES, DIGITS_INPUTS};

const SHARD_MAGIC: &[u8; 4] = b"STD1";
/// Largest pixel intensity in the digits data.
pub const MAX_PIXEL: u8 = 16;

/// Why shard bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataError {
    #[error("shard is malformed: {0}")]
    Malformed(&'static str),
    #[error("pixel value {0} is out of range 0..=16")]
    Pixel(u8),
    #[error("label {0} is out of range 0..=9")]
    Label(u8),
}

/// A set of digits examples, row-major: `pixels[i * 64 .. (i + 1) * 64]` is example `i`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DigitsSet {
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl DigitsSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Builds a set, checking every pixel and label.
    pub fn new(pixels: Vec<u8>, labels: Vec<u8>) -> Result<Self, DataError> {
        if pixels.len() != labels.len() * DIGITS_INPUTS {
            return Err(DataError::Malformed(
                "pixel count does not match label count",
            ));
        }
        if let Some(&p) = pixels.iter().find(|&&p| p > MAX_PIXEL) {
            return Err(DataError::Pixel(p));
        }
        if let Some(&l) = labels.iter().find(|&&l| usize::from(l) >= DIGITS_CLASSES) {
            return Err(DataError::Label(l));
        }
        Ok(Self { pixels, labels })
    }

    /// The examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Self {
        let mut out = Self::default();
        for &i in indices {
            out.pixels
                .extend_from_slice(&self.pixels[i * DIGITS_INPUTS..(i + 1) * DIGITS_INPUTS]);
            out.labels.push(self.labels[i]);
        }
        out
    }

    /// `STD1`, u32 LE count, count×64 pixel bytes, count label bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.pixels.len() + self.labels.len());
        out.extend_from_slice(SHARD_MAGIC);
        out.extend_from_slice(&(self.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.pixels);
        out.extend_from_slice(&self.labels);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DataError> {
        let rest = bytes
            .strip_prefix(SHARD_MAGIC)
            .ok_or(DataError::Malformed("bad magic"))?;
        let (count, rest) = rest
            .split_at_checked(4)
            .ok_or(DataError::Malformed("truncated header"))?;
        let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
        let pixel_bytes = count
            .checked_mul(DIGITS_INPUTS)
            .ok_or(DataError::Malformed("count overflows"))?;
        if rest.len() != pixel_bytes + count {
            return Err(DataError::Malformed("length does not match count"));
        }
        let (pixels, labels) = rest.split_at(pixel_bytes);
        Self::new(pixels.to_vec(), labels.to_vec())
    }

    /// Pixels scaled to [0, 1] for the examples at `indices`, row-major `[indices.len(), 64]`.
    pub fn features(&self, indices: &[usize]) -> Vec<f32> {
        let scale = 1.0 / f32::from(MAX_PIXEL);
        indices
            .iter()
            .flat_map(|&i| self.pixels[i * DIGITS_INPUTS..(i + 1) * DIGITS_INPUTS].iter())
            .map(|&p| f32::from(p) * scale)
            .collect()
    }

    pub fn targets(&self, indices: &[usize]) -> Vec<i64> {
        indices.iter().map(|&i| i64::from(self.labels[i])).collect()
    }
}

/// SplitMix64: a tiny, portable, seedable generator, identical on every platform.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by rejection: no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Moves a uniform draw of `k` of `items` (without replacement) to the front and returns
    /// it: a partial Fisher–Yates shuffle, `k` swaps.
    pub fn choose<'a, T>(&mut self, items: &'a mut [T], k: usize) -> &'a mut [T] {
        let k = k.min(items.len());
        for i in 0..k {
            let j = i + self.below((items.len() - i) as u64) as usize;
            items.swap(i, j);
        }
        &mut items[..k]
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A seed derived from labelled parts, so that unrelated uses never share a stream.
pub fn derive_seed(label: &str, parts: &[&[u8]]) -> u64 {
    let mut hasher = blake3::Hasher::new_derive_key("swarmtrain seed v1");
    hasher.update(label.as_bytes());
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let bytes = hasher.finalize();
    let b = bytes.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Deterministically splits `0..n` into (train, held-out) with `held_out` held-out examples.
pub fn split_indices(n: usize, held_out: usize, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut all: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut all);
    let test = all.split_off(n.saturating_sub(held_out));
    (all, test)
}

/// Cuts `indices` into `n_shards` disjoint, contiguous shards of near-equal size.
pub fn shard_indices(indices: &[usize], n_shards: usize) -> Vec<Vec<usize>> {
    let n_shards = n_shards.max(1);
    (0..n_shards)
        .map(|s| indices[s * indices.len() / n_shards..(s + 1) * indices.len() / n_shards].to_vec())
        .collect()
}

/// The shard that `peer` trains on in `round` of `run_id`: deterministic, so the relay and the
/// peer agree on it without talking, and spread evenly across peers and rounds.
pub fn assign_shard(run_id: &str, round: u64, peer: &PeerKey, n_shards: u32) -> u32 {
    let seed = derive_seed("shard", &[run_id.as_bytes(), &round.to_le_bytes(), &peer.0]);
    SplitMix64::new(seed).below(u64::from(n_shards.max(1))) as u32
}

/// Draws mini-batches of indices into a set of `len` examples: epochs of a seeded permutation.
#[derive(Clone, Debug)]
pub struct BatchSampler {
    rng: SplitMix64,
    order: Vec<usize>,
    cursor: usize,
    batch_size: usize,
}

impl BatchSampler {
    pub fn new(len: usize, batch_size: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let mut order: Vec<usize> = (0..len).collect();
        rng.shuffle(&mut order);
        Self {
            rng,
            order,
            cursor: 0,
            batch_size: batch_size.clamp(1, len.max(1)),
        }
    }

    /// The next batch: always `batch_size` indices (fewer only if the set is smaller).
    pub fn next_batch(&mut self) -> Vec<usize> {
        let mut batch = Vec::with_capacity(self.batch_size);
        while batch.len() < self.batch_size.min(self.order.len()) {
            if self.cursor == self.order.len() {
                self.rng.shuffle(&mut self.order);
                self.cursor = 0;
            }
            batch.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> DigitsSet {
        let pixels = (0..n * 64).map(|i| (i % 17) as u8).collect();
        let labels = (0..n).map(|i| (i % 10) as u8).collect();
        DigitsSet::new(pixels, labels).expect("valid")
    }

    #[test]
    fn shard_bytes_round_trip_and_reject_bad_input() {
        let s = set(5);
        assert_eq!(DigitsSet::from_bytes(&s.to_bytes()).expect("decode"), s);
        let bytes = s.to_bytes();
        assert!(DigitsSet::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(DigitsSet::from_bytes(b"XXXX").is_err());
        let mut bad_label = bytes.clone();
        *bad_label.last_mut().expect("non-empty") = 10;
        assert_eq!(DigitsSet::from_bytes(&bad_label), Err(DataError::Label(10)));
        let mut huge = bytes[..8].to_vec();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(DigitsSet::from_bytes(&huge).is_err());
    }

    #[test]
    fn split_and_shards_are_disjoint_deterministic_and_complete() {
        let (train, test) = split_indices(100, 20, 9);
        assert_eq!((train.len(), test.len()), (80, 20));
        assert_eq!(split_indices(100, 20, 9), (train.clone(), test.clone()));
        let shards = shard_indices(&train, 3);
        let mut all: Vec<usize> = shards.concat();
        all.extend(&test);
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn shard_assignment_is_deterministic_and_spread() {
        let peers: Vec<PeerKey> = (0..64u8).map(|i| PeerKey([i; 32])).collect();
        let mut counts = [0u32; 4];
        for p in &peers {
            let s = assign_shard("run", 3, p, 4);
            assert_eq!(s, assign_shard("run", 3, p, 4));
            counts[s as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c >= 8), "{counts:?}");
        let moved = peers
            .iter()
            .filter(|p| assign_shard("run", 3, p, 4) != assign_shard("run", 4, p, 4))
            .count();
        assert!(
            moved > 16,
            "shards should rotate between rounds, {moved} moved"
        );
    }

    #[test]
    fn sampler_covers_each_epoch_once() {
        let mut sampler = BatchSampler::new(10, 4, 1);
        let mut seen: Vec<usize> = (0..5).flat_map(|_| sampler.next_batch()).collect();
        assert_eq!(seen.len(), 20);
        seen.truncate(10);
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }
}
