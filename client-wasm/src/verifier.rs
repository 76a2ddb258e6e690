//! A volunteer verifier: replays other peers' drawn rounds for the relay, so that the relay's
//! replays ([`swarmtrain_shared::replay`]) scale with the swarm rather than with its own CPU.
//!
//! It joins the run as [`Role::Verify`] (no data slot, not one of the round's peers), asks for
//! a job (`Verify`, a long poll), fetches θ_t by hash, the drawn peer's windows of the round
//! over HTTP (as trainers fetch theirs) and the revealed state ([`RelayClient::fetch_state`],
//! sealed), replays the steps with the shared code ([`replay::replay_lm`], what the relay runs
//! itself), and sends back the payload its replay gives ([`Replayed`]). It never sees the
//! update it checks: the relay compares ([`replay::compare`]). The relay replays every update
//! a verifier fails, and a drawn share of those it verifies, and bans a verifier whose replay
//! contradicts its own (see `relay/src/coordinator.rs`, `settle_report`).

use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;
use swarmtrain_shared::Identity;
use swarmtrain_shared::protocol::{
    ClientToRelay, ModelConfig, PayloadRef, RelayToClient, ReplayJob, Replayed, Role,
};
use swarmtrain_shared::replay::{self, CommittedState, RoundInputs};
use web_time::Instant;

use crate::peer::{PeerConfig, PeerError, Session, back_off};

/// What a verifier reports as it goes.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VerifierEvent {
    Joined {
        run: String,
        peer: String,
        transport: String,
    },
    /// A replay was run and reported: `replayed` is false when it could not be (the relay
    /// then replays it itself), `accepted` whether the relay took the report.
    Replayed {
        job: u64,
        round: u64,
        steps: u32,
        replayed: bool,
        ms: f64,
        accepted: bool,
        reason: Option<String>,
    },
    Reconnecting {
        attempt: u32,
        delay_ms: u64,
        error: String,
    },
}

/// Verifies for the run `config` names on backend `B` until `config.stop` is set or
/// `config.max_rounds` jobs have been replayed (`max_rounds` counts jobs here), reconnecting
/// after transient failures as a trainer does. Returns the jobs replayed.
pub async fn verify<B: AutodiffBackend>(
    device: B::Device,
    config: PeerConfig,
    mut emit: impl FnMut(VerifierEvent),
) -> Result<u64, PeerError> {
    let identity = Identity::from_seed(*config.identity_seed);
    let mut done = 0u64;
    let mut failures = 0u32;
    loop {
        let error = match session::<B>(
            &device,
            &config,
            &identity,
            &mut done,
            &mut failures,
            &mut emit,
        )
        .await
        {
            Ok(()) => return Ok(done),
            Err(e) => e,
        };
        let retry = back_off(&config, &mut failures, error, |attempt, delay_ms, error| {
            emit(VerifierEvent::Reconnecting {
                attempt,
                delay_ms,
                error,
            })
        })
        .await?;
        if !retry {
            return Ok(done);
        }
    }
}

/// One connection's worth of [`verify`].
async fn session<B: AutodiffBackend>(
    device: &B::Device,
    config: &PeerConfig,
    identity: &Identity,
    done: &mut u64,
    failures: &mut u32,
    emit: &mut impl FnMut(VerifierEvent),
) -> Result<(), PeerError> {
    let (session, _) = Session::join(config, &config.relay_url, identity, Role::Verify).await?;
    *failures = 0;
    emit(VerifierEvent::Joined {
        run: session.spec.run_id.clone(),
        peer: identity.peer().to_hex(),
        transport: session.transport.clone(),
    });
    while !config.stop.get() && config.max_rounds.is_none_or(|max| *done < max) {
        let ask = ClientToRelay::Verify {
            run_id: session.spec.run_id.clone(),
        };
        let job = match session.request(ask).await? {
            RelayToClient::Job(Some(job)) => job,
            RelayToClient::Job(None) => continue,
            RelayToClient::Rejected { kind, reason } if kind.ends_with("busy") => {
                return Err(PeerError::Busy(reason));
            }
            RelayToClient::Rejected { reason, .. } => return Err(PeerError::Refused(reason)),
            _ => return Err(PeerError::Unexpected("verify")),
        };
        let started = Instant::now();
        let replayed = match replay_job::<B>(device, &session, &job).await {
            Ok(payload) => Some(payload),
            Err(e) => {
                tracing::warn!(job = job.job, error = %e, "could not replay; the relay will");
                None
            }
        };
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let report = ClientToRelay::Replayed(Replayed {
            run_id: session.spec.run_id.clone(),
            job: job.job,
            update: replayed.as_deref().map(PayloadRef::of),
        });
        let was_replayed = replayed.is_some();
        let (accepted, reason) = match session
            .send_mending(report, replayed.unwrap_or_default())
            .await?
        {
            RelayToClient::Accepted { .. } => (true, None),
            RelayToClient::Rejected { reason, .. } => (false, Some(reason)),
            _ => return Err(PeerError::Unexpected("replayed")),
        };
        tracing::info!(
            job = job.job,
            round = job.round,
            ms,
            accepted,
            "replayed a drawn update"
        );
        *done += 1;
        emit(VerifierEvent::Replayed {
            job: job.job,
            round: job.round,
            steps: job.steps,
            replayed: was_replayed,
            ms,
            accepted,
            reason,
        });
    }
    Ok(())
}

/// Runs `job`'s replay: the payload the drawn update should be.
async fn replay_job<B: AutodiffBackend>(
    device: &B::Device,
    session: &Session,
    job: &ReplayJob,
) -> Result<Vec<u8>, PeerError> {
    let spec = &session.spec;
    let ModelConfig::Lm(config) = spec.model.config() else {
        return Err(PeerError::BadSpec(
            "replays cover language-model runs".into(),
        ));
    };
    let max = CommittedState::max_len(spec.model.num_params());
    if job.state.len as usize > max || job.steps > spec.inner.steps {
        return Err(PeerError::Download(format!(
            "job {} names a state of {} bytes or {} steps: more than the run allows",
            job.job, job.state.len, job.steps
        )));
    }
    let (theta, _) = session.fetch_params(job.round, job.theta).await?;
    let text = session
        .fetch_text_of(job.round, job.slot, config.context + 1)
        .await?;
    let state = session
        .client
        .fetch_state(&spec.run_id, &job.state)
        .await
        .map_err(|e| PeerError::Download(format!("the revealed state: {e}")))?;
    let committed = CommittedState::from_bytes(&state)
        .ok_or_else(|| PeerError::Download("the revealed state does not decode".into()))?;
    let inputs = RoundInputs::of_update(spec, &config, &theta, job.round, job.steps, &text);
    replay::replay_lm::<B>(device, &inputs, &committed)
        .await
        .map_err(PeerError::Train)
}
