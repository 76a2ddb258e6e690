//! `swarmtrain-relay attack-grid`: every standard attack × every aggregation rule on the digits.

use std::path::PathBuf;

use clap::Parser;
use swarmtrain_shared::robust::Rule;

#[derive(Parser, Debug)]
pub(crate) struct AttackGrid {
    /// Simulated peers per round.
    #[arg(long, default_value_t = 20)]
    peers: u32,
    /// Rounds per run.
    #[arg(long, default_value_t = 8)]
    rounds: u32,
    /// Inner AdamW steps per round.
    #[arg(long, default_value_t = 20)]
    inner_steps: u32,
    /// Attacker fractions in percent.
    #[arg(long, value_delimiter = ',', default_value = "0,10,20,30")]
    percent: Vec<u32>,
    /// ALIE's z: how many honest standard deviations its update sits below the honest mean
    /// (Baruch et al. derive 0.67 for 6 of 20 attackers; 1 is the usual setting).
    #[arg(long, default_value_t = 1.0)]
    alie_z: f32,
    /// Label-skewed (non-IID) shards: each peer's data is this many runs of the label-sorted
    /// training set, about as many classes (McMahan et al.'s split). IID shards without it.
    #[arg(long)]
    classes_per_peer: Option<usize>,
    /// Radius of centered clipping.
    #[arg(long, default_value_t = 0.5)]
    clip_radius: f32,
    /// Threads running cells side by side (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the Markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub(crate) fn attack_grid(args: AttackGrid) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::backend::Backend;
    use swarmtrain_shared::attack::{Attack, AttackRun, run_attack};
    use swarmtrain_shared::model::DigitsMlpConfig;
    use swarmtrain_shared::protocol::{InnerSpec, OuterSpec};

