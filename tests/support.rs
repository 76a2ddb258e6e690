//! Helpers for the multi-peer tests: a relay and native peers in one process, on loopback.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use burn::backend::{Autodiff, NdArray};
use std::time::Duration;

use swarmtrain_client::Flag;
use swarmtrain_client::peer::{self, PeerConfig, PeerError, PeerEvent};
use swarmtrain_client::rpc::RelayClient;
use swarmtrain_relay::coordinator::Status;
use swarmtrain_relay::{Relay, RelayConfig};
use swarmtrain_shared::protocol::{
    Capabilities, ClientToRelay, Codec, Join, PROTOCOL_VERSION, PayloadRef, RelayToClient, Role,
    RoundAnnouncement, RunSpec, Update, Welcome,
};
use swarmtrain_shared::{Identity, PeerKey};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Logs to the test output when `RUST_LOG` is set.
/// How many of a peer's updates the relay accepted, from its events.
pub fn accepted_updates(events: &[PeerEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, PeerEvent::Submitted { accepted: true, .. }))
        .count()
}

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A corpus with structure to learn, about `bytes` long: sentences from a small grammar.
pub fn grammar_text(bytes: usize) -> String {
    let subjects = ["the cat ", "a dog ", "my friend ", "the old man ", "she "];
    let verbs = ["sees ", "likes ", "follows ", "finds ", "paints "];
    let objects = [
        "the ball.\n",
        "a red hat.\n",
        "the river.\n",
        "some bread.\n",
        "the moon.\n",
    ];
    let mut rng = swarmtrain_shared::data::SplitMix64::new(9);
    let mut text = String::new();
    while text.len() < bytes {
        for part in [&subjects[..], &verbs[..], &objects[..]] {
            text.push_str(part[rng.below(part.len() as u64) as usize]);
        }
    }
    text
}

/// Writes [`grammar_text`] to `dir/corpus.txt` and returns a tiny language-model run on it
/// (context 32, 1 layer × 32 wide, 2 heads; `steps` inner steps of 8 windows; 3 data slots;
/// quorum 3), with the live run's schedule and clipping.
pub fn tiny_lm_run(dir: &Path, steps: u32) -> RunSpec {
    let path = dir.join("corpus.txt");
    std::fs::write(&path, grammar_text(150_000)).expect("write corpus");
    let mut run = swarmtrain_relay::default_lm_run(path.to_str().expect("utf-8 path"));
    run.model = swarmtrain_shared::protocol::ModelSpec::ByteLm {
        context: 32,
        d_model: 32,
        heads: 2,
        layers: 1,
        mlp_ratio: 4,
    };
    run.data.n_shards = 3;
    run.inner.steps = steps;
    run.inner.batch_size = 8;
    run.inner.optimizer.schedule = swarmtrain_shared::lm_train::LrSchedule {
        peak: 1e-2,
        warmup: 5,
        total: 200,
        min_ratio: 0.1,
    };
    run.quorum = 3;
    run.round_deadline_ms = 600_000;
    run
}

/// Starts a relay for `run` on loopback with free ports and an ephemeral identity.
pub async fn start_relay(run: RunSpec) -> Relay {
    Relay::start(relay_config(vec![run]))
        .await
        .expect("relay starts")
}

/// The configuration of an open relay on loopback for `runs` (what [`start_relay`] starts), for
/// tests that change a limit or add a run.
pub fn relay_config(runs: Vec<RunSpec>) -> RelayConfig {
    RelayConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        web_dir: package_path("../web"),
        runs,
        seed: 7,
        ..RelayConfig::default()
    }
}

/// Resident memory of this process, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `relay`'s `/metrics` text.
pub async fn metrics(relay: &Relay) -> String {
    reqwest::get(format!("{}metrics", relay.url()))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body")
}

/// A relay on loopback coordinating `run` (a digits run) as one open to the internet would:
/// proof-of-work admission of 10 bits (cheap for the honest peers, not free for minted
/// identities) and sealing required.
pub async fn start_pow_relay(run: RunSpec) -> Relay {
    Relay::start(pow_relay_config(run))
        .await
        .expect("relay starts")
}

