//! `cargo xtask bench verify`: the relay's loss check of every update (credits for verified
//! work, check 1) on the code users run. Honest peers and five kinds of cheat train the
//! default language model on the relay's corpus (Debian's fortunes) round after round through
//! the shared round engine ([`RoundState`]: submit, close, aggregate), and each closed round
//! goes through the relay's own check ([`checks::check_round`]) and judgement
//! ([`verify::judge_round`]), as `Coordinator::tick` runs them. Reports, over several seeds:
//! how often each kind of update is verified, left unchecked and failed (the false-positive
//! rate is the honest row's failures), the score distributions, and what a check costs
//! against the round's training, for the default LM and the 4.9M-parameter LM.
//!
//! Writes the report to the path in `SWARMTRAIN_VERIFY_REPORT`, if set.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use burn::backend::{Autodiff, NdArray};
use swarmtrain_relay::checks::{self, CheckJob, Checked, Claim};
use swarmtrain_relay::dataset::TaskData;
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::aggregate::step_cpu;
use swarmtrain_shared::data::{SplitMix64, derive_seed};
use swarmtrain_shared::lm::LmConfig;
use swarmtrain_shared::lm_train::{LmTrainer, TextBatch};
use swarmtrain_shared::privacy::standard_normal;
use swarmtrain_shared::protocol::{ModelSpec, PayloadRef, RunSpec, Update};
use swarmtrain_shared::robust::Rule;
use swarmtrain_shared::round::{RoundState, pseudo_gradient};
use swarmtrain_shared::verify::{self, CheckPolicy, Outcome};

type B = Autodiff<NdArray>;

/// Seeds (θ₀, the split, the window order), each a run of [`ROUNDS`] rounds.
const SEEDS: [u64; 3] = [1, 2, 3];
const ROUNDS: u64 = 8;
const HONEST: usize = 5;
const CORPUS: &str = "/usr/share/games/fortunes";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Honest,
    /// Δ of noise at 1e-9: credit for (almost) nothing; an all-zero Δ is refused outright.
    Tiny,
    /// Gaussian noise the size of an honest Δ.
    Random,
    /// An honest Δ × 10.
    Scaled,
    /// Trained on windows given to another slot.
    OtherText,
    /// Another peer's work (the first honest peer's windows) under its own identity.
    Replayed,
}

const CHEATS: [Kind; 5] = [
    Kind::Tiny,
    Kind::Random,
    Kind::Scaled,
    Kind::OtherText,
    Kind::Replayed,
];

/// One judged update.
struct Judged {
    kind: Kind,
    round: u64,
    score: f32,
    overshoot: f32,
    outcome: Outcome,
    /// The round's checks could tell (its power reached the pass score).
    powered: bool,
}

fn lm_run(seed: u64) -> RunSpec {
    let mut spec = swarmtrain_relay::default_lm_run(CORPUS);
    spec.data.n_shards = (HONEST + CHEATS.len()) as u32;
    spec.quorum = spec.data.n_shards;
    // A 10× update would wreck a plain mean, and with it what honest peers can learn.
    spec.aggregator = Rule::TrimmedMean { trim: 1 };
    let _ = seed;
    spec
}

