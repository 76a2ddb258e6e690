//! `swarmtrain-relay`: the operator's binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use swarmtrain_relay::{AggregationBackend, Relay, RelayConfig, default_run};
use swarmtrain_shared::protocol::Codec;
use swarmtrain_shared::robust::Rule;

#[derive(Parser, Debug)]
#[command(name = "swarmtrain-relay", version, about = "Serves the swarmtrain page, coordinates training rounds and aggregates updates")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the page and the default run (digits MLP) until SIGINT or SIGTERM.
    Serve(Serve),
    /// Create a new identity key file (refuses to overwrite one) and print its peer key.
    Keygen(Keygen),
    /// Print a running relay's status: run, round, accuracy, peers, rejections.
    Status(StatusArgs),
    /// Download a relay's current global parameters as a safetensors checkpoint.
    Export(Export),
    /// Join a relay as a native training peer (ndarray CPU backend), with the browser's code.
    Worker(Worker),
    /// Simulate N peers training the language model in this process (DiLoCo or data-parallel),
    /// with the real shared code, counting every byte; prints the loss curve, writes JSON.
    Simulate(Simulate),
    /// Load-test a running relay: connect many simulated peers over TCP, keep them waiting for
    /// rounds, close rounds with synthetic updates, and report announcement latencies as JSON.
    Loadtest(Loadtest),
    /// Run the Byzantine attack grid on the digits: every standard attack × every aggregation
    /// rule × attacker fraction, with simulated peers and the shared code; writes a Markdown table.
    AttackGrid(AttackGrid),
}

#[derive(Parser, Debug)]
struct Loadtest {
    /// The relay's HTTP URL (it must run with --quorum equal to --senders).
    #[arg(long, default_value = "http://127.0.0.1:8080/")]
    relay: String,
    /// Simulated peers kept connected.
    #[arg(long, default_value_t = 1000)]
    peers: u32,
    /// Rounds to close.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Peers that send an update each round (the relay's quorum).
    #[arg(long, default_value_t = 20)]
    senders: u32,
    /// Give up on a round after this many seconds.
    #[arg(long, default_value_t = 60)]
    round_timeout_secs: u64,
}

