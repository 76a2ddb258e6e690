//! The relay's coordinator: owns a run's round state, verifies and judges every peer message,
//! and signs announcements.
//!
//! A round closes through the shared engine ([`RoundState::begin_close`] /
//! [`RoundState::finish_close`]) on the round timer's task, never inside a peer's request: the
//! aggregation (the fast CPU kernels, or a Burn backend) and the held-out evaluation run in
//! `spawn_blocking` without the state lock, so other peers' requests go on meanwhile, and the
//! peer whose update completed the quorum hears `Accepted` as soon as its update is durable.
//! An accepted update's ledger write also runs on a blocking thread without the state lock
//! (the round does not close while one is under way); the round's own record is committed on
//! a blocking thread while the round closes.
//!
//! `checking` checks the work behind updates (loss checks, replays by the relay or volunteer
//! verifiers, signed verdicts); `status` is what `/api/status` and checkpoints show of a run.

mod checking;
mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use burn::backend::NdArray;
use serde::Serialize;
use swarmtrain_client::edge::EdgeLink;
use swarmtrain_shared::admission::{self, Admission, AdmissionTerms};
use swarmtrain_shared::aggregate::AggregateError;
use swarmtrain_shared::checkpoint::TensorInfo;
use swarmtrain_shared::data::derive_seed;
use swarmtrain_shared::lm_train::evaluate_lm;
use swarmtrain_shared::outer::OuterOptimizer;
use swarmtrain_shared::protocol::{
    self, CHUNK_BYTES, Delegation, EdgeReport, Envelope, Fetch, Join, ModelConfig,
    PROTOCOL_VERSION, ParamsHash, Refusal, RefusalKind, RelayToClient, ReplayJob, Replayed, Reveal,
    Role, RoundAnnouncement, RunSpec, Submission, Update, Welcome,
};
use swarmtrain_shared::replay::{self, ReplayCheck};
use swarmtrain_shared::round::{Evaluation, RoundClosed, RoundState};
use swarmtrain_shared::{Identity, PeerKey, Signed, params, train};
use tokio::sync::{Mutex, Notify, broadcast, oneshot};
use tokio::time::Instant;

use crate::backend::AggregationBackend;
use crate::checks::{self, Audit, CheckJob, Checked, Claim, ReplayPolicy};
use crate::dataset::TaskData;
use crate::store::{Credit, LedgerEntry, RunRecord, Store};
use swarmtrain_shared::verify::{self, CheckPolicy, Outcome, Verdict};

/// Identities a run keeps as joined (with their data slots) at once. When a new one would
/// pass it, those not heard from for [`FORGET_IDLE_MS`] are forgotten (a forgotten peer is
/// told `not_joined` and joins again); if none is, the join is refused (`relay_busy`).
pub const MAX_JOINED_PER_RUN: usize = 100_000;
/// How long a joined identity may be silent before a full run forgets it.
pub const FORGET_IDLE_MS: u64 = 10 * 60 * 1000;
/// A full run looks for idle identities at most this often (the look is a scan of them all).
const FORGET_EVERY_MS: u64 = 10_000;

/// Updates of one round the relay checks at most (drawn at random when there are more; the
/// others stay unchecked): a bound on the check's memory (θ and these updates, for each
/// queued round) and time.
pub const MAX_CHECKED_PER_ROUND: usize = 64;
/// Bytes of θ and updates a run's queued checks may hold; a round that would pass it (while
/// others wait) is not checked.
pub const CHECK_QUEUE_BYTES: usize = 256 << 20;
/// Verdicts a run keeps in memory (see `State::verdicts`).
const RECENT_VERDICTS: usize = 4096;
/// Rounds of a peer's verdicts that one answer lists.
pub const VERDICT_ROUNDS: u64 = 20;

/// Parameter versions kept for download (a late peer may still fetch the previous round's).
const KEEP_PARAMS: usize = 4;
/// Rows of round history in a status answer (the newest); older rows come from
/// `/api/runs/{run}/history`.
pub const STATUS_HISTORY: usize = 200;

pub use crate::store::RoundRecord;
use checking::{VERIFIER_BANNED, Verifiers};
pub use status::{RunSpecView, Status};

struct State {
    round: RoundState,
    eval: Evaluation,
    /// The newest [`STATUS_HISTORY`] rows (the store keeps the rest): memory does not grow
    /// with the number of rounds.
    history: VecDeque<RoundRecord>,
    /// The oldest round with a history row.
    history_from: u64,
    params: HashMap<ParamsHash, bytes::Bytes>,
    params_order: VecDeque<ParamsHash>,
    announcement: Signed<RoundAnnouncement>,
    /// The parked long polls, one per joined identity: the round it has, and where to send
    /// the next (`None`: a newer poll from the same identity replaced this one).
    waiters: HashMap<PeerKey, (u64, Waiter)>,
    /// Joined identities: the role each joined in and the backend it reported.
    joined: BTreeMap<PeerKey, (Role, String)>,
    /// Data slots by peer, given out in order of first join (modulo the run's slots).
    slots: BTreeMap<PeerKey, u32>,
    /// At most this many joined identities ([`MAX_JOINED_PER_RUN`]; tests lower it).
    max_joined: usize,
    /// When a full run last looked for idle identities to forget.
    forgot_at_ms: Option<u64>,
    /// How long a joined identity may be silent before a full run forgets it
    /// ([`FORGET_IDLE_MS`]; tests lower it).
    forget_idle_ms: u64,
    rejected: BTreeMap<String, u64>,
    accepted: u64,
    /// Each contributor's credit (loaded from the store on resume, which also keeps it).
    credits: BTreeMap<PeerKey, Credit>,
    /// What the open round's accepted updates claim, for their checks.
    claims: BTreeMap<PeerKey, Claim>,
    /// The last checked round's upper-quartile score: whether its checks could tell.
    check_power: Option<f32>,
    /// Checked updates by outcome (`verified`, `failed`, `inconclusive`; `unrecorded` when
    /// the store could not take a round's verdicts).
    check_outcomes: BTreeMap<&'static str, u64>,
    /// The newest [`RECENT_VERDICTS`] signed verdicts, by (round, peer): what a relay without
    /// a data directory can show (one with keeps them all in its ledger).
    verdicts: BTreeMap<(u64, PeerKey), Signed<Verdict>>,
    /// The last closed round's updates drawn for a replay, waiting for their peers' reveals
    /// (their peers are the open round's announced `audit`). Kept in memory only: a relay
    /// that restarts forgets them (those updates stay unchecked).
    audits: BTreeMap<PeerKey, Audit>,
    /// Replays by outcome (`exact`, `near`, `differs`, `no_reveal`, `mismatch`, `bad_reveal`, `behind`).
    replay_outcomes: BTreeMap<&'static str, u64>,
    /// Bytes of revealed states received.
    reveal_bytes: u64,
    /// Volunteer verifiers and the replays waiting for them.
    verifiers: Verifiers,
    /// The open round could not be checkpointed yet: it is not announced (peers keep hearing
    /// the previous round) until a later tick writes it.
    unannounced: bool,
    /// Failed checkpoint writes so far, and when the next try is due.
    checkpoint_failures: u64,
    retry_at_ms: u64,
    /// Updates the round holds whose ledger write is under way (without the state lock): the
    /// round does not close until they are durable or taken back.
    recording: u32,
}

impl State {
    /// A run at `round` with nothing joined, claimed, checked or rejected yet.
    fn new(round: RoundState, eval: Evaluation, announcement: Signed<RoundAnnouncement>) -> Self {
        Self {
            history_from: round.round,
            round,
            eval,
            history: VecDeque::new(),
            params: HashMap::new(),
            params_order: VecDeque::new(),
            announcement,
            waiters: HashMap::new(),
            joined: BTreeMap::new(),
            slots: BTreeMap::new(),
            max_joined: MAX_JOINED_PER_RUN,
            forgot_at_ms: None,
            forget_idle_ms: FORGET_IDLE_MS,
            rejected: BTreeMap::new(),
            accepted: 0,
            credits: BTreeMap::new(),
            claims: BTreeMap::new(),
            check_power: None,
            check_outcomes: BTreeMap::new(),
            verdicts: BTreeMap::new(),
            audits: BTreeMap::new(),
            replay_outcomes: BTreeMap::new(),
            reveal_bytes: 0,
            verifiers: Verifiers::default(),
            unannounced: false,
            checkpoint_failures: 0,
            retry_at_ms: 0,
            recording: 0,
        }
    }
}

/// Where a parked long poll hears the next round (`None`: a newer poll replaced it).
type Waiter = oneshot::Sender<Option<Signed<RoundAnnouncement>>>;

/// A peer's message to one run: what a [`Coordinator`] answers. Key exchanges
/// (`KeyOffer`, `KeyConfirm`) belong to the connection and are answered by [`Runs`](crate::Runs)
/// before a message reaches a run, so they are not here.
#[derive(Clone, Debug, PartialEq)]
pub enum RunMessage {
    Join(Join),
    AwaitRound { run_id: String, after: Option<u64> },
    Update(Update),
    Reveal(Reveal),
    Verify { run_id: String },
    Replayed(Replayed),
    Report(EdgeReport),
}

