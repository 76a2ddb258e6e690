//! `swarmtrain-relay`: the operator's binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod attack_grid;
mod simulate;

use attack_grid::{AttackGrid, attack_grid};
use simulate::{Simulate, simulate};
use swarmtrain_relay::{AggregationBackend, Relay, RelayConfig, default_run};
use swarmtrain_shared::protocol::Codec;
use swarmtrain_shared::robust::Rule;

#[derive(Parser, Debug)]
#[command(
    name = "swarmtrain-relay",
    version,
    about = "Serves the swarmtrain page, coordinates training rounds and aggregates updates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the page and the runs (by default the language model; more with `[[run]]` tables
    /// in --config) until SIGINT or SIGTERM.
    Serve(Serve),
    /// Create a new identity key file (refuses to overwrite one) and print its peer key.
    Keygen(Keygen),
    /// Print a running relay's status: run, round, held-out loss or accuracy, peers, rejections.
    Status(StatusArgs),
    /// Print a run's leaderboard: the peers with the most training samples in accepted updates.
    Credits(CreditsArgs),
    /// Download a relay's current global parameters as a safetensors checkpoint.
    Export(Export),
    /// Simulate N peers training the language model in this process (DiLoCo or data-parallel),
    /// with the real shared code, counting every byte; prints the loss curve, writes JSON.
    Simulate(Simulate),
    /// Run the Byzantine attack grid on the digits: every standard attack × every aggregation
    /// rule × attacker fraction, with simulated peers and the shared code; writes a Markdown table.
    AttackGrid(AttackGrid),
}

/// The `--relay` option of the commands that talk to a running relay.
#[derive(clap::Args, Debug)]
struct RelayUrl {
    /// The relay's HTTP URL.
    #[arg(
        long,
        env = "SWARMTRAIN_RELAY",
        default_value = "http://127.0.0.1:8080/"
    )]
    relay: String,
}

#[derive(Parser, Debug)]
struct Keygen {
    /// Where to write the key (hex seed, mode 0600).
    #[arg(
        long,
        env = "SWARMTRAIN_KEY_FILE",
        default_value = "swarmtrain-data/worker.key"
    )]
    key_file: PathBuf,
}

#[derive(Parser, Debug)]
struct CreditsArgs {
    #[command(flatten)]
    relay: RelayUrl,
    /// The run (default: the relay's default run).
    #[arg(long, env = "SWARMTRAIN_RUN")]
    run: Option<String>,
    /// Peers to list (the relay gives at most 100).
    #[arg(long, default_value_t = 20)]
    limit: usize,
}

async fn credits(args: CreditsArgs) -> anyhow::Result<()> {
    let (run, board) =
        swarmtrain_relay::ops::leaderboard(&args.relay.relay, args.run.as_deref(), args.limit)
            .await?;
    println!(
        "run {run}: {} peers with credit",
        board.get("peers").cloned().unwrap_or_default()
    );
    println!(
        "{:<66} {:>12} {:>8} {:>12}",
        "peer", "samples", "updates", "rounds"
    );
    for row in board
        .get("top")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
    {
        let field = |k: &str| row.get(k).cloned().unwrap_or_default();
        println!(
            "{:<66} {:>12} {:>8} {:>12}",
            field("peer").as_str().unwrap_or("?"),
            field("samples"),
            field("accepted_updates"),
            format!("{}–{}", field("first_round"), field("last_round")),
        );
    }
    Ok(())
}

#[derive(Parser, Debug)]
struct StatusArgs {
    #[command(flatten)]
    relay: RelayUrl,
    /// Print the whole /api/status JSON instead of a summary.
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Debug)]
struct Export {
    #[command(flatten)]
    relay: RelayUrl,
    /// The safetensors file to write (replaced atomically).
    #[arg(long, default_value = "swarmtrain.safetensors")]
    out: PathBuf,
}

