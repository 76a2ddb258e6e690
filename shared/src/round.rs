//! The round state machine. Pure: time is an argument, nothing here does I/O.
//!
//! A round opens with θ_t. Peers submit pseudo-gradients; each is checked (run, round, base,
//! duplicate, codec, shape, finiteness) before it is kept. The round closes at quorum — the
//! smaller of the configured quorum and the number of active peers, but never fewer updates
//! than the aggregation rule needs — or at the deadline if the rule has what it needs.
//! Closing aggregates the contributions in peer order with the run's rule, applies the outer
//! Nesterov step and opens the next round.
//!
//! With differential privacy on, every decoded update is clipped to the run's norm here, and
//! the round's aggregate is the noised sum over the quorum ([`crate::privacy`]), whoever
//! drives the engine.
//!
//! This is the one round engine: the relay, the simulator and the attack grid all drive it.
//! A close is two halves so the caller can run the heavy middle elsewhere:
//! [`RoundState::begin_close`] hands out a [`CloseJob`] (the round's inputs), the caller
//! aggregates it ([`aggregate::step_cpu`], or a Burn backend), and
//! [`RoundState::finish_close`] opens the next round. [`RoundState::tick`] does all three on
//! the CPU.

use std::collections::BTreeMap;

use crate::aggregate::{self, AggregateError, Contribution, RoundInputs, Stepped};
use crate::compress::CodecError;
use crate::crypto::PeerKey;
use crate::outer::OuterOptimizer;
use crate::privacy::{self, NoiseStream};
use crate::protocol::RefusalKind;
use crate::protocol::{
    Codec, OuterSpec, ParamsHash, RoundAnnouncement, RunSpec, Update, params_to_bytes,
};
use crate::robust::{self, Rule};

/// Why an update was refused. The run goes on either way.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("update is for run {got:?}, this is run {expected:?}")]
    WrongRun { expected: String, got: String },
    #[error("update is for round {got}, the open round is {expected}")]
    WrongRound { expected: u64, got: u64 },
    #[error("update was trained from other parameters than this round's")]
    StaleBase,
    #[error("peer already sent an update for round {0}")]
    Duplicate(u64),
    #[error("codec {0:?} is not this run's")]
    WrongCodec(Codec),
    #[error("update does not fit the model: {0}")]
    WrongShape(CodecError),
    #[error("update payload is malformed: {0}")]
    Malformed(CodecError),
    #[error("update contains NaN or infinite values")]
    NonFinite,
    #[error("update claims zero samples")]
    NoSamples,
    #[error("round {0} is closing; the update missed it")]
    Closing(u64),
    #[error("the payload does not match the digest the update signed")]
    PayloadMismatch,
    #[error(
        "update claims {samples} samples from {steps} inner steps; the run allows at most \
         {max_steps} steps of {batch}"
    )]
    BadClaim {
        samples: u32,
        steps: u32,
        max_steps: u32,
        batch: u32,
    },
    #[error("update is all zeros: it carries no work")]
    Empty,
}

impl Rejection {
    /// What the relay counts it as and tells the peer.
    pub fn kind(&self) -> RefusalKind {
        match self {
            Self::WrongRun { .. } => RefusalKind::WrongRun,
            Self::WrongRound { .. } => RefusalKind::WrongRound,
            Self::StaleBase => RefusalKind::StaleBase,
            Self::Duplicate(_) => RefusalKind::Duplicate,
            Self::WrongCodec(_) => RefusalKind::WrongCodec,
            Self::WrongShape(_) => RefusalKind::WrongShape,
            Self::Malformed(_) => RefusalKind::Malformed,
            Self::NonFinite => RefusalKind::NonFinite,
            Self::NoSamples => RefusalKind::NoSamples,
            Self::Closing(_) => RefusalKind::Closing,
            Self::PayloadMismatch => RefusalKind::PayloadMismatch,
            Self::BadClaim { .. } => RefusalKind::BadClaim,
            Self::Empty => RefusalKind::EmptyUpdate,
        }
    }
}

/// What closing a round produced.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundClosed {
    /// The round that closed.
    pub round: u64,
    /// Who contributed, in peer order, with their sample counts and mean local loss.
    pub contributors: Vec<(PeerKey, u32, f32)>,
    /// The round that is now open, and its parameters' hash.
    pub next_round: u64,
    pub next_params: ParamsHash,
    /// Why θ was kept, when the aggregation failed (it should not: inputs are checked).
    pub failed: Option<String>,
}