impl RunMessage {
    /// The run it is for.
    pub fn run_id(&self) -> &str {
        match self {
            Self::Join(join) => &join.run_id,
            Self::AwaitRound { run_id, .. } | Self::Verify { run_id } => run_id,
            Self::Update(update) => &update.run_id,
            Self::Reveal(reveal) => &reveal.run_id,
            Self::Replayed(replayed) => &replayed.run_id,
            Self::Report(report) => &report.run_id,
        }
    }
}

/// Shared by the HTTP server, the libp2p event loop and the round timer.
pub struct Coordinator {
    identity: Identity,
    data: TaskData,
    /// The run's seed ([`RunSpecView::seed`]), recorded in every checkpoint.
    seed: u64,
    aggregation: AggregationBackend,
    started: Instant,
    state: Mutex<State>,
    store: Option<Arc<Store>>,
    layout: Vec<TensorInfo>,
    spec: RunSpec,
    announce: Announcements,
    /// Woken when an accepted update may have completed the quorum.
    due: Arc<Notify>,
    /// Who may join, and the run's proof-of-work challenge.
    admission: Admission,
    challenge: [u8; 32],
    /// How the relay checks each update's work ([`crate::checks`]).
    checks: CheckPolicy,
    /// Bytes held by closed rounds waiting for their checks or being checked, and the lane
    /// they take in turn (one round at a time, in the order they closed).
    checks_queued: std::sync::atomic::AtomicUsize,
    check_lane: Mutex<()>,
    replays: ReplayPolicy,
    /// Replays revealed and not yet run, and the lane they take in turn: their own, beside the
    /// loss checks', so that a backlog of loss checks never leaves a drawn update unreplayed.
    replays_queued: std::sync::atomic::AtomicUsize,
    replay_lane: Mutex<()>,
    /// Woken when a job for the verifiers is queued.
    jobs_ready: Notify,
    /// Where a peer whose audit failed (no reveal, a replay that differs) is reported for a
    /// strike against its identity (the libp2p loop keeps strikes).
    strikes: Option<tokio::sync::mpsc::Sender<PeerKey>>,
    /// On an edge relay of a federation: the link to the root, once joined (replaced when the
    /// edge joins the root again; [`crate::federation`]). An edge closes no round: it follows
    /// the root's.
    edge: Option<std::sync::RwLock<Option<Arc<EdgeLink>>>>,
    /// On a root: the only identities that may join as edges (empty: any admitted one).
    edge_keys: BTreeSet<PeerKey>,
    /// The relay's federation list, which edges' reports fill on a root.
    federation: Arc<crate::federation::Federation>,
    /// The federation's shared ledger (`--ledger-url`), where this relay writes its own peers'
    /// accepted updates (and a root its verdicts) and reads credits from.
    ledger: Option<Arc<crate::ledger::SharedLedger>>,
    /// Closed rounds not yet compared with the shared ledger, at most
    /// [`LEDGER_BEHIND_ROUNDS`], and whether a task is comparing them (one at a time; a
    /// comparison that fails, the database out of reach, is tried again after a pause).
    ledger_behind: Arc<std::sync::Mutex<BTreeSet<u64>>>,
    ledger_filling: Arc<std::sync::atomic::AtomicBool>,
}

/// Most rounds a root keeps to compare with the shared ledger once it is back.
const LEDGER_BEHIND_ROUNDS: usize = 1024;

/// Where a message reached this relay from: its sender's own connection, or an edge relay that
/// checked the connection and the run's admission for it ([`crate::Runs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Direct,
    Edge,
}

/// Where coordinators send every announcement as it is signed, for gossip: (run id, encoded
/// `Signed<RoundAnnouncement>`).
pub type Announcements = broadcast::Sender<(String, Vec<u8>)>;

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// θ₀ of the run: the digits MLP as Burn initializes it after seeding the backend with `seed`;
/// the language model from [`swarmtrain_shared::lm::LmConfig::init_params`] with the seed the
/// simulator derives from the same `seed`.
async fn initial_params(spec: &RunSpec, seed: u64) -> anyhow::Result<Vec<f32>> {
    let device = burn::backend::ndarray::NdArrayDevice::Cpu;
    Ok(match spec.model.config() {
        ModelConfig::Lm(config) => {
            config
                .init_params::<NdArray>(&device, derive_seed("lm init", &[&seed.to_le_bytes()]))
                .await?
        }
        ModelConfig::Digits(config) => {
            <NdArray as burn::tensor::backend::Backend>::seed(&device, seed);
            params::to_vec(&config.init::<NdArray>(&device)).await?
        }
    })
}

/// One run for a relay to open: the identity that signs for it, its spec, its data, its seed
/// and who may join it.
#[derive(Debug)]
pub struct RunSetup {
    pub identity: Identity,
    pub spec: RunSpec,
    pub data: TaskData,
    pub seed: u64,
    pub admission: Admission,
}

/// What every run of a relay shares: where it aggregates, persists and announces, and what wakes
/// the round timer.
#[derive(Clone, Debug)]
pub struct RelayShared {
    pub aggregation: AggregationBackend,
    pub store: Option<Arc<Store>>,
    pub announce: Announcements,
    pub due: Arc<Notify>,
}

impl Coordinator {
    /// Opens the run: resumed from `store` at its last announced round (with that round's
    /// accepted updates) when the store has it, else round 0 with fresh parameters seeded by
    /// `seed`, checkpointed before anything is announced.
    pub async fn new(run: RunSetup, shared: RelayShared) -> anyhow::Result<Self> {
        let RunSetup {
            identity,
            spec,
            data,
            seed,
            admission,
        } = run;
        let RelayShared {
            aggregation,
            store,
            announce,
            due,
        } = shared;
        spec.validate()?;
        if let Admission::ProofOfWork { bits } = admission {
            anyhow::ensure!(
                bits <= Admission::MAX_BITS,
                "run {:?}: a proof of work of {bits} bits is more than the {} allowed",
                spec.run_id,
                Admission::MAX_BITS
            );
        }
        let epoch: [u8; 16] = rand::random();
        let challenge = admission::challenge(identity.public_key(), &spec.run_id, &epoch);
        let run_spec = spec.clone();
        let layout = crate::ops::model_layout(&spec.model);
        let resumed = match &store {
            Some(store) => store.run(&spec.run_id)?,
            None => None,
        };
        let mut state = match (&store, resumed) {
            (Some(store), Some(record)) => {
                let (params, velocity) = store.read_checkpoint(&record.checkpoint, &layout).await?;
                let outer = OuterOptimizer {
                    spec: spec.outer.clone(),
                    velocity,
                };
                let mut round = RoundState::resume(spec.clone(), record.round, params, outer, 0);
                let mut accepted = record.accepted;
                for (peer, entry) in store.updates(&spec.run_id, record.round)? {
                    let restored =
                        entry
                            .verify()
                            .map_err(|e| e.to_string())
                            .and_then(|(signer, update)| {
                                if signer != peer {
                                    return Err("signed by another peer than its key".into());
                                }
                                round
                                    .restore(peer, &update, &entry.payload)
                                    .map_err(|e| e.to_string())
                            });
                    match restored {
                        Ok(()) => accepted += 1,
                        Err(e) => {
                            tracing::warn!(peer = peer.short(), error = %e, "a stored update no longer applies")
                        }
                    }
                }
                tracing::info!(
                    run = spec.run_id,
                    round = record.round,
                    pending = round.updates_this_round(),
                    checkpoint = record.checkpoint,
                    "resumed from the data directory"
                );
                let eval = Evaluation {
                    accuracy: record.accuracy,
                    loss: record.loss,
                };
                let announcement = identity.sign(&round.announcement(eval, Vec::new(), 0))?;
                let (history, first) = store.recent_history(&spec.run_id, STATUS_HISTORY)?;
                State {
                    history: history.into(),
                    history_from: first.unwrap_or(record.round),
                    rejected: record.rejected,
                    accepted,
                    credits: store.credits(&spec.run_id)?.into_iter().collect(),
                    ..State::new(round, eval, announcement)
                }
            }
            _ => {
                let initial = initial_params(&spec, seed).await?;
                anyhow::ensure!(
                    initial.len() == spec.model.num_params(),
                    "θ₀ has {} values, the model {}",
                    initial.len(),
                    spec.model.num_params()
                );
                let eval = evaluate(&spec, &data, &initial)?;
                let round = RoundState::new(spec, initial, 0);
                let announcement = identity.sign(&round.announcement(eval, Vec::new(), 0))?;
                let mut state = State::new(round, eval, announcement);
                state.history.push_back(RoundRecord {
                    round: 0,
                    accuracy: eval.accuracy,
                    val_loss: eval.loss,
                    contributors: 0,
                    samples: 0,
                    mean_loss: None,
                    closed_at_ms: 0,
                    aggregation_ms: 0.0,
                });
                if let Some(store) = &store {
                    persist(
                        store,
                        &layout,
                        &state,
                        &RunSpecView::new(&run_spec, &data, seed),
                    )
                    .await?;
                }
                state
            }
        };
        store_params(&mut state);
        Ok(Self {
            identity,
            data,
            seed,
            aggregation,
            started: Instant::now(),
            state: Mutex::new(state),
            store,
            layout,
            spec: run_spec,
            announce,
            due,
            admission,
            challenge,
            checks: CheckPolicy::default(),
            checks_queued: std::sync::atomic::AtomicUsize::new(0),
            check_lane: Mutex::new(()),
            replays: ReplayPolicy::default(),
            replays_queued: std::sync::atomic::AtomicUsize::new(0),
            replay_lane: Mutex::new(()),
            jobs_ready: Notify::new(),
            strikes: None,
            edge: None,
            edge_keys: BTreeSet::new(),
            federation: Arc::default(),
            ledger: None,
            ledger_behind: Arc::default(),
            ledger_filling: Arc::default(),
        })
    }

