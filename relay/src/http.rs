//! The relay's HTTP side: the page and the npm package, run data, checkpoints, status,
//! health and metrics.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use swarmtrain_net::Bootstrap;
use swarmtrain_shared::protocol::{ParamsHash, RunSpec};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::services::ServeDir;

use crate::Runs;
use crate::coordinator::{Coordinator, Status};

#[derive(Clone, Debug)]
pub struct AppState {
    pub runs: Arc<Runs>,
    /// The bootstrap document with every address; each client is told its share.
    pub bootstrap: Arc<Bootstrap>,
    pub network: Arc<crate::p2p::Network>,
    /// The federation's relays, for the bootstrap document.
    pub federation: Arc<crate::federation::Federation>,
    pub public: Arc<Public>,
}

/// What the relay tells clients on the internet: its addresses, its ICE servers, and whom it
/// lets in (CORS) or believes (proxies).
#[derive(Debug, Default)]
pub struct Public {
    pub addresses: crate::public::Addresses,
    pub ice: crate::public::Ice,
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// `*` or origins (`https://site.example`); empty: no cross-origin access.
    pub allow_origins: Vec<String>,
    /// Whether any libp2p peer may hold a reservation (else `/api/reachable` lists only peers
    /// whose identity has joined a run).
    pub open_circuit_relay: bool,
}

/// Who is asking, as far as the relay can tell: the client's IP (from the connection, or the
/// last `X-Forwarded-For` hop when the connection is a trusted proxy's) and the host it asked
/// for (`Host`, or `X-Forwarded-Host` from a trusted proxy). None in tests without sockets.
#[derive(Debug)]
pub struct Asker {
    pub ip: Option<std::net::IpAddr>,
    pub host: Option<String>,
}

impl axum::extract::FromRequestParts<AppState> for Asker {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<crate::tls::Client>>()
            .map(|c| c.0.0.ip());
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let proxied = peer.is_some_and(|ip| state.public.trusted_proxies.contains(&ip));
        let forwarded_for = proxied
            .then(|| header("x-forwarded-for"))
            .flatten()
            .and_then(|v| v.rsplit(',').next().and_then(|ip| ip.trim().parse().ok()));
        let host = proxied
            .then(|| header("x-forwarded-host"))
            .flatten()
            .or_else(|| header("host"))
            .map(|h| crate::public::host_without_port(&h).to_owned());
        Ok(Self {
            ip: forwarded_for.or(peer),
            host,
        })
    }
}

/// An error with a safe public message; details go to the log.
#[derive(Debug)]
pub enum ApiError {
    NotFound(&'static str),
    /// Details are logged where it happens.
    Internal,
    /// An edge relay could not read what its root holds (the reason is logged and sent).
    Upstream(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::NotFound(what) => {
                (StatusCode::NOT_FOUND, format!("{what} not found\n")).into_response()
            }
            Self::Internal => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
            }
            Self::Upstream(why) => (
                StatusCode::BAD_GATEWAY,
                [(header::RETRY_AFTER, "5")],
                format!("the root relay could not be read: {why}\n"),
            )
                .into_response(),
        }
    }
}

/// CORS for the API: the origins the operator allows (`*`: any), `GET` and `HEAD` only, no
/// credentials (the API has no cookies; peers sign what they send). Preflights are answered
/// and cached for a day.
fn cors(origins: &[String]) -> anyhow::Result<CorsLayer> {
    let layer = CorsLayer::new()
        .allow_methods([axum::http::Method::GET, axum::http::Method::HEAD])
        .max_age(std::time::Duration::from_secs(24 * 3600));
    Ok(if origins.iter().any(|o| o == "*") {
        layer.allow_origin(AllowOrigin::any())
    } else {
        let list = origins
            .iter()
            .map(|o| {
                let o = o.trim_end_matches('/');
                anyhow::ensure!(
                    o.starts_with("http://") || o.starts_with("https://"),
                    "--allow-origin {o:?}: an origin is scheme://host[:port], or *"
                );
                Ok(axum::http::HeaderValue::from_str(o)?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        layer.allow_origin(AllowOrigin::list(list))
    })
}

/// API requests handled at once, all routes together; more are answered 503 at once (tower's
/// `GlobalConcurrencyLimit` under `LoadShed`), with `Retry-After`.
pub const MAX_API_REQUESTS: usize = 512;
/// An API request that has no answer after this long is answered 408 (tower-http's `Timeout`).
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// What the API says when it sheds load (counted in `shed`).
async fn overloaded(shed: Arc<crate::p2p::Network>, error: tower::BoxError) -> Response {
    if error.is::<tower::load_shed::error::Overloaded>() {
        tracing::info!("API request shed: as many as the relay handles at once are in progress");
        shed.api_shed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "the relay is busy: try again in a second\n",
        )
            .into_response()
    } else {
        tracing::warn!(%error, "API request failed");
        (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")).into_response()
    }
}

/// `router` handling at most `max` requests at once (tower's `GlobalConcurrencyLimit` under
/// `LoadShed`: more are answered 503 and counted in `shed`) and answering each within `timeout`
/// (tower-http's `Timeout`: 408).
fn with_limits<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    shed: Arc<crate::p2p::Network>,
    max: usize,
    timeout: Duration,
) -> Router<S> {
    router.layer(
        tower::ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(
                move |error: tower::BoxError| overloaded(shed.clone(), error),
            ))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(max))
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                timeout,
            )),
    )
}

