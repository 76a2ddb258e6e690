//! Which backend a tab trains on when the page leaves the choice to the package
//! (`backend: "auto"`, the default). A WebGPU adapter that is a software rasterizer (the spec's
//! `isFallbackAdapter`, or SwiftShader, llvmpipe, lavapipe, WARP by name) trains the default
//! language model at about 7 s a step where the WebAssembly CPU path takes about 0.1 s
//! (`cargo xtask bench browser`), so the CPU is taken without measuring. Any other adapter is
//! measured against the CPU on the run's own model: a warm-up step (set-up, shader
//! compilation), then one timed step, then two more when that one was quick, and the faster
//! per step wins (a WebGPU warm-up over 5 s and ten CPU steps is the answer itself). `"measure"` measures even a software adapter; `"webgpu"` and `"cpu"` are the
//! user's override and are taken as given. The choice and its reason reach the page in the
//! `backend` event's `detail`.

use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::backend::AutodiffBackend;
use serde::Deserialize;
use swarmtrain_shared::lm_train::{LmInnerSpec, LrSchedule};
use swarmtrain_shared::protocol::ModelSpec;
use web_time::Instant;

use super::trainer::BackendChoice;
use super::{WebGpuAdapter, http_get, webgpu_adapter, wgpu_device};
use crate::bench::TrainingBench;

/// A timed step under this many milliseconds is timed twice more: one step that short is noise.
const QUICK_STEP_MS: f64 = 300.0;

/// A first WebGPU step longer than this (and than ten CPU steps) ends the timing.
const GIVE_UP_MS: f64 = 5_000.0;

/// The backend a tab trains on, and why.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Choice {
    /// `"webgpu"` or `"cpu"`.
    pub backend: &'static str,
    /// Why: the adapter and "as asked", or what was measured (for the page).
    pub detail: String,
}

impl Choice {
    fn cpu(detail: String) -> Self {
        Self {
            backend: "cpu",
            detail,
        }
    }
}

/// The model and batch of `run`, from the relay's public status.
#[derive(Deserialize)]
struct RunStatus {
    spec: SpecView,
}

#[derive(Deserialize)]
struct SpecView {
    model: ModelSpec,
    batch_size: u32,
    inner_lr: f64,
}

/// Picks the backend for `run` of the relay at `relay` (a base URL ending in `/`) as `want`
/// asks; errs only when `want` is WebGPU and the browser has no adapter, or when a measurement
/// fails.
pub(super) async fn choose(want: BackendChoice, relay: &str, run: &str) -> Result<Choice, String> {
    if want == BackendChoice::Cpu {
        return Ok(Choice::cpu("as asked".into()));
    }
    let Some(adapter) = webgpu_adapter().await else {
        return match want {
            BackendChoice::WebGpu => Err("this browser offers no WebGPU adapter".into()),
            _ => Ok(Choice::cpu("no WebGPU adapter".into())),
        };
    };
    match want {
        BackendChoice::WebGpu => Ok(Choice {
            backend: "webgpu",
            detail: format!("{}, as asked", adapter.description),
        }),
        BackendChoice::Auto if adapter.software => Ok(Choice::cpu(format!(
            "the WebGPU adapter ({}) is a software rasterizer, far slower than the CPU",
            adapter.description
        ))),
        _ => measure(&adapter, relay, run).await,
    }
}

/// Times both backends on `run`'s model and takes the faster.
async fn measure(adapter: &WebGpuAdapter, relay: &str, run: &str) -> Result<Choice, String> {
    let url = format!("{relay}api/runs/{run}/status?history=0");
    let status: RunStatus = serde_json::from_slice(&http_get(&url).await?)
        .map_err(|e| format!("the run's status: {e}"))?;
    let SpecView {
        model,
        batch_size,
        inner_lr,
    } = status.spec;
    let optimizer = LmInnerSpec::new(LrSchedule {
        peak: inner_lr,
        warmup: 0,
        total: 1,
        min_ratio: 1.0,
    });
    let (cpu, _) = ms_per_step::<Autodiff<NdArray>>(
        &Default::default(),
        &model,
        &optimizer,
        batch_size,
        f64::INFINITY,
    )
    .await?;
    let device = wgpu_device().await;
    // WebGPU's first step compiles its shaders, so it is timed again unless it was both ten
    // CPU steps and more than `GIVE_UP_MS` long: then it cannot win (SwiftShader's first step of
    // the default LM takes 12–16 s, a GPU's a second or two).
    let give_up = (10.0 * cpu).max(GIVE_UP_MS);
    let (gpu, first_only) =
        ms_per_step::<Autodiff<Wgpu>>(&device, &model, &optimizer, batch_size, give_up).await?;
    let first = if first_only { " (its first step)" } else { "" };
    Ok(if gpu < cpu {
        Choice {
            backend: "webgpu",
            detail: format!(
                "{}; measured {gpu:.0} ms a step, {cpu:.0} ms on the CPU",
                adapter.description
            ),
        }
    } else {
        Choice::cpu(format!(
            "measured {cpu:.0} ms a step, {gpu:.0} ms on WebGPU ({}){first}",
            adapter.description
        ))
    })
}

/// Milliseconds a training step of `model` takes on `B`: a warm-up step, then one timed step
/// (three when it is quick). A warm-up slower than `give_up_ms` is the answer itself (`true`
/// in the second place).
async fn ms_per_step<B: AutodiffBackend>(
    device: &B::Device,
    model: &ModelSpec,
    optimizer: &LmInnerSpec,
    batch: u32,
    give_up_ms: f64,
) -> Result<(f64, bool), String> {
    let mut bench = TrainingBench::<B>::new(device, model, optimizer, batch).await?;
    let started = Instant::now();
    bench.round(1).await?;
    let warm_up = started.elapsed().as_secs_f64() * 1e3;
    if warm_up > give_up_ms {
        return Ok((warm_up, true));
    }
    let started = Instant::now();
    bench.round(1).await?;
    let one = started.elapsed().as_secs_f64() * 1e3;
    if one >= QUICK_STEP_MS {
        return Ok((one, false));
    }
    let started = Instant::now();
    bench.round(2).await?;
    Ok(((one + started.elapsed().as_secs_f64() * 1e3) / 3.0, false))
}

/// Whether an adapter described by `info` (`GPUAdapterInfo`'s vendor, architecture and
/// description, lower case) is a software rasterizer.
pub(super) fn is_software(description: &str, fallback: bool) -> bool {
    const SOFTWARE: &[&str] = &[
        "swiftshader",
        "llvmpipe",
        "lavapipe",
        "softpipe",
        "microsoft basic render",
        "software",
    ];
    let description = description.to_lowercase();
    fallback || SOFTWARE.iter().any(|name| description.contains(name))
}
