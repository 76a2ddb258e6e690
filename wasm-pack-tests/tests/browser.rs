//! The shared training code, compiled to wasm32, in real headless Chromium: on WebGPU (through
//! SwiftShader on CI machines) and on the CPU fallback. Also ML-DSA signing in the browser.

use burn::backend::wgpu::{WgpuDevice, graphics::AutoGraphicsApi, init_setup_async};
use burn::backend::{Autodiff, NdArray, Wgpu};
use burn::tensor::backend::{AutodiffBackend, Backend};
use swarmtrain_shared::data::DigitsSet;
use swarmtrain_shared::model::DigitsMlpConfig;
use swarmtrain_shared::protocol::InnerSpec;
use swarmtrain_shared::train::{LocalResult, LocalTrainer, evaluate};
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

const SPEC: InnerSpec = InnerSpec {
    steps: 30,
    batch_size: 32,
    lr: 1e-2,
    weight_decay: 0.0,
};

async fn train<B: AutodiffBackend>(device: &B::Device, start: &[f32]) -> LocalResult {
    let config = DigitsMlpConfig::new().with_hidden(32);
    let mut trainer =
        LocalTrainer::<B>::new(device, &config, start, toy_digits(200), &SPEC, 3).expect("trainer");
    while !trainer.is_done() {
        trainer.step();
    }
    trainer.finish().await.expect("async readback")
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
    let device = WgpuDevice::default();
    init_setup_async::<AutoGraphicsApi>(&device, Default::default()).await;
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

#[wasm_bindgen_test]
fn ml_dsa_signatures_work_in_the_browser() {
    let id = Identity::from_seed([5; 32]);
    let mut signed = id.sign(&(1u64, vec![1u8, 2, 3])).expect("sign");
    assert_eq!(signed.verify_and_decode().expect("verify").0, id.peer());
    signed.body[0] ^= 1;
    assert!(signed.verify_and_decode().is_err());
}
