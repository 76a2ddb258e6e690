//! A malicious peer in a real run: it joins like anyone else and sends a huge sign-flipped
//! update every round. With the plain mean the model is wrecked; with a robust aggregator the
//! three honest peers still train it.

use std::time::Duration;

use swarmtrain_client::rpc::RelayClient;
use swarmtrain_relay::{Relay, default_run};
use swarmtrain_shared::protocol::{
    Capabilities, ClientToRelay, Codec, Join, PROTOCOL_VERSION, RelayToClient, RoundAnnouncement, Update,
};
use swarmtrain_shared::robust::Rule;
use swarmtrain_shared::{Identity, PeerKey};
use swarmtrain_tests::{init_logging, spawn_peer, start_relay};

/// Joins and, every round, sends Δ = −10 in every coordinate (about −1000× an honest Δ).
async fn attacker(relay: &Relay) {
    let address = relay.bootstrap.addresses["tcp"][0].parse().expect("multiaddr");
    let client = RelayClient::connect(address).expect("dial");
    let id = Identity::from_seed([200; 32]);
    let join = ClientToRelay::Join(Join {
        version: PROTOCOL_VERSION,
        run_id: "digits".into(),
        capabilities: Capabilities { backend: "none".into(), platform: "attacker".into() },
    });
    let RelayToClient::Welcome(welcome) = client.request(&id.sign(&join).expect("sign")).await.expect("join") else {
        panic!("no welcome");
    };
    let relay_key = PeerKey::from_public_key(&welcome.relay_key);
    let mut round: RoundAnnouncement = welcome.round.verify_from(&relay_key).expect("announcement");
    loop {
        let update = ClientToRelay::Update(Update {
            run_id: "digits".into(),
            round: round.round,
            base: round.params,
            n_samples: 32,
            inner_steps: 40,
            loss: 0.1,
            codec: Codec::F32,
            payload: Codec::F32.encode(&vec![-10.0; round.n_params as usize]),
        });
        let Ok(_) = client.request(&id.sign(&update).expect("sign")).await else { return };
        let ask = ClientToRelay::AwaitRound { run_id: "digits".into(), after: Some(round.round) };
        match client.request(&id.sign(&ask).expect("sign")).await {
            Ok(RelayToClient::Round(signed)) => round = signed.verify_from(&relay_key).expect("announcement"),
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
    assert!(status.history.iter().skip(1).all(|r| r.contributors == 4), "the attacker was in every round");
    relay.shutdown().await;
    status.history.iter().filter_map(|r| r.accuracy).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_flip_attacker_wrecks_the_mean_but_not_robust_rules() {
    init_logging();
    let mean = run_with(Rule::Mean).await;
    println!("mean under attack: {mean:?}");
    assert!(*mean.last().expect("history") < 0.5, "plain mean fails: {mean:?}");
    for rule in [Rule::Median, Rule::TrimmedMean { trim: 1 }] {
        let accuracy = run_with(rule.clone()).await;
        println!("{rule:?} under attack: {accuracy:?}");
        assert!(*accuracy.last().expect("history") >= 0.85, "{rule:?} holds: {accuracy:?}");
    }
}
