//! The relay's settings as an operator gives them: `serve`'s options from the command line and
//! environment variables (clap) and from a TOML file (serde), merged field by field with one
//! precedence: **flags, then environment variables, then the file, then the defaults**. Every
//! option is an `Option` in [`ServeOptions`] and [`RunOptions`]; clap fills what the command
//! line or the environment says, serde what the file says, [`ServeOptions::merge`] keeps the
//! first one given, and [`ServeOptions::relay_config`] applies the defaults and builds the
//! [`RelayConfig`], each run's spec checked by [`RunSpec::validate`] (where the checks live).
//!
//! The file's keys are the options' names with underscores (`inner_steps = 100`,
//! `aggregator = "median"`); each `[[run]]` table adds a run with the run options. An unknown
//! key is an error that lists the known ones.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;
use swarmtrain_shared::admission::Admission;
use swarmtrain_shared::privacy::PrivacySpec;
use swarmtrain_shared::protocol::{Codec, ModelSpec, RunSpec};
use swarmtrain_shared::robust::Rule;
use swarmtrain_shared::verify::CheckPolicy;

use crate::checks::ReplayPolicy;

use crate::backend::AggregationBackend;
use crate::corpus::DEFAULT_CORPUS;
use crate::public::{PublicConfig, Secret};
use crate::tls::TlsFiles;
use crate::{RelayConfig, store};

