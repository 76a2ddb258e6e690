//! `cargo xtask bench verify`: the relay's checks behind credits for verified work, on the code
//! users run. The loss check of every update (check 1): honest peers and five kinds of cheat
//! train the default language model on the relay's corpus (Debian's fortunes) round after
//! round through the shared round engine ([`RoundState`]: submit, close, aggregate), and each
//! closed round goes through the relay's own check ([`checks::check_round`]) and judgement
//! ([`verify::judge_round`]), as `Coordinator::tick` runs them. Reports, over several seeds:
//! how often each kind of update is verified, left unchecked and failed (the false-positive
//! rate is the honest row's failures), the score distributions, and what a check costs
//! against the round's training, for the default LM and the 4.9M-parameter LM. The replay
//! (check 2, [`checks::replay_update`]): what replaying an update costs against training it,
//! and a 100-round run through an in-process relay at the fraction that catches a peer
//! cheating in 10% of its rounds with 99% probability ([`observe_catch`]).
//!
//! Writes the report to the path in `SWARMTRAIN_VERIFY_REPORT`, if set.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use burn::backend::{Autodiff, NdArray};
use swarmtrain_relay::checks::{self, Audit, CheckJob, Checked, Claim, ReplayPolicy};
use swarmtrain_relay::dataset::TaskData;
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::aggregate::step_cpu;
use swarmtrain_shared::compress::ErrorFeedback;
use swarmtrain_shared::data::{SplitMix64, derive_seed};
use swarmtrain_shared::lm::LmConfig;
use swarmtrain_shared::lm_train::{LmInnerLoop, TextBatch};
use swarmtrain_shared::privacy::standard_normal;
use swarmtrain_shared::protocol::{ModelSpec, PayloadRef, RunSpec, Update};
use swarmtrain_shared::replay::CommittedState;
use swarmtrain_shared::robust::Rule;
use swarmtrain_shared::round::{RoundState, pseudo_gradient, update_payload};
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
    let mut trainers: Vec<LmInnerLoop<B>> = kinds
        .iter()
        .map(|_| {
            LmInnerLoop::<B>::new(&device, &config, &theta0, &spec.inner.optimizer).expect("θ")
        })
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
                    state: update.state,
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

/// What checking one update of a model costs.
struct Cost {
    /// Median milliseconds of one inner step.
    step_ms: f64,
    /// Milliseconds of the loss check of one update.
    check_ms: f64,
    /// Milliseconds of training the replayed steps ([`REPLAYED_STEPS`]), and of their replay.
    train_ms: f64,
    replay_ms: f64,
    /// Milliseconds of comparing a verifier's replay that is not the update bit for bit with
    /// it ([`checks::compare`]: decoding it and the distance): the relay's part of a replay a
    /// volunteer ran.
    compare_ms: f64,
}

/// Steps of the round trained, checked and replayed in [`cost`].
const REPLAYED_STEPS: u32 = 6;

