//! A relay and three native peers, in one process, train the digits MLP DiLoCo-style until the
//! relay's held-out accuracy passes 90%.

use swarmtrain_client::peer::PeerEvent;
use swarmtrain_relay::digits_run;
use swarmtrain_tests::{
    accepted_updates, init_logging, start_relay, train_peers, train_peers_with_events,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_native_peers_train_digits_past_90_percent() {
    init_logging();
    let mut run = digits_run();
    run.inner.steps = 40;
    run.quorum = 3;
    let relay = start_relay(run).await;
    let rounds = 6;
    let (status, all_events) = train_peers_with_events(&relay, 3, rounds).await;
    for events in &all_events {
        let accepted = accepted_updates(events);
        assert_eq!(
            accepted as u64, rounds,
            "every update was accepted: {events:?}"
        );
        let losses: Vec<f32> = events
            .iter()
            .filter_map(|e| match e {
                PeerEvent::Trained { loss, .. } => Some(*loss),
                _ => None,
            })
            .collect();
        assert!(
            losses.last() < losses.first(),
            "local loss falls: {losses:?}"
        );
    }
    assert_eq!(status.round, rounds, "one round per trained round");
    let accuracy: Vec<f32> = status.history.iter().filter_map(|r| r.accuracy).collect();
    println!("held-out accuracy by round: {accuracy:?}");
    assert!(
        accuracy[0] < 0.3,
        "an untrained model is near chance: {accuracy:?}"
    );
    let last = *accuracy.last().expect("history");
    assert!(last >= 0.9, "held-out accuracy reaches 90%: {accuracy:?}");
    assert!(
        status.history.iter().skip(1).all(|r| r.contributors == 3),
        "every round aggregated all three peers"
    );
    assert!(
        status.rejected.is_empty(),
        "no honest update was rejected: {:?}",
        status.rejected
    );
    relay.shutdown().await;
}

/// The same run with compressed updates: blockwise int8 (3.8× fewer bytes), blockwise 2-bit
/// with error feedback (12.8× fewer) and top-2% with error feedback (25× fewer): the model still
/// learns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_updates_still_train() {
    use swarmtrain_shared::protocol::Codec;
    init_logging();
    for (codec, rounds, target) in [
        (Codec::Int8Block { block: 64 }, 6, 0.9),
        (Codec::LowBitBlock { block: 64, bits: 2 }, 6, 0.9),
        (
            Codec::TopK {
                per_million: 20_000,
            },
            10,
            0.8,
        ),
    ] {
        let mut run = digits_run();
        run.inner.steps = 40;
        run.codec = codec;
        let relay = start_relay(run).await;
        let status = train_peers(&relay, 3, rounds).await;
        let accuracy: Vec<f32> = status.history.iter().filter_map(|r| r.accuracy).collect();
        println!(
            "{codec:?} ({} bytes per update vs {} for f32): accuracy {accuracy:?}",
            status.spec.update_bytes,
            4 * status.n_params
        );
        assert!(status.rejected.is_empty(), "{:?}", status.rejected);
        assert!(
            *accuracy.last().expect("history") >= target,
            "{codec:?}: {accuracy:?}"
        );
        relay.shutdown().await;
    }
}

/// With differential privacy on, peers clip and noise their updates, the relay reports the ε
/// spent so far, and the model still learns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differentially_private_run_reports_epsilon_and_learns() {
    use swarmtrain_shared::privacy::{PrivacySpec, epsilon};
    init_logging();
    let mut run = digits_run();
    run.inner.steps = 40;
    run.privacy = Some(PrivacySpec {
        clip_norm: 2.0,
        noise_multiplier: 0.02,
        delta: 1e-5,
    });
    let relay = start_relay(run).await;
    let status = train_peers(&relay, 3, 6).await;
    let accuracy: Vec<f32> = status.history.iter().filter_map(|r| r.accuracy).collect();
    let eps = status.privacy_epsilon.expect("the relay reports ε");
    println!(
        "DP (clip 2, z 0.02): ε = {eps:.0} at δ = 1e-5 after {} rounds; accuracy {accuracy:?}",
        status.round
    );
    assert_eq!(eps, epsilon(status.round, 0.02, 1e-5));
    assert!(*accuracy.last().expect("history") > 0.8, "{accuracy:?}");
    relay.shutdown().await;
}

/// A peer that cannot finish the round's steps before its deadline sends the steps it managed
/// (with their samples) and the relay takes them: a slow device's work is not thrown away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_plans_from_its_speed_and_sends_the_steps_it_managed() {
    init_logging();
    let mut run = digits_run();
    let planned = 1_000_000;
    run.inner.steps = planned;
    // Two would close a round by quorum; with one peer, the deadline closes it.
    run.quorum = 2;
    run.round_deadline_ms = 2_000;
    let relay = start_relay(run).await;
    let peer = swarmtrain_tests::spawn_peer(&relay, 31, 2);
    let (trained, events) = peer.finish().await;
    assert_eq!(trained, 2);
    // The first round plans the run's H (speed unknown) and the deadline cuts it short; the
    // second plans what its measured speed fits before the deadline.
    let plans: Vec<(u32, Option<f64>)> = events
        .iter()
        .filter_map(|e| match e {
            PeerEvent::Plan {
                planned_steps,
                step_ms,
                ..
            } => Some((*planned_steps, *step_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(plans.len(), 2, "{events:?}");
    assert_eq!(plans[0], (planned, None));
    assert!(
        plans[1].1.is_some_and(|ms| ms > 0.0) && plans[1].0 >= 1 && plans[1].0 < planned,
        "the second round fits its speed: {plans:?}"
    );
    let partial: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            PeerEvent::Trained {
                steps,
                planned_steps,
                ..
            } => Some((*steps, *planned_steps)),
            _ => None,
        })
        .collect();
    assert_eq!(partial.len(), 2, "{events:?}");
    assert!(
        partial[0].0 > 0 && partial[0].0 < planned,
        "cut short: {partial:?}"
    );
    assert!(
        partial[1].0 > 0 && partial[1].0 <= partial[1].1,
        "{partial:?}"
    );
    assert_eq!(accepted_updates(&events), 2, "both accepted: {events:?}");
}