/// `serve`'s options: every one from the command line, an environment variable or the config
/// file, in that order of precedence; what none of them gives takes its default (below, in
/// [`ServeOptions::relay_config`]).
#[derive(clap::Args, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct ServeOptions {
    /// A TOML file of these options (keys with underscores: `inner_steps = 100`) and `[[run]]`
    /// tables, each adding a run with the run options.
    #[arg(long, env = "SWARMTRAIN_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HTTP address for the page, data and checkpoints; its IP is used for libp2p too. Default: 127.0.0.1:8080.
    #[arg(long, env = "SWARMTRAIN_HTTP")]
    pub http: Option<SocketAddr>,
    /// libp2p TCP port for native peers (0 picks a free port). Default: 0.
    #[arg(long, env = "SWARMTRAIN_TCP_PORT")]
    pub tcp_port: Option<u16>,
    /// libp2p WebSocket port for browsers (0 picks a free port). Default: 0.
    #[arg(long, env = "SWARMTRAIN_WS_PORT")]
    pub ws_port: Option<u16>,
    /// libp2p WebRTC-direct UDP port for browsers (0 picks a free port). The certificate is
    /// kept in the data directory, so the address's certhash survives restarts. Default: 0.
    #[arg(long, env = "SWARMTRAIN_WEBRTC_PORT")]
    pub webrtc_port: Option<u16>,
    /// Directory with the contributor page (index.html) and the npm package under pkg/. Default: `web`.
    #[arg(long, env = "SWARMTRAIN_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
    /// Directory for the identity key (mode 0600), the run database and the checkpoints; a
    /// relay started again on the same directory resumes its run. Default: `swarmtrain-data`.
    #[arg(long, env = "SWARMTRAIN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where checkpoints are written, as a URL: `s3://bucket/prefix` (relays built with the `s3`
    /// feature; credentials and endpoint from AWS_* variables) or `file:///path`. Default: the
    /// data directory's checkpoints/.
    #[arg(long, env = "SWARMTRAIN_CHECKPOINT_STORE")]
    pub checkpoint_store: Option<String>,
    /// Serve as an edge of a federation: the HTTP base URL of the root relay
    /// (`http://root.example:8080/`) whose runs this relay's runs follow. The edge's runs must
    /// be the root's (the same run options): it checks, admits and forwards its peers'
    /// messages there and serves the root's rounds and θ to them; the root closes every round.
    /// Default: none (the relay owns its runs).
    #[arg(long, env = "SWARMTRAIN_UPSTREAM")]
    pub upstream: Option<String>,
    /// On a root relay: the peer keys (64 hex digits, as `keygen --key-file <edge data
    /// dir>/relay.key` prints an edge's before it first starts) of the edge relays it takes;
    /// repeat it, or separate keys with commas. Default: none, and any identity that passes a
    /// run's admission may join it as an edge.
    #[arg(long, env = "SWARMTRAIN_EDGE_KEY", value_delimiter = ',')]
    pub edge_key: Option<Vec<String>>,
    /// The HTTP base URL clients reach this relay at (`https://edge1.example/`): a federation's
    /// relays list it in /api/bootstrap for clients to choose from and fail over to. Default:
    /// the bound HTTP address (`http://` or, with TLS, `https://`), and none when bound to
    /// every interface (the relay is then left out of the list).
    #[arg(long, env = "SWARMTRAIN_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// The federation's shared ledger: a PostgreSQL connection string
    /// (`postgres://user:password@db.example/swarmtrain`) that every relay of a federation is
    /// given. Each relay writes its own peers' accepted updates there (a root also its verdicts)
    /// and serves the leaderboard and peers' credits from it. The relay does not start when the
    /// database cannot be reached. It may hold a password: prefer the variable. Default: none;
    /// the data directory keeps the ledger, and an edge asks its root.
    #[arg(long, env = "SWARMTRAIN_LEDGER_URL", hide_env_values = true)]
    pub ledger_url: Option<crate::public::Secret>,
    /// A PEM file of CA certificates for the shared ledger's TLS (`sslmode=require` in
    /// --ledger-url): the database server's certificate must chain to one of them or to the
    /// system's roots, and name the host the connection string gives. Default: the system's
    /// roots only.
    #[arg(long, env = "SWARMTRAIN_LEDGER_CA")]
    pub ledger_ca: Option<PathBuf>,
    /// Checkpoints kept per run in the data directory (older ones are deleted). Default: 10.
    #[arg(long, env = "SWARMTRAIN_KEEP_CHECKPOINTS")]
    pub keep_checkpoints: Option<usize>,
    /// Rounds of round history kept in the data directory (the newest; default: all).
    #[arg(long, env = "SWARMTRAIN_HISTORY_RETENTION_ROUNDS")]
    pub history_retention_rounds: Option<u64>,
    /// Rounds of the contribution ledger kept in the data directory (the newest, and never fewer
    /// than --keep-checkpoints; default: all).
    #[arg(long, env = "SWARMTRAIN_LEDGER_RETENTION_ROUNDS")]
    pub ledger_retention_rounds: Option<u64>,
    /// Seed of every run's initial parameters. Default: 0.
    #[arg(long, env = "SWARMTRAIN_SEED")]
    pub seed: Option<u64>,
    /// Send θ and take updates only on connections that agreed post-quantum session keys
    /// (every swarmtrain client does; others are refused with `not_sealed`). Default: false.
    #[arg(long, env = "SWARMTRAIN_REQUIRE_SEALED", action = clap::ArgAction::Set)]
    pub require_sealed: Option<bool>,
    /// How many browsers with direct links to other browsers get each round announcement from
    /// the relay itself; the others receive it over their links (peers without links always
    /// get it from the relay). Default: 6.
    #[arg(long, env = "SWARMTRAIN_GOSSIP_FANOUT", value_parser = clap::value_parser!(u16).range(1..))]
    pub gossip_fanout: Option<u16>,
    /// At most this many libp2p connections from one IP address. Default: 256.
    #[arg(long, env = "SWARMTRAIN_CONNECTIONS_PER_IP", value_parser = clap::value_parser!(u32).range(1..))]
    pub connections_per_ip: Option<u32>,
    /// Let any libp2p peer reserve a circuit here and dial through it, as a public libp2p
    /// relay does (js-libp2p nodes that never join a run, for instance). Default: false, only
    /// peers whose identity has joined a run.
    #[arg(long, env = "SWARMTRAIN_OPEN_CIRCUIT_RELAY", action = clap::ArgAction::Set)]
    pub open_circuit_relay: Option<bool>,
    /// The loss check of every update of a language-model run: windows scored on each side
    /// (three forward passes per update, over up to twice this many windows); 0 turns it off.
    /// Default: 128.
    #[arg(long, env = "SWARMTRAIN_CHECK_WINDOWS")]
    pub check_windows: Option<u32>,
    /// A check score at or above this verifies an update's work. Default: 3.
    #[arg(long, env = "SWARMTRAIN_CHECK_PASS")]
    pub check_pass: Option<f32>,
    /// A score below this fails an update (in a round whose upper-quartile score reaches 4).
    /// Default: 0.
    #[arg(long, env = "SWARMTRAIN_CHECK_FAIL")]
    pub check_fail: Option<f32>,
    /// The chance that an accepted update of a language-model run is replayed from the state it
    /// committed to (its peer reveals the state; each replay costs about one round of the peer's
    /// training on the relay's CPU); 0 turns replays off. Default: 0.1.
    #[arg(long, env = "SWARMTRAIN_REPLAY_FRACTION")]
    pub replay_fraction: Option<f64>,
    /// At most this many replays a round (the verifier's CPU budget). Default: 4.
    #[arg(long, env = "SWARMTRAIN_REPLAYS_PER_ROUND")]
    pub replays_per_round: Option<u32>,
    /// How far (relative L2 distance) a replay that is not the update bit for bit may land and
    /// still verify it (WebGPU peers, CPUs whose kernels round differently). Default: 0.05.
    #[arg(long, env = "SWARMTRAIN_REPLAY_TOLERANCE")]
    pub replay_tolerance: Option<f32>,
    /// How long a revealed update waits for a volunteer verifier (`swarmtrain-peer verify`) to
    /// replay it before the relay replays it itself, in seconds. Without a verifier asking, the
    /// relay replays at once. Default: 60.
    #[arg(long, env = "SWARMTRAIN_VERIFIER_TIMEOUT_SECS")]
    pub verifier_timeout_secs: Option<u64>,
    /// The chance that the relay replays an update a verifier found verified again itself, to
    /// catch verifiers that lie (a verifier that fails an update is always checked). Default: 0.25.
    #[arg(long, env = "SWARMTRAIN_VERIFIER_SPOT_CHECK")]
    pub verifier_spot_check: Option<f64>,
    /// Where the world reaches this relay (repeatable, or comma-separated in the variable): an
    /// IP, a host name (dialed by name over TCP and WebSocket, resolved at start for
    /// WebRTC-direct), or a full multiaddr (a reverse proxy's `/dns4/relay.example/tcp/443/tls/ws`).
    /// Default: the interface addresses when bound to 0.0.0.0 or ::, else the bound address.
    /// Loopback addresses are only ever told to clients on loopback.
    #[arg(long, env = "SWARMTRAIN_EXTERNAL_ADDRESS", value_delimiter = ',')]
    pub external_address: Option<Vec<String>>,
    /// PEM certificate chain: serve the page and API over HTTPS and the libp2p WebSocket as
    /// `wss`, with this certificate (needs --tls-key).
    #[arg(long, env = "SWARMTRAIN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (not readable by every user).
    #[arg(long, env = "SWARMTRAIN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Origins whose pages may call the API (repeatable): `https://site.example`, or `*` for
    /// any. `none` allows no other origin. Default: `*` (see docs/security.md).
    #[arg(long, env = "SWARMTRAIN_ALLOW_ORIGIN", value_delimiter = ',')]
    pub allow_origin: Option<Vec<String>>,
    /// A reverse proxy in front of the relay (repeatable IP): its `X-Forwarded-Host` and
    /// `X-Forwarded-For` headers are believed. Default: none.
    #[arg(long, env = "SWARMTRAIN_TRUSTED_PROXY", value_delimiter = ',')]
    pub trusted_proxy: Option<Vec<std::net::IpAddr>>,
    /// A STUN or TURN server for browser-to-browser links (repeatable): `stun:host:3478`,
    /// `turn:host:3478?transport=udp`, `turns:host:5349`. Handed to browsers in /api/bootstrap.
    #[arg(long, env = "SWARMTRAIN_ICE_SERVER", value_delimiter = ',')]
    pub ice_server: Option<Vec<String>>,
    /// coturn's `static-auth-secret` (`use-auth-secret`): TURN credentials are minted from it
    /// per peer and expire; the secret itself never leaves the relay. Prefer the variable.
    #[arg(long, env = "SWARMTRAIN_TURN_SECRET", hide_env_values = true)]
    pub turn_secret: Option<Secret>,
    /// How long a minted TURN credential is valid, in seconds. Default: 86400.
    #[arg(long, env = "SWARMTRAIN_TURN_TTL_SECS")]
    pub turn_ttl_secs: Option<u64>,
    /// The default run's options; more runs come from `[[run]]` tables in the config file.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: RunOptions,
    /// Burn backend that aggregates updates (from those compiled in). Default: ndarray.
    #[arg(long, env = "SWARMTRAIN_AGGREGATION_BACKEND", value_enum)]
    pub aggregation_backend: Option<AggregationBackend>,
}

