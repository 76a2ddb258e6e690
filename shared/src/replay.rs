//! The second check behind a volunteer's credit: replaying a round exactly.
//!
//! A language-model update is decided by θ_t, the round's windows (which the relay serves), the
//! steps the peer reports, and what the peer carried into the round: its AdamW moments and
//! schedule position ([`TrainerState`]) and its error-feedback residual. Each update commits to
//! that carried state by digest ([`crate::protocol::Update::state`]); after the round closes the
//! relay draws some updates with randomness fixed only then, names their peers in the next
//! announcement ([`crate::protocol::RoundAnnouncement::audit`]), and each reveals its state
//! ([`crate::protocol::Reveal`]). [`replay_lm`] then runs the peer's steps again with the same
//! [`InnerLoop`] and the same encoding the peer runs, and [`compare`] measures how far the
//! replayed update lands from the one the peer sent: on the CPU backend it must be the same
//! payload bit for bit.
//!
//! What it proves: the update is what the peer's committed state, θ_t and its own windows give
//! after the steps it reports, so every step it is credited for was run on the data it was
//! given. What it does not: that the revealed moments are the ones the peer's earlier rounds
//! produced (only rounds that are themselves replayed show that), and anything about rounds not
//! drawn (a peer cheats undetected in a round with probability 1 − the fraction drawn).

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::compress::{Codec, ErrorFeedback};
use crate::lm::LmConfig;
use crate::lm_train::{LmInnerLoop, LmInnerSpec, TextBatch, TrainerState};
use crate::privacy::PrivacySpec;
use crate::protocol::RunSpec;
use crate::verify::Outcome;

/// What an update's `state` commits to: everything its round depended on that the relay does
/// not hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommittedState {
    /// The replica's schedule position and AdamW moments at round start.
    pub trainer: TrainerState,
    /// The error-feedback residual carried into the round's encoding (empty before the first
    /// round, when there is none).
    pub residual: Vec<f32>,
}

impl CommittedState {
    /// Its canonical bytes (postcard): the payload of a [`crate::protocol::Reveal`], which the
    /// update's `state` names by digest and length ([`crate::protocol::PayloadRef::of`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok()
    }

    /// Whether this state could have come from training with `optimizer` for at most
    /// `steps_before` steps: finite values, no tensor further than that, and, under gradient
    /// clipping at c, first moments within ±c and second moments within [0, c²] (they are
    /// averages of clipped gradients and their squares). A crafted state outside those bounds
    /// (a huge second moment, say) could make the round's steps do next to nothing, so that an
    /// update computed without the steps would replay.
    pub fn plausible(&self, optimizer: &LmInnerSpec, steps_before: u64) -> Result<(), String> {
        // Room for the rounding of the clipped norm.
        let bound = optimizer.clip_norm.map(|c| 1.01 * c);
        for (i, m) in self.trainer.moments.iter().enumerate() {
            if m.time > steps_before {
                return Err(format!(
                    "tensor {i} has taken {} steps, more than the {steps_before} before the round",
                    m.time
                ));
            }
            let first = m
                .first
                .iter()
                .all(|v| v.is_finite() && bound.is_none_or(|c| v.abs() <= c));
            let second = m
                .second
                .iter()
                .all(|v| v.is_finite() && *v >= 0.0 && bound.is_none_or(|c| *v <= c * c));
            if !first || !second {
                return Err(format!(
                    "tensor {i}'s moments are not what clipped gradients give"
                ));
            }
        }
        if !self.residual.iter().all(|v| v.is_finite()) {
            return Err("the residual is not finite".into());
        }
        Ok(())
    }

    /// Bytes of the committed state of a model with `n_params` parameters, at most (moments
    /// of every tensor and a full residual, and room for the framing).
    pub fn max_len(n_params: usize) -> usize {
        12 * n_params + 64 * 1024
    }
}

/// What a round ran on, besides the committed state: the same inputs a peer's replica trains on.
#[derive(Clone, Copy, Debug)]
pub struct RoundInputs<'a> {
    pub config: &'a LmConfig,
    pub optimizer: &'a LmInnerSpec,
    /// θ_t.
    pub theta: &'a [f32],
    /// The run's global step of the round's first inner step (`round · H`).
    pub first_step: u64,
    /// The peer's windows for the round (`context + 1` bytes each), as the relay served them.
    pub text: &'a [u8],
    pub batch: u32,
    /// The steps the update reports.
    pub steps: u32,
    pub privacy: Option<&'a PrivacySpec>,
    pub codec: Codec,
}

