//! The runs a relay coordinates, each with its own spec, round state, data and checkpoints.
//! Messages name their run; this routes them to its coordinator.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use swarmtrain_shared::Signed;
use swarmtrain_shared::protocol::{ClientToRelay, Fetch};

use crate::coordinator::Coordinator;

/// Every run's coordinator, by run id, and the default run.
#[derive(Debug)]
pub struct Runs {
    by_id: BTreeMap<String, Arc<Coordinator>>,
    default: Arc<Coordinator>,
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
        Self { by_id, default }
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

    /// Verifies a signed message and hands it to its run's coordinator. Messages that can't be
    /// attributed to a run are counted against the default run.
    pub async fn handle(&self, signed: Signed<ClientToRelay>, max_wait: Duration) -> Vec<u8> {
        let (peer, message) = match signed.verify_and_decode() {
            Ok(ok) => ok,
            Err(e) => {
                return self
                    .default
                    .reject(None, "bad_signature", e.to_string())
                    .await;
            }
        };
        match self.by_id.get(run_of(&message)) {
            Some(run) => run.handle(peer, message, max_wait).await,
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

    pub async fn reject_part(&self, reason: String) -> Vec<u8> {
        self.default.reject(None, "bad_part", reason).await
    }

    /// Refuses a request because its connection, or the relay, has too many in flight.
    pub async fn reject_busy(&self, kind: &str, reason: String) -> Vec<u8> {
        self.default.reject(None, kind, reason).await
    }
}