/// The relay's router. `web_dir` holds the page and, under `pkg/`, the npm package. The API
/// (`/api/…`, what the npm package calls) answers CORS for the allowed origins, handles at
/// most [`MAX_API_REQUESTS`] at once and answers each within [`API_TIMEOUT`].
pub fn app(state: AppState, web_dir: PathBuf) -> anyhow::Result<Router> {
    let cors = cors(&state.public.allow_origins)?;
    let api = Router::new()
        .route("/api/bootstrap", get(bootstrap))
        .route("/api/ping", get(ping))
        .route("/api/status", get(status))
        .route("/api/runs", get(runs))
        .route("/api/runs/{run}/status", get(run_status))
        .route("/api/runs/{run}/params/{hash}", get(params))
        .route("/api/runs/{run}/shards/{index}", get(shard))
        .route("/api/runs/{run}/text/{round}/{slot}", get(text))
        .route("/api/runs/{run}/history", get(history))
        .route("/api/runs/{run}/peers/{peer}", get(peer_credit))
        .route("/api/runs/{run}/leaderboard", get(leaderboard))
        .route("/api/reachable", get(reachable));
    let api = with_limits(api, state.network.clone(), MAX_API_REQUESTS, API_TIMEOUT).layer(cors);
    Ok(Router::new()
        .merge(api)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state)
        // The page's files; `cargo xtask build-wasm` writes brotli and gzip copies of the
        // package beside it (`.br`, `.gz`), served in its place to browsers that accept them.
        .fallback_service(
            ServeDir::new(web_dir)
                .precompressed_br()
                .precompressed_gzip(),
        ))
}

#[derive(Debug, serde::Deserialize)]
struct BootstrapQuery {
    /// The asking peer's ID: the tag in its TURN username.
    #[serde(default)]
    peer: String,
}

/// Where to dial the relay (the addresses for the host the client asked for, never loopback to
/// a client elsewhere), each run's admission terms, the ICE servers with TURN credentials for
/// `?peer=`, and the relay's clock (peers make their envelopes expire on it).
async fn bootstrap(
    State(state): State<AppState>,
    asker: Asker,
    Query(query): Query<BootstrapQuery>,
) -> impl IntoResponse {
    let now = crate::runs::unix_ms();
    let doc = Bootstrap {
        time_ms: now,
        addresses: state
            .public
            .addresses
            .for_client(asker.host.as_deref(), asker.ip),
        ice_servers: state.public.ice.for_peer(&query.peer, now / 1000),
        federation: state.federation.for_client(asker.ip, now),
        ..(*state.bootstrap).clone()
    };
    // Minted credentials and the clock are for this answer only.
    ([(header::CACHE_CONTROL, "no-store")], Json(doc))
}

/// A federation's clients time this to find the nearest relay (never cached: a cached answer
/// would time nothing).
async fn ping() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], "ok\n")
}

/// `?history=N`: how many of the newest history rows a status carries (default and most: 200).
/// A page that keeps its own copy asks for 0 and fetches new rows from `/history`.
#[derive(Debug, serde::Deserialize)]
struct StatusQuery {
    #[serde(default = "history_page")]
    history: usize,
}

/// The default run's status.
async fn status(
    State(state): State<AppState>,
    Query(query): Query<StatusQuery>,
) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(state.runs.default_run().status_with(query.history).await),
    )
}

/// Every run's status (`?history=N` as for one run).
async fn runs(
    State(state): State<AppState>,
    Query(query): Query<StatusQuery>,
) -> impl IntoResponse {
    let mut all: Vec<Status> = Vec::new();
    for run in state.runs.iter() {
        all.push(run.status_with(query.history).await);
    }
    ([(header::CACHE_CONTROL, "no-store")], Json(all))
}

async fn run_status(
    State(state): State<AppState>,
    Path(run): Path<String>,
    Query(query): Query<StatusQuery>,
) -> Result<Response, ApiError> {
    let run = find_run(&state, &run)?;
    Ok((
        [(header::CACHE_CONTROL, "no-store")],
        Json(run.status_with(query.history).await),
    )
        .into_response())
}

fn find_run<'a>(state: &'a AppState, run: &str) -> Result<&'a Arc<Coordinator>, ApiError> {
    state.runs.get(run).ok_or(ApiError::NotFound("run"))
}

/// On an edge relay without a shared ledger: the root's answer to `GET path` (the federation's
/// ledger is then the root's: a peer's credit and the leaderboard count every update, whichever
/// relay it came through); `None` on a relay that owns `run` or reads the shared ledger
/// ([`crate::ledger`]).
async fn from_root(run: &Coordinator, path: &str) -> Option<Result<Response, ApiError>> {
    if !run.follows_root() || run.shared_ledger().is_some() {
        return None;
    }
    let Some(root) = run.root_url() else {
        return Some(Err(ApiError::Upstream(
            "this edge relay has not reached its root yet".into(),
        )));
    };
    let url = swarmtrain_net::http::url(&root, path);
    Some(match swarmtrain_net::http::get(&url).await {
        Ok(body) => Ok((
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::CONTENT_TYPE, "application/json"),
            ],
            body,
        )
            .into_response()),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the root's ledger for a client");
            Err(ApiError::Upstream(e))
        }
    })
}

/// A ledger read that failed: the shared ledger's database out of reach is the relay's
/// upstream failing (502), anything else the relay's own (500).
fn ledger_error(run: &Coordinator, what: &str, error: &anyhow::Error) -> ApiError {
    tracing::error!(error = %error, "could not read {what}");
    if run.shared_ledger().is_some() {
        ApiError::Upstream(format!(
            "the shared ledger cannot be read just now ({what})"
        ))
    } else {
        ApiError::Internal
    }
}

async fn params(
    State(state): State<AppState>,
    Path((run, hash)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let run = find_run(&state, &run)?;
    let hash = ParamsHash::from_hex(&hash).ok_or(ApiError::NotFound("parameters"))?;
    let bytes = run
        .params(&hash)
        .await
        .ok_or(ApiError::NotFound("parameters"))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        bytes,
    )
        .into_response())
}

async fn shard(
    State(state): State<AppState>,
    Path((run, index)): Path<(String, usize)>,
) -> Result<Response, ApiError> {
    let bytes = find_run(&state, &run)?
        .shard(index)
        .ok_or(ApiError::NotFound("shard"))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Text runs: the windows a slot trains on in a round (`GET /api/runs/{run}/text/{round}/{slot}`).
async fn text(
    State(state): State<AppState>,
    Path((run, round, slot)): Path<(String, u64, u32)>,
) -> Result<Response, ApiError> {
    let bytes = find_run(&state, &run)?
        .text(round, slot)
        .await
        .ok_or(ApiError::NotFound("text"))?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        bytes,
    )
        .into_response())
}