fn keygen(args: Keygen) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.key_file.exists(),
        "{} exists; refusing to overwrite an identity",
        args.key_file.display()
    );
    let seed = swarmtrain_net::keyfile::load_or_create(&args.key_file)?;
    let identity = swarmtrain_shared::Identity::from_seed(*seed);
    println!("wrote {}", args.key_file.display());
    println!("peer key {}", identity.peer());
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let status = swarmtrain_relay::ops::status(&args.relay.relay).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let get = |k: &str| status.get(k).cloned().unwrap_or_default();
    let last = get("history")
        .as_array()
        .and_then(|h| h.last().cloned())
        .unwrap_or_default();
    println!("run        {}", get("run_id").as_str().unwrap_or("?"));
    println!("round      {}", get("round"));
    println!(
        "params     {} values, BLAKE3 {}",
        get("n_params"),
        get("params_hash").as_str().unwrap_or("?")
    );
    match last.get("val_loss").and_then(|l| l.as_f64()) {
        Some(loss) => println!(
            "held-out   {loss:.4} nats/byte ({:.3} bits/byte)",
            loss / std::f64::consts::LN_2
        ),
        None => println!(
            "accuracy   {}",
            last.get("accuracy")
                .and_then(|a| a.as_f64())
                .map_or("—".into(), |a| format!("{:.1}%", a * 100.0))
        ),
    }
    println!(
        "peers      {} active, {} joined",
        get("active_peers"),
        get("joined_peers")
    );
    println!(
        "updates    {} accepted, this round {}",
        get("accepted_updates"),
        get("updates_this_round")
    );
    println!("rejected   {}", get("rejected"));
    if let Some(eps) = get("privacy_epsilon").as_f64() {
        println!("privacy    ε = {eps:.3}");
    }
    Ok(())
}

async fn export(args: Export) -> anyhow::Result<()> {
    let (file, status) = swarmtrain_relay::ops::export(&args.relay.relay).await?;
    let tmp = args.out.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &file)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.out.display()))?;
    println!(
        "wrote {} ({} bytes): run {}, round {}",
        args.out.display(),
        file.len(),
        status["run_id"],
        status["round"]
    );
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
    /// libp2p WebRTC-direct UDP port for browsers (0 picks a free port). The certificate is
    /// kept in the data directory, so the address's certhash survives restarts.
    #[arg(long, env = "SWARMTRAIN_WEBRTC_PORT", default_value_t = 0)]
    webrtc_port: u16,
    /// Directory with the contributor page (index.html) and the npm package under pkg/.
    #[arg(long, env = "SWARMTRAIN_WEB_DIR", default_value = "web")]
    web_dir: PathBuf,
    /// Directory for the identity key (mode 0600), the run database and the checkpoints; a
    /// relay started again on the same directory resumes its run.
    #[arg(long, env = "SWARMTRAIN_DATA_DIR", default_value = "swarmtrain-data")]
    data_dir: PathBuf,
    /// Where checkpoints are written, as a URL: `s3://bucket/prefix` (relays built with the `s3`
    /// feature; credentials and endpoint from AWS_* variables) or `file:///path`. Default: the
    /// data directory's checkpoints/.
    #[arg(long, env = "SWARMTRAIN_CHECKPOINT_STORE")]
    checkpoint_store: Option<String>,
    /// Checkpoints kept per run in the data directory (older ones are deleted).
    #[arg(long, env = "SWARMTRAIN_KEEP_CHECKPOINTS", default_value_t = swarmtrain_relay::store::KEEP_CHECKPOINTS)]
    keep_checkpoints: usize,
    /// Rounds of round history kept in the data directory (the newest; default: all).
    #[arg(long, env = "SWARMTRAIN_HISTORY_RETENTION_ROUNDS")]
    history_retention_rounds: Option<u64>,
    /// Rounds of the contribution ledger kept in the data directory (the newest, and never fewer
    /// than --keep-checkpoints; default: all).
    #[arg(long, env = "SWARMTRAIN_LEDGER_RETENTION_ROUNDS")]
    ledger_retention_rounds: Option<u64>,
    /// Seed of every run's initial parameters.
    #[arg(long, env = "SWARMTRAIN_SEED", default_value_t = 0)]
    seed: u64,
    /// Send θ and take updates only on connections that agreed post-quantum session keys
    /// (every swarmtrain client does; others are refused with `not_sealed`).
    #[arg(long, env = "SWARMTRAIN_REQUIRE_SEALED", default_value_t = false, action = clap::ArgAction::Set)]
    require_sealed: bool,
    /// How many browsers with direct links to other browsers get each round announcement from
    /// the relay itself; the others receive it over their links (peers without links always
    /// get it from the relay).
    #[arg(long, env = "SWARMTRAIN_GOSSIP_FANOUT", default_value_t = swarmtrain_net::DEFAULT_GOSSIP_FANOUT as u16, value_parser = clap::value_parser!(u16).range(1..))]
    gossip_fanout: u16,
    /// The default run's options; more runs come from `[[run]]` tables in the config file.
    #[command(flatten)]
    run: RunArgs,
    /// Burn backend that aggregates updates (from those compiled in).
    #[arg(long, env = "SWARMTRAIN_AGGREGATION_BACKEND", value_enum, default_value_t = AggregationBackend::Ndarray)]
    aggregation_backend: AggregationBackend,
}