    /// Writes this run's own peers' accepted updates (and, on a root, the verdicts) to the
    /// federation's shared `ledger` too, and reads credits from it ([`crate::ledger`]).
    pub fn with_ledger(mut self, ledger: Option<Arc<crate::ledger::SharedLedger>>) -> Self {
        self.ledger = ledger;
        self
    }

    /// The federation's shared ledger, when the relay has one.
    pub fn shared_ledger(&self) -> Option<&Arc<crate::ledger::SharedLedger>> {
        self.ledger.as_ref()
    }

    /// On a root with a data directory and a shared ledger, as round `open` is announced: the
    /// rows of round `open - 2` (closed a round ago, so its checks are done and its edges' rows
    /// written) that the shared ledger lacks are written from the data directory
    /// ([`crate::ledger::SharedLedger::fill_in`]) by a task of their own, which tries a
    /// comparison that failed again after a pause (2 s, doubling up to a minute).
    fn fill_in_shared_ledger(&self, open: u64) {
        use std::sync::atomic::Ordering;
        let (Some(ledger), Some(store), Some(round)) =
            (&self.ledger, &self.store, open.checked_sub(2))
        else {
            return;
        };
        if self.edge.is_some() {
            return;
        }
        let behind = self.ledger_behind.clone();
        let snapshot = |behind: &std::sync::Mutex<BTreeSet<u64>>| {
            behind
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        };
        {
            let mut rounds = behind
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            rounds.insert(round);
            while rounds.len() > LEDGER_BEHIND_ROUNDS {
                if let Some(dropped) = rounds.pop_first() {
                    tracing::warn!(
                        round = dropped,
                        "too many rounds wait to be compared with the shared ledger: the oldest is \
                         given up (rows it lacks stay missing there; the data directory has them)"
                    );
                }
            }
        }
        let filling = self.ledger_filling.clone();
        if filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (ledger, store, spec) = (ledger.clone(), store.clone(), self.spec.clone());
        tokio::spawn(async move {
            let mut pause = Duration::from_secs(2);
            loop {
                let rounds = snapshot(&behind);
                if rounds.is_empty() {
                    filling.store(false, Ordering::Release);
                    // A round queued after the look above finds `filling` still set: look again.
                    if snapshot(&behind).is_empty() || filling.swap(true, Ordering::AcqRel) {
                        return;
                    }
                    continue;
                }
                let mut failed = false;
                for round in rounds {
                    let filled = fill_in_round(&ledger, &store, &spec, round).await;
                    if let Err(e) = filled {
                        tracing::warn!(
                            error = %e,
                            round,
                            retry_ms = pause.as_millis() as u64,
                            "could not compare the shared ledger with the data directory"
                        );
                        failed = true;
                        break;
                    }
                    behind
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&round);
                }
                if failed {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(60));
                } else {
                    pause = Duration::from_secs(2);
                }
            }
        });
    }

    /// Queues `update`'s row for the shared ledger (if any): `signed` is the peer's envelope.
    fn share_entry(&self, peer: PeerKey, update: &Update, signed: &Signed<Envelope>, now: u64) {
        let Some(ledger) = &self.ledger else {
            return;
        };
        match postcard::to_allocvec(signed) {
            Ok(signed) => ledger.record(crate::ledger::Row::Entry {
                run_id: self.spec.run_id.clone(),
                round: update.round,
                peer,
                received_ms: now,
                samples: self.spec.samples_of(update.inner_steps),
                inner_steps: u64::from(update.inner_steps),
                signed,
            }),
            Err(e) => tracing::error!(error = %e, "could not encode a ledger entry"),
        }
    }

    /// Keeps the edges' reports in `federation`, the relay's list (shared by its runs).
    pub fn with_federation(mut self, federation: Arc<crate::federation::Federation>) -> Self {
        self.federation = federation;
        self
    }

    /// Takes as edges only the identities in `keys` (empty: any that passes the admission).
    pub fn with_edge_keys(mut self, keys: BTreeSet<PeerKey>) -> Self {
        self.edge_keys = keys;
        self
    }

    /// Makes this run an edge of a federation: it closes no round and refuses peers until
    /// [`Self::set_link`] gives it its link to the root, then forwards its peers' joins, updates
    /// and reveals there and follows the root's rounds ([`Self::adopt`]).
    pub fn as_edge(mut self) -> Self {
        self.edge = Some(std::sync::RwLock::new(None));
        self
    }

    /// Gives an edge run its link to the root, in place of the one it had.
    pub fn set_link(&self, link: Arc<EdgeLink>) {
        if let Some(Ok(mut held)) = self.edge.as_ref().map(|edge| edge.write()) {
            *held = Some(link);
        }
    }

    /// Whether this run is an edge's, following a root ([`Self::as_edge`]).
    pub fn follows_root(&self) -> bool {
        self.edge.is_some()
    }

    /// The HTTP base URL of the root an edge's run follows, once it has reached it.
    pub fn root_url(&self) -> Option<String> {
        self.link_to_root().map(|link| link.root_url().to_owned())
    }

    /// An edge's link to the root, once it has one.
    pub fn link_to_root(&self) -> Option<Arc<EdgeLink>> {
        self.edge
            .as_ref()
            .and_then(|edge| edge.read().ok().and_then(|held| held.clone()))
    }

    /// The edge's link to the root, or why there is none yet (`None` on a relay that owns its
    /// run).
    fn link(&self) -> Option<Result<Arc<EdgeLink>, Refusal>> {
        self.edge.as_ref().map(|_| {
            self.link_to_root().ok_or_else(|| Refusal {
                kind: RefusalKind::RelayBusy,
                reason: "this edge relay has not reached its root yet; try again shortly".into(),
            })
        })
    }

    /// Whether `peer` joined this run as an edge relay.
    pub async fn is_edge(&self, peer: &PeerKey) -> bool {
        self.state.lock().await.joined.get(peer).map(|j| j.0) == Some(Role::Edge)
    }

    /// An edge takes the root's round `signed` (verified by the caller) with its θ `params`:
    /// its peers are told, by gossip and their long polls, with the root's signed announcement,
    /// and fetch θ here. A round not after the current one is ignored (false).
    pub async fn adopt(
        &self,
        signed: Signed<RoundAnnouncement>,
        announcement: &RoundAnnouncement,
        params: Vec<f32>,
    ) -> bool {
        let now = self.now_ms();
        let mut state = self.state.lock().await;
        let first = state.announcement.public_key != signed.public_key;
        if announcement.round <= state.round.round && !first {
            return false;
        }
        // The history an edge shows is the root's rounds as it followed them: each row the
        // round's held-out figures and the updates of this edge's peers in the round before.
        if first {
            state.history.clear();
        }
        let through_here = state.round.contributions();
        state.history.push_back(RoundRecord {
            round: announcement.round,
            accuracy: announcement.accuracy,
            val_loss: announcement.loss,
            contributors: through_here.len(),
            samples: through_here.iter().map(|c| u64::from(c.n_samples)).sum(),
            mean_loss: None,
            closed_at_ms: now,
            aggregation_ms: 0.0,
        });
        while state.history.len() > STATUS_HISTORY {
            state.history.pop_front();
        }
        state.history_from = state.history.front().map_or(0, |r| r.round);
        let mut round = RoundState::resume(
            self.spec.clone(),
            announcement.round,
            params,
            state.round.outer().clone(),
            now,
        );
        for peer in state.joined.keys() {
            if let Some(at) = state.round.last_seen(peer) {
                round.seen(*peer, at);
            }
        }
        state.round = round;
        state.eval = Evaluation {
            accuracy: announcement.accuracy,
            loss: announcement.loss,
        };
        state.claims.clear();
        store_params(&mut state);
        self.publish(&mut state, signed);
        tracing::info!(round = announcement.round, "following the root's round");
        true
    }

    /// Makes `announcement` the open round's: gossips it and answers the long polls waiting
    /// for a later round than theirs.
    fn publish(&self, state: &mut State, announcement: Signed<RoundAnnouncement>) {
        // Nobody listening (no peers yet) is fine.
        match protocol::gossip_announcement(&announcement) {
            Ok(frame) => {
                let _ = self.announce.send((self.spec.run_id.clone(), frame));
            }
            Err(e) => tracing::error!(error = %e, "could not encode the announcement for gossip"),
        }
        let round = state.round.round;
        let ready: Vec<PeerKey> = state
            .waiters
            .iter()
            .filter(|(_, (after, _))| *after < round)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in ready {
            if let Some((_, waiter)) = state.waiters.remove(&peer) {
                let _ = waiter.send(Some(announcement.clone()));
            }
        }
        state.announcement = announcement;
    }

    /// An edge's answer to its peer, from the root's answer to the forwarded message (`Err`:
    /// the root could not be reached, answered `relay_busy`).
    async fn answer_from_root(
        &self,
        peer: PeerKey,
        answer: Result<RelayToClient, swarmtrain_client::PeerError>,
    ) -> Answer {
        match answer {
            Ok(RelayToClient::Rejected { kind, reason }) => {
                let kind = RefusalKind::parse(&kind).unwrap_or(RefusalKind::Internal);
                Err(self
                    .reject(Some(peer), kind, format!("the root relay: {reason}"))
                    .await)
            }
            Ok(answer) => Ok(answer),
            // Peers ask a busy relay again (after a pause), as they should here.
            Err(e) => {
                let reason =
                    format!("the root relay could not be reached ({e}); try again shortly");
                Err(self
                    .reject(Some(peer), RefusalKind::RelayBusy, reason)
                    .await)
            }
        }
    }

    /// Checks each update's work with `policy` ([`crate::checks`]).
    pub fn with_checks(mut self, policy: CheckPolicy) -> Self {
        self.checks = policy;
        self
    }

    /// Replays a drawn fraction of updates with `policy` ([`checks::replay_update`]); a peer
    /// whose replay fails is reported on `strikes`.
    pub fn with_replays(
        mut self,
        policy: ReplayPolicy,
        strikes: Option<tokio::sync::mpsc::Sender<PeerKey>>,
    ) -> Self {
        self.replays = policy;
        self.strikes = strikes;
        self
    }

    /// What a peer must know of this run's admission policy before it joins.
    pub fn admission_terms(&self) -> AdmissionTerms {
        self.admission.terms(&self.challenge)
    }

    /// What can be checked of a `Join` from the identity it claims before its signature is:
    /// the version and run, and the run's admission for that key (a proof of work is a hash
    /// away). A flood of joins without a valid proof then costs no signature checks.
    pub fn precheck_join(
        &self,
        claimed: &PeerKey,
        join: &Join,
    ) -> Result<(), (RefusalKind, String)> {
        if join.version != PROTOCOL_VERSION || join.run_id != self.spec.run_id {
            let reason = format!("join for run {:?} version {}", join.run_id, join.version);
            return Err((RefusalKind::BadJoin, reason));
        }
        self.admission
            .admit(&self.challenge, claimed, join.proof_of_work)
            .map_err(|e| (RefusalKind::NotAdmitted, e.to_string()))
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Lowers the cap on joined identities and the idle time after which a full run forgets
    /// one (tests).
    #[cfg(test)]
    async fn limit_joined(&self, max_joined: usize, forget_idle_ms: u64) {
        let mut state = self.state.lock().await;
        state.max_joined = max_joined;
        state.forget_idle_ms = forget_idle_ms;
    }

    /// The run's spec (fixed for the run's life).
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The parameters with `hash` (one of the newest 4), as shared bytes: a
    /// download clones a reference, never θ.
    pub async fn params(&self, hash: &ParamsHash) -> Option<bytes::Bytes> {
        self.state.lock().await.params.get(hash).cloned()
    }

    /// The data slot given to `peer` when it joined.
    pub async fn slot(&self, peer: &PeerKey) -> Option<u32> {
        self.state.lock().await.slots.get(peer).copied()
    }

    /// The open round's parameters θ_t.
    pub async fn current_params(&self) -> Vec<f32> {
        self.state.lock().await.round.params().to_vec()
    }

    /// Digits runs: training shard `index`.
    pub fn shard(&self, index: usize) -> Option<Vec<u8>> {
        match &self.data {
            TaskData::Digits(data) => data.shards.get(index).map(|s| s.to_bytes()),
            TaskData::Text(_) => None,
        }
    }

    /// Text runs: the windows that the peer in `slot` trains on in `round` (`steps · batch`
    /// windows, in step order), for the open round or an earlier one.
    pub async fn text(&self, round: u64, slot: u32) -> Option<Vec<u8>> {
        let TaskData::Text(text) = &self.data else {
            return None;
        };
        let open = self.state.lock().await.round.round;
        let (n, inner) = (self.spec.data.n_shards, &self.spec.inner);
        (round <= open && slot < n).then(|| {
            text.shards
                .shard(round, slot, n, inner.steps, inner.batch_size as usize)
        })
    }

    /// Counts and logs a refusal of `peer`'s message (`None`: before any identity is known) and
    /// returns it, for the caller to answer with.
    pub async fn reject(
        &self,
        peer: Option<PeerKey>,
        kind: RefusalKind,
        reason: String,
    ) -> Refusal {
        tracing::warn!(peer = peer.map(|p| p.short()), kind = kind.as_str(), %reason, "rejected message");
        *self
            .state
            .lock()
            .await
            .rejected
            .entry(kind.as_str().to_owned())
            .or_default() += 1;
        Refusal { kind, reason }
    }

    /// Answers a fetch of public data: one chunk of θ by hash.
    pub async fn fetch(&self, fetch: Fetch, from: Option<PeerKey>) -> Answer {
        if fetch.run_id() != self.spec.run_id {
            let reason = format!("no run {:?}", fetch.run_id());
            return Err(self.reject(from, RefusalKind::WrongRun, reason).await);
        }
        let (bytes, offset) = match fetch {
            Fetch::Params { hash, offset, .. } => match self.params(&hash).await {
                Some(bytes) => (bytes, offset),
                None => {
                    let reason = format!("no parameters {}", hash.to_hex());
                    return Err(self.reject(from, RefusalKind::UnknownParams, reason).await);
                }
            },
            Fetch::State { digest, offset, .. } => {
                let state = self.state.lock().await;
                let held = state.verifiers.jobs.values().find(|job| {
                    job.audit.claim.state.digest == digest
                        && from.is_some_and(|v| job.verifier == Some(v))
                });
                match held {
                    Some(job) => (job.state.clone(), offset),
                    None => {
                        drop(state);
                        let reason =
                            "no replay job of this verifier's reveals that state".to_owned();
                        return Err(self.reject(from, RefusalKind::UnknownJob, reason).await);
                    }
                }
            }
        };
        let start = offset as usize;
        if start >= bytes.len() {
            let reason = format!("offset {offset} is past the end ({} bytes)", bytes.len());
            return Err(self.reject(from, RefusalKind::BadFetch, reason).await);
        }
        let end = (start + CHUNK_BYTES).min(bytes.len());
        Ok(RelayToClient::Chunk {
            total: bytes.len() as u32,
            offset,
            bytes: bytes[start..end].to_vec(),
        })
    }

    /// Handles one message from `peer`, whose envelope [`Runs`](crate::Runs) has checked
    /// (`signed` is that envelope, kept in the ledger for updates; `payload` is an update's
    /// encoded Δ), and returns the response frame. Never panics on peer input; a long poll
    /// resolves at the next announcement or after `max_wait`. A `Join` must pass the run's
    /// admission policy; an update from a peer that has not joined is refused (`not_joined`).
    pub async fn handle(
        self: &Arc<Self>,
        peer: PeerKey,
        message: RunMessage,
        signed: Signed<Envelope>,
        payload: Vec<u8>,
        max_wait: Duration,
    ) -> Answer {
        self.handle_from(peer, message, signed, payload, max_wait, Origin::Direct)
            .await
    }

    /// [`Self::handle`] for a message that came `origin`: one an edge relay forwards has
    /// passed the edge's admission (the root does not ask for its own proof of work). On an
    /// edge, joins, updates and reveals go on to the root and its answer comes back.
    pub async fn handle_from(
        self: &Arc<Self>,
        peer: PeerKey,
        message: RunMessage,
        signed: Signed<Envelope>,
        payload: Vec<u8>,
        max_wait: Duration,
        origin: Origin,
    ) -> Answer {
        let now = self.now_ms();
        let link = match self.link() {
            Some(Ok(link)) => Some(link),
            Some(Err(refusal)) => {
                return Err(self.reject(Some(peer), refusal.kind, refusal.reason).await);
            }
            None => None,
        };
        match message {
            RunMessage::Join(join) => {
                if join.version != PROTOCOL_VERSION || join.run_id != self.spec.run_id {
                    let reason = format!("join for run {:?} version {}", join.run_id, join.version);
                    return Err(self.reject(Some(peer), RefusalKind::BadJoin, reason).await);
                }
                let refused_role = match (join.role, link.is_some(), origin) {
                    (Role::Verify | Role::Edge, true, _) => Some((
                        RefusalKind::BadJoin,
                        "an edge relay takes trainers only: verifiers and edges join the root",
                    )),
                    (Role::Edge, _, Origin::Edge) => Some((
                        RefusalKind::BadJoin,
                        "an edge's peer cannot join as an edge",
                    )),
                    (Role::Edge, false, Origin::Direct)
                        if !self.edge_keys.is_empty() && !self.edge_keys.contains(&peer) =>
                    {
                        Some((
                            RefusalKind::NotAdmitted,
                            "this root takes edges from its --edge-key list only",
                        ))
                    }
                    _ => None,
                };
                if let Some((kind, reason)) = refused_role {
                    return Err(self.reject(Some(peer), kind, reason.into()).await);
                }
                let mut state = self.state.lock().await;
                // An identity admitted once stays admitted while the run keeps it joined; one an
                // edge forwards was admitted there.
                if origin == Origin::Direct
                    && !state.joined.contains_key(&peer)
                    && let Err(e) = self
                        .admission
                        .admit(&self.challenge, &peer, join.proof_of_work)
                {
                    drop(state);
                    return Err(self
                        .reject(Some(peer), RefusalKind::NotAdmitted, e.to_string())
                        .await);
                }
                tracing::info!(
                    peer = peer.short(),
                    backend = join.capabilities.backend,
                    platform = join.capabilities.platform,
                    "peer joined"
                );
                if !state.joined.contains_key(&peer) && !state.make_room(now) {
                    let reason = format!(
                        "the run holds {} identities, none silent for {} s: try again later",
                        state.max_joined,
                        state.forget_idle_ms / 1000
                    );
                    drop(state);
                    return Err(self
                        .reject(Some(peer), RefusalKind::RelayBusy, reason)
                        .await);
                }
                if let Some(link) = link {
                    // An edge: the root gives the slot (one numbering across the federation)
                    // and counts the peer among its round's; the peer hears the root's round.
                    drop(state);
                    let backend = join.capabilities.backend.clone();
                    let answer = link.forward(&Submission { signed, payload }).await;
                    let welcome = match self.answer_from_root(peer, answer).await? {
                        RelayToClient::Welcome(welcome) => welcome,
                        _ => {
                            let reason = "the root answered a join with something else".into();
                            return Err(self
                                .reject(Some(peer), RefusalKind::Internal, reason)
                                .await);
                        }
                    };
                    let mut state = self.state.lock().await;
                    state.joined.insert(peer, (Role::Train, backend));
                    state.slots.insert(peer, welcome.slot);
                    state.round.seen(peer, now);
                    return Ok(RelayToClient::Welcome(Box::new(Welcome {
                        spec: state.round.spec.clone(),
                        round: state.announcement.clone(),
                        slot: welcome.slot,
                        delegation: link.delegation().cloned(),
                    })));
                }
                state
                    .joined
                    .insert(peer, (join.role, join.capabilities.backend));
                // A verifier or an edge takes no data slot and is not one of the round's peers.
                let slot = match join.role {
                    Role::Train => {
                        state.round.seen(peer, now);
                        let next = state.slots.len() as u32 % self.spec.data.n_shards.max(1);
                        *state.slots.entry(peer).or_insert(next)
                    }
                    Role::Edge => 0,
                    Role::Verify => {
                        if state.verifiers.banned.contains(&peer) {
                            state.joined.remove(&peer);
                            drop(state);
                            let reason = VERIFIER_BANNED.to_owned();
                            return Err(self
                                .reject(Some(peer), RefusalKind::VerifierBanned, reason)
                                .await);
                        }
                        state.verifiers.seen.insert(peer, now);
                        0
                    }
                };
                // A round that is not yet durable is not announced: the joiner hears the last
                // announced one.
                let round = if state.unannounced {
                    Ok(state.announcement.clone())
                } else {
                    self.identity
                        .sign(&state.round.announcement(state.eval, state.audited(), now))
                };
                let spec = state.round.spec.clone();
                drop(state);
                // An edge is told that its key speaks for the run to its own peers.
                let delegation = (join.role == Role::Edge)
                    .then(|| {
                        self.identity.sign(&Delegation {
                            run_id: self.spec.run_id.clone(),
                            edge_key: signed.public_key.clone(),
                        })
                    })
                    .transpose();
                match round.and_then(|round| Ok((round, delegation?))) {
                    Ok((round, delegation)) => Ok(RelayToClient::Welcome(Box::new(Welcome {
                        spec,
                        round,
                        slot,
                        delegation,
                    }))),
                    Err(e) => Err(self
                        .reject(Some(peer), RefusalKind::Internal, e.to_string())
                        .await),
                }
            }
            RunMessage::AwaitRound { run_id, after } => {
                let waiter = {
                    let mut state = self.state.lock().await;
                    if run_id != state.round.spec.run_id {
                        drop(state);
                        return Err(self
                            .reject(
                                Some(peer),
                                RefusalKind::WrongRun,
                                format!("no run {run_id:?}"),
                            )
                            .await);
                    }
                    // Only joined identities wait for rounds, and trainers count as active: a
                    // poll from an identity that never joined would otherwise park for free and
                    // raise the quorum. A verifier is not one of the round's peers; an edge
                    // relay follows the rounds without being one.
                    match state.joined.get(&peer).map(|j| j.0) {
                        Some(Role::Train) => state.round.seen(peer, now),
                        Some(Role::Edge) => {}
                        _ => {
                            drop(state);
                            let reason =
                                "join this run as a trainer before waiting for rounds".into();
                            return Err(self
                                .reject(Some(peer), RefusalKind::NotJoined, reason)
                                .await);
                        }
                    }
                    match after {
                        // Only a peer that has the current round waits for the next one. One
                        // that names a later round (a relay that lost its state, or a hostile
                        // `u64::MAX`) hears the current round at once and leaves no waiter behind.
                        Some(after) if after == state.round.round => {
                            // One parked poll per identity: a newer one replaces it, and the
                            // older is told so (`poll_busy`) rather than answered with the
                            // round it has, which its sender would ask about again at once.
                            let (tx, rx) = oneshot::channel();
                            if let Some((_, older)) = state.waiters.insert(peer, (after, tx)) {
                                let _ = older.send(None);
                            }
                            rx
                        }
                        _ => return Ok(RelayToClient::Round(state.announcement.clone())),
                    }
                };
                let announcement = match tokio::time::timeout(max_wait, waiter).await {
                    Ok(Ok(Some(announcement))) => announcement,
                    Ok(Ok(None)) => {
                        let reason =
                            "a newer long poll from this identity replaced this one".into();
                        return Err(self.reject(Some(peer), RefusalKind::PollBusy, reason).await);
                    }
                    // Timed out (or shutting down): answer with the current round; the peer asks again.
                    _ => {
                        let mut state = self.state.lock().await;
                        if state
                            .waiters
                            .get(&peer)
                            .is_some_and(|(_, tx)| tx.is_closed())
                        {
                            state.waiters.remove(&peer);
                        }
                        state.announcement.clone()
                    }
                };
                Ok(RelayToClient::Round(announcement))
            }
            RunMessage::Update(update) => {
                let mut state = self.state.lock().await;
                if state.joined.get(&peer).map(|j| j.0) != Some(Role::Train) {
                    drop(state);
                    let reason = "join this run as a trainer before an update".to_owned();
                    return Err(self
                        .reject(Some(peer), RefusalKind::NotJoined, reason)
                        .await);
                }
                if state.unannounced {
                    drop(state);
                    let reason =
                        "the relay cannot store the round yet; the update missed it".into();
                    return Err(self
                        .reject(Some(peer), RefusalKind::StoreFailed, reason)
                        .await);
                }
                if let Err(rejection) = state.round.submit(peer, &update, &payload, now) {
                    drop(state);
                    return Err(self
                        .reject(Some(peer), rejection.kind(), rejection.to_string())
                        .await);
                }
                let samples = self.spec.samples_of(update.inner_steps);
                if let Some(link) = link {
                    // An edge: checked here like any update, counted at the root, which records
                    // it durably before it answers; the peer hears the root's answer.
                    drop(state);
                    let shared = self.ledger.is_some().then(|| signed.clone());
                    let answer = link.forward(&Submission { signed, payload }).await;
                    let answer = self.answer_from_root(peer, answer).await;
                    let mut state = self.state.lock().await;
                    if matches!(answer, Ok(RelayToClient::Accepted { .. })) {
                        if let Some(signed) = &shared {
                            self.share_entry(peer, &update, signed, now);
                        }
                        state.accepted += 1;
                        state.credits.entry(peer).or_default().add(&update, samples);
                    } else {
                        state.round.withdraw(&peer);
                    }
                    return answer;
                }
                // Durable before the peer hears `Accepted`; an update that cannot be made
                // durable is taken back and the peer told so. The write runs on a blocking
                // thread without the state lock (other peers' requests go on); the round waits
                // for it before it closes (`recording`). Handlers run as tasks of their own
                // (`p2p::run` spawns each), so none is dropped between the count and its undoing.
                // The shared ledger's row is its own peer's relay's to write: an edge writes the
                // rows of what it forwards.
                let shared =
                    (origin == Origin::Direct && self.ledger.is_some()).then(|| signed.clone());
                if let Some(store) = &self.store {
                    let entry = LedgerEntry {
                        received_ms: now,
                        round: update.round,
                        signed,
                        payload,
                    };
                    state.recording += 1;
                    drop(state);
                    let (store, run_id) = (store.clone(), self.spec.run_id.clone());
                    let written = tokio::task::spawn_blocking(move || {
                        store.record_update(&run_id, &peer, &entry, samples)
                    })
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|written| written);
                    state = self.state.lock().await;
                    state.recording -= 1;
                    if let Err(e) = written {
                        state.round.withdraw(&peer);
                        drop(state);
                        // The round may have waited on this write to close.
                        self.due.notify_one();
                        tracing::error!(error = %e, "could not record an accepted update");
                        return Err(self
                            .reject(
                                Some(peer),
                                RefusalKind::StoreFailed,
                                "the relay could not store the update; send it again".into(),
                            )
                            .await);
                    }
                }
                state.accepted += 1;
                state.credits.entry(peer).or_default().add(&update, samples);
                if let Some(signed) = &shared {
                    self.share_entry(peer, &update, signed, now);
                }
                let slot = state.slots.get(&peer).copied().unwrap_or_default();
                state.claims.insert(
                    peer,
                    Claim {
                        slot,
                        steps: update.inner_steps.min(self.spec.inner.steps),
                        samples,
                        payload: update.payload.digest,
                        state: update.state,
                    },
                );
                drop(state);
                tracing::info!(
                    peer = peer.short(),
                    round = update.round,
                    loss = update.loss,
                    "accepted update"
                );
                // The round timer closes the round if this completed its quorum.
                self.due.notify_one();
                Ok(RelayToClient::Accepted {
                    round: update.round,
                })
            }
            RunMessage::Reveal(_) if let Some(link) = link => {
                // The root drew the update for its replay: the reveal is the root's.
                let answer = link.forward(&Submission { signed, payload }).await;
                self.answer_from_root(peer, answer).await
            }
            RunMessage::Reveal(reveal) => self.reveal(peer, reveal, payload).await,
            RunMessage::Verify { .. } => self.give_job(peer, max_wait).await,
            RunMessage::Replayed(report) => self.replayed(peer, report, payload).await,
            RunMessage::Report(report) => {
                let refusal = if link.is_some() || !self.is_edge(&peer).await {
                    Some((
                        RefusalKind::NotJoined,
                        "only a root's joined edges report".to_owned(),
                    ))
                } else if report.run_id != self.spec.run_id {
                    Some((RefusalKind::WrongRun, format!("no run {:?}", report.run_id)))
                } else {
                    report
                        .check()
                        .err()
                        .map(|why| (RefusalKind::Malformed, why))
                };
                if let Some((kind, reason)) = refusal {
                    return Err(self.reject(Some(peer), kind, reason).await);
                }
                tracing::debug!(
                    edge = peer.short(),
                    url = report.url,
                    load = report.load,
                    "edge report"
                );
                Ok(RelayToClient::Federation(self.federation.reported(
                    peer,
                    &report,
                    crate::runs::unix_ms(),
                )))
            }
        }
    }

    /// Closes the round if it is due: aggregates and evaluates in `spawn_blocking` (without
    /// the state lock), then stores θ_{t+1}, checkpoints it and announces it.
    pub async fn tick(self: &Arc<Self>) {
        // An edge closes no round: it follows the root's (`adopt`).
        if self.edge.is_some() {
            return;
        }
        let job = {
            let mut state = self.state.lock().await;
            if state.unannounced {
                let now = self.now_ms();
                if now >= state.retry_at_ms {
                    self.announce_when_durable(&mut state, now).await;
                }
                return;
            }
            // An accepted update still being written holds the round open (for as long as
            // one ledger write takes); the writer wakes the timer when it is done.
            if state.recording > 0 {
                return;
            }
            match state.round.begin_close(self.now_ms()) {
                Some(job) => {
                    let mut claims = std::mem::take(&mut state.claims);
                    // Drawn for a replay with the OS's randomness now that the round is closed;
                    // a drawn update is judged by its replay, not the loss check.
                    let audits = self.draw_audits(&state, &mut claims, job.round, &job.params);
                    // Only what a check will read is copied: the updates of at most
                    // MAX_CHECKED_PER_ROUND peers, drawn with the OS's randomness after the
                    // round closed (the others stay unchecked).
                    let checked = self.checks.windows > 0 && self.spec.model.lm_config().is_some();
                    let mut peers: Vec<PeerKey> = claims.keys().copied().collect();
                    let drawn = swarmtrain_shared::data::SplitMix64::new(rand::random())
                        .choose(&mut peers, MAX_CHECKED_PER_ROUND);
                    claims.retain(|peer, _| drawn.contains(peer));
                    let check = CheckJob {
                        round: job.round,
                        theta: if checked {
                            job.params.clone()
                        } else {
                            Vec::new()
                        },
                        contributions: if checked {
                            claims
                                .keys()
                                .filter_map(|peer| state.round.contribution(peer).cloned())
                                .collect()
                        } else {
                            Vec::new()
                        },
                        claims,
                    };
                    (job, check, audits)
                }
                None => return,
            }
        };
        let (job, check, audits) = job;
        let this = self.clone();
        let worked = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let outcome = futures::executor::block_on(this.aggregation.outer_step(&job.inputs()));
            let aggregation_ms = started.elapsed().as_secs_f64() * 1e3;
            let theta = outcome.as_ref().map_or(&job.params, |s| &s.params);
            let eval = evaluate(&this.spec, &this.data, theta).unwrap_or_else(|e| {
                tracing::error!(error = %e, "evaluation failed");
                Evaluation::default()
            });
            (outcome, eval, aggregation_ms)
        })
        .await;
        let (outcome, eval, aggregation_ms) = match worked {
            Ok(done) => done,
            Err(e) => (
                Err(AggregateError::Rule(format!(
                    "the aggregation task failed: {e}"
                ))),
                Evaluation::default(),
                0.0,
            ),
        };
        let now = self.now_ms();
        let mut state = self.state.lock().await;
        let closed = state.round.finish_close(outcome, now);
        if let Some(why) = &closed.failed {
            tracing::error!(error = %why, backend = %self.aggregation, round = closed.round, "aggregation failed; θ is kept");
        }
        state.eval = eval;
        state
            .history
            .push_back(record(&closed, eval, now, aggregation_ms));
        while state.history.len() > STATUS_HISTORY {
            state.history.pop_front();
            if self.store.is_none() {
                state.history_from = state.history.front().map_or(0, |r| r.round);
            }
        }
        store_params(&mut state);
        // The previous round's audits end with this round: an update whose state was not
        // revealed by now fails. The new ones are named in the next announcement.
        let unrevealed = std::mem::replace(&mut state.audits, audits);
        tracing::info!(
            run = self.spec.run_id,
            round = closed.round,
            contributors = closed.contributors.len(),
            backend = %self.aggregation,
            aggregation_ms,
            accuracy = eval.accuracy.unwrap_or(f32::NAN),
            val_loss = eval.loss.unwrap_or(f32::NAN),
            "round closed; round {} opens",
            closed.next_round
        );
        state.unannounced = true;
        self.announce_when_durable(&mut state, now).await;
        drop(state);
        if closed.failed.is_none() && !check.contributions.is_empty() {
            let this = self.clone();
            tokio::spawn(async move { this.check(check).await });
        }
        if !unrevealed.is_empty() {
            let failed = unrevealed
                .into_values()
                .map(|audit| {
                    let reason = format!(
                        "its state was not revealed before round {} closed",
                        audit.round + 1
                    );
                    (audit, None, Outcome::Failed { reason }, "no_reveal")
                })
                .collect();
            self.conclude_replays(failed).await;
        }
    }

    /// Writes the open round's checkpoint and run record, and only once they are durable
    /// announces the round (signed, gossiped, and to the parked long polls). A failed write is
    /// counted and retried by later ticks, at most once a second; until then peers keep hearing
    /// the last announced round.
    async fn announce_when_durable(&self, state: &mut State, now: u64) {
        if let Some(store) = &self.store
            && let Err(e) = persist(
                store,
                &self.layout,
                state,
                &RunSpecView::new(&self.spec, &self.data, self.seed),
            )
            .await
        {
            state.checkpoint_failures += 1;
            state.retry_at_ms = now + 1_000;
            tracing::error!(
                error = %e,
                round = state.round.round,
                failures = state.checkpoint_failures,
                "could not checkpoint the round; it is not announced until it is"
            );
            return;
        }
        state.unannounced = false;
        self.fill_in_shared_ledger(state.round.round);
        match self
            .identity
            .sign(&state.round.announcement(state.eval, state.audited(), now))
        {
            Ok(announcement) => self.publish(state, announcement),
            Err(e) => tracing::error!(error = %e, "could not sign the announcement"),
        }
    }

    /// `peer`'s credit in this run, if it ever had an update accepted.
    /// With a shared ledger, the federation's credit, read from it.
    pub async fn credit(&self, peer: &PeerKey) -> anyhow::Result<Option<Credit>> {
        if let Some(ledger) = &self.ledger {
            return ledger.credit(&self.spec.run_id, peer).await;
        }
        Ok(self.state.lock().await.credits.get(peer).cloned())
    }

    /// The `limit` peers with the most earned samples (verified and unchecked; then the most
    /// verified; then by key), and how many peers have any credit. With a shared ledger, the
    /// federation's, read from it.
    pub async fn leaderboard(
        &self,
        limit: usize,
    ) -> anyhow::Result<(Vec<(PeerKey, Credit)>, usize)> {
        if let Some(ledger) = &self.ledger {
            return ledger.leaderboard(&self.spec.run_id, limit).await;
        }
        let state = self.state.lock().await;
        let mut all: Vec<_> = state.credits.iter().map(|(p, c)| (*p, c.clone())).collect();
        all.sort_by(|(pa, a), (pb, b)| {
            (b.earned_samples(), b.verified_samples, pa).cmp(&(
                a.earned_samples(),
                a.verified_samples,
                pb,
            ))
        });
        let peers = all.len();
        all.truncate(limit);
        Ok((all, peers))
    }

    /// `peer`'s verdicts of the newest [`VERDICT_ROUNDS`] rounds, newest first, signed by the
    /// relay: from the ledger when the relay has a data directory, else from memory.
    pub async fn verdicts(&self, peer: &PeerKey) -> anyhow::Result<Vec<Signed<Verdict>>> {
        let open = self.state.lock().await.round.round;
        let rounds = open.saturating_sub(VERDICT_ROUNDS)..open;
        if let Some(ledger) = &self.ledger {
            return ledger
                .verdicts(&self.spec.run_id, peer, rounds)
                .await?
                .iter()
                .map(|bytes| {
                    postcard::from_bytes(bytes)
                        .map_err(|e| anyhow::anyhow!("a shared ledger verdict is corrupt: {e}"))
                })
                .collect();
        }
        if let Some(store) = &self.store {
            let (store, run, peer) = (store.clone(), self.spec.run_id.clone(), *peer);
            return tokio::task::spawn_blocking(move || store.verdicts(&run, &peer, rounds))
                .await?;
        }
        let state = self.state.lock().await;
        Ok(rounds
            .rev()
            .filter_map(|round| state.verdicts.get(&(round, *peer)).cloned())
            .collect())
    }

    /// Up to `limit` rows of the round history from round `from` on (at most
    /// [`STATUS_HISTORY`] at once), oldest first: from the store when the relay has one, else
    /// from the newest rows kept in memory.
    pub async fn history(&self, from: u64, limit: usize) -> anyhow::Result<Vec<RoundRecord>> {
        let limit = limit.min(STATUS_HISTORY);
        if let Some(store) = self.store.as_ref().filter(|_| self.edge.is_none()) {
            let (store, run) = (store.clone(), self.spec.run_id.clone());
            return tokio::task::spawn_blocking(move || store.history(&run, from, limit)).await?;
        }
        let state = self.state.lock().await;
        Ok(state
            .history
            .iter()
            .filter(|r| r.round >= from)
            .take(limit)
            .cloned()
            .collect())
    }
}

