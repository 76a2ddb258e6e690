//! The contributor loop: join, then for every round fetch θ_t and the round's data, train H
//! local steps, and send the signed pseudo-gradient.
//!
//! The inner loop is [`crate::replica::Replica::train_round`], the simulator's trainer: one
//! replica per run whose AdamW moments persist across rounds (reset when the run's θ lineage
//! restarts). It runs behind [`Local`]: on this thread over any Burn backend ([`run`]), or in a
//! browser's Web Worker ([`run_with`] and `platform::TrainerWorker`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use swarmtrain_net::http::{Bootstrap, url};
use swarmtrain_shared::admission::{Admission, AdmissionTerms, search_proof_of_work};
use swarmtrain_shared::compress::ErrorFeedback;
use swarmtrain_shared::data::{self, DigitsSet};
use swarmtrain_shared::protocol::{
    self, Capabilities, ClientToRelay, Join, PROTOCOL_VERSION, ParamsHash, PayloadRef,
    RelayToClient, Reveal, Role, RoundAnnouncement, RunSpec, Update,
};
use swarmtrain_shared::replay::CommittedState;
use swarmtrain_shared::{Identity, Signed};
use web_time::Instant;

use crate::local::{InProcess, Local, SampleJob, TrainJob};
use crate::platform;
use crate::replica::{LocalRound, RoundData};
use crate::rpc::{RelayClient, RpcError};

/// How long a peer waits for a gossiped announcement before it also long-polls the relay.
pub const POLL_AFTER: Duration = Duration::from_secs(3);
/// The wait before the first attempt to reach the relay again; each failed attempt doubles it,
/// up to [`RETRY_MAX`], and each wait is drawn between half and all of that ("equal jitter"),
/// so that the tabs a relay restart dropped do not all come back at once.
pub const RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between attempts to reach the relay.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Sends of one message to a relay that answers it can be mended (busy, keys, join), at most.
pub const MAX_TRIES: u32 = 6;

/// How a peer finds and joins a relay. Its `Debug` leaves the identity seed out.
#[derive(Clone)]
pub struct PeerConfig {
    /// The relay's HTTP base URL, e.g. `http://127.0.0.1:8080/`.
    pub relay_url: String,
    /// The run to join (None: the relay's default run).
    pub run_id: Option<String>,
    /// Which of the relay's transports to dial (None: the platform's first that the relay
    /// offers, see `platform::TRANSPORTS`).
    pub transport: Option<String>,
    /// Secret seed of this peer's ML-DSA-65 identity (zeroized on drop).
    pub identity_seed: zeroize::Zeroizing<[u8; 32]>,
    /// Name of the training backend, reported to the relay.
    pub backend: String,
    /// Stop after this many trained rounds (None: until stopped).
    pub max_rounds: Option<u64>,
    /// Language-model runs: bytes of text to sample from each new global model and report as
    /// [`PeerEvent::Sample`] (0: none).
    pub sample_len: usize,
    /// Set to stop the peer after its current step.
    pub stop: Arc<AtomicBool>,
    /// While set, the peer waits between training steps (the page sets it for a hidden tab
    /// or a low battery); the round's deadline still cuts the round short.
    pub pause: Arc<AtomicBool>,
    /// Failed attempts in a row (to reach, join or talk to the relay) after which the peer
    /// gives up and returns the error (None: it keeps trying, [`RETRY_FIRST`] apart at first and
    /// at most [`RETRY_MAX`]).
    pub max_retries: Option<u32>,
    /// Browsers: how many other browsers of the relay to connect to directly over WebRTC
    /// (signaling through the relay), and to take connections from (0: none).
    pub direct_peers: usize,
    /// STUN/TURN servers for those connections (none: host candidates only, which connect
    /// peers on one network).
    pub ice_servers: Vec<crate::webrtc::IceServer>,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("relay_url", &self.relay_url)
            .field("run_id", &self.run_id)
            .field("transport", &self.transport)
            .field("identity_seed", &"<secret>")
            .field("backend", &self.backend)
            .field("max_rounds", &self.max_rounds)
            .field("sample_len", &self.sample_len)
            .field("max_retries", &self.max_retries)
            .field("direct_peers", &self.direct_peers)
            .field("ice_servers", &self.ice_servers.len())
            .finish_non_exhaustive()
    }
}

/// How long a browser waits for its links after joining before it fetches θ…
const DIRECT_WAIT: Duration = Duration::from_secs(3);
/// …and how long for the rest once the first is up.
const LINK_STRAGGLER: Duration = Duration::from_secs(1);

/// A browser this peer holds a direct WebRTC connection to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify_next::Tsify))]
pub struct DirectPeer {
    /// Its libp2p peer ID.
    pub peer: String,
    /// The last ping round trip over the direct connection (None before the first).
    pub rtt_ms: Option<f64>,
    /// The ICE candidate pair the link uses (None natively, or when the browser's stats do not
    /// say).
    #[cfg_attr(target_arch = "wasm32", tsify(optional))]
    pub path: Option<crate::webrtc::LinkPath>,
}

/// A linked browser that sent part of a θ.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify_next::Tsify))]
pub struct ThetaPeer {
    /// Its libp2p peer ID.
    pub peer: String,
    /// θ bytes it sent.
    pub bytes: u64,
}

/// How a round's announcement reached a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Announced {
    /// In the relay's answer to joining.
    Welcome,
    /// By gossip: from the relay itself (None) or forwarded by this linked browser.
    Gossip(Option<libp2p::PeerId>),
    /// By the long poll.
    Poll,
}

impl Announced {
    fn name(self) -> &'static str {
        match self {
            Self::Welcome => "welcome",
            Self::Gossip(_) => "gossip",
            Self::Poll => "poll",
        }
    }
}