impl<'a> RoundInputs<'a> {
    /// The inputs of an update of run `spec` (a language model with `config`) for `round` that
    /// reports `steps` steps: θ_t and its peer's windows of the round (all of them; the replay
    /// runs the first `steps` batches).
    pub fn of_update(
        spec: &'a RunSpec,
        config: &'a LmConfig,
        theta: &'a [f32],
        round: u64,
        steps: u32,
        text: &'a [u8],
    ) -> Self {
        Self {
            config,
            optimizer: &spec.inner.optimizer,
            theta,
            first_step: round * u64::from(spec.inner.steps),
            text,
            batch: spec.inner.batch_size,
            steps,
            privacy: spec.privacy.as_ref(),
            codec: spec.codec,
        }
    }
}

/// Replays a language-model round from `state` on backend `B`: the replica's steps
/// ([`TextBatch::of_round`], [`LmInnerLoop::step`]) and the peer's encoding
/// ([`crate::round::update_payload`] with the revealed residual). Returns the payload the peer
/// should have sent, or why the state cannot be replayed (not
/// [`plausible`](CommittedState::plausible), or not the model's shape).
pub async fn replay_lm<B: AutodiffBackend>(
    device: &B::Device,
    round: &RoundInputs<'_>,
    state: &CommittedState,
) -> Result<Vec<u8>, String> {
    state.plausible(round.optimizer, round.first_step)?;
    let mut trainer = LmInnerLoop::<B>::new(device, round.config, round.theta, round.optimizer)
        .map_err(|e| e.to_string())?;
    trainer.restore(&state.trainer).map_err(|e| e.to_string())?;
    trainer.seek(round.first_step);
    let window = round.config.context + 1;
    for batch in TextBatch::of_round(round.text, window, round.batch).take(round.steps as usize) {
        trainer.step(&batch);
    }
    let params = trainer.params().await.map_err(|e| e.to_string())?;
    if !state.residual.is_empty() && state.residual.len() != params.len() {
        return Err(format!(
            "the residual has {} values, the model {}",
            state.residual.len(),
            params.len()
        ));
    }
    let mut feedback = ErrorFeedback::with_residual(state.residual.clone());
    Ok(crate::round::update_payload(
        crate::round::pseudo_gradient(round.theta, &params),
        round.privacy,
        round.codec,
        &mut feedback,
    ))
}

/// How far an update lands from its replay.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayCheck {
    /// Steps replayed (the steps the update reports).
    pub steps: u32,
    /// The replayed payload is the peer's, bit for bit.
    pub exact: bool,
    /// ‖Δ − Δ_replay‖ / ‖Δ_replay‖ of the decoded updates (0 when exact; infinite when the
    /// replay is zero and the update is not).
    pub distance: f32,
}

/// Compares the update the peer sent (`delta`, decoded, and its payload's digest) with the
/// replayed payload.
pub fn compare(
    codec: Codec,
    steps: u32,
    delta: &[f32],
    payload_digest: &[u8; 32],
    replayed: &[u8],
) -> ReplayCheck {
    let exact = blake3::hash(replayed).as_bytes() == payload_digest;
    let distance = if exact {
        0.0
    } else {
        match codec.decode(replayed, delta.len()) {
            Ok(replay) => relative_distance(delta, &replay),
            Err(_) => f32::INFINITY,
        }
    };
    ReplayCheck {
        steps,
        exact,
        distance,
    }
}

/// The verdict of a replay: the payload bit for bit, or a decoded update within `tolerance` of
/// the replay's ([`relative_distance`]), verifies the update; anything else fails it.
pub fn judge(check: &ReplayCheck, tolerance: f32) -> Outcome {
    if check.exact || check.distance <= tolerance {
        Outcome::Verified
    } else {
        Outcome::Failed {
            reason: format!(
                "its replay lands {:.3e} away, more than the {tolerance:.3e} allowed",
                check.distance
            ),
        }
    }
}

