//! Malicious peers in a real run. One joins like anyone else and sends a huge sign-flipped
//! update every round: with the plain mean the model is wrecked; with a robust aggregator the
//! three honest peers still train it. Then 30% of the peers collude in the attack of the
//! attack grids that hurts the median most (ROP) against the median.

use std::time::Duration;

use swarmtrain_relay::{Relay, digits_run};
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::attack::{self, Attack};
use swarmtrain_shared::protocol::{
    ClientToRelay, Codec, DataSource, PayloadRef, RelayToClient, Update,
};
use swarmtrain_shared::robust::Rule;
use swarmtrain_shared::verify::CheckPolicy;
use swarmtrain_tests::{
    Dodge, all_joined, auditees, await_next_round, init_logging, join_raw, send_full_update,
    spawn_peers_together, start_relay,
};

/// Joins and, every round, sends Δ = −10 in every coordinate (about −1000× an honest Δ).
async fn attacker(relay: &Relay) {
    let (client, _, welcome, mut round) = join_raw(relay, [200; 32]).await;
    all_joined(relay, 4).await;
    let relay_key = PeerKey::from_public_key(welcome.relay_key());
    loop {
        let payload = Codec::F32.encode(&vec![-10.0; round.n_params as usize]);
        let update = ClientToRelay::Update(Update {
            run_id: "digits".into(),
            round: round.round,
            base: round.params,
            n_samples: 32,
            inner_steps: 40,
            loss: 0.1,
            codec: Codec::F32,
            payload: PayloadRef::of(&payload),
            state: PayloadRef::of(&[]),
        });
        let Ok(_) = client.send(update, payload).await else {
            return;
        };
        let ask = ClientToRelay::AwaitRound {
            run_id: "digits".into(),
            after: Some(round.round),
        };
        match client.send(ask, Vec::new()).await {
            Ok(RelayToClient::Round(signed)) => {
                round = signed.verify_from(&relay_key).expect("announcement")
            }
            _ => return,
        }
    }
}