/// What a peer reports as it works (the browser page shows these).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify_next::Tsify))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PeerEvent {
    Backend {
        backend: String,
        detail: String,
    },
    /// Joined `run` as `peer`, connected to the relay over `transport` ("webrtc-direct", "ws", "tcp").
    Joined {
        run: String,
        peer: String,
        transport: String,
        /// The relay address dialed (from the bootstrap document).
        address: String,
    },
    /// Joined a run of this model (`ModelSpec::describe`).
    Model {
        model: String,
        n_params: usize,
    },
    Round {
        round: u64,
        inner_steps: u32,
        accuracy: Option<f32>,
        /// Held-out loss of the round's θ (language-model runs).
        val_loss: Option<f32>,
        /// How the announcement arrived: "welcome" (the round current at joining), "gossip"
        /// or "poll" (the long poll, when gossip was slow or lost).
        via: String,
        /// The linked browser that forwarded the gossiped announcement over its direct link
        /// (None: the relay sent it itself).
        forwarded_by: Option<String>,
    },
    /// The round's θ (`bytes`) is being fetched, from the `linked` browsers and the relay.
    Fetching {
        round: u64,
        bytes: u64,
        linked: u32,
    },
    /// The round's θ arrived: `bytes` in `ms`, `relay_bytes` of them from the relay and the
    /// rest from the linked browsers `from_peers`, and why linked browsers stopped being asked.
    Params {
        round: u64,
        bytes: u64,
        relay_bytes: u64,
        from_peers: Vec<ThetaPeer>,
        ms: f64,
        peer_failures: Vec<String>,
    },
    /// Text sampled on this peer's backend from the global model of `round`.
    Sample {
        round: u64,
        text: String,
    },
    /// The browsers this peer holds direct WebRTC connections to changed (`error`: why the
    /// last attempt to listen or dial failed, if one did).
    Direct {
        peers: Vec<DirectPeer>,
        error: Option<String>,
    },
    /// How many of the run's `run_steps` inner steps this peer plans for `round`: as many as
    /// fit in `budget_ms` (the time to the round's deadline, less a fifth for sending) at
    /// `step_ms` a step, measured on the rounds before (None: the first round, which plans
    /// them all).
    Plan {
        round: u64,
        planned_steps: u32,
        run_steps: u32,
        step_ms: Option<f64>,
        budget_ms: u64,
    },
    /// Trained `steps` of the round's `planned_steps` (fewer when the round's deadline came
    /// first).
    Trained {
        round: u64,
        steps: u32,
        planned_steps: u32,
        loss: f32,
        train_ms: u64,
        rounds_trained: u64,
    },
    /// The round in training: `steps` of `planned_steps` taken, `elapsed_ms` after the round
    /// was announced, whose deadline is `deadline_ms` after that (about every half second).
    Progress {
        round: u64,
        steps: u32,
        planned_steps: u32,
        elapsed_ms: u64,
        deadline_ms: u64,
    },
    /// What the relay's ledger credits this peer with in `run` (every session of its
    /// identity), after an accepted update: `samples` in all, and of them those the relay's
    /// checks verified and failed (the rest are unchecked; an update is checked after its
    /// round closes, so the newest are not yet).
    Credits {
        run: String,
        samples: u64,
        accepted_updates: u64,
        first_round: u64,
        last_round: u64,
        verified_samples: u64,
        failed_samples: u64,
    },
    /// The relay's answer to the update (`bytes`: its encoded payload); `relay_rtt_ms` is the
    /// last ping round trip to it.
    Submitted {
        round: u64,
        bytes: u64,
        accepted: bool,
        reason: Option<String>,
        relay_rtt_ms: Option<f64>,
    },
    /// The relay drew this peer's update of `round` for a replay and the peer revealed the
    /// state it committed to (`bytes`); `accepted` is whether the relay took the reveal (the
    /// replay's verdict comes later, in the credits).
    Revealed {
        round: u64,
        bytes: u64,
        accepted: bool,
        reason: Option<String>,
    },
    /// The connection to the relay failed (`error`); the peer tries again in `delay_ms`, its
    /// `attempt`-th try in a row. Its identity, AdamW moments and error-feedback residual are
    /// kept.
    Reconnecting {
        attempt: u32,
        delay_ms: u64,
        error: String,
    },
    /// The peer stopped (`stop` was set or `max_rounds` reached) after training
    /// `rounds_trained` rounds.
    Stopped {
        rounds_trained: u64,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("relay bootstrap failed: {0}")]
    Bootstrap(String),
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("the relay refused to let us join: {0}")]
    Refused(String),
    #[error("the relay is busy: {0}")]
    Busy(String),
    #[error("the relay sent an unexpected answer to {0}")]
    Unexpected(&'static str),
    #[error("round announcement is not validly signed by the relay: {0}")]
    Announcement(String),
    #[error("download failed: {0}")]
    Download(String),
    #[error("training failed: {0}")]
    Train(String),
    #[error("the relay's run cannot work: {0}")]
    BadSpec(String),
}

impl PeerError {
    /// Whether trying again later may succeed: the relay could not be reached or talked to, or
    /// was busy. A refusal to join, a run that cannot work and a training failure are final.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Bootstrap(_)
                | Self::Rpc(_)
                | Self::Busy(_)
                | Self::Unexpected(_)
                | Self::Announcement(_)
                | Self::Download(_)
        )
    }
}

/// Shuffles `items` (Fisher–Yates with the platform's random source; left as is without one).
fn shuffle<T>(items: &mut [T]) {
    let mut random = vec![0u8; items.len() * 4];
    if getrandom::fill(&mut random).is_err() {
        return;
    }
    for i in (1..items.len()).rev() {
        let r = u32::from_le_bytes(random[i * 4..i * 4 + 4].try_into().unwrap_or_default());
        items.swap(i, r as usize % (i + 1));
    }
}

