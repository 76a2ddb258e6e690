//! `swarmtrain-relay attack-grid`: every standard attack × every aggregation rule on the digits,
//! or (`--lm`) the strongest attacks × the rules, with and without bucketing, on the language
//! model. Every cell runs the relay's round engine (`shared/src/round.rs`): bucketing, the rule
//! and the outer step are the code the relay runs.

use std::path::PathBuf;

use clap::Parser;
use swarmtrain_shared::robust::Rule;

#[derive(Parser, Debug)]
pub(crate) struct AttackGrid {
    /// The language-model grid: rules (and bucketed rules) × {no attack, ALIE, IPM, min-max,
    /// min-sum, ROP, sign flip} at the largest --percent, on the byte-level transformer.
    #[arg(long)]
    lm: bool,
    /// Simulated peers per round (default: 20 on the digits, 10 on the language model).
    #[arg(long)]
    peers: Option<u32>,
    /// Rounds per run (default: 8 on the digits, 15 on the language model).
    #[arg(long)]
    rounds: Option<u32>,
    /// Inner AdamW steps per round (default: 20 on the digits and the language model).
    #[arg(long)]
    inner_steps: Option<u32>,
    /// Attacker fractions in percent (the language-model grid uses the largest).
    #[arg(long, value_delimiter = ',', default_value = "0,10,20,30")]
    percent: Vec<u32>,
    /// With --lm: bucket sizes tried in front of the median, the geometric median and
    /// centered clipping (1, no bucketing, always runs).
    #[arg(long, value_delimiter = ',', default_value = "2")]
    bucket: Vec<u32>,
    /// With --lm: a UTF-8 text file or a folder of them.
    #[arg(long, default_value = swarmtrain_relay::corpus::DEFAULT_CORPUS)]
    corpus: PathBuf,
    /// With --lm: context length in bytes.
    #[arg(long, default_value_t = 32)]
    context: usize,
    /// With --lm: model width.
    #[arg(long, default_value_t = 32)]
    d_model: usize,
    /// With --lm: transformer blocks.
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// With --lm: attention heads.
    #[arg(long, default_value_t = 2)]
    heads: usize,
    /// With --lm: windows per step per peer.
    #[arg(long, default_value_t = 8)]
    batch: u32,
    /// With --lm: held-out windows the loss is measured on.
    #[arg(long, default_value_t = 256)]
    eval_windows: u32,
    /// ALIE's z: how many honest standard deviations its update sits below the honest mean
    /// (Baruch et al. derive 0.67 for 6 of 20 attackers; 1 is the usual setting).
    #[arg(long, default_value_t = 1.0)]
    alie_z: f32,
    /// Label-skewed (non-IID) shards: each peer's data is this many runs of the label-sorted
    /// training set, about as many classes (McMahan et al.'s split). IID shards without it.
    #[arg(long)]
    classes_per_peer: Option<usize>,
    /// Radius of centered clipping (default: 0.5 on the digits, 3 on the language model, where honest
    /// updates are larger).
    #[arg(long)]
    clip_radius: Option<f32>,
    /// Threads running cells side by side (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the Markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

pub(crate) fn attack_grid(args: AttackGrid) -> anyhow::Result<()> {
    if args.lm {
        return lm_grid(args);
    }
    let peers = args.peers.unwrap_or(20);
    let rounds = args.rounds.unwrap_or(8);
    let inner_steps = args.inner_steps.unwrap_or(20);
    let clip_radius = args.clip_radius.unwrap_or(0.5);
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::backend::Backend;
    use swarmtrain_shared::attack::{Attack, AttackRun, run_attack};
    use swarmtrain_shared::model::DigitsMlpConfig;
    use swarmtrain_shared::protocol::{InnerSpec, OuterSpec};

    anyhow::ensure!(peers >= 4, "--peers must be at least 4");
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
            .map(|p| Ok((*p, split(peers - peers * p / 100)?)))
            .collect::<anyhow::Result<_>>()?;
    let model = DigitsMlpConfig::new();
    let device = Default::default();
    <NdArray as Backend>::seed(&device, 7);
    let theta0 = futures::executor::block_on(swarmtrain_shared::params::to_vec(
        &model.init::<NdArray>(&device),
    ))?;
    // Every robust rule is configured for the largest attacker share of the grid.
    let f = peers * args.percent.iter().copied().max().unwrap_or(0) / 100;
    let rules = [
        ("mean", Rule::Mean),
        ("median", Rule::Median),
        ("trimmed mean", Rule::TrimmedMean { trim: f.max(1) }),
        (
            "multi-Krum",
            Rule::MultiKrum {
                byzantine: f,
                select: peers - 2 * f,
            },
        ),
        ("geometric median", Rule::GeometricMedian { iterations: 8 }),
        (
            "centered clipping",
            Rule::CenteredClipping {
                tau: clip_radius,
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
        steps: inner_steps,
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
                        peers,
                        attackers: peers * percent / 100,
                        attack: *attack,
                        rule: rule.clone(),
                        rounds,
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
         before aggregation, as `tests/bad_input.rs` shows the real relay does. Min-max and \
         min-sum (Shejwalkar & Houmansadr 2021) push the honest mean along −std; ROP \
         (Özfatura et al. 2022) sits around the previous aggregate, orthogonal to it.\n\n{table}\n\
         ## With {top}% attackers\n\n{summary}",
        started.elapsed().as_secs_f64(),
        peers,
        rounds,
        inner_steps,
        args.classes_per_peer.map_or("IID".to_owned(), |k| format!(
            "label-skewed ({k} label runs per peer)"
        )),
        f.max(1),
        clip_radius,
    );
    println!("{report}");
    if let Some(out) = args.out {
        std::fs::write(&out, &report)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}

/// Runs `cells` on `threads` threads, each through `run`, and returns their results in order.
fn run_cells<C: Sync, R: Send>(
    cells: &[C],
    threads: usize,
    run: impl Fn(&C) -> R + Sync,
) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(cell) = cells.get(i) else { break };
                    let result = run(cell);
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, result));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// The language-model grid: the attacks the literature calls strongest against every rule, and
/// the median, geometric median and centered clipping with bucketing, at one attacker share.
fn lm_grid(args: AttackGrid) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};
    use swarmtrain_shared::attack::{Attack, LmAttackRun, Perturbation, run_attack_lm};
    use swarmtrain_shared::data::derive_seed;
    use swarmtrain_shared::lm::LmConfig;
    use swarmtrain_shared::lm_train::LmInnerSpec;
    use swarmtrain_shared::protocol::OuterSpec;
    use swarmtrain_shared::text::TextCorpus;

