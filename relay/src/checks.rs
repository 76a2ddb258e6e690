//! The relay's two checks of accepted updates. The replay ([`replay_update`],
//! [`swarmtrain_shared::replay`]): an update drawn after its round closed is run again from
//! the state its peer revealed and compared with what the peer sent; it costs about a round of
//! the peer's training on the relay's CPU, so the operator draws a fraction
//! ([`ReplayPolicy`]); volunteer verifiers may run it instead, and the relay then only
//! [`compare`]s what their replay gave (and replays the share it spot-checks). The loss check ([`swarmtrain_shared::verify`]) of every other update:
//! after a round closes, each of its updates is scored on windows its peer trained on against windows
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
use std::sync::Arc;
use std::time::Duration;

use burn::backend::NdArray;
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::aggregate::Contribution;
use swarmtrain_shared::data::{SplitMix64, derive_seed};
use swarmtrain_shared::protocol::{ModelConfig, ParamsHash, PayloadRef, RunSpec};
use swarmtrain_shared::replay::{self, CommittedState, ReplayCheck, RoundInputs};
use swarmtrain_shared::robust::{self, Rule};
use swarmtrain_shared::verify::{self, CheckPolicy, LossCheck, Outcome};

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
    /// The training state it committed to ([`swarmtrain_shared::protocol::Update::state`]).
    pub state: PayloadRef,
}

/// How many updates the relay replays ([`replay_update`]): the operator's choice of the
/// chance to catch a cheating round and the verifier's CPU (each replay costs about a round of
/// the peer's training on the relay's CPU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplayPolicy {
    /// Each accepted update of a language-model run is drawn for a replay with this
    /// probability (0 turns replays off).
    pub fraction: f64,
    /// At most this many replays a round (drawn at random among those drawn).
    pub per_round: usize,
    /// The largest relative distance ([`replay::relative_distance`]) at which a replay that is
    /// not the peer's payload bit for bit still verifies it: the replay runs the relay's CPU
    /// kernels, and a peer on WebGPU, or on a CPU whose kernels round differently (another
    /// SIMD set, WebAssembly), lands near it rather than on it.
    pub tolerance: f32,
    /// How long a revealed update waits for a volunteer verifier to replay it before the relay
    /// replays it itself (it replays at once when no verifier has asked for work lately).
    pub verifier_timeout: Duration,
    /// The chance that the relay replays an update a verifier verified once more itself; a
    /// verifier's failing verdict is always replayed again (so a lying verifier cannot cost an
    /// honest peer its credit).
    pub spot_check: f64,
}

impl Default for ReplayPolicy {
    fn default() -> Self {
        Self {
            fraction: 0.1,
            per_round: 4,
            tolerance: 0.05,
            verifier_timeout: Duration::from_secs(60),
            spot_check: 0.25,
        }
    }
}

/// An update drawn for a replay: what the replay needs besides the peer's reveal.
#[derive(Clone, Debug)]
pub struct Audit {
    pub peer: PeerKey,
    pub round: u64,
    /// θ of the round, and its hash (what a verifier fetches it by).
    pub theta: Arc<Vec<f32>>,
    pub theta_hash: ParamsHash,
    /// The update as the relay decoded it.
    pub delta: Vec<f32>,
    pub claim: Claim,
}

/// Replays `audit`'s round from the revealed `state` bytes (blocking: a round of training on
/// the CPU) and judges it: the payload bit for bit, or a decoded update within
/// `policy.tolerance` of the replay's, verifies the update; anything else fails it.
pub fn replay_update(
    spec: &RunSpec,
    data: &TaskData,
    policy: &ReplayPolicy,
    audit: &Audit,
    state: &[u8],
) -> (Option<ReplayCheck>, Outcome) {
    let failed = |reason: String| (None, Outcome::Failed { reason });
    let (TaskData::Text(text), ModelConfig::Lm(config)) = (data, spec.model.config()) else {
        return (
            None,
            Outcome::Inconclusive {
                reason: "replays cover language-model runs".into(),
            },
        );
    };
    let Some(committed) = CommittedState::from_bytes(state) else {
        return failed("the revealed state does not decode".into());
    };
    let claim = &audit.claim;
    let given = text.shards.shard(
        audit.round,
        claim.slot,
        spec.data.n_shards,
        spec.inner.steps,
        spec.inner.batch_size as usize,
    );
    let inputs = RoundInputs::of_update(
        spec,
        &config,
        &audit.theta,
        audit.round,
        claim.steps,
        &given,
    );
    let device = burn::backend::ndarray::NdArrayDevice::Cpu;
    let replayed = match futures::executor::block_on(replay::replay_lm::<
        burn::backend::Autodiff<NdArray>,
    >(&device, &inputs, &committed))
    {
        Ok(replayed) => replayed,
        Err(e) => return failed(format!("the revealed state cannot be replayed: {e}")),
    };
    let check = compare(spec, audit, &replayed);
    (Some(check), replay::judge(&check, policy.tolerance))
}

/// How far `audit`'s update lands from `replayed`, the payload a replay of it gave (the relay's
/// or a verifier's).
pub fn compare(spec: &RunSpec, audit: &Audit, replayed: &[u8]) -> ReplayCheck {
    replay::compare(
        spec.codec,
        audit.claim.steps,
        &audit.delta,
        &audit.claim.payload,
        replayed,
    )
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
