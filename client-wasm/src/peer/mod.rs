//! The contributor loop: join, then for every round fetch θ_t and the round's data, train H
//! local steps, and send the signed pseudo-gradient.
//!
//! The inner loop is [`crate::replica::Replica::train_round`], the simulator's trainer: one
//! replica per run whose AdamW moments persist across rounds (reset when the run's θ lineage
//! restarts). It runs behind [`Local`], which also encodes each round's update: on this thread
//! over any Burn backend ([`run`]), or in a browser's Web Worker ([`run_with`] and
//! `platform::TrainerWorker`).
//!
//! [`Session`] (in `session`) is one connection to the relay and the messages of a round;
//! [`PeerEvent`] (in `events`) is what the peer reports.

mod events;
pub mod relays;
mod session;

use std::sync::Arc;
use std::time::Duration;

use burn::tensor::backend::AutodiffBackend;
use swarmtrain_shared::Identity;
use swarmtrain_shared::data;
use swarmtrain_shared::protocol::{ParamsHash, PayloadRef, Role, RoundAnnouncement, Update};
use web_time::Instant;

use crate::Flag;
use crate::local::{InProcess, Local, SampleJob, TrainJob, TrainedRound};
use crate::replica::RoundData;
use crate::rpc::RpcError;
pub use events::{DirectPeer, PeerEvent, ThetaPeer};
use session::Announced;
pub(crate) use session::Session;
pub use session::fetch_bootstrap;

/// How long a peer waits for a gossiped announcement before it also long-polls the relay.
pub const POLL_AFTER: Duration = Duration::from_secs(3);
/// The wait before the first attempt to reach the relay again; each failed attempt doubles it,
/// up to [`RETRY_MAX`], and each wait is drawn between half and all of that ("equal jitter"),
/// so that the tabs a relay restart dropped do not all come back at once.
pub const RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between attempts to reach the relay.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Sends of one message to a relay that answers it can be mended (busy, keys, join), at most.
pub const MAX_TRIES: u32 = 6;

/// How a peer finds and joins a relay. Its `Debug` leaves the identity seed out.
#[derive(Clone)]
pub struct PeerConfig {
    /// The relay's HTTP base URL, e.g. `http://127.0.0.1:8080/`.
    pub relay_url: String,
    /// The run to join (None: the relay's default run).
    pub run_id: Option<String>,
    /// Which of the relay's transports to dial (None: the platform's first that the relay
    /// offers, see `platform::TRANSPORTS`).
    pub transport: Option<String>,
    /// Secret seed of this peer's ML-DSA-65 identity (zeroized on drop).
    pub identity_seed: zeroize::Zeroizing<[u8; 32]>,
    /// Name of the training backend, reported to the relay.
    pub backend: String,
    /// Stop after this many trained rounds (None: until stopped).
    pub max_rounds: Option<u64>,
    /// Language-model runs: bytes of text to sample from each new global model and report as
    /// [`PeerEvent::Sample`] (0: none).
    pub sample_len: usize,
    /// Set to stop the peer after its current step.
    pub stop: Arc<Flag>,
    /// While set, the peer waits between training steps (the page sets it for a hidden tab
    /// or a low battery); the round's deadline still cuts the round short.
    pub pause: Arc<Flag>,
    /// Failed attempts in a row (to reach, join or talk to the relay) after which the peer
    /// gives up and returns the error (None: it keeps trying, [`RETRY_FIRST`] apart at first and
    /// at most [`RETRY_MAX`]).
    pub max_retries: Option<u32>,
    /// Browsers: how many other browsers of the relay to connect to directly over WebRTC
    /// (signaling through the relay), and to take connections from (0: none).
    pub direct_peers: usize,
    /// Stay on `relay_url` (false: in a federation, join its nearest, least loaded relay and
    /// fail over to another when that one goes away: [`relays`]).
    pub pin_relay: bool,
    /// STUN/TURN servers for those connections (none: host candidates only, which connect
    /// peers on one network).
    pub ice_servers: Vec<crate::webrtc::IceServer>,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("relay_url", &self.relay_url)
            .field("run_id", &self.run_id)
            .field("transport", &self.transport)
            .field("identity_seed", &"<secret>")
            .field("backend", &self.backend)
            .field("max_rounds", &self.max_rounds)
            .field("sample_len", &self.sample_len)
            .field("max_retries", &self.max_retries)
            .field("direct_peers", &self.direct_peers)
            .field("pin_relay", &self.pin_relay)
            .field("ice_servers", &self.ice_servers.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("relay bootstrap failed: {0}")]
    Bootstrap(String),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("the relay refused to let us join: {0}")]
    Refused(String),
    #[error("the relay is busy: {0}")]
    Busy(String),
    #[error("the relay sent an unexpected answer to {0}")]
    Unexpected(&'static str),
    #[error("round announcement is not validly signed by the relay: {0}")]
    Announcement(String),
    #[error("download failed: {0}")]
    Download(String),
    #[error("training failed: {0}")]
    Train(String),
    #[error("the relay's run cannot work: {0}")]
    BadSpec(String),
}