/// A round's inputs, handed out by [`RoundState::begin_close`] to be aggregated.
#[derive(Clone, Debug, PartialEq)]
pub struct CloseJob {
    pub round: u64,
    /// θ_t.
    pub params: Vec<f32>,
    pub velocity: Vec<f32>,
    /// The accepted contributions, in peer order (with differential privacy: the one noised
    /// aggregate).
    pub contributions: Vec<Contribution>,
    pub rule: Rule,
    /// The previous round's aggregate (centered clipping's centre).
    pub center: Option<Vec<f32>>,
    pub outer: OuterSpec,
}

impl CloseJob {
    pub fn inputs(&self) -> RoundInputs<'_> {
        RoundInputs {
            params: &self.params,
            velocity: &self.velocity,
            contributions: &self.contributions,
            rule: &self.rule,
            center: self.center.as_deref(),
            outer: &self.outer,
        }
    }
}

/// Coordinator state for one run.
#[derive(Clone, Debug)]
pub struct RoundState {
    pub spec: RunSpec,
    pub round: u64,
    params: Vec<f32>,
    params_hash: ParamsHash,
    outer: OuterOptimizer,
    opened_ms: u64,
    contributions: BTreeMap<PeerKey, (Contribution, f32)>,
    last_seen: BTreeMap<PeerKey, u64>,
    /// The previous round's aggregate: the center of centered clipping.
    last_aggregate: Option<Vec<f32>>,
    /// How long recent rounds took to reach their quorum, oldest first.
    recent_ms: Vec<u64>,
    /// A [`CloseJob`] is out: updates are refused until [`RoundState::finish_close`].
    closing: bool,
    /// Differential privacy's noise, keyed from the OS (None if the OS gave no randomness).
    noise: Option<NoiseStream>,
}

/// A noise stream keyed by the OS's randomness.
fn os_noise() -> Option<NoiseStream> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).ok()?;
    Some(NoiseStream::new(&key))
}

/// Rounds whose duration sets the adaptive deadline.
const RECENT_ROUNDS: usize = 8;
/// The adaptive deadline: this many times the median recent round, …
const DEADLINE_FACTOR: u64 = 4;
/// … but never below this.
const MIN_DEADLINE_MS: u64 = 5_000;

impl RoundState {
    /// Opens round 0 with the initial parameters θ_0.
    pub fn new(spec: RunSpec, params: Vec<f32>, now_ms: u64) -> Self {
        let outer = OuterOptimizer::new(spec.outer.clone(), params.len());
        Self::resume(spec, 0, params, outer, now_ms)
    }

