//! Helpers for the multi-peer tests: a relay and native peers in one process, on loopback.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use burn::backend::{Autodiff, NdArray};
use swarmtrain_client::peer::{self, PeerConfig, PeerError, PeerEvent};
use swarmtrain_relay::{Relay, RelayConfig};
use swarmtrain_shared::protocol::RunSpec;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Starts a relay for `run` on loopback with free ports and an ephemeral identity.
pub async fn start_relay(run: RunSpec) -> Relay {
    let config = RelayConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        web_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web"),
        run,
        seed: 7,
        ..RelayConfig::default()
    };
    Relay::start(config).await.expect("relay starts")
}

/// A native peer (ndarray backend) running the browser's client code.
#[derive(Debug)]
pub struct TestPeer {
    pub task: JoinHandle<Result<u64, PeerError>>,
    pub events: mpsc::Receiver<PeerEvent>,
}

pub fn spawn_peer(relay: &Relay, id: u8, max_rounds: u64) -> TestPeer {
    let (tx, events) = mpsc::channel(1024);
    let config = PeerConfig {
        relay_url: relay.url(),
        identity_seed: [id; 32],
        backend: "ndarray".into(),
        max_rounds: Some(max_rounds),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let task = tokio::spawn(peer::run::<Autodiff<NdArray>>(Default::default(), config, move |event| {
        let _ = tx.try_send(event);
    }));
    TestPeer { task, events }
}

impl TestPeer {
    /// Waits for the peer to finish and returns its events.
    pub async fn finish(mut self) -> (u64, Vec<PeerEvent>) {
        let rounds = self.task.await.expect("peer task").expect("peer ran");
        let mut events = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            events.push(event);
        }
        (rounds, events)
    }
}
