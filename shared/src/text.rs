//! Text data for the language model: byte tokens, a train/validation split, and deterministic
//! shards per (run, round, peer).
//!
//! The training bytes are cut into non-overlapping windows of `context + 1` bytes. Window
//! *slots* are numbered globally: at inner step `s` of a run with `n` peers and batch `b`, peer
//! `p` trains on slots `(s·n + p)·b .. (s·n + p + 1)·b`. Slot `i` reads window
//! `π_e(i mod W)` of epoch `e = i / W`, where `π_e` is a seeded permutation of the `W` windows.
//! So within an epoch no two (step, peer) pairs share a window, every peer and the relay can
//! compute any shard from the run seed alone, and the data-parallel baseline (which at step `s`
//! trains on all `n` peers' slots at once) sees exactly the bytes the DiLoCo peers see.

use crate::data::{SplitMix64, derive_seed};

/// Byte-level tokens: UTF-8 bytes are the vocabulary (256 symbols), nothing to ship or train.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const VOCAB: usize = 256;

    pub fn encode(self, text: &str) -> Vec<u8> {
        text.as_bytes().to_vec()
    }

    /// Decodes tokens, replacing invalid UTF-8 (a model may emit half a character) with U+FFFD.
    pub fn decode(self, tokens: &[u8]) -> String {
        String::from_utf8_lossy(tokens).into_owned()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    #[error("the corpus is not UTF-8 text (invalid byte at offset {0})")]
    NotUtf8(usize),
    #[error("the corpus has {got} bytes; at least {need} are needed for windows of {window} bytes")]
    TooSmall {
        got: usize,
        need: usize,
        window: usize,
    },
}

/// Size of the blocks that are assigned to train or validation as a whole.
pub const SPLIT_BLOCK: usize = 4096;
/// One block in this many is held out for validation.
pub const VALIDATION_EVERY: u64 = 20;

/// A UTF-8 corpus split into training and validation bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextCorpus {
    train: Vec<u8>,
    validation: Vec<u8>,
}

impl TextCorpus {
    /// Splits `text` by blocks of [`SPLIT_BLOCK`] bytes: a seeded 1 in [`VALIDATION_EVERY`] is
    /// held out (at least one block), the rest is training text.
    pub fn new(text: &[u8], window: usize, seed: u64) -> Result<Self, TextError> {
        if let Err(e) = core::str::from_utf8(text) {
            return Err(TextError::NotUtf8(e.valid_up_to()));
        }
        let need = 2 * SPLIT_BLOCK.max(window * 8);
        if text.len() < need {
            return Err(TextError::TooSmall {
                got: text.len(),
                need,
                window,
            });
        }
        let blocks: Vec<&[u8]> = text.chunks(SPLIT_BLOCK).collect();
        let mut rng = SplitMix64::new(derive_seed("text split", &[&seed.to_le_bytes()]));
        let mut held: Vec<bool> = blocks
            .iter()
            .map(|_| rng.below(VALIDATION_EVERY) == 0)
            .collect();
        if !held.iter().any(|h| *h) {
            held[blocks.len() / 2] = true;
        }
        let (mut train, mut validation) = (Vec::new(), Vec::new());
        for (block, held) in blocks.iter().zip(held) {
            if held {
                validation.extend_from_slice(block)
            } else {
                train.extend_from_slice(block)
            }
        }
        Ok(Self { train, validation })
    }

    pub fn train(&self) -> &[u8] {
        &self.train
    }

    pub fn validation(&self) -> &[u8] {
        &self.validation
    }

    /// Up to `max` validation windows of `window` bytes, evenly spaced across the whole
    /// validation split (every one when it holds no more than `max`), concatenated
    /// (`count · window` bytes): a fixed evaluation set that samples every part of the corpus
    /// the split held out, not only its first files.
    pub fn validation_windows(&self, window: usize, max: usize) -> (Vec<u8>, usize) {
        let total = self.validation.len() / window.max(1);
        let count = total.min(max);
        let mut out = Vec::with_capacity(count * window);
        for i in 0..count {
            // Window i·total/count: strictly increasing, so no window is taken twice.
            let at = i * total / count * window;
            out.extend_from_slice(&self.validation[at..at + window]);
        }
        (out, count)
    }
}