/// ‖a − b‖ / ‖b‖ (infinite when b is zero and a is not, 0 when both are).
pub fn relative_distance(a: &[f32], b: &[f32]) -> f32 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        diff += (f64::from(*x) - f64::from(*y)).powi(2);
        norm += f64::from(*y).powi(2);
    }
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    match (diff, norm) {
        (0.0, _) => 0.0,
        (_, 0.0) => f32::INFINITY,
        (d, n) => (d / n).sqrt() as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, NdArray};

    fn setup() -> (LmConfig, LmInnerSpec, Vec<f32>, Vec<u8>) {
        let (config, spec, theta) = crate::lm_train::tiny_lm(5);
        let text: Vec<u8> = (0..4 * 2 * 9u32).map(|i| (i * 37 % 251) as u8).collect();
        (config, spec, theta, text)
    }

    /// A peer's two rounds, the second committed and sent as a real peer does: the replay of
    /// the second from the committed state gives the payload bit for bit; fewer steps, another
    /// residual or other moments do not.
    #[test]
    fn a_committed_round_replays_to_its_payload_and_nothing_else_does() {
        type B = Autodiff<NdArray>;
        let device = Default::default();
        let (config, spec, theta, text) = setup();
        let codec = Codec::Int8Block { block: 64 };
        let window = config.context + 1;
        let mut trainer = LmInnerLoop::<B>::new(&device, &config, &theta, &spec).expect("trainer");
        let mut feedback = ErrorFeedback::default();
        // Round 0: its update leaves moments and a residual behind.
        for batch in TextBatch::of_round(&text, window, 2).take(2) {
            trainer.step(&batch);
        }
        let params = futures::executor::block_on(trainer.params()).expect("params");
        let _ = crate::round::update_payload(
            crate::round::pseudo_gradient(&theta, &params),
            None,
            codec,
            &mut feedback,
        );
        // Round 1 from θ₁, committed first.
        let theta1: Vec<f32> = theta
            .iter()
            .zip(&params)
            .map(|(a, b)| 0.5 * (a + b))
            .collect();
        let committed = CommittedState {
            trainer: futures::executor::block_on(trainer.state()).expect("state"),
            residual: feedback.residual().to_vec(),
        };
        let committed = CommittedState::from_bytes(&committed.to_bytes()).expect("round trip");
        trainer.load(&theta1).expect("θ₁");
        trainer.seek(4);
        for batch in TextBatch::of_round(&text, window, 2).take(4) {
            trainer.step(&batch);
        }
        let params = futures::executor::block_on(trainer.params()).expect("params");
        let delta = crate::round::pseudo_gradient(&theta1, &params);
        let payload = crate::round::update_payload(delta, None, codec, &mut feedback);
        let sent = codec.decode(&payload, theta.len()).expect("decodes");
        let digest = *blake3::hash(&payload).as_bytes();
        let round = RoundInputs {
            config: &config,
            optimizer: &spec,
            theta: &theta1,
            first_step: 4,
            text: &text,
            batch: 2,
            steps: 4,
            privacy: None,
            codec,
        };
        let check = |round: &RoundInputs<'_>, state: &CommittedState| {
            let replayed =
                futures::executor::block_on(replay_lm::<B>(&device, round, state)).expect("replay");
            compare(codec, round.steps, &sent, &digest, &replayed)
        };
        let honest = check(&round, &committed);
        assert!(honest.exact, "{honest:?}");
        assert_eq!(honest.distance, 0.0);
        // Three steps where four are claimed: the replay of four is not the update.
        let fewer = check(&RoundInputs { steps: 3, ..round }, &committed);
        assert!(!fewer.exact && fewer.distance > 0.05, "{fewer:?}");
        // Another residual, or fresh moments: not the update either.
        let mut other = committed.clone();
        other.residual = vec![0.0; theta.len()];
        assert!(!check(&round, &other).exact);
        let mut fresh = committed.clone();
        for m in &mut fresh.trainer.moments {
            m.first.iter_mut().for_each(|v| *v *= 0.5);
        }
        assert!(!check(&round, &fresh).exact);
        // A state no clipped training gives is refused before any step is replayed.
        let mut huge = committed.clone();
        huge.trainer.moments[0].second[0] = 1e6;
        assert!(futures::executor::block_on(replay_lm::<B>(&device, &round, &huge)).is_err());
        let mut early = committed.clone();
        early.trainer.moments[0].time = 5;
        assert!(futures::executor::block_on(replay_lm::<B>(&device, &round, &early)).is_err());
        assert!(committed.plausible(&spec, 4).is_ok());
    }

    #[test]
    fn the_distance_is_relative_to_the_replay() {
        assert_eq!(relative_distance(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert_eq!(relative_distance(&[0.0, 0.0], &[0.0, 0.0]), 0.0);
        assert_eq!(relative_distance(&[1.0], &[0.0]), f32::INFINITY);
        assert!((relative_distance(&[1.1, 0.0], &[1.0, 0.0]) - 0.1).abs() < 1e-6);
        assert_eq!(relative_distance(&[1.0], &[1.0, 2.0]), f32::INFINITY);
    }
}
