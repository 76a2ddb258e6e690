//! Local training in a dedicated Web Worker, so that the page's main thread keeps only the
//! network and the UI. The worker is a module script that loads this same package and calls
//! `runTrainer()` (the page's is `web/trainer-worker.js`); the page side is [`TrainerWorker`],
//! a [`Local`] whose calls become postcard messages ([`ToTrainer`], answered in order by
//! [`FromTrainer`]). Pausing and stopping travel as messages the worker applies at once,
//! between steps, while a round trains.

use std::sync::Arc;

use burn::backend::{Autodiff, NdArray, Wgpu};
use futures::channel::mpsc;
use futures::{FutureExt, StreamExt};
use js_sys::Uint8Array;
use serde::{Deserialize, Serialize};
use swarmtrain_shared::lm_train::LmInnerSpec;
use swarmtrain_shared::protocol::ModelSpec;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::spawn_local;
use web_sys::{
    DedicatedWorkerGlobalScope, ErrorEvent, MessageEvent, Worker, WorkerOptions, WorkerType,
};

use crate::Flag;
use crate::local::{InProcess, Local, SampleJob, TrainJob, TrainedRound};

/// What the page asks of its worker.
#[derive(Debug, Serialize, Deserialize)]
enum ToTrainer {
    /// Set up `backend` ("webgpu" or "cpu"); answered by `Ready`.
    Init {
        backend: String,
    },
    Reset {
        model: ModelSpec,
        optimizer: LmInnerSpec,
        start: Vec<f32>,
    },
    Sample(SampleJob),
    Train(TrainJob),
    /// Applied at once, even while a round trains; not answered.
    Pause(bool),
    /// Applied at once; not answered.
    Stop(bool),
}

/// The worker's answers, one per request other than `Pause` and `Stop`, in order.
#[derive(Debug, Serialize, Deserialize)]
enum FromTrainer {
    /// The worker's handler is set: requests may come.
    Alive,
    Ready,
    Done,
    Sampled(Vec<u8>),
    /// A round trained and encoded (None: stopped first).
    Trained(Option<TrainedRound>),
    Failed(String),
    /// Steps taken so far in the round training now (not an answer).
    Progress(u32),
}

fn encode<T: Serialize>(message: &T) -> Uint8Array {
    Uint8Array::from(
        postcard::to_allocvec(message)
            .unwrap_or_default()
            .as_slice(),
    )
}

fn decode<T: for<'de> Deserialize<'de>>(event: &MessageEvent) -> Option<T> {
    let bytes = event.data().dyn_into::<Uint8Array>().ok()?.to_vec();
    postcard::from_bytes(&bytes).ok()
}

/// The worker's trainer on the backend the page chose. One per worker, so the variants' sizes
/// do not matter.
#[allow(clippy::large_enum_variant)]
enum Backend {
    WebGpu(InProcess<Autodiff<Wgpu>>),
    Cpu(InProcess<Autodiff<NdArray>>),
}

impl Backend {
    async fn handle(
        &mut self,
        request: ToTrainer,
        stop: &Flag,
        pause: &Flag,
        post: &dyn Fn(FromTrainer),
    ) -> FromTrainer {
        let mut progress = |steps| post(FromTrainer::Progress(steps));
        let result = match request {
            ToTrainer::Reset {
                model,
                optimizer,
                start,
            } => match self {
                Self::WebGpu(t) => t.reset(&model, &optimizer, &start).await,
                Self::Cpu(t) => t.reset(&model, &optimizer, &start).await,
            }
            .map(|()| FromTrainer::Done),
            ToTrainer::Sample(job) => match self {
                Self::WebGpu(t) => t.sample(job).await,
                Self::Cpu(t) => t.sample(job).await,
            }
            .map(FromTrainer::Sampled),
            ToTrainer::Train(job) => match self {
                Self::WebGpu(t) => t.train_round(job, stop, pause, &mut progress).await,
                Self::Cpu(t) => t.train_round(job, stop, pause, &mut progress).await,
            }
            .map(FromTrainer::Trained),
            ToTrainer::Init { .. } => Err("the worker is already set up".into()),
            ToTrainer::Pause(_) | ToTrainer::Stop(_) => return FromTrainer::Done,
        };
        result.unwrap_or_else(FromTrainer::Failed)
    }
}

