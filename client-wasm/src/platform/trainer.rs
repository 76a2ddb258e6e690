//! The npm package's entry point: `Trainer`. `Trainer.connect(options)` checks the options
//! and the relay, `on(kind, listener)` subscribes to typed events, `start()` trains until
//! `stop()`. The TypeScript types of the options and of every event are generated from the
//! Rust types (`tsify`), so they cannot drift from what the code sends.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use burn::backend::{Autodiff, NdArray, Wgpu};
use js_sys::Function;
use serde::Deserialize;
use tsify_next::Tsify;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::spawn_local;

use crate::Flag;
use crate::peer::{self, PeerConfig, PeerEvent};
use crate::webrtc::IceServer;

use super::{TrainerWorker, pick, report_panics, stored_identity_seed, wgpu_device};

/// Bytes of text a tab samples from each new global model of a language-model run.
const SAMPLE_LEN: usize = 120;

/// Where to train.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Tsify)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The CPU when the browser offers no WebGPU adapter or a software one (SwiftShader,
    /// llvmpipe); otherwise whichever of WebGPU and the CPU trains the run's model faster,
    /// measured on a few steps at start.
    #[default]
    Auto,
    /// WebGPU, whatever its adapter; an error without one.
    WebGpu,
    Cpu,
    /// Measure WebGPU against the CPU even on a software adapter, and take the faster.
    Measure,
}

/// How to reach the relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Tsify)]
#[serde(rename_all = "kebab-case")]
pub enum TransportChoice {
    /// WebRTC-direct when the relay offers it, else WebSocket.
    #[default]
    Auto,
    WebrtcDirect,
    Ws,
}

/// Other browsers a trainer links to over WebRTC unless told otherwise: on by default since
/// `tests/browser/internet.test.mjs` showed links through cone NATs (STUN) and a symmetric one
/// (TURN).
pub const DEFAULT_DIRECT: u32 = 3;

/// The options of `Trainer.connect`.
#[derive(Clone, Debug, Default, Deserialize, Tsify)]
#[tsify(from_wasm_abi)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrainerOptions {
    /// The relay's base URL, e.g. `"https://relay.example/"`.
    pub relay: String,
    /// The run to join (default: the relay's default run).
    #[tsify(optional)]
    #[serde(default)]
    pub run: Option<String>,
    #[tsify(optional)]
    #[serde(default)]
    pub backend: Option<BackendChoice>,
    #[tsify(optional)]
    #[serde(default)]
    pub transport: Option<TransportChoice>,
    /// How many other browsers of the relay to link to over WebRTC, signaling through the
    /// relay, and whether to take such links (default 3; 0: none). Across NATs the links use
    /// the relay operator's STUN/TURN servers.
    #[tsify(optional)]
    #[serde(default)]
    pub direct: Option<u32>,
    /// STUN/TURN servers for those links (default: the relay's, from its bootstrap document, with
    /// TURN credentials minted for this peer; without any, host candidates only: one network).
    #[tsify(optional)]
    #[serde(default)]
    pub ice_servers: Option<Vec<IceServer>>,
    /// The URL of a module worker script that loads this package and calls `runTrainer()`:
    /// training then runs there, and this thread keeps only the network (default: training on
    /// this thread, between its other tasks).
    #[tsify(optional)]
    #[serde(default)]
    pub worker: Option<String>,
    /// Stay on `relay` (default false: in a federation, join its nearest, least loaded relay
    /// and fail over to another when that one goes away).
    #[tsify(optional)]
    #[serde(default)]
    pub pin_relay: Option<bool>,
}

#[wasm_bindgen(typescript_custom_section)]
const TRAINER_EVENTS: &str = r#"
/** A `Trainer` event of one kind. */
export type TrainerEventOf<K extends PeerEvent["kind"]> = Extract<PeerEvent, { kind: K }>;
export interface Trainer {
  /** Calls `listener` with every event of `kind` (`"*"`: every event). */
  on<K extends PeerEvent["kind"]>(kind: K, listener: (event: TrainerEventOf<K>) => void): void;
  on(kind: "*", listener: (event: PeerEvent) => void): void;
}
"#;

type Listeners = Rc<RefCell<HashMap<String, Vec<Function>>>>;

/// A browser tab's training for one run of one relay.
#[wasm_bindgen]
pub struct Trainer {
    options: TrainerOptions,
    /// The relay's run this trainer joins.
    run: String,
    backend: &'static str,
    detail: String,
    peer: String,
    seed: zeroize::Zeroizing<[u8; 32]>,
    listeners: Listeners,
    stop: Arc<Flag>,
    pause: Arc<Flag>,
    started: bool,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("run", &self.run)
            .field("backend", &self.backend)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

#[wasm_bindgen]
impl Trainer {
    /// Checks `options`, reads this browser's identity (IndexedDB), asks the relay for its runs
    /// and picks the backend (see `BackendChoice`; `auto` may train a few steps of the run's
    /// model on each candidate): rejects with the reason when the backend is missing, the
    /// relay is unreachable or the run unknown. Nothing trains until `start()`.
    pub async fn connect(mut options: TrainerOptions) -> Result<Trainer, JsError> {
        report_panics();
        if !options.relay.ends_with('/') {
            options.relay.push('/');
        }
        let seed = stored_identity_seed().await.map_err(|e| JsError::new(&e))?;
        let peer = swarmtrain_shared::Identity::from_seed(*seed)
            .peer()
            .to_hex();
        let bootstrap = peer::fetch_bootstrap(&options.relay, None)
            .await
            .map_err(|e| JsError::new(&e.to_string()))?;
        let run = match options.run.clone().filter(|r| !r.is_empty()) {
            Some(run) if bootstrap.runs.is_empty() || bootstrap.runs.contains(&run) => run,
            Some(run) => {
                return Err(JsError::new(&format!(
                    "the relay has no run {run:?} (it has {})",
                    bootstrap.runs.join(", ")
                )));
            }
            None => bootstrap.run_id,
        };
        let pick::Choice { backend, detail } =
            pick::choose(options.backend.unwrap_or_default(), &options.relay, &run)
                .await
                .map_err(|e| JsError::new(&e))?;
        Ok(Self {
            options,
            run,
            backend,
            detail,
            peer,
            seed,
            listeners: Listeners::default(),
            stop: Arc::default(),
            pause: Arc::default(),
            started: false,
        })
    }