/// What an update of `model` at `batch` costs to train, to check ([`checks::check_round`]) and
/// to replay ([`checks::replay_update`], which must match the training bit for bit).
fn cost(model: ModelSpec, batch: u32, policy: &CheckPolicy) -> Cost {
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
        LmInnerLoop::<B>::new(&device, &config, &theta, &spec.inner.optimizer).expect("θ");
    let window = config.context + 1;
    let steps = REPLAYED_STEPS;
    spec.inner.steps = steps;
    let windows = text.shards.shard(0, 0, 3, steps, batch as usize);
    // What a peer commits to at round start (a fresh replica: the schedule's position only).
    let committed = CommittedState {
        trainer: futures::executor::block_on(trainer.state()).expect("state"),
        residual: Vec::new(),
    }
    .to_bytes();
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
    let local = futures::executor::block_on(trainer.params()).expect("params");
    let delta = pseudo_gradient(&theta, &local);
    let payload = update_payload(
        delta.clone(),
        spec.privacy.as_ref(),
        spec.codec,
        &mut ErrorFeedback::default(),
    );
    let train_ms = step_ms.iter().sum::<f64>();
    step_ms.remove(0);
    let audit = Audit {
        peer: PeerKey([9; 32]),
        round: 0,
        theta: std::sync::Arc::new(theta.clone()),
        theta_hash: swarmtrain_shared::protocol::ParamsHash::of(
            &swarmtrain_shared::protocol::params_to_bytes(&theta),
        ),
        delta: spec.codec.decode(&payload, theta.len()).expect("decodes"),
        claim: Claim {
            slot: 0,
            steps,
            samples: 1,
            payload: PayloadRef::of(&payload).digest,
            state: PayloadRef::of(&committed),
        },
    };
    let started = Instant::now();
    let (replay, outcome) =
        checks::replay_update(&spec, &data, &ReplayPolicy::default(), &audit, &committed);
    let replay_ms = started.elapsed().as_secs_f64() * 1e3;
    assert!(
        replay.is_some_and(|r| r.exact) && outcome == Outcome::Verified,
        "the CPU replay is the update bit for bit: {replay:?} {outcome:?}"
    );
    // A verifier's replay that lands near the update but not on it (the costlier comparison).
    let near = update_payload(
        delta.iter().map(|d| d * 1.001).collect(),
        spec.privacy.as_ref(),
        spec.codec,
        &mut ErrorFeedback::default(),
    );
    let started = Instant::now();
    let compared = checks::compare(&spec, &audit, &near);
    let compare_ms = started.elapsed().as_secs_f64() * 1e3;
    assert!(!compared.exact && compared.distance < 0.01, "{compared:?}");
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
                    state: PayloadRef::of(&[]),
                },
            )
        })
        .collect();
    let job = CheckJob {
        round: 0,
        theta,
        contributions,
        claims,
    };
    let started = Instant::now();
    let checked = checks::check_round(&spec, &data, policy, &job, 7);
    let check_ms = started.elapsed().as_secs_f64() * 1e3 / checked.len() as f64;
    Cost {
        step_ms: median(&mut step_ms),
        check_ms,
        train_ms,
        replay_ms,
        compare_ms,
    }
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
    if std::env::var_os("SWARMTRAIN_VERIFY_COSTS_ONLY").is_some() {
        // What a check and a replay cost, printed only (the report needs the runs too).
        let default = swarmtrain_relay::default_lm_run(CORPUS);
        let lm = cost(default.model.clone(), default.inner.batch_size, &policy);
        let big = cost(big_lm(), 2, &policy);
        print!("{}", replay_section(&default, &lm, &big));
        return;
    }
    // The live run first: it prints its section as soon as it is done.
    let observed = observe_catch();
    eprintln!("{observed}");
    let mut judged = Vec::new();
    let mut check_ms = Vec::new();
    let started = Instant::now();
    for seed in SEEDS {
        simulate(seed, &policy, &mut judged, &mut check_ms);
    }
    let wall = started.elapsed().as_secs_f64();
    let default = swarmtrain_relay::default_lm_run(CORPUS);
    let lm = cost(default.model.clone(), default.inner.batch_size, &policy);
    let (lm_step, lm_check) = (lm.step_ms, lm.check_ms);
    let big = cost(big_lm(), 2, &policy);
    let (big_step, big_check) = (big.step_ms, big.check_ms);
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
    report.push_str(&replay_section(&default, &lm, &big));
    report.push_str(&observed);
    print!("{report}");
    if let Ok(path) = std::env::var("SWARMTRAIN_VERIFY_REPORT") {
        std::fs::write(&path, report).expect("write the report");
    }
}

/// The 4.9M-parameter LM of the cost rows.
fn big_lm() -> ModelSpec {
    ModelSpec::ByteLm {
        context: 128,
        d_model: 256,
        heads: 8,
        layers: 6,
        mlp_ratio: 4,
    }
}

