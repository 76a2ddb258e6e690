//! Where a peer's local training runs, behind one trait: [`InProcess`] trains a [`Replica`] on
//! the caller's thread (native volunteers, the tests, a page that asks for it); in a browser,
//! `platform::TrainerWorker` sends the same [`TrainJob`]s to a dedicated Web Worker that runs
//! an [`InProcess`] of its own, so the page's main thread keeps only the network and the UI.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use swarmtrain_shared::lm::{self, LmConfig, SampleConfig};
use swarmtrain_shared::lm_train::LmInnerSpec;
use swarmtrain_shared::protocol::ModelSpec;
use web_time::Instant;

use crate::replica::{LocalRound, Replica, RoundData};

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

/// A peer's local trainer: a replica of the run's model with its AdamW moments, kept across
/// rounds until [`Local::forget`].
#[allow(async_fn_in_trait)]
pub trait Local {
    /// Whether a replica is held.
    fn has_replica(&self) -> bool;
    /// Drops the replica (the run started over: its moments do not apply).
    fn forget(&mut self);
    /// A fresh replica of `model` at θ `start`.
    async fn reset(
        &mut self,
        model: &ModelSpec,
        optimizer: &LmInnerSpec,
        start: &[f32],
    ) -> Result<(), String>;
    /// Text generated from θ (language-model runs).
    async fn sample(&mut self, job: SampleJob) -> Result<Vec<u8>, String>;
    /// One round on the replica ([`Replica::train_round`]); `stop` and `pause` are read
    /// between steps, and `progress` hears the steps taken at most every
    /// [`PROGRESS_EVERY`].
    async fn train_round(
        &mut self,
        job: TrainJob,
        stop: &AtomicBool,
        pause: &AtomicBool,
        progress: &mut impl FnMut(u32),
    ) -> Result<LocalRound, String>;
}

/// Training on this thread, on Burn backend `B`.
#[derive(Debug)]
pub struct InProcess<B: AutodiffBackend> {
    device: B::Device,
    replica: Option<Replica<B>>,
}

impl<B: AutodiffBackend> InProcess<B> {
    pub fn new(device: B::Device) -> Self {
        Self {
            device,
            replica: None,
        }
    }
}

impl<B: AutodiffBackend> Local for InProcess<B> {
    fn has_replica(&self) -> bool {
        self.replica.is_some()
    }

    fn forget(&mut self) {
        self.replica = None;
    }

    async fn reset(
        &mut self,
        model: &ModelSpec,
        optimizer: &LmInnerSpec,
        start: &[f32],
    ) -> Result<(), String> {
        self.replica = Some(Replica::new(&self.device, model, optimizer, start)?);
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
        stop: &AtomicBool,
        pause: &AtomicBool,
        progress: &mut impl FnMut(u32),
    ) -> Result<LocalRound, String> {
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
        replica
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
            .await
    }
}
