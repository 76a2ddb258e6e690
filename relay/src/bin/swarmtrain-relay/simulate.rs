//! `swarmtrain-relay simulate`: N peers training the language model in this process.

use std::path::PathBuf;

use clap::Parser;
use swarmtrain_shared::robust::Rule;

use swarmtrain_relay::config::CodecChoice as CodecArg;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SyncArg {
    /// DiLoCo: --inner-steps local steps, then an outer step on the averaged pseudo-gradients.
    Diloco,
    /// FedAvg: DiLoCo's schedule with plain averaging (outer lr 1, no momentum).
    Fedavg,
    /// The data-parallel baseline: gradients averaged after every step.
    DataParallel,
}

#[derive(Parser, Debug)]
pub(crate) struct Simulate {
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
    /// With the top-k codecs: values kept per million (block-topk: of every 256).
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
    /// Windows per warm-start step (the same for every peer count, so runs share the start).
    #[arg(long, default_value_t = 64)]
    pretrain_batch: u32,
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

pub(crate) fn simulate(args: Simulate) -> anyhow::Result<()> {
    use burn::backend::{Autodiff, NdArray};
    use swarmtrain_shared::lm::LmConfig;
    use swarmtrain_shared::lm_train::{LmInnerSpec, LrSchedule};
    use swarmtrain_shared::protocol::OuterSpec;
    use swarmtrain_shared::sim::{self, Schedule, SimConfig};
    use swarmtrain_shared::text::TextCorpus;

    anyhow::ensure!(
        (1..=1_000_000).contains(&args.topk_per_million),
        "--topk-per-million must be in 1..=1000000"
    );
    let model = LmConfig::new()
        .with_context(args.context)
        .with_d_model(args.d_model)
        .with_layers(args.layers)
        .with_heads(args.heads);
    model
        .validate()
        .map_err(|e| anyhow::anyhow!("bad model shape: {e}"))?;
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
        SyncArg::Diloco => Schedule::DiLoCo {
            inner_steps: args.inner_steps,
            outer: OuterSpec {
                lr: args.outer_lr,
                momentum: args.outer_momentum,
            },
        },
        SyncArg::Fedavg => Schedule::DiLoCo {
            inner_steps: args.inner_steps,
            outer: OuterSpec {
                lr: 1.0,
                momentum: 0.0,
            },
        },
        SyncArg::DataParallel => Schedule::DataParallel,
    };
    let config = SimConfig {
        model,
        peers: args.peers,
        steps: args.steps,
        batch: args.batch,
        sync,
        codec: args.codec.codec(args.topk_per_million),
        aggregator: Rule::Mean,
        inner: LmInnerSpec::new(LrSchedule {
            peak: args.lr,
            warmup: args.warmup,
            total: u64::from(args.steps),
            min_ratio: 0.1,
        }),
        seed: args.seed,
        pretrain_steps: args.pretrain_steps,
        pretrain_batch: args.pretrain_batch,
        eval_every: args.eval_every,
        eval_windows: args.eval_windows,
        peer_keys: Vec::new(),
    };
    let started = std::time::Instant::now();
    let report = futures::executor::block_on(sim::simulate::<Autodiff<NdArray>>(
        &Default::default(),
        &corpus,
        &config,
        |p| {
            eprintln!(
                "step {:>5}  tokens {:>10}  bytes {:>13}  val loss {:.4}  ({:.0} s)",
                p.step,
                p.tokens,
                p.bytes,
                p.val_loss,
                started.elapsed().as_secs_f64()
            );
        },
    ))?;
    let wall = started.elapsed().as_secs_f64();
    let params_bytes: Vec<u8> = report.params.iter().flat_map(|v| v.to_le_bytes()).collect();
    let params_blake3 = blake3::hash(&params_bytes).to_hex().to_string();
    println!(
        "final val loss {:.4} after {} tokens, {} bytes in {} syncs, {} parameters, θ BLAKE3 {}, {:.0} s",
        report.final_val_loss,
        report.tokens,
        report.bytes,
        report.syncs,
        report.num_params,
        &params_blake3[..16],
        wall
    );
    if let Some(path) = &args.params_out {
        std::fs::write(path, &params_bytes)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
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
        std::fs::write(&out, serde_json::to_vec_pretty(&json)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
    }
    Ok(())
}
