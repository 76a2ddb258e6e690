//! What the relay's unit tests share: one digits run (with or without a store), with the sender
//! its announcements go out on.

use std::sync::Arc;

use swarmtrain_shared::Identity;
use swarmtrain_shared::protocol::RunSpec;

use crate::coordinator::{Announcements, Coordinator};
use crate::{Runs, digits_run};

/// `spec` (the digits run when None) as the relay's only run, with no store.
pub async fn runs(spec: Option<RunSpec>) -> (Arc<Runs>, Announcements) {
    runs_with_store(spec, None).await
}

/// [`runs`], keeping the run in `store`.
pub async fn runs_with_store(
    spec: Option<RunSpec>,
    store: Option<Arc<crate::store::Store>>,
) -> (Arc<Runs>, Announcements) {
    let spec = spec.unwrap_or_else(digits_run);
    let data = crate::load_data(&spec, 0).expect("the run's data");
    let (announce, _) = tokio::sync::broadcast::channel(16);
    let coordinator = Coordinator::new(
        crate::coordinator::RunSetup {
            identity: Identity::from_seed([5; 32]),
            spec,
            data,
            seed: 0,
            admission: Default::default(),
        },
        crate::coordinator::RelayShared {
            aggregation: Default::default(),
            store,
            announce: announce.clone(),
            due: Arc::new(tokio::sync::Notify::new()),
        },
    )
    .await
    .expect("the run opens");
    let runs = Runs::new(vec![Arc::new(coordinator)], false).expect("runs");
    (Arc::new(runs), announce)
}
