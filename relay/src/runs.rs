//! The runs a relay coordinates, each with its own spec, round state, data and checkpoints.
//! Messages name their run; this checks each signed envelope (signature, connection, expiry,
//! replay, one identity per connection) and routes its message to the run's coordinator. It
//! also keeps each connection's agreed session keys ([`swarmtrain_shared::seal`]): it opens the
//! sealed payloads of updates, reveals and verifiers' reports, and seals the chunks it serves
//! (θ, and revealed states, which go only to the verifier holding their job). On a
//! federation's root it also takes the messages edge relays forward for their peers
//! ([`Runs::forwarded`]), checking each peer's own signature. Every handler
//! answers with an [`Answer`]: a message, or a [`swarmtrain_shared::protocol::Refusal`] its run
//! has counted and logged; `p2p` encodes it once, on its way out, and strikes the connection
//! for the refusals only misconduct earns.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::swarm::ConnectionId;
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::admission::{ExpiringMap, ReplayGuard};
use swarmtrain_shared::crypto::{CryptoError, Signed};
use swarmtrain_shared::protocol::{
    self, ClientToRelay, Envelope, Fetch, Refusal, RefusalKind, RelayToClient, Submission,
};
use swarmtrain_shared::replay::CommittedState;
use swarmtrain_shared::seal::{self, SessionKeys};

use crate::coordinator::{Answer, Coordinator, Origin, RunMessage};

/// At most this many identities with unexpired envelopes are tracked (about 100 bytes each);
/// beyond it new identities are refused with `relay_busy` until old envelopes expire.
pub const MAX_ACTIVE_IDENTITIES: usize = 100_000;

/// At most this many verified messages are remembered by digest, so that an exact replay is
/// refused for the cost of a hash instead of a signature check (about 50 bytes each).
pub const MAX_REMEMBERED: usize = 200_000;

/// One identity may sign on at most this many libp2p peer IDs at once (a browser derives its
/// peer ID from its identity, so honest peers use one); more are refused as `identity_busy`.
pub const MAX_PEER_IDS_PER_IDENTITY: usize = 4;

/// At most this many banned identities are remembered (then the oldest ban is forgotten).
pub const MAX_BANNED_IDENTITIES: usize = 100_000;

/// One libp2p connection: the peer ID it authenticated and the swarm's id for it. Session keys
/// belong to a connection; quotas, strikes and bans to the identity bound to its peer ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conn {
    pub peer: PeerId,
    pub id: ConnectionId,
}

/// Strikes after which the relay closes a connection and refuses its peer ID for
/// [`BAN_SECS`].
pub const MAX_STRIKES: u32 = 32;
/// How long a peer ID closed for its strikes is refused.
pub const BAN_SECS: u64 = 600;

/// Every run's coordinator, by run id, and the default run.
#[derive(Debug)]
pub struct Runs {
    by_id: BTreeMap<String, Arc<Coordinator>>,
    default: Arc<Coordinator>,
    guard: Mutex<Guard>,
    /// Connections closed for their strikes (for `/metrics`).
    closed_for_strikes: std::sync::atomic::AtomicU64,
    /// Bytes of θ served in chunks over libp2p (for `/metrics`).
    params_bytes_served: std::sync::atomic::AtomicU64,
    /// Checks the signatures of connections that have not joined a run, on their own thread.
    unjoined: UnjoinedChecks,
    /// θ chunks and the payloads of updates, reveals and verifiers' reports only on sealed
    /// connections (`not_sealed` otherwise; revealed states are served sealed regardless).
    require_sealed: bool,
}

/// Why a relay that requires sealing refuses an update or a fetch on a connection without
/// session keys.
const NOT_SEALED: &str =
    "this relay sends θ and takes updates only on sealed connections: agree keys first (KeyOffer)";

/// Messages from connections that have not joined a run that may wait for their signature
/// check; more are refused as `relay_busy`.
pub const UNJOINED_QUEUE: usize = 256;

type Verified = Result<(PeerKey, Envelope), CryptoError>;

