//! Where a peer's local training runs, behind one trait: [`InProcess`] trains a [`Replica`] on
//! the caller's thread (native volunteers, the tests, a page that asks for it); in a browser,
//! `platform::TrainerWorker` sends the same [`TrainJob`]s to a dedicated Web Worker that runs
//! an [`InProcess`] of its own, so the page's main thread keeps only the network and the UI.
//! The local trainer also encodes each round's update (Δ = θ_t − θ_local, clipped for
//! differential privacy, compressed through its error feedback), so that only the encoded
//! payload crosses back, never a θ.

use std::time::Duration;

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use swarmtrain_shared::compress::{Codec, ErrorFeedback};
use swarmtrain_shared::lm::{self, LmConfig, SampleConfig};
use swarmtrain_shared::lm_train::LmInnerSpec;
use swarmtrain_shared::privacy::PrivacySpec;
use swarmtrain_shared::protocol::ModelSpec;
use swarmtrain_shared::replay::CommittedState;
use swarmtrain_shared::round::{pseudo_gradient, update_payload};
use web_time::Instant;

use crate::Flag;
use crate::replica::{Replica, RoundData};

/// How often a round in training reports its steps.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// One round of local training, as it crosses to a worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct TrainJob {
    /// The round's global θ.
    pub start: Vec<f32>,
    /// The run's global step of the round's first inner step (`round · H`).
    pub first_step: u64,
    pub data: RoundData,
    pub steps: u32,
    pub batch: u32,
    /// Stop stepping this long after the job starts (after at least one step).
    pub budget_ms: Option<u64>,
    /// The run's codec for the update.
    pub codec: Codec,
    /// The run's differential privacy (Δ is clipped to its norm before encoding).
    pub privacy: Option<PrivacySpec>,
}

/// A trained round, encoded for the relay, as it crosses back from a worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct TrainedRound {
    pub steps: u32,
    pub samples: u32,
    /// The mean batch loss over the round's steps.
    pub loss: f32,
    /// The update's payload: Δ clipped and encoded through the error feedback
    /// ([`update_payload`]).
    pub payload: Vec<u8>,
    /// What the update commits to ([`CommittedState::to_bytes`]): the replica's schedule
    /// position and AdamW moments at round start, and the residual carried into the encoding.
    pub state: Vec<u8>,
}

/// Text sampled from θ, as it crosses to a worker.
#[derive(Debug, Serialize, Deserialize)]
pub struct SampleJob {
    pub config: LmConfig,
    pub params: Vec<f32>,
    pub len: usize,
    pub temperature: f32,
    pub seed: u64,
}

/// A peer's local trainer: a replica of the run's model with its AdamW moments and the error
/// feedback of its updates, kept across rounds until [`Local::forget`].
#[allow(async_fn_in_trait)]
pub trait Local {
    /// Whether a replica is held.
    fn has_replica(&self) -> bool;
    /// Drops the replica and the error feedback (the run started over: its moments and
    /// residual do not apply).
    fn forget(&mut self);
    /// A fresh replica of `model` at θ `start`, with no error feedback yet.
    async fn reset(
        &mut self,
        model: &ModelSpec,
        optimizer: &LmInnerSpec,
        start: &[f32],
    ) -> Result<(), String>;
    /// Text generated from θ (language-model runs).
    async fn sample(&mut self, job: SampleJob) -> Result<Vec<u8>, String>;
    /// One round on the replica ([`Replica::train_round`]), encoded; `stop` and `pause` are
    /// read between steps, and `progress` hears the steps taken at most every
    /// [`PROGRESS_EVERY`]. None: stopped, and nothing encoded (the error feedback is as before).
    async fn train_round(
        &mut self,
        job: TrainJob,
        stop: &Flag,
        pause: &Flag,
        progress: &mut impl FnMut(u32),
    ) -> Result<Option<TrainedRound>, String>;
}

/// Training on this thread, on Burn backend `B`.
#[derive(Debug)]
pub struct InProcess<B: AutodiffBackend> {
    device: B::Device,
    replica: Option<Replica<B>>,
    /// What lossy compression left out of earlier updates; it rides along with the next one.
    feedback: ErrorFeedback,
}

impl<B: AutodiffBackend> InProcess<B> {
    pub fn new(device: B::Device) -> Self {
        Self {
            device,
            replica: None,
            feedback: ErrorFeedback::default(),
        }
    }
}

impl<B: AutodiffBackend> Local for InProcess<B> {
    fn has_replica(&self) -> bool {
        self.replica.is_some()
    }

    fn forget(&mut self) {
        self.replica = None;
        self.feedback = ErrorFeedback::default();
    }

    async fn reset(
        &mut self,
        model: &ModelSpec,
        optimizer: &LmInnerSpec,
        start: &[f32],
    ) -> Result<(), String> {
        self.replica = Some(Replica::new(&self.device, model, optimizer, start)?);
        self.feedback = ErrorFeedback::default();
        Ok(())
    }

    async fn sample(&mut self, job: SampleJob) -> Result<Vec<u8>, String> {
        lm::sample::<B::InnerBackend>(
            &self.device,
            &job.config,
            &job.params,
            &SampleConfig {
                prompt: Vec::new(),
                len: job.len,
                temperature: job.temperature,
                seed: job.seed,
            },
        )
        .await
        .map_err(|e| e.to_string())
    }

    async fn train_round(
        &mut self,
        job: TrainJob,
        stop: &Flag,
        pause: &Flag,
        progress: &mut impl FnMut(u32),
    ) -> Result<Option<TrainedRound>, String> {
        let mut reported = Instant::now();
        let mut on_step = |steps: u32| {
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                progress(steps);
            }
        };
        let replica = self
            .replica
            .as_mut()
            .ok_or("no replica to train: reset first")?;
        let until = job
            .budget_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let round = replica
            .train_round(
                &job.start,
                job.first_step,
                &job.data,
                job.steps,
                job.batch,
                stop,
                pause,
                until,
                &mut on_step,
            )
            .await?;
        if stop.get() {
            return Ok(None);
        }
        // What the round depended on beyond θ and the data: committed to before encoding
        // (which moves the residual on).
        let state = CommittedState {
            trainer: round.state,
            residual: self.feedback.residual().to_vec(),
        }
        .to_bytes();
        let payload = update_payload(
            pseudo_gradient(&job.start, &round.params),
            job.privacy.as_ref(),
            job.codec,
            &mut self.feedback,
        );
        Ok(Some(TrainedRound {
            steps: round.steps,
            samples: round.samples,
            loss: round.loss,
            payload,
            state,
        }))
    }
}