    /// Re-opens `round` from saved parameters and outer state.
    pub fn resume(
        spec: RunSpec,
        round: u64,
        params: Vec<f32>,
        outer: OuterOptimizer,
        now_ms: u64,
    ) -> Self {
        let params_hash = ParamsHash::of(&params_to_bytes(&params));
        Self {
            spec,
            round,
            params,
            params_hash,
            outer,
            opened_ms: now_ms,
            contributions: BTreeMap::new(),
            last_seen: BTreeMap::new(),
            last_aggregate: None,
            recent_ms: Vec::new(),
            closing: false,
            noise: os_noise(),
        }
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub fn params_hash(&self) -> ParamsHash {
        self.params_hash
    }

    pub fn outer(&self) -> &OuterOptimizer {
        &self.outer
    }

    pub fn updates_this_round(&self) -> usize {
        self.contributions.len()
    }

    fn peer_timeout_ms(&self) -> u64 {
        // A peer that has not been heard from for two deadlines no longer holds a round open.
        self.spec.round_deadline_ms.saturating_mul(2).max(10_000)
    }

    /// Records that `peer` is taking part (it joined or is waiting for a round).
    pub fn seen(&mut self, peer: PeerKey, now_ms: u64) {
        self.last_seen.insert(peer, now_ms);
    }

    /// When `peer` was last heard from.
    pub fn last_seen(&self, peer: &PeerKey) -> Option<u64> {
        self.last_seen.get(peer).copied()
    }

    /// Forgets when `peer` was last heard from (it left, or was forgotten as idle).
    pub fn forget(&mut self, peer: &PeerKey) {
        self.last_seen.remove(peer);
    }

    /// Peers heard from recently.
    pub fn active_peers(&self, now_ms: u64) -> usize {
        let timeout = self.peer_timeout_ms();
        self.last_seen
            .values()
            .filter(|&&t| now_ms.saturating_sub(t) <= timeout)
            .count()
    }

    /// Updates that close the round early: the configured quorum, capped at the active peers,
    /// but never below what the aggregation rule needs.
    fn quorum(&self, now_ms: u64) -> usize {
        (self.spec.quorum as usize)
            .min(self.active_peers(now_ms))
            .max(self.spec.aggregator.min_updates())
            .max(1)
    }

    /// When the open round closes even without quorum. It adapts to the peers: once three
    /// rounds have reached quorum, it is 4 × their median duration (at least 5 s), never more
    /// than the run's `round_deadline_ms`. Stragglers past it are dropped: their late updates
    /// are for a closed round.
    pub fn deadline_ms(&self) -> u64 {
        self.opened_ms + self.round_timeout_ms()
    }

    /// The current round timeout (see [`deadline_ms`](Self::deadline_ms)).
    pub fn round_timeout_ms(&self) -> u64 {
        let configured = self.spec.round_deadline_ms;
        if self.recent_ms.len() < 3 {
            return configured;
        }
        let mut sorted = self.recent_ms.clone();
        sorted.sort_unstable();
        let median = sorted[sorted.len() / 2];
        median
            .saturating_mul(DEADLINE_FACTOR)
            .max(MIN_DEADLINE_MS)
            .min(configured)
    }

    /// The announcement of the open round (to be signed by the relay).
    pub fn announcement(
        &self,
        eval: Evaluation,
        audit: Vec<PeerKey>,
        now_ms: u64,
    ) -> RoundAnnouncement {
        RoundAnnouncement {
            run_id: self.spec.run_id.clone(),
            round: self.round,
            params: self.params_hash,
            n_params: self.params.len() as u32,
            deadline_ms: self.deadline_ms().saturating_sub(now_ms),
            accuracy: eval.accuracy,
            loss: eval.loss,
            audit,
        }
    }

    /// Checks `update` from `peer`, with the `payload` its digest names, and keeps it for the
    /// open round.
    pub fn submit(
        &mut self,
        peer: PeerKey,
        update: &Update,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<(), Rejection> {
        self.restore(peer, update, payload)?;
        self.seen(peer, now_ms);
        Ok(())
    }

    /// Re-admits an update accepted before a restart, through the same checks. The peer is not
    /// counted as active until it is heard from again, so a resumed round still waits for its
    /// quorum of live peers (or its deadline).
    pub fn restore(
        &mut self,
        peer: PeerKey,
        update: &Update,
        payload: &[u8],
    ) -> Result<(), Rejection> {
        if self.closing && update.round == self.round {
            return Err(Rejection::Closing(self.round));
        }
        if update.run_id != self.spec.run_id {
            return Err(Rejection::WrongRun {
                expected: self.spec.run_id.clone(),
                got: update.run_id.clone(),
            });
        }
        if update.round != self.round {
            return Err(Rejection::WrongRound {
                expected: self.round,
                got: update.round,
            });
        }
        if self.contributions.contains_key(&peer) {
            return Err(Rejection::Duplicate(self.round));
        }
        if update.base != self.params_hash {
            return Err(Rejection::StaleBase);
        }
        if update.codec != self.spec.codec {
            return Err(Rejection::WrongCodec(update.codec));
        }
        if update.n_samples == 0 {
            return Err(Rejection::NoSamples);
        }
        // What the spec defines is all a peer can claim: at most the run's inner steps, each
        // of one batch (credit and weights never follow a larger number).
        let (max_steps, batch) = (self.spec.inner.steps, self.spec.inner.batch_size);
        if update.inner_steps == 0
            || update.inner_steps > max_steps
            || u64::from(update.n_samples) > u64::from(update.inner_steps) * u64::from(batch)
        {
            return Err(Rejection::BadClaim {
                samples: update.n_samples,
                steps: update.inner_steps,
                max_steps,
                batch,
            });
        }
        if !update.loss.is_finite() {
            return Err(Rejection::NonFinite);
        }
        if !update.payload.matches(payload) {
            return Err(Rejection::PayloadMismatch);
        }
        let mut delta = update
            .codec
            .decode(payload, self.params.len())
            .map_err(|e| match e {
                CodecError::Length { .. } => Rejection::WrongShape(e),
                CodecError::NonFinite => Rejection::NonFinite,
                CodecError::BadIndex { .. }
                | CodecError::BadBlock
                | CodecError::BadBits(_)
                | CodecError::BadKeep { .. } => Rejection::Malformed(e),
            })?;
        if delta.iter().all(|x| *x == 0.0) {
            return Err(Rejection::Empty);
        }
        if let Some(dp) = &self.spec.privacy {
            privacy::clip_l2(&mut delta, dp.clip_norm);
        }
        let contribution = Contribution {
            peer,
            n_samples: update.n_samples,
            delta,
        };
        self.contributions.insert(peer, (contribution, update.loss));
        Ok(())
    }

    /// Takes back `peer`'s accepted update of the open round (the caller could not make it
    /// durable, so the peer is told it was not accepted). Returns whether there was one.
    pub fn withdraw(&mut self, peer: &PeerKey) -> bool {
        !self.closing && self.contributions.remove(peer).is_some()
    }

    /// Whether the round should close now: quorum reached, or the deadline passed with as many
    /// updates as the rule needs. A round that reaches its deadline with fewer is extended.
    pub fn due(&mut self, now_ms: u64) -> bool {
        if self.closing {
            return false;
        }
        let n = self.contributions.len();
        let past_deadline = now_ms >= self.deadline_ms();
        if n < self.spec.aggregator.min_updates().max(1) {
            if past_deadline {
                self.opened_ms = now_ms;
            }
            return false;
        }
        // With nobody live (a relay that just restarted with restored updates), wait for peers
        // to come back or for the deadline instead of closing on stored updates alone.
        (self.active_peers(now_ms) > 0 && n >= self.quorum(now_ms)) || past_deadline
    }

    /// The accepted contributions of the open round, in peer order.
    pub fn contributions(&self) -> Vec<Contribution> {
        self.contributions
            .values()
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// The accepted contribution of `peer` in the open round.
    pub fn contribution(&self, peer: &PeerKey) -> Option<&Contribution> {
        self.contributions.get(peer).map(|(c, _)| c)
    }

    /// The previous round's aggregate: the centre of centered clipping.
    pub fn last_aggregate(&self) -> Option<&[f32]> {
        self.last_aggregate.as_deref()
    }

    /// If the round is [`due`](Self::due), hands out its inputs to be aggregated; updates are
    /// then refused as [`Rejection::Closing`] until [`finish_close`](Self::finish_close).
    /// With differential privacy on, the job's one contribution is the mechanism's output, the
    /// noised sum over the quorum ([`privacy::noised_mean`]; the run's rule is the mean), so any
    /// backend applies it unchanged; without randomness for the noise it has none, and the
    /// aggregation fails (θ is kept) rather than publish an un-noised round.
    pub fn begin_close(&mut self, now_ms: u64) -> Option<CloseJob> {
        if !self.due(now_ms) {
            return None;
        }
        self.closing = true;
        let mut contributions = self.contributions();
        if let Some(dp) = &self.spec.privacy {
            let denominator = self.spec.quorum as usize;
            let noised = self
                .noise
                .as_mut()
                .and_then(|noise| privacy::noised_mean(&contributions, dp, denominator, noise));
            contributions = noised
                .map(|delta| Contribution {
                    peer: PeerKey([0; 32]),
                    n_samples: contributions
                        .iter()
                        .fold(0u32, |sum, c| sum.saturating_add(c.n_samples)),
                    delta,
                })
                .into_iter()
                .collect();
        }
        // Bucketing runs here, before any backend sees the round: every path aggregates the
        // bucket means with the inner rule. (Contributions were checked when submitted; if
        // bucketing still refuses them, the rule gets them as they are and refuses them too.)
        let mut rule = self.spec.aggregator.clone();
        if let (size, inner) = self.spec.aggregator.bucketing()
            && size > 1
        {
            let seed = robust::bucket_seed(&self.spec.run_id, self.round);
            if let Ok(buckets) = robust::bucket(&contributions, self.params.len(), size, seed) {
                contributions = buckets;
                rule = inner.clone();
            }
        }
        Some(CloseJob {
            round: self.round,
            params: self.params.clone(),
            velocity: self.outer.velocity.clone(),
            contributions,
            rule,
            center: self.last_aggregate.clone(),
            outer: self.spec.outer.clone(),
        })
    }

    /// Closes the round with what aggregating its [`CloseJob`] gave and opens the next one.
    /// A failed aggregation (or one of the wrong size) keeps θ and says why in
    /// [`RoundClosed::failed`].
    pub fn finish_close(
        &mut self,
        outcome: Result<Stepped, AggregateError>,
        now_ms: u64,
    ) -> RoundClosed {
        self.closing = false;
        let taken = std::mem::take(&mut self.contributions);
        let contributors = taken
            .values()
            .map(|(c, loss)| (c.peer, c.n_samples, *loss))
            .collect();
        let n = self.params.len();
        let failed = match outcome {
            Ok(stepped)
                if stepped.params.len() == n
                    && stepped.velocity.len() == n
                    && stepped.aggregate.len() == n =>
            {
                self.params = stepped.params;
                self.outer.velocity = stepped.velocity;
                self.last_aggregate = Some(stepped.aggregate);
                self.params_hash = ParamsHash::of(&params_to_bytes(&self.params));
                None
            }
            Ok(_) => Some("the aggregation returned values of the wrong size".to_owned()),
            Err(e) => Some(e.to_string()),
        };
        // Rounds that reached quorum before the deadline measure the peers' speed.
        let took = now_ms.saturating_sub(self.opened_ms);
        if !taken.is_empty() && now_ms < self.deadline_ms() {
            if self.recent_ms.len() == RECENT_ROUNDS {
                self.recent_ms.remove(0);
            }
            self.recent_ms.push(took);
        }
        let closed = self.round;
        self.round += 1;
        self.opened_ms = now_ms;
        RoundClosed {
            round: closed,
            contributors,
            next_round: self.round,
            next_params: self.params_hash,
            failed,
        }
    }

    /// Closes the round if it is [`due`](Self::due), aggregating on the CPU
    /// ([`aggregate::step_cpu`]).
    pub fn tick(&mut self, now_ms: u64) -> Option<RoundClosed> {
        let job = self.begin_close(now_ms)?;
        let outcome = aggregate::step_cpu(&job.inputs());
        Some(self.finish_close(outcome, now_ms))
    }
}

/// What the coordinator measured of θ_t on held-out data.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Evaluation {
    /// Classifier runs: the share classified correctly.
    pub accuracy: Option<f32>,
    /// Language-model runs: mean next-byte cross-entropy in nats.
    pub loss: Option<f32>,
}

/// Δ = θ_t − θ_local: a peer's pseudo-gradient after its inner steps from `start`.
pub fn pseudo_gradient(start: &[f32], local: &[f32]) -> Vec<f32> {
    start.iter().zip(local).map(|(t, l)| t - l).collect()
}

/// What a peer sends for its pseudo-gradient: `delta` clipped to the run's L2 norm when the run
/// uses differential privacy (the relay clips again and noises the round's sum), then encoded
/// with `codec` through the peer's error feedback. The browser, the native peer and the
/// simulator build their updates with this.
pub fn update_payload(
    mut delta: Vec<f32>,
    privacy: Option<&crate::privacy::PrivacySpec>,
    codec: Codec,
    feedback: &mut crate::compress::ErrorFeedback,
) -> Vec<u8> {
    if let Some(privacy) = privacy {
        privacy::clip_l2(&mut delta, privacy.clip_norm);
    }
    feedback.encode(codec, &delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lm_train::LmInnerSpec;
    use crate::protocol::PayloadRef;
    use crate::protocol::{DataSource, DataSpec, InnerSpec, ModelSpec};

    fn spec() -> RunSpec {
        RunSpec {
            run_id: "t".into(),
            model: ModelSpec::DigitsMlp { hidden: 1 },
            data: DataSpec {
                source: DataSource::Digits,
                n_shards: 2,
            },
            inner: InnerSpec {
                steps: 1,
                batch_size: 1,
                optimizer: LmInnerSpec::constant(0.1, 0.0),
            },
            outer: OuterSpec {
                lr: 1.0,
                momentum: 0.0,
            },
            codec: Codec::F32,
            quorum: 2,
            round_deadline_ms: 1000,
            privacy: None,
            aggregator: Rule::Mean,
        }
    }

    trait Put {
        /// Submits an update of `delta` from `peer`.
        fn put(&mut self, peer: PeerKey, delta: &[f32], now_ms: u64) -> Result<(), Rejection>;
    }

    impl Put for RoundState {
        fn put(&mut self, peer: PeerKey, delta: &[f32], now_ms: u64) -> Result<(), Rejection> {
            let (update, payload) = update(self, delta);
            self.submit(peer, &update, &payload, now_ms)
        }
    }

    fn update(state: &RoundState, delta: &[f32]) -> (Update, Vec<u8>) {
        let payload = params_to_bytes(delta);
        let update = Update {
            run_id: "t".into(),
            round: state.round,
            base: state.params_hash(),
            n_samples: 1,
            inner_steps: 1,
            loss: 0.5,
            codec: Codec::F32,
            payload: PayloadRef::of(&payload),
            state: PayloadRef::of(&[]),
        };
        (update, payload)
    }

    #[test]
    fn claims_beyond_the_spec_and_empty_updates_are_refused_and_dp_sums_cannot_overflow() {
        let mut s = RoundState::new(spec(), vec![1.0, 1.0], 0);
        let peer = PeerKey([1; 32]);
        for (samples, steps) in [(u32::MAX, 1), (2, 1), (1, 2), (1, 0)] {
            let (mut claim, payload) = update(&s, &[0.1, 0.1]);
            (claim.n_samples, claim.inner_steps) = (samples, steps);
            assert_eq!(
                s.submit(peer, &claim, &payload, 10)
                    .map_err(|e| e.kind().as_str()),
                Err("bad_claim"),
                "{samples} samples in {steps} steps"
            );
        }
        assert_eq!(s.put(peer, &[0.0, 0.0], 10), Err(Rejection::Empty));
        s.put(peer, &[0.1, 0.0], 10)
            .expect("a claim within the spec");
        // A DP round sums the samples of its contributors without overflowing.
        let mut dp = spec();
        dp.inner.batch_size = u32::MAX;
        dp.privacy = Some(crate::privacy::PrivacySpec {
            clip_norm: 1.0,
            noise_multiplier: 0.0,
            delta: 1e-5,
        });
        let mut s = RoundState::new(dp, vec![1.0, 1.0], 0);
        for i in 1..=2u8 {
            let (mut claim, payload) = update(&s, &[0.1, 0.1]);
            claim.n_samples = u32::MAX;
            s.seen(PeerKey([i; 32]), 0);
            s.submit(PeerKey([i; 32]), &claim, &payload, 10)
                .expect("within the spec");
        }
        let _ = s.begin_close(20);
    }

    #[test]
    fn closes_at_quorum_and_applies_the_mean() {
        let mut s = RoundState::new(spec(), vec![1.0, 1.0], 0);
        let (a, b) = (PeerKey([1; 32]), PeerKey([2; 32]));
        s.seen(a, 0);
        s.seen(b, 0);
        s.put(a, &[0.2, 0.0], 10).expect("a");
        assert_eq!(s.tick(20), None, "one of two active peers: not yet");
        s.put(b, &[0.4, 0.2], 30).expect("b");
        let closed = s.tick(40).expect("quorum");
        assert_eq!((closed.round, closed.next_round), (0, 1));
        assert_eq!(closed.contributors.len(), 2);
        assert!((s.params()[0] - 0.7).abs() < 1e-6 && (s.params()[1] - 0.9).abs() < 1e-6);
    }

    #[test]
    fn closes_at_deadline_with_partial_updates_and_extends_empty_rounds() {
        let mut s = RoundState::new(spec(), vec![0.0], 0);
        assert_eq!(s.tick(5000), None);
        assert_eq!(s.round, 0, "an empty round is extended, not closed");
        s.seen(PeerKey([2; 32]), 5000);
        s.put(PeerKey([1; 32]), &[1.0], 5100).expect("ok");
        assert_eq!(s.tick(5200), None);
        assert!(s.tick(6000).is_some(), "deadline closes with one of two");
    }

    #[test]
    fn the_deadline_adapts_to_the_peers_and_drops_stragglers() {
        let mut s = RoundState::new(
            RunSpec {
                round_deadline_ms: 60_000,
                quorum: 3,
                ..spec()
            },
            vec![0.0],
            0,
        );
        let (a, b, slow) = (PeerKey([1; 32]), PeerKey([2; 32]), PeerKey([3; 32]));
        let mut now = 0;
        assert_eq!(
            s.round_timeout_ms(),
            60_000,
            "the configured deadline until rounds were measured"
        );
        // Three rounds reach quorum in 2 s each: the timeout becomes max(4 × 2 s, 5 s) = 8 s.
        for _ in 0..3 {
            s.put(a, &[0.1], now + 500).expect("ok");
            s.put(b, &[0.1], now + 1000).expect("ok");
            s.put(slow, &[0.1], now + 2000).expect("ok");
            assert!(s.tick(now + 2000).is_some());
            now += 2000;
        }
        assert_eq!(s.round_timeout_ms(), 8000);
        // Now one peer is slow: the round closes at 8 s with the updates it has…
        s.put(a, &[0.1], now + 100).expect("ok");
        s.put(b, &[0.1], now + 200).expect("ok");
        let late = update(&s, &[0.1]);
        assert_eq!(s.tick(now + 7999), None, "waiting for the third peer");
        let closed = s.tick(now + 8000).expect("closed at the adapted deadline");
        assert_eq!(closed.contributors.len(), 2);
        // …and the straggler's update is refused: its round is over.
        assert!(matches!(
            s.submit(slow, &late.0, &late.1, now + 9000),
            Err(Rejection::WrongRound { .. })
        ));
        // Never below 5 s, never above the configured deadline.
        let quick = RunSpec {
            round_deadline_ms: 3_000,
            ..spec()
        };
        let mut q = RoundState::new(quick, vec![0.0], 0);
        for r in 0..3 {
            q.put(a, &[0.1], r * 10).expect("ok");
            q.put(b, &[0.1], r * 10 + 10).expect("ok");
            assert!(q.tick(r * 10 + 10).is_some());
        }
        assert_eq!(q.round_timeout_ms(), 3_000);
    }

    #[test]
    fn bad_updates_are_rejected_and_change_nothing() {
        let mut s = RoundState::new(spec(), vec![0.0, 0.0], 0);
        let p = PeerKey([1; 32]);
        let (good, bytes) = update(&s, &[0.1, 0.1]);
        let with = |payload: Vec<u8>| {
            (
                Update {
                    payload: PayloadRef::of(&payload),
                    state: PayloadRef::of(&[]),
                    ..good.clone()
                },
                payload,
            )
        };
        let same = |update: Update| (update, bytes.clone());
        let cases = [
            (
                same(Update {
                    round: 7,
                    ..good.clone()
                }),
                Rejection::WrongRound {
                    expected: 0,
                    got: 7,
                },
            ),
            (
                same(Update {
                    run_id: "x".into(),
                    ..good.clone()
                }),
                Rejection::WrongRun {
                    expected: "t".into(),
                    got: "x".into(),
                },
            ),
            (
                same(Update {
                    base: ParamsHash([0; 32]),
                    ..good.clone()
                }),
                Rejection::StaleBase,
            ),
            (
                with(params_to_bytes(&[0.1])),
                Rejection::WrongShape(CodecError::Length {
                    expected: 8,
                    got: 4,
                    n: 2,
                }),
            ),
            (
                with(vec![0; 7]),
                Rejection::WrongShape(CodecError::Length {
                    expected: 8,
                    got: 7,
                    n: 2,
                }),
            ),
            (
                with(params_to_bytes(&[f32::NAN, 0.0])),
                Rejection::NonFinite,
            ),
            (
                with(params_to_bytes(&[f32::INFINITY, 0.0])),
                Rejection::NonFinite,
            ),
            (
                same(Update {
                    n_samples: 0,
                    ..good.clone()
                }),
                Rejection::NoSamples,
            ),
            (
                (good.clone(), params_to_bytes(&[0.2, 0.1])),
                Rejection::PayloadMismatch,
            ),
        ];
        for ((bad, payload), why) in cases {
            assert_eq!(s.submit(p, &bad, &payload, 1), Err(why));
        }
        assert_eq!(s.updates_this_round(), 0);
        s.submit(p, &good, &bytes, 1).expect("good one");
        assert_eq!(
            s.submit(p, &good, &bytes, 2),
            Err(Rejection::Duplicate(0)),
            "a replay is refused"
        );
    }

    #[test]
    fn bucketing_runs_in_the_engine_before_any_backend() {
        let bucketed = RunSpec {
            aggregator: Rule::with_buckets(Rule::Median, 2),
            quorum: 5,
            ..spec()
        };
        assert!(bucketed.validate().is_ok());
        let mut s = RoundState::new(bucketed, vec![0.0], 0);
        let mut contributions = Vec::new();
        for i in 1..=5u8 {
            let delta = [f32::from(i) * 0.1];
            s.put(PeerKey([i; 32]), &delta, 10).expect("ok");
            contributions.push(Contribution {
                peer: PeerKey([i; 32]),
                n_samples: 1,
                delta: delta.to_vec(),
            });
        }
        let job = s.begin_close(10).expect("due");
        // The backends get three bucket means and the inner rule.
        assert_eq!(job.contributions.len(), 3);
        assert_eq!(job.rule, Rule::Median);
        let expected = robust::aggregate_with_buckets(
            &Rule::with_buckets(Rule::Median, 2),
            &contributions,
            1,
            None,
            robust::bucket_seed("t", 0),
        )
        .expect("aggregate");
        let stepped = aggregate::step_cpu(&job.inputs()).expect("step");
        assert_eq!(stepped.aggregate, expected);
        // A Burn backend gets the same job: the same buckets, the same median.
        let tensor = futures::executor::block_on(aggregate::outer_step_with::<
            burn::backend::NdArray,
        >(&Default::default(), &job.inputs()))
        .expect("step");
        assert_eq!(tensor.aggregate, expected);
    }

    #[test]
    fn a_round_waits_for_what_its_rule_needs_and_refuses_updates_while_closing() {
        let krum = RunSpec {
            aggregator: Rule::MultiKrum {
                byzantine: 1,
                select: 2,
            },
            quorum: 5,
            ..spec()
        };
        assert!(krum.validate().is_ok());
        let mut s = RoundState::new(krum.clone(), vec![0.0], 0);
        let peers: Vec<PeerKey> = (1..=5).map(|i| PeerKey([i; 32])).collect();
        // Two active peers only: the quorum is still the 5 updates multi-Krum needs (2f + 3).
        for p in &peers[..4] {
            s.put(*p, &[0.1], 10).expect("ok");
        }
        assert_eq!(s.tick(10), None, "4 < 2f + 3 = 5");
        assert_eq!(s.tick(5_000), None, "not even at the deadline");
        assert_eq!(s.round, 0, "the round is extended, θ untouched");
        s.put(peers[4], &[0.1], 5_100).expect("ok");
        let job = s.begin_close(5_100).expect("five updates: due");
        assert_eq!(job.contributions.len(), 5);
        assert_eq!(s.begin_close(5_100), None, "one close at a time");
        assert_eq!(
            s.put(PeerKey([9; 32]), &[0.1], 5_150),
            Err(Rejection::Closing(0))
        );
        let closed = s.finish_close(aggregate::step_cpu(&job.inputs()), 5_200);
        assert_eq!((closed.round, closed.failed), (0, None));
        assert!((s.params()[0] + 0.1).abs() < 1e-6, "{:?}", s.params());

        // A quorum below what the rule needs is refused when the run is set up.
        let err = RunSpec {
            quorum: 3,
            ..krum.clone()
        }
        .validate()
        .unwrap_err();
        assert!(err.reason.contains("needs at least 5 updates"), "{err}");
        // A quorum the exact mean cannot sum in one round too.
        let mean = RunSpec {
            aggregator: Rule::Mean,
            quorum: crate::exact::MAX_TERMS as u32 + 1,
            ..krum
        };
        let err = mean.validate().unwrap_err();
        assert!(err.reason.contains("exact mean"), "{err}");
    }
}
