//! `cargo xtask bench robust`: the aggregation rules on 16 × 1M f32 beside numpy, in one run,
//! and the attack grids (digits, and the language model).

use std::fs;
use std::process::Command;

use crate::Result;
use crate::utils::*;

/// Aggregators on 16 × 1M f32, ours (criterion) and numpy's, in one run.
pub(crate) fn bench_robust() -> Result {
    let python = python_venv()?;
    status(cargo().args(["bench", "-p", "swarmtrain-shared", "--bench", "aggregate"]))?;
    let script = root().join("xtask/bench/numpy_aggregate.py");
    let out = Command::new(&python)
        .arg(&script)
        .output()
        .map_err(|e| format!("numpy benchmark: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "numpy benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let numpy = parse(
        &String::from_utf8_lossy(&out.stdout),
        "the numpy benchmark's output",
    )?;
    let version = string(&numpy, "numpy");

    let group = "aggregate_16x1M";
    let ours = |name: &str| criterion_median(group, name);
    let mean = ours("mean")?;
    let copy = criterion_median("memory", "copy_256MB")?;
    let bandwidth = 2.0 * 256.0 * 1048576.0 / copy / 1e9;
    let read = criterion_median("memory", "read_16x1M")?;
    let read_bandwidth = 16.0 * 1048576.0 * 4.0 / read / 1e9;
    let mean_bandwidth = 16.0 * 1048576.0 * 4.0 / mean / 1e9;
    let mut table = String::from(
        "| aggregator | ours (median) | numpy (median) | numpy / ours | ours / our mean |\n| --- | --- | --- | --- | --- |\n",
    );
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    for (name, reference) in [
        ("mean", Some("mean")),
        ("median", Some("median")),
        ("trimmed_mean", Some("trimmed_mean_sort")),
        ("multi_krum", None),
        ("geometric_median", None),
        ("centered_clipping", None),
    ] {
        let t = ours(name)?;
        let (np, ratio) = match reference {
            Some(key) => {
                let n = number(&numpy, key)?;
                (ms(n), format!("{:.1}×", n / t))
            }
            None => ("—".into(), "—".into()),
        };
        table.push_str(&format!(
            "| {name} | {} | {np} | {ratio} | {:.2}× |\n",
            ms(t),
            t / mean
        ));
    }
    let partition = number(&numpy, "trimmed_mean_partition")?;
    let report = format!(
        "# Aggregator throughput: 16 updates × 1M f32\n\n\
         Produced by `cargo xtask bench robust` ({} cores). Ours: criterion medians from \
         `shared/benches/aggregate.rs`; numpy {version}: medians of 9 runs of \
         `xtask/bench/numpy_aggregate.py`, in the same run. Trimmed mean drops 3 of 16 on each \
         side (numpy: `np.sort` along peers; with `np.partition` it took {}).\n\n{table}\n\
         Our mean streams its 64 MB input at {mean_bandwidth:.1} GB/s: {:.0}% of a read-only pass \
         over the same rows on as many threads ({read_bandwidth:.1} GB/s, `memory/read_16x1M`), \
         the yardstick for a reduction that only reads. (A 256 MB copy, read + write, moves \
         {bandwidth:.1} GB/s.) The relay's CPU aggregation is this code: `aggregate::step_cpu` \
         runs `robust::aggregate` and the outer step for the relay, the simulator and the attack \
         grid.\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        ms(partition),
        100.0 * mean_bandwidth / read_bandwidth,
    );
    let dir = root().join("docs/benchmarks");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    fs::write(dir.join("robust.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");

    // The attack grid: every standard attack × every rule × attacker share, on the digits.
    status(cargo().args(["build", "--release", "-p", "swarmtrain-relay"]))?;
    let relay = target_dir().join("release/swarmtrain-relay");
    status(
        Command::new(&relay)
            .args(["attack-grid", "--out"])
            .arg(dir.join("attacks.md")),
    )?;
    // The strongest attacks × the rules, with and without bucketing, on the language model.
    status(
        Command::new(&relay)
            .args(["attack-grid", "--lm", "--percent", "30", "--out"])
            .arg(dir.join("attacks-lm.md")),
    )
}
