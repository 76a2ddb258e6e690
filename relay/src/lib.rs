//! The swarmtrain relay: serves the page, the npm package, data and checkpoints over HTTP,
//! coordinates rounds over libp2p, and aggregates updates with the shared round state machine.
//!
//! [`Relay::start`] runs everything in the current tokio runtime, so tests start a relay and
//! native peers in one process.

pub mod backend;
pub mod boxed;
pub mod checks;
pub mod config;
pub mod coordinator;
pub mod corpus;
pub mod dataset;
pub mod federation;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod ops;
pub mod p2p;
pub mod public;
pub mod runs;
pub mod store;
#[cfg(test)]
mod testing;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;
use swarmtrain_net::Bootstrap;
use swarmtrain_shared::Identity;
use swarmtrain_shared::admission::Admission;
use swarmtrain_shared::lm::LmConfig;
use swarmtrain_shared::lm_train::{LmInnerSpec, LrSchedule};
use swarmtrain_shared::protocol::{
    Codec, DataSource, DataSpec, InnerSpec, ModelSpec, OuterSpec, RunSpec,
};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

pub use crate::backend::AggregationBackend;
use crate::coordinator::Coordinator;
pub use crate::runs::Runs;

/// Everything a relay needs to start.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// HTTP listen address (HTTPS with [`public::PublicConfig::tls`]); its IP is also used for
    /// the libp2p listeners.
    pub http: SocketAddr,
    /// libp2p TCP port for native peers (0: any).
    pub tcp_port: u16,
    /// libp2p WebSocket port for browsers (0: any).
    pub ws_port: u16,
    /// libp2p WebRTC-direct UDP port for browsers (0: any).
    pub webrtc_port: u16,
    /// The page; the npm package is expected under `pkg/`.
    pub web_dir: PathBuf,
    /// Where the relay keeps its identity key. `None`: an ephemeral identity.
    pub data_dir: Option<PathBuf>,
    /// The runs this relay coordinates, each with its own spec; the first is the default one
    /// (what `/api/status` shows and the page joins). Run ids must differ.
    pub runs: Vec<RunSpec>,
    /// Seed of θ_0.
    pub seed: u64,
    /// The Burn backend that aggregates.
    pub aggregation: AggregationBackend,
    /// Checkpoints kept per run in the data directory.
    pub keep_checkpoints: usize,
    /// Where checkpoints go, as a URL (`s3://bucket/prefix`, `file:///path`); None: the data
    /// directory's `checkpoints/`. The run database stays in the data directory.
    pub checkpoint_store: Option<String>,
    /// How many rounds of history rows and ledger entries the data directory keeps.
    pub retention: store::Retention,
    /// Each run's admission policy, by run id; a run missing here is open.
    pub admission: BTreeMap<String, Admission>,
    /// Serve θ chunks and take update payloads only on connections that agreed session keys
    /// ([`swarmtrain_shared::seal`]); others are refused (`not_sealed`).
    pub require_sealed: bool,
    /// How many browsers linked to other browsers get each announcement from the relay itself;
    /// the rest receive it over their direct links. Peers without links always get it from
    /// the relay.
    pub gossip_fanout: usize,
    /// At most this many libp2p connections from one IP address (a per-address limit, as
    /// HTTP servers keep per client).
    pub connections_per_ip: usize,
    /// Whether any libp2p peer may reserve a circuit and dial through it (else only peers
    /// whose identity has joined a run).
    pub open_circuit_relay: bool,
    /// Bytes of long messages (updates) buffered for all connections together.
    pub reassembly_budget: usize,
    /// How the relay checks the work of every accepted update ([`checks`]).
    pub checks: swarmtrain_shared::verify::CheckPolicy,
    /// Which fraction of updates the relay replays, how many a round at most, and how near a
    /// replay must land ([`checks::replay_update`]).
    pub replays: checks::ReplayPolicy,
    /// Public addresses, TLS, CORS and ICE servers: the relay on the internet.
    pub public: public::PublicConfig,
    /// The HTTP base URL of the root relay this relay is an edge of, for every run it has
    /// ([`federation`]); `None`: the relay owns its runs.
    pub upstream: Option<String>,
    /// The HTTP base URL clients reach this relay at, which a federation's bootstrap lists
    /// (`None`: the bound address, unless bound to every interface).
    pub public_url: Option<String>,
    /// On a root: the edge relays (their peer keys) it takes; empty: any identity that passes
    /// a run's admission.
    pub edge_keys: BTreeSet<swarmtrain_shared::PeerKey>,
    /// The federation's shared ledger, a PostgreSQL connection string ([`ledger`]); `None`: the
    /// ledger is the data directory's (and an edge's, its root's).
    pub ledger_url: Option<public::Secret>,
    /// A PEM file of CA certificates that the shared ledger's server certificate may chain to,
    /// besides the system's.
    pub ledger_ca: Option<PathBuf>,
}

