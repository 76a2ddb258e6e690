//! The shared aggregation code gives the same result on every backend compiled into the relay
//! and through Burn's tensor path on the CPU: bit for bit for mean, median and trimmed mean.
//! CUDA is checked only where the driver is present; elsewhere it says so and is skipped.

use std::time::Instant;

use burn::backend::NdArray;
use swarmtrain_relay::AggregationBackend;
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::aggregate::{Contribution, RoundInputs, Stepped, outer_step_with};
use swarmtrain_shared::data::SplitMix64;
use swarmtrain_shared::outer::OuterOptimizer;
use swarmtrain_shared::protocol::OuterSpec;
use swarmtrain_shared::robust::{self, Rule};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

fn bitwise_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn usable(backend: AggregationBackend) -> Result<(), String> {
    let name = backend.to_string();
    if name == "cuda" && !std::path::Path::new("/dev/nvidiactl").exists() {
        return Err("no NVIDIA driver on this machine (/dev/nvidiactl is missing)".into());
    }
    Ok(())
}

#[tokio::test]
async fn every_compiled_backend_matches_the_cpu() {
    let backends = AggregationBackend::compiled_in();
    println!("backends compiled in: {backends:?}");
    if !backends.iter().any(|b| b.to_string() == "cuda") {
        println!(
            "SKIPPED cuda: not compiled in (build the relay with --features cuda to check it)"
        );
    }
    for size in [50_000usize, 1_000_000] {
        let peers = 16;
        let contributions: Vec<Contribution> = (0..peers)
            .map(|p| Contribution {
                peer: PeerKey([p as u8; 32]),
                n_samples: 1,
                delta: random(size, p),
            })
            .collect();
        let params = random(size, 100);
        let velocity = random(size, 101);
        let spec = OuterSpec::default();
        for rule in [Rule::Mean, Rule::Median, Rule::TrimmedMean { trim: 3 }] {
            // The CPU reference: the shared CPU rule and the outer optimizer.
            let aggregate = robust::aggregate(&rule, &contributions, size, None).expect("cpu rule");
            let (mut cpu_theta, mut outer) = (
                params.clone(),
                OuterOptimizer {
                    spec: spec.clone(),
                    velocity: velocity.clone(),
                },
            );
            outer.step(&mut cpu_theta, &aggregate).expect("shape");
            let cpu_v = outer.velocity;
            let inputs = RoundInputs {
                params: &params,
                velocity: &velocity,
                contributions: &contributions,
                rule: &rule,
                center: None,
                outer: &spec,
            };
            // The Burn tensor path on the CPU backend.
            let burn = outer_step_with::<NdArray>(&Default::default(), &inputs)
                .await
                .expect("burn ndarray");
            // Bit for bit: both sum the kept rows in ascending order and scale by a reciprocal.
            assert!(
                bitwise_eq(&burn.params, &cpu_theta) && bitwise_eq(&burn.velocity, &cpu_v),
                "Burn's ndarray path and the CPU kernels differ for {rule:?}"
            );
            for &backend in &backends {
                if let Err(why) = usable(backend) {
                    println!("SKIPPED {backend}: {why}");
                    continue;
                }
                // The first call on a GPU backend compiles kernels; time the second.
                backend.outer_step(&inputs).await.expect("warm-up");
                let started = Instant::now();
                let Stepped {
                    params: theta,
                    velocity: v,
                    ..
                } = backend.outer_step(&inputs).await.expect("aggregate");
                let elapsed = started.elapsed();
                let max_diff = theta
                    .iter()
                    .chain(&v)
                    .zip(cpu_theta.iter().chain(&cpu_v))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                println!(
                    "{backend}: {rule:?} of {peers} × {size} f32 + Nesterov step in {:.2} ms (incl. transfers), max |Δ| vs CPU {max_diff:e}",
                    elapsed.as_secs_f64() * 1e3
                );
                assert!(
                    bitwise_eq(&theta, &cpu_theta) && bitwise_eq(&v, &cpu_v),
                    "{backend} {rule:?} differs from the CPU (by up to {max_diff})"
                );
            }
        }
    }
}