fn simulate(seed: u64, policy: &CheckPolicy, out: &mut Vec<Judged>, check_ms: &mut Vec<f64>) {
    let spec = lm_run(seed);
    let data = swarmtrain_relay::load_data(&spec, seed).expect("the corpus");
    let TaskData::Text(text) = &data else {
        panic!("a text run")
    };
    let config = spec.model.lm_config().expect("an LM");
    let device = Default::default();
    let theta0 = futures::executor::block_on(
        config.init_params::<NdArray>(&device, derive_seed("lm init", &[&seed.to_le_bytes()])),
    )
    .expect("θ₀");
    let mut state = RoundState::new(spec.clone(), theta0.clone(), 0);
    let window = config.context + 1;
    let (h, batch) = (spec.inner.steps, spec.inner.batch_size as usize);
    let n = spec.data.n_shards;
    let kinds: Vec<Kind> = std::iter::repeat_n(Kind::Honest, HONEST)
        .chain(CHEATS)
        .collect();
    // Every peer keeps its AdamW moments across rounds, as peers do.
    let mut trainers: Vec<LmTrainer<B>> = kinds
        .iter()
        .map(|_| LmTrainer::<B>::new(&device, &config, &theta0, &spec.inner.optimizer).expect("θ"))
        .collect();
    let mut rng = SplitMix64::new(seed);
    let mut power = None;
    for round in 0..ROUNDS {
        let theta = state.params().to_vec();
        let shard = |slot: u32| text.shards.shard(round, slot, n, h, batch);
        let mut train = |i: usize, windows: Vec<u8>| {
            let trainer = &mut trainers[i];
            trainer.load(&theta).expect("θ");
            trainer.seek(round * u64::from(h));
            for chunk in windows.chunks_exact(batch * window) {
                trainer.step(&TextBatch {
                    windows: chunk.to_vec(),
                    window,
                });
            }
            let local = futures::executor::block_on(trainer.params()).expect("params");
            pseudo_gradient(&theta, &local)
        };
        let mut claims = BTreeMap::new();
        let mut kind_of = BTreeMap::new();
        for (i, kind) in kinds.iter().enumerate() {
            let slot = i as u32;
            let delta = match kind {
                Kind::Honest => train(i, shard(slot)),
                Kind::Tiny => (0..theta.len())
                    .map(|_| (standard_normal(&mut rng) * 1e-9) as f32)
                    .collect(),
                Kind::Random => (0..theta.len())
                    .map(|_| (standard_normal(&mut rng) * 2e-3) as f32)
                    .collect(),
                Kind::Scaled => train(i, shard(slot)).iter().map(|d| d * 10.0).collect(),
                Kind::OtherText => train(i, shard((slot + 1) % n)),
                Kind::Replayed => train(i, shard(0)),
            };
            let payload = spec.codec.encode(&delta);
            let peer = PeerKey([i as u8 + 1; 32]);
            let update = Update {
                run_id: spec.run_id.clone(),
                round,
                base: state.params_hash(),
                n_samples: h * spec.inner.batch_size,
                inner_steps: h,
                loss: 1.0,
                codec: spec.codec,
                payload: PayloadRef::of(&payload),
                state: PayloadRef::of(&[]),
            };
            state
                .submit(peer, &update, &payload, round)
                .expect("accepted");
            claims.insert(
                peer,
                Claim {
                    slot,
                    steps: h,
                    samples: spec.samples_of(h),
                    payload: update.payload.digest,
                },
            );
            kind_of.insert(peer, *kind);
        }
        let job = state.begin_close(round).expect("the round is due");
        let check = CheckJob {
            round,
            theta: job.params.clone(),
            contributions: state.contributions(),
            claims,
        };
        let started = Instant::now();
        let checked = checks::check_round(&spec, &data, policy, &check, rng.next_u64());
        check_ms.push(started.elapsed().as_secs_f64() * 1e3 / checked.len() as f64);
        let scored: Vec<_> = checked
            .iter()
            .map(|(_, c)| match c {
                Checked::Scored(check) => *check,
                Checked::Skipped(why) => panic!("not checked: {why}"),
            })
            .collect();
        let (outcomes, p) = verify::judge_round(policy, &scored, power);
        let powered = p.is_some_and(|p| p >= policy.power);
        if p.is_some() {
            power = p;
        }
        for (((peer, _), check), outcome) in checked.iter().zip(&scored).zip(outcomes) {
            let check = check.expect("scored");
            out.push(Judged {
                kind: kind_of[peer],
                round,
                score: check.score,
                overshoot: check.overshoot,
                outcome,
                powered,
            });
        }
        let outcome = step_cpu(&job.inputs());
        state.finish_close(outcome, round + 1);
        eprintln!(
            "seed {seed} round {round}: power {:.2}, honest {:?}",
            p.unwrap_or(f32::NAN),
            out.iter()
                .rev()
                .take(kinds.len())
                .filter(|j| j.kind == Kind::Honest)
                .map(|j| format!("{:.1}", j.score))
                .collect::<Vec<_>>()
        );
    }
}

