//! Operator commands that talk to a running relay over HTTP: `status`, `credits` and `export`.

use std::collections::BTreeMap;

use anyhow::Context;
use burn::backend::NdArray;
use swarmtrain_net::http::{get as http_get, url};
use swarmtrain_shared::checkpoint::{self, TensorInfo};
use swarmtrain_shared::protocol::{ModelConfig, ModelSpec, params_from_bytes};

/// The relay's `/api/status` document.
pub async fn status(relay: &str) -> anyhow::Result<serde_json::Value> {
    let bytes = http_get(&url(relay, "api/status"))
        .await
        .map_err(anyhow::Error::msg)?;
    serde_json::from_slice(&bytes).context("the relay's /api/status is not JSON")
}

/// A run's leaderboard (`/api/runs/{run}/leaderboard`), the default run's when `run` is None.
pub async fn leaderboard(
    relay: &str,
    run: Option<&str>,
    limit: usize,
) -> anyhow::Result<(String, serde_json::Value)> {
    let run = match run {
        Some(run) => run.to_owned(),
        None => status(relay)
            .await?
            .get("run_id")
            .and_then(|r| r.as_str())
            .context("/api/status names no run")?
            .to_owned(),
    };
    let bytes = http_get(&url(
        relay,
        &format!("api/runs/{run}/leaderboard?limit={limit}"),
    ))
    .await
    .map_err(anyhow::Error::msg)?;
    let board = serde_json::from_slice(&bytes).context("the relay's leaderboard is not JSON")?;
    Ok((run, board))
}

/// Names and shapes of a model's tensors, in flat-vector order.
pub fn model_layout(model: &ModelSpec) -> Vec<TensorInfo> {
    let device = Default::default();
    match model.config() {
        ModelConfig::Lm(config) => checkpoint::layout(&config.init::<NdArray>(&device)),
        ModelConfig::Digits(config) => checkpoint::layout(&config.init::<NdArray>(&device)),
    }
}

/// The run's current global parameters as safetensors bytes, with the run id, round and
/// parameter hash as metadata. The parameters are checked against their BLAKE3 hash.
pub async fn export(relay: &str) -> anyhow::Result<(Vec<u8>, serde_json::Value)> {
    let status = status(relay).await?;
    let field = |key: &str| {
        status
            .get(key)
            .with_context(|| format!("/api/status has no {key}"))
    };
    let run_id = field("run_id")?
        .as_str()
        .context("run_id is not a string")?
        .to_owned();
    let hash = field("params_hash")?
        .as_str()
        .context("params_hash is not a string")?
        .to_owned();
    let round = field("round")?.as_u64().context("round is not a number")?;
    let model: ModelSpec = serde_json::from_value(
        field("spec")?
            .get("model")
            .cloned()
            .context("/api/status has no spec.model")?,
    )
    .context("unknown model in /api/status")?;
    let bytes = http_get(&url(relay, &format!("api/runs/{run_id}/params/{hash}")))
        .await
        .map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        blake3::hash(&bytes).to_hex().as_str() == hash,
        "parameters do not match their hash {hash}"
    );
    let values = params_from_bytes(&bytes).context("the relay sent malformed parameters")?;
    let metadata = checkpoint_metadata(&run_id, round, &hash, &field("spec")?.to_string())?;
    let file = checkpoint::to_safetensors(&model_layout(&model), &values, &metadata)?;
    Ok((file, status))
}

/// What every checkpoint the relay writes says of itself, exported or kept in its data
/// directory: the run and round, θ's BLAKE3 hash, the model (`ModelSpec` as JSON), the run's
/// seed (it decides θ₀, and for a language model the held-out split and the order of the
/// training windows), the run's settings as `/api/status` shows them
/// (`spec`, the JSON text `/api/status` writes) and the tensor layout. With the corpus, enough to rebuild the model and evaluate it
/// on the run's held-out windows from the file alone.
pub fn checkpoint_metadata(
    run_id: &str,
    round: u64,
    params_hash: &str,
    spec_json: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let spec: serde_json::Value =
        serde_json::from_str(spec_json).context("the run's spec is not JSON")?;
    let model = spec.get("model").context("the run's spec names no model")?;
    let seed = spec
        .get("seed")
        .and_then(|s| s.as_u64())
        .context("the run's spec has no seed")?;
    Ok(BTreeMap::from([
        ("format".to_owned(), "swarmtrain".to_owned()),
        ("run_id".to_owned(), run_id.to_owned()),
        ("round".to_owned(), round.to_string()),
        ("params_blake3".to_owned(), params_hash.to_owned()),
        ("model".to_owned(), serde_json::to_string(model)?),
        ("seed".to_owned(), seed.to_string()),
        ("spec".to_owned(), spec_json.to_owned()),
        (
            "layout".to_owned(),
            "burn: Linear weights are [in, out]".to_owned(),
        ),
    ]))
}
