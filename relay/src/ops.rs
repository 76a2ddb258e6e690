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
    let metadata = BTreeMap::from([
        ("format".to_owned(), "swarmtrain".to_owned()),
        ("run_id".to_owned(), run_id),
        ("round".to_owned(), round.to_string()),
        ("params_blake3".to_owned(), hash),
        ("model".to_owned(), serde_json::to_string(&model)?),
        (
            "layout".to_owned(),
            "burn: Linear weights are [in, out]".to_owned(),
        ),
    ]);
    let file = checkpoint::to_safetensors(&model_layout(&model), &values, &metadata)?;
    Ok((file, status))
}