/// The digits run: the 4,810-parameter MLP on scikit-learn's 8×8 digits, trained DiLoCo-style.
pub fn digits_run() -> RunSpec {
    RunSpec {
        run_id: "digits".into(),
        model: ModelSpec::DigitsMlp { hidden: 64 },
        data: DataSpec {
            source: DataSource::Digits,
            n_shards: 8,
        },
        inner: InnerSpec {
            steps: 50,
            batch_size: 32,
            optimizer: LmInnerSpec::constant(3e-3, 1e-4),
        },
        outer: OuterSpec::default(),
        codec: Codec::F32,
        quorum: 3,
        round_deadline_ms: 30_000,
        privacy: None,
        aggregator: swarmtrain_shared::robust::Rule::Mean,
    }
}

/// The language-model run: the byte-level transformer (2 layers × 64 wide, 4 heads, context 64:
/// 136K parameters) on the text at `corpus` (a UTF-8 file or folder, read by the relay), with
/// the simulator's inner loop: AdamW (β₂ 0.95, weight decay 0.1), 100 warm-up steps, a cosine
/// to a tenth of the peak over 20,000 steps, global-norm clipping at 1.
pub fn default_lm_run(corpus: &str) -> RunSpec {
    let model = LmConfig::new();
    RunSpec {
        run_id: "lm".into(),
        model: ModelSpec::byte_lm(&model),
        data: DataSpec {
            source: DataSource::Text {
                name: corpus.to_owned(),
            },
            n_shards: 16,
        },
        inner: InnerSpec {
            steps: 50,
            batch_size: 16,
            optimizer: LmInnerSpec::new(LrSchedule {
                peak: 3e-3,
                warmup: 100,
                total: 20_000,
                min_ratio: 0.1,
            }),
        },
        outer: OuterSpec::default(),
        codec: Codec::F32,
        quorum: 3,
        round_deadline_ms: 60_000,
        privacy: None,
        aggregator: swarmtrain_shared::robust::Rule::Mean,
    }
}

/// Loads what `spec` trains on: the digits, or the text its data source names (split with the
/// run seed `seed`, as the simulator splits it).
pub fn load_data(spec: &RunSpec, seed: u64) -> anyhow::Result<dataset::TaskData> {
    Ok(match (&spec.data.source, spec.model.lm_config()) {
        (DataSource::Digits, _) => {
            dataset::TaskData::Digits(dataset::digits(&spec.run_id, spec.data.n_shards as usize)?)
        }
        (DataSource::Text { name }, Some(config)) => {
            let text = corpus::load(Path::new(name))?.text;
            dataset::TaskData::Text(
                dataset::TextData::new(&text, config.context, seed)
                    .with_context(|| format!("corpus {name}"))?,
            )
        }
        (DataSource::Text { .. }, None) => anyhow::bail!("text data needs a language model"),
    })
}

/// Connections from one IP address, by default: enough for a household or a small office
/// behind one NAT; a campus behind one address needs more (`--connections-per-ip`).
pub const DEFAULT_CONNECTIONS_PER_IP: usize = 256;

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tcp_port: 0,
            ws_port: 0,
            webrtc_port: 0,
            web_dir: PathBuf::from("web"),
            data_dir: None,
            runs: vec![digits_run()],
            seed: 0,
            aggregation: AggregationBackend::default(),
            keep_checkpoints: store::KEEP_CHECKPOINTS,
            checkpoint_store: None,
            retention: store::Retention::default(),
            admission: BTreeMap::new(),
            require_sealed: false,
            gossip_fanout: swarmtrain_net::DEFAULT_GOSSIP_FANOUT,
            connections_per_ip: DEFAULT_CONNECTIONS_PER_IP,
            open_circuit_relay: false,
            reassembly_budget: swarmtrain_shared::transfer::DEFAULT_BUDGET,
            checks: Default::default(),
            replays: Default::default(),
            public: public::PublicConfig {
                allow_origins: vec!["*".into()],
                turn_ttl_secs: public::TURN_TTL_SECS,
                ..Default::default()
            },
            upstream: None,
            public_url: None,
            edge_keys: BTreeSet::new(),
            ledger_url: None,
            ledger_ca: None,
        }
    }
}

