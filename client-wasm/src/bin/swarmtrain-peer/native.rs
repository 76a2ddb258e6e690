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

async fn train(args: Train) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use swarmtrain_client::peer::{self, PeerConfig};

    let stop = Arc::new(AtomicBool::new(false));
    let config = PeerConfig {
        relay_url: args.relay,
        run_id: args.run,
        transport: None,
        identity_seed: swarmtrain_net::keyfile::load_or_create(&args.key_file)?,
        backend: "ndarray".into(),
        max_rounds: args.rounds,
        sample_len: 0,
        stop: stop.clone(),
        max_retries: None,
        direct_peers: 0,
        pause: Default::default(),
        ice_servers: Vec::new(),
    };
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
        Command::Loadtest(args) => loadtest(args).await,
        Command::Soak(args) => soak(args).await,
    }
}
