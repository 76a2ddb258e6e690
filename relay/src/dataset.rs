//! The digits data set (scikit-learn's 1,797 8×8 images, shipped inside the `smartcore` crate),
//! split into a held-out set and training shards.

use swarmtrain_shared::data::{self, DigitsSet};
use swarmtrain_shared::model::DIGITS_INPUTS;

/// Examples kept out of training to measure accuracy after every round.
pub const HELD_OUT: usize = 297;

/// The training shards and the held-out set of a run.
#[derive(Clone, Debug)]
pub struct RunData {
    pub shards: Vec<DigitsSet>,
    pub held_out: DigitsSet,
}

/// Loads the digits and splits them deterministically for `run_id`.
pub fn digits(run_id: &str, n_shards: usize) -> anyhow::Result<RunData> {
    let raw = smartcore::dataset::digits::load_dataset();
    anyhow::ensure!(raw.num_features == DIGITS_INPUTS, "digits have {} features, expected 64", raw.num_features);
    let pixels = raw.data.iter().map(|&v| v.clamp(0.0, 16.0).round() as u8).collect();
    let labels = raw.target.iter().map(|&v| v.round() as u8).collect();
    let all = DigitsSet::new(pixels, labels)?;
    let (train, test) = data::split_indices(all.len(), HELD_OUT, data::derive_seed("split", &[run_id.as_bytes()]));
    let shards = data::shard_indices(&train, n_shards).iter().map(|idx| all.select(idx)).collect();
    Ok(RunData { shards, held_out: all.select(&test) })
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
}