impl PeerError {
    /// Whether trying again later may succeed: the relay could not be reached or talked to, or
    /// was busy. A refusal to join, a run that cannot work and a training failure are final.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Bootstrap(_)
                | Self::Rpc(_)
                | Self::Busy(_)
                | Self::Unexpected(_)
                | Self::Announcement(_)
                | Self::Download(_)
        )
    }
}

/// The wait before attempt `attempt` (1, 2, …) to reach the relay again: [`RETRY_FIRST`]
/// doubled per earlier attempt, at most [`RETRY_MAX`], times a random factor in [0.5, 1].
pub fn retry_delay(attempt: u32) -> Duration {
    let ceiling = RETRY_FIRST
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(RETRY_MAX);
    let mut byte = [0u8; 1];
    let jitter = match getrandom::fill(&mut byte) {
        Ok(()) => f64::from(byte[0]) / 255.0,
        Err(_) => 1.0,
    };
    ceiling.mul_f64(0.5 + 0.5 * jitter)
}

/// Inner steps to plan for a round: all `h` until the device's speed is known, then as many as
/// `budget` holds at `step_ms` a step with a tenth to spare (at least one: a round whose
/// deadline comes first is still cut there, with the steps done).
pub fn plan_steps(h: u32, step_ms: Option<f64>, budget: Duration) -> u32 {
    match step_ms {
        Some(ms) if ms > 0.0 => {
            let fit = 0.9 * budget.as_secs_f64() * 1e3 / ms;
            (fit.floor() as u32).clamp(1, h.max(1))
        }
        _ => h,
    }
}

/// What a peer keeps across connections to the relay (its local trainer keeps its replica,
/// AdamW moments and error feedback).
#[derive(Default)]
struct Carried {
    /// This device's time per inner step, measured on its last rounds (None before the first).
    step_ms: Option<f64>,
    /// The last round trained, and the θ it started from.
    last_trained: Option<(u64, ParamsHash)>,
    /// An update the relay has not answered (the connection failed first): sent again after
    /// joining again if its round is still open, so that a restart does not cost the work.
    unsent: Option<(Update, Vec<u8>)>,
    /// The state the last update committed to ([`CommittedState::to_bytes`]) and its round,
    /// kept until the next announcement says whether the relay replays it.
    ///
    /// [`CommittedState::to_bytes`]: swarmtrain_shared::replay::CommittedState::to_bytes
    committed: Option<(u64, Vec<u8>)>,
    rounds_trained: u64,
}

/// Joins the relay (or, in a federation, the nearest, least loaded of its relays: [`relays`])
/// and trains round after round on `B` until stopped or `max_rounds` is reached. When the relay
/// can't be reached or the connection fails (a relay restart, a network change, an edge relay
/// gone: the peer then joins another relay of its federation), the peer reports
/// [`PeerEvent::Reconnecting`], waits ([`retry_delay`]) and joins again with the same identity, keeping its AdamW moments and error-feedback residual;
/// it gives up after `max_retries` failures in a row, and at once on an error that retrying
/// can't fix ([`PeerError::is_transient`]).
pub async fn run<B: AutodiffBackend>(
    device: B::Device,
    config: PeerConfig,
    emit: impl FnMut(PeerEvent),
) -> Result<u64, PeerError> {
    run_with(InProcess::<B>::new(device), config, emit).await
}