/// Median milliseconds of one inner step of `config` at `batch`, and of one update's check.
fn cost(model: ModelSpec, batch: u32, policy: &CheckPolicy) -> (f64, f64) {
    let mut spec = swarmtrain_relay::default_lm_run(CORPUS);
    spec.model = model;
    spec.inner.batch_size = batch;
    spec.data.n_shards = 3;
    let data = swarmtrain_relay::load_data(&spec, 1).expect("the corpus");
    let TaskData::Text(text) = &data else {
        panic!("a text run")
    };
    let config: LmConfig = spec.model.lm_config().expect("an LM");
    let device = Default::default();
    let theta = futures::executor::block_on(config.init_params::<NdArray>(&device, 1)).expect("θ");
    let mut trainer =
        LmTrainer::<B>::new(&device, &config, &theta, &spec.inner.optimizer).expect("θ");
    let window = config.context + 1;
    let steps = 6u32;
    let windows = text.shards.shard(0, 0, 3, steps, batch as usize);
    let mut step_ms = Vec::new();
    for chunk in windows.chunks_exact(batch as usize * window) {
        let started = Instant::now();
        let loss = trainer.step(&TextBatch {
            windows: chunk.to_vec(),
            window,
        });
        let _ = futures::executor::block_on(loss.into_scalar_async());
        step_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    step_ms.remove(0);
    let local = futures::executor::block_on(trainer.params()).expect("params");
    let delta = pseudo_gradient(&theta, &local);
    let contributions: Vec<_> = (0..3u8)
        .map(|i| swarmtrain_shared::aggregate::Contribution {
            peer: PeerKey([i; 32]),
            n_samples: 1,
            delta: delta
                .iter()
                .map(|d| d * (1.0 + 0.1 * f32::from(i)))
                .collect(),
        })
        .collect();
    let claims = contributions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                c.peer,
                Claim {
                    slot: i as u32,
                    steps,
                    samples: 1,
                    payload: [0; 32],
                },
            )
        })
        .collect();
    spec.inner.steps = steps;
    let job = CheckJob {
        round: 0,
        theta,
        contributions,
        claims,
    };
    let started = Instant::now();
    let checked = checks::check_round(&spec, &data, policy, &job, 7);
    let check_ms = started.elapsed().as_secs_f64() * 1e3 / checked.len() as f64;
    (median(&mut step_ms), check_ms)
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

fn quantiles(mut xs: Vec<f32>) -> String {
    xs.sort_by(f32::total_cmp);
    let q = |p: f64| xs[((xs.len() - 1) as f64 * p).round() as usize];
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
        q(0.0),
        q(0.1),
        q(0.5),
        q(0.9),
        q(1.0)
    )
}