/// One run's options: on the command line for the default run, or in a `[[run]]` table.
/// Options left out take the model's defaults (`default_lm_run` or `default_run`).
#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// The model: the byte-level transformer language model (`lm`) or the digits MLP.
    #[arg(long, env = "SWARMTRAIN_MODEL", value_enum, default_value_t = ModelArg::Lm)]
    model: ModelArg,
    /// The run's name, unique on this relay (letters, digits, '-' and '_'); default: the
    /// model's name, "lm" or "digits".
    #[arg(long, env = "SWARMTRAIN_RUN_ID")]
    run_id: Option<String>,
    /// Language model: the training text, a UTF-8 file or a folder of them.
    #[arg(long, env = "SWARMTRAIN_CORPUS", default_value = swarmtrain_relay::corpus::DEFAULT_CORPUS)]
    corpus: String,
    /// Language model: context length in bytes.
    #[arg(long, env = "SWARMTRAIN_CONTEXT")]
    context: Option<u32>,
    /// Language model: embedding width.
    #[arg(long, env = "SWARMTRAIN_D_MODEL")]
    d_model: Option<u32>,
    /// Language model: attention heads (must divide --d-model).
    #[arg(long, env = "SWARMTRAIN_HEADS")]
    heads: Option<u32>,
    /// Language model: transformer blocks.
    #[arg(long, env = "SWARMTRAIN_LAYERS")]
    layers: Option<u32>,
    /// Language model: MLP width as a multiple of --d-model.
    #[arg(long, env = "SWARMTRAIN_MLP_RATIO")]
    mlp_ratio: Option<u32>,
    /// Hidden units of the digits MLP.
    #[arg(long, env = "SWARMTRAIN_HIDDEN")]
    hidden: Option<u32>,
    /// Data slots (text) or shards (digits) the training data is cut into per round.
    #[arg(long, env = "SWARMTRAIN_SHARDS")]
    shards: Option<u32>,
    /// Local AdamW steps per round (DiLoCo's H).
    #[arg(long, env = "SWARMTRAIN_INNER_STEPS")]
    inner_steps: Option<u32>,
    /// Examples (windows of text) per inner step.
    #[arg(long, env = "SWARMTRAIN_BATCH_SIZE")]
    batch_size: Option<u32>,
    /// Inner AdamW peak learning rate.
    #[arg(long, env = "SWARMTRAIN_LR")]
    lr: Option<f64>,
    /// Inner steps of linear warm-up (counted over the whole run: round · H + step).
    #[arg(long, env = "SWARMTRAIN_WARMUP_STEPS")]
    warmup_steps: Option<u64>,
    /// Inner step at which the cosine decay reaches --min-lr-ratio × the peak.
    #[arg(long, env = "SWARMTRAIN_DECAY_STEPS")]
    decay_steps: Option<u64>,
    /// The learning rate's floor as a share of the peak (1: a constant rate).
    #[arg(long, env = "SWARMTRAIN_MIN_LR_RATIO")]
    min_lr_ratio: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, env = "SWARMTRAIN_CLIP_NORM")]
    clip_norm: Option<f32>,
    /// AdamW weight decay.
    #[arg(long, env = "SWARMTRAIN_WEIGHT_DECAY")]
    weight_decay: Option<f32>,
    /// Outer Nesterov learning rate.
    #[arg(long, env = "SWARMTRAIN_OUTER_LR")]
    outer_lr: Option<f32>,
    /// Outer Nesterov momentum.
    #[arg(long, env = "SWARMTRAIN_OUTER_MOMENTUM")]
    outer_momentum: Option<f32>,
    /// Updates that close a round early (capped at the number of active peers, never below
    /// what the aggregator needs).
    #[arg(long, env = "SWARMTRAIN_QUORUM")]
    quorum: Option<u32>,
    /// Seconds after which a round closes with the updates it has.
    #[arg(long, env = "SWARMTRAIN_ROUND_DEADLINE_SECS")]
    round_deadline_secs: Option<u64>,
    /// How peers encode their updates: f32, f16, int8 / int4 / int2 (blockwise, 64 per block),
    /// topk, top-k with 4- or 2-bit values (topk4, topk2), or top-k within blocks of 256 with
    /// one-byte offsets and 4- or 2-bit values (block-topk4, block-topk2; SparseLoCo's layout).
    #[arg(long, env = "SWARMTRAIN_CODEC", value_enum, default_value_t = CodecArg::F32)]
    codec: CodecArg,
    /// With the top-k codecs: how many values per million to send (10000 = 1%).
    #[arg(long, env = "SWARMTRAIN_TOPK_PER_MILLION", default_value_t = 20_000)]
    topk_per_million: u32,
    /// Differential privacy: clip every update to this L2 norm (enables DP with --dp-noise).
    #[arg(long, env = "SWARMTRAIN_DP_CLIP")]
    dp_clip: Option<f32>,
    /// Differential privacy: noise standard deviation in units of the clip norm.
    #[arg(
        long,
        env = "SWARMTRAIN_DP_NOISE",
        default_value_t = 1.0,
        requires = "dp_clip"
    )]
    dp_noise: f32,
    /// Differential privacy: the δ that ε is reported for.
    #[arg(
        long,
        env = "SWARMTRAIN_DP_DELTA",
        default_value_t = 1e-5,
        requires = "dp_clip"
    )]
    dp_delta: f64,
    /// How a round's updates are combined: mean, median, trimmed-mean (drops --trim from each
    /// side), krum (multi-Krum: averages the --krum-select best-scored updates, tolerating
    /// --byzantine attackers), geometric-median or centered-clipping (radius --clip-radius
    /// around the previous aggregate). The quorum must be at least what the rule needs.
    #[arg(long, env = "SWARMTRAIN_AGGREGATOR", value_enum, default_value_t = AggregatorArg::Mean)]
    aggregator: AggregatorArg,
    /// With --aggregator trimmed-mean: updates dropped from each side per coordinate (needs a
    /// quorum of at least 2·trim + 1).
    #[arg(long, env = "SWARMTRAIN_TRIM", default_value_t = 1)]
    trim: u32,
    /// With --aggregator krum: attackers to tolerate (needs a quorum of at least 2·f + 3).
    #[arg(long, env = "SWARMTRAIN_BYZANTINE", default_value_t = 1)]
    byzantine: u32,
    /// With --aggregator krum: how many of the best-scored updates are averaged (1 is Krum).
    #[arg(long, env = "SWARMTRAIN_KRUM_SELECT", default_value_t = 1)]
    krum_select: u32,
    /// With --aggregator centered-clipping: the clipping radius.
    #[arg(long, env = "SWARMTRAIN_CLIP_RADIUS", default_value_t = 1.0)]
    clip_radius: f32,
    /// Who may join: anyone (open); anyone whose new identity solves a proof-of-work puzzle of
    /// --pow-bits (proof-of-work: about 2^bits hashes per identity, so minting many costs CPU);
    /// or only the peer keys listed in --allow-list (allow-list).
    #[arg(long, env = "SWARMTRAIN_ADMISSION", value_enum, default_value_t = AdmissionArg::Open)]
    admission: AdmissionArg,
    /// With --admission proof-of-work: leading zero bits asked for (at most 32; 20 takes a
    /// browser about a second).
    #[arg(long, env = "SWARMTRAIN_POW_BITS", default_value_t = 20)]
    pow_bits: u8,
    /// With --admission allow-list: a file of peer keys (64 hex digits each, one per line, as
    /// `keygen` prints them; `#` starts a comment).
    #[arg(long, env = "SWARMTRAIN_ALLOW_LIST")]
    allow_list: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum AdmissionArg {
    Open,
    ProofOfWork,
    AllowList,
}