/// The worker's side: call once in a dedicated worker's module script, after `init()`.
#[wasm_bindgen(js_name = runTrainer)]
pub fn run_trainer() -> Result<(), JsError> {
    super::report_panics();
    let scope: DedicatedWorkerGlobalScope = js_sys::global()
        .dyn_into()
        .map_err(|_| JsError::new("runTrainer runs in a dedicated worker"))?;
    let stop = Arc::new(Flag::default());
    let pause = Arc::new(Flag::default());
    // The page waits for each answer before it asks again: a few requests in flight at most.
    let (mut requests_tx, mut requests) = mpsc::channel::<ToTrainer>(4);
    let on_message = {
        let (stop, pause, scope) = (stop.clone(), pause.clone(), scope.clone());
        Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
            match decode::<ToTrainer>(&event) {
                Some(ToTrainer::Pause(p)) => pause.set(p),
                Some(ToTrainer::Stop(s)) => stop.set(s),
                Some(request) => {
                    if requests_tx.try_send(request).is_err() {
                        let _ = scope.post_message(&encode(&FromTrainer::Failed(
                            "the training worker is busy".into(),
                        )));
                    }
                }
                None => {
                    let _ = scope.post_message(&encode(&FromTrainer::Failed(
                        "the training worker got a message it does not understand".into(),
                    )));
                }
            }
        })
    };
    scope.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    // The worker lives as long as its page: so does its handler.
    on_message.forget();
    let post = move |answer: FromTrainer| {
        let _ = scope.post_message(&encode(&answer));
    };
    post(FromTrainer::Alive);
    spawn_local(async move {
        let mut backend = None;
        while let Some(request) = requests.next().await {
            let answer = match (request, &mut backend) {
                (ToTrainer::Init { backend: name }, None) => match name.as_str() {
                    "webgpu" => {
                        backend = Some(Backend::WebGpu(InProcess::new(super::wgpu_device().await)));
                        FromTrainer::Ready
                    }
                    "cpu" => {
                        backend = Some(Backend::Cpu(InProcess::new(Default::default())));
                        FromTrainer::Ready
                    }
                    other => FromTrainer::Failed(format!("unknown backend {other:?}")),
                },
                (request, Some(b)) => b.handle(request, &stop, &pause, &post).await,
                (_, None) => FromTrainer::Failed("the worker is not set up yet".into()),
            };
            post(answer);
        }
    });
    Ok(())
}

/// The page's side: a [`Local`] trainer running in a dedicated worker.
pub struct TrainerWorker {
    worker: Worker,
    answers: mpsc::Receiver<FromTrainer>,
    has_replica: bool,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_error: Closure<dyn FnMut(ErrorEvent)>,
}

impl std::fmt::Debug for TrainerWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainerWorker")
            .field("has_replica", &self.has_replica)
            .finish_non_exhaustive()
    }
}

impl TrainerWorker {
    /// Starts the module worker at `url` and sets it up to train on `backend` ("webgpu" or
    /// "cpu").
    pub async fn spawn(url: &str, backend: &str) -> Result<Self, String> {
        let options = WorkerOptions::new();
        options.set_type(WorkerType::Module);
        let worker = Worker::new_with_options(url, &options)
            .map_err(|e| format!("starting the training worker {url}: {e:?}"))?;
        let (tx, answers) = mpsc::channel::<FromTrainer>(4);
        let on_message = {
            let mut tx = tx.clone();
            Closure::<dyn FnMut(MessageEvent)>::new(move |event: MessageEvent| {
                let answer = decode::<FromTrainer>(&event).unwrap_or_else(|| {
                    FromTrainer::Failed(
                        "the training worker sent a message we do not understand".into(),
                    )
                });
                let _ = tx.try_send(answer);
            })
        };
        let on_error = {
            let mut tx = tx;
            Closure::<dyn FnMut(ErrorEvent)>::new(move |event: ErrorEvent| {
                let _ = tx.try_send(FromTrainer::Failed(format!(
                    "the training worker failed: {}",
                    event.message()
                )));
            })
        };
        worker.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        worker.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        let mut trainer = Self {
            worker,
            answers,
            has_replica: false,
            _on_message: on_message,
            _on_error: on_error,
        };
        match trainer.next_answer().await? {
            FromTrainer::Alive => {}
            other => return Err(format!("the training worker said {other:?} first")),
        }
        match trainer
            .ask(&ToTrainer::Init {
                backend: backend.into(),
            })
            .await?
        {
            FromTrainer::Ready => Ok(trainer),
            other => Err(format!("the training worker answered {other:?}")),
        }
    }

