//! The shared training code, compiled to wasm32, in real headless Chromium: on WebGPU (through
//! SwiftShader on CI machines) and on the CPU fallback. Also ML-DSA signing in the browser.

use burn::backend::wgpu::{WgpuDevice, graphics::AutoGraphicsApi, init_setup_async};
use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::prelude::ElementConversion;
use burn::tensor::backend::{AutodiffBackend, Backend};
use swarmtrain_shared::data::{BatchSampler, DigitsSet};
use swarmtrain_shared::lm::{LmConfig, SampleConfig, sample};
use swarmtrain_shared::lm_train::{InnerLoop, LmInnerLoop, LmInnerSpec, LrSchedule, TextBatch};
use swarmtrain_shared::model::{DigitsMlp, DigitsMlpConfig};
use swarmtrain_shared::train::{DigitsBatch, evaluate};
use swarmtrain_shared::{Identity, params};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

/// Ten classes of synthetic 8×8 "digits": class c lights row c mod 8 (and column for c ≥ 8).
fn toy_digits(n: usize) -> DigitsSet {
    let mut pixels = Vec::with_capacity(n * 64);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let class = i % 10;
        for p in 0..64 {
            let (row, col) = (p / 8, p % 8);
            let on = if class < 8 {
                row == class
            } else {
                col == class - 8
            };
            pixels.push(if on {
                12 + (i % 5) as u8
            } else {
                (i * 7 + p) as u8 % 3
            });
        }
        labels.push(class as u8);
    }
    DigitsSet::new(pixels, labels).expect("valid")
}

/// What 30 steps of the shared inner loop produced: θ_local and the mean loss.
struct Trained {
    params: Vec<f32>,
    loss: f32,
}

async fn train<B: AutodiffBackend>(device: &B::Device, start: &[f32]) -> Trained {
    let config = DigitsMlpConfig::new().with_hidden(32);
    let module = params::load(config.init::<B>(device), start).expect("load");
    let spec = LmInnerSpec::constant(1e-2, 0.0);
    let mut trainer = InnerLoop::<B, DigitsMlp<B>>::with_module(device, module, &spec);
    let data = toy_digits(200);
    let mut sampler = BatchSampler::new(data.len(), 32, 3);
    let mut sum = None;
    for _ in 0..30 {
        let loss = trainer.step(&DigitsBatch::draw(&data, &mut sampler));
        sum = Some(match sum {
            Some(s) => s + loss,
            None => loss,
        });
    }
    let loss = sum
        .expect("steps")
        .into_scalar_async()
        .await
        .expect("async readback")
        .elem::<f32>()
        / 30.0;
    Trained {
        params: trainer.params().await.expect("async readback"),
        loss,
    }
}

/// A tiny language model, 12 steps on text with structure, with the live run's schedule and
/// clipping; returns θ_local and the first and last batch losses.
async fn train_lm<B: AutodiffBackend>(device: &B::Device, start: &[f32]) -> (Vec<f32>, f32, f32) {
    let config = lm_config();
    let spec = LmInnerSpec::new(LrSchedule {
        peak: 1e-2,
        warmup: 2,
        total: 12,
        min_ratio: 0.1,
    });
    let mut trainer = LmInnerLoop::<B>::new(device, &config, start, &spec).expect("trainer");
    let text = b"the cat sees the dog. the dog sees the cat. ".repeat(40);
    let window = config.context + 1;
    let mut losses = Vec::new();
    for step in 0..12 {
        let windows: Vec<u8> = (0..8)
            .flat_map(|b| {
                let at = (step * 37 + b * 11) % (text.len() - window);
                text[at..at + window].to_vec()
            })
            .collect();
        let loss = trainer.step(&TextBatch { windows, window });
        losses.push(
            loss.into_scalar_async()
                .await
                .expect("readback")
                .elem::<f32>(),
        );
    }
    (
        trainer.params().await.expect("readback"),
        losses[0],
        losses[11],
    )
}

fn lm_config() -> LmConfig {
    LmConfig::new()
        .with_context(16)
        .with_d_model(32)
        .with_heads(2)
        .with_layers(2)
}

async fn initial() -> Vec<f32> {
    let device = Default::default();
    <NdArray as Backend>::seed(&device, 11);
    params::to_vec(
        &DigitsMlpConfig::new()
            .with_hidden(32)
            .init::<NdArray>(&device),
    )
    .await
    .expect("init")
}