/// One run's options: on the command line for the default run, or in a `[[run]]` table.
/// Options left out take the model's defaults (`default_lm_run` or `digits_run`).
#[derive(clap::Args, Deserialize, Debug, Clone, Default)]
#[serde(default)]
pub struct RunOptions {
    /// The model: the byte-level transformer language model (`lm`) or the digits MLP. Default: lm.
    #[arg(long, env = "SWARMTRAIN_MODEL", value_enum)]
    pub model: Option<ModelChoice>,
    /// The run's name, unique on this relay (letters, digits, '-' and '_'); default: the
    /// model's name, "lm" or "digits".
    #[arg(long, env = "SWARMTRAIN_RUN_ID")]
    pub run_id: Option<String>,
    /// Language model: the training text, a UTF-8 file or a folder of them. Default: `/usr/share/games/fortunes`.
    #[arg(long, env = "SWARMTRAIN_CORPUS")]
    pub corpus: Option<String>,
    /// Language model: context length in bytes.
    #[arg(long, env = "SWARMTRAIN_CONTEXT")]
    pub context: Option<u32>,
    /// Language model: embedding width.
    #[arg(long, env = "SWARMTRAIN_D_MODEL")]
    pub d_model: Option<u32>,
    /// Language model: attention heads (must divide --d-model).
    #[arg(long, env = "SWARMTRAIN_HEADS")]
    pub heads: Option<u32>,
    /// Language model: transformer blocks.
    #[arg(long, env = "SWARMTRAIN_LAYERS")]
    pub layers: Option<u32>,
    /// Language model: MLP width as a multiple of --d-model.
    #[arg(long, env = "SWARMTRAIN_MLP_RATIO")]
    pub mlp_ratio: Option<u32>,
    /// Hidden units of the digits MLP.
    #[arg(long, env = "SWARMTRAIN_HIDDEN")]
    pub hidden: Option<u32>,
    /// Data slots (text) or shards (digits) the training data is cut into per round.
    #[arg(long, env = "SWARMTRAIN_SHARDS")]
    pub shards: Option<u32>,
    /// Local AdamW steps per round (DiLoCo's H).
    #[arg(long, env = "SWARMTRAIN_INNER_STEPS")]
    pub inner_steps: Option<u32>,
    /// Examples (windows of text) per inner step.
    #[arg(long, env = "SWARMTRAIN_BATCH_SIZE")]
    pub batch_size: Option<u32>,
    /// Inner AdamW peak learning rate.
    #[arg(long, env = "SWARMTRAIN_LR")]
    pub lr: Option<f64>,
    /// Inner steps of linear warm-up (counted over the whole run: round · H + step).
    #[arg(long, env = "SWARMTRAIN_WARMUP_STEPS")]
    pub warmup_steps: Option<u64>,
    /// Inner step at which the cosine decay reaches --min-lr-ratio × the peak.
    #[arg(long, env = "SWARMTRAIN_DECAY_STEPS")]
    pub decay_steps: Option<u64>,
    /// The learning rate's floor as a share of the peak (1: a constant rate).
    #[arg(long, env = "SWARMTRAIN_MIN_LR_RATIO")]
    pub min_lr_ratio: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, env = "SWARMTRAIN_CLIP_NORM")]
    pub clip_norm: Option<f32>,
    /// AdamW weight decay.
    #[arg(long, env = "SWARMTRAIN_WEIGHT_DECAY")]
    pub weight_decay: Option<f32>,
    /// Outer Nesterov learning rate.
    #[arg(long, env = "SWARMTRAIN_OUTER_LR")]
    pub outer_lr: Option<f32>,
    /// Outer Nesterov momentum.
    #[arg(long, env = "SWARMTRAIN_OUTER_MOMENTUM")]
    pub outer_momentum: Option<f32>,
    /// Updates that close a round early (capped at the number of active peers, never below
    /// what the aggregator needs).
    #[arg(long, env = "SWARMTRAIN_QUORUM")]
    pub quorum: Option<u32>,
    /// Seconds after which a round closes with the updates it has.
    #[arg(long, env = "SWARMTRAIN_ROUND_DEADLINE_SECS")]
    pub round_deadline_secs: Option<u64>,
    /// How peers encode their updates: f32, f16, int8 / int4 / int2 (blockwise, 64 per block),
    /// topk, top-k with 4- or 2-bit values (topk4, topk2), or top-k within blocks of 256 with
    /// one-byte offsets and 4- or 2-bit values (block-topk4, block-topk2; SparseLoCo's layout). Default: f32.
    #[arg(long, env = "SWARMTRAIN_CODEC", value_enum)]
    pub codec: Option<CodecChoice>,
    /// With the top-k codecs: how many values per million to send (10000 = 1%). Default: 20000.
    #[arg(long, env = "SWARMTRAIN_TOPK_PER_MILLION")]
    pub topk_per_million: Option<u32>,
    /// Differential privacy: clip every update to this L2 norm (enables DP with --dp-noise).
    #[arg(long, env = "SWARMTRAIN_DP_CLIP")]
    pub dp_clip: Option<f32>,
    /// Differential privacy: noise standard deviation in units of the clip norm. Default: 1.
    #[arg(long, env = "SWARMTRAIN_DP_NOISE", requires = "dp_clip")]
    pub dp_noise: Option<f32>,
    /// Differential privacy: the δ that ε is reported for. Default: 1e-5.
    #[arg(long, env = "SWARMTRAIN_DP_DELTA", requires = "dp_clip")]
    pub dp_delta: Option<f64>,
    /// How a round's updates are combined: mean, median, trimmed-mean (drops --trim from each
    /// side), krum (multi-Krum: averages the --krum-select best-scored updates, tolerating
    /// --byzantine attackers), geometric-median or centered-clipping (radius --clip-radius
    /// around the previous aggregate). The quorum must be at least what the rule needs. Default: mean.
    #[arg(long, env = "SWARMTRAIN_AGGREGATOR", value_enum)]
    pub aggregator: Option<AggregatorChoice>,
    /// With --aggregator trimmed-mean: updates dropped from each side per coordinate (needs a
    /// quorum of at least 2·trim + 1). Default: 1.
    #[arg(long, env = "SWARMTRAIN_TRIM")]
    pub trim: Option<u32>,
    /// With --aggregator krum: attackers to tolerate (needs a quorum of at least 2·f + 3). Default: 1.
    #[arg(long, env = "SWARMTRAIN_BYZANTINE")]
    pub byzantine: Option<u32>,
    /// With --aggregator krum: how many of the best-scored updates are averaged (1 is Krum). Default: 1.
    #[arg(long, env = "SWARMTRAIN_KRUM_SELECT")]
    pub krum_select: Option<u32>,
    /// With --aggregator centered-clipping: the clipping radius. Default: 1.
    #[arg(long, env = "SWARMTRAIN_CLIP_RADIUS")]
    pub clip_radius: Option<f32>,
    /// Bucketing (Karimireddy, He & Jaggi, ICLR 2022) before any --aggregator: each round's
    /// updates, shuffled by a seed of the run and round, are averaged in buckets of this many and
    /// the rule combines the bucket means (the quorum must give the rule enough buckets).
    /// Default: 1 (off).
    #[arg(long, env = "SWARMTRAIN_BUCKET")]
    pub bucket: Option<u32>,
    /// Who may join: anyone (open); anyone whose new identity solves a proof-of-work puzzle of
    /// --pow-bits (proof-of-work: about 2^bits hashes per identity, so minting many costs CPU);
    /// or only the peer keys listed in --allow-list (allow-list). Default: open.
    #[arg(long, env = "SWARMTRAIN_ADMISSION", value_enum)]
    pub admission: Option<AdmissionChoice>,
    /// With --admission proof-of-work: leading zero bits asked for (at most 32; 20 takes a
    /// browser about a second). Default: 20.
    #[arg(long, env = "SWARMTRAIN_POW_BITS")]
    pub pow_bits: Option<u8>,
    /// With --admission allow-list: a file of peer keys (64 hex digits each, one per line, as
    /// `keygen` prints them; `#` starts a comment).
    #[arg(long, env = "SWARMTRAIN_ALLOW_LIST")]
    pub allow_list: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdmissionChoice {
    Open,
    ProofOfWork,
    AllowList,
}

