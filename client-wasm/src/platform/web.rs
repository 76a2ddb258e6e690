//! Browser platform: WebRTC-direct or WebSocket to the relay, `fetch` for HTTP, and the
//! JavaScript API.

use std::future::Future;
use std::time::Duration;

use burn::backend::wgpu::{WgpuDevice, graphics::AutoGraphicsApi, init_setup_async};
use burn::backend::{Autodiff, NdArray, Wgpu};
use js_sys::{Function, Promise, Reflect, Uint8Array};
use libp2p::core::upgrade::Version;
use libp2p::{
    Swarm, Transport as _, identity::Keypair, noise, webrtc_websys, websocket_websys, yamux,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, spawn_local};

use swarmtrain_shared::crypto::{seed_from_hex, seed_to_hex};

use crate::rpc::Behaviour;

#[path = "pick.rs"]
mod pick;
#[path = "trainer.rs"]
mod trainer;
#[path = "trainer_worker.rs"]
mod trainer_worker;
pub use trainer::{BackendChoice, Trainer, TrainerOptions, TransportChoice};
pub use trainer_worker::{TrainerWorker, run_trainer};

/// The relay's advertised transports this platform can dial, in order of preference.
pub const TRANSPORTS: &[&str] = &["webrtc-direct", "ws"];

/// Whether this page may dial `address`: a page served over HTTPS may not open a plain `ws://`
/// WebSocket (mixed content), only `wss` (`/tls/ws`, `/wss`) and WebRTC-direct.
pub fn can_dial(address: &str) -> bool {
    let secure = Reflect::get(&js_sys::global(), &"location".into())
        .and_then(|l| Reflect::get(&l, &"protocol".into()))
        .ok()
        .and_then(|p| p.as_string())
        .is_some_and(|p| p == "https:");
    let plain_ws = address.contains("/ws") && !address.contains("/tls/ws");
    !(secure && plain_ws)
}

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

/// Lets the browser run its other tasks (rendering, input, the connection to the relay) between
/// training steps: a message to ourselves through a `MessageChannel`, a macrotask that is not
/// throttled like `setTimeout(0)`, which waits at least 4 ms once timeouts nest (it cost the
/// digits run almost half its steps).
pub async fn yield_now() {
    let promise = Promise::new(&mut |resolve, _reject| {
        match web_sys::MessageChannel::new() {
            Ok(channel) => {
                // An entangled port with a listener and a message on its way stays alive.
                channel.port1().set_onmessage(Some(&resolve));
                let _ = channel.port2().post_message(&JsValue::NULL);
            }
            Err(_) => {
                let _ = resolve.call0(&JsValue::NULL);
            }
        }
    });
    let _ = JsFuture::from(promise).await;
}

pub fn spawn<F: Future<Output = ()> + 'static>(future: F) {
    spawn_local(future);
}

/// The swarm of a browser peer: browser-to-browser WebRTC (through a circuit relay
/// reservation) first, then circuits themselves, WebSocket and WebRTC-direct to the relay.
pub fn build_swarm(
    keypair: Keypair,
    mut behaviour: Behaviour,
    idle: Duration,
    ice_servers: Vec<crate::webrtc::IceServer>,
) -> Result<Swarm<Behaviour>, String> {
    let (circuits, relay_client) = libp2p::relay::client::new(keypair.public().to_peer_id());
    let (browsers, signaling) = crate::webrtc::transport::new(ice_servers);
    behaviour.relay_client = Some(relay_client).into();
    behaviour.webrtc = Some(signaling).into();
    let behaviour = behaviour.with_theta();
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_wasm_bindgen()
        // Browser-to-browser WebRTC has no Noise: the DTLS fingerprints came over the relayed
        // connection, which Noise authenticated.
        .with_other_transport(|_| browsers)
        .map_err(|e| e.to_string())?
        .with_other_transport(|key| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                circuits
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()),
            )
        })
        .map_err(|e| e.to_string())?
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

#[wasm_bindgen(module = "/src/platform/identity.js")]
extern "C" {
    #[wasm_bindgen(catch, js_name = loadSeed)]
    async fn load_seed() -> Result<JsValue, JsValue>;
    #[wasm_bindgen(catch, js_name = storeSeed)]
    async fn store_seed(seed: &[u8]) -> Result<JsValue, JsValue>;
}

