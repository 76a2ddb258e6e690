//! Native training speed of the models in `bench/browser/plan.json`, with the code a peer runs
//! ([`TrainingBench`]: a replica's round of H steps, then the loss and θ read back). `cargo
//! xtask bench browser` runs this beside the browser engines. ndarray always; wgpu (Vulkan,
//! lavapipe on a machine without a GPU) with `--features wgpu`.

use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use serde::Deserialize;
use swarmtrain_client::bench::TrainingBench;
use swarmtrain_shared::lm_train::LmInnerSpec;
use swarmtrain_shared::protocol::ModelSpec;

#[derive(Deserialize)]
struct Plan {
    models: Vec<PlanModel>,
}

#[derive(Deserialize)]
struct PlanModel {
    name: String,
    model: ModelSpec,
    optimizer: LmInnerSpec,
    batch: u32,
    steps: u32,
}

fn plan() -> Plan {
    serde_json::from_str(include_str!("../../bench/browser/plan.json"))
        .unwrap_or_else(|e| panic!("bench/browser/plan.json: {e}"))
}

fn rounds<B: AutodiffBackend>(c: &mut Criterion, backend: &str, device: &B::Device) {
    // The peer yields to its runtime between steps, as it does in a worker.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap_or_else(|e| panic!("tokio: {e}"));
    for m in plan().models {
        let mut bench = runtime
            .block_on(TrainingBench::<B>::new(
                device,
                &m.model,
                &m.optimizer,
                m.batch,
            ))
            .unwrap_or_else(|e| panic!("{}: {e}", m.name));
        let mut round = || {
            runtime
                .block_on(bench.round(m.steps))
                .unwrap_or_else(|e| panic!("{}: {e}", m.name));
        };
        round(); // compile kernels, allocate buffers
        let mut group = c.benchmark_group(format!("train_{}", m.name));
        group
            .sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        group.bench_function(backend, |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    round();
                }
                started.elapsed()
            });
        });
        group.finish();
    }
}

fn bench(c: &mut Criterion) {
    rounds::<burn::backend::Autodiff<burn::backend::NdArray>>(c, "ndarray", &Default::default());
    #[cfg(feature = "wgpu")]
    {
        let device = burn::backend::wgpu::WgpuDevice::default();
        rounds::<burn::backend::Autodiff<burn::backend::Wgpu>>(c, "wgpu", &device);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