    fn post(&self, message: &ToTrainer) -> Result<(), String> {
        post_to(&self.worker, message)
    }

    async fn next_answer(&mut self) -> Result<FromTrainer, String> {
        loop {
            return match self.answers.next().await {
                Some(FromTrainer::Progress(_)) => continue,
                Some(FromTrainer::Failed(e)) => Err(e),
                Some(answer) => Ok(answer),
                None => Err("the training worker is gone".into()),
            };
        }
    }

    async fn ask(&mut self, message: &ToTrainer) -> Result<FromTrainer, String> {
        self.post(message)?;
        self.next_answer().await
    }
}

fn post_to(worker: &Worker, message: &ToTrainer) -> Result<(), String> {
    worker
        .post_message(&encode(message))
        .map_err(|e| format!("posting to the training worker: {e:?}"))
}

impl Drop for TrainerWorker {
    fn drop(&mut self) {
        self.worker.terminate();
    }
}

impl Local for TrainerWorker {
    fn has_replica(&self) -> bool {
        self.has_replica
    }

    fn forget(&mut self) {
        // The next `reset` replaces the worker's replica.
        self.has_replica = false;
    }

    async fn reset(
        &mut self,
        model: &ModelSpec,
        optimizer: &LmInnerSpec,
        start: &[f32],
    ) -> Result<(), String> {
        let request = ToTrainer::Reset {
            model: model.clone(),
            optimizer: optimizer.clone(),
            start: start.to_vec(),
        };
        match self.ask(&request).await? {
            FromTrainer::Done => {
                self.has_replica = true;
                Ok(())
            }
            other => Err(format!("the training worker answered {other:?}")),
        }
    }

    async fn sample(&mut self, job: SampleJob) -> Result<Vec<u8>, String> {
        match self.ask(&ToTrainer::Sample(job)).await? {
            FromTrainer::Sampled(text) => Ok(text),
            other => Err(format!("the training worker answered {other:?}")),
        }
    }

    async fn train_round(
        &mut self,
        job: TrainJob,
        stop: &Flag,
        pause: &Flag,
        progress: &mut impl FnMut(u32),
    ) -> Result<Option<TrainedRound>, String> {
        let mut sent = (stop.get(), pause.get());
        self.post(&ToTrainer::Stop(sent.0))?;
        self.post(&ToTrainer::Pause(sent.1))?;
        self.post(&ToTrainer::Train(job))?;
        // While the round trains, pass on what the page decides (a hidden tab, a stop) the
        // moment it does.
        let answer = loop {
            let stopped = stop.becomes(!sent.0).fuse();
            let paused = pause.becomes(!sent.1).fuse();
            futures::pin_mut!(stopped, paused);
            let changed = futures::select! {
                answer = self.answers.next() => match answer {
                    Some(FromTrainer::Progress(steps)) => {
                        progress(steps);
                        false
                    }
                    answer => break answer,
                },
                () = stopped => true,
                () = paused => true,
            };
            if changed {
                let now = (stop.get(), pause.get());
                if now.0 != sent.0 {
                    post_to(&self.worker, &ToTrainer::Stop(now.0))?;
                }
                if now.1 != sent.1 {
                    post_to(&self.worker, &ToTrainer::Pause(now.1))?;
                }
                sent = now;
            }
        };
        match answer {
            Some(FromTrainer::Trained(round)) => Ok(round),
            Some(FromTrainer::Failed(e)) => Err(e),
            Some(other) => Err(format!("the training worker answered {other:?}")),
            None => Err("the training worker is gone".into()),
        }
    }
}
