//! Aggregator throughput on 16 updates × 1M f32 (`cargo xtask bench robust` runs this beside
//! numpy doing the same reductions), and the machine's memory bandwidth for reference.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::aggregate::Contribution;
use swarmtrain_shared::data::SplitMix64;
use swarmtrain_shared::robust::{Rule, aggregate};

const PEERS: usize = 16;
const N: usize = 1 << 20;

fn updates() -> Vec<Contribution> {
    let mut rng = SplitMix64::new(1);
    (0..PEERS)
        .map(|p| Contribution {
            peer: PeerKey([p as u8; 32]),
            n_samples: 1,
            delta: (0..N)
                .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect(),
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let updates = updates();
    let bytes = (PEERS * N * 4) as u64;
    let mut group = c.benchmark_group("aggregate_16x1M");
    group
        .sample_size(15)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Bytes(bytes));
    let rules = [
        ("mean", Rule::Mean),
        ("median", Rule::Median),
        ("trimmed_mean", Rule::TrimmedMean { trim: 3 }),
        (
            "multi_krum",
            Rule::MultiKrum {
                byzantine: 4,
                select: 8,
            },
        ),
        ("geometric_median", Rule::GeometricMedian { iterations: 4 }),
        (
            "centered_clipping",
            Rule::CenteredClipping {
                tau: 10.0,
                iterations: 3,
            },
        ),
    ];
    for (name, rule) in rules {
        group.bench_function(name, |b| {
            b.iter(|| aggregate(black_box(&rule), black_box(&updates), N, None).expect("aggregate"))
        });
    }
    group.finish();

    // The yardstick for the mean, which only reads its 64 MB: a read-only pass over the same
    // rows on as many threads, each summing the bits of its share of every row (an integer sum,
    // which the compiler vectorizes; nothing is written).
    let rows: Vec<&[f32]> = updates.iter().map(|c| c.delta.as_slice()).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("memory");
    group
        .sample_size(15)
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("read_16x1M", |b| {
        b.iter(|| {
            let part = N.div_ceil(threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let rows = &rows;
                        scope.spawn(move || {
                            let range = (t * part).min(N)..((t + 1) * part).min(N);
                            rows.iter().fold(0u32, |acc, row| {
                                row[range.clone()]
                                    .iter()
                                    .fold(acc, |a, v| a.wrapping_add(v.to_bits()))
                            })
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or(0))
                    .fold(0u32, u32::wrapping_add)
            })
        })
    });
    group.finish();

    // Reference: a plain 256 MB copy (read + write), the machine's memory bandwidth.
    let source = vec![1.0f32; 64 << 20];
    let mut target = vec![0.0f32; 64 << 20];
    let mut group = c.benchmark_group("memory");
    group
        .sample_size(15)
        .measurement_time(Duration::from_secs(3));
    group.throughput(Throughput::Bytes((2 * 256) << 20));
    group.bench_function("copy_256MB", |b| {
        b.iter(|| target.copy_from_slice(black_box(&source)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