/// The URL clients reach the relay at: `--public-url`, else the bound HTTP address (none when
/// bound to every interface: which of them a client reaches is unknown).
fn public_url(config: &RelayConfig, http_addr: SocketAddr) -> anyhow::Result<Option<String>> {
    if let Some(url) = &config.public_url {
        swarmtrain_shared::protocol::check_member_url(url)
            .map_err(|why| anyhow::anyhow!("--public-url {url:?}: {why}"))?;
        return Ok(Some(format!("{}/", url.trim_end_matches('/'))));
    }
    if http_addr.ip().is_unspecified() {
        return Ok(None);
    }
    let scheme = if config.public.tls.is_some() {
        "https"
    } else {
        "http"
    };
    Ok(Some(format!("{scheme}://{http_addr}/")))
}

/// A running relay. Dropping it does not stop it; call [`Relay::shutdown`].
#[derive(Debug)]
pub struct Relay {
    pub http_addr: SocketAddr,
    /// Whether the page and API are served over HTTPS.
    pub https: bool,
    pub bootstrap: Bootstrap,
    /// The default (first) run's coordinator.
    pub coordinator: Arc<Coordinator>,
    /// Every run's coordinator.
    pub runs: Arc<Runs>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Chooses ring as the process's rustls crypto provider (once; later calls do nothing). WebRTC's
/// DTLS needs one, and with more than one compiled in (the `s3` feature adds aws-lc-rs) rustls
/// cannot pick by itself. [`Relay::start`] calls it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn ip_protocol(ip: IpAddr) -> Protocol<'static> {
    match ip {
        IpAddr::V4(v4) => Protocol::Ip4(v4),
        IpAddr::V6(v6) => Protocol::Ip6(v6),
    }
}

/// The key files a data directory holds, which nobody but the relay's user may read.
const KEY_FILES: &[&str] = &["relay.key", "webrtc.pem"];