/// The identity seed kept in this origin's IndexedDB, created on first use (see
/// `identity.js`). The JavaScript copy is overwritten with zeros once read.
async fn stored_identity_seed() -> Result<zeroize::Zeroizing<[u8; 32]>, String> {
    let value = load_seed().await.map_err(|e| {
        format!(
            "could not read the identity from IndexedDB: {}",
            js_error(e)
        )
    })?;
    let bytes = Uint8Array::new(&value);
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    if bytes.length() != 32 {
        return Err(format!(
            "the stored identity has {} bytes, not 32",
            bytes.length()
        ));
    }
    bytes.copy_to(seed.as_mut_slice());
    bytes.fill(0, 0, 32);
    Ok(seed)
}

/// This tab's identity seed as 64 hex digits, to keep somewhere safe or move to another
/// browser with [`import_identity`]. Whoever has it can sign as this peer.
#[wasm_bindgen(js_name = exportIdentity)]
pub async fn export_identity() -> Result<String, JsError> {
    let seed = stored_identity_seed().await.map_err(|e| JsError::new(&e))?;
    Ok(seed_to_hex(&seed).to_string())
}

/// Replaces this origin's identity with the one exported as `hex` (64 hex digits) and returns
/// its peer key. A tab that is contributing keeps its old identity until it starts again.
#[wasm_bindgen(js_name = importIdentity)]
pub async fn import_identity(hex: String) -> Result<String, JsError> {
    let seed = seed_from_hex(&hex)
        .ok_or_else(|| JsError::new("an identity is 64 hex digits (as exportIdentity gives it)"))?;
    store_seed(seed.as_slice())
        .await
        .map_err(|e| JsError::new(&format!("could not store the identity: {}", js_error(e))))?;
    Ok(swarmtrain_shared::Identity::from_seed(*seed)
        .peer()
        .to_hex())
}

/// The peer key (hex BLAKE3 of the ML-DSA-65 public key) of this origin's identity.
#[wasm_bindgen(js_name = identityPeerKey)]
pub async fn identity_peer_key() -> Result<String, JsError> {
    let seed = stored_identity_seed().await.map_err(|e| JsError::new(&e))?;
    Ok(swarmtrain_shared::Identity::from_seed(*seed)
        .peer()
        .to_hex())
}

/// A WebGPU adapter the browser offers.
#[derive(Debug, Clone)]
struct WebGpuAdapter {
    /// `GPUAdapterInfo`'s vendor, architecture and description.
    description: String,
    /// A software rasterizer (SwiftShader, llvmpipe, …): `isFallbackAdapter` or its name.
    software: bool,
}

/// How long `webgpu_adapter` waits for the browser's answer.
const ADAPTER_WAIT: Duration = Duration::from_secs(10);

/// The adapter `navigator.gpu.requestAdapter()` gives within `ADAPTER_WAIT`, if any.
async fn webgpu_adapter() -> Option<WebGpuAdapter> {
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    let gpu = Reflect::get(&navigator, &"gpu".into())
        .ok()
        .filter(|g| !g.is_undefined() && !g.is_null())?;
    let request: Function = Reflect::get(&gpu, &"requestAdapter".into())
        .ok()?
        .dyn_into()
        .ok()?;
    let promise: Promise = request.call0(&gpu).ok()?.dyn_into().ok()?;
    // Chromium can leave the request unanswered for long while its GPU process is busy or
    // starting (seen in CI with two tabs training and the relay replaying updates): past
    // ADAPTER_WAIT the browser counts as having no adapter, and the CPU trains.
    let answer =
        futures::future::select(JsFuture::from(promise), Box::pin(sleep(ADAPTER_WAIT))).await;
    let futures::future::Either::Left((answer, _)) = answer else {
        web_sys::console::warn_1(
            &format!("navigator.gpu.requestAdapter() gave no answer in {ADAPTER_WAIT:?}").into(),
        );
        return None;
    };
    let adapter = answer.ok().filter(|a| !a.is_null() && !a.is_undefined())?;
    let info = Reflect::get(&adapter, &"info".into()).ok();
    let field = |name: &str| {
        info.as_ref()
            .and_then(|i| Reflect::get(i, &name.into()).ok())
            .and_then(|v| v.as_string())
            .unwrap_or_default()
    };
    let description = format!(
        "{} {} {}",
        field("vendor"),
        field("architecture"),
        field("description")
    )
    .trim()
    .to_owned();
    // `GPUAdapterInfo.isFallbackAdapter` (newer browsers) or `GPUAdapter.isFallbackAdapter`.
    let fallback = [info.as_ref(), Some(&adapter)]
        .into_iter()
        .flatten()
        .any(|o| {
            Reflect::get(o, &"isFallbackAdapter".into())
                .ok()
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
        });
    Some(WebGpuAdapter {
        software: pick::is_software(&description, fallback),
        description,
    })
}