fn main() {
    let policy = CheckPolicy::default();
    let mut judged = Vec::new();
    let mut check_ms = Vec::new();
    let started = Instant::now();
    for seed in SEEDS {
        simulate(seed, &policy, &mut judged, &mut check_ms);
    }
    let wall = started.elapsed().as_secs_f64();
    let default = swarmtrain_relay::default_lm_run(CORPUS);
    let (lm_step, lm_check) = cost(default.model.clone(), default.inner.batch_size, &policy);
    let big = ModelSpec::ByteLm {
        context: 128,
        d_model: 256,
        heads: 8,
        layers: 6,
        mlp_ratio: 4,
    };
    let (big_step, big_check) = cost(big, 2, &policy);
    let h = f64::from(default.inner.steps);

    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Credits for verified work: the loss check\n\n\
         `cargo xtask bench verify` (tests/benches/verify.rs): {HONEST} honest peers and one of each \
         of five cheats train the default LM (136K parameters, batch 16, H = {h}) on Debian's \
         fortunes through the shared round engine (trimmed mean), {ROUNDS} rounds from θ₀ for each \
         of seeds {SEEDS:?}; every closed round goes through the relay's check \
         (`relay/src/checks.rs`) and judgement (`shared/src/verify.rs`) with the default policy \
         ({} windows a side, pass {:.1}, fail {:.1} where the round's power reaches {:.1}, \
         overshoot {:.1}). {:.0} s in all.\n",
        policy.windows,
        policy.pass,
        policy.fail,
        policy.power,
        verify::OVERSHOOT,
        wall
    );
    let _ = writeln!(
        report,
        "| update | checked | verified | unchecked | failed | failed where the round could tell | score (min / p10 / median / p90 / max) | overshoot (same) |\n|---|---|---|---|---|---|---|---|"
    );
    let mut kinds: Vec<Kind> = judged.iter().map(|j| j.kind).collect();
    kinds.sort();
    kinds.dedup();
    let mut catch = BTreeMap::new();
    for kind in &kinds {
        let of: Vec<&Judged> = judged.iter().filter(|j| j.kind == *kind).collect();
        let count = |label: &str| of.iter().filter(|j| j.outcome.label() == label).count();
        let powered: Vec<&&Judged> = of.iter().filter(|j| j.powered).collect();
        let failed_powered = powered
            .iter()
            .filter(|j| j.outcome.label() == "failed")
            .count();
        catch.insert(*kind, count("failed") as f64 / of.len() as f64);
        let _ = writeln!(
            report,
            "| {kind:?} | {} | {} | {} | {} | {failed_powered} of {} | {} | {} |",
            of.len(),
            count("verified"),
            count("inconclusive"),
            count("failed"),
            powered.len(),
            quantiles(of.iter().map(|j| j.score).collect()),
            quantiles(of.iter().map(|j| j.overshoot).collect())
        );
    }
    let honest: Vec<&Judged> = judged.iter().filter(|j| j.kind == Kind::Honest).collect();
    let fp = honest
        .iter()
        .filter(|j| j.outcome.label() == "failed")
        .count();
    let powered_rounds: Vec<u64> = {
        let mut r: Vec<(u64, u64)> = Vec::new();
        for (i, j) in judged.iter().enumerate() {
            if j.powered {
                r.push((i as u64 / (HONEST + CHEATS.len()) as u64 / ROUNDS, j.round));
            }
        }
        r.sort();
        r.dedup();
        r.into_iter().map(|(_, round)| round).collect()
    };
    let _ = writeln!(
        report,
        "\n- **False positives:** {fp} of {} honest updates failed ({:.1}%); an update fails on \
         its overshoot above {:.1}.",
        honest.len(),
        100.0 * fp as f64 / honest.len().max(1) as f64,
        verify::OVERSHOOT
    );
    let _ = writeln!(
        report,
        "- **Rounds whose checks could tell** (upper-quartile score ≥ {:.1}): {} of {}; by round \
         index: {:?}. From θ₀ every update teaches mostly the same, and no round can fail anyone \
         on the score alone until training leaves a mark on its own windows.",
        policy.power,
        powered_rounds.len(),
        SEEDS.len() as u64 * ROUNDS,
        powered_rounds
    );
    for kind in CHEATS {
        let p = catch.get(&kind).copied().unwrap_or(0.0);
        let _ = writeln!(
            report,
            "- {kind:?}: failed in {:.0}% of its rounds; a peer cheating so in 10 rounds goes \
             uncaught in all of them with probability {:.1e}.",
            100.0 * p,
            (1.0 - p).powi(10)
        );
    }
    let _ = writeln!(
        report,
        "\n## What a check costs\n\n\
         | model | inner step (median) | round of H = 50 steps | check of one update | check / round |\n|---|---|---|---|---|\n\
         | default LM (136K, batch 16, context 64) | {lm_step:.1} ms | {:.0} ms | {lm_check:.0} ms | {:.1}% |\n\
         | 4.9M LM (context 128, batch 2) | {big_step:.1} ms | {:.0} ms | {big_check:.0} ms | {:.1}% |\n\n\
         In the simulated runs a check took {:.0} ms per update (median of the rounds). A check is \
         three forward passes (2 × {} windows twice, the own windows once more at half the \
         update) on the relay's CPU, whatever the number of steps a peer ran; the relay checks \
         one round at a time beside the next, so its budget is `--check-windows` × the updates of \
         a round.",
        lm_step * h,
        100.0 * lm_check / (lm_step * h),
        big_step * h,
        100.0 * big_check / (big_step * h),
        median(&mut check_ms),
        policy.windows
    );
    print!("{report}");
    if let Ok(path) = std::env::var("SWARMTRAIN_VERIFY_REPORT") {
        std::fs::write(&path, report).expect("write the report");
    }
}
