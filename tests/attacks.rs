//! A malicious peer in a real run: it joins like anyone else and sends a huge sign-flipped
//! update every round. With the plain mean the model is wrecked; with a robust aggregator the
//! three honest peers still train it.

use std::time::Duration;

use swarmtrain_relay::{Relay, default_run};
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::protocol::{ClientToRelay, Codec, PayloadRef, RelayToClient, Update};
use swarmtrain_shared::robust::Rule;
use swarmtrain_tests::{init_logging, join_raw, spawn_peer, start_relay};

/// Joins and, every round, sends Δ = −10 in every coordinate (about −1000× an honest Δ).
async fn attacker(relay: &Relay) {
    let (client, _, welcome, mut round) = join_raw(relay, [200; 32]).await;
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

async fn run_with(aggregator: Rule) -> Vec<f32> {
    let mut run = default_run();
    run.inner.steps = 40;
    run.quorum = 4;
    run.aggregator = aggregator;
    let relay = start_relay(run).await;
    let honest: Vec<_> = (1..=3).map(|id| spawn_peer(&relay, id, 6)).collect();
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
        "the attacker was in every round"
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