/// The wait before attempt `attempt` (1, 2, …) to reach the relay again: [`RETRY_FIRST`]
/// doubled per earlier attempt, at most [`RETRY_MAX`], times a random factor in [0.5, 1].
pub fn retry_delay(attempt: u32) -> Duration {
    let ceiling = RETRY_FIRST
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(RETRY_MAX);
    let mut byte = [0u8; 1];
    let jitter = match getrandom::fill(&mut byte) {
        Ok(()) => f64::from(byte[0]) / 255.0,
        Err(_) => 1.0,
    };
    ceiling.mul_f64(0.5 + 0.5 * jitter)
}

/// Sleeps for `delay`, waking early when `stop` is set.
async fn sleep_unless_stopped(delay: Duration, stop: &AtomicBool) {
    let until = Instant::now() + delay;
    while !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        platform::sleep(left.min(Duration::from_millis(200))).await;
    }
}

/// `GET {relay_url}api/bootstrap`, for `peer` (its peer key: the relay mints TURN credentials
/// for it).
pub async fn fetch_bootstrap(relay_url: &str, peer: Option<&str>) -> Result<Bootstrap, PeerError> {
    let path = match peer {
        Some(peer) => format!("api/bootstrap?peer={peer}"),
        None => "api/bootstrap".to_owned(),
    };
    let raw = platform::http_get(&url(relay_url, &path))
        .await
        .map_err(PeerError::Bootstrap)?;
    serde_json::from_slice(&raw).map_err(|e| PeerError::Bootstrap(e.to_string()))
}

/// Solves the run's proof-of-work puzzle for `identity` when its terms ask for one, yielding
/// to the page between batches of hashes.
async fn proof_of_work(
    terms: Option<&AdmissionTerms>,
    identity: &Identity,
) -> Result<Option<u64>, PeerError> {
    let Some(terms) = terms.filter(|t| t.policy == "proof-of-work") else {
        return Ok(None);
    };
    let bad = || {
        PeerError::Bootstrap(format!(
            "the relay's admission terms are malformed: {terms:?}"
        ))
    };
    let bits = terms
        .bits
        .filter(|b| *b <= Admission::MAX_BITS)
        .ok_or_else(bad)?;
    let challenge = terms
        .challenge
        .as_deref()
        .and_then(|hex| blake3::Hash::from_hex(hex).ok())
        .ok_or_else(bad)?;
    const BATCH: u64 = 1 << 14;
    let mut start = 0u64;
    loop {
        let range = start..start.saturating_add(BATCH);
        if let Some(nonce) =
            search_proof_of_work(challenge.as_bytes(), &identity.peer(), bits, range)
        {
            return Ok(Some(nonce));
        }
        start = start.checked_add(BATCH).ok_or_else(bad)?;
        platform::yield_now().await;
    }
}

/// A joined session with the relay.
pub(crate) struct Session {
    pub(crate) client: RelayClient,
    pub(crate) transport: String,
    /// The relay address this session dialed.
    address: String,
    /// The `Join` this session sent, to send again should the relay have forgotten us.
    join: ClientToRelay,
    /// The relay's ML-DSA-65 public key, which signs every announcement.
    relay_key: Vec<u8>,
    relay_url: String,
    pub(crate) spec: RunSpec,
    /// This peer's data slot (text runs).
    slot: u32,
}

impl Session {
    /// Dials the relay `config` names and joins its run as `role`: admission, the `Welcome`,
    /// session keys, and the run's announcements by gossip.
    pub(crate) async fn join(
        config: &PeerConfig,
        identity: &Identity,
        role: Role,
    ) -> Result<(Self, RoundAnnouncement), PeerError> {
        let bootstrap = fetch_bootstrap(&config.relay_url, Some(&identity.peer().to_hex())).await?;
        let wanted: Vec<&str> = match &config.transport {
            Some(t) => vec![t.as_str()],
            None => platform::TRANSPORTS.to_vec(),
        };
        let (transport, address) = wanted
            .iter()
            .find_map(|t| {
                bootstrap
                    .addresses
                    .get(*t)
                    .and_then(|a| a.iter().find(|a| platform::can_dial(a)))
                    .map(|a| ((*t).to_owned(), a))
            })
            .ok_or_else(|| {
                PeerError::Bootstrap(format!("relay offers no {} address", wanted.join(" or ")))
            })?;
        let dialed = address.clone();
        let address = address
            .parse()
            .map_err(|e| PeerError::Bootstrap(format!("{address}: {e}")))?;
        // The embedder's ICE servers, else the relay operator's (with fresh TURN credentials
        // on every join).
        let ice_servers = if config.ice_servers.is_empty() {
            bootstrap.ice_servers.clone()
        } else {
            config.ice_servers.clone()
        };
        let client = RelayClient::connect_with(address, identity, ice_servers)?;
        if bootstrap.time_ms > 0 {
            client.set_relay_clock(bootstrap.time_ms);
        }
        let run_id = config.run_id.clone().unwrap_or(bootstrap.run_id);
        let proof_of_work = proof_of_work(bootstrap.admission.get(&run_id), identity).await?;
        let join = ClientToRelay::Join(Join {
            version: PROTOCOL_VERSION,
            run_id,
            capabilities: Capabilities {
                backend: config.backend.clone(),
                platform: platform::platform(),
            },
            role,
            proof_of_work,
        });
        let welcome = match client.send(join.clone(), Vec::new()).await? {
            RelayToClient::Welcome(welcome) => *welcome,
            RelayToClient::Rejected { kind, reason } if kind.ends_with("busy") => {
                return Err(PeerError::Busy(reason));
            }
            RelayToClient::Rejected { reason, .. } => return Err(PeerError::Refused(reason)),
            _ => return Err(PeerError::Unexpected("join")),
        };
        let relay_key = welcome.relay_key().to_vec();
        // From here on, the update payloads and θ chunks on this connection are sealed.
        client.agree_keys(&relay_key).await?;
        welcome
            .spec
            .validate()
            .map_err(|e| PeerError::BadSpec(e.to_string()))?;
        if welcome.slot >= welcome.spec.data.n_shards {
            return Err(PeerError::BadSpec(format!(
                "slot {} of {}",
                welcome.slot, welcome.spec.data.n_shards
            )));
        }
        let session = Self {
            slot: welcome.slot,
            client,
            transport,
            address: dialed,
            join,
            relay_key,
            relay_url: config.relay_url.clone(),
            spec: welcome.spec,
        };
        let announcement = session.verify(&welcome.round)?;
        // Announcements arrive by gossip; the long poll is the fallback.
        session
            .client
            .subscribe(protocol::rounds_topic(&session.spec.run_id))
            .await?;
        Ok((session, announcement))
    }

