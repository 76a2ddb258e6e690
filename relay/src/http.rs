//! The relay's HTTP side: the page and the npm package, run data, checkpoints, status,
//! health and metrics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use swarmtrain_client::peer::Bootstrap;
use swarmtrain_shared::protocol::ParamsHash;
use tower_http::services::ServeDir;

use crate::coordinator::Coordinator;

#[derive(Clone, Debug)]
pub struct AppState {
    pub coordinator: Arc<Coordinator>,
    pub bootstrap: Arc<Bootstrap>,
}

/// An error with a safe public message; details go to the log.
#[derive(Debug)]
pub enum ApiError {
    NotFound(&'static str),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::NotFound(what) => (StatusCode::NOT_FOUND, format!("{what} not found\n")).into_response(),
        }
    }
}

/// The relay's router. `web_dir` holds the page and, under `pkg/`, the npm package.
pub fn app(state: AppState, web_dir: PathBuf) -> Router {
    Router::new()
        .route("/api/bootstrap", get(bootstrap))
        .route("/api/status", get(status))
        .route("/api/runs/{run}/params/{hash}", get(params))
        .route("/api/runs/{run}/shards/{index}", get(shard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state)
        .fallback_service(ServeDir::new(web_dir))
}

async fn bootstrap(State(state): State<AppState>) -> Json<Bootstrap> {
    Json((*state.bootstrap).clone())
}

async fn status(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Json(state.coordinator.status().await))
}

async fn check_run(state: &AppState, run: &str) -> Result<(), ApiError> {
    if state.coordinator.run_id().await == run { Ok(()) } else { Err(ApiError::NotFound("run")) }
}

async fn params(State(state): State<AppState>, Path((run, hash)): Path<(String, String)>) -> Result<Response, ApiError> {
    check_run(&state, &run).await?;
    let hash = ParamsHash::from_hex(&hash).ok_or(ApiError::NotFound("parameters"))?;
    let bytes = state.coordinator.params(&hash).await.ok_or(ApiError::NotFound("parameters"))?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream"), (header::CACHE_CONTROL, "public, max-age=31536000, immutable")],
        (*bytes).clone(),
    )
        .into_response())
}

async fn shard(State(state): State<AppState>, Path((run, index)): Path<(String, usize)>) -> Result<Response, ApiError> {
    check_run(&state, &run).await?;
    let bytes = state.coordinator.shard(index).ok_or(ApiError::NotFound("shard"))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let s = state.coordinator.status().await;
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, rows: BTreeMap<String, f64>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: f64| BTreeMap::from([(String::new(), v)]);
    metric("swarmtrain_round", "The open round.", "gauge", one(s.round as f64));
    metric("swarmtrain_active_peers", "Peers heard from recently.", "gauge", one(s.active_peers as f64));
    metric("swarmtrain_joined_peers", "Peers that joined since start.", "counter", one(s.joined_peers as f64));
    metric("swarmtrain_accepted_updates_total", "Accepted updates.", "counter", one(s.accepted_updates as f64));
    let accuracy = s.history.last().and_then(|r| r.accuracy).unwrap_or(f32::NAN);
    metric("swarmtrain_heldout_accuracy", "Held-out accuracy of the current parameters.", "gauge", one(f64::from(accuracy)));
    let aggregation = s.history.last().map_or(0.0, |r| r.aggregation_ms / 1e3);
    metric("swarmtrain_last_aggregation_seconds", "Time of the last round's aggregation.", "gauge", one(aggregation));
    if let Some(eps) = s.privacy_epsilon {
        metric("swarmtrain_privacy_epsilon", "Differential privacy spent per peer (at the run's delta).", "gauge", one(eps));
    }
    let rejected = s.rejected.iter().map(|(k, v)| (format!("{{reason=\"{k}\"}}"), *v as f64)).collect();
    metric("swarmtrain_rejected_messages_total", "Rejected messages by reason.", "counter", rejected);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