/// The configuration [`start_pow_relay`] starts.
pub fn pow_relay_config(run: RunSpec) -> RelayConfig {
    let run_id = run.run_id.clone();
    RelayConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        web_dir: package_path("../web"),
        runs: vec![run],
        admission: [(
            run_id,
            swarmtrain_shared::admission::Admission::ProofOfWork { bits: 10 },
        )]
        .into(),
        require_sealed: true,
        ..RelayConfig::default()
    }
}

/// A `Join` of the digits run from `platform`, with `proof_of_work` as its puzzle's solution.
pub fn digits_join(platform: &str, proof_of_work: Option<u64>) -> ClientToRelay {
    ClientToRelay::Join(Join {
        version: PROTOCOL_VERSION,
        run_id: "digits".into(),
        capabilities: Capabilities {
            backend: "none".into(),
            platform: platform.into(),
        },
        role: swarmtrain_shared::protocol::Role::Train,
        proof_of_work,
    })
}

/// Connects to `relay` over TCP as the identity with `seed` and joins its run, without the
/// peer loop: tests use it to send hand-made (and malformed) messages.
pub async fn join_raw(
    relay: &Relay,
    seed: [u8; 32],
) -> (RelayClient, Identity, Welcome, RoundAnnouncement) {
    join_raw_at(
        &relay.bootstrap.addresses["tcp"][0],
        &relay.bootstrap.run_id,
        seed,
    )
    .await
}

/// [`join_raw`] for a relay at TCP multiaddr `address` (for example a relay process).
pub async fn join_raw_at(
    address: &str,
    run_id: &str,
    seed: [u8; 32],
) -> (RelayClient, Identity, Welcome, RoundAnnouncement) {
    join_raw_as(address, run_id, seed, Role::Train).await
}

/// [`join_raw_at`] in `role` (a verifier's hand-made messages).
pub async fn join_raw_as(
    address: &str,
    run_id: &str,
    seed: [u8; 32],
    role: Role,
) -> (RelayClient, Identity, Welcome, RoundAnnouncement) {
    let identity = Identity::from_seed(seed);
    let client =
        RelayClient::connect(address.parse().expect("multiaddr"), &identity).expect("dial");
    let join = ClientToRelay::Join(Join {
        version: PROTOCOL_VERSION,
        run_id: run_id.to_owned(),
        capabilities: Capabilities {
            backend: "none".into(),
            platform: "test".into(),
        },
        role,
        proof_of_work: None,
    });
    let welcome = match client.send(join, Vec::new()).await.expect("join") {
        RelayToClient::Welcome(welcome) => *welcome,
        other => panic!("expected a welcome, got {other:?}"),
    };
    let round = welcome
        .round
        .verify_from(&PeerKey::from_public_key(welcome.relay_key()))
        .expect("signed by the relay");
    (client, identity, welcome, round)
}