/// The defaults of the options that neither [`RelayConfig::default`] nor the model's run spec
/// (`default_lm_run`, `digits_run`) decides. Each option's "Default:" line in `--help` says the
/// same as the code; a test compares them.
pub mod defaults {
    use super::{AdmissionChoice, AggregatorChoice, CodecChoice, ModelChoice};

    pub const MODEL: ModelChoice = ModelChoice::Lm;
    pub const CODEC: CodecChoice = CodecChoice::F32;
    pub const AGGREGATOR: AggregatorChoice = AggregatorChoice::Mean;
    pub const ADMISSION: AdmissionChoice = AdmissionChoice::Open;
    /// The data directory of a relay started from the command line.
    pub const DATA_DIR: &str = "swarmtrain-data";
    /// Leading zero bits a proof of work needs.
    pub const POW_BITS: u8 = 20;
    /// Coordinates a top-k update keeps, per million.
    pub const TOPK_PER_MILLION: u32 = 20_000;
    /// Updates trimmed from each end by the trimmed mean.
    pub const TRIM: u32 = 1;
    /// Malicious updates Multi-Krum allows for.
    pub const BYZANTINE: u32 = 1;
    /// Updates Multi-Krum averages.
    pub const KRUM_SELECT: u32 = 1;
    /// Centered clipping's radius.
    pub const CLIP_RADIUS: f32 = 1.0;
    /// Updates averaged per bucket before the robust rule (1: no bucketing).
    pub const BUCKET: u32 = 1;
    /// Differential privacy's noise multiplier and δ.
    pub const DP_NOISE: f32 = 1.0;
    pub const DP_DELTA: f64 = 1e-5;
}