#[derive(Debug, serde::Deserialize)]
struct HistoryQuery {
    #[serde(default)]
    from: u64,
    #[serde(default = "history_page")]
    limit: usize,
}

fn history_page() -> usize {
    crate::coordinator::STATUS_HISTORY
}

/// A run's round history from round `?from=R`, at most `&limit=M` rows (200 a page), oldest
/// first.
async fn history(
    State(state): State<AppState>,
    Path(run): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let rows = find_run(&state, &run)?
        .history(query.from, query.limit)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "could not read the history");
            ApiError::Internal
        })?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(rows)).into_response())
}

/// A peer's credit as the API serves it: its key (hex), what its accepted updates add up to,
/// and the same in the run's credit units (tokens of a language model, images of the digits).
#[derive(serde::Serialize)]
struct PeerCredit {
    peer: String,
    #[serde(flatten)]
    credit: crate::store::Credit,
    unchecked_samples: u64,
    /// Credit units earned: verified and unchecked samples × units per sample.
    units: u64,
    verified_units: u64,
    unchecked_units: u64,
    failed_units: u64,
    unit: &'static str,
}

impl PeerCredit {
    fn new(
        peer: &swarmtrain_shared::PeerKey,
        credit: crate::store::Credit,
        spec: &RunSpec,
    ) -> Self {
        let per = spec.units_per_sample();
        Self {
            peer: peer.to_hex(),
            unchecked_samples: credit.unchecked_samples(),
            units: credit.earned_samples() * per,
            verified_units: credit.verified_samples * per,
            unchecked_units: credit.unchecked_samples() * per,
            failed_units: credit.failed_samples * per,
            unit: spec.unit_name(),
            credit,
        }
    }
}

/// One of the relay's signed verdicts as the API serves it: what it concluded, and the
/// verdict as signed (postcard, hex) for anyone to check with the relay's key.
#[derive(serde::Serialize)]
struct VerdictView {
    #[serde(flatten)]
    verdict: swarmtrain_shared::verify::Verdict,
    signed: String,
}