/// Held-out accuracy (digits) or loss (text) of `params`. Blocking: call it off the async
/// runtime's workers.
fn evaluate(spec: &RunSpec, data: &TaskData, params: &[f32]) -> anyhow::Result<Evaluation> {
    let device = burn::backend::ndarray::NdArrayDevice::Cpu;
    Ok(match (data, spec.model.config()) {
        (TaskData::Digits(digits), ModelConfig::Digits(config)) => Evaluation {
            accuracy: Some(futures::executor::block_on(train::evaluate::<NdArray>(
                &device,
                &config,
                params,
                &digits.held_out,
            ))?),
            loss: None,
        },
        (TaskData::Text(text), ModelConfig::Lm(config)) => Evaluation {
            accuracy: None,
            loss: Some(futures::executor::block_on(evaluate_lm::<NdArray>(
                &device,
                &config,
                params,
                &text.validation,
                text.eval_count,
                32,
            ))?),
        },
        _ => anyhow::bail!("the run's data does not fit its model"),
    })
}

fn record(closed: &RoundClosed, eval: Evaluation, now: u64, aggregation_ms: f64) -> RoundRecord {
    let n = closed.contributors.len();
    RoundRecord {
        round: closed.next_round,
        accuracy: eval.accuracy,
        val_loss: eval.loss,
        contributors: n,
        samples: closed
            .contributors
            .iter()
            .map(|(_, s, _)| u64::from(*s))
            .sum(),
        mean_loss: (n > 0)
            .then(|| closed.contributors.iter().map(|(_, _, l)| l).sum::<f32>() / n as f32),
        closed_at_ms: now,
        aggregation_ms,
    }
}