thread_local! {
    static WGPU_READY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The WebGPU device, set up on first use: Burn refuses to set up a device twice, and a page
/// may start training again after `stop()` or run several benches.
async fn wgpu_device() -> WgpuDevice {
    let device = WgpuDevice::default();
    if !WGPU_READY.get() {
        init_setup_async::<AutoGraphicsApi>(&device, Default::default()).await;
        WGPU_READY.set(true);
    }
    device
}

/// Sends a panic's message and location to the console (the default hook prints nothing in a
/// browser, leaving only "unreachable").
fn report_panics() {
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&info.to_string().into())
    }));
}

/// One per bench, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum BenchReplica {
    WebGpu(crate::bench::TrainingBench<Autodiff<Wgpu>>),
    Cpu(crate::bench::TrainingBench<Autodiff<NdArray>>),
}

/// How fast this browser trains a model with the code a contributor runs: a replica stepped
/// round after round as a peer steps it, on generated data of the right shape. Created with
/// `TrainingBench.create`.
#[wasm_bindgen]
pub struct TrainingBench {
    inner: BenchReplica,
    detail: String,
}

impl std::fmt::Debug for TrainingBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainingBench")
            .field("detail", &self.detail)
            .finish_non_exhaustive()
    }
}

#[wasm_bindgen]
impl TrainingBench {
    /// A replica of `model` (a run spec's model as JSON, e.g.
    /// `{"ByteLm":{"context":64,"d_model":64,"heads":4,"layers":2,"mlp_ratio":4}}` or
    /// `{"DigitsMlp":{"hidden":64}}`) with the inner optimizer `optimizer` (a run spec's
    /// `inner.optimizer` as JSON), training on batches of `batch`. `backend` is `"webgpu"` or
    /// `"cpu"`.
    pub async fn create(
        backend: String,
        model: String,
        optimizer: String,
        batch: u32,
    ) -> Result<TrainingBench, JsError> {
        report_panics();
        let model =
            serde_json::from_str(&model).map_err(|e| JsError::new(&format!("model: {e}")))?;
        let optimizer = serde_json::from_str(&optimizer)
            .map_err(|e| JsError::new(&format!("optimizer: {e}")))?;
        let (inner, detail) = match backend.as_str() {
            "webgpu" => {
                let adapter = webgpu_adapter()
                    .await
                    .ok_or_else(|| JsError::new("this browser offers no WebGPU adapter"))?
                    .description;
                let device = wgpu_device().await;
                let bench = crate::bench::TrainingBench::new(&device, &model, &optimizer, batch)
                    .await
                    .map_err(|e| JsError::new(&e))?;
                (
                    BenchReplica::WebGpu(bench),
                    format!("Burn WebGPU ({adapter})"),
                )
            }
            "cpu" => {
                let bench = crate::bench::TrainingBench::new(
                    &Default::default(),
                    &model,
                    &optimizer,
                    batch,
                )
                .await
                .map_err(|e| JsError::new(&e))?;
                (
                    BenchReplica::Cpu(bench),
                    "Burn ndarray (CPU fallback)".into(),
                )
            }
            other => {
                return Err(JsError::new(&format!(
                    "unknown backend {other:?}: use webgpu or cpu"
                )));
            }
        };
        Ok(Self { inner, detail })
    }

    /// Trains one round of `steps` steps and resolves to its mean batch loss.
    pub async fn round(&mut self, steps: u32) -> Result<f32, JsError> {
        let round = match &mut self.inner {
            BenchReplica::WebGpu(b) => b.round(steps).await,
            BenchReplica::Cpu(b) => b.round(steps).await,
        };
        round.map(|r| r.loss).map_err(|e| JsError::new(&e))
    }

    /// The model's parameter count.
    #[wasm_bindgen(getter)]
    pub fn params(&self) -> usize {
        match &self.inner {
            BenchReplica::WebGpu(b) => b.params(),
            BenchReplica::Cpu(b) => b.params(),
        }
    }

    /// The engine and backend, with the WebGPU adapter's description.
    #[wasm_bindgen(getter)]
    pub fn detail(&self) -> String {
        self.detail.clone()
    }
}
