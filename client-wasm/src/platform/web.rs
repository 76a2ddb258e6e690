//! Browser platform: WebRTC-direct or WebSocket to the relay, `fetch` for HTTP, and the
//! JavaScript API.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use burn::backend::wgpu::{WgpuDevice, graphics::AutoGraphicsApi, init_setup_async};
use burn::backend::{Autodiff, NdArray, Wgpu};
use js_sys::{Function, JSON, Promise, Reflect, Uint8Array};
use libp2p::core::upgrade::Version;
use libp2p::{
    Swarm, Transport as _, identity::Keypair, noise, webrtc_websys, websocket_websys, yamux,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};

use swarmtrain_shared::crypto::{seed_from_hex, seed_to_hex};

use crate::peer::{self, PeerConfig, PeerEvent};
use crate::rpc::Behaviour;

/// The relay's advertised transports this platform can dial, in order of preference.
pub const TRANSPORTS: &[&str] = &["webrtc-direct", "ws"];

/// Platform description reported in `Join`.
pub fn platform() -> String {
    let agent = web_sys::window()
        .and_then(|w| w.navigator().user_agent().ok())
        .unwrap_or_default();
    format!("browser {agent}")
}

pub async fn sleep(duration: Duration) {
    futures_timer::Delay::new(duration).await;
}

pub fn spawn<F: Future<Output = ()> + 'static>(future: F) {
    spawn_local(future);
}

pub fn build_swarm(
    keypair: Keypair,
    behaviour: Behaviour,
    idle: Duration,
) -> Result<Swarm<Behaviour>, String> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_wasm_bindgen()
        .with_other_transport(|key| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                websocket_websys::Transport::default()
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()),
            )
        })
        .map_err(|e| e.to_string())?
        // WebRTC-direct brings its own security (DTLS, then noise) and multiplexing (data channels).
        .with_other_transport(|key| webrtc_websys::Transport::new(webrtc_websys::Config::new(key)))
        .map_err(|e| e.to_string())?
        .with_behaviour(|_| behaviour)
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build())
}

fn js_error(value: JsValue) -> String {
    value.as_string().unwrap_or_else(|| format!("{value:?}"))
}

pub async fn http_get(url: &str) -> Result<Vec<u8>, String> {
    let global = js_sys::global();
    let fetch: Function = Reflect::get(&global, &"fetch".into())
        .map_err(js_error)?
        .dyn_into()
        .map_err(js_error)?;
    let promise: Promise = fetch
        .call1(&global, &url.into())
        .map_err(js_error)?
        .dyn_into()
        .map_err(js_error)?;
    let response: web_sys::Response = JsFuture::from(promise)
        .await
        .map_err(|e| format!("GET {url}: {}", js_error(e)))?
        .dyn_into()
        .map_err(js_error)?;
    if !response.ok() {
        return Err(format!("GET {url}: HTTP {}", response.status()));
    }
    let buffer = JsFuture::from(response.array_buffer().map_err(js_error)?)
        .await
        .map_err(js_error)?;
    Ok(Uint8Array::new(&buffer).to_vec())
}

const IDENTITY_KEY: &str = "swarmtrain.identity.v1";

/// The identity seed kept in this origin's storage, created on first use.
fn stored_identity_seed() -> Result<[u8; 32], String> {
    let storage = web_sys::window().and_then(|w| w.local_storage().ok().flatten());
    let stored = storage
        .as_ref()
        .and_then(|s| s.get_item(IDENTITY_KEY).ok().flatten());
    if let Some(seed) = stored.as_deref().and_then(seed_from_hex) {
        return Ok(seed);
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| e.to_string())?;
    if let Some(storage) = storage {
        let _ = storage.set_item(IDENTITY_KEY, &seed_to_hex(&seed));
    }
    Ok(seed)
}

/// Whether `navigator.gpu.requestAdapter()` gives an adapter, and its description.
async fn webgpu_adapter() -> Option<String> {
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    let gpu = Reflect::get(&navigator, &"gpu".into())
        .ok()
        .filter(|g| !g.is_undefined() && !g.is_null())?;
    let request: Function = Reflect::get(&gpu, &"requestAdapter".into())
        .ok()?
        .dyn_into()
        .ok()?;
    let promise: Promise = request.call0(&gpu).ok()?.dyn_into().ok()?;
    let adapter = JsFuture::from(promise)
        .await
        .ok()
        .filter(|a| !a.is_null() && !a.is_undefined())?;
    let info = Reflect::get(&adapter, &"info".into()).ok();
    let field = |name: &str| {
        info.as_ref()
            .and_then(|i| Reflect::get(i, &name.into()).ok())
            .and_then(|v| v.as_string())
            .unwrap_or_default()
    };
    Some(
        format!(
            "{} {} {}",
            field("vendor"),
            field("architecture"),
            field("description")
        )
        .trim()
        .to_owned(),
    )
}