/// Compares `round` in the shared ledger with the data directory by counts (one query, one
/// read transaction) and only where the database holds fewer rows of a kind reads that kind's
/// rows and queues them ([`crate::ledger::SharedLedger::fill_in`]).
async fn fill_in_round(
    ledger: &crate::ledger::SharedLedger,
    store: &Arc<Store>,
    spec: &RunSpec,
    round: u64,
) -> anyhow::Result<usize> {
    let (have_entries, have_verdicts) = ledger.counts(&spec.run_id, round).await?;
    let (store, run) = (store.clone(), spec.run_id.clone());
    let (entries, verdicts) = tokio::task::spawn_blocking(move || {
        let (own_entries, own_verdicts) = store.round_counts(&run, round)?;
        let entries = if own_entries as u64 > have_entries {
            store.updates(&run, round)?
        } else {
            Vec::new()
        };
        let verdicts = if own_verdicts as u64 > have_verdicts {
            store.round_verdicts(&run, round)?
        } else {
            Vec::new()
        };
        anyhow::Ok((entries, verdicts))
    })
    .await??;
    ledger.fill_in(spec, round, entries, verdicts)
}

/// Writes the open round's checkpoint, described by `spec` (the run spec and seed), then points
/// the run record at it (a database commit, on a blocking thread).
async fn persist(
    store: &Arc<Store>,
    layout: &[TensorInfo],
    state: &State,
    spec: &RunSpecView,
) -> anyhow::Result<()> {
    let round = &state.round;
    let describe = crate::ops::checkpoint_metadata(
        &round.spec.run_id,
        round.round,
        &round.params_hash().to_hex(),
        &serde_json::to_string(spec)?,
    )?;
    let key = store
        .write_checkpoint(
            &round.spec.run_id,
            round.round,
            layout,
            round.params(),
            &round.outer().velocity,
            &describe,
        )
        .await?;
    let record = RunRecord {
        round: round.round,
        checkpoint: key,
        accuracy: state.eval.accuracy,
        loss: state.eval.loss,
        accepted: state.accepted,
        rejected: state.rejected.clone(),
    };
    let row = state
        .history
        .back()
        .ok_or_else(|| anyhow::anyhow!("no history row for the round"))?
        .clone();
    let (writer, run_id) = (store.clone(), round.spec.run_id.clone());
    tokio::task::spawn_blocking(move || writer.commit_round(&run_id, &record, &row)).await??;
    // Only once the record points at the new checkpoint may older ones go.
    store.prune(&round.spec.run_id, round.round).await?;
    Ok(())
}