/// One thread, at the lowest CPU priority the OS gives (nice 19 on Linux), checks the
/// signatures of messages from connections that have not joined a run, one at a time and in
/// arrival order, with at most [`UNJOINED_QUEUE`] waiting. A flood from unadmitted connections
/// therefore keeps at most one core busy, and only with cycles that the relay's work for its
/// joined peers (checked at once on the runtime's workers) and the rest of the machine leave
/// idle: honest peers come first. This is the usual way servers keep unauthenticated work from
/// starving authenticated work (a separate, bounded, low-priority queue).
#[derive(Debug)]
struct UnjoinedChecks {
    queue: std::sync::mpsc::SyncSender<(Signed<Envelope>, tokio::sync::oneshot::Sender<Verified>)>,
}

impl UnjoinedChecks {
    fn start() -> std::io::Result<Self> {
        let (queue, jobs) = std::sync::mpsc::sync_channel::<(
            Signed<Envelope>,
            tokio::sync::oneshot::Sender<Verified>,
        )>(UNJOINED_QUEUE);
        std::thread::Builder::new()
            .name("unjoined-checks".into())
            .spawn(move || {
                lowest_priority();
                // Ends when the relay's `Runs` (the only sender) is dropped.
                for (signed, answer) in jobs {
                    let _ = answer.send(signed.verify_and_decode());
                }
            })?;
        Ok(Self { queue })
    }

    /// Checks `signed` on the thread; `None` when [`UNJOINED_QUEUE`] messages already wait.
    async fn check(&self, signed: Signed<Envelope>) -> Option<Verified> {
        let (answer, verified) = tokio::sync::oneshot::channel();
        self.queue.try_send((signed, answer)).ok()?;
        verified.await.ok()
    }
}

/// Lowers the calling thread's CPU priority to nice 19 (on Linux a nice value is per thread);
/// elsewhere the thread keeps the process's priority.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::warn!(error = %e, "could not lower the unjoined-checks thread's priority");
    }
}

/// What the relay remembers about recent signers.
#[derive(Debug)]
struct Guard {
    /// Replay windows per identity and connection: two tabs sharing a seed each number their
    /// messages from their own start (exact copies across connections are caught by digest).
    replays: ReplayGuard<(PeerKey, ConnectionId)>,
    /// The identity each peer ID has signed as (one each), for as long as a connection of it
    /// is open.
    bound: HashMap<PeerId, PeerKey>,
    /// The peer IDs bound to each identity (at most [`MAX_PEER_IDS_PER_IDENTITY`]).
    peer_ids: HashMap<PeerKey, HashSet<PeerId>>,
    /// The runs each bound identity has joined (passed their admission): only such identities
    /// may send parts and offer keys, and only their messages to those runs skip the queue of
    /// unjoined signature checks.
    joined: HashMap<PeerKey, BTreeSet<String>>,
    /// Each connection's session keys: one pending exchange and the agreed keys, at most.
    keys: HashMap<ConnectionId, ConnectionKeys>,
    /// Digests ([`seal::digest_signed`]) of messages whose signature checked out, until they
    /// expire: a second copy is refused as `replayed` without checking it again.
    verified: ExpiringMap<[u8; 32], ()>,
    /// Identities banned for their strikes, until the ban ends.
    banned: ExpiringMap<PeerKey, ()>,
}

impl Guard {
    /// Remembers a verified message until `expires_ms`, in amortized O(1): expired digests
    /// are swept from the front of an insertion-order queue, and when [`MAX_REMEMBERED`] are
    /// kept the oldest goes (its replay is then refused by the replay window, after a
    /// signature check).
    fn remember(&mut self, digest: [u8; 32], expires_ms: u64, now_ms: u64) {
        self.verified.sweep(now_ms, 4);
        if self.verified.len() >= MAX_REMEMBERED {
            self.verified.evict_oldest();
        }
        self.verified.insert(digest, (), expires_ms);
    }
}

#[derive(Debug, Default)]
struct ConnectionKeys {
    /// Derived on `KeyOffer`, in use once the peer signs their transcript (`KeyConfirm`).
    pending: Option<SessionKeys>,
    agreed: Option<Arc<SessionKeys>>,
}

pub use swarmtrain_net::unix_ms;

/// A peer's message by who answers it: [`Runs`] the key exchanges of its connection, a run
/// the rest.
enum Addressed {
    KeyOffer(seal::KeyOffer),
    KeyConfirm([u8; 32]),
    /// An edge relay's peer's message, for run `.0` ([`Runs::forwarded`]).
    Forward(String),
    Run(RunMessage),
}

