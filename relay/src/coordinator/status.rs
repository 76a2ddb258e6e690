//! What `/api/status`, the page and every checkpoint's metadata show of a run.

use super::*;

/// A snapshot for `/api/status` and the page.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub run_id: String,
    pub round: u64,
    pub params_hash: String,
    pub n_params: usize,
    pub updates_this_round: usize,
    pub active_peers: usize,
    /// Identities joined as trainers.
    pub joined_peers: usize,
    /// Joined trainers by the backend they reported (`wgpu`, `ndarray`, …).
    pub backends: BTreeMap<String, usize>,
    /// The newest rows of the round history (at most [`STATUS_HISTORY`]).
    pub history: Vec<RoundRecord>,
    /// The oldest round whose history row is still kept (older rows: see the retention
    /// policy; a relay without a data directory keeps only the newest rows in memory).
    pub history_from: u64,
    pub rejected: BTreeMap<String, u64>,
    pub accepted_updates: u64,
    /// Checkpoint writes that failed (each retried; the round waits unannounced meanwhile).
    pub checkpoint_failures: u64,
    /// Whether the open round is waiting for its checkpoint to be written before it is announced.
    pub unannounced: bool,
    /// Differential privacy spent per peer so far (ε at the run's δ), when the run uses DP.
    pub privacy_epsilon: Option<f64>,
    /// The open round's timeout: the configured deadline, adapted to the peers' speed.
    pub round_timeout_ms: u64,
    /// Checked updates by outcome ([`crate::checks`]).
    pub checks: BTreeMap<String, u64>,
    /// The last checked round's upper-quartile check score (a round below the pass score cannot fail
    /// anyone).
    pub check_power: Option<f32>,
    /// Replays by outcome (`exact`, `near`, `differs`, `no_reveal`, `mismatch`, `bad_reveal`, `behind`).
    pub replays: BTreeMap<String, u64>,
    /// Bytes of committed states revealed for replays.
    pub reveal_bytes: u64,
    /// The peers whose update of the last closed round awaits its reveal.
    pub audits_pending: usize,
    /// Volunteer verifiers heard from within the verifier timeout.
    pub verifiers: usize,
    /// Revealed updates waiting for a verifier or held by one.
    pub verifier_jobs: usize,
    /// Verifiers' reports by what became of them (`trusted`, `confirmed`, `caught`, `unable`,
    /// `timeout`).
    pub verifier_reports: BTreeMap<String, u64>,
    pub spec: RunSpecView,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunSpecView {
    pub model: swarmtrain_shared::protocol::ModelSpec,
    /// The model in words.
    pub model_name: String,
    /// The data in words.
    pub data: String,
    /// The run's seed: it decides θ₀, and for a language model the held-out split and the order
    /// of the training windows (the digits split comes from the run id).
    pub seed: u64,
    pub inner_steps: u32,
    pub batch_size: u32,
    pub inner_lr: f64,
    pub outer_lr: f32,
    pub outer_momentum: f32,
    pub quorum: u32,
    pub round_deadline_ms: u64,
    pub n_shards: u32,
    pub codec: String,
    pub aggregator: String,
    /// Bytes of one update on the wire with this codec (payload only).
    pub update_bytes: usize,
    /// Credit units in one sample, and what they are (`tokens`, `images`).
    pub units_per_sample: u64,
    pub unit: &'static str,
}

impl Coordinator {
    /// The run's status with the newest [`STATUS_HISTORY`] rows of history.
    pub async fn status(&self) -> Status {
        self.status_with(STATUS_HISTORY).await
    }

    /// The run's status with the newest `rows` rows of history (at most [`STATUS_HISTORY`]).
    pub async fn status_with(&self, rows: usize) -> Status {
        let rows = rows.min(STATUS_HISTORY);
        let now = self.now_ms();
        let state = self.state.lock().await;
        let spec = &state.round.spec;
        Status {
            run_id: spec.run_id.clone(),
            round: state.round.round,
            params_hash: state.round.params_hash().to_hex(),
            n_params: state.round.params().len(),
            updates_this_round: state.round.updates_this_round(),
            active_peers: state.round.active_peers(now),
            joined_peers: state
                .joined
                .values()
                .filter(|(role, _)| *role == Role::Train)
                .count(),
            backends: state
                .joined
                .values()
                .filter(|(role, _)| *role == Role::Train)
                .fold(BTreeMap::new(), |mut by, (_, backend)| {
                    *by.entry(backend.clone()).or_default() += 1;
                    by
                }),
            history: state
                .history
                .iter()
                .skip(state.history.len().saturating_sub(rows))
                .cloned()
                .collect(),
            history_from: state.history_from,
            rejected: state.rejected.clone(),
            accepted_updates: state.accepted,
            checkpoint_failures: state.checkpoint_failures,
            unannounced: state.unannounced,
            round_timeout_ms: state.round.round_timeout_ms(),
            checks: by_name(&state.check_outcomes),
            check_power: state.check_power,
            replays: by_name(&state.replay_outcomes),
            reveal_bytes: state.reveal_bytes,
            audits_pending: state.audits.len(),
            verifiers: {
                let within = self.replays.verifier_timeout.as_millis() as u64;
                let seen = &state.verifiers.seen;
                seen.values()
                    .filter(|t| now.saturating_sub(**t) <= within)
                    .count()
            },
            verifier_jobs: state.verifiers.jobs.len(),
            verifier_reports: by_name(&state.verifiers.outcomes),
            privacy_epsilon: spec.privacy.as_ref().map(|p| {
                swarmtrain_shared::privacy::epsilon(state.round.round, p.noise_multiplier, p.delta)
            }),
            spec: RunSpecView::new(spec, &self.data, self.seed),
        }
    }
}

/// Counts by outcome, keyed by owned names for serializing.
fn by_name(counts: &BTreeMap<&'static str, u64>) -> BTreeMap<String, u64> {
    counts.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

impl RunSpecView {
    /// The run's settings as `/api/status` and every checkpoint's metadata show them.
    pub(super) fn new(spec: &RunSpec, data: &TaskData, seed: u64) -> Self {
        Self {
            model: spec.model.clone(),
            model_name: spec.model.describe(),
            data: match (&spec.data.source, data) {
                (protocol::DataSource::Text { name }, TaskData::Text(text)) => format!(
                    "{name} ({} training bytes, {} held-out windows)",
                    text.train_bytes, text.eval_count
                ),
                _ => "scikit-learn digits".into(),
            },
            seed,
            inner_steps: spec.inner.steps,
            batch_size: spec.inner.batch_size,
            inner_lr: spec.inner.optimizer.schedule.peak,
            outer_lr: spec.outer.lr,
            outer_momentum: spec.outer.momentum,
            quorum: spec.quorum,
            round_deadline_ms: spec.round_deadline_ms,
            n_shards: spec.data.n_shards,
            codec: format!("{:?}", spec.codec),
            aggregator: format!("{:?}", spec.aggregator),
            update_bytes: spec.codec.encoded_len(spec.model.num_params()),
            units_per_sample: spec.units_per_sample(),
            unit: spec.unit_name(),
        }
    }
}