impl State {
    /// The peers the open round's announcement names for a replay.
    fn audited(&self) -> Vec<PeerKey> {
        self.audits.keys().copied().collect()
    }

    /// Whether one more identity may join: under the cap, or under it once the identities
    /// silent for [`FORGET_IDLE_MS`] are forgotten (looked for at most every
    /// [`FORGET_EVERY_MS`]).
    fn make_room(&mut self, now_ms: u64) -> bool {
        if self.joined.len() < self.max_joined {
            return true;
        }
        if self
            .forgot_at_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < FORGET_EVERY_MS)
        {
            return false;
        }
        self.forgot_at_ms = Some(now_ms);
        let idle: Vec<PeerKey> = self
            .joined
            .iter()
            .filter(|(peer, (role, _))| {
                let seen = match role {
                    Role::Train => self.round.last_seen(peer),
                    Role::Verify => self.verifiers.seen.get(peer).copied(),
                    // An edge relay is not forgotten while the root runs.
                    Role::Edge => Some(now_ms),
                };
                seen.is_none_or(|at| now_ms.saturating_sub(at) > self.forget_idle_ms)
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in &idle {
            self.joined.remove(peer);
            self.slots.remove(peer);
            self.round.forget(peer);
            self.verifiers.seen.remove(peer);
        }
        tracing::info!(
            forgotten = idle.len(),
            joined = self.joined.len(),
            "a full run forgot its idle identities"
        );
        self.joined.len() < self.max_joined
    }
}

fn store_params(state: &mut State) {
    let hash = state.round.params_hash();
    if state.params.contains_key(&hash) {
        return;
    }
    state.params.insert(
        hash,
        bytes::Bytes::from(protocol::params_to_bytes(state.round.params())),
    );
    state.params_order.push_back(hash);
    while state.params_order.len() > KEEP_PARAMS {
        if let Some(old) = state.params_order.pop_front() {
            state.params.remove(&old);
        }
    }
}

/// What a handler answers a request with: a message, or a refusal it has counted and logged.
/// Encoded once, where it leaves the relay ([`encode_answer`]).
pub type Answer = Result<RelayToClient, Refusal>;

/// The frame that carries `answer` (a refusal as `Rejected`).
pub fn encode_answer(answer: Answer) -> Vec<u8> {
    encode(&answer.unwrap_or_else(RelayToClient::from))
}

pub(crate) fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Responses are built by the relay and stay below the frame limit (a test checks the largest,
    // the welcome); should one not, the peer gets an empty frame, which it reports as malformed.
    protocol::encode(message).unwrap_or_else(|e| {
        tracing::error!(error = %e, "a response does not fit a frame");
        Vec::new()
    })
}

/// One run's coordinator, driven as the node drives it (`Runs::handle` with signed envelopes,
/// `tick` as the round timer), without a network.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use libp2p::PeerId;
    use swarmtrain_shared::protocol::{
        self, Capabilities, ClientToRelay, Envelope, Join, PROTOCOL_VERSION, PayloadRef,
        RelayToClient, Submission, Update, params_to_bytes,
    };
    use swarmtrain_shared::{Identity, Signed};

