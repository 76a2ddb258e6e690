//! The runs a relay coordinates, each with its own spec, round state, data and checkpoints.
//! Messages name their run; this checks each signed envelope (signature, connection, expiry,
//! replay, one identity per connection) and routes its message to the run's coordinator.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use swarmtrain_shared::PeerKey;
use swarmtrain_shared::admission::ReplayGuard;
use swarmtrain_shared::protocol::{self, ClientToRelay, Fetch, RelayToClient, Submission};

use crate::coordinator::Coordinator;

/// At most this many identities with unexpired envelopes are tracked (about 100 bytes each);
/// beyond it new identities are refused with `relay_busy` until old envelopes expire.
pub const MAX_ACTIVE_IDENTITIES: usize = 100_000;

/// Every run's coordinator, by run id, and the default run.
#[derive(Debug)]
pub struct Runs {
    by_id: BTreeMap<String, Arc<Coordinator>>,
    default: Arc<Coordinator>,
    guard: Mutex<Guard>,
}

/// What the relay remembers about recent signers.
#[derive(Debug)]
struct Guard {
    replays: ReplayGuard,
    /// The identity each connection's peer ID has signed as (one each), for as long as the
    /// connection is open.
    bound: HashMap<PeerId, PeerKey>,
    /// Connections whose identity has joined a run (was admitted): only they may send parts.
    joined: HashSet<PeerId>,
}

/// Unix time in ms on the relay's clock.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn run_of(message: &ClientToRelay) -> &str {
    match message {
        ClientToRelay::Join(join) => &join.run_id,
        ClientToRelay::AwaitRound { run_id, .. } => run_id,
        ClientToRelay::Update(update) => &update.run_id,
    }
}

impl Runs {
    /// `coordinators` must be non-empty with distinct run ids; the first is the default run.
    pub fn new(coordinators: Vec<Arc<Coordinator>>) -> Self {
        let default = coordinators[0].clone();
        let by_id = coordinators
            .into_iter()
            .map(|c| (c.spec().run_id.clone(), c))
            .collect();
        Self {
            by_id,
            default,
            guard: Mutex::new(Guard {
                replays: ReplayGuard::new(MAX_ACTIVE_IDENTITIES),
                bound: HashMap::new(),
                joined: HashSet::new(),
            }),
        }
    }

    /// Whether `peer`'s identity has joined a run on its open connection (it passed the run's
    /// admission policy): only such connections may buffer a long message.
    pub fn has_joined(&self, peer: &PeerId) -> bool {
        self.guard
            .lock()
            .is_ok_and(|guard| guard.joined.contains(peer))
    }

    /// Forgets `peer`'s binding: its last connection closed.
    pub fn unbind(&self, peer: &PeerId) {
        if let Ok(mut guard) = self.guard.lock() {
            guard.bound.remove(peer);
            guard.joined.remove(peer);
        }
    }

    /// Identities whose envelopes are tracked for replay now (for `/metrics`).
    pub fn tracked_identities(&self) -> usize {
        self.guard.lock().map_or(0, |guard| guard.replays.len())
    }

    /// The longest message any run can use: its largest update and the envelope around it.
    pub fn max_submission_bytes(&self) -> usize {
        self.by_id
            .values()
            .map(|run| {
                let spec = run.spec();
                spec.codec.encoded_len(spec.model.num_params())
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

    /// Verifies a submission that arrived on `from`'s connection and hands its message to its
    /// run's coordinator. Refused, each with its reason: a bad signature (`bad_signature`), an
    /// envelope made for another connection (`wrong_connection`), an expired or overlong one
    /// (`expired`), one seen before (`replayed`), and a second identity on one connection
    /// (`identity_mismatch`). Messages that can't be attributed to a run are counted against
    /// the default run.
    pub async fn handle(
        &self,
        submission: Submission,
        from: PeerId,
        max_wait: Duration,
    ) -> Vec<u8> {
        let (peer, envelope) = match submission.signed.verify_and_decode() {
            Ok(ok) => ok,
            Err(e) => {
                return self
                    .default
                    .reject(None, "bad_signature", e.to_string())
                    .await;
            }
        };
        if envelope.peer_id != from.to_bytes() {
            let reason = format!(
                "the message was signed for connection {}, not this one ({from})",
                PeerId::from_bytes(&envelope.peer_id)
                    .map_or_else(|_| "(malformed)".to_owned(), |p| p.to_string())
            );
            return self
                .default
                .reject(Some(peer), "wrong_connection", reason)
                .await;
        }
        let refused = match self.guard.lock() {
            Ok(mut guard) => match guard.bound.get(&from) {
                Some(bound) if *bound != peer => Some((
                    "identity_mismatch",
                    format!(
                        "this connection signs as {}; one connection carries one identity",
                        bound.short()
                    ),
                )),
                _ => match guard
                    .replays
                    .check(peer, envelope.seq, envelope.expires_ms, unix_ms())
                {
                    Ok(()) => {
                        guard.bound.insert(from, peer);
                        None
                    }
                    Err(e) => Some((e.kind(), e.to_string())),
                },
            },
            Err(_) => Some((
                "internal",
                "the relay's replay guard is poisoned".to_owned(),
            )),
        };
        if let Some((kind, reason)) = refused {
            return self.default.reject(Some(peer), kind, reason).await;
        }
        let message = envelope.message;
        match self.by_id.get(run_of(&message)) {
            Some(run) => {
                let is_join = matches!(message, ClientToRelay::Join(_));
                let answer = run
                    .handle(
                        peer,
                        message,
                        submission.signed,
                        submission.payload,
                        max_wait,
                    )
                    .await;
                if is_join
                    && matches!(
                        protocol::decode::<RelayToClient>(&answer),
                        Ok(RelayToClient::Welcome(_))
                    )
                    && let Ok(mut guard) = self.guard.lock()
                {
                    guard.joined.insert(from);
                }
                answer
            }
            None => {
                let reason = format!(
                    "no run {:?} on this relay (it has {})",
                    run_of(&message),
                    self.ids().join(", ")
                );
                self.default.reject(Some(peer), "wrong_run", reason).await
            }
        }
    }

    /// Answers a fetch from its run's public data.
    pub async fn fetch(&self, fetch: Fetch) -> Vec<u8> {
        let Fetch::Params { run_id, .. } = &fetch;
        match self.by_id.get(run_id) {
            Some(run) => run.fetch(fetch).await,
            None => {
                self.default
                    .reject(
                        None,
                        "wrong_run",
                        format!("no run {run_id:?} on this relay"),
                    )
                    .await
            }
        }
    }

    pub async fn reject_malformed(&self, reason: String) -> Vec<u8> {
        self.default.reject(None, "malformed", reason).await
    }

    /// Refuses a part of a long message (`kind`: `bad_part`, or `unbound_part` on a connection
    /// that has not yet sent a valid envelope).
    pub async fn reject_part(&self, kind: &str, reason: String) -> Vec<u8> {
        self.default.reject(None, kind, reason).await
    }

    /// Refuses a request because its connection, or the relay, has too many in flight.
    pub async fn reject_busy(&self, kind: &str, reason: String) -> Vec<u8> {
        self.default.reject(None, kind, reason).await
    }
}