impl From<ClientToRelay> for Addressed {
    fn from(message: ClientToRelay) -> Self {
        Self::Run(match message {
            ClientToRelay::KeyOffer(offer) => return Self::KeyOffer(offer),
            ClientToRelay::KeyConfirm { transcript } => return Self::KeyConfirm(transcript),
            ClientToRelay::Forward { run_id } => return Self::Forward(run_id),
            ClientToRelay::Join(join) => RunMessage::Join(join),
            ClientToRelay::AwaitRound { run_id, after } => RunMessage::AwaitRound { run_id, after },
            ClientToRelay::Update(update) => RunMessage::Update(update),
            ClientToRelay::Reveal(reveal) => RunMessage::Reveal(reveal),
            ClientToRelay::Verify { run_id } => RunMessage::Verify { run_id },
            ClientToRelay::Replayed(replayed) => RunMessage::Replayed(replayed),
            ClientToRelay::Report(report) => RunMessage::Report(report),
        })
    }
}

/// The run an unverified message names ("" for a key exchange, which names none).
fn run_of(message: &ClientToRelay) -> &str {
    match message {
        ClientToRelay::Join(join) => &join.run_id,
        ClientToRelay::AwaitRound { run_id, .. } | ClientToRelay::Verify { run_id } => run_id,
        ClientToRelay::Update(update) => &update.run_id,
        ClientToRelay::Reveal(reveal) => &reveal.run_id,
        ClientToRelay::Replayed(replayed) => &replayed.run_id,
        ClientToRelay::Forward { run_id } => run_id,
        ClientToRelay::Report(report) => &report.run_id,
        ClientToRelay::KeyOffer(_) | ClientToRelay::KeyConfirm { .. } => "",
    }
}

impl Runs {
    /// `coordinators` must be non-empty with distinct run ids; the first is the default run.
    /// Fails only if the thread that checks unjoined connections' signatures can't start.
    /// With `require_sealed`, θ chunks and update payloads travel only on connections that
    /// agreed session keys.
    pub fn new(coordinators: Vec<Arc<Coordinator>>, require_sealed: bool) -> std::io::Result<Self> {
        let default = coordinators[0].clone();
        let by_id = coordinators
            .into_iter()
            .map(|c| (c.spec().run_id.clone(), c))
            .collect();
        Ok(Self {
            by_id,
            default,
            guard: Mutex::new(Guard {
                replays: ReplayGuard::new(MAX_ACTIVE_IDENTITIES),
                bound: HashMap::new(),
                peer_ids: HashMap::new(),
                joined: HashMap::new(),
                keys: HashMap::new(),
                verified: ExpiringMap::default(),
                banned: ExpiringMap::default(),
            }),
            closed_for_strikes: Default::default(),
            params_bytes_served: Default::default(),
            unjoined: UnjoinedChecks::start()?,
            require_sealed,
        })
    }

    /// Whether the identity bound to `peer` has joined a run (it passed the run's admission
    /// policy): only such connections may buffer a long message.
    pub fn has_joined(&self, peer: &PeerId) -> bool {
        self.guard.lock().is_ok_and(|guard| {
            guard
                .bound
                .get(peer)
                .is_some_and(|identity| guard.joined.contains_key(identity))
        })
    }

    /// The identity `peer` signs as, once it has sent a valid envelope.
    pub fn identity_of(&self, peer: &PeerId) -> Option<PeerKey> {
        self.guard
            .lock()
            .ok()
            .and_then(|guard| guard.bound.get(peer).copied())
    }

    /// The peer IDs bound to `identity` now.
    pub fn peer_ids_of(&self, identity: &PeerKey) -> Vec<PeerId> {
        self.guard.lock().map_or_else(
            |_| Vec::new(),
            |guard| {
                guard
                    .peer_ids
                    .get(identity)
                    .map(|ids| ids.iter().copied().collect())
                    .unwrap_or_default()
            },
        )
    }

    /// Refuses every message signed by `identity` for [`BAN_SECS`], on any peer ID.
    pub fn ban_identity(&self, identity: PeerKey) {
        if let Ok(mut guard) = self.guard.lock() {
            let now = unix_ms();
            guard.banned.sweep(now, 4);
            if guard.banned.len() >= MAX_BANNED_IDENTITIES {
                guard.banned.evict_oldest();
            }
            guard.banned.insert(identity, (), now + BAN_SECS * 1000);
        }
    }