    /// Calls `listener` with every event of `kind` (`"*"`: every event); see `PeerEvent`.
    #[wasm_bindgen(skip_typescript)]
    pub fn on(&self, kind: String, listener: Function) {
        self.listeners
            .borrow_mut()
            .entry(kind)
            .or_default()
            .push(listener);
    }

    /// Starts training (once): joins the run and trains round after round until `stop()`,
    /// reconnecting with backoff when the relay goes away. Problems arrive as `error` events.
    pub fn start(&mut self) -> Result<(), JsError> {
        if self.started {
            return Err(JsError::new("this trainer has already started"));
        }
        self.started = true;
        let seed = self.seed.clone();
        let options = self.options.clone();
        let (run, backend, detail) = (self.run.clone(), self.backend, self.detail.clone());
        let (stop, pause) = (self.stop.clone(), self.pause.clone());
        let mut emit = dispatcher(self.listeners.clone());
        spawn_local(async move {
            let result = async {
                let config = PeerConfig {
                    run_id: Some(run),
                    sample_len: SAMPLE_LEN,
                    transport: match options.transport.unwrap_or_default() {
                        TransportChoice::Auto => None,
                        TransportChoice::WebrtcDirect => Some("webrtc-direct".to_owned()),
                        TransportChoice::Ws => Some("ws".to_owned()),
                    },
                    relay_url: options.relay.clone(),
                    identity_seed: seed,
                    backend: if backend == "webgpu" {
                        "wgpu"
                    } else {
                        "ndarray"
                    }
                    .into(),
                    max_rounds: None,
                    stop,
                    pause,
                    max_retries: None,
                    direct_peers: options.direct.unwrap_or(DEFAULT_DIRECT) as usize,
                    pin_relay: options.pin_relay.unwrap_or(false),
                    ice_servers: options.ice_servers.clone().unwrap_or_default(),
                };
                match options.worker.filter(|w| !w.is_empty()) {
                    Some(url) => {
                        let trainer = TrainerWorker::spawn(&url, backend)
                            .await
                            .map_err(peer::PeerError::Train)?;
                        emit(PeerEvent::Backend {
                            backend: backend.into(),
                            detail: format!("{detail}, in a worker"),
                        });
                        peer::run_with(trainer, config, &mut emit).await
                    }
                    None if backend == "webgpu" => {
                        let device = wgpu_device().await;
                        emit(PeerEvent::Backend {
                            backend: backend.into(),
                            detail,
                        });
                        peer::run::<Autodiff<Wgpu>>(device, config, &mut emit).await
                    }
                    None => {
                        emit(PeerEvent::Backend {
                            backend: backend.into(),
                            detail,
                        });
                        peer::run::<Autodiff<NdArray>>(Default::default(), config, &mut emit).await
                    }
                }
            }
            .await;
            if let Err(e) = result {
                emit(PeerEvent::Error {
                    message: e.to_string(),
                });
            }
        });
        Ok(())
    }

    /// Stops training after the current step (a `stopped` event follows).
    pub fn stop(&self) {
        self.stop.set(true);
    }

    /// Pauses training between steps (`true`) or resumes it (`false`): for a hidden tab or a
    /// low battery. The connection stays up; a round whose deadline comes while paused is
    /// sent with the steps done (none: the round is missed).
    #[wasm_bindgen(js_name = setPaused)]
    pub fn set_paused(&self, paused: bool) {
        self.pause.set(paused);
    }

    /// This browser's peer key (hex BLAKE3 of its ML-DSA-65 public key).
    #[wasm_bindgen(getter)]
    pub fn peer(&self) -> String {
        self.peer.clone()
    }

    /// The run this trainer joins.
    #[wasm_bindgen(getter)]
    pub fn run(&self) -> String {
        self.run.clone()
    }

    /// The training backend: "webgpu" or "cpu".
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.backend.into()
    }
}

/// Sends each event, as a plain object, to the listeners of its kind and of `"*"`.
fn dispatcher(listeners: Listeners) -> impl FnMut(PeerEvent) {
    move |event| {
        // As the generated types say: `None` is `undefined`.
        let Ok(value) = serde_wasm_bindgen::to_value(&event) else {
            return;
        };
        let kind = js_sys::Reflect::get(&value, &"kind".into())
            .ok()
            .and_then(|k| k.as_string())
            .unwrap_or_default();
        // Listeners may add listeners: call a copy.
        let called: Vec<Function> = {
            let listeners = listeners.borrow();
            [kind.as_str(), "*"]
                .iter()
                .filter_map(|k| listeners.get(*k))
                .flatten()
                .cloned()
                .collect()
        };
        for listener in called {
            if let Err(e) = listener.call1(&JsValue::NULL, &value) {
                web_sys::console::error_2(&"a swarmtrain event listener threw".into(), &e);
            }
        }
    }
}