/// [`run`] with its local training done by `local`.
pub async fn run_with<L: Local>(
    mut local: L,
    config: PeerConfig,
    mut emit: impl FnMut(PeerEvent),
) -> Result<u64, PeerError> {
    let identity = Identity::from_seed(*config.identity_seed);
    let mut carried = Carried::default();
    let mut failures = 0u32;
    let mut relays = relays::Relays::new(&config.relay_url, config.pin_relay);
    loop {
        let error = match train_session(
            &mut local,
            &config,
            &mut relays,
            &identity,
            &mut carried,
            &mut failures,
            &mut emit,
        )
        .await
        {
            Ok(()) => break,
            Err(e) => e,
        };
        let retry = back_off(&config, &mut failures, error, |attempt, delay_ms, error| {
            emit(PeerEvent::Reconnecting {
                attempt,
                delay_ms,
                error,
            })
        })
        .await?;
        if !retry {
            break;
        }
    }
    emit(PeerEvent::Stopped {
        rounds_trained: carried.rounds_trained,
    });
    Ok(carried.rounds_trained)
}

/// After a session ended in `error` (the `failures`-th in a row, counted here): gives up with
/// the error when it cannot be mended, the peer was stopped or `max_retries` is spent; else
/// reports the wait (`reconnecting(attempt, delay_ms, error)`), waits [`retry_delay`] and says
/// whether to connect again (false: stopped meanwhile).
pub(crate) async fn back_off(
    config: &PeerConfig,
    failures: &mut u32,
    error: PeerError,
    reconnecting: impl FnOnce(u32, u64, String),
) -> Result<bool, PeerError> {
    *failures += 1;
    if config.stop.get()
        || !error.is_transient()
        || config.max_retries.is_some_and(|max| *failures > max)
    {
        return Err(error);
    }
    let delay = retry_delay(*failures);
    reconnecting(*failures, delay.as_millis() as u64, error.to_string());
    Ok(!config.stop.sleep_unless_set(delay).await)
}

/// One connection's worth of [`run`]: joins (then sets `failures` back to 0) and trains until
/// stopped, `max_rounds` is reached (Ok), or an error.
async fn train_session<L: Local, E: FnMut(PeerEvent)>(
    local: &mut L,
    config: &PeerConfig,
    relays: &mut relays::Relays,
    identity: &Identity,
    carried: &mut Carried,
    failures: &mut u32,
    emit: &mut E,
) -> Result<(), PeerError> {
    // A federation's nearest, least loaded relay that answers (the given relay otherwise).
    let relay = relays.pick().await;
    let (session, mut announcement) = Session::join(config, &relay, identity, Role::Train).await?;
    relays
        .joined(
            &relay,
            &session.welcome_round.public_key,
            &session.federation,
        )
        .map_err(PeerError::Bootstrap)?;
    // When the announcement arrived: its deadline counts from about then.
    let mut announced_at = Instant::now();
    let mut via = Announced::Welcome;
    *failures = 0;
    emit(PeerEvent::Joined {
        relay,
        run: session.spec.run_id.clone(),
        peer: identity.peer().to_hex(),
        transport: session.transport.clone(),
        address: session.address.clone(),
    });
    emit(PeerEvent::Model {
        model: session.spec.model.describe(),
        n_params: session.spec.model.num_params(),
    });
    session.link_browsers(config).await;
    let mut rounds = Rounds {
        local,
        config,
        identity,
        session: &session,
        carried,
        emit,
    };
    // Back after a reconnect in the round already trained (a relay that resumed it): send its
    // update again if it went unanswered (the relay refuses a second copy as a duplicate), then
    // wait for the next round.
    if rounds.carried.last_trained == Some((announcement.round, announcement.params)) {
        session
            .send_update(&mut rounds.carried.unsent, rounds.emit)
            .await?;
        if rounds.finished() {
            return rounds.last_audit().await;
        }
        (announcement, via) = session.next_round(announcement.round).await?;
        announced_at = Instant::now();
    }
    session
        .answer_audit(&announcement, &mut rounds.carried.committed, rounds.emit)
        .await?;
    rounds.carried.unsent = None;

    let mut direct = None;
    while !config.stop.get() && !rounds.finished() {
        let round = announcement.round;
        let start = rounds.start(&announcement, via).await?;
        let Some(trained) = rounds.train(&announcement, announced_at, &start).await? else {
            break;
        };
        rounds.send(&announcement, trained).await?;
        if rounds.finished() {
            return rounds.last_audit().await;
        }
        if let Some(event) = session.direct_event(&mut direct) {
            (rounds.emit)(event);
        }
        (announcement, via) = session.next_round(round).await?;
        announced_at = Instant::now();
        session
            .answer_audit(&announcement, &mut rounds.carried.committed, rounds.emit)
            .await?;
    }
    Ok(())
}