    /// Forgets `peer`'s binding: its last connection closed. An identity with no peer ID left
    /// is forgotten too (it joins again when it comes back).
    pub fn unbind(&self, peer: &PeerId) {
        if let Ok(mut guard) = self.guard.lock()
            && let Some(identity) = guard.bound.remove(peer)
        {
            let empty = guard.peer_ids.get_mut(&identity).is_none_or(|ids| {
                ids.remove(peer);
                ids.is_empty()
            });
            if empty {
                guard.peer_ids.remove(&identity);
                guard.joined.remove(&identity);
            }
        }
    }

    /// Forgets a closed connection's session keys.
    pub fn connection_closed(&self, id: ConnectionId) {
        if let Ok(mut guard) = self.guard.lock() {
            guard.keys.remove(&id);
        }
    }

    /// Identities whose envelopes are tracked for replay now (for `/metrics`).
    pub fn tracked_identities(&self) -> usize {
        self.guard.lock().map_or(0, |guard| guard.replays.len())
    }

    /// Counts a connection closed for its strikes.
    pub fn note_closed_for_strikes(&self) {
        self.closed_for_strikes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Connections closed for their strikes since the relay started (for `/metrics`).
    pub fn closed_for_strikes(&self) -> u64 {
        self.closed_for_strikes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of θ served in chunks over libp2p since the relay started (for `/metrics`).
    pub fn params_bytes_served(&self) -> u64 {
        self.params_bytes_served
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Connections that have agreed session keys (for `/metrics`).
    pub fn sealed_connections(&self) -> usize {
        self.guard.lock().map_or(0, |guard| {
            guard.keys.values().filter(|k| k.agreed.is_some()).count()
        })
    }

    /// The connection's agreed session keys, if it has them.
    fn agreed(&self, conn: &Conn) -> Option<Arc<SessionKeys>> {
        self.guard
            .lock()
            .ok()
            .and_then(|guard| guard.keys.get(&conn.id).and_then(|k| k.agreed.clone()))
    }

    /// The longest message any run can use: its largest update, or the committed training
    /// state a language-model peer reveals for a replay, and the envelope around it, or the two
    /// around it when an edge relay forwards it (a signed envelope is about 5.3 KB: two fit the
    /// 16 KiB).
    pub fn max_submission_bytes(&self) -> usize {
        self.by_id
            .values()
            .map(|run| {
                let spec = run.spec();
                let n = spec.model.num_params();
                let update = spec.codec.encoded_len(n);
                match spec.model.lm_config() {
                    Some(_) => update.max(CommittedState::max_len(n)),
                    None => update,
                }
            })
            .max()
            .unwrap_or(0)
            + 16 * 1024
    }

    pub fn default_run(&self) -> &Arc<Coordinator> {
        &self.default
    }

    pub fn get(&self, run_id: &str) -> Option<&Arc<Coordinator>> {
        self.by_id.get(run_id)
    }

    pub fn ids(&self) -> Vec<String> {
        self.by_id.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Coordinator>> {
        self.by_id.values()
    }

    /// Verifies a submission that arrived on connection `from` and hands its message to its
    /// run's coordinator. An exact copy of a message verified before is refused (`replayed`)
    /// for the cost of a hash. Before any signature check, the body is read as the identity it
    /// claims: a banned identity is refused (`banned`); only a message to a run its bound
    /// identity has joined is checked at once on the runtime's workers. Anything else must be
    /// a `Join` (else `not_joined`) that passes its run's admission for the claimed key (proof
    /// of work, allow list: `not_admitted`), and then waits its turn for a signature check on
    /// the idle-priority thread (`UnjoinedChecks`; `relay_busy` when [`UNJOINED_QUEUE`] wait
    /// already). Refused after the check, each with its reason: a bad signature
    /// (`bad_signature`), an envelope made for another connection (`wrong_connection`), an
    /// expired or overlong one (`expired`), one seen before (`replayed`), a second identity on
    /// one peer ID (`identity_mismatch`) and an identity on too many peer IDs
    /// (`identity_busy`). Messages that can't be attributed to a run are counted against the
    /// default run.
    pub async fn handle(&self, submission: Submission, from: Conn, max_wait: Duration) -> Answer {
        let digest = seal::digest_signed(&submission.signed);
        let now = unix_ms();
        let claimed = PeerKey::from_public_key(&submission.signed.public_key);
        let (seen, banned, bound) = self.guard.lock().map_or((false, false, None), |guard| {
            (
                guard.verified.get(&digest, now).is_some(),
                guard.banned.get(&claimed, now).is_some(),
                guard.bound.get(&from.peer).copied(),
            )
        });
        if seen {
            let reason = "this exact message was already received".to_owned();
            return Err(self
                .default
                .reject(Some(claimed), RefusalKind::Replayed, reason)
                .await);
        }
        if banned {
            let reason = format!("{} is banned for its refused messages", claimed.short());
            return Err(self
                .default
                .reject(Some(claimed), RefusalKind::Banned, reason)
                .await);
        }
        // Unverified: only used to decide how (and whether) to check the signature.
        let Ok(unverified) = postcard::from_bytes::<Envelope>(&submission.signed.body) else {
            let reason = "the envelope does not decode".to_owned();
            return Err(self
                .default
                .reject(None, RefusalKind::Malformed, reason)
                .await);
        };
        let fast = bound == Some(claimed)
            && self.guard.lock().is_ok_and(|guard| {
                guard.joined.get(&claimed).is_some_and(|runs| {
                    let run = run_of(&unverified.message);
                    run.is_empty() || runs.contains(run)
                })
            });
        let verified = if fast {
            submission.signed.verify_and_decode()
        } else {
            let ClientToRelay::Join(join) = &unverified.message else {
                let reason = format!(
                    "send a Join first: nothing else is taken from an identity that has not \
                     joined run {:?}",
                    run_of(&unverified.message)
                );
                return Err(self
                    .default
                    .reject(Some(claimed), RefusalKind::NotJoined, reason)
                    .await);
            };
            let Some(run) = self.by_id.get(&join.run_id) else {
                let reason = format!(
                    "no run {:?} on this relay (it has {})",
                    join.run_id,
                    self.ids().join(", ")
                );
                return Err(self
                    .default
                    .reject(Some(claimed), RefusalKind::WrongRun, reason)
                    .await);
            };
            if let Err((kind, reason)) = run.precheck_join(&claimed, join) {
                return Err(self.default.reject(Some(claimed), kind, reason).await);
            }
            match self.unjoined.check(submission.signed.clone()).await {
                Some(verified) => verified,
                None => {
                    let reason = format!(
                        "{UNJOINED_QUEUE} messages from connections that have not joined a run \
                         are waiting for their signature check; try again shortly"
                    );
                    return Err(self
                        .default
                        .reject(None, RefusalKind::RelayBusy, reason)
                        .await);
                }
            }
        };
        let (peer, envelope) = match verified {
            Ok(ok) => ok,
            Err(e) => {
                return Err(self
                    .default
                    .reject(None, RefusalKind::BadSignature, e.to_string())
                    .await);
            }
        };
        if envelope.peer_id != from.peer.to_bytes() {
            let reason = format!(
                "the message was signed for connection {}, not this one ({})",
                PeerId::from_bytes(&envelope.peer_id)
                    .map_or_else(|_| "(malformed)".to_owned(), |p| p.to_string()),
                from.peer
            );
            return Err(self
                .default
                .reject(Some(peer), RefusalKind::WrongConnection, reason)
                .await);
        }
        let refused = match self.guard.lock() {
            Ok(mut guard) => match guard.bound.get(&from.peer) {
                Some(bound) if *bound != peer => Some((
                    RefusalKind::IdentityMismatch,
                    format!(
                        "this connection signs as {}; one connection carries one identity",
                        bound.short()
                    ),
                )),
                None if guard
                    .peer_ids
                    .get(&peer)
                    .is_some_and(|ids| ids.len() >= MAX_PEER_IDS_PER_IDENTITY) =>
                {
                    Some((
                        RefusalKind::IdentityBusy,
                        format!(
                            "{} is connected on {MAX_PEER_IDS_PER_IDENTITY} peer IDs already; \
                             close one first",
                            peer.short()
                        ),
                    ))
                }
                _ => {
                    let until = envelope
                        .expires_ms
                        .min(now + protocol::MAX_ENVELOPE_VALIDITY_MS);
                    guard.remember(digest, until, now);
                    match guard.replays.check(
                        (peer, from.id),
                        envelope.seq,
                        envelope.expires_ms,
                        now,
                    ) {
                        Ok(()) => {
                            guard.bound.insert(from.peer, peer);
                            guard.peer_ids.entry(peer).or_default().insert(from.peer);
                            None
                        }
                        Err(e) => Some((e.kind(), e.to_string())),
                    }
                }
            },
            Err(_) => Some((
                RefusalKind::Internal,
                "the relay's replay guard is poisoned".to_owned(),
            )),
        };
        if let Some((kind, reason)) = refused {
            return Err(self.default.reject(Some(peer), kind, reason).await);
        }
        let seq = envelope.seq;
        let mut payload = submission.payload;
        // Key exchanges belong to the connection: answered here, never by a run.
        let message = match Addressed::from(envelope.message) {
            Addressed::Run(message) => message,
            Addressed::KeyOffer(offer) => {
                return self.key_offer(from, peer, &submission.signed, &offer).await;
            }
            Addressed::KeyConfirm(transcript) => {
                return self.key_confirm(from, peer, transcript).await;
            }
            Addressed::Forward(run_id) => {
                let payload = self.opened(&from, peer, seq, payload).await?;
                return self.forwarded(from, peer, &run_id, payload, max_wait).await;
            }
        };
        if let RunMessage::Update(_) | RunMessage::Reveal(_) | RunMessage::Replayed(_) = &message {
            payload = self.opened(&from, peer, seq, payload).await?;
        }
        match self.by_id.get(message.run_id()) {
            Some(run) => {
                let joining = match &message {
                    RunMessage::Join(join) => Some(join.run_id.clone()),
                    _ => None,
                };
                let answer = run
                    .handle(peer, message, submission.signed, payload, max_wait)
                    .await;
                if let Some(run_id) = joining
                    && matches!(answer, Ok(RelayToClient::Welcome(_)))
                    && let Ok(mut guard) = self.guard.lock()
                {
                    guard.joined.entry(peer).or_default().insert(run_id);
                }
                answer
            }
            None => {
                let reason = format!(
                    "no run {:?} on this relay (it has {})",
                    message.run_id(),
                    self.ids().join(", ")
                );
                Err(self
                    .default
                    .reject(Some(peer), RefusalKind::WrongRun, reason)
                    .await)
            }
        }
    }

    /// `payload` of message `seq` from `peer` on `from`'s connection, opened with the
    /// connection's session keys (as it is when it has none and the relay does not require them).
    async fn opened(
        &self,
        from: &Conn,
        peer: PeerKey,
        seq: u64,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, Refusal> {
        match self.agreed(from) {
            Some(keys) => match keys.open(&seal::payload_context(seq), &payload) {
                Ok(opened) => Ok(opened),
                Err(e) => {
                    let reason = format!("the sealed payload: {e}");
                    Err(self
                        .default
                        .reject(Some(peer), RefusalKind::Undecryptable, reason)
                        .await)
                }
            },
            None if self.require_sealed => Err(self
                .default
                .reject(Some(peer), RefusalKind::NotSealed, NOT_SEALED.into())
                .await),
            None => Ok(payload),
        }
    }

    /// A message of one of its peers that edge relay `edge` (joined to run `run_id` as
    /// [`Role::Edge`](swarmtrain_shared::protocol::Role::Edge)) forwards from `from`'s
    /// connection: the peer's [`Submission`], encoded in `payload`. Its signature, expiry and
    /// sequence number are checked here as for a message the peer sent itself (its replay window
    /// is kept per identity and edge connection); the binding to the peer's own connection and
    /// the run's admission were the edge's to check. A `Join`, an `Update` or a `Reveal` of the
    /// run goes to the run as from [`Origin::Edge`].
    ///
    /// What the edge should have caught (a bad signature, a message it may not forward, one
    /// signed with its own key) is refused as the edge's own fault, a strike against its
    /// connection; whatever else the root says to the peer, refusals included, is answered
    /// inside [`RelayToClient::Forwarded`] for the edge to hand on, and counts no strike against
    /// the edge.
    async fn forwarded(
        &self,
        from: Conn,
        edge: PeerKey,
        run_id: &str,
        payload: Vec<u8>,
        max_wait: Duration,
    ) -> Answer {
        let Some(run) = self.by_id.get(run_id) else {
            let reason = format!("no run {run_id:?} on this relay");
            return Err(self
                .default
                .reject(Some(edge), RefusalKind::WrongRun, reason)
                .await);
        };
        if !run.is_edge(&edge).await {
            let reason = format!("join run {run_id:?} as an edge before forwarding to it");
            return Err(run.reject(Some(edge), RefusalKind::NotJoined, reason).await);
        }
        let submission = match protocol::decode_submission(&payload) {
            Ok(submission) => submission,
            Err(e) => {
                let reason = format!("the forwarded submission: {e}");
                return Err(run.reject(Some(edge), RefusalKind::Malformed, reason).await);
            }
        };
        let digest = seal::digest_signed(&submission.signed);
        let now = unix_ms();
        let (peer, envelope) = match submission.signed.verify_and_decode() {
            Ok(verified) => verified,
            Err(e) => {
                let reason = format!("a forwarded message: {e}");
                return Err(run
                    .reject(Some(edge), RefusalKind::BadSignature, reason)
                    .await);
            }
        };
        if peer == edge {
            let reason = "an edge forwards its peers' messages, not its own".to_owned();
            return Err(run.reject(Some(edge), RefusalKind::Malformed, reason).await);
        }
        let message = match Addressed::from(envelope.message) {
            Addressed::Run(
                message @ (RunMessage::Join(_) | RunMessage::Update(_) | RunMessage::Reveal(_)),
            ) if message.run_id() == run_id => message,
            _ => {
                let reason =
                    format!("an edge forwards only joins, updates and reveals of run {run_id:?}");
                return Err(run.reject(Some(edge), RefusalKind::Malformed, reason).await);
            }
        };
        let refused = match self.guard.lock() {
            Ok(mut guard) => {
                if guard.verified.get(&digest, now).is_some() {
                    Some((
                        RefusalKind::Replayed,
                        "this exact message was already received".to_owned(),
                    ))
                } else if guard.banned.get(&peer, now).is_some() {
                    Some((
                        RefusalKind::Banned,
                        format!("{} is banned for its refused messages", peer.short()),
                    ))
                } else {
                    let until = envelope
                        .expires_ms
                        .min(now + protocol::MAX_ENVELOPE_VALIDITY_MS);
                    guard.remember(digest, until, now);
                    guard
                        .replays
                        .check((peer, from.id), envelope.seq, envelope.expires_ms, now)
                        .err()
                        .map(|e| (e.kind(), e.to_string()))
                }
            }
            Err(_) => Some((
                RefusalKind::Internal,
                "the relay's replay guard is poisoned".to_owned(),
            )),
        };
        let answer = match refused {
            Some((kind, reason)) => Err(run.reject(Some(peer), kind, reason).await),
            None => {
                run.handle_from(
                    peer,
                    message,
                    submission.signed,
                    submission.payload,
                    max_wait,
                    Origin::Edge,
                )
                .await
            }
        };
        Ok(RelayToClient::Forwarded(Box::new(
            answer.unwrap_or_else(RelayToClient::from),
        )))
    }

    /// A `KeyOffer` from `from`'s connection, signed by `peer` in `signed`: encapsulates to it,
    /// signs the accept with the relay's key and keeps the keys pending until the peer confirms.
    /// Only a connection that has joined a run (passed its admission) may offer, so that the
    /// relay's ML-KEM and ML-DSA work is priced like everything else.
    async fn key_offer(
        &self,
        from: Conn,
        peer: PeerKey,
        signed: &swarmtrain_shared::Signed<protocol::Envelope>,
        offer: &seal::KeyOffer,
    ) -> Answer {
        if !self.has_joined(&from.peer) {
            let reason = "join a run before offering keys".to_owned();
            return Err(self
                .default
                .reject(Some(peer), RefusalKind::NotJoined, reason)
                .await);
        }
        let identity = self.default.identity();
        match seal::accept(identity, seal::digest_signed(signed), offer) {
            Ok((accept, keys)) => {
                if let Ok(mut guard) = self.guard.lock() {
                    guard.keys.entry(from.id).or_default().pending = Some(keys);
                }
                Ok(RelayToClient::KeyAccept(accept))
            }
            Err(e) => Err(self
                .default
                .reject(Some(peer), RefusalKind::BadKeyOffer, e.to_string())
                .await),
        }
    }

    /// A `KeyConfirm`: the peer signed `transcript`; if it is the pending exchange's, its keys
    /// seal this connection's payloads and chunks from now on.
    async fn key_confirm(&self, from: Conn, peer: PeerKey, transcript: [u8; 32]) -> Answer {
        let agreed = self.guard.lock().ok().is_some_and(|mut guard| {
            let Some(keys) = guard.keys.get_mut(&from.id) else {
                return false;
            };
            match keys.pending.take() {
                Some(pending) if pending.transcript() == transcript => {
                    keys.agreed = Some(Arc::new(pending));
                    true
                }
                other => {
                    keys.pending = other;
                    false
                }
            }
        });
        if agreed {
            tracing::debug!(peer = peer.short(), "session keys agreed");
            Ok(RelayToClient::KeysAgreed)
        } else {
            let reason = "no pending key exchange has this transcript".to_owned();
            Err(self
                .default
                .reject(Some(peer), RefusalKind::UnknownSession, reason)
                .await)
        }
    }

    /// Answers a fetch from its run: a chunk of θ, or of a revealed state for the verifier its
    /// replay was given to (the identity bound to the connection). Chunks are sealed for a
    /// connection with agreed keys (and refused, `not_sealed`, to one without when the relay
    /// requires sealing; a revealed state only ever travels sealed).
    pub async fn fetch(&self, fetch: Fetch, from: Conn) -> Answer {
        let digest = fetch.digest();
        let Some(run) = self.by_id.get(fetch.run_id()) else {
            let reason = format!("no run {:?} on this relay", fetch.run_id());
            return Err(self
                .default
                .reject(None, RefusalKind::WrongRun, reason)
                .await);
        };
        let keys = self.agreed(&from);
        if keys.is_none() && (self.require_sealed || matches!(fetch, Fetch::State { .. })) {
            return Err(self
                .default
                .reject(None, RefusalKind::NotSealed, NOT_SEALED.into())
                .await);
        }
        let params = matches!(fetch, Fetch::Params { .. });
        let identity = self.identity_of(&from.peer);
        match run.fetch(fetch, identity).await {
            Ok(RelayToClient::Chunk {
                total,
                offset,
                bytes,
            }) => {
                if params {
                    self.params_bytes_served
                        .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
                let bytes = match keys {
                    Some(keys) => keys.seal(&seal::chunk_context(&digest, offset, total), &bytes),
                    None => bytes,
                };
                Ok(RelayToClient::Chunk {
                    total,
                    offset,
                    bytes,
                })
            }
            other => other,
        }
    }

    /// Refuses a request before it reaches a run: it does not decode (`malformed`), a part of
    /// a long message is out of place (`bad_part`, or `unbound_part` on a connection that has
    /// not yet sent a valid envelope), or the connection or the relay has too many in flight
    /// (`peer_busy`, `relay_busy`). Counted against the default run.
    pub async fn refuse(&self, kind: RefusalKind, reason: String) -> Answer {
        Err(self.default.reject(None, kind, reason).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarmtrain_shared::Identity;

    #[tokio::test]
    async fn the_idle_priority_thread_checks_signatures_like_the_workers() {
        let checks = UnjoinedChecks::start().expect("the thread starts");
        let identity = Identity::from_seed([3; 32]);
        let envelope = Envelope {
            peer_id: vec![1, 2, 3],
            seq: 1,
            expires_ms: 1,
            message: ClientToRelay::AwaitRound {
                run_id: "digits".into(),
                after: None,
            },
        };
        let signed = identity.sign(&envelope).expect("sign");
        let (peer, checked) = checks
            .check(signed.clone())
            .await
            .expect("queued")
            .expect("a good signature");
        assert_eq!(peer, identity.peer());
        assert_eq!(checked.seq, 1);
        let mut forged = signed;
        forged.body[0] ^= 1;
        assert!(checks.check(forged).await.expect("queued").is_err());
    }
}