/// The deterministic shard plan of one run over a corpus' training bytes.
#[derive(Clone, Debug)]
pub struct Shards {
    train: Vec<u8>,
    window: usize,
    windows: u64,
    seed: u64,
}

impl Shards {
    /// `window` is `context + 1` bytes; `run_seed` fixes the order of every epoch.
    pub fn new(corpus: &TextCorpus, window: usize, run_seed: u64) -> Self {
        let windows = (corpus.train.len() / window) as u64;
        Self {
            train: corpus.train.clone(),
            window,
            windows,
            seed: run_seed,
        }
    }

    /// Training windows per epoch.
    pub fn windows(&self) -> u64 {
        self.windows
    }

    pub fn window_len(&self) -> usize {
        self.window
    }

    /// The window that global slot `slot` reads: an affine permutation `a·i + b mod W` per epoch,
    /// with `a` coprime to `W` (a bijection, O(1) to evaluate anywhere).
    pub fn window_of_slot(&self, slot: u64) -> u64 {
        let w = self.windows;
        let (epoch, i) = (slot / w, slot % w);
        let mut rng = SplitMix64::new(derive_seed(
            "text epoch",
            &[&self.seed.to_le_bytes(), &epoch.to_le_bytes()],
        ));
        let a = loop {
            let a = 1 + rng.below(w.max(2) - 1);
            if gcd(a, w) == 1 {
                break a;
            }
        };
        let b = rng.below(w);
        ((u128::from(a) * u128::from(i) + u128::from(b)) % u128::from(w)) as u64
    }

    /// The bytes of window `index`.
    pub fn window(&self, index: u64) -> &[u8] {
        let start = index as usize * self.window;
        &self.train[start..start + self.window]
    }

    /// The `batch` windows that `peer` (of `peers`) trains on at inner step `step`,
    /// concatenated: `batch · window` bytes.
    pub fn batch(&self, peer: u32, peers: u32, step: u64, batch: usize) -> Vec<u8> {
        let first = (step * u64::from(peers) + u64::from(peer)) * batch as u64;
        let mut out = Vec::with_capacity(batch * self.window);
        for slot in first..first + batch as u64 {
            out.extend_from_slice(self.window(self.window_of_slot(slot)));
        }
        out
    }