/// A session's rounds: each fetched ([`Rounds::start`]), trained ([`Rounds::train`]) and
/// sent ([`Rounds::send`]).
struct Rounds<'a, L, E> {
    local: &'a mut L,
    config: &'a PeerConfig,
    identity: &'a Identity,
    session: &'a Session,
    carried: &'a mut Carried,
    emit: &'a mut E,
}

impl<L: Local, E: FnMut(PeerEvent)> Rounds<'_, L, E> {
    /// Whether `max_rounds` are trained.
    fn finished(&self) -> bool {
        self.config
            .max_rounds
            .is_some_and(|max| self.carried.rounds_trained >= max)
    }

    /// The last round's audit, answered before the peer stops.
    async fn last_audit(&mut self) -> Result<(), PeerError> {
        self.session
            .answer_last_audit(&mut self.carried.committed, self.config, self.emit)
            .await
    }

    /// The round's θ, with the replica ready to train from it (a fresh one when the run
    /// started over) and, for language models, text sampled from it.
    async fn start(
        &mut self,
        announcement: &RoundAnnouncement,
        via: Announced,
    ) -> Result<Vec<f32>, PeerError> {
        let spec = &self.session.spec;
        let round = announcement.round;
        (self.emit)(PeerEvent::Round {
            round,
            inner_steps: spec.inner.steps,
            accuracy: announcement.accuracy,
            val_loss: announcement.loss,
            via: via.name().into(),
            forwarded_by: match via {
                Announced::Gossip(Some(peer)) => Some(peer.to_string()),
                _ => None,
            },
        });
        (self.emit)(PeerEvent::Fetching {
            round,
            bytes: 4 * spec.model.num_params() as u64,
            linked: self.session.client.relay_info().direct_peers.len() as u32,
        });
        let (start, fetched) = self
            .session
            .fetch_params(round, announcement.params)
            .await?;
        (self.emit)(fetched);
        if start.len() != spec.model.num_params() {
            return Err(PeerError::Download(format!(
                "θ has {} values, the model {}",
                start.len(),
                spec.model.num_params()
            )));
        }
        // A round at or before one already trained means the run started over (a relay that
        // lost its state): that θ is another lineage, and the old moments and residual do not
        // apply to it.
        if self
            .carried
            .last_trained
            .is_some_and(|(last, _)| round <= last)
        {
            self.local.forget();
        }
        if !self.local.has_replica() {
            self.local
                .reset(&spec.model, &spec.inner.optimizer, &start)
                .await
                .map_err(PeerError::BadSpec)?;
        }
        if let (Some(lm_config), true) = (spec.model.lm_config(), self.config.sample_len > 0) {
            let sampled = self
                .local
                .sample(SampleJob {
                    config: lm_config,
                    params: start.clone(),
                    len: self.config.sample_len,
                    temperature: 0.8,
                    seed: data::derive_seed(
                        "sample",
                        &[spec.run_id.as_bytes(), &round.to_le_bytes()],
                    ),
                })
                .await
                .map_err(PeerError::Train)?;
            (self.emit)(PeerEvent::Sample {
                round,
                text: String::from_utf8_lossy(&sampled).into_owned(),
            });
        }
        Ok(start)
    }

    /// The round's data, then as many inner steps from `start` as fit before the deadline
    /// (announced at `announced_at`), encoded by the local trainer. None: stopped.
    async fn train(
        &mut self,
        announcement: &RoundAnnouncement,
        announced_at: Instant,
        start: &[f32],
    ) -> Result<Option<TrainedRound>, PeerError> {
        let spec = &self.session.spec;
        let round = announcement.round;
        let started = Instant::now();
        let h = spec.inner.steps;
        // A device too slow for H steps before the round's deadline sends the steps it managed
        // (with their sample count) instead of missing the round: it stops stepping with a
        // fifth of the time left (at most 10 s) for encoding and sending.
        let deadline = Duration::from_millis(announcement.deadline_ms);
        let until =
            announced_at + deadline.saturating_sub((deadline / 5).min(Duration::from_secs(10)));
        let data = match spec.model.lm_config() {
            None => RoundData::Digits {
                shard: self.session.fetch_shard(round).await?,
                sampler_seed: data::derive_seed(
                    "inner",
                    &[
                        spec.run_id.as_bytes(),
                        &round.to_le_bytes(),
                        &self.identity.peer().0,
                    ],
                ),
            },
            Some(lm_config) => RoundData::Text(
                self.session
                    .fetch_text(round, lm_config.context + 1)
                    .await?,
            ),
        };
        let budget = until.saturating_duration_since(Instant::now());
        let planned = plan_steps(h, self.carried.step_ms, budget);
        (self.emit)(PeerEvent::Plan {
            round,
            planned_steps: planned,
            run_steps: h,
            step_ms: self.carried.step_ms,
            budget_ms: budget.as_millis() as u64,
        });
        let job = TrainJob {
            start: start.to_vec(),
            first_step: round * u64::from(h),
            data,
            steps: planned,
            batch: spec.inner.batch_size,
            budget_ms: Some(budget.as_millis() as u64),
            codec: spec.codec,
            privacy: spec.privacy.clone(),
        };
        let (stop, pause) = (&self.config.stop, &self.config.pause);
        let paused_before = pause.get();
        let training = Instant::now();
        let emit = &mut *self.emit;
        let trained = self
            .local
            .train_round(job, stop, pause, &mut |steps| {
                emit(PeerEvent::Progress {
                    round,
                    steps,
                    planned_steps: planned,
                    elapsed_ms: announced_at.elapsed().as_millis() as u64,
                    deadline_ms: announcement.deadline_ms,
                })
            })
            .await
            .map_err(PeerError::Train)?;
        let Some(trained) = trained.filter(|_| !stop.get()) else {
            return Ok(None);
        };
        // A round that was paused says nothing about the device's speed.
        if trained.steps > 0 && !paused_before && !pause.get() {
            let measured = training.elapsed().as_secs_f64() * 1e3 / f64::from(trained.steps);
            let step_ms = &mut self.carried.step_ms;
            *step_ms = Some(step_ms.map_or(measured, |old| 0.5 * old + 0.5 * measured));
        }
        self.carried.rounds_trained += 1;
        self.carried.last_trained = Some((round, announcement.params));
        (self.emit)(PeerEvent::Trained {
            round,
            steps: trained.steps,
            planned_steps: planned,
            loss: trained.loss,
            train_ms: started.elapsed().as_millis() as u64,
            rounds_trained: self.carried.rounds_trained,
        });
        Ok(Some(trained))
    }

    /// The signed update for `trained`, sent (and kept until the relay answers it).
    async fn send(
        &mut self,
        announcement: &RoundAnnouncement,
        trained: TrainedRound,
    ) -> Result<(), PeerError> {
        let spec = &self.session.spec;
        let update = Update {
            run_id: spec.run_id.clone(),
            round: announcement.round,
            base: announcement.params,
            n_samples: trained.samples,
            inner_steps: trained.steps,
            loss: trained.loss,
            codec: spec.codec,
            payload: PayloadRef::of(&trained.payload),
            state: PayloadRef::of(&trained.state),
        };
        self.carried.committed = Some((announcement.round, trained.state));
        self.carried.unsent = Some((update, trained.payload));
        self.session
            .send_update(&mut self.carried.unsent, self.emit)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_plans_the_steps_its_speed_fits_before_the_deadline() {
        let s = Duration::from_secs;
        // Unknown speed: the run's H.
        assert_eq!(plan_steps(200, None, s(1)), 200);
        // 50 ms a step, 10 s: 180 fit with a tenth to spare.
        assert_eq!(plan_steps(200, Some(50.0), s(10)), 180);
        // Fast enough for all of them: H, never more.
        assert_eq!(plan_steps(200, Some(1.0), s(10)), 200);
        // Too slow for one: still one (the deadline then cuts the round with what was done).
        assert_eq!(plan_steps(200, Some(5_000.0), s(1)), 1);
        assert_eq!(plan_steps(200, Some(50.0), Duration::ZERO), 1);
    }
}