/// Runs `count` native peers for `rounds` rounds each and returns the relay's status once the
/// last round has closed, with each peer's events. The peers train only once all have joined
/// ([`spawn_peers_together`]): a peer that joined late would find round 0 closed by the others
/// (seen once in CI: its update was refused, `wrong_round`).
pub async fn train_peers_with_events(
    relay: &Relay,
    count: u8,
    rounds: u64,
) -> (Status, Vec<Vec<PeerEvent>>) {
    let peers = spawn_peers_together(relay, 1..=count, rounds, usize::from(count));
    let mut events = Vec::new();
    for peer in peers {
        let (trained, peer_events) = tokio::time::timeout(Duration::from_secs(600), peer.finish())
            .await
            .expect("peers finish in time");
        assert_eq!(trained, rounds, "every peer trained every round");
        events.push(peer_events);
    }
    let mut status = relay.coordinator.status().await;
    for _ in 0..50 {
        if status.round >= rounds {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = relay.coordinator.status().await;
    }
    (status, events)
}

/// As [`train_peers_with_events`], for tests that only need the relay's status.
pub async fn train_peers(relay: &Relay, count: u8, rounds: u64) -> Status {
    train_peers_with_events(relay, count, rounds).await.0
}

/// A native peer (ndarray backend) running the browser's client code.
#[derive(Debug)]
pub struct TestPeer {
    pub task: JoinHandle<Result<u64, PeerError>>,
    pub events: mpsc::Receiver<PeerEvent>,
}

pub fn spawn_peer(relay: &Relay, id: u8, max_rounds: u64) -> TestPeer {
    spawn_peer_in(relay, id, max_rounds, None)
}

/// [`spawn_peer`] for the run `run_id` (None: the relay's default run).
pub fn spawn_peer_in(relay: &Relay, id: u8, max_rounds: u64, run_id: Option<&str>) -> TestPeer {
    spawn_peer_with(relay, id, max_rounds, run_id, Default::default())
}

/// Native peers `ids` that join at once but hold their first training step until `joined`
/// peers in all (these and any others) have joined the relay's default run. A round's quorum
/// counts only the peers that have joined, so without this the first peer to finish can close
/// round 0 alone; tests that assert who took part in every round start their peers this way.
pub fn spawn_peers_together(
    relay: &Relay,
    ids: impl IntoIterator<Item = u8>,
    max_rounds: u64,
    joined: usize,
) -> Vec<TestPeer> {
    let pause = Arc::new(Flag::new(true));
    let peers = ids
        .into_iter()
        .map(|id| spawn_peer_with(relay, id, max_rounds, None, pause.clone()))
        .collect();
    let coordinator = relay.coordinator.clone();
    tokio::spawn(async move {
        while coordinator.status().await.joined_peers < joined {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        pause.set(false);
    });
    peers
}

/// The settings of a native peer of `relay` with identity seed `[id; 32]` (the relay's default
/// run, no round limit, ten retries, no browser links).
pub fn peer_config(relay: &Relay, id: u8) -> PeerConfig {
    peer_config_at(&relay.url(), id)
}

/// [`peer_config`] for the relay at HTTP base URL `url` (a relay process).
pub fn peer_config_at(url: &str, id: u8) -> PeerConfig {
    PeerConfig {
        run_id: None,
        transport: None,
        relay_url: url.to_owned(),
        identity_seed: zeroize::Zeroizing::new([id; 32]),
        backend: "ndarray".into(),
        max_rounds: None,
        sample_len: 0,
        stop: Default::default(),
        max_retries: Some(10),
        direct_peers: 0,
        pin_relay: false,
        pause: Default::default(),
        ice_servers: Vec::new(),
    }
}

/// A volunteer verifier (the client's [`swarmtrain_client::verifier`]) with identity seed
/// `[id; 32]`, until its `stop` is set: its task and events.
pub fn spawn_verifier(
    relay: &Relay,
    id: u8,
) -> (
    JoinHandle<Result<u64, PeerError>>,
    Arc<Flag>,
    mpsc::Receiver<swarmtrain_client::verifier::VerifierEvent>,
) {
    let (tx, events) = mpsc::channel(1024);
    let config = peer_config(relay, id);
    let stop = config.stop.clone();
    let task = tokio::spawn(swarmtrain_client::verifier::verify::<Autodiff<NdArray>>(
        Default::default(),
        config,
        move |event| {
            let _ = tx.try_send(event);
        },
    ));
    (task, stop, events)
}

fn spawn_peer_with(
    relay: &Relay,
    id: u8,
    max_rounds: u64,
    run_id: Option<&str>,
    pause: Arc<Flag>,
) -> TestPeer {
    spawn_configured(PeerConfig {
        run_id: run_id.map(str::to_owned),
        max_rounds: Some(max_rounds),
        pause,
        ..peer_config(relay, id)
    })
}

/// A native peer of the relay at HTTP base URL `url` (a relay process) with identity seed
/// `[id; 32]`, training `max_rounds` rounds of its default run while `pause` lets it.
pub fn spawn_peer_at(url: &str, id: u8, max_rounds: u64, pause: Arc<Flag>) -> TestPeer {
    spawn_configured(PeerConfig {
        max_rounds: Some(max_rounds),
        pause,
        ..peer_config_at(url, id)
    })
}

/// A native peer with `config`, its task and events.
pub fn spawn_configured(config: PeerConfig) -> TestPeer {
    let (tx, events) = mpsc::channel(1024);
    let task = tokio::spawn(peer::run::<Autodiff<NdArray>>(
        Default::default(),
        config,
        move |event| {
            let _ = tx.try_send(event);
        },
    ));
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

/// A path under this package (`tests/`). `cargo test` sets CARGO_MANIFEST_DIR for the test
/// process, which names this checkout even when the test was compiled in another one sharing
/// the CARGO_TARGET_DIR; the path compiled in is the fallback.
pub fn package_path(relative: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join(relative)
}

/// The relay binary that `cargo test --workspace` builds beside the test executables (or the
/// one `cargo xtask test` names).
pub fn relay_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SWARMTRAIN_RELAY_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("swarmtrain-relay");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p swarmtrain-relay`",
        bin.display()
    );
    bin
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A relay process (`swarmtrain-relay serve`, quorum 2) on loopback; killed with SIGKILL when
/// dropped.
#[derive(Debug)]
pub struct RelayProcess {
    child: Child,
    pub http: String,
}

impl RelayProcess {
    /// Starts the relay on `data_dir` and HTTP `port`, with `args` added to `serve` and `env`
    /// set for the process.
    pub fn start(data_dir: &Path, port: u16, args: &[&str], env: &[(&str, &str)]) -> Self {
        let web = package_path("../web");
        let child = Command::new(relay_binary())
            .args([
                "serve",
                "--model",
                "digits",
                "--tcp-port",
                "0",
                "--ws-port",
                "0",
                "--quorum",
                "2",
                "--round-deadline-secs",
                "600",
            ])
            .arg("--http")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--web-dir")
            .arg(web)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("RUST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start the relay");
        Self {
            child,
            http: format!("http://127.0.0.1:{port}/"),
        }
    }

    /// GETs `path` as JSON, waiting up to a minute for the relay to come up.
    pub async fn json(&self, path: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = reqwest::get(format!("{}{path}", self.http)).await
                && let Ok(Ok(value)) = response.bytes().await.map(|b| serde_json::from_slice(&b))
            {
                return value;
            }
            assert!(Instant::now() < deadline, "the relay did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn tcp_address(&self) -> String {
        self.json("api/bootstrap").await["addresses"]["tcp"][0]
            .as_str()
            .expect("tcp address")
            .to_owned()
    }

    /// Whether the process has exited, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` (`STOP`, `CONT`, …) through `kill`: `STOP` freezes the relay as a
    /// network partition would, its connections open and silent.
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal} failed");
    }

    pub fn kill(mut self) {
        self.child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix.
        self.child.wait().expect("reaped");
    }

    /// Sends SIGTERM (through `kill`, as an operator's service manager would) and waits up to
    /// 30 s for the relay to exit; returns how it exited.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the relay did not exit within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signed update of constant `value` (f32) for `round` of the digits run.
pub async fn send_constant_update(
    client: &RelayClient,
    round: &RoundAnnouncement,
    value: f32,
) -> RelayToClient {
    let (update, payload) = constant_update(round, value);
    client.send(update, payload).await.expect("request")
}

/// An update of constant `value` (f32) for `round` of the digits run, and its payload.
pub fn constant_update(round: &RoundAnnouncement, value: f32) -> (ClientToRelay, Vec<u8>) {
    let payload = Codec::F32.encode(&vec![value; round.n_params as usize]);
    let update = ClientToRelay::Update(Update {
        run_id: "digits".into(),
        round: round.round,
        base: round.params,
        n_samples: 32,
        inner_steps: 10,
        loss: 1.0,
        codec: Codec::F32,
        payload: PayloadRef::of(&payload),
        state: PayloadRef::of(&[]),
    });
    (update, payload)
}

/// `message` with `payload`, signed by `identity` in a fresh envelope of `client`'s connection,
/// unsent (tests send it as it is, or forward it as an edge does).
pub fn sign(
    client: &RelayClient,
    identity: &Identity,
    message: ClientToRelay,
    payload: Vec<u8>,
) -> swarmtrain_shared::protocol::Submission {
    swarmtrain_shared::protocol::Submission {
        signed: identity.sign(&client.envelope(message)).expect("sign"),
        payload,
    }
}

/// Two peers (seeds 1 and 2) join the digits run of the relay process at TCP `address` and each
/// send an update to round 0, which closes it at quorum 2. Returns each peer's connection and
/// identity, and round 0's announcement.
pub async fn two_peers_close_round_0(
    address: &str,
) -> [(RelayClient, Identity, RoundAnnouncement); 2] {
    let (client_a, id_a, _, round0) = join_raw_at(address, "digits", [1; 32]).await;
    let (client_b, id_b, _, _) = join_raw_at(address, "digits", [2; 32]).await;
    assert!(matches!(
        send_constant_update(&client_a, &round0, 0.01).await,
        RelayToClient::Accepted { round: 0 }
    ));
    assert!(matches!(
        send_constant_update(&client_b, &round0, 0.02).await,
        RelayToClient::Accepted { round: 0 }
    ));
    // `Accepted` comes once an update is durable; the round closes just after, on the relay's
    // round timer. Wait for round 1's announcement as a peer does.
    let ask = ClientToRelay::AwaitRound {
        run_id: "digits".into(),
        after: Some(0),
    };
    match client_a.send(ask, Vec::new()).await.expect("await round") {
        RelayToClient::Round(signed) => {
            let round = signed.verify_and_decode().expect("signed").1;
            assert_eq!(round.round, 1, "round 0 closed");
        }
        other => panic!("expected round 1, got {other:?}"),
    }
    [(client_a, id_a, round0.clone()), (client_b, id_b, round0)]
}

/// Waits (at most 2 minutes) until `n` identities have joined `relay`'s run.
pub async fn all_joined(relay: &Relay, n: usize) {
    tokio::time::timeout(Duration::from_secs(120), async {
        while relay.coordinator.status().await.joined_peers < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("everyone joined");
}

/// Waits until `relay` has concluded at least `count` replays (every outcome counted) and
/// returns its status then.
pub async fn replays_concluded(relay: &Relay, count: u64) -> Status {
    loop {
        let status = relay.coordinator.status().await;
        if status.replays.values().sum::<u64>() >= count {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How an auditee in [`auditees`] answers the relay's replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dodge {
    /// Runs half the steps it reports (and reveals the state it really started from).
    FewerSteps,
    /// Never reveals its committed state.
    NoReveal,
    /// Reveals a state other than the one its update committed to.
    WrongReveal,
}

/// Peers (seeds 150, 151, …) that commit to their round-start state as honest ones do and, in
/// the rounds where `cheats(round)` holds, dodge the replay each its own way (in the others
/// they train and reveal honestly); each trains a fresh replica every round, so its committed
/// state is the schedule's position without moments. Runs `rounds` rounds of a language-model
/// run from the round open when they join, after `joined` identities (these included) have
/// joined, and answers the last round's audit. Returns, for each, the rounds the relay drew its update in.
pub async fn auditees(
    relay: &Relay,
    kinds: &[Dodge],
    joined: usize,
    rounds: u64,
    cheats: impl Fn(u64) -> bool,
) -> Vec<Vec<u64>> {
    use burn::backend::{Autodiff, NdArray};
    use swarmtrain_shared::lm_train::LmInnerLoop;
    use swarmtrain_shared::protocol::{Reveal, params_from_bytes};
    use swarmtrain_shared::replay::{CommittedState, RoundInputs, replay_lm};
    type B = Autodiff<NdArray>;

    let mut peers = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let (client, identity, welcome, round) = join_raw(relay, [150 + i as u8; 32]).await;
        peers.push((*kind, client, identity.peer(), welcome, round));
    }
    all_joined(relay, joined).await;
    let spec = peers[0].3.spec.clone();
    let relay_key = PeerKey::from_public_key(peers[0].3.relay_key());
    let config = spec.model.lm_config().expect("a language-model run");
    let device = Default::default();
    let h = spec.inner.steps;
    // The state each committed to in the round just closed.
    let mut committed: Vec<Vec<u8>> = vec![Vec::new(); peers.len()];
    let mut audited = vec![Vec::new(); peers.len()];
    let first = peers[0].4.round;
    for r in first..=first + rounds {
        // The audit of the round before: named in this round's announcement.
        if r > first {
            for (((kind, client, key, _, round), state), audited) in
                peers.iter().zip(&committed).zip(&mut audited)
            {
                let cheat = cheats(r - 1);
                if !round.audit.contains(key) {
                    continue;
                }
                audited.push(r - 1);
                if cheat && *kind == Dodge::NoReveal {
                    continue;
                }
                let mut state = state.clone();
                if cheat && *kind == Dodge::WrongReveal {
                    let mut other = CommittedState::from_bytes(&state).expect("state");
                    other.trainer.step += 1;
                    state = other.to_bytes();
                }
                let reveal = ClientToRelay::Reveal(Reveal {
                    run_id: spec.run_id.clone(),
                    round: r - 1,
                    state: PayloadRef::of(&state),
                });
                let answer = client.send(reveal, state).await.expect("answer");
                match (cheat && *kind == Dodge::WrongReveal, answer) {
                    (false, RelayToClient::Revealed { round }) => assert_eq!(round, r - 1),
                    (true, RelayToClient::Rejected { kind, .. }) => {
                        assert_eq!(kind, "reveal_mismatch")
                    }
                    (_, other) => panic!("{kind:?} revealed: {other:?}"),
                }
            }
        }
        if r == first + rounds {
            break;
        }
        let round = peers[0].4.clone();
        let bytes = peers[0]
            .1
            .fetch_params(&spec.run_id, round.params)
            .await
            .expect("θ");
        let theta = params_from_bytes(&bytes).expect("f32s");
        for ((kind, client, _, welcome, _), committed) in peers.iter().zip(&mut committed) {
            let text = relay
                .coordinator
                .text(round.round, welcome.slot)
                .await
                .expect("text");
            // A fresh replica each round: its state is the schedule's position, no moments.
            let mut trainer =
                LmInnerLoop::<B>::new(&device, &config, &theta, &spec.inner.optimizer)
                    .expect("θ fits");
            trainer.seek(round.round * u64::from(h));
            let state = CommittedState {
                trainer: trainer.state().await.expect("state"),
                residual: Vec::new(),
            };
            let steps = if cheats(round.round) && *kind == Dodge::FewerSteps {
                h / 2
            } else {
                h
            };
            let inputs = RoundInputs {
                config: &config,
                optimizer: &spec.inner.optimizer,
                theta: &theta,
                first_step: round.round * u64::from(h),
                text: &text,
                batch: spec.inner.batch_size,
                steps,
                privacy: spec.privacy.as_ref(),
                codec: spec.codec,
            };
            let payload = tokio::task::block_in_place(|| {
                futures::executor::block_on(replay_lm::<B>(&device, &inputs, &state))
            })
            .expect("trains");
            *committed = state.to_bytes();
            send_full_update(client, &spec, &round, payload, committed).await;
        }
        for (_, client, _, _, next) in &mut peers {
            *next = await_next_round(client, &spec, round.round, &relay_key).await;
        }
    }
    audited
}

/// Sends an update of `round` claiming the run's full `H` steps, with `payload` and a
/// commitment to `state`, and expects it accepted (the checks come after the round closes).
pub async fn send_full_update(
    client: &RelayClient,
    spec: &RunSpec,
    round: &RoundAnnouncement,
    payload: Vec<u8>,
    state: &[u8],
) {
    let h = spec.inner.steps;
    let update = ClientToRelay::Update(Update {
        run_id: spec.run_id.clone(),
        round: round.round,
        base: round.params,
        n_samples: h * spec.inner.batch_size,
        inner_steps: h,
        loss: 1.0,
        codec: spec.codec,
        payload: PayloadRef::of(&payload),
        state: PayloadRef::of(state),
    });
    match client.send(update, payload).await {
        Ok(RelayToClient::Accepted { .. }) => {}
        other => panic!("an update is accepted (the checks come later): {other:?}"),
    }
}

/// Long-polls for the round after `after` and checks it is signed by `relay_key`.
pub async fn await_next_round(
    client: &RelayClient,
    spec: &RunSpec,
    after: u64,
    relay_key: &PeerKey,
) -> RoundAnnouncement {
    let ask = ClientToRelay::AwaitRound {
        run_id: spec.run_id.clone(),
        after: Some(after),
    };
    match client.send(ask, Vec::new()).await {
        Ok(RelayToClient::Round(signed)) => signed.verify_from(relay_key).expect("announcement"),
        other => panic!("expected the next round, got {other:?}"),
    }
}

/// A PostgreSQL server of its own in a temporary data directory on loopback (Debian's
/// postgresql, which `cargo xtask test` installs and names in `SWARMTRAIN_POSTGRES_BIN`), run
/// as the `postgres` user when the tests run as root (PostgreSQL refuses root); stopped and
/// deleted when dropped.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// Whether it syncs its writes to disk (off for tests, on for benchmarks).
    fsync: bool,
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub url: String,
}

impl Postgres {
    /// Starts one, or `None` (and says why) where PostgreSQL is not installed.
    pub fn start() -> Option<Self> {
        Self::start_with(false, false)
    }

    /// [`Self::start`] with `fsync` on, as a server in production runs (benchmarks).
    pub fn start_durable() -> Option<Self> {
        Self::start_with(false, true)
    }

    /// [`Self::start`], but taking TLS connections only: its certificate (for 127.0.0.1) is
    /// signed by a CA of the test's own, `ca.pem` in [`Self::ca`] (made with Debian's openssl).
    pub fn start_tls_only() -> Option<Self> {
        Self::start_with(true, false)
    }

    /// The test CA's certificate (PEM) of a server from [`Self::start_tls_only`].
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn start_with(tls: bool, fsync: bool) -> Option<Self> {
        let bin = std::env::var_os("SWARMTRAIN_POSTGRES_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .filter_map(|e| Some(e.ok()?.path().join("bin")))
                    .filter(|bin| bin.join("pg_ctl").exists())
                    .collect();
                found.sort();
                found.pop()
            });
        let Some(bin) = bin else {
            println!(
                "SKIPPED: PostgreSQL is not installed (`cargo xtask test` installs it and sets SWARMTRAIN_POSTGRES_BIN)"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let this = Self {
            bin,
            dir,
            fsync,
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        if tls {
            this.make_certificates();
        }
        if is_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(this.dir.path())
                .status()
                .expect("chown");
            assert!(chown.success(), "chown the PostgreSQL directory");
        }
        let data = this.data();
        let initdb = this
            .command("initdb")
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(initdb.success(), "initdb");
        if tls {
            // TLS or nothing: no line lets a plain TCP connection in.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .expect("pg_hba.conf");
            let dir = this.dir.path();
            std::fs::write(
                data.join("postgresql.auto.conf"),
                format!(
                    "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                    dir.join("server.crt").display(),
                    dir.join("server.key").display()
                ),
            )
            .expect("postgresql.auto.conf");
        }
        this.up();
        Some(this)
    }

    /// A CA, and a certificate for 127.0.0.1 it signs, in the server's directory.
    fn make_certificates(&self) {
        let dir = self.dir.path();
        let openssl = |args: &[&str]| {
            let done = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("run openssl");
            assert!(done.success(), "openssl {args:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &[
                    "req",
                    "-x509",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=swarmtrain test CA",
                ][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req", "-subj", "/CN=127.0.0.1"][..],
                &ec,
                &["-keyout", "server.key", "-out", "server.csr"],
            ]
            .concat(),
        );
        std::fs::write(dir.join("san.ext"), "subjectAltName = IP:127.0.0.1\n").expect("ext");
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(
            dir.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod the key");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `program` of PostgreSQL's, as the `postgres` user when this runs as root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    /// Starts the server (again) on its port and waits until it takes connections.
    pub fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={}",
            self.port,
            self.dir.path().display(),
            if self.fsync { "on" } else { "off" }
        );
        let started = self
            .command("pg_ctl")
            .args(["-w", "-t", "60", "-o", &options, "-l"])
            .arg(self.dir.path().join("log"))
            .arg("-D")
            .arg(self.data())
            .arg("start")
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(started.success(), "pg_ctl start");
    }

    /// Stops the server at once (`immediate`: as if it crashed).
    pub fn down(&self) {
        let _ = self
            .command("pg_ctl")
            .args(["-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop")
            .stdout(Stdio::null())
            .status();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.down();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}
