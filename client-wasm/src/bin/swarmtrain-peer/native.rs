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

#[derive(Parser, Debug)]
struct Train {
    /// The relay's HTTP URL.
    #[arg(
        long,
        env = "SWARMTRAIN_RELAY",
        default_value = "http://127.0.0.1:8080/"
    )]
    relay: String,
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
    /// The run to join (default: the relay's default run).
    #[arg(long, env = "SWARMTRAIN_RUN")]
    run: Option<String>,
}

#[derive(Parser, Debug)]
struct Verify {
    /// The relay's HTTP URL.
    #[arg(
        long,
        env = "SWARMTRAIN_RELAY",
        default_value = "http://127.0.0.1:8080/"
    )]
    relay: String,
    /// File holding this verifier's identity seed (hex; created with mode 0600 if missing). A
    /// verifier is never given its own updates to replay, so use another identity than your
    /// training peer's only if you mean to.
    #[arg(
        long,
        env = "SWARMTRAIN_KEY_FILE",
        default_value = "swarmtrain-data/verifier.key"
    )]
    key_file: PathBuf,
    /// Stop after this many replays (default: until SIGINT or SIGTERM).
    #[arg(long)]
    jobs: Option<u64>,
    /// The run to verify for (default: the relay's default run).
    #[arg(long, env = "SWARMTRAIN_RUN")]
    run: Option<String>,
}

/// The settings a native peer of `relay` and `run` runs with, trainer or verifier.
fn native_config(
    relay: String,
    run: Option<String>,
    key_file: &std::path::Path,
    max_rounds: Option<u64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<swarmtrain_client::PeerConfig> {
    Ok(swarmtrain_client::PeerConfig {
        relay_url: relay,
        run_id: run,
        transport: None,
        identity_seed: swarmtrain_net::keyfile::load_or_create(key_file)?,
        backend: "ndarray".into(),
        max_rounds,
        sample_len: 0,
        stop,
        max_retries: None,
        direct_peers: 0,
        pause: Default::default(),
        ice_servers: Vec::new(),
    })
}

async fn verify(args: Verify) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let stop = Arc::new(AtomicBool::new(false));
    let config = native_config(
        args.relay,
        args.run,
        &args.key_file,
        args.jobs,
        stop.clone(),
    )?;
    let run = swarmtrain_client::verifier::verify::<Autodiff<NdArray>>(
        Default::default(),
        config,
        |event| tracing::info!(?event, "verifier"),
    );
    tokio::pin!(run);
    let jobs = tokio::select! {
        result = &mut run => result?,
        _ = swarmtrain_net::signal::shutdown() => {
            stop.store(true, Ordering::Relaxed);
            run.await?
        }
    };
    println!("replayed {jobs} updates");
    Ok(())
}

async fn train(args: Train) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use swarmtrain_client::peer;

    let stop = Arc::new(AtomicBool::new(false));
    let config = native_config(
        args.relay,
        args.run,
        &args.key_file,
        args.rounds,
        stop.clone(),
    )?;
    let run = peer::run::<Autodiff<NdArray>>(Default::default(), config, |event| {
        tracing::info!(?event, "peer");
    });
    tokio::pin!(run);
    let rounds = tokio::select! {
        result = &mut run => result?,
        _ = swarmtrain_net::signal::shutdown() => {
            stop.store(true, Ordering::Relaxed);
            run.await?
        }
    };
    println!("trained {rounds} rounds");
    Ok(())
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