/// The report's section on what a replay costs, the relay's own and a volunteer's.
fn replay_section(default: &RunSpec, lm: &Cost, big: &Cost) -> String {
    let spot = ReplayPolicy::default().spot_check;
    let h = f64::from(default.inner.steps);
    let replay_row = |name: &str, c: &Cost, n: usize| {
        let part = c.compare_ms + spot * c.replay_ms;
        format!(
            "| {name} | {:.0} ms | {:.0} ms | {:.2} | {:.1} MB | {:.1} ms | {part:.0} ms ({:.0}%) |\n",
            c.train_ms,
            c.replay_ms,
            c.replay_ms / c.train_ms,
            CommittedState::max_len(n) as f64 / 1e6,
            c.compare_ms,
            100.0 * part / c.replay_ms,
        )
    };
    let n_lm = default.model.num_params();
    let n_big = big_lm().num_params();
    format!(
        "\n# The replay check\n\n\
         ## What a replay costs\n\n\
         A replay runs the peer's steps again from its revealed state with the shared trainer on \
         the relay's CPU (`relay/src/checks.rs` `replay_update`), then encodes the update as the \
         peer did; here {REPLAYED_STEPS} steps, trained and then replayed, and the replay matched \
         the update bit for bit (the bench asserts it). A volunteer verifier \
         (`swarmtrain-peer verify`) runs the same replay on its own CPU and sends back the \
         payload; the relay's part is then the comparison (`checks::compare`: decoding a payload \
         that is not the update bit for bit, and the distance), its own replay of the {:.0}% \
         drawn for a spot check (`--verifier-spot-check`), and its replay of every update a \
         verifier fails.\n\n\
         | model | training {REPLAYED_STEPS} steps | replaying them | replay / training | reveal, at most | comparing a verifier's replay | the relay's part with verifiers (spot checks at {:.0}%) |\n|---|---|---|---|---|---|---|\n\
         {}{}\n\
         So a replayed update costs the relay {:.2}× (default LM) and {:.2}× (4.9M LM) the \
         peer's training of the same steps, about one round of it, against {:.0}% and {:.0}% of \
         a round for the loss check; `--replays-per-round` caps the rounds of training the relay \
         spends on replays per round. With volunteer verifiers the relay's part of an honest \
         update's replay falls to the comparison and its spot checks, so the replays its CPU \
         affords grow about 1 / (spot-check fraction) times. Bandwidth: every update carries a \
         commitment of 33 to 37 bytes (`Update::state`: a 32-byte BLAKE3 digest and the length \
         as a varint); only a drawn peer uploads its state, 12 bytes a parameter at most \
         (AdamW's two moments and the error-feedback residual, f32 each; the moments are empty \
         before a replica's first step), and the relay sends it once more to the verifier that \
         replays it, which sends back one update's payload. Ledger: each update's signed \
         envelope grows by its commitment, and a replayed update's signed verdict carries its \
         replay (`steps`, `exact`, `distance`: at most 11 bytes) instead of the loss check's \
         scores.\n",
        100.0 * spot,
        100.0 * spot,
        replay_row("default LM (136K, batch 16, context 64)", lm, n_lm),
        replay_row("4.9M LM (context 128, batch 2)", big, n_big),
        lm.replay_ms / lm.train_ms,
        big.replay_ms / big.train_ms,
        100.0 * lm.check_ms / (lm.step_ms * h),
        100.0 * big.check_ms / (big.step_ms * h),
    )
}