    /// What `peer` trains on in `round` when a round is `inner_steps` steps: the round's shard.
    pub fn shard(
        &self,
        round: u64,
        peer: u32,
        peers: u32,
        inner_steps: u32,
        batch: usize,
    ) -> Vec<u8> {
        let first = round * u64::from(inner_steps);
        (first..first + u64::from(inner_steps))
            .flat_map(|step| self.batch(peer, peers, step, batch))
            .collect()
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn text(n: usize) -> Vec<u8> {
        let words = [
            "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "a ", "lazy ", "dog. ",
        ];
        let mut rng = SplitMix64::new(3);
        let mut out = Vec::new();
        while out.len() < n {
            out.extend_from_slice(words[rng.below(words.len() as u64) as usize].as_bytes());
        }
        out.truncate(n);
        out
    }

    #[test]
    fn split_is_deterministic_disjoint_and_complete() {
        let t = text(200_000);
        let a = TextCorpus::new(&t, 65, 7).expect("corpus");
        assert_eq!(a, TextCorpus::new(&t, 65, 7).expect("corpus"));
        assert_eq!(a.train().len() + a.validation().len(), t.len());
        let share = a.validation().len() as f64 / t.len() as f64;
        assert!((0.01..0.15).contains(&share), "validation share {share}");
        assert_ne!(
            a,
            TextCorpus::new(&t, 65, 8).expect("corpus"),
            "the seed picks the blocks"
        );
    }

    #[test]
    fn held_out_windows_span_the_whole_validation_split() {
        let t = text(400_000);
        let corpus = TextCorpus::new(&t, 65, 7).expect("corpus");
        let total = corpus.validation().len() / 65;
        assert!(total > 40, "{total} validation windows");
        let (windows, count) = corpus.validation_windows(65, 16);
        assert_eq!((count, windows.len()), (16, 16 * 65));
        // Each is a window of the split, at offsets spread from its start to its end.
        let offsets: Vec<usize> = windows
            .chunks(65)
            .map(|w| {
                (0..total)
                    .map(|k| k * 65)
                    .find(|&at| &corpus.validation()[at..at + 65] == w)
                    .expect("a window of the validation split")
            })
            .collect();
        assert!(offsets.windows(2).all(|p| p[0] < p[1]), "{offsets:?}");
        assert_eq!(offsets[0], 0);
        assert!(
            *offsets.last().expect("some") >= (total - total / 16 - 1) * 65,
            "the last window comes from the end of the split: {offsets:?} of {total}"
        );
        // Asked for more than there are: all of them, in order.
        let (all, n) = corpus.validation_windows(65, usize::MAX);
        assert_eq!(
            (n, all.as_slice()),
            (total, &corpus.validation()[..total * 65])
        );
    }

    #[test]
    fn bad_corpora_are_errors() {
        let mut t = text(100_000);
        t[500] = 0xff;
        assert_eq!(TextCorpus::new(&t, 65, 1), Err(TextError::NotUtf8(500)));
        assert!(matches!(
            TextCorpus::new(b"tiny", 65, 1),
            Err(TextError::TooSmall { got: 4, .. })
        ));
    }

    #[test]
    fn shards_are_disjoint_within_an_epoch_and_deterministic() {
        let corpus = TextCorpus::new(&text(300_000), 33, 1).expect("corpus");
        let shards = Shards::new(&corpus, 33, 42);
        let w = shards.windows();
        let (peers, batch, steps) = (8u32, 4usize, 5u32);
        // Rounds × peers × steps × batch slots, all within the first epoch.
        let rounds = w / (u64::from(peers) * batch as u64 * u64::from(steps));
        assert!(rounds >= 3, "corpus too small for the test: {w} windows");
        let mut seen = HashSet::new();
        for round in 0..rounds {
            for peer in 0..peers {
                for step in round * u64::from(steps)..(round + 1) * u64::from(steps) {
                    let slot0 = (step * u64::from(peers) + u64::from(peer)) * batch as u64;
                    for slot in slot0..slot0 + batch as u64 {
                        assert!(
                            seen.insert(shards.window_of_slot(slot)),
                            "window reused in epoch 0"
                        );
                    }
                }
                let shard = shards.shard(round, peer, peers, steps, batch);
                assert_eq!(shard.len(), steps as usize * batch * 33);
                assert_eq!(
                    shard,
                    Shards::new(&corpus, 33, 42).shard(round, peer, peers, steps, batch),
                    "deterministic"
                );
            }
        }
        // The next epoch is a different order of the same windows.
        let epoch1: HashSet<u64> = (w..2 * w).map(|s| shards.window_of_slot(s)).collect();
        assert_eq!(epoch1.len() as u64, w, "each epoch is a permutation");
        let order0: Vec<u64> = (0..16).map(|s| shards.window_of_slot(s)).collect();
        let order1: Vec<u64> = (w..w + 16).map(|s| shards.window_of_slot(s)).collect();
        assert_ne!(order0, order1);
        // Another run seed, another order.
        let other = Shards::new(&corpus, 33, 43);
        assert_ne!(
            order0,
            (0..16).map(|s| other.window_of_slot(s)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_data_parallel_batch_is_the_peers_batches() {
        let corpus = TextCorpus::new(&text(100_000), 17, 1).expect("corpus");
        let shards = Shards::new(&corpus, 17, 5);
        let together = shards.batch(0, 1, 3, 8 * 4);
        let apart: Vec<u8> = (0..8).flat_map(|p| shards.batch(p, 8, 3, 4)).collect();
        assert_eq!(together, apart);
    }
}
