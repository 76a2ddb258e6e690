//! A run's data: the digits (scikit-learn's 1,797 8×8 images, shipped inside the `smartcore`
//! crate) split into a held-out set and training shards, or a text corpus split into training
//! windows, served per (round, slot), and held-out windows.

use swarmtrain_shared::data::{self, DigitsSet};
use swarmtrain_shared::model::DIGITS_INPUTS;
use swarmtrain_shared::text::{Shards, TextCorpus, TextError};

/// Held-out windows the relay evaluates a language model on after every round.
pub const EVAL_WINDOWS: usize = 256;

/// What a run trains on.
#[derive(Clone, Debug)]
pub enum TaskData {
    Digits(RunData),
    Text(TextData),
}

/// A text corpus cut for one run: the same split and window order as the simulator's
/// (`TextCorpus::new` and `Shards::new` with the run's seed).
#[derive(Clone, Debug)]
pub struct TextData {
    pub shards: Shards,
    /// `eval_count` held-out windows of `context + 1` bytes, concatenated.
    pub validation: Vec<u8>,
    pub eval_count: usize,
    /// Training bytes (for the status page).
    pub train_bytes: usize,
}

impl TextData {
    /// Splits `text` for a model with `context` bytes of context; `seed` fixes the split and the
    /// window order.
    pub fn new(text: &[u8], context: usize, seed: u64) -> Result<Self, TextError> {
        let window = context + 1;
        let corpus = TextCorpus::new(text, window, seed)?;
        let (validation, eval_count) = corpus.validation_windows(window, EVAL_WINDOWS);
        Ok(Self {
            shards: Shards::new(&corpus, window, seed),
            validation,
            eval_count,
            train_bytes: corpus.train().len(),
        })
    }
}

/// Examples kept out of training to measure accuracy after every round.
pub const HELD_OUT: usize = 297;

/// The training shards and the held-out set of a run.
#[derive(Clone, Debug)]
pub struct RunData {
    pub shards: Vec<DigitsSet>,
    pub held_out: DigitsSet,
}

/// Loads the digits and splits them deterministically for `run_id`: IID shards.
pub fn digits(run_id: &str, n_shards: usize) -> anyhow::Result<RunData> {
    digits_split(run_id, n_shards, None)
}

/// Like [`digits`], but label-skewed (non-IID, as McMahan et al. 2017 split MNIST): the training
/// examples are sorted by label and cut into `runs_per_shard × n_shards` runs, and shard `s` gets
/// runs `s, s + n_shards, …`, so each shard holds about `runs_per_shard` classes.
pub fn digits_label_skewed(
    run_id: &str,
    n_shards: usize,
    runs_per_shard: usize,
) -> anyhow::Result<RunData> {
    anyhow::ensure!(runs_per_shard >= 1, "runs per shard must be at least 1");
    digits_split(run_id, n_shards, Some(runs_per_shard))
}

fn digits_split(run_id: &str, n_shards: usize, skew: Option<usize>) -> anyhow::Result<RunData> {
    let raw = smartcore::dataset::digits::load_dataset();
    anyhow::ensure!(
        raw.num_features == DIGITS_INPUTS,
        "digits have {} features, expected 64",
        raw.num_features
    );
    let pixels = raw
        .data
        .iter()
        .map(|&v| v.clamp(0.0, 16.0).round() as u8)
        .collect();
    let labels = raw.target.iter().map(|&v| v.round() as u8).collect();
    let all = DigitsSet::new(pixels, labels)?;
    let (mut train, test) = data::split_indices(
        all.len(),
        HELD_OUT,
        data::derive_seed("split", &[run_id.as_bytes()]),
    );
    let shards = match skew {
        None => data::shard_indices(&train, n_shards),
        Some(runs) => {
            let n_shards = n_shards.max(1);
            train.sort_by_key(|&i| all.labels[i]);
            let pieces = data::shard_indices(&train, n_shards * runs);
            (0..n_shards)
                .map(|s| {
                    pieces
                        .iter()
                        .skip(s)
                        .step_by(n_shards)
                        .flatten()
                        .copied()
                        .collect()
                })
                .collect()
        }
    };
    Ok(RunData {
        shards: shards.iter().map(|idx| all.select(idx)).collect(),
        held_out: all.select(&test),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_load_and_split_into_disjoint_parts() {
        let data = digits("test", 8).expect("digits");
        let train: usize = data.shards.iter().map(DigitsSet::len).sum();
        assert_eq!(train + data.held_out.len(), 1797);
        assert_eq!(data.held_out.len(), HELD_OUT);
        assert!(data.shards.iter().all(|s| s.len() >= 180));
        let mut classes = data.held_out.labels.clone();
        classes.sort_unstable();
        classes.dedup();
        assert_eq!(classes.len(), 10, "every class is in the held-out set");
    }

    #[test]
    fn label_skewed_shards_hold_few_classes_and_every_example() {
        let iid = digits("test", 20).expect("digits");
        let skewed = digits_label_skewed("test", 20, 2).expect("digits");
        let count = |d: &RunData| d.shards.iter().map(DigitsSet::len).sum::<usize>();
        assert_eq!(count(&skewed), count(&iid));
        assert_eq!(skewed.held_out.labels, iid.held_out.labels);
        for shard in &skewed.shards {
            let mut classes = shard.labels.clone();
            classes.sort_unstable();
            classes.dedup();
            assert!(
                classes.len() <= 4,
                "a skewed shard has {} classes",
                classes.len()
            );
        }
        let classes = |d: &RunData| {
            d.shards
                .iter()
                .map(|s| {
                    let mut c = s.labels.clone();
                    c.sort_unstable();
                    c.dedup();
                    c.len()
                })
                .sum::<usize>()
        };
        assert!(classes(&iid) > 2 * classes(&skewed));
        assert!(digits_label_skewed("test", 20, 0).is_err());
    }
}