    /// Browsers: takes WebRTC connections from other browsers through the relay, and dials up
    /// to `direct_peers` of those the relay lists as reachable (`/api/reachable`). Failures
    /// only cost the direct links: training goes on through the relay.
    async fn link_browsers(&self, config: &PeerConfig) {
        if config.direct_peers == 0 {
            return;
        }
        if self.client.listen_direct().await.is_err() {
            return;
        }
        #[derive(Deserialize)]
        struct Reachable {
            peers: Vec<String>,
        }
        // Up to `direct_peers` of the 32 newest, at random: not only the newest, which have
        // often not fetched the round's θ yet, and no browser linked to by every joiner.
        let listed = match platform::http_get(&url(&self.relay_url, "api/reachable?limit=32")).await
        {
            Ok(body) => serde_json::from_slice::<Reachable>(&body).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let listed = match listed {
            Ok(listed) => listed.peers,
            Err(e) => {
                tracing::info!("could not list reachable browsers: {e}");
                return;
            }
        };
        let me = self.client.peer_id();
        let mut peers: Vec<libp2p::PeerId> = listed
            .iter()
            .filter_map(|p| p.parse().ok())
            .filter(|p| *p != me)
            .collect();
        shuffle(&mut peers);
        peers.truncate(config.direct_peers);
        if peers.is_empty() || self.client.dial_direct(peers.clone()).await.is_err() {
            return;
        }
        // Give the links a moment, so that this round's θ can come from them: until all are up,
        // at most DIRECT_WAIT, and at most LINK_STRAGGLER after the first.
        let dialed = peers.len();
        let waited = Instant::now();
        let mut first = None;
        loop {
            let linked = self.client.relay_info().direct_peers.len();
            if linked >= dialed || waited.elapsed() >= DIRECT_WAIT {
                break;
            }
            if linked > 0 && first.get_or_insert_with(Instant::now).elapsed() >= LINK_STRAGGLER {
                break;
            }
            platform::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The direct links as an event, when they changed since `last`.
    fn direct_event(
        &self,
        last: &mut Option<(Vec<DirectPeer>, Option<String>)>,
    ) -> Option<PeerEvent> {
        let info = self.client.relay_info();
        let mut peers: Vec<DirectPeer> = info
            .direct_peers
            .iter()
            .map(|p| DirectPeer {
                peer: p.to_string(),
                rtt_ms: info.direct_rtt.get(p).map(|d| d.as_secs_f64() * 1e3),
                path: crate::webrtc::path_of(p),
            })
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        let now = (peers, info.direct_error);
        if last.as_ref() == Some(&now) || (last.is_none() && now.0.is_empty() && now.1.is_none()) {
            return None;
        }
        *last = Some(now.clone());
        Some(PeerEvent::Direct {
            peers: now.0,
            error: now.1,
        })
    }

    fn verify(&self, signed: &Signed<RoundAnnouncement>) -> Result<RoundAnnouncement, PeerError> {
        let announcement = signed
            .verify_with_key(&self.relay_key)
            .map_err(|e| PeerError::Announcement(e.to_string()))?;
        if announcement.run_id != self.spec.run_id {
            return Err(PeerError::Announcement(format!(
                "announcement is for run {:?}",
                announcement.run_id
            )));
        }
        Ok(announcement)
    }

    /// Sends `message` (with `payload`, for an update) and returns the relay's answer, mending
    /// what the relay's answer says can be mended, up to [`MAX_TRIES`] sends: a relay that no
    /// longer knows this peer (it restarted: `not_joined`) gets the `Join` again; a connection
    /// without session keys (a redial: `not_sealed`, `unknown_session`) agrees them again; a
    /// busy relay (`*_busy`) is asked again after [`retry_delay`]. Busy is never final.
    pub(crate) async fn send_mending(
        &self,
        message: ClientToRelay,
        payload: Vec<u8>,
    ) -> Result<RelayToClient, PeerError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let answer = self.client.send(message.clone(), payload.clone()).await?;
            let RelayToClient::Rejected { kind, reason } = &answer else {
                return Ok(answer);
            };
            if tries >= MAX_TRIES {
                return Ok(answer);
            }
            match kind.as_str() {
                "not_joined" => match self.client.send(self.join.clone(), Vec::new()).await? {
                    RelayToClient::Welcome(_) => self.client.agree_keys(&self.relay_key).await?,
                    RelayToClient::Rejected { kind, reason } if kind.ends_with("busy") => {
                        tracing::info!(%reason, "the relay is busy; joining again later");
                        platform::sleep(retry_delay(tries)).await;
                    }
                    RelayToClient::Rejected { reason, .. } => {
                        return Err(PeerError::Refused(reason));
                    }
                    _ => return Err(PeerError::Unexpected("join")),
                },
                "not_sealed" | "unknown_session" => self.client.agree_keys(&self.relay_key).await?,
                busy if busy.ends_with("busy") => {
                    tracing::info!(kind = busy, %reason, "the relay is busy; asking again");
                    platform::sleep(retry_delay(tries)).await;
                }
                _ => return Ok(answer),
            }
        }
    }

    pub(crate) async fn request(&self, message: ClientToRelay) -> Result<RelayToClient, PeerError> {
        self.send_mending(message, Vec::new()).await
    }

    /// Sends an update with its payload ([`Self::send_mending`]).
    async fn submit(&self, update: Update, payload: Vec<u8>) -> Result<RelayToClient, PeerError> {
        self.send_mending(ClientToRelay::Update(update), payload)
            .await
    }

    /// Sends the `unsent` update, if any, and reports the relay's answer; `unsent` is cleared
    /// once the relay has answered.
    async fn send_update(
        &self,
        unsent: &mut Option<(Update, Vec<u8>)>,
        emit: &mut impl FnMut(PeerEvent),
    ) -> Result<(), PeerError> {
        let Some((update, payload)) = unsent.clone() else {
            return Ok(());
        };
        let round = update.round;
        let bytes = payload.len() as u64;
        let answer = self.submit(update, payload).await?;
        *unsent = None;
        let relay_rtt_ms = self
            .client
            .relay_info()
            .rtt
            .map(|rtt| rtt.as_secs_f64() * 1e3);
        let (accepted, reason) = match answer {
            RelayToClient::Accepted { .. } => (true, None),
            RelayToClient::Rejected { reason, .. } => (false, Some(reason)),
            _ => return Err(PeerError::Unexpected("update")),
        };
        emit(PeerEvent::Submitted {
            round,
            bytes,
            accepted,
            reason,
            relay_rtt_ms,
        });
        if accepted {
            // Only for the page: a relay that cannot say now says it after the next update.
            match self.fetch_credits().await {
                Ok(credits) => emit(credits),
                Err(e) => tracing::info!(error = %e, "could not read this peer's credit"),
            }
        }
        Ok(())
    }

    /// Reveals the `committed` state if `announcement` names this peer for a replay of the
    /// round it was committed for, and reports the relay's answer. The state is let go either
    /// way once its round's audit is announced.
    async fn answer_audit(
        &self,
        announcement: &RoundAnnouncement,
        committed: &mut Option<(u64, Vec<u8>)>,
        emit: &mut impl FnMut(PeerEvent),
    ) -> Result<(), PeerError> {
        let Some((round, _)) = committed else {
            return Ok(());
        };
        if announcement.round != *round + 1 {
            return Ok(());
        }
        let Some((round, state)) = committed.take() else {
            return Ok(());
        };
        if !announcement.audit.contains(&self.client.identity().peer()) {
            return Ok(());
        }
        let bytes = state.len() as u64;
        let reveal = ClientToRelay::Reveal(Reveal {
            run_id: self.spec.run_id.clone(),
            round,
            state: PayloadRef::of(&state),
        });
        let (accepted, reason) = match self.send_mending(reveal, state).await? {
            RelayToClient::Revealed { .. } => (true, None),
            RelayToClient::Rejected { reason, .. } => (false, Some(reason)),
            _ => return Err(PeerError::Unexpected("reveal")),
        };
        tracing::info!(
            round,
            bytes,
            accepted,
            "revealed the committed state for a replay"
        );
        emit(PeerEvent::Revealed {
            round,
            bytes,
            accepted,
            reason,
        });
        Ok(())
    }

    /// After the last round a peer was asked for: waits (at most the round's deadline and a
    /// minute) for the next announcement and answers its audit, so that stopping does not cost
    /// the last update its credit. A peer told to stop does not wait.
    async fn answer_last_audit(
        &self,
        committed: &mut Option<(u64, Vec<u8>)>,
        config: &PeerConfig,
        emit: &mut impl FnMut(PeerEvent),
    ) -> Result<(), PeerError> {
        let Some((round, _)) = committed else {
            return Ok(());
        };
        let round = *round;
        // The relay replays language-model rounds only.
        if config.stop.load(Ordering::Relaxed) || self.spec.model.lm_config().is_none() {
            return Ok(());
        }
        let wait = Duration::from_millis(self.spec.round_deadline_ms) + Duration::from_secs(60);
        let next = async {
            match self.next_round(round).await {
                Ok((announcement, _)) => Some(announcement),
                Err(e) => {
                    tracing::info!(error = %e, "no announcement after the last round");
                    None
                }
            }
        };
        let stopped = sleep_unless_stopped(wait, &config.stop);
        futures::pin_mut!(next, stopped);
        if let futures::future::Either::Left((Some(announcement), _)) =
            futures::future::select(next, stopped).await
        {
            self.answer_audit(&announcement, committed, emit).await?;
        }
        Ok(())
    }

    /// This peer's credit in the run's ledger (`GET /api/runs/{run}/peers/{peer}`).
    async fn fetch_credits(&self) -> Result<PeerEvent, String> {
        #[derive(Deserialize)]
        struct Credit {
            samples: u64,
            accepted_updates: u64,
            first_round: u64,
            last_round: u64,
            verified_samples: u64,
            failed_samples: u64,
        }
        let path = format!(
            "api/runs/{}/peers/{}",
            self.spec.run_id,
            self.client.identity().peer().to_hex()
        );
        let body = platform::http_get(&url(&self.relay_url, &path)).await?;
        let credit: Credit = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(PeerEvent::Credits {
            run: self.spec.run_id.clone(),
            samples: credit.samples,
            accepted_updates: credit.accepted_updates,
            first_round: credit.first_round,
            last_round: credit.last_round,
            verified_samples: credit.verified_samples,
            failed_samples: credit.failed_samples,
        })
    }

    /// Waits for the first round after `after`: announced by gossip, or, should gossip be slow
    /// or lost, found by a long poll that starts [`POLL_AFTER`] later.
    async fn next_round(&self, after: u64) -> Result<(RoundAnnouncement, Announced), PeerError> {
        let gossip = async {
            while let Some(gossiped) = self.client.next_gossip().await {
                let verified = protocol::decode::<Signed<RoundAnnouncement>>(&gossiped.data)
                    .map_err(|e| PeerError::Announcement(e.to_string()))
                    .and_then(|signed| self.verify(&signed));
                match verified {
                    Ok(announcement) if announcement.round > after => {
                        return (announcement, Announced::Gossip(gossiped.forwarded_by));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring a gossiped announcement"),
                }
            }
            futures::future::pending().await
        };
        let poll = async {
            platform::sleep(POLL_AFTER).await;
            self.poll_round(after).await
        };
        futures::pin_mut!(gossip, poll);
        match futures::future::select(gossip, poll).await {
            futures::future::Either::Left((announced, _)) => Ok(announced),
            futures::future::Either::Right((polled, _)) => Ok((polled?, Announced::Poll)),
        }
    }

    /// Long-polls for the first round after `after`.
    async fn poll_round(&self, after: u64) -> Result<RoundAnnouncement, PeerError> {
        loop {
            let ask = ClientToRelay::AwaitRound {
                run_id: self.spec.run_id.clone(),
                after: Some(after),
            };
            match self.request(ask).await? {
                RelayToClient::Round(signed) => {
                    let announcement = self.verify(&signed)?;
                    if announcement.round > after {
                        return Ok(announcement);
                    }
                }
                // Still busy after every try: transient, the peer reconnects and goes on.
                RelayToClient::Rejected { kind, reason } if kind.ends_with("busy") => {
                    return Err(PeerError::Busy(reason));
                }
                RelayToClient::Rejected { reason, .. } => return Err(PeerError::Refused(reason)),
                _ => return Err(PeerError::Unexpected("await round")),
            }
        }
    }

    /// θ_t from the linked browsers and the relay, checked against its hash, and the event that
    /// says where it came from.
    pub(crate) async fn fetch_params(
        &self,
        round: u64,
        hash: ParamsHash,
    ) -> Result<(Vec<f32>, PeerEvent), PeerError> {
        let started = Instant::now();
        let total = 4 * self.spec.model.num_params();
        let (bytes, sources) = self
            .client
            .fetch_params_anywhere(&self.spec.run_id, hash, total)
            .await
            .map_err(|e| PeerError::Download(e.to_string()))?;
        let event = PeerEvent::Params {
            round,
            bytes: bytes.len() as u64,
            relay_bytes: sources.relay_bytes,
            from_peers: sources
                .peers
                .into_iter()
                .map(|(peer, bytes)| ThetaPeer {
                    peer: peer.to_string(),
                    bytes,
                })
                .collect(),
            ms: started.elapsed().as_secs_f64() * 1e3,
            peer_failures: sources.failures,
        };
        let params = protocol::params_from_bytes(&bytes)
            .ok_or_else(|| PeerError::Download("parameters are malformed".into()))?;
        Ok((params, event))
    }

    async fn fetch_shard(&self, round: u64) -> Result<DigitsSet, PeerError> {
        let shard = data::assign_shard(
            &self.spec.run_id,
            round,
            &self.client.identity().peer(),
            self.spec.data.n_shards,
        );
        let path = format!("api/runs/{}/shards/{shard}", self.spec.run_id);
        let bytes = platform::http_get(&url(&self.relay_url, &path))
            .await
            .map_err(PeerError::Download)?;
        DigitsSet::from_bytes(&bytes).map_err(|e| PeerError::Download(e.to_string()))
    }

    /// The round's text windows for this peer's slot: `steps · batch` windows of `window`
    /// bytes, in step order.
    async fn fetch_text(&self, round: u64, window: usize) -> Result<Vec<u8>, PeerError> {
        self.fetch_text_of(round, self.slot, window).await
    }

    /// The round's text windows of data slot `slot` ([`Self::fetch_text`]).
    pub(crate) async fn fetch_text_of(
        &self,
        round: u64,
        slot: u32,
        window: usize,
    ) -> Result<Vec<u8>, PeerError> {
        let path = format!("api/runs/{}/text/{round}/{slot}", self.spec.run_id);
        let bytes = platform::http_get(&url(&self.relay_url, &path))
            .await
            .map_err(PeerError::Download)?;
        let expected =
            self.spec.inner.steps as usize * self.spec.inner.batch_size as usize * window;
        if bytes.len() != expected {
            return Err(PeerError::Download(format!(
                "the round's text is {} bytes, expected {expected}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}

/// Inner steps to plan for a round: all `h` until the device's speed is known, then as many as
/// `budget` holds at `step_ms` a step with a tenth to spare (at least one: a round whose
/// deadline comes first is still cut there, with the steps done).
pub fn plan_steps(h: u32, step_ms: Option<f64>, budget: Duration) -> u32 {
    match step_ms {
        Some(ms) if ms > 0.0 => {
            let fit = 0.9 * budget.as_secs_f64() * 1e3 / ms;
            (fit.floor() as u32).clamp(1, h.max(1))
        }
        _ => h,
    }
}

/// What a peer keeps across connections to the relay (and its local trainer, which keeps its
/// replica and AdamW moments).
struct Progress {
    /// This device's time per inner step, measured on its last rounds (None before the first).
    step_ms: Option<f64>,
    /// What lossy compression left out of earlier updates; it rides along with the next one.
    feedback: ErrorFeedback,
    /// The last round trained, and the θ it started from.
    last_trained: Option<(u64, ParamsHash)>,
    /// An update the relay has not answered (the connection failed first): sent again after
    /// joining again if its round is still open, so that a restart does not cost the work.
    unsent: Option<(Update, Vec<u8>)>,
    /// The state the last update committed to ([`CommittedState::to_bytes`]) and its round,
    /// kept until the next announcement says whether the relay replays it.
    committed: Option<(u64, Vec<u8>)>,
    rounds_trained: u64,
}

/// Joins the relay and trains round after round on `B` until stopped or `max_rounds` is
/// reached. When the relay can't be reached or the connection fails (a relay restart, a
/// network change), the peer reports [`PeerEvent::Reconnecting`], waits ([`retry_delay`]) and
/// joins again with the same identity, keeping its AdamW moments and error-feedback residual;
/// it gives up after `max_retries` failures in a row, and at once on an error that retrying
/// can't fix ([`PeerError::is_transient`]).
pub async fn run<B: AutodiffBackend>(
    device: B::Device,
    config: PeerConfig,
    emit: impl FnMut(PeerEvent),
) -> Result<u64, PeerError> {
    run_with(InProcess::<B>::new(device), config, emit).await
}

/// [`run`] with its local training done by `local`.
pub async fn run_with<L: Local>(
    mut local: L,
    config: PeerConfig,
    mut emit: impl FnMut(PeerEvent),
) -> Result<u64, PeerError> {
    let identity = Identity::from_seed(*config.identity_seed);
    let mut progress = Progress {
        step_ms: None,
        feedback: ErrorFeedback::default(),
        last_trained: None,
        unsent: None,
        committed: None,
        rounds_trained: 0,
    };
    let mut failures = 0u32;
    loop {
        let error = match train_session(
            &mut local,
            &config,
            &identity,
            &mut progress,
            &mut failures,
            &mut emit,
        )
        .await
        {
            Ok(()) => break,
            Err(e) => e,
        };
        let retry = back_off(&config, &mut failures, error, |attempt, delay_ms, error| {
            emit(PeerEvent::Reconnecting {
                attempt,
                delay_ms,
                error,
            })
        })
        .await?;
        if !retry {
            break;
        }
    }
    emit(PeerEvent::Stopped {
        rounds_trained: progress.rounds_trained,
    });
    Ok(progress.rounds_trained)
}

/// After a session ended in `error` (the `failures`-th in a row, counted here): gives up with
/// the error when it cannot be mended, the peer was stopped or `max_retries` is spent; else
/// reports the wait (`reconnecting(attempt, delay_ms, error)`), waits [`retry_delay`] and says
/// whether to connect again (false: stopped meanwhile).
pub(crate) async fn back_off(
    config: &PeerConfig,
    failures: &mut u32,
    error: PeerError,
    reconnecting: impl FnOnce(u32, u64, String),
) -> Result<bool, PeerError> {
    *failures += 1;
    if config.stop.load(Ordering::Relaxed)
        || !error.is_transient()
        || config.max_retries.is_some_and(|max| *failures > max)
    {
        return Err(error);
    }
    let delay = retry_delay(*failures);
    reconnecting(*failures, delay.as_millis() as u64, error.to_string());
    sleep_unless_stopped(delay, &config.stop).await;
    Ok(!config.stop.load(Ordering::Relaxed))
}

/// One connection's worth of [`run`]: joins (then sets `failures` back to 0) and trains until
/// stopped, `max_rounds` is reached (Ok), or an error.
async fn train_session<L: Local>(
    local: &mut L,
    config: &PeerConfig,
    identity: &Identity,
    progress: &mut Progress,
    failures: &mut u32,
    emit: &mut impl FnMut(PeerEvent),
) -> Result<(), PeerError> {
    let peer = identity.peer();
    let (session, mut announcement) = Session::join(config, identity, Role::Train).await?;
    // When the announcement arrived: its deadline counts from about then.
    let mut announced_at = Instant::now();
    let mut via = Announced::Welcome;
    *failures = 0;
    emit(PeerEvent::Joined {
        run: session.spec.run_id.clone(),
        peer: peer.to_hex(),
        transport: session.transport.clone(),
        address: session.address.clone(),
    });
    emit(PeerEvent::Model {
        model: session.spec.model.describe(),
        n_params: session.spec.model.num_params(),
    });
    session.link_browsers(config).await;
    let mut direct = None;
    let spec = session.spec.clone();
    let Progress {
        step_ms,
        feedback,
        last_trained,
        unsent,
        committed,
        rounds_trained,
    } = progress;
    // Back after a reconnect in the round already trained (a relay that resumed it): send its
    // update again if it went unanswered (the relay refuses a second copy as a duplicate), then
    // wait for the next round.
    if *last_trained == Some((announcement.round, announcement.params)) {
        session.send_update(unsent, emit).await?;
        if config.max_rounds.is_some_and(|max| *rounds_trained >= max) {
            return session.answer_last_audit(committed, config, emit).await;
        }
        (announcement, via) = session.next_round(announcement.round).await?;
        announced_at = Instant::now();
    }
    session.answer_audit(&announcement, committed, emit).await?;
    *unsent = None;

    while !config.stop.load(Ordering::Relaxed)
        && config.max_rounds.is_none_or(|max| *rounds_trained < max)
    {
        let round = announcement.round;
        emit(PeerEvent::Round {
            round,
            inner_steps: spec.inner.steps,
            accuracy: announcement.accuracy,
            val_loss: announcement.loss,
            via: via.name().into(),
            forwarded_by: match via {
                Announced::Gossip(Some(peer)) => Some(peer.to_string()),
                _ => None,
            },
        });
        emit(PeerEvent::Fetching {
            round,
            bytes: 4 * spec.model.num_params() as u64,
            linked: session.client.relay_info().direct_peers.len() as u32,
        });
        let (start, fetched) = session.fetch_params(round, announcement.params).await?;
        emit(fetched);
        if start.len() != spec.model.num_params() {
            return Err(PeerError::Download(format!(
                "θ has {} values, the model {}",
                start.len(),
                spec.model.num_params()
            )));
        }
        // A round at or before one already trained means the run started over (a relay that
        // lost its state): that θ is another lineage, and the old moments do not apply to it.
        if last_trained.is_some_and(|(last, _)| round <= last) {
            local.forget();
            *feedback = ErrorFeedback::default();
        }
        if !local.has_replica() {
            local
                .reset(&spec.model, &spec.inner.optimizer, &start)
                .await
                .map_err(PeerError::BadSpec)?;
        }
        let lm_config = spec.model.lm_config();
        if let (Some(lm_config), true) = (&lm_config, config.sample_len > 0) {
            let sampled = local
                .sample(SampleJob {
                    config: lm_config.clone(),
                    params: start.clone(),
                    len: config.sample_len,
                    temperature: 0.8,
                    seed: data::derive_seed(
                        "sample",
                        &[spec.run_id.as_bytes(), &round.to_le_bytes()],
                    ),
                })
                .await
                .map_err(PeerError::Train)?;
            emit(PeerEvent::Sample {
                round,
                text: String::from_utf8_lossy(&sampled).into_owned(),
            });
        }

        let started = Instant::now();
        let h = spec.inner.steps;
        // A device too slow for H steps before the round's deadline sends the steps it managed
        // (with their sample count) instead of missing the round: it stops stepping with a
        // fifth of the time left (at most 10 s) for encoding and sending.
        let deadline = Duration::from_millis(announcement.deadline_ms);
        let until =
            announced_at + deadline.saturating_sub((deadline / 5).min(Duration::from_secs(10)));
        let data = match &lm_config {
            None => RoundData::Digits {
                shard: session.fetch_shard(round).await?,
                sampler_seed: data::derive_seed(
                    "inner",
                    &[spec.run_id.as_bytes(), &round.to_le_bytes(), &peer.0],
                ),
            },
            Some(lm_config) => {
                RoundData::Text(session.fetch_text(round, lm_config.context + 1).await?)
            }
        };
        let budget = until.saturating_duration_since(Instant::now());
        let planned = plan_steps(h, *step_ms, budget);
        emit(PeerEvent::Plan {
            round,
            planned_steps: planned,
            run_steps: h,
            step_ms: *step_ms,
            budget_ms: budget.as_millis() as u64,
        });
        let job = TrainJob {
            start: start.clone(),
            first_step: round * u64::from(h),
            data,
            steps: planned,
            batch: spec.inner.batch_size,
            budget_ms: Some(budget.as_millis() as u64),
        };
        let paused_before = config.pause.load(Ordering::Relaxed);
        let training = Instant::now();
        let LocalRound {
            steps,
            samples,
            loss,
            params: local_params,
            state: trainer_state,
        } = local
            .train_round(job, &config.stop, &config.pause, &mut |steps| {
                emit(PeerEvent::Progress {
                    round,
                    steps,
                    planned_steps: planned,
                    elapsed_ms: announced_at.elapsed().as_millis() as u64,
                    deadline_ms: announcement.deadline_ms,
                })
            })
            .await
            .map_err(PeerError::Train)?;
        let train_ms = started.elapsed().as_millis() as u64;
        // A round that was paused says nothing about the device's speed.
        if steps > 0 && !paused_before && !config.pause.load(Ordering::Relaxed) {
            let measured = training.elapsed().as_secs_f64() * 1e3 / f64::from(steps);
            *step_ms = Some(step_ms.map_or(measured, |old| 0.5 * old + 0.5 * measured));
        }
        if config.stop.load(Ordering::Relaxed) {
            break;
        }
        *rounds_trained += 1;
        *last_trained = Some((round, announcement.params));
        emit(PeerEvent::Trained {
            round,
            steps,
            planned_steps: planned,
            loss,
            train_ms,
            rounds_trained: *rounds_trained,
        });

        // What the round depended on beyond θ and the data: committed to before encoding (which
        // moves the residual on).
        let state = CommittedState {
            trainer: trainer_state,
            residual: feedback.residual().to_vec(),
        }
        .to_bytes();
        let payload = swarmtrain_shared::round::update_payload(
            swarmtrain_shared::round::pseudo_gradient(&start, &local_params),
            session.spec.privacy.as_ref(),
            session.spec.codec,
            feedback,
        );
        let update = Update {
            run_id: session.spec.run_id.clone(),
            round,
            base: announcement.params,
            n_samples: samples,
            inner_steps: steps,
            loss,
            codec: session.spec.codec,
            payload: PayloadRef::of(&payload),
            state: PayloadRef::of(&state),
        };
        *committed = Some((round, state));
        *unsent = Some((update, payload));
        session.send_update(unsent, emit).await?;
        if config.max_rounds.is_some_and(|max| *rounds_trained >= max) {
            return session.answer_last_audit(committed, config, emit).await;
        }
        if let Some(event) = session.direct_event(&mut direct) {
            emit(event);
        }
        (announcement, via) = session.next_round(round).await?;
        announced_at = Instant::now();
        session.answer_audit(&announcement, committed, emit).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_plans_the_steps_its_speed_fits_before_the_deadline() {
        let s = Duration::from_secs;
        // Unknown speed: the run's H.
        assert_eq!(plan_steps(200, None, s(1)), 200);
        // 50 ms a step, 10 s: 180 fit with a tenth to spare.
        assert_eq!(plan_steps(200, Some(50.0), s(10)), 180);
        // Fast enough for all of them: H, never more.
        assert_eq!(plan_steps(200, Some(1.0), s(10)), 200);
        // Too slow for one: still one (the deadline then cuts the round with what was done).
        assert_eq!(plan_steps(200, Some(5_000.0), s(1)), 1);
        assert_eq!(plan_steps(200, Some(50.0), Duration::ZERO), 1);
    }
}