    use crate::digits_run;

    struct Peer {
        identity: Identity,
        id: PeerId,
        seq: u64,
    }

    impl Peer {
        fn new(seed: u8) -> Self {
            Self {
                identity: Identity::from_seed([seed; 32]),
                id: PeerId::random(),
                seq: 1,
            }
        }

        fn conn(&self) -> crate::runs::Conn {
            crate::runs::Conn {
                peer: self.id,
                id: libp2p::swarm::ConnectionId::new_unchecked(0),
            }
        }

        fn submission(&mut self, message: ClientToRelay, payload: Vec<u8>) -> Submission {
            self.seq += 1;
            let envelope = Envelope {
                peer_id: self.id.to_bytes(),
                seq: self.seq,
                expires_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_millis() as u64
                    + 60_000,
                message,
            };
            let signed: Signed<Envelope> = self.identity.sign(&envelope).expect("sign");
            Submission { signed, payload }
        }
    }

    /// `answer` as the peer reads it, through the wire.
    fn answer(answer: super::Answer) -> RelayToClient {
        protocol::decode(&super::encode_answer(answer)).expect("an answer the wire decodes")
    }

    /// An update of the digits run for `round`, trained from `announced`'s θ, whose encoded Δ
    /// is `payload`.
    fn digits_update(
        round: u64,
        announced: &protocol::RoundAnnouncement,
        payload: &[u8],
    ) -> ClientToRelay {
        ClientToRelay::Update(Update {
            run_id: "digits".into(),
            round,
            base: announced.params,
            n_samples: 32,
            inner_steps: 1,
            loss: 1.0,
            codec: protocol::Codec::F32,
            payload: PayloadRef::of(payload),
            state: PayloadRef::of(&[]),
        })
    }