fn emitter(on_event: Function) -> impl FnMut(PeerEvent) {
    move |event| {
        let value = serde_json::to_string(&event)
            .ok()
            .and_then(|json| JSON::parse(&json).ok());
        if let Some(value) = value {
            let _ = on_event.call1(&JsValue::NULL, &value);
        }
    }
}

/// Bytes of text a tab samples from each new global model of a language-model run.
const SAMPLE_LEN: usize = 120;

/// A browser tab taking part in training. Created with `Contributor.start`.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Contributor {
    stop: Arc<AtomicBool>,
    peer: String,
    backend: String,
}

#[wasm_bindgen]
impl Contributor {
    /// Joins the run of the relay at `relay_url` and trains until `stop()`.
    ///
    /// `on_event` receives plain objects with a `kind` field: `backend`, `joined`, `model`,
    /// `round`, `sample` (text generated from the global model, language-model runs),
    /// `trained`, `submitted` or `error`. `backend` may be `"webgpu"`, `"cpu"` or `"auto"`
    /// (the default: WebGPU when the browser offers an adapter, else the CPU). `transport` may
    /// be `"webrtc-direct"`, `"ws"` or `"auto"` (the default: WebRTC-direct when the relay
    /// offers it, else WebSocket). `run` names the run to join (default: the relay's default
    /// run).
    pub async fn start(
        relay_url: String,
        on_event: Function,
        backend: Option<String>,
        transport: Option<String>,
        run: Option<String>,
    ) -> Result<Contributor, JsError> {
        std::panic::set_hook(Box::new(|info| {
            web_sys::console::error_1(&info.to_string().into())
        }));
        let seed = stored_identity_seed().map_err(|e| JsError::new(&e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let want = backend.unwrap_or_else(|| "auto".into());
        let adapter = if want == "cpu" {
            None
        } else {
            webgpu_adapter().await
        };
        if want == "webgpu" && adapter.is_none() {
            return Err(JsError::new("this browser offers no WebGPU adapter"));
        }
        let peer_key = swarmtrain_shared::Identity::from_seed(seed).peer().to_hex();
        let mut emit = emitter(on_event.clone());
        let transport = transport.filter(|t| t != "auto");
        if let Some(t) = &transport
            && !TRANSPORTS.contains(&t.as_str())
        {
            return Err(JsError::new(&format!(
                "unknown transport {t:?}: use webrtc-direct, ws or auto"
            )));
        }
        let run = run.filter(|r| !r.is_empty());
        let config = |backend: &str| PeerConfig {
            run_id: run.clone(),
            sample_len: SAMPLE_LEN,
            transport: transport.clone(),
            relay_url: relay_url.clone(),
            identity_seed: seed,
            backend: backend.into(),
            max_rounds: None,
            stop: stop.clone(),
        };
        let report = move |result: Result<u64, peer::PeerError>| {
            if let Err(e) = result {
                emitter(on_event.clone())(PeerEvent::Error {
                    message: e.to_string(),
                });
            }
        };
        let backend = match adapter {
            Some(detail) => {
                let device = WgpuDevice::default();
                init_setup_async::<AutoGraphicsApi>(&device, Default::default()).await;
                emit(PeerEvent::Backend {
                    backend: "webgpu".into(),
                    detail,
                });
                let config = config("wgpu");
                spawn_local(async move {
                    report(peer::run::<Autodiff<Wgpu>>(device, config, emit).await)
                });
                "webgpu"
            }
            None => {
                emit(PeerEvent::Backend {
                    backend: "cpu".into(),
                    detail: "ndarray (no WebGPU adapter)".into(),
                });
                let config = config("ndarray");
                spawn_local(async move {
                    report(peer::run::<Autodiff<NdArray>>(Default::default(), config, emit).await)
                });
                "cpu"
            }
        };
        Ok(Contributor {
            stop,
            peer: peer_key,
            backend: backend.into(),
        })
    }

    /// Stops training after the current step.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// This tab's peer key (hex BLAKE3 of its ML-DSA-65 public key).
    #[wasm_bindgen(getter)]
    pub fn peer(&self) -> String {
        self.peer.clone()
    }

    /// The training backend in use: "webgpu" or "cpu".
    #[wasm_bindgen(getter)]
    pub fn backend(&self) -> String {
        self.backend.clone()
    }
}
