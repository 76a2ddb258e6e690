//! A relay killed with SIGKILL, or stopped with SIGTERM, and started again on the same data
//! directory resumes at the last announced round, with the same parameters, the accepted update
//! of the open round and the whole ledger; the run then goes on.

use std::time::{Duration, Instant};

use swarmtrain_shared::protocol::{ClientToRelay, RelayToClient};
use swarmtrain_tests::{
    RelayProcess, free_port, join_raw_at, send_constant_update, two_peers_close_round_0,
};

/// How the first relay process ends.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill,
    Terminate,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_then_restart_resumes_the_round_with_its_updates() {
    stop_then_restart_resumes(Stop::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_cleanly_and_restart_resumes_the_round_with_its_updates() {
    stop_then_restart_resumes(Stop::Terminate).await;
}

async fn stop_then_restart_resumes(stop: Stop) {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let relay = RelayProcess::start(dir.path(), port, &[], &[]);
    let address = relay.tcp_address().await;

    // Round 0 closes at quorum 2; in round 1 only peer A has sent its update.
    let [(client_a, _, _), (client_b, id_b, _)] = two_peers_close_round_0(&address).await;
    let before = relay.json("api/status").await;
    assert_eq!(before["round"], 1);
    let ask = ClientToRelay::AwaitRound {
        run_id: "digits".into(),
        after: None,
    };
    let round1 = match client_a.send(ask, Vec::new()).await.expect("round") {
        RelayToClient::Round(signed) => signed.verify_and_decode().expect("signed").1,
        other => panic!("expected the round, got {other:?}"),
    };
    assert!(matches!(
        send_constant_update(&client_a, &round1, 0.03).await,
        RelayToClient::Accepted { round: 1 }
    ));
    let before = relay.json("api/status").await;
    assert_eq!(before["updates_this_round"], 1);
    assert_eq!(before["accepted_updates"], 3);

    match stop {
        Stop::Kill => relay.kill(),
        Stop::Terminate => {
            let status = relay.terminate();
            assert!(
                status.success(),
                "SIGTERM is a clean shutdown, not {status}"
            );
        }
    }
    drop((client_a, client_b, id_b));
    let relay = RelayProcess::start(dir.path(), port, &[], &[]);
    let after = relay.json("api/status").await;
    for key in [
        "round",
        "params_hash",
        "updates_this_round",
        "accepted_updates",
        "history",
    ] {
        assert_eq!(after[key], before[key], "{key} survives {stop:?}");
    }

    // The run goes on: once a live peer is back, the round closes with the stored update
    // (the quorum counts live peers), and A cannot send its round-1 update twice.
    let address = relay.tcp_address().await;
    let (client_a, _, _, announced) = join_raw_at(&address, "digits", [1; 32]).await;
    assert_eq!(announced.round, 1);
    assert_eq!(
        announced.params, round1.params,
        "the same θ is announced again"
    );
    assert!(
        matches!(
            send_constant_update(&client_a, &round1, 0.03).await,
            RelayToClient::Rejected { .. }
        ),
        "no second update"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let status = relay.json("api/status").await;
        if status["round"] == 2 {
            break status;
        }
        assert!(Instant::now() < deadline, "round 1 did not close: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        done["history"][2]["round"], 2,
        "history rows are the rounds they opened"
    );
    assert_eq!(
        done["history"][2]["contributors"], 1,
        "the stored update closed round 1"
    );
    assert_eq!(done["accepted_updates"], 3);
}

/// A checkpoint that cannot be written holds the round back: the relay keeps announcing the
/// last durable round, counts the failure, retries, and announces the new round once the write
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_is_announced_only_once_its_checkpoint_is_written() {
    use swarmtrain_relay::{Relay, RelayConfig, digits_run};
    use swarmtrain_tests::{init_logging, join_raw};
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut run = digits_run();
    run.quorum = 1;
    let relay = Relay::start(RelayConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        data_dir: Some(dir.path().to_owned()),
        runs: vec![run],
        ..RelayConfig::default()
    })
    .await
    .expect("relay starts");
    let (client, _, _, round0) = join_raw(&relay, [1; 32]).await;
    // The checkpoint directory becomes a file: every checkpoint write fails (even as root).
    let checkpoints = dir.path().join("checkpoints");
    std::fs::remove_dir_all(&checkpoints).expect("remove");
    std::fs::write(&checkpoints, b"not a directory").expect("block");
    assert!(matches!(
        send_constant_update(&client, &round0, 0.01).await,
        RelayToClient::Accepted { round: 0 }
    ));
    let current = || async {
        let ask = ClientToRelay::AwaitRound {
            run_id: "digits".into(),
            after: None,
        };
        match client.send(ask, Vec::new()).await.expect("answer") {
            RelayToClient::Round(signed) => signed.verify_and_decode().expect("signed").1.round,
            other => panic!("expected a round, got {other:?}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while relay.coordinator.status().await.checkpoint_failures < 2 {
        assert!(Instant::now() < deadline, "the write was not retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = relay.coordinator.status().await;
    assert!(status.unannounced, "round 1 waits for its checkpoint");
    assert_eq!(current().await, 0, "peers still hear round 0");
    // The storage comes back: the next retry writes the checkpoint and announces round 1.
    std::fs::remove_file(&checkpoints).expect("unblock");
    std::fs::create_dir(&checkpoints).expect("mkdir");
    while current().await != 1 {
        assert!(Instant::now() < deadline, "round 1 was never announced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!relay.coordinator.status().await.unannounced);
    relay.shutdown().await;
}

/// A peer whose relay goes away and comes back (same address and data directory) reports that
/// it is reconnecting, joins again with the same identity, and goes on training: every round it
/// was asked for is trained and its updates after the restart are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_rejoins_a_restarted_relay_and_keeps_training() {
    use swarmtrain_client::PeerEvent;
    use swarmtrain_relay::{Relay, RelayConfig, digits_run};
    use swarmtrain_tests::{init_logging, package_path, spawn_peer};
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = || {
        let mut run = digits_run();
        run.quorum = 1;
        run.inner.steps = 10;
        RelayConfig {
            http,
            web_dir: package_path("../web"),
            data_dir: Some(dir.path().to_owned()),
            runs: vec![run],
            seed: 7,
            ..RelayConfig::default()
        }
    };
    let relay = Relay::start(config()).await.expect("relay starts");
    const ROUNDS: u64 = 5;
    let peer = spawn_peer(&relay, 21, ROUNDS);
    let deadline = Instant::now() + Duration::from_secs(60);
    while relay.coordinator.status().await.round < 2 {
        assert!(
            Instant::now() < deadline,
            "the peer did not train two rounds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.shutdown().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let relay = Relay::start(config()).await.expect("relay starts again");

    let (trained, events) = tokio::time::timeout(Duration::from_secs(120), peer.finish())
        .await
        .expect("the peer finishes after the restart");
    assert_eq!(trained, ROUNDS, "every round asked for is trained");
    assert_eq!(
        events.last(),
        Some(&PeerEvent::Stopped {
            rounds_trained: ROUNDS
        }),
        "the last event says the peer stopped"
    );
    let reconnecting = events
        .iter()
        .position(|e| matches!(e, PeerEvent::Reconnecting { .. }))
        .expect("the peer said it was reconnecting");
    let after: Vec<_> = events[reconnecting..].iter().collect();
    assert!(
        after.iter().any(|e| matches!(e, PeerEvent::Joined { .. })),
        "joined again: {after:?}"
    );
    assert!(
        after
            .iter()
            .any(|e| matches!(e, PeerEvent::Submitted { accepted: true, .. })),
        "an update after the restart was accepted: {after:?}"
    );
    // The peer's credit counts every accepted update, before the restart and after.
    let me = swarmtrain_shared::Identity::from_seed([21; 32])
        .peer()
        .to_hex();
    let batch = u64::from(digits_run().inner.batch_size);
    let get = |path: String| {
        let url = format!("{}{path}", relay.url());
        async move {
            let body = reqwest::get(url).await.expect("answer").text().await;
            serde_json::from_str::<serde_json::Value>(&body.expect("body")).expect("json")
        }
    };
    let credit = get(format!("api/runs/digits/peers/{me}")).await;
    assert_eq!(credit["peer"], me);
    assert_eq!(credit["accepted_updates"], ROUNDS, "{credit}");
    assert_eq!(credit["samples"], ROUNDS * 10 * batch, "{credit}");
    let board = get("api/runs/digits/leaderboard".into()).await;
    assert_eq!(board["peers"], 1);
    // The leaderboard's row is the peer's credit without its verdicts.
    let mut row = credit.clone();
    assert!(
        row.as_object_mut()
            .expect("an object")
            .remove("verdicts")
            .is_some()
    );
    assert_eq!(board["top"][0], row);
    let stranger = get(format!("api/runs/digits/peers/{}", "ab".repeat(32))).await;
    assert_eq!(stranger["accepted_updates"], 0, "no credit yet: {stranger}");
    let malformed = reqwest::get(format!("{}api/runs/digits/peers/nope", relay.url()))
        .await
        .expect("answer");
    assert_eq!(malformed.status(), 404);

    // Each of the peer's updates closed a round (quorum 1); the last one closes shortly after
    // its answer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.coordinator.status().await.round < ROUNDS {
        assert!(Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.shutdown().await;
}