/// The run's admission policy from its options.
fn admission(a: &RunArgs) -> anyhow::Result<swarmtrain_shared::admission::Admission> {
    use anyhow::Context as _;
    use swarmtrain_shared::admission::Admission;
    Ok(match a.admission {
        AdmissionArg::Open => Admission::Open,
        AdmissionArg::ProofOfWork => Admission::ProofOfWork { bits: a.pow_bits },
        AdmissionArg::AllowList => {
            let path = a
                .allow_list
                .as_ref()
                .context("--admission allow-list needs --allow-list FILE")?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut keys = std::collections::BTreeSet::new();
            for (i, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                let hash = blake3::Hash::from_hex(line).with_context(|| {
                    format!(
                        "{} line {}: not a 64-hex-digit peer key",
                        path.display(),
                        i + 1
                    )
                })?;
                keys.insert(swarmtrain_shared::PeerKey(*hash.as_bytes()));
            }
            Admission::AllowList { keys }
        }
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ModelArg {
    /// The byte-level transformer language model.
    Lm,
    /// The digits MLP.
    Digits,
}

/// Parses one `[[run]]` table of the config file with the same options as the command line.
#[derive(Parser, Debug)]
struct RunTable {
    #[command(flatten)]
    run: RunArgs,
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
    /// Top-k with 4-bit values.
    Topk4,
    /// Top-k with 2-bit values.
    Topk2,
    /// Blocks of 64 at 4 bits.
    Int4,
    /// Blocks of 64 at 2 bits.
    Int2,
    /// Top-k within blocks of 256, 4-bit values.
    BlockTopk4,
    /// Top-k within blocks of 256, 2-bit values.
    BlockTopk2,
}

impl CodecArg {
    fn codec(self, per_million: u32) -> Codec {
        match self {
            Self::F32 => Codec::F32,
            Self::F16 => Codec::F16,
            Self::Int8 => Codec::Int8Block { block: 64 },
            Self::Topk => Codec::TopK { per_million },
            Self::Topk4 => Codec::TopKQuant {
                per_million,
                bits: 4,
            },
            Self::Topk2 => Codec::TopKQuant {
                per_million,
                bits: 2,
            },
            Self::Int4 => Codec::LowBitBlock { block: 64, bits: 4 },
            Self::Int2 => Codec::LowBitBlock { block: 64, bits: 2 },
            Self::BlockTopk4 => Codec::TopKBlock {
                block: 256,
                keep: Self::keep_of_256(per_million),
                bits: 4,
            },
            Self::BlockTopk2 => Codec::TopKBlock {
                block: 256,
                keep: Self::keep_of_256(per_million),
                bits: 2,
            },
        }
    }

    /// Values kept per block of 256 at `per_million` (rounded, at least one).
    fn keep_of_256(per_million: u32) -> u16 {
        ((u64::from(per_million) * 256 + 500_000) / 1_000_000).clamp(1, 256) as u16
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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

/// One TOML value as a command-line option value.
fn option_value(path: &str, key: &str, value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => anyhow::bail!(
            "config {path}: {key} must be a string, number or boolean, not a {}",
            other.type_str()
        ),
    })
}

/// Checks `key` against `command`'s long options; the error lists the known keys.
fn find_option<'a>(
    path: &str,
    command: &'a clap::Command,
    key: &str,
) -> anyhow::Result<&'a clap::Arg> {
    let long = key.replace('_', "-");
    command
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))
        .ok_or_else(|| {
            let known: Vec<String> = command
                .get_arguments()
                .filter_map(|a| a.get_long())
                .map(|l| l.replace('-', "_"))
                .collect();
            anyhow::anyhow!(
                "config {path}: unknown key {key:?}; known keys: {}",
                known.join(", ")
            )
        })
}