async fn loadtest(args: Loadtest) -> anyhow::Result<()> {
    use futures::StreamExt;
    use std::time::{Duration, Instant};
    use swarmtrain_client::rpc::RelayClient;
    use swarmtrain_shared::protocol::{Capabilities, ClientToRelay, Join, PROTOCOL_VERSION, RelayToClient, RoundAnnouncement, Update};
    use swarmtrain_shared::{Identity, PeerKey};

    anyhow::ensure!(args.senders >= 1 && args.senders <= args.peers, "--senders must be in 1..=--peers");
    let boot: swarmtrain_client::peer::Bootstrap = serde_json::from_slice(
        &swarmtrain_client::platform::http_get(&format!("{}/api/bootstrap", args.relay.trim_end_matches('/')))
            .await
            .map_err(anyhow::Error::msg)?,
    )?;
    let address: libp2p::Multiaddr = boot.addresses.get("tcp").and_then(|a| a.first()).context_str("the relay has no TCP address")?.parse()?;
    let run_id = boot.run_id.clone();
    let started = Instant::now();
    // Connect and join, 64 at a time.
    type Joined = (RelayClient, std::sync::Arc<Identity>, PeerKey, RoundAnnouncement);
    let joined: Vec<anyhow::Result<Joined>> = futures::stream::iter(0..args.peers)
        .map(|i| {
            let (address, run_id) = (address.clone(), run_id.clone());
            async move {
                let client = RelayClient::connect(address)?;
                let mut seed = [7u8; 32];
                seed[..4].copy_from_slice(&i.to_le_bytes());
                let identity = Identity::from_seed(seed);
                let join = ClientToRelay::Join(Join {
                    version: PROTOCOL_VERSION,
                    run_id,
                    capabilities: Capabilities { backend: "none".into(), platform: "loadtest".into() },
                });
                match client.request(&identity.sign(&join)?).await? {
                    RelayToClient::Welcome(w) => {
                        let relay_key = PeerKey::from_public_key(&w.relay_key);
                        let round = w.round.verify_from(&relay_key)?;
                        Ok((client, std::sync::Arc::new(identity), relay_key, round))
                    }
                    other => anyhow::bail!("expected a welcome, got {other:?}"),
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let peers: Vec<_> = joined.into_iter().collect::<anyhow::Result<_>>()?;
    let connect_s = started.elapsed().as_secs_f64();
    eprintln!("{} peers joined in {connect_s:.1} s", peers.len());

    // Every peer long-polls for the next round and reports when it sees it.
    let (seen_tx, mut seen_rx) = futures::channel::mpsc::channel::<(u64, Instant)>(4096);
    let first_round = peers.iter().map(|p| p.3.round).max().unwrap_or(0);
    let last_round = first_round + u64::from(args.rounds);
    for (client, identity, relay_key, round) in &peers {
        let (client, identity, relay_key, run_id, mut seen) = (client.clone(), identity.clone(), *relay_key, run_id.clone(), seen_tx.clone());
        let mut current = round.round;
        tokio::spawn(async move {
            while current < last_round {
                let ask = ClientToRelay::AwaitRound { run_id: run_id.clone(), after: Some(current) };
                let Ok(signed) = identity.sign(&ask) else { return };
                match client.request(&signed).await {
                    Ok(RelayToClient::Round(r)) => match r.verify_from(&relay_key) {
                        Ok(r) if r.round > current => {
                            current = r.round;
                            let _ = futures::SinkExt::send(&mut seen, (current, Instant::now())).await;
                        }
                        _ => {}
                    },
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
    drop(seen_tx);

    let mut latencies_ms = Vec::new();
    let mut completed = 0u32;
    let mut announcement = peers[0].3.clone();
    for _ in 0..args.rounds {
        // Quorum − 1 updates, then the one that closes the round: its send time is the close.
        let update = |r: &RoundAnnouncement| ClientToRelay::Update(Update {
            run_id: run_id.clone(),
            round: r.round,
            base: r.params,
            n_samples: 1,
            inner_steps: 1,
            loss: 1.0,
            codec: swarmtrain_shared::protocol::Codec::F32,
            payload: swarmtrain_shared::protocol::Codec::F32.encode(&vec![1e-4; r.n_params as usize]),
        });
        let senders = &peers[..args.senders as usize];
        for (client, identity, _, _) in &senders[..senders.len() - 1] {
            let answer = client.request(&identity.sign(&update(&announcement))?).await?;
            anyhow::ensure!(matches!(answer, RelayToClient::Accepted { .. }), "update refused: {answer:?}");
        }
        let (client, identity, relay_key, _) = &senders[senders.len() - 1];
        let closing = identity.sign(&update(&announcement))?;
        let closed_at = Instant::now();
        let answer = client.request(&closing).await?;
        anyhow::ensure!(matches!(answer, RelayToClient::Accepted { .. }), "update refused: {answer:?}");
        let next = announcement.round + 1;
        let deadline = closed_at + Duration::from_secs(args.round_timeout_secs);
        let mut received = 0;
        while received < peers.len() {
            let Ok(Some((round, at))) = tokio::time::timeout_at(deadline.into(), seen_rx.next()).await else { break };
            if round == next {
                received += 1;
                latencies_ms.push(at.saturating_duration_since(closed_at).as_secs_f64() * 1e3);
            }
        }
        eprintln!("round {} closed; {received} of {} peers saw round {next}", announcement.round, peers.len());
        if received < peers.len() {
            anyhow::bail!("only {received} of {} peers saw round {next} within {} s", peers.len(), args.round_timeout_secs);
        }
        completed += 1;
        let ask = ClientToRelay::AwaitRound { run_id: run_id.clone(), after: None };
        announcement = match client.request(&identity.sign(&ask)?).await? {
            RelayToClient::Round(r) => r.verify_from(relay_key)?,
            other => anyhow::bail!("expected the round, got {other:?}"),
        };
    }
    latencies_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies_ms.get(((latencies_ms.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({
            "peers": peers.len(),
            "rounds_completed": completed,
            "connect_seconds": connect_s,
            "latency_ms_p50": pct(0.5),
            "latency_ms_p99": pct(0.99),
            "latency_ms_max": latencies_ms.last().copied().unwrap_or(f64::NAN),
            "announcements_received": latencies_ms.len(),
        })
    );
    Ok(())
}

/// `Option::context` for a message without pulling `anyhow::Context` into every function.
trait ContextStr<T> {
    fn context_str(self, message: &str) -> anyhow::Result<T>;
}

impl<T> ContextStr<T> for Option<T> {
    fn context_str(self, message: &str) -> anyhow::Result<T> {
        self.ok_or_else(|| anyhow::anyhow!("{message}"))
    }
}

#[derive(Parser, Debug)]
struct AttackGrid {
    /// Simulated peers per round.
    #[arg(long, default_value_t = 20)]
    peers: u32,
    /// Rounds per run.
    #[arg(long, default_value_t = 8)]
    rounds: u32,
    /// Inner AdamW steps per round.
    #[arg(long, default_value_t = 20)]
    inner_steps: u32,
    /// Attacker fractions in percent.
    #[arg(long, value_delimiter = ',', default_value = "0,10,20,30")]
    percent: Vec<u32>,
    /// Radius of centered clipping.
    #[arg(long, default_value_t = 0.5)]
    clip_radius: f32,
    /// Threads running cells side by side (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the Markdown report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn attack_grid(args: AttackGrid) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};
    use burn::tensor::backend::Backend;
    use swarmtrain_shared::attack::{Attack, AttackRun, run_attack};
    use swarmtrain_shared::model::DigitsMlpConfig;
    use swarmtrain_shared::protocol::{InnerSpec, OuterSpec};

    anyhow::ensure!(args.peers >= 4, "--peers must be at least 4");
    anyhow::ensure!(args.percent.iter().all(|p| *p < 50), "--percent values must be below 50");
    let data = swarmtrain_relay::dataset::digits("attack-grid", args.peers as usize)?;
    let model = DigitsMlpConfig::new();
    let device = Default::default();
    <NdArray as Backend>::seed(&device, 7);
    let theta0 = futures::executor::block_on(swarmtrain_shared::params::to_vec(&model.init::<NdArray>(&device)))?;
    // Every robust rule is configured for the largest attacker share of the grid.
    let f = args.peers * args.percent.iter().copied().max().unwrap_or(0) / 100;
    let rules = [
        ("mean", Rule::Mean),
        ("median", Rule::Median),
        ("trimmed mean", Rule::TrimmedMean { trim: f.max(1) }),
        ("multi-Krum", Rule::MultiKrum { byzantine: f, select: args.peers - 2 * f }),
        ("geometric median", Rule::GeometricMedian { iterations: 8 }),
        ("centered clipping", Rule::CenteredClipping { tau: args.clip_radius, iterations: 3 }),
    ];
    let mut cells = Vec::new();
    for (rule_name, rule) in &rules {
        cells.push((*rule_name, rule.clone(), 0u32, None));
        for &percent in args.percent.iter().filter(|p| **p > 0) {
            for attack in Attack::standard() {
                cells.push((*rule_name, rule.clone(), percent, Some(attack)));
            }
        }
    }
    let inner = InnerSpec { steps: args.inner_steps, batch_size: 32, lr: 3e-3, weight_decay: 0.0 };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let started = std::time::Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((rule_name, rule, percent, attack)) = cells.get(i) else { break };
                let run = AttackRun {
                    model: model.clone(),
                    peers: args.peers,
                    attackers: args.peers * percent / 100,
                    attack: *attack,
                    rule: rule.clone(),
                    rounds: args.rounds,
                    inner: inner.clone(),
                    outer: OuterSpec::default(),
                    seed: 1,
                };
                let outcome = futures::executor::block_on(run_attack::<Autodiff<NdArray>>(
                    &Default::default(),
                    &data.shards,
                    &data.held_out,
                    &theta0,
                    &run,
                ));
                let accuracy = match &outcome {
                    Ok(curve) => curve.last().copied().unwrap_or(f32::NAN),
                    Err(e) => {
                        eprintln!("{rule_name} {percent}% {attack:?}: {e}");
                        f32::NAN
                    }
                };
                eprintln!(
                    "[{:>4.0} s] {rule_name:<17} {percent:>2}% {:<16} accuracy {:.1}%",
                    started.elapsed().as_secs_f64(),
                    attack.map_or("none", |a| a.name()),
                    100.0 * accuracy
                );
                results.lock().unwrap_or_else(|e| e.into_inner()).push((i, accuracy));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    let accuracy = |rule: &str, percent: u32, attack: Option<Attack>| {
        results
            .iter()
            .find(|(i, _)| cells[*i].0 == rule && cells[*i].2 == percent && cells[*i].3 == attack)
            .map_or(f32::NAN, |(_, a)| *a)
    };
    let attacks = Attack::standard();
    let mut table = String::from("| aggregator | attackers | no attack |");
    for a in &attacks {
        table.push_str(&format!(" {} |", a.name()));
    }
    table.push_str("\n| --- | --: | --: |");
    table.push_str(&" --: |".repeat(attacks.len()));
    table.push('\n');
    for (rule_name, _) in &rules {
        let honest = accuracy(rule_name, 0, None);
        for &percent in args.percent.iter().filter(|p| **p > 0) {
            table.push_str(&format!("| {rule_name} | {percent}% | {:.1} |", 100.0 * honest));
            for a in &attacks {
                table.push_str(&format!(" {:.1} |", 100.0 * accuracy(rule_name, percent, Some(*a))));
            }
            table.push('\n');
        }
    }
    // The acceptance: with the largest share, the best robust rule per attack vs the honest run.
    let top = args.percent.iter().copied().max().unwrap_or(0);
    let honest_best = rules.iter().map(|(r, _)| accuracy(r, 0, None)).fold(f32::MIN, f32::max);
    let mut summary = String::new();
    for a in &attacks {
        let (best_rule, best) = rules[1..]
            .iter()
            .map(|(r, _)| (*r, accuracy(r, top, Some(*a))))
            .fold(("", f32::MIN), |acc, x| if x.1 > acc.1 { x } else { acc });
        summary.push_str(&format!(
            "- {}: best robust rule {best_rule} {:.1}% ({:+.1} points vs the best honest run, {:.1}%); plain mean {:.1}%.\n",
            a.name(),
            100.0 * best,
            100.0 * (best - honest_best),
            100.0 * honest_best,
            100.0 * accuracy("mean", top, Some(*a)),
        ));
    }
    let report = format!(
        "# Byzantine attack grid on the digits\n\n\
         Produced by `swarmtrain-relay attack-grid` (run by `cargo xtask bench robust`) in {:.0} s: \
         {} simulated peers, {} rounds of {} AdamW steps (batch 32), outer Nesterov lr 0.7 / \
         momentum 0.9, the shared digits MLP, shards and aggregation rules. Held-out accuracy (%) \
         after the last round; every rule is configured for {f} attackers (trim {}, Krum f = {f}, \
         centered clipping τ = {}). NaN/Inf and replayed updates are dropped by the relay's checks \
         before aggregation, as `tests/bad_input.rs` shows the real relay does.\n\n{table}\n\
         ## With {top}% attackers\n\n{summary}",
        started.elapsed().as_secs_f64(),
        args.peers,
        args.rounds,
        args.inner_steps,
        f.max(1),
        args.clip_radius,
    );
    println!("{report}");
    if let Some(out) = args.out {
        std::fs::write(&out, &report).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SyncArg {
    /// DiLoCo: --inner-steps local steps, then an outer step on the averaged pseudo-gradients.
    Diloco,
    /// FedAvg: DiLoCo's schedule with plain averaging (outer lr 1, no momentum).
    Fedavg,
    /// The data-parallel baseline: gradients averaged after every step.
    DataParallel,
}

#[derive(Parser, Debug)]
struct Simulate {
    /// A UTF-8 text file, or a folder of them.
    #[arg(long, env = "SWARMTRAIN_CORPUS", default_value = swarmtrain_relay::corpus::DEFAULT_CORPUS)]
    corpus: PathBuf,
    /// Simulated peers (replicas).
    #[arg(long, default_value_t = 8)]
    peers: u32,
    /// Inner steps per peer over the whole run.
    #[arg(long, default_value_t = 1000)]
    steps: u32,
    /// Windows of --context + 1 bytes per step per peer.
    #[arg(long, default_value_t = 8)]
    batch: u32,
    #[arg(long, value_enum, default_value_t = SyncArg::Diloco)]
    sync: SyncArg,
    /// H: inner steps between syncs (DiLoCo and FedAvg).
    #[arg(long, default_value_t = 100)]
    inner_steps: u32,
    /// Outer learning rate (DiLoCo).
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    /// Outer Nesterov momentum (DiLoCo).
    #[arg(long, default_value_t = 0.9)]
    outer_momentum: f32,
    /// How pseudo-gradients are encoded.
    #[arg(long, value_enum, default_value_t = CodecArg::F32)]
    codec: CodecArg,
    /// With --codec topk: values kept per million.
    #[arg(long, default_value_t = 20_000)]
    topk_per_million: u32,
    /// Context length in bytes.
    #[arg(long, default_value_t = 64)]
    context: usize,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Peak inner AdamW learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Warm-up steps of the inner schedule (then cosine to 10% at --steps).
    #[arg(long, default_value_t = 50)]
    warmup: u64,
    /// Seed of θ₀ and of the data order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Steps of one replica that make the shared starting point (as DiLoCo starts from a
    /// pretrained model); not counted in tokens or bytes.
    #[arg(long, default_value_t = 0)]
    pretrain_steps: u32,
    /// Measure validation loss every this many steps (at syncs for DiLoCo).
    #[arg(long, default_value_t = 50)]
    eval_every: u32,
    /// Validation windows.
    #[arg(long, default_value_t = 256)]
    eval_windows: u32,
    /// Write the report (config, curve, bytes, BLAKE3 of the final parameters) here as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the final global parameters here (little-endian f32, the wire's flat order).
    #[arg(long)]
    params_out: Option<PathBuf>,
}

fn simulate(args: Simulate) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};
    use swarmtrain_shared::lm::LmConfig;
    use swarmtrain_shared::lm_train::{LmInnerSpec, LrSchedule};
    use swarmtrain_shared::protocol::OuterSpec;
    use swarmtrain_shared::sim::{self, SimConfig, Sync};
    use swarmtrain_shared::text::TextCorpus;

    anyhow::ensure!((1..=1_000_000).contains(&args.topk_per_million), "--topk-per-million must be in 1..=1000000");
    let model = LmConfig::new()
        .with_context(args.context)
        .with_d_model(args.d_model)
        .with_layers(args.layers)
        .with_heads(args.heads);
    model.validate().map_err(|e| anyhow::anyhow!("bad model shape: {e}"))?;
    let loaded = swarmtrain_relay::corpus::load(&args.corpus)?;
    let corpus = TextCorpus::new(&loaded.text, args.context + 1, args.seed)?;
    eprintln!(
        "corpus: {} bytes from {} files ({} skipped as not text); {} train, {} validation",
        loaded.text.len(),
        loaded.files.len(),
        loaded.skipped.len(),
        corpus.train().len(),
        corpus.validation().len()
    );
    let sync = match args.sync {
        SyncArg::Diloco => Sync::DiLoCo {
            inner_steps: args.inner_steps,
            outer: OuterSpec { lr: args.outer_lr, momentum: args.outer_momentum },
        },
        SyncArg::Fedavg => Sync::DiLoCo { inner_steps: args.inner_steps, outer: OuterSpec { lr: 1.0, momentum: 0.0 } },
        SyncArg::DataParallel => Sync::DataParallel,
    };
    let config = SimConfig {
        model,
        peers: args.peers,
        steps: args.steps,
        batch: args.batch,
        sync,
        codec: args.codec.codec(args.topk_per_million),
        aggregator: Rule::Mean,
        inner: LmInnerSpec::new(LrSchedule { peak: args.lr, warmup: args.warmup, total: u64::from(args.steps), min_ratio: 0.1 }),
        seed: args.seed,
        pretrain_steps: args.pretrain_steps,
        eval_every: args.eval_every,
        eval_windows: args.eval_windows,
    };
    let started = std::time::Instant::now();
    let report = futures::executor::block_on(sim::simulate::<Autodiff<NdArray>>(&Default::default(), &corpus, &config, |p| {
        eprintln!(
            "step {:>5}  tokens {:>10}  bytes {:>13}  val loss {:.4}  ({:.0} s)",
            p.step,
            p.tokens,
            p.bytes,
            p.val_loss,
            started.elapsed().as_secs_f64()
        );
    }))?;
    let wall = started.elapsed().as_secs_f64();
    let params_bytes: Vec<u8> = report.params.iter().flat_map(|v| v.to_le_bytes()).collect();
    let params_blake3 = blake3::hash(&params_bytes).to_hex().to_string();
    println!(
        "final val loss {:.4} after {} tokens, {} bytes in {} syncs, {} parameters, θ BLAKE3 {}, {:.0} s",
        report.final_val_loss, report.tokens, report.bytes, report.syncs, report.num_params, &params_blake3[..16], wall
    );
    if let Some(path) = &args.params_out {
        std::fs::write(path, &params_bytes).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(out) = args.out {
        let json = serde_json::json!({
            "config": config,
            "points": report.points,
            "syncs": report.syncs,
            "tokens": report.tokens,
            "bytes": report.bytes,
            "final_val_loss": report.final_val_loss,
            "num_params": report.num_params,
            "params_blake3": params_blake3,
            "wall_seconds": wall,
        });
        std::fs::write(&out, serde_json::to_vec_pretty(&json)?).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}

#[derive(Parser, Debug)]
struct Keygen {
    /// Where to write the key (hex seed, mode 0600).
    #[arg(long, env = "SWARMTRAIN_KEY_FILE", default_value = "swarmtrain-data/worker.key")]
    key_file: PathBuf,
}

#[derive(Parser, Debug)]
struct StatusArgs {
    /// The relay's HTTP URL.
    #[arg(long, env = "SWARMTRAIN_RELAY", default_value = "http://127.0.0.1:8080/")]
    relay: String,
    /// Print the whole /api/status JSON instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Debug)]
struct Export {
    /// The relay's HTTP URL.
    #[arg(long, env = "SWARMTRAIN_RELAY", default_value = "http://127.0.0.1:8080/")]
    relay: String,
    /// The safetensors file to write (replaced atomically).
    #[arg(long, default_value = "swarmtrain.safetensors")]
    out: PathBuf,
}

fn keygen(args: Keygen) -> anyhow::Result<()> {
    anyhow::ensure!(!args.key_file.exists(), "{} exists; refusing to overwrite an identity", args.key_file.display());
    let seed = swarmtrain_relay::load_or_create_key(&args.key_file)?;
    let identity = swarmtrain_shared::Identity::from_seed(seed);
    println!("wrote {}", args.key_file.display());
    println!("peer key {}", identity.peer());
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let status = swarmtrain_relay::ops::status(&args.relay).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let get = |k: &str| status.get(k).cloned().unwrap_or_default();
    let last = get("history").as_array().and_then(|h| h.last().cloned()).unwrap_or_default();
    println!("run        {}", get("run_id").as_str().unwrap_or("?"));
    println!("round      {}", get("round"));
    println!("params     {} values, BLAKE3 {}", get("n_params"), get("params_hash").as_str().unwrap_or("?"));
    println!("accuracy   {}", last.get("accuracy").map_or("—".into(), |a| format!("{:.1}%", a.as_f64().unwrap_or(0.0) * 100.0)));
    println!("peers      {} active, {} joined", get("active_peers"), get("joined_peers"));
    println!("updates    {} accepted, this round {}", get("accepted_updates"), get("updates_this_round"));
    println!("rejected   {}", get("rejected"));
    if let Some(eps) = get("privacy_epsilon").as_f64() {
        println!("privacy    ε = {eps:.3}");
    }
    Ok(())
}

async fn export(args: Export) -> anyhow::Result<()> {
    let (file, status) = swarmtrain_relay::ops::export(&args.relay).await?;
    let tmp = args.out.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &file).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.out.display()))?;
    println!("wrote {} ({} bytes): run {}, round {}", args.out.display(), file.len(), status["run_id"], status["round"]);
    Ok(())
}

#[derive(Parser, Debug)]
struct Worker {
    /// The relay's HTTP URL.
    #[arg(long, env = "SWARMTRAIN_RELAY", default_value = "http://127.0.0.1:8080/")]
    relay: String,
    /// File holding this worker's identity seed (hex; created with mode 0600 if missing).
    #[arg(long, env = "SWARMTRAIN_KEY_FILE", default_value = "swarmtrain-data/worker.key")]
    key_file: PathBuf,
    /// Stop after this many rounds (default: until SIGINT or SIGTERM).
    #[arg(long)]
    rounds: Option<u64>,
}

async fn worker(args: Worker) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use burn::backend::{Autodiff, NdArray};
    use swarmtrain_client::peer::{self, PeerConfig};

    let stop = Arc::new(AtomicBool::new(false));
    let config = PeerConfig {
        relay_url: args.relay,
        identity_seed: swarmtrain_relay::load_or_create_key(&args.key_file)?,
        backend: "ndarray".into(),
        max_rounds: args.rounds,
        stop: stop.clone(),
    };
    let run = peer::run::<Autodiff<NdArray>>(Default::default(), config, |event| {
        tracing::info!(?event, "worker");
    });
    tokio::pin!(run);
    let rounds = tokio::select! {
        result = &mut run => result?,
        _ = shutdown_signal() => {
            stop.store(true, Ordering::Relaxed);
            run.await?
        }
    };
    println!("trained {rounds} rounds");
    Ok(())
}

#[derive(Parser, Debug)]
struct Serve {
    /// HTTP address for the page, data and checkpoints; its IP is used for libp2p too.
    #[arg(long, env = "SWARMTRAIN_HTTP", default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// libp2p TCP port for native peers (0 picks a free port).
    #[arg(long, env = "SWARMTRAIN_TCP_PORT", default_value_t = 0)]
    tcp_port: u16,
    /// libp2p WebSocket port for browsers (0 picks a free port).
    #[arg(long, env = "SWARMTRAIN_WS_PORT", default_value_t = 0)]
    ws_port: u16,
    /// Directory with the contributor page (index.html) and the npm package under pkg/.
    #[arg(long, env = "SWARMTRAIN_WEB_DIR", default_value = "web")]
    web_dir: PathBuf,
    /// Directory for the identity key (mode 0600), the run database and the checkpoints; a
    /// relay started again on the same directory resumes its run.
    #[arg(long, env = "SWARMTRAIN_DATA_DIR", default_value = "swarmtrain-data")]
    data_dir: PathBuf,
    /// Checkpoints kept per run in the data directory (older ones are deleted).
    #[arg(long, env = "SWARMTRAIN_KEEP_CHECKPOINTS", default_value_t = swarmtrain_relay::store::KEEP_CHECKPOINTS)]
    keep_checkpoints: usize,
    /// Local AdamW steps per round (DiLoCo's H).
    #[arg(long, env = "SWARMTRAIN_INNER_STEPS", default_value_t = default_run().inner.steps)]
    inner_steps: u32,
    /// Updates that close a round early (capped at the number of active peers).
    #[arg(long, env = "SWARMTRAIN_QUORUM", default_value_t = default_run().quorum)]
    quorum: u32,
    /// Seconds after which a round closes with the updates it has.
    #[arg(long, env = "SWARMTRAIN_ROUND_DEADLINE_SECS", default_value_t = default_run().round_deadline_ms / 1000)]
    round_deadline_secs: u64,
    /// Seed of the initial parameters.
    #[arg(long, env = "SWARMTRAIN_SEED", default_value_t = 0)]
    seed: u64,
    /// How peers encode their updates: f32, f16, int8 (blockwise, 64 per block) or topk.
    #[arg(long, env = "SWARMTRAIN_CODEC", value_enum, default_value_t = CodecArg::F32)]
    codec: CodecArg,
    /// With --codec topk: how many values per million to send (10000 = 1%).
    #[arg(long, env = "SWARMTRAIN_TOPK_PER_MILLION", default_value_t = 20_000)]
    topk_per_million: u32,
    /// Differential privacy: clip every update to this L2 norm (enables DP with --dp-noise).
    #[arg(long, env = "SWARMTRAIN_DP_CLIP")]
    dp_clip: Option<f32>,
    /// Differential privacy: noise standard deviation in units of the clip norm.
    #[arg(long, env = "SWARMTRAIN_DP_NOISE", default_value_t = 1.0, requires = "dp_clip")]
    dp_noise: f32,
    /// Differential privacy: the δ that ε is reported for.
    #[arg(long, env = "SWARMTRAIN_DP_DELTA", default_value_t = 1e-5, requires = "dp_clip")]
    dp_delta: f64,
    /// How a round's updates are combined: mean, median, trimmed-mean (drops --trim from each
    /// side), krum (multi-Krum, tolerating --byzantine attackers), geometric-median or
    /// centered-clipping (radius --clip-radius around the previous aggregate).
    #[arg(long, env = "SWARMTRAIN_AGGREGATOR", value_enum, default_value_t = AggregatorArg::Mean)]
    aggregator: AggregatorArg,
    /// With --aggregator trimmed-mean: updates dropped from each side per coordinate.
    #[arg(long, env = "SWARMTRAIN_TRIM", default_value_t = 1)]
    trim: u32,
    /// With --aggregator krum: attackers to tolerate (needs at least 2·f + 3 updates a round).
    #[arg(long, env = "SWARMTRAIN_BYZANTINE", default_value_t = 1)]
    byzantine: u32,
    /// With --aggregator centered-clipping: the clipping radius.
    #[arg(long, env = "SWARMTRAIN_CLIP_RADIUS", default_value_t = 1.0)]
    clip_radius: f32,
    /// Burn backend that aggregates updates (from those compiled in).
    #[arg(long, env = "SWARMTRAIN_AGGREGATION_BACKEND", value_enum, default_value_t = AggregationBackend::Ndarray)]
    aggregation_backend: AggregationBackend,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum AggregatorArg {
    Mean,
    Median,
    TrimmedMean,
    Krum,
    GeometricMedian,
    CenteredClipping,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CodecArg {
    F32,
    F16,
    Int8,
    Topk,
}

impl CodecArg {
    fn codec(self, per_million: u32) -> Codec {
        match self {
            Self::F32 => Codec::F32,
            Self::F16 => Codec::F16,
            Self::Int8 => Codec::Int8Block { block: 64 },
            Self::Topk => Codec::TopK { per_million },
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return ctrl_c.await.unwrap_or_default(),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or_default();
}

/// Applies `--config FILE` (or `SWARMTRAIN_CONFIG`): a TOML table whose keys are `serve`'s long
/// options (`inner_steps = 100`, `http = "0.0.0.0:8080"`, …). Precedence: command line, then
/// environment variables, then the file, then the defaults. Unknown keys are an error.
fn with_config_file(mut argv: Vec<String>) -> anyhow::Result<Vec<String>> {
    use clap::CommandFactory;
    let flag = argv.iter().position(|a| a == "--config");
    let path = match flag {
        Some(i) => {
            anyhow::ensure!(i + 1 < argv.len(), "--config needs a file");
            let path = argv.remove(i + 1);
            argv.remove(i);
            path
        }
        None => match std::env::var("SWARMTRAIN_CONFIG") {
            Ok(path) => path,
            Err(_) => return Ok(argv),
        },
    };
    let Some(serve_at) = argv.iter().position(|a| a == "serve") else {
        anyhow::bail!("--config applies to `serve`");
    };
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read config {path}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("config {path} is not valid TOML: {e}"))?;
    let command = Cli::command();
    let serve = command.find_subcommand("serve").ok_or_else(|| anyhow::anyhow!("no serve command"))?;
    let mut extra = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = serve.get_arguments().find(|a| a.get_long() == Some(long.as_str())) else {
            let known: Vec<String> = serve.get_arguments().filter_map(|a| a.get_long()).map(|l| l.replace('-', "_")).collect();
            anyhow::bail!("config {path}: unknown key {key:?}; known keys: {}", known.join(", "));
        };
        let on_command_line = argv.iter().any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
        let in_environment = arg.get_env().is_some_and(|name| std::env::var_os(name).is_some());
        if on_command_line || in_environment {
            continue;
        }
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!("config {path}: {key} must be a string, number or boolean, not a {}", other.type_str()),
        };
        extra.push(format!("--{long}={value}"));
    }
    argv.splice(serve_at + 1..serve_at + 1, extra);
    Ok(argv)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "swarmtrain_relay=info,warn".into()),
        )
        .init();
    let args = match Cli::parse_from(with_config_file(std::env::args().collect())?).command {
        Command::Serve(args) => args,
        Command::Worker(args) => return worker(args).await,
        Command::Keygen(args) => return keygen(args),
        Command::Status(args) => return status(args).await,
        Command::Export(args) => return export(args).await,
        Command::Loadtest(args) => return loadtest(args).await,
        Command::AttackGrid(args) => return tokio::task::spawn_blocking(move || attack_grid(args)).await?,
        Command::Simulate(args) => return tokio::task::spawn_blocking(move || simulate(args)).await?,
    };
    if !args.web_dir.join("index.html").is_file() {
        anyhow::bail!("{} has no index.html (run from the repository root, or pass --web-dir)", args.web_dir.display());
    }
    if !args.web_dir.join("pkg/swarmtrain.js").is_file() {
        tracing::warn!("{} has no pkg/swarmtrain.js: build it with `cargo xtask build-wasm`", args.web_dir.display());
    }
    anyhow::ensure!(args.inner_steps > 0, "--inner-steps must be at least 1");
    anyhow::ensure!(args.round_deadline_secs > 0, "--round-deadline-secs must be at least 1");
    let mut run = default_run();
    run.inner.steps = args.inner_steps;
    run.quorum = args.quorum.max(1);
    run.round_deadline_ms = args.round_deadline_secs * 1000;
    anyhow::ensure!((1..=1_000_000).contains(&args.topk_per_million), "--topk-per-million must be in 1..=1000000");
    run.codec = args.codec.codec(args.topk_per_million);
    anyhow::ensure!(args.clip_radius > 0.0 && args.clip_radius.is_finite(), "--clip-radius must be positive");
    run.aggregator = match args.aggregator {
        AggregatorArg::Mean => Rule::Mean,
        AggregatorArg::Median => Rule::Median,
        AggregatorArg::TrimmedMean => Rule::TrimmedMean { trim: args.trim },
        AggregatorArg::Krum => Rule::MultiKrum { byzantine: args.byzantine, select: 1 },
        AggregatorArg::GeometricMedian => Rule::GeometricMedian { iterations: 8 },
        AggregatorArg::CenteredClipping => Rule::CenteredClipping { tau: args.clip_radius, iterations: 3 },
    };
    if let Some(clip) = args.dp_clip {
        anyhow::ensure!(clip > 0.0 && clip.is_finite(), "--dp-clip must be a positive number");
        anyhow::ensure!(args.dp_noise >= 0.0 && args.dp_noise.is_finite(), "--dp-noise must be ≥ 0");
        anyhow::ensure!(args.dp_delta > 0.0 && args.dp_delta < 1.0, "--dp-delta must be in (0, 1)");
        run.privacy = Some(swarmtrain_shared::privacy::PrivacySpec {
            clip_norm: clip,
            noise_multiplier: args.dp_noise,
            delta: args.dp_delta,
        });
    }
    let config = RelayConfig {
        http: args.http,
        tcp_port: args.tcp_port,
        ws_port: args.ws_port,
        web_dir: args.web_dir,
        data_dir: Some(args.data_dir),
        run,
        seed: args.seed,
        aggregation: args.aggregation_backend,
        keep_checkpoints: args.keep_checkpoints,
    };
    let relay = Relay::start(config).await?;
    println!("swarmtrain relay listening on {}", relay.url());
    println!("open it in a browser and press Contribute");
    shutdown_signal().await;
    tracing::info!("shutting down");
    relay.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn config_file_fills_in_what_the_command_line_does_not_say() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "inner_steps = 7\nquorum = 2\naggregator = \"median\"\n").expect("write");
        let path = path.to_str().expect("utf-8 path");
        let out = with_config_file(argv(&["relay", "serve", "--config", path, "--quorum", "5"])).expect("config");
        let Command::Serve(serve) = Cli::parse_from(out).command else { panic!("serve") };
        assert_eq!((serve.inner_steps, serve.quorum), (7, 5), "the command line wins over the file");
        assert!(matches!(serve.aggregator, AggregatorArg::Median));

        std::fs::write(dir.path().join("bad.toml"), "inner_stepz = 7\n").expect("write");
        let bad = dir.path().join("bad.toml");
        let err = with_config_file(argv(&["relay", "serve", "--config", bad.to_str().expect("utf-8")])).unwrap_err();
        assert!(err.to_string().contains("unknown key \"inner_stepz\""), "{err}");
        std::fs::write(dir.path().join("broken.toml"), "inner_steps = \n").expect("write");
        let broken = dir.path().join("broken.toml");
        assert!(with_config_file(argv(&["relay", "serve", "--config", broken.to_str().expect("utf-8")])).is_err());
        assert!(with_config_file(argv(&["relay", "serve", "--config", "/nonexistent.toml"])).is_err());
    }
}
