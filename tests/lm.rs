//! The language model through the live system: a relay and three native peers (the browser's
//! client code) in one process train the byte-level transformer and the relay's held-out loss
//! falls; the simulator, given the same seeds, peers and rounds, ends with the same θ bit for
//! bit; and a run whose rule its quorum cannot feed is refused at start-up.

use burn::backend::{Autodiff, NdArray};
use swarmtrain_client::peer::PeerEvent;
use swarmtrain_relay::{Relay, RelayConfig, digits_run};
use swarmtrain_shared::Identity;
use swarmtrain_shared::protocol::DataSource;
use swarmtrain_shared::robust::Rule;
use swarmtrain_shared::sim::{Schedule, SimConfig, simulate};
use swarmtrain_shared::text::TextCorpus;
use swarmtrain_tests::{
    accepted_updates, init_logging, package_path, start_relay, tiny_lm_run, train_peers_with_events,
};

/// Rounds of the live run; the simulator runs as many.
const ROUNDS: u64 = 4;
/// Inner steps per round.
const H: u32 = 10;
/// The relay's seed in `start_relay`: θ₀, the corpus split and the window order.
const SEED: u64 = 7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_native_peers_train_the_language_model_and_the_simulator_agrees_bit_for_bit() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let run = tiny_lm_run(dir.path(), H);
    let relay = start_relay(run.clone()).await;
    let (status, all_events) = train_peers_with_events(&relay, 3, ROUNDS).await;

    // What a contributor and an operator see: every update accepted, the held-out loss falling
    // from an untrained byte model's ln 256 ≈ 5.5 nats, every round with all three peers.
    for events in &all_events {
        let accepted = accepted_updates(events);
        assert_eq!(accepted as u64, ROUNDS, "every update accepted: {events:?}");
        assert!(
            events.iter().any(
                |e| matches!(e, PeerEvent::Model { model, .. } if model.contains("transformer"))
            ),
            "the peer says which model it trains"
        );
    }
    let losses: Vec<f32> = status.history.iter().filter_map(|r| r.val_loss).collect();
    println!("held-out loss by round (nats per byte): {losses:?}");
    assert_eq!(
        losses.len() as u64,
        ROUNDS + 1,
        "θ₀ and every round evaluated"
    );
    assert!(losses[0] > 5.0, "an untrained byte model: {losses:?}");
    let last = *losses.last().expect("history");
    assert!(
        last < 0.75 * losses[0],
        "the held-out loss falls: {losses:?}"
    );
    assert!(
        status.history.iter().skip(1).all(|r| r.contributors == 3),
        "every round aggregated all three peers: {:?}",
        status.history
    );
    assert!(status.rejected.is_empty(), "{:?}", status.rejected);
    assert_eq!(status.round, ROUNDS);

    // The simulator on the same corpus, seeds, peers (keys in slot order) and rounds.
    let keys: Vec<_> = (1..=3u8)
        .map(|id| Identity::from_seed([id; 32]).peer())
        .collect();
    let mut by_slot = Vec::new();
    for key in &keys {
        by_slot.push((relay.coordinator.slot(key).await.expect("joined"), *key));
    }
    by_slot.sort();
    assert_eq!(
        by_slot.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [0, 1, 2],
        "slots are given out in join order"
    );
    let DataSource::Text { name } = &run.data.source else {
        panic!("a text run")
    };
    let model = run.model.lm_config().expect("an LM");
    let text = std::fs::read(name).expect("corpus");
    let corpus = TextCorpus::new(&text, model.context + 1, SEED).expect("corpus");
    let config = SimConfig {
        model,
        peers: 3,
        steps: ROUNDS as u32 * H,
        batch: run.inner.batch_size,
        sync: Schedule::DiLoCo {
            inner_steps: H,
            outer: run.outer.clone(),
        },
        codec: run.codec,
        aggregator: run.aggregator.clone(),
        inner: run.inner.optimizer.clone(),
        seed: SEED,
        pretrain_steps: 0,
        pretrain_batch: 64,
        eval_every: 1_000,
        eval_windows: 8,
        peer_keys: by_slot.iter().map(|(_, k)| *k).collect(),
    };
    let report = tokio::task::spawn_blocking(move || {
        futures::executor::block_on(simulate::<Autodiff<NdArray>>(
            &Default::default(),
            &corpus,
            &config,
            |_| {},
        ))
    })
    .await
    .expect("task")
    .expect("simulation");
    let live = relay.coordinator.current_params().await;
    assert_eq!(report.syncs as u64, ROUNDS);
    assert_eq!(live.len(), report.params.len());
    let differ = live
        .iter()
        .zip(&report.params)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(
        differ, 0,
        "the simulator and the live relay end with the same θ, bit for bit"
    );
    relay.shutdown().await;
}

/// `--aggregator krum` with the default quorum of 3 used to log "aggregation failed" every
/// round forever; now the relay refuses to start and says why.
#[tokio::test]
async fn a_rule_the_quorum_cannot_feed_is_refused_at_start_up() {
    let mut run = digits_run();
    run.aggregator = Rule::MultiKrum {
        byzantine: 1,
        select: 1,
    };
    run.quorum = 3;
    let config = RelayConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        web_dir: package_path("../web"),
        runs: vec![run],
        ..RelayConfig::default()
    };
    let err = Relay::start(config).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("needs at least 5 updates") && message.contains("quorum is 3"),
        "{message}"
    );
}