/// Makes the data directory private before anything is written to it: files the relay creates
/// from now on are its user's alone (umask 077: the run database holds decrypted updates, the
/// key files the relay's identity); a missing directory is created 0700, and an existing one
/// open to others is closed to them (0700, with a warning). A key file that others may read is
/// refused, as ssh refuses such a key: the key may have leaked, and the operator must decide.
pub fn secure_data_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
        let mode = std::fs::metadata(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{:o}", mode & 0o777),
                "the data directory was open to other users; making it 0700"
            );
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod 700 {}", dir.display()))?;
        }
        for name in KEY_FILES {
            let path = dir.join(name);
            match std::fs::metadata(&path) {
                Ok(meta) => {
                    let mode = meta.permissions().mode();
                    anyhow::ensure!(
                        mode & 0o077 == 0,
                        "{} may be read by other users (mode {:o}): check that the key has not \
                         leaked, then chmod 600 it",
                        path.display(),
                        mode & 0o777
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    Ok(())
}

impl Relay {
    /// Starts the HTTP server, the libp2p node and the round timer.
    pub async fn start(config: RelayConfig) -> anyhow::Result<Self> {
        install_crypto_provider();
        if let Some(dir) = &config.data_dir {
            secure_data_dir(dir)?;
        }
        let seed = match &config.data_dir {
            Some(dir) => swarmtrain_net::keyfile::load_or_create(&dir.join("relay.key"))?,
            None => swarmtrain_net::keyfile::random_seed()?,
        };
        let libp2p_secret = Zeroizing::new(blake3::derive_key(
            "swarmtrain relay libp2p key v1",
            seed.as_slice(),
        ));
        let keypair = libp2p::identity::Keypair::ed25519_from_bytes(*libp2p_secret)?;
        let peer_id = keypair.public().to_peer_id();

        anyhow::ensure!(!config.runs.is_empty(), "a relay needs at least one run");
        if let Some(unknown) = config
            .admission
            .keys()
            .find(|id| config.runs.iter().all(|r| &r.run_id != *id))
        {
            anyhow::bail!(
                "an admission policy names run {unknown:?}, which the relay does not have"
            );
        }
        // With a data directory the runs survive restarts: checkpoints and the ledger live there.
        let store = match config.data_dir.as_deref() {
            Some(dir) => {
                let store = match &config.checkpoint_store {
                    Some(url) => store::Store::open_at(dir, url)?,
                    None => store::Store::open(dir)?,
                };
                Some(Arc::new(
                    store
                        .with_keep(config.keep_checkpoints)
                        .with_retention(config.retention),
                ))
            }
            None => None,
        };
        let (announce, announcements) = tokio::sync::broadcast::channel(64);
        // Strikes for failed replays, from the runs to the libp2p loop that keeps strikes.
        let (strike_tx, strike_rx) = tokio::sync::mpsc::channel(1024);
        let due = Arc::new(Notify::new());
        let network = Arc::new(p2p::Network::default());
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .with_context(|| format!("binding {}", config.http))?;
        let http_addr = listener.local_addr()?;
        let federation = Arc::new(federation::Federation::new(
            public_url(&config, http_addr)?,
            config.upstream.is_some(),
            Some(network.clone()),
        ));
        let ledger = match &config.ledger_url {
            Some(url) => Some(
                ledger::SharedLedger::open(
                    &url.0,
                    ledger::tls(config.ledger_ca.as_deref())?,
                    Identity::from_seed(*seed).peer(),
                )
                .await
                .context("opening the shared ledger (--ledger-url)")?,
            ),
            None => None,
        };
        let mut coordinators = Vec::new();
        for spec in &config.runs {
            anyhow::ensure!(
                coordinators
                    .iter()
                    .all(|c: &Arc<Coordinator>| c.spec().run_id != spec.run_id),
                "two runs are named {:?}",
                spec.run_id
            );
            spec.validate()?;
            let data = load_data(spec, config.seed)
                .with_context(|| format!("loading the data of run {:?}", spec.run_id))?;
            let coordinator = Coordinator::new(
                coordinator::RunSetup {
                    identity: Identity::from_seed(*seed),
                    spec: spec.clone(),
                    data,
                    seed: config.seed,
                    admission: config
                        .admission
                        .get(&spec.run_id)
                        .cloned()
                        .unwrap_or_default(),
                },
                coordinator::RelayShared {
                    aggregation: config.aggregation,
                    store: store.clone(),
                    announce: announce.clone(),
                    due: due.clone(),
                },
            );
            let coordinator = coordinator
                .await
                .with_context(|| format!("opening run {:?}", spec.run_id))?
                .with_checks(config.checks)
                .with_replays(config.replays, Some(strike_tx.clone()))
                .with_edge_keys(config.edge_keys.clone())
                .with_federation(federation.clone())
                .with_ledger(ledger.clone());
            coordinators.push(Arc::new(match config.upstream {
                Some(_) => coordinator.as_edge(),
                None => coordinator,
            }));
        }
        let runs = Arc::new(
            Runs::new(coordinators, config.require_sealed)
                .context("starting the unjoined-checks thread")?,
        );
        let coordinator = runs.default_run().clone();

        // The WebRTC certificate is kept beside the key, so the certhash survives restarts.
        let certificate = match &config.data_dir {
            Some(dir) => p2p::load_or_create_certificate(&dir.join("webrtc.pem"))?,
            None => libp2p_webrtc::tokio::Certificate::generate(&mut rand::rng())?,
        };
        let public = &config.public;
        let tls = match &public.tls {
            Some(files) => {
                tls::check_key_mode(&files.key)?;
                Some(files.load()?)
            }
            None => None,
        };
        let external = public
            .external_addresses
            .iter()
            .map(|a| a.parse::<public::External>())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ice = public::Ice::new(
            &public.ice_servers,
            public.turn_secret.clone(),
            public.turn_ttl_secs,
        )?;
        let mut swarm = p2p::build_swarm(
            keypair,
            certificate,
            config.gossip_fanout,
            tls.as_ref(),
            config.connections_per_ip,
            (!config.open_circuit_relay).then(|| runs.clone()),
        )
        .await?;
        let ip = ip_protocol(config.http.ip());
        let tcp = Multiaddr::empty()
            .with(ip.clone())
            .with(Protocol::Tcp(config.tcp_port));
        let mut ws = Multiaddr::empty()
            .with(ip.clone())
            .with(Protocol::Tcp(config.ws_port));
        if tls.is_some() {
            ws.push(Protocol::Tls);
        }
        ws.push(Protocol::Ws("/".into()));
        let webrtc = Multiaddr::empty()
            .with(ip)
            .with(Protocol::Udp(config.webrtc_port))
            .with(Protocol::WebRTCDirect);
        let bound = p2p::listen(&mut swarm, &[tcp, ws, webrtc]).await?;
        let interfaces = if config.http.ip().is_unspecified() {
            public::interface_ips()
        } else {
            Vec::new()
        };
        let addresses = public::Addresses::new(
            peer_id,
            config.http.ip(),
            &bound,
            &external,
            &public::resolve(&external).await,
            &interfaces,
        );
        // The relay is reachable where it advertises: the circuit relay server only serves
        // reservations once it has a confirmed external address, and identify tells peers.
        for addr in addresses.external() {
            swarm.add_external_address(addr);
        }
        for (transport, addr, loopback) in addresses.describe() {
            tracing::info!(%transport, %addr, loopback, "advertised address");
        }
        let bootstrap = Bootstrap {
            peer_id: peer_id.to_string(),
            run_id: coordinator.spec().run_id.clone(),
            runs: runs.ids(),
            addresses: addresses.all(),
            time_ms: 0,
            admission: runs
                .iter()
                .map(|run| (run.spec().run_id.clone(), run.admission_terms()))
                .collect(),
            ice_servers: Vec::new(),
            federation: Vec::new(),
        };

        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = http::AppState {
            runs: runs.clone(),
            bootstrap: Arc::new(bootstrap.clone()),
            network: network.clone(),
            federation: federation.clone(),
            public: Arc::new(http::Public {
                addresses,
                ice,
                trusted_proxies: public.trusted_proxies.clone(),
                allow_origins: public.allow_origins.clone(),
                open_circuit_relay: config.open_circuit_relay,
            }),
        };
        let router = http::app(state, config.web_dir.clone())?;
        let mut http_shutdown = shutdown_rx.clone();
        let stopped = async move {
            let _ = http_shutdown.changed().await;
        };
        let serve = match &tls {
            None => tokio::spawn(async move {
                let app = router.into_make_service_with_connect_info::<tls::Client>();
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }),
            Some(certified) => {
                let listener = tls::TlsListener::new(listener, tls::server_config(certified)?)?;
                tokio::spawn(async move {
                    let app = router.into_make_service_with_connect_info::<tls::Client>();
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stopped)
                        .await
                })
            }
        };
        let mut tasks = vec![tokio::spawn(async move {
            match serve.await {
                Ok(Err(e)) => tracing::error!(error = %e, "HTTP server failed"),
                Err(e) => tracing::error!(error = %e, "HTTP server task failed"),
                Ok(Ok(())) => {}
            }
        })];
        tasks.push(tokio::spawn(p2p::run(
            swarm,
            runs.clone(),
            announcements,
            network,
            p2p::NodeLimits {
                fanout: config.gossip_fanout,
                reassembly_budget: config.reassembly_budget,
            },
            strike_rx,
            shutdown_rx.clone(),
        )));
        // An edge follows its root's rounds, one task per run.
        if let Some(root) = &config.upstream {
            for run in runs.iter() {
                let (run, root, shutdown) = (run.clone(), root.clone(), shutdown_rx.clone());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = federation::follow(run, root, shutdown).await {
                        tracing::error!(error = %e, "this edge relay cannot follow its root");
                    }
                }));
            }
            tasks.push(tokio::spawn(federation::report(
                coordinator.clone(),
                federation.clone(),
                shutdown_rx.clone(),
            )));
        }
        // The round timer: closes due rounds (every 100 ms, and at once when an accepted update
        // may have completed a quorum). Closes run here, never in a peer's request.
        let timer = runs.clone();
        let mut timer_shutdown = shutdown_rx;
        tasks.push(tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = timer_shutdown.changed() => return,
                    _ = interval.tick() => {}
                    _ = due.notified() => {}
                }
                for run in timer.iter() {
                    run.tick().await;
                }
            }
        }));
        tracing::info!(%http_addr, %peer_id, tls = tls.is_some(), "relay started");
        Ok(Self {
            http_addr,
            https: tls.is_some(),
            bootstrap,
            coordinator,
            runs,
            shutdown,
            tasks,
        })
    }

    /// The relay's URL on its bound address (`https` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/", self.http_addr)
    }

    /// Stops accepting work and waits for the tasks to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

#[cfg(all(test, unix))]
mod data_dir_tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn the_data_directory_is_made_private_and_a_readable_key_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let fresh = root.path().join("new/data");
        secure_data_dir(&fresh).expect("created");
        assert_eq!(mode(&fresh), 0o700);
        let open = root.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        secure_data_dir(&open).expect("tightened");
        assert_eq!(mode(&open), 0o700);
        // Files created from now on are the relay's user's alone.
        std::fs::write(open.join("state"), b"x").expect("write");
        assert_eq!(mode(&open.join("state")), 0o600);
        let key = open.join("relay.key");
        std::fs::write(&key, b"secret").expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let refused = secure_data_dir(&open).expect_err("a group-readable key");
        assert!(refused.to_string().contains("chmod 600"), "{refused}");
    }
}