/// Waits until `n` peers have joined, so that none of them (and no round's quorum) misses the
/// attack's first round: a round with fewer active peers closes on fewer updates.
async fn run_with(aggregator: Rule) -> Vec<f32> {
    let mut run = digits_run();
    run.inner.steps = 40;
    run.quorum = 4;
    run.aggregator = aggregator;
    let relay = start_relay(run).await;
    let honest = spawn_peers_together(&relay, 1..=3, 6, 4);
    let attacker_task = {
        // The attacker shares the relay by reference for the life of this function.
        let relay = &relay;
        async move { attacker(relay).await }
    };
    let honest_done = async {
        for peer in honest {
            let (trained, _) = peer.finish().await;
            assert_eq!(trained, 6);
        }
    };
    tokio::time::timeout(Duration::from_secs(600), async {
        tokio::select! {
            _ = attacker_task => panic!("the attacker stopped early"),
            _ = honest_done => {}
        }
    })
    .await
    .expect("in time");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = relay.coordinator.status().await;
    assert!(
        status.history.iter().skip(1).all(|r| r.contributors == 4),
        "the attacker was in every round: contributors {:?}, refused {:?}",
        status
            .history
            .iter()
            .map(|r| r.contributors)
            .collect::<Vec<_>>(),
        status.rejected
    );
    relay.shutdown().await;
    status.history.iter().filter_map(|r| r.accuracy).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_flip_attacker_wrecks_the_mean_but_not_robust_rules() {
    init_logging();
    let mean = run_with(Rule::Mean).await;
    println!("mean under attack: {mean:?}");
    assert!(
        *mean.last().expect("history") < 0.5,
        "plain mean fails: {mean:?}"
    );
    for rule in [Rule::Median, Rule::TrimmedMean { trim: 1 }] {
        let accuracy = run_with(rule.clone()).await;
        println!("{rule:?} under attack: {accuracy:?}");
        assert!(
            *accuracy.last().expect("history") >= 0.85,
            "{rule:?} holds: {accuracy:?}"
        );
    }
}

/// The attack the colluders run against the median: the strongest against the median with 30%
/// attackers in both grids (docs/benchmarks/attacks.md: 92.6% against 94.9% without attack;
/// attacks-lm.md: held-out loss 2.835 against 2.815).
const COLLUDING_ATTACK: Attack = Attack::Rop { z: 1.0 };

/// `count` colluding attackers, driven together: each round they fetch θ_t from the relay as any
/// peer does, each trains honestly on its own data slot with the run's inner loop, and each sends
/// [`attack::craft`]'s update built from the colluders' own honest updates (the papers'
/// partial-knowledge variant: no honest peer's update is read) and, for ROP, the previous
/// aggregate recovered from θ_{t−1}, θ_t and the outer step. Returns after `rounds` rounds.
async fn colluders(relay: &Relay, count: u8, attack: Attack, rounds: u64) {
    use burn::backend::{Autodiff, NdArray};
    use swarmtrain_shared::data::{BatchSampler, SplitMix64, derive_seed};
    use swarmtrain_shared::lm_train::InnerLoop;
    use swarmtrain_shared::model::{DigitsMlp, DigitsMlpConfig};
    use swarmtrain_shared::protocol::{ModelSpec, params_from_bytes};
    use swarmtrain_shared::train::DigitsBatch;
    type B = Autodiff<NdArray>;

    let mut peers = Vec::new();
    for i in 0..count {
        let (client, _, welcome, round) = join_raw(relay, [200 + i; 32]).await;
        peers.push((client, welcome, round));
    }
    all_joined(relay, 10).await;
    let spec = peers[0].1.spec.clone();
    let relay_key = PeerKey::from_public_key(peers[0].1.relay_key());
    let ModelSpec::DigitsMlp { hidden } = spec.model else {
        panic!("a digits run")
    };
    let config = DigitsMlpConfig::new().with_hidden(hidden as usize);
    let data = swarmtrain_relay::dataset::digits(&spec.run_id, spec.data.n_shards as usize)
        .expect("the digits");
    let device = Default::default();
    let mut rng = SplitMix64::new(9);
    // The previous aggregate, recovered from consecutive θ: θ_{t+1} = θ_t − lr·(a + m·v'),
    // v' = m·v + a, so a = ((θ_t − θ_{t+1})/lr − m²·v)/(1 + m).
    let (lr, m) = (spec.outer.lr, spec.outer.momentum);
    let mut previous: Option<(u64, Vec<f32>)> = None;
    let mut velocity: Option<Vec<f32>> = None;
    let mut center: Option<Vec<f32>> = None;
    for _ in 0..rounds {
        let round = peers[0].2.clone();
        assert!(peers.iter().all(|p| p.2.round == round.round), "in step");
        let bytes = peers[0]
            .0
            .fetch_params(&spec.run_id, round.params)
            .await
            .expect("θ");
        let theta = params_from_bytes(&bytes).expect("f32s");
        if let Some((r, before)) = &previous
            && *r + 1 == round.round
        {
            let v = velocity.take().unwrap_or_else(|| vec![0.0; theta.len()]);
            let a: Vec<f32> = before
                .iter()
                .zip(&theta)
                .zip(&v)
                .map(|((b, t), v)| ((b - t) / lr - m * m * v) / (1.0 + m))
                .collect();
            velocity = Some(v.iter().zip(&a).map(|(v, a)| m * v + a).collect());
            center = Some(a);
        }
        previous = Some((round.round, theta.clone()));
        let mut own = Vec::new();
        for (client, welcome, _) in &peers {
            let _ = client;
            let shard = &data.shards[welcome.slot as usize % data.shards.len()];
            let module =
                swarmtrain_shared::params::load(config.init::<B>(&device), &theta).expect("θ fits");
            let mut trainer =
                InnerLoop::<B, DigitsMlp<B>>::with_module(&device, module, &spec.inner.optimizer);
            trainer.seek(round.round * u64::from(spec.inner.steps));
            let seed = derive_seed(
                "colluder",
                &[&round.round.to_le_bytes(), &[welcome.slot as u8]],
            );
            let mut sampler = BatchSampler::new(shard.len(), spec.inner.batch_size as usize, seed);
            for _ in 0..spec.inner.steps {
                trainer.step(&DigitsBatch::draw(shard, &mut sampler));
            }
            let local = trainer.params().await.expect("θ_local");
            own.push(swarmtrain_shared::round::pseudo_gradient(&theta, &local));
        }
        for (i, (client, _, _)) in peers.iter().enumerate() {
            let crafted =
                attack::craft(attack, &own[i], &own, center.as_deref(), &mut rng).expect("crafted");
            let payload = Codec::F32.encode(&crafted);
            let update = ClientToRelay::Update(Update {
                run_id: spec.run_id.clone(),
                round: round.round,
                base: round.params,
                n_samples: spec.inner.steps * spec.inner.batch_size,
                inner_steps: spec.inner.steps,
                loss: 0.1,
                codec: Codec::F32,
                payload: PayloadRef::of(&payload),
                state: PayloadRef::of(&[]),
            });
            client.send(update, payload).await.expect("sent");
        }
        for (client, _, announced) in peers.iter_mut() {
            let ask = ClientToRelay::AwaitRound {
                run_id: spec.run_id.clone(),
                after: Some(round.round),
            };
            match client.send(ask, Vec::new()).await {
                Ok(RelayToClient::Round(signed)) => {
                    *announced = signed.verify_from(&relay_key).expect("announcement")
                }
                other => panic!("no next round: {other:?}"),
            }
        }
    }
}

/// 10 peers, 3 of them (30%) colluding attackers, `rounds` rounds against `rule`; returns the
/// held-out accuracy after every round.
async fn colluding_run(rule: Rule, attack: Option<Attack>, rounds: u64) -> Vec<f32> {
    let mut run = digits_run();
    run.inner.steps = 20;
    run.quorum = 10;
    run.aggregator = rule;
    let relay = start_relay(run).await;
    let (honest_count, attackers) = if attack.is_some() { (7, 3) } else { (10, 0) };
    let honest = spawn_peers_together(&relay, 1..=honest_count, rounds, 10);
    let honest_done = async {
        for peer in honest {
            let (trained, _) = peer.finish().await;
            assert_eq!(trained, rounds);
        }
    };
    let attack_done = async {
        if let Some(attack) = attack {
            colluders(&relay, attackers, attack, rounds).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(300), async {
        tokio::join!(honest_done, attack_done);
    })
    .await
    .expect("in time");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = relay.coordinator.status().await;
    assert!(
        status.history.iter().skip(1).all(|r| r.contributors == 10),
        "every round had all ten peers: {:?}",
        status
            .history
            .iter()
            .map(|r| r.contributors)
            .collect::<Vec<_>>()
    );
    relay.shutdown().await;
    status.history.iter().filter_map(|r| r.accuracy).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_percent_colluding_attackers_do_not_stop_the_median() {
    init_logging();
    let rounds = 5;
    let honest = colluding_run(Rule::Median, None, rounds).await;
    let attacked = colluding_run(Rule::Median, Some(COLLUDING_ATTACK), rounds).await;
    println!("median, 10 honest peers: {honest:?}");
    println!(
        "median, 3 of 10 running {}: {attacked:?}",
        COLLUDING_ATTACK.name()
    );
    let (honest, attacked) = (
        *honest.last().expect("history"),
        *attacked.last().expect("history"),
    );
    assert!(attacked >= 0.85, "the model still learns: {attacked}");
    assert!(
        attacked >= honest - 0.05,
        "within 5 points of the honest run: {attacked} vs {honest}"
    );
}

/// How a cheater in [`cheaters`] makes its update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cheat {
    /// Δ ≈ 0 (an all-zero Δ is refused outright, `empty_update`): credit for nothing.
    Zero,
    /// Gaussian noise the size of an honest Δ.
    Random,
    /// Trains honestly on its slot and sends 10 × Δ, for more weight in the mean.
    Scaled,
    /// Trains on another slot's windows than the ones it was given.
    OtherText,
    /// Sends another peer's work under its own identity: the Δ of training on the first honest
    /// peer's windows (slot 0) from θ_t, which is that peer's Δ but for its AdamW moments.
    Replayed,
}

/// Cheaters on a language-model run: each joins as its own identity, fetches θ_t every round as
/// any peer does and sends its kind of false update. Runs `rounds` rounds.
async fn cheaters(relay: &Relay, kinds: &[Cheat], joined: usize, rounds: u64) {
    use burn::backend::{Autodiff, NdArray};
    use swarmtrain_shared::data::SplitMix64;
    use swarmtrain_shared::lm_train::{LmInnerLoop, TextBatch};
    use swarmtrain_shared::privacy::standard_normal;
    use swarmtrain_shared::protocol::params_from_bytes;
    use swarmtrain_shared::round::pseudo_gradient;
    type B = Autodiff<NdArray>;

    let mut peers = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let (client, _, welcome, round) = join_raw(relay, [100 + i as u8; 32]).await;
        peers.push((*kind, client, welcome, round));
    }
    all_joined(relay, joined).await;
    let spec = peers[0].2.spec.clone();
    let relay_key = PeerKey::from_public_key(peers[0].2.relay_key());
    let config = spec.model.lm_config().expect("a language-model run");
    let window = config.context + 1;
    let device = Default::default();
    let h = spec.inner.steps;
    let mut rng = SplitMix64::new(5);
    // Honest training on `slot`'s windows of `round` from θ, with the run's inner loop.
    let train = |theta: &[f32], text: Vec<u8>, round: u64| {
        let mut trainer =
            LmInnerLoop::<B>::new(&device, &config, theta, &spec.inner.optimizer).expect("θ fits");
        trainer.seek(round * u64::from(h));
        for chunk in text.chunks_exact(spec.inner.batch_size as usize * window) {
            trainer.step(&TextBatch {
                windows: chunk.to_vec(),
                window,
            });
        }
        let local = futures::executor::block_on(trainer.params()).expect("params");
        pseudo_gradient(theta, &local)
    };
    for _ in 0..rounds {
        let round = peers[0].3.clone();
        let bytes = peers[0]
            .1
            .fetch_params(&spec.run_id, round.params)
            .await
            .expect("θ");
        let theta = params_from_bytes(&bytes).expect("f32s");
        let text = |slot: u32| {
            let coordinator = relay.coordinator.clone();
            async move { coordinator.text(round.round, slot).await.expect("text") }
        };
        let mut deltas = Vec::new();
        for (kind, _, welcome, _) in &peers {
            let delta = match kind {
                Cheat::Zero => (0..theta.len())
                    .map(|_| (standard_normal(&mut rng) * 1e-9) as f32)
                    .collect(),
                Cheat::Random => {
                    let sigma = 2e-3;
                    (0..theta.len())
                        .map(|_| (standard_normal(&mut rng) * sigma) as f32)
                        .collect()
                }
                Cheat::Scaled => {
                    let text = text(welcome.slot).await;
                    let honest = tokio::task::block_in_place(|| train(&theta, text, round.round));
                    honest.iter().map(|d| d * 10.0).collect()
                }
                Cheat::OtherText => {
                    let other = (welcome.slot + 1) % spec.data.n_shards;
                    let text = text(other).await;
                    tokio::task::block_in_place(|| train(&theta, text, round.round))
                }
                Cheat::Replayed => {
                    let text = text(0).await;
                    tokio::task::block_in_place(|| train(&theta, text, round.round))
                }
            };
            deltas.push(delta);
        }
        // Every update first: the round closes only once all have arrived.
        for ((_, client, _, _), delta) in peers.iter().zip(deltas) {
            send_full_update(client, &spec, &round, spec.codec.encode(&delta), &[]).await;
        }
        for (_, client, _, next) in &mut peers {
            *next = await_next_round(client, &spec, round.round, &relay_key).await;
        }
    }
}

/// Four honest native peers (the browser's client code) and `kinds` of cheat train one
/// language model through the live relay for `rounds` rounds; returns each one's credit as
/// `/api/runs/lm/peers/{key}` serves it once every update has been checked, honest peers first.
async fn honest_and_cheats(kinds: &[Cheat], rounds: u64) -> (Vec<serde_json::Value>, Relay) {
    let dir = tempfile::tempdir().expect("tempdir");
    // Real text: on the test grammar's few words no window is much like itself alone, and
    // training leaves no mark a check could find (honest scores about 1).
    let mut run = swarmtrain_tests::tiny_lm_run(dir.path(), 30);
    run.data.source = DataSource::Text {
        name: "/usr/share/games/fortunes".into(),
    };
    let everyone = 4 + kinds.len();
    run.quorum = everyone as u32;
    run.data.n_shards = everyone as u32;
    // The scaled cheat would wreck a plain mean (and with it what honest peers can learn).
    run.aggregator = Rule::TrimmedMean { trim: 1 };
    // 160 of the 240 windows a peer trains on (30 steps of 8) are scored; the rest of the
    // policy is the default.
    let mut config = swarmtrain_tests::relay_config(vec![run]);
    config.checks = CheckPolicy {
        windows: 160,
        ..CheckPolicy::default()
    };
    // The loss check of every update: no update is drawn for a replay instead (these cheats do
    // not reveal; the replay has its own test below).
    config.replays.fraction = 0.0;
    let relay = Relay::start(config).await.expect("relay starts");
    let honest = spawn_peers_together(&relay, 1..=4, rounds, everyone);
    tokio::time::timeout(Duration::from_secs(900), async {
        let relay = &relay;
        tokio::join!(cheaters(relay, kinds, everyone, rounds), async {
            for peer in honest {
                assert_eq!(peer.finish().await.0, rounds);
            }
        })
    })
    .await
    .expect("in time");
    // The last round's checks run after it closed.
    let checked = rounds as usize * everyone;
    tokio::time::timeout(Duration::from_secs(120), async {
        while (relay
            .coordinator
            .status()
            .await
            .checks
            .values()
            .sum::<u64>() as usize)
            < checked
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("every update checked");
    let mut credits = Vec::new();
    for seed in (1..=4).chain((0..kinds.len()).map(|i| 100 + i as u8)) {
        credits.push(lm_credit(&relay, seed).await);
    }
    (credits, relay)
}

/// The median score of a credit's checked verdicts.
fn median_score(credit: &serde_json::Value) -> f64 {
    let mut scores: Vec<f64> = credit["verdicts"]
        .as_array()
        .expect("verdicts")
        .iter()
        .filter_map(|v| v["check"]["score"].as_f64())
        .collect();
    scores.sort_by(f64::total_cmp);
    scores.get(scores.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The outcomes of a credit's verdicts, newest first, with their loss check's scores (or their
/// replay's distance): `V4.2 I1.0 F-0.3`.
fn outcomes(credit: &serde_json::Value) -> String {
    credit["verdicts"]
        .as_array()
        .expect("verdicts")
        .iter()
        .map(|v| {
            let label = match &v["outcome"] {
                serde_json::Value::String(s) => s.clone(),
                other => other
                    .as_object()
                    .and_then(|o| o.keys().next().cloned())
                    .unwrap_or_default(),
            };
            format!(
                "{}{:.2}",
                &label[..1],
                v["check"]["score"]
                    .as_f64()
                    .or(v["replay"]["distance"].as_f64())
                    .unwrap_or(f64::NAN)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Credit for verified work: honest peers and five kinds of cheat through the live relay, in
/// two runs (so that honest peers are most of a round's updates, as the check assumes). Every
/// cheat is accepted (nothing in an update says it is false), then the relay's loss check of
/// each closed round judges it: no update without work on its own windows earns verified
/// credit in more than one round (a pass by chance) and each scores below every honest peer, the 10× update fails on its overshoot in most
/// rounds, and the cheats lose credit to failures (at least as many as there are kinds, over both
/// runs), while no honest update fails and every honest peer earns verified credit. The relay's
/// verdicts are signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_verifies_honest_work_and_fails_false_work() {
    init_logging();
    const ROUNDS: u64 = 7;
    let runs = [
        &[Cheat::Zero, Cheat::Random, Cheat::Scaled][..],
        &[Cheat::OtherText, Cheat::Replayed][..],
    ];
    // Failures of false work over both runs: a kind caught in about 40% of the rounds where the
    // check can tell may go uncaught in one run of 7 (seen in CI: another slot's text, 0 of 7).
    let mut failed = 0;
    for kinds in runs {
        let (credits, relay) = honest_and_cheats(kinds, ROUNDS).await;
        let (honest, cheats) = credits.split_at(4);
        for (i, c) in honest.iter().enumerate() {
            println!("honest {}: {}", i + 1, outcomes(c));
        }
        for (kind, c) in kinds.iter().zip(cheats) {
            println!("{kind:?}: {}", outcomes(c));
        }
        for c in honest {
            assert_eq!(c["failed_updates"], 0, "an honest update never fails: {c}");
            assert!(
                c["verified_updates"].as_u64() >= Some(1),
                "honest work is verified: {c}"
            );
            assert_eq!(c["accepted_updates"], ROUNDS);
            assert_eq!(
                c["units"].as_u64(),
                c["samples"].as_u64().map(|s| s * 32),
                "tokens: samples × context"
            );
        }
        // The check is statistical (a false update fails about half the rounds where the check
        // can tell, docs/benchmarks/verify.md): no false work is ever verified, each scores
        // below every honest peer, and failures add up; the 10× update fails on its overshoot.
        let honest_floor = honest
            .iter()
            .map(median_score)
            .fold(f64::INFINITY, f64::min);
        for (kind, c) in kinds.iter().zip(cheats) {
            if *kind == Cheat::Scaled {
                // Honest work scaled 10×: its windows do carry its mark, so it is judged by its
                // overshoot, which is statistical too (the windows are drawn afresh each round):
                // it fails in most rounds, and one may pass (seen once in CI: 6 of 7 failed).
                let (failed, verified) = (
                    c["failed_updates"].as_u64().unwrap_or_default(),
                    c["verified_updates"].as_u64().unwrap_or_default(),
                );
                assert!(
                    failed >= 3 && verified < failed,
                    "{kind:?} overshoots in most rounds: {c}"
                );
            } else {
                // The pass line is statistical too: an almost-zero Δ scored 3.97 against the
                // pass line of 3 in one round of 7 in one CI run (the benchmark's highest of
                // 24 was 2.90). More than one such round in a run is not chance.
                assert!(
                    c["verified_updates"].as_u64() <= Some(1),
                    "{kind:?} (no work on its own windows) earns verified credit at most by \
                     chance, once: {c}"
                );
                assert!(
                    median_score(c) < honest_floor,
                    "{kind:?} scores below every honest peer ({} against {honest_floor}): {c}",
                    median_score(c)
                );
            }
            failed += c["failed_updates"].as_u64().expect("failed updates");
            assert_eq!(
                c["failed_units"].as_u64(),
                c["failed_samples"].as_u64().map(|s| s * 32),
                "failed work earns nothing: {c}"
            );
        }
        // Each verdict is the relay's, signed: anyone can check it with the relay's key.
        let signed = cheats[0]["verdicts"][0]["signed"]
            .as_str()
            .expect("signed verdict");
        let bytes: Vec<u8> = (0..signed.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&signed[i..i + 2], 16).expect("hex"))
            .collect();
        let signed: swarmtrain_shared::Signed<swarmtrain_shared::verify::Verdict> =
            postcard::from_bytes(&bytes).expect("a signed verdict");
        let (signer, verdict) = signed.verify_and_decode().expect("the relay's signature");
        assert_eq!(signer, relay.coordinator.identity().peer());
        assert_eq!((verdict.run_id.as_str(), verdict.round), ("lm", ROUNDS - 1));
        relay.shutdown().await;
    }
    let kinds: usize = runs.iter().map(|kinds| kinds.len()).sum();
    assert!(
        failed >= kinds as u64,
        "the cheats are caught: {failed} failures of {kinds} kinds' updates"
    );
}

/// Volunteer verifiers through the live relay, every update drawn, in two stretches of
/// rounds. First a lying verifier (it sends back bytes it never replayed) is the only one
/// asking for work (and finds the revealed state served sealed only, and only for its own
/// job): the relay replays each update it fails itself and keeps its own verdict,
/// so the honest peers' work stays verified, and bans the liar at its first contradiction (a
/// strike, and its ask is refused). Then an honest verifier (the client's code) takes every
/// replay: those it verifies stand (no spot checks here), and the peer that runs fewer steps
/// than it reports fails each round, confirmed by the relay's own replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volunteer_verifiers_replay_drawn_rounds_and_a_lying_one_is_caught() {
    use swarmtrain_client::rpc::RpcError;
    use swarmtrain_client::verifier::VerifierEvent;
    use swarmtrain_relay::checks::ReplayPolicy;
    use swarmtrain_shared::protocol::{Replayed, Role};
    init_logging();
    const ROUNDS: u64 = 2;
    let kinds = [Dodge::FewerSteps];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut run = swarmtrain_tests::tiny_lm_run(dir.path(), 10);
    let everyone = 2 + kinds.len();
    run.quorum = everyone as u32;
    run.data.n_shards = everyone as u32;
    let mut config = swarmtrain_tests::relay_config(vec![run]);
    config.replays = ReplayPolicy {
        fraction: 1.0,
        per_round: 16,
        verifier_timeout: Duration::from_secs(300),
        spot_check: 0.0,
        ..ReplayPolicy::default()
    };
    let relay = Relay::start(config).await.expect("relay starts");
    let (liar, _, welcome, _) = swarmtrain_tests::join_raw_as(
        &relay.bootstrap.addresses["tcp"][0],
        "lm",
        [90; 32],
        Role::Verify,
    )
    .await;
    // Asks for work until refused; answers every job with bytes it never replayed.
    let liar = tokio::spawn(async move {
        let mut lies = 0u64;
        loop {
            let ask = ClientToRelay::Verify {
                run_id: "lm".into(),
            };
            match liar.send(ask, Vec::new()).await.expect("an answer") {
                RelayToClient::Job(Some(job)) => {
                    if lies == 0 {
                        // The revealed state travels sealed only, to the job's holder only.
                        let unsealed = liar.fetch_state("lm", &job.state).await;
                        assert!(
                            matches!(&unsealed, Err(RpcError::Refused(r)) if r.contains("sealed")),
                            "{unsealed:?}"
                        );
                        liar.agree_keys(welcome.relay_key()).await.expect("keys");
                        let state = liar.fetch_state("lm", &job.state).await.expect("the state");
                        assert_eq!(state.len(), job.state.len as usize);
                        let other = PayloadRef {
                            digest: [1; 32],
                            ..job.state
                        };
                        let refused = liar.fetch_state("lm", &other).await;
                        assert!(
                            matches!(&refused, Err(RpcError::Refused(r)) if r.contains("no replay job")),
                            "{refused:?}"
                        );
                    }
                    let made_up = vec![7u8; 64];
                    let report = ClientToRelay::Replayed(Replayed {
                        run_id: "lm".into(),
                        job: job.job,
                        update: Some(PayloadRef::of(&made_up)),
                    });
                    let answer = liar.send(report, made_up).await.expect("an answer");
                    assert!(
                        matches!(answer, RelayToClient::Accepted { .. }),
                        "{answer:?}"
                    );
                    lies += 1;
                }
                RelayToClient::Job(None) => {}
                RelayToClient::Rejected { kind, .. } => {
                    assert_eq!(kind, "verifier_banned");
                    return lies;
                }
                other => panic!("a verifier heard {other:?}"),
            }
        }
    });
    // Both stretches: the honest peers and the one that runs half its steps, every update
    // drawn and replayed.
    let stretch = |seeds: std::ops::RangeInclusive<u8>| {
        let honest = spawn_peers_together(&relay, seeds, ROUNDS, everyone);
        let relay = &relay;
        async move {
            let (audited, ()) =
                tokio::join!(auditees(relay, &kinds, everyone, ROUNDS, |_| true), async {
                    for peer in honest {
                        assert_eq!(peer.finish().await.0, ROUNDS);
                    }
                });
            assert!(
                audited.iter().all(|r| r.len() as u64 == ROUNDS),
                "{audited:?}"
            );
        }
    };
    let lies = tokio::time::timeout(Duration::from_secs(600), async {
        let ((), lies) = tokio::join!(stretch(1..=2), liar);
        let lies = lies.expect("the liar's task");
        swarmtrain_tests::replays_concluded(&relay, everyone as u64 * ROUNDS).await;
        lies
    })
    .await
    .expect("the first stretch in time");
    let first = relay.coordinator.status().await;
    let count = |status: &swarmtrain_relay::coordinator::Status, label: &str| {
        status.verifier_reports.get(label).copied().unwrap_or(0)
    };
    assert!(
        lies >= 1 && count(&first, "caught") >= 1,
        "the liar is caught"
    );
    assert_eq!(
        count(&first, "caught") + count(&first, "confirmed"),
        lies,
        "the relay replayed every failing report itself"
    );
    // A verifier is not one of the round's peers; the trainers are counted by backend.
    assert_eq!(first.joined_peers, everyone);
    let backends: Vec<(&str, usize)> = first
        .backends
        .iter()
        .map(|(b, n)| (b.as_str(), *n))
        .collect();
    assert_eq!(backends, [("ndarray", 2), ("none", 1)]);
    // The second stretch, with an honest verifier asking for work from the start.
    let (task, stop, mut events) = swarmtrain_tests::spawn_verifier(&relay, 91);
    tokio::time::timeout(Duration::from_secs(120), async {
        while relay.coordinator.status().await.verifiers == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the verifier joins");
    let status = tokio::time::timeout(Duration::from_secs(600), async {
        stretch(3..=4).await;
        swarmtrain_tests::replays_concluded(&relay, 2 * everyone as u64 * ROUNDS).await
    })
    .await
    .expect("the second stretch in time");
    stop.set(true);
    let replayed = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the verifier stops")
        .expect("its task")
        .expect("it verified without an error");
    let mut reports = 0;
    while let Ok(event) = events.try_recv() {
        if let VerifierEvent::Replayed {
            replayed, accepted, ..
        } = event
        {
            assert!(replayed && accepted, "{event:?}");
            reports += 1;
        }
    }
    println!(
        "replays: {:?}, verifiers: {:?}, the liar lied {lies} times, the verifier replayed {replayed}",
        status.replays, status.verifier_reports
    );
    assert_eq!(reports, replayed);
    assert_eq!(
        replayed,
        everyone as u64 * ROUNDS,
        "every replay of the stretch"
    );
    assert_eq!(
        count(&status, "trusted"),
        2 * ROUNDS,
        "honest replays stand"
    );
    assert_eq!(
        count(&status, "confirmed") - count(&first, "confirmed"),
        ROUNDS,
        "the relay confirmed each failing report"
    );
    assert_eq!(count(&status, "caught"), count(&first, "caught"));
    assert_eq!(count(&status, "timeout") + count(&status, "unable"), 0);
    assert_eq!(
        status.replays.get("exact").copied().unwrap_or(0),
        4 * ROUNDS,
        "every honest update verified bit for bit, by a verifier or the relay"
    );
    assert_eq!(
        status.replays.get("differs").copied().unwrap_or(0),
        2 * ROUNDS
    );
    for seed in 1..=4 {
        let c = lm_credit(&relay, seed).await;
        assert_eq!(c["failed_updates"], 0, "a lying verifier costs nobody: {c}");
        assert_eq!(c["verified_updates"], ROUNDS, "{c}");
    }
    let c = lm_credit(&relay, 150).await;
    assert_eq!(c["verified_updates"], 0, "{c}");
    assert_eq!(c["failed_updates"], 2 * ROUNDS, "{c}");
    let text = swarmtrain_tests::metrics(&relay).await;
    let trusted = format!(
        "swarmtrain_verifier_reports_total{{run=\"lm\",outcome=\"trusted\"}} {}",
        2 * ROUNDS
    );
    assert!(text.contains(&trusted), "{text}");
    relay.shutdown().await;
}

/// `GET /api/runs/lm/peers/{key}` of the identity with `seed`, as JSON.
async fn lm_credit(relay: &Relay, seed: u8) -> serde_json::Value {
    let key = swarmtrain_shared::Identity::from_seed([seed; 32]).peer();
    let url = format!("{}api/runs/lm/peers/{}", relay.url(), key.to_hex());
    let text = reqwest::get(&url)
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    serde_json::from_str(&text).expect("JSON")
}

/// The replay check through the live relay, every update drawn: three honest native peers
/// (the browser's client code, on the CPU) reveal their committed state when the next
/// announcement names them and their replays match bit for bit, so all their work is verified;
/// a peer that runs fewer steps than it reports, one that never reveals and one that reveals
/// another state than it committed to each fail every audited round and earn no credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_replays_drawn_rounds_and_catches_what_was_not_done() {
    use swarmtrain_relay::checks::ReplayPolicy;
    init_logging();
    const ROUNDS: u64 = 3;
    let kinds = [Dodge::FewerSteps, Dodge::NoReveal, Dodge::WrongReveal];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut run = swarmtrain_tests::tiny_lm_run(dir.path(), 10);
    let everyone = 3 + kinds.len();
    run.quorum = everyone as u32;
    run.data.n_shards = everyone as u32;
    run.aggregator = Rule::TrimmedMean { trim: 1 };
    let mut config = swarmtrain_tests::relay_config(vec![run]);
    config.replays = ReplayPolicy {
        fraction: 1.0,
        per_round: 16,
        tolerance: 0.05,
        ..ReplayPolicy::default()
    };
    let relay = Relay::start(config).await.expect("relay starts");
    let honest = spawn_peers_together(&relay, 1..=3, ROUNDS, everyone);
    let mut revealed = 0;
    tokio::time::timeout(Duration::from_secs(600), async {
        let relay = &relay;
        let (audited, ()) =
            tokio::join!(auditees(relay, &kinds, everyone, ROUNDS, |_| true), async {
                for peer in honest {
                    let (rounds, events) = peer.finish().await;
                    assert_eq!(rounds, ROUNDS);
                    for event in events {
                        if let swarmtrain_client::peer::PeerEvent::Revealed {
                            accepted,
                            reason,
                            ..
                        } = event
                        {
                            assert!(accepted, "an honest reveal is taken: {reason:?}");
                            revealed += 1;
                        }
                    }
                }
            });
        assert!(
            audited.iter().all(|rounds| rounds.len() as u64 == ROUNDS),
            "every update is drawn: {audited:?}"
        );
    })
    .await
    .expect("in time");
    assert_eq!(revealed, 3 * ROUNDS, "every honest update was audited");
    // Every replay concluded but the last round's unrevealed one (it fails when the next round
    // closes).
    let concluded = everyone as u64 * ROUNDS - 1;
    let status = tokio::time::timeout(
        Duration::from_secs(300),
        swarmtrain_tests::replays_concluded(&relay, concluded),
    )
    .await
    .expect("every replay concluded");
    println!(
        "replays: {:?}, reveal bytes {}",
        status.replays, status.reveal_bytes
    );
    let count = |label: &str| status.replays.get(label).copied().unwrap_or(0);
    assert_eq!(
        count("exact"),
        3 * ROUNDS,
        "honest CPU replays match bit for bit"
    );
    assert_eq!(count("differs"), ROUNDS);
    assert_eq!(count("no_reveal"), ROUNDS - 1);
    assert_eq!(count("mismatch"), ROUNDS);
    for seed in 1..=3 {
        let c = lm_credit(&relay, seed).await;
        assert_eq!(c["failed_updates"], 0, "an honest update never fails: {c}");
        assert_eq!(
            c["verified_updates"], ROUNDS,
            "all honest work verified: {c}"
        );
        assert_eq!(c["verdicts"][0]["replay"]["exact"], true, "{c}");
    }
    for (i, kind) in kinds.iter().enumerate() {
        let c = lm_credit(&relay, 150 + i as u8).await;
        println!("{kind:?}: {}", outcomes(&c));
        assert_eq!(
            c["verified_updates"], 0,
            "{kind:?} earns no verified credit: {c}"
        );
        let failed = if *kind == Dodge::NoReveal {
            ROUNDS - 1
        } else {
            ROUNDS
        };
        assert_eq!(
            c["failed_updates"], failed,
            "{kind:?} fails each audit: {c}"
        );
    }
    let text = swarmtrain_tests::metrics(&relay).await;
    assert!(
        text.contains("swarmtrain_replays_total{run=\"lm\",outcome=\"differs\"} 3"),
        "{text}"
    );
    relay.shutdown().await;
}