#[wasm_bindgen_test]
async fn cpu_fallback_trains_in_the_browser() {
    let start = initial().await;
    let config = DigitsMlpConfig::new().with_hidden(32);
    let data = toy_digits(200);
    let before = evaluate::<NdArray>(&Default::default(), &config, &start, &data)
        .await
        .expect("eval");
    let result = train::<Autodiff<NdArray>>(&Default::default(), &start).await;
    let after = evaluate::<NdArray>(&Default::default(), &config, &result.params, &data)
        .await
        .expect("eval");
    assert!(
        after > 0.9 && after > before + 0.5,
        "accuracy {before} -> {after}"
    );
}

#[wasm_bindgen_test]
async fn webgpu_trains_in_the_browser_and_matches_the_cpu() {
    let device = webgpu().await;
    let start = initial().await;
    let gpu = train::<Autodiff<Wgpu>>(&device, &start).await;
    let cpu = train::<Autodiff<NdArray>>(&Default::default(), &start).await;
    let config = DigitsMlpConfig::new().with_hidden(32);
    let accuracy = evaluate::<Wgpu>(&device, &config, &gpu.params, &toy_digits(200))
        .await
        .expect("eval");
    assert!(accuracy > 0.9, "WebGPU-trained accuracy {accuracy}");
    let max_diff = gpu
        .params
        .iter()
        .zip(&cpu.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 5e-3,
        "WebGPU and CPU parameters differ by up to {max_diff}"
    );
    assert!(
        (gpu.loss - cpu.loss).abs() < 1e-3,
        "loss {} vs {}",
        gpu.loss,
        cpu.loss
    );
}

/// The language model trains on WebGPU as on the CPU (a shader that fails validation is only
/// logged and skipped there, so the result is compared), and sampling reads back asynchronously.
#[wasm_bindgen_test]
async fn webgpu_trains_the_language_model_like_the_cpu() {
    let device = webgpu().await;
    let config = lm_config();
    let start = config
        .init_params::<NdArray>(&Default::default(), 5)
        .await
        .expect("θ₀");
    let (gpu, gpu_first, gpu_last) = train_lm::<Autodiff<Wgpu>>(&device, &start).await;
    let (cpu, cpu_first, cpu_last) =
        train_lm::<Autodiff<NdArray>>(&Default::default(), &start).await;
    assert!(
        gpu_last < gpu_first * 0.8,
        "WebGPU loss {gpu_first} -> {gpu_last}"
    );
    assert!(
        (gpu_first - cpu_first).abs() < 1e-3 && (gpu_last - cpu_last).abs() < 2e-2,
        "losses: WebGPU {gpu_first} -> {gpu_last}, CPU {cpu_first} -> {cpu_last}"
    );
    let max_diff = gpu
        .iter()
        .zip(&cpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 2e-2,
        "WebGPU and CPU parameters differ by up to {max_diff}"
    );
    let sampled = |theta: Vec<f32>| async move {
        sample::<Wgpu>(
            &device_of(),
            &lm_config(),
            &theta,
            &SampleConfig {
                prompt: b"the ".to_vec(),
                len: 24,
                temperature: 0.0,
                seed: 1,
            },
        )
        .await
        .expect("sample")
    };
    let text = sampled(gpu.clone()).await;
    assert_eq!(text.len(), 28);
    assert_eq!(text, sampled(gpu).await, "seeded: the same text twice");
}

fn device_of() -> WgpuDevice {
    WgpuDevice::default()
}

/// The WebGPU device, set up once per page (a second setup of the same device panics).
async fn webgpu() -> WgpuDevice {
    use std::sync::atomic::{AtomicBool, Ordering};
    static READY: AtomicBool = AtomicBool::new(false);
    let device = WgpuDevice::default();
    if !READY.swap(true, Ordering::SeqCst) {
        init_setup_async::<AutoGraphicsApi>(&device, Default::default()).await;
    }
    device
}

#[wasm_bindgen_test]
fn ml_dsa_signatures_work_in_the_browser() {
    let id = Identity::from_seed([5; 32]);
    let envelope = swarmtrain_shared::protocol::Envelope {
        peer_id: vec![1, 2, 3],
        seq: 1,
        expires_ms: 1,
        message: swarmtrain_shared::protocol::ClientToRelay::AwaitRound {
            run_id: "digits".into(),
            after: None,
        },
    };
    let mut signed = id.sign(&envelope).expect("sign");
    assert_eq!(signed.verify_and_decode().expect("verify").0, id.peer());
    signed.body[0] ^= 1;
    assert!(signed.verify_and_decode().is_err());
}