/// The replay check in a live run: the fraction that catches a peer cheating in 10 of 100
/// rounds with 99% probability, computed, then a run of 100 rounds through an in-process relay
/// drawing at that fraction, with three honest native peers (the browser's client code) and
/// one that runs half the steps it reports in 10 rounds drawn at random. Returns the report's
/// section.
fn observe_catch() -> String {
    use swarmtrain_shared::protocol::DataSource;
    use swarmtrain_tests::{Dodge, auditees, spawn_peers_together};
    const RUN_ROUNDS: u64 = 100;
    const CHEATED: usize = 10;
    // Rounds long enough for the relay's check lane (a loss check of every undrawn update and
    // the replays) to keep up on 2 cores; shorter ones leave replays `behind` (not replayed).
    const STEPS: u32 = 30;
    // Caught at least once in `CHEATED` cheating rounds: 1 − (1 − f)^10 ≥ 0.99.
    let fraction = 1.0 - 0.01f64.powf(1.0 / CHEATED as f64);
    // If instead each round is a cheat with probability 0.1: 1 − (1 − 0.1 f)^100 ≥ 0.99.
    let fraction_independent = (1.0 - 0.01f64.powf(1.0 / RUN_ROUNDS as f64)) / 0.1;
    let mut rng = SplitMix64::new(11);
    let mut cheat_rounds = std::collections::BTreeSet::new();
    while cheat_rounds.len() < CHEATED {
        cheat_rounds.insert(rng.next_u64() % RUN_ROUNDS);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let (audited, honest_reveals, status) = runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut run = swarmtrain_tests::tiny_lm_run(dir.path(), STEPS);
        run.data.source = DataSource::Text {
            name: CORPUS.into(),
        };
        run.quorum = 4;
        run.data.n_shards = 4;
        let mut config = swarmtrain_tests::relay_config(vec![run]);
        config.replays = ReplayPolicy {
            fraction,
            ..ReplayPolicy::default()
        };
        let relay = swarmtrain_relay::Relay::start(config)
            .await
            .expect("relay starts");
        let honest = spawn_peers_together(&relay, 1..=3, RUN_ROUNDS, 4);
        let cheats = |round: u64| cheat_rounds.contains(&round);
        let (audited, reveals) = tokio::join!(
            auditees(&relay, &[Dodge::FewerSteps], 4, RUN_ROUNDS, cheats),
            async {
                let mut reveals = 0u64;
                for peer in honest {
                    let (_, events) = peer.finish().await;
                    reveals += events
                        .iter()
                        .filter(|e| {
                            matches!(
                                e,
                                swarmtrain_client::peer::PeerEvent::Revealed { accepted: true, .. }
                            )
                        })
                        .count() as u64;
                }
                reveals
            }
        );
        let drawn = reveals + audited[0].len() as u64;
        let status = swarmtrain_tests::replays_concluded(&relay, drawn).await;
        relay.shutdown().await;
        (
            audited.into_iter().next().unwrap_or_default(),
            reveals,
            status,
        )
    });
    let wall = started.elapsed().as_secs_f64();
    let caught: Vec<u64> = audited
        .iter()
        .copied()
        .filter(|r| cheat_rounds.contains(r))
        .collect();
    let count = |label: &str| status.replays.get(label).copied().unwrap_or(0);
    assert_eq!(
        count("behind"),
        0,
        "the relay kept up: {:?}",
        status.replays
    );
    assert_eq!(
        count("differs") as usize,
        caught.len(),
        "every drawn cheat is caught: {:?}",
        status.replays
    );
    assert_eq!(
        count("exact"),
        honest_reveals + (audited.len() - caught.len()) as u64,
        "every honest replay is exact: {:?}",
        status.replays
    );
    format!(
        "\n## The fraction to draw, computed and observed\n\n\
         A peer that cheats in 10 of 100 rounds is caught at least once with probability 99% \
         when each update is drawn with probability f = 1 − 0.01^(1/10) = **{:.1}%** \
         (`--replay-fraction {:.3}`); if instead it cheats in each round with probability 0.1 \
         (so in 10 rounds on average, sometimes fewer), f = (1 − 0.01^(1/100)) / 0.1 = {:.1}%.\n\n\
         Observed: a live run of {RUN_ROUNDS} rounds through an in-process relay drawing at \
         {:.1}% (tiny LM, {STEPS} steps a round, Debian's fortunes), three honest native peers and one \
         that ran half the steps it reported in rounds {:?}. The relay drew {} of the cheat's \
         {RUN_ROUNDS} updates (expected {:.0}), {} of them in cheating rounds ({:?}): each \
         replay differed and failed its update, the first in round {}. Replays by outcome: \
         {:?} (every honest replay, {} in all, matched bit for bit). {:.0} s.\n",
        100.0 * fraction,
        fraction,
        100.0 * fraction_independent,
        100.0 * fraction,
        cheat_rounds,
        audited.len(),
        fraction * RUN_ROUNDS as f64,
        caught.len(),
        caught,
        caught.first().map_or("—".to_owned(), u64::to_string),
        status.replays,
        count("exact"),
        wall
    )
}