/// Applies `--config FILE` (or `SWARMTRAIN_CONFIG`): a TOML table whose keys are `serve`'s long
/// options (`inner_steps = 100`, `http = "0.0.0.0:8080"`, …). Precedence: command line, then
/// environment variables, then the file, then the defaults. Unknown keys are an error.
///
/// Each `[[run]]` table adds a run, with the run options (`run_id`, `hidden`, `inner_steps`,
/// `codec`, `aggregator`, …); these are returned beside the new command line.
fn with_config_file(mut argv: Vec<String>) -> anyhow::Result<(Vec<String>, Vec<RunArgs>)> {
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
            Err(_) => return Ok((argv, Vec::new())),
        },
    };
    let Some(serve_at) = argv.iter().position(|a| a == "serve") else {
        anyhow::bail!("--config applies to `serve`");
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("cannot read config {path}: {e}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("config {path} is not valid TOML: {e}"))?;
    let command = Cli::command();
    let serve = command
        .find_subcommand("serve")
        .ok_or_else(|| anyhow::anyhow!("no serve command"))?;
    let run_command = RunTable::command();
    let mut extra = Vec::new();
    let mut runs = Vec::new();
    for (key, value) in &table {
        if key == "run" {
            let Some(tables) = value.as_array() else {
                anyhow::bail!("config {path}: `run` must be an array of tables ([[run]])");
            };
            for (i, run) in tables.iter().enumerate() {
                let Some(run) = run.as_table() else {
                    anyhow::bail!("config {path}: run {i} is not a table")
                };
                let mut run_argv = vec!["run".to_owned()];
                for (key, value) in run {
                    let arg = find_option(&path, &run_command, key)?;
                    run_argv.push(format!(
                        "--{}={}",
                        arg.get_long().unwrap_or(key),
                        option_value(&path, key, value)?
                    ));
                }
                let parsed = RunTable::try_parse_from(run_argv)
                    .map_err(|e| anyhow::anyhow!("config {path}: run {i}: {e}"))?;
                runs.push(parsed.run);
            }
            continue;
        }
        let arg = find_option(&path, serve, key)?;
        let long = arg.get_long().unwrap_or(key).to_owned();
        let on_command_line = argv
            .iter()
            .any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
        let in_environment = arg
            .get_env()
            .is_some_and(|name| std::env::var_os(name).is_some());
        if on_command_line || in_environment {
            continue;
        }
        extra.push(format!("--{long}={}", option_value(&path, key, value)?));
    }
    argv.splice(serve_at + 1..serve_at + 1, extra);
    Ok((argv, runs))
}

/// A run's spec from its options, checked ([`RunSpec::validate`]: a run that cannot work is
/// refused here, with the reason).
fn run_spec(a: &RunArgs) -> anyhow::Result<swarmtrain_shared::protocol::RunSpec> {
    use swarmtrain_shared::protocol::ModelSpec;
    let mut run = match a.model {
        ModelArg::Lm => swarmtrain_relay::default_lm_run(&a.corpus),
        ModelArg::Digits => default_run(),
    };
    if let Some(id) = &a.run_id {
        run.run_id = id.clone();
    }
    match &mut run.model {
        ModelSpec::ByteLm {
            context,
            d_model,
            heads,
            layers,
            mlp_ratio,
        } => {
            anyhow::ensure!(
                a.hidden.is_none(),
                "--hidden is an option of the digits model"
            );
            *context = a.context.unwrap_or(*context);
            *d_model = a.d_model.unwrap_or(*d_model);
            *heads = a.heads.unwrap_or(*heads);
            *layers = a.layers.unwrap_or(*layers);
            *mlp_ratio = a.mlp_ratio.unwrap_or(*mlp_ratio);
        }
        ModelSpec::DigitsMlp { hidden } => {
            anyhow::ensure!(
                a.context.is_none()
                    && a.d_model.is_none()
                    && a.heads.is_none()
                    && a.layers.is_none()
                    && a.mlp_ratio.is_none(),
                "--context, --d-model, --heads, --layers and --mlp-ratio are options of the language model"
            );
            *hidden = a.hidden.unwrap_or(*hidden);
        }
    }
    run.data.n_shards = a.shards.unwrap_or(run.data.n_shards);
    run.inner.steps = a.inner_steps.unwrap_or(run.inner.steps);
    run.inner.batch_size = a.batch_size.unwrap_or(run.inner.batch_size);
    let o = &mut run.inner.optimizer;
    o.schedule.peak = a.lr.unwrap_or(o.schedule.peak);
    o.schedule.warmup = a.warmup_steps.unwrap_or(o.schedule.warmup);
    o.schedule.total = a.decay_steps.unwrap_or(o.schedule.total);
    o.schedule.min_ratio = a.min_lr_ratio.unwrap_or(o.schedule.min_ratio);
    o.weight_decay = a.weight_decay.unwrap_or(o.weight_decay);
    if let Some(clip) = a.clip_norm {
        o.clip_norm = (clip > 0.0).then_some(clip);
    }
    run.outer.lr = a.outer_lr.unwrap_or(run.outer.lr);
    run.outer.momentum = a.outer_momentum.unwrap_or(run.outer.momentum);
    run.quorum = a.quorum.unwrap_or(run.quorum).max(1);
    if let Some(secs) = a.round_deadline_secs {
        anyhow::ensure!(secs > 0, "--round-deadline-secs must be at least 1");
        run.round_deadline_ms = secs * 1000;
    }
    anyhow::ensure!(
        (1..=1_000_000).contains(&a.topk_per_million),
        "--topk-per-million must be in 1..=1000000"
    );
    run.codec = a.codec.codec(a.topk_per_million);
    anyhow::ensure!(
        a.clip_radius > 0.0 && a.clip_radius.is_finite(),
        "--clip-radius must be positive"
    );
    run.aggregator = match a.aggregator {
        AggregatorArg::Mean => Rule::Mean,
        AggregatorArg::Median => Rule::Median,
        AggregatorArg::TrimmedMean => Rule::TrimmedMean { trim: a.trim },
        AggregatorArg::Krum => {
            anyhow::ensure!(a.krum_select >= 1, "--krum-select must be at least 1");
            Rule::MultiKrum {
                byzantine: a.byzantine,
                select: a.krum_select,
            }
        }
        AggregatorArg::GeometricMedian => Rule::GeometricMedian { iterations: 8 },
        AggregatorArg::CenteredClipping => Rule::CenteredClipping {
            tau: a.clip_radius,
            iterations: 3,
        },
    };
    if let Some(clip) = a.dp_clip {
        anyhow::ensure!(
            clip > 0.0 && clip.is_finite(),
            "--dp-clip must be a positive number"
        );
        anyhow::ensure!(
            a.dp_noise >= 0.0 && a.dp_noise.is_finite(),
            "--dp-noise must be ≥ 0"
        );
        anyhow::ensure!(
            a.dp_delta > 0.0 && a.dp_delta < 1.0,
            "--dp-delta must be in (0, 1)"
        );
        run.privacy = Some(swarmtrain_shared::privacy::PrivacySpec {
            clip_norm: clip,
            noise_multiplier: a.dp_noise,
            delta: a.dp_delta,
        });
    }
    run.validate()?;
    Ok(run)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr; stdout carries what the commands print (the listening banner, JSON).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // webrtc-rs's DTLS warns about every TLS extension a browser offers that it does not know.
                .unwrap_or_else(|_| "swarmtrain_relay=info,warn,dtls=error".into()),
        )
        .init();
    let (argv, extra_runs) = with_config_file(std::env::args().collect())?;
    let args = match Cli::parse_from(argv).command {
        Command::Serve(args) => args,
        Command::Keygen(args) => return keygen(args),
        Command::Status(args) => return status(args).await,
        Command::Credits(args) => return credits(args).await,
        Command::Export(args) => return export(args).await,
        Command::AttackGrid(args) => {
            return tokio::task::spawn_blocking(move || attack_grid(args)).await?;
        }
        Command::Simulate(args) => {
            return tokio::task::spawn_blocking(move || simulate(args)).await?;
        }
    };
    if !args.web_dir.join("index.html").is_file() {
        anyhow::bail!(
            "{} has no index.html (run from the repository root, or pass --web-dir)",
            args.web_dir.display()
        );
    }
    if !args.web_dir.join("pkg/swarmtrain.js").is_file() {
        tracing::warn!(
            "{} has no pkg/swarmtrain.js: build it with `cargo xtask build-wasm`",
            args.web_dir.display()
        );
    }
    let mut runs = vec![run_spec(&args.run)?];
    let mut policies = std::collections::BTreeMap::new();
    policies.insert(runs[0].run_id.clone(), admission(&args.run)?);
    for table in &extra_runs {
        let spec = run_spec(table)?;
        policies.insert(spec.run_id.clone(), admission(table)?);
        runs.push(spec);
    }
    let config = RelayConfig {
        http: args.http,
        tcp_port: args.tcp_port,
        ws_port: args.ws_port,
        webrtc_port: args.webrtc_port,
        web_dir: args.web_dir,
        data_dir: Some(args.data_dir),
        runs,
        seed: args.seed,
        aggregation: args.aggregation_backend,
        keep_checkpoints: args.keep_checkpoints,
        checkpoint_store: args.checkpoint_store,
        retention: swarmtrain_relay::store::Retention {
            history_rounds: args.history_retention_rounds,
            ledger_rounds: args.ledger_retention_rounds,
        },
        admission: policies,
        require_sealed: args.require_sealed,
        gossip_fanout: usize::from(args.gossip_fanout),
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
        std::fs::write(
            &path,
            "inner_steps = 7\nquorum = 2\naggregator = \"median\"\n",
        )
        .expect("write");
        let path = path.to_str().expect("utf-8 path");
        let (out, runs) =
            with_config_file(argv(&["relay", "serve", "--config", path, "--quorum", "5"]))
                .expect("config");
        assert!(runs.is_empty());
        let Command::Serve(serve) = Cli::parse_from(out).command else {
            panic!("serve")
        };
        assert_eq!(
            (serve.run.inner_steps, serve.run.quorum),
            (Some(7), Some(5)),
            "the command line wins over the file"
        );
        assert!(matches!(serve.run.aggregator, AggregatorArg::Median));

        std::fs::write(dir.path().join("bad.toml"), "inner_stepz = 7\n").expect("write");
        let bad = dir.path().join("bad.toml");
        let err = with_config_file(argv(&[
            "relay",
            "serve",
            "--config",
            bad.to_str().expect("utf-8"),
        ]))
        .map(|_| ())
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown key \"inner_stepz\""),
            "{err}"
        );
        std::fs::write(dir.path().join("broken.toml"), "inner_steps = \n").expect("write");
        let broken = dir.path().join("broken.toml");
        assert!(
            with_config_file(argv(&[
                "relay",
                "serve",
                "--config",
                broken.to_str().expect("utf-8")
            ]))
            .is_err()
        );
        assert!(
            with_config_file(argv(&["relay", "serve", "--config", "/nonexistent.toml"])).is_err()
        );
    }

    #[test]
    fn run_tables_add_runs_with_their_own_options() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("relay.toml");
        let text = "quorum = 2\n\n[[run]]\nrun_id = \"robust\"\nmodel = \"digits\"\naggregator = \"median\"\ncodec = \"int8\"\nhidden = 32\n\n[[run]]\nrun_id = \"small\"\ninner_steps = 5\n";
        std::fs::write(&path, text).expect("write");
        let (out, runs) = with_config_file(argv(&[
            "relay",
            "serve",
            "--config",
            path.to_str().expect("utf-8"),
        ]))
        .expect("config");
        let Command::Serve(serve) = Cli::parse_from(out).command else {
            panic!("serve")
        };
        let specs: Vec<_> = std::iter::once(&serve.run)
            .chain(&runs)
            .map(|r| run_spec(r).expect("valid"))
            .collect();
        let ids: Vec<&str> = specs.iter().map(|s| s.run_id.as_str()).collect();
        assert_eq!(ids, ["lm", "robust", "small"]);
        assert_eq!(specs[0].quorum, 2);
        assert_eq!(specs[1].aggregator, Rule::Median);
        assert_eq!(specs[1].codec, Codec::Int8Block { block: 64 });
        assert_eq!(
            specs[1].model,
            swarmtrain_shared::protocol::ModelSpec::DigitsMlp { hidden: 32 }
        );
        assert_eq!(specs[2].inner.steps, 5);

        std::fs::write(&path, "[[run]]\nrun_id = \"x\"\nhttp = \"0.0.0.0:1\"\n").expect("write");
        let err = with_config_file(argv(&[
            "relay",
            "serve",
            "--config",
            path.to_str().expect("utf-8"),
        ]))
        .map(|_| ())
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown key \"http\""),
            "a relay option in a run table: {err}"
        );
        let bad_id = RunTable::try_parse_from(["run", "--run-id=a/b"]).expect("parses");
        assert!(run_spec(&bad_id.run).is_err(), "a run id with a slash");
        let digits_option = RunTable::try_parse_from(["run", "--hidden=8"]).expect("parses");
        assert!(
            run_spec(&digits_option.run).is_err(),
            "a digits option on the language model"
        );
    }

    #[test]
    fn a_rule_the_quorum_cannot_feed_is_refused_with_the_reason() {
        let krum = RunTable::try_parse_from([
            "run",
            "--model=digits",
            "--aggregator=krum",
            "--byzantine=1",
            "--quorum=3",
        ])
        .expect("parses");
        let err = run_spec(&krum.run).unwrap_err().to_string();
        assert!(
            err.contains("needs at least 5 updates") && err.contains("quorum is 3"),
            "{err}"
        );
        let fed = RunTable::try_parse_from([
            "run",
            "--model=digits",
            "--aggregator=krum",
            "--byzantine=1",
            "--krum-select=3",
            "--quorum=5",
        ])
        .expect("parses");
        assert_eq!(
            run_spec(&fed.run).expect("works").aggregator,
            Rule::MultiKrum {
                byzantine: 1,
                select: 3
            }
        );
        let trimmed = RunTable::try_parse_from([
            "run",
            "--aggregator=trimmed-mean",
            "--trim=2",
            "--quorum=4",
        ])
        .expect("parses");
        assert!(run_spec(&trimmed.run).is_err(), "trim 2 needs 5 updates");
    }
}