/// The run's admission policy from its options.
fn admission_of(a: &RunOptions) -> anyhow::Result<Admission> {
    Ok(match a.admission.unwrap_or(defaults::ADMISSION) {
        AdmissionChoice::Open => Admission::Open,
        AdmissionChoice::ProofOfWork => Admission::ProofOfWork {
            bits: a.pow_bits.unwrap_or(defaults::POW_BITS),
        },
        AdmissionChoice::AllowList => {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelChoice {
    /// The byte-level transformer language model.
    Lm,
    /// The digits MLP.
    Digits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AggregatorChoice {
    Mean,
    Median,
    TrimmedMean,
    Krum,
    GeometricMedian,
    CenteredClipping,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodecChoice {
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

impl CodecChoice {
    pub fn codec(self, per_million: u32) -> Codec {
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

/// A run's spec from its options, the model's defaults for the rest, checked
/// ([`RunSpec::validate`]: a run that cannot work is refused here, with the reason).
pub fn run_spec(a: &RunOptions) -> anyhow::Result<RunSpec> {
    let mut run = match a.model.unwrap_or(defaults::MODEL) {
        ModelChoice::Lm => crate::default_lm_run(a.corpus.as_deref().unwrap_or(DEFAULT_CORPUS)),
        ModelChoice::Digits => crate::digits_run(),
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
        run.round_deadline_ms = secs.saturating_mul(1000);
    }
    let per_million = a.topk_per_million.unwrap_or(defaults::TOPK_PER_MILLION);
    run.codec = a.codec.unwrap_or(defaults::CODEC).codec(per_million);
    run.aggregator = match a.aggregator.unwrap_or(defaults::AGGREGATOR) {
        AggregatorChoice::Mean => Rule::Mean,
        AggregatorChoice::Median => Rule::Median,
        AggregatorChoice::TrimmedMean => Rule::TrimmedMean {
            trim: a.trim.unwrap_or(defaults::TRIM),
        },
        AggregatorChoice::Krum => Rule::MultiKrum {
            byzantine: a.byzantine.unwrap_or(defaults::BYZANTINE),
            select: a.krum_select.unwrap_or(defaults::KRUM_SELECT),
        },
        AggregatorChoice::GeometricMedian => Rule::GeometricMedian { iterations: 8 },
        AggregatorChoice::CenteredClipping => Rule::CenteredClipping {
            tau: a.clip_radius.unwrap_or(defaults::CLIP_RADIUS),
            iterations: 3,
        },
    };
    run.aggregator = Rule::with_buckets(run.aggregator, a.bucket.unwrap_or(defaults::BUCKET));
    run.privacy = a.dp_clip.map(|clip| PrivacySpec {
        clip_norm: clip,
        noise_multiplier: a.dp_noise.unwrap_or(defaults::DP_NOISE),
        delta: a.dp_delta.unwrap_or(defaults::DP_DELTA),
    });
    run.validate()?;
    Ok(run)
}

/// Keeps `self`'s value of each field, and `other`'s where `self` has none; evaluates to the
/// fields' names (a test checks that they are every option's).
macro_rules! merge_fields {
    ($self:ident, $other:ident; $($field:ident),* $(,)?) => {{
        $( $self.$field = $self.$field.or($other.$field); )*
        &[$(stringify!($field)),*]
    }};
}

impl RunOptions {
    /// These options over `file`'s (each option this one gives wins).
    pub fn merge(self, file: Self) -> Self {
        self.merge_fields(file).0
    }

    /// [`Self::merge`], and the names of the fields it merged.
    fn merge_fields(mut self, file: Self) -> (Self, &'static [&'static str]) {
        let merged = merge_fields!(self, file; model, run_id, corpus, context, d_model, heads, layers,
            mlp_ratio, hidden, shards, inner_steps, batch_size, lr, warmup_steps, decay_steps,
            min_lr_ratio, clip_norm, weight_decay, outer_lr, outer_momentum, quorum,
            round_deadline_secs, codec, topk_per_million, dp_clip, dp_noise, dp_delta, aggregator,
            trim, byzantine, krum_select, clip_radius, bucket, admission, pow_bits, allow_list);
        (self, merged)
    }
}

/// The config file: `serve`'s options at the top level and `[[run]]` tables.
#[derive(Deserialize, Debug, Default)]
struct ConfigFile {
    #[serde(flatten)]
    serve: ServeOptions,
    #[serde(default)]
    run: Vec<RunOptions>,
}

/// The long names of `A`'s options, with underscores: the keys a config table may hold.
fn keys<A: clap::Args>() -> Vec<String> {
    A::augment_args(clap::Command::new("keys"))
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|l| l.replace('-', "_"))
        .collect()
}

/// An error naming the first key of `table` that is not one of `known`.
fn check_keys(
    path: &Path,
    what: &str,
    table: &toml::Table,
    known: &[String],
) -> anyhow::Result<()> {
    match table.keys().find(|k| !known.contains(k)) {
        Some(key) => anyhow::bail!(
            "config {}: {what}unknown key {key:?}; known keys: {}",
            path.display(),
            known.join(", ")
        ),
        None => Ok(()),
    }
}

impl ServeOptions {
    /// These options over `file`'s (each option this one gives wins), run options included.
    pub fn merge(self, file: Self) -> Self {
        self.merge_fields(file).0
    }

    /// [`Self::merge`], and the names of the top-level fields it merged.
    fn merge_fields(mut self, file: Self) -> (Self, &'static [&'static str]) {
        let merged = merge_fields!(self, file; http, tcp_port, ws_port, webrtc_port, web_dir, data_dir,
            checkpoint_store, upstream, edge_key, public_url, ledger_url, ledger_ca, keep_checkpoints, history_retention_rounds, ledger_retention_rounds,
            seed, require_sealed, gossip_fanout, connections_per_ip, open_circuit_relay,
            check_windows, check_pass, check_fail, replay_fraction, replays_per_round,
            replay_tolerance, verifier_timeout_secs, verifier_spot_check, aggregation_backend,
            external_address, tls_cert,
            tls_key, allow_origin, trusted_proxy, ice_server, turn_secret, turn_ttl_secs);
        self.run = self.run.merge(file.run);
        (self, merged)
    }

    /// Reads `--config` (if given) and merges it under these options: returns the merged
    /// options and the file's `[[run]]` tables.
    pub fn with_file(self) -> anyhow::Result<(Self, Vec<RunOptions>)> {
        let Some(path) = self.config.clone() else {
            return Ok((self, Vec::new()));
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let table: toml::Table = text
            .parse()
            .with_context(|| format!("config {} is not valid TOML", path.display()))?;
        let mut top = keys::<ServeOptions>();
        top.push("run".into());
        top.retain(|k| k != "config");
        check_keys(&path, "", &table, &top)?;
        let run_keys = keys::<RunOptions>();
        if let Some(runs) = table.get("run") {
            let tables = runs.as_array().with_context(|| {
                format!(
                    "config {}: `run` must be an array of tables ([[run]])",
                    path.display()
                )
            })?;
            for (i, run) in tables.iter().enumerate() {
                let run = run.as_table().with_context(|| {
                    format!("config {}: run {i} is not a table", path.display())
                })?;
                check_keys(&path, &format!("run {i}: "), run, &run_keys)?;
            }
        }
        let file: ConfigFile = table
            .try_into()
            .with_context(|| format!("config {}", path.display()))?;
        Ok((self.merge(file.serve), file.run))
    }

    /// The relay's configuration: these options (already merged with the file) and the file's
    /// `runs`, with the defaults for what none of them gives.
    pub fn relay_config(self, runs: &[RunOptions]) -> anyhow::Result<RelayConfig> {
        let mut specs = vec![run_spec(&self.run)?];
        let mut admission = BTreeMap::new();
        admission.insert(specs[0].run_id.clone(), admission_of(&self.run)?);
        for run in runs {
            let spec = run_spec(run)?;
            admission.insert(spec.run_id.clone(), admission_of(run)?);
            specs.push(spec);
        }
        let defaults = RelayConfig::default();
        let checks = CheckPolicy {
            windows: self.check_windows.unwrap_or(defaults.checks.windows),
            pass: self.check_pass.unwrap_or(defaults.checks.pass),
            fail: self.check_fail.unwrap_or(defaults.checks.fail),
            ..defaults.checks
        };
        anyhow::ensure!(
            checks.pass.is_finite() && checks.fail.is_finite() && checks.fail <= checks.pass,
            "--check-fail ({}) must be a number no larger than --check-pass ({})",
            checks.fail,
            checks.pass
        );
        let replays = ReplayPolicy {
            fraction: self.replay_fraction.unwrap_or(defaults.replays.fraction),
            per_round: self
                .replays_per_round
                .map_or(defaults.replays.per_round, |n| n as usize),
            tolerance: self.replay_tolerance.unwrap_or(defaults.replays.tolerance),
            verifier_timeout: self.verifier_timeout_secs.map_or(
                defaults.replays.verifier_timeout,
                std::time::Duration::from_secs,
            ),
            spot_check: self
                .verifier_spot_check
                .unwrap_or(defaults.replays.spot_check),
        };
        anyhow::ensure!(
            (0.0..=1.0).contains(&replays.spot_check),
            "--verifier-spot-check ({}) must be between 0 and 1",
            replays.spot_check
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&replays.fraction),
            "--replay-fraction ({}) must be between 0 and 1",
            replays.fraction
        );
        anyhow::ensure!(
            replays.tolerance.is_finite() && replays.tolerance >= 0.0,
            "--replay-tolerance ({}) must be a number no smaller than 0",
            replays.tolerance
        );
        Ok(RelayConfig {
            http: self.http.unwrap_or(defaults.http),
            tcp_port: self.tcp_port.unwrap_or(defaults.tcp_port),
            ws_port: self.ws_port.unwrap_or(defaults.ws_port),
            webrtc_port: self.webrtc_port.unwrap_or(defaults.webrtc_port),
            web_dir: self.web_dir.unwrap_or(defaults.web_dir),
            // The library's default is memory only; the command line keeps a directory.
            data_dir: Some(
                self.data_dir
                    .unwrap_or_else(|| PathBuf::from(defaults::DATA_DIR)),
            ),
            runs: specs,
            seed: self.seed.unwrap_or(defaults.seed),
            aggregation: self.aggregation_backend.unwrap_or(defaults.aggregation),
            keep_checkpoints: self.keep_checkpoints.unwrap_or(defaults.keep_checkpoints),
            checkpoint_store: self.checkpoint_store,
            upstream: self.upstream,
            public_url: self.public_url,
            ledger_url: self.ledger_url,
            ledger_ca: self.ledger_ca,
            edge_keys: self
                .edge_key
                .unwrap_or_default()
                .iter()
                .map(|hex| {
                    blake3::Hash::from_hex(hex.trim())
                        .map(|h| swarmtrain_shared::PeerKey(*h.as_bytes()))
                        .with_context(|| format!("--edge-key {hex:?}: not a 64-hex-digit peer key"))
                })
                .collect::<anyhow::Result<_>>()?,
            retention: store::Retention {
                history_rounds: self.history_retention_rounds,
                ledger_rounds: self.ledger_retention_rounds,
            },
            admission,
            require_sealed: self.require_sealed.unwrap_or(defaults.require_sealed),
            gossip_fanout: self
                .gossip_fanout
                .map_or(defaults.gossip_fanout, usize::from),
            connections_per_ip: self
                .connections_per_ip
                .map_or(defaults.connections_per_ip, |n| n as usize),
            open_circuit_relay: self
                .open_circuit_relay
                .unwrap_or(defaults.open_circuit_relay),
            reassembly_budget: defaults.reassembly_budget,
            checks,
            replays,
            public: PublicConfig {
                external_addresses: self.external_address.unwrap_or_default(),
                allow_origins: match self.allow_origin {
                    Some(list) => list.into_iter().filter(|o| o != "none").collect(),
                    None => defaults.public.allow_origins,
                },
                trusted_proxies: self.trusted_proxy.unwrap_or_default(),
                ice_servers: self.ice_server.unwrap_or_default(),
                turn_secret: self.turn_secret,
                turn_ttl_secs: self.turn_ttl_secs.unwrap_or(defaults.public.turn_ttl_secs),
                tls: match (self.tls_cert, self.tls_key) {
                    (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
                    (None, None) => None,
                    _ => anyhow::bail!("--tls-cert and --tls-key go together"),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{RunOptions, ServeOptions, keys};

    /// Every option a flag, a variable or the file can give reaches the configuration: a field
    /// left out of `merge` would silently drop what the file says.
    #[test]
    fn every_option_is_merged() {
        let run_keys: BTreeSet<String> = keys::<RunOptions>().into_iter().collect();
        let (_, merged) = RunOptions::default().merge_fields(RunOptions::default());
        let merged: BTreeSet<String> = merged.iter().map(|k| (*k).to_owned()).collect();
        assert_eq!(merged, run_keys, "run options merged vs run options");

        let serve_keys: BTreeSet<String> = keys::<ServeOptions>()
            .into_iter()
            .filter(|k| k != "config" && !run_keys.contains(k))
            .collect();
        let (_, merged) = ServeOptions::default().merge_fields(ServeOptions::default());
        let merged: BTreeSet<String> = merged.iter().map(|k| (*k).to_owned()).collect();
        assert_eq!(merged, serve_keys, "serve options merged vs serve options");
    }

    /// Each option's "Default:" line in `--help` (and so in docs/relay.md) says what the code
    /// does: [`RelayConfig::default`], [`super::defaults`] or the corpus. An option whose line
    /// is prose is named in `PROSE`; a new option with a default must be added here.
    #[test]
    fn documented_defaults_are_the_code_defaults() {
        use clap::{Args, ValueEnum};

        use super::defaults as d;
        use crate::RelayConfig;

        const PROSE: &[&str] = &[
            "checkpoint_store",
            "external_address",
            "upstream",
            "edge_key",
            "public_url",
            "ledger_url",
            "ledger_ca",
        ];
        let c = RelayConfig::default();
        let name = |v: Option<clap::builder::PossibleValue>| v.map(|v| v.get_name().to_owned());
        let expected: Vec<(&str, String)> = vec![
            ("http", c.http.to_string()),
            ("tcp_port", c.tcp_port.to_string()),
            ("ws_port", c.ws_port.to_string()),
            ("webrtc_port", c.webrtc_port.to_string()),
            ("web_dir", c.web_dir.display().to_string()),
            ("data_dir", d::DATA_DIR.into()),
            ("keep_checkpoints", c.keep_checkpoints.to_string()),
            ("seed", c.seed.to_string()),
            ("require_sealed", c.require_sealed.to_string()),
            ("gossip_fanout", c.gossip_fanout.to_string()),
            ("connections_per_ip", c.connections_per_ip.to_string()),
            ("open_circuit_relay", c.open_circuit_relay.to_string()),
            ("check_windows", c.checks.windows.to_string()),
            ("check_pass", c.checks.pass.to_string()),
            ("check_fail", c.checks.fail.to_string()),
            ("replay_fraction", c.replays.fraction.to_string()),
            ("replays_per_round", c.replays.per_round.to_string()),
            ("replay_tolerance", c.replays.tolerance.to_string()),
            (
                "verifier_timeout_secs",
                c.replays.verifier_timeout.as_secs().to_string(),
            ),
            ("verifier_spot_check", c.replays.spot_check.to_string()),
            ("allow_origin", c.public.allow_origins.join(",")),
            (
                "trusted_proxy",
                if c.public.trusted_proxies.is_empty() {
                    "none".into()
                } else {
                    String::new()
                },
            ),
            ("turn_ttl_secs", c.public.turn_ttl_secs.to_string()),
            (
                "aggregation_backend",
                name(c.aggregation.to_possible_value()).unwrap_or_default(),
            ),
            (
                "model",
                name(d::MODEL.to_possible_value()).unwrap_or_default(),
            ),
            ("corpus", crate::corpus::DEFAULT_CORPUS.into()),
            (
                "codec",
                name(d::CODEC.to_possible_value()).unwrap_or_default(),
            ),
            ("topk_per_million", d::TOPK_PER_MILLION.to_string()),
            ("dp_noise", d::DP_NOISE.to_string()),
            ("dp_delta", d::DP_DELTA.to_string()),
            (
                "aggregator",
                name(d::AGGREGATOR.to_possible_value()).unwrap_or_default(),
            ),
            ("trim", d::TRIM.to_string()),
            ("byzantine", d::BYZANTINE.to_string()),
            ("krum_select", d::KRUM_SELECT.to_string()),
            ("clip_radius", d::CLIP_RADIUS.to_string()),
            ("bucket", d::BUCKET.to_string()),
            (
                "admission",
                name(d::ADMISSION.to_possible_value()).unwrap_or_default(),
            ),
            ("pow_bits", d::POW_BITS.to_string()),
        ];
        let same = |doc: &str, code: &str| match (doc.parse::<f64>(), code.parse::<f64>()) {
            (Ok(a), Ok(b)) => a == b,
            _ => doc == code,
        };
        let command = ServeOptions::augment_args(clap::Command::new("relay"));
        let mut documented = 0;
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(ToString::to_string)
                .unwrap_or_default();
            let Some((_, rest)) = help.split_once("Default: ") else {
                continue;
            };
            documented += 1;
            if PROSE.contains(&id) {
                continue;
            }
            let end = [", ", " (", ". "]
                .iter()
                .filter_map(|stop| rest.find(stop))
                .min()
                .unwrap_or(rest.len());
            let doc = rest[..end].trim_end_matches('.').trim_matches('`');
            let code = expected
                .iter()
                .find(|(name, _)| *name == id)
                .unwrap_or_else(|| {
                    panic!("--{id} documents a default the test does not know: {doc}")
                });
            assert!(
                same(doc, &code.1),
                "--{id}: the help says {doc}, the code {}",
                code.1
            );
        }
        assert_eq!(
            documented,
            expected.len() + PROSE.len(),
            "options with a Default: line"
        );
    }
}