    let peers = args.peers.unwrap_or(10);
    let rounds = args.rounds.unwrap_or(15);
    let inner_steps = args.inner_steps.unwrap_or(20);
    let clip_radius = args.clip_radius.unwrap_or(3.0);
    let percent = args.percent.iter().copied().max().unwrap_or(0);
    anyhow::ensure!(percent < 50, "--percent values must be below 50");
    let attackers = peers * percent / 100;
    anyhow::ensure!(
        peers >= 4 && attackers > 0,
        "need at least 4 peers and one attacker"
    );
    let model = LmConfig::new()
        .with_context(args.context)
        .with_d_model(args.d_model)
        .with_layers(args.layers)
        .with_heads(args.heads);
    model
        .validate()
        .map_err(|e| anyhow::anyhow!("bad model shape: {e}"))?;
    let loaded = swarmtrain_relay::corpus::load(&args.corpus)?;
    let seed = 1u64;
    let corpus = TextCorpus::new(&loaded.text, args.context + 1, seed)?;
    let device = Default::default();
    let theta0 = futures::executor::block_on(
        model.init_params::<NdArray>(&device, derive_seed("lm init", &[&seed.to_le_bytes()])),
    )?;
    let f = attackers;
    let mut rules = vec![
        ("mean".to_owned(), Rule::Mean),
        ("median".to_owned(), Rule::Median),
        ("trimmed mean".to_owned(), Rule::TrimmedMean { trim: f }),
        (
            "multi-Krum".to_owned(),
            Rule::MultiKrum {
                byzantine: f,
                select: peers - 2 * f,
            },
        ),
        (
            "geometric median".to_owned(),
            Rule::GeometricMedian { iterations: 8 },
        ),
        (
            "centered clipping".to_owned(),
            Rule::CenteredClipping {
                tau: clip_radius,
                iterations: 3,
            },
        ),
    ];
    for &size in args.bucket.iter().filter(|s| **s > 1) {
        for (name, rule) in [
            ("median", Rule::Median),
            ("geometric median", Rule::GeometricMedian { iterations: 8 }),
            (
                "centered clipping",
                Rule::CenteredClipping {
                    tau: clip_radius,
                    iterations: 3,
                },
            ),
        ] {
            rules.push((
                format!("{name}, buckets of {size}"),
                Rule::with_buckets(rule, size),
            ));
        }
    }
    let attacks = [
        Attack::Alie { z: args.alie_z },
        Attack::Ipm { epsilon: 0.5 },
        Attack::MinMax {
            perturbation: Perturbation::Std,
        },
        Attack::MinSum {
            perturbation: Perturbation::Std,
        },
        Attack::Rop { z: 1.0 },
        Attack::SignFlip { scale: 1000.0 },
    ];
    let mut cells = Vec::new();
    for (name, rule) in &rules {
        cells.push((name.clone(), rule.clone(), 0, None));
        for attack in attacks {
            cells.push((name.clone(), rule.clone(), attackers, Some(attack)));
        }
    }
    let outer = OuterSpec::default();
    let inner = LmInnerSpec::constant(3e-3, 0.0);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    eprintln!(
        "corpus: {} bytes; {} parameters; {} cells on {threads} threads",
        loaded.text.len(),
        theta0.len(),
        cells.len()
    );
    let started = std::time::Instant::now();
    let results = run_cells(&cells, threads, |(name, rule, attackers, attack)| {
        let run = LmAttackRun {
            model: model.clone(),
            peers,
            attackers: *attackers,
            attack: *attack,
            rule: rule.clone(),
            rounds,
            inner_steps,
            batch: args.batch,
            inner: inner.clone(),
            outer: outer.clone(),
            seed,
            eval_windows: args.eval_windows,
        };
        let outcome = futures::executor::block_on(run_attack_lm::<Autodiff<NdArray>>(
            &Default::default(),
            &corpus,
            &theta0,
            &run,
        ));
        let loss = match &outcome {
            Ok(curve) => curve.last().copied().unwrap_or(f32::NAN),
            Err(e) => {
                eprintln!("{name} {attack:?}: {e}");
                f32::NAN
            }
        };
        eprintln!(
            "[{:>4.0} s] {name:<32} {:<16} loss {loss:.3}",
            started.elapsed().as_secs_f64(),
            attack.map_or("none".into(), |a| a.name()),
        );
        loss
    });
    let loss = |rule: &str, attack: Option<Attack>| {
        cells
            .iter()
            .zip(&results)
            .find(|((name, _, _, a), _)| name == rule && *a == attack)
            .map_or(f32::NAN, |(_, l)| *l)
    };
    let cell = |l: f32| {
        if l.is_finite() {
            format!("{l:.3}")
        } else {
            "diverged".into()
        }
    };
    let mut table = String::from("| aggregator | no attack |");
    for a in &attacks {
        table.push_str(&format!(" {} |", a.name()));
    }
    table.push_str("\n| --- | --: |");
    table.push_str(&" --: |".repeat(attacks.len()));
    table.push('\n');
    for (name, _) in &rules {
        table.push_str(&format!("| {name} | {} |", cell(loss(name, None))));
        for a in &attacks {
            table.push_str(&format!(" {} |", cell(loss(name, Some(*a)))));
        }
        table.push('\n');
    }
    let honest = loss("mean", None);
    let mut summary = String::new();
    for a in &attacks {
        let robust = rules[1..]
            .iter()
            .map(|(name, _)| (name.as_str(), loss(name, Some(*a))));
        let (best, best_loss) = robust
            .clone()
            .filter(|(_, l)| l.is_finite())
            .fold(("", f32::MAX), |acc, x| if x.1 < acc.1 { x } else { acc });
        let (worst, worst_loss) = robust.fold(("", f32::MIN), |acc, x| {
            if !x.1.is_finite() || x.1 > acc.1 {
                x
            } else {
                acc
            }
        });
        summary.push_str(&format!(
            "- {}: best robust rule {best} {} ({:+.3} vs the honest mean), worst {worst} {}; plain mean {}.\n",
            a.name(),
            cell(best_loss),
            best_loss - honest,
            cell(worst_loss),
            cell(loss("mean", Some(*a))),
        ));
    }
    let theta_loss = 256f32.ln();
    let report = format!(
        "# Byzantine attack grid on the language model\n\n\
         Produced by `swarmtrain-relay attack-grid --lm` (run by `cargo xtask bench robust`) in \
         {:.0} s on {threads} threads: {peers} simulated peers of which {attackers} ({percent}%) \
         attack, {rounds} rounds of {inner_steps} AdamW steps (lr 3·10⁻³, {} windows of {} bytes per \
         step), outer Nesterov lr {} / momentum {}, from a fresh θ₀ of the byte-level transformer \
         ({} block(s), width {}, {} heads, {} parameters) on {} ({} bytes). Peer p trains on data \
         slot p, as the simulator's peers do. Held-out loss in nats per byte after the last round \
         ({} validation windows; θ₀ is about ln 256 = {theta_loss:.2}); lower is better, \
         \"diverged\" is a non-finite loss. Every cell goes through the relay's round engine \
         (`RoundState`): bucketing, the rule and the outer step are the relay's code. Rules are \
         configured for {f} attackers (trim {f}, Krum f = {f} averaging {}, centered clipping \
         τ = {clip_radius} around the previous aggregate, 3 iterations); bucketing shuffles each \
         round's updates with the round's seed and averages them in buckets before the rule. \
         Attackers are omniscient (they read the round's honest updates; ROP also the previous \
         aggregate): ALIE z = {}, IPM ε = 0.5, min-max and min-sum with the −std perturbation \
         (Shejwalkar & Houmansadr 2021), ROP z = 1 (Özfatura et al. 2022), sign flip ×1000.\n\n\
         {table}\n## Per attack\n\n{summary}",
        started.elapsed().as_secs_f64(),
        args.batch,
        args.context + 1,
        outer.lr,
        outer.momentum,
        args.layers,
        args.d_model,
        args.heads,
        theta0.len(),
        args.corpus.display(),
        loaded.text.len(),
        args.eval_windows,
        peers - 2 * f,
        args.alie_z,
    );
    println!("{report}");
    if let Some(out) = args.out {
        std::fs::write(&out, &report)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}