    anyhow::ensure!(args.peers >= 4, "--peers must be at least 4");
    anyhow::ensure!(
        args.percent.iter().all(|p| *p < 50),
        "--percent values must be below 50"
    );
    // The training set is split over the honest peers of a cell, so attackers take no data away
    // from training (what matters with label-skewed shards): honest peers a..n use shards
    // a % h..n % h, each once; attacker i trains on a copy of shard i.
    let split = |honest: u32| match args.classes_per_peer {
        None => swarmtrain_relay::dataset::digits("attack-grid", honest as usize),
        Some(k) => {
            swarmtrain_relay::dataset::digits_label_skewed("attack-grid", honest as usize, k)
        }
    };
    let data: std::collections::HashMap<u32, swarmtrain_relay::dataset::RunData> =
        std::iter::once(&0)
            .chain(&args.percent)
            .map(|p| Ok((*p, split(args.peers - args.peers * p / 100)?)))
            .collect::<anyhow::Result<_>>()?;
    let model = DigitsMlpConfig::new();
    let device = Default::default();
    <NdArray as Backend>::seed(&device, 7);
    let theta0 = futures::executor::block_on(swarmtrain_shared::params::to_vec(
        &model.init::<NdArray>(&device),
    ))?;
    // Every robust rule is configured for the largest attacker share of the grid.
    let f = args.peers * args.percent.iter().copied().max().unwrap_or(0) / 100;
    let rules = [
        ("mean", Rule::Mean),
        ("median", Rule::Median),
        ("trimmed mean", Rule::TrimmedMean { trim: f.max(1) }),
        (
            "multi-Krum",
            Rule::MultiKrum {
                byzantine: f,
                select: args.peers - 2 * f,
            },
        ),
        ("geometric median", Rule::GeometricMedian { iterations: 8 }),
        (
            "centered clipping",
            Rule::CenteredClipping {
                tau: args.clip_radius,
                iterations: 3,
            },
        ),
    ];
    let attacks = Attack::standard().map(|a| match a {
        Attack::Alie { .. } => Attack::Alie { z: args.alie_z },
        other => other,
    });
    let mut cells = Vec::new();
    for (rule_name, rule) in &rules {
        cells.push((*rule_name, rule.clone(), 0u32, None));
        for &percent in args.percent.iter().filter(|p| **p > 0) {
            for attack in attacks {
                cells.push((*rule_name, rule.clone(), percent, Some(attack)));
            }
        }
    }
    let inner = InnerSpec {
        steps: args.inner_steps,
        batch_size: 32,
        optimizer: swarmtrain_shared::lm_train::LmInnerSpec::constant(3e-3, 0.0),
    };
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let started = std::time::Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((rule_name, rule, percent, attack)) = cells.get(i) else {
                        break;
                    };
                    let run = AttackRun {
                        model: model.clone(),
                        peers: args.peers,
                        attackers: args.peers * percent / 100,
                        attack: *attack,
                        rule: rule.clone(),
                        rounds: args.rounds,
                        inner: inner.clone(),
                        outer: OuterSpec::default(),
                        seed: 1,
                    };
                    let outcome = futures::executor::block_on(run_attack::<Autodiff<NdArray>>(
                        &Default::default(),
                        &data[percent].shards,
                        &data[percent].held_out,
                        &theta0,
                        &run,
                    ));
                    let accuracy = match &outcome {
                        Ok(curve) => curve.last().copied().unwrap_or(f32::NAN),
                        Err(e) => {
                            eprintln!("{rule_name} {percent}% {attack:?}: {e}");
                            f32::NAN
                        }
                    };
                    eprintln!(
                        "[{:>4.0} s] {rule_name:<17} {percent:>2}% {:<16} accuracy {:.1}%",
                        started.elapsed().as_secs_f64(),
                        attack.map_or("none".into(), |a| a.name()),
                        100.0 * accuracy
                    );
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, accuracy));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    let accuracy = |rule: &str, percent: u32, attack: Option<Attack>| {
        results
            .iter()
            .find(|(i, _)| cells[*i].0 == rule && cells[*i].2 == percent && cells[*i].3 == attack)
            .map_or(f32::NAN, |(_, a)| *a)
    };
    let mut table = String::from("| aggregator | attackers | no attack |");
    for a in &attacks {
        table.push_str(&format!(" {} |", a.name()));
    }
    table.push_str("\n| --- | --: | --: |");
    table.push_str(&" --: |".repeat(attacks.len()));
    table.push('\n');
    for (rule_name, _) in &rules {
        let honest = accuracy(rule_name, 0, None);
        for &percent in args.percent.iter().filter(|p| **p > 0) {
            table.push_str(&format!(
                "| {rule_name} | {percent}% | {:.1} |",
                100.0 * honest
            ));
            for a in &attacks {
                table.push_str(&format!(
                    " {:.1} |",
                    100.0 * accuracy(rule_name, percent, Some(*a))
                ));
            }
            table.push('\n');
        }
    }
    // The acceptance: with the largest share, the best robust rule per attack vs the honest run.
    let top = args.percent.iter().copied().max().unwrap_or(0);
    let honest_best = rules
        .iter()
        .map(|(r, _)| accuracy(r, 0, None))
        .fold(f32::MIN, f32::max);
    let mut summary = String::new();
    for a in &attacks {
        let (best_rule, best) = rules[1..]
            .iter()
            .map(|(r, _)| (*r, accuracy(r, top, Some(*a))))
            .fold(("", f32::MIN), |acc, x| if x.1 > acc.1 { x } else { acc });
        summary.push_str(&format!(
            "- {}: best robust rule {best_rule} {:.1}% ({:+.1} points vs the best honest run, {:.1}%); plain mean {:.1}%.\n",
            a.name(),
            100.0 * best,
            100.0 * (best - honest_best),
            100.0 * honest_best,
            100.0 * accuracy("mean", top, Some(*a)),
        ));
    }
    let report = format!(
        "# Byzantine attack grid on the digits\n\n\
         Produced by `swarmtrain-relay attack-grid` (run by `cargo xtask bench robust`) in {:.0} s: \
         {} simulated peers, {} rounds of {} AdamW steps (batch 32), outer Nesterov lr 0.7 / \
         momentum 0.9, the shared digits MLP, {} shards over the honest peers and aggregation rules. Held-out accuracy (%) \
         after the last round; every rule is configured for {f} attackers (trim {}, Krum f = {f}, \
         centered clipping τ = {}). NaN/Inf and replayed updates are dropped by the relay's checks \
         before aggregation, as `tests/bad_input.rs` shows the real relay does.\n\n{table}\n\
         ## With {top}% attackers\n\n{summary}",
        started.elapsed().as_secs_f64(),
        args.peers,
        args.rounds,
        args.inner_steps,
        args.classes_per_peer.map_or("IID".to_owned(), |k| format!(
            "label-skewed ({k} label runs per peer)"
        )),
        f.max(1),
        args.clip_radius,
    );
    println!("{report}");
    if let Some(out) = args.out {
        std::fs::write(&out, &report)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}
