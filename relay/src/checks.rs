//! The relay's loss check of every accepted update ([`swarmtrain_shared::verify`]): after a
//! round closes, each of its updates is scored on windows its peer trained on against windows
//! nobody was given, paired against the coordinate-wise median of (up to 8 of) the round's
//! other updates, and the round's scores are judged together. The relay signs a [`Verdict`] for each update, keeps it in its
//! ledger and settles the peer's credit by it.
//!
//! The check runs beside the next round, off the round's path: one round's checks at a time
//! per run, at most 256 MiB of θ and updates queued (a round that would pass it is not
//! checked: its updates stay unchecked, never failed), and at most 64 updates of a round, drawn at random
//! after it closed when there are more. Its cost is the operator's: `--check-windows` windows
//! on each side, three forward passes (two over `2 × windows` windows, one over `windows`)
//! per update.

use std::collections::BTreeMap;

use burn::backend::NdArray;
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::aggregate::Contribution;
use swarmtrain_shared::data::{SplitMix64, derive_seed};
use swarmtrain_shared::protocol::{ModelConfig, RunSpec};
use swarmtrain_shared::robust::{self, Rule};
use swarmtrain_shared::verify::{self, CheckPolicy, LossCheck};

use crate::dataset::TaskData;

/// What an accepted update claims, kept until its round is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The data slot its peer was given (which windows it trained on).
    pub slot: u32,
    /// Inner steps it reports (at most the run's).
    pub steps: u32,
    /// Samples it is credited with ([`RunSpec::samples_of`]).
    pub samples: u64,
    /// Its payload's digest, as the peer signed it.
    pub payload: [u8; 32],
}

/// One closed round's updates, to be checked.
#[derive(Debug)]
pub struct CheckJob {
    pub round: u64,
    /// θ_t, which every update of the round started from.
    pub theta: Vec<f32>,
    /// The decoded updates, in peer order.
    pub contributions: Vec<Contribution>,
    /// What each update claims (updates resumed after a restart have no claim).
    pub claims: BTreeMap<PeerKey, Claim>,
}

impl CheckJob {
    /// Every update of the job, not checked for `why`.
    pub fn skipped(&self, why: &str) -> Vec<(PeerKey, Checked)> {
        self.contributions
            .iter()
            .map(|c| (c.peer, Checked::Skipped(why.to_owned())))
            .collect()
    }
}

/// What the check made of one update before the round is judged.
#[derive(Clone, Debug, PartialEq)]
pub enum Checked {
    /// Scored: `None` for a zero Δ (no work at all).
    Scored(Option<LossCheck>),
    /// Not checked, and why.
    Skipped(String),
}

/// Global step far past any run's end: windows drawn from there were given to no peer.
const UNGIVEN_STEP: u64 = 1 << 40;

/// Checks the updates of `job` (blocking: the model's forward passes). `seed` is drawn after
/// the round closed, so no peer knew which windows would be scored.
pub fn check_round(
    spec: &RunSpec,
    data: &TaskData,
    policy: &CheckPolicy,
    job: &CheckJob,
    seed: u64,
) -> Vec<(PeerKey, Checked)> {
    let (TaskData::Text(text), ModelConfig::Lm(config)) = (data, spec.model.config()) else {
        return job.skipped("the loss check covers language-model runs");
    };
    if policy.windows == 0 {
        return job.skipped("the relay's checks are off (--check-windows 0)");
    }
    let device = burn::backend::ndarray::NdArrayDevice::Cpu;
    let window = config.context + 1;
    let k = policy.windows as usize;
    let batch = spec.inner.batch_size as usize;
    let others = job.contributions.len().saturating_sub(1);
    job.contributions
        .iter()
        .map(|c| {
            let Some(claim) = job.claims.get(&c.peer) else {
                let why = "resumed after a restart: its claim was not kept";
                return (c.peer, Checked::Skipped(why.into()));
            };
            if c.delta.iter().all(|d| *d == 0.0) {
                return (c.peer, Checked::Scored(None));
            }
            let peer_seed = derive_seed("check", &[&seed.to_le_bytes(), &c.peer.0]);
            // The windows of the steps it claims: the first `steps` of its slot's round.
            let mut given = text.shards.shard(
                job.round,
                claim.slot,
                spec.data.n_shards,
                spec.inner.steps,
                batch,
            );
            given.truncate(claim.steps as usize * batch * window);
            let own = verify::draw_windows(&given, window, k, peer_seed);
            let other = text.shards.batch(0, 1, UNGIVEN_STEP + (peer_seed >> 24), k);
            let reference = (others > 0)
                .then(|| reference(&job.contributions, &c.peer, peer_seed))
                .flatten();
            let checked = futures::executor::block_on(verify::lm_loss_check::<NdArray>(
                &device,
                &config,
                &job.theta,
                &c.delta,
                reference.as_deref(),
                &own,
                &other,
            ));
            match checked {
                Ok(check) => (c.peer, Checked::Scored(Some(check))),
                Err(e) => (c.peer, Checked::Skipped(format!("the check failed: {e}"))),
            }
        })
        .collect()
}

/// Updates of the round a reference is the median of, at most.
const REFERENCE_UPDATES: usize = 8;

/// The reference for `peer`'s update: the coordinate-wise median of up to
/// [`REFERENCE_UPDATES`] of the round's other updates (drawn with `seed` when there are more),
/// with the median rule's own kernel ([`robust::aggregate`]). A median, so that a few false
/// updates among them (a huge Δ, noise) do not make it; `None` if it cannot be taken.
fn reference(contributions: &[Contribution], peer: &PeerKey, seed: u64) -> Option<Vec<f32>> {
    let mut others: Vec<&Contribution> = contributions.iter().filter(|c| &c.peer != peer).collect();
    let drawn: Vec<Contribution> = SplitMix64::new(seed)
        .choose(&mut others, REFERENCE_UPDATES)
        .iter()
        .map(|c| (*c).clone())
        .collect();
    let n = drawn.first()?.delta.len();
    robust::aggregate(&Rule::Median, &drawn, n, None).ok()
}