    fn join() -> ClientToRelay {
        ClientToRelay::Join(Join {
            version: PROTOCOL_VERSION,
            run_id: "digits".into(),
            capabilities: Capabilities {
                backend: "test".into(),
                platform: "test".into(),
            },
            role: swarmtrain_shared::protocol::Role::Train,
            proof_of_work: None,
        })
    }

    /// A run holds a bounded number of joined identities: when full, it forgets the idle ones
    /// (who are then `not_joined` and join again), and refuses a newcomer (`relay_busy`) only
    /// when none is idle, looking again no more than every 10 s.
    #[tokio::test]
    async fn a_full_run_forgets_idle_identities_and_refuses_only_when_none_is() {
        let (runs, _announce) = crate::testing::runs(Some(digits_run())).await;
        let run = runs.default_run().clone();
        run.limit_joined(2, 0).await;
        let wait = Duration::from_secs(1);
        let mut peers: Vec<Peer> = (1..=5).map(Peer::new).collect();
        let kind = |frame: super::Answer| match answer(frame) {
            RelayToClient::Welcome(_) | RelayToClient::Round(_) => None,
            RelayToClient::Rejected { kind, .. } => Some(kind),
            other => panic!("{other:?}"),
        };
        for peer in &mut peers[..2] {
            let join = peer.submission(join(), Vec::new());
            assert_eq!(kind(runs.handle(join, peer.conn(), wait).await), None);
        }
        // Full: the first two, silent now for a few ms (the test's idle time is 0), go.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let join3 = peers[2].submission(join(), Vec::new());
        assert_eq!(kind(runs.handle(join3, peers[2].conn(), wait).await), None);
        assert_eq!(run.status().await.joined_peers, 1);
        let join4 = peers[3].submission(join(), Vec::new());
        assert_eq!(kind(runs.handle(join4, peers[3].conn(), wait).await), None);
        // Full again, and it looked a moment ago: refused, with a reason.
        let join5 = peers[4].submission(join(), Vec::new());
        assert_eq!(
            kind(runs.handle(join5, peers[4].conn(), wait).await).as_deref(),
            Some("relay_busy")
        );
        // A forgotten identity is told so, and may join again later.
        let poll = peers[0].submission(
            ClientToRelay::AwaitRound {
                run_id: "digits".into(),
                after: Some(u64::MAX / 2),
            },
            Vec::new(),
        );
        assert_eq!(
            kind(runs.handle(poll, peers[0].conn(), wait).await).as_deref(),
            Some("not_joined")
        );
    }

    #[tokio::test]
    async fn a_quorum_of_updates_closes_the_round_and_announces_the_next() {
        let mut spec = digits_run();
        spec.quorum = 2;
        let (runs, announce) = crate::testing::runs(Some(spec)).await;
        let mut announced = announce.subscribe();
        let run = runs.default_run().clone();
        let wait = Duration::from_secs(1);
        let mut peers = [Peer::new(1), Peer::new(2)];
        let mut round0 = None;
        for peer in &mut peers {
            let join = peer.submission(join(), Vec::new());
            match answer(runs.handle(join, peer.conn(), wait).await) {
                RelayToClient::Welcome(welcome) => round0 = Some(welcome.round),
                other => panic!("expected a welcome, got {other:?}"),
            }
        }
        let round0 = round0
            .expect("welcomed")
            .verify_from(&run.identity().peer())
            .expect("signed by the relay");
        assert_eq!(round0.round, 0);

        // A late or wrong update is refused with its reason and counts nowhere.
        let payload = params_to_bytes(&vec![0.01; round0.n_params as usize]);
        let update = |round| digits_update(round, &round0, &payload);
        let wrong = peers[0].submission(update(7), payload.clone());
        match answer(runs.handle(wrong, peers[0].conn(), wait).await) {
            RelayToClient::Rejected { kind, .. } => assert_eq!(kind, "wrong_round"),
            other => panic!("{other:?}"),
        }
        for peer in &mut peers {
            let submission = peer.submission(update(0), payload.clone());
            match answer(runs.handle(submission, peer.conn(), wait).await) {
                RelayToClient::Accepted { round: 0 } => {}
                other => panic!("expected Accepted, got {other:?}"),
            }
        }
        assert_eq!(run.status().await.updates_this_round, 2);
        // The round timer closes the round: θ moves, round 1 is announced, signed.
        run.tick().await;
        let (run_id, frame) = announced.try_recv().expect("round 1 announced");
        assert_eq!(run_id, "digits");
        let round1 =
            protocol::verify_gossiped(&frame, run.identity().public_key()).expect("signed");
        assert_eq!(round1.round, 1);
        assert_ne!(round1.params, round0.params);
        let status = run.status().await;
        assert_eq!((status.round, status.accepted_updates), (1, 2));
        assert_eq!(status.rejected.get("wrong_round"), Some(&1));
    }

    /// An update whose ledger write fails (a full disk) is refused with `store_failed` and
    /// counts nowhere, not even toward closing the round; sent again once the disk takes
    /// writes, it is accepted. A round whose record cannot be written is not announced until
    /// the disk takes writes again, without a restart.
    #[tokio::test]
    async fn what_a_full_disk_refuses_is_refused_and_the_run_goes_on_once_it_takes_writes() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};

        let dir = tempfile::tempdir().expect("tempdir");
        let full = Arc::new(AtomicBool::new(false));
        let store = crate::store::Store::open_with_database(
            crate::store::tests::FailingDisk::database(dir.path().join("state.redb"), full.clone()),
            Arc::new(object_store::memory::InMemory::new()),
        )
        .expect("the store opens");
        let mut spec = digits_run();
        spec.quorum = 1;
        let (runs, announce) =
            crate::testing::runs_with_store(Some(spec), Some(Arc::new(store))).await;
        let mut announced = announce.subscribe();
        let run = runs.default_run().clone();
        let wait = Duration::from_secs(1);
        let mut peer = Peer::new(1);
        let join = peer.submission(join(), Vec::new());
        let round0 = match answer(runs.handle(join, peer.conn(), wait).await) {
            RelayToClient::Welcome(welcome) => welcome
                .round
                .verify_from(&run.identity().peer())
                .expect("signed by the relay"),
            other => panic!("expected a welcome, got {other:?}"),
        };
        let payload = params_to_bytes(&vec![0.01; round0.n_params as usize]);
        let update = digits_update(0, &round0, &payload);

        full.store(true, Ordering::SeqCst);
        let refused = peer.submission(update.clone(), payload.clone());
        match answer(runs.handle(refused, peer.conn(), wait).await) {
            RelayToClient::Rejected { kind, .. } => assert_eq!(kind, "store_failed"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        let status = run.status().await;
        assert_eq!((status.updates_this_round, status.accepted_updates), (0, 0));
        assert_eq!(status.rejected.get("store_failed"), Some(&1));
        run.tick().await;
        assert_eq!(run.status().await.round, 0, "the round waits for a quorum");

        full.store(false, Ordering::SeqCst);
        let again = peer.submission(update, payload);
        match answer(runs.handle(again, peer.conn(), wait).await) {
            RelayToClient::Accepted { round: 0 } => {}
            other => panic!("expected Accepted, got {other:?}"),
        }
        let credit = run
            .credit(&peer.identity.peer())
            .await
            .expect("read")
            .expect("a credit");
        assert_eq!(credit.accepted_updates, 1, "counted once");

        // The disk fails again as the round closes: round 1 cannot be recorded, so it is not
        // announced; once the disk takes writes, a later tick records and announces it.
        full.store(true, Ordering::SeqCst);
        run.tick().await;
        let status = run.status().await;
        assert_eq!(status.checkpoint_failures, 1);
        assert!(announced.try_recv().is_err(), "nothing announced yet");
        full.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        run.tick().await;
        let (_, frame) = announced
            .try_recv()
            .expect("round 1 announced once durable");
        let round1 =
            protocol::verify_gossiped(&frame, run.identity().public_key()).expect("signed");
        assert_eq!(round1.round, 1);
        let status = run.status().await;
        assert_eq!((status.round, status.accepted_updates), (1, 1));
        assert_eq!(status.checkpoint_failures, 1);
    }
}
