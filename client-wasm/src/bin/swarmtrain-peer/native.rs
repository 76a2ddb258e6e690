//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::loadtest::{Loadtest, loadtest};
use crate::soak::{Soak, soak};

#[derive(Parser, Debug)]
#[command(
    name = "swarmtrain-peer",
    version,
    about = "Trains with a swarmtrain relay as a native volunteer, or load-tests one"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join a relay as a native training peer (ndarray CPU backend), with the browser's code,
    /// until SIGINT or SIGTERM (or --rounds).
    Train(Train),
    /// Replay other peers' drawn rounds for a relay as a volunteer verifier (ndarray CPU
    /// backend), until SIGINT or SIGTERM (or --jobs).
    Verify(Verify),
    /// Load-test a running relay: connect many simulated peers over TCP, keep them waiting for
    /// rounds, close rounds with synthetic updates, and report announcement latencies as JSON.
    Loadtest(Loadtest),
    /// Drive a relay process through many fast rounds and report round time, memory and disk.
    Soak(Soak),
}

/// Which relay and run a native peer joins.
#[derive(clap::Args, Debug)]
struct Joining {
    /// The relay's HTTP URL.
    #[arg(
        long,
        env = "SWARMTRAIN_RELAY",
        default_value = "http://127.0.0.1:8080/"
    )]
    relay: String,
    /// The run to join (default: the relay's default run).
    #[arg(long, env = "SWARMTRAIN_RUN")]
    run: Option<String>,
    /// Stay on --relay. Default: in a federation, join its nearest, least loaded relay (as the
    /// relays' /api/bootstrap lists them) and fail over to another when that one goes away.
    #[arg(long, env = "SWARMTRAIN_PIN_RELAY")]
    pin_relay: bool,
}

#[derive(Parser, Debug)]
struct Train {
    #[command(flatten)]
    joining: Joining,
    /// File holding this peer's identity seed (hex; created with mode 0600 if missing).
    #[arg(
        long,
        env = "SWARMTRAIN_KEY_FILE",
        default_value = "swarmtrain-data/worker.key"
    )]
    key_file: PathBuf,
    /// Stop after this many rounds (default: until SIGINT or SIGTERM).
    #[arg(long)]
    rounds: Option<u64>,
    /// The Burn backend that trains: ndarray (the CPU, always built in), wgpu (Vulkan, Metal or
    /// DX12; a binary built with `--features wgpu`) or cuda (an NVIDIA GPU; `--features cuda`).
    /// Reported to the relay when joining.
    #[arg(
        long,
        value_enum,
        env = "SWARMTRAIN_BACKEND",
        default_value = "ndarray"
    )]
    backend: Backend,
}

/// A training backend of the native peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Ndarray,
    Wgpu,
    Cuda,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }
}

#[derive(Parser, Debug)]
struct Verify {
    #[command(flatten)]
    joining: Joining,
    /// File holding this verifier's identity seed (hex; created with mode 0600 if missing).
    /// Keep it apart from a training peer's: an identity is joined to a run in one role at a
    /// time (and a verifier is never given its own identity's updates).
    #[arg(
        long,
        env = "SWARMTRAIN_KEY_FILE",
        default_value = "swarmtrain-data/verifier.key"
    )]
    key_file: PathBuf,
    /// Stop after this many replays (default: until SIGINT or SIGTERM).
    #[arg(long)]
    jobs: Option<u64>,
}

/// The settings a native peer joining with `joining` runs with, trainer or verifier.
fn native_config(
    joining: Joining,
    key_file: &std::path::Path,
    max_rounds: Option<u64>,
) -> anyhow::Result<swarmtrain_client::PeerConfig> {
    Ok(swarmtrain_client::PeerConfig {
        relay_url: joining.relay,
        run_id: joining.run,
        transport: None,
        identity_seed: swarmtrain_net::keyfile::load_or_create(key_file)?,
        backend: "ndarray".into(),
        max_rounds,
        sample_len: 0,
        stop: Default::default(),
        max_retries: None,
        direct_peers: 0,
        pin_relay: joining.pin_relay,
        pause: Default::default(),
        ice_servers: Vec::new(),
    })
}

async fn verify(args: Verify) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};

    let config = native_config(args.joining, &args.key_file, args.jobs)?;
    let stop = config.stop.clone();
    let run = swarmtrain_client::verifier::verify::<Autodiff<NdArray>>(
        Default::default(),
        config,
        |event| tracing::info!(?event, "verifier"),
    );
    let jobs = until_shutdown(&stop, run).await?;
    println!("replayed {jobs} updates");
    Ok(())
}

async fn train(args: Train) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};

    let mut config = native_config(args.joining, &args.key_file, args.rounds)?;
    config.backend = args.backend.name().into();
    let rounds = match args.backend {
        Backend::Ndarray => train_on::<Autodiff<NdArray>>(Default::default(), config).await?,
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => {
            let device = burn::backend::wgpu::WgpuDevice::default();
            train_on::<Autodiff<burn::backend::Wgpu>>(device, config).await?
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda => {
            let device = burn::backend::cuda::CudaDevice::default();
            train_on::<Autodiff<burn::backend::Cuda>>(device, config).await?
        }
        #[allow(unreachable_patterns)]
        other => anyhow::bail!(
            "this swarmtrain-peer was built without the {0} backend: build it with \
             `cargo build --release -p swarmtrain-client --bin swarmtrain-peer --features {0}`",
            other.name()
        ),
    };
    println!("trained {rounds} rounds");
    Ok(())
}

/// Trains with the relay `config` names on backend `B` until SIGINT or SIGTERM (or its round
/// limit): the rounds trained.
async fn train_on<B: burn::tensor::backend::AutodiffBackend>(
    device: B::Device,
    config: swarmtrain_client::PeerConfig,
) -> anyhow::Result<u64> {
    let stop = config.stop.clone();
    let run = swarmtrain_client::peer::run::<B>(device, config, |event| {
        tracing::info!(?event, "peer");
    });
    until_shutdown(&stop, run).await
}

/// Runs `work` to its end; on SIGINT or SIGTERM sets `stop` (which it watches) and still waits
/// for it to end.
async fn until_shutdown<T>(
    stop: &swarmtrain_client::Flag,
    work: impl std::future::Future<Output = Result<T, swarmtrain_client::PeerError>>,
) -> anyhow::Result<T> {
    tokio::pin!(work);
    Ok(tokio::select! {
        result = &mut work => result?,
        _ = swarmtrain_net::signal::shutdown() => {
            stop.set(true);
            work.await?
        }
    })
}

#[tokio::main]
pub async fn main() -> anyhow::Result<()> {
    // Logs go to stderr; stdout carries what the commands print (results, JSON).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "swarmtrain_client=info,warn".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Train(args) => train(args).await,
        Command::Verify(args) => verify(args).await,
        Command::Loadtest(args) => loadtest(args).await,
        Command::Soak(args) => soak(args).await,
    }
}