/// `GET /api/runs/{run}/peers/{peer}`: the credit of the peer whose key is `peer` (64 hex
/// digits, as `Joined` and `keygen` print it), and the relay's verdicts on its updates of the
/// last 20 rounds; zero for a peer that never had an update accepted, 404 for a key that is
/// not 64 hex digits. An edge relay answers with its root's (502 when it cannot reach it).
async fn peer_credit(
    State(state): State<AppState>,
    Path((run, peer)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let run = find_run(&state, &run)?;
    let key = swarmtrain_shared::crypto::seed_from_hex(&peer)
        .map(|bytes| swarmtrain_shared::PeerKey(*bytes))
        .ok_or(ApiError::NotFound("peer"))?;
    let path = format!("api/runs/{}/peers/{}", run.spec().run_id, key.to_hex());
    if let Some(answer) = from_root(run, &path).await {
        return answer;
    }
    let credit = run
        .credit(&key)
        .await
        .map_err(|e| ledger_error(run, "a peer's credit", &e))?
        .unwrap_or_default();
    let verdicts: Vec<VerdictView> = run
        .verdicts(&key)
        .await
        .map_err(|e| ledger_error(run, "the verdicts", &e))?
        .into_iter()
        .filter_map(|signed| {
            Some(VerdictView {
                verdict: postcard::from_bytes(&signed.body).ok()?,
                signed: postcard::to_allocvec(&signed).ok()?.iter().fold(
                    String::new(),
                    |mut out, b| {
                        let _ = write!(out, "{b:02x}");
                        out
                    },
                ),
            })
        })
        .collect();
    #[derive(serde::Serialize)]
    struct Body {
        #[serde(flatten)]
        credit: PeerCredit,
        verdicts: Vec<VerdictView>,
    }
    let body = Body {
        credit: PeerCredit::new(&key, credit, run.spec()),
        verdicts,
    };
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

#[derive(serde::Deserialize)]
struct LeaderboardQuery {
    #[serde(default = "leaderboard_page")]
    limit: usize,
}

fn leaderboard_page() -> usize {
    20
}

/// Most peers one leaderboard answer lists.
const LEADERBOARD_MAX: usize = 100;

/// `GET /api/runs/{run}/leaderboard?limit=N`: the N (default 20, at most 100) peers with the
/// most earned samples (verified and unchecked; then the most verified), and how many peers
/// have credit at all. An edge relay answers with its root's.
async fn leaderboard(
    State(state): State<AppState>,
    Path(run): Path<String>,
    Query(query): Query<LeaderboardQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit.min(LEADERBOARD_MAX);
    let owner = find_run(&state, &run)?;
    let path = format!("api/runs/{}/leaderboard?limit={limit}", owner.spec().run_id);
    if let Some(answer) = from_root(owner, &path).await {
        return answer;
    }
    let (top, peers) = owner
        .leaderboard(limit)
        .await
        .map_err(|e| ledger_error(owner, "the leaderboard", &e))?;
    let spec = owner.spec();
    let top: Vec<PeerCredit> = top
        .into_iter()
        .map(|(peer, credit)| PeerCredit::new(&peer, credit, spec))
        .collect();
    let body = serde_json::json!({ "peers": peers, "top": top });
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

#[derive(Debug, serde::Deserialize)]
struct ReachableQuery {
    #[serde(default = "reachable_page")]
    limit: usize,
}

fn reachable_page() -> usize {
    8
}

/// The relay's resident memory, where the OS says (Linux: `VmRSS` in `/proc/self/status`).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `GET /api/reachable?limit=N`: up to N (default 8, at most 32) libp2p peer IDs of peers that
/// hold a circuit relay reservation here and whose identity has joined a run (any, with
/// `--open-circuit-relay`), the most recent first, so a browser can dial them browser-to-browser
/// (`<relay>/p2p-circuit/webrtc/p2p/<peer>`).
async fn reachable(
    State(state): State<AppState>,
    Query(query): Query<ReachableQuery>,
) -> impl IntoResponse {
    let peers: Vec<String> = state
        .network
        .newest_reachable(query.limit.min(32), |peer| {
            state.public.open_circuit_relay || state.runs.has_joined(peer)
        })
        .iter()
        .map(ToString::to_string)
        .collect();
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(serde_json::json!({ "peers": peers })),
    )
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut all = Vec::new();
    for run in state.runs.iter() {
        all.push(run.status_with(1).await);
    }
    let mut out = String::new();
    let mut metric =
        |name: &str, help: &str, kind: &str, value: &dyn Fn(&Status) -> Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in &all {
                for (labels, v) in value(s) {
                    let sep = if labels.is_empty() { "" } else { "," };
                    let _ = writeln!(out, "{name}{{run=\"{}\"{sep}{labels}}} {v}", s.run_id);
                }
            }
        };
    let one = |v: f64| vec![(String::new(), v)];
    metric("swarmtrain_round", "The open round.", "gauge", &|s| {
        one(s.round as f64)
    });
    metric(
        "swarmtrain_active_peers",
        "Peers heard from recently.",
        "gauge",
        &|s| one(s.active_peers as f64),
    );
    metric(
        "swarmtrain_joined_peers",
        "Peers that joined since start.",
        "counter",
        &|s| one(s.joined_peers as f64),
    );
    metric(
        "swarmtrain_accepted_updates_total",
        "Accepted updates.",
        "counter",
        &|s| one(s.accepted_updates as f64),
    );
    metric(
        "swarmtrain_heldout_accuracy",
        "Held-out accuracy of the current parameters.",
        "gauge",
        &|s| {
            one(f64::from(
                s.history
                    .last()
                    .and_then(|r| r.accuracy)
                    .unwrap_or(f32::NAN),
            ))
        },
    );
    metric(
        "swarmtrain_heldout_loss",
        "Held-out loss (nats per byte) of the current parameters (language-model runs).",
        "gauge",
        &|s| {
            s.history
                .last()
                .and_then(|r| r.val_loss)
                .map(|l| one(f64::from(l)))
                .unwrap_or_default()
        },
    );
    metric(
        "swarmtrain_last_aggregation_seconds",
        "Time of the last round's aggregation.",
        "gauge",
        &|s| one(s.history.last().map_or(0.0, |r| r.aggregation_ms / 1e3)),
    );
    metric(
        "swarmtrain_privacy_epsilon",
        "Differential privacy spent per peer (at the run's delta).",
        "gauge",
        &|s| s.privacy_epsilon.map(one).unwrap_or_default(),
    );
    metric(
        "swarmtrain_checkpoint_failures_total",
        "Checkpoint writes that failed (the round waits unannounced until one succeeds).",
        "counter",
        &|s| one(s.checkpoint_failures as f64),
    );
    metric(
        "swarmtrain_rejected_messages_total",
        "Rejected messages by reason.",
        "counter",
        &|s| {
            s.rejected
                .iter()
                .map(|(k, v)| (format!("reason=\"{k}\""), *v as f64))
                .collect()
        },
    );
    metric(
        "swarmtrain_update_checks_total",
        "Accepted updates whose work the relay checked, by outcome (verified, failed, \
         inconclusive; unrecorded: the store refused the verdicts).",
        "counter",
        &|s| {
            s.checks
                .iter()
                .map(|(k, v)| (format!("outcome=\"{k}\""), *v as f64))
                .collect()
        },
    );
    metric(
        "swarmtrain_check_power",
        "The last checked round's upper-quartile check score (failures count only at or above the \
         pass score).",
        "gauge",
        &|s| s.check_power.map(|p| one(f64::from(p))).unwrap_or_default(),
    );
    metric(
        "swarmtrain_replays_total",
        "Updates drawn for a replay, by outcome (exact, near: within the tolerance, differs, \
         no_reveal, mismatch: not the committed state, bad_reveal: the committed state does not \
         replay, behind: not replayed).",
        "counter",
        &|s| {
            s.replays
                .iter()
                .map(|(k, v)| (format!("outcome=\"{k}\""), *v as f64))
                .collect()
        },
    );
    metric(
        "swarmtrain_reveal_bytes_total",
        "Bytes of committed training states revealed for replays.",
        "counter",
        &|s| one(s.reveal_bytes as f64),
    );
    metric(
        "swarmtrain_verifiers",
        "Volunteer verifiers heard from within the verifier timeout.",
        "gauge",
        &|s| one(s.verifiers as f64),
    );
    metric(
        "swarmtrain_verifier_jobs",
        "Revealed updates waiting for a volunteer verifier or held by one.",
        "gauge",
        &|s| one(s.verifier_jobs as f64),
    );
    metric(
        "swarmtrain_verifier_reports_total",
        "Volunteer verifiers' replays by what became of them (trusted: kept as the verdict, \
         confirmed: the relay's replay agreed, caught: it did not and the verifier is banned, \
         unable: the verifier could not replay, timeout: it did not report in time).",
        "counter",
        &|s| {
            s.verifier_reports
                .iter()
                .map(|(k, v)| (format!("outcome=\"{k}\""), *v as f64))
                .collect()
        },
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_tracked_identities Identities whose unexpired envelopes the replay \
         guard tracks.\n# TYPE swarmtrain_tracked_identities gauge\n\
         swarmtrain_tracked_identities {}",
        state.runs.tracked_identities()
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_sealed_connections Connections whose payloads and chunks are sealed \
         with agreed ML-KEM-768 + X25519 keys.\n# TYPE swarmtrain_sealed_connections gauge\n\
         swarmtrain_sealed_connections {}",
        state.runs.sealed_connections()
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_closed_for_strikes_total Connections closed after {} refusals an \
         honest peer never earns.\n# TYPE swarmtrain_closed_for_strikes_total counter\n\
         swarmtrain_closed_for_strikes_total {}",
        crate::runs::MAX_STRIKES,
        state.runs.closed_for_strikes()
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_params_bytes_served_total Bytes of parameters served in chunks over \
         libp2p (not over HTTP).\n# TYPE swarmtrain_params_bytes_served_total counter\n\
         swarmtrain_params_bytes_served_total {}",
        state.runs.params_bytes_served()
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_circuit_reservations Peers holding a circuit relay reservation (reachable \
         browser-to-browser).\n# TYPE swarmtrain_circuit_reservations gauge\n\
         swarmtrain_circuit_reservations {}",
        state.network.reachable()
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_api_shed_total API requests answered 503 because {MAX_API_REQUESTS} \
         were in progress.\n# TYPE swarmtrain_api_shed_total counter\n\
         swarmtrain_api_shed_total {}",
        state
            .network
            .api_shed
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_connections_refused_total Incoming libp2p connections refused by a \
         limit (in total, per peer ID, per IP address, handshakes in progress).\n\
         # TYPE swarmtrain_connections_refused_total counter\n\
         swarmtrain_connections_refused_total {}",
        state
            .network
            .refused_connections
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let (reservations, circuits) = state.network.refused_relaying();
    let _ = writeln!(
        out,
        "# HELP swarmtrain_relaying_refused_total Circuit relay requests refused (from a peer \
         whose identity has not joined a run, or over a limit).\n\
         # TYPE swarmtrain_relaying_refused_total counter\n\
         swarmtrain_relaying_refused_total{{kind=\"reservation\"}} {reservations}\n\
         swarmtrain_relaying_refused_total{{kind=\"circuit\"}} {circuits}"
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_circuits_cut_total Circuits that ended in an error (over their {} \
         bytes or time limit, or a side gone).\n# TYPE swarmtrain_circuits_cut_total counter\n\
         swarmtrain_circuits_cut_total {}",
        crate::p2p::CIRCUIT_BYTES,
        state.network.circuits_cut()
    );
    let (rpc_in, rpc_out) = state.network.rpc_bytes();
    let _ = writeln!(
        out,
        "# HELP swarmtrain_rpc_received_bytes_total Bytes of request frames received over \
         libp2p request-response.\n# TYPE swarmtrain_rpc_received_bytes_total counter\n\
         swarmtrain_rpc_received_bytes_total {rpc_in}\n\
         # HELP swarmtrain_rpc_sent_bytes_total Bytes of response frames sent over libp2p \
         request-response.\n# TYPE swarmtrain_rpc_sent_bytes_total counter\n\
         swarmtrain_rpc_sent_bytes_total {rpc_out}"
    );
    let (gossip_sent, gossip_to_mesh) = state.network.gossip_copies();
    let _ = writeln!(
        out,
        "# HELP swarmtrain_linked_peers Peers holding direct links to other browsers (their \
         announcements travel over the links).\n# TYPE swarmtrain_linked_peers gauge\n\
         swarmtrain_linked_peers {}\n\
         # HELP swarmtrain_announcements_sent_total Announcement copies the relay sent itself.\n\
         # TYPE swarmtrain_announcements_sent_total counter\n\
         swarmtrain_announcements_sent_total {gossip_sent}\n\
         # HELP swarmtrain_announcements_to_mesh_total Announcement copies left to linked \
         browsers to forward.\n# TYPE swarmtrain_announcements_to_mesh_total counter\n\
         swarmtrain_announcements_to_mesh_total {gossip_to_mesh}",
        state.network.linked()
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_connections Open libp2p connections.\n\
         # TYPE swarmtrain_connections gauge\nswarmtrain_connections {}",
        state.network.connections()
    );
    let _ = writeln!(
        out,
        "# HELP swarmtrain_connections_by_transport Open libp2p connections by the transport \
         they came over (tcp, ws, wss, webrtc-direct).\n\
         # TYPE swarmtrain_connections_by_transport gauge"
    );
    for (transport, n) in state.network.connections_by_transport() {
        let _ = writeln!(
            out,
            "swarmtrain_connections_by_transport{{transport=\"{transport}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP swarmtrain_advertised_address An address /api/bootstrap tells clients (loopback \
         ones only to clients on loopback).\n# TYPE swarmtrain_advertised_address gauge"
    );
    for (transport, address, loopback) in state.public.addresses.describe() {
        let _ = writeln!(
            out,
            "swarmtrain_advertised_address{{transport=\"{transport}\",address=\"{address}\",loopback=\"{loopback}\"}} 1"
        );
    }
    if let Some(ledger) = state.runs.iter().find_map(|run| run.shared_ledger()) {
        let stats = ledger.stats();
        let _ = writeln!(
            out,
            "# HELP swarmtrain_shared_ledger_rows_total Rows for the shared ledger by what became \
             of them (written; dropped: the queue was full; filled_in: written again by a root \
             from its data directory).\n# TYPE swarmtrain_shared_ledger_rows_total counter\n\
             swarmtrain_shared_ledger_rows_total{{outcome=\"written\"}} {}\n\
             swarmtrain_shared_ledger_rows_total{{outcome=\"dropped\"}} {}\n\
             swarmtrain_shared_ledger_rows_total{{outcome=\"filled_in\"}} {}\n\
             # HELP swarmtrain_shared_ledger_failed_writes_total Shared ledger transactions that \
             failed (each tried again).\n# TYPE swarmtrain_shared_ledger_failed_writes_total \
             counter\nswarmtrain_shared_ledger_failed_writes_total {}\n\
             # HELP swarmtrain_shared_ledger_queued Rows waiting to be written to the shared \
             ledger.\n# TYPE swarmtrain_shared_ledger_queued gauge\n\
             swarmtrain_shared_ledger_queued {}\n\
             # HELP swarmtrain_shared_ledger_failed_reads_total Shared ledger reads that failed (the \
             API answers those 502).\n# TYPE swarmtrain_shared_ledger_failed_reads_total counter\n\
             swarmtrain_shared_ledger_failed_reads_total {}",
            stats.written,
            stats.dropped,
            stats.filled_in,
            stats.failed_writes,
            stats.queued,
            stats.failed_reads
        );
    }
    if let Some(bytes) = resident_bytes() {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {bytes}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The router alone, through `oneshot` (no sockets, no libp2p): one digits run, no store.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use swarmtrain_net::Bootstrap;
    use tower::ServiceExt;

    use std::time::Duration;

    use axum::Router;

    use super::{AppState, Public, app, with_limits};

    async fn router(web_dir: &std::path::Path) -> axum::Router {
        router_with(
            web_dir,
            Public {
                allow_origins: vec!["*".into()],
                ..Default::default()
            },
        )
        .await
    }

    async fn router_with(web_dir: &std::path::Path, public: Public) -> axum::Router {
        router_of(web_dir, public, Default::default()).await
    }

    async fn router_of(
        web_dir: &std::path::Path,
        public: Public,
        federation: Arc<crate::federation::Federation>,
    ) -> axum::Router {
        let (runs, _) = crate::testing::runs(None).await;
        let bootstrap = Bootstrap {
            peer_id: "12D3KooWRelay".into(),
            run_id: "digits".into(),
            runs: runs.ids(),
            addresses: Default::default(),
            time_ms: 0,
            admission: Default::default(),
            ice_servers: Vec::new(),
            federation: Vec::new(),
        };
        app(
            AppState {
                runs,
                bootstrap: Arc::new(bootstrap),
                network: Default::default(),
                federation,
                public: Arc::new(public),
            },
            web_dir.to_owned(),
        )
        .expect("router")
    }

    /// `request` through the router as if it came from `client` over a socket.
    async fn send(
        router: &axum::Router,
        request: Request<Body>,
        client: &str,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let mut request = request;
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(crate::tls::Client(
                client.parse().expect("socket address"),
            )));
        let response = router.clone().oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 64 << 20).await.expect("body");
        (parts.status, parts.headers, bytes.to_vec())
    }

    async fn get(router: &axum::Router, uri: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let response = router
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, 64 << 20).await.expect("body");
        (parts.status, parts.headers, bytes.to_vec())
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).expect("JSON")
    }

    #[tokio::test]
    async fn the_package_travels_compressed_to_browsers_that_accept_it() {
        let web = tempfile::tempdir().expect("dir");
        let pkg = web.path().join("pkg");
        std::fs::create_dir(&pkg).expect("dir");
        std::fs::write(pkg.join("swarmtrain_bg.wasm"), b"\0asm raw").expect("write");
        std::fs::write(pkg.join("swarmtrain_bg.wasm.br"), b"brotli").expect("write");
        std::fs::write(pkg.join("swarmtrain_bg.wasm.gz"), b"gzip").expect("write");
        let router = router(web.path()).await;
        let fetch = |accept: &'static str| {
            let router = router.clone();
            async move {
                let mut request = Request::get("/pkg/swarmtrain_bg.wasm");
                if !accept.is_empty() {
                    request = request.header(header::ACCEPT_ENCODING, accept);
                }
                let response = router
                    .oneshot(request.body(Body::empty()).expect("request"))
                    .await
                    .expect("infallible");
                let encoding = response
                    .headers()
                    .get(header::CONTENT_ENCODING)
                    .map(|v| v.to_str().expect("ascii").to_owned());
                let kind = response.headers()[header::CONTENT_TYPE].clone();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .expect("body");
                (encoding, kind, body.to_vec())
            }
        };
        // What Chromium sends: brotli first.
        let (encoding, kind, body) = fetch("gzip, deflate, br, zstd").await;
        assert_eq!(
            (encoding.as_deref(), body.as_slice()),
            (Some("br"), &b"brotli"[..])
        );
        assert_eq!(
            kind, "application/wasm",
            "streaming compilation needs the wasm type"
        );
        let (encoding, _, body) = fetch("gzip").await;
        assert_eq!(
            (encoding.as_deref(), body.as_slice()),
            (Some("gzip"), &b"gzip"[..])
        );
        let (encoding, _, body) = fetch("").await;
        assert_eq!((encoding, body.as_slice()), (None, &b"\0asm raw"[..]));
    }

    #[tokio::test]
    async fn the_api_answers_what_pages_and_peers_ask() {
        let web = tempfile::tempdir().expect("dir");
        std::fs::write(web.path().join("index.html"), "<h1>swarmtrain</h1>").expect("write");
        let router = router(web.path()).await;

        let (status, _, body) = get(&router, "/healthz").await;
        assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"ok\n"[..]));

        // The bootstrap carries the relay's clock, for envelope expiry.
        let (status, _, body) = get(&router, "/api/bootstrap").await;
        assert_eq!(status, StatusCode::OK);
        let boot: Bootstrap = serde_json::from_slice(&body).expect("a Bootstrap");
        assert_eq!(
            (boot.run_id.as_str(), boot.runs.as_slice()),
            ("digits", &["digits".to_owned()][..])
        );
        assert!(boot.time_ms > 1_700_000_000_000, "{}", boot.time_ms);

        let (status, headers, body) = get(&router, "/api/status?history=0").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        let run = json(&body);
        assert_eq!(
            (run["run_id"].as_str(), run["round"].as_u64()),
            (Some("digits"), Some(0))
        );
        assert_eq!(
            json(&get(&router, "/api/runs").await.2)[0]["run_id"],
            "digits"
        );

        // θ by its hash, immutable; an unknown hash or run is a 404 with a reason.
        let hash = run["params_hash"].as_str().expect("hash").to_owned();
        let (status, headers, body) =
            get(&router, &format!("/api/runs/digits/params/{hash}")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers[header::CACHE_CONTROL]
                .to_str()
                .expect("ascii")
                .contains("immutable")
        );
        assert_eq!(
            body.len(),
            4 * run["n_params"].as_u64().expect("n") as usize
        );
        let (status, _, body) = get(
            &router,
            &format!("/api/runs/digits/params/{}", "0".repeat(64)),
        )
        .await;
        assert_eq!(
            (status, body.as_slice()),
            (StatusCode::NOT_FOUND, &b"parameters not found\n"[..])
        );
        assert_eq!(
            get(&router, "/api/runs/nope/status").await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get(&router, "/api/runs/digits/params/not-hex").await.0,
            StatusCode::NOT_FOUND
        );

        // Nobody holds a reservation or a link yet; the gauges say so.
        assert_eq!(
            json(&get(&router, "/api/reachable").await.2)["peers"],
            serde_json::json!([])
        );
        let metrics = String::from_utf8(get(&router, "/metrics").await.2).expect("text");
        for line in [
            "swarmtrain_circuit_reservations 0",
            "swarmtrain_linked_peers 0",
            "swarmtrain_announcements_sent_total 0",
        ] {
            assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
        }

        // Anything else is the page.
        let (status, _, body) = get(&router, "/").await;
        assert_eq!(
            (status, body.as_slice()),
            (StatusCode::OK, &b"<h1>swarmtrain</h1>"[..])
        );
        assert_eq!(get(&router, "/missing.js").await.0, StatusCode::NOT_FOUND);
    }

    /// A relay bound to 0.0.0.0 with interfaces 127.0.0.1 and 203.0.113.10, behind a trusted
    /// proxy at 198.51.100.1 that also serves it as relay.example.
    fn internet() -> Public {
        let bound: Vec<libp2p::Multiaddr> =
            ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/tcp/4002/tls/ws"]
                .iter()
                .map(|a| a.parse().expect("multiaddr"))
                .collect();
        let external: Vec<crate::public::External> =
            ["203.0.113.10", "/dns4/relay.example/tcp/443/tls/ws"]
                .iter()
                .map(|a| a.parse().expect("external"))
                .collect();
        Public {
            addresses: crate::public::Addresses::new(
                libp2p::PeerId::random(),
                "0.0.0.0".parse().expect("ip"),
                &bound,
                &external,
                &Default::default(),
                &[
                    "127.0.0.1".parse().expect("ip"),
                    "203.0.113.10".parse().expect("ip"),
                ],
            ),
            ice: crate::public::Ice::new(
                &[
                    "stun:203.0.113.10:3478".into(),
                    "turn:203.0.113.10:3478".into(),
                ],
                Some("s3cret".parse().expect("secret")),
                3600,
            )
            .expect("ice"),
            trusted_proxies: vec!["198.51.100.1".parse().expect("ip")],
            allow_origins: vec!["https://embed.example".into()],
            open_circuit_relay: false,
        }
    }

    #[tokio::test]
    async fn the_api_sheds_what_it_cannot_take_and_times_out_what_it_cannot_answer() {
        let network = Arc::new(crate::p2p::Network::default());
        let slow: Router = Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "late"
            }),
        );
        let app = with_limits(slow, network.clone(), 1, Duration::from_millis(100));
        let ask = || {
            app.clone()
                .oneshot(Request::get("/slow").body(Body::empty()).expect("request"))
        };
        // Two at once with room for one: the first is taken and times out, the second is shed
        // at once with a hint to retry.
        let (first, second) = tokio::join!(ask(), ask());
        let (first, second) = (first.expect("infallible"), second.expect("infallible"));
        assert_eq!(first.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(second.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            network.api_shed.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // The slot is free again.
        assert_eq!(
            ask().await.expect("infallible").status(),
            StatusCode::REQUEST_TIMEOUT
        );
    }

    #[tokio::test]
    async fn a_roots_bootstrap_lists_its_reporting_edges_and_hides_loopback_from_the_internet() {
        use swarmtrain_shared::protocol::{EdgeReport, MEMBER_TTL_MS, Member, MemberRole};

        let web = tempfile::tempdir().expect("dir");
        let federation = Arc::new(crate::federation::Federation::new(
            Some("https://root.example/".into()),
            false,
            None,
        ));
        let app = router_of(web.path(), internet(), federation.clone()).await;
        let ask = |client: &'static str| {
            let router = app.clone();
            async move {
                let request = Request::get("/api/bootstrap").header("host", "root.example");
                let (status, _, body) = send(
                    &router,
                    request.body(Body::empty()).expect("request"),
                    client,
                )
                .await;
                assert_eq!(status, StatusCode::OK);
                serde_json::from_slice::<Bootstrap>(&body).expect("bootstrap")
            }
        };
        // A root with no edge is a lone relay: no list.
        assert!(ask("198.51.100.7:50000").await.federation.is_empty());
        let now = crate::runs::unix_ms();
        let report = |url: &str, load| EdgeReport {
            run_id: "digits".into(),
            url: url.into(),
            load,
        };
        let answer = federation.reported(
            swarmtrain_shared::PeerKey([1; 32]),
            &report("https://edge1.example/", 7),
            now,
        );
        federation.reported(
            swarmtrain_shared::PeerKey([2; 32]),
            &report("http://127.0.0.1:9001/", 3),
            now,
        );
        assert_eq!(
            answer,
            vec![
                Member {
                    url: "https://root.example/".into(),
                    role: MemberRole::Root,
                    load: 0
                },
                Member {
                    url: "https://edge1.example/".into(),
                    role: MemberRole::Edge,
                    load: 7
                },
            ]
        );
        // A browser on the internet hears of the public edge, never of the loopback one.
        let urls = |boot: Bootstrap| {
            boot.federation
                .into_iter()
                .map(|m| m.url)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            urls(ask("198.51.100.7:50000").await),
            ["https://root.example/", "https://edge1.example/"]
        );
        // A client on loopback hears of both (the list is sorted by URL after the root).
        assert_eq!(
            urls(ask("127.0.0.1:50000").await),
            [
                "https://root.example/",
                "http://127.0.0.1:9001/",
                "https://edge1.example/"
            ]
        );
        // An edge that stops reporting leaves the list.
        assert!(federation.members(now + MEMBER_TTL_MS).is_empty());
        // The edge's key reporting a new URL replaces its old entry.
        let later = now + 1;
        federation.reported(
            swarmtrain_shared::PeerKey([1; 32]),
            &report("https://edge1b.example/", 1),
            later,
        );
        let members = federation.members(later);
        assert_eq!(members.len(), 3, "{members:?}");
        assert!(members.iter().all(|m| m.url != "https://edge1.example/"));
    }

    #[tokio::test]
    async fn bootstrap_tells_each_client_the_addresses_it_can_reach() {
        let web = tempfile::tempdir().expect("dir");
        let app = router_with(web.path(), internet()).await;
        let ask = |host: &'static str,
                   client: &'static str,
                   extra: Option<(&'static str, &'static str)>| {
            let router = app.clone();
            async move {
                let mut request =
                    Request::get("/api/bootstrap?peer=12D3KooWTab").header("host", host);
                if let Some((name, value)) = extra {
                    request = request.header(name, value);
                }
                let (status, headers, body) = send(
                    &router,
                    request.body(Body::empty()).expect("request"),
                    client,
                )
                .await;
                assert_eq!(status, StatusCode::OK);
                assert_eq!(headers[header::CACHE_CONTROL], "no-store");
                serde_json::from_slice::<Bootstrap>(&body).expect("bootstrap")
            }
        };
        // A browser on the internet that opened https://203.0.113.10:8443/.
        let boot = ask("203.0.113.10:8443", "198.51.100.7:50000", None).await;
        let all: Vec<&String> = boot.addresses.values().flatten().collect();
        assert!(
            !all.is_empty() && all.iter().all(|a| a.starts_with("/ip4/203.0.113.10/")),
            "{all:?}"
        );
        // An unknown host name: every public address, still no loopback.
        let boot = ask("other.example", "198.51.100.7:50000", None).await;
        let all: Vec<&String> = boot.addresses.values().flatten().collect();
        assert!(all.iter().all(|a| !a.contains("127.0.0.1")), "{all:?}");
        assert!(
            all.iter()
                .any(|a| a.starts_with("/dns4/relay.example/tcp/443/tls/ws/p2p/"))
        );
        // A client claiming a forwarded host without being the proxy is not believed...
        let boot = ask(
            "203.0.113.10",
            "198.51.100.7:50000",
            Some(("x-forwarded-host", "relay.example")),
        )
        .await;
        assert!(
            boot.addresses["ws"]
                .iter()
                .all(|a| a.starts_with("/ip4/203.0.113.10/"))
        );
        // ...the proxy is, and its client on the internet never hears of loopback.
        let boot = ask(
            "127.0.0.1:8080",
            "198.51.100.1:40000",
            Some(("x-forwarded-host", "relay.example")),
        )
        .await;
        assert_eq!(boot.addresses.keys().collect::<Vec<_>>(), ["ws"]);
        assert!(boot.addresses["ws"][0].starts_with("/dns4/relay.example/tcp/443/tls/ws/p2p/"));
        // The machine itself may use loopback.
        let boot = ask("127.0.0.1:8080", "127.0.0.1:40000", None).await;
        assert!(
            boot.addresses["tcp"]
                .iter()
                .all(|a| a.starts_with("/ip4/127.0.0.1/tcp/4001/"))
        );
        // ICE: STUN as given, TURN with a credential minted for this peer.
        assert_eq!(boot.ice_servers.len(), 2);
        assert_eq!(boot.ice_servers[0].urls, ["stun:203.0.113.10:3478"]);
        let user = boot.ice_servers[1].username.clone().expect("username");
        assert!(user.ends_with(":12D3KooWTab"), "{user}");
        let expiry: u64 = user
            .split(':')
            .next()
            .expect("expiry")
            .parse()
            .expect("number");
        assert!(expiry > boot.time_ms / 1000 + 3500 && expiry <= boot.time_ms / 1000 + 3600);
        assert_eq!(
            boot.ice_servers[1].credential.as_deref(),
            Some(crate::public::turn_password(b"s3cret", &user).as_str())
        );
    }

    #[tokio::test]
    async fn cors_lets_allowed_origins_call_the_api() {
        let web = tempfile::tempdir().expect("dir");
        let app = router_with(web.path(), internet()).await;
        let origin = "https://embed.example";
        // A preflight is answered (not 405), for the allowed origin only.
        let preflight = |origin: &'static str| {
            Request::builder()
                .method("OPTIONS")
                .uri("/api/bootstrap")
                .header("origin", origin)
                .header("access-control-request-method", "GET")
                .body(Body::empty())
                .expect("request")
        };
        let (status, headers, _) = send(&app, preflight(origin), "198.51.100.7:1").await;
        assert!(status.is_success(), "{status}");
        assert_eq!(headers["access-control-allow-origin"], origin);
        assert!(
            headers["access-control-allow-methods"]
                .to_str()
                .expect("ascii")
                .contains("GET")
        );
        let (_, headers, _) = send(&app, preflight("https://evil.example"), "198.51.100.7:1").await;
        assert!(headers.get("access-control-allow-origin").is_none());
        // A cross-origin GET of the API carries the header; the page and metrics do not.
        for (uri, cors) in [
            ("/api/status", true),
            ("/api/runs/digits/leaderboard", true),
            ("/metrics", false),
        ] {
            let request = Request::get(uri)
                .header("origin", origin)
                .body(Body::empty())
                .expect("request");
            let (status, headers, _) = send(&app, request, "198.51.100.7:1").await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert_eq!(
                headers.contains_key("access-control-allow-origin"),
                cors,
                "{uri}"
            );
        }
        // The default, `*`, allows any origin.
        let any = router(web.path()).await;
        let request = Request::get("/api/bootstrap")
            .header("origin", "https://anyone.example")
            .body(Body::empty())
            .expect("request");
        let (_, headers, _) = send(&any, request, "198.51.100.7:1").await;
        assert_eq!(headers["access-control-allow-origin"], "*");
    }
}
